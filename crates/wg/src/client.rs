//! The CVM side: turn a `RegisterCvmResponse` into a running tunnel (or a `wg-quick` file), as
//! dstack's guest does: listen port 9182, address `<client_ip>/32`, one peer per gateway server
//! with `AllowedIPs = <server ip>/32` and `PersistentKeepalive = 25`, peers sorted by key.

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};

use dstack_rpc::gateway::RegisterCvmResponse;

use crate::device::{DeviceConfig, PeerConfig, WgDevice, decode_key};
use crate::tun::Tun;
use crate::{Cidr, WgError};

/// dstack's guest WireGuard port.
pub const CLIENT_LISTEN_PORT: u16 = 9182;
/// dstack's keepalive.
pub const CLIENT_KEEPALIVE: u16 = 25;
/// Default interface name (dstack: `dstack-wg0`).
pub const CLIENT_IFNAME: &str = "dstack-wg0";

/// Everything needed to bring the client tunnel up.
#[derive(Debug, Clone)]
pub struct ClientTunnel {
    /// Interface settings.
    pub device: DeviceConfig,
    /// The gateway servers.
    pub peers: Vec<PeerConfig>,
}

fn resolve(endpoint: &str) -> Result<SocketAddr, WgError> {
    endpoint
        .to_socket_addrs()
        .map_err(|e| WgError(format!("endpoint {endpoint:?}: {e}")))?
        .next()
        .ok_or_else(|| WgError(format!("endpoint {endpoint:?}: no address")))
}

impl ClientTunnel {
    /// Build the tunnel description from the gateway's answer.
    pub fn from_response(resp: &RegisterCvmResponse, private_key: [u8; 32], ifname: &str) -> Result<Self, WgError> {
        let wg = resp
            .wg
            .as_ref()
            .ok_or_else(|| WgError("RegisterCvmResponse.wg missing".into()))?;
        let client_ip: Ipv4Addr = wg
            .client_ip
            .parse()
            .map_err(|e| WgError(format!("wg.client_ip {:?}: {e}", wg.client_ip)))?;
        let mut peers = Vec::new();
        for (i, s) in wg.servers.iter().enumerate() {
            let ip: Ipv4Addr =
                s.ip.parse()
                    .map_err(|e| WgError(format!("wg.servers[{i}].ip {:?}: {e}", s.ip)))?;
            peers.push(PeerConfig {
                public_key: decode_key(&s.pk).map_err(|e| WgError(format!("wg.servers[{i}].pk: {e}")))?,
                allowed_ip: ip,
                endpoint: Some(resolve(&s.endpoint)?),
                keepalive: Some(CLIENT_KEEPALIVE),
            });
        }
        if peers.is_empty() {
            return Err(WgError("RegisterCvmResponse lists no WireGuard servers".into()));
        }
        // By the base64 text, as dstack sorts its server list.
        peers.sort_by_cached_key(|p| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(p.public_key)
        });
        Ok(Self {
            device: DeviceConfig {
                ifname: ifname.to_owned(),
                private_key,
                listen: SocketAddr::from(([0, 0, 0, 0], CLIENT_LISTEN_PORT)),
                address: Cidr::v4(client_ip, 32),
                mtu: 1420,
                routes: peers.iter().map(|p| Cidr::v4(p.allowed_ip, 32)).collect(),
            },
            peers,
        })
    }

    /// Start the userspace tunnel (inside a tokio runtime, in the current network namespace).
    pub async fn start(self) -> Result<WgDevice, WgError> {
        let dev = WgDevice::start(self.device).await?;
        dev.set_peer_configs(&self.peers)?;
        dev.initiate_handshakes();
        Ok(dev)
    }

    /// [`ClientTunnel::start`] with the interface addressed by `configure` (called once the tun device
    /// exists, before any packet flows) instead of iproute2.
    pub async fn start_with(
        self,
        configure: impl FnOnce(&Tun, &DeviceConfig) -> Result<(), WgError>,
    ) -> Result<WgDevice, WgError> {
        let tun = Tun::open(&self.device.ifname).map_err(|e| WgError(format!("tun {}: {e}", self.device.ifname)))?;
        configure(&tun, &self.device)?;
        let dev = WgDevice::start_on(tun, &self.device).await?;
        dev.set_peer_configs(&self.peers)?;
        dev.initiate_handshakes();
        Ok(dev)
    }

    /// The same tunnel as a `wg-quick` file (dstack's `dstack-wg0.conf` layout).
    pub fn wg_quick_conf(&self) -> String {
        use base64::Engine;
        let b64 = |k: &[u8; 32]| base64::engine::general_purpose::STANDARD.encode(k);
        let mut s = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = {}\nAddress = {}\n",
            b64(&self.device.private_key),
            self.device.listen.port(),
            self.device.address
        );
        for p in &self.peers {
            s.push_str(&format!(
                "\n[Peer]\nPublicKey = {}\nAllowedIPs = {}/32\n",
                b64(&p.public_key),
                p.allowed_ip
            ));
            if let Some(e) = p.endpoint {
                s.push_str(&format!("Endpoint = {e}\n"));
            }
            if let Some(k) = p.keepalive {
                s.push_str(&format!("PersistentKeepalive = {k}\n"));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use dstack_rpc::gateway::{WireGuardConfig, WireGuardPeer};

    use super::*;

    fn resp(servers: Vec<WireGuardPeer>) -> RegisterCvmResponse {
        RegisterCvmResponse {
            wg: Some(WireGuardConfig {
                client_ip: "10.0.0.2".into(),
                servers,
            }),
            ..Default::default()
        }
    }

    fn server(pk: u8, ip: &str) -> WireGuardPeer {
        use base64::Engine;
        WireGuardPeer {
            pk: base64::engine::general_purpose::STANDARD.encode([pk; 32]),
            ip: ip.into(),
            endpoint: "192.0.2.1:51820".into(),
        }
    }

    #[test]
    fn builds_dstack_layout_sorted_by_key() {
        let t = ClientTunnel::from_response(
            &resp(vec![server(9, "10.0.0.3"), server(1, "10.0.0.1")]),
            [7; 32],
            "wgt",
        )
        .unwrap();
        assert_eq!(t.device.listen.port(), 9182);
        assert_eq!(t.device.address.to_string(), "10.0.0.2/32");
        assert_eq!(t.peers[0].public_key, [1; 32]);
        assert_eq!(t.peers[1].allowed_ip, Ipv4Addr::new(10, 0, 0, 3));
        assert!(t.peers.iter().all(|p| p.keepalive == Some(25)));
        let conf = t.wg_quick_conf();
        assert!(conf.contains("ListenPort = 9182\nAddress = 10.0.0.2/32\n"));
        assert!(conf.contains("AllowedIPs = 10.0.0.1/32\nEndpoint = 192.0.2.1:51820\nPersistentKeepalive = 25\n"));
    }

    #[test]
    fn refuses_malformed_answers() {
        assert!(ClientTunnel::from_response(&RegisterCvmResponse::default(), [7; 32], "x").is_err());
        assert!(ClientTunnel::from_response(&resp(vec![]), [7; 32], "x").is_err());
        let mut bad = server(1, "10.0.0.1");
        bad.pk = "AAAA".into();
        let e = ClientTunnel::from_response(&resp(vec![bad]), [7; 32], "x").unwrap_err();
        assert!(e.0.contains("servers[0].pk"), "{e}");
        assert!(ClientTunnel::from_response(&resp(vec![server(1, "nope")]), [7; 32], "x").is_err());
    }
}
