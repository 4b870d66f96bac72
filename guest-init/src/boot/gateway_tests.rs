use std::time::SystemTime;

use dstack_ra_tls::CaCert;
use dstack_types::KeyProvider;

use super::*;

const GW_APP: [u8; 20] = [0x6a; 20];

fn compose(extra: &str) -> AppCompose {
    let json = format!(r#"{{"manifest_version":2,"name":"a","runner":"bash","bash_script":"true"{extra}}}"#);
    AppCompose::from_slice(json.as_bytes()).unwrap()
}

fn sys(urls: &[&str]) -> SysConfig {
    let json = serde_json::json!({ "kms_urls": [], "gateway_urls": urls, "vm_config": "{}" });
    SysConfig::from_slice(json.to_string().as_bytes()).unwrap()
}

fn keys(ca_cert: &str, gateway_app_id: &str) -> AppKeys {
    AppKeys {
        disk_crypt_key: vec![1; 32],
        env_crypt_key: vec![2; 32],
        k256_key: vec![3; 32],
        k256_signature: vec![4; 65],
        gateway_app_id: gateway_app_id.into(),
        ca_cert: ca_cert.into(),
        key_provider: KeyProvider::Kms {
            url: "https://kms".into(),
            pubkey: vec![5; 4],
            tmp_ca_key: String::new(),
            tmp_ca_cert: String::new(),
        },
    }
}

#[test]
fn plan_follows_compose_sys_config_and_keys() {
    let on = compose(r#","gateway_enabled":true"#);
    let k = keys("PEM", &hex::encode(GW_APP));
    assert_eq!(plan(&compose(""), &sys(&["https://gw:8000"]), &k).unwrap(), None);
    assert_eq!(plan(&on, &sys(&[]), &k).unwrap(), None, "no URLs: nothing to do");
    let legacy = compose(r#","tproxy_enabled":true"#);
    assert!(plan(&legacy, &sys(&["https://gw"]), &k).unwrap().is_some());

    let p = plan(&on, &sys(&["https://a:1", "https://b:2"]), &k).unwrap().unwrap();
    assert_eq!(p.urls, ["https://a:1", "https://b:2"]);
    assert_eq!(p.kms_root_pem, "PEM");
    assert_eq!(p.gateway_app_id.as_deref(), Some(&GW_APP[..]));
    assert_eq!(p.port_policy, None);

    let p = plan(&on, &sys(&["https://a"]), &keys("PEM", "ANY")).unwrap().unwrap();
    assert_eq!(p.gateway_app_id, None);
    let p = plan(&on, &sys(&["https://a"]), &keys("PEM", "0xabcd"))
        .unwrap()
        .unwrap();
    assert_eq!(p.gateway_app_id, Some(vec![0xab, 0xcd]));
}

#[test]
fn plan_fails_closed_without_a_way_to_authenticate_the_gateway() {
    let on = compose(r#","gateway_enabled":true"#);
    let urls = sys(&["https://gw"]);
    let e = plan(&on, &urls, &keys("", "any")).unwrap_err();
    assert!(e.to_string().contains("KMS root CA"), "{e}");
    let e = plan(&on, &urls, &keys("PEM", "")).unwrap_err();
    assert!(e.to_string().contains("gateway_app_id is empty"), "{e}");
    let e = plan(&on, &urls, &keys("PEM", "zz")).unwrap_err();
    assert!(e.to_string().contains("gateway_app_id \"zz\""), "{e}");
}

#[test]
fn port_policy_is_carried_as_the_rpc_shape() {
    let c = compose(r#","port_policy":{"ports":[{"port":443,"pp":true},{"port":80}],"restrict_mode":true}"#);
    let p = port_policy(&c).unwrap();
    assert!(p.restrict_mode);
    assert_eq!(
        p.ports.iter().map(|a| (a.port, a.pp)).collect::<Vec<_>>(),
        [(443, true), (80, false)]
    );
    let c = compose(r#","port_policy":{}"#);
    let p = port_policy(&c).unwrap();
    assert!(p.ports.is_empty() && !p.restrict_mode);
}

fn ca(name: &str) -> CaCert {
    let req = CertRequest {
        subject: name.into(),
        ..Default::default()
    };
    CaCert::self_signed(&req, KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()).unwrap()
}

fn server_leaf(issuer: &CaCert, app_id: Option<&[u8]>) -> CertificateDer<'static> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let req = CertRequest {
        subject: "gateway.test".into(),
        alt_names: vec!["gateway.test".into()],
        usage_server_auth: true,
        app_id: app_id.map(<[u8]>::to_vec),
        ..Default::default()
    };
    issuer.issue(&req, &key).unwrap().der().clone()
}

fn check(v: &GatewayServerVerifier, leaf: &CertificateDer<'_>, chain: &[CertificateDer<'_>]) -> Result<(), String> {
    let name = ServerName::try_from("10.9.8.7").unwrap();
    let now = UnixTime::since_unix_epoch(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap());
    v.verify_server_cert(leaf, chain, &name, &[], now)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[test]
fn server_verifier_requires_kms_chain_and_gateway_app_id() {
    let root = ca("KMS root");
    let app_ca = CaCert::issued_by(
        &CertRequest {
            subject: "gateway app CA".into(),
            ..Default::default()
        },
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        &root,
    )
    .unwrap();
    let pinned = GatewayServerVerifier::new(root.cert_pem(), Some(GW_APP.to_vec())).unwrap();
    let inter = [app_ca.cert_der().clone()];

    // Issued through the app CA, right app id: accepted although the name (an IP) does not match.
    check(&pinned, &server_leaf(&app_ca, Some(&GW_APP)), &inter).unwrap();
    check(&pinned, &server_leaf(&root, Some(&GW_APP)), &[]).unwrap();

    let e = check(&pinned, &server_leaf(&app_ca, Some(&[0x11; 20])), &inter).unwrap_err();
    assert!(e.contains(&format!("expected {}", hex::encode(GW_APP))), "{e}");
    let e = check(&pinned, &server_leaf(&app_ca, None), &inter).unwrap_err();
    assert!(e.contains("app id is absent"), "{e}");
    // The right app id from a CA the KMS did not certify.
    let other = ca("another CA");
    let e = check(&pinned, &server_leaf(&other, Some(&GW_APP)), &[]).unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
    // ... or one impersonating the root's name.
    let impostor = ca("KMS root");
    let e = check(&pinned, &server_leaf(&impostor, Some(&GW_APP)), &[]).unwrap_err();
    assert!(e.contains("BadSignature"), "{e}");
    // Missing intermediate: the chain does not reach the root.
    assert!(check(&pinned, &server_leaf(&app_ca, Some(&GW_APP)), &[]).is_err());

    // `any`: the chain still counts, the app id does not.
    let any = GatewayServerVerifier::new(root.cert_pem(), None).unwrap();
    check(&any, &server_leaf(&app_ca, None), &inter).unwrap();
    assert!(check(&any, &server_leaf(&other, None), &[]).is_err());
}

#[test]
fn server_verifier_rejects_a_bad_root() {
    assert!(matches!(
        GatewayServerVerifier::new("not a pem", None),
        Err(GatewayError::Config(_))
    ));
}

#[test]
fn registration_summary_has_servers_and_agent_info_but_no_key() {
    use dstack_rpc::gateway::{GuestAgentConfig, WireGuardConfig, WireGuardPeer};
    let resp = RegisterCvmResponse {
        wg: Some(WireGuardConfig {
            client_ip: "10.0.0.2".into(),
            servers: vec![WireGuardPeer {
                pk: "c2VydmVy".into(),
                ip: "10.0.0.1".into(),
                endpoint: "192.0.2.1:51820".into(),
            }],
        }),
        agent: Some(GuestAgentConfig {
            external_port: 443,
            internal_port: 8090,
            domain: "apps.test".into(),
            app_address_ns_prefix: String::new(),
        }),
        gateways: Vec::new(),
    };
    let reg = Registration::new("https://gw".into(), &resp, Ipv4Addr::new(10, 0, 0, 2), "cHVi".into());
    assert_eq!(reg.domain, "apps.test");
    assert_eq!((reg.external_port, reg.agent_port), (443, 8090));
    assert_eq!(
        reg.servers,
        [GatewayServer {
            public_key: "c2VydmVy".into(),
            ip: "10.0.0.1".into(),
            endpoint: "192.0.2.1:51820".into(),
        }]
    );
    let dir = tempfile::tempdir().unwrap();
    write_status(dir.path(), &reg);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(STATUS_FILE)).unwrap()).unwrap();
    assert_eq!(json["client_ip"], "10.0.0.2");
    assert_eq!(json["interface"], IFNAME);
    assert_eq!(json["servers"][0]["endpoint"], "192.0.2.1:51820");
    assert!(!json.to_string().to_lowercase().contains("private"));
}
