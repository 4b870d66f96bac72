//! The routing table: registered instances, backend choice and per-app connection limits.
//!
//! An `<id>` from the host name is matched first as an instance id (that exact instance), else as
//! an app id: the app's instances with a recent WireGuard handshake are ranked by handshake age
//! and the `connect_top_n` freshest are tried first (in random order, to spread load); the rest
//! follow as fallback. With no fresh instance all instances are tried in random order.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use thiserror::Error;

/// The ports an instance exposes and how (from its app-compose, sent in `RegisterCvm`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortPolicy {
    /// `(port, send PROXY header)`.
    pub ports: Vec<(u16, bool)>,
    /// Only listed ports may be reached.
    pub restrict_mode: bool,
}

impl PortPolicy {
    /// `Some(pp)` when `port` may be reached, with whether a PROXY header is wanted.
    pub fn check(&self, port: u16) -> Option<bool> {
        match self.ports.iter().find(|(p, _)| *p == port) {
            Some(&(_, pp)) => Some(pp),
            None if self.restrict_mode => None,
            None => Some(false),
        }
    }
}

impl From<&dstack_rpc::gateway::PortPolicy> for PortPolicy {
    fn from(p: &dstack_rpc::gateway::PortPolicy) -> Self {
        Self {
            // Ports above 65535 cannot be reached; dropping them keeps restrict_mode closed.
            ports: p
                .ports
                .iter()
                .filter_map(|a| u16::try_from(a.port).ok().map(|port| (port, a.pp)))
                .collect(),
            restrict_mode: p.restrict_mode,
        }
    }
}

/// One registered CVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Hex instance id.
    pub instance_id: String,
    /// Hex app id.
    pub app_id: String,
    /// Tunnel address (WireGuard IP).
    pub ip: IpAddr,
    /// WireGuard public key (base64).
    pub public_key: String,
    /// Port policy.
    pub port_policy: PortPolicy,
    /// When it (last) registered.
    pub reg_time: SystemTime,
    /// Latest WireGuard handshake, if any.
    pub latest_handshake: Option<SystemTime>,
}

/// A backend to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Which instance.
    pub instance_id: String,
    /// Where.
    pub addr: SocketAddr,
    /// Send a PROXY protocol header first.
    pub pp: bool,
}

/// The outcome of matching an id and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The app the connection counts against.
    pub app_id: String,
    /// Preferred backends first (up to `top_n`), then fallbacks.
    pub preferred: Vec<Backend>,
    /// Tried when every preferred backend fails.
    pub fallback: Vec<Backend>,
}

/// Why no route exists.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RouteError {
    /// No instance or app with this id.
    #[error("no instance or app {0:?}")]
    UnknownId(String),
    /// The app's port policy refuses the port.
    #[error("port {port} of {id:?} is not exposed (restrict_mode)")]
    PortNotAllowed {
        /// Requested id.
        id: String,
        /// Requested port.
        port: u16,
    },
    /// The per-app connection limit is reached.
    #[error("app {app_id:?} has reached its limit of {limit} connections")]
    TooManyConnections {
        /// The app.
        app_id: String,
        /// The limit.
        limit: usize,
    },
}

/// Shared table of instances; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    instances: Arc<RwLock<HashMap<String, Instance>>>,
    connections: Arc<Mutex<HashMap<String, usize>>>,
}

/// Counts one connection against its app until dropped.
#[derive(Debug)]
pub struct ConnGuard {
    app_id: String,
    connections: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut map = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.app_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.app_id);
            }
        }
    }
}

/// Random u64 from the OS (a fixed value if the OS refuses, which only affects load spreading).
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

fn shuffle<T>(v: &mut [T]) {
    for i in (1..v.len()).rev() {
        let j = (random_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

impl RoutingTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Instance>> {
        self.instances.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Instance>> {
        self.instances.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Insert or replace an instance (keyed by instance id).
    pub fn upsert(&self, inst: Instance) {
        self.write().insert(inst.instance_id.clone(), inst);
    }

    /// Remove an instance; returns it.
    pub fn remove(&self, instance_id: &str) -> Option<Instance> {
        self.write().remove(instance_id)
    }

    /// Record a WireGuard handshake time.
    pub fn set_handshake(&self, instance_id: &str, at: SystemTime) -> bool {
        match self.write().get_mut(instance_id) {
            Some(i) => {
                i.latest_handshake = Some(at);
                true
            }
            None => false,
        }
    }

    /// One instance.
    pub fn get(&self, instance_id: &str) -> Option<Instance> {
        self.read().get(instance_id).cloned()
    }

    /// All instances, sorted by instance id.
    pub fn instances(&self) -> Vec<Instance> {
        let mut v: Vec<_> = self.read().values().cloned().collect();
        v.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        v
    }

    /// Remove instances whose latest sign of life (handshake, else registration) is older than
    /// `timeout`; returns the removed ones.
    pub fn recycle(&self, now: SystemTime, timeout: Duration) -> Vec<Instance> {
        let mut map = self.write();
        let stale: Vec<String> = map
            .values()
            .filter(|i| {
                let seen = i.latest_handshake.unwrap_or(i.reg_time).max(i.reg_time);
                now.duration_since(seen).is_ok_and(|age| age > timeout)
            })
            .map(|i| i.instance_id.clone())
            .collect();
        stale.iter().filter_map(|id| map.remove(id)).collect()
    }

    /// Current connection count of an app.
    pub fn connections(&self, app_id: &str) -> usize {
        let map = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        map.get(app_id).copied().unwrap_or(0)
    }

    /// Count a connection against `app_id`, refusing beyond `limit` (0 = unlimited).
    pub fn acquire(&self, app_id: &str, limit: usize) -> Result<ConnGuard, RouteError> {
        let mut map = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(app_id.to_owned()).or_insert(0);
        if limit != 0 && *n >= limit {
            return Err(RouteError::TooManyConnections {
                app_id: app_id.to_owned(),
                limit,
            });
        }
        *n += 1;
        Ok(ConnGuard {
            app_id: app_id.to_owned(),
            connections: self.connections.clone(),
        })
    }

    /// Choose backends for `id` (instance id, else app id) and `port`.
    pub fn resolve(
        &self,
        id: &str,
        port: u16,
        now: SystemTime,
        top_n: usize,
        handshake_stale: Duration,
    ) -> Result<Route, RouteError> {
        let map = self.read();
        let backend = |i: &Instance| {
            i.port_policy.check(port).map(|pp| Backend {
                instance_id: i.instance_id.clone(),
                addr: SocketAddr::new(i.ip, port),
                pp,
            })
        };
        let not_allowed = || RouteError::PortNotAllowed {
            id: id.to_owned(),
            port,
        };
        if let Some(inst) = map.get(id) {
            let b = backend(inst).ok_or_else(not_allowed)?;
            return Ok(Route {
                app_id: inst.app_id.clone(),
                preferred: vec![b],
                fallback: Vec::new(),
            });
        }
        let mut members: Vec<&Instance> = map.values().filter(|i| i.app_id == id).collect();
        if members.is_empty() {
            return Err(RouteError::UnknownId(id.to_owned()));
        }
        let fresh = |i: &Instance| {
            i.latest_handshake
                .is_some_and(|t| now.duration_since(t).map_or(true, |age| age <= handshake_stale))
        };
        // Freshest first; ties broken by instance id so the ranking is stable.
        members.sort_by(|a, b| {
            b.latest_handshake
                .cmp(&a.latest_handshake)
                .then(a.instance_id.cmp(&b.instance_id))
        });
        let (healthy, stale): (Vec<&Instance>, Vec<&Instance>) = members.into_iter().partition(|i| fresh(i));
        let healthy: Vec<Backend> = healthy.into_iter().filter_map(backend).collect();
        let mut stale: Vec<Backend> = stale.into_iter().filter_map(backend).collect();
        if healthy.is_empty() && stale.is_empty() {
            return Err(not_allowed());
        }
        let top = top_n.max(1).min(healthy.len());
        let mut preferred = healthy;
        let mut fallback = preferred.split_off(top);
        shuffle(&mut preferred);
        shuffle(&mut stale);
        if preferred.is_empty() {
            preferred = stale;
        } else {
            fallback.extend(stale);
        }
        Ok(Route {
            app_id: id.to_owned(),
            preferred,
            fallback,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn inst(id: &str, app: &str, last: u8, hs_secs_ago: Option<u64>, now: SystemTime) -> Instance {
        Instance {
            instance_id: id.into(),
            app_id: app.into(),
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)),
            public_key: String::new(),
            port_policy: PortPolicy::default(),
            reg_time: now - Duration::from_secs(7200),
            latest_handshake: hs_secs_ago.map(|s| now - Duration::from_secs(s)),
        }
    }

    const STALE: Duration = Duration::from_secs(1800);

    #[test]
    fn instance_id_wins_over_app_id() {
        let now = SystemTime::now();
        let t = RoutingTable::new();
        t.upsert(inst("aaaa", "app1", 2, Some(5), now));
        // An instance whose id equals another app's id.
        t.upsert(inst("app2", "app1", 3, Some(5), now));
        t.upsert(inst("cccc", "app2", 4, Some(5), now));
        let r = t.resolve("app2", 80, now, 3, STALE).unwrap();
        assert_eq!(r.app_id, "app1");
        assert_eq!(r.preferred.len(), 1);
        assert_eq!(r.preferred[0].addr, "10.0.0.3:80".parse().unwrap());
        assert!(r.fallback.is_empty());
    }

    #[test]
    fn app_picks_top_n_freshest_then_fallback() {
        let now = SystemTime::now();
        let t = RoutingTable::new();
        t.upsert(inst("i1", "app", 1, Some(10), now));
        t.upsert(inst("i2", "app", 2, Some(20), now));
        t.upsert(inst("i3", "app", 3, Some(30), now));
        t.upsert(inst("i4", "app", 4, Some(40), now));
        t.upsert(inst("i5", "app", 5, Some(4000), now)); // stale
        t.upsert(inst("i6", "app", 6, None, now)); // never handshaked
        t.upsert(inst("x", "other", 9, Some(1), now));
        for _ in 0..20 {
            let r = t.resolve("app", 443, now, 3, STALE).unwrap();
            let mut pref: Vec<_> = r.preferred.iter().map(|b| b.instance_id.as_str()).collect();
            pref.sort();
            assert_eq!(pref, ["i1", "i2", "i3"]);
            assert_eq!(r.fallback[0].instance_id, "i4");
            let mut rest: Vec<_> = r.fallback[1..].iter().map(|b| b.instance_id.as_str()).collect();
            rest.sort();
            assert_eq!(rest, ["i5", "i6"]);
        }
    }

    #[test]
    fn no_fresh_instance_falls_back_to_all() {
        let now = SystemTime::now();
        let t = RoutingTable::new();
        t.upsert(inst("i1", "app", 1, None, now));
        t.upsert(inst("i2", "app", 2, Some(99999), now));
        let r = t.resolve("app", 80, now, 1, STALE).unwrap();
        assert_eq!(r.preferred.len(), 2);
        assert!(r.fallback.is_empty());
    }

    #[test]
    fn top_n_randomises_among_fresh() {
        let now = SystemTime::now();
        let t = RoutingTable::new();
        for k in 0..3u8 {
            t.upsert(inst(&format!("i{k}"), "app", k + 1, Some(u64::from(k)), now));
        }
        let firsts: std::collections::HashSet<String> = (0..200)
            .map(|_| {
                t.resolve("app", 80, now, 3, STALE).unwrap().preferred[0]
                    .instance_id
                    .clone()
            })
            .collect();
        assert_eq!(firsts.len(), 3, "load should spread over all three");
    }

    #[test]
    fn unknown_and_restricted() {
        let now = SystemTime::now();
        let t = RoutingTable::new();
        assert_eq!(
            t.resolve("nope", 80, now, 3, STALE),
            Err(RouteError::UnknownId("nope".into()))
        );
        let mut i = inst("i1", "app", 1, Some(1), now);
        i.port_policy = PortPolicy {
            ports: vec![(8080, true), (22, false)],
            restrict_mode: true,
        };
        t.upsert(i);
        assert!(matches!(
            t.resolve("app", 80, now, 3, STALE),
            Err(RouteError::PortNotAllowed { .. })
        ));
        assert!(matches!(
            t.resolve("i1", 80, now, 3, STALE),
            Err(RouteError::PortNotAllowed { .. })
        ));
        let r = t.resolve("app", 8080, now, 3, STALE).unwrap();
        assert!(r.preferred[0].pp);
        assert!(!t.resolve("i1", 22, now, 3, STALE).unwrap().preferred[0].pp);
        // Without restrict_mode unlisted ports pass without a PROXY header.
        let p = PortPolicy {
            ports: vec![(8080, true)],
            restrict_mode: false,
        };
        assert_eq!(p.check(9999), Some(false));
        assert_eq!(p.check(8080), Some(true));
    }

    #[test]
    fn connection_limit_and_release() {
        let t = RoutingTable::new();
        let a = t.acquire("app", 2).unwrap();
        let b = t.acquire("app", 2).unwrap();
        assert!(matches!(
            t.acquire("app", 2),
            Err(RouteError::TooManyConnections { limit: 2, .. })
        ));
        assert!(t.acquire("other", 2).is_ok());
        drop(a);
        assert_eq!(t.connections("app"), 1);
        let _c = t.acquire("app", 2).unwrap();
        drop(b);
        assert_eq!(t.connections("app"), 1);
        let _unlimited: Vec<_> = (0..10).map(|_| t.acquire("u", 0).unwrap()).collect();
        assert_eq!(t.connections("u"), 10);
    }

    #[test]
    fn recycle_removes_silent_instances() {
        let now = SystemTime::now();
        let t = RoutingTable::new();
        let mut old = inst("old", "app", 1, Some(40000), now);
        old.reg_time = now - Duration::from_secs(50000);
        t.upsert(old);
        // Registered long ago but handshaking recently: kept.
        t.upsert(inst("alive", "app", 4, Some(5), now));
        t.upsert(inst("fresh", "app", 2, Some(10), now));
        let mut never = inst("new", "app", 3, None, now);
        never.reg_time = now;
        t.upsert(never);
        let gone = t.recycle(now, Duration::from_secs(36000));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].instance_id, "old");
        assert_eq!(t.instances().len(), 3);
        assert!(t.set_handshake("fresh", now));
        assert!(!t.set_handshake("old", now));
    }
}
