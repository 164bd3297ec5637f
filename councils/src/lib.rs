//! The deliberation domain: roles, agents, councils, tasks and the deliberation state machine.
//!
//! Pure code: this crate never awaits, never reads a clock, never touches a file, a socket or
//! a model. It hands out the LLM calls it needs and takes their replies (see ARCHITECTURE.md).

pub mod role;

pub use role::{Role, RoleError};
