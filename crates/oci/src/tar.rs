//! A deterministic POSIX ustar writer: entries in the order given, numeric owners, one fixed mtime,
//! no user/group names, no extended headers. Enough for an image layer of a few files.

/// Why an entry cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// ustar holds names up to 100 bytes (we do not use the prefix field or PAX headers).
    #[error("tar entry name {0:?} is empty, absolute, or longer than 100 bytes")]
    BadName(String),
    /// ustar sizes are 11 octal digits.
    #[error("tar entry {name:?} is {size} bytes, over the ustar limit")]
    TooBig {
        /// Entry name.
        name: String,
        /// Its size.
        size: u64,
    },
}

const BLOCK: usize = 512;
/// Largest size expressible in the 11 octal digits of the ustar size field.
const MAX_SIZE: u64 = 0o77_777_777_777;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory (its name should end with `/`).
    Dir,
}

/// Builds a tar archive in memory.
#[derive(Debug)]
pub struct TarBuilder {
    out: Vec<u8>,
    mtime: u64,
}

/// Writes `value` as zero-padded octal filling `field` except its last byte (NUL).
fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len().saturating_sub(1);
    let text = format!("{value:0digits$o}");
    let bytes = text.as_bytes();
    // Callers keep values in range; if not, keep the low digits rather than overflow the field.
    let start = bytes.len().saturating_sub(digits);
    if let (Some(dst), Some(src)) = (field.get_mut(..digits), bytes.get(start..)) {
        dst.copy_from_slice(src);
    }
    if let Some(last) = field.last_mut() {
        *last = 0;
    }
}

impl TarBuilder {
    /// Every entry gets `mtime` (seconds since the epoch), uid 0, gid 0.
    pub fn new(mtime: u64) -> Self {
        TarBuilder { out: Vec::new(), mtime }
    }

    /// Appends a directory entry.
    pub fn dir(&mut self, name: &str, mode: u32) -> Result<(), TarError> {
        self.entry(name, Kind::Dir, mode, &[])
    }

    /// Appends a regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<(), TarError> {
        self.entry(name, Kind::File, mode, data)
    }

    fn entry(&mut self, name: &str, kind: Kind, mode: u32, data: &[u8]) -> Result<(), TarError> {
        if name.is_empty() || name.starts_with('/') || name.len() > 100 {
            return Err(TarError::BadName(name.to_string()));
        }
        let size = data.len() as u64;
        if size > MAX_SIZE {
            return Err(TarError::TooBig {
                name: name.to_string(),
                size,
            });
        }
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        put_octal(&mut h[100..108], u64::from(mode & 0o7777));
        put_octal(&mut h[108..116], 0); // uid
        put_octal(&mut h[116..124], 0); // gid
        put_octal(&mut h[124..136], size);
        put_octal(&mut h[136..148], self.mtime);
        h[156] = match kind {
            Kind::File => b'0',
            Kind::Dir => b'5',
        };
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        put_octal(&mut h[329..337], 0); // devmajor
        put_octal(&mut h[337..345], 0); // devminor
        // The checksum is computed with its own field as eight spaces, then stored as 6 octal digits, NUL, space.
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        put_octal(&mut h[148..155], sum);
        h[155] = b' ';
        self.out.extend_from_slice(&h);
        self.out.extend_from_slice(data);
        let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
        self.out.resize(self.out.len() + pad, 0);
        Ok(())
    }

    /// Appends the end-of-archive marker (two zero blocks) and returns the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.resize(self.out.len() + 2 * BLOCK, 0);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout() {
        let mut t = TarBuilder::new(0o1234);
        t.file("a/b", 0o755, b"hello").unwrap();
        let out = t.finish();
        assert_eq!(out.len(), 512 + 512 + 1024);
        assert_eq!(&out[..3], b"a/b");
        assert_eq!(&out[100..108], b"0000755\0");
        assert_eq!(&out[124..136], b"00000000005\0");
        assert_eq!(&out[136..148], b"00000001234\0");
        assert_eq!(out[156], b'0');
        assert_eq!(&out[257..265], b"ustar\x0000");
        assert_eq!(&out[512..517], b"hello");
        assert!(out[517..].iter().all(|&b| b == 0));
        // Checksum: sum of header bytes with the checksum field as spaces.
        let mut h = out[..512].to_vec();
        let stored = std::str::from_utf8(&h[148..154]).unwrap().to_string();
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(u32::from_str_radix(&stored, 8).unwrap(), sum);
    }

    #[test]
    fn rejects_bad_names() {
        let mut t = TarBuilder::new(0);
        assert!(t.file("", 0o644, b"").is_err());
        assert!(t.file("/etc/passwd", 0o644, b"").is_err());
        assert!(t.file(&"x".repeat(101), 0o644, b"").is_err());
        assert!(t.dir(&format!("{}/", "d".repeat(99)), 0o755).is_ok());
    }
}
