//! The virtio device models a VM's [`DeviceConfig`] asks for, in PCI slot order: disks, net, vsock, rng. Shared
//! by the ordinary VM ([`crate::vmm`]) and the TD ([`crate::tdx`]), which differ only in the memory view and
//! the interrupt routing their transports get.

use std::time::Duration;

use super::VirtioDevice;
use super::block::{Block, BlockError, Disk};
use super::net::passt::PasstBackend;
use super::net::tap::TapBackend;
use super::net::{Net, NetBackend, NetError};
use super::rng::Rng;
use super::vsock::{Vsock, VsockError};
use crate::vmm::{DeviceConfig, NetBackendConfig};

/// A device model with the name its PCI function is registered under.
pub type NamedDevice = (String, Box<dyn VirtioDevice>);

/// Opens the backends (disk files, passt socket or tap, vsock socket) and builds the models.
pub fn from_config<E>(devices: &DeviceConfig) -> Result<Vec<NamedDevice>, E>
where
    E: From<BlockError> + From<NetError> + From<VsockError>,
{
    let mut models: Vec<NamedDevice> = Vec::new();
    for (i, d) in devices.disks.iter().enumerate() {
        models.push((
            format!("virtio-blk{i}"),
            Box::new(Block::new(Disk::open(&d.path, d.read_only)?)),
        ));
    }
    if let Some(n) = &devices.net {
        let backend: Box<dyn NetBackend> = match &n.backend {
            NetBackendConfig::Passt { socket } => Box::new(PasstBackend::connect(socket, Duration::from_secs(5))?),
            NetBackendConfig::Tap { ifname, bridge } => Box::new(TapBackend::open(ifname, bridge.as_deref())?),
        };
        models.push(("virtio-net".into(), Box::new(Net::new(n.mac, n.mtu, backend)?)));
    }
    if let Some(v) = &devices.vsock {
        models.push(("virtio-vsock".into(), Box::new(Vsock::new(v.cid, v.uds_path.clone())?)));
    }
    if devices.rng {
        models.push(("virtio-rng".into(), Box::new(Rng::default())));
    }
    Ok(models)
}
