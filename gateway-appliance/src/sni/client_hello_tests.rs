use std::sync::Arc;

use super::*;

/// A ClientHello produced by rustls (an independent TLS implementation), as raw records.
pub(crate) fn rustls_hello(server_name: &str, alpn: &[&[u8]]) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Split the handshake payload of `records` into records of at most `chunk` bytes.
fn refragment(records: &[u8], chunk: usize) -> Vec<u8> {
    let mut payload = Vec::new();
    let mut pos = 0;
    while pos + 5 <= records.len() {
        let len = u16::from_be_bytes([records[pos + 3], records[pos + 4]]) as usize;
        payload.extend_from_slice(&records[pos + 5..pos + 5 + len]);
        pos += 5 + len;
    }
    let mut out = Vec::new();
    for part in payload.chunks(chunk) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// Hand-built ClientHello from its parts (RFC 8446 §4.1.2 layout).
fn build_hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0xab; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    let mut exts = Vec::new();
    for (ty, data) in extensions {
        exts.extend_from_slice(&ty.to_be_bytes());
        exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
        exts.extend_from_slice(data);
    }
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![22, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

fn sni_ext(name: &[u8]) -> (u16, Vec<u8>) {
    let mut entry = vec![0];
    entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
    entry.extend_from_slice(name);
    let mut data = (entry.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(&entry);
    (0, data)
}

#[test]
fn rustls_hello_sni_and_alpn() {
    let raw = rustls_hello("App-1234.Example.com", &[b"h2", b"http/1.1"]);
    let info = parse_client_hello(&raw).unwrap();
    assert_eq!(info.sni.as_deref(), Some("app-1234.example.com"));
    assert_eq!(info.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    assert_eq!(info.consumed, raw.len());
}

#[test]
fn every_prefix_is_incomplete() {
    let raw = rustls_hello("abc.example.com", &[]);
    for n in 0..raw.len() {
        assert_eq!(
            parse_client_hello(&raw[..n]),
            Err(ClientHelloError::Incomplete),
            "prefix {n}"
        );
    }
    let info = parse_client_hello(&raw).unwrap();
    assert_eq!(info.sni.as_deref(), Some("abc.example.com"));
}

#[test]
fn handshake_split_over_many_records() {
    let raw = rustls_hello("split.example.com", &[b"h2"]);
    for chunk in [1, 7, 100] {
        let frag = refragment(&raw, chunk);
        let info = parse_client_hello(&frag).unwrap();
        assert_eq!(info.sni.as_deref(), Some("split.example.com"), "chunk {chunk}");
        assert_eq!(info.alpn, vec![b"h2".to_vec()]);
        assert_eq!(info.consumed, frag.len());
    }
}

#[test]
fn data_after_hello_is_not_consumed() {
    let mut raw = rustls_hello("x.example.com", &[]);
    let hello_len = raw.len();
    raw.extend_from_slice(b"\x17\x03\x03\x00\x01z");
    assert_eq!(parse_client_hello(&raw).unwrap().consumed, hello_len);
}

#[test]
fn ip_address_means_no_sni() {
    let raw = rustls_hello("127.0.0.1", &[]);
    assert_eq!(parse_client_hello(&raw).unwrap().sni, None);
}

#[test]
fn plain_http_is_not_tls() {
    assert_eq!(
        parse_client_hello(b"GET / HTTP/1.1\r\n"),
        Err(ClientHelloError::NotTls(b'G'))
    );
    assert_eq!(parse_client_hello(b"G"), Err(ClientHelloError::NotTls(b'G')));
}

#[test]
fn size_limit_enforced() {
    let raw = rustls_hello("big.example.com", &[]);
    let err = parse_client_hello_bounded(&raw, 64).unwrap_err();
    assert_eq!(err, ClientHelloError::TooLarge { limit: 64 });
    // Enough bytes to pass the limit is also TooLarge rather than Incomplete.
    let many = refragment(&raw, 10);
    assert!(matches!(
        parse_client_hello_bounded(&many[..200], 100),
        Err(ClientHelloError::TooLarge { limit: 100 })
    ));
}

#[test]
fn hand_built_hello_trailing_dot_and_case() {
    let raw = build_hello(&[sni_ext(b"MyApp-8080s.Example.COM.")]);
    let info = parse_client_hello(&raw).unwrap();
    assert_eq!(info.sni.as_deref(), Some("myapp-8080s.example.com"));
    assert!(info.alpn.is_empty());
}

#[test]
fn duplicate_extension_rejected() {
    let raw = build_hello(&[sni_ext(b"a.example.com"), sni_ext(b"b.example.com")]);
    assert!(matches!(
        parse_client_hello(&raw),
        Err(ClientHelloError::Malformed {
            what: "duplicate extension",
            ..
        })
    ));
}

#[test]
fn bad_hostnames_rejected() {
    for name in [&b"a b.example.com"[..], b"a..b", b"\xffx.com", b"", b"."] {
        let raw = build_hello(&[sni_ext(name)]);
        assert!(
            matches!(parse_client_hello(&raw), Err(ClientHelloError::Malformed { .. })),
            "{name:?}"
        );
    }
    let long = vec![b'a'; 64];
    let raw = build_hello(&[sni_ext(&long)]);
    assert!(matches!(
        parse_client_hello(&raw),
        Err(ClientHelloError::Malformed { .. })
    ));
}

#[test]
fn empty_alpn_name_rejected() {
    let raw = build_hello(&[(16, vec![0, 5, 2, b'h', b'2'])]);
    assert!(matches!(
        parse_client_hello(&raw),
        Err(ClientHelloError::Malformed { .. })
    ));
    let raw = build_hello(&[(16, vec![0, 1, 0])]);
    assert!(matches!(
        parse_client_hello(&raw),
        Err(ClientHelloError::Malformed {
            what: "empty alpn protocol name",
            ..
        })
    ));
}

#[test]
fn non_client_hello_handshake_rejected() {
    let mut raw = build_hello(&[]);
    raw[5] = 2; // server_hello
    assert!(matches!(
        parse_client_hello(&raw),
        Err(ClientHelloError::Malformed { .. })
    ));
}

#[test]
fn zero_length_record_rejected() {
    let raw = [22u8, 3, 1, 0, 0, 1, 0, 0];
    assert!(matches!(
        parse_client_hello(&raw),
        Err(ClientHelloError::Malformed {
            what: "empty handshake record",
            ..
        })
    ));
}

/// Deterministic mutation "fuzzing": truncations, bit flips and length-field edits must never
/// panic and must never report an SNI that is not a valid hostname.
#[test]
fn mutations_never_panic() {
    let seeds = [
        rustls_hello("fuzz.example.com", &[b"h2", b"http/1.1"]),
        refragment(&rustls_hello("f.example.com", &[b"h2"]), 33),
        build_hello(&[sni_ext(b"a.b"), (16, vec![0, 3, 2, b'h', b'2'])]),
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for seed in &seeds {
        for _ in 0..3000 {
            let mut buf = seed.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % buf.len();
                match next() % 3 {
                    0 => buf[i] ^= 1 << (next() % 8),
                    1 => buf[i] = next() as u8,
                    _ => buf.truncate(i.max(1)),
                }
            }
            if let Ok(info) = parse_client_hello(&buf) {
                if let Some(sni) = info.sni {
                    assert!(!sni.is_empty() && sni.len() <= 253 && sni.is_ascii());
                }
                assert!(info.consumed <= buf.len());
            }
        }
    }
}
