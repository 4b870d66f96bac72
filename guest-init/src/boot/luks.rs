//! The LUKS2 data disk (DESIGN.md §3 step 6), through `cryptsetup`, `blkid`, `mkfs.ext4`, `e2fsck`.
//!
//! - Probe: a LUKS magic at any LUKS2 header offset → existing LUKS; else any signature `blkid -p` finds
//!   (filesystem, partition table, …) → refuse; else, for the raw data disk ([`probe_data_disk`]), any
//!   nonzero byte in its first 16 MiB or last 1 MiB → refuse (blkid recognises neither damaged headers nor
//!   foreign data); else blank → format. A disk is never formatted if it has anything on it.
//! - Format: `luksFormat --type luks2 --cipher aes-xts-plain64 --key-size 512 --offset 32768
//!   --sector-size 512 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --hash sha256 -d -` (dstack's layout;
//!   the passphrase is 256 random bits, so stretching buys nothing), passphrase on stdin.
//! - Open: the header is copied with `luksHeaderBackup` into a private directory (tmpfs), validated
//!   there (binary header + `luksDump --dump-json-metadata`, dstack's rules: one luks2 keyslot with
//!   aes-xts-plain64/512-bit/pbkdf2-sha256/af luks1 sha256 4000 stripes, one crypt segment
//!   aes-xts-plain64 at 16 MiB, dynamic size, 512-byte sectors, no integrity, no tokens, no flags or
//!   requirements), and the device is opened **with that validated copy** (`--header`), so the host cannot
//!   swap the header between check and use. Exit code 2 (no key slot matches) → [`LuksError::WrongKey`].
//!
//! The passphrase is the lowercase hex of `disk_crypt_key` (dstack-compatible), given on stdin only.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::proc::{self, CmdError};

/// Data starts here (dstack's `PAYLOAD_OFFSET`).
pub const PAYLOAD_OFFSET: u64 = 16 << 20;
const LUKS_MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const LUKS_MAGIC_2ND: &[u8; 6] = b"SKUL\xba\xbe";
/// Where a LUKS2 secondary header may sit (cryptsetup's `hdr2_offsets`).
const SECONDARY_OFFSETS: &[u64] = &[
    0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
];
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

/// Errors on the data disk.
#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    #[error("data disk {0}: wrong disk key (no LUKS key slot accepts it); refusing to continue")]
    WrongKey(String),
    #[error("data disk {device}: has an existing {what} and no LUKS header; refusing to format it")]
    Occupied { device: String, what: String },
    #[error("data disk {device}: LUKS header rejected: {reason}")]
    BadHeader { device: String, reason: String },
    #[error("data disk {device}: {source}")]
    Tool {
        device: String,
        #[source]
        source: CmdError,
    },
    #[error("data disk {device}: {reason}")]
    Io { device: String, reason: String },
}

/// What is on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Blank,
    Luks,
    Other(String),
}

fn read_at(dev: &Path, off: u64, n: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(dev)?;
    let mut buf = vec![0u8; n];
    let got = f.read_at(&mut buf, off)?;
    buf.truncate(got);
    Ok(buf)
}

/// Bytes at the head of a blank-looking raw disk that must read as zeros (the LUKS2 header area, where every
/// common filesystem and partition table also keeps its signature) and at its tail (backup GPT, RAID
/// superblocks).
const ZEROED_HEAD: u64 = PAYLOAD_OFFSET;
const ZEROED_TAIL: u64 = 1 << 20;

/// [`probe`] for the raw data disk: a disk that carries no signature must also read as zeros at its head and
/// tail before it counts as blank. A fresh (sparse) disk does; a damaged LUKS header, random data or an
/// unknown format does not, and formatting it would destroy what is there.
pub fn probe_data_disk(dev: &Path) -> Result<Probe, LuksError> {
    let found = probe(dev)?;
    if found != Probe::Blank {
        return Ok(found);
    }
    let io = |e: std::io::Error| LuksError::Io {
        device: dev.display().to_string(),
        reason: e.to_string(),
    };
    match first_nonzero(dev).map_err(io)? {
        Some(at) => Ok(Probe::Other(format!(
            "unrecognised nonzero data (no known signature) at offset {at:#x}"
        ))),
        None => Ok(Probe::Blank),
    }
}

/// The first nonzero byte in the head and tail regions of `dev` ([`ZEROED_HEAD`], [`ZEROED_TAIL`]).
fn first_nonzero(dev: &Path) -> std::io::Result<Option<u64>> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let mut f = std::fs::File::open(dev)?;
    // Seeking works for block devices too (their metadata length is 0).
    let size = f.seek(SeekFrom::End(0))?;
    let head = 0..size.min(ZEROED_HEAD);
    let tail = size.saturating_sub(ZEROED_TAIL).max(head.end)..size;
    let mut buf = vec![0u8; 1 << 20];
    for range in [head, tail] {
        let mut off = range.start;
        while off < range.end {
            let want = usize::try_from((range.end - off).min(buf.len() as u64)).unwrap_or(buf.len());
            let chunk = buf.get_mut(..want).unwrap_or_default();
            let n = f.read_at(chunk, off)?;
            if n == 0 {
                break;
            }
            if let Some(i) = chunk.get(..n).unwrap_or_default().iter().position(|&b| b != 0) {
                return Ok(Some(off + i as u64));
            }
            off += n as u64;
        }
    }
    Ok(None)
}

/// Looks at the disk (own magic check first, then `blkid -p`; a blkid error counts as "something").
pub fn probe(dev: &Path) -> Result<Probe, LuksError> {
    let d = dev.display().to_string();
    let io = |e: std::io::Error| LuksError::Io {
        device: d.clone(),
        reason: e.to_string(),
    };
    if read_at(dev, 0, 6).map_err(io)? == LUKS_MAGIC {
        return Ok(Probe::Luks);
    }
    for off in SECONDARY_OFFSETS {
        if read_at(dev, *off, 6).map_err(io)? == LUKS_MAGIC_2ND {
            return Ok(Probe::Luks);
        }
    }
    let out = proc::run_unchecked(
        Command::new("blkid").args(["-p", "-o", "export"]).arg(dev),
        None,
        TOOL_TIMEOUT,
    )
    .map_err(|source| LuksError::Tool {
        device: d.clone(),
        source,
    })?;
    match out.status.code() {
        Some(2) => Ok(Probe::Blank),
        Some(0) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let what = text
                .lines()
                .find_map(|l| l.strip_prefix("TYPE=").map(|t| format!("{t} filesystem")))
                .or_else(|| {
                    text.lines()
                        .find_map(|l| l.strip_prefix("PTTYPE=").map(|t| format!("{t} partition table")))
                })
                .unwrap_or_else(|| "signature".to_owned());
            if what.starts_with("crypto_LUKS") {
                Ok(Probe::Luks)
            } else {
                Ok(Probe::Other(what))
            }
        }
        _ => Ok(Probe::Other(format!(
            "unrecognized content (blkid: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

fn passphrase(key: &[u8]) -> zeroize::Zeroizing<Vec<u8>> {
    zeroize::Zeroizing::new(hex::encode(key).into_bytes())
}

fn tool(device: &Path, cmd: &mut Command, stdin: Option<&[u8]>) -> Result<proc::Output, LuksError> {
    proc::run(cmd, stdin, TOOL_TIMEOUT).map_err(|source| {
        if source.exit_code() == Some(2) && cmd.get_program() == "cryptsetup" {
            LuksError::WrongKey(device.display().to_string())
        } else {
            LuksError::Tool {
                device: device.display().to_string(),
                source,
            }
        }
    })
}

/// Formats a blank disk (caller checked [`probe`] == Blank).
pub fn format(dev: &Path, key: &[u8]) -> Result<(), LuksError> {
    let mut cmd = Command::new("cryptsetup");
    cmd.args([
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        "512",
        "--offset",
        "32768",
        "--sector-size",
        "512",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--hash",
        "sha256",
        "--key-file",
        "-",
    ])
    .arg(dev);
    tool(dev, &mut cmd, Some(&passphrase(key)))?;
    tracing::info!("data disk {}: LUKS2 formatted", dev.display());
    Ok(())
}

fn obj<'a>(v: &'a Value, path: &str) -> Result<&'a serde_json::Map<String, Value>, String> {
    v.as_object().ok_or_else(|| format!("{path}: not an object"))
}

fn only_keys(m: &serde_json::Map<String, Value>, path: &str, allowed: &[&str]) -> Result<(), String> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!("{path}: unexpected field {k:?}")),
        None => Ok(()),
    }
}

fn expect(m: &serde_json::Map<String, Value>, path: &str, field: &str, want: Value) -> Result<(), String> {
    let got = m.get(field).cloned().unwrap_or(Value::Null);
    if got != want {
        return Err(format!("{path}.{field} is {got}, expected {want}"));
    }
    Ok(())
}

fn single<'a>(
    root: &'a serde_json::Map<String, Value>,
    name: &str,
) -> Result<&'a serde_json::Map<String, Value>, String> {
    let m = obj(root.get(name).unwrap_or(&Value::Null), name)?;
    if m.len() != 1 {
        return Err(format!("{name}: expected exactly one entry, found {}", m.len()));
    }
    obj(
        m.get("0").ok_or_else(|| format!("{name}: entry \"0\" missing"))?,
        &format!("{name}.0"),
    )
}

/// Validates `luksDump --dump-json-metadata` output against dstack's rules.
pub fn validate_metadata(json: &Value) -> Result<(), String> {
    let root = obj(json, "metadata")?;
    only_keys(
        root,
        "metadata",
        &["keyslots", "tokens", "segments", "digests", "config"],
    )?;
    if !obj(root.get("tokens").unwrap_or(&Value::Null), "tokens")?.is_empty() {
        return Err("tokens: must be empty".into());
    }
    let ks = single(root, "keyslots")?;
    only_keys(ks, "keyslots.0", &["type", "key_size", "af", "area", "kdf"])?;
    expect(ks, "keyslots.0", "type", "luks2".into())?;
    expect(ks, "keyslots.0", "key_size", 64.into())?;
    let area = obj(ks.get("area").unwrap_or(&Value::Null), "keyslots.0.area")?;
    only_keys(
        area,
        "keyslots.0.area",
        &["type", "offset", "size", "encryption", "key_size"],
    )?;
    expect(area, "keyslots.0.area", "type", "raw".into())?;
    expect(area, "keyslots.0.area", "encryption", "aes-xts-plain64".into())?;
    expect(area, "keyslots.0.area", "key_size", 64.into())?;
    let kdf = obj(ks.get("kdf").unwrap_or(&Value::Null), "keyslots.0.kdf")?;
    only_keys(kdf, "keyslots.0.kdf", &["type", "hash", "iterations", "salt"])?;
    expect(kdf, "keyslots.0.kdf", "type", "pbkdf2".into())?;
    expect(kdf, "keyslots.0.kdf", "hash", "sha256".into())?;
    let af = obj(ks.get("af").unwrap_or(&Value::Null), "keyslots.0.af")?;
    only_keys(af, "keyslots.0.af", &["type", "stripes", "hash"])?;
    expect(af, "keyslots.0.af", "type", "luks1".into())?;
    expect(af, "keyslots.0.af", "hash", "sha256".into())?;
    expect(af, "keyslots.0.af", "stripes", 4000.into())?;

    let seg = single(root, "segments")?;
    only_keys(
        seg,
        "segments.0",
        &["type", "offset", "size", "iv_tweak", "encryption", "sector_size"],
    )?;
    expect(seg, "segments.0", "type", "crypt".into())?;
    expect(seg, "segments.0", "offset", PAYLOAD_OFFSET.to_string().into())?;
    expect(seg, "segments.0", "size", "dynamic".into())?;
    expect(seg, "segments.0", "iv_tweak", "0".into())?;
    expect(seg, "segments.0", "encryption", "aes-xts-plain64".into())?;
    expect(seg, "segments.0", "sector_size", 512.into())?;

    let dg = single(root, "digests")?;
    only_keys(
        dg,
        "digests.0",
        &["type", "keyslots", "segments", "hash", "iterations", "salt", "digest"],
    )?;
    expect(dg, "digests.0", "type", "pbkdf2".into())?;
    expect(dg, "digests.0", "hash", "sha256".into())?;
    expect(dg, "digests.0", "keyslots", serde_json::json!(["0"]))?;
    expect(dg, "digests.0", "segments", serde_json::json!(["0"]))?;

    let cfg = obj(root.get("config").unwrap_or(&Value::Null), "config")?;
    only_keys(cfg, "config", &["json_size", "keyslots_size"])?;
    Ok(())
}

/// Checks the binary LUKS2 header at the start of a header backup (magic, version, checksum algorithm,
/// empty label and subsystem, header size and offset).
pub fn validate_binary_header(hdr: &[u8]) -> Result<(), String> {
    let get = |r: std::ops::Range<usize>| hdr.get(r).ok_or("header truncated");
    if get(0..6)? != LUKS_MAGIC {
        return Err("bad primary header magic".into());
    }
    if get(6..8)? != [0, 2] {
        return Err("not a LUKS version 2 header".into());
    }
    let hdr_size = u64::from_be_bytes(get(8..16)?.try_into().map_err(|_| "header truncated")?);
    if !(16384..=4 << 20).contains(&hdr_size) {
        return Err(format!("header size {hdr_size} out of range"));
    }
    if get(24..72)?.iter().any(|b| *b != 0) {
        return Err("non-empty label".into());
    }
    let csum = get(72..104)?;
    if &csum[..7] != b"sha256\0" || csum.iter().skip(7).any(|b| *b != 0) {
        return Err("checksum algorithm is not sha256".into());
    }
    if get(208..256)?.iter().any(|b| *b != 0) {
        return Err("non-empty subsystem".into());
    }
    if get(256..264)?.iter().any(|b| *b != 0) {
        return Err("primary header offset is not 0".into());
    }
    Ok(())
}

/// Open the device under a name, or only check the key (no device-mapper needed; used by tests).
#[derive(Debug, Clone, Copy)]
pub enum Unlock<'a> {
    Open(&'a str),
    TestKey,
}

/// Backs the header up into `private_dir`, validates it and opens/tests with it. The backup is removed
/// afterwards. Returns the mapper path for [`Unlock::Open`].
pub fn unlock(dev: &Path, key: &[u8], private_dir: &Path, how: Unlock<'_>) -> Result<Option<PathBuf>, LuksError> {
    let d = dev.display().to_string();
    let bad = |reason: String| LuksError::BadHeader {
        device: d.clone(),
        reason,
    };
    std::fs::create_dir_all(private_dir).map_err(|e| LuksError::Io {
        device: d.clone(),
        reason: e.to_string(),
    })?;
    let _ = std::fs::set_permissions(private_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
    let backup = private_dir.join("luks-header");
    let _ = std::fs::remove_file(&backup);
    let result = (|| {
        tool(
            dev,
            Command::new("cryptsetup")
                .args(["luksHeaderBackup", "--batch-mode", "--header-backup-file"])
                .arg(&backup)
                .arg(dev),
            None,
        )?;
        let head = read_at(&backup, 0, 4096).map_err(|e| bad(e.to_string()))?;
        validate_binary_header(&head).map_err(&bad)?;
        let out = tool(
            dev,
            Command::new("cryptsetup")
                .args(["luksDump", "--dump-json-metadata"])
                .arg(&backup),
            None,
        )?;
        let json: Value = serde_json::from_slice(&out.stdout).map_err(|e| bad(format!("luksDump JSON: {e}")))?;
        validate_metadata(&json).map_err(&bad)?;
        let mut cmd = Command::new("cryptsetup");
        cmd.args(["open", "--type", "luks2", "--header"])
            .arg(&backup)
            .args(["--key-file", "-"]);
        match how {
            Unlock::TestKey => {
                cmd.arg("--test-passphrase").arg(dev);
            }
            Unlock::Open(name) => {
                cmd.arg(dev).arg(name);
            }
        }
        tool(dev, &mut cmd, Some(&passphrase(key)))?;
        Ok(match how {
            Unlock::Open(name) => Some(PathBuf::from("/dev/mapper").join(name)),
            Unlock::TestKey => None,
        })
    })();
    let _ = std::fs::remove_file(&backup);
    result
}

/// Creates ext4 on `dev` only if it carries no signature at all (inside our own LUKS volume).
pub fn ensure_ext4(dev: &Path) -> Result<bool, LuksError> {
    let occupied = |what: String| LuksError::Occupied {
        device: dev.display().to_string(),
        what,
    };
    match probe(dev)? {
        Probe::Blank => {
            tool(
                dev,
                Command::new("mkfs.ext4").args(["-q", "-L", "dstack-data"]).arg(dev),
                None,
            )?;
            tracing::info!("{}: ext4 created", dev.display());
            Ok(true)
        }
        Probe::Other(what) if what == "ext4 filesystem" => Ok(false),
        Probe::Other(what) => Err(occupied(what)),
        Probe::Luks => Err(occupied("nested LUKS header".into())),
    }
}

/// `e2fsck -p` (exit 0 or 1 = clean or fixed), then mounts ext4 at `mount_point`.
pub fn check_and_mount_ext4(dev: &Path, mount_point: &Path) -> Result<(), LuksError> {
    let d = dev.display().to_string();
    let out = proc::run_unchecked(
        Command::new("e2fsck").args(["-f", "-p"]).arg(dev),
        None,
        Duration::from_secs(3600),
    )
    .map_err(|source| LuksError::Tool {
        device: d.clone(),
        source,
    })?;
    // What e2fsck did (journal replay after an unclean stop, fixes) belongs in the boot log.
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        tracing::info!("e2fsck {d}: {}", line.trim());
    }
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(LuksError::Io {
            device: d,
            reason: format!(
                "e2fsck failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    std::fs::create_dir_all(mount_point).map_err(|e| LuksError::Io {
        device: d.clone(),
        reason: e.to_string(),
    })?;
    let flags = nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV;
    nix::mount::mount(Some(dev), mount_point, Some("ext4"), flags, None::<&str>).map_err(|e| LuksError::Io {
        device: d,
        reason: format!("mount on {}: {e}", mount_point.display()),
    })?;
    tracing::info!("{} mounted on {}", dev.display(), mount_point.display());
    Ok(())
}

/// `cryptsetup close <name>` (at shutdown).
pub fn close(name: &str) {
    if let Err(e) = proc::run(Command::new("cryptsetup").args(["close", name]), None, TOOL_TIMEOUT) {
        tracing::warn!("cryptsetup close {name}: {e}");
    }
}

/// Mapper name of the data disk (dstack's).
pub const DATA_MAPPER_NAME: &str = "dstack_data_disk";

/// Full data-disk setup: probe → (format) → validate header → open → ext4 → mount. Returns the mapper
/// device path.
pub fn setup_data_disk(dev: &Path, key: &[u8], private_dir: &Path, mount_point: &Path) -> Result<PathBuf, LuksError> {
    match probe_data_disk(dev)? {
        Probe::Blank => {
            tracing::info!("data disk {}: blank, formatting", dev.display());
            format(dev, key)?;
        }
        Probe::Luks => tracing::info!("data disk {}: existing LUKS volume", dev.display()),
        Probe::Other(what) => {
            return Err(LuksError::Occupied {
                device: dev.display().to_string(),
                what,
            });
        }
    }
    let mapper = unlock(dev, key, private_dir, Unlock::Open(DATA_MAPPER_NAME))?.ok_or_else(|| LuksError::Io {
        device: dev.display().to_string(),
        reason: "open returned no mapper device".into(),
    })?;
    // udev is absent: wait for devtmpfs to show the node.
    for _ in 0..50 {
        if mapper.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure_ext4(&mapper)?;
    check_and_mount_ext4(&mapper, mount_point)?;
    Ok(mapper)
}

#[cfg(test)]
#[path = "luks_tests.rs"]
mod tests;
