//! The MRCONFIGID a TD is launched with, binding it to its app configuration the way dstack's VMM does
//! (`use_mrconfigid`; layouts in `dstack_types::mr_config`, DESIGN.md / dstack-facts.md "mr_config_id"):
//!
//! - the compose names no key provider id: **V1** = `0x01 ‖ compose_hash ‖ 0…`;
//! - otherwise **V2** = `0x02 ‖ keccak256(compose_hash ‖ app_id ‖ key provider kind byte ‖ key_provider_id) ‖ 0…`,
//!   with `app_id` the one pinned in `.instance_info` if any, else `compose_hash[..20]`.
//!
//! `compose_hash` is SHA-256 of the raw `app-compose.json` bytes the guest reads (and extends into RTMR3), so a
//! verifier can check the quote's MRCONFIGID against the compose it expects without replaying RTMR3.

use dstack_types::mr_config::MR_CONFIG_ID_LEN;
use dstack_types::{AppCompose, AppComposeError, ConfigError, InstanceInfo, MrConfig, app_id, compose_hash};

/// Why the MRCONFIGID could not be derived.
#[derive(Debug, thiserror::Error)]
pub enum MrConfigError {
    #[error("app-compose.json: {0}")]
    Compose(#[from] AppComposeError),
    #[error(".instance_info: {0}")]
    InstanceInfo(#[from] ConfigError),
    #[error(".instance_info: app_id has {0} bytes, expected 20")]
    AppIdLength(usize),
}

/// The MRCONFIGID for the raw `app-compose.json` and, if present, the raw `.instance_info`.
pub fn for_app(compose_raw: &[u8], instance_info_raw: Option<&[u8]>) -> Result<[u8; MR_CONFIG_ID_LEN], MrConfigError> {
    let compose = AppCompose::from_slice(compose_raw)?;
    let hash = compose_hash(compose_raw);
    let key_provider_id = compose.key_provider_id();
    if key_provider_id.is_empty() {
        return Ok(MrConfig::V1 { compose_hash: &hash }.to_mr_config_id());
    }
    let pinned = match instance_info_raw {
        Some(raw) => {
            let info = InstanceInfo::from_slice(raw)?;
            match info.app_id.len() {
                0 => None,
                20 => {
                    let mut id = [0u8; 20];
                    id.copy_from_slice(&info.app_id);
                    Some(dstack_types::AppId(id))
                }
                n => return Err(MrConfigError::AppIdLength(n)),
            }
        }
        None => None,
    };
    let app = app_id(pinned, &hash);
    Ok(MrConfig::V2 {
        compose_hash: &hash,
        app_id: &app,
        key_provider: compose.key_provider(),
        key_provider_id: &key_provider_id,
    }
    .to_mr_config_id())
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMPOSE: &[u8] =
        br#"{"manifest_version":2,"name":"demo","runner":"docker-compose","docker_compose_file":"services: {}"}"#;
    /// `(b'\x01' + hashlib.sha256(COMPOSE).digest() + bytes(15)).hex()` (Python).
    const V1: &str = "012fbaf054f4559b7e5851871a79f3d7d7abfa3a9e51c429823f36d12bce2f079d000000000000000000000000000000";

    #[test]
    fn compose_without_key_provider_id_binds_v1() {
        assert_eq!(hex::encode(for_app(COMPOSE, None).unwrap()), V1);
        // An instance info changes nothing for V1.
        let info = br#"{"app_id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#;
        assert_eq!(hex::encode(for_app(COMPOSE, Some(info)).unwrap()), V1);
    }

    #[test]
    fn compose_with_key_provider_id_binds_v2_with_the_pinned_or_derived_app_id() {
        let compose = br#"{"manifest_version":2,"name":"demo","runner":"docker-compose","docker_compose_file":"services: {}","kms_enabled":true,"key_provider_id":"3059301306072a8648ce3d0201"}"#;
        let hash = compose_hash(compose);
        let kp_id = hex::decode("3059301306072a8648ce3d0201").unwrap();
        let v2 = |app: [u8; 20]| {
            MrConfig::V2 {
                compose_hash: &hash,
                app_id: &dstack_types::AppId(app),
                key_provider: dstack_types::KeyProviderKind::Kms,
                key_provider_id: &kp_id,
            }
            .to_mr_config_id()
        };
        let mut derived = [0u8; 20];
        derived.copy_from_slice(&hash.0[..20]);
        let id = for_app(compose, None).unwrap();
        assert_eq!(id[0], 2);
        assert_eq!(id, v2(derived));
        let pinned = br#"{"app_id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#;
        assert_eq!(for_app(compose, Some(pinned)).unwrap(), v2([0xaa; 20]));
        assert_ne!(for_app(compose, Some(pinned)).unwrap(), id);
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(matches!(for_app(b"{not json", None), Err(MrConfigError::Compose(_))));
    }
}
