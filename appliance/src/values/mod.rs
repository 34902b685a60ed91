//! Value sources: a secret's value fetched from where it lives (1Password Connect, a file, a
//! command, a systemd credential), held in memory only, used for a TTL and refreshed ahead of
//! its expiry. When a source fails, the last good value stays in use for a configured while;
//! after that, requests that need it are refused (fail closed) until the source answers.

mod command;
mod file;
mod onepassword;

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::injection::LiveValue;
use crate::metrics::{self, METRICS};
use crate::model::secret::MAX_VALUE_BYTES;
use crate::model::{SecretSpec, SecretValue, ValueSource};

pub use onepassword::{ConnectError, ConnectSettings};

/// How values are fetched and kept.
#[derive(Clone, Debug)]
pub struct SourceSettings {
    /// How long a fetched value is used before it must be fetched again; it is refreshed at
    /// three quarters of this.
    pub ttl: Duration,
    /// How long past its TTL the last good value stays in use while the source fails.
    pub max_stale: Duration,
    /// Limit on one command run, or one 1Password Connect exchange.
    pub timeout: Duration,
    /// Whether secrets may take their value from a command (run as the daemon's user).
    pub allow_commands: bool,
    /// The directories `file` sources may read from.
    pub file_dirs: Vec<PathBuf>,
    /// 1Password Connect, when configured.
    pub onepassword: Option<ConnectSettings>,
    /// systemd's `$CREDENTIALS_DIRECTORY`.
    pub credentials_dir: Option<PathBuf>,
    /// SO_MARK of the daemon's own connections (to 1Password Connect), so capture skips them.
    pub own_mark: u32,
    /// Trust for `https://` Connect servers.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Why a source gave no value. Never carries the value.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file (or credential) cannot be read, or may not be.
    #[error(transparent)]
    File(#[from] file::FileError),
    /// The source did not answer in time.
    #[error("{what} did not answer within {seconds} s")]
    Timeout {
        /// What was asked.
        what: String,
        /// The limit.
        seconds: u64,
    },
    /// The source gave nothing.
    #[error("{what} is empty")]
    Empty {
        /// What was read.
        what: String,
    },
    /// The source gave more than a value may hold.
    #[error("{what} holds more than {MAX_VALUE_BYTES} bytes")]
    TooLong {
        /// What was read.
        what: String,
    },
    /// Running the command failed.
    #[error(transparent)]
    Command(#[from] command::CommandError),
    /// Commands are not allowed.
    #[error("command sources are disabled; set values.allow_commands = true in the daemon's configuration (commands run as the daemon's user)")]
    CommandsDisabled,
    /// The daemon has no systemd credentials.
    #[error("the daemon has no systemd credentials ($CREDENTIALS_DIRECTORY is unset); give it the credential with LoadCredential= in its unit")]
    NoCredentials,
    /// 1Password Connect is not configured.
    #[error("1Password Connect is not configured; set OP_CONNECT_HOST and OP_CONNECT_TOKEN for the daemon, or onepassword.connect_host and the token credential in its configuration")]
    NoConnect,
    /// 1Password Connect refused or failed.
    #[error(transparent)]
    OnePassword(#[from] ConnectError),
    /// Inline values are not fetched.
    #[error("inline values live in the store")]
    Inline,
}

impl SourceError {
    /// The error with its causes, on one line, for logs and answers.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

/// A file's contents as a value: a trailing line break dropped, length checked.
fn value_from_bytes(mut bytes: Vec<u8>, what: &str) -> Result<SecretValue, SourceError> {
    while bytes
        .last()
        .is_some_and(|byte| *byte == b'\n' || *byte == b'\r')
    {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(SourceError::Empty { what: what.into() });
    }
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(SourceError::TooLong { what: what.into() });
    }
    SecretValue::new(bytes).map_err(|_| SourceError::Empty { what: what.into() })
}

/// How many values are fetched at once.
const CONCURRENT_FETCHES: usize = 16;

/// What the cache knows of one secret's fetched value.
struct Entry {
    source: ValueSource,
    /// The value in the current host table, once one holds the secret.
    live: Option<Arc<LiveValue>>,
    /// The last value fetched, and when.
    good: Option<(SecretValue, Instant)>,
    /// When to fetch next.
    due: Instant,
    /// The last failure, while the source keeps failing.
    failing: Option<String>,
}

/// The value sources: fetching, and the in-memory cache of fetched values.
pub struct Sources {
    settings: SourceSettings,
    /// `settings.file_dirs` as real paths.
    file_dirs: Vec<PathBuf>,
    connect: Option<onepassword::Connect>,
    entries: Mutex<HashMap<String, Entry>>,
    /// Value files found readable by every user, warned about once each.
    readable_by_all: Mutex<HashSet<PathBuf>>,
    wake: Notify,
}

impl Sources {
    /// Sources with `settings`.
    pub fn new(settings: SourceSettings) -> Self {
        let connect = settings.onepassword.clone().map(|connect| {
            onepassword::Connect::new(
                connect,
                settings.tls.clone(),
                settings.timeout,
                settings.own_mark,
            )
        });
        Self {
            file_dirs: file::real_directories(&settings.file_dirs),
            settings,
            connect,
            entries: Mutex::new(HashMap::new()),
            readable_by_all: Mutex::new(HashSet::new()),
            wake: Notify::new(),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads a value file off the reactor: inside the allowed directories when `confined`
    /// (a credential lies in systemd's directory for the daemon), under the checks of
    /// [`file::read`].
    async fn read_file(
        &self,
        path: &Path,
        confined: bool,
        what: &str,
    ) -> Result<SecretValue, SourceError> {
        let allowed = confined.then(|| self.file_dirs.clone());
        let owned = path.to_path_buf();
        let read = tokio::task::spawn_blocking(move || file::read(&owned, allowed.as_deref()))
            .await
            .map_err(|error| {
                SourceError::File(file::FileError::Read {
                    path: path.to_path_buf(),
                    source: io::Error::other(error.to_string()),
                })
            })??;
        if read.world_readable
            && self
                .readable_by_all
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(path.to_path_buf())
        {
            warn!(path = %path.display(), "a value file is readable by every user; chmod o-r it");
        }
        value_from_bytes(read.bytes, what)
    }

    /// Fetches the value of `source` now, bypassing the cache, within the configured
    /// timeout: a source that hangs (a FIFO, a hung network file system, a stuck server)
    /// fails instead of holding the others up.
    pub async fn fetch(&self, source: &ValueSource) -> Result<SecretValue, SourceError> {
        let what = source.describe();
        // A moment past the limit that commands and 1Password keep themselves, so that
        // theirs, which says more, comes first.
        let limit = self.settings.timeout + Duration::from_secs(1);
        let fetched = tokio::time::timeout(limit, self.fetch_now(source, &what))
            .await
            .unwrap_or_else(|_| {
                Err(SourceError::Timeout {
                    what: what.clone(),
                    seconds: limit.as_secs(),
                })
            });
        let result = if fetched.is_ok() { "ok" } else { "failed" };
        metrics::count(&METRICS.value_fetches, &[source.kind().as_str(), result]);
        fetched
    }

    async fn fetch_now(
        &self,
        source: &ValueSource,
        what: &str,
    ) -> Result<SecretValue, SourceError> {
        match source {
            ValueSource::Inline => Err(SourceError::Inline),
            ValueSource::File(path) => self.read_file(path, true, what).await,
            ValueSource::Credential(name) => {
                let dir = self
                    .settings
                    .credentials_dir
                    .as_deref()
                    .ok_or(SourceError::NoCredentials)?;
                self.read_file(&dir.join(name), false, what).await
            }
            ValueSource::Command(argv) => {
                if !self.settings.allow_commands {
                    return Err(SourceError::CommandsDisabled);
                }
                let output = command::run(argv, self.settings.timeout).await?;
                value_from_bytes(output, what)
            }
            ValueSource::OnePassword(reference) => {
                let connect = self.connect.as_ref().ok_or(SourceError::NoConnect)?;
                let text = connect.resolve(reference).await?;
                value_from_bytes(text.as_bytes().to_vec(), what)
            }
        }
    }

    /// Keeps `value`, just fetched from `source` for the secret `id`, so that the next host
    /// table starts with it instead of fetching again.
    pub fn remember(&self, id: &str, source: &ValueSource, value: SecretValue) {
        let now = Instant::now();
        self.entries().insert(
            id.to_owned(),
            Entry {
                source: source.clone(),
                live: None,
                good: Some((value, now)),
                due: now + self.refresh_after(),
                failing: None,
            },
        );
        self.wake.notify_one();
    }

    /// When a value fetched at `fetched` becomes too old to use.
    fn usable_until(&self, fetched: Instant) -> Instant {
        fetched + self.settings.ttl + self.settings.max_stale
    }

    fn refresh_after(&self) -> Duration {
        self.settings.ttl * 3 / 4
    }

    fn retry_after(&self) -> Duration {
        (self.settings.ttl / 4).min(Duration::from_secs(5))
    }

    /// The live value of the secret `id` for a new host table: the cached value when its
    /// source is unchanged and the value still usable, else pending until the refresher
    /// fetches it.
    pub fn live(&self, id: &str, spec: &SecretSpec) -> Arc<LiveValue> {
        let live = Arc::new(LiveValue::pending(&spec.source.describe(), &spec.rules));
        let now = Instant::now();
        let mut entries = self.entries();
        let entry = entries.entry(id.to_owned()).or_insert_with(|| Entry {
            source: spec.source.clone(),
            live: None,
            good: None,
            due: now,
            failing: None,
        });
        if entry.source != spec.source {
            entry.source = spec.source.clone();
            entry.good = None;
            entry.due = now;
            entry.failing = None;
        }
        entry.live = Some(Arc::clone(&live));
        match (&entry.good, &entry.failing) {
            (Some((value, fetched)), _) if now < self.usable_until(*fetched) => {
                live.set_until(value.clone(), self.usable_until(*fetched));
            }
            (_, Some(reason)) => live.fail(reason.clone()),
            _ => {}
        }
        drop(entries);
        // The refresher may be sleeping until a later entry falls due, or for good when
        // there were none.
        self.wake.notify_one();
        live
    }

    /// Forgets the secret `id` (deleted, or inline now).
    pub fn forget(&self, id: &str) {
        self.entries().remove(id);
    }

    /// Forgets the secrets not in `ids` (deleted, or inline now).
    pub fn retain(&self, ids: &HashSet<&str>) {
        self.entries().retain(|id, _| ids.contains(id.as_str()));
    }

    /// Fetches every value that is due, several at once (each within the timeout, so one
    /// source that hangs holds no other up), and applies the results: a fresh value is used
    /// at once; a failure keeps the last good value until `ttl + max_stale` after it was
    /// fetched, then makes requests that need it fail. Requests check that age themselves
    /// too, so a value is never used longer, whatever the refresher is doing.
    pub async fn refresh_due(self: &Arc<Self>) {
        let now = Instant::now();
        let due: Vec<(String, ValueSource)> = self
            .entries()
            .iter()
            .filter(|(_, entry)| entry.due <= now)
            .map(|(id, entry)| (id.clone(), entry.source.clone()))
            .collect();
        let at_once = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_FETCHES));
        let mut fetches = tokio::task::JoinSet::new();
        for (id, source) in due {
            let sources = Arc::clone(self);
            let at_once = Arc::clone(&at_once);
            fetches.spawn(async move {
                let _permit = at_once.acquire_owned().await;
                let fetched = sources.fetch(&source).await;
                (id, source, fetched)
            });
        }
        while let Some(done) = fetches.join_next().await {
            match done {
                Ok((id, source, fetched)) => self.apply(&id, &source, fetched),
                // Its entry stays due: the next round fetches it again.
                Err(error) => warn!(%error, "fetching a secret's value panicked"),
            }
        }
    }

    /// Applies what fetching `source` for the secret `id` gave.
    fn apply(&self, id: &str, source: &ValueSource, fetched: Result<SecretValue, SourceError>) {
        let now = Instant::now();
        let mut entries = self.entries();
        // Deleted or changed while fetching: the next round deals with it.
        let Some(entry) = entries.get_mut(id).filter(|entry| entry.source == *source) else {
            return;
        };
        match fetched {
            Ok(value) => {
                if entry.failing.take().is_some() {
                    info!(secret_id = %id, source = %source.describe(), "value source answers again");
                }
                if let Some(live) = &entry.live {
                    live.set_until(value.clone(), self.usable_until(now));
                }
                entry.good = Some((value, now));
                entry.due = now + self.refresh_after();
            }
            Err(error) => {
                let reason = error.chain();
                let usable_until = entry
                    .good
                    .as_ref()
                    .map(|(_, fetched)| self.usable_until(*fetched));
                let stale = usable_until.is_none_or(|until| now >= until);
                if entry.failing.as_deref() != Some(reason.as_str()) {
                    warn!(secret_id = %id, source = %source.describe(), error = %reason, using_last_good = !stale, "fetching a secret's value failed");
                }
                if stale {
                    if let Some(live) = &entry.live {
                        live.fail(reason.clone());
                    }
                    entry.good = None;
                }
                entry.failing = Some(reason);
                entry.due = now + self.retry_after();
            }
        }
    }

    /// Refreshes values as they fall due until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            self.refresh_due().await;
            let next = self
                .entries()
                .values()
                .map(|entry| entry.due)
                .min()
                .map_or(Duration::from_secs(60), |due| {
                    due.saturating_duration_since(Instant::now())
                });
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(next.max(Duration::from_millis(50))) => {}
                () = self.wake.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
