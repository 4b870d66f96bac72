//! Simulated quote generation and verification speed: `cargo run --release -p dstack-sim-tdx --example bench_quote`.

use std::time::Instant;

use dstack_measurements::sim::SimulatedQuoteSigner;
use dstack_measurements::verify::{VerifyOptions, verify_quote};
use dstack_sim_tdx::{InitialState, SimTdx};

fn main() {
    let init = InitialState {
        mrtd: vec![0x11; 48],
        ..Default::default()
    };
    let sim = SimTdx::new(&init, SimulatedQuoteSigner::generate().expect("signer")).expect("module");
    let n = 500u32;
    let start = Instant::now();
    let mut last = Vec::new();
    for i in 0..n {
        last = sim.quote(&i.to_le_bytes()).expect("quote");
    }
    let per_quote = start.elapsed() / n;
    let opts = VerifyOptions {
        now: 1_800_000_000,
        allow_simulated: true,
        simulated_roots: vec![sim.root_pin()],
        allow_debug: false,
    };
    let start = Instant::now();
    for _ in 0..n {
        verify_quote(&last, None, &opts).expect("verify");
    }
    let per_verify = start.elapsed() / n;
    println!(
        "simulated quote generation: {per_quote:?} per quote ({n} quotes, {} bytes each)",
        last.len()
    );
    println!("simulated quote verification: {per_verify:?} per quote");
}
