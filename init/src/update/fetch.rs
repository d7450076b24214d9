//! Where releases come from: HTTP over `TcpStream` through [`crate::http`] (with `Range` to resume
//! an interrupted download, and redirects) or a local folder (`file://` URLs and `--from DIR`).

use std::fs;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::http::{self, Body};

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
    let host = format!("{}:{}", url.host, url.port);
    let length = body.len().to_string();
    let mut fields = vec![
        ("Host", host.as_str()),
        ("User-Agent", "plinth-update"),
        ("Connection", "close"),
        ("Content-Length", length.as_str()),
    ];
    fields.extend_from_slice(headers);
    let mut writer = &stream;
    http::write_head(&mut writer, "POST", &url.path, &fields)
        .and_then(|()| writer.write_all(body))
        .with_context(|| format!("sending to {what}"))?;
    // With a length, read just that (the server may keep the connection open); else to the end.
    let reply = http::read_response(&mut BufReader::new(stream), false, SMALL_FILE_LIMIT)
        .with_context(|| format!("reading the reply of {what}"))?;
    let (status, body) = (reply.status, reply.body);
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
    let host = format!("{}:{}", url.host, url.port);
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
    let mut writer = &stream;
    http::write_head(&mut writer, "GET", &url.path, &fields).map_err(io_err)?;
    let mut reader = BufReader::new(stream);
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
        301 | 302 | 303 | 307 | 308 if redirects_left > 0 => {
            let location = head.header("location").ok_or_else(|| {
                FetchError::Protocol(format!("{what}: redirect without Location"))
            })?;
            let next = if location.starts_with("http://") {
                HttpUrl::parse(location).map_err(|e| FetchError::Protocol(e.to_string()))?
            } else {
                HttpUrl {
                    path: location.to_owned(),
                    ..url.clone()
                }
            };
            return http_get(&next, offset, redirects_left - 1);
        }
        404 | 410 => return Err(FetchError::NotFound(what)),
        other => return Err(FetchError::Protocol(format!("{what}: HTTP status {other}"))),
    }
    let body: Box<dyn Read + Send> = Box::new(
        Body::new(reader, &head, false)
            .map_err(|error| FetchError::Protocol(format!("{what}: {error}")))?,
    );
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
}
