//! Push to a real registry and read everything back through its API.
//!
//! External inputs (environment variables):
//! - `DSTACK_DOCKER_REGISTRY`: the registry binary (default `/usr/bin/docker-registry`, Debian package
//!   `docker-registry`). Missing → the tests print a loud SKIP, or fail when `DSTACK_REQUIRE_FIXTURES=1`.
//! - `DSTACK_DEMO_APP_BIN`: a static build of `dstack-demo-app`; unset → the test builds one with cargo
//!   (`--target x86_64-unknown-linux-gnu`, `-C target-feature=+crt-static`) under `<target>/demo-app-static`.
//! - `docker` on PATH with a running daemon: optional; when present the demo image is also pulled and run
//!   by Docker, otherwise that part is skipped with a message.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{cli, sha256sum, some_elf, tool};
use dstack_oci::{Blob, Digest, Registry, RegistryError};

const GREETING: &str = "Hello from an image built offline";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A `docker-registry` child process on 127.0.0.1 with its storage in a temp dir; killed on drop.
struct LocalRegistry {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LocalRegistry {
    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts the registry, or returns None (after a loud SKIP) when its binary is not installed.
fn start_registry(test: &str) -> Option<LocalRegistry> {
    let bin = std::env::var("DSTACK_DOCKER_REGISTRY").unwrap_or_else(|_| "/usr/bin/docker-registry".into());
    if !Path::new(&bin).exists() {
        let msg = format!("{bin} not found (install Debian package docker-registry or set DSTACK_DOCKER_REGISTRY)");
        if std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref() == Ok("1") {
            panic!("{test}: {msg}");
        }
        eprintln!("\n*** SKIP {test}: {msg} ***\n");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
        dir.path().join("data").display()
    );
    let config_path = dir.path().join("config.yml");
    fs::write(&config_path, config).unwrap();
    let log = fs::File::create(dir.path().join("registry.log")).unwrap();
    let child = Command::new(&bin)
        .arg("serve")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut reg = LocalRegistry {
        child,
        dir,
        url: format!("http://127.0.0.1:{port}"),
    };
    let client = Registry::new(&reg.url).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if rt().block_on(client.ping()).is_ok() {
            return Some(reg);
        }
        if let Ok(Some(status)) = reg.child.try_wait() {
            panic!("docker-registry exited with {status}:\n{}", reg.log());
        }
        assert!(
            Instant::now() < deadline,
            "docker-registry did not answer on {}:\n{}",
            reg.url,
            reg.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn build_cli(binary: &str, out: &Path, extra: &[&str]) -> String {
    let args = [
        "build",
        "--binary",
        binary,
        "--name",
        "demo-app:v1",
        "--out",
        out.to_str().unwrap(),
    ];
    cli(&[&args[..], extra].concat(), &[])
}

fn push_cli(dir: &Path, url: &str, repo: &str, tag: &str) -> String {
    cli(
        &[
            "push",
            dir.to_str().unwrap(),
            "--registry",
            url,
            "--repo",
            repo,
            "--tag",
            tag,
        ],
        &[],
    )
}

fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap())
}

#[test]
fn push_then_fetch_back_verifies() {
    let Some(reg) = start_registry("push_then_fetch_back_verifies") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let built = build_cli(some_elf(), &dir, &[]);
    let pushed = push_cli(&dir, &reg.url, "dstack/demo", "v1");
    assert_eq!(pushed, built);
    // Pushing again (blobs already there) is fine and gives the same digest.
    assert_eq!(push_cli(&dir, &reg.url, "dstack/demo", "v1"), built);

    let client = Registry::new(&reg.url).unwrap();
    let rt = rt();
    let by_tag = rt.block_on(client.fetch_manifest("dstack/demo", "v1")).unwrap();
    assert_eq!(by_tag.media_type, "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(by_tag.digest.as_str(), built);
    assert_eq!(by_tag.data, fs::read(blob_path(&dir, &built)).unwrap());
    let by_digest = rt.block_on(client.fetch_manifest("dstack/demo", &built)).unwrap();
    assert_eq!(by_digest, by_tag);

    let manifest: serde_json::Value = serde_json::from_slice(&by_tag.data).unwrap();
    let mut digests = vec![manifest["config"]["digest"].as_str().unwrap().to_string()];
    digests.extend(
        manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string()),
    );
    for d in digests {
        let data = rt
            .block_on(client.fetch_blob("dstack/demo", &Digest::parse(&d).unwrap()))
            .unwrap();
        let copy = tmp.path().join("fetched");
        fs::write(&copy, &data).unwrap();
        assert_eq!(
            sha256sum(&copy),
            d,
            "registry blob hashes (per sha256sum) to its digest"
        );
        assert_eq!(data, fs::read(blob_path(&dir, &d)).unwrap());
    }

    // The Docker-media-type variant is served with its own content type.
    let ddir = tmp.path().join("docker");
    let ddigest = build_cli(some_elf(), &ddir, &["--docker-media-types"]);
    assert_eq!(push_cli(&ddir, &reg.url, "dstack/demo", "v1-docker"), ddigest);
    let m = rt.block_on(client.fetch_manifest("dstack/demo", "v1-docker")).unwrap();
    assert_eq!(m.media_type, "application/vnd.docker.distribution.manifest.v2+json");
    assert_eq!(m.digest.as_str(), ddigest);
}

#[test]
fn registry_refuses_blob_with_wrong_digest() {
    let Some(reg) = start_registry("registry_refuses_blob_with_wrong_digest") else {
        return;
    };
    let client = Registry::new(&reg.url).unwrap();
    let rt = rt();
    let lying = Blob {
        media_type: "application/octet-stream".into(),
        digest: Digest::of(b"one"),
        data: b"two".to_vec(),
    };
    let err = rt.block_on(client.push_blob("demo", &lying)).unwrap_err();
    assert!(
        matches!(&err, RegistryError::Status { status, .. } if status.as_u16() == 400),
        "expected the registry's 400 DIGEST_INVALID, got {err}"
    );
    // Unknown manifests and blobs are errors, not empty successes.
    assert!(rt.block_on(client.fetch_manifest("demo", "nope")).is_err());
    assert!(!rt.block_on(client.has_blob("demo", &Digest::of(b"absent"))).unwrap());
}

/// True when the ELF at `data` has no PT_INTERP program header (statically linked, needs no libc in the image).
fn is_static_elf(data: &[u8]) -> bool {
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    assert!(data.starts_with(b"\x7fELF\x02\x01"), "not a little-endian ELF64");
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) != 3
    })
}

/// The static demo app: `DSTACK_DEMO_APP_BIN`, or built here with cargo into a separate target dir.
fn demo_app_binary() -> PathBuf {
    if let Ok(p) = std::env::var("DSTACK_DEMO_APP_BIN") {
        return PathBuf::from(p);
    }
    // <target>/debug/deps/registry-… → <target>
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap().join("demo-app-static");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .args(["build", "-p", "dstack-demo-app", "--target", "x86_64-unknown-linux-gnu"])
        .env("CARGO_TARGET_DIR", &target)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .unwrap();
    assert!(status.success(), "building the static demo app failed");
    target.join("x86_64-unknown-linux-gnu/debug/dstack-demo-app")
}

fn http_get(addr: &str, path: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((head.lines().next().unwrap_or_default().to_string(), body.to_string()))
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn is_root() -> bool {
    String::from_utf8(tool("id", &["-u"]).stdout).unwrap().trim() == "0"
}

/// Runs `/app` of the extracted image: in a chroot of the image's root when we are root (so it must work
/// with only the image's files, as in a container), else directly.
fn run_extracted(root: &Path) -> (Killed, u16) {
    let chroot = ["/usr/sbin/chroot", "/usr/bin/chroot"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let mut cmd = if let (true, Some(chroot)) = (is_root(), chroot) {
        let mut c = Command::new(chroot);
        c.arg(root).arg("/app");
        c
    } else {
        eprintln!("not root (or no chroot): running the extracted /app outside a chroot");
        Command::new(root.join("app"))
    };
    let mut child = cmd
        .env_clear()
        .env("PORT", "0")
        .env("GREETING", GREETING)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("app said {line:?}"));
    (Killed(child), port)
}

fn docker_ready() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn docker(args: &[&str]) -> String {
    String::from_utf8(tool("docker", args).stdout)
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn demo_app_image_runs_from_the_registry() {
    let Some(reg) = start_registry("demo_app_image_runs_from_the_registry") else {
        return;
    };
    let app = demo_app_binary();
    let app_bytes = fs::read(&app).unwrap();
    assert!(is_static_elf(&app_bytes), "{} is dynamically linked", app.display());

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let digest = build_cli(app.to_str().unwrap(), &dir, &[]);
    assert_eq!(push_cli(&dir, &reg.url, "demo-app", "v1"), digest);

    // Pull it back through the API, by digest, and unpack the layer with GNU tar.
    let client = Registry::new(&reg.url).unwrap();
    let rt = rt();
    let manifest = rt.block_on(client.fetch_manifest("demo-app", &digest)).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.data).unwrap();
    let layer_digest = Digest::parse(manifest["layers"][0]["digest"].as_str().unwrap()).unwrap();
    let layer = rt.block_on(client.fetch_blob("demo-app", &layer_digest)).unwrap();
    let layer_path = tmp.path().join("layer.tar.gz");
    fs::write(&layer_path, layer).unwrap();
    let root = tmp.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    tool(
        "tar",
        &["-xzf", layer_path.to_str().unwrap(), "-C", root.to_str().unwrap()],
    );
    assert_eq!(fs::read(root.join("app")).unwrap(), app_bytes);

    let (_app, port) = run_extracted(&root);
    let addr = format!("127.0.0.1:{port}");
    let (status, body) = http_get(&addr, "/").unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains(GREETING), "{body}");
    let (status, body) = http_get(&addr, "/info").unwrap();
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(body.contains("/var/run/dstack.sock does not exist"), "{body}");

    if !docker_ready() {
        eprintln!("\n*** SKIP docker pull/run part: no docker CLI or daemon not running ***\n");
        return;
    }
    let reference = format!("{}/demo-app:v1", client.authority());
    docker(&["pull", &reference]);
    let id = docker(&[
        "run",
        "-d",
        "--rm",
        "-e",
        &format!("GREETING={GREETING}"),
        "-p",
        "127.0.0.1::8080",
        &reference,
    ]);
    let container = Container(id.clone());
    let mapped = docker(&["port", &container.0, "8080/tcp"]);
    let addr = mapped.lines().next().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        match http_get(&addr, "/") {
            Ok((s, body)) if s.contains("200") => break body,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            other => panic!("container {id} did not answer on {addr}: {other:?}"),
        }
    };
    assert!(body.contains(GREETING), "{body}");
    assert!(body.contains(&id[..12]), "hostname is the container id: {body}");
    drop(container);
    let _ = Command::new("docker").args(["rmi", &reference]).output();
}

struct Container(String);
impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}
