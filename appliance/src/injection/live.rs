//! A secret's value as the request path sees it: fixed (inline values) or kept current by
//! the value sources, each version with the redactor that masks its echoes.

use std::sync::Arc;

use super::redact::Redactor;
use crate::model::{Injection, Rule, SecretValue};
use crate::swap::Swappable;

/// A value ready to inject.
pub struct Ready {
    /// The value.
    pub value: SecretValue,
    /// Masks it (and its encoded forms) in answers.
    pub redactor: Arc<Redactor>,
}

/// Where a secret's value stands.
pub enum ValueState {
    /// Usable.
    Ready(Ready),
    /// Not fetched yet.
    Pending,
    /// The source fails and the last good value, if any, is too old to use.
    Failed(String),
}

/// A secret's current value.
pub struct LiveValue {
    injections: Vec<Injection>,
    /// Names the source in errors: `1Password op://…`, `file /run/…`.
    source: String,
    state: Swappable<ValueState>,
}

impl LiveValue {
    /// A value that never changes (inline in the store).
    pub fn fixed(value: SecretValue, rules: &[Rule]) -> Self {
        let live = Self::pending("the store", rules);
        live.set(value);
        live
    }

    /// A value still to be fetched from `source`, for a secret with `rules`.
    pub fn pending(source: &str, rules: &[Rule]) -> Self {
        Self {
            injections: rules.iter().map(|rule| rule.injection.clone()).collect(),
            source: source.to_owned(),
            state: Swappable::new(ValueState::Pending),
        }
    }

    /// Makes `value` current.
    pub fn set(&self, value: SecretValue) {
        let redactor = Arc::new(Redactor::new(&value, &self.injections));
        self.state
            .store(ValueState::Ready(Ready { value, redactor }));
    }

    /// Marks the value unusable, saying why (never with the value).
    pub fn fail(&self, reason: String) {
        self.state.store(ValueState::Failed(reason));
    }

    /// The current state.
    pub fn state(&self) -> Arc<ValueState> {
        self.state.load()
    }

    /// Why the value cannot be used now, when it cannot.
    pub fn unavailable(&self, state: &ValueState) -> Option<String> {
        match state {
            ValueState::Ready(_) => None,
            ValueState::Pending => Some(format!(
                "its value has not been fetched from {} yet",
                self.source
            )),
            ValueState::Failed(reason) => Some(format!(
                "its value cannot be fetched from {}: {reason}",
                self.source
            )),
        }
    }
}
