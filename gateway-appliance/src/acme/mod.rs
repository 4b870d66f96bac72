//! ACME (RFC 8555) with instant-acme: a wildcard certificate `*.<base_domain>` + `<base_domain>`
//! validated by DNS-01 through a pluggable [`DnsProvider`], persisted 0600, renewed before expiry,
//! revocable on request.

pub mod dns01;
pub mod store;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy, RevocationReason, RevocationRequest,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::info;

pub use dns01::{ChallTestSrv, DnsProvider};
pub use store::{CertSummary, needs_renewal, summarize, write_private};

/// ACME errors.
#[derive(Debug, Error)]
pub enum AcmeError {
    /// Protocol or transport error from instant-acme.
    #[error("acme: {0}")]
    Acme(#[from] instant_acme::Error),
    /// File error.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The DNS provider failed.
    #[error("dns-01 provider: {0}")]
    Dns(String),
    /// The server did not offer what we need or ended in a bad state.
    #[error("acme order: {0}")]
    Order(String),
    /// Certificate or key generation / parsing.
    #[error("certificate: {0}")]
    Certificate(String),
    /// Stored account credentials are unreadable.
    #[error("account credentials {path}: {msg}")]
    Credentials {
        /// File.
        path: PathBuf,
        /// Cause.
        msg: String,
    },
}

/// Where and how to talk to the CA.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// Directory URL.
    pub directory_url: String,
    /// Extra root (PEM file) to trust for the ACME server; `None` = platform roots.
    pub ca_file: Option<PathBuf>,
    /// Contact addresses (`mailto:` is prepended when missing).
    pub contacts: Vec<String>,
    /// Account credentials file (0600).
    pub credentials_path: PathBuf,
    /// How long to wait for validation and issuance.
    pub order_timeout: Duration,
}

/// A certificate as issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// Leaf first.
    pub chain_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
    /// Parsed leaf.
    pub summary: CertSummary,
}

#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory_url: String,
    credentials: AccountCredentials,
}

/// An ACME account plus the DNS provider used for its challenges.
pub struct AcmeClient {
    account: Account,
    settings: AcmeSettings,
    dns: Box<dyn DnsProvider>,
}

impl std::fmt::Debug for AcmeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeClient")
            .field("account", &self.account.id())
            .finish_non_exhaustive()
    }
}

fn builder(settings: &AcmeSettings) -> Result<instant_acme::AccountBuilder, AcmeError> {
    Ok(match &settings.ca_file {
        Some(pem) => Account::builder_with_root(pem)?,
        None => Account::builder()?,
    })
}

impl AcmeClient {
    /// Load the account from `credentials_path` (if it was made for the same directory URL) or
    /// register a new one and store its credentials 0600.
    pub async fn open(settings: AcmeSettings, dns: Box<dyn DnsProvider>) -> Result<Self, AcmeError> {
        let path = &settings.credentials_path;
        if let Ok(text) = std::fs::read(path) {
            let stored: StoredAccount = serde_json::from_slice(&text).map_err(|e| AcmeError::Credentials {
                path: path.clone(),
                msg: e.to_string(),
            })?;
            if stored.directory_url == settings.directory_url {
                let account = builder(&settings)?.from_credentials(stored.credentials).await?;
                info!(account = account.id(), "loaded ACME account");
                return Ok(Self { account, settings, dns });
            }
            info!("ACME directory changed; registering a new account");
        }
        let contacts: Vec<String> = settings
            .contacts
            .iter()
            .map(|c| {
                if c.contains(':') {
                    c.clone()
                } else {
                    format!("mailto:{c}")
                }
            })
            .collect();
        let contact_refs: Vec<&str> = contacts.iter().map(String::as_str).collect();
        let new = NewAccount {
            contact: &contact_refs,
            terms_of_service_agreed: true,
            only_return_existing: false,
        };
        let (account, credentials) = builder(&settings)?
            .create(&new, settings.directory_url.clone(), None)
            .await?;
        let stored = StoredAccount {
            directory_url: settings.directory_url.clone(),
            credentials,
        };
        let json = serde_json::to_vec_pretty(&stored).map_err(|e| AcmeError::Credentials {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        write_private(path, &json)?;
        info!(account = account.id(), "registered ACME account");
        Ok(Self { account, settings, dns })
    }

    /// The account URL (published in CAA `accounturi=`).
    pub fn account_id(&self) -> &str {
        self.account.id()
    }

    /// Order, validate (DNS-01) and download a certificate for `*.<base_domain>` and
    /// `<base_domain>` with a fresh P-256 key.
    pub async fn issue(&self, base_domain: &str) -> Result<IssuedCert, AcmeError> {
        let base = base_domain.trim_end_matches('.').to_ascii_lowercase();
        let names = [format!("*.{base}"), base.clone()];
        let identifiers: Vec<Identifier> = names.iter().map(|n| Identifier::Dns(n.clone())).collect();
        let mut order = self.account.new_order(&NewOrder::new(&identifiers)).await?;
        let mut published: Vec<String> = Vec::new();
        let result = self.validate_and_fetch(&mut order, &names, &mut published).await;
        for name in &published {
            if let Err(e) = self.dns.clear_txt(name).await {
                tracing::warn!(%name, error = %e, "could not remove challenge record");
            }
        }
        result
    }

    async fn validate_and_fetch(
        &self,
        order: &mut instant_acme::Order,
        names: &[String],
        published: &mut Vec<String>,
    ) -> Result<IssuedCert, AcmeError> {
        // Pass 1: publish every TXT value before asking for validation, since the wildcard and
        // the bare name share one record name.
        let mut authzs = order.authorizations();
        while let Some(authz) = authzs.next().await {
            let mut authz = authz?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(AcmeError::Order(format!("authorization status {other:?}"))),
            }
            let challenge = authz
                .challenge(ChallengeType::Dns01)
                .ok_or_else(|| AcmeError::Order("server offers no dns-01 challenge".into()))?;
            let Identifier::Dns(domain) = challenge.identifier().identifier else {
                return Err(AcmeError::Order("non-DNS identifier".into()));
            };
            let record = format!("_acme-challenge.{domain}");
            self.dns
                .add_txt(&record, &challenge.key_authorization().dns_value())
                .await?;
            if !published.contains(&record) {
                published.push(record);
            }
        }
        // Pass 2: tell the server the records are in place.
        let mut authzs = order.authorizations();
        while let Some(authz) = authzs.next().await {
            let mut authz = authz?;
            if authz.status != AuthorizationStatus::Pending {
                continue;
            }
            if let Some(mut challenge) = authz.challenge(ChallengeType::Dns01) {
                challenge.set_ready().await?;
            }
        }
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(self.settings.order_timeout);
        let status = order.poll_ready(&retry).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Order(format!("order ended {status:?}, not ready")));
        }
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| AcmeError::Certificate(e.to_string()))?;
        let params =
            rcgen::CertificateParams::new(names.to_vec()).map_err(|e| AcmeError::Certificate(e.to_string()))?;
        let csr = params
            .serialize_request(&key)
            .map_err(|e| AcmeError::Certificate(e.to_string()))?;
        order.finalize_csr(csr.der()).await?;
        let chain_pem = order.poll_certificate(&retry).await?;
        let leaf = store::first_cert_der(chain_pem.as_bytes())?;
        let summary = summarize(&leaf)?;
        Ok(IssuedCert {
            chain_pem,
            key_pem: key.serialize_pem(),
            summary,
        })
    }

    /// Revoke a certificate (PEM chain; the leaf is revoked) with this account.
    pub async fn revoke(&self, chain_pem: &str, reason: Option<RevocationReason>) -> Result<(), AcmeError> {
        let leaf = store::first_cert_der(chain_pem.as_bytes())?;
        self.account
            .revoke(&RevocationRequest {
                certificate: &leaf,
                reason,
            })
            .await?;
        Ok(())
    }
}

/// Keeps one wildcard certificate fresh on disk.
#[derive(Debug)]
pub struct Certbot {
    /// The ACME account.
    pub client: AcmeClient,
    /// `<base_domain>` (the certificate covers it and `*.` it).
    pub base_domain: String,
    /// PEM chain file.
    pub cert_path: PathBuf,
    /// PEM key file (0600).
    pub key_path: PathBuf,
    /// Renew when expiring within this.
    pub renew_before: Duration,
}

/// What [`Certbot::renew_if_needed`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewOutcome {
    /// The certificate on disk is good.
    Fresh,
    /// A new certificate was written.
    Renewed(CertSummary),
}

impl Certbot {
    fn names(&self) -> Vec<String> {
        let base = self.base_domain.trim_end_matches('.').to_ascii_lowercase();
        vec![format!("*.{base}"), base]
    }

    /// Issue and store a new certificate when the current one is missing, wrong or expiring
    /// (or always, with `force`). Key first, then chain: a reader never sees a chain without
    /// its key.
    pub async fn renew_if_needed(&self, force: bool) -> Result<RenewOutcome, AcmeError> {
        if !force && !needs_renewal(&self.cert_path, &self.names(), SystemTime::now(), self.renew_before) {
            return Ok(RenewOutcome::Fresh);
        }
        let cert = self.client.issue(&self.base_domain).await?;
        write_private(&self.key_path, cert.key_pem.as_bytes())?;
        write_private(&self.cert_path, cert.chain_pem.as_bytes())?;
        info!(domain = %self.base_domain, serial = %cert.summary.serial_hex, "stored new certificate");
        Ok(RenewOutcome::Renewed(cert.summary))
    }

    /// Revoke the stored certificate.
    pub async fn revoke_current(&self, reason: Option<RevocationReason>) -> Result<(), AcmeError> {
        let pem = std::fs::read_to_string(&self.cert_path).map_err(|e| AcmeError::Io {
            path: self.cert_path.clone(),
            source: e,
        })?;
        self.client.revoke(&pem, reason).await
    }

    /// Check every `interval`; call `on_renew` after each new certificate (e.g. to reload the
    /// TLS terminator). Errors are logged and retried at the next tick.
    pub async fn run(&self, interval: Duration, on_renew: impl Fn(&Path, &Path)) {
        loop {
            match self.renew_if_needed(false).await {
                Ok(RenewOutcome::Renewed(_)) => on_renew(&self.cert_path, &self.key_path),
                Ok(RenewOutcome::Fresh) => {}
                Err(e) => tracing::warn!(error = %e, "certificate renewal failed"),
            }
            tokio::time::sleep(interval).await;
        }
    }
}
