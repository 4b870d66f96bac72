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
//! ([`RevocationStore::merge_crl`]): serials and app rules are added, never removed. Revocations are made on the
//! source only (a replica refuses `RevokeCerts`, naming its source), so a replica's state is always a copy of a
//! source list: it takes the source's CRL number, revocation dates and order, and serves the source's signed CRL
//! byte for byte while that is fresh. One CRL number therefore always means one list, whichever node a verifier
//! asks. (A replica holding revocations of its own from an older version keeps numbering above the source's.)

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use dstack_ra_tls::{AppRevocation, CaCert, CrlContent, RevocationSet, RevokedSerial, build_crl};
use serde::{Deserialize, Serialize};

use crate::KmsError;
use crate::store::{create_private_dir, write_atomic};

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

/// A source KMS's CRL as fetched and verified (replication).
#[derive(Debug, Clone)]
pub struct SourceCrl {
    pub content: CrlContent,
    pub der: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    revocations: Revocations,
    /// What `GetCrl` serves until it is half expired.
    published: Option<Arc<PublishedCrl>>,
    /// The source's signed list when our state is exactly its content (served verbatim: see the module docs).
    mirror: Option<SourceCrl>,
}

/// The revocation state of one KMS (shared by the Admin and Revocation services).
#[derive(Debug)]
pub struct RevocationStore {
    path: PathBuf,
    state: Mutex<State>,
    /// The source KMS this replica follows; local revocations are refused then.
    follows: Mutex<Option<String>>,
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
            state: Mutex::new(State {
                revocations: state,
                ..State::default()
            }),
            follows: Mutex::new(None),
        })
    }

    pub fn snapshot(&self) -> Revocations {
        self.lock().revocations.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks this store as a replica of `source_url`: from now on revocations come from there only.
    pub fn follow(&self, source_url: &str) {
        *self.follows.lock().unwrap_or_else(|p| p.into_inner()) = Some(source_url.to_owned());
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
        if let Some(source) = self.follows.lock().unwrap_or_else(|p| p.into_inner()).as_deref() {
            return Err(invalid(format!(
                "this KMS is a replica following {source}: revoke there (one list per CRL number across the cluster)"
            )));
        }
        let mut guard = self.lock();
        let mut next = guard.revocations.clone();
        add_serials(&mut next, serials.into_iter().map(|s| (s, now)), &req.reason);
        if let Some(app_id) = app {
            add_app_rule(&mut next, app_id, req.issued_before, now, &req.reason);
        }
        next.crl_number = next.crl_number.saturating_add(1);
        self.persist(&mut guard, next)
    }

    /// Writes `next` and makes it current (persist first: a change the caller saw succeed survives a crash).
    fn persist(&self, guard: &mut State, next: Revocations) -> Result<Revocations, KmsError> {
        let data =
            serde_json::to_vec_pretty(&next).map_err(|e| KmsError::Storage(format!("encoding revocations: {e}")))?;
        // A replica merges the source's list before its keys are stored: cert_dir may not exist yet (created
        // as the key store does, private).
        if let Some(dir) = self.path.parent() {
            create_private_dir(dir)?;
        }
        write_atomic(&self.path, &data, 0o644)?;
        *guard = State {
            revocations: next.clone(),
            ..State::default()
        };
        Ok(next)
    }

    /// Merges a source node's verified CRL (replication) and returns whether our state changed (an unchanged
    /// state is not rewritten). When we hold nothing the source lacks, our state becomes exactly the source's
    /// list (its number, dates and order) and its signed bytes are what we serve; otherwise (revocations of our
    /// own) the lists are united and numbered above both.
    pub fn merge_crl(&self, source: &SourceCrl, now: u64, note: &str) -> Result<bool, KmsError> {
        let src = &source.content;
        let mut guard = self.lock();
        let ours = &guard.revocations;
        let src_serials: Vec<(String, u64)> = src
            .serials
            .iter()
            .map(|r| {
                let first = r.serial.iter().position(|&b| b != 0).unwrap_or(r.serial.len());
                (hex::encode(r.serial.get(first..).unwrap_or_default()), r.revoked_at)
            })
            .filter(|(s, _)| !s.is_empty())
            .collect();
        let src_apps: Vec<(String, u64)> = src
            .apps
            .iter()
            .map(|a| (hex::encode(&a.app_id), a.issued_before))
            .collect();
        let own_serial = ours
            .serials
            .iter()
            .any(|e| !src_serials.iter().any(|(s, _)| *s == e.serial));
        let own_rule = ours.apps.iter().any(|e| {
            !src_apps
                .iter()
                .any(|(id, before)| *id == e.app_id && *before >= e.issued_before)
        });
        let copy = !own_serial && !own_rule && ours.crl_number <= src.crl_number;
        let next = if copy {
            // Our reasons for entries we already had; the note for new ones.
            let reason = |old: Option<&String>| old.cloned().unwrap_or_else(|| note.to_owned());
            Revocations {
                crl_number: src.crl_number,
                serials: src_serials
                    .iter()
                    .map(|(serial, revoked_at)| SerialEntry {
                        reason: reason(ours.serials.iter().find(|e| e.serial == *serial).map(|e| &e.reason)),
                        serial: serial.clone(),
                        revoked_at: *revoked_at,
                    })
                    .collect(),
                apps: src
                    .apps
                    .iter()
                    .zip(&src_apps)
                    .map(|(a, (app_id, _))| {
                        let old = ours
                            .apps
                            .iter()
                            .find(|e| e.app_id == *app_id && e.issued_before == a.issued_before);
                        AppEntry {
                            app_id: app_id.clone(),
                            issued_before: a.issued_before,
                            revoked_at: old.map_or(src.this_update, |e| e.revoked_at),
                            reason: reason(old.map(|e| &e.reason)),
                        }
                    })
                    .collect(),
            }
        } else {
            let mut next = ours.clone();
            add_serials(&mut next, src_serials.iter().cloned(), note);
            for (app_id, before) in &src_apps {
                add_app_rule(&mut next, app_id.clone(), *before, now, note);
            }
            // Our list differs from the source's: number it above both.
            let grown = u64::from(next != *ours);
            next.crl_number = ours
                .crl_number
                .saturating_add(grown)
                .max(src.crl_number.saturating_add(1));
            next
        };
        let changed = next != guard.revocations;
        if changed {
            self.persist(&mut guard, next)?;
        }
        // Serve the source's own bytes when they say exactly what we hold and are fresher than ours.
        let fresher = guard
            .published
            .as_ref()
            .is_none_or(|p| src.this_update >= p.this_update);
        if copy
            && fresher
            && guard
                .mirror
                .as_ref()
                .is_none_or(|m| src.this_update >= m.content.this_update)
        {
            guard.mirror = Some(source.clone());
            guard.published = None;
        }
        Ok(changed)
    }

    /// Refuses `chain` (leaf first, as presented) when this KMS's current list covers a certificate in it
    /// that was issued under `root_ca` (the error names the serial or app rule).
    pub fn check_chain(&self, root_ca: &CaCert, chain: &[&[u8]], now: u64) -> Result<(), KmsError> {
        let crl = self.crl(root_ca, now)?;
        crl.set.check_chain(chain.iter().copied(), now)?;
        Ok(())
    }
}

/// Adds `(serial, revoked_at)` entries not yet listed.
fn add_serials(next: &mut Revocations, serials: impl IntoIterator<Item = (String, u64)>, reason: &str) {
    for (serial, revoked_at) in serials {
        if !next.serials.iter().any(|e| e.serial == serial) {
            next.serials.push(SerialEntry {
                serial,
                revoked_at,
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
    /// The current CRL: the source's signed list when we mirror it and it is less than half expired, else our
    /// own signed by `root_ca`; re-made after a change or when half its validity has passed.
    pub fn crl(&self, root_ca: &CaCert, now: u64) -> Result<Arc<PublishedCrl>, KmsError> {
        let mut guard = self.lock();
        let fresh = |this_update: u64| now.saturating_sub(this_update) < CRL_VALIDITY_SECS / 2;
        if let Some(c) = &guard.published
            && fresh(c.this_update)
        {
            return Ok(Arc::clone(c));
        }
        let mirrored = guard
            .mirror
            .as_ref()
            .filter(|m| m.content.crl_number == guard.revocations.crl_number && fresh(m.content.this_update))
            .map(|m| (m.der.clone(), m.content.this_update));
        let install = |der: &[u8]| -> Result<Arc<RevocationSet>, KmsError> {
            let set = RevocationSet::new();
            set.add_issuer(root_ca.cert_der(), true)?;
            set.update_der_from(root_ca.cert_der(), der, now)?;
            Ok(set)
        };
        // The mirrored list was verified when fetched; if it no longer installs (clock skew), sign our own.
        let (der, this_update, set) = match mirrored.and_then(|(der, t)| install(&der).ok().map(|set| (der, t, set))) {
            Some(m) => m,
            None => {
                let der = build_crl(root_ca, &to_content(&guard.revocations, now)?)?;
                let set = install(&der)?;
                (der, now, set)
            }
        };
        let published = Arc::new(PublishedCrl {
            der,
            crl_number: guard.revocations.crl_number,
            this_update,
            set,
        });
        guard.published = Some(Arc::clone(&published));
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

    fn root_ca() -> CaCert {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let req = dstack_ra_tls::CertRequest {
            subject: "Dstack KMS CA".into(),
            ca_level: Some(1),
            ..Default::default()
        };
        CaCert::self_signed(&req, key).unwrap()
    }

    fn fetched(store: &RevocationStore, root: &CaCert, now: u64) -> SourceCrl {
        let der = store.crl(root, now).unwrap().der.clone();
        let list = dstack_ra_tls::RevocationList::from_der(&der, root.cert_der(), now).unwrap();
        SourceCrl {
            content: list.content().clone(),
            der,
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn a_replica_publishes_the_source_list_under_the_source_number() {
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let root = root_ca();
        let t = now();
        let a = RevocationStore::open(dir_a.path()).unwrap();
        let revoke = |serial: &str, at: u64| {
            let r = RevokeRequest {
                serials: vec![serial.into()],
                ..Default::default()
            };
            a.revoke(&r, at).unwrap()
        };
        revoke("0a0b", t - 100);
        let app = RevokeRequest {
            app_id: vec![7; 20],
            issued_before: t - 50,
            ..Default::default()
        };
        a.revoke(&app, t - 90).unwrap();

        let b = RevocationStore::open(dir_b.path()).unwrap();
        b.follow("https://kms-a:8000");
        let from_a = fetched(&a, &root, t);
        assert!(b.merge_crl(&from_a, t + 5, "copied").unwrap());
        assert!(
            !b.merge_crl(&from_a, t + 6, "copied").unwrap(),
            "an unchanged list is not rewritten"
        );
        let published = b.crl(&root, t + 6).unwrap();
        assert_eq!(published.crl_number, 2);
        assert_eq!(
            published.der, from_a.der,
            "the replica serves the source's signed list verbatim"
        );
        let state = b.snapshot();
        assert_eq!(
            state.serials[0].revoked_at,
            t - 100,
            "revocation dates are the source's"
        );

        // Restarted without the source's bytes, the replica signs the same content under the same number.
        let b = RevocationStore::open(dir_b.path()).unwrap();
        b.follow("https://kms-a:8000");
        let own = fetched(&b, &root, t + 7);
        assert_eq!(own.content.crl_number, from_a.content.crl_number);
        assert_eq!(own.content.serials, from_a.content.serials);
        assert_eq!(own.content.apps, from_a.content.apps);

        // A later revocation on the source: the replica follows its number again.
        revoke("0c0d", t - 10);
        let from_a = fetched(&a, &root, t + 8);
        assert!(b.merge_crl(&from_a, t + 9, "copied").unwrap());
        assert_eq!(b.snapshot().crl_number, 3);
        assert_eq!(b.crl(&root, t + 9).unwrap().der, from_a.der);

        // Revoking on the replica would fork the numbering: refused, naming the source.
        let e = b
            .revoke(
                &RevokeRequest {
                    serials: vec!["0e0f".into()],
                    ..Default::default()
                },
                t,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("replica") && e.contains("https://kms-a:8000"), "{e}");
    }

    #[test]
    fn own_revocations_number_the_merged_list_above_both() {
        let (dir_a, dir_c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let root = root_ca();
        let t = now();
        let a = RevocationStore::open(dir_a.path()).unwrap();
        let c = RevocationStore::open(dir_c.path()).unwrap();
        for (store, serial) in [(&a, "0a"), (&a, "0b"), (&c, "0c")] {
            let r = RevokeRequest {
                serials: vec![serial.into()],
                ..Default::default()
            };
            store.revoke(&r, t - 10).unwrap();
        }
        // C (numbered 1, holding a serial A lacks) merges A's #2: the union is a third list, numbered 3.
        let from_a = fetched(&a, &root, t);
        assert!(c.merge_crl(&from_a, t, "copied").unwrap());
        let state = c.snapshot();
        assert_eq!(state.crl_number, 3);
        let serials: Vec<_> = state.serials.iter().map(|e| e.serial.as_str()).collect();
        assert_eq!(serials, ["0c", "0a", "0b"]);
        assert_ne!(c.crl(&root, t).unwrap().der, from_a.der);
    }
}
