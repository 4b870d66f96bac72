//! pRPC adapters: `DstackGuest` (dstack socket, root paths) and legacy `Tappd` (tappd socket, `/prpc`).

use std::sync::Arc;

use dstack_rpc::agent::{
    AppInfo, AttestResponse, DeriveK256KeyResponse, DeriveKeyArgs, DstackGuestRpc, DstackGuestServer, EmitEventArgs,
    GetKeyArgs, GetKeyResponse, GetQuoteResponse, GetTlsKeyArgs, GetTlsKeyResponse, GpuInfoResponse, RawQuoteArgs,
    SignRequest, SignResponse, TappdRpc, TappdServer, TdxQuoteArgs, TdxQuoteResponse, VerifyRequest, VerifyResponse,
    WorkerVersion,
};
use dstack_rpc::{CallContext, Empty, RpcError, RpcRouter};

use crate::{Agent, AgentError};

fn rpc_err(e: AgentError) -> RpcError {
    RpcError::handler(e)
}

/// `WorkerVersion` of this build (`rev` from `DSTACK_RS_REV` at build time, if set).
pub fn version() -> WorkerVersion {
    WorkerVersion {
        version: env!("CARGO_PKG_VERSION").into(),
        rev: option_env!("DSTACK_RS_REV").unwrap_or_default().into(),
    }
}

/// The `DstackGuest` service over an [`Agent`].
#[derive(Debug, Clone)]
pub struct DstackGuestService(pub Arc<Agent>);

impl DstackGuestRpc for DstackGuestService {
    async fn get_tls_key(&self, _: &CallContext, req: GetTlsKeyArgs) -> Result<GetTlsKeyResponse, RpcError> {
        self.0.get_tls_key(&req).await.map_err(rpc_err)
    }

    async fn get_key(&self, _: &CallContext, req: GetKeyArgs) -> Result<GetKeyResponse, RpcError> {
        self.0.get_key(&req.path, &req.purpose, &req.algorithm).map_err(rpc_err)
    }

    async fn get_quote(&self, _: &CallContext, req: RawQuoteArgs) -> Result<GetQuoteResponse, RpcError> {
        self.0.get_quote(&req.report_data).await.map_err(rpc_err)
    }

    async fn attest(&self, _: &CallContext, req: RawQuoteArgs) -> Result<AttestResponse, RpcError> {
        self.0.attest(&req.report_data).await.map_err(rpc_err)
    }

    async fn info(&self, _: &CallContext, _: Empty) -> Result<AppInfo, RpcError> {
        self.0.info().await.map_err(rpc_err)
    }

    async fn gpu_info(&self, _: &CallContext, _: Empty) -> Result<GpuInfoResponse, RpcError> {
        Ok(GpuInfoResponse {
            attestation: self.0.gpu_info(),
        })
    }

    async fn sign(&self, _: &CallContext, req: SignRequest) -> Result<SignResponse, RpcError> {
        self.0.sign(&req.algorithm, &req.data).map_err(rpc_err)
    }

    async fn verify(&self, _: &CallContext, req: VerifyRequest) -> Result<VerifyResponse, RpcError> {
        let valid = self
            .0
            .verify(&req.algorithm, &req.data, &req.signature, &req.public_key)
            .map_err(rpc_err)?;
        Ok(VerifyResponse { valid })
    }

    async fn version(&self, _: &CallContext, _: Empty) -> Result<WorkerVersion, RpcError> {
        Ok(version())
    }

    async fn emit_event(&self, _: &CallContext, req: EmitEventArgs) -> Result<Empty, RpcError> {
        self.0.emit_event(&req.event, &req.payload).await.map_err(rpc_err)?;
        Ok(Empty {})
    }
}

/// The legacy `Tappd` service over an [`Agent`].
#[derive(Debug, Clone)]
pub struct TappdService(pub Arc<Agent>);

impl TappdRpc for TappdService {
    async fn derive_key(&self, _: &CallContext, req: DeriveKeyArgs) -> Result<GetTlsKeyResponse, RpcError> {
        self.0.derive_key(&req).await.map_err(rpc_err)
    }

    async fn derive_k256_key(&self, _: &CallContext, req: GetKeyArgs) -> Result<DeriveK256KeyResponse, RpcError> {
        let k = self.0.get_key(&req.path, &req.purpose, "secp256k1").map_err(rpc_err)?;
        Ok(DeriveK256KeyResponse {
            k256_key: k.key,
            k256_signature_chain: k.signature_chain,
        })
    }

    async fn tdx_quote(&self, _: &CallContext, req: TdxQuoteArgs) -> Result<TdxQuoteResponse, RpcError> {
        self.0
            .tdx_quote(&req.report_data, &req.hash_algorithm, &req.prefix)
            .await
            .map_err(rpc_err)
    }

    async fn raw_quote(&self, _: &CallContext, req: RawQuoteArgs) -> Result<TdxQuoteResponse, RpcError> {
        self.0.tdx_quote(&req.report_data, "raw", "").await.map_err(rpc_err)
    }

    async fn info(&self, _: &CallContext, _: Empty) -> Result<AppInfo, RpcError> {
        self.0.info().await.map_err(rpc_err)
    }

    async fn version(&self, _: &CallContext, _: Empty) -> Result<WorkerVersion, RpcError> {
        Ok(version())
    }
}

/// Router for the dstack socket: `DstackGuest` at the root (`POST /GetKey`, also `/DstackGuest.GetKey`).
pub fn dstack_router(agent: Arc<Agent>) -> RpcRouter {
    RpcRouter::new("").service(DstackGuestServer::new(DstackGuestService(agent)))
}

/// Router for the tappd socket: `Tappd` under `/prpc` (`/prpc/Tappd.TdxQuote` and `/prpc/TdxQuote`).
pub fn tappd_router(agent: Arc<Agent>) -> RpcRouter {
    RpcRouter::new("/prpc").service(TappdServer::new(TappdService(agent)))
}
