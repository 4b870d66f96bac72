use super::*;

/// A hand-built PE32+ EFI application: 2 sections stored out of order, a non-zero CheckSum,
/// trailing data after the last section, and optionally an attribute certificate table.
pub(crate) fn minimal_pe(with_cert: bool) -> Vec<u8> {
    let mut img = vec![0u8; 0x600];
    img[0..2].copy_from_slice(b"MZ");
    img[0x3c..0x40].copy_from_slice(&0x40u32.to_le_bytes());
    img[0x40..0x44].copy_from_slice(b"PE\0\0");
    let coff = 0x44;
    img[coff..coff + 2].copy_from_slice(&0x8664u16.to_le_bytes());
    img[coff + 2..coff + 4].copy_from_slice(&2u16.to_le_bytes());
    img[coff + 16..coff + 18].copy_from_slice(&240u16.to_le_bytes());
    img[coff + 18..coff + 20].copy_from_slice(&0x0022u16.to_le_bytes());
    let opt = 0x58;
    let put32 = |img: &mut Vec<u8>, off: usize, v: u32| img[off..off + 4].copy_from_slice(&v.to_le_bytes());
    img[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
    put32(&mut img, opt + 4, 0x200); // SizeOfCode
    put32(&mut img, opt + 16, 0x1000); // AddressOfEntryPoint
    put32(&mut img, opt + 20, 0x1000); // BaseOfCode
    put32(&mut img, opt + 32, 0x1000); // SectionAlignment
    put32(&mut img, opt + 36, 0x200); // FileAlignment
    put32(&mut img, opt + 56, 0x3000); // SizeOfImage
    put32(&mut img, opt + 60, 0x200); // SizeOfHeaders
    put32(&mut img, opt + 64, 0xdead_beef); // CheckSum (excluded from the digest)
    img[opt + 68..opt + 70].copy_from_slice(&10u16.to_le_bytes()); // EFI application
    put32(&mut img, opt + 108, 16); // NumberOfRvaAndSizes
    let sect = opt + 240;
    for (i, (name, va, ptr)) in [(b".text\0\0\0", 0x1000u32, 0x400u32), (b".data\0\0\0", 0x2000, 0x200)]
        .into_iter()
        .enumerate()
    {
        let s = sect + 40 * i;
        img[s..s + 8].copy_from_slice(name);
        put32(&mut img, s + 8, 0x200);
        put32(&mut img, s + 12, va);
        put32(&mut img, s + 16, 0x200);
        put32(&mut img, s + 20, ptr);
        put32(&mut img, s + 36, 0x6000_0020);
    }
    for (i, b) in img.iter_mut().enumerate().skip(0x200) {
        *b = (i * 7 + 3) as u8;
    }
    img.extend_from_slice(&[0x5a; 0x40]); // trailing data, hashed
    if with_cert {
        let cert_off = img.len() as u32;
        let cert = [0xc3u8; 0x30];
        put32(&mut img, opt + 112 + 32, cert_off);
        put32(&mut img, opt + 112 + 36, cert.len() as u32);
        img.extend_from_slice(&cert);
    }
    img
}

// Computed independently with osslsigncode 2.9 (Debian trixie):
//   osslsigncode extract-data -h sha384 -in pe.efi -out data.der  (digest = last 48 bytes)
const OSSL_DIGEST: &str =
    "85fa0cc201baef076a813d4a1d3211642c4a3f99b44d20edfa06dcf08f06c57a4744964897b0abc954bd3bd81c54777d";

#[test]
fn digest_matches_osslsigncode() {
    let img = minimal_pe(false);
    if let Ok(p) = std::env::var("DSTACK_DUMP_MINIMAL_PE") {
        std::fs::write(p, &img).unwrap();
    }
    assert_eq!(hex::encode(authenticode_sha384(&img).unwrap()), OSSL_DIGEST);
}

#[test]
fn checksum_and_cert_table_are_excluded() {
    let base = authenticode_sha384(&minimal_pe(false)).unwrap();
    let mut img = minimal_pe(false);
    img[0x58 + 64] ^= 0xff;
    assert_eq!(authenticode_sha384(&img).unwrap(), base);
    // Adding a certificate table (and its directory entry) leaves the digest unchanged.
    assert_eq!(authenticode_sha384(&minimal_pe(true)).unwrap(), base);
    // A byte inside a section changes it.
    let mut img = minimal_pe(false);
    img[0x450] ^= 1;
    assert_ne!(authenticode_sha384(&img).unwrap(), base);
}

#[test]
fn malformed_images_are_errors() {
    assert!(authenticode_sha384(b"").is_err());
    assert!(authenticode_sha384(b"MZ").is_err());
    let img = minimal_pe(false);
    for cut in 0..img.len() {
        let _ = authenticode_sha384(&img[..cut]);
    }
    let mut bad = img.clone();
    bad[0x3c..0x40].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(authenticode_sha384(&bad).is_err());
    let mut bad = img;
    bad[0x148 + 20..0x148 + 24].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(
        authenticode_sha384(&bad)
            .unwrap_err()
            .to_string()
            .contains("section.raw_data")
    );
}
