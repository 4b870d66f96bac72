//! Just enough HTTP/1.1 for this app: parse a request head, write a response, parse a response
//! (Content-Length, chunked or read-to-EOF bodies). One request per connection (`Connection: close`).

use std::fmt;
use std::io::{self, Read, Write};

/// Longest request or response head we accept.
pub const MAX_HEAD: usize = 16 * 1024;
/// Longest response body we accept from the guest agent (its Info carries the event log).
pub const MAX_BODY: usize = 8 * 1024 * 1024;
/// Longest request body we accept (only `POST` requests carry one: a record payload).
pub const MAX_REQUEST_BODY: usize = 128 * 1024;

/// Why a message could not be parsed.
#[derive(Debug)]
pub enum HttpError {
    /// The peer closed the connection or the socket failed.
    Io(io::Error),
    /// The message is malformed; the text names the part.
    Malformed(String),
    /// The head or body is larger than allowed.
    TooLarge(&'static str),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Io(e) => write!(f, "i/o error: {e}"),
            HttpError::Malformed(what) => write!(f, "malformed HTTP message: {what}"),
            HttpError::TooLarge(what) => write!(f, "HTTP {what} too large"),
        }
    }
}

impl std::error::Error for HttpError {}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        HttpError::Io(e)
    }
}

/// The parts of a request this app routes on.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// The body of a `POST` (by its Content-Length); empty for other methods.
    pub body: Vec<u8>,
}

/// A parsed response.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body after transfer decoding.
    pub body: Vec<u8>,
}

/// Reads bytes until the blank line ending the head; returns (head, bytes already read past it).
fn read_head(r: &mut impl Read) -> Result<(String, Vec<u8>), HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            buf.truncate(end);
            let head = String::from_utf8(buf).map_err(|_| HttpError::Malformed("head is not UTF-8".into()))?;
            return Ok((head, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(HttpError::TooLarge("head"));
        }
        let n = r.read(&mut chunk)?;
        if n == 0 {
            return Err(HttpError::Malformed("connection closed before end of head".into()));
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads and parses a request head, and the body of a `POST` (other methods' bodies are ignored).
pub fn read_request(r: &mut impl Read) -> Result<Request, HttpError> {
    let (head, rest) = read_head(r)?;
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed(format!("request line {line:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed(format!("version {version:?}")));
    }
    let path = target.split('?').next().unwrap_or_default();
    let body = if method == "POST" {
        read_request_body(&head, rest, r)?
    } else {
        Vec::new()
    };
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        body,
    })
}

/// Reads exactly Content-Length bytes (required, at most [`MAX_REQUEST_BODY`]) after the head.
fn read_request_body(head: &str, mut rest: Vec<u8>, r: &mut impl Read) -> Result<Vec<u8>, HttpError> {
    let mut length = None;
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Malformed(format!("header line {line:?}")));
        };
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Malformed("Transfer-Encoding in a request".into()));
        }
        if name.eq_ignore_ascii_case("content-length") {
            let value = value.trim();
            let n = value
                .parse::<usize>()
                .map_err(|_| HttpError::Malformed(format!("Content-Length {value:?}")))?;
            if length.is_some_and(|l| l != n) {
                return Err(HttpError::Malformed("conflicting Content-Length headers".into()));
            }
            length = Some(n);
        }
    }
    let n = length.ok_or_else(|| HttpError::Malformed("POST without Content-Length".into()))?;
    if n > MAX_REQUEST_BODY {
        return Err(HttpError::TooLarge("request body"));
    }
    if rest.len() < n {
        let missing = n - rest.len();
        let before = rest.len();
        r.take(missing as u64).read_to_end(&mut rest)?;
        if rest.len() - before < missing {
            return Err(HttpError::Malformed(format!("body has {} of {n} bytes", rest.len())));
        }
    }
    rest.truncate(n);
    Ok(rest)
}

/// Writes a complete response and flushes.
pub fn write_response(w: &mut impl Write, status: u16, content_type: &str, body: &[u8]) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        400 => "Bad Request",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    };
    write!(
        w,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    w.write_all(body)?;
    w.flush()
}

/// Reads a whole response (the peer was asked for `Connection: close`).
pub fn read_response(r: &mut impl Read) -> Result<Response, HttpError> {
    let (head, mut rest) = read_head(r)?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| HttpError::Malformed(format!("status line {status_line:?}")))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Malformed(format!("header line {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .map_err(|_| HttpError::Malformed(format!("Content-Length {value:?}")))?;
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    // Read everything the peer sends, bounded, then decode.
    r.take((MAX_BODY + 1) as u64).read_to_end(&mut rest)?;
    if rest.len() > MAX_BODY {
        return Err(HttpError::TooLarge("body"));
    }
    let body = if chunked {
        decode_chunked(&rest)?
    } else if let Some(n) = content_length {
        if rest.len() < n {
            return Err(HttpError::Malformed(format!("body has {} of {n} bytes", rest.len())));
        }
        rest.truncate(n);
        rest
    } else {
        rest
    };
    Ok(Response { status, body })
}

/// Decodes a `Transfer-Encoding: chunked` body (trailers are ignored).
pub fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>, HttpError> {
    let mut out = Vec::new();
    loop {
        let end = find(data, b"\r\n").ok_or_else(|| HttpError::Malformed("chunk size line".into()))?;
        let line = std::str::from_utf8(data.get(..end).unwrap_or_default())
            .map_err(|_| HttpError::Malformed("chunk size is not UTF-8".into()))?;
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| HttpError::Malformed(format!("chunk size {size_hex:?}")))?;
        data = data.get(end + 2..).unwrap_or_default();
        if size == 0 {
            return Ok(out);
        }
        let chunk = data
            .get(..size)
            .ok_or_else(|| HttpError::Malformed(format!("chunk of {size} bytes is truncated")))?;
        out.extend_from_slice(chunk);
        data = data
            .get(size..)
            .and_then(|d| d.strip_prefix(b"\r\n"))
            .ok_or_else(|| HttpError::Malformed("missing CRLF after chunk".into()))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_line_and_drops_query() {
        let mut raw: &[u8] = b"GET /info?x=1 HTTP/1.1\r\nHost: a\r\n\r\n";
        let req = read_request(&mut raw).unwrap();
        assert_eq!(
            req,
            Request {
                method: "GET".into(),
                path: "/info".into(),
                body: Vec::new(),
            }
        );
    }

    #[test]
    fn reads_post_bodies_by_content_length() {
        let mut raw: &[u8] = b"POST /records/1 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloEXTRA";
        let req = read_request(&mut raw).unwrap();
        assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/records/1"));
        assert_eq!(req.body, b"hello");
        // The body may arrive after the head, in pieces.
        let mut raw = std::io::Read::chain(&b"POST /x HTTP/1.1\r\ncontent-length: 3\r\n\r\na"[..], &b"bc"[..]);
        assert_eq!(read_request(&mut raw).unwrap().body, b"abc");
        // GET bodies stay ignored.
        let mut raw: &[u8] = b"GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        assert!(read_request(&mut raw).unwrap().body.is_empty());
    }

    #[test]
    fn rejects_bad_post_bodies() {
        let too_big = format!("POST /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_REQUEST_BODY + 1);
        assert!(matches!(
            read_request(&mut too_big.as_bytes()),
            Err(HttpError::TooLarge(_))
        ));
        for raw in [
            &b"POST /x HTTP/1.1\r\n\r\nabc"[..],
            b"POST /x HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc",
            b"POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST /x HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            let mut r = raw;
            assert!(read_request(&mut r).is_err(), "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn rejects_bad_request_lines() {
        for raw in [
            &b"GET /\r\n\r\n"[..],
            b"GET / SPDY/3\r\n\r\n",
            b"GET / HTTP/1.1 x\r\n\r\n",
            b"GET / HTTP/1.1\r\n",
        ] {
            let mut r = raw;
            assert!(read_request(&mut r).is_err(), "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn rejects_endless_head() {
        let raw = vec![b'a'; MAX_HEAD + 2048];
        assert!(matches!(read_request(&mut raw.as_slice()), Err(HttpError::TooLarge(_))));
    }

    #[test]
    fn response_with_content_length_and_chunked() {
        let mut raw: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(
            read_response(&mut raw).unwrap(),
            Response {
                status: 200,
                body: b"hello".to_vec()
            }
        );
        let mut raw: &[u8] =
            b"HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(
            read_response(&mut raw).unwrap(),
            Response {
                status: 400,
                body: b"abcde".to_vec()
            }
        );
    }

    #[test]
    fn truncated_bodies_fail() {
        let mut raw: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello";
        assert!(read_response(&mut raw).is_err());
        assert!(decode_chunked(b"5\r\nab").is_err());
        assert!(decode_chunked(b"zz\r\n").is_err());
        assert!(decode_chunked(b"2\r\nabX").is_err());
    }

    #[test]
    fn writes_response_with_length() {
        let mut out = Vec::new();
        write_response(&mut out, 404, "text/plain", b"nope").unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("Content-Length: 4\r\n"));
        assert!(text.ends_with("\r\n\r\nnope"));
    }
}
