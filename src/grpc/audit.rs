//! `kemon.keys.v1.AuditService`: reading, following and checking the event log.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::{Actor, Permission};
use super::error::{ApiError, quote};
use super::keys::key_to_pb;
use super::{timestamp, within_cap};
use crate::audit::replay::Replay;
use crate::clock::Clock;
use crate::domain::{Event, KeyId, Violation, WorkspaceId};
use crate::log::chain::LogRecord;
use crate::log::events;
use crate::proto::v1 as pb;
use crate::proto::v1::audit_service_server::AuditService;
use crate::store::{RecordFilter, Store, StoreError};

/// Records read per database round trip when paging.
const PAGE: u32 = 500;
/// Most entries accepted in `filter.event_types`: room for every type and a few repeats, and
/// a bound on the SQL variables a read binds (one per distinct type).
pub const MAX_EVENT_TYPES_LISTED: usize = 16;
const _: () = assert!(Event::TYPE_NAMES.len() <= MAX_EVENT_TYPES_LISTED);

pub struct AuditApi {
    store: Store,
    clock: Arc<dyn Clock>,
    checkpoint_every: Duration,
    stopping: watch::Receiver<bool>,
}

impl AuditApi {
    /// `stopping` turns true when the server begins to shut down: live subscriptions then
    /// end (UNAVAILABLE, with the position to resume from) so shutdown is not held open.
    pub fn new(
        store: Store,
        clock: Arc<dyn Clock>,
        checkpoint_every: Duration,
        stopping: watch::Receiver<bool>,
    ) -> AuditApi {
        AuditApi {
            store,
            clock,
            checkpoint_every,
            stopping,
        }
    }
}

/// A record as the API shows it, its payload decoded into the current schema version. A
/// payload that no longer decodes (a tampered log) is sent without `payload`, so auditors
/// still see the record.
pub fn log_event(r: &LogRecord) -> pb::LogEvent {
    pb::LogEvent {
        sequence: r.sequence,
        key_id: r.key_id.clone(),
        workspace_id: r.workspace_id.clone(),
        stream_version: r.stream_version,
        event_type: r.event_type.clone(),
        schema_version: r.schema_version,
        payload: events::decode_payload(&r.event_type, r.schema_version, &r.payload).ok(),
        actor: r.actor.clone(),
        recorded_at: Some(timestamp(r.recorded_at_ms)),
        hash: r.hash.to_vec(),
        workspace_hash: r.workspace_hash.to_vec(),
        stored_payload: r.payload.clone(),
        recorded_at_ms: r.recorded_at_ms,
        caller_identity: r.caller_identity.clone().unwrap_or_default(),
    }
}

/// The workspace a filter is about, as sent ("" for the whole log): an assertion must be for
/// it, so an asserted role reads its own workspace only.
fn filter_workspace(filter: &Option<pb::EventFilter>) -> &str {
    filter.as_ref().map_or("", |f| f.workspace_id.as_str())
}

fn parse_filter(filter: Option<&pb::EventFilter>) -> Result<RecordFilter, ApiError> {
    let Some(f) = filter else {
        return Ok(RecordFilter::default());
    };
    let mut violations = Vec::new();
    if !f.workspace_id.is_empty()
        && let Err(r) = WorkspaceId::parse(&f.workspace_id)
    {
        violations.push(Violation::new("filter.workspace_id", r));
    }
    if !f.key_id.is_empty()
        && let Err(r) = KeyId::parse(&f.key_id)
    {
        violations.push(Violation::new("filter.key_id", r));
    }
    // Distinct names only: each is one SQL variable of every read.
    let mut event_types: Vec<String> = Vec::new();
    if within_cap(
        "filter.event_types",
        &f.event_types,
        MAX_EVENT_TYPES_LISTED,
        &mut violations,
    ) {
        for t in &f.event_types {
            if !Event::TYPE_NAMES.contains(&t.as_str()) {
                violations.push(Violation::new(
                    "filter.event_types",
                    format!(
                        "unknown event type {}; known: {}",
                        quote(t),
                        Event::TYPE_NAMES.join(", ")
                    ),
                ));
            } else if !event_types.contains(t) {
                event_types.push(t.clone());
            }
        }
    }
    if !violations.is_empty() {
        return Err(ApiError::Invalid(violations));
    }
    Ok(RecordFilter {
        workspace_id: (!f.workspace_id.is_empty()).then(|| f.workspace_id.clone()),
        key_id: (!f.key_id.is_empty()).then(|| f.key_id.clone()),
        event_types,
        up_to: None,
    })
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Sends `item` to the client; false once the client has gone.
async fn send<T>(tx: &mpsc::Sender<Result<T, Status>>, item: T) -> bool {
    tx.send(Ok(item)).await.is_ok()
}

/// A read that failed while a stream was open, as the status that ends the stream.
fn read_failed(e: StoreError) -> Status {
    Status::from(ApiError::from(e))
}

/// One catch-up subscription: see `SubscribeEvents` in `audit.proto`.
struct Subscription {
    store: Store,
    filter: RecordFilter,
    /// Everything up to here has been sent or skipped.
    position: u64,
    tx: mpsc::Sender<Result<pb::SubscribeEventsResponse, Status>>,
    checkpoint_every: Duration,
    stopping: watch::Receiver<bool>,
}

impl Subscription {
    fn message(m: pb::subscribe_events_response::Message) -> pb::SubscribeEventsResponse {
        pb::SubscribeEventsResponse { message: Some(m) }
    }

    /// Runs until the client goes away or the store fails.
    async fn run(mut self) {
        use pb::subscribe_events_response::Message;
        loop {
            // Live first, so nothing committed while paging can be missed.
            let mut live = self.store.subscribe();
            match self.catch_up().await {
                Ok(true) => {}
                Ok(false) => return,
                Err(status) => {
                    let _ = self.tx.send(Err(status)).await;
                    return;
                }
            }
            if !send(
                &self.tx,
                Self::message(Message::CaughtUp(pb::CaughtUp {
                    sequence: self.position,
                })),
            )
            .await
            {
                return;
            }
            let mut ticker = tokio::time::interval(self.checkpoint_every);
            ticker.tick().await;
            let mut checkpointed = self.position;
            loop {
                tokio::select! {
                    received = live.recv() => match received {
                        Ok(record) => {
                            if record.sequence <= self.position {
                                continue;
                            }
                            self.position = record.sequence;
                            if self.filter.matches(&record)
                                && !send(&self.tx, Self::message(Message::Event(log_event(&record)))).await
                            {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            crate::telemetry::metrics()
                                .audit_fell_behind
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let behind = Message::FellBehind(pb::FellBehind { sequence: self.position });
                            if !send(&self.tx, Self::message(behind)).await {
                                return;
                            }
                            break; // page again from `position`
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = ticker.tick() => {
                        if self.position > checkpointed {
                            checkpointed = self.position;
                            let checkpoint = Message::Checkpoint(pb::Checkpoint { sequence: self.position });
                            if !send(&self.tx, Self::message(checkpoint)).await {
                                return;
                            }
                        }
                    }
                                        () = self.tx.closed() => return,
                    _ = self.stopping.changed() => {
                        let status = Status::from(ApiError::ShuttingDown {
                            resume_after: self.position,
                        });
                        let _ = self.tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        }
    }

    /// Pages from `position` to the end of the log. Ok(false): the client went away.
    async fn catch_up(&mut self) -> Result<bool, Status> {
        use pb::subscribe_events_response::Message;
        loop {
            // The head is read before the page: every record up to it is committed, so an
            // empty page proves there is nothing matching up to it either.
            let (head, _) = self.store.head(None).await.map_err(read_failed)?;
            let page = self
                .store
                .read_records(self.position, PAGE, &self.filter)
                .await
                .map_err(read_failed)?;
            for record in &page {
                if !send(&self.tx, Self::message(Message::Event(log_event(record)))).await {
                    return Ok(false);
                }
                self.position = record.sequence;
            }
            if page.len() < PAGE as usize {
                self.position = self.position.max(head.sequence);
                return Ok(true);
            }
        }
    }
}

/// The calls, each in the service's own error type; the [`AuditService`] impl below only wraps
/// their answers in responses and their errors in statuses.
impl AuditApi {
    async fn read(
        &self,
        request: &Request<pb::ReadEventsRequest>,
    ) -> Result<EventStream<pb::LogEvent>, ApiError> {
        let req = request.get_ref();
        Actor::authorize(request, Permission::Audit, filter_workspace(&req.filter))?;
        let mut filter = parse_filter(req.filter.as_ref())?;
        // The log as it is when the call starts.
        filter.up_to = Some(self.store.head(None).await?.0.sequence);
        // No maximum to coerce `limit` down to (AIP-158's rule for page sizes): this is a
        // stream read PAGE records at a time with backpressure, so a large limit costs the
        // server no more memory than a small one. The cursor is `after_sequence`, a public
        // log position by design, rather than an opaque page token.
        let limit = if req.limit == 0 { u64::MAX } else { req.limit };
        let store = self.store.clone();
        let mut position = req.after_sequence;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut sent = 0u64;
            loop {
                let page = match store.read_records(position, PAGE, &filter).await {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.send(Err(read_failed(e))).await;
                        return;
                    }
                };
                for record in &page {
                    if sent == limit || !send(&tx, log_event(record)).await {
                        return;
                    }
                    sent += 1;
                    position = record.sequence;
                }
                if page.len() < PAGE as usize {
                    return;
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)) as EventStream<pb::LogEvent>)
    }

    async fn subscribe(
        &self,
        request: &Request<pb::SubscribeEventsRequest>,
    ) -> Result<EventStream<pb::SubscribeEventsResponse>, ApiError> {
        let req = request.get_ref();
        Actor::authorize(request, Permission::Audit, filter_workspace(&req.filter))?;
        let filter = parse_filter(req.filter.as_ref())?;
        // A position past the head (a log restored from a backup, a position from another
        // log) would silently skip the events that later take those sequences.
        let (head, _) = self.store.head(None).await?;
        if req.after_sequence > head.sequence {
            return Err(ApiError::SequenceOutOfRange {
                after_sequence: req.after_sequence,
                head_sequence: head.sequence,
            });
        }
        let (tx, rx) = mpsc::channel(256);
        let subscription = Subscription {
            store: self.store.clone(),
            filter,
            position: req.after_sequence,
            tx,
            checkpoint_every: self.checkpoint_every,
            stopping: self.stopping.clone(),
        };
        tokio::spawn(subscription.run());
        Ok(Box::pin(ReceiverStream::new(rx)) as EventStream<pb::SubscribeEventsResponse>)
    }

    async fn head(
        &self,
        request: &Request<pb::GetLogHeadRequest>,
    ) -> Result<pb::LogHead, ApiError> {
        Actor::authorize(request, Permission::Audit, &request.get_ref().workspace_id)?;
        let req = request.get_ref();
        let workspace = if req.workspace_id.is_empty() {
            None
        } else {
            WorkspaceId::parse(&req.workspace_id)
                .map_err(|r| ApiError::invalid("workspace_id", r))?;
            Some(req.workspace_id.as_str())
        };
        let (log, workspace) = self.store.head(workspace).await?;
        Ok(pb::LogHead {
            sequence: log.sequence,
            hash: log.hash.to_vec(),
            workspace_sequence: workspace.map_or(0, |w| w.sequence),
            workspace_hash: workspace.map(|w| w.hash.to_vec()).unwrap_or_default(),
        })
    }

    async fn keys_as_of(
        &self,
        request: &Request<pb::GetKeysAsOfRequest>,
    ) -> Result<pb::GetKeysAsOfResponse, ApiError> {
        Actor::authorize(request, Permission::Audit, &request.get_ref().workspace_id)?;
        let req = request.get_ref();
        let mut violations = Vec::new();
        if let Err(r) = WorkspaceId::parse(&req.workspace_id) {
            violations.push(Violation::new("workspace_id", r));
        }
        if !req.key_id.is_empty()
            && let Err(r) = KeyId::parse(&req.key_id)
        {
            violations.push(Violation::new("key_id", r));
        }
        // `at_sequence` is checked against the head, so the head is read before answering
        // INVALID_ARGUMENT, which then lists every bad field. A failed read answers such a
        // request with its other violations, or with the storage failure if it had none.
        let head = match self.store.head(None).await {
            Ok((head, _)) => head,
            Err(_) if !violations.is_empty() => return Err(ApiError::Invalid(violations)),
            Err(e) => return Err(e.into()),
        };
        if req.at_sequence > head.sequence {
            violations.push(Violation::new(
                "at_sequence",
                format!("the log ends at {}", head.sequence),
            ));
        }
        if !violations.is_empty() {
            return Err(ApiError::Invalid(violations));
        }
        let at = if req.at_sequence == 0 {
            head.sequence
        } else {
            req.at_sequence
        };
        let filter = RecordFilter {
            workspace_id: Some(req.workspace_id.clone()),
            key_id: (!req.key_id.is_empty()).then(|| req.key_id.clone()),
            event_types: vec![],
            up_to: Some(at),
        };
        let mut replay = Replay::default();
        let mut position = 0;
        loop {
            let page = self.store.read_records(position, PAGE, &filter).await?;
            for record in &page {
                replay.apply(record).map_err(|e| {
                    ApiError::Internal(format!("replay failed at {}: {}", e.sequence, e.reason))
                })?;
                position = record.sequence;
            }
            if page.len() < PAGE as usize {
                break;
            }
        }
        // `expired` as of the answer's moment: now for the head, else the time of the last
        // event replayed.
        let now = if req.at_sequence == 0 {
            self.clock.now_ms()
        } else {
            replay.last_recorded_at_ms
        };
        let mut keys: Vec<_> = replay.keys.values().map(|s| key_to_pb(s, now)).collect();
        keys.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        Ok(pb::GetKeysAsOfResponse {
            at_sequence: at,
            keys,
        })
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    type ReadEventsStream = EventStream<pb::LogEvent>;
    type SubscribeEventsStream = EventStream<pb::SubscribeEventsResponse>;

    async fn read_events(
        &self,
        request: Request<pb::ReadEventsRequest>,
    ) -> Result<Response<Self::ReadEventsStream>, Status> {
        Ok(Response::new(self.read(&request).await?))
    }

    async fn subscribe_events(
        &self,
        request: Request<pb::SubscribeEventsRequest>,
    ) -> Result<Response<Self::SubscribeEventsStream>, Status> {
        Ok(Response::new(self.subscribe(&request).await?))
    }

    async fn get_log_head(
        &self,
        request: Request<pb::GetLogHeadRequest>,
    ) -> Result<Response<pb::LogHead>, Status> {
        Ok(Response::new(self.head(&request).await?))
    }

    async fn get_keys_as_of(
        &self,
        request: Request<pb::GetKeysAsOfRequest>,
    ) -> Result<Response<pb::GetKeysAsOfResponse>, Status> {
        Ok(Response::new(self.keys_as_of(&request).await?))
    }
}
