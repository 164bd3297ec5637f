//! The run core both doors share (the gRPC service and NATS dispatch): a domain
//! [`RunRequest`] in ([`request`]; each door converts its own message at its edge), checks
//! before any LLM call, the persisted record of each accepted run (claim, resume from a
//! checkpoint, heartbeats, the final record), [`RunProgress`] for streams, cancellation (client
//! gone, shutdown) and the drain at shutdown. `Deliberate`, `StreamDeliberation` and a
//! dispatched task all go through [`Runner::start`]. [`error`] is the run error with its retry
//! class (and the one place it becomes a `tonic::Status`); [`convert`] turns the outcome into
//! the stored response and records into results; [`metrics`] measures.

pub mod convert;
pub mod error;
pub mod metrics;
mod progress;
pub mod request;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use council_councils::spec::JudgeMode;
use council_councils::{CouncilSpec, Deliberation, LlmCall, OutcomeStatus, Task};
use council_inference::Backend;
use council_proto::council::store::v1::DeliberationRecord;
use council_proto::fleet::orchestrator::v1 as pb;
use council_proto::fleet::orchestrator::v1::DeliberationStatus;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

use self::error::{RunError, invalid};
use self::metrics::{Ending, Finished, Metrics};
use self::progress::ProgressTracker;
pub use self::request::{RequestParts, RunProgress, RunRequest, new_task_id, role};
use crate::driver::{self, Event};
use crate::store::{Claim, CouncilStore, effective, now_ms};

/// Why a run was stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// The caller went away (cancelled RPC, dropped stream).
    Client,
    /// The service is shutting down and the grace period is over.
    Shutdown,
}

/// A cancellation flag one run waits on.
#[derive(Debug, Default)]
struct CancelCell {
    reason: Mutex<Option<Cancel>>,
    notify: Notify,
}

impl CancelCell {
    fn cancel(&self, reason: Cancel) {
        if let Ok(mut r) = self.reason.lock()
            && r.is_none()
        {
            *r = Some(reason);
        }
        // Stores a permit when nobody waits yet, so a cancel is never missed.
        self.notify.notify_one();
    }

    async fn cancelled(&self) -> Cancel {
        loop {
            if let Some(r) = self.reason.lock().ok().and_then(|r| *r) {
                return r;
            }
            self.notify.notified().await;
        }
    }
}

/// Limits of the run core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deliberations running at once; beyond it `RESOURCE_EXHAUSTED` at once.
    pub max_concurrent: usize,
    /// Deadline of a deliberation whose request names none.
    pub default_timeout: Duration,
    /// Upper bound on a request's `timeout_seconds`.
    pub max_timeout: Duration,
    /// How often a running deliberation refreshes its record; one silent for three periods
    /// belonged to a process that died and may be taken over.
    pub heartbeat: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent: 16,
            default_timeout: Duration::from_secs(600),
            max_timeout: Duration::from_secs(3600),
            heartbeat: Duration::from_secs(10),
        }
    }
}

/// Where the result of a background deliberation (`DeliberateForBacklogReview`) is published:
/// JetStream's events stream when dispatch runs. Implemented by the dispatcher, so the service
/// does not depend on it.
#[tonic::async_trait]
pub trait ResultSink: Send + Sync + std::fmt::Debug {
    /// Publishes the terminal event of `request`'s task (completed or failed).
    async fn publish_result(
        &self,
        request: &RunRequest,
        result: &Result<pb::DeliberateResponse, RunError>,
    );
}

/// Where a run's progress goes while it runs; dropped when it ends (its result comes from
/// the [`RunHandle`]).
pub type Updates = mpsc::UnboundedSender<RunProgress>;

/// What `start` did.
#[derive(Debug)]
pub enum Started {
    /// The task had completed before: its stored response, nothing ran.
    Done(Box<pb::DeliberateResponse>),
    /// A new run; its result comes through the handle.
    Running(RunHandle),
}

/// A caller's hold on a run. Dropping it before the result arrived cancels the run.
#[derive(Debug)]
pub struct RunHandle {
    result: oneshot::Receiver<Result<pb::DeliberateResponse, RunError>>,
    cancel: Arc<CancelCell>,
    finished: bool,
}

impl RunHandle {
    pub async fn result(mut self) -> Result<pb::DeliberateResponse, RunError> {
        std::future::poll_fn(|cx| self.poll_result(cx)).await
    }

    /// The result once it is there (for a stream that ends with it).
    pub fn poll_result(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<pb::DeliberateResponse, RunError>> {
        let result = std::task::ready!(Pin::new(&mut self.result).poll(cx));
        self.finished = true;
        Poll::Ready(result.unwrap_or(Err(RunError::Lost)))
    }
}

impl Drop for RunHandle {
    fn drop(&mut self) {
        if !self.finished {
            self.cancel.cancel(Cancel::Client);
        }
    }
}

/// Runs deliberations and keeps track of the ones in flight.
#[derive(Debug)]
pub struct Runner {
    backend: Arc<dyn Backend>,
    store: Arc<dyn CouncilStore>,
    limits: Limits,
    permits: Arc<Semaphore>,
    instance: String,
    metrics: Arc<Metrics>,
    active: Mutex<HashMap<u64, Arc<CancelCell>>>,
    next_id: AtomicU64,
    draining: AtomicBool,
    idle: Notify,
    /// Agents deliberating now, by role.
    busy: Mutex<HashMap<String, u64>>,
    /// How every council this runner runs gives its verdicts (`councils.judge`, already
    /// reduced to what the backend can serve).
    judge: JudgeMode,
}

/// This process, for records: host, pid and start time.
fn instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}:{}", std::process::id(), now_ms())
}

impl Runner {
    pub fn new(
        backend: Arc<dyn Backend>,
        store: Arc<dyn CouncilStore>,
        limits: Limits,
        judge: JudgeMode,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            judge,
            backend,
            store,
            permits: Arc::new(Semaphore::new(limits.max_concurrent)),
            limits,
            instance: instance_id(),
            metrics,
            active: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            idle: Notify::new(),
            busy: Mutex::new(HashMap::new()),
        }
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn store(&self) -> &Arc<dyn CouncilStore> {
        &self.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// This process, as records name it.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Agents deliberating now, by role.
    pub fn busy_by_role(&self) -> HashMap<String, u64> {
        self.busy.lock().map(|b| b.clone()).unwrap_or_default()
    }

    fn set_busy(&self, role: &str, agents: u64, add: bool) {
        if let Ok(mut busy) = self.busy.lock() {
            let n = busy.entry(role.to_owned()).or_default();
            *n = if add {
                *n + agents
            } else {
                n.saturating_sub(agents)
            };
            if *n == 0 {
                busy.remove(role);
            }
        }
    }

    fn active_count(&self) -> usize {
        self.active.lock().map_or(0, |a| a.len())
    }

    /// Checks `req` against its council and the limits, records it and starts it;
    /// `client_deadline` is the caller's own deadline (a call's `grpc-timeout`), if any.
    pub async fn start(
        self: &Arc<Self>,
        req: RunRequest,
        client_deadline: Option<Duration>,
        updates: Option<Updates>,
    ) -> Result<Started, RunError> {
        if self.is_draining() {
            self.metrics.rejected("shutting_down");
            return Err(RunError::ShuttingDown);
        }
        let RunRequest {
            task,
            role,
            num_agents,
            rounds,
            timeout,
        } = req;
        let council = self
            .store
            .get(&role)
            .await?
            .ok_or_else(|| RunError::UnknownRole(role.to_string()))?;
        let council = council_for(council, num_agents, rounds, self.judge)?;
        let mut deadline = timeout
            .unwrap_or(self.limits.default_timeout)
            .min(self.limits.max_timeout);
        if let Some(client) = client_deadline {
            // Finish a little before the client gives up, so that the record says TIMEOUT and
            // the client hears DEADLINE_EXCEEDED from us.
            let margin = (client / 20).min(Duration::from_millis(200));
            deadline = deadline.min(client.saturating_sub(margin));
        }
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            self.metrics.rejected("overloaded");
            RunError::Overloaded {
                limit: self.limits.max_concurrent,
            }
        })?;
        let now = now_ms();
        let record = DeliberationRecord {
            task_id: task.id.as_str().to_owned(),
            role: role.to_string(),
            status: DeliberationStatus::InProgress as i32,
            created_at_ms: now,
            updated_at_ms: now,
            deadline_at_ms: now.saturating_add(deadline.as_millis() as i64),
            instance_id: self.instance.clone(),
            heartbeat_ms: self.limits.heartbeat.as_millis() as i64,
            ..Default::default()
        };
        // An interrupted earlier run of this task may have left a checkpoint to resume from.
        let (previous, revision) = match self.store.claim(record.clone(), now).await? {
            Claim::Claimed { replaced, revision } => {
                let mut previous = replaced.map(|r| *r);
                if let Some(p) = previous.as_mut().filter(|p| p.checkpoint.is_empty()) {
                    // Saved beside the record (older records carry it inside).
                    match self.store.read_checkpoint(&p.task_id).await {
                        Ok(saved) => p.checkpoint = saved.unwrap_or_default(),
                        Err(e) => {
                            tracing::warn!(task_id = %p.task_id, error = %e, "cannot read the checkpoint; starting over");
                        }
                    }
                }
                (previous, revision)
            }
            Claim::Existing(existing) => {
                let existing = effective(*existing, now);
                if existing.status == DeliberationStatus::Completed as i32
                    && let Some(response) = existing.response
                {
                    return Ok(Started::Done(Box::new(response)));
                }
                self.metrics.rejected("already_running");
                return Err(RunError::AlreadyRunning(existing.task_id));
            }
        };

        let steps = 2 + 2 * council.config.rounds;
        let agents = council.agents.len() as u64;
        let (deliberation, seed, pending) = resume_or_start(council, task, previous, now);
        let cancel = Arc::new(CancelCell::default());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut active) = self.active.lock() {
            active.insert(id, cancel.clone());
        }
        let (result_tx, result_rx) = oneshot::channel();
        let runner = self.clone();
        let cell = cancel.clone();
        self.metrics.started();
        self.set_busy(role.as_str(), agents, true);
        tokio::spawn(async move {
            let result = runner
                .run(RunInput {
                    record,
                    revision,
                    deliberation,
                    pending,
                    deadline,
                    seed,
                    steps,
                    cancel: cell,
                    updates,
                })
                .await;
            // The progress sender went with the run: a stream has every update before this.
            let _ = result_tx.send(result);
            runner.set_busy(role.as_str(), agents, false);
            drop(permit);
            if let Ok(mut active) = runner.active.lock() {
                active.remove(&id);
            }
            runner.idle.notify_waiters();
        });
        Ok(Started::Running(RunHandle {
            result: result_rx,
            cancel,
            finished: false,
        }))
    }

    async fn run(&self, input: RunInput) -> Result<pb::DeliberateResponse, RunError> {
        let RunInput {
            mut record,
            revision,
            deliberation,
            pending,
            deadline,
            seed,
            steps,
            cancel,
            updates,
        } = input;
        let started = Instant::now();
        let mut progress = ProgressTracker::new(steps, updates, Some(self.metrics.clone()));
        enum Ended {
            Ran(Box<Result<(council_councils::Outcome, driver::Timeline), driver::DriverError>>),
            TimedOut,
            Cancelled(Cancel),
            TakenOver,
        }
        let checkpoint = Mutex::new(Vec::new());
        // The checkpoint as last saved: it is written only when it changed.
        let saved = Mutex::new(Vec::new());
        let revision = Mutex::new(revision);
        let ended = {
            let mut on_event = |e: Event| {
                if let Event::Checkpoint(c) = &e {
                    if let (Ok(json), Ok(mut slot)) = (serde_json::to_vec(c), checkpoint.lock()) {
                        *slot = json;
                    }
                    return;
                }
                progress.on(e)
            };
            let run =
                driver::run_timed_from(self.backend.as_ref(), deliberation, pending, &mut on_event);
            tokio::select! {
                r = tokio::time::timeout(deadline, run) => match r {
                    Ok(r) => Ended::Ran(Box::new(r)),
                    Err(_) => Ended::TimedOut,
                },
                c = cancel.cancelled() => Ended::Cancelled(c),
                () = self.heartbeat(&record, &checkpoint, &saved, &revision) => Ended::TakenOver,
            }
        };
        let duration = started.elapsed();
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        let result = match ended {
            Ended::Ran(ran) => match *ran {
                Ok((outcome, timeline)) => {
                    prompt_tokens = outcome.usage.prompt_tokens;
                    completion_tokens = outcome.usage.completion_tokens;
                    match &outcome.status {
                        OutcomeStatus::Completed => Ok(convert::response(
                            &record.task_id,
                            &outcome,
                            &timeline,
                            duration,
                            seed,
                        )),
                        OutcomeStatus::Failed { reason } => Err(RunError::DeliberationFailed {
                            reason: reason.clone(),
                            // Only a backend error may go away on another try: the
                            // deliberation is deterministic for its task.
                            retryable: outcome.failed_agents.iter().any(|f| f.backend),
                        }),
                    }
                }
                Err(e) => Err(RunError::Driver(e)),
            },
            Ended::TimedOut => Err(RunError::DeadlineExceeded(deadline)),
            Ended::Cancelled(Cancel::Client) => Err(RunError::Cancelled),
            Ended::Cancelled(Cancel::Shutdown) => Err(RunError::ShuttingDown),
            Ended::TakenOver => Err(RunError::TakenOver(record.task_id.clone())),
        };
        let ending = match &result {
            Ok(_) => Ending::Completed,
            Err(RunError::DeadlineExceeded(_)) => Ending::Timeout,
            Err(RunError::Cancelled | RunError::ShuttingDown | RunError::TakenOver(_)) => {
                Ending::Cancelled
            }
            Err(_) => Ending::Failed,
        };
        record.updated_at_ms = now_ms();
        match &result {
            Ok(response) => {
                record.status = DeliberationStatus::Completed as i32;
                record.response = Some(response.clone());
            }
            Err(e) => {
                if e.is_retryable() {
                    // Whoever runs the task next resumes from here.
                    self.save_checkpoint(&record.task_id, &checkpoint, &saved)
                        .await;
                }
                record.status = if ending == Ending::Timeout {
                    DeliberationStatus::Timeout as i32
                } else {
                    DeliberationStatus::Failed as i32
                };
                record.error_message = e.to_string();
                record.retryable = e.is_retryable();
            }
        }
        if !matches!(result, Err(RunError::TakenOver(_))) {
            let revision = revision.lock().map_or(0, |r| *r);
            self.write_final(&record, revision).await;
        }
        tracing::info!(
            task_id = %record.task_id,
            outcome = ending.as_str(),
            duration_ms = duration.as_millis() as u64,
            prompt_tokens,
            completion_tokens,
            "deliberation finished"
        );
        self.metrics.finished(
            Finished {
                at_ms: record.updated_at_ms,
                duration_ms: duration.as_secs_f64() * 1000.0,
                role: record.role.clone(),
                ending,
            },
            prompt_tokens,
            completion_tokens,
        );
        result
    }

    /// Refreshes the live record every heartbeat period, so other replicas can tell a running
    /// deliberation from one whose process died. Every write is a compare-and-set on the
    /// record's revision; returns only when the record was taken over (another replica judged
    /// this run dead and claimed the task): from then on this run writes nothing.
    async fn heartbeat(
        &self,
        record: &DeliberationRecord,
        checkpoint: &Mutex<Vec<u8>>,
        saved: &Mutex<Vec<u8>>,
        revision: &Mutex<u64>,
    ) {
        let mut tick = tokio::time::interval(self.limits.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            self.save_checkpoint(&record.task_id, checkpoint, saved)
                .await;
            let mut r = record.clone();
            r.updated_at_ms = now_ms();
            let at = revision.lock().map_or(0, |r| *r);
            match self.store.write_record_at(r, at).await {
                Ok(Some(next)) => {
                    if let Ok(mut rev) = revision.lock() {
                        *rev = next;
                    }
                }
                Ok(None) => {
                    tracing::warn!(task_id = %record.task_id, "the record was taken over by another replica; stopping this run");
                    return;
                }
                Err(e) => {
                    tracing::warn!(task_id = %record.task_id, error = %e, "could not refresh the record's heartbeat");
                }
            }
        }
    }

    /// Saves the run's checkpoint beside its record when it changed since the last save.
    async fn save_checkpoint(
        &self,
        task_id: &str,
        checkpoint: &Mutex<Vec<u8>>,
        saved: &Mutex<Vec<u8>>,
    ) {
        let current = checkpoint.lock().map(|c| c.clone()).unwrap_or_default();
        if current.is_empty() || saved.lock().is_ok_and(|s| *s == current) {
            return;
        }
        match self.store.write_checkpoint(task_id, current.clone()).await {
            Ok(()) => {
                if let Ok(mut s) = saved.lock() {
                    *s = current;
                }
            }
            Err(e) => {
                tracing::warn!(%task_id, error = %e, "could not save the checkpoint");
            }
        }
    }

    /// Writes the finished record (compare-and-set on the run's revision), retrying while the
    /// store is unavailable, for up to about a minute: a completed deliberation whose record
    /// stayed live would read as interrupted and run again.
    async fn write_final(&self, record: &DeliberationRecord, revision: u64) {
        let mut wait = Duration::from_millis(200);
        for attempt in 1..=FINAL_WRITE_ATTEMPTS {
            match self.store.write_record_at(record.clone(), revision).await {
                Ok(Some(_)) => return,
                Ok(None) => {
                    tracing::warn!(task_id = %record.task_id, "the record was taken over by another replica; not writing this run's end");
                    return;
                }
                Err(e) if attempt < FINAL_WRITE_ATTEMPTS => {
                    tracing::warn!(task_id = %record.task_id, attempt, error = %e, "could not write the deliberation record; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(8));
                }
                Err(e) => {
                    tracing::error!(task_id = %record.task_id, attempts = attempt, error = %e, "could not write the deliberation record; giving up");
                }
            }
        }
    }

    /// Shutdown: refuses new runs, lets the running ones finish within `grace`, then cancels
    /// the rest (their records say failed, retryable) and waits for them to write it. Returns
    /// how many were cancelled.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.draining.store(true, Ordering::SeqCst);
        let running = self.active_count();
        if running > 0 {
            tracing::info!(
                running,
                grace_ms = grace.as_millis() as u64,
                "draining deliberations"
            );
        }
        let end = tokio::time::Instant::now() + grace;
        self.wait_idle_until(end).await;
        let cancelled: Vec<Arc<CancelCell>> = self
            .active
            .lock()
            .map(|a| a.values().cloned().collect())
            .unwrap_or_default();
        for cell in &cancelled {
            cell.cancel(Cancel::Shutdown);
        }
        if !cancelled.is_empty() {
            tracing::warn!(
                cancelled = cancelled.len(),
                "grace period over: cancelled the remaining deliberations"
            );
            // Cancelled runs only write their record; give them a bounded moment.
            self.wait_idle_until(tokio::time::Instant::now() + Duration::from_secs(10))
                .await;
        }
        cancelled.len()
    }

    async fn wait_idle_until(&self, end: tokio::time::Instant) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active_count() == 0 {
                return;
            }
            if tokio::time::timeout_at(end, notified).await.is_err() {
                return;
            }
        }
    }

    /// Deletes finished records older than `retention`, every `every`, until `stop` turns true.
    pub fn spawn_retention(
        &self,
        retention: Duration,
        every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let before = now_ms().saturating_sub(retention.as_millis() as i64);
                match store.purge_records(before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(purged = n, "removed records past their retention"),
                    Err(e) => tracing::warn!(error = %e, "could not purge old records"),
                }
            }
        });
    }
}

/// Tries of the final record write (backoff 0.2 s doubling to 8 s: about a minute in all).
const FINAL_WRITE_ATTEMPTS: u32 = 12;

struct RunInput {
    record: DeliberationRecord,
    /// The claimed record's revision: every write of the run is a compare-and-set on it.
    revision: u64,
    deliberation: Deliberation,
    /// The calls a restored deliberation was waiting for.
    pending: Option<Vec<LlmCall>>,
    deadline: Duration,
    seed: u64,
    steps: u32,
    cancel: Arc<CancelCell>,
    updates: Option<Updates>,
}

/// The deliberation of `task` by `council`, and its seed. The seed comes from the task id: a
/// redelivered task deliberates the same way.
pub fn deliberation(council: CouncilSpec, task: Task) -> (Deliberation, u64) {
    let seed = council_councils::rng::hash_str(task.id.as_str());
    let config = council.config;
    (Deliberation::new(council, task, config, seed), seed)
}

/// The council to deliberate with: the stored one, cut to `num_agents` and set to `rounds`
/// when asked, judging by `judge`.
pub fn council_for(
    mut council: CouncilSpec,
    num_agents: Option<usize>,
    rounds: Option<u32>,
    judge: JudgeMode,
) -> Result<CouncilSpec, RunError> {
    let size = council.agents.len();
    match num_agents {
        Some(n) if n > size => {
            return Err(invalid(
                "num_agents",
                format!("{n} exceeds the council's {size} agents"),
            ));
        }
        Some(n) => council.agents.truncate(n),
        None => {}
    }
    if let Some(rounds) = rounds {
        council.config.rounds = rounds;
    }
    council.config.judge = judge;
    Ok(council)
}

/// The deliberation of `task` by `council`, resumed from the checkpoint of `previous` (an
/// interrupted or failed earlier run of the same task) when it has one that fits.
fn resume_or_start(
    council: CouncilSpec,
    task: Task,
    previous: Option<DeliberationRecord>,
    now_ms: i64,
) -> (Deliberation, u64, Option<Vec<LlmCall>>) {
    let checkpoint = previous
        .filter(|p| !p.checkpoint.is_empty() && crate::store::claimable(p, now_ms))
        .and_then(|p| {
            serde_json::from_slice::<council_councils::checkpoint::Checkpoint>(&p.checkpoint).ok()
        });
    let (fresh, seed) = deliberation(council.clone(), task.clone());
    let Some(checkpoint) = checkpoint.filter(|c| c.seed == seed) else {
        return (fresh, seed, None);
    };
    let config = council.config;
    match Deliberation::restore(council, task.clone(), config, &checkpoint) {
        Ok((restored, pending)) => {
            tracing::info!(
                task_id = %task.id.as_str(),
                steps = checkpoint.steps.len(),
                "resuming the task from its checkpoint"
            );
            (restored, seed, Some(pending))
        }
        Err(e) => {
            tracing::warn!(task_id = %task.id.as_str(), error = %e, "checkpoint unusable; starting over");
            (fresh, seed, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interrupted_run(task_id: &str) -> (CouncilSpec, Task, DeliberationRecord, Vec<LlmCall>) {
        let role: council_councils::Role = "DEV".parse().expect("role");
        let mut council = council_councils::personas::council_of(&role, 2).expect("council");
        council.config.rounds = 1;
        let task = Task::new(
            council_councils::TaskId::new(task_id.to_owned()).expect("id"),
            "Pick a cache.",
        )
        .expect("task");
        let (mut d, _) = deliberation(council.clone(), task.clone());
        let council_councils::Step::Calls(proposals) = d.step(Vec::new()).expect("first step")
        else {
            panic!("calls expected")
        };
        let replies = proposals
            .iter()
            .map(|c| council_councils::Reply {
                call: c.id,
                result: Ok(council_councils::Completion {
                    text: format!("proposal {}", c.id),
                    prompt_tokens: 10,
                    completion_tokens: 5,
                    choice_logprobs: None,
                }),
            })
            .collect();
        let council_councils::Step::Calls(critiques) = d.step(replies).expect("second step") else {
            panic!("calls expected")
        };
        let record = DeliberationRecord {
            task_id: task_id.into(),
            status: DeliberationStatus::Failed as i32,
            retryable: true,
            checkpoint: serde_json::to_vec(&d.checkpoint()).expect("json"),
            ..Default::default()
        };
        (council, task, record, critiques)
    }

    #[test]
    fn an_interrupted_run_resumes_from_its_checkpoint_and_a_foreign_one_starts_over() {
        let (council, task, record, critiques) = interrupted_run("resume-me");
        let (_, _, pending) =
            resume_or_start(council.clone(), task.clone(), Some(record.clone()), 1);
        assert_eq!(
            pending.as_ref(),
            Some(&critiques),
            "resumes waiting for the same critique calls"
        );

        // Completed, live or checkpoint-less records, and another task's checkpoint: fresh.
        let mut completed = record.clone();
        completed.status = DeliberationStatus::Completed as i32;
        let mut live = record.clone();
        live.status = DeliberationStatus::InProgress as i32;
        live.deadline_at_ms = i64::MAX / 2;
        let mut empty = record.clone();
        empty.checkpoint.clear();
        let (_, _, other_task, _) = interrupted_run("someone-else");
        let foreign = DeliberationRecord {
            checkpoint: other_task.checkpoint,
            ..record.clone()
        };
        let mut garbage = record;
        garbage.checkpoint = b"{not json".to_vec();
        for previous in [completed, live, empty, foreign, garbage] {
            let (_, _, pending) = resume_or_start(council.clone(), task.clone(), Some(previous), 1);
            assert!(pending.is_none());
        }
    }
}
