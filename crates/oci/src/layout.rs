//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/sha256/<hex>`): written by `build`,
//! read back (every blob re-hashed) by `push`.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, DigestError};
use crate::image::{Blob, Descriptor, Image, Manifest};

/// Annotation holding the tag in `index.json` (OCI image-spec).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation holding the full `name:tag` (what containerd and `docker load` look for).
pub const IMAGE_NAME: &str = "io.containerd.image.name";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Largest blob `push` will load into memory.
const MAX_BLOB: u64 = 2 << 30;

/// Why a layout cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// File system error on a path.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A JSON document is malformed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// A digest in a document is malformed.
    #[error("{0}")]
    Digest(#[from] DigestError),
    /// A blob's contents do not match its name or descriptor.
    #[error("blob {digest}: {problem}")]
    BadBlob {
        /// Expected digest.
        digest: Digest,
        /// What is wrong.
        problem: String,
    },
    /// `index.json` does not name exactly one suitable manifest.
    #[error("index.json: {0}")]
    Index(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct Index {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    manifests: Vec<Descriptor>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), LayoutError> {
    fs::write(path, data).map_err(io_err(path))
}

/// Writes `image` under `dir` (created if needed) with `index.json` naming only this image as `name:tag`.
pub fn write_layout(dir: &Path, image: &Image, name: &str, tag: &str) -> Result<(), LayoutError> {
    let blobs = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
    for blob in std::iter::once(&image.config)
        .chain(&image.layers)
        .chain([&image.manifest])
    {
        write_file(&blobs.join(blob.digest.hex()), &blob.data)?;
    }
    write_file(&dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut desc = image.manifest.descriptor();
    desc.annotations = Some(BTreeMap::from([
        (IMAGE_NAME.to_string(), format!("{name}:{tag}")),
        (REF_NAME.to_string(), tag.to_string()),
    ]));
    let index = Index {
        schema_version: 2,
        media_type: Some(INDEX_MEDIA_TYPE.into()),
        manifests: vec![desc],
    };
    let path = dir.join("index.json");
    let text = serde_json::to_vec(&index).map_err(|source| LayoutError::Json {
        path: path.clone(),
        source,
    })?;
    write_file(&path, &text)
}

/// Reads the blob `desc` names, checking its size and digest.
fn read_blob(dir: &Path, desc: &Descriptor) -> Result<Blob, LayoutError> {
    let digest = Digest::parse(&desc.digest)?;
    let path = dir.join("blobs").join("sha256").join(digest.hex());
    let len = fs::metadata(&path).map_err(io_err(&path))?.len();
    if len != desc.size || len > MAX_BLOB {
        let problem = format!("{} is {len} bytes, descriptor says {}", path.display(), desc.size);
        return Err(LayoutError::BadBlob { digest, problem });
    }
    let data = fs::read(&path).map_err(io_err(&path))?;
    if Digest::of(&data) != digest {
        let problem = format!("{} does not hash to its name", path.display());
        return Err(LayoutError::BadBlob { digest, problem });
    }
    Ok(Blob {
        media_type: desc.media_type.clone(),
        digest,
        data,
    })
}

/// Reads the image tagged `tag` from the layout in `dir` (if `tag` is `None`, the index must hold exactly
/// one manifest). Every blob is verified against its digest.
pub fn read_layout(dir: &Path, tag: Option<&str>) -> Result<Image, LayoutError> {
    let path = dir.join("index.json");
    let text = fs::read(&path).map_err(io_err(&path))?;
    let index: Index = serde_json::from_slice(&text).map_err(|source| LayoutError::Json {
        path: path.clone(),
        source,
    })?;
    let tag_of = |d: &Descriptor| d.annotations.as_ref().and_then(|a| a.get(REF_NAME)).cloned();
    let chosen: Vec<&Descriptor> = match tag {
        Some(t) if index.manifests.len() > 1 => index
            .manifests
            .iter()
            .filter(|d| tag_of(d).as_deref() == Some(t))
            .collect(),
        _ => index.manifests.iter().collect(),
    };
    let [desc] = chosen.as_slice() else {
        return Err(LayoutError::Index(format!(
            "expected one manifest{}, found {}",
            tag.map(|t| format!(" tagged {t:?}")).unwrap_or_default(),
            chosen.len()
        )));
    };
    let manifest = read_blob(dir, desc)?;
    let parsed: Manifest = serde_json::from_slice(&manifest.data).map_err(|source| LayoutError::Json {
        path: dir.join("blobs/sha256").join(manifest.digest.hex()),
        source,
    })?;
    let config = read_blob(dir, &parsed.config)?;
    let layers = parsed
        .layers
        .iter()
        .map(|d| read_blob(dir, d))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Image {
        manifest,
        config,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{ImageSpec, MediaTypes, build};

    fn image() -> Image {
        build(&ImageSpec {
            binary: vec![1, 2, 3],
            env: vec![],
            ports: vec![80],
            epoch: 0,
            media: MediaTypes::Oci,
        })
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let img = image();
        write_layout(dir.path(), &img, "demo", "v1").unwrap();
        assert_eq!(read_layout(dir.path(), None).unwrap(), img);
        assert_eq!(read_layout(dir.path(), Some("v1")).unwrap(), img);
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["annotations"][IMAGE_NAME], "demo:v1");
        assert_eq!(index["manifests"][0]["digest"], img.manifest.digest.as_str());
    }

    #[test]
    fn tampered_blob_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = image();
        write_layout(dir.path(), &img, "demo", "v1").unwrap();
        let layer = dir.path().join("blobs/sha256").join(img.layers[0].digest.hex());
        let mut data = fs::read(&layer).unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        fs::write(&layer, &data).unwrap();
        let err = read_layout(dir.path(), None).unwrap_err();
        assert!(err.to_string().contains("does not hash to its name"), "{err}");
    }

    #[test]
    fn traversal_digest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let index =
            r#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha256:../../etc/passwd","size":1}]}"#;
        fs::write(dir.path().join("index.json"), index).unwrap();
        assert!(matches!(read_layout(dir.path(), None), Err(LayoutError::Digest(_))));
    }
}
