//! Writing a verified release into the inactive slot, in the order that keeps the machine
//! bootable at every moment: remove the slot's boot entry, stream the partitions, read them back,
//! set the partition UUIDs, write kernel and initrd, write the counted entry last. Each stage is
//! synced, then recorded, so an interrupted update resumes or restarts cleanly.

use std::io::{self, Read, Seek, Write};
use std::path::Path;

use os_config::manifest::{Artifact, Frame, Manifest};
use sha2::{Digest, Sha256};

use super::blockdev::Disk;
use super::esp::Esp;
use super::fetch::Source;
use super::state::{InProgress, Resume, Stage, Staged, State};
use super::verity;
use os_config::boot::{Entry, EntryName};
use os_config::layout::Slot;
use os_config::slice::Slice;

/// Size of each read and write while streaming.
pub const CHUNK: usize = 1 << 20;
/// Largest zstd window accepted (32 MiB): bounds the decoder's memory.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 25;

/// Something observable happened; tests use it to interrupt the update at that point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A stage was synced and recorded.
    Stage(Stage),
    /// `bytes` of an artifact's content were written so far.
    Written { artifact: &'static str, bytes: u64 },
    /// Every artifact is staged on `/var` and checked; nothing was written before this.
    Downloaded,
}

/// Why applying stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The release itself is wrong (an artifact differs from its manifest): do not retry it as is.
    #[error("{0}")]
    Rejected(String),
    /// Anything else (network, disk, interruption): the next check resumes or restarts.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// The release to write and where it comes from.
#[derive(Debug)]
pub struct Job<'a> {
    pub source: &'a Source,
    pub manifest: &'a Manifest,
    /// sha256 (hex) of the signed manifest bytes.
    pub manifest_sha256: &'a str,
    /// The inactive slot, which receives the release.
    pub slot: Slot,
    /// Reconnections allowed per artifact download.
    pub retries: u32,
}

pub type Hook<'h> = &'h mut dyn FnMut(&Event) -> anyhow::Result<()>;

/// Applies `job` to `disk`, recording progress in `state` (saved to `state_path`).
pub fn apply(
    job: &Job<'_>,
    disk: &mut Disk,
    state: &mut State,
    state_path: &Path,
    hook: Hook<'_>,
) -> Result<(), ApplyError> {
    use anyhow::Context as _;
    let manifest = job.manifest;
    let slot = job.slot;
    let resumed = match &state.in_progress {
        Some(p)
            if p.version == manifest.version
                && p.slot == slot
                && p.manifest_sha256 == job.manifest_sha256 =>
        {
            p.stage
        }
        _ => Stage::Accepted,
    };
    let record = |state: &mut State, stage: Stage, hook: Hook<'_>| {
        record(job, state, state_path, stage, hook)
    };
    if resumed == Stage::Accepted {
        record(state, Stage::Accepted, hook)?;
    } else {
        // Resuming: keep the recorded stage and frame.
        hook(&Event::Stage(resumed))?;
    }

    // The slot's entry goes first, every time: from here on its partitions may be half written.
    let esp_part = disk.partition("esp")?;
    {
        let esp = Esp::open(disk.region(&esp_part).context("opening the ESP")?)?;
        esp.remove_slot_entries(slot)?;
        esp.close()?;
    }
    disk.sync()?;
    if resumed < Stage::EntryRemoved {
        record(state, Stage::EntryRemoved, hook)?;
    }

    write_images(job, disk, state, state_path, resumed, hook)?;

    if resumed < Stage::UuidsSet {
        let hash: [u8; 32] = hex::decode(manifest.root_hash.as_str())
            .ok()
            .and_then(|h| h.try_into().ok())
            .context("decoding the root hash")?;
        disk.set_slot_uuids(slot, &hash)?;
        record(state, Stage::UuidsSet, hook)?;
    }

    if resumed < Stage::BootFilesWritten {
        for (name, artifact, path) in [
            (
                "kernel",
                &manifest.artifacts.kernel,
                Entry::kernel_path(slot),
            ),
            (
                "initrd",
                &manifest.artifacts.initrd,
                Entry::initrd_path(slot),
            ),
        ] {
            let esp = Esp::open(disk.region(&esp_part).context("opening the ESP")?)?;
            {
                let mut file = esp.create_file(&path)?;
                stream(job, name, artifact, &mut file, 0, &mut |_| Ok(()), hook)?;
                file.flush()
                    .with_context(|| format!("writing {path} on the ESP"))?;
            }
            esp.close()?;
            disk.sync()?;
            let esp = Esp::open(disk.region(&esp_part).context("opening the ESP")?)?;
            let (len, sha) = hash_reader(&mut esp.open_file(&path)?)
                .with_context(|| format!("reading back {path} on the ESP"))?;
            esp.close()?;
            check_content(name, artifact, len, &sha).map_err(ApplyError::Failed)?;
        }
        record(state, Stage::BootFilesWritten, hook)?;
    }

    // Last: the counted entry makes the slot bootable.
    let entry = EntryName::trying(slot, manifest.version.as_str());
    let text = Entry {
        slot,
        version: manifest.version.to_string(),
        root_hash: manifest.root_hash.to_string(),
        extra_args: manifest.cmdline.clone(),
        verity: true,
    }
    .format();
    {
        let esp = Esp::open(disk.region(&esp_part).context("opening the ESP")?)?;
        esp.write_file(&entry.esp_path(), text.as_bytes())?;
        esp.close()?;
    }
    disk.sync()?;
    state.in_progress = None;
    state.staged = Some(Staged {
        version: manifest.version.clone(),
        slot,
    });
    state.newest_accepted = Some(manifest.version.clone());
    state.save(state_path)?;
    hook(&Event::Stage(Stage::EntryWritten))?;
    Ok(())
}

/// Records `stage` of `job` as reached (and its resume point as none) in `state`, then tells `hook`.
fn record(
    job: &Job<'_>,
    state: &mut State,
    state_path: &Path,
    stage: Stage,
    hook: Hook<'_>,
) -> anyhow::Result<()> {
    state.in_progress = Some(InProgress {
        version: job.manifest.version.clone(),
        slot: job.slot,
        manifest_sha256: job.manifest_sha256.to_owned(),
        stage,
        resume: None,
    });
    state.save(state_path)?;
    hook(&Event::Stage(stage))
}

/// Writes the root and verity images of `job` into the slot's partitions and checks them, the
/// stages after `resumed` (a stage recorded by an earlier, interrupted run) up to
/// [`Stage::Verified`]. The slot's boot entry must be gone already.
pub fn write_images(
    job: &Job<'_>,
    disk: &mut Disk,
    state: &mut State,
    state_path: &Path,
    resumed: Stage,
    hook: Hook<'_>,
) -> Result<(), ApplyError> {
    use anyhow::Context as _;
    let manifest = job.manifest;
    let slot = job.slot;
    let record = |state: &mut State, stage: Stage, hook: Hook<'_>| {
        record(job, state, state_path, stage, hook)
    };
    let root_part = disk.partition(slot.root_label())?;
    let verity_part = disk.partition(slot.verity_label())?;
    for (stage, name, artifact, part) in [
        (
            Stage::RootWritten,
            "root",
            &manifest.artifacts.root,
            &root_part,
        ),
        (
            Stage::VerityWritten,
            "verity",
            &manifest.artifacts.verity,
            &verity_part,
        ),
    ] {
        if resumed >= stage {
            continue;
        }
        if artifact.uncompressed_size > part.size {
            return Err(ApplyError::Rejected(format!(
                "artifact {name}: {} bytes do not fit partition {} ({} bytes)",
                artifact.uncompressed_size, part.label, part.size
            )));
        }
        let first = state
            .in_progress
            .as_ref()
            .and_then(|p| p.resume.as_ref())
            .filter(|r| r.artifact == name)
            .map_or(0, |r| r.frame);
        let mut region = disk
            .region(part)
            .with_context(|| format!("opening partition {}", part.label))?;
        if let Some(frame) = artifact.frames.get(first) {
            region
                .seek(io::SeekFrom::Start(frame.uncompressed_offset))
                .with_context(|| format!("seeking in partition {}", part.label))?;
        }
        let mut frame_done = |next: usize| -> anyhow::Result<()> {
            if let Some(p) = state.in_progress.as_mut() {
                p.resume = Some(Resume {
                    artifact: name.to_owned(),
                    frame: next,
                });
            }
            state.save(state_path)
        };
        stream(
            job,
            name,
            artifact,
            &mut region,
            first,
            &mut frame_done,
            hook,
        )?;
        disk.sync()?;
        record(state, stage, hook)?;
    }

    if resumed < Stage::Verified {
        if let Err(error) = read_back(disk, manifest, &root_part, &verity_part) {
            // What is on the medium is not what was written: rewrite it on the next attempt.
            record(state, Stage::EntryRemoved, hook)?;
            return Err(error);
        }
        record(state, Stage::Verified, hook)?;
    }

    Ok(())
}

/// Where a streamed artifact goes: a partition or a file on the ESP.
pub trait Sink: Write {
    /// Makes what was written durable.
    fn sync(&mut self) -> io::Result<()>;
}

impl Sink for Slice<&mut std::fs::File> {
    fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        self.get_mut().sync_data()
    }
}

impl<S: super::esp::Storage> Sink for fatfs::File<'_, S> {
    fn sync(&mut self) -> io::Result<()> {
        self.flush()
    }
}

/// Download → hash → zstd → hash → `sink`, in one pass with `CHUNK`-sized buffers, from frame
/// `first` on (the sink is positioned at that frame's content). After each frame but the last the
/// sink is synced and `frame_done(next frame)` is called, so a later run can resume there.
fn stream(
    job: &Job<'_>,
    name: &'static str,
    artifact: &Artifact,
    sink: &mut dyn Sink,
    first: usize,
    frame_done: &mut dyn FnMut(usize) -> anyhow::Result<()>,
    hook: Hook<'_>,
) -> Result<(), ApplyError> {
    let failed = |e: String| ApplyError::Failed(anyhow::anyhow!(e));
    let frames = if artifact.frames.is_empty() {
        vec![Frame {
            offset: 0,
            uncompressed_offset: 0,
        }]
    } else {
        artifact.frames.clone()
    };
    let first = if first < frames.len() { first } else { 0 };
    let whole = first == 0;
    let start = frames[first];
    let download = job
        .source
        .open_resuming(&artifact.path, start.offset, artifact.size, job.retries)
        .map_err(|e| failed(format!("artifact {name}: {e}")))?;
    let mut counted = HashReader {
        inner: download.take(artifact.size - start.offset + 1),
        hasher: Sha256::new(),
        len: 0,
        io_failed: false,
    };
    let mut out_hasher = Sha256::new();
    let mut out_len = start.uncompressed_offset;
    let mut local_failure: Option<anyhow::Error> = None;
    let decoded: io::Result<()> = (|| {
        let mut buf = vec![0u8; CHUNK];
        for index in first..frames.len() {
            let (end, uncompressed_end) = match frames.get(index + 1) {
                Some(next) => (next.offset, next.uncompressed_offset),
                None => (artifact.size + 1, artifact.uncompressed_size),
            };
            let frame_input = (&mut counted).take(end - frames[index].offset);
            let mut decoder = zstd::stream::read::Decoder::new(frame_input)?;
            decoder.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
            loop {
                let n = os_config::slice::read_full(&mut decoder, &mut buf)?;
                if n == 0 {
                    break;
                }
                out_len += n as u64;
                if out_len > uncompressed_end {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "decompresses to more bytes than the manifest says",
                    ));
                }
                out_hasher.update(&buf[..n]);
                if let Err(e) = sink.write_all(&buf[..n]) {
                    local_failure = Some(anyhow::anyhow!("artifact {name}: writing: {e}"));
                    return Err(e);
                }
                if let Err(e) = hook(&Event::Written {
                    artifact: name,
                    bytes: out_len,
                }) {
                    local_failure = Some(e);
                    return Err(io::Error::other("interrupted"));
                }
            }
            // Whatever follows the frame still counts towards size and hash.
            io::copy(&mut decoder.finish(), &mut io::sink())?;
            if out_len != uncompressed_end {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("frame {index} decompresses to fewer bytes than the manifest says"),
                ));
            }
            if index + 1 < frames.len() {
                let synced = sink
                    .sync()
                    .map_err(|e| anyhow::anyhow!("artifact {name}: syncing: {e}"));
                if let Err(e) = synced.and_then(|()| frame_done(index + 1)) {
                    local_failure = Some(e);
                    return Err(io::Error::other("interrupted"));
                }
            }
        }
        Ok(())
    })();
    let sha = |counted: &HashReader<_>| hex::encode(counted.hasher.clone().finalize());
    let download_mismatch = |counted: &HashReader<_>| {
        let sha = sha(counted);
        let expected = artifact.size - start.offset;
        if counted.len != expected || (whole && sha != artifact.sha256.as_str()) {
            Some(ApplyError::Rejected(mismatch(
                name,
                "download",
                expected,
                artifact.sha256.as_str(),
                counted.len,
                &sha,
            )))
        } else {
            None
        }
    };
    if let Err(error) = decoded {
        if let Some(failure) = local_failure {
            return Err(ApplyError::Failed(failure));
        }
        if counted.io_failed {
            return Err(failed(format!("artifact {name}: {error}")));
        }
        // A decode error: report the hash mismatch that explains it, if there is one.
        let _ = io::copy(&mut counted, &mut io::sink());
        if let Some(mismatch) = download_mismatch(&counted) {
            return Err(mismatch);
        }
        return Err(ApplyError::Rejected(format!(
            "artifact {name}: does not decompress: {error}"
        )));
    }
    if let Some(mismatch) = download_mismatch(&counted) {
        return Err(mismatch);
    }
    // A resumed stream has not seen the first frames; the read-back checks the whole content.
    if whole {
        let out_sha = hex::encode(out_hasher.finalize());
        check_content(name, artifact, out_len, &out_sha)
            .map_err(|e| ApplyError::Rejected(e.to_string()))?;
    }
    sink.sync()
        .map_err(|e| failed(format!("artifact {name}: writing: {e}")))?;
    Ok(())
}

fn mismatch(name: &str, what: &str, want_len: u64, want_sha: &str, len: u64, sha: &str) -> String {
    if len != want_len {
        format!("artifact {name}: the {what} is {len} bytes, the manifest says {want_len}")
    } else {
        format!("artifact {name}: sha256 of the {what} is {sha}, the manifest says {want_sha}")
    }
}

fn check_content(name: &str, artifact: &Artifact, len: u64, sha: &str) -> anyhow::Result<()> {
    if len != artifact.uncompressed_size || sha != artifact.uncompressed_sha256.as_str() {
        anyhow::bail!(mismatch(
            name,
            "content",
            artifact.uncompressed_size,
            artifact.uncompressed_sha256.as_str(),
            len,
            sha
        ));
    }
    Ok(())
}

/// Reads both partitions back from the medium and checks hashes and the verity root hash.
fn read_back(
    disk: &mut Disk,
    manifest: &Manifest,
    root_part: &super::blockdev::Partition,
    verity_part: &super::blockdev::Partition,
) -> Result<(), ApplyError> {
    use anyhow::Context as _;
    // The verity tree and its superblock, whole.
    let artifact = &manifest.artifacts.verity;
    let region = disk
        .region(verity_part)
        .with_context(|| format!("opening {}", verity_part.label))?;
    let (len, sha) = hash_reader(&mut region.take(artifact.uncompressed_size))
        .with_context(|| format!("reading back partition {}", verity_part.label))?;
    check_content("verity", artifact, len, &sha)
        .with_context(|| format!("reading back partition {}", verity_part.label))?;
    // The root image, read once: hashed and checked against the tree on the way.
    let path = disk.path.clone();
    let open = || std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()));
    let (mut data_file, mut tree_file) = (open()?, open()?);
    let data = Slice::new(&mut data_file, root_part.start, root_part.size);
    let mut data = HashReader {
        inner: io::BufReader::with_capacity(
            CHUNK,
            data.take(manifest.artifacts.root.uncompressed_size),
        ),
        hasher: Sha256::new(),
        len: 0,
        io_failed: false,
    };
    let mut tree = Slice::new(
        &mut tree_file,
        verity_part.start,
        artifact.uncompressed_size,
    );
    let hash = verity::verify_tree(&mut data, &mut tree, manifest.data_blocks)
        .context("checking the written verity tree against the root partition")?;
    io::copy(&mut data, &mut io::sink()).context("reading back the root partition")?;
    let sha = hex::encode(data.hasher.finalize());
    check_content("root", &manifest.artifacts.root, data.len, &sha)
        .with_context(|| format!("reading back partition {}", root_part.label))?;
    if hex::encode(hash) != manifest.root_hash.as_str() {
        return Err(ApplyError::Rejected(format!(
            "the written verity tree has root hash {}, the manifest says {}",
            hex::encode(hash),
            manifest.root_hash
        )));
    }
    Ok(())
}

fn hash_reader(reader: &mut dyn Read) -> io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut len = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok((len, hex::encode(hasher.finalize())));
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}

/// Counts and hashes the compressed bytes; remembers whether the source failed (network) as
/// opposed to the decoder rejecting the data.
struct HashReader<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
    io_failed: bool,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                self.len += n as u64;
                Ok(n)
            }
            Err(e) => {
                self.io_failed = true;
                Err(e)
            }
        }
    }
}
