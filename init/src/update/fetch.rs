//! Where releases come from: a minimal HTTP/1.1 GET client over `TcpStream` (with `Range` to resume
//! an interrupted download) or a local folder (`file://` URLs and `--from DIR`).

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Largest manifest or signature accepted.
pub const SMALL_FILE_LIMIT: u64 = 1 << 20;
/// Network timeout for connecting and for each read.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A release folder: an HTTP base URL or a local folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Http(HttpUrl),
    Dir(PathBuf),
}

/// A parsed `http://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    /// Path, always starting with `/`.
    pub path: String,
}

impl HttpUrl {
    /// Parses an `http://` URL (`https://` is not supported by this client).
    pub fn parse(url: &str) -> Result<HttpUrl> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("URL `{url}`: only http:// and file:// URLs are supported");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse()
                    .with_context(|| format!("URL `{url}`: port `{p}` is not a number"))?,
            ),
            None => (authority, 80),
        };
        if host.is_empty() {
            bail!("URL `{url}` has no host");
        }
        Ok(HttpUrl {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    fn join(&self, relative: &str) -> HttpUrl {
        let base = self.path.trim_end_matches('/');
        HttpUrl {
            path: format!("{base}/{}", relative.trim_start_matches('/')),
            ..self.clone()
        }
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}:{}{}", self.host, self.port, self.path)
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
}

impl Source {
    /// `http://…`, `file:///…` or a plain folder path.
    pub fn parse(url: &str) -> Result<Source> {
        if let Some(path) = url.strip_prefix("file://") {
            Ok(Source::Dir(PathBuf::from(path)))
        } else if url.starts_with("http://") {
            Ok(Source::Http(HttpUrl::parse(url)?))
        } else if url.contains("://") {
            bail!("URL `{url}`: only http:// and file:// URLs are supported");
        } else {
            Ok(Source::Dir(PathBuf::from(url)))
        }
    }

    /// Where `relative` lives, for messages.
    pub fn describe(&self, relative: &str) -> String {
        match self {
            Source::Http(url) => url.join(relative).to_string(),
            Source::Dir(dir) => dir.join(relative).display().to_string(),
        }
    }

    /// Reads a small file (manifest, signature) whole.
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
                "{} is larger than {SMALL_FILE_LIMIT} bytes",
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
            Source::Http(base) => http_get(&base.join(relative), offset, 5),
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
                Err(e) => self.reconnect(e)?,
            }
        }
    }
}

impl Resuming<'_> {
    fn reconnect(&mut self, error: io::Error) -> io::Result<()> {
        if self.retries_left == 0 {
            return Err(io::Error::new(
                error.kind(),
                format!(
                    "{} at byte {}: {error}",
                    self.source.describe(&self.relative),
                    self.offset
                ),
            ));
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

/// One `POST` of `body` with `headers` to `url`, `Connection: close`; returns the status and the
/// body (at most [`SMALL_FILE_LIMIT`] bytes), for small API calls like FleetLock's.
pub fn http_post(url: &HttpUrl, headers: &[(&str, &str)], body: &[u8]) -> Result<(u16, String)> {
    let what = url.to_string();
    let addr = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {what}"))?
        .next()
        .with_context(|| format!("{what}: host has no address"))?;
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .with_context(|| format!("connecting to {what}"))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut request = format!(
        "POST {} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: plinth-update\r\nConnection: close\r\nContent-Length: {}\r\n",
        url.path,
        url.host,
        url.port,
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    (&stream)
        .write_all(request.as_bytes())
        .and_then(|()| (&stream).write_all(body))
        .with_context(|| format!("sending to {what}"))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .with_context(|| format!("reading the reply of {what}"))?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{what}: malformed reply `{}`", line.trim()))?;
    let mut length = None;
    loop {
        line.clear();
        reader
            .read_line(&mut line)
            .with_context(|| format!("reading the reply of {what}"))?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<u64>().ok();
            }
        }
    }
    // With a length, read just that (the server may keep the connection open); else to the end.
    let mut body = Vec::new();
    reader
        .take(length.unwrap_or(SMALL_FILE_LIMIT).min(SMALL_FILE_LIMIT))
        .read_to_end(&mut body)
        .with_context(|| format!("reading the reply of {what}"))?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn http_get(
    url: &HttpUrl,
    offset: u64,
    redirects_left: u32,
) -> Result<Box<dyn Read + Send>, FetchError> {
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
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(io_err)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
    let mut request = format!(
        "GET {} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: plinth-update\r\nAccept-Encoding: identity\r\nConnection: close\r\n",
        url.path, url.host, url.port
    );
    if offset > 0 {
        request.push_str(&format!("Range: bytes={offset}-\r\n"));
    }
    request.push_str("\r\n");
    (&stream).write_all(request.as_bytes()).map_err(io_err)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(io_err)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            FetchError::Protocol(format!("{what}: malformed status line `{}`", line.trim()))
        })?;
    let mut content_length = None;
    let mut chunked = false;
    let mut location = None;
    let mut range_start = None;
    loop {
        line.clear();
        reader.read_line(&mut line).map_err(io_err)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => content_length = value.parse::<u64>().ok(),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "location" => location = Some(value.to_owned()),
            "content-range" => {
                range_start = value
                    .strip_prefix("bytes ")
                    .and_then(|r| r.split_once('-'))
                    .and_then(|(s, _)| s.parse::<u64>().ok())
            }
            _ => {}
        }
    }
    match status {
        200 | 206 => {}
        301 | 302 | 303 | 307 | 308 if redirects_left > 0 => {
            let location = location.ok_or_else(|| {
                FetchError::Protocol(format!("{what}: redirect without Location"))
            })?;
            let next = if location.starts_with("http://") {
                HttpUrl::parse(&location).map_err(|e| FetchError::Protocol(e.to_string()))?
            } else {
                HttpUrl {
                    path: location,
                    ..url.clone()
                }
            };
            return http_get(&next, offset, redirects_left - 1);
        }
        404 | 410 => return Err(FetchError::NotFound(what)),
        other => return Err(FetchError::Protocol(format!("{what}: HTTP status {other}"))),
    }
    let body: Box<dyn Read + Send> = if chunked {
        Box::new(Chunked {
            inner: reader,
            left: 0,
            done: false,
        })
    } else if let Some(len) = content_length {
        Box::new(Exact {
            inner: reader.take(len),
            left: len,
        })
    } else {
        Box::new(reader)
    };
    let mut body = body;
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

/// A body with a Content-Length: ending early is an error, not end of file.
struct Exact<R> {
    inner: io::Take<R>,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the end of the body",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A `Transfer-Encoding: chunked` body.
struct Chunked<R> {
    inner: R,
    left: u64,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.inner.read_line(&mut line)?;
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = u64::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size `{}`", line.trim()),
                )
            })?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let want = (buf.len() as u64).min(self.left) as usize;
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a chunk",
            ));
        }
        self.left -= n as u64;
        if self.left == 0 {
            let mut crlf = String::new();
            self.inner.read_line(&mut crlf)?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let (status, body) =
            http_post(&url, &[("fleet-lock-protocol", "true")], b"").expect("post");
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
        assert!(HttpUrl::parse("https://h/").is_err());
        assert!(HttpUrl::parse("http://h:x/").is_err());
        assert_eq!(
            Source::parse("file:///srv/r").expect("parses"),
            Source::Dir(PathBuf::from("/srv/r"))
        );
        assert!(Source::parse("ftp://h/").is_err());
    }

    #[test]
    fn chunked_bodies_decode() {
        let body = b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\n\r\n";
        let mut reader = Chunked {
            inner: &body[..],
            left: 0,
            done: false,
        };
        let mut out = String::new();
        reader.read_to_string(&mut out).expect("decodes");
        assert_eq!(out, "Wikipedia");
    }
}
