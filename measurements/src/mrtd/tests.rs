use super::*;

/// Section layout of the synthetic TDVF: (data_offset, raw, gpa, mem, type, attrs).
const SECTIONS: [(u32, u32, u64, u64, u32, u32); 5] = [
    (0x0000, 0x3000, 0xffc0_0000, 0x3000, 0, ATTR_MR_EXTEND), // BFV
    (0x3000, 0x1000, 0xffc0_3000, 0x1000, 1, 0),              // CFV
    (0, 0, 0x80_9000, 0x2000, 2, 0),                          // TD_HOB
    (0, 0, 0x90_0000, 0x2000, 3, ATTR_PAGE_AUG),              // TEMP_MEM, accepted later
    (0x4000, 0x800, 0x100_0000, 0x1000, 5, ATTR_MR_EXTEND),   // payload, zero-filled tail
];
const FW_LEN: usize = 0x10000;
const GUID_POS: usize = 0x8ff0;
const DESC_POS: usize = 0x9000;

fn descriptor() -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(b"TDVF");
    d.extend_from_slice(&(16 + 32 * SECTIONS.len() as u32).to_le_bytes());
    d.extend_from_slice(&1u32.to_le_bytes());
    d.extend_from_slice(&(SECTIONS.len() as u32).to_le_bytes());
    for (off, raw, gpa, mem, ty, attr) in SECTIONS {
        d.extend_from_slice(&off.to_le_bytes());
        d.extend_from_slice(&raw.to_le_bytes());
        d.extend_from_slice(&gpa.to_le_bytes());
        d.extend_from_slice(&mem.to_le_bytes());
        d.extend_from_slice(&ty.to_le_bytes());
        d.extend_from_slice(&attr.to_le_bytes());
    }
    d
}

/// Deterministic firmware body, descriptor at DESC_POS preceded by the metadata GUID.
fn base_fw() -> Vec<u8> {
    let mut fw = vec![0u8; FW_LEN];
    let mut x: u32 = 0x1234_5678;
    for b in fw.iter_mut().take(0x8000) {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        *b = (x >> 24) as u8;
    }
    fw[GUID_POS..GUID_POS + 16].copy_from_slice(&TDX_METADATA_GUID);
    let d = descriptor();
    fw[DESC_POS..DESC_POS + d.len()].copy_from_slice(&d);
    fw
}

/// OVMF footer table: [other entry][TDX entry][u16 len][footer GUID][32-byte reset area].
pub(crate) fn fw_with_guid_table() -> Vec<u8> {
    let mut fw = base_fw();
    let mut table = Vec::new();
    table.extend_from_slice(&[0xaa; 8]); // an unrelated entry with 8 data bytes
    table.extend_from_slice(&26u16.to_le_bytes());
    table.extend_from_slice(&[0x42; 16]);
    table.extend_from_slice(&((FW_LEN - DESC_POS) as u32).to_le_bytes());
    table.extend_from_slice(&22u16.to_le_bytes());
    table.extend_from_slice(&TDX_METADATA_OFFSET_GUID);
    let total = (table.len() + 18) as u16;
    table.extend_from_slice(&total.to_le_bytes());
    table.extend_from_slice(&OVMF_TABLE_FOOTER_GUID);
    let start = FW_LEN - 32 - table.len();
    fw[start..FW_LEN - 32].copy_from_slice(&table);
    fw
}

fn fw_with_legacy_pointer(to_guid: bool) -> Vec<u8> {
    let mut fw = base_fw();
    let target = if to_guid { GUID_POS } else { DESC_POS };
    fw[FW_LEN - 0x20..FW_LEN - 0x1c].copy_from_slice(&((FW_LEN - target) as u32).to_le_bytes());
    fw
}

/// Reference computation straight from the known layout (no parsing involved).
fn reference(fw: &[u8], two_pass: bool) -> [u8; 48] {
    let rec = |tag: &[u8], gpa: u64| {
        let mut b = [0u8; 128];
        b[..tag.len()].copy_from_slice(tag);
        b[16..24].copy_from_slice(&gpa.to_le_bytes());
        b.to_vec()
    };
    let mut stream: Vec<u8> = Vec::new();
    for (off, raw, gpa, mem, _, attr) in SECTIONS {
        let mut data = fw[off as usize..(off + raw) as usize].to_vec();
        data.resize(mem as usize, 0);
        let pages = (mem / 4096) as usize;
        let add = |p: usize| rec(b"MEM.PAGE.ADD", gpa + (p * 4096) as u64);
        let ext = |p: usize| -> Vec<u8> {
            (0..16)
                .flat_map(|c| {
                    let a = p * 4096 + c * 256;
                    let mut v = rec(b"MR.EXTEND", gpa + a as u64);
                    v.extend_from_slice(&data[a..a + 256]);
                    v
                })
                .collect()
        };
        let do_add = attr & ATTR_PAGE_AUG == 0;
        let do_ext = attr & ATTR_MR_EXTEND != 0;
        if two_pass {
            (0..pages).filter(|_| do_add).for_each(|p| stream.extend(add(p)));
            (0..pages).filter(|_| do_ext).for_each(|p| stream.extend(ext(p)));
        } else {
            for p in 0..pages {
                if do_add {
                    stream.extend(add(p));
                }
                if do_ext {
                    stream.extend(ext(p));
                }
            }
        }
    }
    Sha384::digest(&stream).into()
}

// The same synthetic image run through tests/xcheck/mrtd.py (independent Python code).
const PY_SINGLE: &str =
    "3c579b4f572bb846510b282975d146b130bc2e04c63cb7f3886d2ad00c30272d6058121dcc74e7f0b2ddd363a8e2bf55";
const PY_TWO: &str = "44803080e2dd0d9b2403fcce77760d0e8cbcbbff86cef5d659d5104c27276b8f2485edc8e3ba77e5416b89e9fa4e8d5f";

#[test]
fn guid_table_and_legacy_pointer_agree() {
    let a = fw_with_guid_table();
    let b = fw_with_legacy_pointer(false);
    let c = fw_with_legacy_pointer(true);
    let ta = parse_tdvf(&a).unwrap();
    assert_eq!(ta.located_by, Locator::GuidTable);
    assert_eq!(ta.descriptor_offset, DESC_POS);
    assert_eq!(ta.sections.len(), 5);
    assert_eq!(parse_tdvf(&b).unwrap().located_by, Locator::LegacyPointer);
    assert_eq!(parse_tdvf(&c).unwrap().descriptor_offset, DESC_POS);
    for fw in [&a, &b, &c] {
        for (order, two) in [(PageOrder::SinglePass, false), (PageOrder::TwoPass, true)] {
            assert_eq!(compute_mrtd(fw, order).unwrap(), reference(fw, two));
        }
    }
    // Only the footer/pointer bytes differ, which are not measured: same MRTD.
    let m = compute_mrtd(&a, PageOrder::SinglePass).unwrap();
    assert_eq!(m, compute_mrtd(&b, PageOrder::SinglePass).unwrap());
    assert_ne!(m, compute_mrtd(&a, PageOrder::TwoPass).unwrap());
}

#[test]
fn matches_independent_python() {
    let fw = fw_with_guid_table();
    if let Ok(p) = std::env::var("DSTACK_DUMP_SYNTH_TDVF") {
        std::fs::write(p, &fw).unwrap();
    }
    assert_eq!(
        hex::encode(compute_mrtd(&fw, PageOrder::SinglePass).unwrap()),
        PY_SINGLE
    );
    assert_eq!(hex::encode(compute_mrtd(&fw, PageOrder::TwoPass).unwrap()), PY_TWO);
}

#[test]
fn malformed_metadata_is_an_error() {
    assert_eq!(parse_tdvf(&[0u8; 100]), Err(MrtdError::NotFound));
    assert_eq!(parse_tdvf(&[]), Err(MrtdError::NotFound));
    // Bad signature.
    let mut fw = fw_with_guid_table();
    fw[DESC_POS] = b'X';
    assert!(parse_tdvf(&fw).unwrap_err().to_string().contains("tdvf.signature"));
    // Section raw data past the end.
    let mut fw = fw_with_guid_table();
    fw[DESC_POS + 16 + 4..DESC_POS + 16 + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(parse_tdvf(&fw).unwrap_err().to_string().contains("raw_data"));
    // Huge section count.
    let mut fw = fw_with_guid_table();
    fw[DESC_POS + 12..DESC_POS + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(parse_tdvf(&fw).is_err());
    // Table length larger than the image.
    let mut fw = fw_with_guid_table();
    fw[FW_LEN - 50..FW_LEN - 48].copy_from_slice(&u16::MAX.to_le_bytes());
    assert!(parse_tdvf(&fw).is_err());
    // Every truncation of the image fails cleanly (no panic).
    let fw = fw_with_guid_table();
    for cut in (0..fw.len()).step_by(509) {
        let _ = parse_tdvf(&fw[cut..]);
        let _ = parse_tdvf(&fw[..cut]);
    }
}

/// Stable, bounded mutation fuzzing (dstack-testkit) of the TDVF locators and descriptor parser, seeded with
/// the synthetic images above and, when present, the local cargo-fuzz corpus (`../fuzz/corpus/tdvf`, the top-level cargo-fuzz crate).
#[test]
fn mutated_firmware_never_panics() {
    let mut seeds = vec![
        fw_with_guid_table(),
        fw_with_legacy_pointer(true),
        fw_with_legacy_pointer(false),
    ];
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/tdvf");
    seeds.extend(dstack_testkit::load_dir(&corpus, 150, 64 * 1024));
    let r = dstack_testkit::run(
        "tdvf",
        &seeds,
        dstack_testkit::Budget::new(3_000, 4),
        |fw| match parse_tdvf(fw) {
            Ok(tdvf) => {
                // What the parser promises its callers: raw data inside the image, page-aligned memory ranges.
                for s in &tdvf.sections {
                    assert!((s.data_offset as usize).saturating_add(s.raw_data_size as usize) <= fw.len());
                    assert_eq!(s.memory_address % PAGE, 0);
                    assert_eq!(s.memory_data_size % PAGE, 0);
                    assert!(s.memory_data_size >= u64::from(s.raw_data_size));
                }
                let pages: u64 = tdvf.sections.iter().map(|s| s.memory_data_size / PAGE).sum();
                if pages < 64 {
                    let _ = compute_mrtd_with(fw, &tdvf, PageOrder::SinglePass);
                    let _ = compute_mrtd_with(fw, &tdvf, PageOrder::TwoPass);
                }
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        },
    );
    assert!(r.mutated > 100, "{r:?}");
}
