//! Attestation verification of RA-TLS certificates: the valid case and every tampering case, each refused with
//! its own error.

mod common;

use std::sync::Arc;

use common::*;
use der::Encode;
use dstack_measurements::eventlog::EventLogVersion;
use dstack_measurements::verify::{TcbStatus, VerifyError};
use dstack_ra_tls::{AttestationPolicy, AttestationVerifier, CertAttestation, RaTlsError, oids, ra_tls_report_data};
use rcgen::PublicKeyData;
use sha2::{Digest, Sha256};

#[test]
fn valid_simulated_attestation_yields_the_identity() {
    let sim = booted_sim();
    let k = key();
    let cert = leaf_request(Some(attestation_for(&sim, &k))).self_signed(&k).unwrap();
    let v = verifier(&sim, true);
    let id = v.verify_cert(cert.der(), now()).unwrap().unwrap();
    assert_eq!(id.app_id, APP_ID);
    assert_eq!(id.compose_hash, COMPOSE_HASH);
    assert_eq!(id.instance_id, INSTANCE_ID);
    assert_eq!(id.key_provider_info, r#"{"name":"kms","id":"00"}"#);
    assert_eq!(id.tcb_status, TcbStatus::Simulated);
    assert!(id.simulated);
    assert_eq!(id.special_usage.as_deref(), Some("kms:rpc"));
    // device_id = sha256(PPID of the simulated PCK leaf): 32 bytes, the same for every quote of this module.
    assert_eq!(id.device_id.len(), 32);
    let other_quote = sim.quote(&[0; 64]).unwrap();
    assert_eq!(
        id.device_id,
        dstack_measurements::verify::self_reported_device_id(&other_quote)
    );
    // mr_aggregated = sha256(mrtd || rtmr0..3), computed here from the module's registers.
    let regs = sim.registers();
    let mut h = Sha256::new();
    h.update(regs.mrtd);
    for r in regs.rtmr {
        h.update(r);
    }
    assert_eq!(id.mr_aggregated, h.finalize().to_vec());
    // Second lookup is served from the cache (same allocation).
    let again = v.verify_cert(cert.der(), now()).unwrap().unwrap();
    assert!(Arc::ptr_eq(&id, &again));
    // A certificate without attestation is not an error at this layer.
    let plain = leaf_request(None).self_signed(&k).unwrap();
    assert!(v.verify_cert(plain.der(), now()).unwrap().is_none());
}

#[test]
fn wrong_key_binding_is_refused() {
    let sim = booted_sim();
    let k = key();
    // Report data over the right key but without the "ratls-cert:" tag.
    let mut rd = [0u8; 64];
    rd.copy_from_slice(&sha2::Sha512::digest(k.subject_public_key_info()));
    let att = CertAttestation {
        quote: sim.quote(&rd).unwrap(),
        event_log: full_log(&sim),
    };
    let cert = leaf_request(Some(att)).self_signed(&k).unwrap();
    let err = verifier(&sim, true).verify_cert(cert.der(), now()).unwrap_err();
    assert!(matches!(err, RaTlsError::KeyBinding { .. }), "{err}");
}

#[test]
fn quote_replayed_from_another_certificate_is_refused() {
    let sim = booted_sim();
    let (victim, attacker) = (key(), key());
    let stolen = attestation_for(&sim, &victim);
    let cert = leaf_request(Some(stolen)).self_signed(&attacker).unwrap();
    let err = verifier(&sim, true).verify_cert(cert.der(), now()).unwrap_err();
    match err {
        RaTlsError::KeyBinding { expected, found } => {
            assert_eq!(
                expected,
                hex::encode(ra_tls_report_data(&attacker.subject_public_key_info()))
            );
            assert_eq!(
                found,
                hex::encode(ra_tls_report_data(&victim.subject_public_key_info()))
            );
        }
        other => panic!("expected KeyBinding, got {other}"),
    }
}

#[test]
fn tampered_event_logs_are_refused() {
    let sim = booted_sim();
    let k = key();
    // A different app id in the log than the one measured into RTMR3.
    let mut att = attestation_for(&sim, &k);
    let app = att.event_log.iter_mut().find(|e| e.event == "app-id").unwrap();
    app.event_payload = vec![0xee; 20];
    app.digest.clear();
    let cert = leaf_request(Some(att)).self_signed(&k).unwrap();
    let err = verifier(&sim, true).verify_cert(cert.der(), now()).unwrap_err();
    assert!(
        matches!(err, RaTlsError::EventLogMismatch(ref m) if m.contains("rtmr3")),
        "{err}"
    );

    // A boot event with a different digest.
    let mut att = attestation_for(&sim, &k);
    att.event_log[1].digest[0] ^= 1;
    let cert = leaf_request(Some(att)).self_signed(&k).unwrap();
    let err = verifier(&sim, true).verify_cert(cert.der(), now()).unwrap_err();
    assert!(
        matches!(err, RaTlsError::EventLogMismatch(ref m) if m.contains("rtmr1")),
        "{err}"
    );

    // A dropped event.
    let mut att = attestation_for(&sim, &k);
    att.event_log.retain(|e| e.event != "instance-id");
    let cert = leaf_request(Some(att)).self_signed(&k).unwrap();
    assert!(matches!(
        verifier(&sim, true).verify_cert(cert.der(), now()),
        Err(RaTlsError::EventLogMismatch(_))
    ));

    // A V1 event relabelled as V2 changes its digest.
    let mut att = attestation_for(&sim, &k);
    let e = att.event_log.iter_mut().find(|e| e.event == "compose-hash").unwrap();
    e.version = Some(EventLogVersion::V2.number());
    e.digest.clear();
    let cert = leaf_request(Some(att)).self_signed(&k).unwrap();
    assert!(matches!(
        verifier(&sim, true).verify_cert(cert.der(), now()),
        Err(RaTlsError::EventLogMismatch(_))
    ));
}

#[test]
fn simulated_quotes_need_allow_simulated_and_a_pinned_root() {
    let sim = booted_sim();
    let k = key();
    let cert = leaf_request(Some(attestation_for(&sim, &k))).self_signed(&k).unwrap();
    let err = verifier(&sim, false).verify_cert(cert.der(), now()).unwrap_err();
    assert!(matches!(err, RaTlsError::SimulatedNotAllowed), "{err}");

    let other = booted_sim();
    let err = verifier(&other, true).verify_cert(cert.der(), now()).unwrap_err();
    assert!(
        matches!(err, RaTlsError::Quote(VerifyError::Simulated(_))) && err.to_string().contains("not among the pinned"),
        "{err}"
    );
}

#[test]
fn usage_and_missing_parts_are_checked() {
    let sim = booted_sim();
    let k = key();
    let att = attestation_for(&sim, &k);
    let mut req = leaf_request(Some(att.clone()));
    req.special_usage = Some("app:custom".into());
    let cert = req.self_signed(&k).unwrap();
    let strict = AttestationVerifier::new(AttestationPolicy {
        required_usage: Some("kms:rpc".into()),
        ..policy(&sim, true)
    });
    assert!(matches!(
        strict.verify_cert(cert.der(), now()),
        Err(RaTlsError::UsageMismatch { .. })
    ));

    // Quote without event log.
    let mut p = leaf_request(None).to_params().unwrap();
    let octets = |b: &[u8]| der::asn1::OctetString::new(b).unwrap().to_der().unwrap();
    p.custom_extensions.push(rcgen::CustomExtension::from_oid_content(
        oids::TDX_QUOTE,
        octets(&att.quote),
    ));
    let cert = p.self_signed(&k).unwrap();
    assert!(matches!(
        verifier(&sim, true).verify_cert(cert.der(), now()),
        Err(RaTlsError::MissingEventLog)
    ));

    // Only a versioned attestation (.1.8).
    let mut p = leaf_request(None).to_params().unwrap();
    p.custom_extensions.push(rcgen::CustomExtension::from_oid_content(
        oids::ATTESTATION,
        octets(&[0]),
    ));
    let cert = p.self_signed(&k).unwrap();
    assert!(matches!(
        verifier(&sim, true).verify_cert(cert.der(), now()),
        Err(RaTlsError::UnsupportedAttestationFormat)
    ));
}
