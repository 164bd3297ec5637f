//! Agent roles: the five built-in ones and validated custom roles.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What an agent is on a council for. Built-in roles have their own personas and review focus;
/// custom roles are named by the user.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Role {
    Dev,
    Qa,
    Architect,
    Devops,
    Data,
    /// Upper-case ASCII letters, digits and `_`, starting with a letter, at most 32 long.
    Custom(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error("role must not be empty")]
    Empty,
    #[error("role {0:?} is longer than {max} characters", max = Role::MAX_LEN)]
    TooLong(String),
    #[error("role {0:?} must start with a letter and hold only letters, digits and '_'")]
    BadCharacters(String),
}

impl Role {
    pub const MAX_LEN: usize = 32;
    pub const BUILT_IN: [Role; 5] = [
        Role::Dev,
        Role::Qa,
        Role::Architect,
        Role::Devops,
        Role::Data,
    ];

    pub fn as_str(&self) -> &str {
        match self {
            Role::Dev => "DEV",
            Role::Qa => "QA",
            Role::Architect => "ARCHITECT",
            Role::Devops => "DEVOPS",
            Role::Data => "DATA",
            Role::Custom(name) => name,
        }
    }

    pub fn is_built_in(&self) -> bool {
        !matches!(self, Role::Custom(_))
    }
}

impl FromStr for Role {
    type Err = RoleError;

    /// Case-insensitive; surrounding whitespace is ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim().to_ascii_uppercase();
        if name.is_empty() {
            return Err(RoleError::Empty);
        }
        if let Some(role) = Role::BUILT_IN.iter().find(|r| r.as_str() == name) {
            return Ok(role.clone());
        }
        if name.chars().count() > Role::MAX_LEN {
            return Err(RoleError::TooLong(s.to_owned()));
        }
        let mut chars = name.chars();
        let starts_with_letter = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
        if !starts_with_letter || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(RoleError::BadCharacters(s.to_owned()));
        }
        Ok(Role::Custom(name))
    }
}

impl TryFrom<String> for Role {
    type Error = RoleError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Role> for String {
    fn from(role: Role) -> Self {
        role.as_str().to_owned()
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_roles_parse_case_insensitively_and_round_trip() {
        for role in Role::BUILT_IN {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role.clone()));
            assert_eq!(
                role.as_str().to_lowercase().parse::<Role>(),
                Ok(role.clone())
            );
            assert!(role.is_built_in());
        }
        assert_eq!(" devops ".parse::<Role>(), Ok(Role::Devops));
    }

    #[test]
    fn custom_roles_are_validated() {
        assert_eq!(
            "security_reviewer".parse::<Role>(),
            Ok(Role::Custom("SECURITY_REVIEWER".into()))
        );
        assert_eq!("".parse::<Role>(), Err(RoleError::Empty));
        assert!(matches!(
            "9LIVES".parse::<Role>(),
            Err(RoleError::BadCharacters(_))
        ));
        assert!(matches!(
            "DEV OPS".parse::<Role>(),
            Err(RoleError::BadCharacters(_))
        ));
        assert!(matches!(
            "<|im_start|>".parse::<Role>(),
            Err(RoleError::BadCharacters(_))
        ));
        assert!(matches!(
            "A".repeat(33).parse::<Role>(),
            Err(RoleError::TooLong(_))
        ));
    }

    #[test]
    fn string_conversions_validate() {
        assert_eq!(String::from(Role::Qa), "QA");
        assert_eq!(Role::try_from("data".to_owned()), Ok(Role::Data));
        assert!(Role::try_from("bad role".to_owned()).is_err());
    }
}
