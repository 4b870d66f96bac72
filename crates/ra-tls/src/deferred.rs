//! A rustls client-certificate verifier for servers that check attestation in their request handlers.
//!
//! Services such as the KMS and the gateway have public methods (no client certificate) next to methods that
//! need an attested caller, and want a refusal to reach the caller with its reason rather than as a bare TLS
//! alert. So at the TLS layer client authentication is offered but optional, and a presented certificate is
//! accepted when it chains to one of the configured roots (e.g. the KMS temp CA that dstack CVMs mint their
//! client certificates under) or when it is a self-issued leaf that carries a TDX quote and is within its
//! validity period. rustls checks the handshake signature, which proves possession of the certificate's key.
//! The handler then verifies the attestation itself with [`crate::AttestationVerifier`] on the peer's
//! certificate; nothing about the caller is trusted before that.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName, Error, RootCertStore};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::{RaTlsError, parse_cert};

/// Optional client auth accepting certificates under `roots` or self-issued certificates carrying a quote,
/// with the attestation left to the request handler (see the module docs).
#[derive(Debug)]
pub struct DeferredAttestationClientVerifier {
    chain: Option<Arc<dyn ClientCertVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl DeferredAttestationClientVerifier {
    /// `roots` may be empty: then only self-issued certificates carrying a quote are accepted.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Arc<Self>, RaTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = if roots.is_empty() {
            None
        } else {
            let mut store = RootCertStore::empty();
            for root in roots {
                store
                    .add(root)
                    .map_err(|e| RaTlsError::Certificate(format!("client root: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), Arc::clone(&provider))
                .allow_unauthenticated()
                .build()
                .map_err(|e| RaTlsError::Certificate(format!("client verifier: {e}")))?;
            Some(verifier)
        };
        Ok(Arc::new(Self { chain, provider }))
    }
}

impl ClientCertVerifier for DeferredAttestationClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: callers also present self-signed RA-TLS certificates.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let chain_err = match &self.chain {
            Some(chain) => match chain.verify_client_cert(end_entity, intermediates, now) {
                Ok(verified) => return Ok(verified),
                Err(e) => e,
            },
            None => Error::InvalidCertificate(CertificateError::UnknownIssuer),
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

    crate::handshake_signatures_from_provider!(provider);
}
