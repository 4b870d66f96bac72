//! Simulated TDX quotes (our design; see DESIGN.md §2).
//!
//! On hosts without TDX the host VMM runs a *simulated TDX module*. Its quotes use the real
//! TDX v4 wire format so that parsing, replay, policy and key release share one code path;
//! only the signature root differs:
//!
//! * header: version 4, attestation key type 2 (ECDSA P-256), tee type 0x81, and QE vendor id
//!   [`SIM_QE_VENDOR_ID`] (`"dstack-rs-sim-qe"`) instead of Intel's;
//! * body: the 584-byte TD 1.0 report the simulated module holds (MRTD, RTMRs, report data…);
//! * signature data: a genuine ECDSA-P256 signature by a local *attestation key* over
//!   SHA-256(header ‖ body); the raw attestation public key; certification data type 6 with
//!   a 384-byte QE report whose REPORTDATA is `SHA-256(attestation_key ‖ qe_auth_data) ‖ 0³²`
//!   and whose MRSIGNER is `SHA-256(root SPKI DER)`, the QE report signed by the *PCK key*,
//!   32 bytes of QE auth data and an inner type-5 PEM chain `[simulated PCK leaf, root]`;
//! * certificates: a self-signed root "dstack-rs simulated TDX root" and a leaf "dstack-rs
//!   simulated PCK", both ECDSA P-256/SHA-256, both carrying the marker extension
//!   [`SIM_MARKER_OID`] whose value is the UTF8String [`SIM_MARKER_TEXT`].
//!
//! Verification ([`verify_simulated`]) accepts such a quote only against a *pinned* root
//! (by DER or SPKI SHA-256) and reports TCB status `Simulated`. The Intel path refuses any
//! quote carrying the simulated vendor id or marker, and the simulated path requires both,
//! so neither root can ever be accepted by the other path.
//!
//! The marker OID sits under the RFC 5612 documentation enterprise number (32473): it is
//! only a label — security comes from the pinned root, not from the OID.

mod verify;

use std::path::Path;

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use sha2::{Digest, Sha256};

use crate::quote::{
    ATT_KEY_TYPE_ECDSA_P256, CERT_TYPE_PCK_CHAIN, CERT_TYPE_QE_REPORT, HEADER_LEN, Header, QE_REPORT_LEN,
    TD_REPORT10_LEN, TEE_TYPE_TDX, TdReport,
};

pub(crate) use verify::sim_ppid;
pub use verify::{SimError, SimRootPin, is_simulated_quote, verify_simulated};

/// QE vendor id of simulated quotes: ASCII `dstack-rs-sim-qe`.
pub const SIM_QE_VENDOR_ID: [u8; 16] = *b"dstack-rs-sim-qe";
/// OID arcs of the marker extension in every simulated certificate.
pub const SIM_MARKER_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 32473, 7100, 1];
/// Dotted form of [`SIM_MARKER_OID`].
pub const SIM_MARKER_OID_STR: &str = "1.3.6.1.4.1.32473.7100.1";
/// OID arcs of the simulated PPID extension of the simulated PCK leaf: an OCTET STRING of
/// [`SIM_PPID_LEN`] random bytes chosen when the signer is generated, so a host keeps one
/// device id (`sha256(PPID)`, as for real TDX) for as long as it keeps its signer bundle.
/// Deliberately not Intel's SGX extension OID: nothing simulated borrows Intel's arcs.
pub const SIM_PPID_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 32473, 7100, 2];
/// Dotted form of [`SIM_PPID_OID`].
pub const SIM_PPID_OID_STR: &str = "1.3.6.1.4.1.32473.7100.2";
/// Length of a PPID (Intel's is 16 bytes; the simulator uses the same size).
pub const SIM_PPID_LEN: usize = 16;
/// Text carried (as a DER UTF8String) in the marker extension.
pub const SIM_MARKER_TEXT: &str = "dstack-rs simulated TDX - not an Intel certificate";
/// Subject CN of the simulated root.
pub const SIM_ROOT_CN: &str = "dstack-rs simulated TDX root";
/// Subject CN of the simulated PCK leaf.
pub const SIM_PCK_CN: &str = "simulated PCK";
/// MRENCLAVE placed in the simulated QE report: SHA-256 of this label.
pub const SIM_QE_LABEL: &[u8] = b"dstack-rs simulated TDX quoting enclave";
/// QE auth data of simulated quotes (32 bytes, like Intel's QE).
pub const SIM_QE_AUTH_DATA: [u8; 32] = *b"dstack-rs simulated QE auth data";

/// Errors creating, loading or using a simulated signer.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("key rejected by ring: {0}")]
    Key(String),
    #[error("signing failed")]
    Sign,
    #[error("signer bundle: {0}")]
    Bundle(String),
    #[error("signer bundle I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// DER encoding of the marker extension value (a UTF8String).
pub(crate) fn marker_der() -> Vec<u8> {
    let text = SIM_MARKER_TEXT.as_bytes();
    let mut v = vec![0x0c, text.len() as u8];
    v.extend_from_slice(text);
    v
}

/// DER encoding of the simulated PPID extension value (an OCTET STRING).
pub(crate) fn ppid_der(ppid: &[u8; SIM_PPID_LEN]) -> Vec<u8> {
    let mut v = vec![0x04, SIM_PPID_LEN as u8];
    v.extend_from_slice(ppid);
    v
}

fn ring_key(pkcs8: &[u8]) -> Result<EcdsaKeyPair, SignerError> {
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &SystemRandom::new())
        .map_err(|e| SignerError::Key(e.to_string()))
}

fn sim_params(cn: &str, ca: bool) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, "dstack-rs SIMULATED TDX (not Intel)");
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2099, 12, 31);
    p.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(SIM_MARKER_OID, marker_der())];
    if ca {
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    } else {
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    }
    p
}

/// Holds the simulated root, PCK and attestation keys and signs TD reports into v4 quotes.
pub struct SimulatedQuoteSigner {
    root_cert_pem: String,
    root_cert_der: Vec<u8>,
    root_key_pem: String,
    pck_cert_pem: String,
    pck_key_pem: String,
    pck_key: EcdsaKeyPair,
    att_key_pem: String,
    att_key: EcdsaKeyPair,
    /// Raw x‖y of the attestation public key.
    att_pub: [u8; 64],
    rng: SystemRandom,
}

impl std::fmt::Debug for SimulatedQuoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedQuoteSigner")
            .field("root_spki_sha256", &hex::encode(self.root_pin_spki_sha256()))
            .finish_non_exhaustive()
    }
}

impl SimulatedQuoteSigner {
    /// Generate a fresh root CA, PCK leaf and attestation key.
    pub fn generate() -> Result<Self, SignerError> {
        let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
        let root_key = rcgen::KeyPair::generate_for(alg)?;
        let root_params = sim_params(SIM_ROOT_CN, true);
        let root_cert = root_params.self_signed(&root_key)?;
        let issuer = rcgen::Issuer::from_params(&root_params, &root_key);
        let pck_key = rcgen::KeyPair::generate_for(alg)?;
        let mut ppid = [0u8; SIM_PPID_LEN];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut ppid)
            .map_err(|_| SignerError::Key("no randomness for the PPID".into()))?;
        let mut pck_params = sim_params(SIM_PCK_CN, false);
        pck_params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(SIM_PPID_OID, ppid_der(&ppid)));
        let pck_cert = pck_params.signed_by(&pck_key, &issuer)?;
        let att_key = rcgen::KeyPair::generate_for(alg)?;
        Self::from_parts(
            root_cert.pem(),
            root_key.serialize_pem(),
            pck_cert.pem(),
            pck_key.serialize_pem(),
            att_key.serialize_pem(),
        )
    }

    fn from_parts(
        root_cert_pem: String,
        root_key_pem: String,
        pck_cert_pem: String,
        pck_key_pem: String,
        att_key_pem: String,
    ) -> Result<Self, SignerError> {
        let der_of = |pem: &str| -> Result<Vec<u8>, SignerError> {
            let (label, der) = der::pem::decode_vec(pem.as_bytes())
                .map_err(|e| SignerError::Bundle(format!("certificate PEM: {e}")))?;
            if label != "CERTIFICATE" {
                return Err(SignerError::Bundle(format!("expected CERTIFICATE, got {label}")));
            }
            Ok(der)
        };
        let root_cert_der = der_of(&root_cert_pem)?;
        der_of(&pck_cert_pem)?;
        let pkcs8 = |pem: &str| -> Result<Vec<u8>, SignerError> { Ok(rcgen::KeyPair::from_pem(pem)?.serialize_der()) };
        pkcs8(&root_key_pem)?;
        let pck_key = ring_key(&pkcs8(&pck_key_pem)?)?;
        let att_key = ring_key(&pkcs8(&att_key_pem)?)?;
        let pub_point = att_key.public_key().as_ref();
        let att_pub: [u8; 64] = pub_point
            .get(1..65)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| SignerError::Key("attestation key is not an uncompressed P-256 point".into()))?;
        Ok(Self {
            root_cert_pem,
            root_cert_der,
            root_key_pem,
            pck_cert_pem,
            pck_key_pem,
            pck_key,
            att_key_pem,
            att_key,
            att_pub,
            rng: SystemRandom::new(),
        })
    }

    /// All key material as one PEM text: root cert, PCK cert, then the root, PCK and
    /// attestation private keys (PKCS#8), in that order.
    pub fn to_pem_bundle(&self) -> String {
        [
            &self.root_cert_pem,
            &self.pck_cert_pem,
            &self.root_key_pem,
            &self.pck_key_pem,
            &self.att_key_pem,
        ]
        .iter()
        .map(|s| s.trim_end().to_owned() + "\n")
        .collect()
    }

    /// Load a bundle written by [`Self::to_pem_bundle`].
    pub fn from_pem_bundle(text: &str) -> Result<Self, SignerError> {
        let blocks = split_pem_blocks(text);
        let labels: Vec<&str> = blocks.iter().map(|(l, _)| l.as_str()).collect();
        let expected = [
            "CERTIFICATE",
            "CERTIFICATE",
            "PRIVATE KEY",
            "PRIVATE KEY",
            "PRIVATE KEY",
        ];
        if labels != expected {
            return Err(SignerError::Bundle(format!(
                "expected blocks {expected:?}, found {labels:?}"
            )));
        }
        let mut b: Vec<String> = blocks.into_iter().map(|(_, b)| b).collect();
        let att_key = b.pop().unwrap_or_default();
        let pck_key = b.pop().unwrap_or_default();
        let root_key = b.pop().unwrap_or_default();
        let pck_cert = b.pop().unwrap_or_default();
        let root_cert = b.pop().unwrap_or_default();
        Self::from_parts(root_cert, root_key, pck_cert, pck_key, att_key)
    }

    /// Write the bundle to `path` (mode 0600 on Unix).
    pub fn save(&self, path: &Path) -> Result<(), SignerError> {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        opts.open(path)?.write_all(self.to_pem_bundle().as_bytes())?;
        Ok(())
    }

    /// Load the bundle at `path`.
    pub fn load(path: &Path) -> Result<Self, SignerError> {
        Self::from_pem_bundle(&std::fs::read_to_string(path)?)
    }

    /// Load `path` if it exists, else generate and save a new signer there.
    pub fn load_or_generate(path: &Path) -> Result<Self, SignerError> {
        if path.exists() {
            return Self::load(path);
        }
        let s = Self::generate()?;
        s.save(path)?;
        Ok(s)
    }

    /// The simulated root certificate (DER) — what verifiers pin.
    pub fn root_cert_der(&self) -> &[u8] {
        &self.root_cert_der
    }

    /// The simulated root certificate (PEM).
    pub fn root_cert_pem(&self) -> &str {
        &self.root_cert_pem
    }

    /// SHA-256 of the root's SubjectPublicKeyInfo DER.
    pub fn root_pin_spki_sha256(&self) -> [u8; 32] {
        verify::spki_sha256_of_cert_der(&self.root_cert_der).unwrap_or([0; 32])
    }

    /// A pin for [`crate::verify::VerifyOptions::simulated_roots`].
    pub fn root_pin(&self) -> SimRootPin {
        SimRootPin::SpkiSha256(self.root_pin_spki_sha256())
    }

    /// Raw x‖y attestation public key.
    pub fn attestation_public_key(&self) -> [u8; 64] {
        self.att_pub
    }

    /// Sign a TD 1.0 report into a v4 quote.
    pub fn sign(&self, report: &TdReport) -> Result<Vec<u8>, SignerError> {
        self.sign_body(&report.to_td10_bytes())
    }

    /// Sign a raw 584-byte TD 1.0 report body into a v4 quote.
    pub fn sign_body(&self, body: &[u8; TD_REPORT10_LEN]) -> Result<Vec<u8>, SignerError> {
        let mut user_data = [0u8; 20];
        user_data[..16].copy_from_slice(&Sha256::digest(self.att_pub)[..16]);
        let header = Header {
            version: 4,
            attestation_key_type: ATT_KEY_TYPE_ECDSA_P256,
            tee_type: TEE_TYPE_TDX,
            reserved1: [0; 2],
            reserved2: [0; 2],
            qe_vendor_id: SIM_QE_VENDOR_ID,
            user_data,
        };
        let mut quote = Vec::with_capacity(HEADER_LEN + TD_REPORT10_LEN + 2048);
        quote.extend_from_slice(&header.to_bytes());
        quote.extend_from_slice(body);
        let quote_sig = self.sign_with(&self.att_key, &quote)?;

        let mut qe_report = [0u8; QE_REPORT_LEN];
        qe_report[64..96].copy_from_slice(&Sha256::digest(SIM_QE_LABEL));
        qe_report[128..160].copy_from_slice(&self.root_pin_spki_sha256());
        qe_report[256..258].copy_from_slice(&1u16.to_le_bytes());
        qe_report[258..260].copy_from_slice(&1u16.to_le_bytes());
        let mut binding = Sha256::new();
        binding.update(self.att_pub);
        binding.update(SIM_QE_AUTH_DATA);
        qe_report[320..352].copy_from_slice(&binding.finalize());
        let qe_sig = self.sign_with(&self.pck_key, &qe_report)?;

        let chain = format!("{}\n{}\n", self.pck_cert_pem.trim_end(), self.root_cert_pem.trim_end());
        let mut cert6 = Vec::with_capacity(QE_REPORT_LEN + 64 + 40 + chain.len());
        cert6.extend_from_slice(&qe_report);
        cert6.extend_from_slice(&qe_sig);
        cert6.extend_from_slice(&(SIM_QE_AUTH_DATA.len() as u16).to_le_bytes());
        cert6.extend_from_slice(&SIM_QE_AUTH_DATA);
        cert6.extend_from_slice(&CERT_TYPE_PCK_CHAIN.to_le_bytes());
        cert6.extend_from_slice(&(chain.len() as u32).to_le_bytes());
        cert6.extend_from_slice(chain.as_bytes());

        let mut sig_data = Vec::with_capacity(134 + cert6.len());
        sig_data.extend_from_slice(&quote_sig);
        sig_data.extend_from_slice(&self.att_pub);
        sig_data.extend_from_slice(&CERT_TYPE_QE_REPORT.to_le_bytes());
        sig_data.extend_from_slice(&(cert6.len() as u32).to_le_bytes());
        sig_data.extend_from_slice(&cert6);

        quote.extend_from_slice(&(sig_data.len() as u32).to_le_bytes());
        quote.extend_from_slice(&sig_data);
        Ok(quote)
    }

    fn sign_with(&self, key: &EcdsaKeyPair, msg: &[u8]) -> Result<[u8; 64], SignerError> {
        let sig = key.sign(&self.rng, msg).map_err(|_| SignerError::Sign)?;
        sig.as_ref().try_into().map_err(|_| SignerError::Sign)
    }
}

/// Split PEM text into `(label, block text)` pairs, in order.
fn split_pem_blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + 11..];
        let Some(label_end) = after.find("-----") else { break };
        let label = &after[..label_end];
        let end_marker = format!("-----END {label}-----");
        let Some(end) = rest[start..].find(&end_marker) else {
            break;
        };
        let stop = start + end + end_marker.len();
        out.push((label.to_owned(), rest[start..stop].to_owned() + "\n"));
        rest = &rest[stop..];
    }
    out
}

#[cfg(test)]
mod tests;
