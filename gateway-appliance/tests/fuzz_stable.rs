//! Stable, bounded mutation fuzzing of the gateway's attacker-facing parsers: the ClientHello/SNI parser
//! (first bytes of every connection), the inbound PROXY protocol header, DNS TXT answers (custom-domain
//! routing) and the host/subdomain routing rules applied to the extracted SNI.
mod common;

use std::net::SocketAddr;

use dstack_gateway::dns::{Answer, encode_query, parse_app_address, parse_txt_response};
use dstack_gateway::proxy::pp;
use dstack_gateway::sni::{ClientHelloError, parse_client_hello, parse_client_hello_bounded, parse_host};
use dstack_testkit::{Budget, Mutator, run, run_with, seed_from_env};

const BASE: &str = "apps.test";

#[test]
fn client_hello_parser_survives_mutation() {
    let seeds = vec![
        common::hello::client_hello("app1-8080s.apps.test", &[b"h2", b"http/1.1"]),
        common::hello::client_hello("shop.example.org", &[]),
        common::hello::client_hello("a.b", &[b"x"]),
    ];
    for s in &seeds {
        let info = parse_client_hello(s).expect("rustls hello parses");
        assert_eq!(info.consumed, s.len());
    }
    // Also the same hello split into two records (the parser reassembles fragments).
    let whole = &seeds[0];
    let body = &whole[5..];
    let mut split = Vec::new();
    for part in [&body[..40], &body[40..]] {
        split.extend_from_slice(&[22, 3, 1]);
        split.extend_from_slice(&(part.len() as u16).to_be_bytes());
        split.extend_from_slice(part);
    }
    assert_eq!(
        parse_client_hello(&split).unwrap().sni,
        parse_client_hello(whole).unwrap().sni
    );
    let mut seeds = seeds;
    seeds.push(split);

    let m = Mutator::new(seed_from_env()).with_dictionary([&b"\x00\x00"[..], b"\x00\x10", b"\xff\xff", b"..", b"."]);
    let r = run_with("client_hello", &seeds, Budget::new(20_000, 4), m, |data| {
        match parse_client_hello(data) {
            Ok(info) => {
                assert!(info.consumed <= data.len());
                if let Some(sni) = &info.sni {
                    assert!(!sni.is_empty() && sni.len() <= 253, "{sni:?}");
                    assert_eq!(sni, &sni.to_ascii_lowercase());
                    if let Err(e) = parse_host(sni, BASE) {
                        assert!(!e.to_string().is_empty());
                    }
                }
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        // A tight bound must refuse rather than over-read.
        if let Ok(info) = parse_client_hello_bounded(data, 64) {
            assert!(info.consumed <= 64);
        }
        // Every strict prefix of an accepted hello is Incomplete or an error, never a different success.
        if data.len() > 1 && parse_client_hello(data).is_ok() {
            let cut = &data[..data.len() / 2];
            if let Ok(i) = parse_client_hello(cut) {
                assert!(i.consumed <= cut.len());
            }
        }
    });
    assert!(r.mutated > 1_000, "{r:?}");
    assert_eq!(parse_client_hello(&[]), Err(ClientHelloError::Incomplete));
}

#[test]
fn proxy_protocol_parser_survives_mutation() {
    let v4: SocketAddr = "203.0.113.7:51234".parse().unwrap();
    let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    let dst: SocketAddr = "10.0.0.1:443".parse().unwrap();
    let seeds = vec![
        pp::encode_v1(v4, dst),
        pp::encode_v2(v4, dst),
        pp::encode_v2(v6, "[2001:db8::2]:8443".parse().unwrap()),
        b"PROXY UNKNOWN\r\n".to_vec(),
    ];
    for s in &seeds {
        assert_eq!(pp::parse(s).unwrap().len, s.len());
    }
    let r = run(
        "proxy_protocol",
        &seeds,
        Budget::new(20_000, 4),
        |data| match pp::parse(data) {
            Ok(h) => assert!(h.len <= data.len()),
            Err(e) => assert!(!e.to_string().is_empty()),
        },
    );
    assert!(r.mutated > 1_000, "{r:?}");
}

/// A TXT answer for `name`: the query echoed with QR set, one answer pointing back at the question name.
fn txt_response(id: u16, name: &str, texts: &[&str]) -> Vec<u8> {
    let mut m = encode_query(id, name, 16).unwrap();
    m[2] = 0x81;
    m[3] = 0x80;
    m[6..8].copy_from_slice(&1u16.to_be_bytes());
    let mut rdata = Vec::new();
    for t in texts {
        rdata.push(t.len() as u8);
        rdata.extend_from_slice(t.as_bytes());
    }
    m.extend_from_slice(&[0xc0, 0x0c, 0, 16, 0, 1, 0, 0, 0, 60]);
    m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    m.extend_from_slice(&rdata);
    m
}

#[test]
fn dns_txt_answer_parser_survives_mutation() {
    let name = "_dstack-app-address.shop.example.org";
    let seeds = vec![
        txt_response(0x1234, name, &["app3:8443"]),
        txt_response(0x1234, name, &["00112233445566778899aabbccddeeff00112233:443", "x"]),
    ];
    match parse_txt_response(&seeds[0], 0x1234).unwrap() {
        Answer::Records(r) => assert_eq!(r, vec!["app3:8443".to_owned()]),
        Answer::Truncated => panic!("seed is not truncated"),
    }
    let r = run(
        "dns_txt",
        &seeds,
        Budget::new(20_000, 4),
        |m| match parse_txt_response(m, 0x1234) {
            Ok(Answer::Records(records)) => {
                for txt in records {
                    if let Err(e) = parse_app_address(&txt) {
                        assert!(!e.to_string().is_empty());
                    }
                }
            }
            Ok(Answer::Truncated) => {}
            Err(e) => assert!(!e.to_string().is_empty()),
        },
    );
    assert!(r.mutated > 1_000, "{r:?}");
}
