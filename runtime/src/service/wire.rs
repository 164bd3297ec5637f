//! The gRPC door's edge: a `DeliberateRequest` becomes the run core's [`RunRequest`], a
//! call's `grpc-timeout` its deadline, and a run's progress and result the updates of a
//! `StreamDeliberation` stream.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use council_proto::fleet::orchestrator::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

use crate::run::error::RunError;
use crate::run::{RequestParts, RunHandle, RunProgress, RunRequest};

/// The run request of a `DeliberateRequest`, or the invalid-argument error naming the field.
/// `rounds` (upstream's, 0 = unset) asks for review rounds unless `review_rounds` (ours, 0
/// included) does; `max_iterations` has no meaning here.
pub fn run_request(req: &pb::DeliberateRequest) -> Result<RunRequest, RunError> {
    let c = req.constraints.clone().unwrap_or_default();
    RequestParts {
        task_id: req.task_id.clone(),
        description: req.task_description.clone(),
        role: req.role.clone(),
        rubric: c.rubric,
        requirements: c.requirements,
        metadata: c.metadata.into_iter().collect(),
        num_agents: req.num_agents,
        rounds: match req.review_rounds {
            Some(r) => Some(("review_rounds", r)),
            None if req.rounds != 0 => Some(("rounds", req.rounds)),
            None => None,
        },
        timeout_seconds: c.timeout_seconds,
    }
    .check()
}

/// The call's own deadline from its `grpc-timeout` header ("<digits><H|M|S|m|u|n>").
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A progress update as the stream sends it.
fn update(p: RunProgress) -> pb::DeliberationUpdate {
    pb::DeliberationUpdate {
        status: p.status.into(),
        progress_percent: p.percent,
        current_step: p.step,
        current_agent: p.agent,
        partial_result: None,
        response: None,
    }
}

/// The last update of a stream: complete, the winner as the partial result, the whole response.
pub fn final_update(response: &pb::DeliberateResponse) -> pb::DeliberationUpdate {
    pb::DeliberationUpdate {
        status: "complete".into(),
        progress_percent: 100,
        current_step: "complete".into(),
        current_agent: response.winner_id.clone(),
        partial_result: response.results.first().cloned(),
        response: Some(response.clone()),
    }
}

/// The stream of a `StreamDeliberation` call: the run's progress, then its final update (or
/// its error as the stream's status). Dropping it (client gone) cancels the run.
#[derive(Debug)]
pub enum UpdateStream {
    Running {
        /// The run drops its sender when it ends: every update comes before the result.
        progress: mpsc::UnboundedReceiver<RunProgress>,
        run: RunHandle,
    },
    /// Completed before this call: only the final update.
    Done(Box<pb::DeliberateResponse>),
    Ended,
}

impl tonic::codegen::tokio_stream::Stream for UpdateStream {
    type Item = Result<pb::DeliberationUpdate, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let last = match &mut *self {
            UpdateStream::Ended => return Poll::Ready(None),
            UpdateStream::Done(response) => Ok(final_update(response)),
            UpdateStream::Running { progress, run } => {
                if let Some(p) = std::task::ready!(progress.poll_recv(cx)) {
                    return Poll::Ready(Some(Ok(update(p))));
                }
                match std::task::ready!(run.poll_result(cx)) {
                    Ok(response) => Ok(final_update(&response)),
                    Err(e) => Err(e.to_status()),
                }
            }
        };
        *self = UpdateStream::Ended;
        Poll::Ready(Some(last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_units() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        for (v, d) in [
            ("2S", Duration::from_secs(2)),
            ("1500m", Duration::from_millis(1500)),
            ("3M", Duration::from_secs(180)),
            ("1H", Duration::from_secs(3600)),
            ("7u", Duration::from_micros(7)),
            ("9n", Duration::from_nanos(9)),
        ] {
            m.insert("grpc-timeout", v.parse().expect("ascii"));
            assert_eq!(grpc_timeout(&m), Some(d), "{v}");
        }
        for bad in ["", "S", "10x", "-1S"] {
            m.insert("grpc-timeout", bad.parse().expect("ascii"));
            assert_eq!(grpc_timeout(&m), None, "{bad:?}");
        }
    }

    #[test]
    fn review_rounds_win_over_rounds_and_unset_means_the_councils() {
        let req = |rounds: i32, review_rounds: Option<i32>| pb::DeliberateRequest {
            task_id: "task-w".into(),
            task_description: "Pick a cache.".into(),
            role: "QA".into(),
            rounds,
            review_rounds,
            ..Default::default()
        };
        let rounds = |r: pb::DeliberateRequest| run_request(&r).map(|r| r.rounds);
        assert_eq!(rounds(req(0, None)).expect("valid"), None);
        assert_eq!(rounds(req(2, None)).expect("valid"), Some(2));
        assert_eq!(rounds(req(2, Some(0))).expect("valid"), Some(0));
        for (r, field) in [
            (req(-1, None), "rounds"),
            (req(1, Some(11)), "review_rounds"),
        ] {
            let e = run_request(&r).expect_err(field);
            assert!(
                matches!(e, RunError::InvalidArgument { field: f, .. } if f == field),
                "{e}"
            );
        }
        let c = run_request(&pb::DeliberateRequest {
            constraints: Some(pb::TaskConstraints {
                rubric: "speed".into(),
                timeout_seconds: 9,
                ..Default::default()
            }),
            num_agents: 2,
            ..req(0, None)
        })
        .expect("valid");
        assert_eq!(
            (
                c.task.rubric.as_str(),
                c.timeout,
                c.num_agents,
                c.role.as_str()
            ),
            ("speed", Some(Duration::from_secs(9)), Some(2), "QA")
        );
    }
}
