//! The object-safe interface between the HTTP router and generated service servers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{CallContext, Encoding, RpcError, Transport, codec};

/// A boxed, `Send` future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An encoded response body (protobuf or JSON, per the request's [`Encoding`]).
pub type EncodedResponse = Bytes;

/// One pRPC service: decodes a request, calls the handler, encodes the response.
/// Implemented by every generated `<Service>Server<T>`.
pub trait Dispatch: Send + Sync + 'static {
    /// The proto service name (e.g. `KMS`, `Tappd`), accepted as a `Service.` method prefix.
    fn service_name(&self) -> &'static str;
    /// Bare method names this service answers.
    fn methods(&self) -> &'static [&'static str];
    /// Handles one call of `method` (bare name) with a body in `encoding`.
    fn dispatch<'a>(
        &'a self,
        ctx: &'a CallContext,
        method: &'a str,
        encoding: Encoding,
        body: Bytes,
    ) -> BoxFuture<'a, Result<EncodedResponse, RpcError>>;
}

impl<D: Dispatch + ?Sized> Dispatch for Arc<D> {
    fn service_name(&self) -> &'static str {
        (**self).service_name()
    }
    fn methods(&self) -> &'static [&'static str] {
        (**self).methods()
    }
    fn dispatch<'a>(
        &'a self,
        ctx: &'a CallContext,
        method: &'a str,
        encoding: Encoding,
        body: Bytes,
    ) -> BoxFuture<'a, Result<EncodedResponse, RpcError>> {
        (**self).dispatch(ctx, method, encoding, body)
    }
}

/// A [`Transport`] that calls a service in-process (protobuf round trip, no sockets): lets a
/// generated client drive a server in tests or inside one binary.
#[derive(Clone)]
pub struct LocalTransport {
    service: Arc<dyn Dispatch>,
    ctx: CallContext,
}

impl LocalTransport {
    /// Calls `service` with [`CallContext::local`].
    pub fn new(service: impl Dispatch) -> Self {
        Self::with_context(service, CallContext::local())
    }

    /// Calls `service` with a given context (e.g. to simulate a TLS peer).
    pub fn with_context(service: impl Dispatch, ctx: CallContext) -> Self {
        Self {
            service: Arc::new(service),
            ctx,
        }
    }
}

impl Transport for LocalTransport {
    async fn call<Req, Resp>(&self, method: &str, req: &Req) -> Result<Resp, RpcError>
    where
        Req: Message + Serialize + Sync,
        Resp: Message + DeserializeOwned + Default + Send,
    {
        let mut ctx = self.ctx.clone();
        ctx.service = self.service.service_name();
        ctx.method = method.to_owned();
        let body = Bytes::from(req.encode_to_vec());
        let out = self.service.dispatch(&ctx, method, Encoding::Protobuf, body).await?;
        codec::decode_protobuf(method, &out)
    }
}
