//! HTTP and file downloads with retries.
//!
//! Sources are `http://` or `https://` URLs, `file:` URLs, or plain paths. Network failures
//! (no connection, a dropped transfer, a 5xx answer) are retried with backoff; a missing file
//! (404) is not, because asking again will not bring it back.

use std::io::Read;
use std::sync::OnceLock;
use std::time::Duration;

/// How often a transient failure is tried in all.
pub const TRIES: u32 = 3;

/// Why a download failed; callers branch on it to say what the user can do.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The server answered that the file does not exist.
    #[error("{url} does not exist on the server (HTTP 404)")]
    NotFound { url: String },
    /// The server could not be reached, or the transfer broke off.
    #[error("cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
    /// Any other HTTP status.
    #[error("{url}: the server answered HTTP {code}")]
    Status { url: String, code: u16 },
    /// A local file could not be read.
    #[error("reading {path}: {source}")]
    Local {
        path: String,
        source: std::io::Error,
    },
}

impl FetchError {
    /// Whether trying again may help.
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Unreachable { .. } => true,
            FetchError::Status { code, .. } => *code >= 500 || *code == 429,
            FetchError::NotFound { .. } | FetchError::Local { .. } => false,
        }
    }
}

/// An open download: a byte stream and its length when the server said it.
pub struct Download {
    pub reader: Box<dyn Read + Send>,
    pub length: Option<u64>,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(15))
            .timeout_read(Duration::from_secs(60))
            .user_agent(concat!("plinth/", env!("CARGO_PKG_VERSION")))
            .build()
    })
}

/// Whether `source` names something on the network (as opposed to a local file).
pub fn is_remote(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

/// The local path of a `file:` URL or plain path.
pub fn local_path(source: &str) -> &str {
    source
        .strip_prefix("file://")
        .or_else(|| source.strip_prefix("file:"))
        .unwrap_or(source)
}

/// Opens `source` once, without retrying.
pub fn open(source: &str) -> Result<Download, FetchError> {
    if !is_remote(source) {
        let path = local_path(source);
        let file = std::fs::File::open(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                FetchError::NotFound {
                    url: path.to_owned(),
                }
            } else {
                FetchError::Local {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        let length = file.metadata().ok().map(|m| m.len());
        return Ok(Download {
            reader: Box::new(file),
            length,
        });
    }
    match agent().get(source).call() {
        Ok(response) => {
            let length = response
                .header("Content-Length")
                .and_then(|v| v.parse::<u64>().ok());
            Ok(Download {
                reader: Box::new(response.into_reader()),
                length,
            })
        }
        Err(ureq::Error::Status(404 | 410, _)) => Err(FetchError::NotFound {
            url: source.to_owned(),
        }),
        Err(ureq::Error::Status(code, _)) => Err(FetchError::Status {
            url: source.to_owned(),
            code,
        }),
        Err(ureq::Error::Transport(transport)) => Err(FetchError::Unreachable {
            url: source.to_owned(),
            message: transport.to_string(),
        }),
    }
}

/// Runs `attempt` up to [`TRIES`] times while it fails transiently, waiting 1 s, then 2 s.
pub fn with_retries<T, E>(
    mut attempt: impl FnMut() -> Result<T, E>,
    is_transient: impl Fn(&E) -> bool,
) -> Result<T, E>
where
    E: std::fmt::Display,
{
    let mut delay = Duration::from_secs(1);
    let mut tries = 1;
    loop {
        match attempt() {
            Err(err) if tries < TRIES && is_transient(&err) => {
                eprintln!("    warning: {err}; trying again in {}s", delay.as_secs());
                std::thread::sleep(delay);
                delay *= 2;
                tries += 1;
            }
            result => return result,
        }
    }
}

/// Reads a whole (small) file such as an `InRelease`, with retries; at most `limit` bytes.
pub fn get_bytes(source: &str, limit: u64) -> Result<Vec<u8>, FetchError> {
    with_retries(
        || {
            let download = open(source)?;
            let mut bytes = Vec::new();
            download
                .reader
                .take(limit)
                .read_to_end(&mut bytes)
                .map_err(|e| FetchError::Unreachable {
                    url: source.to_owned(),
                    message: format!("transfer broke off: {e}"),
                })?;
            Ok(bytes)
        },
        FetchError::is_transient,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn retries_only_transient_failures() {
        let calls = Cell::new(0);
        let result: Result<(), FetchError> = with_retries(
            || {
                calls.set(calls.get() + 1);
                Err(FetchError::NotFound { url: "x".into() })
            },
            FetchError::is_transient,
        );
        assert!(result.is_err());
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn local_paths_and_file_urls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello").expect("write");
        let url = format!("file://{}", path.display());
        assert_eq!(get_bytes(&url, 100).expect("reads"), b"hello");
        assert_eq!(
            get_bytes(&path.display().to_string(), 3).expect("reads"),
            b"hel"
        );
        let missing = get_bytes(&format!("{}/nope", dir.path().display()), 10);
        assert!(matches!(missing, Err(FetchError::NotFound { .. })));
    }
}
