//! The QMP client against a real QEMU (paused, no guest): capabilities negotiation, `system_powerdown`
//! accepted, and `quit` ends the process. Skipped loudly when QEMU is absent (fails under
//! `DSTACK_REQUIRE_FIXTURES=1`). `DSTACK_QEMU` overrides the binary (default `qemu-system-x86_64` on PATH;
//! Debian package `qemu-system-x86`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dstack_host_vmm::manager::qmp::{Qmp, system_powerdown};

fn qemu() -> Option<String> {
    let bin = std::env::var("DSTACK_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let found = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some(bin);
    }
    if std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref() == Ok("1") {
        panic!("{bin} not found and DSTACK_REQUIRE_FIXTURES=1");
    }
    eprintln!("SKIP qmp_qemu: {bin} not found (install qemu-system-x86 or set DSTACK_QEMU)");
    None
}

#[tokio::test]
async fn powerdown_and_quit_on_real_qemu() {
    let Some(bin) = qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut child = Command::new(&bin)
        .args([
            "-accel",
            "tcg",
            "-machine",
            "q35",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64",
            "-S",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "QEMU did not create {}", sock.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    system_powerdown(&sock, Duration::from_secs(10)).await.unwrap();
    let mut qmp = Qmp::connect(&sock).await.unwrap();
    let status = qmp.execute("query-status").await.unwrap();
    assert_eq!(status["status"], "prelaunch", "{status}");
    let _ = qmp.execute("quit").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "QEMU exit {st}");
            break;
        }
        assert!(Instant::now() < deadline, "QEMU did not quit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
