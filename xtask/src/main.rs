//! Developer automation for the dstack-rs workspace.
//!
//! `cargo xtask test` installs what the tests need (idempotently), then runs the format check, clippy and every
//! test, and prints a `N passed, N failed` summary. `cargo xtask demo` runs the whole stack with an example app.

mod appliance;
mod bench;
mod cache;
mod demo;
mod fuzz;
mod guest_image;
mod proc;
mod setup;
mod test;

use anyhow::{Result, bail};

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  test [--no-setup] [--skip-lint] [-- <cargo test args>]
        install test dependencies (apt, pip, Debian fixtures), then run
        cargo fmt --check, cargo clippy -D warnings and all tests
  setup install test dependencies only
  demo  run the whole stack with an example app
  bench run every benchmark (release) and the demo's boot-phase report
  fuzz [--time SECS] [--asan] [target...]
        run the cargo-fuzz targets in fuzz/ (nightly + cargo-fuzz), each for
        SECS seconds (default 60); prints CPU time per target
  appliance [--out DIR] [--only kms|gateway] [--set [APP.]NAME=VALUE]... [--check-reproducible]
        the KMS and gateway as CVM apps: static binaries, reproducible OCI
        images, compose files and appliances.json (image-build/appliances/)
  fetch-deb <suite> <package>...
        download and unpack Debian packages into the cache through the
        machine's configured apt mirror (override: DSTACK_DEBIAN_MIRROR)

environment:
  DSTACK_CACHE_DIR      cache for build outputs and downloads
                        (default /var/cache/dstack-rs, else ~/.cache/dstack-rs)
  DSTACK_DEBIAN_MIRROR  Debian mirror URI to use instead of the one apt is configured with";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: &[String]) -> Result<i32> {
    let Some((command, rest)) = args.split_first() else {
        println!("{USAGE}");
        return Ok(2);
    };
    match command.as_str() {
        "test" => test::run(&test::TestOptions::parse(rest)?),
        "setup" => {
            setup::install_test_dependencies()?;
            Ok(0)
        }
        "demo" => demo::run(rest),
        "bench" => bench::run(rest),
        "appliance" => appliance::run(&setup::workspace_root(), rest),
        "fuzz" => fuzz::run(rest),
        "fetch-deb" => {
            let Some((suite, packages)) = rest.split_first() else {
                bail!("fetch-deb needs a suite and at least one package");
            };
            let apt = dstack_apt::PrivateApt::new(suite, &cache::subdir("apt")?)?;
            for package in packages {
                let dir = apt.unpack(package)?;
                println!("{package}: {}", dir.display());
            }
            Ok(0)
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => {
            eprintln!("xtask: unknown command {other:?}\n\n{USAGE}");
            Ok(2)
        }
    }
}
