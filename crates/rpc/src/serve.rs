//! Listeners: TCP, TLS and unix sockets, HTTP/1.1 with keep-alive and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::{ConnInfo, RemoteAddr, RpcRouter, UnixPeer};

/// A TLS handshake that takes longer than this is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that does not send complete request headers within this is disconnected.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A source of connections; implement it to serve other transports (e.g. vsock).
pub trait Listener: Send + 'static {
    /// The accepted stream.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Accepts the next connection. Must be cancel-safe.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, RemoteAddr)>> + Send;
}

impl Listener for TcpListener {
    type Io = TcpStream;
    async fn accept(&mut self) -> io::Result<(TcpStream, RemoteAddr)> {
        let (stream, addr) = TcpListener::accept(self).await?;
        // Small request/response exchanges: do not wait for Nagle.
        stream.set_nodelay(true)?;
        Ok((stream, RemoteAddr::Tcp(addr)))
    }
}

impl Listener for UnixListener {
    type Io = UnixStream;
    async fn accept(&mut self) -> io::Result<(UnixStream, RemoteAddr)> {
        let (stream, addr) = UnixListener::accept(self).await?;
        let peer = stream.peer_cred().ok().map(|c| UnixPeer {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        });
        let path = addr.as_pathname().map(Path::to_path_buf);
        Ok((stream, RemoteAddr::Unix { path, peer }))
    }
}

/// Serves `router` on a TCP listener until `shutdown` completes, then drains open connections.
pub async fn serve_tcp(
    listener: TcpListener,
    router: Arc<RpcRouter>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    serve(listener, router, shutdown).await
}

/// Serves `router` on a unix socket until `shutdown` completes (see [`bind_unix`]).
pub async fn serve_unix(
    listener: UnixListener,
    router: Arc<RpcRouter>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    serve(listener, router, shutdown).await
}

/// Serves `router` on any [`Listener`] without TLS.
pub async fn serve<L: Listener>(
    listener: L,
    router: Arc<RpcRouter>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    serve_with(listener, router, shutdown, |io, remote| async move {
        Ok((io, ConnInfo::plain(remote)))
    })
    .await
}

/// Serves `router` over TLS. When `tls` requests client certificates, handlers see the peer's
/// chain in [`crate::CallContext::peer_certificates`].
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Arc<RpcRouter>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    serve_with(listener, router, shutdown, move |io, remote| {
        let acceptor = acceptor.clone();
        async move {
            let stream = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(io))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
            let peer_certificates = stream.get_ref().1.peer_certificates().map(|chain| {
                chain
                    .iter()
                    .map(|c| CertificateDer::from(c.as_ref().to_vec()))
                    .collect()
            });
            Ok((
                stream,
                ConnInfo {
                    remote,
                    peer_certificates,
                },
            ))
        }
    })
    .await
}

/// Serves a single already-accepted connection until the client closes it.
pub async fn serve_connection<IO>(io: IO, conn: ConnInfo, router: Arc<RpcRouter>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // A receiver whose sender is kept alive forever never signals shutdown.
    let (tx, rx) = watch::channel(false);
    drive(io, conn, router, rx).await;
    drop(tx);
}

/// Binds a unix socket at `path`: creates parent directories, replaces a stale socket file
/// (refusing if a server still answers there, or if the path is not a socket) and sets the
/// file mode (e.g. `0o777` for the agent socket that containers use). Needs a Tokio runtime.
pub fn bind_unix(path: impl AsRef<Path>, mode: u32) -> io::Result<UnixListener> {
    let path = path.as_ref();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

async fn serve_with<L, H, Fut, IO>(
    mut listener: L,
    router: Arc<RpcRouter>,
    shutdown: impl Future<Output = ()> + Send,
    handshake: H,
) -> io::Result<()>
where
    L: Listener,
    H: Fn(L::Io, RemoteAddr) -> Fut,
    Fut: Future<Output = io::Result<(IO, ConnInfo)>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((io, remote)) => {
                    let handshake = handshake(io, remote);
                    let router = Arc::clone(&router);
                    let stop = stop_rx.clone();
                    conns.spawn(async move {
                        match handshake.await {
                            Ok((io, info)) => drive(io, info, router, stop).await,
                            Err(e) => tracing::debug!("connection setup failed: {e}"),
                        }
                    });
                }
                Err(e) => {
                    // Accept errors (e.g. EMFILE, ECONNABORTED) are transient; back off briefly.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(router.drain_timeout_value(), drain).await.is_err() {
        tracing::warn!("dropping {} connections after drain timeout", conns.len());
        conns.abort_all();
    }
    Ok(())
}

async fn drive<IO>(io: IO, info: ConnInfo, router: Arc<RpcRouter>, mut stop: watch::Receiver<bool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(info);
    let remote = info.remote.clone();
    let service = service_fn(move |req| {
        let router = Arc::clone(&router);
        let info = Arc::clone(&info);
        async move { Ok::<_, Infallible>(router.handle(req, &info).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    // Resolves on shutdown (or if the server loop is gone); the watch guard stays inside.
    let stopped = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(%remote, "connection error: {e}");
            }
        }
        () = stopped => {
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!(%remote, "connection error during shutdown: {e}");
            }
        }
    }
}
