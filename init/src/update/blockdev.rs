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
        // The one reader checks the table (entry size and count, CRCs) before the `gpt` crate,
        // which asserts on what it reads, is handed the disk.
        read_partitions(&mut self.file, &self.path)?;
        let mut gpt = gpt::GptConfig::new()
            .writable(true)
            .open_from_device(&mut self.file)
            .with_context(context)?;
        let mut parts = gpt.partitions().clone();
        for part in parts.values_mut() {
            if part.name == slot.root_label() {
                part.part_guid = uuid::Uuid::from_bytes(root_uuid);
            } else if part.name == slot.verity_label() {
                part.part_guid = uuid::Uuid::from_bytes(verity_uuid);
            }
        }
        gpt.update_partitions(parts).with_context(context)?;
        gpt.write_inplace().with_context(context)?;
        drop(gpt);
        self.sync()?;
        self.partitions = read_partitions(&mut self.file, &self.path)?;
        Ok(())
    }
}

/// Reads the partitions through the one GPT reader (the primary, or the backup when the primary
/// is damaged); this also checks the entry size and count before the `gpt` crate sees the table.
fn read_partitions(file: &mut fs::File, path: &Path) -> Result<Vec<Partition>> {
    let table =
        os_config::gpt::read(file).with_context(|| format!("reading GPT of {}", path.display()))?;
    Ok(table.partitions)
}
