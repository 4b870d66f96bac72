//! The admin listener: `GET /health`, `GET /status` (JSON, the fields of dstack's `Admin.Status`)
//! and `GET /metrics` (Prometheus text format). Read-only; bind it to loopback.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::debug;

use crate::proxy::ProxyState;
use crate::registration::Registrar;
use crate::wg::WgDevice;

/// What the admin endpoints report on.
#[derive(Clone)]
pub struct AdminState {
    /// The proxy (connection and byte counters, routing table).
    pub proxy: Arc<ProxyState>,
    /// Registration counters, when registration is served.
    pub registrar: Option<Arc<Registrar>>,
    /// The WireGuard device, when running.
    pub wg: Option<Arc<WgDevice>>,
}

/// One registered instance in `/status`.
#[derive(Debug, Serialize)]
pub struct HostInfo {
    /// Instance id (hex).
    pub instance_id: String,
    /// WireGuard address.
    pub ip: String,
    /// App id (hex).
    pub app_id: String,
    /// The proxy's base domain.
    pub base_domain: String,
    /// UNIX seconds of the latest WireGuard handshake (0 = never).
    pub latest_handshake: u64,
    /// Open proxied connections to the app.
    pub num_connections: u64,
}

/// `/status`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Open proxied connections.
    pub num_connections: u64,
    /// Registered instances, sorted by instance id.
    pub hosts: Vec<HostInfo>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl AdminState {
    /// Handshake times: the live device's view when running, else the routing table's.
    fn handshakes(&self) -> std::collections::HashMap<String, SystemTime> {
        use crate::registration::WgBackend;
        self.wg.as_ref().map(|w| w.latest_handshakes()).unwrap_or_default()
    }

    /// The `/status` document.
    pub fn status(&self) -> Status {
        let hs = self.handshakes();
        let mut hosts: Vec<HostInfo> = self
            .proxy
            .table
            .instances()
            .into_iter()
            .map(|i| HostInfo {
                latest_handshake: hs.get(&i.public_key).copied().or(i.latest_handshake).map_or(0, unix),
                num_connections: self.proxy.table.connections(&i.app_id) as u64,
                ip: i.ip.to_string(),
                base_domain: self.proxy.config.base_domain.clone(),
                instance_id: i.instance_id,
                app_id: i.app_id,
            })
            .collect();
        hosts.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        Status {
            num_connections: self.proxy.stats.active.load(Relaxed),
            hosts,
        }
    }

    /// The `/metrics` text.
    pub fn metrics(&self, now: SystemTime) -> String {
        let s = &self.proxy.stats;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let n = |v: u64| v as f64;
        metric(
            "dstack_gateway_connections_total",
            "counter",
            "Proxy connections accepted.",
            &[(String::new(), n(s.accepted.load(Relaxed)))],
        );
        metric(
            "dstack_gateway_connections_active",
            "gauge",
            "Proxy connections open.",
            &[(String::new(), n(s.active.load(Relaxed)))],
        );
        metric(
            "dstack_gateway_connections_rejected_total",
            "counter",
            "Proxy connections refused before reaching a backend.",
            &[(String::new(), n(s.rejected.load(Relaxed)))],
        );
        metric(
            "dstack_gateway_bytes_total",
            "counter",
            "Bytes proxied.",
            &[
                ("{direction=\"up\"}".into(), n(s.bytes_up.load(Relaxed))),
                ("{direction=\"down\"}".into(), n(s.bytes_down.load(Relaxed))),
            ],
        );
        metric(
            "dstack_gateway_bytes_spliced_total",
            "counter",
            "Proxied bytes moved by splice(2) without a userspace copy (TLS passthrough bulk data).",
            &[(String::new(), n(s.bytes_spliced.load(Relaxed)))],
        );
        let instances = self.proxy.table.instances();
        metric(
            "dstack_gateway_instances",
            "gauge",
            "Registered CVM instances.",
            &[(String::new(), instances.len() as f64)],
        );
        if let Some(r) = &self.registrar {
            metric(
                "dstack_gateway_registrations_total",
                "counter",
                "RegisterCvm calls by result.",
                &[
                    ("{result=\"accepted\"}".into(), n(r.stats.accepted.load(Relaxed))),
                    ("{result=\"refused\"}".into(), n(r.stats.refused.load(Relaxed))),
                ],
            );
        }
        let hs = self.handshakes();
        let ages: Vec<(String, f64)> = instances
            .iter()
            .filter_map(|i| {
                let at = hs.get(&i.public_key).copied().or(i.latest_handshake)?;
                let age = now.duration_since(at).unwrap_or(Duration::ZERO);
                // Ids are hex (validated at registration), so they need no label escaping.
                Some((
                    format!("{{instance_id=\"{}\",app_id=\"{}\"}}", i.instance_id, i.app_id),
                    age.as_secs_f64(),
                ))
            })
            .collect();
        metric(
            "dstack_gateway_wg_handshake_age_seconds",
            "gauge",
            "Seconds since the instance's latest WireGuard handshake.",
            &ages,
        );
        if let Some(w) = &self.wg {
            let st = w.stats();
            metric(
                "dstack_gateway_wg_datagrams_total",
                "counter",
                "WireGuard datagrams received / dropped.",
                &[
                    ("{result=\"received\"}".into(), n(st.rx_datagrams.load(Relaxed))),
                    ("{result=\"dropped\"}".into(), n(st.rx_dropped.load(Relaxed))),
                ],
            );
        }
        out
    }

    fn respond(&self, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let (code, ctype, body) = match (req.method(), req.uri().path()) {
            (&Method::GET, "/health") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
            (&Method::GET, "/status") => match serde_json::to_string(&self.status()) {
                Ok(j) => (StatusCode::OK, "application/json", j),
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
            },
            (&Method::GET, "/metrics") => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics(SystemTime::now()),
            ),
            (&Method::GET, _) => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_owned()),
            _ => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".to_owned()),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = code;
        resp.headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
        resp
    }
}

/// Serve the admin endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, state: AdminState) {
    let state = Arc::new(state);
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = state.respond(&req);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            // Bound a connection's life: the admin API answers small documents.
            match tokio::time::timeout(Duration::from_secs(60), conn).await {
                Ok(Err(e)) => debug!(%peer, "admin connection: {e}"),
                Err(_) => debug!(%peer, "admin connection timed out"),
                Ok(Ok(())) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::dns::{DnsError, TxtResolver};
    use crate::routing::{Instance, RoutingTable};

    struct NoDns;
    impl TxtResolver for NoDns {
        fn lookup_txt<'a>(&'a self, _: &'a str) -> dstack_rpc::BoxFuture<'a, Result<Vec<String>, DnsError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }

    fn state(t0: SystemTime) -> AdminState {
        let table = RoutingTable::new();
        for (id, hs) in [("bb", Some(t0 - Duration::from_secs(42))), ("aa", None)] {
            table.upsert(Instance {
                instance_id: id.into(),
                app_id: "a1".into(),
                ip: "10.0.0.2".parse().unwrap(),
                public_key: format!("key-{id}"),
                port_policy: Default::default(),
                reg_time: t0,
                latest_handshake: hs,
            });
        }
        let proxy = Arc::new(ProxyState {
            config: crate::config::ProxyConfig {
                base_domain: "app.test".into(),
                ..Default::default()
            },
            table,
            resolver: Arc::new(NoDns),
            tls: Arc::new(crate::proxy::tls::TlsTerminator::new(vec![&rustls::version::TLS13])),
            stats: Default::default(),
        });
        proxy.stats.accepted.store(5, Relaxed);
        proxy.stats.bytes_up.store(1000, Relaxed);
        AdminState {
            proxy,
            registrar: None,
            wg: None,
        }
    }

    #[test]
    fn metrics_text_has_counters_and_handshake_ages() {
        let t0 = SystemTime::now();
        let m = state(t0).metrics(t0);
        assert!(m.contains("# TYPE dstack_gateway_connections_total counter\ndstack_gateway_connections_total 5\n"));
        assert!(m.contains("dstack_gateway_bytes_total{direction=\"up\"} 1000\n"));
        assert!(m.contains("dstack_gateway_instances 2\n"));
        // Only the instance that ever handshook has an age.
        assert!(
            m.contains("dstack_gateway_wg_handshake_age_seconds{instance_id=\"bb\",app_id=\"a1\"} 42\n"),
            "{m}"
        );
        assert!(!m.contains("instance_id=\"aa\""));
        // Every sample line is `name{labels} value` with a numeric value.
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            let v = line.rsplit(' ').next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[tokio::test]
    async fn http_endpoints() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let t0 = SystemTime::now();
        let task = tokio::spawn(serve(listener, state(t0)));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/health").await.starts_with("HTTP/1.1 200"));
        let status = get("/status").await;
        let body = status.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["hosts"][0]["instance_id"], "aa");
        assert_eq!(v["hosts"][0]["latest_handshake"], 0);
        assert_eq!(v["hosts"][1]["base_domain"], "app.test");
        assert_eq!(v["hosts"][1]["latest_handshake"], unix(t0) - 42);
        assert!(get("/metrics").await.contains("dstack_gateway_instances 2"));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        task.abort();
    }
}
