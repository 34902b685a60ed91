//! Audit events: one per intercepted request (which workload, which secrets by id and name,
//! host, method, path, status, time; never values). Kept in a bounded in-memory log for
//! `/v1/events` and written as structured log lines.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::watch;

/// A secret used for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretUse {
    /// Its id.
    pub id: Arc<str>,
    /// Its name.
    pub name: Arc<str>,
}

/// One audited request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    /// The agent the workload belongs to, if any.
    pub agent: Option<Arc<str>>,
    /// cgroup v2 id of the workload.
    pub cgroup_id: u64,
    /// Its pid.
    pub pid: u32,
    /// Cookie of its network namespace.
    pub netns_cookie: u64,
    /// Its container's unit (`docker-<id>.scope`, …), when it runs in one.
    pub container: Option<Arc<str>>,
    /// Secrets injected.
    pub secrets: Vec<SecretUse>,
    /// TLS server name.
    pub host: Arc<str>,
    /// HTTP method.
    pub method: http::Method,
    /// Request path (no query: it may hold a credential).
    pub path: String,
    /// Response status sent to the client.
    pub status: u16,
    /// `forwarded`, `blocked`, `misdirected` or `failed`.
    pub outcome: &'static str,
}

/// A bounded log of recent events with increasing sequence numbers.
pub struct EventLog {
    capacity: usize,
    entries: Mutex<VecDeque<(u64, OffsetDateTime, AuditEvent)>>,
    latest: watch::Sender<u64>,
}

impl EventLog {
    /// A log keeping the last `capacity` events.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: Mutex::new(VecDeque::new()),
            latest: watch::Sender::new(0),
        }
    }

    /// Records `event`, writes it as a log line and counts it in the metrics.
    pub fn record(&self, event: AuditEvent) {
        let secrets: Vec<&str> = event.secrets.iter().map(|s| &*s.name).collect();
        crate::metrics::count_request(
            event.agent.as_deref().unwrap_or(""),
            &event.host,
            &secrets,
            event.outcome,
        );
        tracing::info!(
            target: "appliance::audit",
            event = "request",
            outcome = event.outcome,
            agent = event.agent.as_deref().unwrap_or(""),
            cgroup_id = event.cgroup_id,
            pid = event.pid,
            netns_cookie = event.netns_cookie,
            container = event.container.as_deref().unwrap_or(""),
            host = %event.host,
            method = %event.method,
            path = %event.path,
            status = event.status,
            secrets = ?secrets,
            "audit"
        );
        // Formatted when read: most events are never asked for.
        let time = OffsetDateTime::now_utc();
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let sequence = entries.back().map_or(1, |(last, _, _)| last + 1);
        entries.push_back((sequence, time, event));
        while entries.len() > self.capacity {
            entries.pop_front();
        }
        drop(entries);
        self.latest.send_replace(sequence);
    }

    /// Events with a sequence number above `after`, oldest first, as JSON.
    pub fn since(&self, after: u64) -> Vec<Value> {
        let entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        entries
            .iter()
            .filter(|(sequence, _, _)| *sequence > after)
            .map(|(sequence, time, event)| {
                json!({
                    "seq": sequence,
                    "time": rfc3339(*time),
                    "agent": event.agent.as_deref(),
                    "cgroupId": event.cgroup_id,
                    "pid": event.pid,
                    "netnsCookie": event.netns_cookie,
                    "container": event.container.as_deref(),
                    "secrets": event.secrets.iter().map(|s| json!({"id": &*s.id, "name": &*s.name})).collect::<Vec<_>>(),
                    "host": &*event.host,
                    "method": event.method.as_str(),
                    "path": event.path,
                    "status": event.status,
                    "outcome": event.outcome,
                })
            })
            .collect()
    }

    /// When the secret with `id` was last injected, as far as the log remembers.
    pub fn last_used(&self, id: &str) -> Option<String> {
        let entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        entries
            .iter()
            .rev()
            .find(|(_, _, event)| event.secrets.iter().any(|secret| &*secret.id == id))
            .map(|(_, time, _)| rfc3339(*time))
    }

    /// Waits until an event newer than `after` exists (or the log is dropped).
    pub async fn wait_after(&self, after: u64) {
        let mut latest = self.latest.subscribe();
        let _ = latest.wait_for(|latest| *latest > after).await;
    }
}

fn rfc3339(time: OffsetDateTime) -> String {
    time.format(&Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(path: &str) -> AuditEvent {
        AuditEvent {
            agent: None,
            cgroup_id: 1,
            pid: 2,
            netns_cookie: 3,
            container: None,
            secrets: vec![SecretUse {
                id: "sec_1".into(),
                name: "a".into(),
            }],
            host: "api.example.com".into(),
            method: http::Method::GET,
            path: path.into(),
            status: 200,
            outcome: "forwarded",
        }
    }

    #[test]
    fn keeps_the_most_recent_events_in_order() {
        let log = EventLog::new(2);
        for path in ["/1", "/2", "/3"] {
            log.record(event(path));
        }
        let all = log.since(0);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0]["path"], "/2");
        assert_eq!(all[1]["seq"], 3);
        assert_eq!(log.since(2).len(), 1);
        assert_eq!(all[0]["secrets"][0]["name"], "a");
    }
}
