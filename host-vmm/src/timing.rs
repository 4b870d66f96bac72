//! Clocks and memory accounting for the setup-time and RSS numbers.

/// `CLOCK_BOOTTIME` in nanoseconds (the clock `/proc/<pid>/stat` start times are measured against).
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only into the timespec we pass; CLOCK_BOOTTIME is always available on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// This process's start time (`CLOCK_BOOTTIME` ns), from `/proc/self/stat`. Resolution is one clock tick
/// (usually 10 ms), so it only bounds the exec/loader time coarsely.
pub fn process_start_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Field 2 (comm) may contain spaces; fields after the closing paren are space separated, starttime is 22.
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let start_ticks: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(start_ticks.saturating_mul(1_000_000_000) / hz)
}

/// Resident memory of this process, split into guest RAM and everything else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RssReport {
    pub total_kib: u64,
    pub guest_kib: u64,
}

impl RssReport {
    /// RSS beyond guest RAM: the VMM's own footprint.
    pub fn vmm_kib(&self) -> u64 {
        self.total_kib.saturating_sub(self.guest_kib)
    }
}

/// Sums `Rss:` of every mapping in `/proc/self/smaps`, attributing mappings inside `guest` host ranges
/// (`[start, end)`) to guest RAM.
pub fn rss_report(guest: &[(u64, u64)]) -> std::io::Result<RssReport> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    Ok(parse_smaps(&smaps, guest))
}

fn parse_smaps(smaps: &str, guest: &[(u64, u64)]) -> RssReport {
    let mut report = RssReport::default();
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            in_guest = guest.iter().any(|&(gs, ge)| start >= gs && end <= ge);
            continue;
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            report.total_kib += kib;
            if in_guest {
                report.guest_kib += kib;
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_split() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /usr/bin/x
Size:               1024 kB
Rss:                 300 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:                 512 kB
7f0010000000-7f0010001000 rw-p 00000000 00:00 0
Rss:                   4 kB
";
        let r = parse_smaps(smaps, &[(0x7f00_0000_0000, 0x7f00_1000_0000)]);
        assert_eq!(
            r,
            RssReport {
                total_kib: 816,
                guest_kib: 512
            }
        );
        assert_eq!(r.vmm_kib(), 304);
    }

    #[test]
    fn clocks_are_consistent() {
        let start = process_start_ns().expect("/proc/self/stat");
        let now = boottime_ns();
        assert!(start <= now, "process start {start} after now {now}");
    }
}
