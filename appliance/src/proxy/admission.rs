//! How many connections the engine holds at once, in all and per cgroup: one workload that
//! opens connections and never finishes them (half-open handshakes, idle keep-alives) must
//! not use up the daemon's descriptors for every other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::capture::CgroupId;

/// The limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections held at once, in all.
    pub total: usize,
    /// Connections held at once from one cgroup.
    pub per_cgroup: usize,
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The engine holds `Limits::total` connections.
    Total,
    /// The cgroup holds `Limits::per_cgroup` connections.
    Cgroup,
}

impl Refusal {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Total => "too_many_connections",
            Self::Cgroup => "too_many_from_cgroup",
        }
    }
}

#[derive(Default)]
struct Held {
    total: usize,
    by_cgroup: HashMap<u64, usize>,
}

/// The connections held, by cgroup.
#[derive(Clone, Default)]
pub struct Admission {
    held: Arc<Mutex<Held>>,
}

/// One admitted connection; it is counted until dropped.
pub struct Admitted {
    held: Arc<Mutex<Held>>,
    cgroup: u64,
}

impl Admission {
    fn held(held: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
        held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a connection from `cgroup` when `limits` leave room for it.
    pub fn admit(&self, cgroup: CgroupId, limits: Limits) -> Result<Admitted, Refusal> {
        let mut held = Self::held(&self.held);
        if held.total >= limits.total {
            return Err(Refusal::Total);
        }
        let from_cgroup = held.by_cgroup.entry(cgroup.0).or_default();
        if *from_cgroup >= limits.per_cgroup {
            return Err(Refusal::Cgroup);
        }
        *from_cgroup += 1;
        held.total += 1;
        Ok(Admitted {
            held: Arc::clone(&self.held),
            cgroup: cgroup.0,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut held = Admission::held(&self.held);
        held.total -= 1;
        if let Some(count) = held.by_cgroup.get_mut(&self.cgroup) {
            *count -= 1;
            if *count == 0 {
                held.by_cgroup.remove(&self.cgroup);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_at_its_limit_leaves_room_for_the_others_and_gets_room_back() {
        let admission = Admission::default();
        let limits = Limits {
            total: 3,
            per_cgroup: 2,
        };
        let (greedy, other) = (CgroupId(1), CgroupId(2));
        let first = admission.admit(greedy, limits).unwrap();
        let _second = admission.admit(greedy, limits).unwrap();
        assert_eq!(admission.admit(greedy, limits).err(), Some(Refusal::Cgroup));
        let _others = admission.admit(other, limits).unwrap();
        assert_eq!(admission.admit(other, limits).err(), Some(Refusal::Total));
        drop(first);
        assert!(admission.admit(greedy, limits).is_ok());
    }
}
