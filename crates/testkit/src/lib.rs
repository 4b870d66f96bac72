//! Bounded, deterministic mutation fuzzing for stable `cargo test`.
//!
//! cargo-fuzz needs nightly, which CI does not have; this crate gives every parser that takes attacker bytes a
//! cheap always-on check instead: replay the seed inputs (and any local cargo-fuzz corpus), then run a fixed
//! number of mutated inputs (bit flips, interesting bytes, truncation, splicing, length-field edits, chunk
//! insert/delete/duplicate, dictionary tokens) from a fixed PRNG seed, within a wall-clock budget. The target
//! must not panic; callers assert on the error values themselves.
//!
//! Knobs (environment): `DSTACK_FUZZ_SEED` (u64, default fixed), `DSTACK_FUZZ_ITERS` (overrides every
//! target's iteration count, e.g. for a longer soak run), `DSTACK_FUZZ_SECS` (overrides the time budget).
//! A panicking input is written to the temp dir and its path is named in the panic message.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Small, fast, deterministic PRNG (xorshift64*); not for anything but test-input generation.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Zero is a fixed point of xorshift; mix the seed so every value works.
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish value in `0..n` (`n == 0` yields 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

const INTERESTING_U8: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0xfe, 0x10, 0x20];
const INTERESTING_U32: [u32; 10] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
];

/// Produces mutated variants of seed inputs.
#[derive(Debug)]
pub struct Mutator {
    rng: Rng,
    dictionary: Vec<Vec<u8>>,
}

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Mutator {
            rng: Rng::new(seed),
            dictionary: Vec::new(),
        }
    }

    /// Tokens spliced in by the dictionary mutation (e.g. JSON keywords, magic values).
    pub fn with_dictionary<I, T>(mut self, tokens: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: AsRef<[u8]>,
    {
        self.dictionary.extend(tokens.into_iter().map(|t| t.as_ref().to_vec()));
        self
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// One to four stacked mutations of `input`; `others` feeds the splice mutation.
    pub fn mutate(&mut self, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
        let mut data = input.to_vec();
        let rounds = 1 + self.rng.below(4);
        for _ in 0..rounds {
            self.mutate_once(&mut data, others);
        }
        data
    }

    fn mutate_once(&mut self, data: &mut Vec<u8>, others: &[Vec<u8>]) {
        let len = data.len();
        match self.rng.below(10) {
            0 if len > 0 => {
                let i = self.rng.below(len);
                data[i] ^= 1 << self.rng.below(8);
            }
            1 if len > 0 => {
                let i = self.rng.below(len);
                data[i] = INTERESTING_U8[self.rng.below(INTERESTING_U8.len())];
            }
            2 => data.truncate(self.rng.below(len + 1)),
            3 if !others.is_empty() => {
                // Splice: our prefix + another input's suffix.
                let other = &others[self.rng.below(others.len())];
                let cut = self.rng.below(len + 1);
                let from = self.rng.below(other.len() + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            4 | 5 if len >= 2 => self.edit_length_field(data),
            6 if len > 0 => {
                let start = self.rng.below(len);
                let n = 1 + self.rng.below((len - start).min(64));
                data.drain(start..start + n);
            }
            7 if len > 0 => {
                // Duplicate a chunk in place: repeated records, nested structures.
                let start = self.rng.below(len);
                let n = 1 + self.rng.below((len - start).min(256));
                let chunk = data[start..start + n].to_vec();
                let at = self.rng.below(len + 1);
                data.splice(at..at, chunk);
            }
            8 if !self.dictionary.is_empty() => {
                let tok = self.dictionary[self.rng.below(self.dictionary.len())].clone();
                let at = self.rng.below(len + 1);
                if self.rng.chance(2) && at + tok.len() <= len {
                    data[at..at + tok.len()].copy_from_slice(&tok);
                } else {
                    data.splice(at..at, tok);
                }
            }
            _ => {
                let n = 1 + self.rng.below(16);
                let at = self.rng.below(len + 1);
                let bytes: Vec<u8> = (0..n).map(|_| self.rng.next_u64() as u8).collect();
                data.splice(at..at, bytes);
            }
        }
    }

    /// Overwrite a 2- or 4-byte little/big-endian field with a boundary value or a value near the input
    /// length; this is what reaches length/offset/count checks that single bit flips rarely hit.
    fn edit_length_field(&mut self, data: &mut [u8]) {
        let len = data.len();
        let width = if len >= 4 && self.rng.chance(2) { 4 } else { 2 };
        let at = self.rng.below(len - width + 1);
        let value: u32 = match self.rng.below(3) {
            0 => INTERESTING_U32[self.rng.below(INTERESTING_U32.len())],
            1 => (len as u32).wrapping_add(self.rng.below(9) as u32).wrapping_sub(4),
            _ => {
                // Nudge the existing value by a small delta.
                let mut cur = [0u8; 4];
                cur[..width].copy_from_slice(&data[at..at + width]);
                u32::from_le_bytes(cur)
                    .wrapping_add(self.rng.below(17) as u32)
                    .wrapping_sub(8)
            }
        };
        let bytes = if self.rng.chance(2) {
            value.to_le_bytes()
        } else {
            value.to_be_bytes()
        };
        if width == 4 {
            data[at..at + 4].copy_from_slice(&bytes);
        } else if bytes[0] == 0 && bytes[1] == 0 {
            data[at..at + 2].copy_from_slice(&bytes[2..]);
        } else {
            data[at..at + 2].copy_from_slice(&bytes[..2]);
        }
    }
}

/// Bounds for one fuzz run.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub iterations: usize,
    pub time: Duration,
}

impl Budget {
    pub const fn new(iterations: usize, secs: u64) -> Self {
        Budget {
            iterations,
            time: Duration::from_secs(secs),
        }
    }

    fn with_env_overrides(self) -> Self {
        let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        Budget {
            iterations: env("DSTACK_FUZZ_ITERS").map_or(self.iterations, |v| v as usize),
            time: env("DSTACK_FUZZ_SECS").map_or(self.time, Duration::from_secs),
        }
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new(3_000, 4)
    }
}

/// What a run did, so the caller can assert it exercised something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub seeds_replayed: usize,
    pub mutated: usize,
    /// The slowest single input (a hang-shaped input shows up here even when nothing panics).
    pub slowest: Duration,
}

/// Default PRNG seed unless `DSTACK_FUZZ_SEED` is set.
pub fn seed_from_env() -> u64 {
    std::env::var("DSTACK_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5EED_D57A_C000_0001)
}

/// Replay every seed, then feed mutated seeds to `target` until the budget is spent.
/// Panics (naming a saved reproducer) if `target` panics on any input.
pub fn run(name: &str, seeds: &[Vec<u8>], budget: Budget, target: impl FnMut(&[u8])) -> Report {
    run_with(name, seeds, budget, Mutator::new(seed_from_env()), target)
}

/// [`run`] with a caller-configured mutator (e.g. one with a dictionary).
pub fn run_with(
    name: &str,
    seeds: &[Vec<u8>],
    budget: Budget,
    mut mutator: Mutator,
    mut target: impl FnMut(&[u8]),
) -> Report {
    let budget = budget.with_env_overrides();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for seed in seeds {
        slowest = slowest.max(check_one(name, seed, &mut target));
    }
    let fallback = [Vec::new()];
    let pool: &[Vec<u8>] = if seeds.is_empty() { &fallback } else { seeds };
    let mut mutated = 0;
    while mutated < budget.iterations && started.elapsed() < budget.time {
        let base = &pool[mutator.rng().below(pool.len())];
        let input = mutator.mutate(base, pool);
        let took = check_one(name, &input, &mut target);
        if took > slowest {
            slowest = took;
            if took > SLOW_INPUT {
                let path = save_input(name, "slow", &input);
                eprintln!(
                    "{name}: a {}-byte input took {took:?}; saved to {}",
                    input.len(),
                    path.display()
                );
            }
        }
        mutated += 1;
    }
    eprintln!(
        "fuzz {name}: {} seeds + {mutated} mutated inputs in {:?} (slowest {slowest:?})",
        seeds.len(),
        started.elapsed()
    );
    Report {
        seeds_replayed: seeds.len(),
        mutated,
        slowest,
    }
}

/// Inputs slower than this are saved for inspection (debug builds are ~10× slower than release).
const SLOW_INPUT: Duration = Duration::from_secs(1);

fn check_one(name: &str, input: &[u8], target: &mut impl FnMut(&[u8])) -> Duration {
    let started = Instant::now();
    if catch_unwind(AssertUnwindSafe(|| target(input))).is_err() {
        let path = save_input(name, "crash", input);
        panic!(
            "fuzz target {name} panicked on a {}-byte input; reproducer saved to {}",
            input.len(),
            path.display()
        );
    }
    started.elapsed()
}

fn save_input(name: &str, kind: &str, input: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("dstack-fuzz-{kind}-{name}-{}.bin", std::process::id()));
    if let Err(e) = std::fs::write(&path, input) {
        eprintln!("could not save reproducer to {}: {e}", path.display());
    }
    path
}

/// Read up to `max_files` files (sorted by name, each at most `max_bytes`) from a corpus directory.
/// A missing directory yields no seeds: cargo-fuzz corpora are local (git-ignored), so replaying them is a
/// bonus on machines that ran the fuzzer, never a requirement.
pub fn load_dir(dir: &Path, max_files: usize, max_bytes: u64) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.metadata().is_ok_and(|m| m.is_file() && m.len() <= max_bytes))
        .map(|e| e.path())
        .collect();
    paths.sort();
    paths.truncate(max_files);
    paths.into_iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_for_a_seed() {
        let seeds = vec![b"hello, world: {\"a\": [1, 2, 3]}".to_vec(), vec![0u8; 40]];
        let outputs = |s: u64| {
            let mut m = Mutator::new(s);
            (0..50).map(|i| m.mutate(&seeds[i % 2], &seeds)).collect::<Vec<_>>()
        };
        assert_eq!(outputs(7), outputs(7));
        assert_ne!(outputs(7), outputs(8));
    }

    #[test]
    fn mutations_change_inputs_and_cover_truncation_and_growth() {
        let base = (0u8..=255).collect::<Vec<u8>>();
        let mut m = Mutator::new(1);
        let (mut shorter, mut longer, mut changed) = (0, 0, 0);
        for _ in 0..2_000 {
            let out = m.mutate(&base, std::slice::from_ref(&base));
            shorter += usize::from(out.len() < base.len());
            longer += usize::from(out.len() > base.len());
            changed += usize::from(out != base);
        }
        assert!(shorter > 100 && longer > 100, "shorter={shorter} longer={longer}");
        assert!(changed > 1_900, "changed={changed}");
    }

    #[test]
    fn empty_input_is_fine() {
        let mut m = Mutator::new(3).with_dictionary(["null"]);
        for _ in 0..500 {
            let _ = m.mutate(&[], &[]);
        }
    }

    #[test]
    fn run_respects_budget_and_replays_seeds() {
        let seeds = vec![vec![1, 2, 3], vec![4, 5]];
        let mut calls = 0;
        let r = run("selftest", &seeds, Budget::new(100, 10), |_| calls += 1);
        assert_eq!(r.seeds_replayed, 2);
        assert!(r.mutated <= 100 || std::env::var("DSTACK_FUZZ_ITERS").is_ok());
        assert_eq!(calls, r.seeds_replayed + r.mutated);
    }

    #[test]
    fn a_panicking_target_is_reported_with_a_reproducer() {
        let res = catch_unwind(|| {
            run("selftest-panic", &[vec![9, 9]], Budget::new(10, 10), |d| {
                assert!(d != [9, 9], "boom");
            })
        });
        let msg = res.expect_err("must propagate the panic");
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("reproducer saved to"), "{msg}");
        let path = msg.rsplit("saved to ").next().unwrap_or_default();
        assert_eq!(std::fs::read(path).ok(), Some(vec![9, 9]));
        let _ = std::fs::remove_file(path);
    }
}
