//! A deterministic writer for the `newc` cpio format the Linux kernel unpacks as an initramfs
//! (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Determinism: entries are written in byte order of their path (so a directory always precedes its
//! contents), inode numbers count up from 1 in that order, every entry is owned by 0:0 with the same mtime,
//! and the device fields are zero. The output depends only on the entries added and the mtime.

use std::collections::BTreeMap;

/// Errors building an archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("cpio path {0:?} must be relative, non-empty, without `.`/`..`/empty components or NUL")]
    BadPath(String),
    #[error("cpio path {path:?} is added twice (as {first} and {second})")]
    Duplicate {
        path: String,
        first: &'static str,
        second: &'static str,
    },
    #[error("cpio path {0:?} is under a non-directory")]
    NotADirectory(String),
    #[error("cpio entry {0:?} is larger than the format's 4 GiB limit")]
    TooLarge(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDev { mode: u32, major: u32, minor: u32 },
}

impl Node {
    fn kind(&self) -> &'static str {
        match self {
            Node::Dir { .. } => "directory",
            Node::File { .. } => "file",
            Node::Symlink { .. } => "symlink",
            Node::CharDev { .. } => "character device",
        }
    }
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const TRAILER: &str = "TRAILER!!!";

/// An in-memory initramfs tree.
#[derive(Debug, Default, Clone)]
pub struct Cpio {
    entries: BTreeMap<String, Node>,
}

fn check_path(path: &str) -> Result<(), CpioError> {
    let bad = path.is_empty()
        || path.contains('\0')
        || path == TRAILER
        || path.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        Err(CpioError::BadPath(path.to_owned()))
    } else {
        Ok(())
    }
}

impl Cpio {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `path` (creating missing parent directories with mode 0755).
    fn insert(&mut self, path: &str, node: Node) -> Result<(), CpioError> {
        check_path(path)?;
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for c in components.iter().take(components.len().saturating_sub(1)) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(c);
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent.clone(), Node::Dir { mode: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(_) => return Err(CpioError::NotADirectory(path.to_owned())),
            }
        }
        match self.entries.get(path) {
            None => {
                self.entries.insert(path.to_owned(), node);
                Ok(())
            }
            // An implicit parent may later be given an explicit mode.
            Some(Node::Dir { .. }) if matches!(node, Node::Dir { .. }) => {
                self.entries.insert(path.to_owned(), node);
                Ok(())
            }
            Some(existing) => Err(CpioError::Duplicate {
                path: path.to_owned(),
                first: existing.kind(),
                second: node.kind(),
            }),
        }
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), CpioError> {
        self.insert(path, Node::Dir { mode: mode & 0o7777 })
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<(), CpioError> {
        if u32::try_from(data.len()).is_err() {
            return Err(CpioError::TooLarge(path.to_owned()));
        }
        self.insert(
            path,
            Node::File {
                mode: mode & 0o7777,
                data,
            },
        )
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_owned(),
            },
        )
    }

    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> Result<(), CpioError> {
        self.insert(
            path,
            Node::CharDev {
                mode: mode & 0o7777,
                major,
                minor,
            },
        )
    }

    /// Paths in archive order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The archive bytes, every entry stamped with `mtime`.
    pub fn to_bytes(&self, mtime: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, node)) in (1u32..).zip(&self.entries) {
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match node {
                Node::Dir { mode } => (S_IFDIR | mode, 2, &[], (0, 0)),
                Node::File { mode, data } => (S_IFREG | mode, 1, data, (0, 0)),
                Node::Symlink { target } => (S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0)),
                Node::CharDev { mode, major, minor } => (S_IFCHR | mode, 1, &[], (*major, *minor)),
            };
            write_entry(&mut out, ino, mode, nlink, mtime, path, data, rdev);
        }
        write_entry(&mut out, 0, 0, 1, 0, TRAILER, &[], (0, 0));
        out
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[allow(clippy::too_many_arguments)]
fn write_entry(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    name: &str,
    data: &[u8],
    rdev: (u32, u32),
) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        mtime,
        data.len() as u32, // bounded by Cpio::file
        0,                 // devmajor
        0,                 // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check (only used by the crc format)
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

/// gzip with a fixed header (mtime 0, no file name) and fixed level, so equal input gives equal output.
pub fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(3)
        .write(Vec::new(), flate2::Compression::new(9));
    enc.write_all(data)?;
    enc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minimal reader used to check the writer's structure: (name, mode, ino, data).
    fn read_back(bytes: &[u8]) -> Vec<(String, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            let hdr = &bytes[pos..pos + 110];
            assert_eq!(&hdr[..6], b"070701");
            let field =
                |i: usize| u32::from_str_radix(std::str::from_utf8(&hdr[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap();
            let (ino, mode, size, namesize) = (field(0), field(1), field(6) as usize, field(11) as usize);
            let name = std::str::from_utf8(&bytes[pos + 110..pos + 110 + namesize - 1])
                .unwrap()
                .to_owned();
            pos = (pos + 110 + namesize).next_multiple_of(4);
            let data = bytes[pos..pos + size].to_vec();
            pos = (pos + size).next_multiple_of(4);
            if name == TRAILER {
                assert_eq!(pos, bytes.len());
                return out;
            }
            out.push((name, mode, ino, data));
        }
    }

    #[test]
    fn single_file_matches_hand_written_layout() {
        let mut c = Cpio::new();
        c.file("init", 0o755, b"hi\n".to_vec()).unwrap();
        let bytes = c.to_bytes(0x5f5e_1000);
        // Written out by hand from buffer-format.rst: 6-byte magic, 13 eight-digit hex fields, name + NUL
        // padded to 4 (110 + 5 = 115 → 116), data padded to 4.
        let mut want = String::new();
        want.push_str("070701");
        for f in [
            "00000001", "000081ED", "00000000", "00000000", "00000001", "5F5E1000", "00000003",
        ] {
            want.push_str(f);
        }
        for f in ["00000000", "00000000", "00000000", "00000000", "00000005", "00000000"] {
            want.push_str(f);
        }
        let mut want = want.into_bytes();
        want.extend_from_slice(b"init\0\0hi\n\0");
        assert_eq!(&bytes[..want.len()], &want[..]);
        // Trailer: inode 0, nlink 1, name size 11, then padding to 4.
        let trailer = &bytes[want.len()..];
        assert_eq!(&trailer[..6], b"070701");
        assert_eq!(&trailer[6 + 8 * 4..6 + 8 * 5], b"00000001");
        assert_eq!(&trailer[110..121], b"TRAILER!!!\0");
        assert_eq!(trailer.len(), 124);
    }

    #[test]
    fn entries_are_sorted_with_parents_first_and_sequential_inodes() {
        let mut c = Cpio::new();
        c.file("lib/modules/x.ko", 0o644, vec![1, 2, 3, 4, 5]).unwrap();
        c.symlink("sbin/init", "/init").unwrap();
        c.char_dev("dev/console", 0o600, 5, 1).unwrap();
        c.file("init", 0o755, vec![]).unwrap();
        c.dir("lib", 0o700).unwrap();
        let entries = read_back(&c.to_bytes(1));
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/x.ko",
                "sbin",
                "sbin/init"
            ]
        );
        let inos: Vec<u32> = entries.iter().map(|e| e.2).collect();
        assert_eq!(inos, (1..=8).collect::<Vec<_>>());
        assert_eq!(
            entries[3].1, 0o040_700,
            "explicit dir mode wins over the implicit parent"
        );
        assert_eq!(entries[1].1, 0o020_600);
        assert_eq!(entries[7].1, 0o120_777);
        assert_eq!(entries[7].3, b"/init");
        assert_eq!(entries[5].3, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn insertion_order_does_not_matter() {
        let mut a = Cpio::new();
        a.file("a/b", 0o644, vec![1]).unwrap();
        a.file("c", 0o644, vec![2]).unwrap();
        let mut b = Cpio::new();
        b.file("c", 0o644, vec![2]).unwrap();
        b.file("a/b", 0o644, vec![1]).unwrap();
        assert_eq!(a.to_bytes(7), b.to_bytes(7));
        assert_eq!(gzip(&a.to_bytes(7)).unwrap(), gzip(&b.to_bytes(7)).unwrap());
    }

    #[test]
    fn bad_paths_and_conflicts_are_rejected() {
        let mut c = Cpio::new();
        for bad in ["", "/init", "a//b", "a/../b", "./a", "TRAILER!!!"] {
            assert!(
                matches!(c.file(bad, 0o644, vec![]), Err(CpioError::BadPath(_))),
                "{bad}"
            );
        }
        c.file("a", 0o644, vec![]).unwrap();
        assert!(matches!(c.file("a/b", 0o644, vec![]), Err(CpioError::NotADirectory(_))));
        assert!(matches!(c.symlink("a", "x"), Err(CpioError::Duplicate { .. })));
    }

    #[test]
    fn gzip_header_is_fixed() {
        let z = gzip(b"hello").unwrap();
        // RFC 1952: ID1 ID2 CM=8, FLG=0 (no name), MTIME=0, XFL=2 (max compression), OS=3.
        assert_eq!(&z[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 3]);
        let mut d = flate2::read::GzDecoder::new(&z[..]);
        let mut s = String::new();
        std::io::Read::read_to_string(&mut d, &mut s).unwrap();
        assert_eq!(s, "hello");
    }
}
