use sha2::{Digest, Sha384};

use super::*;
use crate::simulate::{DEFAULT_APP_COMPOSE, SimulationInfo, simulated_agent};

async fn agent() -> (Agent, SimulationInfo, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (a, info) = simulated_agent(dir.path(), DEFAULT_APP_COMPOSE).await.unwrap();
    (a, info, dir)
}

#[tokio::test]
async fn get_key_chain_and_root_key_never_returned() {
    let (a, info, _d) = agent().await;
    // Info's device id is sha256(PPID) of the simulated module's PCK leaf.
    assert_eq!(a.config().device_id.len(), 32);
    let app_id = hex::decode(&info.app_id).unwrap();
    for alg in ["", "secp256k1", "k256", "ed25519"] {
        let k = a.get_key("p/1", "purpose", alg).unwrap();
        assert_ne!(k.key, a.config().app_keys.k256_key, "root key returned");
        let pubkey = if alg == "ed25519" {
            let key: [u8; 32] = k.key.as_slice().try_into().unwrap();
            ed25519_dalek::SigningKey::from_bytes(&key)
                .verifying_key()
                .to_bytes()
                .to_vec()
        } else {
            dstack_keys::sig::compressed(dstack_keys::sig::k256_signing_key(&k.key).unwrap().verifying_key())
        };
        let chain = dstack_keys::verify_key_chain(&app_id, "purpose", &pubkey, &k.signature_chain).unwrap();
        assert_eq!(hex::encode(chain.app_public_key), info.app_k256_pubkey);
        assert_eq!(hex::encode(chain.kms_public_key), info.kms_k256_pubkey);
    }
    assert_ne!(
        a.get_key("p/1", "x", "").unwrap().key,
        a.get_key("p/2", "x", "").unwrap().key
    );
    assert!(a.get_key("p", "x", "rsa").is_err());
    // The empty path does not yield the root key either.
    assert_ne!(a.get_key("", "", "").unwrap().key, a.config().app_keys.k256_key);
}

#[tokio::test]
async fn sign_and_verify() {
    let (a, _info, _d) = agent().await;
    let digest = [7u8; 32];
    for (alg, data) in [
        ("ed25519", &b"msg"[..]),
        ("secp256k1", b"msg"),
        ("secp256k1_prehashed", &digest),
    ] {
        let s = a.sign(alg, data).unwrap();
        assert_eq!(s.signature_chain.len(), 3);
        assert_eq!(s.signature_chain[0], s.signature);
        assert!(a.verify(alg, data, &s.signature, &s.public_key).unwrap());
        let mut other = data.to_vec();
        other[0] ^= 1;
        assert!(!a.verify(alg, &other, &s.signature, &s.public_key).unwrap());
    }
    assert!(a.sign("secp256k1_prehashed", b"short").is_err());
    assert!(a.sign("rsa", b"x").is_err());
    assert!(a.verify("ed25519", b"x", &[0; 64], &[1; 3]).is_err());
}

#[tokio::test]
async fn quote_report_data_and_event_log() {
    let (a, _info, _d) = agent().await;
    let q = a.get_quote(b"hello").await.unwrap();
    let parsed = Quote::parse(&q.quote).unwrap();
    assert_eq!(&parsed.report.report_data[..5], b"hello");
    assert_eq!(q.report_data.len(), 64);
    let events = dstack_measurements::eventlog::parse_json_log(q.event_log.as_bytes()).unwrap();
    assert_eq!(
        dstack_measurements::eventlog::replay(&events).unwrap(),
        parsed.report.rtmr
    );
    let err = a.get_quote(&[0; 65]).await.unwrap_err();
    assert_eq!(err.to_string(), "Report data is too long");
    let raw = a.tdx_quote(b"abc", "raw", "").await.unwrap();
    assert_eq!(&Quote::parse(&raw.quote).unwrap().report.report_data[..3], b"abc");
}

#[tokio::test]
async fn emit_event_extends_rtmr3_as_predicted() {
    let (a, _info, _d) = agent().await;
    let before = Quote::parse(&a.get_quote(b"").await.unwrap().quote)
        .unwrap()
        .report
        .rtmr[3];
    a.emit_event("my-event", b"data").await.unwrap();
    // Independent computation of dstack's V1 runtime-event digest and the RTMR extension.
    let mut pre = 0x0800_0001u32.to_le_bytes().to_vec();
    pre.extend_from_slice(b":my-event:data");
    let digest = Sha384::digest(&pre);
    let mut h = Sha384::new();
    h.update(before);
    h.update(digest);
    let expected: [u8; 48] = h.finalize().into();
    let after = Quote::parse(&a.get_quote(b"").await.unwrap().quote)
        .unwrap()
        .report
        .rtmr[3];
    assert_eq!(after, expected);
    assert!(a.emit_event("", b"x").await.is_err());
}

#[tokio::test]
async fn tls_key_validity_and_chain() {
    let (a, _info, _d) = agent().await;
    let bad = GetTlsKeyArgs {
        not_before: Some(10),
        not_after: Some(10),
        ..Default::default()
    };
    assert!(
        a.get_tls_key(&bad)
            .await
            .unwrap_err()
            .to_string()
            .contains("not_before")
    );
    let args = GetTlsKeyArgs {
        subject: "s".into(),
        usage_ra_tls: true,
        usage_server_auth: true,
        not_before: Some(1_000),
        not_after: Some(2_000_000_000),
        ..Default::default()
    };
    let r = a.get_tls_key(&args).await.unwrap();
    assert!(r.key.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert_eq!(r.certificate_chain.len(), 3);
    let (_, der) = der::pem::decode_vec(r.certificate_chain[0].as_bytes()).unwrap();
    let parsed = dstack_ra_tls::parse_cert(&der).unwrap();
    assert_eq!((parsed.not_before, parsed.not_after), (1_000, 2_000_000_000));
    let quote = Quote::parse(parsed.quote.as_deref().unwrap()).unwrap();
    assert_eq!(quote.report.report_data, ra_tls_report_data(&parsed.spki_der));
    // Two calls give different keys.
    assert_ne!(a.get_tls_key(&args).await.unwrap().key, r.key);
    let with_info = GetTlsKeyArgs {
        with_app_info: true,
        ..Default::default()
    };
    assert!(a.get_tls_key(&with_info).await.is_err());
}

#[tokio::test]
async fn info_tcb_info() {
    let (a, info, _d) = agent().await;
    let i = a.info().await.unwrap();
    assert_eq!(hex::encode(&i.app_id), info.app_id);
    let tcb: serde_json::Value = serde_json::from_str(&i.tcb_info).unwrap();
    for k in [
        "mrtd",
        "rtmr0",
        "rtmr1",
        "rtmr2",
        "rtmr3",
        "mr_aggregated",
        "os_image_hash",
        "compose_hash",
    ] {
        assert!(tcb[k].is_string(), "{k}");
    }
    assert_eq!(tcb["compose_hash"], info.compose_hash);
    assert_eq!(tcb["app_compose"], DEFAULT_APP_COMPOSE);
    assert_eq!(tcb["mr_aggregated"].as_str().unwrap(), hex::encode(&i.mr_aggregated));
    assert!(i.app_cert.contains("BEGIN CERTIFICATE"));
    assert!(tcb["event_log"].as_array().unwrap().len() >= 8);
}
