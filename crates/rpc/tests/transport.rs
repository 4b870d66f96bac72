//! Real servers on TCP, unix sockets and TLS, driven by the generated clients and by raw HTTP
//! requests shaped like the ones dstack's Python SDK and vmm-cli.py send.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use dstack_rpc::agent::{DstackGuestClient, GetKeyArgs, RawQuoteArgs, SignRequest, TappdClient, TdxQuoteArgs};
use dstack_rpc::{Client, LocalTransport, RpcError, RpcRouter};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Server {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server did not shut down")
            .unwrap()
            .unwrap();
    }
}

fn stop_pair() -> (oneshot::Sender<()>, impl Future<Output = ()> + Send) {
    let (tx, rx) = oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

async fn tcp_server(router: Arc<RpcRouter>) -> (Server, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, stopped) = stop_pair();
    let task = tokio::spawn(dstack_rpc::serve_tcp(listener, router, stopped));
    (Server { stop: Some(tx), task }, format!("127.0.0.1:{}", addr.port()))
}

/// Sends raw request bytes and returns (status line, headers, body) of the response.
async fn raw_exchange<S>(mut stream: S, request: &[u8]) -> (String, String, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    // The request says `Connection: close`, so the server closes after answering.
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap();
    (status.to_owned(), headers.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test]
async fn tcp_generated_client_protobuf_and_json() {
    let (server, addr) = tcp_server(common::agent_router()).await;
    for json in [false, true] {
        let client = Client::new(&format!("http://{addr}")).unwrap().with_json(json);
        let agent = DstackGuestClient::new(client);
        let key = agent
            .get_key(GetKeyArgs {
                path: "/app".into(),
                purpose: "signing".into(),
                algorithm: "secp256k1".into(),
            })
            .await
            .unwrap();
        assert_eq!(key.key, b"/app");
        assert_eq!(key.signature_chain[0], b"signing");
        let quote = agent
            .get_quote(RawQuoteArgs {
                report_data: vec![0xAA; 3],
            })
            .await
            .unwrap();
        assert_eq!(&quote.report_data[..4], &[0xAA, 0xAA, 0xAA, 0]);
        assert_eq!(quote.report_data.len(), 64);
        let info = agent.info().await.unwrap();
        assert!(info.app_name.starts_with("127.0.0.1:"), "{}", info.app_name);
        assert_eq!(info.app_cert, "certs=0");
        // Handler errors surface as Remote { 400, message } in both encodings.
        let err = agent
            .get_quote(RawQuoteArgs {
                report_data: vec![0; 65],
            })
            .await
            .unwrap_err();
        match err {
            RpcError::Remote { status, message } => {
                assert_eq!(status, 400);
                assert_eq!(message, "Report data is too long");
            }
            other => panic!("unexpected error: {other}"),
        }
    }
    // Headers reach the handler.
    let client = Client::new(&format!("http://{addr}/"))
        .unwrap()
        .with_bearer_token("s3cret")
        .unwrap();
    let v = DstackGuestClient::new(client).version().await.unwrap();
    assert_eq!(v.rev, "s3cret");
    server.stop().await;
}

#[tokio::test]
async fn tcp_raw_requests_like_python_sdk_and_vmm_cli() {
    let (agent_server, agent_addr) = tcp_server(common::agent_router()).await;
    // What dstack-sdk (httpx) sends for get_key("a", "b").
    let body = r#"{"path":"a","purpose":"b","algorithm":"secp256k1"}"#;
    let request = format!(
        "POST /GetKey HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\n\
         Connection: close\r\nUser-Agent: dstack-sdk-python/0.5.0\r\nContent-Length: {}\r\n\
         Content-Type: application/json\r\n\r\n{body}",
        body.len()
    );
    let stream = TcpStream::connect(&agent_addr).await.unwrap();
    let (status, headers, body) = raw_exchange(stream, request.as_bytes()).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(headers.contains("content-type: application/json"), "{headers}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    // hex of "a", "b", "secp256k1" (checked with python binascii.hexlify).
    assert_eq!(
        v,
        serde_json::json!({"key": "61", "signature_chain": ["62", "736563703235366b31"]})
    );
    agent_server.stop().await;

    let (vmm_server, vmm_addr) = tcp_server(common::vmm_router()).await;
    // What vmm-cli.py (http.client) sends for `lsvm`.
    let request = format!(
        "POST /prpc/Status?json HTTP/1.1\r\nHost: {vmm_addr}\r\nAccept-Encoding: identity\r\n\
         Content-Length: 2\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{{}}"
    );
    let stream = TcpStream::connect(&vmm_addr).await.unwrap();
    let (status, headers, body) = raw_exchange(stream, request.as_bytes()).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(headers.contains("content-type: application/json"), "{headers}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["vms"][0]["name"], "demo");
    assert_eq!(v["port_mapping_enabled"], true);
    vmm_server.stop().await;
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let (server, addr) = tcp_server(common::agent_router()).await;
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    for i in 0..3 {
        let body = format!(r#"{{"path":"p{i}"}}"#);
        let req = format!(
            "POST /GetKey HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = stream.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let expected = format!(r#""key":"{}""#, hex::encode(format!("p{i}")));
        assert!(text.contains(&expected), "{text}");
    }
    drop(stream);
    server.stop().await;
}

#[tokio::test]
async fn unix_socket_agent_and_tappd() {
    let dir = tempfile::tempdir().unwrap();
    let agent_path = dir.path().join("run/dstack/dstack.sock");
    // A stale socket file from a dead server is replaced.
    {
        let _stale = std::os::unix::net::UnixListener::bind(dir.path().join("stale.sock")).unwrap();
    }
    let stale = dir.path().join("stale.sock");
    assert!(stale.exists());
    let relisten = dstack_rpc::bind_unix(&stale, 0o600).unwrap();
    drop(relisten);

    let listener = dstack_rpc::bind_unix(&agent_path, 0o777).unwrap();
    let mode = std::fs::metadata(&agent_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o777);
    // A live socket is not stolen; a regular file is not deleted.
    let err = dstack_rpc::bind_unix(&agent_path, 0o777).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(dstack_rpc::bind_unix(&file, 0o777).is_err());
    assert!(file.exists());

    let (tx, stopped) = stop_pair();
    let agent = tokio::spawn(dstack_rpc::serve_unix(listener, common::agent_router(), stopped));
    let agent = Server {
        stop: Some(tx),
        task: agent,
    };
    let url = format!("unix:{}", agent_path.display());
    for json in [false, true] {
        let client = DstackGuestClient::new(Client::new(&url).unwrap().with_json(json));
        let info = client.info().await.unwrap();
        assert!(info.app_name.starts_with("unix:"), "{}", info.app_name);
        assert!(
            info.app_name.contains(&format!("uid={}", unsafe_free_uid())),
            "{}",
            info.app_name
        );
        assert_eq!(info.key_provider_info, "|DstackGuest|Info");
    }
    // The Python SDK over the unix socket.
    let stream = UnixStream::connect(&agent_path).await.unwrap();
    let body = r#"{"report_data":"0x0A"}"#;
    let req = format!(
        "POST /GetQuote HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, _, body) = raw_exchange(stream, req.as_bytes()).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["report_data"], format!("0a{}", "0".repeat(126)));
    agent.stop().await;

    // Tappd on its own socket under /prpc, with and without the `Tappd.` prefix.
    let tappd_path = dir.path().join("tappd.sock");
    let listener = dstack_rpc::bind_unix(&tappd_path, 0o777).unwrap();
    let (tx, stopped) = stop_pair();
    let task = tokio::spawn(dstack_rpc::serve_unix(listener, common::tappd_router(), stopped));
    let tappd = Server { stop: Some(tx), task };
    let client = Client::unix(&tappd_path, "/prpc");
    let q = TappdClient::new(client.clone())
        .tdx_quote(TdxQuoteArgs {
            report_data: vec![5],
            hash_algorithm: "raw".into(),
            prefix: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(q.quote, vec![5]);
    let raw = client
        .send(
            http::Method::POST,
            "/prpc/Tappd.TdxQuote",
            Some("application/json"),
            bytes::Bytes::from_static(br#"{"report_data":"07"}"#),
        )
        .await
        .unwrap();
    assert_eq!(raw.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&raw.body).unwrap();
    assert_eq!(v["quote"], "07");
    tappd.stop().await;
}

/// The current uid, read from /proc to avoid libc (and unsafe) in tests.
fn unsafe_free_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

struct Pki {
    ca: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
    client_chain: Vec<CertificateDer<'static>>,
    client_key: PrivateKeyDer<'static>,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    };
    let (server_chain, server_key) = leaf("localhost");
    let (client_chain, client_key) = leaf("client.test");
    Pki {
        ca: ca.der().clone(),
        server_chain,
        server_key,
        client_chain,
        client_key,
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &CertificateDer<'static>) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    Arc::new(roots)
}

#[tokio::test]
async fn tls_with_and_without_client_auth() {
    let pki = pki();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&pki.ca), provider())
        .allow_unauthenticated()
        .build()
        .unwrap();
    let server_config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, stopped) = stop_pair();
    let task = tokio::spawn(dstack_rpc::serve_tls(
        listener,
        Arc::new(server_config),
        Arc::new(
            RpcRouter::new("/prpc")
                .service(dstack_rpc::agent::DstackGuestServer::new(common::Agent))
                .service(dstack_rpc::agent::TappdServer::new(common::Agent)),
        ),
        stopped,
    ));
    let server = Server { stop: Some(tx), task };
    let client_builder = || {
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(&pki.ca))
    };
    let url = format!("https://127.0.0.1:{port}/prpc");

    // Client certificate: the handler sees the chain.
    let mtls = client_builder()
        .with_client_auth_cert(pki.client_chain.clone(), pki.client_key.clone_key())
        .unwrap();
    let client = Client::new(&url)
        .unwrap()
        .with_tls(Arc::new(mtls))
        .with_server_name("localhost")
        .unwrap();
    let info = DstackGuestClient::new(client.clone()).info().await.unwrap();
    assert_eq!(info.app_cert, "certs=1");
    assert_eq!(info.device_id, pki.client_chain[0].as_ref());
    let q = TappdClient::new(client.with_json(true))
        .raw_quote(RawQuoteArgs { report_data: vec![9] })
        .await
        .unwrap();
    assert_eq!(q.quote, vec![9]);

    // No client certificate: still served, but no peer chain.
    let plain = client_builder().with_no_client_auth();
    let client = Client::new(&url)
        .unwrap()
        .with_tls(Arc::new(plain))
        .with_server_name("localhost")
        .unwrap();
    let info = DstackGuestClient::new(client).info().await.unwrap();
    assert_eq!(info.app_cert, "certs=0");
    assert!(info.device_id.is_empty());

    // Without the server name override the IP does not match the certificate: TLS error.
    let strict = Client::new(&url)
        .unwrap()
        .with_tls(Arc::new(client_builder().with_no_client_auth()));
    let err = DstackGuestClient::new(strict).info().await.unwrap_err();
    assert!(matches!(err, RpcError::Tls(_)), "{err}");
    // https without a TLS config is refused up front.
    let err = DstackGuestClient::new(Client::new(&url).unwrap())
        .info()
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::InvalidEndpoint { .. }), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn client_errors_and_timeouts() {
    // Nothing listens on this port (bound then dropped).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = Client::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let err = DstackGuestClient::new(client).version().await.unwrap_err();
    assert!(matches!(err, RpcError::Io(_)), "{err}");

    // A server that accepts and never answers trips the overall timeout.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let (s, _) = silent.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    });
    let client = Client::new(&format!("http://{addr}"))
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    let err = DstackGuestClient::new(client).version().await.unwrap_err();
    assert!(matches!(err, RpcError::Timeout { what: "call", .. }), "{err}");
    hold.abort();

    // Unknown method on a real server → Remote 404.
    let (server, addr) = tcp_server(common::vmm_router()).await;
    let client = Client::new(&format!("http://{addr}/prpc")).unwrap();
    let err = DstackGuestClient::new(client)
        .get_key(GetKeyArgs::default())
        .await
        .unwrap_err();
    match err {
        RpcError::Remote { status, message } => {
            assert_eq!(status, 404);
            assert_eq!(message, "method not found: GetKey");
        }
        other => panic!("unexpected error: {other}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_waits_for_in_flight_calls() {
    let (server, addr) = tcp_server(common::agent_router()).await;
    // An idle keep-alive connection must not block shutdown.
    let idle = TcpStream::connect(&addr).await.unwrap();
    let client = DstackGuestClient::new(Client::new(&format!("http://{addr}")).unwrap());
    let slow = tokio::spawn(async move {
        client
            .attest(RawQuoteArgs {
                report_data: b"slow".to_vec(),
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.stop().await;
    // The call that was running when shutdown started still completed.
    assert_eq!(slow.await.unwrap().unwrap().attestation, b"slow");
    drop(idle);
    // After shutdown the port no longer accepts connections.
    assert!(TcpStream::connect(&addr).await.is_err());
}

#[tokio::test]
async fn local_transport_round_trips_protobuf() {
    let transport = LocalTransport::new(dstack_rpc::agent::DstackGuestServer::new(common::Agent));
    let client = DstackGuestClient::new(transport);
    let sig = client
        .sign(SignRequest {
            algorithm: "ed25519".into(),
            data: vec![1, 2, 3],
        })
        .await
        .unwrap();
    assert_eq!(sig.signature, vec![1, 2, 3]);
    let info = client.info().await.unwrap();
    assert_eq!(info.key_provider_info, "|DstackGuest|Info");
}
