//! Stream plumbing: replaying already-read bytes, and a bidirectional copy with bounded buffers
//! and idle / write / total timeouts.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

/// A stream that first yields `prefix`, then reads from `inner`. Writes go to `inner`.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Wrap `inner`, replaying `prefix` first.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self { prefix, pos: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(rest) = this.prefix.get(this.pos..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            this.pos += n;
            if this.pos >= this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Limits for [`pump`].
#[derive(Debug, Clone, Copy)]
pub struct PumpLimits {
    /// Buffer per direction.
    pub buffer_size: usize,
    /// Close when neither side sent anything for this long.
    pub idle: Duration,
    /// Close when one write cannot complete within this (a peer that does not read).
    pub write: Duration,
    /// Close after this total lifetime.
    pub total: Duration,
}

/// Why a pump ended early.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// No traffic for `idle`.
    #[error("idle timeout")]
    Idle,
    /// A write stalled.
    #[error("write timeout")]
    Write,
    /// Connection lifetime exceeded.
    #[error("total timeout")]
    Total,
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

/// Bytes moved by [`pump`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// `a` → `b`.
    pub a_to_b: u64,
    /// `b` → `a`.
    pub b_to_a: u64,
}

/// `write_all` under a timeout (see [`timed`]).
pub(crate) async fn write_all_timed<W: AsyncWrite + Unpin>(
    w: &mut W,
    data: &[u8],
    t: Duration,
) -> Result<(), PumpError> {
    timed(w.write_all(data), t).await
}

/// Runs `fut` under a timeout that is only armed if the first poll cannot finish it (the common case on a
/// healthy socket costs no timer registration).
pub(crate) async fn timed<T>(fut: impl Future<Output = io::Result<T>>, t: Duration) -> Result<T, PumpError> {
    let mut fut = std::pin::pin!(fut);
    if let Poll::Ready(r) = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        return Ok(r?);
    }
    match tokio::time::timeout(t, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(PumpError::Write),
    }
}

pub(crate) async fn shutdown_timed<W: AsyncWrite + Unpin>(w: &mut W, t: Duration) {
    // Best effort: the peer may already be gone.
    let _ = tokio::time::timeout(t, w.shutdown()).await;
}

/// First buffer of a direction; it doubles (up to `buffer_size`) while reads fill it, so idle
/// and interactive connections stay small and bulk transfers make few large syscalls.
const INITIAL_BUFFER: usize = 4096;

/// Milliseconds since the pump started at which data last moved (shared by both directions).
pub(crate) struct Activity {
    start: Instant,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }
    pub(crate) fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// How a buffered copy of one direction ended.
pub(crate) enum CopyEnd {
    /// The reader reached EOF (the half-close was forwarded); bytes moved.
    Eof(u64),
    /// `bulk_after` bytes were moved: the caller continues the direction another way.
    Bulk(u64),
}

/// One direction: read, write, until EOF (then forward the half-close) or until at least `bulk_after` bytes
/// have moved (everything read has been written by then).
pub(crate) async fn copy_until<R, W>(
    r: &mut R,
    w: &mut W,
    limits: &PumpLimits,
    activity: &Activity,
    bulk_after: u64,
) -> Result<CopyEnd, PumpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let max = limits.buffer_size.max(512);
    let mut buf = vec![0u8; INITIAL_BUFFER.min(max)];
    let mut moved = 0u64;
    loop {
        if moved >= bulk_after {
            return Ok(CopyEnd::Bulk(moved));
        }
        let n = r.read(&mut buf).await?;
        if n == 0 {
            shutdown_timed(w, limits.write).await;
            return Ok(CopyEnd::Eof(moved));
        }
        activity.touch();
        write_all_timed(w, buf.get(..n).unwrap_or_default(), limits.write).await?;
        moved += n as u64;
        if n == buf.len() && buf.len() < max {
            buf.resize((buf.len() * 2).min(max), 0);
        }
    }
}

/// One direction, buffered, until EOF.
async fn copy_one_way<R, W>(r: &mut R, w: &mut W, limits: &PumpLimits, activity: &Activity) -> Result<u64, PumpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match copy_until(r, w, limits, activity, u64::MAX).await? {
        CopyEnd::Eof(n) | CopyEnd::Bulk(n) => Ok(n),
    }
}

/// Copy both ways until both sides have closed (half-close is forwarded) or a limit trips.
///
/// The two directions run concurrently (a blocked write in one never delays the other). Memory is
/// bounded by two buffers of at most `buffer_size`; a side that stops reading stalls its direction
/// for at most `write` and then the connection is closed. Timers: one for idleness (re-armed
/// lazily from the last activity, not per read) and one for the total lifetime.
pub async fn pump<A, B>(a: A, b: B, limits: PumpLimits) -> Result<Transferred, PumpError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let activity = Activity::new();
    let up = copy_one_way(&mut ar, &mut bw, &limits, &activity);
    let down = copy_one_way(&mut br, &mut aw, &limits, &activity);
    drive(up, down, &limits, &activity).await
}

/// Runs the two directions of a pump to completion under the idle and total timeouts.
pub(crate) async fn drive(
    up: impl Future<Output = Result<u64, PumpError>>,
    down: impl Future<Output = Result<u64, PumpError>>,
    limits: &PumpLimits,
    activity: &Activity,
) -> Result<Transferred, PumpError> {
    tokio::pin!(up, down);
    let idle = tokio::time::sleep(limits.idle);
    let total = tokio::time::sleep(limits.total);
    tokio::pin!(idle, total);
    let (mut a_to_b, mut b_to_a) = (None, None);
    loop {
        tokio::select! {
            r = &mut up, if a_to_b.is_none() => a_to_b = Some(r?),
            r = &mut down, if b_to_a.is_none() => b_to_a = Some(r?),
            () = &mut idle => {
                let due = activity.last() + limits.idle;
                if due <= Instant::now() {
                    return Err(PumpError::Idle);
                }
                idle.as_mut().reset(due);
            }
            () = &mut total => return Err(PumpError::Total),
        }
        if let (Some(a_to_b), Some(b_to_a)) = (a_to_b, b_to_a) {
            return Ok(Transferred { a_to_b, b_to_a });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> PumpLimits {
        PumpLimits {
            buffer_size: 1024,
            idle: Duration::from_secs(5),
            write: Duration::from_secs(5),
            total: Duration::from_secs(10),
        }
    }

    #[tokio::test]
    async fn prefixed_replays_then_reads() {
        let (mut tx, rx) = tokio::io::duplex(64);
        tx.write_all(b" world").await.unwrap();
        drop(tx);
        let mut s = Prefixed::new(b"hello".to_vec(), rx);
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[tokio::test]
    async fn pump_moves_bytes_and_half_closes() {
        let (a_user, a_pump) = tokio::io::duplex(256);
        let (b_pump, b_user) = tokio::io::duplex(256);
        let task = tokio::spawn(pump(a_pump, b_pump, limits()));
        let (mut ar, mut aw) = tokio::io::split(a_user);
        let (mut br, mut bw) = tokio::io::split(b_user);
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let p2 = payload.clone();
        let writer = tokio::spawn(async move {
            aw.write_all(&p2).await.unwrap();
            aw.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        br.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        writer.await.unwrap();
        // b answers after seeing EOF; a still receives it (half-close).
        bw.write_all(b"bye").await.unwrap();
        bw.shutdown().await.unwrap();
        let mut back = Vec::new();
        ar.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"bye");
        let moved = task.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Transferred {
                a_to_b: 100_000,
                b_to_a: 3
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_fires() {
        let (_a_user, a_pump) = tokio::io::duplex(64);
        let (b_pump, _b_user) = tokio::io::duplex(64);
        let l = PumpLimits {
            idle: Duration::from_secs(3),
            ..limits()
        };
        assert!(matches!(pump(a_pump, b_pump, l).await, Err(PumpError::Idle)));
    }

    #[tokio::test(start_paused = true)]
    async fn reader_that_never_reads_trips_write_timeout() {
        let (a_user, a_pump) = tokio::io::duplex(64);
        // b's user never reads; duplex buffer of 64 fills quickly.
        let (b_pump, _b_user) = tokio::io::duplex(64);
        let task = tokio::spawn(pump(
            a_pump,
            b_pump,
            PumpLimits {
                write: Duration::from_secs(2),
                ..limits()
            },
        ));
        let (_ar, mut aw) = tokio::io::split(a_user);
        let _ = tokio::time::timeout(Duration::from_secs(30), aw.write_all(&[7u8; 8192])).await;
        assert!(matches!(task.await.unwrap(), Err(PumpError::Write)));
    }

    #[tokio::test(start_paused = true)]
    async fn total_timeout_fires_despite_traffic() {
        let (a_user, a_pump) = tokio::io::duplex(64);
        let (b_pump, mut b_user) = tokio::io::duplex(64);
        let task = tokio::spawn(pump(
            a_pump,
            b_pump,
            PumpLimits {
                total: Duration::from_secs(4),
                ..limits()
            },
        ));
        let (_ar, mut aw) = tokio::io::split(a_user);
        let chatter = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            loop {
                if aw.write_all(b"x").await.is_err() {
                    break;
                }
                let _ = b_user.read(&mut buf).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        assert!(matches!(task.await.unwrap(), Err(PumpError::Total)));
        chatter.abort();
    }
}
