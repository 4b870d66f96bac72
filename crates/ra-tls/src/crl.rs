//! The consumer side of the KMS certificate revocation list: a [`RevocationSet`] our rustls verifiers consult
//! on every handshake, and a [`CrlRefresher`] that keeps it current by fetching the KMS's `Revocation.GetCrl`.
//!
//! **Scope (issuer + serial).** A KMS signs one CRL with its root CA, covering every certificate issued under
//! that root, directly (the KMS RPC certificate, app CAs) or through an app CA (app certificates from
//! `SignCert`), see [`crate::revocation`]. The set holds, per pinned CA certificate, the last good list
//! verified with that CA's key. A presented chain is checked against a CA's list when one of its certificates
//! names that CA as issuer; then every presented certificate except the CA itself is looked up by serial (and
//! by the list's app-wide rules). Certificates that do not come from a pinned CA — self-signed RA-TLS leaves,
//! certificates under a KMS temp CA (whose key is public) — are outside every list and are not checked.
//!
//! **Failing closed.** A list past its nextUpdate refuses every chain under its CA until a fresh one arrives.
//! A CA added with `required` refuses every chain under it until a first list was installed; otherwise, before
//! the first list, chains are accepted (a dstack KMS publishes no CRL). A list that does not verify (signature,
//! issuer, encoding, dates) is never installed, and one numbered lower than the installed list is refused as a
//! rollback. The refresher keeps the last good list when a fetch fails, and records the error, which a
//! refusal then names.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use der::{Decode, Encode};
use x509_cert::Certificate;
use x509_cert::crl::CertificateList;

use crate::{RaTlsError, RevocationList};

/// Shortest refresh interval accepted (shorter requests are raised to it).
pub const MIN_REFRESH: Duration = Duration::from_secs(5);
/// Longest refresh interval accepted (longer requests are lowered to it); a KMS list is valid for a week.
pub const MAX_REFRESH: Duration = Duration::from_secs(6 * 3600);
/// The refresh interval when none is configured.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(600);
/// Delay before retrying a failed fetch (bounded by the interval).
pub const RETRY_AFTER_ERROR: Duration = Duration::from_secs(30);

fn crl_err(msg: impl Into<String>) -> RaTlsError {
    RaTlsError::Crl(msg.into())
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One pinned CA and what we know of its list.
#[derive(Debug)]
struct Issuer {
    cert_der: Vec<u8>,
    /// DER of the CA's subject Name (what its certificates and its CRL name as issuer).
    subject: Vec<u8>,
    label: String,
    required: bool,
    list: Option<Arc<RevocationList>>,
    last_error: Option<String>,
}

impl Issuer {
    fn describe_missing(&self) -> String {
        let why = self
            .last_error
            .as_deref()
            .map_or_else(|| "none fetched yet".to_owned(), |e| format!("last attempt: {e}"));
        format!("no revocation list from CA {:?} is installed ({why})", self.label)
    }
}

/// What the set knows about one CA (for logs, status pages and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerStatus {
    /// The CA's subject.
    pub issuer: String,
    pub required: bool,
    pub crl_number: Option<u64>,
    pub next_update: Option<u64>,
    pub last_error: Option<String>,
}

/// Verified revocation lists by issuing CA; shared by verifiers and refreshers (see the module docs).
#[derive(Debug, Default)]
pub struct RevocationSet {
    issuers: RwLock<Vec<Issuer>>,
}

fn subject_of(ca_cert_der: &[u8]) -> Result<(Vec<u8>, String), RaTlsError> {
    let cert = Certificate::from_der(ca_cert_der).map_err(|e| crl_err(format!("CA certificate: {e}")))?;
    let subject = cert.tbs_certificate().subject();
    let der = subject
        .to_der()
        .map_err(|e| crl_err(format!("CA certificate subject: {e}")))?;
    Ok((der, subject.to_string()))
}

impl RevocationSet {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Issuer>> {
        self.issuers.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Issuer>> {
        self.issuers.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Pins a CA whose lists this set accepts. Adding the same CA again keeps its list; `required` is sticky.
    pub fn add_issuer(&self, ca_cert_der: &[u8], required: bool) -> Result<(), RaTlsError> {
        let (subject, label) = subject_of(ca_cert_der)?;
        let mut issuers = self.write();
        if let Some(i) = issuers.iter_mut().find(|i| i.cert_der == ca_cert_der) {
            i.required |= required;
            return Ok(());
        }
        if issuers.iter().any(|i| i.subject == subject) {
            return Err(crl_err(format!(
                "another CA named {label:?} is already pinned; CRLs are matched by issuer name"
            )));
        }
        issuers.push(Issuer {
            cert_der: ca_cert_der.to_vec(),
            subject,
            label,
            required,
            list: None,
            last_error: None,
        });
        Ok(())
    }

    /// Verifies `crl_der` with the pinned CA its issuer names and installs it (see [`Self::install`]).
    pub fn update_der(&self, crl_der: &[u8], now: u64) -> Result<Arc<RevocationList>, RaTlsError> {
        let crl = CertificateList::<x509_cert::certificate::Rfc5280>::from_der(crl_der)
            .map_err(|e| crl_err(format!("not a DER CRL: {e}")))?;
        let name = crl
            .tbs_cert_list
            .issuer
            .to_der()
            .map_err(|e| crl_err(format!("CRL issuer: {e}")))?;
        let ca = self
            .read()
            .iter()
            .find(|i| i.subject == name)
            .map(|i| i.cert_der.clone())
            .ok_or_else(|| crl_err(format!("CRL issuer {} is not a pinned CA", crl.tbs_cert_list.issuer)))?;
        self.update_der_from(&ca, crl_der, now)
    }

    /// Verifies `crl_der` with the pinned CA `ca_cert_der` and installs it; a failure is recorded for that CA.
    pub fn update_der_from(
        &self,
        ca_cert_der: &[u8],
        crl_der: &[u8],
        now: u64,
    ) -> Result<Arc<RevocationList>, RaTlsError> {
        match RevocationList::from_der(crl_der, ca_cert_der, now) {
            Ok(list) => self.install(Arc::new(list)),
            Err(e) => {
                self.record_error(ca_cert_der, &e.to_string());
                Err(e)
            }
        }
    }

    /// Installs a list verified elsewhere for the pinned CA it names (its issuer must be pinned). A list
    /// numbered lower than the installed one is refused (rollback); an equal number with an older
    /// thisUpdate leaves the installed list in place. Returns the list now in force.
    pub fn install(&self, list: Arc<RevocationList>) -> Result<Arc<RevocationList>, RaTlsError> {
        let mut issuers = self.write();
        let issuer = issuers
            .iter_mut()
            .find(|i| i.subject == list.issuer_name_der())
            .ok_or_else(|| crl_err("the list's issuer is not a pinned CA"))?;
        if let Some(cur) = &issuer.list {
            let (c, n) = (cur.content(), list.content());
            if n.crl_number < c.crl_number {
                let msg = format!(
                    "revocation list #{} is older than the installed #{} (rollback refused)",
                    n.crl_number, c.crl_number
                );
                issuer.last_error = Some(msg.clone());
                return Err(crl_err(msg));
            }
            if n.crl_number == c.crl_number && n.this_update < c.this_update {
                issuer.last_error = None;
                return Ok(Arc::clone(cur));
            }
        }
        issuer.list = Some(Arc::clone(&list));
        issuer.last_error = None;
        Ok(list)
    }

    /// Records why the last refresh for `ca_cert_der` failed (the installed list, if any, stays).
    pub fn record_error(&self, ca_cert_der: &[u8], error: &str) {
        if let Some(i) = self.write().iter_mut().find(|i| i.cert_der == ca_cert_der) {
            i.last_error = Some(error.to_owned());
        }
    }

    /// Removes every installed list (the pinned CAs stay).
    pub fn clear_lists(&self) {
        for i in self.write().iter_mut() {
            i.list = None;
        }
    }

    pub fn status(&self) -> Vec<IssuerStatus> {
        self.read()
            .iter()
            .map(|i| IssuerStatus {
                issuer: i.label.clone(),
                required: i.required,
                crl_number: i.list.as_ref().map(|l| l.content().crl_number),
                next_update: i.list.as_ref().map(|l| l.content().next_update),
                last_error: i.last_error.clone(),
            })
            .collect()
    }

    /// The list installed for the CA `ca_cert_der`.
    pub fn list_for(&self, ca_cert_der: &[u8]) -> Option<Arc<RevocationList>> {
        self.read()
            .iter()
            .find(|i| i.cert_der == ca_cert_der)
            .and_then(|i| i.list.clone())
    }

    /// Checks a presented chain (leaf first, as received) at `now` (UNIX seconds); see the module docs.
    /// The refusal names the revoked serial (or app rule) and the list.
    pub fn check_chain<'a>(&self, chain: impl IntoIterator<Item = &'a [u8]>, now: u64) -> Result<(), RaTlsError> {
        let issuers = self.read();
        if issuers.is_empty() {
            return Ok(());
        }
        let mut certs = Vec::new();
        for (n, der) in chain.into_iter().enumerate() {
            let cert = Certificate::from_der(der)
                .map_err(|e| RaTlsError::Certificate(format!("chain certificate #{n}: {e}")))?;
            let issuer = cert
                .tbs_certificate()
                .issuer()
                .to_der()
                .map_err(|e| RaTlsError::Certificate(format!("chain certificate #{n} issuer: {e}")))?;
            certs.push((der, issuer));
        }
        for ca in issuers.iter() {
            if !certs.iter().any(|(_, issuer)| *issuer == ca.subject) {
                continue;
            }
            let Some(list) = &ca.list else {
                if ca.required {
                    return Err(crl_err(format!("revocation status unknown: {}", ca.describe_missing())));
                }
                continue;
            };
            list.check_current(now)?;
            for (der, _) in &certs {
                if *der != ca.cert_der.as_slice() {
                    list.check(der)?;
                }
            }
        }
        Ok(())
    }
}

/// A boxed CRL fetch: the DER list or a message saying why not.
pub type CrlFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + 'a>>;

/// Where a refresher gets the DER CRL (e.g. a `Revocation.GetCrl` client). Closures returning a future work.
pub trait CrlSource: Send + Sync {
    fn fetch(&self) -> CrlFuture<'_>;
}

impl<F, Fut> CrlSource for F
where
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = Result<Vec<u8>, String>> + Send + 'static,
{
    fn fetch(&self) -> CrlFuture<'_> {
        Box::pin(self())
    }
}

/// Keeps one pinned CA's list in a [`RevocationSet`] current by fetching it periodically.
pub struct CrlRefresher {
    set: Arc<RevocationSet>,
    ca_cert_der: Vec<u8>,
    source: Box<dyn CrlSource>,
    interval: Duration,
}

impl std::fmt::Debug for CrlRefresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrlRefresher")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl CrlRefresher {
    /// Pins `ca_cert_der` in `set` (with `required`) and refreshes its list from `source` every `interval`,
    /// clamped to [`MIN_REFRESH`]..=[`MAX_REFRESH`].
    pub fn new(
        set: Arc<RevocationSet>,
        ca_cert_der: &[u8],
        required: bool,
        source: impl CrlSource + 'static,
        interval: Duration,
    ) -> Result<Self, RaTlsError> {
        set.add_issuer(ca_cert_der, required)?;
        Ok(Self {
            set,
            ca_cert_der: ca_cert_der.to_vec(),
            source: Box::new(source),
            interval: interval.clamp(MIN_REFRESH, MAX_REFRESH),
        })
    }

    /// The effective interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// One fetch, verification and install; on failure the previous list stays and the error is recorded.
    pub async fn refresh_once(&self, now: u64) -> Result<Arc<RevocationList>, RaTlsError> {
        let der = match self.source.fetch().await {
            Ok(der) => der,
            Err(e) => {
                let e = crl_err(format!("fetching the revocation list: {e}"));
                self.set.record_error(&self.ca_cert_der, &e.to_string());
                return Err(e);
            }
        };
        self.set.update_der_from(&self.ca_cert_der, &der, now)
    }

    /// When to refresh next: the interval, sooner when the list reaches half of its remaining validity or
    /// after a failure.
    pub fn next_delay(&self, result: &Result<Arc<RevocationList>, RaTlsError>, now: u64) -> Duration {
        let delay = match result {
            Ok(list) => Duration::from_secs(list.content().next_update.saturating_sub(now) / 2),
            Err(_) => RETRY_AFTER_ERROR,
        };
        delay.clamp(MIN_REFRESH, self.interval.max(MIN_REFRESH))
    }

    /// Refreshes forever (spawn it; abort the task to stop).
    pub async fn run(self) {
        loop {
            let now = now_secs();
            let result = self.refresh_once(now).await;
            match &result {
                Ok(list) => tracing::debug!(
                    crl_number = list.content().crl_number,
                    revoked = list.content().serials.len(),
                    "revocation list refreshed"
                ),
                Err(e) => tracing::warn!("revocation list refresh failed (keeping the last good list): {e}"),
            }
            tokio::time::sleep(self.next_delay(&result, now)).await;
        }
    }

    /// Spawns [`Self::run`] on the current tokio runtime.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run())
    }
}

#[cfg(test)]
#[path = "crl_tests.rs"]
mod tests;
