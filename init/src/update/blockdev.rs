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
