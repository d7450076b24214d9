//! Reading GUID partition tables of block devices: the primary header at LBA 1 and its entry
//! array, or, when the primary is damaged (a write torn by a power cut), the backup header in the
//! disk's last sector and its entry array, as UEFI firmware does.

use std::io::{Read, Seek, SeekFrom};

/// A partition read from a GPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based partition number (index in the entry array + 1), as the kernel numbers partitions.
    pub number: u32,
    /// Partition type GUID, lowercase `8-4-4-4-12`.
    pub type_guid: String,
    /// Unique partition GUID, lowercase `8-4-4-4-12`.
    pub uuid: String,
    /// First LBA.
    pub first_lba: u64,
    /// Last LBA (inclusive).
    pub last_lba: u64,
    /// Partition name (label), UTF-16LE decoded.
    pub label: String,
}

/// A GPT read from a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Logical sector size the table was found with (512 or 4096).
    pub sector_size: u64,
    /// Disk GUID.
    pub disk_guid: String,
    /// Used entries (non-zero type GUID).
    pub partitions: Vec<Partition>,
    /// Read from the backup GPT because the primary one is damaged.
    pub from_backup: bool,
}

impl Table {
    /// The partition whose label is exactly `label`.
    pub fn by_label(&self, label: &str) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.label == label)
    }
}

/// Why a GPT could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    /// No `EFI PART` signature at LBA 1 for 512- or 4096-byte sectors.
    #[error("no GPT: no \"EFI PART\" signature at LBA 1")]
    NotGpt,
    /// The header or entries are inconsistent.
    #[error("corrupt GPT: {0}")]
    Corrupt(String),
    /// Reading the device failed.
    #[error("reading: {0}")]
    Io(#[from] std::io::Error),
}

/// Formats a GUID stored on disk in mixed-endian order as its standard string.
pub fn guid_to_string(raw: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes_le(*raw).to_string()
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

fn guid_at(buf: &[u8], offset: usize) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw.copy_from_slice(&buf[offset..offset + 16]);
    raw
}

/// Reads the primary GPT, trying 512- then 4096-byte sectors, and checks both CRCs; falls back to
/// the backup GPT (equally checked) when the primary is missing or damaged. The error is the
/// primary's when neither is usable.
pub fn read<R: Read + Seek>(disk: &mut R) -> Result<Table, GptError> {
    let primary = match read_primary(disk) {
        Err(e @ (GptError::NotGpt | GptError::Corrupt(_))) => e,
        other => return other,
    };
    match read_backup(disk) {
        Ok(Some(table)) => Ok(table),
        Ok(None) | Err(_) => Err(primary),
    }
}

/// The backup GPT: its header in the last sector, for 512- or 4096-byte sectors.
fn read_backup<R: Read + Seek>(disk: &mut R) -> Result<Option<Table>, GptError> {
    let len = disk.seek(SeekFrom::End(0))?;
    for sector_size in [512u64, 4096] {
        if len < 3 * sector_size || len % sector_size != 0 {
            continue;
        }
        let last_lba = len / sector_size - 1;
        let mut header = vec![0u8; 512];
        disk.seek(SeekFrom::Start(last_lba * sector_size))?;
        disk.read_exact(&mut header)?;
        if &header[0..8] != b"EFI PART" || u64_at(&header, 24) != last_lba {
            continue;
        }
        if let Ok(mut table) = read_with_header(disk, sector_size, &header) {
            table.from_backup = true;
            return Ok(Some(table));
        }
    }
    Ok(None)
}

fn read_primary<R: Read + Seek>(disk: &mut R) -> Result<Table, GptError> {
    for sector_size in [512u64, 4096] {
        let mut header = vec![0u8; 512];
        disk.seek(SeekFrom::Start(sector_size))?;
        match disk.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => continue,
            Err(e) => return Err(e.into()),
        }
        if &header[0..8] != b"EFI PART" {
            continue;
        }
        return read_with_header(disk, sector_size, &header);
    }
    Err(GptError::NotGpt)
}

fn read_with_header<R: Read + Seek>(
    disk: &mut R,
    sector_size: u64,
    header: &[u8],
) -> Result<Table, GptError> {
    let header_size = u32_at(header, 12) as usize;
    if !(92..=512).contains(&header_size) {
        return Err(GptError::Corrupt(format!(
            "header size {header_size} (expected 92..=512)"
        )));
    }
    let mut check = header[..header_size].to_vec();
    check[16..20].fill(0);
    let stored = u32_at(header, 16);
    let computed = crc32fast::hash(&check);
    if stored != computed {
        return Err(GptError::Corrupt(format!(
            "header CRC32 is {stored:#010x}, computed {computed:#010x}"
        )));
    }
    let entries_lba = u64_at(header, 72);
    let count = u32_at(header, 80);
    let entry_size = u32_at(header, 84);
    if !(128..=4096).contains(&entry_size) || !entry_size.is_multiple_of(8) || count > 4096 {
        return Err(GptError::Corrupt(format!(
            "{count} entries of {entry_size} bytes (expected at most 4096 entries of 128..=4096 bytes)"
        )));
    }
    let mut entries = vec![0u8; count as usize * entry_size as usize];
    disk.seek(SeekFrom::Start(entries_lba * sector_size))?;
    disk.read_exact(&mut entries)?;
    let stored = u32_at(header, 88);
    let computed = crc32fast::hash(&entries);
    if stored != computed {
        return Err(GptError::Corrupt(format!(
            "partition entry array CRC32 is {stored:#010x}, computed {computed:#010x}"
        )));
    }
    let mut partitions = Vec::new();
    for (index, entry) in entries.chunks_exact(entry_size as usize).enumerate() {
        let type_raw = guid_at(entry, 0);
        if type_raw == [0u8; 16] {
            continue;
        }
        let name_units: Vec<u16> = entry[56..128]
            .chunks_exact(2)
            .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
            .take_while(|&unit| unit != 0)
            .collect();
        partitions.push(Partition {
            number: index as u32 + 1,
            type_guid: guid_to_string(&type_raw),
            uuid: guid_to_string(&guid_at(entry, 16)),
            first_lba: u64_at(entry, 32),
            last_lba: u64_at(entry, 40),
            label: String::from_utf16_lossy(&name_units),
        });
    }
    Ok(Table {
        sector_size,
        disk_guid: guid_to_string(&guid_at(header, 56)),
        partitions,
        from_backup: false,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    /// Parses a GUID string into its mixed-endian on-disk form.
    pub(crate) fn guid_bytes(text: &str) -> [u8; 16] {
        let hex: String = text.chars().filter(|c| *c != '-').collect();
        let b = hex::decode(&hex).expect("guid hex");
        [
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
            b[14], b[15],
        ]
    }

    /// Builds a disk image with a primary GPT: `(label, type, uuid, first_lba, last_lba)`.
    pub(crate) fn build_disk(
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
        header[0..8].copy_from_slice(b"EFI PART");
        header[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        header[12..16].copy_from_slice(&92u32.to_le_bytes());
        header[24..32].copy_from_slice(&1u64.to_le_bytes());
        header[32..40].copy_from_slice(&(total_sectors - 1).to_le_bytes());
        header[56..72].copy_from_slice(&guid_bytes("11111111-2222-3333-4444-555555555555"));
        header[72..80].copy_from_slice(&2u64.to_le_bytes());
        header[80..84].copy_from_slice(&(entry_count as u32).to_le_bytes());
        header[84..88].copy_from_slice(&128u32.to_le_bytes());
        header[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
        let crc = crc32fast::hash(&header);
        header[16..20].copy_from_slice(&crc.to_le_bytes());
        let s = sector as usize;
        disk[s..s + 92].copy_from_slice(&header);
        disk[2 * s..2 * s + entries.len()].copy_from_slice(&entries);
        disk
    }

    /// Adds the backup GPT of a [`build_disk`] disk: entries before the last sector, the header
    /// in it.
    pub(crate) fn add_backup(disk: &mut [u8], sector: u64) {
        let s = sector as usize;
        let total = disk.len() / s;
        let mut header = disk[s..s + 92].to_vec();
        let entries_len = u32_at(&header, 80) as usize * u32_at(&header, 84) as usize;
        let entries = disk[2 * s..2 * s + entries_len].to_vec();
        let entries_lba = total - 1 - entries_len.div_ceil(s);
        header[24..32].copy_from_slice(&(total as u64 - 1).to_le_bytes());
        header[32..40].copy_from_slice(&1u64.to_le_bytes());
        header[72..80].copy_from_slice(&(entries_lba as u64).to_le_bytes());
        header[16..20].fill(0);
        let crc = crc32fast::hash(&header);
        header[16..20].copy_from_slice(&crc.to_le_bytes());
        disk[entries_lba * s..entries_lba * s + entries_len].copy_from_slice(&entries);
        disk[(total - 1) * s..(total - 1) * s + 92].copy_from_slice(&header);
    }

    pub(crate) const ROOT_TYPE: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
    pub(crate) const VERITY_TYPE: &str = "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5";

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
            assert_eq!(table.disk_guid, "11111111-2222-3333-4444-555555555555");
            let root = table.by_label("root-a").expect("root-a");
            assert_eq!(root.number, 2);
            assert_eq!(root.type_guid, ROOT_TYPE);
            assert_eq!(root.uuid, "00112233-4455-6677-8899-aabbccddeeff");
            assert_eq!((root.first_lba, root.last_lba), (60, 99));
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

            // Both damaged: the primary's error.
            let mut both = disk.clone();
            both[sector as usize + 20] ^= 0xff;
            let last = disk.len() - sector as usize;
            both[last + 20] ^= 0xff;
            let err = read(&mut Cursor::new(both)).expect_err("no usable table");
            assert!(err.to_string().contains("header CRC32"), "{err}");
        }
    }
}
