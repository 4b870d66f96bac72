//! Shared fixtures: an in-process simulated TDX module with a boot log and dstack runtime events, and RA-TLS
//! certificates whose quotes it signs.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dstack_measurements::eventlog::{RuntimeEvent, TdxEvent};
use dstack_measurements::sim::SimulatedQuoteSigner;
use dstack_ra_tls::{AttestationPolicy, AttestationVerifier, CertAttestation, CertRequest, ra_tls_report_data};
use dstack_sim_tdx::{InitialState, SimTdx};
use rcgen::KeyPair;

pub const APP_ID: [u8; 20] = [0xa1; 20];
pub const COMPOSE_HASH: [u8; 32] = [0xc0; 32];
pub const INSTANCE_ID: [u8; 20] = [0x1d; 20];

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

pub fn key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

/// A module that booted (three boot events) and ran dstack's boot-time runtime events.
pub fn booted_sim() -> SimTdx {
    let boot = (0..3u32)
        .map(|imr| TdxEvent {
            imr,
            event_type: 0x8000_0001,
            digest: vec![imr as u8 + 0x50; 48],
            event: String::new(),
            event_payload: Vec::new(),
            version: None,
        })
        .collect();
    let init = InitialState {
        mrtd: vec![0x11; 48],
        boot_event_log: boot,
        ..Default::default()
    };
    let sim = SimTdx::new(&init, SimulatedQuoteSigner::generate().unwrap()).unwrap();
    for (name, payload) in [
        ("system-preparing", &b""[..]),
        ("app-id", &APP_ID[..]),
        ("compose-hash", &COMPOSE_HASH[..]),
        ("instance-id", &INSTANCE_ID[..]),
        ("boot-mr-done", &b""[..]),
        ("key-provider", &br#"{"name":"kms","id":"00"}"#[..]),
        ("system-ready", &b""[..]),
    ] {
        let ev = RuntimeEvent::new(name, payload);
        sim.extend_rtmr(3, &ev.digest(), Some((name, payload))).unwrap();
    }
    sim
}

pub fn full_log(sim: &SimTdx) -> Vec<TdxEvent> {
    let mut log = sim.boot_event_log();
    log.extend(sim.runtime_event_log());
    log
}

/// The attestation for `key`'s certificate.
pub fn attestation_for(sim: &SimTdx, key: &KeyPair) -> CertAttestation {
    use rcgen::PublicKeyData;
    let rd = ra_tls_report_data(&key.subject_public_key_info());
    CertAttestation {
        quote: sim.quote(&rd).unwrap(),
        event_log: full_log(sim),
    }
}

pub fn leaf_request(att: Option<CertAttestation>) -> CertRequest {
    CertRequest {
        subject: "ra-tls leaf".into(),
        alt_names: vec!["kms.test".into()],
        usage_server_auth: true,
        usage_client_auth: true,
        special_usage: Some("kms:rpc".into()),
        attestation: att,
        ..Default::default()
    }
}

pub fn policy(sim: &SimTdx, allow_simulated: bool) -> AttestationPolicy {
    AttestationPolicy {
        allow_simulated,
        simulated_roots: vec![sim.root_pin()],
        ..Default::default()
    }
}

pub fn verifier(sim: &SimTdx, allow_simulated: bool) -> Arc<AttestationVerifier> {
    Arc::new(AttestationVerifier::new(policy(sim, allow_simulated)))
}
