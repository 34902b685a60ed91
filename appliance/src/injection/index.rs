//! Which secrets and access rules apply to a request. Both are indexed together by host, and
//! a change re-indexes only the hosts it touches, so deciding a request costs two hash
//! lookups (exact host, then the parent domain for `*.` patterns) and a change costs the same
//! whatever the number of secrets and rules.

use std::sync::Arc;

use http::request::Parts;
use http::Method;
use tracing::{debug, warn};

use super::agents::AgentDirectory;
use super::apply::apply;
use super::live::LiveValue;
use super::redact::Redactor;
use super::{Injector, Verdict, Workload};
use crate::audit::SecretUse;
use crate::model::{AccessRule, Action, HostPattern, SecretSpec};
use crate::request_path;
use crate::swap::Swappable;

/// A secret ready for injection.
pub struct LoadedSecret {
    /// Stable id.
    pub id: String,
    /// Its definition.
    pub spec: SecretSpec,
    /// Its value, current.
    pub value: Arc<LiveValue>,
    /// How it appears in audit events, made once.
    usage: SecretUse,
}

impl LoadedSecret {
    /// The secret `id` with `spec`, whose value is `value`.
    pub fn new(id: String, spec: SecretSpec, value: Arc<LiveValue>) -> Self {
        let usage = SecretUse {
            id: Arc::from(id.as_str()),
            name: Arc::from(spec.name.as_str()),
        };
        Self {
            id,
            spec,
            value,
            usage,
        }
    }
}

/// What a host leads to: one rule of a secret, or an access rule.
#[derive(Clone)]
enum Entry {
    Secret {
        secret: Arc<LoadedSecret>,
        rule: usize,
    },
    Access(Arc<AccessEntry>),
}

/// An access rule and its id.
struct AccessEntry {
    id: String,
    rule: AccessRule,
}

impl Entry {
    /// Where the entry sits among its host's: secrets by id and rule, then access rules by id.
    /// A table built whole and one changed step by step order alike, so ties between equally
    /// specific rules resolve the same either way.
    fn order(&self) -> (u8, &str, usize) {
        match self {
            Entry::Secret { secret, rule } => (0, &secret.id, *rule),
            Entry::Access(access) => (1, &access.id, 0),
        }
    }

    fn agent(&self) -> Option<&str> {
        match self {
            Entry::Secret { secret, .. } => secret.spec.agent.as_deref(),
            Entry::Access(access) => access.rule.agent.as_deref(),
        }
    }
}

#[derive(Clone, Copy)]
struct Candidate<'a> {
    entry: &'a Entry,
    exact_host: bool,
}

/// The entries of one host, shared by successive tables until that host changes.
type Bucket = Arc<Vec<Entry>>;

/// Secrets and access rules, indexed by host. The maps are persistent: cloning a table is
/// O(1) and a change copies only the buckets of the hosts it touches, so a change costs the
/// same with 10 secrets as with 10,000, while requests in flight keep the table they took.
#[derive(Clone, Default)]
pub struct HostTable {
    exact: imbl::HashMap<String, Bucket>,
    wildcard: imbl::HashMap<String, Bucket>,
}

impl HostTable {
    /// Indexes `secrets` and the access rules `(id, rule)`.
    pub fn new(secrets: Vec<Arc<LoadedSecret>>, access: Vec<(String, AccessRule)>) -> Self {
        let mut table = Self::default();
        for secret in &secrets {
            table.add_secret(secret);
        }
        for (id, rule) in access {
            table.add_access_rule(id, rule);
        }
        table
    }

    /// Adds every rule of `secret` under its hosts.
    pub fn add_secret(&mut self, secret: &Arc<LoadedSecret>) {
        for (number, rule) in secret.spec.rules.iter().enumerate() {
            for host in &rule.hosts {
                self.insert(
                    host,
                    Entry::Secret {
                        secret: Arc::clone(secret),
                        rule: number,
                    },
                );
            }
        }
    }

    /// Takes `secret` (as it was added) out.
    pub fn remove_secret(&mut self, secret: &LoadedSecret) {
        for rule in &secret.spec.rules {
            for host in &rule.hosts {
                self.remove(host, |entry| {
                    matches!(entry, Entry::Secret { secret: other, .. } if other.id == secret.id)
                });
            }
        }
    }

    /// Adds the access rule `id`.
    pub fn add_access_rule(&mut self, id: String, rule: AccessRule) {
        let host = rule.host.clone();
        self.insert(&host, Entry::Access(Arc::new(AccessEntry { id, rule })));
    }

    /// Takes the access rule `id` (as it was added, `rule`) out.
    pub fn remove_access_rule(&mut self, id: &str, rule: &AccessRule) {
        self.remove(
            &rule.host,
            |entry| matches!(entry, Entry::Access(access) if access.id == id),
        );
    }

    fn map<'a>(
        &'a mut self,
        host: &'a HostPattern,
    ) -> (&'a mut imbl::HashMap<String, Bucket>, &'a String) {
        match host {
            HostPattern::Exact(name) => (&mut self.exact, name),
            HostPattern::Wildcard(suffix) => (&mut self.wildcard, suffix),
        }
    }

    fn insert(&mut self, host: &HostPattern, entry: Entry) {
        let (map, key) = self.map(host);
        let mut bucket: Vec<Entry> = map
            .get(key)
            .map(|bucket| bucket.to_vec())
            .unwrap_or_default();
        let position = bucket.partition_point(|other| other.order() <= entry.order());
        bucket.insert(position, entry);
        map.insert(key.clone(), Arc::new(bucket));
    }

    fn remove(&mut self, host: &HostPattern, unwanted: impl Fn(&Entry) -> bool) {
        let (map, key) = self.map(host);
        let Some(bucket) = map.get(key) else {
            return;
        };
        let kept: Vec<Entry> = bucket
            .iter()
            .filter(|entry| !unwanted(entry))
            .cloned()
            .collect();
        if kept.is_empty() {
            map.remove(key);
        } else {
            map.insert(key.clone(), Arc::new(kept));
        }
    }

    /// What applies to `host` for a workload of `agent`: secrets bound to another agent, and
    /// access rules limited to another, are left out.
    fn candidates<'a>(
        &'a self,
        host: &str,
        agent: Option<&'a str>,
    ) -> impl Iterator<Item = Candidate<'a>> + 'a {
        let exact = self
            .exact
            .get(host)
            .into_iter()
            .flat_map(|bucket| bucket.iter())
            .map(|entry| Candidate {
                entry,
                exact_host: true,
            });
        let parent = host.split_once('.').map(|(_, parent)| parent);
        let wildcard = parent
            .and_then(|parent| self.wildcard.get(parent))
            .into_iter()
            .flat_map(|bucket| bucket.iter())
            .map(|entry| Candidate {
                entry,
                exact_host: false,
            });
        exact.chain(wildcard).filter(move |candidate| {
            candidate
                .entry
                .agent()
                .is_none_or(|bound| agent == Some(bound))
        })
    }

    /// The deciding access rule among `candidates` for a request, if any: `(rule id,
    /// action)`. The most specific matching rule decides.
    fn decide<'a>(
        candidates: &[Candidate<'a>],
        path: &str,
        method: &Method,
    ) -> Option<(&'a str, Action)> {
        candidates
            .iter()
            .filter_map(|candidate| match candidate.entry {
                Entry::Access(access) => Some(&**access),
                Entry::Secret { .. } => None,
            })
            .filter(|access| {
                access
                    .rule
                    .path
                    .as_ref()
                    .is_none_or(|pattern| pattern.matches(path))
            })
            .filter(|access| {
                access
                    .rule
                    .method
                    .as_ref()
                    .is_none_or(|wanted| wanted == method)
            })
            .max_by_key(|access| access.rule.specificity())
            .map(|access| (access.id.as_str(), access.rule.action))
    }

    /// The secret rules among `candidates` that apply to `path`, least specific first, so
    /// that the most specific one is applied last and wins any conflict. An agent's own
    /// secrets for a host replace the global ones. A rule's path pattern must match every
    /// reading of the path.
    fn matching<'a>(
        candidates: &[Candidate<'a>],
        path: &request_path::Readings,
    ) -> Vec<(&'a LoadedSecret, usize, bool)> {
        let mut matched: Vec<(&LoadedSecret, usize, bool)> = candidates
            .iter()
            .filter_map(|candidate| match candidate.entry {
                Entry::Secret { secret, rule } => Some((&**secret, *rule, candidate.exact_host)),
                Entry::Access(_) => None,
            })
            .filter(|&(secret, rule, _)| {
                let rule = &secret.spec.rules[rule];
                rule.path
                    .as_ref()
                    .is_none_or(|pattern| path.all().all(|reading| pattern.matches(reading)))
            })
            .collect();
        let agent_bound =
            |&(secret, _, _): &(&LoadedSecret, usize, bool)| secret.spec.agent.is_some();
        if matched.iter().any(agent_bound) {
            matched.retain(agent_bound);
        }
        matched.sort_by_key(|&(secret, rule, exact_host)| {
            let rule = &secret.spec.rules[rule];
            (
                exact_host,
                rule.path
                    .as_ref()
                    .map_or(0, |pattern| pattern.specificity()),
            )
        });
        matched
    }
}

/// The injection layer backed by the store: the host table and the agents, each swapped
/// whole when it changes.
#[derive(Default)]
pub struct SecretInjector {
    table: Swappable<HostTable>,
    agents: Swappable<AgentDirectory>,
}

impl SecretInjector {
    /// Replaces the secrets and access rules in use.
    pub fn replace(&self, table: HostTable) {
        self.table.store(table);
    }

    /// Replaces the agents' cgroups.
    pub fn replace_agents(&self, agents: AgentDirectory) {
        self.agents.store(agents);
    }
}

impl Injector for SecretInjector {
    fn agent(&self, workload: &Workload) -> Option<Arc<str>> {
        self.agents.load().resolve(workload).map(Arc::from)
    }

    fn intercepts(&self, host: &str, agent: Option<&str>) -> bool {
        self.table.load().candidates(host, agent).next().is_some()
    }

    fn prepare(
        &self,
        host: &str,
        agent: Option<&str>,
        path: &request_path::Readings,
        request: &mut Parts,
    ) -> Verdict {
        let table = self.table.load();
        let candidates: Vec<Candidate> = table.candidates(host, agent).collect();
        // Upstreams read a path in different ways: a block holds for any reading.
        for reading in path.all() {
            if let Some((rule, Action::Block)) =
                HostTable::decide(&candidates, reading, &request.method)
            {
                return Verdict::Block {
                    reason: format!("blocked by rule {rule}"),
                };
            }
        }
        let mut injected = Vec::new();
        let mut redactors: Vec<Arc<Redactor>> = Vec::new();
        for (secret, rule, _) in HostTable::matching(&candidates, path) {
            let rule = &secret.spec.rules[rule];
            let state = secret.value.state();
            let ready = match secret.value.ready(&state) {
                Ok(ready) => ready,
                Err(reason) => {
                    warn!(secret = %secret.spec.name, %reason, "secret has no usable value; refusing the request");
                    // The agent gets a fixed text: a source's own error may quote what the
                    // agent must not see (a server echoing its token, a parser quoting the
                    // value).
                    return Verdict::Unavailable {
                        secret: secret.usage.clone(),
                        reason: format!(
                            "secret {name}: its value is not available now; `appliance secret check {name}` and the appliance's log say why",
                            name = secret.spec.name
                        ),
                    };
                }
            };
            match apply(&rule.injection, &ready.value, request) {
                Ok(true) => {
                    debug!(secret_id = %secret.id, secret = %secret.spec.name, %host, path = path.normalized(), "secret injected");
                    if !injected
                        .iter()
                        .any(|used: &SecretUse| *used.id == *secret.id)
                    {
                        injected.push(secret.usage.clone());
                        redactors.push(Arc::clone(&ready.redactor));
                    }
                }
                Ok(false) => {}
                Err(error) => {
                    warn!(secret = %secret.spec.name, %error, "secret cannot be injected; refusing the request");
                    return Verdict::Block {
                        reason: format!("secret {} cannot be injected: {error}", secret.spec.name),
                    };
                }
            }
        }
        Verdict::Forward {
            injected,
            redactors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::CgroupId;
    use serde_json::json;

    fn loaded(id: &str, spec: serde_json::Value) -> Arc<LoadedSecret> {
        let (spec, value) = SecretSpec::from_json(&spec).unwrap();
        let value = Arc::new(LiveValue::fixed(value.unwrap(), &spec.rules));
        Arc::new(LoadedSecret::new(id.into(), spec, value))
    }

    fn injector(secrets: Vec<Arc<LoadedSecret>>) -> SecretInjector {
        let injector = SecretInjector::default();
        injector.replace(HostTable::new(secrets, Vec::new()));
        injector
    }

    fn access_rule(id: &str, json: serde_json::Value) -> (String, AccessRule) {
        (id.into(), AccessRule::from_json(&json).unwrap())
    }

    const WORKLOAD: Workload = Workload {
        cgroup_id: CgroupId(1),
        pid: 1,
    };

    fn request_to(target: &str) -> Parts {
        http::Request::builder()
            .uri(target)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn prepared(injector: &SecretInjector, host: &str, target: &str) -> Parts {
        let mut parts = request_to(target);
        assert!(matches!(
            injector.prepare(
                host,
                injector.agent(&WORKLOAD).as_deref(),
                &request_path::Readings::of(target).unwrap(),
                &mut parts
            ),
            Verdict::Forward { .. }
        ));
        parts
    }

    /// What `table` has for each of `hosts`, in order, as `(kind, id, rule)`.
    fn entries(table: &HostTable, hosts: &[&str]) -> Vec<Vec<(u8, String, usize)>> {
        hosts
            .iter()
            .map(|host| {
                table
                    .candidates(host, None)
                    .map(|candidate| {
                        let (kind, id, rule) = candidate.entry.order();
                        (kind, id.to_owned(), rule)
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_table_changed_step_by_step_equals_one_built_whole() {
        let secret = |id: &str, hosts: &str| {
            loaded(
                id,
                json!({"name": format!("n{id}"), "hostPattern": hosts, "value": "v",
                "injection": {"headerName": "x-key"}}),
            )
        };
        let rule = |id: &str, host: &str| access_rule(id, json!({"host": host, "action": "block"}));
        let (s1, s2, s3, s4) = (
            secret("s1", "api.example.com"),
            secret("s2", "*.example.com"),
            secret("s3", "api.example.com"),
            secret("s4", "api.example.com"),
        );
        let s1_moved = secret("s1", "*.example.com");
        let mut table = HostTable::default();
        table.add_secret(&s3);
        table.add_secret(&s1);
        let (r2_id, r2) = rule("r2", "api.example.com");
        table.add_access_rule(r2_id.clone(), r2.clone());
        table.add_secret(&s4);
        table.add_secret(&s2);
        table.remove_secret(&s4);
        let (r1_id, r1) = rule("r1", "api.example.com");
        table.add_access_rule(r1_id.clone(), r1.clone());
        table.remove_secret(&s1);
        table.add_secret(&s1_moved);
        let (r3_id, r3) = rule("r3", "other.example.com");
        table.add_access_rule(r3_id.clone(), r3.clone());
        table.remove_access_rule(&r3_id, &r3);

        let whole = HostTable::new(vec![s1_moved, s2, s3], vec![(r1_id, r1), (r2_id, r2)]);
        let hosts = ["api.example.com", "www.example.com", "other.example.com"];
        assert_eq!(entries(&table, &hosts), entries(&whole, &hosts));
        assert_eq!(
            entries(&table, &hosts)[0],
            [
                (0, "s3".to_owned(), 0),
                (1, "r1".to_owned(), 0),
                (1, "r2".to_owned(), 0),
                (0, "s1".to_owned(), 0),
                (0, "s2".to_owned(), 0),
            ],
            "exact host first (secrets by id, then rules by id), then the parent's wildcards"
        );
    }

    #[test]
    fn hosts_match_exactly_or_by_single_label_wildcard() {
        let injector = injector(vec![
            loaded(
                "1",
                json!({"name": "a", "type": "anthropic", "value": "k-anthropic"}),
            ),
            loaded(
                "2",
                json!({"name": "w", "hostPattern": "*.corp.example", "value": "k-corp",
                "injection": {"headerName": "x-key"}}),
            ),
        ]);
        assert!(injector.intercepts("api.anthropic.com", None));
        assert!(injector.intercepts("git.corp.example", None));
        assert!(!injector.intercepts("corp.example", None));
        assert!(!injector.intercepts("a.git.corp.example", None));
        assert!(!injector.intercepts("example.org", None));
        assert_eq!(
            prepared(&injector, "api.anthropic.com", "/v1/messages").headers["x-api-key"],
            "k-anthropic"
        );
    }

    #[test]
    fn path_patterns_select_and_the_most_specific_rule_wins() {
        let injector = injector(vec![
            loaded(
                "1",
                json!({"name": "broad", "hostPattern": "api.example.com", "value": "broad",
                "injection": {"headerName": "authorization"}}),
            ),
            loaded(
                "2",
                json!({"name": "narrow", "hostPattern": "api.example.com", "pathPattern": "/admin/*",
                "value": "narrow", "injection": {"headerName": "authorization"}}),
            ),
        ]);
        assert_eq!(
            prepared(&injector, "api.example.com", "/v1").headers["authorization"],
            "broad"
        );
        assert_eq!(
            prepared(&injector, "api.example.com", "/admin/users").headers["authorization"],
            "narrow"
        );
    }

    #[test]
    fn encoded_slashes_open_no_way_around_patterns_or_block_rules() {
        let injector = SecretInjector::default();
        injector.replace(HostTable::new(
            vec![loaded(
                "1",
                json!({"name": "scoped", "hostPattern": "api.example.com", "pathPattern": "/allowed/*",
                "value": "scoped", "injection": {"headerName": "authorization"}}),
            )],
            vec![access_rule(
                "no-admin",
                json!({"host": "api.example.com", "path": "/admin/*", "action": "block"}),
            )],
        ));
        let prepare = |target: &str| {
            let mut parts = request_to(target);
            let readings = request_path::Readings::of(parts.uri.path()).unwrap();
            let verdict = injector.prepare("api.example.com", None, &readings, &mut parts);
            (verdict, parts)
        };
        // An id with an encoded slash is data: the secret is injected.
        let (verdict, parts) = prepare("/allowed/group%2Fproject");
        assert!(matches!(verdict, Verdict::Forward { .. }));
        assert_eq!(parts.headers["authorization"], "scoped");
        // Read with its slashes decoded, the path leaves /allowed/: no injection.
        let (verdict, parts) = prepare("/allowed/x%2F..%2F..%2Fother");
        assert!(matches!(verdict, Verdict::Forward { .. }));
        assert!(!parts.headers.contains_key("authorization"));
        // A block rule holds for the decoded reading.
        let (verdict, _) = prepare("/public%2F..%2Fadmin%2Fx");
        assert!(matches!(verdict, Verdict::Block { .. }), "{verdict:?}");
        let (verdict, _) = prepare("/admin%2Fx");
        assert!(matches!(verdict, Verdict::Block { .. }), "{verdict:?}");
        // An upstream that keeps `..` (an object store) reads the key as sent, under
        // /other/: the secret scoped to /allowed/ stays out, and the path is not rewritten.
        let (verdict, parts) = prepare("/other/../allowed/x");
        assert!(matches!(verdict, Verdict::Forward { .. }));
        assert!(!parts.headers.contains_key("authorization"));
        assert_eq!(parts.uri.path(), "/other/../allowed/x");
        // A block rule holds for the path as sent too.
        let (verdict, _) = prepare("/admin//x");
        assert!(matches!(verdict, Verdict::Block { .. }), "{verdict:?}");
    }

    #[test]
    fn agent_bound_secrets_are_not_used_for_workloads_outside_the_agent() {
        let injector = injector(vec![loaded(
            "1",
            json!({"name": "bound", "type": "openai", "value": "k", "agent": "research"}),
        )]);
        assert!(!injector.intercepts("api.openai.com", None));
        assert!(!prepared(&injector, "api.openai.com", "/v1")
            .headers
            .contains_key("authorization"));
    }

    #[test]
    fn github_gets_bearer_on_the_api_and_basic_for_git() {
        let injector = injector(vec![loaded(
            "1",
            json!({"name": "gh", "type": "github", "value": "ghp_1"}),
        )]);
        assert_eq!(
            prepared(&injector, "api.github.com", "/user").headers["authorization"],
            "Bearer ghp_1"
        );
        assert_eq!(
            prepared(&injector, "github.com", "/o/r.git/info/refs").headers["authorization"],
            "Basic eC1hY2Nlc3MtdG9rZW46Z2hwXzE="
        );
    }

    #[test]
    fn lookup_cost_does_not_depend_on_the_number_of_secrets() {
        let secrets: Vec<Arc<LoadedSecret>> = (0..5000)
            .map(|n| {
                loaded(
                    &n.to_string(),
                    json!({"name": format!("s{n}"), "hostPattern": format!("h{n}.example.com"),
                    "value": "v", "injection": {"headerName": "x"}}),
                )
            })
            .collect();
        let table = HostTable::new(secrets, Vec::new());
        assert_eq!(table.candidates("h4999.example.com", None).count(), 1);
        assert_eq!(table.candidates("nothing.example.com", None).count(), 0);
    }

    #[test]
    fn the_most_specific_access_rule_decides() {
        let table = HostTable::new(
            Vec::new(),
            vec![
                access_rule("r1", json!({"host": "*.example.com", "action": "block"})),
                access_rule(
                    "r2",
                    json!({"host": "api.example.com", "path": "/v1/*", "action": "allow"}),
                ),
                access_rule(
                    "r3",
                    json!({"host": "api.example.com", "path": "/v1/*", "method": "DELETE", "action": "block"}),
                ),
                access_rule(
                    "r4",
                    json!({"host": "api.example.com", "action": "allow", "agent": "trusted"}),
                ),
            ],
        );
        let decide = |host: &str, path: &str, method: &Method, agent: Option<&str>| {
            let candidates: Vec<Candidate> = table.candidates(host, agent).collect();
            HostTable::decide(&candidates, path, method).map(|(id, action)| (id.to_owned(), action))
        };
        let get = Method::GET;
        let decided = |id: &str, action| Some((id.to_owned(), action));
        assert_eq!(
            decide("web.example.com", "/", &get, None),
            decided("r1", Action::Block)
        );
        assert_eq!(
            decide("api.example.com", "/v1/x", &get, None),
            decided("r2", Action::Allow)
        );
        assert_eq!(
            decide("api.example.com", "/v1/x", &Method::DELETE, None),
            decided("r3", Action::Block)
        );
        assert_eq!(
            decide("api.example.com", "/v2", &get, None),
            decided("r1", Action::Block)
        );
        assert_eq!(
            decide("api.example.com", "/v2", &get, Some("trusted")),
            decided("r4", Action::Allow)
        );
        assert_eq!(decide("example.org", "/", &get, None), None);
        assert!(table.candidates("web.example.com", None).next().is_some());
        assert!(table.candidates("example.org", None).next().is_none());
    }
}
