//! Audit events: one per intercepted request (which workload, which secrets by id and name,
//! host, method, path, status, time; never values). Written as structured log lines, kept
//! in a bounded in-memory log for `/v1/events`, and, for the daemon, appended to a durable
//! log on disk ([`file`]) that the in-memory log is filled from again at start, so events and
//! every secret's `lastUsedAt` survive restarts.

mod file;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

pub use file::AuditFileSettings;

use serde_json::Value;
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

/// Which events a reader wants; every field that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// At or after this time.
    pub since: Option<OffsetDateTime>,
    /// Of this agent.
    pub agent: Option<String>,
    /// Injecting this secret (by name or id).
    pub secret: Option<String>,
    /// For this host (TLS server name).
    pub host: Option<String>,
}

impl EventFilter {
    fn matches(&self, recorded: &Recorded) -> bool {
        let event = &recorded.event;
        self.since.is_none_or(|since| recorded.time >= since)
            && self
                .agent
                .as_deref()
                .is_none_or(|wanted| event.agent.as_deref() == Some(wanted))
            && self
                .host
                .as_deref()
                .is_none_or(|wanted| *event.host == *wanted)
            && self.secret.as_deref().is_none_or(|wanted| {
                event
                    .secrets
                    .iter()
                    .any(|secret| *secret.name == *wanted || *secret.id == *wanted)
            })
    }
}

/// The outcomes an event can have, for reading events back from the durable log.
const OUTCOMES: [&str; 5] = ["forwarded", "blocked", "misdirected", "rejected", "failed"];

/// An event with its place in the log.
pub(crate) struct Recorded {
    sequence: u64,
    time: OffsetDateTime,
    event: AuditEvent,
}

impl Recorded {
    /// The event as `/v1/events` and the durable log show it.
    fn to_json(&self) -> Value {
        serde_json::to_value(self.line()).unwrap_or_default()
    }

    /// The event as one line of the durable log.
    fn to_line(&self) -> String {
        serde_json::to_string(&self.line()).unwrap_or_default()
    }

    fn line(&self) -> EventLine<'_> {
        let event = &self.event;
        EventLine {
            agent: event.agent.as_deref(),
            cgroup_id: event.cgroup_id,
            container: event.container.as_deref(),
            host: &event.host,
            method: event.method.as_str(),
            netns_cookie: event.netns_cookie,
            outcome: event.outcome,
            path: &event.path,
            pid: event.pid,
            secrets: event
                .secrets
                .iter()
                .map(|secret| SecretLine {
                    id: &secret.id,
                    name: &secret.name,
                })
                .collect(),
            seq: self.sequence,
            status: event.status,
            time: rfc3339(self.time),
        }
    }

    /// Reads back what [`Recorded::to_json`] wrote; `None` for anything else.
    fn from_json(json: &Value) -> Option<Self> {
        let text = |field: &str| json[field].as_str().map(Arc::from);
        let number = |field: &str| json[field].as_u64();
        let secrets = json["secrets"]
            .as_array()?
            .iter()
            .map(|secret| {
                Some(SecretUse {
                    id: secret["id"].as_str()?.into(),
                    name: secret["name"].as_str()?.into(),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let outcome = json["outcome"].as_str()?;
        Some(Self {
            sequence: number("seq")?,
            time: OffsetDateTime::parse(json["time"].as_str()?, &Rfc3339).ok()?,
            event: AuditEvent {
                agent: text("agent"),
                cgroup_id: number("cgroupId")?,
                pid: u32::try_from(number("pid")?).ok()?,
                netns_cookie: number("netnsCookie")?,
                container: text("container"),
                secrets,
                host: text("host")?,
                method: json["method"].as_str()?.parse().ok()?,
                path: json["path"].as_str()?.to_owned(),
                status: u16::try_from(number("status")?).ok()?,
                outcome: OUTCOMES.into_iter().find(|known| *known == outcome)?,
            },
        })
    }
}

/// An event as the API and the durable log show it, borrowed from the event: rendered by
/// serde straight to text, with no intermediate JSON tree (a fifth of the audit writer's
/// time went to building and dropping one). Fields in alphabetical order, as written before.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct EventLine<'a> {
    agent: Option<&'a str>,
    cgroup_id: u64,
    container: Option<&'a str>,
    host: &'a str,
    method: &'a str,
    netns_cookie: u64,
    outcome: &'a str,
    path: &'a str,
    pid: u32,
    secrets: Vec<SecretLine<'a>>,
    seq: u64,
    status: u16,
    time: String,
}

#[derive(serde::Serialize)]
struct SecretLine<'a> {
    id: &'a str,
    name: &'a str,
}

/// The most of a request's path an audit event keeps: the agent chooses the path, and
/// whatever it sends is kept in memory, on disk and in every `/v1/events` answer.
const MAX_AUDITED_PATH: usize = 1024;

/// Cuts `path` to [`MAX_AUDITED_PATH`] bytes (at a character boundary), saying how long it
/// was.
fn cap_path(path: &mut String) {
    if path.len() <= MAX_AUDITED_PATH {
        return;
    }
    let length = path.len();
    let mut end = MAX_AUDITED_PATH;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    path.truncate(end);
    path.push_str(&format!("…[{length} bytes]"));
}

/// A bounded log of recent events with increasing sequence numbers. Events are rendered as
/// JSON only when read, or by the durable log's own thread: recording one stays cheap.
pub struct EventLog {
    capacity: usize,
    entries: Mutex<VecDeque<Arc<Recorded>>>,
    latest: watch::Sender<u64>,
    last_used: Arc<file::LastUsed>,
    durable: Mutex<Option<file::Writer>>,
    /// Where the durable log reserves sequence numbers, and up to which it has.
    reserved: Option<(std::path::PathBuf, std::sync::atomic::AtomicU64)>,
}

/// The durable log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("opening the audit log in {} failed; check that the state directory is writable", dir.display())]
pub struct AuditLogError {
    dir: std::path::PathBuf,
    #[source]
    source: std::io::Error,
}

impl EventLog {
    /// A log keeping the last `capacity` events in memory only.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: Mutex::new(VecDeque::new()),
            latest: watch::Sender::new(0),
            last_used: Arc::default(),
            durable: Mutex::new(None),
            reserved: None,
        }
    }

    /// A log that also appends every event to the durable log in `settings.dir`, starting
    /// with the last `capacity` events found there (sequence numbers continue after them)
    /// and the secrets' last-used times.
    pub fn open(capacity: usize, settings: AuditFileSettings) -> Result<Self, AuditLogError> {
        let dir = settings.dir.clone();
        let (writer, last_used, recent) =
            file::open(settings, capacity).map_err(|source| AuditLogError {
                dir: dir.clone(),
                source,
            })?;
        let reserved = file::reserved_sequence(&dir);
        let log = Self {
            last_used,
            durable: Mutex::new(Some(writer)),
            reserved: Some((dir, std::sync::atomic::AtomicU64::new(reserved))),
            ..Self::new(capacity)
        };
        let mut entries = log.lock();
        let skip = recent.len().saturating_sub(log.capacity);
        entries.extend(
            recent
                .iter()
                .skip(skip)
                .filter_map(Recorded::from_json)
                .map(Arc::new),
        );
        // Past what an earlier run reserved: its last events may never have reached the
        // files (a full disk, a crash), and their numbers must not come again.
        let latest = entries
            .back()
            .map_or(0, |recorded| recorded.sequence)
            .max(reserved);
        drop(entries);
        log.latest.send_replace(latest);
        log.reserve_past(latest);
        Ok(log)
    }

    /// Reserves sequence numbers past `sequence` when the reservation does not cover it.
    fn reserve_past(&self, sequence: u64) {
        use std::sync::atomic::Ordering;
        let Some((dir, until)) = &self.reserved else {
            return;
        };
        if sequence < until.load(Ordering::Relaxed) {
            return;
        }
        let next = sequence + file::SEQUENCE_BLOCK;
        match file::reserve_sequence(dir, next) {
            Ok(()) => until.store(next, Ordering::Relaxed),
            Err(error) => {
                tracing::warn!(%error, dir = %dir.display(), "cannot reserve audit sequence numbers; after a restart some may be used again")
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Recorded>>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes out what the durable log was handed and stops it; later events stay in memory.
    /// The daemon calls it on a clean stop, so no recorded event is lost.
    pub fn close(&self) {
        let writer = self
            .durable
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(writer) = writer {
            writer.close();
        }
    }

    /// The sequence number of the newest event (0 before the first).
    pub fn latest(&self) -> u64 {
        *self.latest.borrow()
    }

    /// Records `event`, writes it as a log line and counts it in the metrics.
    pub fn record(&self, mut event: AuditEvent) {
        cap_path(&mut event.path);
        let secrets: Vec<&str> = event.secrets.iter().map(|s| &*s.name).collect();
        crate::metrics::count_request(
            event.agent.as_deref().unwrap_or(""),
            &event.host,
            &secrets,
            event.outcome,
        );
        // Debug, not info: the durable log is the record of requests, and a journal line per
        // request cost a tenth of the engine's CPU (docs/benchmarks.md).
        tracing::debug!(
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
        let time = OffsetDateTime::now_utc();
        for secret in &event.secrets {
            self.last_used.set(&secret.id, time);
        }
        let mut entries = self.lock();
        let sequence = entries
            .back()
            .map_or_else(|| self.latest(), |last| last.sequence)
            + 1;
        // Under the entries' lock: one reservation at a time, before the number is used.
        self.reserve_past(sequence);
        let recorded = Arc::new(Recorded {
            sequence,
            time,
            event,
        });
        // Under the entries' lock, so the durable log gets the events in sequence order.
        if let Some(writer) = &*self
            .durable
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
        {
            writer.append(Arc::clone(&recorded));
        }
        entries.push_back(recorded);
        while entries.len() > self.capacity {
            entries.pop_front();
        }
        self.latest.send_replace(sequence);
    }

    /// Events with a sequence number above `after`, oldest first, as JSON.
    pub fn since(&self, after: u64) -> Vec<Value> {
        self.matching(after, &EventFilter::default())
    }

    /// Events with a sequence number above `after` that `filter` lets through, oldest
    /// first, as JSON.
    pub fn matching(&self, after: u64, filter: &EventFilter) -> Vec<Value> {
        self.lock()
            .iter()
            .filter(|recorded| recorded.sequence > after && filter.matches(recorded))
            .map(|recorded| recorded.to_json())
            .collect()
    }

    /// When the secret with `id` was last injected (kept across restarts by the durable log).
    pub fn last_used(&self, id: &str) -> Option<String> {
        self.last_used.get(id)
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
    use serde_json::json;

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
    fn an_event_reads_back_as_it_was_written() {
        let recorded = Recorded {
            sequence: 7,
            time: OffsetDateTime::parse("2026-12-01T10:00:00.5Z", &Rfc3339).unwrap(),
            event: AuditEvent {
                agent: Some("research".into()),
                container: Some("libpod-1.scope".into()),
                ..event("/v1/models")
            },
        };
        let json = recorded.to_json();
        let read = Recorded::from_json(&json).unwrap();
        assert_eq!(read.sequence, 7);
        assert_eq!(read.time, recorded.time);
        assert_eq!(read.event, recorded.event);
        assert!(Recorded::from_json(&json!({"seq": 1})).is_none());
    }

    #[test]
    fn sequence_numbers_are_never_used_twice_across_restarts_even_when_lines_were_lost() {
        let settings = AuditFileSettings {
            dir: crate::test_support::temp_dir("audit-sequence").join("audit"),
            max_file_bytes: 1 << 20,
            keep_files: 1,
        };
        let log = EventLog::open(10, settings.clone()).unwrap();
        for path in ["/1", "/2", "/3"] {
            log.record(event(path));
        }
        log.close();
        assert_eq!(log.latest(), 3);
        // The lines never reached the disk (it was full, or the machine crashed).
        std::fs::remove_file(settings.dir.join("events.jsonl")).unwrap();
        let log = EventLog::open(10, settings).unwrap();
        log.record(event("/4"));
        log.close();
        let after = log.latest();
        assert!(after > 3, "sequence number {after} used again");
        // A follower at after=3 sees the new event.
        assert_eq!(log.since(3).len(), 1);
    }

    #[test]
    fn an_agents_long_path_is_kept_cut_to_size() {
        let log = EventLog::new(2);
        let long = format!("/{}", "é".repeat(30_000));
        log.record(event(&long));
        let kept = log.since(0)[0]["path"].as_str().unwrap().to_owned();
        assert!(kept.len() < MAX_AUDITED_PATH + 32, "{} bytes", kept.len());
        assert!(
            kept.starts_with("/éé") && kept.ends_with("…[60001 bytes]"),
            "{kept}"
        );
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
