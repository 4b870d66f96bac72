//! Certificate revocation: what the admin revoked (`Admin.RevokeCerts`), persisted as `revocations.json` in
//! `cert_dir` (written atomically), and the CRL the KMS publishes from it (`Revocation.GetCrl`, also
//! `GET /prpc/GetCrl` on the KMS RPC listener, no client certificate needed).
//!
//! The CRL is an X.509 v2 CRL signed by the KMS root CA (see [`dstack_ra_tls::revocation`] for its contents and
//! the app-wide rule extension). Each publication is valid for [`CRL_VALIDITY_SECS`]; the KMS re-signs it when
//! half of that has passed or after every change, and the CRL number grows with every change.
//!
//! The KMS honours its own list: a caller presenting a certificate chain under the root CA (an app certificate
//! from `SignCert`) is refused when the list covers it ([`RevocationStore::check_chain`]).
//!
//! Replication ([`crate::replication`]): a replica merges the source's verified CRL into its own state
//! ([`RevocationStore::merge_crl`]): serials and app rules are added, never removed, and the CRL number becomes
//! at least the source's, so a replica's list is never numbered below what it has copied.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use dstack_ra_tls::{AppRevocation, CaCert, CrlContent, RevocationSet, RevokedSerial, build_crl};
use serde::{Deserialize, Serialize};

use crate::KmsError;
use crate::store::write_atomic;

/// File in `cert_dir`.
pub const REVOCATIONS_FILE: &str = "revocations.json";
/// Validity of a published CRL (nextUpdate − thisUpdate).
pub const CRL_VALIDITY_SECS: u64 = 7 * 86_400;
/// Largest serial accepted (RFC 5280: 20 octets).
const MAX_SERIAL: usize = 20;

/// The persisted state (serials and app ids as lowercase hex).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocations {
    /// Bumped on every change; the published CRL carries it.
    pub crl_number: u64,
    pub serials: Vec<SerialEntry>,
    pub apps: Vec<AppEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialEntry {
    pub serial: String,
    pub revoked_at: u64,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppEntry {
    pub app_id: String,
    pub issued_before: u64,
    pub revoked_at: u64,
    #[serde(default)]
    pub reason: String,
}

/// One admin request.
#[derive(Debug, Clone, Default)]
pub struct RevokeRequest {
    /// Hex serials (an optional `0x` prefix and `:` separators are accepted).
    pub serials: Vec<String>,
    /// With `issued_before`: revoke every certificate of this app issued earlier.
    pub app_id: Vec<u8>,
    pub issued_before: u64,
    pub reason: String,
}

/// A published CRL.
#[derive(Debug, Clone)]
pub struct PublishedCrl {
    pub der: Vec<u8>,
    pub crl_number: u64,
    pub this_update: u64,
    /// The same list, verified and installed for the root CA (what [`RevocationStore::check_chain`] consults).
    pub set: Arc<RevocationSet>,
}

/// Normalizes a hex serial: lowercase, no leading zero bytes.
fn parse_serial(text: &str) -> Result<String, String> {
    let t = text.trim();
    let t = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
    let t: String = t.chars().filter(|c| *c != ':').collect();
    let t = if t.len() % 2 == 1 { format!("0{t}") } else { t };
    let bytes = hex::decode(&t).map_err(|e| format!("serial {text:?}: {e}"))?;
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    let bytes = bytes.get(first..).unwrap_or_default();
    if bytes.is_empty() || bytes.len() > MAX_SERIAL {
        return Err(format!("serial {text:?}: must be 1..={MAX_SERIAL} non-zero bytes"));
    }
    Ok(hex::encode(bytes))
}

/// The revocation state of one KMS (shared by the Admin and Revocation services).
#[derive(Debug)]
pub struct RevocationStore {
    path: PathBuf,
    state: Mutex<(Revocations, Option<Arc<PublishedCrl>>)>,
}

impl RevocationStore {
    /// Loads `cert_dir/revocations.json` (absent → nothing revoked; unreadable or invalid → error, so a KMS
    /// never publishes a list that silently forgot revocations).
    pub fn open(cert_dir: &std::path::Path) -> Result<Self, KmsError> {
        let path = cert_dir.join(REVOCATIONS_FILE);
        let state = match std::fs::read(&path) {
            Ok(data) => {
                serde_json::from_slice(&data).map_err(|e| KmsError::Storage(format!("{}: {e}", path.display())))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Revocations::default(),
            Err(e) => return Err(KmsError::Storage(format!("reading {}: {e}", path.display()))),
        };
        Ok(Self {
            path,
            state: Mutex::new((state, None)),
        })
    }

    pub fn snapshot(&self) -> Revocations {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    /// Applies a request, persists it, and invalidates the published CRL. Returns the new state.
    pub fn revoke(&self, req: &RevokeRequest, now: u64) -> Result<Revocations, KmsError> {
        let invalid = |m: String| KmsError::Config(format!("RevokeCerts: {m}"));
        let mut serials = Vec::new();
        for s in &req.serials {
            serials.push(parse_serial(s).map_err(invalid)?);
        }
        let app = match (req.app_id.is_empty(), req.issued_before) {
            (true, 0) => None,
            (false, t) if t > 0 => Some(hex::encode(&req.app_id)),
            _ => return Err(invalid("app_id and issued_before must be given together".into())),
        };
        if serials.is_empty() && app.is_none() {
            return Err(invalid(
                "nothing to revoke: give serial_numbers and/or app_id + issued_before".into(),
            ));
        }
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = guard.0.clone();
        add_serials(&mut next, serials, now, &req.reason);
        if let Some(app_id) = app {
            add_app_rule(&mut next, app_id, req.issued_before, now, &req.reason);
        }
        next.crl_number = next.crl_number.saturating_add(1);
        self.persist(&mut guard, next)
    }

    /// Writes `next` and makes it current (persist first: a change the caller saw succeed survives a crash).
    fn persist(
        &self,
        guard: &mut std::sync::MutexGuard<'_, (Revocations, Option<Arc<PublishedCrl>>)>,
        next: Revocations,
    ) -> Result<Revocations, KmsError> {
        let data =
            serde_json::to_vec_pretty(&next).map_err(|e| KmsError::Storage(format!("encoding revocations: {e}")))?;
        // A replica merges the source's list before its keys are stored: cert_dir may not exist yet (created
        // as the key store does, private).
        if let Some(dir) = self.path.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| KmsError::Storage(format!("creating {}: {e}", dir.display())))?;
        }
        write_atomic(&self.path, &data, 0o644)?;
        **guard = (next.clone(), None);
        Ok(next)
    }

    /// Merges another node's verified CRL (replication): adds the serials and app rules this state lacks and
    /// raises the CRL number to at least the source's (one more than ours when something was added). Returns
    /// whether anything changed; an unchanged state is not rewritten.
    pub fn merge_crl(&self, source: &CrlContent, now: u64, note: &str) -> Result<bool, KmsError> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = guard.0.clone();
        let serials = source.serials.iter().map(|r| {
            let first = r.serial.iter().position(|&b| b != 0).unwrap_or(r.serial.len());
            hex::encode(r.serial.get(first..).unwrap_or_default())
        });
        add_serials(&mut next, serials.filter(|s| !s.is_empty()), now, note);
        for a in &source.apps {
            add_app_rule(&mut next, hex::encode(&a.app_id), a.issued_before, now, note);
        }
        let added = next != guard.0;
        let number = if added {
            next.crl_number.saturating_add(1)
        } else {
            next.crl_number
        };
        next.crl_number = number.max(source.crl_number);
        if next == guard.0 {
            return Ok(false);
        }
        self.persist(&mut guard, next)?;
        Ok(true)
    }

    /// Refuses `chain` (leaf first, as presented) when this KMS's current list covers a certificate in it
    /// that was issued under `root_ca` (the error names the serial or app rule).
    pub fn check_chain(&self, root_ca: &CaCert, chain: &[&[u8]], now: u64) -> Result<(), KmsError> {
        let crl = self.crl(root_ca, now)?;
        crl.set.check_chain(chain.iter().copied(), now)?;
        Ok(())
    }
}

fn add_serials(next: &mut Revocations, serials: impl IntoIterator<Item = String>, now: u64, reason: &str) {
    for serial in serials {
        if !next.serials.iter().any(|e| e.serial == serial) {
            next.serials.push(SerialEntry {
                serial,
                revoked_at: now,
                reason: reason.to_owned(),
            });
        }
    }
}

/// One rule per app: a later cutoff covers everything an earlier one did.
fn add_app_rule(next: &mut Revocations, app_id: String, issued_before: u64, now: u64, reason: &str) {
    match next.apps.iter_mut().find(|e| e.app_id == app_id) {
        Some(e) => {
            if issued_before > e.issued_before {
                e.issued_before = issued_before;
                e.revoked_at = now;
                reason.clone_into(&mut e.reason);
            }
        }
        None => next.apps.push(AppEntry {
            app_id,
            issued_before,
            revoked_at: now,
            reason: reason.to_owned(),
        }),
    }
}

impl RevocationStore {
    /// The current CRL signed by `root_ca`, re-signed after a change or when half its validity has passed.
    pub fn crl(&self, root_ca: &CaCert, now: u64) -> Result<Arc<PublishedCrl>, KmsError> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = &guard.1
            && now.saturating_sub(c.this_update) < CRL_VALIDITY_SECS / 2
        {
            return Ok(Arc::clone(c));
        }
        let content = to_content(&guard.0, now)?;
        let der = build_crl(root_ca, &content)?;
        let set = RevocationSet::new();
        set.add_issuer(root_ca.cert_der(), true)?;
        set.update_der_from(root_ca.cert_der(), &der, now)?;
        let published = Arc::new(PublishedCrl {
            der,
            crl_number: content.crl_number,
            this_update: now,
            set,
        });
        guard.1 = Some(Arc::clone(&published));
        Ok(published)
    }
}

fn to_content(r: &Revocations, now: u64) -> Result<CrlContent, KmsError> {
    let bad = |what: &str, e: hex::FromHexError| KmsError::Storage(format!("{REVOCATIONS_FILE}: {what}: {e}"));
    let mut serials = Vec::with_capacity(r.serials.len());
    for s in &r.serials {
        serials.push(RevokedSerial {
            serial: hex::decode(&s.serial).map_err(|e| bad("serial", e))?,
            revoked_at: s.revoked_at,
        });
    }
    let mut apps = Vec::with_capacity(r.apps.len());
    for a in &r.apps {
        apps.push(AppRevocation {
            app_id: hex::decode(&a.app_id).map_err(|e| bad("app_id", e))?,
            issued_before: a.issued_before,
        });
    }
    Ok(CrlContent {
        crl_number: r.crl_number,
        this_update: now,
        next_update: now.saturating_add(CRL_VALIDITY_SECS),
        serials,
        apps,
    })
}

/// The `Revocation` RPC handler (served on the KMS RPC listener).
#[derive(Debug, Clone)]
pub struct CrlService {
    pub kms: crate::service::KmsService,
    pub store: Arc<RevocationStore>,
}

impl dstack_rpc::kms::RevocationRpc for CrlService {
    async fn get_crl(
        &self,
        _ctx: &dstack_rpc::CallContext,
        _req: dstack_rpc::Empty,
    ) -> Result<dstack_rpc::kms::GetCrlResponse, dstack_rpc::RpcError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let crl = self
            .store
            .crl(&self.kms.0.keys.root_ca, now)
            .map_err(|e| dstack_rpc::RpcError::Internal(format!("GetCrl: {e}")))?;
        Ok(dstack_rpc::kms::GetCrlResponse {
            crl_pem: dstack_ra_tls::revocation::crl_pem(&crl.der)
                .map_err(|e| dstack_rpc::RpcError::Internal(format!("GetCrl: {e}")))?,
            crl: crl.der.clone(),
            crl_number: crl.crl_number,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_normalized_and_validated() {
        assert_eq!(parse_serial("0x00AB:cd").unwrap(), "abcd");
        assert_eq!(parse_serial("abc").unwrap(), "0abc");
        assert!(parse_serial("zz").is_err());
        assert!(parse_serial("00").is_err());
        assert!(parse_serial(&"11".repeat(21)).is_err());
    }

    #[test]
    fn revocations_persist_and_merge() {
        let dir = tempfile::tempdir().unwrap();
        let store = RevocationStore::open(dir.path()).unwrap();
        assert!(store.revoke(&RevokeRequest::default(), 1).is_err());
        let half = RevokeRequest {
            app_id: vec![1; 20],
            ..Default::default()
        };
        assert!(store.revoke(&half, 1).unwrap_err().to_string().contains("together"));
        let r = RevokeRequest {
            serials: vec!["0a0b".into(), "0x0A0B".into()],
            app_id: vec![1; 20],
            issued_before: 100,
            reason: "key compromise".into(),
        };
        store.revoke(&r, 10).unwrap();
        let later = RevokeRequest {
            app_id: vec![1; 20],
            issued_before: 200,
            ..Default::default()
        };
        let state = store.revoke(&later, 20).unwrap();
        assert_eq!(state.crl_number, 2);
        assert_eq!(state.serials.len(), 1);
        assert_eq!(state.serials[0].serial, "0a0b");
        assert_eq!(state.apps.len(), 1);
        assert_eq!(state.apps[0].issued_before, 200);
        // A new store over the same directory sees the same state.
        assert_eq!(RevocationStore::open(dir.path()).unwrap().snapshot(), state);
        std::fs::write(dir.path().join(REVOCATIONS_FILE), b"{").unwrap();
        assert!(RevocationStore::open(dir.path()).is_err());
    }
}
