//! `plinth-update install`: a live (network-booted) system writes a Plinth disk image to a local
//! disk, which becomes bootable only at the very end.
//!
//! The image is a zstd-compressed raw disk (`<name>-<version>.raw.zst`, as `plinth build --format
//! pxe` writes it, its frame header carrying the uncompressed size) fetched over http(s) through
//! [`super::fetch`] or read from a local file. The order of the writes keeps every interruption
//! (power cut, error, checksum mismatch) from leaving a disk that firmware would boot:
//! 1. the image must fit the disk, checked before anything is written;
//! 2. the disk's first and last MiB (old GPTs and boot sectors) are zeroed and synced;
//! 3. the image is streamed to the disk at the same offsets, except its first MiB (protective MBR
//!    and primary GPT) and its last MiB (backup GPT), held in memory;
//! 4. the sha256 of the compressed file and the uncompressed size are checked;
//! 5. what was written is read back from the medium and compared with what was streamed;
//! 6. the held last MiB, then the held first MiB are written and synced: only now can it boot;
//! 7. the disk's GPT is read back and must hold the Plinth partitions.
//!
//! Which disk ([`Target`]): a kernel name (`vda`), its `/dev` path, a `/dev/disk/by-id/` or
//! `/dev/disk/by-path/` name computed from sysfs (there is no udev; see [`BlockDevice`] for the
//! names supported) or the rule `first-empty[:MIN]`.
//!
//! Console lines: `install-start target=… size=… image=… image-size=…`,
//! `install-progress percent=… written=…`, `install-done target=… seconds=… bytes=…`,
//! `install-failed reason=… error="…"` (reasons: [`Reason`]).

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use sha2::{Digest as _, Sha256};

use super::blockdev::{self, AlignedBuf, PartitionWriter};
use super::fetch::{Client, Source};
use os_config::status;

/// One MiB: the size of the held head and tail, of the emptiness check and of each write.
pub const MIB: u64 = 1 << 20;
/// Where the kernel lists block devices.
pub const SYS_CLASS_BLOCK: &str = "/sys/class/block";
/// How many times a failed download is started again from its beginning.
pub const DOWNLOAD_RETRIES: u32 = 3;
/// Shortest time between two `install-progress` lines (besides 10 % of progress).
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// The written data is synced every this many bytes, so a sync at the end has little to do.
const SYNC_EVERY: u64 = 256 * MIB;
/// The GPT labels an image must hold to be a Plinth disk.
pub const REQUIRED_LABELS: [&str; 4] = [
    os_config::layout::ESP,
    os_config::layout::ROOT_A,
    os_config::layout::VERITY_A,
    os_config::layout::STATE,
];
/// Kernel name prefixes of block devices that are never installation targets.
const VIRTUAL_PREFIXES: [&str; 7] = ["loop", "ram", "zram", "sr", "fd", "dm-", "md"];

/// Why an installation failed: the `reason=` of `install-failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No disk matches the target, or the one named cannot be used.
    NoDisk,
    /// The disk holds data and `--wipe` was not given.
    DiskNotEmpty,
    /// The image is larger than the disk.
    TooSmall,
    /// The image could not be fetched or read.
    DownloadFailed,
    /// The compressed file's sha256 is not the one given.
    Sha256Mismatch,
    /// The uncompressed stream is not as long as its frame header says.
    SizeMismatch,
    /// What the disk holds after writing is not what was written.
    VerifyFailed,
    /// Writing or syncing the disk failed.
    WriteFailed,
    /// The file is no zstd-compressed Plinth disk image.
    NotAPlinthImage,
}

impl Reason {
    /// The kebab-case name printed as `reason=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoDisk => "no-disk",
            Reason::DiskNotEmpty => "disk-not-empty",
            Reason::TooSmall => "too-small",
            Reason::DownloadFailed => "download-failed",
            Reason::Sha256Mismatch => "sha256-mismatch",
            Reason::SizeMismatch => "size-mismatch",
            Reason::VerifyFailed => "verify-failed",
            Reason::WriteFailed => "write-failed",
            Reason::NotAPlinthImage => "not-a-plinth-image",
        }
    }

    /// True when the installation was refused (a bad disk choice, a disk in use, an image that
    /// is not the one asked for) rather than failed: `plinth-update` exits with
    /// [`super::command::EXIT_REFUSED`].
    pub fn refused(self) -> bool {
        matches!(
            self,
            Reason::NoDisk
                | Reason::DiskNotEmpty
                | Reason::TooSmall
                | Reason::Sha256Mismatch
                | Reason::SizeMismatch
                | Reason::NotAPlinthImage
        )
    }
}

/// A failed installation: why, and the message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct InstallError {
    pub reason: Reason,
    pub message: String,
}

impl InstallError {
    /// The `PLINTH-STATUS install-failed reason=… error="…"` line.
    pub fn status_line(&self) -> String {
        status::format(
            "install-failed",
            &[("reason", self.reason.as_str()), ("error", &self.message)],
        )
    }
}

/// Attaches a [`Reason`] to an error.
trait Because<T> {
    fn because(self, reason: Reason) -> Result<T, InstallError>;
}

impl<T, E: Into<anyhow::Error>> Because<T> for Result<T, E> {
    fn because(self, reason: Reason) -> Result<T, InstallError> {
        self.map_err(|e| InstallError {
            reason,
            message: format!("{:#}", e.into()),
        })
    }
}

fn fail<T>(reason: Reason, message: String) -> Result<T, InstallError> {
    Err(InstallError { reason, message })
}

// ---------------------------------------------------------------- the request

/// What to install where (`plinth-update install --target … --image … --sha256 … [--wipe]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `--target`: the disk, as [`Target::parse`] reads it.
    pub target: String,
    /// `--image`: an `http://`, `https://` or `file://` URL or a path.
    pub image: String,
    /// `--sha256`: of the compressed image file.
    pub sha256: os_config::units::Sha256,
    /// `--wipe`: install over a disk that holds data.
    pub wipe: bool,
}

/// The machine's side of an installation: where the disks are listed and opened, which are in
/// use, and how servers are reached. Tests point the paths into a temporary folder.
#[derive(Debug, Clone)]
pub struct Machine {
    /// The folder listing block devices (`/sys/class/block`).
    pub sys_block: PathBuf,
    /// The folder of device nodes (`/dev`).
    pub dev: PathBuf,
    /// Kernel names of disks the running system uses (mounted, or the disk it booted from):
    /// never targets.
    pub in_use: Vec<String>,
    /// How `http(s)://` images are fetched.
    pub client: Client,
}

impl Machine {
    /// The running machine: `/sys/class/block`, `/dev`, the disks holding a mounted filesystem
    /// (from `/proc/self/mountinfo`) and the disk of the boot record at `boot_record` when there
    /// is one.
    pub fn running(client: Client, boot_record: &Path) -> anyhow::Result<Machine> {
        let sys_block = PathBuf::from(SYS_CLASS_BLOCK);
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
        let mut in_use = mounted_disks(&sys_block, &mountinfo);
        if let Ok(record) = super::agent::read_boot_record(boot_record) {
            if let Some(name) = record.disk.file_name().and_then(|n| n.to_str()) {
                in_use.push(name.to_owned());
            }
        }
        Ok(Machine {
            sys_block,
            dev: PathBuf::from("/dev"),
            in_use,
            client,
        })
    }
}

/// The whole disks holding the `/dev/…` sources of the mounts in a `mountinfo` text.
pub fn mounted_disks(sys_block: &Path, mountinfo: &str) -> Vec<String> {
    let mut disks = Vec::new();
    for line in mountinfo.lines() {
        // The source is the second field after the ` - ` separator.
        let Some((_, after)) = line.split_once(" - ") else {
            continue;
        };
        let Some(name) = after
            .split_whitespace()
            .nth(1)
            .and_then(|source| source.strip_prefix("/dev/"))
        else {
            continue;
        };
        if let Some(disk) = whole_disk_of(sys_block, name) {
            if !disks.contains(&disk) {
                disks.push(disk);
            }
        }
    }
    disks
}

/// The whole disk a block device belongs to: itself, or a partition's parent in sysfs.
fn whole_disk_of(sys_block: &Path, name: &str) -> Option<String> {
    let entry = sys_block.join(name);
    if !entry.join("partition").exists() {
        return entry.exists().then(|| name.to_owned());
    }
    let resolved = fs::canonicalize(&entry).ok()?;
    Some(resolved.parent()?.file_name()?.to_str()?.to_owned())
}

// ---------------------------------------------------------------- disks

/// Which disk to install to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A kernel name (`vda`), also given as `/dev/vda`.
    Name(String),
    /// A `/dev/disk/by-id/` name.
    ById(String),
    /// A `/dev/disk/by-path/` name.
    ByPath(String),
    /// The first empty whole disk in kernel name order of at least `min` bytes.
    FirstEmpty { min: u64 },
}

impl Target {
    /// Reads `vda`, `/dev/vda`, `/dev/disk/by-id/NAME`, `/dev/disk/by-path/NAME`,
    /// `first-empty` or `first-empty:MIN` (MIN like `8G`, `512M`).
    pub fn parse(spec: &str) -> anyhow::Result<Target> {
        let bad = || {
            anyhow!(
                "install target `{spec}`: expected a kernel name (vda), /dev/NAME, \
                 /dev/disk/by-id/NAME, /dev/disk/by-path/NAME, first-empty or first-empty:MIN (like 8G)"
            )
        };
        let plain = |name: &str| {
            (!name.is_empty() && !name.contains('/') && name != "." && name != "..")
                .then(|| name.to_owned())
        };
        if spec == "first-empty" {
            return Ok(Target::FirstEmpty { min: 0 });
        }
        if let Some(min) = spec.strip_prefix("first-empty:") {
            let min = parse_size(min).with_context(|| format!("install target `{spec}`"))?;
            return Ok(Target::FirstEmpty { min });
        }
        if let Some(id) = spec.strip_prefix("/dev/disk/by-id/") {
            return plain(id).map(Target::ById).ok_or_else(bad);
        }
        if let Some(path) = spec.strip_prefix("/dev/disk/by-path/") {
            return plain(path).map(Target::ByPath).ok_or_else(bad);
        }
        plain(spec.strip_prefix("/dev/").unwrap_or(spec))
            .map(Target::Name)
            .ok_or_else(bad)
    }
}

/// Reads a size: bytes, or a number with `K`, `M`, `G` or `T` (powers of 1024).
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], 10),
        Some((i, 'M' | 'm')) => (&text[..i], 20),
        Some((i, 'G' | 'g')) => (&text[..i], 30),
        Some((i, 'T' | 't')) => (&text[..i], 40),
        _ => (text, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .with_context(|| {
            format!(
                "size `{text}`: expected a number of bytes or a number with K, M, G or T (like 8G)"
            )
        })
}

/// A whole disk as sysfs describes it.
///
/// Names computed as udev would link them under `/dev/disk/`:
/// - by-id: `virtio-<serial>` (virtio-blk, `device/serial`); `nvme-<model>_<serial>` (NVMe,
///   the controller's `device/model` and `device/serial`, trimmed, spaces as `_`);
///   `wwn-0x<id>` (SCSI/SATA disks whose `device/wwid` or `wwid` is an `naa.<id>`).
/// - by-path: `pci-<address>` (virtio-blk), `pci-<address>-nvme-<namespace>` (NVMe),
///   `pci-<address>-scsi-<h:c:t:l>` (SCSI), the PCI address being the last one in the device's
///   resolved sysfs path. USB, ATA port and platform paths are not computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// Kernel name (`vda`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// `ro` is 1.
    pub read_only: bool,
    /// `/dev/disk/by-id/` names.
    pub by_id: Vec<String>,
    /// The `/dev/disk/by-path/` name, when one is computed.
    pub by_path: Option<String>,
}

/// The block devices sysfs lists: whole disks (sorted in kernel name order) and the names of
/// virtual devices (loop, ram, zram, sr, fd, dm-, md) that are never targets. Partitions are
/// left out.
pub fn list_disks(sys_block: &Path) -> anyhow::Result<(Vec<BlockDevice>, Vec<String>)> {
    let entries = fs::read_dir(sys_block)
        .with_context(|| format!("listing block devices in {}", sys_block.display()))?;
    let mut disks = Vec::new();
    let mut virtual_devices = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", sys_block.display()))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let dir = entry.path();
        if dir.join("partition").exists() {
            continue;
        }
        if VIRTUAL_PREFIXES.iter().any(|p| name.starts_with(p)) {
            virtual_devices.push(name);
            continue;
        }
        disks.push(describe_disk(&dir, name)?);
    }
    disks.sort_by_key(|d| name_order(&d.name));
    virtual_devices.sort();
    Ok((disks, virtual_devices))
}

/// Kernel name order: `sdz` before `sdaa`, `nvme2n1` before `nvme10n1`.
fn name_order(name: &str) -> (String, usize, String) {
    let prefix: String = name
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect();
    (prefix, name.len(), name.to_owned())
}

/// Reads one disk's sysfs folder.
fn describe_disk(dir: &Path, name: String) -> anyhow::Result<BlockDevice> {
    let sectors =
        read_attr(&dir.join("size")).with_context(|| format!("reading the size of {name}"))?;
    let size = sectors
        .parse::<u64>()
        .ok()
        .and_then(|s| s.checked_mul(512))
        .with_context(|| {
            format!(
                "{}: `{sectors}` is not a sector count",
                dir.join("size").display()
            )
        })?;
    let read_only = read_attr(&dir.join("ro")).is_ok_and(|ro| ro == "1");
    let resolved = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    Ok(BlockDevice {
        by_id: by_id_names(dir, &name),
        by_path: by_path_name(&resolved, &name),
        name,
        size,
        read_only,
    })
}

/// A sysfs attribute, trimmed; an error when missing.
fn read_attr(path: &Path) -> io::Result<String> {
    fs::read_to_string(path).map(|text| text.trim().to_owned())
}

/// The `/dev/disk/by-id/` names of a disk (see [`BlockDevice`]).
fn by_id_names(dir: &Path, name: &str) -> Vec<String> {
    let attr = |file: &str| read_attr(&dir.join(file)).ok().filter(|v| !v.is_empty());
    let mut names = Vec::new();
    if name.starts_with("vd") {
        if let Some(serial) = attr("device/serial") {
            names.push(format!("virtio-{}", serial.replace(' ', "_")));
        }
    }
    if name.starts_with("nvme") {
        if let (Some(model), Some(serial)) = (attr("device/model"), attr("device/serial")) {
            names.push(format!("nvme-{model}_{serial}").replace(' ', "_"));
        }
    }
    if let Some(naa) = attr("device/wwid")
        .or_else(|| attr("wwid"))
        .and_then(|w| w.strip_prefix("naa.").map(str::to_owned))
    {
        names.push(format!("wwn-0x{}", naa.to_ascii_lowercase()));
    }
    names
}

/// The `/dev/disk/by-path/` name of a disk from its resolved sysfs path (see [`BlockDevice`]).
fn by_path_name(resolved: &Path, name: &str) -> Option<String> {
    let components: Vec<&str> = resolved
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .collect();
    let pci = components.iter().rev().find(|c| is_pci_address(c))?;
    if let Some(namespace) = name
        .strip_prefix("nvme")
        .and_then(|rest| rest.split_once('n'))
        .map(|(_, ns)| ns)
        .filter(|ns| !ns.is_empty() && ns.bytes().all(|b| b.is_ascii_digit()))
    {
        return Some(format!("pci-{pci}-nvme-{namespace}"));
    }
    if name.starts_with("vd") {
        return Some(format!("pci-{pci}"));
    }
    let scsi = components.iter().rev().find(|c| {
        let parts: Vec<&str> = c.split(':').collect();
        parts.len() == 4
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })?;
    Some(format!("pci-{pci}-scsi-{scsi}"))
}

/// `dddd:bb:dd.f` in hex digits.
fn is_pci_address(text: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let Some((domain, rest)) = text.split_once(':') else {
        return false;
    };
    let Some((bus, rest)) = rest.split_once(':') else {
        return false;
    };
    let Some((device, function)) = rest.split_once('.') else {
        return false;
    };
    hex(domain, 4) && hex(bus, 2) && hex(device, 2) && hex(function, 1)
}

/// What a disk holds, judged by its first and last MiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    /// Its first and last MiB read as zeros.
    Empty,
    /// What it holds, described (`a GPT with partitions esp, root-a`, `an ext4 filesystem`).
    Holds(String),
}

/// Signatures recognized in a disk's first MiB: (offset, magic, what it is).
const SIGNATURES: &[(usize, &[u8], &str)] = &[
    (0, b"XFSB", "an xfs filesystem"),
    (0, b"hsqs", "a squashfs filesystem"),
    (0, b"LUKS\xba\xbe", "a LUKS volume"),
    (536, b"LVM2 001", "an LVM2 physical volume"),
    (1024, b"\xe2\xe1\xf5\xe0", "an erofs filesystem"),
    (1080, b"\x53\xef", "an ext2/3/4 filesystem"),
    (4086, b"SWAPSPACE2", "a swap area"),
    (32769, b"CD001", "an iso9660 filesystem"),
    (65600, b"_BHRfS_M", "a btrfs filesystem"),
    (82, b"FAT32   ", "a vfat filesystem"),
    (54, b"FAT16   ", "a vfat filesystem"),
    (54, b"FAT12   ", "a vfat filesystem"),
];

/// Reads whether the disk at `path` (of `size` bytes) is empty, and what it holds when not.
pub fn probe(path: &Path, size: u64) -> anyhow::Result<Contents> {
    let mut file =
        fs::File::open(path).with_context(|| format!("opening {} to read", path.display()))?;
    let len = size.min(MIB) as usize;
    let mut head = vec![0u8; len];
    let mut tail = vec![0u8; len];
    let context = || format!("reading the first and last MiB of {}", path.display());
    file.read_exact_at(&mut head, 0).with_context(context)?;
    file.read_exact_at(&mut tail, size - len as u64)
        .with_context(context)?;
    if head.iter().chain(&tail).all(|b| *b == 0) {
        return Ok(Contents::Empty);
    }
    let gpt_at = |offset: usize| head.get(offset..offset + 8) == Some(os_config::gpt::SIGNATURE);
    if gpt_at(512) || gpt_at(4096) || gpt_in_tail(&tail) {
        return Ok(Contents::Holds(match os_config::gpt::read(&mut file) {
            Ok(table) => format!(
                "a GPT with partitions {}",
                table
                    .partitions
                    .iter()
                    .map(|p| if p.label.is_empty() {
                        "(unlabelled)"
                    } else {
                        p.label.as_str()
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(e) => format!("a damaged GPT ({e})"),
        }));
    }
    for (offset, magic, what) in SIGNATURES {
        if head.get(*offset..offset + magic.len()) == Some(*magic) {
            return Ok(Contents::Holds((*what).to_owned()));
        }
    }
    if head.get(510..512) == Some(&[0x55, 0xaa]) {
        return Ok(Contents::Holds(
            "an MBR partition table or boot sector".to_owned(),
        ));
    }
    Ok(Contents::Holds(
        "data this program does not recognize in its first or last MiB".to_owned(),
    ))
}

/// A backup GPT header in the last sector (512 or 4096 bytes) of `tail`.
fn gpt_in_tail(tail: &[u8]) -> bool {
    [512usize, 4096].iter().any(|sector| {
        tail.len() >= *sector && tail[tail.len() - sector..].starts_with(os_config::gpt::SIGNATURE)
    })
}

/// The disk an installation writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    /// Kernel name.
    pub name: String,
    /// Its device node.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// What it holds now.
    pub contents: Contents,
}

/// Finds the disk `spec` names on `machine`: a whole, writable disk not in use (and, for
/// `first-empty`, empty and large enough). The error names the spec and every disk seen, with
/// its size and why it was not taken.
pub fn resolve(spec: &str, machine: &Machine) -> Result<Chosen, InstallError> {
    let target = Target::parse(spec).because(Reason::NoDisk)?;
    let (disks, virtual_devices) = list_disks(&machine.sys_block).because(Reason::NoDisk)?;
    let mut seen = Vec::new();
    for disk in &disks {
        let named = match &target {
            Target::Name(name) => &disk.name == name,
            Target::ById(id) => disk.by_id.contains(id),
            Target::ByPath(path) => disk.by_path.as_ref() == Some(path),
            Target::FirstEmpty { .. } => true,
        };
        if !named {
            seen.push(format!(
                "{} ({} bytes): not named so ({})",
                disk.name,
                disk.size,
                link_names(disk)
            ));
            continue;
        }
        match usable(disk, &target, machine) {
            Ok(chosen) => return Ok(chosen),
            Err(why) => seen.push(format!("{} ({} bytes): {why}", disk.name, disk.size)),
        }
    }
    let mut message = match &target {
        Target::Name(name) if machine.sys_block.join(name).join("partition").exists() => {
            format!("install target `{spec}`: {name} is a partition; name a whole disk")
        }
        Target::Name(name) if virtual_devices.contains(name) => {
            format!("install target `{spec}`: {name} is a virtual device, not a disk")
        }
        _ => format!("install target `{spec}`: no disk can be used"),
    };
    message.push_str(&format!(
        "; disks seen: {}",
        if seen.is_empty() {
            "none".to_owned()
        } else {
            seen.join("; ")
        }
    ));
    if !virtual_devices.is_empty() {
        message.push_str(&format!(
            "; virtual devices, never used: {}",
            virtual_devices.join(", ")
        ));
    }
    fail(Reason::NoDisk, message)
}

/// The `/dev/disk/` names computed for a disk, for messages.
fn link_names(disk: &BlockDevice) -> String {
    let mut names: Vec<String> = disk.by_id.iter().map(|id| format!("by-id/{id}")).collect();
    names.extend(disk.by_path.iter().map(|path| format!("by-path/{path}")));
    if names.is_empty() {
        "no by-id or by-path name known".to_owned()
    } else {
        names.join(", ")
    }
}

/// The disk as a [`Chosen`], or why it cannot be the target.
fn usable(disk: &BlockDevice, target: &Target, machine: &Machine) -> Result<Chosen, String> {
    if disk.read_only {
        return Err("read-only".to_owned());
    }
    if machine.in_use.contains(&disk.name) {
        return Err("in use by the running system".to_owned());
    }
    if disk.size < 2 * MIB {
        return Err("smaller than 2 MiB".to_owned());
    }
    if let Target::FirstEmpty { min } = target {
        if disk.size < *min {
            return Err(format!("smaller than {min} bytes"));
        }
    }
    let path = machine.dev.join(&disk.name);
    let contents = probe(&path, disk.size).map_err(|e| format!("{e:#}"))?;
    if let (Target::FirstEmpty { .. }, Contents::Holds(what)) = (target, &contents) {
        return Err(format!("not empty: holds {what}"));
    }
    Ok(Chosen {
        name: disk.name.clone(),
        path,
        size: disk.size,
        contents,
    })
}

// ---------------------------------------------------------------- the image

/// Where the image comes from: the folder or server (a [`Source`]) and the file's name in it.
#[derive(Debug, Clone)]
pub struct ImageSource {
    source: Source,
    file: String,
}

impl ImageSource {
    /// Reads `http://…`, `https://…`, `file:///…` or a plain path.
    pub fn parse(image: &str, client: Client) -> anyhow::Result<ImageSource> {
        let no_file = || anyhow!("image `{image}`: expected a URL or path ending in a file name");
        if let Some((_, rest)) = image
            .split_once("://")
            .filter(|(scheme, _)| *scheme != "file")
        {
            let (folder, file) = image
                .rsplit_once('/')
                .filter(|(_, file)| !file.is_empty() && rest.contains('/'))
                .ok_or_else(no_file)?;
            return Ok(ImageSource {
                source: Source::parse_with(folder, client)?,
                file: file.to_owned(),
            });
        }
        let path = Path::new(image.strip_prefix("file://").unwrap_or(image));
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .ok_or_else(no_file)?;
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        Ok(ImageSource {
            source: Source::Dir(folder),
            file: file.to_owned(),
        })
    }

    /// The image's URL or path, for messages.
    pub fn describe(&self) -> String {
        self.source.describe(&self.file)
    }

    /// Opens the file from its start.
    fn open(&self) -> Result<Box<dyn Read + Send>, InstallError> {
        self.source
            .open_at(&self.file, 0)
            .because(Reason::DownloadFailed)
    }
}

/// The largest zstd frame header (`ZSTD_FRAMEHEADERSIZE_MAX`).
const FRAME_HEADER_MAX: usize = 18;

/// Reads the start of a zstd file up to its frame header; returns those bytes and the
/// uncompressed size the header carries.
fn read_frame_header(reader: &mut dyn Read, what: &str) -> Result<(Vec<u8>, u64), InstallError> {
    let mut head = Vec::with_capacity(FRAME_HEADER_MAX);
    reader
        .take(FRAME_HEADER_MAX as u64)
        .read_to_end(&mut head)
        .with_context(|| format!("reading {what}"))
        .because(Reason::DownloadFailed)?;
    match zstd::zstd_safe::get_frame_content_size(&head) {
        Ok(Some(size)) => Ok((head, size)),
        Ok(None) => fail(
            Reason::NotAPlinthImage,
            format!(
                "{what}: the zstd frame header carries no uncompressed size (compress the image \
                 with its size, as `plinth build --format pxe` does)"
            ),
        ),
        Err(_) => fail(
            Reason::NotAPlinthImage,
            format!("{what} does not start with a zstd frame header"),
        ),
    }
}

/// A reader that hashes what it passes and keeps the first error of the reader under it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    error: Option<String>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                self.bytes += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.error = Some(e.to_string());
                Err(e)
            }
        }
    }
}

/// The image's first and last MiB as a disk of `size` bytes (zeros between), for reading its
/// GPT before anything of it reaches the disk.
struct HeldImage<'a> {
    head: &'a [u8],
    tail: &'a [u8],
    size: u64,
    position: u64,
}

impl Read for HeldImage<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let tail_start = self.size - self.tail.len() as u64;
        let (bytes, offset, end): (&[u8], u64, u64) = if self.position < self.head.len() as u64 {
            (self.head, 0, self.head.len() as u64)
        } else if self.position >= tail_start {
            (self.tail, tail_start, self.size)
        } else {
            (&[], self.position, tail_start)
        };
        let n = (end.saturating_sub(self.position) as usize).min(buf.len());
        if bytes.is_empty() {
            buf[..n].fill(0);
        } else {
            let from = (self.position - offset) as usize;
            buf[..n].copy_from_slice(&bytes[from..from + n]);
        }
        self.position += n as u64;
        Ok(n)
    }
}

impl Seek for HeldImage<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let position = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.position.checked_add_signed(d),
        };
        self.position = position
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before byte 0"))?;
        Ok(self.position)
    }
}

/// Checks that a GPT has every partition of [`REQUIRED_LABELS`].
fn check_plinth_gpt<D: Read + Seek>(disk: &mut D, what: &str) -> Result<(), InstallError> {
    let table = os_config::gpt::read(disk)
        .with_context(|| format!("reading the GPT of {what}"))
        .because(Reason::NotAPlinthImage)?;
    let missing: Vec<&str> = REQUIRED_LABELS
        .iter()
        .filter(|label| table.by_label(label).is_none())
        .copied()
        .collect();
    if !missing.is_empty() {
        return fail(
            Reason::NotAPlinthImage,
            format!(
                "the GPT of {what} has no partition labelled {} (a Plinth disk has {})",
                missing.join(", "),
                REQUIRED_LABELS.join(", ")
            ),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- writing

/// A finished installation.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The disk written.
    pub target: PathBuf,
    /// The image's uncompressed size.
    pub bytes: u64,
    /// How long it took.
    pub seconds: f64,
}

/// What one pass over the image gave.
struct Streamed {
    compressed_sha256: [u8; 32],
    /// Uncompressed bytes seen (at most one block past the declared size).
    bytes: u64,
    /// What was written to the disk (the image less its first and last MiB), piece by piece.
    written: Vec<Written>,
    head: Vec<u8>,
    tail: Vec<u8>,
}

/// Installs the image `request` names on the disk it names, printing status lines through `out`
/// (each without a newline). Nothing makes the disk bootable unless every check passed.
pub fn install(
    request: &Request,
    machine: &Machine,
    out: &mut dyn FnMut(String),
) -> Result<Report, InstallError> {
    let started = Instant::now();
    let disk = resolve(&request.target, machine)?;
    if let (Contents::Holds(what), false) = (&disk.contents, request.wipe) {
        return fail(
            Reason::DiskNotEmpty,
            format!(
                "{} ({}) is not empty: it holds {what}; install with --wipe (plinth.install.wipe) \
                 to overwrite it",
                disk.path.display(),
                request.target
            ),
        );
    }
    let image = ImageSource::parse(&request.image, machine.client.clone())
        .because(Reason::DownloadFailed)?;
    let what = image.describe();
    let mut reader = image.open()?;
    let (frame_head, size) = read_frame_header(&mut reader, &what)?;
    check_sizes(&disk, size, &what)?;
    out(status::format(
        "install-start",
        &[
            ("target", &disk.path.display().to_string()),
            ("size", &disk.size.to_string()),
            ("image", &request.image),
            ("image-size", &size.to_string()),
        ],
    ));
    zero_ends(&disk)?;
    let mut first = Some((frame_head, reader));
    let mut attempt = 0;
    let streamed = loop {
        let (prefix, reader) = match first.take() {
            Some(opened) => opened,
            None => (Vec::new(), image.open()?),
        };
        match stream(
            io::Cursor::new(prefix).chain(reader),
            &disk,
            size,
            &what,
            out,
        ) {
            Err(e) if e.reason == Reason::DownloadFailed && attempt < DOWNLOAD_RETRIES => {
                attempt += 1;
                eprintln!(
                    "plinth-update: {}; downloading again from the start ({attempt} of {DOWNLOAD_RETRIES})",
                    e.message
                );
            }
            result => break result?,
        }
    };
    check_stream(&streamed, request, size, &what)?;
    verify_body(&disk, &streamed.written)?;
    check_plinth_gpt(
        &mut HeldImage {
            head: &streamed.head,
            tail: &streamed.tail,
            size,
            position: 0,
        },
        &what,
    )?;
    write_ends(&disk, size, &streamed.head, &streamed.tail)?;
    check_written_gpt(&disk)?;
    let seconds = started.elapsed().as_secs_f64();
    out(status::format(
        "install-done",
        &[
            ("target", &disk.path.display().to_string()),
            ("seconds", &format!("{seconds:.1}")),
            ("bytes", &size.to_string()),
        ],
    ));
    Ok(Report {
        target: disk.path,
        bytes: size,
        seconds,
    })
}

/// Reads the GPT back from the disk; when it is not the Plinth one that was written, zeroes the
/// disk's ends again so that it does not boot.
fn check_written_gpt(disk: &Chosen) -> Result<(), InstallError> {
    let checked = fs::File::open(&disk.path)
        .with_context(|| format!("opening {}", disk.path.display()))
        .because(Reason::VerifyFailed)
        .and_then(|mut file| check_plinth_gpt(&mut file, &disk.path.display().to_string()));
    let Err(mut e) = checked else {
        return Ok(());
    };
    e.reason = Reason::VerifyFailed;
    if let Err(zeroing) = zero_ends(disk) {
        e.message.push_str(&format!(
            "; zeroing its ends again failed too: {}",
            zeroing.message
        ));
    }
    Err(e)
}

/// Refuses an image larger than the disk, or too small or oddly sized to be a disk image.
fn check_sizes(disk: &Chosen, size: u64, what: &str) -> Result<(), InstallError> {
    if size > disk.size {
        return fail(
            Reason::TooSmall,
            format!(
                "{} ({} bytes) is too small for {what} ({size} bytes uncompressed)",
                disk.path.display(),
                disk.size
            ),
        );
    }
    if size < 2 * MIB || !size.is_multiple_of(512) {
        return fail(
            Reason::NotAPlinthImage,
            format!(
                "{what} is {size} bytes uncompressed: a Plinth disk image is whole 512-byte \
                 sectors and at least 2 MiB"
            ),
        );
    }
    Ok(())
}

/// Zeroes the disk's first and last MiB (old GPTs and boot sectors) and syncs: from here on
/// the disk boots nothing until the installation ends.
fn zero_ends(disk: &Chosen) -> Result<(), InstallError> {
    let label = format!("{} (whole disk)", disk.name);
    let mut writer = PartitionWriter::open_range(&disk.path, 0, disk.size, &label)
        .because(Reason::WriteFailed)?;
    let context = || format!("zeroing the first and last MiB of {}", disk.path.display());
    writer
        .write_zeros(MIB)
        .with_context(context)
        .because(Reason::WriteFailed)?;
    writer.seek_to(disk.size - MIB);
    writer
        .write_zeros(MIB)
        .with_context(context)
        .because(Reason::WriteFailed)?;
    writer
        .sync()
        .with_context(context)
        .because(Reason::WriteFailed)
}

/// Decompresses `compressed` and writes it to the disk (all but the first and last MiB, which
/// are returned), hashing both streams and printing progress.
fn stream(
    compressed: impl Read,
    disk: &Chosen,
    size: u64,
    what: &str,
    out: &mut dyn FnMut(String),
) -> Result<Streamed, InstallError> {
    let mut hashing = Hashing {
        inner: compressed,
        hasher: Sha256::new(),
        bytes: 0,
        error: None,
    };
    let label = format!("{} (whole disk)", disk.name);
    let mut writer = PartitionWriter::open_range(&disk.path, 0, disk.size, &label)
        .because(Reason::WriteFailed)?;
    let mut written = Vec::new();
    let mut head = vec![0u8; MIB as usize];
    let mut tail = vec![0u8; MIB as usize];
    let mut buf = AlignedBuf::new(MIB as usize);
    let mut progress = Progress::new(size);
    let mut offset = 0u64;
    let mut synced = 0u64;
    let decoded = {
        let mut decoder = zstd::stream::read::Decoder::new(&mut hashing)
            .context("starting the zstd decoder")
            .because(Reason::NotAPlinthImage)?;
        loop {
            let n = match os_config::slice::read_full(&mut decoder, buf.as_mut_slice()) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            if offset + n as u64 > size {
                // Longer than its header says: never write past the image (the size check fails).
                offset += n as u64;
                break Ok(());
            }
            let piece = &buf.prefix(n)[..n];
            let at = offset;
            let end = offset + n as u64;
            // The first and last MiB are held; what lies between goes to the disk.
            let body_start = at.max(MIB);
            let body_end = end.min(size - MIB);
            for (held, start) in [(&mut head, 0u64), (&mut tail, size - MIB)] {
                let from = at.max(start);
                let to = end.min(start + MIB);
                if from < to {
                    held[(from - start) as usize..(to - start) as usize]
                        .copy_from_slice(&piece[(from - at) as usize..(to - at) as usize]);
                }
            }
            if body_start < body_end {
                let part = &piece[(body_start - at) as usize..(body_end - at) as usize];
                let piece = Written::of(body_start, part);
                let zeros = piece.sha256.is_none();
                written.push(piece);
                write_piece(&mut writer, body_start, part, zeros)
                    .with_context(|| {
                        format!(
                            "writing {} bytes at byte {body_start} of {}",
                            part.len(),
                            disk.path.display()
                        )
                    })
                    .because(Reason::WriteFailed)?;
            }
            offset = end;
            if offset - synced >= SYNC_EVERY {
                writer
                    .sync()
                    .with_context(|| format!("syncing {}", disk.path.display()))
                    .because(Reason::WriteFailed)?;
                synced = offset;
            }
            if let Some(line) = progress.update(offset.min(size)) {
                out(line);
            }
        }
    };
    if let Err(e) = decoded {
        if let Some(error) = hashing.error.take() {
            return fail(
                Reason::DownloadFailed,
                format!("downloading {what}: {error}"),
            );
        }
        // Corrupt data: a wrong file, or a damaged download the checksum tells apart.
        let _ = io::copy(&mut hashing, &mut io::sink());
        if let Some(error) = hashing.error.take() {
            return fail(
                Reason::DownloadFailed,
                format!("downloading {what}: {error}"),
            );
        }
        return Err(InstallError {
            reason: Reason::NotAPlinthImage,
            message: format!("decompressing {what}: {e}"),
        });
    }
    // Whatever follows the frame still counts for the checksum.
    io::copy(&mut hashing, &mut io::sink())
        .map_err(|e| anyhow!("downloading {what}: {e}"))
        .because(Reason::DownloadFailed)?;
    writer
        .sync()
        .with_context(|| format!("syncing {}", disk.path.display()))
        .because(Reason::WriteFailed)?;
    out(progress.last(offset.min(size)));
    Ok(Streamed {
        compressed_sha256: hashing.hasher.finalize().into(),
        bytes: offset,
        written,
        head,
        tail,
    })
}

/// Writes `data` at byte `at` of the disk; all-zero data (`zeros`) through
/// [`PartitionWriter::write_zeros`] (the disk may hold old data there).
fn write_piece(writer: &mut PartitionWriter, at: u64, data: &[u8], zeros: bool) -> io::Result<()> {
    use std::io::Write as _;
    writer.seek_to(at);
    if zeros {
        writer.write_zeros(data.len() as u64)
    } else {
        writer.write_all(data)
    }
}

/// `install-progress` lines: at most one per [`PROGRESS_INTERVAL`] and per 10 % (both must have
/// passed), and always one at the end.
struct Progress {
    size: u64,
    last_time: Instant,
    last_percent: u64,
}

impl Progress {
    fn new(size: u64) -> Progress {
        Progress {
            size,
            last_time: Instant::now(),
            last_percent: 0,
        }
    }

    fn percent(&self, written: u64) -> u64 {
        (written.saturating_mul(100) / self.size.max(1)).min(100)
    }

    fn line(&self, written: u64) -> String {
        status::format(
            "install-progress",
            &[
                ("percent", &self.percent(written).to_string()),
                ("written", &written.to_string()),
            ],
        )
    }

    /// The line to print now, if one is due.
    fn update(&mut self, written: u64) -> Option<String> {
        let percent = self.percent(written);
        if percent < self.last_percent + 10 || self.last_time.elapsed() < PROGRESS_INTERVAL {
            return None;
        }
        self.last_percent = percent;
        self.last_time = Instant::now();
        Some(self.line(written))
    }

    /// The final line.
    fn last(&self, written: u64) -> String {
        self.line(written)
    }
}

/// Compares the compressed file's sha256 with the one asked for, then the uncompressed size
/// with the frame header's.
fn check_stream(
    streamed: &Streamed,
    request: &Request,
    size: u64,
    what: &str,
) -> Result<(), InstallError> {
    let actual = hex::encode(streamed.compressed_sha256);
    if actual != request.sha256.as_str() {
        return fail(
            Reason::Sha256Mismatch,
            format!(
                "{what} has sha256 {actual}, not {} as given; the disk was left without a \
                 partition table",
                request.sha256
            ),
        );
    }
    if streamed.bytes != size {
        return fail(
            Reason::SizeMismatch,
            format!(
                "{what} decompresses to {}{} bytes, not the {size} bytes its zstd frame header \
                 says; the disk was left without a partition table",
                if streamed.bytes > size {
                    "more than "
                } else {
                    ""
                },
                streamed.bytes.min(size + 1)
            ),
        );
    }
    Ok(())
}

/// One piece written to the disk: where, how long, and the sha256 of its bytes (`None` for zeros,
/// which are checked as zeros: hashing the zero-filled gigabytes of an image would cost minutes on
/// a slow CPU).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Written {
    at: u64,
    len: u64,
    sha256: Option<[u8; 32]>,
}

impl Written {
    fn of(at: u64, data: &[u8]) -> Written {
        let zeros = is_zero(data);
        Written {
            at,
            len: data.len() as u64,
            sha256: (!zeros).then(|| Sha256::digest(data).into()),
        }
    }
}

/// Whether `data` is all zeros, a machine word at a time (most of an image is zeros, and a byte
/// loop over gigabytes costs tens of seconds on a slow or emulated CPU).
fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(64);
    let whole = words.all(|block| {
        block
            .chunks_exact(8)
            .map(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
            .fold(0, |acc, w| acc | w)
            == 0
    });
    whole && words.remainder().iter().all(|b| *b == 0)
}

/// Reads back what was written between the held MiBs, from the medium, and compares each piece
/// with what was streamed.
fn verify_body(disk: &Chosen, written: &[Written]) -> Result<(), InstallError> {
    for piece in written {
        let mut hasher = Sha256::new();
        let mut zeros = true;
        blockdev::read_back(
            &disk.path,
            piece.at,
            piece.len,
            &mut |bytes| match piece.sha256 {
                Some(_) => hasher.update(bytes),
                None => zeros &= is_zero(bytes),
            },
        )
        .because(Reason::VerifyFailed)?;
        let matches = match piece.sha256 {
            Some(expected) => <[u8; 32]>::from(hasher.finalize()) == expected,
            None => zeros,
        };
        if !matches {
            return fail(
                Reason::VerifyFailed,
                format!(
                    "the {} bytes written at byte {} of {} read back differently; the disk was \
                     left without a partition table",
                    piece.len,
                    piece.at,
                    disk.path.display(),
                ),
            );
        }
    }
    Ok(())
}

/// Writes the image's last MiB (backup GPT), syncs, then its first MiB (protective MBR and
/// primary GPT), syncs: the disk can boot from here on.
fn write_ends(disk: &Chosen, size: u64, head: &[u8], tail: &[u8]) -> Result<(), InstallError> {
    use std::io::Write as _;
    let label = format!("{} (whole disk)", disk.name);
    let mut writer = PartitionWriter::open_range(&disk.path, 0, disk.size, &label)
        .because(Reason::WriteFailed)?;
    for (at, data, what) in [(size - MIB, tail, "backup GPT"), (0, head, "primary GPT")] {
        writer.seek_to(at);
        writer
            .write_all(data)
            .and_then(|()| writer.sync())
            .with_context(|| format!("writing the image's {what} to {}", disk.path.display()))
            .because(Reason::WriteFailed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        for (spec, target) in [
            ("vda", Target::Name("vda".into())),
            ("/dev/nvme0n1", Target::Name("nvme0n1".into())),
            (
                "/dev/disk/by-id/virtio-abc",
                Target::ById("virtio-abc".into()),
            ),
            (
                "/dev/disk/by-path/pci-0000:00:04.0",
                Target::ByPath("pci-0000:00:04.0".into()),
            ),
            ("first-empty", Target::FirstEmpty { min: 0 }),
            ("first-empty:8G", Target::FirstEmpty { min: 8 << 30 }),
            ("first-empty:512M", Target::FirstEmpty { min: 512 << 20 }),
            ("first-empty:4096", Target::FirstEmpty { min: 4096 }),
        ] {
            assert_eq!(Target::parse(spec).expect(spec), target, "{spec}");
        }
        for spec in [
            "",
            "/dev/",
            "/dev/disk/by-id/",
            "a/b",
            "first-empty:8Q",
            "first-empty:",
        ] {
            let err = Target::parse(spec).expect_err(spec);
            assert!(format!("{err:#}").contains(&format!("`{spec}`")), "{err:#}");
        }
    }

    #[test]
    fn pci_addresses_are_recognized() {
        assert!(is_pci_address("0000:00:04.0"));
        assert!(is_pci_address("0000:3b:00.1"));
        assert!(!is_pci_address("pci0000:00"));
        assert!(!is_pci_address("0:0:0:0"));
    }

    #[test]
    fn scsi_disks_are_named_by_wwn_and_by_scsi_address() {
        let dir = tempfile::tempdir().expect("tempdir");
        let block = dir
            .path()
            .join("devices/pci0000:00/0000:00:05.0/virtio2/host0/target0:0:1/0:0:1:0/block/sda");
        fs::create_dir_all(block.join("device")).expect("mkdir");
        fs::write(block.join("device/wwid"), "naa.5000C500A1B2C3D4\n").expect("wwid");
        assert_eq!(by_id_names(&block, "sda"), ["wwn-0x5000c500a1b2c3d4"]);
        assert_eq!(
            by_path_name(&block, "sda").as_deref(),
            Some("pci-0000:00:05.0-scsi-0:0:1:0")
        );
        assert_eq!(
            by_path_name(
                Path::new("/sys/devices/platform/x/block/mmcblk0"),
                "mmcblk0"
            ),
            None
        );
    }

    #[test]
    fn mounted_partitions_mark_their_disk_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let devices = dir.path().join("devices/pci/vda");
        fs::create_dir_all(devices.join("vda1")).expect("mkdir");
        fs::write(devices.join("vda1/partition"), "1\n").expect("partition");
        let block = dir.path().join("block");
        fs::create_dir_all(&block).expect("mkdir");
        std::os::unix::fs::symlink(&devices, block.join("vda")).expect("link");
        std::os::unix::fs::symlink(devices.join("vda1"), block.join("vda1")).expect("link");
        let mountinfo = "22 1 0:21 / / rw - rootfs rootfs rw\n\
                         30 22 253:1 / /var rw,relatime - ext4 /dev/vda1 rw\n\
                         31 22 0:5 / /dev rw - devtmpfs devtmpfs rw\n";
        assert_eq!(mounted_disks(&block, mountinfo), ["vda"]);
    }

    #[test]
    fn zeros_are_told_from_data_anywhere_in_a_piece() {
        for len in [0usize, 1, 7, 63, 64, 65, 4096, 4099] {
            let mut data = vec![0u8; len];
            assert!(is_zero(&data), "{len} zeros");
            for at in [0, len / 2, len.saturating_sub(1)] {
                if len == 0 {
                    continue;
                }
                data[at] = 1;
                assert!(!is_zero(&data), "a one at {at} of {len}");
                data[at] = 0;
            }
        }
    }

    #[test]
    fn held_image_reads_head_zeros_and_tail() {
        let head = [1u8; 4];
        let tail = [2u8; 4];
        let mut image = HeldImage {
            head: &head,
            tail: &tail,
            size: 12,
            position: 0,
        };
        let mut all = Vec::new();
        image.read_to_end(&mut all).expect("read");
        assert_eq!(all, [1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 2, 2]);
        image.seek(SeekFrom::End(-2)).expect("seek");
        let mut last = Vec::new();
        image.read_to_end(&mut last).expect("read");
        assert_eq!(last, [2, 2]);
    }

    #[test]
    fn progress_waits_for_both_time_and_ten_percent() {
        let mut progress = Progress::new(1000);
        assert_eq!(progress.update(500), None, "too soon");
        progress.last_time -= PROGRESS_INTERVAL;
        assert_eq!(progress.update(505), Some(progress.line(505)));
        progress.last_time -= PROGRESS_INTERVAL;
        assert_eq!(progress.update(540), None, "less than 10 % more");
        assert!(progress.last(1000).contains("percent=100 written=1000"));
    }

    #[test]
    fn signatures_name_what_a_disk_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        let size = 4 * MIB;
        for (offset, magic, what) in SIGNATURES {
            let mut data = vec![0u8; size as usize];
            data[*offset..offset + magic.len()].copy_from_slice(magic);
            fs::write(&path, &data).expect("write");
            assert_eq!(
                probe(&path, size).expect("probe"),
                Contents::Holds((*what).to_owned())
            );
        }
        let mut data = vec![0u8; size as usize];
        data[510] = 0x55;
        data[511] = 0xaa;
        fs::write(&path, &data).expect("write");
        assert!(
            matches!(probe(&path, size).expect("probe"), Contents::Holds(w) if w.contains("MBR"))
        );
        let mut data = vec![0u8; size as usize];
        data[size as usize - 10] = 1;
        fs::write(&path, &data).expect("write");
        assert!(
            matches!(probe(&path, size).expect("probe"), Contents::Holds(w) if w.contains("does not recognize"))
        );
        fs::write(&path, vec![0u8; size as usize]).expect("write");
        assert_eq!(probe(&path, size).expect("probe"), Contents::Empty);
    }
}
