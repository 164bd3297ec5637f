//! Identifier newtypes: a council, an agent, a task. Validated once, then trusted.

use std::fmt;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} id {value:?} is invalid: {reason}")]
pub struct IdError {
    pub kind: &'static str,
    pub value: String,
    pub reason: &'static str,
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Longest accepted id, in bytes.
            pub const MAX_LEN: usize = 128;

            /// Accepts 1..=128 bytes of ASCII letters, digits, `-`, `_`, `.`, `:`.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                let err = |reason| IdError { kind: $kind, value: value.clone(), reason };
                if value.is_empty() {
                    return Err(err("empty"));
                }
                if value.len() > Self::MAX_LEN {
                    return Err(err("longer than 128 bytes"));
                }
                if !value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)) {
                    return Err(err("only ASCII letters, digits, '-', '_', '.', ':' are allowed"));
                }
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// Names a council.
    CouncilId,
    "council"
);
id_type!(
    /// Names an agent; unique within its council.
    AgentId,
    "agent"
);
id_type!(
    /// Names a task; stable across redeliveries of the same task.
    TaskId,
    "task"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert_eq!(
            AgentId::new("dev-1").map(|a| a.to_string()),
            Ok("dev-1".to_owned())
        );
        assert!(TaskId::new("").is_err());
        assert!(TaskId::new("a b").is_err());
        assert!(CouncilId::new("x".repeat(129)).is_err());
        assert!(CouncilId::new("<|im_start|>").is_err());
    }
}
