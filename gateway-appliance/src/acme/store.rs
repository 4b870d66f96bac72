//! Certificate and key files: atomic 0600 writes, and reading what a certificate covers and when
//! it expires.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use der::Decode;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_cert::Certificate;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use super::AcmeError;

/// Write `data` to `path` atomically (temp file in the same directory, fsync, rename) with mode
/// 0600, so a crash leaves either the old or the new file and the key is never world-readable.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), AcmeError> {
    let io = |e: std::io::Error| AcmeError::Io {
        path: path.to_owned(),
        source: e,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut rnd = [0u8; 6];
    let _ = getrandom::fill(&mut rnd);
    let tmp: PathBuf = dir.join(format!(".{name}.{}.tmp", hex::encode(rnd)));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Persist the rename itself.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// Expiry.
    pub not_after: SystemTime,
    /// Start of validity.
    pub not_before: SystemTime,
    /// DNS subject alternative names, lower-case.
    pub dns_names: Vec<String>,
    /// Serial number, lower-case hex without leading zero bytes.
    pub serial_hex: String,
}

/// Parse the first certificate of a PEM chain.
pub fn first_cert_der(chain_pem: &[u8]) -> Result<CertificateDer<'static>, AcmeError> {
    CertificateDer::pem_slice_iter(chain_pem)
        .next()
        .ok_or(AcmeError::Certificate("no certificate in PEM".into()))?
        .map_err(|e| AcmeError::Certificate(format!("PEM: {e}")))
}

/// Summarise a DER certificate.
pub fn summarize(der: &[u8]) -> Result<CertSummary, AcmeError> {
    let cert = Certificate::from_der(der).map_err(|e| AcmeError::Certificate(format!("DER: {e}")))?;
    let tbs = cert.tbs_certificate();
    let validity = tbs.validity();
    let mut dns_names = Vec::new();
    if let Some((_, san)) = tbs
        .get_extension::<SubjectAltName>()
        .map_err(|e| AcmeError::Certificate(format!("subjectAltName: {e}")))?
    {
        for name in san.0 {
            if let GeneralName::DnsName(n) = name {
                dns_names.push(n.as_str().to_ascii_lowercase());
            }
        }
    }
    let serial = tbs.serial_number().as_bytes();
    let first = serial
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(serial.len().saturating_sub(1));
    Ok(CertSummary {
        not_after: validity.not_after.to_system_time(),
        not_before: validity.not_before.to_system_time(),
        dns_names,
        serial_hex: hex::encode(serial.get(first..).unwrap_or_default()),
    })
}

/// Whether the certificate at `chain_path` must be (re)issued for `names`: missing, unreadable,
/// not covering every name, or expiring within `renew_before` of `now`.
pub fn needs_renewal(chain_path: &Path, names: &[String], now: SystemTime, renew_before: std::time::Duration) -> bool {
    let Ok(pem) = std::fs::read(chain_path) else {
        return true;
    };
    let Ok(summary) = first_cert_der(&pem).and_then(|d| summarize(&d)) else {
        return true;
    };
    if names
        .iter()
        .any(|n| !summary.dns_names.contains(&n.to_ascii_lowercase()))
    {
        return true;
    }
    match summary.not_after.duration_since(now) {
        Ok(left) => left <= renew_before,
        Err(_) => true, // already expired
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use super::*;

    #[test]
    fn private_write_is_0600_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/key.pem");
        write_private(&p, b"one").unwrap();
        write_private(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp files left behind");
    }

    /// rcgen (an independent encoder) makes the certificate; we read back its fields.
    #[test]
    fn summary_and_renewal_decision() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["*.app.test".into(), "app.test".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2030, 1, 1);
        params.not_after = rcgen::date_time_ymd(2030, 4, 1);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x00, 0x7f, 0x01]));
        let cert = params.self_signed(&key).unwrap();
        let s = summarize(cert.der()).unwrap();
        assert_eq!(s.dns_names, ["*.app.test", "app.test"]);
        assert_eq!(s.serial_hex, "7f01");
        // 2030-04-01T00:00:00Z = 1901232000 (date -d 2030-04-01Z +%s).
        assert_eq!(s.not_after, SystemTime::UNIX_EPOCH + Duration::from_secs(1_901_232_000));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cert.pem");
        std::fs::write(&path, cert.pem()).unwrap();
        let names = vec!["*.app.test".to_owned(), "app.test".to_owned()];
        let day = Duration::from_secs(86400);
        let early = SystemTime::UNIX_EPOCH + Duration::from_secs(1_901_232_000) - 60 * day;
        assert!(!needs_renewal(&path, &names, early, 30 * day));
        assert!(needs_renewal(&path, &names, early, 61 * day));
        assert!(needs_renewal(&path, &["other.test".to_owned()], early, day));
        assert!(needs_renewal(&dir.path().join("missing.pem"), &names, early, day));
        std::fs::write(&path, "garbage").unwrap();
        assert!(needs_renewal(&path, &names, early, day));
    }
}
