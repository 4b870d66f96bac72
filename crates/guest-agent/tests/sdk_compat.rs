//! SDK compatibility: the unmodified dstack SDKs against `dstack-guest-agent --simulate`.
//!
//! Environment (each test skips loudly when its variable is unset, and fails instead under
//! `DSTACK_REQUIRE_FIXTURES=1`):
//! * `DSTACK_TEST_PYTHON`: a python with PyPI `dstack-sdk==0.5.4` and `eth-hash[pycryptodome]` (plus its
//!   dependencies `eth-keys`, `cryptography`), e.g. `/var/cache/dstack-rs/venv/bin/python`.
//! * `DSTACK_TEST_NODE_MODULES`: a `node_modules` with `@phala/dstack-sdk` and its peers `@noble/curves`,
//!   `@noble/hashes`, e.g. `/var/cache/dstack-rs/npm/node_modules`; `node` from PATH.
//!
//! The scripts in `tests/sdk/` check key chains, certificate chains, RTMR3 replay and EmitEvent predictions with
//! independent crypto (eth-keys / @noble, cryptography / node:crypto, hashlib); this side parses every quote
//! they received with `dstack-measurements`, checks its report data and replays the event log against it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use dstack_guest_agent::attestation::Attestation;
use dstack_measurements::eventlog::{parse_json_log, replay, replay_digests};
use dstack_measurements::quote::Quote;
use dstack_measurements::sim::SimRootPin;
use dstack_measurements::verify::{VerifyOptions, verify_quote};

struct AgentProc {
    child: Child,
    info: String,
    socket: PathBuf,
    tappd: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent() -> AgentProc {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("dstack.sock");
    let tappd = dir.path().join("tappd.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dstack-guest-agent"))
        .arg("--simulate")
        .arg("--socket")
        .arg(&socket)
        .arg("--tappd-socket")
        .arg(&tappd)
        .arg("--state-dir")
        .arg(dir.path().join("sim"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting dstack-guest-agent");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("\"simulated\":true"), "agent did not start: {line:?}");
    AgentProc {
        child,
        info: line.trim().to_owned(),
        socket,
        tappd,
        _dir: dir,
    }
}

/// The fixture path from `var`, or `None` after a loud skip (a panic under `DSTACK_REQUIRE_FIXTURES=1`).
fn fixture(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            if std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref() == Ok("1") {
                panic!("{var} is not set and DSTACK_REQUIRE_FIXTURES=1");
            }
            eprintln!("SKIPPED: {var} is not set; SDK compatibility test not run");
            None
        }
    }
}

fn run_sdk(agent: &AgentProc, mut cmd: Command) -> serde_json::Value {
    let out = cmd
        .env("DSTACK_SIMULATOR_ENDPOINT", &agent.socket)
        .env("TAPPD_SIMULATOR_ENDPOINT", &agent.tappd)
        .env("SIM_INFO", &agent.info)
        .output()
        .expect("running the SDK script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK script failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // SDK warnings may precede the result line.
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("SDK script output {last:?}: {e}"))
}

/// Parses every quote, checks its report data and that its event log replays to its RTMRs.
fn check_quotes(result: &serde_json::Value) {
    let quotes = result["quotes"].as_array().expect("quotes");
    assert!(!quotes.is_empty());
    for q in quotes {
        let raw = hex::decode(q["quote"].as_str().unwrap()).unwrap();
        let quote = Quote::parse(&raw).expect("quote parses");
        assert_eq!(
            hex::encode(quote.report.report_data),
            q["expected_report_data"].as_str().unwrap()
        );
        let events = parse_json_log(q["event_log"].as_str().unwrap().as_bytes()).unwrap();
        assert!(events.iter().any(|e| e.event == "compose-hash"));
        assert_eq!(
            replay(&events).unwrap(),
            quote.report.rtmr,
            "event log does not replay to the quote"
        );
    }
    // The SDK's own replay of the first quote's log matches that quote's RTMR3.
    let first = hex::decode(quotes[0]["quote"].as_str().unwrap()).unwrap();
    let rtmr3 = Quote::parse(&first).unwrap().report.rtmr[3];
    assert_eq!(result["replayed_rtmr3"].as_str().unwrap(), hex::encode(rtmr3));
}

/// Decodes each `Attest` result, verifies its quote under the simulator root the agent printed (and that it is
/// refused as real TDX), and replays its event log and runtime events against the quote.
fn check_attestations(agent: &AgentProc, result: &serde_json::Value) {
    let info: serde_json::Value = serde_json::from_str(&agent.info).unwrap();
    let pin: [u8; 32] = hex::decode(info["root_spki_sha256"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let opts = VerifyOptions {
        now,
        allow_simulated: true,
        simulated_roots: vec![SimRootPin::SpkiSha256(pin)],
        allow_debug: false,
    };
    let list = result["attestations"].as_array().expect("attestations");
    assert!(!list.is_empty());
    for a in list {
        let att = Attestation::from_scale(&hex::decode(a["attestation"].as_str().unwrap()).unwrap())
            .expect("attestation decodes");
        assert_eq!(
            hex::encode(att.report_data),
            a["expected_report_data"].as_str().unwrap()
        );
        let verified = verify_quote(&att.quote, None, &opts).expect("quote verifies under the simulator pin");
        assert!(verified.is_simulated());
        assert_eq!(verified.quote.report.report_data, att.report_data);
        assert_eq!(replay(&att.event_log).unwrap(), verified.quote.report.rtmr);
        let digests: Vec<[u8; 48]> = att.runtime_events.iter().map(|e| e.digest()).collect();
        assert_eq!(replay_digests(&digests), verified.quote.report.rtmr[3]);
        let strict = VerifyOptions {
            allow_simulated: false,
            ..opts.clone()
        };
        assert!(
            verify_quote(&att.quote, None, &strict).is_err(),
            "simulated quote accepted as TDX"
        );
    }
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk").join(name)
}

#[test]
fn python_dstack_sdk() {
    let Some(python) = fixture("DSTACK_TEST_PYTHON") else {
        return;
    };
    let agent = start_agent();
    let mut cmd = Command::new(python);
    cmd.arg(script("check_python.py"));
    let result = run_sdk(&agent, cmd);
    check_quotes(&result);
    check_attestations(&agent, &result);
}

#[test]
fn node_dstack_sdk() {
    let Some(modules) = fixture("DSTACK_TEST_NODE_MODULES") else {
        return;
    };
    let agent = start_agent();
    let mut cmd = Command::new("node");
    cmd.arg(script("check_node.cjs")).env("NODE_PATH", modules);
    let result = run_sdk(&agent, cmd);
    check_quotes(&result);
    check_attestations(&agent, &result);
}
