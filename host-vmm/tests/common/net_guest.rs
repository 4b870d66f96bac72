//! Guest-side virtio-net driver pieces for payloads: one RX queue with eight 4 KiB buffers that are re-posted
//! after use, one TX queue with a single descriptor, polling only. Features: VERSION_1 and MAC (no mergeable
//! buffers, so every frame arrives in one buffer with `num_buffers` = 1).
#![allow(dead_code)]

use super::virtio_guest::*;
use super::*;

pub const NET_DEVICE_ID: u16 = 0x1041;
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_MAC: u64 = 1 << 5;
pub const HDR: u32 = 12;

/// Frame being sent (virtio-net header first).
pub const TXBUF: u64 = BUFS;
/// RX buffer `i` at `RXBUF + i * 0x1000`.
pub const RXBUF: u64 = BUFS + 0x10_0000;
pub const RX_BUFFERS: u16 = 8;
/// Driver state beyond the transport vars: RX avail counter, RX used entries consumed, the device MAC.
const RX_AVAIL: u64 = VARS + 0x100;
const RX_SEEN: u64 = VARS + 0x108;
pub const MAC_VAR: u64 = VARS + 0x110;

pub const RXQ: Vq = Vq {
    index: 0,
    base: QUEUES,
    vars: VARS,
};
pub const TXQ: Vq = Vq {
    index: 1,
    base: QUEUES + 0x1000,
    vars: VARS,
};

fn notify(a: &mut CodeAssembler, q: &Vq) {
    a.mov(rdi, q.vars).unwrap();
    a.mov(rdi, qword_ptr(rdi + V_QNOTIFY + 8 * i32::from(q.index))).unwrap();
    a.mov(word_ptr(rdi), u32::from(q.index)).unwrap();
}

/// Finds and initializes the device, copies its MAC (device config bytes 0..6) to [`MAC_VAR`] and posts the
/// RX buffers. r12 becomes the TX avail counter.
pub fn setup(a: &mut CodeAssembler, f: &mut Fails) {
    find_device(a, f, NET_DEVICE_ID, 1);
    map_capabilities(a, VARS);
    init_device_features(a, f, VARS, &[RXQ, TXQ], 2, F_VERSION_1 | F_MAC);
    a.mov(r13, VARS).unwrap();
    a.mov(rdi, qword_ptr(r13 + V_DEVCFG)).unwrap();
    a.mov(rsi, MAC_VAR).unwrap();
    a.mov(eax, dword_ptr(rdi)).unwrap();
    a.mov(dword_ptr(rsi), eax).unwrap();
    a.movzx(eax, word_ptr(rdi + 4)).unwrap();
    a.mov(word_ptr(rsi + 4), ax).unwrap();
    for i in 0..RX_BUFFERS {
        write_desc(a, &RXQ, i, RXBUF + 0x1000 * u64::from(i), 0x1000, F_WRITE);
    }
    a.mov(rdi, RXQ.avail()).unwrap();
    for i in 0..RX_BUFFERS {
        a.mov(word_ptr(rdi + 4 + 2 * i32::from(i)), u32::from(i)).unwrap();
    }
    a.mov(word_ptr(rdi + 2), u32::from(RX_BUFFERS)).unwrap();
    a.mov(rsi, RX_AVAIL).unwrap();
    a.mov(dword_ptr(rsi), u32::from(RX_BUFFERS)).unwrap();
    a.mov(rsi, RX_SEEN).unwrap();
    a.mov(dword_ptr(rsi), 0u32).unwrap();
    notify(a, &RXQ);
    a.xor(r12d, r12d).unwrap();
}

/// Writes the Ethernet header at TXBUF: zero virtio header, `dst`, our MAC as source, `ethertype`.
pub fn tx_eth_header(a: &mut CodeAssembler, dst: [u8; 6], ethertype: u16) {
    a.mov(rdi, TXBUF).unwrap();
    a.mov(qword_ptr(rdi), 0i32).unwrap();
    a.mov(dword_ptr(rdi + 8), 0u32).unwrap();
    a.mov(
        dword_ptr(rdi + 12),
        u32::from_le_bytes([dst[0], dst[1], dst[2], dst[3]]),
    )
    .unwrap();
    a.mov(word_ptr(rdi + 16), u32::from(u16::from_le_bytes([dst[4], dst[5]])))
        .unwrap();
    copy_mac(a, 18);
    a.mov(word_ptr(rdi + 24), u32::from(ethertype.swap_bytes())).unwrap();
}

/// Copies our MAC to TXBUF + `off` (rdi must be TXBUF; clobbers eax, rsi).
pub fn copy_mac(a: &mut CodeAssembler, off: i32) {
    a.mov(rsi, MAC_VAR).unwrap();
    a.mov(eax, dword_ptr(rsi)).unwrap();
    a.mov(dword_ptr(rdi + off), eax).unwrap();
    a.movzx(eax, word_ptr(rsi + 4)).unwrap();
    a.mov(word_ptr(rdi + off + 4), ax).unwrap();
}

/// Sends the `frame_len`-byte frame at TXBUF + 12 and waits for the device to consume it.
pub fn send(a: &mut CodeAssembler, f: &mut Fails, frame_len: u32, fail_code: u8) {
    write_desc(a, &TXQ, 0, TXBUF, HDR + frame_len, 0);
    publish_r12(a, &TXQ, 0);
    wait_used(a, f, &TXQ, r12d, fail_code);
}

/// Waits for the next RX used entry: rbx = its buffer (virtio header first), r8d = used length, r10d = the
/// descriptor id (for [`repost`]).
pub fn recv(a: &mut CodeAssembler, f: &mut Fails, fail_code: u8) {
    let bad_id = f.at(a, fail_code.wrapping_add(1));
    a.mov(rsi, RX_SEEN).unwrap();
    a.mov(r9d, dword_ptr(rsi)).unwrap();
    a.inc(r9d).unwrap();
    wait_used(a, f, &RXQ, r9d, fail_code);
    a.mov(rsi, RX_SEEN).unwrap();
    a.mov(eax, dword_ptr(rsi)).unwrap();
    a.inc(dword_ptr(rsi)).unwrap();
    a.and(eax, u32::from(QSIZE - 1)).unwrap();
    a.mov(rdi, RXQ.used() + 4).unwrap();
    a.mov(r10d, dword_ptr(rdi + rax * 8)).unwrap();
    a.mov(r8d, dword_ptr(rdi + rax * 8 + 4)).unwrap();
    a.cmp(r10d, u32::from(RX_BUFFERS)).unwrap();
    a.jae(bad_id).unwrap();
    a.mov(ebx, r10d).unwrap();
    a.shl(rbx, 12).unwrap();
    a.mov(rax, RXBUF).unwrap();
    a.add(rbx, rax).unwrap();
}

/// Gives RX buffer r10d back to the device.
pub fn repost(a: &mut CodeAssembler) {
    a.mov(rsi, RX_AVAIL).unwrap();
    a.mov(ecx, dword_ptr(rsi)).unwrap();
    a.mov(eax, ecx).unwrap();
    a.and(eax, u32::from(QSIZE - 1)).unwrap();
    a.mov(rdi, RXQ.avail()).unwrap();
    a.mov(word_ptr(rdi + rax * 2 + 4), r10w).unwrap();
    a.inc(ecx).unwrap();
    a.mov(dword_ptr(rsi), ecx).unwrap();
    a.mov(word_ptr(rdi + 2), cx).unwrap();
    notify(a, &RXQ);
}

/// Fills TXBUF + 12 + [14, len) with byte i = 7 i + seed (the pattern [`pattern_frame`] builds on the host).
pub fn fill_pattern(a: &mut CodeAssembler, len: u32, seed: u8) {
    let mut lp = a.create_label();
    a.mov(rdi, TXBUF + u64::from(HDR)).unwrap();
    a.mov(ecx, 14).unwrap();
    a.set_label(&mut lp).unwrap();
    a.lea(eax, dword_ptr(rcx * 8 + i32::from(seed))).unwrap();
    a.sub(eax, ecx).unwrap();
    a.mov(byte_ptr(rdi + rcx), al).unwrap();
    a.inc(ecx).unwrap();
    a.cmp(ecx, len).unwrap();
    a.jb(lp).unwrap();
}

/// The frame [`tx_eth_header`] + [`fill_pattern`] produce, computed on the host.
pub fn pattern_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    for (i, b) in f.iter_mut().enumerate().skip(14) {
        *b = (i as u32 * 7 + u32::from(seed)) as u8;
    }
    f
}

/// Fails with `fail_code` unless the `len` bytes at rbx + 12 equal those at TXBUF + 12.
pub fn compare_with_tx(a: &mut CodeAssembler, f: &mut Fails, len: u32, fail_code: u8) {
    let differ = f.at(a, fail_code);
    let mut lp = a.create_label();
    a.mov(rsi, TXBUF + u64::from(HDR)).unwrap();
    a.xor(ecx, ecx).unwrap();
    a.set_label(&mut lp).unwrap();
    a.mov(al, byte_ptr(rsi + rcx)).unwrap();
    a.cmp(al, byte_ptr(rbx + rcx + HDR as i32)).unwrap();
    a.jne(differ).unwrap();
    a.inc(ecx).unwrap();
    a.cmp(ecx, len).unwrap();
    a.jb(lp).unwrap();
}
