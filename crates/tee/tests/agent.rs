//! The `agent:` backend against a real guest agent: `dstack-guest-agent`'s host simulation mode (an in-process
//! simulated TDX module — never TDX) serving its unix socket from its own thread and runtime, as it would from
//! another process. Expected digests are computed here with `sha2` from DESIGN.md §3's formulas, independently
//! of the `measurements` code the backend uses; quotes are checked with the verifier and the simulator's pin.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dstack_guest_agent::simulate::{BackgroundSimulator, SimulateOptions};
use dstack_measurements::eventlog::TdxEvent;
use dstack_measurements::sim::SimRootPin;
use dstack_measurements::verify::{TcbStatus, VerifyError, VerifyOptions, verify_quote};
use dstack_tee::tdx::TdxPaths;
use dstack_tee::{AgentTee, RuntimeEvent, RuntimeEventLog, Tee, TeeConfig, TeeError, TeeKind, TeeRequest, detect};
use sha2::{Digest, Sha256, Sha384};

/// The compose the agent's identity is computed from (its raw bytes are hashed).
const COMPOSE: &str = r#"{"docker_compose_file":"services: {}\n","kms_enabled":false,"manifest_version":2,"name":"agent-tee-test","runner":"docker-compose"}"#;

/// A simulated guest agent on its own thread, in a temporary directory (the agent stops before the directory
/// goes).
struct RunningAgent {
    socket: PathBuf,
    ready: serde_json::Value,
    _sim: BackgroundSimulator,
    dir: tempfile::TempDir,
}

fn start_agent() -> RunningAgent {
    let dir = tempfile::tempdir().unwrap();
    let compose = dir.path().join("app-compose.json");
    std::fs::write(&compose, COMPOSE).unwrap();
    let opts = SimulateOptions {
        socket: dir.path().join("dstack.sock"),
        tappd_socket: None,
        state_dir: Some(dir.path().join("state")),
        app_compose: Some(compose),
    };
    let sim = BackgroundSimulator::start(opts, Duration::from_secs(60)).expect("the simulated agent did not come up");
    assert_eq!(sim.ready()["simulated"], true);
    RunningAgent {
        socket: sim.socket().to_owned(),
        ready: sim.ready().clone(),
        _sim: sim,
        dir,
    }
}

fn pin(agent: &RunningAgent) -> SimRootPin {
    let path = agent.ready["root_cert"].as_str().unwrap();
    SimRootPin::parse(&std::fs::read(path).unwrap()).unwrap()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn sha384(parts: &[&[u8]]) -> [u8; 48] {
    let mut h = Sha384::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// DESIGN.md §3: V1 digest = SHA384(u32_le(0x08000001) ‖ ":" ‖ name ‖ ":" ‖ payload).
fn v1_digest(name: &str, payload: &[u8]) -> [u8; 48] {
    sha384(&[&0x0800_0001u32.to_le_bytes(), b":", name.as_bytes(), b":", payload])
}

/// RTMR ← SHA384(RTMR ‖ digest) from 48 zero bytes.
fn replay(digests: impl IntoIterator<Item = [u8; 48]>) -> [u8; 48] {
    digests.into_iter().fold([0; 48], |r, d| sha384(&[&r, &d]))
}

fn quote_rtmrs(raw: &[u8]) -> [[u8; 48]; 4] {
    // TDX quote v4: RTMR0..3 at offset 48 + 328, 48 bytes each (DESIGN.md §9).
    let mut out = [[0u8; 48]; 4];
    for (i, r) in out.iter_mut().enumerate() {
        r.copy_from_slice(&raw[376 + 48 * i..424 + 48 * i]);
    }
    out
}

fn runtime_digests(log: &[TdxEvent]) -> Vec<[u8; 48]> {
    log.iter()
        .filter(|e| e.imr == 3)
        .map(|e| v1_digest(&e.event, &e.event_payload))
        .collect()
}

#[tokio::test]
async fn quotes_are_simulated_bind_report_data_and_match_the_event_log() {
    let agent = start_agent();
    let tee = AgentTee::connect(&agent.socket).await.unwrap();
    assert_eq!(tee.kind(), TeeKind::Simulated);

    let mut rd = [0u8; 64];
    for (i, b) in rd.iter_mut().enumerate() {
        *b = i as u8 ^ 0xa5;
    }
    let raw = tee.quote(rd).await.unwrap();
    assert_eq!(&raw[568..632], &rd[..], "REPORTDATA at offset 568");
    let opts = VerifyOptions {
        now: now(),
        allow_simulated: true,
        simulated_roots: vec![pin(&agent)],
        allow_debug: false,
    };
    let verified = verify_quote(&raw, None, &opts).unwrap();
    assert_eq!(verified.status, TcbStatus::Simulated);
    assert_eq!(verified.quote.report.report_data, rd);
    // Never accepted as TDX.
    let strict = VerifyOptions {
        allow_simulated: false,
        simulated_roots: Vec::new(),
        ..opts
    };
    assert!(matches!(
        verify_quote(&raw, None, &strict),
        Err(VerifyError::SimulatedNotAllowed)
    ));

    // RTMRs from the quote body; RTMR3 is the replay of the agent's runtime events.
    let rtmrs = tee.rtmrs().await.unwrap();
    assert_eq!(rtmrs, quote_rtmrs(&raw));
    let events = tee.runtime_events().await.unwrap();
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(&names[..3], ["system-preparing", "app-id", "compose-hash"]);
    assert_eq!(
        events[2].payload,
        Sha256::digest(COMPOSE.as_bytes()).to_vec(),
        "compose-hash = sha256(app-compose.json)"
    );
    assert_eq!(hex::encode(&events[1].payload), agent.ready["app_id"].as_str().unwrap());
    let digests = events.iter().map(|e| v1_digest(&e.name, &e.payload));
    assert_eq!(replay(digests), rtmrs[3]);

    // Boot events: the simulated agent's one labelled event per RTMR0-2.
    let boot = tee.boot_event_log().await.unwrap();
    assert_eq!(boot.len(), 3);
    for (i, e) in boot.iter().enumerate() {
        assert_eq!(e.imr, i as u32);
        let label = format!("dstack-rs simulated boot RTMR{i}");
        assert_eq!(e.event, label);
        assert_eq!(e.digest, sha384(&[label.as_bytes()]).to_vec());
    }
}

#[tokio::test]
async fn runtime_events_go_through_emit_event_and_raw_extends_are_refused() {
    let agent = start_agent();
    let tee: Arc<dyn Tee> = Arc::new(AgentTee::connect(&agent.socket).await.unwrap());
    let before = tee.rtmrs().await.unwrap()[3];
    tee.extend_runtime_event(RuntimeEvent::new("appliance-test", b"payload".to_vec()))
        .await
        .unwrap();
    let after = tee.rtmrs().await.unwrap()[3];
    assert_eq!(after, sha384(&[&before, &v1_digest("appliance-test", b"payload")]));
    assert_eq!(
        tee.runtime_events().await.unwrap().last(),
        Some(&RuntimeEvent::new("appliance-test", b"payload".to_vec()))
    );

    let e = tee.extend_rtmr(3, [1; 48]).await.unwrap_err();
    assert!(
        matches!(e, TeeError::Unsupported(ref m) if m.contains("EmitEvent")),
        "{e}"
    );
    assert_eq!(tee.rtmrs().await.unwrap()[3], after, "a refused extend changes nothing");

    // RuntimeEventLog over the agent: the agent's log is the record, no file is written.
    let file = agent.dir.path().join("no-such-dir/runtime_events.log");
    let log = RuntimeEventLog::new(Arc::clone(&tee), &file, Default::default());
    log.measure("second", b"").await.unwrap();
    assert!(!file.exists() && !file.parent().unwrap().exists());
    let full = log.full_event_log().await.unwrap();
    let rtmr3 = tee.rtmrs().await.unwrap()[3];
    assert_eq!(rtmr3, sha384(&[&after, &v1_digest("second", b"")]));
    assert_eq!(replay(runtime_digests(&full)), rtmr3);
    assert_eq!(full.iter().filter(|e| e.imr < 3).count(), 3);
    assert_eq!(full.last().map(|e| e.event.as_str()), Some("second"));
}

#[test]
fn the_agent_selector_is_detected_and_refused_next_to_tdx() {
    let agent = start_agent();
    let selector = format!("agent:{}", agent.socket.display());
    let no_tdx = tempfile::tempdir().unwrap();
    let cfg = TeeConfig {
        tdx_paths: TdxPaths::under(no_tdx.path()),
        request: TeeRequest::parse(&selector).unwrap(),
    };
    assert_eq!(detect(&cfg).unwrap().kind(), TeeKind::Simulated);

    // Where TDX is present, simulated evidence from the agent is refused (no downgrade of a real TD).
    let with_tdx = tempfile::tempdir().unwrap();
    let tdx_paths = TdxPaths::under(with_tdx.path());
    std::fs::create_dir_all(&tdx_paths.measurements).unwrap();
    let e = detect(&TeeConfig {
        tdx_paths,
        request: cfg.request.clone(),
    })
    .unwrap_err();
    assert!(
        matches!(e, TeeError::InvalidArgument(ref m) if m.contains("simulated")),
        "{e}"
    );
}

/// The appliance template `image-build/appliances/kms/kms.toml`, with its `vars.env` defaults filled in.
fn kms_template() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../image-build/appliances/kms");
    let mut text = std::fs::read_to_string(dir.join("kms.toml")).unwrap();
    for line in std::fs::read_to_string(dir.join("vars.env")).unwrap().lines() {
        if let Some((k, v)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
            text = text.replace(&format!("@{k}@"), v);
        }
    }
    let unfilled = text.split('@').skip(1).step_by(2).find(|name| {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    });
    assert_eq!(unfilled, None, "unfilled placeholder in {text}");
    text
}

#[tokio::test]
async fn kms_bootstraps_with_the_agent_selector_of_the_appliance_template() {
    let mut config = dstack_kms::KmsConfig::from_toml(&kms_template()).unwrap();
    assert_eq!(config.core.tee, "agent:/var/run/dstack.sock");
    assert_eq!(
        TeeRequest::parse(&config.core.tee).unwrap(),
        TeeRequest::Agent("/var/run/dstack.sock".into())
    );

    // The same configuration, pointed at the test agent and a scratch key directory.
    let agent = start_agent();
    let certs = agent.dir.path().join("certs");
    config.core.tee = format!("agent:{}", agent.socket.display());
    config.core.cert_dir = certs.clone();
    let kms = dstack_kms::Kms::new(config).unwrap();
    let info = kms.bootstrap("kms.test").await.unwrap();

    let att: serde_json::Value = serde_json::from_slice(&info.attestation).unwrap();
    assert_eq!(att["tee"], "simulated");
    let quote = hex::decode(att["quote"].as_str().unwrap()).unwrap();
    let opts = VerifyOptions {
        now: now(),
        allow_simulated: true,
        simulated_roots: vec![pin(&agent)],
        allow_debug: false,
    };
    let verified = verify_quote(&quote, None, &opts).unwrap();
    assert_eq!(verified.status, TcbStatus::Simulated);
    assert_eq!(
        verified.quote.report.report_data,
        dstack_kms::bootstrap::generated_keys_report_data(&info.ca_pubkey, &info.k256_pubkey)
    );
    // The event log shipped with it replays to the quoted RTMR3 and names this app's compose hash.
    let log: Vec<TdxEvent> = serde_json::from_value(att["event_log"].clone()).unwrap();
    assert_eq!(replay(runtime_digests(&log)), verified.quote.report.rtmr[3]);
    let compose_hash = log.iter().find(|e| e.event == "compose-hash").unwrap();
    assert_eq!(compose_hash.event_payload, Sha256::digest(COMPOSE.as_bytes()).to_vec());
    assert!(certs.join("root-ca.key").exists() && certs.join("rpc.crt").exists());
}
