//! TLS for the update agent's `https://` URLs (rustls with the ring provider): the server's
//! certificate is checked against the image's CA bundle and the image's own update CA
//! (`[update] ca`). Only `plinth-update` reaches this module; `plinth-init` never does.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// The CA bundle of the image (Debian's `ca-certificates`), used when present.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where the certificates `https://` servers are checked against come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust {
    /// A CA bundle that may be missing (the image's system bundle).
    pub bundle: PathBuf,
    /// The image's update CA (`[update] ca`, placed at [`os_config::definition::UPDATE_CA_IN_IMAGE`]),
    /// which must be there when given.
    pub update_ca: Option<PathBuf>,
}

/// A TLS client configuration with the trust it was made from, for messages.
#[derive(Clone)]
pub struct Tls {
    config: Arc<ClientConfig>,
    /// Where the trusted certificates came from, e.g. `/etc/ssl/certs/ca-certificates.crt (140)`.
    pub trusted: String,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tls(trusting {})", self.trusted)
    }
}

/// Reads every certificate of a PEM file; `what` names the file in errors.
fn read_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{} holds no certificate (expected `-----BEGIN CERTIFICATE-----` blocks)",
            path.display()
        );
    }
    Ok(certs)
}

impl Tls {
    /// Loads the trusted certificates; the bundle may be missing, the update CA may not.
    pub fn load(trust: &Trust) -> Result<Tls> {
        let mut roots = RootCertStore::empty();
        let mut trusted = Vec::new();
        if trust.bundle.exists() {
            let certs = read_pem(&trust.bundle)?;
            // A bundle may hold certificates webpki cannot use; the others still count.
            let (added, _) = roots.add_parsable_certificates(certs);
            trusted.push(format!("{} ({added})", trust.bundle.display()));
        }
        if let Some(ca) = &trust.update_ca {
            for cert in read_pem(ca).context("reading the update CA ([update] ca)")? {
                roots.add(cert).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: a certificate cannot be used as a CA: {e}",
                        ca.display()
                    )
                })?;
            }
            trusted.push(format!("{} ([update] ca)", ca.display()));
        }
        let trusted = if trusted.is_empty() {
            format!(
                "nothing: the image has no {} and no [update] ca",
                trust.bundle.display()
            )
        } else {
            trusted.join(" and ")
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("setting up TLS")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls {
            config: Arc::new(config),
            trusted,
        })
    }

    /// Makes a TLS connection to `host` over `sock`, handshake done (so a certificate error
    /// shows here, not at the first read).
    pub fn connect(&self, host: &str, sock: TcpStream) -> Result<TlsStream, TlsError> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| TlsError::Other(format!("`{host}` is not a valid TLS server name")))?;
        let conn = ClientConnection::new(Arc::clone(&self.config), name)
            .map_err(|e| TlsError::Other(e.to_string()))?;
        let mut stream = StreamOwned::new(conn, sock);
        while stream.conn.is_handshaking() {
            if let Err(e) = stream.conn.complete_io(&mut stream.sock) {
                let certificate = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .is_some_and(|inner| {
                        matches!(
                            inner,
                            rustls::Error::InvalidCertificate(_)
                                | rustls::Error::NoCertificatesPresented
                        )
                    });
                return Err(if certificate {
                    TlsError::Untrusted(format!(
                        "the server's TLS certificate is not trusted ({e}); trusted are {}",
                        self.trusted
                    ))
                } else {
                    TlsError::Io(e)
                });
            }
        }
        Ok(TlsStream(Box::new(stream)))
    }
}

/// Why a TLS connection could not be made.
#[derive(Debug)]
pub enum TlsError {
    /// The certificate does not chain to a trusted CA, names another host, or has expired.
    Untrusted(String),
    /// The connection failed during the handshake.
    Io(io::Error),
    /// Anything else (a host that is not a valid server name).
    Other(String),
}

/// An established TLS connection; dropping it sends `close_notify`, so a server that carries
/// several connections over one stream (QEMU's `guestfwd`) sees where this one ends.
pub struct TlsStream(Box<StreamOwned<ClientConnection, TcpStream>>);

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsStream")
    }
}

impl TlsStream {
    /// The TCP connection underneath (for timeouts).
    pub fn tcp(&self) -> &TcpStream {
        &self.0.sock
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.read(buf) {
            // A server that closes without `close_notify` after a complete body is common; the
            // HTTP framing above decides whether the body was complete.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            other => other,
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Drop for TlsStream {
    fn drop(&mut self) {
        self.0.conn.send_close_notify();
        while self.0.conn.wants_write() {
            if self.0.conn.write_tls(&mut self.0.sock).is_err() {
                break;
            }
        }
    }
}
