//! A TLS ClientHello parser that needs nothing but the bytes a client sent first.
//!
//! Input is the raw byte stream (TLS records, possibly split over several TCP reads). The
//! handshake message may span several records (RFC 8446 §5.1). The parser never panics and never
//! indexes past its input: every read goes through [`Reader`], which returns a typed error naming
//! the field that was short.

use thiserror::Error;

/// TLS record content type `handshake`.
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type `client_hello`.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Largest TLSPlaintext fragment (2^14) plus slack some stacks use for TLS 1.2 records.
const MAX_RECORD_LEN: usize = 16384 + 2048;
/// Extension numbers (IANA).
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
/// Longest DNS name (RFC 1035, without the trailing dot).
const MAX_HOSTNAME_LEN: usize = 253;

/// What the router needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHelloInfo {
    /// The `host_name` from the server_name extension, lower-cased, trailing dot removed.
    pub sni: Option<String>,
    /// ALPN protocol names in client preference order.
    pub alpn: Vec<Vec<u8>>,
    /// Total bytes of the records that carried the ClientHello (where the payload starts).
    pub consumed: usize,
}

/// Why bytes are not (yet) a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClientHelloError {
    /// More bytes are needed; not an error if the connection is still open.
    #[error("incomplete ClientHello: need more data")]
    Incomplete,
    /// The first byte is not a TLS handshake record (e.g. plain HTTP).
    #[error("not a TLS handshake record (content type {0:#04x})")]
    NotTls(u8),
    /// A structural problem at a named place.
    #[error("malformed ClientHello: {what} at offset {offset}")]
    Malformed {
        /// The field or rule that failed.
        what: &'static str,
        /// Offset inside the handshake message (or the record stream for record errors).
        offset: usize,
    },
    /// The ClientHello exceeds the caller's size bound.
    #[error("ClientHello larger than {limit} bytes")]
    TooLarge {
        /// The bound in bytes.
        limit: usize,
    },
}

fn malformed(what: &'static str, offset: usize) -> ClientHelloError {
    ClientHelloError::Malformed { what, offset }
}

/// Bounds-checked cursor over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ClientHelloError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| malformed(what, self.pos))?;
        let out = self.buf.get(self.pos..end).ok_or_else(|| malformed(what, self.pos))?;
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ClientHelloError> {
        Ok(self.take(1, what)?.first().copied().unwrap_or_default())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ClientHelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([
            b.first().copied().unwrap_or_default(),
            b.get(1).copied().unwrap_or_default(),
        ]))
    }

    /// A `u8`-length-prefixed vector.
    fn vec8(&mut self, what: &'static str) -> Result<Reader<'a>, ClientHelloError> {
        let n = self.u8(what)? as usize;
        Ok(Reader::new(self.take(n, what)?))
    }

    /// A `u16`-length-prefixed vector.
    fn vec16(&mut self, what: &'static str) -> Result<Reader<'a>, ClientHelloError> {
        let n = self.u16(what)? as usize;
        Ok(Reader::new(self.take(n, what)?))
    }
}

/// Reassemble the first handshake message from TLS records in `data`.
///
/// Returns the handshake message (header included) and the number of record bytes it used.
fn reassemble(data: &[u8], limit: usize) -> Result<(Vec<u8>, usize), ClientHelloError> {
    let mut msg: Vec<u8> = Vec::new();
    let mut pos = 0usize;
    loop {
        // Do we already have the whole message?
        if let Some(len_bytes) = msg.get(1..4) {
            let body_len = u32::from_be_bytes([0, len_bytes[0], len_bytes[1], len_bytes[2]]) as usize;
            let total = body_len + 4;
            if total > limit {
                return Err(ClientHelloError::TooLarge { limit });
            }
            if msg.len() >= total {
                msg.truncate(total);
                return Ok((msg, pos));
            }
        }
        let Some(header) = data.get(pos..pos + 5) else {
            if pos >= limit {
                return Err(ClientHelloError::TooLarge { limit });
            }
            // A non-TLS first byte is recognisable before a full header arrives.
            if let Some(&b) = data.get(pos).filter(|_| pos == 0)
                && b != CONTENT_HANDSHAKE
            {
                return Err(ClientHelloError::NotTls(b));
            }
            return Err(ClientHelloError::Incomplete);
        };
        let content_type = header[0];
        if content_type != CONTENT_HANDSHAKE {
            return if pos == 0 {
                Err(ClientHelloError::NotTls(content_type))
            } else {
                Err(malformed("record interleaved before ClientHello completed", pos))
            };
        }
        if header[1] != 3 {
            return Err(malformed("record major version", pos + 1));
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if len == 0 {
            // RFC 8446 §5.1: zero-length handshake fragments are forbidden.
            return Err(malformed("empty handshake record", pos + 3));
        }
        if len > MAX_RECORD_LEN {
            return Err(malformed("record length", pos + 3));
        }
        if pos + 5 + len > limit {
            return Err(ClientHelloError::TooLarge { limit });
        }
        let Some(fragment) = data.get(pos + 5..pos + 5 + len) else {
            return Err(ClientHelloError::Incomplete);
        };
        msg.extend_from_slice(fragment);
        pos += 5 + len;
        if msg.first().is_some_and(|&t| t != HANDSHAKE_CLIENT_HELLO) {
            return Err(malformed("handshake type is not client_hello", 0));
        }
    }
}

/// Parse the ClientHello at the start of `data` (raw TLS records) with a 16 KiB bound.
pub fn parse_client_hello(data: &[u8]) -> Result<ClientHelloInfo, ClientHelloError> {
    parse_client_hello_bounded(data, 16 * 1024)
}

/// Parse the ClientHello at the start of `data`, refusing hellos whose records exceed `limit`.
pub fn parse_client_hello_bounded(data: &[u8], limit: usize) -> Result<ClientHelloInfo, ClientHelloError> {
    let (msg, consumed) = reassemble(data, limit)?;
    let mut info = parse_handshake(&msg)?;
    info.consumed = consumed;
    Ok(info)
}

/// Parse one complete handshake message (4-byte header included).
fn parse_handshake(msg: &[u8]) -> Result<ClientHelloInfo, ClientHelloError> {
    let mut r = Reader::new(msg);
    if r.u8("handshake type")? != HANDSHAKE_CLIENT_HELLO {
        return Err(malformed("handshake type is not client_hello", 0));
    }
    r.take(3, "handshake length")?;
    let base = r.pos;
    let legacy_version = r.u16("client_version")?;
    if legacy_version >> 8 != 3 {
        return Err(malformed("client_version", base));
    }
    r.take(32, "random")?;
    let session_pos = r.pos;
    let session_id = r.vec8("legacy_session_id")?;
    if session_id.remaining() > 32 {
        return Err(malformed("legacy_session_id longer than 32", session_pos));
    }
    let suites_pos = r.pos;
    let suites = r.vec16("cipher_suites")?;
    if suites.remaining() == 0 || suites.remaining() % 2 != 0 {
        return Err(malformed("cipher_suites length", suites_pos));
    }
    let comp_pos = r.pos;
    if r.vec8("compression_methods")?.remaining() == 0 {
        return Err(malformed("empty compression_methods", comp_pos));
    }
    let mut info = ClientHelloInfo::default();
    if r.remaining() == 0 {
        // SSL 3.0-era hellos may omit extensions entirely.
        return Ok(info);
    }
    let ext_pos = r.pos;
    let mut exts = r.vec16("extensions")?;
    if r.remaining() != 0 {
        return Err(malformed("trailing bytes after extensions", r.pos));
    }
    let mut seen: Vec<u16> = Vec::new();
    while exts.remaining() > 0 {
        let at = ext_pos + 2 + exts.pos;
        let ty = exts.u16("extension type")?;
        let body = exts.vec16("extension data")?;
        if seen.contains(&ty) {
            return Err(malformed("duplicate extension", at));
        }
        seen.push(ty);
        match ty {
            EXT_SERVER_NAME => info.sni = parse_server_name(body, at + 4)?,
            EXT_ALPN => info.alpn = parse_alpn(body, at + 4)?,
            _ => {}
        }
    }
    Ok(info)
}

fn parse_server_name(mut body: Reader<'_>, at: usize) -> Result<Option<String>, ClientHelloError> {
    let mut list = body.vec16("server_name_list")?;
    if body.remaining() != 0 || list.remaining() == 0 {
        return Err(malformed("server_name extension length", at));
    }
    let mut host = None;
    while list.remaining() > 0 {
        let name_type = list.u8("server_name type")?;
        let name = list.vec16("server_name")?;
        // Only host_name (0) is defined; RFC 6066 forbids more than one name of a type.
        if name_type != 0 {
            continue;
        }
        if host.is_some() {
            return Err(malformed("more than one host_name", at));
        }
        host = Some(validate_hostname(name.buf, at)?);
    }
    Ok(host)
}

/// Accept LDH names (plus `_` and `*` for forgiving clients); lower-case; strip one trailing dot.
fn validate_hostname(raw: &[u8], at: usize) -> Result<String, ClientHelloError> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if raw.is_empty() || raw.len() > MAX_HOSTNAME_LEN {
        return Err(malformed("host_name length", at));
    }
    let ok = raw
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'*'));
    if !ok {
        return Err(malformed("host_name characters", at));
    }
    if raw
        .split(|&c| c == b'.')
        .any(|label| label.is_empty() || label.len() > 63)
    {
        return Err(malformed("host_name label length", at));
    }
    Ok(String::from_utf8_lossy(raw).to_ascii_lowercase())
}

fn parse_alpn(mut body: Reader<'_>, at: usize) -> Result<Vec<Vec<u8>>, ClientHelloError> {
    let mut list = body.vec16("alpn list")?;
    if body.remaining() != 0 || list.remaining() == 0 {
        return Err(malformed("alpn extension length", at));
    }
    let mut out = Vec::new();
    while list.remaining() > 0 {
        let proto = list.vec8("alpn protocol")?;
        if proto.remaining() == 0 {
            return Err(malformed("empty alpn protocol name", at));
        }
        out.push(proto.buf.to_vec());
    }
    Ok(out)
}

#[cfg(test)]
#[path = "client_hello_tests.rs"]
mod tests;
