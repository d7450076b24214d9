//! Where releases come from: HTTP or HTTPS over `TcpStream` through [`crate::http`] (with `Range`
//! to resume an interrupted download, and redirects) or a local folder (`file://` URLs and
//! `--from DIR`).
//!
//! What a server sends is bounded: the response head by [`crate::http`]'s limits, a manifest or
//! signature by [`SMALL_FILE_LIMIT`], redirects by [`MAX_REDIRECTS`], an artifact by its size in
//! the manifest (the caller reads one byte more at most), and the pace of every transfer by
//! [`PACE`]: a body that stalls or trickles fails, and the next check resumes it.

use std::fs;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Ipv6Addr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::tls::{Tls, TlsError, TlsStream, Trust};
use crate::http::{self, Body};

/// Largest manifest or signature accepted.
pub const SMALL_FILE_LIMIT: u64 = 1 << 20;
/// Network timeout for connecting.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Most redirects followed for one request.
pub const MAX_REDIRECTS: u32 = 5;

/// The pace a transfer must keep: some byte at least every `stall`, and at least `min_bytes` in
/// every `window`. A server (or a network) that stalls or trickles would otherwise hold the
/// agent, and the machine's update, for as long as it likes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    pub stall: Duration,
    pub window: Duration,
    pub min_bytes: u64,
}

/// The pace of every transfer: no 30 s without a byte, no 60 s with less than 1 KiB.
pub const PACE: Pace = Pace {
    stall: Duration::from_secs(30),
    window: Duration::from_secs(60),
    min_bytes: 1024,
};

/// How the agent talks to servers: the TLS trust for `https://` and the pace transfers must keep.
#[derive(Debug, Clone)]
pub struct Client {
    /// Where trusted certificates come from; `None`: `https://` URLs fail, naming why.
    pub trust: Option<Trust>,
    pub pace: Pace,
    /// How long connecting may take ([`TIMEOUT`] unless set by [`Client::with_connect_timeout`]).
    pub connect_timeout: Duration,
    /// The TLS configuration, loaded at the first `https://` connection: a program that never
    /// makes one (`plinth-init`, which loads the agent to look for a rollback) never reads the
    /// certificates and does not link TLS.
    tls: Arc<OnceLock<Tls>>,
}

impl Default for Client {
    fn default() -> Self {
        Client::new(None, PACE)
    }
}

impl Client {
    /// A client trusting what `trust` names, keeping `pace`.
    pub fn new(trust: Option<Trust>, pace: Pace) -> Client {
        Client {
            trust,
            pace,
            connect_timeout: TIMEOUT,
            tls: Arc::new(OnceLock::new()),
        }
    }

    /// The same client, giving up connecting after `timeout` (a link-local metadata service
    /// answers at once or not at all).
    pub fn with_connect_timeout(self, timeout: Duration) -> Client {
        Client {
            connect_timeout: timeout,
            ..self
        }
    }

    /// The TLS configuration, loaded once.
    fn tls(&self, what: &str) -> Result<&Tls, FetchError> {
        if let Some(tls) = self.tls.get() {
            return Ok(tls);
        }
        let trust = self.trust.as_ref().ok_or_else(|| {
            FetchError::Untrusted(format!(
                "{what}: no CA certificates are set up to check the server's TLS certificate"
            ))
        })?;
        let tls = Tls::load(trust).map_err(|e| FetchError::Untrusted(format!("{what}: {e:#}")))?;
        Ok(self.tls.get_or_init(|| tls))
    }
}

/// A release folder: an HTTP(S) base URL or a local folder.
#[derive(Debug, Clone)]
pub enum Source {
    Http { url: HttpUrl, client: Client },
    Dir(PathBuf),
}

impl PartialEq for Source {
    /// The same folder or URL (whatever the client's settings).
    fn eq(&self, other: &Source) -> bool {
        match (self, other) {
            (Source::Http { url: a, .. }, Source::Http { url: b, .. }) => a == b,
            (Source::Dir(a), Source::Dir(b)) => a == b,
            _ => false,
        }
    }
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// A parsed `http(s)://host[:port]/path` URL; an IPv6 host is written in brackets
/// (`http://[::1]:8080/`) and kept here without them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub scheme: Scheme,
    /// Host name or address, without brackets.
    pub host: String,
    pub port: u16,
    /// Path, always starting with `/`.
    pub path: String,
}

impl HttpUrl {
    /// Parses an `http://` or `https://` URL.
    pub fn parse(url: &str) -> Result<HttpUrl> {
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else {
            bail!("URL `{url}`: only http://, https:// and file:// URLs are supported");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            bail!("URL `{url}`: user names and passwords in URLs are not supported");
        }
        let (host, port) = if let Some(inside) = authority.strip_prefix('[') {
            let Some((address, after)) = inside.split_once(']') else {
                bail!("URL `{url}`: the IPv6 address after `[` has no closing `]`");
            };
            if address.parse::<Ipv6Addr>().is_err() {
                bail!("URL `{url}`: `{address}` is not an IPv6 address");
            }
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').with_context(|| {
                    format!(
                        "URL `{url}`: expected `:port` or `/` after `[{address}]`, found `{after}`"
                    )
                })?),
            };
            (address, port)
        } else {
            if authority.matches(':').count() > 1 {
                bail!(
                    "URL `{url}`: an IPv6 address must be written in brackets, like `{}://[::1]:8080/`",
                    scheme.as_str()
                );
            }
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => scheme.default_port(),
            Some(p) => p.parse().ok().filter(|p| *p != 0).with_context(|| {
                format!("URL `{url}`: port `{p}` is not a number from 1 to 65535")
            })?,
        };
        if host.is_empty() {
            bail!("URL `{url}` has no host");
        }
        Ok(HttpUrl {
            scheme,
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// `host:port` as the `Host` header writes it: an IPv6 address in brackets.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn join(&self, relative: &str) -> HttpUrl {
        let base = self.path.trim_end_matches('/');
        HttpUrl {
            path: format!("{base}/{}", relative.trim_start_matches('/')),
            ..self.clone()
        }
    }

    /// Where a redirect from this URL to `location` leads: an absolute URL of the same scheme
    /// (or from `http` up to `https`), or a path on the same server.
    fn redirect(&self, location: &str) -> Result<HttpUrl, String> {
        if location.starts_with('/') && !location.starts_with("//") {
            return Ok(HttpUrl {
                path: location.to_owned(),
                ..self.clone()
            });
        }
        let next = HttpUrl::parse(location).map_err(|e| format!("redirect: {e:#}"))?;
        if self.scheme == Scheme::Https && next.scheme == Scheme::Http {
            return Err(format!(
                "redirect to `{location}` refused: it leaves https for plain http"
            ));
        }
        Ok(next)
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.scheme.as_str(),
            self.authority(),
            self.path
        )
    }
}

/// Why a fetch failed; `NotFound` lets `check` say that nothing is published.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}: not found")]
    NotFound(String),
    /// The cause is part of the message, not a `source()`: a chain would print it twice.
    #[error("{what}: {error}")]
    Io { what: String, error: io::Error },
    #[error("{0}")]
    Protocol(String),
    /// The server's TLS certificate is not trusted: the server is not the one configured.
    #[error("{0}")]
    Untrusted(String),
}

impl Source {
    /// `http://…`, `https://…`, `file:///…` or a plain folder path; `client` talks to servers.
    pub fn parse_with(url: &str, client: Client) -> Result<Source> {
        if let Some(path) = url.strip_prefix("file://") {
            Ok(Source::Dir(PathBuf::from(path)))
        } else if url.starts_with("http://") || url.starts_with("https://") {
            Ok(Source::Http {
                url: HttpUrl::parse(url)?,
                client,
            })
        } else if url.contains("://") {
            bail!("URL `{url}`: only http://, https:// and file:// URLs are supported");
        } else {
            Ok(Source::Dir(PathBuf::from(url)))
        }
    }

    /// [`Source::parse_with`] a client that trusts no TLS certificate.
    pub fn parse(url: &str) -> Result<Source> {
        Source::parse_with(url, Client::default())
    }

    /// Where `relative` lives, for messages.
    pub fn describe(&self, relative: &str) -> String {
        match self {
            Source::Http { url, .. } => url.join(relative).to_string(),
            Source::Dir(dir) => dir.join(relative).display().to_string(),
        }
    }

    /// Reads a small file (manifest, signature) whole, at most [`SMALL_FILE_LIMIT`] bytes.
    pub fn get(&self, relative: &str) -> Result<Vec<u8>, FetchError> {
        let mut reader = self.open_at(relative, 0)?;
        let mut data = Vec::new();
        (&mut reader)
            .take(SMALL_FILE_LIMIT + 1)
            .read_to_end(&mut data)
            .map_err(|error| FetchError::Io {
                what: self.describe(relative),
                error,
            })?;
        if data.len() as u64 > SMALL_FILE_LIMIT {
            return Err(FetchError::Protocol(format!(
                "{} is larger than the limit of {SMALL_FILE_LIMIT} bytes",
                self.describe(relative)
            )));
        }
        Ok(data)
    }

    /// Opens `relative` for streaming from byte `offset`.
    pub fn open_at(&self, relative: &str, offset: u64) -> Result<Box<dyn Read + Send>, FetchError> {
        match self {
            Source::Dir(dir) => {
                let path = dir.join(relative);
                let io_err = |error: io::Error| {
                    if error.kind() == io::ErrorKind::NotFound {
                        FetchError::NotFound(path.display().to_string())
                    } else {
                        FetchError::Io {
                            what: path.display().to_string(),
                            error,
                        }
                    }
                };
                let mut file = fs::File::open(&path).map_err(io_err)?;
                file.seek(SeekFrom::Start(offset)).map_err(io_err)?;
                Ok(Box::new(file))
            }
            Source::Http { url, client } => {
                http_get(client, &url.join(relative), offset, MAX_REDIRECTS)
            }
        }
    }

    /// Opens `relative` (of `len` bytes) from byte `start` as a reader that reconnects and resumes
    /// with `Range` when the connection breaks.
    pub fn open_resuming(
        &self,
        relative: &str,
        start: u64,
        len: u64,
        retries: u32,
    ) -> Result<Resuming<'_>, FetchError> {
        let inner = self.open_at(relative, start)?;
        Ok(Resuming {
            source: self,
            relative: relative.to_owned(),
            len,
            offset: start,
            inner,
            retries_left: retries,
            resumes: 0,
        })
    }
}

/// A download that resumes from where it broke off.
pub struct Resuming<'a> {
    source: &'a Source,
    relative: String,
    len: u64,
    offset: u64,
    inner: Box<dyn Read + Send>,
    retries_left: u32,
    /// How many times the download was resumed.
    pub resumes: u32,
}

impl std::fmt::Debug for Resuming<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Resuming({} at {}/{})",
            self.relative, self.offset, self.len
        )
    }
}

impl Read for Resuming<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Never read beyond the announced length: a longer file is caught by the size check.
        loop {
            let result = self.inner.read(buf);
            match result {
                Ok(0) if self.offset < self.len => {
                    self.reconnect(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed early",
                    ))?;
                }
                Ok(n) => {
                    self.offset += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A stalled or slow server is not asked again at once: the next check resumes.
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(self.located(e));
                }
                Err(e) => self.reconnect(e)?,
            }
        }
    }
}

impl Resuming<'_> {
    /// `error`, naming the file and the byte it happened at.
    fn located(&self, error: io::Error) -> io::Error {
        io::Error::new(
            error.kind(),
            format!(
                "{} at byte {}: {error}",
                self.source.describe(&self.relative),
                self.offset
            ),
        )
    }

    fn reconnect(&mut self, error: io::Error) -> io::Result<()> {
        if self.retries_left == 0 {
            return Err(self.located(error));
        }
        self.retries_left -= 1;
        self.resumes += 1;
        std::thread::sleep(Duration::from_millis(200));
        self.inner = self
            .source
            .open_at(&self.relative, self.offset)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(())
    }
}

/// A body reader that fails when the transfer stalls or trickles (see [`Pace`]). A stall is
/// caught by the socket's read timeout, set to `pace.stall`; the rate over each window here.
struct Paced<R> {
    inner: R,
    pace: Pace,
    window_start: Instant,
    window_bytes: u64,
}

impl<R> Paced<R> {
    fn new(inner: R, pace: Pace) -> Paced<R> {
        Paced {
            inner,
            pace,
            window_start: Instant::now(),
            window_bytes: 0,
        }
    }
}

impl<R: Read> Read for Paced<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the transfer stalled: no data for {} s",
                        self.pace.stall.as_secs_f64()
                    ),
                ))
            }
            Err(e) => return Err(e),
        };
        self.window_bytes += n as u64;
        let elapsed = self.window_start.elapsed();
        if elapsed >= self.pace.window {
            if self.window_bytes < self.pace.min_bytes {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the transfer is too slow: {} bytes in {:.0} s, less than the minimum of {} bytes per {} s",
                        self.window_bytes,
                        elapsed.as_secs_f64(),
                        self.pace.min_bytes,
                        self.pace.window.as_secs_f64()
                    ),
                ));
            }
            self.window_start = Instant::now();
            self.window_bytes = 0;
        }
        Ok(n)
    }
}

/// A connection to a server: plain TCP or TLS over it.
enum Conn {
    Plain(TcpStream),
    Tls(TlsStream),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// Connects to `url`'s server (TLS for `https://`, its certificate checked), with the read
/// timeout of `client`'s pace.
fn connect(client: &Client, url: &HttpUrl) -> Result<Conn, FetchError> {
    let what = url.to_string();
    let io_err = |error: io::Error| FetchError::Io {
        what: what.clone(),
        error,
    };
    let addr = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(io_err)?
        .next()
        .ok_or_else(|| FetchError::Protocol(format!("{what}: host has no address")))?;
    let stream = TcpStream::connect_timeout(&addr, client.connect_timeout).map_err(io_err)?;
    stream
        .set_read_timeout(Some(client.pace.stall))
        .map_err(io_err)?;
    stream
        .set_write_timeout(Some(client.connect_timeout))
        .map_err(io_err)?;
    match url.scheme {
        Scheme::Http => Ok(Conn::Plain(stream)),
        Scheme::Https => match client.tls(&what)?.connect(&url.host, stream) {
            Ok(stream) => Ok(Conn::Tls(stream)),
            Err(TlsError::Untrusted(reason)) => {
                Err(FetchError::Untrusted(format!("{what}: {reason}")))
            }
            Err(TlsError::Io(error)) => Err(io_err(error)),
            Err(TlsError::Other(reason)) => Err(FetchError::Protocol(format!("{what}: {reason}"))),
        },
    }
}

/// One `POST` of `body` with `headers` to `url`, `Connection: close`; returns the status and the
/// body (at most [`SMALL_FILE_LIMIT`] bytes), for small API calls like FleetLock's.
pub fn http_post(
    client: &Client,
    url: &HttpUrl,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, String)> {
    let reply = http_request(client, "POST", url, headers, body, SMALL_FILE_LIMIT)?;
    Ok((
        reply.status,
        String::from_utf8_lossy(&reply.body).into_owned(),
    ))
}

/// One request `method` with `headers` and `body` to `url`, `Connection: close`, no redirects
/// followed; returns the whole answer, its body at most `limit` bytes. A `Content-Length` is sent
/// unless the request is a `GET` without a body. `Io` errors are the ones worth retrying (no
/// connection, a timeout); `Protocol` ones are answers this client refuses (e.g. too large).
pub fn http_request(
    client: &Client,
    method: &str,
    url: &HttpUrl,
    headers: &[(&str, &str)],
    body: &[u8],
    limit: u64,
) -> Result<http::Response, FetchError> {
    let what = format!("{method} {url}");
    let io_err = |error: io::Error| FetchError::Io {
        what: what.clone(),
        error,
    };
    let mut conn = connect(client, url)?;
    let host = url.authority();
    let length = body.len().to_string();
    let mut fields = vec![
        ("Host", host.as_str()),
        ("User-Agent", "plinth"),
        ("Connection", "close"),
    ];
    if method != "GET" || !body.is_empty() {
        fields.push(("Content-Length", length.as_str()));
    }
    fields.extend_from_slice(headers);
    http::write_head(&mut conn, method, &url.path, &fields)
        .and_then(|()| conn.write_all(body))
        .and_then(|()| conn.flush())
        .map_err(io_err)?;
    // With a length, read just that (the server may keep the connection open); else to the end.
    let mut reader = BufReader::new(Paced::new(conn, client.pace));
    http::read_response(&mut reader, method == "HEAD", limit).map_err(|error| {
        if error.kind() == io::ErrorKind::InvalidData {
            FetchError::Protocol(format!("{what}: {error}"))
        } else {
            io_err(error)
        }
    })
}

fn http_get(
    client: &Client,
    url: &HttpUrl,
    offset: u64,
    redirects_left: u32,
) -> Result<Box<dyn Read + Send>, FetchError> {
    let what = url.to_string();
    let io_err = |error: io::Error| FetchError::Io {
        what: what.clone(),
        error,
    };
    let mut conn = connect(client, url)?;
    let host = url.authority();
    let range = format!("bytes={offset}-");
    let mut fields = vec![
        ("Host", host.as_str()),
        ("User-Agent", "plinth-update"),
        ("Accept-Encoding", "identity"),
        ("Connection", "close"),
    ];
    if offset > 0 {
        fields.push(("Range", range.as_str()));
    }
    http::write_head(&mut conn, "GET", &url.path, &fields)
        .and_then(|()| conn.flush())
        .map_err(io_err)?;
    let mut reader = BufReader::new(Paced::new(conn, client.pace));
    let head = http::read_head(&mut reader).map_err(|error| {
        if error.kind() == io::ErrorKind::InvalidData {
            FetchError::Protocol(format!("{what}: {error}"))
        } else {
            io_err(error)
        }
    })?;
    let status = head.status;
    let range_start = head
        .header("content-range")
        .and_then(|r| r.strip_prefix("bytes "))
        .and_then(|r| r.split_once('-'))
        .and_then(|(s, _)| s.parse::<u64>().ok());
    match status {
        200 | 206 => {}
        301 | 302 | 303 | 307 | 308 => {
            if redirects_left == 0 {
                return Err(FetchError::Protocol(format!(
                    "{what}: more than {MAX_REDIRECTS} redirects"
                )));
            }
            let location = head.header("location").ok_or_else(|| {
                FetchError::Protocol(format!("{what}: redirect without Location"))
            })?;
            let next = url
                .redirect(location)
                .map_err(|e| FetchError::Protocol(format!("{what}: {e}")))?;
            return http_get(client, &next, offset, redirects_left - 1);
        }
        404 | 410 => return Err(FetchError::NotFound(what)),
        other => return Err(FetchError::Protocol(format!("{what}: HTTP status {other}"))),
    }
    let mut body: Box<dyn Read + Send> = Box::new(
        Body::new(reader, &head, false)
            .map_err(|error| FetchError::Protocol(format!("{what}: {error}")))?,
    );
    if offset > 0 {
        match (status, range_start) {
            (206, Some(start)) if start == offset => {}
            (206, _) => {
                return Err(FetchError::Protocol(format!(
                    "{what}: server answered a different range"
                )))
            }
            // The server ignored Range: skip what we already have.
            _ => {
                io::copy(&mut (&mut body).take(offset), &mut io::sink()).map_err(io_err)?;
            }
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    #[test]
    fn a_connection_error_is_named_once() {
        // Nothing listens on this port once the listener is gone.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let source = Source::parse(&format!("http://127.0.0.1:{port}/releases")).expect("url");
        let error = source.get("stable/manifest.json").expect_err("refused");
        let text = format!(
            "{:#}",
            anyhow::Error::from(error).context("fetching the manifest")
        );
        assert_eq!(text.matches("os error").count(), 1, "{text}");
        assert!(text.contains("127.0.0.1"), "{text}");
    }

    #[test]
    fn a_post_reply_is_read_to_its_length_on_a_connection_left_open() {
        // Like a host service behind QEMU's guestfwd, the server never closes the connection.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = HttpUrl::parse(&format!(
            "http://{}/v1/x",
            listener.local_addr().expect("addr")
        ))
        .expect("url");
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            (&stream)
                .write_all(b"HTTP/1.1 409 Conflict\r\nContent-Length: 4\r\n\r\nfull")
                .expect("reply");
            let _ = finished.recv();
        });
        let (status, body) = http_post(
            &Client::default(),
            &url,
            &[("fleet-lock-protocol", "true")],
            b"",
        )
        .expect("post");
        assert_eq!((status, body.as_str()), (409, "full"));
        drop(done);
        server.join().expect("server");
    }

    #[test]
    fn urls_parse() {
        let url = HttpUrl::parse("http://127.0.0.1:8080/releases").expect("parses");
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str()),
            ("127.0.0.1", 8080, "/releases")
        );
        assert_eq!(
            url.join("stable/manifest.json").path,
            "/releases/stable/manifest.json"
        );
        assert_eq!(HttpUrl::parse("http://h").expect("parses").path, "/");
        assert!(HttpUrl::parse("http://h:x/").is_err());
        assert_eq!(
            Source::parse("file:///srv/r").expect("parses"),
            Source::Dir(PathBuf::from("/srv/r"))
        );
        assert!(Source::parse("ftp://h/").is_err());
        // Scheme, host (without brackets), port, path; the Host header and the display form.
        for (text, scheme, host, port, path, authority) in [
            ("http://h", Scheme::Http, "h", 80, "/", "h:80"),
            ("https://h/r", Scheme::Https, "h", 443, "/r", "h:443"),
            (
                "http://[::1]:8080/path",
                Scheme::Http,
                "::1",
                8080,
                "/path",
                "[::1]:8080",
            ),
            (
                "https://[fd00::1]/",
                Scheme::Https,
                "fd00::1",
                443,
                "/",
                "[fd00::1]:443",
            ),
            ("http://[::1]", Scheme::Http, "::1", 80, "/", "[::1]:80"),
        ] {
            let url = HttpUrl::parse(text).expect(text);
            assert_eq!(
                (url.scheme, url.host.as_str(), url.port, url.path.as_str()),
                (scheme, host, port, path),
                "{text}"
            );
            assert_eq!(url.authority(), authority, "{text}");
            assert_eq!(
                HttpUrl::parse(&url.to_string()).expect("round trip"),
                url,
                "{text}"
            );
        }
        for (text, want) in [
            ("http://[::1", "has no closing `]`"),
            ("http://[::1/x", "has no closing `]`"),
            ("http://::1/", "must be written in brackets"),
            ("http://fd00::1:80/", "must be written in brackets"),
            ("http://[nope]/", "`nope` is not an IPv6 address"),
            ("http://[::1]x/", "expected `:port` or `/` after `[::1]`"),
            ("http://[::1]:/", "port `` is not a number"),
            ("http://h:0/", "port `0` is not a number"),
            ("http://h:70000/", "port `70000`"),
            ("http://user@h/", "user names and passwords"),
            ("http:///x", "has no host"),
            ("ftp://h/", "only http://, https:// and file://"),
        ] {
            let err = format!("{:#}", HttpUrl::parse(text).expect_err(text));
            assert!(err.contains(want) && err.contains(text), "{text}: {err}");
        }
    }

    #[test]
    fn redirects_keep_the_scheme_or_go_up_to_https() {
        let plain = HttpUrl::parse("http://h/a").expect("url");
        let secure = HttpUrl::parse("https://h/a").expect("url");
        assert_eq!(
            plain.redirect("/b").expect("path").to_string(),
            "http://h:80/b"
        );
        assert_eq!(
            plain.redirect("https://m/b").expect("upgrade").to_string(),
            "https://m:443/b"
        );
        assert_eq!(
            secure.redirect("/b").expect("path").to_string(),
            "https://h:443/b"
        );
        let err = secure.redirect("http://m/b").expect_err("downgrade");
        assert!(err.contains("leaves https for plain http"), "{err}");
        assert!(plain.redirect("ftp://m/b").is_err());
        assert!(plain.redirect("//m/b").is_err());
    }

    /// A server on 127.0.0.1 that answers each connection with the next of `answers`.
    fn serve_raw(answers: Vec<Vec<u8>>) -> (String, std::thread::JoinHandle<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let server = std::thread::spawn(move || {
            for answer in answers {
                let Ok((stream, _)) = listener.accept() else {
                    return;
                };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let _ = (&stream).write_all(&answer);
                // Hold the connection open a while, as a keep-alive server would.
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        (base, server)
    }

    #[test]
    fn too_many_redirects_are_an_error_naming_the_limit() {
        let answers = (0..=MAX_REDIRECTS)
            .map(|i| {
                format!("HTTP/1.1 302 Found\r\nLocation: /r{i}\r\nContent-Length: 0\r\n\r\n")
                    .into_bytes()
            })
            .collect();
        let (base, server) = serve_raw(answers);
        let source = Source::parse(&base).expect("url");
        let err = source.get("start").expect_err("loops");
        assert!(
            err.to_string()
                .contains(&format!("more than {MAX_REDIRECTS} redirects")),
            "{err}"
        );
        server.join().expect("server");
    }

    #[test]
    fn a_manifest_over_the_size_limit_is_refused() {
        let big = SMALL_FILE_LIMIT + 1;
        let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {big}\r\n\r\n").into_bytes();
        answer.resize(answer.len() + big as usize, b'x');
        let (base, server) = serve_raw(vec![answer]);
        let err = Source::parse(&base)
            .expect("url")
            .get("stable/manifest.json")
            .expect_err("too large");
        assert!(
            err.to_string().contains(&format!(
                "larger than the limit of {SMALL_FILE_LIMIT} bytes"
            )),
            "{err}"
        );
        server.join().expect("server");
    }

    /// A server that sends a head announcing 1 MiB, then `first` bytes, then a byte every `gap`.
    fn trickle(first: usize, gap: Duration) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        std::thread::spawn(move || {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut out = &stream;
            let _ = out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n");
            let _ = out.write_all(&vec![b'x'; first]);
            for _ in 0..100 {
                std::thread::sleep(gap);
                if out.write_all(b"x").is_err() {
                    return;
                }
            }
        });
        base
    }

    fn read_with(base: &str, pace: Pace) -> (io::Error, u64, Duration) {
        let client = Client::new(None, pace);
        let source = Source::parse_with(base, client).expect("url");
        let started = Instant::now();
        let mut reader = source.open_resuming("a", 0, 1 << 20, 3).expect("opens");
        let mut got = Vec::new();
        let err = reader.read_to_end(&mut got).expect_err("fails");
        (err, got.len() as u64, started.elapsed())
    }

    #[test]
    fn a_stalled_transfer_fails_naming_the_stall() {
        let pace = Pace {
            stall: Duration::from_millis(300),
            window: Duration::from_secs(60),
            min_bytes: 1,
        };
        // 5000 bytes, then a byte every 2 s: the first gap is a stall.
        let (err, got, took) = read_with(&trickle(5000, Duration::from_secs(2)), pace);
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            err.to_string().contains("stalled: no data for 0.3 s")
                && err.to_string().contains("at byte 5000"),
            "{err}"
        );
        assert_eq!(got, 5000);
        assert!(took < Duration::from_secs(2), "not retried: {took:?}");
    }

    #[test]
    fn a_trickling_transfer_fails_naming_the_rate() {
        let pace = Pace {
            stall: Duration::from_secs(5),
            window: Duration::from_millis(400),
            min_bytes: 1000,
        };
        // A byte every 20 ms: never a stall, always too slow.
        let (err, got, _) = read_with(&trickle(10, Duration::from_millis(20)), pace);
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            err.to_string().contains("too slow")
                && err
                    .to_string()
                    .contains("less than the minimum of 1000 bytes per 0.4 s"),
            "{err}"
        );
        assert!(got < 1000, "{got}");
        // At a good rate the same pace holds.
        let pace = Pace {
            min_bytes: 5,
            ..pace
        };
        let (err, got, _) = read_with(&trickle(10, Duration::from_millis(20)), pace);
        assert!(got > 15, "{got} bytes: {err}");
    }

    #[test]
    fn https_without_trust_or_with_another_ca_is_refused_as_untrusted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (config, _) = test_tls::server_config(&["127.0.0.1"]);
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let Ok((stream, _)) = listener.accept() else {
                    return;
                };
                let _ = test_tls::serve_one(&config, stream, b"unused");
            }
        });
        let url = format!("https://127.0.0.1:{port}/r");
        let err = Source::parse(&url)
            .expect("url")
            .get("m")
            .expect_err("no trust");
        assert!(
            matches!(err, FetchError::Untrusted(_))
                && err.to_string().contains("no CA certificates"),
            "{err}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, other_ca) = test_tls::server_config(&["127.0.0.1"]);
        let ca = dir.path().join("other-ca.pem");
        fs::write(&ca, other_ca).expect("ca");
        let trust = Trust {
            bundle: dir.path().join("missing.crt"),
            update_ca: Some(ca),
        };
        let err = Source::parse_with(&url, Client::new(Some(trust), PACE))
            .expect("url")
            .get("m")
            .expect_err("another CA");
        let text = err.to_string();
        assert!(matches!(err, FetchError::Untrusted(_)), "{text}");
        assert!(
            text.contains("the server's TLS certificate is not trusted")
                && text.contains("other-ca.pem ([update] ca)"),
            "{text}"
        );
        server.join().expect("server");
    }

    #[test]
    fn a_post_goes_over_https_too() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (config, ca_pem) = test_tls::server_config(&["127.0.0.1"]);
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        fs::write(&ca, ca_pem).expect("ca");
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            test_tls::serve_one(&config, stream, b"granted").expect("serves")
        });
        let trust = Trust {
            bundle: dir.path().join("missing.crt"),
            update_ca: Some(ca),
        };
        let url = HttpUrl::parse(&format!("https://127.0.0.1:{port}/v1/pre-reboot")).expect("url");
        let (status, body) = http_post(
            &Client::new(Some(trust), PACE),
            &url,
            &[("fleet-lock-protocol", "true")],
            b"{}",
        )
        .expect("post");
        assert_eq!((status, body.as_str()), (200, "granted"));
        let request = server.join().expect("server");
        assert!(
            request.starts_with("POST /v1/pre-reboot HTTP/1.1\r\n")
                && request.contains("fleet-lock-protocol: true\r\n"),
            "{request}"
        );
    }

    #[test]
    fn https_downloads_are_checked_against_the_update_ca_over_ipv4_and_ipv6() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (bind, host) in [("127.0.0.1:0", "127.0.0.1"), ("[::1]:0", "[::1]")] {
            let Ok(listener) = std::net::TcpListener::bind(bind) else {
                eprintln!("skipping {bind}: cannot bind");
                continue;
            };
            let port = listener.local_addr().expect("addr").port();
            let name = host.trim_start_matches('[').trim_end_matches(']');
            let (config, ca_pem) = test_tls::server_config(&[name]);
            let ca = dir.path().join("ca.pem");
            fs::write(&ca, ca_pem).expect("ca");
            let server = std::thread::spawn(move || {
                let (stream, _) = listener.accept().expect("accept");
                test_tls::serve_one(&config, stream, b"signed manifest bytes").expect("serves")
            });
            let trust = Trust {
                bundle: dir.path().join("missing.crt"),
                update_ca: Some(ca),
            };
            let source = Source::parse_with(
                &format!("https://{host}:{port}/releases"),
                Client::new(Some(trust), PACE),
            )
            .expect("url");
            assert_eq!(
                source.get("stable/manifest.json").expect("downloads"),
                b"signed manifest bytes"
            );
            let request = server.join().expect("server");
            assert!(
                request.starts_with("GET /releases/stable/manifest.json HTTP/1.1\r\n")
                    && request.contains(&format!("Host: {host}:{port}\r\n")),
                "{request}"
            );
        }
    }
}

/// A TLS server for tests: a CA made at test time and a certificate it signs.
#[cfg(test)]
pub(crate) mod test_tls {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpStream;
    use std::sync::Arc;

    /// A server configuration whose certificate names `names` (host names or IP addresses),
    /// and the PEM of the CA that signed it.
    pub fn server_config(names: &[&str]) -> (Arc<rustls::ServerConfig>, String) {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("params");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("cert");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        (Arc::new(config), ca.pem())
    }

    /// Answers one request on `stream` with `body`; returns the request head.
    pub fn serve_one(
        config: &Arc<rustls::ServerConfig>,
        stream: TcpStream,
        body: &[u8],
    ) -> std::io::Result<String> {
        let conn =
            rustls::ServerConnection::new(Arc::clone(config)).map_err(std::io::Error::other)?;
        let mut tls = rustls::StreamOwned::new(conn, stream);
        let mut head = String::new();
        {
            let mut reader = BufReader::new(&mut tls);
            let mut line = String::new();
            while reader.read_line(&mut line)? > 0 && line != "\r\n" {
                head.push_str(&line);
                line.clear();
            }
        }
        write!(
            tls,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )?;
        tls.write_all(body)?;
        tls.flush()?;
        // Read on (a request body, the client's close_notify) until the client is done: closing
        // with unread bytes would reset the connection under the client's feet.
        let _ = std::io::copy(&mut tls, &mut std::io::sink());
        Ok(head)
    }
}
