//! Dispatch settings: streams, subjects, the consumer and the worker's limits.

use std::time::Duration;

use super::setup;

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

    pub(super) fn captured(&self, subject: &str) -> bool {
        setup::covers(&self.events_subjects, subject)
    }
}
