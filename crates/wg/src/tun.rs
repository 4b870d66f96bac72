//! A Linux tun device (`/dev/net/tun`, `IFF_TUN | IFF_NO_PI`: raw IP packets) and its addressing.
//!
//! Addresses, MTU and routes are set with iproute2's `ip` (run in the calling thread's network
//! namespace), which keeps this module free of netlink code.

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

/// Give `name` its address, MTU and extra routes, and bring it up.
pub fn configure_interface(name: &str, address: Cidr, mtu: u16, routes: &[Cidr]) -> io::Result<()> {
    ip(&["addr", "add", &address.to_string(), "dev", name])?;
    ip(&["link", "set", "dev", name, "mtu", &mtu.to_string(), "up"])?;
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
