//! The tap backend for bridge networking: opens (or creates) tap interface `ifname` with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte vnet header, brings it up and, if asked, enslaves it to
//! an existing bridge. No offloads are enabled on the tap (`TUNSETOFFLOAD 0`), so the kernel hands us only
//! complete, checksummed frames and the header we read is all zero; we write a zero header in front of each
//! frame.

use std::ffi::c_char;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{HDR_LEN, NetBackend, NetError};

/// `SIOCBRADDIF` (linux/sockios.h): add an interface (by index) to a bridge.
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
const TUN_PATH: &str = "/dev/net/tun";

pub struct TapBackend {
    file: File,
    ifname: String,
}

fn valid_ifname(name: &str) -> bool {
    (1..libc::IFNAMSIZ).contains(&name.len())
        && !name.bytes().any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
        && name != "."
        && name != ".."
}

/// An `ifreq` with `name` in `ifr_name` (validated by the caller) and a zeroed union.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of integers/sockaddrs); all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as c_char;
    }
    req
}

fn ifname_of(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req.ifr_name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl TapBackend {
    /// Returns whether `/dev/net/tun` can be opened here (tests skip otherwise).
    pub fn available() -> Result<(), io::Error> {
        OpenOptions::new().read(true).write(true).open(TUN_PATH).map(drop)
    }

    /// Opens tap `ifname` (created if absent, as a non-persistent device that vanishes with this fd), brings
    /// it up and attaches it to `bridge` if given.
    pub fn open(ifname: &str, bridge: Option<&str>) -> Result<Self, NetError> {
        if !valid_ifname(ifname) {
            return Err(NetError::BadIfName(ifname.into()));
        }
        if let Some(b) = bridge
            && !valid_ifname(b)
        {
            return Err(NetError::BadIfName(b.into()));
        }
        let err = |op: &'static str| {
            let ifname = ifname.to_owned();
            move |source| NetError::Tap { ifname, op, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(err("opening /dev/net/tun"))?;
        let mut req = ifreq(ifname);
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and updates the ifreq we pass, which lives across the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(err("TUNSETIFF")(io::Error::last_os_error()));
        }
        let ifname = ifname_of(&req);
        let hdr_len = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(err("TUNSETVNETHDRSZ")(io::Error::last_os_error()));
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value (no offloads).
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(err("TUNSETOFFLOAD")(io::Error::last_os_error()));
        }
        let ctl = control_socket().map_err(err("socket(AF_INET)"))?;
        let mut req = ifreq(&ifname);
        // SAFETY: SIOCGIFFLAGS fills the flags of the ifreq we own.
        if unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(err("SIOCGIFFLAGS")(io::Error::last_os_error()));
        }
        // SAFETY: reading the flags member the kernel just wrote.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
        if unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
            return Err(err("SIOCSIFFLAGS (up)")(io::Error::last_os_error()));
        }
        if let Some(bridge) = bridge {
            let index = interface_index(&ctl, &ifname).map_err(err("SIOCGIFINDEX"))?;
            let mut breq = ifreq(bridge);
            breq.ifr_ifru.ifru_ifindex = index;
            // SAFETY: SIOCBRADDIF reads the bridge name and the interface index from the ifreq we own.
            if unsafe { libc::ioctl(ctl.as_raw_fd(), SIOCBRADDIF, &breq) } < 0 {
                return Err(err("adding the tap to the bridge (SIOCBRADDIF)")(
                    io::Error::last_os_error(),
                ));
            }
        }
        Ok(Self { file, ifname })
    }

    /// The interface name the kernel gave the tap.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }
}

fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The index of interface `name` (valid name) in the current network namespace.
pub fn interface_index(ctl: &OwnedFd, name: &str) -> io::Result<libc::c_int> {
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFINDEX fills the index of the ifreq we own.
    if unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: reading the member the kernel just wrote.
    Ok(unsafe { req.ifr_ifru.ifru_ifindex })
}

impl NetBackend for TapBackend {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut hdr = [0u8; HDR_LEN];
        loop {
            let mut iov = [IoSliceMut::new(&mut hdr), IoSliceMut::new(buf)];
            // SAFETY: readv into two buffers we own; IoSliceMut is ABI-compatible with iovec.
            let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_mut_ptr().cast(), 2) };
            if n >= 0 {
                let n = n as usize;
                if n < HDR_LEN {
                    // A read shorter than the vnet header carries no frame.
                    return Ok(None);
                }
                return Ok(Some(n - HDR_LEN));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                ErrorKind::WouldBlock => return Ok(None),
                ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let hdr = [0u8; HDR_LEN];
        let iov = [IoSlice::new(&hdr), IoSlice::new(frame)];
        loop {
            // SAFETY: writev from two buffers we own; IoSlice is ABI-compatible with iovec.
            let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr().cast(), 2) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                // The tap's queue is full: drop the frame, as a NIC would.
                ErrorKind::WouldBlock => return Ok(()),
                ErrorKind::Interrupted => {}
                // The interface is down (e.g. an admin took it down): drop, the link may come back.
                _ if e.raw_os_error() == Some(libc::EIO) => return Ok(()),
                _ => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_validated() {
        for bad in ["", "a/b", "sixteen-chars-xx", "a b", ".."] {
            assert!(
                matches!(TapBackend::open(bad, None), Err(NetError::BadIfName(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            TapBackend::open("tap0", Some("br/0")),
            Err(NetError::BadIfName(_))
        ));
        assert!(valid_ifname("tap-dstack0"));
    }

    /// A raw AF_PACKET socket bound to interface `index` (sees and sends whole Ethernet frames).
    fn packet_socket(index: libc::c_int) -> OwnedFd {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: fd is fresh and ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain old data.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = index;
        // SAFETY: bind reads a sockaddr_ll of the given size that lives across the call.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sa).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind AF_PACKET: {}", io::Error::last_os_error());
        let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
        // SAFETY: SO_RCVTIMEO reads a timeval of the given size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        fd
    }

    fn ip(args: &[&str]) {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("running ip(8)");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// In a network namespace of its own (so nothing on the host changes): make a bridge, open a tap attached
    /// to it, and move frames both ways between the backend and an AF_PACKET socket on the tap. Skipped, with
    /// the reason, where /dev/net/tun or a new network namespace is not available.
    #[test]
    fn tap_in_private_netns_attaches_to_bridge_and_moves_frames() {
        if let Err(e) = TapBackend::available() {
            eprintln!("SKIPPED tap test: /dev/net/tun is unavailable here: {e}");
            return;
        }
        // unshare(CLONE_NEWNET) affects only the calling thread: do everything on a thread of our own, and
        // let ip(8) children inherit that thread's namespace.
        let r = std::thread::spawn(|| {
            // SAFETY: unshare changes only this thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error()));
            }
            ip(&["link", "add", "brtest0", "type", "bridge"]);
            ip(&["link", "set", "brtest0", "up"]);
            let mut tap = TapBackend::open("taptest0", Some("brtest0")).expect("open tap");
            assert_eq!(tap.ifname(), "taptest0");
            let out = std::process::Command::new("ip")
                .args(["-o", "link", "show", "taptest0"])
                .output()
                .unwrap();
            let line = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(line.contains("master brtest0"), "{line}");
            assert!(line.contains(",UP") || line.contains("<UP"), "{line}");
            let ctl = control_socket().unwrap();
            let pkt = packet_socket(interface_index(&ctl, "taptest0").unwrap());

            // Guest → host: the frame enters the kernel on the tap, without our vnet header.
            let mut f = vec![0u8; 200];
            f[..6].copy_from_slice(&[0xff; 6]);
            f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
            f[12..14].copy_from_slice(&[0x88, 0xb5]);
            for (i, b) in f.iter_mut().enumerate().skip(14) {
                *b = i as u8;
            }
            tap.send(&f).unwrap();
            let mut buf = vec![0u8; 2048];
            let n = loop {
                // SAFETY: recv into a buffer we own.
                let n = unsafe { libc::recv(pkt.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                assert!(n >= 0, "recv on the tap: {}", io::Error::last_os_error());
                // Skip the kernel's own traffic (IPv6 router solicitations and the like).
                if buf[12..14] == [0x88, 0xb5] {
                    break n as usize;
                }
            };
            assert_eq!(&buf[..n], &f[..]);

            // Host → guest: a frame sent on the tap comes out of the backend, header stripped.
            let mut g = f.clone();
            g[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
            g[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 9]);
            g[100] = 0x5a;
            // SAFETY: send from a buffer we own.
            let sent = unsafe { libc::send(pkt.as_raw_fd(), g.as_ptr().cast(), g.len(), 0) };
            assert_eq!(sent, g.len() as isize, "send: {}", io::Error::last_os_error());
            let mut rx = vec![0u8; super::super::MAX_FRAME];
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match tap.recv(&mut rx).unwrap() {
                    Some(n) if rx[12..14] == [0x88, 0xb5] => {
                        assert_eq!(&rx[..n], &g[..]);
                        break;
                    }
                    _ => {
                        assert!(std::time::Instant::now() < deadline, "frame never reached the backend");
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
            Ok(())
        })
        .join()
        .unwrap();
        if let Err(why) = r {
            eprintln!("SKIPPED tap test: cannot make a network namespace here: {why}");
        }
    }
}
