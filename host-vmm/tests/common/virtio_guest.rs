//! A tiny virtio-pci driver emitted as guest code (iced-x86), for payloads that exercise our devices: PCI
//! enumeration through ports 0xCF8/0xCFC, the virtio capability walk, the status/feature handshake, split
//! virtqueues in guest memory, notifications and polling of the used ring (no interrupts).
#![allow(dead_code)]

use super::*;

/// Guest-physical scratch areas (identity-mapped, inside the 64 MiB test guest).
pub const VARS: u64 = 0x50_0000;
pub const QUEUES: u64 = 0x60_0000;
pub const BUFS: u64 = 0x80_0000;
/// Entries per virtqueue the payloads set up.
pub const QSIZE: u16 = 16;

/// Offsets inside a device's vars block: BAR-relative capability addresses resolved at run time.
pub const V_COMMON: i32 = 0x08;
pub const V_NOTIFY: i32 = 0x10;
pub const V_ISR: i32 = 0x18;
pub const V_DEVCFG: i32 = 0x20;
pub const V_MULT: i32 = 0x30;
/// Notify address of queue q at `V_QNOTIFY + 8 q`.
pub const V_QNOTIFY: i32 = 0x40;

/// Device-writable descriptor flag and chaining flag.
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// Labels that end the VM with a status; emitted once at the end with [`Fails::emit`].
#[derive(Default)]
pub struct Fails(Vec<(CodeLabel, u8)>);

impl Fails {
    pub fn at(&mut self, a: &mut CodeAssembler, code: u8) -> CodeLabel {
        let l = a.create_label();
        self.0.push((l, code));
        l
    }

    pub fn emit(self, a: &mut CodeAssembler) {
        for (mut l, code) in self.0 {
            a.set_label(&mut l).unwrap();
            emit_exit(a, code);
        }
    }
}

/// The layout of one split virtqueue at `base` (descriptors, avail ring at +0x100, used ring at +0x200).
#[derive(Clone, Copy)]
pub struct Vq {
    pub index: u16,
    pub base: u64,
    /// The device's vars block.
    pub vars: u64,
}

impl Vq {
    pub fn desc(&self) -> u64 {
        self.base
    }
    pub fn avail(&self) -> u64 {
        self.base + 0x100
    }
    pub fn used(&self) -> u64 {
        self.base + 0x200
    }
}

/// `eax = config dword at r15 | (ebx & 0xfc)` (clobbers edx).
fn cfg_read_ebx(a: &mut CodeAssembler) {
    a.mov(eax, ebx).unwrap();
    a.and(eax, 0xfc).unwrap();
    a.or(eax, r15d).unwrap();
    a.mov(edx, 0xcf8).unwrap();
    a.out(dx, eax).unwrap();
    a.mov(edx, 0xcfc).unwrap();
    a.in_(eax, dx).unwrap();
}

/// Scans bus 0 for vendor 0x1af4 / `device_id`; leaves CONFIG_ADDRESS of the function in r15 or fails.
pub fn find_device(a: &mut CodeAssembler, fails: &mut Fails, device_id: u16, fail_code: u8) {
    let want = 0x1af4u32 | (u32::from(device_id) << 16);
    let mut lp = a.create_label();
    let mut found = a.create_label();
    let fail = fails.at(a, fail_code);
    a.mov(r15d, 0x8000_0000u32).unwrap();
    a.set_label(&mut lp).unwrap();
    a.xor(ebx, ebx).unwrap();
    cfg_read_ebx(a);
    a.cmp(eax, want).unwrap();
    a.je(found).unwrap();
    a.add(r15d, 1 << 11).unwrap();
    a.cmp(r15d, 0x8000_0000u32 | (32 << 11)).unwrap();
    a.jb(lp).unwrap();
    a.jmp(fail).unwrap();
    a.set_label(&mut found).unwrap();
}

/// With r15 = the function: enables memory decoding and bus mastering, reads BAR 0 (64-bit) and walks the
/// capability list, storing the common/notify/ISR/device-config addresses and the notify multiplier at
/// `vars`.
pub fn map_capabilities(a: &mut CodeAssembler, vars: u64) {
    // Command register: memory space + bus master (status bits are read-only or write-1-to-clear).
    a.mov(eax, r15d).unwrap();
    a.or(eax, 4).unwrap();
    a.mov(edx, 0xcf8).unwrap();
    a.out(dx, eax).unwrap();
    a.mov(edx, 0xcfc).unwrap();
    a.mov(eax, 6).unwrap();
    a.out(dx, eax).unwrap();
    // r14 = BAR0 (low dword & ~0xf | high dword << 32).
    a.mov(ebx, 0x14).unwrap();
    cfg_read_ebx(a);
    a.mov(r14d, eax).unwrap();
    a.shl(r14, 32).unwrap();
    a.mov(ebx, 0x10).unwrap();
    cfg_read_ebx(a);
    a.and(eax, 0xffff_fff0u32).unwrap();
    a.or(r14, rax).unwrap();
    a.mov(r13, vars).unwrap();
    // ebx = capability pointer.
    a.mov(ebx, 0x34).unwrap();
    cfg_read_ebx(a);
    a.movzx(ebx, al).unwrap();
    let mut next = a.create_label();
    let mut done = a.create_label();
    let mut lp = a.create_label();
    a.set_label(&mut lp).unwrap();
    a.test(ebx, ebx).unwrap();
    a.jz(done).unwrap();
    cfg_read_ebx(a); // [id, next, len, cfg_type]
    a.mov(r12d, eax).unwrap();
    a.cmp(al, 0x09).unwrap();
    a.jne(next).unwrap();
    // r11 = cfg_type * 8 = vars slot; r10 = BAR0 + offset.
    a.mov(r11d, r12d).unwrap();
    a.shr(r11d, 24).unwrap();
    a.shl(r11d, 3).unwrap();
    a.add(ebx, 8).unwrap();
    cfg_read_ebx(a);
    a.sub(ebx, 8).unwrap();
    a.mov(r10d, eax).unwrap();
    a.add(r10, r14).unwrap();
    a.mov(qword_ptr(r13 + r11), r10).unwrap();
    // Notify capability: the multiplier follows at +16.
    a.cmp(r11d, 2 * 8).unwrap();
    a.jne(next).unwrap();
    a.add(ebx, 16).unwrap();
    cfg_read_ebx(a);
    a.sub(ebx, 16).unwrap();
    a.mov(dword_ptr(r13 + V_MULT), eax).unwrap();
    a.set_label(&mut next).unwrap();
    a.mov(ebx, r12d).unwrap();
    a.shr(ebx, 8).unwrap();
    a.and(ebx, 0xff).unwrap();
    a.jmp(lp).unwrap();
    a.set_label(&mut done).unwrap();
}

/// Status handshake, VERSION_1 only, and the given queues (size 16); then DRIVER_OK.
pub fn init_device(a: &mut CodeAssembler, fails: &mut Fails, vars: u64, queues: &[Vq], fail_code: u8) {
    init_device_features(a, fails, vars, queues, fail_code, 1 << 32);
}

/// [`init_device`] accepting the given feature bits (which must include VERSION_1, bit 32).
pub fn init_device_features(
    a: &mut CodeAssembler,
    fails: &mut Fails,
    vars: u64,
    queues: &[Vq],
    fail_code: u8,
    features: u64,
) {
    let fail = fails.at(a, fail_code);
    a.mov(r13, vars).unwrap();
    a.mov(rdi, qword_ptr(r13 + V_COMMON)).unwrap();
    for s in [0u32, 1, 3] {
        a.mov(byte_ptr(rdi + 0x14), s).unwrap();
    }
    a.mov(dword_ptr(rdi + 0x08), 1u32).unwrap(); // driver_feature_select = 1
    a.mov(dword_ptr(rdi + 0x0c), (features >> 32) as u32).unwrap();
    a.mov(dword_ptr(rdi + 0x08), 0u32).unwrap();
    a.mov(dword_ptr(rdi + 0x0c), features as u32).unwrap();
    a.mov(byte_ptr(rdi + 0x14), 0x0bu32).unwrap();
    a.movzx(eax, byte_ptr(rdi + 0x14)).unwrap();
    a.test(al, 0x08).unwrap();
    a.jz(fail).unwrap();
    for q in queues {
        a.mov(word_ptr(rdi + 0x16), u32::from(q.index)).unwrap();
        a.mov(word_ptr(rdi + 0x18), u32::from(QSIZE)).unwrap();
        for (off, addr) in [(0x20, q.desc()), (0x28, q.avail()), (0x30, q.used())] {
            a.mov(dword_ptr(rdi + off), addr as u32).unwrap();
            a.mov(dword_ptr(rdi + off + 4), (addr >> 32) as u32).unwrap();
        }
        a.mov(word_ptr(rdi + 0x1c), 1u32).unwrap();
        // Notify address = notify base + queue_notify_off * multiplier.
        a.movzx(eax, word_ptr(rdi + 0x1e)).unwrap();
        a.imul_2(eax, dword_ptr(r13 + V_MULT)).unwrap();
        a.add(rax, qword_ptr(r13 + V_NOTIFY)).unwrap();
        a.mov(qword_ptr(r13 + V_QNOTIFY + 8 * i32::from(q.index)), rax).unwrap();
    }
    a.mov(byte_ptr(rdi + 0x14), 0x0fu32).unwrap();
    a.movzx(eax, byte_ptr(rdi + 0x14)).unwrap();
    a.cmp(al, 0x0f).unwrap();
    a.jne(fail).unwrap();
}

/// Writes descriptor `index` of `q` (next = index + 1 when chained).
pub fn write_desc(a: &mut CodeAssembler, q: &Vq, index: u16, addr: u64, len: u32, flags: u16) {
    a.mov(rdi, q.desc() + 16 * u64::from(index)).unwrap();
    a.mov(rax, addr).unwrap();
    a.mov(qword_ptr(rdi), rax).unwrap();
    a.mov(dword_ptr(rdi + 8), len).unwrap();
    a.mov(word_ptr(rdi + 12), u32::from(flags)).unwrap();
    a.mov(word_ptr(rdi + 14), u32::from(index + 1)).unwrap();
}

/// Makes descriptor `head` the `r12w`-th available entry, bumps avail.idx to r12w + 1 and notifies.
/// Clobbers rax, rcx, rdi; r12 is incremented.
pub fn publish_r12(a: &mut CodeAssembler, q: &Vq, head: u16) {
    a.mov(rdi, q.avail()).unwrap();
    a.movzx(ecx, r12w).unwrap();
    a.and(ecx, u32::from(QSIZE - 1)).unwrap();
    a.mov(word_ptr(rdi + rcx * 2 + 4), u32::from(head)).unwrap();
    a.inc(r12d).unwrap();
    a.mov(word_ptr(rdi + 2), r12w).unwrap();
    a.mov(rdi, q.vars).unwrap();
    a.mov(rdi, qword_ptr(rdi + V_QNOTIFY + 8 * i32::from(q.index))).unwrap();
    a.mov(word_ptr(rdi), u32::from(q.index)).unwrap();
}

/// Spins until used.idx of `q` has reached the low 16 bits of `reg32` (in wrapping 16-bit order: the device
/// may already have used more, e.g. a vsock SHUTDOWN right after the data), or fails after ~1e8 polls.
pub fn wait_used(a: &mut CodeAssembler, fails: &mut Fails, q: &Vq, target: AsmRegister32, fail_code: u8) {
    let fail = fails.at(a, fail_code);
    let mut lp = a.create_label();
    let mut ok = a.create_label();
    a.mov(rdi, q.used()).unwrap();
    a.mov(ecx, 100_000_000u32).unwrap();
    a.set_label(&mut lp).unwrap();
    a.movzx(eax, word_ptr(rdi + 2)).unwrap();
    a.sub(ax, target_low16(target)).unwrap();
    a.jns(ok).unwrap();
    a.pause().unwrap();
    a.dec(ecx).unwrap();
    a.jnz(lp).unwrap();
    a.jmp(fail).unwrap();
    a.set_label(&mut ok).unwrap();
}

fn target_low16(r: AsmRegister32) -> AsmRegister16 {
    if r == r12d {
        r12w
    } else if r == r13d {
        r13w
    } else {
        r9w
    }
}

/// Fails unless the `used` ring entry `slot` (0-based) reports `len` bytes.
pub fn check_used_len(a: &mut CodeAssembler, fails: &mut Fails, q: &Vq, slot: u16, len: u32, fail_code: u8) {
    let fail = fails.at(a, fail_code);
    a.mov(rdi, q.used() + 4 + 8 * u64::from(slot % QSIZE)).unwrap();
    a.cmp(dword_ptr(rdi + 4), len).unwrap();
    a.jne(fail).unwrap();
}
