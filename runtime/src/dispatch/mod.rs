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
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::Acker;
use async_nats::jetstream::{AckKind, Context};
use bytes::Bytes;
use council_proto::fleet::orchestrator::v1 as pb;
use council_proto::fleet::orchestrator::v1::DeliberationStatus;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;

use crate::nats::error_chain;
use crate::run::error::RunError;
use crate::run::{Runner, Started};
use crate::store::{StoreError, effective, is_finished, now_ms};
use council_proto::council::store::v1::DeliberationRecord;
use event::{DeadLetter, EventContext, Original};
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
#[derive(Debug, Clone, PartialEq, Eq)]
enum Disposition {
    Ack,
    /// Another try may succeed: redeliver after the delay (none: at once). Never the answer to
    /// a last delivery: see [`Dispatcher::process`].
    Retry {
        delay: Option<Duration>,
        cause: Cause,
        reason: String,
    },
    /// Dead-lettered: never redeliver.
    Term,
}

/// Why a delivery is handed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// The run failed in a way another run may not (backend trouble, a deadline).
    Run,
    /// NATS or the store would not answer around the run (reading the record, publishing
    /// the event or the dead letter): the task's outcome does not depend on it.
    Io,
    /// This replica is shutting down: another one takes the task.
    Shutdown,
}

/// The deliveries of one message held by this process, with their delivery counts: the first
/// one is worked on, later ones (a redelivery while it runs) are settled with it.
type Deliveries = Arc<Mutex<Vec<(Arc<Acker>, u64)>>>;

/// Task ids in hand, and their deliveries.
type Held = Arc<Mutex<HashMap<String, Deliveries>>>;

/// A lock that a panic elsewhere does not make unusable: what it guards (deliveries to
/// settle) is still right, and leaving a delivery unsettled is worse.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// In-progress acks for every delivery held, until dropped.
struct KeepAlive(tokio::task::JoinHandle<()>);

impl KeepAlive {
    fn start(deliveries: Deliveries, every: Duration) -> Self {
        Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let ackers: Vec<Arc<Acker>> =
                    lock(&deliveries).iter().map(|(a, _)| a.clone()).collect();
                for a in &ackers {
                    let _ = a.ack_with(AckKind::Progress).await;
                }
            }
        }))
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.0.abort();
    }
}

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

    /// Why this replica cannot run a task now, if it cannot: its backend or store is down.
    fn cannot_run(&self) -> Option<String> {
        if let Some(reason) = self.runner.backend().health().problem() {
            return Some(format!("backend: {reason}"));
        }
        self.runner
            .store()
            .health()
            .err()
            .map(|reason| format!("store: {reason}"))
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
        let mut paused = false;
        'pull: loop {
            while handlers.try_join_next().is_some() {}
            // Pull nothing while this replica cannot run it: good tasks would burn their
            // deliveries here while healthy replicas could take them.
            if let Some(problem) = self.cannot_run() {
                if !paused {
                    tracing::warn!(%problem, "not pulling tasks until the backend and the store are healthy");
                    paused = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    () = stopped(&mut stop) => break,
                }
            }
            if paused {
                tracing::info!("healthy again: pulling tasks");
                paused = false;
            }
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
                        // Unhealthy since the pull request went out: hand the message back
                        // (a last delivery is handled: at worst it is dead-lettered) and ask
                        // for nothing more until healthy.
                        if self.cannot_run().is_some() {
                            self.hand_back_one(message).await;
                            self.hand_back(batch).await;
                            break;
                        }
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
    /// it now instead of after `ack_wait`; a message on its last delivery is handled instead (a
    /// nak would lose it), which at shutdown dead-letters it with the reason.
    async fn hand_back(self: &Arc<Self>, mut batch: async_nats::jetstream::consumer::pull::Batch) {
        let until = tokio::time::Instant::now() + Duration::from_secs(6);
        while let Ok(Some(m)) = tokio::time::timeout_at(until, batch.next()).await {
            match m {
                Ok(m) => self.hand_back_one(m).await,
                Err(_) => break,
            }
        }
    }

    /// Hands one message back (nak, no delay); one on its last delivery is handled instead.
    async fn hand_back_one(self: &Arc<Self>, m: async_nats::jetstream::Message) {
        let last = m
            .info()
            .is_ok_and(|i| i.delivered >= self.config.max_deliver);
        if last {
            self.clone().handle(m).await;
        } else {
            let _ = m.ack_with(AckKind::Nak(None)).await;
            self.runner.metrics().dispatched("handed_over");
        }
    }

    async fn handle(self: Arc<Self>, message: async_nats::jetstream::Message) {
        let (delivered, sequence) = message
            .info()
            .map(|i| (i.delivered.max(1) as u64, i.stream_sequence))
            .unwrap_or((1, 0));
        let subject = message.subject.to_string();
        let (message, acker) = message.split();
        let acker = Arc::new(acker);
        let c = &self.config;
        let parsed = task::parse(
            &message.payload,
            &subject,
            &c.tasks_prefix,
            c.max_task_bytes,
            |s| c.captured(s),
        );
        let deliveries: Deliveries = Arc::new(Mutex::new(vec![(acker, delivered)]));
        let id = match &parsed {
            Ok(task) => {
                let id = task.id().to_owned();
                let mut held = lock(&self.held);
                if let Some(running) = held.get(&id) {
                    // A redelivery of a task this process is running: settled with the first.
                    tracing::info!(task_id = %id, delivered, "redelivered while running here");
                    let mine = lock(&deliveries).drain(..).collect::<Vec<_>>();
                    lock(running).extend(mine);
                    return;
                }
                held.insert(id.clone(), deliveries.clone());
                Some(id)
            }
            Err(_) => None,
        };
        let _keepalive = KeepAlive::start(deliveries.clone(), c.progress_every());
        let msg = Delivery {
            subject,
            sequence,
            payload: message.payload,
            deliveries: deliveries.clone(),
        };
        // The work runs in a task of its own: a panic in it is caught here, and the delivery
        // is still settled.
        let work = {
            let me = self.clone();
            let msg = msg.clone();
            let parsed = parsed.clone();
            tokio::spawn(async move {
                match &parsed {
                    Ok(task) => me.process(task, &msg).await,
                    Err(e) => me.reject(e, &msg).await,
                }
            })
        };
        let d = match work.await {
            Ok(d) => d,
            Err(e) => {
                let why = panic_text(e);
                tracing::error!(seq = sequence, error = %why, "handling a task panicked; dead-lettering it");
                self.runner.metrics().dispatched("panicked");
                self.last_resort(
                    parsed.as_ref().ok(),
                    &msg,
                    "internal",
                    format!("the worker failed: {why}"),
                )
                .await
            }
        };
        if let Some(id) = &id {
            lock(&self.held).remove(id);
        }
        let ackers: Vec<Arc<Acker>> = lock(&deliveries).drain(..).map(|(a, _)| a).collect();
        self.settle(ackers, d).await;
    }

    /// Runs (or recognises) one valid task and publishes its terminal event. A last delivery
    /// is never handed back: a failed run is dead-lettered, and NATS or store trouble is
    /// waited out in place (in-progress acks keep the delivery; none is spent).
    async fn process(&self, task: &Task, msg: &Delivery) -> Disposition {
        let mut waited = false;
        let mut io_wait = Duration::from_millis(500);
        let mut in_place = None;
        loop {
            let ctx = self.context(task, msg);
            // The permanent guard: what the record says about this task.
            let d = match self.guard(task, &ctx, msg).await {
                Some(d) => d,
                None => match self.deliberate(task, &ctx, msg).await {
                    Some(d) => d,
                    None if self.runner.is_draining() => {
                        self.runner.metrics().dispatched("handed_over");
                        Disposition::Retry {
                            delay: None,
                            cause: Cause::Shutdown,
                            reason: format!(
                                "replica {} shut down before it could run the task",
                                self.instance
                            ),
                        }
                    }
                    None => {
                        // Another replica's record is live, or no slot is free: hold the
                        // delivery (in-progress acks keep it ours, without spending
                        // deliveries) until that record finishes or its heartbeat stops, or a
                        // slot frees up.
                        if !waited {
                            self.runner.metrics().dispatched("waited");
                            waited = true;
                        }
                        tokio::time::sleep(
                            self.config.progress_every().min(Duration::from_secs(2)),
                        )
                        .await;
                        continue;
                    }
                },
            };
            let Disposition::Retry { cause, reason, .. } = &d else {
                return d;
            };
            if !self.is_last(msg) {
                return d;
            }
            // The last delivery: a failed run cannot be tried again, and NATS or store trouble
            // is waited out in place (the delivery held) for a while; then the dead letter
            // says why the task could not be handled.
            let since = *in_place.get_or_insert_with(tokio::time::Instant::now);
            if matches!(cause, Cause::Run | Cause::Shutdown)
                || since.elapsed() > self.last_delivery_patience()
            {
                let reason = format!(
                    "{reason} (delivery {} of {})",
                    msg.delivered(),
                    self.config.max_deliver
                );
                return self.dead_end_in_place(task, msg, reason).await;
            }
            if self.runner.is_draining() {
                tracing::error!(task_id = %task.id(), %reason, "shutting down on the last delivery with NATS or the store away: the task stays in the stream, unanswered");
                return d;
            }
            tracing::warn!(task_id = %task.id(), %reason, "last delivery: retrying in place");
            tokio::time::sleep(io_wait).await;
            io_wait = (io_wait * 2).min(Duration::from_secs(5));
        }
    }

    /// Dead-letters a task on its last delivery, waiting out NATS trouble in place (the dead
    /// letter's id makes a second copy a duplicate) until it is out or the process stops.
    async fn dead_end_in_place(&self, task: &Task, msg: &Delivery, reason: String) -> Disposition {
        let mut wait = Duration::from_millis(500);
        loop {
            let ctx = self.context(task, msg);
            let d = self
                .dead_end(
                    task,
                    &ctx,
                    msg,
                    "retries_exhausted",
                    reason.clone(),
                    now_ms(),
                )
                .await;
            if !matches!(d, Disposition::Retry { .. }) || self.runner.is_draining() {
                return d;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    /// The event context of `task` at this delivery.
    fn context(&self, task: &Task, msg: &Delivery) -> EventContext {
        EventContext {
            task_id: task.id().to_owned(),
            story_id: task.story_id().unwrap_or_default().to_owned(),
            role: task.role.clone(),
            correlation: task.message.correlation.clone(),
            delivery: msg.delivered(),
        }
    }

    /// How long a last delivery waits out NATS or store trouble before the task is
    /// dead-lettered: two ack waits.
    fn last_delivery_patience(&self) -> Duration {
        self.config.ack_wait * 2
    }

    /// Whether the newest delivery held is the last JetStream will make.
    fn is_last(&self, msg: &Delivery) -> bool {
        msg.delivered() as i64 >= self.config.max_deliver
    }

    /// What ends a message after this process failed at handling it (a panic): its dead letter
    /// and, for a valid task, its failed event. Runs in a task of its own, so that a second
    /// panic only hands the delivery back.
    async fn last_resort(
        self: &Arc<Self>,
        task: Option<&Task>,
        msg: &Delivery,
        class: &'static str,
        reason: String,
    ) -> Disposition {
        let me = self.clone();
        let task = task.cloned();
        let msg2 = msg.clone();
        let reason2 = reason.clone();
        let ended = tokio::spawn(async move {
            match &task {
                Some(task) => {
                    let ctx = me.context(task, &msg2);
                    me.dead_end(task, &ctx, &msg2, class, reason2, now_ms())
                        .await
                }
                None => {
                    let letter = me.letter(class, reason2, None, &msg2);
                    if me.dead_letter(&letter, &msg2).await {
                        Disposition::Term
                    } else {
                        me.io_retry(&msg2, "could not dead-letter")
                    }
                }
            }
        })
        .await;
        ended.unwrap_or_else(|e| {
            tracing::error!(error = %panic_text(e), "dead-lettering after a failure panicked too");
            Disposition::Retry {
                delay: Some(self.config.retry_delay(msg.delivered())),
                cause: Cause::Io,
                reason,
            }
        })
    }

    /// A retry for NATS or store trouble.
    fn io_retry(&self, msg: &Delivery, reason: impl Into<String>) -> Disposition {
        Disposition::Retry {
            delay: Some(self.config.retry_delay(msg.delivered())),
            cause: Cause::Io,
            reason: reason.into(),
        }
    }

    /// What the task's record says to do, if it says anything: ack a duplicate, publish the
    /// event of a completed run, dead-letter a permanent failure.
    async fn guard(&self, task: &Task, ctx: &EventContext, msg: &Delivery) -> Option<Disposition> {
        let id = task.id();
        let metrics = self.runner.metrics().clone();
        match self.runner.store().record(id).await {
            Err(e @ StoreError::Corrupt { .. }) => {
                // It would not read any better next time.
                let reason = format!("the task's record cannot be read: {e}");
                return Some(
                    self.dead_end(task, ctx, msg, "failed", reason, now_ms())
                        .await,
                );
            }
            Err(e) => {
                tracing::warn!(task_id = %id, error = %e, "cannot read the record; retrying later");
                metrics.dispatched("retried");
                return Some(self.io_retry(msg, format!("cannot read the task's record: {e}")));
            }
            Ok(Some(record)) if record.published_at_ms > 0 => {
                tracing::info!(task_id = %id, delivered = msg.delivered(), "duplicate delivery: its event is out already");
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
                            msg,
                        )
                        .await,
                    );
                }
                if is_finished(&record) && !record.retryable && record.rejected_sequence == 0 {
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
        msg: &Delivery,
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
                    msg,
                )
                .await
            }
            Err(RunError::ShuttingDown) => {
                tracing::info!(task_id = %id, "shutting down: handing the task to another replica");
                metrics.dispatched("handed_over");
                Disposition::Retry {
                    delay: None,
                    cause: Cause::Shutdown,
                    reason: format!("replica {} shut down while running the task", self.instance),
                }
            }
            Err(e @ (RunError::AlreadyRunning(_) | RunError::TakenOver(_))) => {
                tracing::info!(task_id = %id, error = %e, "running elsewhere; waiting for that run");
                return None;
            }
            Err(e @ RunError::Overloaded { .. }) => {
                // gRPC callers hold every slot: wait for one rather than spend a delivery.
                tracing::info!(task_id = %id, error = %e, "no free deliberation slot; waiting");
                return None;
            }
            Err(e @ RunError::Store(StoreError::Unavailable { .. })) => {
                tracing::warn!(task_id = %id, error = %e, "the store is unavailable; retrying later");
                metrics.dispatched("retried");
                self.io_retry(msg, e.to_string())
            }
            Err(e) if e.is_retryable() => {
                let delay = self.config.retry_delay(msg.delivered());
                tracing::warn!(task_id = %id, delivered = msg.delivered(), error = %e, delay_ms = delay.as_millis() as u64, "transient failure; retrying later");
                metrics.dispatched("retried");
                Disposition::Retry {
                    delay: Some(delay),
                    cause: Cause::Run,
                    reason: e.to_string(),
                }
            }
            Err(e) => {
                self.dead_end(task, ctx, msg, e.class(), e.to_string(), now_ms())
                    .await
            }
        };
        Some(d)
    }

    /// A dead letter for this delivery.
    fn letter(
        &self,
        class: &str,
        reason: String,
        task_id: Option<String>,
        msg: &Delivery,
    ) -> DeadLetter {
        DeadLetter::new(
            class,
            reason,
            task_id,
            Original {
                subject: &msg.subject,
                sequence: msg.sequence,
                payload: &msg.payload,
                deliveries: msg.delivered(),
            },
            &self.instance,
            self.max_letter_bytes(),
        )
    }

    /// The largest message this connection may publish, less room for headers.
    fn max_letter_bytes(&self) -> usize {
        (self.client.server_info().max_payload).saturating_sub(LETTER_HEADROOM)
    }

    /// A valid task that will not complete: its dead letter, its failed event, then `Term`.
    async fn dead_end(
        &self,
        task: &Task,
        ctx: &EventContext,
        msg: &Delivery,
        class: &str,
        reason: String,
        since_ms: i64,
    ) -> Disposition {
        tracing::warn!(task_id = %task.id(), class, %reason, "dead-lettering the task");
        let letter = self.letter(class, reason.clone(), Some(task.id().to_owned()), msg);
        if !self.dead_letter(&letter, msg).await {
            return self.io_retry(msg, "could not publish the dead letter");
        }
        // The dead letter is the task's answer; its failed event tells the orchestrator that
        // waits on the id, and is not worth a second dead letter when it cannot go out.
        let event = ctx.failed(class, reason, msg.delivered());
        let d = self
            .finish(Target::of(task), event, Disposition::Term, since_ms, msg)
            .await;
        if let Disposition::Retry { reason, .. } = d {
            tracing::warn!(task_id = %task.id(), %reason, "dead-lettered without its failed event");
        }
        Disposition::Term
    }

    /// Publishes the terminal event of `task` unless it is out already, marks the record,
    /// and returns `then` (or a retry when NATS would not take it).
    async fn finish(
        &self,
        task: Target<'_>,
        event: event::TaskEvent,
        then: Disposition,
        since_ms: i64,
        msg: &Delivery,
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
                    return self.io_retry(msg, format!("cannot search the events stream: {e}"));
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
                    Err(e) if e.refused => {
                        // It will never fit: the dead letter says so; the record keeps the
                        // outcome (GetDeliberationResult serves it).
                        let reason = format!(
                            "the events stream refused its {} event: {}",
                            event.event_type, e.reason
                        );
                        tracing::error!(task_id = %id, %reason, "dead-lettering");
                        let letter = self.letter("event_refused", reason, Some(id.to_owned()), msg);
                        return if self.dead_letter(&letter, msg).await {
                            Disposition::Term
                        } else {
                            self.io_retry(msg, "could not publish the dead letter")
                        };
                    }
                    Err(e) => {
                        tracing::warn!(task_id = %id, error = %e.reason, "could not publish the event; retrying later");
                        return self
                            .io_retry(msg, format!("could not publish the event: {}", e.reason));
                    }
                }
            }
        };
        self.mark_published(id, task.role, sequence, task.rejected)
            .await;
        then
    }

    /// Records that the task's event is out, so later deliveries are acked without work. Every
    /// write is a compare-and-set: `rejected` (the tasks stream's sequence of a message that
    /// was not a valid task) marks only the record written for that message, never a record
    /// of a task that was accepted meanwhile.
    async fn mark_published(&self, id: &str, role: &str, sequence: u64, rejected: u64) {
        let store = self.runner.store();
        for attempt in 0..MARK_ATTEMPTS {
            let now = now_ms();
            let written = match store.record_at(id).await {
                Ok(Some((r, _))) if rejected > 0 && r.rejected_sequence != rejected => {
                    tracing::info!(task_id = %id, "the task id's record is another message's now; not marking it");
                    return;
                }
                Ok(Some((mut r, revision))) => {
                    r.published_at_ms = now;
                    r.event_sequence = sequence;
                    r.updated_at_ms = now;
                    if r.rejected_sequence > 0 {
                        r.status = DeliberationStatus::Failed as i32;
                    }
                    store.write_record_at(r, revision).await
                }
                Ok(None) if rejected > 0 => {
                    tracing::info!(task_id = %id, "the rejected message's record is gone; not marking it");
                    return;
                }
                Ok(None) => {
                    // Dead-lettered before any run: keep a finished record as the guard.
                    let r = DeliberationRecord {
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
                    };
                    store.write_record_at(r, 0).await
                }
                Err(e) => Err(e),
            };
            match written {
                Ok(Some(_)) => return,
                // Changed since it was read: read it again.
                Ok(None) => {}
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
    ) -> Result<async_nats::jetstream::publish::PublishAck, PublishFailure> {
        let give_up =
            tokio::time::Instant::now() + self.config.ack_wait.max(Duration::from_secs(10));
        // async-nats panics on a header value it cannot send; task ids are checked when a
        // message is parsed, and this keeps any other id from reaching the header.
        if let Err(reason) = task::check_task_id(msg_id) {
            return Err(PublishFailure {
                refused: true,
                reason: format!("{subject}: not a message id: {reason}"),
            });
        }
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
                    // Too large for the server, or refused by the stream itself (e.g. its
                    // message size limit): it would be refused again.
                    let refused = e.kind() == PublishErrorKind::MaxPayloadExceeded
                        || std::error::Error::source(&e).is_some_and(|s| {
                            s.downcast_ref::<async_nats::jetstream::Error>().is_some()
                        });
                    let e = error_chain(&e);
                    if refused || tokio::time::Instant::now() + wait > give_up {
                        return Err(PublishFailure {
                            refused,
                            reason: format!("{subject}: {e}"),
                        });
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

    /// A message that is not a valid task: its dead letter, then `Term`. When its task id can
    /// be read and no task holds that id, a failed event under that id too: the id is taken
    /// first with a record of this message (created only where none exists), so the event of
    /// a message we could not read never takes the place of, or marks, a task we accepted.
    async fn reject(&self, e: &TaskError, msg: &Delivery) -> Disposition {
        let mut io_wait = Duration::from_millis(500);
        loop {
            let d = self.reject_once(e, msg).await;
            let Disposition::Retry { reason, .. } = &d else {
                return d;
            };
            if !self.is_last(msg) || self.runner.is_draining() {
                return d;
            }
            // The last delivery: NATS or the store is away; wait it out, the delivery held.
            tracing::warn!(seq = msg.sequence, %reason, "last delivery of a bad message: retrying in place");
            tokio::time::sleep(io_wait).await;
            io_wait = (io_wait * 2).min(Duration::from_secs(5));
        }
    }

    async fn reject_once(&self, e: &TaskError, msg: &Delivery) -> Disposition {
        let salvaged = task::salvage(&msg.payload);
        let task_id = salvaged.as_ref().map(|s| s.task_id.clone());
        tracing::warn!(subject = %msg.subject, seq = msg.sequence, task_id = task_id.as_deref().unwrap_or("-"), error = %e, "dead-lettering a bad message");
        let letter = self.letter(e.class(), e.to_string(), task_id, msg);
        if !self.dead_letter(&letter, msg).await {
            return self.io_retry(msg, "could not publish the dead letter");
        }
        let Some(s) = salvaged else {
            return Disposition::Term;
        };
        let store = self.runner.store();
        let now = now_ms();
        let mine = DeliberationRecord {
            task_id: s.task_id.clone(),
            role: s.role.clone(),
            // Live until its event is out: a valid task with this id waits meanwhile.
            status: DeliberationStatus::InProgress as i32,
            created_at_ms: now,
            updated_at_ms: now,
            deadline_at_ms: now.saturating_add(2 * self.config.ack_wait.as_millis() as i64),
            error_message: format!("dead-lettered: {}: {e}", e.class()),
            instance_id: self.instance.clone(),
            rejected_sequence: msg.sequence,
            ..Default::default()
        };
        let ours = match store.write_record_at(mine, 0).await {
            Ok(Some(_)) => true,
            Ok(None) => match store.record(&s.task_id).await {
                // Taken by this message on an earlier delivery, its event not yet out.
                Ok(Some(r)) => r.rejected_sequence == msg.sequence && r.published_at_ms == 0,
                Ok(None) => false,
                Err(e) => return self.io_retry(msg, format!("cannot read the task's record: {e}")),
            },
            Err(StoreError::Corrupt { .. }) => false,
            Err(e) => return self.io_retry(msg, format!("cannot write the task's record: {e}")),
        };
        if !ours {
            // The id belongs to a task (running, finished or another bad message): the dead
            // letter alone answers this message.
            tracing::info!(task_id = %s.task_id, "the task id is in use: dead letter only");
            return Disposition::Term;
        }
        let ctx = EventContext {
            task_id: s.task_id.clone(),
            story_id: s.story_id.clone(),
            role: s.role.clone(),
            correlation: s.correlation.clone(),
            delivery: msg.delivered(),
        };
        let event = ctx.failed(e.class(), e.to_string(), msg.delivered());
        let target = Target {
            id: &s.task_id,
            role: &s.role,
            result_subject: None,
            rejected: msg.sequence,
        };
        self.finish(target, event, Disposition::Term, now, msg)
            .await
    }

    /// Publishes a dead letter and waits for the DLQ stream's ack.
    async fn dead_letter(&self, letter: &DeadLetter, msg: &Delivery) -> bool {
        let body = Bytes::from(serde_json::to_vec(letter).unwrap_or_default());
        let id = format!("dlq-{}", msg.sequence);
        match self.publish(&self.config.dlq_subject, &id, body).await {
            Ok(_) => {
                self.runner.metrics().dispatched("dead_lettered");
                true
            }
            Err(e) => {
                tracing::error!(error = %e.reason, refused = e.refused, "could not dead-letter; trying again");
                false
            }
        }
    }

    /// Tells JetStream, for every delivery held, with a confirmed ack where it matters.
    async fn settle(&self, ackers: Vec<Arc<Acker>>, d: Disposition) {
        for acker in ackers {
            let kind = match &d {
                Disposition::Ack => AckKind::Ack,
                Disposition::Retry { delay, .. } => AckKind::Nak(*delay),
                Disposition::Term => AckKind::Term,
            };
            if matches!(d, Disposition::Retry { .. }) {
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

#[tonic::async_trait]
impl crate::run::ResultSink for Dispatcher {
    /// A background deliberation's terminal event, published as a dispatched task's is
    /// (`Nats-Msg-Id` = task id, on the completed or failed subject), and its record marked.
    async fn publish_result(
        &self,
        request: &pb::DeliberateRequest,
        result: &Result<pb::DeliberateResponse, RunError>,
    ) {
        let correlation: std::collections::BTreeMap<String, String> = request
            .constraints
            .as_ref()
            .map(|c| {
                c.metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let ctx = EventContext {
            task_id: request.task_id.clone(),
            story_id: correlation.get("story_id").cloned().unwrap_or_default(),
            role: request.role.clone(),
            correlation,
            delivery: 0,
        };
        let (event, subject) = match result {
            Ok(response) => (ctx.completed(response), &self.config.completed_subject),
            Err(e) => (
                ctx.failed("failed", e.to_string(), 1),
                &self.config.failed_subject,
            ),
        };
        let body = Bytes::from(serde_json::to_vec(&event).unwrap_or_default());
        match self.publish(subject, &request.task_id, body).await {
            Ok(ack) => {
                self.mark_published(&request.task_id, &request.role, ack.sequence, 0)
                    .await;
            }
            Err(e) => {
                tracing::error!(task_id = %request.task_id, error = %e.reason, "could not publish a background deliberation's result; GetDeliberationResult still serves it");
            }
        }
    }
}

/// Tries of marking a record published (0.25 s more wait after each: about 5 s in all).
const MARK_ATTEMPTS: u32 = 6;

/// Why a publish failed.
#[derive(Debug, Clone)]
struct PublishFailure {
    /// The server or the stream refused the message itself: it would be refused again.
    refused: bool,
    reason: String,
}

/// Room left in a dead letter's message for its headers.
const LETTER_HEADROOM: usize = 1024;

/// What a panic said.
fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into()),
        Err(e) => e.to_string(),
    }
}

/// Whose terminal event is published, and where.
#[derive(Debug, Clone, Copy)]
struct Target<'a> {
    id: &'a str,
    role: &'a str,
    result_subject: Option<&'a str>,
    /// The tasks stream's sequence of the bad message this event answers (0: a valid task).
    rejected: u64,
}

impl<'a> Target<'a> {
    fn of(task: &'a Task) -> Self {
        Self {
            id: task.id(),
            role: &task.role,
            result_subject: task.message.result_subject.as_deref(),
            rejected: 0,
        }
    }
}

/// The message as received, and every delivery of it held: what dead letters and retry
/// delays need.
#[derive(Clone)]
struct Delivery {
    subject: String,
    sequence: u64,
    payload: Bytes,
    deliveries: Deliveries,
}

impl Delivery {
    /// The newest delivery's count (a redelivery while the first runs counts).
    fn delivered(&self) -> u64 {
        lock(&self.deliveries)
            .iter()
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(1)
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic while a lock is held does not make the deliveries behind it unreachable: they
    /// can still be settled.
    #[test]
    fn a_poisoned_lock_still_gives_its_contents() {
        let m = Arc::new(Mutex::new(vec![1, 2, 3]));
        let poisoner = m.clone();
        let panicked = std::thread::spawn(move || {
            let _held = poisoner.lock().expect("first");
            panic!("while holding the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), vec![1, 2, 3]);
        lock(&m).push(4);
        assert_eq!(lock(&m).len(), 4);
    }

    /// The in-progress acks stop when their holder is dropped, also when it is dropped by
    /// unwinding.
    #[tokio::test]
    async fn keepalive_stops_when_dropped() {
        let deliveries: Deliveries = Arc::new(Mutex::new(Vec::new()));
        let keepalive = KeepAlive::start(deliveries, Duration::from_millis(10));
        let task = keepalive.0.abort_handle();
        assert!(!task.is_finished());
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = keepalive;
            panic!("the handler failed");
        }));
        assert!(unwound.is_err());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(task.is_finished(), "in-progress acks went on");
    }

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        let c = DispatchConfig {
            nak_delay: Duration::from_millis(200),
            max_nak_delay: Duration::from_secs(1),
            ..DispatchConfig::default()
        };
        let delays: Vec<u128> = (1..=5).map(|d| c.retry_delay(d).as_millis()).collect();
        assert_eq!(delays, vec![200, 400, 800, 1000, 1000]);
    }
}
