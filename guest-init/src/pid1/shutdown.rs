//! Orderly shutdown, written against a [`System`] trait so the ordering is testable with a fake process
//! table: stop the app (compose) → stop supervised services (last started first: agent, dockerd,
//! containerd) → SIGTERM everything left, wait → SIGKILL the rest → unmount in reverse mount order (busy
//! ones remounted read-only and detached) → close the data disk → sync → reboot(2).

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

/// What to do at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    PowerOff,
    Reboot,
}

/// The operations shutdown needs.
pub trait System {
    /// Stops the app (e.g. `docker compose stop`); errors are the implementor's to log.
    fn stop_app(&mut self);
    /// Stops supervised services in reverse start order.
    fn stop_services(&mut self);
    /// Sends `sig` to every process except PID 1.
    fn signal_all(&mut self, sig: Signal);
    /// Reaps until no process is left or `timeout` passes; true when none is left.
    fn wait_all_gone(&mut self, timeout: Duration) -> bool;
    /// Mount points that may be unmounted, in mount order.
    fn mounts(&mut self) -> Vec<PathBuf>;
    fn unmount(&mut self, path: &std::path::Path) -> Result<(), String>;
    /// Closes dm-crypt devices (after their filesystems are unmounted).
    fn close_devices(&mut self);
    fn sync(&mut self);
    fn power(&mut self, action: PowerAction);
}

/// Grace period between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(10);

/// Runs the whole sequence.
pub fn shutdown(sys: &mut impl System, action: PowerAction, reason: &str) {
    tracing::info!("shutdown ({action:?}): {reason}");
    sys.stop_app();
    sys.stop_services();
    sys.signal_all(Signal::SIGTERM);
    if !sys.wait_all_gone(TERM_GRACE) {
        tracing::warn!("processes left after {} s; sending SIGKILL", TERM_GRACE.as_secs());
        sys.signal_all(Signal::SIGKILL);
        if !sys.wait_all_gone(Duration::from_secs(5)) {
            tracing::error!("processes survived SIGKILL (uninterruptible?); continuing shutdown");
        }
    }
    let mounts = sys.mounts();
    for m in mounts.iter().rev() {
        match sys.unmount(m) {
            Ok(()) => tracing::info!("unmounted {}", m.display()),
            Err(e) => tracing::warn!("unmount {}: {e}", m.display()),
        }
    }
    sys.close_devices();
    sys.sync();
    tracing::info!(
        "{}",
        if action == PowerAction::PowerOff {
            "powering off"
        } else {
            "rebooting"
        }
    );
    sys.power(action);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake process table: each process either exits on SIGTERM or ignores it.
    struct Fake {
        procs: Vec<(i32, bool)>,
        log: Vec<String>,
    }

    impl System for Fake {
        fn stop_app(&mut self) {
            self.log.push("stop_app".into());
        }
        fn stop_services(&mut self) {
            self.log.push("stop_services".into());
        }
        fn signal_all(&mut self, sig: Signal) {
            self.log.push(format!("signal {sig}"));
            match sig {
                Signal::SIGTERM => self.procs.retain(|p| !p.1),
                Signal::SIGKILL => self.procs.clear(),
                _ => {}
            }
        }
        fn wait_all_gone(&mut self, _t: Duration) -> bool {
            self.log.push(format!("wait left={}", self.procs.len()));
            self.procs.is_empty()
        }
        fn mounts(&mut self) -> Vec<PathBuf> {
            ["/tmp", "/data", "/data/docker"].iter().map(PathBuf::from).collect()
        }
        fn unmount(&mut self, p: &std::path::Path) -> Result<(), String> {
            self.log.push(format!("umount {}", p.display()));
            Ok(())
        }
        fn close_devices(&mut self) {
            self.log.push("close_devices".into());
        }
        fn sync(&mut self) {
            self.log.push("sync".into());
        }
        fn power(&mut self, a: PowerAction) {
            self.log.push(format!("power {a:?}"));
        }
    }

    #[test]
    fn ordering_with_cooperative_processes() {
        let mut f = Fake {
            procs: vec![(10, true), (11, true)],
            log: vec![],
        };
        shutdown(&mut f, PowerAction::PowerOff, "test");
        assert_eq!(
            f.log,
            [
                "stop_app",
                "stop_services",
                "signal SIGTERM",
                "wait left=0",
                "umount /data/docker",
                "umount /data",
                "umount /tmp",
                "close_devices",
                "sync",
                "power PowerOff"
            ]
        );
    }

    #[test]
    fn stubborn_processes_get_sigkill_before_unmount() {
        let mut f = Fake {
            procs: vec![(10, true), (11, false)],
            log: vec![],
        };
        shutdown(&mut f, PowerAction::Reboot, "test");
        let pos = |s: &str| f.log.iter().position(|l| l == s).unwrap();
        assert!(pos("signal SIGTERM") < pos("wait left=1"));
        assert!(pos("wait left=1") < pos("signal SIGKILL"));
        assert!(pos("signal SIGKILL") < pos("umount /data/docker"));
        assert_eq!(f.log.last().unwrap(), "power Reboot");
    }
}
