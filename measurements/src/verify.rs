//! Quote verification: real quotes with `dcap-qvl` (ring backend) against offline collateral
//! at an explicit UNIX time; simulated quotes (see [`crate::sim`]) only when explicitly
//! allowed and against a pinned simulator root.

use std::fmt;

use dcap_qvl::QuoteCollateralV3;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x509_cert::Certificate;

use crate::quote::{Quote, QuoteError};
use crate::sim::{SimError, SimRootPin, is_simulated_quote, sim_ppid, verify_simulated};

/// TCB status of a verified quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcbStatus {
    UpToDate,
    SwHardeningNeeded,
    ConfigurationNeeded,
    ConfigurationAndSwHardeningNeeded,
    OutOfDate,
    OutOfDateConfigurationNeeded,
    Revoked,
    /// Signed by a pinned simulator root: never a real TEE.
    Simulated,
    /// A status string dcap-qvl returned that we do not know.
    Other(String),
}

impl TcbStatus {
    /// The canonical string (Intel's spelling; `Simulated` for simulated quotes).
    pub fn as_str(&self) -> &str {
        match self {
            TcbStatus::UpToDate => "UpToDate",
            TcbStatus::SwHardeningNeeded => "SWHardeningNeeded",
            TcbStatus::ConfigurationNeeded => "ConfigurationNeeded",
            TcbStatus::ConfigurationAndSwHardeningNeeded => "ConfigurationAndSWHardeningNeeded",
            TcbStatus::OutOfDate => "OutOfDate",
            TcbStatus::OutOfDateConfigurationNeeded => "OutOfDateConfigurationNeeded",
            TcbStatus::Revoked => "Revoked",
            TcbStatus::Simulated => "Simulated",
            TcbStatus::Other(s) => s,
        }
    }

    /// Map a dcap-qvl status string. "Simulated" is never produced from Intel collateral.
    pub fn from_intel(s: &str) -> Self {
        match s {
            "UpToDate" => TcbStatus::UpToDate,
            "SWHardeningNeeded" => TcbStatus::SwHardeningNeeded,
            "ConfigurationNeeded" => TcbStatus::ConfigurationNeeded,
            "ConfigurationAndSWHardeningNeeded" => TcbStatus::ConfigurationAndSwHardeningNeeded,
            "OutOfDate" => TcbStatus::OutOfDate,
            "OutOfDateConfigurationNeeded" => TcbStatus::OutOfDateConfigurationNeeded,
            "Revoked" => TcbStatus::Revoked,
            other => TcbStatus::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for TcbStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for TcbStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TcbStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(if s == "Simulated" {
            TcbStatus::Simulated
        } else {
            TcbStatus::from_intel(&s)
        })
    }
}

/// Options for [`verify_quote`].
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Verification time (UNIX seconds). Collateral and certificates must be valid then.
    pub now: u64,
    /// Accept simulated quotes (status `Simulated`) signed under one of `simulated_roots`.
    pub allow_simulated: bool,
    /// Pinned simulator roots; required when `allow_simulated`.
    pub simulated_roots: Vec<SimRootPin>,
    /// Accept TDs with the DEBUG attribute (real quotes only).
    pub allow_debug: bool,
}

/// A verified quote.
#[derive(Debug, Clone)]
pub struct VerifiedQuote {
    pub status: TcbStatus,
    pub advisory_ids: Vec<String>,
    pub quote: Quote,
    /// PPID from the verified PCK certificate: Intel's SGX extension (OID 1.2.840.113741.1.13.1.1)
    /// for real quotes, the simulator's own extension for simulated ones; empty if the cert has none.
    pub ppid: Vec<u8>,
}

impl VerifiedQuote {
    pub fn is_simulated(&self) -> bool {
        self.status == TcbStatus::Simulated
    }

    /// dstack's device id, `sha256(PPID)`; empty when the PCK certificate carries no PPID.
    pub fn device_id(&self) -> Vec<u8> {
        device_id_of_ppid(&self.ppid)
    }
}

/// `sha256(ppid)`, or empty for an empty PPID (no device identity rather than the hash of nothing).
pub fn device_id_of_ppid(ppid: &[u8]) -> Vec<u8> {
    if ppid.is_empty() {
        Vec::new()
    } else {
        Sha256::digest(ppid).to_vec()
    }
}

/// The PPID in the PCK leaf a quote carries, read WITHOUT verifying anything: for a TD reporting its
/// own device id (guest agent `Info`), never for trusting someone else's. `None` when the quote has no
/// PEM chain or the leaf has no (well-formed) PPID.
pub fn self_reported_ppid(quote: &Quote) -> Option<Vec<u8>> {
    let pem = quote.pck_chain_pem()?;
    if is_simulated_quote(quote) {
        let certs = Certificate::load_pem_chain(pem.as_bytes()).ok()?;
        return sim_ppid(certs.first()?).ok().flatten();
    }
    dcap_qvl::intel::parse_pck_extension_from_pem(pem.as_bytes())
        .ok()
        .map(|e| e.ppid)
        .filter(|p| !p.is_empty())
}

/// The `{status, advisory_ids}` JSON of `dstack-measure verify`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyJson {
    pub status: TcbStatus,
    pub advisory_ids: Vec<String>,
}

/// Why verification failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Quote(#[from] QuoteError),
    #[error("collateral JSON: {0}")]
    Collateral(String),
    #[error("a real (Intel) quote needs collateral")]
    MissingCollateral,
    #[error("quote is simulated; pass allow_simulated (--allow-simulated) with a pinned simulator root to accept it")]
    SimulatedNotAllowed,
    #[error("simulated quote rejected: {0}")]
    Simulated(#[from] SimError),
    #[error("Intel DCAP verification failed: {0:#}")]
    Dcap(String),
}

/// Parse dcap-qvl collateral JSON (byte fields as hex strings).
pub fn parse_collateral(json: &[u8]) -> Result<QuoteCollateralV3, VerifyError> {
    serde_json::from_slice(json).map_err(|e| VerifyError::Collateral(e.to_string()))
}

/// `sha256(PPID)` of a TD's own raw quote, unverified (see [`self_reported_ppid`]); empty when the quote
/// does not parse or carries no PPID.
pub fn self_reported_device_id(raw_quote: &[u8]) -> Vec<u8> {
    Quote::parse(raw_quote)
        .ok()
        .and_then(|q| self_reported_ppid(&q))
        .map(|p| device_id_of_ppid(&p))
        .unwrap_or_default()
}

/// Verify a raw quote. Real quotes need `collateral`; simulated ones need
/// `opts.allow_simulated` and a matching pin. No network access happens here.
pub fn verify_quote(
    raw: &[u8],
    collateral: Option<&QuoteCollateralV3>,
    opts: &VerifyOptions,
) -> Result<VerifiedQuote, VerifyError> {
    let quote = Quote::parse(raw)?;
    if is_simulated_quote(&quote) {
        if !opts.allow_simulated {
            return Err(VerifyError::SimulatedNotAllowed);
        }
        let ppid = verify_simulated(&quote, raw, &opts.simulated_roots, opts.now)?;
        return Ok(VerifiedQuote {
            status: TcbStatus::Simulated,
            advisory_ids: Vec::new(),
            quote,
            ppid,
        });
    }
    let collateral = collateral.ok_or(VerifyError::MissingCollateral)?;
    let report = dcap_qvl::verify::QuoteVerifier::new_prod()
        .with_config::<dcap_qvl::configs::RingConfig>()
        .allow_debug(opts.allow_debug)
        .verify(raw, collateral, opts.now)
        .map_err(|e| VerifyError::Dcap(format!("{e:#}")))?;
    Ok(VerifiedQuote {
        status: TcbStatus::from_intel(&report.status),
        advisory_ids: report.advisory_ids,
        quote,
        ppid: report.ppid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_strings_round_trip() {
        for s in [
            "UpToDate",
            "SWHardeningNeeded",
            "ConfigurationNeeded",
            "ConfigurationAndSWHardeningNeeded",
            "OutOfDate",
            "OutOfDateConfigurationNeeded",
            "Revoked",
        ] {
            assert_eq!(TcbStatus::from_intel(s).as_str(), s);
        }
        // Intel collateral can never yield Simulated.
        assert_eq!(TcbStatus::from_intel("Simulated"), TcbStatus::Other("Simulated".into()));
        let j: TcbStatus = serde_json::from_str("\"Simulated\"").unwrap();
        assert_eq!(j, TcbStatus::Simulated);
    }
}
