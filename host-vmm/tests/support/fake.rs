//! Shared by the manager API, CLI and dashboard tests: a fake backend whose "VM" is `sleep`, a manager with it
//! served on a unix socket and a TCP port (bearer token) through the manager's HTTP front,
//! and a fake guest agent answering `GuestApi` behind the VM's hybrid-vsock socket.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use dstack_host_vmm::manager::backend::{Backend, BackendError, LaunchInput};
use dstack_host_vmm::manager::supervisor::ProcSpec;
use dstack_host_vmm::manager::{Manager, VmmConfig, dashboard};
use dstack_rpc::guest_api::{
    GuestApiRpc, GuestApiServer, GuestInfo, ListContainersResponse, NetworkInformation, SystemInfo,
};
use dstack_rpc::{CallContext, ConnInfo, Empty, RemoteAddr, RpcError, RpcRouter};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

pub const TOKEN: &str = "s3cret-token";

/// Runs `sh -c 'echo booted cid=<cid>; exec sleep 600'` as the VM.
pub struct FakeBackend;

impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn is_emulation(&self) -> bool {
        false
    }
    fn prepare(&self, input: &LaunchInput<'_>) -> Result<(), BackendError> {
        input
            .workdir
            .ensure_data_disk(input.disk_size_gb)
            .map_err(|e| BackendError::Prepare {
                what: "disk".into(),
                reason: e.to_string(),
            })
    }
    fn plan(&self, input: &LaunchInput<'_>) -> Result<Vec<ProcSpec>, BackendError> {
        let wd = input.workdir;
        Ok(vec![ProcSpec {
            name: "vm".into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), format!("echo booted cid={}; exec sleep 600", input.cid)],
            cwd: wd.path().to_owned(),
            stdout: wd.stdout_log(),
            stderr: wd.stderr_log(),
            ready_path: None,
        }])
    }
}

/// A running manager with its HTTP front on `sock` (unix) and `tcp` (token [`TOKEN`]).
pub struct Served {
    pub dir: tempfile::TempDir,
    pub mgr: Arc<Manager>,
    pub sock: PathBuf,
    pub tcp: std::net::SocketAddr,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Served {
    pub async fn start() -> Self {
        Self::start_with(Box::new(FakeBackend)).await
    }

    pub async fn start_with(backend: Box<dyn Backend>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("images/test-img");
        std::fs::create_dir_all(&img).unwrap();
        std::fs::write(
            img.join("metadata.json"),
            r#"{"bios":"ovmf.fd","kernel":"bzImage","cmdline":"console=ttyS0","initrd":"initramfs.cpio.gz","rootfs":null,"rootfs_hash":null,"version":"0.1.0","is_dev":true,"build":{}}"#,
        )
        .unwrap();
        let text = format!(
            "[image]\npath = \"{}\"\n[cvm]\nrun_path = \"{}\"\ncid_start = 1000\ncid_pool_size = 8\n\
             max_allocable_vcpu = 8\nmax_allocable_memory_in_mb = 8192\n",
            dir.path().join("images").display(),
            dir.path().join("run").display()
        );
        let mut cfg = VmmConfig::parse(&text).unwrap();
        cfg.auth.enabled = true;
        cfg.auth.tokens = vec![TOKEN.into()];
        let mgr = Manager::open(cfg, backend).unwrap();
        let front = dashboard::frontend(mgr.clone());
        let sock = dir.path().join("vmm.sock");
        let unix = dstack_rpc::bind_unix(&sock, 0o600).unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let (unix_stop, unix_stopped) = tokio::sync::oneshot::channel::<()>();
        let (tcp_stop, tcp_stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(dashboard::serve(unix, front.clone(), async {
            let _ = unix_stopped.await;
        }));
        tokio::spawn(dashboard::serve(tcp, front, async {
            let _ = tcp_stopped.await;
        }));
        let stops = vec![unix_stop, tcp_stop];
        Served {
            dir,
            mgr,
            sock,
            tcp: tcp_addr,
            stops,
        }
    }

    pub fn unix_url(&self) -> String {
        format!("unix:{}", self.sock.display())
    }

    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join("run").join(id)
    }

    /// VM ids with a work directory.
    pub fn vm_ids(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path().join("run"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().join("vm-manifest.json").exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        for id in self.vm_ids() {
            let _ = self.mgr.remove(&id);
        }
    }
}

/// A guest agent's `GuestApi`: `Info` answers a fixed app id; `Shutdown` "powers the VM off" by killing the
/// fake VM process (found in `vm-state.json`), like a guest whose poweroff ends the VMM process.
pub struct FakeGuest {
    pub workdir: PathBuf,
    pub shutdowns: Arc<AtomicU32>,
}

impl GuestApiRpc for FakeGuest {
    async fn info(&self, _ctx: &CallContext, _req: Empty) -> Result<GuestInfo, RpcError> {
        Ok(GuestInfo {
            version: "fake-guest 1".into(),
            app_id: vec![0xab; 20],
            ..Default::default()
        })
    }
    async fn sys_info(&self, _ctx: &CallContext, _req: Empty) -> Result<SystemInfo, RpcError> {
        Ok(SystemInfo {
            os_name: "fake".into(),
            num_cpus: 1,
            ..Default::default()
        })
    }
    async fn network_info(&self, _ctx: &CallContext, _req: Empty) -> Result<NetworkInformation, RpcError> {
        Ok(NetworkInformation::default())
    }
    async fn list_containers(&self, _ctx: &CallContext, _req: Empty) -> Result<ListContainersResponse, RpcError> {
        Ok(ListContainersResponse::default())
    }
    async fn shutdown(&self, _ctx: &CallContext, _req: Empty) -> Result<Empty, RpcError> {
        self.shutdowns.fetch_add(1, Ordering::SeqCst);
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.workdir.join("vm-state.json")).unwrap()).unwrap();
        let pid = state["processes"][0]["pid"].as_i64().unwrap() as i32;
        // SAFETY: kill(2) of the fake VM process the test's manager started.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        Ok(Empty {})
    }
}

/// Serves `GuestApi` at `/api` behind a hybrid-vsock socket at `<workdir>/vsock.sock` (guest port 8000
/// accepted, others refused). Returns the shutdown counter.
pub fn spawn_fake_guest(workdir: &Path) -> Arc<AtomicU32> {
    let shutdowns = Arc::new(AtomicU32::new(0));
    let router = Arc::new(RpcRouter::new("/api").service(GuestApiServer::new(FakeGuest {
        workdir: workdir.to_owned(),
        shutdowns: shutdowns.clone(),
    })));
    let listener = tokio::net::UnixListener::bind(workdir.join("vsock.sock")).unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let router = router.clone();
            tokio::spawn(async move {
                let mut s = BufReader::new(s);
                let mut line = String::new();
                if s.read_line(&mut line).await.is_err() {
                    return;
                }
                if line != "CONNECT 8000\n" {
                    let _ = s.get_mut().write_all(b"ERR no listener\n").await;
                    return;
                }
                if s.get_mut().write_all(b"OK 1073741825\n").await.is_err() {
                    return;
                }
                let conn = ConnInfo::plain(RemoteAddr::Unix { path: None, peer: None });
                dstack_rpc::serve_connection(s.into_inner(), conn, router).await;
            });
        }
    });
    shutdowns
}
