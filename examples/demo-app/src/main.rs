//! dstack demo app: a tiny HTTP server shipped as a static binary in a one-layer OCI image.
//!
//! - `GET /` — an HTML page with the container's hostname and the `GREETING` env var (the demo sends it as
//!   an encrypted env var, so seeing it proves the CVM decrypted it).
//! - `GET /info` — the CVM identity (app_id, instance_id, compose_hash, …) from the dstack guest agent on
//!   its unix socket; a 503 JSON error saying so when the socket is absent.
//! - `GET /health` — `ok`.
//!
//! Environment: `PORT` (default 8080), `GREETING`, `DSTACK_SOCKET` (default `/var/run/dstack.sock`).

mod agent;
mod http;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What every request handler needs.
#[derive(Debug, Clone)]
struct Settings {
    greeting: Option<String>,
    socket: PathBuf,
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

/// Routes one request; returns (status, content type, body).
fn route(req: &http::Request, settings: &Settings) -> (u16, &'static str, Vec<u8>) {
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
        };
        let get = |p: &str| http::Request {
            method: "GET".into(),
            path: p.into(),
        };
        let (s, _, body) = route(&get("/"), &settings);
        assert_eq!(s, 200);
        assert!(String::from_utf8(body).unwrap().contains("<b>hi</b>"));
        assert_eq!(route(&get("/nope"), &settings).0, 404);
        assert_eq!(route(&get("/health"), &settings).0, 200);
        let post = http::Request {
            method: "POST".into(),
            path: "/".into(),
        };
        assert_eq!(route(&post, &settings).0, 405);
        let (s, _, body) = route(&get("/info"), &settings);
        assert_eq!(s, 503);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("does not exist"));
    }
}
