//! The data-disk decision on host-supplied disk images (the stable counterpart of the `luks_disk` cargo-fuzz
//! target; both use `fuzz/fuzz_targets/common/luks_disk.rs`): probe → format / unlock checks → verdict,
//! without opening anything. Invariants: never panics, a disk with a LUKS magic at any header offset is never
//! formatted, an opened header is LUKS2 with dstack's cipher and KDF, a refusal names the field.
//!
//! Needs `blkid` (Debian `util-linux`); the real-header tests also `cryptsetup` (`cryptsetup-bin`) and the
//! ext4 test `mkfs.ext4` (`e2fsprogs`). A missing tool skips with a reason, or fails when
//! `DSTACK_REQUIRE_FIXTURES=1`.

#[path = "../../fuzz/fuzz_targets/common/luks_disk.rs"]
mod harness;

use std::path::{Path, PathBuf};

use harness::{BIN_HDR_LEN, SECONDARY_OFFSETS, Verdict, check_invariants, decide, write_image};

fn have(tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("command -v {tool} || test -x /usr/sbin/{tool} || test -x /sbin/{tool}"),
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref() != Ok("1"),
            "{tool} is missing but DSTACK_REQUIRE_FIXTURES=1"
        );
        eprintln!("SKIP: {tool} not found");
    }
    found
}

/// `input` = `[ctl] [image head]` as in the harness; returns the verdict after checking the invariants.
fn verdict_of(dir: &Path, input: &[u8]) -> Verdict {
    let img = dir.join("disk.img");
    write_image(&img, input).unwrap();
    let v = decide(&img);
    check_invariants(&img, &v);
    v
}

fn refusal(v: Verdict) -> String {
    match v {
        Verdict::Refuse(r) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The first `len` bytes of a disk formatted by guest-init's own `format` (cryptsetup, dstack's layout).
fn formatted_head(dir: &Path, len: usize) -> Vec<u8> {
    let img = dir.join("luks-src.img");
    std::fs::File::create(&img).unwrap().set_len(20 << 20).unwrap();
    guest_init::boot::luks::format(&img, &[0x5a; 32]).unwrap();
    let mut head = std::fs::read(&img).unwrap();
    head.truncate(len);
    head
}

fn with_ctl(ctl: u8, head: &[u8]) -> Vec<u8> {
    let mut v = vec![ctl];
    v.extend_from_slice(head);
    v
}

#[test]
fn blank_is_formatted_and_any_luks_magic_is_not() {
    if !have("blkid") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(verdict_of(dir.path(), &[0]), Verdict::Format);
    assert_eq!(verdict_of(dir.path(), &[]), Verdict::Format);

    // A primary magic over garbage: LUKS, but the header is refused, naming what is wrong.
    let mut junk = vec![0xa5u8; 8192];
    junk[..6].copy_from_slice(harness::LUKS_MAGIC);
    let r = refusal(verdict_of(dir.path(), &with_ctl(0, &junk)));
    assert!(r.contains("version 2"), "{r}");

    // Only a secondary header (primary wiped), at each offset cryptsetup uses: never formatted.
    for (i, off) in SECONDARY_OFFSETS.iter().enumerate() {
        let ctl = u8::try_from(i + 1).unwrap() | 0x10;
        let r = refusal(verdict_of(dir.path(), &with_ctl(ctl, &[0x11; 64])));
        assert!(r.contains("magic"), "secondary at {off:#x}: {r}");
    }
}

#[test]
fn real_header_opens_and_tampered_fields_are_refused_by_name() {
    if !have("blkid") || !have("cryptsetup") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let head = formatted_head(dir.path(), 0x8000);
    assert_eq!(verdict_of(dir.path(), &with_ctl(0, &head)), Verdict::Open);

    // The JSON-area model equals what cryptsetup itself dumps for the same disk.
    let src = dir.path().join("luks-src.img");
    let out = std::process::Command::new("cryptsetup")
        .args(["luksDump", "--dump-json-metadata"])
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dumped: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let area = &head[BIN_HDR_LEN..0x4000];
    let modelled: serde_json::Value = serde_json::from_slice(area.split(|b| *b == 0).next().unwrap()).unwrap();
    assert_eq!(dumped, modelled, "the JSON area differs from luksDump's metadata");

    // Tampered JSON area (what a host could write): refused, naming the field.
    type Tamper = fn(&mut serde_json::Value);
    let cases: &[(Tamper, &str)] = &[
        (
            |v| v["segments"]["0"]["encryption"] = "cipher_null-ecb".into(),
            "segments.0.encryption",
        ),
        (
            |v| v["keyslots"]["0"]["kdf"]["type"] = "argon2id".into(),
            "keyslots.0.kdf.type",
        ),
        (|v| v["tokens"]["0"] = serde_json::json!({"type": "x"}), "tokens"),
        (|v| v["segments"]["0"]["offset"] = "4096".into(), "segments.0.offset"),
    ];
    for (tamper, field) in cases {
        let mut json = modelled.clone();
        tamper(&mut json);
        let text = serde_json::to_vec(&json).unwrap();
        let mut h = head.clone();
        h[BIN_HDR_LEN..0x4000].fill(0);
        h[BIN_HDR_LEN..BIN_HDR_LEN + text.len()].copy_from_slice(&text);
        let r = refusal(verdict_of(dir.path(), &with_ctl(0, &h)));
        assert!(r.contains(field), "{field}: {r}");
    }
    // Tampered binary header fields.
    let mut h = head.clone();
    h[24] = b'x';
    assert!(refusal(verdict_of(dir.path(), &with_ctl(0, &h))).contains("label"));
    let mut h = head.clone();
    h[72..78].copy_from_slice(b"sha1\0\0");
    assert!(refusal(verdict_of(dir.path(), &with_ctl(0, &h))).contains("checksum"));
    // JSON area cut short (no closing brace).
    let mut h = head.clone();
    h[BIN_HDR_LEN + 100..0x4000].fill(0);
    assert!(refusal(verdict_of(dir.path(), &with_ctl(0, &h))).contains("JSON area"));
}

#[test]
fn ext4_disk_is_refused_not_formatted() {
    if !have("blkid") || !have("mkfs.ext4") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img: PathBuf = dir.path().join("ext4.img");
    std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    let ok = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(ok.success());
    let head = std::fs::read(&img).unwrap()[..0x10000].to_vec();
    let r = refusal(verdict_of(dir.path(), &with_ctl(0, &head)));
    assert!(r.contains("ext4 filesystem"), "{r}");
}

/// Bounded mutation of real and synthetic disks (plus the committed fuzz seeds and any regression inputs in
/// `fuzz/seeds/luks_disk`): every verdict satisfies the invariants.
#[test]
fn mutated_disks_keep_the_invariants() {
    if !have("blkid") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let seed_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/luks_disk");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&seed_dir)
        .map(|d| d.flatten().filter_map(|e| std::fs::read(e.path()).ok()).collect())
        .unwrap_or_default();
    if have("cryptsetup") {
        seeds.push(with_ctl(0, &formatted_head(dir.path(), 0x8000)));
    }
    seeds.push(vec![0]);
    let mut counts = [0usize; 3];
    let report = dstack_testkit::run("luks_disk", &seeds, dstack_testkit::Budget::new(400, 20), |input| {
        let v = verdict_of(dir.path(), input);
        counts[match v {
            Verdict::Format => 0,
            Verdict::Open => 1,
            Verdict::Refuse(_) => 2,
        }] += 1;
    });
    eprintln!("luks_disk: {report:?}; format/open/refuse = {counts:?}");
    assert!(counts[2] > 0, "no input was refused: {counts:?}");
}

/// Regression (#13 fuzzing): with no LUKS magic and no signature `blkid -p` recognises, a disk used to count as
/// blank, so data blkid has no signature for (or a LUKS volume whose every header magic is damaged) was
/// formatted. `probe_data_disk` now also requires zeros; such disks are refused naming the offset.
#[test]
fn nonzero_data_without_a_signature_is_not_formatted() {
    if !have("blkid") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    write_image(&img, &with_ctl(0, &[0x42; 4096])).unwrap();
    let v = decide(&img);
    check_invariants(&img, &v);
    assert!(
        matches!(&v, Verdict::Refuse(r) if r.contains("nonzero data") && r.contains("offset")),
        "{v:?}"
    );
    // What the strict fuzz run found first: a LUKS2 volume's header area with the primary magic wiped and
    // the secondary header one byte off its offset (its JSON metadata intact).
    if have("cryptsetup") {
        let mut head = formatted_head(dir.path(), 0x8000);
        head.insert(0x4000, 0);
        write_image(&img, &with_ctl(0x10, &head)).unwrap();
        let v = decide(&img);
        check_invariants(&img, &v);
        assert!(matches!(&v, Verdict::Refuse(r) if r.contains("nonzero data")), "{v:?}");
    }
}
