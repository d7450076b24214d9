//! Delta updates: the new root image is built in the inactive slot from the chunks of the running
//! slot's root image and, for the chunks it lacks, `chunks/<sha256>.zst` downloaded from the
//! release folder, as the signed chunk index of the manifest ([`os_config::chunk`]) lists them.
//!
//! The chunks the running slot lacks are downloaded first into the staging folder on `/var`
//! (`chunks/<sha256>.zst`) and checked, with the other artifacts, before the other slot changes:
//! a corrupt or missing chunk costs the machine nothing. Every chunk is checked against the
//! index's sha256 again when it is written: a chunk read from the running slot after reading it
//! (so a changed slot costs a download, never a wrong byte), a staged one after decompressing it. The verity tree, kernel and initrd are staged whole as
//! before, and the end check of the full path (read-back of both partitions against the
//! manifest's sha256 and verity root hash) runs unchanged after the root is written.
//!
//! A power cut while the root is written leaves the slot without a boot entry (it was removed
//! first), as in the full path. The next attempt restarts the delta from the first chunk (reading
//! the running slot again is fast; the staged chunks are checked and kept, not downloaded again);
//! once the root is written and synced (stage `root-written`), a resumed update goes on from
//! there.
//!
//! The agent falls back to the full artifacts when the manifest has no index or the running
//! slot's root image cannot be read (no verity superblock, unreadable partition). Releases
//! applied from offline media (`apply --from`) always use the full artifacts.

use std::collections::HashMap;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _};
use os_config::chunk::{self, Chunk, ChunkIndex};
use os_config::layout::{Slot, VeritySuperblock};
use os_config::manifest::{IndexFile, Manifest};
use os_config::slice::Slice;
use sha2::{Digest, Sha256};

use super::apply::{ApplyError, Event, Job, ZSTD_WINDOW_LOG_MAX};
use super::blockdev::Disk;
use super::esp::Esp;
use super::fetch::{FetchError, Source};
use super::state::{InProgress, Stage, State};

/// What a delta update reused and downloaded, for the `update-delta` status line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Chunks copied from the running slot.
    pub reused: u64,
    /// Chunks downloaded (each distinct chunk once).
    pub fetched: u64,
    /// Compressed bytes downloaded: the index and the fetched chunks.
    pub bytes: u64,
    /// Compressed size of the whole root artifact, what the full path downloads instead.
    pub total_bytes: u64,
}

impl Report {
    /// `PLINTH-STATUS update-delta reused=N fetched=M bytes=B total-bytes=T`.
    pub fn status_line(&self) -> String {
        os_config::status::format(
            "update-delta",
            &[
                ("reused", &self.reused.to_string()),
                ("fetched", &self.fetched.to_string()),
                ("bytes", &self.bytes.to_string()),
                ("total-bytes", &self.total_bytes.to_string()),
            ],
        )
    }
}

/// A delta update ready to write: the new image's index and where the running slot holds which
/// of its chunks.
#[derive(Debug)]
pub struct Delta {
    index: ChunkIndex,
    index_bytes: u64,
    /// sha256 → (offset, length) in the running slot's root image, for the chunks the index names.
    local: HashMap<[u8; 32], (u64, u32)>,
    active_root: super::blockdev::Partition,
    /// The staging folder once the missing chunks are staged there (`chunks/<sha256>.zst`).
    staged: Option<PathBuf>,
    /// Chunks and compressed bytes downloaded while staging.
    fetched: u64,
    downloaded: u64,
}

/// Why the delta path is not taken; the full artifacts are used instead.
#[derive(Debug)]
pub enum Plan {
    Delta(Box<Delta>),
    Full { reason: String },
}

/// Fetches and checks the index of `manifest` and chunks the running slot's root image.
/// `Rejected` when the index differs from what the manifest signs; `Failed` on network errors;
/// [`Plan::Full`] when there is no index or the running slot cannot be read.
pub fn prepare(
    source: &Source,
    manifest: &Manifest,
    disk: &mut Disk,
    running: Slot,
    retries: u32,
) -> Result<Plan, ApplyError> {
    let Some(file) = &manifest.root_chunks else {
        return Ok(Plan::Full {
            reason: "the manifest has no chunk index".to_owned(),
        });
    };
    let index = fetch_index(source, file, retries)?;
    if index.total_length() != manifest.artifacts.root.uncompressed_size {
        return Err(ApplyError::Rejected(format!(
            "chunk index: its chunks add up to {} bytes, the root artifact is {} bytes",
            index.total_length(),
            manifest.artifacts.root.uncompressed_size
        )));
    }
    match chunk_running_slot(disk, running, &index) {
        Ok((local, active_root)) => Ok(Plan::Delta(Box::new(Delta {
            index,
            index_bytes: file.size,
            local,
            active_root,
            staged: None,
            fetched: 0,
            downloaded: 0,
        }))),
        Err(e) => Ok(Plan::Full {
            reason: format!("reading the running slot {running}: {e:#}"),
        }),
    }
}

/// Downloads the index (its size is bounded by the manifest) and checks it.
fn fetch_index(source: &Source, file: &IndexFile, retries: u32) -> Result<ChunkIndex, ApplyError> {
    let reader = source
        .open_resuming(&file.path, 0, file.size, retries)
        .map_err(|e| ApplyError::Failed(anyhow!("chunk index: {e}")))?;
    let mut bytes = Vec::with_capacity(file.size as usize);
    reader
        .take(file.size + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ApplyError::Failed(anyhow!("chunk index: {e}")))?;
    let sha = hex::encode(Sha256::digest(&bytes));
    if bytes.len() as u64 != file.size || sha != file.sha256.as_str() {
        return Err(ApplyError::Rejected(format!(
            "chunk index {}: {} bytes with sha256 {sha}, the manifest says {} bytes with sha256 {}",
            file.path,
            bytes.len(),
            file.size,
            file.sha256
        )));
    }
    ChunkIndex::parse(&bytes).map_err(|e| ApplyError::Rejected(e.to_string()))
}

/// Chunks the running slot's root image (its length from the slot's verity superblock) and
/// keeps where each chunk that `wanted` names lies.
#[allow(clippy::type_complexity)]
fn chunk_running_slot(
    disk: &mut Disk,
    running: Slot,
    wanted: &ChunkIndex,
) -> anyhow::Result<(HashMap<[u8; 32], (u64, u32)>, super::blockdev::Partition)> {
    let root = disk.partition(running.root_label())?;
    let verity = disk.partition(running.verity_label())?;
    let mut sb = vec![0u8; 512];
    disk.region(&verity)
        .and_then(|mut r| r.read_exact(&mut sb))
        .with_context(|| format!("reading the verity superblock of {}", verity.label))?;
    let sb =
        VeritySuperblock::parse(&sb).map_err(|e| anyhow!("partition {}: {e}", verity.label))?;
    sb.check_fits(&root.label, root.size, &verity.label, verity.size)
        .map_err(|e| anyhow!(e))?;
    let wanted: std::collections::HashSet<&[u8; 32]> =
        wanted.chunks.iter().map(|c| &c.sha256).collect();
    let mut local = HashMap::new();
    let mut file = std::fs::File::open(&disk.path)
        .with_context(|| format!("opening {}", disk.path.display()))?;
    let region = Slice::new(&mut file, root.start, root.size).take(sb.data_bytes());
    chunk::for_each_chunk(
        io::BufReader::with_capacity(1 << 20, region),
        |offset, data| {
            let sha = chunk::digest(data);
            if wanted.contains(&sha) {
                local.entry(sha).or_insert((offset, data.len() as u32));
            }
            Ok(())
        },
    )
    .with_context(|| format!("reading partition {}", root.label))?;
    Ok((local, root))
}

impl Delta {
    /// The chunks the running slot lacks, each once.
    fn missing(&self) -> Vec<&Chunk> {
        let mut seen = std::collections::HashSet::new();
        self.index
            .chunks
            .iter()
            .filter(|c| !self.local.contains_key(&c.sha256) && seen.insert(c.sha256))
            .collect()
    }

    /// Downloads the chunks the running slot lacks into `dir/chunks/` (normally the staging
    /// folder on `/var`) and checks each against the index, before anything of the other slot
    /// changes: a corrupt chunk refuses the release while the other slot is still intact.
    /// Chunks staged by an interrupted attempt are checked and kept; files of other releases are
    /// removed.
    pub fn stage_chunks(
        &mut self,
        source: &Source,
        dir: &Path,
        retries: u32,
    ) -> Result<(), ApplyError> {
        let chunks_dir = dir.join("chunks");
        std::fs::create_dir_all(&chunks_dir)
            .with_context(|| format!("creating {}", chunks_dir.display()))?;
        let missing = self.missing();
        let keep: std::collections::HashSet<PathBuf> =
            missing.iter().map(|c| dir.join(c.path())).collect();
        for entry in std::fs::read_dir(&chunks_dir)
            .with_context(|| format!("reading {}", chunks_dir.display()))?
        {
            let path = entry
                .with_context(|| format!("reading {}", chunks_dir.display()))?
                .path();
            if !keep.contains(&path) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        let local = Source::Dir(dir.to_owned());
        let mut buf = vec![0u8; chunk::MAX_CHUNK];
        let (mut fetched, mut downloaded) = (0, 0);
        for c in missing {
            let data = &mut buf[..c.length as usize];
            let path = dir.join(c.path());
            fetched += 1;
            if path.exists() && fetch_chunk(&local, c, data, 0).is_ok() {
                continue;
            }
            let compressed = fetch_chunk(source, c, data, retries)?;
            downloaded += compressed.len() as u64;
            let part = path.with_extension("zst.part");
            std::fs::write(&part, &compressed)
                .and_then(|()| std::fs::File::open(&part)?.sync_all())
                .and_then(|()| std::fs::rename(&part, &path))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        std::fs::File::open(&chunks_dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", chunks_dir.display()))?;
        self.staged = Some(dir.to_owned());
        self.fetched = fetched;
        self.downloaded = downloaded;
        Ok(())
    }

    /// Removes `slot`'s boot entry, writes the new root image into its root partition chunk by
    /// chunk, syncs, and records the stage `root-written` in `state`, so that the full path's
    /// [`super::apply::apply`] goes on from there with the verity tree and the end check.
    pub fn write_root(
        &self,
        job: &Job<'_>,
        disk: &mut Disk,
        state: &mut State,
        state_path: &Path,
        hook: &mut dyn FnMut(&Event) -> anyhow::Result<()>,
    ) -> Result<Report, ApplyError> {
        let (manifest, slot) = (job.manifest, job.slot);
        let record = |state: &mut State, stage: Stage| -> anyhow::Result<()> {
            state.in_progress = Some(InProgress {
                version: manifest.version.clone(),
                slot,
                manifest_sha256: job.manifest_sha256.to_owned(),
                stage,
                resume: None,
            });
            state.save(state_path)
        };
        // The same stages as the full path: accepted, then the entry goes, then the partition
        // may be half written.
        record(state, Stage::Accepted)?;
        hook(&Event::Stage(Stage::Accepted))?;
        let esp_part = disk.partition("esp")?;
        {
            let esp = Esp::open(disk.region(&esp_part).context("opening the ESP")?)?;
            esp.remove_slot_entries(slot)?;
            esp.close()?;
        }
        disk.sync()?;
        record(state, Stage::EntryRemoved)?;
        hook(&Event::Stage(Stage::EntryRemoved))?;

        let target = disk.partition(slot.root_label())?;
        if self.index.total_length() > target.size {
            return Err(ApplyError::Rejected(format!(
                "artifact root: {} bytes do not fit partition {} ({} bytes)",
                self.index.total_length(),
                target.label,
                target.size
            )));
        }
        let mut report = Report {
            bytes: self.index_bytes + self.downloaded,
            fetched: self.fetched,
            total_bytes: manifest.artifacts.root.size,
            ..Report::default()
        };
        let staged = self.staged.clone().map(Source::Dir);
        let disk_path = disk.path.clone();
        let mut reader = std::fs::File::open(&disk_path)
            .with_context(|| format!("opening {}", disk_path.display()))?;
        let mut out = disk
            .region(&target)
            .with_context(|| format!("opening partition {}", target.label))?;
        // Chunks downloaded once and wanted again are read back from where they were written.
        let mut fetched: HashMap<[u8; 32], u64> = HashMap::new();
        let mut buf = vec![0u8; chunk::MAX_CHUNK];
        for c in &self.index.chunks {
            let data = &mut buf[..c.length as usize];
            let from_disk = |at: Option<(u64, u64)>, file: &mut std::fs::File, data: &mut [u8]| {
                let Some((start, offset)) = at else {
                    return Ok(false);
                };
                file.seek(SeekFrom::Start(start + offset))
                    .and_then(|_| file.read_exact(data))
                    .with_context(|| format!("reading {}", disk_path.display()))?;
                anyhow::Ok(chunk::digest(data) == c.sha256)
            };
            let local = self
                .local
                .get(&c.sha256)
                .filter(|(_, len)| *len == c.length)
                .map(|(offset, _)| (self.active_root.start, *offset));
            let again = fetched.get(&c.sha256).map(|offset| (target.start, *offset));
            let from_staging = |data: &mut [u8]| {
                staged.as_ref().is_some_and(|dir| {
                    !self.local.contains_key(&c.sha256) && fetch_chunk(dir, c, data, 0).is_ok()
                })
            };
            if from_disk(local, &mut reader, data)? {
                report.reused += 1;
            } else if from_disk(again, &mut reader, data)? {
                // Already counted when it was downloaded.
            } else if from_staging(data) {
                // Counted when it was staged.
                fetched.insert(c.sha256, c.offset);
            } else {
                // A chunk of the running slot that changed since it was chunked.
                report.bytes += fetch_chunk(job.source, c, data, job.retries)?.len() as u64;
                report.fetched += 1;
                fetched.insert(c.sha256, c.offset);
            }
            out.write_all(data)
                .with_context(|| format!("writing partition {}", target.label))?;
            hook(&Event::Written {
                artifact: "root",
                bytes: c.offset + u64::from(c.length),
            })?;
        }
        out.flush()
            .and_then(|()| out.get_mut().sync_data())
            .with_context(|| format!("writing partition {}", target.label))?;
        disk.sync()?;
        record(state, Stage::RootWritten)?;
        Ok(report)
    }
}

/// Downloads `chunks/<sha256>.zst`, decompresses it into `data` and checks it against the index;
/// returns the compressed bytes.
fn fetch_chunk(
    source: &Source,
    c: &Chunk,
    data: &mut [u8],
    retries: u32,
) -> Result<Vec<u8>, ApplyError> {
    let path = c.path();
    let size = u64::from(c.compressed_length);
    let reader = match source.open_resuming(&path, 0, size, retries) {
        Ok(r) => r,
        Err(FetchError::NotFound(what)) => {
            return Err(ApplyError::Failed(anyhow!(
                "chunk at byte {} of the root image is missing on the server ({what}): the release folder lacks chunks its index names; publish the release again",
                c.offset
            )))
        }
        Err(e) => return Err(ApplyError::Failed(anyhow!("chunk {path}: {e}"))),
    };
    let mut compressed = Vec::with_capacity(size as usize);
    reader
        .take(size + 1)
        .read_to_end(&mut compressed)
        .map_err(|e| ApplyError::Failed(anyhow!("chunk {path}: {e}")))?;
    let rejected = |why: String| {
        ApplyError::Rejected(format!(
            "chunk {} at byte {} of the root image: {why}",
            source.describe(&path),
            c.offset
        ))
    };
    if compressed.len() as u64 != size {
        return Err(rejected(format!(
            "the download is {}{} bytes, the index says {size}",
            if compressed.len() as u64 > size {
                "more than "
            } else {
                ""
            },
            compressed.len().min(size as usize)
        )));
    }
    let mut decoder = zstd::stream::read::Decoder::new(&compressed[..])
        .and_then(|mut d| d.window_log_max(ZSTD_WINDOW_LOG_MAX).map(|()| d))
        .map_err(|e| rejected(format!("does not decompress: {e}")))?;
    let mut content = Vec::with_capacity(data.len());
    (&mut decoder)
        .take(data.len() as u64 + 1)
        .read_to_end(&mut content)
        .map_err(|e| rejected(format!("does not decompress: {e}")))?;
    let sha = chunk::digest(&content);
    if content.len() != data.len() || sha != c.sha256 {
        return Err(rejected(format!(
            "decompresses to {} bytes with sha256 {}, the index says {} bytes with sha256 {}",
            content.len(),
            hex::encode(sha),
            data.len(),
            hex::encode(c.sha256)
        )));
    }
    data.copy_from_slice(&content);
    Ok(compressed)
}
