//! Network-namespace fixtures: a veth-joined namespace pair (deleted on drop), threads running
//! inside a namespace, a TCP echo server and a round-trip/bulk exerciser, and a WireGuard device
//! living on its own thread.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dstack_gateway::registration::{WgBackend, WgPeer};
use dstack_gateway::wg::WgDevice;

pub const STEP: Duration = Duration::from_secs(10);

pub fn skip_or_fail(reason: &str) -> bool {
    if std::env::var("DSTACK_REQUIRE_FIXTURES").is_ok_and(|v| v == "1") {
        panic!("required fixture missing: {reason}");
    }
    eprintln!("SKIP: {reason}");
    true
}

pub fn prerequisites_missing() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip_or_fail("needs root (network namespaces, tun)");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return skip_or_fail("/dev/net/tun is missing");
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return skip_or_fail("iproute2 `ip` not found");
    }
    false
}

pub fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Two namespaces joined by a veth pair (`192.168.77.1/24` ↔ `192.168.77.2/24`); deleted on drop.
pub struct NetnsPair {
    pub gw: String,
    pub cvm: String,
}

impl NetnsPair {
    pub fn create(tag: char) -> Self {
        let id = std::process::id();
        let pair = Self {
            gw: format!("dgw{id}{tag}g"),
            cvm: format!("dgw{id}{tag}c"),
        };
        // Constructed first so that a failure below still deletes whatever was created.
        for ns in [&pair.gw, &pair.cvm] {
            run(&["ip", "netns", "add", ns]).unwrap();
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]).unwrap();
        }
        run(&[
            "ip", "link", "add", "veg", "netns", &pair.gw, "type", "veth", "peer", "name", "vec", "netns", &pair.cvm,
        ])
        .unwrap();
        for (ns, dev, ip) in [
            (&pair.gw, "veg", "192.168.77.1/24"),
            (&pair.cvm, "vec", "192.168.77.2/24"),
        ] {
            run(&["ip", "-n", ns, "addr", "add", ip, "dev", dev]).unwrap();
            run(&["ip", "-n", ns, "link", "set", dev, "up"]).unwrap();
        }
        pair
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.gw, &self.cvm] {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

/// Run `f` on a new thread inside namespace `ns`, with a current-thread tokio runtime.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: `file` is an open namespace file; setns only changes this thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

pub fn echo_server(addr: SocketAddr) -> TcpListener {
    let l = TcpListener::bind(addr).unwrap();
    let server = l.try_clone().unwrap();
    std::thread::spawn(move || {
        for s in server.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    l
}

/// Connect (retrying while the handshake completes), then: 1-byte round trips (median µs) and
/// `bulk` bytes echoed (MB/s).
pub fn exercise(to: SocketAddr, bulk: usize, connect_within: Duration) -> Result<(f64, f64), String> {
    let deadline = Instant::now() + connect_within;
    let mut s = loop {
        match TcpStream::connect_timeout(&to, Duration::from_millis(500)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => return Err(format!("connect {to}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    s.set_read_timeout(Some(STEP)).unwrap();
    s.set_nodelay(true).unwrap();
    let mut rtts = Vec::new();
    let mut b = [0u8; 1];
    for i in 0..200u32 {
        let t = Instant::now();
        s.write_all(&[i as u8]).map_err(|e| e.to_string())?;
        s.read_exact(&mut b).map_err(|e| e.to_string())?;
        if b[0] != i as u8 {
            return Err("echo mismatch".into());
        }
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(f64::total_cmp);
    let data: Vec<u8> = (0..bulk).map(|i| (i * 7 % 251) as u8).collect();
    let t = Instant::now();
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent));
    let mut got = vec![0u8; bulk];
    s.read_exact(&mut got).map_err(|e| format!("bulk read: {e}"))?;
    writer.join().unwrap().map_err(|e| e.to_string())?;
    let secs = t.elapsed().as_secs_f64();
    if got != data {
        return Err("bulk data corrupted".into());
    }
    Ok((rtts[rtts.len() / 2], bulk as f64 / secs / 1e6))
}

pub enum Cmd {
    SetPeers(Vec<WgPeer>),
    Status,
    Stop,
}

pub type Status = (
    std::collections::HashMap<String, std::time::SystemTime>,
    Vec<dstack_gateway::wg::PeerStatus>,
);

/// A device living on its own thread in `ns`, controlled through `Cmd`s.
pub struct DeviceThread {
    cmd: tokio::sync::mpsc::UnboundedSender<(Cmd, mpsc::Sender<Status>)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DeviceThread {
    pub fn start(
        ns: &str,
        start: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<WgDevice, String>>>>
        + Send
        + 'static,
    ) -> Result<Self, String> {
        let (cmd, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Cmd, mpsc::Sender<Status>)>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = in_netns(ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let dev = match start().await {
                    Ok(d) => d,
                    Err(e) => return ready_tx.send(Err(e)).unwrap(),
                };
                ready_tx.send(Ok(())).unwrap();
                // Bounded: the test never runs a device longer than two minutes.
                let deadline = tokio::time::sleep(Duration::from_secs(120));
                tokio::pin!(deadline);
                loop {
                    let (c, reply) = tokio::select! {
                        Some(c) = rx.recv() => c,
                        () = &mut deadline => return,
                    };
                    match c {
                        Cmd::SetPeers(p) => dev.set_peers(&p).unwrap(),
                        Cmd::Status => {}
                        Cmd::Stop => return,
                    }
                    let _ = reply.send((dev.latest_handshakes(), dev.peer_status()));
                }
            })
        });
        ready_rx.recv_timeout(STEP).map_err(|e| e.to_string())??;
        Ok(Self {
            cmd,
            thread: Some(thread),
        })
    }

    pub fn call(&self, c: Cmd) -> Status {
        let (tx, rx) = mpsc::channel();
        self.cmd.send((c, tx)).unwrap();
        rx.recv_timeout(STEP).unwrap()
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        let (tx, _rx) = mpsc::channel();
        let _ = self.cmd.send((Cmd::Stop, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn exercise_in(ns: &str, to: &str) -> Result<(f64, f64), String> {
    exercise_within(ns, to, STEP)
}

pub fn exercise_within(ns: &str, to: &str, connect_within: Duration) -> Result<(f64, f64), String> {
    let to: SocketAddr = to.parse().unwrap();
    in_netns(ns, move || exercise(to, 8 << 20, connect_within))
        .join()
        .unwrap()
}

/// Stops (SIGTERM by pid, SIGKILL after 3 s) and reaps a child on drop, then removes `cleanup`.
pub struct Child(pub std::process::Child, pub std::path::PathBuf);
impl Drop for Child {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of our own unreaped child.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}
