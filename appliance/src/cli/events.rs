//! `appliance status`, `appliance ca` and `appliance events`.

use appliance::client::{percent_encode, Client};
use clap::{Args, Subcommand};
use http::Method;
use serde_json::Value;

use super::output::{print_json, text, Output};
use super::remote::{get, plain, Failure};

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

/// `appliance status`.
pub async fn status(client: &Client, output: Output) -> Result<(), Failure> {
    let health: Value = get(client, "/v1/health").await?;
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
    Ok(())
}

/// `appliance ca ...`.
pub async fn ca(client: &Client, command: CaCommand) -> Result<(), Failure> {
    match command {
        CaCommand::Export => print!("{}", plain(client, Method::GET, "/v1/ca").await?),
        CaCommand::Rotate => {
            let pem = plain(client, Method::POST, "/v1/ca/rotate").await?;
            eprintln!("appliance: CA rotated; clients must trust the new certificate below");
            print!("{pem}");
        }
    }
    Ok(())
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

/// One page of `/v1/events`.
#[derive(serde::Deserialize)]
struct EventPage {
    events: Vec<Value>,
    latest: u64,
}

/// `appliance events`.
pub async fn events(client: &Client, output: Output, args: EventsArgs) -> Result<(), Failure> {
    let EventsArgs {
        follow,
        since,
        agent,
        secret,
        host,
    } = args;
    let filters: String = [
        ("since", since),
        ("agent", agent),
        ("secret", secret),
        ("host", host),
    ]
    .into_iter()
    .filter_map(|(key, value)| Some(format!("&{key}={}", percent_encode(&value?))))
    .collect();
    let mut after = 0;
    loop {
        let wait = if follow { 30 } else { 0 };
        let path = format!("/v1/events?after={after}&wait={wait}{filters}");
        let page: EventPage = get(client, &path).await?;
        print_events(output, &page.events);
        // Past what the filters left out too, so a follower does not ask again.
        let last = page.events.last().and_then(|event| event["seq"].as_u64());
        after = last.unwrap_or(0).max(page.latest).max(after);
        if !follow {
            return Ok(());
        }
    }
}
