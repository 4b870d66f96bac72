//! `lock --update`: resolves the wanted package sets against today's mirror with the private apt.
//!
//! - `rootfs`: `apt-get install -s` against an **empty** private dpkg status, so apt reports the complete
//!   closure (essential and required packages included), without Recommends, for amd64 only, ignoring the
//!   host's apt preferences.
//! - `kernel`: the kernel metapackage and every package it pins with an exact `(= version)` dependency
//!   (image, binary, modules, base files). Its other dependencies (initramfs-tools, kmod, …) are only needed
//!   to install a kernel with dpkg; we extract files instead.
//! - `firmware`: each named package alone (OVMF has no dependencies that matter: we extract one file).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};

use dstack_apt::PrivateApt;

use crate::lock::{Lock, LockedDeb, Request, Set};

/// Errors resolving the lock.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Apt(#[from] dstack_apt::AptError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("apt has no record for {0} (is the suite's package list current?)")]
    Missing(String),
    #[error("apt record for {package}: field {field} is missing or malformed")]
    BadRecord { package: String, field: &'static str },
}

type Result<T> = std::result::Result<T, ResolveError>;

/// Options that make apt's answer independent of the host's dpkg database and preferences.
fn hermetic(apt: &PrivateApt, program: &str, status: &Path) -> Command {
    let mut cmd = apt.apt(program);
    cmd.arg(format!("-oDir::State::status={}", status.display()))
        .arg(format!(
            "-oDir::State::extended_states={}",
            status.with_extension("extended").display()
        ))
        .args([
            "-oDir::Etc::Preferences=/dev/null",
            "-oDir::Etc::PreferencesParts=/dev/null",
            "-oAPT::Architecture=amd64",
            "-oAPT::Architectures=amd64",
            "-oAPT::Install-Recommends=false",
            "-oAPT::Install-Suggests=false",
            "-oAPT::Get::Show-Versions=false",
        ]);
    cmd
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|source| ResolveError::Io {
        context: format!("starting {:?}", cmd.get_program()),
        source,
    })?;
    if !out.status.success() {
        return Err(ResolveError::Command {
            command: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One `apt-cache show` stanza's single-line fields.
type Record = BTreeMap<String, String>;

fn parse_records(text: &str) -> Vec<Record> {
    let mut out = Vec::new();
    let mut cur = Record::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else if !line.starts_with([' ', '\t'])
            && let Some((k, v)) = line.split_once(':')
        {
            cur.insert(k.to_owned(), v.trim().to_owned());
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `(package, version)` pairs from `apt-get install -s` output (`Inst name (version suite [arch])`).
fn parse_simulation(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("Inst "))
        .filter_map(|rest| {
            let (name, rest) = rest.split_once(' ')?;
            let version = rest.strip_prefix('(')?.split_whitespace().next()?;
            Some((name.to_owned(), version.to_owned()))
        })
        .collect()
}

/// Exact `(= version)` single-alternative dependencies in a Depends/Pre-Depends value.
fn exact_dependencies(depends: &str) -> Vec<(String, String)> {
    depends
        .split(',')
        .filter(|clause| !clause.contains('|'))
        .filter_map(|clause| {
            let (name, constraint) = clause.trim().split_once('(')?;
            let version = constraint.trim().strip_prefix('=')?.trim().strip_suffix(')')?.trim();
            Some((name.trim().to_owned(), version.to_owned()))
        })
        .collect()
}

/// Full lock records for `name=version` pairs, via one `apt-cache show`.
fn describe(apt: &PrivateApt, status: &Path, set: Set, pkgs: &[(String, String)]) -> Result<Vec<LockedDeb>> {
    if pkgs.is_empty() {
        return Ok(vec![]);
    }
    let specs: Vec<String> = pkgs.iter().map(|(n, v)| format!("{n}={v}")).collect();
    let text = run(hermetic(apt, "apt-cache", status).arg("show").args(&specs))?;
    let mut by_key: BTreeMap<(String, String), Record> = BTreeMap::new();
    for r in parse_records(&text) {
        if let (Some(p), Some(v)) = (r.get("Package"), r.get("Version")) {
            by_key.entry((p.clone(), v.clone())).or_insert(r);
        }
    }
    let mut out = Vec::new();
    for (name, version) in pkgs {
        let r = by_key
            .get(&(name.clone(), version.clone()))
            .ok_or_else(|| ResolveError::Missing(format!("{name}={version}")))?;
        let field = |f: &'static str| {
            r.get(f).cloned().ok_or(ResolveError::BadRecord {
                package: name.clone(),
                field: f,
            })
        };
        let size = field("Size")?.parse().map_err(|_| ResolveError::BadRecord {
            package: name.clone(),
            field: "Size",
        })?;
        out.push(LockedDeb {
            set,
            suite: apt.suite().to_owned(),
            package: name.clone(),
            version: version.clone(),
            arch: field("Architecture")?,
            size,
            sha256: field("SHA256")?.to_ascii_lowercase(),
            filename: field("Filename")?,
        });
    }
    Ok(out)
}

fn candidate(apt: &PrivateApt, status: &Path, name: &str) -> Result<Record> {
    let text = run(hermetic(apt, "apt-cache", status).args(["show", "--no-all-versions", name]))?;
    parse_records(&text)
        .into_iter()
        .next()
        .ok_or_else(|| ResolveError::Missing(name.to_owned()))
}

/// The packages `request` resolves to, as `(name, version)`.
fn resolve_request(apt: &PrivateApt, status: &Path, request: &Request) -> Result<Vec<(String, String)>> {
    match request.set {
        Set::Rootfs => {
            let text = run(hermetic(apt, "apt-get", status)
                .args(["install", "-s", "-y"])
                .args(&request.items))?;
            let pkgs = parse_simulation(&text);
            if pkgs.is_empty() {
                return Err(ResolveError::Missing(format!("closure of {:?}", request.items)));
            }
            Ok(pkgs)
        }
        Set::Firmware => request
            .items
            .iter()
            .map(|name| {
                let r = candidate(apt, status, name)?;
                let version = r.get("Version").cloned().ok_or(ResolveError::BadRecord {
                    package: name.clone(),
                    field: "Version",
                })?;
                Ok((name.clone(), version))
            })
            .collect(),
        Set::Kernel => {
            let mut done = BTreeSet::new();
            let mut todo = Vec::new();
            for name in &request.items {
                let r = candidate(apt, status, name)?;
                let version = r.get("Version").cloned().ok_or(ResolveError::BadRecord {
                    package: name.clone(),
                    field: "Version",
                })?;
                todo.push((name.clone(), version));
            }
            while let Some((name, version)) = todo.pop() {
                if !done.insert((name.clone(), version.clone())) {
                    continue;
                }
                let text = run(hermetic(apt, "apt-cache", status).args(["show", &format!("{name}={version}")]))?;
                let r = parse_records(&text)
                    .into_iter()
                    .next()
                    .ok_or_else(|| ResolveError::Missing(format!("{name}={version}")))?;
                for field in ["Pre-Depends", "Depends"] {
                    if let Some(deps) = r.get(field) {
                        todo.extend(exact_dependencies(deps));
                    }
                }
            }
            Ok(done.into_iter().collect())
        }
    }
}

/// Resolves every request against the mirror (refreshing package lists first) into a new lock.
pub fn resolve(requests: &[Request], apt_root: &Path, work: &Path) -> Result<Lock> {
    std::fs::create_dir_all(work).map_err(|source| ResolveError::Io {
        context: format!("creating {}", work.display()),
        source,
    })?;
    let status = work.join("empty-status");
    std::fs::write(&status, b"").map_err(|source| ResolveError::Io {
        context: "writing empty dpkg status".into(),
        source,
    })?;
    let mut lock = Lock {
        requests: requests.to_vec(),
        debs: vec![],
    };
    let mut updated = BTreeSet::new();
    for request in requests {
        let apt = PrivateApt::new(&request.suite, apt_root)?;
        // A deliberate update resolves against the mirror as it is now, not yesterday's lists.
        if updated.insert(request.suite.clone()) {
            apt.update()?;
        }
        let pkgs = resolve_request(&apt, &status, request)?;
        eprintln!(
            "lock: {} set: {} packages from {}",
            request.set,
            pkgs.len(),
            request.suite
        );
        lock.debs.extend(describe(&apt, &status, request.set, &pkgs)?);
    }
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulation_lines_parse() {
        let text = "NOTE: This is only a simulation!\n\
                    Inst gcc-14-base (14.2.0-19 Debian:13.2/stable [amd64])\n\
                    Inst libc6 (2.41-12+deb13u5 Debian:13.2/stable [amd64])\n\
                    Conf libc6 (2.41-12+deb13u5 Debian:13.2/stable [amd64])\n\
                    Inst tzdata (2025b-4 Debian:13.2/stable [all])\n";
        assert_eq!(
            parse_simulation(text),
            vec![
                ("gcc-14-base".into(), "14.2.0-19".into()),
                ("libc6".into(), "2.41-12+deb13u5".into()),
                ("tzdata".into(), "2025b-4".into()),
            ]
        );
    }

    #[test]
    fn exact_dependencies_skip_alternatives_and_ranges() {
        let deps = "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, \
                    linux-base-7.3.4+deb13-cloud-amd64 (= 7.3.4-1~bpo13+1), kmod, linux-base (>= 4.17~)";
        assert_eq!(
            exact_dependencies(deps),
            vec![("linux-base-7.3.4+deb13-cloud-amd64".into(), "7.3.4-1~bpo13+1".into())]
        );
    }

    #[test]
    fn records_ignore_continuation_lines() {
        let text = "Package: a\nVersion: 1\nDescription: x\n more text: with colon\nSHA256: AB\n\nPackage: b\n";
        let r = parse_records(text);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].get("SHA256").map(String::as_str), Some("AB"));
        assert!(!r[0].contains_key(" more text"));
    }
}
