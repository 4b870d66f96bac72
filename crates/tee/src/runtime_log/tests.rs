use std::sync::Arc;

use dstack_measurements::eventlog::check_against_report;
use dstack_measurements::quote::Quote;
use dstack_measurements::sim::SimulatedQuoteSigner;
use dstack_sim_tdx::{InitialState, SimTdx};

use super::*;
use crate::{SimEndpoint, SimulatedTee, TeeKind};

#[test]
fn line_format_matches_dstack() {
    // dstack cc-eventlog test vector: {"event":"app-id","payload":"AQID"} is app-id with payload 01 02 03, V1.
    let parsed = parse_runtime_log("{\"event\":\"app-id\",\"payload\":\"AQID\"}\n\n").unwrap();
    assert_eq!(parsed, vec![RuntimeEvent::new("app-id", vec![1, 2, 3])]);
    assert_eq!(runtime_log_line(&parsed[0]), r#"{"event":"app-id","payload":"AQID"}"#);
    let v2 = RuntimeEvent::new("test", vec![1]).with_version(EventLogVersion::V2);
    let line = runtime_log_line(&v2);
    assert_eq!(line, r#"{"event":"test","payload":"AQ==","version":2}"#);
    assert_eq!(parse_runtime_log(&line).unwrap(), vec![v2]);
    assert!(
        parse_runtime_log("{\"event\":\"a\",\"payload\":\"!!\"}")
            .unwrap_err()
            .contains("line 1")
    );
    assert!(parse_runtime_log("x\n{").unwrap_err().contains("line 1"));
    assert!(parse_runtime_log("{\"event\":\"a\",\"payload\":\"\",\"version\":7}").is_err());
}

/// A simulated TDX module on a unix socket, and a `SimulatedTee` talking to it.
pub(crate) async fn sim_tee(dir: &Path) -> (Arc<SimTdx>, Arc<dyn Tee>, tokio::sync::oneshot::Sender<()>) {
    let init = InitialState {
        mrtd: vec![3; 48],
        boot_event_log: vec![TdxEvent {
            imr: 0,
            event_type: 0x8000_000a,
            digest: vec![0x44; 48],
            event: String::new(),
            event_payload: Vec::new(),
            version: None,
        }],
        ..Default::default()
    };
    let sim = Arc::new(SimTdx::new(&init, SimulatedQuoteSigner::generate().unwrap()).unwrap());
    let sock = dir.join("sim.sock");
    let listener = dstack_rpc::bind_unix(&sock, 0o600).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(dstack_rpc::serve_unix(
        listener,
        dstack_sim_tdx::router(Arc::clone(&sim)),
        async move {
            let _ = stopped.await;
        },
    ));
    let tee: Arc<dyn Tee> = Arc::new(SimulatedTee::new(&SimEndpoint::Unix(sock)));
    (sim, tee, stop)
}

#[tokio::test]
async fn measured_events_persist_and_replay() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (sim, tee, _stop) = sim_tee(dir.path()).await;
    assert_eq!(tee.kind(), TeeKind::Simulated);
    let log = RuntimeEventLog::new(
        Arc::clone(&tee),
        dir.path().join("log/runtime_events.log"),
        EventLogVersion::V1,
    );
    assert!(log.load_verified().await.unwrap().is_empty());
    log.measure("system-preparing", b"").await.unwrap();
    log.measure("app-id", &[7; 20]).await.unwrap();
    log.measure("compose-hash", &[8; 32]).await.unwrap();

    let events = log.load_verified().await.unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[1], RuntimeEvent::new("app-id", vec![7; 20]));
    let mode = std::fs::metadata(log.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // The module logged the same events with names and payloads.
    assert_eq!(sim.runtime_event_log(), log.tdx_events().await.unwrap());

    // The full log (boot + runtime) reproduces every RTMR of a fresh quote.
    let quote = Quote::parse(&tee.quote([1; 64]).await.unwrap()).unwrap();
    assert_eq!(quote.report.report_data, [1; 64]);
    let full = log.full_event_log().await.unwrap();
    assert_eq!(full.len(), 4);
    assert!(check_against_report(&full, &quote.report).unwrap().matches);

    // Tampering with the persisted log is detected against RTMR3.
    let text = std::fs::read_to_string(log.path()).unwrap();
    std::fs::write(log.path(), text.replace("\"app-id\"", "\"app-xx\"")).unwrap();
    let err = log.load_verified().await.unwrap_err();
    assert!(
        matches!(err, TeeError::EventLog { .. }) && err.to_string().contains("RTMR3"),
        "{err}"
    );
}

#[tokio::test]
async fn v2_events_use_v2_digests() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, tee, _stop) = sim_tee(dir.path()).await;
    let log = RuntimeEventLog::new(tee, dir.path().join("rt.log"), EventLogVersion::V2);
    log.measure("compose-hash", &[0xab, 0xcd]).await.unwrap();
    let logged = sim.runtime_event_log();
    assert_eq!(logged[0].version, Some(2));
    // Independent: sha384 of the JCS JSON from dstack's test vector.
    assert_eq!(
        hex::encode(&logged[0].digest),
        "9dde1673f544faa94b921825209593ddde08d0baf9cd6990175dffaf3081f1bb10311d56de189491feb33842a050ad7b"
    );
    assert!(std::fs::read_to_string(log.path()).unwrap().contains("\"version\":2"));
    log.load_verified().await.unwrap();
}

#[tokio::test]
async fn simulator_errors_are_reported_with_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (_sim, tee, _stop) = sim_tee(dir.path()).await;
    let err = tee.extend_rtmr(0, [0; 48]).await.unwrap_err();
    assert!(
        matches!(err, TeeError::Simulator { ref endpoint, .. } if endpoint.starts_with("unix:")),
        "{err}"
    );
    let missing = SimulatedTee::new(&SimEndpoint::Unix(dir.path().join("absent.sock")));
    assert!(matches!(missing.quote([0; 64]).await, Err(TeeError::Simulator { .. })));
}
