//! The model of what the appliance administers: secrets, agents and access rules.
//!
//! Each comes in three shapes: the input the API takes (serde types that refuse unknown
//! fields), validated by one step into the definition the data plane uses (errors name the
//! field and say how to fix it), and the record the store keeps and the API, the CLI and the
//! tests read back.

pub mod access;
pub mod agent;
mod error;
pub mod pattern;
pub mod secret;
pub mod source;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

pub use access::{AccessRule, AccessRuleInput, AccessRuleRecord, Action};
pub use agent::{AgentInput, AgentRecord, AgentSpec};
pub use error::{from_json, from_value, ValidationError};
pub use pattern::{HostPattern, PathPattern};
pub use secret::{
    HeaderInjection, Injection, InjectionView, Provider, Rule, SecretCheck, SecretInput,
    SecretRecord, SecretSpec, SecretValue, SecretView, ValueFormat,
};
pub use source::{OpRef, SourceKind, ValueSource};

use error::invalid;

const MAX_NAME_CHARS: usize = 128;

/// Checks a name (of a secret or an agent) given at `field`.
fn check_name(field: &str, name: Option<&str>) -> Result<String, ValidationError> {
    let name = name.ok_or_else(|| invalid(field, "is required and must be a string"))?;
    let mut bytes = name.bytes();
    let valid = matches!(bytes.next(), Some(first) if first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && name.chars().count() <= MAX_NAME_CHARS;
    if !valid {
        return Err(invalid(
            field,
            "must be 1-128 characters: a letter or `_`, then letters, digits, `_` or `-`",
        ));
    }
    Ok(name.to_owned())
}

/// `current` with a PATCH body applied: each field given replaces the current one, `null`
/// removes it; the result is read as `T` again, so it is refused as a whole input would be.
/// An empty patch, and one that names a field in `read_only`, are refused.
pub fn patched<T: Serialize + DeserializeOwned>(
    current: &T,
    patch: Value,
    read_only: &[&str],
) -> Result<T, ValidationError> {
    let Value::Object(patch) = patch else {
        return Err(invalid("body", "must be a JSON object"));
    };
    if patch.is_empty() {
        return Err(invalid("body", "no fields provided"));
    }
    if let Some(key) = patch.keys().find(|key| read_only.contains(&key.as_str())) {
        return Err(invalid(
            key.clone(),
            "is set by the appliance and cannot be changed",
        ));
    }
    let mut merged = match serde_json::to_value(current) {
        Ok(Value::Object(fields)) => fields,
        _ => Map::new(),
    };
    for (key, value) in patch {
        if value.is_null() {
            merged.remove(&key);
        } else {
            merged.insert(key, value);
        }
    }
    from_value(Value::Object(merged))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patches_replace_remove_and_refuse_read_only_fields() {
        let current = AccessRuleInput {
            host: Some("api.example.com".into()),
            path: Some("/v1/*".into()),
            action: Some(Action::Block),
            ..AccessRuleInput::default()
        };
        let changed = patched(&current, json!({"path": null, "method": "GET"}), &[]).unwrap();
        assert_eq!(changed.path, None);
        assert_eq!(changed.method.as_deref(), Some("GET"));
        assert_eq!(changed.host, current.host);
        assert_eq!(
            patched(&current, json!({}), &[]).unwrap_err().message,
            "no fields provided"
        );
        assert_eq!(
            patched(&current, json!({"id": "x"}), &["id"])
                .unwrap_err()
                .field,
            "id"
        );
        assert_eq!(
            patched(&current, json!({"colour": 1}), &[])
                .unwrap_err()
                .field,
            "colour"
        );
    }
}
