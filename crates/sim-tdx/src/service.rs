//! The `sim_tdx.SimTdx` pRPC service over a [`SimTdx`].

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use dstack_measurements::eventlog::TdxEvent;
use dstack_rpc::sim_tdx::{
    EventLog, ExtendRtmrRequest, GetQuoteRequest, GetQuoteResponse, Measurements, SimInfo, SimTdxRpc, SimTdxServer,
};
use dstack_rpc::{CallContext, Empty, RpcError, RpcRouter};

use crate::SimTdx;

/// Serves a [`SimTdx`] as `sim_tdx.SimTdx`.
#[derive(Debug, Clone)]
pub struct SimTdxService(pub Arc<SimTdx>);

fn handler(e: impl std::fmt::Display) -> RpcError {
    RpcError::Handler(e.to_string())
}

fn log_json(events: &[TdxEvent]) -> Result<EventLog, RpcError> {
    Ok(EventLog {
        event_log: serde_json::to_string(events).map_err(handler)?,
    })
}

impl SimTdxRpc for SimTdxService {
    async fn get_quote(&self, _: &CallContext, req: GetQuoteRequest) -> Result<GetQuoteResponse, RpcError> {
        let sim = Arc::clone(&self.0);
        // ECDSA signing takes ~a millisecond; keep it off the reactor threads.
        let quote = tokio::task::spawn_blocking(move || sim.quote(&req.report_data))
            .await
            .map_err(handler)?
            .map_err(handler)?;
        Ok(GetQuoteResponse { quote })
    }

    async fn extend_rtmr(&self, _: &CallContext, req: ExtendRtmrRequest) -> Result<Empty, RpcError> {
        let event = req
            .event
            .as_deref()
            .map(|name| (name, req.payload.as_deref().unwrap_or_default()));
        self.0.extend_rtmr(req.index, &req.digest, event).map_err(handler)?;
        Ok(Empty {})
    }

    async fn get_rtmrs(&self, _: &CallContext, _: Empty) -> Result<Measurements, RpcError> {
        let r = self.0.registers();
        let [rtmr0, rtmr1, rtmr2, rtmr3] = r.rtmr.map(|v| v.to_vec());
        Ok(Measurements {
            mrtd: r.mrtd.to_vec(),
            rtmr0,
            rtmr1,
            rtmr2,
            rtmr3,
            mr_config_id: r.mr_config_id.to_vec(),
        })
    }

    async fn get_boot_event_log(&self, _: &CallContext, _: Empty) -> Result<EventLog, RpcError> {
        log_json(&self.0.boot_event_log())
    }

    async fn get_runtime_event_log(&self, _: &CallContext, _: Empty) -> Result<EventLog, RpcError> {
        log_json(&self.0.runtime_event_log())
    }

    async fn info(&self, _: &CallContext, _: Empty) -> Result<SimInfo, RpcError> {
        Ok(SimInfo {
            root_cert_pem: self.0.root_cert_pem().to_owned(),
            root_spki_sha256: self.0.root_spki_sha256().to_vec(),
            simulated: true,
        })
    }
}

/// The router serving `sim` at the root path (`POST /GetQuote`, …).
pub fn router(sim: Arc<SimTdx>) -> Arc<RpcRouter> {
    Arc::new(RpcRouter::new("").service(SimTdxServer::new(SimTdxService(sim))))
}

/// Serves `sim` on a unix socket at `path` (mode 0600: only the VMM's user may talk to it) until `shutdown`.
pub async fn serve_unix(
    sim: Arc<SimTdx>,
    path: impl AsRef<Path>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let listener = dstack_rpc::bind_unix(path.as_ref(), 0o600)?;
    dstack_rpc::serve_unix(listener, router(sim), shutdown).await
}
