//! An append-only record log for crash tests: `POST /records/<seq>` appends one record and answers only after
//! it is on stable storage; `GET /records` parses the log back and reports what it found.
//!
//! One record is one text line: `<seq> <payload hex> <checksum>\n`, where `seq` is decimal, the payload is
//! lowercase hex and the checksum is the lowercase hex SHA-256 of `<seq> <payload hex>` (the line without its
//! checksum). A crash can leave the last line without its newline (a torn tail); anything else that does not
//! parse or whose checksum does not match is corruption, reported with its byte offset.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// The log's file name inside the records directory.
pub const FILE_NAME: &str = "records.log";
/// Largest payload one record may carry.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Why an append or a read failed.
#[derive(Debug)]
pub enum RecordError {
    /// A file system operation failed; the text names it.
    Io { what: String, source: io::Error },
    /// The payload is larger than [`MAX_PAYLOAD`].
    TooLarge(usize),
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::Io { what, source } => write!(f, "{what}: {source}"),
            RecordError::TooLarge(n) => write!(f, "payload of {n} bytes exceeds {MAX_PAYLOAD}"),
        }
    }
}

impl std::error::Error for RecordError {}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RecordError {
    let what = what.into();
    move |source| RecordError::Io { what, source }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Decodes lowercase hex; `None` on odd length or any other character.
fn from_hex(s: &[u8]) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks_exact(2)
        .map(|p| match p {
            [hi, lo] => Some((nibble(*hi)? << 4) | nibble(*lo)?),
            _ => None,
        })
        .collect()
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    to_hex(&Sha256::digest(data))
}

/// The complete line for one record, newline included.
pub fn encode(seq: u64, payload: &[u8]) -> Vec<u8> {
    let body = format!("{seq} {}", to_hex(payload));
    let sum = sha256_hex(body.as_bytes());
    format!("{body} {sum}\n").into_bytes()
}

/// One record found in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Byte offset of the record's line in the file.
    pub offset: u64,
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// A stretch of the log that is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub offset: u64,
    pub len: u64,
    pub reason: String,
}

/// What a log holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Valid records in file order.
    pub records: Vec<Record>,
    /// Complete lines that are not valid records (bad syntax or checksum).
    pub corrupt: Vec<Damage>,
    /// Bytes after the last newline: a record whose write did not finish.
    pub torn_tail: Option<Damage>,
    /// The file's length.
    pub len: u64,
}

/// Parses one line (without its newline) into (seq, payload).
fn parse_line(line: &[u8]) -> Result<(u64, Vec<u8>), String> {
    let mut fields = line.split(|&b| b == b' ');
    let (Some(seq), Some(payload_hex), Some(sum), None) = (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err("not three space-separated fields".into());
    };
    if seq.is_empty() || seq.len() > 20 || !seq.iter().all(u8::is_ascii_digit) {
        return Err("sequence number is not decimal".into());
    }
    let seq_value = std::str::from_utf8(seq)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or("sequence number out of range")?;
    let payload = from_hex(payload_hex).ok_or("payload is not lowercase hex")?;
    let body_len = seq.len() + 1 + payload_hex.len();
    let body = line.get(..body_len).ok_or("line shorter than its fields")?;
    if sum != sha256_hex(body).as_bytes() {
        return Err("checksum mismatch".into());
    }
    Ok((seq_value, payload))
}

/// Parses a whole log. Never fails: what does not parse is reported as corruption or a torn tail.
pub fn scan(data: &[u8]) -> Scan {
    let mut out = Scan {
        len: data.len() as u64,
        ..Scan::default()
    };
    let mut pos = 0usize;
    while pos < data.len() {
        let rest = data.get(pos..).unwrap_or_default();
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            let reason = match parse_line(rest) {
                Ok(_) => "valid record without its newline".to_string(),
                Err(e) => format!("no newline ({e})"),
            };
            out.torn_tail = Some(Damage {
                offset: pos as u64,
                len: rest.len() as u64,
                reason,
            });
            break;
        };
        let line = rest.get(..nl).unwrap_or_default();
        match parse_line(line) {
            Ok((seq, payload)) => out.records.push(Record {
                offset: pos as u64,
                seq,
                payload,
            }),
            Err(reason) => out.corrupt.push(Damage {
                offset: pos as u64,
                len: nl as u64 + 1,
                reason,
            }),
        }
        pos += nl + 1;
    }
    out
}

impl Scan {
    /// The JSON answer of `GET /records`: payloads as their length and SHA-256, to keep the answer small.
    pub fn to_json(&self) -> serde_json::Value {
        let damage = |d: &Damage| serde_json::json!({ "offset": d.offset, "len": d.len, "reason": d.reason });
        serde_json::json!({
            "file_len": self.len,
            "records": self.records.iter().map(|r| serde_json::json!({
                "seq": r.seq,
                "offset": r.offset,
                "payload_len": r.payload.len(),
                "payload_sha256": sha256_hex(&r.payload),
            })).collect::<Vec<_>>(),
            "corrupt": self.corrupt.iter().map(damage).collect::<Vec<_>>(),
            "torn_tail": self.torn_tail.as_ref().map(damage),
        })
    }
}

/// fsync of a directory, so a new entry in it survives a crash.
fn sync_dir(dir: &Path) -> Result<(), RecordError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("fsync of directory {}", dir.display())))
}

/// The log file in a directory; appends are serialized, their fsyncs may overlap.
#[derive(Debug)]
pub struct RecordLog {
    dir: PathBuf,
    file: Mutex<Option<File>>,
}

impl RecordLog {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            file: Mutex::new(None),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Opens the log, creating it (and its directory) durably on first use. A torn tail a crash left is cut
    /// off first, so new records never follow half a record.
    fn open(&self) -> Result<File, RecordError> {
        if !self.dir.exists() {
            std::fs::create_dir_all(&self.dir).map_err(io_err(format!("creating {}", self.dir.display())))?;
            if let Some(parent) = self.dir.parent() {
                sync_dir(parent)?;
            }
        }
        let path = self.path();
        match OpenOptions::new().append(true).create_new(true).open(&path) {
            Ok(f) => {
                sync_dir(&self.dir)?;
                Ok(f)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let file = OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(io_err(format!("opening {}", path.display())))?;
                let data = std::fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
                let keep = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                if keep < data.len() {
                    file.set_len(keep as u64)
                        .and_then(|()| file.sync_all())
                        .map_err(io_err(format!("cutting the torn tail of {}", path.display())))?;
                }
                Ok(file)
            }
            Err(e) => Err(io_err(format!("creating {}", path.display()))(e)),
        }
    }

    /// Appends one record and returns its offset once file data and metadata are on stable storage.
    pub fn append(&self, seq: u64, payload: &[u8]) -> Result<u64, RecordError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(RecordError::TooLarge(payload.len()));
        }
        let line = encode(seq, payload);
        let (offset, file) = {
            // A writer that panicked left the file as it was (appends are whole or rolled back).
            let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                *guard = Some(self.open()?);
            }
            let Some(file) = guard.as_mut() else {
                return Err(io_err("record log")(io::Error::other("not open")));
            };
            let path = self.path();
            let offset = file
                .metadata()
                .map_err(io_err(format!("stat of {}", path.display())))?
                .len();
            if let Err(e) = file.write_all(&line) {
                // Never leave half a record in the middle of the log: cut back to where this one started.
                let _ = file.set_len(offset);
                return Err(io_err(format!("appending to {}", path.display()))(e));
            }
            let file = file
                .try_clone()
                .map_err(io_err(format!("duplicating the handle of {}", path.display())))?;
            (offset, file)
        };
        // Outside the lock so concurrent appends share flushes; this fsync covers this record's bytes.
        file.sync_all()
            .map_err(io_err(format!("fsync of {}", self.path().display())))?;
        Ok(offset)
    }

    /// Reads and parses the whole log; an absent log is empty.
    pub fn read(&self) -> Result<Scan, RecordError> {
        match std::fs::read(self.path()) {
            Ok(data) => Ok(scan(&data)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Scan::default()),
            Err(e) => Err(io_err(format!("reading {}", self.path().display()))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected digests from Python's hashlib: hashlib.sha256(b"7 68656c6c6f").hexdigest() etc.
    const SUM_7_HELLO: &str = "e3eae81f5222bb68efdf12b489441d8fe140d9f4c27f150ccb6e91e8dc3057b4";
    const SUM_0_EMPTY: &str = "7daed43814b633951fa277cd01695574df6e05a9cb10523f1763e842b06be0ff";
    const SUM_MAX_00FF: &str = "96b32f658101737adc34769039a128473c2359880173439de9bca705813c1239";

    #[test]
    fn encoding_matches_independent_digests() {
        assert_eq!(
            encode(7, b"hello"),
            format!("7 68656c6c6f {SUM_7_HELLO}\n").into_bytes()
        );
        assert_eq!(encode(0, b""), format!("0  {SUM_0_EMPTY}\n").into_bytes());
        assert_eq!(
            encode(u64::MAX, &[0, 0xff]),
            format!("18446744073709551615 00ff {SUM_MAX_00FF}\n").into_bytes()
        );
    }

    #[test]
    fn scan_round_trips_records() {
        let mut log = encode(1, b"a");
        log.extend(encode(0, b""));
        log.extend(encode(u64::MAX, &[0, 0xff]));
        let s = scan(&log);
        assert!(s.corrupt.is_empty() && s.torn_tail.is_none());
        let got: Vec<(u64, Vec<u8>)> = s.records.iter().map(|r| (r.seq, r.payload.clone())).collect();
        assert_eq!(got, vec![(1, b"a".to_vec()), (0, vec![]), (u64::MAX, vec![0, 0xff])]);
        assert_eq!(s.records[1].offset, encode(1, b"a").len() as u64);
        assert_eq!(s.len, log.len() as u64);
        assert_eq!(scan(b""), Scan::default());
    }

    #[test]
    fn torn_tail_is_reported_not_counted() {
        let first = encode(1, b"one");
        let second = encode(2, b"two");
        for cut in 1..second.len() {
            let mut log = first.clone();
            log.extend_from_slice(&second[..cut]);
            let s = scan(&log);
            assert_eq!(s.records.len(), 1, "cut {cut}");
            assert!(s.corrupt.is_empty(), "cut {cut}");
            let tail = s.torn_tail.expect("torn tail");
            assert_eq!((tail.offset, tail.len), (first.len() as u64, cut as u64));
        }
        // Cut just before the newline: the record is complete but was not fully written.
        let mut log = first.clone();
        log.extend_from_slice(&second[..second.len() - 1]);
        assert!(scan(&log).torn_tail.unwrap().reason.contains("without its newline"));
    }

    #[test]
    fn corruption_is_reported_with_its_offset() {
        let first = encode(1, b"one");
        let mut bad = encode(2, b"two");
        bad[3] ^= 0x01; // a payload digit changes: still hex, checksum no longer matches
        let third = encode(3, b"three");
        let log = [first.clone(), bad.clone(), third].concat();
        let s = scan(&log);
        assert_eq!(s.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(s.corrupt.len(), 1);
        assert_eq!(s.corrupt[0].offset, first.len() as u64);
        assert_eq!(s.corrupt[0].len, bad.len() as u64);
        assert_eq!(s.corrupt[0].reason, "checksum mismatch");
        assert!(s.torn_tail.is_none());
    }

    #[test]
    fn malformed_lines_are_corruption_not_panics() {
        let sum = sha256_hex(b"1 ab");
        for line in [
            vec![0u8; 40],
            b"1 ab".to_vec(),
            format!("1 ab {sum} extra").into_bytes(),
            format!("+1 ab {sum}").into_bytes(),
            format!("1 AB {sum}").into_bytes(),
            format!("1 abc {sum}").into_bytes(),
            format!("99999999999999999999 ab {sum}").into_bytes(),
            format!("1 ab {}", sum.to_uppercase()).into_bytes(),
            b"\xff\xfe \xfd".to_vec(),
        ] {
            let mut log = line.clone();
            log.push(b'\n');
            let s = scan(&log);
            assert!(s.records.is_empty(), "{:?}", String::from_utf8_lossy(&line));
            assert_eq!(s.corrupt.len(), 1, "{:?}", String::from_utf8_lossy(&line));
        }
        // The valid form of the same line is accepted.
        assert_eq!(scan(format!("1 ab {sum}\n").as_bytes()).records.len(), 1);
    }

    #[test]
    fn log_appends_durably_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = RecordLog::new(dir.path().join("nested/records"));
        assert_eq!(log.read().unwrap(), Scan::default());
        assert_eq!(log.append(5, b"x").unwrap(), 0);
        let second = log.append(6, &[1, 2, 3]).unwrap();
        assert_eq!(second, encode(5, b"x").len() as u64);
        assert!(matches!(
            log.append(7, &vec![0; MAX_PAYLOAD + 1]),
            Err(RecordError::TooLarge(_))
        ));
        // A second handle (another process after a restart) sees the same records and appends after them.
        let again = RecordLog::new(dir.path().join("nested/records"));
        again.append(8, b"").unwrap();
        let s = again.read().unwrap();
        assert_eq!(s.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![5, 6, 8]);
        let raw = std::fs::read(dir.path().join("nested/records").join(FILE_NAME)).unwrap();
        assert_eq!(raw, [encode(5, b"x"), encode(6, &[1, 2, 3]), encode(8, b"")].concat());
    }

    #[test]
    fn reopening_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let whole = encode(1, b"one");
        let torn = &encode(2, b"two")[..10];
        std::fs::write(dir.path().join(FILE_NAME), [whole.as_slice(), torn].concat()).unwrap();
        let log = RecordLog::new(dir.path().to_path_buf());
        // Reading reports the tail and changes nothing.
        assert_eq!(log.read().unwrap().torn_tail.unwrap().offset, whole.len() as u64);
        // The first append after a restart goes where the torn record started.
        assert_eq!(log.append(3, b"three").unwrap(), whole.len() as u64);
        let s = log.read().unwrap();
        assert!(s.torn_tail.is_none() && s.corrupt.is_empty());
        assert_eq!(s.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 3]);
        // A log that is nothing but a torn record is emptied.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), torn).unwrap();
        assert_eq!(RecordLog::new(dir.path().to_path_buf()).append(4, b"").unwrap(), 0);
    }

    #[test]
    fn concurrent_appends_stay_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(RecordLog::new(dir.path().to_path_buf()));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..25u64 {
                        log.append(t * 100 + i, &vec![t as u8; 100 + i as usize]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = log.read().unwrap();
        assert!(s.corrupt.is_empty() && s.torn_tail.is_none());
        let mut seqs: Vec<u64> = s.records.iter().map(|r| r.seq).collect();
        seqs.sort_unstable();
        let want: Vec<u64> = (0..4u64).flat_map(|t| (0..25).map(move |i| t * 100 + i)).collect();
        assert_eq!(seqs, want);
        for r in &s.records {
            assert_eq!(r.payload, vec![(r.seq / 100) as u8; 100 + (r.seq % 100) as usize]);
        }
    }
}
