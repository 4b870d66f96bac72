//! The passt backend: Debian's `passt` (user-mode networking without NAT tables or root) serves the guest over
//! a unix stream socket with qemu's stream framing (4-byte big-endian length, then the frame). passt answers
//! ARP, DHCP, NDP and DHCPv6 itself and maps guest TCP/UDP onto host sockets; `-t`/`-u` forward host ports to
//! the guest.
//!
//! [`passt_args`] builds the command line (used by the VM manager, which supervises passt beside the VMM);
//! [`PasstProcess`] starts it directly (tests, benchmarks, standalone runs).

use std::io::{self, ErrorKind, Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{MAX_FRAME, NetBackend, NetError, StreamFramer};

/// Output we buffer for the socket before refusing TX frames (a few maximal frames).
const TX_LIMIT: usize = 4 * (4 + MAX_FRAME);
/// Bytes read from the socket per `read` call.
const READ_CHUNK: usize = 64 << 10;

/// The guest side of a passt (or passt-compatible) unix socket.
pub struct PasstBackend {
    stream: UnixStream,
    rx: StreamFramer,
    chunk: Vec<u8>,
    tx: Vec<u8>,
    tx_start: usize,
    eof: bool,
}

impl PasstBackend {
    /// Connects to `path`, retrying for up to `wait` while the socket does not exist or refuses (passt may
    /// still be starting).
    pub fn connect(path: &Path, wait: Duration) -> Result<Self, NetError> {
        let deadline = Instant::now() + wait;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    return Self::from_stream(s).map_err(|source| NetError::PasstConnect {
                        path: path.to_owned(),
                        source,
                    });
                }
                Err(e)
                    if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(NetError::PasstConnect {
                        path: path.to_owned(),
                        source,
                    });
                }
            }
        }
    }

    /// Wraps a connected stream (made non-blocking).
    pub fn from_stream(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            rx: StreamFramer::default(),
            chunk: vec![0; READ_CHUNK],
            tx: Vec::new(),
            tx_start: 0,
            eof: false,
        })
    }

    fn pending_tx(&self) -> usize {
        self.tx.len() - self.tx_start
    }
}

fn protocol_error(e: super::FrameError) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, e)
}

impl NetBackend for PasstBackend {
    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            if let Some(n) = self.rx.next_frame_into(buf).map_err(protocol_error)? {
                return Ok(Some(n));
            }
            if self.eof {
                return Err(io::Error::new(ErrorKind::UnexpectedEof, "passt closed the socket"));
            }
            let room = self.rx.room().min(self.chunk.len());
            let Some(chunk) = self.chunk.get_mut(..room).filter(|c| !c.is_empty()) else {
                // Cannot happen: the framer's capacity always holds a whole frame.
                return Err(io::Error::other("stream framer full without a complete frame"));
            };
            match self.stream.read(chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    let got = chunk.get(..n).unwrap_or_default();
                    self.rx.push(got);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn can_send(&self) -> bool {
        self.pending_tx() < TX_LIMIT
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.tx_start == self.tx.len() {
            self.tx.clear();
            self.tx_start = 0;
        }
        StreamFramer::encode_into(frame, &mut self.tx).map_err(protocol_error)?;
        self.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.tx_start < self.tx.len() {
            let pending = self.tx.get(self.tx_start..).unwrap_or_default();
            match self.stream.write(pending) {
                Ok(0) => return Err(io::Error::new(ErrorKind::WriteZero, "passt socket closed")),
                Ok(n) => self.tx_start += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.tx_start == self.tx.len() {
            self.tx.clear();
            self.tx_start = 0;
        } else if self.tx_start > TX_LIMIT {
            self.tx.drain(..self.tx_start);
            self.tx_start = 0;
        }
        Ok(())
    }

    fn wants_write(&self) -> bool {
        self.pending_tx() > 0
    }
}

/// Transport of a forwarded port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// Host `address:host_port` forwarded to the guest's `guest_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForward {
    pub protocol: Protocol,
    pub host_address: IpAddr,
    pub host_port: u16,
    pub guest_port: u16,
}

impl PortForward {
    /// From the manager's fields (`tcp`/`udp`, a literal IP address, ports 1..=65535).
    pub fn parse(protocol: &str, host_address: &str, host_port: u32, guest_port: u32) -> Result<Self, NetError> {
        let spec = format!("{protocol}:{host_address}:{host_port}->{guest_port}");
        let bad = |reason: &str| NetError::BadForward {
            spec: spec.clone(),
            reason: reason.into(),
        };
        let protocol = match protocol {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(bad("protocol must be tcp or udp")),
        };
        let host_address = host_address
            .parse()
            .map_err(|_| bad("host address must be a literal IPv4/IPv6 address"))?;
        let port = |p: u32, what: &str| {
            u16::try_from(p)
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| bad(&format!("{what} port must be 1..=65535")))
        };
        Ok(Self {
            protocol,
            host_address,
            host_port: port(host_port, "host")?,
            guest_port: port(guest_port, "guest")?,
        })
    }

    /// passt's `-t`/`-u` option and its value: `ADDR/HOSTPORT:GUESTPORT`.
    fn option(&self) -> [String; 2] {
        let flag = match self.protocol {
            Protocol::Tcp => "-t",
            Protocol::Udp => "-u",
        };
        [
            flag.into(),
            format!("{}/{}:{}", self.host_address, self.host_port, self.guest_port),
        ]
    }
}

/// `--runas` for passt when we are root. Started as root, passt switches to `nobody` *before* binding its
/// socket, and bookworm's version then fails the bind silently (it still prints "bound") unless `nobody` can
/// write the socket's directory, which a private per-VM directory never allows. So it keeps our identity;
/// it still isolates itself (user, mount, PID namespaces and seccomp).
pub fn runas_for_current_user() -> Option<String> {
    // SAFETY: geteuid cannot fail and touches no memory.
    let uid = unsafe { libc::geteuid() };
    // SAFETY: as above.
    let gid = unsafe { libc::getegid() };
    (uid == 0).then(|| format!("{uid}:{gid}"))
}

/// Arguments for `passt`: foreground, one client only (passt exits when the VMM disconnects), the given
/// socket, and the port forwards. `log_file` keeps passt's own log (it otherwise writes to syslog).
pub fn passt_args(
    socket: &Path,
    forwards: &[PortForward],
    log_file: Option<&Path>,
    runas: Option<&str>,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-f".into(),
        "-1".into(),
        "--socket".into(),
        socket.display().to_string(),
    ];
    if let Some(l) = log_file {
        args.extend(["--log-file".into(), l.display().to_string()]);
    }
    if let Some(r) = runas {
        args.extend(["--runas".into(), r.into()]);
    }
    for f in forwards {
        args.extend(f.option());
    }
    args
}

/// A passt child process, killed and reaped on drop.
pub struct PasstProcess {
    child: Child,
    socket: PathBuf,
}

impl PasstProcess {
    /// Starts `program` with [`passt_args`] plus `extra`, and waits up to 5 s for the socket to appear.
    pub fn spawn(program: &Path, socket: &Path, forwards: &[PortForward], extra: &[&str]) -> Result<Self, NetError> {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(program)
            .args(passt_args(socket, forwards, None, runas_for_current_user().as_deref()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| NetError::PasstSpawn {
                program: program.to_owned(),
                source,
            })?;
        let mut p = Self {
            child,
            socket: socket.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            if Instant::now() > deadline || matches!(p.child.try_wait(), Ok(Some(_))) {
                return Err(NetError::PasstNotReady(socket.to_owned()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        p.socket = socket.to_owned();
        Ok(p)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PasstProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passt_command_line_and_forward_validation() {
        let f = PortForward::parse("tcp", "127.0.0.1", 8080, 80).unwrap();
        let u = PortForward::parse("udp", "::1", 5353, 53).unwrap();
        assert_eq!(
            passt_args(
                Path::new("/r/v/passt.sock"),
                &[f, u],
                Some(Path::new("/r/v/passt.log")),
                None
            )
            .join(" "),
            "-f -1 --socket /r/v/passt.sock --log-file /r/v/passt.log -t 127.0.0.1/8080:80 -u ::1/5353:53"
        );
        assert_eq!(
            passt_args(Path::new("/s"), &[], None, Some("0:0")).join(" "),
            "-f -1 --socket /s --runas 0:0"
        );
        for (proto, addr, hp, gp, needle) in [
            ("sctp", "127.0.0.1", 1, 1, "protocol"),
            ("tcp", "localhost", 1, 1, "literal"),
            ("tcp", "127.0.0.1", 0, 1, "host port"),
            ("tcp", "127.0.0.1", 1, 70000, "guest port"),
        ] {
            let e = PortForward::parse(proto, addr, hp, gp).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn backend_frames_both_ways_and_detects_eof() {
        let (a, mut peer) = UnixStream::pair().unwrap();
        let mut b = PasstBackend::from_stream(a).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        assert_eq!(b.recv(&mut buf).unwrap(), None, "nothing sent yet");
        b.send(b"hello frame 1").unwrap();
        let mut got = [0u8; 17];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], &13u32.to_be_bytes());
        assert_eq!(&got[4..], b"hello frame 1");
        // Two frames in one write, the second split across writes.
        let mut wire = StreamFramer::encode(&[7u8; 100]).unwrap();
        let second = StreamFramer::encode(&[9u8; 3000]).unwrap();
        wire.extend_from_slice(&second[..1000]);
        peer.write_all(&wire).unwrap();
        assert_eq!(b.recv(&mut buf).unwrap(), Some(100));
        assert_eq!(&buf[..100], &[7u8; 100]);
        assert_eq!(b.recv(&mut buf).unwrap(), None, "second frame incomplete");
        peer.write_all(&second[1000..]).unwrap();
        assert_eq!(b.recv(&mut buf).unwrap(), Some(3000));
        assert!(buf[..3000].iter().all(|&x| x == 9));
        drop(peer);
        assert!(b.recv(&mut buf).is_err(), "EOF is an error");
    }

    #[test]
    fn oversized_length_prefix_is_a_protocol_error() {
        let (a, mut peer) = UnixStream::pair().unwrap();
        let mut b = PasstBackend::from_stream(a).unwrap();
        peer.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        let e = b.recv(&mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidData);
    }

    #[test]
    fn output_is_bounded_when_the_peer_does_not_read() {
        let (a, _peer) = UnixStream::pair().unwrap();
        let mut b = PasstBackend::from_stream(a).unwrap();
        let frame = vec![0u8; 60000];
        let mut sent = 0;
        while b.can_send() {
            b.send(&frame).unwrap();
            sent += 1;
            assert!(sent < 1000, "never became full");
        }
        assert!(b.wants_write());
        assert!(b.pending_tx() <= TX_LIMIT + 4 + frame.len());
    }
}
