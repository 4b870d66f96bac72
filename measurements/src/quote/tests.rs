use super::*;

const TDX_QUOTE: &[u8] = include_bytes!("../../tests/data/tdx_quote");
const TDX_QUOTE_V5_TD15: &[u8] = include_bytes!("../../tests/data/tdx_quote_outdated");
const TDX_QUOTE_V5_TD15EX: &[u8] = include_bytes!("../../tests/data/tdx_quote_td15ex");

/// Cross-check every report field against dcap-qvl's independent parser.
fn cross_check(raw: &[u8]) -> Quote {
    let ours = Quote::parse(raw).unwrap();
    let theirs = dcap_qvl::quote::Quote::parse(raw).unwrap();
    assert_eq!(ours.header.version, theirs.header.version);
    assert_eq!(ours.header.qe_vendor_id, theirs.header.qe_vendor_id);
    assert_eq!(ours.header.user_data, theirs.header.user_data);
    let t = match &theirs.report {
        dcap_qvl::quote::Report::TD10(r) => *r,
        dcap_qvl::quote::Report::TD15(r) => r.base,
        dcap_qvl::quote::Report::TD15Ex(r) => r.base.base,
        dcap_qvl::quote::Report::SgxEnclave(_) => panic!("sgx"),
    };
    let r = &ours.report;
    assert_eq!(r.tee_tcb_svn, t.tee_tcb_svn);
    assert_eq!(r.mr_seam, t.mr_seam);
    assert_eq!(r.mr_signer_seam, t.mr_signer_seam);
    assert_eq!(r.seam_attributes, t.seam_attributes);
    assert_eq!(r.td_attributes, t.td_attributes);
    assert_eq!(r.xfam, t.xfam);
    assert_eq!(r.mr_td, t.mr_td);
    assert_eq!(r.mr_config_id, t.mr_config_id);
    assert_eq!(r.mr_owner, t.mr_owner);
    assert_eq!(r.mr_owner_config, t.mr_owner_config);
    assert_eq!(r.rtmr, [t.rt_mr0, t.rt_mr1, t.rt_mr2, t.rt_mr3]);
    assert_eq!(r.report_data, t.report_data);
    assert_eq!(ours.signed_len, theirs.signed_length());
    let pem = theirs.raw_cert_chain().unwrap();
    let pem = String::from_utf8_lossy(pem);
    assert_eq!(ours.pck_chain_pem().unwrap(), pem.trim_end_matches('\0'));
    ours
}

#[test]
fn parses_v4_td10() {
    let q = cross_check(TDX_QUOTE);
    assert_eq!(q.header.version, 4);
    assert_eq!(q.body_type, BodyType::Td10);
    assert_eq!(q.signed_len, 632);
    assert_eq!(q.header.qe_vendor_id, INTEL_QE_VENDOR_ID);
    let qe = q.auth_data.qe_cert_data().unwrap();
    assert_eq!(qe.qe_auth_data.len(), 32);
    assert_eq!(qe.inner_cert_type, CERT_TYPE_PCK_CHAIN);
    assert_eq!(q.pck_chain_pem().unwrap().matches("BEGIN CERTIFICATE").count(), 3);
    // The sample carries 70 bytes of trailing padding after the signature data.
    assert_eq!(TDX_QUOTE.len() - q.end, 70);
}

#[test]
fn parses_v5_td15_and_td15ex() {
    let q = cross_check(TDX_QUOTE_V5_TD15);
    assert_eq!((q.header.version, q.body_type), (5, BodyType::Td15));
    assert_eq!(q.signed_len, 702);
    assert!(q.report.td15.is_some());
    let q = cross_check(TDX_QUOTE_V5_TD15EX);
    assert_eq!((q.header.version, q.body_type), (5, BodyType::Td15Ex));
    assert!(q.report.td15ex.is_some());
}

#[test]
fn qe_report_binding_holds_on_real_quote() {
    use sha2::{Digest, Sha256};
    let q = Quote::parse(TDX_QUOTE).unwrap();
    let qe = q.auth_data.qe_cert_data().unwrap();
    let mut h = Sha256::new();
    h.update(q.auth_data.attestation_key);
    h.update(&qe.qe_auth_data);
    assert_eq!(qe.qe_report.report_data[..32], h.finalize()[..]);
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let q = Quote::parse(TDX_QUOTE).unwrap();
    for len in 0..q.end {
        let err = Quote::parse(&TDX_QUOTE[..len]).unwrap_err();
        let QuoteError::Parse(ParseError::Truncated { offset, .. }) = err else {
            panic!("len {len}: {err}");
        };
        assert!(offset <= len, "offset {offset} > len {len}");
    }
}

#[test]
fn errors_name_field_and_offset() {
    let mut bad = TDX_QUOTE.to_vec();
    bad[4] = 0;
    let e = Quote::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("header.tee_type at offset 4"), "{e}");
    let mut bad = TDX_QUOTE.to_vec();
    bad[0] = 7;
    let e = Quote::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("header.version"), "{e}");
    let mut bad = TDX_QUOTE_V5_TD15.to_vec();
    bad[50] = 0x99; // body size
    let e = Quote::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("body_descriptor.size at offset 50"), "{e}");
    // Signature-data length pointing past the end.
    let mut bad = TDX_QUOTE.to_vec();
    bad[632..636].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = Quote::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("signature_data at offset 636"), "{e}");
}

#[test]
fn hex_input_forms() {
    let hex_text = std::fs::read("tests/data/tdx-quote.hex").unwrap();
    assert!(hex_text.starts_with(b"0x"));
    let raw = decode_quote_input(&hex_text).unwrap();
    let q = Quote::parse(&raw).unwrap();
    assert_eq!(q.header.version, 4);
    assert_eq!(decode_quote_input(TDX_QUOTE).unwrap(), TDX_QUOTE);
    assert_eq!(
        decode_quote_input(hex::encode(TDX_QUOTE).as_bytes()).unwrap(),
        TDX_QUOTE
    );
    assert!(matches!(decode_quote_input(b"  \n"), Err(InputError::Empty)));
    assert!(matches!(decode_quote_input(b"abc"), Err(InputError::Hex(_))));
}

#[test]
fn td10_round_trip_bytes() {
    let q = Quote::parse(TDX_QUOTE).unwrap();
    assert_eq!(q.header.to_bytes()[..], TDX_QUOTE[..48]);
    assert_eq!(q.report.to_td10_bytes()[..], TDX_QUOTE[48..632]);
}

#[test]
fn json_is_lowercase_hex() {
    let q = Quote::parse(TDX_QUOTE).unwrap();
    let j = serde_json::to_value(QuoteJson::from(&q)).unwrap();
    for k in [
        "mrtd",
        "rtmr0",
        "rtmr1",
        "rtmr2",
        "rtmr3",
        "report_data",
        "mrconfigid",
        "td_attributes",
        "xfam",
    ] {
        let s = j[k].as_str().unwrap();
        assert!(
            s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{k}: {s}"
        );
    }
    assert_eq!(j["mrtd"].as_str().unwrap(), hex::encode(&TDX_QUOTE[184..232]));
    assert_eq!(j["version"], 4);
    assert_eq!(j["tee_type"], 0x81);
}
