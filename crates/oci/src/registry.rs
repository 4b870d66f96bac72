//! Registry HTTP API v2 client, plain HTTP only (a loopback registry such as Debian's `docker-registry`):
//! monolithic blob upload (`POST` then `PUT ?digest=`), manifest `PUT`, and verified fetches.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HOST, LOCATION};
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::digest::{Digest, DigestError};
use crate::image::{Blob, Image, MediaTypes};

/// Largest manifest we read.
const MAX_MANIFEST: usize = 4 << 20;
/// Largest blob we read back.
const MAX_BLOB: usize = 1 << 30;
/// Per-request limit (connect + response).
const TIMEOUT: Duration = Duration::from_secs(120);

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry URL is not `http://host[:port]`.
    #[error("registry URL {0:?}: expected http://host[:port] (plain HTTP on a local registry only)")]
    Url(String),
    /// A repository name or tag is not valid for the registry API.
    #[error("invalid {what} {value:?}")]
    Name {
        /// "repository" or "tag".
        what: &'static str,
        /// The value.
        value: String,
    },
    /// TCP connection failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// host:port.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// HTTP protocol error.
    #[error("{op}: HTTP error: {source}")]
    Http {
        /// The operation.
        op: String,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The request took longer than the timeout.
    #[error("{0}: timed out")]
    Timeout(String),
    /// The registry answered with an unexpected status.
    #[error("{op}: registry answered {status}: {body}")]
    Status {
        /// The operation.
        op: String,
        /// Status received.
        status: StatusCode,
        /// Start of the response body.
        body: String,
    },
    /// A required response header is missing or malformed.
    #[error("{op}: bad or missing {header} header")]
    Header {
        /// The operation.
        op: String,
        /// Header name.
        header: &'static str,
    },
    /// Content received does not match the digest asked for.
    #[error("{what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was fetched.
        what: String,
        /// Digest requested.
        expected: Digest,
        /// Digest of what arrived.
        actual: Digest,
    },
    /// A digest in a response is malformed.
    #[error("{0}")]
    Digest(#[from] DigestError),
}

/// A response: status, headers, body.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// Client for one registry.
#[derive(Debug, Clone)]
pub struct Registry {
    host: String,
    port: u16,
}

/// Repository names: lowercase path components of `[a-z0-9]+([._-][a-z0-9]+)*` joined by `/`.
fn valid_repo(repo: &str) -> bool {
    !repo.is_empty()
        && repo.len() <= 255
        && repo.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && c.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
        })
}

/// Tags: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn valid_tag(tag: &str) -> bool {
    tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn check_names(repo: &str, tag: Option<&str>) -> Result<(), RegistryError> {
    if !valid_repo(repo) {
        return Err(RegistryError::Name {
            what: "repository",
            value: repo.to_string(),
        });
    }
    match tag {
        Some(t) if !valid_tag(t) => Err(RegistryError::Name {
            what: "tag",
            value: t.to_string(),
        }),
        _ => Ok(()),
    }
}

impl Registry {
    /// A client for `url` (`http://host[:port]`, no path).
    pub fn new(url: &str) -> Result<Self, RegistryError> {
        let bad = || RegistryError::Url(url.to_string());
        let uri: Uri = url.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("http") || !uri.path().trim_end_matches('/').is_empty() || uri.query().is_some() {
            return Err(bad());
        }
        let host = uri.host().ok_or_else(bad)?.to_string();
        Ok(Registry {
            host,
            port: uri.port_u16().unwrap_or(80),
        })
    }

    /// `host:port`, as used in image references (`host:port/repo:tag`).
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    async fn send(
        &self,
        op: &str,
        method: Method,
        path_and_query: &str,
        headers: &[(http::HeaderName, String)],
        body: Bytes,
        limit: usize,
    ) -> Result<Reply, RegistryError> {
        let fut = self.send_inner(op, method, path_and_query, headers, body, limit);
        tokio::time::timeout(TIMEOUT, fut)
            .await
            .map_err(|_| RegistryError::Timeout(op.to_string()))?
    }

    async fn send_inner(
        &self,
        op: &str,
        method: Method,
        path_and_query: &str,
        headers: &[(http::HeaderName, String)],
        body: Bytes,
        limit: usize,
    ) -> Result<Reply, RegistryError> {
        let http_err = |e: Box<dyn std::error::Error + Send + Sync>| RegistryError::Http {
            op: op.to_string(),
            source: e,
        };
        let addr = self.authority();
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| RegistryError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http_err(e.into()))?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(HOST, &addr)
            .header(CONTENT_LENGTH, body.len());
        for (name, value) in headers {
            req = req.header(name, value);
        }
        let req = req.body(Full::new(body)).map_err(|e| http_err(e.into()))?;
        let resp = sender.send_request(req).await.map_err(|e| http_err(e.into()))?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, limit).collect().await.map_err(http_err)?.to_bytes();
        drop(sender);
        driver.abort();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    fn expect(op: &str, reply: &Reply, ok: &[StatusCode]) -> Result<(), RegistryError> {
        if ok.contains(&reply.status) {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&reply.body);
        Err(RegistryError::Status {
            op: op.to_string(),
            status: reply.status,
            body: text.chars().take(500).collect(),
        })
    }

    /// Checks the registry speaks API v2 (`GET /v2/` → 200).
    pub async fn ping(&self) -> Result<(), RegistryError> {
        let reply = self
            .send("GET /v2/", Method::GET, "/v2/", &[], Bytes::new(), 64 << 10)
            .await?;
        Self::expect("GET /v2/", &reply, &[StatusCode::OK])
    }

    /// Whether the registry already has `digest` in `repo`.
    pub async fn has_blob(&self, repo: &str, digest: &Digest) -> Result<bool, RegistryError> {
        check_names(repo, None)?;
        let op = format!("HEAD blob {digest}");
        let path = format!("/v2/{repo}/blobs/{digest}");
        let reply = self.send(&op, Method::HEAD, &path, &[], Bytes::new(), 0).await?;
        Self::expect(&op, &reply, &[StatusCode::OK, StatusCode::NOT_FOUND])?;
        Ok(reply.status == StatusCode::OK)
    }

    /// Uploads `blob` to `repo` in one request unless the registry has it; returns whether it uploaded.
    pub async fn push_blob(&self, repo: &str, blob: &Blob) -> Result<bool, RegistryError> {
        if self.has_blob(repo, &blob.digest).await? {
            return Ok(false);
        }
        let op = format!("start upload of {}", blob.digest);
        let path = format!("/v2/{repo}/blobs/uploads/");
        let reply = self.send(&op, Method::POST, &path, &[], Bytes::new(), 64 << 10).await?;
        Self::expect(&op, &reply, &[StatusCode::ACCEPTED])?;
        let location = reply
            .headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Uri>().ok())
            .and_then(|u| u.path_and_query().map(|p| p.as_str().to_string()))
            .ok_or_else(|| RegistryError::Header {
                op: op.clone(),
                header: "Location",
            })?;
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={}", blob.digest);
        let op = format!("upload {}", blob.digest);
        let headers = [(CONTENT_TYPE, "application/octet-stream".to_string())];
        let reply = self
            .send(
                &op,
                Method::PUT,
                &url,
                &headers,
                Bytes::from(blob.data.clone()),
                64 << 10,
            )
            .await?;
        Self::expect(&op, &reply, &[StatusCode::CREATED])?;
        Ok(true)
    }

    /// Pushes every blob of `image`, then its manifest as `repo:tag`. Returns the manifest digest the
    /// registry reports (checked against ours).
    pub async fn push_image(&self, repo: &str, tag: &str, image: &Image) -> Result<Digest, RegistryError> {
        check_names(repo, Some(tag))?;
        for blob in std::iter::once(&image.config).chain(&image.layers) {
            self.push_blob(repo, blob).await?;
        }
        let op = format!("PUT manifest {repo}:{tag}");
        let path = format!("/v2/{repo}/manifests/{tag}");
        let headers = [(CONTENT_TYPE, image.manifest.media_type.clone())];
        let body = Bytes::from(image.manifest.data.clone());
        let reply = self.send(&op, Method::PUT, &path, &headers, body, 64 << 10).await?;
        Self::expect(&op, &reply, &[StatusCode::CREATED])?;
        let reported = reply
            .headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .ok_or(RegistryError::Header {
                op: op.clone(),
                header: "Docker-Content-Digest",
            })?;
        let reported = Digest::parse(reported)?;
        if reported != image.manifest.digest {
            return Err(RegistryError::DigestMismatch {
                what: op,
                expected: image.manifest.digest.clone(),
                actual: reported,
            });
        }
        Ok(reported)
    }

    /// Fetches the manifest `reference` (tag or digest) of `repo`; returns it as a blob with the media
    /// type the registry served. When `reference` is a digest the content is checked against it.
    pub async fn fetch_manifest(&self, repo: &str, reference: &str) -> Result<Blob, RegistryError> {
        let by_digest = reference.starts_with("sha256:");
        check_names(repo, (!by_digest).then_some(reference))?;
        let expected = by_digest.then(|| Digest::parse(reference)).transpose()?;
        let op = format!("GET manifest {repo}:{reference}");
        let accept = [MediaTypes::Oci.manifest(), MediaTypes::Docker.manifest()].join(", ");
        let path = format!("/v2/{repo}/manifests/{reference}");
        let reply = self
            .send(&op, Method::GET, &path, &[(ACCEPT, accept)], Bytes::new(), MAX_MANIFEST)
            .await?;
        Self::expect(&op, &reply, &[StatusCode::OK])?;
        let media_type = reply
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .ok_or(RegistryError::Header {
                op: op.clone(),
                header: "Content-Type",
            })?
            .to_string();
        let blob = Blob::new(&media_type, reply.body.to_vec());
        if let Some(expected) = expected
            && expected != blob.digest
        {
            return Err(RegistryError::DigestMismatch {
                what: op,
                expected,
                actual: blob.digest,
            });
        }
        Ok(blob)
    }

    /// Fetches blob `digest` of `repo` and checks its content hashes to `digest`.
    pub async fn fetch_blob(&self, repo: &str, digest: &Digest) -> Result<Vec<u8>, RegistryError> {
        check_names(repo, None)?;
        let op = format!("GET blob {digest}");
        let path = format!("/v2/{repo}/blobs/{digest}");
        let reply = self.send(&op, Method::GET, &path, &[], Bytes::new(), MAX_BLOB).await?;
        Self::expect(&op, &reply, &[StatusCode::OK])?;
        let actual = Digest::of(&reply.body);
        if &actual != digest {
            return Err(RegistryError::DigestMismatch {
                what: op,
                expected: digest.clone(),
                actual,
            });
        }
        Ok(reply.body.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let r = Registry::new("http://127.0.0.1:5000").unwrap();
        assert_eq!(r.authority(), "127.0.0.1:5000");
        assert_eq!(Registry::new("http://localhost/").unwrap().authority(), "localhost:80");
        for bad in [
            "https://127.0.0.1:5000",
            "127.0.0.1:5000",
            "http://127.0.0.1:5000/v2/",
            "ftp://x",
            "http://x?a=b",
        ] {
            assert!(Registry::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        for ok in ["demo", "dstack/demo-app", "a.b_c/d0"] {
            assert!(valid_repo(ok), "{ok}");
        }
        for bad in ["", "Demo", "demo/", "/demo", "a//b", "-a", "a-", "../x", "a?b", "a b"] {
            assert!(!valid_repo(bad), "{bad}");
        }
        for ok in ["latest", "v1.0", "_x", "A-1"] {
            assert!(valid_tag(ok), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"x".repeat(129)] {
            assert!(!valid_tag(bad), "{bad}");
        }
    }
}
