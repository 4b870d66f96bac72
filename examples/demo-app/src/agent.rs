//! Calls the dstack guest agent's `Info` method over its unix socket (pRPC: `POST /Info`, JSON body).

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};
use sha2::{Digest, Sha512};

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

/// Sends `POST /<method>` with a JSON request and returns the raw response.
fn call(socket: &Path, method: &str, body: &[u8]) -> Result<http::Response, http::HttpError> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "POST /{method} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    stream.flush()?;
    http::read_response(&mut stream)
}

/// Asks the agent at `socket` for its `Info` and keeps the identity fields.
pub fn info(socket: &Path) -> InfoReply {
    match agent_json(socket, "Info", b"{}") {
        Ok(all) => {
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
        Err(reply) => reply,
    }
}

/// Domain separation for quotes handed to anyone who asks: the report data is never the caller's bytes.
pub const QUOTE_NONCE_PREFIX: &[u8] = b"dstack-demo-quote:";

/// The report data of a `/quote/<nonce>` answer: `SHA-512(QUOTE_NONCE_PREFIX || nonce)`.
///
/// Quoting caller-chosen report data would let anyone who reaches the app obtain a quote over
/// `sha512("ratls-cert:" || their key)`, i.e. a valid RA-TLS certificate for the app's identity, and with it
/// the app's keys from the KMS. Hashing under a prefix keeps the nonce's freshness and removes that.
pub fn quote_report_data(nonce: &[u8]) -> [u8; 64] {
    let mut h = Sha512::new();
    h.update(QUOTE_NONCE_PREFIX);
    h.update(nonce);
    h.finalize().into()
}

/// Asks the agent for a quote over [`quote_report_data`] of `nonce_hex` (≤ 64 bytes as lowercase hex, a
/// verifier's nonce) and returns its whole answer: quote, event log and vm_config, for verification from
/// outside.
pub fn quote(socket: &Path, nonce_hex: &str) -> InfoReply {
    let valid = nonce_hex.len() <= 128
        && nonce_hex.len().is_multiple_of(2)
        && nonce_hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !valid {
        return error_reply(
            400,
            socket,
            "the nonce must be at most 64 bytes of lowercase hex".into(),
        );
    }
    let nonce: Vec<u8> = (0..nonce_hex.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&nonce_hex[i..i + 2], 16).ok())
        .collect();
    let report_data_hex: String = quote_report_data(&nonce).iter().map(|b| format!("{b:02x}")).collect();
    let body = serde_json::json!({ "report_data": report_data_hex }).to_string();
    match agent_json(socket, "GetQuote", body.as_bytes()) {
        Ok(all) => InfoReply {
            status: 200,
            body: Value::Object(all).to_string(),
        },
        Err(reply) => reply,
    }
}

/// Calls `method` and parses the JSON object it answers, or the error reply to send.
fn agent_json(socket: &Path, method: &str, body: &[u8]) -> Result<Map<String, Value>, InfoReply> {
    let resp = match call(socket, method, body) {
        Ok(r) => r,
        Err(http::HttpError::Io(e)) if matches!(e.kind(), io::ErrorKind::NotFound) => {
            return Err(error_reply(
                503,
                socket,
                format!(
                    "no dstack guest agent: socket {} does not exist (not inside a dstack CVM, or the socket is not mounted into this container)",
                    socket.display()
                ),
            ));
        }
        Err(e) => return Err(error_reply(502, socket, format!("calling the guest agent failed: {e}"))),
    };
    if resp.status != 200 {
        let text = String::from_utf8_lossy(&resp.body);
        return Err(error_reply(
            502,
            socket,
            format!("guest agent answered HTTP {}: {text}", resp.status),
        ));
    }
    let parsed: Value = serde_json::from_slice(&resp.body)
        .map_err(|e| error_reply(502, socket, format!("guest agent {method} is not JSON: {e}")))?;
    match parsed {
        Value::Object(all) => Ok(all),
        _ => Err(error_reply(
            502,
            socket,
            format!("guest agent {method} is not a JSON object"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_report_data_is_prefixed_sha512() {
        // Python: hashlib.sha512(b"dstack-demo-quote:" + bytes.fromhex("00ff")).hexdigest()
        let expected = "7c70f344b868d8da13d1d94c681e7e8417f8733ba02d9e9711445266eab8cdaf\
                        aa99452ff4b92ca3036e60d3af98ccde55d644ca6ffe63ca8571c937cfeb4a85";
        let got: String = quote_report_data(&[0x00, 0xff])
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn bad_nonce_is_refused_before_the_agent_is_asked() {
        let reply = quote(Path::new("/nonexistent/dstack.sock"), "XYZ");
        assert_eq!(reply.status, 400);
        let reply = quote(Path::new("/nonexistent/dstack.sock"), &"00".repeat(65));
        assert_eq!(reply.status, 400);
        // A valid nonce reaches the (absent) agent.
        assert_eq!(quote(Path::new("/nonexistent/dstack.sock"), "00ff").status, 503);
    }
}
