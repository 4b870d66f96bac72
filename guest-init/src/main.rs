//! `guest-init`: as PID 1 (the initramfs `/init`) it runs the CVM; `guest-init init [options]` runs the
//! same PID 1 logic with test options (inside a PID + mount namespace); `guest-init agent …` will host the
//! guest agent. As PID 1, arguments the kernel passes (unrecognized command line words) are ignored unless
//! the first one is `init`.
//!
//! `init` options: `--root DIR` (mount prefix), `--no-switch-root`, `--no-boot`, `--log-file FILE`,
//! `--service NAME=PROGRAM[,ARG…]` (extra supervised service, repeatable).

use std::path::PathBuf;

use guest_init::pid1::{self, Pid1Options};
use guest_init::supervisor::ServiceSpec;

fn usage() -> ! {
    eprintln!(
        "usage: guest-init                      (as PID 1)\n       guest-init init [--root DIR] [--no-switch-root] [--no-boot] [--log-file FILE] [--service NAME=PROG[,ARG...]]...\n       guest-init agent ...             (not available yet)\n       guest-init version"
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
        Some("agent") => {
            eprintln!("guest-init agent: not implemented in this build");
            std::process::exit(2)
        }
        _ => usage(),
    }
}
