//! Bounded load on the SNI proxy (loopback only): 2,000 connections, 50 at a time, one in four a mutated
//! (malformed, truncated or stalled) ClientHello. Every valid client must be served byte-exact, and once the
//! run is over the proxy must hold no connections, no extra file descriptors and no large extra memory.
mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use dstack_gateway::config::ProxyConfig;
use dstack_gateway::proxy::tls::TlsTerminator;
use dstack_gateway::proxy::{ProxyState, Stats};
use dstack_gateway::routing::{Instance, PortPolicy, RoutingTable};
use dstack_testkit::Mutator;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::backend::{NoTxt, echo_backend};

const TOTAL: usize = 2_000;
const CONCURRENCY: usize = 50;
const BAD_EVERY: usize = 4;

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

/// A valid passthrough client: the proxy must forward the hello untouched and relay the echo.
async fn good_client(gw: SocketAddr, hello: Arc<Vec<u8>>) -> Result<(), String> {
    let mut s = TcpStream::connect(gw).await.map_err(|e| format!("connect: {e}"))?;
    s.write_all(&hello).await.map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; 3 + hello.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .map_err(|_| "no reply within 10 s".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    if &got[..3] != b"ok:" || got[3..] != hello[..] {
        return Err("reply differs from the echoed hello".into());
    }
    Ok(())
}

/// A hostile client: a mutated hello, then either EOF or a stall. Returns true if the proxy routed it (a
/// mutation can leave a valid hello: then the app answers and the session is legitimately open).
async fn bad_client(gw: SocketAddr, bytes: Vec<u8>, stall: bool) -> bool {
    let Ok(mut s) = TcpStream::connect(gw).await else {
        return false;
    };
    let _ = s.write_all(&bytes).await;
    if !stall {
        let _ = s.shutdown().await;
    }
    let mut got = Vec::new();
    // Unrouted connections must be ended by the proxy (alert + close, or close) within its handshake
    // timeout (300 ms here); only a routed session may still be open after 3 s.
    let r = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut got)).await;
    let routed = got.starts_with(b"ok:");
    assert!(
        r.is_ok() || routed,
        "proxy kept an unrouted malformed connection open: sent {} bytes (stall={stall}), got {:?}",
        bytes.len(),
        String::from_utf8_lossy(&got)
    );
    routed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_proxy_under_bounded_load_with_malformed_hellos() {
    let ip = [127, 0, 0, 9];
    let port = echo_backend(ip, "ok").await;
    let table = RoutingTable::new();
    table.upsert(Instance {
        instance_id: "i9".into(),
        app_id: "app9".into(),
        ip: IpAddr::from(ip),
        public_key: String::new(),
        port_policy: PortPolicy::default(),
        reg_time: SystemTime::now(),
        latest_handshake: Some(SystemTime::now()),
    });
    let mut config = ProxyConfig {
        base_domain: "apps.test".into(),
        ..ProxyConfig::default()
    };
    config.timeouts.handshake = Duration::from_millis(300);
    config.timeouts.connect = Duration::from_millis(500);
    let state = Arc::new(ProxyState {
        config,
        table,
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

    let hello = Arc::new(common::hello::client_hello(
        &format!("app9-{port}s.apps.test"),
        &[b"h2"],
    ));
    let mut mutator = Mutator::new(dstack_testkit::seed_from_env());
    let bad_inputs: Vec<(Vec<u8>, bool)> = (0..TOTAL / BAD_EVERY)
        .map(|i| {
            let m = mutator.mutate(&hello, &[]);
            (m, i % 10 == 0)
        })
        .collect();

    // Warm up once so the baseline includes the runtime's and the allocator's steady state.
    good_client(gw, hello.clone()).await.unwrap();
    let (fds_before, rss_before) = (open_fds(), rss_kib());
    let started = Instant::now();

    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    let mut bad = bad_inputs.into_iter();
    for i in 0..TOTAL {
        let permit = sem.clone().acquire_owned().await.unwrap();
        if i % BAD_EVERY == BAD_EVERY - 1
            && let Some((bytes, stall)) = bad.next()
        {
            tasks.spawn(async move {
                let routed = bad_client(gw, bytes, stall).await;
                drop(permit);
                Err(routed)
            });
        } else {
            let hello = hello.clone();
            tasks.spawn(async move {
                let r = good_client(gw, hello).await;
                drop(permit);
                Ok(r)
            });
        }
    }
    let (mut served, mut failures, mut bad_routed) = (0usize, Vec::new(), 0u64);
    while let Some(r) = tasks.join_next().await {
        match r.expect("client task panicked") {
            Ok(Ok(())) => served += 1,
            Ok(Err(e)) => failures.push(e),
            Err(routed) => bad_routed += u64::from(routed),
        }
    }
    let elapsed = started.elapsed();
    assert!(
        failures.is_empty(),
        "{} good clients failed, first: {}",
        failures.len(),
        failures[0]
    );
    assert_eq!(served, TOTAL - TOTAL / BAD_EVERY);

    // The proxy lets go of everything: no active connections, fds back to baseline, bounded memory.
    let deadline = Instant::now() + Duration::from_secs(5);
    while state.stats.active.load(Ordering::Relaxed) != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state.stats.active.load(Ordering::Relaxed), 0, "connections left open");
    let accepted = state.stats.accepted.load(Ordering::Relaxed);
    assert_eq!(accepted, TOTAL as u64 + 1);
    // Every malformed hello is either rejected or (still valid after mutation) routed. The proxy counts a
    // rejection after closing the socket, so the client may see the close first: wait for the count.
    let expected_bad = (TOTAL / BAD_EVERY) as u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    while state.stats.rejected.load(Ordering::Relaxed) + bad_routed < expected_bad && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rejected = state.stats.rejected.load(Ordering::Relaxed);
    assert_eq!(
        rejected + bad_routed,
        (TOTAL / BAD_EVERY) as u64,
        "rejected={rejected} routed={bad_routed}"
    );
    assert!(rejected > (TOTAL / BAD_EVERY / 2) as u64, "rejected={rejected}");
    let (fds_after, rss_after) = (open_fds(), rss_kib());
    // A few descriptors of slack for the runtime (e.g. a blocking-pool thread's handles).
    assert!(fds_after <= fds_before + 8, "fds {fds_before} -> {fds_after}");
    let growth_mib = rss_after.saturating_sub(rss_before) / 1024;
    assert!(growth_mib < 64, "RSS grew by {growth_mib} MiB");
    eprintln!(
        "proxy load: {TOTAL} connections ({CONCURRENCY} concurrent) in {elapsed:?}; rejected {rejected}, malformed-but-routed {bad_routed}; \
         fds {fds_before}->{fds_after}; RSS {rss_before}->{rss_after} KiB"
    );
    let _ = stop.send(());
}
