//! [`Tee`] backed by the simulated TDX module (`dstack-sim-tdx`) over pRPC (vsock in a guest, a unix socket
//! in tests). Nothing here claims TDX: [`Tee::kind`] is [`TeeKind::Simulated`] and the quotes carry the
//! simulator's vendor id, so verifiers refuse them unless `allow_simulated` is set.

use dstack_measurements::eventlog::parse_json_log;
use dstack_rpc::sim_tdx::{ExtendRtmrRequest, GetQuoteRequest, SimInfo, SimTdxClient};
use dstack_rpc::{Client, RpcError};

use crate::{
    QUOTE_REPORT_DATA_LEN, RTMR_LEN, Rtmrs, RuntimeEvent, SimEndpoint, TdxEvent, Tee, TeeError, TeeFuture, TeeKind,
};

/// Client of the simulated TDX module.
#[derive(Debug, Clone)]
pub struct SimulatedTee {
    client: SimTdxClient<Client>,
    endpoint: String,
}

impl SimulatedTee {
    /// A client for `endpoint` (no I/O until the first call).
    pub fn new(endpoint: &SimEndpoint) -> Self {
        let client = match endpoint {
            SimEndpoint::Vsock { cid, port } => Client::vsock(*cid, *port, ""),
            SimEndpoint::Unix(path) => Client::unix(path, ""),
        };
        Self {
            client: SimTdxClient::new(client),
            endpoint: endpoint.to_string(),
        }
    }

    fn err(&self) -> impl Fn(RpcError) -> TeeError + '_ {
        |e| TeeError::Simulator {
            endpoint: self.endpoint.clone(),
            message: e.to_string(),
        }
    }

    /// The module's `Info` (root certificate to pin).
    pub async fn info(&self) -> Result<SimInfo, TeeError> {
        self.client.info().await.map_err(self.err())
    }

    async fn extend(&self, req: ExtendRtmrRequest) -> Result<(), TeeError> {
        self.client.extend_rtmr(req).await.map_err(self.err())?;
        Ok(())
    }

    async fn read_rtmrs(&self) -> Result<Rtmrs, TeeError> {
        let m = self.client.get_rtmrs().await.map_err(self.err())?;
        let mut out = [[0u8; RTMR_LEN]; 4];
        for (i, (slot, v)) in out.iter_mut().zip([m.rtmr0, m.rtmr1, m.rtmr2, m.rtmr3]).enumerate() {
            *slot = v
                .as_slice()
                .try_into()
                .map_err(|_| TeeError::Malformed(format!("simulated module returned a {}-byte RTMR{i}", v.len())))?;
        }
        Ok(out)
    }

    async fn read_boot_log(&self) -> Result<Vec<TdxEvent>, TeeError> {
        let log = self.client.get_boot_event_log().await.map_err(self.err())?;
        parse_json_log(log.event_log.as_bytes())
            .map_err(|e| TeeError::Malformed(format!("simulated module boot event log: {e}")))
    }
}

impl Tee for SimulatedTee {
    fn kind(&self) -> TeeKind {
        TeeKind::Simulated
    }

    fn quote(&self, report_data: [u8; QUOTE_REPORT_DATA_LEN]) -> TeeFuture<'_, Vec<u8>> {
        Box::pin(async move {
            let resp = self
                .client
                .get_quote(GetQuoteRequest {
                    report_data: report_data.to_vec(),
                })
                .await
                .map_err(self.err())?;
            if resp.quote.is_empty() {
                return Err(TeeError::Malformed("simulated module returned an empty quote".into()));
            }
            Ok(resp.quote)
        })
    }

    fn extend_rtmr(&self, index: u32, digest: [u8; RTMR_LEN]) -> TeeFuture<'_, ()> {
        Box::pin(self.extend(ExtendRtmrRequest {
            index,
            digest: digest.to_vec(),
            event: None,
            payload: None,
        }))
    }

    fn extend_runtime_event(&self, event: RuntimeEvent) -> TeeFuture<'_, ()> {
        Box::pin(self.extend(ExtendRtmrRequest {
            index: 3,
            digest: event.digest().to_vec(),
            event: Some(event.name),
            payload: Some(event.payload),
        }))
    }

    fn rtmrs(&self) -> TeeFuture<'_, Rtmrs> {
        Box::pin(self.read_rtmrs())
    }

    fn boot_event_log(&self) -> TeeFuture<'_, Vec<TdxEvent>> {
        Box::pin(self.read_boot_log())
    }
}
