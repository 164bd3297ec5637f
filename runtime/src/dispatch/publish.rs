//! Publishing a task's terminal event: under the task's id as `Nats-Msg-Id`, confirmed, then
//! marked in the record; past the duplicate window the events stream is searched first.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use bytes::Bytes;
use council_proto::fleet::orchestrator::v1 as pb;
use council_proto::fleet::orchestrator::v1::DeliberationStatus;
use tokio_stream::StreamExt;

use super::event::EventContext;
use super::task::Task;
use crate::nats::error_chain;
use crate::run::RunRequest;
use crate::run::error::RunError;
use crate::store::now_ms;
use council_proto::council::store::v1::DeliberationRecord;

use super::{Delivery, Dispatcher, Disposition, event, task};

/// Tries of marking a record published (0.25 s more wait after each: about 5 s in all).
const MARK_ATTEMPTS: u32 = 6;

/// Why a publish failed.
#[derive(Debug, Clone)]
pub(super) struct PublishFailure {
    /// The server or the stream refused the message itself: it would be refused again.
    pub(super) refused: bool,
    pub(super) reason: String,
}

/// Whose terminal event is published, and where.
#[derive(Debug, Clone, Copy)]
pub(super) struct Target<'a> {
    pub(super) id: &'a str,
    pub(super) role: &'a str,
    pub(super) result_subject: Option<&'a str>,
    /// The tasks stream's sequence of the bad message this event answers (0: a valid task).
    pub(super) rejected: u64,
}

impl<'a> Target<'a> {
    pub(super) fn of(task: &'a Task) -> Self {
        Self {
            id: task.id(),
            role: &task.role,
            result_subject: task.message.result_subject.as_deref(),
            rejected: 0,
        }
    }
}

impl Dispatcher {
    /// Publishes the terminal event of `task` unless it is out already, marks the record,
    /// and returns `then` (or a retry when NATS would not take it).
    pub(super) async fn finish(
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
    pub(super) async fn mark_published(&self, id: &str, role: &str, sequence: u64, rejected: u64) {
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
    pub(super) async fn publish(
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
    pub(super) async fn find_event(
        &self,
        task_id: &str,
        since_ms: i64,
    ) -> Result<Option<u64>, String> {
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
}

#[tonic::async_trait]
impl crate::run::ResultSink for Dispatcher {
    /// A background deliberation's terminal event, published as a dispatched task's is
    /// (`Nats-Msg-Id` = task id, on the completed or failed subject), and its record marked.
    async fn publish_result(
        &self,
        request: &RunRequest,
        result: &Result<pb::DeliberateResponse, RunError>,
    ) {
        let correlation: std::collections::BTreeMap<String, String> =
            request.task.metadata.iter().cloned().collect();
        let task_id = request.task_id();
        let role = request.role.to_string();
        let ctx = EventContext {
            task_id: task_id.to_owned(),
            story_id: correlation.get("story_id").cloned().unwrap_or_default(),
            role: role.clone(),
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
        match self.publish(subject, task_id, body).await {
            Ok(ack) => {
                self.mark_published(task_id, &role, ack.sequence, 0).await;
            }
            Err(e) => {
                tracing::error!(task_id = %task_id, error = %e.reason, "could not publish a background deliberation's result; GetDeliberationResult still serves it");
            }
        }
    }
}
