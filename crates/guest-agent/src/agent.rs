//! The agent state and every operation behind the RPCs.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dstack_keys::KeyAlgorithm;
use dstack_measurements::eventlog::mr_aggregated;
use dstack_measurements::quote::Quote;
use dstack_ra_tls::{CertAttestation, CertRequest, ra_tls_report_data};
use dstack_rpc::agent::{
    AppInfo, AttestResponse, DeriveKeyArgs, GetKeyResponse, GetQuoteResponse, GetTlsKeyArgs, GetTlsKeyResponse,
    SignResponse, TdxQuoteResponse,
};
use dstack_tee::{RuntimeEvent, RuntimeEventLog, TdxEvent, Tee};
use dstack_types::AppKeys;
use ed25519_dalek::Signer as _;
use k256::ecdsa::signature::Verifier as _;
use k256::ecdsa::signature::hazmat::{PrehashSigner as _, PrehashVerifier as _};
use rcgen::{KeyPair, PublicKeyData as _};
use serde::Serialize;
use tokio::sync::OnceCell;
use zeroize::Zeroizing;

use crate::AgentError;
use crate::attestation::Attestation;
use crate::cert::{CertSigner, p256_key_pair, random_p256_key};
use crate::report_data::{pad_report_data, tdx_quote_report_data};

/// `Sign` uses the `GetKey` key of this path and purpose (dstack).
pub const SIGN_KEY_PATH: &str = "vms";
/// See [`SIGN_KEY_PATH`].
pub const SIGN_KEY_PURPOSE: &str = "signing";
/// Longest accepted `EmitEvent` name (dstack sets no limit; this keeps the log line sane).
const MAX_EVENT_NAME: usize = 256;
/// Longest accepted `EmitEvent` payload.
const MAX_EVENT_PAYLOAD: usize = 64 * 1024;
/// Attempts at a quote whose RTMR3 matches the runtime log read just before it (an `EmitEvent` in between
/// changes RTMR3).
const EVIDENCE_ATTEMPTS: usize = 3;

/// Everything the agent needs, as the guest has it after boot.
pub struct AgentConfig {
    /// `.appkeys.json`; `k256_key` is the app root key (never returned).
    pub app_keys: AppKeys,
    /// Issues `GetTlsKey` certificates under the app CA.
    pub cert_signer: Arc<dyn CertSigner>,
    /// RTMR3 runtime event log (also gives the [`Tee`]).
    pub event_log: Arc<RuntimeEventLog>,
    /// Raw `app-compose.json` text (its SHA-256 is `compose_hash`).
    pub app_compose: String,
    /// `app-compose.json` `name`.
    pub app_name: String,
    pub app_id: Vec<u8>,
    /// 20 bytes, or empty with `no_instance_id`.
    pub instance_id: Vec<u8>,
    pub compose_hash: Vec<u8>,
    /// sha256(PPID) on TDX; empty when unknown (simulated TEE).
    pub device_id: Vec<u8>,
    /// The VmConfig JSON string from `.sys-config.json`.
    pub vm_config: String,
    pub os_image_hash: Vec<u8>,
    /// The `key-provider` event payload (`{"name":..,"id":..}`).
    pub key_provider_info: String,
    /// Verbatim GPU attestation JSON saved at boot ("" without GPUs).
    pub gpu_attestation: String,
    pub cloud_vendor: String,
    pub cloud_product: String,
}

/// The guest agent.
pub struct Agent {
    cfg: AgentConfig,
    app_k256: Zeroizing<[u8; 32]>,
    app_cert: OnceCell<String>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("app_id", &hex::encode(&self.cfg.app_id))
            .field("instance_id", &hex::encode(&self.cfg.instance_id))
            .finish_non_exhaustive()
    }
}

/// `Info.tcb_info` (dstack's field names and order).
#[derive(Serialize)]
struct TcbInfo<'a> {
    mrtd: String,
    rtmr0: String,
    rtmr1: String,
    rtmr2: String,
    rtmr3: String,
    mr_aggregated: String,
    os_image_hash: String,
    compose_hash: String,
    device_id: String,
    event_log: &'a [TdxEvent],
    app_compose: &'a str,
}

fn secs(t: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t)
}

impl Agent {
    /// Checks the key material and builds the agent.
    pub fn new(cfg: AgentConfig) -> Result<Self, AgentError> {
        let app_k256: [u8; 32] = cfg.app_keys.k256_key.as_slice().try_into().map_err(|_| {
            AgentError::Config(format!(
                "k256_key: expected 32 bytes, got {}",
                cfg.app_keys.k256_key.len()
            ))
        })?;
        dstack_keys::sig::k256_signing_key(&app_k256)?;
        Ok(Self {
            cfg,
            app_k256: Zeroizing::new(app_k256),
            app_cert: OnceCell::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    fn tee(&self) -> &Arc<dyn Tee> {
        self.cfg.event_log.tee()
    }

    /// Boot events followed by the verified runtime events.
    pub async fn event_log(&self) -> Result<Vec<TdxEvent>, AgentError> {
        Ok(self.cfg.event_log.full_event_log().await?)
    }

    async fn event_log_json(&self) -> Result<String, AgentError> {
        serde_json::to_string(&self.event_log().await?).map_err(|e| AgentError::Internal(e.to_string()))
    }

    /// `GetKey`: `derive_key(app_k256, [path])` with its signature chain.
    pub fn get_key(&self, path: &str, purpose: &str, algorithm: &str) -> Result<GetKeyResponse, AgentError> {
        let alg = KeyAlgorithm::parse(algorithm)?;
        let k = dstack_keys::get_key(&self.app_k256, &self.cfg.app_keys.k256_signature, path, purpose, alg)?;
        Ok(GetKeyResponse {
            key: k.key.to_vec(),
            signature_chain: k.signature_chain.to_vec(),
        })
    }

    /// `Sign` with the `vms`/`signing` key: ed25519, secp256k1 (ECDSA over SHA-256, 64-byte r‖s) or
    /// secp256k1_prehashed (32-byte digest).
    pub fn sign(&self, algorithm: &str, data: &[u8]) -> Result<SignResponse, AgentError> {
        let key_alg = match algorithm {
            "ed25519" => KeyAlgorithm::Ed25519,
            "secp256k1" | "k256" | "secp256k1_prehashed" => KeyAlgorithm::Secp256k1,
            other => return Err(AgentError::InvalidArgument(format!("unsupported algorithm {other:?}"))),
        };
        let k = dstack_keys::get_key(
            &self.app_k256,
            &self.cfg.app_keys.k256_signature,
            SIGN_KEY_PATH,
            SIGN_KEY_PURPOSE,
            key_alg,
        )?;
        let signature = match algorithm {
            "ed25519" => ed25519_dalek::SigningKey::from_bytes(&k.key)
                .sign(data)
                .to_bytes()
                .to_vec(),
            _ => {
                let sk = dstack_keys::sig::k256_signing_key(&k.key[..])?;
                let sig: k256::ecdsa::Signature = if algorithm == "secp256k1_prehashed" {
                    if data.len() != 32 {
                        return Err(AgentError::InvalidArgument(format!(
                            "secp256k1_prehashed needs a 32-byte digest, got {} bytes",
                            data.len()
                        )));
                    }
                    sk.sign_prehash(data).map_err(|e| AgentError::Internal(e.to_string()))?
                } else {
                    sk.sign(data)
                };
                sig.to_bytes().to_vec()
            }
        };
        let [app_sig, kms_sig] = k.signature_chain;
        Ok(SignResponse {
            signature_chain: vec![signature.clone(), app_sig, kms_sig],
            signature,
            public_key: k.public_key,
        })
    }

    /// `Verify`: malformed keys or signatures are errors; a well-formed wrong signature is `false`.
    pub fn verify(
        &self,
        algorithm: &str,
        data: &[u8],
        signature: &[u8],
        public_key: &[u8],
    ) -> Result<bool, AgentError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| AgentError::InvalidArgument(format!("{what}: {e}"));
        match algorithm {
            "ed25519" => {
                let pk: &[u8; 32] = public_key
                    .try_into()
                    .map_err(|_| bad("public_key", &format!("expected 32 bytes, got {}", public_key.len())))?;
                let vk = ed25519_dalek::VerifyingKey::from_bytes(pk).map_err(|e| bad("public_key", &e))?;
                let sig = ed25519_dalek::Signature::from_slice(signature).map_err(|e| bad("signature", &e))?;
                Ok(vk.verify_strict(data, &sig).is_ok())
            }
            "secp256k1" | "k256" | "secp256k1_prehashed" => {
                let vk = k256::ecdsa::VerifyingKey::from_sec1_bytes(public_key).map_err(|e| bad("public_key", &e))?;
                let sig = k256::ecdsa::Signature::from_slice(signature).map_err(|e| bad("signature", &e))?;
                if algorithm == "secp256k1_prehashed" {
                    if data.len() != 32 {
                        return Err(bad("data", &format!("expected a 32-byte digest, got {}", data.len())));
                    }
                    Ok(vk.verify_prehash(data, &sig).is_ok())
                } else {
                    Ok(vk.verify(data, &sig).is_ok())
                }
            }
            other => Err(AgentError::InvalidArgument(format!("unsupported algorithm {other:?}"))),
        }
    }

    async fn quote(&self, report_data: [u8; 64]) -> Result<Vec<u8>, AgentError> {
        Ok(self.tee().quote(report_data).await?)
    }

    /// A quote over `report_data` and the runtime events its RTMR3 is the replay of.
    async fn evidence(&self, report_data: [u8; 64]) -> Result<(Vec<u8>, Vec<RuntimeEvent>), AgentError> {
        let mut last = String::new();
        for _ in 0..EVIDENCE_ATTEMPTS {
            let events = self.cfg.event_log.load_verified().await?;
            let raw = self.quote(report_data).await?;
            let quote = Quote::parse(&raw).map_err(|e| AgentError::Quote(e.to_string()))?;
            let digests: Vec<[u8; 48]> = events.iter().map(RuntimeEvent::digest).collect();
            let replayed = dstack_measurements::eventlog::replay_digests(&digests);
            if replayed == quote.report.rtmr[3] {
                return Ok((raw, events));
            }
            last = format!(
                "quoted RTMR3 {} but the {} logged events replay to {}",
                hex::encode(quote.report.rtmr[3]),
                events.len(),
                hex::encode(replayed)
            );
        }
        Err(AgentError::Quote(format!(
            "no consistent quote and event log after {EVIDENCE_ATTEMPTS} attempts: {last}"
        )))
    }

    /// Boot events followed by `runtime` as event-log entries.
    async fn full_log(&self, runtime: &[RuntimeEvent]) -> Result<Vec<TdxEvent>, AgentError> {
        let mut log = self.tee().boot_event_log().await?;
        log.extend(runtime.iter().map(RuntimeEvent::to_tdx_event));
        Ok(log)
    }

    /// `GetQuote`: report data ≤ 64 bytes, zero-padded.
    pub async fn get_quote(&self, report_data: &[u8]) -> Result<GetQuoteResponse, AgentError> {
        let rd = pad_report_data(report_data)?;
        let (quote, runtime) = self.evidence(rd).await?;
        let event_log =
            serde_json::to_string(&self.full_log(&runtime).await?).map_err(|e| AgentError::Internal(e.to_string()))?;
        Ok(GetQuoteResponse {
            quote,
            event_log,
            report_data: rd.to_vec(),
            vm_config: self.cfg.vm_config.clone(),
            attestation: Vec::new(),
        })
    }

    /// The versioned attestation `Attest` returns (see [`crate::attestation`]).
    pub async fn attestation(&self, report_data: &[u8]) -> Result<Attestation, AgentError> {
        let rd = pad_report_data(report_data)?;
        let (quote, runtime_events) = self.evidence(rd).await?;
        Ok(Attestation {
            quote,
            event_log: self.full_log(&runtime_events).await?,
            runtime_events,
            report_data: rd,
            config: self.cfg.vm_config.clone(),
        })
    }

    /// `Attest`: dstack's SCALE `VersionedAttestation::V0` bytes.
    pub async fn attest(&self, report_data: &[u8]) -> Result<AttestResponse, AgentError> {
        Ok(AttestResponse {
            attestation: self.attestation(report_data).await?.to_scale(),
        })
    }

    /// `Tappd.TdxQuote` (hashed report data) and `Tappd.RawQuote` (`hash_algorithm = "raw"`).
    pub async fn tdx_quote(
        &self,
        data: &[u8],
        hash_algorithm: &str,
        prefix: &str,
    ) -> Result<TdxQuoteResponse, AgentError> {
        let (rd, hash_algorithm, prefix) = tdx_quote_report_data(data, hash_algorithm, prefix)?;
        Ok(TdxQuoteResponse {
            quote: self.quote(rd).await?,
            event_log: self.event_log_json().await?,
            hash_algorithm,
            prefix,
        })
    }

    /// `EmitEvent`: extends RTMR3 and appends to the runtime event log.
    pub async fn emit_event(&self, event: &str, payload: &[u8]) -> Result<(), AgentError> {
        if event.is_empty() || event.len() > MAX_EVENT_NAME {
            return Err(AgentError::InvalidArgument(format!(
                "event name must be 1..={MAX_EVENT_NAME} bytes, got {}",
                event.len()
            )));
        }
        if payload.len() > MAX_EVENT_PAYLOAD {
            return Err(AgentError::InvalidArgument(format!(
                "event payload must be at most {MAX_EVENT_PAYLOAD} bytes, got {}",
                payload.len()
            )));
        }
        self.cfg.event_log.measure(event, payload).await?;
        Ok(())
    }

    /// Issues a certificate for `key`; with `ra_tls` it carries a quote binding the key and the event log.
    async fn certify(&self, mut req: CertRequest, key: &KeyPair, ra_tls: bool) -> Result<Vec<String>, AgentError> {
        if ra_tls {
            let rd = ra_tls_report_data(&key.subject_public_key_info());
            req.attestation = Some(CertAttestation {
                quote: self.quote(rd).await?,
                event_log: self.event_log().await?,
            });
        }
        self.cfg.cert_signer.sign(&req, key).await
    }

    /// `GetTlsKey`: a fresh random P-256 key certified by the app CA.
    pub async fn get_tls_key(&self, args: &GetTlsKeyArgs) -> Result<GetTlsKeyResponse, AgentError> {
        if let (Some(nb), Some(na)) = (args.not_before, args.not_after)
            && nb >= na
        {
            return Err(AgentError::InvalidArgument(format!(
                "not_before ({nb}) must be earlier than not_after ({na})"
            )));
        }
        if args.with_app_info {
            return Err(AgentError::Unsupported(
                "with_app_info: the app-info certificate extension is not implemented".into(),
            ));
        }
        let (key, pem) = random_p256_key()?;
        let req = CertRequest {
            subject: args.subject.clone(),
            alt_names: args.alt_names.clone(),
            usage_server_auth: args.usage_server_auth,
            usage_client_auth: args.usage_client_auth,
            app_id: Some(self.cfg.app_id.clone()),
            not_before: args.not_before.map(secs),
            not_after: args.not_after.map(secs),
            ..Default::default()
        };
        let certificate_chain = self.certify(req, &key, args.usage_ra_tls).await?;
        Ok(GetTlsKeyResponse {
            key: pem.to_string(),
            certificate_chain,
        })
    }

    /// Legacy `Tappd.DeriveKey`: the key is derived from the app key and `path` (deterministic) unless
    /// `random_seed`.
    pub async fn derive_key(&self, args: &DeriveKeyArgs) -> Result<GetTlsKeyResponse, AgentError> {
        let secret = if args.random_seed {
            let mut seed = Zeroizing::new([0u8; 32]);
            getrandom::fill(&mut seed[..]).map_err(|e| AgentError::Internal(format!("OS RNG: {e}")))?;
            dstack_keys::kdf::derive_p256_from_bytes(&seed[..], &[args.path.as_bytes()])?
        } else {
            dstack_keys::kdf::derive_p256_from_bytes(&self.app_k256[..], &[args.path.as_bytes()])?
        };
        let (key, pem) = p256_key_pair(&secret)?;
        let req = CertRequest {
            subject: args.subject.clone(),
            alt_names: args.alt_names.clone(),
            usage_server_auth: args.usage_server_auth,
            usage_client_auth: args.usage_client_auth,
            app_id: Some(self.cfg.app_id.clone()),
            ..Default::default()
        };
        let certificate_chain = self.certify(req, &key, args.usage_ra_tls).await?;
        Ok(GetTlsKeyResponse {
            key: pem.to_string(),
            certificate_chain,
        })
    }

    /// The lazily issued "demo-cert" of `Info.app_cert` (client auth, RA-TLS), as dstack does.
    async fn app_cert(&self) -> String {
        let issued = self
            .app_cert
            .get_or_try_init(|| async {
                let (key, _pem) = random_p256_key()?;
                let req = CertRequest {
                    subject: "demo-cert".into(),
                    usage_client_auth: true,
                    app_id: Some(self.cfg.app_id.clone()),
                    ..Default::default()
                };
                Ok::<_, AgentError>(self.certify(req, &key, true).await?.concat())
            })
            .await;
        match issued {
            Ok(pem) => pem.clone(),
            Err(e) => {
                tracing::warn!("issuing the Info app certificate failed: {e}");
                String::new()
            }
        }
    }

    /// `Info`: identities and `tcb_info` from a fresh quote (MRTD, RTMRs) and the replayed event log.
    pub async fn info(&self) -> Result<AppInfo, AgentError> {
        let raw = self.quote([0u8; 64]).await?;
        let quote = Quote::parse(&raw).map_err(|e| AgentError::Quote(e.to_string()))?;
        let report = &quote.report;
        let events = self.event_log().await?;
        let mr_agg = mr_aggregated(report);
        let [r0, r1, r2, r3] = report.rtmr.map(hex::encode);
        let tcb = TcbInfo {
            mrtd: hex::encode(report.mr_td),
            rtmr0: r0,
            rtmr1: r1,
            rtmr2: r2,
            rtmr3: r3,
            mr_aggregated: hex::encode(mr_agg),
            os_image_hash: hex::encode(&self.cfg.os_image_hash),
            compose_hash: hex::encode(&self.cfg.compose_hash),
            device_id: hex::encode(&self.cfg.device_id),
            event_log: &events,
            app_compose: &self.cfg.app_compose,
        };
        let tcb_info = serde_json::to_string_pretty(&tcb).map_err(|e| AgentError::Internal(e.to_string()))?;
        Ok(AppInfo {
            app_id: self.cfg.app_id.clone(),
            instance_id: self.cfg.instance_id.clone(),
            app_cert: self.app_cert().await,
            tcb_info,
            app_name: self.cfg.app_name.clone(),
            device_id: self.cfg.device_id.clone(),
            mr_aggregated: mr_agg.to_vec(),
            os_image_hash: self.cfg.os_image_hash.clone(),
            key_provider_info: self.cfg.key_provider_info.clone(),
            compose_hash: self.cfg.compose_hash.clone(),
            vm_config: self.cfg.vm_config.clone(),
            cloud_vendor: self.cfg.cloud_vendor.clone(),
            cloud_product: self.cfg.cloud_product.clone(),
        })
    }

    /// `GpuInfo`: the attestation JSON saved at boot ("" without GPUs).
    pub fn gpu_info(&self) -> String {
        self.cfg.gpu_attestation.clone()
    }
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;
