//! Report-data rules of the agent's quote calls (dstack's `QuoteContentType`).

use sha2::Digest;

use crate::AgentError;

/// Zero-pads `data` (≤ 64 bytes) to a quote's 64-byte REPORTDATA (`GetQuote`, `Attest`, `RawQuote`).
pub fn pad_report_data(data: &[u8]) -> Result<[u8; 64], AgentError> {
    if data.len() > 64 {
        // dstack's exact message; SDKs surface it verbatim.
        return Err(AgentError::InvalidArgument("Report data is too long".into()));
    }
    let mut out = [0u8; 64];
    out[..data.len()].copy_from_slice(data);
    Ok(out)
}

fn hashed<D: Digest>(tag: &str, content: &[u8]) -> [u8; 64] {
    let mut h = D::new();
    h.update(tag.as_bytes());
    h.update(b":");
    h.update(content);
    let digest = h.finalize();
    let mut out = [0u8; 64];
    // Every supported digest is at most 64 bytes.
    let n = digest.len().min(64);
    out[..n].copy_from_slice(&digest[..n]);
    out
}

/// The legacy `Tappd.TdxQuote` report data: `hash(tag ‖ ":" ‖ content)` zero-padded to 64 bytes, where `tag`
/// is `prefix` or `app-data` when empty and `hash` defaults to sha512; `raw` passes `content` through
/// (≤ 64 bytes). Returns the report data and the (algorithm, prefix) to echo back.
pub fn tdx_quote_report_data(
    content: &[u8],
    hash_algorithm: &str,
    prefix: &str,
) -> Result<([u8; 64], String, String), AgentError> {
    let alg = if hash_algorithm.is_empty() {
        "sha512"
    } else {
        hash_algorithm
    };
    if alg == "raw" {
        return Ok((pad_report_data(content)?, "raw".into(), String::new()));
    }
    let tag = if prefix.is_empty() { "app-data" } else { prefix };
    let rd = match alg {
        "sha256" => hashed::<sha2::Sha256>(tag, content),
        "sha384" => hashed::<sha2::Sha384>(tag, content),
        "sha512" => hashed::<sha2::Sha512>(tag, content),
        "sha3-256" => hashed::<sha3::Sha3_256>(tag, content),
        "sha3-384" => hashed::<sha3::Sha3_384>(tag, content),
        "sha3-512" => hashed::<sha3::Sha3_512>(tag, content),
        "keccak256" => hashed::<sha3::Keccak256>(tag, content),
        "keccak384" => hashed::<sha3::Keccak384>(tag, content),
        "keccak512" => hashed::<sha3::Keccak512>(tag, content),
        other => {
            return Err(AgentError::InvalidArgument(format!(
                "unsupported hash algorithm {other:?}"
            )));
        }
    };
    Ok((rd, alg.into(), tag.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_and_too_long() {
        let rd = pad_report_data(b"abc").unwrap();
        assert_eq!(&rd[..3], b"abc");
        assert!(rd[3..].iter().all(|&b| b == 0));
        let err = pad_report_data(&[0u8; 65]).unwrap_err();
        assert!(err.to_string().contains("Report data is too long"));
    }

    #[test]
    fn tdx_quote_hashes() {
        // Independent vector: python3 -c "import hashlib;print(hashlib.sha256(b'app-data:hello').hexdigest())"
        let (rd, alg, prefix) = tdx_quote_report_data(b"hello", "sha256", "").unwrap();
        assert_eq!(
            hex::encode(&rd[..32]),
            "57d90585d4b2cce9b2818a7b2a01398d5d2d6a8cb7ca8b735acb8d3203cf8a77"
        );
        assert!(rd[32..].iter().all(|&b| b == 0));
        assert_eq!((alg.as_str(), prefix.as_str()), ("sha256", "app-data"));
        // python3 -c "import hashlib;print(hashlib.sha3_256(b'app-data:hello').hexdigest())"
        let (rd, _, _) = tdx_quote_report_data(b"hello", "sha3-256", "").unwrap();
        assert_eq!(
            hex::encode(&rd[..32]),
            "393205b584269b6c90c9c2ebea4f782ca50b4d13771568f83c868788dfadb821"
        );
        let (raw, alg, prefix) = tdx_quote_report_data(b"hello", "raw", "ignored").unwrap();
        assert_eq!(&raw[..5], b"hello");
        assert_eq!((alg.as_str(), prefix.as_str()), ("raw", ""));
        let (default, alg, _) = tdx_quote_report_data(b"x", "", "my-tag").unwrap();
        assert_eq!(default, hashed::<sha2::Sha512>("my-tag", b"x"));
        assert_eq!(alg, "sha512");
        assert!(tdx_quote_report_data(b"x", "md5", "").is_err());
    }
}
