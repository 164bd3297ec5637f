//! Task dispatch over NATS JetStream: tasks in on `council.tasks.<role>` (stream
//! `COUNCIL_TASKS`), one terminal event out per task on `orchestration.deliberation.completed`
//! or `.failed` (stream `ORCHESTRATOR_EVENTS`), dead letters on `council.dlq.tasks` (stream
//! `COUNCIL_DLQ`). Every replica pulls from one durable pull consumer.
//!
//! Effectively once: JetStream delivers at least once, so the handler guards every step with
//! the task's deliberation record, which outlives any duplicate window. A task whose record
//! says its event was published is acked and nothing else; a completed record whose event is
//! not marked published is published again (same `Nats-Msg-Id`, so the stream drops the copy
//! within its window; past the window the events stream is searched first); only a task with
//! no live or completed record runs. The message is acked last, with a confirmed ack.

pub mod event;
pub mod setup;
pub mod task;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::Acker;
use async_nats::jetstream::{AckKind, Context};
use bytes::Bytes;
use council_proto::fleet::orchestrator::v1 as pb;
use council_proto::fleet::orchestrator::v1::DeliberationStatus;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;

use crate::nats::error_chain;
use crate::service::runs::{Runner, Started};
use crate::service::status::ServiceError;
use crate::store::{effective, is_finished, now_ms};
use event::{DeadLetter, EventContext};
use task::{Task, TaskError};

/// Streams, subjects and worker settings (defaults as documented in docs/DISPATCH.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchConfig {
    pub tasks_stream: String,
    /// Tasks arrive on `<tasks_prefix>.<role>`; the stream captures `<tasks_prefix>.>`.
    pub tasks_prefix: String,
    /// The durable pull consumer all replicas share.
    pub consumer: String,
    pub events_stream: String,
    /// What the events stream captures (`orchestration.>`).
    pub events_subjects: String,
    pub completed_subject: String,
    pub failed_subject: String,
    /// Progress events go here when set.
    pub progress_subject: Option<String>,
    pub dlq_stream: String,
    pub dlq_subject: String,
    /// Deliveries of one message at most (the last failure dead-letters it).
    pub max_deliver: i64,
    /// How long a delivery may go without an ack or in-progress ack before redelivery.
    pub ack_wait: Duration,
    /// Cluster-wide cap on deliveries not yet acked.
    pub max_ack_pending: i64,
    /// Tasks this replica works on at once (it stops pulling when full).
    pub in_flight: usize,
    pub max_task_bytes: usize,
    /// First retry delay after a transient failure; doubles per delivery up to `max_nak_delay`.
    pub nak_delay: Duration,
    pub max_nak_delay: Duration,
    /// The streams' duplicate window (`Nats-Msg-Id`).
    pub duplicate_window: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            tasks_stream: "COUNCIL_TASKS".into(),
            tasks_prefix: "council.tasks".into(),
            consumer: "council-workers".into(),
            events_stream: "ORCHESTRATOR_EVENTS".into(),
            events_subjects: "orchestration.>".into(),
            completed_subject: "orchestration.deliberation.completed".into(),
            failed_subject: "orchestration.deliberation.failed".into(),
            progress_subject: None,
            dlq_stream: "COUNCIL_DLQ".into(),
            dlq_subject: "council.dlq.tasks".into(),
            max_deliver: 5,
            ack_wait: Duration::from_secs(60),
            max_ack_pending: 256,
            in_flight: 4,
            max_task_bytes: 256 * 1024,
            nak_delay: Duration::from_secs(2),
            max_nak_delay: Duration::from_secs(120),
            duplicate_window: Duration::from_secs(120),
        }
    }
}

impl DispatchConfig {
    /// How often a running task tells JetStream it is still being worked on.
    pub fn progress_every(&self) -> Duration {
        (self.ack_wait / 3).max(Duration::from_millis(200))
    }

    /// The redelivery delay after the `delivered`-th delivery failed transiently.
    pub fn retry_delay(&self, delivered: u64) -> Duration {
        let doublings = delivered.saturating_sub(1).min(20) as u32;
        self.nak_delay
            .saturating_mul(1u32 << doublings)
            .min(self.max_nak_delay)
    }

    fn captured(&self, subject: &str) -> bool {
        setup::covers(&self.events_subjects, subject)
    }
}

/// The streams and consumer, checked at start-up (before the service says it listens).
#[derive(Debug)]
pub struct Prepared {
    client: async_nats::Client,
    js: Context,
    consumer: PullConsumer,
    config: DispatchConfig,
}

impl Prepared {
    pub async fn new(
        client: async_nats::Client,
        config: DispatchConfig,
    ) -> Result<Self, setup::SetupError> {
        let js = async_nats::jetstream::new(client.clone());
        let consumer = setup::ensure(&js, &config).await?;
        tracing::info!(
            stream = %config.tasks_stream,
            consumer = %config.consumer,
            in_flight = config.in_flight,
            "task dispatch ready"
        );
        Ok(Self {
            client,
            js,
            consumer,
            config,
        })
    }
}

/// What to tell JetStream about a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    Ack,
    /// Redeliver after the delay (none: at once, e.g. to another replica at shutdown).
    Nak(Option<Duration>),
    /// Dead-lettered: never redeliver.
    Term,
}

/// Deliveries of one task held by this process: the first one runs it, later ones (a
/// redelivery while it runs) are settled with it.
type Held = Arc<Mutex<HashMap<String, Vec<Arc<Acker>>>>>;

/// The worker: pulls tasks while it has room, runs each through the [`Runner`] and publishes
/// its one terminal event.
pub struct Dispatcher {
    client: async_nats::Client,
    js: Context,
    consumer: PullConsumer,
    config: DispatchConfig,
    runner: Arc<Runner>,
    held: Held,
    instance: String,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("config", &self.config)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl Dispatcher {
    pub fn new(prepared: Prepared, runner: Arc<Runner>) -> Arc<Self> {
        Arc::new(Self {
            client: prepared.client,
            js: prepared.js,
            consumer: prepared.consumer,
            config: prepared.config,
            instance: runner.instance().to_owned(),
            runner,
            held: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Whether NATS is reachable (for readiness).
    pub fn health(&self) -> Result<(), String> {
        crate::nats::health(&self.client)
    }

    /// The connection, to drain at the very end.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Pulls until `stop` turns true, then lets the tasks in hand finish (the runner's drain
    /// decides how long) and returns once every delivery is settled.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(self.config.in_flight));
        let mut handlers = JoinSet::new();
        let mut failures = 0u32;
        'pull: loop {
            while handlers.try_join_next().is_some() {}
            // Wait for room before asking for anything: what we pull, we work on at once.
            let first = tokio::select! {
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = stopped(&mut stop) => break,
            };
            let mut permits = vec![first];
            while let Ok(p) = slots.clone().try_acquire_owned() {
                permits.push(p);
            }
            let batch = self
                .consumer
                .batch()
                .max_messages(permits.len())
                .expires(Duration::from_secs(5))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => {
                    failures = 0;
                    b
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        tracing::warn!(error = %error_chain(&e), "cannot pull tasks; retrying");
                    }
                    drop(permits);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = stopped(&mut stop) => break,
                    }
                }
            };
            loop {
                let next = tokio::select! {
                    m = batch.next() => m,
                    () = stopped(&mut stop) => {
                        // Stop asking; whatever this request still brings is handed back.
                        self.hand_back(batch).await;
                        break 'pull;
                    }
                };
                match next {
                    None => break,
                    Some(Ok(message)) => {
                        let Some(permit) = permits.pop() else {
                            // More than asked for: hand it back at once.
                            let _ = message.ack_with(AckKind::Nak(None)).await;
                            continue;
                        };
                        let me = self.clone();
                        handlers.spawn(async move {
                            me.handle(message).await;
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "pull request ended");
                        break;
                    }
                }
            }
        }
        tracing::info!(
            in_hand = handlers.len(),
            "stopped pulling tasks; settling the ones in hand"
        );
        while handlers.join_next().await.is_some() {}
    }

    /// Naks (no delay) what an abandoned pull request still delivers, so another replica takes
    /// it now instead of after `ack_wait`.
    async fn hand_back(&self, mut batch: async_nats::jetstream::consumer::pull::Batch) {
        let until = tokio::time::Instant::now() + Duration::from_secs(6);
        while let Ok(Some(m)) = tokio::time::timeout_at(until, batch.next()).await {
            match m {
                Ok(m) => {
                    let _ = m.ack_with(AckKind::Nak(None)).await;
                    self.runner.metrics().dispatched("handed_over");
                }
                Err(_) => break,
            }
        }
    }

    async fn handle(self: Arc<Self>, message: async_nats::jetstream::Message) {
        let (delivered, sequence) = message
            .info()
            .map(|i| (i.delivered.max(1) as u64, i.stream_sequence))
            .unwrap_or((1, 0));
        let subject = message.subject.to_string();
        let (message, acker) = message.split();
        let payload = message.payload;
        let c = &self.config;
        let task = match task::parse(&payload, &subject, &c.tasks_prefix, c.max_task_bytes, |s| {
            c.captured(s)
        }) {
            Ok(t) => t,
            Err(e) => {
                let bad = Delivery {
                    subject: &subject,
                    sequence,
                    payload: &payload,
                    delivered,
                };
                let d = self.reject(&e, bad).await;
                self.settle(vec![Arc::new(acker)], d).await;
                return;
            }
        };
        let id = task.id().to_owned();
        {
            let Ok(mut held) = self.held.lock() else {
                return;
            };
            if let Some(ackers) = held.get_mut(&id) {
                // A redelivery of a task this process is running: settled with the first.
                tracing::info!(task_id = %id, delivered, "redelivered while running here");
                ackers.push(Arc::new(acker));
                return;
            }
            held.insert(id.clone(), vec![Arc::new(acker)]);
        }
        // In-progress acks for every delivery held, for as long as the task is in hand.
        let keepalive = {
            let held = self.held.clone();
            let id = id.clone();
            let every = c.progress_every();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let ackers: Vec<Arc<Acker>> = held
                        .lock()
                        .ok()
                        .and_then(|h| h.get(&id).cloned())
                        .unwrap_or_default();
                    for a in &ackers {
                        let _ = a.ack_with(AckKind::Progress).await;
                    }
                }
            })
        };
        let bad = Delivery {
            subject: &subject,
            sequence,
            payload: &payload,
            delivered,
        };
        let d = self.process(&task, bad).await;
        keepalive.abort();
        let ackers = self
            .held
            .lock()
            .ok()
            .and_then(|mut h| h.remove(&id))
            .unwrap_or_default();
        self.settle(ackers, d).await;
    }

    /// Runs (or recognises) one valid task and publishes its terminal event.
    async fn process(&self, task: &Task, msg: Delivery<'_>) -> Disposition {
        let id = task.id();
        let ctx = EventContext {
            task_id: id.to_owned(),
            story_id: task.story_id().unwrap_or_default().to_owned(),
            role: task.role.clone(),
            correlation: task.message.correlation.clone(),
            delivery: msg.delivered,
        };
        let mut waited = false;
        loop {
            // The permanent guard: what the record says about this task.
            if let Some(d) = self.guard(task, &ctx, &msg).await {
                return d;
            }
            match self.deliberate(task, &ctx, &msg).await {
                Some(d) => return d,
                None => {
                    // Another replica's record is live, or no slot is free: hold the delivery
                    // (in-progress acks keep it ours, without spending deliveries) until that
                    // record finishes or its heartbeat stops, or a slot frees up.
                    if !waited {
                        self.runner.metrics().dispatched("waited");
                        waited = true;
                    }
                    if self.runner.is_draining() {
                        return Disposition::Nak(None);
                    }
                    tokio::time::sleep(self.config.progress_every().min(Duration::from_secs(2)))
                        .await;
                }
            }
        }
    }

    /// What the task's record says to do, if it says anything: ack a duplicate, publish the
    /// event of a completed run, dead-letter a permanent failure.
    async fn guard(
        &self,
        task: &Task,
        ctx: &EventContext,
        msg: &Delivery<'_>,
    ) -> Option<Disposition> {
        let id = task.id();
        let metrics = self.runner.metrics().clone();
        match self.runner.store().record(id).await {
            Err(e) => {
                tracing::warn!(task_id = %id, error = %e, "cannot read the record; retrying later");
                metrics.dispatched("retried");
                return Some(Disposition::Nak(Some(
                    self.config.retry_delay(msg.delivered),
                )));
            }
            Ok(Some(record)) if record.published_at_ms > 0 => {
                tracing::info!(task_id = %id, delivered = msg.delivered, "duplicate delivery: its event is out already");
                metrics.dispatched("duplicate");
                return Some(Disposition::Ack);
            }
            Ok(Some(record)) => {
                let record = effective(record, now_ms());
                if record.status == DeliberationStatus::Completed as i32
                    && let Some(response) = &record.response
                {
                    // It ran; its event may or may not be out (the process died in between).
                    tracing::info!(task_id = %id, "completed before: publishing its event, not running it again");
                    metrics.dispatched("duplicate");
                    return Some(
                        self.finish(
                            Target::of(task),
                            ctx.completed(response),
                            Disposition::Ack,
                            record.updated_at_ms,
                        )
                        .await,
                    );
                }
                if is_finished(&record) && !record.retryable {
                    let reason = record.error_message.clone();
                    return Some(
                        self.dead_end(task, ctx, msg, "failed", reason, record.updated_at_ms)
                            .await,
                    );
                }
            }
            Ok(None) => {}
        }

        None
    }

    /// Runs the task; `None` when it cannot start yet without being at fault (another replica
    /// holds a live record of it, or every deliberation slot is taken): the caller waits.
    async fn deliberate(
        &self,
        task: &Task,
        ctx: &EventContext,
        msg: &Delivery<'_>,
    ) -> Option<Disposition> {
        let id = task.id();
        let metrics = self.runner.metrics().clone();
        let updates = self.config.progress_subject.clone().map(|subject| {
            let (tx, mut rx) =
                mpsc::unbounded_channel::<Result<pb::DeliberationUpdate, tonic::Status>>();
            let js = self.js.clone();
            let ctx = ctx.clone();
            tokio::spawn(async move {
                while let Some(Ok(u)) = rx.recv().await {
                    if u.response.is_some() {
                        continue;
                    }
                    let body = serde_json::to_vec(&ctx.progress(&u)).unwrap_or_default();
                    // Progress is best effort: not awaited, not retried.
                    let _ = js.publish(subject.clone(), body.into()).await;
                }
            });
            tx
        });
        let result = match self.runner.start(task.request(), None, updates).await {
            Ok(Started::Done(response)) => Ok(*response),
            Ok(Started::Running(handle)) => handle.result().await,
            Err(e) => Err(e),
        };
        let d = match result {
            Ok(response) => {
                metrics.dispatched("completed");
                self.finish(
                    Target::of(task),
                    ctx.completed(&response),
                    Disposition::Ack,
                    now_ms(),
                )
                .await
            }
            Err(ServiceError::ShuttingDown) => {
                tracing::info!(task_id = %id, "shutting down: handing the task to another replica");
                metrics.dispatched("handed_over");
                Disposition::Nak(None)
            }
            Err(e @ ServiceError::AlreadyRunning(_)) => {
                tracing::info!(task_id = %id, error = %e, "running elsewhere; waiting for that run");
                return None;
            }
            Err(e @ ServiceError::Overloaded { .. }) => {
                // gRPC callers hold every slot: wait for one rather than spend a delivery.
                tracing::info!(task_id = %id, error = %e, "no free deliberation slot; waiting");
                return None;
            }
            Err(e) if e.is_retryable() && (msg.delivered as i64) < self.config.max_deliver => {
                let delay = self.config.retry_delay(msg.delivered);
                tracing::warn!(task_id = %id, delivered = msg.delivered, error = %e, delay_ms = delay.as_millis() as u64, "transient failure; retrying later");
                metrics.dispatched("retried");
                Disposition::Nak(Some(delay))
            }
            Err(e) => {
                let class = match &e {
                    ServiceError::UnknownRole(_) => "unknown_council",
                    ServiceError::InvalidArgument { .. } => "invalid",
                    _ if e.is_retryable() => "retries_exhausted",
                    _ => "failed",
                };
                let reason = if class == "retries_exhausted" {
                    format!("{e} (after {} deliveries)", msg.delivered)
                } else {
                    e.to_string()
                };
                self.dead_end(task, ctx, msg, class, reason, now_ms()).await
            }
        };
        Some(d)
    }

    /// A valid task that will not complete: its dead letter, its failed event, then `Term`.
    async fn dead_end(
        &self,
        task: &Task,
        ctx: &EventContext,
        msg: &Delivery<'_>,
        class: &str,
        reason: String,
        since_ms: i64,
    ) -> Disposition {
        tracing::warn!(task_id = %task.id(), class, %reason, "dead-lettering the task");
        let letter = DeadLetter::new(
            class,
            reason.clone(),
            Some(task.id().to_owned()),
            msg.subject,
            msg.sequence,
            msg.payload,
            msg.delivered,
            &self.instance,
        );
        if !self.dead_letter(&letter, msg).await {
            return Disposition::Nak(Some(self.config.retry_delay(msg.delivered)));
        }
        let event = ctx.failed(class, reason, msg.delivered);
        self.finish(Target::of(task), event, Disposition::Term, since_ms)
            .await
    }

    /// Publishes the terminal event of `task` unless it is out already, marks the record,
    /// and returns `then` (or a retry when NATS would not take it).
    async fn finish(
        &self,
        task: Target<'_>,
        event: event::TaskEvent,
        then: Disposition,
        since_ms: i64,
    ) -> Disposition {
        let id = task.id;
        let subject = task.result_subject.map(str::to_owned).unwrap_or_else(|| {
            if event.event_type == "deliberation.completed" {
                self.config.completed_subject.clone()
            } else {
                self.config.failed_subject.clone()
            }
        });
        // Past the duplicate window the stream would not drop a second copy: look first.
        let window_passed = now_ms().saturating_sub(since_ms)
            > (self.config.duplicate_window.as_millis() as i64) / 2;
        let existing = if window_passed {
            match self.find_event(id, since_ms).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(task_id = %id, error = %e, "cannot search the events stream; retrying later");
                    return Disposition::Nak(Some(self.config.retry_delay(event.delivery)));
                }
            }
        } else {
            None
        };
        let sequence = match existing {
            Some(seq) => {
                tracing::info!(task_id = %id, seq, "its event is in the stream already");
                seq
            }
            None => {
                let body = Bytes::from(serde_json::to_vec(&event).unwrap_or_default());
                match self.publish(&subject, id, body).await {
                    Ok(ack) => {
                        if ack.duplicate {
                            tracing::info!(task_id = %id, "the stream had the event already (duplicate window)");
                        }
                        ack.sequence
                    }
                    Err(e) => {
                        tracing::warn!(task_id = %id, error = %e, "could not publish the event; retrying later");
                        return Disposition::Nak(Some(self.config.retry_delay(event.delivery)));
                    }
                }
            }
        };
        self.mark_published(id, task.role, sequence).await;
        then
    }

    /// Records that the task's event is out, so later deliveries are acked without work.
    async fn mark_published(&self, id: &str, role: &str, sequence: u64) {
        let store = self.runner.store();
        for attempt in 0..20u32 {
            let now = now_ms();
            let written = match store.record(id).await {
                Ok(Some(mut r)) => {
                    r.published_at_ms = now;
                    r.event_sequence = sequence;
                    r.updated_at_ms = now;
                    store.update_record(r).await
                }
                Ok(None) => {
                    // Dead-lettered before any run: keep a finished record as the guard.
                    store
                        .update_record(council_proto::council::store::v1::DeliberationRecord {
                            task_id: id.to_owned(),
                            role: role.to_owned(),
                            status: DeliberationStatus::Failed as i32,
                            created_at_ms: now,
                            updated_at_ms: now,
                            deadline_at_ms: now,
                            error_message: "dead-lettered".into(),
                            instance_id: self.instance.clone(),
                            published_at_ms: now,
                            event_sequence: sequence,
                            ..Default::default()
                        })
                        .await
                }
                Err(e) => Err(e),
            };
            match written {
                Ok(()) => return,
                Err(e) => {
                    if attempt == 0 {
                        tracing::warn!(task_id = %id, error = %e, "cannot mark the event published yet; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt + 1))).await;
                }
            }
        }
        tracing::error!(task_id = %id, "gave up marking the event published; a redelivery relies on the stream's duplicate check");
    }

    /// Publishes to JetStream with `Nats-Msg-Id` and waits for the stream's ack, retrying
    /// through a reconnect for up to `ack_wait`.
    async fn publish(
        &self,
        subject: &str,
        msg_id: &str,
        body: Bytes,
    ) -> Result<async_nats::jetstream::publish::PublishAck, String> {
        let give_up =
            tokio::time::Instant::now() + self.config.ack_wait.max(Duration::from_secs(10));
        let mut wait = Duration::from_millis(200);
        loop {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", msg_id);
            let sent = async {
                self.js
                    .publish_with_headers(subject.to_owned(), headers, body.clone())
                    .await?
                    .await
            }
            .await;
            match sent {
                Ok(ack) => return Ok(ack),
                Err(e) => {
                    let e = error_chain(&e);
                    if tokio::time::Instant::now() + wait > give_up {
                        return Err(format!("{subject}: {e}"));
                    }
                    tracing::debug!(%subject, error = %e, "publish failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// The stream sequence of the task's terminal event, if one was published since `since_ms`
    /// (less a minute of clock skew); reads the events stream from there.
    async fn find_event(&self, task_id: &str, since_ms: i64) -> Result<Option<u64>, String> {
        use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
        let mut stream = self
            .js
            .get_stream(&self.config.events_stream)
            .await
            .map_err(|e| error_chain(&e))?;
        let last = stream
            .info()
            .await
            .map_err(|e| error_chain(&e))?
            .state
            .last_sequence;
        let start = time::OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(since_ms.saturating_sub(60_000)) * 1_000_000,
        )
        .map_err(|e| e.to_string())?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartTime { start_time: start },
                ..Default::default()
            })
            .await
            .map_err(|e| error_chain(&e))?;
        let mut messages = consumer.messages().await.map_err(|e| error_chain(&e))?;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
            let m = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(error_chain(&e)),
                // Nothing more within the window: the stream holds nothing newer.
                Ok(None) | Err(_) => return Ok(None),
            };
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
            let id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_owned());
            if id.as_deref() == Some(task_id) {
                return Ok(Some(seq));
            }
            if seq >= last {
                return Ok(None);
            }
        }
    }

    /// A message that is not a valid task: its dead letter and, when its task id can be read
    /// and the task has no terminal event yet, a failed event; then `Term`.
    async fn reject(&self, e: &TaskError, msg: Delivery<'_>) -> Disposition {
        let salvaged = task::salvage(msg.payload);
        let task_id = salvaged.as_ref().map(|s| s.task_id.clone());
        tracing::warn!(subject = msg.subject, seq = msg.sequence, task_id = task_id.as_deref().unwrap_or("-"), error = %e, "dead-lettering a bad message");
        let letter = DeadLetter::new(
            e.class(),
            e.to_string(),
            task_id,
            msg.subject,
            msg.sequence,
            msg.payload,
            msg.delivered,
            &self.instance,
        );
        if !self.dead_letter(&letter, &msg).await {
            return Disposition::Nak(Some(self.config.retry_delay(msg.delivered)));
        }
        let Some(s) = salvaged else {
            return Disposition::Term;
        };
        match self.runner.store().record(&s.task_id).await {
            // The id's event is out already (this message reuses a finished task's id).
            Ok(Some(r)) if r.published_at_ms > 0 => return Disposition::Term,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(task_id = %s.task_id, error = %e, "cannot read the record; retrying later");
                return Disposition::Nak(Some(self.config.retry_delay(msg.delivered)));
            }
        }
        let ctx = EventContext {
            task_id: s.task_id.clone(),
            story_id: s.story_id.clone(),
            role: s.role.clone(),
            correlation: s.correlation.clone(),
            delivery: msg.delivered,
        };
        let event = ctx.failed(e.class(), e.to_string(), msg.delivered);
        let target = Target {
            id: &s.task_id,
            role: &s.role,
            result_subject: None,
        };
        self.finish(target, event, Disposition::Term, now_ms())
            .await
    }

    /// Publishes a dead letter and waits for the DLQ stream's ack.
    async fn dead_letter(&self, letter: &DeadLetter, msg: &Delivery<'_>) -> bool {
        let body = Bytes::from(serde_json::to_vec(letter).unwrap_or_default());
        let id = format!("dlq-{}-{}", self.config.tasks_stream, msg.sequence);
        match self.publish(&self.config.dlq_subject, &id, body).await {
            Ok(_) => {
                self.runner.metrics().dispatched("dead_lettered");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "could not dead-letter; the message will come again");
                false
            }
        }
    }

    /// Tells JetStream, for every delivery held, with a confirmed ack where it matters.
    async fn settle(&self, ackers: Vec<Arc<Acker>>, d: Disposition) {
        for acker in ackers {
            let kind = match d {
                Disposition::Ack => AckKind::Ack,
                Disposition::Nak(delay) => AckKind::Nak(delay),
                Disposition::Term => AckKind::Term,
            };
            if matches!(d, Disposition::Nak(_)) {
                // A lost nak only delays the redelivery to ack_wait.
                let _ = acker.ack_with(kind).await;
                continue;
            }
            let mut confirmed = false;
            for attempt in 0..3u64 {
                match acker.double_ack_with(kind).await {
                    Ok(()) => {
                        confirmed = true;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "ack not confirmed; retrying");
                        tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
                    }
                }
            }
            if !confirmed {
                tracing::warn!(
                    "ack not confirmed; the redelivery will be recognised by its record"
                );
            }
        }
    }
}

/// Whose terminal event is published, and where.
#[derive(Debug, Clone, Copy)]
struct Target<'a> {
    id: &'a str,
    role: &'a str,
    result_subject: Option<&'a str>,
}

impl<'a> Target<'a> {
    fn of(task: &'a Task) -> Self {
        Self {
            id: task.id(),
            role: &task.role,
            result_subject: task.message.result_subject.as_deref(),
        }
    }
}

/// The raw delivery: what dead letters and retry delays need.
#[derive(Debug, Clone, Copy)]
struct Delivery<'a> {
    subject: &'a str,
    sequence: u64,
    payload: &'a [u8],
    delivered: u64,
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
