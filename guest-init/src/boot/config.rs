//! Config intake (DESIGN.md §3 step 2): the host's files are copied, with size limits and without
//! following symlinks, from the host-provided source into the guest's private work dir (tmpfs) under
//! dstack's names, and parsed there strictly. The source is never read again, so the host cannot change
//! a file between validation and use.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use dstack_types::shared_files as names;
use dstack_types::{AppCompose, InstanceInfo, SysConfig};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Errors reading the host config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("host-shared source {source_desc}: {reason}")]
    Source { source_desc: String, reason: String },
    #[error("host-shared {file}: {reason}")]
    File { file: String, reason: String },
    #[error(transparent)]
    Compose(#[from] dstack_types::AppComposeError),
    #[error(transparent)]
    Parse(#[from] dstack_types::ConfigError),
}

/// Where the host's files come from (`dstack.host_shared=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostSharedSource {
    /// A directory already in place.
    Dir(PathBuf),
    /// A block device with a filesystem holding the files (mounted read-only).
    Device(PathBuf),
    VirtioFs(String),
    NineP(String),
}

impl HostSharedSource {
    /// `virtiofs:<tag>`, `9p:<tag>`, `/dev/…` (device) or another absolute path (directory).
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError::Source {
            source_desc: s.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(tag) = s.strip_prefix("virtiofs:") {
            return if tag.is_empty() {
                Err(bad("empty tag"))
            } else {
                Ok(Self::VirtioFs(tag.to_owned()))
            };
        }
        if let Some(tag) = s.strip_prefix("9p:") {
            return if tag.is_empty() {
                Err(bad("empty tag"))
            } else {
                Ok(Self::NineP(tag.to_owned()))
            };
        }
        if !s.starts_with('/') {
            return Err(bad("must be virtiofs:<tag>, 9p:<tag> or an absolute path"));
        }
        if s.starts_with("/dev/") {
            Ok(Self::Device(PathBuf::from(s)))
        } else {
            Ok(Self::Dir(PathBuf::from(s)))
        }
    }
}

/// Files copied: (name, alternative older name, size limit, required). Limits are dstack's.
const FILES: &[(&str, Option<&str>, u64, bool)] = &[
    (names::APP_COMPOSE, None, 256 << 10, true),
    (names::SYS_CONFIG, Some(names::compat_v3::SYS_CONFIG), 32 << 10, true),
    (names::INSTANCE_INFO, None, 10 << 10, false),
    (
        names::ENCRYPTED_ENV,
        Some(names::compat_v3::ENCRYPTED_ENV),
        256 << 10,
        false,
    ),
    (names::USER_CONFIG, None, 1 << 20, false),
];

fn copy_limited(src: &Path, dst: &Path, limit: u64) -> Result<bool, String> {
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(src)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e.to_string()),
    };
    let md = f.metadata().map_err(|e| e.to_string())?;
    if !md.is_file() {
        return Err("not a regular file".into());
    }
    let mut data = Vec::new();
    f.take(limit + 1).read_to_end(&mut data).map_err(|e| e.to_string())?;
    if data.len() as u64 > limit {
        return Err(format!("larger than the {limit}-byte limit"));
    }
    write_private(dst, &data).map_err(|e| e.to_string())?;
    Ok(true)
}

/// Writes `data` to `path` with mode 0600 (replacing any existing file).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Copies the host files from `src_dir` into `dest` (created 0700).
pub fn copy_from_dir(src_dir: &Path, dest: &Path) -> Result<(), ConfigError> {
    std::fs::create_dir_all(dest).map_err(|e| ConfigError::File {
        file: dest.display().to_string(),
        reason: e.to_string(),
    })?;
    let _ = std::fs::set_permissions(dest, std::os::unix::fs::PermissionsExt::from_mode(0o700));
    for (name, compat, limit, required) in FILES {
        let dst = dest.join(name);
        let file_err = |reason: String| ConfigError::File {
            file: (*name).to_owned(),
            reason,
        };
        let mut found = copy_limited(&src_dir.join(name), &dst, *limit).map_err(&file_err)?;
        if !found && let Some(old) = compat {
            found = copy_limited(&src_dir.join(old), &dst, *limit).map_err(&file_err)?;
        }
        if !found && *required {
            return Err(file_err(format!("missing from {}", src_dir.display())));
        }
    }
    Ok(())
}

/// Mounts the source if needed, copies the files into `dest`, unmounts.
pub fn intake(source: &HostSharedSource, mount_dir: &Path, dest: &Path) -> Result<(), ConfigError> {
    let src_err = |reason: String| ConfigError::Source {
        source_desc: format!("{source:?}"),
        reason,
    };
    let ro = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounted = match source {
        HostSharedSource::Dir(d) => return copy_from_dir(d, dest),
        HostSharedSource::Device(dev) => {
            std::fs::create_dir_all(mount_dir).map_err(|e| src_err(e.to_string()))?;
            let mut last = String::new();
            let ok = ["ext4", "vfat", "iso9660", "erofs"].iter().any(|fs| {
                match mount(Some(dev.as_path()), mount_dir, Some(*fs), ro, None::<&str>) {
                    Ok(()) => true,
                    Err(e) => {
                        last = format!("{fs}: {e}");
                        false
                    }
                }
            });
            if !ok {
                return Err(src_err(format!("no supported filesystem (last: {last})")));
            }
            mount_dir
        }
        HostSharedSource::VirtioFs(tag) => {
            std::fs::create_dir_all(mount_dir).map_err(|e| src_err(e.to_string()))?;
            mount(Some(tag.as_str()), mount_dir, Some("virtiofs"), ro, None::<&str>)
                .map_err(|e| src_err(e.to_string()))?;
            mount_dir
        }
        HostSharedSource::NineP(tag) => {
            std::fs::create_dir_all(mount_dir).map_err(|e| src_err(e.to_string()))?;
            mount(
                Some(tag.as_str()),
                mount_dir,
                Some("9p"),
                ro,
                Some("trans=virtio,version=9p2000.L"),
            )
            .map_err(|e| src_err(e.to_string()))?;
            mount_dir
        }
    };
    let result = copy_from_dir(mounted, dest);
    if let Err(e) = umount2(mounted, MntFlags::MNT_DETACH) {
        tracing::warn!("unmounting host-shared source: {e}");
    }
    result
}

/// The parsed host configuration.
#[derive(Debug, Clone)]
pub struct HostShared {
    pub dir: PathBuf,
    /// `app-compose.json` exactly as stored (hashed for `compose_hash`).
    pub raw_compose: Vec<u8>,
    pub compose: AppCompose,
    pub sys_config: SysConfig,
    pub instance_info: InstanceInfo,
    pub encrypted_env: Vec<u8>,
}

impl HostShared {
    /// Reads and strictly validates the copied files.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| ConfigError::File {
                file: name.to_owned(),
                reason: e.to_string(),
            })
        };
        let raw_compose = read(names::APP_COMPOSE)?;
        let compose = AppCompose::from_slice(&raw_compose)?;
        let sys_config = SysConfig::from_slice(&read(names::SYS_CONFIG)?)?;
        // guest-init is the guest agent: the `agent:` selector is for apps inside the CVM, never for PID 1.
        if let Some(sel) = sys_config.tee.as_deref() {
            let request = dstack_tee::TeeRequest::parse(sel).map_err(|e| ConfigError::File {
                file: names::SYS_CONFIG.to_owned(),
                reason: format!("tee: {e}"),
            })?;
            super::tee::refuse_agent_selector("tee", &request).map_err(|reason| ConfigError::File {
                file: names::SYS_CONFIG.to_owned(),
                reason,
            })?;
        }
        let instance_info = match std::fs::read(dir.join(names::INSTANCE_INFO)) {
            Ok(raw) => InstanceInfo::from_slice(&raw)?,
            Err(_) => InstanceInfo::default(),
        };
        let encrypted_env = std::fs::read(dir.join(names::ENCRYPTED_ENV)).unwrap_or_default();
        Ok(Self {
            dir: dir.to_owned(),
            raw_compose,
            compose,
            sys_config,
            instance_info,
            encrypted_env,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const COMPOSE: &str = r#"{"docker_compose_file":"services: {}\n","kms_enabled":false,"manifest_version":"2","name":"t","runner":"docker-compose"}"#;
    pub const SYS_CONFIG: &str = r#"{"kms_urls":[],"gateway_urls":[],"docker_registry":"https://mirror.example","host_api_url":null,"vm_config":"{\"os_image_hash\":\"\",\"cpu_count\":1,\"memory_size\":1073741824}"}"#;

    pub fn host_dir(compose: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(names::APP_COMPOSE), compose).unwrap();
        std::fs::write(d.path().join(names::SYS_CONFIG), SYS_CONFIG).unwrap();
        d
    }

    #[test]
    fn source_syntax() {
        assert_eq!(
            HostSharedSource::parse("/dev/vdb").unwrap(),
            HostSharedSource::Device("/dev/vdb".into())
        );
        assert_eq!(
            HostSharedSource::parse("/mnt/x").unwrap(),
            HostSharedSource::Dir("/mnt/x".into())
        );
        assert_eq!(
            HostSharedSource::parse("virtiofs:cfg").unwrap(),
            HostSharedSource::VirtioFs("cfg".into())
        );
        assert!(HostSharedSource::parse("relative").is_err());
        assert!(HostSharedSource::parse("9p:").is_err());
    }

    #[test]
    fn copies_and_parses() {
        let src = host_dir(COMPOSE);
        std::fs::write(src.path().join("encrypted-env"), b"blob").unwrap();
        let dst = tempfile::tempdir().unwrap();
        let dest = dst.path().join(".host-shared");
        intake(
            &HostSharedSource::Dir(src.path().to_owned()),
            Path::new("/nonexistent"),
            &dest,
        )
        .unwrap();
        let hs = HostShared::load(&dest).unwrap();
        assert_eq!(hs.raw_compose, COMPOSE.as_bytes());
        assert_eq!(hs.encrypted_env, b"blob", "compat name accepted");
        assert_eq!(hs.sys_config.docker_registry.as_deref(), Some("https://mirror.example"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dest.join(names::APP_COMPOSE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn missing_oversized_and_symlinked_files_rejected() {
        let dst = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        let err = copy_from_dir(src.path(), dst.path()).unwrap_err();
        assert!(err.to_string().contains("app-compose.json"), "{err}");

        let src = host_dir(COMPOSE);
        std::fs::write(src.path().join(names::USER_CONFIG), vec![b'x'; (1 << 20) + 1]).unwrap();
        let err = copy_from_dir(src.path(), dst.path()).unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");

        let src = host_dir(COMPOSE);
        std::os::unix::fs::symlink("/etc/passwd", src.path().join(names::INSTANCE_INFO)).unwrap();
        let err = copy_from_dir(src.path(), dst.path()).unwrap_err();
        assert!(err.to_string().contains(".instance_info"), "{err}");
    }

    #[test]
    fn sys_config_tee_must_not_be_the_agent() {
        let d = host_dir(COMPOSE);
        let with_tee = |tee: &str| {
            let mut v: serde_json::Value = serde_json::from_str(SYS_CONFIG).unwrap();
            v["tee"] = serde_json::Value::String(tee.into());
            std::fs::write(d.path().join(names::SYS_CONFIG), v.to_string()).unwrap();
            HostShared::load(d.path())
        };
        let e = with_tee("agent:/var/run/dstack.sock").unwrap_err().to_string();
        assert!(
            e.contains(names::SYS_CONFIG) && e.contains("agent:/var/run/dstack.sock") && e.contains("IS the agent"),
            "{e}"
        );
        let e = with_tee("nonsense").unwrap_err().to_string();
        assert!(e.contains("tee: ") && e.contains("TEE selector \"nonsense\""), "{e}");
        assert_eq!(
            with_tee("simulated:vsock:2:10001").unwrap().sys_config.tee.as_deref(),
            Some("simulated:vsock:2:10001")
        );
    }

    #[test]
    fn strict_compose_validation() {
        for (bad, needle) in [
            (
                r#"{"manifest_version":"2","name":"t","runner":"docker-compose"}"#,
                "docker_compose_file",
            ),
            (
                r#"{"manifest_version":"2","name":"t","runner":"bash","surprise":1}"#,
                "surprise",
            ),
            (r#"{"manifest_version":"2","name":"t","runner":"podman"}"#, "runner"),
            (
                r#"{"manifest_version":"2","name":"t","runner":"bash","allowed_envs":["1BAD"]}"#,
                "allowed_envs",
            ),
        ] {
            let src = host_dir(bad);
            let dst = tempfile::tempdir().unwrap();
            copy_from_dir(src.path(), dst.path()).unwrap();
            let err = HostShared::load(dst.path()).unwrap_err();
            assert!(err.to_string().contains(needle), "{bad}: {err}");
        }
    }
}
