//! `plinth build --format pxe`: the network-boot folder `<name>-<version>.pxe/` beside the disk
//! image, derived from the built disk alone (slot A's kernel, initrd, root and verity tree) plus
//! systemd-stub for the Unified Kernel Image, so it matches the disk and is reproducible.
//!
//! The folder holds (names other parts of the system rely on):
//! - `vmlinuz`, `initrd.img`: slot A's kernel and initramfs, byte for byte;
//! - `root.live`: slot A's root image followed by its verity hash device ([`os_config::live`]);
//! - `root.cpio`: an uncompressed cpio holding `plinth/root.live`, loaded after `initrd.img`;
//! - `boot.ipxe`: an iPXE script that boots the three files above live;
//! - `live.efi`: a UKI (systemd-stub with `.osrel`, `.cmdline`, `.linux`, `.initrd`);
//! - `<name>-<version>.raw.zst` and its `.sha256`: the disk image to install;
//! - `pxe.json`: a summary of the above ([`PxeSummary`]).

use std::ffi::OsString;
use std::fs;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use os_config::boot::{Entry, ARG_ROOTHASH, ARG_VERSION};
use os_config::live::{ARG_LIVE, ROOT_FILE, ROOT_IN_INITRD};
use os_config::units::{Name, Version};
use serde::{Deserialize, Serialize};

use crate::progress::Step;
use crate::publish::{sync_dir, HashWriter, ZSTD_LEVEL};
use crate::tools;

/// The kernel in the PXE folder.
pub const KERNEL_FILE: &str = "vmlinuz";
/// Slot A's initramfs in the PXE folder.
pub const INITRD_FILE: &str = "initrd.img";
/// The uncompressed cpio holding the live root, loaded after [`INITRD_FILE`].
pub const ROOT_CPIO_FILE: &str = "root.cpio";
/// The iPXE script.
pub const IPXE_FILE: &str = "boot.ipxe";
/// The Unified Kernel Image for UEFI PXE and HTTP boot.
pub const UKI_FILE: &str = "live.efi";
/// The machine-readable summary.
pub const SUMMARY_FILE: &str = "pxe.json";

/// Mode of `plinth/root.live` in `root.cpio`: read-only for root, as stage 1 only reads it.
const ROOT_CPIO_MODE: u32 = 0o400;
/// The PE sections of the UKI, in the order they are laid out after the stub's own.
const UKI_SECTIONS: [&str; 4] = [".osrel", ".cmdline", ".linux", ".initrd"];

/// What the PXE folder is made from.
#[derive(Debug, Clone, Copy)]
pub struct PxeInputs<'a> {
    /// The built raw disk image; its slot A is what boots.
    pub raw: &'a Path,
    /// systemd-stub (`linuxx64.efi.stub`) of the build, the base of `live.efi`.
    pub stub: &'a Path,
    /// The image's name and version, as the disk's file name and boot entry carry them.
    pub name: &'a Name,
    pub version: &'a Version,
    /// Modification time of the members of `root.cpio`, seconds since the Unix epoch.
    pub source_date_epoch: u64,
}

/// What [`write_pxe`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PxeReport {
    /// The folder (`<name>-<version>.pxe`).
    pub folder: PathBuf,
    /// Its summary, as written to `pxe.json`.
    pub summary: PxeSummary,
}

/// `pxe.json`: the folder's contents for scripts and servers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PxeSummary {
    pub name: String,
    pub version: String,
    /// dm-verity root hash of slot A's root, the one `plinth.roothash=` names.
    pub root_hash: String,
    /// The kernel command line of a live boot (without installation arguments).
    pub cmdline: String,
    /// File name of the kernel.
    pub kernel: String,
    /// File names of the initramfs parts, in load order.
    pub initrd: Vec<String>,
    /// File name of the Unified Kernel Image.
    pub uki: String,
    /// File name of the live root (root image followed by its verity hash device).
    pub root_live: String,
    /// The compressed disk image to install.
    pub image: PxeImage,
}

/// The compressed disk image of the PXE folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PxeImage {
    /// File name (`<name>-<version>.raw.zst`).
    pub file: String,
    /// sha256 of the compressed file, hex.
    pub sha256: String,
    /// Bytes of the uncompressed disk image.
    pub size: u64,
    /// Bytes of the compressed file.
    pub compressed_size: u64,
}

/// The PXE folder of a raw disk image: `x.raw` → `x.pxe`.
pub fn folder_for(raw: &Path) -> PathBuf {
    raw.with_extension("pxe")
}

/// The kernel command line of a live boot of slot A: `plinth.live`, the version and root hash,
/// then what the slot's boot entry carries besides its slot (`plinth.verity=off`, the image's
/// own arguments).
pub fn live_cmdline(version: &str, root_hash: &str, entry: &Entry) -> String {
    let mut args = vec![
        ARG_LIVE.to_owned(),
        format!("{ARG_VERSION}={version}"),
        format!("{ARG_ROOTHASH}={root_hash}"),
    ];
    args.extend(crate::publish::release_cmdline(entry));
    args.join(" ")
}

/// The iPXE script that boots the folder live; relative file names resolve against the
/// script's own URL.
pub fn ipxe_script(summary: &PxeSummary) -> String {
    let (name, version) = (&summary.name, &summary.version);
    let image = &summary.image;
    format!(
        "#!ipxe\n\
# {name} {version}: live boot (root hash {hash})\n\
# Append install arguments by setting plinth-args first (see README), e.g.\n\
#   set plinth-args {install}=first-empty {install_image}=http://server/{file} {install_sha}={sha}\n\
isset ${{plinth-args}} || set plinth-args\n\
kernel {kernel} {initrd_args} {cmdline} ${{plinth-args}}\n\
{initrd_lines}\
boot\n",
        hash = summary.root_hash,
        install = os_config::live::ARG_INSTALL,
        install_image = os_config::live::ARG_INSTALL_IMAGE,
        install_sha = os_config::live::ARG_INSTALL_SHA256,
        file = image.file,
        sha = image.sha256,
        kernel = summary.kernel,
        initrd_args = summary
            .initrd
            .iter()
            .map(|f| format!("initrd={f}"))
            .collect::<Vec<_>>()
            .join(" "),
        cmdline = summary.cmdline,
        initrd_lines = summary
            .initrd
            .iter()
            .map(|f| format!("initrd {f}\n"))
            .collect::<String>(),
    )
}

/// Writes the PXE folder of `inputs.raw` to `folder`: everything goes into a temporary sibling
/// folder first, which then replaces `folder` in one rename (an older folder of that name stays
/// untouched until then; a failed or interrupted write leaves no folder under the final name).
pub fn write_pxe(inputs: &PxeInputs<'_>, folder: &Path) -> Result<PxeReport> {
    tools::require(&[tools::OBJCOPY])?;
    let stub_bytes = fs::read(inputs.stub)
        .with_context(|| format!("reading systemd-stub {}", inputs.stub.display()))?;
    let layout = StubLayout::parse(&stub_bytes)
        .with_context(|| format!("reading systemd-stub {}", inputs.stub.display()))?;
    drop(stub_bytes);
    if folder.exists() && !folder.is_dir() {
        bail!(
            "{} exists and is not a folder: remove it to write the PXE folder there",
            folder.display()
        );
    }
    let (parent, file_name) = match (folder.parent(), folder.file_name()) {
        (Some(parent), Some(name)) => (parent, name.to_string_lossy().into_owned()),
        _ => bail!("PXE folder {} has no parent folder", folder.display()),
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{file_name}.partial-"))
        .tempdir_in(parent)
        .with_context(|| format!("creating a temporary folder in {}", parent.display()))?;
    let summary = fill(inputs, &layout, staging.path())?;
    fs::set_permissions(staging.path(), fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} readable", staging.path().display()))?;
    let staged = staging.keep();
    replace_folder(&staged, folder)?;
    sync_dir(parent)?;
    Ok(PxeReport {
        folder: folder.to_path_buf(),
        summary,
    })
}

/// Writes every file of the folder into the empty folder `dir`; returns the summary.
fn fill(inputs: &PxeInputs<'_>, layout: &StubLayout, dir: &Path) -> Result<PxeSummary> {
    let raw = inputs.raw;
    let step = Step::start("PXE folder: kernel, initrd and live root");
    let mut disk =
        fs::File::open(raw).with_context(|| format!("opening disk image {}", raw.display()))?;
    let slot = crate::publish::read_slot_a(&mut disk, raw)?;
    let entry = slot.entry.as_ref().with_context(|| {
        format!(
            "disk image {} has no boot entry for slot a (loader/entries/plinth-a-*.conf on its ESP)",
            raw.display()
        )
    })?;
    if entry.version != inputs.version.as_str() {
        bail!(
            "disk image {} holds version {} in slot a, but the PXE folder is for version {}",
            raw.display(),
            entry.version,
            inputs.version
        );
    }
    let root_hash = hex::encode(slot.root_hash);
    let cmdline = live_cmdline(inputs.version.as_str(), &root_hash, entry);
    write_file(dir, KERNEL_FILE, &slot.kernel)?;
    write_file(dir, INITRD_FILE, &slot.initrd)?;
    let root_live = dir.join(ROOT_FILE);
    write_root_live(&mut disk, &slot, &root_live)
        .with_context(|| format!("writing {} from {}", root_live.display(), raw.display()))?;
    let root_cpio = dir.join(ROOT_CPIO_FILE);
    write_root_cpio(&root_live, &root_cpio, inputs.source_date_epoch)
        .with_context(|| format!("writing {}", root_cpio.display()))?;
    step.done(&format!(
        "{} data blocks, root hash {root_hash}",
        slot.superblock.data_blocks
    ));
    drop(slot);

    let step = Step::start("PXE folder: unified kernel image");
    let os_release = format!(
        "NAME=\"Plinth\"\nID=plinth\nVERSION=\"{version}\"\nVERSION_ID={version}\n\
PRETTY_NAME=\"Plinth {version} (live)\"\nIMAGE_ID={name}\nIMAGE_VERSION={version}\n",
        name = inputs.name,
        version = inputs.version
    );
    let uki = dir.join(UKI_FILE);
    write_uki(
        inputs.stub,
        layout,
        &UkiParts {
            os_release: os_release.as_bytes(),
            cmdline: cmdline.as_bytes(),
            kernel: &dir.join(KERNEL_FILE),
            initrds: &[&dir.join(INITRD_FILE), &root_cpio],
        },
        &uki,
        inputs.source_date_epoch,
    )?;
    step.done(&crate::disk::human(file_size(&uki)?));

    let step = Step::start("PXE folder: compressed disk image");
    let image_file = format!("{}-{}.raw.zst", inputs.name, inputs.version);
    let image = compress_image(raw, &dir.join(&image_file))?;
    let image = PxeImage {
        file: image_file,
        ..image
    };
    write_file(
        dir,
        &format!("{}.sha256", image.file),
        format!("{}  {}\n", image.sha256, image.file).as_bytes(),
    )?;
    step.done(&format!(
        "{} of {}",
        crate::disk::human(image.compressed_size),
        crate::disk::human(image.size)
    ));

    let summary = PxeSummary {
        name: inputs.name.to_string(),
        version: inputs.version.to_string(),
        root_hash,
        cmdline,
        kernel: KERNEL_FILE.to_owned(),
        initrd: vec![INITRD_FILE.to_owned(), ROOT_CPIO_FILE.to_owned()],
        uki: UKI_FILE.to_owned(),
        root_live: ROOT_FILE.to_owned(),
        image,
    };
    write_file(dir, IPXE_FILE, ipxe_script(&summary).as_bytes())?;
    let mut json = serde_json::to_string_pretty(&summary).context("writing pxe.json")?;
    json.push('\n');
    write_file(dir, SUMMARY_FILE, json.as_bytes())?;
    sync_dir(dir)?;
    Ok(summary)
}

/// Writes `root.live`: the root image (`data_blocks` × 4096 bytes of `root-a`) followed by the
/// used part of `verity-a` (superblock block and tree), streamed from the disk.
fn write_root_live(disk: &mut fs::File, slot: &crate::publish::SlotA, path: &Path) -> Result<()> {
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::new(file);
    for (part, len) in [
        (&slot.root, slot.root_size),
        (&slot.verity, slot.verity_size),
    ] {
        disk.seek(SeekFrom::Start(part.start))
            .with_context(|| format!("seeking to partition {}", part.label))?;
        let copied = io::copy(&mut (&mut *disk).take(len), &mut out)
            .with_context(|| format!("copying partition {}", part.label))?;
        if copied != len {
            bail!(
                "partition {} ends after {copied} of the {len} bytes its verity superblock covers",
                part.label
            );
        }
    }
    finish(out, path)
}

/// Writes `root.cpio`: `plinth/root.live` (mode 0400, uid/gid 0) streamed from `root_live`.
fn write_root_cpio(root_live: &Path, path: &Path, epoch: u64) -> Result<()> {
    let mut input =
        fs::File::open(root_live).with_context(|| format!("opening {}", root_live.display()))?;
    let len = input
        .metadata()
        .with_context(|| format!("reading size of {}", root_live.display()))?
        .len();
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::new(file);
    crate::disk::initramfs::write_file_cpio(
        &mut out,
        ROOT_IN_INITRD,
        ROOT_CPIO_MODE,
        &mut input,
        len,
        epoch,
    )?;
    finish(out, path)
}

/// Compresses the disk image into `out` (one zstd frame that records the uncompressed size,
/// single-threaded so the bytes are the same on every run); returns its sizes and sha256 (the
/// file name is left empty for the caller).
fn compress_image(raw: &Path, out: &Path) -> Result<PxeImage> {
    let mut input =
        fs::File::open(raw).with_context(|| format!("opening disk image {}", raw.display()))?;
    let size = input
        .metadata()
        .with_context(|| format!("reading size of {}", raw.display()))?
        .len();
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut hashed = HashWriter::new(BufWriter::new(file));
    let mut encoder =
        zstd::stream::Encoder::new(&mut hashed, ZSTD_LEVEL).context("starting zstd")?;
    encoder
        .include_checksum(true)
        .and_then(|()| encoder.include_contentsize(true))
        .and_then(|()| encoder.set_pledged_src_size(Some(size)))
        .context("configuring zstd")?;
    io::copy(&mut input, &mut encoder)
        .and_then(|_| encoder.finish())
        .with_context(|| format!("compressing {} into {}", raw.display(), out.display()))?;
    let (compressed_size, sha256) = hashed.finish();
    finish(hashed.inner, out)?;
    Ok(PxeImage {
        file: String::new(),
        sha256,
        size,
        compressed_size,
    })
}

/// Where the stub's own image ends, so the added sections go after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StubLayout {
    /// The stub's preferred load address.
    pub image_base: u64,
    /// Its `SizeOfImage`: every section of the stub lies below `image_base + size_of_image`.
    pub size_of_image: u64,
    /// Its `SectionAlignment` (at least one 4096-byte page).
    pub section_alignment: u64,
}

impl StubLayout {
    /// Reads the layout of a PE32+ EFI stub.
    pub fn parse(bytes: &[u8]) -> Result<StubLayout> {
        let pe = goblin::pe::PE::parse(bytes).context("parsing it as a PE file")?;
        if !pe.is_64 {
            bail!("it is a 32-bit PE file; the UKI needs the x86-64 stub linuxx64.efi.stub");
        }
        let windows = pe
            .header
            .optional_header
            .map(|h| h.windows_fields)
            .context("it has no PE optional header")?;
        Ok(StubLayout {
            image_base: pe.image_base as u64,
            size_of_image: u64::from(windows.size_of_image),
            section_alignment: u64::from(windows.section_alignment).max(4096),
        })
    }

    /// The virtual addresses (image base included, as `objcopy --change-section-vma` takes them)
    /// of sections of `sizes` bytes, laid out in order after the stub, each aligned, none
    /// overlapping.
    pub fn section_vmas(&self, sizes: &[u64]) -> Result<Vec<u64>> {
        let align = |value: u64| -> Result<u64> {
            value
                .checked_next_multiple_of(self.section_alignment)
                .context("UKI sections do not fit the 64-bit address space")
        };
        let mut next = align(self.image_base.saturating_add(self.size_of_image))?;
        let mut vmas = Vec::with_capacity(sizes.len());
        for size in sizes {
            vmas.push(next);
            next = align(next.saturating_add(*size))?;
        }
        if next - self.image_base > u64::from(u32::MAX) {
            bail!("UKI sections end {next:#x}, beyond the 4 GiB a PE image can span");
        }
        Ok(vmas)
    }
}

/// The contents of the UKI's added sections.
#[derive(Debug, Clone, Copy)]
pub struct UkiParts<'a> {
    /// `.osrel`: os-release text.
    pub os_release: &'a [u8],
    /// `.cmdline`: the kernel command line (systemd-stub reads at most the section's size and
    /// stops at a NUL, so no terminator is needed).
    pub cmdline: &'a [u8],
    /// `.linux`: the kernel file.
    pub kernel: &'a Path,
    /// `.initrd`: these files concatenated.
    pub initrds: &'a [&'a Path],
}

/// Writes a Unified Kernel Image: the stub with sections `.osrel`, `.cmdline`, `.linux` and
/// `.initrd` added by `objcopy` at page-aligned addresses after the stub's own sections.
/// Temporary section files go to a folder beside `out`, removed afterwards.
pub fn write_uki(
    stub: &Path,
    layout: &StubLayout,
    parts: &UkiParts<'_>,
    out: &Path,
    epoch: u64,
) -> Result<()> {
    let beside = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let work = tempfile::Builder::new()
        .prefix(".uki-sections-")
        .tempdir_in(beside)
        .with_context(|| format!("creating a temporary folder in {}", beside.display()))?;
    let osrel = work.path().join("osrel");
    let cmdline = work.path().join("cmdline");
    let initrd = work.path().join("initrd");
    fs::write(&osrel, parts.os_release)
        .and_then(|()| fs::write(&cmdline, parts.cmdline))
        .with_context(|| format!("writing UKI sections in {}", work.path().display()))?;
    concatenate(parts.initrds, &initrd)?;
    let files = [osrel.as_path(), cmdline.as_path(), parts.kernel, &initrd];
    let sizes = files
        .iter()
        .map(|f| file_size(f))
        .collect::<Result<Vec<_>>>()?;
    let vmas = layout.section_vmas(&sizes)?;
    let mut command = Command::new(tools::OBJCOPY.find()?);
    for ((name, file), vma) in UKI_SECTIONS.iter().zip(files).zip(vmas) {
        let mut add = OsString::from(format!("{name}="));
        add.push(file.as_os_str());
        command
            .arg("--add-section")
            .arg(add)
            .arg("--change-section-vma")
            .arg(format!("{name}={vma:#x}"))
            .arg("--set-section-flags")
            .arg(format!("{name}=contents,alloc,load,readonly,data"));
    }
    let output = command
        .arg(stub)
        .arg(out)
        .output()
        .context("running objcopy")?;
    if !output.status.success() {
        let _ = fs::remove_file(out);
        bail!(
            "objcopy failed ({}) adding the UKI sections to {}: {}",
            output.status,
            stub.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    // objcopy stamps the PE header with the current time: the build time makes it reproducible.
    stamp_pe(out, epoch)
        .with_context(|| format!("setting the PE time stamp of {}", out.display()))?;
    work.close()
        .with_context(|| format!("removing temporary UKI sections beside {}", out.display()))
}

/// Sets the COFF `TimeDateStamp` of the PE file at `path` to `epoch` (its low 32 bits) and
/// recomputes the optional header's `CheckSum` to match; syncs the file.
pub fn stamp_pe(path: &Path, epoch: u64) -> io::Result<()> {
    let mut file = fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut word = [0u8; 4];
    file.seek(SeekFrom::Start(0x3c))?;
    file.read_exact(&mut word)?;
    let pe_offset = u64::from(u32::from_le_bytes(word));
    // "PE\0\0", then the COFF header (time stamp at +4), then the optional header, whose
    // CheckSum is at +64 in both PE32 and PE32+.
    let stamp_offset = pe_offset + 8;
    let checksum_offset = pe_offset + 24 + 64;
    file.seek(SeekFrom::Start(stamp_offset))?;
    file.write_all(&(epoch as u32).to_le_bytes())?;
    let checksum = pe_checksum(&mut file, checksum_offset)?;
    file.seek(SeekFrom::Start(checksum_offset))?;
    file.write_all(&checksum.to_le_bytes())?;
    file.sync_all()
}

/// The PE image checksum of `file`: the 16-bit one's-complement-style sum of its words (the
/// `CheckSum` field at `checksum_offset` counted as zero) plus the file length.
fn pe_checksum(file: &mut fs::File, checksum_offset: u64) -> io::Result<u32> {
    file.seek(SeekFrom::Start(0))?;
    // An even size, so every buffer but the last holds whole words.
    let mut buf = vec![0u8; 1 << 20];
    let mut sum: u64 = 0;
    let mut offset: u64 = 0;
    loop {
        let n = os_config::slice::read_full(&mut *file, &mut buf)?;
        for word in buf[..n].chunks(2) {
            if !(checksum_offset..checksum_offset + 4).contains(&offset) {
                let low = word[0];
                let high = word.get(1).copied().unwrap_or(0);
                sum += u64::from(u16::from_le_bytes([low, high]));
                sum = (sum & 0xffff) + (sum >> 16);
            }
            offset += word.len() as u64;
        }
        if n < buf.len() {
            break;
        }
    }
    sum = (sum & 0xffff) + (sum >> 16);
    Ok((sum as u32).wrapping_add(offset as u32))
}

/// Writes the files `parts` one after the other into `out`.
fn concatenate(parts: &[&Path], out: &Path) -> Result<()> {
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut writer = BufWriter::new(file);
    for part in parts {
        let mut input =
            fs::File::open(part).with_context(|| format!("opening {}", part.display()))?;
        io::copy(&mut input, &mut writer)
            .with_context(|| format!("copying {} into {}", part.display(), out.display()))?;
    }
    finish(writer, out)
}

/// Swaps the finished folder `staged` into place at `folder` and removes what was there before.
/// On failure `folder` is as it was (the older folder, or none) and `staged` is removed.
fn replace_folder(staged: &Path, folder: &Path) -> Result<()> {
    let renamed = if folder.exists() {
        // One atomic exchange: readers see the old folder or the new one, never none.
        let exchanged = rustix::fs::renameat_with(
            rustix::fs::CWD,
            staged,
            rustix::fs::CWD,
            folder,
            rustix::fs::RenameFlags::EXCHANGE,
        );
        match exchanged {
            Ok(()) => Ok(()),
            // Filesystems without RENAME_EXCHANGE: move the old folder aside, then back on failure.
            Err(_) => {
                let mut aside = staged.as_os_str().to_owned();
                aside.push(".old");
                let aside = PathBuf::from(aside);
                fs::rename(folder, &aside).and_then(|()| match fs::rename(staged, folder) {
                    Ok(()) => fs::rename(&aside, staged),
                    Err(e) => {
                        let _ = fs::rename(&aside, folder);
                        Err(e)
                    }
                })
            }
        }
    } else {
        fs::rename(staged, folder)
    };
    if let Err(e) = renamed {
        let _ = fs::remove_dir_all(staged);
        return Err(e)
            .with_context(|| format!("renaming {} to {}", staged.display(), folder.display()));
    }
    if staged.exists() {
        // The new folder is in place; a leftover old one is only clutter.
        if let Err(e) = fs::remove_dir_all(staged) {
            eprintln!(
                "warning: could not remove the replaced PXE folder, now at {}: {e}",
                staged.display()
            );
        }
    }
    Ok(())
}

/// Creates `dir/name` with `bytes`, synced.
fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    fs::File::create(&path)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .with_context(|| format!("writing {}", path.display()))
}

/// Flushes a buffered file and syncs it.
fn finish(writer: BufWriter<fs::File>, path: &Path) -> Result<()> {
    writer
        .into_inner()
        .map_err(io::IntoInnerError::into_error)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn file_size(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("reading size of {}", path.display()))?
        .len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(text: &str) -> Entry {
        Entry::parse(text).expect("entry parses")
    }

    #[test]
    fn live_cmdline_has_no_slot_and_keeps_the_image_arguments() {
        let hash = "ab".repeat(32);
        let e = entry(&format!(
            "options plinth.slot=a plinth.version=1.2 plinth.roothash={hash} console=ttyS0 quiet\n"
        ));
        let line = live_cmdline("1.2", &hash, &e);
        assert_eq!(
            line,
            format!("plinth.live plinth.version=1.2 plinth.roothash={hash} console=ttyS0 quiet")
        );
        assert!(!line.contains("plinth.slot"), "{line}");
        let debug = entry("options plinth.slot=a plinth.verity=off console=ttyS0\n");
        assert_eq!(
            live_cmdline("1", "00", &debug),
            "plinth.live plinth.version=1 plinth.roothash=00 plinth.verity=off console=ttyS0"
        );
    }

    #[test]
    fn section_vmas_are_aligned_in_order_and_never_overlap() {
        let layout = StubLayout {
            image_base: 0x1_4000_0000,
            size_of_image: 0x1_2345,
            section_alignment: 0x1000,
        };
        let sizes = [100, 4096, 5000, 1];
        let vmas = layout.section_vmas(&sizes).expect("fits");
        assert_eq!(vmas[0], 0x1_4001_3000);
        assert_eq!(vmas[1], 0x1_4001_4000);
        assert_eq!(vmas[2], 0x1_4001_5000);
        assert_eq!(vmas[3], 0x1_4001_7000);
        for (i, vma) in vmas.iter().enumerate() {
            assert_eq!(vma % 0x1000, 0);
            if let Some(next) = vmas.get(i + 1) {
                assert!(vma + sizes[i] <= *next);
            }
        }
        let too_big = layout.section_vmas(&[u64::from(u32::MAX)]);
        assert!(too_big.is_err());
    }

    #[test]
    fn folder_sits_beside_the_raw_image() {
        assert_eq!(
            folder_for(Path::new("out/demo-1.2.3.raw")),
            Path::new("out/demo-1.2.3.pxe")
        );
    }
}
