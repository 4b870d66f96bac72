//! Zero-copy forwarding for TLS passthrough: socket → pipe → socket with splice(2), so bulk bytes never
//! enter userspace (the proxy only moves page references; nginx's stream proxy copies through a buffer).
//!
//! Each direction starts as the buffered copy of [`super::io`] and switches to splice once it has moved
//! [`SPLICE_AFTER`] bytes, so handshakes, short requests and idle connections hold no pipe (two descriptors and
//! up to one pipe buffer of kernel memory per direction). If a pipe cannot be made (descriptor limit), the
//! direction stays buffered. Timeouts and half-close behave as in [`super::io::pump`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use super::io::{Activity, CopyEnd, PumpError, PumpLimits, Transferred, copy_until, drive, shutdown_timed, timed};

/// Bytes a direction moves buffered before it switches to splice.
pub const SPLICE_AFTER: u64 = 128 * 1024;

/// A non-blocking pipe (read end, write end).
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds: [libc::c_int; 2] = [-1, -1];
        // SAFETY: pipe2 writes two descriptors into the two-element array we own; the flags are valid constants.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so fds[0] is an open descriptor owned by nothing else; OwnedFd closes it.
        let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: as above, for fds[1].
        let write = unsafe { OwnedFd::from_raw_fd(fds[1]) };
        Ok(Self { read, write })
    }
}

/// One non-blocking splice of up to `len` bytes from `from` to `to` (one of them a pipe).
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice only operates on the kernel objects behind the two descriptors, which the caller keeps open
    // for the duration of the call; null offsets (required for pipes and sockets) mean "current position".
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Moves everything from `r` to `w` through `pipe` until EOF, then forwards the half-close.
async fn splice_until_eof(
    r: &ReadHalf<'_>,
    w: &mut WriteHalf<'_>,
    pipe: &Pipe,
    limits: &PumpLimits,
    activity: &Activity,
) -> Result<u64, PumpError> {
    let chunk = limits.buffer_size.max(4096);
    let (rsock, wsock): (&TcpStream, RawFd) = (r.as_ref(), w.as_ref().as_raw_fd());
    let (pipe_r, pipe_w) = (pipe.read.as_raw_fd(), pipe.write.as_raw_fd());
    let mut moved = 0u64;
    loop {
        // The pipe is empty here (drained below), so EAGAIN can only mean "no data on the socket".
        let n = rsock
            .async_io(Interest::READABLE, || splice(rsock.as_raw_fd(), pipe_w, chunk))
            .await?;
        if n == 0 {
            shutdown_timed(w, limits.write).await;
            return Ok(moved);
        }
        activity.touch();
        let wstream = w.as_ref();
        let drain = async {
            let mut left = n;
            while left > 0 {
                let k = wstream
                    .async_io(Interest::WRITABLE, || splice(pipe_r, wsock, left))
                    .await?;
                if k == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "splice to the peer wrote nothing",
                    ));
                }
                left -= k;
            }
            Ok(())
        };
        timed(drain, limits.write).await?;
        moved += n as u64;
    }
}

/// One direction of [`pump_tcp`]: buffered, then spliced once it carries bulk data.
async fn one_way(
    r: &mut ReadHalf<'_>,
    w: &mut WriteHalf<'_>,
    limits: &PumpLimits,
    activity: &Activity,
    spliced: &std::sync::atomic::AtomicU64,
) -> Result<u64, PumpError> {
    let buffered = match copy_until(r, w, limits, activity, SPLICE_AFTER).await? {
        CopyEnd::Eof(n) => return Ok(n),
        CopyEnd::Bulk(n) => n,
    };
    let rest = match Pipe::new() {
        Ok(pipe) => {
            let n = splice_until_eof(r, w, &pipe, limits, activity).await?;
            spliced.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            n
        }
        Err(e) => {
            tracing::debug!("no pipe for splice ({e}); copying through a buffer");
            match copy_until(r, w, limits, activity, u64::MAX).await? {
                CopyEnd::Eof(n) | CopyEnd::Bulk(n) => n,
            }
        }
    };
    Ok(buffered + rest)
}

/// [`super::io::pump`] for two TCP sockets, with bulk data spliced. Returns the bytes moved each way and how
/// many of them went through splice.
pub async fn pump_tcp(mut a: TcpStream, mut b: TcpStream, limits: PumpLimits) -> Result<(Transferred, u64), PumpError> {
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let activity = Activity::new();
    let spliced = std::sync::atomic::AtomicU64::new(0);
    let up = one_way(&mut ar, &mut bw, &limits, &activity, &spliced);
    let down = one_way(&mut br, &mut aw, &limits, &activity, &spliced);
    let moved = drive(up, down, &limits, &activity).await?;
    Ok((moved, spliced.into_inner()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    fn limits() -> PumpLimits {
        PumpLimits {
            buffer_size: 64 * 1024,
            idle: Duration::from_secs(10),
            write: Duration::from_secs(10),
            total: Duration::from_secs(30),
        }
    }

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) as u8)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_both_ways_is_spliced_and_exact_with_half_close() {
        let (mut client, proxy_a) = pair().await;
        let (proxy_b, mut server) = pair().await;
        let task = tokio::spawn(pump_tcp(proxy_a, proxy_b, limits()));
        let up = pattern(3 << 20, 1);
        let down = pattern(2 << 20, 2);
        let (up2, down2) = (up.clone(), down.clone());
        // The server reads the whole upload (up to the client's half-close), then answers and closes.
        let server_side = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(&down2).await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        let (mut cr, mut cw) = client.split();
        let send = async {
            cw.write_all(&up2).await.unwrap();
            cw.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let ((), n) = tokio::join!(send, cr.read_to_end(&mut back));
        n.unwrap();
        assert!(server_side.await.unwrap() == up, "upload corrupted");
        assert!(back == down, "download corrupted");
        let (moved, spliced) = task.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Transferred {
                a_to_b: up.len() as u64,
                b_to_a: down.len() as u64
            }
        );
        // Everything past the buffered start of each direction (SPLICE_AFTER plus at most one buffer) was spliced.
        let buffered_at_most = 2 * (SPLICE_AFTER + limits().buffer_size as u64);
        assert!(spliced >= moved.a_to_b + moved.b_to_a - buffered_at_most, "{spliced}");
    }

    #[tokio::test]
    async fn short_exchange_stays_buffered() {
        let (mut client, proxy_a) = pair().await;
        let (proxy_b, mut server) = pair().await;
        let task = tokio::spawn(pump_tcp(proxy_a, proxy_b, limits()));
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        drop(client);
        drop(server);
        let (moved, spliced) = task.await.unwrap().unwrap();
        assert_eq!((moved.a_to_b, moved.b_to_a, spliced), (4, 4, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_still_applies() {
        let (_client, proxy_a) = pair().await;
        let (proxy_b, _server) = pair().await;
        let l = PumpLimits {
            idle: Duration::from_secs(3),
            ..limits()
        };
        assert!(matches!(pump_tcp(proxy_a, proxy_b, l).await, Err(PumpError::Idle)));
    }
}
