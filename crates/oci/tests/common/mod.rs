//! Helpers shared by the integration tests: run the CLI, run system tools, hash with `sha256sum`.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs `dstack-oci` with `args` (and extra env), asserting success; returns stdout trimmed.
pub fn cli(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dstack-oci"));
    cmd.args(args).env_remove("SOURCE_DATE_EPOCH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "dstack-oci {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Runs a system tool, asserting success.
pub fn tool(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .env("TZ", "UTC")
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `sha256:<hex>` of a file according to coreutils' `sha256sum` (independent of the crate's hashing).
pub fn sha256sum(path: &Path) -> String {
    let out = tool("sha256sum", &[path.to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    format!("sha256:{}", text.split_whitespace().next().unwrap())
}

/// A small ELF to package: coreutils' `true` (the debug CLI binary is 10+ MB and slow to gzip unoptimized).
pub fn some_elf() -> &'static str {
    ["/usr/bin/true", "/bin/true"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or(env!("CARGO_BIN_EXE_dstack-oci"))
}
