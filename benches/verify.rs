//! Micro-benchmarks of the Verify path: `cargo bench --bench verify`.
//! The ratio targets are checked by `kemon-keys-bench targets --only inproc --check`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use kemon_keys::domain::{ScopeSet, SecretHash, api_key};

#[path = "../src/bin/kemon-keys-bench/fixtures.rs"]
mod fixtures;

fn verify(c: &mut Criterion) {
    let (cache, secrets) = fixtures::loaded_cache(100_000);
    let required = ScopeSet::parse(&["tickets:read"]).expect("valid");
    let mut malformed = secrets[0].clone().into_bytes();
    let last = malformed.len() - 1;
    malformed[last] = if malformed[last] == b'0' { b'1' } else { b'0' };
    let malformed = String::from_utf8(malformed).expect("ascii");

    let mut i = 0usize;
    c.bench_function("sha3_256 of a key string", |b| {
        b.iter(|| {
            i = (i + 1) % secrets.len();
            black_box(SecretHash::of(black_box(&secrets[i])))
        })
    });
    c.bench_function("parse and checksum", |b| {
        b.iter(|| {
            i = (i + 1) % secrets.len();
            black_box(api_key::parse(black_box(&secrets[i])))
        })
    });
    c.bench_function("verify valid key, 100k keys cached", |b| {
        b.iter(|| {
            i = (i + 1) % secrets.len();
            black_box(cache.verify(black_box(&secrets[i]), required, ""))
        })
    });
    c.bench_function("verify malformed key (bad checksum)", |b| {
        b.iter(|| black_box(cache.verify(black_box(&malformed), required, "")))
    });
}

criterion_group!(benches, verify);
criterion_main!(benches);
