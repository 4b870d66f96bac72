//! The guest API proxy (dstack's `ProxiedGuestApi`, mounted at `/guest`): the manager forwards
//! `Info`, `SysInfo`, `NetworkInfo`, `ListContainers` and `Shutdown` for a VM id to the guest agent's
//! `GuestApi` at `/api` on guest vsock port [`GUEST_API_PORT`].
//!
//! The host reaches guest vsock ports through the VM's vsock unix socket with Firecracker's hybrid-vsock
//! handshake (our VMM and `vhost-device-vsock` both speak it): connect to `<vsock uds>`, send
//! `CONNECT <port>\n`, read `OK <host port>\n`, then the stream is the guest connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dstack_rpc::guest_api::*;
use dstack_rpc::{CallContext, Empty, RpcError, Transport, codec};
use http::header::{CONTENT_TYPE, HOST};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::state::Workdir;
use super::vms::Manager;

/// The guest agent's guest-API vsock port (dstack: `[guest-api] vsock port 8000`, path `/api`).
pub const GUEST_API_PORT: u32 = 8000;
/// Longest handshake reply accepted (`OK 4294967295\n` is 14 bytes).
const MAX_HANDSHAKE: usize = 32;
/// Largest guest API response accepted.
const MAX_RESPONSE: usize = 8 << 20;

/// Opens a stream to guest vsock `port` through the hybrid-vsock unix socket `uds`.
pub async fn connect_hybrid(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds).await?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    // Byte by byte so nothing after the newline (guest data) is consumed.
    let mut reply = Vec::with_capacity(16);
    loop {
        let b = s.read_u8().await?;
        if b == b'\n' {
            break;
        }
        reply.push(b);
        if reply.len() > MAX_HANDSHAKE {
            return Err(std::io::Error::other("hybrid vsock: handshake reply too long"));
        }
    }
    let text = String::from_utf8_lossy(&reply);
    if !text.starts_with("OK ") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("hybrid vsock: guest port {port} refused the connection ({text:?})"),
        ));
    }
    Ok(s)
}

/// A pRPC transport to a guest service over hybrid vsock (protobuf bodies, one connection per call).
#[derive(Debug, Clone)]
pub struct HybridVsockTransport {
    pub uds: PathBuf,
    pub port: u32,
    /// Path prefix, e.g. `/api`.
    pub prefix: String,
    pub timeout: Duration,
}

impl HybridVsockTransport {
    async fn round_trip(&self, method: &str, body: Vec<u8>) -> Result<(http::StatusCode, Bytes), RpcError> {
        let stream = connect_hybrid(&self.uds, self.port).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| RpcError::Http(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let req = http::Request::post(format!("{}/{method}", self.prefix))
            .header(HOST, "localhost")
            .header(CONTENT_TYPE, codec::PROTOBUF_CONTENT_TYPE)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| RpcError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| RpcError::Http(e.to_string()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| RpcError::Http(format!("reading the guest's answer: {e}")))?
            .to_bytes();
        driver.abort();
        Ok((status, body))
    }
}

impl Transport for HybridVsockTransport {
    async fn call<Req, Resp>(&self, method: &str, req: &Req) -> Result<Resp, RpcError>
    where
        Req: Message + Serialize + Sync,
        Resp: Message + DeserializeOwned + Default + Send,
    {
        let body = req.encode_to_vec();
        let (status, bytes) = tokio::time::timeout(self.timeout, self.round_trip(method, body))
            .await
            .map_err(|_| RpcError::Timeout {
                what: "guest API call",
                after: self.timeout,
            })??;
        if !status.is_success() {
            return Err(RpcError::Handler(format!(
                "guest answered {status}: {}",
                codec::decode_error_body(&bytes, false)
            )));
        }
        codec::decode_protobuf(method, &bytes)
    }
}

/// A `GuestApi` client for a VM's work directory.
pub fn guest_client(wd: &Workdir, timeout: Duration) -> GuestApiClient<HybridVsockTransport> {
    GuestApiClient::new(HybridVsockTransport {
        uds: wd.vsock_uds(),
        port: GUEST_API_PORT,
        prefix: "/api".into(),
        timeout,
    })
}

/// `ProxiedGuestApi`: resolves the VM id and forwards to its guest agent.
#[derive(Clone)]
pub struct GuestProxy {
    mgr: Arc<Manager>,
    timeout: Duration,
}

impl GuestProxy {
    pub fn new(mgr: Arc<Manager>) -> Self {
        GuestProxy {
            mgr,
            timeout: Duration::from_secs(30),
        }
    }

    fn client(&self, id: &str) -> Result<GuestApiClient<HybridVsockTransport>, RpcError> {
        let snap = self
            .mgr
            .snapshot(id)
            .ok_or_else(|| RpcError::Handler(format!("VM {id} not found")))?;
        if snap.status != "running" {
            return Err(RpcError::Handler(format!(
                "VM {id} is {}; the guest API needs it running",
                snap.status
            )));
        }
        Ok(guest_client(
            &Workdir::new(&self.mgr.config.cvm.run_path, &snap.manifest.id),
            self.timeout,
        ))
    }
}

impl ProxiedGuestApiRpc for GuestProxy {
    async fn info(&self, _ctx: &CallContext, req: Id) -> Result<GuestInfo, RpcError> {
        self.client(&req.id)?.info().await
    }
    async fn sys_info(&self, _ctx: &CallContext, req: Id) -> Result<SystemInfo, RpcError> {
        self.client(&req.id)?.sys_info().await
    }
    async fn network_info(&self, _ctx: &CallContext, req: Id) -> Result<NetworkInformation, RpcError> {
        self.client(&req.id)?.network_info().await
    }
    async fn list_containers(&self, _ctx: &CallContext, req: Id) -> Result<ListContainersResponse, RpcError> {
        self.client(&req.id)?.list_containers().await
    }
    async fn shutdown(&self, _ctx: &CallContext, req: Id) -> Result<Empty, RpcError> {
        self.client(&req.id)?.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn handshake_ok_refused_and_overlong() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let l = UnixListener::bind(&uds).unwrap();
        let server = tokio::spawn(async move {
            let mut lines = Vec::new();
            for reply in [&b"OK 1073741824\nhello"[..], b"FAIL\n", &[b'x'; 64]] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 13];
                s.read_exact(&mut buf).await.unwrap();
                lines.push(String::from_utf8_lossy(&buf).into_owned());
                s.write_all(reply).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            lines
        });
        let mut s = connect_hybrid(&uds, 8000).await.unwrap();
        let mut rest = [0u8; 5];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(
            &rest, b"hello",
            "guest bytes after the handshake are left in the stream"
        );
        let e = connect_hybrid(&uds, 8000).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        let e = connect_hybrid(&uds, 8000).await.unwrap_err().to_string();
        assert!(e.contains("too long"), "{e}");
        assert_eq!(server.await.unwrap(), ["CONNECT 8000\n"; 3]);
    }
}
