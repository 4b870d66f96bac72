use std::sync::Mutex;

use rcgen::KeyPair;

use super::*;
use crate::revocation::{CLOCK_SKEW_SECS, CrlContent, RevokedSerial, build_crl};
use crate::{CaCert, CertRequest};

const NOW: u64 = 1_800_000_000;

fn key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

fn root(name: &str) -> CaCert {
    let req = CertRequest {
        subject: name.into(),
        ca_level: Some(1),
        ..Default::default()
    };
    CaCert::self_signed(&req, key()).unwrap()
}

/// An app CA under `root` (as the KMS derives one per app).
fn app_ca(root: &CaCert) -> CaCert {
    let req = CertRequest {
        subject: "Dstack App CA".into(),
        ca_level: Some(0),
        app_id: Some(vec![0xa1; 20]),
        ..Default::default()
    };
    CaCert::issued_by(&req, key(), root).unwrap()
}

fn leaf_req() -> CertRequest {
    CertRequest {
        subject: "app.example".into(),
        alt_names: vec!["app.example".into()],
        usage_server_auth: true,
        app_id: Some(vec![0xa1; 20]),
        not_before: Some(UNIX_EPOCH + Duration::from_secs(NOW - 3600)),
        not_after: Some(UNIX_EPOCH + Duration::from_secs(NOW + 86_400)),
        ..Default::default()
    }
}

fn leaf(ca: &CaCert, serial: &[u8]) -> Vec<u8> {
    ca.issue_with_serial(&leaf_req(), &key(), serial)
        .unwrap()
        .der()
        .to_vec()
}

fn crl(root: &CaCert, number: u64, this_update: u64, serials: &[&[u8]]) -> Vec<u8> {
    let content = CrlContent {
        crl_number: number,
        this_update,
        next_update: this_update + 86_400,
        serials: serials
            .iter()
            .map(|s| RevokedSerial {
                serial: s.to_vec(),
                revoked_at: this_update,
            })
            .collect(),
        apps: Vec::new(),
    };
    build_crl(root, &content).unwrap()
}

fn chain<'a>(certs: &'a [&'a [u8]]) -> impl Iterator<Item = &'a [u8]> {
    certs.iter().copied()
}

#[test]
fn revoked_app_certificate_refused_by_serial_others_accepted() {
    let kms = root("Dstack KMS CA");
    let ca = app_ca(&kms);
    let ca_der = ca.cert_der().to_vec();
    let revoked = leaf(&ca, &[0x7e, 0x57]);
    let fine = leaf(&ca, &[0x7e, 0x58]);
    let set = RevocationSet::new();
    set.add_issuer(kms.cert_der(), true).unwrap();
    let list = set.update_der(&crl(&kms, 3, NOW - 10, &[&[0x7e, 0x57]]), NOW).unwrap();
    assert_eq!(list.content().crl_number, 3);

    let e = set
        .check_chain(chain(&[&revoked, &ca_der]), NOW)
        .unwrap_err()
        .to_string();
    assert!(e.contains("revoked") && e.contains("7e57") && e.contains("#3"), "{e}");
    set.check_chain(chain(&[&fine, &ca_der]), NOW).unwrap();
    // The app CA itself can be revoked: every certificate presented under it is then refused.
    let ca_serial = {
        let c = Certificate::from_der(&ca_der).unwrap();
        c.tbs_certificate().serial_number().as_bytes().to_vec()
    };
    set.update_der(&crl(&kms, 4, NOW - 5, &[&ca_serial]), NOW).unwrap();
    let e = set.check_chain(chain(&[&fine, &ca_der]), NOW).unwrap_err().to_string();
    assert!(e.contains(&hex::encode(&ca_serial)), "{e}");
}

#[test]
fn chains_outside_the_pinned_ca_are_not_checked() {
    let kms = root("Dstack KMS CA");
    let other = root("Someone Else");
    let set = RevocationSet::new();
    set.add_issuer(kms.cert_der(), true).unwrap();
    set.update_der(&crl(&kms, 1, NOW - 10, &[&[0x01]]), NOW).unwrap();
    // Same serial, other issuer: not this KMS's certificate, not in its list's scope.
    set.check_chain(chain(&[&leaf(&other, &[0x01])]), NOW).unwrap();
    // Certificates the KMS root issued directly are in scope (e.g. the KMS RPC certificate).
    let e = set.check_chain(chain(&[&leaf(&kms, &[0x01])]), NOW).unwrap_err();
    assert!(matches!(e, RaTlsError::Revoked(_)), "{e}");
    // A CRL signed by a CA that is not pinned is refused.
    let e = set.update_der(&crl(&other, 9, NOW, &[]), NOW).unwrap_err().to_string();
    assert!(e.contains("not a pinned CA"), "{e}");
}

#[test]
fn required_list_missing_or_expired_fails_closed() {
    let kms = root("Dstack KMS CA");
    let ca = app_ca(&kms);
    let ca_der = ca.cert_der().to_vec();
    let cert = leaf(&ca, &[0x42]);
    let optional = RevocationSet::new();
    optional.add_issuer(kms.cert_der(), false).unwrap();
    optional.check_chain(chain(&[&cert, &ca_der]), NOW).unwrap();

    let required = RevocationSet::new();
    required.add_issuer(kms.cert_der(), true).unwrap();
    required.record_error(kms.cert_der(), "connection refused");
    let e = required
        .check_chain(chain(&[&cert, &ca_der]), NOW)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("revocation status unknown") && e.contains("connection refused"),
        "{e}"
    );
    // Once a list is installed, even an optional CA refuses chains after the list expires.
    optional.update_der(&crl(&kms, 1, NOW, &[]), NOW).unwrap();
    let late = NOW + 86_400 + CLOCK_SKEW_SECS + 1;
    let e = optional
        .check_chain(chain(&[&cert, &ca_der]), late)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expired"), "{e}");
}

#[test]
fn tampered_and_rolled_back_lists_are_refused_and_the_last_good_stays() {
    let kms = root("Dstack KMS CA");
    let ca = app_ca(&kms);
    let ca_der = ca.cert_der().to_vec();
    let revoked = leaf(&ca, &[0x51, 0x02]);
    let set = RevocationSet::new();
    set.add_issuer(kms.cert_der(), true).unwrap();
    let good = crl(&kms, 5, NOW - 10, &[&[0x51, 0x02]]);
    set.update_der(&good, NOW).unwrap();

    // A list with the revoked serial edited out of the signed body: the signature no longer verifies.
    let empty_forged = {
        let mut b = good.clone();
        let pos = b.windows(2).position(|w| w == [0x51, 0x02]).unwrap();
        b[pos + 1] = 0x03;
        b
    };
    let e = set.update_der(&empty_forged, NOW).unwrap_err().to_string();
    assert!(e.contains("does not verify"), "{e}");
    assert_eq!(set.status()[0].crl_number, Some(5));
    assert!(
        set.status()[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("does not verify")
    );
    assert!(set.check_chain(chain(&[&revoked, &ca_der]), NOW).is_err());
    // Garbage is refused too.
    assert!(set.update_der(b"not a crl", NOW).is_err());

    // An older (lower-numbered) genuine list is a rollback.
    let e = set
        .update_der(&crl(&kms, 4, NOW - 5, &[]), NOW)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rollback"), "{e}");
    assert!(set.check_chain(chain(&[&revoked, &ca_der]), NOW).is_err());
    // Same number, newer thisUpdate: replaces (the KMS re-signs periodically); older: ignored.
    let resigned = set.update_der(&crl(&kms, 5, NOW, &[&[0x51, 0x02]]), NOW).unwrap();
    assert_eq!(resigned.content().this_update, NOW);
    let kept = set.update_der(&crl(&kms, 5, NOW - 100, &[]), NOW).unwrap();
    assert_eq!(kept.content().this_update, NOW);
    assert_eq!(set.status()[0].last_error, None);
}

#[test]
fn pinning_is_by_certificate_and_names_must_be_unique() {
    let set = RevocationSet::new();
    let a = root("Dstack KMS CA");
    set.add_issuer(a.cert_der(), false).unwrap();
    set.add_issuer(a.cert_der(), true).unwrap();
    assert!(set.status()[0].required, "required is sticky");
    let e = set.add_issuer(root("Dstack KMS CA").cert_der(), false).unwrap_err();
    assert!(e.to_string().contains("already pinned"), "{e}");
    assert!(set.add_issuer(b"junk", false).is_err());
}

#[tokio::test]
async fn refresher_installs_keeps_the_last_good_list_and_bounds_its_interval() {
    let kms = root("Dstack KMS CA");
    let ca = app_ca(&kms);
    let ca_der = ca.cert_der().to_vec();
    let revoked = leaf(&ca, &[0x0b, 0xad]);
    // The source answers from a queue: a list, then an outage, then a tampered list, then a newer list.
    let first = crl(&kms, 1, NOW - 10, &[]);
    let mut tampered = crl(&kms, 2, NOW - 5, &[&[0x0b, 0xad]]);
    *tampered.last_mut().unwrap() ^= 1;
    let newer = crl(&kms, 3, NOW, &[&[0x0b, 0xad]]);
    let answers = Arc::new(Mutex::new(vec![
        Ok(newer),
        Ok(tampered),
        Err("KMS unreachable".to_owned()),
        Ok(first),
    ]));
    let queue = Arc::clone(&answers);
    let source = move || {
        let next = queue.lock().unwrap().pop().unwrap();
        async move { next }
    };
    let set = RevocationSet::new();
    let r = CrlRefresher::new(Arc::clone(&set), kms.cert_der(), true, source, Duration::from_secs(1)).unwrap();
    assert_eq!(r.interval(), MIN_REFRESH, "intervals below the minimum are raised");

    let e = set
        .check_chain(chain(&[&revoked, &ca_der]), NOW)
        .unwrap_err()
        .to_string();
    assert!(e.contains("none fetched yet"), "{e}");
    let ok = r.refresh_once(NOW).await;
    assert_eq!(ok.as_ref().unwrap().content().crl_number, 1);
    set.check_chain(chain(&[&revoked, &ca_der]), NOW).unwrap();
    assert_eq!(r.next_delay(&ok, NOW), MIN_REFRESH, "bounded by the interval");

    let e = r.refresh_once(NOW).await.unwrap_err();
    assert!(e.to_string().contains("KMS unreachable"), "{e}");
    assert_eq!(r.next_delay(&Err(e), NOW), MIN_REFRESH);
    assert_eq!(set.status()[0].crl_number, Some(1), "last good list kept");
    let e = r.refresh_once(NOW).await.unwrap_err().to_string();
    assert!(e.contains("does not verify"), "{e}");
    set.check_chain(chain(&[&revoked, &ca_der]), NOW).unwrap();

    r.refresh_once(NOW).await.unwrap();
    let e = set
        .check_chain(chain(&[&revoked, &ca_der]), NOW)
        .unwrap_err()
        .to_string();
    assert!(e.contains("0bad") && e.contains("#3"), "{e}");
    assert!(answers.lock().unwrap().is_empty());

    // A long interval is lowered to the maximum; the delay follows half the list's remaining validity.
    let slow = CrlRefresher::new(
        RevocationSet::new(),
        kms.cert_der(),
        false,
        || async { Err::<Vec<u8>, _>("unused".to_owned()) },
        Duration::from_secs(30 * 86_400),
    )
    .unwrap();
    assert_eq!(slow.interval(), MAX_REFRESH);
    let list = set.list_for(kms.cert_der()).unwrap();
    assert_eq!(
        slow.next_delay(&Ok(list.clone()), NOW + 86_400 - 600),
        Duration::from_secs(300)
    );
    assert_eq!(slow.next_delay(&Ok(list), NOW), MAX_REFRESH);
}
