//! Certificate revocation: an X.509 v2 CRL (RFC 5280 §5) signed by the KMS root CA with ECDSA P-256/SHA-256.
//!
//! The KMS publishes one list covering every certificate issued under its root, directly or through an app CA
//! (an *indirect* scope by convention rather than by RFC 5280's `indirectCRL` machinery): entries are matched
//! by serial number alone. rcgen's serials are 20 bytes derived from the subject key, so collisions across app
//! CAs are not a practical concern (but two certificates for the same key share a serial).
//!
//! Besides serials the list can revoke **every certificate of an app issued before a time** — which the KMS
//! cannot express as serials because it keeps no record of what it issued. That rule travels in a
//! non-critical CRL extension of ours ([`oids::APP_REVOCATIONS`]) whose value is
//! `SEQUENCE OF SEQUENCE { appId OCTET STRING, issuedBefore GeneralizedTime }`; it applies to any certificate
//! carrying the app-id extension (`.1.3`) with that app id and a notBefore earlier than `issuedBefore`.
//! Other CRL consumers (openssl) ignore it and see only the serials.
//!
//! [`RevocationList::from_der`] accepts a list only when its signature verifies with the pinned issuer
//! certificate's key, its issuer name is that certificate's subject, it is DER-canonical, has no unknown
//! critical extension, and is current (`thisUpdate ≤ now ≤ nextUpdate`, with a small clock-skew allowance).

use std::collections::HashSet;
use std::time::Duration;

use der::asn1::{GeneralizedTime, ObjectIdentifier, OctetString};
use der::{Decode, Encode, Sequence};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, UnparsedPublicKey};
use x509_cert::Certificate;
use x509_cert::certificate::{Rfc5280, Version};
use x509_cert::crl::{CertificateList, RevokedCert, TbsCertList};
use x509_cert::ext::{Extension, Extensions};
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::AlgorithmIdentifierOwned;
use x509_cert::time::Time;

use crate::{CaCert, RaTlsError, oids, parse_cert};

/// `ecdsa-with-SHA256`.
const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
/// `id-ecPublicKey`.
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// `id-ce-cRLNumber`.
const CRL_NUMBER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.20");
/// `id-ce-authorityKeyIdentifier` (tolerated when present; we do not write it).
const AUTHORITY_KEY_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.35");
/// Clock skew tolerated around thisUpdate / nextUpdate.
pub const CLOCK_SKEW_SECS: u64 = 300;

/// One revoked serial number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedSerial {
    /// Big-endian serial (leading zeros are ignored).
    pub serial: Vec<u8>,
    /// UNIX seconds.
    pub revoked_at: u64,
}

/// Every certificate of `app_id` whose notBefore is earlier than `issued_before` (UNIX seconds) is revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRevocation {
    pub app_id: Vec<u8>,
    pub issued_before: u64,
}

/// What a CRL says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrlContent {
    pub crl_number: u64,
    /// UNIX seconds.
    pub this_update: u64,
    pub next_update: u64,
    pub serials: Vec<RevokedSerial>,
    pub apps: Vec<AppRevocation>,
}

#[derive(Debug, Sequence)]
struct AppRevocationDer {
    app_id: OctetString,
    issued_before: GeneralizedTime,
}

fn crl_err(msg: impl Into<String>) -> RaTlsError {
    RaTlsError::Crl(msg.into())
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    b.get(first..).unwrap_or_default()
}

fn time(secs: u64, field: &str) -> Result<Time, RaTlsError> {
    der::DateTime::from_unix_duration(Duration::from_secs(secs))
        .map(Time::from)
        .map_err(|e| crl_err(format!("{field}: {e}")))
}

fn gen_time(secs: u64, field: &str) -> Result<GeneralizedTime, RaTlsError> {
    GeneralizedTime::from_unix_duration(Duration::from_secs(secs)).map_err(|e| crl_err(format!("{field}: {e}")))
}

fn ecdsa_sha256() -> AlgorithmIdentifierOwned {
    AlgorithmIdentifierOwned {
        oid: ECDSA_WITH_SHA256,
        parameters: None,
    }
}

/// Builds and signs a CRL with `issuer`'s key (must be ECDSA P-256).
pub fn build_crl(issuer: &CaCert, content: &CrlContent) -> Result<Vec<u8>, RaTlsError> {
    if issuer.key().algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(crl_err("the CRL issuer key must be ECDSA P-256"));
    }
    let issuer_cert = Certificate::from_der(issuer.cert_der()).map_err(|e| crl_err(format!("issuer: {e}")))?;
    let mut revoked = Vec::with_capacity(content.serials.len());
    for r in &content.serials {
        let serial = SerialNumber::<Rfc5280>::new(strip_zeros(&r.serial))
            .map_err(|e| crl_err(format!("serial {}: {e}", hex::encode(&r.serial))))?;
        revoked.push(RevokedCert {
            serial_number: serial,
            revocation_date: time(r.revoked_at, "revocationDate")?,
            crl_entry_extensions: None,
        });
    }
    let mut extensions: Extensions = Vec::new();
    let number = der::asn1::Uint::new(&content.crl_number.to_be_bytes()).and_then(|n| n.to_der());
    extensions.push(Extension {
        extn_id: CRL_NUMBER,
        critical: false,
        extn_value: OctetString::new(number.map_err(|e| crl_err(format!("cRLNumber: {e}")))?)
            .map_err(|e| crl_err(format!("cRLNumber: {e}")))?,
    });
    if !content.apps.is_empty() {
        let mut rules = Vec::with_capacity(content.apps.len());
        for a in &content.apps {
            rules.push(AppRevocationDer {
                app_id: OctetString::new(a.app_id.clone()).map_err(|e| crl_err(format!("app id: {e}")))?,
                issued_before: gen_time(a.issued_before, "issuedBefore")?,
            });
        }
        let value = rules.to_der().map_err(|e| crl_err(format!("app revocations: {e}")))?;
        extensions.push(Extension {
            extn_id: oid(oids::APP_REVOCATIONS)?,
            critical: false,
            extn_value: OctetString::new(value).map_err(|e| crl_err(format!("app revocations: {e}")))?,
        });
    }
    let tbs = TbsCertList {
        version: Version::V2,
        signature: ecdsa_sha256(),
        issuer: issuer_cert.tbs_certificate().subject().clone(),
        this_update: time(content.this_update, "thisUpdate")?,
        next_update: Some(time(content.next_update, "nextUpdate")?),
        revoked_certificates: (!revoked.is_empty()).then_some(revoked),
        crl_extensions: Some(extensions),
    };
    let tbs_der = tbs
        .to_der()
        .map_err(|e| crl_err(format!("encoding tbsCertList: {e}")))?;
    let rng = SystemRandom::new();
    let pkcs8 = issuer.key().serialize_der();
    let signer = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8, &rng)
        .map_err(|e| crl_err(format!("issuer key: {e}")))?;
    let sig = signer
        .sign(&rng, &tbs_der)
        .map_err(|e| crl_err(format!("signing: {e}")))?;
    let crl = CertificateList::<Rfc5280> {
        tbs_cert_list: tbs,
        signature_algorithm: ecdsa_sha256(),
        signature: der::asn1::BitString::from_bytes(sig.as_ref()).map_err(|e| crl_err(format!("signature: {e}")))?,
    };
    crl.to_der().map_err(|e| crl_err(format!("encoding CRL: {e}")))
}

/// PEM (`X509 CRL`) of a DER CRL.
pub fn crl_pem(crl_der: &[u8]) -> Result<String, RaTlsError> {
    der::pem::encode_string("X509 CRL", der::pem::LineEnding::LF, crl_der).map_err(|e| crl_err(format!("PEM: {e}")))
}

fn oid(arcs: &[u64]) -> Result<ObjectIdentifier, RaTlsError> {
    ObjectIdentifier::new(&oids::dotted(arcs)).map_err(|e| crl_err(format!("OID: {e}")))
}

/// A verified revocation list, ready to check certificates against.
#[derive(Debug, Clone)]
pub struct RevocationList {
    content: CrlContent,
    /// DER of the CRL's issuer Name (the pinned CA's subject).
    issuer_name: Vec<u8>,
    /// The CA certificate the list was verified with.
    issuer_cert: Vec<u8>,
    /// Serials with leading zeros stripped.
    serials: HashSet<Vec<u8>>,
}

impl RevocationList {
    /// Parses `crl_der`, verifies it was signed by `issuer_cert_der` (the pinned KMS root) and is current at
    /// `now` (UNIX seconds).
    pub fn from_der(crl_der: &[u8], issuer_cert_der: &[u8], now: u64) -> Result<Self, RaTlsError> {
        let crl = CertificateList::<Rfc5280>::from_der(crl_der).map_err(|e| crl_err(format!("not a DER CRL: {e}")))?;
        // Re-encoding must give the input back, so the tbsCertList we verify is exactly the signed bytes.
        if crl.to_der().ok().as_deref() != Some(crl_der) {
            return Err(crl_err("CRL is not canonical DER"));
        }
        let tbs = &crl.tbs_cert_list;
        if crl.signature_algorithm.oid != ECDSA_WITH_SHA256 || tbs.signature.oid != ECDSA_WITH_SHA256 {
            return Err(crl_err(format!(
                "signature algorithm {} is not ecdsa-with-SHA256",
                crl.signature_algorithm.oid
            )));
        }
        let issuer = Certificate::from_der(issuer_cert_der).map_err(|e| crl_err(format!("issuer certificate: {e}")))?;
        let issuer_tbs = issuer.tbs_certificate();
        if &tbs.issuer != issuer_tbs.subject() {
            return Err(crl_err(format!(
                "CRL issuer {} is not the pinned CA {}",
                tbs.issuer,
                issuer_tbs.subject()
            )));
        }
        let spki = issuer_tbs.subject_public_key_info();
        if spki.algorithm.oid != EC_PUBLIC_KEY {
            return Err(crl_err("issuer key is not an EC key"));
        }
        let key = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| crl_err("issuer key bit string is not byte-aligned"))?;
        let tbs_der = tbs.to_der().map_err(|e| crl_err(format!("tbsCertList: {e}")))?;
        let sig = crl
            .signature
            .as_bytes()
            .ok_or_else(|| crl_err("signature bit string is not byte-aligned"))?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key)
            .verify(&tbs_der, sig)
            .map_err(|_| crl_err("signature does not verify with the pinned CA key"))?;

        let this_update = tbs.this_update.to_unix_duration().as_secs();
        let next_update = tbs
            .next_update
            .map(|t| t.to_unix_duration().as_secs())
            .ok_or_else(|| crl_err("nextUpdate is missing"))?;
        if now.saturating_add(CLOCK_SKEW_SECS) < this_update {
            return Err(crl_err(format!(
                "thisUpdate {this_update} is in the future (now {now})"
            )));
        }
        let mut content = CrlContent {
            crl_number: 0,
            this_update,
            next_update,
            serials: Vec::new(),
            apps: Vec::new(),
        };
        for ext in tbs.crl_extensions.iter().flatten() {
            if ext.extn_id == CRL_NUMBER {
                let n = der::asn1::Uint::from_der(ext.extn_value.as_bytes())
                    .map_err(|e| crl_err(format!("cRLNumber: {e}")))?;
                let b = strip_zeros(n.as_bytes());
                let mut buf = [0u8; 8];
                let start = buf
                    .len()
                    .checked_sub(b.len())
                    .ok_or_else(|| crl_err("cRLNumber is larger than 64 bits"))?;
                buf.get_mut(start..)
                    .ok_or_else(|| crl_err("cRLNumber"))?
                    .copy_from_slice(b);
                content.crl_number = u64::from_be_bytes(buf);
            } else if ext.extn_id == oid(oids::APP_REVOCATIONS)? {
                let rules = Vec::<AppRevocationDer>::from_der(ext.extn_value.as_bytes())
                    .map_err(|e| crl_err(format!("app revocations extension: {e}")))?;
                content.apps = rules
                    .into_iter()
                    .map(|r| AppRevocation {
                        app_id: r.app_id.into_bytes().into_vec(),
                        issued_before: r.issued_before.to_unix_duration().as_secs(),
                    })
                    .collect();
            } else if ext.critical && ext.extn_id != AUTHORITY_KEY_ID {
                return Err(crl_err(format!("unknown critical CRL extension {}", ext.extn_id)));
            }
        }
        for r in tbs.revoked_certificates.iter().flatten() {
            if r.crl_entry_extensions.iter().flatten().any(|e| e.critical) {
                return Err(crl_err(format!(
                    "entry {} has a critical extension",
                    hex::encode(r.serial_number.as_bytes())
                )));
            }
            content.serials.push(RevokedSerial {
                serial: r.serial_number.as_bytes().to_vec(),
                revoked_at: r.revocation_date.to_unix_duration().as_secs(),
            });
        }
        let serials = content
            .serials
            .iter()
            .map(|s| strip_zeros(&s.serial).to_vec())
            .collect();
        let issuer_name = tbs.issuer.to_der().map_err(|e| crl_err(format!("issuer name: {e}")))?;
        let list = Self {
            content,
            issuer_name,
            issuer_cert: issuer_cert_der.to_vec(),
            serials,
        };
        list.check_current(now)?;
        Ok(list)
    }

    /// Like [`Self::from_der`] for a PEM `X509 CRL`.
    pub fn from_pem(crl_pem: &str, issuer_cert_der: &[u8], now: u64) -> Result<Self, RaTlsError> {
        let (label, der) = der::pem::decode_vec(crl_pem.as_bytes()).map_err(|e| crl_err(format!("PEM: {e}")))?;
        if label != "X509 CRL" {
            return Err(crl_err(format!("PEM label is {label:?}, expected \"X509 CRL\"")));
        }
        Self::from_der(&der, issuer_cert_der, now)
    }

    pub fn content(&self) -> &CrlContent {
        &self.content
    }

    /// DER of the issuer Name (equal to the subject of the CA certificate the list was verified with).
    pub fn issuer_name_der(&self) -> &[u8] {
        &self.issuer_name
    }

    /// The CA certificate (DER) the list was verified with.
    pub fn issuer_cert_der(&self) -> &[u8] {
        &self.issuer_cert
    }

    /// Refuses a list past its nextUpdate (a stale list could miss revocations: fail closed).
    pub fn check_current(&self, now: u64) -> Result<(), RaTlsError> {
        if now > self.content.next_update.saturating_add(CLOCK_SKEW_SECS) {
            return Err(crl_err(format!(
                "revocation list #{} expired at {} (now {now}); fetch a fresh one",
                self.content.crl_number, self.content.next_update
            )));
        }
        Ok(())
    }

    /// Refuses `cert_der` when its serial is listed or an app rule covers it.
    pub fn check(&self, cert_der: &[u8]) -> Result<(), RaTlsError> {
        let cert = Certificate::from_der(cert_der).map_err(|e| RaTlsError::Certificate(e.to_string()))?;
        let serial = strip_zeros(cert.tbs_certificate().serial_number().as_bytes());
        if self.serials.contains(serial) {
            return Err(RaTlsError::Revoked(format!(
                "serial {} is listed in revocation list #{}",
                hex::encode(serial),
                self.content.crl_number
            )));
        }
        if self.content.apps.is_empty() {
            return Ok(());
        }
        let parsed = parse_cert(cert_der)?;
        if let Some(app_id) = &parsed.app_id
            && let Some(rule) = self
                .content
                .apps
                .iter()
                .find(|r| &r.app_id == app_id && parsed.not_before < r.issued_before)
        {
            return Err(RaTlsError::Revoked(format!(
                "every certificate of app {} issued before {} is revoked (this one: notBefore {}, serial {}; \
                 revocation list #{})",
                hex::encode(app_id),
                rule.issued_before,
                parsed.not_before,
                hex::encode(serial),
                self.content.crl_number
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "revocation_tests.rs"]
mod tests;
