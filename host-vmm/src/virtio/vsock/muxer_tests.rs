//! The vsock muxer against real unix sockets, with the guest driver played through virtio-queue's mock queues.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use crate::virtio::test_util::VRING_DESC_F_WRITE;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::test_util::memory;

const CID: u64 = 3;
const RX_BUFS: u64 = 0x40_0000;
const TX_BUFS: u64 = 0x80_0000;

struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rx_mock: MockSplitQueue<'a, GuestMemoryMmap>,
    tx_mock: MockSplitQueue<'a, GuestMemoryMmap>,
    rx: Queue,
    tx: Queue,
    rx_next: u16,
    tx_next: u16,
    rx_seen: u16,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let rx_mock = MockSplitQueue::create(mem, GuestAddress(0), 64);
        let tx_mock = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 64);
        let rx = rx_mock.create_queue().unwrap();
        let tx = tx_mock.create_queue().unwrap();
        Self {
            mem,
            rx_mock,
            tx_mock,
            rx,
            tx,
            rx_next: 0,
            tx_next: 0,
            rx_seen: 0,
        }
    }

    /// Offers `n` RX buffers of 4 KiB.
    fn give_rx(&mut self, n: u16) {
        for _ in 0..n {
            let i = self.rx_next;
            let d = Descriptor::new(RX_BUFS + u64::from(i) * 0x1000, 0x1000, VRING_DESC_F_WRITE as u16, 0);
            self.rx_mock.add_desc_chains(&[RawDescriptor::from(d)], i).unwrap();
            self.rx_next += 1;
        }
    }

    fn send(&mut self, m: &mut Muxer, h: Header, payload: &[u8]) {
        let i = self.tx_next;
        let addr = TX_BUFS + u64::from(i) * 0x1000;
        self.mem.write_slice(&h.to_bytes(), GuestAddress(addr)).unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        let d = Descriptor::new(addr, (HDR_LEN + payload.len()) as u32, 0, 0);
        self.tx_mock.add_desc_chains(&[RawDescriptor::from(d)], i).unwrap();
        self.tx_next += 1;
        assert!(m.process_tx(&mut self.tx, self.mem));
    }

    /// Runs RX and returns the packets the device delivered since the last call.
    fn recv(&mut self, m: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
        m.process_rx(&mut self.rx, self.mem);
        let mut out = Vec::new();
        while self.rx_seen < self.rx_mock.used().idx().load() {
            let e = self
                .rx_mock
                .used()
                .ring()
                .ref_at(usize::from(self.rx_seen))
                .unwrap()
                .load();
            let addr = RX_BUFS + u64::from(e.id()) * 0x1000;
            let mut hb = [0u8; HDR_LEN];
            self.mem.read_slice(&mut hb, GuestAddress(addr)).unwrap();
            let h = Header::from_bytes(&hb);
            assert_eq!(
                e.len() as usize,
                HDR_LEN + h.len as usize,
                "used length = header + payload"
            );
            let mut data = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + HDR_LEN as u64))
                .unwrap();
            out.push((h, data));
            self.rx_seen += 1;
        }
        out
    }
}

fn pkt(op: u16, guest_port: u32, host_port: u32, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

fn muxer(dir: &Path) -> (Muxer, PathBuf) {
    let uds = dir.join("vsock.sock");
    let l = bind_listener(&uds).unwrap();
    (Muxer::new(CID, uds.clone(), l), uds)
}

fn host_listener(uds: &Path, port: u32) -> UnixListener {
    UnixListener::bind(format!("{}_{port}", uds.display())).unwrap()
}

/// Polls the muxer until `cond` holds (host sockets are asynchronous).
fn settle(
    m: &mut Muxer,
    g: &mut Guest<'_>,
    mut cond: impl FnMut(&[(Header, Vec<u8>)]) -> bool,
) -> Vec<(Header, Vec<u8>)> {
    let mut all = Vec::new();
    for _ in 0..200 {
        m.poll_host();
        all.extend(g.recv(m));
        if cond(&all) {
            return all;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("condition not reached; packets: {all:?}");
}

#[test]
fn guest_connects_and_data_flows_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, uds) = muxer(dir.path());
    let listener = host_listener(&uds, 5000);
    let mem = memory();
    let mut g = Guest::new(&mem);
    g.give_rx(8);
    g.send(&mut m, pkt(OP_REQUEST, 1234, 5000, 0, 65536, 0), &[]);
    let (mut host, _) = listener.accept().unwrap();
    let got = g.recv(&mut m);
    assert_eq!(got.len(), 1);
    let (h, _) = &got[0];
    assert_eq!(
        (h.op, h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (OP_RESPONSE, 2, CID, 5000, 1234)
    );
    assert_eq!(h.buf_alloc, BUF_ALLOC);

    g.send(&mut m, pkt(OP_RW, 1234, 5000, 4, 65536, 0), b"ping");
    let mut buf = [0u8; 4];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    host.write_all(b"pong!").unwrap();
    let got = settle(&mut m, &mut g, |p| !p.is_empty());
    let (h, data) = &got[0];
    assert_eq!(
        (h.op, h.len, h.fwd_cnt),
        (OP_RW, 5, 4),
        "data carries our fwd_cnt (4 bytes forwarded)"
    );
    assert_eq!(data, b"pong!");
    assert_eq!(m.connection_count(), 1);
}

#[test]
fn host_connect_line_and_ok_reply() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, uds) = muxer(dir.path());
    let mem = memory();
    let mut g = Guest::new(&mem);
    g.give_rx(8);
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 52\nearly").unwrap();
    let got = settle(&mut m, &mut g, |p| !p.is_empty());
    let (h, _) = &got[0];
    assert_eq!((h.op, h.dst_port, h.dst_cid), (OP_REQUEST, 52, CID));
    let host_port = h.src_port;
    assert!(host_port >= 1 << 30);
    // The guest accepts: the host gets "OK <port>\n", and bytes it sent after the line flow to the guest.
    let mut resp = pkt(OP_RESPONSE, 52, host_port, 0, 65536, 0);
    resp.src_port = 52;
    g.send(&mut m, resp, &[]);
    let mut line = [0u8; 14];
    host.read_exact(&mut line).unwrap();
    assert_eq!(std::str::from_utf8(&line).unwrap(), format!("OK {host_port}\n"));
    let got = settle(&mut m, &mut g, |p| p.iter().any(|(h, _)| h.op == OP_RW));
    let (_, data) = got.iter().find(|(h, _)| h.op == OP_RW).unwrap();
    assert_eq!(data, b"early");
}

#[test]
fn bad_connect_line_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, uds) = muxer(dir.path());
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"HELLO\n").unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..50 {
        m.poll_host();
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut reply = String::new();
    host.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("ERROR"), "{reply}");
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn credit_limits_host_to_guest_data() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, uds) = muxer(dir.path());
    let listener = host_listener(&uds, 7);
    let mem = memory();
    let mut g = Guest::new(&mem);
    g.give_rx(16);
    // The guest has only 8 bytes of buffer.
    g.send(&mut m, pkt(OP_REQUEST, 40, 7, 0, 8, 0), &[]);
    let (mut host, _) = listener.accept().unwrap();
    assert_eq!(g.recv(&mut m)[0].0.op, OP_RESPONSE);
    host.write_all(&[1u8; 20]).unwrap();
    let got = settle(&mut m, &mut g, |p| !p.is_empty());
    assert_eq!(got[0].0.len, 8);
    // No more without credit, however long we poll.
    for _ in 0..20 {
        m.poll_host();
        assert!(g.recv(&mut m).is_empty(), "sent beyond the guest's credit");
    }
    // The guest consumed the 8 bytes: a credit update releases the next 8.
    g.send(&mut m, pkt(OP_CREDIT_UPDATE, 40, 7, 0, 8, 8), &[]);
    let got = settle(&mut m, &mut g, |p| !p.is_empty());
    assert_eq!(got[0].0.len, 8);
    // A credit request is answered with a credit update carrying our state.
    g.send(&mut m, pkt(OP_CREDIT_REQUEST, 40, 7, 0, 8, 16), &[]);
    let got = settle(&mut m, &mut g, |p| p.iter().any(|(h, _)| h.op == OP_CREDIT_UPDATE));
    let cu = got.iter().find(|(h, _)| h.op == OP_CREDIT_UPDATE).unwrap();
    assert_eq!((cu.0.buf_alloc, cu.0.fwd_cnt), (BUF_ALLOC, 0));
}

#[test]
fn guest_overrunning_our_credit_is_reset() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, uds) = muxer(dir.path());
    let listener = host_listener(&uds, 9);
    let mem = memory();
    let mut g = Guest::new(&mem);
    g.give_rx(16);
    g.send(&mut m, pkt(OP_REQUEST, 41, 9, 0, 4096, 0), &[]);
    let (host, _) = listener.accept().unwrap();
    assert_eq!(g.recv(&mut m)[0].0.op, OP_RESPONSE);
    // The host is not reading and our buffer is nearly full: 10 more bytes fit, 11 do not.
    let key = ConnKey {
        host_port: 9,
        guest_port: 41,
    };
    let c = m.conns.get_mut(&key).unwrap();
    // Fill the socket buffer first so nothing more can be flushed to the host.
    while c.stream.write(&[0u8; 65536]).is_ok() {}
    c.tx_buf = vec![0; BUF_ALLOC as usize - 10];
    g.send(&mut m, pkt(OP_RW, 41, 9, 10, 4096, 0), &[7; 10]);
    assert!(g.recv(&mut m).iter().all(|(h, _)| h.op != OP_RST));
    g.send(&mut m, pkt(OP_RW, 41, 9, 11, 4096, 0), &[7; 11]);
    assert!(g.recv(&mut m).iter().any(|(h, _)| h.op == OP_RST));
    assert_eq!(m.connection_count(), 0);
    drop(host);
}

#[test]
fn rst_shutdown_refusal_and_spoofing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, uds) = muxer(dir.path());
    let listener = host_listener(&uds, 11);
    let mem = memory();
    let mut g = Guest::new(&mem);
    g.give_rx(16);
    // Nobody listens on port 12: refused with RST.
    g.send(&mut m, pkt(OP_REQUEST, 50, 12, 0, 4096, 0), &[]);
    let got = g.recv(&mut m);
    assert_eq!((got[0].0.op, got[0].0.dst_port), (OP_RST, 50));
    // Spoofed source CID: dropped silently.
    let mut spoof = pkt(OP_REQUEST, 51, 11, 0, 4096, 0);
    spoof.src_cid = 99;
    g.send(&mut m, spoof, &[]);
    assert!(g.recv(&mut m).is_empty());
    assert_eq!(m.connection_count(), 0);
    // Data for an unknown connection: RST.
    g.send(&mut m, pkt(OP_RW, 52, 11, 1, 4096, 0), b"x");
    assert_eq!(g.recv(&mut m)[0].0.op, OP_RST);
    // Header claims more payload than the chain holds: dropped, no panic.
    let mut short = pkt(OP_RW, 52, 11, 1000, 4096, 0);
    short.len = 1000;
    let i = g.tx_next;
    let addr = TX_BUFS + u64::from(i) * 0x1000;
    mem.write_slice(&short.to_bytes(), GuestAddress(addr)).unwrap();
    g.tx_mock
        .add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(addr, HDR_LEN as u32 + 10, 0, 0))],
            i,
        )
        .unwrap();
    g.tx_next += 1;
    assert!(m.process_tx(&mut g.tx, &mem));

    // A real connection, closed by the host: the guest gets SHUTDOWN; the guest's RST removes it.
    g.send(&mut m, pkt(OP_REQUEST, 60, 11, 0, 4096, 0), &[]);
    let (host, _) = listener.accept().unwrap();
    assert_eq!(g.recv(&mut m)[0].0.op, OP_RESPONSE);
    drop(host);
    let got = settle(&mut m, &mut g, |p| p.iter().any(|(h, _)| h.op == OP_SHUTDOWN));
    let sd = got.iter().find(|(h, _)| h.op == OP_SHUTDOWN).unwrap();
    assert_eq!(sd.0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    g.send(&mut m, pkt(OP_RST, 60, 11, 0, 4096, 0), &[]);
    assert_eq!(m.connection_count(), 0);

    // Guest-side RST closes the host socket.
    g.send(&mut m, pkt(OP_REQUEST, 61, 11, 0, 4096, 0), &[]);
    let (mut host, _) = listener.accept().unwrap();
    g.recv(&mut m);
    g.send(&mut m, pkt(OP_RST, 61, 11, 0, 4096, 0), &[]);
    let mut rest = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0, "EOF after the guest's RST");

    // Guest SHUTDOWN with both flags: we close and answer RST.
    g.send(&mut m, pkt(OP_REQUEST, 62, 11, 0, 4096, 0), &[]);
    let (mut host, _) = listener.accept().unwrap();
    g.recv(&mut m);
    let mut sd = pkt(OP_SHUTDOWN, 62, 11, 0, 4096, 0);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(&mut m, sd, &[]);
    assert_eq!(g.recv(&mut m)[0].0.op, OP_RST);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn dropping_the_muxer_closes_host_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, uds) = muxer(dir.path());
    let listener = host_listener(&uds, 13);
    let mem = memory();
    let mut g = Guest::new(&mem);
    g.give_rx(4);
    g.send(&mut m, pkt(OP_REQUEST, 70, 13, 0, 4096, 0), &[]);
    let (mut host, _) = listener.accept().unwrap();
    drop(m); // what a device reset does
    let mut rest = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
}
