//! `appliance trust install | uninstall`: the appliance CA in the places hosts keep trust,
//! for agents that `appliance exec` does not start (systemd services, containers built from
//! the host's store). Each step adds only entries named for the appliance (`appliance-ca`)
//! and removes only those, so roots it did not add are never touched; running either twice
//! changes nothing more.
//!
//! - the system store: Debian/Ubuntu (`/usr/local/share/ca-certificates`,
//!   `update-ca-certificates`) or Fedora/RHEL (`/etc/pki/ca-trust/source/anchors`,
//!   `update-ca-trust`);
//! - the JVM's `cacerts`, through its `keytool`;
//! - NSS databases (Firefox, Chromium, curl built with NSS), through `certutil`;
//! - an environment file with the trust variables, and a systemd drop-in per named service
//!   that reads it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The name of every entry this module adds.
pub const ENTRY_NAME: &str = "appliance-ca";
const TRUST_STORE_PASSWORD: &str = "changeit";

/// What to install into, under a root directory (`/` for this host).
#[derive(Clone, Debug)]
pub struct Targets {
    /// Root of the file system layout.
    pub root: PathBuf,
    /// NSS databases to add the CA to, besides `<root>/etc/pki/nssdb` when it exists.
    pub nss_dbs: Vec<PathBuf>,
    /// systemd services to give the trust environment, by unit name.
    pub services: Vec<String>,
    /// The daemon's trust directory, whose variables the environment file holds.
    pub trust_dir: PathBuf,
}

/// A step failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file operation failed.
    #[error("{action} {} failed", path.display())]
    Io {
        /// What was done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The command line.
        tool: String,
        /// How it ended.
        status: String,
        /// What it said.
        stderr: String,
    },
}

/// What one step did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Where: `system store (Debian)`, `JVM cacerts /etc/ssl/certs/java/cacerts`, ….
    pub place: String,
    /// What happened there.
    pub outcome: String,
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io {
        action,
        path,
        source,
    }
}

fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

fn run_tool(command: &mut Command) -> Result<String, InstallError> {
    let tool = format!("{command:?}");
    let output = command.output().map_err(|source| InstallError::Tool {
        tool: tool.clone(),
        status: "not started".into(),
        stderr: source.to_string(),
    })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(InstallError::Tool {
            tool,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn on_path(program: &str) -> bool {
    super::which(program).is_some()
}

/// Debian's update-ca-certificates, pointed at `root`'s layout.
fn update_ca_certificates(root: &Path) -> Command {
    let mut command = Command::new("update-ca-certificates");
    for (option, path) in [
        ("--certsconf", "/etc/ca-certificates.conf"),
        ("--certsdir", "/usr/share/ca-certificates"),
        ("--localcertsdir", "/usr/local/share/ca-certificates"),
        ("--etccertsdir", "/etc/ssl/certs"),
        ("--hooksdir", "/etc/ca-certificates/update.d"),
    ] {
        command.arg(option).arg(under(root, path));
    }
    command
}

/// Adds (`ca_pem` given) or removes the CA in the system store of `root`.
fn system_store(root: &Path, ca_pem: Option<&str>) -> Result<Option<Step>, InstallError> {
    let debian = under(root, "/usr/local/share/ca-certificates");
    let fedora = under(root, "/etc/pki/ca-trust/source/anchors");
    let (layout, dir, file, mut update) = if debian.is_dir() && on_path("update-ca-certificates") {
        let command = update_ca_certificates(root);
        ("Debian", debian, format!("{ENTRY_NAME}.crt"), command)
    } else if fedora.is_dir() && on_path("update-ca-trust") && root == Path::new("/") {
        let mut command = Command::new("update-ca-trust");
        command.arg("extract");
        ("Fedora", fedora, format!("{ENTRY_NAME}.pem"), command)
    } else {
        return Ok(None);
    };
    let path = dir.join(file);
    let changed = match ca_pem {
        Some(pem) => {
            let same = fs::read_to_string(&path).is_ok_and(|current| current == pem);
            if !same {
                fs::write(&path, pem).map_err(io_error("writing", &path))?;
            }
            !same
        }
        None => match fs::remove_file(&path) {
            Ok(()) => true,
            Err(error) if error.kind() == io::ErrorKind::NotFound => false,
            Err(error) => return Err(io_error("removing", &path)(error)),
        },
    };
    if changed {
        run_tool(&mut update)?;
    }
    Ok(Some(Step {
        place: format!("system store ({layout}) {}", path.display()),
        outcome: match (ca_pem.is_some(), changed) {
            (true, true) => "added",
            (true, false) => "already there",
            (false, true) => "removed",
            (false, false) => "not there",
        }
        .into(),
    }))
}

/// The JVM's `keytool` and `cacerts` under `root`, when a JVM is installed.
fn jvm(root: &Path) -> Option<(PathBuf, PathBuf)> {
    let home = super::java_home()?;
    let keytool = home.join("bin/keytool");
    let cacerts = fs::canonicalize(home.join("lib/security/cacerts")).ok()?;
    let cacerts = under(root, &cacerts.display().to_string());
    (keytool.exists() && cacerts.exists()).then_some((keytool, cacerts))
}

/// What a step did, from whether it was adding and whether the entry was there before.
fn outcome(adding: bool, was_there: bool) -> String {
    match (adding, was_there) {
        (true, true) => "replaced",
        (true, false) => "added",
        (false, true) => "removed",
        (false, false) => "not there",
    }
    .into()
}

fn keytool(keytool: &Path, cacerts: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(keytool);
    command
        .args(args)
        .args([
            "-noprompt",
            "-alias",
            ENTRY_NAME,
            "-storepass",
            TRUST_STORE_PASSWORD,
            "-keystore",
        ])
        .arg(cacerts);
    command
}

fn jvm_store(root: &Path, ca_file: Option<&Path>) -> Result<Option<Step>, InstallError> {
    let Some((tool, cacerts)) = jvm(root) else {
        return Ok(None);
    };
    let present = keytool(&tool, &cacerts, &["-list"])
        .output()
        .is_ok_and(|output| output.status.success());
    if present {
        run_tool(&mut keytool(&tool, &cacerts, &["-delete"]))?;
    }
    if let Some(file) = ca_file {
        run_tool(
            keytool(&tool, &cacerts, &["-importcert"])
                .arg("-file")
                .arg(file),
        )?;
    }
    Ok(Some(Step {
        place: format!("JVM cacerts {}", cacerts.display()),
        outcome: outcome(ca_file.is_some(), present),
    }))
}

fn nss_db(db: &Path, ca_file: Option<&Path>) -> Result<Step, InstallError> {
    let certutil = |args: &[&str]| {
        let mut command = Command::new("certutil");
        command
            .arg("-d")
            .arg(format!("sql:{}", db.display()))
            .args(args);
        command
    };
    let present = certutil(&["-L", "-n", ENTRY_NAME])
        .output()
        .is_ok_and(|output| output.status.success());
    if present {
        run_tool(&mut certutil(&["-D", "-n", ENTRY_NAME]))?;
    }
    if let Some(file) = ca_file {
        run_tool(certutil(&["-A", "-n", ENTRY_NAME, "-t", "C,,", "-i"]).arg(file))?;
    }
    Ok(Step {
        place: format!("NSS database {}", db.display()),
        outcome: outcome(ca_file.is_some(), present),
    })
}

/// Where the environment file goes.
pub fn env_file_path(root: &Path) -> PathBuf {
    under(root, "/etc/appliance/trust.env")
}

fn drop_in_path(root: &Path, service: &str) -> PathBuf {
    let unit = if service.contains('.') {
        service.to_owned()
    } else {
        format!("{service}.service")
    };
    under(
        root,
        &format!("/etc/systemd/system/{unit}.d/appliance-trust.conf"),
    )
}

fn write_file(path: &Path, contents: &str) -> Result<(), InstallError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_error("creating", parent))?;
    }
    fs::write(path, contents).map_err(io_error("writing", path))
}

fn remove_file(path: &Path) -> Result<bool, InstallError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(io_error("removing", path)(error)),
    }
}

fn nss_dbs(targets: &Targets) -> Vec<PathBuf> {
    let system = under(&targets.root, "/etc/pki/nssdb");
    let mut dbs = targets.nss_dbs.clone();
    if system.is_dir() && !dbs.contains(&system) {
        dbs.push(system);
    }
    dbs
}

/// Adds the CA (`ca_file`, PEM) everywhere `targets` says and the tools exist.
pub fn install(targets: &Targets, ca_file: &Path) -> Result<Vec<Step>, InstallError> {
    let pem = fs::read_to_string(ca_file).map_err(io_error("reading", ca_file))?;
    let mut steps: Vec<Step> = Vec::new();
    steps.extend(system_store(&targets.root, Some(&pem))?);
    steps.extend(jvm_store(&targets.root, Some(ca_file))?);
    let dbs = nss_dbs(targets);
    if !dbs.is_empty() && on_path("certutil") {
        for db in dbs {
            steps.push(nss_db(&db, Some(ca_file))?);
        }
    }
    let env_file = env_file_path(&targets.root);
    write_file(&env_file, &super::env_file(&targets.trust_dir))?;
    steps.push(Step {
        place: format!("environment file {}", env_file.display()),
        outcome: "written".into(),
    });
    for service in &targets.services {
        let drop_in = drop_in_path(&targets.root, service);
        write_file(
            &drop_in,
            &format!(
                "# Written by appliance trust install: the service trusts the appliance CA.\n[Service]\nEnvironmentFile={}\n",
                env_file_path(Path::new("/")).display()
            ),
        )?;
        steps.push(Step {
            place: format!("drop-in {}", drop_in.display()),
            outcome: "written (run systemctl daemon-reload and restart the service)".into(),
        });
    }
    Ok(steps)
}

/// Removes what [`install`] added, and nothing else.
pub fn uninstall(targets: &Targets) -> Result<Vec<Step>, InstallError> {
    let mut steps: Vec<Step> = Vec::new();
    steps.extend(system_store(&targets.root, None)?);
    steps.extend(jvm_store(&targets.root, None)?);
    let dbs = nss_dbs(targets);
    if !dbs.is_empty() && on_path("certutil") {
        for db in dbs {
            steps.push(nss_db(&db, None)?);
        }
    }
    let mut files = vec![env_file_path(&targets.root)];
    files.extend(
        targets
            .services
            .iter()
            .map(|service| drop_in_path(&targets.root, service)),
    );
    for file in files {
        let removed = remove_file(&file)?;
        steps.push(Step {
            place: file.display().to_string(),
            outcome: if removed { "removed" } else { "not there" }.into(),
        });
    }
    Ok(steps)
}
