//! HTTP → pRPC routing: path prefix, `Service.` prefix, encodings, limits and error mapping.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;

use crate::codec::{self, Encoding};
use crate::{CallContext, ConnInfo, Dispatch, RpcError};

/// Default request body limit (16 MiB).
pub const DEFAULT_BODY_LIMIT: usize = 16 << 20;

struct Entry {
    /// The service name followed by accepted legacy aliases (e.g. `Tproxy` for `Gateway`).
    names: Vec<String>,
    service: Arc<dyn Dispatch>,
}

/// Routes `POST|GET <prefix>/[Service.]<Method>` to one of several services.
pub struct RpcRouter {
    prefix: String,
    services: Vec<Entry>,
    body_limit: usize,
    drain_timeout: Duration,
}

impl RpcRouter {
    /// A router answering under `prefix` (`""` or `"/"` for the root, `"/prpc"`, `"/api"`).
    pub fn new(prefix: &str) -> Self {
        let trimmed = prefix.trim_matches('/');
        let prefix = if trimmed.is_empty() {
            String::new()
        } else {
            format!("/{trimmed}")
        };
        Self {
            prefix,
            services: Vec::new(),
            body_limit: DEFAULT_BODY_LIMIT,
            drain_timeout: Duration::from_secs(10),
        }
    }

    /// Adds a service. A bare method name goes to the first added service that has it.
    pub fn service(mut self, service: impl Dispatch) -> Self {
        self.services.push(Entry {
            names: vec![service.service_name().to_owned()],
            service: Arc::new(service),
        });
        self
    }

    /// Also accepts `alias.` as the method prefix of the service named `service_name` (dstack's
    /// gateway accepts `Tproxy.`, the VMM `Teepod.`). Unknown service names are ignored.
    pub fn alias(mut self, alias: &str, service_name: &str) -> Self {
        for e in &mut self.services {
            if e.service.service_name() == service_name {
                e.names.push(alias.to_owned());
            }
        }
        self
    }

    /// Sets the maximum request body size (larger bodies get HTTP 413).
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// How long a graceful shutdown waits for open connections before dropping them.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// The normalized path prefix (`""` or `"/name"`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn drain_timeout_value(&self) -> Duration {
        self.drain_timeout
    }

    /// Finds the service for `[Service.]Method`.
    fn resolve(&self, name: &str) -> Option<(&Arc<dyn Dispatch>, String)> {
        match name.split_once('.') {
            Some((svc, method)) => self
                .services
                .iter()
                .find(|e| e.names.iter().any(|n| n == svc) && e.service.methods().contains(&method))
                .map(|e| (&e.service, method.to_owned())),
            None => self
                .services
                .iter()
                .find(|e| e.service.methods().contains(&name))
                .map(|e| (&e.service, name.to_owned())),
        }
    }

    /// Handles one HTTP request. Never fails: every error becomes an HTTP response.
    pub async fn handle<B>(&self, req: Request<B>, conn: &ConnInfo) -> Response<Full<Bytes>>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let query = parts.uri.query().unwrap_or("");
        let encoding = if parts.method == Method::GET {
            Encoding::Query
        } else if is_json_content_type(parts.headers.get(CONTENT_TYPE)) || query_has_json(query) {
            Encoding::Json
        } else {
            Encoding::Protobuf
        };
        let path = parts.uri.path();
        let Some(name) = path
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|name| !name.is_empty() && !name.contains('/'))
        else {
            return error_response(encoding, &RpcError::MethodNotFound(path.to_owned()));
        };
        let Some((service, method)) = self.resolve(name) else {
            return error_response(encoding, &RpcError::MethodNotFound(name.to_owned()));
        };
        if parts.method != Method::POST && parts.method != Method::GET {
            let mut resp = error_response(
                Encoding::Json,
                &RpcError::Handler(format!("method {} not allowed", parts.method)),
            );
            *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            resp.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, POST"));
            return resp;
        }

        let payload = if encoding == Encoding::Query {
            Bytes::copy_from_slice(query.as_bytes())
        } else {
            match self.read_body(&parts.headers, body).await {
                Ok(b) => b,
                Err(e) => return error_response(encoding, &e),
            }
        };

        let ctx = CallContext {
            remote: conn.remote.clone(),
            peer_certificates: conn.peer_certificates.clone(),
            headers: parts.headers,
            path_prefix: self.prefix.clone(),
            service: service.service_name(),
            method,
        };
        let service = Arc::clone(service);
        // Run the handler in its own task so that a panic is contained to this request.
        let task = tokio::spawn(async move {
            let result = service.dispatch(&ctx, &ctx.method, encoding, payload).await;
            (ctx, result)
        });
        match task.await {
            Ok((_, Ok(body))) => {
                let mut resp = Response::new(Full::new(body));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(encoding.response_content_type()));
                resp
            }
            Ok((ctx, Err(e))) => {
                tracing::warn!(
                    service = ctx.service,
                    method = %ctx.method,
                    remote = %ctx.remote,
                    "rpc call failed: {e}"
                );
                error_response(encoding, &e)
            }
            Err(join) => {
                tracing::error!(%path, "rpc handler panicked or was cancelled: {join}");
                error_response(encoding, &RpcError::Internal("handler panicked".to_owned()))
            }
        }
    }

    async fn read_body<B>(&self, headers: &http::HeaderMap, body: B) -> Result<Bytes, RpcError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let too_large = RpcError::PayloadTooLarge { limit: self.body_limit };
        let declared = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.body_limit as u64) {
            return Err(too_large);
        }
        match Limited::new(body, self.body_limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large),
            Err(e) => Err(RpcError::Http(format!("failed to read request body: {e}"))),
        }
    }
}

/// `application/json`, with or without parameters such as `charset`.
fn is_json_content_type(value: Option<&HeaderValue>) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// `?json`, `?json=1`, `?json=true` select JSON; `?json=0`/`false` do not.
fn query_has_json(query: &str) -> bool {
    form_urlencoded::parse(query.as_bytes()).any(|(k, v)| k == "json" && !matches!(v.as_ref(), "0" | "false"))
}

fn error_response(encoding: Encoding, err: &RpcError) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(codec::encode_error(encoding, &err.to_string())));
    *resp.status_mut() = err.http_status();
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(encoding.response_content_type()));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_normalize() {
        assert_eq!(RpcRouter::new("").prefix(), "");
        assert_eq!(RpcRouter::new("/").prefix(), "");
        assert_eq!(RpcRouter::new("prpc").prefix(), "/prpc");
        assert_eq!(RpcRouter::new("/prpc/").prefix(), "/prpc");
    }

    #[test]
    fn json_detection() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert!(is_json_content_type(Some(&h("application/json"))));
        assert!(is_json_content_type(Some(&h("Application/JSON; charset=utf-8"))));
        assert!(!is_json_content_type(Some(&h("application/protobuf"))));
        assert!(!is_json_content_type(None));
        assert!(query_has_json("json"));
        assert!(query_has_json("a=1&json="));
        assert!(query_has_json("json=true"));
        assert!(!query_has_json("json=0"));
        assert!(!query_has_json("jsonx"));
        assert!(!query_has_json(""));
    }
}
