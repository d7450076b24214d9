//! The GPT of a Plinth disk: where each partition of the layout goes, its derived GUIDs, and
//! writing the protective MBR and both partition tables with the `gpt` crate; reading goes
//! through the one reader, [`os_config::gpt`].

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use gpt::disk::LogicalBlockSize;
use gpt::mbr::ProtectiveMBR;
use gpt::partition::Partition;
use gpt::partition_types::{OperatingSystem, Type};
use gpt::GptConfig;
use os_config::layout::{self, PartitionSpec, Role, ALIGNMENT};
use sha2::{Digest, Sha256};
use uuid::Uuid;

const SECTOR: u64 = 512;

/// One partition placed on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub spec: PartitionSpec,
    /// Offset in bytes from the start of the disk (a multiple of 1 MiB).
    pub start: u64,
    /// Size in bytes (a multiple of 1 MiB).
    pub size: u64,
    /// The partition's unique GUID.
    pub uuid: Uuid,
}

/// Where everything goes on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    pub disk_guid: Uuid,
    pub partitions: Vec<Placed>,
    /// Size of the whole disk in bytes (1 MiB before the first partition and after the last).
    pub total_size: u64,
}

impl DiskPlan {
    /// The partition with the given role.
    pub fn get(&self, role: Role) -> Result<&Placed> {
        self.partitions
            .iter()
            .find(|p| p.spec.role == role)
            .ok_or_else(|| anyhow!("the disk plan has no {role:?} partition"))
    }
}

/// Partition sizes in bytes, each a positive multiple of 1 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub esp: u64,
    pub root: u64,
    pub verity: u64,
    pub state: u64,
}

/// A GUID derived from a seed string: sha256, first 16 bytes, marked as an RFC 4122 version 8
/// (custom) UUID so it never collides with random (version 4) ones.
pub fn derived_uuid(seed: &str) -> Uuid {
    let digest = Sha256::digest(seed.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Places the layout's partitions one after another from 1 MiB. `seed` (image name and version)
/// derives the disk GUID and the GUIDs of every partition except root-a/verity-a, which take the
/// first and last 128 bits of slot A's verity `root_hash` as the DPS says.
pub fn plan(sizes: Sizes, seed: &str, root_hash: &[u8; 32]) -> Result<DiskPlan> {
    let mut start = ALIGNMENT;
    let mut partitions = Vec::new();
    for spec in layout::PARTITIONS {
        let size = match spec.role {
            Role::Esp => sizes.esp,
            Role::Root(_) => sizes.root,
            Role::Verity(_) => sizes.verity,
            Role::State => sizes.state,
        };
        if size == 0 || !size.is_multiple_of(ALIGNMENT) {
            bail!(
                "partition {} size {size} bytes is not a positive whole number of MiB",
                spec.label
            );
        }
        let uuid = match spec.role {
            Role::Root(layout::Slot::A) => Uuid::from_slice(&root_hash[..16])?,
            Role::Verity(layout::Slot::A) => Uuid::from_slice(&root_hash[16..])?,
            _ => derived_uuid(&format!("plinth partition {seed} {}", spec.label)),
        };
        partitions.push(Placed {
            spec,
            start,
            size,
            uuid,
        });
        start += size;
    }
    Ok(DiskPlan {
        disk_guid: derived_uuid(&format!("plinth disk {seed}")),
        partitions,
        total_size: start + ALIGNMENT,
    })
}

/// Writes the protective MBR and the primary and backup GPT of `plan` onto `device`, which must
/// already be `plan.total_size` bytes long. Partition contents are not touched.
pub fn write_gpt<D: Read + Write + Seek + std::fmt::Debug>(
    device: D,
    plan: &DiskPlan,
) -> Result<D> {
    let mut device = device;
    let len = device
        .seek(std::io::SeekFrom::End(0))
        .context("measuring the disk")?;
    if len != plan.total_size {
        bail!(
            "the disk is {len} bytes but its layout needs {}",
            plan.total_size
        );
    }
    let sectors = plan.total_size / SECTOR;
    let mbr = ProtectiveMBR::with_lb_size(u32::try_from(sectors - 1).unwrap_or(u32::MAX));
    mbr.overwrite_lba0(&mut device)
        .context("writing the protective MBR")?;
    let mut disk = GptConfig::new()
        .writable(true)
        .logical_block_size(LogicalBlockSize::Lb512)
        .create_from_device(device, Some(plan.disk_guid))
        .context("creating the GPT")?;
    let mut table = BTreeMap::new();
    for placed in &plan.partitions {
        let type_guid = Uuid::from_str(placed.spec.type_guid)
            .with_context(|| format!("parsing type GUID {}", placed.spec.type_guid))?;
        table.insert(
            placed.spec.number,
            Partition {
                part_type_guid: Type {
                    guid: type_guid,
                    os: OperatingSystem::None,
                },
                part_guid: placed.uuid,
                first_lba: placed.start / SECTOR,
                last_lba: (placed.start + placed.size) / SECTOR - 1,
                flags: 0,
                name: placed.spec.label.to_owned(),
            },
        );
    }
    disk.update_partitions(table)
        .context("setting the GPT partitions")?;
    let device = disk.write().context("writing the GPT")?;
    Ok(device)
}

/// Reads the GPT of a disk through the one reader, [`os_config::gpt::read`]: the primary when
/// its CRCs hold, else the backup.
pub fn read_gpt<D: Read + Seek>(mut device: D) -> Result<os_config::gpt::Table> {
    os_config::gpt::read(&mut device).context("reading the GPT")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const MIB: u64 = 1 << 20;

    fn small() -> Sizes {
        Sizes {
            esp: 2 * MIB,
            root: 3 * MIB,
            verity: MIB,
            state: 2 * MIB,
        }
    }

    #[test]
    fn plan_places_partitions_aligned_with_derived_guids() {
        let hash: [u8; 32] = std::array::from_fn(|i| i as u8);
        let plan = plan(small(), "demo 1.0", &hash).expect("plan");
        let starts: Vec<u64> = plan.partitions.iter().map(|p| p.start / MIB).collect();
        assert_eq!(starts, [1, 3, 6, 7, 10, 11]);
        assert_eq!(plan.total_size, 14 * MIB);
        let root_a = plan.get(Role::Root(layout::Slot::A)).expect("root-a");
        assert_eq!(
            root_a.uuid.to_string(),
            "00010203-0405-0607-0809-0a0b0c0d0e0f"
        );
        let verity_a = plan.get(Role::Verity(layout::Slot::A)).expect("verity-a");
        assert_eq!(
            verity_a.uuid.to_string(),
            "10111213-1415-1617-1819-1a1b1c1d1e1f"
        );
        // Derived, stable, distinct.
        let again = super::plan(small(), "demo 1.0", &hash).expect("plan");
        assert_eq!(plan, again);
        let other = super::plan(small(), "demo 1.1", &hash).expect("plan");
        assert_ne!(plan.disk_guid, other.disk_guid);
        let mut uuids: Vec<Uuid> = plan.partitions.iter().map(|p| p.uuid).collect();
        uuids.push(plan.disk_guid);
        uuids.sort();
        uuids.dedup();
        assert_eq!(uuids.len(), 7);

        let bad = Sizes {
            root: MIB + 5,
            ..small()
        };
        let err = super::plan(bad, "demo", &hash).expect_err("unaligned size");
        assert!(err.to_string().contains("root-a"), "{err}");
    }

    #[test]
    fn gpt_writes_in_memory_and_reads_back() {
        let hash = [0xabu8; 32];
        let plan = plan(small(), "demo 1.0", &hash).expect("plan");
        let device = Cursor::new(vec![0u8; plan.total_size as usize]);
        let device = write_gpt(device, &plan).expect("GPT writes");
        let bytes = device.into_inner();
        // Protective MBR: type 0xEE in the first record, boot signature.
        assert_eq!(bytes[446 + 4], 0xee);
        assert_eq!(&bytes[510..512], &[0x55, 0xaa]);
        assert_eq!(&bytes[512..520], b"EFI PART");
        let backup = bytes.len() - 512;
        assert_eq!(&bytes[backup..backup + 8], b"EFI PART");

        let table = read_gpt(Cursor::new(bytes.clone())).expect("GPT reads");
        assert!(!table.from_backup);
        assert_eq!(table.disk_guid, plan.disk_guid);
        let parts = &table.partitions;
        let labels: Vec<&str> = parts.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(
            labels,
            ["esp", "root-a", "verity-a", "root-b", "verity-b", "state"]
        );
        assert_eq!(parts.len(), plan.partitions.len());
        for (read, placed) in parts.iter().zip(&plan.partitions) {
            assert_eq!(read.number, placed.spec.number);
            assert_eq!(read.type_guid.to_string(), placed.spec.type_guid);
            assert_eq!(read.uuid, placed.uuid);
            assert_eq!((read.start, read.size), (placed.start, placed.size));
        }
        // The backup the writer put at the end reads the same.
        let mut torn = bytes.clone();
        torn[512 + 16] ^= 1;
        let backup = read_gpt(Cursor::new(torn)).expect("backup GPT reads");
        assert!(backup.from_backup);
        assert_eq!(backup.partitions, table.partitions);
        // Deterministic bytes.
        let again = write_gpt(Cursor::new(vec![0u8; plan.total_size as usize]), &plan)
            .expect("GPT writes")
            .into_inner();
        assert!(again == bytes);
    }

    #[test]
    fn wrong_device_size_is_refused() {
        let plan = plan(small(), "demo", &[0; 32]).expect("plan");
        let err = write_gpt(Cursor::new(vec![0u8; 4 << 20]), &plan).expect_err("too small");
        assert!(err.to_string().contains("needs"), "{err}");
    }
}
