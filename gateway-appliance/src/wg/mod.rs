//! Userspace WireGuard with boringtun's noise state machine: the engine lives in `crates/wg` (shared
//! with guest-init's tunnel client); here it is plugged into registration as the gateway's
//! [`WgBackend`].

use std::collections::HashMap;
use std::time::SystemTime;

pub use dstack_wg::device::{
    DeviceConfig, DeviceStats, PeerConfig, PeerStatus, WgDevice, decode_key, generate_private_key, public_key_b64,
};
pub use dstack_wg::{Tun, client, tun};

use crate::registration::{WgBackend, WgError, WgPeer};

impl WgBackend for WgDevice {
    fn set_peers(&self, peers: &[WgPeer]) -> Result<(), WgError> {
        let configs = peers
            .iter()
            .map(|p| {
                Ok(PeerConfig {
                    public_key: decode_key(&p.public_key)?,
                    allowed_ip: p.ip,
                    endpoint: None,
                    keepalive: Some(25),
                })
            })
            .collect::<Result<Vec<_>, WgError>>()?;
        self.set_peer_configs(&configs)
    }

    fn latest_handshakes(&self) -> HashMap<String, SystemTime> {
        self.peer_status()
            .into_iter()
            .filter_map(|s| Some((s.public_key, s.latest_handshake?)))
            .collect()
    }
}
