//! The KMS's TLS server configuration (rustls, ring).
//!
//! Server certificate: `rpc.crt` followed by the root CA certificate.
//!
//! Client certificates are optional at the TLS layer (dstack: `[rpc.tls.mutual] mandatory = false`), because
//! `GetMeta`, `GetTempCaCert` and `GetAppEnvEncryptPubKey` are public. A presented certificate is accepted
//! when it chains to the temp CA (how dstack CVMs mint their client certificates) or when it is a self-signed
//! certificate carrying a TDX quote; rustls checks the handshake signature, proving possession of the key.
//! The attestation itself (quote, key binding, event-log replay) is verified by the handler of each method
//! that needs an attested caller, with the same [`dstack_ra_tls::AttestationVerifier`], so that a refusal
//! reaches the caller with its reason instead of a bare TLS alert.

use std::sync::Arc;

use dstack_ra_tls::parse_cert;
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};

use crate::KmsError;
use crate::store::KeyMaterial;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts temp-CA-issued or self-signed attested client certificates; never requires one.
#[derive(Debug)]
pub struct KmsClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    provider: Arc<CryptoProvider>,
}

impl KmsClientVerifier {
    pub fn new(tmp_ca: CertificateDer<'static>) -> Result<Arc<Self>, KmsError> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        roots.add(tmp_ca).map_err(|e| KmsError::Tls(format!("temp CA: {e}")))?;
        let chain = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .allow_unauthenticated()
            .build()
            .map_err(|e| KmsError::Tls(e.to_string()))?;
        Ok(Arc::new(Self { chain, provider }))
    }
}

impl ClientCertVerifier for KmsClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a CVM presents its self-signed RA-TLS certificate as well.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let chain_err = match self.chain.verify_client_cert(end_entity, intermediates, now) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let Ok(parsed) = parse_cert(end_entity) else {
            return Err(chain_err);
        };
        if !parsed.self_issued || !intermediates.is_empty() || parsed.quote.is_none() {
            return Err(chain_err);
        }
        let secs = now.as_secs();
        if secs < parsed.not_before || secs > parsed.not_after {
            return Err(Error::InvalidCertificate(CertificateError::Expired));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn pem_cert(pem: &str) -> Result<CertificateDer<'static>, KmsError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| KmsError::Tls(format!("certificate PEM: {e}")))
}

/// The rustls server configuration for the KMS RPC.
pub fn server_config(keys: &KeyMaterial) -> Result<Arc<rustls::ServerConfig>, KmsError> {
    let verifier = KmsClientVerifier::new(keys.tmp_ca.cert_der().clone())?;
    let chain = vec![pem_cert(&keys.rpc_cert_pem)?, keys.root_ca.cert_der().clone()];
    let key_der = rcgen::KeyPair::from_pem(&keys.rpc_key_pem)
        .map_err(|e| KmsError::Tls(format!("rpc.key: {e}")))?
        .serialize_der();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der));
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| KmsError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| KmsError::Tls(e.to_string()))?;
    Ok(Arc::new(cfg))
}
