//! The GetQuote TDVMCALL (GHCI leaf 0x10002, surfaced by KVM as `KVM_EXIT_TDX`) and its forwarding to Intel's
//! Quote Generation Service (QGS, `qgsd`).
//!
//! Guest side: a shared, 4 KiB-aligned buffer of whole pages at `gpa` (KVM already strips the shared bit) with a
//! 24-byte header — `u64 structure_version` (1), `u64 status`, `u32 in_len`, `u32 out_len` — followed by
//! `in_len` bytes (the TDREPORT) that the VMM replaces with `out_len` bytes of quote. `status` becomes 0 on
//! success, `0x8000000000000001` when no QGS is reachable, `0x8000000000000000` on other errors. The TDVMCALL
//! itself returns (R10) 0 once the request was accepted, `0x8000000000000002` for a misaligned buffer and
//! `0x8000000000000000` for a malformed one.
//!
//! QGS side ("qgs_msg" protocol of Intel's DCAP `qgs_msg_lib`, as QEMU speaks it over a unix or vsock socket):
//! a 4-byte **big-endian** length prefix, then a little-endian message: header {u16 major = 1, u16 minor = 1,
//! u32 type, u32 size (whole message incl. header), u32 error_code}; GET_QUOTE_REQ (type 0) adds
//! {u32 report_size, u32 id_list_size = 0} and the report; GET_QUOTE_RESP (type 1) adds
//! {u32 selected_id_size, u32 quote_size} and the selected id and quote.
//!
//! Requests are served synchronously on the vCPU thread (status is final when the TDVMCALL returns, which the
//! Linux tdx-guest driver accepts); the QGS round trip is bounded by [`QGS_TIMEOUT`].

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// GetQuote buffer header length and version.
pub const HEADER_LEN: usize = 24;
pub const STRUCTURE_VERSION: u64 = 1;
/// GetQuote `status` values (GHCI).
pub const STATUS_SUCCESS: u64 = 0;
pub const STATUS_IN_FLIGHT: u64 = u64::MAX;
pub const STATUS_ERROR: u64 = 0x8000_0000_0000_0000;
pub const STATUS_QGS_UNAVAILABLE: u64 = 0x8000_0000_0000_0001;
/// TDVMCALL return codes (R10).
pub const TDVMCALL_SUCCESS: u64 = 0;
pub const TDVMCALL_INVALID_OPERAND: u64 = 0x8000_0000_0000_0000;
pub const TDVMCALL_ALIGN_ERROR: u64 = 0x8000_0000_0000_0002;
/// Largest GetQuote buffer we serve (QEMU's limit too); quotes are ~5-8 KiB.
pub const MAX_BUFFER: u64 = 128 << 10;
/// Bound on one QGS round trip.
pub const QGS_TIMEOUT: Duration = Duration::from_secs(30);
/// The default unix socket of `qgsd`.
pub const DEFAULT_QGS_SOCKET: &str = "/var/run/tdx-qgs/qgs.socket";

const QGS_MAJOR: u16 = 1;
const QGS_MINOR: u16 = 1;
const GET_QUOTE_REQ: u32 = 0;
const GET_QUOTE_RESP: u32 = 1;
const QGS_HEADER_LEN: usize = 16;
const QGS_REQ_LEN: usize = QGS_HEADER_LEN + 8;

/// Why a quote could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum QuoteError {
    #[error("quote generation service unreachable at {path}: {source}")]
    Unavailable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the quote generation service: {0}")]
    Io(#[from] std::io::Error),
    #[error("QGS response: {field} {reason}")]
    Response { field: &'static str, reason: String },
}

fn bad(field: &'static str, reason: impl Into<String>) -> QuoteError {
    QuoteError::Response {
        field,
        reason: reason.into(),
    }
}

/// Produces a quote for a TDREPORT.
pub trait QuoteService: Send + Sync {
    fn get_quote(&self, report: &[u8]) -> Result<Vec<u8>, QuoteError>;
}

/// The framed GET_QUOTE_REQ for `report` (length prefix included).
pub fn encode_request(report: &[u8]) -> Vec<u8> {
    let size = (QGS_REQ_LEN + report.len()) as u32;
    let mut m = Vec::with_capacity(4 + size as usize);
    m.extend_from_slice(&size.to_be_bytes());
    m.extend_from_slice(&QGS_MAJOR.to_le_bytes());
    m.extend_from_slice(&QGS_MINOR.to_le_bytes());
    m.extend_from_slice(&GET_QUOTE_REQ.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(&(report.len() as u32).to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes()); // no id list: let QGS pick its attestation key
    m.extend_from_slice(report);
    m
}

fn u32_at(msg: &[u8], at: usize, field: &'static str) -> Result<u32, QuoteError> {
    msg.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| bad(field, format!("missing at offset {at}")))
}

/// The quote inside a GET_QUOTE_RESP message (without the length prefix).
pub fn decode_response(msg: &[u8]) -> Result<Vec<u8>, QuoteError> {
    let version = (
        u16::from_le_bytes([msg.first().copied().unwrap_or(0), msg.get(1).copied().unwrap_or(0)]),
        u16::from_le_bytes([msg.get(2).copied().unwrap_or(0), msg.get(3).copied().unwrap_or(0)]),
    );
    // QGS releases before 1.1 answer with minor 0; the layout is the same.
    if version.0 != QGS_MAJOR {
        return Err(bad(
            "header.version",
            format!("{}.{} (expected 1.x)", version.0, version.1),
        ));
    }
    let kind = u32_at(msg, 4, "header.type")?;
    if kind != GET_QUOTE_RESP {
        return Err(bad("header.type", format!("{kind}, expected GET_QUOTE_RESP (1)")));
    }
    let size = u32_at(msg, 8, "header.size")? as usize;
    if size != msg.len() {
        return Err(bad("header.size", format!("{size} but {} bytes received", msg.len())));
    }
    let error = u32_at(msg, 12, "header.error_code")?;
    if error != 0 {
        return Err(bad("header.error_code", format!("{error:#x}")));
    }
    let id_len = u32_at(msg, 16, "selected_id_size")? as usize;
    let quote_len = u32_at(msg, 20, "quote_size")? as usize;
    let start = QGS_REQ_LEN.saturating_add(id_len);
    let quote = msg
        .get(start..)
        .filter(|q| q.len() == quote_len && quote_len > 0)
        .ok_or_else(|| bad("quote_size", format!("{quote_len} does not match the message")))?;
    Ok(quote.to_vec())
}

/// A QGS reached over its unix socket.
#[derive(Debug, Clone)]
pub struct QgsClient {
    pub socket: PathBuf,
}

impl QuoteService for QgsClient {
    fn get_quote(&self, report: &[u8]) -> Result<Vec<u8>, QuoteError> {
        let mut s = UnixStream::connect(&self.socket).map_err(|source| QuoteError::Unavailable {
            path: self.socket.display().to_string(),
            source,
        })?;
        s.set_read_timeout(Some(QGS_TIMEOUT))?;
        s.set_write_timeout(Some(QGS_TIMEOUT))?;
        s.write_all(&encode_request(report))?;
        let mut len = [0u8; 4];
        s.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as u64;
        if len == 0 || len > MAX_BUFFER {
            return Err(bad("length prefix", format!("{len}")));
        }
        let mut msg = vec![0u8; len as usize];
        s.read_exact(&mut msg)?;
        decode_response(&msg)
    }
}

/// Serves one GetQuote TDVMCALL whose buffer is `size` bytes of shared guest memory at `gpa`; returns the
/// TDVMCALL return code for `kvm_run.tdx.get_quote.ret`.
pub fn handle_get_quote(mem: &GuestMemoryMmap, gpa: u64, size: u64, qgs: Option<&dyn QuoteService>) -> u64 {
    if !gpa.is_multiple_of(4096) || !size.is_multiple_of(4096) || size == 0 {
        return TDVMCALL_ALIGN_ERROR;
    }
    if size > MAX_BUFFER {
        return TDVMCALL_INVALID_OPERAND;
    }
    let mut buf = vec![0u8; size as usize];
    if mem.read_slice(&mut buf, GuestAddress(gpa)).is_err() {
        return TDVMCALL_INVALID_OPERAND;
    }
    let word = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().unwrap_or_default());
    let in_len = u32::from_le_bytes(buf[16..20].try_into().unwrap_or_default()) as usize;
    if word(0) != STRUCTURE_VERSION || in_len == 0 || in_len > buf.len() - HEADER_LEN {
        return TDVMCALL_INVALID_OPERAND;
    }
    let report = &buf[HEADER_LEN..HEADER_LEN + in_len];
    let (status, quote) = match qgs.map(|q| q.get_quote(report)) {
        None => (STATUS_QGS_UNAVAILABLE, Vec::new()),
        Some(Err(QuoteError::Unavailable { .. })) => (STATUS_QGS_UNAVAILABLE, Vec::new()),
        Some(Err(e)) => {
            tracing::warn!("GetQuote: {e}");
            (STATUS_ERROR, Vec::new())
        }
        Some(Ok(q)) if q.len() > buf.len() - HEADER_LEN => {
            tracing::warn!("GetQuote: {}-byte quote does not fit the {size}-byte buffer", q.len());
            (STATUS_ERROR, Vec::new())
        }
        Some(Ok(q)) => (STATUS_SUCCESS, q),
    };
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&STRUCTURE_VERSION.to_le_bytes());
    header[8..16].copy_from_slice(&status.to_le_bytes());
    header[16..20].copy_from_slice(&(in_len as u32).to_le_bytes());
    header[20..24].copy_from_slice(&(quote.len() as u32).to_le_bytes());
    // Quote first, then the header, so the guest never sees SUCCESS before the data.
    let data_ok = quote.is_empty() || mem.write_slice(&quote, GuestAddress(gpa + HEADER_LEN as u64)).is_ok();
    if !data_ok || mem.write_slice(&header, GuestAddress(gpa)).is_err() {
        return TDVMCALL_INVALID_OPERAND;
    }
    TDVMCALL_SUCCESS
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    fn guest_with_request(report: &[u8]) -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&1u64.to_le_bytes());
        hdr.extend_from_slice(&0u64.to_le_bytes());
        hdr.extend_from_slice(&(report.len() as u32).to_le_bytes());
        hdr.extend_from_slice(&0u32.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(0x2000)).unwrap();
        mem.write_slice(report, GuestAddress(0x2000 + 24)).unwrap();
        mem
    }

    fn read_u64(mem: &GuestMemoryMmap, at: u64) -> u64 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// A one-shot QGS on a unix socket that checks the request byte by byte against the qgs_msg layout (written
    /// out field by field here, independently of `encode_request`) and answers with `quote`.
    fn fake_qgs(dir: &std::path::Path, report: Vec<u8>, quote: Vec<u8>) -> (PathBuf, std::thread::JoinHandle<()>) {
        let path = dir.join("qgs.socket");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut prefix = [0u8; 4];
            s.read_exact(&mut prefix).unwrap();
            let len = u32::from_be_bytes(prefix) as usize;
            assert_eq!(len, 24 + report.len());
            let mut msg = vec![0u8; len];
            s.read_exact(&mut msg).unwrap();
            assert_eq!(&msg[0..4], &[1, 0, 1, 0], "version 1.1");
            assert_eq!(&msg[4..8], &[0, 0, 0, 0], "GET_QUOTE_REQ");
            assert_eq!(&msg[8..12], &(len as u32).to_le_bytes());
            assert_eq!(&msg[12..16], &[0; 4]);
            assert_eq!(&msg[16..20], &(report.len() as u32).to_le_bytes());
            assert_eq!(&msg[20..24], &[0; 4], "empty id list");
            assert_eq!(&msg[24..], report.as_slice());
            let mut resp = Vec::new();
            resp.extend_from_slice(&[1, 0, 1, 0, 1, 0, 0, 0]);
            resp.extend_from_slice(&((24 + quote.len()) as u32).to_le_bytes());
            resp.extend_from_slice(&[0; 4]);
            resp.extend_from_slice(&[0; 4]);
            resp.extend_from_slice(&(quote.len() as u32).to_le_bytes());
            resp.extend_from_slice(&quote);
            s.write_all(&(resp.len() as u32).to_be_bytes()).unwrap();
            s.write_all(&resp).unwrap();
        });
        (path, t)
    }

    #[test]
    fn forwards_the_tdreport_and_writes_the_quote_back() {
        let report: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
        let quote: Vec<u8> = (0..5006).map(|i| (i % 199) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let (socket, server) = fake_qgs(dir.path(), report.clone(), quote.clone());
        let mem = guest_with_request(&report);
        let qgs = QgsClient { socket };
        assert_eq!(handle_get_quote(&mem, 0x2000, 0x4000, Some(&qgs)), TDVMCALL_SUCCESS);
        server.join().unwrap();
        assert_eq!(read_u64(&mem, 0x2008), STATUS_SUCCESS);
        let out_len: u32 = mem.read_obj(GuestAddress(0x2014)).unwrap();
        assert_eq!(out_len as usize, quote.len());
        let mut got = vec![0u8; quote.len()];
        mem.read_slice(&mut got, GuestAddress(0x2000 + 24)).unwrap();
        assert_eq!(got, quote);
    }

    #[test]
    fn reports_errors_to_the_guest() {
        let report = vec![7u8; 1024];
        let mem = guest_with_request(&report);
        assert_eq!(handle_get_quote(&mem, 0x2001, 0x4000, None), TDVMCALL_ALIGN_ERROR);
        assert_eq!(handle_get_quote(&mem, 0x2000, 0x100, None), TDVMCALL_ALIGN_ERROR);
        assert_eq!(
            handle_get_quote(&mem, 0x3000, 0x1000, None),
            TDVMCALL_INVALID_OPERAND,
            "no header"
        );
        // No QGS configured, or the socket is absent: status QGS_UNAVAILABLE, call accepted.
        assert_eq!(handle_get_quote(&mem, 0x2000, 0x1000, None), TDVMCALL_SUCCESS);
        assert_eq!(read_u64(&mem, 0x2008), STATUS_QGS_UNAVAILABLE);
        let gone = QgsClient {
            socket: "/nonexistent/qgs.socket".into(),
        };
        let mem = guest_with_request(&report);
        assert_eq!(handle_get_quote(&mem, 0x2000, 0x1000, Some(&gone)), TDVMCALL_SUCCESS);
        assert_eq!(read_u64(&mem, 0x2008), STATUS_QGS_UNAVAILABLE);
        // A quote larger than the guest's buffer is an error, not an overflow.
        let dir = tempfile::tempdir().unwrap();
        let (socket, server) = fake_qgs(dir.path(), report.clone(), vec![1u8; 8000]);
        let mem = guest_with_request(&report);
        assert_eq!(
            handle_get_quote(&mem, 0x2000, 0x1000, Some(&QgsClient { socket })),
            TDVMCALL_SUCCESS
        );
        server.join().unwrap();
        assert_eq!(read_u64(&mem, 0x2008), STATUS_ERROR);
    }

    #[test]
    fn rejects_malformed_responses() {
        let good = {
            let mut r = vec![1, 0, 1, 0, 1, 0, 0, 0];
            r.extend_from_slice(&(24u32 + 3).to_le_bytes());
            r.extend_from_slice(&[0; 8]);
            r.extend_from_slice(&3u32.to_le_bytes());
            r.extend_from_slice(b"abc");
            r
        };
        assert_eq!(decode_response(&good).unwrap(), b"abc");
        let mut wrong_type = good.clone();
        wrong_type[4] = 0;
        assert!(decode_response(&wrong_type).is_err());
        let mut error_code = good.clone();
        error_code[12] = 0x12;
        assert!(
            decode_response(&error_code)
                .unwrap_err()
                .to_string()
                .contains("error_code")
        );
        assert!(decode_response(&good[..good.len() - 1]).is_err());
        assert!(decode_response(&[]).is_err());
        // The request encoder's framing: big-endian prefix = message length.
        let req = encode_request(&[9; 10]);
        assert_eq!(u32::from_be_bytes(req[..4].try_into().unwrap()) as usize, req.len() - 4);
    }
}
