//! Verifying a running CVM from outside, as a relying party would: fresh nonce → quote + event log
//! (through the app's `/quote/<hex>` endpoint, which asks the guest agent) → quote signature, report data,
//! MRTD/RTMR0-2 against the image's published `measurements.json`, RTMR3 replayed from the event log, and
//! the app identity (compose hash, app id, OS image) read from the replayed events.

use std::path::Path;

use dstack_measurements::eventlog::{TdxEvent, parse_json_log};
use dstack_measurements::published::{AttestationExtras, MeasurementsJson, diff};
use dstack_measurements::sim::SimRootPin;
use dstack_measurements::verify::{VerifyOptions, verify_quote};
use sha2::{Digest, Sha256};

use crate::stack::http_get;

/// One checked property.
#[derive(Debug, Clone)]
pub struct Check {
    pub what: String,
    pub expected: String,
    pub actual: String,
    pub ok: bool,
}

/// The verification result.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// TCB status of the quote (`Simulated` for the simulated TDX module, never `UpToDate`).
    pub tcb_status: String,
    pub checks: Vec<Check>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }

    /// A printable table.
    pub fn report(&self) -> String {
        let mut out = format!("quote TCB status: {}\n", self.tcb_status);
        for c in &self.checks {
            let mark = if c.ok { "ok  " } else { "FAIL" };
            out.push_str(&format!("  [{mark}] {:<28} {}\n", c.what, short(&c.actual)));
            if !c.ok {
                out.push_str(&format!("         expected {}\n", c.expected));
            }
        }
        out
    }
}

fn short(s: &str) -> String {
    if s.len() > 64 {
        format!("{}…", &s[..64])
    } else {
        s.to_owned()
    }
}

fn check(what: &str, expected: impl Into<String>, actual: impl Into<String>) -> Check {
    let (expected, actual) = (expected.into(), actual.into());
    Check {
        what: what.into(),
        ok: expected == actual,
        expected,
        actual,
    }
}

/// Payload of the last runtime event named `name`, as hex.
fn event_payload(events: &[TdxEvent], name: &str) -> String {
    events
        .iter()
        .rev()
        .find(|e| e.imr == 3 && e.event == name)
        .map(|e| hex::encode(&e.event_payload))
        .unwrap_or_else(|| format!("(no {name} event)"))
}

/// The report data the demo app's `/quote/<nonce>` asks for: `SHA-512("dstack-demo-quote:" || nonce)`
/// (never the caller's bytes, so nobody can obtain a quote binding a key of their choice).
pub fn demo_quote_report_data(nonce: &[u8]) -> [u8; 64] {
    use sha2::Digest;
    let mut h = sha2::Sha512::new();
    h.update(b"dstack-demo-quote:");
    h.update(nonce);
    h.finalize().into()
}

/// Verifies the CVM whose app answers on `app_port`. `app_compose` is what was deployed; the simulated
/// module's quotes are accepted only under the pinned root `sim_root` (a real deployment passes Intel
/// collateral instead and never accepts simulated quotes).
pub fn verify_cvm(
    app_port: u16,
    measurements_json: &Path,
    sim_root: &Path,
    app_compose: &str,
) -> Result<Verdict, String> {
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce).map_err(|e| format!("nonce: {e}"))?;
    let (status, body) = http_get(app_port, &format!("/quote/{}", hex::encode(nonce)))?;
    if status != 200 {
        return Err(format!("quote request: HTTP {status}: {body}"));
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("quote response: {e}"))?;
    let field = |name: &str| v.get(name).and_then(|x| x.as_str()).unwrap_or_default().to_owned();
    let quote = hex::decode(field("quote")).map_err(|e| format!("quote hex: {e}"))?;
    let events = parse_json_log(field("event_log").as_bytes()).map_err(|e| format!("event log: {e}"))?;
    let vm_config: serde_json::Value =
        serde_json::from_str(&field("vm_config")).map_err(|e| format!("vm_config: {e}"))?;

    let pem = std::fs::read(sim_root).map_err(|e| format!("{}: {e}", sim_root.display()))?;
    let pin = SimRootPin::parse(&pem).map_err(|e| format!("simulator root: {e}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let opts = VerifyOptions {
        now,
        allow_simulated: true,
        simulated_roots: vec![pin],
        allow_debug: false,
    };
    let verified = verify_quote(&quote, None, &opts).map_err(|e| format!("quote verification: {e}"))?;
    let report = &verified.quote.report;

    let mut checks = vec![check(
        "report_data = SHA-512(\"dstack-demo-quote:\" || our nonce)",
        hex::encode(demo_quote_report_data(&nonce)),
        hex::encode(report.report_data),
    )];
    let published = std::fs::read(measurements_json).map_err(|e| format!("{}: {e}", measurements_json.display()))?;
    let published = MeasurementsJson::parse(&published).map_err(|e| e.to_string())?;
    let os_image_hash = vm_config
        .get("os_image_hash")
        .and_then(|x| x.as_str())
        .map(str::to_owned);
    let extras = AttestationExtras {
        events: Some(&events),
        vcpus: vm_config.get("cpu_count").and_then(|x| x.as_u64()).map(|n| n as u32),
        memory_bytes: vm_config.get("memory_size").and_then(|x| x.as_u64()),
        os_image_hash,
    };
    let d = diff(&published, report, &extras);
    for row in d.rows {
        checks.push(Check {
            what: row.register,
            ok: row.matches,
            expected: row.expected,
            actual: row.actual,
        });
    }
    // The identity events are trustworthy only because the replay above matched the quoted RTMR3.
    let compose_hash = Sha256::digest(app_compose.as_bytes());
    checks.push(check(
        "compose-hash event",
        hex::encode(compose_hash),
        event_payload(&events, "compose-hash"),
    ));
    checks.push(check(
        "app-id event",
        hex::encode(&compose_hash[..20]),
        event_payload(&events, "app-id"),
    ));
    Ok(Verdict {
        tcb_status: verified.status.to_string(),
        checks,
    })
}
