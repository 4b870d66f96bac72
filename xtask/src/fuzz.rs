//! `cargo xtask fuzz [--time SECS] [--asan] [target...]`: runs the cargo-fuzz targets of the top-level `fuzz/`
//! crate (nightly + cargo-fuzz), each for a fixed time, and prints CPU time, executions and corpus size per
//! target. `cargo xtask test` calls [`run_short`] when the tools are present.
//!
//! Layout: `fuzz/seeds/<target>` (committed seed inputs), `fuzz/corpus/<target>` (local, git-ignored; new
//! inputs land here), `fuzz/artifacts/<target>` (crashes), `fuzz/logs/<target>.log` (last run's output).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{cache, proc, setup};

pub struct FuzzOptions {
    pub secs: u64,
    pub asan: bool,
    pub targets: Vec<String>,
}

impl FuzzOptions {
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut opts = Self {
            secs: 60,
            asan: false,
            targets: Vec::new(),
        };
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            match arg.as_str() {
                "--time" => {
                    let v = iter.next().context("--time needs a number of seconds")?;
                    opts.secs = v.parse().with_context(|| format!("--time {v:?}"))?;
                }
                "--asan" => opts.asan = true,
                s if s.starts_with('-') => bail!("unknown option {s:?} for `cargo xtask fuzz`"),
                target => opts.targets.push(target.to_owned()),
            }
        }
        if opts.secs == 0 {
            bail!("--time must be at least 1 second");
        }
        Ok(opts)
    }
}

/// Result of one target's run.
#[derive(Debug, Default, PartialEq)]
pub struct TargetRun {
    pub target: String,
    pub ok: bool,
    pub cpu_secs: f64,
    pub wall_secs: f64,
    pub execs: u64,
    pub corpus: usize,
    /// Crash/timeout input libFuzzer saved, if any.
    pub artifact: Option<String>,
}

fn fuzz_dir() -> PathBuf {
    setup::workspace_root().join("fuzz")
}

/// `cargo +nightly …` through the rustup proxy, without the variables the outer stable cargo set (they
/// would pin the stable toolchain or send the nightly build into the workspace's target dir).
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly");
    for var in [
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    cmd.current_dir(fuzz_dir());
    cmd
}

/// Whether a nightly toolchain and cargo-fuzz are installed (nothing is downloaded).
pub fn available() -> bool {
    proc::succeeds(nightly_cargo().arg("--version")) && proc::succeeds(nightly_cargo().args(["fuzz", "--help"]))
}

/// Target names from `cargo fuzz list`.
pub fn list_targets() -> Result<Vec<String>> {
    let out = proc::output(nightly_cargo().args(["fuzz", "list", "--fuzz-dir", "."]))?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

fn sanitizer_args(asan: bool) -> [&'static str; 3] {
    ["-s", if asan { "address" } else { "none" }, "--debug-assertions"]
}

/// The fuzz build's target dir: in the cache outside the checkout, so repeated runs (and CI on the same
/// machine) rebuild only what changed.
fn fuzz_target_dir() -> Result<PathBuf> {
    cache::subdir("fuzz-target")
}

fn build(asan: bool) -> Result<()> {
    eprintln!("xtask: cargo +nightly fuzz build (first build takes several minutes)");
    proc::run(
        nightly_cargo()
            .args(["fuzz", "build", "--fuzz-dir", "."])
            .arg("--target-dir")
            .arg(fuzz_target_dir()?)
            .args(sanitizer_args(asan)),
    )
}

/// `<fuzz target dir>/<host triple>/release/<target>`, as `cargo fuzz build` leaves it.
fn built_binary(target: &str) -> Result<PathBuf> {
    let base = fuzz_target_dir()?;
    let found = std::fs::read_dir(&base)
        .with_context(|| format!("reading {}", base.display()))?
        .flatten()
        .map(|e| e.path().join("release").join(target))
        .find(|p| p.is_file());
    found.with_context(|| format!("no built fuzz target {target} under {}", base.display()))
}

/// CPU time (user + system) of this process's waited-for descendants, from /proc/self/stat.
fn children_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; cutime and cstime are fields 16 and 17 (1-based).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [13, 14]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<f64>().ok()))
        .sum();
    let hz = proc::output(Command::new("getconf").arg("CLK_TCK"))
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    ticks / hz
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.flatten().count()).unwrap_or(0)
}

/// Pulls the execution count and a saved artifact path out of libFuzzer's output.
fn parse_log(log: &str) -> (u64, Option<String>) {
    let mut execs = 0;
    let mut artifact = None;
    for line in log.lines() {
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            execs = n.trim().parse().unwrap_or(execs);
        } else if let Some(rest) = line.split_once("Test unit written to ").map(|(_, r)| r) {
            artifact = Some(rest.trim().to_owned());
        }
    }
    (execs, artifact)
}

/// Runs one (already built) target for `secs` seconds.
fn run_target(target: &str, secs: u64) -> Result<TargetRun> {
    let dir = fuzz_dir();
    let corpus = dir.join("corpus").join(target);
    let seeds = dir.join("seeds").join(target);
    let logs = dir.join("logs");
    for d in [&corpus, &seeds, &logs] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let cpu0 = children_cpu_secs();
    let start = Instant::now();
    let artifacts = dir.join("artifacts").join(target);
    std::fs::create_dir_all(&artifacts).with_context(|| format!("creating {}", artifacts.display()))?;
    // The binary `build` produced, run directly: `cargo fuzz run` would rebuild first whenever the tree changed,
    // and that compile time would be counted as fuzzing time.
    let binary = built_binary(target)?;
    let status = Command::new(&binary)
        .arg(&corpus)
        .arg(&seeds)
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(format!("-max_total_time={secs}"))
        .args([
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
            "-max_len=70000",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("starting cargo fuzz run {target}"))?;
    let wall_secs = start.elapsed().as_secs_f64();
    let cpu_secs = children_cpu_secs() - cpu0;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let (execs, artifact) = parse_log(&text);
    let run = TargetRun {
        target: target.to_owned(),
        ok: status.success(),
        cpu_secs,
        wall_secs,
        execs,
        corpus: count_files(&corpus),
        artifact,
    };
    if !run.ok {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        eprintln!(
            "xtask: fuzz target {target} FAILED ({status}); last lines of {}:",
            log_path.display()
        );
        for line in tail.iter().rev() {
            eprintln!("    {line}");
        }
    }
    Ok(run)
}

fn print_table(runs: &[TargetRun]) {
    println!(
        "{:<16} {:>6} {:>9} {:>9} {:>11} {:>7}",
        "target", "result", "cpu s", "wall s", "execs", "corpus"
    );
    for r in runs {
        println!(
            "{:<16} {:>6} {:>9.1} {:>9.1} {:>11} {:>7}{}",
            r.target,
            if r.ok { "ok" } else { "FAIL" },
            r.cpu_secs,
            r.wall_secs,
            r.execs,
            r.corpus,
            r.artifact
                .as_deref()
                .map(|a| format!("  crash: {a}"))
                .unwrap_or_default()
        );
    }
    let cpu: f64 = runs.iter().map(|r| r.cpu_secs).sum();
    println!("total fuzzing CPU time: {cpu:.1} s over {} targets", runs.len());
}

/// Builds and runs the selected targets (all when none given); prints the table.
pub fn run_targets(secs: u64, asan: bool, only: &[String]) -> Result<Vec<TargetRun>> {
    let all = list_targets()?;
    for t in only {
        if !all.contains(t) {
            bail!("unknown fuzz target {t:?} (known: {})", all.join(", "));
        }
    }
    let targets = if only.is_empty() { all } else { only.to_vec() };
    build(asan)?;
    let mut runs = Vec::new();
    for t in &targets {
        eprintln!("xtask: fuzzing {t} for {secs} s");
        runs.push(run_target(t, secs)?);
    }
    print_table(&runs);
    Ok(runs)
}

/// `cargo xtask fuzz`.
pub fn run(args: &[String]) -> Result<i32> {
    let opts = FuzzOptions::parse(args)?;
    if !available() {
        bail!(
            "cargo-fuzz needs a nightly toolchain and cargo-fuzz (`rustup toolchain install nightly`, `cargo install cargo-fuzz`)"
        );
    }
    let runs = run_targets(opts.secs, opts.asan, &opts.targets)?;
    Ok(if runs.iter().all(|r| r.ok) { 0 } else { 1 })
}

/// The short run inside `cargo xtask test`: `DSTACK_FUZZ_TEST_SECS` seconds per target (default 3; 0 skips).
/// Returns `None` when it did not run (tools missing or disabled), after saying so.
pub fn run_short() -> Option<Result<Vec<TargetRun>>> {
    let secs = std::env::var("DSTACK_FUZZ_TEST_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(3);
    if secs == 0 {
        eprintln!("xtask: cargo-fuzz run skipped (DSTACK_FUZZ_TEST_SECS=0); the stable bounded fuzz tests ran");
        return None;
    }
    if !available() {
        eprintln!(
            "xtask: nightly + cargo-fuzz not found: cargo-fuzz targets NOT run; only the stable bounded fuzz tests (dstack-testkit) ran"
        );
        return None;
    }
    eprintln!(
        "xtask: nightly + cargo-fuzz found: running every cargo-fuzz target for {secs} s (plus the stable bounded fuzz tests)"
    );
    Some(run_targets(secs, false, &[]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let args: Vec<String> = ["--time", "5", "quote", "--asan", "tdvf"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let o = FuzzOptions::parse(&args).unwrap();
        assert_eq!((o.secs, o.asan), (5, true));
        assert_eq!(o.targets, vec!["quote", "tdvf"]);
        assert!(FuzzOptions::parse(&["--time".into()]).is_err());
        assert!(FuzzOptions::parse(&["--time".into(), "0".into()]).is_err());
        assert!(FuzzOptions::parse(&["--bogus".into()]).is_err());
        assert_eq!(FuzzOptions::parse(&[]).unwrap().secs, 60);
    }

    #[test]
    fn parses_libfuzzer_output() {
        let log = "#2\tINITED cov: 10\nDone 1234 runs in 3 second(s)\nstat::number_of_executed_units: 1234\n\
                   stat::peak_rss_mb: 40\n";
        assert_eq!(parse_log(log), (1234, None));
        let crash = "==1== ERROR: libFuzzer: deadly signal\n\
                     artifact_prefix='/f/artifacts/quote/'; Test unit written to /f/artifacts/quote/crash-ab12\n";
        assert_eq!(parse_log(crash), (0, Some("/f/artifacts/quote/crash-ab12".into())));
    }

    #[test]
    fn child_cpu_time_grows_after_a_busy_child() {
        let before = children_cpu_secs();
        // A child that burns ~0.3 s of CPU, then is waited for.
        let ok = Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        assert!(children_cpu_secs() > before, "cutime+cstime did not grow");
    }
}
