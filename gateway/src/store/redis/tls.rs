//! What does the gateway trust, and what does it show, on a `rediss://` connection? A CA
//! bundle in place of the system's roots, and a client certificate for a Redis that asks for
//! one (`tls-auth-clients`). Checked once at start, so a wrong file is a config error and
//! never a connection that fails later. It must never print the client key.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The certificates a `rediss://` store connects with; the default (nothing configured)
/// verifies Redis against the system's roots and shows no client certificate.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// PEM certificates trusted instead of the system's roots.
    ca: Option<Vec<u8>>,
    /// PEM certificate chain and private key shown to Redis.
    client: Option<(Vec<u8>, Vec<u8>)>,
}

/// A PEM file that does not hold what it is configured as.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("holds no PEM certificate")]
    NoCertificate,
    #[error("is not a PEM certificate: {0}")]
    BadCertificate(String),
    #[error("holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {0}")]
    BadKey(String),
}

impl RedisTls {
    /// Checks that `pem` holds at least one certificate, and nothing that fails to parse as one.
    pub fn check_certificates(pem: &[u8]) -> Result<(), PemError> {
        let mut found = false;
        for cert in CertificateDer::pem_slice_iter(pem) {
            cert.map_err(|e| PemError::BadCertificate(e.to_string()))?;
            found = true;
        }
        if found {
            Ok(())
        } else {
            Err(PemError::NoCertificate)
        }
    }

    /// Checks that `pem` holds a private key.
    pub fn check_private_key(pem: &[u8]) -> Result<(), PemError> {
        PrivateKeyDer::from_pem_slice(pem)
            .map(drop)
            .map_err(|e| PemError::BadKey(e.to_string()))
    }

    /// A CA bundle (`ca`) and a client certificate chain with its key (`client`), in PEM, as
    /// [`RedisTls::check_certificates`] and [`RedisTls::check_private_key`] passed them.
    pub fn new(ca: Option<Vec<u8>>, client: Option<(Vec<u8>, Vec<u8>)>) -> RedisTls {
        RedisTls { ca, client }
    }

    /// Whether anything beyond the defaults is configured.
    pub fn is_configured(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }

    /// The form the redis crate's clients take.
    pub(super) fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca.clone(),
        }
    }
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Says what is configured, never the key (Config is Debug, and may be logged).
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.as_ref().map(|_| "<configured>"))
            .field("client", &self.client.as_ref().map(|_| "<configured>"))
            .finish()
    }
}
