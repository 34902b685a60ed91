//! The routes of the admin API. [`ROUTES`] is the single list the server dispatches on and
//! that `docs/openapi.yaml` is checked against.

use http::{Method, StatusCode};
use serde::Serialize;
use serde_json::Value;

use super::{access_rules, agents, ca, events, health, secrets, ApiError};
use crate::control::Control;

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
    /// Resolve a secret's value now and check it.
    SecretCheck,
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
    route(
        "POST",
        "/v1/secrets/{id}/check",
        false,
        Handler::SecretCheck,
    ),
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

impl Reply {
    /// `body` as JSON with `status`.
    pub fn json(status: StatusCode, body: &impl Serialize) -> Self {
        Self::Json(
            status,
            serde_json::to_value(body).expect("API views serialize: their keys are strings"),
        )
    }

    /// `body` as JSON, 200.
    pub fn ok(body: &impl Serialize) -> Self {
        Self::json(StatusCode::OK, body)
    }
}

/// Control calls touch the disk (sled flushes before answering) and the kernel (capture):
/// keep them off the reactor.
pub fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

/// What a handler gets besides the control layer.
pub struct Call<'a> {
    /// The `{id}` segment, or empty.
    pub id: &'a str,
    /// The query string.
    pub query: &'a str,
    /// The JSON body, for routes that take one (null otherwise).
    pub body: Value,
}

/// Runs the handler of `route`.
pub async fn dispatch(control: &Control, route: &Route, call: Call<'_>) -> Result<Reply, ApiError> {
    match route.handler {
        Handler::Health => health::health(control),
        Handler::Metrics => Ok(health::metrics(control)),
        Handler::CaGet => Ok(ca::get(control)),
        Handler::CaRotate => ca::rotate(control),
        Handler::Events => events::list(control, call.query).await,
        Handler::SecretList => secrets::list(control),
        Handler::SecretCreate => secrets::create(control, call.body).await,
        Handler::SecretGet => secrets::get(control, call.id),
        Handler::SecretUpdate => secrets::update(control, call.id, call.body).await,
        Handler::SecretDelete => secrets::delete(control, call.id),
        Handler::SecretCheck => secrets::check(control, call.id).await,
        Handler::AgentList => agents::list(control),
        Handler::AgentCreate => agents::create(control, call.body),
        Handler::AgentGet => agents::get(control, call.id),
        Handler::AgentUpdate => agents::update(control, call.id, call.body),
        Handler::AgentDelete => agents::delete(control, call.id),
        Handler::RuleList => access_rules::list(control),
        Handler::RuleCreate => access_rules::create(control, call.body),
        Handler::RuleGet => access_rules::get(control, call.id),
        Handler::RuleUpdate => access_rules::update(control, call.id, call.body),
        Handler::RuleDelete => access_rules::delete(control, call.id),
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
