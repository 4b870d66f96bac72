//! Shared fixtures: an in-process simulated TDX module with a boot log and dstack runtime events, and RA-TLS
//! certificates whose quotes it signs.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dstack_measurements::eventlog::TdxEvent;
use dstack_ra_tls::{AttestationPolicy, AttestationVerifier, CertAttestation, CertRequest, ra_tls_report_data};
use dstack_sim_tdx::{SimTdx, fixture};
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
    let sim = fixture::booted(0x11, 0x50).unwrap();
    fixture::measure_dstack_boot(&sim, &APP_ID, &COMPOSE_HASH, &INSTANCE_ID).unwrap();
    sim
}

pub fn full_log(sim: &SimTdx) -> Vec<TdxEvent> {
    sim.full_event_log()
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
