//! `ListContainers` through the Docker Engine API on its unix socket (`GET /containers/json?all=1`), with a
//! minimal HTTP/1.0 client (one request per connection, body read to EOF, so no chunked encoding).

use std::path::Path;
use std::time::Duration;

use dstack_rpc::guest_api::Container;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest response accepted.
const MAX_RESPONSE: u64 = 16 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

/// The fields of Docker's container summary we report.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Summary {
    #[serde(default)]
    id: String,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    image: String,
    #[serde(default, rename = "ImageID")]
    image_id: String,
    #[serde(default)]
    created: i64,
    #[serde(default)]
    state: String,
    #[serde(default)]
    status: String,
}

/// Parses `GET /containers/json` output.
pub fn parse_containers(body: &[u8]) -> Result<Vec<Container>, String> {
    let list: Vec<Summary> = serde_json::from_slice(body).map_err(|e| format!("docker answered: {e}"))?;
    Ok(list
        .into_iter()
        .map(|s| Container {
            id: s.id,
            // Docker prefixes names with "/".
            names: s
                .names
                .into_iter()
                .map(|n| n.trim_start_matches('/').to_owned())
                .collect(),
            image: s.image,
            image_id: s.image_id,
            created: s.created,
            state: s.state,
            status: s.status,
        })
        .collect())
}

/// Containers (running or not) of the Docker daemon at `socket`; none when the socket does not exist (no
/// container runtime started).
pub async fn list_containers(socket: &Path) -> Result<Vec<Container>, String> {
    if !socket.exists() {
        return Ok(Vec::new());
    }
    let body = tokio::time::timeout(TIMEOUT, get(socket, "/containers/json?all=1"))
        .await
        .map_err(|_| format!("docker at {}: no answer within {TIMEOUT:?}", socket.display()))??;
    parse_containers(&body)
}

async fn get(socket: &Path, path: &str) -> Result<Vec<u8>, String> {
    let err = |e: std::io::Error| format!("docker at {}: {e}", socket.display());
    let mut s = tokio::net::UnixStream::connect(socket).await.map_err(err)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n").as_bytes())
        .await
        .map_err(err)?;
    let mut raw = Vec::new();
    s.take(MAX_RESPONSE).read_to_end(&mut raw).await.map_err(err)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| "docker: malformed HTTP response".to_owned())?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head.split_whitespace().nth(1).unwrap_or("");
    let body = raw.get(split + 4..).unwrap_or_default().to_vec();
    if status != "200" {
        return Err(format!(
            "docker: GET {path} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The summary shape from Docker's Engine API reference (`ContainerSummary`): PascalCase keys, `ImageID`,
    /// names with a leading slash, `Created` in Unix seconds.
    const SAMPLE: &str = r#"[{"Id":"8dfafdbc3a40","Names":["/boring_feynman"],"Image":"ubuntu:latest",
        "ImageID":"sha256:d74508fb6632","Command":"echo 1","Created":1367854155,"State":"exited",
        "Status":"Exit 0","Ports":[],"Labels":{}}]"#;

    #[test]
    fn parses_docker_summaries() {
        let c = parse_containers(SAMPLE.as_bytes()).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].id, "8dfafdbc3a40");
        assert_eq!(c[0].names, ["boring_feynman"]);
        assert_eq!(
            (c[0].image.as_str(), c[0].image_id.as_str()),
            ("ubuntu:latest", "sha256:d74508fb6632")
        );
        assert_eq!(
            (c[0].created, c[0].state.as_str(), c[0].status.as_str()),
            (1367854155, "exited", "Exit 0")
        );
        assert!(parse_containers(b"{\"message\":\"x\"}").is_err());
    }

    #[tokio::test]
    async fn talks_http_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("docker.sock");
        assert!(
            list_containers(&sock).await.unwrap().is_empty(),
            "no socket: no containers"
        );
        let l = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = vec![0u8; 1024];
            let n = s.read(&mut req).await.unwrap();
            let body = SAMPLE.as_bytes();
            s.write_all(
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            s.write_all(body).await.unwrap();
            String::from_utf8_lossy(&req[..n]).into_owned()
        });
        let c = list_containers(&sock).await.unwrap();
        assert_eq!(c[0].names, ["boring_feynman"]);
        assert!(
            server
                .await
                .unwrap()
                .starts_with("GET /containers/json?all=1 HTTP/1.0\r\n")
        );
    }
}
