//! Volume labels read from a device's first bytes, without mounting: the ISO 9660 primary volume
//! descriptor's volume identifier and the FAT boot sector's volume label.

use std::io::{self, Read, Seek, SeekFrom};

/// Where ISO 9660 volume descriptors start (sector 16 of 2048 bytes).
const ISO_DESCRIPTORS: u64 = 32 * 1024;
/// Size of an ISO 9660 volume descriptor.
const ISO_SECTOR: usize = 2048;
/// Volume descriptors looked at for the primary one, at most.
const ISO_MAX_DESCRIPTORS: u64 = 16;
/// Bytes of a FAT boot sector read.
const FAT_SECTOR: usize = 512;

/// The filesystem a label was found in, as `mount(2)` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeFs {
    Vfat,
    Iso9660,
}

impl VolumeFs {
    /// The name `mount(2)` takes.
    pub fn fstype(self) -> &'static str {
        match self {
            VolumeFs::Vfat => "vfat",
            VolumeFs::Iso9660 => "iso9660",
        }
    }
}

/// A label's bytes without the padding (spaces, NULs) at its end; `None` if empty or not text.
fn padded_text(bytes: &[u8]) -> Option<String> {
    let end = bytes
        .iter()
        .rposition(|b| *b != b' ' && *b != 0)
        .map_or(0, |i| i + 1);
    let text = std::str::from_utf8(&bytes[..end]).ok()?;
    (!text.is_empty()).then(|| text.to_owned())
}

/// The volume identifier of an ISO 9660 primary volume descriptor (`\x01CD001\x01`, 32 bytes at
/// +40), or `None` if `descriptor` is not one.
pub fn iso9660_label(descriptor: &[u8]) -> Option<String> {
    if descriptor.len() < 72 || &descriptor[..7] != b"\x01CD001\x01" {
        return None;
    }
    padded_text(&descriptor[40..72])
}

/// The volume label of a FAT boot sector (FAT32: type `FAT32   ` at 0x52, label at 0x47;
/// FAT12/16: type `FAT…` at 0x36, label at 0x2B; both after the extended boot signature 0x29),
/// or `None` if `sector` is not one or its label is unset (`NO NAME`).
pub fn fat_label(sector: &[u8]) -> Option<String> {
    if sector.len() < FAT_SECTOR {
        return None;
    }
    let (signature, label) = if &sector[0x52..0x5A] == b"FAT32   " {
        (sector[0x42], &sector[0x47..0x52])
    } else if &sector[0x36..0x39] == b"FAT" {
        (sector[0x26], &sector[0x2B..0x36])
    } else {
        return None;
    };
    if signature != 0x29 {
        return None;
    }
    padded_text(label).filter(|l| l != "NO NAME")
}

/// The filesystem and label of the volume `device` holds, if it is an ISO 9660 or FAT volume
/// with a label. A device shorter than the structures is no such volume, not an error.
pub fn read_label<R: Read + Seek>(device: &mut R) -> io::Result<Option<(VolumeFs, String)>> {
    let mut sector = vec![0u8; FAT_SECTOR];
    if read_at(device, 0, &mut sector)? {
        if let Some(label) = fat_label(&sector) {
            return Ok(Some((VolumeFs::Vfat, label)));
        }
    }
    let mut descriptor = vec![0u8; ISO_SECTOR];
    for index in 0..ISO_MAX_DESCRIPTORS {
        let offset = ISO_DESCRIPTORS + index * ISO_SECTOR as u64;
        if !read_at(device, offset, &mut descriptor)? || &descriptor[1..6] != b"CD001" {
            break;
        }
        match descriptor[0] {
            1 => return Ok(iso9660_label(&descriptor).map(|l| (VolumeFs::Iso9660, l))),
            // The set terminator: no primary descriptor.
            255 => break,
            _ => {}
        }
    }
    Ok(None)
}

/// Fills `buf` from `offset`; false if the device ends before.
fn read_at<R: Read + Seek>(device: &mut R, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
    device.seek(SeekFrom::Start(offset))?;
    match device.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn iso(label: &str) -> Vec<u8> {
        let mut image = vec![0u8; 40 * 1024];
        let pvd = &mut image[32 * 1024..34 * 1024];
        pvd[..7].copy_from_slice(b"\x01CD001\x01");
        pvd[40..72].fill(b' ');
        pvd[40..40 + label.len()].copy_from_slice(label.as_bytes());
        let term = &mut image[34 * 1024..36 * 1024];
        term[..7].copy_from_slice(b"\xffCD001\x01");
        image
    }

    fn fat(fat32: bool, label: &[u8; 11]) -> Vec<u8> {
        let mut image = vec![0u8; 4096];
        if fat32 {
            image[0x42] = 0x29;
            image[0x47..0x52].copy_from_slice(label);
            image[0x52..0x5A].copy_from_slice(b"FAT32   ");
        } else {
            image[0x26] = 0x29;
            image[0x2B..0x36].copy_from_slice(label);
            image[0x36..0x3E].copy_from_slice(b"FAT16   ");
        }
        image[510..512].copy_from_slice(&[0x55, 0xAA]);
        image
    }

    fn label(image: Vec<u8>) -> Option<(VolumeFs, String)> {
        read_label(&mut Cursor::new(image)).expect("reads")
    }

    #[test]
    fn labels_are_read_from_iso9660_fat16_and_fat32() {
        assert_eq!(
            label(iso("cidata")),
            Some((VolumeFs::Iso9660, "cidata".into()))
        );
        assert_eq!(
            label(iso("config-2")),
            Some((VolumeFs::Iso9660, "config-2".into()))
        );
        assert_eq!(
            label(fat(false, b"CIDATA     ")),
            Some((VolumeFs::Vfat, "CIDATA".into()))
        );
        assert_eq!(
            label(fat(true, b"config-2   ")),
            Some((VolumeFs::Vfat, "config-2".into()))
        );
    }

    #[test]
    fn other_bytes_have_no_label() {
        assert_eq!(label(vec![0u8; 64 * 1024]), None);
        assert_eq!(label(vec![0u8; 100]), None, "shorter than a boot sector");
        assert_eq!(label(fat(true, b"NO NAME    ")), None);
        let mut no_signature = fat(false, b"CIDATA     ");
        no_signature[0x26] = 0;
        assert_eq!(label(no_signature), None);
        // An ext4 superblock magic is neither.
        let mut ext4 = vec![0u8; 64 * 1024];
        ext4[1080..1082].copy_from_slice(&0xEF53u16.to_le_bytes());
        assert_eq!(label(ext4), None);
        // A descriptor set without a primary volume descriptor.
        let mut image = iso("x");
        image[32 * 1024] = 2;
        assert_eq!(label(image), None);
    }

    #[test]
    fn a_real_mkfs_vfat_image_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("cidata.img");
        std::fs::write(&image, vec![0u8; 2 << 20]).expect("image");
        let status = std::process::Command::new("mkfs.vfat")
            .args(["-n", "CIDATA"])
            .arg(&image)
            .stdout(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => {}
            _ => {
                eprintln!("skipping: mkfs.vfat is not available");
                return;
            }
        }
        let mut file = std::fs::File::open(&image).expect("open");
        assert_eq!(
            read_label(&mut file).expect("reads"),
            Some((VolumeFs::Vfat, "CIDATA".into()))
        );
    }
}
