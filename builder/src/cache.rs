//! Content-addressed download cache.
//!
//! Files live under `<cache>/sha256/<hex digest>`. A download streams into a temporary file in
//! the same folder while it is hashed, and is renamed into place only when its size and sha256
//! match; a bad download is deleted. A cached file is hashed again before every use, so a
//! corrupted one is noticed, deleted and fetched again.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::fetch::{self, FetchError};
use crate::progress::Bytes;

/// Why a cached fetch failed, beyond the download errors of [`FetchError`].
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// `--offline` was given and the file is not in the cache.
    #[error("offline: {source_name} (sha256 {sha256}) is not in the cache {}; run once without --offline to fetch it", dir.display())]
    NotCached {
        source_name: String,
        sha256: String,
        dir: PathBuf,
    },
    /// The downloaded bytes are not the pinned ones.
    #[error("{source_name}: expected {expected}, got {actual}; the download was deleted")]
    Mismatch {
        source_name: String,
        expected: String,
        actual: String,
    },
}

/// Where the cache is and whether the network may be used, as a command asks for it.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Folder of the cache; `None` is `$XDG_CACHE_HOME/plinth`, else `~/.cache/plinth`.
    pub dir: Option<PathBuf>,
    /// Use only what the cache (and local files) hold, never the network.
    pub offline: bool,
}

/// The cache folder and whether the network may be used.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    offline: bool,
}

impl Cache {
    /// Opens (creating if needed) the cache named by `--cache-dir`/`PLINTH_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/plinth`, else `~/.cache/plinth`.
    pub fn open(options: &Options) -> Result<Cache> {
        let dir = match &options.dir {
            Some(dir) => dir.clone(),
            None => default_dir()?,
        };
        Cache::at(dir, options.offline)
    }

    /// Opens (creating if needed) the cache in `dir`.
    pub fn at(dir: PathBuf, offline: bool) -> Result<Cache> {
        let objects = dir.join("sha256");
        std::fs::create_dir_all(&objects)
            .with_context(|| format!("creating cache folder {}", objects.display()))?;
        Ok(Cache { dir, offline })
    }

    /// The cache folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the network is off limits.
    pub fn offline(&self) -> bool {
        self.offline
    }

    /// Where the file with this digest lives (whether or not it is there).
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join("sha256").join(sha256.to_ascii_lowercase())
    }

    /// The cached file with this digest after hashing it again; a corrupted one is deleted
    /// (with a warning) and reported as absent.
    pub fn lookup(&self, sha256: &str, size: Option<u64>) -> Result<Option<PathBuf>> {
        let path = self.path_of(sha256);
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let (actual, length) = hash_reader(file, |_| {})
            .with_context(|| format!("reading cached file {}", path.display()))?;
        if actual == sha256.to_ascii_lowercase() && size.is_none_or(|s| s == length) {
            return Ok(Some(path));
        }
        eprintln!(
            "    warning: cached file {} is corrupted (sha256 {actual}, {length} bytes); deleting it",
            path.display()
        );
        std::fs::remove_file(&path)
            .with_context(|| format!("deleting corrupted cache file {}", path.display()))?;
        Ok(None)
    }

    /// The verified file with this digest: from the cache, else downloaded from `source`.
    /// `progress`, when given, counts the downloaded bytes; otherwise a bar of its own is shown.
    pub fn fetch(
        &self,
        source: &str,
        sha256: &str,
        size: Option<u64>,
        progress: Option<&mut Bytes>,
    ) -> Result<PathBuf> {
        let sha256 = sha256.to_ascii_lowercase();
        if let Some(path) = self.lookup(&sha256, size)? {
            return Ok(path);
        }
        if self.offline && fetch::is_remote(source) {
            return Err(CacheError::NotCached {
                source_name: source.to_owned(),
                sha256,
                dir: self.dir.clone(),
            }
            .into());
        }
        match progress {
            Some(progress) => self.download(source, &sha256, size, progress),
            None => {
                let name = source.rsplit('/').next().unwrap_or(source).to_owned();
                let mut progress = Bytes::new(name, size.unwrap_or(0));
                let result = self.download(source, &sha256, size, &mut progress);
                progress.finish();
                result
            }
        }
    }

    fn download(
        &self,
        source: &str,
        sha256: &str,
        size: Option<u64>,
        progress: &mut Bytes,
    ) -> Result<PathBuf> {
        let objects = self.dir.join("sha256");
        let temp = fetch::with_retries(
            || -> Result<tempfile::NamedTempFile, AttemptError> {
                let download = fetch::open(source).map_err(AttemptError::Fetch)?;
                let mut temp = tempfile::Builder::new()
                    .prefix(".partial-")
                    .tempfile_in(&objects)
                    .with_context(|| format!("creating a temporary file in {}", objects.display()))
                    .map_err(AttemptError::Other)?;
                let mut hasher = Sha256::new();
                let mut length = 0u64;
                let mut reader = download.reader;
                let mut buffer = vec![0u8; 256 * 1024];
                loop {
                    let n = match reader.read(&mut buffer) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            return Err(AttemptError::Fetch(FetchError::Unreachable {
                                url: source.to_owned(),
                                message: format!("transfer broke off: {e}"),
                            }))
                        }
                    };
                    hasher.update(&buffer[..n]);
                    temp.write_all(&buffer[..n])
                        .with_context(|| format!("writing {}", temp.path().display()))
                        .map_err(AttemptError::Other)?;
                    length += n as u64;
                    progress.add(n as u64);
                    if size.is_some_and(|s| length > s) {
                        break;
                    }
                }
                let actual = hex::encode(hasher.finalize());
                if let Some(expected) = size.filter(|&s| s != length) {
                    return Err(AttemptError::Other(
                        CacheError::Mismatch {
                            source_name: source.to_owned(),
                            expected: format!("{expected} bytes"),
                            actual: format!(
                                "{length}{} bytes",
                                if length > expected { "+" } else { "" }
                            ),
                        }
                        .into(),
                    ));
                }
                if actual != sha256 {
                    return Err(AttemptError::Other(
                        CacheError::Mismatch {
                            source_name: source.to_owned(),
                            expected: format!("sha256 {sha256}"),
                            actual: format!("sha256 {actual}"),
                        }
                        .into(),
                    ));
                }
                Ok(temp)
            },
            |err| matches!(err, AttemptError::Fetch(e) if e.is_transient()),
        )
        .map_err(|err| match err {
            AttemptError::Fetch(e) => anyhow::Error::from(e),
            AttemptError::Other(e) => e,
        })?;
        let path = self.path_of(sha256);
        temp.as_file()
            .sync_all()
            .with_context(|| format!("syncing {}", temp.path().display()))?;
        temp.persist(&path)
            .with_context(|| format!("moving the download into {}", path.display()))?;
        Ok(path)
    }
}

/// One failed download attempt: a fetch error (maybe transient) or anything else (final).
#[derive(Debug)]
enum AttemptError {
    Fetch(FetchError),
    Other(anyhow::Error),
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Fetch(e) => write!(f, "{e}"),
            AttemptError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

fn default_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("plinth"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("plinth")),
        None => bail!("no cache folder: set --cache-dir, PLINTH_CACHE_DIR, XDG_CACHE_HOME or HOME"),
    }
}

/// Hashes a stream, returning the hex sha256 and the length; `progress` sees each chunk size.
pub fn hash_reader(
    mut reader: impl Read,
    mut progress: impl FnMut(u64),
) -> std::io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut length = 0u64;
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buffer[..n]);
        length += n as u64;
        progress(n as u64);
    }
    Ok((hex::encode(hasher.finalize()), length))
}

/// Fetches `url_or_path` (an http(s) URL, a `file:` URL or a path the caller has already made
/// absolute or relative to the working folder) into the cache, verified against `sha256` and,
/// when given, `size`. With `--offline`, only the cache and local files are used.
pub fn fetch_verified(
    url_or_path: &str,
    sha256: &str,
    size: Option<u64>,
    cache: &Options,
) -> Result<PathBuf> {
    Cache::open(cache)?.fetch(url_or_path, sha256, size, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[test]
    fn local_file_is_verified_cached_and_repaired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("input");
        std::fs::write(&source, b"payload").expect("write");
        let cache = Cache::at(dir.path().join("cache"), false).expect("cache");
        let digest = sha(b"payload");
        let source_name = source.display().to_string();

        let path = cache
            .fetch(&source_name, &digest, Some(7), None)
            .expect("fetch");
        assert_eq!(std::fs::read(&path).expect("read"), b"payload");
        assert_eq!(path, cache.path_of(&digest));

        std::fs::write(&path, b"garbage").expect("corrupt");
        assert_eq!(cache.lookup(&digest, Some(7)).expect("lookup"), None);
        assert!(!path.exists(), "corrupted file is deleted");
        let again = cache
            .fetch(&source_name, &digest, Some(7), None)
            .expect("refetch");
        assert_eq!(std::fs::read(again).expect("read"), b"payload");
    }

    #[test]
    fn wrong_digest_or_size_is_refused_and_not_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("input");
        std::fs::write(&source, b"payload").expect("write");
        let cache = Cache::at(dir.path().join("cache"), false).expect("cache");
        let source_name = source.display().to_string();

        let wrong = sha(b"other");
        let err = cache
            .fetch(&source_name, &wrong, None, None)
            .expect_err("mismatch");
        assert!(err.to_string().contains("expected sha256"), "{err}");
        let err = cache
            .fetch(&source_name, &sha(b"payload"), Some(3), None)
            .expect_err("size");
        assert!(err.to_string().contains("expected 3 bytes"), "{err}");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("cache/sha256"))
            .expect("list")
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn offline_refuses_uncached_remote_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::at(dir.path().to_owned(), true).expect("cache");
        let err = cache
            .fetch("http://127.0.0.1:9/x.deb", &sha(b"x"), None, None)
            .expect_err("offline");
        let text = err.to_string();
        assert!(text.contains("offline") && text.contains("x.deb"), "{text}");
    }
}
