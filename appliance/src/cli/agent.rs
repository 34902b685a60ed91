//! `appliance agent ...`.

use appliance::client::{percent_encode, Client};
use appliance::model::{AgentInput, AgentRecord};
use clap::Subcommand;
use http::Method;
use serde::Deserialize;

use super::output::{print_json, print_table, show_record, Output};
use super::remote::{get, plain, send, Failure};

/// `appliance agent ...`
#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Create an agent: a named set of cgroups to intercept.
    Create {
        /// Its unique name.
        name: String,
        /// cgroup v2 path, absolute or relative to the cgroup2 mount; repeat for several.
        #[arg(long = "cgroup", required = true)]
        cgroups: Vec<String>,
        /// Create cgroups that do not exist yet.
        #[arg(long)]
        create: bool,
    },
    /// List agents.
    List,
    /// Show one agent.
    Get {
        /// Its name.
        name: String,
    },
    /// Change an agent; only the fields given change.
    Update {
        /// Its name.
        name: String,
        /// New name.
        #[arg(long)]
        rename: Option<String>,
        /// Replace its cgroups; repeat for several.
        #[arg(long = "cgroup")]
        cgroups: Vec<String>,
        /// Create cgroups that do not exist yet.
        #[arg(long)]
        create: bool,
    },
    /// Delete an agent.
    Delete {
        /// Its name.
        name: String,
    },
}

#[derive(Deserialize)]
struct AgentList {
    agents: Vec<AgentRecord>,
}

fn path_of(name: &str) -> String {
    format!("/v1/agents/{}", percent_encode(name))
}

/// Runs `appliance agent ...`.
pub async fn run(client: &Client, output: Output, command: AgentCommand) -> Result<(), Failure> {
    match command {
        AgentCommand::Create {
            name,
            cgroups,
            create,
        } => {
            let input = AgentInput {
                name: Some(name),
                cgroups: Some(cgroups),
                create: Some(create),
            };
            let record: AgentRecord = send(client, Method::POST, "/v1/agents", &input).await?;
            show_record(output, &record);
        }
        AgentCommand::List => {
            let list: AgentList = get(client, "/v1/agents").await?;
            match output {
                Output::Json => print_json(&serde_json::json!({"agents": list.agents})),
                Output::Table => {
                    let rows: Vec<Vec<String>> = list
                        .agents
                        .iter()
                        .map(|agent| {
                            let definition = &agent.definition;
                            vec![
                                definition.name.clone().unwrap_or_default(),
                                definition.cgroups.clone().unwrap_or_default().join(","),
                                agent.updated_at.clone(),
                            ]
                        })
                        .collect();
                    print_table(&["NAME", "CGROUPS", "UPDATED"], &rows);
                }
            }
        }
        AgentCommand::Get { name } => {
            let record: AgentRecord = get(client, &path_of(&name)).await?;
            show_record(output, &record);
        }
        AgentCommand::Update {
            name,
            rename,
            cgroups,
            create,
        } => {
            let patch = AgentInput {
                name: rename,
                cgroups: Some(cgroups).filter(|cgroups| !cgroups.is_empty()),
                create: create.then_some(true),
            };
            let record: AgentRecord = send(client, Method::PATCH, &path_of(&name), &patch).await?;
            show_record(output, &record);
        }
        AgentCommand::Delete { name } => {
            plain(client, Method::DELETE, &path_of(&name)).await?;
            if let Output::Table = output {
                eprintln!("appliance: deleted agent {name}");
            }
        }
    }
    Ok(())
}
