use std::sync::Arc;

use rcgen::KeyPair;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{ServerName, UnixTime};

use super::*;
use crate::tls::RaTlsVerifierConfig;
use crate::{AttestationPolicy, AttestationVerifier, CertRequest, RaTlsServerVerifier};

const NOW: u64 = 1_800_000_000;

fn ca(name: &str) -> CaCert {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let req = CertRequest {
        subject: name.into(),
        ca_level: Some(1),
        ..Default::default()
    };
    CaCert::self_signed(&req, key).unwrap()
}

/// A leaf for `app` valid from `not_before` with the given serial.
fn leaf(ca: &CaCert, app: u8, not_before: u64, serial: &[u8]) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let req = CertRequest {
        subject: "app.example".into(),
        alt_names: vec!["app.example".into()],
        usage_server_auth: true,
        app_id: Some(vec![app; 20]),
        not_before: Some(std::time::UNIX_EPOCH + Duration::from_secs(not_before)),
        not_after: Some(std::time::UNIX_EPOCH + Duration::from_secs(NOW + 86_400 * 365)),
        ..Default::default()
    };
    ca.issue_with_serial(&req, &key, serial).unwrap().der().to_vec()
}

fn content() -> CrlContent {
    CrlContent {
        crl_number: 7,
        this_update: NOW - 60,
        next_update: NOW + 86_400,
        serials: vec![RevokedSerial {
            serial: vec![0x00, 0x51, 0x02],
            revoked_at: NOW - 120,
        }],
        apps: vec![AppRevocation {
            app_id: vec![0xa2; 20],
            issued_before: NOW - 1000,
        }],
    }
}

#[test]
fn round_trip_and_checks() {
    let root = ca("Root");
    let crl = build_crl(&root, &content()).unwrap();
    let list = RevocationList::from_der(&crl, root.cert_der(), NOW).unwrap();
    let c = list.content();
    assert_eq!(
        (c.crl_number, c.this_update, c.next_update),
        (7, NOW - 60, NOW + 86_400)
    );
    assert_eq!(c.serials[0].serial, vec![0x51, 0x02]);
    assert_eq!(c.apps, content().apps);

    // Listed serial refused (leading zeros do not matter); another serial accepted.
    let e = list.check(&leaf(&root, 1, NOW - 10, &[0x51, 0x02])).unwrap_err();
    assert!(
        matches!(e, RaTlsError::Revoked(_)) && e.to_string().contains("5102"),
        "{e}"
    );
    list.check(&leaf(&root, 1, NOW - 10, &[0x51, 0x03])).unwrap();
    // App rule: app a2 issued before the cutoff refused, after it accepted; other apps unaffected.
    let e = list.check(&leaf(&root, 0xa2, NOW - 2000, &[9])).unwrap_err();
    assert!(e.to_string().contains(&hex::encode([0xa2; 20])), "{e}");
    list.check(&leaf(&root, 0xa2, NOW - 500, &[9])).unwrap();
    list.check(&leaf(&root, 0xa3, NOW - 2000, &[9])).unwrap();
}

#[test]
fn tampered_foreign_and_stale_lists_are_refused() {
    let root = ca("Root");
    let crl = build_crl(&root, &content()).unwrap();
    // Last byte is in the signature; flip one in the middle of the signed body (the serial 51 02).
    let mut sig = crl.clone();
    *sig.last_mut().unwrap() ^= 1;
    assert!(RevocationList::from_der(&sig, root.cert_der(), NOW).is_err());
    let pos = crl.windows(2).position(|w| w == [0x51, 0x02]).unwrap();
    let mut body = crl.clone();
    body[pos + 1] = 0x03;
    let e = RevocationList::from_der(&body, root.cert_der(), NOW).unwrap_err();
    assert!(e.to_string().contains("does not verify"), "{e}");
    // Same name, other key: the signature is checked, not just the name.
    let impostor = ca("Root");
    let e = RevocationList::from_der(&crl, impostor.cert_der(), NOW).unwrap_err();
    assert!(e.to_string().contains("does not verify"), "{e}");
    let e = RevocationList::from_der(&crl, ca("Other").cert_der(), NOW).unwrap_err();
    assert!(e.to_string().contains("not the pinned CA"), "{e}");
    // Expired and not-yet-valid lists.
    let e = RevocationList::from_der(&crl, root.cert_der(), NOW + 86_400 + CLOCK_SKEW_SECS + 1).unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
    assert!(RevocationList::from_der(&crl, root.cert_der(), NOW - 60 - CLOCK_SKEW_SECS - 1).is_err());
    assert!(RevocationList::from_der(&[0x30, 0x03, 1, 2, 3], root.cert_der(), NOW).is_err());
}

/// Independent check of the encoding and signature with openssl (skipped loudly when it is not installed).
#[test]
fn openssl_verifies_the_crl() {
    let root = ca("Root");
    let crl = build_crl(&root, &content()).unwrap();
    let dir = std::env::temp_dir().join(format!("ra-tls-crl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("crl.der"), &crl).unwrap();
    std::fs::write(dir.join("ca.pem"), root.cert_pem()).unwrap();
    let out = std::process::Command::new("openssl")
        .args([
            "crl", "-inform", "DER", "-in", "crl.der", "-CAfile", "ca.pem", "-noout", "-text",
        ])
        .current_dir(&dir)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let Ok(out) = out else {
        eprintln!("SKIP: openssl not installed");
        return;
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("verify OK"), "{text}");
    assert!(text.contains("Serial Number: 5102"), "{text}");
    assert!(text.contains("CRL Number:") && text.contains("7"), "{text}");
}

#[test]
fn tls_verifier_refuses_revoked_chain_members() {
    let root = ca("Root");
    let revoked = leaf(&root, 1, NOW - 10, &[0x51, 0x02]);
    let fine = leaf(&root, 1, NOW - 10, &[0x51, 0x04]);
    let att = Arc::new(AttestationVerifier::new(AttestationPolicy::default()));
    let v = RaTlsServerVerifier::new(
        RaTlsVerifierConfig {
            roots: vec![root.cert_der().clone()],
            accept_self_signed: false,
            require_attestation: false,
        },
        att,
    )
    .unwrap();
    let name = ServerName::try_from("app.example").unwrap();
    let at = UnixTime::since_unix_epoch(Duration::from_secs(NOW));
    let verify = |der: &[u8], at| v.verify_server_cert(&der.to_vec().into(), &[], &name, &[], at);
    verify(&revoked, at).unwrap();
    let list = RevocationList::from_der(&build_crl(&root, &content()).unwrap(), root.cert_der(), NOW).unwrap();
    v.set_revocation_list(Some(Arc::new(list)));
    let e = verify(&revoked, at).unwrap_err().to_string();
    assert!(e.contains("Revoked") && e.contains("5102"), "{e}");
    verify(&fine, at).unwrap();
    // A list past nextUpdate refuses everyone.
    let later = UnixTime::since_unix_epoch(Duration::from_secs(NOW + 86_400 * 2));
    let e = verify(&fine, later).unwrap_err().to_string();
    assert!(e.contains("expired"), "{e}");
    v.set_revocation_list(None);
    verify(&revoked, at).unwrap();
}
