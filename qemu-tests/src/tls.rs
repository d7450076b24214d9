//! TLS for the tests' release server: a test CA (the same certificate on every run, so an image
//! that trusts it can be reused), server certificates it signs, and TLS sessions one after the
//! other over one TCP stream, as QEMU's `guestfwd` carries every guest connection to an address
//! over a single connection to the host.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// The seed of the test CA's Ed25519 key (test data; Ed25519 signs deterministically, so the CA
/// certificate is the same bytes on every run).
const CA_SEED: [u8; 32] = [0x5e; 32];

/// A certificate authority made at test time.
pub struct TestCa {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TestCa")
    }
}

impl TestCa {
    /// The test CA.
    pub fn new() -> Result<TestCa> {
        // PKCS #8 v1 of an Ed25519 private key: the fixed prefix, then the 32-byte seed.
        let mut pkcs8 = hex::decode("302e020100300506032b657004220420")?;
        pkcs8.extend_from_slice(&CA_SEED);
        let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(pkcs8),
            &rcgen::PKCS_ED25519,
        )
        .context("making the test CA key")?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Plinth test update CA");
        let cert = params
            .self_signed(&key)
            .context("making the test CA certificate")?;
        Ok(TestCa { key, cert })
    }

    /// The CA certificate as PEM, for `[update] ca`.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server configuration with a certificate for `names` (host names or IP addresses)
    /// signed by this CA.
    pub fn server_config(&self, names: &[&str]) -> Result<Arc<rustls::ServerConfig>> {
        let key = rcgen::KeyPair::generate().context("making a server key")?;
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .context("signing the server certificate")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .context("setting up the TLS server")?;
        Ok(Arc::new(config))
    }
}

/// One TLS session over a shared TCP stream; reading returns 0 once the client has sent its
/// `close_notify` (or the stream ended).
pub type Session = rustls::StreamOwned<rustls::ServerConnection, Records>;

/// Runs `serve` on each TLS session that arrives on `stream`, one after the other, until the
/// stream ends.
pub fn serve_sessions(
    stream: TcpStream,
    config: &Arc<rustls::ServerConfig>,
    mut serve: impl FnMut(&mut Session) -> Result<()>,
) -> Result<()> {
    loop {
        let mut records = Records::new(stream.try_clone()?);
        if !records.more()? {
            return Ok(());
        }
        let conn = rustls::ServerConnection::new(Arc::clone(config))?;
        let mut session = rustls::StreamOwned::new(conn, records);
        serve(&mut session)?;
    }
}

/// A TCP stream read one TLS record at a time, so that a session never consumes bytes of the
/// next one carried on the same stream.
#[derive(Debug)]
pub struct Records {
    sock: TcpStream,
    header: [u8; 5],
    /// Header bytes already returned (5: the header is out, the body follows).
    header_out: usize,
    body_left: usize,
}

impl Records {
    fn new(sock: TcpStream) -> Records {
        Records {
            sock,
            header: [0; 5],
            header_out: 5,
            body_left: 0,
        }
    }

    /// Reads the next record's header; false when the stream has ended.
    fn more(&mut self) -> io::Result<bool> {
        let mut got = 0;
        while got < 5 {
            match self.sock.read(&mut self.header[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.header_out = 0;
        self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
        Ok(true)
    }
}

impl Read for Records {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.header_out == 5 && self.body_left == 0 && !self.more()? {
            return Ok(0);
        }
        if self.header_out < 5 {
            let n = buf.len().min(5 - self.header_out);
            buf[..n].copy_from_slice(&self.header[self.header_out..self.header_out + n]);
            self.header_out += n;
            return Ok(n);
        }
        let want = buf.len().min(self.body_left);
        let n = self.sock.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.body_left -= n;
        Ok(n)
    }
}

impl Write for Records {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use std::io::{BufRead, BufReader};

    #[test]
    fn the_test_ca_is_the_same_on_every_run() {
        let a = TestCa::new().expect("ca");
        let b = TestCa::new().expect("ca");
        assert_eq!(a.pem(), b.pem());
        assert!(a.pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn sessions_follow_each_other_on_one_stream() {
        let ca = TestCa::new().expect("ca");
        let config = ca.server_config(&["127.0.0.1"]).expect("config");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut seen = Vec::new();
            serve_sessions(stream, &config, |session| {
                let mut line = String::new();
                BufReader::new(&mut *session).read_line(&mut line)?;
                session.write_all(format!("echo {line}").as_bytes())?;
                session.flush()?;
                // Until the client's close_notify.
                let mut rest = Vec::new();
                session.read_to_end(&mut rest)?;
                seen.push(line);
                Ok(())
            })
            .expect("serves");
            seen
        });
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.pem().as_bytes()) {
            roots.add(cert.expect("pem")).expect("root");
        }
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        // One TCP connection, two TLS sessions on it, one after the other.
        let tcp = TcpStream::connect(addr).expect("connect");
        for request in ["first\n", "second\n"] {
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
            let conn = rustls::ClientConnection::new(Arc::clone(&client), name).expect("client");
            let mut tls = rustls::StreamOwned::new(conn, tcp.try_clone().expect("clone"));
            tls.write_all(request.as_bytes()).expect("request");
            let mut reply = String::new();
            BufReader::new(&mut tls)
                .read_line(&mut reply)
                .expect("reply");
            assert_eq!(reply, format!("echo {request}"));
            tls.conn.send_close_notify();
            tls.flush().expect("close_notify");
        }
        drop(tcp);
        assert_eq!(server.join().expect("server"), ["first\n", "second\n"]);
    }
}
