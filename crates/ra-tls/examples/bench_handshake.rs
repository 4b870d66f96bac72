//! Mutual RA-TLS handshake over loopback with full verification (chain, simulated quote, key binding, event-log
//! replay) on both sides: `cargo run --release -p dstack-ra-tls --example bench_handshake`.
//!
//! "cold" uses fresh attestation verifiers for every connection (nothing cached); "warm" reuses them, so the
//! certificate-hash cache answers after the first handshake.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dstack_measurements::eventlog::RuntimeEvent;
use dstack_ra_tls::tls::RaTlsVerifierConfig;
use dstack_ra_tls::{
    AttestationPolicy, AttestationVerifier, CaCert, CertAttestation, CertRequest, RaTlsClientVerifier,
    RaTlsServerVerifier, ra_tls_report_data,
};
use dstack_sim_tdx::SimTdx;
use rcgen::{KeyPair, PublicKeyData};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key")
}

fn attested(sim: &SimTdx, k: &KeyPair) -> CertRequest {
    let log = sim.full_event_log();
    CertRequest {
        subject: "bench".into(),
        alt_names: vec!["kms.test".into()],
        usage_server_auth: true,
        usage_client_auth: true,
        attestation: Some(CertAttestation {
            quote: sim
                .quote(&ra_tls_report_data(&k.subject_public_key_info()))
                .expect("quote"),
            event_log: log,
        }),
        ..Default::default()
    }
}

fn pk(k: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.serialize_der()))
}

#[tokio::main]
async fn main() {
    let sim = dstack_sim_tdx::fixture::booted(1, 0).expect("sim");
    for (name, payload) in [
        ("app-id", vec![7u8; 20]),
        ("compose-hash", vec![8; 32]),
        ("instance-id", vec![9; 20]),
    ] {
        let ev = RuntimeEvent::new(name, payload.clone());
        sim.extend_rtmr(3, &ev.digest(), Some((name, &payload)))
            .expect("extend");
    }
    let ca = CaCert::self_signed(
        &CertRequest {
            subject: "bench CA".into(),
            ..Default::default()
        },
        key(),
    )
    .expect("ca");
    let (skey, ckey) = (key(), key());
    let scert = ca.issue(&attested(&sim, &skey), &skey).expect("server cert");
    let ccert = attested(&sim, &ckey).self_signed(&ckey).expect("client cert");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let policy = AttestationPolicy {
        allow_simulated: true,
        simulated_roots: vec![sim.root_pin()],
        ..Default::default()
    };
    let config = |accept_self_signed| RaTlsVerifierConfig {
        roots: vec![ca.cert_der().clone()],
        accept_self_signed,
        require_attestation: true,
    };
    let make = |server_att: Arc<AttestationVerifier>, client_att: Arc<AttestationVerifier>| {
        let s = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(RaTlsClientVerifier::new(config(true), server_att).expect("cv"))
            .with_single_cert(vec![scert.der().clone()], pk(&skey))
            .expect("server config");
        let c = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(RaTlsServerVerifier::new(config(false), client_att).expect("sv"))
            .with_client_auth_cert(vec![ccert.der().clone()], pk(&ckey))
            .expect("client config");
        (
            tokio_rustls::TlsAcceptor::from(Arc::new(s)),
            tokio_rustls::TlsConnector::from(Arc::new(c)),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let n = 200u32;
    for warm in [false, true] {
        let shared = (
            Arc::new(AttestationVerifier::new(policy.clone())),
            Arc::new(AttestationVerifier::new(policy.clone())),
        );
        let mut total = Duration::ZERO;
        let mut worst = Duration::ZERO;
        for _ in 0..n {
            let (sa, ca_) = if warm {
                (Arc::clone(&shared.0), Arc::clone(&shared.1))
            } else {
                (
                    Arc::new(AttestationVerifier::new(policy.clone())),
                    Arc::new(AttestationVerifier::new(policy.clone())),
                )
            };
            let (acceptor, connector) = make(sa, ca_);
            let start = Instant::now();
            let server = async {
                let (tcp, _) = listener.accept().await.expect("accept");
                let mut tls = acceptor.accept(tcp).await.expect("server handshake");
                let mut b = [0u8; 1];
                tls.read_exact(&mut b).await.expect("read");
                tls.write_all(&b).await.expect("write");
            };
            let client = async {
                let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
                tcp.set_nodelay(true).expect("nodelay");
                let name = ServerName::try_from("kms.test").expect("name");
                let mut tls = connector.connect(name, tcp).await.expect("client handshake");
                tls.write_all(b"x").await.expect("write");
                let mut b = [0u8; 1];
                tls.read_exact(&mut b).await.expect("read");
            };
            tokio::join!(server, client);
            let took = start.elapsed();
            total += took;
            worst = worst.max(took);
        }
        let label = if warm {
            "warm (cached attestation)"
        } else {
            "cold (full verification both sides)"
        };
        println!(
            "mutual RA-TLS handshake + 1-byte echo, {label}: mean {:?}, max {worst:?} over {n}",
            total / n
        );
    }
}
