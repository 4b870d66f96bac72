#![no_main]
//! pRPC request/response bodies (any network peer, or the untrusted host for the guest-side clients) in all
//! three encodings. Input: byte 0 picks the message type, byte 1 the encoding, the rest is the body.
//! Properties: decoding never panics, errors name the method, and an accepted message survives a re-encode
//! in the same encoding unchanged (protobuf and JSON), so servers and clients agree on what was sent.
use dstack_rpc::codec::{Encoding, decode_json, decode_request, encode_json};
use dstack_rpc::{agent, gateway, guest_api, host_api, kms, sim_tdx, vmm};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn check<T>(name: &str, encoding: Encoding, body: &[u8])
where
    T: Message + serde::Serialize + serde::de::DeserializeOwned + Default + PartialEq,
{
    match decode_request::<T>(name, encoding, body) {
        Err(e) => assert!(e.to_string().contains(name), "{e}"),
        Ok(msg) => match encoding {
            Encoding::Protobuf => {
                let again = T::decode(msg.encode_to_vec().as_slice()).expect("re-encoded protobuf decodes");
                assert!(again == msg, "{name}: protobuf round trip changed the message");
            }
            Encoding::Json => {
                let json = encode_json(name, &msg).expect("encodes");
                let again: T = decode_json(name, &json).expect("re-encoded JSON decodes");
                assert!(again == msg, "{name}: JSON round trip changed the message");
            }
            Encoding::Query => {}
        },
    }
}

macro_rules! types {
    ($pick:expr, $enc:expr, $body:expr; $($ty:ty),+ $(,)?) => {{
        let all: &[fn(Encoding, &[u8])] = &[$(|e, b| check::<$ty>(stringify!($ty), e, b)),+];
        all[$pick as usize % all.len()]($enc, $body)
    }};
}

fuzz_target!(|data: &[u8]| {
    let [pick, enc, body @ ..] = data else {
        return;
    };
    let enc = match enc % 3 {
        0 => Encoding::Protobuf,
        1 => Encoding::Json,
        _ => Encoding::Query,
    };
    types!(*pick, enc, body;
        // Requests served to the network or to containers.
        agent::GetTlsKeyArgs, agent::DeriveKeyArgs, agent::GetKeyArgs, agent::TdxQuoteArgs, agent::RawQuoteArgs,
        agent::SignRequest, agent::VerifyRequest, agent::GetAttestationForAppKeyRequest, agent::EmitEventArgs,
        gateway::RegisterCvmRequest, gateway::DebugRegisterCvmRequest, gateway::GetInfoRequest,
        gateway::SetNodeStatusRequest, gateway::GatewayState,
        kms::GetAppKeyRequest, kms::AppId, kms::GetKmsKeyRequest, kms::SignCertRequest,
        kms::RevokeCertsRequest, kms::BootstrapRequest, kms::OnboardRequest,
        host_api::Notification, host_api::GetSealingKeyRequest, guest_api::Id,
        sim_tdx::GetQuoteRequest, sim_tdx::ExtendRtmrRequest,
        vmm::VmConfiguration, vmm::Id, vmm::UpdateVmRequest, vmm::StatusRequest, vmm::ResizeVmRequest,
        // Responses a client decodes from a peer it does not fully trust (the host, another gateway, the KMS
        // before its certificate is checked).
        kms::AppKeyResponse, kms::KmsKeyResponse, kms::GetTempCaCertResponse, kms::PublicKeyResponse,
        gateway::RegisterCvmResponse, host_api::HostInfo, host_api::GetSealingKeyResponse,
        sim_tdx::GetQuoteResponse, sim_tdx::Measurements, sim_tdx::EventLog, guest_api::SystemInfo,
    );
});
