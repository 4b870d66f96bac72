//! `cargo xtask test`: setup, format check, clippy, all tests, and a `N passed, N failed` summary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{cache, fuzz, guest_image, setup};

pub struct TestOptions {
    pub setup: bool,
    pub lint: bool,
    pub cargo_args: Vec<String>,
}

impl TestOptions {
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut opts = Self {
            setup: true,
            lint: true,
            cargo_args: Vec::new(),
        };
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            match arg.as_str() {
                "--no-setup" => opts.setup = false,
                "--skip-lint" => opts.lint = false,
                "--" => opts.cargo_args.extend(iter.by_ref().cloned()),
                other => bail!("unknown option {other:?} for `cargo xtask test`"),
            }
        }
        Ok(opts)
    }
}

/// Totals parsed from libtest's `test result:` lines plus our own checks.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
}

impl Tally {
    fn check(&mut self, name: &str, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            eprintln!("xtask: check failed: {name}");
            self.failed += 1;
        }
    }

    /// Adds the counts of one `test result: ok. 3 passed; 0 failed; 1 ignored; …` line.
    fn add_result_line(&mut self, line: &str) -> bool {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return false;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else { continue };
            match kind {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.skipped += count,
                _ => {}
            }
        }
        true
    }
}

fn cargo(root: &std::path::Path, target_dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).env("CARGO_TARGET_DIR", target_dir);
    // CI builds a fresh clone each time: incremental state would only grow the shared target dir.
    if std::env::var_os("CI").is_some() {
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    cmd
}

pub fn run(opts: &TestOptions) -> Result<i32> {
    let root = setup::workspace_root();
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => dir.into(),
        None => cache::subdir("target")?,
    };
    let env = if opts.setup {
        setup::install_test_dependencies().context("installing test dependencies")?
    } else {
        Vec::new()
    };
    let mut tally = Tally::default();

    if opts.lint {
        eprintln!("xtask: cargo fmt --check");
        let fmt = cargo(&root, &target_dir).args(["fmt", "--all", "--check"]).status()?;
        tally.check("cargo fmt --check", fmt.success());

        eprintln!("xtask: cargo clippy -D warnings");
        let clippy = cargo(&root, &target_dir)
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--locked",
                "--",
                "-D",
                "warnings",
            ])
            .status()?;
        tally.check("cargo clippy -D warnings", clippy.success());
    }

    // Tests that drive the verifier CLI as a separate program (image-build's measurements check) need it built.
    let measure_bin = target_dir.join("debug/dstack-measure");
    let built = cargo(&root, &target_dir)
        .args([
            "build",
            "--locked",
            "-p",
            "dstack-measurements",
            "--bin",
            "dstack-measure",
        ])
        .status()?;
    tally.check("build dstack-measure", built.success());
    let mut env = env;
    env.push(("DSTACK_MEASURE_BIN".into(), measure_bin.display().to_string()));
    if opts.setup {
        // The end-to-end tests boot the real guest image.
        let image = guest_image::ensure(&root, &target_dir).context("preparing the guest image")?;
        env.push(("DSTACK_E2E_IMAGE".into(), image.dir.display().to_string()));
        env.push(("DSTACK_DEMO_APP_BIN".into(), image.demo_app.display().to_string()));
        // The gateway and KMS CVM tests package their appliance per run (through this xtask binary).
        let bins = crate::appliance::static_appliances(&root)?;
        env.push((
            "DSTACK_GATEWAY_BIN".into(),
            bins.join("dstack-gateway").display().to_string(),
        ));
        env.push(("DSTACK_KMS_BIN".into(), bins.join("dstack-kms").display().to_string()));
        let xtask = std::env::current_exe().context("locating the xtask binary")?;
        env.push(("DSTACK_XTASK".into(), xtask.display().to_string()));
    }

    eprintln!("xtask: cargo test");
    let mut child = cargo(&root, &target_dir)
        .args(["test", "--workspace", "--locked", "--no-fail-fast"])
        .args(&opts.cargo_args)
        .envs(env)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut saw_results = false;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        saw_results |= tally.add_result_line(&line);
    }
    let status = child.wait()?;
    if !status.success() && tally.failed == 0 {
        // Build failure or a crashed test binary: no per-test failure line to count.
        tally.check("cargo test (build or harness failure)", false);
    }
    if !saw_results {
        tally.check("cargo test ran no test binaries", false);
    }

    // cargo-fuzz targets, a few seconds each, when nightly + cargo-fuzz are installed (says which ran).
    match fuzz::run_short() {
        Some(Ok(runs)) => {
            for r in &runs {
                tally.check(&format!("cargo fuzz run {}", r.target), r.ok);
            }
        }
        Some(Err(e)) => tally.check(&format!("cargo fuzz: {e:#}"), false),
        None => {}
    }

    println!(
        "summary: {} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.skipped
    );
    Ok(if tally.failed == 0 { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libtest_result_lines() {
        let mut t = Tally::default();
        assert!(t.add_result_line(
            "test result: ok. 12 passed; 0 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.01s"
        ));
        assert!(t.add_result_line("test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out"));
        assert!(!t.add_result_line("running 3 tests"));
        assert_eq!(
            t,
            Tally {
                passed: 13,
                failed: 2,
                skipped: 3
            }
        );
    }

    #[test]
    fn options() {
        let args: Vec<String> = ["--no-setup", "--", "-p", "xtask"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let opts = TestOptions::parse(&args).unwrap();
        assert!(!opts.setup && opts.lint);
        assert_eq!(opts.cargo_args, vec!["-p", "xtask"]);
        assert!(TestOptions::parse(&["--bogus".to_string()]).is_err());
    }
}
