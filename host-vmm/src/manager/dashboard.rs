//! The manager's HTTP front: one listener (unix socket or TCP) serving
//! - `/prpc/<Method>` — the `Vmm` pRPC API ([`super::api::router`]);
//! - `/guest/<Method>` — the guest API proxy ([`super::guest_proxy`], dstack's `ProxiedGuestApi`);
//! - `GET /logs?id=…&lines=N&follow=true|false[&offset=N][&source=serial|stdout|stderr]` — VM logs as
//!   plain text, the route dstack's `vmm-cli.py logs [-f]` reads (`follow` streams until the client goes
//!   away; `offset` returns the bytes from that offset and the new offset in `X-Log-Offset`, for polling);
//! - `GET /` and `/app.js` — a small web dashboard (static page; it calls the pRPC API from the browser).
//!
//! On TCP every route but the static page needs `Authorization: Bearer <token>` (the page asks for the
//! token, or takes it from `#token=…` in its URL); unix-socket callers are trusted, as in dstack.

use std::convert::Infallible;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use dstack_rpc::guest_api::ProxiedGuestApiServer;
use dstack_rpc::{ConnInfo, Listener, RemoteAddr, RpcRouter};
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::api::{AuthGate, router};
use super::guest_proxy::GuestProxy;
use super::state::{Workdir, is_valid_id};
use super::vms::Manager;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");

/// At most this much of a log is returned by one non-follow request (the tail is kept).
const MAX_LOG_CHUNK: u64 = 4 << 20;
/// How often a followed log is checked for new bytes.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

type RespBody = BoxBody<Bytes, Infallible>;

/// The routes of one manager.
pub struct Frontend {
    mgr: Arc<Manager>,
    vmm: Arc<RpcRouter>,
    guest: Arc<RpcRouter>,
    tokens: Arc<Vec<String>>,
}

/// Builds the front for `mgr` (pRPC, guest proxy, logs, dashboard).
pub fn frontend(mgr: Arc<Manager>) -> Arc<Frontend> {
    let tokens = mgr.config.auth.tokens.clone();
    let guest = RpcRouter::new("/guest").service(AuthGate::new(
        ProxiedGuestApiServer::new(GuestProxy::new(mgr.clone())),
        tokens.clone(),
    ));
    Arc::new(Frontend {
        vmm: router(mgr.clone()),
        guest: Arc::new(guest),
        tokens: Arc::new(tokens.into_iter().filter(|t| !t.is_empty()).collect()),
        mgr,
    })
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<RespBody> {
    full(status, "text/plain; charset=utf-8", msg.into())
}

/// Constant-time comparison of every configured token against the request's bearer token.
fn authorized(tokens: &[String], conn: &ConnInfo, headers: &http::HeaderMap) -> bool {
    if !matches!(conn.remote, RemoteAddr::Tcp(_)) {
        return true;
    }
    let Some(token) = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    tokens.iter().fold(false, |ok, t| {
        let eq = t.len() == token.len() && t.bytes().zip(token.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
        ok | eq
    })
}

impl Frontend {
    /// Routes one request.
    pub async fn handle(&self, req: Request<Incoming>, conn: &ConnInfo) -> Response<RespBody> {
        let path = req.uri().path().to_owned();
        if path == "/prpc" || path.starts_with("/prpc/") {
            return self.vmm.handle(req, conn).await.map(|b| b.boxed());
        }
        if path.starts_with("/guest/") {
            return self.guest.handle(req, conn).await.map(|b| b.boxed());
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        match path.as_str() {
            "/" | "/index.html" => {
                let mut r = full(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML);
                r.headers_mut()
                    .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r
            }
            "/app.js" => full(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS),
            "/logs" => {
                if !authorized(&self.tokens, conn, req.headers()) {
                    return text(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized: missing or wrong bearer token\n",
                    );
                }
                self.logs(req.uri().query().unwrap_or("")).await
            }
            _ => text(StatusCode::NOT_FOUND, format!("not found: {path}\n")),
        }
    }

    async fn logs(&self, query: &str) -> Response<RespBody> {
        let q = match LogQuery::parse(query) {
            Ok(q) => q,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        };
        if !is_valid_id(&q.id) || self.mgr.snapshot(&q.id).is_none() {
            return text(StatusCode::NOT_FOUND, format!("VM {} not found\n", q.id));
        }
        let wd = Workdir::new(&self.mgr.config.cvm.run_path, &q.id);
        let path = match q.source.as_str() {
            "stdout" => wd.stdout_log(),
            "stderr" => wd.stderr_log(),
            // The console; VMs without one yet (or fake backends) fall back to the process's stdout.
            _ if wd.serial_log().exists() => wd.serial_log(),
            _ => wd.stdout_log(),
        };
        let read = {
            let path = path.clone();
            let (lines, offset) = (q.lines, q.offset);
            tokio::task::spawn_blocking(move || read_log(&path, lines, offset)).await
        };
        let (data, end) = match read {
            Ok(Ok(v)) => v,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
            Ok(Err(e)) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{}: {e}\n", path.display())),
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e}\n")),
        };
        let mut resp = if q.follow {
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(follow(path, data, end, tx));
            let mut r = Response::new(ChannelBody(rx).boxed());
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            r
        } else {
            full(StatusCode::OK, "text/plain; charset=utf-8", data)
        };
        if let Ok(v) = HeaderValue::from_str(&end.to_string()) {
            resp.headers_mut().insert("x-log-offset", v);
        }
        resp
    }
}

/// `/logs` parameters.
#[derive(Debug, PartialEq)]
struct LogQuery {
    id: String,
    follow: bool,
    lines: Option<usize>,
    offset: Option<u64>,
    source: String,
}

impl LogQuery {
    fn parse(query: &str) -> Result<Self, String> {
        let mut q = LogQuery {
            id: String::new(),
            follow: false,
            lines: None,
            offset: None,
            source: "serial".into(),
        };
        for (k, v) in form_pairs(query) {
            match k.as_str() {
                "id" => q.id = v,
                "follow" => q.follow = matches!(v.as_str(), "true" | "1" | "yes"),
                "lines" => q.lines = Some(v.parse().map_err(|_| format!("lines: {v:?} is not a number"))?),
                "offset" => q.offset = Some(v.parse().map_err(|_| format!("offset: {v:?} is not a number"))?),
                "source" if matches!(v.as_str(), "serial" | "stdout" | "stderr") => q.source = v,
                "source" => return Err(format!("source: {v:?} is not serial, stdout or stderr")),
                _ => {} // e.g. vmm-cli.py's ansi=false
            }
        }
        if q.id.is_empty() {
            return Err("missing id".into());
        }
        Ok(q)
    }
}

/// Splits `a=1&b=x%20y` (percent- and `+`-decoding).
fn form_pairs(query: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b.get(i) {
                Some(b'+') => out.push(b' '),
                Some(b'%') => {
                    let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                    match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        Some(v) => {
                            out.push(v);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                Some(&c) => out.push(c),
                None => {}
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Reads a log: from `offset` (up to [`MAX_LOG_CHUNK`] bytes; an offset past the end — the log was rotated —
/// restarts at 0), else the last `lines` lines (all when `None`) of at most the last [`MAX_LOG_CHUNK`]
/// bytes. Returns the bytes and the offset just after them.
fn read_log(path: &PathBuf, lines: Option<usize>, offset: Option<u64>) -> std::io::Result<(Vec<u8>, u64)> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if let Some(off) = offset {
        let start = if off > len { 0 } else { off };
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.take(MAX_LOG_CHUNK).read_to_end(&mut buf)?;
        let end = start + buf.len() as u64;
        return Ok((buf, end));
    }
    let start = len.saturating_sub(MAX_LOG_CHUNK);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(len - start).read_to_end(&mut buf)?;
    let end = start + buf.len() as u64;
    if let Some(n) = lines {
        Ok((tail_lines(&buf, n).to_vec(), end))
    } else {
        Ok((buf, end))
    }
}

/// The last `n` lines of `buf` (a trailing newline does not start a new line).
fn tail_lines(buf: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &[];
    }
    let body = buf.strip_suffix(b"\n").unwrap_or(buf);
    let mut seen = 0;
    for (i, &c) in body.iter().enumerate().rev() {
        if c == b'\n' {
            seen += 1;
            if seen == n {
                return buf.get(i + 1..).unwrap_or(&[]);
            }
        }
    }
    buf
}

/// Streams `initial`, then whatever is appended to `path`, until the receiver goes away or the file is
/// removed (the VM was removed). A shrinking file (rotation) is followed from its start.
async fn follow(path: PathBuf, initial: Vec<u8>, mut pos: u64, tx: mpsc::Sender<Bytes>) {
    if !initial.is_empty() && tx.send(Bytes::from(initial)).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            () = tx.closed() => return,
            () = tokio::time::sleep(FOLLOW_POLL) => {}
        }
        let p = path.clone();
        let chunk = tokio::task::spawn_blocking(move || read_log(&p, None, Some(pos))).await;
        match chunk {
            Ok(Ok((data, end))) => {
                pos = end;
                if !data.is_empty() && tx.send(Bytes::from(data)).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                if !path.parent().is_some_and(|d| d.exists()) {
                    return;
                }
            }
            _ => return,
        }
    }
}

/// A response body fed by a channel (for `follow`).
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// Serves `front` on `listener` until `shutdown` completes; open connections (followed logs included) are
/// then given two seconds and dropped.
pub async fn serve<L: Listener>(
    mut listener: L,
    front: Arc<Frontend>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let mut conns = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((io, remote)) => {
                    let front = front.clone();
                    conns.spawn(async move {
                        let info = Arc::new(ConnInfo::plain(remote));
                        let service = service_fn(move |req| {
                            let front = front.clone();
                            let info = info.clone();
                            async move { Ok::<_, Infallible>(front.handle(req, &info).await) }
                        });
                        let mut builder = http1::Builder::new();
                        builder.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
                        if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
                            tracing::debug!("connection error: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(2), drain).await.is_err() {
        conns.abort_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_query_parsing() {
        let q = LogQuery::parse("id=abc&follow=true&ansi=false&lines=20").unwrap();
        assert_eq!(
            q,
            LogQuery {
                id: "abc".into(),
                follow: true,
                lines: Some(20),
                offset: None,
                source: "serial".into()
            }
        );
        assert!(LogQuery::parse("follow=true").unwrap_err().contains("missing id"));
        assert!(LogQuery::parse("id=a&lines=x").unwrap_err().contains("lines"));
        assert!(
            LogQuery::parse("id=a&source=/etc/passwd")
                .unwrap_err()
                .contains("source")
        );
        assert_eq!(
            form_pairs("a=x%20y+z&b"),
            [("a".into(), "x y z".into()), ("b".into(), String::new())]
        );
    }

    #[test]
    fn tails_and_offsets() {
        assert_eq!(tail_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(tail_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail_lines(b"a\n", 0), b"");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, b"one\ntwo\nthree\n").unwrap();
        assert_eq!(read_log(&p, Some(1), None).unwrap(), (b"three\n".to_vec(), 14));
        assert_eq!(read_log(&p, None, Some(4)).unwrap(), (b"two\nthree\n".to_vec(), 14));
        // Offset beyond the end: the log was rotated (truncated); start over.
        assert_eq!(read_log(&p, None, Some(99)).unwrap().1, 14);
    }
}
