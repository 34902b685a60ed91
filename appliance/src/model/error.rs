//! Refused input: which field, and what to do about it. Serde's own errors are turned into
//! the same shape, with the field's JSON path and a message that says what was expected.

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;

/// A rejected input: which field, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// JSON path of the field, such as `rules[0].injection.headerName`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// A [`ValidationError`] for `field`.
pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        message: message.into(),
    }
}

/// How an error names a field given by `key`: the key, or `""` for an empty one, so that
/// the name is never blank.
fn field_name(key: &str) -> String {
    if key.is_empty() {
        "\"\"".into()
    } else {
        key.into()
    }
}

/// Reads `T` from a JSON document, refusing anything but an object at the top.
pub fn from_json<T: DeserializeOwned>(json: &[u8]) -> Result<T, ValidationError> {
    let value: serde_json::Value = serde_json::from_slice(json)
        .map_err(|error| invalid("body", format!("is not valid JSON: {error}")))?;
    from_value(value)
}

/// Reads `T` from a parsed JSON value, refusing anything but an object at the top.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ValidationError> {
    if !value.is_object() {
        return Err(invalid("body", "must be a JSON object"));
    }
    serde_path_to_error::deserialize(value).map_err(|error| {
        let field = path_of(error.path());
        invalid(field, explain(&error.inner().to_string()))
    })
}

fn path_of(path: &serde_path_to_error::Path) -> String {
    let mut field = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => field.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !field.is_empty() {
                    field.push('.');
                }
                field.push_str(&field_name(key));
            }
            Segment::Unknown => {}
        }
    }
    if field.is_empty() {
        "body".into()
    } else {
        field
    }
}

/// Serde's message in the words of the API: what the field must be. The offending input is
/// never quoted back (a misplaced credential must not land in an error, a log or a terminal).
fn explain(message: &str) -> String {
    let list = |text: &str| {
        let text = text
            .strip_prefix("expected one of ")
            .or_else(|| text.strip_prefix("expected "))
            .unwrap_or(text);
        text.replace('`', "").replace(" or ", ", ")
    };
    if let Some(rest) = message.strip_prefix("unknown field `") {
        return match rest.split_once("`, ") {
            Some((_, "there are no fields")) => "is not a known field".into(),
            Some((_, expected)) => format!("is not a known field; known: {}", list(expected)),
            None => "is not a known field".into(),
        };
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let expected = rest.split_once("`, ").map_or("", |(_, expected)| expected);
        return format!("must be one of {}", list(expected));
    }
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        if let Some((got, expected)) = rest.split_once(", expected ") {
            let got = got.split([' ', '`', '"']).next().unwrap_or(got);
            return format!("must be {expected}, not {got}");
        }
    }
    message.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // Read by serde only.
    struct Probe {
        name: Option<String>,
        list: Option<Vec<Probe>>,
        kind: Option<Kind>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Kind {
        One,
        Two,
    }

    fn refusal(json: serde_json::Value) -> ValidationError {
        from_value::<Probe>(json).unwrap_err()
    }

    #[test]
    fn serde_errors_name_the_path_and_never_echo_the_input() {
        let error = refusal(serde_json::json!({"list": [{}, {"color": 1}]}));
        assert_eq!(error.field, "list[1].color");
        assert_eq!(
            error.message,
            "is not a known field; known: name, list, kind"
        );
        let error = refusal(serde_json::json!({"": 1}));
        assert_eq!(error.field, "\"\"");
        let error = refusal(serde_json::json!({"name": "sk-live-secret", "kind": "three"}));
        assert_eq!(error.field, "kind");
        assert_eq!(error.message, "must be one of one, two");
        let error = refusal(serde_json::json!({"list": [{"name": ["sk-live-secret"]}]}));
        assert_eq!(error.field, "list[0].name");
        assert_eq!(error.message, "must be a string, not sequence");
        let error = refusal(serde_json::json!({"kind": {"sk-live-secret": 1}}));
        assert!(!error.message.contains("sk-live"), "{error}");
        assert_eq!(refusal(serde_json::json!([1])).field, "body");
        assert!(from_json::<Probe>(b"{")
            .unwrap_err()
            .message
            .contains("not valid JSON"));
    }
}
