//! Docker (DESIGN.md §3 step 9): `daemon.json` (data root on the encrypted disk, `registry-mirrors` from
//! `sys-config.docker_registry`), supervised containerd + dockerd, readiness by polling the API socket
//! (`GET /_ping` → `OK`, never CLI loops), then the app: `docker compose -f docker-compose.yaml up -d
//! --remove-orphans` (runner `docker-compose`) or `bash app.sh` (runner `bash`), with the decrypted env in
//! the process environment (dstack's `EnvironmentFile=.decrypted-env`), never in argv.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dstack_types::{AppCompose, Runner};
use serde_json::Value;

use crate::supervisor::ServiceSpec;

pub const DOCKER_SOCK: &str = "/var/run/docker.sock";
pub const CONTAINERD_SOCK: &str = "/run/containerd/containerd.sock";

/// Errors starting the app.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("{what}: {reason}")]
    Setup { what: String, reason: String },
    #[error("{0} did not become ready in {1} s")]
    NotReady(String, u64),
    #[error("runner {0:?} is not supported")]
    Runner(Runner),
}

fn setup(what: impl Into<String>) -> impl FnOnce(String) -> DockerError {
    let what = what.into();
    move |reason| DockerError::Setup { what, reason }
}

/// `daemon.json`: the existing object (if any) with `data-root` and `registry-mirrors` set.
pub fn daemon_json(existing: Option<&[u8]>, data_root: &Path, mirror: Option<&str>) -> Result<Vec<u8>, DockerError> {
    let mut v: Value = match existing {
        Some(raw) => serde_json::from_slice(raw).map_err(|e| DockerError::Setup {
            what: "existing /etc/docker/daemon.json".into(),
            reason: e.to_string(),
        })?,
        None => serde_json::json!({}),
    };
    let obj = v.as_object_mut().ok_or_else(|| DockerError::Setup {
        what: "existing /etc/docker/daemon.json".into(),
        reason: "not a JSON object".into(),
    })?;
    obj.insert("data-root".into(), data_root.display().to_string().into());
    if let Some(m) = mirror.filter(|m| !m.is_empty()) {
        obj.insert("registry-mirrors".into(), serde_json::json!([m]));
        // dockerd only talks plain HTTP to registries it is told are insecure. That costs no integrity:
        // images are content-addressed, and a compose file that pins digests is measured.
        if let Some(host) = m.strip_prefix("http://") {
            let host = host.trim_end_matches('/');
            obj.insert("insecure-registries".into(), serde_json::json!([host]));
        }
    }
    serde_json::to_vec_pretty(&v).map_err(|e| DockerError::Setup {
        what: "daemon.json".into(),
        reason: e.to_string(),
    })
}

/// Writes `<root>/etc/docker/daemon.json`.
pub fn write_daemon_json(root: &Path, data_root: &Path, mirror: Option<&str>) -> Result<PathBuf, DockerError> {
    let path = root.join("etc/docker/daemon.json");
    let existing = std::fs::read(&path).ok();
    let bytes = daemon_json(existing.as_deref(), data_root, mirror)?;
    std::fs::create_dir_all(root.join("etc/docker")).map_err(|e| setup("mkdir /etc/docker")(e.to_string()))?;
    std::fs::write(&path, bytes).map_err(|e| setup(path.display().to_string())(e.to_string()))?;
    Ok(path)
}

/// containerd and dockerd, in start order.
pub fn services(data_dir: &Path, daemon_json: &Path) -> [ServiceSpec; 2] {
    let root = data_dir.join("containerd").display().to_string();
    let containerd = ServiceSpec::new(
        "containerd",
        "containerd",
        &[
            "--address",
            CONTAINERD_SOCK,
            "--root",
            &root,
            "--state",
            "/run/containerd",
        ],
    );
    let cfg = daemon_json.display().to_string();
    let dockerd = ServiceSpec::new(
        "dockerd",
        "dockerd",
        &[
            "--config-file",
            &cfg,
            "--containerd",
            CONTAINERD_SOCK,
            "--host",
            &format!("unix://{DOCKER_SOCK}"),
        ],
    );
    [containerd, dockerd]
}

/// True once the socket accepts a connection.
pub fn socket_accepts(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// True once the Docker API answers `GET /_ping` with `OK`.
pub fn docker_ping(path: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(path) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n").is_err() {
        return false;
    }
    let mut resp = Vec::new();
    let _ = s.take(4096).read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    text.starts_with("HTTP/1.") && text.split_whitespace().nth(1) == Some("200") && text.ends_with("OK")
}

/// Polls `ready` every 200 ms up to `timeout`.
pub fn wait_ready(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<(), DockerError> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            tracing::info!("{what} is ready");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(DockerError::NotReady(what.to_owned(), timeout.as_secs()))
}

/// A command to run the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppCommand {
    pub program: String,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
}

impl AppCommand {
    pub fn command(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.program);
        c.args(&self.args)
            .current_dir(&self.cwd)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
}

/// Writes the app files into `work_dir` and returns the command that starts the app. A
/// `pre_launch_script` is sourced first in the same shell (dstack's `app-compose.sh` behaviour).
pub fn app_command(compose: &AppCompose, work_dir: &Path, env: &[(String, String)]) -> Result<AppCommand, DockerError> {
    let write = |name: &str, data: &str| -> Result<PathBuf, DockerError> {
        let p = work_dir.join(name);
        std::fs::write(&p, data).map_err(|e| setup(p.display().to_string())(e.to_string()))?;
        Ok(p)
    };
    let (program, mut args) = match compose.runner {
        Runner::DockerCompose => {
            let file = compose.docker_compose_file.as_deref().unwrap_or_default();
            write("docker-compose.yaml", file)?;
            let args = ["compose", "-f", "docker-compose.yaml", "up", "-d", "--remove-orphans"];
            (
                "docker".to_owned(),
                args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
            )
        }
        Runner::Bash => {
            let script = compose.bash_script.as_deref().ok_or_else(|| DockerError::Setup {
                what: "app-compose.json".into(),
                reason: "runner \"bash\" needs bash_script".into(),
            })?;
            write("app.sh", script)?;
            ("bash".to_owned(), vec!["app.sh".to_owned()])
        }
        other => return Err(DockerError::Runner(other)),
    };
    let mut program = program;
    if let Some(pre) = compose.pre_launch_script.as_deref().filter(|s| !s.trim().is_empty()) {
        write("pre-launch.sh", pre)?;
        let mut wrapped = vec![
            "-e".to_owned(),
            "-c".to_owned(),
            "source ./pre-launch.sh; exec \"$@\"".to_owned(),
            "pre-launch".to_owned(),
            program,
        ];
        wrapped.append(&mut args);
        program = "bash".to_owned();
        args = wrapped;
    }
    let mut full_env = vec![(
        "PATH".to_owned(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
    )];
    full_env.extend(env.iter().cloned());
    Ok(AppCommand {
        program,
        args,
        cwd: work_dir.to_owned(),
        env: full_env,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compose(json: &str) -> AppCompose {
        AppCompose::from_slice(json.as_bytes()).unwrap()
    }

    #[test]
    fn daemon_json_content() {
        let v: Value =
            serde_json::from_slice(&daemon_json(None, Path::new("/data/docker"), Some("https://m.example")).unwrap())
                .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"data-root": "/data/docker", "registry-mirrors": ["https://m.example"]})
        );
        let v: Value =
            serde_json::from_slice(&daemon_json(Some(br#"{"log-driver":"local"}"#), Path::new("/d"), None).unwrap())
                .unwrap();
        assert_eq!(v, serde_json::json!({"data-root": "/d", "log-driver": "local"}));
        let v: Value =
            serde_json::from_slice(&daemon_json(None, Path::new("/d"), Some("http://10.0.2.2:5000/")).unwrap())
                .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"data-root": "/d", "registry-mirrors": ["http://10.0.2.2:5000/"],
                "insecure-registries": ["10.0.2.2:5000"]})
        );
        assert!(daemon_json(Some(b"[1]"), Path::new("/d"), None).is_err());
        assert!(daemon_json(Some(b"{"), Path::new("/d"), None).is_err());
    }

    #[test]
    fn compose_command_line() {
        let d = tempfile::tempdir().unwrap();
        let c = compose(
            r#"{"manifest_version":"2","name":"t","runner":"docker-compose","docker_compose_file":"services:\n  a: {image: x}\n"}"#,
        );
        let cmd = app_command(&c, d.path(), &[("TOKEN".into(), "s3cret".into())]).unwrap();
        assert_eq!(cmd.program, "docker");
        assert_eq!(
            cmd.args,
            ["compose", "-f", "docker-compose.yaml", "up", "-d", "--remove-orphans"]
        );
        assert_eq!(cmd.cwd, d.path());
        assert!(cmd.env.contains(&("TOKEN".into(), "s3cret".into())));
        assert!(!cmd.args.iter().any(|a| a.contains("s3cret")), "secrets never in argv");
        assert_eq!(
            std::fs::read_to_string(d.path().join("docker-compose.yaml")).unwrap(),
            "services:\n  a: {image: x}\n"
        );
    }

    #[test]
    fn pre_launch_and_bash_runner() {
        let d = tempfile::tempdir().unwrap();
        let c = compose(
            r#"{"manifest_version":"2","name":"t","runner":"bash","bash_script":"echo $A > out","pre_launch_script":"export A=hi"}"#,
        );
        let cmd = app_command(&c, d.path(), &[]).unwrap();
        assert_eq!(cmd.program, "bash");
        assert_eq!(cmd.args[4..], ["bash", "app.sh"]);
        // Really run it: the pre-launch export reaches the app.
        let out = crate::proc::run(&mut cmd.command(), None, Duration::from_secs(10)).unwrap();
        assert!(out.status.success());
        assert_eq!(std::fs::read_to_string(d.path().join("out")).unwrap(), "hi\n");
        let no_script = compose(r#"{"manifest_version":"2","name":"t","runner":"bash"}"#);
        assert!(app_command(&no_script, d.path(), &[]).is_err());
    }

    #[test]
    fn ping_and_services() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("docker.sock");
        assert!(!docker_ping(&sock));
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"GET /_ping "));
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK").unwrap();
        });
        wait_ready("docker", Duration::from_secs(5), || docker_ping(&sock)).unwrap();
        t.join().unwrap();
        let [c, dk] = services(Path::new("/data"), Path::new("/etc/docker/daemon.json"));
        assert_eq!(
            c.args,
            [
                "--address",
                CONTAINERD_SOCK,
                "--root",
                "/data/containerd",
                "--state",
                "/run/containerd"
            ]
        );
        assert!(dk.args.windows(2).any(|w| w == ["--containerd", CONTAINERD_SOCK]));
        assert!(matches!(
            wait_ready("x", Duration::from_millis(300), || false),
            Err(DockerError::NotReady(..))
        ));
    }
}
