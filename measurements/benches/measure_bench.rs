//! Benchmarks (prints numbers): `cargo bench -p dstack-measurements`.
//! Targets: quote parse+verify ≤ 2 ms, 64 KiB CCEL replay ≤ 1 ms, MRTD of 4 MiB OVMF ≤ 100 ms.
//! Set DSTACK_TEST_OVMF to benchmark a real OVMF image instead of a synthetic 4 MiB TDVF.

use std::hint::black_box;
use std::time::Instant;

use dstack_measurements::eventlog::{ccel, replay};
use dstack_measurements::mrtd::{PageOrder, compute_mrtd};
use dstack_measurements::quote::{Quote, TdReport};
use dstack_measurements::sim::SimulatedQuoteSigner;
use dstack_measurements::verify::{VerifyOptions, parse_collateral, verify_quote};

fn bench<T>(name: &str, iters: u32, target_ms: f64, mut f: impl FnMut() -> T) {
    for _ in 0..iters.div_ceil(10) {
        black_box(f());
    }
    let start = Instant::now();
    for _ in 0..iters {
        black_box(f());
    }
    let per = start.elapsed().as_secs_f64() * 1e3 / f64::from(iters);
    let verdict = if per <= target_ms { "ok" } else { "OVER TARGET" };
    println!("{name:<40} {per:>10.4} ms/iter  (target ≤ {target_ms} ms, {iters} iters) {verdict}");
}

fn data(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// A 64 KiB CCEL area: the sample's spec-ID header followed by its events repeated.
fn ccel_64k() -> Vec<u8> {
    let sample = data("dstack-ccel.bin");
    let log = ccel::parse_ccel(&sample).unwrap();
    let first = log.events[0].offset;
    let events = &sample[first..log.used];
    let mut area = sample[..first].to_vec();
    while area.len() + events.len() <= 64 * 1024 {
        area.extend_from_slice(events);
    }
    area.resize(64 * 1024, 0xff);
    area
}

/// A synthetic 4 MiB TDVF: a 3.5 MiB extended BFV plus small add-only sections.
fn synthetic_tdvf() -> Vec<u8> {
    let len = 4 << 20;
    let mut fw: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
    let bfv = 0x38_0000u32;
    let sections: [(u32, u32, u64, u64, u32, u32); 3] = [
        (0, bfv, 0xffc8_0000, u64::from(bfv), 0, 1),
        (bfv, 0x4_0000, 0xffc0_0000, 0x4_0000, 1, 0),
        (0, 0, 0x80_0000, 0x1_0000, 3, 0),
    ];
    let pos = 0x3c_0000usize;
    let mut d = Vec::new();
    d.extend_from_slice(b"TDVF");
    d.extend_from_slice(&(16 + 32 * sections.len() as u32).to_le_bytes());
    d.extend_from_slice(&1u32.to_le_bytes());
    d.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    for (o, r, g, m, t, a) in sections {
        for v in [
            o.to_le_bytes().to_vec(),
            r.to_le_bytes().to_vec(),
            g.to_le_bytes().to_vec(),
            m.to_le_bytes().to_vec(),
            t.to_le_bytes().to_vec(),
            a.to_le_bytes().to_vec(),
        ] {
            d.extend_from_slice(&v);
        }
    }
    fw[pos..pos + d.len()].copy_from_slice(&d);
    fw[len - 0x20..len - 0x1c].copy_from_slice(&((len - pos) as u32).to_le_bytes());
    fw
}

fn main() {
    let raw = data("tdx_quote");
    let coll = parse_collateral(&data("tdx_quote_collateral.json")).unwrap();
    let opts = VerifyOptions {
        now: 1_752_919_234,
        ..Default::default()
    };
    bench("quote parse", 20_000, 2.0, || Quote::parse(&raw).unwrap());
    bench("quote parse+verify (dcap-qvl, ring)", 300, 2.0, || {
        verify_quote(&raw, Some(&coll), &opts).unwrap()
    });

    let signer = SimulatedQuoteSigner::generate().unwrap();
    let sim = signer.sign(&TdReport::zeroed()).unwrap();
    let sim_opts = VerifyOptions {
        now: 1_800_000_000,
        allow_simulated: true,
        simulated_roots: vec![signer.root_pin()],
        allow_debug: false,
    };
    bench("simulated quote sign", 1_000, 2.0, || {
        signer.sign(&TdReport::zeroed()).unwrap()
    });
    bench("simulated quote parse+verify", 1_000, 2.0, || {
        verify_quote(&sim, None, &sim_opts).unwrap()
    });

    let area = ccel_64k();
    let n = ccel::parse_ccel(&area).unwrap().events.len();
    bench(&format!("64 KiB CCEL parse+replay ({n} events)"), 1_000, 1.0, || {
        let log = ccel::parse_ccel(&area).unwrap();
        replay(&log.to_tdx_events().unwrap()).unwrap()
    });

    let (fw, what) = match std::env::var("DSTACK_TEST_OVMF") {
        Ok(p) => (std::fs::read(&p).unwrap(), p),
        Err(_) => (synthetic_tdvf(), "synthetic 4 MiB TDVF".to_owned()),
    };
    println!("MRTD input: {what} ({} bytes)", fw.len());
    bench("MRTD single-pass", 20, 100.0, || {
        compute_mrtd(&fw, PageOrder::SinglePass).unwrap()
    });
    bench("MRTD two-pass", 20, 100.0, || {
        compute_mrtd(&fw, PageOrder::TwoPass).unwrap()
    });
}
