//! ACME against a real local pebble (Debian package `pebble`, which ships both `pebble` and
//! `pebble-challtestsrv`).
//!
//! Environment:
//! * `DSTACK_PEBBLE` — path of the `pebble` binary (default: `pebble` on PATH, else `/usr/bin/pebble`);
//! * `DSTACK_PEBBLE_CHALLTESTSRV` — path of `pebble-challtestsrv` (same lookup);
//! * `DSTACK_REQUIRE_FIXTURES=1` — fail instead of skipping when they are missing.
//!
//! The test makes its own CA and a `127.0.0.1` certificate for pebble's HTTPS listener (the
//! Debian package does not ship pebble's test certificates), starts pebble-challtestsrv (DNS on a
//! free loopback port, management API on another) and pebble (`-dnsserver` pointing at it), then
//! issues, renews and revokes a wildcard certificate through DNS-01. Only 127.0.0.1 is used.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dstack_gateway::acme::{AcmeClient, AcmeSettings, Certbot, ChallTestSrv, DnsProvider, RenewOutcome};
use dstack_gateway::dns::{AppAddress, UdpDnsClient, resolve_app_address};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

fn find_binary(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let from_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    from_path.or_else(|| Some(PathBuf::from("/usr/bin").join(name)).filter(|p| p.is_file()))
}

/// Kills the child when dropped.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A port free for both UDP and TCP (DNS listens on both).
fn free_dns_port() -> u16 {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port for DNS");
}

async fn wait_for_tcp(addr: SocketAddr, child: &mut Proc, what: &str) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("{what} exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not listen on {addr}");
}

/// GET over HTTPS trusting only `ca` (pebble's management API).
async fn https_get(addr: SocketAddr, path: &str, ca: &CertificateDer<'static>) -> (u16, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
}

struct Pebble {
    dir: tempfile::TempDir,
    directory_url: String,
    management: SocketAddr,
    chall_mgmt: SocketAddr,
    dns: SocketAddr,
    ca_pem_path: PathBuf,
    ca_der: CertificateDer<'static>,
    _procs: Vec<Proc>,
}

async fn start_pebble() -> Option<Pebble> {
    let required = std::env::var("DSTACK_REQUIRE_FIXTURES").is_ok_and(|v| v == "1");
    let (Some(pebble), Some(chall)) = (
        find_binary("DSTACK_PEBBLE", "pebble"),
        find_binary("DSTACK_PEBBLE_CHALLTESTSRV", "pebble-challtestsrv"),
    ) else {
        assert!(
            !required,
            "pebble / pebble-challtestsrv not found (apt-get install pebble)"
        );
        eprintln!("SKIPPED: pebble / pebble-challtestsrv not found; install Debian package `pebble`");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    // Our own CA and a 127.0.0.1 certificate for pebble's HTTPS listeners.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test ACME server CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let srv_key = rcgen::KeyPair::generate().unwrap();
    let srv_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let srv_cert = srv_params.signed_by(&srv_key, &issuer).unwrap();
    let ca_pem_path = dir.path().join("ca.pem");
    std::fs::write(&ca_pem_path, ca_cert.pem()).unwrap();
    std::fs::write(dir.path().join("cert.pem"), srv_cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), srv_key.serialize_pem()).unwrap();

    let (acme_port, mgmt_port, chall_port, dns_port) =
        (free_tcp_port(), free_tcp_port(), free_tcp_port(), free_dns_port());
    let config = serde_json::json!({
        "pebble": {
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
            "certificate": dir.path().join("cert.pem"),
            "privateKey": dir.path().join("key.pem"),
            "httpPort": 5002,
            "tlsPort": 5001,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false
        }
    });
    let cfg_path = dir.path().join("pebble-config.json");
    std::fs::write(&cfg_path, config.to_string()).unwrap();
    let log = |name: &str| Stdio::from(std::fs::File::create(dir.path().join(name)).unwrap());

    let mut chall_proc = Proc(
        Command::new(&chall)
            .args([
                "-dns01",
                &format!("127.0.0.1:{dns_port}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
            ])
            .args(["-management", &format!("127.0.0.1:{chall_port}"), "-defaultIPv6", ""])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .spawn()
            .expect("spawn pebble-challtestsrv"),
    );
    let chall_mgmt: SocketAddr = format!("127.0.0.1:{chall_port}").parse().unwrap();
    wait_for_tcp(chall_mgmt, &mut chall_proc, "pebble-challtestsrv").await;

    let mut pebble_proc = Proc(
        Command::new(&pebble)
            .arg("-config")
            .arg(&cfg_path)
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .expect("spawn pebble"),
    );
    let management: SocketAddr = format!("127.0.0.1:{mgmt_port}").parse().unwrap();
    wait_for_tcp(
        format!("127.0.0.1:{acme_port}").parse().unwrap(),
        &mut pebble_proc,
        "pebble",
    )
    .await;
    wait_for_tcp(management, &mut pebble_proc, "pebble management").await;
    Some(Pebble {
        directory_url: format!("https://127.0.0.1:{acme_port}/dir"),
        management,
        chall_mgmt,
        dns: format!("127.0.0.1:{dns_port}").parse().unwrap(),
        ca_der: ca_cert.der().clone(),
        ca_pem_path,
        dir,
        _procs: vec![pebble_proc, chall_proc],
    })
}

fn settings(p: &Pebble, creds: &Path) -> AcmeSettings {
    AcmeSettings {
        directory_url: p.directory_url.clone(),
        ca_file: Some(p.ca_pem_path.clone()),
        contacts: vec!["ops@example.com".into()],
        credentials_path: creds.to_owned(),
        order_timeout: Duration::from_secs(60),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_renew_revoke_with_pebble() {
    let Some(p) = start_pebble().await else { return };
    let work = p.dir.path().join("gw");
    let creds = work.join("acme-account.json");
    let client = AcmeClient::open(settings(&p, &creds), Box::new(ChallTestSrv::new(p.chall_mgmt)))
        .await
        .unwrap_or_else(|e| panic!("account: {e}; logs in {}", p.dir.path().display()));
    let account_id = client.account_id().to_owned();
    assert_eq!(std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777, 0o600);

    let mut bot = Certbot {
        client,
        base_domain: "apps.test".into(),
        cert_path: work.join("certs/cert.pem"),
        key_path: work.join("certs/key.pem"),
        renew_before: Duration::from_secs(86400),
    };
    let RenewOutcome::Renewed(first) = bot.renew_if_needed(false).await.unwrap() else {
        panic!("expected a first issuance");
    };
    let mut names = first.dns_names.clone();
    names.sort();
    assert_eq!(names, ["*.apps.test", "apps.test"]);
    assert_eq!(
        std::fs::metadata(&bot.key_path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The chain verifies against pebble's root and serves TLS for an app subdomain.
    let (status, root_pem) = https_get(p.management, "/roots/0", &p.ca_der).await;
    assert_eq!(status, 200);
    let pebble_root = CertificateDer::from_pem_slice(&root_pem).unwrap();
    let term = dstack_gateway::proxy::tls::TlsTerminator::new(vec![&rustls::version::TLS13]);
    term.load_files(&bot.cert_path, &bot.key_path).unwrap();
    tls_roundtrip(term.config(false).unwrap(), pebble_root, "myapp-8080.apps.test").await;

    // Fresh certificate: nothing to do.
    assert_eq!(bot.renew_if_needed(false).await.unwrap(), RenewOutcome::Fresh);
    // Renewal window larger than the validity: renewed with a new serial.
    bot.renew_before = Duration::from_secs(20 * 365 * 86400);
    let RenewOutcome::Renewed(second) = bot.renew_if_needed(false).await.unwrap() else {
        panic!("expected renewal");
    };
    assert_ne!(second.serial_hex, first.serial_hex);

    // Revocation is visible in pebble's management API.
    bot.revoke_current(Some(instant_acme::RevocationReason::Superseded))
        .await
        .unwrap();
    let serial = second.serial_hex.trim_start_matches('0');
    let (status, body) = https_get(p.management, &format!("/cert-status-by-serial/{serial}"), &p.ca_der).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["Status"], "Revoked", "{v}");

    // The stored account is reused.
    let again = AcmeClient::open(settings(&p, &creds), Box::new(ChallTestSrv::new(p.chall_mgmt)))
        .await
        .unwrap();
    assert_eq!(again.account_id(), account_id);
}

/// Our stub resolver against challtestsrv's DNS server (an independent implementation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txt_lookup_against_challtestsrv_dns() {
    let Some(p) = start_pebble().await else { return };
    let provider = ChallTestSrv::new(p.chall_mgmt);
    provider
        .add_txt("_dstack-app-address.shop.example.org", "c0ffee01:8443")
        .await
        .unwrap();
    let dns = UdpDnsClient::new(p.dns, Duration::from_secs(3));
    let got = resolve_app_address(
        &dns,
        "shop.example.org",
        "_dstack-app-address",
        true,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(
        got,
        AppAddress {
            app_id: "c0ffee01".into(),
            port: 8443
        }
    );
    // Several values, and absence.
    provider.add_txt("_multi.example.org", "a").await.unwrap();
    provider.add_txt("_multi.example.org", "b").await.unwrap();
    let mut both = dstack_gateway::dns::TxtResolver::lookup_txt(&dns, "_multi.example.org")
        .await
        .unwrap();
    both.sort();
    assert_eq!(both, ["a", "b"]);
    provider.clear_txt("_multi.example.org").await.unwrap();
    assert!(
        dstack_gateway::dns::TxtResolver::lookup_txt(&dns, "_multi.example.org")
            .await
            .unwrap()
            .is_empty()
    );
}

async fn tls_roundtrip(server: Arc<rustls::ServerConfig>, root: CertificateDer<'static>, host: &str) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(server).accept(s).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tls, b"ok").await.unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut tls).await.unwrap();
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(host.to_owned()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut out).await.unwrap();
    assert_eq!(out, b"ok");
    srv.await.unwrap();
}
