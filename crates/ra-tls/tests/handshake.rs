//! Real TLS handshakes over loopback with both RA-TLS verifiers.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use dstack_ra_tls::tls::RaTlsVerifierConfig;
use dstack_ra_tls::{
    AttestationVerifier, CaCert, CertRequest, RaTlsClientVerifier, RaTlsError, RaTlsServerVerifier, peer_identity,
};
use rustls::{CertificateError, ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn new_ca() -> CaCert {
    named_ca("Dstack KMS CA")
}

fn named_ca(subject: &str) -> CaCert {
    CaCert::self_signed(
        &CertRequest {
            subject: subject.into(),
            org_name: Some("Dstack".into()),
            ..Default::default()
        },
        key(),
    )
    .unwrap()
}

fn pk(k: &rcgen::KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.serialize_der()))
}

struct Outcome {
    client: Result<(), std::io::Error>,
    server: Result<(), std::io::Error>,
}

/// Runs one handshake + echo; returns both sides' results and the verifiers for identity lookups.
async fn handshake(server_cfg: ServerConfig, client_cfg: ClientConfig) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(&buf).await?;
        tls.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let client = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_cfg))
            .connect(ServerName::try_from("kms.test").unwrap(), tcp)
            .await?;
        tls.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");
        Ok::<_, std::io::Error>(())
    }
    .await;
    let server = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    Outcome { client, server }
}

fn rustls_error(e: &std::io::Error) -> &rustls::Error {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .expect("a rustls error")
}

fn ra_error(e: &rustls::Error) -> Option<&RaTlsError> {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => o.0.downcast_ref::<RaTlsError>(),
        _ => None,
    }
}

#[tokio::test]
async fn mutual_ra_tls_handshake_with_identities() {
    let sim = booted_sim();
    let ca = new_ca();
    // Server: CA-issued RA-TLS cert. Client: self-signed RA-TLS cert.
    let skey = key();
    let scert = ca
        .issue(&leaf_request(Some(attestation_for(&sim, &skey))), &skey)
        .unwrap();
    let ckey = key();
    let ccert = leaf_request(Some(attestation_for(&sim, &ckey)))
        .self_signed(&ckey)
        .unwrap();

    let server_att = verifier(&sim, true);
    let client_verifier = RaTlsClientVerifier::new(
        RaTlsVerifierConfig {
            roots: vec![ca.cert_der().clone()],
            accept_self_signed: true,
            require_attestation: true,
        },
        Arc::clone(&server_att),
    )
    .unwrap();
    let server_cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(vec![scert.der().clone(), ca.cert_der().clone()], pk(&skey))
        .unwrap();

    let client_att = verifier(&sim, true);
    let server_verifier = RaTlsServerVerifier::new(
        RaTlsVerifierConfig {
            roots: vec![ca.cert_der().clone()],
            accept_self_signed: false,
            require_attestation: true,
        },
        Arc::clone(&client_att),
    )
    .unwrap();
    let client_cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(server_verifier)
        .with_client_auth_cert(vec![ccert.der().clone()], pk(&ckey))
        .unwrap();

    let out = handshake(server_cfg, client_cfg).await;
    out.client.unwrap();
    out.server.unwrap();
    // Identities come from the caches the handshake filled.
    let sid = peer_identity(&client_att, Some(&[scert.der().clone()]))
        .unwrap()
        .unwrap();
    assert!(client_att.cached(scert.der()).is_some());
    assert_eq!(sid.app_id, APP_ID);
    let cid = peer_identity(&server_att, Some(&[ccert.der().clone()]))
        .unwrap()
        .unwrap();
    assert_eq!(cid.instance_id, INSTANCE_ID);
    assert!(peer_identity(&server_att, None).unwrap().is_none());
}

fn client_cfg_trusting(roots: Vec<CertificateDer<'static>>, att: Arc<AttestationVerifier>) -> ClientConfig {
    let v = RaTlsServerVerifier::new(
        RaTlsVerifierConfig {
            roots,
            accept_self_signed: false,
            require_attestation: true,
        },
        att,
    )
    .unwrap();
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(v)
        .with_no_client_auth()
}

fn server_cfg(chain: Vec<CertificateDer<'static>>, k: &rcgen::KeyPair) -> ServerConfig {
    ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, pk(k))
        .unwrap()
}

#[tokio::test]
async fn expired_and_unknown_root_chains_are_refused() {
    let sim = booted_sim();
    let ca = new_ca();
    let k = key();
    let mut req = leaf_request(Some(attestation_for(&sim, &k)));
    req.not_before = Some(SystemTime::now() - Duration::from_secs(7200));
    req.not_after = Some(SystemTime::now() - Duration::from_secs(3600));
    let expired = ca.issue(&req, &k).unwrap();
    let out = handshake(
        server_cfg(vec![expired.der().clone()], &k),
        client_cfg_trusting(vec![ca.cert_der().clone()], verifier(&sim, true)),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. })
        ),
        "{err}"
    );

    // Same-named CA with another key: webpki finds it by name and the signature check fails.
    let impostor = new_ca();
    let cert = impostor
        .issue(&leaf_request(Some(attestation_for(&sim, &k))), &k)
        .unwrap();
    let out = handshake(
        server_cfg(vec![cert.der().clone()], &k),
        client_cfg_trusting(vec![ca.cert_der().clone()], verifier(&sim, true)),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(CertificateError::BadSignature)
        ),
        "{err}"
    );

    let other_ca = named_ca("Some Other CA");
    let cert = other_ca
        .issue(&leaf_request(Some(attestation_for(&sim, &k))), &k)
        .unwrap();
    let out = handshake(
        server_cfg(vec![cert.der().clone()], &k),
        client_cfg_trusting(vec![ca.cert_der().clone()], verifier(&sim, true)),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        ),
        "{err}"
    );

    // A self-signed leaf is refused when self-signed acceptance is off, even with a valid attestation.
    let selfsigned = leaf_request(Some(attestation_for(&sim, &k))).self_signed(&k).unwrap();
    let out = handshake(
        server_cfg(vec![selfsigned.der().clone()], &k),
        client_cfg_trusting(vec![ca.cert_der().clone()], verifier(&sim, true)),
    )
    .await;
    assert!(out.client.is_err());
}

#[tokio::test]
async fn attestation_failures_abort_the_handshake_with_the_specific_error() {
    let sim = booted_sim();
    let ca = new_ca();
    let k = key();
    let cert = ca.issue(&leaf_request(Some(attestation_for(&sim, &k))), &k).unwrap();
    // Chain is fine, but this client does not allow simulated quotes.
    let out = handshake(
        server_cfg(vec![cert.der().clone()], &k),
        client_cfg_trusting(vec![ca.cert_der().clone()], verifier(&sim, false)),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(
        matches!(ra_error(rustls_error(&err)), Some(RaTlsError::SimulatedNotAllowed)),
        "{err}"
    );

    // Chain is fine but the leaf has no attestation while one is required.
    let plain = ca.issue(&leaf_request(None), &k).unwrap();
    let out = handshake(
        server_cfg(vec![plain.der().clone()], &k),
        client_cfg_trusting(vec![ca.cert_der().clone()], verifier(&sim, true)),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(
        matches!(ra_error(rustls_error(&err)), Some(RaTlsError::MissingAttestation)),
        "{err}"
    );
}
