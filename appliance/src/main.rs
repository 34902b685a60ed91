//! The `appliance` command: daemon and client.

use std::ffi::OsString;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, Parser, Subcommand};

mod commands;
use commands::{ClientCommand, Output};

use appliance::api::ApiSettings;
use appliance::capture::containers::{self, ContainerSettings};
use appliance::capture::{self, CaptureSettings, ContainerSelection, Delivery};
use appliance::config::{
    Config, ContainerSelectionConfig, ForeignNetns, LogFormatConfig, UninterceptedConfig,
};
use appliance::daemon::{self, DaemonSettings};
use appliance::logging::{self, LogFormat};
use appliance::proxy::{ProxySettings, Unintercepted};

/// glibc malloc serialized the engine's worker threads on its arena locks under load
/// (futex waits in the profile); mimalloc keeps per-thread heaps.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_AGENTS_CGROUP: &str = "appliance-agents";
const DEFAULT_SOCKET: &str = "/run/appliance/admin.sock";

/// Transparent credential-injecting network appliance.
#[derive(Parser)]
#[command(name = "appliance", version, about)]
struct Cli {
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
    /// The store's master key (run as root, with the daemon stopped).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Show recent audit events.
    Events(commands::EventsArgs),
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

/// `appliance daemon`: every option overrides the configuration file.
#[derive(Args)]
struct DaemonArgs {
    /// Configuration file [default: /etc/appliance/config.toml when it exists].
    #[arg(long, env = "APPLIANCE_CONFIG")]
    config: Option<PathBuf>,
    /// Check the configuration, print the effective settings and exit.
    #[arg(long)]
    check_config: bool,
    /// Remove every pinned program and map (all interception stops) and exit.
    #[arg(long)]
    detach_all: bool,
    /// IPv4 address of the engine listener (listen.ipv4).
    #[arg(long)]
    listen_v4: Option<Ipv4Addr>,
    /// IPv6 address of the engine listener (listen.ipv6).
    #[arg(long)]
    listen_v6: Option<Ipv6Addr>,
    /// Port of the engine listener (listen.port).
    #[arg(long)]
    port: Option<u16>,
    /// Destination port to intercept, repeatable (capture.intercept_ports).
    #[arg(long = "intercept-port")]
    intercept_ports: Vec<u16>,
    /// Parent cgroup of `appliance exec` cgroups (capture.agents_cgroup).
    #[arg(long, env = "APPLIANCE_AGENTS_CGROUP")]
    agents_cgroup: Option<PathBuf>,
    /// Another cgroup to intercept, repeatable (capture.cgroups).
    #[arg(long = "cgroup")]
    cgroups: Vec<PathBuf>,
    /// Connections from other network namespaces, such as containers
    /// (capture.foreign_netns).
    #[arg(long, value_enum)]
    foreign_netns: Option<ForeignNetns>,
    /// bpffs directory for pinned links and maps (capture.bpffs_dir).
    #[arg(long, env = "APPLIANCE_BPFFS_DIR")]
    bpffs_dir: Option<PathBuf>,
    /// SO_MARK of the appliance's own upstream connections, decimal or 0x-hex
    /// (capture.mark).
    #[arg(long, value_parser = parse_mark)]
    mark: Option<u32>,
    /// State directory: CA, store, master key (state.dir).
    #[arg(long, env = "APPLIANCE_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// PEM file of CAs trusted for upstreams, repeatable (upstream.ca_files).
    #[arg(long = "upstream-ca")]
    upstream_ca_files: Vec<PathBuf>,
    /// Group allowed to use the admin socket (api.admin_group).
    #[arg(long)]
    admin_group: Option<String>,
    /// Log line format (log.format).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

/// `appliance key`: works on the store directly, so the daemon must be stopped.
#[derive(Subcommand)]
enum KeyCommand {
    /// Seal every secret value under a new master key and replace the key file. Stop the
    /// daemon first; if interrupted, run it again to finish.
    Rotate {
        /// Configuration file, for state.dir [default: /etc/appliance/config.toml when it
        /// exists].
        #[arg(long, env = "APPLIANCE_CONFIG")]
        config: Option<PathBuf>,
        /// The daemon's state directory (state.dir).
        #[arg(long, env = "APPLIANCE_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// The key file [default: <state dir>/master.key when it exists, else the installed
        /// credential /etc/appliance/master.key].
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
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
    /// The configuration file with these options applied on top, validated.
    fn config(&self, socket: Option<PathBuf>) -> anyhow::Result<(Config, String)> {
        let (mut config, origin) = Config::load(self.config.as_deref())?;
        let listen = &mut config.listen;
        listen.ipv4 = self.listen_v4.unwrap_or(listen.ipv4);
        listen.ipv6 = self.listen_v6.unwrap_or(listen.ipv6);
        listen.port = self.port.unwrap_or(listen.port);
        let capture = &mut config.capture;
        if !self.intercept_ports.is_empty() {
            capture.intercept_ports.clone_from(&self.intercept_ports);
        }
        if let Some(agents) = &self.agents_cgroup {
            capture.agents_cgroup.clone_from(agents);
        }
        capture.cgroups.extend(self.cgroups.iter().cloned());
        if let Some(mode) = self.foreign_netns {
            capture.foreign_netns = mode;
        }
        if let Some(bpffs_dir) = &self.bpffs_dir {
            capture.bpffs_dir.clone_from(bpffs_dir);
        }
        capture.mark = self.mark.unwrap_or(capture.mark);
        if let Some(state_dir) = &self.state_dir {
            config.state.dir.clone_from(state_dir);
        }
        config
            .upstream
            .ca_files
            .extend(self.upstream_ca_files.iter().cloned());
        if let Some(group) = &self.admin_group {
            config.api.admin_group.clone_from(group);
        }
        if let Some(socket) = socket {
            config.api.socket = socket;
        }
        if let Some(format) = self.log_format {
            config.log.format = match format {
                LogFormat::Text => LogFormatConfig::Text,
                LogFormat::Json => LogFormatConfig::Json,
            };
        }
        let described = origin.map_or_else(
            || "built-in defaults".to_owned(),
            |path| path.display().to_string(),
        );
        config.validate(std::path::Path::new(&format!(
            "{described} with command-line options"
        )))?;
        Ok((config, described))
    }
}

/// The engine's container addresses.
fn container_addresses(config: &Config) -> Vec<std::net::IpAddr> {
    vec![
        config.listen.containers_ipv4.into(),
        config.listen.containers_ipv6.into(),
    ]
}

/// The addresses the daemon adds to `lo`: the container addresses, under `redirect` delivery.
fn redirect_addresses(config: &Config) -> Vec<std::net::IpAddr> {
    if config.capture.foreign_netns == ForeignNetns::Redirect {
        container_addresses(config)
    } else {
        Vec::new()
    }
}

/// Removes what the daemon added to the host for containers, beside the pinned programs.
fn remove_container_host_side(config: &Config) -> anyhow::Result<()> {
    containers::remove_host_side(config.capture.routing_table, config.capture.rule_preference)
        .context("removing the container routing rules")?;
    // Whatever the mode now: an earlier daemon may have run with `redirect`.
    containers::remove_engine_addresses(&container_addresses(config))
        .context("removing the engine's container addresses from lo")
}

fn settings(config: &Config) -> DaemonSettings {
    let capture = CaptureSettings {
        bpffs_dir: config.capture.bpffs_dir.clone(),
        engine_v4: config.listen.ipv4,
        engine_v6: config.listen.ipv6,
        engine_port: config.listen.port,
        intercepted_ports: config.capture.intercept_ports.clone(),
        own_mark: config.capture.mark,
        refuse_foreign_netns: config.capture.foreign_netns != ForeignNetns::Allow,
        container_v4: config.listen.containers_ipv4,
        container_v6: config.listen.containers_ipv6,
        container_mark: config.capture.container_mark,
        ebpf_log_level: if tracing::enabled!(target: "appliance_ebpf", tracing::Level::DEBUG) {
            4
        } else {
            3
        },
    };
    let client_timeout = Duration::from_secs(config.proxy.client_timeout_seconds);
    let proxy = ProxySettings {
        own_mark: config.capture.mark,
        connect_timeout: Duration::from_secs(config.upstream.connect_timeout_seconds),
        handshake_timeout: client_timeout,
        header_read_timeout: client_timeout,
        max_header_bytes: config.proxy.max_header_bytes,
        unintercepted: match config.proxy.unintercepted {
            UninterceptedConfig::PassThrough => Unintercepted::PassThrough,
            UninterceptedConfig::Refuse => Unintercepted::Refuse,
        },
    };
    let containers = match config.capture.foreign_netns {
        ForeignNetns::Refuse | ForeignNetns::Allow => None,
        ForeignNetns::Tproxy => Some(Delivery::Tproxy),
        ForeignNetns::Redirect => Some(Delivery::Redirect),
    }
    .map(|delivery| ContainerSettings {
        delivery,
        selection: match config.capture.container_selection {
            ContainerSelectionConfig::Namespace => ContainerSelection::Namespace,
            ContainerSelectionConfig::Cgroup => ContainerSelection::Cgroups,
        },
        mark: config.capture.container_mark,
        routing_table: config.capture.routing_table,
        rule_preference: config.capture.rule_preference,
        ports: config.capture.intercept_ports.clone(),
        rescan: Duration::from_secs(config.capture.container_rescan_seconds),
    });
    let mut listen = vec![
        SocketAddr::new(config.listen.ipv4.into(), config.listen.port),
        SocketAddr::new(config.listen.ipv6.into(), config.listen.port),
    ];
    let local_addresses = redirect_addresses(config);
    listen.extend(
        local_addresses
            .iter()
            .map(|&address| SocketAddr::new(address, config.listen.port)),
    );
    DaemonSettings {
        capture,
        containers,
        listen,
        local_addresses,
        proxy,
        state_dir: config.state.dir.clone(),
        upstream_ca_files: config.upstream.ca_files.clone(),
        leaf_cache_capacity: 10_000,
        credentials_dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        api: ApiSettings {
            socket: config.api.socket.clone(),
            admin_group: Some(config.api.admin_group.clone()).filter(|group| !group.is_empty()),
            max_body_bytes: config.api.max_body_bytes,
            request_timeout: Duration::from_secs(10),
        },
        agents_cgroup: config.capture.agents_cgroup.clone(),
        cgroups: config.capture.cgroups.clone(),
        drain: Duration::from_secs(config.proxy.drain_seconds),
        metrics_listen: config.metrics.enabled.then_some(config.metrics.listen),
        audit: appliance::audit::AuditFileSettings {
            dir: config.state.dir.join("audit"),
            max_file_bytes: config.audit.max_file_bytes,
            keep_files: config.audit.keep_files,
        },
    }
}

fn run_daemon(args: DaemonArgs, socket: Option<PathBuf>) -> anyhow::Result<()> {
    let (config, origin) = args.config(socket.clone())?;
    let format = match config.log.format {
        LogFormatConfig::Text => LogFormat::Text,
        LogFormatConfig::Json => LogFormat::Json,
    };
    logging::init(format, &config.log.level);
    if args.check_config {
        println!("# effective configuration ({origin}): valid");
        println!("{config:#?}");
        return Ok(());
    }
    if args.detach_all {
        remove_container_host_side(&config)?;
        let cgroups = capture::detach_all(&config.capture.bpffs_dir)?;
        tracing::info!(cgroups, bpffs_dir = %config.capture.bpffs_dir.display(), "detached everything");
        return Ok(());
    }
    tracing::info!(config = %origin, "configuration loaded");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(daemon::run(settings(&config), || {
            let (config, _) = args.config(socket.clone())?;
            Ok(settings(&config))
        }))
}

fn rotate_master_key(
    config: Option<&std::path::Path>,
    state_dir: Option<PathBuf>,
    key_file: Option<PathBuf>,
) -> anyhow::Result<i32> {
    use appliance::store::{self, seal::KEY_FILE, Rotation};
    let state_dir = match state_dir {
        Some(dir) => dir,
        None => Config::load(config)?.0.state.dir,
    };
    let key_file = key_file.unwrap_or_else(|| {
        let in_state_dir = state_dir.join(KEY_FILE);
        if in_state_dir.exists() {
            in_state_dir
        } else {
            PathBuf::from("/").join(appliance::install::KEY_PATH)
        }
    });
    let store_path = state_dir.join("store");
    let rotation = store::rotate_master_key(&store_path, &key_file).with_context(|| {
        format!(
            "rotating the master key {} of the store {}",
            key_file.display(),
            store_path.display()
        )
    })?;
    match rotation {
        Rotation::Rotated { values } => println!(
            "rotated {}: {values} secret values sealed under the new key",
            key_file.display()
        ),
        Rotation::Finished => println!(
            "finished an interrupted rotation: {} holds the key the store uses",
            key_file.display()
        ),
    }
    Ok(0)
}

fn install(root: &std::path::Path) -> anyhow::Result<i32> {
    let binary = std::env::current_exe().context("finding this executable")?;
    let mut completion = Vec::new();
    clap_complete::generate(
        clap_complete::Shell::Bash,
        &mut Cli::command(),
        "appliance",
        &mut completion,
    );
    let mut man = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut man)
        .context("rendering the man page")?;
    let report = appliance::install::install(root, &binary, &completion, &man)?;
    for path in &report.written {
        println!("installed {}", path.display());
    }
    for path in &report.kept {
        println!("kept      {} (already there)", path.display());
    }
    println!("next: systemctl daemon-reload && systemctl enable --now appliance");
    Ok(0)
}

fn uninstall(root: &std::path::Path, purge: bool) -> anyhow::Result<i32> {
    if root == std::path::Path::new("/") && std::path::Path::new("/run/systemd/system").exists() {
        let stopped = std::process::Command::new("systemctl")
            .args(["disable", "--now", "appliance"])
            .status();
        if !stopped.is_ok_and(|status| status.success()) {
            eprintln!("appliance: warning: systemctl disable --now appliance failed; continuing");
        }
    }
    let config_path = root.join("etc/appliance/config.toml");
    let config = if config_path.exists() {
        Config::load(Some(&config_path))?.0
    } else {
        Config::default()
    };
    remove_container_host_side(&config)?;
    let cgroups = capture::detach_all(&config.capture.bpffs_dir)?;
    println!(
        "detached {cgroups} intercepted cgroups ({})",
        config.capture.bpffs_dir.display()
    );
    for path in appliance::install::uninstall(root, purge)? {
        println!("removed {}", path.display());
    }
    Ok(0)
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
        Command::Key(KeyCommand::Rotate {
            config,
            state_dir,
            key_file,
        }) => rotate_master_key(config.as_deref(), state_dir, key_file),
        Command::Install { root } => install(&root),
        Command::Uninstall { root, purge } => uninstall(&root, purge),
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
            let socket = cli.socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
            return commands::run(&socket, output, client_command.into_client());
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
            Self::Daemon(_)
            | Self::Exec(_)
            | Self::Key(_)
            | Self::Install { .. }
            | Self::Uninstall { .. }
            | Self::Completions { .. }
            | Self::Man => {
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
