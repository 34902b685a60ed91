//! `appliance secret ...`: definitions built as the model's input, views printed.

use std::io::Read as _;
use std::path::PathBuf;

use appliance::client::{percent_encode, Client};
use appliance::model::secret::InjectionInput;
use appliance::model::{self, Provider, SecretCheck, SecretInput, SecretView};
use clap::{Args, Subcommand};
use http::Method;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::output::{or_dash, print_json, print_table, Output};
use super::remote::{get, local, plain, send, Failure};
use serde_json::Value;

/// Where a secret's value comes from: read here and stored (never an argument: other users
/// can read the process list), or left where it lives for the daemon to fetch.
#[derive(Args, Debug, Default)]
#[group(multiple = false)]
pub struct ValueSource {
    /// Read the value from standard input (a trailing newline is dropped).
    #[arg(long)]
    value_stdin: bool,
    /// Read the value from a file now (a trailing newline is dropped).
    #[arg(long)]
    value_file: Option<PathBuf>,
    /// Leave the value in 1Password: op://<vault>/<item>/[<section>/]<field>, read through
    /// 1Password Connect.
    #[arg(long)]
    op_ref: Option<String>,
    /// Leave the value in a file the daemon reads (and re-reads within the TTL).
    #[arg(long)]
    value_file_ref: Option<PathBuf>,
    /// A command the daemon runs for the value: an absolute program path and its arguments
    /// (give it last; use --definition for arguments that start with `-`).
    #[arg(long, num_args = 1.., value_name = "PROGRAM ARGS")]
    value_command: Option<Vec<String>>,
    /// A systemd credential of the daemon's service that holds the value.
    #[arg(long)]
    value_credential: Option<String>,
}

impl ValueSource {
    /// Sets the source fields of `input` that the flags give; returns whether one did.
    fn apply(&self, input: &mut SecretInput) -> bool {
        let mut given = false;
        let mut set = |field: &mut Option<String>, value: Option<String>| {
            if value.is_some() {
                *field = value;
                given = true;
            }
        };
        set(&mut input.op_ref, self.op_ref.clone());
        set(
            &mut input.value_file,
            self.value_file_ref
                .as_ref()
                .map(|path| path.display().to_string()),
        );
        set(&mut input.value_credential, self.value_credential.clone());
        if self.value_command.is_some() {
            input.value_command = self.value_command.clone();
            given = true;
        }
        given
    }
}

/// Definition flags shared by create and update.
#[derive(Args, Debug, Default)]
pub struct SecretFields {
    /// Provider shortcut: anthropic, openai, github, stripe, or generic.
    #[arg(long = "type", value_parser = parse_provider)]
    kind: Option<Provider>,
    /// Host (exact or `*.example.com`); repeat for several.
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Path pattern, such as `/v1/*`.
    #[arg(long)]
    path: Option<String>,
    /// Inject into this header.
    #[arg(long)]
    header: Option<String>,
    /// Header or query value around the secret, such as `Bearer {value}`.
    #[arg(long)]
    format: Option<String>,
    /// Inject as this query parameter.
    #[arg(long)]
    query: Option<String>,
    /// Inject as HTTP Basic auth with this user name.
    #[arg(long)]
    basic_user: Option<String>,
    /// Bind the secret to an agent.
    #[arg(long)]
    agent: Option<String>,
    /// A JSON file with the full definition (path templates, regexes, several rules, and
    /// where the value lives: opRef, valueFile, valueCommand, valueCredential); the flags
    /// above override its fields.
    #[arg(long)]
    definition: Option<PathBuf>,
    #[command(flatten)]
    value: ValueSource,
}

/// `appliance secret ...`
#[derive(Subcommand, Debug)]
pub enum SecretCommand {
    /// Create a secret.
    Create {
        /// Its unique name.
        name: String,
        #[command(flatten)]
        fields: SecretFields,
    },
    /// List secrets.
    List,
    /// Show one secret (never its value).
    Get {
        /// Name or id.
        name: String,
    },
    /// Change a secret; only the fields given change.
    Update {
        /// Name or id.
        name: String,
        /// New name.
        #[arg(long)]
        rename: Option<String>,
        #[command(flatten)]
        fields: SecretFields,
    },
    /// Delete a secret.
    Delete {
        /// Name or id.
        name: String,
    },
    /// Resolve a secret's value now (from 1Password, its file, command or credential) and
    /// check that it can be injected; prints the outcome, never the value. Exits 1 when the
    /// value does not resolve.
    Check {
        /// Name or id.
        name: String,
    },
}

fn parse_provider(text: &str) -> Result<Provider, String> {
    Provider::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(text))
        .map_err(|_| "must be one of anthropic, openai, github, stripe, generic".into())
}

/// A definition with its value, as create and update send it.
#[derive(Serialize)]
struct WithValue<'a> {
    #[serde(flatten)]
    definition: &'a SecretInput,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
}

#[derive(Deserialize)]
struct SecretList {
    secrets: Vec<SecretView>,
}

fn read_value(source: &ValueSource) -> Result<Option<Zeroizing<String>>, Failure> {
    let mut text = Zeroizing::new(String::new());
    if source.value_stdin {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|error| local(format!("reading the value from stdin: {error}")))?;
    } else if let Some(path) = &source.value_file {
        *text = std::fs::read_to_string(path).map_err(|error| {
            local(format!(
                "reading the value from {}: {error}",
                path.display()
            ))
        })?;
    } else {
        return Ok(None);
    }
    while text.ends_with('\n') || text.ends_with('\r') {
        text.pop();
    }
    Ok(Some(text))
}

/// The definition the file and the flags give; what neither gives is left out (an update
/// keeps it).
fn definition(fields: &SecretFields) -> Result<SecretInput, Failure> {
    let mut input = match &fields.definition {
        Some(path) => {
            let bytes = std::fs::read(path)
                .map_err(|error| local(format!("reading {}: {error}", path.display())))?;
            model::from_json::<SecretInput>(&bytes)
                .map_err(|error| local(format!("{}: {error}", path.display())))?
        }
        None => SecretInput::default(),
    };
    if input.value.is_some() {
        return Err(local(
            "the definition file must not contain `value`; use --value-stdin or --value-file",
        ));
    }
    if let Some(kind) = fields.kind {
        input.kind = Some(kind);
    }
    if !fields.hosts.is_empty() {
        input.hosts = Some(fields.hosts.clone());
    }
    if let Some(path) = &fields.path {
        input.path_pattern = Some(path.clone());
    }
    if let Some(agent) = &fields.agent {
        input.agent = Some(agent.clone());
    }
    let format = fields.format.clone();
    let injection = match (&fields.header, &fields.query, &fields.basic_user) {
        (Some(header), None, None) => Some(InjectionInput {
            header_name: Some(header.clone()),
            value_format: format,
            ..InjectionInput::default()
        }),
        (None, Some(param), None) => Some(InjectionInput {
            param_name: Some(param.clone()),
            param_format: format,
            ..InjectionInput::default()
        }),
        (None, None, Some(user)) => Some(InjectionInput {
            username: Some(user.clone()),
            ..InjectionInput::default()
        }),
        (None, None, None) => None,
        _ => return Err(local("give only one of --header, --query and --basic-user")),
    };
    if injection.is_some() {
        input.injection = injection;
    }
    Ok(input)
}

fn hosts_of(secret: &SecretView) -> String {
    secret
        .rules
        .iter()
        .flat_map(|rule| rule.hosts.iter().cloned())
        .collect::<Vec<_>>()
        .join(",")
}

fn show_secret(output: Output, secret: &SecretView) {
    match output {
        Output::Json => print_json(secret),
        Output::Table => {
            let record = &secret.record;
            for (key, value) in [
                ("id", record.id.as_str()),
                ("name", &record.name),
                ("type", secret.provider.as_str()),
                ("agent", secret.agent.as_deref().unwrap_or("-")),
                ("source", secret.value_source.as_str()),
                ("opRef", secret.op_ref.as_deref().unwrap_or("-")),
                ("preview", record.preview.as_deref().unwrap_or("-")),
                ("createdAt", &record.created_at),
                ("updatedAt", &record.updated_at),
                ("lastUsedAt", secret.last_used_at.as_deref().unwrap_or("-")),
            ] {
                println!("{key:<11} {value}");
            }
            println!("{:<11} {}", "hosts", hosts_of(secret));
            for rule in &secret.rules {
                let rule = serde_json::to_value(rule).unwrap_or_default();
                println!("{:<11} {rule}", "rule");
            }
        }
    }
}

fn path_of(name: &str) -> String {
    format!("/v1/secrets/{}", percent_encode(name))
}

/// Runs `appliance secret ...`.
pub async fn run(client: &Client, output: Output, command: SecretCommand) -> Result<(), Failure> {
    match command {
        SecretCommand::Create { name, fields } => {
            let mut definition = definition(&fields)?;
            definition.name = Some(name);
            // The flags or the definition file may say where the value lives.
            let from_source =
                fields.value.apply(&mut definition) || definition.names_external_source();
            let value = read_value(&fields.value)?;
            if value.is_none() && !from_source {
                return Err(local("the value is required: pass --value-stdin (and pipe it in) or --value-file FILE, or leave it where it lives with --op-ref, --value-file-ref, --value-command or --value-credential"));
            }
            let body = WithValue {
                definition: &definition,
                value: value.as_deref().map(String::as_str),
            };
            let created: SecretView = send(client, Method::POST, "/v1/secrets", &body).await?;
            show_secret(output, &created);
        }
        SecretCommand::List => {
            let list: SecretList = get(client, "/v1/secrets").await?;
            match output {
                Output::Json => print_json(&serde_json::json!({"secrets": list.secrets})),
                Output::Table => {
                    let rows: Vec<Vec<String>> = list
                        .secrets
                        .iter()
                        .map(|secret| {
                            vec![
                                secret.record.name.clone(),
                                secret.provider.as_str().to_owned(),
                                hosts_of(secret),
                                or_dash(secret.agent.as_deref()),
                                or_dash(secret.record.preview.as_deref()),
                                or_dash(secret.last_used_at.as_deref()),
                            ]
                        })
                        .collect();
                    let headers = ["NAME", "TYPE", "HOSTS", "AGENT", "PREVIEW", "LAST USED"];
                    print_table(&headers, &rows);
                }
            }
        }
        SecretCommand::Get { name } => {
            show_secret(output, &get(client, &path_of(&name)).await?);
        }
        SecretCommand::Update {
            name,
            rename,
            fields,
        } => {
            let mut definition = definition(&fields)?;
            if rename.is_some() {
                definition.name = rename;
            }
            let from_source = fields.value.apply(&mut definition);
            let value = read_value(&fields.value)?;
            let body = WithValue {
                definition: &definition,
                value: value.as_deref().map(String::as_str),
            };
            let mut body = serde_json::to_value(&body)
                .map_err(|error| local(format!("encoding the request failed: {error}")))?;
            if from_source || value.is_some() {
                // The new source replaces whichever the secret had.
                if let Value::Object(fields) = &mut body {
                    for key in [
                        "valueSource",
                        "opRef",
                        "valueFile",
                        "valueCommand",
                        "valueCredential",
                    ] {
                        fields.entry(key).or_insert(Value::Null);
                    }
                }
            }
            let updated: SecretView = send(client, Method::PATCH, &path_of(&name), &body).await?;
            show_secret(output, &updated);
        }
        SecretCommand::Check { name } => {
            let path = format!("{}/check", path_of(&name));
            let check: SecretCheck = send(client, Method::POST, &path, &Value::Null).await?;
            match output {
                Output::Json => print_json(&check),
                Output::Table if check.ok => println!(
                    "ok: the value of {} resolves from {} and can be injected",
                    check.name, check.source
                ),
                Output::Table => {}
            }
            if !check.ok {
                return Err(local(format!(
                    "secret {}: the value does not resolve from {}: {}",
                    check.name,
                    check.source,
                    check.error.unwrap_or_default()
                )));
            }
        }
        SecretCommand::Delete { name } => {
            plain(client, Method::DELETE, &path_of(&name)).await?;
            if let Output::Table = output {
                eprintln!("appliance: deleted secret {name}");
            }
        }
    }
    Ok(())
}
