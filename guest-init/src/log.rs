//! Console logging for PID 1: every line goes to `/dev/console` (the kernel's `console=`, normally the serial
//! line `ttyS0`) and, when the console is not the serial port, to `/dev/ttyS0` as well, prefixed with the
//! seconds since boot (CLOCK_BOOTTIME via tracing's uptime timer, which starts when logging starts — early
//! enough in PID 1). Outside PID 1 (tests, `guest-init agent`) it logs to stderr.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use tracing_subscriber::fmt::MakeWriter;

/// Where log lines go.
#[derive(Clone, Default)]
pub struct ConsoleSink {
    files: Arc<Mutex<Vec<File>>>,
}

impl ConsoleSink {
    /// Opens `/dev/console` and, if the active console is not `ttyS0`, also `/dev/ttyS0`. Missing devices
    /// are skipped; with none available the sink writes to stderr.
    pub fn open(dev_root: &Path) -> Self {
        let mut files = Vec::new();
        let console = dev_root.join("dev/console");
        if let Ok(f) = OpenOptions::new().write(true).open(&console) {
            files.push(f);
        }
        let active = std::fs::read_to_string(dev_root.join("sys/class/tty/console/active")).unwrap_or_default();
        if !active.split_whitespace().any(|c| c == "ttyS0")
            && let Ok(f) = OpenOptions::new().write(true).open(dev_root.join("dev/ttyS0"))
        {
            files.push(f);
        }
        Self {
            files: Arc::new(Mutex::new(files)),
        }
    }

    /// Also appends every line to `path` (used by tests and for `/run/log/guest-init.log`).
    pub fn add_file(&self, path: &Path) -> io::Result<()> {
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        if let Ok(mut files) = self.files.lock() {
            files.push(f);
        }
        Ok(())
    }
}

/// One log record being written.
pub struct SinkWriter {
    sink: ConsoleSink,
    buf: Vec<u8>,
}

impl Write for SinkWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SinkWriter {
    fn drop(&mut self) {
        // A serial console wants CRLF-free plain lines; one write per record keeps lines whole.
        let mut files = match self.sink.files.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        if files.is_empty() {
            let _ = io::stderr().write_all(&self.buf);
            return;
        }
        for f in files.iter_mut() {
            let _ = f.write_all(&self.buf);
        }
    }
}

impl<'a> MakeWriter<'a> for ConsoleSink {
    type Writer = SinkWriter;
    fn make_writer(&'a self) -> Self::Writer {
        SinkWriter {
            sink: self.clone(),
            buf: Vec::with_capacity(256),
        }
    }
}

/// Installs the global subscriber (idempotent: a second call is ignored). `RUST_LOG` overrides the
/// default `info` level.
pub fn init(sink: ConsoleSink) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .with_ansi(false)
        .with_target(false)
        .with_writer(sink)
        .try_init();
}

/// Logs to stderr (non-PID-1 use).
pub fn init_stderr() {
    init(ConsoleSink::default());
}
