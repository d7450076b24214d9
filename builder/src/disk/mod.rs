//! Disk image writers: root image, verity, initramfs, ESP, GPT, output formats.
//!
//! [`write_disk`] turns a root tree, a kernel, systemd-boot and `plinth-init` into a bootable GPT
//! disk laid out as `os_config::layout` says, without root privileges, loop devices or mounts:
//! every partition is written into one sparse file at its offset. The file is written under a
//! temporary name next to the output and renamed at the end, so an interrupted build never
//! leaves a truncated image under the final name. The same inputs and `SOURCE_DATE_EPOCH` give
//! a byte-identical image.

pub mod esp;
pub mod gce;
pub mod gpt;
pub mod initramfs;
pub mod rootimage;
pub mod slice;
pub mod state;
pub mod verity;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use os_config::boot::{self, Entry, EntryName};
use os_config::layout::{Role, Slot};
use os_config::Definition;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::progress::Step;
use crate::tools;
pub use rootimage::RootFormat;

/// Everything a disk is made from.
#[derive(Debug)]
pub struct DiskInputs<'a> {
    pub def: &'a Definition,
    /// The assembled root tree (becomes the root image of slot A).
    pub tree: &'a Path,
    /// The kernel image, copied to the ESP as slot A's `vmlinuz`.
    pub vmlinuz: &'a Path,
    /// systemd-boot (`systemd-bootx64.efi`), copied to the ESP as `/EFI/BOOT/BOOTX64.EFI`.
    pub systemd_boot_efi: &'a Path,
    /// The static `plinth-init`, put at `/init` in the initramfs.
    pub init_binary: &'a Path,
    /// Modules for the initramfs in load order: (module name, absolute path of the `.ko`, path
    /// relative to `lib/modules/<version>/`).
    pub initrd_modules: &'a [(String, PathBuf, String)],
    /// Kernel release (`6.1.0-28-cloud-amd64`), the folder under `lib/modules`.
    pub kernel_version: &'a str,
    pub source_date_epoch: u64,
    /// The zstd level of the squashfs root and of the initramfs; `None` is their defaults
    /// ([`rootimage::DEFAULT_ZSTD_LEVEL`], [`initramfs::DEFAULT_ZSTD_LEVEL`]).
    pub zstd_level: Option<u32>,
}

/// What was written, for the build summary and for `plinth publish`.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    /// The disk image (raw).
    pub path: PathBuf,
    pub disk_size: u64,
    /// dm-verity root hash of slot A (hex).
    pub root_hash: String,
    /// Root filesystem format (`squashfs` or `erofs`).
    pub root_format: &'static str,
    pub root_image_size: u64,
    /// Size of the verity hash device (superblock + tree).
    pub verity_size: u64,
    pub initrd_size: u64,
    pub kernel_size: u64,
    /// File name of slot A's boot entry on the ESP.
    pub boot_entry: String,
    /// The kernel command line of slot A.
    pub cmdline: String,
    /// Where each partition lies: (label, start, size) in bytes. The root image is the first
    /// `root_image_size` bytes of `root-a`, the hash device the first `verity_size` of `verity-a`.
    pub partitions: Vec<(String, u64, u64)>,
}

/// The seed every derived GUID and salt of an image starts from.
fn seed(def: &Definition) -> String {
    format!("{} {}", def.image.name, def.image.version)
}

/// Builds the whole disk image at `out` (e.g. `out/qemu-1.0.0.raw`), with the root filesystem
/// `PLINTH_ROOT_FS` names (squashfs by default).
pub fn write_disk(inputs: &DiskInputs, out: &Path) -> Result<DiskReport> {
    write_disk_as(inputs, out, RootFormat::from_env()?)
}

/// [`write_disk`] with an explicit root filesystem format.
pub fn write_disk_as(inputs: &DiskInputs, out: &Path, format: RootFormat) -> Result<DiskReport> {
    tools::require(&[format.tool(), tools::MKFS_EXT4])?;
    let def = inputs.def;
    let epoch = inputs.source_date_epoch;
    let seed = seed(def);
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .with_context(|| format!("output path {} has no file name", out.display()))?
        .to_string_lossy()
        .into_owned();
    // Probe the output folder first: a clear error beats one from mksquashfs.
    let mut disk_file = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempfile_in(&parent)
        .with_context(|| {
            format!(
                "creating a file in the output folder {}: is it there and writable?",
                parent.display()
            )
        })?;
    let work = tempfile::Builder::new()
        .prefix(".plinth-disk.")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a work folder in {}", parent.display()))?;

    // Root image and its hash tree.
    let step = Step::start(format!("root image ({})", format.as_str()));
    let root_path = work.path().join("root.img");
    let root_fs_uuid = gpt::derived_uuid(&format!("plinth root filesystem {seed}"));
    let root_size = rootimage::build(
        format,
        inputs.tree,
        &root_path,
        epoch,
        &root_fs_uuid,
        inputs.zstd_level,
    )?;
    let root_slot = def.disk.root.bytes();
    if root_size > root_slot {
        bail!(
            "the root image is {root_size} bytes ({}) but [disk] root = \"{}\" ({root_slot} bytes): raise [disk] root",
            human(root_size),
            def.disk.root
        );
    }
    step.done(&human(root_size));

    let step = Step::start("dm-verity hash tree");
    let image_digest = sha256_file(&root_path)?;
    let params = verity::VerityParams {
        salt: Sha256::new()
            .chain_update(b"plinth verity salt\0")
            .chain_update(seed.as_bytes())
            .chain_update([0])
            .chain_update(image_digest)
            .finalize()
            .into(),
        uuid: gpt::derived_uuid(&format!("plinth verity {seed}")).into_bytes(),
    };
    let mut root_file = File::open(&root_path)
        .with_context(|| format!("opening root image {}", root_path.display()))?;
    let tree = verity::hash_tree(&mut root_file, root_size, &params)?;
    let verity_slot = def.disk.verity.bytes();
    if tree.device.len() as u64 > verity_slot {
        bail!(
            "the verity hash tree is {} bytes but [disk] verity = \"{}\" ({verity_slot} bytes): raise [disk] verity",
            tree.device.len(),
            def.disk.verity
        );
    }
    let root_hash = tree.root_hash_hex();
    step.done(&format!("root hash {root_hash}"));

    let step = Step::start("initramfs");
    let modules: Vec<initramfs::Module> = inputs
        .initrd_modules
        .iter()
        .map(|(name, file, relative)| initramfs::Module {
            name: name.clone(),
            file: file.clone(),
            relative: relative.clone(),
        })
        .collect();
    let tables = module_tables(inputs.tree, inputs.kernel_version);
    let archive =
        initramfs::build_archive(inputs.init_binary, &modules, inputs.kernel_version, &tables)?;
    let initrd = initramfs::compressed(&archive, epoch, inputs.zstd_level)?;
    step.done(&format!(
        "{} modules, {}",
        modules.len(),
        human(initrd.len() as u64)
    ));

    let step = Step::start("disk image");
    let plan = gpt::plan(
        gpt::Sizes {
            esp: def.disk.esp.bytes(),
            root: root_slot,
            verity: verity_slot,
            state: def.disk.state.bytes(),
        },
        &seed,
        &tree.root_hash,
    )?;
    let file = disk_file.as_file_mut();
    file.set_len(plan.total_size)
        .with_context(|| format!("sizing {}", disk_file.path().display()))?;
    let file = gpt::write_gpt(disk_file.as_file_mut(), &plan)?;

    let root_part = plan.get(Role::Root(Slot::A))?;
    root_file
        .rewind()
        .with_context(|| format!("rereading {}", root_path.display()))?;
    copy_into(file, root_part.start, &mut root_file)
        .context("writing root-a into the disk image")?;
    let verity_part = plan.get(Role::Verity(Slot::A))?;
    copy_into(file, verity_part.start, &mut tree.device.as_slice())
        .context("writing verity-a into the disk image")?;

    let state_part = plan.get(Role::State)?;
    let state_path = work.path().join("state.img");
    state::make_state(&state_path, state_part.size, &state_part.uuid, epoch)?;
    let state_file =
        File::open(&state_path).with_context(|| format!("opening {}", state_path.display()))?;
    copy_sparse(file, state_part.start, &state_file)
        .context("writing state into the disk image")?;

    let entry = Entry {
        slot: Slot::A,
        version: def.image.version.to_string(),
        root_hash: root_hash.clone(),
        extra_args: def.kernel.cmdline.clone(),
        verity: def.image.verity,
    };
    let entry_name = EntryName::good(Slot::A, def.image.version.as_str());
    let read = |p: &Path, what: &str| {
        std::fs::read(p).with_context(|| format!("reading {what} {}", p.display()))
    };
    let kernel = read(inputs.vmlinuz, "kernel")?;
    let kernel_size = kernel.len() as u64;
    let esp_files = vec![
        esp::EspFile {
            path: boot::BOOT_LOADER.to_owned(),
            data: read(inputs.systemd_boot_efi, "systemd-boot")?,
        },
        esp::EspFile {
            path: boot::LOADER_CONF.to_owned(),
            data: boot::LOADER_CONF_TEXT.as_bytes().to_vec(),
        },
        esp::EspFile {
            path: Entry::kernel_path(Slot::A),
            data: kernel,
        },
        esp::EspFile {
            path: Entry::initrd_path(Slot::A),
            data: initrd.clone(),
        },
        esp::EspFile {
            path: entry_name.esp_path(),
            data: entry.format().into_bytes(),
        },
    ];
    let esp_part = plan.get(Role::Esp)?;
    esp::check_fits(&esp_files, esp_part.size)?;
    let volume_id = u32::from_le_bytes(
        gpt::derived_uuid(&format!("plinth esp volume {seed}")).as_bytes()[..4]
            .try_into()
            .context("deriving the ESP volume id")?,
    );
    esp::write_esp(
        slice::Slice::new(&mut *file, esp_part.start, esp_part.size),
        volume_id,
        epoch,
        &esp::folders(),
        &esp_files,
    )?;
    file.sync_all()
        .with_context(|| format!("syncing {}", disk_file.path().display()))?;
    disk_file
        .persist(out)
        .with_context(|| format!("renaming the finished disk image to {}", out.display()))?;
    step.done(&format!("{} ({})", out.display(), human(plan.total_size)));

    Ok(DiskReport {
        path: out.to_path_buf(),
        disk_size: plan.total_size,
        root_hash,
        root_format: format.as_str(),
        root_image_size: root_size,
        verity_size: tree.device.len() as u64,
        initrd_size: initrd.len() as u64,
        kernel_size,
        boot_entry: entry_name.file_name(),
        cmdline: entry.options(),
        partitions: plan
            .partitions
            .iter()
            .map(|p| (p.spec.label.to_owned(), p.start, p.size))
            .collect(),
    })
}

/// The folder of the root tree's `modules.dep`/`modules.alias` (under `lib` or `usr/lib`).
fn module_tables(tree: &Path, kernel_version: &str) -> PathBuf {
    let lib = tree.join("lib/modules").join(kernel_version);
    if lib.join("modules.dep").is_file() {
        return lib;
    }
    tree.join("usr/lib/modules").join(kernel_version)
}

/// Copies `src` into `disk` at `offset`.
fn copy_into(disk: &mut File, offset: u64, src: &mut impl Read) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = offset;
    disk.seek(SeekFrom::Start(pos))?;
    loop {
        let n = os_config::slice::read_full(src, &mut buf)?;
        if n == 0 {
            break;
        }
        disk.write_all(&buf[..n])?;
        pos += n as u64;
    }
    Ok(pos - offset)
}

/// Copies the sparse file `src` into `disk` at `offset`, reading only its data extents
/// (`SEEK_DATA`/`SEEK_HOLE`: a 1 GiB state filesystem holds about 33 MiB of data) and skipping
/// 4 KiB blocks of zeros within them. The disk file is fresh, so what is skipped reads back as
/// zeros and stays a hole. Returns the length of `src`.
fn copy_sparse(disk: &File, offset: u64, src: &File) -> Result<u64> {
    use rustix::fs::{seek, SeekFrom as Whence};
    use std::os::unix::fs::FileExt as _;
    let len = src.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let start = match seek(src, Whence::Data(pos as i64)) {
            Ok(start) => start,
            // No data after `pos`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(std::io::Error::from(e)).context("finding the next data extent"),
        };
        let end = seek(src, Whence::Hole(start as i64))
            .map_err(std::io::Error::from)
            .context("finding the end of a data extent")?
            .min(len);
        let mut at = start;
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], at)?;
            for (i, block) in buf[..n].chunks(4096).enumerate() {
                if block.iter().any(|b| *b != 0) {
                    disk.write_all_at(block, offset + at + (i * 4096) as u64)?;
                }
            }
            at += n as u64;
        }
        pos = end;
    }
    Ok(len)
}

fn sha256_file(path: &Path) -> Result<[u8; 32]> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hasher.finalize().into())
}

/// Bytes as a short human string (`12.3 MiB`).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// An output format `qemu-img` writes, with its file extension and options.
fn qemu_img_format(format: &str) -> Result<(&'static str, &'static str, &'static [&'static str])> {
    Ok(match format {
        "qcow2" => ("qcow2", "qcow2", &[]),
        "vhd" => ("vpc", "vhd", &["-o", "subformat=fixed,force_size=on"]),
        "vmdk" => ("vmdk", "vmdk", &["-o", "subformat=streamOptimized"]),
        other => bail!("unknown output format `{other}`: use raw, qcow2, vhd or vmdk"),
    })
}

/// Refuses a raw disk whose size is not a whole number of MiB: Azure takes only fixed VHDs of
/// whole MiB, and `force_size=on` keeps the raw size as the VHD's virtual size. Every disk
/// [`write_disk`] lays out is (1 MiB margins and partitions of whole MiB).
fn whole_mib(raw: &Path) -> Result<()> {
    const MIB: u64 = 1 << 20;
    let size = std::fs::metadata(raw)
        .with_context(|| format!("reading size of {}", raw.display()))?
        .len();
    if !size.is_multiple_of(MIB) {
        bail!(
            "{} is {size} bytes, not a whole number of MiB: a VHD for Azure must be",
            raw.display()
        );
    }
    Ok(())
}

/// Converts the raw image into each of `formats` (`raw`, `qcow2`, `vhd`, `vmdk`) next to it
/// (`x.raw` → `x.qcow2`), and returns the paths of all requested outputs. Each conversion goes to
/// a temporary name first. raw and qcow2 outputs are reproducible; VHD and VMDK headers carry a
/// time or random id that `qemu-img` sets.
pub fn convert(raw: &Path, formats: &[String]) -> Result<Vec<PathBuf>> {
    for format in formats {
        if format != "raw" {
            qemu_img_format(format)?;
        }
    }
    if formats.iter().any(|f| f != "raw") {
        tools::require(&[tools::QEMU_IMG])?;
    }
    let mut outputs = Vec::new();
    for format in formats {
        if format == "raw" {
            outputs.push(raw.to_path_buf());
            continue;
        }
        let (driver, ext, options) = qemu_img_format(format)?;
        if format == "vhd" {
            whole_mib(raw)?;
        }
        let step = Step::start(format!("{format} output"));
        let out = raw.with_extension(ext);
        let partial = raw.with_extension(format!("{ext}.partial"));
        let status = Command::new(tools::QEMU_IMG.find()?)
            .args(["convert", "-q", "-f", "raw", "-O", driver])
            .args(options)
            .arg(raw)
            .arg(&partial)
            .status()
            .context("running qemu-img")?;
        if !status.success() {
            let _ = std::fs::remove_file(&partial);
            bail!(
                "qemu-img convert to {format} failed ({status}) for {}",
                raw.display()
            );
        }
        std::fs::rename(&partial, &out)
            .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
        let size = std::fs::metadata(&out)
            .with_context(|| format!("reading size of {}", out.display()))?
            .len();
        step.done(&format!("{} ({})", out.display(), human(size)));
        outputs.push(out);
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
    }

    #[test]
    fn vhd_keeps_the_raw_size_a_whole_number_of_mib() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("d.raw");
        let size: u64 = 5 << 20;
        let file = File::create(&raw).expect("raw");
        file.set_len(size).expect("size");
        drop(file);
        let outputs = convert(&raw, &["vhd".to_owned()]).expect("vhd");
        assert_eq!(outputs, [raw.with_extension("vhd")]);
        let info = Command::new("qemu-img")
            // A fixed VHD has its footer at the end only, so it must be named: probing says raw.
            .args(["info", "--output=json", "-f", "vpc"])
            .arg(&outputs[0])
            .output()
            .expect("qemu-img info");
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("JSON");
        assert_eq!(info["format"], "vpc", "{info}");
        assert_eq!(info["virtual-size"].as_u64(), Some(size), "{info}");
        assert_eq!(size % (1 << 20), 0);
        // The file is the disk and its 512-byte footer.
        let len = std::fs::metadata(&outputs[0]).expect("vhd").len();
        assert_eq!(len, size + 512);

        std::fs::write(&raw, [0u8; 1536]).expect("odd raw");
        let err = convert(&raw, &["vhd".to_owned()]).expect_err("not whole MiB");
        assert!(err.to_string().contains("whole number of MiB"), "{err}");
    }

    #[test]
    fn unknown_output_format_is_refused() {
        let err = convert(Path::new("/nonexistent/x.raw"), &["iso".to_owned()])
            .expect_err("iso is not a format");
        assert!(err.to_string().contains("raw, qcow2, vhd or vmdk"), "{err}");
    }

    #[test]
    fn sparse_copy_skips_holes_and_zero_blocks_but_keeps_data() {
        let dir = tempfile::tempdir().expect("temp dir");
        let disk = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("disk"))
            .expect("create");
        disk.set_len(8 << 20).expect("size");
        // A 4 MiB source: a hole, a data extent holding one byte and a zero block, a hole, and
        // one byte in its last block.
        let src_path = dir.path().join("src");
        let src = File::create(&src_path).expect("create source");
        src.set_len(4 << 20).expect("size source");
        use std::os::unix::fs::FileExt as _;
        let mut extent = vec![0u8; 16 << 10];
        extent[5000] = 1;
        src.write_all_at(&extent, 1 << 20).expect("write extent");
        src.write_all_at(&[7], (4 << 20) - 1)
            .expect("write last byte");
        let src = File::open(&src_path).expect("open source");
        let n = copy_sparse(&disk, 8192, &src).expect("copy");
        assert_eq!(n, 4 << 20);
        disk.sync_all().expect("sync");
        let all = std::fs::read(dir.path().join("disk")).expect("read");
        assert_eq!(all[8192 + (1 << 20) + 5000], 1);
        assert_eq!(all[8192 + (4 << 20) - 1], 7);
        assert_eq!(all.iter().filter(|b| **b != 0).count(), 2);
        // Of the copied blocks only the two with data were written.
        let blocks = rustix::fs::fstat(&disk).expect("stat").st_blocks as u64 * 512;
        assert!(blocks <= 2 * 4096, "{blocks} bytes allocated");
    }
}
