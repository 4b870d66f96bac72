//! The few AML (ACPI Machine Language, ACPI 6.5 §20) constructs our DSDT needs, encoded by hand: names,
//! integers, packages, buffers, devices, scopes, EISA IDs and resource templates (§6.4).

/// `PkgLength` (§20.2.4): the encoded length counts its own bytes.
pub fn pkg_length(body_len: usize) -> Vec<u8> {
    // One byte holds up to 63; n extra bytes add 4 + 8n bits.
    for extra in 0..=3usize {
        let total = body_len + 1 + extra;
        let limit = if extra == 0 { 1 << 6 } else { 1 << (4 + 8 * extra) };
        if total < limit {
            if extra == 0 {
                return vec![total as u8];
            }
            let mut out = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                out.push((total >> (4 + 8 * i)) as u8);
            }
            return out;
        }
    }
    // 2^28 bytes of AML is far beyond anything we generate; clamp rather than panic.
    vec![0xff, 0xff, 0xff, 0xff]
}

/// A NameSeg: four characters, padded with `_`.
pub fn name_seg(name: &str) -> [u8; 4] {
    let mut s = [b'_'; 4];
    for (d, c) in s.iter_mut().zip(name.bytes()) {
        *d = c;
    }
    s
}

/// A name path like `\_SB_` or `PCI0` (single segment, optional root prefix).
fn name_string(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let rest = match name.strip_prefix('\\') {
        Some(r) => {
            out.push(b'\\');
            r
        }
        None => name,
    };
    out.extend_from_slice(&name_seg(rest));
    out
}

/// The smallest integer encoding of `v`.
pub fn integer(v: u64) -> Vec<u8> {
    match v {
        0 => vec![0x00],
        1 => vec![0x01],
        2..=0xff => vec![0x0a, v as u8],
        0x100..=0xffff => [&[0x0b][..], &(v as u16).to_le_bytes()].concat(),
        0x1_0000..=0xffff_ffff => [&[0x0c][..], &(v as u32).to_le_bytes()].concat(),
        _ => [&[0x0e][..], &v.to_le_bytes()].concat(),
    }
}

/// A DWordConst, as `EisaId("PNP0A08")` compiles (§19.6.35): 3 compressed letters + 4 hex digits, byte-swapped.
pub fn eisa_id(id: &str) -> Vec<u8> {
    let b = id.as_bytes();
    let letter = |i: usize| u32::from(b.get(i).copied().unwrap_or(b'@').wrapping_sub(0x40) & 0x1f);
    let hex = |i: usize| b.get(i).and_then(|c| (*c as char).to_digit(16)).unwrap_or(0);
    let v = (letter(0) << 26)
        | (letter(1) << 21)
        | (letter(2) << 16)
        | (hex(3) << 12)
        | (hex(4) << 8)
        | (hex(5) << 4)
        | hex(6);
    [&[0x0c][..], &v.swap_bytes().to_le_bytes()].concat()
}

/// `Name (name, object)`.
pub fn name(n: &str, object: &[u8]) -> Vec<u8> {
    [&[0x08][..], &name_string(n), object].concat()
}

fn with_pkg_length(op: &[u8], body: &[u8]) -> Vec<u8> {
    [op, &pkg_length(body.len()), body].concat()
}

/// `Package () { elements }` (each element already encoded).
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![elements.len() as u8];
    for e in elements {
        body.extend_from_slice(e);
    }
    with_pkg_length(&[0x12], &body)
}

/// `Buffer () { bytes }`.
pub fn buffer(bytes: &[u8]) -> Vec<u8> {
    let body = [&integer(bytes.len() as u64)[..], bytes].concat();
    with_pkg_length(&[0x11], &body)
}

/// `Device (name) { terms }`.
pub fn device(n: &str, terms: &[Vec<u8>]) -> Vec<u8> {
    let body = [name_string(n), terms.concat()].concat();
    with_pkg_length(&[0x5b, 0x82], &body)
}

/// `Scope (name) { terms }`.
pub fn scope(n: &str, terms: &[Vec<u8>]) -> Vec<u8> {
    let body = [name_string(n), terms.concat()].concat();
    with_pkg_length(&[0x10], &body)
}

/// `ResourceTemplate () { descriptors }`: a buffer ending with the End Tag (checksum 0 = not computed).
pub fn resource_template(descriptors: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = descriptors.concat();
    bytes.extend_from_slice(&[0x79, 0x00]);
    buffer(&bytes)
}

/// Address-space descriptor flags of a bridge window: producer, positive decode, min and max fixed.
const WINDOW_FLAGS: u8 = 0b1100;

/// `WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, count)`.
pub fn word_bus_number(min: u16, max: u16) -> Vec<u8> {
    word_address(2, 0, min, max)
}

/// `WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max, 0, len)`.
pub fn word_io(min: u16, max: u16) -> Vec<u8> {
    word_address(1, 0b11, min, max)
}

fn word_address(resource_type: u8, type_flags: u8, min: u16, max: u16) -> Vec<u8> {
    let mut d = vec![0x88, 13, 0, resource_type, WINDOW_FLAGS, type_flags];
    d.extend_from_slice(&0u16.to_le_bytes()); // granularity
    d.extend_from_slice(&min.to_le_bytes());
    d.extend_from_slice(&max.to_le_bytes());
    d.extend_from_slice(&0u16.to_le_bytes()); // translation
    d.extend_from_slice(&(max - min + 1).to_le_bytes());
    d
}

/// `IO (Decode16, min, min, 1, len)`: a fixed block of ports the bridge itself consumes.
pub fn io_port(base: u16, len: u8) -> Vec<u8> {
    let mut d = vec![0x47, 0x01];
    d.extend_from_slice(&base.to_le_bytes());
    d.extend_from_slice(&base.to_le_bytes());
    d.extend_from_slice(&[1, len]);
    d
}

/// Memory type flags: read-write, non-cacheable.
const MEM_RW_NONCACHEABLE: u8 = 0b01;

/// `DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, 0, base, end, 0, len)`.
pub fn dword_memory(base: u32, len: u32) -> Vec<u8> {
    let mut d = vec![0x87, 23, 0, 0, WINDOW_FLAGS, MEM_RW_NONCACHEABLE];
    for v in [0, base, base + (len - 1), 0, len] {
        d.extend_from_slice(&v.to_le_bytes());
    }
    d
}

/// `QWordMemory (...)` with the same flags as [`dword_memory`].
pub fn qword_memory(base: u64, len: u64) -> Vec<u8> {
    let mut d = vec![0x8a, 43, 0, 0, WINDOW_FLAGS, MEM_RW_NONCACHEABLE];
    for v in [0, base, base + (len - 1), 0, len] {
        d.extend_from_slice(&v.to_le_bytes());
    }
    d
}

/// `Memory32Fixed (ReadWrite, base, len)`.
pub fn memory32_fixed(base: u32, len: u32) -> Vec<u8> {
    let mut d = vec![0x86, 9, 0, 1];
    d.extend_from_slice(&base.to_le_bytes());
    d.extend_from_slice(&len.to_le_bytes());
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PkgLength examples worked from §20.2.4's bit layout.
    #[test]
    fn pkg_length_encodings() {
        assert_eq!(pkg_length(0), vec![1]);
        assert_eq!(pkg_length(62), vec![63]);
        // 63 body bytes need 2 length bytes: total 65 = 0x41.
        assert_eq!(pkg_length(63), vec![0x41, 0x04]);
        // 4093 + 2 = 4095 still fits two bytes; 4094 + 3 = 4097 needs three.
        assert_eq!(pkg_length(4093), vec![0x4f, 0xff]);
        assert_eq!(pkg_length(4094), vec![0x81, 0x00, 0x01]);
    }

    /// EisaId("PNP0A03") is the well-known 0x030AD041 (e.g. Linux's and QEMU's tables), EisaId("PNP0A08") is
    /// 0x080AD041 and EisaId("PNP0C02") 0x020CD041.
    #[test]
    fn eisa_ids() {
        assert_eq!(
            eisa_id("PNP0A03"),
            [&[0x0c][..], &0x030a_d041u32.to_le_bytes()].concat()
        );
        assert_eq!(
            eisa_id("PNP0A08"),
            [&[0x0c][..], &0x080a_d041u32.to_le_bytes()].concat()
        );
        assert_eq!(
            eisa_id("PNP0C02"),
            [&[0x0c][..], &0x020c_d041u32.to_le_bytes()].concat()
        );
    }

    #[test]
    fn small_objects() {
        assert_eq!(integer(5), vec![0x0a, 5]);
        assert_eq!(integer(0x1234), vec![0x0b, 0x34, 0x12]);
        assert_eq!(integer(1 << 32), vec![0x0e, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(
            name("_S5", &package(&[integer(5), integer(0)])),
            vec![0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x0a, 5, 0x00]
        );
        assert_eq!(word_bus_number(0, 0)[14..16], [1, 0], "length = max - min + 1");
        let m = dword_memory(0xc000_0000, 0x2000_0000);
        assert_eq!(m.len(), 26);
        assert_eq!(&m[14..18], &0xdfff_ffffu32.to_le_bytes());
    }
}
