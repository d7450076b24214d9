//! The one repair of FAT32 folder entries that the builder (writing a new ESP) and the update
//! agent (writing boot entries, kernels and folders into a machine's ESP) both apply after the
//! `fatfs` crate has written, so the ESP stays clean for `fsck.vfat` and firmware.
//!
//! `fatfs` 0.3 gives a new folder's `.` and `..` long-name entries (so they are not the first two
//! slots, which `fsck.vfat` and some firmware require) and points `..` of a top-level folder at
//! the root cluster instead of 0. [`repair_dot_entries`] walks the folder tree from the root,
//! drops those long-name entries and zeroes such `..` clusters; nothing else moves, and clusters
//! that need no change are not written. It reads the volume as untrusted bytes: every field of
//! the boot sector and every cluster number is checked before use, and a folder tree whose
//! chains loop is an error.

use std::collections::BTreeSet;
use std::io::{self, Read, Seek, SeekFrom, Write};

/// Size of a folder entry.
const ENTRY: usize = 32;

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Where the FAT and the clusters of a FAT32 volume are, checked against the volume's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    fat_start: u64,
    fat_len: u64,
    data_start: u64,
    cluster_size: u64,
    /// Clusters are numbered 2..end.
    end: u64,
    root: u64,
}

impl Geometry {
    /// Reads the boot sector of a FAT32 volume of `len` bytes.
    fn parse(boot: &[u8; 512], len: u64) -> io::Result<Geometry> {
        let u16_at = |o: usize| u64::from(u16::from_le_bytes([boot[o], boot[o + 1]]));
        let u32_at = |o: usize| {
            u64::from(u32::from_le_bytes([
                boot[o],
                boot[o + 1],
                boot[o + 2],
                boot[o + 3],
            ]))
        };
        let bytes_per_sector = u16_at(11);
        if !matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096) {
            return Err(invalid(format!(
                "FAT boot sector: {bytes_per_sector} bytes per sector (expected 512, 1024, 2048 or 4096)"
            )));
        }
        let sectors_per_cluster = u64::from(boot[13]);
        if !sectors_per_cluster.is_power_of_two() {
            return Err(invalid(format!(
                "FAT boot sector: {sectors_per_cluster} sectors per cluster (expected a power of two)"
            )));
        }
        let (fats, fat16_sectors, fat_sectors) = (u64::from(boot[16]), u16_at(22), u32_at(36));
        if fat16_sectors != 0 || fat_sectors == 0 || fats == 0 {
            return Err(invalid(
                "FAT boot sector: not a FAT32 volume (no FAT32 table size, or no FAT)".to_owned(),
            ));
        }
        let cluster_size = bytes_per_sector * sectors_per_cluster;
        let fat_start = u16_at(14) * bytes_per_sector;
        let fat_len = fat_sectors * bytes_per_sector;
        let data_start = fats
            .checked_mul(fat_len)
            .and_then(|fats| fats.checked_add(fat_start))
            .filter(|start| *start <= len)
            .ok_or_else(|| {
                invalid(format!(
                    "FAT boot sector: {fats} FATs of {fat_len} bytes from byte {fat_start} do not fit the volume's {len} bytes"
                ))
            })?;
        // Clusters that lie in the volume and have a FAT entry.
        let end = ((len - data_start) / cluster_size + 2).min(fat_len / 4);
        let root = u32_at(44);
        let geometry = Geometry {
            fat_start,
            fat_len,
            data_start,
            cluster_size,
            end,
            root,
        };
        geometry.check(root, "the root folder")?;
        Ok(geometry)
    }

    fn check(&self, cluster: u64, what: &str) -> io::Result<()> {
        if (2..self.end).contains(&cluster) {
            Ok(())
        } else {
            Err(invalid(format!(
                "{what} starts at cluster {cluster}, outside the volume's clusters 2..{}",
                self.end
            )))
        }
    }

    fn offset(&self, cluster: u64) -> u64 {
        self.data_start + (cluster - 2) * self.cluster_size
    }

    /// The clusters of a folder's chain, following the first FAT; a cluster already in `seen`
    /// (a chain that loops, or two folders sharing clusters) is an error.
    fn chain<D: Read + Seek>(
        &self,
        device: &mut D,
        first: u64,
        seen: &mut BTreeSet<u64>,
    ) -> io::Result<Vec<u64>> {
        let mut chain = Vec::new();
        let mut cluster = first;
        while cluster < 0x0fff_fff8 {
            self.check(cluster, "a folder's cluster chain")?;
            if !seen.insert(cluster) {
                return Err(invalid(format!(
                    "the folder chain from cluster {first} reaches cluster {cluster} a second time: the folder tree loops"
                )));
            }
            chain.push(cluster);
            let mut next = [0u8; 4];
            device.seek(SeekFrom::Start(self.fat_start + cluster * 4))?;
            device.read_exact(&mut next)?;
            cluster = u64::from(u32::from_le_bytes(next) & 0x0fff_ffff);
        }
        Ok(chain)
    }
}

/// First cluster recorded in a folder entry.
fn entry_cluster(entry: &[u8]) -> u64 {
    u64::from(u16::from_le_bytes([entry[20], entry[21]])) << 16
        | u64::from(u16::from_le_bytes([entry[26], entry[27]]))
}

/// Rewrites every folder's `.` and `..` entries of the FAT32 volume on `device` (the whole
/// volume) the way the FAT specification wants them; see the module documentation. Idempotent:
/// a clean volume is read and not written.
pub fn repair_dot_entries<D: Read + Write + Seek>(device: &mut D) -> io::Result<()> {
    let len = device.seek(SeekFrom::End(0))?;
    let mut boot = [0u8; 512];
    device.rewind()?;
    device.read_exact(&mut boot)?;
    let geometry = Geometry::parse(&boot, len)?;
    let root = geometry.root;
    let cluster_size = geometry.cluster_size as usize;
    let mut seen = BTreeSet::new();
    let mut pending = vec![(root, true)];
    while let Some((first, is_root)) = pending.pop() {
        let chain = geometry.chain(device, first, &mut seen)?;
        let mut old = vec![0u8; chain.len() * cluster_size];
        for (cluster, data) in chain.iter().zip(old.chunks_mut(cluster_size)) {
            device.seek(SeekFrom::Start(geometry.offset(*cluster)))?;
            device.read_exact(data)?;
        }
        let mut kept: Vec<&[u8]> = Vec::new();
        let mut long_names: Vec<&[u8]> = Vec::new();
        let mut fixed_dotdot = None;
        for entry in old.chunks(ENTRY) {
            if entry[0] == 0 {
                break;
            }
            let attributes = entry[11];
            if entry[0] == 0xe5 {
                kept.append(&mut long_names);
                kept.push(entry);
                continue;
            }
            if attributes & 0x3f == 0x0f {
                long_names.push(entry);
                continue;
            }
            let name = &entry[..11];
            if name == b".          " || name == b"..         " {
                long_names.clear();
                if name[1] == b'.' && !is_root && entry_cluster(entry) == root {
                    fixed_dotdot = Some(kept.len());
                }
            } else if attributes & 0x10 != 0 && attributes & 0x08 == 0 {
                let cluster = entry_cluster(entry);
                geometry.check(cluster, "a folder")?;
                pending.push((cluster, false));
            }
            kept.append(&mut long_names);
            kept.push(entry);
        }
        let mut new: Vec<u8> = kept.concat();
        if let Some(index) = fixed_dotdot {
            let at = index * ENTRY;
            new[at + 20..at + 22].fill(0);
            new[at + 26..at + 28].fill(0);
        }
        new.resize(old.len(), 0);
        for ((cluster, before), after) in chain
            .iter()
            .zip(old.chunks(cluster_size))
            .zip(new.chunks(cluster_size))
        {
            if before != after {
                device.seek(SeekFrom::Start(geometry.offset(*cluster)))?;
                device.write_all(after)?;
            }
        }
    }
    device.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A minimal FAT32 volume: 512-byte sectors, 1 sector per cluster, 1 reserved sector, one
    /// FAT of 1 sector (128 entries), root at cluster 2, 64 clusters.
    fn volume() -> Vec<u8> {
        let mut v = vec![0u8; 512 * (2 + 64)];
        v[11..13].copy_from_slice(&512u16.to_le_bytes());
        v[13] = 1;
        v[14..16].copy_from_slice(&1u16.to_le_bytes());
        v[16] = 1;
        v[36..40].copy_from_slice(&1u32.to_le_bytes());
        v[44..48].copy_from_slice(&2u32.to_le_bytes());
        set_fat(&mut v, 2, 0x0fff_ffff);
        v
    }

    fn set_fat(v: &mut [u8], cluster: usize, next: u32) {
        v[512 + cluster * 4..512 + cluster * 4 + 4].copy_from_slice(&next.to_le_bytes());
    }

    fn cluster(v: &mut [u8], n: usize) -> &mut [u8] {
        let at = 1024 + (n - 2) * 512;
        &mut v[at..at + 512]
    }

    fn entry(name: &[u8; 11], attributes: u8, first: u32) -> [u8; 32] {
        let mut e = [0u8; 32];
        e[..11].copy_from_slice(name);
        e[11] = attributes;
        e[20..22].copy_from_slice(&((first >> 16) as u16).to_le_bytes());
        e[26..28].copy_from_slice(&(first as u16).to_le_bytes());
        e
    }

    fn long_name() -> [u8; 32] {
        let mut e = [0x41u8; 32];
        e[11] = 0x0f;
        e
    }

    /// Root holds folder `DIR` at cluster 3, which fatfs-style has long names before `.` and
    /// `..` and a `..` pointing at the root cluster.
    fn fatfs_style() -> Vec<u8> {
        let mut v = volume();
        set_fat(&mut v, 3, 0x0fff_ffff);
        cluster(&mut v, 2)[..32].copy_from_slice(&entry(b"DIR        ", 0x10, 3));
        let dir = cluster(&mut v, 3);
        dir[..32].copy_from_slice(&long_name());
        dir[32..64].copy_from_slice(&entry(b".          ", 0x10, 3));
        dir[64..96].copy_from_slice(&long_name());
        dir[96..128].copy_from_slice(&entry(b"..         ", 0x10, 2));
        dir[128..160].copy_from_slice(&entry(b"FILE    TXT", 0x20, 0));
        v
    }

    #[test]
    fn dot_entries_come_first_and_dotdot_of_a_top_folder_is_zero() {
        let mut disk = Cursor::new(fatfs_style());
        repair_dot_entries(&mut disk).expect("repairs");
        let mut v = disk.into_inner();
        let dir = cluster(&mut v, 3).to_vec();
        assert_eq!(&dir[..11], b".          ");
        assert_eq!(&dir[32..43], b"..         ");
        assert_eq!(entry_cluster(&dir[32..64]), 0);
        assert_eq!(&dir[64..75], b"FILE    TXT");
        assert!(dir[96..].iter().all(|b| *b == 0));
        // Idempotent: a second pass changes nothing.
        let mut again = Cursor::new(v.clone());
        repair_dot_entries(&mut again).expect("repairs");
        assert!(again.into_inner() == v);
    }

    #[test]
    fn hostile_volumes_are_errors_not_panics_or_endless_walks() {
        type Edit = fn(&mut Vec<u8>);
        let cases: [(&str, Edit, &str); 7] = [
            ("zeroed", |v| v.fill(0), "0 bytes per sector"),
            (
                "0 sectors per cluster",
                |v| v[13] = 0,
                "0 sectors per cluster",
            ),
            ("FAT16", |v| v[22] = 1, "not a FAT32 volume"),
            (
                "FATs beyond the volume",
                |v| v[16] = 255,
                "255 FATs of 512 bytes",
            ),
            (
                "root cluster 0",
                |v| v[44..48].fill(0),
                "the root folder starts at cluster 0",
            ),
            (
                "a folder chain that loops",
                |v| set_fat(v, 3, 3),
                "reaches cluster 3 a second time",
            ),
            (
                "a folder that is its own parent",
                |v| {
                    let e = entry(b"LOOP       ", 0x10, 2);
                    cluster(v, 3)[160..192].copy_from_slice(&e);
                },
                "reaches cluster 2 a second time",
            ),
        ];
        for (name, edit, expected) in cases {
            let mut v = fatfs_style();
            edit(&mut v);
            let err = repair_dot_entries(&mut Cursor::new(v)).expect_err(name);
            assert!(err.to_string().contains(expected), "{name}: {err}");
        }
        let err = repair_dot_entries(&mut Cursor::new(vec![0u8; 100])).expect_err("short");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
