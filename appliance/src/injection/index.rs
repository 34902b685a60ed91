//! Which secrets apply to a request. Built once per change of the secrets, so a request costs
//! two hash lookups (exact host, then the parent domain for `*.` patterns) whatever the number
//! of secrets.

use std::collections::HashMap;
use std::sync::Arc;

use http::request::Parts;
use tracing::{debug, warn};

use super::agents::AgentDirectory;
use super::apply::apply;
use super::redact::Redactor;
use super::{Injector, Verdict, Workload};
use crate::audit::SecretUse;
use crate::policy::{AccessPolicy, Action};
use crate::request_path;
use crate::secret::{HostPattern, SecretSpec, SecretValue};
use crate::swap::Swappable;

/// A secret ready for injection.
pub struct LoadedSecret {
    /// Stable id.
    pub id: String,
    /// Its definition.
    pub spec: SecretSpec,
    /// Its value.
    pub value: SecretValue,
}

#[derive(Clone, Copy, Debug)]
struct RuleRef {
    secret: usize,
    rule: usize,
    exact_host: bool,
}

/// Secrets indexed by host.
#[derive(Default)]
pub struct SecretIndex {
    secrets: Vec<LoadedSecret>,
    /// One per secret, built once here rather than per request.
    redactors: Vec<Arc<Redactor>>,
    /// How each secret appears in audit events, built once rather than per request.
    uses: Vec<SecretUse>,
    exact: HashMap<String, Vec<RuleRef>>,
    wildcard: HashMap<String, Vec<RuleRef>>,
}

impl SecretIndex {
    /// Indexes `secrets`.
    pub fn new(secrets: Vec<LoadedSecret>) -> Self {
        let mut index = Self::default();
        for (secret_number, secret) in secrets.iter().enumerate() {
            for (rule_number, rule) in secret.spec.rules.iter().enumerate() {
                for host in &rule.hosts {
                    let (map, key, exact_host) = match host {
                        HostPattern::Exact(name) => (&mut index.exact, name, true),
                        HostPattern::Wildcard(suffix) => (&mut index.wildcard, suffix, false),
                    };
                    map.entry(key.clone()).or_default().push(RuleRef {
                        secret: secret_number,
                        rule: rule_number,
                        exact_host,
                    });
                }
            }
        }
        index.redactors = secrets
            .iter()
            .map(|secret| {
                let injections = secret.spec.rules.iter().map(|rule| &rule.injection);
                Arc::new(Redactor::new(&secret.value, injections))
            })
            .collect();
        index.uses = secrets
            .iter()
            .map(|secret| SecretUse {
                id: Arc::from(secret.id.as_str()),
                name: Arc::from(secret.spec.name.as_str()),
            })
            .collect();
        index.secrets = secrets;
        index
    }

    fn candidates<'a>(&'a self, host: &str) -> impl Iterator<Item = RuleRef> + 'a {
        let exact = self.exact.get(host).into_iter().flatten();
        let parent = host.split_once('.').map(|(_, parent)| parent);
        let wildcard = parent
            .and_then(|parent| self.wildcard.get(parent))
            .into_iter()
            .flatten();
        exact.chain(wildcard).copied()
    }

    fn in_scope(&self, reference: RuleRef, agent: Option<&str>) -> bool {
        match self.secrets[reference.secret].spec.agent.as_deref() {
            None => true,
            Some(bound) => agent == Some(bound),
        }
    }

    /// The rules that apply to `host` and `path` for a workload of `agent`, least specific
    /// first, so that the most specific one is applied last and wins any conflict. An agent's
    /// own secrets for a host replace the global ones. A rule's path pattern must match
    /// `path` and, when the path has encoded slashes, its `decoded` reading too.
    fn matching(
        &self,
        host: &str,
        path: &str,
        decoded: Option<&str>,
        agent: Option<&str>,
    ) -> Vec<RuleRef> {
        let mut matched: Vec<RuleRef> = self
            .candidates(host)
            .filter(|reference| self.in_scope(*reference, agent))
            .filter(|reference| {
                let rule = &self.secrets[reference.secret].spec.rules[reference.rule];
                rule.path.as_ref().is_none_or(|pattern| {
                    pattern.matches(path) && decoded.is_none_or(|decoded| pattern.matches(decoded))
                })
            })
            .collect();
        let agent_bound = |reference: &RuleRef| self.secrets[reference.secret].spec.agent.is_some();
        if matched.iter().any(agent_bound) {
            matched.retain(agent_bound);
        }
        matched.sort_by_key(|reference| {
            let rule = &self.secrets[reference.secret].spec.rules[reference.rule];
            (
                reference.exact_host,
                rule.path
                    .as_ref()
                    .map_or(0, |pattern| pattern.specificity()),
            )
        });
        matched
    }
}

/// The injection layer backed by the store: secrets, access rules and agents, each swapped
/// whole when it changes.
#[derive(Default)]
pub struct SecretInjector {
    index: Swappable<SecretIndex>,
    policy: Swappable<AccessPolicy>,
    agents: Swappable<AgentDirectory>,
}

impl SecretInjector {
    /// Replaces the secrets in use.
    pub fn replace(&self, index: SecretIndex) {
        self.index.store(index);
    }

    /// Replaces the access rules in use.
    pub fn replace_policy(&self, policy: AccessPolicy) {
        self.policy.store(policy);
    }

    /// Replaces the agents' cgroups.
    pub fn replace_agents(&self, agents: AgentDirectory) {
        self.agents.store(agents);
    }
}

impl Injector for SecretInjector {
    fn intercepts(&self, host: &str, workload: &Workload) -> bool {
        let index = self.index.load();
        let agent = self.agents.load().resolve(workload);
        let agent = agent.as_deref();
        index
            .candidates(host)
            .any(|reference| index.in_scope(reference, agent))
            || self.policy.load().concerns(host, agent)
    }

    fn prepare(&self, host: &str, agent: Option<&str>, request: &mut Parts) -> Verdict {
        // The proxy hands over the normalized path; an upstream may also read its encoded
        // slashes as separators, so a block holds for either reading.
        let path = request.uri.path().to_owned();
        let Ok(decoded) = request_path::with_slashes_decoded(&path) else {
            return Verdict::Block {
                reason: "the path cannot be read unambiguously".into(),
            };
        };
        let policy = self.policy.load();
        for reading in std::iter::once(path.as_str()).chain(decoded.as_deref()) {
            if let Some((rule, Action::Block)) =
                policy.decide(host, reading, &request.method, agent)
            {
                return Verdict::Block {
                    reason: format!("blocked by rule {rule}"),
                };
            }
        }
        let index = self.index.load();
        let mut injected = Vec::new();
        let mut redactors: Vec<Arc<Redactor>> = Vec::new();
        for reference in index.matching(host, &path, decoded.as_deref(), agent) {
            let secret = &index.secrets[reference.secret];
            let rule = &secret.spec.rules[reference.rule];
            match apply(&rule.injection, &secret.value, request) {
                Ok(true) => {
                    debug!(secret_id = %secret.id, secret = %secret.spec.name, %host, %path, "secret injected");
                    if !injected
                        .iter()
                        .any(|used: &SecretUse| *used.id == *secret.id)
                    {
                        injected.push(index.uses[reference.secret].clone());
                        redactors.push(Arc::clone(&index.redactors[reference.secret]));
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

    fn agent(&self, workload: &Workload) -> Option<String> {
        self.agents.load().resolve(workload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::CgroupId;
    use serde_json::json;

    fn loaded(id: &str, spec: serde_json::Value) -> LoadedSecret {
        let (spec, value) = SecretSpec::from_json(&spec).unwrap();
        LoadedSecret {
            id: id.into(),
            spec,
            value: value.unwrap(),
        }
    }

    fn injector(secrets: Vec<LoadedSecret>) -> SecretInjector {
        let injector = SecretInjector::default();
        injector.replace(SecretIndex::new(secrets));
        injector
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
            injector.prepare(host, injector.agent(&WORKLOAD).as_deref(), &mut parts),
            Verdict::Forward { .. }
        ));
        parts
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
        assert!(injector.intercepts("api.anthropic.com", &WORKLOAD));
        assert!(injector.intercepts("git.corp.example", &WORKLOAD));
        assert!(!injector.intercepts("corp.example", &WORKLOAD));
        assert!(!injector.intercepts("a.git.corp.example", &WORKLOAD));
        assert!(!injector.intercepts("example.org", &WORKLOAD));
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
        let injector = injector(vec![loaded(
            "1",
            json!({"name": "scoped", "hostPattern": "api.example.com", "pathPattern": "/allowed/*",
            "value": "scoped", "injection": {"headerName": "authorization"}}),
        )]);
        injector.replace_policy(AccessPolicy::new(vec![(
            "no-admin".into(),
            crate::policy::AccessRule::from_json(
                &json!({"host": "api.example.com", "path": "/admin/*", "action": "block"}),
            )
            .unwrap(),
        )]));
        let prepare = |target: &str| {
            let mut parts = request_to(target);
            let verdict = injector.prepare("api.example.com", None, &mut parts);
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
    }

    #[test]
    fn agent_bound_secrets_are_not_used_for_workloads_outside_the_agent() {
        let injector = injector(vec![loaded(
            "1",
            json!({"name": "bound", "type": "openai", "value": "k", "agent": "research"}),
        )]);
        assert!(!injector.intercepts("api.openai.com", &WORKLOAD));
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
        let secrets: Vec<LoadedSecret> = (0..5000)
            .map(|n| {
                loaded(
                    &n.to_string(),
                    json!({"name": format!("s{n}"), "hostPattern": format!("h{n}.example.com"),
                    "value": "v", "injection": {"headerName": "x"}}),
                )
            })
            .collect();
        let index = SecretIndex::new(secrets);
        assert_eq!(index.candidates("h4999.example.com").count(), 1);
        assert_eq!(index.candidates("nothing.example.com").count(), 0);
    }
}
