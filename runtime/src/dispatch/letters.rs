//! Dead letters and failed events: a task that cannot be run, a bad message, the last
//! delivery of one that keeps failing.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use council_proto::fleet::orchestrator::v1::DeliberationStatus;

use super::event::{DeadLetter, EventContext, Original};
use super::task::{Task, TaskError};
use crate::store::{StoreError, now_ms};
use council_proto::council::store::v1::DeliberationRecord;

use super::publish::Target;
use super::{Cause, Delivery, Dispatcher, Disposition, panic_text, task};

/// Room left in a dead letter's message for its headers.
const LETTER_HEADROOM: usize = 1024;

impl Dispatcher {
    /// Dead-letters a task on its last delivery, waiting out NATS trouble in place (the dead
    /// letter's id makes a second copy a duplicate) until it is out or the process stops.
    pub(super) async fn dead_end_in_place(
        &self,
        task: &Task,
        msg: &Delivery,
        reason: String,
    ) -> Disposition {
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

    /// What ends a message after this process failed at handling it (a panic): its dead letter
    /// and, for a valid task, its failed event. Runs in a task of its own, so that a second
    /// panic only hands the delivery back.
    pub(super) async fn last_resort(
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

    /// A dead letter for this delivery.
    pub(super) fn letter(
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
    pub(super) fn max_letter_bytes(&self) -> usize {
        (self.client.server_info().max_payload).saturating_sub(LETTER_HEADROOM)
    }

    /// A valid task that will not complete: its dead letter, its failed event, then `Term`.
    pub(super) async fn dead_end(
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

    /// A message that is not a valid task: its dead letter, then `Term`. When its task id can
    /// be read and no task holds that id, a failed event under that id too: the id is taken
    /// first with a record of this message (created only where none exists), so the event of
    /// a message we could not read never takes the place of, or marks, a task we accepted.
    pub(super) async fn reject(&self, e: &TaskError, msg: &Delivery) -> Disposition {
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

    pub(super) async fn reject_once(&self, e: &TaskError, msg: &Delivery) -> Disposition {
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
    pub(super) async fn dead_letter(&self, letter: &DeadLetter, msg: &Delivery) -> bool {
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
}
