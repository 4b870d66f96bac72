//! rustls verifiers (ring provider) that check the certificate chain and then the RA-TLS attestation.
//!
//! Chain: the leaf must chain to one of the configured roots (webpki, including validity, EKU and — for
//! servers — the name). With `accept_self_signed`, a self-issued leaf that fails the chain check is accepted
//! instead when it carries an attestation that verifies: its identity then comes only from the quote (the
//! quote binds the key, and the TLS handshake proves possession of it); the server name is not checked.
//! Attestation: every leaf that carries one is verified ([`AttestationVerifier`]); with `require_attestation`
//! a leaf without one is refused.
//! Revocation: the verifiers consult a [`RevocationSet`] (`set_revocation_set`, kept current by a
//! [`crate::crl::CrlRefresher`]; or one list with `set_revocation_list`) before anything else: a chain under a
//! CA with an installed list has its leaf and every intermediate the peer sent checked against it, and an
//! expired list refuses every such peer (fail closed); see [`crate::crl`].

use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::crl::RevocationSet;
use crate::{AttestationVerifier, AttestedIdentity, RaTlsError, RevocationList, parse_cert};

/// Chain and attestation requirements shared by both verifiers.
#[derive(Debug, Clone, Default)]
pub struct RaTlsVerifierConfig {
    /// Trusted roots (e.g. the KMS root CA). May be empty only with `accept_self_signed`.
    pub roots: Vec<CertificateDer<'static>>,
    /// Accept a self-signed leaf whose identity comes from its attestation.
    pub accept_self_signed: bool,
    /// Refuse leaves without an attestation.
    pub require_attestation: bool,
}

fn rustls_err(e: RaTlsError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, Error> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone())?;
    }
    Ok(Arc::new(store))
}

/// The part both verifiers share: the fallback decision and the attestation check.
#[derive(Debug)]
struct Core {
    config: RaTlsVerifierConfig,
    attestation: Arc<AttestationVerifier>,
    provider: Arc<CryptoProvider>,
    revocation: RwLock<Arc<RevocationSet>>,
}

impl Core {
    fn new(config: RaTlsVerifierConfig, attestation: Arc<AttestationVerifier>, provider: Arc<CryptoProvider>) -> Self {
        Self {
            config,
            attestation,
            provider,
            revocation: RwLock::new(RevocationSet::new()),
        }
    }

    fn set_revocation_set(&self, set: Arc<RevocationSet>) {
        *self.revocation.write().unwrap_or_else(|p| p.into_inner()) = set;
    }

    fn set_revocation(&self, list: Option<Arc<RevocationList>>) {
        let set = RevocationSet::new();
        if let Some(list) = list {
            // The list was verified with this CA, so pinning and installing it cannot fail for a parsed
            // certificate; if it did, keep the verifier fail-closed by requiring a list from that CA.
            let pinned = set
                .add_issuer(list.issuer_cert_der(), false)
                .and_then(|()| set.install(list.clone()));
            if pinned.is_err() {
                let _ = set.add_issuer(list.issuer_cert_der(), true);
            }
        }
        self.set_revocation_set(set);
    }

    fn check_revocation(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        secs: u64,
    ) -> Result<(), Error> {
        let set = Arc::clone(&self.revocation.read().unwrap_or_else(|p| p.into_inner()));
        let chain = std::iter::once(end_entity.as_ref()).chain(intermediates.iter().map(|c| c.as_ref()));
        set.check_chain(chain, secs).map_err(rustls_err)
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        chain: Option<Result<(), Error>>,
    ) -> Result<(), Error> {
        let secs = now.as_secs();
        self.check_revocation(end_entity, intermediates, secs)?;
        let chain_ok = match chain {
            Some(Ok(())) => true,
            Some(Err(e)) if !self.config.accept_self_signed => return Err(e),
            Some(Err(e)) => {
                let parsed = parse_cert(end_entity).map_err(rustls_err)?;
                if !parsed.self_issued || !intermediates.is_empty() || parsed.quote.is_none() {
                    return Err(e);
                }
                false
            }
            None => false,
        };
        if !chain_ok {
            // Self-signed path: the identity must come from a verifying attestation.
            let parsed = parse_cert(end_entity).map_err(rustls_err)?;
            if !parsed.self_issued || !intermediates.is_empty() {
                return Err(Error::InvalidCertificate(CertificateError::UnknownIssuer));
            }
            if secs < parsed.not_before || secs > parsed.not_after {
                return Err(rustls_err(RaTlsError::Validity {
                    now: secs,
                    not_before: parsed.not_before,
                    not_after: parsed.not_after,
                }));
            }
        }
        let identity = self.attestation.verify_cert(end_entity, secs).map_err(rustls_err)?;
        if identity.is_none() && (self.config.require_attestation || !chain_ok) {
            return Err(rustls_err(RaTlsError::MissingAttestation));
        }
        Ok(())
    }

    fn tls12(
        &self,
        msg: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(msg, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn tls13(
        &self,
        msg: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(msg, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Verifies RA-TLS server certificates (used by clients: guest → KMS, gateway).
#[derive(Debug)]
pub struct RaTlsServerVerifier {
    core: Core,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl RaTlsServerVerifier {
    pub fn new(config: RaTlsVerifierConfig, attestation: Arc<AttestationVerifier>) -> Result<Arc<Self>, Error> {
        let provider = provider();
        let chain = if config.roots.is_empty() {
            if !config.accept_self_signed {
                return Err(Error::General(
                    "RA-TLS server verifier needs roots or accept_self_signed".into(),
                ));
            }
            None
        } else {
            let roots = root_store(&config.roots)?;
            Some(
                WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                    .build()
                    .map_err(|e| Error::General(e.to_string()))?,
            )
        };
        Ok(Arc::new(Self {
            core: Core::new(config, attestation, provider),
            chain,
        }))
    }

    /// The attestation verifier (for [`peer_identity`]).
    pub fn attestation(&self) -> &Arc<AttestationVerifier> {
        &self.core.attestation
    }

    /// Sets (or with `None` clears) the one revocation list checked on every handshake from now on
    /// (replaces any [`RevocationSet`]).
    pub fn set_revocation_list(&self, list: Option<Arc<RevocationList>>) {
        self.core.set_revocation(list);
    }

    /// Consults `set` (shared with a [`crate::crl::CrlRefresher`]) on every handshake from now on.
    pub fn set_revocation_set(&self, set: Arc<RevocationSet>) {
        self.core.set_revocation_set(set);
    }
}

impl ServerCertVerifier for RaTlsServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let chain = self.chain.as_ref().map(|v| {
            v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map(|_| ())
        });
        self.core.check(end_entity, intermediates, now, chain)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.core.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.core.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.core.schemes()
    }
}

/// Verifies RA-TLS client certificates (used by servers: KMS, gateway). Client authentication is mandatory.
#[derive(Debug)]
pub struct RaTlsClientVerifier {
    core: Core,
    chain: Option<Arc<dyn ClientCertVerifier>>,
}

impl RaTlsClientVerifier {
    pub fn new(config: RaTlsVerifierConfig, attestation: Arc<AttestationVerifier>) -> Result<Arc<Self>, Error> {
        let provider = provider();
        let chain = if config.roots.is_empty() {
            if !config.accept_self_signed {
                return Err(Error::General(
                    "RA-TLS client verifier needs roots or accept_self_signed".into(),
                ));
            }
            None
        } else {
            let roots = root_store(&config.roots)?;
            Some(
                WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider))
                    .build()
                    .map_err(|e| Error::General(e.to_string()))?,
            )
        };
        Ok(Arc::new(Self {
            core: Core::new(config, attestation, provider),
            chain,
        }))
    }

    /// The attestation verifier (for [`peer_identity`]).
    pub fn attestation(&self) -> &Arc<AttestationVerifier> {
        &self.core.attestation
    }

    /// Sets (or with `None` clears) the one revocation list checked on every handshake from now on
    /// (replaces any [`RevocationSet`]).
    pub fn set_revocation_list(&self, list: Option<Arc<RevocationList>>) {
        self.core.set_revocation(list);
    }

    /// Consults `set` (shared with a [`crate::crl::CrlRefresher`]) on every handshake from now on.
    pub fn set_revocation_set(&self, set: Arc<RevocationSet>) {
        self.core.set_revocation_set(set);
    }
}

impl ClientCertVerifier for RaTlsClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.as_ref().map_or(&[], |c| c.root_hint_subjects())
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let chain = self
            .chain
            .as_ref()
            .map(|v| v.verify_client_cert(end_entity, intermediates, now).map(|_| ()));
        self.core.check(end_entity, intermediates, now, chain)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.core.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.core.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.core.schemes()
    }
}

/// The attested identity of an established connection's peer (from `peer_certificates()`), from the
/// verifier's cache when the handshake just verified it. `Ok(None)` when the peer sent no certificate or its
/// certificate carries no attestation.
pub fn peer_identity(
    verifier: &AttestationVerifier,
    peer_certificates: Option<&[CertificateDer<'_>]>,
) -> Result<Option<Arc<AttestedIdentity>>, RaTlsError> {
    let Some(leaf) = peer_certificates.and_then(<[_]>::first) else {
        return Ok(None);
    };
    if let Some(id) = verifier.cached(leaf) {
        return Ok(Some(id));
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    verifier.verify_cert(leaf, now)
}
