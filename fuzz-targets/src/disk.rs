//! A disk image made from a short fuzzer input: a few bytes choose its size (up to 32 Mi
//! sectors' worth of zeros, never allocated), and the rest become its first sectors and its last
//! ones, so both GPT headers are in reach of a small input.
//!
//! Input layout: `flags`, `sectors` (u16 LE), then the body.
//! - size: `(sectors + 3)` sectors of 512 bytes, or of 4096 with [`FLAG_4K`]; minus 1..=511 bytes
//!   with [`FLAG_RAGGED`] (a size that is no whole number of sectors);
//! - the body is split in two halves: the first half starts at LBA 1 (the primary header), the
//!   second half ends at the end of the disk (the backup header in the last sector); with
//!   [`FLAG_MIRROR`] the whole body starts at LBA 1 and the backup is derived from it, as a
//!   partitioning tool writes it;
//! - [`FLAG_SEAL`] recomputes the entry-array and header CRCs of both headers, so the fuzzer
//!   gets past the checksums to the fields behind them.

use std::io::{self, Read, Seek, SeekFrom};

/// Sectors are 4096 bytes instead of 512.
pub const FLAG_4K: u8 = 1;
/// The disk ends a few bytes short of a whole sector.
pub const FLAG_RAGGED: u8 = 2;
/// The backup GPT is derived from the primary one.
pub const FLAG_MIRROR: u8 = 4;
/// The CRCs of both headers and their entry arrays are made valid.
pub const FLAG_SEAL: u8 = 8;

/// Most entry-array bytes copied when deriving or sealing (the GPT reader refuses more anyway).
const MAX_ENTRIES_BYTES: u64 = 1 << 20;

/// A read-only disk of `len` bytes: `head` at offset 0, `tail` ending at `len`, zeros between.
/// Where they overlap, `tail` wins.
#[derive(Debug, Clone)]
pub struct SparseDisk {
    len: u64,
    head: Vec<u8>,
    tail: Vec<u8>,
    pos: u64,
}

impl SparseDisk {
    /// A disk of `len` bytes with `head` at its start and `tail` at its end (both cut to `len`).
    pub fn new(len: u64, mut head: Vec<u8>, mut tail: Vec<u8>) -> SparseDisk {
        let cap = usize::try_from(len).unwrap_or(usize::MAX);
        head.truncate(cap);
        if tail.len() > cap {
            tail.drain(..tail.len() - cap);
        }
        SparseDisk {
            len,
            head,
            tail,
            pos: 0,
        }
    }

    /// The disk the input describes (see the module documentation).
    pub fn from_fuzz(data: &[u8]) -> SparseDisk {
        let flags = data.first().copied().unwrap_or(0);
        let sectors = u64::from(u16::from_le_bytes([
            data.get(1).copied().unwrap_or(0),
            data.get(2).copied().unwrap_or(0),
        ]));
        let body = data.get(3..).unwrap_or_default();
        let sector: u64 = if flags & FLAG_4K != 0 { 4096 } else { 512 };
        let mut len = (sectors + 3) * sector;
        if flags & FLAG_RAGGED != 0 {
            len -= 1 + u64::from(flags >> 4) * 31;
        }
        let mut head = vec![0u8; sector as usize];
        let tail = if flags & FLAG_MIRROR != 0 {
            head.extend_from_slice(body);
            derive_backup(&head, sector, len)
        } else {
            let (first, second) = body.split_at(body.len() / 2);
            head.extend_from_slice(first);
            second.to_vec()
        };
        let mut disk = SparseDisk::new(len, head, tail);
        if flags & FLAG_SEAL != 0 {
            disk.seal(sector, 1);
            let last = len / sector;
            if last > 0 {
                disk.seal(sector, last - 1);
            }
        }
        disk
    }

    /// Length of the disk in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a disk of no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The disk's bytes at `offset..offset + len` (cut at the end of the disk).
    pub fn range(&self, offset: u64, len: u64) -> Vec<u8> {
        let end = offset.saturating_add(len).min(self.len);
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            out.push(self.byte(at));
            at += 1;
        }
        out
    }

    fn byte(&self, at: u64) -> u8 {
        let tail_start = self.len - self.tail.len() as u64;
        if at >= tail_start {
            self.tail[(at - tail_start) as usize]
        } else {
            self.head.get(at as usize).copied().unwrap_or(0)
        }
    }

    /// Writes `bytes` at `offset` into whichever stored part holds it; bytes in the zero gap
    /// between `head` and `tail` extend `head`.
    fn write(&mut self, offset: u64, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let at = offset + i as u64;
            if at >= self.len {
                return;
            }
            let tail_start = self.len - self.tail.len() as u64;
            if at >= tail_start {
                self.tail[(at - tail_start) as usize] = *b;
            } else {
                let at = at as usize;
                if at >= self.head.len() {
                    self.head.resize(at + 1, 0);
                }
                self.head[at] = *b;
            }
        }
    }

    /// Makes the entry-array CRC and the header CRC of a header at `lba` valid, if one is there.
    fn seal(&mut self, sector: u64, lba: u64) {
        let at = lba * sector;
        let header = self.range(at, 92);
        if header.len() < 92 || &header[..8] != b"EFI PART" {
            return;
        }
        let entries_lba = u64_at(&header, 72);
        let entries_len = u64::from(u32_at(&header, 80)) * u64::from(u32_at(&header, 84));
        if entries_len <= MAX_ENTRIES_BYTES {
            if let Some(offset) = entries_lba.checked_mul(sector) {
                let entries = self.range(offset, entries_len);
                self.write(at + 88, &crc32fast::hash(&entries).to_le_bytes());
            }
        }
        let size = u64::from(u32_at(&header, 12)).clamp(92, 512);
        let header = self.range(at, size);
        if header.len() < 20 {
            return;
        }
        self.write(at + 16, &os_config::gpt::header_crc(&header).to_le_bytes());
    }
}

/// The backup GPT a partitioning tool writes for the primary header in `head` (at LBA 1): the
/// entry array just before the last sector, the header in the last sector, with its own and the
/// alternate LBA swapped. Returned as the disk's tail.
fn derive_backup(head: &[u8], sector: u64, len: u64) -> Vec<u8> {
    let s = sector as usize;
    let Some(header) = head.get(s..s + 92) else {
        return Vec::new();
    };
    let last_lba = len / sector;
    if last_lba < 3 {
        return Vec::new();
    }
    let last_lba = last_lba - 1;
    let entries_len = u64::from(u32_at(header, 80)) * u64::from(u32_at(header, 84));
    if entries_len > MAX_ENTRIES_BYTES {
        return Vec::new();
    }
    let entries_lba = u64_at(header, 72);
    let entries: Vec<u8> = (0..entries_len)
        .map(|i| {
            entries_lba
                .checked_mul(sector)
                .and_then(|o| o.checked_add(i))
                .and_then(|o| head.get(usize::try_from(o).ok()?).copied())
                .unwrap_or(0)
        })
        .collect();
    let entries_sectors = entries_len.div_ceil(sector);
    let Some(backup_entries_lba) = last_lba.checked_sub(entries_sectors) else {
        return Vec::new();
    };
    let mut backup = head[s..(s + 512).min(head.len())].to_vec();
    backup[24..32].copy_from_slice(&last_lba.to_le_bytes());
    backup[32..40].copy_from_slice(&1u64.to_le_bytes());
    backup[72..80].copy_from_slice(&backup_entries_lba.to_le_bytes());
    // The tail: entry array, padded to whole sectors, then the header's sector; it ends at `len`.
    let mut tail = entries;
    tail.resize((entries_sectors * sector) as usize, 0);
    let header_at = tail.len();
    tail.resize(header_at + s, 0);
    tail[header_at..header_at + backup.len()].copy_from_slice(&backup);
    // Bytes after the last whole sector (a ragged disk) follow it.
    tail.resize(tail.len() + (len % sector) as usize, 0);
    tail
}

fn u32_at(buf: &[u8], offset: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[offset..offset + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(buf: &[u8], offset: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[offset..offset + 8]);
    u64::from_le_bytes(b)
}

impl Read for SparseDisk {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        let tail_start = self.len - self.tail.len() as u64;
        for (i, out) in buf[..n].iter_mut().enumerate() {
            let at = self.pos + i as u64;
            *out = if at >= tail_start {
                self.tail[(at - tail_start) as usize]
            } else {
                self.head.get(at as usize).copied().unwrap_or(0)
            };
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for SparseDisk {
    fn seek(&mut self, from: SeekFrom) -> io::Result<u64> {
        let target = match from {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the disk",
            )
        })?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_and_tail_land_at_both_ends() {
        let mut disk = SparseDisk::new(10, vec![1, 2], vec![8, 9]);
        let mut all = Vec::new();
        disk.read_to_end(&mut all).expect("read");
        assert_eq!(all, [1, 2, 0, 0, 0, 0, 0, 0, 8, 9]);
        assert_eq!(disk.range(7, 10), [0, 8, 9]);
    }

    #[test]
    fn size_comes_from_the_input() {
        assert_eq!(SparseDisk::from_fuzz(&[0, 1, 0]).len(), 4 * 512);
        assert_eq!(SparseDisk::from_fuzz(&[FLAG_4K, 0, 0]).len(), 3 * 4096);
        assert_eq!(
            SparseDisk::from_fuzz(&[FLAG_RAGGED, 0, 0]).len(),
            3 * 512 - 1
        );
        assert_eq!(SparseDisk::from_fuzz(&[]).len(), 3 * 512);
    }
}
