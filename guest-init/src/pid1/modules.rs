//! Kernel modules from the initramfs. Format (defined by image-build, `image-build/src/boot.rs`):
//! `/lib/modules/load-order` lists absolute module paths, one per line, dependencies first; `#` lines and
//! blank lines are ignored. Modules are stored decompressed and loaded with `finit_module(fd, "", 0)`.
//!
//! A module that fails to load is logged and skipped: some are expected to fail on some machines
//! (`tdx_guest` without TDX gives ENODEV), and every feature that needs a module fails closed later with
//! its own clear error (no dm-verity → no rootfs → power off).

use std::ffi::CString;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};

/// Where image-build puts the list.
pub const LOAD_ORDER: &str = "lib/modules/load-order";

/// Errors in the list itself.
#[derive(Debug, thiserror::Error)]
pub enum ModuleListError {
    #[error("{file}: line {line}: {reason}")]
    Line { file: String, line: usize, reason: String },
}

/// Parses the load-order file: absolute paths under `/lib/modules/` ending in `.ko`, no `..`.
pub fn parse_load_order(file: &str, text: &str) -> Result<Vec<PathBuf>, ModuleListError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let p = Path::new(line);
        let ok = p.starts_with("/lib/modules/")
            && line.ends_with(".ko")
            && p.components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !ok {
            return Err(ModuleListError::Line {
                file: file.to_owned(),
                line: i + 1,
                reason: format!("{line:?} is not an absolute /lib/modules/…/*.ko path"),
            });
        }
        out.push(p.to_owned());
    }
    Ok(out)
}

/// Outcome counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LoadSummary {
    pub loaded: usize,
    pub already: usize,
    pub failed: usize,
}

/// Loads every module listed in `<root>/lib/modules/load-order` (a missing list means no modules).
pub fn load_all(root: &Path) -> Result<LoadSummary, ModuleListError> {
    let list = root.join(LOAD_ORDER);
    let text = match std::fs::read_to_string(&list) {
        Ok(t) => t,
        Err(e) => {
            tracing::info!("no kernel module list at {} ({e}); loading none", list.display());
            return Ok(LoadSummary::default());
        }
    };
    let mut summary = LoadSummary::default();
    let empty = CString::default();
    for m in parse_load_order(&list.display().to_string(), &text)? {
        let path = root.join(m.strip_prefix("/").unwrap_or(&m));
        let res = std::fs::File::open(&path)
            .map_err(|e| e.to_string())
            .and_then(|f| finit_module(&f, &empty, ModuleInitFlags::empty()).map_err(|e| e.to_string()));
        match res {
            Ok(()) => summary.loaded += 1,
            Err(e) if e == Errno::EEXIST.to_string() => summary.already += 1,
            Err(e) => {
                summary.failed += 1;
                tracing::warn!("kernel module {}: {e}", m.display());
            }
        }
    }
    tracing::info!(
        "kernel modules: {} loaded, {} already present, {} failed",
        summary.loaded,
        summary.already,
        summary.failed
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_image_build_format() {
        let text = "# kernel modules in load order (dependencies first): finit_module(fd, \"\", 0)\n\
                    /lib/modules/6.1.0-40-amd64/kernel/drivers/md/dm-mod.ko\n\n\
                    /lib/modules/6.1.0-40-amd64/kernel/drivers/md/dm-verity.ko\n";
        let l = parse_load_order("load-order", text).unwrap();
        assert_eq!(l.len(), 2);
        assert!(l[1].ends_with("dm-verity.ko"));
    }

    #[test]
    fn rejects_paths_outside_lib_modules() {
        for bad in [
            "/etc/passwd.ko",
            "lib/modules/x.ko",
            "/lib/modules/../../x.ko",
            "/lib/modules/x.ko.xz",
        ] {
            let err = parse_load_order("f", bad).unwrap_err();
            assert!(err.to_string().contains("line 1"), "{err}");
        }
    }

    #[test]
    fn missing_list_loads_nothing() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load_all(d.path()).unwrap(), LoadSummary::default());
    }
}
