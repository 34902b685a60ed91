//! Agents and access rules over the real redirect: scoping secrets and rules to a workload,
//! blocking, and changes taking effect on live traffic.

mod common;
mod https;
mod redirect;

use common::*;
use redirect::*;
use serde_json::Value;

/// Creates a rule blocking `/v1/admin/*` on api.openai.com; returns its id.
fn block_openai_admin_paths(daemon: &Daemon) -> String {
    let rule = cli(
        daemon,
        &[
            "--json",
            "rule",
            "create",
            "--host",
            "api.openai.com",
            "--path",
            "/v1/admin/*",
            "--action",
            "block",
        ],
        None,
    );
    assert_ok(&rule);
    let rule: Value = serde_json::from_slice(&rule.stdout).unwrap();
    rule["id"].as_str().unwrap().to_owned()
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn agents_scope_secrets_rules_block_and_deleting_an_agent_detaches_it() {
    let setup = setup(14, &[]);
    let daemon = &setup.daemon;
    let agent_cgroup = cgroup2_mount().join(unique(14, "research"));
    let created = cli(
        daemon,
        &[
            "agent",
            "create",
            "research",
            "--cgroup",
            agent_cgroup.to_str().unwrap(),
            "--create",
        ],
        None,
    );
    assert_ok(&created);
    assert_eq!(
        attached_programs(&agent_cgroup).len(),
        7,
        "capture not attached"
    );
    let missing = cli(
        daemon,
        &["agent", "create", "ghost", "--cgroup", "no/such/cgroup"],
        None,
    );
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cgroups[0]"));

    create_secret(daemon, &["global", "--type", "openai"], "sk-GLOBAL-000");
    create_secret(
        daemon,
        &["scoped", "--type", "openai", "--agent", "research"],
        "sk-RESEARCH-111",
    );
    block_openai_admin_paths(daemon);
    assert_ok(&cli(
        daemon,
        &[
            "rule",
            "create",
            "--host",
            "other.example.com",
            "--action",
            "block",
        ],
        None,
    ));

    let curl_in_agent = |path: &str| setup.curl_openai_in(&agent_cgroup, path);
    assert_ok(&curl_in_agent("/v1/models"));
    assert_eq!(
        setup.last_request("api.openai.com").headers["authorization"],
        "Bearer sk-RESEARCH-111",
        "the agent's own secret wins"
    );
    assert_ok(&setup.curl(&setup.appliance_ca, "api.openai.com", "/v1/models", &[]));
    assert_eq!(
        setup.last_request("api.openai.com").headers["authorization"],
        "Bearer sk-GLOBAL-000",
        "other workloads get the global secret"
    );

    let before = setup.upstream.seen.requests().len();
    let blocked = curl_in_agent("/v1/admin/keys");
    assert!(
        String::from_utf8_lossy(&blocked.stdout).ends_with("\n403"),
        "{blocked:?}"
    );
    let other = setup.curl(
        &setup.appliance_ca,
        "other.example.com",
        "/",
        &["-w", "\n%{http_code}"],
    );
    assert!(
        String::from_utf8_lossy(&other.stdout).ends_with("\n403"),
        "{other:?}"
    );
    assert_eq!(
        setup.upstream.seen.requests().len(),
        before,
        "a blocked request reached the upstream"
    );

    let events = cli(daemon, &["--json", "events"], None);
    let agents: Vec<Value> = String::from_utf8_lossy(&events.stdout)
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["agent"].clone())
        .collect();
    assert!(
        agents.contains(&Value::String("research".into())),
        "{agents:?}"
    );

    assert_ok(&cli(daemon, &["agent", "delete", "research"], None));
    assert!(
        attached_programs(&agent_cgroup).is_empty(),
        "still attached"
    );
    let direct = command_in_cgroup(&agent_cgroup, "curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(&setup.upstream_ca)
        .arg("--resolve")
        .arg(format!("api.openai.com:443:{}", setup.upstream_ip))
        .args([
            "-H",
            "Authorization: Bearer placeholder",
            "https://api.openai.com/v1/models",
        ])
        .output()
        .unwrap();
    assert_ok(&direct);
    assert_eq!(
        setup.last_request("api.openai.com").headers["authorization"],
        "Bearer placeholder",
        "a detached cgroup must go out untouched"
    );
    remove_cgroup_tree(&agent_cgroup);
}

#[test]
#[cfg_attr(
    not(feature = "privileged-tests"),
    ignore = "needs root; `cargo xtask test` runs it"
)]
fn agent_and_rule_updates_take_effect_over_the_real_redirect() {
    let setup = setup(19, &[]);
    let daemon = &setup.daemon;
    let first = cgroup2_mount().join(unique(19, "first"));
    let second = cgroup2_mount().join(unique(19, "second"));
    assert_ok(&cli(
        daemon,
        &[
            "agent",
            "create",
            "mover",
            "--cgroup",
            first.to_str().unwrap(),
            "--create",
        ],
        None,
    ));
    create_secret(
        daemon,
        &["mover-key", "--type", "openai", "--agent", "mover"],
        "sk-MOVER-222",
    );
    let rule_id = block_openai_admin_paths(daemon);
    let rule_id = rule_id.as_str();

    let moved = cli(
        daemon,
        &[
            "agent",
            "update",
            "mover",
            "--cgroup",
            second.to_str().unwrap(),
            "--create",
        ],
        None,
    );
    assert_ok(&moved);
    assert!(
        attached_programs(&first).is_empty(),
        "the old cgroup is still captured"
    );
    assert_eq!(
        attached_programs(&second).len(),
        7,
        "the new cgroup is not captured"
    );

    let curl_in_second = |path: &str| setup.curl_openai_in(&second, path);
    assert_ok(&curl_in_second("/v1/models"));
    assert_eq!(
        setup.last_request("api.openai.com").headers["authorization"],
        "Bearer sk-MOVER-222",
        "the moved agent's workloads get its secret"
    );
    let blocked = curl_in_second("/v1/admin/keys");
    assert!(
        String::from_utf8_lossy(&blocked.stdout).ends_with("\n403"),
        "{blocked:?}"
    );

    let allowed = cli(
        daemon,
        &["rule", "update", rule_id, "--action", "allow"],
        None,
    );
    assert_ok(&allowed);
    let admin = curl_in_second("/v1/admin/keys");
    assert!(
        String::from_utf8_lossy(&admin.stdout).ends_with("\n200"),
        "{admin:?}"
    );
    let arrived = setup.last_request("api.openai.com");
    assert_eq!(arrived.target, "/v1/admin/keys");
    assert_eq!(arrived.headers["authorization"], "Bearer sk-MOVER-222");

    let invalid = cli(
        daemon,
        &["rule", "update", rule_id, "--action", "maybe"],
        None,
    );
    assert_eq!(invalid.status.code(), Some(3), "{invalid:?}");
    assert!(
        String::from_utf8_lossy(&invalid.stderr).contains("action"),
        "{invalid:?}"
    );
    remove_cgroup_tree(&first);
    remove_cgroup_tree(&second);
}
