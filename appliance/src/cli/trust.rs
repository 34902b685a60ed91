//! `appliance trust ...`: the trust files the daemon keeps beside its socket, for workloads
//! that `appliance exec` does not start (services, containers), and a check of each runtime.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Subcommand;

use super::doctor::{Doctor, Verdict};
use super::output::print_table;
use super::DEFAULT_AGENTS_CGROUP;

/// `appliance trust ...`
#[derive(Subcommand)]
pub enum TrustCommand {
    /// Print the variables that point each runtime at the appliance CA, as `KEY=VALUE`
    /// lines (for `EnvironmentFile=` or `docker run --env-file`; mount the trust directory
    /// at the same path in a container).
    Env,
    /// Add the appliance CA to this host's trust: the system store (Debian/Ubuntu or
    /// Fedora/RHEL), the JVM's cacerts, NSS databases, and an environment file
    /// (/etc/appliance/trust.env) with a systemd drop-in per --service. Adds only entries
    /// named appliance-ca; run again after `appliance ca rotate`.
    Install(InstallArgs),
    /// Remove what `trust install` added, and nothing else.
    Uninstall(InstallArgs),
    /// Shake hands through the appliance with each installed runtime (curl, Python urllib,
    /// requests and httpx, Node, git, Go, Java), as `appliance exec` runs commands, and say
    /// per runtime whether it trusts the appliance CA, with the fix when not. With a command
    /// after `--`, check that command instead (it should fetch https://HOST/; its exit status
    /// says). Needs root (it runs the probes in an intercepted cgroup and its own mount
    /// namespace).
    Doctor {
        /// A host the appliance intercepts [default: the first exact host of a secret].
        #[arg(long)]
        host: Option<String>,
        /// The daemon's agents cgroup.
        #[arg(long, env = "APPLIANCE_AGENTS_CGROUP", default_value = DEFAULT_AGENTS_CGROUP)]
        agents_cgroup: PathBuf,
        /// A command to check instead of the installed runtimes.
        #[arg(last = true)]
        command: Vec<OsString>,
    },
}

/// Where `trust install` and `uninstall` work.
#[derive(clap::Args)]
pub struct InstallArgs {
    /// Root of the file system to change (a staging directory, or / for this host).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// An NSS database (sql:) to change besides /etc/pki/nssdb, such as
    /// ~user/.pki/nssdb; repeatable.
    #[arg(long = "nss-db")]
    nss_dbs: Vec<PathBuf>,
    /// A systemd service to give the trust environment (a drop-in); repeatable.
    #[arg(long = "service")]
    services: Vec<String>,
}

fn print_steps(steps: &[appliance::trust::install::Step]) {
    let rows: Vec<Vec<String>> = steps
        .iter()
        .map(|step| vec![step.place.clone(), step.outcome.clone()])
        .collect();
    print_table(&["WHERE", "WHAT"], &rows);
}

/// The first exact host of any secret, asked of the daemon.
fn intercepted_host(socket: &Path) -> anyhow::Result<String> {
    #[derive(serde::Deserialize)]
    struct SecretList {
        secrets: Vec<appliance::model::SecretView>,
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let answer = runtime
        .block_on(appliance::client::Client::new(socket).call(
            http::Method::GET,
            "/v1/secrets",
            None,
        ))
        .context("asking the daemon for its secrets")?;
    let appliance::client::Answer::Json(json) = answer else {
        bail!("the daemon's answer to /v1/secrets is not JSON");
    };
    let list: SecretList = serde_json::from_value(json).context("reading the daemon's secrets")?;
    list.secrets
        .iter()
        .flat_map(|secret| secret.rules.iter().flat_map(|rule| rule.hosts.iter()))
        .find(|host| !host.starts_with("*."))
        .cloned()
        .context("no secret has an exact host to check with; give one with --host")
}

fn targets(args: InstallArgs, trust_dir: &Path) -> appliance::trust::install::Targets {
    appliance::trust::install::Targets {
        root: args.root,
        nss_dbs: args.nss_dbs,
        services: args.services,
        trust_dir: trust_dir.to_path_buf(),
    }
}

/// Runs `appliance trust ...` for the daemon at `socket`.
pub fn run(command: TrustCommand, socket: &Path) -> anyhow::Result<i32> {
    let dir = appliance::trust::dir_for_socket(socket);
    let require_files = || {
        if appliance::trust::is_ready(&dir) {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "no trust files in {}; is the daemon running (with this --socket)?",
                dir.display()
            ))
        }
    };
    match command {
        TrustCommand::Env => {
            require_files()?;
            print!("{}", appliance::trust::env_file(&dir));
            Ok(0)
        }
        TrustCommand::Install(args) | TrustCommand::Uninstall(args)
            if args.root == Path::new("/") && !nix::unistd::Uid::effective().is_root() =>
        {
            bail!("changing this host's trust needs root; run it with sudo, or give --root for a staging directory")
        }
        TrustCommand::Install(args) => {
            require_files()?;
            let targets = targets(args, &dir);
            let steps =
                appliance::trust::install::install(&targets, &dir.join(appliance::trust::CA_FILE))?;
            print_steps(&steps);
            Ok(0)
        }
        TrustCommand::Uninstall(args) => {
            let steps = appliance::trust::install::uninstall(&targets(args, &dir))?;
            print_steps(&steps);
            Ok(0)
        }
        TrustCommand::Doctor {
            host,
            agents_cgroup,
            command,
        } => {
            require_files()?;
            let host = match host {
                Some(host) => host,
                None => intercepted_host(socket)?,
            };
            let name = format!("trust-doctor-{}", std::process::id());
            let options = appliance::exec::ExecOptions {
                agents_cgroup: &agents_cgroup,
                name: Some(&name),
                allow_unprotected: false,
                trust_dir: Some(&dir),
            };
            let run = |argv: &[OsString]| {
                appliance::exec::output(&options, argv).map_err(anyhow::Error::from)
            };
            let work =
                std::env::temp_dir().join(format!("appliance-trust-doctor-{}", std::process::id()));
            let doctor = Doctor {
                run: &run,
                host: &host,
                dir: work.clone(),
            };
            let verdicts = doctor.check(&command);
            let _ = std::fs::remove_dir_all(&work);
            let verdicts = verdicts?;
            for setting in appliance::exec::trust_environment(&dir) {
                let Some(theirs) = &setting.theirs else {
                    continue;
                };
                let (key, theirs) = (setting.key, theirs.to_string_lossy());
                if setting.value == *theirs {
                    println!("{key}={theirs} is kept: it holds the appliance CA already");
                } else if key == "JAVA_TOOL_OPTIONS" {
                    println!("{key} is kept, with the appliance's trust store added");
                } else {
                    println!(
                        "{key}={theirs} is kept: commands get its roots plus the appliance CA ({})",
                        setting.value.to_string_lossy()
                    );
                }
            }
            println!(
                "handshakes with {host} through the appliance, as appliance exec runs commands:"
            );
            let rows: Vec<Vec<String>> = verdicts
                .iter()
                .map(|(runtime, verdict, fix)| {
                    let (result, detail) = match verdict {
                        Verdict::Trusted => ("trusted", String::new()),
                        Verdict::NotTrusted(why) => ("NOT TRUSTED", format!("{why}; fix: {fix}")),
                        Verdict::NotInstalled => ("not installed", String::new()),
                        Verdict::Failed(why) => ("check failed", why.clone()),
                    };
                    vec![runtime.clone(), result.to_owned(), detail]
                })
                .collect();
            print_table(&["RUNTIME", "RESULT", "DETAIL"], &rows);
            let all_trusted = verdicts
                .iter()
                .all(|(_, verdict, _)| matches!(verdict, Verdict::Trusted | Verdict::NotInstalled));
            Ok(if all_trusted { 0 } else { 1 })
        }
    }
}
