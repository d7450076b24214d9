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
    let civil = os_config::units::CivilTime::from_unix(epoch);
    let year = civil.year;
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
            month: civil.month as u16,
            day: civil.day as u16,
        },
        time: Time {
            hour: civil.hour as u16,
            min: civil.minute as u16,
            sec: civil.second as u16,
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

/// The folders every Plinth ESP has from the start: both slots' and the boot entries'. The update
/// agent writes into them and so never has to create one, which fatfs would do in a way
/// `fsck.vfat` and some firmware reject until [`os_config::fat::repair_dot_entries`] runs.
pub fn folders() -> [&'static str; 3] {
    [
        os_config::layout::Slot::A.esp_dir(),
        os_config::layout::Slot::B.esp_dir(),
        os_config::boot::ENTRIES_DIR,
    ]
}

/// Formats `device` (the whole ESP, its size is the device's length) as FAT32, creates `folders`
/// (absolute, such as `/plinth/b`, empty unless a file goes there) and writes `files`, creating
/// folders as needed, in the order given.
pub fn write_esp<D: Read + Write + Seek>(
    mut device: D,
    volume_id: u32,
    epoch: u64,
    folders: &[&str],
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
        // Creates (or opens) each folder of `folder` from the root, for `what`.
        let make_folder = |folder: &str, what: &str| -> Result<_> {
            let mut dir = root.clone();
            for part in folder.split('/').filter(|p| !p.is_empty()) {
                dir = dir
                    .create_dir(part)
                    .with_context(|| format!("creating folder {part} for {what} on the ESP"))?;
            }
            Ok(dir)
        };
        for folder in folders {
            make_folder(folder, folder)?;
        }
        for file in files {
            let path = file.path.trim_start_matches('/');
            let (folder, name) = match path.rsplit_once('/') {
                Some((folder, name)) => (Some(folder), name),
                None => (None, path),
            };
            let dir = match folder {
                None => root.clone(),
                Some(folder) => make_folder(folder, &file.path)?,
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
    // Counting the free clusters records the count in the FSInfo sector, as fsck expects.
    fs.stats().context("counting free clusters of the ESP")?;
    fs.unmount().context("closing the ESP")?;
    os_config::fat::repair_dot_entries(&mut device)
        .context("repairing the ESP's folder entries")?;
    Ok(())
}

/// Most entries a FAT folder may hold (the specification's limit); a listing that goes on
/// longer follows a cluster chain that loops.
pub const MAX_FOLDER_ENTRIES: usize = 65536;

/// Reads a FAT filesystem without writing to it: lists and reads files. Every listing and read
/// is bounded (by [`MAX_FOLDER_ENTRIES`] and by the size of the filesystem), so a damaged or
/// hostile FAT whose cluster chains loop or whose sizes lie gives an error, not an endless read.
pub struct EspReader<D: Read + Write + Seek> {
    fs: FileSystem<D>,
    /// Bytes of the device: no file can hold more.
    size: u64,
}

impl<D: Read + Write + Seek> std::fmt::Debug for EspReader<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EspReader").finish_non_exhaustive()
    }
}

impl<D: Read + Write + Seek> EspReader<D> {
    /// Opens the filesystem on `device`.
    pub fn open(mut device: D) -> Result<EspReader<D>> {
        let size = device
            .seek(std::io::SeekFrom::End(0))
            .context("measuring the ESP")?;
        device.rewind().context("seeking to the start of the ESP")?;
        let fs = FileSystem::new(device, FsOptions::new()).context("reading the ESP (FAT)")?;
        Ok(EspReader { fs, size })
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
        for (count, entry) in dir.iter().enumerate() {
            if count >= MAX_FOLDER_ENTRIES {
                bail!(
                    "/{folder} on the ESP lists more than {MAX_FOLDER_ENTRIES} entries: its cluster chain loops"
                );
            }
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
        (&mut file)
            .take(self.size + 1)
            .read_to_end(&mut data)
            .with_context(|| format!("reading /{path} on the ESP"))?;
        if data.len() as u64 > self.size {
            bail!(
                "/{path} on the ESP goes on past the ESP's {} bytes: its size or cluster chain is damaged",
                self.size
            );
        }
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

    /// An empty folder, and one that files go into too.
    const FOLDERS: &[&str] = &["/plinth/b", "/plinth/a"];

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
        write_esp(&mut disk, 0x1234_5678, epoch, FOLDERS, &files()).expect("ESP writes");
        disk.into_inner()
    }

    #[test]
    fn fsck_vfat_finds_the_esp_clean() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("esp.img");
        std::fs::write(&path, write(1_700_000_000)).expect("write image");
        let out = std::process::Command::new("fsck.vfat")
            .arg("-n")
            .arg(&path)
            .output()
            .expect("fsck.vfat runs (install dosfstools)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(text.lines().count(), 2, "fsck.vfat has remarks:\n{text}");
    }

    #[test]
    fn esp_reads_back_and_is_deterministic() {
        let image = write(1_700_000_000);
        assert_eq!(image, write(1_700_000_000), "same inputs, same bytes");
        assert_ne!(image, write(1_600_000_000), "timestamps follow the epoch");
        let reader = EspReader::open(Cursor::new(image)).expect("ESP opens");
        assert_eq!(reader.volume_id(), 0x1234_5678);
        assert_eq!(reader.list("/").expect("root"), ["EFI", "loader", "plinth"]);
        assert_eq!(reader.list("/plinth").expect("plinth"), ["a", "b"]);
        assert!(reader.list("/plinth/b").expect("empty folder").is_empty());
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
