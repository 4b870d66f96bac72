//! Router behaviour without sockets: encodings, prefixes, errors, limits.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use dstack_rpc::agent::{GetKeyArgs, GetKeyResponse, SignRequest, TdxQuoteArgs};
use dstack_rpc::{ConnInfo, PrpcError, RemoteAddr, RpcRouter};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use prost::Message;
use serde_json::{Value, json};

struct Reply {
    status: StatusCode,
    content_type: String,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        assert_eq!(self.content_type, "application/json", "body: {:?}", self.body);
        serde_json::from_slice(&self.body).unwrap()
    }
}

async fn call(
    router: &RpcRouter,
    method: Method,
    uri: &str,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let conn = ConnInfo::plain(RemoteAddr::Other("test".into()));
    let resp = router.handle(req, &conn).await;
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        content_type,
        body,
    }
}

const JSON: Option<&str> = Some("application/json");

#[tokio::test]
async fn post_json_at_root_like_the_python_sdk() {
    let r = common::agent_router();
    let body = r#"{"path": "a", "purpose": "b", "algorithm": "secp256k1"}"#;
    let reply = call(&r, Method::POST, "/GetKey", JSON, body).await;
    assert_eq!(reply.status, StatusCode::OK);
    // hex("a") = 61, hex("b") = 62, hex("secp256k1") = 736563703235366b31 (python binascii).
    assert_eq!(
        reply.json(),
        json!({"key": "61", "signature_chain": ["62", "736563703235366b31"]})
    );
    // charset parameter and ?json both select JSON too.
    let reply = call(
        &r,
        Method::POST,
        "/GetKey",
        Some("application/json; charset=utf-8"),
        body,
    )
    .await;
    assert_eq!(reply.json()["key"], "61");
    let reply = call(&r, Method::POST, "/GetKey?json", None, body).await;
    assert_eq!(reply.json()["key"], "61");
}

#[tokio::test]
async fn post_protobuf() {
    let r = common::agent_router();
    let req = GetKeyArgs {
        path: "p".into(),
        purpose: "q".into(),
        algorithm: "ed25519".into(),
    };
    for ct in [None, Some("application/protobuf"), Some("application/octet-stream")] {
        let reply = call(&r, Method::POST, "/GetKey", ct, req.encode_to_vec()).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.content_type, "application/protobuf");
        let resp = GetKeyResponse::decode(reply.body).unwrap();
        assert_eq!(resp.key, b"p");
        assert_eq!(resp.signature_chain, vec![b"q".to_vec(), b"ed25519".to_vec()]);
    }
    // Empty body is the default message.
    let reply = call(&r, Method::POST, "/GetKey", None, Bytes::new()).await;
    let resp = GetKeyResponse::decode(reply.body).unwrap();
    assert_eq!(resp.signature_chain, vec![Vec::<u8>::new(), vec![]]);
    let reply = call(&r, Method::POST, "/Version", JSON, Bytes::new()).await;
    assert_eq!(reply.json()["version"], "0.6.0-test");
}

#[tokio::test]
async fn get_with_query() {
    let r = common::agent_router();
    let reply = call(&r, Method::GET, "/GetQuote?report_data=0xAB01", None, Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    assert_eq!(v["report_data"], format!("ab01{}", "0".repeat(124)));
    assert_eq!(v["quote"], "0400");
    assert!(v.get("attestation").is_none(), "empty attestation is omitted");
    let reply = call(&r, Method::GET, "/Version", None, Bytes::new()).await;
    assert_eq!(reply.json()["version"], "0.6.0-test");
    let reply = call(
        &r,
        Method::GET,
        "/GetTlsKey?subject=x&usage_ra_tls=maybe",
        None,
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let err = reply.json()["error"].as_str().unwrap().to_owned();
    assert!(err.contains("usage_ra_tls"), "{err}");
}

#[tokio::test]
async fn service_prefix_and_path_prefix() {
    let r = common::tappd_router();
    let q = TdxQuoteArgs {
        report_data: vec![1, 2],
        hash_algorithm: "raw".into(),
        prefix: String::new(),
    };
    for uri in ["/prpc/Tappd.TdxQuote?json", "/prpc/TdxQuote?json"] {
        let reply = call(&r, Method::POST, uri, None, serde_json::to_vec(&q).unwrap()).await;
        assert_eq!(reply.status, StatusCode::OK, "{uri}");
        assert_eq!(
            reply.json(),
            json!({"quote": "0102", "event_log": "[]", "hash_algorithm": "raw", "prefix": "tappd"})
        );
    }
    // Wrong service names are not found, even for an existing method.
    let reply = call(&r, Method::POST, "/prpc/Worker.TdxQuote", JSON, "{}").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.json(), json!({"error": "method not found: Worker.TdxQuote"}));
    // Bare `Info` goes to the first service that has it (Tappd); a prefix picks the other one.
    let reply = call(&r, Method::POST, "/prpc/Info", JSON, "{}").await;
    assert_eq!(reply.json()["app_name"], "tappd-info");
    let reply = call(&r, Method::POST, "/prpc/DstackGuest.Info", JSON, "{}").await;
    assert_eq!(reply.json()["key_provider_info"], "/prpc|DstackGuest|Info");
    // Path prefixes are enforced both ways.
    let reply = call(&r, Method::POST, "/TdxQuote", JSON, "{}").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let agent = common::agent_router();
    let reply = call(&agent, Method::POST, "/prpc/GetKey", JSON, "{}").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = call(&agent, Method::POST, "/GetKey/extra", JSON, "{}").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = call(&agent, Method::POST, "/Info", JSON, "{}").await;
    assert_eq!(reply.json()["key_provider_info"], "|DstackGuest|Info");
}

#[tokio::test]
async fn vmm_cli_status_and_alias() {
    let r = common::vmm_router();
    let reply = call(&r, Method::POST, "/prpc/Status?json", JSON, "{}").await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    assert_eq!(v["vms"][0]["id"], "vm-1");
    assert_eq!(v["vms"][0]["configuration"]["encrypted_env"], "ab");
    assert_eq!(v["total"], 1);
    let reply = call(&r, Method::POST, "/prpc/Teepod.Status?json", JSON, r#"{"brief":true}"#).await;
    assert_eq!(reply.json()["vms"][0]["configuration"], Value::Null);
    let reply = call(&r, Method::POST, "/prpc/StartVm?json", JSON, r#"{"id":"x"}"#).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json(), json!({"error": "start_vm is not supported"}));
}

#[tokio::test]
async fn errors() {
    let r = common::agent_router();
    // Handler error → 400 {"error": ...}.
    let reply = call(&r, Method::POST, "/GetKey", JSON, r#"{"algorithm":"rsa"}"#).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json(), json!({"error": "unsupported algorithm: rsa"}));
    // Same error for a protobuf call comes back as a protobuf PrpcError, like dstack's prpc.
    let req = GetKeyArgs {
        algorithm: "rsa".into(),
        ..Default::default()
    };
    let reply = call(&r, Method::POST, "/GetKey", None, req.encode_to_vec()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.content_type, "application/protobuf");
    assert_eq!(
        PrpcError::decode(reply.body).unwrap().message,
        "unsupported algorithm: rsa"
    );
    // Decode errors → 400 naming the method and field.
    let reply = call(&r, Method::POST, "/GetQuote", JSON, r#"{"report_data":"0xZZ"}"#).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let err = reply.json()["error"].as_str().unwrap().to_owned();
    assert!(err.contains("GetQuote") && err.contains("report_data"), "{err}");
    let reply = call(&r, Method::POST, "/GetQuote", JSON, "{not json").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let reply = call(&r, Method::POST, "/GetQuote", None, vec![0x0a, 0x05, 0x01]).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(PrpcError::decode(reply.body).unwrap().message.contains("GetQuote"));
    // Unknown method → 404.
    let reply = call(&r, Method::POST, "/Nope", JSON, "{}").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.json(), json!({"error": "method not found: Nope"}));
    // Wrong verb → 405.
    let reply = call(&r, Method::PUT, "/GetKey", JSON, "{}").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    let reply = call(&r, Method::DELETE, "/Info", None, Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn body_limit() {
    let r = RpcRouter::new("").service(dstack_rpc::agent::DstackGuestServer::new(common::Agent));
    let r = r.body_limit(32);
    let small = r#"{"path":"a"}"#;
    let reply = call(&r, Method::POST, "/GetKey", JSON, small).await;
    assert_eq!(reply.status, StatusCode::OK);
    let big = format!(r#"{{"path":"{}"}}"#, "a".repeat(64));
    let reply = call(&r, Method::POST, "/GetKey", JSON, big).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(reply.json()["error"].as_str().unwrap().contains("32"));
}

#[tokio::test]
async fn handler_panic_is_contained() {
    let r = common::agent_router();
    let req = SignRequest {
        algorithm: "panic".into(),
        data: vec![],
    };
    let reply = call(&r, Method::POST, "/Sign?json", None, serde_json::to_vec(&req).unwrap()).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(reply.json()["error"].as_str().unwrap().contains("panicked"));
    // The router keeps serving.
    let reply = call(&r, Method::POST, "/Sign?json", None, r#"{"data":"01"}"#).await;
    assert_eq!(reply.json()["signature"], "01");
    let _: Arc<RpcRouter> = r;
}
