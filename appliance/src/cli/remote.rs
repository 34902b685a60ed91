//! Commands that talk to the daemon: each becomes one or more admin API calls, sent and
//! read back as the model's types.

use std::path::Path;
use std::process::ExitCode;

use appliance::client::{Answer, Client, ClientError};
use http::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::agent::{self, AgentCommand};
use super::events::{self, CaCommand, EventsArgs};
use super::output::Output;
use super::rule::{self, RuleCommand};
use super::secret::{self, SecretCommand};

const EXIT_LOCAL: u8 = 1;
const EXIT_API: u8 = 3;
const EXIT_UNREACHABLE: u8 = 4;

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

/// A failure with its exit code.
pub struct Failure {
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

/// A failure on this side.
pub fn local(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_LOCAL,
        message: message.into(),
    }
}

fn decoded<T: DeserializeOwned>(answer: Answer) -> Result<T, Failure> {
    let value = match answer {
        Answer::Json(value) => value,
        Answer::Text(_) | Answer::Empty => serde_json::Value::Null,
    };
    serde_json::from_value(value).map_err(|error| {
        local(format!(
            "the daemon's answer is not what this appliance command expects ({error}); are the daemon and the command the same version?"
        ))
    })
}

/// `GET path`, read as `T`.
pub async fn get<T: DeserializeOwned>(client: &Client, path: &str) -> Result<T, Failure> {
    decoded(client.call(Method::GET, path, None).await?)
}

/// `method path` with `body`, the answer read as `T`.
pub async fn send<T: DeserializeOwned>(
    client: &Client,
    method: Method,
    path: &str,
    body: &impl Serialize,
) -> Result<T, Failure> {
    let body = serde_json::to_value(body)
        .map_err(|error| local(format!("encoding the request failed: {error}")))?;
    decoded(client.call(method, path, Some(&body)).await?)
}

/// `method path`, for answers that are text (PEM) or empty: the text.
pub async fn plain(client: &Client, method: Method, path: &str) -> Result<String, Failure> {
    Ok(match client.call(method, path, None).await? {
        Answer::Text(text) => text,
        Answer::Json(value) => value.to_string(),
        Answer::Empty => String::new(),
    })
}

async fn execute(client: &Client, output: Output, command: ClientCommand) -> Result<(), Failure> {
    match command {
        ClientCommand::Status => events::status(client, output).await,
        ClientCommand::Ca(command) => events::ca(client, command).await,
        ClientCommand::Events(args) => events::events(client, output, args).await,
        ClientCommand::Secret(command) => secret::run(client, output, *command).await,
        ClientCommand::Agent(command) => agent::run(client, output, command).await,
        ClientCommand::Rule(command) => rule::run(client, output, command).await,
    }
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
