//! The one error shape of the admin API:
//! `{"error": {"type": "...", "message": "...", "field": "..."}}`.

use http::StatusCode;
use serde_json::{json, Value};

use crate::control::ControlError;
use crate::model::ValidationError;

/// An API failure with its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable type.
    pub kind: &'static str,
    /// What went wrong and what to do.
    pub message: String,
    /// The offending field, for validation errors.
    pub field: Option<String>,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            field: None,
        }
    }

    /// 404 for a route or record.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 500: details, with every cause, go to the log, not to the client.
    pub fn internal(error: &(dyn std::error::Error + 'static)) -> Self {
        let mut causes = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            causes.push_str(": ");
            causes.push_str(&cause.to_string());
            source = cause.source();
        }
        tracing::error!(error = %causes, "admin API request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the daemon's log",
        )
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {"type": self.kind, "message": self.message, "field": self.field}})
    }
}

impl From<ValidationError> for ApiError {
    fn from(error: ValidationError) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "validation",
            message: format!("{}: {}", error.field, error.message),
            field: Some(error.field),
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(error: ControlError) -> Self {
        match error {
            ControlError::Invalid(error) => error.into(),
            ControlError::NotFound { .. } => Self::not_found(error.to_string()),
            ControlError::Duplicate { .. } => {
                let mut conflict = Self::new(StatusCode::CONFLICT, "conflict", error.to_string());
                conflict.field = Some("name".into());
                conflict
            }
            other => Self::internal(&other),
        }
    }
}
