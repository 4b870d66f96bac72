//! `cargo xtask appliance`: the KMS and the gateway packaged as dstack apps, so they run inside CVMs booted
//! from the ordinary guest image (like dstack's own KMS and gateway deployments). Per appliance:
//!
//! 1. the binary (`dstack-kms`, `dstack-gateway`), built statically like the demo app and guest-init
//!    (`--release --locked`, `+crt-static`, the same `target-static` cache);
//! 2. a reproducible one-layer OCI image of it (`dstack-oci`'s builder: fixed mtimes, owners, gzip header and
//!    JSON field order; Docker media types, as the e2e registry push), written as an OCI layout;
//! 3. `docker-compose.yaml` from `image-build/appliances/<name>/`, with the image pinned by digest under a
//!    docker.io-style name (pulled through the VM manager's registry mirror, so the hash does not depend on
//!    where the registry is) and the rendered config file embedded as an inline compose `config`;
//! 4. `app-compose.json` byte-for-byte as `dstack-vmm-cli deploy` writes it for the flags recorded in
//!    `appliances.json` (dstack `vmm-cli.py`'s field order, `json.dumps(indent=4)` layout), so its SHA-256 is
//!    the compose hash the CVM measures into RTMR3 and its first 20 bytes the default app id.
//!
//! `appliances.json` publishes, per appliance, the image digest, compose hash, app id and deploy command.
//! `--check-reproducible` packages everything twice (different directories, a second apart) and requires
//! identical bytes. The logic lives in xtask (not image-build) because it drives cargo builds and OCI
//! packaging the way `guest_image.rs` does for the demo app, and needs nothing from the OS image build.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::{cache, proc};

const TARGET: &str = "x86_64-unknown-linux-gnu";
/// `SOURCE_DATE_EPOCH` of the images (mtimes and `created`): fixed, so a rebuild never changes a digest.
const IMAGE_EPOCH: u64 = 0;

/// One appliance: where its sources are and how it is deployed.
#[derive(Debug, Clone, Copy)]
pub struct Appliance {
    /// Directory under `image-build/appliances/` and key in `appliances.json`.
    pub key: &'static str,
    /// Cargo package and binary.
    pub package: &'static str,
    pub binary: &'static str,
    /// App name in app-compose.json (`dstack-vmm-cli deploy --name`).
    pub app_name: &'static str,
    /// docker.io-style repository the image is pushed as.
    pub repo: &'static str,
    /// Config template in the appliance directory.
    pub config: &'static str,
    /// app-compose `kms_enabled`: the KMS cannot take its keys from itself; the gateway is a KMS app.
    pub kms_enabled: bool,
    /// Ports listed in the image config.
    pub ports: &'static [u16],
    /// `dstack-vmm-cli deploy --port` mappings (host side to adjust; they do not enter app-compose.json).
    pub deploy_ports: &'static [&'static str],
}

pub const APPLIANCES: [Appliance; 2] = [
    Appliance {
        key: "kms",
        package: "dstack-kms",
        binary: "dstack-kms",
        app_name: "dstack-kms",
        repo: "dstack-rs/kms",
        config: "kms.toml",
        kms_enabled: false,
        ports: &[8000],
        deploy_ports: &["tcp:0.0.0.0:8000:8000"],
    },
    Appliance {
        key: "gateway",
        package: "dstack-gateway",
        binary: "dstack-gateway",
        app_name: "dstack-gateway",
        repo: "dstack-rs/gateway",
        config: "gateway.toml",
        kms_enabled: true,
        ports: &[443, 8000],
        deploy_ports: &[
            "tcp:0.0.0.0:8000:8000",
            "tcp:0.0.0.0:443:443",
            "udp:0.0.0.0:51820:51820",
        ],
    },
];

/// Command line of `cargo xtask appliance`.
#[derive(Debug, Default)]
struct Options {
    out: Option<PathBuf>,
    binaries: Option<PathBuf>,
    only: Option<String>,
    sets: Vec<(Option<String>, String, String)>,
    check_reproducible: bool,
}

const USAGE: &str = "usage: cargo xtask appliance [--out DIR] [--only kms|gateway] [--set [kms.|gateway.]NAME=VALUE]... \
                     [--binaries DIR] [--check-reproducible]";

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let mut o = Self::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().with_context(|| format!("{a} needs a value\n{USAGE}"));
            match a.as_str() {
                "--out" => o.out = Some(value()?.into()),
                "--binaries" => o.binaries = Some(value()?.into()),
                "--only" => o.only = Some(value()?.clone()),
                "--set" => {
                    let v = value()?;
                    let (name, val) = v
                        .split_once('=')
                        .with_context(|| format!("--set {v:?}: expected NAME=VALUE"))?;
                    let (scope, name) = match name.split_once('.') {
                        Some((s, n)) => (Some(s.to_owned()), n),
                        None => (None, name),
                    };
                    o.sets.push((scope, name.to_owned(), val.to_owned()));
                }
                "--check-reproducible" => o.check_reproducible = true,
                other => bail!("unknown option {other:?}\n{USAGE}"),
            }
        }
        if let Some(only) = &o.only
            && !APPLIANCES.iter().any(|a| a.key == only)
        {
            bail!("--only {only:?}: expected kms or gateway");
        }
        Ok(o)
    }
}

/// What was produced for one appliance (one entry of `appliances.json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packaged {
    pub image: String,
    pub image_digest: String,
    pub binary_sha256: String,
    pub compose_hash: String,
    pub app_id: String,
}

/// `cargo xtask appliance …`.
pub fn run(root: &Path, args: &[String]) -> Result<i32> {
    let opts = Options::parse(args)?;
    let apps: Vec<Appliance> = APPLIANCES
        .into_iter()
        .filter(|a| opts.only.as_deref().is_none_or(|k| k == a.key))
        .collect();
    let bin_dir = match &opts.binaries {
        Some(dir) => dir.clone(),
        None => build_static(root, &apps)?,
    };
    let out = match &opts.out {
        Some(o) => o.clone(),
        None => cache::subdir("appliances")?,
    };
    let templates = root.join("image-build/appliances");
    let summary = package_all(&templates, &bin_dir, &apps, &opts.sets, &out)?;
    if opts.check_reproducible {
        let again = tempdir_under(&out)?;
        std::thread::sleep(std::time::Duration::from_secs(1));
        package_all(&templates, &bin_dir, &apps, &opts.sets, &again)?;
        let differences = compare_trees(&out, &again)?;
        let _ = std::fs::remove_dir_all(&again);
        if !differences.is_empty() {
            bail!("the second packaging differs: {}", differences.join(", "));
        }
        eprintln!("xtask: packaged twice, identical bytes");
    }
    for (key, p) in &summary {
        println!(
            "{key}: image {} compose hash {} app id {}",
            p.image, p.compose_hash, p.app_id
        );
    }
    println!("{}", out.join("appliances.json").display());
    Ok(0)
}

/// Builds the appliance binaries statically (the guest images' `target-static` cache and flags).
pub fn build_static(root: &Path, apps: &[Appliance]) -> Result<PathBuf> {
    let static_dir = cache::subdir("target-static")?;
    eprintln!("xtask: building the appliance binaries (static, release)");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root)
        .args(["build", "--release", "--locked", "--target", TARGET])
        .env("CARGO_TARGET_DIR", &static_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    for a in apps {
        cmd.args(["-p", a.package]);
    }
    proc::run(&mut cmd).context("building the static appliance binaries")?;
    Ok(static_dir.join(TARGET).join("release"))
}

/// The static `dstack-gateway` the demo packages per run as the gateway CVM.
pub fn static_gateway(root: &Path) -> Result<PathBuf> {
    let gateway: Vec<Appliance> = APPLIANCES.iter().copied().filter(|a| a.key == "gateway").collect();
    Ok(build_static(root, &gateway)
        .context("building the gateway appliance")?
        .join("dstack-gateway"))
}

/// Every appliance's static binary (one build), for the end-to-end tests that boot them as CVMs; returns the
/// directory holding them.
pub fn static_appliances(root: &Path) -> Result<PathBuf> {
    build_static(root, &APPLIANCES).context("building the appliance binaries")
}

fn tempdir_under(out: &Path) -> Result<PathBuf> {
    let dir = out.with_file_name(format!(
        "{}.recheck-{}",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("appliances"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    cache::ensure_dir(&dir)?;
    Ok(dir)
}

/// Packages `apps` into `out` and writes `out/appliances.json`.
pub fn package_all(
    templates: &Path,
    bin_dir: &Path,
    apps: &[Appliance],
    sets: &[(Option<String>, String, String)],
    out: &Path,
) -> Result<BTreeMap<String, Packaged>> {
    let mut summary = BTreeMap::new();
    let mut published = serde_json::Map::new();
    for app in apps {
        let dir = templates.join(app.key);
        let binary = std::fs::read(bin_dir.join(app.binary))
            .with_context(|| format!("reading the {} binary in {}", app.binary, bin_dir.display()))?;
        let vars = vars_for(&dir, app.key, sets)?;
        let p = package(app, &dir, &binary, &vars, &out.join(app.key))?;
        published.insert(app.key.into(), published_entry(app, &p, &vars));
        summary.insert(app.key.to_owned(), p);
    }
    let mut json = serde_json::to_string_pretty(&serde_json::Value::Object(published))?;
    json.push('\n');
    std::fs::write(out.join("appliances.json"), json).context("writing appliances.json")?;
    Ok(summary)
}

/// `vars.env` defaults overridden by `--set` (unscoped, or scoped to this appliance). Unknown names are errors:
/// a typo must not silently publish the default.
fn vars_for(dir: &Path, key: &str, sets: &[(Option<String>, String, String)]) -> Result<BTreeMap<String, String>> {
    let path = dir.join("vars.env");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut vars = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .with_context(|| format!("{}:{}: expected NAME=VALUE", path.display(), i + 1))?;
        vars.insert(k.to_owned(), v.to_owned());
    }
    for (scope, name, value) in sets {
        match scope.as_deref() {
            Some(s) if s != key => continue,
            Some(_) if !vars.contains_key(name) => bail!("--set {key}.{name}: {key} has no variable {name}"),
            None if !vars.contains_key(name) => {
                if APPLIANCES.iter().all(|a| !declares(a.key, dir, name)) {
                    bail!("--set {name}: no appliance has a variable {name}");
                }
                continue;
            }
            _ => {}
        }
        vars.insert(name.clone(), value.clone());
    }
    Ok(vars)
}

/// Whether appliance `key` (a sibling of `dir`) declares `name` in its vars.env.
fn declares(key: &str, dir: &Path, name: &str) -> bool {
    let Some(parent) = dir.parent() else { return false };
    std::fs::read_to_string(parent.join(key).join("vars.env"))
        .map(|t| {
            t.lines()
                .any(|l| l.split_once('=').is_some_and(|(k, _)| k.trim() == name))
        })
        .unwrap_or(false)
}

/// Replaces every `@NAME@` with its value; a placeholder without a value is an error.
pub fn render(template: &str, vars: &BTreeMap<String, String>, what: &str) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('@') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(after.len());
        if name_len > 0 && after[name_len..].starts_with('@') {
            let name = &after[..name_len];
            let value = vars
                .get(name)
                .with_context(|| format!("{what}: no value for placeholder @{name}@"))?;
            out.push_str(value);
            rest = &after[name_len + 1..];
        } else {
            out.push('@');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn package(
    app: &Appliance,
    dir: &Path,
    binary: &[u8],
    vars: &BTreeMap<String, String>,
    out: &Path,
) -> Result<Packaged> {
    let image = dstack_oci::build(&dstack_oci::ImageSpec {
        binary: binary.to_vec(),
        env: Vec::new(),
        ports: app.ports.to_vec(),
        epoch: IMAGE_EPOCH,
        media: dstack_oci::MediaTypes::Docker,
    })
    .with_context(|| format!("building the {} image", app.key))?;
    let digest = image.manifest.digest.to_string();
    let _ = std::fs::remove_dir_all(out);
    cache::ensure_dir(out)?;
    dstack_oci::write_layout(&out.join("oci"), &image, app.repo, "latest")
        .with_context(|| format!("writing the {} OCI layout", app.key))?;

    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let config = render(&read(app.config)?, vars, app.config)?;
    if config.contains('$') {
        // docker compose interpolates `$` inside inline config content too.
        bail!(
            "{}: the rendered config contains `$`, which docker compose would interpolate",
            app.config
        );
    }
    std::fs::write(out.join(app.config), &config)?;
    let image_ref = format!("{}@{digest}", app.repo);
    let compose_template = read("docker-compose.yaml")?;
    // The compose file sees the appliance's variables too; a placeholder alone on its line is the body of a
    // block scalar (`content: |`), so its value is indented like the config.
    let mut compose_vars = BTreeMap::new();
    for (name, value) in vars {
        let value = if compose_template.contains(&format!("\n@{name}@\n")) {
            indent_block(value, 6)
        } else {
            value.clone()
        };
        compose_vars.insert(name.clone(), value);
    }
    compose_vars.insert("IMAGE".to_owned(), image_ref.clone());
    compose_vars.insert("CONFIG".to_owned(), indent_block(&config, 6));
    let compose = render(&compose_template, &compose_vars, "docker-compose.yaml")?;
    if compose.contains('$') {
        bail!("docker-compose.yaml: the rendered file contains `$`, which docker compose would interpolate");
    }
    std::fs::write(out.join("docker-compose.yaml"), &compose)?;

    let app_compose = app_compose_json(app, &compose)?;
    std::fs::write(out.join("app-compose.json"), &app_compose)?;
    let compose_hash = hex(&Sha256::digest(app_compose.as_bytes()));
    Ok(Packaged {
        image: image_ref,
        image_digest: digest,
        binary_sha256: hex(&Sha256::digest(binary)),
        app_id: compose_hash[..40].to_owned(),
        compose_hash,
    })
}

/// Indents every non-empty line (a YAML block scalar body); no trailing newline, the template has one.
fn indent_block(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.trim_end_matches('\n')
        .lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{pad}{l}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `app-compose.json` as `dstack-vmm-cli deploy --name <app> --compose docker-compose.yaml [--no-kms]` writes
/// it (host-vmm `cli::compose::AppComposeDoc`, itself dstack's `vmm-cli.py compose`): this field order,
/// 4-space indentation, `": "` separators, UTF-8 unescaped, no trailing newline.
pub fn app_compose_json(app: &Appliance, docker_compose: &str) -> Result<String> {
    #[derive(serde::Serialize)]
    struct Doc<'a> {
        manifest_version: u32,
        name: &'a str,
        runner: &'a str,
        docker_compose_file: &'a str,
        kms_enabled: bool,
        gateway_enabled: bool,
        local_key_provider_enabled: bool,
        key_provider_id: &'a str,
        public_logs: bool,
        public_sysinfo: bool,
        allowed_envs: [&'a str; 0],
        no_instance_id: bool,
        secure_time: bool,
    }
    let doc = Doc {
        manifest_version: 2,
        name: app.app_name,
        runner: "docker-compose",
        docker_compose_file: docker_compose,
        kms_enabled: app.kms_enabled,
        gateway_enabled: false,
        local_key_provider_enabled: false,
        key_provider_id: "",
        public_logs: false,
        public_sysinfo: false,
        allowed_envs: [],
        no_instance_id: false,
        secure_time: false,
    };
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    serde::Serialize::serialize(&doc, &mut serde_json::Serializer::with_formatter(&mut out, fmt))?;
    Ok(String::from_utf8(out)?)
}

/// The deploy command whose app-compose.json is [`app_compose_json`] (other options do not enter it).
fn deploy_command(app: &Appliance) -> String {
    let kms = if app.kms_enabled {
        "--kms --kms-url <KMS URL>"
    } else {
        "--no-kms"
    };
    let ports: Vec<String> = app.deploy_ports.iter().map(|p| format!(" --port {p}")).collect();
    format!(
        "dstack-vmm-cli deploy --name {} --image <guest image> --compose {}/docker-compose.yaml {kms}{}",
        app.app_name,
        app.key,
        ports.concat()
    )
}

fn published_entry(app: &Appliance, p: &Packaged, vars: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::json!({
        "app_name": app.app_name,
        "binary": app.binary,
        "binary_sha256": p.binary_sha256,
        "image": p.image,
        "image_digest": p.image_digest,
        "compose_hash": p.compose_hash,
        "app_id": p.app_id,
        "kms_enabled": app.kms_enabled,
        "files": {
            "app_compose": format!("{}/app-compose.json", app.key),
            "docker_compose": format!("{}/docker-compose.yaml", app.key),
            "config": format!("{}/{}", app.key, app.config),
            "oci_layout": format!("{}/oci", app.key),
        },
        "vars": vars,
        "deploy": deploy_command(app),
    })
}

/// Relative paths whose bytes differ between two trees (or exist in only one).
fn compare_trees(a: &Path, b: &Path) -> Result<Vec<String>> {
    let (fa, fb) = (list_files(a)?, list_files(b)?);
    let mut diff = Vec::new();
    for (rel, data) in &fa {
        if fb.get(rel) != Some(data) {
            diff.push(rel.clone());
        }
    }
    diff.extend(fb.keys().filter(|k| !fa.contains_key(*k)).cloned());
    Ok(diff)
}

fn list_files(root: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                walk(root, &path, out)?;
            } else {
                let rel = path.strip_prefix(root).unwrap_or(&path).display().to_string();
                out.insert(rel, std::fs::read(&path)?);
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    //! External input: a Python 3 with PyYAML (`DSTACK_TEST_PYTHON3`, default `python3`) as an independent
    //! implementation of `json.dumps` (what dstack's vmm-cli hashes) and of YAML. Without it those checks are
    //! skipped loudly, or fail under `DSTACK_REQUIRE_FIXTURES=1`.

    use std::io::Write as _;
    use std::process::Stdio;

    use super::*;

    fn python(script: &str, stdin: &str) -> Option<String> {
        let exe = std::env::var("DSTACK_TEST_PYTHON3").unwrap_or_else(|_| "python3".into());
        let child = Command::new(&exe)
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let out = child.ok().and_then(|mut c| {
            c.stdin.take()?.write_all(stdin.as_bytes()).ok()?;
            c.wait_with_output().ok()
        });
        match out {
            Some(o) if o.status.success() => Some(String::from_utf8(o.stdout).unwrap()),
            other => {
                let why = other.map(|o| String::from_utf8_lossy(&o.stderr).into_owned());
                assert!(
                    std::env::var_os("DSTACK_REQUIRE_FIXTURES").is_none(),
                    "{exe} (DSTACK_TEST_PYTHON3) failed: {why:?}"
                );
                eprintln!("SKIPPED: {exe} with PyYAML is not available ({why:?}); set DSTACK_TEST_PYTHON3");
                None
            }
        }
    }

    fn templates() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../image-build/appliances")
    }

    /// Fake "static binaries": ELF magic and distinct contents (packaging does not run them).
    fn fake_binaries(dir: &Path, tag: &str) {
        for a in APPLIANCES {
            std::fs::write(dir.join(a.binary), format!("\x7fELF {} {tag}", a.binary)).unwrap();
        }
    }

    #[test]
    fn render_fills_placeholders_and_refuses_missing_ones() {
        let vars: BTreeMap<String, String> = [("A_1".to_owned(), "x".to_owned())].into();
        assert_eq!(
            render("a=@A_1@ mail=me@example.com @ @a@", &vars, "t").unwrap(),
            "a=x mail=me@example.com @ @a@"
        );
        let e = render("@MISSING@", &vars, "kms.toml").unwrap_err().to_string();
        assert!(e.contains("kms.toml") && e.contains("@MISSING@"), "{e}");
        assert_eq!(indent_block("a\n\nb\n", 2), "  a\n\n  b");
    }

    #[test]
    fn gateway_compose_variables_reach_the_command_and_the_acme_ca_block() {
        let work = tempfile::tempdir().unwrap();
        let bins = work.path().join("bin");
        std::fs::create_dir_all(&bins).unwrap();
        fake_binaries(&bins, "v1");
        let pem = "-----BEGIN CERTIFICATE-----\nMIIBAA==\n-----END CERTIFICATE-----";
        let sets = [
            (Some("gateway".to_owned()), "ACME_CA".to_owned(), pem.to_owned()),
            (
                Some("gateway".to_owned()),
                "GATEWAY_ARGS".to_owned(),
                ", \"--challtestsrv\", \"10.0.2.2:8055\"".to_owned(),
            ),
            (
                Some("gateway".to_owned()),
                "CERTBOT".to_owned(),
                "{ enabled = true, acme_url = \"https://10.0.2.2:14000/dir\" }".to_owned(),
            ),
        ];
        let gw: Vec<Appliance> = APPLIANCES.into_iter().filter(|a| a.key == "gateway").collect();
        package_all(&templates(), &bins, &gw, &sets, work.path()).unwrap();
        let dir = work.path().join("gateway");
        let compose = std::fs::read_to_string(dir.join("docker-compose.yaml")).unwrap();
        let config = std::fs::read_to_string(dir.join("gateway.toml")).unwrap();
        assert!(config.contains("certbot = { enabled = true, acme_url = \"https://10.0.2.2:14000/dir\" }"));
        let script = "import yaml,sys,json\nd=yaml.safe_load(sys.stdin.read())\n\
                      print(json.dumps([d['services']['gateway']['command'], d['configs']['acme_ca']['content']]))";
        if let Some(out) = python(script, &compose) {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(
                v[0],
                serde_json::json!([
                    "--config",
                    "/etc/dstack-gateway/gateway.toml",
                    "--challtestsrv",
                    "10.0.2.2:8055"
                ])
            );
            assert_eq!(v[1], format!("{pem}\n"));
        }
        // Defaults: no extra arguments, certbot off.
        let plain = work.path().join("plain");
        std::fs::create_dir_all(&plain).unwrap();
        package_all(&templates(), &bins, &gw, &[], &plain).unwrap();
        let compose = std::fs::read_to_string(plain.join("gateway/docker-compose.yaml")).unwrap();
        assert!(compose.contains("command: [\"--config\", \"/etc/dstack-gateway/gateway.toml\"]"));
        let config = std::fs::read_to_string(plain.join("gateway/gateway.toml")).unwrap();
        assert!(config.contains("certbot = { enabled = false }"));
    }

    #[test]
    fn options_parse_and_unknown_variables_are_errors() {
        let args: Vec<String> = [
            "--set",
            "kms.KMS_DOMAIN=k.example",
            "--set",
            "ALLOW_SIMULATED=true",
            "--only",
            "kms",
        ]
        .map(String::from)
        .to_vec();
        let o = Options::parse(&args).unwrap();
        assert_eq!(o.only.as_deref(), Some("kms"));
        let kms = vars_for(&templates().join("kms"), "kms", &o.sets).unwrap();
        assert_eq!(kms["KMS_DOMAIN"], "k.example");
        assert_eq!(kms["ALLOW_SIMULATED"], "true");
        let gw = vars_for(&templates().join("gateway"), "gateway", &o.sets).unwrap();
        assert_eq!(gw["ALLOW_SIMULATED"], "true");
        assert!(!gw.contains_key("KMS_DOMAIN"));
        let typo = [(None, "KMS_DOMIAN".to_owned(), "x".to_owned())];
        assert!(vars_for(&templates().join("kms"), "kms", &typo).is_err());
        let scoped_typo = [(Some("gateway".to_owned()), "KMS_DOMAIN".to_owned(), "x".to_owned())];
        assert!(vars_for(&templates().join("gateway"), "gateway", &scoped_typo).is_err());
        assert!(Options::parse(&["--only".to_owned(), "vmm".to_owned()]).is_err());
    }

    #[test]
    fn app_compose_is_byte_identical_to_python_json_dumps() {
        let compose = "services:\n  x:\n    image: \"a\\b\"\t\u{1b} h\u{e9}llo \u{1f600} </>\n";
        for app in APPLIANCES {
            let ours = app_compose_json(&app, compose).unwrap();
            let script = format!(
                "import json,sys\nc=sys.stdin.read()\nd={{'manifest_version':2,'name':'{}','runner':'docker-compose',\
                 'docker_compose_file':c,'kms_enabled':{},'gateway_enabled':False,\
                 'local_key_provider_enabled':False,'key_provider_id':'','public_logs':False,\
                 'public_sysinfo':False,'allowed_envs':[],'no_instance_id':False,'secure_time':False}}\n\
                 sys.stdout.write(json.dumps(d,indent=4,ensure_ascii=False))",
                app.app_name,
                if app.kms_enabled { "True" } else { "False" }
            );
            let Some(theirs) = python(&script, compose) else { return };
            assert_eq!(ours, theirs, "{}", app.key);
        }
    }

    #[test]
    fn packaging_twice_gives_identical_digests_and_compose_hashes() {
        let work = tempfile::tempdir().unwrap();
        let bins = work.path().join("bin");
        std::fs::create_dir_all(&bins).unwrap();
        fake_binaries(&bins, "v1");
        let (a, b) = (work.path().join("a"), work.path().join("b/nested"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let first = package_all(&templates(), &bins, &APPLIANCES, &[], &a).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let second = package_all(&templates(), &bins, &APPLIANCES, &[], &b).unwrap();
        assert_eq!(first, second);
        assert_eq!(compare_trees(&a, &b).unwrap(), Vec::<String>::new());

        for app in APPLIANCES {
            let p = &first[app.key];
            let dir = a.join(app.key);
            // The image digest is the SHA-256 of the manifest blob in the layout; the compose file pins it.
            let manifest =
                std::fs::read(dir.join("oci/blobs/sha256").join(&p.image_digest["sha256:".len()..])).unwrap();
            assert_eq!(format!("sha256:{}", hex(&Sha256::digest(&manifest))), p.image_digest);
            let compose = std::fs::read_to_string(dir.join("docker-compose.yaml")).unwrap();
            assert!(compose.contains(&format!("image: {}@{}", app.repo, p.image_digest)));
            // Compose hash = sha256(app-compose.json bytes), app id = its first 20 bytes.
            let app_compose = std::fs::read(dir.join("app-compose.json")).unwrap();
            assert_eq!(hex(&Sha256::digest(&app_compose)), p.compose_hash);
            assert_eq!(p.app_id, p.compose_hash[..40]);
            let config = std::fs::read_to_string(dir.join(app.config)).unwrap();
            assert!(config.contains("/var/run/dstack.sock"), "{}", app.config);

            // The YAML parses (independently) to the pinned image and the rendered config, byte for byte.
            let script = format!(
                "import yaml,sys,json\nd=yaml.safe_load(sys.stdin.read())\ns=d['services']['{}']\n\
                 print(json.dumps([s['image'], d['configs']['{}_toml']['content'], s['volumes'][0]]))",
                app.key, app.key
            );
            if let Some(out) = python(&script, &compose) {
                let v: serde_json::Value = serde_json::from_str(&out).unwrap();
                assert_eq!(v[0], p.image);
                assert_eq!(v[1], config.trim_end_matches('\n').to_owned() + "\n");
                assert_eq!(v[2], "/var/run/dstack.sock:/var/run/dstack.sock");
            }
        }
        let published: serde_json::Value =
            serde_json::from_slice(&std::fs::read(a.join("appliances.json")).unwrap()).unwrap();
        assert_eq!(published["kms"]["compose_hash"], first["kms"].compose_hash);
        assert_eq!(published["gateway"]["kms_enabled"], true);

        // Any input change shows: another binary, or another config value.
        fake_binaries(&bins, "v2");
        let c = work.path().join("c");
        std::fs::create_dir_all(&c).unwrap();
        let changed = package_all(&templates(), &bins, &APPLIANCES, &[], &c).unwrap();
        assert_ne!(changed["kms"].image_digest, first["kms"].image_digest);
        assert_ne!(changed["kms"].compose_hash, first["kms"].compose_hash);
        fake_binaries(&bins, "v1");
        let set = [(
            Some("kms".to_owned()),
            "KMS_DOMAIN".to_owned(),
            "other.example".to_owned(),
        )];
        let d = work.path().join("d");
        std::fs::create_dir_all(&d).unwrap();
        let reconfigured = package_all(&templates(), &bins, &APPLIANCES, &set, &d).unwrap();
        assert_eq!(reconfigured["kms"].image_digest, first["kms"].image_digest);
        assert_ne!(reconfigured["kms"].compose_hash, first["kms"].compose_hash);
        assert_eq!(reconfigured["gateway"], first["gateway"]);
    }
}
