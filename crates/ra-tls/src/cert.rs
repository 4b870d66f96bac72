//! Building RA-TLS certificates and issuing them from a CA.

use std::time::{Duration, SystemTime};

use der::asn1::OctetString;
use der::{Decode, Encode, Tag, Tagged};
use dstack_measurements::eventlog::TdxEvent;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CustomExtension, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha512};
use x509_cert::Certificate as X509;

use crate::{RaTlsError, oids};

/// `SHA-512(tag ‖ ":" ‖ content)`: dstack's report-data rule for a content type (`ratls-cert`, `app-data`, …).
pub fn report_data_for(tag: &str, content: &[u8]) -> [u8; 64] {
    let mut h = Sha512::new();
    h.update(tag.as_bytes());
    h.update(b":");
    h.update(content);
    h.finalize().into()
}

/// The report data binding a certificate key: `SHA-512("ratls-cert:" ‖ SubjectPublicKeyInfo DER)`.
pub fn ra_tls_report_data(spki_der: &[u8]) -> [u8; 64] {
    report_data_for("ratls-cert", spki_der)
}

/// The attestation a certificate carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertAttestation {
    /// Raw quote; its report data must be [`ra_tls_report_data`] of the certificate's key.
    pub quote: Vec<u8>,
    /// Boot and runtime events that replay to the quote's RTMRs.
    pub event_log: Vec<TdxEvent>,
}

/// What to put in a certificate (the fields of dstack's `CertRequest`).
#[derive(Debug, Clone, Default)]
pub struct CertRequest {
    pub subject: String,
    pub org_name: Option<String>,
    /// DNS names or IP addresses.
    pub alt_names: Vec<String>,
    pub usage_server_auth: bool,
    pub usage_client_auth: bool,
    /// Makes a CA with this path-length constraint.
    pub ca_level: Option<u8>,
    pub app_id: Option<Vec<u8>>,
    pub special_usage: Option<String>,
    pub attestation: Option<CertAttestation>,
    pub not_before: Option<SystemTime>,
    /// Defaults to ten years from now (as dstack).
    pub not_after: Option<SystemTime>,
}

/// A non-critical extension whose value is a DER OCTET STRING wrapping `content`.
fn octet_ext(oid: &[u64], content: &[u8]) -> Result<CustomExtension, RaTlsError> {
    let der = OctetString::new(content)
        .and_then(|o| o.to_der())
        .map_err(|e| RaTlsError::Certificate(format!("encoding extension {}: {e}", oids::dotted(oid))))?;
    Ok(CustomExtension::from_oid_content(oid, der))
}

impl CertRequest {
    /// The rcgen parameters.
    pub fn to_params(&self) -> Result<CertificateParams, RaTlsError> {
        let mut p = CertificateParams::new(self.alt_names.clone())?;
        let mut dn = DistinguishedName::new();
        if let Some(org) = &self.org_name {
            dn.push(DnType::OrganizationName, org.as_str());
        }
        dn.push(DnType::CommonName, self.subject.as_str());
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if self.usage_server_auth {
            p.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if self.usage_client_auth {
            p.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        if let Some(app_id) = &self.app_id {
            p.custom_extensions.push(octet_ext(oids::APP_ID, app_id)?);
        }
        if let Some(usage) = &self.special_usage {
            p.custom_extensions.push(octet_ext(oids::CERT_USAGE, usage.as_bytes())?);
        }
        if let Some(att) = &self.attestation {
            let log = serde_json::to_vec(&att.event_log).map_err(|e| RaTlsError::EventLog(e.to_string()))?;
            p.custom_extensions.push(octet_ext(oids::TDX_QUOTE, &att.quote)?);
            p.custom_extensions.push(octet_ext(oids::EVENT_LOG, &log)?);
        }
        if let Some(level) = self.ca_level {
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(level));
            p.key_usages.push(KeyUsagePurpose::KeyCertSign);
            p.key_usages.push(KeyUsagePurpose::CrlSign);
        }
        if let Some(nb) = self.not_before {
            p.not_before = nb.into();
        }
        let ten_years = Duration::from_secs(86_400 * 365 * 10);
        p.not_after = self.not_after.unwrap_or_else(|| SystemTime::now() + ten_years).into();
        Ok(p)
    }

    /// A certificate signed by its own key.
    pub fn self_signed(&self, key: &KeyPair) -> Result<Certificate, RaTlsError> {
        Ok(self.to_params()?.self_signed(key)?)
    }
}

/// A CA that issues (RA-TLS) leaf certificates: the KMS root CA, an app CA.
pub struct CaCert {
    params: CertificateParams,
    key: KeyPair,
    der: CertificateDer<'static>,
    pem: String,
}

impl std::fmt::Debug for CaCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaCert")
            .field("subject", &self.params.distinguished_name)
            .finish_non_exhaustive()
    }
}

impl CaCert {
    /// A new self-signed CA from `req` (its `ca_level` defaults to 1) and `key`.
    pub fn self_signed(req: &CertRequest, key: KeyPair) -> Result<Self, RaTlsError> {
        let mut req = req.clone();
        req.ca_level.get_or_insert(1);
        let params = req.to_params()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            params,
            key,
            der: cert.der().clone(),
            pem: cert.pem(),
        })
    }

    /// A CA issued by `parent` (e.g. an app CA under the KMS root).
    pub fn issued_by(req: &CertRequest, key: KeyPair, parent: &CaCert) -> Result<Self, RaTlsError> {
        let mut req = req.clone();
        req.ca_level.get_or_insert(0);
        let params = req.to_params()?;
        let cert = parent.issue_params(&params, &key)?;
        Ok(Self {
            params,
            key,
            der: cert.der().clone(),
            pem: cert.pem(),
        })
    }

    /// Loads an existing CA certificate and its private key (both PEM). The issuer name of issued
    /// certificates is rebuilt from the certificate's subject, attribute by attribute.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, RaTlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let (label, der) = der::pem::decode_vec(cert_pem.as_bytes())
            .map_err(|e| RaTlsError::Certificate(format!("CA certificate PEM: {e}")))?;
        if label != "CERTIFICATE" {
            return Err(RaTlsError::Certificate(format!(
                "expected a CERTIFICATE PEM, got {label}"
            )));
        }
        let cert = X509::from_der(&der).map_err(|e| RaTlsError::Certificate(format!("CA certificate: {e}")))?;
        let spki = cert
            .tbs_certificate()
            .subject_public_key_info()
            .to_der()
            .map_err(|e| RaTlsError::Certificate(e.to_string()))?;
        if spki != key.subject_public_key_info() {
            return Err(RaTlsError::Key("CA certificate does not match the private key".into()));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = rebuild_dn(cert.tbs_certificate().subject())?;
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ok(Self {
            params,
            key,
            der: CertificateDer::from(der),
            pem: cert_pem.to_owned(),
        })
    }

    fn issue_params(
        &self,
        params: &CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> Result<Certificate, RaTlsError> {
        let issuer = Issuer::from_params(&self.params, &self.key);
        Ok(params.signed_by(public_key, &issuer)?)
    }

    /// Issues a leaf (or intermediate) certificate for `public_key`.
    pub fn issue(&self, req: &CertRequest, public_key: &impl PublicKeyData) -> Result<Certificate, RaTlsError> {
        self.issue_params(&req.to_params()?, public_key)
    }

    /// Like [`Self::issue`] with an explicit serial number (big-endian, positive, at most 20 bytes); without one
    /// rcgen derives the serial from the subject key, so every certificate for a key shares it.
    pub fn issue_with_serial(
        &self,
        req: &CertRequest,
        public_key: &impl PublicKeyData,
        serial: &[u8],
    ) -> Result<Certificate, RaTlsError> {
        let mut params = req.to_params()?;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        self.issue_params(&params, public_key)
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    /// The CA key.
    pub fn key(&self) -> &KeyPair {
        &self.key
    }
}

/// Rebuilds an rcgen name that encodes to the same DER as `name` (single-valued RDNs with string values).
fn rebuild_dn(name: &x509_cert::name::Name) -> Result<DistinguishedName, RaTlsError> {
    let mut dn = DistinguishedName::new();
    for rdn in name.iter_rdn() {
        let mut atvs = rdn.iter();
        let (Some(atv), None) = (atvs.next(), atvs.next()) else {
            return Err(RaTlsError::Certificate(
                "multi-valued RDNs in a CA subject are not supported".into(),
            ));
        };
        let arcs: Vec<u64> = atv.oid.arcs().map(u64::from).collect();
        let bytes = atv.value.value();
        let text = || {
            String::from_utf8(bytes.to_vec())
                .map_err(|_| RaTlsError::Certificate("CA subject attribute is not UTF-8".into()))
        };
        let value = match atv.value.tag() {
            Tag::Utf8String => DnValue::Utf8String(text()?),
            Tag::PrintableString => DnValue::PrintableString(
                text()?
                    .try_into()
                    .map_err(|e| RaTlsError::Certificate(format!("CA subject PrintableString: {e}")))?,
            ),
            Tag::Ia5String => DnValue::Ia5String(
                text()?
                    .try_into()
                    .map_err(|e| RaTlsError::Certificate(format!("CA subject IA5String: {e}")))?,
            ),
            other => {
                return Err(RaTlsError::Certificate(format!(
                    "CA subject attribute with unsupported string type {other}"
                )));
            }
        };
        dn.push(DnType::from_oid(&arcs), value);
    }
    Ok(dn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_data_rule() {
        // Independent: python3 -c "import hashlib;print(hashlib.sha512(b'ratls-cert:'+bytes([1,2,3])).hexdigest())"
        assert_eq!(
            hex::encode(ra_tls_report_data(&[1, 2, 3])),
            "ccae2cf11b424211fe276ea79c61883426ea2594ccce35ef6691041bb47e95fff0389763ae0fd8438806d85d966a7bd4ec9be278d720f99eed08c6cc570591a6"
        );
    }

    #[test]
    fn extension_values_are_der_octet_strings() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let req = CertRequest {
            subject: "x".into(),
            special_usage: Some("kms:rpc".into()),
            app_id: Some(vec![0xaa; 20]),
            ..Default::default()
        };
        let cert = req.self_signed(&key).unwrap();
        let parsed = X509::from_der(cert.der()).unwrap();
        let exts = parsed.tbs_certificate().extensions().unwrap();
        let usage = exts
            .iter()
            .find(|e| e.extn_id.to_string() == "1.3.6.1.4.1.62397.1.4")
            .unwrap();
        // 04 07 "kms:rpc": tag OCTET STRING, length 7, the text.
        assert_eq!(usage.extn_value.as_bytes(), b"\x04\x07kms:rpc");
        assert!(!usage.critical);
        let app = exts
            .iter()
            .find(|e| e.extn_id.to_string() == "1.3.6.1.4.1.62397.1.3")
            .unwrap();
        assert_eq!(app.extn_value.as_bytes()[..2], [0x04, 20]);
    }

    #[test]
    fn ca_from_pem_issues_chains_with_matching_names() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ca = CaCert::self_signed(
            &CertRequest {
                subject: "Dstack KMS CA".into(),
                org_name: Some("Dstack".into()),
                ..Default::default()
            },
            key,
        )
        .unwrap();
        let reloaded = CaCert::from_pem(ca.cert_pem(), &ca.key().serialize_pem()).unwrap();
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = reloaded
            .issue(
                &CertRequest {
                    subject: "leaf".into(),
                    ..Default::default()
                },
                &leaf_key,
            )
            .unwrap();
        let ca_x = X509::from_der(ca.cert_der()).unwrap();
        let leaf_x = X509::from_der(leaf.der()).unwrap();
        assert_eq!(
            leaf_x.tbs_certificate().issuer().to_der().unwrap(),
            ca_x.tbs_certificate().subject().to_der().unwrap()
        );
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert!(matches!(
            CaCert::from_pem(ca.cert_pem(), &other.serialize_pem()),
            Err(RaTlsError::Key(_))
        ));
    }
}
