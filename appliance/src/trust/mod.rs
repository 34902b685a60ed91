//! What clients need to trust the appliance CA without being told: files the daemon keeps in
//! its trust directory (beside the admin socket, world-readable: a CA certificate is public)
//! and the environment that points each runtime at them.
//!
//! - `appliance-ca.pem`: the CA alone (Node adds it to its built-in roots).
//! - `ca-bundle.pem`: the system's roots plus the CA, for runtimes whose variable replaces
//!   their roots (OpenSSL, Python, requests, httpx, curl, git, Go): hosts passed through keep
//!   verifying against the real roots.
//! - `trust.env`: the variables, for `EnvironmentFile=` and `docker run --env-file`.
//!
//! They are rebuilt when the CA rotates and when the system's roots change. Java wants a
//! trust store of its own format, which only a JVM's `keytool` writes; the daemon runs with
//! `MemoryDenyWriteExecute=` (no JIT can start there), so `appliance exec` builds it, as the
//! user, once per CA and JVM store ([`java_trust_store`]).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use tracing::{info, warn};

/// Where distributions keep their root bundle, most common first.
pub const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Where a JVM's trust store may be.
const JVM_TRUST_STORES: &[&str] = &["/etc/ssl/certs/java/cacerts"];

/// The password of the JVM's default trust store, which the copy keeps (it protects
/// nothing: a trust store holds public certificates).
const TRUST_STORE_PASSWORD: &str = "changeit";

/// The CA alone, in the trust directory.
pub const CA_FILE: &str = "appliance-ca.pem";
const BUNDLE_FILE: &str = "ca-bundle.pem";
const ENV_FILE: &str = "trust.env";

pub mod install;

/// The trust directory that goes with the admin socket `socket`.
pub fn dir_for_socket(socket: &Path) -> PathBuf {
    socket
        .parent()
        .unwrap_or_else(|| Path::new("/run/appliance"))
        .join("trust")
}

/// Writing the trust files failed.
#[derive(Debug, thiserror::Error)]
#[error("{action} {} failed", path.display())]
pub struct TrustError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// Why the trust directory is not the daemon's own.
#[derive(Debug, thiserror::Error)]
enum NotOwnDirectory {
    #[error("it is a symbolic link, not a directory; remove it")]
    Link,
    #[error("it is not a directory; remove it")]
    NotADirectory,
    #[error("it belongs to uid {0}, not to the daemon's user; remove it (another user made it in a directory they may write)")]
    Owner(u32),
}

/// The trust directory, as the daemon keeps it.
pub struct TrustFiles {
    dir: PathBuf,
    /// The system bundle and its modification time when the files were last built.
    built_from: std::sync::Mutex<Option<(PathBuf, SystemTime)>>,
}

fn system_bundle() -> Option<(PathBuf, SystemTime)> {
    SYSTEM_BUNDLES.iter().find_map(|path| {
        let modified = fs::metadata(path).and_then(|meta| meta.modified()).ok()?;
        Some((PathBuf::from(path), modified))
    })
}

/// The installed JVM's home: where `java` on PATH really lives, two levels up.
fn java_home() -> Option<PathBuf> {
    let java = which("java")?;
    Some(
        fs::canonicalize(java)
            .ok()?
            .parent()?
            .parent()?
            .to_path_buf(),
    )
}

/// `keytool` of the installed JVM, and its trust store.
fn jvm_trust_store() -> Option<(PathBuf, PathBuf)> {
    let home = java_home()?;
    let keytool = home.join("bin/keytool");
    let store = JVM_TRUST_STORES
        .iter()
        .map(PathBuf::from)
        .chain(std::iter::once(home.join("lib/security/cacerts")))
        .find(|path| path.exists())?;
    keytool.exists().then_some((keytool, store))
}

/// Where `program` is on PATH, if it is.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

impl TrustFiles {
    /// The trust directory `dir` (created when first written).
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            built_from: std::sync::Mutex::new(None),
        }
    }

    fn error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> TrustError {
        let path = path.to_path_buf();
        move |source| TrustError {
            action,
            path,
            source,
        }
    }

    /// Writes `contents` to `name` in the directory, world-readable, replacing it whole. The
    /// partial file is made anew (`O_EXCL`, so never through a link someone left in its
    /// place), and its mode set on the open file.
    fn publish(&self, name: &str, contents: &[u8]) -> Result<(), TrustError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = self.dir.join(name);
        let partial = self.dir.join(format!(".{name}.partial"));
        match fs::remove_file(&partial) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(Self::error("removing", &partial)(error)),
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&partial)
            .map_err(Self::error("creating", &partial))?;
        file.write_all(contents)
            .map_err(Self::error("writing", &partial))?;
        file.set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(Self::error("setting permissions of", &partial))?;
        fs::rename(&partial, &path).map_err(Self::error("replacing", &path))
    }

    /// Creates the directory, or checks that the one there is the daemon's own: the socket
    /// may live in a directory others can write, where another user could have made it, or
    /// put a link there, to have root write and chmod files where they choose.
    fn own_directory(&self) -> Result<(), TrustError> {
        use std::os::unix::fs::MetadataExt as _;
        fs::create_dir_all(&self.dir).map_err(Self::error("creating", &self.dir))?;
        let meta = fs::symlink_metadata(&self.dir).map_err(Self::error("inspecting", &self.dir))?;
        // SAFETY: geteuid has no preconditions.
        let own_uid = unsafe { libc::geteuid() };
        let wrong = if meta.file_type().is_symlink() {
            Some(NotOwnDirectory::Link)
        } else if !meta.is_dir() {
            Some(NotOwnDirectory::NotADirectory)
        } else if meta.uid() != own_uid {
            Some(NotOwnDirectory::Owner(meta.uid()))
        } else {
            None
        };
        if let Some(wrong) = wrong {
            return Err(Self::error("using the trust directory", &self.dir)(
                io::Error::new(io::ErrorKind::PermissionDenied, wrong),
            ));
        }
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o755))
            .map_err(Self::error("setting permissions of", &self.dir))
    }

    /// Builds every file for the CA certificate `ca_pem`.
    pub fn write(&self, ca_pem: &str) -> Result<(), TrustError> {
        self.own_directory()?;
        self.publish(CA_FILE, ca_pem.as_bytes())?;
        let system = system_bundle();
        let mut bundle = match &system {
            Some((path, _)) => fs::read(path).map_err(Self::error("reading", path))?,
            None => {
                warn!("no system root bundle found; the trust bundle holds the appliance CA alone, so hosts passed through will not verify for clients that use it");
                Vec::new()
            }
        };
        if !bundle.ends_with(b"\n") && !bundle.is_empty() {
            bundle.push(b'\n');
        }
        bundle.extend_from_slice(ca_pem.as_bytes());
        self.publish(BUNDLE_FILE, &bundle)?;
        self.publish(ENV_FILE, env_file(&self.dir).as_bytes())?;
        *self
            .built_from
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = system;
        info!(dir = %self.dir.display(), "trust files written for clients");
        Ok(())
    }

    /// Whether the system's roots changed since the files were built.
    pub fn system_roots_changed(&self) -> bool {
        let built = self
            .built_from
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        built != system_bundle()
    }
}

/// `$TMPDIR/appliance-trust-<uid>`, created private to this user: where `appliance exec`
/// keeps what it builds for the user's commands. `None` when it cannot be had, or when what is
/// there is not this user's alone (someone else's directory, or a link, in a shared /tmp).
fn private_dir() -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let dir = std::env::temp_dir().join(format!("appliance-trust-{uid}"));
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(_) => return None,
    }
    let meta = fs::symlink_metadata(&dir).ok()?;
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        warn!(dir = %dir.display(), "not using a trust directory this user does not own alone");
        return None;
    }
    Some(dir)
}

/// Variables that name a PEM file of roots, which a runtime uses instead of its own (Node:
/// beside its own). When the caller's environment already sets one, `appliance exec` keeps
/// that file's roots and adds the CA ([`merged_bundle`]); those it does not set, and that
/// [`environment`] does not give, are left alone.
pub const BUNDLE_VARIABLES: &[&str] = &[
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS",
    // botocore, pip, httplib2, gRPC, Nix, the gcloud CLI, Deno.
    "AWS_CA_BUNDLE",
    "PIP_CERT",
    "HTTPLIB2_CA_CERTS",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    "NIX_SSL_CERT_FILE",
    "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE",
    "DENO_CERT",
];

/// Why a caller's bundle could not be merged with the CA.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// Their file or the CA could not be read.
    #[error("reading {} failed", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No directory private to this user could be had for the merged file.
    #[error("no private directory for the merged bundle under {}", std::env::temp_dir().display())]
    NoPrivateDir,
    /// Writing the merged file failed.
    #[error("writing {} failed", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The roots of `theirs` (a PEM file the caller's environment names) with the CA of
/// `trust_dir` added: `theirs` itself when it already holds the CA (the caller took the trust
/// files already), else a file in the user's [`private_dir`] named by both contents, so it is
/// built once and built anew when either changes.
pub fn merged_bundle(trust_dir: &Path, theirs: &Path) -> Result<PathBuf, MergeError> {
    use ring::digest::{Context, SHA256};
    let read = |path: &Path| {
        fs::read(path).map_err(|source| MergeError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let ca = read(&trust_dir.join(CA_FILE))?;
    let roots = read(theirs)?;
    let ca_text = ca.trim_ascii();
    if roots.windows(ca_text.len()).any(|window| window == ca_text) {
        return Ok(theirs.to_path_buf());
    }
    let mut digest = Context::new(&SHA256);
    digest.update(&roots);
    digest.update(&ca);
    let name: String = digest.finish().as_ref()[..12]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let dir = private_dir().ok_or(MergeError::NoPrivateDir)?;
    let target = dir.join(format!("bundle-{name}.pem"));
    if target.exists() {
        return Ok(target);
    }
    let mut merged = roots;
    if !merged.is_empty() && !merged.ends_with(b"\n") {
        merged.push(b'\n');
    }
    merged.extend_from_slice(&ca);
    let partial = dir.join(format!(".bundle-{name}.{}", std::process::id()));
    let write_error = |source| MergeError::Write {
        path: target.clone(),
        source,
    };
    fs::write(&partial, &merged).map_err(write_error)?;
    fs::rename(&partial, &target).map_err(|source| {
        let _ = fs::remove_file(&partial);
        write_error(source)
    })?;
    Ok(target)
}

/// The JVM's trust store plus the CA of `trust_dir`, built with the JVM's `keytool` under
/// the user's [`private_dir`], once per CA and JVM store: `None` without a JVM, or when building fails (then Java is not told).
pub fn java_trust_store(trust_dir: &Path) -> Option<PathBuf> {
    use ring::digest::{Context, SHA256};
    let (keytool, store) = jvm_trust_store()?;
    let ca = fs::read(trust_dir.join(CA_FILE)).ok()?;
    let mut digest = Context::new(&SHA256);
    digest.update(&ca);
    digest.update(
        fs::canonicalize(&store)
            .ok()?
            .as_os_str()
            .as_encoded_bytes(),
    );
    let modified = fs::metadata(&store).ok()?.modified().ok()?;
    digest.update(format!("{modified:?}").as_bytes());
    let name: String = digest.finish().as_ref()[..12]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let dir = private_dir()?;
    let target = dir.join(format!("truststore-{name}.p12"));
    if target.exists() {
        return Some(target);
    }
    let partial = dir.join(format!(".truststore-{name}.{}", std::process::id()));
    let built = fs::copy(&store, &partial).is_ok()
        && Command::new(&keytool)
            .args([
                "-importcert",
                "-noprompt",
                "-alias",
                "appliance-ca",
                "-storepass",
            ])
            .arg(TRUST_STORE_PASSWORD)
            .arg("-keystore")
            .arg(&partial)
            .arg("-file")
            .arg(trust_dir.join(CA_FILE))
            .output()
            .is_ok_and(|output| output.status.success())
        && fs::rename(&partial, &target).is_ok();
    if !built {
        let _ = fs::remove_file(&partial);
        warn!(keytool = %keytool.display(), store = %store.display(), "building the Java trust store failed; Java is not told to trust the appliance CA");
        return None;
    }
    Some(target)
}

/// Each runtime's variable and the file it names, for a trust directory `dir`, and Java's
/// options when a trust store for it is given.
pub fn environment(dir: &Path, java_store: Option<&Path>) -> Vec<(&'static str, String)> {
    let file = |name: &str| dir.join(name).display().to_string();
    let mut variables = vec![
        // OpenSSL and what links it: Python's ssl and urllib, httpx (the Anthropic and
        // OpenAI SDKs), Ruby; Go reads it too.
        ("SSL_CERT_FILE", file(BUNDLE_FILE)),
        ("REQUESTS_CA_BUNDLE", file(BUNDLE_FILE)),
        ("CURL_CA_BUNDLE", file(BUNDLE_FILE)),
        ("GIT_SSL_CAINFO", file(BUNDLE_FILE)),
        // Node adds these to its built-in roots.
        ("NODE_EXTRA_CA_CERTS", file(CA_FILE)),
    ];
    if let Some(store) = java_store {
        variables.push((
            "JAVA_TOOL_OPTIONS",
            format!(
                "-Djavax.net.ssl.trustStore={} -Djavax.net.ssl.trustStorePassword={TRUST_STORE_PASSWORD}",
                store.display()
            ),
        ));
    }
    variables
}

/// The variables as `KEY=VALUE` lines: every runtime but Java, whose services take the CA
/// from the JVM's own store (`appliance trust install`).
pub fn env_file(dir: &Path) -> String {
    environment(dir, None)
        .into_iter()
        .map(|(key, value)| format!("{key}={value}\n"))
        .collect()
}

/// The bundle of `dir`: the system's roots and the CA.
pub fn bundle_path(dir: &Path) -> PathBuf {
    dir.join(BUNDLE_FILE)
}

/// Whether `dir` holds a trust bundle (the daemon has written it).
pub fn is_ready(dir: &Path) -> bool {
    dir.join(BUNDLE_FILE).exists() && dir.join(CA_FILE).exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::temp_dir;

    #[test]
    fn links_in_the_trust_directory_are_never_written_through() {
        let dir = temp_dir("trust-links");
        let victim = dir.join("victim");
        fs::write(&victim, "untouched").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        let ca = "-----BEGIN CERTIFICATE-----\nAPPLIANCE\n-----END CERTIFICATE-----\n";

        // A trust directory that is a link to another directory is refused.
        let elsewhere = dir.join("elsewhere");
        fs::create_dir_all(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join("linked")).unwrap();
        let error = TrustFiles::new(dir.join("linked")).write(ca).unwrap_err();
        assert!(
            format!("{:#}", anyhow::Error::new(error)).contains("symbolic link"),
            "refused"
        );
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);

        // Links left where the partial files go are replaced, not followed.
        let trust = dir.join("trust");
        fs::create_dir_all(&trust).unwrap();
        for name in [CA_FILE, BUNDLE_FILE, ENV_FILE] {
            std::os::unix::fs::symlink(&victim, trust.join(format!(".{name}.partial"))).unwrap();
        }
        TrustFiles::new(trust.clone()).write(ca).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(
            fs::metadata(&victim).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_to_string(trust.join(CA_FILE)).unwrap(), ca);
    }

    #[test]
    fn the_bundle_keeps_the_system_roots_and_adds_the_ca() {
        let dir = temp_dir("trust-files").join("trust");
        let files = TrustFiles::new(dir.clone());
        let ca = "-----BEGIN CERTIFICATE-----\nAPPLIANCE\n-----END CERTIFICATE-----\n";
        files.write(ca).unwrap();
        let bundle = fs::read_to_string(dir.join(BUNDLE_FILE)).unwrap();
        assert!(bundle.ends_with(ca));
        if let Some((system, _)) = system_bundle() {
            assert!(bundle.starts_with(&fs::read_to_string(system).unwrap()));
        }
        assert_eq!(
            fs::metadata(dir.join(BUNDLE_FILE))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o644
        );
        assert!(is_ready(&dir));
        assert!(!files.system_roots_changed());
        let lines = fs::read_to_string(dir.join(ENV_FILE)).unwrap();
        assert!(lines.contains(&format!(
            "SSL_CERT_FILE={}",
            dir.join(BUNDLE_FILE).display()
        )));
        assert!(lines.contains(&format!(
            "NODE_EXTRA_CA_CERTS={}",
            dir.join(CA_FILE).display()
        )));
    }
}
