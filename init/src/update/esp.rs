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

/// An opened ESP. Changes reach the storage on [`Esp::close`]; the caller syncs the device after.
pub struct Esp<S: Storage> {
    fs: fatfs::FileSystem<Shared<S>>,
    storage: Shared<S>,
}

impl<S: Storage> std::fmt::Debug for Esp<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Esp")
    }
}

impl<S: Storage> Esp<S> {
    /// Opens the FAT file system on `storage`.
    pub fn open(storage: S) -> Result<Esp<S>> {
        let storage = Shared(Rc::new(RefCell::new(storage)));
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
            .context("repairing the folder entries of the ESP")
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
    pub fn create_file(&self, path: &str) -> Result<fatfs::File<'_, Shared<S>>> {
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
    pub fn open_file(&self, path: &str) -> Result<fatfs::File<'_, Shared<S>>> {
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
