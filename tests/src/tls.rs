//! Certificates a test makes for itself: a private CA, and certificates it signs for servers
//! on loopback (`127.0.0.1`, `::1`, `localhost`) and for clients. Made with the `openssl`
//! command (no crate of its own), as EC P-256 keys in PEM files, which rustls, OpenSSL
//! (redis-server) and Python's ssl module all read.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let ca = sluice_e2e::tls::Ca::new("test CA")?;
//! let server = ca.server_cert("redis")?; // server.cert, server.key: for 127.0.0.1/localhost
//! let client = ca.client_cert("gateway")?; // for servers that ask for a client certificate
//! let stranger = sluice_e2e::tls::Ca::new("another CA")?; // trusted by nobody here
//! # let _ = (ca.cert(), server, client, stranger); Ok(()) }
//! ```
//!
//! Every file lives in the CA's temporary directory, and is gone when the CA is dropped.

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A certificate authority of the test's own: a self-signed certificate and its key.
pub struct Ca {
    dir: tempfile::TempDir,
    name: String,
    cert: PathBuf,
    key: PathBuf,
}

/// A certificate the CA signed, with its private key (PKCS#8), as files.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

/// What a signed certificate may be used for (its extended key usage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A TLS server on loopback.
    Server,
    /// A client that shows a certificate (mutual TLS).
    Client,
    /// Both: a server that also connects to its peers with the same certificate (a Redis
    /// Cluster node on its cluster bus).
    Peer,
}

/// The names a server certificate is made for: everything a loopback URL may say.
const LOOPBACK_NAMES: &str = "IP:127.0.0.1,IP:::1,DNS:localhost";

impl Ca {
    /// A new CA named `name` (its subject's CN), in a temporary directory of its own; two
    /// CAs never trust each other's certificates.
    pub fn new(name: &str) -> Result<Ca> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("ca.cnf");
        std::fs::write(
            &config,
            "[req]\ndistinguished_name = dn\n[dn]\n[v3_ca]\n\
             basicConstraints = critical,CA:TRUE\n\
             keyUsage = critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier = hash\n",
        )?;
        let cert = dir.path().join("ca.pem");
        let key = dir.path().join("ca.key");
        openssl(
            Command::new("openssl")
                .args(["req", "-x509", "-new", "-nodes", "-days", "30"])
                .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
                .args(["-subj", &format!("/CN={name}")])
                .args(["-extensions", "v3_ca", "-config"])
                .arg(&config)
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert),
        )?;
        Ok(Ca {
            dir,
            name: name.to_owned(),
            cert,
            key,
        })
    }

    /// The CA's certificate (PEM): what a client or server is told to trust.
    pub fn cert(&self) -> &Path {
        &self.cert
    }

    /// The CA's private key (PEM), for a test that signs something of its own.
    pub fn key(&self) -> &Path {
        &self.key
    }

    /// A server certificate for `127.0.0.1`, `::1` and `localhost`, named `name` (its CN
    /// and file names).
    pub fn server_cert(&self, name: &str) -> Result<Leaf> {
        self.sign(name, Role::Server)
    }

    /// A client certificate with the CN `name`, for servers that ask for one.
    pub fn client_cert(&self, name: &str) -> Result<Leaf> {
        self.sign(name, Role::Client)
    }

    /// A certificate for `role`, named `name`: loopback names for a server or a peer; a
    /// client's has none.
    pub fn sign(&self, name: &str, role: Role) -> Result<Leaf> {
        ensure!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "'{name}': a certificate name here is letters, digits and '-' (it names files)"
        );
        let dir = self.dir.path();
        let (cert, key, csr, ext) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
            dir.join(format!("{name}.csr")),
            dir.join(format!("{name}.ext")),
        );
        ensure!(!cert.exists(), "{} already signed a '{name}'", self.name);
        let (usage, names) = match role {
            Role::Server => ("serverAuth", Some(LOOPBACK_NAMES)),
            Role::Client => ("clientAuth", None),
            Role::Peer => ("serverAuth,clientAuth", Some(LOOPBACK_NAMES)),
        };
        let mut extensions = format!(
            "basicConstraints = critical,CA:FALSE\n\
             keyUsage = critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage = {usage}\n\
             subjectKeyIdentifier = hash\n\
             authorityKeyIdentifier = keyid\n"
        );
        if let Some(names) = names {
            extensions.push_str(&format!("subjectAltName = {names}\n"));
        }
        std::fs::write(&ext, extensions)?;
        openssl(
            Command::new("openssl")
                .args(["req", "-new", "-nodes"])
                .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
                .args(["-subj", &format!("/CN={name}")])
                .arg("-config")
                .arg(dir.join("ca.cnf"))
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&csr),
        )?;
        openssl(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "30"])
                .arg("-in")
                .arg(&csr)
                .arg("-CA")
                .arg(&self.cert)
                .arg("-CAkey")
                .arg(&self.key)
                // A serial of its own for each certificate, kept next to the CA.
                .arg("-CAcreateserial")
                .arg("-CAserial")
                .arg(dir.join("ca.srl"))
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(&cert),
        )?;
        Ok(Leaf { cert, key })
    }
}

/// Runs an `openssl` command; its output in the error when it fails.
fn openssl(command: &mut Command) -> Result<()> {
    let output = command
        .output()
        .context("the openssl command (apt-get install openssl)")?;
    ensure!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
