//! Progress output for the long parts of a build: a bar redrawn in place when stderr is a terminal, and
//! plain milestone lines (every 10 %) otherwise, so CI logs stay short and readable.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BAR_WIDTH: usize = 30;
const MIB: f64 = 1048576.0;

/// What a progress count measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Items,
}

/// One progress bar over a known total.
pub struct Progress {
    label: String,
    total: u64,
    unit: Unit,
    done: AtomicU64,
    tty: bool,
    started: Instant,
    /// Last milestone (tenths) printed in line mode; last redraw time in terminal mode.
    shown: Mutex<(u64, Option<Instant>)>,
}

impl Progress {
    /// A bar drawing to stderr: redrawn in place on a terminal, milestone lines otherwise.
    pub fn new(label: impl Into<String>, total: u64, unit: Unit) -> Self {
        Self::with_mode(label, total, unit, std::io::stderr().is_terminal())
    }

    fn with_mode(label: impl Into<String>, total: u64, unit: Unit, tty: bool) -> Self {
        Self {
            label: label.into(),
            total,
            unit,
            done: AtomicU64::new(0),
            tty,
            started: Instant::now(),
            shown: Mutex::new((0, None)),
        }
    }

    /// Sets the absolute count (clamped to the total) and redraws if due.
    pub fn set(&self, done: u64) {
        let done = done.min(self.total);
        self.done.store(done, Ordering::Relaxed);
        if let Some(line) = self.due_line(done) {
            emit(&line, self.tty);
        }
    }

    /// Adds to the count.
    pub fn inc(&self, n: u64) {
        let done = self.done.load(Ordering::Relaxed).saturating_add(n);
        self.set(done);
    }

    /// Draws the final state with `note` and ends the line.
    pub fn finish(&self, note: &str) {
        let done = self.done.load(Ordering::Relaxed);
        let line = format!("{} {note}", self.render(done, self.started.elapsed()));
        if self.tty {
            eprintln!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }

    /// The line to draw for `done`, if one is due: on a terminal at most every 100 ms, otherwise once per
    /// 10 % step crossed.
    fn due_line(&self, done: u64) -> Option<String> {
        let mut shown = self.shown.lock().unwrap_or_else(|p| p.into_inner());
        if self.tty {
            let now = Instant::now();
            if shown
                .1
                .is_some_and(|t| now.duration_since(t) < Duration::from_millis(100))
            {
                return None;
            }
            shown.1 = Some(now);
        } else {
            let tenth = done.saturating_mul(10) / self.total.max(1);
            if tenth <= shown.0 || done >= self.total {
                // The final state is printed by `finish`.
                return None;
            }
            shown.0 = tenth;
        }
        Some(self.render(done, self.started.elapsed()))
    }

    /// `label [#########.....]  45% 54.1/120.0 MiB 3.2 MiB/s`
    fn render(&self, done: u64, elapsed: Duration) -> String {
        let total = self.total.max(1);
        let filled = (done.min(total) as u128 * BAR_WIDTH as u128 / total as u128) as usize;
        let percent = done.min(total) * 100 / total;
        let bar: String = "#".repeat(filled) + &".".repeat(BAR_WIDTH - filled);
        let counts = match self.unit {
            Unit::Bytes => {
                let secs = elapsed.as_secs_f64();
                let rate = if secs > 0.0 { done as f64 / MIB / secs } else { 0.0 };
                format!(
                    "{:.1}/{:.1} MiB {rate:.1} MiB/s",
                    done as f64 / MIB,
                    self.total as f64 / MIB
                )
            }
            Unit::Items => format!("{done}/{}", self.total),
        };
        format!("{} [{bar}] {percent:>3}% {counts}", self.label)
    }
}

fn emit(line: &str, tty: bool) {
    let mut err = std::io::stderr().lock();
    let _ = if tty {
        write!(err, "\r{line}\x1b[K")
    } else {
        writeln!(err, "{line}")
    };
    let _ = err.flush();
}

/// Runs `work` while a watcher thread reports the bytes present in `dir` (files being downloaded into it)
/// on `progress`, on top of `base`. Bytes already there when `work` starts (leftovers) are not counted.
pub fn watch_dir<T>(progress: &Progress, dir: &Path, base: u64, work: impl FnOnce() -> T) -> T {
    let stop = AtomicBool::new(false);
    let already = dir_bytes(dir);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                progress.set(base + dir_bytes(dir).saturating_sub(already));
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let out = work();
        stop.store(true, Ordering::Relaxed);
        out
    })
}

/// Total size of the regular files in `dir` and its `partial/` subdirectory (apt's in-flight downloads).
fn dir_bytes(dir: &Path) -> u64 {
    [dir.to_path_buf(), dir.join("partial")]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Numbered build steps: `[2/5] initramfs` on start, and the step's duration when it ends.
pub struct Steps {
    total: usize,
    started: usize,
    current: Option<(String, Instant)>,
}

impl Steps {
    pub fn new(total: usize) -> Self {
        Self {
            total,
            started: 0,
            current: None,
        }
    }

    /// Ends the current step (printing its time) and starts `name`.
    pub fn begin(&mut self, name: &str) {
        self.end();
        self.started += 1;
        eprintln!("[{}/{}] {name}", self.started, self.total);
        self.current = Some((name.to_owned(), Instant::now()));
    }

    /// Ends the current step, printing its time.
    pub fn end(&mut self) {
        if let Some((name, start)) = self.current.take() {
            eprintln!(
                "[{}/{}] {name}: done in {:.1} s",
                self.started,
                self.total,
                start.elapsed().as_secs_f64()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bytes_bar() {
        let p = Progress::with_mode("fetch", 100 * 1048576, Unit::Bytes, false);
        let line = p.render(45 * 1048576, Duration::from_secs(9));
        assert_eq!(
            line,
            format!(
                "fetch [{}{}]  45% 45.0/100.0 MiB 5.0 MiB/s",
                "#".repeat(13),
                ".".repeat(17)
            )
        );
    }

    #[test]
    fn renders_items_and_clamps() {
        let p = Progress::with_mode("unpack", 4, Unit::Items, false);
        assert_eq!(
            p.render(4, Duration::ZERO),
            format!("unpack [{}] 100% 4/4", "#".repeat(30))
        );
        assert_eq!(
            p.render(9, Duration::ZERO),
            format!("unpack [{}] 100% 9/4", "#".repeat(30))
        );
        let empty = Progress::with_mode("x", 0, Unit::Items, false);
        assert!(empty.render(0, Duration::ZERO).contains("  0% 0/0"));
    }

    #[test]
    fn line_mode_prints_each_tenth_once() {
        let p = Progress::with_mode("t", 1000, Unit::Items, false);
        let printed: Vec<u64> = [50, 100, 150, 199, 200, 730, 731, 999, 1000]
            .into_iter()
            .filter_map(|d| p.due_line(d).map(|_| d))
            .collect();
        // 10 %, 20 %, 70 %, 90 %; the end is left to `finish`.
        assert_eq!(printed, vec![100, 200, 730, 999]);
    }

    #[test]
    fn watcher_sees_bytes_written() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("leftover.deb"), vec![0u8; 500]).unwrap();
        let p = Progress::with_mode("w", 10_000, Unit::Bytes, false);
        watch_dir(&p, dir.path(), 100, || {
            std::fs::write(dir.path().join("a.deb"), vec![0u8; 3000]).unwrap();
            std::fs::create_dir(dir.path().join("partial")).unwrap();
            std::fs::write(dir.path().join("partial/b.deb"), vec![0u8; 900]).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        });
        assert_eq!(p.done.load(Ordering::Relaxed), 4000);
    }
}
