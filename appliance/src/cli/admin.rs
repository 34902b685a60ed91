//! Commands that administer this host directly: the master key, install and uninstall, the
//! man page.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;

use appliance::capture;
use appliance::config::Config;
use appliance::daemon;

/// `appliance key`: works on the store directly, so the daemon must be stopped.
#[derive(Subcommand)]
pub enum KeyCommand {
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

/// `appliance key ...`.
pub fn key(command: KeyCommand) -> anyhow::Result<i32> {
    match command {
        KeyCommand::Rotate {
            config,
            state_dir,
            key_file,
        } => rotate_master_key(config.as_deref(), state_dir, key_file),
    }
}

fn rotate_master_key(
    config: Option<&Path>,
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

/// `appliance install`; `cli` renders the completion script and the man page.
pub fn install(root: &Path, cli: &mut clap::Command) -> anyhow::Result<i32> {
    let binary = std::env::current_exe().context("finding this executable")?;
    let mut completion = Vec::new();
    clap_complete::generate(
        clap_complete::Shell::Bash,
        cli,
        "appliance",
        &mut completion,
    );
    let mut man = Vec::new();
    clap_mangen::Man::new(cli.clone())
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

/// `appliance uninstall`.
pub fn uninstall(root: &Path, purge: bool) -> anyhow::Result<i32> {
    if root == Path::new("/") && Path::new("/run/systemd/system").exists() {
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
    daemon::remove_container_host_side(&config)?;
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

/// `appliance man`.
pub fn man(cli: &mut clap::Command) -> anyhow::Result<i32> {
    clap_mangen::Man::new(cli.clone())
        .render(&mut std::io::stdout())
        .map(|()| 0)
        .context("writing the man page")
}
