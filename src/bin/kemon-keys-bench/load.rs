//! The load engine: N concurrent callers over M HTTP/2 connections, for a fixed time, each
//! recording every call's latency.

use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tonic::transport::Channel;

/// What one load run measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub calls: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Latency of successful calls, microseconds.
    pub latency_us: Histogram<u64>,
}

impl LoadResult {
    pub fn throughput(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    pub fn p(&self, quantile: f64) -> u64 {
        self.latency_us.value_at_quantile(quantile)
    }

    /// Adds another run of the same load (for alternating rounds).
    pub fn merge(&mut self, other: &LoadResult) {
        self.calls += other.calls;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latency_us
            .add(&other.latency_us)
            .expect("same histogram bounds");
    }

    pub fn summary(&self) -> String {
        format!(
            "{:>9.0}/s  p50 {:>6} µs  p99 {:>6} µs  p99.9 {:>6} µs  ({} calls, {} errors)",
            self.throughput(),
            self.p(0.50),
            self.p(0.99),
            self.p(0.999),
            self.calls,
            self.errors
        )
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Opens `n` separate HTTP/2 connections to `endpoint`.
pub async fn connect(endpoint: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        channels.push(Channel::from_shared(endpoint.to_owned())?.connect().await?);
    }
    Ok(channels)
}

/// Runs `concurrency` callers spread over `channels` for `warmup + duration`; only calls
/// that start after the warm-up are counted. `call(channel, worker, i)` makes one call.
pub async fn run<F, Fut>(
    channels: &[Channel],
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    call: F,
) -> LoadResult
where
    F: Fn(Channel, usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let start = Instant::now() + warmup;
    let end = start + duration;
    let mut workers = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let channel = channels[worker % channels.len()].clone();
        let call = call.clone();
        workers.push(tokio::spawn(async move {
            let mut latency = histogram();
            let (mut calls, mut errors) = (0u64, 0u64);
            let mut i = 0u64;
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let outcome = call(channel.clone(), worker, i).await;
                i += 1;
                if began < start {
                    continue;
                }
                match outcome {
                    Ok(()) => {
                        calls += 1;
                        latency.saturating_record(began.elapsed().as_micros() as u64);
                    }
                    Err(_) => errors += 1,
                }
            }
            (calls, errors, latency)
        }));
    }
    let mut result = LoadResult {
        calls: 0,
        errors: 0,
        elapsed: duration,
        latency_us: histogram(),
    };
    for worker in workers {
        let (calls, errors, latency) = worker.await.expect("load worker");
        result.calls += calls;
        result.errors += errors;
        result.latency_us.add(&latency).expect("same bounds");
    }
    result
}

/// Makes exactly `calls` calls with `concurrency` callers spread over `channels`, with no
/// warm-up: for instruction-count profiles (callgrind), where what matters is how many calls
/// were made, not how long they took.
pub async fn run_count<F, Fut>(
    channels: &[Channel],
    concurrency: usize,
    calls: u64,
    call: F,
) -> LoadResult
where
    F: Fn(Channel, usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let began = Instant::now();
    let concurrency = concurrency.max(1);
    let mut workers = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let channel = channels[worker % channels.len()].clone();
        let call = call.clone();
        // The first `calls % concurrency` callers make one call more.
        let share =
            calls / concurrency as u64 + u64::from((worker as u64) < calls % concurrency as u64);
        workers.push(tokio::spawn(async move {
            let mut latency = histogram();
            let (mut made, mut errors) = (0u64, 0u64);
            for i in 0..share {
                let started = Instant::now();
                match call(channel.clone(), worker, i).await {
                    Ok(()) => {
                        made += 1;
                        latency.saturating_record(started.elapsed().as_micros() as u64);
                    }
                    Err(_) => errors += 1,
                }
            }
            (made, errors, latency)
        }));
    }
    let mut result = LoadResult {
        calls: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency_us: histogram(),
    };
    for worker in workers {
        let (calls, errors, latency) = worker.await.expect("load worker");
        result.calls += calls;
        result.errors += errors;
        result.latency_us.add(&latency).expect("same bounds");
    }
    result.elapsed = began.elapsed();
    result
}
