//! Simulated-TDX fixtures: a booted in-process module and RA-TLS certificates it quotes for.

use dstack_gateway::attest::ServerIdentity;
use dstack_measurements::eventlog::TdxEvent;
use dstack_ra_tls::{CertAttestation, CertRequest, ra_tls_report_data};
use dstack_sim_tdx::{SimTdx, fixture};
use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::CertificateDer;

pub const APP_ID: [u8; 20] = [0xa1; 20];
pub const INSTANCE_ID: [u8; 20] = [0x1d; 20];
pub const DOMAIN: &str = "gateway.test";

pub fn booted_sim() -> SimTdx {
    let sim = fixture::booted(0x11, 0x50).unwrap();
    fixture::measure_dstack_boot(&sim, &APP_ID, &[0xc0; 32], &INSTANCE_ID).unwrap();
    sim
}

/// A self-signed RA-TLS client certificate; `tamper` may edit the event log after quoting.
pub fn client_cert(sim: &SimTdx, tamper: impl FnOnce(&mut Vec<TdxEvent>)) -> (CertificateDer<'static>, KeyPair) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let rd = ra_tls_report_data(&key.subject_public_key_info());
    let mut log = sim.full_event_log();
    tamper(&mut log);
    let req = CertRequest {
        subject: "dstack-guest-agent".into(),
        usage_client_auth: true,
        attestation: Some(CertAttestation {
            quote: sim.quote(&rd).unwrap(),
            event_log: log,
        }),
        ..Default::default()
    };
    let cert = req.self_signed(&key).unwrap();
    (cert.der().clone(), key)
}

/// A server identity issued by a fresh test CA, loaded from PEM files as the binary does; returns
/// it with the CA certificate to trust.
pub fn server_identity() -> (ServerIdentity, CertificateDer<'static>) {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![DOMAIN.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.path().join("rpc.crt"), leaf.pem() + &ca.pem()).unwrap();
    std::fs::write(dir.path().join("rpc.key"), key.serialize_pem()).unwrap();
    let id = ServerIdentity::load(&dir.path().join("rpc.crt"), &dir.path().join("rpc.key")).unwrap();
    (id, ca.der().clone())
}
