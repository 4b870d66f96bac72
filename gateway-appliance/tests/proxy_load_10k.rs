//! 10,000 concurrent connections held open on the SNI proxy (loopback only), then a stream of
//! malformed ClientHellos and fresh valid clients on top: the proxy's memory stays bounded, valid
//! clients are still served, and everything is let go afterwards. The figures are printed.
//!
//! The proxy runs in this test process, alone, so that its RSS, file descriptors and counters are
//! its own; the clients and the app backend run in a child process (this test binary re-run with
//! `DSTACK_LOAD_CHILD=1`, which only the `load_child` entry point acts on). Both raise their soft
//! RLIMIT_NOFILE to the hard limit. Of the 10,000 connections, 6,000 are routed sessions (two
//! descriptors each at the proxy) and 4,000 are stalled half-sent ClientHellos, which keeps the
//! proxy under a 20,000-descriptor hard limit. Bounded: about 15 s, a watchdog at 120 s.
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use dstack_gateway::config::ProxyConfig;
use dstack_gateway::proxy::tls::TlsTerminator;
use dstack_gateway::proxy::{ProxyState, Stats};
use dstack_gateway::routing::{Instance, PortPolicy, RoutingTable};
use dstack_testkit::Mutator;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::backend::{NoTxt, echo_backend};

const ROUTED: usize = 6_000;
const STALLED: usize = 4_000;
const MALFORMED: usize = 3_000;
const FRESH: usize = 500;
const RAMP_CONCURRENCY: usize = 200;
const BASE: &str = "apps.test";
const CHILD_ENV: &str = "DSTACK_LOAD_CHILD";

fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads the struct we own; raising the soft limit to the hard one is allowed.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    lim.rlim_cur
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn hello(port: u16) -> Vec<u8> {
    common::hello::client_hello(&format!("app9-{port}s.{BASE}"), &[b"h2"])
}

/// The proxy side (this process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_and_malformed_hellos_stay_bounded() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let nofile = raise_nofile();
    assert!(
        nofile as usize >= 2 * ROUTED + STALLED + 1000,
        "RLIMIT_NOFILE hard limit {nofile} too low for this test"
    );
    let table = RoutingTable::new();
    let mut config = ProxyConfig {
        base_domain: BASE.into(),
        max_connections_per_app: 0,
        ..ProxyConfig::default()
    };
    // Stalled hellos must outlive the run; the clients close them at the end.
    config.timeouts.handshake = Duration::from_secs(90);
    let state = Arc::new(ProxyState {
        config,
        table: table.clone(),
        resolver: Arc::new(NoTxt),
        tls: Arc::new(TlsTerminator::new(vec![&rustls::version::TLS13])),
        stats: Stats::default(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(dstack_gateway::proxy::run(listener, state.clone(), async move {
        let _ = stopped.await;
    }));

    let mut child = ChildGuard(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "load_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut to_child = child.0.stdin.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let out = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            // libtest may print "test load_child ... " on the same line first.
            if let Some((_, l)) = line.split_once("@@ ") {
                let _ = lines_tx.send(l.to_owned());
            }
        }
    });
    let mut expect = async |what: &str| -> Vec<String> {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.recv())
            .await
            .unwrap_or_else(|_| panic!("child silent while waiting for {what:?}"))
            .unwrap_or_else(|| panic!("child exited before {what:?}"));
        let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        assert_eq!(words.first().map(String::as_str), Some(what), "child said {line:?}");
        words
    };

    let backend_port: u16 = expect("backend").await[1].parse().unwrap();
    table.upsert(Instance {
        instance_id: "i9".into(),
        app_id: "app9".into(),
        ip: IpAddr::from([127, 0, 0, 1]),
        public_key: String::new(),
        port_policy: PortPolicy::default(),
        reg_time: SystemTime::now(),
        latest_handshake: Some(SystemTime::now()),
    });
    // Baseline after one routed connection has warmed the runtime and the allocator.
    {
        let h = hello(backend_port);
        let mut s = TcpStream::connect(gw).await.unwrap();
        s.write_all(&h).await.unwrap();
        let mut got = vec![0u8; 3 + h.len()];
        s.read_exact(&mut got).await.unwrap();
    }
    let (fds0, rss0) = (open_fds(), rss_kib());
    let peak_rss = Arc::new(AtomicU64::new(rss0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, on) = (peak_rss.clone(), sampling.clone());
        tokio::spawn(async move {
            while on.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    writeln!(to_child, "go {}", gw.port()).unwrap();
    let held = expect("held").await;
    let (ok, failed, ramp_ms): (usize, usize, u64) = (
        held[1].parse().unwrap(),
        held[2].parse().unwrap(),
        held[3].parse().unwrap(),
    );
    assert_eq!(failed, 0, "{failed} connections failed while ramping up");
    assert_eq!(ok, ROUTED + STALLED);
    let deadline = Instant::now() + Duration::from_secs(20);
    while state.stats.active.load(Ordering::Relaxed) < (ROUTED + STALLED) as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let active_peak = state.stats.active.load(Ordering::Relaxed);
    assert_eq!(
        active_peak,
        (ROUTED + STALLED) as u64,
        "proxy's count of open connections"
    );
    let (fds_held, rss_held) = (open_fds(), rss_kib());

    writeln!(to_child, "attack").unwrap();
    let attack = expect("attack").await;
    let nums: Vec<f64> = attack[1..].iter().map(|w| w.parse().unwrap()).collect();
    let [malformed_sent, fresh_ok, fresh_failed, p50_us, p99_us, bad_routed] = nums[..] else {
        panic!("bad attack report {attack:?}");
    };
    let rss_attack = peak_rss.load(Ordering::Relaxed);
    assert_eq!(malformed_sent as usize, MALFORMED);
    assert_eq!(fresh_failed, 0.0, "valid clients failed under load");
    assert_eq!(fresh_ok as usize, FRESH);
    // The held sessions are all still there.
    assert!(state.stats.active.load(Ordering::Relaxed) >= (ROUTED + STALLED) as u64);
    let rejected = state.stats.rejected.load(Ordering::Relaxed);
    assert!(
        rejected as f64 + bad_routed >= MALFORMED as f64 * 0.95,
        "rejected {rejected}, routed-after-mutation {bad_routed}"
    );

    writeln!(to_child, "release").unwrap();
    expect("released").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while state.stats.active.load(Ordering::Relaxed) != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    assert_eq!(state.stats.active.load(Ordering::Relaxed), 0, "connections left open");
    let rss_released = rss_kib();
    // Freed heap stays mapped in glibc's arenas until trimmed; trim to see what is really retained.
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    let (fds1, rss1) = (open_fds(), rss_kib());
    let peak = peak_rss.load(Ordering::Relaxed);
    let n = (ROUTED + STALLED) as u64;
    let per_conn = (rss_held.saturating_sub(rss0)) * 1024 / n;
    eprintln!(
        "proxy 10k load: {ROUTED} routed + {STALLED} stalled connections held (ramp {ramp_ms} ms), \
         {MALFORMED} malformed hellos + {FRESH} fresh clients on top (fresh p50 {p50_us:.0} µs, p99 {p99_us:.0} µs); \
         accepted {}, rejected {rejected}, malformed-but-routed {bad_routed}; \
         fds {fds0} -> {fds_held} held -> {fds1}; RSS KiB: baseline {rss0}, held {rss_held} ({per_conn} B/conn), \
         peak during attack {rss_attack}, peak {peak}, released {rss_released}, after trim {rss1}",
        state.stats.accepted.load(Ordering::Relaxed)
    );
    // Bounds: well under 64 KiB per held connection (two 8 KiB copy buffers per routed session
    // plus task state), the malformed stream adds little on top, nothing is retained afterwards.
    assert!(per_conn < 48 * 1024, "{per_conn} bytes per connection");
    assert!(
        rss_attack.saturating_sub(rss_held) < 64 * 1024,
        "malformed stream grew RSS {rss_held} -> {rss_attack} KiB"
    );
    // Two descriptors per routed session, one per stalled hello.
    assert!(fds_held >= 2 * ROUTED + STALLED, "fds {fds0} -> {fds_held} while held");
    assert!(fds1 <= fds0 + 8, "fds {fds0} -> {fds1}");
    assert!(rss1.saturating_sub(rss0) < 64 * 1024, "retained {} KiB", rss1 - rss0);
    drop(to_child);
    let _ = stop.send(());
}

struct ChildGuard(std::process::Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------- child: clients and backend

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "@@ {line}");
    let _ = out.flush();
}

/// Commands from the parent, one per line.
fn commands() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

async fn routed_client(gw: SocketAddr, hello: &[u8]) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(gw).await.map_err(|e| format!("connect: {e}"))?;
    s.write_all(hello).await.map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; 3 + hello.len()];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut got))
        .await
        .map_err(|_| "no answer in 20 s".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    if got.get(..3) != Some(b"ok:") || got.get(3..) != Some(hello) {
        return Err("answer is not the echoed hello".into());
    }
    Ok(s)
}

async fn stalled_client(gw: SocketAddr, hello: &[u8]) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(gw).await.map_err(|e| format!("connect: {e}"))?;
    s.write_all(hello.get(..hello.len() / 2).unwrap_or_default())
        .await
        .map_err(|e| format!("write: {e}"))?;
    Ok(s)
}

/// A malformed hello: sent, then EOF (or a short stall); true if the proxy routed it anyway.
async fn malformed_client(gw: SocketAddr, bytes: Vec<u8>, stall: bool) -> bool {
    let Ok(mut s) = TcpStream::connect(gw).await else {
        return false;
    };
    let _ = s.write_all(&bytes).await;
    if !stall {
        let _ = s.shutdown().await;
    }
    let mut got = [0u8; 3];
    let r = tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut got)).await;
    matches!(r, Ok(Ok(_))) && &got == b"ok:"
}

/// The client side (child process only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    raise_nofile();
    let mut cmds = commands();
    let backend = echo_backend([127, 0, 0, 1], "ok").await;
    let hello = Arc::new(hello(backend));
    say(&format!("backend {backend}"));
    let go = cmds.recv().await.unwrap();
    let port: u16 = go.strip_prefix("go ").unwrap().parse().unwrap();
    let gw = SocketAddr::from(([127, 0, 0, 1], port));

    // Ramp up: everything held open until "release".
    let t = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(RAMP_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..ROUTED + STALLED {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let hello = hello.clone();
        tasks.spawn(async move {
            let r = if i % 5 < 3 {
                routed_client(gw, &hello).await
            } else {
                stalled_client(gw, &hello).await
            };
            drop(permit);
            r
        });
    }
    let (mut held, mut failed) = (Vec::new(), 0usize);
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(s) => held.push(s),
            Err(e) => {
                if failed == 0 {
                    eprintln!("first failure: {e}");
                }
                failed += 1;
            }
        }
    }
    say(&format!("held {} {failed} {}", held.len(), t.elapsed().as_millis()));

    assert_eq!(cmds.recv().await.unwrap(), "attack");
    let mut mutator = Mutator::new(dstack_testkit::seed_from_env());
    let attack = {
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        let mut set = tokio::task::JoinSet::new();
        for i in 0..MALFORMED {
            let bytes = mutator.mutate(&hello, &[]);
            let permit = sem.clone().acquire_owned().await.unwrap();
            set.spawn(async move {
                let routed = malformed_client(gw, bytes, i % 10 == 0).await;
                drop(permit);
                routed
            });
        }
        async move {
            let mut routed = 0u32;
            while let Some(r) = set.join_next().await {
                routed += u32::from(r.unwrap());
            }
            routed
        }
    };
    let fresh = {
        let hello = hello.clone();
        async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(8));
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..FRESH {
                let permit = sem.clone().acquire_owned().await.unwrap();
                let hello = hello.clone();
                set.spawn(async move {
                    let t = Instant::now();
                    let r = routed_client(gw, &hello).await.map(|_| t.elapsed());
                    drop(permit);
                    r
                });
            }
            let (mut lat, mut failed) = (Vec::new(), 0u32);
            while let Some(r) = set.join_next().await {
                match r.unwrap() {
                    Ok(d) => lat.push(d.as_secs_f64() * 1e6),
                    Err(_) => failed += 1,
                }
            }
            lat.sort_by(f64::total_cmp);
            (lat, failed)
        }
    };
    let (bad_routed, (lat, fresh_failed)) = tokio::join!(attack, fresh);
    let pct = |q: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * q) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    say(&format!(
        "attack {MALFORMED} {} {fresh_failed} {:.0} {:.0} {bad_routed}",
        lat.len(),
        pct(0.5),
        pct(0.99)
    ));

    assert_eq!(cmds.recv().await.unwrap(), "release");
    drop(held);
    say("released");
}
