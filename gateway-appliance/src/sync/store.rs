//! The replicated state of a gateway cluster and its merge rules.
//!
//! Three record kinds, each keyed by id:
//! * **nodes** (`node_id`): a gateway's RPC URL and WireGuard server (key, tunnel IP, endpoint). Only
//!   the node itself writes its record; `last_seen_ms` is max-merged so liveness spreads by gossip.
//! * **instances** (`instance_id`): registered CVMs (app, WireGuard key and address, port policy).
//!   Last-writer-wins on `(updated_ms, origin)`; recycling writes a tombstone. `last_seen_ms` (the
//!   latest handshake any node saw) is max-merged independently, so a handshake report can never
//!   undo a newer registration.
//! * **certs** (`domain`): the proxy certificate and key (from ACME), last-writer-wins.
//!
//! Two nodes may hand the same address to different instances concurrently (each allocates from
//! its own view). [`Store::effective_instances`] resolves this deterministically on every node: the
//! oldest claim (`ip_since_ms`, then instance id) keeps the address, the other instance is left out
//! of routing and WireGuard until it re-registers, when allocation (which sees the winner) gives
//! it a new address. Timestamps are wall-clock milliseconds, so nodes need roughly synchronised
//! clocks (NTP); a skewed clock only affects which of two concurrent writes wins.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dstack_rpc::gateway::{GatewayState, PortAttrs, SyncCert, SyncInstance, SyncNode};

use crate::routing::PortPolicy;

/// Milliseconds since the UNIX epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The inverse of [`unix_ms`].
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A gateway node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Configured unique id.
    pub id: u32,
    /// RPC base URL (`https://host:port`), where peers send `UpdateState`.
    pub url: String,
    /// WireGuard public key (base64), the current one after a rotation.
    pub wg_public_key: String,
    /// The node's tunnel address.
    pub wg_ip: Ipv4Addr,
    /// `host:port` CVMs dial.
    pub wg_endpoint: String,
    /// Last change (LWW).
    pub updated_ms: u64,
    /// Last self-announcement (max).
    pub last_seen_ms: u64,
}

/// A registered CVM (or its tombstone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    /// Hex instance id.
    pub instance_id: String,
    /// Hex app id.
    pub app_id: String,
    /// WireGuard address.
    pub ip: Ipv4Addr,
    /// WireGuard public key (base64).
    pub public_key: String,
    /// Port policy.
    pub port_policy: PortPolicy,
    /// Latest registration.
    pub reg_time_ms: u64,
    /// Since when it holds `ip`.
    pub ip_since_ms: u64,
    /// Last change (LWW, with `origin`).
    pub updated_ms: u64,
    /// Writer node.
    pub origin: u32,
    /// Latest handshake any node saw (max).
    pub last_seen_ms: u64,
    /// Recycled.
    pub deleted: bool,
}

impl InstanceRecord {
    fn stamp(&self) -> (u64, u32) {
        (self.updated_ms, self.origin)
    }

    /// When the instance last showed life: its registration or a handshake.
    pub fn alive_ms(&self) -> u64 {
        self.reg_time_ms.max(self.last_seen_ms)
    }
}

/// A proxy certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRecord {
    /// Base domain it serves (`*.<domain>`).
    pub domain: String,
    /// PEM chain.
    pub chain_pem: String,
    /// PEM key.
    pub key_pem: String,
    /// Last change.
    pub updated_ms: u64,
    /// Writer node.
    pub origin: u32,
}

/// What a merge changed (so the caller re-applies routing or reinstalls certificates).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MergeOutcome {
    /// Instance records (or their liveness) changed.
    pub instances: bool,
    /// Node records changed (liveness included).
    pub nodes: bool,
    /// A node record is new or its content changed (not only its liveness).
    pub nodes_changed: bool,
    /// Domains whose certificate changed.
    pub certs: Vec<String>,
    /// Records refused as malformed, with the reason.
    pub rejected: Vec<String>,
}

/// The replicated state.
#[derive(Debug, Default, Clone)]
pub struct Store {
    /// By node id.
    pub nodes: BTreeMap<u32, NodeRecord>,
    /// By instance id.
    pub instances: BTreeMap<String, InstanceRecord>,
    /// By domain.
    pub certs: BTreeMap<String, CertRecord>,
}

impl Store {
    /// Merge one node record.
    pub fn merge_node(&mut self, n: NodeRecord) -> bool {
        match self.nodes.get_mut(&n.id) {
            None => {
                self.nodes.insert(n.id, n);
                true
            }
            Some(cur) => {
                let seen = n.last_seen_ms.max(cur.last_seen_ms);
                let mut changed = seen != cur.last_seen_ms;
                if n.updated_ms > cur.updated_ms {
                    *cur = n;
                    changed = true;
                }
                cur.last_seen_ms = seen;
                changed
            }
        }
    }

    /// Merge one instance record.
    pub fn merge_instance(&mut self, r: InstanceRecord) -> bool {
        match self.instances.get_mut(&r.instance_id) {
            None => {
                self.instances.insert(r.instance_id.clone(), r);
                true
            }
            Some(cur) => {
                let seen = r.last_seen_ms.max(cur.last_seen_ms);
                let mut changed = seen != cur.last_seen_ms;
                if r.stamp() > cur.stamp() {
                    *cur = r;
                    changed = true;
                }
                cur.last_seen_ms = seen;
                changed
            }
        }
    }

    /// Merge one certificate.
    pub fn merge_cert(&mut self, c: CertRecord) -> bool {
        let newer = self
            .certs
            .get(&c.domain)
            .is_none_or(|cur| (c.updated_ms, c.origin) > (cur.updated_ms, cur.origin));
        if newer {
            self.certs.insert(c.domain.clone(), c);
        }
        newer
    }

    /// Record a handshake seen locally.
    pub fn saw_instance(&mut self, instance_id: &str, at_ms: u64) -> bool {
        match self.instances.get_mut(instance_id) {
            Some(r) if at_ms > r.last_seen_ms => {
                r.last_seen_ms = at_ms;
                true
            }
            _ => false,
        }
    }

    /// Tombstone live instances silent since before `now - timeout`; returns them.
    pub fn recycle(&mut self, now_ms: u64, timeout: Duration, by: u32) -> Vec<InstanceRecord> {
        let cutoff = now_ms.saturating_sub(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        let mut gone = Vec::new();
        for r in self.instances.values_mut() {
            if !r.deleted && r.alive_ms() < cutoff {
                gone.push(r.clone());
                r.deleted = true;
                r.updated_ms = now_ms.max(r.updated_ms + 1);
                r.origin = by;
            }
        }
        gone
    }

    /// Forget tombstones older than `ttl` (they only need to outlive the slowest sync round).
    pub fn purge_tombstones(&mut self, now_ms: u64, ttl: Duration) {
        let cutoff = now_ms.saturating_sub(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        self.instances.retain(|_, r| !r.deleted || r.updated_ms >= cutoff);
    }

    /// Live instances with address conflicts resolved (oldest claim wins), sorted by instance id.
    pub fn effective_instances(&self) -> Vec<InstanceRecord> {
        let mut live: Vec<&InstanceRecord> = self.instances.values().filter(|r| !r.deleted).collect();
        live.sort_by(|a, b| (a.ip_since_ms, &a.instance_id).cmp(&(b.ip_since_ms, &b.instance_id)));
        let mut by_ip: HashMap<Ipv4Addr, &InstanceRecord> = HashMap::new();
        let mut by_key: HashMap<&str, &InstanceRecord> = HashMap::new();
        let mut out = Vec::new();
        for r in live {
            // A WireGuard key also maps to one peer only.
            if by_ip.contains_key(&r.ip) || by_key.contains_key(r.public_key.as_str()) {
                tracing::warn!(instance = %r.instance_id, ip = %r.ip, "address or key claimed by an older registration; left out until it re-registers");
                continue;
            }
            by_ip.insert(r.ip, r);
            by_key.insert(&r.public_key, r);
            out.push(r.clone());
        }
        out.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        out
    }

    /// Nodes seen within `timeout` of `now`, by id.
    pub fn live_nodes(&self, now_ms: u64, timeout: Duration) -> Vec<NodeRecord> {
        let cutoff = now_ms.saturating_sub(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self.nodes
            .values()
            .filter(|n| n.last_seen_ms >= cutoff)
            .cloned()
            .collect()
    }

    /// Merge a peer's state; malformed records are skipped and reported.
    pub fn merge(&mut self, state: &GatewayState) -> MergeOutcome {
        let mut out = MergeOutcome::default();
        for n in &state.nodes {
            match node_from_wire(n) {
                Ok(n) => {
                    out.nodes_changed |= self.nodes.get(&n.id).is_none_or(|c| n.updated_ms > c.updated_ms);
                    out.nodes |= self.merge_node(n);
                }
                Err(e) => out.rejected.push(e),
            }
        }
        for i in &state.instances {
            match instance_from_wire(i) {
                Ok(i) => out.instances |= self.merge_instance(i),
                Err(e) => out.rejected.push(e),
            }
        }
        for c in &state.certs {
            if c.domain.is_empty() {
                out.rejected.push("cert: empty domain".into());
                continue;
            }
            let rec = CertRecord {
                domain: c.domain.clone(),
                chain_pem: c.chain_pem.clone(),
                key_pem: c.key_pem.clone(),
                updated_ms: c.updated_ms,
                origin: c.origin,
            };
            if self.merge_cert(rec) {
                out.certs.push(c.domain.clone());
            }
        }
        out
    }

    /// The whole state on the wire.
    pub fn to_wire(&self, sender_id: u32) -> GatewayState {
        GatewayState {
            sender_id,
            nodes: self
                .nodes
                .values()
                .map(|n| SyncNode {
                    id: n.id,
                    url: n.url.clone(),
                    wg_public_key: n.wg_public_key.clone(),
                    wg_ip: n.wg_ip.to_string(),
                    wg_endpoint: n.wg_endpoint.clone(),
                    updated_ms: n.updated_ms,
                    last_seen_ms: n.last_seen_ms,
                })
                .collect(),
            instances: self.instances.values().map(instance_to_wire).collect(),
            certs: self
                .certs
                .values()
                .map(|c| SyncCert {
                    domain: c.domain.clone(),
                    chain_pem: c.chain_pem.clone(),
                    key_pem: c.key_pem.clone(),
                    updated_ms: c.updated_ms,
                    origin: c.origin,
                })
                .collect(),
        }
    }
}

fn node_from_wire(n: &SyncNode) -> Result<NodeRecord, String> {
    let wg_ip = n
        .wg_ip
        .parse()
        .map_err(|e| format!("node {}: wg_ip {:?}: {e}", n.id, n.wg_ip))?;
    crate::registration::validate_wg_key(&n.wg_public_key).map_err(|e| format!("node {}: wg_public_key: {e}", n.id))?;
    Ok(NodeRecord {
        id: n.id,
        url: n.url.clone(),
        wg_public_key: n.wg_public_key.clone(),
        wg_ip,
        wg_endpoint: n.wg_endpoint.clone(),
        updated_ms: n.updated_ms,
        last_seen_ms: n.last_seen_ms,
    })
}

fn is_hex_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn instance_from_wire(i: &SyncInstance) -> Result<InstanceRecord, String> {
    if !is_hex_id(&i.instance_id) {
        return Err(format!("instance {:?}: instance_id is not hex", i.instance_id));
    }
    if !is_hex_id(&i.app_id) {
        return Err(format!("instance {}: app_id {:?} is not hex", i.instance_id, i.app_id));
    }
    let ip =
        i.ip.parse()
            .map_err(|e| format!("instance {}: ip {:?}: {e}", i.instance_id, i.ip))?;
    crate::registration::validate_wg_key(&i.public_key).map_err(|e| format!("instance {}: {e}", i.instance_id))?;
    Ok(InstanceRecord {
        instance_id: i.instance_id.to_ascii_lowercase(),
        app_id: i.app_id.to_ascii_lowercase(),
        ip,
        public_key: i.public_key.clone(),
        port_policy: i.port_policy.as_ref().map(PortPolicy::from).unwrap_or_default(),
        reg_time_ms: i.reg_time_ms,
        ip_since_ms: i.ip_since_ms,
        updated_ms: i.updated_ms,
        origin: i.origin,
        last_seen_ms: i.last_seen_ms,
        deleted: i.deleted,
    })
}

fn instance_to_wire(r: &InstanceRecord) -> SyncInstance {
    SyncInstance {
        instance_id: r.instance_id.clone(),
        app_id: r.app_id.clone(),
        ip: r.ip.to_string(),
        public_key: r.public_key.clone(),
        port_policy: Some(dstack_rpc::gateway::PortPolicy {
            ports: r
                .port_policy
                .ports
                .iter()
                .map(|&(port, pp)| PortAttrs {
                    port: u32::from(port),
                    pp,
                })
                .collect(),
            restrict_mode: r.port_policy.restrict_mode,
        }),
        reg_time_ms: r.reg_time_ms,
        ip_since_ms: r.ip_since_ms,
        updated_ms: r.updated_ms,
        origin: r.origin,
        last_seen_ms: r.last_seen_ms,
        deleted: r.deleted,
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
