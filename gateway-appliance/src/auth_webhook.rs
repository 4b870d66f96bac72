//! The registration webhook (`[core.auth]`): before a CVM is registered, `POST <url>` with
//!
//! ```json
//! {"app_id": "<hex>", "instance_id": "<hex>", "compose_hash": "<hex>"}
//! ```
//!
//! (`Content-Type: application/json`). A 2xx answer admits the CVM, unless its body is a JSON
//! object with `"isAllowed": false` (the KMS webhook's field), which refuses it with `reason`.
//! Anything else — another status, a connection error, no answer within `timeout`, a redirect —
//! refuses the registration: the webhook fails closed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::AuthConfig;
use crate::registration::PeerIdentity;

/// Largest webhook answer read.
const MAX_BODY: usize = 64 * 1024;

/// Why the webhook did not admit a CVM.
#[derive(Debug, Error)]
pub enum WebhookError {
    /// The configuration is unusable.
    #[error("auth webhook config: {0}")]
    Config(String),
    /// The webhook could not be asked.
    #[error("auth webhook unreachable: {0}")]
    Transport(String),
    /// No answer in time.
    #[error("auth webhook timed out after {0:?}")]
    Timeout(Duration),
    /// The webhook answered with a non-2xx status.
    #[error("auth webhook refused: HTTP {status}: {body}")]
    Status {
        /// The status code.
        status: u16,
        /// The beginning of the body.
        body: String,
    },
    /// The webhook answered `isAllowed: false`.
    #[error("auth webhook refused: {0}")]
    Denied(String),
}

/// The JSON posted.
#[derive(Debug, Serialize)]
pub struct AuthRequest<'a> {
    /// Hex app id.
    pub app_id: &'a str,
    /// Hex instance id.
    pub instance_id: &'a str,
    /// Hex compose hash ("" when unknown).
    pub compose_hash: &'a str,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuthAnswer {
    is_allowed: Option<bool>,
    #[serde(default)]
    reason: String,
}

/// A configured webhook.
#[derive(Clone)]
pub struct AuthWebhook {
    uri: Uri,
    timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for AuthWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthWebhook")
            .field("uri", &self.uri)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore, WebhookError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in
        CertificateDer::pem_file_iter(path).map_err(|e| WebhookError::Config(format!("{}: {e}", path.display())))?
    {
        let c = c.map_err(|e| WebhookError::Config(format!("{}: {e}", path.display())))?;
        // A bundle may hold certificates rustls cannot use; skip those rather than fail.
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err(WebhookError::Config(format!(
            "{}: no usable certificates",
            path.display()
        )));
    }
    Ok(roots)
}

impl AuthWebhook {
    /// From `[core.auth]`; `None` when disabled.
    pub fn from_config(cfg: &AuthConfig) -> Result<Option<Self>, WebhookError> {
        if !cfg.enabled {
            return Ok(None);
        }
        let uri: Uri = cfg
            .url
            .parse()
            .map_err(|e| WebhookError::Config(format!("url {:?}: {e}", cfg.url)))?;
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => {
                let path = cfg
                    .ca_file
                    .clone()
                    .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
                let roots = load_roots(&path)?;
                let c = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_safe_default_protocol_versions()
                    .map_err(|e| WebhookError::Config(e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(Arc::new(c))
            }
            _ => {
                return Err(WebhookError::Config(format!(
                    "url {:?}: scheme must be http or https",
                    cfg.url
                )));
            }
        };
        if uri.host().is_none() {
            return Err(WebhookError::Config(format!("url {:?}: no host", cfg.url)));
        }
        Ok(Some(Self {
            uri,
            timeout: cfg.timeout,
            tls,
        }))
    }

    /// Admit `id` or say why not.
    pub async fn check(&self, id: &PeerIdentity) -> Result<(), WebhookError> {
        let body = serde_json::to_vec(&AuthRequest {
            app_id: &id.app_id,
            instance_id: &id.instance_id,
            compose_hash: id.compose_hash.as_deref().unwrap_or(""),
        })
        .map_err(|e| WebhookError::Transport(e.to_string()))?;
        match tokio::time::timeout(self.timeout, self.post(body)).await {
            Ok(r) => r,
            Err(_) => Err(WebhookError::Timeout(self.timeout)),
        }
    }

    async fn post(&self, body: Vec<u8>) -> Result<(), WebhookError> {
        let host = self.uri.host().unwrap_or_default().to_owned();
        let port = self.uri.port_u16().unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let host_for_dial = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let tcp = tokio::net::TcpStream::connect((host_for_dial.as_str(), port))
            .await
            .map_err(|e| WebhookError::Transport(format!("connect {host}:{port}: {e}")))?;
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(http::header::HOST, authority(&self.uri))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| WebhookError::Transport(e.to_string()))?;
        let (status, bytes) = match &self.tls {
            None => send(TokioIo::new(tcp), req).await?,
            Some(tls) => {
                let name = rustls_pki_types::ServerName::try_from(host_for_dial.clone())
                    .map_err(|e| WebhookError::Config(format!("server name {host_for_dial:?}: {e}")))?;
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| WebhookError::Transport(format!("tls: {e}")))?;
                send(TokioIo::new(stream), req).await?
            }
        };
        if !(200..300).contains(&status) {
            return Err(WebhookError::Status {
                status,
                body: String::from_utf8_lossy(bytes.get(..bytes.len().min(200)).unwrap_or_default()).into_owned(),
            });
        }
        // An explicit refusal in a 2xx body still refuses.
        if let Ok(a) = serde_json::from_slice::<AuthAnswer>(&bytes)
            && a.is_allowed == Some(false)
        {
            return Err(WebhookError::Denied(if a.reason.is_empty() {
                "isAllowed = false".into()
            } else {
                a.reason
            }));
        }
        Ok(())
    }
}

fn authority(uri: &Uri) -> String {
    uri.authority().map_or_else(String::new, |a| a.as_str().to_owned())
}

async fn send<I>(io: I, req: Request<Full<Bytes>>) -> Result<(u16, Bytes), WebhookError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| WebhookError::Transport(e.to_string()))?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| WebhookError::Transport(e.to_string()))?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| WebhookError::Transport(format!("reading answer: {e}")))?
        .to_bytes();
    conn.abort();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A one-shot HTTP server answering with `response` (raw bytes) after `delay`; returns the URL
    /// and the request it received.
    async fn server(response: &'static str, delay: Duration) -> (String, Arc<Mutex<String>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/auth?x=1", l.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(String::new()));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            // Read until the JSON body's closing brace.
            while !got.ends_with(b"}") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            *seen2.lock().unwrap() = String::from_utf8_lossy(&got).into_owned();
            tokio::time::sleep(delay).await;
            let _ = s.write_all(response.as_bytes()).await;
            let _ = s.shutdown().await;
        });
        (url, seen)
    }

    fn hook(url: &str, timeout: Duration) -> AuthWebhook {
        AuthWebhook::from_config(&AuthConfig {
            enabled: true,
            url: url.into(),
            timeout,
            ca_file: None,
        })
        .unwrap()
        .unwrap()
    }

    fn id() -> PeerIdentity {
        PeerIdentity {
            app_id: "a1a1".into(),
            instance_id: "1d1d".into(),
            compose_hash: Some("c0c0".into()),
        }
    }

    #[tokio::test]
    async fn allows_on_2xx_and_posts_the_identity() {
        let (url, seen) = server("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", Duration::ZERO).await;
        hook(&url, Duration::from_secs(5)).check(&id()).await.unwrap();
        let req = seen.lock().unwrap().clone();
        assert!(req.starts_with("POST /auth?x=1 HTTP/1.1\r\n"), "{req}");
        assert!(
            req.to_ascii_lowercase().contains("content-type: application/json"),
            "{req}"
        );
        let body = req.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["app_id"], "a1a1");
        assert_eq!(v["instance_id"], "1d1d");
        assert_eq!(v["compose_hash"], "c0c0");
    }

    #[tokio::test]
    async fn refuses_on_non_2xx_explicit_denial_timeout_and_unreachable() {
        let (url, _) = server(
            "HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope",
            Duration::ZERO,
        )
        .await;
        let e = hook(&url, Duration::from_secs(5)).check(&id()).await.unwrap_err();
        assert!(matches!(e, WebhookError::Status { status: 403, .. }), "{e}");

        let (url, _) = server(
            "HTTP/1.1 200 OK\r\nContent-Length: 39\r\n\r\n{\"isAllowed\":false,\"reason\":\"revoked\"}\n",
            Duration::ZERO,
        )
        .await;
        let e = hook(&url, Duration::from_secs(5)).check(&id()).await.unwrap_err();
        assert!(matches!(&e, WebhookError::Denied(r) if r == "revoked"), "{e}");

        let (url, _) = server(
            "HTTP/1.1 302 Found\r\nLocation: /\r\nContent-Length: 0\r\n\r\n",
            Duration::ZERO,
        )
        .await;
        assert!(
            hook(&url, Duration::from_secs(5)).check(&id()).await.is_err(),
            "redirects refuse"
        );

        let (url, _) = server("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", Duration::from_secs(3)).await;
        let e = hook(&url, Duration::from_millis(300)).check(&id()).await.unwrap_err();
        assert!(matches!(e, WebhookError::Timeout(_)), "{e}");

        // Nothing listens on a port we just released.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        drop(l);
        let e = hook(&url, Duration::from_secs(5)).check(&id()).await.unwrap_err();
        assert!(matches!(e, WebhookError::Transport(_)), "{e}");
    }

    #[test]
    fn config_is_checked() {
        let cfg = |url: &str| AuthConfig {
            enabled: true,
            url: url.into(),
            ..Default::default()
        };
        assert!(AuthWebhook::from_config(&AuthConfig::default()).unwrap().is_none());
        assert!(AuthWebhook::from_config(&cfg("ftp://x/")).is_err());
        assert!(AuthWebhook::from_config(&cfg("not a url")).is_err());
        assert!(AuthWebhook::from_config(&cfg("")).is_err());
    }
}
