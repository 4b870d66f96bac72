//! Bootstrap: the KMS generates its root keys inside its TEE and attests them; the `Onboard` service.
//!
//! `Bootstrap{domain}` (dstack `onboard_service.rs`):
//! 1. temp CA "Dstack Client Temp CA" (P-256, path length 0, self-signed) — CVMs mint mTLS client certs under it;
//! 2. root CA "Dstack KMS CA" (P-256, org "Dstack", path length 1, self-signed);
//! 3. RPC key + certificate (subject = SAN = domain, special usage `kms:rpc`, server auth, signed by the root
//!    CA), carrying the KMS's own RA-TLS attestation when a TEE is available and `attest_rpc_cert` is set;
//! 4. a random secp256k1 root key;
//! 5. attestation of the public keys: report data = `keccak256("dstack-kms-genereted-keys-v1:" ‖
//!    hex(ca_pubkey SPKI DER) ‖ ";" ‖ hex(k256 pubkey SEC1 compressed) ‖ ";")` zero-padded to 64 bytes
//!    (dstack's spelling "genereted" is kept: verifiers recompute this string).
//!
//! `BootstrapResponse.attestation` (ours): dstack puts a `VersionedAttestation` (SCALE/MessagePack) there,
//! which this implementation does not produce. We write UTF-8 JSON
//! `{"tee": "tdx"|"simulated", "quote": "<hex>", "event_log": [<dstack event-log entries>]}`, or empty bytes
//! when the KMS runs without a TEE (development only; logged loudly).

use std::path::PathBuf;
use std::sync::Arc;

use dstack_keys::kdf::p256_from_pkcs8_pem;
use dstack_keys::sig::{compressed, k256_signing_key, keccak256};
use dstack_measurements::eventlog::{EventLogVersion, TdxEvent};
use dstack_ra_tls::{CaCert, CertAttestation, CertRequest, ra_tls_report_data};
use dstack_rpc::kms::{
    AttestationInfoResponse, BootstrapRequest, BootstrapResponse, OnboardRequest, OnboardResponse, OnboardRpc,
};
use dstack_rpc::{CallContext, Empty, RpcError};
use dstack_tee::{RuntimeEventLog, Tee};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use tokio::sync::{Mutex, watch};
use zeroize::Zeroizing;

use crate::KmsError;
use crate::onboard::{OnboardContext, onboard_from};
use crate::store::{KeyMaterial, KeyStore};

/// Prefix of the bootstrap report data (typo preserved from dstack).
pub const GENERATED_KEYS_TAG: &str = "dstack-kms-genereted-keys-v1:";

/// The report data attesting freshly generated public keys.
pub fn generated_keys_report_data(ca_pubkey_der: &[u8], k256_pubkey: &[u8]) -> [u8; 64] {
    let text = format!(
        "{GENERATED_KEYS_TAG}{};{};",
        hex::encode(ca_pubkey_der),
        hex::encode(k256_pubkey)
    );
    let mut out = [0u8; 64];
    out[..32].copy_from_slice(&keccak256(&[text.as_bytes()]));
    out
}

/// The KMS's own TEE: quotes plus the event log that replays to them.
#[derive(Debug, Clone)]
pub struct SelfTee {
    pub tee: Arc<dyn Tee>,
    /// The persisted runtime (RTMR3) event log of the KMS's CVM.
    pub runtime_log: PathBuf,
}

impl SelfTee {
    /// A quote over `report_data` and the full event log (boot + runtime events, checked against RTMR3).
    pub async fn attest(&self, report_data: [u8; 64]) -> Result<CertAttestation, KmsError> {
        let log = RuntimeEventLog::new(Arc::clone(&self.tee), &self.runtime_log, EventLogVersion::V1);
        let event_log = log.full_event_log().await?;
        let quote = self.tee.quote(report_data).await?;
        Ok(CertAttestation { quote, event_log })
    }
}

fn new_p256() -> Result<KeyPair, KmsError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| KmsError::KeyGen(e.to_string()))
}

fn random_k256() -> Result<k256::ecdsa::SigningKey, KmsError> {
    // A uniformly random 32-byte string is a valid scalar except with probability ~2^-128; retry anyway.
    for _ in 0..8 {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut bytes[..]).map_err(|e| KmsError::KeyGen(format!("OS RNG: {e}")))?;
        if let Ok(key) = k256_signing_key(&bytes[..]) {
            return Ok(key);
        }
    }
    Err(KmsError::KeyGen("could not draw a valid secp256k1 scalar".into()))
}

/// Checks the RPC domain: a DNS name or IP address, as it goes into the certificate's SAN.
pub fn validate_domain(domain: &str) -> Result<(), KmsError> {
    let ok = !domain.is_empty()
        && domain.len() <= 253
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':')
        && !domain.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(KmsError::Config(format!(
            "domain {domain:?} is not a DNS name or IP address"
        )))
    }
}

/// Issues the RPC certificate for `domain` under `root_ca` (attested when `tee` is given).
pub async fn issue_rpc_cert(
    root_ca: &CaCert,
    domain: &str,
    tee: Option<&SelfTee>,
) -> Result<(String, Zeroizing<String>), KmsError> {
    let key = new_p256()?;
    let attestation = match tee {
        Some(t) => Some(t.attest(ra_tls_report_data(&key.subject_public_key_info())).await?),
        None => None,
    };
    let req = CertRequest {
        subject: domain.to_owned(),
        org_name: Some("Dstack".into()),
        alt_names: vec![domain.to_owned()],
        usage_server_auth: true,
        special_usage: Some("kms:rpc".into()),
        attestation,
        ..Default::default()
    };
    let cert = root_ca.issue(&req, &key)?;
    Ok((cert.pem(), Zeroizing::new(key.serialize_pem())))
}

#[derive(serde::Serialize)]
struct AttestationJson<'a> {
    tee: &'a str,
    quote: String,
    event_log: &'a [TdxEvent],
}

/// Generates a complete key set for `domain` (nothing is written).
pub async fn generate(domain: &str, tee: Option<&SelfTee>, attest_rpc_cert: bool) -> Result<KeyMaterial, KmsError> {
    validate_domain(domain)?;
    let tmp_ca = CaCert::self_signed(
        &CertRequest {
            subject: "Dstack Client Temp CA".into(),
            org_name: Some("Dstack".into()),
            ca_level: Some(0),
            ..Default::default()
        },
        new_p256()?,
    )?;
    let root_key = new_p256()?;
    let root_ca_secret = p256_from_pkcs8_pem(&Zeroizing::new(root_key.serialize_pem()))?;
    let ca_pubkey = root_key.subject_public_key_info();
    let root_ca = CaCert::self_signed(
        &CertRequest {
            subject: "Dstack KMS CA".into(),
            org_name: Some("Dstack".into()),
            ca_level: Some(1),
            ..Default::default()
        },
        root_key,
    )?;
    let (rpc_cert_pem, rpc_key_pem) = issue_rpc_cert(&root_ca, domain, tee.filter(|_| attest_rpc_cert)).await?;
    let root_k256 = random_k256()?;
    let k256_pubkey = compressed(root_k256.verifying_key());
    let attestation = match tee {
        Some(t) => {
            let att = t.attest(generated_keys_report_data(&ca_pubkey, &k256_pubkey)).await?;
            serde_json::to_vec(&AttestationJson {
                tee: t.tee.kind().as_str(),
                quote: hex::encode(&att.quote),
                event_log: &att.event_log,
            })
            .map_err(|e| KmsError::KeyGen(format!("encoding attestation: {e}")))?
        }
        None => {
            tracing::warn!("bootstrapping WITHOUT a TEE: the generated keys carry no attestation (development only)");
            Vec::new()
        }
    };
    Ok(KeyMaterial {
        root_ca,
        root_ca_secret,
        root_k256,
        tmp_ca,
        rpc_cert_pem,
        rpc_key_pem,
        domain: domain.to_owned(),
        bootstrap_info: BootstrapResponse {
            ca_pubkey,
            k256_pubkey,
            attestation,
        },
    })
}

/// Generates and persists keys; refuses when `store` already holds any key file.
pub async fn bootstrap(
    store: &KeyStore,
    domain: &str,
    tee: Option<&SelfTee>,
    attest_rpc_cert: bool,
) -> Result<KeyMaterial, KmsError> {
    if store.is_initialized() {
        return Err(KmsError::AlreadyBootstrapped(format!(
            "{} already holds {}",
            store.dir().display(),
            store.existing_files().join(", ")
        )));
    }
    let keys = generate(domain, tee, attest_rpc_cert).await?;
    // A node with its own root follows no source (a record left by an onboarding that never completed).
    crate::replication::remove_source(store.dir())?;
    let store = store.clone();
    // Blocking file I/O with fsyncs: off the reactor. The key set moves in and back out.
    let keys = tokio::task::spawn_blocking(move || store.save_new(&keys).map(|()| keys))
        .await
        .map_err(|e| KmsError::Storage(format!("writer task failed: {e}")))??;
    tracing::info!(
        domain,
        k256_pubkey = %hex::encode(keys.k256_pubkey()),
        attested = !keys.bootstrap_info.attestation.is_empty(),
        "KMS bootstrapped"
    );
    Ok(keys)
}

/// The `Onboard` service served while no keys exist: `Bootstrap` (new keys) or `Onboard` (keys from another
/// KMS, see [`crate::onboard`]), then `Finish`.
#[derive(Debug)]
pub struct OnboardService {
    store: KeyStore,
    ctx: OnboardContext,
    /// Serializes bootstraps and onboardings; true once keys were stored.
    done: Mutex<bool>,
    finished: watch::Sender<bool>,
}

impl OnboardService {
    /// Returns the service and a receiver that turns `true` on `Finish` (after a successful bootstrap or
    /// onboarding).
    pub fn new(store: KeyStore, ctx: OnboardContext) -> (Self, watch::Receiver<bool>) {
        let (finished, rx) = watch::channel(false);
        let svc = Self {
            store,
            ctx,
            done: Mutex::new(false),
            finished,
        };
        (svc, rx)
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn rpc_err(e: KmsError) -> RpcError {
    RpcError::Handler(e.to_string())
}

impl OnboardRpc for OnboardService {
    async fn bootstrap(&self, _ctx: &CallContext, req: BootstrapRequest) -> Result<BootstrapResponse, RpcError> {
        let mut done = self.done.lock().await;
        let keys = bootstrap(
            &self.store,
            req.domain.trim(),
            self.ctx.tee.as_ref(),
            self.ctx.attest_rpc_cert,
        )
        .await
        .map_err(rpc_err)?;
        *done = true;
        Ok(keys.bootstrap_info.clone())
    }

    async fn onboard(&self, _ctx: &CallContext, req: OnboardRequest) -> Result<OnboardResponse, RpcError> {
        let mut done = self.done.lock().await;
        if self.store.is_initialized() {
            return Err(rpc_err(KmsError::AlreadyBootstrapped(format!(
                "{} already holds {}",
                self.store.dir().display(),
                self.store.existing_files().join(", ")
            ))));
        }
        let onboarded = match onboard_from(&self.ctx, &req.source_url, req.domain.trim()).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(source = %req.source_url, "onboarding failed: {e}");
                return Err(RpcError::Handler(format!("Onboard failed: {e}")));
            }
        };
        // Revocations first: a node holding the keys never publishes less than the source did.
        if let Some(crl) = &onboarded.revocations {
            let note = format!(
                "copied from {} at onboarding (CRL #{})",
                onboarded.source_url, crl.content.crl_number
            );
            self.ctx
                .revocations
                .merge_crl(crl, now_secs(), &note)
                .map_err(rpc_err)?;
        }
        // The source record before the keys: a node killed right after its key set is in place must still
        // follow the source's revocations when it restarts (a record without keys is replaced by the next
        // Onboard, or removed by a Bootstrap).
        crate::replication::save_source(
            self.store.dir(),
            &crate::replication::ReplicationSource {
                source_url: onboarded.source_url.clone(),
            },
        )
        .map_err(rpc_err)?;
        let store = self.store.clone();
        let keys = onboarded.keys;
        let keys = tokio::task::spawn_blocking(move || store.save_new(&keys).map(|()| keys))
            .await
            .map_err(|e| RpcError::Internal(format!("writer task failed: {e}")))?
            .map_err(rpc_err)?;
        self.ctx.revocations.follow(&onboarded.source_url);
        *done = true;
        tracing::info!(
            source = %req.source_url,
            domain = %keys.domain,
            k256_pubkey = %hex::encode(keys.k256_pubkey()),
            "KMS onboarded: root keys received from the source KMS"
        );
        Ok(OnboardResponse {
            k256_pubkey: keys.k256_pubkey(),
        })
    }

    async fn get_attestation_info(&self, _ctx: &CallContext, _req: Empty) -> Result<AttestationInfoResponse, RpcError> {
        crate::attestation_info::attestation_info(&self.ctx)
            .await
            .map_err(|e| RpcError::Handler(format!("GetAttestationInfo: {e}")))
    }

    async fn finish(&self, _ctx: &CallContext, _req: Empty) -> Result<Empty, RpcError> {
        let done = *self.done.lock().await || self.store.is_initialized();
        if !done {
            return Err(RpcError::Handler("nothing to finish: bootstrap first".into()));
        }
        let _ = self.finished.send(true);
        Ok(Empty {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_data_layout() {
        let rd = generated_keys_report_data(&[0x30, 0x01], &[0x02, 0xff]);
        // The preimage text is spelled out here (dstack's format, typo included); Keccak-256 itself is covered by
        // dstack-keys' known-answer tests (no Keccak implementation is installed for Python on this machine).
        let expected = keccak256(&[b"dstack-kms-genereted-keys-v1:3001;02ff;"]);
        assert_eq!(rd[..32], expected);
        assert_eq!(rd[32..], [0u8; 32]);
    }

    #[test]
    fn domains() {
        validate_domain("kms.example.com").unwrap();
        validate_domain("127.0.0.1").unwrap();
        assert!(validate_domain("").is_err());
        assert!(validate_domain("a b").is_err());
        assert!(validate_domain("-x").is_err());
    }

    #[tokio::test]
    async fn bootstrap_writes_private_files_and_refuses_twice() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path().join("certs"));
        let keys = bootstrap(&store, "kms.test", None, true).await.unwrap();
        for name in crate::store::ALL_FILES {
            let mode = std::fs::metadata(store.path(name)).unwrap().permissions().mode() & 0o777;
            let expected = if name.ends_with(".key") { 0o600 } else { 0o644 };
            assert_eq!(mode, expected, "{name}");
        }
        let loaded = store.load().unwrap();
        assert_eq!(loaded.root_ca_secret.to_bytes(), keys.root_ca_secret.to_bytes());
        assert_eq!(loaded.k256_pubkey(), keys.k256_pubkey());
        assert_eq!(loaded.bootstrap_info, keys.bootstrap_info);
        assert_eq!(loaded.domain, "kms.test");
        let err = bootstrap(&store, "kms.test", None, true).await.unwrap_err();
        assert!(matches!(err, KmsError::AlreadyBootstrapped(_)), "{err}");
        // The existing keys were not touched.
        assert_eq!(store.load().unwrap().k256_pubkey(), keys.k256_pubkey());
    }
}
