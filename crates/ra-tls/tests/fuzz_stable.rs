//! Stable, bounded mutation fuzzing of RA-TLS certificate parsing (a peer's certificate is attacker bytes):
//! mutated DER, including edited length fields inside the quote/event-log extensions, yields an error or a
//! parse whose extracted fields are consistent, never a panic.
mod common;

use dstack_ra_tls::{parse_cert, peer_identity};
use dstack_testkit::{Budget, run};
use rustls_pki_types::CertificateDer;

#[test]
fn certificate_parser_survives_mutation() {
    let sim = common::booted_sim();
    let key = common::key();
    let attested = common::leaf_request(Some(common::attestation_for(&sim, &key)))
        .self_signed(&key)
        .unwrap();
    let plain = common::leaf_request(None).self_signed(&common::key()).unwrap();
    let seeds = vec![attested.der().to_vec(), plain.der().to_vec()];
    let parsed = parse_cert(&seeds[0]).expect("seed parses");
    assert!(parsed.quote.is_some() && parsed.event_log.is_some());

    // Full verification too (quote signature, event-log replay) on whatever still parses.
    let verifier = common::verifier(&sim, true);
    let r = run("ra_tls_cert", &seeds, Budget::new(3_000, 4), |der| {
        match parse_cert(der) {
            Ok(p) => {
                assert!(!p.spki_der.is_empty());
                if let Err(e) = peer_identity(&verifier, Some(&[CertificateDer::from(der.to_vec())])) {
                    assert!(!e.to_string().is_empty());
                }
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    });
    assert!(r.mutated > 100, "{r:?}");
}
