//! The simulated TDX module for one VM (ours; DESIGN.md §2).
//!
//! On hosts without TDX the host VMM runs a VM on plain KVM and gives it this module instead of the TDX module.
//! It holds what a TD's measurement registers would hold — MRTD, RTMR0-3, MRCONFIGID, MROWNER,
//! MROWNERCONFIG, TD attributes and XFAM — initialised from explicit values ([`InitialState`]: the VMM passes
//! the measurements it predicted for what it actually booted, plus the matching boot event log), extends RTMR2
//! and RTMR3 on request, keeps the boot and runtime event logs, and produces quotes in the genuine TDX v4
//! layout signed by [`dstack_measurements::sim::SimulatedQuoteSigner`]. Those quotes carry the simulator's QE
//! vendor id and certificate marker, so verifiers refuse them unless configured with `allow_simulated` *and* a
//! pinned simulator root ([`SimTdx::root_cert_pem`], also written to `<state dir>/sim-root.pem`); they then
//! report TCB status `Simulated`, never `UpToDate`.
//!
//! # Protocol
//!
//! pRPC (`crates/rpc/proto/sim_tdx.proto`, package `sim_tdx`, service `SimTdx`) over HTTP/1.1 on a unix socket
//! (the VMM exposes it to the guest over vsock; tests use the socket directly). Methods are served at the root:
//! `POST /<Method>` with a protobuf body, or JSON with `?json` (bytes as lowercase hex):
//!
//! | method | request | response | rules |
//! |---|---|---|---|
//! | `GetQuote` | `{report_data}` | `{quote}` | report_data ≤ 64 bytes, zero-padded |
//! | `ExtendRtmr` | `{index, digest, event?, payload?}` | `{}` | index 2 or 3; digest 48 bytes; with `event` on RTMR3 the digest must be the V1 or V2 runtime-event digest of (event, payload) |
//! | `GetRtmrs` | `{}` | `{mrtd, rtmr0..rtmr3, mr_config_id}` | |
//! | `GetBootEventLog` | `{}` | `{event_log}` | JSON array of dstack event-log entries (RTMR0-2) |
//! | `GetRuntimeEventLog` | `{}` | `{event_log}` | entries for every accepted `ExtendRtmr` |
//! | `Info` | `{}` | `{root_cert_pem, root_spki_sha256, simulated: true}` | |
//!
//! Errors are HTTP 400 with `{"error": …}` (JSON) or a protobuf `PrpcError`.

pub mod fixture;
mod journal;
mod service;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use dstack_measurements::eventlog::{
    DSTACK_RUNTIME_EVENT_TYPE, EV_EVENT_TAG, EventLogVersion, ReplayError, RuntimeEvent, TdxEvent, extend, replay,
};
use dstack_measurements::quote::TdReport;
use dstack_measurements::sim::{SignerError, SimRootPin, SimulatedQuoteSigner};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha384};

pub use service::{SimTdxService, router, serve_unix};

/// TD attributes of a production TD: only SEPT_VE_DISABLE (bit 28), little-endian.
pub const DEFAULT_TD_ATTRIBUTES: [u8; 8] = [0, 0, 0, 0x10, 0, 0, 0, 0];
/// XFAM 0x602e7 (x87, SSE, AVX, AVX-512 state, PKRU, AMX tile state), little-endian; what TDX guests commonly
/// run with.
pub const DEFAULT_XFAM: [u8; 8] = [0xe7, 0x02, 0x06, 0, 0, 0, 0, 0];
/// MRSEAM of the simulated module: SHA-384 of this label (no Intel module has it).
pub const SIM_MRSEAM_LABEL: &[u8] = b"dstack-rs simulated TDX module";
/// File in the state directory holding the signer's key material (mode 0600).
pub const SIGNER_FILE: &str = "sim-signer.pem";
/// File in the state directory with the root certificate verifiers pin (mode 0644).
pub const ROOT_CERT_FILE: &str = "sim-root.pem";

/// Errors of the simulated module.
#[derive(Debug, thiserror::Error)]
pub enum SimTdxError {
    #[error("{field}: expected {expected} bytes, got {got}")]
    Length {
        field: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("report_data is {0} bytes; at most 64 are allowed")]
    ReportDataTooLong(usize),
    #[error("RTMR{0} cannot be extended: only RTMR2 and RTMR3")]
    BadRtmrIndex(u32),
    #[error("digest of event {event:?} does not match its payload (neither the V1 nor the V2 runtime-event digest)")]
    EventDigestMismatch { event: String },
    #[error("boot event log: {0}")]
    BootLog(String),
    #[error("boot event log replays to a different {register} than the given value")]
    InconsistentBootLog { register: &'static str },
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("simulated quote signer: {0}")]
    Signer(#[from] SignerError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SimTdxError {
    let what = what.into();
    move |source| SimTdxError::Io { what, source }
}

/// What the module starts with: the measurements of what was booted (JSON for the binary; byte fields hex).
/// RTMR0-2 may be omitted when a boot event log is given (they are then its replay); when both are given they
/// must agree.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitialState {
    #[serde(with = "dstack_measurements::hexser")]
    pub mrtd: Vec<u8>,
    #[serde(default, with = "opt_hex", skip_serializing_if = "Option::is_none")]
    pub rtmr0: Option<Vec<u8>>,
    #[serde(default, with = "opt_hex", skip_serializing_if = "Option::is_none")]
    pub rtmr1: Option<Vec<u8>>,
    #[serde(default, with = "opt_hex", skip_serializing_if = "Option::is_none")]
    pub rtmr2: Option<Vec<u8>>,
    #[serde(default, with = "opt_hex", skip_serializing_if = "Option::is_none")]
    pub mr_config_id: Option<Vec<u8>>,
    #[serde(default, with = "opt_hex", skip_serializing_if = "Option::is_none")]
    pub mr_owner: Option<Vec<u8>>,
    #[serde(default, with = "opt_hex", skip_serializing_if = "Option::is_none")]
    pub mr_owner_config: Option<Vec<u8>>,
    /// Defaults to [`DEFAULT_TD_ATTRIBUTES`].
    #[serde(default, with = "opt_hex", skip_serializing_if = "Option::is_none")]
    pub td_attributes: Option<Vec<u8>>,
    /// Defaults to [`DEFAULT_XFAM`].
    #[serde(default, with = "opt_hex", skip_serializing_if = "Option::is_none")]
    pub xfam: Option<Vec<u8>>,
    /// Boot events (RTMR0-2), digests only, as dstack's JSON event log.
    #[serde(default)]
    pub boot_event_log: Vec<TdxEvent>,
}

mod opt_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => dstack_measurements::hexser::decode(&s)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

fn array<const N: usize>(field: &'static str, v: &[u8]) -> Result<[u8; N], SimTdxError> {
    v.try_into().map_err(|_| SimTdxError::Length {
        field,
        expected: N,
        got: v.len(),
    })
}

fn opt_array<const N: usize>(
    field: &'static str,
    v: &Option<Vec<u8>>,
    default: [u8; N],
) -> Result<[u8; N], SimTdxError> {
    v.as_deref().map_or(Ok(default), |b| array(field, b))
}

impl InitialState {
    /// Build the TD report (report data zero) this state describes, checking lengths and the boot log.
    pub fn to_report(&self) -> Result<TdReport, SimTdxError> {
        let mut r = TdReport::zeroed();
        r.mr_td = array("mrtd", &self.mrtd)?;
        r.mr_config_id = opt_array("mr_config_id", &self.mr_config_id, [0; 48])?;
        r.mr_owner = opt_array("mr_owner", &self.mr_owner, [0; 48])?;
        r.mr_owner_config = opt_array("mr_owner_config", &self.mr_owner_config, [0; 48])?;
        r.td_attributes = opt_array("td_attributes", &self.td_attributes, DEFAULT_TD_ATTRIBUTES)?;
        r.xfam = opt_array("xfam", &self.xfam, DEFAULT_XFAM)?;
        r.mr_seam = Sha384::digest(SIM_MRSEAM_LABEL).into();
        let given = [("rtmr0", &self.rtmr0), ("rtmr1", &self.rtmr1), ("rtmr2", &self.rtmr2)];
        if let Some((i, e)) = self.boot_event_log.iter().enumerate().find(|(_, e)| e.imr > 2) {
            return Err(SimTdxError::BootLog(format!(
                "event #{i} ({:?}) extends RTMR{}; boot events may only extend RTMR0-2",
                e.event, e.imr
            )));
        }
        let replayed = replay(&self.boot_event_log)?;
        for (i, (name, value)) in given.into_iter().enumerate() {
            match value {
                Some(v) => {
                    let v: [u8; 48] = array(name, v)?;
                    if !self.boot_event_log.is_empty() && replayed[i] != v {
                        return Err(SimTdxError::InconsistentBootLog { register: name });
                    }
                    r.rtmr[i] = v;
                }
                None => r.rtmr[i] = replayed[i],
            }
        }
        Ok(r)
    }

    /// Parse the JSON form.
    pub fn from_json(data: &[u8]) -> Result<Self, SimTdxError> {
        serde_json::from_slice(data).map_err(|e| SimTdxError::BootLog(format!("initial state JSON: {e}")))
    }
}

/// Current register values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registers {
    pub mrtd: [u8; 48],
    pub rtmr: [[u8; 48]; 4],
    pub mr_config_id: [u8; 48],
}

struct State {
    report: TdReport,
    boot_log: Vec<TdxEvent>,
    runtime_log: Vec<TdxEvent>,
    /// Where accepted extensions are recorded, if anywhere ([`SimTdx::new_journaled`]).
    journal: Option<journal::Journal>,
}

/// The simulated TDX module of one VM.
pub struct SimTdx {
    signer: SimulatedQuoteSigner,
    state: Mutex<State>,
}

impl std::fmt::Debug for SimTdx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimTdx")
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

impl SimTdx {
    /// A module with the given initial state and signer.
    pub fn new(init: &InitialState, signer: SimulatedQuoteSigner) -> Result<Self, SimTdxError> {
        let report = init.to_report()?;
        Ok(Self {
            signer,
            state: Mutex::new(State {
                report,
                boot_log: init.boot_event_log.clone(),
                runtime_log: Vec::new(),
                journal: None,
            }),
        })
    }

    /// A module whose signer lives in `state_dir` (created 0700; the key bundle is 0600 and reused across
    /// restarts), with the root certificate exported to `state_dir/sim-root.pem` for verifiers to pin.
    pub fn open(init: &InitialState, state_dir: &Path) -> Result<Self, SimTdxError> {
        Self::new(init, ensure_signer(state_dir)?)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the registers half-written (every update is one
        // assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A simulated v4 quote over the current registers with `report_data` (≤ 64 bytes, zero-padded).
    pub fn quote(&self, report_data: &[u8]) -> Result<Vec<u8>, SimTdxError> {
        if report_data.len() > 64 {
            return Err(SimTdxError::ReportDataTooLong(report_data.len()));
        }
        let mut report = self.lock().report.clone();
        report.report_data = [0; 64];
        report.report_data[..report_data.len()].copy_from_slice(report_data);
        Ok(self.signer.sign(&report)?)
    }

    /// `RTMR[index] ← SHA384(RTMR[index] ‖ digest)` for index 2 or 3, recording the event. With `event` on
    /// RTMR3, the digest must be the V1 or V2 runtime-event digest of `(event, payload)` and the entry is logged
    /// as a dstack runtime event of that version; otherwise an `EV_EVENT_TAG` entry with the digest is logged.
    pub fn extend_rtmr(&self, index: u32, digest: &[u8], event: Option<(&str, &[u8])>) -> Result<(), SimTdxError> {
        if !(2..=3).contains(&index) {
            return Err(SimTdxError::BadRtmrIndex(index));
        }
        let digest: [u8; 48] = array("digest", digest)?;
        let entry = match event {
            Some((name, payload)) if index == 3 => {
                let v1 = RuntimeEvent::new(name, payload);
                let v2 = v1.clone().with_version(EventLogVersion::V2);
                if v1.digest() == digest {
                    v1.to_tdx_event()
                } else if v2.digest() == digest {
                    v2.to_tdx_event()
                } else {
                    return Err(SimTdxError::EventDigestMismatch { event: name.to_owned() });
                }
            }
            other => TdxEvent {
                imr: index,
                event_type: EV_EVENT_TAG,
                digest: digest.to_vec(),
                event: other.map(|(n, _)| n.to_owned()).unwrap_or_default(),
                event_payload: other.map(|(_, p)| p.to_vec()).unwrap_or_default(),
                version: None,
            },
        };
        debug_assert!(entry.event_type != DSTACK_RUNTIME_EVENT_TYPE || entry.imr == 3);
        let mut state = self.lock();
        // Recorded first: the journal never holds less than what the guest was told succeeded.
        if let Some(j) = &mut state.journal {
            j.record(&entry)?;
        }
        if let Some(rtmr) = state.report.rtmr.get_mut(index as usize) {
            extend(rtmr, &digest);
        }
        state.runtime_log.push(entry);
        Ok(())
    }

    /// Current MRTD, RTMR0-3 and MRCONFIGID.
    pub fn registers(&self) -> Registers {
        let s = self.lock();
        Registers {
            mrtd: s.report.mr_td,
            rtmr: s.report.rtmr,
            mr_config_id: s.report.mr_config_id,
        }
    }

    /// The boot event log (RTMR0-2).
    pub fn boot_event_log(&self) -> Vec<TdxEvent> {
        self.lock().boot_log.clone()
    }

    /// Every extension accepted so far, in order.
    pub fn runtime_event_log(&self) -> Vec<TdxEvent> {
        self.lock().runtime_log.clone()
    }

    /// The boot events followed by the runtime events: the log that replays to all four RTMRs.
    pub fn full_event_log(&self) -> Vec<TdxEvent> {
        let state = self.lock();
        state.boot_log.iter().chain(&state.runtime_log).cloned().collect()
    }

    /// The simulated root certificate (PEM) verifiers pin.
    pub fn root_cert_pem(&self) -> &str {
        self.signer.root_cert_pem()
    }

    /// SHA-256 of the root's SubjectPublicKeyInfo.
    pub fn root_spki_sha256(&self) -> [u8; 32] {
        self.signer.root_pin_spki_sha256()
    }

    /// The pin for `VerifyOptions::simulated_roots`.
    pub fn root_pin(&self) -> SimRootPin {
        self.signer.root_pin()
    }
}

/// Loads the signer kept in `state_dir` (generating it on first use) and exports its root certificate to
/// [`root_cert_path`], so verifiers can pin it before any VM starts.
pub fn ensure_signer(state_dir: &Path) -> Result<SimulatedQuoteSigner, SimTdxError> {
    create_private_dir(state_dir)?;
    let signer = SimulatedQuoteSigner::load_or_generate(&state_dir.join(SIGNER_FILE))?;
    let root_path = root_cert_path(state_dir);
    std::fs::write(&root_path, signer.root_cert_pem()).map_err(io_err(format!("writing {}", root_path.display())))?;
    Ok(signer)
}

/// Where [`SimTdx::open`] exports the root certificate.
pub fn root_cert_path(state_dir: &Path) -> PathBuf {
    state_dir.join(ROOT_CERT_FILE)
}

fn create_private_dir(dir: &Path) -> Result<(), SimTdxError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("setting the mode of {}", dir.display())))
}

#[cfg(test)]
mod tests;
