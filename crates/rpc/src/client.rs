//! pRPC client over `http://`, `https://` and `unix:` endpoints (one connection per call).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use prost::Message;
use rustls_pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::RpcError;
use crate::codec::{self, JSON_CONTENT_TYPE, PROTOBUF_CONTENT_TYPE};

/// Something that can carry a pRPC call; generated `<Service>Client<C>` are generic over it.
pub trait Transport: Send + Sync {
    /// Calls `method` (bare name) with `req` and decodes the response.
    fn call<Req, Resp>(&self, method: &str, req: &Req) -> impl Future<Output = Result<Resp, RpcError>> + Send
    where
        Req: Message + Serialize + Sync,
        Resp: Message + DeserializeOwned + Default + Send;
}

impl<T: Transport + ?Sized> Transport for &T {
    fn call<Req, Resp>(&self, method: &str, req: &Req) -> impl Future<Output = Result<Resp, RpcError>> + Send
    where
        Req: Message + Serialize + Sync,
        Resp: Message + DeserializeOwned + Default + Send,
    {
        (**self).call(method, req)
    }
}

impl<T: Transport + ?Sized> Transport for Arc<T> {
    fn call<Req, Resp>(&self, method: &str, req: &Req) -> impl Future<Output = Result<Resp, RpcError>> + Send
    where
        Req: Message + Serialize + Sync,
        Resp: Message + DeserializeOwned + Default + Send,
    {
        (**self).call(method, req)
    }
}

#[derive(Debug, Clone)]
enum Target {
    Tcp { host: String, port: u16, tls: bool },
    Unix(PathBuf),
    Vsock { cid: u32, port: u32 },
}

/// Raw HTTP response of a call: status, headers and the (size-limited) body.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response body.
    pub body: Bytes,
}

/// A pRPC client for one endpoint. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    target: Target,
    authority: String,
    prefix: String,
    json: bool,
    tls: Option<Arc<rustls::ClientConfig>>,
    server_name: Option<ServerName<'static>>,
    connect_timeout: Duration,
    timeout: Duration,
    headers: HeaderMap,
    max_response_bytes: usize,
}

impl Client {
    /// Parses `http://host:port[/prefix]`, `https://host:port[/prefix]`, `unix:/path/to.sock` or
    /// `vsock:<cid>:<port>` (prefix `""`; see [`Client::with_path_prefix`]). `https` needs [`Client::with_tls`].
    pub fn new(url: &str) -> Result<Self, RpcError> {
        let invalid = |reason: &str| RpcError::InvalidEndpoint {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = url.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(invalid("empty socket path"));
            }
            return Ok(Self::unix(path, ""));
        }
        if let Some(addr) = url.strip_prefix("vsock:") {
            let (cid, port) = crate::vsock::parse_addr(addr).ok_or_else(|| invalid("expected vsock:<cid>:<port>"))?;
            return Ok(Self::vsock(cid, port, ""));
        }
        let uri: Uri = url.parse().map_err(|e| invalid(&format!("{e}")))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(invalid("scheme must be http, https or unix")),
        };
        let authority = uri.authority().ok_or_else(|| invalid("missing host"))?;
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_owned();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let mut client = Self::with_target(Target::Tcp { host, port, tls }, authority.as_str().to_owned());
        client.prefix = normalize_prefix(uri.path());
        Ok(client)
    }

    /// A client for a unix socket with a path prefix (`""` for the agent, `"/prpc"` for tappd).
    pub fn unix(path: impl Into<PathBuf>, prefix: &str) -> Self {
        let mut client = Self::with_target(Target::Unix(path.into()), "localhost".to_owned());
        client.prefix = normalize_prefix(prefix);
        client
    }

    /// A client for an AF_VSOCK endpoint (`cid` 2 is the host) with a path prefix.
    pub fn vsock(cid: u32, port: u32, prefix: &str) -> Self {
        let mut client = Self::with_target(Target::Vsock { cid, port }, "localhost".to_owned());
        client.prefix = normalize_prefix(prefix);
        client
    }

    fn with_target(target: Target, authority: String) -> Self {
        Self {
            target,
            authority,
            prefix: String::new(),
            json: false,
            tls: None,
            server_name: None,
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(120),
            headers: HeaderMap::new(),
            max_response_bytes: 64 << 20,
        }
    }

    /// TLS configuration for `https` endpoints (trust anchors, client certificate).
    pub fn with_tls(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Name to verify the server certificate against, instead of the URL's host.
    pub fn with_server_name(mut self, name: &str) -> Result<Self, RpcError> {
        let parsed = ServerName::try_from(name.to_owned()).map_err(|e| RpcError::InvalidEndpoint {
            url: name.to_owned(),
            reason: format!("invalid TLS server name: {e}"),
        })?;
        self.server_name = Some(parsed);
        Ok(self)
    }

    /// Sends JSON (`Content-Type: application/json` and `?json`) instead of protobuf.
    pub fn with_json(mut self, json: bool) -> Self {
        self.json = json;
        self
    }

    /// Replaces the path prefix (e.g. `"/prpc"`).
    pub fn with_path_prefix(mut self, prefix: &str) -> Self {
        self.prefix = normalize_prefix(prefix);
        self
    }

    /// Timeout for TCP connect plus TLS handshake (default 10 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Timeout for a whole call, connect included (default 120 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Largest accepted response body (default 64 MiB).
    pub fn with_max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    /// Adds a header to every request.
    pub fn with_header(mut self, name: &str, value: &str) -> Result<Self, RpcError> {
        let invalid = |reason: String| RpcError::InvalidEndpoint {
            url: name.to_owned(),
            reason,
        };
        let name = HeaderName::try_from(name).map_err(|e| invalid(e.to_string()))?;
        let value = HeaderValue::try_from(value).map_err(|e| invalid(e.to_string()))?;
        self.headers.insert(name, value);
        Ok(self)
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn with_bearer_token(self, token: &str) -> Result<Self, RpcError> {
        self.with_header("authorization", &format!("Bearer {token}"))
    }

    /// Whether calls are JSON-encoded.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Calls `method` and decodes the response; non-2xx answers become [`RpcError::Remote`].
    pub async fn call<Req, Resp>(&self, method: &str, req: &Req) -> Result<Resp, RpcError>
    where
        Req: Message + Serialize,
        Resp: Message + DeserializeOwned + Default,
    {
        let (body, content_type, query) = if self.json {
            (codec::encode_json(method, req)?, JSON_CONTENT_TYPE, "?json")
        } else {
            (Bytes::from(req.encode_to_vec()), PROTOBUF_CONTENT_TYPE, "")
        };
        let path = format!("{}/{method}{query}", self.prefix);
        let resp = self.send(http::Method::POST, &path, Some(content_type), body).await?;
        let json_body = resp
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map_or(self.json, |ct| ct.starts_with(JSON_CONTENT_TYPE));
        if !resp.status.is_success() {
            return Err(RpcError::Remote {
                status: resp.status.as_u16(),
                message: codec::decode_error_body(&resp.body, json_body),
            });
        }
        if json_body {
            codec::decode_json(method, &resp.body)
        } else {
            codec::decode_protobuf(method, &resp.body)
        }
    }

    /// Sends one raw HTTP request to `path_and_query` (prefix not added) and returns the answer
    /// whatever its status. For tests and for speaking to non-pRPC routes.
    pub async fn send(
        &self,
        method: http::Method,
        path_and_query: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<RawResponse, RpcError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(HOST, self.authority.as_str());
        if let Some(ct) = content_type {
            builder = builder.header(CONTENT_TYPE, ct);
        }
        let mut req = builder
            .body(Full::new(body))
            .map_err(|e| RpcError::Http(format!("invalid request: {e}")))?;
        for (name, value) in &self.headers {
            req.headers_mut().insert(name, value.clone());
        }
        tokio::time::timeout(self.timeout, self.round_trip(req))
            .await
            .map_err(|_| RpcError::Timeout {
                what: "call",
                after: self.timeout,
            })?
    }

    async fn round_trip(&self, req: Request<Full<Bytes>>) -> Result<RawResponse, RpcError> {
        let connect = async {
            match &self.target {
                Target::Unix(path) => Ok::<BoxIo, RpcError>(Box::new(UnixStream::connect(path).await?)),
                Target::Vsock { cid, port } => {
                    Ok(Box::new(crate::vsock::VsockStream::connect(*cid, *port).await?) as BoxIo)
                }
                Target::Tcp { host, port, tls } => {
                    let tcp = TcpStream::connect((host.as_str(), *port)).await?;
                    tcp.set_nodelay(true)?;
                    if !tls {
                        return Ok(Box::new(tcp) as BoxIo);
                    }
                    let config = self.tls.clone().ok_or_else(|| RpcError::InvalidEndpoint {
                        url: format!("https://{}", self.authority),
                        reason: "https needs a TLS client configuration (Client::with_tls)".into(),
                    })?;
                    let name = match &self.server_name {
                        Some(n) => n.clone(),
                        None => ServerName::try_from(host.clone())
                            .map_err(|e| RpcError::Tls(format!("invalid server name {host:?}: {e}")))?,
                    };
                    let stream = tokio_rustls::TlsConnector::from(config)
                        .connect(name, tcp)
                        .await
                        .map_err(|e| RpcError::Tls(e.to_string()))?;
                    Ok(Box::new(stream) as BoxIo)
                }
            }
        };
        let io: BoxIo = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| RpcError::Timeout {
                what: "connect",
                after: self.connect_timeout,
            })??;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| RpcError::Http(e.to_string()))?;
        // The connection task ends when the sender is dropped; abort it if this call is dropped.
        let conn = AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("client connection error: {e}");
            }
        }));
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| RpcError::Http(e.to_string()))?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, self.max_response_bytes)
            .collect()
            .await
            .map_err(|e| RpcError::Http(format!("failed to read response body: {e}")))?
            .to_bytes();
        drop(sender);
        drop(conn);
        Ok(RawResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

impl Transport for Client {
    async fn call<Req, Resp>(&self, method: &str, req: &Req) -> Result<Resp, RpcError>
    where
        Req: Message + Serialize + Sync,
        Resp: Message + DeserializeOwned + Default + Send,
    {
        Client::call(self, method, req).await
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type BoxIo = Box<dyn Io>;

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("/{trimmed}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        let c = Client::new("http://127.0.0.1:8000/prpc").unwrap();
        assert!(matches!(&c.target, Target::Tcp { host, port: 8000, tls: false } if host == "127.0.0.1"));
        assert_eq!(c.prefix, "/prpc");
        assert_eq!(c.authority, "127.0.0.1:8000");

        let c = Client::new("https://kms.example.com/prpc/").unwrap();
        assert!(matches!(
            &c.target,
            Target::Tcp {
                port: 443,
                tls: true,
                ..
            }
        ));
        assert_eq!(c.prefix, "/prpc");

        let c = Client::new("http://[::1]:9/").unwrap();
        assert!(matches!(&c.target, Target::Tcp { host, port: 9, .. } if host == "::1"));
        assert_eq!(c.prefix, "");

        let c = Client::new("unix:/var/run/dstack.sock").unwrap();
        assert!(matches!(&c.target, Target::Unix(p) if p == &PathBuf::from("/var/run/dstack.sock")));
        assert_eq!(c.prefix, "");
        let c = Client::new("unix:./vmm.sock").unwrap().with_path_prefix("prpc");
        assert!(matches!(&c.target, Target::Unix(p) if p == &PathBuf::from("./vmm.sock")));
        assert_eq!(c.prefix, "/prpc");

        let c = Client::new("vsock:2:4050").unwrap();
        assert!(matches!(c.target, Target::Vsock { cid: 2, port: 4050 }));
        assert!(Client::new("vsock:2").is_err());
        assert!(Client::new("ftp://x").is_err());
        assert!(Client::new("unix:").is_err());
        assert!(Client::new("not a url").is_err());
    }
}
