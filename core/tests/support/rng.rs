//! Deterministic input generation for the `parsers_never_panic` tests, the stable-toolchain
//! companions of the cargo-fuzz targets in `fuzz/`. One copy for every crate: the other
//! crates' tests include this file with `#[path = "../../core/tests/support/rng.rs"] mod rng;`.
//!
//! Inputs are random bytes or mutations of realistic valid seeds, so that mutation explores
//! near-valid input (the part of a parser random bytes never reach). The PRNG is a fixed
//! xorshift so that a failure reproduces on every run and machine.

// why: each including test uses the part it needs.
#![allow(dead_code)]

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

/// Small deterministic PRNG (xorshift64).
pub struct Rng(u64);

/// Bytes that often change a parser's path: delimiters, quotes, extremes.
const INTERESTING: &[u8] = b"\x00\xff\x7f\x80\n\r\t \"'-:;,.=/[]{}#*&!%@~\\0149";

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // why: xorshift never leaves zero.
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True once in `n` times on average.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// Up to `max - 1` random bytes.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// An input: random bytes (fewer than `max_random`) one time in three, else a mutation
    /// of one of `seeds` with tokens of `dict`.
    pub fn random_or_mutated(
        &mut self,
        seeds: &[&[u8]],
        dict: &[&[u8]],
        max_random: usize,
    ) -> Vec<u8> {
        if self.one_in(3) {
            self.bytes(max_random)
        } else {
            let seed = *self.pick(seeds);
            self.mutate_with(seed, dict)
        }
    }

    /// `rounds` calls of `f` on [`Self::random_or_mutated`] inputs, each under [`check`].
    pub fn run(
        &mut self,
        what: &str,
        rounds: usize,
        (seeds, dict, max_random): (&[&[u8]], &[&[u8]], usize),
        f: impl Fn(&[u8]),
    ) {
        for _ in 0..rounds {
            let input = self.random_or_mutated(seeds, dict, max_random);
            check(what, &input, || f(&input));
        }
    }

    /// Take a valid sample and flip, drop, insert, repeat or cut a few bytes.
    pub fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        self.mutate_with(seed, &[])
    }

    /// [`Self::mutate`], also inserting tokens of `dict` (keywords of the format, extreme
    /// values), as libFuzzer does with a dictionary.
    pub fn mutate_with(&mut self, seed: &[u8], dict: &[&[u8]]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..(1 + self.next() % 4) {
            let i = self.below(v.len() + 1);
            match self.next() % 8 {
                0 if i < v.len() => v[i] ^= 1 << (self.next() % 8),
                1 if i < v.len() => {
                    v.remove(i);
                }
                2 if i < v.len() => v[i] = *self.pick(INTERESTING),
                3 if i < v.len() => {
                    // Drop a run.
                    let end = (i + 1 + self.below(16)).min(v.len());
                    v.drain(i..end);
                }
                4 if i < v.len() => {
                    // Repeat a run somewhere else.
                    let end = (i + 1 + self.below(32)).min(v.len());
                    let run = v[i..end].to_vec();
                    let at = self.below(v.len() + 1);
                    v.splice(at..at, run);
                }
                5 | 6 if !dict.is_empty() => {
                    let token = *self.pick(dict);
                    v.splice(i..i, token.iter().copied());
                }
                _ => v.insert(i, self.next() as u8),
            }
        }
        v
    }
}

/// `n` rounds, times `ZMESH_FUZZ_SCALE` when set: CI runs the default (a few seconds per
/// test); `ZMESH_FUZZ_SCALE=100 cargo test --release --test parsers_never_panic` digs deeper.
pub fn rounds(n: usize) -> usize {
    let scale = std::env::var("ZMESH_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1);
    n.saturating_mul(scale.max(1))
}

/// Run `f` on one input; when it panics, fail naming the input so that it can be kept as a
/// regression case.
pub fn check(what: &str, input: &[u8], f: impl FnOnce()) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(f)) {
        eprintln!("{what} panicked on input: b\"{}\"", input.escape_ascii());
        resume_unwind(panic);
    }
}

/// `der` as PEM with `label` ("CERTIFICATE", "CERTIFICATE REQUEST"): mutating the DER and
/// wrapping it again reaches the ASN.1 parser behind the PEM armour.
pub fn pem(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
