//! The boot disk: its GPT partitions found by label, byte ranges of it used as devices, durable
//! writes (fsync, then dropping cached pages so read-back checks the medium) and the rewrite of a
//! slot's partition UUIDs.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use os_config::layout::Slot;
use os_config::slice::Slice;

/// A GPT partition of the boot disk, as the one GPT reader gives it.
pub use os_config::gpt::Partition;

/// The boot disk (a block device, or a file in tests), opened read-write.
#[derive(Debug)]
pub struct Disk {
    pub path: PathBuf,
    file: fs::File,
    partitions: Vec<Partition>,
}

impl Disk {
    /// Opens the disk and reads its partition table.
    pub fn open(path: &Path) -> Result<Disk> {
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening boot disk {}", path.display()))?;
        let partitions = read_partitions(&mut file, path)?;
        Ok(Disk {
            path: path.to_owned(),
            file,
            partitions,
        })
    }

    /// All partitions.
    pub fn partitions(&self) -> &[Partition] {
        &self.partitions
    }

    /// The partition with this GPT label.
    pub fn partition(&self, label: &str) -> Result<Partition> {
        self.partitions
            .iter()
            .find(|p| p.label == label)
            .cloned()
            .with_context(|| {
                format!(
                    "boot disk {} has no partition labelled `{label}`",
                    self.path.display()
                )
            })
    }

    /// A partition as a device of its own.
    pub fn region(&mut self, part: &Partition) -> io::Result<Slice<&mut fs::File>> {
        Ok(Slice::new(&mut self.file, part.start, part.size))
    }

    /// Flushes everything written to the medium, then drops cached pages so later reads come
    /// from the medium.
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .sync_all()
            .with_context(|| format!("syncing {}", self.path.display()))?;
        rustix::fs::fadvise(&self.file, 0, 0, rustix::fs::Advice::DontNeed)
            .with_context(|| format!("dropping cached pages of {}", self.path.display()))?;
        Ok(())
    }

    /// Sets the partition UUIDs of `slot` to the halves of `root_hash` (DPS), in the primary and
    /// the backup GPT, and syncs.
    pub fn set_slot_uuids(&mut self, slot: Slot, root_hash: &[u8; 32]) -> Result<()> {
        let (root_uuid, verity_uuid) = os_config::manifest::slot_partition_uuids(root_hash);
        let context = || format!("rewriting the GPT of {}", self.path.display());
        let table = os_config::gpt::read(&mut self.file).with_context(context)?;
        let header = &table.header;
        let mut entries =
            os_config::gpt::read_entry_array(&mut self.file, header).with_context(context)?;
        for part in &table.partitions {
            let uuid = if part.label == slot.root_label() {
                root_uuid
            } else if part.label == slot.verity_label() {
                verity_uuid
            } else {
                continue;
            };
            let entry = os_config::gpt::entry_mut(&mut entries, header, part.number)
                .with_context(context)?;
            entry[os_config::gpt::ENTRY_UUID..os_config::gpt::ENTRY_UUID + 16]
                .copy_from_slice(&uuid::Uuid::from_bytes(uuid).to_bytes_le());
        }
        // Where the backup is now (a table read from the backup has it at its own LBA).
        let alternate_lba = if header.my_lba == 1 {
            header.alternate_lba
        } else {
            header.my_lba
        };
        os_config::gpt::write_in_place(
            &mut self.file,
            header,
            &entries,
            alternate_lba,
            header.last_usable_lba,
            |file| file.sync_data(),
        )
        .with_context(context)?;
        self.sync()?;
        self.partitions = read_partitions(&mut self.file, &self.path)?;
        Ok(())
    }
}

/// Reads the partitions through the one GPT reader (the primary, or the backup when the primary
/// is damaged).
fn read_partitions(file: &mut fs::File, path: &Path) -> Result<Vec<Partition>> {
    let table =
        os_config::gpt::read(file).with_context(|| format!("reading GPT of {}", path.display()))?;
    Ok(table.partitions)
}

/// Alignment of [`AlignedBuf`] and of `O_DIRECT` writes: the largest logical block size of a disk.
pub const DIRECT_ALIGN: usize = 4096;

/// A byte buffer whose start is [`DIRECT_ALIGN`]-aligned, as `O_DIRECT` needs (allocated once,
/// reused for every piece).
#[derive(Debug)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// The whole buffer.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    /// Its first `n` bytes.
    pub fn prefix(&self, n: usize) -> &[u8] {
        &self.storage[self.start..self.start + n.min(self.len)]
    }
}

/// A partition written with `O_DIRECT` where the file system or device allows it: the device
/// receives (by DMA) the very buffer the caller hashed, with no page-cache copy in between that
/// could be written back later or differ, and the cache is not filled with a slot's worth of
/// pages. Pieces that are not [`DIRECT_ALIGN`]-aligned (the tail of an artifact), and every write
/// when `O_DIRECT` is refused (tmpfs, some file systems), go through the ordinary descriptor.
#[derive(Debug)]
pub struct PartitionWriter {
    buffered: fs::File,
    direct: Option<fs::File>,
    start: u64,
    size: u64,
    position: u64,
    label: String,
}

impl PartitionWriter {
    /// Opens `part` of the disk at `path` for writing from its start.
    pub fn open(path: &Path, part: &Partition) -> Result<PartitionWriter> {
        PartitionWriter::open_range(path, part.start, part.size, &part.label)
    }

    /// Opens the `size` bytes of the disk at `path` from byte `start` for writing from their
    /// start; `label` names the range in messages (`partition {label}`).
    pub fn open_range(path: &Path, start: u64, size: u64, label: &str) -> Result<PartitionWriter> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let buffered = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening {} to write partition {label}", path.display()))?;
        let aligned = start.is_multiple_of(DIRECT_ALIGN as u64);
        let direct = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
            .filter(|_| aligned);
        Ok(PartitionWriter {
            buffered,
            direct,
            start,
            size,
            position: 0,
            label: label.to_owned(),
        })
    }

    /// Writes `len` zero bytes at the current position: with `BLKZEROOUT` on a block device (the
    /// device zeroes or unmaps the range itself, fast on virtual and thin disks), else, when the
    /// ioctl is refused (a regular file, an unaligned range), by writing zeros.
    pub fn write_zeros(&mut self, len: u64) -> io::Result<()> {
        use std::io::Write as _;
        use std::os::fd::AsFd as _;
        if len > self.size.saturating_sub(self.position) {
            // The ordinary write path names the range and partition.
            return self.write(&vec![0u8; len as usize]).map(|_| ());
        }
        let at = self.start + self.position;
        if crate::syscall::zero_range(self.buffered.as_fd(), at, len).is_ok() {
            self.position += len;
            return Ok(());
        }
        const PIECE: usize = 1 << 20;
        let zeros = AlignedBuf::new(PIECE);
        let mut left = len;
        while left > 0 {
            let n = left.min(PIECE as u64) as usize;
            self.write_all(zeros.prefix(n))?;
            left -= n as u64;
        }
        Ok(())
    }

    /// Whether writes go around the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Continues writing at `offset` bytes into the partition.
    pub fn seek_to(&mut self, offset: u64) {
        self.position = offset;
    }

    /// Makes everything written durable: both descriptors' data, and the device's write cache.
    pub fn sync(&mut self) -> io::Result<()> {
        if let Some(direct) = &self.direct {
            direct.sync_data()?;
        }
        self.buffered.sync_data()
    }
}

impl io::Write for PartitionWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt as _;
        let room = self.size.saturating_sub(self.position);
        if buf.len() as u64 > room {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "{} bytes at offset {} do not fit partition {} ({} bytes)",
                    buf.len(),
                    self.position,
                    self.label,
                    self.size
                ),
            ));
        }
        let at = self.start + self.position;
        let aligned = (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
            && buf.len().is_multiple_of(DIRECT_ALIGN)
            && at.is_multiple_of(DIRECT_ALIGN as u64);
        match &self.direct {
            Some(direct) if aligned => match direct.write_all_at(buf, at) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // The file system takes O_DIRECT opens but not the writes: buffered from now.
                    self.direct = None;
                    self.buffered.write_all_at(buf, at)?;
                }
                other => other?,
            },
            _ => self.buffered.write_all_at(buf, at)?,
        }
        self.position += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads `len` bytes at byte `start` of `path` from the medium, not from the page cache (O_DIRECT
/// where the file system or device allows it, else (tmpfs) buffered reads after dropping the
/// range's cached pages), handing each piece to `visit`.
pub fn read_back(path: &Path, start: u64, len: u64, visit: &mut dyn FnMut(&[u8])) -> Result<()> {
    use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
    const PIECE: usize = 4 << 20;
    let context = || {
        format!(
            "reading back {len} bytes at byte {start} of {}",
            path.display()
        )
    };
    let buffered = fs::File::open(path).with_context(context)?;
    let mut direct = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok();
    // Pages cached by earlier buffered writes must not answer the buffered reads.
    rustix::fs::fadvise(&buffered, start, len, rustix::fs::Advice::DontNeed)
        .with_context(context)?;
    let mut buf = AlignedBuf::new(PIECE);
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(PIECE as u64) as usize;
        let at = start + done;
        let piece = &mut buf.as_mut_slice()[..n];
        let aligned = n.is_multiple_of(DIRECT_ALIGN) && at.is_multiple_of(DIRECT_ALIGN as u64);
        match &direct {
            Some(file) if aligned => match file.read_exact_at(piece, at) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // The file system takes O_DIRECT opens but not the reads.
                    direct = None;
                    continue;
                }
                other => other.with_context(context)?,
            },
            _ => buffered.read_exact_at(piece, at).with_context(context)?,
        }
        visit(piece);
        done += n as u64;
    }
    Ok(())
}

/// The sha256 of `len` bytes at byte `start` of `path`, read from the medium ([`read_back`]).
pub fn hash_range(path: &Path, start: u64, len: u64) -> Result<[u8; 32]> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    read_back(path, start, len, &mut |piece| hasher.update(piece))?;
    Ok(hasher.finalize().into())
}
