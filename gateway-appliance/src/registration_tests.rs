use super::*;

/// Test identity: `x-test-identity: <app>:<instance>`; absent header = unattested.
struct HeaderIdentity;
impl IdentityProvider for HeaderIdentity {
    fn identify<'a>(&'a self, ctx: &'a CallContext) -> BoxFuture<'a, Result<PeerIdentity, IdentityError>> {
        Box::pin(async move {
            let v = ctx
                .headers
                .get("x-test-identity")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| IdentityError("no attestation provided".into()))?;
            let (app, inst) = v.split_once(':').ok_or_else(|| IdentityError("bad".into()))?;
            Ok(PeerIdentity {
                app_id: app.into(),
                instance_id: inst.into(),
                compose_hash: None,
            })
        })
    }
}

#[derive(Default)]
struct RecordingWg {
    peers: Mutex<Vec<WgPeer>>,
    handshakes: Mutex<HashMap<String, SystemTime>>,
}
impl WgBackend for RecordingWg {
    fn set_peers(&self, peers: &[WgPeer]) -> Result<(), WgError> {
        *self.peers.lock().unwrap() = peers.to_vec();
        Ok(())
    }
    fn latest_handshakes(&self) -> HashMap<String, SystemTime> {
        self.handshakes.lock().unwrap().clone()
    }
}

fn ctx(identity: Option<&str>) -> CallContext {
    let mut c = CallContext::local();
    if let Some(i) = identity {
        c.headers.insert("x-test-identity", i.parse().unwrap());
    }
    c
}

fn key(n: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([n; 32])
}

fn setup(toml: &str, policy: AdmissionPolicy) -> (Registrar, Arc<RecordingWg>, RoutingTable) {
    let cfg = Arc::new(GatewayConfig::from_toml(toml).unwrap());
    let wg = Arc::new(RecordingWg::default());
    let table = RoutingTable::new();
    let r = Registrar::new(cfg, table.clone(), Box::new(HeaderIdentity), wg.clone(), policy);
    (r, wg, table)
}

fn req(k: &str) -> RegisterCvmRequest {
    RegisterCvmRequest {
        client_public_key: k.into(),
        port_policy: None,
    }
}

#[test]
fn allocation_rules() {
    let range: Cidr = "10.0.0.0/29".parse().unwrap();
    let reserved: Vec<Cidr> = vec!["10.0.0.1/32".parse().unwrap(), "10.0.0.4/31".parse().unwrap()];
    let mut taken = HashMap::new();
    // .0 network, .1 reserved → .2 first.
    assert_eq!(
        allocate_ip(range, &reserved, &taken, "a"),
        Some(Ipv4Addr::new(10, 0, 0, 2))
    );
    taken.insert(Ipv4Addr::new(10, 0, 0, 2), "a".to_owned());
    assert_eq!(
        allocate_ip(range, &reserved, &taken, "a"),
        Some(Ipv4Addr::new(10, 0, 0, 2)),
        "stable"
    );
    assert_eq!(
        allocate_ip(range, &reserved, &taken, "b"),
        Some(Ipv4Addr::new(10, 0, 0, 3))
    );
    taken.insert(Ipv4Addr::new(10, 0, 0, 3), "b".to_owned());
    // .4/.5 reserved, .7 broadcast.
    assert_eq!(
        allocate_ip(range, &reserved, &taken, "c"),
        Some(Ipv4Addr::new(10, 0, 0, 6))
    );
    taken.insert(Ipv4Addr::new(10, 0, 0, 6), "c".to_owned());
    assert_eq!(allocate_ip(range, &reserved, &taken, "d"), None, "exhausted");
    // A previous address that is now reserved is not kept.
    let mut t2 = HashMap::new();
    t2.insert(Ipv4Addr::new(10, 0, 0, 1), "x".to_owned());
    assert_eq!(
        allocate_ip(range, &reserved, &t2, "x"),
        Some(Ipv4Addr::new(10, 0, 0, 2))
    );
}

#[tokio::test]
async fn register_assigns_stable_ips_and_pushes_peers() {
    let toml = "[core]\nrpc_domain = \"gw.test\"\n[core.wg]\npublic_key = \"GWKEY\"\nendpoint = \"198.51.100.1:51820\"\n[core.proxy]\nbase_domain = \"apps.test\"";
    let (r, wg, table) = setup(toml, AdmissionPolicy::default());
    let a = r.register(&ctx(Some("app1:inst1")), req(&key(1))).await.unwrap();
    let wgc = a.wg.unwrap();
    // Default range 10.0.0.0/25; .0 is the network, .1 the gateway: first CVM gets .2.
    assert_eq!(wgc.client_ip, "10.0.0.2");
    assert_eq!(wgc.servers[0].pk, "GWKEY");
    assert_eq!(wgc.servers[0].ip, "10.0.0.1");
    assert_eq!(wgc.servers[0].endpoint, "198.51.100.1:51820");
    let agent = a.agent.unwrap();
    assert_eq!(
        (agent.domain.as_str(), agent.external_port, agent.internal_port),
        ("apps.test", 443, 8090)
    );
    assert_eq!(a.gateways[0].url, "https://gw.test");

    let b = r.register(&ctx(Some("app1:inst2")), req(&key(2))).await.unwrap();
    assert_eq!(b.wg.unwrap().client_ip, "10.0.0.3");
    // Re-registration (new key after reboot) keeps the address.
    let again = r.register(&ctx(Some("app1:inst1")), req(&key(9))).await.unwrap();
    assert_eq!(again.wg.unwrap().client_ip, "10.0.0.2");
    let peers = wg.peers.lock().unwrap().clone();
    assert_eq!(peers.len(), 2);
    assert!(peers.contains(&WgPeer {
        public_key: key(9),
        ip: Ipv4Addr::new(10, 0, 0, 2)
    }));
    assert_eq!(table.get("inst2").unwrap().app_id, "app1");
}

#[tokio::test]
async fn refusals() {
    let policy = AdmissionPolicy {
        allowed_apps: Some(vec!["goodapp".into()]),
    };
    let (r, wg, _) = setup("", policy);
    assert!(matches!(
        r.register(&ctx(None), req(&key(1))).await,
        Err(RegisterError::Identity(_))
    ));
    assert!(matches!(
        r.register(&ctx(Some("evil:i")), req(&key(1))).await,
        Err(RegisterError::NotAllowed(_))
    ));
    for bad in ["", "not base64!", "AAAA"] {
        assert!(
            matches!(
                r.register(&ctx(Some("goodapp:i")), req(bad)).await,
                Err(RegisterError::BadKey(_))
            ),
            "{bad}"
        );
    }
    r.register(&ctx(Some("goodapp:i1")), req(&key(5))).await.unwrap();
    assert!(matches!(
        r.register(&ctx(Some("goodapp:i2")), req(&key(5))).await,
        Err(RegisterError::KeyInUse)
    ));
    assert_eq!(wg.peers.lock().unwrap().len(), 1);
    // Through the pRPC trait the refusal is a handler error naming the cause.
    let e = GatewayRpc::register_cvm(&r, &ctx(None), req(&key(1)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no attestation provided"), "{e}");
}

#[tokio::test]
async fn pool_exhaustion_and_recycling() {
    let toml = "[core.wg]\nip = \"10.1.0.1/24\"\nclient_ip_range = \"10.1.0.0/30\"\nreserved_net = []\n[core.recycle]\ntimeout = \"1h\"";
    let (r, wg, table) = setup(toml, AdmissionPolicy::default());
    // /30: .0 network, .3 broadcast, .1 gateway → only .2.
    let a = r.register(&ctx(Some("app:a")), req(&key(1))).await.unwrap();
    assert_eq!(a.wg.unwrap().client_ip, "10.1.0.2");
    assert!(matches!(
        r.register(&ctx(Some("app:b")), req(&key(2))).await,
        Err(RegisterError::PoolExhausted(_))
    ));
    // Recent handshake keeps it; silence beyond the timeout frees the address.
    let now = SystemTime::now();
    wg.handshakes.lock().unwrap().insert(key(1), now);
    assert!(
        r.recycle(now + std::time::Duration::from_secs(1800))
            .unwrap()
            .is_empty()
    );
    let gone = r.recycle(now + std::time::Duration::from_secs(7200)).unwrap();
    assert_eq!(gone.len(), 1);
    assert!(table.get("a").is_none());
    assert!(wg.peers.lock().unwrap().is_empty());
    let b = r.register(&ctx(Some("app:b")), req(&key(2))).await.unwrap();
    assert_eq!(b.wg.unwrap().client_ip, "10.1.0.2");
}

#[test]
fn wg_conf_layout() {
    let conf = render_wg_conf(
        "PRIV",
        51820,
        &[WgPeer {
            public_key: "PUB".into(),
            ip: Ipv4Addr::new(10, 0, 0, 2),
        }],
    );
    assert_eq!(
        conf,
        "[Interface]\nPrivateKey = PRIV\nListenPort = 51820\n\n[Peer]\nPublicKey = PUB\nAllowedIPs = 10.0.0.2/32\nPersistentKeepalive = 25\n"
    );
}

/// The webhook sits after the allowlist: a refusal (or no answer) registers nothing; a 2xx does.
#[tokio::test]
async fn webhook_gates_registration_and_fails_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers 200 for app "ok", 403 otherwise, and never answers app "slow".
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 2048];
                while !got.ends_with(b"}") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&got);
                if req.contains("\"app_id\":\"slow\"") {
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                }
                let status = if req.contains("\"app_id\":\"ok\"") {
                    "200 OK"
                } else {
                    "403 Forbidden"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            });
        }
    });
    let toml = format!("[core.auth]\nenabled = true\nurl = \"http://{addr}/auth\"\ntimeout = \"500ms\"");
    let cfg = Arc::new(GatewayConfig::from_toml(&toml).unwrap());
    let hook = AuthWebhook::from_config(&cfg.core.auth).unwrap();
    let wg = Arc::new(RecordingWg::default());
    let table = RoutingTable::new();
    let r = Registrar::new(
        cfg,
        table.clone(),
        Box::new(HeaderIdentity),
        wg.clone(),
        AdmissionPolicy::default(),
    )
    .with_webhook(hook);

    let e = r.register(&ctx(Some("bad:01")), req(&key(1))).await.unwrap_err();
    assert!(
        matches!(e, RegisterError::Webhook(WebhookError::Status { status: 403, .. })),
        "{e}"
    );
    let e = r.register(&ctx(Some("slow:02")), req(&key(2))).await.unwrap_err();
    assert!(matches!(e, RegisterError::Webhook(WebhookError::Timeout(_))), "{e}");
    assert!(table.instances().is_empty() && wg.peers.lock().unwrap().is_empty());
    r.register(&ctx(Some("ok:03")), req(&key(3))).await.unwrap();
    assert_eq!(table.instances().len(), 1);
    assert_eq!(wg.peers.lock().unwrap().len(), 1);
}
