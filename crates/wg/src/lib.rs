//! Userspace WireGuard shared by the gateway appliance (its data plane) and guest-init (the CVM's tunnel
//! to the gateways): boringtun's noise state machine over a Linux tun device and one UDP socket.
//!
//! * [`device`]: the interface ([`WgDevice`]): crypto-key routing, live peer changes, key rotation.
//! * [`tun`]: the tun device and its addressing with iproute2 (or addressed by the caller).
//! * [`client`]: the CVM side: a `RegisterCvmResponse` turned into a tunnel ([`ClientTunnel`]).
//!
//! Kept out of the gateway crate so that guest-init (a static binary) gets the tunnel without the
//! gateway's ACME/HTTP dependencies.

pub mod client;
pub mod device;
pub mod tun;

use std::net::Ipv4Addr;

use serde::{Deserialize, Deserializer};

pub use client::ClientTunnel;
pub use device::{
    DeviceConfig, DeviceStats, PeerConfig, PeerStatus, WgDevice, decode_key, generate_private_key, public_key_b64,
};
pub use tun::Tun;

/// Data-plane errors.
#[derive(Debug, thiserror::Error)]
#[error("wireguard: {0}")]
pub struct WgError(pub String);

/// An IPv4 network `a.b.c.d/len` (WireGuard addressing is IPv4 here, as in dstack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Address as written (host bits may be set, e.g. the gateway's own `10.0.0.1/24`).
    pub addr: Ipv4Addr,
    /// Prefix length 0..=32.
    pub prefix: u8,
}

impl Cidr {
    /// Construct; `prefix` is clamped to 32.
    pub const fn v4(addr: Ipv4Addr, prefix: u8) -> Self {
        Self {
            addr,
            prefix: if prefix > 32 { 32 } else { prefix },
        }
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// First address of the network.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// Last address of the network.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = addr.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
        let prefix: u8 = prefix.trim().parse().map_err(|e| format!("{s:?}: prefix: {e}"))?;
        if prefix > 32 {
            return Err(format!("{s:?}: prefix longer than 32"));
        }
        Ok(Self { addr, prefix })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_matches_rfc7748_vector() {
        // RFC 7748 §6.1, Alice's key pair.
        let private: [u8; 32] = hex_32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = hex_32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        let b64 = public_key_b64(&private);
        assert_eq!(decode_key(&b64).unwrap(), public);
    }

    #[test]
    fn keys_must_be_32_bytes_of_base64() {
        assert!(decode_key("AAAA").unwrap_err().0.contains("3 bytes, expected 32"));
        assert!(decode_key("not base64!").is_err());
        let k = generate_private_key().unwrap();
        assert_ne!(k, generate_private_key().unwrap());
    }

    #[test]
    fn cidr_parses_and_contains() {
        let c: Cidr = "10.0.0.1/25".parse().unwrap();
        assert_eq!(
            (c.network(), c.broadcast()),
            (Ipv4Addr::new(10, 0, 0, 0), Ipv4Addr::new(10, 0, 0, 127))
        );
        assert!(c.contains(Ipv4Addr::new(10, 0, 0, 127)) && !c.contains(Ipv4Addr::new(10, 0, 0, 128)));
        assert!("10.0.0.1/33".parse::<Cidr>().is_err());
        assert_eq!("10.0.0.9".parse::<Cidr>().unwrap().to_string(), "10.0.0.9/32");
    }

    fn hex_32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
