//! Offline releases on removable media: `plinth-update apply --from /dev/vdb` mounts the device
//! read-only under `/run/plinth`, reads the release folder at its top (the same layout as on an
//! update server: `<channel>/manifest.json`, `artifacts/…`), and unmounts it when done.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rustix::mount::{MountFlags, UnmountFlags};

/// Where media are mounted (one folder per `plinth-update` process).
pub const MEDIA_ROOT: &str = "/run/plinth/media";

/// True if `path` is a block device (media to mount), false for a folder or anything else.
pub fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// The filesystems from a `/proc/filesystems` text that can live on a block device, in the order
/// worth trying: the common media formats first, then any other the kernel has.
pub fn block_filesystems(proc_filesystems: &str) -> Vec<String> {
    const PREFERRED: &[&str] = &["ext4", "vfat", "iso9660", "squashfs", "erofs"];
    let on_devices: Vec<&str> = proc_filesystems
        .lines()
        .filter(|line| !line.starts_with("nodev"))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect();
    let mut ordered: Vec<String> = PREFERRED
        .iter()
        .filter(|p| on_devices.contains(p))
        .map(|p| (*p).to_owned())
        .collect();
    for name in on_devices {
        // ext2/ext3 are served by ext4; the block-less `fuseblk` needs a helper.
        if !ordered.iter().any(|o| o == name) && !matches!(name, "ext2" | "ext3" | "fuseblk") {
            ordered.push(name.to_owned());
        }
    }
    ordered
}

/// A release medium mounted read-only; unmounted (and its folder removed) when dropped.
#[derive(Debug)]
pub struct Mounted {
    dir: PathBuf,
    fstype: String,
}

impl Mounted {
    /// Mounts `device` read-only (no devices, setuid or executables) under `root`, trying each
    /// filesystem the kernel knows.
    pub fn mount(device: &Path, root: &Path) -> Result<Mounted> {
        let filesystems =
            std::fs::read_to_string("/proc/filesystems").context("reading /proc/filesystems")?;
        let dir = root.join(std::process::id().to_string());
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the mount point {}", dir.display()))?;
        let flags =
            MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        let mut tried = Vec::new();
        for fstype in block_filesystems(&filesystems) {
            match rustix::mount::mount(device, &dir, fstype.as_str(), flags, "") {
                Ok(()) => return Ok(Mounted { dir, fstype }),
                Err(e) => tried.push(format!("{fstype}: {e}")),
            }
        }
        let _ = std::fs::remove_dir(&dir);
        bail!(
            "{} holds no filesystem this machine can mount read-only (tried {}); a release medium \
             is a disk or partition formatted as ext4, FAT or ISO 9660 with the release folder at its top",
            device.display(),
            tried.join(", ")
        )
    }

    /// The mounted medium's top folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The filesystem it was mounted as.
    pub fn fstype(&self) -> &str {
        &self.fstype
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = rustix::mount::unmount(&self.dir, UnmountFlags::DETACH) {
            eprintln!("plinth-update: unmounting {}: {e}", self.dir.display());
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_filesystems_come_first_and_virtual_ones_never() {
        let proc = "nodev\tsysfs\nnodev\ttmpfs\n\text4\n\text3\n\text2\n\tsquashfs\nnodev\toverlay\n\tvfat\n\tbtrfs\n\tfuseblk\n";
        assert_eq!(
            block_filesystems(proc),
            ["ext4", "vfat", "squashfs", "btrfs"]
        );
        assert!(block_filesystems("nodev\tproc\n").is_empty());
    }

    #[test]
    fn folders_are_not_media() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!is_block_device(dir.path()));
        assert!(!is_block_device(&dir.path().join("missing")));
    }

    #[test]
    fn a_file_that_is_no_device_is_refused_with_the_formats_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-disk");
        std::fs::write(&file, b"plain bytes").expect("write");
        let Err(e) = Mounted::mount(&file, &dir.path().join("media")) else {
            panic!("a plain file mounted as a release medium");
        };
        let message = format!("{e:#}");
        assert!(message.contains("not-a-disk"), "{message}");
        assert!(message.contains("ext4, FAT or ISO 9660"), "{message}");
        assert!(
            !dir.path()
                .join("media")
                .join(std::process::id().to_string())
                .exists(),
            "the mount point is removed again"
        );
    }
}
