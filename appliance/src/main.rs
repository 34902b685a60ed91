//! The `appliance` command: daemon and client.

use std::ffi::OsString;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};

mod commands;
use commands::{ClientCommand, Output};

use appliance::api::ApiSettings;
use appliance::capture::{self, CaptureSettings};
use appliance::daemon::{self, DaemonSettings};
use appliance::logging::{self, LogFormat};
use appliance::proxy::{ProxySettings, Unintercepted};

const DEFAULT_AGENTS_CGROUP: &str = "appliance-agents";
const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/appliance";
const DEFAULT_STATE_DIR: &str = "/var/lib/appliance";
const DEFAULT_SOCKET: &str = "/run/appliance/admin.sock";

/// Transparent credential-injecting network appliance.
#[derive(Parser)]
#[command(name = "appliance", version, about)]
struct Cli {
    /// The daemon's admin socket.
    #[arg(long, global = true, env = "APPLIANCE_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the appliance: load the eBPF programs, intercept the selected cgroups, serve.
    Daemon(Box<DaemonArgs>),
    /// Run a command inside a fresh intercepted cgroup.
    Exec(ExecArgs),
    /// Manage secrets (values are read from stdin or a file, never from arguments).
    #[command(subcommand)]
    Secret(Box<commands::SecretCommand>),
    /// Manage agents: named sets of cgroups whose traffic is intercepted.
    #[command(subcommand)]
    Agent(commands::AgentCommand),
    /// Manage access rules: allow or block requests by host, path and method.
    #[command(subcommand)]
    Rule(commands::RuleCommand),
    /// The appliance's certificate authority.
    #[command(subcommand)]
    Ca(commands::CaCommand),
    /// Show recent audit events.
    Events(commands::EventsArgs),
    /// Show the daemon's health.
    Status,
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
}

/// Connections to hosts without a secret, without SNI, or not TLS.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum UninterceptedPolicy {
    /// Carry them to their destination untouched.
    PassThrough,
    /// Close them.
    Refuse,
}

/// What to do with intercepted connections from another network namespace.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ForeignNetns {
    /// Fail them: the engine cannot be reached from there, and nothing may bypass it.
    Refuse,
    /// Let them go out unredirected.
    Allow,
}

#[derive(Args)]
struct DaemonArgs {
    /// IPv4 address of the engine listener.
    #[arg(long, default_value_t = Ipv4Addr::LOCALHOST)]
    listen_v4: Ipv4Addr,
    /// IPv6 address of the engine listener.
    #[arg(long, default_value_t = Ipv6Addr::LOCALHOST)]
    listen_v6: Ipv6Addr,
    /// Port of the engine listener (both families).
    #[arg(long, default_value_t = 15443)]
    port: u16,
    /// Destination port to intercept (repeat for several).
    #[arg(long = "intercept-port", default_values_t = [443u16])]
    intercept_ports: Vec<u16>,
    /// Parent cgroup of `appliance exec` cgroups, absolute or relative to the cgroup2 mount;
    /// created when missing and always intercepted.
    #[arg(long, env = "APPLIANCE_AGENTS_CGROUP", default_value = DEFAULT_AGENTS_CGROUP)]
    agents_cgroup: PathBuf,
    /// Another cgroup to intercept, with its descendants (repeat for several).
    #[arg(long = "cgroup")]
    cgroups: Vec<PathBuf>,
    /// bpffs directory where programs' links and maps are pinned.
    #[arg(long, env = "APPLIANCE_BPFFS_DIR", default_value = DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// SO_MARK of the appliance's own upstream connections, which are never intercepted
    /// (decimal or 0x-hex, not 0).
    #[arg(long, default_value = "0x61706c69", value_parser = parse_mark)]
    mark: u32,
    /// Intercepted connections from other network namespaces.
    #[arg(long, value_enum, default_value_t = ForeignNetns::Refuse)]
    foreign_netns: ForeignNetns,
    /// Directory of persistent state (the CA lives in <state-dir>/ca).
    #[arg(long, env = "APPLIANCE_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// PEM file of CA certificates trusted for upstreams besides the system store
    /// (repeat for several).
    #[arg(long = "upstream-ca")]
    upstream_ca_files: Vec<PathBuf>,
    /// Connections to hosts with no secret (or without SNI, or not TLS).
    #[arg(long, value_enum, default_value_t = UninterceptedPolicy::PassThrough)]
    unintercepted: UninterceptedPolicy,
    /// Seconds allowed for connecting to an upstream.
    #[arg(long, default_value_t = 10)]
    connect_timeout_seconds: u64,
    /// Seconds allowed for a client's TLS handshake, and for each request's headers.
    #[arg(long, default_value_t = 15)]
    client_timeout_seconds: u64,
    /// Largest request header block accepted, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// Group whose members may use the admin socket (root and the daemon's user always may).
    #[arg(long)]
    admin_group: Option<String>,
    /// Seconds to wait for open connections at shutdown.
    #[arg(long, default_value_t = 10)]
    drain_seconds: u64,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Remove every pinned program and map (all interception stops) and exit.
    #[arg(long)]
    detach_all: bool,
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
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

fn parse_mark(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    match parsed {
        Ok(0) => Err("0 means no mark; choose a non-zero mark no other software uses".into()),
        Ok(mark) => Ok(mark),
        Err(_) => Err(format!(
            "{text:?} is not a 32-bit number (decimal or 0x-hex)"
        )),
    }
}

impl DaemonArgs {
    fn into_settings(self, socket: PathBuf) -> anyhow::Result<DaemonSettings> {
        if self.intercept_ports.contains(&self.port) {
            bail!(
                "--intercept-port {} is the engine's own --port; choose different ports",
                self.port
            );
        }
        if self.intercept_ports.contains(&0) {
            bail!("--intercept-port 0 is not a port; give 1-65535");
        }
        if self.intercept_ports.len() > appliance_common::MAX_INTERCEPTED_PORTS as usize {
            bail!(
                "--intercept-port was given {} times; at most {} ports can be intercepted",
                self.intercept_ports.len(),
                appliance_common::MAX_INTERCEPTED_PORTS
            );
        }
        let capture = CaptureSettings {
            bpffs_dir: self.bpffs_dir,
            engine_v4: self.listen_v4,
            engine_v6: self.listen_v6,
            engine_port: self.port,
            intercepted_ports: self.intercept_ports,
            own_mark: self.mark,
            refuse_foreign_netns: matches!(self.foreign_netns, ForeignNetns::Refuse),
            ebpf_log_level: if tracing::enabled!(target: "appliance_ebpf", tracing::Level::DEBUG) {
                4
            } else {
                3
            },
        };
        let client_timeout = Duration::from_secs(self.client_timeout_seconds);
        let proxy = ProxySettings {
            own_mark: self.mark,
            connect_timeout: Duration::from_secs(self.connect_timeout_seconds),
            handshake_timeout: client_timeout,
            header_read_timeout: client_timeout,
            max_header_bytes: self.max_header_bytes,
            unintercepted: match self.unintercepted {
                UninterceptedPolicy::PassThrough => Unintercepted::PassThrough,
                UninterceptedPolicy::Refuse => Unintercepted::Refuse,
            },
        };
        Ok(DaemonSettings {
            capture,
            listen: vec![
                SocketAddr::new(self.listen_v4.into(), self.port),
                SocketAddr::new(self.listen_v6.into(), self.port),
            ],
            proxy,
            state_dir: self.state_dir,
            upstream_ca_files: self.upstream_ca_files,
            leaf_cache_capacity: 10_000,
            credentials_dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
            api: ApiSettings {
                socket,
                admin_group: self.admin_group,
                max_body_bytes: 256 * 1024,
                request_timeout: Duration::from_secs(10),
            },
            agents_cgroup: self.agents_cgroup,
            cgroups: self.cgroups,
            drain: Duration::from_secs(self.drain_seconds),
        })
    }
}

fn run_daemon(args: DaemonArgs, socket: PathBuf) -> anyhow::Result<()> {
    logging::init(args.log_format, "info");
    if args.detach_all {
        let cgroups = capture::detach_all(&args.bpffs_dir)?;
        tracing::info!(cgroups, bpffs_dir = %args.bpffs_dir.display(), "detached everything");
        return Ok(());
    }
    let settings = args.into_settings(socket)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(daemon::run(settings))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Daemon(args) => run_daemon(*args, cli.socket).map(|()| 0),
        Command::Exec(args) => {
            logging::init(LogFormat::Text, "warn");
            appliance::exec::run(
                &args.agents_cgroup,
                args.cgroup.as_deref(),
                &args.command,
                args.allow_unprotected,
            )
            .map_err(anyhow::Error::from)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "appliance",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map(|()| 0)
            .context("writing the man page"),
        client_command => {
            let output = if cli.json {
                Output::Json
            } else {
                Output::Table
            };
            return commands::run(&cli.socket, output, client_command.into_client());
        }
    };
    match outcome {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)),
        Err(error) => {
            eprintln!("appliance: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

impl Command {
    fn into_client(self) -> ClientCommand {
        match self {
            Self::Secret(command) => ClientCommand::Secret(command),
            Self::Ca(command) => ClientCommand::Ca(command),
            Self::Agent(command) => ClientCommand::Agent(command),
            Self::Rule(command) => ClientCommand::Rule(command),
            Self::Events(args) => ClientCommand::Events(args),
            Self::Status => ClientCommand::Status,
            Self::Daemon(_) | Self::Exec(_) | Self::Completions { .. } | Self::Man => {
                unreachable!("handled in main")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_mark;

    #[test]
    fn marks_parse_in_decimal_and_hex_and_refuse_zero() {
        assert_eq!(parse_mark("0x10"), Ok(16));
        assert_eq!(parse_mark("16"), Ok(16));
        assert!(parse_mark("0").unwrap_err().contains("non-zero"));
        assert!(parse_mark("0x").is_err());
        assert!(parse_mark("lots")
            .unwrap_err()
            .contains("not a 32-bit number"));
    }
}
