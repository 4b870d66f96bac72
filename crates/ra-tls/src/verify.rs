//! Attestation verification of an RA-TLS certificate and the identity it proves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dcap_qvl::QuoteCollateralV3;
use dstack_measurements::eventlog::{JsonLogError, check_against_report, derive_identity, parse_json_log};
use dstack_measurements::quote::Quote;
use dstack_measurements::sim::SimRootPin;
use dstack_measurements::verify::{TcbStatus, VerifyError, VerifyOptions, verify_quote};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{RaTlsError, parse_cert, ra_tls_report_data};

/// Supplies Intel collateral for real quotes (e.g. fetched from a PCCS ahead of time and cached). rustls
/// verifiers are synchronous, so this is too.
pub trait CollateralProvider: Send + Sync + std::fmt::Debug {
    fn collateral(&self, quote: &[u8]) -> Result<QuoteCollateralV3, String>;
}

/// One fixed collateral set (offline verification, tests).
#[derive(Debug, Clone)]
pub struct StaticCollateral(pub QuoteCollateralV3);

impl CollateralProvider for StaticCollateral {
    fn collateral(&self, _quote: &[u8]) -> Result<QuoteCollateralV3, String> {
        Ok(self.0.clone())
    }
}

/// What the verifier accepts.
#[derive(Debug, Clone, Default)]
pub struct AttestationPolicy {
    /// Accept simulated quotes (TCB status `Simulated`) signed under one of `simulated_roots`.
    pub allow_simulated: bool,
    pub simulated_roots: Vec<SimRootPin>,
    /// Accept TDs with the DEBUG attribute.
    pub allow_debug: bool,
    /// Collateral for real quotes; without it real quotes fail.
    pub collateral: Option<Arc<dyn CollateralProvider>>,
    /// Required special usage (`.1.4`) of the attested certificate, e.g. `kms:rpc`.
    pub required_usage: Option<String>,
    /// How long a verified certificate stays cached (default 5 minutes).
    pub cache_ttl: Option<Duration>,
}

/// The identity an attested certificate proves (byte fields serialize as hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttestedIdentity {
    #[serde(with = "dstack_measurements::hexser")]
    pub app_id: Vec<u8>,
    #[serde(with = "dstack_measurements::hexser")]
    pub compose_hash: Vec<u8>,
    #[serde(with = "dstack_measurements::hexser")]
    pub instance_id: Vec<u8>,
    #[serde(with = "dstack_measurements::hexser")]
    pub mr_aggregated: Vec<u8>,
    #[serde(with = "dstack_measurements::hexser")]
    pub mr_system: Vec<u8>,
    #[serde(with = "dstack_measurements::hexser")]
    pub os_image_hash: Vec<u8>,
    /// `sha256(PPID)` of the verified PCK certificate (the simulator's per-host PPID for simulated quotes);
    /// empty when the certificate carries no PPID.
    #[serde(with = "dstack_measurements::hexser")]
    pub device_id: Vec<u8>,
    pub key_provider_info: String,
    pub tcb_status: TcbStatus,
    pub advisory_ids: Vec<String>,
    /// True for simulated quotes (never real TDX).
    pub simulated: bool,
    #[serde(with = "dstack_measurements::hexser")]
    pub mrtd: Vec<u8>,
    pub rtmrs: [String; 4],
    #[serde(with = "dstack_measurements::hexser")]
    pub mr_config_id: Vec<u8>,
    /// `.1.4` of the certificate.
    pub special_usage: Option<String>,
    /// RTMR3 replayed up to `boot-mr-done` (what dstack's SignCert path authorizes).
    #[serde(with = "dstack_measurements::hexser")]
    pub boot_rtmr3: Vec<u8>,
}

const MAX_CACHE: usize = 4096;

/// Certificate SHA-256 → (identity, when it was verified).
type Cache = HashMap<[u8; 32], (Arc<AttestedIdentity>, Instant)>;

/// Verifies RA-TLS certificates and caches the results by certificate hash.
#[derive(Debug)]
pub struct AttestationVerifier {
    policy: AttestationPolicy,
    cache: Mutex<Cache>,
}

impl AttestationVerifier {
    pub fn new(policy: AttestationPolicy) -> Self {
        Self {
            policy,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn policy(&self) -> &AttestationPolicy {
        &self.policy
    }

    fn ttl(&self) -> Duration {
        self.policy.cache_ttl.unwrap_or(Duration::from_secs(300))
    }

    /// A cached identity of `cert_der`, if verified recently.
    pub fn cached(&self, cert_der: &[u8]) -> Option<Arc<AttestedIdentity>> {
        let key: [u8; 32] = Sha256::digest(cert_der).into();
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(&key)
            .filter(|(_, at)| at.elapsed() < self.ttl())
            .map(|(id, _)| Arc::clone(id))
    }

    /// Verifies the attestation of `cert_der` at `now` (UNIX seconds): `Ok(None)` when the certificate has no
    /// attestation, an error when it has one that does not verify.
    pub fn verify_cert(&self, cert_der: &[u8], now: u64) -> Result<Option<Arc<AttestedIdentity>>, RaTlsError> {
        if let Some(id) = self.cached(cert_der) {
            return Ok(Some(id));
        }
        let Some(id) = self.verify_uncached(cert_der, now)? else {
            return Ok(None);
        };
        let id = Arc::new(id);
        let key: [u8; 32] = Sha256::digest(cert_der).into();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHE {
            let ttl = self.ttl();
            cache.retain(|_, (_, at)| at.elapsed() < ttl);
            if cache.len() >= MAX_CACHE {
                cache.clear();
            }
        }
        cache.insert(key, (Arc::clone(&id), Instant::now()));
        Ok(Some(id))
    }

    fn verify_uncached(&self, cert_der: &[u8], now: u64) -> Result<Option<AttestedIdentity>, RaTlsError> {
        let cert = parse_cert(cert_der)?;
        let Some(quote_raw) = cert.quote.as_deref() else {
            if cert.has_versioned_attestation {
                return Err(RaTlsError::UnsupportedAttestationFormat);
            }
            return Ok(None);
        };
        if let Some(expected) = &self.policy.required_usage
            && cert.special_usage.as_deref() != Some(expected.as_str())
        {
            return Err(RaTlsError::UsageMismatch {
                expected: expected.clone(),
                found: cert.special_usage.clone(),
            });
        }
        let log_json = cert.event_log.as_deref().ok_or(RaTlsError::MissingEventLog)?;

        // Key binding first: cheap, and a quote lifted from another certificate fails here.
        let quote = Quote::parse(quote_raw).map_err(|e| RaTlsError::Quote(VerifyError::Quote(e)))?;
        let expected = ra_tls_report_data(&cert.spki_der);
        if quote.report.report_data != expected {
            return Err(RaTlsError::KeyBinding {
                expected: hex::encode(expected),
                found: hex::encode(quote.report.report_data),
            });
        }

        let collateral = match &self.policy.collateral {
            Some(p) if !dstack_measurements::sim::is_simulated_quote(&quote) => Some(
                p.collateral(quote_raw)
                    .map_err(|e| RaTlsError::Quote(VerifyError::Collateral(e)))?,
            ),
            _ => None,
        };
        let opts = VerifyOptions {
            now,
            allow_simulated: self.policy.allow_simulated,
            simulated_roots: self.policy.simulated_roots.clone(),
            allow_debug: self.policy.allow_debug,
        };
        let verified = verify_quote(quote_raw, collateral.as_ref(), &opts)?;

        let events = parse_json_log(log_json).map_err(|e: JsonLogError| RaTlsError::EventLog(e.to_string()))?;
        let check = check_against_report(&events, &verified.quote.report)
            .map_err(|e| RaTlsError::EventLogMismatch(e.to_string()))?;
        if let Some(bad) = check.registers.iter().find(|r| !r.matches) {
            return Err(RaTlsError::EventLogMismatch(format!(
                "{} replays to {} but the quote has {}",
                bad.register, bad.replayed, bad.quote
            )));
        }
        let app = derive_identity(&events, &verified.quote.report, None)
            .map_err(|e| RaTlsError::EventLogMismatch(e.to_string()))?;
        let r = &verified.quote.report;
        Ok(Some(AttestedIdentity {
            app_id: app.app_id,
            compose_hash: app.compose_hash,
            instance_id: app.instance_id,
            mr_aggregated: app.mr_aggregated,
            mr_system: app.mr_system,
            os_image_hash: app.os_image_hash,
            device_id: verified.device_id(),
            key_provider_info: app.key_provider_info,
            simulated: verified.is_simulated(),
            tcb_status: verified.status,
            advisory_ids: verified.advisory_ids,
            mrtd: r.mr_td.to_vec(),
            rtmrs: r.rtmr.map(hex::encode),
            mr_config_id: r.mr_config_id.to_vec(),
            special_usage: cert.special_usage,
            boot_rtmr3: app.boot_rtmr3,
        }))
    }
}
