//! Ready-made simulated CVMs for tests and benchmarks of the components that verify attestation: a module that
//! "booted" (three boot events) and then measured dstack's boot-time runtime events, so its quotes and event
//! log replay and yield an app identity. Everything is labelled simulated; verifiers accept it only with the
//! module's root pinned.

use dstack_measurements::eventlog::{RuntimeEvent, TdxEvent};
use dstack_measurements::sim::SimulatedQuoteSigner;

use crate::{InitialState, SimTdx, SimTdxError};

/// A module with MRTD `[mrtd_byte; 48]` and one boot event per RTMR0-2 whose digest is
/// `[boot_digest_base + imr; 48]`, signing with a freshly generated simulated key.
pub fn booted(mrtd_byte: u8, boot_digest_base: u8) -> Result<SimTdx, SimTdxError> {
    let boot = (0..3u32)
        .map(|imr| TdxEvent {
            imr,
            event_type: 0x8000_0001,
            digest: vec![boot_digest_base.wrapping_add(imr as u8); 48],
            event: String::new(),
            event_payload: Vec::new(),
            version: None,
        })
        .collect();
    let init = InitialState {
        mrtd: vec![mrtd_byte; 48],
        boot_event_log: boot,
        ..Default::default()
    };
    SimTdx::new(&init, SimulatedQuoteSigner::generate()?)
}

/// Measures dstack's boot-time runtime events (V1 digests) into RTMR3, in dstack's order, with a `kms` key
/// provider.
pub fn measure_dstack_boot(
    sim: &SimTdx,
    app_id: &[u8; 20],
    compose_hash: &[u8; 32],
    instance_id: &[u8; 20],
) -> Result<(), SimTdxError> {
    for (name, payload) in [
        ("system-preparing", &b""[..]),
        ("app-id", &app_id[..]),
        ("compose-hash", &compose_hash[..]),
        ("instance-id", &instance_id[..]),
        ("boot-mr-done", &b""[..]),
        ("key-provider", &br#"{"name":"kms","id":"00"}"#[..]),
        ("system-ready", &b""[..]),
    ] {
        sim.extend_rtmr(3, &RuntimeEvent::new(name, payload).digest(), Some((name, payload)))?;
    }
    Ok(())
}
