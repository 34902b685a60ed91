//! `appliance trust ...`: the trust files the daemon keeps beside its socket, for workloads
//! that are not started by `appliance exec` (services, containers).

use std::path::Path;

use anyhow::bail;
use clap::Subcommand;

/// `appliance trust ...`
#[derive(Subcommand)]
pub enum TrustCommand {
    /// Print the variables that point each runtime at the appliance CA, as `KEY=VALUE`
    /// lines (for `EnvironmentFile=` or `docker run --env-file`; mount the trust directory
    /// at the same path in a container).
    Env,
}

/// Runs `appliance trust ...` for the daemon at `socket`.
pub fn run(command: TrustCommand, socket: &Path) -> anyhow::Result<i32> {
    let dir = appliance::trust::dir_for_socket(socket);
    match command {
        TrustCommand::Env => {
            if !appliance::trust::is_ready(&dir) {
                bail!(
                    "no trust files in {}; is the daemon running (with this --socket)?",
                    dir.display()
                );
            }
            print!("{}", appliance::trust::env_file(&dir));
            Ok(0)
        }
    }
}
