//! `RegisterCvm`: who is calling (through [`IdentityProvider`], where RA-TLS plugs in), a
//! WireGuard address from `client_ip_range`, the peer pushed to the data plane ([`WgBackend`]),
//! and the answer telling the CVM how to reach the gateway.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::Engine;
use dstack_rpc::gateway::{
    AcmeInfoResponse, GatewayNodeInfo, GatewayRpc, GetPeersResponse, GuestAgentConfig, InfoResponse,
    RegisterCvmRequest, RegisterCvmResponse, WireGuardConfig, WireGuardPeer,
};
use dstack_rpc::{BoxFuture, CallContext, Empty, RpcError};
use thiserror::Error;
use tracing::info;

use crate::config::{Cidr, GatewayConfig};
use crate::routing::{Instance, PortPolicy, RoutingTable};

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
#[derive(Debug, Error)]
#[error("wireguard: {0}")]
pub struct WgError(pub String);

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

/// Implements the `Gateway` pRPC service.
pub struct Registrar {
    config: Arc<GatewayConfig>,
    table: RoutingTable,
    identity: Box<dyn IdentityProvider>,
    wg: Arc<dyn WgBackend>,
    policy: AdmissionPolicy,
    /// Serialises allocation + peer pushes.
    lock: Mutex<()>,
    /// The ACME account URL, once known.
    pub acme_account: Mutex<Option<String>>,
    /// Accepted / refused `RegisterCvm` calls.
    pub stats: RegistrationStats,
}

/// Registration counters (for metrics).
#[derive(Debug, Default)]
pub struct RegistrationStats {
    /// Successful registrations.
    pub accepted: std::sync::atomic::AtomicU64,
    /// Refused registrations.
    pub refused: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Registrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registrar")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
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
        Self {
            config,
            table,
            identity,
            wg,
            policy,
            lock: Mutex::new(()),
            acme_account: Mutex::new(None),
            stats: RegistrationStats::default(),
        }
    }

    fn peers(&self) -> Vec<WgPeer> {
        self.table
            .instances()
            .into_iter()
            .filter_map(|i| match i.ip {
                IpAddr::V4(ip) => Some(WgPeer {
                    public_key: i.public_key,
                    ip,
                }),
                IpAddr::V6(_) => None,
            })
            .collect()
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
        let key = req.client_public_key.trim().to_owned();
        validate_wg_key(&key)?;
        let wg = &self.config.core.wg;
        let ip = {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            let instances = self.table.instances();
            if instances
                .iter()
                .any(|i| i.public_key == key && i.instance_id != id.instance_id)
            {
                return Err(RegisterError::KeyInUse);
            }
            let taken: HashMap<Ipv4Addr, String> = instances
                .iter()
                .filter_map(|i| match i.ip {
                    IpAddr::V4(ip) => Some((ip, i.instance_id.clone())),
                    IpAddr::V6(_) => None,
                })
                .collect();
            let mut reserved = wg.reserved_net.clone();
            reserved.push(Cidr::v4(wg.ip.addr, 32)); // never hand out the gateway's own address
            let ip = allocate_ip(wg.client_ip_range, &reserved, &taken, &id.instance_id)
                .ok_or(RegisterError::PoolExhausted(wg.client_ip_range))?;
            let previous = self.table.get(&id.instance_id);
            self.table.upsert(Instance {
                instance_id: id.instance_id.clone(),
                app_id: id.app_id.clone(),
                ip: IpAddr::V4(ip),
                public_key: key.clone(),
                port_policy: req.port_policy.as_ref().map(PortPolicy::from).unwrap_or_default(),
                reg_time: SystemTime::now(),
                // Keep the handshake history across re-registration with the same key.
                latest_handshake: previous
                    .filter(|p| p.public_key == key)
                    .and_then(|p| p.latest_handshake),
            });
            self.wg.set_peers(&self.peers())?;
            ip
        };
        info!(app_id = %id.app_id, instance_id = %id.instance_id, %ip, "registered CVM");
        let proxy = &self.config.core.proxy;
        Ok(RegisterCvmResponse {
            wg: Some(WireGuardConfig {
                client_ip: ip.to_string(),
                servers: vec![WireGuardPeer {
                    pk: wg.public_key.clone(),
                    ip: wg.ip.addr.to_string(),
                    endpoint: wg.endpoint.clone(),
                }],
            }),
            agent: Some(GuestAgentConfig {
                external_port: u32::from(proxy.external_port),
                internal_port: u32::from(proxy.agent_port),
                domain: proxy.base_domain.clone(),
                app_address_ns_prefix: proxy.app_address_ns_prefix.clone(),
            }),
            gateways: vec![self.node_info()],
        })
    }

    fn node_info(&self) -> GatewayNodeInfo {
        let wg = &self.config.core.wg;
        GatewayNodeInfo {
            id: 0,
            uuid: Vec::new(),
            url: format!("https://{}", self.config.core.rpc_domain),
            last_seen: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            wg_public_key: wg.public_key.clone(),
            wg_ip: wg.ip.addr.to_string(),
            wg_endpoint: wg.endpoint.clone(),
        }
    }

    /// Pull handshake times from the data plane, then drop instances silent for longer than
    /// `recycle.timeout`. Returns the removed instances.
    pub fn recycle(&self, now: SystemTime) -> Result<Vec<Instance>, WgError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let handshakes = self.wg.latest_handshakes();
        for inst in self.table.instances() {
            if let Some(t) = handshakes.get(&inst.public_key) {
                self.table.set_handshake(&inst.instance_id, *t);
            }
        }
        let gone = self.table.recycle(now, self.config.core.recycle.timeout);
        if !gone.is_empty() {
            self.wg.set_peers(&self.peers())?;
            info!(count = gone.len(), "recycled stale instances");
        }
        Ok(gone)
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
        Ok(GetPeersResponse {
            my_id: 0,
            my_url: self.node_info().url,
            peers: Vec::new(),
        })
    }
}

#[cfg(test)]
#[path = "registration_tests.rs"]
mod tests;
