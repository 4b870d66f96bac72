use std::sync::Arc;

use dstack_measurements::eventlog::{check_against_report, parse_json_log};
use dstack_measurements::quote::Quote;
use dstack_measurements::verify::{TcbStatus, VerifyError, VerifyOptions, verify_quote};
use dstack_rpc::sim_tdx::{ExtendRtmrRequest, GetQuoteRequest, SimTdxClient};
use dstack_rpc::{Client, RpcError};

use super::*;

fn boot_event(imr: u32, byte: u8) -> TdxEvent {
    TdxEvent {
        imr,
        event_type: 0x8000_0001,
        digest: vec![byte; 48],
        event: String::new(),
        event_payload: Vec::new(),
        version: None,
    }
}

pub(crate) fn sample_init() -> InitialState {
    InitialState {
        mrtd: vec![0x11; 48],
        mr_config_id: Some(vec![0x22; 48]),
        boot_event_log: vec![boot_event(0, 1), boot_event(1, 2), boot_event(2, 3), boot_event(0, 4)],
        ..Default::default()
    }
}

fn sha384_extend(r: [u8; 48], d: &[u8]) -> [u8; 48] {
    let mut h = Sha384::new();
    h.update(r);
    h.update(d);
    h.finalize().into()
}

fn module() -> SimTdx {
    SimTdx::new(&sample_init(), SimulatedQuoteSigner::generate().unwrap()).unwrap()
}

fn opts(pins: Vec<SimRootPin>, allow: bool) -> VerifyOptions {
    VerifyOptions {
        now: 1_800_000_000,
        allow_simulated: allow,
        simulated_roots: pins,
        allow_debug: false,
    }
}

#[test]
fn initial_rtmrs_are_the_boot_log_replay() {
    let sim = module();
    let r = sim.registers();
    // Computed directly with SHA-384 rather than through the replay code.
    assert_eq!(r.rtmr[0], sha384_extend(sha384_extend([0; 48], &[1; 48]), &[4; 48]));
    assert_eq!(r.rtmr[1], sha384_extend([0; 48], &[2; 48]));
    assert_eq!(r.rtmr[2], sha384_extend([0; 48], &[3; 48]));
    assert_eq!(r.rtmr[3], [0; 48]);
    assert_eq!(r.mrtd, [0x11; 48]);
    assert_eq!(r.mr_config_id, [0x22; 48]);
}

#[test]
fn inconsistent_or_malformed_initial_state_is_refused() {
    let mut init = sample_init();
    init.rtmr1 = Some(vec![9; 48]);
    assert!(matches!(
        init.to_report(),
        Err(SimTdxError::InconsistentBootLog { register: "rtmr1" })
    ));
    let mut init = sample_init();
    init.mrtd = vec![0; 47];
    assert!(matches!(
        init.to_report(),
        Err(SimTdxError::Length { field: "mrtd", .. })
    ));
    let mut init = sample_init();
    init.boot_event_log.push(boot_event(3, 5));
    assert!(matches!(init.to_report(), Err(SimTdxError::BootLog(_))));
    // Explicit RTMRs without a log are taken as given.
    let init = InitialState {
        mrtd: vec![0; 48],
        rtmr2: Some(vec![7; 48]),
        ..Default::default()
    };
    assert_eq!(init.to_report().unwrap().rtmr[2], [7; 48]);
    assert!(InitialState::from_json(br#"{"mrtd":"00","bogus":1}"#).is_err());
}

#[test]
fn quotes_are_simulated_v4_and_need_allow_simulated() {
    let sim = module();
    let quote = sim.quote(b"hello").unwrap();
    let parsed = Quote::parse(&quote).unwrap();
    assert_eq!(parsed.header.version, 4);
    assert_eq!(parsed.report.mr_td, [0x11; 48]);
    assert_eq!(parsed.report.td_attributes, DEFAULT_TD_ATTRIBUTES);
    assert_eq!(parsed.report.xfam, DEFAULT_XFAM);
    assert_eq!(&parsed.report.report_data[..5], b"hello");
    assert!(parsed.report.report_data[5..].iter().all(|&b| b == 0));

    assert!(matches!(
        verify_quote(&quote, None, &opts(vec![sim.root_pin()], false)),
        Err(VerifyError::SimulatedNotAllowed)
    ));
    let other = SimulatedQuoteSigner::generate().unwrap().root_pin();
    assert!(matches!(
        verify_quote(&quote, None, &opts(vec![other], true)),
        Err(VerifyError::Simulated(_))
    ));
    let ok = verify_quote(&quote, None, &opts(vec![sim.root_pin()], true)).unwrap();
    assert_eq!(ok.status, TcbStatus::Simulated);

    assert!(matches!(sim.quote(&[0; 65]), Err(SimTdxError::ReportDataTooLong(65))));
    assert!(sim.quote(&[0; 64]).is_ok());
}

#[test]
fn extend_validates_and_logs_runtime_events() {
    let sim = module();
    let v1 = RuntimeEvent::new("app-id", vec![7; 20]);
    let v2 = RuntimeEvent::new("compose-hash", vec![8; 32]).with_version(EventLogVersion::V2);
    for bad in [0, 1, 4] {
        assert!(matches!(
            sim.extend_rtmr(bad, &v1.digest(), None),
            Err(SimTdxError::BadRtmrIndex(i)) if i == bad
        ));
    }
    assert!(matches!(
        sim.extend_rtmr(3, &[0; 47], None),
        Err(SimTdxError::Length { field: "digest", .. })
    ));
    assert!(matches!(
        sim.extend_rtmr(3, &v1.digest(), Some(("app-id", &[6; 20]))),
        Err(SimTdxError::EventDigestMismatch { .. })
    ));
    assert_eq!(
        sim.registers().rtmr[3],
        [0; 48],
        "refused extensions must not change RTMR3"
    );

    sim.extend_rtmr(3, &v1.digest(), Some(("app-id", &v1.payload))).unwrap();
    sim.extend_rtmr(3, &v2.digest(), Some(("compose-hash", &v2.payload)))
        .unwrap();
    sim.extend_rtmr(2, &[5; 48], None).unwrap();
    let log = sim.runtime_event_log();
    assert_eq!(log.len(), 3);
    assert_eq!(log[0].version, None);
    assert_eq!(log[1].version, Some(2));
    let expected3 = sha384_extend(sha384_extend([0; 48], &v1.digest()), &v2.digest());
    assert_eq!(sim.registers().rtmr[3], expected3);

    // Boot log + runtime log replays to what the quote reports.
    let quote = Quote::parse(&sim.quote(&[]).unwrap()).unwrap();
    let mut all = sim.boot_event_log();
    all.extend(log);
    assert!(check_against_report(&all, &quote.report).unwrap().matches);
}

#[test]
fn open_persists_keys_privately_and_exports_the_root() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let a = SimTdx::open(&sample_init(), &state).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state.join(SIGNER_FILE)), 0o600);
    assert_eq!(mode(&state), 0o700);
    let root = std::fs::read(root_cert_path(&state)).unwrap();
    assert_eq!(SimRootPin::parse(&root).unwrap(), SimRootPin::CertDer(pem_der(&root)));
    let b = SimTdx::open(&sample_init(), &state).unwrap();
    assert_eq!(
        a.root_spki_sha256(),
        b.root_spki_sha256(),
        "keys must survive a restart"
    );
}

fn pem_der(pem: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(pem).unwrap();
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    base64_decode(&b64)
}

/// Minimal standard-alphabet base64 decoder (test helper, independent of the code under test).
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let clean: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in clean.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= u32::from(val(c)) << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

#[tokio::test]
async fn protocol_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sim.sock");
    let sim = Arc::new(module());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_unix(Arc::clone(&sim), sock.clone(), async move {
        let _ = stopped.await;
    }));
    // Wait for the socket to appear.
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let client = SimTdxClient::new(Client::unix(&sock, ""));
    let info = client.info().await.unwrap();
    assert!(info.simulated);
    assert_eq!(info.root_cert_pem, sim.root_cert_pem());

    let ev = RuntimeEvent::new("system-preparing", Vec::new());
    client
        .extend_rtmr(ExtendRtmrRequest {
            index: 3,
            digest: ev.digest().to_vec(),
            event: Some("system-preparing".into()),
            payload: Some(Vec::new()),
        })
        .await
        .unwrap();
    let m = client.get_rtmrs().await.unwrap();
    assert_eq!(m.rtmr3, sha384_extend([0; 48], &ev.digest()).to_vec());
    assert_eq!(m.mrtd, vec![0x11; 48]);

    let q = client
        .get_quote(GetQuoteRequest {
            report_data: vec![0xaa; 64],
        })
        .await
        .unwrap();
    assert_eq!(Quote::parse(&q.quote).unwrap().report.rtmr[3].to_vec(), m.rtmr3);

    let boot = parse_json_log(client.get_boot_event_log().await.unwrap().event_log.as_bytes()).unwrap();
    assert_eq!(boot, sample_init().boot_event_log);
    let runtime = parse_json_log(client.get_runtime_event_log().await.unwrap().event_log.as_bytes()).unwrap();
    assert_eq!(runtime.len(), 1);

    let too_long = client
        .get_quote(GetQuoteRequest {
            report_data: vec![0; 65],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(too_long, RpcError::Remote { status: 400, ref message } if message.contains("64")),
        "{too_long}"
    );
    let bad_index = client
        .extend_rtmr(ExtendRtmrRequest {
            index: 1,
            digest: vec![0; 48],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(bad_index.to_string().contains("RTMR1"), "{bad_index}");

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
