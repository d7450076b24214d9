//! `plinth run --serve DIR`: serves a release folder to the guest at [`GUEST_URL`].
//!
//! The guest's user network is `restrict=on`, so it reaches the host only through `guestfwd`
//! rules. A rule to a host port (`-tcp:127.0.0.1:PORT`) carries every guest connection over one
//! host connection, which an HTTP client opening a connection per request cannot share. The rule
//! from [`guest_forward`] is the `-cmd:` form instead: QEMU starts `plinth serve-connection DIR`
//! for each connection the guest opens, with that connection as its standard input and output,
//! and [`serve_connection`] answers HTTP/1.1 `GET` and `HEAD` requests on it from the files
//! under DIR. Nothing listens on the host.

use std::fs::File;
use std::io::{self, BufRead, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Address and port the guest connects to.
pub const GUEST_ADDR: &str = "10.0.2.100:8000";
/// The `[update] url` of an image whose releases `plinth run --serve` serves.
pub const GUEST_URL: &str = "http://10.0.2.100:8000";

/// Longest request head (request line and headers) accepted.
const HEAD_LIMIT: u64 = 16 * 1024;

/// The `guestfwd=` rule that runs `program` (this `plinth`) as `plinth serve-connection DIR` for
/// each guest connection to [`GUEST_ADDR`]. QEMU splits the command into words like a shell
/// (`g_shell_parse_argv`), so each path is single-quoted; [`crate::qemu::qemu_command`] doubles
/// the commas of every `-netdev` value.
pub fn guest_forward(program: &Path, dir: &Path) -> Result<String> {
    Ok(format!(
        "tcp:{GUEST_ADDR}-cmd:{} serve-connection {}",
        shell_quote(program)?,
        shell_quote(dir)?
    ))
}

/// `path` in single quotes, each `'` in it written as `'\''`.
fn shell_quote(path: &Path) -> Result<String> {
    let Some(text) = path.to_str() else {
        bail!(
            "{} is not valid UTF-8, which QEMU's command rule cannot carry",
            path.display()
        );
    };
    Ok(format!("'{}'", text.replace('\'', r"'\''")))
}

/// The release folder as an absolute path (QEMU starts each `serve-connection` in its own working
/// folder), checked to exist.
pub fn release_folder(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        bail!(
            "release folder {} does not exist: write it with `plinth publish FILE --key KEY --to {}`",
            dir.display(),
            dir.display()
        );
    }
    dir.canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))
}

/// Runs the hidden `plinth serve-connection DIR` that QEMU starts for one guest connection.
pub fn serve_stdio(dir: &Path) -> Result<()> {
    // QEMU passes the connection as standard error too: an error message written there would
    // reach the guest as response bytes, so standard error goes to /dev/null.
    let null = File::options()
        .write(true)
        .open("/dev/null")
        .context("opening /dev/null")?;
    rustix::stdio::dup2_stderr(&null).context("pointing standard error at /dev/null")?;
    let output = BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    serve_connection(dir, io::stdin().lock(), output)
        .with_context(|| format!("serving {}", dir.display()))
}

/// Answers the HTTP/1.1 requests arriving on one connection (`input`, `output`) with the files
/// under `root`, until the client closes it or asks to (`Connection: close`, HTTP/1.0).
///
/// `GET` and `HEAD` only; `Range: bytes=N-` and `bytes=N-M` give `206 Partial Content`; a path
/// with `..`, a folder or a missing file gives `404 Not Found`.
pub fn serve_connection<R: BufRead, W: Write>(
    root: &Path,
    mut input: R,
    mut output: W,
) -> io::Result<()> {
    loop {
        let head = match read_head(&mut input)? {
            Head::Closed => return Ok(()),
            Head::TooLong => {
                respond_status(&mut output, 431, "Request Header Fields Too Large", true)?;
                return output.flush();
            }
            Head::Complete(head) => head,
        };
        let close = match Request::parse(&head) {
            Some(request) => {
                respond(root, &request, &mut output)?;
                request.close
            }
            None => {
                respond_status(&mut output, 400, "Bad Request", true)?;
                true
            }
        };
        output.flush()?;
        if close {
            return Ok(());
        }
    }
}

/// What [`read_head`] found.
enum Head {
    /// The client closed the connection before a whole request head.
    Closed,
    /// The head is longer than [`HEAD_LIMIT`].
    TooLong,
    /// The request line and headers, without the empty line that ends them.
    Complete(String),
}

fn read_head<R: BufRead>(input: &mut R) -> io::Result<Head> {
    let mut head = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        let left = HEAD_LIMIT.saturating_sub(head.len() as u64);
        let n = input.by_ref().take(left + 1).read_line(&mut line)?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        if n as u64 > left {
            return Ok(Head::TooLong);
        }
        if !line.ends_with('\n') {
            return Ok(Head::Closed);
        }
        let text = line.trim_end_matches(['\r', '\n']);
        if text.is_empty() {
            // Empty lines before the request line are allowed (RFC 9112, 2.2).
            if head.is_empty() {
                continue;
            }
            return Ok(Head::Complete(head));
        }
        head.push_str(text);
        head.push('\n');
    }
}

/// The parts of a request head the server acts on.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    /// The path, without query.
    path: String,
    /// The value of the `Range` header.
    range: Option<String>,
    /// The connection ends after the response.
    close: bool,
}

impl Request {
    /// Parses a head from [`read_head`]; `None` when its request line is malformed.
    fn parse(head: &str) -> Option<Request> {
        let mut lines = head.lines();
        let mut words = lines.next()?.split(' ');
        let (method, target, version) = (words.next()?, words.next()?, words.next()?);
        if words.next().is_some() || !version.starts_with("HTTP/1.") {
            return None;
        }
        let mut request = Request {
            method: method.to_owned(),
            path: target.split(['?', '#']).next().unwrap_or("").to_owned(),
            range: None,
            close: version == "HTTP/1.0",
        };
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("range") {
                request.range = Some(value.to_owned());
            } else if name.eq_ignore_ascii_case("connection") {
                request.close = value
                    .split(',')
                    .any(|token| token.trim().eq_ignore_ascii_case("close"));
            }
        }
        Some(request)
    }
}

/// The file under `root` that `path` names, or `None` when it names none: not absolute, or with
/// `..` anywhere in it (percent escapes are not decoded, so `%2e%2e` is only a strange name).
fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let relative = path.strip_prefix('/')?.trim_start_matches('/');
    if relative.is_empty() || relative.contains("..") || relative.contains('\0') {
        return None;
    }
    Some(root.join(relative))
}

/// The byte range `[start, end]` (inclusive) that `range` asks for in a file of `len` bytes:
/// `Some(Ok(..))` to send it, `Some(Err(()))` when it starts past the end, `None` to ignore the
/// header and send the whole file (forms other than `bytes=N-` and `bytes=N-M`).
fn byte_range(range: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = range.strip_prefix("bytes=")?.trim();
    let (start, end) = spec.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => u64::MAX,
        end => end.parse().ok()?,
    };
    if end < start {
        return None;
    }
    if start >= len {
        return Some(Err(()));
    }
    Some(Ok((start, end.min(len - 1))))
}

fn respond<W: Write>(root: &Path, request: &Request, output: &mut W) -> io::Result<()> {
    let head_only = match request.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            return write_head(
                output,
                "405 Method Not Allowed",
                &["Allow: GET, HEAD".to_owned()],
                0,
                request.close,
            )
        }
    };
    let file = resolve(root, &request.path).and_then(|path| {
        let file = File::open(path).ok()?;
        let meta = file.metadata().ok()?;
        meta.is_file().then_some((file, meta.len()))
    });
    let Some((mut file, len)) = file else {
        return respond_status(output, 404, "Not Found", request.close);
    };
    let (status, start, count, mut headers) =
        match request.range.as_deref().and_then(|r| byte_range(r, len)) {
            None => ("200 OK", 0, len, Vec::new()),
            Some(Ok((start, end))) => (
                "206 Partial Content",
                start,
                end - start + 1,
                vec![format!("Content-Range: bytes {start}-{end}/{len}")],
            ),
            Some(Err(())) => {
                return write_head(
                    output,
                    "416 Range Not Satisfiable",
                    &[format!("Content-Range: bytes */{len}")],
                    0,
                    request.close,
                )
            }
        };
    headers.push("Content-Type: application/octet-stream".to_owned());
    headers.push("Accept-Ranges: bytes".to_owned());
    write_head(output, status, &headers, count, request.close)?;
    if head_only {
        return Ok(());
    }
    file.seek(SeekFrom::Start(start))?;
    let sent = io::copy(&mut file.take(count), output)?;
    if sent != count {
        // The file shrank while it was sent: end the connection, so the client sees a short body.
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{} ended after {sent} of {count} bytes", request.path),
        ));
    }
    Ok(())
}

/// A response without a file: the status line, and the status as its text body.
fn respond_status<W: Write>(
    output: &mut W,
    code: u16,
    reason: &str,
    close: bool,
) -> io::Result<()> {
    let body = format!("{code} {reason}\n");
    write_head(
        output,
        &format!("{code} {reason}"),
        &["Content-Type: text/plain".to_owned()],
        body.len() as u64,
        close,
    )?;
    output.write_all(body.as_bytes())
}

fn write_head<W: Write>(
    output: &mut W,
    status: &str,
    headers: &[String],
    length: u64,
    close: bool,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nServer: plinth\r\nContent-Length: {length}\r\n");
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str(if close {
        "Connection: close\r\n\r\n"
    } else {
        "Connection: keep-alive\r\n\r\n"
    });
    output.write_all(head.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A release folder holding `stable/manifest.json`, and a file beside it that must stay out
    /// of reach.
    fn folder() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().expect("temp dir");
        let root = tmp.path().join("releases");
        std::fs::create_dir_all(root.join("stable")).expect("mkdir");
        std::fs::write(root.join("stable/manifest.json"), b"0123456789").expect("write");
        std::fs::write(tmp.path().join("secret"), b"secret").expect("write");
        (tmp, root)
    }

    /// The responses `serve_connection` writes for the bytes `requests`.
    fn exchange(root: &Path, requests: &str) -> String {
        let mut out = Vec::new();
        serve_connection(root, io::Cursor::new(requests.as_bytes()), &mut out).expect("serve");
        String::from_utf8(out).expect("utf-8")
    }

    fn get(path: &str, extra: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: 10.0.2.100:8000\r\nUser-Agent: plinth-update\r\nAccept-Encoding: identity\r\nConnection: close\r\n{extra}\r\n")
    }

    #[test]
    fn files_are_served_whole_or_from_a_range() {
        let (_tmp, root) = folder();
        let reply = exchange(&root, &get("/stable/manifest.json", ""));
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.contains("\r\nContent-Length: 10\r\n"), "{reply}");
        assert!(reply.contains("\r\nConnection: close\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\n0123456789"), "{reply}");

        let reply = exchange(&root, &get("/stable/manifest.json", "Range: bytes=4-\r\n"));
        assert!(
            reply.starts_with("HTTP/1.1 206 Partial Content\r\n"),
            "{reply}"
        );
        assert!(
            reply.contains("\r\nContent-Range: bytes 4-9/10\r\n"),
            "{reply}"
        );
        assert!(reply.contains("\r\nContent-Length: 6\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\n456789"), "{reply}");

        let reply = exchange(&root, &get("/stable/manifest.json", "range: bytes=2-3\r\n"));
        assert!(
            reply.contains("\r\nContent-Range: bytes 2-3/10\r\n"),
            "{reply}"
        );
        assert!(reply.ends_with("\r\n\r\n23"), "{reply}");

        let reply = exchange(&root, &get("/stable/manifest.json", "Range: bytes=10-\r\n"));
        assert!(
            reply.starts_with("HTTP/1.1 416 Range Not Satisfiable\r\n"),
            "{reply}"
        );
        assert!(
            reply.contains("\r\nContent-Range: bytes */10\r\n"),
            "{reply}"
        );

        let reply = exchange(&root, &get("/stable/manifest.json?x=1", ""));
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    }

    #[test]
    fn missing_files_folders_and_dot_dot_paths_are_not_found() {
        let (_tmp, root) = folder();
        for path in [
            "/stable/1.0.0/manifest.json",
            "/stable",
            "/",
            "/../secret",
            "/stable/../../secret",
            "//../secret",
            "/stable/..",
            "../secret",
        ] {
            let reply = exchange(&root, &get(path, ""));
            assert!(
                reply.starts_with("HTTP/1.1 404 Not Found\r\n"),
                "{path}: {reply}"
            );
            assert!(!reply.contains("secret"), "{path}: {reply}");
        }
    }

    #[test]
    fn requests_follow_each_other_on_a_kept_connection() {
        let (_tmp, root) = folder();
        let requests = "GET /stable/manifest.json HTTP/1.1\r\n\r\n\
             HEAD /stable/manifest.json HTTP/1.1\r\n\r\n\
             DELETE /stable/manifest.json HTTP/1.1\r\nConnection: close\r\n\r\n\
             GET /stable/manifest.json HTTP/1.1\r\n\r\n";
        let reply = exchange(&root, requests);
        // A status line follows the previous body directly.
        let statuses: Vec<&str> = reply
            .match_indices("HTTP/1.1 ")
            .filter_map(|(at, _)| reply[at..].split("\r\n").next())
            .collect();
        assert_eq!(
            statuses,
            [
                "HTTP/1.1 200 OK",
                "HTTP/1.1 200 OK",
                "HTTP/1.1 405 Method Not Allowed"
            ],
            "{reply}"
        );
        assert_eq!(
            reply.matches("0123456789").count(),
            1,
            "HEAD sends no body: {reply}"
        );
        assert!(reply.contains("\r\nAllow: GET, HEAD\r\n"), "{reply}");
    }

    #[test]
    fn malformed_or_oversized_requests_end_the_connection() {
        let (_tmp, root) = folder();
        let reply = exchange(
            &root,
            "NONSENSE\r\n\r\nGET /stable/manifest.json HTTP/1.1\r\n\r\n",
        );
        assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{reply}");
        assert!(!reply.contains("0123456789"), "{reply}");
        let long = format!(
            "GET /stable/manifest.json HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(HEAD_LIMIT as usize)
        );
        let reply = exchange(&root, &long);
        assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");
        assert_eq!(exchange(&root, ""), "");
        assert_eq!(exchange(&root, "GET /stable/manif"), "");
    }

    #[test]
    fn the_rule_quotes_paths_for_qemu_to_split() {
        let rule = guest_forward(
            Path::new("/opt/it's here/plinth"),
            Path::new("/srv/rel eases"),
        )
        .expect("utf-8");
        assert_eq!(
            rule,
            r"tcp:10.0.2.100:8000-cmd:'/opt/it'\''s here/plinth' serve-connection '/srv/rel eases'"
        );
        assert_eq!(GUEST_URL, format!("http://{GUEST_ADDR}"));
    }
}
