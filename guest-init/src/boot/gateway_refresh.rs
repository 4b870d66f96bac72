//! Keeping the gateway registration fresh (ours; dstack's guest runs `dstack-gateway-checker` for this).
//!
//! A gateway forgets its peers when it restarts without cluster state, recycles a CVM it has not heard from,
//! or rotates its own WireGuard key; the CVM then stays unreachable until it registers again. So after the
//! boot's registration a background task of PID 1's runtime:
//! - re-registers **periodically** ([`RefreshPolicy::interval`], 60 s ± 10 %: `RegisterCvm` carries no
//!   interval of its own), with the same WireGuard key, so a gateway that kept its state returns the same
//!   address and nothing changes;
//! - re-registers **at once** when the tunnel looks dead: no handshake for [`RefreshPolicy::probe_after`],
//!   then a handshake it initiates itself goes unanswered for [`RefreshPolicy::probe_timeout`] (a gateway that
//!   lost its peer table drops our handshakes silently; a live one answers within a round trip). A tunnel
//!   with 25 s keepalives only re-handshakes every two minutes by itself, hence the explicit probe. With the
//!   defaults (probe after 25 s, 10 s to answer, checked every 5 s) a gateway that lost us is noticed within
//!   ~40 s, at the cost of one extra handshake per 25 s per CVM (microseconds of work at the gateway);
//! - after a failed pass over every gateway URL, waits with jittered exponential backoff
//!   ([`RefreshPolicy::retry_min`] doubling up to [`RefreshPolicy::retry_max`]) and makes a fresh RA-TLS
//!   client identity (a new quote) before the next attempt.
//!
//! Applying an answer ([`super::Gateway`] owns the tunnel): same address → the WireGuard peers are replaced
//! live when the gateway's servers or keys changed (unchanged peers keep their sessions) and their routes
//! added; a different address → the tunnel is rebuilt on the same key. Either way a handshake is initiated
//! so that the gateway learns our endpoint at once.
//!
//! [`Monitor`] holds the decisions (pure, unit-tested); [`Refresher`] does the I/O.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dstack_wg::{ClientTunnel, PeerConfig, WgDevice};
use tokio::time::MissedTickBehavior;

use super::{GatewayError, GatewayPlan, Registration, client_identity, client_tls, register_first};
use crate::boot::tee::TeeMeasurer;

/// When to re-register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshPolicy {
    /// Periodic re-registration (jittered by ± 10 %).
    pub interval: Duration,
    /// How often the tunnel is looked at.
    pub check_every: Duration,
    /// No handshake for this long: initiate one (the probe).
    pub probe_after: Duration,
    /// A probe unanswered for this long: the gateway no longer knows us; re-register now.
    pub probe_timeout: Duration,
    /// First wait after a failed attempt (doubles per failure, "equal jitter": between half and all of it).
    pub retry_min: Duration,
    /// Longest wait between failed attempts.
    pub retry_max: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            check_every: Duration::from_secs(5),
            probe_after: Duration::from_secs(25),
            probe_timeout: Duration::from_secs(10),
            retry_min: Duration::from_secs(2),
            retry_max: Duration::from_secs(60),
        }
    }
}

/// Why a re-registration happens (logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The periodic refresh.
    Periodic,
    /// Retrying after `failures` failed attempts.
    Retry { failures: u32 },
    /// No handshake for `quiet` (`None`: never since the tunnel came up), and a probe went unanswered for
    /// `probe`.
    HandshakeLost { quiet: Duration, probe: Duration },
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Periodic => write!(f, "periodic refresh"),
            Self::Retry { failures } => write!(f, "retry after {failures} failed attempt(s)"),
            Self::HandshakeLost { quiet, probe } => write!(
                f,
                "tunnel silent: no WireGuard handshake for {}s and none answered {}s after a probe",
                quiet.as_secs(),
                probe.as_secs()
            ),
        }
    }
}

/// What the refresher should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Idle,
    /// Initiate a handshake with every gateway server.
    Probe,
    Register(Reason),
}

/// The refresh decisions, driven by the caller's clock and the tunnel's handshake age.
#[derive(Debug, Clone)]
pub struct Monitor {
    policy: RefreshPolicy,
    next_register: Instant,
    /// When the current registration took effect (stands in for the handshake time before the first one).
    since: Instant,
    probe: Option<Instant>,
    failures: u32,
}

impl Monitor {
    /// Right after a successful registration at `now`. `u` in `[0, 1)` jitters the first interval.
    pub fn new(policy: RefreshPolicy, now: Instant, u: f64) -> Self {
        let mut m = Self {
            policy,
            next_register: now,
            since: now,
            probe: None,
            failures: 0,
        };
        m.registered(now, u);
        m
    }

    /// Consecutive failed attempts.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// `handshake_age`: time since the youngest handshake with any gateway server (`None`: none yet).
    pub fn tick(&mut self, now: Instant, handshake_age: Option<Duration>) -> Action {
        if now >= self.next_register {
            return Action::Register(match self.failures {
                0 => Reason::Periodic,
                n => Reason::Retry { failures: n },
            });
        }
        if self.failures > 0 {
            // Backing off: the tunnel cannot tell anything the failed registration did not.
            return Action::Idle;
        }
        // Counted from the latest registration at most: it initiated a handshake of its own.
        let up_for = now.saturating_duration_since(self.since);
        let quiet = handshake_age.map_or(up_for, |a| a.min(up_for));
        if quiet < self.policy.probe_after {
            self.probe = None;
            return Action::Idle;
        }
        match self.probe {
            None => {
                self.probe = Some(now);
                Action::Probe
            }
            // A handshake completed after the probe was sent: alive (normally caught above).
            Some(sent) if quiet < now.saturating_duration_since(sent) => {
                self.probe = None;
                Action::Idle
            }
            Some(sent) if now.saturating_duration_since(sent) >= self.policy.probe_timeout => {
                self.probe = None;
                Action::Register(Reason::HandshakeLost {
                    quiet,
                    probe: now.saturating_duration_since(sent),
                })
            }
            Some(_) => Action::Idle,
        }
    }

    /// A registration succeeded at `now`: next periodic one in `interval × (0.9 + 0.2 u)`.
    pub fn registered(&mut self, now: Instant, u: f64) {
        self.failures = 0;
        self.probe = None;
        self.since = now;
        self.next_register = now + self.policy.interval.mul_f64(0.9 + 0.2 * u.clamp(0.0, 1.0));
    }

    /// An attempt failed at `now`; returns the wait before the next one:
    /// `min(retry_min × 2^(failures-1), retry_max) × (0.5 + 0.5 u)`.
    pub fn failed(&mut self, now: Instant, u: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.probe = None;
        let exp = self.failures.saturating_sub(1).min(16);
        let full = self
            .policy
            .retry_min
            .saturating_mul(1u32 << exp)
            .min(self.policy.retry_max);
        let wait = full.mul_f64(0.5 + 0.5 * u.clamp(0.0, 1.0));
        self.next_register = now + wait;
        wait
    }
}

/// A uniform value in `[0, 1)` for jitter (0.5 if the kernel's generator fails: jitter is not security).
pub fn jitter() -> f64 {
    let mut b = [0u8; 8];
    match getrandom::fill(&mut b) {
        Ok(()) => (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

/// The running tunnel as the gateway answered.
pub struct Running {
    pub reg: Registration,
    pub dev: WgDevice,
    pub peers: Vec<PeerConfig>,
}

/// The tunnel slot shared by [`super::Gateway`] and its refresher. `epoch` changes whenever the gateway is
/// stopped or restarted, so a refresher of an older epoch never installs a tunnel.
#[derive(Default)]
pub struct Slot {
    pub running: Option<Running>,
    pub epoch: u64,
}

pub type Shared = Arc<Mutex<Slot>>;

pub fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Slot> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Youngest handshake age over the tunnel's peers.
pub fn youngest_handshake(dev: &WgDevice) -> Option<Duration> {
    dev.peer_status()
        .into_iter()
        .filter_map(|s| s.latest_handshake.and_then(|t| t.elapsed().ok()))
        .min()
}

/// What a re-registration changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Nothing,
    /// Same address; the gateway's servers or keys changed and the peers were replaced live.
    Peers,
    /// Another address: the tunnel was rebuilt on the same key.
    Rebuilt,
}

/// The background task's inputs.
pub struct Refresher {
    pub plan: GatewayPlan,
    pub measurer: Arc<TeeMeasurer>,
    pub tls: Arc<rustls::ClientConfig>,
    pub wg_key: zeroize::Zeroizing<[u8; 32]>,
    pub public_key: String,
    pub ifname: String,
    pub shared: Shared,
    pub epoch: u64,
    /// Root under which the status file is rewritten (`None`: not written).
    pub status_root: Option<PathBuf>,
    pub policy: RefreshPolicy,
}

impl Refresher {
    /// Runs until aborted (or the slot moves to another epoch).
    pub async fn run(mut self) {
        let mut mon = Monitor::new(self.policy.clone(), Instant::now(), jitter());
        let mut ticks = tokio::time::interval(self.policy.check_every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut refreshes = 0u64;
        loop {
            ticks.tick().await;
            let age = {
                let slot = lock(&self.shared);
                if slot.epoch != self.epoch {
                    return;
                }
                match &slot.running {
                    Some(r) => youngest_handshake(&r.dev),
                    None => return,
                }
            };
            match mon.tick(Instant::now(), age) {
                Action::Idle => {}
                Action::Probe => {
                    tracing::debug!("gateway: no handshake for a while; probing");
                    if let Some(r) = &lock(&self.shared).running {
                        r.dev.initiate_handshakes();
                    }
                }
                Action::Register(reason) => {
                    let log = |msg: String| {
                        if matches!(reason, Reason::Periodic) {
                            tracing::debug!("{msg}");
                        } else {
                            tracing::info!("{msg}");
                        }
                    };
                    log(format!("gateway: re-registering ({reason})"));
                    match self.reregister().await {
                        Ok((reg, change)) => {
                            refreshes += 1;
                            mon.registered(Instant::now(), jitter());
                            let msg = format!(
                                "gateway: re-registered with {} as {} ({reason}; {change:?} changed; refresh #{refreshes})",
                                reg.url, reg.client_ip
                            );
                            if change == Change::Nothing {
                                log(msg);
                            } else {
                                tracing::info!("{msg}");
                            }
                        }
                        Err(e) => {
                            let wait = mon.failed(Instant::now(), jitter());
                            tracing::warn!(
                                "gateway: re-registration failed ({reason}): {e}; attempt {} in {wait:?}",
                                mon.failures() + 1
                            );
                            self.renew_identity().await;
                        }
                    }
                }
            }
        }
    }

    /// A fresh RA-TLS client identity (new key and quote) for the next attempt; keeps the old one if that fails.
    async fn renew_identity(&mut self) {
        let Some(log) = self.measurer.event_log() else { return };
        let fresh = async {
            let (cert, key) = client_identity(&log).await?;
            client_tls(&self.plan, cert, &key)
        };
        match fresh.await {
            Ok(tls) => self.tls = tls,
            Err(e) => tracing::warn!("gateway: renewing the RA-TLS client identity: {e}"),
        }
    }

    async fn reregister(&self) -> Result<(Registration, Change), GatewayError> {
        let (url, resp) = register_first(&self.plan, Arc::clone(&self.tls), &self.public_key).await?;
        let tunnel = ClientTunnel::from_response(&resp, *self.wg_key, &self.ifname)
            .map_err(|e| GatewayError::Tunnel(e.to_string()))?;
        let client_ip = tunnel.device.address.addr;
        let reg = Registration::new(url, &resp, client_ip, self.public_key.clone());
        let old = {
            let mut slot = lock(&self.shared);
            if slot.epoch != self.epoch {
                return Err(GatewayError::Tunnel("the gateway was stopped".into()));
            }
            let Some(running) = slot.running.as_mut() else {
                return Err(GatewayError::Tunnel("the gateway was stopped".into()));
            };
            if running.reg.client_ip == client_ip {
                let change = if running.peers == tunnel.peers {
                    Change::Nothing
                } else {
                    running
                        .dev
                        .set_peer_configs(&tunnel.peers)
                        .map_err(|e| GatewayError::Tunnel(e.to_string()))?;
                    super::add_server_routes(&self.ifname, &tunnel.device)
                        .map_err(|e| GatewayError::Tunnel(e.to_string()))?;
                    Change::Peers
                };
                // The gateway may be a fresh process that knows our key but not our endpoint.
                running.dev.initiate_handshakes();
                running.reg = reg.clone();
                running.peers = tunnel.peers;
                drop(slot);
                self.write_status(&reg);
                return Ok((reg, change));
            }
            slot.running.take()
        };
        tracing::info!(
            "gateway: address changed from {} to {client_ip}; rebuilding the tunnel",
            old.as_ref()
                .map_or_else(|| "?".to_owned(), |r| r.reg.client_ip.to_string())
        );
        drop(old);
        super::wait_link_gone(&self.ifname, Duration::from_secs(2)).await;
        let peers = tunnel.peers.clone();
        let dev = tunnel
            .start_with(super::address_interface)
            .await
            .map_err(|e| GatewayError::Tunnel(e.to_string()))?;
        let mut slot = lock(&self.shared);
        if slot.epoch != self.epoch {
            return Err(GatewayError::Tunnel("the gateway was stopped".into()));
        }
        slot.running = Some(Running {
            reg: reg.clone(),
            dev,
            peers,
        });
        drop(slot);
        self.write_status(&reg);
        Ok((reg, Change::Rebuilt))
    }

    fn write_status(&self, reg: &Registration) {
        if let Some(root) = &self.status_root {
            super::write_status(root, reg);
        }
    }
}

#[cfg(test)]
#[path = "gateway_refresh_tests.rs"]
mod tests;
