//! The `appliance` command line: what each subcommand takes, and where it goes. The daemon
//! and the local administration commands run here; the others are calls to the daemon's
//! admin API ([`remote`]).
//!
//! Exit codes: 0 success, 1 local failure, 2 usage error (clap), 3 the daemon refused the
//! request, 4 the daemon cannot be reached.

mod admin;
mod agent;
mod daemon;
mod doctor;
mod events;
mod output;
mod remote;
mod rule;
mod secret;
mod trust;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory as _, Parser, Subcommand};

use appliance::logging::{self, LogFormat};
use output::Output;
use remote::ClientCommand;

const DEFAULT_AGENTS_CGROUP: &str = "appliance-agents";
const DEFAULT_SOCKET: &str = "/run/appliance/admin.sock";

/// Transparent credential-injecting network appliance.
#[derive(Parser)]
#[command(name = "appliance", version, about)]
pub struct Cli {
    /// The daemon's admin socket [default: /run/appliance/admin.sock, or api.socket of the
    /// daemon's configuration].
    #[arg(long, global = true, env = "APPLIANCE_SOCKET")]
    socket: Option<PathBuf>,
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the appliance: load the eBPF programs, intercept the selected cgroups, serve.
    Daemon(Box<daemon::DaemonArgs>),
    /// Run a command inside a fresh intercepted cgroup.
    Exec(ExecArgs),
    /// Manage secrets (values are read from stdin or a file, never from arguments).
    #[command(subcommand)]
    Secret(Box<secret::SecretCommand>),
    /// Manage agents: named sets of cgroups whose traffic is intercepted.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Manage access rules: allow or block requests by host, path and method.
    #[command(subcommand)]
    Rule(rule::RuleCommand),
    /// The appliance's certificate authority.
    #[command(subcommand)]
    Ca(events::CaCommand),
    /// Make clients trust the appliance CA: the environment `appliance exec` gives commands,
    /// for services and containers.
    #[command(subcommand)]
    Trust(trust::TrustCommand),
    /// The store's master key (run as root, with the daemon stopped).
    #[command(subcommand)]
    Key(admin::KeyCommand),
    /// Show recent audit events.
    Events(events::EventsArgs),
    /// Show the daemon's health.
    Status,
    /// Install the appliance (binary, systemd unit, configuration, master key, completion,
    /// man page) under a root directory; run `systemctl daemon-reload` afterwards.
    Install {
        /// Root to install under (a staging directory, or / for this host).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Detach every eBPF program and remove what `install` wrote; `--purge` also removes the
    /// configuration, the master key and the store (all secrets).
    Uninstall {
        /// Root the appliance was installed under.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Also remove configuration, master key and store.
        #[arg(long)]
        purge: bool,
    },
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
}

#[derive(Args)]
struct ExecArgs {
    /// Name of the cgroup to create under the agents cgroup (default: exec-<pid>).
    #[arg(long)]
    cgroup: Option<String>,
    /// The daemon's agents cgroup.
    #[arg(long, env = "APPLIANCE_AGENTS_CGROUP", default_value = DEFAULT_AGENTS_CGROUP)]
    agents_cgroup: PathBuf,
    /// Run even when the cgroup is not intercepted (no appliance protects the command).
    #[arg(long)]
    allow_unprotected: bool,
    /// Leave the command's environment alone: do not point its runtimes (OpenSSL, Python,
    /// curl, git, Go, Node, Java) at the appliance CA.
    #[arg(long)]
    no_trust: bool,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

/// Parses the command line and runs what it asks for.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let output = if cli.json {
        Output::Json
    } else {
        Output::Table
    };
    let remote = |command| remote::run(&socket_of(&cli.socket), output, command);
    match cli.command {
        Command::Secret(command) => remote(ClientCommand::Secret(command)),
        Command::Ca(command) => remote(ClientCommand::Ca(command)),
        Command::Agent(command) => remote(ClientCommand::Agent(command)),
        Command::Rule(command) => remote(ClientCommand::Rule(command)),
        Command::Events(args) => remote(ClientCommand::Events(args)),
        Command::Status => remote(ClientCommand::Status),
        Command::Daemon(args) => exit(daemon::run(*args, cli.socket.clone()).map(|()| 0)),
        Command::Exec(args) => {
            logging::init(LogFormat::Text, "warn");
            let trust_dir = appliance::trust::dir_for_socket(&socket_of(&cli.socket));
            let options = appliance::exec::ExecOptions {
                agents_cgroup: &args.agents_cgroup,
                name: args.cgroup.as_deref(),
                allow_unprotected: args.allow_unprotected,
                trust_dir: (!args.no_trust).then_some(trust_dir.as_path()),
            };
            exit(appliance::exec::run(&options, &args.command).map_err(anyhow::Error::from))
        }
        Command::Trust(command) => exit(trust::run(command, &socket_of(&cli.socket))),
        Command::Key(command) => exit(admin::key(command)),
        Command::Install { root } => exit(admin::install(&root, &mut Cli::command())),
        Command::Uninstall { root, purge } => exit(admin::uninstall(&root, purge)),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "appliance",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man => exit(admin::man(&mut Cli::command())),
    }
}

/// The admin socket: `--socket`, else the default.
fn socket_of(socket: &Option<PathBuf>) -> PathBuf {
    socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

fn exit(outcome: anyhow::Result<i32>) -> ExitCode {
    match outcome {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)),
        Err(error) => {
            eprintln!("appliance: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
