//! Target 2: Verify in process against the bare SHA3-256 of the same key strings.

use std::hint::black_box;
use std::time::Instant;

use kemon_keys::cache::Verdict;
use kemon_keys::domain::{ScopeSet, SecretHash};

use crate::fixtures::loaded_cache;
use crate::report::Report;

/// Median nanoseconds per call of `f` over `rounds` rounds of `iterations` calls.
fn ns_per_op(rounds: usize, iterations: usize, mut f: impl FnMut(usize)) -> f64 {
    let mut samples: Vec<f64> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for i in 0..iterations {
                f(i);
            }
            start.elapsed().as_nanos() as f64 / iterations as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

pub fn run(keys: usize, iterations: usize, report: &mut Report) {
    let (cache, secrets) = loaded_cache(keys);
    let required = ScopeSet::parse(&["tickets:read"]).expect("valid");
    // A malformed string: a real key with its last checksum digit changed.
    let malformed: Vec<String> = secrets
        .iter()
        .map(|s| {
            let mut bytes = s.clone().into_bytes();
            let last = bytes.len() - 1;
            bytes[last] = if bytes[last] == b'0' { b'1' } else { b'0' };
            String::from_utf8(bytes).expect("ascii")
        })
        .collect();
    let n = secrets.len();
    let rounds = 7;
    // Warm up caches and branch predictors on all three paths.
    for secret in secrets.iter().take(iterations) {
        black_box(cache.verify(secret, required, ""));
        black_box(SecretHash::of(secret));
    }
    let sha3 = ns_per_op(rounds, iterations, |i| {
        black_box(SecretHash::of(black_box(&secrets[i % n])));
    });
    let valid = ns_per_op(rounds, iterations, |i| {
        let verdict = cache.verify(black_box(&secrets[i % n]), required, "");
        assert!(matches!(verdict, Verdict::Valid(_)));
        black_box(verdict);
    });
    let bad = ns_per_op(rounds, iterations, |i| {
        let verdict = cache.verify(black_box(&malformed[i % n]), required, "");
        assert!(matches!(verdict, Verdict::Malformed));
        black_box(verdict);
    });
    report.section(&format!("2. Verify in process, {keys} keys in the cache"));
    report.line("| Operation | ns per call (median of 7 rounds) |");
    report.line("|---|---|");
    report.line(format!("| SHA3-256 of the key string | {sha3:.0} |"));
    report.line(format!(
        "| Verify, valid key (parse, checksum, hash, lookup, expiry, scopes) | {valid:.0} |"
    ));
    report.line(format!(
        "| Verify, malformed key (bad checksum) | {bad:.0} |"
    ));
    report.check("2. Verify valid / SHA3-256", valid / sha3, false, 3.0);
    report.check("2. Verify malformed / SHA3-256", bad / sha3, false, 1.0);
}
