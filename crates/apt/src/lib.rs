//! Fetching Debian packages for other suites (trixie, sid, …) through the mirror this machine's apt is already
//! configured with, using a private apt state directory so the host's apt configuration is never touched.
//!
//! The mirror URI is read from `/etc/apt/sources.list.d/*.sources` (deb822) or `/etc/apt/sources.list`; it is
//! never written into the project. `DSTACK_DEBIAN_MIRROR` overrides it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

/// Errors from the private apt.
#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error("no Debian main archive in the apt configuration; set DSTACK_DEBIAN_MIRROR to a Debian mirror URI")]
    NoSource,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{0}")]
    Lookup(String),
}

type Result<T> = std::result::Result<T, AptError>;

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AptError {
    let context = context.into();
    move |source| AptError::Io { context, source }
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))
}

/// Runs a command quietly; returns stdout, or an error carrying stderr.
fn run_quiet(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("starting {cmd:?}")))?;
    if !out.status.success() {
        return Err(AptError::Command {
            command: format!("{cmd:?}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Package lists older than this are refreshed.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// One `deb` source as configured on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    pub uri: String,
    pub suites: Vec<String>,
    pub signed_by: Option<String>,
}

/// apt with its own sources list, package lists and archive cache, for one suite.
pub struct PrivateApt {
    suite: String,
    state: PathBuf,
    sources_list: PathBuf,
}

impl PrivateApt {
    /// A private apt for `suite` with its state under `state_root/<suite>`, using the host's mirror.
    pub fn new(suite: &str, state_root: &Path) -> Result<Self> {
        Self::with_source(suite, state_root, host_debian_source()?)
    }

    /// Like [`PrivateApt::new`] with an explicit source.
    pub fn with_source(suite: &str, state_root: &Path, source: AptSource) -> Result<Self> {
        let state = state_root.join(suite);
        create_dir(&state)?;
        let keyring = source.signed_by.as_deref().unwrap_or(DEFAULT_KEYRING);
        let sources_list = state.join("sources.list");
        let line = format!("deb [signed-by={keyring}] {} {suite} main\n", source.uri);
        if std::fs::read_to_string(&sources_list).ok().as_deref() != Some(line.as_str()) {
            std::fs::write(&sources_list, line).map_err(io_err("writing sources.list"))?;
            // A different mirror or keyring invalidates the lists.
            let _ = std::fs::remove_dir_all(state.join("lists"));
        }
        for dir in ["lists/partial", "archives/partial"] {
            create_dir(&state.join(dir))?;
        }
        Ok(Self {
            suite: suite.to_owned(),
            state,
            sources_list,
        })
    }

    /// The suite this apt serves.
    pub fn suite(&self) -> &str {
        &self.suite
    }

    /// An `apt-get`/`apt-cache` command wired to the private state, for queries this type does not wrap.
    pub fn apt(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg("-q")
            .arg(format!("-oDir::Etc::SourceList={}", self.sources_list.display()))
            .arg("-oDir::Etc::SourceParts=/dev/null")
            .arg(format!("-oDir::State::Lists={}", self.state.join("lists").display()))
            .arg(format!("-oDir::Cache={}", self.state.display()))
            .arg(format!(
                "-oDir::Cache::Archives={}",
                self.state.join("archives").display()
            ))
            .arg("-oAPT::Sandbox::User=root")
            .arg("-oAcquire::Languages=none");
        cmd
    }

    /// Refreshes the package lists when missing or older than a day.
    pub fn update_if_stale(&self) -> Result<()> {
        let stamp = self.state.join("lists/.updated");
        let fresh = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < LISTS_MAX_AGE);
        if fresh {
            return Ok(());
        }
        self.update()
    }

    /// Refreshes the package lists unconditionally.
    pub fn update(&self) -> Result<()> {
        eprintln!("apt: updating package lists for {}", self.suite);
        run_quiet(self.apt("apt-get").arg("update"))?;
        let stamp = self.state.join("lists/.updated");
        std::fs::write(&stamp, b"").map_err(io_err("writing update stamp"))
    }

    /// The version apt would download for `package` (after refreshing lists if stale).
    pub fn candidate_version(&self, package: &str) -> Result<String> {
        self.update_if_stale()?;
        let out = run_quiet(self.apt("apt-cache").args(["show", "--no-all-versions", package]))?;
        out.lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .map(|v| v.trim().to_owned())
            .ok_or_else(|| AptError::Lookup(format!("no version of {package} in {}", self.suite)))
    }

    /// Downloads `package` (optionally `package=version`) into the cache; returns the .deb path.
    pub fn download(&self, package: &str) -> Result<PathBuf> {
        let (name, version) = match package.split_once('=') {
            Some((n, v)) => (n, v.to_owned()),
            None => (package, self.candidate_version(package)?),
        };
        let debs = self.state.join("debs");
        create_dir(&debs)?;
        if let Some(found) = find_deb(&debs, name, &version)? {
            return Ok(found);
        }
        self.update_if_stale()?;
        eprintln!("apt: downloading {name} {version} ({})", self.suite);
        run_quiet(
            self.apt("apt-get")
                .current_dir(&debs)
                .args(["download", &format!("{name}={version}")]),
        )?;
        find_deb(&debs, name, &version)?
            .ok_or_else(|| AptError::Lookup(format!("apt-get download left no .deb for {name} {version}")))
    }

    /// Downloads exact `package=version` specs in one apt-get call (already cached ones are skipped);
    /// returns the .deb paths in the order given.
    pub fn download_many(&self, specs: &[String]) -> Result<Vec<PathBuf>> {
        let debs = self.download_dir();
        create_dir(&debs)?;
        let mut wanted = Vec::new();
        for spec in specs {
            let (name, version) = spec
                .split_once('=')
                .ok_or_else(|| AptError::Lookup(format!("{spec}: expected package=version")))?;
            wanted.push((name, version));
        }
        let missing: Vec<&String> = specs
            .iter()
            .zip(&wanted)
            .filter(|(_, (n, v))| find_deb(&debs, n, v).ok().flatten().is_none())
            .map(|(spec, _)| spec)
            .collect();
        if !missing.is_empty() {
            self.update_if_stale()?;
            run_quiet(self.apt("apt-get").current_dir(&debs).arg("download").args(&missing))?;
        }
        wanted
            .iter()
            .map(|(n, v)| {
                find_deb(&debs, n, v)?
                    .ok_or_else(|| AptError::Lookup(format!("apt-get download left no .deb for {n} {v}")))
            })
            .collect()
    }

    /// The directory `apt-get download` writes into (watched for download progress).
    pub fn download_dir(&self) -> PathBuf {
        self.state.join("debs")
    }

    /// Downloads and unpacks `package` into the cache; returns the root of the unpacked tree.
    pub fn unpack(&self, package: &str) -> Result<PathBuf> {
        let deb = self.download(package)?;
        let stem = deb.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let dest = self.state.join("unpacked").join(stem);
        let done = dest.join(".unpacked");
        if done.exists() {
            return Ok(dest);
        }
        let _ = std::fs::remove_dir_all(&dest);
        create_dir(&dest)?;
        run_quiet(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dest))?;
        std::fs::write(done, b"").map_err(io_err("writing unpack stamp"))?;
        Ok(dest)
    }
}

/// Debian file names encode the epoch's colon as `%3a`.
fn find_deb(dir: &Path, name: &str, version: &str) -> Result<Option<PathBuf>> {
    let version = version.replace(':', "%3a");
    let prefix = format!("{name}_{version}_");
    let entries = std::fs::read_dir(dir).map_err(io_err(format!("reading {}", dir.display())))?;
    for entry in entries {
        let path = entry.map_err(io_err("reading directory entry"))?.path();
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        if file.starts_with(&prefix) && file.ends_with(".deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// The host's main Debian source (not the security archive), or `DSTACK_DEBIAN_MIRROR`.
pub fn host_debian_source() -> Result<AptSource> {
    if let Ok(uri) = std::env::var("DSTACK_DEBIAN_MIRROR") {
        return Ok(AptSource {
            uri,
            suites: vec![],
            signed_by: None,
        });
    }
    let mut sources = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut files: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for file in files {
            if file.extension().is_some_and(|e| e == "sources") {
                sources.extend(parse_deb822(&read(&file)?));
            } else if file.extension().is_some_and(|e| e == "list") {
                sources.extend(parse_one_line(&read(&file)?));
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list") {
        sources.extend(parse_one_line(&text));
    }
    pick_main_source(sources).ok_or(AptError::NoSource)
}

fn read(file: &Path) -> Result<String> {
    std::fs::read_to_string(file).map_err(io_err(format!("reading {}", file.display())))
}

fn pick_main_source(sources: Vec<AptSource>) -> Option<AptSource> {
    sources
        .into_iter()
        .find(|s| !s.suites.is_empty() && s.suites.iter().all(|suite| !suite.contains("security")))
}

fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                .map(str::trim)
        };
        let is_deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let enabled = field("Enabled").is_none_or(|v| v != "no");
        if let (true, true, Some(uris), Some(suites)) = (is_deb, enabled, field("URIs"), field("Suites")) {
            for uri in uris.split_whitespace() {
                out.push(AptSource {
                    uri: uri.to_owned(),
                    suites: suites.split_whitespace().map(str::to_owned).collect(),
                    signed_by: field("Signed-By").filter(|s| s.starts_with('/')).map(str::to_owned),
                });
            }
        }
    }
    out
}

fn parse_one_line(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, tail)) = opts.split_once(']') else {
                continue;
            };
            signed_by = opts
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(str::to_owned);
            rest = tail.trim();
        }
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push(AptSource {
                uri: uri.to_owned(),
                suites: vec![suite.to_owned()],
                signed_by,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_skips_security_and_keeps_keyring() {
        let text = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                    Components: main\nSigned-By: /usr/share/keyrings/k.gpg\n\n\
                    Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n";
        let picked = pick_main_source(parse_deb822(text)).unwrap();
        assert_eq!(picked.uri, "http://mirror.example/debian");
        assert_eq!(picked.signed_by.as_deref(), Some("/usr/share/keyrings/k.gpg"));
    }

    #[test]
    fn one_line_format_with_options() {
        let text = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n\
                    deb http://m.example/debian-security bookworm-security main\n";
        let sources = parse_one_line(text);
        assert_eq!(sources.len(), 2);
        assert_eq!(sources[0].signed_by.as_deref(), Some("/k.gpg"));
        assert_eq!(pick_main_source(sources).unwrap().suites, vec!["bookworm".to_owned()]);
    }

    #[test]
    fn disabled_and_deb_src_stanzas_are_ignored() {
        let text = "Types: deb-src\nURIs: http://a.example/debian\nSuites: bookworm\n\n\
                    Types: deb\nEnabled: no\nURIs: http://b.example/debian\nSuites: bookworm\n";
        assert!(parse_deb822(text).is_empty());
    }
}
