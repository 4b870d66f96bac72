//! Load (issue 13 item 3): the KMS under concurrent `GetAppKey`. A real KMS on loopback (dev policy, its own
//! TEE simulated over a unix socket); `CLIENTS` simulated CVMs of two apps, each with its own RA-TLS client
//! certificate and its own mTLS connections, call `GetAppKey` concurrently for a bounded number of calls and
//! a bounded wall time. Every call must succeed with the keys derived independently from the key files, and
//! p99 latency must stay under a generous bound (a loaded 2-core machine).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use dstack_keys::app_keys::derive_app_keys;
use dstack_kms::Kms;
use dstack_kms::store::KeyStore;
use dstack_rpc::kms::GetAppKeyRequest;

const APPS: [[u8; 20]; 2] = [[0xa1; 20], [0xb2; 20]];
const CLIENTS: usize = 12;
const CALLS_PER_CLIENT: usize = 50;
/// Wall-time budget for the calls; a client stops early when it runs out (and we still require >= 1 call).
const BUDGET: Duration = Duration::from_secs(20);
/// Generous p99 bound: each call is a fresh TCP + TLS 1.3 handshake with RA-TLS verification on both sides.
const P99_BOUND: Duration = Duration::from_millis(500);

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_get_app_key_is_correct_and_latency_bounded() {
    let (dir, certs) = tempdir();
    let ktee = kms_tee(dir.path()).await;
    // One CVM per client: two apps, a distinct instance id each.
    let sims: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let app = APPS[i % APPS.len()];
            let instance = [0x10 + i as u8; 20];
            (app, instance, cvm(app, instance))
        })
        .collect();
    let pins = sims
        .iter()
        .enumerate()
        .map(|(i, (_, _, sim))| write_pin(dir.path(), &format!("cvm{i}.pem"), sim))
        .collect();
    let kms = Kms::with_tee(config(&certs, pins, true, None), Some(ktee.self_tee.clone())).unwrap();
    kms.bootstrap(DOMAIN).await.unwrap();
    let handle = start(&kms).await;
    // Expected keys come from crates/keys applied to the key files, not from the server.
    let stored = KeyStore::new(&certs).load().unwrap();

    let server = server_verifier(&certs, &ktee.sim);
    let req = GetAppKeyRequest {
        api_version: 1,
        vm_config: r#"{"os_image_hash":"00"}"#.into(),
    };
    let deadline = Instant::now() + BUDGET;
    let start_all = Instant::now();
    let mut tasks = Vec::new();
    for (app, instance, sim) in &sims {
        let expected = derive_app_keys(&stored.root_ca_secret, &stored.root_k256, app, instance).unwrap();
        let (cert, key) = client_cert(sim, |_| {});
        let client = client_with(&handle, Arc::clone(&server), Some((cert, &key)));
        let req = req.clone();
        let app = *app;
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::with_capacity(CALLS_PER_CLIENT);
            let mut env_keys = Vec::new();
            for n in 0..CALLS_PER_CLIENT {
                if n > 0 && Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                let resp = tokio::time::timeout(Duration::from_secs(10), client.get_app_key(req.clone()))
                    .await
                    .expect("GetAppKey timed out")
                    .expect("GetAppKey failed under load");
                times.push(t.elapsed());
                assert_eq!(resp.disk_crypt_key, expected.disk_crypt_key.to_vec());
                assert_eq!(resp.env_crypt_key, expected.env_crypt_key.to_vec());
                assert_eq!(resp.k256_key, expected.k256_key.to_vec());
                assert_eq!(resp.k256_signature, expected.k256_signature.to_vec());
                assert_eq!(resp.gateway_app_id, GATEWAY_APP_ID);
                env_keys.push(resp.env_crypt_key);
            }
            (app, times, env_keys)
        }));
    }

    let mut all = Vec::new();
    let mut env_by_app: Vec<([u8; 20], Vec<u8>)> = Vec::new();
    for t in tasks {
        let (app, times, env_keys) = t.await.expect("client task panicked");
        assert!(!times.is_empty());
        all.extend(times);
        // Every answer for the same app carries the same app-level key (across clients and calls).
        for k in env_keys {
            match env_by_app.iter().find(|(a, _)| *a == app) {
                Some((_, first)) => assert_eq!(&k, first, "env key differs between calls for one app"),
                None => env_by_app.push((app, k)),
            }
        }
    }
    let wall = start_all.elapsed();
    handle.shutdown().await.unwrap();

    assert_eq!(env_by_app.len(), APPS.len());
    assert_ne!(env_by_app[0].1, env_by_app[1].1, "two apps got the same env key");
    all.sort();
    let (p50, p99) = (pct(&all, 0.50), pct(&all, 0.99));
    println!(
        "GetAppKey load: clients={CLIENTS} calls={} wall={:.2} s throughput={:.1} calls/s p50={:.1} ms \
         p99={:.1} ms max={:.1} ms",
        all.len(),
        wall.as_secs_f64(),
        all.len() as f64 / wall.as_secs_f64(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        all.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    assert!(p99 < P99_BOUND, "p99 {p99:?} over {P99_BOUND:?}");
}
