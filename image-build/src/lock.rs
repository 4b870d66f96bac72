//! The lock file: every Debian package the guest image is built from, pinned by version and SHA-256.
//!
//! Format (`debian.lock`, plain text so reviews see one changed line per changed package):
//!
//! ```text
//! # comment
//! request <set> <suite> <item>...        what the set was resolved from (names or apt patterns)
//! deb <set> <suite> <package> <version> <arch> <size> <sha256> <filename>
//! ```
//!
//! `set` is `kernel` (files extracted for the kernel and initramfs), `firmware` (OVMF, extracted) or `rootfs`
//! (installed into the root filesystem). `filename` is the package's path in the Debian archive (`pool/…`),
//! `sha256` the lowercase hex digest of the `.deb`. Fields never contain whitespace (Debian forbids it in
//! names, versions and pool paths). Lines are sorted by set, suite and package, so the file is canonical.

use std::fmt::Write as _;
use std::path::Path;

/// Errors reading or checking a lock file.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("debian.lock line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error(
        "debian.lock was resolved for {set} = {locked:?} but the build wants {wanted:?}; \
         run `dstack-image-build lock --update`"
    )]
    Stale {
        set: Set,
        locked: Vec<String>,
        wanted: Vec<String>,
    },
    #[error("debian.lock has no packages for the {0} set; run `dstack-image-build lock --update`")]
    EmptySet(Set),
}

/// Which part of the image a package belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Set {
    Kernel,
    Firmware,
    Rootfs,
}

impl Set {
    pub const ALL: [Set; 3] = [Set::Kernel, Set::Firmware, Set::Rootfs];

    pub fn name(self) -> &'static str {
        match self {
            Set::Kernel => "kernel",
            Set::Firmware => "firmware",
            Set::Rootfs => "rootfs",
        }
    }

    fn parse(s: &str) -> Option<Set> {
        Set::ALL.into_iter().find(|set| set.name() == s)
    }
}

impl std::fmt::Display for Set {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What one set is resolved from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub set: Set,
    pub suite: String,
    /// Package names or apt patterns (`?essential`), in the order given.
    pub items: Vec<String>,
}

/// One pinned `.deb`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockedDeb {
    pub set: Set,
    pub suite: String,
    pub package: String,
    pub version: String,
    pub arch: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the `.deb` file.
    pub sha256: String,
    /// Path in the archive, e.g. `pool/main/g/glibc/libc6_2.41-12_amd64.deb`.
    pub filename: String,
}

impl LockedDeb {
    /// The `.deb`'s file name (last component of the pool path).
    pub fn file_name(&self) -> &str {
        self.filename.rsplit('/').next().unwrap_or(&self.filename)
    }

    /// `package=version`, the form apt takes.
    pub fn apt_spec(&self) -> String {
        format!("{}={}", self.package, self.version)
    }
}

/// A whole lock file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lock {
    pub requests: Vec<Request>,
    pub debs: Vec<LockedDeb>,
}

/// What the image is built from. Changing this list makes the lock stale until `lock --update`.
pub fn wanted_requests() -> Vec<Request> {
    let req = |set, suite: &str, items: &[&str]| Request {
        set,
        suite: suite.to_owned(),
        items: items.iter().map(|s| (*s).to_owned()).collect(),
    };
    vec![
        // Kernel ≥ 7.x for the TSM measurement (RTMR sysfs) ABI; `cloud` flavour: same TDX support, fewer modules.
        req(Set::Kernel, "trixie-backports", &["linux-image-cloud-amd64"]),
        // Debian's OVMF with TDVF metadata.
        req(Set::Firmware, "trixie", &["ovmf"]),
        // Debian's `required` base (what debootstrap's minbase installs, minus apt) plus the container stack.
        req(
            Set::Rootfs,
            "trixie",
            &[
                "?essential",
                "?priority(required)",
                "ca-certificates",
                "containerd",
                "cryptsetup",
                "docker-cli",
                "docker-compose",
                "docker.io",
                "e2fsprogs",
            ],
        ),
    ]
}

fn is_hex_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Lock {
    pub fn read(path: &Path) -> Result<Lock, LockError> {
        let text = std::fs::read_to_string(path).map_err(|source| LockError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Lock::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Lock, LockError> {
        let mut lock = Lock::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |message: String| LockError::Syntax { line, message };
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = l.split_whitespace().collect();
            let set = |s: &str| Set::parse(s).ok_or_else(|| err(format!("unknown set {s:?}")));
            match fields.as_slice() {
                ["request", s, suite, items @ ..] if !items.is_empty() => lock.requests.push(Request {
                    set: set(s)?,
                    suite: (*suite).to_owned(),
                    items: items.iter().map(|s| (*s).to_owned()).collect(),
                }),
                ["deb", s, suite, package, version, arch, size, sha256, filename] => {
                    let size = size
                        .parse()
                        .map_err(|_| err(format!("size {size:?} is not a number")))?;
                    if !is_hex_sha256(sha256) {
                        return Err(err(format!("sha256 {sha256:?} is not 64 lowercase hex digits")));
                    }
                    if !filename.ends_with(".deb") || filename.contains("..") || filename.starts_with('/') {
                        return Err(err(format!("filename {filename:?} is not a relative .deb path")));
                    }
                    lock.debs.push(LockedDeb {
                        set: set(s)?,
                        suite: (*suite).to_owned(),
                        package: (*package).to_owned(),
                        version: (*version).to_owned(),
                        arch: (*arch).to_owned(),
                        size,
                        sha256: (*sha256).to_owned(),
                        filename: (*filename).to_owned(),
                    });
                }
                [kind, ..] => {
                    return Err(err(format!(
                        "expected `request <set> <suite> <item>...` or `deb` with 8 fields, got {kind:?} with {} fields",
                        fields.len() - 1
                    )));
                }
                [] => {}
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for d in &lock.debs {
            if !seen.insert((d.set, d.package.as_str(), d.arch.as_str())) {
                return Err(LockError::Syntax {
                    line: 0,
                    message: format!("{} is locked twice in the {} set", d.package, d.set),
                });
            }
        }
        Ok(lock)
    }

    /// The canonical text form (sorted; stable across runs).
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# dstack guest image: pinned Debian packages. Generated by `dstack-image-build lock --update`;\n\
             # the build only reads it. Format (documented in image-build/src/lock.rs):\n\
             #   request <set> <suite> <item>...\n\
             #   deb <set> <suite> <package> <version> <arch> <size> <sha256> <archive filename>\n",
        );
        let mut requests = self.requests.clone();
        requests.sort_by_key(|r| r.set);
        for r in &requests {
            let _ = writeln!(out, "request {} {} {}", r.set, r.suite, r.items.join(" "));
        }
        let mut debs = self.debs.clone();
        debs.sort_by(|a, b| (a.set, &a.suite, &a.package, &a.arch).cmp(&(b.set, &b.suite, &b.package, &b.arch)));
        let mut last = None;
        for d in &debs {
            if last != Some(d.set) {
                let _ = writeln!(out, "\n# {} set", d.set);
                last = Some(d.set);
            }
            let _ = writeln!(
                out,
                "deb {} {} {} {} {} {} {} {}",
                d.set, d.suite, d.package, d.version, d.arch, d.size, d.sha256, d.filename
            );
        }
        out
    }

    /// Fails unless the lock was resolved for exactly `wanted` and every set has packages.
    pub fn check_matches(&self, wanted: &[Request]) -> Result<(), LockError> {
        for w in wanted {
            let locked = self.requests.iter().find(|r| r.set == w.set);
            let mut locked_items = locked.map(|r| r.items.clone()).unwrap_or_default();
            if let Some(r) = locked {
                locked_items.insert(0, format!("suite={}", r.suite));
            }
            let mut wanted_items = w.items.clone();
            wanted_items.insert(0, format!("suite={}", w.suite));
            if locked_items != wanted_items {
                return Err(LockError::Stale {
                    set: w.set,
                    locked: locked_items,
                    wanted: wanted_items,
                });
            }
            if !self.debs.iter().any(|d| d.set == w.set) {
                return Err(LockError::EmptySet(w.set));
            }
        }
        Ok(())
    }

    /// The packages of one set.
    pub fn set(&self, set: Set) -> impl Iterator<Item = &LockedDeb> {
        self.debs.iter().filter(move |d| d.set == set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn sample() -> Lock {
        Lock {
            requests: vec![Request {
                set: Set::Rootfs,
                suite: "trixie".into(),
                items: vec!["?essential".into(), "docker.io".into()],
            }],
            debs: vec![
                LockedDeb {
                    set: Set::Rootfs,
                    suite: "trixie".into(),
                    package: "zlib1g".into(),
                    version: "1:1.3.dfsg+really1.3.1-1+b1".into(),
                    arch: "amd64".into(),
                    size: 88_000,
                    sha256: SHA.into(),
                    filename: "pool/main/z/zlib/zlib1g_1.3.dfsg+really1.3.1-1+b1_amd64.deb".into(),
                },
                LockedDeb {
                    set: Set::Kernel,
                    suite: "trixie-backports".into(),
                    package: "linux-binary-x".into(),
                    version: "7.3.4-1~bpo13+1".into(),
                    arch: "amd64".into(),
                    size: 1,
                    sha256: SHA.into(),
                    filename: "pool/main/l/linux/linux-binary-x_7.3.4-1~bpo13+1_amd64.deb".into(),
                },
            ],
        }
    }

    #[test]
    fn render_parse_round_trip_is_canonical() {
        let lock = sample();
        let text = lock.render();
        let parsed = Lock::parse(&text).unwrap();
        // Rendering sorts kernel before rootfs; a second render is byte-identical.
        assert_eq!(parsed.debs[0].set, Set::Kernel);
        assert_eq!(parsed.render(), text);
        assert_eq!(parsed.requests, lock.requests);
        assert_eq!(parsed.debs[1].file_name(), "zlib1g_1.3.dfsg+really1.3.1-1+b1_amd64.deb");
        assert_eq!(parsed.debs[1].apt_spec(), "zlib1g=1:1.3.dfsg+really1.3.1-1+b1");
    }

    #[test]
    fn bad_lines_name_the_line() {
        let text = format!("# c\ndeb rootfs trixie a 1 amd64 12 {} pool/a.deb\n", &SHA[..63]);
        let e = Lock::parse(&text).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("sha256"), "{e}");
        let e = Lock::parse("deb rootfs trixie a 1 amd64\n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = Lock::parse(&format!("deb boot trixie a 1 amd64 1 {SHA} pool/a.deb\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown set"), "{e}");
        let e = Lock::parse(&format!("deb rootfs trixie a 1 amd64 1 {SHA} ../a.deb\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("relative .deb"), "{e}");
        let dup = format!("deb rootfs t a 1 amd64 1 {SHA} p/a.deb\ndeb rootfs t a 2 amd64 1 {SHA} p/b.deb\n");
        assert!(Lock::parse(&dup).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn shipped_lock_is_current_and_complete() {
        let lock = Lock::parse(include_str!("../debian.lock")).unwrap();
        lock.check_matches(&wanted_requests()).unwrap();
        let kernel: Vec<&LockedDeb> = lock.set(Set::Kernel).collect();
        assert!(kernel.iter().any(|d| d.package.starts_with("linux-binary-")));
        assert!(kernel.iter().any(|d| d.package.starts_with("linux-modules-")));
        assert!(
            kernel
                .iter()
                .all(|d| d.version == kernel[0].version && d.suite == "trixie-backports")
        );
        for p in [
            "docker.io",
            "docker-cli",
            "containerd",
            "docker-compose",
            "cryptsetup",
            "ca-certificates",
            "libc6",
        ] {
            assert!(
                lock.set(Set::Rootfs).any(|d| d.package == p),
                "{p} missing from the rootfs set"
            );
        }
        assert_eq!(
            lock.render(),
            include_str!("../debian.lock"),
            "debian.lock is not in canonical form"
        );
    }

    #[test]
    fn stale_request_is_detected() {
        let lock = sample();
        let mut wanted = lock.requests.clone();
        assert!(lock.check_matches(&wanted).is_ok());
        wanted[0].items.push("cryptsetup".into());
        let e = lock.check_matches(&wanted).unwrap_err().to_string();
        assert!(e.contains("lock --update"), "{e}");
        let firmware = Request {
            set: Set::Firmware,
            suite: "trixie".into(),
            items: vec!["ovmf".into()],
        };
        assert!(lock.check_matches(&[firmware]).is_err());
    }
}
