//! Whole-sequence tests against a temporary root (data dir used as is, no Docker).

use super::*;
use crate::boot::keys::{KeyError, KeySource, KmsKeys};
use crate::boot::measure::RecordingMeasurer;
use dstack_types::KeyProvider;

// Expected hashes computed independently with Python hashlib.sha256 over these exact bytes.
const NONE_COMPOSE: &str = r#"{"init_script":"echo hi","manifest_version":"2","name":"t","runner":"bash","bash_script":"true","allowed_envs":["A"]}"#;
const NONE_COMPOSE_SHA256: &str = "12f2a3005ce4643725070d7da8043ef3331bc90ff6e4bc8d5106292230915ebf";
const ECHO_HI_SHA256: &str = "56a79f3b115448072387c2480044bfa2cf8f90e4f5fddd8c943b4e051b81f80b";
const KMS_COMPOSE: &str =
    r#"{"key_provider":"kms","manifest_version":"2","name":"k","runner":"bash","bash_script":"true"}"#;
const KMS_COMPOSE_SHA256: &str = "0324fd8a762c39d5b0953b90901ada913e5b292f3bcd2b0207e101818227497c";

struct Env {
    _root: tempfile::TempDir,
    host: tempfile::TempDir,
    env: BootEnv,
}

fn setup(compose: &str) -> Env {
    let host = config::tests::host_dir(compose);
    let root = tempfile::tempdir().unwrap();
    let env = BootEnv {
        root: root.path().to_owned(),
        host_shared: HostSharedSource::Dir(host.path().to_owned()),
        data: DataDisk::Directory,
        host_api: None,
        start_app: false,
    };
    Env { _root: root, host, env }
}

#[test]
fn none_provider_event_order_and_payloads() {
    let t = setup(NONE_COMPOSE);
    let m = RecordingMeasurer::default();
    let deps = Deps {
        measurer: &m,
        kms: None,
        state: None,
        agent: None,
        gateway: None,
    };
    let report = run(&t.env, &deps).unwrap();
    assert_eq!(
        m.names(),
        [
            "system-preparing",
            "app-id",
            "compose-hash",
            "init-script-hash",
            "instance-id",
            "boot-mr-done",
            "key-provider",
            "storage-fs",
            "system-ready"
        ]
    );
    let ev = m.events();
    assert!(ev[0].payload.is_empty());
    assert_eq!(hex::encode(&ev[1].payload), &NONE_COMPOSE_SHA256[..40]);
    assert_eq!(hex::encode(&ev[2].payload), NONE_COMPOSE_SHA256);
    assert_eq!(hex::encode(&ev[3].payload), ECHO_HI_SHA256);
    assert_eq!(ev[4].payload, report.identity.instance_id_bytes());
    assert_eq!(ev[4].payload.len(), 20);
    assert!(ev[5].payload.is_empty());
    assert_eq!(ev[6].payload, br#"{"name":"none","id":""}"#);
    assert_eq!(ev[7].payload, b"directory");
    assert!(ev[8].payload.is_empty());
    // Files written for later steps and the agent.
    let shared = t.env.shared_dir();
    let keys = AppKeys::from_slice(&std::fs::read(t.env.app_keys_path()).unwrap()).unwrap();
    assert_eq!(keys.disk_crypt_key, report.keys.disk_crypt_key);
    let info = InstanceInfo::from_slice(&std::fs::read(shared.join(names::INSTANCE_INFO)).unwrap()).unwrap();
    assert_eq!(info.instance_id, ev[4].payload);
    assert_eq!(std::fs::read(shared.join(names::DECRYPTED_ENV)).unwrap(), b"");
}

#[test]
fn none_provider_gets_a_fresh_instance_every_boot() {
    let t = setup(NONE_COMPOSE);
    let m = RecordingMeasurer::default();
    let deps = Deps {
        measurer: &m,
        kms: None,
        state: None,
        agent: None,
        gateway: None,
    };
    let a = run(&t.env, &deps).unwrap();
    // The host stores what we reported and hands it back next boot.
    std::fs::copy(
        t.env.shared_dir().join(names::INSTANCE_INFO),
        t.host.path().join(names::INSTANCE_INFO),
    )
    .unwrap();
    let b = run(&t.env, &deps).unwrap();
    assert_eq!(a.identity.app_id, b.identity.app_id);
    assert_ne!(
        a.identity.instance_id, b.identity.instance_id,
        "none: disk is ephemeral, seed is not reused"
    );
    assert_ne!(a.keys.disk_crypt_key, b.keys.disk_crypt_key);
}

/// A KMS stand-in: fixed keys, as a real KMS returns the same keys for the same app and instance.
struct FakeKms {
    pubkey: Vec<u8>,
}

impl KeySource for FakeKms {
    fn get_app_keys(&self, urls: &[String], vm_config: &str, _pin: &[u8]) -> Result<KmsKeys, KeyError> {
        assert_eq!(urls, ["https://10.0.0.1:8000"]);
        assert!(vm_config.contains("cpu_count"));
        let secret = [9u8; 32];
        Ok(KmsKeys {
            keys: AppKeys {
                disk_crypt_key: vec![1; 32],
                env_crypt_key: secret.to_vec(),
                k256_key: vec![3; 32],
                k256_signature: vec![4; 65],
                gateway_app_id: String::new(),
                ca_cert: String::new(),
                key_provider: KeyProvider::Kms {
                    url: urls[0].clone(),
                    pubkey: self.pubkey.clone(),
                    tmp_ca_key: String::new(),
                    tmp_ca_cert: String::new(),
                },
            },
            os_image_hash: vec![0xee; 32],
        })
    }
}

fn kms_setup(compose: &str) -> Env {
    let t = setup(compose);
    let sys = config::tests::SYS_CONFIG.replace(r#""kms_urls":[]"#, r#""kms_urls":["https://10.0.0.1:8000"]"#);
    std::fs::write(t.host.path().join(names::SYS_CONFIG), sys).unwrap();
    t
}

#[test]
fn kms_provider_persists_seed_and_measures_provider() {
    let t = kms_setup(KMS_COMPOSE);
    let kms = FakeKms {
        pubkey: vec![0x30, 0x59],
    };
    let m = RecordingMeasurer::default();
    let deps = Deps {
        measurer: &m,
        kms: Some(&kms),
        state: None,
        agent: None,
        gateway: None,
    };
    let a = run(&t.env, &deps).unwrap();
    assert!(a.identity.seed_is_new);
    assert_eq!(a.identity.app_id.to_hex(), &KMS_COMPOSE_SHA256[..40]);
    let names: Vec<String> = m.names();
    let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
    assert!(pos("boot-mr-done") < pos("os-image-hash"));
    assert_eq!(pos("os-image-hash") + 1, pos("key-provider"));
    assert_eq!(
        m.events()[pos("key-provider")].payload,
        br#"{"name":"kms","id":"3059"}"#
    );
    assert_eq!(m.events()[pos("os-image-hash")].payload, [0xee; 32]);

    std::fs::copy(
        t.env.shared_dir().join(names::INSTANCE_INFO),
        t.host.path().join(names::INSTANCE_INFO),
    )
    .unwrap();
    let b = run(&t.env, &deps).unwrap();
    assert!(!b.identity.seed_is_new);
    assert_eq!(
        a.identity.instance_id, b.identity.instance_id,
        "seed persisted through the host"
    );
}

#[test]
fn kms_pin_mismatch_stops_before_disk() {
    let t = kms_setup(&KMS_COMPOSE.replace(
        r#""key_provider":"kms""#,
        r#""key_provider":"kms","key_provider_id":"aaaa""#,
    ));
    let kms = FakeKms {
        pubkey: vec![0x30, 0x59],
    };
    let m = RecordingMeasurer::default();
    let deps = Deps {
        measurer: &m,
        kms: Some(&kms),
        state: None,
        agent: None,
        gateway: None,
    };
    let err = run(&t.env, &deps).unwrap_err();
    assert!(
        matches!(err, BootError::Keys(keys::KeyError::PinMismatch { .. })),
        "{err}"
    );
    assert!(!m.names().contains(&"storage-fs".to_owned()));
    assert!(!t.env.app_keys_path().exists());
}

#[test]
fn pinned_app_id_only_for_kms() {
    let info = r#"{"app_id":"1111111111111111111111111111111111111111"}"#;
    let t = setup(NONE_COMPOSE);
    std::fs::write(t.host.path().join(names::INSTANCE_INFO), info).unwrap();
    let shared = intake(&t.env).unwrap();
    assert_eq!(identity(&shared).unwrap().app_id.to_hex(), &NONE_COMPOSE_SHA256[..40]);
    let t = kms_setup(KMS_COMPOSE);
    std::fs::write(t.host.path().join(names::INSTANCE_INFO), info).unwrap();
    let shared = intake(&t.env).unwrap();
    assert_eq!(identity(&shared).unwrap().app_id.to_hex(), "11".repeat(20));
}

#[test]
fn encrypted_env_is_decrypted_and_filtered() {
    let t = kms_setup(&KMS_COMPOSE.replace(r#""name":"k""#, r#""name":"k","allowed_envs":["A"]"#));
    let public = dstack_keys::app_keys::x25519_public(&[9; 32]);
    let blob = dstack_keys::encrypt_env(
        &public,
        &[dstack_keys::EnvVar::new("A", "1"), dstack_keys::EnvVar::new("B", "2")],
    )
    .unwrap();
    std::fs::write(t.host.path().join(names::ENCRYPTED_ENV), blob).unwrap();
    let kms = FakeKms { pubkey: vec![] };
    let m = RecordingMeasurer::default();
    run(
        &t.env,
        &Deps {
            measurer: &m,
            kms: Some(&kms),
            state: None,
            agent: None,
            gateway: None,
        },
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(t.env.shared_dir().join(names::DECRYPTED_ENV)).unwrap(),
        "A=1\n"
    );
    assert_eq!(env_pairs(&t.env.shared_dir()), [("A".to_owned(), "1".to_owned())]);
}

#[test]
fn no_tee_stops_at_the_first_event() {
    let t = setup(NONE_COMPOSE);
    let err = run(
        &t.env,
        &Deps {
            measurer: &measure::NoTee,
            kms: None,
            state: None,
            agent: None,
            gateway: None,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("system-preparing"), "{err}");
    assert!(!t.env.app_keys_path().exists(), "no keys without measurement");
}

/// Fault injection on the host-shared files: truncated or corrupted (NUL byte in the middle) copies of each
/// file must stop the boot before any key is provisioned, with an error naming the file.
#[test]
fn truncated_or_corrupt_host_files_fail_closed() {
    let info = br#"{"instance_id_seed":"00112233445566778899aabbccddeeff00112233","instance_id":"","app_id":""}"#;
    for (name, good) in [
        (names::APP_COMPOSE, NONE_COMPOSE.as_bytes()),
        (names::SYS_CONFIG, config::tests::SYS_CONFIG.as_bytes()),
        (names::INSTANCE_INFO, &info[..]),
    ] {
        let mut corrupt = good.to_vec();
        corrupt.insert(good.len() / 2, 0);
        let variants = [
            ("empty", Vec::new()),
            ("one byte", good[..1].to_vec()),
            ("half", good[..good.len() / 2].to_vec()),
            ("last byte missing", good[..good.len() - 1].to_vec()),
            ("NUL in the middle", corrupt),
        ];
        for (what, bytes) in variants {
            let t = setup(NONE_COMPOSE);
            std::fs::write(t.host.path().join(name), &bytes).unwrap();
            let m = RecordingMeasurer::default();
            let deps = Deps {
                measurer: &m,
                kms: None,
                state: None,
                agent: None,
                gateway: None,
            };
            let err = match run(&t.env, &deps) {
                Ok(_) => panic!("{name} {what}: boot succeeded"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(name), "{name} {what}: error does not name the file: {err}");
            assert!(
                !m.names().iter().any(|n| n == "key-provider" || n == "system-ready"),
                "{name} {what}: boot went on to {:?}",
                m.names()
            );
            assert!(!t.env.app_keys_path().exists(), "{name} {what}: keys written");
        }
    }
}
