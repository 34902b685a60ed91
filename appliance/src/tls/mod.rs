//! TLS: the appliance CA and its leaves (client side), and verified upstream connections.

pub mod ca;
pub mod leaf;
pub mod stream;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;

pub use ca::{CaError, CertificateAuthority};
pub use leaf::LeafCache;

/// ALPN protocol id of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol id of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// An extra CA file could not be used.
    #[error("extra upstream CA file {}: {reason}; give a PEM file with at least one certificate", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No root certificate at all: every upstream would fail verification.
    #[error("no trusted root certificates: the system store is empty or unreadable and no extra CA file was given; install ca-certificates or pass --upstream-ca")]
    NoRoots,
    /// rustls refused the configuration.
    #[error("building the TLS configuration failed")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server configuration for intercepted client connections: leaves from `leaves`, HTTP/2 or
/// HTTP/1.1 by ALPN.
pub fn server_config(leaves: Arc<LeafCache>) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(leaves);
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// Client configurations for upstream connections, verifying against the system roots plus
/// `extra_ca_files`. One offers HTTP/2 and HTTP/1.1, the other only HTTP/1.1 (for upgrades).
/// Both share one session cache, so repeat connections resume TLS sessions.
#[derive(Clone)]
pub struct UpstreamTls {
    /// Offers h2 and http/1.1.
    pub any_version: Arc<ClientConfig>,
    /// Offers http/1.1 only.
    pub http11_only: Arc<ClientConfig>,
}

impl UpstreamTls {
    /// Builds the configurations.
    pub fn new(extra_ca_files: &[PathBuf]) -> Result<Self, TlsConfigError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!(%error, "skipping part of the system certificate store");
        }
        let (_, ignored) = roots.add_parsable_certificates(native.certs);
        if ignored > 0 {
            tracing::debug!(ignored, "unparsable system root certificates skipped");
        }
        for path in extra_ca_files {
            for certificate in read_ca_file(path)? {
                roots
                    .add(certificate)
                    .map_err(|error| TlsConfigError::CaFile {
                        path: path.clone(),
                        reason: error.to_string(),
                    })?;
            }
        }
        if roots.is_empty() {
            return Err(TlsConfigError::NoRoots);
        }
        let base = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut any_version = base.clone();
        any_version.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        let mut http11_only = base;
        http11_only.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        http11_only.resumption = any_version.resumption.clone();
        Ok(Self {
            any_version: Arc::new(any_version),
            http11_only: Arc::new(http11_only),
        })
    }
}

fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let error = |reason: String| TlsConfigError::CaFile {
        path: path.into(),
        reason,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(e.to_string()))?;
    if certificates.is_empty() {
        return Err(error("it contains no certificate".into()));
    }
    Ok(certificates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ca_file_names_the_file() {
        let missing = PathBuf::from("/nonexistent/ca.pem");
        let error = UpstreamTls::new(std::slice::from_ref(&missing))
            .err()
            .unwrap();
        assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");

        let empty =
            std::env::temp_dir().join(format!("appliance-empty-{}.pem", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = UpstreamTls::new(std::slice::from_ref(&empty))
            .err()
            .unwrap();
        assert!(
            error.to_string().contains("contains no certificate"),
            "{error}"
        );
        std::fs::remove_file(empty).unwrap();
    }
}
