//! What a door asks the run core for ([`RunRequest`]) and what a running deliberation tells
//! its caller on the way ([`RunProgress`]): domain values, no wire types. Each door reads its
//! own message into [`RequestParts`] (the gRPC service from a `DeliberateRequest`, dispatch
//! from a `council.task.v1` message) and [`RequestParts::check`] turns them into a request
//! with one set of rules and one set of error names for both.

use std::time::Duration;

use council_councils::spec::DeliberationConfig;
use council_councils::{Role, Task, TaskId};

use super::error::{RunError, invalid};

/// A deliberation to run, checked as far as the request alone allows; what depends on the
/// stored council (its size, whether it exists) and on the runner's limits is checked by
/// [`super::Runner::start`].
#[derive(Debug, Clone, PartialEq)]
pub struct RunRequest {
    /// The task (its id, description, rubric, requirements, metadata), validated.
    pub task: Task,
    /// The council that deliberates, named by its role.
    pub role: Role,
    /// How many of the council's agents take part; `None`: all of them.
    pub num_agents: Option<usize>,
    /// Critique-and-revise rounds, 0 included; `None`: the council's configured rounds.
    pub rounds: Option<u32>,
    /// The deadline asked for; `None`: the runner's default. Capped at the runner's maximum.
    pub timeout: Option<Duration>,
}

impl RunRequest {
    pub fn task_id(&self) -> &str {
        self.task.id.as_str()
    }
}

/// A request as a door reads it off its message, before any check. Error messages name the
/// fields by these names (the `DeliberateRequest` fields, which the task schema mirrors).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestParts {
    /// Empty: a task id of upstream's form is made.
    pub task_id: String,
    pub description: String,
    pub role: String,
    pub rubric: String,
    pub requirements: Vec<String>,
    pub metadata: Vec<(String, String)>,
    /// 0: all of the council's agents.
    pub num_agents: i32,
    /// The rounds asked for and the field that asked (`review_rounds` or `rounds`); `None`:
    /// the council's own.
    pub rounds: Option<(&'static str, i32)>,
    /// 0: the default deadline.
    pub timeout_seconds: i32,
}

impl RequestParts {
    /// The request, or the invalid-argument error naming the first field that is wrong.
    pub fn check(self) -> Result<RunRequest, RunError> {
        let task_id = if self.task_id.is_empty() {
            new_task_id()
        } else {
            self.task_id
        };
        let id = TaskId::new(task_id).map_err(|e| invalid("task_id", e.to_string()))?;
        let mut task = Task::new(id, self.description)
            .map_err(|e| invalid("task_description", e.to_string()))?;
        task.rubric = self.rubric;
        task.requirements = self.requirements;
        let mut metadata = self.metadata;
        metadata.sort();
        task.metadata = metadata;
        task.validate()
            .map_err(|e| invalid("constraints", e.to_string()))?;
        let role = role("role", &self.role)?;
        let num_agents = match self.num_agents {
            n if n < 0 => return Err(invalid("num_agents", format!("{n} is negative"))),
            0 => None,
            n => Some(n as usize),
        };
        let max = DeliberationConfig::MAX_ROUNDS;
        let rounds = match self.rounds {
            None => None,
            Some((field, r)) if !(0..=i64::from(max)).contains(&i64::from(r)) => {
                return Err(invalid(field, format!("{r} is outside 0..={max}")));
            }
            Some((_, r)) => Some(r as u32),
        };
        let timeout = match self.timeout_seconds {
            s if s < 0 => {
                return Err(invalid(
                    "constraints.timeout_seconds",
                    format!("{s} is negative"),
                ));
            }
            0 => None,
            s => Some(Duration::from_secs(s as u64)),
        };
        Ok(RunRequest {
            task,
            role,
            num_agents,
            rounds,
            timeout,
        })
    }
}

/// A role name of a request, or the invalid-argument error naming `field`.
pub fn role(field: &'static str, s: &str) -> Result<Role, RunError> {
    s.parse()
        .map_err(|e: council_councils::RoleError| invalid(field, e.to_string()))
}

/// A task id of upstream's form, `task-<uuid v4>`, for a request that gave none.
pub fn new_task_id() -> String {
    format!("task-{}", uuid::Uuid::new_v4())
}

/// How far a running deliberation has come: one update per phase started and per call
/// answered. The final result is not an update: it comes from the run's handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunProgress {
    /// `generating`, `reviewing` or `scoring`.
    pub status: &'static str,
    /// 0..=99 over the deliberation's phases (100 belongs to the result).
    pub percent: i32,
    /// What happened, for people: "critique round 1: dev-2 answered (2/3)".
    pub step: String,
    /// The agent whose call answered; empty when a phase started.
    pub agent: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts() -> RequestParts {
        RequestParts {
            task_id: "task-1".into(),
            description: "Pick a cache.".into(),
            role: "DEV".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_request_is_checked_field_by_field() {
        let ok = parts().check().expect("valid");
        assert_eq!(ok.task_id(), "task-1");
        assert_eq!(
            (ok.num_agents, ok.rounds, ok.timeout),
            (None, None, None),
            "unset means the council's and the runner's own"
        );
        let made = RequestParts {
            task_id: String::new(),
            ..parts()
        }
        .check()
        .expect("an id is made");
        assert!(made.task_id().starts_with("task-") && made.task_id().len() > 20);
        let asked = RequestParts {
            num_agents: 2,
            rounds: Some(("review_rounds", 0)),
            timeout_seconds: 30,
            metadata: vec![("b".into(), "2".into()), ("a".into(), "1".into())],
            ..parts()
        }
        .check()
        .expect("valid");
        assert_eq!(asked.num_agents, Some(2));
        assert_eq!(asked.rounds, Some(0), "0 rounds is a valid ask");
        assert_eq!(asked.timeout, Some(Duration::from_secs(30)));
        assert_eq!(asked.task.metadata[0].0, "a", "metadata sorted");

        let cases: [(RequestParts, &str); 8] = [
            (
                RequestParts {
                    task_id: "bad id with spaces".into(),
                    ..parts()
                },
                "task_id",
            ),
            (
                RequestParts {
                    description: " ".into(),
                    ..parts()
                },
                "task_description",
            ),
            (
                RequestParts {
                    role: "JANITOR!".into(),
                    ..parts()
                },
                "role",
            ),
            (
                RequestParts {
                    num_agents: -1,
                    ..parts()
                },
                "num_agents",
            ),
            (
                RequestParts {
                    rounds: Some(("review_rounds", 11)),
                    ..parts()
                },
                "review_rounds",
            ),
            (
                RequestParts {
                    rounds: Some(("rounds", -1)),
                    ..parts()
                },
                "rounds",
            ),
            (
                RequestParts {
                    timeout_seconds: -5,
                    ..parts()
                },
                "constraints.timeout_seconds",
            ),
            (
                RequestParts {
                    requirements: vec![String::new()],
                    ..parts()
                },
                "constraints",
            ),
        ];
        for (parts, field) in cases {
            let e = parts.clone().check().expect_err(field);
            assert!(
                matches!(&e, RunError::InvalidArgument { field: f, .. } if *f == field),
                "{parts:?}: {e}"
            );
        }
    }
}
