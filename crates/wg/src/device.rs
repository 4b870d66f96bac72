//! Userspace WireGuard with boringtun's noise state machine: one tun interface, one UDP socket,
//! one [`Tunn`] per peer.
//!
//! Crypto-key routing: an outgoing packet goes to the peer whose allowed address is its
//! destination; an incoming packet is accepted only if its inner source is the sending peer's
//! allowed address. Peer endpoints are roamed to the source of the last authenticated datagram.
//! Peers can be added and removed while running without touching the others' sessions.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::tun::{self, Tun};
use crate::{Cidr, WgError};

/// Largest datagram / packet handled (tun MTU must be ≤ this minus overhead).
const BUF: usize = 65536;
/// WireGuard data-packet overhead (header + tag).
const OVERHEAD: usize = 32;
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Handshakes per second before senders must prove their address with a cookie (as boringtun's
/// own device).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// One peer's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// X25519 public key.
    pub public_key: [u8; 32],
    /// The peer's single tunnel address (`AllowedIPs = ip/32`).
    pub allowed_ip: Ipv4Addr,
    /// Where to send before the peer has spoken (clients know it; the gateway learns it).
    pub endpoint: Option<SocketAddr>,
    /// `PersistentKeepalive` seconds.
    pub keepalive: Option<u16>,
}

/// Interface settings.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Interface name.
    pub ifname: String,
    /// X25519 private key.
    pub private_key: [u8; 32],
    /// UDP listen address.
    pub listen: SocketAddr,
    /// Interface address and prefix.
    pub address: Cidr,
    /// Interface MTU.
    pub mtu: u16,
    /// Extra routes through the interface (e.g. the servers' `/32`s on a client).
    pub routes: Vec<Cidr>,
}

/// UDP socket buffer request: bursts from a fast sender otherwise overflow the default and
/// every drop costs the tunnelled TCP a congestion backoff.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

fn set_socket_buffers(udp: &UdpSocket, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                udp.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            debug!("wg: setsockopt({opt}): {}", std::io::Error::last_os_error());
        }
    }
}

/// Decode a base64 X25519 key.
pub fn decode_key(b64: &str) -> Result<[u8; 32], WgError> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| WgError(format!("key {b64:?}: {e}")))?;
    raw.try_into()
        .map_err(|v: Vec<u8>| WgError(format!("key {b64:?}: {} bytes, expected 32", v.len())))
}

/// Base64 public key of a private key.
pub fn public_key_b64(private_key: &[u8; 32]) -> String {
    let public = PublicKey::from(&StaticSecret::from(*private_key));
    base64::engine::general_purpose::STANDARD.encode(public.as_bytes())
}

/// A fresh random private key.
pub fn generate_private_key() -> Result<[u8; 32], WgError> {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).map_err(|e| WgError(format!("random key: {e}")))?;
    Ok(k)
}

struct Peer {
    config: PeerConfig,
    index: u32,
    tunn: Mutex<Tunn>,
    /// Which of our static keys `tunn` uses ([`StaticKey::generation`]).
    generation: AtomicU64,
    endpoint: Mutex<Option<SocketAddr>>,
}

/// One of our static keys. Handshake MACs are keyed on the responder's public key, so each key
/// has its own rate limiter (which checks them).
struct StaticKey {
    private: StaticSecret,
    public: PublicKey,
    /// Checks MACs and demands cookies under handshake load, before any Diffie-Hellman work is
    /// spent on an anonymous datagram. Shared by every peer on this key.
    rate_limiter: Arc<RateLimiter>,
    generation: u64,
}

impl StaticKey {
    fn new(private: [u8; 32], generation: u64) -> Arc<Self> {
        let private = StaticSecret::from(private);
        let public = PublicKey::from(&private);
        Arc::new(Self {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            private,
            public,
            generation,
        })
    }

    fn tunn(&self, peer: &PeerConfig, index: u32) -> Tunn {
        Tunn::new(
            self.private.clone(),
            PublicKey::from(peer.public_key),
            None,
            peer.keepalive,
            index,
            Some(self.rate_limiter.clone()),
        )
    }
}

/// The current key, and during a rotation's grace period the previous one.
#[derive(Clone)]
struct KeyRing {
    current: Arc<StaticKey>,
    previous: Option<Arc<StaticKey>>,
}

#[derive(Default)]
struct Peers {
    by_key: HashMap<[u8; 32], Arc<Peer>>,
    by_ip: HashMap<Ipv4Addr, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
}

/// Traffic counters (all peers).
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// Datagrams received.
    pub rx_datagrams: AtomicU64,
    /// Datagrams dropped (unknown peer, bad MAC, spoofed inner source...).
    pub rx_dropped: AtomicU64,
    /// Packets read from the tun interface with no peer for their destination.
    pub tx_no_route: AtomicU64,
}

/// Per-peer status.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    /// Base64 public key.
    pub public_key: String,
    /// Tunnel address.
    pub allowed_ip: Ipv4Addr,
    /// Current endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Time of the latest completed handshake.
    pub latest_handshake: Option<SystemTime>,
    /// Payload bytes sent / received.
    pub tx_bytes: u64,
    /// Payload bytes received.
    pub rx_bytes: u64,
}

struct Inner {
    keys: RwLock<KeyRing>,
    peers: RwLock<Peers>,
    next_index: AtomicU32,
    udp: UdpSocket,
    tun: Tun,
    stats: DeviceStats,
}

/// A running WireGuard interface. Dropping it stops the tasks and removes the interface.
pub struct WgDevice {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for WgDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgDevice")
            .field("ifname", &self.inner.tun.name())
            .finish_non_exhaustive()
    }
}

impl Drop for WgDevice {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl WgDevice {
    /// Create the interface and socket in the current thread's network namespace and start the
    /// packet loops on the current tokio runtime.
    /// The interface is addressed with iproute2's `ip` ([`tun::configure_interface`]).
    pub async fn start(cfg: DeviceConfig) -> Result<Self, WgError> {
        let tun = Tun::open(&cfg.ifname).map_err(|e| WgError(format!("tun {}: {e}", cfg.ifname)))?;
        tun::configure_interface(&cfg.ifname, cfg.address, cfg.mtu, &cfg.routes).map_err(|e| WgError(e.to_string()))?;
        Self::start_on(tun, &cfg).await
    }

    /// Like [`WgDevice::start`] on a tun device the caller opened and addressed itself (guest-init does
    /// it over rtnetlink: the initramfs has no `ip`). `cfg.ifname`, `address`, `mtu` and `routes` are
    /// not used here.
    pub async fn start_on(tun: Tun, cfg: &DeviceConfig) -> Result<Self, WgError> {
        let udp = UdpSocket::bind(cfg.listen)
            .await
            .map_err(|e| WgError(format!("udp {}: {e}", cfg.listen)))?;
        set_socket_buffers(&udp, SOCKET_BUFFER);
        let inner = Arc::new(Inner {
            keys: RwLock::new(KeyRing {
                current: StaticKey::new(cfg.private_key, 0),
                previous: None,
            }),
            peers: RwLock::new(Peers::default()),
            next_index: AtomicU32::new(1),
            udp,
            tun,
            stats: DeviceStats::default(),
        });
        let tasks = vec![
            tokio::spawn(tun_loop(inner.clone())),
            tokio::spawn(udp_loop(inner.clone())),
            tokio::spawn(timer_loop(inner.clone())),
        ];
        Ok(Self { inner, tasks })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Result<SocketAddr, WgError> {
        self.inner.udp.local_addr().map_err(|e| WgError(e.to_string()))
    }

    /// Base64 public key.
    pub fn public_key(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.inner.keys().current.public.as_bytes())
    }

    /// Key rotation, step 1: make `private_key` current and keep the old key working. Sessions
    /// stay on the key they were made with; a peer moves to the new key when it handshakes with
    /// it (a CVM does after re-registering, which tells it the new public key).
    pub fn rotate_key(&self, private_key: [u8; 32]) {
        let mut keys = self.inner.keys.write().unwrap_or_else(|e| e.into_inner());
        let generation = keys.current.generation + 1;
        keys.previous = Some(keys.current.clone());
        keys.current = StaticKey::new(private_key, generation);
    }

    /// Key rotation, step 2 (after the grace period): forget the previous key. Peers that never
    /// moved to the current key get a fresh session on it, which works once they re-register.
    pub fn retire_previous_key(&self) {
        let current = {
            let mut keys = self.inner.keys.write().unwrap_or_else(|e| e.into_inner());
            keys.previous = None;
            keys.current.clone()
        };
        let peers = self.inner.peers.read().unwrap_or_else(|e| e.into_inner());
        for p in peers.by_key.values() {
            if p.generation.load(Ordering::Relaxed) != current.generation {
                *p.tunn.lock().unwrap_or_else(|e| e.into_inner()) = current.tunn(&p.config, p.index);
                p.generation.store(current.generation, Ordering::Relaxed);
            }
        }
    }

    /// Public keys of the peers whose session uses the previous key (still to move).
    pub fn peers_on_previous_key(&self) -> Vec<String> {
        let current = self.inner.keys().current.generation;
        let peers = self.inner.peers.read().unwrap_or_else(|e| e.into_inner());
        peers
            .by_key
            .values()
            .filter(|p| p.generation.load(Ordering::Relaxed) != current)
            .map(|p| base64::engine::general_purpose::STANDARD.encode(p.config.public_key))
            .collect()
    }

    /// Counters.
    pub fn stats(&self) -> &DeviceStats {
        &self.inner.stats
    }

    /// Make the peer set exactly `configs`; unchanged peers keep their sessions.
    pub fn set_peer_configs(&self, configs: &[PeerConfig]) -> Result<(), WgError> {
        let mut peers = self.inner.peers.write().unwrap_or_else(|e| e.into_inner());
        let mut next = Peers::default();
        for c in configs {
            if next.by_ip.contains_key(&c.allowed_ip) {
                return Err(WgError(format!("two peers claim {}", c.allowed_ip)));
            }
            let peer = match peers.by_key.get(&c.public_key) {
                Some(p) if p.config == *c => p.clone(),
                _ => {
                    let index = self.fresh_index(&peers, &next);
                    let key = self.inner.keys().current;
                    Arc::new(Peer {
                        tunn: Mutex::new(key.tunn(c, index)),
                        generation: AtomicU64::new(key.generation),
                        endpoint: Mutex::new(c.endpoint),
                        config: c.clone(),
                        index,
                    })
                }
            };
            next.by_key.insert(c.public_key, peer.clone());
            next.by_ip.insert(c.allowed_ip, peer.clone());
            next.by_index.insert(peer.index, peer);
        }
        *peers = next;
        Ok(())
    }

    /// A 24-bit session index prefix not used by a current or kept peer.
    fn fresh_index(&self, old: &Peers, new: &Peers) -> u32 {
        loop {
            let i = self.inner.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
            if i != 0 && !old.by_index.contains_key(&i) && !new.by_index.contains_key(&i) {
                return i;
            }
        }
    }

    /// Start a handshake with every peer whose endpoint is known (a client coming up), so the
    /// gateway learns our endpoint without waiting for outgoing traffic.
    pub fn initiate_handshakes(&self) {
        let mut out = vec![0u8; 256];
        let peers = self.inner.peers.read().unwrap_or_else(|e| e.into_inner());
        for p in peers.by_key.values() {
            let endpoint = *p.endpoint.lock().unwrap_or_else(|e| e.into_inner());
            let mut tunn = p.tunn.lock().unwrap_or_else(|e| e.into_inner());
            if let TunnResult::WriteToNetwork(d) = tunn.format_handshake_initiation(&mut out, false) {
                self.inner.send_to(d, endpoint);
            }
        }
    }

    /// Status of every peer.
    pub fn peer_status(&self) -> Vec<PeerStatus> {
        let peers = self.inner.peers.read().unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        peers
            .by_key
            .values()
            .map(|p| {
                let (since, tx, rx, _, _) = p.tunn.lock().unwrap_or_else(|e| e.into_inner()).stats();
                PeerStatus {
                    public_key: base64::engine::general_purpose::STANDARD.encode(p.config.public_key),
                    allowed_ip: p.config.allowed_ip,
                    endpoint: *p.endpoint.lock().unwrap_or_else(|e| e.into_inner()),
                    latest_handshake: since.and_then(|d| now.checked_sub(d)),
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                }
            })
            .collect()
    }
}

impl Inner {
    fn keys(&self) -> KeyRing {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn send_to(&self, data: &[u8], to: Option<SocketAddr>) {
        let Some(to) = to else { return };
        if let Err(e) = self.udp.try_send_to(data, to) {
            debug!("wg: send to {to}: {e}");
        }
    }

    fn peer_for_datagram(&self, packet: &Packet<'_>, key: &StaticKey) -> Option<Arc<Peer>> {
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        match packet {
            Packet::HandshakeInit(init) => {
                let half = parse_handshake_anon(&key.private, &key.public, init).ok()?;
                peers.by_key.get(&half.peer_static_public).cloned()
            }
            Packet::HandshakeResponse(p) => peers.by_index.get(&(p.receiver_idx >> 8)).cloned(),
            Packet::PacketCookieReply(p) => peers.by_index.get(&(p.receiver_idx >> 8)).cloned(),
            Packet::PacketData(p) => peers.by_index.get(&(p.receiver_idx >> 8)).cloned(),
        }
    }

    /// Decapsulate one datagram from `from`. Returns whether it was accepted, and the length of
    /// a packet left in `out` for the tun interface (written by the caller without the lock).
    fn handle_datagram(&self, datagram: &[u8], from: SocketAddr, out: &mut [u8]) -> (bool, usize) {
        let ring = self.keys();
        // Handshake MACs name the key the sender used: try the current key, then the previous.
        let mut matched = None;
        for key in std::iter::once(&ring.current).chain(ring.previous.as_ref()) {
            match key.rate_limiter.verify_packet(Some(from.ip()), datagram, out) {
                Ok(p) => {
                    matched = Some((p, key));
                    break;
                }
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    self.send_to(cookie, Some(from));
                    return (false, 0);
                }
                Err(_) => {}
            }
        }
        let Some((packet, key)) = matched else {
            return (false, 0);
        };
        let is_init = matches!(packet, Packet::HandshakeInit(_));
        let Some(peer) = self.peer_for_datagram(&packet, key) else {
            return (false, 0);
        };
        let mut tunn = peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
        if is_init && peer.generation.load(Ordering::Relaxed) != key.generation {
            // The peer initiates with another of our keys. Moving to the current key is always
            // allowed (one way, so a replayed old initiation cannot pull it back); moving to the
            // previous key only while the peer has no session on the current one (it was added
            // after the rotation but was told the old key).
            let to_current = key.generation == ring.current.generation;
            if !to_current && tunn.stats().0.is_some() {
                return (false, 0);
            }
            *tunn = key.tunn(&peer.config, peer.index);
            peer.generation.store(key.generation, Ordering::Relaxed);
            debug!(peer = %peer.config.allowed_ip, generation = key.generation, "wg: peer moved to another static key");
        }
        let to_tun = match tunn.decapsulate(Some(from.ip()), datagram, out) {
            TunnResult::Err(e) => {
                debug!("wg: datagram from {from}: {e:?}");
                return (false, 0);
            }
            TunnResult::Done => 0,
            TunnResult::WriteToNetwork(d) => {
                self.send_to(d, Some(from));
                // Flush packets queued while the handshake was in flight (bounded by boringtun's queue).
                while let TunnResult::WriteToNetwork(d) = tunn.decapsulate(None, &[], out) {
                    self.send_to(d, Some(from));
                }
                0
            }
            TunnResult::WriteToTunnelV4(pkt, src) => {
                if src != peer.config.allowed_ip {
                    debug!("wg: peer {} sent a packet from {src}; dropped", peer.config.allowed_ip);
                    return (false, 0);
                }
                pkt.len()
            }
            TunnResult::WriteToTunnelV6(..) => return (false, 0),
        };
        *peer.endpoint.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
        (true, to_tun)
    }
}

async fn udp_loop(inner: Arc<Inner>) {
    let mut buf = vec![0u8; BUF];
    let mut out = vec![0u8; BUF];
    loop {
        let (n, from) = match inner.udp.recv_from(&mut buf).await {
            Ok(v) => v,
            Err(e) => {
                warn!("wg: udp receive: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        inner.stats.rx_datagrams.fetch_add(1, Ordering::Relaxed);
        let Some(datagram) = buf.get(..n) else { continue };
        let (accepted, to_tun) = inner.handle_datagram(datagram, from, &mut out);
        if !accepted {
            inner.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(pkt) = out.get(..to_tun).filter(|p| !p.is_empty())
            && let Err(e) = inner.tun.send(pkt).await
        {
            debug!("wg: tun write: {e}");
        }
    }
}

async fn tun_loop(inner: Arc<Inner>) {
    let mut buf = vec![0u8; BUF - OVERHEAD - 148];
    let mut out = vec![0u8; BUF];
    loop {
        let n = match inner.tun.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                warn!("wg: tun read: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(pkt) = buf.get(..n) else { continue };
        let peer = match Tunn::dst_address(pkt) {
            Some(IpAddr::V4(dst)) => inner
                .peers
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .by_ip
                .get(&dst)
                .cloned(),
            _ => None,
        };
        let Some(peer) = peer else {
            inner.stats.tx_no_route.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        // Encrypt under the peer lock, send after releasing it: waiting for socket space (rather
        // than dropping) keeps TCP through the tunnel from collapsing under load.
        let (len, endpoint) = {
            let mut tunn = peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
            let len = match tunn.encapsulate(pkt, &mut out) {
                TunnResult::WriteToNetwork(d) => d.len(),
                TunnResult::Err(e) => {
                    debug!("wg: encapsulate: {e:?}");
                    0
                }
                _ => 0,
            };
            (len, *peer.endpoint.lock().unwrap_or_else(|e| e.into_inner()))
        };
        if let (Some(d), Some(to)) = (out.get(..len).filter(|d| !d.is_empty()), endpoint)
            && let Err(e) = inner.udp.send_to(d, to).await
        {
            debug!("wg: send to {to}: {e}");
        }
    }
}

async fn timer_loop(inner: Arc<Inner>) {
    let mut out = vec![0u8; BUF];
    let mut tick = tokio::time::interval(TIMER_TICK);
    let mut ticks = 0u32;
    loop {
        tick.tick().await;
        ticks = ticks.wrapping_add(1);
        if ticks.is_multiple_of(4) {
            let ring = inner.keys();
            ring.current.rate_limiter.reset_count();
            if let Some(p) = &ring.previous {
                p.rate_limiter.reset_count();
            }
        }
        let peers: Vec<Arc<Peer>> = inner
            .peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .values()
            .cloned()
            .collect();
        for peer in peers {
            let mut tunn = peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
            if let TunnResult::WriteToNetwork(d) = tunn.update_timers(&mut out) {
                inner.send_to(d, *peer.endpoint.lock().unwrap_or_else(|e| e.into_inner()));
            }
        }
    }
}
