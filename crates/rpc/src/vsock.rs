//! AF_VSOCK stream sockets for tokio: a connector ([`VsockStream::connect`], used by [`crate::Client`] for
//! `vsock:<cid>:<port>` endpoints) and a [`Listener`] ([`VsockListener`]) so guest services can be served on
//! vsock with [`crate::serve`].
//!
//! The socket is non-blocking and driven through [`AsyncFd`]; reads and writes go through `std::fs::File`
//! on the socket fd (plain `read(2)`/`write(2)`), so only socket creation, `connect`, `bind`/`listen` and
//! `accept` need libc.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{Listener, RemoteAddr};

/// The host's CID (where the VMM listens for guests).
pub const VMADDR_CID_HOST: u32 = 2;
/// Any CID (for binding).
pub const VMADDR_CID_ANY: u32 = u32::MAX;

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is a plain C struct of integers and byte arrays; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

/// Registers an owned socket with the reactor.
fn register<T: AsRawFd>(fd: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `fd` owns its descriptor and is moved into the AsyncFd, which keeps it open (and never replaces
    // it) until it is dropped and deregistered.
    let registered = unsafe { AsyncFd::register(fd) };
    registered.map_err(|e| e.into_parts().1)
}

fn new_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const ADDR_LEN: libc::socklen_t = size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// A connected AF_VSOCK stream.
#[derive(Debug)]
pub struct VsockStream {
    io: AsyncFd<File>,
}

impl VsockStream {
    /// Connects to `cid:port` (e.g. [`VMADDR_CID_HOST`] and the VMM's port).
    pub async fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = new_socket()?;
        let addr = sockaddr(cid, port);
        // SAFETY: `fd` is a valid socket and `addr` a live sockaddr_vm whose size is passed alongside.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), ADDR_LEN) };
        let in_progress = rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINPROGRESS);
        if rc != 0 && !in_progress {
            return Err(io::Error::last_os_error());
        }
        let io = register(File::from(fd))?;
        if in_progress {
            let _ = io.writable().await?;
            socket_error(&io)?;
        }
        Ok(Self { io })
    }
}

fn socket_error(io: &AsyncFd<File>) -> io::Result<()> {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err`/`len` are live locals of the size getsockopt(SO_ERROR) expects.
    let rc = unsafe {
        libc::getsockopt(
            io.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut err).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(())
}

impl AsyncRead for VsockStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|inner| inner.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.io.poll_write_ready(cx))?;
            match guard.try_io(|inner| inner.get_ref().write(buf)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: the fd stays open for the lifetime of `self`; shutdown(2) takes no pointers.
        let rc = unsafe { libc::shutdown(self.io.as_raw_fd(), libc::SHUT_WR) };
        Poll::Ready(if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        })
    }
}

/// A listening AF_VSOCK socket.
#[derive(Debug)]
pub struct VsockListener {
    io: AsyncFd<OwnedFd>,
}

impl VsockListener {
    /// Binds `cid:port` ([`VMADDR_CID_ANY`] for every local CID) and listens. Needs a Tokio runtime.
    pub fn bind(cid: u32, port: u32) -> io::Result<Self> {
        let fd = new_socket()?;
        let addr = sockaddr(cid, port);
        // SAFETY: `fd` is a valid socket and `addr` a live sockaddr_vm whose size is passed alongside.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), ADDR_LEN) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen(2) on a valid bound socket; no pointers.
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { io: register(fd)? })
    }

    fn try_accept(fd: &OwnedFd) -> io::Result<(VsockStream, RemoteAddr)> {
        let mut addr = sockaddr(0, 0);
        let mut len = ADDR_LEN;
        // SAFETY: `addr`/`len` are live locals describing a sockaddr_vm buffer of `len` bytes.
        let rc = unsafe {
            libc::accept4(
                fd.as_raw_fd(),
                (&raw mut addr).cast(),
                &mut len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `rc` is a new fd returned by accept4(2), owned by nobody else.
        let stream = unsafe { OwnedFd::from_raw_fd(rc) };
        let remote = RemoteAddr::Other(format!("vsock:{}:{}", addr.svm_cid, addr.svm_port));
        Ok((
            VsockStream {
                io: register(File::from(stream))?,
            },
            remote,
        ))
    }
}

impl Listener for VsockListener {
    type Io = VsockStream;
    async fn accept(&mut self) -> io::Result<(VsockStream, RemoteAddr)> {
        loop {
            let mut guard = self.io.readable().await?;
            match guard.try_io(|inner| Self::try_accept(inner.get_ref())) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

/// Parses `<cid>:<port>` (the part after `vsock:` in an endpoint URL).
pub(crate) fn parse_addr(s: &str) -> Option<(u32, u32)> {
    let (cid, port) = s.strip_prefix("//").unwrap_or(s).split_once(':')?;
    Some((cid.parse().ok()?, port.trim_end_matches('/').parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vsock_addresses() {
        assert_eq!(parse_addr("2:4050"), Some((2, 4050)));
        assert_eq!(parse_addr("//2:10000/"), Some((2, 10000)));
        assert_eq!(parse_addr("2"), None);
        assert_eq!(parse_addr("x:1"), None);
        assert_eq!(parse_addr("2:-1"), None);
    }

    #[tokio::test]
    async fn vsock_round_trip_or_clear_error() {
        // Uses the loopback CID (1) when the kernel has vsock_loopback; otherwise the connect must fail with an
        // OS error rather than hang or succeed.
        let listener = match VsockListener::bind(1, 0x7d5a) {
            Ok(l) => l,
            Err(e) => {
                let err = VsockStream::connect(VMADDR_CID_HOST, 0x7d5a).await;
                assert!(
                    err.is_err(),
                    "connect without a listener succeeded (bind error was {e})"
                );
                return;
            }
        };
        let mut listener = listener;
        let server = tokio::spawn(async move {
            let (mut s, remote) = Listener::accept(&mut listener).await.unwrap();
            assert!(matches!(remote, RemoteAddr::Other(ref r) if r.starts_with("vsock:")));
            let mut buf = [0u8; 4];
            tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut s, &buf).await.unwrap();
        });
        let mut c = VsockStream::connect(1, 0x7d5a).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut c, b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut c, &mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        server.await.unwrap();
    }
}
