//! The `KMS` service (dstack-compatible method and field names).
//!
//! Methods that release secrets (`GetAppKey`, `SignCert`, `GetKmsKey`) require an attested caller: the TLS
//! client certificate's attestation is verified here ([`dstack_ra_tls::AttestationVerifier`]: quote, key
//! binding, event-log replay against all RTMRs), turned into a [`BootInfo`] and given to the policy. Every
//! decision is logged with its reason and the caller's identity — never with key material.
//!
//! `SignCert` CSR encoding (ours; dstack uses SCALE): `csr` is UTF-8 JSON
//! `{"confirm": "please sign cert:", "pubkey": "<hex SubjectPublicKeyInfo DER, P-256>",
//!   "config": {"org_name"?: str, "subject": str, "subject_alt_names": [str], "usage_server_auth": bool,
//!   "usage_client_auth": bool, "ext_quote": bool, "not_before"?: u64, "not_after"?: u64},
//!  "attestation"?: {"quote": "<hex TDX quote>", "event_log": [<dstack JSON event-log entries>]}}`
//! and `signature` is the ECDSA P-256/SHA-256 signature (ASN.1 DER) of the exact `csr` bytes by that key. The
//! app identity comes from the caller's RA-TLS certificate (not from the CSR), so a CVM can only obtain
//! certificates for its own app id. With `ext_quote` (the agent's `GetTlsKey{usage_ra_tls}`) the CSR carries the
//! attestation of the CSR key (report data `sha512("ratls-cert:" ‖ SPKI)`); the issued leaf embeds it (dstack
//! OIDs) and is verified like any RA-TLS certificate before it is returned: quote, key binding, event-log replay,
//! and its attested app id and instance id must be the caller's. The certificate is issued under the app CA
//! (`derive_p256(root_ca, [app_id, "app-ca"])`, "Dstack App CA", usage `app:ca`) with usage `app:custom`;
//! the chain returned is `[leaf, app CA, KMS root CA]`. Each leaf gets a random 16-byte serial (what
//! `Admin.RevokeCerts` names) and, unless the CSR asks otherwise, notBefore = the time of issue (what an
//! app-wide revocation's `issued_before` compares against).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use dstack_keys::app_keys::{AppLevelKeys, ID_LEN, app_ca_key, env_pubkey_response};
use dstack_keys::kdf::p256_pkcs8_der;
use dstack_ra_tls::{AttestationVerifier, AttestedIdentity, CaCert, CertAttestation, CertRequest};
use dstack_rpc::kms::{
    AppId, AppKeyResponse, GetAppKeyRequest, GetKmsKeyRequest, GetMetaResponse, GetTempCaCertResponse, KmsKeyResponse,
    KmsKeys, KmsRpc, PublicKeyResponse, SignCertRequest, SignCertResponse,
};
use dstack_rpc::{CallContext, Empty, RpcError};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::image::{ImageVerifier, os_image_hash_from_vm_config};
use crate::policy::{AuthApi, BootInfo};
use crate::revocation::RevocationStore;
use crate::store::KeyMaterial;

/// Maximum number of apps whose instance-independent keys are cached.
const APP_CACHE_MAX: usize = 4096;

/// Shared state of the KMS service.
pub struct KmsState {
    pub keys: KeyMaterial,
    pub verifier: Arc<AttestationVerifier>,
    pub auth: AuthApi,
    /// `[core.image] verify`: callers' MRTD/RTMR0-2 must match their OS image.
    pub image: Option<Arc<ImageVerifier>>,
    /// This KMS's revocation list: callers presenting a revoked certificate issued under the root are refused.
    pub revocations: Option<Arc<RevocationStore>>,
    app_cache: Mutex<HashMap<[u8; ID_LEN], AppLevelKeys>>,
}

impl std::fmt::Debug for KmsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsState")
            .field("keys", &self.keys)
            .field("auth", &self.auth.describe())
            .finish_non_exhaustive()
    }
}

/// The `KMS` RPC handler.
#[derive(Debug, Clone)]
pub struct KmsService(pub Arc<KmsState>);

impl KmsService {
    pub fn new(
        keys: KeyMaterial,
        verifier: Arc<AttestationVerifier>,
        auth: AuthApi,
        image: Option<Arc<ImageVerifier>>,
        revocations: Option<Arc<RevocationStore>>,
    ) -> Self {
        Self(Arc::new(KmsState {
            keys,
            verifier,
            auth,
            image,
            revocations,
            app_cache: Mutex::new(HashMap::new()),
        }))
    }
}

fn deny(msg: impl Into<String>) -> RpcError {
    RpcError::Handler(msg.into())
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// An attested caller and the policy input built from it.
struct Caller {
    identity: Arc<AttestedIdentity>,
    boot_info: BootInfo,
    app_id: [u8; ID_LEN],
    vm_config: String,
}

impl KmsState {
    /// Verifies the caller's RA-TLS certificate and builds its BootInfo (os_image_hash from `vm_config`).
    fn attested_caller(&self, ctx: &CallContext, method: &str, vm_config: &str) -> Result<Caller, RpcError> {
        let refuse = |reason: String| {
            tracing::warn!(method, remote = %ctx.remote, %reason, "refused: caller not attested");
            deny(format!("{method} refused: {reason}"))
        };
        let Some(leaf) = ctx.peer_leaf_certificate() else {
            return Err(refuse(
                "an RA-TLS client certificate is required and none was presented".into(),
            ));
        };
        // A certificate the KMS issued (e.g. an RA-TLS app certificate from SignCert) may have been revoked
        // since; its chain is checked against our own list before its attestation is looked at.
        if let Some(store) = &self.revocations {
            let chain: Vec<&[u8]> = ctx.peer_certificates.iter().flatten().map(|c| c.as_ref()).collect();
            if let Err(e) = store.check_chain(&self.keys.root_ca, &chain, now_secs()) {
                return Err(refuse(format!("client certificate refused: {e}")));
            }
        }
        let identity = match self.verifier.verify_cert(leaf, now_secs()) {
            Ok(Some(id)) => id,
            Ok(None) => return Err(refuse("the client certificate carries no attestation".into())),
            Err(e) => return Err(refuse(format!("attestation verification failed: {e}"))),
        };
        let os_image_hash = if vm_config.trim().is_empty() {
            None
        } else {
            os_image_hash_from_vm_config(vm_config).map_err(|e| refuse(format!("vm_config: {e}")))?
        };
        let app_id: [u8; ID_LEN] = identity.app_id.as_slice().try_into().map_err(|_| {
            refuse(format!(
                "attested app-id is {} bytes, expected {ID_LEN}",
                identity.app_id.len()
            ))
        })?;
        if !(identity.instance_id.is_empty() || identity.instance_id.len() == ID_LEN) {
            return Err(refuse(format!(
                "attested instance-id is {} bytes, expected {ID_LEN} or none",
                identity.instance_id.len()
            )));
        }
        let boot_info = BootInfo::from_identity(&identity, os_image_hash);
        Ok(Caller {
            identity,
            boot_info,
            app_id,
            vm_config: vm_config.to_owned(),
        })
    }

    /// Asks the policy, then (when configured) checks the OS image; logs the decision. Returns the gateway app
    /// id on success.
    async fn authorize(&self, method: &str, caller: &Caller, is_kms: bool) -> Result<String, RpcError> {
        let info = &caller.boot_info;
        let decision = self.auth.is_allowed(info, is_kms).await;
        let (mut allowed, mut reason, gateway_app_id) = match decision {
            Ok(r) => (r.is_allowed, r.reason, r.gateway_app_id),
            Err(e) => (false, format!("policy unavailable: {e}"), String::new()),
        };
        let mut by = "by policy";
        if let (true, Some(image)) = (allowed, &self.image)
            && let Err(e) = image.verify(&caller.vm_config, &caller.identity).await
        {
            allowed = false;
            by = "by OS image verification";
            reason = e.to_string();
        }
        let log = |decision: &str| {
            tracing::info!(
                method,
                decision,
                by,
                %reason,
                app_id = %hex::encode(&info.app_id),
                instance_id = %hex::encode(&info.instance_id),
                compose_hash = %hex::encode(&info.compose_hash),
                mr_aggregated = %hex::encode(&info.mr_aggregated),
                tcb_status = %info.tcb_status,
                simulated = caller.identity.simulated,
                policy = %self.auth.describe(),
                "key release decision"
            );
        };
        if allowed {
            log("allow");
            Ok(gateway_app_id)
        } else {
            log("deny");
            Err(deny(format!("{method} denied {by}: {reason}")))
        }
    }

    fn app_level_keys(&self, app_id: &[u8; ID_LEN]) -> Result<AppLevelKeys, RpcError> {
        if let Some(k) = self.app_cache.lock().unwrap_or_else(|p| p.into_inner()).get(app_id) {
            return Ok(k.clone());
        }
        let k = AppLevelKeys::derive(&self.keys.root_ca_secret, &self.keys.root_k256, app_id)
            .map_err(|e| RpcError::Internal(format!("key derivation: {e}")))?;
        let mut cache = self.app_cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= APP_CACHE_MAX {
            cache.clear();
        }
        cache.insert(*app_id, k.clone());
        Ok(k)
    }

    fn app_ca(&self, app_id: &[u8; ID_LEN]) -> Result<CaCert, RpcError> {
        let internal = |e: &dyn std::fmt::Display| RpcError::Internal(format!("app CA: {e}"));
        let secret = app_ca_key(&self.keys.root_ca_secret, app_id).map_err(|e| internal(&e))?;
        let der = p256_pkcs8_der(&secret).map_err(|e| internal(&e))?;
        let key = rcgen::KeyPair::try_from(&der[..]).map_err(|e| internal(&e))?;
        let req = CertRequest {
            subject: "Dstack App CA".into(),
            org_name: Some("Dstack".into()),
            ca_level: Some(0),
            app_id: Some(app_id.to_vec()),
            special_usage: Some("app:ca".into()),
            // Not rcgen's 1975 default: an app-wide revocation compares notBefore with its cutoff.
            not_before: Some(SystemTime::now()),
            ..Default::default()
        };
        CaCert::issued_by(&req, key, &self.keys.root_ca).map_err(|e| internal(&e))
    }
}

/// The JSON CSR `SignCert` accepts (see the module docs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonCsr {
    confirm: String,
    pubkey: String,
    config: CsrConfig,
    #[serde(default)]
    attestation: Option<CsrAttestation>,
}

/// The attestation of the CSR key (`ext_quote`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CsrAttestation {
    /// Hex TDX quote.
    quote: String,
    event_log: Vec<dstack_tee::TdxEvent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CsrConfig {
    #[serde(default)]
    org_name: Option<String>,
    subject: String,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    #[serde(default)]
    usage_server_auth: bool,
    #[serde(default)]
    usage_client_auth: bool,
    #[serde(default)]
    ext_quote: bool,
    /// UNIX seconds.
    #[serde(default)]
    not_before: Option<u64>,
    #[serde(default)]
    not_after: Option<u64>,
}

const CSR_CONFIRM: &str = "please sign cert:";

/// A P-256 public key (uncompressed SEC1 point) for rcgen.
#[derive(Debug)]
struct P256Public(Vec<u8>);

impl rcgen::PublicKeyData for P256Public {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Parses and checks a CSR: the confirm string and the signature by the key it names.
fn check_csr(csr: &[u8], signature: &[u8]) -> Result<(JsonCsr, P256Public), String> {
    use p256::ecdsa::signature::Verifier;
    use p256::pkcs8::DecodePublicKey;
    let parsed: JsonCsr = serde_json::from_slice(csr).map_err(|e| format!("csr JSON: {e}"))?;
    if parsed.confirm != CSR_CONFIRM {
        return Err(format!("csr.confirm must be {CSR_CONFIRM:?}"));
    }
    if parsed.config.ext_quote != parsed.attestation.is_some() {
        return Err("csr.config.ext_quote and csr.attestation must be given together".into());
    }
    let spki = hex::decode(&parsed.pubkey).map_err(|e| format!("csr.pubkey hex: {e}"))?;
    let public = p256::PublicKey::from_public_key_der(&spki).map_err(|e| format!("csr.pubkey: {e}"))?;
    let sig = p256::ecdsa::Signature::from_der(signature).map_err(|e| format!("signature: {e}"))?;
    let vk = p256::ecdsa::VerifyingKey::from(&public);
    vk.verify(csr, &sig)
        .map_err(|_| "signature does not verify with csr.pubkey".to_owned())?;
    Ok((parsed, P256Public(vk.to_sec1_point(false).as_bytes().to_vec())))
}

impl KmsRpc for KmsService {
    async fn get_app_key(&self, ctx: &CallContext, req: GetAppKeyRequest) -> Result<AppKeyResponse, RpcError> {
        if req.api_version > 1 {
            return Err(deny(format!("unsupported api_version {}", req.api_version)));
        }
        let s = &self.0;
        let caller = s.attested_caller(ctx, "GetAppKey", &req.vm_config)?;
        let gateway_app_id = s.authorize("GetAppKey", &caller, false).await?;
        let keys = s
            .app_level_keys(&caller.app_id)?
            .for_instance(&s.keys.root_ca_secret, &caller.identity.instance_id)
            .map_err(|e| RpcError::Internal(format!("key derivation: {e}")))?;
        Ok(AppKeyResponse {
            ca_cert: s.keys.root_ca.cert_pem().to_owned(),
            disk_crypt_key: keys.disk_crypt_key.to_vec(),
            env_crypt_key: keys.env_crypt_key.to_vec(),
            k256_key: keys.k256_key.to_vec(),
            k256_signature: keys.k256_signature.to_vec(),
            tproxy_app_id: gateway_app_id.clone(),
            gateway_app_id,
            os_image_hash: caller.boot_info.os_image_hash.clone(),
        })
    }

    async fn get_kms_key(&self, ctx: &CallContext, req: GetKmsKeyRequest) -> Result<KmsKeyResponse, RpcError> {
        let s = &self.0;
        let caller = s.attested_caller(ctx, "GetKmsKey", &req.vm_config)?;
        s.authorize("GetKmsKey", &caller, true).await?;
        tracing::warn!(
            app_id = %hex::encode(caller.app_id),
            "releasing the KMS root keys to another KMS (isKmsAllowed passed)"
        );
        Ok(KmsKeyResponse {
            temp_ca_key: s.keys.tmp_ca.key().serialize_pem(),
            keys: vec![KmsKeys {
                ca_key: s.keys.root_ca.key().serialize_pem(),
                k256_key: Zeroizing::new(s.keys.root_k256.to_bytes().to_vec()).to_vec(),
            }],
        })
    }

    async fn get_app_env_encrypt_pub_key(&self, _ctx: &CallContext, req: AppId) -> Result<PublicKeyResponse, RpcError> {
        let app_id: [u8; ID_LEN] = req
            .app_id
            .as_slice()
            .try_into()
            .map_err(|_| deny(format!("app_id must be {ID_LEN} bytes, got {}", req.app_id.len())))?;
        let r = env_pubkey_response(&self.0.keys.root_ca_secret, &self.0.keys.root_k256, &app_id, now_secs())
            .map_err(|e| RpcError::Internal(format!("key derivation: {e}")))?;
        Ok(PublicKeyResponse {
            public_key: r.public_key.to_vec(),
            signature: r.signature.to_vec(),
            timestamp: r.timestamp,
            signature_v1: r.signature_v1.to_vec(),
        })
    }

    async fn get_meta(&self, _ctx: &CallContext, _req: Empty) -> Result<GetMetaResponse, RpcError> {
        let s = &self.0;
        let (kms_contract_address, chain_id) = s.auth.chain_meta().await;
        Ok(GetMetaResponse {
            ca_cert: s.keys.root_ca.cert_pem().to_owned(),
            allow_any_upgrade: false,
            k256_pubkey: s.keys.k256_pubkey(),
            bootstrap_info: Some(s.keys.bootstrap_info.clone()),
            is_dev: s.auth.is_dev(),
            gateway_app_id: s.auth.static_gateway_app_id().map(str::to_owned),
            kms_contract_address,
            chain_id,
            app_auth_implementation: None,
        })
    }

    async fn get_temp_ca_cert(&self, _ctx: &CallContext, _req: Empty) -> Result<GetTempCaCertResponse, RpcError> {
        let k = &self.0.keys;
        Ok(GetTempCaCertResponse {
            temp_ca_cert: k.tmp_ca.cert_pem().to_owned(),
            temp_ca_key: k.tmp_ca.key().serialize_pem(),
            ca_cert: k.root_ca.cert_pem().to_owned(),
        })
    }

    async fn sign_cert(&self, ctx: &CallContext, req: SignCertRequest) -> Result<SignCertResponse, RpcError> {
        if req.api_version != 1 {
            return Err(deny(format!(
                "unsupported api_version {} (this KMS accepts the JSON CSR as api_version 1)",
                req.api_version
            )));
        }
        let s = &self.0;
        let (csr, public) = check_csr(&req.csr, &req.signature).map_err(|e| deny(format!("SignCert: {e}")))?;
        let caller = s.attested_caller(ctx, "SignCert", &req.vm_config)?;
        s.authorize("SignCert", &caller, false).await?;
        let app_ca = s.app_ca(&caller.app_id)?;
        let attestation = match csr.attestation {
            Some(a) => Some(CertAttestation {
                quote: hex::decode(&a.quote).map_err(|e| deny(format!("SignCert: csr.attestation.quote hex: {e}")))?,
                event_log: a.event_log,
            }),
            None => None,
        };
        let secs = |t: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(t);
        let cert_req = CertRequest {
            subject: csr.config.subject,
            org_name: csr.config.org_name,
            alt_names: csr.config.subject_alt_names,
            usage_server_auth: csr.config.usage_server_auth,
            usage_client_auth: csr.config.usage_client_auth,
            app_id: Some(caller.app_id.to_vec()),
            special_usage: Some("app:custom".into()),
            not_before: Some(csr.config.not_before.map_or_else(SystemTime::now, secs)),
            not_after: csr.config.not_after.map(secs),
            attestation,
            ..Default::default()
        };
        let quoted = cert_req.attestation.is_some();
        let mut serial = [0u8; 16];
        getrandom::fill(&mut serial).map_err(|e| RpcError::Internal(format!("SignCert: serial: {e}")))?;
        // Positive and exactly 16 bytes (no leading zero byte to strip).
        serial[0] = (serial[0] & 0x7f) | 0x40;
        let leaf = app_ca
            .issue_with_serial(&cert_req, &public, &serial)
            .map_err(|e| deny(format!("SignCert: {e}")))?;
        tracing::info!(
            app_id = %hex::encode(caller.app_id),
            serial = %hex::encode(serial),
            "SignCert: certificate issued"
        );
        if quoted {
            // The embedded attestation must verify for this key and be the caller's own app and instance.
            let id = match s.verifier.verify_cert(leaf.der(), now_secs()) {
                Ok(Some(id)) => id,
                Ok(None) => return Err(deny("SignCert: the issued certificate carries no attestation")),
                Err(e) => return Err(deny(format!("SignCert: csr.attestation does not verify: {e}"))),
            };
            if id.app_id != caller.app_id || id.instance_id != caller.identity.instance_id {
                return Err(deny(format!(
                    "SignCert: csr.attestation is of app {} instance {}, not the caller's",
                    hex::encode(&id.app_id),
                    hex::encode(&id.instance_id)
                )));
            }
        }
        Ok(SignCertResponse {
            certificate_chain: vec![
                leaf.pem(),
                app_ca.cert_pem().to_owned(),
                s.keys.root_ca.cert_pem().to_owned(),
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_checks() {
        use p256::ecdsa::signature::Signer;
        use p256::pkcs8::EncodePublicKey;
        let sk = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let spki = sk.verifying_key().to_public_key_der().unwrap();
        let csr = serde_json::json!({
            "confirm": CSR_CONFIRM,
            "pubkey": hex::encode(spki.as_bytes()),
            "config": {"subject": "app.example", "subject_alt_names": ["app.example"], "usage_server_auth": true}
        })
        .to_string();
        let sig: p256::ecdsa::Signature = sk.sign(csr.as_bytes());
        let (parsed, key) = check_csr(csr.as_bytes(), sig.to_der().as_bytes()).unwrap();
        assert_eq!(parsed.config.subject, "app.example");
        use rcgen::PublicKeyData;
        assert_eq!(key.subject_public_key_info(), spki.as_bytes());
        // Signature over other bytes, wrong confirm, unknown field.
        let other: p256::ecdsa::Signature = sk.sign(b"other");
        assert!(
            check_csr(csr.as_bytes(), other.to_der().as_bytes())
                .unwrap_err()
                .contains("does not verify")
        );
        let bad = csr.replace(CSR_CONFIRM, "sign it");
        let sig: p256::ecdsa::Signature = sk.sign(bad.as_bytes());
        assert!(
            check_csr(bad.as_bytes(), sig.to_der().as_bytes())
                .unwrap_err()
                .contains("confirm")
        );
        assert!(check_csr(b"{\"x\":1}", &[]).is_err());
    }
}
