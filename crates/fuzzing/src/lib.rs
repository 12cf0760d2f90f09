//! Seeded fuzzing for the parsers of files a user hands to supportlm (GGUF, safetensors, JSON configs,
//! PEFT adapters, CSV, TOML, split manifests, the judge's replies).
//!
//! The property every target checks: **a clear error or a correct load, never a panic, an abort, an
//! unbounded allocation or a hang.** A target is a test that calls [`Fuzz::run`] with a few valid
//! seed inputs and a closure that parses one input:
//! - [`mutate`]: byte-level (truncation, bit flips, interesting integers, splices) and text-level
//!   (numbers swapped for extreme ones, lines dropped or repeated, quotes and brackets broken) mutations
//!   from a seeded generator, so input `i` of seed `s` is the same on every machine;
//! - [`Fuzz::run`]: runs the inputs on a worker thread, turns a panic into a failure naming the input
//!   (saved to a file), and fails an input that takes longer than the time limit;
//! - [`CappedAlloc`]: a global allocator for fuzz test binaries that refuses (and reports) any single
//!   allocation over a cap while a run is on, so "allocate what the header says" bugs abort loudly
//!   instead of passing on a machine with enough memory.
//!
//! Bounded by default (CI): `SUPPORTLM_FUZZ_ITERATIONS` (default 2,000 per target) and
//! `SUPPORTLM_FUZZ_SEED` (default 1) change that; `cargo xtask fuzz` runs longer campaigns.

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The environment variable with the number of inputs per target.
pub const ITERATIONS_ENV: &str = "SUPPORTLM_FUZZ_ITERATIONS";
/// The environment variable with the seed of the inputs.
pub const SEED_ENV: &str = "SUPPORTLM_FUZZ_SEED";

/// A small deterministic generator (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// Integers that break size arithmetic: zero, one, sign edges, powers of two, all ones.
const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    0xffff_ffff_ffff_fff0,
    u64::MAX,
];

/// Numbers and literals that break parsers of text formats.
const NASTY_TOKENS: [&str; 16] = [
    "0",
    "-1",
    "1e309",
    "-1e309",
    "NaN",
    "18446744073709551616",
    "9223372036854775807",
    "4294967296",
    "1e-400",
    "null",
    "true",
    "\"\"",
    "[]",
    "{}",
    "\"\\ud800\"",
    "99999999999999999999999999999",
];

/// How inputs are mutated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// Binary formats: byte-level mutations only.
    Bytes,
    /// Text formats (JSON, TOML, CSV, replies): text-level mutations as well as byte-level ones.
    Text,
}

/// One byte-level mutation of `data`.
fn mutate_bytes(data: &mut Vec<u8>, rng: &mut Rng) {
    let len = data.len();
    match rng.below(8) {
        // Truncate.
        0 => data.truncate(rng.below(len + 1)),
        // Flip a bit.
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        // Overwrite with an interesting integer (1, 2, 4 or 8 bytes, little-endian).
        2 | 3 if len > 0 => {
            let width = [1, 2, 4, 8][rng.below(4)];
            let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
            let at = rng.below(len);
            for (k, b) in v.iter().take(width).enumerate() {
                if let Some(slot) = data.get_mut(at + k) {
                    *slot = *b;
                }
            }
        }
        // Random byte.
        4 if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.next_u64() as u8;
        }
        // Delete a range.
        5 if len > 0 => {
            let a = rng.below(len);
            let b = (a + 1 + rng.below(16)).min(len);
            data.drain(a..b);
        }
        // Duplicate a range somewhere else.
        6 if len > 0 => {
            let a = rng.below(len);
            let b = (a + 1 + rng.below(64)).min(len);
            let chunk = data[a..b].to_vec();
            let at = rng.below(data.len() + 1);
            data.splice(at..at, chunk);
        }
        // Append garbage.
        _ => {
            let n = 1 + rng.below(32);
            data.extend((0..n).map(|_| rng.next_u64() as u8));
        }
    }
}

/// One text-level mutation of `data` (treated as text; invalid UTF-8 is left to the byte mutations).
fn mutate_text(data: &mut Vec<u8>, rng: &mut Rng) {
    let text = String::from_utf8_lossy(data).into_owned();
    let out = match rng.below(6) {
        // Replace a number (or a literal) by a nasty token.
        0 | 1 => {
            let spans: Vec<(usize, usize)> = number_spans(&text);
            if spans.is_empty() {
                return mutate_bytes(data, rng);
            }
            let (a, b) = spans[rng.below(spans.len())];
            let token = NASTY_TOKENS[rng.below(NASTY_TOKENS.len())];
            format!("{}{token}{}", &text[..a], &text[b..])
        }
        // Drop a line.
        2 => {
            let lines: Vec<&str> = text.lines().collect();
            if lines.is_empty() {
                return mutate_bytes(data, rng);
            }
            let k = rng.below(lines.len());
            lines
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != k)
                .map(|(_, l)| *l)
                .collect::<Vec<_>>()
                .join("\n")
        }
        // Repeat a line.
        3 => {
            let mut lines: Vec<&str> = text.lines().collect();
            if lines.is_empty() {
                return mutate_bytes(data, rng);
            }
            let k = rng.below(lines.len());
            let times = 1 + rng.below(4);
            for _ in 0..times {
                lines.insert(k, lines[k]);
            }
            lines.join("\n")
        }
        // Delete a structural character.
        4 => {
            let spots: Vec<usize> = text
                .char_indices()
                .filter(|(_, c)| matches!(c, '"' | '{' | '}' | '[' | ']' | ',' | ':' | '=' | '\n'))
                .map(|(i, _)| i)
                .collect();
            if spots.is_empty() {
                return mutate_bytes(data, rng);
            }
            let i = spots[rng.below(spots.len())];
            format!("{}{}", &text[..i], &text[i + 1..])
        }
        // Insert a string of awkward characters.
        _ => {
            let pieces = [
                "\u{0}", "\u{feff}", "é", "\"", "\\", "\r\n", ",", "\t", "🙂", "\u{202e}",
            ];
            let at = text
                .char_indices()
                .map(|(i, _)| i)
                .nth(rng.below(text.chars().count() + 1))
                .unwrap_or(text.len());
            let piece = pieces[rng.below(pieces.len())].repeat(1 + rng.below(3));
            format!("{}{piece}{}", &text[..at], &text[at..])
        }
    };
    *data = out.into_bytes();
}

/// Byte spans of numbers and `true`/`false`/`null` literals in `text`.
fn number_spans(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts_number = bytes[i].is_ascii_digit()
            || (bytes[i] == b'-' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit));
        if starts_number {
            let a = i;
            i += 1;
            while i < bytes.len()
                && matches!(bytes[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
            {
                i += 1;
            }
            spans.push((a, i));
        } else if ["true", "false", "null"]
            .iter()
            .any(|w| bytes[i..].starts_with(w.as_bytes()))
        {
            let n = if bytes[i..].starts_with(b"false") {
                5
            } else {
                4
            };
            spans.push((i, i + n));
            i += n;
        } else {
            i += 1;
        }
    }
    spans
}

/// Input `index` of a run with `seed` over `seeds`: a seed input with 1–8 mutations (the first few
/// inputs are the seeds themselves, unmutated).
pub fn mutate(seeds: &[Vec<u8>], kind: Mutation, seed: u64, index: usize) -> Vec<u8> {
    if seeds.is_empty() {
        return Vec::new();
    }
    if index < seeds.len() {
        return seeds[index].clone();
    }
    let mut rng = Rng::new(seed ^ (index as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut data = seeds[rng.below(seeds.len())].clone();
    let n = 1 + rng.below(8);
    for _ in 0..n {
        if kind == Mutation::Text && rng.below(3) > 0 {
            mutate_text(&mut data, &mut rng);
        } else {
            mutate_bytes(&mut data, &mut rng);
        }
    }
    data
}

/// What a target's closure says about one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Parsed (and, where the target checks it, consistent).
    Loaded,
    /// Refused with an error.
    Refused,
}

impl<T, E> From<Result<T, E>> for Verdict {
    fn from(r: Result<T, E>) -> Self {
        match r {
            Ok(_) => Verdict::Loaded,
            Err(_) => Verdict::Refused,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The target's name.
    pub name: String,
    /// Inputs tried.
    pub inputs: usize,
    /// Inputs that loaded.
    pub loaded: usize,
    /// Inputs refused with an error.
    pub refused: usize,
    /// The slowest input.
    pub slowest: Duration,
}

/// A fuzz run over one target. See the crate documentation.
pub struct Fuzz {
    name: String,
    iterations: usize,
    seed: u64,
    time_limit: Duration,
    mutation: Mutation,
    alloc_cap: usize,
}

impl Fuzz {
    /// A run named `name` (used in messages and for saved inputs), with the iteration count and seed of
    /// the environment (see the crate documentation).
    pub fn new(name: &str, mutation: Mutation) -> Self {
        let env = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        Fuzz {
            name: name.to_string(),
            iterations: env(ITERATIONS_ENV).map_or(2000, |n| n as usize),
            seed: env(SEED_ENV).unwrap_or(1),
            time_limit: Duration::from_secs(10),
            mutation,
            alloc_cap: 512 << 20,
        }
    }

    /// Scales the number of inputs (for targets that are slow per input): `iterations * num / den`.
    pub fn scaled(mut self, num: usize, den: usize) -> Self {
        self.iterations = (self.iterations * num / den.max(1)).max(1);
        self
    }

    /// The largest single allocation allowed while an input is parsed (with [`CappedAlloc`]).
    pub fn alloc_cap(mut self, bytes: usize) -> Self {
        self.alloc_cap = bytes;
        self
    }

    /// Runs `check` on every input; panics (failing the test) on the first input that panics or takes
    /// longer than the time limit, naming it and saving it to a file. Prints and returns the counts.
    pub fn run<F>(self, seeds: &[Vec<u8>], check: F) -> Report
    where
        F: Fn(&[u8]) -> Verdict + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<(usize, Result<Verdict, String>, Duration)>();
        let (seeds_owned, kind, seed, n, cap) = (
            seeds.to_vec(),
            self.mutation,
            self.seed,
            self.iterations.max(seeds.len()),
            self.alloc_cap,
        );
        let worker = std::thread::Builder::new()
            .name(format!("fuzz-{}", self.name))
            .spawn(move || {
                for i in 0..n {
                    let input = mutate(&seeds_owned, kind, seed, i);
                    let started = Instant::now();
                    CURRENT_INPUT.store(i, Ordering::SeqCst);
                    ALLOC_CAP.store(cap, Ordering::SeqCst);
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| check(&input)));
                    ALLOC_CAP.store(usize::MAX, Ordering::SeqCst);
                    let result = result.map_err(|p| {
                        p.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "a panic without a message".into())
                    });
                    let failed = result.is_err();
                    if tx.send((i, result, started.elapsed())).is_err() || failed {
                        return;
                    }
                }
            })
            .expect("spawning the fuzz worker");
        let mut report = Report {
            name: self.name.clone(),
            inputs: 0,
            loaded: 0,
            refused: 0,
            slowest: Duration::ZERO,
        };
        for expected in 0..n {
            match rx.recv_timeout(self.time_limit) {
                Ok((i, Ok(verdict), took)) => {
                    report.inputs += 1;
                    report.slowest = report.slowest.max(took);
                    match verdict {
                        Verdict::Loaded => report.loaded += 1,
                        Verdict::Refused => report.refused += 1,
                    }
                    debug_assert_eq!(i, expected);
                }
                Ok((i, Err(message), _)) => {
                    let saved = self.save(seeds, i);
                    let _ = worker.join();
                    panic!(
                        "fuzz target `{}`: input #{i} (seed {}) panicked: {message}; the input is saved in {}",
                        self.name,
                        self.seed,
                        saved.display()
                    );
                }
                Err(_) => {
                    let saved = self.save(seeds, expected);
                    panic!(
                        "fuzz target `{}`: input #{expected} (seed {}) took more than {:?} (a hang?); the input is saved in {}",
                        self.name,
                        self.seed,
                        self.time_limit,
                        saved.display()
                    );
                }
            }
        }
        let _ = worker.join();
        println!(
            "fuzz {}: {} inputs (seed {}): {} loaded, {} refused with an error, 0 panics, slowest {:.1} ms",
            report.name,
            report.inputs,
            self.seed,
            report.loaded,
            report.refused,
            report.slowest.as_secs_f64() * 1e3
        );
        report
    }

    fn save(&self, seeds: &[Vec<u8>], index: usize) -> PathBuf {
        let dir = std::env::temp_dir().join("supportlm-fuzz");
        let path = dir.join(format!("{}-seed{}-{index}.bin", self.name, self.seed));
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(&path, mutate(seeds, self.mutation, self.seed, index));
        path
    }
}

/// The input being parsed (for the allocator's message).
static CURRENT_INPUT: AtomicUsize = AtomicUsize::new(0);
/// The largest single allocation allowed now (`usize::MAX` outside a run).
static ALLOC_CAP: AtomicUsize = AtomicUsize::new(usize::MAX);

/// A global allocator for fuzz test binaries: the system allocator, except that while a [`Fuzz`] run
/// parses an input, a single allocation above the run's cap is refused after printing which input asked
/// for it (the process then aborts with Rust's allocation-failure message). Install it with
/// `#[global_allocator] static ALLOC: CappedAlloc = CappedAlloc;` in the test file.
pub struct CappedAlloc;

impl CappedAlloc {
    fn over_cap(size: usize) -> bool {
        let cap = ALLOC_CAP.load(Ordering::Relaxed);
        if size <= cap {
            return false;
        }
        // No allocation here: format into a stack buffer and write it straight to stderr.
        let mut buf = [0u8; 160];
        let mut w = Cursor {
            buf: &mut buf,
            len: 0,
        };
        w.push(b"\nfuzz: input #");
        w.number(CURRENT_INPUT.load(Ordering::Relaxed));
        w.push(b" asked for one allocation of ");
        w.number(size);
        w.push(b" bytes (the cap is ");
        w.number(cap);
        w.push(b"): an unbounded allocation\n");
        let len = w.len;
        use std::io::Write;
        let _ = std::io::stderr().write_all(&buf[..len]);
        true
    }
}

struct Cursor<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Cursor<'_> {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }
    fn number(&mut self, mut n: usize) {
        let mut digits = [0u8; 20];
        let mut k = digits.len();
        loop {
            k -= 1;
            digits[k] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let digits_copy = digits;
        self.push(&digits_copy[k..]);
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged, except that an oversized request
// returns null, which GlobalAlloc allows for any request.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if Self::over_cap(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller upholds alloc's contract, passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if Self::over_cap(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from System through alloc/alloc_zeroed/realloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if Self::over_cap(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_reproducible_and_start_with_the_seeds() {
        let seeds = vec![b"{\"a\": 12, \"b\": [1, 2]}".to_vec(), vec![0u8; 40]];
        assert_eq!(mutate(&seeds, Mutation::Text, 3, 0), seeds[0]);
        for i in 0..200 {
            assert_eq!(
                mutate(&seeds, Mutation::Text, 3, i),
                mutate(&seeds, Mutation::Text, 3, i)
            );
        }
        let distinct: std::collections::HashSet<Vec<u8>> = (0..200)
            .map(|i| mutate(&seeds, Mutation::Text, 3, i))
            .collect();
        assert!(distinct.len() > 150, "{}", distinct.len());
    }

    #[test]
    fn number_spans_find_numbers_and_literals() {
        let t = "{\"a\": -12.5e3, \"b\": true, \"c\": null}";
        let found: Vec<&str> = number_spans(t).iter().map(|&(a, b)| &t[a..b]).collect();
        assert_eq!(found, ["-12.5e3", "true", "null"]);
    }

    #[test]
    #[should_panic(expected = "panicked: boom")]
    fn a_panicking_input_fails_the_run_and_is_named() {
        Fuzz::new("selftest", Mutation::Bytes)
            .scaled(1, 100)
            .run(&[b"abc".to_vec()], |input| {
                if input.len() < 100 {
                    panic!("boom");
                }
                Verdict::Loaded
            });
    }

    #[test]
    fn refusals_and_loads_are_counted() {
        let r =
            Fuzz::new("count", Mutation::Bytes)
                .scaled(1, 10)
                .run(&[b"12345".to_vec()], |input| {
                    std::str::from_utf8(input)
                        .ok()
                        .and_then(|s| s.parse::<u32>().ok())
                        .ok_or(())
                        .into()
                });
        assert_eq!(r.loaded + r.refused, r.inputs);
        assert!(r.loaded >= 1 && r.refused >= 1);
    }
}
