//! The deliberation domain: roles, agents, councils, tasks and the deliberation state machine.
//!
//! Pure code: this crate never awaits, never reads a clock, never touches a file, a socket or
//! a model. It hands out the LLM calls it needs and takes their replies (see ARCHITECTURE.md).

pub mod aggregate;
pub mod checks;
pub mod deliberation;
pub mod ids;
pub mod outcome;
pub mod parse;
pub mod personas;
pub mod prompts;
pub mod rng;
pub mod role;
pub mod sanitize;
pub mod spec;

pub use deliberation::checkpoint;
pub use deliberation::{
    CallError, CallKind, CallSampling, Completion, Deliberation, LlmCall, Reply, Step, StepError,
};
pub use ids::{AgentId, CouncilId, TaskId};
pub use outcome::{Outcome, OutcomeStatus, Phase, Progress, StopReason};
pub use role::{Role, RoleError};
pub use spec::{AgentSpec, CouncilSpec, DeliberationConfig, Task};
