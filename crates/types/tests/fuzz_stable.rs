//! Stable, bounded mutation fuzzing of the host-supplied configuration parsers (app-compose, sys-config,
//! instance info, app keys, vm_config): arbitrary bytes give a typed error, never a panic.
use dstack_testkit::{Budget, Mutator, run_with, seed_from_env};
use dstack_types::{AppCompose, AppKeys, InstanceInfo, SysConfig, VmConfig};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
}

/// JSON-aware tokens: wrong types, huge numbers, deep nesting, and this schema's field names.
fn json_mutator() -> Mutator {
    Mutator::new(seed_from_env()).with_dictionary([
        "null",
        "true",
        "-1",
        "18446744073709551616",
        "1e999",
        "\"\"",
        "[]",
        "{}",
        "[[[[[[[[[[[[[[[[",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "\"manifest_version\"",
        "\"runner\"",
        "\"docker_compose_file\"",
        "\"key_provider\"",
        "\"allowed_envs\"",
        "\"kms_urls\"",
        "\"vm_config\"",
        "\"memory\"",
        "\"os_image_hash\"",
        "\"disk_crypt_key\"",
        "\"key_provider_id\"",
        "\"instance_id\"",
        "\"app_id\"",
    ])
}

fn fuzz_json(name: &str, seeds: Vec<Vec<u8>>, mut check: impl FnMut(&[u8])) {
    let r = run_with(name, &seeds, Budget::new(3_000, 4), json_mutator(), |d| check(d));
    assert!(r.mutated > 100, "{r:?}");
}

fn clean(e: impl std::fmt::Display) {
    assert!(!e.to_string().is_empty());
}

#[test]
fn app_compose_parser_survives_mutation() {
    let seed = fixture("simulator-app-compose.json");
    AppCompose::from_slice(&seed).expect("fixture parses");
    fuzz_json("app_compose", vec![seed], |d| {
        if let Err(e) = AppCompose::from_slice(d) {
            clean(e);
        }
    });
}

#[test]
fn sys_config_and_vm_config_parsers_survive_mutation() {
    let seed = fixture("simulator-sys-config.json");
    let sys = SysConfig::from_slice(&seed).expect("fixture parses");
    let vm = sys.vm_config.clone().into_bytes();
    fuzz_json("sys_config", vec![seed, vm], |d| {
        if let Err(e) = SysConfig::from_slice(d) {
            clean(e);
        }
        if let Ok(s) = std::str::from_utf8(d)
            && let Err(e) = VmConfig::parse(s)
        {
            clean(e);
        }
    });
}

#[test]
fn instance_info_and_app_keys_parsers_survive_mutation() {
    let keys = fixture("simulator-appkeys.json");
    AppKeys::from_slice(&keys).expect("fixture parses");
    let info = br#"{"instance_id_seed":"00112233445566778899aabbccddeeff00112233","instance_id":"","app_id":"0011223344556677889900112233445566778899"}"#.to_vec();
    InstanceInfo::from_slice(&info).expect("seed parses");
    fuzz_json("instance_info_app_keys", vec![keys, info], |d| {
        if let Err(e) = AppKeys::from_slice(d) {
            clean(e);
        }
        if let Err(e) = InstanceInfo::from_slice(d) {
            clean(e);
        }
    });
}
