//! The one trust policy for Larder's outbound TLS (upstreams, `http`
//! sources, plugins' `http-client`): the system's CA roots, read once per
//! process, or the bundled Mozilla roots (webpki-roots) when the system has
//! none (a minimal container image); an upstream may add its own `ca_file`.
//! TLS 1.2 and 1.3 with ring, rustls's safe defaults.
//!
//! Also reading a listener's certificate chain and key from PEM files into
//! what rustls serves (config validation and the listener both use it, so
//! a file that passes `larder check` is one the listener can load). Must
//! not choose certificates or watch files: the listener does.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// Why a certificate chain and key could not be served.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("cert {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("key {key} does not belong to the certificate in {cert}")]
    Mismatch { cert: String, key: String },
}

impl CertificateError {
    /// Whether the key file (not the certificate) is the one to fix: it
    /// does not load, or it is not the certificate's.
    pub fn is_key(&self) -> bool {
        matches!(self, Self::Key { .. } | Self::Mismatch { .. })
    }
}

/// The crypto provider of every TLS connection Larder makes or accepts.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Reads a PEM certificate chain (the server's own certificate first) and
/// its PEM private key, and checks that they belong together.
pub fn load_certified_key(
    cert: &Path,
    key: &Path,
) -> Result<rustls::sign::CertifiedKey, CertificateError> {
    use rustls_pki_types::PrivateKeyDer;
    let cert_error = |reason: String| CertificateError::Cert {
        path: cert.display().to_string(),
        reason,
    };
    let key_error = |reason: String| CertificateError::Key {
        path: key.display().to_string(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_error(pem_reason(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(pem_reason(e)))?;
    if chain.is_empty() {
        return Err(cert_error(
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_string(),
        ));
    }
    webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| cert_error(format!("the first certificate does not parse: {e}")))?;
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| key_error(pem_reason(e)))?;
    match rustls::sign::CertifiedKey::from_der(chain, private_key, &provider()) {
        Ok(certified) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(_)) => Err(CertificateError::Mismatch {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
        }),
        Err(error) => Err(key_error(error.to_string())),
    }
}

/// A PEM reading error in words an operator can act on.
fn pem_reason(error: rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match error {
        Error::Io(error) => error.to_string(),
        Error::NoItemsFound => "holds no PEM item of the expected kind".to_string(),
        other => format!("not valid PEM: {other}"),
    }
}

/// Whether `cert` (DER) is valid for the host name `name` (a client's SNI),
/// wildcards included, by the same rules a client checks it with.
pub fn certificate_names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = rustls_pki_types::ServerName::try_from(name) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert).is_ok_and(|end_entity| {
        end_entity
            .verify_is_valid_for_subject_name(&server_name)
            .is_ok()
    })
}

/// The roots every outbound connection trusts.
fn default_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        for error in &loaded.errors {
            tracing::warn!(%error, "could not load a system CA certificate");
        }
        let mut roots = RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
        if added == 0 {
            tracing::warn!(
                "no usable system CA roots; outbound TLS trusts the bundled webpki roots"
            );
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        roots
    })
}

/// A client configuration trusting the default roots plus the certificates
/// in `extra_ca` (a PEM bundle), if given.
pub fn client_config(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = default_roots().clone();
    if let Some(path) = extra_ca {
        let ca_error = |reason: String| TlsError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| ca_error(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ca_error(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_error("holds no certificate".to_string()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
