//! A Linux tun device (`/dev/net/tun`, `IFF_TUN | IFF_NO_PI`: raw IP packets) and its addressing.
//!
//! Address, netmask, MTU and the up flag are set with the classic interface ioctls (no `ip` binary needed:
//! the gateway appliance's image holds nothing else); extra routes with iproute2's `ip`. Both act in the
//! calling thread's network namespace, which keeps this module free of netlink code.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use tokio::io::unix::AsyncFd;

use crate::Cidr;

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// The prefix of `struct ifreq` that `TUNSETIFF` reads (name + flags), padded to its full 40 bytes.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tun interface; closing it removes the interface.
#[derive(Debug)]
pub struct Tun {
    fd: AsyncFd<OwnedFd>,
    name: String,
}

impl Tun {
    /// Create (or attach to) tun interface `name` in the current thread's network namespace.
    /// Must be called inside a tokio runtime.
    pub fn open(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {name:?}"),
            ));
        }
        // SAFETY: the path is a NUL-terminated literal; the flags are valid for open(2).
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly opened descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads a `struct ifreq` (40 bytes, name then flags), which `req` lays out.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReqFlags) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is an owned, valid descriptor that the `AsyncFd` owns until it is dropped;
        // nothing replaces or closes it meanwhile.
        let fd = unsafe { AsyncFd::register(fd)? };
        Ok(Self {
            fd,
            name: name.to_owned(),
        })
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Read one packet.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            let res = guard.try_io(|fd| {
                // SAFETY: `buf` is valid for `buf.len()` writable bytes for the duration of the call.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            if let Ok(r) = res {
                return r;
            }
        }
    }

    /// Write one packet.
    pub async fn send(&self, pkt: &[u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.writable().await?;
            let res = guard.try_io(|fd| {
                // SAFETY: `pkt` is valid for `pkt.len()` readable bytes for the duration of the call.
                let n = unsafe { libc::write(fd.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            if let Ok(r) = res {
                return r;
            }
        }
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// `struct ifreq` with an IPv4 `sockaddr_in` (`SIOCSIFADDR`, `SIOCSIFNETMASK`), padded to 40 bytes.
#[repr(C)]
struct IfReqAddr {
    name: [u8; libc::IFNAMSIZ],
    addr: libc::sockaddr_in,
    _pad: [u8; 8],
}

/// `struct ifreq` with an `int` (`SIOCSIFMTU`), padded to 40 bytes.
#[repr(C)]
struct IfReqInt {
    name: [u8; libc::IFNAMSIZ],
    value: libc::c_int,
    _pad: [u8; 20],
}

// Every `struct ifreq` variant is the kernel's 40 bytes (the ioctls copy exactly that much).
const _: () = assert!(std::mem::size_of::<IfReqAddr>() == 40);
const _: () = assert!(std::mem::size_of::<IfReqInt>() == 40);
const _: () = assert!(std::mem::size_of::<IfReqFlags>() == 40);

fn ifname(name: &str) -> io::Result<[u8; libc::IFNAMSIZ]> {
    let mut out = [0u8; libc::IFNAMSIZ];
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?}"),
        ));
    }
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

fn sockaddr_in(ip: std::net::Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// One interface ioctl on `sock`; `what` names it in the error.
fn if_ioctl<T>(sock: &OwnedFd, request: libc::c_ulong, req: &mut T, what: &str) -> io::Result<()> {
    // SAFETY: `req` is a live, exclusively borrowed `struct ifreq` layout (40 bytes, name first) for the
    // duration of the call, as these SIOC* requests read and write.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut T) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Address, netmask, MTU and `IFF_UP` through the classic interface ioctls, so configuring the device needs
/// no `ip` binary (the gateway appliance's container image holds only the gateway).
fn configure_ipv4(name: &str, address: Cidr, mtu: u16) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let name_bytes = ifname(name)?;
    let mut addr = IfReqAddr {
        name: name_bytes,
        addr: sockaddr_in(address.addr),
        _pad: [0; 8],
    };
    if_ioctl(
        &sock,
        libc::SIOCSIFADDR as _,
        &mut addr,
        &format!("{name}: setting address {address}"),
    )?;
    let mask = u32::MAX
        .checked_shl(32 - u32::from(address.prefix.min(32)))
        .unwrap_or(0);
    addr.addr = sockaddr_in(std::net::Ipv4Addr::from(mask));
    if_ioctl(
        &sock,
        libc::SIOCSIFNETMASK as _,
        &mut addr,
        &format!("{name}: setting netmask"),
    )?;
    let mut m = IfReqInt {
        name: name_bytes,
        value: libc::c_int::from(mtu),
        _pad: [0; 20],
    };
    if_ioctl(
        &sock,
        libc::SIOCSIFMTU as _,
        &mut m,
        &format!("{name}: setting MTU {mtu}"),
    )?;
    let mut flags = IfReqFlags {
        name: name_bytes,
        flags: 0,
        _pad: [0; 22],
    };
    if_ioctl(
        &sock,
        libc::SIOCGIFFLAGS as _,
        &mut flags,
        &format!("{name}: reading flags"),
    )?;
    flags.flags |= libc::IFF_UP as libc::c_short;
    if_ioctl(
        &sock,
        libc::SIOCSIFFLAGS as _,
        &mut flags,
        &format!("{name}: bringing it up"),
    )
}

/// Give `name` its address and MTU and bring it up (ioctls); extra routes outside the address's prefix
/// go through `ip`.
pub fn configure_interface(name: &str, address: Cidr, mtu: u16, routes: &[Cidr]) -> io::Result<()> {
    configure_ipv4(name, address, mtu)?;
    for r in routes {
        if !address.contains(r.addr) || address.prefix > r.prefix {
            ip(&[
                "route",
                "replace",
                &format!("{}/{}", r.network(), r.prefix),
                "dev",
                name,
            ])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ioctl configuration, read back with iproute2 (an independent reader). Needs root and
    /// /dev/net/tun; skipped loudly without them.
    #[tokio::test]
    async fn ioctls_set_address_prefix_mtu_and_up() {
        let name = format!("wgt{}", std::process::id() % 100_000);
        let tun = match Tun::open(&name) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("SKIPPED ioctls_set_address_prefix_mtu_and_up: tun {name}: {e} (needs root)");
                return;
            }
        };
        configure_interface(&name, Cidr::v4(std::net::Ipv4Addr::new(10, 213, 7, 1), 20), 1380, &[]).unwrap();
        let out = Command::new("ip").args(["-o", "addr", "show", "dev", &name]).output();
        let Ok(out) = out else {
            eprintln!("SKIPPED the read-back: no ip binary");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("inet 10.213.7.1/20"), "{text}");
        let link = Command::new("ip")
            .args(["-o", "link", "show", "dev", &name])
            .output()
            .unwrap();
        let link = String::from_utf8_lossy(&link.stdout);
        assert!(link.contains("mtu 1380") && link.contains(",UP"), "{link}");
        drop(tun);
    }
}
