//! `appliance rule ...`: access rules.

use appliance::client::{percent_encode, Client};
use appliance::model::{AccessRuleInput, AccessRuleRecord, Action};
use clap::{Args, Subcommand};
use http::Method;
use serde::Deserialize;
use serde_json::Value;

use super::output::{or_dash, print_json, print_table, show_record, Output};
use super::remote::{get, plain, send, Failure};

/// What narrows an access rule beyond its host, for create and update.
#[derive(Args, Debug)]
pub struct RuleNarrowing {
    /// Path pattern, such as `/v1/admin/*`.
    #[arg(long)]
    path: Option<String>,
    /// HTTP method.
    #[arg(long)]
    method: Option<String>,
    /// Limit the rule to one agent.
    #[arg(long)]
    agent: Option<String>,
}

/// `appliance rule ...`
#[derive(Subcommand, Debug)]
pub enum RuleCommand {
    /// Create an access rule.
    Create {
        /// Host (exact or `*.example.com`).
        #[arg(long)]
        host: String,
        /// `allow` or `block`.
        #[arg(long)]
        action: String,
        #[command(flatten)]
        narrowing: RuleNarrowing,
    },
    /// List access rules.
    List,
    /// Show one access rule.
    Get {
        /// Its id.
        id: String,
    },
    /// Change an access rule; only the fields given change.
    Update {
        /// Its id.
        id: String,
        /// Host (exact or `*.example.com`).
        #[arg(long)]
        host: Option<String>,
        /// `allow` or `block`.
        #[arg(long)]
        action: Option<String>,
        #[command(flatten)]
        narrowing: RuleNarrowing,
    },
    /// Delete an access rule.
    Delete {
        /// Its id.
        id: String,
    },
}

#[derive(Deserialize)]
struct RuleList {
    rules: Vec<AccessRuleRecord>,
}

fn path_of(id: &str) -> String {
    format!("/v1/rules/{}", percent_encode(id))
}

/// The body of a create or update. The action goes as typed: the daemon says what it must
/// be, as it does for every other field.
fn body(host: Option<String>, action: Option<String>, narrowing: RuleNarrowing) -> Value {
    let definition = AccessRuleInput {
        host,
        path: narrowing.path,
        method: narrowing.method,
        action: None,
        agent: narrowing.agent,
    };
    let mut body = serde_json::to_value(definition).unwrap_or_default();
    if let (Some(action), Value::Object(fields)) = (action, &mut body) {
        fields.insert("action".into(), Value::String(action));
    }
    body
}

/// Runs `appliance rule ...`.
pub async fn run(client: &Client, output: Output, command: RuleCommand) -> Result<(), Failure> {
    match command {
        RuleCommand::Create {
            host,
            action,
            narrowing,
        } => {
            let body = body(Some(host), Some(action), narrowing);
            let record: AccessRuleRecord = send(client, Method::POST, "/v1/rules", &body).await?;
            show_record(output, &record);
        }
        RuleCommand::List => {
            let list: RuleList = get(client, "/v1/rules").await?;
            match output {
                Output::Json => print_json(&serde_json::json!({"rules": list.rules})),
                Output::Table => {
                    let rows: Vec<Vec<String>> = list
                        .rules
                        .iter()
                        .map(|rule| {
                            let definition = &rule.definition;
                            vec![
                                rule.id.clone(),
                                or_dash(definition.action.map(Action::as_str)),
                                or_dash(definition.host.as_deref()),
                                or_dash(definition.path.as_deref()),
                                or_dash(definition.method.as_deref()),
                                or_dash(definition.agent.as_deref()),
                            ]
                        })
                        .collect();
                    let headers = ["ID", "ACTION", "HOST", "PATH", "METHOD", "AGENT"];
                    print_table(&headers, &rows);
                }
            }
        }
        RuleCommand::Get { id } => {
            let record: AccessRuleRecord = get(client, &path_of(&id)).await?;
            show_record(output, &record);
        }
        RuleCommand::Update {
            id,
            host,
            action,
            narrowing,
        } => {
            let patch = body(host, action, narrowing);
            let record: AccessRuleRecord =
                send(client, Method::PATCH, &path_of(&id), &patch).await?;
            show_record(output, &record);
        }
        RuleCommand::Delete { id } => {
            plain(client, Method::DELETE, &path_of(&id)).await?;
            if let Output::Table = output {
                eprintln!("appliance: deleted rule {id}");
            }
        }
    }
    Ok(())
}
