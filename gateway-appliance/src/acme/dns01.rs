//! DNS-01 providers: where `_acme-challenge` TXT records are published.

use std::net::SocketAddr;

use bytes::Bytes;
use dstack_rpc::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::AcmeError;

/// Publishes and removes TXT records. A name may hold several values at once (the wildcard and
/// the bare domain share `_acme-challenge.<domain>`), so `add_txt` must add, not replace.
pub trait DnsProvider: Send + Sync {
    /// Add `value` to the TXT records of `fqdn` (no trailing dot).
    fn add_txt<'a>(&'a self, fqdn: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), AcmeError>>;
    /// Remove every TXT record of `fqdn` that this provider added.
    fn clear_txt<'a>(&'a self, fqdn: &'a str) -> BoxFuture<'a, Result<(), AcmeError>>;
}

/// pebble-challtestsrv's management API (`POST /set-txt`, `POST /clear-txt`), for tests with a
/// local pebble. Its DNS server answers the TXT queries pebble makes during validation.
#[derive(Debug, Clone)]
pub struct ChallTestSrv {
    management: SocketAddr,
}

impl ChallTestSrv {
    /// `management` is the `-management` address of pebble-challtestsrv.
    pub fn new(management: SocketAddr) -> Self {
        Self { management }
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> Result<(), AcmeError> {
        let err = |m: String| AcmeError::Dns(format!("challtestsrv {path}: {m}"));
        let stream = tokio::net::TcpStream::connect(self.management)
            .await
            .map_err(|e| err(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| err(e.to_string()))?;
        let conn_task = tokio::spawn(conn);
        let req = http::Request::post(path)
            .header(http::header::HOST, self.management.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| err(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| err(e.to_string()))?;
        let status = resp.status();
        let text = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        conn_task.abort();
        if !status.is_success() {
            return Err(err(format!("HTTP {status}: {}", String::from_utf8_lossy(&text))));
        }
        Ok(())
    }
}

impl DnsProvider for ChallTestSrv {
    fn add_txt<'a>(&'a self, fqdn: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), AcmeError>> {
        Box::pin(self.post(
            "/set-txt",
            serde_json::json!({ "host": format!("{fqdn}."), "value": value }),
        ))
    }

    fn clear_txt<'a>(&'a self, fqdn: &'a str) -> BoxFuture<'a, Result<(), AcmeError>> {
        Box::pin(self.post("/clear-txt", serde_json::json!({ "host": format!("{fqdn}.") })))
    }
}
