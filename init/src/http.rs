//! The one HTTP/1.1 client on the target, used by the engine client ([`crate::stage2::docker`], over a
//! unix socket) and the update agent ([`crate::update::fetch`], over TCP or TLS).
//!
//! It is generic over the stream: the caller connects, sets timeouts, writes a request head with
//! [`write_head`], then reads the answer with [`read_response`] (whole, bounded) or [`read_head`]
//! and [`Body`] (streamed). Response heads are parsed by `httparse`. What an untrusted peer sends
//! is bounded: a header line by [`MAX_LINE`], the header count by [`MAX_HEADERS`], a whole head
//! (or trailer) by [`MAX_HEAD_BYTES`], a whole body by the limit the caller passes.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Read, Write};

/// Longest status, header, chunk-size or trailer line accepted, in bytes.
pub const MAX_LINE: usize = 64 * 1024;

/// Most header fields (or trailer fields) accepted in one response.
pub const MAX_HEADERS: usize = 64;

/// Largest response head (status line and header fields), or trailer, accepted, in bytes.
pub const MAX_HEAD_BYTES: usize = 128 * 1024;

/// A response's status and header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Header fields with lowercased names; of a repeated field the last value wins.
    pub headers: BTreeMap<String, String>,
}

impl Head {
    /// The value of header field `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A response read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Header fields with lowercased names.
    pub headers: BTreeMap<String, String>,
    /// The body with any chunked transfer coding removed.
    pub body: Vec<u8>,
}

/// An `InvalidData` error: the peer's bytes are not the HTTP this client accepts.
fn invalid(detail: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, detail.into())
}

/// Writes a request head: the request line, then `headers` in order, then the empty line. A
/// target or header containing CR or LF is refused, so no caller can split a request.
pub fn write_head<W: Write>(
    writer: &mut W,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> io::Result<()> {
    let bad = |s: &str| s.bytes().any(|b| b == b'\r' || b == b'\n');
    if bad(method) || bad(target) || headers.iter().any(|(n, v)| bad(n) || bad(v)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("request {method} {target:?} has a line break in its head"),
        ));
    }
    let mut head = format!("{method} {target} HTTP/1.1\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    writer.write_all(head.as_bytes())
}

/// Reads a CRLF- (or LF-) terminated line, terminator included, of at most [`MAX_LINE`] bytes;
/// EOF before the terminator is an error.
fn read_raw_line<R: BufRead>(reader: &mut R, out: &mut Vec<u8>) -> io::Result<()> {
    let start = out.len();
    let limit = MAX_LINE as u64 + 1;
    reader.take(limit).read_until(b'\n', out)?;
    if out.last() != Some(&b'\n') {
        if out.len() - start > MAX_LINE {
            return Err(invalid(format!(
                "a line is longer than the limit of {MAX_LINE} bytes"
            )));
        }
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed in the middle of a line",
        ));
    }
    Ok(())
}

/// Reads one line without its terminator, at most [`MAX_LINE`] bytes, as UTF-8.
pub fn read_line<R: BufRead>(reader: &mut R) -> io::Result<String> {
    let mut line = Vec::new();
    read_raw_line(reader, &mut line)?;
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| invalid("a header line is not UTF-8"))
}

/// Reads header-style lines up to and including the empty line that ends them, into `raw`;
/// at most `MAX_HEADERS` lines after the first `skip` ones.
fn read_block<R: BufRead>(reader: &mut R, raw: &mut Vec<u8>, skip: usize) -> io::Result<()> {
    let mut lines = 0usize;
    loop {
        let start = raw.len();
        read_raw_line(reader, raw)?;
        let line = &raw[start..];
        if line == b"\n" || line == b"\r\n" {
            return Ok(());
        }
        if raw.len() > MAX_HEAD_BYTES {
            return Err(invalid(format!(
                "the response head is larger than the limit of {MAX_HEAD_BYTES} bytes"
            )));
        }
        lines += 1;
        if lines > skip + MAX_HEADERS {
            return Err(invalid(format!(
                "more than the limit of {MAX_HEADERS} header fields"
            )));
        }
    }
}

/// Reads and parses a response head (status line and header fields).
pub fn read_head<R: BufRead>(reader: &mut R) -> io::Result<Head> {
    let mut raw = Vec::new();
    read_block(reader, &mut raw, 1)?;
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    match response.parse(&raw) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(invalid("incomplete response head")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(invalid(format!(
                "more than the limit of {MAX_HEADERS} header fields"
            )))
        }
        Err(e) => {
            let first = raw.split(|b| *b == b'\n').next().unwrap_or_default();
            return Err(invalid(format!(
                "malformed response head ({e}) starting {:?}",
                String::from_utf8_lossy(first).trim_end()
            )));
        }
    }
    let status = response
        .code
        .ok_or_else(|| invalid("response without a status"))?;
    let mut headers = BTreeMap::new();
    for field in response.headers.iter() {
        let value = std::str::from_utf8(field.value)
            .map_err(|_| invalid(format!("header {} is not UTF-8", field.name)))?;
        headers.insert(field.name.to_ascii_lowercase(), value.trim().to_owned());
    }
    Ok(Head { status, headers })
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `Content-Length` bytes; fewer is an error.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the peer closes the connection.
    Close,
}

/// A response body, streamed: chunked coding removed, a body shorter than its `Content-Length`
/// an error rather than an early end of file.
#[derive(Debug)]
pub struct Body<R> {
    inner: R,
    framing: Framing,
    /// Bytes left of the body (`Length`) or of the current chunk (`Chunked`).
    left: u64,
    done: bool,
}

impl<R: BufRead> Body<R> {
    /// The body following `head`; `head_request` is true for an answer to `HEAD`, which has none
    /// (as do 1xx, 204 and 304 answers).
    pub fn new(inner: R, head: &Head, head_request: bool) -> io::Result<Body<R>> {
        let status = head.status;
        let no_body =
            head_request || status == 204 || status == 304 || (100..200).contains(&status);
        let framing = if no_body {
            Framing::Length(0)
        } else if head
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
        {
            Framing::Chunked
        } else if let Some(length) = head.header("content-length") {
            Framing::Length(
                length
                    .parse()
                    .map_err(|_| invalid(format!("bad Content-Length {length:?}")))?,
            )
        } else {
            Framing::Close
        };
        let left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Ok(Body {
            inner,
            framing,
            left,
            done: framing == Framing::Length(0),
        })
    }

    /// The announced length, for a body with a `Content-Length`.
    pub fn content_length(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            _ => None,
        }
    }

    /// Reads the next chunk-size line; at the last chunk, reads the trailer and ends the body.
    fn next_chunk(&mut self) -> io::Result<()> {
        let line = read_line(&mut self.inner)?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        self.left = u64::from_str_radix(size_text, 16)
            .map_err(|_| invalid(format!("bad chunk size line {line:?}")))?;
        if self.left == 0 {
            // Trailer fields, then the empty line that ends the message.
            read_block(&mut self.inner, &mut Vec::new(), 0)?;
            self.done = true;
        }
        Ok(())
    }
}

impl<R: BufRead> Read for Body<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.framing == Framing::Close {
            return self.inner.read(buf);
        }
        if self.framing == Framing::Chunked && self.left == 0 {
            self.next_chunk()?;
            if self.done {
                return Ok(0);
            }
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the end of the body",
            ));
        }
        self.left -= n as u64;
        if self.left == 0 {
            match self.framing {
                Framing::Length(_) => self.done = true,
                Framing::Chunked => {
                    if !read_line(&mut self.inner)?.is_empty() {
                        return Err(invalid("chunk not followed by CRLF"));
                    }
                }
                Framing::Close => {}
            }
        }
        Ok(n)
    }
}

/// Reads a whole response: head, then a body of at most `limit` bytes (delimited by chunked
/// coding, `Content-Length`, or the end of the connection). `head_request` is true for an answer
/// to `HEAD`.
pub fn read_response<R: BufRead>(
    reader: &mut R,
    head_request: bool,
    limit: u64,
) -> io::Result<Response> {
    let head = read_head(reader)?;
    let mut body = Body::new(reader, &head, head_request)?;
    if let Some(length) = body.content_length().filter(|n| *n > limit) {
        return Err(invalid(format!(
            "body of {length} bytes is larger than the limit of {limit} bytes"
        )));
    }
    let mut data = Vec::new();
    (&mut body).take(limit + 1).read_to_end(&mut data)?;
    if data.len() as u64 > limit {
        return Err(invalid(format!(
            "body is larger than the limit of {limit} bytes"
        )));
    }
    Ok(Response {
        status: head.status,
        headers: head.headers,
        body: data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const LIMIT: u64 = 1 << 20;

    fn parse(bytes: &[u8]) -> io::Result<Response> {
        read_response(&mut Cursor::new(bytes), false, LIMIT)
    }

    #[test]
    fn content_length_body() {
        let r = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nOKtrailing",
        )
        .expect("parses");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"OK");
        assert_eq!(r.headers["content-type"], "text/plain");
    }

    #[test]
    fn chunked_body_with_extension_and_trailer() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let r = parse(raw).expect("parses");
        assert_eq!(r.body, b"hello, world");
        let body = b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\n\r\n";
        let head = Head {
            status: 200,
            headers: [("transfer-encoding".to_owned(), "chunked".to_owned())].into(),
        };
        let mut reader = Body::new(&body[..], &head, false).expect("body");
        let mut out = String::new();
        reader.read_to_string(&mut out).expect("decodes");
        assert_eq!(out, "Wikipedia");
    }

    #[test]
    fn body_until_close_and_no_body_statuses() {
        let r = parse(b"HTTP/1.0 200 OK\r\n\r\n[1,2]").expect("parses");
        assert_eq!(r.body, b"[1,2]");
        let r = parse(b"HTTP/1.1 204 No Content\r\n\r\n").expect("parses");
        assert_eq!((r.status, r.body.len()), (204, 0));
        let r = parse(b"HTTP/1.1 304 Not Modified\r\n\r\n").expect("parses");
        assert_eq!(r.status, 304);
        let r = read_response(
            &mut Cursor::new(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            true,
            LIMIT,
        )
        .expect("HEAD answer");
        assert!(r.body.is_empty());
    }

    #[test]
    fn malformed_responses_are_errors() {
        for raw in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
        ] {
            assert!(parse(raw).is_err(), "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn a_short_content_length_body_is_an_error_when_streamed() {
        let head = Head {
            status: 200,
            headers: [("content-length".to_owned(), "10".to_owned())].into(),
        };
        let mut body = Body::new(&b"short"[..], &head, false).expect("body");
        let err = body.read_to_end(&mut Vec::new()).expect_err("short");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_header_line_over_the_limit_is_an_error_naming_it() {
        let mut raw = b"HTTP/1.1 200 OK\r\nX-Long: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', MAX_LINE));
        raw.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
        let err = parse(&raw).expect_err("too long");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(&MAX_LINE.to_string()), "{err}");
        // A chunk-size line is bounded the same way.
        let mut raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        raw.extend(std::iter::repeat_n(b'0', MAX_LINE + 1));
        let err = parse(&raw).expect_err("too long");
        assert!(err.to_string().contains(&MAX_LINE.to_string()), "{err}");
    }

    #[test]
    fn too_many_headers_are_an_error_naming_the_limit() {
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            raw.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        let mut ok = raw.clone();
        ok.extend_from_slice(b"\r\n");
        assert_eq!(parse(&ok).expect("at the limit").headers.len(), MAX_HEADERS);
        raw.extend_from_slice(b"X-One-More: v\r\n\r\n");
        let err = parse(&raw).expect_err("too many");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(&MAX_HEADERS.to_string()), "{err}");
        // Trailer fields too.
        let mut raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            raw.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        let err = parse(&raw).expect_err("too many trailers");
        assert!(err.to_string().contains(&MAX_HEADERS.to_string()), "{err}");
    }

    #[test]
    fn a_head_over_the_size_limit_is_an_error_naming_it() {
        // Few fields, each below the line limit: `fits` of them (with the status line and one
        // more field) stay below the head limit, two more go over it.
        let field = format!("X-Big: {}\r\n", "a".repeat(MAX_LINE / 2));
        let fits = (MAX_HEAD_BYTES - 64) / field.len();
        let head = |fields: usize| {
            let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
            for _ in 0..fields {
                raw.extend_from_slice(field.as_bytes());
            }
            raw.extend_from_slice(b"Content-Length: 0\r\n\r\n");
            raw
        };
        assert!(fits + 2 <= MAX_HEADERS);
        let err = parse(&head(fits + 2)).expect_err("too large");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string().contains(&MAX_HEAD_BYTES.to_string()),
            "{err}"
        );
        let raw = head(fits);
        assert_eq!(parse(&raw).expect("fits").status, 200);
    }

    #[test]
    fn a_body_over_the_limit_is_an_error_naming_it() {
        let limit = 4;
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\nhello",
        ] {
            let err = read_response(&mut Cursor::new(raw), false, limit).expect_err("too large");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains("limit of 4 bytes"), "{err}");
        }
        let r = read_response(
            &mut Cursor::new(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nhell"),
            false,
            limit,
        )
        .expect("at the limit");
        assert_eq!(r.body, b"hell");
    }

    #[test]
    fn request_heads_are_written_in_order_and_never_split() {
        let mut out = Vec::new();
        write_head(
            &mut out,
            "GET",
            "/a?b=1",
            &[("Host", "localhost"), ("Connection", "close")],
        )
        .expect("writes");
        assert_eq!(
            out,
            b"GET /a?b=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        );
        let err = write_head(&mut Vec::new(), "GET", "/a\r\nX: y", &[]).expect_err("split");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(write_head(&mut Vec::new(), "GET", "/", &[("X", "a\nb")]).is_err());
    }
}
