//! LUKS tests. The metadata tests use `luksDump --dump-json-metadata` output captured from cryptsetup
//! 2.6.1 for a volume formatted with [`format`]'s arguments. The device tests need root, `/dev/loop-control`
//! and the tools from Debian packages `cryptsetup-bin` (cryptsetup), `e2fsprogs` (mkfs.ext4, e2fsck) and
//! `util-linux` (losetup, blkid); they skip with a reason otherwise and fail instead when
//! `DSTACK_REQUIRE_FIXTURES=1`. Opening a mapping additionally needs device-mapper in the kernel
//! (`/sys/class/misc/device-mapper`); without it the key checks use `cryptsetup open --test-passphrase`.

use super::*;
use sha2::{Digest, Sha256};

const DUMP: &str = r#"{"keyslots":{"0":{"type":"luks2","key_size":64,"af":{"type":"luks1","stripes":4000,"hash":"sha256"},
"area":{"type":"raw","offset":"32768","size":"258048","encryption":"aes-xts-plain64","key_size":64},
"kdf":{"type":"pbkdf2","hash":"sha256","iterations":1000,"salt":"di4UnS9cNrPNgZD/2niKjCAiYsI3yq+Y+nAFOZQay2U="}}},
"tokens":{},"segments":{"0":{"type":"crypt","offset":"16777216","size":"dynamic","iv_tweak":"0",
"encryption":"aes-xts-plain64","sector_size":512}},"digests":{"0":{"type":"pbkdf2","keyslots":["0"],"segments":["0"],
"hash":"sha256","iterations":1000,"salt":"AGl9VSd1tYORf707v5xel5g/rRxTKZvYh+6HNAuJXoE=",
"digest":"NBLo4gCHz70qAaaHY5wWfwtr7CZWbG8aFGftYqjCn2k="}},"config":{"json_size":"12288","keyslots_size":"16744448"}}"#;

#[test]
fn metadata_rules() {
    let good: Value = serde_json::from_str(DUMP).unwrap();
    validate_metadata(&good).unwrap();
    type Mutation = fn(&mut Value);
    let cases: &[(&str, Mutation, &str)] = &[
        (
            "cipher_null segment",
            |v| v["segments"]["0"]["encryption"] = "cipher_null-ecb".into(),
            "segments.0.encryption",
        ),
        (
            "cipher_null keyslot",
            |v| v["keyslots"]["0"]["area"]["encryption"] = "cipher_null-ecb".into(),
            "area.encryption",
        ),
        (
            "aes-cbc",
            |v| v["segments"]["0"]["encryption"] = "aes-cbc-essiv:sha256".into(),
            "segments.0.encryption",
        ),
        (
            "argon2",
            |v| v["keyslots"]["0"]["kdf"]["type"] = "argon2id".into(),
            "kdf.type",
        ),
        (
            "second keyslot",
            |v| v["keyslots"]["1"] = v["keyslots"]["0"].clone(),
            "keyslots",
        ),
        (
            "token",
            |v| v["tokens"]["0"] = serde_json::json!({"type":"x"}),
            "tokens",
        ),
        (
            "integrity",
            |v| v["segments"]["0"]["integrity"] = serde_json::json!({}),
            "integrity",
        ),
        (
            "reencrypt segment",
            |v| v["segments"]["0"]["type"] = "linear".into(),
            "segments.0.type",
        ),
        (
            "requirements",
            |v| v["config"]["requirements"] = serde_json::json!({"mandatory":["online-reencrypt"]}),
            "requirements",
        ),
        ("offset", |v| v["segments"]["0"]["offset"] = "4096".into(), "offset"),
        (
            "digest slots",
            |v| v["digests"]["0"]["keyslots"] = serde_json::json!(["0", "1"]),
            "digests.0.keyslots",
        ),
    ];
    for (what, mutate, needle) in cases {
        let mut v = good.clone();
        mutate(&mut v);
        let err = validate_metadata(&v).unwrap_err();
        assert!(err.contains(needle), "{what}: {err}");
    }
}

fn synthetic_header() -> Vec<u8> {
    let mut h = vec![0u8; 4096];
    h[..6].copy_from_slice(LUKS_MAGIC);
    h[6..8].copy_from_slice(&[0, 2]);
    h[8..16].copy_from_slice(&16384u64.to_be_bytes());
    h[72..78].copy_from_slice(b"sha256");
    h
}

#[test]
fn binary_header_rules() {
    validate_binary_header(&synthetic_header()).unwrap();
    let mut h = synthetic_header();
    h[7] = 1;
    assert!(validate_binary_header(&h).unwrap_err().contains("version 2"));
    let mut h = synthetic_header();
    h[24] = b'x';
    assert!(validate_binary_header(&h).unwrap_err().contains("label"));
    let mut h = synthetic_header();
    h[72..78].copy_from_slice(b"sha1\0\0");
    assert!(validate_binary_header(&h).unwrap_err().contains("sha256"));
    assert!(validate_binary_header(&h[..100]).is_err());
}

#[test]
fn mutated_headers_and_metadata_are_refused_cleanly() {
    // The binary header comes off a host-supplied disk; the JSON area too (via luksDump).
    let r = dstack_testkit::run(
        "luks_header",
        &[synthetic_header()],
        dstack_testkit::Budget::new(5_000, 3),
        |h| {
            if let Err(e) = validate_binary_header(h) {
                assert!(!e.is_empty());
            }
        },
    );
    assert!(r.mutated > 500, "{r:?}");
    let mutator = dstack_testkit::Mutator::new(dstack_testkit::seed_from_env()).with_dictionary([
        "\"cipher_null-ecb\"",
        "\"luks1\"",
        "\"argon2id\"",
        "\"0\"",
        "\"-1\"",
        "\"18446744073709551616\"",
        "null",
        "{}",
        "[]",
        "\"dynamic\"",
    ]);
    let mut parsed = 0;
    let r = dstack_testkit::run_with(
        "luks_metadata",
        &[DUMP.as_bytes().to_vec()],
        dstack_testkit::Budget::new(3_000, 3),
        mutator,
        |d| {
            if let Ok(v) = serde_json::from_slice::<Value>(d) {
                parsed += 1;
                if let Err(e) = validate_metadata(&v) {
                    assert!(!e.is_empty());
                }
            }
        },
    );
    assert!(r.mutated > 500 && parsed > 100, "{r:?}, {parsed} parsed as JSON");
}

// ---- device fixtures ----

fn skip_or_fail(reason: &str) -> Option<LoopDev> {
    if std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref() == Ok("1") {
        panic!("LUKS fixture required but unavailable: {reason}");
    }
    eprintln!("SKIP: LUKS device test: {reason}");
    None
}

struct LoopDev {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = proc::run(Command::new("losetup").arg("-d").arg(&self.path), None, TOOL_TIMEOUT);
    }
}

fn loop_dev() -> Option<LoopDev> {
    if !nix::unistd::geteuid().is_root() {
        return skip_or_fail("not running as root");
    }
    if !Path::new("/dev/loop-control").exists() {
        return skip_or_fail("/dev/loop-control is missing");
    }
    for t in ["cryptsetup", "losetup", "blkid", "mkfs.ext4", "e2fsck"] {
        if proc::run_unchecked(Command::new(t).arg("--version"), None, TOOL_TIMEOUT).is_err() {
            return skip_or_fail(&format!("{t} is not installed"));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let out = match proc::run(
        Command::new("losetup").args(["-f", "--show"]).arg(&img),
        None,
        TOOL_TIMEOUT,
    ) {
        Ok(o) => o,
        Err(e) => return skip_or_fail(&format!("losetup: {e}")),
    };
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    Some(LoopDev { path, _dir: dir })
}

fn have_device_mapper() -> bool {
    Path::new("/sys/class/misc/device-mapper").exists()
}

const KEY: [u8; 32] = [0x5a; 32];

#[test]
fn format_then_right_key_opens_and_wrong_key_is_refused() {
    let Some(l) = loop_dev() else { return };
    assert_eq!(probe(&l.path).unwrap(), Probe::Blank);
    format(&l.path, &KEY).unwrap();
    assert_eq!(probe(&l.path).unwrap(), Probe::Luks);
    let private = tempfile::tempdir().unwrap();
    unlock(&l.path, &KEY, private.path(), Unlock::TestKey).unwrap();
    let err = unlock(&l.path, &[0x5b; 32], private.path(), Unlock::TestKey).unwrap_err();
    assert!(matches!(err, LuksError::WrongKey(_)), "{err}");
    assert!(!private.path().join("luks-header").exists(), "header copy removed");
    // Our own format passes our own validation (the layout matches dstack's rules).
    if !have_device_mapper() {
        eprintln!("SKIP: open/mkfs/mount part: no device-mapper in this kernel");
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    let mapper = setup_data_disk(&l.path, &KEY, private.path(), mnt.path()).unwrap();
    std::fs::write(mnt.path().join("persisted"), b"yes").unwrap();
    nix::mount::umount2(mnt.path(), nix::mount::MntFlags::empty()).unwrap();
    close(DATA_MAPPER_NAME);
    assert!(!mapper.exists());
    setup_data_disk(&l.path, &KEY, private.path(), mnt.path()).unwrap();
    assert_eq!(
        std::fs::read(mnt.path().join("persisted")).unwrap(),
        b"yes",
        "reopened, not reformatted"
    );
    nix::mount::umount2(mnt.path(), nix::mount::MntFlags::empty()).unwrap();
    close(DATA_MAPPER_NAME);
    let err = setup_data_disk(&l.path, &[1; 32], private.path(), mnt.path()).unwrap_err();
    assert!(matches!(err, LuksError::WrongKey(_)), "{err}");
}

#[test]
fn existing_ext4_without_luks_is_never_formatted() {
    let Some(l) = loop_dev() else { return };
    proc::run(Command::new("mkfs.ext4").arg("-q").arg(&l.path), None, TOOL_TIMEOUT).unwrap();
    let before = read_at(&l.path, 0, 1 << 20).unwrap();
    let private = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let err = setup_data_disk(&l.path, &KEY, private.path(), mnt.path()).unwrap_err();
    assert!(
        matches!(&err, LuksError::Occupied { what, .. } if what.contains("ext4")),
        "{err}"
    );
    assert_eq!(read_at(&l.path, 0, 1 << 20).unwrap(), before, "disk untouched");
}

/// Rewrites the segment cipher in both header copies to `cipher_null-ecb` (same length) and fixes the
/// header checksums (SHA-256 over the whole header area with the checksum field zeroed), producing a
/// header cryptsetup itself accepts.
fn patch_cipher_null(dev: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(dev).unwrap();
    let mut first = [0u8; 16];
    f.read_exact_at(&mut first, 0).unwrap();
    let hdr_size = u64::from_be_bytes(first[8..16].try_into().unwrap()) as usize;
    for copy in 0..2u64 {
        let off = copy * hdr_size as u64;
        let mut area = vec![0u8; hdr_size];
        f.read_exact_at(&mut area, off).unwrap();
        let json = &area[4096..];
        let seg = json.windows(10).position(|w| w == b"\"segments\"").unwrap();
        let pos = seg + json[seg..].windows(15).position(|w| w == b"aes-xts-plain64").unwrap();
        area[4096 + pos..4096 + pos + 15].copy_from_slice(b"cipher_null-ecb");
        area[448..512].fill(0);
        let sum = Sha256::digest(&area);
        area[448..480].copy_from_slice(&sum);
        f.write_all_at(&area, off).unwrap();
    }
    f.sync_all().unwrap();
}

#[test]
fn cipher_null_header_is_refused() {
    let Some(l) = loop_dev() else { return };
    format(&l.path, &KEY).unwrap();
    patch_cipher_null(&l.path);
    let dump = proc::run(
        Command::new("cryptsetup")
            .args(["luksDump", "--dump-json-metadata"])
            .arg(&l.path),
        None,
        TOOL_TIMEOUT,
    )
    .expect("cryptsetup accepts the patched header");
    assert!(String::from_utf8_lossy(&dump.stdout).contains("cipher_null-ecb"));
    let private = tempfile::tempdir().unwrap();
    let err = unlock(&l.path, &KEY, private.path(), Unlock::TestKey).unwrap_err();
    assert!(
        matches!(&err, LuksError::BadHeader { reason, .. } if reason.contains("segments.0.encryption")),
        "{err}"
    );
}

/// Overwrites 32 bytes of the JSON area of the header copies in `copies` (0 = primary, 1 = secondary)
/// without fixing the checksums: what a torn write or bit rot leaves behind.
fn corrupt_json_area(dev: &Path, copies: &[u64]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(dev).unwrap();
    let mut first = [0u8; 16];
    f.read_exact_at(&mut first, 0).unwrap();
    let hdr_size = u64::from_be_bytes(first[8..16].try_into().unwrap());
    for copy in copies {
        f.write_all_at(&[0xa5; 32], copy * hdr_size + 4096 + 16).unwrap();
    }
    f.sync_all().unwrap();
}

#[test]
fn corrupt_luks_headers_are_refused_and_never_reformatted() {
    let Some(l) = loop_dev() else { return };
    format(&l.path, &KEY).unwrap();
    let private = tempfile::tempdir().unwrap();
    // One damaged copy: cryptsetup falls back to the intact one and the key still works.
    corrupt_json_area(&l.path, &[0]);
    assert_eq!(probe(&l.path).unwrap(), Probe::Luks);
    unlock(&l.path, &KEY, private.path(), Unlock::TestKey).expect("intact secondary header is used");
    // Both copies damaged: refused with an error, and the disk is left exactly as it was (no reformat).
    corrupt_json_area(&l.path, &[0, 1]);
    let before = read_at(&l.path, 0, 1 << 20).unwrap();
    assert_eq!(probe(&l.path).unwrap(), Probe::Luks, "damaged LUKS must not look blank");
    let err = unlock(&l.path, &KEY, private.path(), Unlock::TestKey).unwrap_err();
    assert!(!err.to_string().is_empty());
    if have_device_mapper() {
        let mnt = tempfile::tempdir().unwrap();
        let err = setup_data_disk(&l.path, &KEY, private.path(), mnt.path()).unwrap_err();
        assert!(
            !matches!(err, LuksError::WrongKey(_)),
            "a damaged header is not a wrong key: {err}"
        );
    }
    assert_eq!(read_at(&l.path, 0, 1 << 20).unwrap(), before, "disk untouched");
    assert!(!private.path().join("luks-header").exists(), "header copy removed");
}
