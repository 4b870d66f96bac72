//! Stand-ins for an app behind the proxy and for DNS.

use std::net::IpAddr;

use dstack_gateway::dns::{DnsError, TxtResolver};
use dstack_rpc::BoxFuture;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// A resolver without TXT records (no custom domains).
pub struct NoTxt;

impl TxtResolver for NoTxt {
    fn lookup_txt<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<String>, DnsError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// Plain TCP backend on `ip` standing in for the app: replies `<tag>:` then echoes everything it receives.
/// Returns its port.
pub async fn echo_backend(ip: [u8; 4], tag: &'static str) -> u16 {
    let l = TcpListener::bind((IpAddr::from(ip), 0)).await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(format!("{tag}:").as_bytes()).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}
