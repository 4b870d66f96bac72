//! JSON / query / protobuf mapping of the generated types. Expected JSON strings and protobuf
//! bytes are written by hand from the dstack conventions and the protobuf wire-format spec.

use prost::Message;

use crate::agent::{AppInfo, EmitEventArgs, GetKeyArgs, GetKeyResponse, GetQuoteResponse, GetTlsKeyArgs, RawQuoteArgs};
use crate::codec::{decode_json, decode_protobuf, decode_query, encode_json};
use crate::{Empty, RpcError};

fn json<T: serde::Serialize>(v: &T) -> String {
    String::from_utf8(encode_json("T", v).unwrap().to_vec()).unwrap()
}

fn err_text(e: RpcError) -> String {
    e.to_string()
}

#[test]
fn bytes_are_lowercase_hex_and_attestation_is_omitted_when_empty() {
    let q = GetQuoteResponse {
        quote: vec![0xAB, 0xCD, 0x01],
        event_log: "[]".into(),
        report_data: vec![0xFF; 2],
        vm_config: "{}".into(),
        attestation: vec![],
    };
    assert_eq!(
        json(&q),
        r#"{"quote":"abcd01","event_log":"[]","report_data":"ffff","vm_config":"{}"}"#
    );
    let q = GetQuoteResponse {
        attestation: vec![0x0A],
        ..Default::default()
    };
    assert_eq!(
        json(&q),
        r#"{"quote":"","event_log":"","report_data":"","vm_config":"","attestation":"0a"}"#
    );
}

#[test]
fn repeated_bytes_and_empty() {
    let r = GetKeyResponse {
        key: vec![1, 2],
        signature_chain: vec![vec![0xAA], vec![]],
    };
    assert_eq!(json(&r), r#"{"key":"0102","signature_chain":["aa",""]}"#);
    let back: GetKeyResponse = decode_json("GetKey", json(&r).as_bytes()).unwrap();
    assert_eq!(back, r);
    assert_eq!(json(&Empty {}), "{}");
    let _: Empty = decode_json("Info", b"{}").unwrap();
    let _: Empty = decode_json("Info", b"").unwrap();
    let _: Empty = decode_json("Info", br#"{"anything":[1,2]}"#).unwrap();
}

#[test]
fn input_accepts_upper_case_and_0x() {
    let a: RawQuoteArgs = decode_json("GetQuote", br#"{"report_data":"0xDEADbeef"}"#).unwrap();
    assert_eq!(a.report_data, vec![0xDE, 0xAD, 0xBE, 0xEF]);
    let a: EmitEventArgs = decode_json("EmitEvent", br#"{"event":"e","payload":"00FF"}"#).unwrap();
    assert_eq!(a.payload, vec![0x00, 0xFF]);
}

#[test]
fn invalid_hex_names_the_field() {
    let e = err_text(decode_json::<RawQuoteArgs>("GetQuote", br#"{"report_data":"xyz1"}"#).unwrap_err());
    assert!(e.contains("GetQuote") && e.contains("report_data"), "{e}");
    let e = err_text(decode_json::<RawQuoteArgs>("GetQuote", br#"{"report_data":"abc"}"#).unwrap_err());
    assert!(e.contains("report_data") && e.contains("Odd"), "{e}");
    // Nested paths are reported too.
    let body = br#"{"vms":[{"configuration":{"encrypted_env":"0xzz"}}]}"#;
    let e = err_text(decode_json::<crate::vmm::StatusResponse>("Status", body).unwrap_err());
    assert!(e.contains("vms[0].configuration.encrypted_env"), "{e}");
    // Wrong types name the field as well.
    let e = err_text(decode_json::<GetTlsKeyArgs>("GetTlsKey", br#"{"usage_ra_tls":"yes"}"#).unwrap_err());
    assert!(e.contains("usage_ra_tls"), "{e}");
}

#[test]
fn missing_fields_default_and_unknown_fields_are_ignored() {
    let a: GetKeyArgs = decode_json("GetKey", br#"{"path":"a","future_field":{"x":1},"n":null}"#).unwrap();
    assert_eq!(
        a,
        GetKeyArgs {
            path: "a".into(),
            purpose: String::new(),
            algorithm: String::new(),
        }
    );
    let t: GetTlsKeyArgs = decode_json("GetTlsKey", br#"{"subject":"s"}"#).unwrap();
    assert_eq!(t.alt_names, Vec::<String>::new());
    assert_eq!(t.not_before, None);
    assert!(!t.usage_ra_tls);
    // Trailing garbage is rejected.
    assert!(decode_json::<GetKeyArgs>("GetKey", br#"{"path":"a"} x"#).is_err());
    assert!(decode_json::<GetKeyArgs>("GetKey", b"[1]").is_err());
}

#[test]
fn optional_fields_are_omitted_when_none() {
    let t = GetTlsKeyArgs {
        subject: "s".into(),
        not_after: Some(5),
        ..Default::default()
    };
    assert_eq!(
        json(&t),
        r#"{"subject":"s","alt_names":[],"usage_ra_tls":false,"usage_server_auth":false,"usage_client_auth":false,"not_after":5,"with_app_info":false}"#
    );
    let back: GetTlsKeyArgs = decode_json("GetTlsKey", json(&t).as_bytes()).unwrap();
    assert_eq!(back, t);
    let m = crate::kms::GetMetaResponse::default();
    // Non-optional message fields stay (null), proto3 optional ones are omitted.
    assert_eq!(
        json(&m),
        r#"{"ca_cert":"","allow_any_upgrade":false,"k256_pubkey":"","bootstrap_info":null,"is_dev":false}"#
    );
}

#[test]
fn protobuf_wire_bytes() {
    // Field 1 (report_data), wire type 2: tag 0x0a, length 2.
    let a = RawQuoteArgs {
        report_data: vec![1, 2],
    };
    assert_eq!(a.encode_to_vec(), [0x0a, 0x02, 0x01, 0x02]);
    // proto3 optional keeps explicit presence: not_before (field 6, varint) = 0 → 0x30 0x00.
    let t = GetTlsKeyArgs {
        not_before: Some(0),
        ..Default::default()
    };
    assert_eq!(t.encode_to_vec(), [0x30, 0x00]);
    // AppInfo.device_id is field 8 (tag 0x42), compose_hash field 13 (tag 0x6a).
    let i = AppInfo {
        device_id: vec![9],
        compose_hash: vec![7],
        ..Default::default()
    };
    assert_eq!(i.encode_to_vec(), [0x42, 0x01, 0x09, 0x6a, 0x01, 0x07]);
    let back: AppInfo = decode_protobuf("Info", &i.encode_to_vec()).unwrap();
    assert_eq!(back, i);
    assert!(decode_protobuf::<AppInfo>("Info", &[0x42, 0x05, 0x01]).is_err());
    assert_eq!(Empty {}.encode_to_vec(), Vec::<u8>::new());
}

#[test]
fn protobuf_round_trip_nested() {
    use crate::gateway::{PortAttrs, PortPolicy, RegisterCvmRequest};
    let r = RegisterCvmRequest {
        client_public_key: "pk".into(),
        port_policy: Some(PortPolicy {
            ports: vec![PortAttrs { port: 80, pp: true }],
            restrict_mode: true,
        }),
    };
    let back: RegisterCvmRequest = decode_protobuf("RegisterCvm", &r.encode_to_vec()).unwrap();
    assert_eq!(back, r);
    let j = json(&r);
    assert_eq!(
        j,
        r#"{"client_public_key":"pk","port_policy":{"ports":[{"port":80,"pp":true}],"restrict_mode":true}}"#
    );
    assert_eq!(json(&RegisterCvmRequest::default()), r#"{"client_public_key":""}"#);
}

#[test]
fn query_strings_are_typed() {
    let t: GetTlsKeyArgs = decode_query("GetTlsKey", b"subject=a%20b&usage_ra_tls=true&not_before=5&json").unwrap();
    assert_eq!(t.subject, "a b");
    assert!(t.usage_ra_tls);
    assert_eq!(t.not_before, Some(5));
    assert_eq!(t.not_after, None);
    let a: RawQuoteArgs = decode_query("GetQuote", b"report_data=0xABcd").unwrap();
    assert_eq!(a.report_data, vec![0xAB, 0xCD]);
    let e = err_text(decode_query::<GetTlsKeyArgs>("GetTlsKey", b"not_before=soon").unwrap_err());
    assert!(e.contains("not_before") && e.contains("GetTlsKey"), "{e}");
    let e = err_text(decode_query::<RawQuoteArgs>("GetQuote", b"report_data=zz").unwrap_err());
    assert!(e.contains("report_data"), "{e}");
    let _: Empty = decode_query("Info", b"").unwrap();
    let s: crate::vmm::StatusRequest = decode_query("Status", b"ids=a&ids=b&brief=true&page_size=10").unwrap();
    assert_eq!(s.ids, vec!["a".to_owned(), "b".to_owned()]);
    assert!(s.brief);
    assert_eq!(s.page_size, 10);
    let r: GetKeyResponse = decode_query("GetKey", b"signature_chain=0A&signature_chain=0xff").unwrap();
    assert_eq!(r.signature_chain, vec![vec![0x0a], vec![0xff]]);
}
