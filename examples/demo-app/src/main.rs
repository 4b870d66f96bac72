//! dstack demo app: a tiny HTTP server shipped as a static binary in a one-layer OCI image.
//!
//! - `GET /` — an HTML page with the container's hostname and the `GREETING` env var (the demo sends it as
//!   an encrypted env var, so seeing it proves the CVM decrypted it).
//! - `GET /info` — the CVM identity (app_id, instance_id, compose_hash, …) from the dstack guest agent on
//!   its unix socket; a 503 JSON error saying so when the socket is absent.
//! - `GET /health` — `ok`.
//! - `POST /records/<seq>` (body: payload) — appends a checksummed record to `$RECORDS_DIR/records.log` and
//!   answers only after it is fsynced; `GET /records` — the records found, a torn last record and any
//!   corruption (see [`records`]). For crash tests; HTTP 503 when `RECORDS_DIR` is not set.
//!
//! Environment: `PORT` (default 8080), `GREETING`, `DSTACK_SOCKET` (default `/var/run/dstack.sock`),
//! `RECORDS_DIR` (unset: no record log).

mod agent;
mod http;
mod records;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What every request handler needs.
#[derive(Debug, Clone)]
struct Settings {
    greeting: Option<String>,
    socket: PathBuf,
    /// The record log, when `RECORDS_DIR` is set.
    records: Option<Arc<records::RecordLog>>,
}

/// Escapes text for HTML element content and attribute values.
fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// The kernel's hostname (UTS namespace), read without libc so it works in a static binary.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "(unknown)".to_string())
}

fn index_page(greeting: Option<&str>, host: &str) -> String {
    let greeting = match greeting {
        Some(g) => format!("<b>{}</b>", escape_html(g)),
        None => "<i>(GREETING is not set)</i>".to_string(),
    };
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>dstack demo app</title></head>\n<body>\n\
         <h1>dstack demo app</h1>\n<p>Greeting: {greeting}</p>\n<p>Hostname: <code>{}</code></p>\n\
         <p><a href=\"/info\">/info</a> shows this CVM's identity from the dstack guest agent; \
         <code>/quote/&lt;hex nonce&gt;</code> returns a quote over SHA-512(\"dstack-demo-quote:\" ‖ nonce) with its event log.</p>\n</body></html>\n",
        escape_html(host)
    )
}

fn json_error(status: u16, message: String) -> (u16, &'static str, Vec<u8>) {
    let body = serde_json::json!({ "error": message }).to_string();
    (status, "application/json", body.into_bytes())
}

/// `POST /records/<seq>` and `GET /records`; `None` for every other request.
fn records_route(req: &http::Request, settings: &Settings) -> Option<(u16, &'static str, Vec<u8>)> {
    let append_seq = req.path.strip_prefix("/records/");
    let is_records = match req.method.as_str() {
        "POST" => append_seq.is_some(),
        "GET" => req.path == "/records",
        _ => false,
    };
    if !is_records {
        return None;
    }
    let Some(log) = &settings.records else {
        return Some(json_error(503, "RECORDS_DIR is not set: no record log".into()));
    };
    let reply = match append_seq {
        Some(seq) if req.method == "POST" => {
            let Some(seq) = seq
                .parse::<u64>()
                .ok()
                .filter(|_| seq.bytes().all(|b| b.is_ascii_digit()))
            else {
                return Some(json_error(400, format!("sequence number {seq:?} is not decimal")));
            };
            match log.append(seq, &req.body) {
                Ok(offset) => {
                    let body = serde_json::json!({ "seq": seq, "offset": offset }).to_string();
                    (200, "application/json", body.into_bytes())
                }
                Err(e @ records::RecordError::TooLarge(_)) => json_error(413, e.to_string()),
                Err(e) => json_error(500, e.to_string()),
            }
        }
        _ => match log.read() {
            Ok(scan) => (200, "application/json", scan.to_json().to_string().into_bytes()),
            Err(e) => json_error(500, e.to_string()),
        },
    };
    Some(reply)
}

/// Routes one request; returns (status, content type, body).
fn route(req: &http::Request, settings: &Settings) -> (u16, &'static str, Vec<u8>) {
    if let Some(reply) = records_route(req, settings) {
        return reply;
    }
    if req.method != "GET" {
        return (405, "text/plain", b"only GET is supported\n".to_vec());
    }
    match req.path.as_str() {
        "/" => {
            let page = index_page(settings.greeting.as_deref(), &hostname());
            (200, "text/html; charset=utf-8", page.into_bytes())
        }
        "/info" => {
            let reply = agent::info(&settings.socket);
            (reply.status, "application/json", reply.body.into_bytes())
        }
        "/health" => (200, "text/plain", b"ok\n".to_vec()),
        p if p.starts_with("/quote/") => {
            let reply = agent::quote(&settings.socket, &p["/quote/".len()..]);
            (reply.status, "application/json", reply.body.into_bytes())
        }
        _ => (404, "text/plain", b"not found\n".to_vec()),
    }
}

fn serve_one(mut stream: TcpStream, settings: &Settings) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let (status, ctype, body) = match http::read_request(&mut stream) {
        Ok(req) => route(&req, settings),
        Err(e) => (400, "text/plain", format!("{e}\n").into_bytes()),
    };
    if let Err(e) = http::write_response(&mut stream, status, ctype, &body) {
        eprintln!("demo-app: writing response failed: {e}");
    }
}

extern "C" fn exit_on_signal(_sig: libc::c_int) {
    // SAFETY: _exit is async-signal-safe and takes no pointers.
    unsafe { libc::_exit(0) }
}

/// As PID 1 in a container, SIGTERM/SIGINT have no default action: exit on them so `docker stop` is quick.
fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let handler = exit_on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: installs a handler that only calls the async-signal-safe _exit.
        unsafe { libc::signal(sig, handler) };
    }
}

fn main() {
    install_signal_handlers();
    let port = match std::env::var("PORT") {
        Ok(p) => match p.parse::<u16>() {
            Ok(p) => p,
            Err(_) => {
                eprintln!("demo-app: PORT={p:?} is not a port number");
                std::process::exit(2);
            }
        },
        Err(_) => 8080,
    };
    let settings = Settings {
        greeting: std::env::var("GREETING").ok(),
        socket: std::env::var_os("DSTACK_SOCKET")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(agent::DEFAULT_SOCKET).to_path_buf()),
        records: std::env::var_os("RECORDS_DIR").map(|d| Arc::new(records::RecordLog::new(PathBuf::from(d)))),
    };
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo-app: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    println!("demo-app: listening on {bound}");
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let s = settings.clone();
                std::thread::spawn(move || serve_one(stream, &s));
            }
            Err(e) => eprintln!("demo-app: accept failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_escapes_greeting_and_hostname() {
        let page = index_page(Some("<script>&"), "h\"x");
        assert!(page.contains("<b>&lt;script&gt;&amp;</b>"));
        assert!(page.contains("<code>h&quot;x</code>"));
        assert!(index_page(None, "h").contains("GREETING is not set"));
    }

    #[test]
    fn routes() {
        let settings = Settings {
            greeting: Some("hi".into()),
            socket: "/nonexistent/dstack.sock".into(),
            records: None,
        };
        let get = |p: &str| http::Request {
            method: "GET".into(),
            path: p.into(),
            body: Vec::new(),
        };
        let (s, _, body) = route(&get("/"), &settings);
        assert_eq!(s, 200);
        assert!(String::from_utf8(body).unwrap().contains("<b>hi</b>"));
        assert_eq!(route(&get("/nope"), &settings).0, 404);
        assert_eq!(route(&get("/health"), &settings).0, 200);
        let post = http::Request {
            method: "POST".into(),
            path: "/".into(),
            body: Vec::new(),
        };
        assert_eq!(route(&post, &settings).0, 405);
        // Without RECORDS_DIR the record routes say so.
        assert_eq!(route(&get("/records"), &settings).0, 503);
        let (s, _, body) = route(&get("/info"), &settings);
        assert_eq!(s, 503);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("does not exist"));
    }

    fn req(method: &str, path: &str, body: &[u8]) -> http::Request {
        http::Request {
            method: method.into(),
            path: path.into(),
            body: body.to_vec(),
        }
    }

    #[test]
    fn record_routes_append_and_list() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            greeting: None,
            socket: "/nonexistent/dstack.sock".into(),
            records: Some(Arc::new(records::RecordLog::new(dir.path().join("r")))),
        };
        let (s, _, body) = route(&req("POST", "/records/42", b"payload"), &settings);
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((v["seq"].as_u64(), v["offset"].as_u64()), (Some(42), Some(0)));
        for bad in [
            "/records/",
            "/records/x",
            "/records/+1",
            "/records/1/2",
            "/records/99999999999999999999",
        ] {
            assert_eq!(route(&req("POST", bad, b""), &settings).0, 400, "{bad}");
        }
        let big = vec![0u8; records::MAX_PAYLOAD + 1];
        assert_eq!(route(&req("POST", "/records/1", &big), &settings).0, 413);
        // Only GET lists; PUT and friends stay refused.
        assert_eq!(route(&req("PUT", "/records/1", b""), &settings).0, 405);
        assert_eq!(route(&req("GET", "/records/42", b""), &settings).0, 404);
        let (s, _, body) = route(&req("GET", "/records", b""), &settings);
        assert_eq!(s, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let recs = v["records"].as_array().unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0]["seq"], 42);
        assert_eq!(recs[0]["payload_len"], 7);
        // hashlib.sha256(b"payload").hexdigest()
        assert_eq!(
            recs[0]["payload_sha256"],
            "239f59ed55e737c77147cf55ad0c1b030b6d7ee748a7426952f9b852d5a935e5"
        );
        assert!(v["torn_tail"].is_null() && v["corrupt"].as_array().unwrap().is_empty());
    }
}
