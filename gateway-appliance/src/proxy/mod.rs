//! The public edge: accept TCP, read the ClientHello, route by SNI, then either splice the TLS
//! bytes to the app (passthrough) or terminate TLS here and forward plaintext.

pub mod io;
pub mod pp;
pub mod splice;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::config::ProxyConfig;
use crate::dns::{DnsError, TxtResolver, resolve_app_address};
use crate::routing::{Backend, Route, RouteError, RoutingTable};
use crate::sni::{
    ClientHelloError, Destination, HostError, TlsMode, parse_client_hello_bounded, parse_subdomain, subdomain_of,
};
use io::{Prefixed, PumpError, PumpLimits, pump};
use tls::{TlsError, TlsTerminator};

/// Why a connection was closed without being proxied (or ended abnormally).
#[derive(Debug, Error)]
pub enum ProxyError {
    /// Reading from the client failed.
    #[error("client i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The client did not send a complete ClientHello in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// Not a usable ClientHello.
    #[error(transparent)]
    ClientHello(#[from] ClientHelloError),
    /// Client closed before sending a ClientHello.
    #[error("client closed before ClientHello")]
    Eof,
    /// The ClientHello had no server_name.
    #[error("ClientHello without SNI")]
    NoSni,
    /// Host name grammar.
    #[error(transparent)]
    Host(#[from] HostError),
    /// TXT fallback failed.
    #[error(transparent)]
    Dns(#[from] DnsError),
    /// No route.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// TLS termination.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Every backend refused or timed out.
    #[error("no backend of {app_id:?} reachable")]
    BackendUnreachable {
        /// The app.
        app_id: String,
    },
    /// Inbound PROXY header.
    #[error(transparent)]
    Pp(#[from] pp::PpError),
    /// Copy loop ended early.
    #[error(transparent)]
    Pump(#[from] PumpError),
}

/// Counters exported by the status endpoint.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections currently open.
    pub active: AtomicU64,
    /// Connections refused before reaching a backend.
    pub rejected: AtomicU64,
    /// Bytes client → app.
    pub bytes_up: AtomicU64,
    /// Bytes app → client.
    pub bytes_down: AtomicU64,
    /// Of those, bytes moved by splice(2) (passthrough bulk data, never copied to userspace).
    pub bytes_spliced: AtomicU64,
}

/// Everything a connection handler needs.
pub struct ProxyState {
    /// `[core.proxy]`.
    pub config: ProxyConfig,
    /// Registered instances.
    pub table: RoutingTable,
    /// TXT lookups for custom domains.
    pub resolver: Arc<dyn TxtResolver>,
    /// Wildcard certificate.
    pub tls: Arc<TlsTerminator>,
    /// Counters.
    pub stats: Stats,
}

impl std::fmt::Debug for ProxyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// TLS alert record: fatal `unrecognized_name` (RFC 6066 §3); sent before closing unroutable hosts.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [21, 3, 3, 0, 2, 2, 112];

/// Accept connections until `shutdown` resolves.
pub async fn run(listener: TcpListener, state: Arc<ProxyState>, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, peer, &state).await {
                            debug!(%peer, error = %e, "proxy connection closed");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

struct ActiveGuard<'a>(&'a Stats);
impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Handle one client connection.
pub async fn handle(mut client: TcpStream, peer: SocketAddr, state: &ProxyState) -> Result<(), ProxyError> {
    let stats = &state.stats;
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    stats.active.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(stats);
    let cfg = &state.config;
    let _ = client.set_nodelay(true);
    let local = client.local_addr()?;
    let mut buf = Vec::with_capacity(1024);

    let (src, dst) = if cfg.inbound_pp_enabled {
        let hdr = tokio::time::timeout(cfg.timeouts.pp_header, read_pp_header(&mut client, &mut buf))
            .await
            .map_err(|_| ProxyError::Timeout("PROXY header"))??;
        hdr.unwrap_or((peer, local))
    } else {
        (peer, local)
    };

    let hello = tokio::time::timeout(
        cfg.timeouts.handshake,
        read_client_hello(&mut client, &mut buf, cfg.max_client_hello),
    )
    .await
    .map_err(|_| ProxyError::Timeout("ClientHello"));
    let (dest, route, guard) = match hello.and_then(|h| h) {
        Ok(sni) => match route(state, &sni).await {
            Ok(r) => r,
            Err(e) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                let _ = tokio::time::timeout(cfg.timeouts.write, client.write_all(&ALERT_UNRECOGNIZED_NAME)).await;
                return Err(e);
            }
        },
        Err(e) => {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    let _guard = guard;
    let limits = PumpLimits {
        buffer_size: cfg.buffer_size,
        idle: cfg.timeouts.idle,
        write: cfg.timeouts.write,
        total: cfg.timeouts.total,
    };
    let moved = match dest.mode {
        TlsMode::Passthrough => {
            let (mut backend, b) = connect(state, &route).await.inspect_err(|_| count_rejected(stats))?;
            let mut first = if b.pp {
                pp::encode(cfg.pp_version, src, dst)
            } else {
                Vec::new()
            };
            first.extend_from_slice(&buf);
            write_timed(&mut backend, &first, cfg.timeouts.write).await?;
            let (moved, spliced) = splice::pump_tcp(client, backend, limits).await?;
            stats.bytes_spliced.fetch_add(spliced, Ordering::Relaxed);
            moved
        }
        TlsMode::Terminate | TlsMode::TerminateH2 => {
            let tls_cfg = state.tls.config(dest.mode == TlsMode::TerminateH2)?;
            let acceptor = tokio_rustls::TlsAcceptor::from(tls_cfg);
            let stream = Prefixed::new(std::mem::take(&mut buf), client);
            let tls = tokio::time::timeout(cfg.timeouts.handshake, acceptor.accept(stream))
                .await
                .map_err(|_| ProxyError::Timeout("TLS handshake"))
                .and_then(|r| r.map_err(ProxyError::from))
                .inspect_err(|_| count_rejected(stats))?;
            let (mut backend, b) = connect(state, &route).await.inspect_err(|_| count_rejected(stats))?;
            if b.pp {
                write_timed(&mut backend, &pp::encode(cfg.pp_version, src, dst), cfg.timeouts.write).await?;
            }
            pump(tls, backend, limits).await?
        }
    };
    stats.bytes_up.fetch_add(moved.a_to_b, Ordering::Relaxed);
    stats.bytes_down.fetch_add(moved.b_to_a, Ordering::Relaxed);
    Ok(())
}

/// A connection that never reached a backend: bad hello, unknown name, failed TLS handshake, backend down.
fn count_rejected(stats: &Stats) {
    stats.rejected.fetch_add(1, Ordering::Relaxed);
}

async fn write_timed(s: &mut TcpStream, data: &[u8], t: std::time::Duration) -> Result<(), ProxyError> {
    io::write_all_timed(s, data, t).await.map_err(|e| match e {
        PumpError::Write => ProxyError::Timeout("backend write"),
        PumpError::Io(e) => ProxyError::Io(e),
        other => ProxyError::Pump(other),
    })
}

/// Read an inbound PROXY header; bytes after it stay in `buf`.
async fn read_pp_header(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Option<(SocketAddr, SocketAddr)>, ProxyError> {
    loop {
        match pp::parse(buf) {
            Ok(h) => {
                buf.drain(..h.len.min(buf.len()));
                return Ok(h.addrs);
            }
            Err(pp::PpError::Incomplete) => {}
            Err(e) => return Err(e.into()),
        }
        if client.read_buf(buf).await? == 0 {
            return Err(ProxyError::Eof);
        }
    }
}

/// Read until `buf` holds a complete ClientHello; returns its SNI.
async fn read_client_hello(client: &mut TcpStream, buf: &mut Vec<u8>, limit: usize) -> Result<String, ProxyError> {
    loop {
        match parse_client_hello_bounded(buf, limit) {
            Ok(info) => return info.sni.ok_or(ProxyError::NoSni),
            Err(ClientHelloError::Incomplete) => {}
            Err(e) => return Err(e.into()),
        }
        // Never read past the bound: the parser reports TooLarge once it is reached. Reading
        // straight into `buf` (no scratch buffer) keeps a stalled client's footprint small.
        let room = limit.saturating_sub(buf.len()).clamp(1, 4096);
        buf.reserve(room);
        let n = client.read_buf(&mut bytes::BufMut::limit(&mut *buf, room)).await?;
        if n == 0 {
            return Err(ProxyError::Eof);
        }
    }
}

/// SNI → destination, route and connection slot.
async fn route(state: &ProxyState, sni: &str) -> Result<(Destination, Route, crate::routing::ConnGuard), ProxyError> {
    let cfg = &state.config;
    let dest = match subdomain_of(sni, &cfg.base_domain) {
        Some(sub) => parse_subdomain(sub)?,
        None => {
            let a = resolve_app_address(
                state.resolver.as_ref(),
                sni,
                &cfg.app_address_ns_prefix,
                cfg.app_address_ns_compat,
                cfg.timeouts.dns_resolve,
            )
            .await?;
            Destination {
                id: a.app_id,
                port: a.port,
                mode: TlsMode::Passthrough,
            }
        }
    };
    let route = state.table.resolve(
        &dest.id,
        dest.port,
        SystemTime::now(),
        cfg.connect_top_n,
        cfg.timeouts.handshake_stale,
    )?;
    let guard = state.table.acquire(&route.app_id, cfg.max_connections_per_app)?;
    Ok((dest, route, guard))
}

async fn connect_one(b: Backend, t: std::time::Duration) -> Option<(TcpStream, Backend)> {
    match tokio::time::timeout(t, TcpStream::connect(b.addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some((s, b))
        }
        Ok(Err(e)) => {
            debug!(backend = %b.addr, error = %e, "backend connect failed");
            None
        }
        Err(_) => {
            debug!(backend = %b.addr, "backend connect timed out");
            None
        }
    }
}

/// Race the preferred backends; then try fallbacks one by one.
async fn connect(state: &ProxyState, route: &Route) -> Result<(TcpStream, Backend), ProxyError> {
    let t = state.config.timeouts.connect;
    // One candidate (the usual case): no race, no extra task.
    let race: &[Backend] = match route.preferred.as_slice() {
        [only] => match connect_one(only.clone(), t).await {
            Some(won) => return Ok(won),
            None => &[],
        },
        all => all,
    };
    let mut set = JoinSet::new();
    for b in race.iter().cloned() {
        set.spawn(connect_one(b, t));
    }
    while let Some(r) = set.join_next().await {
        if let Ok(Some(won)) = r {
            set.abort_all();
            return Ok(won);
        }
    }
    for b in route.fallback.iter().cloned() {
        if let Some(won) = connect_one(b, t).await {
            return Ok(won);
        }
    }
    Err(ProxyError::BackendUnreachable {
        app_id: route.app_id.clone(),
    })
}
