//! Host notifications (`HostApi.Notify`): `boot.progress`, `boot.error`, `instance.info`. Failures are
//! logged, never fatal (the host is untrusted and may be absent), as dstack's `notify_q`.

use dstack_rpc::host_api::{HostApiClient, Notification};

/// Sends notifications to the host.
pub trait Notifier: Send + Sync {
    fn notify(&self, event: &str, payload: &str);
}

/// Discards notifications (no host API configured).
#[derive(Debug, Default)]
pub struct NullNotifier;

impl Notifier for NullNotifier {
    fn notify(&self, event: &str, payload: &str) {
        tracing::info!("host notification (no host API): {event}: {payload}");
    }
}

/// `HostApi` over the generated pRPC client.
pub struct HostApiNotifier {
    client: HostApiClient,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for HostApiNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostApiNotifier")
    }
}

impl HostApiNotifier {
    /// `url`: `vsock://<cid>:<port>[/path]` (sys-config's form, e.g. `vsock://2:10000/api`),
    /// `vsock:<cid>:<port>`, `http://<ip>:<port>/api` or `unix:/path`. Host names are not resolved in the boot
    /// path (static binary, no NSS): use IP literals.
    pub fn new(url: &str) -> Result<Self, String> {
        // The VMM serves the host API under `/api` (dstack); vsock and unix endpoints without a path get it.
        let client = if let Some(path) = url.strip_prefix("unix:") {
            dstack_rpc::Client::unix(path, "/api")
        } else if let Some(rest) = url.strip_prefix("vsock://").or_else(|| url.strip_prefix("vsock:")) {
            let (addr, prefix) = vsock_parts(rest);
            dstack_rpc::Client::new(&format!("vsock:{addr}"))
                .map_err(|e| e.to_string())?
                .with_path_prefix(&prefix)
        } else {
            dstack_rpc::Client::new(url).map_err(|e| e.to_string())?
        }
        .with_timeout(std::time::Duration::from_secs(10));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            client: HostApiClient::new(client),
            rt,
        })
    }
}

impl Notifier for HostApiNotifier {
    fn notify(&self, event: &str, payload: &str) {
        let req = Notification {
            event: event.to_owned(),
            payload: payload.to_owned(),
        };
        if let Err(e) = self.rt.block_on(self.client.notify(req)) {
            tracing::warn!("host notification {event} failed: {e}");
        }
    }
}

/// `<cid>:<port>[/path]` → (`<cid>:<port>`, path prefix, default `/api`).
fn vsock_parts(rest: &str) -> (&str, String) {
    match rest.split_once('/') {
        Some((a, p)) if !p.trim_matches('/').is_empty() => (a, format!("/{}", p.trim_matches('/'))),
        Some((a, _)) => (a, "/api".to_owned()),
        None => (rest, "/api".to_owned()),
    }
}

/// Picks the notifier for an endpoint (cmdline override, else sys-config `host_api_url`).
pub fn for_endpoint(url: Option<&str>) -> Box<dyn Notifier> {
    match url.filter(|u| !u.is_empty()) {
        None => Box::new(NullNotifier),
        Some(u) => match HostApiNotifier::new(u) {
            Ok(n) => Box::new(n),
            Err(e) => {
                tracing::warn!("host API {u}: {e}; notifications are only logged");
                Box::new(NullNotifier)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dstack_rpc::host_api::{HostApiRpc, HostApiServer};
    use dstack_rpc::{CallContext, Empty, RpcError};
    use std::sync::{Arc, Mutex};

    struct Host(Arc<Mutex<Vec<(String, String)>>>);

    impl HostApiRpc for Host {
        async fn info(&self, _: &CallContext, _: Empty) -> Result<dstack_rpc::host_api::HostInfo, RpcError> {
            Ok(Default::default())
        }
        async fn notify(&self, _: &CallContext, n: Notification) -> Result<Empty, RpcError> {
            self.0.lock().unwrap().push((n.event, n.payload));
            Ok(Empty {})
        }
        async fn get_sealing_key(
            &self,
            _: &CallContext,
            _: dstack_rpc::host_api::GetSealingKeyRequest,
        ) -> Result<dstack_rpc::host_api::GetSealingKeyResponse, RpcError> {
            Err(RpcError::handler("no"))
        }
    }

    #[test]
    fn vsock_urls_parse() {
        assert_eq!(vsock_parts("2:10000/api"), ("2:10000", "/api".to_owned()));
        assert_eq!(vsock_parts("2:10000"), ("2:10000", "/api".to_owned()));
        assert_eq!(vsock_parts("2:10000/"), ("2:10000", "/api".to_owned()));
        assert_eq!(vsock_parts("3:9/x/y/"), ("3:9", "/x/y".to_owned()));
        assert!(HostApiNotifier::new("vsock://2:10000/api").is_ok());
        assert!(HostApiNotifier::new("vsock:2:10000").is_ok());
        assert!(HostApiNotifier::new("vsock://2/api").is_err(), "port required");
    }

    #[test]
    fn notifies_over_the_generated_client() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("host.sock");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let router = Arc::new(dstack_rpc::RpcRouter::new("/api").service(HostApiServer::new(Host(Arc::clone(&seen)))));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(async { dstack_rpc::bind_unix(&sock, 0o600) }).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(dstack_rpc::serve_unix(listener, router, async {
            let _ = stopped.await;
        }));
        let n = for_endpoint(Some(&format!("unix:{}", sock.display())));
        n.notify("boot.progress", "data disk ready");
        n.notify("instance.info", "{}");
        let _ = stop.send(());
        let _ = rt.block_on(server);
        assert_eq!(
            *seen.lock().unwrap(),
            [
                ("boot.progress".to_owned(), "data disk ready".to_owned()),
                ("instance.info".to_owned(), "{}".to_owned())
            ]
        );
    }
}
