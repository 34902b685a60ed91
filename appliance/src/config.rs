//! The daemon's configuration file (TOML). Every setting has a default, so no file is needed;
//! every value is checked at start, and a wrong one names its key and the fix.
//! `systemd/config.toml` documents each setting and is checked against these defaults.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::logging::LogFormat;

/// Where the daemon looks when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/appliance/config.toml";

/// A configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type).
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's description, which names the key and line.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{}: {key}: {message}", path.display())]
    Invalid {
        /// The file (or `command line`).
        path: PathBuf,
        /// The dotted key, such as `capture.intercept_ports`.
        key: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// Where the engine listens.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// IPv4 listener address.
    pub ipv4: Ipv4Addr,
    /// IPv6 listener address.
    pub ipv6: Ipv6Addr,
    /// Listener port (both families).
    pub port: u16,
    /// IPv4 address containers reach the engine at with `foreign_netns = "redirect"`; the
    /// daemon adds it to `lo`. Any address the containers route to the host works.
    pub containers_ipv4: Ipv4Addr,
    /// Same, IPv6.
    pub containers_ipv6: Ipv6Addr,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            ipv4: Ipv4Addr::LOCALHOST,
            ipv6: Ipv6Addr::LOCALHOST,
            port: 15443,
            containers_ipv4: Ipv4Addr::new(169, 254, 77, 77),
            // fd61:7070:6c69::/48 spells "appli" and is a ULA nobody routes.
            containers_ipv6: Ipv6Addr::new(0xfd61, 0x7070, 0x6c69, 0, 0, 0, 0, 1),
        }
    }
}

/// Connections from other network namespaces.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ForeignNetns {
    /// Refuse them: they cannot reach the engine, and nothing may bypass it.
    Refuse,
    /// Let them go out unredirected.
    Allow,
    /// Serve containers: the host's policy routing delivers their connections, unrewritten,
    /// to the engine (sk_lookup). Namespaces not set up yet are refused.
    Tproxy,
    /// Serve containers by rewriting their connects to the engine's container address, for
    /// hosts whose stack never sees container packets (eBPF-dataplane CNIs, macvlan).
    /// Namespaces not set up yet are refused.
    Redirect,
}

/// What of a selected container's network namespace is captured.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ContainerSelectionConfig {
    /// Every process in the namespace of a selected process (whole-container capture).
    Namespace,
    /// Only processes in selected cgroups; the rest of the namespace (a pod's sidecars) goes
    /// out directly.
    Cgroup,
}

/// What is intercepted.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureConfig {
    /// Destination ports whose TCP is redirected and whose UDP is refused.
    pub intercept_ports: Vec<u16>,
    /// Parent cgroup of `appliance exec` cgroups (created, always intercepted).
    pub agents_cgroup: PathBuf,
    /// Further cgroups always intercepted.
    pub cgroups: Vec<PathBuf>,
    /// bpffs directory for pinned links and maps.
    pub bpffs_dir: PathBuf,
    /// SO_MARK of the appliance's own upstream sockets.
    pub mark: u32,
    /// Intercepted connections from other network namespaces.
    pub foreign_netns: ForeignNetns,
    /// Routing table of the `local` routes that `tproxy` delivery uses.
    pub routing_table: u32,
    /// Preference of the policy rules that `tproxy` delivery adds (before `main`, 32766).
    pub rule_preference: u32,
    /// Seconds between looks at the selected cgroups' container namespaces besides those
    /// that link and cgroup events trigger.
    pub container_rescan_seconds: u64,
    /// Whole container namespaces, or only their selected cgroups.
    pub container_selection: ContainerSelectionConfig,
    /// Packet mark bits that carry a selected cgroup's connections to the policy rules under
    /// `container_selection = "cgroup"`.
    pub container_mark: u32,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            intercept_ports: vec![443],
            agents_cgroup: "appliance-agents".into(),
            cgroups: Vec::new(),
            bpffs_dir: "/sys/fs/bpf/appliance".into(),
            mark: 0x6170_6c69,
            foreign_netns: ForeignNetns::Refuse,
            routing_table: 1500,
            rule_preference: 1500,
            container_rescan_seconds: 5,
            container_selection: ContainerSelectionConfig::Namespace,
            container_mark: 0x0800_0000,
        }
    }
}

/// Persistent state.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// Holds the CA, the store and (without systemd credentials) the master key.
    pub dir: PathBuf,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: "/var/lib/appliance".into(),
        }
    }
}

/// The admin API.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Unix socket path.
    pub socket: PathBuf,
    /// Group allowed to use the socket besides root; empty: root only.
    pub admin_group: String,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            socket: "/run/appliance/admin.sock".into(),
            admin_group: String::new(),
            max_body_bytes: 256 * 1024,
        }
    }
}

/// Connections to upstreams.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// PEM files of CAs trusted besides the system store.
    pub ca_files: Vec<PathBuf>,
    /// Limit on TCP connect plus TLS handshake, seconds.
    pub connect_timeout_seconds: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            ca_files: Vec::new(),
            connect_timeout_seconds: 10,
        }
    }
}

/// Connections without a secret.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UninterceptedConfig {
    /// Carry them to their destination untouched.
    PassThrough,
    /// Close them.
    Refuse,
}

/// The proxy.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Hosts without a secret, no SNI, or not TLS.
    pub unintercepted: UninterceptedConfig,
    /// Limit on a client's TLS handshake and on each request's headers, seconds.
    pub client_timeout_seconds: u64,
    /// Largest request header block, bytes.
    pub max_header_bytes: usize,
    /// Intercepted connections held at once, in all (each holds two descriptors).
    pub max_connections: usize,
    /// Intercepted connections held at once from one cgroup, so that one workload cannot
    /// use up what the others need.
    pub max_connections_per_cgroup: usize,
    /// Time open connections get to finish at shutdown, seconds.
    pub drain_seconds: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            unintercepted: UninterceptedConfig::PassThrough,
            client_timeout_seconds: 15,
            max_header_bytes: 64 * 1024,
            max_connections: 100_000,
            max_connections_per_cgroup: 20_000,
            drain_seconds: 10,
        }
    }
}

/// Logging.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Line format.
    pub format: LogFormat,
    /// `tracing` filter, such as `info` or `info,appliance_ebpf=debug`; RUST_LOG overrides.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// The durable audit log under `state.dir/audit`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Size at which `events.jsonl` is rotated, bytes.
    pub max_file_bytes: u64,
    /// Rotated files kept besides the current one.
    pub keep_files: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            max_file_bytes: 64 * 1024 * 1024,
            keep_files: 10,
        }
    }
}

/// Prometheus metrics on a TCP address (the admin socket serves them at `/v1/metrics`
/// whatever this says).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `GET /metrics` on `listen`.
    pub enabled: bool,
    /// Address for scrapers; loopback unless the operator chooses otherwise.
    pub listen: std::net::SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, 9464)),
        }
    }
}

/// Secret values fetched from a source (1Password, a file, a command, a credential).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ValuesConfig {
    /// How long a fetched value is used before it is fetched again, seconds.
    pub ttl_seconds: u64,
    /// How long past its TTL the last good value stays in use while its source fails.
    pub max_stale_seconds: u64,
    /// Limit on one command run or one 1Password Connect exchange, seconds.
    pub timeout_seconds: u64,
    /// Whether secrets may take their value from a command run as the daemon's user.
    pub allow_commands: bool,
    /// The directories `valueFile` sources may read from (the daemon reads them as root,
    /// and whoever may create secrets chooses the path).
    pub file_dirs: Vec<PathBuf>,
}

impl Default for ValuesConfig {
    fn default() -> Self {
        Self {
            ttl_seconds: 300,
            max_stale_seconds: 3600,
            timeout_seconds: 10,
            allow_commands: false,
            file_dirs: vec![
                PathBuf::from("/etc/appliance/values"),
                PathBuf::from("/run/keys"),
            ],
        }
    }
}

/// 1Password Connect, for `opRef` values. `OP_CONNECT_HOST` and `OP_CONNECT_TOKEN` in the
/// daemon's environment take precedence, as with 1Password's SDKs.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct OnePasswordConfig {
    /// The Connect server's URL, such as `http://localhost:8080`; empty: not configured.
    pub connect_host: String,
    /// The systemd credential holding the Connect token.
    pub token_credential: String,
    /// A file holding the token, for hosts without systemd credentials; empty: none.
    pub token_file: PathBuf,
}

impl Default for OnePasswordConfig {
    fn default() -> Self {
        Self {
            connect_host: String::new(),
            token_credential: "op-connect-token".into(),
            token_file: PathBuf::new(),
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[listen]`
    pub listen: Listen,
    /// `[capture]`
    pub capture: CaptureConfig,
    /// `[state]`
    pub state: StateConfig,
    /// `[api]`
    pub api: ApiConfig,
    /// `[upstream]`
    pub upstream: UpstreamConfig,
    /// `[proxy]`
    pub proxy: ProxyConfig,
    /// `[log]`
    pub log: LogConfig,
    /// `[metrics]`
    pub metrics: MetricsConfig,
    /// `[audit]`
    pub audit: AuditConfig,
    /// `[values]`
    pub values: ValuesConfig,
    /// `[onepassword]`
    pub onepassword: OnePasswordConfig,
}

/// Settings given on the daemon's command line. Each replaces the file's value, except the
/// lists marked as extending it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `listen.ipv4`.
    pub listen_v4: Option<Ipv4Addr>,
    /// `listen.ipv6`.
    pub listen_v6: Option<Ipv6Addr>,
    /// `listen.port`.
    pub port: Option<u16>,
    /// `capture.intercept_ports`, replaced when not empty.
    pub intercept_ports: Vec<u16>,
    /// `capture.agents_cgroup`.
    pub agents_cgroup: Option<PathBuf>,
    /// Added to `capture.cgroups`.
    pub cgroups: Vec<PathBuf>,
    /// `capture.foreign_netns`.
    pub foreign_netns: Option<ForeignNetns>,
    /// `capture.bpffs_dir`.
    pub bpffs_dir: Option<PathBuf>,
    /// `capture.mark`.
    pub mark: Option<u32>,
    /// `state.dir`.
    pub state_dir: Option<PathBuf>,
    /// Added to `upstream.ca_files`.
    pub upstream_ca_files: Vec<PathBuf>,
    /// `api.admin_group`.
    pub admin_group: Option<String>,
    /// `api.socket`.
    pub socket: Option<PathBuf>,
    /// `log.format`.
    pub log_format: Option<LogFormat>,
}

impl Config {
    /// Reads `path` (see [`Config::load`]), applies `overrides` and validates the result.
    /// Returns the configuration and a description of where it came from.
    pub fn load_with(
        path: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<(Self, String), ConfigError> {
        let (mut config, origin) = Self::load(path)?;
        config.apply(overrides);
        let described = origin.map_or_else(
            || "built-in defaults".to_owned(),
            |path| path.display().to_string(),
        );
        config.validate(Path::new(&format!("{described} with command-line options")))?;
        Ok((config, described))
    }

    /// Applies command-line `overrides`.
    pub fn apply(&mut self, overrides: &Overrides) {
        fn replace<T: Clone>(setting: &mut T, given: &Option<T>) {
            if let Some(value) = given {
                setting.clone_from(value);
            }
        }
        replace(&mut self.listen.ipv4, &overrides.listen_v4);
        replace(&mut self.listen.ipv6, &overrides.listen_v6);
        replace(&mut self.listen.port, &overrides.port);
        if !overrides.intercept_ports.is_empty() {
            self.capture
                .intercept_ports
                .clone_from(&overrides.intercept_ports);
        }
        replace(&mut self.capture.agents_cgroup, &overrides.agents_cgroup);
        self.capture
            .cgroups
            .extend(overrides.cgroups.iter().cloned());
        replace(&mut self.capture.foreign_netns, &overrides.foreign_netns);
        replace(&mut self.capture.bpffs_dir, &overrides.bpffs_dir);
        replace(&mut self.capture.mark, &overrides.mark);
        replace(&mut self.state.dir, &overrides.state_dir);
        self.upstream
            .ca_files
            .extend(overrides.upstream_ca_files.iter().cloned());
        replace(&mut self.api.admin_group, &overrides.admin_group);
        replace(&mut self.api.socket, &overrides.socket);
        replace(&mut self.log.format, &overrides.log_format);
    }

    /// The engine's addresses for containers.
    pub fn container_addresses(&self) -> Vec<std::net::IpAddr> {
        vec![
            self.listen.containers_ipv4.into(),
            self.listen.containers_ipv6.into(),
        ]
    }

    /// The addresses the daemon adds to `lo` and listens on: the container addresses,
    /// whenever containers are served. `redirect` delivers every connection there; under
    /// `tproxy` a namespace's connections go there until its rules are in place.
    pub fn container_listen_addresses(&self) -> Vec<std::net::IpAddr> {
        match self.capture.foreign_netns {
            ForeignNetns::Tproxy | ForeignNetns::Redirect => self.container_addresses(),
            ForeignNetns::Refuse | ForeignNetns::Allow => Vec::new(),
        }
    }

    /// Reads `path`; without one, [`DEFAULT_CONFIG`] if it exists, else the defaults.
    pub fn load(path: Option<&Path>) -> Result<(Self, Option<PathBuf>), ConfigError> {
        let path = match path {
            Some(path) => path.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
            None => return Ok((Self::default(), None)),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let config = Self::parse(&text, &path)?;
        Ok((config, Some(path)))
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: origin.into(),
            message: error.to_string(),
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Checks values serde cannot.
    pub fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let invalid = |key, message: String| ConfigError::Invalid {
            path: origin.into(),
            key,
            message,
        };
        let ports = &self.capture.intercept_ports;
        if ports.is_empty() {
            return Err(invalid(
                "capture.intercept_ports",
                "is empty; list at least one port, such as [443]".into(),
            ));
        }
        if ports.contains(&0) {
            return Err(invalid(
                "capture.intercept_ports",
                "contains 0; give ports 1-65535".into(),
            ));
        }
        if ports.len() > appliance_common::MAX_INTERCEPTED_PORTS as usize {
            return Err(invalid(
                "capture.intercept_ports",
                format!(
                    "lists {} ports; at most {} can be intercepted",
                    ports.len(),
                    appliance_common::MAX_INTERCEPTED_PORTS
                ),
            ));
        }
        if ports.contains(&self.listen.port) {
            return Err(invalid(
                "listen.port",
                format!("{} is also in capture.intercept_ports; the engine's own port must not be intercepted", self.listen.port),
            ));
        }
        if self.listen.port == 0 {
            return Err(invalid(
                "listen.port",
                "is 0; capture must know the port, give 1-65535".into(),
            ));
        }
        if !(1..32766).contains(&self.capture.rule_preference) {
            return Err(invalid(
                "capture.rule_preference",
                format!(
                    "is {}; give 1-32765 so the rules run before the main table (32766)",
                    self.capture.rule_preference
                ),
            ));
        }
        if !(1..=3600).contains(&self.capture.container_rescan_seconds) {
            return Err(invalid(
                "capture.container_rescan_seconds",
                format!(
                    "is {}; give 1-3600 (events trigger most looks; this is the fallback)",
                    self.capture.container_rescan_seconds
                ),
            ));
        }
        let container_mark = self.capture.container_mark;
        if container_mark == 0 || container_mark & self.capture.mark != 0 {
            return Err(invalid(
                "capture.container_mark",
                format!(
                    "is {container_mark:#x}; give non-zero bits that capture.mark ({:#x}) and other software on the host (CNIs, kube-proxy) do not use",
                    self.capture.mark
                ),
            ));
        }
        if matches!(self.capture.routing_table, 0 | 253..=255) {
            return Err(invalid(
                "capture.routing_table",
                format!(
                    "is {}, a table the kernel reserves; choose an unused table such as 1500",
                    self.capture.routing_table
                ),
            ));
        }
        if !(1..=86_400).contains(&self.values.ttl_seconds) {
            return Err(invalid(
                "values.ttl_seconds",
                format!(
                    "is {}; give 1-86400 (values are refreshed at three quarters of it)",
                    self.values.ttl_seconds
                ),
            ));
        }
        if let Some(dir) = self
            .values
            .file_dirs
            .iter()
            .find(|dir| !dir.is_absolute() || dir == &Path::new("/"))
        {
            return Err(invalid(
                "values.file_dirs",
                format!(
                    "holds {}; give absolute directories that hold value files only, such as /etc/appliance/values",
                    dir.display()
                ),
            ));
        }
        if !(1..=300).contains(&self.values.timeout_seconds) {
            return Err(invalid(
                "values.timeout_seconds",
                format!("is {}; give 1-300", self.values.timeout_seconds),
            ));
        }
        if self.audit.max_file_bytes < 4096 {
            return Err(invalid(
                "audit.max_file_bytes",
                format!(
                    "is {}; give at least 4096 so a file holds more than a few events",
                    self.audit.max_file_bytes
                ),
            ));
        }
        if self.capture.mark == 0 {
            return Err(invalid(
                "capture.mark",
                "is 0, which means no mark; choose a non-zero mark no other software uses".into(),
            ));
        }
        for (key, seconds) in [
            (
                "upstream.connect_timeout_seconds",
                self.upstream.connect_timeout_seconds,
            ),
            (
                "proxy.client_timeout_seconds",
                self.proxy.client_timeout_seconds,
            ),
        ] {
            if seconds == 0 {
                return Err(invalid(
                    key,
                    "is 0; give a number of seconds, such as 10".into(),
                ));
            }
        }
        if self.proxy.max_connections_per_cgroup == 0
            || self.proxy.max_connections_per_cgroup > self.proxy.max_connections
        {
            return Err(invalid(
                "proxy.max_connections_per_cgroup",
                format!(
                    "is {}; give 1 to proxy.max_connections ({})",
                    self.proxy.max_connections_per_cgroup, self.proxy.max_connections
                ),
            ));
        }
        if self.proxy.max_header_bytes < 1024 {
            return Err(invalid(
                "proxy.max_header_bytes",
                "is below 1024; real requests need more, such as 65536".into(),
            ));
        }
        if self.api.max_body_bytes < 1024 {
            return Err(invalid(
                "api.max_body_bytes",
                "is below 1024; secrets need more, such as 262144".into(),
            ));
        }
        if !self.api.socket.is_absolute() {
            return Err(invalid(
                "api.socket",
                "must be an absolute path, such as /run/appliance/admin.sock".into(),
            ));
        }
        if !self.state.dir.is_absolute() {
            return Err(invalid(
                "state.dir",
                "must be an absolute path, such as /var/lib/appliance".into(),
            ));
        }
        if !self.capture.bpffs_dir.is_absolute() {
            return Err(invalid(
                "capture.bpffs_dir",
                "must be an absolute path under a bpffs, such as /sys/fs/bpf/appliance".into(),
            ));
        }
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid(
                "log.level",
                format!("is not a tracing filter ({error}); use e.g. \"info\""),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        Config::parse(text, Path::new("test.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn command_line_options_replace_settings_and_extend_lists() {
        let mut config =
            Config::parse("[upstream]\nca_files = [\"/etc/a.pem\"]\n", Path::new("t")).unwrap();
        config.apply(&Overrides {
            port: Some(16443),
            upstream_ca_files: vec!["/etc/b.pem".into()],
            log_format: Some(LogFormat::Json),
            ..Overrides::default()
        });
        assert_eq!(config.listen.port, 16443);
        assert_eq!(
            config.upstream.ca_files,
            [PathBuf::from("/etc/a.pem"), PathBuf::from("/etc/b.pem")]
        );
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.capture.intercept_ports, [443]);
        let clash = Overrides {
            port: Some(443),
            ..Overrides::default()
        };
        let error = Config::load_with(None, &clash).unwrap_err().to_string();
        assert!(
            error.contains("with command-line options: listen.port"),
            "{error}"
        );
    }

    #[test]
    fn the_shipped_file_documents_exactly_the_defaults() {
        let shipped = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../systemd/config.toml"
        ));
        let uncommented: String = shipped
            .lines()
            .map(|line| {
                line.strip_prefix("# ")
                    .filter(|rest| rest.contains(" = "))
                    .unwrap_or(line)
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            Config::parse(shipped, Path::new("config.toml")).unwrap(),
            Config::default()
        );
        assert_eq!(
            Config::parse(&uncommented, Path::new("config.toml")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn every_bad_value_names_its_key_and_the_fix() {
        for (text, expected) in [
            (
                "[capture]\nintercept_ports = []",
                "capture.intercept_ports: is empty",
            ),
            (
                "[capture]\nintercept_ports = [0]",
                "capture.intercept_ports: contains 0",
            ),
            (
                "[listen]\nport = 443",
                "listen.port: 443 is also in capture.intercept_ports",
            ),
            ("[listen]\nport = 0", "listen.port: is 0"),
            ("[capture]\nmark = 0", "capture.mark: is 0"),
            (
                "[upstream]\nconnect_timeout_seconds = 0",
                "upstream.connect_timeout_seconds: is 0",
            ),
            (
                "[proxy]\nclient_timeout_seconds = 0",
                "proxy.client_timeout_seconds: is 0",
            ),
            (
                "[proxy]\nmax_header_bytes = 10",
                "proxy.max_header_bytes: is below 1024",
            ),
            (
                "[api]\nmax_body_bytes = 10",
                "api.max_body_bytes: is below 1024",
            ),
            (
                "[api]\nsocket = \"admin.sock\"",
                "api.socket: must be an absolute path",
            ),
            (
                "[state]\ndir = \"state\"",
                "state.dir: must be an absolute path",
            ),
            (
                "[capture]\nbpffs_dir = \"pins\"",
                "capture.bpffs_dir: must be an absolute path",
            ),
            (
                "[log]\nlevel = \"info,[\"",
                "log.level: is not a tracing filter",
            ),
            (
                "[proxy]\nunintercepted = \"drop\"",
                "unknown variant `drop`, expected `pass-through` or `refuse`",
            ),
            ("[listen]\nport = \"x\"", "invalid type"),
            ("[listen]\nprot = 1", "unknown field `prot`"),
            (
                "[capture]\nforeign_netns = \"maybe\"",
                "expected one of `refuse`, `allow`, `tproxy`, `redirect`",
            ),
            (
                "[capture]\nrule_preference = 40000",
                "capture.rule_preference: is 40000; give 1-32765",
            ),
            (
                "[capture]\ncontainer_rescan_seconds = 0",
                "capture.container_rescan_seconds: is 0; give 1-3600",
            ),
            (
                "[capture]\ncontainer_mark = 0",
                "capture.container_mark: is 0x0; give non-zero bits",
            ),
            (
                "[capture]\nmark = 3\ncontainer_mark = 2",
                "capture.container_mark: is 0x2; give non-zero bits that capture.mark (0x3)",
            ),
            (
                "[capture]\ncontainer_selection = \"pod\"",
                "unknown variant `pod`, expected `namespace` or `cgroup`",
            ),
            (
                "[audit]\nmax_file_bytes = 10",
                "audit.max_file_bytes: is 10; give at least 4096",
            ),
            (
                "[capture]\nrouting_table = 254",
                "capture.routing_table: is 254, a table the kernel reserves",
            ),
            ("[listen]\nipv4 = \"localhost\"", "invalid IPv4 address"),
        ] {
            let error = error_of(text);
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(error.starts_with("test.toml"), "{error}");
        }
    }
}
