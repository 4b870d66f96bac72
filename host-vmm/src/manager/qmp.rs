//! A minimal QMP (QEMU Machine Protocol) client, used by the `tcg` backend's graceful shutdown: connect to
//! the VM's `qmp.sock`, negotiate capabilities, send `system_powerdown` (an ACPI power-button press the
//! guest kernel turns into an orderly poweroff).
//!
//! QMP is line-delimited JSON: a greeting `{"QMP": {...}}`, then one reply (`{"return": …}` or
//! `{"error": {"class", "desc"}}`) per command, with asynchronous `{"event": …}` lines interleaved.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::state::Workdir;

/// One QMP message larger than this is refused (QEMU's replies to our commands are tiny).
const MAX_LINE: u64 = 1 << 20;

/// The QMP socket in a VM's work directory (dstack's name). The `tcg` command line must carry
/// `-qmp unix:<this>,server=on,wait=off` for graceful shutdown to use it.
pub fn socket_path(wd: &Workdir) -> PathBuf {
    wd.path().join("qmp.sock")
}

/// Errors talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP protocol: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP: no answer within {0:?}")]
    Timeout(Duration),
}

/// A negotiated QMP session.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities-negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).await.map_err(|source| QmpError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a {{\"QMP\": …}} greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities").await?;
        Ok(qmp)
    }

    /// Reads one JSON message (one line).
    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = (&mut self.reader).take(MAX_LINE).read_line(&mut line).await?;
        if n == 0 {
            return Err(QmpError::Protocol("connection closed by QEMU".into()));
        }
        if !line.ends_with('\n') {
            return Err(QmpError::Protocol(format!("message longer than {MAX_LINE} bytes")));
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("bad JSON from QEMU: {e}")))
    }

    /// Runs a command without arguments and returns its `return` value; events in between are skipped.
    pub async fn execute(&mut self, command: &str) -> Result<Value, QmpError> {
        let mut msg = serde_json::to_vec(&serde_json::json!({ "execute": command }))
            .map_err(|e| QmpError::Protocol(e.to_string()))?;
        msg.push(b'\n');
        self.writer.write_all(&msg).await?;
        loop {
            let reply = self.read_message().await?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected message {reply}")));
        }
    }
}

/// Asks the guest to power off (ACPI power button) through the QMP socket at `path`.
pub async fn system_powerdown(path: &Path, timeout: Duration) -> Result<(), QmpError> {
    tokio::time::timeout(timeout, async {
        let mut qmp = Qmp::connect(path).await?;
        qmp.execute("system_powerdown").await.map(drop)
    })
    .await
    .map_err(|_| QmpError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted QMP peer: greets, then answers each command line with the next canned reply.
    async fn fake_qemu(listener: UnixListener, replies: Vec<&'static str>) -> Vec<String> {
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        for reply in replies {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap() == 0 {
                break;
            }
            seen.push(line.trim().to_owned());
            w.write_all(reply.as_bytes()).await.unwrap();
        }
        seen
    }

    #[tokio::test]
    async fn powerdown_negotiates_and_skips_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let peer = tokio::spawn(fake_qemu(
            listener,
            vec![
                "{\"return\": {}}\n",
                "{\"event\": \"POWERDOWN\", \"timestamp\": {}}\n{\"return\": {}}\n",
            ],
        ));
        system_powerdown(&path, Duration::from_secs(5)).await.unwrap();
        let seen = peer.await.unwrap();
        assert_eq!(
            seen,
            [r#"{"execute":"qmp_capabilities"}"#, r#"{"execute":"system_powerdown"}"#]
        );
    }

    #[tokio::test]
    async fn command_error_and_bad_greeting_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let peer = tokio::spawn(fake_qemu(
            listener,
            vec![
                "{\"return\": {}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no ACPI\"}}\n",
            ],
        ));
        let e = system_powerdown(&path, Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("system_powerdown") && e.contains("no ACPI"), "{e}");
        peer.await.unwrap();

        let e = system_powerdown(&dir.path().join("absent.sock"), Duration::from_secs(1))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.sock"), "{e}");

        // Something that is not QEMU on the socket.
        let path2 = dir.path().join("other.sock");
        let l2 = UnixListener::bind(&path2).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l2.accept().await.unwrap();
            s.write_all(b"{\"hello\": 1}\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let e = system_powerdown(&path2, Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("greeting"), "{e}");
    }
}
