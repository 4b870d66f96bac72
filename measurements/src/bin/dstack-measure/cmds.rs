//! Subcommand implementations.

use std::path::{Path, PathBuf};

use dstack_measurements::eventlog::{self, derive_identity};
use dstack_measurements::mrtd::{PageOrder, compute_mrtd};
use dstack_measurements::predict::VmShape;
use dstack_measurements::predict::image::ImageFiles;
use dstack_measurements::published::{AttestationExtras, MeasurementsJson, diff as diff_measurements};
use dstack_measurements::quote::QuoteJson;
use dstack_measurements::sim::SimRootPin;
use dstack_measurements::verify::{VerifyError, VerifyJson, VerifyOptions, parse_collateral, verify_quote};
use serde_json::json;

use crate::input::{load_attestation, load_quote_bytes, parse_quote, read};
use crate::{CliError, CliResult};

/// Write a line to stdout; a closed pipe (e.g. `| head`) ends output quietly, not a panic.
fn emit(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

macro_rules! outln {
    ($($t:tt)*) => { emit(&format!($($t)*)) };
}

fn print_json(v: &impl serde::Serialize) -> CliResult {
    let s = serde_json::to_string_pretty(v).map_err(CliError::input)?;
    emit(&s);
    Ok(())
}

pub fn quote(path: &Path, json: bool) -> CliResult {
    let raw = load_quote_bytes(path)?;
    let q = parse_quote(&raw, path)?;
    let j = QuoteJson::from(&q);
    if json {
        return print_json(&j);
    }
    outln!("version:       {}", j.version);
    outln!("tee_type:      {:#x}", j.tee_type);
    outln!("body_type:     {}", j.body_type);
    for (k, v) in [
        ("mrtd", &j.mrtd),
        ("rtmr0", &j.rtmr0),
        ("rtmr1", &j.rtmr1),
        ("rtmr2", &j.rtmr2),
        ("rtmr3", &j.rtmr3),
        ("report_data", &j.report_data),
        ("mrconfigid", &j.mrconfigid),
        ("mrowner", &j.mrowner),
        ("mrownerconfig", &j.mrownerconfig),
        ("td_attributes", &j.td_attributes),
        ("xfam", &j.xfam),
        ("mrseam", &j.mrseam),
        ("tee_tcb_svn", &j.tee_tcb_svn),
        ("qe_vendor_id", &j.qe_vendor_id),
    ] {
        outln!("{:<15}{v}", format!("{k}:"));
    }
    Ok(())
}

pub struct VerifyArgs {
    pub quote: PathBuf,
    pub collateral: Option<PathBuf>,
    pub now: Option<u64>,
    pub allow_simulated: bool,
    pub simulated_roots: Vec<String>,
    pub allow_debug: bool,
    pub json: bool,
}

fn parse_pin(arg: &str) -> Result<SimRootPin, CliError> {
    let is_hex = arg.len() == 64 && arg.bytes().all(|b| b.is_ascii_hexdigit());
    let data = if is_hex {
        arg.as_bytes().to_vec()
    } else {
        read(Path::new(arg))?
    };
    SimRootPin::parse(&data).map_err(|e| CliError::Input(format!("--simulated-root {arg}: {e}")))
}

pub fn verify(a: VerifyArgs) -> CliResult {
    let raw = load_quote_bytes(&a.quote)?;
    let collateral = match &a.collateral {
        Some(p) => Some(parse_collateral(&read(p)?).map_err(|e| CliError::Input(format!("{}: {e}", p.display())))?),
        None => None,
    };
    if a.allow_simulated && a.simulated_roots.is_empty() {
        return Err(CliError::Input(
            "--allow-simulated needs at least one --simulated-root".into(),
        ));
    }
    let pins = a
        .simulated_roots
        .iter()
        .map(|s| parse_pin(s))
        .collect::<Result<Vec<_>, _>>()?;
    let now = match a.now {
        Some(n) => n,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(CliError::input)?
            .as_secs(),
    };
    let opts = VerifyOptions {
        now,
        allow_simulated: a.allow_simulated,
        simulated_roots: pins,
        allow_debug: a.allow_debug,
    };
    let v = verify_quote(&raw, collateral.as_ref(), &opts).map_err(|e| {
        let msg = format!("{}: {e}", a.quote.display());
        match e {
            VerifyError::Quote(_) | VerifyError::Collateral(_) | VerifyError::MissingCollateral => CliError::Input(msg),
            _ => CliError::Failed(msg),
        }
    })?;
    let out = VerifyJson {
        status: v.status.clone(),
        advisory_ids: v.advisory_ids.clone(),
    };
    if a.json {
        return print_json(&out);
    }
    outln!("status: {}", out.status);
    outln!("advisory_ids: {}", out.advisory_ids.join(","));
    Ok(())
}

pub fn replay(path: &Path, json: bool) -> CliResult {
    let att = load_attestation(path, false)?;
    let events = att
        .events
        .ok_or_else(|| CliError::Input(format!("{}: no event log", path.display())))?;
    let rtmrs = eventlog::replay(&events).map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?;
    let mut out = json!({
        "rtmr0": hex::encode(rtmrs[0]),
        "rtmr1": hex::encode(rtmrs[1]),
        "rtmr2": hex::encode(rtmrs[2]),
        "rtmr3": hex::encode(rtmrs[3]),
    });
    let mut matches = true;
    if let Some(q) = &att.quote {
        let check = eventlog::check_against_report(&events, &q.report)
            .map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?;
        matches = check.matches;
        out["matches_quote"] = json!(check.matches);
        out["registers"] = serde_json::to_value(&check.registers).map_err(CliError::input)?;
        if check.matches
            && let Ok(id) = derive_identity(&events, &q.report, att.vm_config.as_deref())
        {
            out["identity"] = serde_json::to_value(&id).map_err(CliError::input)?;
        }
    }
    if json {
        print_json(&out)?;
    } else {
        for (i, r) in rtmrs.iter().enumerate() {
            outln!("rtmr{i}: {}", hex::encode(r));
        }
        if att.quote.is_some() {
            outln!("matches_quote: {matches}");
        }
    }
    if matches {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "{}: event log does not reproduce the quote's RTMRs",
            path.display()
        )))
    }
}

pub fn mrtd(path: &Path, two_pass: bool, json: bool) -> CliResult {
    let fw = read(path)?;
    let order = if two_pass {
        PageOrder::TwoPass
    } else {
        PageOrder::SinglePass
    };
    let m = compute_mrtd(&fw, order).map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?;
    if json {
        print_json(&json!({ "mrtd": hex::encode(m) }))
    } else {
        outln!("{}", hex::encode(m));
        Ok(())
    }
}

/// `2G`, `2048M`, `2GiB`, `512MB`, `1073741824` → bytes (binary multiples).
pub fn parse_memory(arg: &str) -> Result<u64, CliError> {
    let t = arg.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(CliError::Input(format!("--memory {arg:?}: unknown unit {unit:?}"))),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| CliError::Input(format!("--memory {arg:?}: not a size")))
}

pub fn image(dir: &Path, vcpus: u32, memory: &str, json: bool) -> CliResult {
    let shape = VmShape {
        vcpus,
        memory_bytes: parse_memory(memory)?,
    };
    let files = ImageFiles::load(dir).map_err(CliError::input)?;
    let p = files
        .predict(&shape)
        .map_err(|e| CliError::Input(format!("{}: {e}", dir.display())))?;
    let rows = [
        ("mrtd", hex::encode(p.mrtd)),
        ("rtmr0", hex::encode(p.rtmr[0])),
        ("rtmr1", hex::encode(p.rtmr[1])),
        ("rtmr2", hex::encode(p.rtmr[2])),
        ("os_image_hash", files.os_image_hash.clone()),
    ];
    if json {
        let map: serde_json::Map<String, serde_json::Value> =
            rows.into_iter().map(|(k, v)| (k.to_owned(), v.into())).collect();
        print_json(&map)
    } else {
        for (k, v) in rows {
            outln!("{k:<14} {v}");
        }
        Ok(())
    }
}

fn vm_config_extras(cfg: &str) -> (Option<u32>, Option<u64>, Option<String>) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(cfg) else {
        return (None, None, None);
    };
    (
        v.get("cpu_count")
            .and_then(|x| x.as_u64())
            .and_then(|x| u32::try_from(x).ok()),
        v.get("memory_size").and_then(|x| x.as_u64()),
        v.get("os_image_hash").and_then(|x| x.as_str()).map(str::to_owned),
    )
}

pub fn diff(measurements: &Path, attestation: &Path, json: bool) -> CliResult {
    let m = MeasurementsJson::parse(&read(measurements)?)
        .map_err(|e| CliError::Input(format!("{}: {e}", measurements.display())))?;
    let att = load_attestation(attestation, true)?;
    let q = att
        .quote
        .ok_or_else(|| CliError::Input(format!("{}: no quote", attestation.display())))?;
    let (vcpus, memory_bytes, os_image_hash) = att.vm_config.as_deref().map_or((None, None, None), vm_config_extras);
    let extras = AttestationExtras {
        events: att.events.as_deref(),
        vcpus,
        memory_bytes,
        os_image_hash,
    };
    let d = diff_measurements(&m, &q.report, &extras);
    if json {
        print_json(&d)?;
    } else {
        outln!("shape #{} ({} vCPU, {} MiB)", d.shape, d.vcpus, d.memory_mb);
        outln!("{:<26} {:<5} expected / actual", "register", "ok");
        for r in &d.rows {
            outln!(
                "{:<26} {:<5} {}",
                r.register,
                if r.matches { "yes" } else { "NO" },
                r.expected
            );
            outln!("{:<26} {:<5} {}", "", "", r.actual);
        }
    }
    if d.matches {
        Ok(())
    } else {
        Err(CliError::Failed("measurements differ".into()))
    }
}
