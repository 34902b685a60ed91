//! A secret's value as the request path sees it: fixed (inline values) or kept current by
//! the value sources, each version with the redactor that masks its echoes.

use std::sync::Arc;
use std::time::Instant;

use super::redact::Redactor;
use crate::model::{Injection, Rule, SecretValue};
use crate::swap::Swappable;

/// A value ready to inject.
pub struct Ready {
    /// The value.
    pub value: SecretValue,
    /// Masks it (and its encoded forms) in answers.
    pub redactor: Arc<Redactor>,
    /// When a fetched value becomes too old to use, whether or not the refresher got to
    /// it by then (a source may hang); `None` for values that never age (inline).
    pub usable_until: Option<Instant>,
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

    /// Makes `value` current for good.
    pub fn set(&self, value: SecretValue) {
        self.store(value, None);
    }

    /// Makes a fetched `value` current, until `usable_until`.
    pub fn set_until(&self, value: SecretValue, usable_until: Instant) {
        self.store(value, Some(usable_until));
    }

    fn store(&self, value: SecretValue, usable_until: Option<Instant>) {
        let redactor = Arc::new(Redactor::new(&value, &self.injections));
        self.state.store(ValueState::Ready(Ready {
            value,
            redactor,
            usable_until,
        }));
    }

    /// Marks the value unusable, saying why (never with the value).
    pub fn fail(&self, reason: String) {
        self.state.store(ValueState::Failed(reason));
    }

    /// The current state.
    pub fn state(&self) -> Arc<ValueState> {
        self.state.load()
    }

    /// The value of `state` when it can be used now, else why not.
    pub fn ready<'a>(&self, state: &'a ValueState) -> Result<&'a Ready, String> {
        match state {
            ValueState::Ready(ready)
                if ready
                    .usable_until
                    .is_some_and(|until| Instant::now() >= until) =>
            {
                Err(format!(
                    "its last value from {} is too old to use, and no newer one came",
                    self.source
                ))
            }
            ValueState::Ready(ready) => Ok(ready),
            ValueState::Pending => Err(format!(
                "its value has not been fetched from {} yet",
                self.source
            )),
            ValueState::Failed(reason) => Err(format!(
                "its value cannot be fetched from {}: {reason}",
                self.source
            )),
        }
    }

    /// Why the value cannot be used now, when it cannot.
    pub fn unavailable(&self, state: &ValueState) -> Option<String> {
        self.ready(state).err()
    }
}
