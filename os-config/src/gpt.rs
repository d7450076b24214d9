//! Reading GUID partition tables: the one parser every Plinth program uses (stage 1, the state
//! partition's growth, the update agent, `plinth inspect`/`verify`/`publish`).
//!
//! The rule for primary and backup is the one UEFI firmware and stage 1 follow: the primary
//! header at LBA 1 and its entry array when the header CRC and the entry array CRC are valid,
//! else the backup header in the disk's last sector and its entry array (a primary write torn by
//! a power cut). Parsing is total: the header size, entry size, entry count and every LBA are
//! checked against what is really there before anything is read or allocated by them.
//!
//! [`parse_header`] and [`parse_entries`] work on bytes; [`read`] is the small I/O wrapper over
//! any `Read + Seek` (a block device, a disk image, a `Cursor` in tests).

use std::io::{Read, Seek, SeekFrom, Write};

use uuid::Uuid;

/// The header signature.
pub const SIGNATURE: &[u8; 8] = b"EFI PART";

/// Bytes of a header sector that are read and checked (the header size may not exceed them).
pub const HEADER_BLOCK: usize = 512;

/// Smallest header (UEFI revision 1.0).
pub const MIN_HEADER_SIZE: u32 = 92;

/// Smallest partition entry; every entry size is a multiple of it.
pub const MIN_ENTRY_SIZE: u32 = 128;

/// Largest partition entry accepted.
pub const MAX_ENTRY_SIZE: u32 = 4096;

/// Largest partition entry array accepted (a usual table is 128 entries of 128 bytes, 16 KiB).
pub const MAX_ENTRIES_BYTES: u64 = 1 << 20;

/// Logical sector sizes tried, in order.
pub const SECTOR_SIZES: [u64; 2] = [512, 4096];

/// Why a GPT could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    /// No `EFI PART` signature at LBA 1 (nor a backup header in the last sector).
    #[error("no GPT: no \"EFI PART\" signature at LBA 1")]
    NotGpt,
    /// The header or entries are inconsistent.
    #[error("corrupt GPT: {0}")]
    Corrupt(String),
    /// Reading the device failed.
    #[error("reading: {0}")]
    Io(#[from] std::io::Error),
}

fn corrupt(message: String) -> GptError {
    GptError::Corrupt(message)
}

/// A checked GPT header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Logical sector size the header was read with.
    pub sector_size: u64,
    /// LBA of this header (1 for the primary, the last LBA for the backup).
    pub my_lba: u64,
    /// LBA of the other header.
    pub alternate_lba: u64,
    /// First LBA partitions may use.
    pub first_usable_lba: u64,
    /// Last LBA partitions may use.
    pub last_usable_lba: u64,
    /// Disk GUID.
    pub disk_guid: Uuid,
    /// First LBA of the partition entry array.
    pub entries_lba: u64,
    /// Number of entries in the array.
    pub entry_count: u32,
    /// Size of one entry in bytes.
    pub entry_size: u32,
    /// CRC32 of the entry array.
    pub entries_crc: u32,
    /// The header's own bytes (its header size), as read.
    pub raw: Vec<u8>,
}

impl Header {
    /// Size of the entry array in bytes (at most [`MAX_ENTRIES_BYTES`]).
    pub fn entries_bytes(&self) -> usize {
        self.entry_count as usize * self.entry_size as usize
    }

    /// Sectors the entry array takes.
    pub fn entries_sectors(&self) -> u64 {
        (self.entries_bytes() as u64).div_ceil(self.sector_size)
    }
}

/// A used partition entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based partition number (index in the entry array + 1), as the kernel numbers partitions.
    pub number: u32,
    /// Partition name (label), UTF-16LE decoded up to the first NUL.
    pub label: String,
    /// Partition type GUID.
    pub type_guid: Uuid,
    /// Unique partition GUID.
    pub uuid: Uuid,
    /// First LBA.
    pub first_lba: u64,
    /// Last LBA (inclusive).
    pub last_lba: u64,
    /// Offset of the partition in bytes.
    pub start: u64,
    /// Size of the partition in bytes.
    pub size: u64,
}

/// A GPT read from a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Logical sector size the table was found with (512 or 4096).
    pub sector_size: u64,
    /// Disk GUID.
    pub disk_guid: Uuid,
    /// Used entries (non-zero type GUID), by number.
    pub partitions: Vec<Partition>,
    /// Read from the backup GPT because the primary one is damaged.
    pub from_backup: bool,
    /// The header the table was read with.
    pub header: Header,
}

impl Table {
    /// The partition whose label is exactly `label`.
    pub fn by_label(&self, label: &str) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.label == label)
    }
}

fn u32_at(buf: &[u8], offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&buf[offset..offset + 4]);
    u32::from_le_bytes(bytes)
}

fn u64_at(buf: &[u8], offset: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buf[offset..offset + 8]);
    u64::from_le_bytes(bytes)
}

fn guid_at(buf: &[u8], offset: usize) -> Uuid {
    let mut raw = [0u8; 16];
    raw.copy_from_slice(&buf[offset..offset + 16]);
    Uuid::from_bytes_le(raw)
}

/// CRC32 of a header's bytes with its CRC field taken as zero.
pub fn header_crc(raw: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&raw[..16]);
    hasher.update(&[0; 4]);
    hasher.update(&raw[20..]);
    hasher.finalize()
}

/// Parses and checks the header in `block` (the start of the sector at `lba`) of a disk of
/// `disk_sectors` sectors of `sector_size` bytes: signature, header size, header CRC, its own
/// LBA, the entry size and count, and that the entry array and usable range lie inside the disk.
pub fn parse_header(
    block: &[u8],
    sector_size: u64,
    lba: u64,
    disk_sectors: u64,
) -> Result<Header, GptError> {
    if block.len() < 8 || &block[..8] != SIGNATURE {
        return Err(GptError::NotGpt);
    }
    let header_size = if block.len() >= 16 {
        u32_at(block, 12)
    } else {
        0
    };
    let limit = block.len().min(HEADER_BLOCK);
    if header_size < MIN_HEADER_SIZE || header_size as usize > limit {
        return Err(corrupt(format!(
            "header size {header_size} (expected {MIN_HEADER_SIZE}..={limit})"
        )));
    }
    let raw = block[..header_size as usize].to_vec();
    let stored = u32_at(&raw, 16);
    let computed = header_crc(&raw);
    if stored != computed {
        return Err(corrupt(format!(
            "header CRC32 is {stored:#010x}, computed {computed:#010x}"
        )));
    }
    let header = Header {
        sector_size,
        my_lba: u64_at(&raw, 24),
        alternate_lba: u64_at(&raw, 32),
        first_usable_lba: u64_at(&raw, 40),
        last_usable_lba: u64_at(&raw, 48),
        disk_guid: guid_at(&raw, 56),
        entries_lba: u64_at(&raw, 72),
        entry_count: u32_at(&raw, 80),
        entry_size: u32_at(&raw, 84),
        entries_crc: u32_at(&raw, 88),
        raw,
    };
    if header.my_lba != lba {
        return Err(corrupt(format!(
            "the header read from LBA {lba} says it is at LBA {}",
            header.my_lba
        )));
    }
    let entry_size = header.entry_size;
    if !(MIN_ENTRY_SIZE..=MAX_ENTRY_SIZE).contains(&entry_size)
        || !entry_size.is_multiple_of(MIN_ENTRY_SIZE)
    {
        return Err(corrupt(format!(
            "partition entry size {entry_size} bytes (expected a multiple of {MIN_ENTRY_SIZE} from {MIN_ENTRY_SIZE} to {MAX_ENTRY_SIZE})"
        )));
    }
    let count = header.entry_count;
    if u64::from(count) * u64::from(entry_size) > MAX_ENTRIES_BYTES {
        return Err(corrupt(format!(
            "{count} partition entries of {entry_size} bytes (at most {MAX_ENTRIES_BYTES} bytes of entries are accepted)"
        )));
    }
    let last_lba = disk_sectors
        .checked_sub(1)
        .ok_or_else(|| corrupt("the disk is empty".to_owned()))?;
    let entries_end = header
        .entries_lba
        .checked_add(header.entries_sectors())
        .filter(|end| *end <= disk_sectors)
        .ok_or_else(|| {
            corrupt(format!(
                "the partition entry array at LBA {} ({} sectors) lies beyond the disk's last LBA {last_lba}",
                header.entries_lba,
                header.entries_sectors()
            ))
        })?;
    if (header.entries_lba..entries_end).contains(&header.my_lba) {
        return Err(corrupt(format!(
            "the partition entry array at LBA {}..{entries_end} overlaps the header at LBA {}",
            header.entries_lba, header.my_lba
        )));
    }
    for (what, value) in [
        ("backup", header.alternate_lba),
        ("last usable", header.last_usable_lba),
    ] {
        if value > last_lba {
            return Err(corrupt(format!(
                "the {what} LBA {value} lies beyond the disk's last LBA {last_lba} (did the disk shrink?)"
            )));
        }
    }
    if header.first_usable_lba > header.last_usable_lba {
        return Err(corrupt(format!(
            "the first usable LBA {} lies after the last usable LBA {}",
            header.first_usable_lba, header.last_usable_lba
        )));
    }
    Ok(header)
}

/// Parses the entry array `bytes` of `header` on a disk of `disk_sectors` sectors: checks its
/// length and CRC, that every used entry ends inside the disk and not before it starts, and that
/// no two used entries overlap. The array holds at most [`MAX_ENTRIES_BYTES`] /
/// [`MIN_ENTRY_SIZE`] entries, so the pairwise check is bounded.
pub fn parse_entries(
    header: &Header,
    bytes: &[u8],
    disk_sectors: u64,
) -> Result<Vec<Partition>, GptError> {
    if bytes.len() != header.entries_bytes() {
        return Err(corrupt(format!(
            "the partition entry array is {} bytes, the header says {}",
            bytes.len(),
            header.entries_bytes()
        )));
    }
    let stored = header.entries_crc;
    let computed = crc32fast::hash(bytes);
    if stored != computed {
        return Err(corrupt(format!(
            "partition entry array CRC32 is {stored:#010x}, computed {computed:#010x}"
        )));
    }
    let mut partitions = Vec::new();
    if header.entry_size < MIN_ENTRY_SIZE {
        return Err(corrupt(format!(
            "partition entry size {} bytes",
            header.entry_size
        )));
    }
    for (index, entry) in bytes.chunks_exact(header.entry_size as usize).enumerate() {
        let type_guid = guid_at(entry, 0);
        if type_guid.is_nil() {
            continue;
        }
        let number = index as u32 + 1;
        let name_units: Vec<u16> = entry[56..128]
            .chunks_exact(2)
            .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
            .take_while(|&unit| unit != 0)
            .collect();
        let label = String::from_utf16_lossy(&name_units);
        let (first_lba, last_lba) = (u64_at(entry, 32), u64_at(entry, 40));
        if last_lba < first_lba {
            return Err(corrupt(format!(
                "partition {number} ({label:?}) ends at LBA {last_lba}, before its first LBA {first_lba}"
            )));
        }
        if last_lba >= disk_sectors {
            return Err(corrupt(format!(
                "partition {number} ({label:?}) ends at LBA {last_lba}, beyond the disk's last LBA {}",
                disk_sectors.saturating_sub(1)
            )));
        }
        // Inside the disk, so neither overflows: the disk's size in bytes is a u64.
        let start = first_lba * header.sector_size;
        let size = (last_lba - first_lba + 1) * header.sector_size;
        if let Some(other) = partitions
            .iter()
            .find(|p: &&Partition| first_lba <= p.last_lba && p.first_lba <= last_lba)
        {
            return Err(corrupt(format!(
                "partition {number} ({label:?}, LBA {first_lba}..={last_lba}) overlaps partition {} ({:?}, LBA {}..={})",
                other.number, other.label, other.first_lba, other.last_lba
            )));
        }
        partitions.push(Partition {
            number,
            label,
            type_guid,
            uuid: guid_at(entry, 16),
            first_lba,
            last_lba,
            start,
            size,
        });
    }
    Ok(partitions)
}

/// Reads the GPT of `disk`: the primary (512- then 4096-byte sectors) when its header and entry
/// array CRCs are valid, else the backup in the last sector. When neither is usable the error is
/// the primary's, with the backup's added when a backup header was there.
pub fn read<R: Read + Seek>(disk: &mut R) -> Result<Table, GptError> {
    let len = disk.seek(SeekFrom::End(0))?;
    let primary = match read_primary(disk, len) {
        Err(e @ (GptError::NotGpt | GptError::Corrupt(_))) => e,
        other => return other,
    };
    match read_backup(disk, len) {
        Ok(table) => Ok(table),
        Err(None) => match primary {
            GptError::Corrupt(message) => Err(corrupt(format!(
                "{message}; no backup GPT header in the disk's last sector (a truncated disk?)"
            ))),
            other => Err(other),
        },
        Err(Some(backup)) => Err(corrupt(format!(
            "{}; the backup: {}",
            detail(&primary),
            detail(&backup)
        ))),
    }
}

/// What is wrong, without the "corrupt GPT" prefix.
fn detail(error: &GptError) -> String {
    match error {
        GptError::NotGpt => "no primary header".to_owned(),
        GptError::Corrupt(message) => message.clone(),
        GptError::Io(e) => format!("reading: {e}"),
    }
}

/// Reads the header block at `lba`: `None` at the end of the disk.
fn read_block<R: Read + Seek>(
    disk: &mut R,
    sector_size: u64,
    lba: u64,
) -> Result<Option<Vec<u8>>, GptError> {
    let mut block = vec![0u8; HEADER_BLOCK];
    disk.seek(SeekFrom::Start(lba * sector_size))?;
    match disk.read_exact(&mut block) {
        Ok(()) => Ok(Some(block)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Parses the header in `block` at `lba`, then reads and parses its entry array.
fn read_table<R: Read + Seek>(
    disk: &mut R,
    block: &[u8],
    sector_size: u64,
    lba: u64,
    len: u64,
) -> Result<Table, GptError> {
    let disk_sectors = len / sector_size;
    let header = parse_header(block, sector_size, lba, disk_sectors)?;
    let mut entries = vec![0u8; header.entries_bytes()];
    disk.seek(SeekFrom::Start(header.entries_lba * sector_size))?;
    disk.read_exact(&mut entries)?;
    let partitions = parse_entries(&header, &entries, disk_sectors)?;
    Ok(Table {
        sector_size,
        disk_guid: header.disk_guid,
        partitions,
        from_backup: lba != 1,
        header,
    })
}

fn read_primary<R: Read + Seek>(disk: &mut R, len: u64) -> Result<Table, GptError> {
    for sector_size in SECTOR_SIZES {
        let Some(block) = read_block(disk, sector_size, 1)? else {
            continue;
        };
        if &block[..8] != SIGNATURE {
            continue;
        }
        return read_table(disk, &block, sector_size, 1, len);
    }
    Err(GptError::NotGpt)
}

/// The backup GPT: its header in the last sector. `Err(None)` when there is no backup header,
/// `Err(Some(_))` when there is one but it or its entries are unusable.
fn read_backup<R: Read + Seek>(disk: &mut R, len: u64) -> Result<Table, Option<GptError>> {
    let mut error = None;
    for sector_size in SECTOR_SIZES {
        if len < 3 * sector_size || !len.is_multiple_of(sector_size) {
            continue;
        }
        let last_lba = len / sector_size - 1;
        let block = match read_block(disk, sector_size, last_lba) {
            Ok(Some(block)) => block,
            Ok(None) => continue,
            Err(e) => return Err(Some(e)),
        };
        if &block[..8] != SIGNATURE || u64_at(&block, 24) != last_lba {
            continue;
        }
        match read_table(disk, &block, sector_size, last_lba, len) {
            Ok(table) => return Ok(table),
            Err(e) => error = Some(e),
        }
    }
    Err(error)
}

/// Offset of the unique partition GUID in an entry.
pub const ENTRY_UUID: usize = 16;
/// Offset of the last LBA in an entry.
pub const ENTRY_LAST_LBA: usize = 40;

/// Reads the entry array of `header` (bounded and inside the disk: [`parse_header`] checked it).
pub fn read_entry_array<R: Read + Seek>(
    disk: &mut R,
    header: &Header,
) -> Result<Vec<u8>, GptError> {
    let mut entries = vec![0u8; header.entries_bytes()];
    disk.seek(SeekFrom::Start(header.entries_lba * header.sector_size))?;
    disk.read_exact(&mut entries)?;
    Ok(entries)
}

/// The bytes of entry `number` (1-based) in the entry array `entries` of `header`.
pub fn entry_mut<'a>(
    entries: &'a mut [u8],
    header: &Header,
    number: u32,
) -> Result<&'a mut [u8], GptError> {
    let size = header.entry_size as usize;
    let start = (number as usize)
        .checked_sub(1)
        .map(|index| index * size)
        .filter(|start| start + size <= entries.len() && size >= MIN_ENTRY_SIZE as usize)
        .ok_or_else(|| {
            corrupt(format!(
                "partition {number} is outside the entry array of {} entries",
                header.entry_count
            ))
        })?;
    Ok(&mut entries[start..start + size])
}

/// Writes a GPT in place: `entries` (the edited entry array of `header`, a header read by
/// [`read`]) with both headers resealed, the backup header at `alternate_lba` with its entries
/// just before it, and `last_usable_lba`. The backup goes first and is flushed (`sync`) before
/// the primary is written, so a power cut leaves one valid table at every moment: the old primary
/// until the new backup is down, the new backup until the new primary is.
pub fn write_in_place<D, F>(
    disk: &mut D,
    header: &Header,
    entries: &[u8],
    alternate_lba: u64,
    last_usable_lba: u64,
    mut sync: F,
) -> std::io::Result<()>
where
    D: Read + Write + Seek,
    F: FnMut(&mut D) -> std::io::Result<()>,
{
    let sector = header.sector_size;
    if entries.len() != header.entries_bytes() {
        return Err(std::io::Error::other(format!(
            "the entry array is {} bytes, the header says {}",
            entries.len(),
            header.entries_bytes()
        )));
    }
    let entries_sectors = header.entries_sectors();
    let backup_entries_lba = alternate_lba
        .checked_sub(entries_sectors)
        .filter(|lba| *lba > last_usable_lba)
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "no room for the backup entry array before LBA {alternate_lba} after the last usable LBA {last_usable_lba}"
            ))
        })?;
    // A table read from the backup is written back to the usual primary place, LBA 2.
    let primary_entries_lba = if header.my_lba == 1 {
        header.entries_lba
    } else {
        2
    };
    let entries_crc = crc32fast::hash(entries);
    let sealed = |my_lba: u64, other_lba: u64, entries_lba: u64| -> Vec<u8> {
        let mut raw = header.raw.clone();
        raw[24..32].copy_from_slice(&my_lba.to_le_bytes());
        raw[32..40].copy_from_slice(&other_lba.to_le_bytes());
        raw[48..56].copy_from_slice(&last_usable_lba.to_le_bytes());
        raw[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        raw[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = header_crc(&raw);
        raw[16..20].copy_from_slice(&crc.to_le_bytes());
        let mut block = vec![0u8; sector as usize];
        block[..raw.len()].copy_from_slice(&raw);
        block
    };

    let mut backup = entries.to_vec();
    backup.resize((entries_sectors * sector) as usize, 0);
    backup.extend_from_slice(&sealed(alternate_lba, 1, backup_entries_lba));
    disk.seek(SeekFrom::Start(backup_entries_lba * sector))?;
    disk.write_all(&backup)?;
    sync(disk)?;

    let primary = sealed(1, alternate_lba, primary_entries_lba);
    if primary_entries_lba == 2 {
        // One write for header and entries keeps the window between them as short as possible.
        let mut both = primary;
        both.extend_from_slice(entries);
        disk.seek(SeekFrom::Start(sector))?;
        disk.write_all(&both)?;
    } else {
        disk.seek(SeekFrom::Start(primary_entries_lba * sector))?;
        disk.write_all(entries)?;
        disk.seek(SeekFrom::Start(sector))?;
        disk.write_all(&primary)?;
    }
    sync(disk)
}

/// Hand-built GPT disks for tests (feature `test-disks`).
#[cfg(any(test, feature = "test-disks"))]
pub mod testing {
    use super::{header_crc, u32_at, u64_at};

    /// Type GUID of an x86-64 root partition.
    pub const ROOT_TYPE: &str = crate::layout::TYPE_ROOT_X86_64;
    /// Type GUID of an x86-64 root verity partition.
    pub const VERITY_TYPE: &str = crate::layout::TYPE_ROOT_VERITY_X86_64;

    /// Parses a GUID string into its mixed-endian on-disk form.
    pub fn guid_bytes(text: &str) -> [u8; 16] {
        uuid::Uuid::parse_str(text).expect("GUID").to_bytes_le()
    }

    /// Recomputes the CRC of the header at `offset` of `disk` (its size read from the header).
    pub fn reseal(disk: &mut [u8], offset: usize) {
        let size = (u32_at(&disk[offset..], 12) as usize).clamp(92, 512);
        let crc = header_crc(&disk[offset..offset + size]);
        disk[offset + 16..offset + 20].copy_from_slice(&crc.to_le_bytes());
    }

    /// Builds a disk image with a primary GPT of 128 entries at LBA 2:
    /// `(label, type, uuid, first_lba, last_lba)`. Usable LBAs are left 0..=0.
    pub fn build_disk(
        sector: u64,
        total_sectors: u64,
        parts: &[(&str, &str, &str, u64, u64)],
    ) -> Vec<u8> {
        let mut disk = vec![0u8; (sector * total_sectors) as usize];
        let entry_count = 128usize;
        let mut entries = vec![0u8; entry_count * 128];
        for (i, (label, type_guid, uuid, first, last)) in parts.iter().enumerate() {
            let e = &mut entries[i * 128..(i + 1) * 128];
            e[0..16].copy_from_slice(&guid_bytes(type_guid));
            e[16..32].copy_from_slice(&guid_bytes(uuid));
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
            for (j, unit) in label.encode_utf16().enumerate() {
                e[56 + 2 * j..58 + 2 * j].copy_from_slice(&unit.to_le_bytes());
            }
        }
        let mut header = vec![0u8; 92];
        header[0..8].copy_from_slice(super::SIGNATURE);
        header[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        header[12..16].copy_from_slice(&92u32.to_le_bytes());
        header[24..32].copy_from_slice(&1u64.to_le_bytes());
        header[32..40].copy_from_slice(&(total_sectors - 1).to_le_bytes());
        header[56..72].copy_from_slice(&guid_bytes("11111111-2222-3333-4444-555555555555"));
        header[72..80].copy_from_slice(&2u64.to_le_bytes());
        header[80..84].copy_from_slice(&(entry_count as u32).to_le_bytes());
        header[84..88].copy_from_slice(&128u32.to_le_bytes());
        header[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
        let s = sector as usize;
        disk[s..s + 92].copy_from_slice(&header);
        reseal(&mut disk, s);
        disk[2 * s..2 * s + entries.len()].copy_from_slice(&entries);
        disk
    }

    /// Offsets of the headers of `disk` (the primary at LBA 1, the backup in the last sector when
    /// one is there).
    fn header_offsets(disk: &[u8], sector: u64) -> Vec<usize> {
        let s = sector as usize;
        let mut offsets = vec![s];
        let last = disk.len() - s;
        if disk.len() >= 3 * s && &disk[last..last + 8] == super::SIGNATURE {
            offsets.push(last);
        }
        offsets
    }

    /// Applies `edit` to every header of `disk` (the primary, and the backup when present; each
    /// given its 92 bytes) and reseals them.
    pub fn edit_headers(disk: &mut [u8], sector: u64, edit: impl Fn(&mut [u8])) {
        for offset in header_offsets(disk, sector) {
            edit(&mut disk[offset..offset + 92]);
            reseal(disk, offset);
        }
    }

    /// Applies `edit` to every partition entry array of `disk` (the one of the primary header,
    /// and of the backup when present), then records the new CRCs and reseals the headers.
    pub fn edit_entries(disk: &mut [u8], sector: u64, edit: impl Fn(&mut [u8])) {
        for offset in header_offsets(disk, sector) {
            let header = &disk[offset..offset + 92];
            let lba = u64_at(header, 72) as usize;
            let len = u32_at(header, 80) as usize * u32_at(header, 84) as usize;
            let start = lba * sector as usize;
            edit(&mut disk[start..start + len]);
            let crc = crc32fast::hash(&disk[start..start + len]);
            disk[offset + 88..offset + 92].copy_from_slice(&crc.to_le_bytes());
            reseal(disk, offset);
        }
    }

    /// Adds the backup GPT of a [`build_disk`] disk: entries before the last sector, the header
    /// in it.
    pub fn add_backup(disk: &mut [u8], sector: u64) {
        let s = sector as usize;
        let total = disk.len() / s;
        let mut header = disk[s..s + 92].to_vec();
        let entries_len = u32_at(&header, 80) as usize * u32_at(&header, 84) as usize;
        let entries = disk[2 * s..2 * s + entries_len].to_vec();
        let entries_lba = total - 1 - entries_len.div_ceil(s);
        header[24..32].copy_from_slice(&(total as u64 - 1).to_le_bytes());
        header[32..40].copy_from_slice(&1u64.to_le_bytes());
        header[72..80].copy_from_slice(&(entries_lba as u64).to_le_bytes());
        disk[entries_lba * s..entries_lba * s + entries_len].copy_from_slice(&entries);
        disk[(total - 1) * s..(total - 1) * s + 92].copy_from_slice(&header);
        reseal(disk, (total - 1) * s);
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use std::io::Cursor;

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32fast::hash(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn reads_labels_numbers_and_guids() {
        for sector in [512u64, 4096] {
            let disk = build_disk(
                sector,
                200,
                &[
                    (
                        "esp",
                        "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
                        "aaaaaaaa-0000-0000-0000-000000000001",
                        40,
                        59,
                    ),
                    (
                        "root-a",
                        ROOT_TYPE,
                        "00112233-4455-6677-8899-aabbccddeeff",
                        60,
                        99,
                    ),
                    (
                        "verity-a",
                        VERITY_TYPE,
                        "01234567-89ab-cdef-0123-456789abcdef",
                        100,
                        109,
                    ),
                ],
            );
            let table = read(&mut Cursor::new(disk)).expect("reads");
            assert_eq!(table.sector_size, sector);
            assert!(!table.from_backup);
            assert_eq!(
                table.disk_guid.to_string(),
                "11111111-2222-3333-4444-555555555555"
            );
            let root = table.by_label("root-a").expect("root-a");
            assert_eq!(root.number, 2);
            assert_eq!(root.type_guid.to_string(), ROOT_TYPE);
            assert_eq!(
                root.uuid.to_string(),
                "00112233-4455-6677-8899-aabbccddeeff"
            );
            assert_eq!((root.first_lba, root.last_lba), (60, 99));
            assert_eq!((root.start, root.size), (60 * sector, 40 * sector));
            assert_eq!(table.by_label("verity-a").expect("verity").number, 3);
            assert!(table.by_label("root-b").is_none());
        }
    }

    #[test]
    fn rejects_missing_and_corrupt_tables() {
        let blank = vec![0u8; 512 * 64];
        assert!(matches!(
            read(&mut Cursor::new(blank)),
            Err(GptError::NotGpt)
        ));
        let mut disk = build_disk(512, 100, &[("state", ROOT_TYPE, ROOT_TYPE, 40, 99)]);
        disk[1024 + 56] ^= 1; // flip a bit in the first entry
        let err = read(&mut Cursor::new(disk)).expect_err("corrupt");
        assert!(err.to_string().contains("entry array CRC32"), "{err}");
    }

    #[test]
    fn a_damaged_primary_falls_back_to_the_backup() {
        for sector in [512u64, 4096] {
            let parts = [(
                "root-a",
                ROOT_TYPE,
                "00112233-4455-6677-8899-aabbccddeeff",
                60,
                99,
            )];
            let mut disk = build_disk(sector, 200, &parts);
            add_backup(&mut disk, sector);
            let good = read(&mut Cursor::new(disk.clone())).expect("primary");
            assert!(!good.from_backup);

            // A torn header write, then a torn entry array write.
            for damage in [sector as usize + 20, 2 * sector as usize + 16] {
                let mut torn = disk.clone();
                torn[damage] ^= 0xff;
                let table = read(&mut Cursor::new(torn)).expect("backup");
                assert!(table.from_backup, "sector {sector}, byte {damage}");
                assert_eq!(table.partitions, good.partitions);
                assert_eq!(table.sector_size, sector);
            }

            // Both damaged: the primary's error, then the backup's.
            let mut both = disk.clone();
            both[sector as usize + 20] ^= 0xff;
            let last = disk.len() - sector as usize;
            both[last + 20] ^= 0xff;
            let err = read(&mut Cursor::new(both)).expect_err("no usable table");
            let text = err.to_string();
            assert!(text.contains("header CRC32"), "{err}");
            assert!(text.contains("the backup: header CRC32"), "{err}");
        }
    }

    /// A 512-byte-sector disk of 200 sectors, primary and backup, with `edit` applied to the
    /// primary header (then resealed so its CRC is valid).
    fn hostile(edit: impl Fn(&mut [u8])) -> Vec<u8> {
        let mut disk = build_disk(
            512,
            200,
            &[(
                "root-a",
                ROOT_TYPE,
                "00112233-4455-6677-8899-aabbccddeeff",
                60,
                99,
            )],
        );
        add_backup(&mut disk, 512);
        edit(&mut disk[512..1024]);
        reseal(&mut disk, 512);
        disk
    }

    fn set_u32(at: usize, value: u32) -> impl Fn(&mut [u8]) {
        move |h: &mut [u8]| h[at..at + 4].copy_from_slice(&value.to_le_bytes())
    }

    fn set_u64(at: usize, value: u64) -> impl Fn(&mut [u8]) {
        move |h: &mut [u8]| h[at..at + 8].copy_from_slice(&value.to_le_bytes())
    }

    #[test]
    fn hostile_primary_headers_are_refused_by_the_parser() {
        type Edit = Box<dyn Fn(&mut [u8])>;
        let cases: Vec<(&str, Edit, &str)> = vec![
            (
                "entry size 0",
                Box::new(set_u32(84, 0)),
                "entry size 0 bytes",
            ),
            (
                "entry size 0x80000000",
                Box::new(set_u32(84, 0x8000_0000)),
                "entry size 2147483648 bytes",
            ),
            (
                "entry size not a multiple of 128",
                Box::new(set_u32(84, 136)),
                "entry size 136 bytes",
            ),
            (
                "1,000,000 entries",
                Box::new(set_u32(80, 1_000_000)),
                "1000000 partition entries",
            ),
            (
                "header size 8",
                Box::new(set_u32(12, 8)),
                "header size 8 (expected 92..=512)",
            ),
            (
                "header size 0xffffffff",
                Box::new(set_u32(12, u32::MAX)),
                "header size 4294967295",
            ),
            (
                "its own LBA",
                Box::new(set_u64(24, 7)),
                "read from LBA 1 says it is at LBA 7",
            ),
            (
                "entries beyond the disk",
                Box::new(set_u64(72, 190)),
                "lies beyond the disk's last LBA 199",
            ),
            (
                "entries at u64::MAX",
                Box::new(set_u64(72, u64::MAX)),
                "lies beyond the disk's last LBA 199",
            ),
            (
                "entries over the header",
                Box::new(set_u64(72, 0)),
                "overlaps the header at LBA 1",
            ),
            (
                "last usable LBA beyond the disk",
                Box::new(set_u64(48, 200)),
                "last usable LBA 200 lies beyond",
            ),
            (
                "first usable after last usable",
                Box::new(|h: &mut [u8]| {
                    set_u64(40, 34)(h);
                    set_u64(48, 33)(h);
                }),
                "first usable LBA 34 lies after the last usable LBA 33",
            ),
        ];
        for (name, edit, expected) in cases {
            let disk = hostile(edit);
            let block = &disk[512..1024];
            let err = parse_header(block, 512, 1, 200).expect_err(name);
            assert!(err.to_string().contains(expected), "{name}: {err}");
            // The backup is intact: reading the disk falls back to it.
            let table = read(&mut Cursor::new(disk)).expect(name);
            assert!(table.from_backup, "{name}");
            assert_eq!(table.by_label("root-a").expect(name).last_lba, 99);
        }
    }

    #[test]
    fn hostile_entries_are_refused() {
        let cases: [(&str, u64, u64, &str); 2] = [
            (
                "ends before it starts",
                60,
                59,
                "ends at LBA 59, before its first LBA 60",
            ),
            (
                "beyond the disk",
                60,
                200,
                "ends at LBA 200, beyond the disk's last LBA 199",
            ),
        ];
        for (name, first, last, expected) in cases {
            let disk = build_disk(512, 200, &[("root-a", ROOT_TYPE, ROOT_TYPE, first, last)]);
            let err = read(&mut Cursor::new(disk)).expect_err(name);
            assert!(err.to_string().contains(expected), "{name}: {err}");
        }
        let overlapping = build_disk(
            512,
            200,
            &[
                ("root-a", ROOT_TYPE, ROOT_TYPE, 60, 99),
                ("verity-a", VERITY_TYPE, VERITY_TYPE, 99, 109),
            ],
        );
        let err = read(&mut Cursor::new(overlapping)).expect_err("overlap");
        assert!(
            err.to_string().contains(
                "partition 2 (\"verity-a\", LBA 99..=109) overlaps partition 1 (\"root-a\", LBA 60..=99)"
            ),
            "{err}"
        );
        let disk = build_disk(512, 200, &[]);
        let header = parse_header(&disk[512..1024], 512, 1, 200).expect("header");
        let err = parse_entries(&header, &disk[1024..1024 + 128], 200).expect_err("short");
        assert!(
            err.to_string().contains("128 bytes, the header says 16384"),
            "{err}"
        );
    }

    #[test]
    fn both_tables_hostile_is_an_error_naming_both() {
        let mut disk = hostile(set_u32(84, 0x8000_0000));
        let last = disk.len() - 512;
        disk[last + 80..last + 84].copy_from_slice(&1_000_000u32.to_le_bytes());
        reseal(&mut disk, last);
        let err = read(&mut Cursor::new(disk)).expect_err("both bad");
        let text = err.to_string();
        assert!(text.contains("entry size 2147483648 bytes"), "{err}");
        assert!(
            text.contains("the backup: 1000000 partition entries"),
            "{err}"
        );

        // A bad CRC in the primary with a good backup reads the backup; a bad backup alone is
        // never looked at.
        let mut disk = hostile(|_| {});
        disk[512 + 16] ^= 1;
        assert!(read(&mut Cursor::new(disk)).expect("backup").from_backup);
        let mut disk = hostile(|_| {});
        disk[last + 16] ^= 1;
        assert!(!read(&mut Cursor::new(disk)).expect("primary").from_backup);
    }

    #[test]
    fn short_and_empty_inputs_are_errors_not_panics() {
        for len in [0usize, 7, 512, 600, 1024, 1100] {
            let mut disk = vec![0u8; len];
            if len >= 520 {
                disk[512..520].copy_from_slice(SIGNATURE);
            }
            assert!(read(&mut Cursor::new(disk)).is_err(), "{len} bytes");
        }
        for block in [&b""[..], b"EFI PART", b"EFI PART\0\0\x01\0\x5c\0\0\0"] {
            assert!(parse_header(block, 512, 1, 200).is_err());
        }
        assert!(parse_header(&[0u8; 512], 512, 1, 0).is_err());
    }

    /// A disk with both tables: esp, root-a and verity-a.
    fn two_table_disk() -> Vec<u8> {
        let mut disk = build_disk(
            512,
            400,
            &[
                (
                    "esp",
                    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
                    "aaaaaaaa-0000-0000-0000-000000000001",
                    40,
                    59,
                ),
                (
                    "root-a",
                    ROOT_TYPE,
                    "00112233-4455-6677-8899-aabbccddeeff",
                    60,
                    99,
                ),
                (
                    "verity-a",
                    VERITY_TYPE,
                    "01234567-89ab-cdef-0123-456789abcdef",
                    100,
                    109,
                ),
            ],
        );
        // Usable LBAs 34..=366, as a real table has them.
        disk[512 + 40..512 + 48].copy_from_slice(&34u64.to_le_bytes());
        disk[512 + 48..512 + 56].copy_from_slice(&366u64.to_le_bytes());
        reseal(&mut disk, 512);
        add_backup(&mut disk, 512);
        disk
    }

    fn set_uuid(disk: &mut Vec<u8>, label: &str, uuid: Uuid) {
        let mut cursor = Cursor::new(std::mem::take(disk));
        let table = read(&mut cursor).expect("table");
        let number = table.by_label(label).expect("label").number;
        let mut entries = read_entry_array(&mut cursor, &table.header).expect("entries");
        let entry = entry_mut(&mut entries, &table.header, number).expect("entry");
        entry[ENTRY_UUID..ENTRY_UUID + 16].copy_from_slice(&uuid.to_bytes_le());
        let alternate = if table.from_backup {
            table.header.my_lba
        } else {
            table.header.alternate_lba
        };
        let mut syncs = 0;
        write_in_place(
            &mut cursor,
            &table.header,
            &entries,
            alternate,
            table.header.last_usable_lba,
            |_| {
                syncs += 1;
                Ok(())
            },
        )
        .expect("write");
        assert_eq!(syncs, 2, "the backup and the primary are each flushed");
        *disk = cursor.into_inner();
    }

    #[test]
    fn rewriting_an_entry_keeps_both_tables_valid_and_equal() {
        let mut disk = two_table_disk();
        let uuid = Uuid::parse_str("deadbeef-0000-4000-8000-000000000001").expect("uuid");
        set_uuid(&mut disk, "root-a", uuid);
        let primary = read(&mut Cursor::new(disk.clone())).expect("primary");
        assert!(!primary.from_backup);
        assert_eq!(primary.by_label("root-a").expect("root-a").uuid, uuid);
        // The backup alone (primary header zeroed) says the same.
        let mut backup_only = disk.clone();
        backup_only[512..1024].fill(0);
        let backup = read(&mut Cursor::new(backup_only)).expect("backup");
        assert!(backup.from_backup);
        assert_eq!(backup.partitions, primary.partitions);
        assert_eq!(backup.header.last_usable_lba, 366);
    }

    #[test]
    fn rewriting_a_table_read_from_the_backup_repairs_the_primary() {
        let mut disk = two_table_disk();
        // The primary entry array is zeroed (its CRC no longer holds).
        disk[1024..1024 + 128 * 128].fill(0);
        assert!(
            read(&mut Cursor::new(disk.clone()))
                .expect("backup")
                .from_backup
        );
        let uuid = Uuid::parse_str("deadbeef-0000-4000-8000-000000000002").expect("uuid");
        set_uuid(&mut disk, "verity-a", uuid);
        let table = read(&mut Cursor::new(disk)).expect("repaired");
        assert!(!table.from_backup, "the primary was written again");
        assert_eq!(table.by_label("verity-a").expect("verity-a").uuid, uuid);
        assert_eq!(table.partitions.len(), 3);
    }

    #[test]
    fn entries_outside_the_array_are_errors() {
        let disk = two_table_disk();
        let table = read(&mut Cursor::new(disk.clone())).expect("table");
        let mut entries = read_entry_array(&mut Cursor::new(disk), &table.header).expect("entries");
        assert!(entry_mut(&mut entries, &table.header, 0).is_err());
        assert!(entry_mut(&mut entries, &table.header, 129).is_err());
        assert!(entry_mut(&mut entries, &table.header, 128).is_ok());
    }
}
