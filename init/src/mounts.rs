//! Mount tables: the API filesystems each stage mounts, filesystem detection by magic, and
//! `/proc/self/mountinfo` parsing for unmounting at shutdown.

use crate::system::{MountFlags, System};
use anyhow::{Context as _, Result};
use std::path::{Path, PathBuf};

/// One mount to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Source (`proc`, `/dev/vda6`).
    pub source: String,
    /// Mountpoint.
    pub target: PathBuf,
    /// Filesystem type.
    pub fstype: &'static str,
    /// Flags.
    pub flags: MountFlags,
    /// Filesystem options.
    pub data: &'static str,
}

impl MountSpec {
    fn new(
        source: &str,
        target: PathBuf,
        fstype: &'static str,
        flags: MountFlags,
        data: &'static str,
    ) -> MountSpec {
        MountSpec {
            source: source.to_string(),
            target,
            fstype,
            flags,
            data,
        }
    }

    /// Creates the mountpoint and mounts.
    pub fn mount<S: System + ?Sized>(&self, sys: &S) -> Result<()> {
        sys.create_dir_all(&self.target)
            .with_context(|| format!("creating mountpoint {}", self.target.display()))?;
        sys.mount(
            &self.source,
            &self.target,
            self.fstype,
            self.flags,
            self.data,
        )
        .with_context(|| {
            format!(
                "mounting {} ({}) at {}",
                self.source,
                self.fstype,
                self.target.display()
            )
        })
    }
}

/// Flags for API filesystems that hold no executables or devices.
fn api_flags() -> MountFlags {
    MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC
}

/// The API filesystems of stage 1: /proc, /sys, /dev (devtmpfs), /run (tmpfs).
pub fn stage1_api(proc_dir: &Path, sys: &Path, dev: &Path, run: &Path) -> Vec<MountSpec> {
    vec![
        MountSpec::new("proc", proc_dir.to_path_buf(), "proc", api_flags(), ""),
        MountSpec::new("sysfs", sys.to_path_buf(), "sysfs", api_flags(), ""),
        MountSpec::new(
            "devtmpfs",
            dev.to_path_buf(),
            "devtmpfs",
            MountFlags::NOSUID,
            "mode=0755",
        ),
        MountSpec::new(
            "tmpfs",
            run.to_path_buf(),
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            "mode=0755",
        ),
    ]
}

/// The extra filesystems of stage 2: cgroup2, /dev/pts, /dev/shm, /tmp.
pub fn stage2_extra(sys: &Path, dev: &Path, tmp: &Path) -> Vec<MountSpec> {
    vec![
        MountSpec::new(
            "cgroup2",
            sys.join("fs/cgroup"),
            "cgroup2",
            api_flags(),
            "nsdelegate",
        ),
        MountSpec::new(
            "devpts",
            dev.join("pts"),
            "devpts",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            "gid=5,mode=620,ptmxmode=666",
        ),
        MountSpec::new(
            "tmpfs",
            dev.join("shm"),
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            "mode=1777",
        ),
        MountSpec::new(
            "tmpfs",
            tmp.to_path_buf(),
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            "mode=1777",
        ),
    ]
}

/// A filesystem recognized by its superblock magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// squashfs (`hsqs` at 0).
    Squashfs,
    /// EROFS (0xE0F5E1E2 at 1024).
    Erofs,
    /// ext2/3/4 (0xEF53 at 1080).
    Ext4,
}

impl FsKind {
    /// The name `mount(2)` takes.
    pub fn fstype(self) -> &'static str {
        match self {
            FsKind::Squashfs => "squashfs",
            FsKind::Erofs => "erofs",
            FsKind::Ext4 => "ext4",
        }
    }
}

/// Bytes needed from the start of a device for `detect`.
pub const DETECT_LEN: usize = 2048;

/// Recognizes a filesystem from the first `DETECT_LEN` bytes of a device.
pub fn detect(head: &[u8]) -> Option<FsKind> {
    if head.len() >= 4 && &head[0..4] == b"hsqs" {
        return Some(FsKind::Squashfs);
    }
    if head.len() >= 1028 && head[1024..1028] == 0xE0F5_E1E2u32.to_le_bytes() {
        return Some(FsKind::Erofs);
    }
    if head.len() >= 1082 && head[1080..1082] == 0xEF53u16.to_le_bytes() {
        return Some(FsKind::Ext4);
    }
    None
}

/// Mountpoints listed in `/proc/self/mountinfo` text, in mount order, with octal escapes decoded.
pub fn mountinfo_targets(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_octal(field)))
        .collect()
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Device (major, minor).
    pub dev: (u32, u32),
    /// Mountpoint.
    pub target: PathBuf,
    /// Per-mount options (`ro,relatime`).
    pub options: String,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source (`/dev/dm-0`).
    pub source: String,
}

impl MountEntry {
    /// True if mounted read-only.
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// The last mount on `target` in `/proc/self/mountinfo` text (the one that is visible).
pub fn find_mount(text: &str, target: &Path) -> Option<MountEntry> {
    text.lines()
        .rev()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let separator = fields.iter().position(|f| *f == "-")?;
            let (major, minor) = fields.get(2)?.split_once(':')?;
            Some(MountEntry {
                dev: (major.parse().ok()?, minor.parse().ok()?),
                target: PathBuf::from(unescape_octal(fields.get(4)?)),
                options: fields.get(5)?.to_string(),
                fstype: fields.get(separator + 1)?.to_string(),
                source: unescape_octal(fields.get(separator + 2)?),
            })
        })
        .find(|entry| entry.target == target)
}

/// Decodes `\040`-style escapes used in mount tables.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The order in which to unmount at shutdown: reverse mount order, never `/`.
pub fn unmount_order(mounted: &[PathBuf]) -> Vec<PathBuf> {
    let mut order: Vec<PathBuf> = mounted
        .iter()
        .rev()
        .filter(|p| p.as_path() != Path::new("/"))
        .cloned()
        .collect();
    order.dedup();
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_filesystems_by_magic() {
        let mut head = vec![0u8; DETECT_LEN];
        assert_eq!(detect(&head), None);
        head[0..4].copy_from_slice(b"hsqs");
        assert_eq!(detect(&head), Some(FsKind::Squashfs));
        let mut head = vec![0u8; DETECT_LEN];
        head[1024..1028].copy_from_slice(&[0xe2, 0xe1, 0xf5, 0xe0]);
        assert_eq!(detect(&head), Some(FsKind::Erofs));
        let mut head = vec![0u8; DETECT_LEN];
        head[1080..1082].copy_from_slice(&[0x53, 0xef]);
        assert_eq!(detect(&head).map(FsKind::fstype), Some("ext4"));
    }

    #[test]
    fn finds_the_visible_root_mount() {
        let text = "\
1 1 0:2 / / rw - rootfs rootfs rw
22 1 253:0 / / ro,relatime shared:1 - squashfs /dev/dm-0 ro,errors=continue
24 22 254:6 / /var rw,nosuid,nodev,relatime - ext4 /dev/vda6 rw
";
        let root = find_mount(text, Path::new("/")).expect("root");
        assert_eq!(root.dev, (253, 0));
        assert_eq!(root.fstype, "squashfs");
        assert_eq!(root.source, "/dev/dm-0");
        assert!(root.read_only());
        let var = find_mount(text, Path::new("/var")).expect("var");
        assert!(!var.read_only());
        assert_eq!(var.source, "/dev/vda6");
        assert_eq!(find_mount(text, Path::new("/tmp")), None);
    }

    #[test]
    fn mountinfo_gives_reverse_unmount_order() {
        let text = "\
22 1 253:0 / / ro,relatime - squashfs /dev/dm-0 ro
23 22 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw
24 22 8:6 / /var rw,relatime - ext4 /dev/vda6 rw
25 24 0:40 / /var/lib/docker/overlay2/x\\040y/merged rw - overlay overlay rw
";
        let targets = mountinfo_targets(text);
        assert_eq!(
            targets[3],
            PathBuf::from("/var/lib/docker/overlay2/x y/merged")
        );
        let order = unmount_order(&targets);
        assert_eq!(
            order,
            [
                PathBuf::from("/var/lib/docker/overlay2/x y/merged"),
                PathBuf::from("/var"),
                PathBuf::from("/dev")
            ]
        );
    }
}
