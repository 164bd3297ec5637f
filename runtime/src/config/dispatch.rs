//! `[dispatch]`: task dispatch over NATS JetStream (docs/DISPATCH.md).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, err};
use crate::dispatch::DispatchConfig;
use crate::dispatch::setup::covers;

super::section! {
    /// `[dispatch]`: the two fields with a flag also read a `COUNCIL_*` variable; the others
    /// are TOML keys only.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
    #[serde(deny_unknown_fields, default)]
    pub struct RawDispatch {
        /// [dispatch.enabled] Take deliberation tasks from JetStream (see docs/DISPATCH.md).
        #[arg(long = "dispatch", id = "dispatch", env = "COUNCIL_DISPATCH", value_name = "BOOL")]
        pub enabled: Option<bool> = false,
        #[arg(skip)]
        pub tasks_stream: Option<String>,
        #[arg(skip)]
        pub tasks_prefix: Option<String>,
        #[arg(skip)]
        pub consumer: Option<String>,
        #[arg(skip)]
        pub events_stream: Option<String>,
        #[arg(skip)]
        pub events_subjects: Option<String>,
        #[arg(skip)]
        pub completed_subject: Option<String>,
        #[arg(skip)]
        pub failed_subject: Option<String>,
        /// Progress events go here when set ("" or absent: off).
        #[arg(skip)]
        pub progress_subject: Option<String>,
        #[arg(skip)]
        pub dlq_stream: Option<String>,
        #[arg(skip)]
        pub dlq_subject: Option<String>,
        #[arg(skip)]
        pub max_deliver: Option<i64>,
        #[arg(skip)]
        pub ack_wait_secs: Option<u64>,
        #[arg(skip)]
        pub max_ack_pending: Option<i64>,
        /// [dispatch.in_flight] Tasks this replica works on at once; unset, never more than
        /// limits.max_concurrent.
        #[arg(
            long = "dispatch-in-flight",
            id = "dispatch_in_flight",
            value_name = "DISPATCH_IN_FLIGHT",
            env = "COUNCIL_DISPATCH_IN_FLIGHT"
        )]
        pub in_flight: Option<usize> = DispatchConfig::default().in_flight,
        #[arg(skip)]
        pub max_task_bytes: Option<usize>,
        #[arg(skip)]
        pub nak_delay_ms: Option<u64>,
        #[arg(skip)]
        pub max_nak_delay_secs: Option<u64>,
        #[arg(skip)]
        pub duplicate_window_secs: Option<u64>,
    }
}

/// A stream name: letters, digits, '_' and '-'.
fn stream_name(field: &str, v: Option<String>, default: &str) -> Result<String, ConfigError> {
    let v = v.unwrap_or_else(|| default.to_owned());
    if v.is_empty()
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(err(
            field,
            format!("{v:?}: use letters, digits, '_' and '-'"),
        ));
    }
    Ok(v)
}

/// A subject: dot-separated non-empty tokens without spaces; wildcards only when `pattern`.
fn subject(
    field: &str,
    v: Option<String>,
    default: &str,
    pattern: bool,
) -> Result<String, ConfigError> {
    let v = v.unwrap_or_else(|| default.to_owned());
    let tokens: Vec<&str> = v.split('.').collect();
    let bad_token = |t: &&str| {
        t.is_empty()
            || t.bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
            || ((t.contains('*') || t.contains('>')) && !(pattern && (*t == "*" || *t == ">")))
    };
    if tokens.iter().any(bad_token) || tokens[..tokens.len() - 1].contains(&">") {
        return Err(err(
            field,
            format!(
                "{v:?} is not a valid NATS subject{}",
                if pattern {
                    " pattern"
                } else {
                    " (no wildcards)"
                }
            ),
        ));
    }
    Ok(v)
}

pub fn dispatch(
    d: RawDispatch,
    max_concurrent: usize,
) -> Result<Option<DispatchConfig>, ConfigError> {
    if !d.enabled() {
        if d != (RawDispatch {
            enabled: d.enabled,
            ..Default::default()
        }) {
            return Err(err(
                "dispatch.enabled",
                "dispatch settings are given but dispatch.enabled is not true",
            ));
        }
        return Ok(None);
    }
    let def = DispatchConfig::default();
    let c = DispatchConfig {
        tasks_stream: stream_name("dispatch.tasks_stream", d.tasks_stream, &def.tasks_stream)?,
        tasks_prefix: subject(
            "dispatch.tasks_prefix",
            d.tasks_prefix,
            &def.tasks_prefix,
            false,
        )?,
        consumer: stream_name("dispatch.consumer", d.consumer, &def.consumer)?,
        events_stream: stream_name(
            "dispatch.events_stream",
            d.events_stream,
            &def.events_stream,
        )?,
        events_subjects: subject(
            "dispatch.events_subjects",
            d.events_subjects,
            &def.events_subjects,
            true,
        )?,
        completed_subject: subject(
            "dispatch.completed_subject",
            d.completed_subject,
            &def.completed_subject,
            false,
        )?,
        failed_subject: subject(
            "dispatch.failed_subject",
            d.failed_subject,
            &def.failed_subject,
            false,
        )?,
        progress_subject: match d.progress_subject.filter(|s| !s.is_empty()) {
            Some(s) => Some(subject("dispatch.progress_subject", Some(s), "", false)?),
            None => None,
        },
        dlq_stream: stream_name("dispatch.dlq_stream", d.dlq_stream, &def.dlq_stream)?,
        dlq_subject: subject(
            "dispatch.dlq_subject",
            d.dlq_subject,
            &def.dlq_subject,
            false,
        )?,
        max_deliver: d.max_deliver.unwrap_or(def.max_deliver),
        ack_wait: d.ack_wait_secs.map_or(def.ack_wait, Duration::from_secs),
        max_ack_pending: d.max_ack_pending.unwrap_or(def.max_ack_pending),
        in_flight: d.in_flight.unwrap_or(def.in_flight.min(max_concurrent)),
        max_task_bytes: d.max_task_bytes.unwrap_or(def.max_task_bytes),
        nak_delay: d.nak_delay_ms.map_or(def.nak_delay, Duration::from_millis),
        max_nak_delay: d
            .max_nak_delay_secs
            .map_or(def.max_nak_delay, Duration::from_secs),
        duplicate_window: d
            .duplicate_window_secs
            .map_or(def.duplicate_window, Duration::from_secs),
    };
    let tasks = format!("{}.>", c.tasks_prefix);
    for (field, s) in [
        ("dispatch.completed_subject", &c.completed_subject),
        ("dispatch.failed_subject", &c.failed_subject),
    ]
    .into_iter()
    .chain(
        c.progress_subject
            .as_ref()
            .map(|p| ("dispatch.progress_subject", p)),
    ) {
        if !covers(&c.events_subjects, s) {
            return Err(err(
                field,
                format!(
                    "{s} is not captured by dispatch.events_subjects ({}): its events would be lost",
                    c.events_subjects
                ),
            ));
        }
    }
    if covers(&c.events_subjects, &tasks) || covers(&tasks, &c.events_subjects) {
        return Err(err(
            "dispatch.events_subjects",
            format!("{} overlaps the tasks subjects {tasks}", c.events_subjects),
        ));
    }
    if covers(&tasks, &c.dlq_subject) || covers(&c.events_subjects, &c.dlq_subject) {
        return Err(err(
            "dispatch.dlq_subject",
            format!("{} overlaps the tasks or events subjects", c.dlq_subject),
        ));
    }
    if c.events_stream == c.tasks_stream
        || c.dlq_stream == c.tasks_stream
        || c.dlq_stream == c.events_stream
    {
        return Err(err(
            "dispatch.dlq_stream",
            "tasks, events and DLQ streams need three different names",
        ));
    }
    if !(1..=100).contains(&c.max_deliver) {
        return Err(err(
            "dispatch.max_deliver",
            format!("{} is outside 1..=100", c.max_deliver),
        ));
    }
    if c.ack_wait < Duration::from_secs(1) || c.ack_wait > Duration::from_secs(3600) {
        return Err(err(
            "dispatch.ack_wait_secs",
            format!("{:?} is outside 1..=3600 s", c.ack_wait),
        ));
    }
    if c.in_flight == 0 || c.in_flight > max_concurrent {
        return Err(err(
            "dispatch.in_flight",
            format!(
                "{} must be in 1..=limits.max_concurrent ({max_concurrent})",
                c.in_flight
            ),
        ));
    }
    if c.max_ack_pending < c.in_flight as i64 {
        return Err(err(
            "dispatch.max_ack_pending",
            format!(
                "{} is below dispatch.in_flight ({})",
                c.max_ack_pending, c.in_flight
            ),
        ));
    }
    if !(1024..=8 << 20).contains(&c.max_task_bytes) {
        return Err(err(
            "dispatch.max_task_bytes",
            format!("{} is outside 1024..=8388608", c.max_task_bytes),
        ));
    }
    if c.nak_delay.is_zero() || c.max_nak_delay < c.nak_delay {
        return Err(err(
            "dispatch.max_nak_delay_secs",
            "needs 0 < dispatch.nak_delay_ms <= dispatch.max_nak_delay_secs",
        ));
    }
    if c.duplicate_window < Duration::from_secs(1) {
        return Err(err("dispatch.duplicate_window_secs", "must be at least 1"));
    }
    Ok(Some(c))
}
