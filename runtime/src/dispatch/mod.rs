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

mod config;
pub mod event;
mod letters;
mod publish;
pub mod setup;
pub mod task;

pub use config::DispatchConfig;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::Acker;
use async_nats::jetstream::{AckKind, Context};
use bytes::Bytes;
use council_proto::fleet::orchestrator::v1::DeliberationStatus;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;

use crate::nats::error_chain;
use crate::run::error::RunError;
use crate::run::{RunProgress, Runner, Started};
use crate::store::{StoreError, effective, is_finished, now_ms};
use event::EventContext;
use publish::Target;
use task::Task;

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
            let (tx, mut rx) = mpsc::unbounded_channel::<RunProgress>();
            let js = self.js.clone();
            let ctx = ctx.clone();
            tokio::spawn(async move {
                while let Some(u) = rx.recv().await {
                    let body = serde_json::to_vec(&ctx.progress(&u)).unwrap_or_default();
                    // Progress is best effort: not awaited, not retried.
                    let _ = js.publish(subject.clone(), body.into()).await;
                }
            });
            tx
        });
        let started = match task.request() {
            Ok(request) => self.runner.start(request, None, updates).await,
            Err(e) => Err(e),
        };
        let result = match started {
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
