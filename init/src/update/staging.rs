//! Staging a release on `/var` before anything of it is written.
//!
//! Every artifact is downloaded into `/var/lib/plinth/staging/artifacts/<sha256>.zst.part`
//! (resuming a partial download), checked against the signed manifest (size and sha256 of the
//! file) and only then renamed to its final name. The signed sha256 of the file binds every byte
//! its content decompresses to, so the content is not decompressed here: the write pass
//! decompresses it once, checks its size and sha256 (or, for the root image, every block against
//! the signed verity root hash) and refuses the slot if it differs. The inactive slot, its boot
//! entry and the ESP are not touched until every artifact is staged, so a refused release costs the machine nothing: its fallback slot stays.
//! A power cut while staging leaves only files under the staging folder; the next check resumes
//! from the partial file.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _};
use os_config::manifest::{Artifact, Manifest};
use sha2::{Digest, Sha256};

use super::apply::{ApplyError, Event, Hook, CHUNK};
use super::fetch::Source;

/// Room left free on `/var` beyond the staged release, for the engine and the containers.
pub const RESERVE: u64 = 64 << 20;

/// The staging folder of one machine.
#[derive(Debug, Clone)]
pub struct Staging {
    dir: PathBuf,
}

/// The final and the partial path of a staged artifact.
fn paths(dir: &Path, artifact: &Artifact) -> (PathBuf, PathBuf) {
    let done = dir.join(&artifact.path);
    let part = done.with_extension("zst.part");
    (done, part)
}

fn len_of(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

impl Staging {
    /// Staging under `dir` (normally `/var/lib/plinth/staging`).
    pub fn new(dir: PathBuf) -> Staging {
        Staging { dir }
    }

    /// Where the staged release can be read as a release folder.
    pub fn source(&self) -> Source {
        Source::Dir(self.dir.clone())
    }

    /// Downloads and checks every artifact of `manifest` from `source` but those named in `skip`
    /// (`root` when a delta update writes the root image from chunks, boot files the ESP already
    /// holds), after removing whatever the folder holds for other releases; `hook` hears of each
    /// artifact as its turn comes. `Rejected` when an artifact differs from the manifest (its
    /// partial file is removed, so a fixed release is downloaded afresh); `Failed` for anything
    /// else, such as a network error or too little room on `/var`.
    pub fn stage_except(
        &self,
        source: &Source,
        manifest: &Manifest,
        retries: u32,
        skip: &[&str],
        hook: Hook<'_>,
    ) -> Result<(), ApplyError> {
        let artifacts_dir = self.dir.join("artifacts");
        fs::create_dir_all(&artifacts_dir)
            .with_context(|| format!("creating {}", artifacts_dir.display()))?;
        self.remove_others(manifest)?;
        let needed: u64 = manifest
            .artifacts
            .named()
            .iter()
            .filter(|(name, _)| !skip.contains(name))
            .map(|(_, a)| {
                let (done, part) = paths(&self.dir, a);
                if len_of(&done) == a.size {
                    0
                } else {
                    a.size.saturating_sub(len_of(&part))
                }
            })
            .sum();
        let free = free_bytes(&self.dir)?;
        if free < needed.saturating_add(RESERVE) {
            return Err(ApplyError::Failed(anyhow!(
                "not enough room in {} to stage {} {}: it needs {} MiB more (and {} MiB to spare), {} MiB are free",
                self.dir.display(),
                manifest.name,
                manifest.version,
                needed.div_ceil(1 << 20),
                RESERVE >> 20,
                free >> 20
            )));
        }
        for (name, artifact) in manifest.artifacts.named() {
            if skip.contains(&name) {
                continue;
            }
            hook(&Event::Checking {
                artifact: name,
                bytes: artifact.size,
                download: true,
            })?;
            self.stage_one(source, name, artifact, retries)?;
        }
        Ok(())
    }

    /// For a release folder on this machine (`apply --from DIR`, a `file://` URL): checks every
    /// artifact of `manifest` but those in `skip` where it lies, in one read each (size and
    /// sha256 of the file), without copying it to `/var`; `hook` hears of each artifact as its
    /// turn comes. The folder is then the apply's source;
    /// the apply checks every byte again as it writes, so a medium that changes in between cannot slip anything in. `Rejected` as for
    /// [`Staging::stage_except`].
    pub fn check_in_place(
        dir: &Path,
        manifest: &Manifest,
        skip: &[&str],
        hook: Hook<'_>,
    ) -> Result<(), ApplyError> {
        for (name, artifact) in manifest.artifacts.named() {
            if skip.contains(&name) {
                continue;
            }
            hook(&Event::Checking {
                artifact: name,
                bytes: artifact.size,
                download: false,
            })?;
            let path = dir.join(&artifact.path);
            let file = fs::File::open(&path).map_err(|e| {
                ApplyError::Rejected(format!("artifact {name}: opening {}: {e}", path.display()))
            })?;
            check_file(file, artifact)
                .map_err(|reason| ApplyError::Rejected(format!("artifact {name}: {reason}")))?;
        }
        Ok(())
    }

    /// Removes every file of the folder that `manifest` does not name (older releases).
    fn remove_others(&self, manifest: &Manifest) -> anyhow::Result<()> {
        let keep: Vec<PathBuf> = manifest
            .artifacts
            .named()
            .iter()
            .flat_map(|(_, a)| {
                let (done, part) = paths(&self.dir, a);
                [done, part]
            })
            .collect();
        let dir = self.dir.join("artifacts");
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry
                .with_context(|| format!("reading {}", dir.display()))?
                .path();
            if !keep.contains(&path) {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Downloads one artifact (resuming its partial file) and checks it; renames it into place.
    fn stage_one(
        &self,
        source: &Source,
        name: &str,
        artifact: &Artifact,
        retries: u32,
    ) -> Result<(), ApplyError> {
        let (done, part) = paths(&self.dir, artifact);
        if len_of(&done) == artifact.size {
            return Ok(());
        }
        let rejected = |reason: String| {
            // A fixed release with the same artifact name starts from scratch.
            let _ = fs::remove_file(&part);
            ApplyError::Rejected(format!("artifact {name}: {reason}"))
        };
        if let Source::Dir(dir) = source {
            let len = len_of(&dir.join(&artifact.path));
            if len != artifact.size {
                return Err(rejected(format!(
                    "the file is {len} bytes, the manifest says {}",
                    artifact.size
                )));
            }
        }
        let mut offset = len_of(&part);
        if offset > artifact.size {
            fs::remove_file(&part).with_context(|| format!("removing {}", part.display()))?;
            offset = 0;
        }
        let mut hasher = Sha256::new();
        if offset > 0 {
            let mut existing =
                fs::File::open(&part).with_context(|| format!("opening {}", part.display()))?;
            io::copy(
                &mut (&mut existing).take(offset),
                &mut HashWriter(&mut hasher),
            )
            .with_context(|| format!("reading {}", part.display()))?;
        }
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .with_context(|| format!("opening {}", part.display()))?;
        let download = source
            .open_resuming(&artifact.path, offset, artifact.size, retries)
            .map_err(|e| ApplyError::Failed(anyhow!("artifact {name}: {e}")))?;
        // One byte more than the manifest allows tells a longer file from a complete one.
        let mut limited = download.take(artifact.size - offset + 1);
        let mut buf = vec![0u8; CHUNK];
        let mut len = offset;
        loop {
            let n = match limited.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // What arrived is kept for the next attempt.
                    let _ = file.sync_data();
                    return Err(ApplyError::Failed(anyhow!("artifact {name}: {e}")));
                }
            };
            len += n as u64;
            if len > artifact.size {
                return Err(rejected(format!(
                    "the download is more than the {} bytes the manifest says",
                    artifact.size
                )));
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .with_context(|| format!("writing {}", part.display()))?;
        }
        file.sync_all()
            .with_context(|| format!("writing {}", part.display()))?;
        drop(file);
        let sha = hex::encode(hasher.finalize());
        if len != artifact.size {
            return Err(rejected(format!(
                "the download is {len} bytes, the manifest says {}",
                artifact.size
            )));
        }
        if sha != artifact.sha256.as_str() {
            return Err(rejected(format!(
                "sha256 of the download is {sha}, the manifest says {}",
                artifact.sha256
            )));
        }
        fs::rename(&part, &done)
            .with_context(|| format!("renaming {} to {}", part.display(), done.display()))?;
        if let Some(dir) = done.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("syncing {}", dir.display()))?;
        }
        Ok(())
    }

    /// Removes the staged files (after the release was written, or refused): the artifacts, and
    /// the chunks of a delta update ([`super::delta`]).
    pub fn clear(&self) -> anyhow::Result<()> {
        for dir in [self.dir.join("artifacts"), self.dir.join("chunks")] {
            match fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", dir.display()))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Checks an artifact file where it lies: its size and sha256 against the manifest's.
fn check_file(mut file: fs::File, artifact: &Artifact) -> Result<(), String> {
    let len = file.metadata().map_or(0, |m| m.len());
    if len != artifact.size {
        return Err(format!(
            "the file is {len} bytes, the manifest says {}",
            artifact.size
        ));
    }
    let mut hasher = Sha256::new();
    // One byte more than the manifest allows tells a file that grew since from a complete one.
    let read = copy_reading_ahead(
        (&mut file).take(artifact.size + 1),
        &mut HashWriter(&mut hasher),
    )
    .map_err(|e| format!("reading the file: {e}"))?;
    if read > artifact.size {
        return Err(format!(
            "the file grew past the {} bytes the manifest says while it was read",
            artifact.size
        ));
    }
    if read != artifact.size {
        return Err(format!(
            "the file shrank to {read} bytes while it was read, the manifest says {}",
            artifact.size
        ));
    }
    let sha = hex::encode(hasher.finalize());
    if sha != artifact.sha256.as_str() {
        return Err(format!(
            "sha256 of the file is {sha}, the manifest says {}",
            artifact.sha256
        ));
    }
    Ok(())
}

/// Buffers of [`CHUNK`] the reading thread of [`copy_reading_ahead`] may fill ahead of the writer.
const READ_AHEAD: usize = 4;

/// `io::copy` with the reads on a thread of their own, up to [`READ_AHEAD`] buffers ahead of
/// `writer`: reading a cold medium overlaps the work `writer` does (hashing) instead of
/// alternating with it. Returns the bytes copied.
fn copy_reading_ahead<R: Read + Send>(mut reader: R, writer: &mut dyn Write) -> io::Result<u64> {
    std::thread::scope(|scope| {
        let (full_tx, full_rx) =
            std::sync::mpsc::sync_channel::<io::Result<(Vec<u8>, usize)>>(READ_AHEAD);
        let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        for _ in 0..=READ_AHEAD {
            let _ = free_tx.send(vec![0u8; CHUNK]);
        }
        scope.spawn(move || {
            // Stops at the end, at an error, or when the writing side hung up.
            while let Ok(mut buf) = free_rx.recv() {
                let read = loop {
                    match reader.read(&mut buf) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        other => break other,
                    }
                };
                let last = !matches!(read, Ok(n) if n > 0);
                if full_tx.send(read.map(|n| (buf, n))).is_err() || last {
                    break;
                }
            }
        });
        let mut copied = 0u64;
        for piece in full_rx.iter() {
            let (buf, n) = piece?;
            if n == 0 {
                break;
            }
            writer.write_all(&buf[..n])?;
            copied += n as u64;
            let _ = free_tx.send(buf);
        }
        Ok(copied)
    })
}

/// Free bytes for an unprivileged writer on the filesystem of `dir`.
fn free_bytes(dir: &Path) -> anyhow::Result<u64> {
    let stat = rustix::fs::statvfs(dir)
        .with_context(|| format!("reading the free space of {}", dir.display()))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Feeds everything written into a hasher.
struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;

    /// A server on 127.0.0.1 answering one request with `head` and `body`, then closing.
    fn serve_once(head: String, body: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        std::thread::spawn(move || {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let mut out = &stream;
            let _ = out.write_all(head.as_bytes());
            let _ = out.write_all(&body);
        });
        base
    }

    fn chunked(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in data.chunks(1000) {
            out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            out.extend_from_slice(piece);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    /// `content` compressed as one zstd frame, and the manifest's record of it.
    fn artifact_of(content: &[u8]) -> (Vec<u8>, Artifact) {
        let compressed = zstd::encode_all(content, 3).expect("zstd");
        let sha = |b: &[u8]| {
            os_config::units::Sha256::parse(&hex::encode(Sha256::digest(b))).expect("sha")
        };
        let artifact = Artifact {
            path: Artifact::path_for(&sha(&compressed)),
            size: compressed.len() as u64,
            sha256: sha(&compressed),
            uncompressed_size: content.len() as u64,
            uncompressed_sha256: sha(content),
            frames: Vec::new(),
        };
        (compressed, artifact)
    }

    #[test]
    fn an_artifact_longer_than_its_manifest_says_is_refused_however_it_is_framed() {
        // Content that does not compress, so the artifact spans several reads and chunks.
        let content: Vec<u8> = (0u32..5000)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let (compressed, artifact) = artifact_of(&content);
        let mut longer = compressed.clone();
        longer.push(0);
        let served = [
            // The same bytes the manifest names: staged.
            (
                "exact, Content-Length",
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    compressed.len()
                ),
                compressed.clone(),
                None,
            ),
            (
                "Content-Length",
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    longer.len()
                ),
                longer.clone(),
                Some("more than"),
            ),
            (
                "Content-Length, one byte more than announced",
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    compressed.len() + 1
                ),
                longer.clone(),
                Some("more than"),
            ),
            (
                "chunked",
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned(),
                chunked(&longer),
                Some("more than"),
            ),
            (
                "until close",
                "HTTP/1.1 200 OK\r\n\r\n".to_owned(),
                longer.clone(),
                Some("more than"),
            ),
            (
                "until close, shorter",
                "HTTP/1.1 200 OK\r\n\r\n".to_owned(),
                compressed[..100].to_vec(),
                // Not refused: what arrived is kept, and the next check resumes.
                Some("connection closed early"),
            ),
        ];
        for (framing, head, body, refused) in served {
            let dir = tempfile::tempdir().expect("tempdir");
            let staging = Staging::new(dir.path().to_owned());
            fs::create_dir_all(dir.path().join("artifacts")).expect("mkdir");
            let source = Source::parse(&serve_once(head, body)).expect("url");
            let result = staging.stage_one(&source, "root", &artifact, 0);
            let (done, part) = paths(dir.path(), &artifact);
            match (refused, result) {
                (None, Ok(())) => assert_eq!(fs::read(&done).expect("staged"), compressed),
                (Some(want), Err(ApplyError::Failed(e))) if !want.starts_with("more") => {
                    assert!(format!("{e:#}").contains(want), "{framing}: {e:#}");
                    assert_eq!(fs::read(&part).expect("kept").len(), 100, "{framing}");
                }
                (Some(want), Err(ApplyError::Rejected(reason))) => {
                    assert!(reason.contains(want), "{framing}: {reason}");
                    assert!(
                        reason.contains(&format!("{} bytes", artifact.size)),
                        "{framing}: {reason}"
                    );
                    assert!(!done.exists() && !part.exists(), "{framing}: nothing kept");
                }
                (want, other) => panic!("{framing}: expected {want:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_file_checked_in_place_must_have_the_signed_size_and_sha256() {
        let content = b"the root image, compressed".repeat(300);
        let (compressed, artifact) = artifact_of(&content);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("artifact.zst");
        let check = |bytes: &[u8]| {
            fs::write(&path, bytes).expect("write");
            check_file(fs::File::open(&path).expect("open"), &artifact)
        };
        assert_eq!(check(&compressed), Ok(()));
        let mut flipped = compressed.clone();
        flipped[compressed.len() / 2] ^= 1;
        let e = check(&flipped).expect_err("a flipped byte");
        assert!(e.starts_with("sha256 of the file is "), "{e}");
        assert!(e.contains(artifact.sha256.as_str()), "{e}");
        let e = check(&compressed[1..]).expect_err("a byte short");
        assert_eq!(
            e,
            format!(
                "the file is {} bytes, the manifest says {}",
                compressed.len() - 1,
                compressed.len()
            )
        );
    }

    /// A reader that gives `good` bytes in odd-sized reads, then fails.
    struct FailsAfter {
        good: usize,
        given: usize,
    }

    impl Read for FailsAfter {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.given == self.good {
                return Err(io::Error::other("medium error"));
            }
            let n = buf.len().min(777_777).min(self.good - self.given);
            buf[..n].fill((self.given % 251) as u8);
            self.given += n;
            Ok(n)
        }
    }

    #[test]
    fn reading_ahead_copies_every_byte_in_order_and_passes_a_read_error_on() {
        // Several buffers' worth in reads that do not fill one, so the buffers cycle.
        let data: Vec<u8> = (0..(READ_AHEAD * 3 * CHUNK + 12_345))
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        let mut out = Vec::new();
        let copied = copy_reading_ahead(&data[..], &mut out).expect("copy");
        assert_eq!(copied, data.len() as u64);
        assert!(out == data, "the copy differs from its source");

        let mut out = Vec::new();
        let failing = FailsAfter {
            good: 2 * CHUNK + 5,
            given: 0,
        };
        let error = copy_reading_ahead(failing, &mut out).expect_err("a read error is an error");
        assert_eq!(error.to_string(), "medium error");
        assert_eq!(
            out.len(),
            2 * CHUNK + 5,
            "what was read before the error is written"
        );
    }
}
