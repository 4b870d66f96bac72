//! [`Tee`] over the Linux TDX guest ABIs ([`TdxGuest`]); every call is blocking file/ioctl I/O, so it runs on
//! Tokio's blocking pool.

use std::sync::Arc;

use dstack_measurements::eventlog::ccel::parse_ccel;

use crate::tdx::{TdxGuest, TdxPaths, rtmrs_from_tdreport};
use crate::{QUOTE_REPORT_DATA_LEN, RTMR_LEN, Rtmrs, TdxEvent, Tee, TeeError, TeeFuture, TeeKind};

/// Real TDX.
#[derive(Debug, Clone)]
pub struct TdxTee {
    guest: Arc<TdxGuest>,
}

impl TdxTee {
    pub fn new(paths: TdxPaths) -> Self {
        Self {
            guest: Arc::new(TdxGuest::new(paths)),
        }
    }

    /// The underlying guest interface.
    pub fn guest(&self) -> &TdxGuest {
        &self.guest
    }

    fn blocking<T, F>(&self, f: F) -> TeeFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(&TdxGuest) -> Result<T, TeeError> + Send + 'static,
    {
        let guest = Arc::clone(&self.guest);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&guest))
                .await
                .map_err(|e| TeeError::Task(e.to_string()))?
        })
    }
}

/// RTMRs from the measurement sysfs files, or from a TDREPORT on kernels without them (< 6.16).
fn read_rtmrs(guest: &TdxGuest) -> Result<Rtmrs, TeeError> {
    let mut out = [[0u8; RTMR_LEN]; 4];
    for (i, slot) in out.iter_mut().enumerate() {
        match guest.read_rtmr(i as u32) {
            Ok(v) => *slot = v,
            Err(TeeError::Unsupported(_)) => {
                let report = guest.get_report(&[0; QUOTE_REPORT_DATA_LEN])?;
                return Ok(rtmrs_from_tdreport(&report));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn boot_events(guest: &TdxGuest) -> Result<Vec<TdxEvent>, TeeError> {
    let raw = guest.boot_event_log()?;
    let log = parse_ccel(&raw).map_err(|e| TeeError::Malformed(format!("CCEL boot event log: {e}")))?;
    log.to_tdx_events()
        .map_err(|e| TeeError::Malformed(format!("CCEL boot event log: {e}")))
}

impl Tee for TdxTee {
    fn kind(&self) -> TeeKind {
        TeeKind::Tdx
    }

    fn quote(&self, report_data: [u8; QUOTE_REPORT_DATA_LEN]) -> TeeFuture<'_, Vec<u8>> {
        self.blocking(move |g| g.get_quote(&report_data))
    }

    fn extend_rtmr(&self, index: u32, digest: [u8; RTMR_LEN]) -> TeeFuture<'_, ()> {
        self.blocking(move |g| g.extend_rtmr(index, &digest))
    }

    fn rtmrs(&self) -> TeeFuture<'_, Rtmrs> {
        self.blocking(read_rtmrs)
    }

    fn boot_event_log(&self) -> TeeFuture<'_, Vec<TdxEvent>> {
        self.blocking(boot_events)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn fake() -> (tempfile::TempDir, TdxPaths) {
        let dir = tempfile::tempdir().unwrap();
        let paths = TdxPaths::under(dir.path());
        fs::create_dir_all(&paths.measurements).unwrap();
        fs::create_dir_all(&paths.tsm_report).unwrap();
        (dir, paths)
    }

    #[tokio::test]
    async fn rtmrs_and_extend_through_the_trait() {
        let (_dir, paths) = fake();
        for i in 0..4u8 {
            fs::write(paths.measurements.join(format!("rtmr{i}:sha384")), [i; 48]).unwrap();
        }
        let tee: Box<dyn Tee> = Box::new(TdxTee::new(paths.clone()));
        assert_eq!(tee.kind(), TeeKind::Tdx);
        let r = tee.rtmrs().await.unwrap();
        assert_eq!(r, [[0; 48], [1; 48], [2; 48], [3; 48]]);
        tee.extend_rtmr(3, [9; 48]).await.unwrap();
        // The fake sysfs file receives exactly the 48-byte digest, as the kernel attribute would.
        assert_eq!(fs::read(paths.measurements.join("rtmr3:sha384")).unwrap(), vec![9; 48]);
        assert!(matches!(
            tee.extend_rtmr(1, [0; 48]).await,
            Err(TeeError::InvalidArgument(_))
        ));
    }

    #[tokio::test]
    async fn missing_sysfs_falls_back_to_tdreport_and_reports_the_device_error() {
        let (_dir, paths) = fake();
        // No rtmr files and no /dev/tdx_guest: the fallback must surface the device error, not zeros.
        let err = TdxTee::new(paths).rtmrs().await.unwrap_err();
        assert!(
            matches!(err, TeeError::Io { ref what, .. } if what.contains("tdx_guest")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn garbage_ccel_is_malformed() {
        let (_dir, paths) = fake();
        fs::create_dir_all(paths.ccel.parent().unwrap()).unwrap();
        fs::write(&paths.ccel, [0xffu8; 16]).unwrap();
        let err = TdxTee::new(paths).boot_event_log().await.unwrap_err();
        assert!(matches!(err, TeeError::Malformed(_)), "{err}");
    }
}
