//! `GetTlsKey` certificates: a fresh P-256 key per call, certified by the app CA.
//!
//! dstack's agent signs locally with the app CA key when the key provider is `none`/`local`/`tpm` (the key is
//! in `.appkeys.json` `key_provider.key`, the CA certificate in `ca_cert`), and asks the KMS (`SignCert` over
//! RA-TLS, authenticated with the `tmp_ca_*` client CA) when the provider is `kms` — the guest never holds the
//! KMS-derived app CA key. [`CertSigner`] abstracts both; this crate implements the local one
//! ([`LocalCaSigner`]); a KMS-backed signer is supplied by the caller.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use dstack_ra_tls::{CaCert, CertRequest};
use dstack_types::{AppKeys, KeyProvider};
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use rcgen::KeyPair;
use zeroize::Zeroizing;

use crate::AgentError;

/// Future returned by [`CertSigner::sign`].
pub type SignFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<String>, AgentError>> + Send + 'a>>;

/// Issues leaf certificates for `GetTlsKey` (and the app certificate in `Info`).
pub trait CertSigner: Send + Sync + fmt::Debug {
    /// Certifies `key`'s public key with the fields of `req`; returns the PEM chain, leaf first. `key` is given so a
    /// remote signer can sign a CSR with it (proof of possession).
    fn sign<'a>(&'a self, req: &'a CertRequest, key: &'a KeyPair) -> SignFuture<'a>;
}

/// Signs with an app CA key held by the guest.
pub struct LocalCaSigner {
    ca: CaCert,
    /// Certificates after the CA's own in returned chains (e.g. the KMS root).
    chain_tail: Vec<String>,
}

impl fmt::Debug for LocalCaSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCaSigner")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl LocalCaSigner {
    /// A signer for `ca`; returned chains are `[leaf, ca, chain_tail...]`.
    pub fn new(ca: CaCert, chain_tail: Vec<String>) -> Self {
        Self { ca, chain_tail }
    }

    /// The signer dstack builds from `.appkeys.json` for non-KMS key providers (`ca_cert` + `key_provider.key`).
    /// KMS keys do not include the app CA key: supply a KMS-backed [`CertSigner`] instead.
    pub fn from_app_keys(keys: &AppKeys) -> Result<Self, AgentError> {
        let key = match &keys.key_provider {
            KeyProvider::None { key } | KeyProvider::Local { key, .. } | KeyProvider::Tpm { key, .. } => key,
            KeyProvider::Kms { .. } => {
                return Err(AgentError::Config(
                    "key provider is kms: the app CA key stays in the KMS; certificates must be signed through \
                     the KMS SignCert RPC (supply a KMS CertSigner)"
                        .into(),
                ));
            }
        };
        let ca = CaCert::from_pem(&keys.ca_cert, key).map_err(|e| AgentError::Config(format!("app CA: {e}")))?;
        Ok(Self::new(ca, Vec::new()))
    }

    /// The CA certificate (PEM).
    pub fn ca_cert_pem(&self) -> &str {
        self.ca.cert_pem()
    }
}

impl CertSigner for LocalCaSigner {
    fn sign<'a>(&'a self, req: &'a CertRequest, key: &'a KeyPair) -> SignFuture<'a> {
        Box::pin(async move {
            let cert = self.ca.issue(req, key).map_err(|e| AgentError::Cert(e.to_string()))?;
            let mut chain = vec![cert.pem(), self.ca.cert_pem().to_owned()];
            chain.extend(self.chain_tail.iter().cloned());
            Ok(chain)
        })
    }
}

/// A fresh P-256 key as dstack makes it: 32 random bytes through `derive_p256_key_pair_from_bytes(seed, [])`.
/// Returns the rcgen key pair and its PKCS#8 PEM.
pub fn random_p256_key() -> Result<(KeyPair, Zeroizing<String>), AgentError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut seed[..]).map_err(|e| AgentError::Internal(format!("OS random number generator: {e}")))?;
    p256_key_pair(&dstack_keys::kdf::derive_p256_from_bytes(&seed[..], &[])?)
}

/// The rcgen key pair and PKCS#8 PEM of a P-256 secret key.
pub fn p256_key_pair(secret: &p256::SecretKey) -> Result<(KeyPair, Zeroizing<String>), AgentError> {
    let pem = secret
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| AgentError::Internal(format!("PKCS#8 encoding: {e}")))?;
    let pem = Zeroizing::new(pem.to_string());
    let key = KeyPair::from_pem(&pem).map_err(|e| AgentError::Internal(format!("P-256 key: {e}")))?;
    Ok((key, pem))
}
