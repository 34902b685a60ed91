//! The routes of the admin API. [`ROUTES`] is the single list the server dispatches on and
//! that `docs/openapi.yaml` is checked against.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::ApiError;
use std::sync::Mutex;

use crate::audit::{EventFilter, EventLog};
use crate::capture::{CaptureControl, CaptureError, Cgroup};
use crate::injection::{AgentDirectory, SecretIndex, SecretInjector};
use crate::policy::{AccessPolicy, AgentSpec};
use crate::secret::ValidationError;
use crate::secret::{Injection, SecretSpec};
use crate::store::{SecretRecord, Store};
use crate::tls::{CertificateAuthority, LeafCache};

/// What a route does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handler {
    /// Daemon, capture and store status.
    Health,
    /// The CA certificate.
    CaGet,
    /// Replace the CA.
    CaRotate,
    /// Recent audit events.
    Events,
    /// Prometheus metrics.
    Metrics,
    /// List secrets.
    SecretList,
    /// Create a secret.
    SecretCreate,
    /// Read a secret.
    SecretGet,
    /// Change a secret.
    SecretUpdate,
    /// Delete a secret.
    SecretDelete,
    /// List agents.
    AgentList,
    /// Create an agent (attaches capture to its cgroups).
    AgentCreate,
    /// Read an agent.
    AgentGet,
    /// Change an agent.
    AgentUpdate,
    /// Delete an agent (detaches capture from cgroups nothing else selects).
    AgentDelete,
    /// List access rules.
    RuleList,
    /// Create an access rule.
    RuleCreate,
    /// Read an access rule.
    RuleGet,
    /// Change an access rule.
    RuleUpdate,
    /// Delete an access rule.
    RuleDelete,
}

/// One endpoint.
#[derive(Debug)]
pub struct Route {
    /// HTTP method.
    pub method: &'static str,
    /// Path, with `{id}` for the record segment.
    pub path: &'static str,
    /// Whether it reads a JSON body.
    pub takes_body: bool,
    /// What it does.
    pub handler: Handler,
}

const fn route(
    method: &'static str,
    path: &'static str,
    takes_body: bool,
    handler: Handler,
) -> Route {
    Route {
        method,
        path,
        takes_body,
        handler,
    }
}

/// Every endpoint the daemon serves.
pub const ROUTES: &[Route] = &[
    route("GET", "/v1/health", false, Handler::Health),
    route("GET", "/v1/ca", false, Handler::CaGet),
    route("POST", "/v1/ca/rotate", false, Handler::CaRotate),
    route("GET", "/v1/events", false, Handler::Events),
    route("GET", "/v1/metrics", false, Handler::Metrics),
    route("GET", "/v1/secrets", false, Handler::SecretList),
    route("POST", "/v1/secrets", true, Handler::SecretCreate),
    route("GET", "/v1/secrets/{id}", false, Handler::SecretGet),
    route("PATCH", "/v1/secrets/{id}", true, Handler::SecretUpdate),
    route("DELETE", "/v1/secrets/{id}", false, Handler::SecretDelete),
    route("GET", "/v1/agents", false, Handler::AgentList),
    route("POST", "/v1/agents", true, Handler::AgentCreate),
    route("GET", "/v1/agents/{id}", false, Handler::AgentGet),
    route("PATCH", "/v1/agents/{id}", true, Handler::AgentUpdate),
    route("DELETE", "/v1/agents/{id}", false, Handler::AgentDelete),
    route("GET", "/v1/rules", false, Handler::RuleList),
    route("POST", "/v1/rules", true, Handler::RuleCreate),
    route("GET", "/v1/rules/{id}", false, Handler::RuleGet),
    route("PATCH", "/v1/rules/{id}", true, Handler::RuleUpdate),
    route("DELETE", "/v1/rules/{id}", false, Handler::RuleDelete),
];

/// Matches `path` against `pattern`; `Some(Some(id))` when the pattern has `{id}`.
pub fn matches(pattern: &str, path: &str) -> Option<Option<String>> {
    let pattern_parts: Vec<&str> = pattern.split('/').collect();
    let path_parts: Vec<&str> = path.split('/').collect();
    if pattern_parts.len() != path_parts.len() {
        return None;
    }
    let mut id = None;
    for (expected, actual) in pattern_parts.iter().zip(&path_parts) {
        if *expected == "{id}" {
            if actual.is_empty() {
                return None;
            }
            id = Some((*actual).to_owned());
        } else if expected != actual {
            return None;
        }
    }
    Some(id)
}

/// The route for `method` and `path`.
pub fn find(method: &Method, path: &str) -> Option<(&'static Route, Option<String>)> {
    ROUTES.iter().find_map(|route| {
        if route.method != method.as_str() {
            return None;
        }
        matches(route.path, path).map(|id| (route, id))
    })
}

/// What the daemon shares with the API.
pub struct ApiState {
    /// Secrets.
    pub store: Store,
    /// The injection layer to refresh when secrets change.
    pub injector: Arc<SecretInjector>,
    /// Leaf cache, whose CA `ca rotate` replaces.
    pub leaves: Arc<LeafCache>,
    /// Where the CA lives.
    pub ca_dir: PathBuf,
    /// Audit events.
    pub events: Arc<EventLog>,
    /// The eBPF attachments.
    pub capture: Mutex<CaptureControl>,
}

/// An agent's cgroups, opened (or created, when the agent says so); a missing one is a
/// validation error naming it.
pub fn agent_cgroups(spec: &AgentSpec) -> Result<Vec<Cgroup>, ValidationError> {
    spec.cgroups
        .iter()
        .enumerate()
        .map(|(index, path)| {
            let opened = if spec.create {
                Cgroup::create(path)
            } else {
                Cgroup::open(path)
            };
            opened.map_err(|error| ValidationError {
                field: format!("cgroups[{index}]"),
                message: match error {
                    CaptureError::CgroupNotFound { .. } => {
                        "does not exist; create it, or set \"create\": true".into()
                    }
                    other => other.to_string(),
                },
            })
        })
        .collect()
}

impl ApiState {
    /// Every metric, with the gauges read at scrape time (store size, capture maps) fresh.
    pub fn metrics(&self) -> String {
        let metrics = &crate::metrics::METRICS;
        metrics
            .store_bytes
            .set(i64::try_from(crate::files::size_on_disk(self.store.path())).unwrap_or(i64::MAX));
        let capture = self
            .capture
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let entries = capture.map_entries();
        let refusals = capture.refusals();
        drop(capture);
        for (reason, total) in refusals {
            metrics.observe_refusals(reason, total);
        }
        for (map, count) in entries {
            metrics
                .capture_map_entries
                .with_label_values(&[map])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        metrics.render()
    }

    /// Rebuilds the injection index from the store.
    pub fn reload_secrets(&self) -> Result<usize, ApiError> {
        let secrets = self.store.load_all()?;
        let count = secrets.len();
        crate::metrics::METRICS
            .secrets
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        self.injector.replace(SecretIndex::new(secrets));
        Ok(count)
    }

    /// Rebuilds the access policy from the store.
    pub fn reload_rules(&self) -> Result<usize, ApiError> {
        let rules = self.store.load_rules()?;
        let count = rules.len();
        self.injector.replace_policy(AccessPolicy::new(rules));
        Ok(count)
    }

    /// Attaches capture to every agent's cgroups (and the daemon's own selection), detaches
    /// the rest, and tells the injection layer which cgroup belongs to which agent. Agents
    /// whose cgroups have disappeared are skipped with a warning.
    pub fn reconcile_agents(&self) -> Result<usize, ApiError> {
        let agents = self.store.load_agents()?;
        let mut cgroups = Vec::new();
        let mut owners = Vec::new();
        for agent in &agents {
            match agent_cgroups(agent) {
                Ok(found) => {
                    for cgroup in found {
                        owners.push((agent.name.clone(), cgroup.path().to_path_buf()));
                        cgroups.push(cgroup);
                    }
                }
                Err(error) => {
                    tracing::warn!(agent = %agent.name, %error, "agent cgroup unavailable; not intercepted")
                }
            }
        }
        let mut capture = self
            .capture
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        capture
            .reconcile(&cgroups)
            .map_err(|error| ApiError::internal(&error))?;
        capture
            .refresh_containers()
            .map_err(|error| ApiError::internal(&error))?;
        let mount =
            crate::capture::cgroup::cgroup2_mount().map_err(|error| ApiError::internal(&error))?;
        self.injector
            .replace_agents(AgentDirectory::new(mount, owners));
        Ok(capture.selected())
    }
}

/// A successful answer.
pub enum Reply {
    /// JSON with a status.
    Json(StatusCode, Value),
    /// 204.
    Empty,
    /// A PEM document.
    Pem(String),
    /// Metrics in the Prometheus text format.
    Metrics(String),
}

fn describe(injection: &Injection) -> Value {
    match injection {
        Injection::Headers(headers) => json!({
            "kind": "headers",
            "headers": headers.iter().map(|h| json!({
                "headerName": h.name.as_str(),
                "valueFormat": format!("{}{{value}}{}", h.format.prefix, h.format.suffix),
            })).collect::<Vec<_>>(),
        }),
        Injection::Query { name, format } => json!({
            "kind": "query", "paramName": name,
            "paramFormat": format!("{}{{value}}{}", format.prefix, format.suffix),
        }),
        Injection::PathTemplate { prefix, suffix } => json!({
            "kind": "pathTemplate", "pathTemplate": format!("{prefix}{{value}}{suffix}"),
        }),
        Injection::PathRegex { regex, replacement } => json!({
            "kind": "pathRegex", "pathRegex": regex.as_str(), "pathReplacement": replacement,
        }),
        Injection::Basic { username } => json!({"kind": "basic", "username": username}),
    }
}

fn secret_view(record: &SecretRecord, events: &EventLog) -> Value {
    let auth = SecretSpec::from_json(&record.definition)
        .map(|(spec, _)| {
            json!({
                "type": spec.provider.as_str(),
                "agent": spec.agent,
                "rules": spec.rules.iter().map(|rule| json!({
                    "hosts": rule.hosts.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "pathPattern": rule.path.as_ref().map(|p| p.as_str()),
                    "injection": describe(&rule.injection),
                })).collect::<Vec<_>>(),
            })
        })
        .unwrap_or(Value::Null);
    json!({
        "id": record.id,
        "name": record.name,
        "type": auth["type"],
        "agent": auth["agent"],
        "rules": auth["rules"],
        "definition": record.definition,
        "preview": record.preview,
        "createdAt": record.created_at,
        "updatedAt": record.updated_at,
        "lastUsedAt": events.last_used(&record.id),
    })
}

/// The percent-decoded value of `key` in `query`, if present.
fn query_value(query: &str, key: &str) -> Result<Option<String>, ApiError> {
    let Some((_, raw)) = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == key)
    else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::from(crate::secret::ValidationError {
            field: key.into(),
            message: "is not valid percent-encoded UTF-8".into(),
        })
    };
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' => {
                let hex = bytes.get(index + 1..index + 3).ok_or_else(invalid)?;
                let hex = std::str::from_utf8(hex).map_err(|_| invalid())?;
                decoded.push(u8::from_str_radix(hex, 16).map_err(|_| invalid())?);
                index += 3;
            }
            b'+' => {
                decoded.push(b' ');
                index += 1;
            }
            byte => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(decoded).map(Some).map_err(|_| invalid())
}

fn query_number(query: &str, key: &str) -> Result<u64, ApiError> {
    match query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == key)
    {
        None => Ok(0),
        Some((_, value)) => value.parse().map_err(|_| {
            ApiError::from(crate::secret::ValidationError {
                field: key.into(),
                message: "must be a non-negative integer".into(),
            })
        }),
    }
}

/// Store calls touch the disk (sled flushes before answering): keep them off the reactor.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

/// Runs the handler of `route`.
pub async fn dispatch(
    state: &ApiState,
    route: &Route,
    id: Option<&str>,
    query: &str,
    body: Option<Value>,
) -> Result<Reply, ApiError> {
    let id = id.unwrap_or_default();
    let body = body.unwrap_or(Value::Null);
    let ok = |value| Ok(Reply::Json(StatusCode::OK, value));
    match route.handler {
        Handler::Health => {
            let secrets = blocking(|| state.store.list_secrets())?.len();
            let intercepted = state
                .capture
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .selected();
            ok(json!({
                "status": "ok",
                "capture": {"interceptedCgroups": intercepted},
                "store": {"status": "ok", "secrets": secrets},
                "ca": {"leavesMinted": state.leaves.minted()},
            }))
        }
        Handler::CaGet => Ok(Reply::Pem(state.leaves.ca().certificate_pem().to_owned())),
        Handler::Metrics => Ok(Reply::Metrics(blocking(|| state.metrics()))),
        Handler::CaRotate => {
            let ca = blocking(|| CertificateAuthority::rotate(&state.ca_dir))
                .map_err(|error| ApiError::internal(&error))?;
            let pem = ca.certificate_pem().to_owned();
            state.leaves.replace_ca(ca);
            tracing::info!(target: "appliance::audit", event = "ca_rotated", "appliance CA rotated");
            Ok(Reply::Pem(pem))
        }
        Handler::Events => {
            let after = query_number(query, "after")?;
            let wait = query_number(query, "wait")?.min(60);
            let filter = EventFilter {
                since: query_value(query, "since")?
                    .map(|since| {
                        time::OffsetDateTime::parse(
                            &since,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .map_err(|_| {
                            ApiError::from(crate::secret::ValidationError {
                                field: "since".into(),
                                message: "must be an RFC 3339 time such as 2026-12-01T10:00:00Z"
                                    .into(),
                            })
                        })
                    })
                    .transpose()?,
                agent: query_value(query, "agent")?,
                secret: query_value(query, "secret")?,
                host: query_value(query, "host")?,
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
            loop {
                // Read before looking, so an event recorded in between still wakes the wait.
                let seen = state.events.latest();
                let events = state.events.matching(after, &filter);
                let now = tokio::time::Instant::now();
                if !events.is_empty() || now >= deadline {
                    // `latest` lets a follower skip what the filter left out.
                    return ok(json!({"events": events, "latest": seen.max(after)}));
                }
                let _ = tokio::time::timeout(deadline - now, state.events.wait_after(seen)).await;
            }
        }
        Handler::SecretList => {
            let records = blocking(|| state.store.list_secrets())?;
            ok(
                json!({"secrets": records.iter().map(|r| secret_view(r, &state.events)).collect::<Vec<_>>()}),
            )
        }
        Handler::SecretCreate => {
            let record = blocking(|| state.store.create_secret(&body))?;
            blocking(|| state.reload_secrets())?;
            tracing::info!(target: "appliance::audit", event = "secret_created", id = %record.id, name = %record.name, "secret created");
            Ok(Reply::Json(
                StatusCode::CREATED,
                secret_view(&record, &state.events),
            ))
        }
        Handler::SecretGet => {
            let record = blocking(|| state.store.get_secret(id))?;
            ok(secret_view(&record, &state.events))
        }
        Handler::SecretUpdate => {
            let record = blocking(|| state.store.update_secret(id, &body))?;
            blocking(|| state.reload_secrets())?;
            tracing::info!(target: "appliance::audit", event = "secret_updated", id = %record.id, name = %record.name, "secret updated");
            ok(secret_view(&record, &state.events))
        }
        Handler::SecretDelete => {
            blocking(|| state.store.delete_secret(id))?;
            blocking(|| state.reload_secrets())?;
            tracing::info!(target: "appliance::audit", event = "secret_deleted", id = %id, "secret deleted");
            Ok(Reply::Empty)
        }
        Handler::AgentList => ok(json!({"agents": blocking(|| state.store.list_agents())?})),
        Handler::AgentGet => ok(blocking(|| state.store.get_agent(id))?),
        Handler::AgentCreate => {
            let record = blocking(|| {
                state
                    .store
                    .create_agent(&body, |spec| agent_cgroups(spec).map(drop))
            })?;
            blocking(|| state.reconcile_agents())?;
            tracing::info!(target: "appliance::audit", event = "agent_created", name = %record["name"], "agent created");
            Ok(Reply::Json(StatusCode::CREATED, record))
        }
        Handler::AgentUpdate => {
            let record = blocking(|| {
                state
                    .store
                    .update_agent(id, &body, |spec| agent_cgroups(spec).map(drop))
            })?;
            blocking(|| state.reconcile_agents())?;
            tracing::info!(target: "appliance::audit", event = "agent_updated", name = %record["name"], "agent updated");
            ok(record)
        }
        Handler::AgentDelete => {
            blocking(|| state.store.delete_agent(id))?;
            blocking(|| state.reconcile_agents())?;
            tracing::info!(target: "appliance::audit", event = "agent_deleted", name = %id, "agent deleted");
            Ok(Reply::Empty)
        }
        Handler::RuleList => ok(json!({"rules": blocking(|| state.store.list_rules())?})),
        Handler::RuleGet => ok(blocking(|| state.store.get_rule(id))?),
        Handler::RuleCreate => {
            let record = blocking(|| state.store.create_rule(&body))?;
            blocking(|| state.reload_rules())?;
            tracing::info!(target: "appliance::audit", event = "rule_created", id = %record["id"], "access rule created");
            Ok(Reply::Json(StatusCode::CREATED, record))
        }
        Handler::RuleUpdate => {
            let record = blocking(|| state.store.update_rule(id, &body))?;
            blocking(|| state.reload_rules())?;
            tracing::info!(target: "appliance::audit", event = "rule_updated", id = %id, "access rule updated");
            ok(record)
        }
        Handler::RuleDelete => {
            blocking(|| state.store.delete_rule(id))?;
            blocking(|| state.reload_rules())?;
            tracing::info!(target: "appliance::audit", event = "rule_deleted", id = %id, "access rule deleted");
            Ok(Reply::Empty)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(METHOD, path)` pairs listed under `paths:` in an OpenAPI document.
    fn documented_routes(document: &str) -> Vec<(String, String)> {
        let mut routes = Vec::new();
        let mut in_paths = false;
        let mut current = None;
        for line in document.lines() {
            if !line.starts_with(' ') {
                in_paths = line.trim_end() == "paths:";
                continue;
            }
            if !in_paths {
                continue;
            }
            if let Some(path) = line.strip_prefix("  /") {
                current = Some(format!("/{}", path.trim_end().trim_end_matches(':')));
            } else if let (Some(path), Some(key)) = (&current, line.strip_prefix("    ")) {
                let key = key.split(':').next().unwrap_or_default();
                if ["get", "post", "put", "patch", "delete"].contains(&key) {
                    routes.push((key.to_ascii_uppercase(), path.clone()));
                }
            }
        }
        routes.sort();
        routes
    }

    #[test]
    fn every_served_route_is_documented_and_vice_versa() {
        let document = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml"));
        let documented = documented_routes(document);
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|route| (route.method.to_owned(), route.path.to_owned()))
            .collect();
        served.sort();
        assert_eq!(served, documented);
    }

    #[test]
    fn routes_match_with_ids_and_nothing_else() {
        let (route, id) = find(&Method::PATCH, "/v1/secrets/sec_1").unwrap();
        assert_eq!(route.handler, Handler::SecretUpdate);
        assert_eq!(id.as_deref(), Some("sec_1"));
        assert!(find(&Method::GET, "/v1/secrets/").is_none());
        assert!(find(&Method::GET, "/v1/secrets/a/b").is_none());
        assert!(find(&Method::PUT, "/v1/secrets").is_none());
    }
}
