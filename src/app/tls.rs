//! The HTTPS listener's side of TLS: the certificates it serves, one chosen
//! per handshake by the name the client asks for (SNI), and their reload
//! when the files change on disk (as cert-manager or certbot replace them)
//! or the config names others. A file that fails to load keeps the pair it
//! would have replaced, with the reason logged and counted; connections
//! already open keep the session they shook hands with.
//!
//! Owns the rustls server configuration: TLS 1.2 and 1.3 only, ALPN `h2`
//! and `http/1.1`, session resumption by tickets. Must not read requests:
//! the listener serves what comes out of the handshake.

use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::task::JoinHandle;

use crate::config::{CertificateFiles, TlsConfig};
use crate::http::tls::{CertificateError, certificate_names, load_certified_key};

/// One served certificate and the files it came from.
struct Served {
    files: CertificateFiles,
    key: Arc<CertifiedKey>,
}

/// The certificates a listener serves; replaced whole, so a handshake sees
/// one consistent set.
#[derive(Default)]
pub struct Certificates {
    /// What the config lists (a pair that failed to load is still watched).
    configured: Mutex<Vec<CertificateFiles>>,
    served: ArcSwap<Vec<Served>>,
    /// Serialises reloads (a file watch and a config reload at once).
    reloading: Mutex<()>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("count", &self.served.load().len())
            .finish()
    }
}

impl Certificates {
    /// Loads `files`; each that fails keeps what was served from the same
    /// files before, if anything (at start there is nothing before: the
    /// config check loaded them moments ago, so a failure is a race with
    /// whoever writes them, and that pair is left out until it loads).
    pub fn load(&self, files: &[CertificateFiles], reason: &'static str) {
        let _reloading = self.reloading.lock();
        files.clone_into(&mut self.configured.lock());
        let before = self.served.load_full();
        let mut served = Vec::with_capacity(files.len());
        for pair in files {
            let previous = before.iter().find(|served| &served.files == pair);
            match load_certified_key(&pair.cert, &pair.key) {
                Ok(key) => {
                    let key = Arc::new(key);
                    let changed = previous.is_none_or(|previous| previous.key.cert != key.cert);
                    if changed && previous.is_some() {
                        tracing::info!(cert = %pair.cert.display(), reason, "certificate reloaded");
                    }
                    metrics::counter!("larder_tls_certificate_loads_total", "result" => "loaded")
                        .increment(1);
                    served.push(Served {
                        files: pair.clone(),
                        key,
                    });
                }
                Err(error) => {
                    metrics::counter!("larder_tls_certificate_loads_total", "result" => "failed")
                        .increment(1);
                    log_failure(&error, previous.is_some(), reason);
                    if let Some(previous) = previous {
                        served.push(Served {
                            files: pair.clone(),
                            key: Arc::clone(&previous.key),
                        });
                    }
                }
            }
        }
        self.served.store(Arc::new(served));
    }

    /// The files the config lists (what a change on disk reloads).
    fn files(&self) -> Vec<CertificateFiles> {
        self.configured.lock().clone()
    }
}

fn log_failure(error: &CertificateError, kept_old: bool, reason: &'static str) {
    if kept_old {
        tracing::warn!(%error, reason, "certificate not reloaded; the one loaded before is still served");
    } else {
        tracing::error!(%error, reason, "certificate not loaded; it is not served");
    }
}

impl ResolvesServerCert for Certificates {
    /// The first certificate valid for the name the client sent, else the
    /// first one (the default).
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let served = self.served.load();
        if let Some(name) = client_hello.server_name()
            && let Some(matching) = served
                .iter()
                .find(|served| certificate_names(&served.key.cert[0], name))
        {
            return Some(Arc::clone(&matching.key));
        }
        served.first().map(|served| Arc::clone(&served.key))
    }
}

/// The HTTPS listener's TLS: what handshakes use and the watch that
/// reloads it. Dropping it stops the watch.
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    certificates: Arc<Certificates>,
    watch: Mutex<Option<JoinHandle<()>>>,
}

impl Tls {
    pub fn start(config: &TlsConfig) -> Result<Arc<Self>, rustls::Error> {
        let certificates = Arc::new(Certificates::default());
        certificates.load(&config.certificates, "start");
        let mut server = rustls::ServerConfig::builder_with_provider(crate::http::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(certificates.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        server.ticketer = rustls::crypto::ring::Ticketer::new()?;
        let tls = Arc::new(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            certificates,
            watch: Mutex::new(None),
        });
        tls.watch_files();
        Ok(tls)
    }

    /// A config reload: the listed certificates from now on (read again,
    /// so a reload also picks up files changed where no watch could see).
    pub fn apply(&self, config: &TlsConfig) {
        self.certificates
            .load(&config.certificates, "config reload");
        self.watch_files();
    }

    /// Watches each served file; any change reloads them all.
    fn watch_files(&self) {
        let files = self.certificates.files();
        let mut watches = Vec::new();
        for path in files
            .iter()
            .flat_map(|pair| [&pair.cert, &pair.key])
            .collect::<std::collections::BTreeSet<_>>()
        {
            match crate::watch::file(path) {
                Ok(watch) => watches.push(watch),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot watch a certificate file; reload with SIGHUP");
                }
            }
        }
        let certificates = Arc::clone(&self.certificates);
        let task = tokio::spawn(async move {
            let (_keep, mut changes): (Vec<_>, Vec<_>) = watches.into_iter().unzip();
            if changes.is_empty() {
                return;
            }
            loop {
                let next = futures_util::future::select_all(
                    changes.iter_mut().map(|changes| Box::pin(changes.next())),
                );
                if !next.await.0 {
                    return;
                }
                let files = certificates.files();
                certificates.load(&files, "file changed");
            }
        });
        if let Some(previous) = self.watch.lock().replace(task) {
            previous.abort();
        }
    }
}

impl Drop for Tls {
    fn drop(&mut self) {
        if let Some(watch) = self.watch.get_mut().take() {
            watch.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &std::path::Path, name: &str) -> CertificateFiles {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let files = CertificateFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }

    #[test]
    fn a_broken_file_keeps_the_pair_it_would_replace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = vec![pair(dir.path(), "a.test"), pair(dir.path(), "b.test")];
        let certificates = Certificates::default();
        certificates.load(&files, "start");
        let before: Vec<_> = certificates
            .served
            .load()
            .iter()
            .map(|s| s.key.cert.clone())
            .collect();
        std::fs::write(&files[1].cert, "not a certificate").expect("break");
        certificates.load(&files, "file changed");
        let after: Vec<_> = certificates
            .served
            .load()
            .iter()
            .map(|s| s.key.cert.clone())
            .collect();
        assert_eq!(before, after);
        assert!(certificate_names(&after[1][0], "b.test"));
        assert!(!certificate_names(&after[1][0], "a.test"));
    }
}
