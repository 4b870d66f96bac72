//! Gateway restart: the app is reachable through the gateway over HTTPS; the gateway is killed (tasks
//! aborted, WireGuard device and sockets closed, its in-memory peer table lost) and a fresh one starts from
//! the same configuration, state directory and keys on the same ports. Nothing on the host tells the CVM:
//! it must notice by itself (guest-init's gateway refresher: a silent tunnel is probed after 25 s and a
//! probe unanswered for 10 s triggers `RegisterCvm`; the periodic refresh every 60 s ± 10 % is the backstop),
//! register again with the same WireGuard key, and the app must answer through the gateway again within a
//! bounded time.
//!
//! Needs a guest image whose guest-init has the refresher (`cargo xtask test` builds it). Inputs: as
//! `full_stack.rs`'s gateway test (the `dstack_e2e` crate docs; Debian `pebble`, root, `/dev/net/tun`);
//! missing inputs: loud SKIP, or failure under `DSTACK_REQUIRE_FIXTURES=1`. One CVM boot under TCG, then the
//! restart; about 3 minutes here.

use std::time::{Duration, Instant};

use dstack_e2e::stack::{APP_PORT, AppSpec, free_port, http_get, skip_or_fail, tail};
use dstack_e2e::{Gateway, Inputs, KmsOptions, Stack, StackError};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Refresher worst case under the defaults (probe after 25 s of silence, 10 s to answer, checked every 5 s;
/// or the periodic refresh at 66 s at the latest) plus `RegisterCvm` (quote, RA-TLS) and a handshake under
/// TCG emulation, with margin.
const RECOVERY_BOUND: Duration = Duration::from_secs(150);

/// GET / through the gateway until it answers 200 or `limit` passes; the page and the time it took, or the
/// last failure.
async fn https_until_ok(gw: &Gateway, app_id: &str, limit: Duration) -> Result<(String, Duration), String> {
    let t = Instant::now();
    let mut last = String::from("no attempt");
    while t.elapsed() < limit {
        match gw.get(app_id, APP_PORT, "/").await {
            Ok((200, body)) => return Ok((body, t.elapsed())),
            Ok((s, body)) => last = format!("HTTP {s}: {}", body.chars().take(200).collect::<String>()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(last)
}

fn gateway_lines(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("gateway"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cvm_registers_again_after_a_gateway_restart_and_answers_through_it() {
    let inputs = match Inputs::from_env() {
        Ok(i) => i,
        Err(e) => return skip_or_fail("gateway_restart", &e),
    };
    if let Err(e) = dstack_e2e::pebble::binaries() {
        return skip_or_fail("gateway_restart", &e);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        return skip_or_fail(
            "gateway_restart",
            &StackError::Missing {
                what: "root and /dev/net/tun".into(),
                hint: "the gateway's WireGuard tun device lives in the host network namespace".into(),
            },
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let options = KmsOptions {
        allow_simulated: true,
        verify_image: false,
    };
    let mut stack = Stack::start_with_gateway(dir.path(), inputs, options).await.unwrap();
    let port = free_port().unwrap();
    let greeting = "hello again through the gateway";
    let mut app = AppSpec::demo(&stack.app_image, greeting, port);
    app.vcpus = 1;
    app.memory_mb = 2048;
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

    let gw = stack.gateway.as_ref().unwrap();
    let (page, took) = https_until_ok(gw, &app_id, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no HTTPS answer through the gateway before the restart (last: {e}); serial:\n{}",
                gateway_lines(&stack.serial_log(&id))
            )
        });
    assert!(page.contains(greeting), "{page}");
    let before: Vec<(String, String)> = gw
        .registered()
        .into_iter()
        .filter(|r| r.0 == app_id)
        .map(|r| (r.0, r.1))
        .collect();
    assert_eq!(before.len(), 1, "one registration before the restart: {before:?}");
    let tunnel_ip = before[0].1.clone();
    eprintln!("before the restart: answering via the gateway after {took:?}, tunnel address {tunnel_ip}");

    // Kill and restart the gateway: same config, state and keys; empty peer table.
    let restart_took = stack.gateway.as_mut().unwrap().restart().await.unwrap();
    let restarted = Instant::now();
    let gw = stack.gateway.as_ref().unwrap();
    assert!(
        gw.registered().is_empty(),
        "a restarted gateway starts without peers: {:?}",
        gw.registered()
    );
    assert!(
        !matches!(gw.get(&app_id, APP_PORT, "/").await, Ok((200, _))),
        "right after the restart the gateway must not know the app"
    );

    // The CVM registers again by itself.
    let mut registered_after = None;
    while restarted.elapsed() < RECOVERY_BOUND {
        if let Some(r) = gw.registered().into_iter().find(|r| r.0 == app_id) {
            registered_after = Some((restarted.elapsed(), r.1));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = stack.serial_log(&id);
    let (reg_took, ip) = registered_after.unwrap_or_else(|| {
        panic!(
            "the CVM did not register again within {RECOVERY_BOUND:?} of the gateway restart; its gateway \
             log lines:\n{}\nserial tail:\n{}",
            gateway_lines(&log),
            tail(&log, 20)
        )
    });
    assert_eq!(
        ip, tunnel_ip,
        "same WireGuard key and instance: the same tunnel address"
    );

    let left = RECOVERY_BOUND.saturating_sub(restarted.elapsed());
    let (page, https_took) = https_until_ok(gw, &app_id, left).await.unwrap_or_else(|e| {
        panic!(
            "registered again after {reg_took:?}, but no HTTPS answer through the gateway within \
             {RECOVERY_BOUND:?} of the restart (last: {e}); CVM gateway log lines:\n{}",
            gateway_lines(&stack.serial_log(&id))
        )
    });
    assert!(page.contains(greeting), "{page}");
    let log = stack.serial_log(&id);
    let reason = log
        .lines()
        .rfind(|l| l.contains("gateway: re-registered"))
        .unwrap_or("(no re-registration line in the serial log)")
        .to_owned();
    eprintln!(
        "gateway restart took {restart_took:?}; the CVM registered again {reg_took:?} after it, the app answered \
         through the gateway {:?} after it\nCVM: {reason}",
        reg_took + https_took
    );
    assert!(
        log.contains("gateway: re-registered"),
        "the guest logs its re-registration:\n{}",
        gateway_lines(&log)
    );
}
