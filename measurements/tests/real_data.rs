//! Tests on real public data (see tests/data/README.md for sources). Expected values come
//! from the data itself (quote registers) or were computed independently (Python hashlib,
//! dcap-qvl's own tests, dstack's parser snapshot).

use dstack_measurements::eventlog::{self, ccel, derive_identity, parse_json_log};
use dstack_measurements::quote::{Quote, decode_quote_input};
use dstack_measurements::rtmr;
use dstack_measurements::verify::{
    TcbStatus, VerifyError, VerifyOptions, parse_collateral, self_reported_ppid, verify_quote,
};

fn data(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn opts(now: u64) -> VerifyOptions {
    VerifyOptions {
        now,
        ..Default::default()
    }
}

/// PPID in the PCK leaf of `tdx_quote` and its sha256 (see `dcap_sample_v4_verifies_up_to_date`).
const TDX_QUOTE_PPID: &str = "811dca2a26b952e85bb6448b097ba4fd";
const TDX_QUOTE_DEVICE_ID: &str = "a97a2d0b5e6df04773d42059b1d72df761856beda65f51d0b0d63349483a58cf";

#[test]
fn dcap_sample_v4_verifies_up_to_date() {
    let raw = data("tdx_quote");
    let coll = parse_collateral(&data("tdx_quote_collateral.json")).unwrap();
    // Inside the collateral window (dcap-qvl's own test uses this instant).
    let v = verify_quote(&raw, Some(&coll), &opts(1_752_919_234)).unwrap();
    assert_eq!(v.status, TcbStatus::UpToDate);
    assert!(v.advisory_ids.is_empty());
    assert_eq!(v.quote.header.version, 4);
    // PPID of the verified PCK leaf and device_id = sha256(PPID) (dstack's derivation). Independent
    // check: `openssl asn1parse -strparse` of the leaf's SGX extension (OID 1.2.840.113741.1.13.1.1)
    // and Python `hashlib.sha256` over those 16 bytes.
    assert_eq!(hex::encode(&v.ppid), TDX_QUOTE_PPID);
    assert_eq!(hex::encode(v.device_id()), TDX_QUOTE_DEVICE_ID);
    let parsed = Quote::parse(&raw).unwrap();
    assert_eq!(
        self_reported_ppid(&parsed).map(hex::encode).as_deref(),
        Some(TDX_QUOTE_PPID)
    );
    // After nextUpdate the same collateral is refused.
    assert!(matches!(
        verify_quote(&raw, Some(&coll), &opts(1_760_000_000)),
        Err(VerifyError::Dcap(_))
    ));
    // Tampered body: signature check fails.
    let mut bad = raw.clone();
    bad[400] ^= 1;
    assert!(matches!(
        verify_quote(&bad, Some(&coll), &opts(1_752_919_234)),
        Err(VerifyError::Dcap(_))
    ));
    // No collateral: a clear error, no network.
    assert!(matches!(
        verify_quote(&raw, None, &opts(1_752_919_234)),
        Err(VerifyError::MissingCollateral)
    ));
}

#[test]
fn dcap_sample_v5_td15_parses_but_has_no_matching_tcb_level() {
    // dcap-qvl itself only verifies this sample with a TCB-info override: its platform TCB
    // is below every level in the collateral, so plain verification must fail closed.
    let raw = data("tdx_quote_outdated");
    let coll = parse_collateral(&data("tdx_quote_outdated_collateral.json")).unwrap();
    let q = Quote::parse(&raw).unwrap();
    assert_eq!(q.header.version, 5);
    match verify_quote(&raw, Some(&coll), &opts(1_772_323_200)) {
        Err(VerifyError::Dcap(msg)) => assert!(msg.contains("TCB level"), "{msg}"),
        other => panic!("unexpected: {other:?}"),
    }
}

#[test]
fn dcap_sample_v5_td15ex_verifies() {
    let raw = data("tdx_quote_td15ex");
    let coll = parse_collateral(&data("tdx_quote_td15ex_collateral.json")).unwrap();
    let v = verify_quote(&raw, Some(&coll), &opts(1_792_454_400)).unwrap(); // 2026-10-20
    assert!(v.quote.report.td15ex.is_some());
    assert_ne!(v.status, TcbStatus::Simulated);
}

struct Fixture {
    quote: Quote,
    events: Vec<eventlog::TdxEvent>,
    vm_config: String,
}

fn fixture(name: &str) -> Fixture {
    let v: serde_json::Value = serde_json::from_slice(&data(name)).unwrap();
    let raw = decode_quote_input(v["quote"].as_str().unwrap().as_bytes()).unwrap();
    Fixture {
        quote: Quote::parse(&raw).unwrap(),
        events: eventlog::events_from_value(v["event_log"].clone()).unwrap(),
        vm_config: v["vm_config"].as_str().unwrap().to_owned(),
    }
}

#[test]
fn dstack_quote_report_replays_all_four_rtmrs() {
    let f = fixture("dstack-quote-report.json");
    let check = eventlog::check_against_report(&f.events, &f.quote.report).unwrap();
    assert!(check.matches, "{check:#?}");
    assert!(f.quote.report.rtmr[3] != [0; 48]);
    let id = derive_identity(&f.events, &f.quote.report, Some(&f.vm_config)).unwrap();
    assert_eq!(hex::encode(&id.app_id), "3763bc34552cf3a27ff71ad5f7a90471562a1a2d");
    assert_eq!(hex::encode(&id.instance_id), "c3714eb66990eace777b4e664c16e09375dec4c9");
    assert_eq!(
        hex::encode(&id.os_image_hash),
        "14ad42d0270b444eaeb53918a5a94d9b17eec7a817cd336173b17c5327541c67"
    );
    assert!(id.key_provider_info.starts_with("{\"name\":\"local-sgx\""));
    // python3 hashlib over the quote's registers (see tests/data/README.md).
    assert_eq!(
        hex::encode(&id.mr_aggregated),
        "233c659f83048505bb1ef7f105245aa80f5d04e3d096c329da272d7ee13fbf38"
    );
    assert_eq!(
        hex::encode(&id.mr_system),
        "e1ae776a1492d4f87937b7e563d265c16300be4aba5d748207587023bb7dbb75"
    );
}

#[test]
fn dstack_quote_ppid_and_device_id() {
    // The real dstack CVM quote ships without collateral, so only the unverified self-report path applies.
    // Independent check: `openssl asn1parse -strparse` of the PCK leaf's SGX extension, PPID OID
    // 1.2.840.113741.1.13.1.1, then Python `hashlib.sha256(ppid)`.
    let f = fixture("dstack-quote-report.json");
    let ppid = self_reported_ppid(&f.quote).unwrap();
    assert_eq!(hex::encode(&ppid), "897d3eb76ea887b783f9ad3d0771034b");
    assert_eq!(
        hex::encode(dstack_measurements::verify::device_id_of_ppid(&ppid)),
        "ea0ba482106a22ecb76b59b95fed32b5cc3a81534b27ee01a25a10a87cca7d03"
    );
}

#[test]
fn dstack_tdx_lite_stripped_runtime_digests_replay() {
    let f = fixture("dstack-tdx-lite-getquote.json");
    // Runtime events are in "stripped" form (no digest): recomputed from payloads.
    assert!(f.events.iter().filter(|e| e.is_runtime()).all(|e| e.digest.is_empty()));
    let check = eventlog::check_against_report(&f.events, &f.quote.report).unwrap();
    assert!(check.matches, "{check:#?}");
    let id = derive_identity(&f.events, &f.quote.report, Some(&f.vm_config)).unwrap();
    assert_eq!(
        hex::encode(&id.os_image_hash),
        "e6f5cfec20c02e7b97baa213d0f718020b55e040172d90ccbcb946d56c8b09db"
    );
    assert!(id.key_provider_info.starts_with("{\"name\":\"kms\""));
    assert_eq!(
        hex::encode(&id.mr_aggregated),
        "c758fa624b62536ca77504c4c52745e70880220a178a615a859c52f8b101d2ee"
    );
    assert_eq!(
        hex::encode(&id.mr_system),
        "118f754a080ecb8527df65656ee4e7e97b891cf488ad6a38886ff0dbca0c8f70"
    );
    assert_eq!(id.boot_rtmr3.len(), 48);
}

#[test]
fn tampered_runtime_payload_breaks_rtmr3() {
    let mut f = fixture("dstack-quote-report.json");
    let e = f.events.iter_mut().find(|e| e.event == "compose-hash").unwrap();
    e.event_payload[0] ^= 1;
    e.digest.clear(); // an attacker strips the digest so it is not compared
    let check = eventlog::check_against_report(&f.events, &f.quote.report).unwrap();
    assert!(!check.matches);
    assert!(check.registers[..3].iter().all(|r| r.matches));
    assert!(!check.registers[3].matches);
    assert!(derive_identity(&f.events, &f.quote.report, None).is_err());
}

#[test]
fn rtmr1_predicted_from_kernel_digest_matches_real_quotes() {
    for name in ["dstack-quote-report.json", "dstack-tdx-lite-getquote.json"] {
        let f = fixture(name);
        let kernel = f
            .events
            .iter()
            .find(|e| e.imr == 1 && e.event_type == eventlog::EV_EFI_BOOT_SERVICES_APPLICATION)
            .unwrap();
        let d: [u8; 48] = kernel.digest.as_slice().try_into().unwrap();
        assert_eq!(rtmr::rtmr1_from_digest(d), f.quote.report.rtmr[1], "{name}");
    }
}

#[test]
fn dstack_ccel_sample_matches_dstack_parser_snapshot() {
    let log = ccel::parse_ccel(&data("dstack-ccel.bin")).unwrap();
    assert_eq!(log.spec_id.algorithms.len(), 1);
    assert_eq!(log.spec_id.algorithms[0].alg_id, ccel::TPM_ALG_SHA384);
    // dstack's snapshot (cc_eventlog__tests__parse_ccel.snap) lists 18 events, the first a
    // TD HOB event on MR index 1 and the last "Exit Boot Services Returned with Success".
    assert_eq!(log.events.len(), 18);
    let first = &log.events[0];
    assert_eq!((first.mr_index, first.event_type), (1, 0x8000_000b));
    assert_eq!(
        hex::encode(first.sha384().unwrap()),
        "2b630fa1d8fa9b6e8c6507d2256803ed227888f7d1f62ca5cfbddfe495338b1c6a0fc339ea64700f0835c0897a662789"
    );
    let last = log.events.last().unwrap();
    assert_eq!(
        hex::encode(last.sha384().unwrap()),
        "0a2e01c85deae718a530ad8c6d20a84009babe6c8989269e950d8cf440c6e997695e64d455c4174a652cd080f6230b74"
    );
    assert_eq!(log.used, 1933);
    let events = log.to_tdx_events().unwrap();
    let rtmrs = eventlog::replay(&events).unwrap();
    assert_eq!(rtmrs[3], [0; 48]);
    // RTMR1 of this boot is again the fixed-string tail after the kernel digest.
    let kernel = events.iter().find(|e| e.imr == 1).unwrap();
    assert_eq!(
        rtmr::rtmr1_from_digest(kernel.digest.as_slice().try_into().unwrap()),
        rtmrs[1]
    );
}

#[test]
fn tappd_hex_quote_parses() {
    let raw = decode_quote_input(&data("quote-from-tappd.hex")).unwrap();
    let q = Quote::parse(&raw).unwrap();
    assert_ne!(q.report.rtmr[3], [0; 48]);
    let _ = parse_json_log(b"[]").unwrap();
}
