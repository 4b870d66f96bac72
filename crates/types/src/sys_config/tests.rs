use super::*;

const SIMULATOR: &str = include_str!("../../tests/fixtures/simulator-sys-config.json");

#[test]
fn parses_dstack_simulator_sys_config() {
    let cfg = SysConfig::from_slice(SIMULATOR.as_bytes()).unwrap();
    assert_eq!(cfg.kms_urls, ["https://kms.1022.dstack.org:12001"]);
    assert_eq!(cfg.gateway_urls, ["https://tproxy.1022.dstack.org:12002"]);
    assert_eq!(cfg.pccs_url(), None, "empty pccs_url counts as unset");
    assert_eq!(cfg.host_api_url.as_deref(), Some("vsock://2:12000/api"));
    let vm = cfg.vm_config().unwrap();
    assert_eq!(
        hex::encode(&vm.os_image_hash),
        "64f0d1545cd510a8dfed7ad609d105b5d41f0cb2afcfdda8867ede00c88add7a"
    );
    assert_eq!((vm.cpu_count, vm.memory_size, vm.num_nics), (1, 2 << 30, 1));
}

/// The shape dstack's current VMM writes (`vmm/src/app.rs`): nulls for unset strings, collateral_urls,
/// and `spec_version` inside vm_config.
#[test]
fn parses_current_dstack_vmm_shape() {
    let vm = r#"{"cpu_count":2,"hotplug_off":false,"host_share_mode":"9p","hugepages":false,"image":"dstack-0.5.5","memory_size":4294967296,"num_gpus":0,"num_nvswitches":0,"os_image_hash":"64f0d1545cd510a8dfed7ad609d105b5d41f0cb2afcfdda8867ede00c88add7a","pci_hole64_size":0,"spec_version":1,"num_nics":2,"ovmf_variant":"pre202505","tdx_attestation_variant":"lite","tdx_measurement":{"anything":[1,2]}}"#;
    let raw = serde_json::json!({
        "kms_urls": ["https://kms"], "gateway_urls": [], "pccs_url": "https://pccs",
        "collateral_urls": {"pccs": "https://pccs2"}, "nvidia_attestation_proxy_url": null,
        "docker_registry": null, "host_api_url": "vsock://2:10000/api", "vm_config": vm,
    });
    let cfg = SysConfig::from_slice(raw.to_string().as_bytes()).unwrap();
    assert_eq!(cfg.pccs_url(), Some("https://pccs2"));
    let vm = cfg.vm_config().unwrap();
    assert_eq!(vm.spec_version, Some(1));
    assert_eq!(vm.num_nics, 2);
    assert_eq!(vm.tdx_attestation_variant, Some(TdxAttestationVariant::Lite));
    assert_eq!(vm.ovmf_variant, Some(OvmfVariant::Pre202505));
}

#[test]
fn legacy_tproxy_urls_alias_works_with_deny_unknown_fields() {
    let raw = r#"{"tproxy_urls":["https://gw"],"vm_config":"{}"}"#;
    let cfg = SysConfig::from_slice(raw.as_bytes()).unwrap();
    assert_eq!(cfg.gateway_urls, ["https://gw"]);
    // Serializes under the current name.
    assert!(serde_json::to_string(&cfg).unwrap().contains("\"gateway_urls\""));
    let both = r#"{"tproxy_urls":["a"],"gateway_urls":["b"],"vm_config":"{}"}"#;
    let e = SysConfig::from_slice(both.as_bytes()).unwrap_err().to_string();
    assert!(e.contains("duplicate field `gateway_urls`"), "{e}");
}

#[test]
fn sys_config_rejects_bad_input() {
    let e = SysConfig::from_slice(br#"{"vm_config":"{}","kms_url":"x"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `kms_url`"), "{e}");
    let e = SysConfig::from_slice(br#"{"kms_urls":[]}"#).unwrap_err().to_string();
    assert!(e.contains("missing field `vm_config`"), "{e}");
    let e = SysConfig::from_slice(br#"{"vm_config":{}}"#).unwrap_err().to_string();
    assert!(e.contains("vm_config") && e.contains("invalid type"), "{e}");
    let e = SysConfig::from_slice(br#"{"vm_config":"{\"cpus\":1}"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `cpus`"), "{e}");
    let e = SysConfig::from_slice(br#"{"vm_config":"{}","collateral_urls":{"intel":"x"}}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("collateral_urls") && e.contains("unknown field `intel`"),
        "{e}"
    );
    let big = vec![b' '; MAX_SYS_CONFIG_SIZE + 1];
    assert!(matches!(SysConfig::from_slice(&big), Err(ConfigError::TooLarge { .. })));
}

#[test]
fn vm_config_rejects_bad_values() {
    let e = VmConfig::parse(r#"{"os_image_hash":"xyz"}"#).unwrap_err().to_string();
    assert!(e.contains("os_image_hash") && e.contains("hex"), "{e}");
    let e = VmConfig::parse(r#"{"os_image_hash":"abcd"}"#).unwrap_err().to_string();
    assert!(e.contains("32 bytes"), "{e}");
    let e = VmConfig::parse(r#"{"cpu_count":-1}"#).unwrap_err().to_string();
    assert!(e.contains("cpu_count"), "{e}");
    let e = VmConfig::parse(r#"{"gcp_measurement":{}}"#).unwrap_err().to_string();
    assert!(e.contains("unknown field `gcp_measurement`"), "{e}");
    assert!(VmConfig::parse(r#"{"ovmf_variant":"future"}"#).is_err());
}

#[test]
fn vm_config_serializes_like_dstack() {
    let vm = VmConfig::parse(
        r#"{"os_image_hash":"64f0d1545cd510a8dfed7ad609d105b5d41f0cb2afcfdda8867ede00c88add7a","cpu_count":1,"memory_size":2147483648}"#,
    )
    .unwrap();
    // dstack's field order and skip rules: num_nics omitted when 1, swtpm when false, options when None.
    assert_eq!(
        vm.to_json_string(),
        r#"{"os_image_hash":"64f0d1545cd510a8dfed7ad609d105b5d41f0cb2afcfdda8867ede00c88add7a","cpu_count":1,"memory_size":2147483648,"pci_hole64_size":0,"hugepages":false,"num_gpus":0,"num_nvswitches":0,"hotplug_off":false,"host_share_mode":""}"#
    );
    assert_eq!(VmConfig::parse(&vm.to_json_string()).unwrap(), vm);
}

#[test]
fn instance_info_parsing() {
    let raw = br#"{"instance_id_seed":"0101010101010101010101010101010101010101","app_id":"AABBCCDDEEFF00112233445566778899aabbccdd"}"#;
    let info = InstanceInfo::from_slice(raw).unwrap();
    assert_eq!(info.instance_id_seed, vec![1; 20]);
    assert!(info.instance_id.is_empty());
    assert_eq!(info.app_id[0], 0xaa);
    assert_eq!(InstanceInfo::from_slice(b"{}").unwrap(), InstanceInfo::default());
    let e = InstanceInfo::from_slice(br#"{"app_id":"abcd"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("app_id") && e.contains("20 bytes"), "{e}");
    let e = InstanceInfo::from_slice(br#"{"app_id":"zz"}"#).unwrap_err().to_string();
    assert!(e.contains("app_id") && e.contains("hex"), "{e}");
    let e = InstanceInfo::from_slice(br#"{"seed":""}"#).unwrap_err().to_string();
    assert!(e.contains("unknown field `seed`"), "{e}");
}
