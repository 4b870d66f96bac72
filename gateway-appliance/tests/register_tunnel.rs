//! End to end across two network namespaces: a CVM with a simulated-TDX RA-TLS certificate calls
//! `RegisterCvm` on the gateway over the veth link, brings its tunnel up from the answer, and TCP
//! flows both ways through the gateway's boringtun device, whose peer the registration added.
//! Prerequisites and skipping as in `wg_netns.rs`.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use common::netns::{NetnsPair, STEP, echo_server, exercise_in, in_netns, prerequisites_missing};
use common::sim::{DOMAIN, INSTANCE_ID, booted_sim, client_cert, server_identity};
use dstack_gateway::attest::{RaTlsIdentity, rpc_router, server_config};
use dstack_gateway::config::{Cidr, GatewayConfig};
use dstack_gateway::registration::{AdmissionPolicy, Registrar, WgBackend};
use dstack_gateway::routing::RoutingTable;
use dstack_gateway::wg::client::ClientTunnel;
use dstack_gateway::wg::{DeviceConfig, WgDevice, generate_private_key, public_key_b64};
use dstack_ra_tls::{AttestationPolicy, AttestationVerifier};
use dstack_rpc::Client;
use dstack_rpc::gateway::{GatewayClient, RegisterCvmRequest};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

#[test]
fn registration_adds_peer_and_tunnel_carries_tcp() {
    if prerequisites_missing() {
        return;
    }
    let pair = NetnsPair::create('e');
    let sim = Arc::new(booted_sim());
    let gw_key = generate_private_key().unwrap();
    let (identity, ca) = server_identity();
    let pin = sim.root_pin();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();

    // Gateway namespace: boringtun device + RegisterCvm over RA-TLS on the veth address.
    let gw = in_netns(&pair.gw, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let toml = format!(
                "[core]\nrpc_domain = \"{DOMAIN}\"\n[core.wg]\nip = \"10.0.0.1/24\"\nendpoint = \
                 \"192.168.77.1:51820\"\npublic_key = \"{}\"\n[core.proxy]\nbase_domain = \"app.test\"\n",
                public_key_b64(&gw_key)
            );
            let cfg = Arc::new(GatewayConfig::from_toml(&toml).unwrap());
            let dev = Arc::new(
                WgDevice::start(DeviceConfig {
                    ifname: "wg-gw".into(),
                    private_key: gw_key,
                    listen: "0.0.0.0:51820".parse().unwrap(),
                    address: Cidr::v4(Ipv4Addr::new(10, 0, 0, 1), 24),
                    mtu: 1420,
                    routes: Vec::new(),
                })
                .await
                .unwrap(),
            );
            let verifier = Arc::new(AttestationVerifier::new(AttestationPolicy {
                allow_simulated: true,
                simulated_roots: vec![pin],
                ..Default::default()
            }));
            let table = RoutingTable::new();
            let registrar = Arc::new(Registrar::new(
                cfg,
                table.clone(),
                Box::new(RaTlsIdentity::new(verifier)),
                dev.clone(),
                AdmissionPolicy::default(),
            ));
            let listener = tokio::net::TcpListener::bind("192.168.77.1:8000").await.unwrap();
            let tls = server_config(identity, Vec::new()).unwrap();
            tokio::spawn(dstack_rpc::serve_tls(
                listener,
                tls,
                Arc::new(rpc_router(registrar)),
                std::future::pending(),
            ));
            let _echo = echo_server("10.0.0.1:7000".parse().unwrap());
            ready_tx.send(()).unwrap();
            let _ = tokio::time::timeout(Duration::from_secs(90), stop_rx).await;
            (table.instances(), dev.latest_handshakes())
        })
    });
    ready_rx.recv_timeout(STEP).unwrap();

    // CVM namespace: register with the attested certificate, then bring the tunnel up from the answer.
    let (cvm_ready_tx, cvm_ready_rx) = std::sync::mpsc::channel();
    let (cvm_stop_tx, cvm_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sim2 = sim.clone();
    let cvm = in_netns(&pair.cvm, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (cert, key) = client_cert(&sim2, |_| {});
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca).unwrap();
            let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(
                    vec![cert],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                )
                .unwrap();
            let client = Client::new("https://192.168.77.1:8000/prpc")
                .unwrap()
                .with_tls(Arc::new(tls))
                .with_server_name(DOMAIN)
                .unwrap();
            let wg_key = generate_private_key().unwrap();
            let resp = GatewayClient::new(client)
                .register_cvm(RegisterCvmRequest {
                    client_public_key: public_key_b64(&wg_key),
                    port_policy: None,
                })
                .await
                .unwrap();
            let tunnel = ClientTunnel::from_response(&resp, wg_key, "wg-cvm").unwrap();
            let client_ip = tunnel.device.address.addr;
            let dev = tunnel.start().await.unwrap();
            let _echo = echo_server(std::net::SocketAddr::new(client_ip.into(), 7001));
            cvm_ready_tx.send(client_ip).unwrap();
            let _ = tokio::time::timeout(Duration::from_secs(90), cvm_stop_rx).await;
            drop(dev);
        })
    });
    let client_ip = cvm_ready_rx.recv_timeout(STEP).unwrap();
    assert_eq!(
        client_ip,
        Ipv4Addr::new(10, 0, 0, 2),
        "first free address of 10.0.0.0/25"
    );

    let (c2g_rtt, c2g_mbs) = exercise_in(&pair.cvm, "10.0.0.1:7000").unwrap();
    let (g2c_rtt, g2c_mbs) = exercise_in(&pair.gw, "10.0.0.2:7001").unwrap();
    eprintln!(
        "registered tunnel: cvm→gw rtt {c2g_rtt:.0} µs, {c2g_mbs:.0} MB/s | gw→cvm rtt {g2c_rtt:.0} µs, {g2c_mbs:.0} MB/s"
    );
    let _ = (stop_tx.send(()), cvm_stop_tx.send(()));
    cvm.join().unwrap();
    let (instances, handshakes) = gw.join().unwrap();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].instance_id, hex::encode(INSTANCE_ID));
    assert!(
        handshakes.contains_key(&instances[0].public_key),
        "handshake with the registered key"
    );
    drop(pair);
}
