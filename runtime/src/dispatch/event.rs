//! What the worker publishes: the terminal event of a task (`council.event.v1`, completed or
//! failed, with the fields upstream consumers read), progress events, and dead letters
//! (`council.dlq.v1`). Documented in docs/DISPATCH.md.

use std::collections::BTreeMap;

use base64::Engine;
use council_proto::fleet::orchestrator::v1 as pb;
use serde::Serialize;

use crate::run::RunProgress;

pub const EVENT_SCHEMA: &str = "council.event.v1";
pub const DLQ_SCHEMA: &str = "council.dlq.v1";

/// A completed or failed task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskEvent {
    pub schema: &'static str,
    /// `deliberation.completed` or `deliberation.failed`.
    pub event_type: &'static str,
    pub task_id: String,
    /// From `correlation.story_id`; empty when the task had none.
    pub story_id: String,
    pub role: String,
    /// Wall-clock ISO-8601 (UTC, milliseconds).
    pub timestamp: String,
    /// The ranked proposals, winner first (empty when failed).
    pub decisions: Vec<Decision>,
    pub correlation: BTreeMap<String, String>,
    /// The whole outcome (completed only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// Why it failed (failed only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
    /// Which delivery of the task message produced this event.
    pub delivery: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub rank: i32,
    pub author_id: String,
    pub author_role: String,
    pub score: f64,
    pub winner: bool,
    pub answer: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub winner_id: String,
    pub duration_ms: i64,
    pub execution_id: String,
    pub margin: f64,
    pub stop_reason: String,
    pub rounds_run: i32,
    pub majority_answer: String,
    pub calls: i64,
    pub failed_calls: i64,
    pub failed_judgements: i64,
    pub rankings_asked: i64,
    pub rankings_read: i64,
    pub scores_asked: i64,
    pub scores_read: i64,
    pub decided_by: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub proposals: Vec<ProposalOut>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProposalOut {
    pub author_id: String,
    pub author_role: String,
    pub content: String,
    pub revisions: Vec<String>,
    pub score: f64,
    pub rank: i32,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    /// `dead_lettered`, `retries_exhausted`, `invalid`, `unknown_council`, …
    pub code: String,
    pub message: String,
    pub attempts: u64,
}

/// A deliberation step, when progress events are on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProgressEvent {
    pub schema: &'static str,
    pub event_type: &'static str,
    pub task_id: String,
    pub story_id: String,
    pub status: String,
    pub progress_percent: i32,
    pub current_step: String,
    pub current_agent: String,
    pub timestamp: String,
}

/// A message that will not be processed: the original (base64, with its subject), the reason
/// and the delivery count. It always fits the server's payload limit: the copy of the original
/// is cut to what fits (`original_truncated`), its full size is in `original_bytes`, and the
/// original stays in the tasks stream at `original_stream_sequence` until its retention ends.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub schema: &'static str,
    /// `oversized`, `malformed`, `schema_invalid`, `unknown_council`, `invalid`,
    /// `retries_exhausted`, `failed`, `internal`.
    pub reason_class: String,
    pub reason: String,
    pub task_id: Option<String>,
    pub original_subject: String,
    pub original_stream_sequence: u64,
    /// The size of the original message.
    pub original_bytes: usize,
    /// Whether `original_base64` holds only the first part of it.
    pub original_truncated: bool,
    pub original_base64: String,
    pub deliveries: u64,
    pub timestamp: String,
    pub instance: String,
}

/// Longest reason a dead letter carries, in bytes.
const MAX_REASON: usize = 4096;

/// Where a dead letter came from: the message as received.
#[derive(Debug, Clone, Copy)]
pub struct Original<'a> {
    pub subject: &'a str,
    pub sequence: u64,
    pub payload: &'a [u8],
    pub deliveries: u64,
}

impl DeadLetter {
    /// A dead letter whose JSON is at most `max_bytes` long (at least 1 KiB): the reason is
    /// cut to a quarter of that, the copy of the original to what is left.
    pub fn new(
        reason_class: &str,
        reason: String,
        task_id: Option<String>,
        original: Original<'_>,
        instance: &str,
        max_bytes: usize,
    ) -> Self {
        let mut letter = Self {
            schema: DLQ_SCHEMA,
            reason_class: reason_class.to_owned(),
            // A quarter of the room at most, so a small server limit still takes the letter.
            reason: truncate_utf8(reason, MAX_REASON.min(max_bytes / 4)),
            task_id,
            original_subject: original.subject.to_owned(),
            original_stream_sequence: original.sequence,
            original_bytes: original.payload.len(),
            original_truncated: false,
            original_base64: String::new(),
            deliveries: original.deliveries,
            timestamp: iso8601(crate::store::now_ms()),
            instance: instance.to_owned(),
        };
        // The rest of the letter, with `true` in place of `false` (one byte more) so the
        // truncated form is counted.
        let rest = serde_json::to_vec(&letter).map_or(0, |v| v.len()) + 1;
        let room = max_bytes.saturating_sub(rest) / 4 * 3;
        let kept = original.payload.len().min(room);
        letter.original_truncated = kept < original.payload.len();
        letter.original_base64 =
            base64::engine::general_purpose::STANDARD.encode(&original.payload[..kept]);
        letter
    }
}

/// `s` cut to at most `max` bytes at a character boundary, with `…` when cut.
fn truncate_utf8(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
    s
}

/// The context every event of one task shares.
#[derive(Debug, Clone, PartialEq)]
pub struct EventContext {
    pub task_id: String,
    pub story_id: String,
    pub role: String,
    pub correlation: BTreeMap<String, String>,
    pub delivery: u64,
}

impl EventContext {
    fn event(&self, event_type: &'static str) -> TaskEvent {
        TaskEvent {
            schema: EVENT_SCHEMA,
            event_type,
            task_id: self.task_id.clone(),
            story_id: self.story_id.clone(),
            role: self.role.clone(),
            timestamp: iso8601(crate::store::now_ms()),
            decisions: Vec::new(),
            correlation: self.correlation.clone(),
            outcome: None,
            error: None,
            delivery: self.delivery,
        }
    }

    pub fn completed(&self, r: &pb::DeliberateResponse) -> TaskEvent {
        let mut e = self.event("deliberation.completed");
        let proposal = |d: &pb::DeliberationResult| d.proposal.clone().unwrap_or_default();
        e.decisions = r
            .results
            .iter()
            .map(|d| {
                let p = proposal(d);
                Decision {
                    rank: d.rank,
                    winner: p.author_id == r.winner_id,
                    author_id: p.author_id,
                    author_role: p.author_role,
                    score: d.score,
                    answer: d.answer.clone(),
                    content: p.content,
                }
            })
            .collect();
        let s = r.summary.clone().unwrap_or_default();
        e.outcome = Some(Outcome {
            winner_id: r.winner_id.clone(),
            duration_ms: r.duration_ms,
            execution_id: r
                .metadata
                .as_ref()
                .map(|m| m.execution_id.clone())
                .unwrap_or_default(),
            margin: s.margin,
            stop_reason: s.stop_reason,
            rounds_run: s.rounds_run,
            majority_answer: s.majority_answer,
            calls: s.calls,
            failed_calls: s.failed_calls,
            failed_judgements: s.failed_judgements,
            rankings_asked: s.rankings_asked,
            rankings_read: s.rankings_read,
            scores_asked: s.scores_asked,
            scores_read: s.scores_read,
            decided_by: s.decided_by,
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
            proposals: r
                .results
                .iter()
                .map(|d| {
                    let p = proposal(d);
                    ProposalOut {
                        author_id: p.author_id,
                        author_role: p.author_role,
                        content: p.content,
                        revisions: p.revisions,
                        score: d.score,
                        rank: d.rank,
                        created_at_ms: p.created_at_ms,
                    }
                })
                .collect(),
        });
        e
    }

    pub fn failed(&self, code: &str, message: String, attempts: u64) -> TaskEvent {
        let mut e = self.event("deliberation.failed");
        e.error = Some(Failure {
            code: code.to_owned(),
            message,
            attempts,
        });
        e
    }

    pub fn progress(&self, u: &RunProgress) -> ProgressEvent {
        ProgressEvent {
            schema: EVENT_SCHEMA,
            event_type: "deliberation.progress",
            task_id: self.task_id.clone(),
            story_id: self.story_id.clone(),
            status: u.status.to_owned(),
            progress_percent: u.percent,
            current_step: u.step.clone(),
            current_agent: u.agent.clone(),
            timestamp: iso8601(crate::store::now_ms()),
        }
    }
}

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (proleptic Gregorian, UTC).
pub fn iso8601(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    // Civil date from days since 1970-01-01 (era arithmetic over 400-year cycles).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_matches_known_instants() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day in a century leap year) 12:34:56.789
        assert_eq!(iso8601(951_827_696_789), "2000-02-29T12:34:56.789Z");
        // 2026-11-23 00:00:00 UTC
        assert_eq!(iso8601(1_795_392_000_000), "2026-11-23T00:00:00.000Z");
        assert_eq!(iso8601(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn a_completed_event_carries_the_upstream_fields_and_the_outcome() {
        let ctx = EventContext {
            task_id: "T-1".into(),
            story_id: "S-1".into(),
            role: "DEV".into(),
            correlation: BTreeMap::from([("story_id".to_owned(), "S-1".to_owned())]),
            delivery: 2,
        };
        let result = |author: &str, rank: i32, score: f64| pb::DeliberationResult {
            proposal: Some(pb::Proposal {
                author_id: author.into(),
                author_role: "DEV".into(),
                content: format!("proposal of {author}"),
                ..Default::default()
            }),
            score,
            rank,
            ..Default::default()
        };
        let response = pb::DeliberateResponse {
            task_id: "T-1".into(),
            results: vec![result("a", 1, 0.8), result("b", 2, 0.2)],
            winner_id: "a".into(),
            duration_ms: 1234,
            ..Default::default()
        };
        let v = serde_json::to_value(ctx.completed(&response)).expect("json");
        assert_eq!(v["event_type"], "deliberation.completed");
        assert_eq!(v["task_id"], "T-1");
        assert_eq!(v["story_id"], "S-1");
        assert_eq!(v["delivery"], 2);
        assert_eq!(v["decisions"][0]["author_id"], "a");
        assert_eq!(v["decisions"][0]["winner"], true);
        assert_eq!(v["decisions"][1]["winner"], false);
        assert_eq!(v["outcome"]["winner_id"], "a");
        assert_eq!(v["outcome"]["duration_ms"], 1234);
        assert!(v.get("error").is_none());
        let ts = v["timestamp"].as_str().expect("timestamp");
        assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");

        let f = serde_json::to_value(ctx.failed("retries_exhausted", "backend down".into(), 3))
            .expect("json");
        assert_eq!(f["event_type"], "deliberation.failed");
        assert_eq!(f["error"]["code"], "retries_exhausted");
        assert_eq!(f["error"]["attempts"], 3);
        assert!(f.get("outcome").is_none());
    }

    #[test]
    fn a_dead_letter_always_fits_and_says_when_it_was_cut() {
        let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let original = Original {
            subject: "council.tasks.DEV",
            sequence: 7,
            payload: &payload,
            deliveries: 1,
        };
        for limit in [1024, 4096, 65_536, 1_048_576] {
            let letter = DeadLetter::new(
                "oversized",
                "é".repeat(10_000),
                Some("T-1".into()),
                original,
                "host:1:2",
                limit,
            );
            let json = serde_json::to_vec(&letter).expect("json");
            assert!(
                json.len() <= limit,
                "limit {limit}: the letter is {} bytes",
                json.len()
            );
            assert!(letter.original_truncated, "limit {limit}");
            assert_eq!(letter.original_bytes, 1_000_000);
            assert!(letter.reason.len() <= MAX_REASON.min(limit / 4));
            assert!(letter.reason.ends_with('…'));
            let kept = base64::engine::general_purpose::STANDARD
                .decode(&letter.original_base64)
                .expect("base64");
            assert_eq!(
                &payload[..kept.len()],
                &kept[..],
                "a prefix of the original"
            );
            if limit >= 65_536 {
                assert!(kept.len() > limit / 2, "limit {limit}: kept {}", kept.len());
            }
        }
        let small = DeadLetter::new(
            "malformed",
            "bad".into(),
            None,
            Original {
                payload: b"{oops",
                ..original
            },
            "i",
            1_048_576,
        );
        assert!(!small.original_truncated);
        assert_eq!(small.original_base64, "e29vcHM=");
    }
}
