//! Growing the `state` partition and its ext4 filesystem to fill the disk, re-run at every boot.
//!
//! When the disk is larger than the image (a resized raw file, a cloud disk), the backup GPT no
//! longer sits at the last LBA. Stage 1 then moves the backup GPT to the end, extends the last
//! partition (`state`) to the last usable LBA aligned down to 1 MiB, tells the kernel with
//! `BLKPG_RESIZE_PARTITION`, and grows the mounted ext4 online. Every step checks the current
//! state first, so a run interrupted by a power cut is finished by the next boot and a finished
//! one is a no-op. The backup GPT is written (and flushed) before the primary.

use crate::stage1::Stage1;
use crate::system::System;
use anyhow::{anyhow, bail, Context as _, Result};
use os_config::gpt;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Alignment of the grown partition's end.
pub const ALIGN_BYTES: u64 = 1 << 20;

/// Label of the partition that grows.
pub const STATE_LABEL: &str = "state";

/// What growing the GPT changes (all LBAs in units of the table's sector size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Logical sector size of the table.
    pub sector_size: u64,
    /// Disk size in sectors.
    pub disk_sectors: u64,
    /// LBA of the backup header now.
    pub old_alternate_lba: u64,
    /// LBA of the backup header after growing (the last LBA).
    pub new_alternate_lba: u64,
    /// Last usable LBA after growing.
    pub new_last_usable_lba: u64,
    /// 1-based number of the growing partition.
    pub number: u32,
    /// Its first LBA.
    pub first_lba: u64,
    /// Its last LBA now.
    pub old_last_lba: u64,
    /// Its last LBA after growing (never smaller than now).
    pub new_last_lba: u64,
}

impl Plan {
    /// True when the backup GPT is at the end and the partition cannot grow.
    pub fn is_noop(&self) -> bool {
        self.old_alternate_lba == self.new_alternate_lba && self.old_last_lba == self.new_last_lba
    }

    /// Partition size in bytes after growing.
    pub fn new_bytes(&self) -> u64 {
        (self.new_last_lba - self.first_lba + 1) * self.sector_size
    }

    /// Partition size in bytes now.
    pub fn old_bytes(&self) -> u64 {
        (self.old_last_lba - self.first_lba + 1) * self.sector_size
    }
}

fn u32_at(buf: &[u8], offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&buf[offset..offset + 4]);
    u32::from_le_bytes(bytes)
}

fn put_u32(buf: &mut [u8], offset: usize, value: u32) {
    buf[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
fn put_u64(buf: &mut [u8], offset: usize, value: u64) {
    buf[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

/// Reads the GPT of `disk` through the one reader; refuses when only the backup is valid.
fn read_primary<R: Read + Seek>(disk: &mut R) -> Result<gpt::Table> {
    let table = gpt::read(disk).context("reading the primary GPT")?;
    if table.from_backup {
        bail!("the primary GPT is damaged (only the backup is valid): not growing the disk");
    }
    Ok(table)
}

/// Computes how the GPT of `disk` grows to the disk's size; the partition labelled `label` must
/// be the last one on the disk.
pub fn plan<R: Read + Seek>(disk: &mut R, label: &str) -> Result<Plan> {
    let table = read_primary(disk)?;
    let sector = table.sector_size;
    let header = &table.header;
    let disk_bytes = disk.seek(SeekFrom::End(0)).context("measuring the disk")?;
    let disk_sectors = disk_bytes / sector;
    let entries_sectors = header.entries_sectors();
    let new_alternate_lba = disk_sectors
        .checked_sub(1)
        .ok_or_else(|| anyhow!("the disk is empty"))?;
    let new_last_usable_lba = new_alternate_lba
        .checked_sub(entries_sectors + 1)
        .ok_or_else(|| anyhow!("the disk ({disk_sectors} sectors) is too small for a GPT"))?;
    if header.alternate_lba > new_alternate_lba {
        bail!(
            "the GPT's backup header is at LBA {} but the disk has only {disk_sectors} sectors of {sector} bytes (did the disk shrink?)",
            header.alternate_lba
        );
    }
    let partition = table
        .by_label(label)
        .ok_or_else(|| anyhow!("no partition labelled {label:?}"))?;
    if let Some(after) = table
        .partitions
        .iter()
        .find(|p| p.number != partition.number && p.last_lba >= partition.first_lba)
    {
        bail!(
            "partition {:?} (LBA {}..={}) lies after {label:?} (LBA {}..={}): only the last partition can grow",
            after.label,
            after.first_lba,
            after.last_lba,
            partition.first_lba,
            partition.last_lba
        );
    }
    // A backup that stays where it is keeps the table's own last usable LBA.
    let last_usable_lba = if header.alternate_lba == new_alternate_lba {
        header.last_usable_lba
    } else {
        new_last_usable_lba
    };
    if partition.last_lba > last_usable_lba {
        bail!(
            "partition {label:?} ends at LBA {}, beyond the last usable LBA {last_usable_lba}",
            partition.last_lba
        );
    }
    let aligned_end = (last_usable_lba + 1) * sector / ALIGN_BYTES * ALIGN_BYTES / sector;
    let new_last_lba = match aligned_end.checked_sub(1) {
        Some(last) if last > partition.last_lba => last,
        _ => partition.last_lba,
    };
    Ok(Plan {
        sector_size: sector,
        disk_sectors,
        old_alternate_lba: header.alternate_lba,
        new_alternate_lba,
        new_last_usable_lba: last_usable_lba,
        number: partition.number,
        first_lba: partition.first_lba,
        old_last_lba: partition.last_lba,
        new_last_lba,
    })
}

/// Rewrites the GPT of `disk` as `plan` says: backup entries and header at the end, `sync`, then
/// the primary entries and header, `sync`, then the protective MBR's size, `sync`.
pub fn apply<D, F>(disk: &mut D, plan: &Plan, mut sync: F) -> io::Result<()>
where
    D: Read + Write + Seek,
    F: FnMut(&mut D) -> io::Result<()>,
{
    let sector = plan.sector_size;
    let table = read_primary(disk).map_err(|e| io::Error::other(format!("{e:#}")))?;
    let header = &table.header;
    if header.sector_size != sector {
        return Err(io::Error::other(format!(
            "the GPT has {}-byte sectors, the plan {sector}",
            header.sector_size
        )));
    }
    let mut entries = gpt::read_entry_array(disk, header).map_err(io::Error::other)?;
    let entry = gpt::entry_mut(&mut entries, header, plan.number).map_err(io::Error::other)?;
    entry[gpt::ENTRY_LAST_LBA..gpt::ENTRY_LAST_LBA + 8]
        .copy_from_slice(&plan.new_last_lba.to_le_bytes());
    gpt::write_in_place(
        disk,
        header,
        &entries,
        plan.new_alternate_lba,
        plan.new_last_usable_lba,
        &mut sync,
    )?;

    let mut mbr = [0u8; 512];
    disk.seek(SeekFrom::Start(0))?;
    disk.read_exact(&mut mbr)?;
    if mbr[510..512] == [0x55, 0xaa] && mbr[446 + 4] == 0xee && u32_at(&mbr, 446 + 8) == 1 {
        let size = u32::try_from(plan.disk_sectors - 1).unwrap_or(u32::MAX);
        if u32_at(&mbr, 446 + 12) != size {
            put_u32(&mut mbr, 446 + 12, size);
            disk.seek(SeekFrom::Start(0))?;
            disk.write_all(&mbr)?;
            sync(disk)?;
        }
    }
    Ok(())
}

/// ext4 superblock facts: block size and block count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ext4Size {
    /// Filesystem block size in bytes.
    pub block_size: u64,
    /// Blocks in the filesystem.
    pub blocks: u64,
}

impl Ext4Size {
    /// Filesystem size in bytes.
    pub fn bytes(&self) -> u64 {
        self.block_size * self.blocks
    }
}

/// Reads the size of the ext4 filesystem on `device` from its superblock.
pub fn ext4_size<R: Read + Seek>(device: &mut R) -> Result<Ext4Size> {
    let mut sb = vec![0u8; 1024];
    device.seek(SeekFrom::Start(1024))?;
    device.read_exact(&mut sb)?;
    if sb[56..58] != [0x53, 0xef] {
        bail!("no ext4 superblock (magic {:02x}{:02x})", sb[57], sb[56]);
    }
    let log = u32_at(&sb, 24);
    if log > 6 {
        bail!("ext4 superblock has block size 2^{} KiB", log);
    }
    let incompat_64bit = u32_at(&sb, 96) & 0x80 != 0;
    let high = if incompat_64bit {
        u64::from(u32_at(&sb, 0x150))
    } else {
        0
    };
    let blocks = (high << 32) | u64::from(u32_at(&sb, 4));
    if blocks == 0 {
        bail!("ext4 superblock has a block count of 0");
    }
    Ok(Ext4Size {
        block_size: 1024 << log,
        blocks,
    })
}

/// Stage 1 step (after `mount-state`): grows `state` and its filesystem if the disk has room.
/// Never fails the boot: errors are logged.
pub fn grow_state<S: System>(ctx: &mut Stage1<S>) -> Result<()> {
    let Some(devices) = ctx.devices.clone() else {
        return Ok(());
    };
    let Some((_, node)) = devices.state.clone() else {
        return Ok(());
    };
    let var = ctx.paths.sysroot.join("var");
    let grown = match grow_partition(ctx.sys, &devices.disk, &node) {
        Ok(grown) => grown,
        Err(e) => {
            crate::info!("not growing partition {STATE_LABEL:?}: {e:#}");
            return Ok(());
        }
    };
    match grow_filesystem(ctx.sys, &node, &var, grown) {
        Ok(Some((from, to))) => crate::status::status(
            "state-grown",
            &[("from", &from.to_string()), ("to", &to.to_string())],
        ),
        Ok(None) => {}
        Err(e) => crate::info!("not growing the filesystem on {}: {e:#}", node.display()),
    }
    Ok(())
}

/// Grows the GPT and the kernel's view of the partition; the partition's size in bytes if it is
/// (now) larger than the filesystem may be. Only touches the real device when the system's view
/// of it asks for a change, and only if the real device shows the same table.
fn grow_partition<S: System>(sys: &S, disk: &Path, node: &Path) -> Result<Option<u64>> {
    let mut view = sys
        .open_read(disk)
        .with_context(|| format!("opening {}", disk.display()))?;
    let planned = plan(&mut view, STATE_LABEL).with_context(|| disk.display().to_string())?;
    let kernel_bytes = sys
        .open_read(node)
        .and_then(|mut part| part.seek(SeekFrom::End(0)))
        .with_context(|| format!("measuring {}", node.display()))?;
    if planned.is_noop() && kernel_bytes >= planned.new_bytes() {
        return Ok(None);
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .with_context(|| format!("opening {} for writing", disk.display()))?;
    let real = plan(&mut file, STATE_LABEL).with_context(|| disk.display().to_string())?;
    if real != planned {
        bail!(
            "{} changed under us: planned {planned:?}, found {real:?}",
            disk.display()
        );
    }
    if !real.is_noop() {
        apply(&mut file, &real, |f| f.sync_all())
            .with_context(|| format!("rewriting the GPT of {}", disk.display()))?;
        let check = plan(&mut file, STATE_LABEL).context("re-reading the rewritten GPT")?;
        if !check.is_noop() {
            bail!("the rewritten GPT still plans a change: {check:?}");
        }
        crate::info!(
            "GPT of {}: backup moved to LBA {}, partition {} ({STATE_LABEL}) now LBA {}..={} ({} -> {} bytes)",
            disk.display(),
            real.new_alternate_lba,
            real.number,
            real.first_lba,
            real.new_last_lba,
            real.old_bytes(),
            real.new_bytes()
        );
    }
    if kernel_bytes < real.new_bytes() {
        use std::os::fd::AsFd;
        crate::syscall::resize_partition(
            file.as_fd(),
            real.number,
            real.first_lba * real.sector_size,
            real.new_bytes(),
        )
        .with_context(|| {
            format!(
                "resizing partition {} of {} to {} bytes in the kernel (BLKPG)",
                real.number,
                disk.display(),
                real.new_bytes()
            )
        })?;
    }
    Ok(Some(real.new_bytes()))
}

/// Grows the ext4 filesystem mounted at `mountpoint` to fill its partition; `(from, to)` bytes if
/// it grew. `partition_bytes` is the partition size when `grow_partition` changed it.
fn grow_filesystem<S: System>(
    sys: &S,
    node: &Path,
    mountpoint: &Path,
    partition_bytes: Option<u64>,
) -> Result<Option<(u64, u64)>> {
    let mut device = sys
        .open_read(node)
        .with_context(|| format!("opening {}", node.display()))?;
    let size = ext4_size(&mut device).with_context(|| format!("reading {}", node.display()))?;
    let partition_bytes = match partition_bytes {
        Some(bytes) => bytes,
        None => device
            .seek(SeekFrom::End(0))
            .with_context(|| format!("measuring {}", node.display()))?,
    };
    let target = partition_bytes / size.block_size;
    if target <= size.blocks {
        return Ok(None);
    }
    let dir = std::fs::File::open(mountpoint)
        .with_context(|| format!("opening {}", mountpoint.display()))?;
    use std::os::fd::AsFd;
    crate::syscall::ext4_resize(dir.as_fd(), target).with_context(|| {
        format!(
            "growing ext4 at {} from {} to {target} blocks of {} bytes (EXT4_IOC_RESIZE_FS)",
            mountpoint.display(),
            size.blocks,
            size.block_size
        )
    })?;
    // Commit the resize now: a power cut before the next journal commit would undo it.
    rustix::fs::syncfs(&dir).with_context(|| format!("syncing {}", mountpoint.display()))?;
    Ok(Some((size.bytes(), target * size.block_size)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use os_config::gpt::testing::{build_disk, ROOT_TYPE};
    use std::io::Cursor;
    use std::process::Command;

    const STATE_TYPE: &str = "4d21b016-b534-45c2-a9fb-5c16e091fd2d";
    const MIB_SECTORS: u64 = 2048;

    /// A 512-byte-sector disk of `mib` MiB with a protective MBR, primary and backup GPT, and
    /// root at 1..3 MiB and state from 3 MiB up to the last usable LBA aligned to 1 MiB.
    fn image(mib: u64) -> Vec<u8> {
        let total = mib * MIB_SECTORS;
        let state_last = (total - 34) / MIB_SECTORS * MIB_SECTORS - 1;
        let mut disk = build_disk(
            512,
            total,
            &[
                (
                    "root-a",
                    ROOT_TYPE,
                    "00112233-4455-6677-8899-aabbccddeeff",
                    MIB_SECTORS,
                    3 * MIB_SECTORS - 1,
                ),
                (
                    STATE_LABEL,
                    STATE_TYPE,
                    "bbbbbbbb-0000-0000-0000-000000000006",
                    3 * MIB_SECTORS,
                    state_last,
                ),
            ],
        );
        // build_disk writes only the primary; set its usable range and add the backup.
        put_u64(&mut disk, 512 + 40, 34);
        put_u64(&mut disk, 512 + 48, total - 34);
        let entries = disk[1024..1024 + 128 * 128].to_vec();
        let mut header = disk[512..512 + 92].to_vec();
        put_u32(&mut header, 16, 0);
        let crc = crc32fast::hash(&header);
        put_u32(&mut disk, 512 + 16, crc);
        let mut backup = header.clone();
        put_u64(&mut backup, 24, total - 1);
        put_u64(&mut backup, 32, 1);
        put_u64(&mut backup, 72, total - 33);
        let crc = crc32fast::hash(&backup);
        put_u32(&mut backup, 16, crc);
        let end = (total * 512) as usize;
        disk[end - 33 * 512..end - 512].copy_from_slice(&entries);
        disk[end - 512..end - 512 + 92].copy_from_slice(&backup);
        disk[446 + 4] = 0xee;
        put_u32(&mut disk, 446 + 8, 1);
        put_u32(&mut disk, 446 + 12, (total - 1) as u32);
        disk[510] = 0x55;
        disk[511] = 0xaa;
        disk
    }

    fn grow_in_memory(disk: Vec<u8>) -> (Vec<u8>, Plan, usize) {
        let mut cursor = Cursor::new(disk);
        let planned = plan(&mut cursor, STATE_LABEL).expect("plan");
        let mut syncs = 0;
        apply(&mut cursor, &planned, |_| {
            syncs += 1;
            Ok(())
        })
        .expect("apply");
        (cursor.into_inner(), planned, syncs)
    }

    /// Runs `sfdisk` on a temporary copy of `disk`; fails clearly if it is missing.
    fn sfdisk(disk: &[u8], arg: &str) -> (bool, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, disk).expect("write image");
        let out = Command::new("sfdisk")
            .arg(arg)
            .arg(&path)
            .output()
            .expect("sfdisk (package fdisk) must be installed for this test");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Asserts `sfdisk --verify` finds nothing wrong with `disk`.
    fn verify(disk: &[u8]) {
        let (ok, text) = sfdisk(disk, "--verify");
        assert!(
            ok && text.contains("No errors detected") && !text.contains("arning"),
            "sfdisk --verify: {text}"
        );
    }

    #[test]
    fn an_unchanged_disk_is_a_noop() {
        let disk = image(8);
        verify(&disk);
        let planned = plan(&mut Cursor::new(disk), STATE_LABEL).expect("plan");
        assert!(planned.is_noop(), "{planned:?}");
        assert_eq!(planned.new_last_lba, 8 * MIB_SECTORS - MIB_SECTORS - 1);
    }

    #[test]
    fn an_enlarged_disk_grows_state_and_moves_the_backup() {
        let mut disk = image(8);
        disk.resize(20 * 1024 * 1024 + 64 * 512, 0);
        let total = disk.len() as u64 / 512;
        let (_, before) = sfdisk(&disk, "--verify");
        assert!(
            before.contains("not on the end of the device"),
            "sfdisk should object to the enlarged disk: {before}"
        );
        let (grown, planned, syncs) = grow_in_memory(disk);
        assert_eq!(syncs, 3, "backup, primary, protective MBR");
        assert_eq!(planned.old_last_lba, 7 * MIB_SECTORS - 1);
        assert_eq!(planned.new_last_lba, 20 * MIB_SECTORS - 1);
        assert_eq!(planned.new_alternate_lba, total - 1);
        assert_eq!(planned.new_last_usable_lba, total - 34);
        assert_eq!(planned.new_bytes(), 17 * 1024 * 1024);

        // Our reader, then the gpt crate (checks both headers and both entry arrays).
        let table = gpt::read(&mut Cursor::new(grown.clone())).expect("re-read");
        let state = table.by_label(STATE_LABEL).expect("state");
        assert_eq!(
            (state.first_lba, state.last_lba),
            (3 * MIB_SECTORS, 20 * MIB_SECTORS - 1)
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, &grown).expect("write");
        let crate_view = ::gpt::GptConfig::new()
            .writable(false)
            .only_valid_headers(true)
            .open(&path)
            .expect("the gpt crate accepts the grown table");
        let primary = crate_view.primary_header().expect("primary header");
        let backup = crate_view.backup_header().expect("backup header");
        assert_eq!(primary.backup_lba, total - 1);
        assert_eq!(backup.current_lba, total - 1);
        assert_eq!(backup.part_start, total - 33);
        assert_eq!(primary.last_usable, total - 34);
        assert_eq!(backup.last_usable, total - 34);
        let part = crate_view
            .partitions()
            .values()
            .find(|p| p.name == STATE_LABEL)
            .expect("state via the gpt crate");
        assert_eq!(part.last_lba, 20 * MIB_SECTORS - 1);

        // sfdisk as a second oracle.
        verify(&grown);
        let (ok, json) = sfdisk(&grown, "--json");
        assert!(ok, "{json}");
        let value: serde_json::Value = serde_json::from_str(&json).expect("sfdisk json");
        let pt = &value["partitiontable"];
        assert_eq!(pt["lastlba"], total - 34, "{json}");
        let parts = pt["partitions"].as_array().expect("partitions");
        assert_eq!(parts[1]["name"], STATE_LABEL);
        assert_eq!(parts[1]["start"], 3 * MIB_SECTORS);
        assert_eq!(parts[1]["size"], 17 * MIB_SECTORS);
        assert_eq!(u32_at(&grown, 446 + 12) as u64, total - 1, "protective MBR");

        // Idempotent: the next boot plans nothing and a second apply changes no byte.
        let again = plan(&mut Cursor::new(grown.clone()), STATE_LABEL).expect("plan again");
        assert!(again.is_noop(), "{again:?}");
        let (twice, _, _) = grow_in_memory(grown.clone());
        assert_eq!(twice, grown);
    }

    #[test]
    fn a_power_cut_after_the_backup_keeps_the_old_primary_and_finishes_next_time() {
        let mut disk = image(8);
        disk.resize(16 * 1024 * 1024, 0);
        let mut cursor = Cursor::new(disk);
        let planned = plan(&mut cursor, STATE_LABEL).expect("plan");
        let mut syncs = 0;
        let cut = apply(&mut cursor, &planned, |_| {
            syncs += 1;
            if syncs == 1 {
                Err(io::Error::other("power cut"))
            } else {
                Ok(())
            }
        });
        assert!(cut.is_err());
        let mut half = cursor.into_inner();
        let old = gpt::read(&mut Cursor::new(half.clone())).expect("old primary still valid");
        assert_eq!(
            old.by_label(STATE_LABEL).expect("state").last_lba,
            7 * MIB_SECTORS - 1
        );
        let replanned = plan(&mut Cursor::new(half.clone()), STATE_LABEL).expect("replan");
        assert_eq!(replanned, planned);
        let mut cursor = Cursor::new(std::mem::take(&mut half));
        apply(&mut cursor, &replanned, |_| Ok(())).expect("finish");
        let done = cursor.into_inner();
        assert!(plan(&mut Cursor::new(done.clone()), STATE_LABEL)
            .expect("plan")
            .is_noop());
        verify(&done);
    }

    #[test]
    fn works_with_4k_sectors() {
        let total = 4096u64; // 16 MiB of 4 KiB sectors, 4 entry sectors
        let mut disk = build_disk(
            4096,
            total,
            &[(
                STATE_LABEL,
                STATE_TYPE,
                "bbbbbbbb-0000-0000-0000-000000000006",
                256,
                2047,
            )],
        );
        put_u64(&mut disk, 4096 + 48, total - 6);
        disk.resize(disk.len() * 2, 0);
        let mut header = disk[4096..4096 + 92].to_vec();
        put_u32(&mut header, 16, 0);
        let crc = crc32fast::hash(&header);
        put_u32(&mut disk, 4096 + 16, crc);
        let (grown, planned, _) = grow_in_memory(disk);
        assert_eq!(planned.new_alternate_lba, 2 * total - 1);
        assert_eq!(planned.new_last_usable_lba, 2 * total - 6);
        // 32 MiB disk: the end aligned down to 1 MiB is LBA 7936 (31 MiB).
        assert_eq!(planned.new_last_lba, 7935);
        let table = gpt::read(&mut Cursor::new(grown.clone())).expect("re-read");
        assert_eq!(table.by_label(STATE_LABEL).expect("state").last_lba, 7935);
        assert!(plan(&mut Cursor::new(grown), STATE_LABEL)
            .expect("plan")
            .is_noop());
    }

    #[test]
    fn refuses_when_state_is_not_last_or_the_disk_shrank() {
        let mut disk = build_disk(
            512,
            8 * MIB_SECTORS,
            &[
                (
                    STATE_LABEL,
                    STATE_TYPE,
                    "bbbbbbbb-0000-0000-0000-000000000006",
                    MIB_SECTORS,
                    3 * MIB_SECTORS - 1,
                ),
                (
                    "root-a",
                    ROOT_TYPE,
                    "00112233-4455-6677-8899-aabbccddeeff",
                    3 * MIB_SECTORS,
                    5 * MIB_SECTORS - 1,
                ),
            ],
        );
        disk.resize(disk.len() * 2, 0);
        let err = plan(&mut Cursor::new(disk), STATE_LABEL).expect_err("not last");
        assert!(
            format!("{err:#}").contains("only the last partition"),
            "{err:#}"
        );

        let mut shrunk = image(8);
        shrunk.truncate(6 * 1024 * 1024);
        let err = plan(&mut Cursor::new(shrunk), STATE_LABEL).expect_err("shrunk");
        assert!(
            format!("{err:#}").contains("did the disk shrink"),
            "{err:#}"
        );
    }

    #[test]
    fn reads_ext4_sizes_from_mkfs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fs.img");
        std::fs::write(&path, vec![0u8; 8 * 1024 * 1024]).expect("image");
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096"])
            .arg(&path)
            .output()
            .expect("mkfs.ext4 (package e2fsprogs) must be installed for this test");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let size = ext4_size(&mut std::fs::File::open(&path).expect("open")).expect("size");
        assert_eq!(
            size,
            Ext4Size {
                block_size: 4096,
                blocks: 2048
            }
        );
        assert!(ext4_size(&mut Cursor::new(vec![0u8; 4096])).is_err());
    }
}
