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
    start_app_with(greeting, socket, None)
}

fn start_app_with(greeting: &str, socket: &Path, records_dir: Option<&Path>) -> App {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dstack-demo-app"));
    if let Some(dir) = records_dir {
        cmd.env("RECORDS_DIR", dir);
    }
    let mut child = cmd
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

/// `POST path` with `body` sent in two pieces (head and body apart); returns (status line, body).
fn post(port: u16, path: &str, body: &[u8]) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[test]
fn records_survive_a_killed_app_and_a_torn_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let records = dir.path().join("records");
    let no_agent = Path::new("/nonexistent/dstack.sock");
    let app = start_app_with("x", no_agent, Some(&records));
    for seq in [3u64, 1, 2] {
        let (status, body) = post(app.1, &format!("/records/{seq}"), format!("payload {seq}").as_bytes());
        assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    }
    drop(app); // SIGKILL: acknowledged records were fsynced before the answers
    let log = records.join("records.log");
    let mut raw = std::fs::read(&log).unwrap();
    // Each line ends with SHA-256 of the text before it (checked here with the sha2 crate, the app's own
    // format is checked against Python's hashlib in its unit tests).
    for line in String::from_utf8(raw.clone()).unwrap().lines() {
        let (text, sum) = line.rsplit_once(' ').unwrap();
        assert_eq!(sum, hex_sha256(text.as_bytes()), "{line}");
    }
    raw.extend_from_slice(b"4 6162"); // half a record, as a crash could leave it
    std::fs::write(&log, &raw).unwrap();

    let app = start_app_with("x", no_agent, Some(&records));
    let (status, body) = get(app.1, "/records");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let seqs: Vec<u64> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![3, 1, 2]);
    assert_eq!(v["torn_tail"]["len"], 6, "{body}");
    assert_eq!(v["corrupt"].as_array().unwrap().len(), 0);
    // The next append replaces the torn bytes.
    let (status, _) = post(app.1, "/records/5", b"after");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let (_, body) = get(app.1, "/records");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["torn_tail"].is_null(), "{body}");
    assert_eq!(v["records"].as_array().unwrap().len(), 4);
    // Bad requests are refused without touching the log.
    assert_eq!(post(app.1, "/records/x", b"").0, "HTTP/1.1 400 Bad Request");
    let big = vec![b'a'; 64 * 1024 + 1];
    assert_eq!(post(app.1, "/records/6", &big).0, "HTTP/1.1 413 Payload Too Large");
    assert_eq!(std::fs::read(&log).unwrap().iter().filter(|&&b| b == b'\n').count(), 4);
}

fn hex_sha256(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}
