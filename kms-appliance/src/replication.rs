//! Replication of the revocation state (ours; dstack has no revocation list).
//!
//! Keys are copied once by onboarding ([`crate::onboard`]); revocations keep changing, so a replica follows its
//! source by **periodic pull**:
//! 1. `Onboard.Onboard` fetches the source's CRL (`Revocation.GetCrl`) over the connection pinned to the
//!    source's root, verifies it with that root (the replica's own root from then on) and merges it into the new
//!    node's `revocations.json`; the source URL is recorded in `cert_dir/replication-source.json`.
//! 2. While serving, the replica fetches the source's CRL every `[core.onboard] revocation_sync_secs` (default
//!    300 s; 0 = off) and merges it ([`RevocationStore::merge_crl`]: entries are added, never removed; the
//!    replica takes the source's CRL number and serves the source's signed list). A failed pull is logged and
//!    retried at the next interval; the replica keeps publishing what it has.
//!
//! Why pull rather than asking the source on each `GetCrl`: publication and the key-release revocation check
//! stay local and never wait for (or fail with) the source; a replica lags the source by at most one interval.
//! Revocations are made on the source: a replica refuses `Admin.RevokeCerts` (it would otherwise publish a
//! list the source does not know under a number the source will use for another).
//!
//! The CRL authenticates itself (signed by the root CA both nodes hold), so the pull channel needs no
//! attestation; it is still TLS with the source's certificate chained to that root and its name checked.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dstack_ra_tls::RevocationList;
use dstack_rpc::Client;
use dstack_rpc::kms::RevocationClient;
use rustls::client::WebPkiServerVerifier;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::KmsError;
use crate::revocation::{RevocationStore, SourceCrl};
use crate::store::{create_private_dir, write_atomic};

/// File in `cert_dir` naming the source a replica follows.
pub const SOURCE_FILE: &str = "replication-source.json";

/// `replication-source.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSource {
    /// The source's `https://host:port/prpc`.
    pub source_url: String,
}

/// The source this node follows, if it was onboarded from one.
pub fn load_source(cert_dir: &Path) -> Result<Option<ReplicationSource>, KmsError> {
    let path = cert_dir.join(SOURCE_FILE);
    match std::fs::read(&path) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| KmsError::Storage(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(KmsError::Storage(format!("reading {}: {e}", path.display()))),
    }
}

pub fn save_source(cert_dir: &Path, source: &ReplicationSource) -> Result<(), KmsError> {
    let data = serde_json::to_vec_pretty(source).map_err(|e| KmsError::Storage(format!("{SOURCE_FILE}: {e}")))?;
    // Written before the key set on onboarding, so cert_dir may not exist yet.
    create_private_dir(cert_dir)?;
    write_atomic(&cert_dir.join(SOURCE_FILE), &data, 0o644)
}

/// Forgets the source (a node that bootstraps its own root follows nobody).
pub fn remove_source(cert_dir: &Path) -> Result<(), KmsError> {
    match std::fs::remove_file(cert_dir.join(SOURCE_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(KmsError::Storage(format!("removing {SOURCE_FILE}: {e}")))
        }
        _ => Ok(()),
    }
}

/// A `Revocation` client for `url` whose server certificate must chain to `root` (name checked).
pub fn crl_client(url: &str, root: &[u8]) -> Result<RevocationClient<Client>, KmsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(root.to_vec()))
        .map_err(|e| KmsError::Tls(format!("root CA: {e}")))?;
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .build()
        .map_err(|e| KmsError::Tls(format!("root CA: {e}")))?;
    let tls = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| KmsError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let client = Client::new(url)
        .map_err(|e| KmsError::Config(format!("source_url {url:?}: {e}")))?
        .with_tls(Arc::new(tls))
        .with_connect_timeout(Duration::from_secs(10))
        .with_timeout(Duration::from_secs(30));
    Ok(RevocationClient::new(client))
}

/// Fetches the source's CRL and verifies it with `root` at `now`.
pub async fn fetch_verified(client: &RevocationClient<Client>, root: &[u8], now: u64) -> Result<SourceCrl, KmsError> {
    let r = client
        .get_crl()
        .await
        .map_err(|e| KmsError::Tls(format!("Revocation.GetCrl: {e}")))?;
    let list = RevocationList::from_der(&r.crl, root, now).map_err(KmsError::Cert)?;
    if list.content().crl_number != r.crl_number {
        return Err(KmsError::Storage(format!(
            "GetCrl says crl_number {} but the signed list is #{}",
            r.crl_number,
            list.content().crl_number
        )));
    }
    Ok(SourceCrl {
        content: list.content().clone(),
        der: r.crl,
    })
}

/// One pull: fetch, verify, merge. Returns whether the local state changed.
pub async fn pull_once(
    client: &RevocationClient<Client>,
    source_url: &str,
    root: &[u8],
    store: &RevocationStore,
    now: u64,
) -> Result<bool, KmsError> {
    let list = fetch_verified(client, root, now).await?;
    let note = format!("replicated from {source_url} (CRL #{})", list.content.crl_number);
    store.merge_crl(&list, now, &note)
}

/// Aborts the pull task when dropped.
#[derive(Debug)]
pub struct SyncTask(tokio::task::JoinHandle<()>);

impl Drop for SyncTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Pulls from `source_url` every `interval` (the first pull right away) until the returned task is dropped.
pub fn spawn_sync(
    source_url: String,
    root: Vec<u8>,
    store: Arc<RevocationStore>,
    interval: Duration,
) -> Result<SyncTask, KmsError> {
    let client = crl_client(&source_url, &root)?;
    tracing::info!(source = %source_url, every = ?interval, "following the source KMS's revocations");
    Ok(SyncTask(tokio::spawn(async move {
        loop {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            match pull_once(&client, &source_url, &root, &store, now).await {
                Ok(true) => tracing::info!(
                    source = %source_url,
                    crl_number = store.snapshot().crl_number,
                    "revocations updated from the source KMS"
                ),
                Ok(false) => tracing::debug!(source = %source_url, "revocations up to date"),
                Err(e) => tracing::warn!(source = %source_url, "revocation pull failed (will retry): {e}"),
            }
            tokio::time::sleep(interval).await;
        }
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_source(dir.path()).unwrap(), None);
        let s = ReplicationSource {
            source_url: "https://kms-a:8000/prpc".into(),
        };
        save_source(dir.path(), &s).unwrap();
        assert_eq!(load_source(dir.path()).unwrap(), Some(s));
        std::fs::write(dir.path().join(SOURCE_FILE), b"{\"source_url\": 1}").unwrap();
        assert!(load_source(dir.path()).is_err());
    }
}
