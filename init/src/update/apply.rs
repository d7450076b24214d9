//! Writing a verified release into the inactive slot, in the order that keeps the machine
//! bootable at every moment: remove the slot's boot entry, stream the partitions (hashing the root
//! image's blocks on the way), check the written verity tree against those hashes and the signed
//! root hash, set the partition UUIDs, write kernel and initrd, write the counted entry last. Each
//! stage is synced, then recorded, so an interrupted update resumes or restarts cleanly; see
//! `check_written` for why the root image is not read back.

use std::io::{self, Read, Seek, Write};
use std::path::Path;

use os_config::manifest::{verity_hash, Artifact, Frame, Manifest, VERITY_BLOCK_SIZE};
use sha2::{Digest, Sha256};

use super::blockdev::{AlignedBuf, Disk, PartitionWriter};
use super::esp::Esp;
use super::fetch::Source;
use super::state::{InProgress, Resume, Stage, Staged, State};
use super::verity;
use os_config::boot::{Entry, EntryName};
use os_config::layout::Slot;

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
    /// The boot files the ESP already holds with the release's content (`kernel`, `initrd`):
    /// they are neither downloaded nor read from the release.
    HeldOnEsp(Vec<&'static str>),
    /// An artifact of `bytes` (compressed) is being checked before anything is written: read
    /// where it lies, or downloaded to `/var` when `download`.
    Checking {
        artifact: &'static str,
        bytes: u64,
        download: bool,
    },
    /// Every artifact is staged on `/var` and checked; nothing was written before this.
    Downloaded,
    /// The root image was written by a delta update ([`super::delta`]).
    Delta(super::delta::Report),
    /// The manifest offers a delta update that is not taken; the full artifacts are used.
    DeltaFallback { reason: String },
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
    /// The boot files [`boot_files_on_esp`] found on the ESP with the release's content (checked
    /// there, so not downloaded): copied on the ESP, not hashed again before the copy.
    pub held: &'a [HeldBootFile],
}

/// A boot file of the release that the ESP already holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldBootFile {
    /// `kernel` or `initrd`.
    pub name: &'static str,
    /// The ESP path that holds it: the receiving slot's own (nothing to write) or the other's.
    pub path: String,
}

pub type Hook<'h> = &'h mut dyn FnMut(&Event) -> anyhow::Result<()>;

/// The boot files (`kernel`, `initrd`) of `manifest` that the ESP already holds with the
/// manifest's content, for `slot` or for the running slot, each read and hashed once here:
/// staging leaves them out and [`apply`] copies them on the ESP (given as [`Job::held`])
/// instead of downloading them again.
pub fn boot_files_on_esp(
    disk: &mut Disk,
    manifest: &Manifest,
    slot: Slot,
) -> anyhow::Result<Vec<HeldBootFile>> {
    use anyhow::Context as _;
    let esp_part = disk.partition("esp")?;
    let esp = Esp::open(disk.region(&esp_part).context("opening the ESP")?)?;
    let mut held = Vec::new();
    for (name, artifact) in [
        ("kernel", &manifest.artifacts.kernel),
        ("initrd", &manifest.artifacts.initrd),
    ] {
        if let Some(path) = held_copy(&esp, artifact, slot, name)? {
            held.push(HeldBootFile { name, path });
        }
    }
    esp.close()?;
    Ok(held)
}

/// The ESP path of a file with `artifact`'s uncompressed content: `slot`'s own, else the other
/// slot's; `None` if neither holds it.
fn held_copy<S: super::esp::Storage>(
    esp: &Esp<S>,
    artifact: &Artifact,
    slot: Slot,
    name: &str,
) -> anyhow::Result<Option<String>> {
    for candidate in [slot, slot.other()] {
        let path = if name == "kernel" {
            Entry::kernel_path(candidate)
        } else {
            Entry::initrd_path(candidate)
        };
        let Ok(mut file) = esp.open_file(&path) else {
            continue;
        };
        let (len, sha) = hash_reader(&mut file)?;
        if len == artifact.uncompressed_size && sha == artifact.uncompressed_sha256.as_str() {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

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
            let held = job
                .held
                .iter()
                .find(|h| h.name == name)
                .map(|h| h.path.as_str());
            if held == Some(path.as_str()) {
                // Already there, checked by `boot_files_on_esp` in this run (an update that
                // keeps the kernel, or a resumed one): nothing to write or read back.
                continue;
            }
            let esp = Esp::open(disk.region(&esp_part).context("opening the ESP")?)?;
            if let Some(from) = held {
                let mut source = esp.open_file(from)?;
                let mut file = esp.create_file(&path)?;
                io::copy(&mut source, &mut file)
                    .with_context(|| format!("copying {from} to {path} on the ESP"))?;
                file.flush()
                    .with_context(|| format!("writing {path} on the ESP"))?;
            } else {
                let mut file = esp.create_file(&path)?;
                let target = Target {
                    name,
                    artifact,
                    sink: &mut file,
                    first: 0,
                    sync_bytes: u64::MAX,
                    check: Check::Sha256,
                };
                stream(job, target, &mut |_| Ok(()), hook)?;
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
    write_images_syncing(job, disk, state, state_path, resumed, SYNC_BYTES, hook)
}

/// [`write_images`], syncing at the first frame end after every `sync_bytes` written.
fn write_images_syncing(
    job: &Job<'_>,
    disk: &mut Disk,
    state: &mut State,
    state_path: &Path,
    resumed: Stage,
    sync_bytes: u64,
    hook: Hook<'_>,
) -> Result<(), ApplyError> {
    let manifest = job.manifest;
    let slot = job.slot;
    let record = |state: &mut State, stage: Stage, hook: Hook<'_>| {
        record(job, state, state_path, stage, hook)
    };
    let root_part = disk.partition(slot.root_label())?;
    let verity_part = disk.partition(slot.verity_label())?;
    // The dm-verity hash of every root block this run wrote, computed from the very buffers that
    // went to the device; blocks written by an earlier run are read back instead.
    let mut root_hashes = BlockHashes::new(manifest)?;
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
        let mut writer = PartitionWriter::open(&disk.path, part)?;
        let mut frame_done = |next: usize| -> anyhow::Result<()> {
            if let Some(p) = state.in_progress.as_mut() {
                p.resume = Some(Resume {
                    artifact: name.to_owned(),
                    frame: next,
                });
            }
            state.save(state_path)
        };
        let check = if name == "root" {
            Check::Verity(&mut root_hashes)
        } else {
            Check::Sha256
        };
        stream(
            job,
            Target {
                name,
                artifact,
                sink: &mut writer,
                first,
                sync_bytes,
                check,
            },
            &mut frame_done,
            hook,
        )?;
        disk.sync()?;
        record(state, stage, hook)?;
    }

    if resumed < Stage::Verified {
        if let Err(error) = check_written(disk, manifest, &root_part, &verity_part, root_hashes) {
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
    /// Continues writing at `offset` bytes into the sink (resuming at a frame).
    fn seek_to(&mut self, offset: u64) -> io::Result<()>;
}

impl Sink for PartitionWriter {
    fn sync(&mut self) -> io::Result<()> {
        PartitionWriter::sync(self)
    }
    fn seek_to(&mut self, offset: u64) -> io::Result<()> {
        PartitionWriter::seek_to(self, offset);
        Ok(())
    }
}

impl<S: super::esp::Storage> Sink for fatfs::File<'_, S> {
    fn sync(&mut self) -> io::Result<()> {
        self.flush()
    }
    fn seek_to(&mut self, offset: u64) -> io::Result<()> {
        self.seek(io::SeekFrom::Start(offset)).map(drop)
    }
}

/// Sync a partition at the end of a frame once this much was written since the last sync (and at
/// the end): a power cut costs at most this much rewriting, and the device's write cache is
/// flushed a few times per image rather than after every small frame.
pub const SYNC_BYTES: u64 = 32 << 20;
/// Buffers in flight between the decompressing thread and the writing one.
const PIPELINE_BUFFERS: usize = 4;
/// Size of each buffer between the threads: large writes keep an `O_DIRECT` write path busy.
const PIECE: usize = 4 << 20;

/// How the content of a streamed artifact is checked.
enum Check<'a> {
    /// Its sha256 against the manifest's (when streamed from its start).
    Sha256,
    /// The dm-verity hash of each 4 KiB block, kept for checking against the written tree (the
    /// root image, which the signed root hash covers whole: `data_blocks` × 4 KiB is its size).
    Verity(&'a mut BlockHashes),
}

/// One artifact to stream: what, where to, and from which frame.
struct Target<'a, 's> {
    name: &'static str,
    artifact: &'a Artifact,
    sink: &'s mut dyn Sink,
    /// The first frame to write (an earlier run synced everything before it).
    first: usize,
    /// See [`SYNC_BYTES`].
    sync_bytes: u64,
    check: Check<'s>,
}

/// The dm-verity data-block hashes of the root image, from block `first` on.
#[derive(Debug)]
struct BlockHashes {
    salt: Vec<u8>,
    /// Index of the block `hashes[0]` belongs to; `None` until the root was streamed in this run.
    first: Option<u64>,
    hashes: Vec<[u8; 32]>,
    /// The start of a block that a piece ended inside of.
    partial: Vec<u8>,
}

impl BlockHashes {
    /// Empty, for the root image of `manifest`.
    fn new(manifest: &Manifest) -> anyhow::Result<BlockHashes> {
        let salt = hex::decode(&manifest.salt)
            .map_err(|e| anyhow::anyhow!("manifest salt `{}` is not hex: {e}", manifest.salt))?;
        Ok(BlockHashes {
            salt,
            first: None,
            hashes: Vec::new(),
            partial: Vec::new(),
        })
    }

    fn start(&mut self, offset: u64) {
        self.first = Some(offset / VERITY_BLOCK_SIZE);
        self.hashes.clear();
        self.partial.clear();
    }

    fn update(&mut self, mut data: &[u8]) {
        let block = VERITY_BLOCK_SIZE as usize;
        if !self.partial.is_empty() {
            let take = (block - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() == block {
                self.hashes.push(verity_hash(&self.salt, &self.partial));
                self.partial.clear();
            }
        }
        let mut blocks = data.chunks_exact(block);
        self.hashes
            .extend(blocks.by_ref().map(|b| verity_hash(&self.salt, b)));
        self.partial.extend_from_slice(blocks.remainder());
    }
}

/// What the decompressing thread hands to the writing one.
enum Piece {
    /// The first `n` bytes of the buffer are the next content.
    Data(AlignedBuf, usize),
    /// Frame `index` ended here and was as long as the manifest says.
    FrameEnd(usize),
}

/// Download → hash → zstd → `sink`, from frame `first` on. Two threads, like `zstd -d | dd`: one
/// reads, hashes and decompresses the artifact into a few reused aligned buffers, the other
/// checks and writes them, so decompression and hashing overlap with the writes. At the end of a
/// frame, once `sync_bytes` were written since the last sync, the sink is synced and only then
/// `frame_done(next frame)` records where a later run can resume.
fn stream(
    job: &Job<'_>,
    target: Target<'_, '_>,
    frame_done: &mut dyn FnMut(usize) -> anyhow::Result<()>,
    hook: Hook<'_>,
) -> Result<(), ApplyError> {
    let Target {
        name,
        artifact,
        sink,
        first,
        sync_bytes,
        check,
    } = target;
    let failed = |e: String| ApplyError::Failed(anyhow::anyhow!(e));
    let frames = if artifact.frames.is_empty() {
        vec![Frame {
            offset: 0,
            uncompressed_offset: 0,
        }]
    } else {
        artifact.frames.clone()
    };
    // Block hashes resume only at a block boundary (a frame of `plinth publish` is 16 MiB).
    let resumable = |f: &Frame| {
        !matches!(check, Check::Verity(_))
            || f.uncompressed_offset.is_multiple_of(VERITY_BLOCK_SIZE)
    };
    let first = if frames.get(first).is_some_and(resumable) {
        first
    } else {
        0
    };
    let whole = first == 0;
    let start = frames[first];
    sink.seek_to(start.uncompressed_offset)
        .map_err(|e| failed(format!("artifact {name}: seeking: {e}")))?;
    // The root image's blocks are hashed on the decompressing thread (which has time to spare
    // while the other one waits for the device); the buffer is not changed after that.
    let block_hashes = match check {
        Check::Verity(hashes) => {
            hashes.start(start.uncompressed_offset);
            Some(hashes)
        }
        Check::Sha256 => None,
    };
    // The staged file was checked whole against the manifest's sha256 of the file, but its
    // content was not decompressed then: this pass checks the content (its sha256, or the root
    // image's block hashes against the signed root hash, which cover every byte written).
    // Reading the file again, the root image needs no sha256 of its compressed bytes.
    let by_sha256 = block_hashes.is_none();
    let download = job
        .source
        .open_resuming(&artifact.path, start.offset, artifact.size, job.retries)
        .map_err(|e| failed(format!("artifact {name}: {e}")))?;
    let counted = HashReader {
        inner: download.take(artifact.size - start.offset + 1),
        hasher: by_sha256.then(Sha256::new),
        len: 0,
        io_failed: false,
    };
    let mut out_hasher = Sha256::new();
    let mut out_len = start.uncompressed_offset;
    let mut local_failure: Option<anyhow::Error> = None;
    let joined = std::thread::scope(|scope| {
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Piece>(PIPELINE_BUFFERS);
        let (free_tx, free_rx) = std::sync::mpsc::channel::<AlignedBuf>();
        for _ in 0..PIPELINE_BUFFERS + 1 {
            let _ = free_tx.send(AlignedBuf::new(PIECE));
        }
        let frames = &frames;
        let decoder = scope.spawn(move || {
            let mut counted = counted;
            let result = decompress(
                artifact,
                frames,
                first,
                &mut counted,
                block_hashes,
                &full_tx,
                &free_rx,
            );
            (result, counted)
        });
        let mut since_sync = 0u64;
        for piece in full_rx.iter() {
            let step = match piece {
                Piece::Data(buf, n) => {
                    let data = buf.prefix(n);
                    if by_sha256 {
                        out_hasher.update(data);
                    }
                    out_len += n as u64;
                    since_sync += n as u64;
                    let written = sink
                        .write_all(data)
                        .map_err(|e| anyhow::anyhow!("artifact {name}: writing: {e}"));
                    let _ = free_tx.send(buf);
                    written.and_then(|()| {
                        hook(&Event::Written {
                            artifact: name,
                            bytes: out_len,
                        })
                    })
                }
                Piece::FrameEnd(index) if index + 1 < frames.len() && since_sync >= sync_bytes => {
                    since_sync = 0;
                    sink.sync()
                        .map_err(|e| anyhow::anyhow!("artifact {name}: syncing: {e}"))
                        .and_then(|()| frame_done(index + 1))
                }
                Piece::FrameEnd(_) => Ok(()),
            };
            if let Err(e) = step {
                local_failure = Some(e);
                break;
            }
        }
        // Stops the decompressing thread if it is still at work.
        drop(full_rx);
        drop(free_tx);
        decoder.join().ok()
    });
    let Some((decoded, mut counted)) = joined else {
        return Err(failed(format!(
            "artifact {name}: the decompressing thread panicked"
        )));
    };
    let sha = |counted: &HashReader<_>| {
        let hasher = counted.hasher.clone();
        hasher.map(|h| hex::encode(h.finalize()))
    };
    let download_mismatch = |counted: &HashReader<_>| {
        let sha = sha(counted).unwrap_or_default();
        let expected = artifact.size - start.offset;
        let sha_differs = whole && counted.hasher.is_some() && sha != artifact.sha256.as_str();
        if counted.len != expected || sha_differs {
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
    if let Some(failure) = local_failure {
        return Err(ApplyError::Failed(failure));
    }
    if let Err(error) = decoded {
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
    // A resumed stream has not seen the first frames; the final check covers the whole content.
    if whole && by_sha256 {
        let out_sha = hex::encode(out_hasher.finalize());
        check_content(name, artifact, out_len, &out_sha)
            .map_err(|e| ApplyError::Rejected(e.to_string()))?;
    }
    sink.sync()
        .map_err(|e| failed(format!("artifact {name}: writing: {e}")))?;
    Ok(())
}

/// The decompressing side of [`stream`]: decodes frames `first..` of `counted` into buffers from
/// `free` and sends them on `full`, each frame followed by its end. Stops quietly when the
/// writing side hung up.
fn decompress<R: Read>(
    artifact: &Artifact,
    frames: &[Frame],
    first: usize,
    counted: &mut HashReader<R>,
    mut block_hashes: Option<&mut BlockHashes>,
    full: &std::sync::mpsc::SyncSender<Piece>,
    free: &std::sync::mpsc::Receiver<AlignedBuf>,
) -> io::Result<()> {
    let mut out_len = frames[first].uncompressed_offset;
    // A buffer taken but not filled (a frame ended) serves the next frame.
    let mut spare: Option<AlignedBuf> = None;
    for index in first..frames.len() {
        let (end, uncompressed_end) = match frames.get(index + 1) {
            Some(next) => (next.offset, next.uncompressed_offset),
            None => (artifact.size + 1, artifact.uncompressed_size),
        };
        let frame_input = (&mut *counted).take(end - frames[index].offset);
        let mut decoder = zstd::stream::read::Decoder::new(frame_input)?;
        decoder.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
        loop {
            let Some(mut buf) = spare.take().or_else(|| free.recv().ok()) else {
                return Ok(());
            };
            let n = os_config::slice::read_full(&mut decoder, buf.as_mut_slice())?;
            if n == 0 {
                spare = Some(buf);
                break;
            }
            out_len += n as u64;
            if out_len > uncompressed_end {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "decompresses to more bytes than the manifest says",
                ));
            }
            if let Some(hashes) = block_hashes.as_deref_mut() {
                hashes.update(buf.prefix(n));
            }
            if full.send(Piece::Data(buf, n)).is_err() {
                return Ok(());
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
        if full.send(Piece::FrameEnd(index)).is_err() {
            return Ok(());
        }
    }
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

/// Checks what was written against the signed root hash, without reading the root image back.
///
/// The root image is covered by its data-block hashes (`hashes`), computed from the very buffers
/// handed to the device: with `O_DIRECT` ([`PartitionWriter`]) the device receives those buffers
/// themselves, so no later copy (a page-cache page written back after a change) can differ from
/// what was hashed, and the fsync after the writes (`fdatasync`, which flushes the device's write
/// cache) reported any write error. Blocks an interrupted earlier run wrote, which this run did
/// not hash, are read back from the medium. The verity partition (under 1% of the root's size)
/// is read back from the medium whole: its sha256 is checked, then every level of its tree
/// against the block hashes, and the root hash against the manifest. What is left, a device that
/// acknowledges a write and later returns other bytes, is what dm-verity catches on every read
/// when the slot boots: the boot fails and the boot counter falls back to the other slot.
fn check_written(
    disk: &mut Disk,
    manifest: &Manifest,
    root_part: &super::blockdev::Partition,
    verity_part: &super::blockdev::Partition,
    mut hashes: BlockHashes,
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
    // Root blocks this run did not write: their hashes from the medium.
    let first = hashes.first.unwrap_or(manifest.data_blocks);
    if first > 0 {
        let mut written = std::mem::take(&mut hashes.hashes);
        hashes.start(0);
        let region = disk
            .region(root_part)
            .with_context(|| format!("opening {}", root_part.label))?;
        let mut prefix =
            io::BufReader::with_capacity(CHUNK, region.take(first * VERITY_BLOCK_SIZE));
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = os_config::slice::read_full(&mut prefix, &mut buf)
                .with_context(|| format!("reading back partition {}", root_part.label))?;
            if n == 0 {
                break;
            }
            hashes.update(&buf[..n]);
        }
        hashes.hashes.append(&mut written);
    }
    let mut tree = disk
        .region(verity_part)
        .with_context(|| format!("opening {}", verity_part.label))?;
    let hash = verity::verify_tree_hashes(&hashes.hashes, &mut tree, manifest.data_blocks)
        .context("checking the written verity tree against the root partition")?;
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
    /// None when the caller checks the content by other means.
    hasher: Option<Sha256>,
    len: u64,
    io_failed: bool,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                if let Some(hasher) = &mut self.hasher {
                    hasher.update(&buf[..n]);
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use os_config::manifest::{self, Artifacts};
    use os_config::units::{Name, Sha256 as Digest256, Version};

    const KIB: usize = 1 << 10;
    /// Frames of the test artifacts, and the sync interval: a sync every 3 frames.
    const FRAME: usize = 64 * KIB;
    const SYNC: u64 = (2 * FRAME + 1) as u64;

    fn digest(data: &[u8]) -> Digest256 {
        Digest256::parse(&hex::encode(Sha256::digest(data))).expect("hex")
    }

    /// Stores `data` zstd-compressed in `FRAME`-sized frames under `dir`.
    fn store(dir: &Path, data: &[u8]) -> Artifact {
        let (mut compressed, mut frames) = (Vec::new(), Vec::new());
        for (i, chunk) in data.chunks(FRAME).enumerate() {
            frames.push(Frame {
                offset: compressed.len() as u64,
                uncompressed_offset: (i * FRAME) as u64,
            });
            compressed.extend(zstd::encode_all(chunk, 3).expect("zstd"));
        }
        let sha = digest(&compressed);
        let path = Artifact::path_for(&sha);
        std::fs::create_dir_all(dir.join("artifacts")).expect("mkdir");
        std::fs::write(dir.join(&path), &compressed).expect("artifact");
        Artifact {
            path,
            size: compressed.len() as u64,
            sha256: sha,
            uncompressed_size: data.len() as u64,
            uncompressed_sha256: digest(data),
            frames,
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        manifest: Manifest,
        root: Vec<u8>,
        verity: Vec<u8>,
    }

    impl Fixture {
        /// A 1 MiB root image (16 frames), its verity tree and a disk with slot B's partitions.
        fn new() -> Fixture {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let root: Vec<u8> = (0..256 * 4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let oracle = os_config::oracle::veritysetup_format(&root, Some("c0ffee"), None);
            let releases = dir.path().join("release");
            let manifest = Manifest {
                format: manifest::FORMAT,
                name: Name::parse("demo").expect("name"),
                version: Version::parse("2").expect("version"),
                channel: Name::parse("stable").expect("channel"),
                created: manifest::rfc3339(0),
                expires: manifest::rfc3339(4_102_444_800),
                root_hash: Digest256::parse(&oracle.root_hash).expect("hash"),
                salt: "c0ffee".to_owned(),
                data_blocks: root.len() as u64 / 4096,
                cmdline: Vec::new(),
                root_chunks: None,
                rollout: None,
                artifacts: Artifacts {
                    root: store(&releases, &root),
                    verity: store(&releases, &oracle.hash_device),
                    kernel: store(&releases, b"kernel"),
                    initrd: store(&releases, b"initrd"),
                },
            };
            let disk = dir.path().join("disk.img");
            let size = 4u64 << 20;
            std::fs::write(&disk, vec![0u8; size as usize]).expect("disk");
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&disk)
                .expect("open");
            gpt::mbr::ProtectiveMBR::with_lb_size((size / 512 - 1) as u32)
                .overwrite_lba0(&mut file)
                .expect("mbr");
            let mut table = gpt::GptConfig::new()
                .writable(true)
                .create_from_device(&mut file, Some(uuid::Uuid::from_u128(7)))
                .expect("gpt");
            for (name, size) in [("root-b", 1u64 << 20), ("verity-b", 1 << 20)] {
                table
                    .add_partition(name, size, gpt::partition_types::LINUX_FS, 0, Some(2048))
                    .expect("partition");
            }
            table.write().expect("write gpt");
            Fixture {
                dir,
                manifest,
                root,
                verity: oracle.hash_device,
            }
        }

        /// One run of [`write_images_syncing`] from what the state file records; `hook` may stop it.
        fn run(&self, hook: Hook<'_>) -> Result<(), ApplyError> {
            let source = Source::Dir(self.dir.path().join("release"));
            let job = Job {
                source: &source,
                manifest: &self.manifest,
                manifest_sha256: "00",
                slot: Slot::B,
                retries: 0,
                held: &[],
            };
            let state_path = self.dir.path().join("state.json");
            let mut state = State::load(&state_path).expect("state");
            let resumed = match &state.in_progress {
                Some(p) => p.stage,
                None => {
                    record(&job, &mut state, &state_path, Stage::EntryRemoved, hook)?;
                    Stage::EntryRemoved
                }
            };
            let mut disk = Disk::open(&self.dir.path().join("disk.img")).expect("disk");
            write_images_syncing(
                &job,
                &mut disk,
                &mut state,
                &state_path,
                resumed,
                SYNC,
                hook,
            )
        }

        fn state(&self) -> State {
            State::load(&self.dir.path().join("state.json")).expect("state")
        }

        fn partition(&self, label: &str, len: usize) -> Vec<u8> {
            let mut disk = Disk::open(&self.dir.path().join("disk.img")).expect("disk");
            let part = disk.partition(label).expect(label);
            let mut data = vec![0u8; len];
            disk.region(&part)
                .expect("region")
                .read_exact(&mut data)
                .expect("read");
            data
        }

        fn corrupt(&self, label: &str, offset: u64) {
            let mut disk = Disk::open(&self.dir.path().join("disk.img")).expect("disk");
            let part = disk.partition(label).expect(label);
            let mut region = disk.region(&part).expect("region");
            let mut byte = [0u8];
            region.seek(io::SeekFrom::Start(offset)).expect("seek");
            region.read_exact(&mut byte).expect("read");
            region.seek(io::SeekFrom::Start(offset)).expect("seek");
            region.write_all(&[byte[0] ^ 0x40]).expect("write");
            disk.sync().expect("sync");
        }
    }

    /// Stops the run at the `n`th event that `pick` selects.
    fn stop_at(n: usize, pick: fn(&Event) -> bool) -> impl FnMut(&Event) -> anyhow::Result<()> {
        let mut seen = 0;
        move |event| {
            if pick(event) {
                seen += 1;
                if seen == n {
                    anyhow::bail!("power cut");
                }
            }
            Ok(())
        }
    }

    #[test]
    fn a_write_cut_anywhere_resumes_after_the_last_sync_and_completes() {
        let root_writes = |e: &Event| {
            matches!(
                e,
                Event::Written {
                    artifact: "root",
                    ..
                }
            )
        };
        let verity_writes = |e: &Event| {
            matches!(
                e,
                Event::Written {
                    artifact: "verity",
                    ..
                }
            )
        };
        for (point, pick, n) in [
            ("first root piece", root_writes as fn(&Event) -> bool, 1),
            ("third root piece", root_writes, 3),
            ("fourth root piece", root_writes, 4),
            ("tenth root piece", root_writes, 10),
            ("last root piece", root_writes, 16),
            ("verity", verity_writes, 1),
        ] {
            let f = Fixture::new();
            let err = f.run(&mut stop_at(n, pick)).expect_err(point);
            assert!(format!("{err:#}").contains("power cut"), "{point}: {err:#}");
            // Frames are synced in threes (SYNC is a little over two frames): a cut in piece n
            // (one frame each) resumes at the last multiple of 3 frames before it.
            let resume = f.state().in_progress.and_then(|p| p.resume);
            let expected = match point {
                "verity" => None,
                _ => Some((n - 1) / 3 * 3).filter(|&frame| frame > 0),
            };
            assert_eq!(resume.as_ref().map(|r| r.frame), expected, "{point}");
            let mut first_write = None;
            f.run(&mut |e| {
                if let Event::Written { artifact, bytes } = e {
                    first_write.get_or_insert((*artifact, *bytes));
                }
                Ok(())
            })
            .expect(point);
            let resumed_at = expected.unwrap_or(0) * FRAME;
            match point {
                "verity" => assert_eq!(first_write.map(|w| w.0), Some("verity"), "{point}"),
                _ => assert_eq!(
                    first_write,
                    Some(("root", (resumed_at + FRAME) as u64)),
                    "{point}"
                ),
            }
            assert_eq!(f.partition("root-b", f.root.len()), f.root, "{point}");
            assert_eq!(f.partition("verity-b", f.verity.len()), f.verity, "{point}");
            assert_eq!(
                f.state().in_progress.map(|p| p.stage),
                Some(Stage::Verified)
            );
        }
    }

    #[test]
    fn damage_to_blocks_an_earlier_run_wrote_is_found_and_the_images_rewritten() {
        let f = Fixture::new();
        let root_writes = |e: &Event| {
            matches!(
                e,
                Event::Written {
                    artifact: "root",
                    ..
                }
            )
        };
        f.run(&mut stop_at(8, root_writes)).expect_err("cut");
        assert_eq!(
            f.state()
                .in_progress
                .and_then(|p| p.resume)
                .map(|r| r.frame),
            Some(6)
        );
        // A block of the synced frames changes while the machine is off.
        f.corrupt("root-b", 5 * FRAME as u64 + 100);
        let err = f.run(&mut |_| Ok(())).expect_err("damage found");
        assert!(
            format!("{err:#}").contains("does not match the data it covers"),
            "{err:#}"
        );
        let state = f.state().in_progress.expect("in progress");
        assert_eq!((state.stage, state.resume), (Stage::EntryRemoved, None));
        f.run(&mut |_| Ok(())).expect("rewritten");
        assert_eq!(f.partition("root-b", f.root.len()), f.root);
    }

    #[test]
    fn a_verity_tree_that_does_not_cover_the_root_is_found() {
        let mut f = Fixture::new();
        // A signed release whose tree was made for other data: its own sha256 is right.
        let mut other = f.root.clone();
        other[12_345] ^= 1;
        let oracle = os_config::oracle::veritysetup_format(&other, Some("c0ffee"), None);
        f.manifest.artifacts.verity = store(&f.dir.path().join("release"), &oracle.hash_device);
        let err = f.run(&mut |_| Ok(())).expect_err("mismatch");
        assert!(format!("{err:#}").contains("verity hash block"), "{err:#}");
        // The root hash says which tree is right, even if every block of a tree were consistent.
        let mut f = Fixture::new();
        f.manifest.root_hash = digest(b"another root");
        let err = f.run(&mut |_| Ok(())).expect_err("mismatch");
        assert!(format!("{err:#}").contains("the manifest says"), "{err:#}");
    }

    #[test]
    fn a_partition_written_around_the_page_cache_reads_back_the_same() {
        let f = Fixture::new();
        let disk = Disk::open(&f.dir.path().join("disk.img")).expect("disk");
        let part = disk.partition("root-b").expect("root-b");
        let mut writer = PartitionWriter::open(&disk.path, &part).expect("writer");
        let mut buf = AlignedBuf::new(8192);
        buf.as_mut_slice().fill(0xa5);
        // Aligned (direct where the file system allows it), then an unaligned tail (buffered).
        writer.seek_to(4096);
        writer.write_all(buf.prefix(8192)).expect("aligned");
        writer.write_all(&[1, 2, 3]).expect("tail");
        writer.sync().expect("sync");
        let err = writer
            .write_all(&vec![0u8; 1 << 20])
            .expect_err("past the end");
        assert!(
            err.to_string().contains("do not fit partition root-b"),
            "{err}"
        );
        let mut want = vec![0u8; 4096];
        want.extend([0xa5; 8192]);
        want.extend([1, 2, 3]);
        assert_eq!(f.partition("root-b", want.len()), want);
    }
}
