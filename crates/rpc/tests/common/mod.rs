//! A small guest-agent-like service used by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use dstack_rpc::agent::*;
use dstack_rpc::{CallContext, Empty, RpcError, RpcRouter};

pub struct Agent;

impl DstackGuestRpc for Agent {
    async fn get_tls_key(&self, _ctx: &CallContext, req: GetTlsKeyArgs) -> Result<GetTlsKeyResponse, RpcError> {
        Ok(GetTlsKeyResponse {
            key: format!("key-for-{}", req.subject),
            certificate_chain: req.alt_names,
        })
    }

    async fn get_key(&self, _ctx: &CallContext, req: GetKeyArgs) -> Result<GetKeyResponse, RpcError> {
        if !matches!(req.algorithm.as_str(), "" | "secp256k1" | "ed25519") {
            return Err(RpcError::handler(format!("unsupported algorithm: {}", req.algorithm)));
        }
        // Echo the inputs so the tests can see exactly what was decoded.
        Ok(GetKeyResponse {
            key: req.path.into_bytes(),
            signature_chain: vec![req.purpose.into_bytes(), req.algorithm.into_bytes()],
        })
    }

    async fn get_quote(&self, _ctx: &CallContext, req: RawQuoteArgs) -> Result<GetQuoteResponse, RpcError> {
        if req.report_data.len() > 64 {
            return Err(RpcError::handler("Report data is too long"));
        }
        let mut report_data = req.report_data;
        report_data.resize(64, 0);
        Ok(GetQuoteResponse {
            quote: vec![0x04, 0x00],
            event_log: "[]".into(),
            report_data,
            vm_config: "{}".into(),
            attestation: vec![],
        })
    }

    async fn attest(&self, _ctx: &CallContext, req: RawQuoteArgs) -> Result<AttestResponse, RpcError> {
        if req.report_data == b"slow" {
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        }
        Ok(AttestResponse {
            attestation: req.report_data,
        })
    }

    async fn info(&self, ctx: &CallContext, _req: Empty) -> Result<AppInfo, RpcError> {
        // Reports what the handler saw about the caller.
        Ok(AppInfo {
            app_name: ctx.remote.to_string(),
            app_cert: format!("certs={}", ctx.peer_certificates.as_ref().map_or(0, |c| c.len())),
            device_id: ctx
                .peer_leaf_certificate()
                .map(|c| c.as_ref().to_vec())
                .unwrap_or_default(),
            key_provider_info: format!("{}|{}|{}", ctx.path_prefix, ctx.service, ctx.method),
            ..Default::default()
        })
    }

    async fn gpu_info(&self, _ctx: &CallContext, _req: Empty) -> Result<GpuInfoResponse, RpcError> {
        Ok(GpuInfoResponse::default())
    }

    async fn sign(&self, _ctx: &CallContext, req: SignRequest) -> Result<SignResponse, RpcError> {
        if req.algorithm == "panic" {
            panic!("handler panic requested by test");
        }
        Ok(SignResponse {
            signature: req.data,
            ..Default::default()
        })
    }

    async fn verify(&self, _ctx: &CallContext, req: VerifyRequest) -> Result<VerifyResponse, RpcError> {
        Ok(VerifyResponse {
            valid: req.signature == req.data,
        })
    }

    async fn version(&self, ctx: &CallContext, _req: Empty) -> Result<WorkerVersion, RpcError> {
        Ok(WorkerVersion {
            version: "0.6.0-test".into(),
            rev: ctx.bearer_token().unwrap_or_default().to_owned(),
        })
    }

    async fn emit_event(&self, _ctx: &CallContext, req: EmitEventArgs) -> Result<Empty, RpcError> {
        if req.event.is_empty() {
            return Err(RpcError::handler("event name is empty"));
        }
        Ok(Empty {})
    }
}

impl TappdRpc for Agent {
    async fn derive_key(&self, _ctx: &CallContext, req: DeriveKeyArgs) -> Result<GetTlsKeyResponse, RpcError> {
        Ok(GetTlsKeyResponse {
            key: req.path,
            certificate_chain: vec![],
        })
    }

    async fn derive_k256_key(&self, _ctx: &CallContext, req: GetKeyArgs) -> Result<DeriveK256KeyResponse, RpcError> {
        Ok(DeriveK256KeyResponse {
            k256_key: req.path.into_bytes(),
            k256_signature_chain: vec![],
        })
    }

    async fn tdx_quote(&self, _ctx: &CallContext, req: TdxQuoteArgs) -> Result<TdxQuoteResponse, RpcError> {
        Ok(TdxQuoteResponse {
            quote: req.report_data,
            event_log: "[]".into(),
            hash_algorithm: req.hash_algorithm,
            prefix: "tappd".into(),
        })
    }

    async fn raw_quote(&self, _ctx: &CallContext, req: RawQuoteArgs) -> Result<TdxQuoteResponse, RpcError> {
        Ok(TdxQuoteResponse {
            quote: req.report_data,
            ..Default::default()
        })
    }

    async fn info(&self, _ctx: &CallContext, _req: Empty) -> Result<AppInfo, RpcError> {
        Ok(AppInfo {
            app_name: "tappd-info".into(),
            ..Default::default()
        })
    }

    async fn version(&self, _ctx: &CallContext, _req: Empty) -> Result<WorkerVersion, RpcError> {
        Ok(WorkerVersion {
            version: "tappd".into(),
            rev: String::new(),
        })
    }
}

/// The agent socket layout: DstackGuest at the root.
pub fn agent_router() -> Arc<RpcRouter> {
    Arc::new(RpcRouter::new("").service(DstackGuestServer::new(Agent)))
}

/// The legacy tappd layout: Tappd under /prpc (DstackGuest added second to test precedence).
pub fn tappd_router() -> Arc<RpcRouter> {
    Arc::new(
        RpcRouter::new("/prpc")
            .service(TappdServer::new(Agent))
            .service(DstackGuestServer::new(Agent)),
    )
}

/// A VMM whose `Status` lists one VM; every other method is refused.
pub struct Vmm;

macro_rules! refuse {
    ($($name:ident: $req:ty => $resp:ty),* $(,)?) => {
        $(
            async fn $name(&self, _ctx: &CallContext, _req: $req) -> Result<$resp, RpcError> {
                Err(RpcError::handler(concat!(stringify!($name), " is not supported")))
            }
        )*
    };
}

impl dstack_rpc::vmm::VmmRpc for Vmm {
    async fn status(
        &self,
        _ctx: &CallContext,
        req: dstack_rpc::vmm::StatusRequest,
    ) -> Result<dstack_rpc::vmm::StatusResponse, RpcError> {
        use dstack_rpc::vmm::{StatusResponse, VmConfiguration, VmInfo};
        Ok(StatusResponse {
            vms: vec![VmInfo {
                id: "vm-1".into(),
                name: "demo".into(),
                status: "running".into(),
                configuration: (!req.brief).then(|| VmConfiguration {
                    vcpu: 2,
                    encrypted_env: vec![0xAB],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            port_mapping_enabled: true,
            total: 1,
        })
    }

    refuse! {
        create_vm: dstack_rpc::vmm::VmConfiguration => dstack_rpc::vmm::Id,
        start_vm: dstack_rpc::vmm::Id => Empty,
        stop_vm: dstack_rpc::vmm::Id => Empty,
        remove_vm: dstack_rpc::vmm::Id => Empty,
        upgrade_app: dstack_rpc::vmm::UpdateVmRequest => dstack_rpc::vmm::Id,
        update_vm: dstack_rpc::vmm::UpdateVmRequest => dstack_rpc::vmm::Id,
        shutdown_vm: dstack_rpc::vmm::Id => Empty,
        resize_vm: dstack_rpc::vmm::ResizeVmRequest => Empty,
        get_compose_hash: dstack_rpc::vmm::VmConfiguration => dstack_rpc::vmm::ComposeHash,
        list_images: Empty => dstack_rpc::vmm::ImageListResponse,
        get_app_env_encrypt_pub_key: dstack_rpc::vmm::AppId => dstack_rpc::vmm::PublicKeyResponse,
        get_info: dstack_rpc::vmm::Id => dstack_rpc::vmm::GetInfoResponse,
        version: Empty => dstack_rpc::vmm::VersionResponse,
        get_meta: Empty => dstack_rpc::vmm::GetMetaResponse,
        list_gpus: Empty => dstack_rpc::vmm::ListGpusResponse,
        reload_vms: Empty => dstack_rpc::vmm::ReloadVmsResponse,
        sv_list: Empty => dstack_rpc::vmm::SvListResponse,
        sv_stop: dstack_rpc::vmm::Id => Empty,
        sv_remove: dstack_rpc::vmm::Id => Empty,
        list_registry_images: Empty => dstack_rpc::vmm::RegistryImageListResponse,
        pull_registry_image: dstack_rpc::vmm::PullRegistryImageRequest => Empty,
        delete_image: dstack_rpc::vmm::Id => Empty,
    }
}

/// The VMM layout: Vmm under /prpc, also reachable with the legacy `Teepod.` prefix.
pub fn vmm_router() -> Arc<RpcRouter> {
    Arc::new(
        RpcRouter::new("/prpc")
            .service(dstack_rpc::vmm::VmmServer::new(Vmm))
            .alias("Teepod", "Vmm"),
    )
}
