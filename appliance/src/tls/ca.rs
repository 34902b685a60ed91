//! The appliance's certificate authority: created on first start, kept in the state directory
//! (private key readable by the daemon only), rotatable.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

const CERT_FILE: &str = "ca.crt";
const KEY_FILE: &str = "ca.key";
/// How long the CA is valid; rotation, not expiry, is how it is meant to be replaced.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves are short-lived; the cache renews them well before they expire.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Tolerated clock skew between the appliance and its clients.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Errors of the certificate authority.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing a CA file failed.
    #[error("{action} {} failed", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A stored CA file is damaged.
    #[error("the CA in {} is unreadable ({reason}); restore it from backup, or move the directory away to create a new CA (clients must then trust the new one)", dir.display())]
    Corrupt {
        /// The CA directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("generating a certificate failed")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the generated key.
    #[error("the generated key is unusable for TLS")]
    Key(#[from] rustls::Error),
}

/// A loaded CA that can issue leaf certificates.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// One key for every leaf of this CA: minting a leaf is then a single signature.
    leaf_key: KeyPair,
    leaf_signing_key: Arc<dyn rustls::sign::SigningKey>,
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CaError + 'a {
    move |source| CaError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn offset(time: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(time)
}

fn write_private(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    crate::files::write_atomically(path, contents.as_bytes(), mode)
        .map_err(io_error("writing", path))
}

impl CertificateAuthority {
    /// Loads the CA from `dir`, creating the directory and a new CA when there is none.
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_error("setting permissions of", dir))?;
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(dir),
            (false, false) => Self::create(dir),
            _ => Err(CaError::Corrupt {
                dir: dir.into(),
                reason: format!("only one of {CERT_FILE} and {KEY_FILE} exists"),
            }),
        }
    }

    fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_error("reading", &cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_error("reading", &key_path))?;
        let corrupt = |reason: String| CaError::Corrupt {
            dir: dir.into(),
            reason,
        };
        let key =
            KeyPair::from_pem(&key_pem).map_err(|error| corrupt(format!("{KEY_FILE}: {error}")))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|error| corrupt(format!("{CERT_FILE}: {error}")))?;
        let cert_der = pem_certificate_der(&cert_pem)
            .ok_or_else(|| corrupt(format!("{CERT_FILE} holds no certificate")))?;
        Self::assemble(cert_pem, cert_der, issuer)
    }

    fn create(dir: &Path) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "appliance");
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|host| host.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        let created = SystemTime::now();
        let serial = created
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        name.push(
            DnType::CommonName,
            format!("appliance local CA {host} {serial}"),
        );
        params.distinguished_name = name;
        // pathlen 0: this CA signs leaves, never other CAs.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = offset(created - BACKDATE);
        params.not_after = offset(created + CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        write_private(&dir.join(KEY_FILE), &key.serialize_pem(), 0o600)?;
        write_private(&dir.join(CERT_FILE), &cert_pem, 0o644)?;
        tracing::info!(dir = %dir.display(), "created a new appliance CA");
        let issuer = Issuer::new(params, key);
        Self::assemble(cert_pem, cert.der().clone(), issuer)
    }

    fn assemble(
        cert_pem: String,
        cert_der: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    ) -> Result<Self, CaError> {
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let leaf_signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&leaf_der)?;
        Ok(Self {
            cert_pem,
            cert_der,
            issuer,
            leaf_key,
            leaf_signing_key,
        })
    }

    /// Replaces the CA in `dir` with a new one. The old certificate is kept as
    /// `retired-<unix time>.crt` for reference; its key is deleted.
    pub fn rotate(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CERT_FILE);
        if cert_path.exists() {
            let stamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let retired = dir.join(format!("retired-{stamp}.crt"));
            fs::rename(&cert_path, &retired).map_err(io_error("retiring", &cert_path))?;
        }
        let key_path = dir.join(KEY_FILE);
        match fs::remove_file(&key_path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(io_error("removing", &key_path)(error)),
        }
        Self::create(dir)
    }

    /// The CA certificate, PEM-encoded, for clients to trust.
    pub fn certificate_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a leaf certificate for `host`, valid for [`LEAF_VALIDITY`].
    pub fn issue(&self, host: &str) -> Result<CertifiedKey, CaError> {
        let mut params = CertificateParams::new(vec![host.to_owned()])?;
        let now = SystemTime::now();
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + LEAF_VALIDITY);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&self.leaf_key, &self.issuer)?;
        Ok(CertifiedKey::new(
            vec![leaf.der().clone(), self.cert_der.clone()],
            Arc::clone(&self.leaf_signing_key),
        ))
    }
}

fn pem_certificate_der(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("appliance-ca-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn creates_once_then_loads_the_same_ca_with_a_private_key_file() {
        let dir = temp_dir("create");
        let first = CertificateAuthority::load_or_create(&dir).unwrap();
        let second = CertificateAuthority::load_or_create(&dir).unwrap();
        assert_eq!(first.certificate_pem(), second.certificate_pem());
        let key_mode = fs::metadata(dir.join(KEY_FILE)).unwrap().mode() & 0o777;
        assert_eq!(key_mode, 0o600);
        let dir_mode = fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        // Leaves of the reloaded CA chain to the stored certificate.
        let leaf = second.issue("api.example.com").unwrap();
        assert_eq!(leaf.cert.len(), 2);
        assert_eq!(leaf.cert[1], first.cert_der);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_replaces_the_ca_and_retires_the_old_certificate() {
        let dir = temp_dir("rotate");
        let old = CertificateAuthority::load_or_create(&dir).unwrap();
        let new = CertificateAuthority::rotate(&dir).unwrap();
        assert_ne!(old.certificate_pem(), new.certificate_pem());
        let reloaded = CertificateAuthority::load_or_create(&dir).unwrap();
        assert_eq!(reloaded.certificate_pem(), new.certificate_pem());
        let retired = fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().to_string_lossy().starts_with("retired-"))
            .count();
        assert_eq!(retired, 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_lone_certificate_is_reported_not_overwritten() {
        let dir = temp_dir("lone");
        CertificateAuthority::load_or_create(&dir).unwrap();
        fs::remove_file(dir.join(KEY_FILE)).unwrap();
        let error = CertificateAuthority::load_or_create(&dir).err().unwrap();
        assert!(error.to_string().contains("only one of"), "{error}");
        assert!(dir.join(CERT_FILE).exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
