//! `appliance daemon`: its options, which override the configuration file.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use appliance::capture;
use appliance::config::{Config, ForeignNetns, Overrides};
use appliance::daemon::{self, DaemonSettings};
use appliance::logging::{self, LogFormat};

/// `appliance daemon`: every option overrides the configuration file.
#[derive(Args)]
pub struct DaemonArgs {
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
    /// The options as configuration overrides; `socket` is the global `--socket`.
    fn overrides(&self, socket: Option<PathBuf>) -> Overrides {
        Overrides {
            listen_v4: self.listen_v4,
            listen_v6: self.listen_v6,
            port: self.port,
            intercept_ports: self.intercept_ports.clone(),
            agents_cgroup: self.agents_cgroup.clone(),
            cgroups: self.cgroups.clone(),
            foreign_netns: self.foreign_netns,
            bpffs_dir: self.bpffs_dir.clone(),
            mark: self.mark,
            state_dir: self.state_dir.clone(),
            upstream_ca_files: self.upstream_ca_files.clone(),
            admin_group: self.admin_group.clone(),
            socket,
            log_format: self.log_format,
        }
    }
}

/// Runs `appliance daemon`.
pub fn run(args: DaemonArgs, socket: Option<PathBuf>) -> anyhow::Result<()> {
    let overrides = args.overrides(socket);
    let (config, origin) = Config::load_with(args.config.as_deref(), &overrides)?;
    logging::init(config.log.format, &config.log.level);
    if args.check_config {
        println!("# effective configuration ({origin}): valid");
        println!("{config:#?}");
        return Ok(());
    }
    if args.detach_all {
        daemon::remove_container_host_side(&config)?;
        let cgroups = capture::detach_all(&config.capture.bpffs_dir)?;
        tracing::info!(cgroups, bpffs_dir = %config.capture.bpffs_dir.display(), "detached everything");
        return Ok(());
    }
    tracing::info!(config = %origin, "configuration loaded");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(daemon::run(
            DaemonSettings::from_config(&config),
            || {
                let (config, _) = Config::load_with(args.config.as_deref(), &overrides)?;
                Ok(DaemonSettings::from_config(&config))
            },
            release_start_up_memory,
        ))
}

/// Loading the eBPF programs parses the kernel's BTF (megabytes) and frees it; mimalloc keeps
/// freed pages for reuse, and an idle daemon never frees enough to trigger their return:
/// 41 MiB of RSS instead of 16 (docs/benchmarks.md). Returned once, when the daemon is ready.
fn release_start_up_memory() {
    // SAFETY: mi_collect has no preconditions; it only walks mimalloc's own heaps.
    unsafe { libmimalloc_sys::mi_collect(true) }
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
