//! TLS passthrough through our SNI proxy vs nginx (`stream` + `ssl_preread`) and haproxy
//! (`req.ssl_sni`), on loopback, in one run that prints the ratios.
//!
//! Every client first sends a real ClientHello (made by rustls for `bench-<port>s.bench.test`), so
//! each proxy must parse it and route by SNI; what follows is opaque to a passthrough proxy, so the
//! backend speaks a tiny protocol after the hello instead of TLS: `C` (answer one byte and close: a
//! connection), `D` (stream bytes until the client closes: throughput) and `E` (echo: round trips).
//! Each target gets its own backend port, and "direct" (no proxy) is the baseline for added
//! latency.
//!
//! Our proxy runs in a child process (this binary with `--serve-ours`) with the shipped defaults of
//! `[core.proxy]`; nginx and haproxy run with generated configs in a temporary directory, as many
//! workers/threads as cores, and are stopped at the end. Missing Debian packages (`nginx`,
//! `libnginx-mod-stream`, `haproxy`) are installed with apt-get when running as root; otherwise
//! that comparison is skipped with a message. Runs well under a minute.

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use dstack_gateway::config::ProxyConfig;
use dstack_gateway::dns::{DnsError, TxtResolver};
use dstack_gateway::proxy::tls::TlsTerminator;
use dstack_gateway::proxy::{ProxyState, Stats};
use dstack_gateway::routing::{Instance, PortPolicy, RoutingTable};
use dstack_rpc::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ROUNDS: usize = 2;
const CONN_SECS: f64 = 1.0;
const CONN_WORKERS: usize = 32;
const THROUGHPUT_SECS: f64 = 1.0;
const PINGS: usize = 1000;
const BASE: &str = "bench.test";

type Res<T> = Result<T, String>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve-ours") {
        serve_ours();
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run()) {
        eprintln!("bench_proxy: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------- our proxy, in a child process

struct NoTxt;
impl TxtResolver for NoTxt {
    fn lookup_txt<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<String>, DnsError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// Child mode: our proxy on an ephemeral loopback port, instance `bench` at 127.0.0.1. Prints the
/// port, then serves until stdin closes (so it never outlives the parent).
fn serve_ours() {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async {
        let table = RoutingTable::new();
        table.upsert(Instance {
            instance_id: "bench".into(),
            app_id: "benchapp".into(),
            ip: IpAddr::from([127, 0, 0, 1]),
            public_key: String::new(),
            port_policy: PortPolicy::default(),
            reg_time: SystemTime::now(),
            latest_handshake: Some(SystemTime::now()),
        });
        let config = ProxyConfig {
            base_domain: BASE.into(),
            max_connections_per_app: 0,
            ..ProxyConfig::default()
        };
        let state = Arc::new(ProxyState {
            config,
            table,
            resolver: Arc::new(NoTxt),
            tls: Arc::new(TlsTerminator::new(vec![&rustls::version::TLS13])),
            stats: Stats::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!("{}", listener.local_addr().expect("addr").port());
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        });
        dstack_gateway::proxy::run(listener, state, async {
            let _ = stdin_closed.await;
        })
        .await;
    });
}

// ---------------------------------------------------------------- backend and clients

fn client_hello(sni: &str) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).expect("dns name");
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    out
}

/// The app: checks the hello arrived intact, then serves one command.
async fn serve_backend(mut s: TcpStream, hello: &[u8]) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut got = vec![0u8; hello.len() + 1];
    s.read_exact(&mut got).await?;
    if got.get(..hello.len()) != Some(hello) {
        return Err(std::io::Error::other("hello altered in transit"));
    }
    match got.last() {
        Some(b'C') => s.write_all(b"k").await,
        Some(b'D') => {
            let chunk = vec![0x5au8; 64 * 1024];
            loop {
                s.write_all(&chunk).await?;
            }
        }
        Some(b'E') => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                s.write_all(buf.get(..n).unwrap_or_default()).await?;
            }
        }
        _ => Ok(()),
    }
}

async fn open(addr: SocketAddr, hello: &[u8], cmd: u8) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut first = hello.to_vec();
    first.push(cmd);
    s.write_all(&first).await?;
    Ok(s)
}

/// Connections per second with `CONN_WORKERS` clients in a loop, and their latency (connect to
/// answer) percentiles in µs.
async fn conn_rate(addr: SocketAddr, hello: Arc<Vec<u8>>) -> Res<(f64, f64, f64, usize)> {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONN_WORKERS {
        let (stop, errors, hello) = (stop.clone(), errors.clone(), hello.clone());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let one = async {
                    let mut s = open(addr, &hello, b'C').await?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await?;
                    std::io::Result::Ok(())
                };
                match tokio::time::timeout(Duration::from_secs(5), one).await {
                    Ok(Ok(())) => lat.push(t.elapsed().as_secs_f64() * 1e6),
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        });
    }
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(CONN_SECS)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    while let Some(r) = tasks.join_next().await {
        lat.extend(r.map_err(|e| e.to_string())?);
    }
    let secs = t.elapsed().as_secs_f64();
    let errors = errors.load(Ordering::Relaxed);
    if errors > lat.len() as u64 / 100 {
        return Err(format!("{errors} failed connections (of {})", lat.len()));
    }
    lat.sort_by(f64::total_cmp);
    Ok((lat.len() as f64 / secs, pct(&lat, 0.5), pct(&lat, 0.99), lat.len()))
}

/// MB/s (and bytes) from the backend to the client over `streams` connections.
async fn throughput(addr: SocketAddr, hello: Arc<Vec<u8>>, streams: usize) -> Res<(f64, u64)> {
    let total = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(THROUGHPUT_SECS);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let (total, hello) = (total.clone(), hello.clone());
        tasks.spawn(async move {
            let mut s = open(addr, &hello, b'D').await?;
            let mut buf = vec![0u8; 256 * 1024];
            while Instant::now() < deadline {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Err(std::io::Error::other("backend stream ended early"));
                }
                total.fetch_add(n as u64, Ordering::Relaxed);
            }
            std::io::Result::Ok(())
        });
    }
    let t = Instant::now();
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    }
    let bytes = total.load(Ordering::Relaxed);
    Ok((bytes as f64 / t.elapsed().as_secs_f64() / 1e6, bytes))
}

/// Round-trip percentiles (µs) of 64-byte pings on one connection.
async fn round_trips(addr: SocketAddr, hello: Arc<Vec<u8>>) -> Res<(f64, f64)> {
    let mut s = open(addr, &hello, b'E').await.map_err(|e| e.to_string())?;
    let (ping, mut pong) = ([7u8; 64], [0u8; 64]);
    let mut rtt = Vec::with_capacity(PINGS);
    for i in 0..PINGS + 100 {
        let t = Instant::now();
        s.write_all(&ping).await.map_err(|e| e.to_string())?;
        s.read_exact(&mut pong).await.map_err(|e| e.to_string())?;
        // The first hundred warm the path up.
        if i >= 100 {
            rtt.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    rtt.sort_by(f64::total_cmp);
    Ok((pct(&rtt, 0.5), pct(&rtt, 0.99)))
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    conns_per_s: f64,
    conn_p50_us: f64,
    conn_p99_us: f64,
    mbs_1: f64,
    mbs_4: f64,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    /// Proxy CPU time (user + system, all its processes) per connection, µs.
    cpu_us_per_conn: f64,
    /// Proxy CPU time per GB relayed, ms.
    cpu_ms_per_gb: f64,
}

impl Figures {
    fn print(&self, name: &str) {
        let f = self;
        println!(
            "  {name:<8} {:>6.0} conn/s (p50 {:>5.0} µs, p99 {:>6.0} µs) | {:>5.0} MB/s 1 stream, {:>5.0} MB/s 4 streams | rtt p50 {:>5.1} µs p99 {:>6.1} µs | cpu {:>4.0} µs/conn {:>5.0} ms/GB",
            f.conns_per_s,
            f.conn_p50_us,
            f.conn_p99_us,
            f.mbs_1,
            f.mbs_4,
            f.rtt_p50_us,
            f.rtt_p99_us,
            f.cpu_us_per_conn,
            f.cpu_ms_per_gb
        );
    }

    fn best(self, o: Self) -> Self {
        Self {
            conns_per_s: self.conns_per_s.max(o.conns_per_s),
            conn_p50_us: self.conn_p50_us.min(o.conn_p50_us),
            conn_p99_us: self.conn_p99_us.min(o.conn_p99_us),
            mbs_1: self.mbs_1.max(o.mbs_1),
            mbs_4: self.mbs_4.max(o.mbs_4),
            rtt_p50_us: self.rtt_p50_us.min(o.rtt_p50_us),
            rtt_p99_us: self.rtt_p99_us.min(o.rtt_p99_us),
            cpu_us_per_conn: self.cpu_us_per_conn.min(o.cpu_us_per_conn),
            cpu_ms_per_gb: self.cpu_ms_per_gb.min(o.cpu_ms_per_gb),
        }
    }
}

/// CPU time (user + system) so far of process `pid` and its direct children, in µs.
fn cpu_us(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // Fields after the `(comm)`: state ppid ... utime (14th overall) stime (15th).
    let parse = |stat: &str| -> Option<(u32, f64)> {
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid = f.get(1)?.parse().ok()?;
        let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some((ppid, ticks))
    };
    let mut ticks = 0.0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(p) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        if let Some((ppid, t)) = parse(&stat)
            && (p == pid || ppid == pid)
        {
            ticks += t;
        }
    }
    ticks / hz * 1e6
}

async fn measure(name: &str, addr: SocketAddr, hello: Arc<Vec<u8>>, pid: Option<u32>) -> Res<Figures> {
    // Warm-up: a few connections of each kind.
    for _ in 0..20 {
        let mut s = open(addr, &hello, b'C').await.map_err(|e| format!("{name}: {e}"))?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .await
            .map_err(|e| format!("{name}: warm-up: {e}"))?;
    }
    let cpu0 = cpu_us(pid);
    let (conns_per_s, conn_p50_us, conn_p99_us, conns) = conn_rate(addr, hello.clone())
        .await
        .map_err(|e| format!("{name}: connections: {e}"))?;
    let cpu1 = cpu_us(pid);
    let (rtt_p50_us, rtt_p99_us) = round_trips(addr, hello.clone())
        .await
        .map_err(|e| format!("{name}: round trips: {e}"))?;
    let cpu2 = cpu_us(pid);
    let (mbs_1, bytes_1) = throughput(addr, hello.clone(), 1)
        .await
        .map_err(|e| format!("{name}: throughput: {e}"))?;
    let (mbs_4, bytes_4) = throughput(addr, hello, 4)
        .await
        .map_err(|e| format!("{name}: throughput: {e}"))?;
    let cpu3 = cpu_us(pid);
    let f = Figures {
        conns_per_s,
        conn_p50_us,
        conn_p99_us,
        mbs_1,
        mbs_4,
        rtt_p50_us,
        rtt_p99_us,
        cpu_us_per_conn: (cpu1 - cpu0) / conns.max(1) as f64,
        cpu_ms_per_gb: (cpu3 - cpu2) / 1e3 / ((bytes_1 + bytes_4).max(1) as f64 / 1e9),
    };
    f.print(name);
    Ok(f)
}

// ---------------------------------------------------------------- external proxies

/// A child process stopped (SIGTERM, then SIGKILL) and reaped on drop.
struct Proc(std::process::Child);
impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: kill(2) on the pid of our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Install missing Debian packages (root only; services are not started by the Debian hooks of
/// a container with a deny-all policy-rc.d, and we never use them).
fn ensure_packages(pkgs: &[&str]) -> Res<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(format!(
            "missing {missing:?} (install as root: apt-get install {})",
            missing.join(" ")
        ));
    }
    eprintln!("bench_proxy: installing {missing:?}");
    let quiet = |c: &mut Command| c.stdout(Stdio::null()).status().map(|s| s.success()).unwrap_or(false);
    let _ = quiet(Command::new("apt-get").args(["-q", "update"]));
    if !quiet(
        Command::new("apt-get")
            .args(["-q", "-y", "--no-install-recommends", "install"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    ) {
        return Err(format!("apt-get install {} failed", missing.join(" ")));
    }
    Ok(())
}

fn free_port() -> Res<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

async fn wait_listening(addr: SocketAddr, what: &str, child: &mut Proc) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(st)) = child.0.try_wait() {
            return Err(format!("{what} exited: {st}"));
        }
        if Instant::now() > deadline {
            return Err(format!("{what} not listening on {addr} after 5 s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

async fn start_nginx(dir: &std::path::Path, backend: u16) -> Res<(Proc, SocketAddr)> {
    ensure_packages(&["nginx", "libnginx-mod-stream"])?;
    let port = free_port()?;
    let module = "/usr/lib/nginx/modules/ngx_stream_module.so";
    let conf = format!(
        "worker_processes {cores};\nuser root;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         load_module {module};\nworker_rlimit_nofile 16384;\nevents {{ worker_connections 8192; }}\n\
         stream {{\n  map $ssl_preread_server_name $app {{\n    bench-{backend}s.{BASE} 127.0.0.1:{backend};\n    default 127.0.0.1:1;\n  }}\n\
           server {{\n    listen 127.0.0.1:{port} reuseport;\n    ssl_preread on;\n    proxy_pass $app;\n  }}\n}}\n",
        cores = cores(),
        d = dir.display(),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    let mut child = Proc(
        Command::new("nginx")
            .args(["-c", &path.display().to_string(), "-p", &dir.display().to_string()])
            .args(["-e", &dir.join("nginx-error.log").display().to_string()])
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("nginx: {e}"))?,
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, "nginx", &mut child).await?;
    Ok((child, addr))
}

async fn start_haproxy(dir: &std::path::Path, backend: u16) -> Res<(Proc, SocketAddr)> {
    ensure_packages(&["haproxy"])?;
    let port = free_port()?;
    let conf = format!(
        "global\n  maxconn 8000\n  nbthread {cores}\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend fe\n  bind 127.0.0.1:{port}\n  tcp-request inspect-delay 5s\n\
           tcp-request content accept if {{ req.ssl_hello_type 1 }}\n\
           use_backend app if {{ req.ssl_sni -i bench-{backend}s.{BASE} }}\n\
         backend app\n  server s1 127.0.0.1:{backend}\n",
        cores = cores(),
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    let mut child = Proc(
        Command::new("haproxy")
            .args(["-f", &path.display().to_string(), "-db"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("haproxy: {e}"))?,
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, "haproxy", &mut child).await?;
    Ok((child, addr))
}

async fn start_ours() -> Res<(Proc, SocketAddr)> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Proc(
        Command::new(exe)
            .arg("--serve-ours")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("our proxy: {e}"))?,
    );
    let out = child.0.stdout.take().ok_or("no stdout")?;
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).map(|_| line)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let port: u16 = line.trim().parse().map_err(|_| format!("our proxy said {line:?}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, "our proxy", &mut child).await?;
    Ok((child, addr))
}

// ---------------------------------------------------------------- the run

/// Name, the process to stop afterwards (none for direct), address, and the hello it routes.
type Target = (&'static str, Option<Proc>, SocketAddr, Arc<Vec<u8>>);

fn ratio_line(what: &str, ours: f64, other: f64, name: &str) {
    println!("  {what:<34} ours / {name:<7} = {:.2}×", ours / other);
}

async fn run() -> Res<()> {
    let started = Instant::now();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    println!(
        "TLS passthrough on loopback, {} cores shared by clients, backend and proxy; {CONN_WORKERS} connecting clients, {PINGS} pings",
        cores()
    );
    // One backend (and so one SNI) per target.
    let mut targets: Vec<Target> = Vec::new();
    let backend_for = async || -> Res<(u16, Arc<Vec<u8>>)> {
        // The backend must know the hello to check it, and the hello names the backend's port:
        // reserve a port, build the hello, then listen on it.
        for _ in 0..10 {
            let port = free_port()?;
            let hello = Arc::new(client_hello(&format!("bench-{port}s.{BASE}")));
            let l = match TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => l,
                Err(_) => continue,
            };
            let h = hello.clone();
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    let h = h.clone();
                    tokio::spawn(async move {
                        let _ = serve_backend(s, &h).await;
                    });
                }
            });
            return Ok((port, hello));
        }
        Err("no free backend port".into())
    };

    let (direct_port, direct_hello) = backend_for().await?;
    targets.push((
        "direct",
        None,
        SocketAddr::from(([127, 0, 0, 1], direct_port)),
        direct_hello,
    ));
    let (_, h) = backend_for().await?;
    let (child, addr) = start_ours().await?;
    targets.push(("ours", Some(child), addr, h));
    let (p2, h2) = backend_for().await?;
    match start_nginx(dir.path(), p2).await {
        Ok((child, addr)) => targets.push(("nginx", Some(child), addr, h2)),
        Err(e) => println!("nginx: skipped: {e}"),
    }
    let (p3, h3) = backend_for().await?;
    match start_haproxy(dir.path(), p3).await {
        Ok((child, addr)) => targets.push(("haproxy", Some(child), addr, h3)),
        Err(e) => println!("haproxy: skipped: {e}"),
    }

    // Interleaved rounds, best of each figure: the machine is shared, so a burst of other load
    // should not land on one target only.
    let mut results: Vec<(&str, Figures)> = Vec::new();
    for round in 1..=ROUNDS {
        println!("round {round}:");
        for (name, proc_, addr, hello) in &targets {
            let pid = proc_.as_ref().map(|p| p.0.id());
            let f = measure(name, *addr, hello.clone(), pid).await?;
            match results.iter_mut().find(|(n, _)| n == name) {
                Some((_, best)) => *best = best.best(f),
                None => results.push((name, f)),
            }
        }
    }
    drop(targets);
    println!("best of {ROUNDS} rounds:");
    for (name, f) in &results {
        f.print(name);
    }

    let get = |n: &str| results.iter().find(|(k, _)| *k == n).map(|(_, f)| *f);
    let direct = get("direct").ok_or("no baseline")?;
    println!("added latency over direct (p50 / p99 of 64-byte round trips, p99 of connection setup):");
    for (name, f) in results.iter().filter(|(n, _)| *n != "direct") {
        println!(
            "  {name:<8} rtt {:+.1} µs / {:+.1} µs | connection p99 {:+.0} µs (negative = within noise)",
            f.rtt_p50_us - direct.rtt_p50_us,
            f.rtt_p99_us - direct.rtt_p99_us,
            f.conn_p99_us - direct.conn_p99_us
        );
    }
    let ours = get("ours").ok_or("our proxy did not run")?;
    for other in ["nginx", "haproxy"] {
        let Some(o) = get(other) else { continue };
        println!("ratios vs {other} (> 1 = ours better):");
        ratio_line("connections/s", ours.conns_per_s, o.conns_per_s, other);
        ratio_line("throughput, 1 stream", ours.mbs_1, o.mbs_1, other);
        ratio_line("throughput, 4 streams", ours.mbs_4, o.mbs_4, other);
        let added = |f: Figures| (f.rtt_p99_us - direct.rtt_p50_us).max(0.1);
        ratio_line("p99 rtt over direct p50 (inverse)", added(o), added(ours), other);
        ratio_line(
            "CPU per connection (inverse)",
            o.cpu_us_per_conn,
            ours.cpu_us_per_conn,
            other,
        );
        ratio_line("CPU per GB (inverse)", o.cpu_ms_per_gb, ours.cpu_ms_per_gb, other);
    }
    println!("bench_proxy: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
