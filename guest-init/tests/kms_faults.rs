//! Fault injection for the guest's KMS key step: unreachable, misbehaving and stalled KMS endpoints. Each
//! failure must be reported per URL with a clear reason, the next URL must be tried, and no key material
//! may be returned. (A successful key release is covered end to end by the full-stack tests.)
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dstack_guest_agent::simulate::InProcessSimTee;
use dstack_measurements::sim::SimulatedQuoteSigner;
use dstack_sim_tdx::{InitialState, SimTdx};
use guest_init::boot::keys::{KeyError, KeySource};
use guest_init::boot::kms::{KmsConnector, KmsKeySource};
use guest_init::boot::tee::TeeMeasurer;

struct Fixture {
    source: KmsKeySource,
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimTdx::new(
        &InitialState {
            mrtd: vec![1; 48],
            ..Default::default()
        },
        SimulatedQuoteSigner::generate().unwrap(),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let measurer = TeeMeasurer::new(
        Arc::new(InProcessSimTee(Arc::new(sim))),
        dir.path().join("runtime-events.log"),
        rt.handle().clone(),
    );
    Fixture {
        source: KmsKeySource {
            connector: KmsConnector::new(Arc::new(measurer), None),
            rt: rt.handle().clone(),
        },
        _rt: rt,
        _dir: dir,
    }
}

/// A loopback port nothing listens on (bound, then released).
fn refused_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("https://{addr}")
}

/// A server that handles each accepted connection with `f` on its own thread.
fn server(f: fn(TcpStream)) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || f(s));
        }
    });
    addr
}

fn provider_reason(e: KeyError) -> String {
    match e {
        KeyError::Provider {
            provider: "kms",
            reason,
        } => reason,
        other => panic!("unexpected error kind: {other}"),
    }
}

#[test]
fn refused_then_reset_then_not_tls_each_reported_per_url() {
    let f = fixture();
    let refused = refused_url();
    let reset = format!("https://{}", server(drop));
    let plain_http = format!(
        "https://{}",
        server(|mut s| {
            let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n");
        })
    );
    let urls = vec![refused.clone(), reset.clone(), plain_http.clone()];
    let started = Instant::now();
    let err = f.source.get_app_keys(&urls, "{}", &[]).map(|_| ()).unwrap_err();
    let reason = provider_reason(err);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "fast failures took {:?}",
        started.elapsed()
    );
    // Every URL was tried, in order, each with its own reason.
    let parts: Vec<&str> = reason
        .trim_start_matches("no KMS released keys: ")
        .split("; ")
        .collect();
    assert_eq!(parts.len(), 3, "{reason}");
    assert!(
        parts[0].starts_with(&refused) && parts[0].to_lowercase().contains("refused"),
        "{reason}"
    );
    assert!(
        parts[1].starts_with(&reset) && parts[1].contains("GetTempCaCert"),
        "{reason}"
    );
    assert!(
        parts[2].starts_with(&plain_http) && parts[2].contains("TLS"),
        "{reason}"
    );
}

#[test]
fn stalled_kms_times_out_with_a_clear_error_and_the_next_url_is_tried() {
    let f = fixture();
    // Accepts TCP, then never speaks: the TLS handshake stalls until the connect timeout (10 s).
    let stalled = format!(
        "https://{}",
        server(|s| {
            std::thread::sleep(Duration::from_secs(30));
            drop(s);
        })
    );
    let refused = refused_url();
    let started = Instant::now();
    let err = f
        .source
        .get_app_keys(&[stalled.clone(), refused.clone()], "{}", &[])
        .map(|_| ())
        .unwrap_err();
    let elapsed = started.elapsed();
    let reason = provider_reason(err);
    assert!(
        reason.contains(&format!("{stalled}: GetTempCaCert: connect timed out after 10s")),
        "{reason}"
    );
    assert!(reason.contains(&refused), "the next URL must still be tried: {reason}");
    assert!(
        elapsed >= Duration::from_secs(9) && elapsed < Duration::from_secs(20),
        "{elapsed:?}"
    );
}
