//! Last used, from memory to the database, and the end of rolled keys in the cache.
//!
//! Verify records each accepted use in the cache entry it answered from (to the minute, see
//! [`crate::cache::Usage`]); nothing is written per call. [`run`] writes the uses not written
//! yet once the clock enters a new minute, in one batch through
//! [`Store::record_usage`](crate::store::Store::record_usage) (a short transaction of its
//! own, beside the writer), and once more when the server stops. A crash therefore loses at
//! most the last minute of uses. Last use is operational data: not an event, not in the audit
//! log or its hash chains, not rebuilt by `kemon-keys rebuild`.
//!
//! The same task removes from the cache the hashes of rolled keys whose grace period has
//! ended ([`VerifyCache::evict_ended`]), checking every [`TICK`]: Verify already refuses them
//! (EXPIRED) from the exact instant by the clock.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::cache::{DirtyUsage, USAGE_MINUTE_MS, VerifyCache};
use crate::store::{KeyUsage, Store};

/// How often the task looks at the clock.
pub const TICK: Duration = Duration::from_millis(250);

/// Evicts ended rolled keys every [`TICK`] and writes last uses every minute (by the cache's
/// clock), until `stopping` turns true; then writes what is left and returns.
pub async fn run(cache: Arc<VerifyCache>, store: Store, mut stopping: watch::Receiver<bool>) {
    let clock = cache.clock().clone();
    let mut written_minute = clock.now_ms().div_euclid(USAGE_MINUTE_MS);
    // Uses of evicted entries, which the next scan of the cache no longer finds.
    let mut evicted: Vec<DirtyUsage> = Vec::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = stopping.changed() => {
                if changed.is_err() || *stopping.borrow_and_update() {
                    break;
                }
            }
        }
        evicted.extend(cache.evict_ended());
        let minute = clock.now_ms().div_euclid(USAGE_MINUTE_MS);
        if minute != written_minute && write(&cache, &store, &mut evicted).await {
            written_minute = minute;
        }
    }
    evicted.extend(cache.evict_ended());
    write(&cache, &store, &mut evicted).await;
}

/// Writes every use not written yet (the cache's and `evicted`) in one batch. False when the
/// storage failed: the uses stay unwritten, for the next attempt.
pub async fn write(cache: &VerifyCache, store: &Store, evicted: &mut Vec<DirtyUsage>) -> bool {
    let mut dirty = cache.dirty_usage();
    let from_cache = dirty.len();
    dirty.append(evicted);
    if dirty.is_empty() {
        return true;
    }
    let rows: Vec<KeyUsage> = dirty
        .iter()
        .map(|d| KeyUsage {
            key_id: d.key_id,
            last_used_at_ms: d.last_used.at_ms,
            origin: d.last_used.origin,
        })
        .collect();
    match store.record_usage(&rows).await {
        Ok(()) => {
            for d in &dirty {
                d.written();
            }
            tracing::debug!(keys = rows.len(), "last uses written");
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, keys = rows.len(), "cannot write last uses; retrying next minute");
            // Entries still in the cache are found again; evicted ones are kept here.
            evicted.extend(dirty.into_iter().skip(from_cache));
            false
        }
    }
}
