//! The manager's web dashboard: served on the HTTP front, static page + pRPC from the browser, token auth on
//! TCP, `/logs`; and the page rendered in headless Chromium (`--dump-dom`) lists a VM with its status,
//! resources, ports, boot progress and action buttons.
//!
//! Chromium: `DSTACK_CHROMIUM` (path) or `chromium` / `chromium-browser` on PATH (Debian package `chromium`).
//! Absent → loud SKIP, or a failure under `DSTACK_REQUIRE_FIXTURES=1`.

#[path = "support/fake.rs"]
mod fake;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dstack_rpc::Client;
use dstack_rpc::host_api::{HostApiClient, Notification};
use dstack_rpc::vmm::{PortMapping, VmConfiguration, VmmClient};
use fake::{Served, TOKEN};
use http::Method;

const COMPOSE: &str = r#"{"manifest_version":2,"name":"demo","runner":"docker-compose","docker_compose_file":"services: {}\n","kms_enabled":false,"gateway_enabled":false,"local_key_provider_enabled":false,"public_logs":true,"public_sysinfo":true,"allowed_envs":[],"no_instance_id":false,"secure_time":false}"#;

fn chromium() -> Option<String> {
    let candidates = match std::env::var("DSTACK_CHROMIUM") {
        Ok(p) => vec![p],
        Err(_) => vec!["chromium".into(), "chromium-browser".into()],
    };
    for c in &candidates {
        let ok = Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(c.clone());
        }
    }
    if std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref() == Ok("1") {
        panic!("chromium not found ({candidates:?}) and DSTACK_REQUIRE_FIXTURES=1");
    }
    eprintln!(
        "\n*** SKIP dashboard browser check: chromium not found ({candidates:?}); install Debian's `chromium` or \
         set DSTACK_CHROMIUM ***\n"
    );
    None
}

async fn create_vm(s: &Served) -> String {
    let c = VmmClient::new(Client::unix(&s.sock, "/prpc"));
    let id = c
        .create_vm(VmConfiguration {
            name: "dash-app".into(),
            image: "test-img".into(),
            compose_file: COMPOSE.into(),
            vcpu: 2,
            memory: 768,
            disk_size: 3,
            ports: vec![PortMapping {
                protocol: "tcp".into(),
                host_address: "127.0.0.1".into(),
                host_port: 18443,
                vm_port: 443,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    let deadline = Instant::now() + Duration::from_secs(10);
    let host_sock = s.run_dir(&id).join("vsock.sock_10000");
    while !host_sock.exists() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    HostApiClient::new(Client::unix(host_sock, "/api"))
        .notify(Notification {
            event: "boot.progress".into(),
            payload: "setting up docker".into(),
        })
        .await
        .unwrap();
    id
}

async fn get(client: &Client, path: &str) -> (u16, String, String) {
    let r = client.send(Method::GET, path, None, Bytes::new()).await.unwrap();
    let ct = r
        .headers
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (r.status.as_u16(), ct, String::from_utf8_lossy(&r.body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_routes_and_auth() {
    let s = Served::start().await;
    let id = create_vm(&s).await;
    let tcp = format!("http://{}", s.tcp);
    let anon = Client::new(&tcp).unwrap();
    let (code, ct, body) = get(&anon, "/").await;
    assert_eq!((code, ct.as_str()), (200, "text/html; charset=utf-8"));
    assert!(body.contains("<script src=\"app.js\"></script>"), "{body}");
    let (code, ct, js) = get(&anon, "/app.js").await;
    assert_eq!((code, ct.as_str()), (200, "text/javascript; charset=utf-8"));
    assert!(js.contains("prpc/") && js.contains("ShutdownVm"));
    assert_eq!(get(&anon, "/nope").await.0, 404);
    // The static page is public; data needs the token on TCP.
    assert_eq!(get(&anon, &format!("/logs?id={id}")).await.0, 401);
    let r = anon
        .send(
            Method::POST,
            "/prpc/Status?json",
            Some("application/json"),
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 400);
    let authed = Client::new(&tcp).unwrap().with_bearer_token(TOKEN).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, _, log) = get(&authed, &format!("/logs?id={id}&lines=5&ansi=false")).await;
        assert_eq!(code, 200);
        if log == "booted cid=1000\n" {
            break;
        }
        assert!(Instant::now() < deadline, "log: {log:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&authed, "/logs?id=../../etc").await.0, 404);
    assert_eq!(get(&authed, "/logs?lines=1").await.0, 400);
    // Unix-socket callers are trusted.
    let unix = Client::unix(&s.sock, "");
    assert_eq!(get(&unix, &format!("/logs?id={id}&source=stderr")).await.0, 200);

    // `follow=true` streams (what dstack's `vmm-cli.py logs -f` reads): the tail, then appended output.
    let sock = s.sock.clone();
    let log = s.run_dir(&id).join("stdout.log");
    let streamed = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut c = std::os::unix::net::UnixStream::connect(sock).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            c,
            "GET /logs?id={id}&follow=true&ansi=false&lines=20 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let mut appended = false;
        loop {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "stream ended: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen).into_owned();
            if !appended && text.contains("booted cid=1000") {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&log)
                    .unwrap()
                    .write_all(b"later output\n")
                    .unwrap();
                appended = true;
            }
            if text.contains("later output") {
                return text;
            }
        }
    })
    .await
    .unwrap();
    assert!(streamed.starts_with("HTTP/1.1 200"), "{streamed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_lists_vm_in_headless_chromium() {
    let Some(chrome) = chromium() else { return };
    let s = Served::start().await;
    let id = create_vm(&s).await;
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/#token={TOKEN}", s.tcp);
    let mut cmd = Command::new(&chrome);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        // Lets the page's fetches finish before the DOM is dumped.
        "--virtual-time-budget=10000",
        "--dump-dom",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(&url)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        let child = cmd.spawn().unwrap();
        let pid = child.id();
        // Chromium should finish in seconds; don't let a wedged browser hang the suite.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(out) => out.unwrap(),
            Err(_) => {
                // SAFETY: kill(2) of the browser this test started.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
                panic!("chromium did not finish within 120 s");
            }
        }
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed: {stderr}");
    let row_start = dom
        .find(&format!("data-vm-id=\"{id}\""))
        .unwrap_or_else(|| panic!("VM row missing from the DOM:\n{dom}\n--- stderr:\n{stderr}"));
    let row = &dom[row_start..];
    let row = &row[..row.find("</tr>").unwrap()];
    for want in [
        "dash-app",
        "class=\"status-running\">running",
        "<td>2</td>",
        "768 MB",
        "3 GB",
        "test-img",
        "tcp:127.0.0.1:18443→443",
        "setting up docker",
        "data-action=\"remove\"",
    ] {
        assert!(row.contains(want), "{want:?} missing from the row: {row}");
    }
    // Running VM: Start disabled, Stop enabled.
    assert!(row.contains("data-action=\"start\" disabled"), "{row}");
    assert!(!row.contains("data-action=\"stop\" disabled"), "{row}");
    assert!(dom.contains("1 VM(s)"), "{dom}");
}
