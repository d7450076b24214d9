//! The EFI system partition, read and written in-process through the FAT driver (no mount): boot
//! entries, each slot's kernel and initrd, blessing.

use std::cell::RefCell;
use std::io::{self, Read, Seek, Write};
use std::rc::Rc;

use anyhow::{bail, Context, Result};

use os_config::boot::{EntryName, ENTRIES_DIR};
use os_config::layout::Slot;

/// An ESP path without its leading slash, as the FAT driver takes it.
fn rel(path: &str) -> &str {
    path.trim_start_matches('/')
}

/// Storage the FAT driver works on.
pub trait Storage: Read + Write + Seek {}
impl<T: Read + Write + Seek> Storage for T {}

/// The storage, shared between the FAT driver and [`Esp::close`], which repairs the folder
/// entries the driver wrote once it has flushed.
#[derive(Debug)]
pub struct Shared<S>(Rc<RefCell<S>>);

impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Shared(Rc::clone(&self.0))
    }
}

impl<S: Read> Read for Shared<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

impl<S: Write> Write for Shared<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

impl<S: Seek> Seek for Shared<S> {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        self.0.borrow_mut().seek(to)
    }
}

/// Size of a cached block: the FAT driver reads and writes FAT entries (4 bytes) and folder
/// entries (32 bytes) one at a time, each a seek and a system call on the device; cached, a
/// cluster allocation touches memory instead.
const BLOCK: usize = 4096;
/// Blocks kept at most (1 MiB); when full, dirty ones are written and all are dropped.
const CACHED_BLOCKS: usize = 256;

/// A write-back block cache between the FAT driver and the device. Small reads and writes go
/// through 4 KiB blocks kept in memory; whole aligned blocks (file data, a cluster at a time)
/// go straight to the device, updating a cached copy. Dirty blocks reach the device on
/// `flush` (the driver's unmount, [`Esp::close`]), when the cache is full, or on drop.
pub struct BlockCache<S: Read + Write + Seek> {
    inner: S,
    blocks: std::collections::HashMap<u64, (Box<[u8]>, bool)>,
    pos: u64,
    len: u64,
}

impl<S: Read + Write + Seek> BlockCache<S> {
    /// A cache over `inner`, whose length is its end.
    pub fn new(mut inner: S) -> io::Result<BlockCache<S>> {
        let len = inner.seek(io::SeekFrom::End(0))?;
        Ok(BlockCache {
            inner,
            blocks: std::collections::HashMap::new(),
            pos: 0,
            len,
        })
    }

    /// Block `index`, read from the device unless cached.
    fn block(&mut self, index: u64) -> io::Result<&mut (Box<[u8]>, bool)> {
        if !self.blocks.contains_key(&index) {
            if self.blocks.len() >= CACHED_BLOCKS {
                self.write_dirty()?;
                self.blocks.clear();
            }
            let mut data = vec![0u8; BLOCK].into_boxed_slice();
            let start = index * BLOCK as u64;
            let valid = (self.len.saturating_sub(start)).min(BLOCK as u64) as usize;
            self.inner.seek(io::SeekFrom::Start(start))?;
            self.inner.read_exact(&mut data[..valid])?;
            self.blocks.insert(index, (data, false));
        }
        self.blocks
            .get_mut(&index)
            .ok_or_else(|| io::Error::other("block cache lost a block"))
    }

    /// Writes the dirty blocks to the device, in order.
    fn write_dirty(&mut self) -> io::Result<()> {
        let mut dirty: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, (_, d))| *d)
            .map(|(i, _)| *i)
            .collect();
        dirty.sort_unstable();
        for index in dirty {
            let start = index * BLOCK as u64;
            let valid = (self.len.saturating_sub(start)).min(BLOCK as u64) as usize;
            if let Some((data, is_dirty)) = self.blocks.get_mut(&index) {
                self.inner.seek(io::SeekFrom::Start(start))?;
                self.inner.write_all(&data[..valid])?;
                *is_dirty = false;
            }
        }
        Ok(())
    }

    /// Whether `[pos, pos + n)` is one whole block.
    fn whole_block(&self, n: usize) -> bool {
        n == BLOCK && self.pos.is_multiple_of(BLOCK as u64)
    }
}

impl<S: Read + Write + Seek> Read for BlockCache<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if n == 0 {
            return Ok(0);
        }
        let index = self.pos / BLOCK as u64;
        if self.whole_block(n.min(BLOCK)) && !self.blocks.contains_key(&index) {
            self.inner.seek(io::SeekFrom::Start(self.pos))?;
            self.inner.read_exact(&mut buf[..BLOCK])?;
            self.pos += BLOCK as u64;
            return Ok(BLOCK);
        }
        let offset = (self.pos % BLOCK as u64) as usize;
        let n = n.min(BLOCK - offset);
        let (data, _) = self.block(index)?;
        buf[..n].copy_from_slice(&data[offset..offset + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl<S: Read + Write + Seek> Write for BlockCache<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if n == 0 {
            if buf.is_empty() {
                return Ok(0);
            }
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the ESP",
            ));
        }
        let index = self.pos / BLOCK as u64;
        if self.whole_block(n.min(BLOCK)) {
            self.inner.seek(io::SeekFrom::Start(self.pos))?;
            self.inner.write_all(&buf[..BLOCK])?;
            if let Some((data, dirty)) = self.blocks.get_mut(&index) {
                data.copy_from_slice(&buf[..BLOCK]);
                *dirty = false;
            }
            self.pos += BLOCK as u64;
            return Ok(BLOCK);
        }
        let offset = (self.pos % BLOCK as u64) as usize;
        let n = n.min(BLOCK - offset);
        let (data, dirty) = self.block(index)?;
        data[offset..offset + n].copy_from_slice(&buf[..n]);
        *dirty = true;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_dirty()?;
        self.inner.flush()
    }
}

impl<S: Read + Write + Seek> Seek for BlockCache<S> {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        let target = match to {
            io::SeekFrom::Start(p) => Some(p),
            io::SeekFrom::End(d) => self.len.checked_add_signed(d),
            io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the ESP",
            )
        })?;
        Ok(self.pos)
    }
}

impl<S: Read + Write + Seek> Drop for BlockCache<S> {
    fn drop(&mut self) {
        // An ESP dropped without `close` (an error path) still gets what was written, as
        // without the cache.
        let _ = self.write_dirty();
    }
}

/// An opened ESP. Changes reach the storage on [`Esp::close`]; the caller syncs the device after.
pub struct Esp<S: Storage> {
    fs: fatfs::FileSystem<Shared<BlockCache<S>>>,
    storage: Shared<BlockCache<S>>,
}

impl<S: Storage> std::fmt::Debug for Esp<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Esp")
    }
}

impl<S: Storage> Esp<S> {
    /// Opens the FAT file system on `storage`.
    pub fn open(storage: S) -> Result<Esp<S>> {
        let cache = BlockCache::new(storage).context("opening the ESP")?;
        let storage = Shared(Rc::new(RefCell::new(cache)));
        let fs = fatfs::FileSystem::new(storage.clone(), fatfs::FsOptions::new())
            .context("opening the FAT file system of the ESP")?;
        Ok(Esp { fs, storage })
    }

    /// Flushes the FAT and directory entries, repairs the `.`/`..` entries of any folder the
    /// FAT driver created (an image older than the builder's up-front slot folders lacks
    /// `/plinth/b`) with the builder's repair, so the ESP stays clean for `fsck.vfat` and
    /// firmware, and releases the storage.
    pub fn close(self) -> Result<()> {
        let Esp { fs, mut storage } = self;
        fs.unmount().context("flushing the ESP")?;
        os_config::fat::repair_dot_entries(&mut storage)
            .context("repairing the folder entries of the ESP")?;
        storage.flush().context("writing the ESP")
    }

    /// The Plinth boot entries present, with their file names.
    pub fn entries(&self) -> Result<Vec<EntryName>> {
        let dir = match self.fs.root_dir().open_dir(rel(ENTRIES_DIR)) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).context("opening loader/entries on the ESP"),
        };
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry.context("listing loader/entries on the ESP")?;
            if let Some(name) = EntryName::parse(&entry.file_name()) {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// The entries of one slot.
    pub fn slot_entries(&self, slot: Slot) -> Result<Vec<EntryName>> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|e| e.slot == slot)
            .collect())
    }

    /// Removes every entry of `slot`; returns how many were removed.
    pub fn remove_slot_entries(&self, slot: Slot) -> Result<usize> {
        let entries = self.slot_entries(slot)?;
        for entry in &entries {
            let path = format!("{}/{}", rel(ENTRIES_DIR), entry.file_name());
            self.fs
                .root_dir()
                .remove(&path)
                .with_context(|| format!("removing {path} from the ESP"))?;
        }
        Ok(entries.len())
    }

    /// Creates (or truncates) a file, creating its folders, and returns it for writing.
    pub fn create_file(&self, path: &str) -> Result<fatfs::File<'_, Shared<BlockCache<S>>>> {
        let path = rel(path);
        let root = self.fs.root_dir();
        let mut dir_path = String::new();
        if let Some((parents, _)) = path.rsplit_once('/') {
            for part in parents.split('/') {
                if !dir_path.is_empty() {
                    dir_path.push('/');
                }
                dir_path.push_str(part);
                root.create_dir(&dir_path)
                    .with_context(|| format!("creating {dir_path} on the ESP"))?;
            }
        }
        let mut file = root
            .create_file(path)
            .with_context(|| format!("creating {path} on the ESP"))?;
        file.truncate()
            .with_context(|| format!("truncating {path} on the ESP"))?;
        Ok(file)
    }

    /// Opens a file for reading.
    pub fn open_file(&self, path: &str) -> Result<fatfs::File<'_, Shared<BlockCache<S>>>> {
        let path = rel(path);
        self.fs
            .root_dir()
            .open_file(path)
            .with_context(|| format!("opening {path} on the ESP"))
    }

    /// Writes a whole small file.
    pub fn write_file(&self, path: &str, data: &[u8]) -> Result<()> {
        let mut file = self.create_file(path)?;
        file.write_all(data)
            .and_then(|()| file.flush())
            .with_context(|| format!("writing {path} on the ESP"))
    }

    /// Reads a whole small file.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        self.open_file(path)?
            .read_to_end(&mut data)
            .with_context(|| format!("reading {path} on the ESP"))?;
        Ok(data)
    }

    /// Renames an entry (boot counting and blessing are renames).
    pub fn rename_entry(&self, from: &EntryName, to: &EntryName) -> Result<()> {
        let dir = self
            .fs
            .root_dir()
            .open_dir(rel(ENTRIES_DIR))
            .context("opening loader/entries on the ESP")?;
        dir.rename(&from.file_name(), &dir, &to.file_name())
            .with_context(|| {
                format!(
                    "renaming loader/entries/{} to {} on the ESP",
                    from.file_name(),
                    to.file_name()
                )
            })
    }
}

/// What [`bless`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blessed {
    /// The counted entry was renamed to its plain name.
    Blessed { from: String, to: String },
    /// The entry had no counter: nothing to do.
    AlreadyGood,
}

/// Marks the running boot good: renames `plinth-<slot>-<version>+L[-D].conf` to
/// `plinth-<slot>-<version>.conf`. The caller syncs the device afterwards.
pub fn bless<S: Storage>(esp: &Esp<S>, slot: Slot, version: &str) -> Result<Blessed> {
    let entries = esp.slot_entries(slot)?;
    let Some(entry) = entries.iter().find(|e| e.version == version) else {
        bail!("the ESP has no boot entry for slot {slot} version {version}");
    };
    match entry.counter {
        None => Ok(Blessed::AlreadyGood),
        Some(_) => {
            let good = entry.blessed();
            esp.rename_entry(entry, &good)?;
            Ok(Blessed::Blessed {
                from: entry.file_name(),
                to: good.file_name(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// Counts the device's system calls' worth of operations.
    struct Counting {
        inner: Cursor<Vec<u8>>,
        ops: usize,
    }

    impl Read for Counting {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.ops += 1;
            self.inner.read(buf)
        }
    }
    impl Write for Counting {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.ops += 1;
            self.inner.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Seek for Counting {
        fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
            self.inner.seek(to)
        }
    }

    #[test]
    fn the_block_cache_reads_and_writes_as_the_device_would() {
        // A device whose length is not a whole number of blocks.
        let len = 10 * BLOCK + 100;
        let mut model: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let device = Counting {
            inner: Cursor::new(model.clone()),
            ops: 0,
        };
        let mut cache = BlockCache::new(device).expect("cache");
        let mut x = 12345u64;
        for round in 0..2000usize {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x % len as u64) as usize;
            // Small pieces mostly, whole aligned blocks sometimes.
            let (at, n) = if round.is_multiple_of(10) {
                let block = at / BLOCK * BLOCK;
                (block, BLOCK.min(len - block))
            } else {
                (at, ((x >> 20) % 40) as usize + 1)
            };
            let n = n.min(len - at);
            cache.seek(io::SeekFrom::Start(at as u64)).expect("seek");
            if x.is_multiple_of(3) {
                let data: Vec<u8> = (0..n).map(|i| (round + i) as u8).collect();
                cache.write_all(&data).expect("write");
                model[at..at + n].copy_from_slice(&data);
            } else {
                let mut got = vec![0u8; n];
                cache.read_exact(&mut got).expect("read");
                assert_eq!(got, model[at..at + n], "round {round} at {at}+{n}");
            }
        }
        cache.flush().expect("flush");
        // Writing past the end fails; reading there gives nothing.
        cache.seek(io::SeekFrom::End(0)).expect("end");
        assert!(cache.write(b"x").is_err());
        assert_eq!(cache.read(&mut [0u8; 8]).expect("read at end"), 0);
        let ops = cache.inner.ops;
        let device = std::mem::replace(&mut cache.inner.inner, Cursor::new(Vec::new()));
        assert_eq!(device.into_inner(), model, "the device holds every write");
        assert!(
            ops < 2000,
            "{ops} device operations for 2000 small reads and writes"
        );
    }

    #[test]
    fn dirty_blocks_reach_the_device_when_the_cache_is_dropped() {
        let mut device = vec![0u8; 3 * BLOCK];
        {
            let mut cache = BlockCache::new(Cursor::new(&mut device)).expect("cache");
            cache.seek(io::SeekFrom::Start(5000)).expect("seek");
            cache.write_all(b"plinth").expect("write");
        }
        assert_eq!(&device[5000..5006], b"plinth");
    }
}
