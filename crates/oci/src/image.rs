//! Builds a reproducible one-layer image for a static binary: layer = `/app` + minimal `/etc/passwd`,
//! `/etc/group` and `/tmp`, all owned by 0:0 with one fixed mtime, gzip'd with a fixed header; config and
//! manifest are serialized from structs with a fixed field order, so the same inputs give the same digest.

use std::collections::BTreeMap;
use std::io::Write;

use flate2::{Compression, GzBuilder};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::tar::{TarBuilder, TarError};

/// Default `PATH` in the image config (there is no shell, but child processes expect one).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where the binary lands in the image, and the default entrypoint.
pub const APP_PATH: &str = "/app";

const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";

/// Why an image cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Writing the layer archive failed.
    #[error("layer archive: {0}")]
    Tar(#[from] TarError),
    /// Compressing the layer failed.
    #[error("compressing the layer: {0}")]
    Gzip(#[source] std::io::Error),
    /// An env entry is not `KEY=VALUE`.
    #[error("env entry {0:?} is not KEY=VALUE with a non-empty key")]
    BadEnv(String),
    /// JSON serialization failed (not expected for these types).
    #[error("serializing {what}: {source}")]
    Json {
        /// Which document.
        what: &'static str,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Which family of media types the manifest uses; dockerd ≥ 20 and `docker-registry` 2.8 accept both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MediaTypes {
    /// OCI image-spec v1 (the default).
    #[default]
    Oci,
    /// Docker image manifest v2 schema 2.
    Docker,
}

impl MediaTypes {
    /// Manifest media type.
    pub fn manifest(self) -> &'static str {
        match self {
            MediaTypes::Oci => "application/vnd.oci.image.manifest.v1+json",
            MediaTypes::Docker => "application/vnd.docker.distribution.manifest.v2+json",
        }
    }
    /// Config media type.
    pub fn config(self) -> &'static str {
        match self {
            MediaTypes::Oci => "application/vnd.oci.image.config.v1+json",
            MediaTypes::Docker => "application/vnd.docker.container.image.v1+json",
        }
    }
    /// Gzip'd layer media type.
    pub fn layer(self) -> &'static str {
        match self {
            MediaTypes::Oci => "application/vnd.oci.image.layer.v1.tar+gzip",
            MediaTypes::Docker => "application/vnd.docker.image.rootfs.diff.tar.gzip",
        }
    }
}

/// What goes into the image.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The (static) executable, stored at [`APP_PATH`] with mode 0755.
    pub binary: Vec<u8>,
    /// `KEY=VALUE` entries added after [`DEFAULT_PATH`] (a `PATH=` entry here replaces it).
    pub env: Vec<String>,
    /// TCP ports listed in `ExposedPorts`.
    pub ports: Vec<u16>,
    /// Seconds since the epoch used for every mtime and the `created` fields (e.g. `SOURCE_DATE_EPOCH`).
    pub epoch: u64,
    /// Media type family.
    pub media: MediaTypes,
}

/// A content-addressed blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// Media type it is referenced with.
    pub media_type: String,
    /// SHA-256 of `data`.
    pub digest: Digest,
    /// Contents.
    pub data: Vec<u8>,
}

impl Blob {
    /// A blob of `data`, digest computed here.
    pub fn new(media_type: &str, data: Vec<u8>) -> Self {
        Blob {
            media_type: media_type.to_string(),
            digest: Digest::of(&data),
            data,
        }
    }

    /// The descriptor referencing this blob.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.as_str().to_string(),
            size: self.data.len() as u64,
            annotations: None,
        }
    }
}

/// An image: manifest plus the blobs it references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The manifest (its digest is the image digest).
    pub manifest: Blob,
    /// The config blob.
    pub config: Blob,
    /// Layer blobs, base first.
    pub layers: Vec<Blob>,
}

/// OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// Optional annotations (used in `index.json` for the tag).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// Image manifest (same shape for OCI and Docker schema 2).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// Manifest media type.
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    /// Config descriptor.
    pub config: Descriptor,
    /// Layer descriptors.
    pub layers: Vec<Descriptor>,
}

#[derive(Serialize)]
struct ContainerConfig {
    #[serde(rename = "Entrypoint")]
    entrypoint: Vec<String>,
    #[serde(rename = "Env")]
    env: Vec<String>,
    #[serde(rename = "ExposedPorts", skip_serializing_if = "BTreeMap::is_empty")]
    exposed_ports: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(rename = "WorkingDir")]
    working_dir: String,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

#[derive(Serialize)]
struct History {
    created: String,
    created_by: String,
}

#[derive(Serialize)]
struct ImageConfig {
    architecture: String,
    os: String,
    created: String,
    config: ContainerConfig,
    rootfs: RootFs,
    history: Vec<History>,
}

/// `YYYY-MM-DDTHH:MM:SSZ` for `secs` since the epoch (proleptic Gregorian, UTC).
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), shifted so eras start on 0000-03-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn json<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, BuildError> {
    serde_json::to_vec(value).map_err(|source| BuildError::Json { what, source })
}

/// The uncompressed layer tar.
pub fn layer_tar(spec: &ImageSpec) -> Result<Vec<u8>, BuildError> {
    let mut t = TarBuilder::new(spec.epoch);
    t.file("app", 0o755, &spec.binary)?;
    t.dir("etc/", 0o755)?;
    t.file("etc/group", 0o644, GROUP.as_bytes())?;
    t.file("etc/passwd", 0o644, PASSWD.as_bytes())?;
    t.dir("tmp/", 0o1777)?;
    Ok(t.finish())
}

/// Gzip with a fixed header: mtime 0, no file name, OS byte 255 ("unknown"), level 6.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>, BuildError> {
    let mut enc = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::with_capacity(data.len() / 2), Compression::new(6));
    enc.write_all(data).map_err(BuildError::Gzip)?;
    enc.finish().map_err(BuildError::Gzip)
}

/// Builds the image. Same spec → byte-identical blobs → same manifest digest.
pub fn build(spec: &ImageSpec) -> Result<Image, BuildError> {
    let mut env = Vec::new();
    if !spec.env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.to_string());
    }
    for e in &spec.env {
        match e.split_once('=') {
            Some((k, _)) if !k.is_empty() => env.push(e.clone()),
            _ => return Err(BuildError::BadEnv(e.clone())),
        }
    }
    let tar = layer_tar(spec)?;
    let diff_id = Digest::of(&tar);
    let layer = Blob::new(spec.media.layer(), gzip(&tar)?);
    let created = rfc3339(spec.epoch);
    let config = ImageConfig {
        architecture: "amd64".into(),
        os: "linux".into(),
        created: created.clone(),
        config: ContainerConfig {
            entrypoint: vec![APP_PATH.to_string()],
            env,
            exposed_ports: spec
                .ports
                .iter()
                .map(|p| (format!("{p}/tcp"), BTreeMap::new()))
                .collect(),
            working_dir: "/".into(),
        },
        rootfs: RootFs {
            kind: "layers".into(),
            diff_ids: vec![diff_id.to_string()],
        },
        history: vec![History {
            created,
            created_by: "dstack-oci build".into(),
        }],
    };
    let config = Blob::new(spec.media.config(), json("image config", &config)?);
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(spec.media.manifest().to_string()),
        config: config.descriptor(),
        layers: vec![layer.descriptor()],
    };
    let manifest = Blob::new(spec.media.manifest(), json("manifest", &manifest)?);
    Ok(Image {
        manifest,
        config,
        layers: vec![layer],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ImageSpec {
        ImageSpec {
            binary: b"\x7fELF not really".to_vec(),
            env: vec!["GREETING=hi".into()],
            ports: vec![8080],
            epoch: 0,
            media: MediaTypes::Oci,
        }
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        // `date -u -d @951782400` = Tue Feb 29 00:00:00 UTC 2000; 1700000000 = 2023-11-14 22:13:20 UTC.
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn manifest_references_blobs() {
        let img = build(&spec()).unwrap();
        let m: Manifest = serde_json::from_slice(&img.manifest.data).unwrap();
        assert_eq!(m.config, img.config.descriptor());
        assert_eq!(m.layers, vec![img.layers[0].descriptor()]);
        assert_eq!(img.manifest.digest, Digest::of(&img.manifest.data));
        let c: serde_json::Value = serde_json::from_slice(&img.config.data).unwrap();
        assert_eq!(c["config"]["Entrypoint"], serde_json::json!(["/app"]));
        assert_eq!(c["config"]["Env"], serde_json::json!([DEFAULT_PATH, "GREETING=hi"]));
        assert_eq!(c["config"]["ExposedPorts"], serde_json::json!({"8080/tcp": {}}));
        let tar = layer_tar(&spec()).unwrap();
        assert_eq!(
            c["rootfs"]["diff_ids"],
            serde_json::json!([Digest::of(&tar).to_string()])
        );
    }

    #[test]
    fn inputs_change_digest_and_media_types_follow() {
        let a = build(&spec()).unwrap();
        let mut s = spec();
        s.epoch = 1;
        assert_ne!(build(&s).unwrap().manifest.digest, a.manifest.digest);
        s = spec();
        s.media = MediaTypes::Docker;
        let d = build(&s).unwrap();
        assert_eq!(
            d.manifest.media_type,
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        assert_eq!(
            d.layers[0].media_type,
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
        assert_eq!(
            d.layers[0].data, a.layers[0].data,
            "same layer bytes, different media type"
        );
    }

    #[test]
    fn env_must_be_key_value() {
        let mut s = spec();
        s.env = vec!["NOEQUALS".into()];
        assert!(matches!(build(&s), Err(BuildError::BadEnv(_))));
        s.env = vec!["=x".into()];
        assert!(build(&s).is_err());
        s.env = vec!["PATH=/x".into()];
        let c: serde_json::Value = serde_json::from_slice(&build(&s).unwrap().config.data).unwrap();
        assert_eq!(c["config"]["Env"], serde_json::json!(["PATH=/x"]));
    }
}
