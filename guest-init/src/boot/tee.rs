//! The production [`Measurer`]: dstack runtime events extended into RTMR3 of the real TEE (TDX, or the
//! simulated TDX module named by `dstack.tee=`) through `crates/tee`'s [`RuntimeEventLog`], which also
//! persists the dstack JSON lines (`/run/log/dstack/runtime_events.log`) verifiers replay.
//!
//! The log is created on the first event: its digest version comes from app-compose's `event_log_version`,
//! which is only known after intake. A later event asking for another version fails closed (one log, one
//! digest format).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use dstack_tee::{EventLogVersion as TeeVersion, RuntimeEventLog, Tee};
use dstack_types::EventLogVersion;
use tokio::runtime::Handle;

use super::measure::{MeasureError, Measurer, RuntimeEvent};

fn tee_version(v: EventLogVersion) -> TeeVersion {
    match v {
        EventLogVersion::V1 => TeeVersion::V1,
        EventLogVersion::V2 => TeeVersion::V2,
    }
}

/// Measures through a [`Tee`]; blocking calls run on `rt` (the boot thread is not a runtime thread).
#[derive(Debug)]
pub struct TeeMeasurer {
    tee: Arc<dyn Tee>,
    path: PathBuf,
    rt: Handle,
    log: OnceLock<(EventLogVersion, Arc<RuntimeEventLog>)>,
}

impl TeeMeasurer {
    /// `path`: where the runtime event log is persisted (`dstack_tee::RUNTIME_EVENT_LOG_FILE` in a CVM).
    pub fn new(tee: Arc<dyn Tee>, path: impl Into<PathBuf>, rt: Handle) -> Self {
        Self {
            tee,
            path: path.into(),
            rt,
            log: OnceLock::new(),
        }
    }

    /// The TEE.
    pub fn tee(&self) -> &Arc<dyn Tee> {
        &self.tee
    }

    /// The event log, once the first event was measured (the agent serves it).
    pub fn event_log(&self) -> Option<Arc<RuntimeEventLog>> {
        self.log.get().map(|(_, l)| Arc::clone(l))
    }

    fn log_for(&self, version: EventLogVersion, event: &str) -> Result<Arc<RuntimeEventLog>, MeasureError> {
        let (v, log) = self.log.get_or_init(|| {
            let log = RuntimeEventLog::new(Arc::clone(&self.tee), &self.path, tee_version(version));
            (version, Arc::new(log))
        });
        if *v != version {
            return Err(MeasureError {
                event: event.to_owned(),
                reason: format!("event log version changed from {v:?} to {version:?} during boot"),
            });
        }
        Ok(Arc::clone(log))
    }
}

impl Measurer for TeeMeasurer {
    fn measure(&self, version: EventLogVersion, event: &RuntimeEvent) -> Result<(), MeasureError> {
        let log = self.log_for(version, &event.name)?;
        tracing::info!("measure {} ({} bytes) into RTMR3", event.name, event.payload.len());
        self.rt
            .block_on(log.measure(&event.name, &event.payload))
            .map(|_| ())
            .map_err(|e| MeasureError {
                event: event.name.clone(),
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dstack_guest_agent::simulate::InProcessSimTee;
    use dstack_measurements::sim::SimulatedQuoteSigner;
    use dstack_sim_tdx::{InitialState, SimTdx};
    use sha2::{Digest, Sha384};

    #[test]
    fn measures_into_rtmr3_and_pins_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let sim = Arc::new(
            SimTdx::new(
                &InitialState {
                    mrtd: vec![1; 48],
                    ..Default::default()
                },
                SimulatedQuoteSigner::generate().unwrap(),
            )
            .unwrap(),
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let m = TeeMeasurer::new(
            Arc::new(InProcessSimTee(Arc::clone(&sim))),
            dir.path().join("log"),
            rt.handle().clone(),
        );
        assert!(m.event_log().is_none());
        let ev = RuntimeEvent::new("app-id", [0x11; 20]);
        m.measure(EventLogVersion::V1, &ev).unwrap();
        // RTMR3 = SHA384(0^48 || digest); the V1 digest of this event is pinned in measure.rs (Python hashlib).
        let digest = super::super::measure::digest(EventLogVersion::V1, &ev);
        let mut h = Sha384::new();
        h.update([0u8; 48]);
        h.update(digest);
        let want: [u8; 48] = h.finalize().into();
        assert_eq!(sim.registers().rtmr[3], want);
        let err = m.measure(EventLogVersion::V2, &ev).unwrap_err();
        assert!(err.reason.contains("version changed"), "{err}");
        assert_eq!(sim.registers().rtmr[3], want, "refused event not extended");
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
        assert_eq!(log.lines().count(), 1);
    }
}
