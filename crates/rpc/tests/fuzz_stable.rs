//! Stable, bounded mutation fuzzing of pRPC request decoding (bodies come from any network peer) in all
//! three encodings: protobuf, JSON and GET query strings. Errors must be typed and name the method.
use dstack_rpc::codec::{Encoding, decode_request};
use dstack_rpc::gateway::{PortAttrs, PortPolicy, RegisterCvmRequest};
use dstack_rpc::kms::SignCertRequest;
use dstack_testkit::{Budget, Mutator, run_with, seed_from_env};
use prost::Message;

fn check<T>(method: &str, body: &[u8])
where
    T: Message + serde::de::DeserializeOwned + Default,
{
    for enc in [Encoding::Protobuf, Encoding::Json, Encoding::Query] {
        if let Err(e) = decode_request::<T>(method, enc, body) {
            assert!(e.to_string().contains(method), "{enc:?}: {e}");
        }
    }
}

#[test]
fn request_decoding_survives_mutation() {
    let reg = RegisterCvmRequest {
        client_public_key: "x".repeat(44),
        port_policy: Some(PortPolicy {
            ports: vec![PortAttrs { port: 443, pp: true }, PortAttrs { port: 80, pp: false }],
            restrict_mode: true,
        }),
    };
    let sign = SignCertRequest {
        api_version: 1,
        csr: vec![0x30; 64],
        signature: vec![1; 65],
        vm_config: "{}".into(),
    };
    let seeds = vec![
        reg.encode_to_vec(),
        serde_json::to_vec(&reg).unwrap(),
        sign.encode_to_vec(),
        serde_json::to_vec(&sign).unwrap(),
        b"api_version=1&csr=3030&vm_config=%7B%7D".to_vec(),
    ];
    let m = Mutator::new(seed_from_env()).with_dictionary([
        "null",
        "-1",
        "4294967296",
        "\"\"",
        "[]",
        "{}",
        "\"zz\"",
        "%",
        "&",
        "=",
        "\"ports\"",
        "\"port\"",
    ]);
    let r = run_with("prpc_request", &seeds, Budget::new(5_000, 4), m, |body| {
        check::<RegisterCvmRequest>("Gateway.RegisterCvm", body);
        check::<SignCertRequest>("KMS.SignCert", body);
    });
    assert!(r.mutated > 500, "{r:?}");
}
