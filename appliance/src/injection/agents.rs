//! Which agent a workload belongs to: its cgroup is one of the agent's cgroups or lies below
//! one. Capture reports the cgroup id and pid; ids of the agents' own cgroups are known, and
//! for descendants the process's cgroup path is read and checked against the id (so a reused
//! pid cannot claim another cgroup).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::Workload;

const CACHE_LIMIT: usize = 16_384;

/// Agents by cgroup.
#[derive(Default)]
pub struct AgentDirectory {
    /// (agent name, absolute cgroup path), deepest paths first.
    cgroups: Vec<(String, PathBuf)>,
    by_id: HashMap<u64, String>,
    cgroup2_mount: PathBuf,
    resolved: Mutex<HashMap<u64, Option<String>>>,
}

impl AgentDirectory {
    /// A directory of `(agent, absolute cgroup path)` pairs under the cgroup2 mount.
    pub fn new(cgroup2_mount: PathBuf, mut cgroups: Vec<(String, PathBuf)>) -> Self {
        cgroups.sort_by_key(|(_, path)| std::cmp::Reverse(path.components().count()));
        let by_id = cgroups
            .iter()
            .filter_map(|(agent, path)| Some((std::fs::metadata(path).ok()?.ino(), agent.clone())))
            .collect();
        Self {
            cgroups,
            by_id,
            cgroup2_mount,
            resolved: Mutex::new(HashMap::new()),
        }
    }

    fn owner_of(&self, path: &Path) -> Option<String> {
        self.cgroups
            .iter()
            .find(|(_, cgroup)| path.starts_with(cgroup))
            .map(|(agent, _)| agent.clone())
    }

    fn cgroup_of_process(&self, workload: &Workload) -> Option<PathBuf> {
        let text = std::fs::read_to_string(format!("/proc/{}/cgroup", workload.pid)).ok()?;
        let relative = text.lines().find_map(|line| line.strip_prefix("0::"))?;
        let path = self.cgroup2_mount.join(relative.trim_start_matches('/'));
        (std::fs::metadata(&path).ok()?.ino() == workload.cgroup_id.0).then_some(path)
    }

    /// The agent of `workload`, if any.
    pub fn resolve(&self, workload: &Workload) -> Option<String> {
        if self.cgroups.is_empty() {
            return None;
        }
        if let Some(agent) = self.by_id.get(&workload.cgroup_id.0) {
            return Some(agent.clone());
        }
        let mut resolved = self
            .resolved
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(known) = resolved.get(&workload.cgroup_id.0) {
            return known.clone();
        }
        let Some(path) = self.cgroup_of_process(workload) else {
            // The process is gone or moved: unknown, and not cached, so a later connection
            // from the same cgroup can still be resolved.
            return None;
        };
        let agent = self.owner_of(&path);
        if resolved.len() >= CACHE_LIMIT {
            resolved.clear();
        }
        resolved.insert(workload.cgroup_id.0, agent.clone());
        agent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::CgroupId;

    #[test]
    fn the_deepest_enclosing_cgroup_names_the_agent() {
        let directory = AgentDirectory::new(
            "/sys/fs/cgroup".into(),
            vec![
                ("outer".into(), "/sys/fs/cgroup/agents".into()),
                ("inner".into(), "/sys/fs/cgroup/agents/inner".into()),
            ],
        );
        assert_eq!(
            directory
                .owner_of(Path::new("/sys/fs/cgroup/agents/inner/x"))
                .as_deref(),
            Some("inner")
        );
        assert_eq!(
            directory
                .owner_of(Path::new("/sys/fs/cgroup/agents/other"))
                .as_deref(),
            Some("outer")
        );
        assert_eq!(
            directory.owner_of(Path::new("/sys/fs/cgroup/agentsx")),
            None
        );
    }

    #[test]
    fn a_process_in_no_agent_resolves_to_none() {
        let directory = AgentDirectory::new("/sys/fs/cgroup".into(), Vec::new());
        let workload = Workload {
            cgroup_id: CgroupId(1),
            pid: std::process::id(),
        };
        assert_eq!(directory.resolve(&workload), None);
    }
}
