//! The whole stack end to end on this machine: the guest image built by image-build boots under the VM
//! manager's `tcg` backend (QEMU software emulation; the CI machines have no usable hardware
//! virtualization) with the simulated TDX module, gets its keys from the KMS over RA-TLS, unlocks its
//! LUKS2 disk, decrypts its env and runs the demo app from the local registry.
//!
//! Inputs: see the `dstack_e2e` crate docs (`cargo xtask test` provides them). Missing inputs: loud SKIP,
//! or failure under `DSTACK_REQUIRE_FIXTURES=1`. The gateway test also needs Debian `pebble` (`DSTACK_PEBBLE`,
//! `DSTACK_PEBBLE_CHALLTESTSRV`), root and `/dev/net/tun` (same SKIP/fail rule). Runs four CVM boots; about
//! 3–4 minutes here.

use std::time::{Duration, Instant};

use dstack_e2e::stack::{AppSpec, free_port, http_get, skip_or_fail, tail};
use dstack_e2e::{Gateway, Inputs, KmsOptions, Stack, StackError, verify_cvm};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// One CVM at a time: each keeps a core busy under software emulation.
static ONE_CVM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn demo(stack: &Stack, greeting: &str, port: u16) -> AppSpec {
    let mut app = AppSpec::demo(&stack.app_image, greeting, port);
    // The first published shape of the image: the quote must match measurements.json as published.
    app.vcpus = 1;
    app.memory_mb = 2048;
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cvm_boots_serves_the_app_verifies_and_keeps_its_data_across_a_restart() {
    let Some(inputs) = Inputs::for_test("full_stack") else {
        return;
    };
    let _one = ONE_CVM.lock().await;
    let measurements = inputs.image_dir.join("measurements.json");
    let dir = tempfile::tempdir().unwrap();
    let stack = Stack::start(dir.path(), inputs, KmsOptions::default()).await.unwrap();
    let port = free_port().unwrap();
    let greeting = "hello from an encrypted env var";
    let app = demo(&stack, greeting, port);
    let id = stack.deploy(&app).await.unwrap();

    let t = Instant::now();
    let page = stack
        .wait_app(&id, port, BOOT_TIMEOUT, |p| {
            eprintln!("[{:>6.1}s] boot: {p}", t.elapsed().as_secs_f64())
        })
        .await
        .unwrap();
    eprintln!("app answered after {:?}", t.elapsed());
    // The greeting travelled encrypted to the KMS-derived key and was decrypted inside the CVM only.
    assert!(page.contains(greeting), "page: {page}");
    let encrypted = std::fs::read(dir.path().join("run/vm").join(&id).join("shared/.encrypted-env")).unwrap();
    assert!(!String::from_utf8_lossy(&encrypted).contains(greeting));

    let verdict = verify_cvm(port, &measurements, &stack.sim_root(), &app.app_compose()).unwrap();
    eprintln!("{}", verdict.report());
    assert!(verdict.ok(), "{}", verdict.report());
    assert_eq!(verdict.tcb_status, "Simulated");

    let (status, info) = http_get(port, "/info").unwrap();
    assert_eq!(status, 200, "{info}");
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let app_id = info["app_id"].as_str().unwrap().to_owned();
    let instance_id = info["instance_id"].as_str().unwrap().to_owned();
    assert_eq!(app_id.len(), 40);
    let log = stack.serial_log(&id);
    assert!(
        log.contains("LUKS2 formatted"),
        "first boot formats the disk:\n{}",
        tail(&log, 40)
    );

    // Restart: same disk, same KMS → the LUKS volume opens with the same key; same identity.
    stack.stop(&id).await.unwrap();
    std::fs::write(dir.path().join("run/vm").join(&id).join("serial.log"), b"").unwrap();
    stack.start_vm(&id).await.unwrap();
    stack.wait_app(&id, port, BOOT_TIMEOUT, |_| {}).await.unwrap();
    let log = stack.serial_log(&id);
    assert!(log.contains("existing LUKS volume"), "{}", tail(&log, 40));
    assert!(
        !log.contains("formatting"),
        "the data disk must not be reformatted:\n{}",
        tail(&log, 40)
    );
    let (_, info2) = http_get(port, "/info").unwrap();
    let info2: serde_json::Value = serde_json::from_str(&info2).unwrap();
    assert_eq!(info2["app_id"], app_id.as_str());
    assert_eq!(info2["instance_id"], instance_id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_that_refuses_simulated_quotes_releases_no_key() {
    let Some(inputs) = Inputs::for_test("full_stack") else {
        return;
    };
    let _one = ONE_CVM.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let options = KmsOptions {
        allow_simulated: false,
        verify_image: true,
    };
    let stack = Stack::start(dir.path(), inputs, options).await.unwrap();
    let port = free_port().unwrap();
    let app = demo(&stack, "never decrypted", port);
    // Deploying works whatever the KMS's attestation policy (the env key is public); the refusal comes when
    // the CVM asks for its keys.
    let id = stack.deploy(&app).await.unwrap();
    let err = stack.wait_boot_error(&id, BOOT_TIMEOUT).await.unwrap();
    eprintln!("boot error: {err}");
    assert!(err.to_lowercase().contains("simulated"), "{err}");
    let log = stack.serial_log(&id);
    assert!(
        !log.contains("LUKS2 formatted") && !log.contains("existing LUKS volume"),
        "{}",
        tail(&log, 40)
    );
    assert!(http_get(port, "/").is_err(), "the app must not run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_answers_through_the_gateway_over_https() {
    let Some(inputs) = Inputs::for_test("full_stack") else {
        return;
    };
    if let Err(e) = dstack_e2e::pebble::binaries() {
        skip_or_fail("app_answers_through_the_gateway_over_https", &e);
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        let e = StackError::Missing {
            what: "root and /dev/net/tun".into(),
            hint: "the gateway's WireGuard tun device lives in the host network namespace".into(),
        };
        skip_or_fail("app_answers_through_the_gateway_over_https", &e);
        return;
    }
    let _one = ONE_CVM.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let options = KmsOptions {
        allow_simulated: true,
        verify_image: false,
    };
    let stack = Stack::start_with_gateway(dir.path(), inputs, options).await.unwrap();
    let gw = stack.gateway.as_ref().unwrap();
    let port = free_port().unwrap();
    let greeting = "hello through the gateway";
    let mut app = demo(&stack, greeting, port);
    app.gateway = true;
    let id = stack.deploy(&app).await.unwrap();
    let t = Instant::now();
    stack
        .wait_app(&id, port, BOOT_TIMEOUT, |p| {
            eprintln!("[{:>6.1}s] boot: {p}", t.elapsed().as_secs_f64())
        })
        .await
        .unwrap();
    let (_, info) = http_get(port, "/info").unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let app_id = info["app_id"].as_str().unwrap().to_owned();

    // The CVM registered (RegisterCvm over RA-TLS, verified against the KMS root and gateway app id).
    let registered = gw.registered();
    assert!(
        registered.iter().any(|(a, _, _)| *a == app_id),
        "app {app_id} not registered: {registered:?}; serial tail:\n{}",
        tail(&stack.serial_log(&id), 40)
    );
    let log = stack.serial_log(&id);
    eprintln!(
        "{}",
        log.lines()
            .filter(|l| l.contains("gateway"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // HTTPS through the proxy, name resolved to 127.0.0.1 here, certificate verified against pebble's root.
    let t_https = Instant::now();
    let mut last = String::new();
    let mut page = None;
    while t_https.elapsed() < Duration::from_secs(60) {
        match gw.get(&app_id, dstack_e2e::stack::APP_PORT, "/").await {
            Ok((200, body)) => {
                page = Some(body);
                break;
            }
            Ok((s, body)) => last = format!("HTTP {s}: {body}"),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let page = page.unwrap_or_else(|| {
        panic!(
            "no HTTPS answer through the gateway (last: {last}); serial tail:\n{}",
            tail(&stack.serial_log(&id), 40)
        )
    });
    let reg_time = registered.iter().find(|(a, _, _)| *a == app_id).map(|r| r.2).unwrap();
    eprintln!(
        "first HTTPS answer via {} {:?} after RegisterCvm ({:?} after the app answered on its host port)",
        Gateway::host(&app_id, dstack_e2e::stack::APP_PORT),
        std::time::SystemTime::now()
            .duration_since(reg_time)
            .unwrap_or_default(),
        t_https.elapsed(),
    );
    assert!(page.contains(greeting), "page: {page}");

    // A name for an app that is not registered gets no page.
    let other = "0".repeat(40);
    assert!(
        !matches!(gw.get(&other, dstack_e2e::stack::APP_PORT, "/").await, Ok((200, _))),
        "an unknown app must not be served"
    );
}
