//! Following a log that other replicas append to (PostgreSQL).
//!
//! Each replica applies every record of the log to its Verify cache and to its live audit
//! subscribers exactly once and in sequence order, whichever replica wrote it. Records
//! arrive two ways: this replica's own writer hands over what it committed (so Verify here
//! reflects a change before its caller hears back), and the tailer reads what the others
//! committed. Both go through [`Follower::deliver`], which keeps one applied position and
//! takes a batch only if it continues from it.
//!
//! The tailer reads `sequence > applied` in one snapshot. That never skips a record that
//! commits late, because writers hold the log's lock through commit: a snapshot that sees
//! record N sees every record before it (see [`super::postgres`]). LISTEN/NOTIFY wakes the
//! tailer as soon as another replica commits; it also polls, so a lost notification costs
//! at most one poll interval.
//!
//! Staleness. A tail read that returns the end of the log confirms that every record
//! committed before it began has been applied. A replica that has confirmed nothing within
//! `max_staleness` is stale: it reports NOT_SERVING and refuses Verify (UNAVAILABLE), so
//! that sidecars ask a healthy replica rather than trust a cache that may miss a
//! revocation. It becomes fresh again by itself at its next successful read.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, watch};
use tokio::time::Instant;

use super::backend::Backend;
use super::{CommitListener, StoreError};
use crate::domain::KeyState;
use crate::log::chain::LogRecord;

/// Records read per tail query.
const TAIL_PAGE: u32 = 4096;

/// The replica's applied position and where applied records go.
pub(super) struct Follower {
    position: Mutex<u64>,
    applied: watch::Sender<u64>,
    /// When the last read that reached the end of the log began.
    confirmed: watch::Sender<Option<Instant>>,
    fresh: watch::Sender<bool>,
    wake: Notify,
    listener: Arc<dyn CommitListener>,
    committed: broadcast::Sender<Arc<LogRecord>>,
    pub replica_id: String,
    pub max_staleness: Duration,
}

impl Follower {
    pub fn new(
        start: u64,
        listener: Arc<dyn CommitListener>,
        committed: broadcast::Sender<Arc<LogRecord>>,
        replica_id: String,
        max_staleness: Duration,
    ) -> Follower {
        Follower {
            position: Mutex::new(start),
            applied: watch::channel(start).0,
            confirmed: watch::channel(None).0,
            fresh: watch::channel(false).0,
            wake: Notify::new(),
            listener,
            committed,
            replica_id,
            max_staleness,
        }
    }

    /// Applies `records` (those not applied yet) and `states` (the touched keys' states at
    /// least as new as the records; the cache ignores older versions). False, applying
    /// nothing, when the first new record does not follow the applied position: the tailer
    /// has to fill the gap first.
    pub fn deliver(&self, records: &[LogRecord], states: &[KeyState]) -> bool {
        let mut position = self.position.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = records.iter().position(|r| r.sequence > *position);
        let Some(first) = fresh else {
            // Already applied (the tailer got there first).
            return true;
        };
        if records[first].sequence != *position + 1 {
            return false;
        }
        if !states.is_empty() {
            self.listener.committed(states);
        }
        for record in &records[first..] {
            // No subscriber is not an error.
            let _ = self.committed.send(Arc::new(record.clone()));
        }
        *position = records.last().map_or(*position, |r| r.sequence);
        self.applied.send_replace(*position);
        true
    }

    pub fn position(&self) -> u64 {
        *self.position.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the tailer to read now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits until records up to `sequence` are applied, at most `within`. False on timeout.
    pub async fn applied(&self, sequence: u64, within: Duration) -> bool {
        let mut applied = self.applied.subscribe();
        tokio::time::timeout(within, applied.wait_for(|&at| at >= sequence))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Whether this replica has confirmed it is caught up within `max_staleness`.
    pub fn fresh(&self) -> watch::Receiver<bool> {
        self.fresh.subscribe()
    }

    /// Reads everything after the applied position, one page at a time, until the end.
    async fn catch_up(&self, backend: &dyn Backend) -> Result<(), StoreError> {
        let shared = backend.shared().expect("followers follow shared logs");
        loop {
            let began = Instant::now();
            let after = self.position();
            // Bounded: a read stuck on a connection the network lost must not keep this
            // replica stale after the database is reachable again.
            let (records, states) =
                tokio::time::timeout(self.max_staleness, shared.tail(after, TAIL_PAGE))
                    .await
                    .map_err(|_| {
                        StoreError::Unavailable(super::Cause::msg(
                            "reading the shared log took longer than max-staleness",
                        ))
                    })??;
            let full = records.len() == TAIL_PAGE as usize;
            if !self.deliver(&records, &states) {
                // Cannot happen: the read started at the applied position.
                return Err(StoreError::Invariant(format!(
                    "a tail read after {after} began at {}",
                    records.first().map_or(0, |r| r.sequence)
                )));
            }
            if !full {
                self.confirmed.send_replace(Some(began));
                return Ok(());
            }
        }
    }
}

/// Tails the log until `stop`, publishing the applied position as a heartbeat; then leaves
/// the live set.
pub(super) async fn run(
    follower: Arc<Follower>,
    backend: Arc<dyn Backend>,
    mut stop: watch::Receiver<bool>,
) {
    let poll = (follower.max_staleness / 4).max(Duration::from_millis(10));
    let wakeups = tokio::spawn(listen(follower.clone(), backend.clone(), stop.clone()));
    let watchdog = tokio::spawn(watch_staleness(follower.clone(), stop.clone()));
    let mut failing = false;
    let mut published: Option<(u64, Instant)> = None;
    loop {
        match follower.catch_up(backend.as_ref()).await {
            Ok(()) => {
                if failing {
                    tracing::info!(
                        applied = follower.position(),
                        "reading the shared log again"
                    );
                    failing = false;
                }
                let position = follower.position();
                let due =
                    published.is_none_or(|(at, when)| at != position || when.elapsed() >= poll);
                if due {
                    let shared = backend.shared().expect("followers follow shared logs");
                    match shared.heartbeat(&follower.replica_id, position).await {
                        Ok(()) => published = Some((position, Instant::now())),
                        Err(e) => tracing::warn!(error = %e, "cannot publish the heartbeat"),
                    }
                }
            }
            Err(e) => {
                if !failing {
                    tracing::error!(error = %e, applied = follower.position(), "cannot read the shared log; retrying");
                    failing = true;
                }
            }
        }
        tokio::select! {
            () = follower.wake.notified() => {}
            () = tokio::time::sleep(poll) => {}
            _ = stop.changed() => break,
        }
    }
    wakeups.abort();
    watchdog.abort();
    if let Some(shared) = backend.shared()
        && let Err(e) = shared.leave(&follower.replica_id).await
    {
        tracing::warn!(error = %e, "cannot leave the live replica set");
    }
}

/// Forwards the database's notifications to the tailer, reconnecting after failures.
async fn listen(follower: Arc<Follower>, backend: Arc<dyn Backend>, stop: watch::Receiver<bool>) {
    let shared = backend.shared().expect("followers follow shared logs");
    while !*stop.borrow() {
        match shared.listen().await {
            Ok(mut wakeups) => loop {
                match wakeups.next().await {
                    Ok(()) => follower.wake(),
                    Err(e) => {
                        tracing::debug!(error = %e, "notifications lost; reconnecting");
                        break;
                    }
                }
            },
            Err(e) => tracing::debug!(error = %e, "cannot listen for notifications"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Turns `fresh` off when nothing was confirmed within `max_staleness`, on again when a read
/// confirms.
async fn watch_staleness(follower: Arc<Follower>, mut stop: watch::Receiver<bool>) {
    let mut confirmed = follower.confirmed.subscribe();
    loop {
        let last = *confirmed.borrow_and_update();
        let deadline = last.map(|at| at + follower.max_staleness);
        let fresh = deadline.is_some_and(|d| Instant::now() < d);
        follower.fresh.send_if_modified(|was| {
            let changed = *was != fresh;
            if changed && !fresh {
                tracing::error!(
                    max_staleness_ms = follower.max_staleness.as_millis() as u64,
                    "stale: not caught up with the shared log within max-staleness; refusing Verify"
                );
            } else if changed {
                tracing::info!("caught up with the shared log; serving Verify");
            }
            *was = fresh;
            changed
        });
        let expiry = async {
            match deadline {
                Some(d) if fresh => tokio::time::sleep_until(d).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = confirmed.changed() => if changed.is_err() { return },
            () = expiry => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No cache: this test follows the records.
    struct NoCache;

    impl CommitListener for NoCache {
        fn committed(&self, _: &[KeyState]) {}
    }

    fn records(sequences: std::ops::RangeInclusive<u64>) -> Vec<LogRecord> {
        sequences
            .map(|sequence| LogRecord {
                sequence,
                key_id: format!("key_{sequence}"),
                workspace_id: "ws".into(),
                stream_version: 1,
                event_type: "KeyCreated".into(),
                schema_version: 1,
                payload: Vec::new(),
                actor: "a".into(),
                recorded_at_ms: 0,
                hash: [0; 32],
                workspace_hash: [0; 32],
                caller_identity: None,
            })
            .collect()
    }

    #[tokio::test]
    async fn records_are_applied_once_in_order_and_a_gap_is_refused() {
        let (committed, mut live) = broadcast::channel(64);
        let follower = Follower::new(
            2,
            Arc::new(NoCache),
            committed,
            "r".into(),
            Duration::from_secs(1),
        );
        // A batch that starts past the next sequence leaves a gap: refused, nothing applied.
        assert!(!follower.deliver(&records(4..=5), &[]));
        assert_eq!(follower.position(), 2);
        assert!(live.try_recv().is_err());
        // The tailer fills it, overlapping what was applied already.
        assert!(follower.deliver(&records(1..=4), &[]));
        // The writer's batch again: only 5 is new.
        assert!(follower.deliver(&records(4..=5), &[]));
        // Nothing new at all: accepted, nothing sent.
        assert!(follower.deliver(&records(3..=5), &[]));
        let mut sent = Vec::new();
        while let Ok(record) = live.try_recv() {
            sent.push(record.sequence);
        }
        assert_eq!(sent, [3, 4, 5]);
        assert_eq!(follower.position(), 5);
        assert!(follower.applied(5, Duration::ZERO).await);
        assert!(!follower.applied(6, Duration::from_millis(10)).await);
    }
}
