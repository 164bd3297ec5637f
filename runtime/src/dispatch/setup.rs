//! Start-up: the three streams and the durable pull consumer exist with the configured
//! settings, made idempotently by the service itself (no init job). A stream on memory storage,
//! a stream that does not capture our subjects, or an existing consumer configured otherwise
//! stops start-up with a message saying what differs.

use std::time::Duration;

use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::stream::{self, StorageType};

use super::DispatchConfig;
use crate::nats::error_chain;

/// Why start-up stopped.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("consumer {consumer} on stream {stream}: {reason}")]
    Consumer {
        stream: String,
        consumer: String,
        reason: String,
    },
}

/// Whether NATS subject pattern `pattern` (with `*` and `>`) covers every subject `wanted`
/// (itself possibly a pattern) can match.
pub fn covers(pattern: &str, wanted: &str) -> bool {
    let mut p = pattern.split('.');
    let mut w = wanted.split('.');
    loop {
        match (p.next(), w.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// One stream we need: its name, the subjects it must capture, and how it is made if missing.
struct Wanted {
    name: String,
    subjects: Vec<String>,
    description: &'static str,
    duplicate_window: Duration,
}

async fn ensure_stream(
    js: &async_nats::jetstream::Context,
    w: Wanted,
) -> Result<stream::Stream, SetupError> {
    let fail = |reason: String| SetupError::Stream {
        stream: w.name.clone(),
        reason,
    };
    let config = stream::Config {
        name: w.name.clone(),
        description: Some(w.description.into()),
        subjects: w.subjects.clone(),
        storage: StorageType::File,
        duplicate_window: w.duplicate_window,
        ..Default::default()
    };
    let mut stream = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| fail(error_chain(&e)))?;
    let info = stream.info().await.map_err(|e| fail(error_chain(&e)))?;
    if info.config.storage == StorageType::Memory {
        return Err(fail(
            "is on memory storage and would lose messages on a restart; recreate it with file storage".into(),
        ));
    }
    for subject in &w.subjects {
        if !info.config.subjects.iter().any(|s| covers(s, subject)) {
            return Err(fail(format!(
                "exists with subjects {:?}, which do not capture {subject}; add it or use another stream name",
                info.config.subjects
            )));
        }
    }
    if info.config.duplicate_window < w.duplicate_window {
        tracing::warn!(
            stream = %w.name,
            existing_ms = info.config.duplicate_window.as_millis() as u64,
            configured_ms = w.duplicate_window.as_millis() as u64,
            "stream has a shorter duplicate window than configured; the records still guard against duplicates"
        );
    }
    Ok(stream)
}

/// The consumer settings we rely on; compared field by field with an existing consumer.
fn consumer_config(c: &DispatchConfig) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(c.consumer.clone()),
        description: Some("council workers: deliberation tasks".into()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: c.ack_wait,
        max_deliver: c.max_deliver,
        max_ack_pending: c.max_ack_pending,
        ..Default::default()
    }
}

/// What differs between the consumer as it exists and as configured.
fn differences(existing: &consumer::Config, wanted: &consumer::pull::Config) -> Vec<String> {
    let mut d = Vec::new();
    if existing.deliver_subject.is_some() {
        d.push("it is a push consumer (this service needs a pull consumer)".to_owned());
    }
    if existing.ack_policy != wanted.ack_policy {
        d.push(format!(
            "ack_policy {:?} (configured {:?})",
            existing.ack_policy, wanted.ack_policy
        ));
    }
    if existing.ack_wait != wanted.ack_wait {
        d.push(format!(
            "ack_wait {:?} (configured {:?})",
            existing.ack_wait, wanted.ack_wait
        ));
    }
    if existing.max_deliver != wanted.max_deliver {
        d.push(format!(
            "max_deliver {} (configured {})",
            existing.max_deliver, wanted.max_deliver
        ));
    }
    if existing.max_ack_pending != wanted.max_ack_pending {
        d.push(format!(
            "max_ack_pending {} (configured {})",
            existing.max_ack_pending, wanted.max_ack_pending
        ));
    }
    if !existing.backoff.is_empty() {
        d.push(format!(
            "backoff {:?} (must be empty: it would replace ack_wait)",
            existing.backoff
        ));
    }
    if !existing.filter_subject.is_empty() {
        d.push(format!(
            "filter_subject {:?} (configured none)",
            existing.filter_subject
        ));
    }
    if existing.deliver_policy != wanted.deliver_policy {
        d.push(format!(
            "deliver_policy {:?} (configured {:?})",
            existing.deliver_policy, wanted.deliver_policy
        ));
    }
    d
}

/// The streams and the consumer, ready: returns the consumer the workers pull from.
pub async fn ensure(
    js: &async_nats::jetstream::Context,
    c: &DispatchConfig,
) -> Result<PullConsumer, SetupError> {
    let tasks = ensure_stream(
        js,
        Wanted {
            name: c.tasks_stream.clone(),
            subjects: vec![format!("{}.>", c.tasks_prefix)],
            description: "council: deliberation tasks",
            duplicate_window: c.duplicate_window,
        },
    )
    .await?;
    ensure_stream(
        js,
        Wanted {
            name: c.events_stream.clone(),
            subjects: vec![c.events_subjects.clone()],
            description: "orchestrator events (council results)",
            duplicate_window: c.duplicate_window,
        },
    )
    .await?;
    ensure_stream(
        js,
        Wanted {
            name: c.dlq_stream.clone(),
            subjects: vec![c.dlq_subject.clone()],
            description: "council: dead-lettered tasks",
            duplicate_window: c.duplicate_window,
        },
    )
    .await?;
    let wanted = consumer_config(c);
    let fail = |reason: String| SetupError::Consumer {
        stream: c.tasks_stream.clone(),
        consumer: c.consumer.clone(),
        reason,
    };
    // Look first: creating over an existing consumer with other settings would change it.
    match tasks.consumer_info(&c.consumer).await {
        Ok(info) => {
            let d = differences(&info.config, &wanted);
            if !d.is_empty() {
                return Err(fail(format!(
                    "exists with other settings: {}; delete it (nats consumer rm) or change the config to match",
                    d.join("; ")
                )));
            }
        }
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {}
        Err(e) => return Err(fail(error_chain(&e))),
    }
    let consumer: PullConsumer = tasks
        .create_consumer(wanted.clone())
        .await
        .map_err(|e| fail(error_chain(&e)))?;
    let d = differences(&consumer.cached_info().config, &wanted);
    if !d.is_empty() {
        return Err(fail(format!(
            "the server did not take the settings: {}",
            d.join("; ")
        )));
    }
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_coverage() {
        assert!(covers(
            "orchestration.>",
            "orchestration.deliberation.completed"
        ));
        assert!(covers("orchestration.>", "orchestration.>"));
        assert!(covers(">", "council.tasks.>"));
        assert!(covers("council.tasks.>", "council.tasks.>"));
        assert!(covers("council.*.*", "council.tasks.DEV"));
        assert!(covers("council.tasks.*", "council.tasks.*"));
        assert!(!covers("council.tasks.*", "council.tasks.>"));
        assert!(!covers("council.tasks.DEV", "council.tasks.>"));
        assert!(!covers("orchestration.>", "orchestration"));
        assert!(!covers(
            "orchestration.deliberation",
            "orchestration.deliberation.completed"
        ));
        assert!(!covers("agile.>", "orchestration.deliberation.completed"));
    }

    #[test]
    fn a_consumer_configured_otherwise_is_described() {
        let c = DispatchConfig::default();
        let wanted = consumer_config(&c);
        let same = consumer::IntoConsumerConfig::into_consumer_config(wanted.clone());
        assert!(differences(&same, &wanted).is_empty());
        let mut other = same.clone();
        other.ack_wait = Duration::from_secs(30);
        other.max_deliver = -1;
        other.backoff = vec![Duration::from_secs(1)];
        other.deliver_subject = Some("push.here".into());
        let d = differences(&other, &wanted).join("; ");
        for needle in ["push consumer", "ack_wait", "max_deliver -1", "backoff"] {
            assert!(d.contains(needle), "{needle}: {d}");
        }
    }
}
