//! The control layer: every change to what the appliance administers goes through here.
//! Secrets, agents and access rules are validated by the model, written to the store, and
//! then made live: the injection layer's host table is rebuilt, capture follows the agents'
//! cgroups. The admin API calls this layer and the daemon reloads through it; neither knows
//! the other.

mod access_rules;
mod agents;
mod secrets;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use ring::rand::{SecureRandom as _, SystemRandom};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::audit::EventLog;
use crate::capture::cgroup::cgroup2_mount;
use crate::capture::containers::ContainerError;
use crate::capture::{CaptureControl, CaptureError, Cgroup};
use crate::injection::{AgentDirectory, HostTable, LiveValue, LoadedSecret, SecretInjector};
use crate::metrics::METRICS;
use crate::model::{AccessRule, SecretSpec, SecretValue, ValidationError, ValueSource};
use crate::store::{Store, StoreError};
use crate::tls::{CaError, CertificateAuthority, LeafCache};
use crate::trust::TrustFiles;
use crate::values::Sources;

pub use agents::agent_cgroups;

/// Why a control operation failed. Input errors name their field; the rest keep the chain
/// of causes for the daemon's log.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The input is invalid.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// No record has this id or name.
    #[error("no {kind} is named or has the id {key:?}")]
    NotFound {
        /// `secret`, `agent` or `rule`.
        kind: &'static str,
        /// What was asked for.
        key: String,
    },
    /// The name is taken.
    #[error("a {kind} named {name:?} already exists; choose another name or update that one")]
    Duplicate {
        /// `secret` or `agent`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A stored record no longer validates (it was written by another version, or edited).
    #[error("the stored {kind} {id} is not valid: {source}; delete it or update it to a valid definition")]
    Damaged {
        /// `secret`, `agent` or `rule`.
        kind: &'static str,
        /// Its id or name.
        id: String,
        /// What is wrong with it.
        #[source]
        source: ValidationError,
    },
    /// The store failed.
    #[error("the store failed")]
    Store(#[source] StoreError),
    /// Attaching or detaching capture failed.
    #[error("updating the intercepted cgroups failed")]
    Capture(#[from] CaptureError),
    /// Serving container namespaces failed.
    #[error("updating the served container namespaces failed")]
    Containers(#[from] ContainerError),
    /// Replacing the CA failed.
    #[error("rotating the appliance CA failed")]
    Ca(#[from] CaError),
}

impl ControlError {
    /// How a stored record of `kind` under `id` that does not validate is reported.
    fn damaged(kind: &'static str, id: &str) -> impl FnOnce(ValidationError) -> Self {
        let id = id.to_owned();
        move |source| Self::Damaged { kind, id, source }
    }
}

impl From<StoreError> for ControlError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound { kind, key } => Self::NotFound { kind, key },
            StoreError::Duplicate { kind, name } => Self::Duplicate { kind, name },
            other => Self::Store(other),
        }
    }
}

/// What capture does for the control layer: the eBPF attachments and container delivery of
/// [`CaptureControl`]. A trait so that the rest of this layer is testable without root.
pub trait Interception: Send {
    /// Intercepts the daemon's own selection and `agents`, and nothing else.
    fn reconcile(&mut self, agents: &[Cgroup]) -> Result<(), CaptureError>;
    /// Serves the container namespaces that now hold selected processes.
    fn refresh_containers(&mut self) -> Result<(), ContainerError>;
    /// How many cgroups are intercepted.
    fn selected(&self) -> usize;
    /// Their paths.
    fn selected_paths(&self) -> Vec<PathBuf>;
    /// Connections refused by capture so far, by reason.
    fn refusals(&self) -> Vec<(&'static str, u64)>;
    /// Entries in capture's maps, by map.
    fn map_entries(&self) -> Vec<(&'static str, usize)>;
}

impl Interception for CaptureControl {
    fn reconcile(&mut self, agents: &[Cgroup]) -> Result<(), CaptureError> {
        CaptureControl::reconcile(self, agents)
    }
    fn refresh_containers(&mut self) -> Result<(), ContainerError> {
        CaptureControl::refresh_containers(self)
    }
    fn selected(&self) -> usize {
        CaptureControl::selected(self)
    }
    fn selected_paths(&self) -> Vec<PathBuf> {
        CaptureControl::selected_paths(self)
    }
    fn refusals(&self) -> Vec<(&'static str, u64)> {
        CaptureControl::refusals(self)
    }
    fn map_entries(&self) -> Vec<(&'static str, usize)> {
        CaptureControl::map_entries(self)
    }
}

/// What was made live by a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// Secrets in the host table.
    pub secrets: usize,
    /// Access rules in the host table.
    pub rules: usize,
    /// Cgroups intercepted.
    pub intercepted: usize,
}

/// The control layer.
pub struct Control {
    store: Store,
    injector: Arc<SecretInjector>,
    leaves: Arc<LeafCache>,
    ca_dir: PathBuf,
    events: Arc<EventLog>,
    capture: Mutex<Box<dyn Interception>>,
    sources: Arc<Sources>,
    trust: Arc<TrustFiles>,
    live: Mutex<LiveSet>,
    /// Told when the intercepted cgroups change, so the container follower watches the new
    /// ones at once (a process may join an agent's cgroup right after the agent is made).
    selection_changed: tokio::sync::Notify,
}

/// What is live in the injection layer, kept here so that a change touches only what it
/// changes: one secret's change decrypts and parses that secret, and re-indexes its hosts.
#[derive(Default)]
struct LiveSet {
    secrets: BTreeMap<String, Arc<LoadedSecret>>,
    access: BTreeMap<String, AccessRule>,
    /// The index over both, changed with them.
    table: HostTable,
}

/// What the control layer works on.
pub struct Parts {
    /// The store.
    pub store: Store,
    /// Where secrets, access rules and agents are made live.
    pub injector: Arc<SecretInjector>,
    /// The leaf cache, whose CA rotation replaces.
    pub leaves: Arc<LeafCache>,
    /// Where the CA lives.
    pub ca_dir: PathBuf,
    /// Audit events.
    pub events: Arc<EventLog>,
    /// Capture.
    pub capture: Box<dyn Interception>,
    /// Values fetched from their sources.
    pub sources: Arc<Sources>,
    /// The files clients trust the CA by, rebuilt when it rotates.
    pub trust: Arc<TrustFiles>,
}

/// Store and capture calls touch the disk (sled flushes before answering) and the kernel:
/// off the reactor when called from it.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(work),
        Err(_) => work(),
    }
}

/// RFC 3339, now.
fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// A fresh random id such as `sec_3f…`.
fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 12];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random generator does not fail on Linux");
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{prefix}_{hex}")
}

impl Control {
    /// Control over `parts.store`, making changes live in the injection layer and capture,
    /// with values that live elsewhere fetched by `parts.sources`. Nothing is loaded yet:
    /// call [`Control::reload`].
    pub fn new(parts: Parts) -> Self {
        Self {
            store: parts.store,
            injector: parts.injector,
            leaves: parts.leaves,
            ca_dir: parts.ca_dir,
            events: parts.events,
            capture: Mutex::new(parts.capture),
            sources: parts.sources,
            trust: parts.trust,
            live: Mutex::new(LiveSet::default()),
            selection_changed: tokio::sync::Notify::new(),
        }
    }

    /// Completes once the intercepted cgroups have changed since the last time it did.
    pub async fn selection_changed(&self) {
        self.selection_changed.notified().await;
    }

    fn capture(&self) -> MutexGuard<'_, Box<dyn Interception>> {
        self.capture
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The audit events.
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    /// How many secrets the store holds.
    pub fn secret_count(&self) -> Result<usize, ControlError> {
        Ok(self.store.list_secrets()?.len())
    }

    /// How many cgroups are intercepted.
    pub fn intercepted_cgroups(&self) -> usize {
        self.capture().selected()
    }

    /// How many leaf certificates were minted since the start.
    pub fn leaves_minted(&self) -> u64 {
        self.leaves.minted()
    }

    /// The appliance CA's certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.leaves.ca().certificate_pem().to_owned()
    }

    /// Replaces the CA; new leaves are signed by the new one. Returns its certificate.
    pub fn rotate_ca(&self) -> Result<String, ControlError> {
        let ca = CertificateAuthority::rotate(&self.ca_dir)?;
        let pem = ca.certificate_pem().to_owned();
        self.leaves.replace_ca(ca);
        // Clients that trust the CA through the trust files keep doing so.
        if let Err(error) = self.trust.write(&pem) {
            warn!(error = %format!("{:#}", anyhow::Error::new(error)), "rewriting the trust files for the new CA failed; clients must be given it by hand");
        }
        info!(target: "appliance::audit", event = "ca_rotated", "appliance CA rotated");
        Ok(pem)
    }

    /// Every metric, with the gauges read at scrape time (store size, capture maps) fresh.
    pub fn metrics(&self) -> String {
        METRICS
            .store_bytes
            .set(i64::try_from(crate::files::size_on_disk(self.store.path())).unwrap_or(i64::MAX));
        let capture = self.capture();
        let entries = capture.map_entries();
        let refusals = capture.refusals();
        drop(capture);
        for (reason, total) in refusals {
            METRICS.observe_refusals(reason, total);
        }
        for (map, count) in entries {
            METRICS
                .capture_map_entries
                .with_label_values(&[map])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        METRICS.render()
    }

    /// Makes the store live: rebuilds the host table from its secrets and access rules, and
    /// intercepts its agents' cgroups.
    pub fn reload(&self) -> Result<Loaded, ControlError> {
        let (secrets, rules) = self.rebuild_host_table()?;
        let intercepted = self.reconcile_agents()?;
        Ok(Loaded {
            secrets,
            rules,
            intercepted,
        })
    }

    /// The secret of `record`, whose definition validated as `spec`, with its value: the
    /// sealed one for an inline secret, else the cached or pending one of its source.
    fn loaded_secret(
        &self,
        id: &str,
        spec: SecretSpec,
        sealed: Option<SecretValue>,
    ) -> Result<LoadedSecret, ControlError> {
        let value = match (&spec.source, sealed) {
            (ValueSource::Inline, Some(value)) => Arc::new(LiveValue::fixed(value, &spec.rules)),
            (ValueSource::Inline, None) => {
                return Err(ControlError::Store(StoreError::Corrupt {
                    id: id.to_owned(),
                    reason: "its value is missing".into(),
                }))
            }
            (_, _) => self.sources.live(id, &spec),
        };
        Ok(LoadedSecret::new(id.to_owned(), spec, value))
    }

    fn live(&self) -> MutexGuard<'_, LiveSet> {
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes `live` the injection layer's: a new host table over the same secrets.
    fn publish(&self, live: &LiveSet) {
        METRICS
            .secrets
            .set(i64::try_from(live.secrets.len()).unwrap_or(i64::MAX));
        self.injector.replace(live.table.clone());
    }

    /// Puts `secret` live, in place of the one with its id.
    fn set_secret(&self, secret: LoadedSecret) {
        if secret.spec.source == ValueSource::Inline {
            self.sources.forget(&secret.id);
        }
        let secret = Arc::new(secret);
        let mut live = self.live();
        if let Some(old) = live.secrets.insert(secret.id.clone(), Arc::clone(&secret)) {
            live.table.remove_secret(&old);
        }
        live.table.add_secret(&secret);
        self.publish(&live);
    }

    /// Takes the secret `id` out of the injection layer.
    fn drop_secret(&self, id: &str) {
        self.sources.forget(id);
        let mut live = self.live();
        if let Some(old) = live.secrets.remove(id) {
            live.table.remove_secret(&old);
        }
        self.publish(&live);
    }

    /// Puts the access rule `id` live, or takes it out (`None`).
    fn set_access_rule(&self, id: &str, rule: Option<AccessRule>) {
        let mut live = self.live();
        if let Some(old) = live.access.remove(id) {
            live.table.remove_access_rule(id, &old);
        }
        if let Some(rule) = rule {
            live.table.add_access_rule(id.to_owned(), rule.clone());
            live.access.insert(id.to_owned(), rule);
        }
        self.publish(&live);
    }

    /// Loads every secret and access rule from the store and makes them live; returns how
    /// many of each.
    fn rebuild_host_table(&self) -> Result<(usize, usize), ControlError> {
        let mut fresh = LiveSet::default();
        for (record, sealed) in self.store.load_secrets()? {
            let spec = record
                .definition
                .validate()
                .map_err(ControlError::damaged("secret", &record.id))?;
            let secret = self.loaded_secret(&record.id, spec, sealed)?;
            fresh.secrets.insert(record.id, Arc::new(secret));
        }
        let fetched: std::collections::HashSet<&str> = fresh
            .secrets
            .values()
            .filter(|secret| secret.spec.source != ValueSource::Inline)
            .map(|secret| secret.id.as_str())
            .collect();
        self.sources.retain(&fetched);
        for record in self.store.list_rules()? {
            let rule = record
                .definition
                .validate()
                .map_err(ControlError::damaged("rule", &record.id))?;
            fresh.access.insert(record.id, rule);
        }
        let counts = (fresh.secrets.len(), fresh.access.len());
        fresh.table = HostTable::new(
            fresh.secrets.values().cloned().collect(),
            fresh
                .access
                .iter()
                .map(|(id, rule)| (id.clone(), rule.clone()))
                .collect(),
        );
        let mut live = self.live();
        *live = fresh;
        self.publish(&live);
        Ok(counts)
    }

    /// Attaches capture to every agent's cgroups (and the daemon's own selection), detaches
    /// the rest, serves the container namespaces they lead to, and tells the injection layer
    /// which cgroup belongs to which agent. Agents whose cgroups have disappeared are skipped
    /// with a warning. Returns how many cgroups are intercepted.
    fn reconcile_agents(&self) -> Result<usize, ControlError> {
        let mut cgroups = Vec::new();
        let mut owners = Vec::new();
        for record in self.store.list_agents()? {
            let name = record.definition.name.as_deref().unwrap_or_default();
            let spec = record
                .definition
                .validate()
                .map_err(ControlError::damaged("agent", name))?;
            match agent_cgroups(&spec) {
                Ok(found) => {
                    for cgroup in found {
                        owners.push((spec.name.clone(), cgroup.path().to_path_buf()));
                        cgroups.push(cgroup);
                    }
                }
                Err(error) => {
                    warn!(agent = %spec.name, %error, "agent cgroup unavailable; not intercepted")
                }
            }
        }
        let mut capture = self.capture();
        capture.reconcile(&cgroups)?;
        capture.refresh_containers()?;
        let mount = cgroup2_mount()?;
        self.injector
            .replace_agents(AgentDirectory::new(mount, owners));
        // A permit is kept when the follower is busy, so no change goes unwatched.
        self.selection_changed.notify_one();
        Ok(capture.selected())
    }

    /// The intercepted cgroups' paths.
    pub fn selected_paths(&self) -> Vec<PathBuf> {
        self.capture().selected_paths()
    }

    /// Serves container namespaces as they are now; returns the intercepted cgroups' paths
    /// (for the follower to watch).
    pub fn refresh_containers(&self) -> Result<Vec<PathBuf>, ControlError> {
        let mut capture = self.capture();
        capture.refresh_containers()?;
        Ok(capture.selected_paths())
    }
}

#[cfg(test)]
mod tests;
