//! The TLS identity of `[core.rpc]` (RegisterCvm server, and client certificate of the sync loop):
//! PEM files, a self-signed certificate, or — when the gateway runs as an app inside a CVM — a key and
//! certificate chain from the guest agent (`DstackGuest.GetTlsKey` on `/var/run/dstack.sock`, as
//! dstack's gateway gets its RPC certificate). The agent's chain ends at the KMS root and its leaf
//! carries the gateway's quote (RA-TLS), so CVMs pinned to the KMS root and peer gateways checking
//! attestation both accept it.
//!
//! [`LiveIdentity`] is what rustls asks for the certificate on every handshake (server and client
//! side), so a renewed agent certificate ([`AgentIdentity::run_renewal`]) is used by new
//! connections without restarting the listener or the sync client.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dstack_rpc::Client;
use dstack_rpc::agent::{DstackGuestClient, GetTlsKeyArgs};
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::attest::{AttestError, ServerIdentity};

/// Where `[core.rpc]` gets its identity when `cert_chain`/`cert_key` are not set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum IdentitySource {
    /// A fresh self-signed certificate for `rpc_domain` (clients must pin it).
    #[default]
    SelfSigned,
    /// `GetTlsKey` from the guest agent listening on this unix socket.
    Agent(PathBuf),
}

impl IdentitySource {
    /// `self-signed` or `agent:<socket path>`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "self-signed" {
            return Ok(Self::SelfSigned);
        }
        match s.strip_prefix("agent:") {
            Some(path) if !path.trim().is_empty() => Ok(Self::Agent(PathBuf::from(path.trim()))),
            Some(_) => Err("identity: expected agent:<socket path>, e.g. agent:/var/run/dstack.sock".into()),
            None => Err(format!(
                "identity {s:?}: expected \"self-signed\" or \"agent:<socket path>\""
            )),
        }
    }
}

impl<'de> serde::Deserialize<'de> for IdentitySource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The current certificate chain and key, swapped atomically on renewal.
#[derive(Debug)]
pub struct LiveIdentity {
    current: RwLock<Arc<CertifiedKey>>,
}

fn certified(id: ServerIdentity) -> Result<Arc<CertifiedKey>, AttestError> {
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(id.chain, id.key, &provider)
        .map(Arc::new)
        .map_err(|e| AttestError::Tls(format!("certificate and key: {e}")))
}

impl LiveIdentity {
    /// Starts with `id`; fails when the key does not match the leaf certificate.
    pub fn new(id: ServerIdentity) -> Result<Arc<Self>, AttestError> {
        Ok(Arc::new(Self {
            current: RwLock::new(certified(id)?),
        }))
    }

    /// Replace the identity used by new handshakes.
    pub fn replace(&self, id: ServerIdentity) -> Result<(), AttestError> {
        let new = certified(id)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }

    /// The current chain (leaf first).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.get().cert.clone()
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ResolvesServerCert for LiveIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl ResolvesClientCert for LiveIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let ck = self.get();
        // Offer the certificate only when the peer can verify our key's signatures.
        ck.key.choose_scheme(sigschemes).is_some().then_some(ck)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Gets the RPC identity from the guest agent and renews it.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    client: DstackGuestClient<Client>,
    socket: PathBuf,
    domain: String,
    validity: Duration,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl AgentIdentity {
    /// For `rpc_domain` from the agent at `socket`; `validity` zero leaves the lifetime to the agent
    /// (its KMS), otherwise it is requested as `not_after = now + validity`.
    pub fn new(socket: &Path, rpc_domain: &str, validity: Duration) -> Self {
        Self {
            client: DstackGuestClient::new(Client::unix(socket, "").with_timeout(Duration::from_secs(60))),
            socket: socket.to_owned(),
            domain: rpc_domain.to_owned(),
            validity,
        }
    }

    /// The `GetTlsKey` request: RA-TLS (the leaf carries our quote), usable as server and as client
    /// certificate, named for `rpc_domain` (dstack's gateway asks the same).
    pub fn request(&self, now: u64) -> GetTlsKeyArgs {
        let (not_before, not_after) = if self.validity.is_zero() {
            (None, None)
        } else {
            // A minute back for peers whose clocks run slightly behind ours.
            (
                Some(now.saturating_sub(60)),
                Some(now.saturating_add(self.validity.as_secs().max(1))),
            )
        };
        GetTlsKeyArgs {
            subject: self.domain.clone(),
            alt_names: vec![self.domain.clone()],
            usage_ra_tls: true,
            usage_server_auth: true,
            usage_client_auth: true,
            not_before,
            not_after,
            with_app_info: false,
        }
    }

    /// One `GetTlsKey`: the key and chain, with the leaf's notAfter (UNIX seconds).
    pub async fn fetch(&self) -> Result<(ServerIdentity, u64), AttestError> {
        let at = |m: String| AttestError::Tls(format!("guest agent {}: {m}", self.socket.display()));
        let resp = self
            .client
            .get_tls_key(self.request(unix_now()))
            .await
            .map_err(|e| at(format!("GetTlsKey: {e}")))?;
        let mut chain = Vec::new();
        for (i, pem) in resp.certificate_chain.iter().enumerate() {
            // An entry may hold several PEM blocks.
            for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                chain.push(der.map_err(|e| at(format!("certificate_chain[{i}]: {e}")))?);
            }
        }
        let Some(leaf) = chain.first() else {
            return Err(at("GetTlsKey returned an empty certificate chain".into()));
        };
        let parsed = dstack_ra_tls::parse_cert(leaf).map_err(|e| at(format!("leaf certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(resp.key.as_bytes()).map_err(|e| at(format!("key: {e}")))?;
        Ok((ServerIdentity { chain, key }, parsed.not_after))
    }

    /// Renew `live` from the agent forever: at two thirds of the remaining lifetime of each
    /// certificate, retrying every `retry` (bounded by the time left) when the agent fails.
    pub async fn run_renewal(self, live: Arc<LiveIdentity>, first_not_after: u64, retry: Duration) {
        let mut not_after = first_not_after;
        let mut delay = renew_delay(unix_now(), not_after);
        loop {
            tokio::time::sleep(delay).await;
            match self.fetch().await.and_then(|(id, na)| live.replace(id).map(|()| na)) {
                Ok(na) => {
                    not_after = na;
                    tracing::info!(not_after, "renewed the RPC certificate from the guest agent");
                    delay = renew_delay(unix_now(), not_after);
                }
                Err(e) => {
                    let left = not_after.saturating_sub(unix_now());
                    tracing::warn!(seconds_left = left, "renewing the RPC certificate failed: {e}");
                    delay = retry.min(Duration::from_secs(left / 2)).max(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Time until a certificate fetched at `now` and valid until `not_after` is renewed: two thirds of
/// what is left (at least one second, at most 30 days so a far expiry still renews periodically).
pub fn renew_delay(now: u64, not_after: u64) -> Duration {
    let left = not_after.saturating_sub(now);
    Duration::from_secs((left / 3 * 2).clamp(1, 30 * 86400))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_source_grammar() {
        assert_eq!(IdentitySource::parse("self-signed"), Ok(IdentitySource::SelfSigned));
        assert_eq!(
            IdentitySource::parse("agent:/var/run/dstack.sock"),
            Ok(IdentitySource::Agent("/var/run/dstack.sock".into()))
        );
        assert!(
            IdentitySource::parse("agent:")
                .unwrap_err()
                .contains("agent:<socket path>")
        );
        assert!(IdentitySource::parse("kms").unwrap_err().contains("self-signed"));
    }

    #[test]
    fn renewal_at_two_thirds_of_what_is_left() {
        assert_eq!(renew_delay(1000, 1000 + 9), Duration::from_secs(6));
        assert_eq!(renew_delay(1000, 1000 + 3 * 86400), Duration::from_secs(2 * 86400));
        // Expired or about to: retry soon, never a zero-length busy loop.
        assert_eq!(renew_delay(1000, 900), Duration::from_secs(1));
        // Ten years: still looked at monthly.
        assert_eq!(renew_delay(0, 10 * 365 * 86400), Duration::from_secs(30 * 86400));
    }

    #[test]
    fn request_matches_dstack_gateway_usage() {
        let id = AgentIdentity::new(Path::new("/nonexistent.sock"), "gw.example", Duration::ZERO);
        let r = id.request(5000);
        assert_eq!(r.subject, "gw.example");
        assert_eq!(r.alt_names, vec!["gw.example".to_owned()]);
        assert!(r.usage_ra_tls && r.usage_server_auth && r.usage_client_auth && !r.with_app_info);
        assert_eq!((r.not_before, r.not_after), (None, None));
        let r = AgentIdentity::new(Path::new("/x"), "gw", Duration::from_secs(3600)).request(5000);
        assert_eq!((r.not_before, r.not_after), (Some(4940), Some(8600)));
    }
}
