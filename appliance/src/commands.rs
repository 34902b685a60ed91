//! Client commands of the `appliance` CLI: each becomes one or more admin API calls.
//!
//! Exit codes: 0 success, 1 local failure, 2 usage error (clap), 3 the daemon refused the
//! request, 4 the daemon cannot be reached.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use appliance::client::{Answer, Client, ClientError};
use clap::{Args, Subcommand};
use http::Method;
use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

const EXIT_LOCAL: u8 = 1;
const EXIT_API: u8 = 3;
const EXIT_UNREACHABLE: u8 = 4;

/// How results are printed.
#[derive(Clone, Copy)]
pub enum Output {
    /// Human tables.
    Table,
    /// JSON, for scripts.
    Json,
}

/// Commands that talk to the daemon.
pub enum ClientCommand {
    /// `appliance secret ...`
    Secret(Box<SecretCommand>),
    /// `appliance ca ...`
    Ca(CaCommand),
    /// `appliance agent ...`
    Agent(AgentCommand),
    /// `appliance rule ...`
    Rule(RuleCommand),
    /// `appliance events`
    Events(EventsArgs),
    /// `appliance status`
    Status,
}

/// Where a secret's value comes from. Never an argument: other users can read the process
/// list.
#[derive(Args, Debug, Default)]
#[group(multiple = false)]
pub struct ValueSource {
    /// Read the value from standard input (a trailing newline is dropped).
    #[arg(long)]
    value_stdin: bool,
    /// Read the value from a file (a trailing newline is dropped).
    #[arg(long)]
    value_file: Option<PathBuf>,
}

/// Definition flags shared by create and update.
#[derive(Args, Debug, Default)]
pub struct SecretFields {
    /// Provider shortcut: anthropic, openai, github, stripe, or generic.
    #[arg(long = "type")]
    kind: Option<String>,
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
    /// A JSON file with the full definition (path templates, regexes, several rules); the
    /// flags above override its fields.
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
}

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

/// `appliance ca ...`
#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Print the CA certificate (PEM) for clients to trust.
    Export,
    /// Replace the CA; clients must trust the new certificate.
    Rotate,
}

/// `appliance events`
#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Keep printing new events as they happen.
    #[arg(long)]
    follow: bool,
    /// Only events at or after this time: RFC 3339 (2026-12-01T10:00:00Z) or an age such as
    /// 90s, 15m, 2h or 7d.
    #[arg(long, value_parser = parse_since)]
    since: Option<String>,
    /// Only events of this agent.
    #[arg(long)]
    agent: Option<String>,
    /// Only events that injected this secret (name or id).
    #[arg(long)]
    secret: Option<String>,
    /// Only events for this host (TLS server name).
    #[arg(long)]
    host: Option<String>,
}

/// `--since` as an RFC 3339 time: given as one, or as an age counted back from now.
fn parse_since(text: &str) -> Result<String, String> {
    use time::format_description::well_known::Rfc3339;
    if time::OffsetDateTime::parse(text, &Rfc3339).is_ok() {
        return Ok(text.to_owned());
    }
    let unit_at = text.len().saturating_sub(1);
    let (number, unit) = text.split_at(unit_at);
    let seconds: i64 = match (number.parse::<i64>(), unit) {
        (Ok(n), "s") => n,
        (Ok(n), "m") => n * 60,
        (Ok(n), "h") => n * 3600,
        (Ok(n), "d") => n * 86_400,
        _ => {
            return Err(format!(
                "{text:?} is neither an RFC 3339 time (2026-12-01T10:00:00Z) nor an age such as 15m, 2h or 7d"
            ))
        }
    };
    (time::OffsetDateTime::now_utc() - time::Duration::seconds(seconds))
        .format(&Rfc3339)
        .map_err(|error| error.to_string())
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Self {
        let code = match error {
            ClientError::Unreachable { .. } => EXIT_UNREACHABLE,
            ClientError::Api { .. } => EXIT_API,
            ClientError::Protocol(_) => EXIT_LOCAL,
        };
        Self {
            code,
            message: error.to_string(),
        }
    }
}

fn local(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_LOCAL,
        message: message.into(),
    }
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

fn definition(fields: &SecretFields) -> Result<Map<String, Value>, Failure> {
    let mut object = match &fields.definition {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|error| local(format!("reading {}: {error}", path.display())))?;
            match serde_json::from_str(&text) {
                Ok(Value::Object(object)) => object,
                Ok(_) => return Err(local(format!("{} must hold a JSON object", path.display()))),
                Err(error) => {
                    return Err(local(format!("{} is not JSON: {error}", path.display())))
                }
            }
        }
        None => Map::new(),
    };
    if object.contains_key("value") {
        return Err(local(
            "the definition file must not contain `value`; use --value-stdin or --value-file",
        ));
    }
    let mut set = |key: &str, value: Value| {
        object.insert(key.to_owned(), value);
    };
    if let Some(kind) = &fields.kind {
        set("type", json!(kind));
    }
    if !fields.hosts.is_empty() {
        set("hosts", json!(fields.hosts));
    }
    if let Some(path) = &fields.path {
        set("pathPattern", json!(path));
    }
    if let Some(agent) = &fields.agent {
        set("agent", json!(agent));
    }
    let injection = match (&fields.header, &fields.query, &fields.basic_user) {
        (Some(header), None, None) => Some(match &fields.format {
            Some(format) => json!({"headerName": header, "valueFormat": format}),
            None => json!({"headerName": header}),
        }),
        (None, Some(param), None) => Some(match &fields.format {
            Some(format) => json!({"paramName": param, "paramFormat": format}),
            None => json!({"paramName": param}),
        }),
        (None, None, Some(user)) => Some(json!({"username": user})),
        (None, None, None) => None,
        _ => return Err(local("give only one of --header, --query and --basic-user")),
    };
    if let Some(injection) = injection {
        set("injection", injection);
    }
    Ok(object)
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn hosts_of(secret: &Value) -> String {
    secret["rules"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .flat_map(|rule| rule["hosts"].as_array().cloned().unwrap_or_default())
                .map(|host| text(&host))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn show_secret(output: Output, secret: &Value) {
    match output {
        Output::Json => print_json(secret),
        Output::Table => {
            for key in [
                "id",
                "name",
                "type",
                "agent",
                "preview",
                "createdAt",
                "updatedAt",
                "lastUsedAt",
            ] {
                println!("{key:<11} {}", text(&secret[key]));
            }
            println!("{:<11} {}", "hosts", hosts_of(secret));
            for rule in secret["rules"].as_array().into_iter().flatten() {
                println!("{:<11} {}", "rule", rule);
            }
        }
    }
}

fn answer_json(answer: Answer) -> Value {
    match answer {
        Answer::Json(value) => value,
        Answer::Text(text) => Value::String(text),
        Answer::Empty => Value::Null,
    }
}

/// `segment` percent-encoded but for unreserved characters: safe as a path segment and as a
/// query value.
fn percent_encode_segment(segment: &str) -> String {
    segment
        .bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
                (byte as char).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

fn print_events(output: Output, events: &[Value]) {
    for event in events {
        match output {
            Output::Json => println!("{event}"),
            Output::Table => {
                let secrets: Vec<String> = event["secrets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|secret| text(&secret["name"]))
                    .collect();
                // Host workloads have no container; their line stays as it was.
                let container = event["container"]
                    .as_str()
                    .map(|name| format!(" container={name}"))
                    .unwrap_or_default();
                println!(
                    "{}  {}  {} {}{}  {}  agent={} pid={}{container} secrets={}",
                    text(&event["time"]),
                    text(&event["outcome"]),
                    text(&event["method"]),
                    text(&event["host"]),
                    text(&event["path"]),
                    text(&event["status"]),
                    text(&event["agent"]),
                    text(&event["pid"]),
                    if secrets.is_empty() {
                        "-".into()
                    } else {
                        secrets.join(",")
                    },
                );
            }
        }
    }
}

async fn execute(client: &Client, output: Output, command: ClientCommand) -> Result<(), Failure> {
    match command {
        ClientCommand::Status => {
            let health = answer_json(client.call(Method::GET, "/v1/health", None).await?);
            match output {
                Output::Json => print_json(&health),
                Output::Table => {
                    println!("status              {}", text(&health["status"]));
                    println!(
                        "intercepted cgroups {}",
                        text(&health["capture"]["interceptedCgroups"])
                    );
                    println!("secrets             {}", text(&health["store"]["secrets"]));
                    println!(
                        "leaves minted       {}",
                        text(&health["ca"]["leavesMinted"])
                    );
                }
            }
        }
        ClientCommand::Ca(CaCommand::Export) => {
            print!(
                "{}",
                text(&answer_json(
                    client.call(Method::GET, "/v1/ca", None).await?
                ))
            );
        }
        ClientCommand::Ca(CaCommand::Rotate) => {
            let pem = answer_json(client.call(Method::POST, "/v1/ca/rotate", None).await?);
            eprintln!("appliance: CA rotated; clients must trust the new certificate below");
            print!("{}", text(&pem));
        }
        ClientCommand::Events(EventsArgs {
            follow,
            since,
            agent,
            secret,
            host,
        }) => {
            let filters: String = [
                ("since", since),
                ("agent", agent),
                ("secret", secret),
                ("host", host),
            ]
            .into_iter()
            .filter_map(|(key, value)| Some(format!("&{key}={}", percent_encode_segment(&value?))))
            .collect();
            let mut after = 0;
            loop {
                let wait = if follow { 30 } else { 0 };
                let path = format!("/v1/events?after={after}&wait={wait}{filters}");
                let answer = answer_json(client.call(Method::GET, &path, None).await?);
                let events = answer["events"].as_array().cloned().unwrap_or_default();
                print_events(output, &events);
                // Past what the filters left out too, so a follower does not ask again.
                let last = events.last().and_then(|event| event["seq"].as_u64());
                after = last
                    .max(answer["latest"].as_u64())
                    .unwrap_or(after)
                    .max(after);
                if !follow {
                    break;
                }
            }
        }
        ClientCommand::Secret(command) => secret(client, output, *command).await?,
        ClientCommand::Agent(command) => agent(client, output, command).await?,
        ClientCommand::Rule(command) => rule(client, output, command).await?,
    }
    Ok(())
}

async fn secret(client: &Client, output: Output, command: SecretCommand) -> Result<(), Failure> {
    match command {
        SecretCommand::Create { name, fields } => {
            let mut body = definition(&fields)?;
            body.insert("name".into(), json!(name));
            let value = read_value(&fields.value)?.ok_or_else(|| {
                local("the value is required: pass --value-stdin (and pipe it in) or --value-file FILE")
            })?;
            body.insert("value".into(), json!(value.as_str()));
            let body = Value::Object(body);
            let created = answer_json(
                client
                    .call(Method::POST, "/v1/secrets", Some(&body))
                    .await?,
            );
            show_secret(output, &created);
        }
        SecretCommand::List => {
            let headers = ["NAME", "TYPE", "HOSTS", "AGENT", "PREVIEW", "LAST USED"];
            list(
                client,
                output,
                "/v1/secrets",
                "secrets",
                &headers,
                |secret| {
                    vec![
                        text(&secret["name"]),
                        text(&secret["type"]),
                        hosts_of(secret),
                        text(&secret["agent"]),
                        text(&secret["preview"]),
                        text(&secret["lastUsedAt"]),
                    ]
                },
            )
            .await?;
        }
        SecretCommand::Get { name } => {
            let path = format!("/v1/secrets/{}", percent_encode_segment(&name));
            show_secret(
                output,
                &answer_json(client.call(Method::GET, &path, None).await?),
            );
        }
        SecretCommand::Update {
            name,
            rename,
            fields,
        } => {
            let mut body = definition(&fields)?;
            if let Some(rename) = rename {
                body.insert("name".into(), json!(rename));
            }
            if let Some(value) = read_value(&fields.value)? {
                body.insert("value".into(), json!(value.as_str()));
            }
            let path = format!("/v1/secrets/{}", percent_encode_segment(&name));
            let body = Value::Object(body);
            show_secret(
                output,
                &answer_json(client.call(Method::PATCH, &path, Some(&body)).await?),
            );
        }
        SecretCommand::Delete { name } => {
            let path = format!("/v1/secrets/{}", percent_encode_segment(&name));
            client.call(Method::DELETE, &path, None).await?;
            if let Output::Table = output {
                eprintln!("appliance: deleted secret {name}");
            }
        }
    }
    Ok(())
}

/// Fetches a list endpoint and prints the API's JSON, or a table with one row per record
/// under `key`.
async fn list(
    client: &Client,
    output: Output,
    path: &str,
    key: &str,
    headers: &[&str],
    row: impl Fn(&Value) -> Vec<String>,
) -> Result<(), Failure> {
    let answer = answer_json(client.call(Method::GET, path, None).await?);
    match output {
        Output::Json => print_json(&answer),
        Output::Table => {
            let rows: Vec<Vec<String>> = answer[key]
                .as_array()
                .into_iter()
                .flatten()
                .map(row)
                .collect();
            print_table(headers, &rows);
        }
    }
    Ok(())
}

fn show_record(output: Output, record: &Value) {
    match output {
        Output::Json => print_json(record),
        Output::Table => {
            if let Some(object) = record.as_object() {
                for (key, value) in object {
                    println!("{key:<10} {}", text(value));
                }
            }
        }
    }
}

async fn agent(client: &Client, output: Output, command: AgentCommand) -> Result<(), Failure> {
    let path_of = |name: &str| format!("/v1/agents/{}", percent_encode_segment(name));
    match command {
        AgentCommand::Create {
            name,
            cgroups,
            create,
        } => {
            let body = json!({"name": name, "cgroups": cgroups, "create": create});
            show_record(
                output,
                &answer_json(client.call(Method::POST, "/v1/agents", Some(&body)).await?),
            );
        }
        AgentCommand::List => {
            let headers = ["NAME", "CGROUPS", "UPDATED"];
            list(client, output, "/v1/agents", "agents", &headers, |agent| {
                let cgroups: Vec<String> = agent["cgroups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(text)
                    .collect();
                vec![
                    text(&agent["name"]),
                    cgroups.join(","),
                    text(&agent["updatedAt"]),
                ]
            })
            .await?;
        }
        AgentCommand::Get { name } => {
            show_record(
                output,
                &answer_json(client.call(Method::GET, &path_of(&name), None).await?),
            );
        }
        AgentCommand::Update {
            name,
            rename,
            cgroups,
            create,
        } => {
            let mut body = Map::new();
            if let Some(rename) = rename {
                body.insert("name".into(), json!(rename));
            }
            if !cgroups.is_empty() {
                body.insert("cgroups".into(), json!(cgroups));
            }
            if create {
                body.insert("create".into(), json!(true));
            }
            let body = Value::Object(body);
            show_record(
                output,
                &answer_json(
                    client
                        .call(Method::PATCH, &path_of(&name), Some(&body))
                        .await?,
                ),
            );
        }
        AgentCommand::Delete { name } => {
            client.call(Method::DELETE, &path_of(&name), None).await?;
            if let Output::Table = output {
                eprintln!("appliance: deleted agent {name}");
            }
        }
    }
    Ok(())
}

async fn rule(client: &Client, output: Output, command: RuleCommand) -> Result<(), Failure> {
    let path_of = |id: &str| format!("/v1/rules/{}", percent_encode_segment(id));
    match command {
        RuleCommand::Create {
            host,
            action,
            narrowing,
        } => {
            let RuleNarrowing {
                path,
                method,
                agent,
            } = narrowing;
            let body = json!({"host": host, "action": action, "path": path, "method": method, "agent": agent});
            show_record(
                output,
                &answer_json(client.call(Method::POST, "/v1/rules", Some(&body)).await?),
            );
        }
        RuleCommand::List => {
            let headers = ["ID", "ACTION", "HOST", "PATH", "METHOD", "AGENT"];
            list(client, output, "/v1/rules", "rules", &headers, |rule| {
                ["id", "action", "host", "path", "method", "agent"]
                    .iter()
                    .map(|key| text(&rule[*key]))
                    .collect()
            })
            .await?;
        }
        RuleCommand::Get { id } => {
            show_record(
                output,
                &answer_json(client.call(Method::GET, &path_of(&id), None).await?),
            );
        }
        RuleCommand::Update {
            id,
            host,
            action,
            narrowing:
                RuleNarrowing {
                    path,
                    method,
                    agent,
                },
        } => {
            let body: Map<String, Value> = [
                ("host", host),
                ("action", action),
                ("path", path),
                ("method", method),
                ("agent", agent),
            ]
            .into_iter()
            .filter_map(|(key, value)| value.map(|value| (key.to_owned(), json!(value))))
            .collect();
            show_record(
                output,
                &answer_json(
                    client
                        .call(Method::PATCH, &path_of(&id), Some(&Value::Object(body)))
                        .await?,
                ),
            );
        }
        RuleCommand::Delete { id } => {
            client.call(Method::DELETE, &path_of(&id), None).await?;
            if let Output::Table = output {
                eprintln!("appliance: deleted rule {id}");
            }
        }
    }
    Ok(())
}

/// Runs a client command against the daemon at `socket`.
pub fn run(socket: &Path, output: Output, command: ClientCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("appliance: error: starting the async runtime: {error}");
            return ExitCode::from(EXIT_LOCAL);
        }
    };
    let client = Client::new(socket);
    match runtime.block_on(execute(&client, output, command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("appliance: error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}
