//! Replication: a new KMS obtains the root keys from a running one (`Onboard.Onboard{source_url, domain}`).
//!
//! Both sides are attested, on one channel:
//! 1. **Find the source's root.** A first TLS connection only records the certificate chain the source
//!    presents (`rpc.crt`, then its root CA); nothing received on it is trusted.
//! 2. **Verify the source.** Every further connection pins that root: webpki checks the chain and the URL's
//!    host name, and the RPC certificate must carry a verifying attestation with usage `kms:rpc` (our
//!    attestation policy: simulated quotes only with `allow_simulated` and a pinned simulator root).
//!    `GetTempCaCert` must name the same root. The source's boot info then goes to **our own** policy as a KMS
//!    (`bootAuth/kms`, `isKmsAllowed`); its `os_image_hash` defaults to ours (dstack does the same).
//! 3. **Attest ourselves.** We mint a client certificate under the source's temp CA carrying our own quote
//!    over the certificate key (report data `ratls-cert`), and call `GetKmsKey{vm_config}` over mTLS. The
//!    source verifies our attestation and asks **its** policy whether we are an allowed KMS before answering.
//! 4. **Check what we received**: exactly one key set, the root CA key matches the pinned root certificate, and
//!    both public keys equal the source's `bootstrap_info`, which we keep (it attests the keys' generation).
//!    A new RPC key and certificate are issued for our own `domain` (attested by our TEE).
//! 5. **Copy the revocations**: the source's CRL (`Revocation.GetCrl`, same pinned connection) verified with the
//!    root; a source that serves none (a dstack KMS) is logged and skipped, one that does not verify fails the
//!    onboarding. The caller merges it into our `revocations.json` and records the source for the periodic pull
//!    ([`crate::replication`]).
//!
//! Like any key-release caller, the new KMS must boot as a dstack app (its RTMR3 events carry a 20-byte
//! app-id): that identity is what `bootAuth/kms` / `isKmsAllowed` decide on, together with the measurements.

use std::sync::{Arc, Mutex};

use dstack_keys::kdf::p256_from_pkcs8_pem;
use dstack_keys::sig::{compressed, k256_signing_key};
use dstack_ra_tls::tls::RaTlsVerifierConfig;
use dstack_ra_tls::{
    AttestationPolicy, AttestationVerifier, CaCert, CertRequest, RaTlsServerVerifier, parse_cert, ra_tls_report_data,
};
use dstack_rpc::Client;
use dstack_rpc::kms::{BootstrapResponse, GetKmsKeyRequest, KmsClient, RevocationClient};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use zeroize::Zeroizing;

use crate::bootstrap::{SelfTee, issue_rpc_cert, validate_domain};
use crate::image::os_image_hash_from_vm_config;
use crate::policy::{AuthApi, BootInfo};
use crate::store::KeyMaterial;

/// Why onboarding failed (nothing is written on failure).
#[derive(Debug, thiserror::Error)]
pub enum OnboardError {
    #[error("source_url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("onboarding needs this KMS's own TEE: the source releases keys only to an attested KMS")]
    NoTee,
    #[error("connecting to the source KMS: {0}")]
    Connect(String),
    #[error("the source KMS is not trustworthy: {0}")]
    SourceUnverified(String),
    #[error("the source KMS is not allowed by this KMS's policy: {0}")]
    SourceNotAllowed(String),
    #[error("the source KMS refused to release its keys: {0}")]
    Refused(String),
    #[error("the source KMS sent invalid keys: {0}")]
    BadKeys(String),
    #[error("{0}")]
    Local(String),
}

/// What this KMS brings to an onboarding.
#[derive(Debug, Clone)]
pub struct OnboardContext {
    pub tee: Option<SelfTee>,
    /// Our attestation policy (how the source's RPC certificate is verified).
    pub verifier: Arc<AttestationVerifier>,
    /// Our authorization policy (is the source an allowed KMS?).
    pub auth: AuthApi,
    /// Our vm_config, sent with `GetKmsKey`.
    pub vm_config: String,
    pub attest_rpc_cert: bool,
    /// Where the revocations copied from the source go (and what `Bootstrap` starts from).
    pub revocations: Arc<crate::revocation::RevocationStore>,
    /// `GetAttestationInfo` fields from the configuration.
    pub site_name: String,
    pub eth_rpc_url: String,
    pub kms_contract_address: String,
}

/// What a successful onboarding brings home.
#[derive(Debug)]
pub struct Onboarded {
    pub keys: KeyMaterial,
    /// The source's verified CRL content (`None` when the source publishes none).
    pub revocations: Option<crate::revocation::SourceCrl>,
    /// The normalized source URL (`https://host:port/prpc`).
    pub source_url: String,
}

/// `https://host:port[/prpc]` → `https://host:port/prpc`.
pub fn normalize_source_url(url: &str) -> Result<String, OnboardError> {
    let url = url.trim().trim_end_matches('/');
    if !url.starts_with("https://") {
        return Err(OnboardError::Url {
            url: url.to_owned(),
            reason: "must be https://".into(),
        });
    }
    Ok(if url.ends_with("/prpc") {
        url.to_owned()
    } else {
        format!("{url}/prpc")
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Records the presented chain and accepts it (only the handshake signature is checked). Used for step 1 only.
#[derive(Debug)]
struct ChainRecorder {
    chain: Mutex<Vec<CertificateDer<'static>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainRecorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.chain.lock().unwrap_or_else(|p| p.into_inner()) = chain;
        Ok(ServerCertVerified::assertion())
    }

    dstack_ra_tls::handshake_signatures_from_provider!(provider);
}

fn client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    client_cert: Option<(CertificateDer<'static>, &KeyPair)>,
) -> Result<Arc<rustls::ClientConfig>, OnboardError> {
    let tls = |e: rustls::Error| OnboardError::Local(format!("TLS configuration: {e}"));
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    Ok(Arc::new(match client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![cert],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .map_err(tls)?,
        None => builder.with_no_client_auth(),
    }))
}

fn kms_client(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<KmsClient<Client>, OnboardError> {
    let client = Client::new(url).map_err(|e| OnboardError::Url {
        url: url.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(KmsClient::new(client.with_tls(tls)))
}

/// Step 1: the chain the source presents (leaf first, at least the leaf and its root).
async fn record_chain(url: &str) -> Result<Vec<CertificateDer<'static>>, OnboardError> {
    let recorder = Arc::new(ChainRecorder {
        chain: Mutex::new(Vec::new()),
        provider: provider(),
    });
    let client = kms_client(url, client_config(recorder.clone(), None)?)?;
    // Any answer (or an RPC error after the handshake) will do: only the recorded chain is used.
    let result = client.get_meta().await;
    let chain = std::mem::take(&mut *recorder.chain.lock().unwrap_or_else(|p| p.into_inner()));
    if chain.is_empty() {
        return Err(OnboardError::Connect(match result {
            Err(e) => e.to_string(),
            Ok(_) => "no certificate was presented".into(),
        }));
    }
    if chain.len() < 2 {
        return Err(OnboardError::SourceUnverified(
            "the RPC certificate was presented without its root CA".into(),
        ));
    }
    Ok(chain)
}

/// Runs the onboarding protocol against `source_url`; returns the key set to store for `domain`.
pub async fn onboard_from(ctx: &OnboardContext, source_url: &str, domain: &str) -> Result<Onboarded, OnboardError> {
    validate_domain(domain).map_err(|e| OnboardError::Local(e.to_string()))?;
    let tee = ctx.tee.as_ref().ok_or(OnboardError::NoTee)?;
    let url = normalize_source_url(source_url)?;

    // 1. The source's root CA.
    let chain = record_chain(&url).await?;
    let (leaf, root) = match (chain.first(), chain.last()) {
        (Some(l), Some(r)) => (l.clone(), r.clone()),
        _ => return Err(OnboardError::SourceUnverified("empty chain".into())),
    };

    // 2. Every further connection pins that root and requires an attested `kms:rpc` certificate.
    let source_policy = AttestationPolicy {
        required_usage: Some("kms:rpc".into()),
        ..ctx.verifier.policy().clone()
    };
    let source_attestation = Arc::new(AttestationVerifier::new(source_policy));
    let pinned = RaTlsServerVerifier::new(
        RaTlsVerifierConfig {
            roots: vec![root.clone()],
            accept_self_signed: false,
            require_attestation: true,
        },
        Arc::clone(&source_attestation),
    )
    .map_err(|e| OnboardError::SourceUnverified(format!("root CA certificate: {e}")))?;
    let public = kms_client(&url, client_config(pinned.clone(), None)?)?;
    let unverified = |e: dstack_rpc::RpcError| OnboardError::SourceUnverified(e.to_string());
    let tmp = public.get_temp_ca_cert().await.map_err(unverified)?;
    let meta = public.get_meta().await.map_err(unverified)?;
    let root_from_rpc = pem_to_der(&tmp.ca_cert).map_err(OnboardError::SourceUnverified)?;
    if root_from_rpc != root.as_ref() || pem_to_der(&meta.ca_cert).ok().as_deref() != Some(root.as_ref()) {
        return Err(OnboardError::SourceUnverified(
            "GetTempCaCert/GetMeta name another root CA than the one the TLS chain ends in".into(),
        ));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let identity = source_attestation
        .verify_cert(&leaf, now)
        .map_err(|e| OnboardError::SourceUnverified(format!("RPC certificate attestation: {e}")))?
        .ok_or_else(|| OnboardError::SourceUnverified("the RPC certificate carries no attestation".into()))?;
    let own_image = if ctx.vm_config.trim().is_empty() {
        None
    } else {
        os_image_hash_from_vm_config(&ctx.vm_config).map_err(|e| OnboardError::Local(format!("own vm_config: {e}")))?
    };
    let mut source_info = BootInfo::from_identity(&identity, None);
    if source_info.os_image_hash.is_empty()
        && let Some(own) = own_image
    {
        source_info.os_image_hash = own;
    }
    match ctx.auth.is_allowed(&source_info, true).await {
        Ok(r) if r.is_allowed => {}
        Ok(r) => return Err(OnboardError::SourceNotAllowed(r.reason)),
        Err(e) => return Err(OnboardError::SourceNotAllowed(format!("policy unavailable: {e}"))),
    }
    tracing::info!(
        source = %url,
        app_id = %hex::encode(&identity.app_id),
        mr_aggregated = %hex::encode(&identity.mr_aggregated),
        simulated = identity.simulated,
        "source KMS verified and allowed; requesting the root keys"
    );

    // 3. Our attested client certificate under the source's temp CA; GetKmsKey over mTLS.
    let temp_ca = CaCert::from_pem(&tmp.temp_ca_cert, &tmp.temp_ca_key)
        .map_err(|e| OnboardError::SourceUnverified(format!("temp CA: {e}")))?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| OnboardError::Local(e.to_string()))?;
    let attestation = tee
        .attest(ra_tls_report_data(&key.subject_public_key_info()))
        .await
        .map_err(|e| OnboardError::Local(format!("own attestation: {e}")))?;
    let cert = temp_ca
        .issue(
            &CertRequest {
                subject: "RA-TLS TEMP Cert".into(),
                usage_client_auth: true,
                attestation: Some(attestation),
                ..Default::default()
            },
            &key,
        )
        .map_err(|e| OnboardError::Local(format!("client certificate: {e}")))?;
    let mtls = kms_client(&url, client_config(pinned, Some((cert.der().clone(), &key)))?)?;
    let resp = mtls
        .get_kms_key(GetKmsKeyRequest {
            vm_config: ctx.vm_config.clone(),
        })
        .await
        .map_err(|e| OnboardError::Refused(e.to_string()))?;

    // 4. Check and assemble.
    let [set] = <[_; 1]>::try_from(resp.keys)
        .map_err(|v: Vec<_>| OnboardError::BadKeys(format!("{} key sets, expected exactly 1", v.len())))?;
    let ca_key = Zeroizing::new(set.ca_key);
    let k256_bytes = Zeroizing::new(set.k256_key);
    let root_ca =
        CaCert::from_pem(&tmp.ca_cert, &ca_key).map_err(|e| OnboardError::BadKeys(format!("root CA key: {e}")))?;
    let root_ca_secret =
        p256_from_pkcs8_pem(&ca_key).map_err(|e| OnboardError::BadKeys(format!("root CA key: {e}")))?;
    let root_k256 = k256_signing_key(&k256_bytes).map_err(|e| OnboardError::BadKeys(format!("k256 key: {e}")))?;
    let tmp_ca = CaCert::from_pem(&tmp.temp_ca_cert, &Zeroizing::new(resp.temp_ca_key))
        .map_err(|e| OnboardError::BadKeys(format!("temp CA key: {e}")))?;
    let ca_pubkey = parse_cert(&root)
        .map_err(|e| OnboardError::SourceUnverified(format!("root CA certificate: {e}")))?
        .spki_der;
    let k256_pubkey = compressed(root_k256.verifying_key());
    let bootstrap_info = match meta.bootstrap_info {
        Some(info) => {
            if info.ca_pubkey != ca_pubkey || info.k256_pubkey != k256_pubkey {
                return Err(OnboardError::BadKeys(
                    "the received keys are not the ones in the source's bootstrap_info".into(),
                ));
            }
            info
        }
        None => BootstrapResponse {
            ca_pubkey,
            k256_pubkey,
            attestation: Vec::new(),
        },
    };
    // 5. The source's revocations.
    let crl = RevocationClient::new(public.transport().clone());
    let revocations = match crl.get_crl().await {
        Ok(r) => {
            let list = dstack_ra_tls::RevocationList::from_der(&r.crl, &root, now)
                .map_err(|e| OnboardError::SourceUnverified(format!("revocation list: {e}")))?;
            tracing::info!(
                source = %url,
                crl_number = list.content().crl_number,
                serials = list.content().serials.len(),
                app_rules = list.content().apps.len(),
                "copying the source's revocation list"
            );
            Some(crate::revocation::SourceCrl {
                content: list.content().clone(),
                der: r.crl,
            })
        }
        Err(e) => {
            tracing::warn!(source = %url, "the source publishes no revocation list (GetCrl: {e}); none copied");
            None
        }
    };
    let (rpc_cert_pem, rpc_key_pem) = issue_rpc_cert(&root_ca, domain, Some(tee).filter(|_| ctx.attest_rpc_cert))
        .await
        .map_err(|e| OnboardError::Local(format!("RPC certificate: {e}")))?;
    let keys = KeyMaterial {
        root_ca,
        root_ca_secret,
        root_k256,
        tmp_ca,
        rpc_cert_pem,
        rpc_key_pem,
        domain: domain.to_owned(),
        bootstrap_info,
    };
    Ok(Onboarded {
        keys,
        revocations,
        source_url: url,
    })
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, String> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| format!("certificate PEM: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_urls() {
        assert_eq!(
            normalize_source_url("https://kms:8000").unwrap(),
            "https://kms:8000/prpc"
        );
        assert_eq!(
            normalize_source_url("https://kms:8000/prpc/").unwrap(),
            "https://kms:8000/prpc"
        );
        assert!(normalize_source_url("http://kms:8000").is_err());
    }
}
