//! Binary-level fault injection shared by the kill tests: the real `dstack-kms` started with its log, killed on
//! drop, and SIGKILLed the moment a condition on its files holds.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A KMS process a test started; SIGKILLed on drop if still running.
pub struct KmsProc(pub Child);

impl Drop for KmsProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `dstack-kms --config <cfg>` with its log (stderr) appended to `log`.
pub fn spawn_kms(cfg: &Path, log: &Path) -> KmsProc {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    KmsProc(
        Command::new(env!("CARGO_BIN_EXE_dstack-kms"))
            .arg("--config")
            .arg(cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// Busy-polls `hit` and SIGKILLs `kms` as soon as it holds (so the kill lands within microseconds of what it
/// watches). Fails when the process exits first or `hit` never holds within `within`; `what` names the kill
/// point and `log` (the process log) is shown either way.
pub fn kill_when(kms: &mut KmsProc, what: &str, within: Duration, log: &Path, mut hit: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    while !hit() {
        assert!(
            kms.0.try_wait().unwrap().is_none(),
            "KMS exited before {what}: {}",
            log_text()
        );
        assert!(Instant::now() < deadline, "no {what} within {within:?}: {}", log_text());
        std::hint::spin_loop();
    }
    kms.0.kill().unwrap();
    kms.0.wait().unwrap();
}
