//! Gateway cluster nodes in one process, syncing over mutually attested RA-TLS between simulated TDs: what the
//! sync and fault-kill tests share (node config, registrar, sync server and syncer, certificates).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dstack_gateway::attest::{RaTlsIdentity, ServerIdentity, rpc_router_with_sync, server_config};
use dstack_gateway::registration::{Registrar, WgBackend, WgError, WgPeer};
use dstack_gateway::sync::{SameAppServerVerifier, SyncService, Syncer, client_tls};
use dstack_ra_tls::{AttestationVerifier, CertAttestation, CertRequest, ra_tls_report_data};
use dstack_sim_tdx::{SimTdx, fixture};
use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::task::JoinHandle;

/// The gateway app every node attests as.
pub const GW_APP: [u8; 20] = [0x9a; 20];

/// A WireGuard backend that records the peer set it is given.
#[derive(Default)]
pub struct RecordingWg(pub Mutex<Vec<WgPeer>>);

impl WgBackend for RecordingWg {
    fn set_peers(&self, peers: &[WgPeer]) -> Result<(), WgError> {
        *self.0.lock().unwrap() = peers.to_vec();
        Ok(())
    }
    fn latest_handshakes(&self) -> HashMap<String, SystemTime> {
        HashMap::new()
    }
}

/// A booted simulated TD measured as instance `instance` of `app`.
pub fn sim(app: &[u8; 20], instance: u8) -> SimTdx {
    let s = fixture::booted(0x11, 0x50).unwrap();
    fixture::measure_dstack_boot(&s, app, &[0xc0; 32], &[instance; 20]).unwrap();
    s
}

/// A self-signed RA-TLS certificate (server and client use) quoted by `sim`: DER, PEM and key.
pub fn ra_cert(sim: &SimTdx, subject: &str) -> (CertificateDer<'static>, String, KeyPair) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let rd = ra_tls_report_data(&key.subject_public_key_info());
    let req = CertRequest {
        subject: subject.into(),
        alt_names: vec!["127.0.0.1".into()],
        usage_server_auth: true,
        usage_client_auth: true,
        attestation: Some(CertAttestation {
            quote: sim.quote(&rd).unwrap(),
            event_log: sim.full_event_log(),
        }),
        ..Default::default()
    };
    let cert = req.self_signed(&key).unwrap();
    (cert.der().clone(), cert.pem(), key)
}

pub fn pkcs8(k: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.serialize_der()))
}

/// A WireGuard public key (base64 of 32 bytes `n`).
pub fn wg_key(n: u8) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([n; 32])
}

/// `gateway.toml` of node `id` serving at `url`, joining through `bootnodes`; `core_extra` goes into `[core]`.
pub fn node_toml(id: u32, url: &str, bootnodes: &[&str], base_domain: &str, core_extra: &str) -> String {
    let boot: Vec<String> = bootnodes.iter().map(|b| format!("{b:?}")).collect();
    format!(
        "[core]\nrpc_domain = \"gw{id}.test\"\n{core_extra}\
         [core.wg]\npublic_key = \"{pk}\"\nip = \"10.0.0.{ip}/24\"\nendpoint = \"192.0.2.{id}:51820\"\n\
         [core.proxy]\nbase_domain = \"{base_domain}\"\n\
         [core.sync]\nenabled = true\nnode_id = {id}\nmy_url = \"{url}\"\nbootnodes = [{boot}]\n\
         interval = \"300ms\"\ntimeout = \"2s\"\nnode_timeout = \"3s\"\ngateway_app_id = \"{app}\"\n",
        pk = wg_key(200 + id as u8),
        ip = 128 + id,
        boot = boot.join(", "),
        app = hex::encode(GW_APP),
    )
}

/// Serves registration and `GatewaySync` for `registrar` on `listener` with the node's RA-TLS certificate, and
/// runs its syncer (peers verified as [`GW_APP`]); returns the server and syncer tasks.
pub fn serve_node(
    registrar: &Arc<Registrar>,
    verifier: Arc<AttestationVerifier>,
    cert: CertificateDer<'static>,
    key: &KeyPair,
    listener: tokio::net::TcpListener,
) -> [JoinHandle<()>; 2] {
    let sync = SyncService::new(
        registrar.clone(),
        Box::new(RaTlsIdentity::new(verifier.clone())),
        &hex::encode(GW_APP),
    )
    .unwrap();
    let tls = server_config(
        ServerIdentity {
            chain: vec![cert.clone()],
            key: pkcs8(key),
        },
        Vec::new(),
    )
    .unwrap();
    let router = Arc::new(rpc_router_with_sync(registrar.clone(), sync));
    let server = tokio::spawn(async move {
        let _ = dstack_rpc::serve_tls(listener, tls, router, std::future::pending()).await;
    });
    let peer_verifier = SameAppServerVerifier::new(verifier, Vec::new(), &hex::encode(GW_APP)).unwrap();
    let syncer = Syncer::new(
        registrar.clone(),
        client_tls(peer_verifier, vec![cert], pkcs8(key)).unwrap(),
    );
    let sync_task = tokio::spawn(syncer.run(Duration::from_millis(300)));
    [server, sync_task]
}
