//! Structured output: what a caller may require of a reply's form, and the check that a reply
//! honours it. A backend that enforces a constraint still has its reply checked here: a server
//! that ignores the constraint (an unknown request key is silently dropped by some servers)
//! must not pass an unconstrained reply off as a constrained one.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::InferenceError;

/// A required form of the whole reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Constraint {
    /// Exactly one of these strings (surrounding whitespace aside).
    Choice(Vec<String>),
    /// A JSON value valid under this JSON Schema. The check covers the keywords `type`,
    /// `enum`, `const`, `properties`, `required`, `additionalProperties: false`, `items`,
    /// `minItems` / `maxItems`, `minimum` / `maximum`, `minLength` / `maxLength`; other keywords
    /// are left to the server.
    JsonSchema(Value),
    /// The whole reply matches this regular expression (Rust `regex` syntax).
    Regex(String),
}

impl Constraint {
    /// Refuses a constraint that no reply could be checked against.
    pub fn validate(&self) -> Result<(), InferenceError> {
        let bad = |reason: String| InferenceError::InvalidRequest {
            field: "constraint",
            reason,
        };
        match self {
            Constraint::Choice(options) if options.is_empty() => {
                Err(bad("a choice needs at least one option".into()))
            }
            Constraint::Choice(_) => Ok(()),
            Constraint::JsonSchema(schema) if !schema.is_object() => {
                Err(bad("a JSON schema must be an object".into()))
            }
            Constraint::JsonSchema(_) => Ok(()),
            Constraint::Regex(pattern) => regex::Regex::new(pattern)
                .map(|_| ())
                .map_err(|e| bad(format!("invalid regex: {e}"))),
        }
    }

    /// Ok when `reply` honours the constraint; otherwise what is wrong with it.
    pub fn check(&self, reply: &str) -> Result<(), String> {
        let text = reply.trim();
        match self {
            Constraint::Choice(options) => {
                if options.iter().any(|o| o == text) {
                    Ok(())
                } else {
                    Err(format!("{:.80?} is not one of {options:?}", text))
                }
            }
            Constraint::Regex(pattern) => {
                let whole = regex::Regex::new(&format!("^(?:{pattern})$"))
                    .map_err(|e| format!("invalid regex: {e}"))?;
                if whole.is_match(text) {
                    Ok(())
                } else {
                    Err(format!("{:.80?} does not match /{pattern}/", text))
                }
            }
            Constraint::JsonSchema(schema) => {
                let value: Value = serde_json::from_str(text)
                    .map_err(|e| format!("the reply is not JSON ({e}): {:.80?}", text))?;
                conforms(&value, schema, "$")
            }
        }
    }
}

/// Checks `value` at `path` against the supported keywords of `schema`.
fn conforms(value: &Value, schema: &Value, path: &str) -> Result<(), String> {
    if let Some(expected) = schema.get("type") {
        let types: Vec<&str> = match expected {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !types.is_empty() && !types.iter().any(|t| has_type(value, t)) {
            return Err(format!(
                "{path}: expected {}, got {value}",
                types.join(" or ")
            ));
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        return Err(format!("{path}: {value} is not in the enum"));
    }
    if let Some(constant) = schema.get("const")
        && constant != value
    {
        return Err(format!("{path}: {value} is not {constant}"));
    }
    bounds(value, schema, path)?;
    match value {
        Value::Object(fields) => object(fields, schema, path),
        Value::Array(items) => match schema.get("items") {
            Some(item_schema) if item_schema.is_object() => items
                .iter()
                .enumerate()
                .try_for_each(|(i, item)| conforms(item, item_schema, &format!("{path}[{i}]"))),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

fn has_type(value: &Value, name: &str) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.as_f64().is_some_and(|v| v.fract() == 0.0),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => true,
    }
}

fn bounds(value: &Value, schema: &Value, path: &str) -> Result<(), String> {
    let limit = |key: &str| schema.get(key).and_then(Value::as_f64);
    let out_of = |n: f64, low: &str, high: &str, what: &str| {
        let below = limit(low).is_some_and(|l| n < l);
        let above = limit(high).is_some_and(|h| n > h);
        if below || above {
            Err(format!(
                "{path}: {what} {n} is outside [{low}, {high}] of the schema"
            ))
        } else {
            Ok(())
        }
    };
    match value {
        Value::Number(n) => out_of(
            n.as_f64().unwrap_or(f64::NAN),
            "minimum",
            "maximum",
            "value",
        ),
        Value::String(s) => out_of(s.chars().count() as f64, "minLength", "maxLength", "length"),
        Value::Array(a) => out_of(a.len() as f64, "minItems", "maxItems", "length"),
        _ => Ok(()),
    }
}

fn object(
    fields: &serde_json::Map<String, Value>,
    schema: &Value,
    path: &str,
) -> Result<(), String> {
    let properties = schema.get("properties").and_then(Value::as_object);
    for name in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if !fields.contains_key(name) {
            return Err(format!("{path}: the required field {name:?} is missing"));
        }
    }
    let closed = schema.get("additionalProperties") == Some(&Value::Bool(false));
    for (name, field) in fields {
        match properties.and_then(|p| p.get(name)) {
            Some(field_schema) => conforms(field, field_schema, &format!("{path}.{name}"))?,
            None if closed => return Err(format!("{path}: unexpected field {name:?}")),
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn choices_and_regexes_cover_the_whole_reply() {
        let choice = Constraint::Choice(vec!["yes".into(), "no".into()]);
        assert!(choice.check(" yes\n").is_ok());
        assert!(choice.check("yes, definitely").is_err());
        let regex = Constraint::Regex(r"\d{1,3}".into());
        assert!(regex.check("42").is_ok());
        assert!(regex.check("answer 42").is_err(), "anchored at both ends");
        assert!(Constraint::Regex("(".into()).validate().is_err());
        assert!(Constraint::Choice(vec![]).validate().is_err());
        assert!(Constraint::JsonSchema(json!(true)).validate().is_err());
    }

    #[test]
    fn json_replies_are_checked_against_the_schema() {
        let schema = json!({
            "type": "object",
            "properties": {
                "score": {"type": "integer", "minimum": 1, "maximum": 10},
                "verdict": {"enum": ["accept", "reject"]},
                "notes": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2}
            },
            "required": ["score", "verdict"],
            "additionalProperties": false
        });
        let c = Constraint::JsonSchema(schema);
        assert!(
            c.check(r#"{"score": 7, "verdict": "accept", "notes": ["ok"]}"#)
                .is_ok()
        );
        for (reply, fragment) in [
            ("score: 7", "not JSON"),
            (r#"{"verdict": "accept"}"#, "required field \"score\""),
            (
                r#"{"score": 7.5, "verdict": "accept"}"#,
                "$.score: expected integer",
            ),
            (r#"{"score": 11, "verdict": "accept"}"#, "$.score: value 11"),
            (r#"{"score": 7, "verdict": "maybe"}"#, "not in the enum"),
            (
                r#"{"score": 7, "verdict": "accept", "extra": 1}"#,
                "unexpected field",
            ),
            (
                r#"{"score": 7, "verdict": "accept", "notes": ["toolong"]}"#,
                "$.notes[0]",
            ),
            (
                r#"{"score": 7, "verdict": "accept", "notes": ["a", "b", "c"]}"#,
                "$.notes: length 3",
            ),
            ("[1, 2]", "expected object"),
        ] {
            let err = c.check(reply).expect_err(reply);
            assert!(err.contains(fragment), "{reply}: {err}");
        }
    }
}
