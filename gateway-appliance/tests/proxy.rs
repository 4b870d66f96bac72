//! The SNI proxy end to end on loopback: backends on 127.0.0.x stand in for CVMs' WireGuard IPs.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dstack_gateway::config::ProxyConfig;
use dstack_gateway::dns::{DnsError, TxtResolver};
use dstack_gateway::proxy::tls::TlsTerminator;
use dstack_gateway::proxy::{ProxyState, Stats, pp};
use dstack_gateway::routing::{Instance, PortPolicy, RoutingTable};
use dstack_rpc::BoxFuture;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::backend::echo_backend;

const BASE: &str = "apps.test";

struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    der: CertificateDer<'static>,
}

fn ca(name: &str) -> Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    let cert = p.self_signed(&key).unwrap();
    Ca {
        der: cert.der().clone(),
        issuer: rcgen::Issuer::new(p, key),
    }
}

fn leaf(ca: &Ca, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let p = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct MapResolver(HashMap<String, Vec<String>>);
impl TxtResolver for MapResolver {
    fn lookup_txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, DnsError>> {
        Box::pin(async move { Ok(self.0.get(name).cloned().unwrap_or_default()) })
    }
}

struct Gateway {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    gw_ca: CertificateDer<'static>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn gateway(table: RoutingTable, txt: &[(&str, &str)], tweak: impl FnOnce(&mut ProxyConfig)) -> Gateway {
    let gw_ca = ca("gateway CA");
    let (certs, key) = leaf(&gw_ca, &[&format!("*.{BASE}"), BASE]);
    let tls = TlsTerminator::new(vec![&rustls::version::TLS12, &rustls::version::TLS13]);
    tls.set_certificate(certs, key).unwrap();
    let mut config = ProxyConfig {
        base_domain: BASE.into(),
        ..ProxyConfig::default()
    };
    config.timeouts.handshake = Duration::from_millis(500);
    config.timeouts.connect = Duration::from_millis(500);
    tweak(&mut config);
    let resolver = MapResolver(txt.iter().map(|(k, v)| (k.to_string(), vec![v.to_string()])).collect());
    let state = Arc::new(ProxyState {
        config,
        table,
        resolver: Arc::new(resolver),
        tls: Arc::new(tls),
        stats: Stats::default(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(dstack_gateway::proxy::run(listener, state.clone(), async move {
        let _ = stopped.await;
    }));
    Gateway {
        addr,
        state,
        gw_ca: gw_ca.der,
        _stop: stop,
    }
}

fn instance(id: &str, app: &str, ip: [u8; 4], policy: PortPolicy) -> Instance {
    Instance {
        instance_id: id.into(),
        app_id: app.into(),
        ip: IpAddr::from(ip),
        public_key: String::new(),
        port_policy: policy,
        reg_time: SystemTime::now(),
        latest_handshake: Some(SystemTime::now()),
    }
}

/// TLS backend (the app terminates TLS itself) with a certificate from `app_ca`.
async fn tls_backend(ip: [u8; 4], app_ca: &Ca, names: &[&str]) -> u16 {
    let (certs, key) = leaf(app_ca, names);
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind((IpAddr::from(ip), 0)).await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else { return };
                let _ = tls.write_all(b"app-tls:").await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

async fn tls_client(
    gw: SocketAddr,
    sni: &str,
    root: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(gw).await?;
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await
}

async fn say(s: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin), msg: &[u8], expect_len: usize) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut out = vec![0u8; expect_len];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

#[tokio::test]
async fn terminate_and_h2_modes() {
    let port = echo_backend([127, 0, 0, 2], "plain").await;
    let table = RoutingTable::new();
    table.upsert(instance("inst1", "app1", [127, 0, 0, 2], PortPolicy::default()));
    let gw = gateway(table, &[], |_| {}).await;

    let mut c = tls_client(gw.addr, &format!("app1-{port}.{BASE}"), &gw.gw_ca, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(c.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(say(&mut c, b"hello", 11).await, b"plain:hello");

    let mut c = tls_client(
        gw.addr,
        &format!("inst1-{port}g.{BASE}"),
        &gw.gw_ca,
        &[b"h2", b"http/1.1"],
    )
    .await
    .unwrap();
    assert_eq!(c.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(say(&mut c, b"PRI", 9).await, b"plain:PRI");
    assert_eq!(gw.state.stats.rejected.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn passthrough_keeps_the_apps_tls() {
    let app_ca = ca("app CA");
    let port = tls_backend([127, 0, 0, 3], &app_ca, &[&format!("*.{BASE}"), "shop.example.org"]).await;
    let table = RoutingTable::new();
    table.upsert(instance("i3", "app3", [127, 0, 0, 3], PortPolicy::default()));
    let txt_value = format!("app3:{port}");
    let gw = gateway(table, &[("_dstack-app-address.shop.example.org", &txt_value)], |_| {}).await;

    // The client trusts only the app's CA: the handshake succeeding proves the gateway did not
    // terminate TLS.
    let mut c = tls_client(gw.addr, &format!("app3-{port}s.{BASE}"), &app_ca.der, &[])
        .await
        .unwrap();
    assert_eq!(say(&mut c, b"x", 9).await, b"app-tls:x");
    // Custom domain via the TXT record.
    let mut c = tls_client(gw.addr, "shop.example.org", &app_ca.der, &[]).await.unwrap();
    assert_eq!(say(&mut c, b"y", 9).await, b"app-tls:y");
    // The gateway's own CA does not validate a passthrough session.
    assert!(
        tls_client(gw.addr, &format!("app3-{port}s.{BASE}"), &gw.gw_ca, &[])
            .await
            .is_err()
    );
}

#[tokio::test]
async fn proxy_protocol_header_for_pp_ports() {
    // Backend that reports the first bytes it receives.
    let l = TcpListener::bind("127.0.0.4:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; 28];
        s.read_exact(&mut buf).await.unwrap();
        let _ = tx.send(buf);
        let _ = s.write_all(b"ok").await;
    });
    let table = RoutingTable::new();
    table.upsert(instance(
        "i4",
        "app4",
        [127, 0, 0, 4],
        PortPolicy {
            ports: vec![(port, true)],
            restrict_mode: true,
        },
    ));
    let gw = gateway(table, &[], |_| {}).await;
    let mut c = tls_client(gw.addr, &format!("app4-{port}.{BASE}"), &gw.gw_ca, &[])
        .await
        .unwrap();
    let client_addr = c.get_ref().0.local_addr().unwrap();
    assert_eq!(say(&mut c, b"", 2).await, b"ok");
    let header = rx.await.unwrap();
    let parsed = pp::parse(&header).unwrap();
    assert_eq!(parsed.len, 28, "v2 IPv4 header");
    assert_eq!(parsed.addrs, Some((client_addr, gw.addr)));
}

#[tokio::test]
async fn refusals_close_cleanly() {
    let port = echo_backend([127, 0, 0, 5], "p").await;
    let table = RoutingTable::new();
    table.upsert(instance(
        "i5",
        "app5",
        [127, 0, 0, 5],
        PortPolicy {
            ports: vec![(1, false)],
            restrict_mode: true,
        },
    ));
    let gw = gateway(table, &[], |_| {}).await;
    // restrict_mode: unlisted port.
    assert!(
        tls_client(gw.addr, &format!("app5-{port}.{BASE}"), &gw.gw_ca, &[])
            .await
            .is_err()
    );
    // Unknown id, unknown custom domain, invalid grammar.
    for sni in [
        format!("nobody.{BASE}"),
        "elsewhere.example".to_owned(),
        format!("app5-80gs.{BASE}"),
    ] {
        assert!(tls_client(gw.addr, &sni, &gw.gw_ca, &[]).await.is_err(), "{sni}");
    }
    // Not TLS at all, and an oversized garbage record: the gateway closes the connection.
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[22, 3, 1, 0xff, 0xff, 1, 0, 0xff, 0xfb],
    ] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(junk).await.unwrap();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .unwrap();
        assert!(
            r.is_err() || buf.is_empty() || buf.starts_with(&[21]),
            "closed without data: {buf:?}"
        );
    }
    let rejected = gw.state.stats.rejected.load(std::sync::atomic::Ordering::Relaxed);
    assert!(rejected >= 6, "rejected {rejected}");
}

#[tokio::test]
async fn slow_client_is_cut_at_handshake_timeout() {
    let gw = gateway(RoutingTable::new(), &[], |c| {
        c.timeouts.handshake = Duration::from_millis(300)
    })
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(&[22, 3, 1]).await.unwrap(); // a record header that never completes
    let start = std::time::Instant::now();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("gateway must close");
    assert!(r.is_err() || buf.is_empty());
    assert!(start.elapsed() >= Duration::from_millis(250));
    // Many slow clients at once are all closed (bounded: 50 connections).
    let mut conns = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(&[22]).await.unwrap();
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(gw.state.stats.active.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn per_app_connection_limit() {
    let port = echo_backend([127, 0, 0, 6], "l").await;
    let table = RoutingTable::new();
    table.upsert(instance("i6", "app6", [127, 0, 0, 6], PortPolicy::default()));
    let gw = gateway(table, &[], |c| c.max_connections_per_app = 1).await;
    let sni = format!("app6-{port}.{BASE}");
    let mut first = tls_client(gw.addr, &sni, &gw.gw_ca, &[]).await.unwrap();
    assert_eq!(say(&mut first, b"1", 3).await, b"l:1");
    assert!(
        tls_client(gw.addr, &sni, &gw.gw_ca, &[]).await.is_err(),
        "second connection over the limit"
    );
    drop(first);
    // The slot is released when the first connection ends.
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Ok(mut c) = tls_client(gw.addr, &sni, &gw.gw_ca, &[]).await {
            assert_eq!(say(&mut c, b"2", 3).await, b"l:2");
            ok = true;
            break;
        }
    }
    assert!(ok, "slot never released");
}

#[tokio::test]
async fn dead_instance_is_routed_around() {
    let port = echo_backend([127, 0, 0, 7], "alive").await;
    let table = RoutingTable::new();
    table.upsert(instance("live", "app7", [127, 0, 0, 7], PortPolicy::default()));
    // Same port on an address where nothing listens.
    table.upsert(instance("dead", "app7", [127, 0, 0, 8], PortPolicy::default()));
    let gw = gateway(table, &[], |_| {}).await;
    for i in 0..10u8 {
        let mut c = tls_client(gw.addr, &format!("app7-{port}.{BASE}"), &gw.gw_ca, &[])
            .await
            .unwrap();
        assert_eq!(
            say(&mut c, &[b'a' + i], 7).await,
            [&b"alive:"[..], &[b'a' + i]].concat()
        );
    }
}

#[tokio::test]
async fn inbound_proxy_header_is_honoured() {
    let l = TcpListener::bind("127.0.0.9:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while got.len() < 64 {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let _ = tx.send(got);
    });
    let table = RoutingTable::new();
    table.upsert(instance(
        "i9",
        "app9",
        [127, 0, 0, 9],
        PortPolicy {
            ports: vec![(port, true)],
            restrict_mode: false,
        },
    ));
    let gw = gateway(table, &[], |c| {
        c.inbound_pp_enabled = true;
        c.pp_version = 1;
    })
    .await;
    // A load balancer in front announces the real client.
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 198.51.100.7 203.0.113.9 40000 443\r\n")
        .await
        .unwrap();
    let hello = {
        // Reuse rustls to produce a ClientHello for a passthrough name and forward it raw.
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = ServerName::try_from(format!("app9-{port}s.{BASE}")).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    };
    tcp.write_all(&hello).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx).await.unwrap().unwrap();
    let line = b"PROXY TCP4 198.51.100.7 203.0.113.9 40000 443\r\n";
    assert!(got.starts_with(line), "{:?}", String::from_utf8_lossy(&got));
    assert_eq!(&got[line.len()..line.len() + 1], &[22], "then the ClientHello");
}
