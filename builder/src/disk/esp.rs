//! The EFI system partition, written in-process with `fatfs`: FAT32 with a derived volume id,
//! label `ESP` and every timestamp set to `SOURCE_DATE_EPOCH`, so the same inputs give the same bytes.

use std::io::{Read, Seek, Write};

use anyhow::{bail, Context, Result};
use fatfs::{Date, DateTime, FatType, FileSystem, FormatVolumeOptions, FsOptions, Time};

/// Volume label of the ESP.
pub const VOLUME_LABEL: &[u8; 11] = b"ESP        ";

/// Time provider returning one fixed time.
#[derive(Debug)]
struct FixedTime(DateTime);

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> DateTime {
        self.0
    }
}

/// The FAT timestamp of a Unix time (UTC), clamped to FAT's range (1980..=2107).
pub fn fat_time(epoch: u64) -> DateTime {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if year < 1980 {
        return DateTime {
            date: Date {
                year: 1980,
                month: 1,
                day: 1,
            },
            time: Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        };
    }
    DateTime {
        date: Date {
            year: year.min(2107) as u16,
            month: month as u16,
            day: day as u16,
        },
        time: Time {
            hour: (secs / 3600) as u16,
            min: (secs / 60 % 60) as u16,
            sec: (secs % 60) as u16,
            millis: 0,
        },
    }
}

/// One file to put on the ESP: absolute path (`/EFI/BOOT/BOOTX64.EFI`) and contents.
#[derive(Debug, Clone)]
pub struct EspFile {
    pub path: String,
    pub data: Vec<u8>,
}

/// Formats `device` (the whole ESP, its size is the device's length) as FAT32 and writes `files`,
/// creating folders as needed, in the order given.
pub fn write_esp<D: Read + Write + Seek>(
    mut device: D,
    volume_id: u32,
    epoch: u64,
    files: &[EspFile],
) -> Result<()> {
    device.rewind().context("seeking to the start of the ESP")?;
    fatfs::format_volume(
        &mut device,
        FormatVolumeOptions::new()
            .fat_type(FatType::Fat32)
            .volume_id(volume_id)
            .volume_label(*VOLUME_LABEL),
    )
    .context("formatting the ESP as FAT32 (is it at least 33 MiB?)")?;
    // fatfs keeps a `&'static` time provider; one small provider per ESP written is leaked.
    let time: &'static FixedTime = Box::leak(Box::new(FixedTime(fat_time(epoch))));
    let fs = FileSystem::new(&mut device, FsOptions::new().time_provider(time))
        .context("opening the new ESP")?;
    {
        let root = fs.root_dir();
        for file in files {
            let path = file.path.trim_start_matches('/');
            let (folder, name) = match path.rsplit_once('/') {
                Some((folder, name)) => (Some(folder), name),
                None => (None, path),
            };
            let dir = match folder {
                None => root.clone(),
                Some(folder) => {
                    let mut dir = root.clone();
                    for part in folder.split('/') {
                        dir = dir.create_dir(part).with_context(|| {
                            format!("creating folder {part} for {} on the ESP", file.path)
                        })?;
                    }
                    dir
                }
            };
            let mut out = dir
                .create_file(name)
                .with_context(|| format!("creating {} on the ESP", file.path))?;
            out.truncate()
                .with_context(|| format!("truncating {} on the ESP", file.path))?;
            out.write_all(&file.data).with_context(|| {
                format!(
                    "writing {} ({} bytes) on the ESP: is [disk] esp large enough?",
                    file.path,
                    file.data.len()
                )
            })?;
            out.flush()
                .with_context(|| format!("writing {} on the ESP", file.path))?;
        }
    }
    fs.unmount().context("closing the ESP")?;
    Ok(())
}

/// Reads a FAT filesystem without writing to it: lists and reads files.
pub struct EspReader<D: Read + Write + Seek> {
    fs: FileSystem<D>,
}

impl<D: Read + Write + Seek> std::fmt::Debug for EspReader<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EspReader").finish_non_exhaustive()
    }
}

impl<D: Read + Write + Seek> EspReader<D> {
    /// Opens the filesystem on `device`.
    pub fn open(device: D) -> Result<EspReader<D>> {
        let fs = FileSystem::new(device, FsOptions::new()).context("reading the ESP (FAT)")?;
        Ok(EspReader { fs })
    }

    /// The volume id of the filesystem.
    pub fn volume_id(&self) -> u32 {
        self.fs.volume_id()
    }

    /// Names of the entries of a folder (without `.` and `..`), sorted.
    pub fn list(&self, folder: &str) -> Result<Vec<String>> {
        let folder = folder.trim_matches('/');
        let root = self.fs.root_dir();
        let dir = if folder.is_empty() {
            root
        } else {
            root.open_dir(folder)
                .with_context(|| format!("opening /{folder} on the ESP"))?
        };
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry.with_context(|| format!("listing /{folder} on the ESP"))?;
            let name = entry.file_name();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Reads a whole file.
    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        let path = path.trim_start_matches('/');
        let mut file = self
            .fs
            .root_dir()
            .open_file(path)
            .with_context(|| format!("opening /{path} on the ESP"))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .with_context(|| format!("reading /{path} on the ESP"))?;
        Ok(data)
    }
}

/// Checks that every file fits: a friendlier error than a failed write.
pub fn check_fits(files: &[EspFile], esp_size: u64) -> Result<()> {
    let total: u64 = files.iter().map(|f| f.data.len() as u64).sum();
    // FAT32 reserves its tables and folders: keep an eighth of the partition plus 1 MiB spare.
    let usable = esp_size - esp_size / 8 - (1 << 20).min(esp_size / 2);
    if total > usable {
        bail!(
            "the ESP files take {total} bytes but [disk] esp = {esp_size} bytes holds about {usable}: raise [disk] esp"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn files() -> Vec<EspFile> {
        vec![
            EspFile {
                path: "/EFI/BOOT/BOOTX64.EFI".to_owned(),
                data: b"MZ fake loader".to_vec(),
            },
            EspFile {
                path: "/loader/loader.conf".to_owned(),
                data: b"timeout 0\n".to_vec(),
            },
            EspFile {
                path: "/plinth/a/vmlinuz".to_owned(),
                data: vec![7u8; 300_000],
            },
        ]
    }

    fn write(epoch: u64) -> Vec<u8> {
        let mut disk = Cursor::new(vec![0u8; 64 << 20]);
        write_esp(&mut disk, 0x1234_5678, epoch, &files()).expect("ESP writes");
        disk.into_inner()
    }

    #[test]
    fn esp_reads_back_and_is_deterministic() {
        let image = write(1_700_000_000);
        assert_eq!(image, write(1_700_000_000), "same inputs, same bytes");
        assert_ne!(image, write(1_600_000_000), "timestamps follow the epoch");
        let reader = EspReader::open(Cursor::new(image)).expect("ESP opens");
        assert_eq!(reader.volume_id(), 0x1234_5678);
        assert_eq!(reader.list("/").expect("root"), ["EFI", "loader", "plinth"]);
        assert_eq!(
            reader.read("/loader/loader.conf").expect("read"),
            b"timeout 0\n"
        );
        assert_eq!(
            reader.read("/plinth/a/vmlinuz").expect("read"),
            vec![7u8; 300_000]
        );
        let modified = reader
            .fs
            .root_dir()
            .open_dir("EFI/BOOT")
            .expect("folder")
            .iter()
            .find_map(|e| e.ok().filter(|e| e.file_name() == "BOOTX64.EFI"))
            .expect("loader entry")
            .modified();
        assert_eq!(modified.date.year, 2023);
        assert_eq!((modified.time.hour, modified.time.min), (22, 13));
    }

    #[test]
    fn fat_time_converts_utc() {
        // 2023-11-14T22:13:20Z
        let t = fat_time(1_700_000_000);
        assert_eq!((t.date.year, t.date.month, t.date.day), (2023, 11, 14));
        assert_eq!((t.time.hour, t.time.min, t.time.sec), (22, 13, 20));
        assert_eq!(fat_time(0).date.year, 1980);
        let leap = fat_time(951_782_400); // 2000-02-29
        assert_eq!((leap.date.month, leap.date.day), (2, 29));
    }

    #[test]
    fn too_many_bytes_are_refused_before_writing() {
        let big = [EspFile {
            path: "/x".to_owned(),
            data: vec![0; 70 << 20],
        }];
        let err = check_fits(&big, 64 << 20).expect_err("does not fit");
        assert!(err.to_string().contains("raise [disk] esp"), "{err}");
    }
}
