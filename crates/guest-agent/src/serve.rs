//! Serving the agent on its unix sockets.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dstack_rpc::{bind_unix, serve_unix};

use crate::Agent;
use crate::service::{dstack_router, tappd_router};

/// Alias paths dstack SDKs probe besides `/var/run/dstack.sock` (link them with [`link_aliases`]).
pub const ALIAS_SOCKETS: &[&str] = &["/run/dstack.sock", "/var/run/dstack/dstack.sock"];
/// Socket file mode: every container user may call the agent (dstack's `SocketMode=0777`).
pub const SOCKET_MODE: u32 = 0o777;

/// Where to listen.
#[derive(Debug, Clone)]
pub struct AgentSockets {
    /// The dstack socket (`DstackGuest` at `/`), e.g. `/var/run/dstack.sock`.
    pub dstack: PathBuf,
    /// The legacy tappd socket (`Tappd` at `/prpc`), e.g. `/var/run/tappd.sock`.
    pub tappd: Option<PathBuf>,
}

/// Binds the sockets (mode 0777) and serves until `shutdown` completes, then drains connections. Binding
/// errors are returned before anything is served.
pub async fn serve_agent(
    agent: Arc<Agent>,
    sockets: &AgentSockets,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    BoundAgent::bind(sockets)?.serve(agent, shutdown).await
}

/// The agent's sockets, bound (connections queue until [`BoundAgent::serve`]).
#[derive(Debug)]
pub struct BoundAgent {
    dstack: tokio::net::UnixListener,
    tappd: Option<tokio::net::UnixListener>,
}

impl BoundAgent {
    /// Binds the sockets (mode 0777); needs a Tokio runtime.
    pub fn bind(sockets: &AgentSockets) -> io::Result<Self> {
        Ok(Self {
            dstack: bind_unix(&sockets.dstack, SOCKET_MODE)?,
            tappd: sockets.tappd.as_ref().map(|p| bind_unix(p, SOCKET_MODE)).transpose()?,
        })
    }

    /// Serves until `shutdown` completes, then drains connections.
    pub async fn serve(self, agent: Arc<Agent>, shutdown: impl Future<Output = ()> + Send + 'static) -> io::Result<()> {
        let Self { dstack, tappd } = self;
        serve_bound(agent, dstack, tappd, shutdown).await
    }
}

async fn serve_bound(
    agent: Arc<Agent>,
    dstack: tokio::net::UnixListener,
    tappd: Option<tokio::net::UnixListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(serve_unix(
        dstack,
        Arc::new(dstack_router(agent.clone())),
        stopped(stop_rx.clone()),
    ));
    if let Some(l) = tappd {
        tasks.spawn(serve_unix(l, Arc::new(tappd_router(agent)), stopped(stop_rx)));
    }
    tokio::select! {
        () = shutdown => {}
        // A listener that fails ends the agent; the supervisor restarts it.
        Some(done) = tasks.join_next() => {
            let _ = stop_tx.send(true);
            tasks.abort_all();
            return done.map_err(io::Error::other)?.and(Err(io::Error::other("agent listener stopped")));
        }
    }
    let _ = stop_tx.send(true);
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.map_err(io::Error::other).and_then(|r| r) {
            result = Err(e);
        }
    }
    result
}

/// `path` with its parent directory canonicalized (so `/var/run/x` and `/run/x` compare equal when `/var/run`
/// links to `/run`); `None` if the parent does not exist.
fn resolved(path: &Path) -> Option<PathBuf> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Some(parent.canonicalize().ok()?.join(path.file_name()?))
}

/// Creates symlinks `alias → target` for each alias (parent directories created; a stale symlink is replaced;
/// an alias that already is the target, e.g. through `/var/run → /run`, is skipped). Refuses to replace a
/// regular file, directory or socket.
pub fn link_aliases(target: &Path, aliases: &[&Path]) -> io::Result<()> {
    let target_resolved = resolved(target);
    for alias in aliases {
        if let Some(parent) = alias.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        if target_resolved.is_some() && resolved(alias) == target_resolved {
            continue;
        }
        match std::fs::symlink_metadata(alias) {
            Ok(meta) if meta.file_type().is_symlink() => std::fs::remove_file(alias)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a symlink", alias.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::os::unix::fs::symlink(target, alias)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_link_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("dstack.sock");
        std::fs::write(&target, b"").unwrap();
        let a = dir.path().join("run/dstack.sock");
        let b = dir.path().join("var/run/dstack/dstack.sock");
        link_aliases(&target, &[&a, &b]).unwrap();
        assert_eq!(std::fs::read_link(&a).unwrap(), target);
        assert_eq!(std::fs::read_link(&b).unwrap(), target);
        // Idempotent: stale links are replaced.
        link_aliases(&target, &[&a]).unwrap();
        // The target itself is skipped, a regular file refused.
        link_aliases(&target, &[&target]).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(link_aliases(&target, &[&file]).is_err());
    }
}
