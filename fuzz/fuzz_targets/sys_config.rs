#![no_main]
//! Host-supplied guest configuration: `.sys-config.json` (with its embedded `vm_config`), `.instance_info`
//! and the app keys file. Arbitrary bytes give a typed error, never a panic; accepted values round-trip.
use dstack_types::{AppKeys, InstanceInfo, SysConfig, VmConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cfg) = SysConfig::from_slice(data) {
        let vm = cfg.vm_config().expect("from_slice checked vm_config");
        let _ = cfg.pccs_url();
        // The opaque `tdx_measurement` may hold floats, which serde_json does not round-trip bit-exactly.
        if vm.tdx_measurement.is_none() {
            let json = vm.to_json_string();
            assert_eq!(VmConfig::parse(&json).expect("re-parses"), vm);
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = VmConfig::parse(s);
    }
    if let Ok(info) = InstanceInfo::from_slice(data) {
        let json = serde_json::to_vec(&info).expect("serializes");
        assert_eq!(InstanceInfo::from_slice(&json).expect("re-parses"), info);
    }
    if let Ok(keys) = AppKeys::from_slice(data) {
        let _ = (keys.key_provider.kind(), keys.key_provider.id().len());
    }
});
