//! How does the gateway speak TLS? With rustls on ring, everywhere: the certificate both
//! listeners present (re-read from its files on SIGHUP or when they change, without
//! touching open connections), the admin listener's acceptor (optionally requiring client
//! certificates), and what an `https://` backend is trusted by and shown.

use anyhow::{anyhow, bail, Context};
use arc_swap::ArcSwap;
use pingora_core::protocols::tls::CaType;
use pingora_core::utils::tls::{CertKey, WrappedX509};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Makes ring the process's TLS provider (so that aws-lc-rs is not compiled). Pingora and
/// the admin listener take it from here; it must run before the first TLS client or server
/// is built. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `[server.tls]`: the certificate the listeners present, and how.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Offer HTTP/2 (ALPN `h2`) on the proxy listener, besides HTTP/1.1.
    pub http2: bool,
    /// Serve the admin listener over TLS too, with the same certificate.
    pub admin: bool,
    /// When set, the admin listener admits only clients with a certificate from this CA.
    pub admin_client_ca_file: Option<PathBuf>,
    /// How often the files are checked for a change (SIGHUP re-reads them at once).
    pub reload_check: Duration,
}

/// The certificate both listeners present. Each handshake takes the one loaded last, so a
/// reload changes what new connections see and leaves open ones (streams included) alone.
#[derive(Debug)]
pub struct ServedCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
    /// The files' modification times and lengths when last read.
    stamp: parking_lot::Mutex<Option<FileStamp>>,
}

type FileStamp = [(SystemTime, u64); 2];

impl ServedCertificate {
    pub fn load(cert_file: &Path, key_file: &Path) -> anyhow::Result<Arc<ServedCertificate>> {
        let stamp = stamp(cert_file, key_file);
        let key = certified_key(cert_file, key_file)?;
        Ok(Arc::new(ServedCertificate {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: ArcSwap::from_pointee(key),
            stamp: parking_lot::Mutex::new(stamp),
        }))
    }

    /// Reads the files again. A pair that does not load (half-written, mismatched) leaves
    /// the certificate in use as it was.
    pub fn reload(&self) -> anyhow::Result<()> {
        let stamp = stamp(&self.cert_file, &self.key_file);
        let key = certified_key(&self.cert_file, &self.key_file)?;
        self.current.store(Arc::new(key));
        *self.stamp.lock() = stamp;
        Ok(())
    }

    fn changed(&self) -> bool {
        let now = stamp(&self.cert_file, &self.key_file);
        now.is_some() && now != *self.stamp.lock()
    }

    /// Reloads on SIGHUP and whenever the files change, until the process ends.
    pub async fn follow(self: Arc<Self>, check: Duration) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: certificates reload on file change only");
                None
            }
        };
        let mut tick = tokio::time::interval(check);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let signalled = tokio::select! {
                Some(()) = async { hangup.as_mut()?.recv().await } => true,
                _ = tick.tick() => false,
            };
            if !signalled && !self.changed() {
                continue;
            }
            let outcome = match self.reload() {
                Ok(()) => {
                    tracing::info!(cert = %self.cert_file.display(), signalled, "TLS certificate reloaded");
                    "reloaded"
                }
                Err(e) => {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "TLS certificate not reloaded; the previous one stays in use"
                    );
                    "failed"
                }
            };
            crate::metrics::get().record_certificate_reload(outcome);
        }
    }
}

impl ResolvesServerCert for ServedCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn stamp(cert_file: &Path, key_file: &Path) -> Option<FileStamp> {
    let one = |path: &Path| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    Some([one(cert_file)?, one(key_file)?])
}

fn certified_key(cert_file: &Path, key_file: &Path) -> anyhow::Result<CertifiedKey> {
    let chain = certificates(cert_file)?;
    let key = private_key(key_file)?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        anyhow!(
            "{} and {} do not make a usable certificate: {e}",
            cert_file.display(),
            key_file.display()
        )
    })
}

/// Every certificate in a PEM file, in order; an error names the file.
pub fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow!("cannot read certificates from {}: {e}", path.display()))?;
    if chain.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(chain)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1); an error names the file.
pub fn private_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| anyhow!("cannot read a private key from {}: {e}", path.display()))
}

/// The proxy listener's TLS settings for pingora: the served certificate, TLS 1.2 and 1.3,
/// and HTTP/2 by ALPN when it is on.
pub fn proxy_settings(
    served: Arc<ServedCertificate>,
    http2: bool,
) -> anyhow::Result<pingora_core::listeners::tls::TlsSettings> {
    // The paths are not read: the resolver supplies the certificate.
    let mut settings = pingora_core::listeners::tls::TlsSettings::intermediate("", "")
        .map_err(|e| anyhow!("TLS settings: {e}"))?;
    settings.set_cert_resolver(served);
    if http2 {
        settings.enable_h2();
    }
    Ok(settings)
}

/// The admin listener's acceptor: the served certificate, HTTP/1.1, and client
/// certificates from `client_ca` required when one is given.
pub fn admin_acceptor(
    served: Arc<ServedCertificate>,
    client_ca: Option<&Path>,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    install_crypto_provider();
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        Some(path) => {
            let roots = root_store(path)?;
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .with_context(|| format!("client CA {}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(served);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn root_store(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots
            .add(cert)
            .with_context(|| format!("{} holds a certificate that is not a CA", path.display()))?;
    }
    Ok(roots)
}

/// What an `https://` backend's connections trust and present, loaded once at start.
#[derive(Clone, Default)]
pub struct BackendTrust {
    /// The CA bundle that replaces the system roots for this backend.
    pub ca: Option<Arc<CaType>>,
    /// The client certificate shown to a backend that asks for one.
    pub client_cert: Option<Arc<CertKey>>,
}

impl std::fmt::Debug for BackendTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTrust")
            .field("ca", &self.ca.as_ref().map(|ca| ca.len()))
            .field("client_cert", &self.client_cert.is_some())
            .finish()
    }
}

impl BackendTrust {
    pub fn load(
        ca_file: Option<&Path>,
        client_cert: Option<(&Path, &Path)>,
    ) -> anyhow::Result<BackendTrust> {
        let ca = match ca_file {
            Some(path) => {
                // Checked as rustls will read them, before pingora's parser (which panics on
                // a malformed certificate) sees them.
                root_store(path)?;
                let wrapped: Vec<WrappedX509> = certificates(path)?
                    .into_iter()
                    .map(|der| WrappedX509::new(der.to_vec(), pingora_core::utils::tls::parse_x509))
                    .collect();
                Some(Arc::from(wrapped.into_boxed_slice()))
            }
            None => None,
        };
        let client_cert = match client_cert {
            Some((cert, key)) => {
                let chain = certificates(cert)?;
                let key_der = private_key(key)?;
                // Checked as a pair now, not at the first connection.
                certified_key(cert, key)?;
                Some(Arc::new(CertKey::new(
                    chain.into_iter().map(|c| c.to_vec()).collect(),
                    key_der.secret_der().to_vec(),
                )))
            }
            None => None,
        };
        Ok(BackendTrust { ca, client_cert })
    }
}
