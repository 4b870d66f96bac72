//! Kernel module selection for the initramfs.
//!
//! Debian's module packages ship no `modules.dep` (depmod runs at install time), so dependencies are read
//! from each module's own `.modinfo` ELF section (`depends=`, `softdep=pre:`), the same data depmod uses.
//! Modules are stored decompressed so the init can load them with a plain `finit_module(fd, "", 0)`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// Errors selecting modules.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid ELF64 kernel module: {why}")]
    BadElf { path: String, why: String },
    #[error("{path}: xz decompression failed: {why}")]
    Decompress { path: String, why: String },
    #[error("kernel module {0:?} is neither a module of this kernel nor built in")]
    Unknown(String),
    #[error("kernel module dependency cycle through {0}")]
    Cycle(String),
}

type Result<T> = std::result::Result<T, ModuleError>;

/// What the `.modinfo` section says about a module.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    pub name: String,
    pub depends: Vec<String>,
    pub softdep_pre: Vec<String>,
    pub aliases: Vec<String>,
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn le_u64(b: &[u8], at: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?)).ok()
}

/// The bytes of the section named `wanted` in a little-endian ELF64 file.
fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> std::result::Result<&'a [u8], String> {
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err("not ELF64 little-endian".into());
    }
    let shoff = le_u64(elf, 0x28).ok_or("truncated header")?;
    let shentsize = usize::from(le_u16(elf, 0x3a).ok_or("truncated header")?);
    let shnum = usize::from(le_u16(elf, 0x3c).ok_or("truncated header")?);
    let shstrndx = usize::from(le_u16(elf, 0x3e).ok_or("truncated header")?);
    if shentsize < 64 {
        return Err(format!("section header size {shentsize}"));
    }
    let header = |i: usize| -> std::result::Result<(u32, usize, usize), String> {
        let at = shoff
            .checked_add(i.checked_mul(shentsize).ok_or("overflow")?)
            .ok_or("overflow")?;
        let name = le_u32(elf, at).ok_or(format!("section header {i} out of bounds"))?;
        let offset = le_u64(elf, at + 24).ok_or(format!("section header {i} out of bounds"))?;
        let size = le_u64(elf, at + 32).ok_or(format!("section header {i} out of bounds"))?;
        Ok((name, offset, size))
    };
    let bytes = |offset: usize, size: usize| {
        offset
            .checked_add(size)
            .and_then(|end| elf.get(offset..end))
            .ok_or_else(|| format!("section at {offset:#x}+{size:#x} out of bounds"))
    };
    let (_, str_off, str_size) = header(shstrndx)?;
    let strtab = bytes(str_off, str_size)?;
    for i in 0..shnum {
        let (name, offset, size) = header(i)?;
        let name = strtab
            .get(name as usize..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .ok_or(format!("section {i} name out of bounds"))?;
        if name == wanted.as_bytes() {
            return bytes(offset, size);
        }
    }
    Err(format!("no {wanted} section"))
}

/// Parses a module's `.modinfo` (NUL-separated `key=value` strings).
pub fn modinfo(elf: &[u8], path: &str) -> Result<ModInfo> {
    let section = elf_section(elf, ".modinfo").map_err(|why| ModuleError::BadElf {
        path: path.to_owned(),
        why,
    })?;
    let mut info = ModInfo::default();
    for entry in section.split(|&b| b == 0).filter(|e| !e.is_empty()) {
        let entry = String::from_utf8_lossy(entry);
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        match key {
            "name" => info.name = value.to_owned(),
            "depends" => info.depends = value.split(',').filter(|s| !s.is_empty()).map(normalize).collect(),
            "softdep" => {
                // "pre: a b post: c" — only the pre part must be loaded first.
                let mut pre = false;
                for word in value.split_whitespace() {
                    match word {
                        "pre:" => pre = true,
                        "post:" => pre = false,
                        w if pre => info.softdep_pre.push(normalize(w)),
                        _ => {}
                    }
                }
            }
            "alias" => info.aliases.push(value.to_owned()),
            _ => {}
        }
    }
    if info.name.is_empty() {
        return Err(ModuleError::BadElf {
            path: path.to_owned(),
            why: ".modinfo has no name".into(),
        });
    }
    Ok(info)
}

/// Module names treat `-` and `_` alike; the kernel uses `_`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Reads a module file, decompressing `.ko.xz`.
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    let context = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| ModuleError::Io {
        context: context.clone(),
        source,
    })?;
    if path.extension().is_some_and(|e| e == "xz") {
        let mut out = Vec::new();
        lzma_rs::xz_decompress(&mut BufReader::new(file), &mut out).map_err(|e| ModuleError::Decompress {
            path: context,
            why: e.to_string(),
        })?;
        Ok(out)
    } else {
        std::fs::read(path).map_err(|source| ModuleError::Io { context, source })
    }
}

/// One kernel's module tree (`/usr/lib/modules/<version>`).
#[derive(Debug)]
pub struct ModuleTree {
    pub root: PathBuf,
    /// Module name → path relative to `root`, as shipped (`kernel/…/x.ko.xz`).
    by_name: BTreeMap<String, String>,
    builtin: BTreeSet<String>,
}

/// A module chosen for the initramfs.
#[derive(Debug, Clone)]
pub struct Module {
    pub name: String,
    /// Path relative to the version directory, decompressed name (`kernel/…/x.ko`).
    pub rel_path: String,
    pub data: Vec<u8>,
    pub info: ModInfo,
}

fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|source| ModuleError::Io {
        context: dir.display().to_string(),
        source,
    })?;
    for entry in entries {
        let path = entry
            .map_err(|source| ModuleError::Io {
                context: dir.display().to_string(),
                source,
            })?
            .path();
        if path.is_dir() {
            walk(&path, base, out)?;
        } else if let Ok(rel) = path.strip_prefix(base) {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

/// `x.ko.xz` → `x`.
fn module_name_of(rel: &str) -> Option<String> {
    let file = rel.rsplit('/').next()?;
    let stem = file.strip_suffix(".xz").unwrap_or(file).strip_suffix(".ko")?;
    Some(normalize(stem))
}

impl ModuleTree {
    pub fn open(root: &Path) -> Result<Self> {
        let mut files = Vec::new();
        walk(&root.join("kernel"), root, &mut files)?;
        let by_name = files
            .into_iter()
            .filter_map(|rel| Some((module_name_of(&rel)?, rel)))
            .collect();
        let builtin = std::fs::read_to_string(root.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(module_name_of)
            .collect();
        Ok(Self {
            root: root.to_owned(),
            by_name,
            builtin,
        })
    }

    /// `wanted` modules plus everything they depend on, in a valid load order (dependencies first).
    /// Built-in names are skipped; unknown names are an error.
    pub fn select(&self, wanted: &[&str]) -> Result<Vec<Module>> {
        let mut order = Vec::new();
        let mut state: BTreeMap<String, bool> = BTreeMap::new(); // false = in progress, true = done
        for name in wanted {
            self.visit(&normalize(name), &mut state, &mut order, true)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        state: &mut BTreeMap<String, bool>,
        order: &mut Vec<Module>,
        required: bool,
    ) -> Result<()> {
        match state.get(name) {
            Some(true) => return Ok(()),
            Some(false) => return Err(ModuleError::Cycle(name.to_owned())),
            None => {}
        }
        let Some(rel) = self.by_name.get(name) else {
            if self.builtin.contains(name) || !required {
                return Ok(());
            }
            return Err(ModuleError::Unknown(name.to_owned()));
        };
        state.insert(name.to_owned(), false);
        let data = read_module(&self.root.join(rel))?;
        let info = modinfo(&data, rel)?;
        for dep in &info.depends {
            self.visit(dep, state, order, true)?;
        }
        // Soft dependencies are best effort (they may name modules this flavour lacks).
        for dep in &info.softdep_pre {
            self.visit(dep, state, order, false)?;
        }
        state.insert(name.to_owned(), true);
        let rel_path = rel.strip_suffix(".xz").unwrap_or(rel).to_owned();
        order.push(Module {
            name: name.to_owned(),
            rel_path,
            data,
            info,
        });
        Ok(())
    }
}

/// `modules.dep` for the selection: each module followed by all its (transitive) dependencies, the one to
/// load first last, as depmod writes it.
pub fn modules_dep(selected: &[Module]) -> String {
    let index: BTreeMap<&str, usize> = selected.iter().enumerate().map(|(i, m)| (m.name.as_str(), i)).collect();
    let mut out = String::new();
    for m in selected {
        let mut deps = BTreeSet::new();
        let mut todo: Vec<&str> = m.info.depends.iter().map(String::as_str).collect();
        while let Some(d) = todo.pop() {
            if let Some(&i) = index.get(d)
                && deps.insert(i)
                && let Some(dm) = selected.get(i)
            {
                todo.extend(dm.info.depends.iter().map(String::as_str));
            }
        }
        let _ = write!(out, "{}:", m.rel_path);
        // Selection order is a load order; depmod lists later-loaded modules first.
        for i in deps.iter().rev() {
            if let Some(dm) = selected.get(*i) {
                let _ = write!(out, " {}", dm.rel_path);
            }
        }
        out.push('\n');
    }
    out
}

/// `modules.alias` for the selection.
pub fn modules_alias(selected: &[Module]) -> String {
    let mut out = String::new();
    for m in selected {
        for a in &m.info.aliases {
            let _ = writeln!(out, "alias {a} {}", m.name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with a section-name table and one `.modinfo` section.
    fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        let modinfo_off = elf.len();
        elf.extend_from_slice(modinfo);
        let str_off = elf.len();
        elf.extend_from_slice(shstrtab);
        let shoff = elf.len();
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        let section = |name: u32, off: usize, size: usize| {
            let mut s = vec![0u8; 64];
            s[..4].copy_from_slice(&name.to_le_bytes());
            s[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            s[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            s
        };
        elf.extend(section(0, 0, 0));
        elf.extend(section(1, modinfo_off, modinfo.len()));
        elf.extend(section(10, str_off, shstrtab.len()));
        elf
    }

    #[test]
    fn modinfo_fields_are_parsed() {
        let elf = fake_module(b"license=GPL\0depends=dm-bufio,dm_mod\0softdep=pre: crc32c post: x\0alias=devname:mapper/control\0name=dm_verity\0");
        let info = modinfo(&elf, "dm-verity.ko").unwrap();
        assert_eq!(info.name, "dm_verity");
        assert_eq!(info.depends, ["dm_bufio", "dm_mod"]);
        assert_eq!(info.softdep_pre, ["crc32c"]);
        assert_eq!(info.aliases, ["devname:mapper/control"]);
    }

    #[test]
    fn malformed_elf_fails_closed() {
        let elf = fake_module(b"name=x\0");
        for cut in [0, 10, 0x3f, elf.len() - 64 + 30] {
            assert!(modinfo(&elf[..cut], "x.ko").is_err(), "cut at {cut}");
        }
        let mut bad = elf.clone();
        bad[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(modinfo(&bad, "x.ko").is_err());
        assert!(modinfo(&fake_module(b"license=GPL\0"), "x.ko").is_err(), "no name");
    }

    fn tree(mods: &[(&str, &str)]) -> (tempfile::TempDir, ModuleTree) {
        let dir = tempfile::tempdir().unwrap();
        for (rel, info) in mods {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, fake_module(info.as_bytes())).unwrap();
        }
        std::fs::write(dir.path().join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        let t = ModuleTree::open(dir.path()).unwrap();
        (dir, t)
    }

    #[test]
    fn selection_orders_dependencies_first() {
        let (_d, t) = tree(&[
            ("kernel/a/dm-verity.ko", "name=dm_verity\0depends=dm-bufio,dm-mod\0"),
            ("kernel/a/dm-bufio.ko", "name=dm_bufio\0depends=\0"),
            (
                "kernel/a/dm-mod.ko",
                "name=dm_mod\0depends=dm-bufio\0softdep=pre: missing_one\0",
            ),
            ("kernel/b/unused.ko", "name=unused\0"),
        ]);
        let sel = t.select(&["dm-verity", "ext4"]).unwrap();
        let names: Vec<&str> = sel.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["dm_bufio", "dm_mod", "dm_verity"]);
        assert_eq!(
            modules_dep(&sel),
            "kernel/a/dm-bufio.ko:\nkernel/a/dm-mod.ko: kernel/a/dm-bufio.ko\n\
             kernel/a/dm-verity.ko: kernel/a/dm-mod.ko kernel/a/dm-bufio.ko\n"
        );
        assert!(matches!(t.select(&["nope"]), Err(ModuleError::Unknown(_))));
    }

    #[test]
    fn cycles_are_reported() {
        let (_d, t) = tree(&[
            ("kernel/a.ko", "name=a\0depends=b\0"),
            ("kernel/b.ko", "name=b\0depends=a\0"),
        ]);
        assert!(matches!(t.select(&["a"]), Err(ModuleError::Cycle(_))));
    }
}
