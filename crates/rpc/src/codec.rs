//! Request/response (de)serialization for the three pRPC encodings.

use bytes::Bytes;
use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::RpcError;

/// How a request body is encoded; the response uses protobuf for `Protobuf` and JSON otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Binary protobuf body.
    Protobuf,
    /// JSON body (`Content-Type: application/json` or `?json`).
    Json,
    /// GET query string (`?a=1&b=x`); answered with JSON.
    Query,
}

impl Encoding {
    /// Whether the response (and any error body) is JSON.
    pub fn responds_json(self) -> bool {
        !matches!(self, Self::Protobuf)
    }

    /// `Content-Type` of the response.
    pub fn response_content_type(self) -> &'static str {
        if self.responds_json() {
            JSON_CONTENT_TYPE
        } else {
            PROTOBUF_CONTENT_TYPE
        }
    }
}

/// `Content-Type` of JSON bodies.
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// `Content-Type` of protobuf bodies.
pub const PROTOBUF_CONTENT_TYPE: &str = "application/protobuf";

/// Error body for protobuf-encoded calls, as dstack's prpc sends it (`string message = 1`).
#[derive(Clone, PartialEq, Message)]
pub struct PrpcError {
    /// Error text.
    #[prost(string, tag = "1")]
    pub message: String,
}

/// Decodes a request body. An empty body is the default message in every encoding.
pub fn decode_request<T>(method: &str, encoding: Encoding, body: &[u8]) -> Result<T, RpcError>
where
    T: Message + DeserializeOwned + Default,
{
    match encoding {
        Encoding::Protobuf => decode_protobuf(method, body),
        Encoding::Json => decode_json(method, body),
        Encoding::Query => decode_query(method, body),
    }
}

/// Encodes a response: protobuf for protobuf requests, JSON otherwise.
pub fn encode_response<T>(method: &str, msg: &T, encoding: Encoding) -> Result<Bytes, RpcError>
where
    T: Message + Serialize,
{
    if encoding.responds_json() {
        encode_json(method, msg)
    } else {
        Ok(Bytes::from(msg.encode_to_vec()))
    }
}

/// Decodes binary protobuf.
pub fn decode_protobuf<T: Message + Default>(method: &str, body: &[u8]) -> Result<T, RpcError> {
    T::decode(body).map_err(|source| RpcError::Protobuf {
        method: method.to_owned(),
        source,
    })
}

/// Decodes JSON; errors name the path of the offending field. Blank input is the default.
pub fn decode_json<T: DeserializeOwned + Default>(method: &str, body: &[u8]) -> Result<T, RpcError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let err = |message: String| RpcError::Json {
        method: method.to_owned(),
        message,
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| err(describe(&e)))?;
    de.end().map_err(|e| err(e.to_string()))?;
    Ok(value)
}

/// Decodes an `application/x-www-form-urlencoded` query string into a message: numbers and
/// booleans are parsed, bytes are hex, a key repeated fills a repeated field.
pub fn decode_query<T: DeserializeOwned + Default>(method: &str, query: &[u8]) -> Result<T, RpcError> {
    let de = crate::query::QueryDeserializer::new(query);
    serde_path_to_error::deserialize(de).map_err(|e| RpcError::Query {
        method: method.to_owned(),
        message: describe(&e),
    })
}

/// Encodes a message as JSON.
pub fn encode_json<T: Serialize>(method: &str, msg: &T) -> Result<Bytes, RpcError> {
    serde_json::to_vec(msg).map(Bytes::from).map_err(|e| RpcError::Encode {
        method: method.to_owned(),
        message: e.to_string(),
    })
}

/// The body of an error response in the request's encoding.
pub fn encode_error(encoding: Encoding, message: &str) -> Bytes {
    if encoding.responds_json() {
        // Serializing a map with one string cannot fail.
        Bytes::from(serde_json::json!({ "error": message }).to_string())
    } else {
        Bytes::from(
            PrpcError {
                message: message.to_owned(),
            }
            .encode_to_vec(),
        )
    }
}

/// Extracts the message of an error body: `{"error": ...}` JSON, a protobuf [`PrpcError`], or
/// the (truncated) text itself.
pub fn decode_error_body(body: &[u8], json: bool) -> String {
    if json || body.first() == Some(&b'{') {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body)
            && let Some(msg) = v.get("error").and_then(|m| m.as_str())
        {
            return msg.to_owned();
        }
    } else if let Ok(e) = PrpcError::decode(body)
        && !e.message.is_empty()
    {
        return e.message;
    }
    let text = String::from_utf8_lossy(body);
    let mut text = text.trim().to_owned();
    if text.len() > 512 {
        let mut cut = 512;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

fn describe<E: std::fmt::Display>(e: &serde_path_to_error::Error<E>) -> String {
    let path = e.path().to_string();
    if path == "." {
        e.inner().to_string()
    } else {
        format!("field `{path}`: {}", e.inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_round_trip() {
        let j = encode_error(Encoding::Json, "bad \"thing\"");
        assert_eq!(&j[..], br#"{"error":"bad \"thing\""}"#);
        assert_eq!(decode_error_body(&j, true), "bad \"thing\"");
        let p = encode_error(Encoding::Protobuf, "nope");
        // Field 1, wire type 2, length 4, "nope": checked by hand against the protobuf spec.
        assert_eq!(&p[..], b"\x0a\x04nope");
        assert_eq!(decode_error_body(&p, false), "nope");
        assert_eq!(decode_error_body(b"plain text", false), "plain text");
        assert_eq!(decode_error_body(b"", false), "");
    }

    #[test]
    fn content_types() {
        assert_eq!(Encoding::Query.response_content_type(), "application/json");
        assert_eq!(Encoding::Json.response_content_type(), "application/json");
        assert_eq!(Encoding::Protobuf.response_content_type(), "application/protobuf");
    }
}
