//! Shared state replaced whole on change, while readers keep the version they took.

use std::sync::{Arc, RwLock};

/// A value replaced whole while readers keep the one they took.
pub(crate) struct Swappable<T>(RwLock<Arc<T>>);

impl<T: Default> Default for Swappable<T> {
    fn default() -> Self {
        Self(RwLock::new(Arc::new(T::default())))
    }
}

impl<T> Swappable<T> {
    pub(crate) fn load(&self) -> Arc<T> {
        Arc::clone(
            &self
                .0
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    pub(crate) fn store(&self, value: T) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(value);
    }
}

impl<T> Swappable<T> {
    /// Starts with `value`.
    pub(crate) fn new(value: T) -> Self {
        Self(RwLock::new(Arc::new(value)))
    }
}
