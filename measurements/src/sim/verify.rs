//! Verification of simulated quotes against a pinned simulator root.

use der::{Decode, Encode};
use ring::signature::{ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use sha2::{Digest, Sha256};
use x509_cert::Certificate;

use super::{SIM_MARKER_OID_STR, SIM_PPID_LEN, SIM_PPID_OID_STR, SIM_QE_VENDOR_ID, marker_der};
use crate::quote::{CERT_TYPE_PCK_CHAIN, Quote};

/// OID of ecdsa-with-SHA256.
const ECDSA_WITH_SHA256: &str = "1.2.840.10045.4.3.2";

/// A trusted simulator root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimRootPin {
    /// SHA-256 of the root's SubjectPublicKeyInfo DER.
    SpkiSha256([u8; 32]),
    /// The root certificate DER (pinned by exact bytes).
    CertDer(Vec<u8>),
}

impl SimRootPin {
    /// Parse a pin from a PEM/DER certificate, or 64 hex chars of an SPKI SHA-256.
    pub fn parse(data: &[u8]) -> Result<Self, SimError> {
        let text = data.trim_ascii();
        if text.len() == 64 && text.iter().all(u8::is_ascii_hexdigit) {
            let mut pin = [0u8; 32];
            hex::decode_to_slice(text, &mut pin).map_err(|e| SimError::Pin(e.to_string()))?;
            return Ok(Self::SpkiSha256(pin));
        }
        if text.starts_with(b"-----BEGIN") {
            let (label, der) = der::pem::decode_vec(text).map_err(|e| SimError::Pin(format!("PEM: {e}")))?;
            if label != "CERTIFICATE" {
                return Err(SimError::Pin(format!("expected a CERTIFICATE PEM, got {label}")));
            }
            return Ok(Self::CertDer(der));
        }
        Certificate::from_der(data).map_err(|e| SimError::Pin(format!("DER certificate: {e}")))?;
        Ok(Self::CertDer(data.to_vec()))
    }

    fn matches(&self, root_der: &[u8], spki_sha256: &[u8; 32]) -> bool {
        match self {
            SimRootPin::SpkiSha256(p) => p == spki_sha256,
            SimRootPin::CertDer(d) => d.as_slice() == root_der,
        }
    }
}

/// Why a simulated quote was rejected.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SimError {
    #[error("not a simulated quote (QE vendor id is not the simulator's)")]
    NotSimulated,
    #[error("simulated quote has no QE report certification data with a PEM chain")]
    NoChain,
    #[error("simulated PCK chain: {0}")]
    Chain(String),
    #[error("simulated root (SPKI sha256 {0}) is not among the pinned simulator roots")]
    RootNotPinned(String),
    #[error("no simulator root is pinned")]
    NoPins,
    #[error("{0} lacks the dstack-rs simulation marker extension")]
    MissingMarker(&'static str),
    #[error("{0} is not valid at time {1}")]
    Expired(&'static str, u64),
    #[error("bad signature: {0}")]
    Signature(&'static str),
    #[error("QE report data does not bind the attestation key and QE auth data")]
    Binding,
    #[error("simulator root pin: {0}")]
    Pin(String),
}

/// True when the quote claims to be simulated: the simulator's QE vendor id, or any cert in
/// its chain carrying the simulation marker. Such quotes never go to the Intel verifier.
pub fn is_simulated_quote(quote: &Quote) -> bool {
    if quote.header.qe_vendor_id == SIM_QE_VENDOR_ID {
        return true;
    }
    quote
        .pck_chain_pem()
        .and_then(|pem| Certificate::load_pem_chain(pem.as_bytes()).ok())
        .is_some_and(|certs| certs.iter().any(has_marker))
}

fn has_marker(cert: &Certificate) -> bool {
    let want = marker_der();
    cert.tbs_certificate().extensions().is_some_and(|exts| {
        exts.iter()
            .any(|e| e.extn_id.to_string() == SIM_MARKER_OID_STR && e.extn_value.as_bytes() == want)
    })
}

/// The PPID a simulated PCK leaf carries in its [`super::SIM_PPID_OID`] extension: `Ok(None)` when the
/// extension is absent (bundles generated before it existed), an error when it is malformed or repeated.
pub(crate) fn sim_ppid(cert: &Certificate) -> Result<Option<Vec<u8>>, SimError> {
    let mut found = None;
    for e in cert.tbs_certificate().extensions().into_iter().flatten() {
        if e.extn_id.to_string() != SIM_PPID_OID_STR {
            continue;
        }
        if found.is_some() {
            return Err(SimError::Chain("simulated PCK leaf has two PPID extensions".into()));
        }
        let v = e.extn_value.as_bytes();
        let ppid = match v {
            [0x04, len, rest @ ..] if usize::from(*len) == SIM_PPID_LEN && rest.len() == SIM_PPID_LEN => rest,
            _ => {
                return Err(SimError::Chain(format!(
                    "simulated PPID extension is not a {SIM_PPID_LEN}-byte OCTET STRING ({} bytes)",
                    v.len()
                )));
            }
        };
        found = Some(ppid.to_vec());
    }
    Ok(found)
}

fn spki_der(cert: &Certificate) -> Result<Vec<u8>, SimError> {
    cert.tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| SimError::Chain(format!("SPKI encoding: {e}")))
}

/// SHA-256 of the SPKI of a DER certificate.
pub(crate) fn spki_sha256_of_cert_der(der: &[u8]) -> Option<[u8; 32]> {
    let cert = Certificate::from_der(der).ok()?;
    Some(Sha256::digest(spki_der(&cert).ok()?).into())
}

/// Verify `cert`'s signature with `issuer`'s public key (ECDSA P-256 / SHA-256 only).
fn check_cert_signature(cert: &Certificate, issuer: &Certificate, what: &'static str) -> Result<(), SimError> {
    if cert.signature_algorithm().oid.to_string() != ECDSA_WITH_SHA256 {
        return Err(SimError::Chain(format!("{what} is not signed with ecdsa-with-SHA256")));
    }
    if cert.tbs_certificate().issuer() != issuer.tbs_certificate().subject() {
        return Err(SimError::Chain(format!("{what} issuer does not match")));
    }
    let tbs = cert
        .tbs_certificate()
        .to_der()
        .map_err(|e| SimError::Chain(format!("{what} TBS encoding: {e}")))?;
    let key = issuer
        .tbs_certificate()
        .subject_public_key_info()
        .subject_public_key
        .raw_bytes();
    let sig = cert.signature().raw_bytes();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key)
        .verify(&tbs, sig)
        .map_err(|_| SimError::Signature(what))
}

fn check_validity(cert: &Certificate, now: u64, what: &'static str) -> Result<(), SimError> {
    let v = cert.tbs_certificate().validity();
    let nb = v.not_before.to_unix_duration().as_secs();
    let na = v.not_after.to_unix_duration().as_secs();
    if now < nb || now > na {
        return Err(SimError::Expired(what, now));
    }
    Ok(())
}

/// Verify a simulated quote: chain to a pinned root, QE report signature and binding,
/// and the quote signature. `raw` is the quote the `quote` was parsed from. Returns the PPID of
/// the verified simulated PCK leaf (empty when the leaf predates the PPID extension).
pub fn verify_simulated(quote: &Quote, raw: &[u8], pins: &[SimRootPin], now: u64) -> Result<Vec<u8>, SimError> {
    if quote.header.qe_vendor_id != SIM_QE_VENDOR_ID {
        return Err(SimError::NotSimulated);
    }
    if pins.is_empty() {
        return Err(SimError::NoPins);
    }
    let qe = quote.auth_data.qe_cert_data().ok_or(SimError::NoChain)?;
    if qe.inner_cert_type != CERT_TYPE_PCK_CHAIN {
        return Err(SimError::NoChain);
    }
    let pem = qe.pck_chain_pem().ok_or(SimError::NoChain)?;
    let certs = Certificate::load_pem_chain(pem.as_bytes()).map_err(|e| SimError::Chain(format!("PEM chain: {e}")))?;
    let [leaf, root] = certs.as_slice() else {
        return Err(SimError::Chain(format!(
            "expected 2 certificates, found {}",
            certs.len()
        )));
    };

    let root_der = root
        .to_der()
        .map_err(|e| SimError::Chain(format!("root encoding: {e}")))?;
    let root_spki_sha: [u8; 32] = Sha256::digest(spki_der(root)?).into();
    if !pins.iter().any(|p| p.matches(&root_der, &root_spki_sha)) {
        return Err(SimError::RootNotPinned(hex::encode(root_spki_sha)));
    }
    if !has_marker(root) {
        return Err(SimError::MissingMarker("simulated root"));
    }
    if !has_marker(leaf) {
        return Err(SimError::MissingMarker("simulated PCK leaf"));
    }
    check_cert_signature(root, root, "simulated root (self-signature)")?;
    check_cert_signature(leaf, root, "simulated PCK leaf")?;
    check_validity(root, now, "simulated root")?;
    check_validity(leaf, now, "simulated PCK leaf")?;
    let ppid = sim_ppid(leaf)?.unwrap_or_default();

    let leaf_key = leaf
        .tbs_certificate()
        .subject_public_key_info()
        .subject_public_key
        .raw_bytes();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, leaf_key)
        .verify(&qe.qe_report.raw, &qe.qe_report_signature)
        .map_err(|_| SimError::Signature("QE report (by simulated PCK key)"))?;

    let mut h = Sha256::new();
    h.update(quote.auth_data.attestation_key);
    h.update(&qe.qe_auth_data);
    let expect = h.finalize();
    let rd = &qe.qe_report.report_data;
    if rd[..32] != expect[..] || rd[32..].iter().any(|&b| b != 0) {
        return Err(SimError::Binding);
    }
    if qe.qe_report.mr_signer != root_spki_sha {
        return Err(SimError::Chain("QE report MRSIGNER is not the root's SPKI hash".into()));
    }

    let signed = raw
        .get(..quote.signed_len)
        .ok_or(SimError::Signature("quote shorter than its signed region"))?;
    let mut att = [0u8; 65];
    att[0] = 0x04;
    att[1..].copy_from_slice(&quote.auth_data.attestation_key);
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &att[..])
        .verify(signed, &quote.auth_data.signature)
        .map_err(|_| SimError::Signature("quote (by attestation key)"))?;
    Ok(ppid)
}
