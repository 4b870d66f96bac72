//! Calls the dstack guest agent's `Info` method over its unix socket (pRPC: `POST /Info`, JSON body).

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::http;

/// Where the agent listens inside a CVM (the compose file mounts it into the container).
pub const DEFAULT_SOCKET: &str = "/var/run/dstack.sock";

/// Fields of `AppInfo` the demo shows (the full answer also carries the event log).
const SHOWN_FIELDS: &[&str] = &[
    "app_id",
    "instance_id",
    "compose_hash",
    "app_name",
    "device_id",
    "os_image_hash",
    "mr_aggregated",
];

/// Result of asking the agent, ready to send: HTTP status and a JSON body.
#[derive(Debug)]
pub struct InfoReply {
    /// Status for our client: 200, 502 (agent failed) or 503 (no agent).
    pub status: u16,
    /// JSON text.
    pub body: String,
}

fn error_reply(status: u16, socket: &Path, message: String) -> InfoReply {
    let mut obj = Map::new();
    obj.insert("error".into(), Value::String(message));
    obj.insert("agent_socket".into(), Value::String(socket.display().to_string()));
    InfoReply {
        status,
        body: Value::Object(obj).to_string(),
    }
}

/// Sends `POST /Info` with an empty JSON request and returns the raw response.
fn call_info(socket: &Path) -> Result<http::Response, http::HttpError> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let body = b"{}";
    write!(
        stream,
        "POST /Info HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    stream.flush()?;
    http::read_response(&mut stream)
}

/// Asks the agent at `socket` for its `Info` and keeps the identity fields.
pub fn info(socket: &Path) -> InfoReply {
    let resp = match call_info(socket) {
        Ok(r) => r,
        Err(http::HttpError::Io(e)) if matches!(e.kind(), io::ErrorKind::NotFound) => {
            return error_reply(
                503,
                socket,
                format!(
                    "no dstack guest agent: socket {} does not exist (not inside a dstack CVM, or the socket is not mounted into this container)",
                    socket.display()
                ),
            );
        }
        Err(e) => return error_reply(502, socket, format!("calling the guest agent failed: {e}")),
    };
    if resp.status != 200 {
        let text = String::from_utf8_lossy(&resp.body);
        return error_reply(
            502,
            socket,
            format!("guest agent answered HTTP {}: {text}", resp.status),
        );
    }
    let parsed: Value = match serde_json::from_slice(&resp.body) {
        Ok(v) => v,
        Err(e) => return error_reply(502, socket, format!("guest agent Info is not JSON: {e}")),
    };
    let Value::Object(all) = parsed else {
        return error_reply(502, socket, "guest agent Info is not a JSON object".into());
    };
    let mut shown = Map::new();
    for field in SHOWN_FIELDS {
        if let Some(v) = all.get(*field) {
            shown.insert((*field).to_string(), v.clone());
        }
    }
    InfoReply {
        status: 200,
        body: Value::Object(shown).to_string(),
    }
}
