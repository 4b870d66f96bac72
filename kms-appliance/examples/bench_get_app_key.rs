//! `GetAppKey` end to end over loopback: a new TCP + TLS 1.3 connection per call with an RA-TLS client
//! certificate, attestation verification (simulated quote, event-log replay), the dev policy, key derivation.
//!
//! ```text
//! cargo run --release -p dstack-kms --example bench_get_app_key [calls]
//! ```
//!
//! Two series: the same client certificate every call (the verifier's cache hits, as for a CVM that retries)
//! and a fresh certificate per call (full quote verification + replay each time). Target: p50 <= 5 ms.
//! With `DSTACK_TEST_ANVIL` set (path of Foundry's anvil) a third series uses the on-chain policy: a second KMS
//! asks our KmsRegistry on a local anvil (`eth_call` of `isAppAllowed` + `gatewayAppId`) on every call.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use dstack_kms::Kms;
use dstack_rpc::kms::GetAppKeyRequest;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn report(name: &str, mut d: Vec<Duration>) {
    d.sort();
    println!(
        "{name:<28} n={:<5} p50={:>7.3} ms  p99={:>7.3} ms  max={:>7.3} ms",
        d.len(),
        pct(&d, 0.50).as_secs_f64() * 1e3,
        pct(&d, 0.99).as_secs_f64() * 1e3,
        d.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() {
    let calls: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(300);
    let (dir, certs) = tempdir();
    let ktee = kms_tee(dir.path()).await;
    let sim = cvm([0xa1; 20], [0x1d; 20]);
    let pins = vec![write_pin(dir.path(), "cvm.pem", &sim)];
    let kms = Kms::with_tee(config(&certs, pins, true, None), Some(ktee.self_tee.clone())).unwrap();
    kms.bootstrap(DOMAIN).await.unwrap();
    let handle = start(&kms).await;
    let req = GetAppKeyRequest {
        api_version: 1,
        vm_config: r#"{"os_image_hash":"00"}"#.into(),
    };

    // One server verifier for the whole run: the KMS certificate's attestation is checked once and cached.
    let server = server_verifier(&certs, &ktee.sim);
    let (cert, key) = client_cert(&sim, |_| {});
    let same = client_with(&handle, server.clone(), Some((cert, &key)));
    same.get_app_key(req.clone()).await.unwrap(); // warm-up (fills the verifier cache)
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        same.get_app_key(req.clone()).await.unwrap();
        times.push(t.elapsed());
    }
    report("same cert (cached verify)", times);

    let fresh: Vec<_> = (0..calls).map(|_| client_cert(&sim, |_| {})).collect();
    let mut times = Vec::with_capacity(calls);
    for (cert, key) in &fresh {
        let c = client_with(&handle, server.clone(), Some((cert.clone(), key)));
        let t = Instant::now();
        c.get_app_key(req.clone()).await.unwrap();
        times.push(t.elapsed());
    }
    report("fresh cert (full verify)", times);
    handle.shutdown().await.unwrap();

    if std::env::var_os("DSTACK_TEST_ANVIL").is_some() {
        onchain_series(calls).await;
    } else {
        println!("(on-chain series skipped: set DSTACK_TEST_ANVIL to the anvil binary)");
    }
}

async fn onchain_series(calls: usize) {
    use dstack_kms::onchain::{Change, NewApp};
    let Some(chain) = anvil::anvil().await else { return };
    let owner = anvil::admin(&chain, anvil::DEV_KEY_0);
    let registry = owner.deploy_registry(None).await.unwrap();
    let os = [0x05u8; 32];
    owner.apply(registry, &Change::AddOsImage(os.into())).await.unwrap();
    let app = NewApp {
        allow_any_device: true,
        compose_hash: [0xc0; 32].into(), // what common::cvm measures
        ..Default::default()
    };
    let app_id = owner.register_new_app(registry, &app).await.unwrap();

    let (dir, certs) = tempdir();
    let ktee = kms_tee(dir.path()).await;
    let sim = cvm(app_id.into_array(), [0x1d; 20]);
    let pins = vec![write_pin(dir.path(), "cvm.pem", &sim)];
    let mut cfg = config(&certs, pins, true, None);
    cfg.core.auth_api.kind = dstack_kms::config::AuthApiKind::Onchain;
    cfg.core.auth_api.onchain.rpc_url = chain.url.clone();
    cfg.core.auth_api.onchain.kms_contract = registry.to_string();
    let kms = Kms::with_tee(cfg, Some(ktee.self_tee.clone())).unwrap();
    kms.bootstrap(DOMAIN).await.unwrap();
    let handle = start(&kms).await;
    let req = GetAppKeyRequest {
        api_version: 1,
        vm_config: format!(r#"{{"os_image_hash":"{}"}}"#, hex::encode(os)),
    };
    let (cert, key) = client_cert(&sim, |_| {});
    let c = client_with(&handle, server_verifier(&certs, &ktee.sim), Some((cert, &key)));
    c.get_app_key(req.clone()).await.unwrap();
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        c.get_app_key(req.clone()).await.unwrap();
        times.push(t.elapsed());
    }
    report("same cert, onchain policy", times);
    handle.shutdown().await.unwrap();
}
