//! A VM's module state on disk, so it survives a restart of the process that hosts the module (the VM
//! manager re-adopting a VM that kept running): a TD's registers live as long as the TD, not as long as the
//! VMM's helper process. Without it a re-adopted VM would come back with RTMR3 reset while its own event log
//! still lists every earlier extension, and each of its later quotes would fail verification.
//!
//! Format (JSON lines, one file per VM): the [`InitialState`] the module started from, then one [`TdxEvent`]
//! per accepted extension, appended *before* the registers change, so the file never holds less than what the
//! guest was told succeeded. A torn last line (the host process killed mid-write, the extension never
//! acknowledged) is dropped on resume.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use dstack_measurements::eventlog::{TdxEvent, extend};
use dstack_measurements::sim::SimulatedQuoteSigner;

use crate::{InitialState, SimTdx, SimTdxError, io_err};

/// The open journal of one module.
#[derive(Debug)]
pub(crate) struct Journal(File);

impl Journal {
    /// Records an accepted extension (before it is applied).
    pub(crate) fn record(&mut self, event: &TdxEvent) -> Result<(), SimTdxError> {
        let mut line = serde_json::to_vec(event).map_err(|e| SimTdxError::BootLog(format!("journal entry: {e}")))?;
        line.push(b'\n');
        self.0.write_all(&line).map_err(io_err("writing the module journal"))
    }
}

impl SimTdx {
    /// A module for a VM that starts booting now, recording `init` and every later extension in `path`
    /// (replaced if it exists: a new boot starts from the initial registers).
    pub fn new_journaled(init: &InitialState, signer: SimulatedQuoteSigner, path: &Path) -> Result<Self, SimTdxError> {
        let module = Self::new(init, signer)?;
        let mut first = serde_json::to_vec(init).map_err(|e| SimTdxError::BootLog(format!("journal header: {e}")))?;
        first.push(b'\n');
        let mut file = private_file(path, true)?;
        file.write_all(&first)
            .map_err(io_err(format!("writing {}", path.display())))?;
        module.lock().journal = Some(Journal(file));
        Ok(module)
    }

    /// The module of a VM that kept running while its host process restarted: the registers and runtime log
    /// are rebuilt from the journal at `path`, and later extensions are appended to it.
    pub fn resume(signer: SimulatedQuoteSigner, path: &Path) -> Result<Self, SimTdxError> {
        let text = std::fs::read_to_string(path).map_err(io_err(format!("reading {}", path.display())))?;
        let bad =
            |line: usize, e: serde_json::Error| SimTdxError::BootLog(format!("{} line {line}: {e}", path.display()));
        // Complete lines only: whatever follows the last newline was never acknowledged.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        let mut lines = complete.lines();
        let init: InitialState = serde_json::from_str(lines.next().unwrap_or_default()).map_err(|e| bad(1, e))?;
        let module = Self::new(&init, signer)?;
        {
            let mut state = module.lock();
            for (i, line) in lines.enumerate() {
                let event: TdxEvent = serde_json::from_str(line).map_err(|e| bad(i + 2, e))?;
                let digest: [u8; 48] = crate::array("journal digest", &event.digest)?;
                let Some(rtmr) = state.report.rtmr.get_mut(event.imr as usize).filter(|_| event.imr >= 2) else {
                    return Err(SimTdxError::BadRtmrIndex(event.imr));
                };
                extend(rtmr, &digest);
                state.runtime_log.push(event);
            }
        }
        // Drop a torn tail so appends start on a line of their own.
        let file = private_file(path, false)?;
        let keep = if complete.is_empty() { 0 } else { complete.len() + 1 };
        file.set_len(keep as u64)
            .map_err(io_err(format!("truncating {}", path.display())))?;
        let mut file = file;
        use std::io::{Seek, SeekFrom};
        file.seek(SeekFrom::End(0))
            .map_err(io_err(format!("seeking {}", path.display())))?;
        module.lock().journal = Some(Journal(file));
        Ok(module)
    }
}

/// Opens (creating, mode 0600) `path` for writing, truncated or not.
fn private_file(path: &Path, truncate: bool) -> Result<File, SimTdxError> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(truncate)
        .mode(0o600)
        .open(path)
        .map_err(io_err(format!("opening {}", path.display())))
}

#[cfg(test)]
mod tests {
    use dstack_measurements::eventlog::RuntimeEvent;

    use super::*;

    fn signer() -> SimulatedQuoteSigner {
        SimulatedQuoteSigner::generate().unwrap()
    }

    #[test]
    fn a_resumed_module_has_the_registers_and_log_of_the_running_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let init = InitialState {
            mrtd: vec![7; 48],
            ..Default::default()
        };
        let running = SimTdx::new_journaled(&init, signer(), &path).unwrap();
        let ev = RuntimeEvent::new("compose-hash", b"abc");
        running
            .extend_rtmr(3, &ev.digest(), Some(("compose-hash", b"abc")))
            .unwrap();
        running.extend_rtmr(2, &[9; 48], None).unwrap();

        let resumed = SimTdx::resume(signer(), &path).unwrap();
        assert_eq!(resumed.registers(), running.registers());
        assert_eq!(resumed.runtime_event_log(), running.runtime_event_log());
        // Extensions after the resume go on from there, and survive the next resume too.
        resumed
            .extend_rtmr(3, &RuntimeEvent::new("x", b"").digest(), Some(("x", b"")))
            .unwrap();
        running
            .extend_rtmr(3, &RuntimeEvent::new("x", b"").digest(), Some(("x", b"")))
            .unwrap();
        assert_eq!(resumed.registers(), running.registers());
        assert_eq!(
            SimTdx::resume(signer(), &path).unwrap().registers(),
            running.registers()
        );

        // A new boot starts over from the initial registers.
        let fresh = SimTdx::new_journaled(&init, signer(), &path).unwrap();
        assert_eq!(SimTdx::resume(signer(), &path).unwrap().registers(), fresh.registers());
        assert_ne!(fresh.registers(), running.registers());
    }

    #[test]
    fn a_torn_last_entry_is_dropped_and_a_corrupt_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let init = InitialState {
            mrtd: vec![1; 48],
            ..Default::default()
        };
        let m = SimTdx::new_journaled(&init, signer(), &path).unwrap();
        m.extend_rtmr(2, &[1; 48], None).unwrap();
        let before = m.registers();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"imr\":2,\"event_ty").unwrap();
        let resumed = SimTdx::resume(signer(), &path).unwrap();
        assert_eq!(resumed.registers(), before);
        resumed.extend_rtmr(2, &[2; 48], None).unwrap();
        assert_eq!(
            SimTdx::resume(signer(), &path).unwrap().registers(),
            resumed.registers()
        );

        let header = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .to_owned();
        std::fs::write(&path, format!("{header}\nnot json\n")).unwrap();
        let e = SimTdx::resume(signer(), &path).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
