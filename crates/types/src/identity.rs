//! App identities (dstack-compatible, DESIGN.md §3):
//! `compose_hash = sha256(raw app-compose.json)`, `app_id = instance_info.app_id` if set else
//! `compose_hash[..20]`, `instance_id = sha256(seed ‖ app_id)[..20]` (empty with `no_instance_id`).

use sha2::{Digest, Sha256};

use crate::{
    AppId, ComposeHash, Error, InstanceId, InstanceIdSeed,
    app_compose::{AppCompose, KeyProviderKind},
    sys_config::InstanceInfo,
};

/// SHA-256 of the raw bytes of `app-compose.json` as stored (never re-serialized).
pub fn compose_hash(raw: &[u8]) -> ComposeHash {
    ComposeHash(Sha256::digest(raw).into())
}

/// `app_id`: the pinned one if given, else the first 20 bytes of the compose hash.
pub fn app_id(pinned: Option<AppId>, compose_hash: &ComposeHash) -> AppId {
    pinned.unwrap_or_else(|| {
        let mut id = [0u8; 20];
        id.copy_from_slice(&compose_hash.0[..20]);
        AppId(id)
    })
}

/// `sha256(seed ‖ app_id)[..20]`.
pub fn instance_id(seed: &InstanceIdSeed, app_id: &AppId) -> InstanceId {
    let mut h = Sha256::new();
    h.update(seed.0);
    h.update(app_id.0);
    let digest = h.finalize();
    let mut id = [0u8; 20];
    id.copy_from_slice(&digest[..20]);
    InstanceId(id)
}

/// A fresh random 20-byte seed from the OS RNG.
pub fn random_seed() -> Result<InstanceIdSeed, Error> {
    let mut seed = [0u8; 20];
    getrandom::fill(&mut seed).map_err(|e| Error::Random(e.to_string()))?;
    Ok(InstanceIdSeed(seed))
}

/// Everything the guest measures about the app's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppIdentity {
    pub compose_hash: ComposeHash,
    pub app_id: AppId,
    /// `None` when `no_instance_id` is set (the RTMR3 `instance-id` event then has an empty payload).
    pub instance_id: Option<InstanceId>,
    /// The seed in use; report it back to the host (`instance.info`) when `seed_is_new`.
    pub seed: InstanceIdSeed,
    pub seed_is_new: bool,
}

impl AppIdentity {
    /// The `.instance_info` to report to the host.
    pub fn instance_info(&self) -> InstanceInfo {
        InstanceInfo {
            instance_id_seed: self.seed.0.to_vec(),
            instance_id: self.instance_id.map(|i| i.0.to_vec()).unwrap_or_default(),
            app_id: self.app_id.0.to_vec(),
        }
    }

    /// Instance id bytes as measured (20 bytes, or empty).
    pub fn instance_id_bytes(&self) -> &[u8] {
        self.instance_id.as_ref().map_or(&[], |i| &i.0[..])
    }
}

/// Resolves the identities like dstack's guest: the stored seed is reused only when the key provider is
/// not `none` (a reusable disk) and a seed is stored; otherwise a fresh one is drawn from `fresh_seed`.
pub fn resolve_identity(
    raw_compose: &[u8],
    compose: &AppCompose,
    info: &InstanceInfo,
    fresh_seed: impl FnOnce() -> Result<InstanceIdSeed, Error>,
) -> Result<AppIdentity, Error> {
    let hash = compose_hash(raw_compose);
    let pinned = if info.app_id.is_empty() {
        None
    } else {
        Some(AppId::from_slice(&info.app_id)?)
    };
    let app_id = app_id(pinned, &hash);
    let reuse = compose.key_provider() != KeyProviderKind::None && !info.instance_id_seed.is_empty();
    let (seed, seed_is_new) = if reuse {
        (InstanceIdSeed::from_slice(&info.instance_id_seed)?, false)
    } else {
        (fresh_seed()?, true)
    };
    let instance_id = if compose.no_instance_id() {
        None
    } else {
        Some(instance_id(&seed, &app_id))
    };
    Ok(AppIdentity {
        compose_hash: hash,
        app_id,
        instance_id,
        seed,
        seed_is_new,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected digests computed independently with Python's hashlib:
    //   hashlib.sha256(b'{"manifest_version":"2","name":"t","runner":"bash"}').hexdigest()
    const RAW: &[u8] = br#"{"manifest_version":"2","name":"t","runner":"bash"}"#;
    const RAW_SHA256: &str = "cb6e7acd3e0193b93299382ffed2f547576e49ea132478a00831eac09755086c";

    fn compose(kp: &str) -> AppCompose {
        let raw = format!(r#"{{"manifest_version":"2","name":"t","runner":"bash","key_provider":"{kp}"}}"#);
        AppCompose::from_slice(raw.as_bytes()).unwrap()
    }

    #[test]
    fn compose_hash_and_app_id_match_hashlib() {
        let h = compose_hash(RAW);
        assert_eq!(h.to_hex(), RAW_SHA256);
        assert_eq!(app_id(None, &h).to_hex(), &RAW_SHA256[..40]);
        let pinned = AppId([9; 20]);
        assert_eq!(app_id(Some(pinned), &h), pinned);
    }

    #[test]
    fn instance_id_matches_hashlib() {
        // hashlib.sha256(bytes([1]*20) + bytes([2]*20)).hexdigest()[:40]
        let id = instance_id(&InstanceIdSeed([1; 20]), &AppId([2; 20]));
        assert_eq!(id.to_hex(), "e3783929a196ec9479a1b1a4abb0a19873bb2e58");
    }

    #[test]
    fn seed_reused_only_with_key_provider() {
        let info = InstanceInfo {
            instance_id_seed: vec![1; 20],
            instance_id: vec![],
            app_id: vec![2; 20],
        };
        let fresh = || Ok(InstanceIdSeed([7; 20]));
        let kms = resolve_identity(RAW, &compose("kms"), &info, fresh).unwrap();
        assert!(!kms.seed_is_new);
        assert_eq!(kms.app_id, AppId([2; 20]));
        assert_eq!(
            kms.instance_id,
            Some(instance_id(&InstanceIdSeed([1; 20]), &AppId([2; 20])))
        );

        let none = resolve_identity(RAW, &compose("none"), &info, fresh).unwrap();
        assert!(none.seed_is_new);
        assert_eq!(none.seed, InstanceIdSeed([7; 20]));

        let empty = InstanceInfo::default();
        let fresh_kms = resolve_identity(RAW, &compose("kms"), &empty, fresh).unwrap();
        assert!(fresh_kms.seed_is_new);
        assert_eq!(fresh_kms.app_id.to_hex(), &RAW_SHA256[..40]);
        assert_eq!(fresh_kms.instance_info().instance_id_seed, vec![7; 20]);
    }

    #[test]
    fn no_instance_id_gives_empty() {
        let c = AppCompose::from_slice(br#"{"manifest_version":"2","name":"t","runner":"bash","no_instance_id":true}"#)
            .unwrap();
        let id = resolve_identity(RAW, &c, &InstanceInfo::default(), || Ok(InstanceIdSeed([7; 20]))).unwrap();
        assert_eq!(id.instance_id, None);
        assert!(id.instance_id_bytes().is_empty());
        assert!(id.instance_info().instance_id.is_empty());
    }

    #[test]
    fn bad_pinned_app_id_or_seed_rejected() {
        let info = InstanceInfo {
            instance_id_seed: vec![],
            instance_id: vec![],
            app_id: vec![1; 19],
        };
        let err = resolve_identity(RAW, &compose("kms"), &info, random_seed).unwrap_err();
        assert!(err.to_string().contains("AppId"), "{err}");
        let info = InstanceInfo {
            instance_id_seed: vec![1; 3],
            instance_id: vec![],
            app_id: vec![],
        };
        assert!(resolve_identity(RAW, &compose("kms"), &info, random_seed).is_err());
    }

    #[test]
    fn simulator_fixture_hash_matches_hashlib() {
        // hashlib.sha256(open("tests/fixtures/simulator-app-compose.json", "rb").read()).hexdigest()
        let raw = include_bytes!("../tests/fixtures/simulator-app-compose.json");
        let compose = AppCompose::from_slice(raw).unwrap();
        let id = resolve_identity(raw, &compose, &InstanceInfo::default(), || Ok(InstanceIdSeed([0; 20]))).unwrap();
        assert_eq!(
            id.compose_hash.to_hex(),
            "65b4e574f16973956908b6359920593c3b7d9f36f38e81a47f996a0c0d5435bb"
        );
        assert_eq!(id.app_id.to_hex(), "65b4e574f16973956908b6359920593c3b7d9f36");
    }

    #[test]
    fn random_seeds_differ() {
        assert_ne!(random_seed().unwrap(), random_seed().unwrap());
    }
}
