//! The host side of userspace vsock in Firecracker's hybrid model. The host talks to the guest through unix
//! sockets:
//! - host → guest: connect to `uds_path`, send `CONNECT <port>\n`; once the guest accepts, the VMM answers
//!   `OK <host_port>\n` and the socket carries the stream.
//! - guest → host: a guest connection to (CID 2, port P) is connected to the unix socket `<uds_path>_P`.
//!
//! Flow control follows §5.10.6.3: every packet carries our `buf_alloc`/`fwd_cnt`; we send to the guest only
//! within its advertised credit, and send CREDIT_UPDATE when we have forwarded half a buffer since the last
//! update (or when asked).

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::packet::*;

/// Receive buffer we advertise per connection (guest → host bytes not yet written to the host socket).
pub const BUF_ALLOC: u32 = 256 << 10;
/// Largest payload we accept in one guest packet, and read from a host socket at once.
pub const MAX_PKT: usize = 64 << 10;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Host-side ports for host-initiated connections start here (like Firecracker, above the usual range).
const FIRST_HOST_PORT: u32 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConnKey {
    /// Port on the host (CID 2) side.
    pub host_port: u32,
    /// Port on the guest side.
    pub guest_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST queued/sent, waiting for the guest's RESPONSE.
    AwaitingResponse,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we sent to the guest.
    rx_cnt: u32,
    /// Bytes from the guest we wrote to the host socket.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Guest → host bytes the host socket did not take yet.
    tx_buf: Vec<u8>,
    /// Host → guest bytes waiting for an rx buffer or credit.
    rx_pending: Vec<u8>,
    host_eof: bool,
    guest_shutdown: u32,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            tx_buf: Vec::new(),
            rx_pending: Vec::new(),
            host_eof: false,
            guest_shutdown: 0,
        }
    }

    /// Bytes the guest can still take (its buffer minus what is in flight).
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_read(&self) -> bool {
        self.state == State::Established
            && self.rx_pending.is_empty()
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Writes as much of `tx_buf` as the host socket takes; false on a hard error.
    fn flush_tx(&mut self) -> bool {
        while !self.tx_buf.is_empty() {
            match self.stream.write(&self.tx_buf) {
                Ok(0) => return false,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if self.guest_shutdown & SHUTDOWN_SEND != 0 {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        true
    }
}

/// A host socket that has not sent its `CONNECT` line yet.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// A header-only packet for the guest; credit fields are filled at delivery.
#[derive(Debug, Clone, Copy)]
struct Control {
    key: ConnKey,
    op: u16,
    flags: u32,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: BTreeMap<ConnKey, Conn>,
    pending: Vec<PendingHost>,
    control: VecDeque<Control>,
    next_host_port: u32,
}

/// Binds the host listener at `path` (replacing a stale socket file).
pub fn bind_listener(path: &Path) -> std::io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    let l = UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener) -> Self {
        Self {
            guest_cid,
            uds_path,
            listener,
            conns: BTreeMap::new(),
            pending: Vec::new(),
            control: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
        }
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// File descriptors to watch, with (readable, writable) interest. Connections with nothing to wait for
    /// are left out entirely: a hung-up socket would otherwise report EPOLLHUP forever.
    pub fn interest(&self) -> Vec<(RawFd, bool, bool)> {
        let mut v = vec![(self.listener.as_raw_fd(), true, false)];
        v.extend(self.pending.iter().map(|p| (p.stream.as_raw_fd(), true, false)));
        v.extend(
            self.conns
                .values()
                .map(|c| (c.stream.as_raw_fd(), c.wants_read(), !c.tx_buf.is_empty()))
                .filter(|(_, r, w)| *r || *w),
        );
        v
    }

    fn queue_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        self.control.push_back(Control { key, op, flags });
    }

    fn reset_conn(&mut self, key: ConnKey) {
        self.conns.remove(&key);
        self.queue_control(key, OP_RST, 0);
    }

    /// Accepts host connections, reads `CONNECT` lines, flushes pending guest data and reads host data the
    /// guest has credit for. Everything is non-blocking.
    pub fn poll_host(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_ok() {
                        self.pending.push(PendingHost {
                            stream: s,
                            line: Vec::new(),
                        });
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let pending = std::mem::take(&mut self.pending);
        for p in pending {
            self.advance_pending(p);
        }
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.poll_conn(key);
        }
    }

    fn advance_pending(&mut self, mut p: PendingHost) {
        let mut byte = [0u8; 1];
        // Byte by byte so nothing after the newline is consumed here; it stays in the socket for the guest.
        loop {
            match p.stream.read(&mut byte) {
                Ok(0) => return,
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if p.line.len() < MAX_CONNECT_LINE => p.line.push(byte[0]),
                Ok(_) => return,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.pending.push(p);
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
        let port = std::str::from_utf8(&p.line)
            .ok()
            .and_then(|l| l.trim_end_matches('\r').strip_prefix("CONNECT "))
            .and_then(|n| n.trim().parse::<u32>().ok());
        let Some(guest_port) = port else {
            let _ = p.stream.write_all(b"ERROR bad CONNECT line\n");
            return;
        };
        let host_port = self.allocate_host_port(guest_port);
        let key = ConnKey { host_port, guest_port };
        self.conns.insert(key, Conn::new(p.stream, State::AwaitingResponse));
        self.queue_control(key, OP_REQUEST, 0);
    }

    fn allocate_host_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let port = self.next_host_port;
            self.next_host_port = self.next_host_port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.contains_key(&ConnKey {
                host_port: port,
                guest_port,
            }) {
                return port;
            }
        }
    }

    fn poll_conn(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else { return };
        if !c.flush_tx() {
            self.reset_conn(key);
            return;
        }
        if !c.wants_read() {
            return;
        }
        let want = (c.peer_credit() as usize).min(MAX_PKT);
        let mut buf = vec![0u8; want];
        match c.stream.read(&mut buf) {
            Ok(0) => {
                c.host_eof = true;
                self.queue_control(key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
            }
            Ok(n) => {
                buf.truncate(n);
                c.rx_pending = buf;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(_) => self.reset_conn(key),
        }
    }

    /// Handles every packet the guest queued on the TX queue; returns whether any chain was used.
    pub fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match read_packet(chain, mem) {
                Ok((hdr, payload)) => self.guest_packet(hdr, &payload),
                Err(e) => tracing::warn!("virtio-vsock: dropping malformed TX packet (head {head}): {e}"),
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::warn!("virtio-vsock: add_used: {e}");
            }
            any = true;
        }
        any
    }

    fn guest_packet(&mut self, h: Header, payload: &[u8]) {
        if h.src_cid != self.guest_cid {
            tracing::warn!("virtio-vsock: dropping packet with spoofed source CID {}", h.src_cid);
            return;
        }
        let key = ConnKey {
            host_port: h.dst_port,
            guest_port: h.src_port,
        };
        if h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            if h.op != OP_RST {
                self.queue_control_raw(h);
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            OP_REQUEST => self.guest_connect(key, h),
            OP_RESPONSE => {
                let ok = match self.conns.get_mut(&key) {
                    Some(c) if c.state == State::AwaitingResponse => {
                        c.state = State::Established;
                        let line = format!("OK {}\n", key.host_port);
                        c.stream.write_all(line.as_bytes()).is_ok()
                    }
                    _ => false,
                };
                if !ok {
                    self.reset_conn(key);
                }
            }
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key).filter(|c| c.state == State::Established) else {
                    self.reset_conn(key);
                    return;
                };
                if c.tx_buf.len() + payload.len() > BUF_ALLOC as usize {
                    tracing::warn!("virtio-vsock: guest port {} exceeded its send credit", key.guest_port);
                    self.reset_conn(key);
                    return;
                }
                c.tx_buf.extend_from_slice(payload);
                if !c.flush_tx() {
                    self.reset_conn(key);
                    return;
                }
                if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= BUF_ALLOC / 2 {
                    self.queue_control(key, OP_CREDIT_UPDATE, 0);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.queue_control(key, OP_CREDIT_UPDATE, 0);
                }
            }
            OP_SHUTDOWN => {
                let Some(c) = self.conns.get_mut(&key) else { return };
                c.guest_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if c.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    c.flush_tx();
                    let _ = c.stream.shutdown(Shutdown::Both);
                    self.reset_conn(key);
                } else if c.guest_shutdown & SHUTDOWN_SEND != 0 && c.tx_buf.is_empty() {
                    let _ = c.stream.shutdown(Shutdown::Write);
                }
            }
            OP_RST => {
                self.conns.remove(&key);
            }
            _ => self.reset_conn(key),
        }
    }

    /// An RST for a packet that matches no valid connection shape.
    fn queue_control_raw(&mut self, h: Header) {
        self.queue_control(
            ConnKey {
                host_port: h.dst_port,
                guest_port: h.src_port,
            },
            OP_RST,
            0,
        );
    }

    fn guest_connect(&mut self, key: ConnKey, h: Header) {
        if self.conns.contains_key(&key) {
            self.reset_conn(key);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.host_port));
        match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(stream) => {
                let mut c = Conn::new(stream, State::Established);
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                self.conns.insert(key, c);
                self.queue_control(key, OP_RESPONSE, 0);
            }
            Err(e) => {
                tracing::debug!("virtio-vsock: guest connect to {}: {e}", Path::new(&path).display());
                self.queue_control(key, OP_RST, 0);
            }
        }
    }

    fn header(&mut self, key: ConnKey, op: u16, flags: u32, len: u32) -> Header {
        let (buf_alloc, fwd_cnt) = match self.conns.get_mut(&key) {
            Some(c) => {
                c.last_fwd_cnt_sent = c.fwd_cnt;
                (BUF_ALLOC, c.fwd_cnt)
            }
            None => (0, 0),
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.host_port,
            dst_port: key.guest_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn data_ready(&self) -> Option<ConnKey> {
        self.conns
            .iter()
            .find(|(_, c)| c.state == State::Established && !c.rx_pending.is_empty() && c.peer_credit() > 0)
            .map(|(k, _)| *k)
    }

    /// Fills RX buffers with control packets first, then data; returns whether any chain was used.
    pub fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut any = false;
        while !self.control.is_empty() || self.data_ready().is_some() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let used = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= HDR_LEN => self.fill_rx(&mut w),
                Ok(_) => {
                    tracing::warn!("virtio-vsock: RX buffer (head {head}) smaller than a header");
                    0
                }
                Err(e) => {
                    tracing::warn!("virtio-vsock: malformed RX chain (head {head}): {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, used) {
                tracing::warn!("virtio-vsock: add_used: {e}");
            }
            any = true;
        }
        any
    }

    fn fill_rx(&mut self, w: &mut virtio_queue::Writer<'_>) -> u32 {
        if let Some(ctl) = self.control.pop_front() {
            let h = self.header(ctl.key, ctl.op, ctl.flags, 0);
            return if w.write_all(&h.to_bytes()).is_ok() {
                HDR_LEN as u32
            } else {
                0
            };
        }
        let Some(key) = self.data_ready() else { return 0 };
        let room = w.available_bytes() - HDR_LEN;
        let n = match self.conns.get(&key) {
            Some(c) => c.rx_pending.len().min(c.peer_credit() as usize).min(room),
            None => 0,
        };
        let h = self.header(key, OP_RW, 0, n as u32);
        let Some(c) = self.conns.get_mut(&key) else { return 0 };
        let Some(data) = c.rx_pending.get(..n) else { return 0 };
        if w.write_all(&h.to_bytes()).is_err() || w.write_all(data).is_err() {
            return 0;
        }
        c.rx_pending.drain(..n);
        c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
        (HDR_LEN + n) as u32
    }
}

/// Reads one TX packet: the header and exactly `len` payload bytes.
fn read_packet(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> Result<(Header, Vec<u8>), String> {
    let mut r = chain.reader(mem).map_err(|e| e.to_string())?;
    let mut hb = [0u8; HDR_LEN];
    r.read_exact(&mut hb)
        .map_err(|_| "shorter than the 44-byte header".to_string())?;
    let h = Header::from_bytes(&hb);
    let len = h.len as usize;
    if len > MAX_PKT {
        return Err(format!("payload length {len} exceeds {MAX_PKT}"));
    }
    if r.available_bytes() < len {
        return Err(format!(
            "header says {len} payload bytes, chain has {}",
            r.available_bytes()
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| e.to_string())?;
    Ok((h, payload))
}

#[cfg(test)]
#[path = "muxer_tests.rs"]
mod tests;
