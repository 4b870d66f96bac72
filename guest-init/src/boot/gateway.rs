//! Step 8 (DESIGN.md §3, §7; dstack-facts §6 "Registration flow"): register with a gateway and bring up the
//! WireGuard tunnel through which it reaches the app's ports.
//!
//! When app-compose has `gateway_enabled` (or a legacy alias) and sys-config lists `gateway_urls`:
//! 1. a fresh X25519 key pair for WireGuard;
//! 2. a fresh P-256 key with a self-signed RA-TLS client certificate (our quote binding the key, and the event
//!    log so far): the gateway identifies the CVM by the app and instance ids it replays from that log;
//! 3. for each URL in order, the first that answers: mutual TLS to `<url>/prpc`, the server certificate
//!    verified by [`GatewayServerVerifier`] (chains to the KMS root CA of our app keys and carries the app id
//!    the KMS named as `gateway_app_id`, unless that is `any`), then
//!    `RegisterCvm{client_public_key, port_policy}`;
//! 4. the interface [`IFNAME`]: address `<client_ip>/32`, one peer per gateway server (`AllowedIPs =
//!    <server ip>/32`, its endpoint, keepalive 25 s), listen port 9182, a `/32` route per server.
//!
//! Data plane: userspace WireGuard (boringtun, `crates/wg`) on a tun device, running as tasks of PID 1's
//! tokio runtime. The guest kernel's own WireGuard would be leaner, but the build and test hosts' kernels
//! lack the module, so it could not be tested here; this one is the engine the gateway itself runs and is
//! tested against wireguard-go. The tun device is addressed over rtnetlink ([`crate::net::netlink`]): the
//! initramfs has no iproute2. The guest kernel needs `tun` (a module in Debian's kernels).
//!
//! After the boot's registration, [`refresh`] keeps it fresh in the background: periodic re-registration on
//! the same WireGuard key (fail-over over the URL list), at once when the tunnel goes silent (a restarted
//! gateway that lost its peer table), and live peer updates when the gateway's servers or keys change.
//!
//! Not done (dstack does): the iptables rule admitting UDP 9182 only from the gateways' endpoints
//! (WireGuard already drops unauthenticated datagrams).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dstack_ra_tls::{CertAttestation, CertRequest, parse_cert};
use dstack_rpc::Client;
use dstack_rpc::gateway::{GatewayClient, PortAttrs, PortPolicy, RegisterCvmRequest, RegisterCvmResponse};
use dstack_tee::RuntimeEventLog;
use dstack_types::{AppCompose, AppKeys, SysConfig};
use dstack_wg::{ClientTunnel, DeviceConfig, Tun, WgError};
use rcgen::{KeyPair, PublicKeyData};
use rustls::Error as TlsError;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::kms::{KmsRootChain, other_err, provider};
use super::tee::TeeMeasurer;
use super::{BootEnv, BootReport};
use crate::net::netlink::Netlink;

#[path = "gateway_refresh.rs"]
pub mod refresh;
pub use refresh::RefreshPolicy;
use refresh::{Refresher, Running, Shared};

/// The tunnel interface (dstack's name).
pub const IFNAME: &str = "dstack-wg0";
/// Tunnel MTU (as wg-quick's default on a 1500-byte link).
pub const MTU: u16 = 1420;
/// Where a summary of the registration is written (no secrets), for the guest API and debugging.
pub const STATUS_FILE: &str = "run/dstack/gateway.json";
/// Subject of the client certificate (dstack's).
const CLIENT_CERT_SUBJECT: &str = "dstack-guest-agent";

/// Errors of the gateway step.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration does not allow an authenticated registration.
    #[error("gateway: {0}")]
    Config(String),
    /// The RA-TLS client identity could not be made.
    #[error("gateway client certificate: {0}")]
    Identity(String),
    /// No gateway accepted the registration.
    #[error("gateway registration failed at every gateway: {0}")]
    Register(String),
    /// The tunnel could not be brought up.
    #[error("gateway tunnel: {0}")]
    Tunnel(String),
}

/// What to register with, derived from the app's configuration and keys.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayPlan {
    pub urls: Vec<String>,
    /// KMS root CA (PEM): the gateway's certificate must chain to it.
    pub kms_root_pem: String,
    /// The app id the gateway's certificate must carry; `None` = any app (`gateway_app_id: "any"`).
    pub gateway_app_id: Option<Vec<u8>>,
    pub port_policy: Option<PortPolicy>,
}

/// app-compose's `port_policy` as the RPC carries it (absent when the app sets none).
pub fn port_policy(compose: &AppCompose) -> Option<PortPolicy> {
    let p = compose.port_policy.as_ref()?;
    Some(PortPolicy {
        ports: p
            .ports
            .iter()
            .flatten()
            .map(|a| PortAttrs {
                port: u32::from(a.port),
                pp: a.pp.unwrap_or(false),
            })
            .collect(),
        restrict_mode: p.restrict_mode.unwrap_or(false),
    })
}

/// `Ok(None)`: the app does not use a gateway (or the host named none). Fails closed when the gateway could
/// not be authenticated: no KMS root CA in the keys, or no gateway app named by the KMS.
pub fn plan(compose: &AppCompose, sys: &SysConfig, keys: &AppKeys) -> Result<Option<GatewayPlan>, GatewayError> {
    if !compose.gateway_enabled() {
        return Ok(None);
    }
    if sys.gateway_urls.is_empty() {
        tracing::warn!("gateway_enabled, but sys-config lists no gateway_urls: not registering");
        return Ok(None);
    }
    if keys.ca_cert.trim().is_empty() {
        return Err(GatewayError::Config(
            "gateway_enabled needs KMS keys: the gateway's certificate is verified against the KMS root CA, \
             and these keys carry none"
                .into(),
        ));
    }
    let id = keys.gateway_app_id.trim();
    let gateway_app_id = if id.eq_ignore_ascii_case("any") {
        tracing::warn!("KMS gateway_app_id is \"any\": any app certified by the KMS is accepted as gateway");
        None
    } else {
        let hex_id = id.strip_prefix("0x").unwrap_or(id);
        if hex_id.is_empty() {
            return Err(GatewayError::Config(
                "the KMS named no gateway app (gateway_app_id is empty): set it, or \"any\", in the KMS policy".into(),
            ));
        }
        Some(hex::decode(hex_id).map_err(|e| GatewayError::Config(format!("gateway_app_id {id:?}: {e}")))?)
    };
    Ok(Some(GatewayPlan {
        urls: sys.gateway_urls.clone(),
        kms_root_pem: keys.ca_cert.clone(),
        gateway_app_id,
        port_policy: port_policy(compose),
    }))
}

/// Verifies a gateway's RPC certificate: chain to the KMS root CA and (unless any app is accepted) the
/// leaf's app-id extension equal to `gateway_app_id`, as dstack's guest. The host name is not checked
/// ([`KmsRootChain`]): the identity is the KMS's certification of the gateway app.
#[derive(Debug)]
pub struct GatewayServerVerifier {
    chain: KmsRootChain,
    app_id: Option<Vec<u8>>,
    provider: Arc<CryptoProvider>,
}

impl GatewayServerVerifier {
    pub fn new(kms_root_pem: &str, app_id: Option<Vec<u8>>) -> Result<Arc<Self>, GatewayError> {
        let root = CertificateDer::from_pem_slice(kms_root_pem.as_bytes())
            .map_err(|e| GatewayError::Config(format!("KMS root CA: {e}")))?;
        let provider = provider();
        Ok(Arc::new(Self {
            chain: KmsRootChain::new(root, &provider).map_err(GatewayError::Config)?,
            app_id,
            provider,
        }))
    }
}

impl ServerCertVerifier for GatewayServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        self.chain.verify(end_entity, intermediates, server_name, ocsp, now)?;
        if let Some(want) = &self.app_id {
            let parsed = parse_cert(end_entity).map_err(|e| other_err(format!("gateway certificate: {e}")))?;
            if parsed.app_id.as_deref() != Some(want.as_slice()) {
                return Err(other_err(format!(
                    "gateway certificate app id is {}, expected {}",
                    parsed
                        .app_id
                        .as_deref()
                        .map_or_else(|| "absent".to_owned(), hex::encode),
                    hex::encode(want)
                )));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    dstack_ra_tls::handshake_signatures_from_provider!(provider);
}

/// A fresh key and its self-signed RA-TLS client certificate (quote over `SHA-512("ratls-cert:" ‖ SPKI)`,
/// event log so far). Self-signed: a gateway accepts a client certificate on the strength of its quote.
pub async fn client_identity(log: &RuntimeEventLog) -> Result<(CertificateDer<'static>, KeyPair), GatewayError> {
    let id_err = |e: String| GatewayError::Identity(e);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| id_err(e.to_string()))?;
    let rd = dstack_ra_tls::ra_tls_report_data(&key.subject_public_key_info());
    let quote = log.tee().quote(rd).await.map_err(|e| id_err(format!("quote: {e}")))?;
    let event_log = log
        .full_event_log()
        .await
        .map_err(|e| id_err(format!("event log: {e}")))?;
    let req = CertRequest {
        subject: CLIENT_CERT_SUBJECT.into(),
        usage_client_auth: true,
        attestation: Some(CertAttestation { quote, event_log }),
        ..Default::default()
    };
    let cert = req.self_signed(&key).map_err(|e| id_err(e.to_string()))?;
    Ok((cert.der().clone(), key))
}

/// The mutual-TLS configuration for `RegisterCvm`.
pub fn client_tls(
    plan: &GatewayPlan,
    cert: CertificateDer<'static>,
    key: &KeyPair,
) -> Result<Arc<rustls::ClientConfig>, GatewayError> {
    let verifier = GatewayServerVerifier::new(&plan.kms_root_pem, plan.gateway_app_id.clone())?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| GatewayError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(
            vec![cert],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .map_err(|e| GatewayError::Identity(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// `RegisterCvm` at each URL in order; the first answer that describes a usable tunnel wins.
pub async fn register_first(
    plan: &GatewayPlan,
    tls: Arc<rustls::ClientConfig>,
    wg_public_key: &str,
) -> Result<(String, RegisterCvmResponse), GatewayError> {
    let mut failures = Vec::new();
    for url in &plan.urls {
        tracing::info!("registering with gateway {url}");
        match register_one(url, Arc::clone(&tls), plan, wg_public_key).await {
            Ok(r) => return Ok((url.clone(), r)),
            Err(e) => {
                tracing::warn!("gateway {url}: {e}");
                failures.push(format!("{url}: {e}"));
            }
        }
    }
    Err(GatewayError::Register(failures.join("; ")))
}

async fn register_one(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
    plan: &GatewayPlan,
    wg_public_key: &str,
) -> Result<RegisterCvmResponse, String> {
    let client = Client::new(&super::kms::prpc_url(url))
        .map_err(|e| e.to_string())?
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(10))
        .with_timeout(Duration::from_secs(30))
        .with_max_response_bytes(1 << 20);
    let resp = GatewayClient::new(client)
        .register_cvm(RegisterCvmRequest {
            client_public_key: wg_public_key.to_owned(),
            port_policy: plan.port_policy.clone(),
        })
        .await
        .map_err(|e| format!("RegisterCvm: {e}"))?;
    // Checked here so that a malformed answer moves on to the next gateway.
    ClientTunnel::from_response(&resp, [0; 32], IFNAME).map_err(|e| format!("RegisterCvm answer: {e}"))?;
    Ok(resp)
}

/// Address `tun` over rtnetlink: `<client_ip>/32`, MTU, up, a `/32` route per gateway server.
pub fn address_interface(tun: &Tun, cfg: &DeviceConfig) -> Result<(), WgError> {
    let err = |what: &str, e: &dyn std::fmt::Display| WgError(format!("{} {what}: {e}", tun.name()));
    let (mut nl, index) = open_link(tun.name())?;
    nl.add_address(index, cfg.address.addr, cfg.address.prefix, None)
        .map_err(|e| err("address", &e))?;
    nl.set_link_up(index, Some(u32::from(cfg.mtu)))
        .map_err(|e| err("link up", &e))?;
    routes(&mut nl, tun.name(), index, cfg)
}

/// The `/32` routes to the gateway servers of `cfg` on the existing interface `ifname` (added or replaced:
/// a refresh that learns of new servers calls it again).
pub fn add_server_routes(ifname: &str, cfg: &DeviceConfig) -> Result<(), WgError> {
    let (mut nl, index) = open_link(ifname)?;
    routes(&mut nl, ifname, index, cfg)
}

fn open_link(ifname: &str) -> Result<(Netlink, u32), WgError> {
    let err = |what: &str, e: &dyn std::fmt::Display| WgError(format!("{ifname} {what}: {e}"));
    let mut nl = Netlink::open().map_err(|e| err("netlink", &e))?;
    let index = nl
        .links()
        .map_err(|e| err("listing links", &e))?
        .into_iter()
        .find(|l| l.name == ifname)
        .ok_or_else(|| WgError(format!("{ifname}: interface not found")))?
        .index;
    Ok((nl, index))
}

fn routes(nl: &mut Netlink, ifname: &str, index: u32, cfg: &DeviceConfig) -> Result<(), WgError> {
    for r in &cfg.routes {
        // Routes inside the interface's own prefix exist already (the kernel adds the subnet route).
        if cfg.address.prefix <= r.prefix && cfg.address.contains(r.addr) {
            continue;
        }
        nl.add_route(r.network(), r.prefix, None, index, Some(cfg.address.addr))
            .map_err(|e| WgError(format!("{ifname} route {r}: {e}")))?;
    }
    Ok(())
}

fn link_present(ifname: &str) -> bool {
    let present = Netlink::open()
        .and_then(|mut nl| nl.links())
        .map(|links| links.iter().any(|l| l.name == ifname));
    matches!(present, Ok(true))
}

/// Waits (up to `limit`) until a dropped tunnel's interface is gone, so its name and UDP port can be reused.
async fn wait_link_gone(ifname: &str, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while link_present(ifname) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One gateway server as the registration answer lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GatewayServer {
    /// WireGuard public key (base64).
    pub public_key: String,
    /// Its tunnel address.
    pub ip: String,
    /// Its UDP endpoint.
    pub endpoint: String,
}

/// What registration established (no secrets; written to [`STATUS_FILE`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Registration {
    /// The gateway that answered.
    pub url: String,
    pub interface: String,
    pub client_ip: Ipv4Addr,
    /// Our WireGuard public key (base64).
    pub public_key: String,
    /// The gateway servers (WireGuard peers).
    pub servers: Vec<GatewayServer>,
    /// The app domain the gateway announced (empty if none).
    pub domain: String,
    /// The gateway's public port and the guest agent's port it forwards to.
    pub external_port: u32,
    pub agent_port: u32,
}

impl Registration {
    fn new(url: String, resp: &RegisterCvmResponse, client_ip: Ipv4Addr, public_key: String) -> Self {
        let agent = resp.agent.clone().unwrap_or_default();
        Self {
            url,
            interface: IFNAME.to_owned(),
            client_ip,
            public_key,
            servers: resp
                .wg
                .iter()
                .flat_map(|w| &w.servers)
                .map(|s| GatewayServer {
                    public_key: s.pk.clone(),
                    ip: s.ip.clone(),
                    endpoint: s.endpoint.clone(),
                })
                .collect(),
            domain: agent.domain,
            external_port: agent.external_port,
            agent_port: agent.internal_port,
        }
    }
}

/// Registers, keeps the tunnel running and the registration fresh ([`refresh`]); owned by PID 1's backends for
/// the system's lifetime.
pub struct Gateway {
    measurer: Arc<TeeMeasurer>,
    rt: Handle,
    ifname: String,
    /// Passes over the URL list before giving up (a gateway may still be starting).
    attempts: u32,
    /// `None`: register once, never refresh.
    refresh: Option<RefreshPolicy>,
    shared: Shared,
    refresher: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("ifname", &self.ifname)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// `rt` must be a multi-thread runtime: the tunnel's tasks keep running on it after [`Gateway::setup`].
    pub fn new(measurer: Arc<TeeMeasurer>, rt: Handle) -> Self {
        Self::with_interface(measurer, rt, IFNAME)
    }

    /// Another interface name (tests).
    pub fn with_interface(measurer: Arc<TeeMeasurer>, rt: Handle, ifname: &str) -> Self {
        Self {
            measurer,
            rt,
            ifname: ifname.to_owned(),
            attempts: 3,
            refresh: Some(RefreshPolicy::default()),
            shared: Shared::default(),
            refresher: Mutex::new(None),
        }
    }

    /// Passes over the URL list (default 3, with 2 s and 4 s pauses between them).
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// How the registration is kept fresh (default [`RefreshPolicy::default`]; `None`: never refreshed).
    pub fn with_refresh(mut self, policy: Option<RefreshPolicy>) -> Self {
        self.refresh = policy;
        self
    }

    /// Step 8 of the boot: [`plan`] from the report, then [`Gateway::start`]; `Ok(None)` when the app does not
    /// use a gateway. Blocking (the boot thread is not a runtime thread).
    pub fn setup(&self, env: &BootEnv, report: &BootReport) -> Result<Option<Registration>, GatewayError> {
        let shared = &report.shared;
        let Some(plan) = plan(&shared.compose, &shared.sys_config, &report.keys)? else {
            return Ok(None);
        };
        let reg = self.start_inner(&plan, Some(env.root.clone()))?;
        write_status(&env.root, &reg);
        Ok(Some(reg))
    }

    /// Register per `plan` and bring the tunnel up (replacing a previous one), then keep the registration
    /// fresh in the background. Blocking.
    pub fn start(&self, plan: &GatewayPlan) -> Result<Registration, GatewayError> {
        self.start_inner(plan, None)
    }

    fn start_inner(&self, plan: &GatewayPlan, status_root: Option<PathBuf>) -> Result<Registration, GatewayError> {
        let log = self
            .measurer
            .event_log()
            .ok_or_else(|| GatewayError::Identity("no runtime events measured yet".into()))?;
        self.stop();
        let ifname = self.ifname.clone();
        let attempts = self.attempts;
        let (reg, running, tls, wg_key) = self.rt.block_on(async move {
            let (cert, key) = client_identity(&log).await?;
            let tls = client_tls(plan, cert, &key)?;
            let wg_key = zeroize::Zeroizing::new(
                dstack_wg::generate_private_key().map_err(|e| GatewayError::Tunnel(e.to_string()))?,
            );
            let public_key = dstack_wg::public_key_b64(&wg_key);
            let mut pass = 1;
            let (url, resp) = loop {
                match register_first(plan, Arc::clone(&tls), &public_key).await {
                    Ok(r) => break r,
                    Err(e) if pass >= attempts => return Err(e),
                    Err(e) => {
                        let pause = Duration::from_secs(2 << (pass - 1).min(4));
                        tracing::warn!("{e}; trying again in {pause:?}");
                        tokio::time::sleep(pause).await;
                        pass += 1;
                    }
                }
            };
            let tunnel = ClientTunnel::from_response(&resp, *wg_key, &ifname)
                .map_err(|e| GatewayError::Tunnel(e.to_string()))?;
            let client_ip = tunnel.device.address.addr;
            let peers = tunnel.peers.clone();
            let dev = tunnel
                .start_with(address_interface)
                .await
                .map_err(|e| GatewayError::Tunnel(e.to_string()))?;
            let reg = Registration::new(url, &resp, client_ip, public_key);
            let running = Running {
                reg: reg.clone(),
                dev,
                peers,
            };
            Ok::<_, GatewayError>((reg, running, tls, wg_key))
        })?;
        tracing::info!(
            "gateway {}: tunnel {} up as {}, {} server(s), domain {:?}",
            reg.url,
            reg.interface,
            reg.client_ip,
            reg.servers.len(),
            reg.domain
        );
        let epoch = {
            let mut slot = refresh::lock(&self.shared);
            slot.running = Some(running);
            slot.epoch
        };
        if let Some(policy) = &self.refresh {
            let task = Refresher {
                plan: plan.clone(),
                measurer: Arc::clone(&self.measurer),
                tls,
                wg_key,
                public_key: reg.public_key.clone(),
                ifname: self.ifname.clone(),
                shared: Arc::clone(&self.shared),
                epoch,
                status_root,
                policy: policy.clone(),
            };
            let handle = self.rt.spawn(task.run());
            *self.refresher.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        }
        Ok(reg)
    }

    /// The current registration (updated by every refresh).
    pub fn registration(&self) -> Option<Registration> {
        refresh::lock(&self.shared).running.as_ref().map(|r| r.reg.clone())
    }

    /// Time since the latest handshake with each gateway server, by public key.
    pub fn handshake_ages(&self) -> Vec<(String, Option<Duration>)> {
        let slot = refresh::lock(&self.shared);
        slot.running.as_ref().map_or_else(Vec::new, |r| {
            r.dev
                .peer_status()
                .into_iter()
                .map(|s| {
                    let age = s.latest_handshake.and_then(|t| t.elapsed().ok());
                    (s.public_key, age)
                })
                .collect()
        })
    }

    /// Stop refreshing and the tunnel, and wait (up to 2 s) for the interface to go away.
    pub fn stop(&self) {
        if let Some(task) = self.refresher.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
        let old = {
            let mut slot = refresh::lock(&self.shared);
            // A refresher still finishing an attempt sees the new epoch and installs nothing.
            slot.epoch += 1;
            slot.running.take()
        };
        if old.is_none() {
            return;
        }
        // Dropping the device aborts its tasks; the tun descriptor (and so the interface) goes when the
        // runtime drops them.
        drop(old);
        for _ in 0..40 {
            if !link_present(&self.ifname) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::warn!("{} still present after stopping the tunnel", self.ifname);
    }
}

fn write_status(root: &Path, reg: &Registration) {
    let path = root.join(STATUS_FILE);
    let res = serde_json::to_vec_pretty(reg)
        .map_err(|e| e.to_string())
        .and_then(|json| {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
            }
            std::fs::write(&path, json).map_err(|e| e.to_string())
        });
    if let Err(e) = res {
        tracing::warn!("writing {}: {e}", path.display());
    }
}

#[cfg(test)]
#[path = "gateway_tests.rs"]
mod tests;
