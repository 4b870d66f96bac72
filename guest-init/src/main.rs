//! `guest-init`: as PID 1 (the initramfs `/init`) it runs the CVM; `guest-init init [options]` runs the
//! same PID 1 logic with test options (inside a PID + mount namespace); `guest-init agent --simulate …` runs
//! the guest agent alone on a host with a simulated TEE and a generated app identity (like dstack's
//! simulator), so SDK users can develop without a CVM. As PID 1, arguments the kernel passes (unrecognized
//! command line words) are ignored unless the first one is `init`.
//!
//! `agent` options: `--simulate --socket PATH [--tappd-socket PATH] [--state-dir DIR] [--compose FILE]`
//! (the same code as `dstack-guest-agent --simulate`: `dstack_guest_agent::simulate`). It prints one JSON line
//! (simulator root pin, KMS root CA, identities) on stdout once the sockets accept connections.
//!
//! `init` options: `--root DIR` (mount prefix), `--no-switch-root`, `--no-boot`, `--log-file FILE`,
//! `--service NAME=PROGRAM[,ARG…]` (extra supervised service, repeatable).

use std::path::PathBuf;

use dstack_guest_agent::simulate::{SimulateOptions, run_simulator_blocking};
use guest_init::pid1::{self, Pid1Options};
use guest_init::supervisor::ServiceSpec;

fn usage() -> ! {
    eprintln!(
        "usage: guest-init                      (as PID 1)\n       guest-init init [--root DIR] [--no-switch-root] [--no-boot] [--log-file FILE] [--service NAME=PROG[,ARG...]]...\n       guest-init agent --simulate --socket PATH [--tappd-socket PATH] [--state-dir DIR] [--compose FILE]\n       guest-init version"
    );
    std::process::exit(2)
}

fn parse_init(args: &[String]) -> Result<Pid1Options, String> {
    let mut o = Pid1Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--root" => o.root = PathBuf::from(value("--root")?),
            "--no-switch-root" => o.switch_root = false,
            "--no-boot" => o.run_boot = false,
            "--log-file" => o.log_file = Some(PathBuf::from(value("--log-file")?)),
            "--service" => {
                let v = value("--service")?;
                let (name, cmd) = v.split_once('=').ok_or("--service wants NAME=PROGRAM[,ARG...]")?;
                let mut parts = cmd.split(',');
                let prog = parts
                    .next()
                    .filter(|p| !p.is_empty())
                    .ok_or("--service: empty program")?;
                let args: Vec<&str> = parts.collect();
                o.services.push(ServiceSpec::new(name, prog, &args));
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(o)
}

/// `guest-init agent --simulate …`: the host-mode agent.
fn run_agent(args: &[String]) {
    let opts = match SimulateOptions::from_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!(
                "guest-init agent: {e}\nusage: guest-init agent {}",
                SimulateOptions::USAGE
            );
            std::process::exit(2)
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    if let Err(e) = run_simulator_blocking(&opts) {
        eprintln!("guest-init agent: {e}");
        std::process::exit(1)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let is_pid1 = std::process::id() == 1;
    match args.first().map(String::as_str) {
        Some("init") => match parse_init(&args[1..]) {
            Ok(o) => pid1::run(o, guest_init::boot_thread),
            Err(e) => {
                eprintln!("guest-init init: {e}");
                usage()
            }
        },
        _ if is_pid1 => pid1::run(Pid1Options::default(), guest_init::boot_thread),
        Some("version") => println!("guest-init {}", env!("CARGO_PKG_VERSION")),
        Some("agent") => run_agent(&args[1..]),
        _ => usage(),
    }
}
