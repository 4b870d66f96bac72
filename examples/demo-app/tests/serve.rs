//! Runs the real binary: the page carries GREETING, /info relays a (stand-in) guest agent's answer over a
//! unix socket, and says so when the socket is absent. The stand-in agent is a plain std socket server
//! answering the way the pRPC server does (JSON, chunked), written independently of the app's client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct App(Child, u16);

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_app(greeting: &str, socket: &Path) -> App {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dstack-demo-app"))
        .env("PORT", "0")
        .env("GREETING", greeting)
        .env("DSTACK_SOCKET", socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    App(child, port)
}

fn get(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[test]
fn page_shows_greeting_and_hostname() {
    let app = start_app("Hello <from> the CVM", Path::new("/nonexistent/dstack.sock"));
    let (status, body) = get(app.1, "/");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("Hello &lt;from&gt; the CVM"), "{body}");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert!(body.contains(host.trim()), "{body}");
    let (status, body) = get(app.1, "/health");
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "ok\n"));
}

#[test]
fn info_without_agent_says_so() {
    let app = start_app("x", Path::new("/nonexistent/dstack.sock"));
    let (status, body) = get(app.1, "/info");
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/dstack.sock does not exist"),
        "{body}"
    );
}

#[test]
fn info_relays_agent_identity() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("dstack.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let agent = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 512];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") || !req.ends_with(b"{}") {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0, "client closed early");
            req.extend_from_slice(&buf[..n]);
        }
        let json = r#"{"app_id":"ab12","instance_id":"cd34","compose_hash":"ef56","app_name":"demo","tcb_info":"{\"big\":1}"}"#;
        let (a, b) = json.split_at(20);
        write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        )
        .unwrap();
        String::from_utf8(req).unwrap()
    });
    let app = start_app("x", &sock);
    let (status, body) = get(app.1, "/info");
    let req = agent.join().unwrap();
    assert!(req.starts_with("POST /Info HTTP/1.1\r\n"), "{req}");
    assert!(req.to_ascii_lowercase().contains("content-type: application/json"));
    assert_eq!(status, "HTTP/1.1 200 OK");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["app_id"], "ab12");
    assert_eq!(v["instance_id"], "cd34");
    assert_eq!(v["compose_hash"], "ef56");
    assert_eq!(v["app_name"], "demo");
    assert!(v.get("tcb_info").is_none(), "the event log is not relayed: {body}");
}
