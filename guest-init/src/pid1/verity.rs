//! dm-verity for the rootfs through the device-mapper ioctls (`linux/dm-ioctl.h`), because the initramfs
//! carries no `veritysetup`. Layout as image-build writes it (`veritysetup format` with the hash tree at
//! `data_size`, a verity superblock in the first hash block, 4 KiB blocks, sha256, all-zero salt).
//!
//! Sequence: `DM_DEV_CREATE` → `DM_TABLE_LOAD` (read-only, one `verity` target) → `DM_DEV_SUSPEND`
//! without the suspend flag (= resume). The kernel then verifies every block read against the root hash
//! taken from the measured command line; a mismatch is an I/O error.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `sizeof(struct dm_ioctl)`.
const DM_IOCTL_SIZE: usize = 312;
/// `sizeof(struct dm_target_spec)`.
const DM_TARGET_SPEC_SIZE: usize = 40;
const DM_NAME_LEN: usize = 128;
const DM_UUID_LEN: usize = 129;
const _: () = assert!(48 + DM_NAME_LEN + DM_UUID_LEN <= DM_IOCTL_SIZE);
const DM_READONLY_FLAG: u32 = 1 << 0;
const DM_DEV_CREATE_CMD: u8 = 3;
const DM_DEV_REMOVE_CMD: u8 = 4;
const DM_DEV_SUSPEND_CMD: u8 = 6;
const DM_TABLE_LOAD_CMD: u8 = 9;
/// Block size image-build uses for data and hashes.
pub const VERITY_BLOCK: u64 = 4096;
/// image-build formats with `--salt` of 32 zero bytes.
pub const IMAGE_BUILD_SALT: [u8; 32] = [0; 32];

/// `_IOWR(0xfd, cmd, struct dm_ioctl)`.
pub const fn dm_request(cmd: u8) -> u64 {
    (3u64 << 30) | ((DM_IOCTL_SIZE as u64) << 16) | (0xfd << 8) | cmd as u64
}

/// Errors setting up verity.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    #[error("opening /dev/mapper/control: {0} (is dm_mod loaded?)")]
    Control(std::io::Error),
    #[error("device-mapper {op} for {name}: {source}")]
    Ioctl {
        op: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("verity: {0}")]
    Invalid(String),
}

/// The `verity` target line: `1 <data dev> <hash dev> 4096 4096 <data blocks> <hash start> sha256 <root> <salt>`.
/// The hash tree starts one block after `data_size` (the verity superblock comes first).
pub fn verity_params(device: &Path, data_size: u64, root_hash: &[u8; 32], salt: &[u8]) -> Result<String, VerityError> {
    if data_size == 0 || !data_size.is_multiple_of(VERITY_BLOCK) {
        return Err(VerityError::Invalid(format!(
            "data size {data_size} is not a multiple of 4096"
        )));
    }
    let dev = device.display().to_string();
    if dev.contains(char::is_whitespace) {
        return Err(VerityError::Invalid(format!("device path {dev:?} contains whitespace")));
    }
    let blocks = data_size / VERITY_BLOCK;
    Ok(format!(
        "1 {dev} {dev} {VERITY_BLOCK} {VERITY_BLOCK} {blocks} {} sha256 {} {}",
        blocks + 1,
        hex::encode(root_hash),
        if salt.is_empty() {
            "-".to_owned()
        } else {
            hex::encode(salt)
        }
    ))
}

/// A `struct dm_ioctl` header, optionally followed by one target spec and its parameters.
pub fn dm_buffer(name: &str, flags: u32, target: Option<(u64, &str, &str)>) -> Result<Vec<u8>, VerityError> {
    if name.is_empty() || name.len() >= DM_NAME_LEN {
        return Err(VerityError::Invalid(format!("device name {name:?}")));
    }
    let mut buf = vec![0u8; DM_IOCTL_SIZE];
    if let Some((sectors, ttype, params)) = target {
        let mut spec = vec![0u8; DM_TARGET_SPEC_SIZE];
        spec[8..16].copy_from_slice(&sectors.to_ne_bytes());
        let t = ttype.as_bytes();
        if t.len() >= 16 {
            return Err(VerityError::Invalid(format!("target type {ttype:?}")));
        }
        spec[24..24 + t.len()].copy_from_slice(t);
        spec.extend_from_slice(params.as_bytes());
        spec.push(0);
        spec.resize(spec.len().div_ceil(8) * 8, 0);
        buf.extend_from_slice(&spec);
        buf[20..24].copy_from_slice(&1u32.to_ne_bytes()); // target_count
    }
    let len = buf.len() as u32;
    // version 4.0.0: the interface major every kernel since 2.6 speaks.
    buf[0..4].copy_from_slice(&4u32.to_ne_bytes());
    buf[12..16].copy_from_slice(&len.to_ne_bytes()); // data_size
    buf[16..20].copy_from_slice(&(DM_IOCTL_SIZE as u32).to_ne_bytes()); // data_start
    buf[28..32].copy_from_slice(&flags.to_ne_bytes());
    buf[48..48 + name.len()].copy_from_slice(name.as_bytes());
    Ok(buf)
}

fn dm_ioctl(ctl: &File, cmd: u8, op: &'static str, name: &str, buf: &mut [u8]) -> Result<(), VerityError> {
    // SAFETY: `buf` is a valid, writable `struct dm_ioctl` (plus trailing data) of `data_size` bytes; the
    // kernel reads and writes at most `data_size` bytes of it.
    let rc = unsafe { libc::ioctl(ctl.as_raw_fd(), dm_request(cmd) as libc::Ioctl, buf.as_mut_ptr()) };
    if rc < 0 {
        return Err(VerityError::Ioctl {
            op,
            name: name.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Creates the read-only verity device `name` over `device`; returns its `/dev/dm-N` path.
pub fn open_verity(
    dev_root: &Path,
    name: &str,
    device: &Path,
    data_size: u64,
    root_hash: &[u8; 32],
) -> Result<PathBuf, VerityError> {
    let ctl = File::options()
        .read(true)
        .write(true)
        .open(dev_root.join("dev/mapper/control"))
        .map_err(VerityError::Control)?;
    let params = verity_params(device, data_size, root_hash, &IMAGE_BUILD_SALT)?;
    let mut create = dm_buffer(name, 0, None)?;
    dm_ioctl(&ctl, DM_DEV_CREATE_CMD, "create", name, &mut create)?;
    let result = (|| {
        let mut load = dm_buffer(name, DM_READONLY_FLAG, Some((data_size / 512, "verity", &params)))?;
        dm_ioctl(&ctl, DM_TABLE_LOAD_CMD, "table load", name, &mut load)?;
        let mut resume = dm_buffer(name, 0, None)?;
        dm_ioctl(&ctl, DM_DEV_SUSPEND_CMD, "resume", name, &mut resume)?;
        let dev = u64::from_ne_bytes(resume[40..48].try_into().unwrap_or_default());
        // huge_decode_dev: minor = (dev & 0xff) | ((dev >> 12) & 0xfff00).
        let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
        Ok(dev_root.join(format!("dev/dm-{minor}")))
    })();
    if result.is_err() {
        let mut remove = dm_buffer(name, 0, None)?;
        let _ = dm_ioctl(&ctl, DM_DEV_REMOVE_CMD, "remove", name, &mut remove);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_headers() {
        // From <linux/dm-ioctl.h> on x86_64: DM_DEV_CREATE = 0xc138fd03, DM_TABLE_LOAD = 0xc138fd09.
        assert_eq!(dm_request(DM_DEV_CREATE_CMD), 0xc138_fd03);
        assert_eq!(dm_request(DM_TABLE_LOAD_CMD), 0xc138_fd09);
        assert_eq!(dm_request(DM_DEV_SUSPEND_CMD), 0xc138_fd06);
    }

    #[test]
    fn table_line_matches_veritysetup_layout() {
        let p = verity_params(Path::new("/dev/vda"), 8192, &[0xab; 32], &IMAGE_BUILD_SALT).unwrap();
        assert_eq!(
            p,
            format!(
                "1 /dev/vda /dev/vda 4096 4096 2 3 sha256 {} {}",
                "ab".repeat(32),
                "00".repeat(32)
            )
        );
        assert!(verity_params(Path::new("/dev/vda"), 100, &[0; 32], &[]).is_err());
    }

    #[test]
    fn buffer_layout() {
        let b = dm_buffer("root", DM_READONLY_FLAG, Some((16, "verity", "x y"))).unwrap();
        assert_eq!(b.len() % 8, 0);
        assert_eq!(u32::from_ne_bytes(b[12..16].try_into().unwrap()) as usize, b.len());
        assert_eq!(u32::from_ne_bytes(b[16..20].try_into().unwrap()), 312);
        assert_eq!(u32::from_ne_bytes(b[20..24].try_into().unwrap()), 1);
        assert_eq!(&b[48..52], b"root");
        assert_eq!(u64::from_ne_bytes(b[312 + 8..312 + 16].try_into().unwrap()), 16);
        assert_eq!(&b[312 + 24..312 + 30], b"verity");
        assert_eq!(&b[352..356], b"x y\0");
        assert!(dm_buffer("", 0, None).is_err());
    }
}
