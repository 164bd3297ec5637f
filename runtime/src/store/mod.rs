//! Persistent state behind one trait, [`CouncilStore`]: the councils (one per role) and a record
//! of every accepted deliberation. Backends: [`FileStore`], embedded and crash-safe, for one
//! process; and a NATS JetStream key-value store for several replicas.

mod dto;
mod file;
mod kv;

use std::fmt;

use council_councils::personas::default_council;
use council_councils::{CouncilSpec, Role};
use council_proto::council::store::v1::DeliberationRecord;
use council_proto::fleet::orchestrator::v1::DeliberationStatus;

pub use dto::CouncilDto;
pub use file::FileStore;
pub use kv::{KvConfig, KvStore};

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a council for role {role} already exists with a different spec")]
    AlreadyExists { role: Role },
    #[error("no council for role {role}")]
    NotFound { role: Role },
    /// A compare-and-set lost: someone else changed the council first.
    #[error("the council of role {role} changed concurrently; read it again and retry")]
    Conflict { role: Role },
    #[error("store {store}: {reason}")]
    Unavailable { store: String, reason: String },
    #[error("store {store} is corrupt: {reason}")]
    Corrupt { store: String, reason: String },
}

/// Whether `create` made something new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    /// The same spec was already there.
    Unchanged,
}

/// What [`CouncilStore::claim`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The new record was written: the caller runs the deliberation. `replaced` is the
    /// failed, timed-out or interrupted record it took the place of (its checkpoint may let the
    /// new run resume).
    Claimed {
        replaced: Option<Box<DeliberationRecord>>,
        /// The revision of the new record: its owner's writes are compare-and-set on it.
        revision: u64,
    },
    /// The task already has a live or completed record (as of now); nothing was written.
    Existing(Box<DeliberationRecord>),
}

/// A record and its revision in the store (for [`CouncilStore::write_record_at`]).
pub type Versioned = (DeliberationRecord, u64);

/// Where councils and deliberation records live.
#[tonic::async_trait]
pub trait CouncilStore: Send + Sync + fmt::Debug {
    async fn list(&self) -> Result<Vec<CouncilSpec>, StoreError>;
    async fn get(&self, role: &Role) -> Result<Option<CouncilSpec>, StoreError>;
    /// Idempotent: the same spec again is `Unchanged`; another spec for the role is `AlreadyExists`.
    async fn create(&self, spec: CouncilSpec) -> Result<Created, StoreError>;
    async fn delete(&self, role: &Role) -> Result<CouncilSpec, StoreError>;
    /// Compare-and-set: replaces the council of `new.role` only while it still equals
    /// `expected`; otherwise `Conflict` (or `NotFound` when it is gone).
    async fn replace(&self, expected: &CouncilSpec, new: CouncilSpec) -> Result<(), StoreError>;

    /// The record of a task as stored (see [`effective`] for how to read it).
    async fn record(&self, task_id: &str) -> Result<Option<DeliberationRecord>, StoreError> {
        Ok(self.record_at(task_id).await?.map(|(r, _)| r))
    }
    /// The record of a task with its revision.
    async fn record_at(&self, task_id: &str) -> Result<Option<Versioned>, StoreError>;
    /// Writes `record` as its task's record unless the task already has one that is live or
    /// completed (see [`claimable`]), atomically.
    async fn claim(&self, record: DeliberationRecord, now_ms: i64) -> Result<Claim, StoreError>;
    /// Compare-and-set: writes `record` only while its task's record is still at `revision`
    /// (0: only while the task has none). The new revision, or `None` when the record changed,
    /// appeared or went in the meantime: then someone else owns it and the caller must not
    /// write it. There is no unconditional write.
    async fn write_record_at(
        &self,
        record: DeliberationRecord,
        revision: u64,
    ) -> Result<Option<u64>, StoreError>;
    /// Saves the checkpoint of a task's run beside its record, so that heartbeats need not
    /// rewrite it; runs save it only when it changed. Any checkpoint of a task is a valid
    /// prefix of its deterministic deliberation, so whoever writes last is right.
    async fn write_checkpoint(&self, task_id: &str, checkpoint: Vec<u8>) -> Result<(), StoreError>;
    /// The checkpoint last saved for a task.
    async fn read_checkpoint(&self, task_id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Deletes finished records last updated before `before_ms`; returns how many went.
    async fn purge_records(&self, before_ms: i64) -> Result<usize, StoreError>;

    /// Whether the store can answer now (for readiness); the reason when not.
    fn health(&self) -> Result<(), String>;
}

/// How long past its deadline a live record may stay live before readers call it interrupted:
/// covers the shutdown grace period and clock skew between replicas.
pub const STALE_AFTER_MS: i64 = 60_000;

fn is_active(status: i32) -> bool {
    status == DeliberationStatus::Pending as i32 || status == DeliberationStatus::InProgress as i32
}

/// Whether a new run may replace `existing`: it failed, timed out, or was interrupted.
pub fn claimable(existing: &DeliberationRecord, now_ms: i64) -> bool {
    let record = effective(existing.clone(), now_ms);
    record.status == DeliberationStatus::Failed as i32
        || record.status == DeliberationStatus::Timeout as i32
        || record.status == DeliberationStatus::Unknown as i32
}

/// Whether a live record's owner went silent: no heartbeat for three periods, or (without
/// heartbeats) long past its deadline.
fn is_abandoned(record: &DeliberationRecord, now_ms: i64) -> bool {
    let silent = record.heartbeat_ms > 0
        && now_ms
            > record
                .updated_at_ms
                .saturating_add(record.heartbeat_ms.saturating_mul(3));
    silent || now_ms > record.deadline_at_ms.saturating_add(STALE_AFTER_MS)
}

/// The record as a reader should see it: one still live whose owner went silent belonged to a
/// process that died, so it is failed (retryable) rather than "in progress" forever.
pub fn effective(mut record: DeliberationRecord, now_ms: i64) -> DeliberationRecord {
    if is_active(record.status) && is_abandoned(&record, now_ms) {
        record.status = DeliberationStatus::Failed as i32;
        record.retryable = true;
        record.error_message = format!(
            "interrupted: the process running it ({}) stopped before it finished",
            record.instance_id
        );
    }
    record
}

/// Marks a record interrupted now (used by an exclusive store at start for its leftovers).
pub fn interrupted(mut record: DeliberationRecord, now_ms: i64) -> DeliberationRecord {
    record.status = DeliberationStatus::Failed as i32;
    record.retryable = true;
    record.updated_at_ms = now_ms;
    record.error_message = format!(
        "interrupted: the service ({}) restarted before it finished",
        record.instance_id
    );
    record
}

/// Whether the record is finished (kept until retention removes it).
pub fn is_finished(record: &DeliberationRecord) -> bool {
    !is_active(record.status)
}

/// Creates the default council of every built-in role that has none; never touches existing ones.
pub async fn apply_default_councils(store: &dyn CouncilStore) -> Result<usize, StoreError> {
    let mut created = 0;
    for role in Role::BUILT_IN {
        if store.get(&role).await?.is_none() {
            let spec = default_council(&role).map_err(|e| StoreError::Corrupt {
                store: "<default councils>".into(),
                reason: e.to_string(),
            })?;
            if store.create(spec).await? == Created::New {
                created += 1;
            }
        }
    }
    Ok(created)
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
