use super::*;
use crate::quote::{INTEL_QE_VENDOR_ID, Quote};
use crate::verify::{TcbStatus, VerifyError, VerifyOptions, verify_quote};

const NOW: u64 = 1_800_000_000;

fn report() -> TdReport {
    let mut r = TdReport::zeroed();
    r.mr_td = [0x11; 48];
    r.rtmr = [[1; 48], [2; 48], [3; 48], [4; 48]];
    r.report_data = [0x5a; 64];
    r.td_attributes = [0, 0, 0, 0x10, 0, 0, 0, 0];
    r
}

fn opts(signer: &SimulatedQuoteSigner) -> VerifyOptions {
    VerifyOptions {
        now: NOW,
        allow_simulated: true,
        simulated_roots: vec![signer.root_pin()],
        allow_debug: false,
    }
}

#[test]
fn signed_quote_parses_with_both_parsers_and_verifies() {
    let s = SimulatedQuoteSigner::generate().unwrap();
    let raw = s.sign(&report()).unwrap();
    let q = Quote::parse(&raw).unwrap();
    assert_eq!(q.header.version, 4);
    assert_eq!(q.report, report());
    // dcap-qvl's parser accepts the layout too (it is the real v4 wire format).
    let theirs = dcap_qvl::quote::Quote::parse(&raw).unwrap();
    assert_eq!(theirs.report.as_td10().unwrap().rt_mr3, [4; 48]);

    let v = verify_quote(&raw, None, &opts(&s)).unwrap();
    assert_eq!(v.status, TcbStatus::Simulated);
    assert!(v.is_simulated());
    assert_eq!(v.quote.report.report_data, [0x5a; 64]);
}

#[test]
fn rejected_without_option_or_with_other_root() {
    let s = SimulatedQuoteSigner::generate().unwrap();
    let other = SimulatedQuoteSigner::generate().unwrap();
    let raw = s.sign(&report()).unwrap();
    let mut o = opts(&s);
    o.allow_simulated = false;
    assert!(matches!(
        verify_quote(&raw, None, &o),
        Err(VerifyError::SimulatedNotAllowed)
    ));
    let o = opts(&other);
    assert!(matches!(
        verify_quote(&raw, None, &o),
        Err(VerifyError::Simulated(SimError::RootNotPinned(_)))
    ));
    let mut o = opts(&s);
    o.simulated_roots.clear();
    assert!(matches!(
        verify_quote(&raw, None, &o),
        Err(VerifyError::Simulated(SimError::NoPins))
    ));
    // Pinning by the exact root DER works as well.
    let mut o = opts(&s);
    o.simulated_roots = vec![SimRootPin::parse(s.root_cert_pem().as_bytes()).unwrap()];
    assert!(verify_quote(&raw, None, &o).is_ok());
    let pin_hex = hex::encode(s.root_pin_spki_sha256());
    assert_eq!(SimRootPin::parse(pin_hex.as_bytes()).unwrap(), s.root_pin());
}

#[test]
fn tampering_is_detected() {
    let s = SimulatedQuoteSigner::generate().unwrap();
    let raw = s.sign(&report()).unwrap();
    // Flip a bit in RTMR3 (body): quote signature fails.
    let mut bad = raw.clone();
    bad[48 + 472] ^= 1;
    assert!(matches!(
        verify_quote(&bad, None, &opts(&s)),
        Err(VerifyError::Simulated(SimError::Signature(_)))
    ));
    // Flip a bit in the QE report: QE signature fails.
    let mut bad = raw.clone();
    bad[636 + 134 + 10] ^= 1;
    assert!(matches!(
        verify_quote(&bad, None, &opts(&s)),
        Err(VerifyError::Simulated(SimError::Signature(_)))
    ));
    // Replace the attestation key: the QE binding fails.
    let mut bad = raw.clone();
    bad[636 + 64] ^= 1;
    assert!(matches!(
        verify_quote(&bad, None, &opts(&s)),
        Err(VerifyError::Simulated(SimError::Binding))
    ));
}

#[test]
fn expired_time_rejected() {
    let s = SimulatedQuoteSigner::generate().unwrap();
    let raw = s.sign(&report()).unwrap();
    let mut o = opts(&s);
    o.now = 1_000_000_000; // 2001, before the certificates' not_before
    assert!(matches!(
        verify_quote(&raw, None, &o),
        Err(VerifyError::Simulated(SimError::Expired(..)))
    ));
}

#[test]
fn simulated_quote_never_reaches_intel_path_and_intel_never_sim_path() {
    let s = SimulatedQuoteSigner::generate().unwrap();
    let raw = s.sign(&report()).unwrap();
    // Even with Intel collateral and no simulation allowed, it is refused as simulated.
    let coll = crate::verify::parse_collateral(include_bytes!("../../tests/data/tdx_quote_collateral.json")).unwrap();
    let mut o = opts(&s);
    o.allow_simulated = false;
    assert!(matches!(
        verify_quote(&raw, Some(&coll), &o),
        Err(VerifyError::SimulatedNotAllowed)
    ));
    // Forge the Intel vendor id onto a simulated quote: the marker in its chain still routes
    // it to the simulated path, where the vendor id check fails.
    let mut forged = raw.clone();
    forged[12..28].copy_from_slice(&INTEL_QE_VENDOR_ID);
    assert!(is_simulated_quote(&Quote::parse(&forged).unwrap()));
    assert!(matches!(
        verify_quote(&forged, Some(&coll), &opts(&s)),
        Err(VerifyError::Simulated(SimError::NotSimulated))
    ));
    // A real Intel quote is never treated as simulated.
    let real = include_bytes!("../../tests/data/tdx_quote");
    let q = Quote::parse(real).unwrap();
    assert!(!is_simulated_quote(&q));
    assert_eq!(
        verify_simulated(&q, real, &[s.root_pin()], NOW),
        Err(SimError::NotSimulated)
    );
}

#[test]
fn bundle_round_trip_keeps_keys() {
    let s = SimulatedQuoteSigner::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sim.pem");
    s.save(&path).unwrap();
    let loaded = SimulatedQuoteSigner::load_or_generate(&path).unwrap();
    assert_eq!(loaded.root_cert_der(), s.root_cert_der());
    assert_eq!(loaded.attestation_public_key(), s.attestation_public_key());
    // A quote from the reloaded signer verifies under the original pin.
    let raw = loaded.sign(&report()).unwrap();
    assert!(verify_quote(&raw, None, &opts(&s)).is_ok());
    assert!(SimulatedQuoteSigner::from_pem_bundle("junk").is_err());
}

#[test]
fn certs_carry_marker_and_names() {
    let s = SimulatedQuoteSigner::generate().unwrap();
    use der::Decode;
    let root = x509_cert::Certificate::from_der(s.root_cert_der()).unwrap();
    let subject = root.tbs_certificate().subject().to_string();
    assert!(subject.contains(SIM_ROOT_CN), "{subject}");
    assert!(subject.contains("SIMULATED"), "{subject}");
    let q = Quote::parse(&s.sign(&report()).unwrap()).unwrap();
    let pem = q.pck_chain_pem().unwrap();
    let chain = x509_cert::Certificate::load_pem_chain(pem.as_bytes()).unwrap();
    assert!(chain[0].tbs_certificate().subject().to_string().contains(SIM_PCK_CN));
    assert!(chain.iter().all(|c| {
        c.tbs_certificate()
            .extensions()
            .unwrap()
            .iter()
            .any(|e| e.extn_id.to_string() == SIM_MARKER_OID_STR)
    }));
}

#[test]
fn simulated_ppid_gives_a_stable_per_signer_device_id() {
    let s = SimulatedQuoteSigner::generate().unwrap();
    let a = verify_quote(&s.sign(&report()).unwrap(), None, &opts(&s)).unwrap();
    assert_eq!(a.ppid.len(), SIM_PPID_LEN);
    assert_ne!(a.ppid, vec![0; SIM_PPID_LEN]);
    // device_id = sha256(PPID), checked against sha2 directly (the derivation is one hash).
    assert_eq!(a.device_id(), Sha256::digest(&a.ppid).to_vec());
    // Same signer (also after a bundle round trip): same device id; another signer: another one.
    let reloaded = SimulatedQuoteSigner::from_pem_bundle(&s.to_pem_bundle()).unwrap();
    let b = verify_quote(&reloaded.sign(&report()).unwrap(), None, &opts(&s)).unwrap();
    assert_eq!(a.device_id(), b.device_id());
    let other = SimulatedQuoteSigner::generate().unwrap();
    let c = verify_quote(&other.sign(&report()).unwrap(), None, &opts(&other)).unwrap();
    assert_ne!(a.device_id(), c.device_id());
    // The unverified self-report reads the same PPID.
    assert_eq!(crate::verify::self_reported_ppid(&a.quote), Some(a.ppid.clone()));
}

#[test]
fn malformed_or_duplicate_sim_ppid_extension_is_refused() {
    let make = |exts: Vec<rcgen::CustomExtension>| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = sim_params(SIM_PCK_CN, false);
        p.custom_extensions.extend(exts);
        let der = p.self_signed(&key).unwrap().der().to_vec();
        <x509_cert::Certificate as der::Decode>::from_der(&der).unwrap()
    };
    let good = ppid_der(&[7; SIM_PPID_LEN]);
    let ext = |v: Vec<u8>| rcgen::CustomExtension::from_oid_content(SIM_PPID_OID, v);
    assert_eq!(
        sim_ppid(&make(vec![ext(good.clone())])).unwrap(),
        Some(vec![7; SIM_PPID_LEN])
    );
    assert_eq!(sim_ppid(&make(vec![])).unwrap(), None);
    // Wrong length, wrong tag, duplicated: fail closed.
    let mut short = good.clone();
    short[1] = 15;
    short.pop();
    assert!(sim_ppid(&make(vec![ext(short)])).is_err());
    let mut utf8 = good.clone();
    utf8[0] = 0x0c;
    assert!(sim_ppid(&make(vec![ext(utf8)])).is_err());
    assert!(sim_ppid(&make(vec![ext(good.clone()), ext(good)])).is_err());
}
