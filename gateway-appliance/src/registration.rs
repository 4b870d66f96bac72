//! `RegisterCvm`: who is calling (through [`IdentityProvider`], where RA-TLS plugs in), a
//! WireGuard address from `client_ip_range`, the peer pushed to the data plane ([`WgBackend`]),
//! and the answer telling the CVM how to reach the gateway.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::Engine;
use dstack_rpc::gateway::{
    AcmeInfoResponse, GatewayNodeInfo, GatewayRpc, GatewayState, GetPeersResponse, GuestAgentConfig, InfoResponse,
    PeerInfo, RegisterCvmRequest, RegisterCvmResponse, WireGuardConfig, WireGuardPeer,
};
use dstack_rpc::{BoxFuture, CallContext, Empty, RpcError};
use thiserror::Error;
use tracing::info;

use crate::auth_webhook::{AuthWebhook, WebhookError};
use crate::config::{Cidr, GatewayConfig};
use crate::routing::{Instance, PortPolicy, RoutingTable};
use crate::sync::persist::{PersistError, StateFile};
use crate::sync::store::{CertRecord, InstanceRecord, MergeOutcome, NodeRecord, Store, from_unix_ms, unix_ms};

/// The attested identity of a registering CVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// App id, lower-case hex.
    pub app_id: String,
    /// Instance id, lower-case hex.
    pub instance_id: String,
    /// Compose hash, lower-case hex, when known.
    pub compose_hash: Option<String>,
}

/// Why a caller has no acceptable identity.
#[derive(Debug, Clone, Error)]
#[error("{0}")]
pub struct IdentityError(pub String);

/// Extracts (and verifies) the caller's identity from the call, e.g. from its RA-TLS client
/// certificate in [`CallContext::peer_certificates`].
pub trait IdentityProvider: Send + Sync + 'static {
    /// Identify the caller or refuse.
    fn identify<'a>(&'a self, ctx: &'a CallContext) -> BoxFuture<'a, Result<PeerIdentity, IdentityError>>;
}

/// A WireGuard peer as the data plane needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    /// Base64 public key.
    pub public_key: String,
    /// The peer's single tunnel address (`AllowedIPs = ip/32`).
    pub ip: Ipv4Addr,
}

/// Data-plane errors.
pub use dstack_wg::WgError;

/// The WireGuard data plane (boringtun in-process, or kernel WireGuard via `wg syncconf`).
pub trait WgBackend: Send + Sync + 'static {
    /// Make the peer set exactly `peers` without disturbing unchanged peers' sessions.
    fn set_peers(&self, peers: &[WgPeer]) -> Result<(), WgError>;
    /// Latest handshake per public key.
    fn latest_handshakes(&self) -> HashMap<String, SystemTime>;
}

/// `wg.conf` text in dstack's template layout, for kernel WireGuard (`wg syncconf`).
pub fn render_wg_conf(private_key: &str, listen_port: u16, peers: &[WgPeer]) -> String {
    let mut s = format!("[Interface]\nPrivateKey = {private_key}\nListenPort = {listen_port}\n");
    for p in peers {
        s.push_str(&format!(
            "\n[Peer]\nPublicKey = {}\nAllowedIPs = {}/32\nPersistentKeepalive = 25\n",
            p.public_key, p.ip
        ));
    }
    s
}

/// Registration refusals.
#[derive(Debug, Error)]
pub enum RegisterError {
    /// No / bad attestation.
    #[error("unauthenticated: {0}")]
    Identity(#[from] IdentityError),
    /// Not in the allowlist.
    #[error("app {0} is not allowed to register")]
    NotAllowed(String),
    /// The auth webhook refused (or could not be asked).
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    /// `client_public_key` is not a base64 X25519 key.
    #[error("invalid WireGuard public key: {0}")]
    BadKey(String),
    /// The key is registered to another instance.
    #[error("WireGuard public key already used by another instance")]
    KeyInUse,
    /// `client_ip_range` has no free address.
    #[error("no free address in {0}")]
    PoolExhausted(Cidr),
    /// Data plane refused the peer set.
    #[error(transparent)]
    Wg(#[from] WgError),
}

/// Validate a WireGuard public key: base64 of 32 bytes.
pub fn validate_wg_key(key: &str) -> Result<(), RegisterError> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(key.trim())
        .map_err(|e| RegisterError::BadKey(e.to_string()))?;
    if raw.len() != 32 {
        return Err(RegisterError::BadKey(format!("{} bytes, expected 32", raw.len())));
    }
    Ok(())
}

/// Pick an address for `instance_id`: its current one if still valid, else the first free host
/// of `range` outside `reserved` (network and broadcast addresses excluded for prefixes ≤ 30).
pub fn allocate_ip(
    range: Cidr,
    reserved: &[Cidr],
    taken: &HashMap<Ipv4Addr, String>,
    instance_id: &str,
) -> Option<Ipv4Addr> {
    let usable = |ip: Ipv4Addr| {
        range.contains(ip)
            && !reserved.iter().any(|r| r.contains(ip))
            && (range.prefix > 30 || (ip != range.network() && ip != range.broadcast()))
    };
    if let Some((ip, _)) = taken.iter().find(|(ip, id)| id.as_str() == instance_id && usable(**ip)) {
        return Some(*ip);
    }
    let (first, last) = (u32::from(range.network()), u32::from(range.broadcast()));
    (first..=last)
        .map(Ipv4Addr::from)
        .find(|ip| usable(*ip) && !taken.contains_key(ip))
}

/// Optional admission rules on top of attestation.
#[derive(Debug, Clone, Default)]
pub struct AdmissionPolicy {
    /// Only these app ids (lower-case hex) may register; `None` = any attested app.
    pub allowed_apps: Option<Vec<String>>,
}

/// Implements the `Gateway` pRPC service, and holds this node's copy of the cluster state
/// ([`crate::sync`]): registrations are written there and routing and WireGuard follow it.
pub struct Registrar {
    pub(crate) config: Arc<GatewayConfig>,
    table: RoutingTable,
    identity: Box<dyn IdentityProvider>,
    wg: Arc<dyn WgBackend>,
    policy: AdmissionPolicy,
    webhook: Option<AuthWebhook>,
    /// Serialises allocation, merges and peer pushes.
    lock: Mutex<()>,
    /// The replicated state (a cluster of one without `[core.sync]`).
    pub(crate) store: Mutex<Store>,
    /// The WireGuard public key announced to CVMs (changes on rotation).
    wg_public: Mutex<String>,
    /// Signalled when local state changed and peers should hear of it now.
    pub(crate) changed: tokio::sync::Notify,
    /// Called for every certificate that arrives from a peer.
    cert_hook: Mutex<Option<CertHook>>,
    /// The ACME account URL, once known.
    pub acme_account: Mutex<Option<String>>,
    /// Accepted / refused `RegisterCvm` calls.
    pub stats: RegistrationStats,
    /// Where the store is persisted (`core.state_dir`).
    state_file: Option<StateFile>,
    /// Orders saves: each one writes the store as it is once it holds this.
    save_lock: Mutex<()>,
}

/// Installs a certificate received from another node.
pub type CertHook = Box<dyn Fn(&CertRecord) + Send + Sync>;

/// Registration counters (for metrics).
#[derive(Debug, Default)]
pub struct RegistrationStats {
    /// Successful registrations.
    pub accepted: std::sync::atomic::AtomicU64,
    /// Refused registrations.
    pub refused: std::sync::atomic::AtomicU64,
    /// Failed saves of the cluster state.
    pub persist_failures: std::sync::atomic::AtomicU64,
}

/// What [`Registrar::load_state`] restored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// Instance records (tombstones included).
    pub instances: usize,
    /// Certificates.
    pub certs: usize,
    /// Node records.
    pub nodes: usize,
    /// Records skipped as malformed.
    pub rejected: Vec<String>,
}

impl std::fmt::Debug for Registrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registrar")
            .field("policy", &self.policy)
            .field("webhook", &self.webhook)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

impl Registrar {
    /// A registrar over `table`.
    pub fn new(
        config: Arc<GatewayConfig>,
        table: RoutingTable,
        identity: Box<dyn IdentityProvider>,
        wg: Arc<dyn WgBackend>,
        policy: AdmissionPolicy,
    ) -> Self {
        let wg_public = Mutex::new(config.core.wg.public_key.clone());
        let state_file = config.core.state_dir.as_deref().map(StateFile::new);
        let r = Self {
            config,
            table,
            identity,
            wg,
            policy,
            webhook: None,
            lock: Mutex::new(()),
            store: Mutex::new(Store::default()),
            wg_public,
            changed: tokio::sync::Notify::new(),
            cert_hook: Mutex::new(None),
            acme_account: Mutex::new(None),
            stats: RegistrationStats::default(),
            state_file,
            save_lock: Mutex::new(()),
        };
        r.heartbeat();
        r
    }

    /// Also ask `webhook` about every registration (after the allowlist).
    pub fn with_webhook(mut self, webhook: Option<AuthWebhook>) -> Self {
        self.webhook = webhook;
        self
    }

    /// Reload the state saved in `core.state_dir` (if any) and make routing, WireGuard and the
    /// certificate hook follow it; call once at start, after [`Self::set_cert_hook`]. Peers then
    /// only need to send what changed while this node was down.
    pub fn load_state(&self) -> Result<RestoreReport, PersistError> {
        let Some(file) = &self.state_file else {
            return Ok(RestoreReport::default());
        };
        let Some(saved) = file.load()? else {
            return Ok(RestoreReport::default());
        };
        let out = self.merge_remote(&saved).map_err(|e| PersistError::Format {
            path: file.path(),
            reason: format!("applying restored peers: {e}"),
        })?;
        // Our own record as saved may be outdated (new URL, rotated key): re-announce.
        self.heartbeat();
        info!(
            instances = saved.instances.len(),
            certs = saved.certs.len(),
            nodes = saved.nodes.len(),
            "restored cluster state from {}",
            file.path().display()
        );
        Ok(RestoreReport {
            instances: saved.instances.len(),
            certs: saved.certs.len(),
            nodes: saved.nodes.len(),
            rejected: out.rejected,
        })
    }

    /// Save the store to `core.state_dir` (no-op without one). Failures are logged and counted:
    /// the state also lives on in memory and on the peers.
    fn persist(&self) {
        let Some(file) = &self.state_file else { return };
        let _order = self.save_lock.lock().unwrap_or_else(|e| e.into_inner());
        let wire = self
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .to_wire(self.node_id());
        if let Err(e) = file.save(&wire, now_ms()) {
            self.stats
                .persist_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!("saving cluster state: {e}");
        }
    }

    /// Install certificates that arrive from other nodes with `hook`.
    pub fn set_cert_hook(&self, hook: CertHook) {
        *self.cert_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// This node's id in the cluster.
    pub fn node_id(&self) -> u32 {
        self.config.core.sync.node_id
    }

    pub(crate) fn my_url(&self) -> String {
        let s = &self.config.core.sync;
        if s.my_url.is_empty() {
            format!("https://{}", self.config.core.rpc_domain)
        } else {
            s.my_url.clone()
        }
    }

    /// Announce a new WireGuard public key (after a rotation) to CVMs and peers.
    pub fn set_wg_public_key(&self, key: String) {
        *self.wg_public.lock().unwrap_or_else(|e| e.into_inner()) = key;
        self.heartbeat();
        self.persist();
        self.changed.notify_one();
    }

    /// The WireGuard public key currently announced.
    pub fn wg_public_key(&self) -> String {
        self.wg_public.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Refresh this node's own record (liveness, and content after a change).
    pub fn heartbeat(&self) {
        let wg = &self.config.core.wg;
        let now = now_ms();
        let mut me = NodeRecord {
            id: self.node_id(),
            url: self.my_url(),
            wg_public_key: self.wg_public_key(),
            wg_ip: wg.ip.addr,
            wg_endpoint: wg.endpoint.clone(),
            updated_ms: now,
            last_seen_ms: now,
        };
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cur) = store.nodes.get(&me.id) {
            let same = NodeRecord {
                updated_ms: cur.updated_ms,
                last_seen_ms: cur.last_seen_ms,
                ..me.clone()
            } == *cur;
            me.updated_ms = if same {
                cur.updated_ms
            } else {
                now.max(cur.updated_ms + 1)
            };
        }
        store.merge_node(me);
    }

    /// Nodes CVMs should use now: those heard of within `sync.node_timeout`, this one included.
    pub fn live_nodes(&self) -> Vec<NodeRecord> {
        self.heartbeat();
        let store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        store.live_nodes(now_ms(), self.config.core.sync.node_timeout)
    }

    /// Make routing and WireGuard match the store. Callers hold `self.lock`.
    fn apply(&self) -> Result<(), WgError> {
        let effective = self
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .effective_instances();
        let mut keep = std::collections::HashSet::new();
        for r in &effective {
            let previous = self.table.get(&r.instance_id);
            keep.insert(r.instance_id.clone());
            self.table.upsert(Instance {
                instance_id: r.instance_id.clone(),
                app_id: r.app_id.clone(),
                ip: IpAddr::V4(r.ip),
                public_key: r.public_key.clone(),
                port_policy: r.port_policy.clone(),
                reg_time: from_unix_ms(r.reg_time_ms),
                // Keep this node's handshake history across re-registration with the same key.
                latest_handshake: previous
                    .filter(|p| p.public_key == r.public_key)
                    .and_then(|p| p.latest_handshake),
            });
        }
        for i in self.table.instances() {
            if !keep.contains(&i.instance_id) {
                self.table.remove(&i.instance_id);
            }
        }
        let peers: Vec<WgPeer> = effective
            .into_iter()
            .map(|r| WgPeer {
                public_key: r.public_key,
                ip: r.ip,
            })
            .collect();
        self.wg.set_peers(&peers)
    }

    /// Register (or re-register) the caller.
    pub async fn register(
        &self,
        ctx: &CallContext,
        req: RegisterCvmRequest,
    ) -> Result<RegisterCvmResponse, RegisterError> {
        let id = self.identity.identify(ctx).await?;
        if let Some(allowed) = &self.policy.allowed_apps
            && !allowed.iter().any(|a| a.eq_ignore_ascii_case(&id.app_id))
        {
            return Err(RegisterError::NotAllowed(id.app_id));
        }
        if let Some(hook) = &self.webhook {
            hook.check(&id).await?;
        }
        let key = req.client_public_key.trim().to_owned();
        validate_wg_key(&key)?;
        let wg = &self.config.core.wg;
        let nodes = self.live_nodes();
        let ip = {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            let now = now_ms();
            let ip = {
                let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
                let effective = store.effective_instances();
                if effective
                    .iter()
                    .any(|i| i.public_key == key && i.instance_id != id.instance_id)
                {
                    return Err(RegisterError::KeyInUse);
                }
                let taken: HashMap<Ipv4Addr, String> =
                    effective.iter().map(|i| (i.ip, i.instance_id.clone())).collect();
                let mut reserved = wg.reserved_net.clone();
                // Never hand out a gateway's own tunnel address (any node's).
                reserved.push(Cidr::v4(wg.ip.addr, 32));
                reserved.extend(store.nodes.values().map(|n| Cidr::v4(n.wg_ip, 32)));
                let ip = allocate_ip(wg.client_ip_range, &reserved, &taken, &id.instance_id)
                    .ok_or(RegisterError::PoolExhausted(wg.client_ip_range))?;
                let previous = store.instances.get(&id.instance_id).cloned();
                let live_prev = previous.as_ref().filter(|p| !p.deleted);
                store.merge_instance(InstanceRecord {
                    instance_id: id.instance_id.clone(),
                    app_id: id.app_id.clone(),
                    ip,
                    public_key: key.clone(),
                    port_policy: req.port_policy.as_ref().map(PortPolicy::from).unwrap_or_default(),
                    reg_time_ms: now,
                    ip_since_ms: live_prev.filter(|p| p.ip == ip).map_or(now, |p| p.ip_since_ms),
                    // Strictly newer than anything this record had, even with a lagging clock.
                    updated_ms: previous.as_ref().map_or(now, |p| now.max(p.updated_ms + 1)),
                    origin: self.node_id(),
                    last_seen_ms: live_prev.map_or(0, |p| p.last_seen_ms),
                    deleted: false,
                });
                ip
            };
            self.apply()?;
            // Durable before the CVM is told its address.
            self.persist();
            ip
        };
        self.changed.notify_one();
        info!(app_id = %id.app_id, instance_id = %id.instance_id, %ip, "registered CVM");
        let proxy = &self.config.core.proxy;
        Ok(RegisterCvmResponse {
            wg: Some(WireGuardConfig {
                client_ip: ip.to_string(),
                servers: nodes
                    .iter()
                    .map(|n| WireGuardPeer {
                        pk: n.wg_public_key.clone(),
                        ip: n.wg_ip.to_string(),
                        endpoint: n.wg_endpoint.clone(),
                    })
                    .collect(),
            }),
            agent: Some(GuestAgentConfig {
                external_port: u32::from(proxy.external_port),
                internal_port: u32::from(proxy.agent_port),
                domain: proxy.base_domain.clone(),
                app_address_ns_prefix: proxy.app_address_ns_prefix.clone(),
            }),
            gateways: nodes.iter().map(node_info).collect(),
        })
    }

    /// Pull handshake times from the data plane, then drop instances silent (no handshake seen by
    /// any node, no registration) for longer than `recycle.timeout`. Returns the removed ones.
    pub fn recycle(&self, now: SystemTime) -> Result<Vec<Instance>, WgError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let handshakes = self.wg.latest_handshakes();
        let now = unix_ms(now);
        let gone = {
            let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
            for inst in self.table.instances() {
                if let Some(t) = handshakes.get(&inst.public_key) {
                    self.table.set_handshake(&inst.instance_id, *t);
                    store.saw_instance(&inst.instance_id, unix_ms(*t));
                }
            }
            let gone = store.recycle(now, self.config.core.recycle.timeout, self.node_id());
            store.purge_tombstones(now, self.config.core.sync.tombstone_ttl);
            gone
        };
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        self.apply()?;
        self.persist();
        self.changed.notify_one();
        info!(count = gone.len(), "recycled stale instances");
        Ok(gone
            .into_iter()
            .map(|r| Instance {
                instance_id: r.instance_id,
                app_id: r.app_id,
                ip: IpAddr::V4(r.ip),
                public_key: r.public_key,
                port_policy: r.port_policy,
                reg_time: from_unix_ms(r.reg_time_ms),
                latest_handshake: (r.last_seen_ms > 0).then(|| from_unix_ms(r.last_seen_ms)),
            })
            .collect())
    }

    /// Merge a peer's state, then re-apply routing and install new certificates.
    pub fn merge_remote(&self, state: &GatewayState) -> Result<MergeOutcome, WgError> {
        let out = {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            let out = self.store.lock().unwrap_or_else(|e| e.into_inner()).merge(state);
            if out.instances {
                self.apply()?;
            }
            // Liveness-only node updates are not worth a write: peers resend them every round.
            if out.instances || !out.certs.is_empty() || out.nodes_changed {
                self.persist();
            }
            out
        };
        for r in &out.rejected {
            tracing::warn!(from = state.sender_id, "sync: ignored record: {r}");
        }
        if !out.certs.is_empty() {
            let certs: Vec<CertRecord> = {
                let store = self.store.lock().unwrap_or_else(|e| e.into_inner());
                out.certs.iter().filter_map(|d| store.certs.get(d).cloned()).collect()
            };
            if let Some(hook) = &*self.cert_hook.lock().unwrap_or_else(|e| e.into_inner()) {
                certs.iter().for_each(hook);
            }
        }
        Ok(out)
    }

    /// This node's whole state, for a peer.
    pub fn snapshot(&self) -> GatewayState {
        self.heartbeat();
        self.store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .to_wire(self.node_id())
    }

    /// Publish a certificate (e.g. just issued by ACME) to the cluster.
    pub fn publish_cert(&self, domain: &str, chain_pem: String, key_pem: String) {
        let rec = CertRecord {
            domain: domain.to_owned(),
            chain_pem,
            key_pem,
            updated_ms: now_ms(),
            origin: self.node_id(),
        };
        self.store.lock().unwrap_or_else(|e| e.into_inner()).merge_cert(rec);
        self.persist();
        self.changed.notify_one();
    }

    /// The certificate the cluster holds for `domain`.
    pub fn cert(&self, domain: &str) -> Option<CertRecord> {
        self.store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .certs
            .get(domain)
            .cloned()
    }
}

fn node_info(n: &NodeRecord) -> GatewayNodeInfo {
    GatewayNodeInfo {
        id: n.id,
        uuid: Vec::new(),
        url: n.url.clone(),
        last_seen: n.last_seen_ms / 1000,
        wg_public_key: n.wg_public_key.clone(),
        wg_ip: n.wg_ip.to_string(),
        wg_endpoint: n.wg_endpoint.clone(),
    }
}

impl GatewayRpc for Registrar {
    async fn register_cvm(&self, ctx: &CallContext, req: RegisterCvmRequest) -> Result<RegisterCvmResponse, RpcError> {
        use std::sync::atomic::Ordering::Relaxed;
        match self.register(ctx, req).await {
            Ok(r) => {
                self.stats.accepted.fetch_add(1, Relaxed);
                Ok(r)
            }
            Err(e) => {
                self.stats.refused.fetch_add(1, Relaxed);
                tracing::warn!("RegisterCvm refused: {e}");
                Err(RpcError::handler(e))
            }
        }
    }

    async fn acme_info(&self, _ctx: &CallContext, _req: Empty) -> Result<AcmeInfoResponse, RpcError> {
        let account_uri = self
            .acme_account
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default();
        Ok(AcmeInfoResponse {
            account_uri,
            ..Default::default()
        })
    }

    async fn info(&self, _ctx: &CallContext, _req: Empty) -> Result<InfoResponse, RpcError> {
        let p = &self.config.core.proxy;
        Ok(InfoResponse {
            base_domain: p.base_domain.clone(),
            external_port: u32::from(p.external_port),
            app_address_ns_prefix: p.app_address_ns_prefix.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        })
    }

    async fn get_peers(&self, _ctx: &CallContext, _req: Empty) -> Result<GetPeersResponse, RpcError> {
        let me = self.node_id();
        Ok(GetPeersResponse {
            my_id: me,
            my_url: self.my_url(),
            peers: self
                .live_nodes()
                .into_iter()
                .filter(|n| n.id != me)
                .map(|n| PeerInfo { id: n.id, url: n.url })
                .collect(),
        })
    }
}

#[cfg(test)]
#[path = "registration_tests.rs"]
mod tests;
