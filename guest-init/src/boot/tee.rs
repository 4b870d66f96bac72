//! The production [`Measurer`]: dstack runtime events extended into RTMR3 of the real TEE (TDX, or the
//! simulated TDX module named by `dstack.tee=`) through `crates/tee`'s [`RuntimeEventLog`], which also
//! persists the dstack JSON lines (`/run/log/dstack/runtime_events.log`) verifiers replay.
//!
//! The log is created on the first event: its digest version comes from app-compose's `event_log_version`,
//! which is only known after intake. A later event asking for another version fails closed (one log, one
//! digest format).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use dstack_tee::{EventLogVersion as TeeVersion, RuntimeEventLog, Tee, TeeRequest};
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

/// Why PID 1 cannot use a TEE selector for itself.
pub fn refuse_agent_selector(source: &str, request: &TeeRequest) -> Result<(), String> {
    match request {
        TeeRequest::Agent(socket) => Err(format!(
            "{source}: agent:{} selects the guest agent's socket, which guest-init itself serves (it IS the agent); \
             guest-init needs the CVM's own TEE: tdx, simulated:vsock:<cid>:<port>, simulated:unix:<path> or auto \
             (agent:<socket> is for apps inside the CVM, e.g. the KMS or gateway appliance)",
            socket.display()
        )),
        _ => Ok(()),
    }
}

/// The TEE PID 1 asks for: `dstack.tee=` on the kernel command line (`cmdline`, already parsed), else the
/// host config's `tee` (the VM manager names its simulated TDX module there), else auto. The guest agent
/// selector is refused from either source: guest-init would be waiting on its own socket.
pub fn own_tee_request(cmdline: TeeRequest, sys_config_tee: Option<&str>) -> Result<TeeRequest, String> {
    refuse_agent_selector("kernel command line dstack.tee", &cmdline)?;
    let request = match (cmdline, sys_config_tee) {
        (TeeRequest::Auto, Some(sel)) => TeeRequest::parse(sel).map_err(|e| format!("sys-config tee: {e}"))?,
        (request, _) => request,
    };
    refuse_agent_selector("sys-config tee", &request)?;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_selector_is_refused_for_pid1_from_either_source() {
        let agent = || TeeRequest::Agent("/var/run/dstack.sock".into());
        let e = own_tee_request(agent(), None).unwrap_err();
        assert!(
            e.contains("kernel command line") && e.contains("agent:/var/run/dstack.sock") && e.contains("IS the agent"),
            "{e}"
        );
        let e = own_tee_request(TeeRequest::Auto, Some("agent:/run/x.sock")).unwrap_err();
        assert!(e.starts_with("sys-config tee: agent:/run/x.sock"), "{e}");
        // The command line wins over the host config (as before); valid selectors pass through.
        assert_eq!(
            own_tee_request(TeeRequest::Tdx, Some("agent:/x")).unwrap(),
            TeeRequest::Tdx
        );
        assert_eq!(
            own_tee_request(TeeRequest::Auto, Some("simulated:vsock:2:10001")).unwrap(),
            TeeRequest::parse("simulated:vsock:2:10001").unwrap()
        );
        assert_eq!(own_tee_request(TeeRequest::Auto, None).unwrap(), TeeRequest::Auto);
        assert!(
            own_tee_request(TeeRequest::Auto, Some("bogus"))
                .unwrap_err()
                .starts_with("sys-config tee:")
        );
    }
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
