//! The Linux TDX guest ABIs: quotes through configfs-tsm, TDREPORT through `/dev/tdx_guest`, RTMR reads and
//! extends through the `tdx_guest` measurement sysfs files (Linux ≥ 6.16, `CONFIG_TSM_MEASUREMENTS`), and the
//! boot event log from the ACPI CCEL table.
//!
//! Every path is configurable so the backend is testable against a fake tree; [`TdxPaths::system`] has the
//! real ones.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{QUOTE_REPORT_DATA_LEN, RTMR_LEN, TeeError};

/// Size of a TDREPORT (TDREPORT_STRUCT).
pub const TDREPORT_LEN: usize = 1024;
/// Offset of RTMR0 inside a TDREPORT (TDINFO at 512, RTMRs at TDINFO+208).
const TDREPORT_RTMR0_OFFSET: usize = 720;
/// What configfs-tsm reports as the provider for TDX.
const TSM_PROVIDER_TDX: &str = "tdx_guest";

/// Where the TDX guest ABIs live.
#[derive(Debug, Clone)]
pub struct TdxPaths {
    /// configfs-tsm report directory (`/sys/kernel/config/tsm/report`).
    pub tsm_report: PathBuf,
    /// Measurement sysfs directory with `rtmrN:sha384` files.
    pub measurements: PathBuf,
    /// The `tdx_guest` misc device.
    pub device: PathBuf,
    /// Raw CCEL log area exported by ACPI.
    pub ccel: PathBuf,
}

impl TdxPaths {
    /// The paths on a real Linux TDX guest.
    pub fn system() -> Self {
        Self {
            tsm_report: "/sys/kernel/config/tsm/report".into(),
            measurements: "/sys/class/misc/tdx_guest/measurements".into(),
            device: "/dev/tdx_guest".into(),
            ccel: "/sys/firmware/acpi/tables/data/CCEL".into(),
        }
    }

    /// Same layout under another root (for tests with a fake tree).
    pub fn under(root: &Path) -> Self {
        let sys = Self::system();
        let rebase = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
        Self {
            tsm_report: rebase(&sys.tsm_report),
            measurements: rebase(&sys.measurements),
            device: rebase(&sys.device),
            ccel: rebase(&sys.ccel),
        }
    }
}

/// The TDX guest interface of the running kernel.
#[derive(Debug)]
pub struct TdxGuest {
    paths: TdxPaths,
}

static REPORT_SEQ: AtomicU64 = AtomicU64::new(0);

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TeeError {
    let what = what.into();
    move |source| TeeError::Io { what, source }
}

impl TdxGuest {
    pub fn new(paths: TdxPaths) -> Self {
        Self { paths }
    }

    /// True when this looks like a TDX guest: the device exists or configfs-tsm has the TDX provider.
    pub fn present(paths: &TdxPaths) -> bool {
        paths.device.exists() || paths.measurements.exists()
    }

    /// Gets a TD quote for `report_data` through configfs-tsm.
    ///
    /// The kernel bumps `generation` on every write to `inblob`; reading it before and after `outblob`
    /// detects another writer racing us on the same entry (we use a fresh entry per call anyway).
    pub fn get_quote(&self, report_data: &[u8; QUOTE_REPORT_DATA_LEN]) -> Result<Vec<u8>, TeeError> {
        let root = &self.paths.tsm_report;
        if !root.is_dir() {
            return Err(TeeError::Unsupported(format!(
                "{} is missing: the kernel lacks configfs-tsm (CONFIG_TSM_REPORTS) or configfs is not mounted",
                root.display()
            )));
        }
        let seq = REPORT_SEQ.fetch_add(1, Ordering::Relaxed);
        let entry = root.join(format!("dstack-{}-{seq}", std::process::id()));
        fs::create_dir(&entry).map_err(io(format!("creating {}", entry.display())))?;
        let result = self.quote_in(&entry, report_data);
        // configfs entries must be removed with rmdir; a failure here only leaks a kernel object.
        let _ = fs::remove_dir(&entry);
        result
    }

    fn quote_in(&self, entry: &Path, report_data: &[u8; QUOTE_REPORT_DATA_LEN]) -> Result<Vec<u8>, TeeError> {
        let provider = read_trimmed(&entry.join("provider"))?;
        if provider != TSM_PROVIDER_TDX {
            return Err(TeeError::Unsupported(format!(
                "configfs-tsm provider is {provider:?}, expected {TSM_PROVIDER_TDX:?}"
            )));
        }
        fs::write(entry.join("inblob"), report_data).map_err(io("writing tsm inblob"))?;
        let before = read_generation(entry)?;
        let quote = fs::read(entry.join("outblob")).map_err(io("reading tsm outblob (quote generation failed)"))?;
        let after = read_generation(entry)?;
        if before != after {
            return Err(TeeError::Race(format!(
                "tsm report generation changed from {before} to {after} while reading the quote"
            )));
        }
        if quote.is_empty() {
            return Err(TeeError::Malformed("tsm outblob is empty".into()));
        }
        Ok(quote)
    }

    /// Reads the current value of RTMR `index` (0..=3) from sysfs.
    pub fn read_rtmr(&self, index: u32) -> Result<[u8; RTMR_LEN], TeeError> {
        let path = self.rtmr_path(index)?;
        let bytes = fs::read(&path).map_err(|e| self.measurement_error(&path, e))?;
        bytes
            .try_into()
            .map_err(|b: Vec<u8>| TeeError::Malformed(format!("{} has {} bytes, expected 48", path.display(), b.len())))
    }

    /// Extends RTMR `index` with a SHA-384 digest (the kernel computes `RTMR ← SHA384(RTMR ‖ digest)`).
    ///
    /// Only RTMR2 and RTMR3 may be extended from the guest's userspace: 0 and 1 belong to the firmware.
    pub fn extend_rtmr(&self, index: u32, digest: &[u8; RTMR_LEN]) -> Result<(), TeeError> {
        if !(2..=3).contains(&index) {
            return Err(TeeError::InvalidArgument(format!(
                "RTMR{index} cannot be extended from the guest; only RTMR2 and RTMR3"
            )));
        }
        let path = self.rtmr_path(index)?;
        fs::write(&path, digest).map_err(|e| self.measurement_error(&path, e))
    }

    fn rtmr_path(&self, index: u32) -> Result<PathBuf, TeeError> {
        if index > 3 {
            return Err(TeeError::InvalidArgument(format!("there is no RTMR{index}")));
        }
        Ok(self.paths.measurements.join(format!("rtmr{index}:sha384")))
    }

    fn measurement_error(&self, path: &Path, e: std::io::Error) -> TeeError {
        if e.kind() == ErrorKind::NotFound {
            TeeError::Unsupported(format!(
                "{} is missing: RTMR access needs Linux >= 6.16 with CONFIG_TSM_MEASUREMENTS \
                 (the tdx_guest measurement sysfs ABI)",
                path.display()
            ))
        } else {
            TeeError::Io {
                what: format!("accessing {}", path.display()),
                source: e,
            }
        }
    }

    /// Reads the raw CCEL log area (the TCG crypto-agile boot event log written by the firmware).
    pub fn boot_event_log(&self) -> Result<Vec<u8>, TeeError> {
        fs::read(&self.paths.ccel).map_err(|e| match e.kind() {
            ErrorKind::NotFound => TeeError::Unsupported(format!(
                "{} is missing: no CCEL ACPI table (firmware without TDX event log support)",
                self.paths.ccel.display()
            )),
            _ => TeeError::Io {
                what: format!("reading {}", self.paths.ccel.display()),
                source: e,
            },
        })
    }

    /// Gets a TDREPORT (MAC'd locally, not a quote) through `TDX_CMD_GET_REPORT0`.
    pub fn get_report(&self, report_data: &[u8; QUOTE_REPORT_DATA_LEN]) -> Result<[u8; TDREPORT_LEN], TeeError> {
        ioctl::get_report0(&self.paths.device, report_data)
    }
}

/// The RTMR values recorded in a TDREPORT.
pub fn rtmrs_from_tdreport(report: &[u8; TDREPORT_LEN]) -> [[u8; RTMR_LEN]; 4] {
    let mut out = [[0u8; RTMR_LEN]; 4];
    for (i, rtmr) in out.iter_mut().enumerate() {
        let start = TDREPORT_RTMR0_OFFSET + i * RTMR_LEN;
        rtmr.copy_from_slice(&report[start..start + RTMR_LEN]);
    }
    out
}

fn read_trimmed(path: &Path) -> Result<String, TeeError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(io(format!("reading {}", path.display())))
}

fn read_generation(entry: &Path) -> Result<u64, TeeError> {
    let text = read_trimmed(&entry.join("generation"))?;
    text.parse()
        .map_err(|_| TeeError::Malformed(format!("tsm generation is not a number: {text:?}")))
}

mod ioctl {
    use std::fs::OpenOptions;
    use std::os::fd::AsRawFd;
    use std::path::Path;

    use super::TDREPORT_LEN;
    use crate::{QUOTE_REPORT_DATA_LEN, TeeError};

    /// `struct tdx_report_req` from `include/uapi/linux/tdx-guest.h`.
    #[repr(C)]
    struct TdxReportReq {
        reportdata: [u8; QUOTE_REPORT_DATA_LEN],
        tdreport: [u8; TDREPORT_LEN],
    }

    /// `_IOWR('T', 1, struct tdx_report_req)`: direction read|write (3) << 30, size << 16, type << 8, nr.
    const TDX_CMD_GET_REPORT0: u64 =
        (3 << 30) | ((std::mem::size_of::<TdxReportReq>() as u64) << 16) | ((b'T' as u64) << 8) | 1;

    pub(super) fn get_report0(
        device: &Path,
        report_data: &[u8; QUOTE_REPORT_DATA_LEN],
    ) -> Result<[u8; TDREPORT_LEN], TeeError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(device)
            .map_err(|source| TeeError::Io {
                what: format!("opening {}", device.display()),
                source,
            })?;
        let mut req = TdxReportReq {
            reportdata: *report_data,
            tdreport: [0; TDREPORT_LEN],
        };
        // SAFETY: the fd is open for the duration of the call, the request code matches the kernel's
        // definition for a `struct tdx_report_req` and `req` is a live, correctly sized instance of it.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                TDX_CMD_GET_REPORT0 as _,
                &mut req as *mut TdxReportReq,
            )
        };
        if rc != 0 {
            return Err(TeeError::Io {
                what: "TDX_CMD_GET_REPORT0".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(req.tdreport)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn report_ioctl_number_matches_uapi() {
            // _IOWR('T', 1, struct tdx_report_req) with sizeof == 1088 is 0xc4405401 in the kernel headers.
            assert_eq!(std::mem::size_of::<TdxReportReq>(), 1088);
            assert_eq!(TDX_CMD_GET_REPORT0, 0xc440_5401);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_tree() -> (tempfile::TempDir, TdxPaths) {
        let dir = tempfile::tempdir().unwrap();
        let paths = TdxPaths::under(dir.path());
        fs::create_dir_all(&paths.tsm_report).unwrap();
        fs::create_dir_all(&paths.measurements).unwrap();
        (dir, paths)
    }

    #[test]
    fn rtmr_read_and_extend_use_sysfs_files() {
        let (_dir, paths) = fake_tree();
        let rtmr3 = paths.measurements.join("rtmr3:sha384");
        fs::write(&rtmr3, [7u8; 48]).unwrap();
        let tdx = TdxGuest::new(paths);
        assert_eq!(tdx.read_rtmr(3).unwrap(), [7u8; 48]);
        tdx.extend_rtmr(3, &[9u8; 48]).unwrap();
        // A plain file stands in for the kernel attribute: the write of exactly 48 bytes is what we check.
        assert_eq!(fs::read(&rtmr3).unwrap(), vec![9u8; 48]);
    }

    #[test]
    fn missing_measurement_abi_names_the_kernel_requirement() {
        let (_dir, paths) = fake_tree();
        fs::remove_dir(&paths.measurements).unwrap();
        let err = TdxGuest::new(paths).extend_rtmr(3, &[0; 48]).unwrap_err();
        assert!(matches!(err, TeeError::Unsupported(_)));
        assert!(err.to_string().contains("6.16"), "{err}");
    }

    #[test]
    fn firmware_rtmrs_are_not_extendable() {
        let (_dir, paths) = fake_tree();
        let tdx = TdxGuest::new(paths);
        assert!(matches!(
            tdx.extend_rtmr(0, &[0; 48]),
            Err(TeeError::InvalidArgument(_))
        ));
        assert!(matches!(
            tdx.extend_rtmr(1, &[0; 48]),
            Err(TeeError::InvalidArgument(_))
        ));
        assert!(matches!(tdx.read_rtmr(4), Err(TeeError::InvalidArgument(_))));
    }

    #[test]
    fn wrong_size_rtmr_file_is_malformed() {
        let (_dir, paths) = fake_tree();
        fs::write(paths.measurements.join("rtmr2:sha384"), [1u8; 32]).unwrap();
        assert!(matches!(TdxGuest::new(paths).read_rtmr(2), Err(TeeError::Malformed(_))));
    }

    #[test]
    fn quote_without_configfs_is_unsupported() {
        let (_dir, paths) = fake_tree();
        fs::remove_dir(&paths.tsm_report).unwrap();
        let err = TdxGuest::new(paths).get_quote(&[0; 64]).unwrap_err();
        assert!(err.to_string().contains("configfs-tsm"), "{err}");
    }

    #[test]
    fn quote_with_wrong_provider_is_refused_and_entry_removed() {
        let (_dir, paths) = fake_tree();
        // configfs creates the attribute files on mkdir; a plain directory can't, so the provider read fails
        // and the entry must still be cleaned up.
        let tdx = TdxGuest::new(paths.clone());
        assert!(tdx.get_quote(&[0; 64]).is_err());
        assert_eq!(fs::read_dir(&paths.tsm_report).unwrap().count(), 0);
    }

    #[test]
    fn quote_writes_report_data_and_returns_outblob() {
        let (_dir, paths) = fake_tree();
        // Stand-in for a configfs entry as the kernel populates it on mkdir.
        let entry = paths.tsm_report.join("e");
        fs::create_dir(&entry).unwrap();
        fs::write(entry.join("provider"), "tdx_guest\n").unwrap();
        fs::write(entry.join("generation"), "1\n").unwrap();
        fs::write(entry.join("outblob"), b"QUOTE").unwrap();
        let report_data = [0x5a; 64];
        let quote = TdxGuest::new(paths).quote_in(&entry, &report_data).unwrap();
        assert_eq!(quote, b"QUOTE");
        assert_eq!(fs::read(entry.join("inblob")).unwrap(), report_data.to_vec());
    }

    #[test]
    fn empty_outblob_is_an_error() {
        let (_dir, paths) = fake_tree();
        let entry = paths.tsm_report.join("e");
        fs::create_dir(&entry).unwrap();
        fs::write(entry.join("provider"), "tdx_guest").unwrap();
        fs::write(entry.join("generation"), "3").unwrap();
        fs::write(entry.join("outblob"), b"").unwrap();
        assert!(matches!(
            TdxGuest::new(paths).quote_in(&entry, &[0; 64]),
            Err(TeeError::Malformed(_))
        ));
    }

    #[test]
    fn tdreport_rtmr_offsets() {
        let mut report = [0u8; TDREPORT_LEN];
        for i in 0..4 {
            report[720 + i * 48] = i as u8 + 1;
        }
        let rtmrs = rtmrs_from_tdreport(&report);
        assert_eq!([rtmrs[0][0], rtmrs[1][0], rtmrs[2][0], rtmrs[3][0]], [1, 2, 3, 4]);
    }

    #[test]
    fn missing_ccel_is_unsupported() {
        let (_dir, paths) = fake_tree();
        assert!(matches!(
            TdxGuest::new(paths).boot_event_log(),
            Err(TeeError::Unsupported(_))
        ));
    }
}
