//! pRPC wire layer shared by the guest agent, KMS, gateway and VMM.
//!
//! * Proto types for dstack-compatible APIs (`proto/*.proto`), generated with prost and mapped to
//!   JSON like dstack does: proto snake_case names, `bytes` as lowercase hex (upper case and a
//!   `0x` prefix accepted on input), missing fields default, unknown fields ignored, proto3
//!   `optional` omitted when unset.
//! * Per service `<Service>Rpc` (handler trait), `<Service>Server<T>` ([`Dispatch`]) and
//!   `<Service>Client<C>` (over a [`Transport`], normally [`Client`]).
//! * [`RpcRouter`]: `POST <prefix>/[Service.]<Method>` with a protobuf or JSON body
//!   (`Content-Type: application/json` or `?json`), `GET <prefix>/<Method>?field=value` answered
//!   with JSON (values typed by the field, a repeated key fills a repeated field). Legacy
//!   `Service.` names are added with [`RpcRouter::alias`] (e.g. `Tproxy` → `Gateway`). Errors: 400 (decode or handler error), 404 (unknown method), 405, 413, 500
//!   (handler panic). As in dstack's prpc, the error body is `{"error": "..."}` for JSON and
//!   GET calls and a protobuf `PrpcError { string message = 1; }` for protobuf calls.
//! * Listeners for TCP, TLS (with client certificates) and unix sockets; a [`Client`] for
//!   `http://`, `https://` and `unix:` endpoints.
//!
//! ```no_run
//! use std::sync::Arc;
//! use dstack_rpc::kms::{AppId, KmsClient, KmsRpc, KmsServer, PublicKeyResponse};
//! use dstack_rpc::{CallContext, Client, RpcError, RpcRouter, serve_tcp};
//! # use dstack_rpc::kms::*;
//! # use dstack_rpc::Empty;
//!
//! struct Kms;
//!
//! impl KmsRpc for Kms {
//!     async fn get_app_env_encrypt_pub_key(
//!         &self,
//!         _ctx: &CallContext,
//!         req: AppId,
//!     ) -> Result<PublicKeyResponse, RpcError> {
//!         if req.app_id.len() != 20 {
//!             return Err(RpcError::handler("app_id must be 20 bytes"));
//!         }
//!         Ok(PublicKeyResponse { public_key: vec![7; 32], ..Default::default() })
//!     }
//!     // ... the other KMS methods
//! #   async fn get_app_key(&self, _: &CallContext, _: GetAppKeyRequest) -> Result<AppKeyResponse, RpcError> { Err(RpcError::handler("unimplemented")) }
//! #   async fn get_kms_key(&self, _: &CallContext, _: GetKmsKeyRequest) -> Result<KmsKeyResponse, RpcError> { Err(RpcError::handler("unimplemented")) }
//! #   async fn get_meta(&self, _: &CallContext, _: Empty) -> Result<GetMetaResponse, RpcError> { Err(RpcError::handler("unimplemented")) }
//! #   async fn get_temp_ca_cert(&self, _: &CallContext, _: Empty) -> Result<GetTempCaCertResponse, RpcError> { Err(RpcError::handler("unimplemented")) }
//! #   async fn sign_cert(&self, _: &CallContext, _: SignCertRequest) -> Result<SignCertResponse, RpcError> { Err(RpcError::handler("unimplemented")) }
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // Server: KMS methods under /prpc (also reachable as /prpc/KMS.<Method>).
//! let router = Arc::new(RpcRouter::new("/prpc").service(KmsServer::new(Kms)));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(serve_tcp(listener, router, async { let _ = stopped.await; }));
//!
//! // Client: protobuf by default, `.with_json(true)` for JSON.
//! let kms = KmsClient::new(Client::new("http://127.0.0.1:8000/prpc")?);
//! let key = kms.get_app_env_encrypt_pub_key(AppId { app_id: vec![1; 20] }).await?;
//! assert_eq!(key.public_key.len(), 32);
//!
//! let _ = stop.send(());
//! server.await??;
//! # Ok(())
//! # }
//! ```

mod client;
pub mod codec;
mod context;
mod dispatch;
mod error;
#[cfg(test)]
mod mapping_tests;
mod query;
mod router;
pub mod serde_hex;
mod serve;
pub mod vsock;

pub use client::{Client, RawResponse, Transport};
pub use codec::{Encoding, PrpcError};
pub use context::{CallContext, ConnInfo, RemoteAddr, UnixPeer};
pub use dispatch::{BoxFuture, Dispatch, EncodedResponse, LocalTransport};
pub use error::RpcError;
pub use router::{DEFAULT_BODY_LIMIT, RpcRouter};
pub use serve::{Listener, bind_unix, serve, serve_connection, serve_tcp, serve_tls, serve_unix};

/// `google.protobuf.Empty`; its JSON form is `{}`.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Empty {}

/// Guest agent API (`dstack_guest`): `Tappd`, `DstackGuest`, `Worker`.
#[allow(missing_docs)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/dstack_guest.rs"));
}

/// KMS API (`kms`): `KMS`, `Admin`, `Onboard`.
#[allow(missing_docs)]
pub mod kms {
    include!(concat!(env!("OUT_DIR"), "/kms.rs"));
}

/// Gateway API (`gateway`): `Gateway`, `Admin` (subset), `Debug`.
#[allow(missing_docs)]
pub mod gateway {
    include!(concat!(env!("OUT_DIR"), "/gateway.rs"));
}

/// VMM API (`vmm`): `Vmm`.
#[allow(missing_docs)]
pub mod vmm {
    include!(concat!(env!("OUT_DIR"), "/vmm.rs"));
}

/// Host API served by the VMM to CVMs (`host_api`): `HostApi`.
#[allow(missing_docs)]
pub mod host_api {
    include!(concat!(env!("OUT_DIR"), "/host_api.rs"));
}

/// Guest API served by the agent to the VMM (`guest_api`): `GuestApi`, `ProxiedGuestApi`.
#[allow(missing_docs)]
pub mod guest_api {
    include!(concat!(env!("OUT_DIR"), "/guest_api.rs"));
}

/// Simulated TDX module protocol (`sim_tdx`): `SimTdx` (ours; served by the host VMM per VM).
#[allow(missing_docs)]
pub mod sim_tdx {
    include!(concat!(env!("OUT_DIR"), "/sim_tdx.rs"));
}
