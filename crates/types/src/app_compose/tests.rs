use super::*;

const MIN: &str =
    r#"{"manifest_version":"2","name":"app","runner":"docker-compose","docker_compose_file":"services: {}"}"#;

fn parse(s: &str) -> Result<AppCompose, AppComposeError> {
    AppCompose::from_slice(s.as_bytes())
}

fn with(extra: &str) -> String {
    format!("{},{extra}}}", MIN.trim_end_matches('}'))
}

fn err(s: &str) -> String {
    match parse(s) {
        Ok(c) => panic!("accepted: {s}\n{c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn parses_dstack_simulator_compose() {
    // sdk/simulator/app-compose.json from dstack: numeric manifest_version, pre_launch_script, key_provider.
    let raw = include_str!("../../tests/fixtures/simulator-app-compose.json");
    let c = parse(raw).unwrap();
    assert_eq!(c.manifest_version, ManifestVersion::Number(2));
    assert_eq!(c.runner, Runner::DockerCompose);
    assert!(c.gateway_enabled());
    assert!(c.kms_enabled());
    assert_eq!(c.key_provider(), KeyProviderKind::Kms);
    assert!(c.key_provider_id().is_empty());
    assert!(!c.secure_time());
    assert_eq!(c.storage_fs, Some(StorageFs::Ext4));
    assert!(
        c.pre_launch_script
            .as_deref()
            .unwrap()
            .contains("dstack-openssh-installer")
    );
}

#[test]
fn defaults_follow_dstack() {
    let c = parse(MIN).unwrap();
    assert!(c.public_tcbinfo(), "public_tcbinfo defaults to true");
    assert!(c.secure_time(), "secure_time defaults to true");
    assert!(!c.public_logs() && !c.public_sysinfo() && !c.no_instance_id());
    assert!(!c.gateway_enabled() && !c.kms_enabled());
    assert_eq!(c.key_provider(), KeyProviderKind::None);
    assert_eq!(c.event_log_version(), EventLogVersion::V1);
    assert_eq!(c.swap_size(), 0);
    assert!(c.init_scripts().is_empty() && c.allowed_envs().is_empty());
    assert!(!c.restrict_mode());
}

#[test]
fn unknown_fields_rejected_with_name_and_path() {
    let e = err(&with(r#""surprise":1"#));
    assert!(e.contains("unknown field `surprise`"), "{e}");
    let e = err(&with(r#""port_policy":{"ports":[{"port":80,"proxy":true}]}"#));
    assert!(
        e.contains("unknown field `proxy`") && e.contains("port_policy.ports[0]"),
        "{e}"
    );
    let e = err(&with(r#""requirements":{"os":"x"}"#));
    assert!(e.contains("unknown field `os`") && e.contains("requirements"), "{e}");
    let e = err(&with(r#""docker_config":{"password":"x"}"#));
    assert!(e.contains("unknown field `password`"), "{e}");
}

#[test]
fn wrong_types_and_nulls_rejected() {
    let e = err(&with(r#""public_logs":"yes""#));
    assert!(e.contains("public_logs") && e.contains("invalid type"), "{e}");
    let e = err(&with(r#""kms_enabled":null"#));
    assert!(e.contains("kms_enabled"), "{e}");
    let e = err(&with(r#""allowed_envs":"A""#));
    assert!(e.contains("allowed_envs"), "{e}");
    let e = err(&with(r#""port_policy":{"ports":[{"port":70000}]}"#));
    assert!(e.contains("port_policy.ports[0].port"), "{e}");
    assert!(parse("[]").is_err());
    assert!(parse("not json").is_err());
    // Optional values dstack models as Option accept null.
    let c = parse(&with(r#""key_provider":null,"storage_fs":null,"init_script":null"#)).unwrap();
    assert_eq!(c.key_provider, None);
}

#[test]
fn missing_required_fields() {
    let e = err(r#"{"name":"a","runner":"bash"}"#);
    assert!(e.contains("missing field `manifest_version`"), "{e}");
    let e = err(r#"{"manifest_version":"2","runner":"bash"}"#);
    assert!(e.contains("missing field `name`"), "{e}");
    let e = err(r#"{"manifest_version":"2","name":"a"}"#);
    assert!(e.contains("missing field `runner`"), "{e}");
}

#[test]
fn runner_rules() {
    let e = err(r#"{"manifest_version":"2","name":"a","runner":"docker-compose"}"#);
    assert!(e.contains("docker_compose_file"), "{e}");
    let e = err(r#"{"manifest_version":"2","name":"a","runner":"nerdctl-compose","docker_compose_file":" "}"#);
    assert!(e.contains("docker_compose_file"), "{e}");
    let e = err(r#"{"manifest_version":"2","name":"a","runner":"podman"}"#);
    assert!(e.contains("unknown variant `podman`"), "{e}");
    parse(r#"{"manifest_version":"2","name":"a","runner":"bash"}"#).unwrap();
    let nerd = parse(
        r#"{"manifest_version":"3","name":"a","runner":"nerdctl-compose","docker_compose_file":"x","snapshotter":"stargz"}"#,
    )
    .unwrap();
    assert_eq!(nerd.snapshotter, Some(Snapshotter::Stargz));
    let e = err(&with(r#""snapshotter":"overlayfs""#));
    assert!(e.contains("snapshotter") && e.contains("nerdctl-compose"), "{e}");
}

#[test]
fn manifest_version_forms() {
    let v = |mv: &str| parse(&MIN.replace(r#""manifest_version":"2""#, &format!(r#""manifest_version":{mv}"#)));
    assert_eq!(v("1").unwrap().manifest_version, ManifestVersion::Number(1));
    assert_eq!(v(r#""3""#).unwrap().manifest_version.as_u32(), 3);
    for bad in [
        "3", "0", "-1", "2.5", r#""03""#, r#""+3""#, r#""""#, r#""3.0""#, r#""0""#, "true",
    ] {
        assert!(v(bad).is_err(), "manifest_version {bad} accepted");
    }
}

#[test]
fn event_log_version_only_1_or_2() {
    assert_eq!(
        parse(&with(r#""event_log_version":2"#)).unwrap().event_log_version(),
        EventLogVersion::V2
    );
    assert_eq!(
        parse(&with(r#""event_log_version":1"#)).unwrap().event_log_version(),
        EventLogVersion::V1
    );
    let e = err(&with(r#""event_log_version":3"#));
    assert!(e.contains("unknown event_log_version 3"), "{e}");
    assert!(parse(&with(r#""event_log_version":"2""#)).is_err());
}

#[test]
fn gateway_legacy_alias_and_feature() {
    assert!(parse(&with(r#""tproxy_enabled":true"#)).unwrap().gateway_enabled());
    assert!(
        parse(&with(r#""gateway_enabled":false,"tproxy_enabled":true"#))
            .unwrap()
            .gateway_enabled()
    );
    assert!(parse(&with(r#""features":["tproxy-net"]"#)).unwrap().gateway_enabled());
    assert!(!parse(&with(r#""tproxy_enabled":false"#)).unwrap().gateway_enabled());
}

#[test]
fn key_provider_fallback_like_dstack() {
    let kp = |extra: &str| parse(&with(extra)).unwrap().key_provider();
    assert_eq!(kp(r#""kms_enabled":true"#), KeyProviderKind::Kms);
    assert_eq!(kp(r#""local_key_provider_enabled":true"#), KeyProviderKind::Local);
    assert_eq!(
        kp(r#""kms_enabled":true,"local_key_provider_enabled":true"#),
        KeyProviderKind::Kms
    );
    assert_eq!(kp(r#""kms_enabled":true,"key_provider":"tpm""#), KeyProviderKind::Tpm);
    assert_eq!(kp(r#""key_provider":"none","kms_enabled":true"#), KeyProviderKind::None);
    assert!(parse(&with(r#""key_provider":"sgx""#)).is_err());
}

#[test]
fn key_provider_id_hex() {
    let c = parse(&with(r#""key_provider_id":"ABcd01""#)).unwrap();
    assert_eq!(c.key_provider_id(), vec![0xab, 0xcd, 0x01]);
    for bad in [r#""0xabcd""#, r#""abc""#, r#""zz""#, "12"] {
        let e = err(&with(&format!(r#""key_provider_id":{bad}"#)));
        assert!(e.contains("key_provider_id"), "{e}");
    }
}

#[test]
fn swap_size_human() {
    assert_eq!(parse(&with(r#""swap_size":"4G""#)).unwrap().swap_size(), 4 << 30);
    assert_eq!(parse(&with(r#""swap_size":1048576"#)).unwrap().swap_size(), 1 << 20);
    let e = err(&with(r#""swap_size":"4Q""#));
    assert!(e.contains("swap_size") && e.contains("suffix"), "{e}");
}

#[test]
fn init_script_forms_and_limit() {
    assert_eq!(
        parse(&with(r#""init_script":"echo 1""#)).unwrap().init_scripts(),
        ["echo 1"]
    );
    assert_eq!(
        parse(&with(r#""init_script":["a","b"]"#)).unwrap().init_scripts(),
        ["a", "b"]
    );
    let e = err(&with(r#""init_script":["1","2","3","4","5","6"]"#));
    assert!(e.contains("at most 5"), "{e}");
    assert!(parse(&with(r#""init_script":["a",2]"#)).is_err());
}

#[test]
fn allowed_envs_names_validated() {
    parse(&with(r#""allowed_envs":["A","_b1","API_KEY"]"#)).unwrap();
    for bad in ["1A", "MY-VAR", "", "A B", "É"] {
        let e = err(&with(&format!(r#""allowed_envs":["{bad}"]"#)));
        assert!(e.contains("allowed_envs"), "{e}");
    }
}

#[test]
fn port_policy_values() {
    let c = parse(&with(
        r#""port_policy":{"ports":[{"port":443,"pp":true},{"port":80}],"restrict_mode":true}"#,
    ))
    .unwrap();
    assert!(c.restrict_mode());
    let ports = c.port_policy.as_ref().unwrap().ports.as_ref().unwrap();
    assert_eq!((ports[0].port, ports[0].pp, ports[1].pp), (443, Some(true), None));
    assert!(err(&with(r#""port_policy":{"ports":[{"port":80},{"port":80}]}"#)).contains("twice"));
    assert!(err(&with(r#""port_policy":{"ports":[{"port":0}]}"#)).contains("port 0"));
    assert!(err(&with(r#""port_policy":{"ports":[{"pp":true}]}"#)).contains("missing field `port`"));
}

#[test]
fn requirements_and_verity_volumes() {
    let c = parse(&with(
        r#""requirements":{"os_version":">=0.6.0","platforms":["dstack-tdx"],"tdx_measure_acpi_tables":true,
        "launch_token_hash":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "gpu_policy":{"attest_gpu":false}}"#,
    ))
    .unwrap();
    assert_eq!(c.requirements.unwrap().platforms.unwrap(), ["dstack-tdx"]);
    assert!(err(&with(r#""requirements":{"platforms":["sgx"]}"#)).contains("unknown platform"));
    assert!(err(&with(r#""requirements":{"launch_token_hash":"abcd"}"#)).contains("launch_token_hash"));
    assert!(err(&with(r#""requirements":{"gpu_policy":{"x":1}}"#)).contains("unknown field `x`"));

    let root = "11".repeat(32);
    let vol = |src: &str, target: &str| format!(r#"{{"source":"{src}","verity_root":"{root}","target":"{target}"}}"#);
    parse(&with(&format!(
        r#""verity_volumes":[{},{}]"#,
        vol("a.img", "/a"),
        vol("a.img", "/b")
    )))
    .unwrap();
    let dup = err(&with(&format!(
        r#""verity_volumes":[{},{}]"#,
        vol("a.img", "/a"),
        vol("b.img", "/a")
    )));
    assert!(dup.contains("duplicate target"), "{dup}");
    assert!(err(&with(&format!(r#""verity_volumes":[{}]"#, vol("a.img", "rel")))).contains("absolute"));
    assert!(err(&with(&format!(r#""verity_volumes":[{}]"#, vol("../x", "/a")))).contains("bare file name"));
    let short = with(r#""verity_volumes":[{"source":"a","verity_root":"11","target":"/a"}]"#);
    assert!(err(&short).contains("32 bytes"));
}

#[test]
fn oversize_rejected_before_parsing() {
    let big = with(&format!(
        r#""pre_launch_script":"{}""#,
        "x".repeat(MAX_APP_COMPOSE_SIZE)
    ));
    assert!(matches!(parse(&big), Err(AppComposeError::TooLarge(_))));
}

#[test]
fn normalized_json_is_sorted_compact_and_keeps_written_forms() {
    let raw = "{\n  \"runner\": \"docker-compose\",\n  \"name\": \"Ünïcode ✓\",\n  \"manifest_version\": 2,\n  \
               \"docker_compose_file\": \"services:\\n  a: {}\\n\",\n  \"swap_size\": \"4G\",\n  \
               \"init_script\": \"echo hi\",\n  \"key_provider_id\": \"ABCD\",\n  \"kms_enabled\": true,\n  \
               \"port_policy\": {\"restrict_mode\": false, \"ports\": [{\"pp\": true, \"port\": 8080}]},\n  \
               \"docker_registry_ignored\": null\n}";
    assert!(parse(raw).is_err(), "unknown key must fail");
    let raw = raw.replace(",\n  \"docker_registry_ignored\": null", "");
    let c = parse(&raw).unwrap();
    let n = c.to_normalized_json().unwrap();
    assert_eq!(
        n,
        "{\"docker_compose_file\":\"services:\\n  a: {}\\n\",\"init_script\":\"echo hi\",\"key_provider_id\":\"ABCD\",\
         \"kms_enabled\":true,\"manifest_version\":2,\"name\":\"Ünïcode ✓\",\"port_policy\":{\"ports\":[{\"port\":8080,\
         \"pp\":true}],\"restrict_mode\":false},\"runner\":\"docker-compose\",\"swap_size\":\"4G\"}"
    );
    // Normalizing is idempotent.
    assert_eq!(parse(&n).unwrap().to_normalized_json().unwrap(), n);
}
