//! The gateway as a CVM (`dstack_e2e::gateway_cvm`): the gateway appliance packaged for this run, deployed by
//! the VM manager, attested (its RPC certificate chain from its guest agent and the KMS, its quote and event
//! log, the image's published measurements, the compose hash and app id equal to what the packaging
//! published), then an app CVM registered with it over RA-TLS and WireGuard and reached over HTTPS through it
//! by `<app_id>-<port>.<base_domain>` (SNI), the certificate issued to the gateway CVM by the host's pebble.
//! The KMS runs with OS image verification on: both CVMs boot from the image it has.
//!
//! Inputs: the `dstack_e2e` crate docs (`DSTACK_E2E_IMAGE`, `DSTACK_DEMO_APP_BIN`, `VHOST_DEVICE_VSOCK`, Debian
//! `docker-registry` and `pebble`) plus `DSTACK_GATEWAY_BIN` (static `dstack-gateway`) and optionally
//! `DSTACK_XTASK`. Missing inputs: loud SKIP, or failure under `DSTACK_REQUIRE_FIXTURES=1`. Two CVM boots
//! under TCG, one after the other; several minutes here.

use std::time::{Duration, Instant};

use dstack_e2e::gateway_cvm::{Expected, PackagedGateway, verify_gateway};
use dstack_e2e::stack::{APP_PORT, AppSpec, free_port, http_get, skip_or_fail, tail};
use dstack_e2e::{GatewayCvmInputs, Inputs, KmsOptions, Stack};
use sha2::{Digest, Sha256};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_cvm_answers_over_https_through_an_attested_gateway_cvm() {
    let (inputs, gw_inputs) = match Inputs::from_env().and_then(|i| Ok((i, GatewayCvmInputs::from_env()?))) {
        Ok(i) => i,
        Err(e) => return skip_or_fail("gateway_cvm", &e),
    };
    let measurements = inputs.image_dir.join("measurements.json");
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let stack = Stack::start_with_gateway_cvm(dir.path(), inputs, KmsOptions::default(), gw_inputs, |p| {
        eprintln!("gateway CVM {p}")
    })
    .await
    .unwrap();
    let gw = stack.gateway_cvm.as_ref().unwrap();
    eprintln!(
        "gateway CVM {} up: RPC after {:.1?}, proxy listening after {:.1?}\n{}",
        gw.vm_id,
        gw.timings.rpc_up,
        gw.timings.proxy_up,
        gw.attestation.report()
    );
    assert!(gw.attestation.ok(), "gateway attestation:\n{}", gw.attestation.report());
    // The deployed app-compose.json is the published one: its SHA-256 is the published compose hash.
    assert_eq!(
        hex::encode(Sha256::digest(gw.package.app_compose.as_bytes())),
        gw.package.compose_hash
    );
    for what in [
        "compose hash = published",
        "app id = published",
        "RPC chain → KMS root CA",
        "mrtd",
    ] {
        assert!(
            gw.attestation.checks.iter().any(|c| c.what == what && c.ok),
            "no passing {what:?} check:\n{}",
            gw.attestation.report()
        );
    }
    // The same chain checked against another packaging's compose hash and app id fails exactly those rows.
    let other = PackagedGateway {
        compose_hash: "00".repeat(32),
        app_id: "00".repeat(20),
        ..gw.package.clone()
    };
    let (kms_root, sim_root) = (dir.path().join("kms-certs/root-ca.crt"), stack.sim_root());
    let expected = Expected {
        kms_root: &kms_root,
        sim_root: &sim_root,
        measurements: &measurements,
    };
    let os_image_hash = std::fs::read_to_string(measurements.with_file_name("os_image_hash")).unwrap();
    let wrong = verify_gateway(&gw.rpc_chain, &expected, os_image_hash.trim(), &other).unwrap();
    let failed: Vec<&str> = wrong.checks.iter().filter(|c| !c.ok).map(|c| c.what.as_str()).collect();
    assert_eq!(failed, ["compose hash = published", "app id = published"]);

    let port = free_port().unwrap();
    let greeting = "hello through the gateway CVM";
    let mut app = AppSpec::demo(&stack.app_image, greeting, port);
    app.vcpus = 1;
    app.gateway = true;
    let id = stack.deploy(&app).await.unwrap();
    let t_app = Instant::now();
    stack
        .wait_app(&id, port, BOOT_TIMEOUT, |p| {
            eprintln!("app CVM [{:>6.1}s] {p}", t_app.elapsed().as_secs_f64())
        })
        .await
        .unwrap();
    let (_, info) = http_get(port, "/info").unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let app_id = info["app_id"].as_str().unwrap().to_owned();
    let t_gw = Instant::now();
    let mut last: String;
    let body = loop {
        match stack.gateway_get(&app_id, APP_PORT, "/").await {
            Ok((200, body)) => break body,
            Ok((s, body)) => last = format!("HTTP {s}: {}", body.chars().take(200).collect::<String>()),
            Err(e) => last = e,
        }
        assert!(
            t_gw.elapsed() < Duration::from_secs(180),
            "no answer through the gateway CVM: {last}\napp serial:\n{}\ngateway serial:\n{}",
            tail(&stack.serial_log(&id), 30),
            tail(&stack.serial_log(&gw.vm_id), 30)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(body.contains(greeting), "{body}");
    eprintln!(
        "app answered on its port after {:.1?}, through the gateway CVM {:.1?} later; total {:.1?}",
        t_gw.duration_since(t_app),
        t_gw.elapsed(),
        t0.elapsed()
    );
}
