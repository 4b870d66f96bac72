//! Reading the RA-TLS extensions of a peer certificate (x509-cert). Everything here handles attacker bytes:
//! errors name the extension, sizes are bounded.

use std::io::Read;

use der::asn1::OctetString;
use der::{Decode, Encode};
use x509_cert::Certificate;

use crate::{RaTlsError, oids};

/// Prefix of a gzip-compressed event log (dstack's `EVENTLOG_GZIP_MAGIC`).
pub const EVENTLOG_GZIP_MAGIC: &[u8] = b"ELGZv1";
/// Largest decompressed event log accepted.
pub const MAX_EVENT_LOG: u64 = 4 << 20;

/// The parts of a certificate RA-TLS verification needs.
#[derive(Debug, Clone)]
pub struct ParsedCert {
    /// SubjectPublicKeyInfo DER (what the quote's report data binds).
    pub spki_der: Vec<u8>,
    /// Raw quote (`.1.1`).
    pub quote: Option<Vec<u8>>,
    /// Event log JSON (`.1.2`), decompressed.
    pub event_log: Option<Vec<u8>>,
    /// App id (`.1.3`).
    pub app_id: Option<Vec<u8>>,
    /// Special usage (`.1.4`).
    pub special_usage: Option<String>,
    /// Whether a versioned attestation (`.1.8`) is present.
    pub has_versioned_attestation: bool,
    /// Validity (UNIX seconds).
    pub not_before: u64,
    pub not_after: u64,
    /// Issuer name == subject name.
    pub self_issued: bool,
}

fn ext_err(oid: &[u64], message: impl Into<String>) -> RaTlsError {
    RaTlsError::Extension {
        oid: oids::dotted(oid),
        message: message.into(),
    }
}

fn unwrap_octets(oid: &[u64], value: &[u8]) -> Result<Vec<u8>, RaTlsError> {
    OctetString::from_der(value)
        .map(|o| o.into_bytes().into_vec())
        .map_err(|e| ext_err(oid, format!("value is not a DER OCTET STRING: {e}")))
}

fn decompress_event_log(raw: Vec<u8>) -> Result<Vec<u8>, RaTlsError> {
    let Some(gz) = raw.strip_prefix(EVENTLOG_GZIP_MAGIC) else {
        return Ok(raw);
    };
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .take(MAX_EVENT_LOG + 1)
        .read_to_end(&mut out)
        .map_err(|e| ext_err(oids::EVENT_LOG, format!("gzip: {e}")))?;
    if out.len() as u64 > MAX_EVENT_LOG {
        return Err(ext_err(
            oids::EVENT_LOG,
            format!("decompresses to more than {MAX_EVENT_LOG} bytes"),
        ));
    }
    Ok(out)
}

/// Parses a DER certificate and extracts its RA-TLS extensions.
pub fn parse_cert(der: &[u8]) -> Result<ParsedCert, RaTlsError> {
    let cert = Certificate::from_der(der).map_err(|e| RaTlsError::Certificate(e.to_string()))?;
    let tbs = cert.tbs_certificate();
    let spki_der = tbs
        .subject_public_key_info()
        .to_der()
        .map_err(|e| RaTlsError::Certificate(format!("SPKI: {e}")))?;
    let validity = tbs.validity();
    let mut out = ParsedCert {
        spki_der,
        quote: None,
        event_log: None,
        app_id: None,
        special_usage: None,
        has_versioned_attestation: false,
        not_before: validity.not_before.to_unix_duration().as_secs(),
        not_after: validity.not_after.to_unix_duration().as_secs(),
        self_issued: tbs.issuer() == tbs.subject(),
    };
    let known: [&[u64]; 5] = [
        oids::TDX_QUOTE,
        oids::EVENT_LOG,
        oids::APP_ID,
        oids::CERT_USAGE,
        oids::ATTESTATION,
    ];
    let mut seen = [false; 5];
    for ext in tbs.extensions().into_iter().flatten() {
        let id: Vec<u64> = ext.extn_id.arcs().map(u64::from).collect();
        let Some(slot) = known.iter().position(|k| *k == id.as_slice()) else {
            continue;
        };
        if std::mem::replace(&mut seen[slot], true) {
            return Err(RaTlsError::DuplicateExtension(oids::dotted(&id)));
        }
        let content = unwrap_octets(&id, ext.extn_value.as_bytes())?;
        match slot {
            0 => out.quote = Some(content),
            1 => out.event_log = Some(decompress_event_log(content)?),
            2 => out.app_id = Some(content),
            3 => {
                let text = String::from_utf8(content).map_err(|_| ext_err(oids::CERT_USAGE, "usage is not UTF-8"))?;
                out.special_usage = Some(text);
            }
            _ => out.has_versioned_attestation = true,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use rcgen::{CustomExtension, KeyPair};

    use super::*;
    use crate::CertRequest;

    fn cert_with(exts: Vec<CustomExtension>) -> Vec<u8> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertRequest {
            subject: "t".into(),
            ..Default::default()
        }
        .to_params()
        .unwrap();
        p.custom_extensions = exts;
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn malformed_extensions_are_named() {
        let der = cert_with(vec![CustomExtension::from_oid_content(oids::TDX_QUOTE, vec![1, 2, 3])]);
        let err = parse_cert(&der).unwrap_err();
        assert!(err.to_string().contains("1.3.6.1.4.1.62397.1.1"), "{err}");
        let one = OctetString::new(vec![1u8]).unwrap().to_der().unwrap();
        let der = cert_with(vec![
            CustomExtension::from_oid_content(oids::APP_ID, one.clone()),
            CustomExtension::from_oid_content(oids::APP_ID, one),
        ]);
        assert!(matches!(parse_cert(&der), Err(RaTlsError::DuplicateExtension(_))));
        assert!(parse_cert(&[0x30, 0x03, 1, 2, 3]).is_err());
    }

    #[test]
    fn gzip_event_logs_are_read_with_a_bound() {
        let json = br#"[{"imr":3,"event_type":134217729,"digest":"","event":"a","event_payload":""}]"#;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(json).unwrap();
        let mut val = EVENTLOG_GZIP_MAGIC.to_vec();
        val.extend(enc.finish().unwrap());
        let der = cert_with(vec![CustomExtension::from_oid_content(
            oids::EVENT_LOG,
            OctetString::new(val).unwrap().to_der().unwrap(),
        )]);
        assert_eq!(parse_cert(&der).unwrap().event_log.unwrap(), json.to_vec());

        let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        bomb.write_all(&vec![b' '; (MAX_EVENT_LOG + 10) as usize]).unwrap();
        let mut val = EVENTLOG_GZIP_MAGIC.to_vec();
        val.extend(bomb.finish().unwrap());
        let der = cert_with(vec![CustomExtension::from_oid_content(
            oids::EVENT_LOG,
            OctetString::new(val).unwrap().to_der().unwrap(),
        )]);
        assert!(parse_cert(&der).unwrap_err().to_string().contains("more than"));
    }
}
