//! The initramfs: a deterministic cpio (newc) archive, zstd-compressed, holding `plinth-init` as
//! `/init` and the kernel modules needed to find and mount the root.
//!
//! Contents (what `plinth-init` stage 1 can rely on):
//! - `/init`: the static `plinth-init` binary;
//! - `/dev /proc /sys /run /sysroot`: empty mount points;
//! - `/lib/modules/<version>/<relative path>`: each module file, as found in the root tree;
//! - `/etc/plinth/initrd-modules`: the modules' relative paths (under `/lib/modules/<version>/`),
//!   one per line, in load order (dependencies before the modules that need them);
//! - `/lib/modules/<version>/modules.dep` and `modules.alias`: the lines of the root tree's tables
//!   that concern these modules (absent tables give empty files).
//!
//! Every entry has mtime = `SOURCE_DATE_EPOCH`, uid/gid 0, sequential inode numbers; entries are
//! sorted by path, parents first.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// File listing the initramfs modules in load order.
pub const MODULE_LIST: &str = "etc/plinth/initrd-modules";

/// A module to put into the initramfs.
#[derive(Debug, Clone)]
pub struct Module {
    /// Module name (`virtio_blk`).
    pub name: String,
    /// The `.ko` file on the host.
    pub file: PathBuf,
    /// Path relative to `lib/modules/<version>/` (`kernel/drivers/block/virtio_blk.ko`).
    pub relative: String,
}

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    Dir,
    File { mode: u32, data: Vec<u8> },
}

/// An in-memory cpio archive: paths (no leading `/`) to members; missing parent folders are
/// added when written.
#[derive(Debug, Default)]
pub struct Archive {
    members: BTreeMap<String, Member>,
}

impl Archive {
    pub fn new() -> Archive {
        Archive::default()
    }

    /// Adds (or replaces) a member; `path` is relative, without a leading `/`.
    pub fn insert(&mut self, path: &str, member: Member) {
        self.members
            .insert(path.trim_start_matches('/').to_owned(), member);
    }

    /// Writes the archive in cpio newc format (uncompressed).
    pub fn write_cpio(&self, out: &mut impl Write, mtime: u64) -> std::io::Result<()> {
        let mut all: BTreeMap<String, &Member> = BTreeMap::new();
        static DIR: Member = Member::Dir;
        for (path, member) in &self.members {
            let mut parent = Path::new(path).parent();
            while let Some(dir) = parent.filter(|p| !p.as_os_str().is_empty()) {
                all.entry(dir.to_string_lossy().into_owned())
                    .or_insert(&DIR);
                parent = dir.parent();
            }
            all.insert(path.clone(), member);
        }
        // BTreeMap order puts "a" before "a/b" but also "a-b" before "a/b"; both are fine for the
        // kernel, which only needs a folder before its contents.
        let mtime = u32::try_from(mtime).unwrap_or(u32::MAX);
        for (ino, (path, member)) in all.iter().enumerate() {
            let (mode, data): (u32, &[u8]) = match member {
                Member::Dir => (0o040755, &[]),
                Member::File { mode, data } => (0o100000 | (mode & 0o7777), data),
            };
            let nlink = if matches!(member, Member::Dir) { 2 } else { 1 };
            write_entry(out, ino as u32 + 1, mode, nlink, mtime, path, data)?;
        }
        write_entry(out, 0, 0, 1, 0, "TRAILER!!!", &[])
    }
}

fn write_entry(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    name: &str,
    data: &[u8],
) -> std::io::Result<()> {
    let size = u32::try_from(data.len()).map_err(|_| too_large(name, data.len() as u64))?;
    write_header(out, ino, mode, nlink, mtime, name, size)?;
    out.write_all(data)?;
    out.write_all(&vec![0; pad4(data.len())])
}

/// Writes a newc header and the NUL-terminated name, padded to 4 bytes; the `size` bytes of
/// content and their padding follow.
fn write_header(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    name: &str,
    size: u32,
) -> std::io::Result<()> {
    let namesize = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{mtime:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, 0, 0, 0, 0, 0
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    out.write_all(&vec![0; pad4(110 + namesize)])
}

fn too_large(name: &str, len: u64) -> std::io::Error {
    std::io::Error::other(format!(
        "cpio member {name} has {len} bytes; the newc format holds at most 4 GiB - 1 per file"
    ))
}

/// Writes an uncompressed cpio (newc) archive holding one file at `path` (relative, no leading
/// `/`): its parent folders (mode 0755), the file (`mode`, uid/gid 0) with the `len` bytes read
/// from `data`, streamed rather than held in memory, and the trailer. Every entry has `mtime`.
/// The kernel unpacks such an archive appended after a compressed initramfs.
pub fn write_file_cpio(
    out: &mut impl Write,
    path: &str,
    mode: u32,
    data: &mut impl std::io::Read,
    len: u64,
    mtime: u64,
) -> std::io::Result<()> {
    let path = path.trim_start_matches('/');
    let size = u32::try_from(len).map_err(|_| too_large(path, len))?;
    let mtime = u32::try_from(mtime).unwrap_or(u32::MAX);
    let dirs: Vec<&Path> = Path::new(path)
        .ancestors()
        .skip(1)
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    let mut ino = 0u32;
    for dir in dirs.iter().rev() {
        ino += 1;
        write_entry(out, ino, 0o040755, 2, mtime, &dir.to_string_lossy(), &[])?;
    }
    write_header(
        out,
        ino + 1,
        0o100000 | (mode & 0o7777),
        1,
        mtime,
        path,
        size,
    )?;
    let copied = std::io::copy(&mut std::io::Read::take(&mut *data, len), out)?;
    if copied != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("cpio member {path}: expected {len} bytes of content, got {copied}"),
        ));
    }
    out.write_all(&vec![0; pad4(size as usize)])?;
    write_entry(out, 0, 0, 1, 0, "TRAILER!!!", &[])
}

fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Builds the initramfs archive (uncompressed) for the given init binary and modules.
///
/// `module_tables` is the folder holding the root tree's `modules.dep` and `modules.alias`
/// (`<tree>/lib/modules/<version>`); missing tables give empty subsets.
pub fn build_archive(
    init: &Path,
    modules: &[Module],
    kernel_version: &str,
    module_tables: &Path,
) -> Result<Archive> {
    let mut archive = Archive::new();
    let init_data =
        std::fs::read(init).with_context(|| format!("reading init binary {}", init.display()))?;
    archive.insert(
        "init",
        Member::File {
            mode: 0o755,
            data: init_data,
        },
    );
    for dir in ["dev", "proc", "sys", "run", "sysroot"] {
        archive.insert(dir, Member::Dir);
    }
    let base = format!("lib/modules/{kernel_version}");
    let mut order = String::new();
    for module in modules {
        let data = std::fs::read(&module.file)
            .with_context(|| format!("reading kernel module {}", module.file.display()))?;
        archive.insert(
            &format!("{base}/{}", module.relative),
            Member::File { mode: 0o644, data },
        );
        order.push_str(&module.relative);
        order.push('\n');
    }
    archive.insert(
        MODULE_LIST,
        Member::File {
            mode: 0o644,
            data: order.into_bytes(),
        },
    );
    let relatives: BTreeSet<&str> = modules.iter().map(|m| m.relative.as_str()).collect();
    let names: BTreeSet<String> = modules.iter().map(|m| normalise(&m.name)).collect();
    let dep = read_table(&module_tables.join("modules.dep"))?;
    let dep: String = dep
        .lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(m, _)| relatives.contains(m.trim()))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let alias = read_table(&module_tables.join("modules.alias"))?;
    let alias: String = alias
        .lines()
        .filter(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.len() == 3 && words[0] == "alias" && names.contains(&normalise(words[2]))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    for (file, text) in [("modules.dep", dep), ("modules.alias", alias)] {
        archive.insert(
            &format!("{base}/{file}"),
            Member::File {
                mode: 0o644,
                data: text.into_bytes(),
            },
        );
    }
    Ok(archive)
}

/// Module names treat `-` and `_` alike.
fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

fn read_table(path: &Path) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The zstd level of the initramfs unless the build names another (`plinth build --zstd-level`).
pub const DEFAULT_ZSTD_LEVEL: u32 = 19;

/// The archive as a zstd-compressed cpio (at `level`, [`DEFAULT_ZSTD_LEVEL`] when `None`;
/// single-threaded so the output is deterministic), the form the kernel takes as an initrd.
pub fn compressed(archive: &Archive, mtime: u64, level: Option<u32>) -> Result<Vec<u8>> {
    let level = i32::try_from(level.unwrap_or(DEFAULT_ZSTD_LEVEL))
        .context("zstd level of the initramfs")?;
    let mut cpio = Vec::new();
    archive
        .write_cpio(&mut cpio, mtime)
        .context("writing the initramfs archive")?;
    let mut out = zstd::bulk::compress(&cpio, level).context("compressing the initramfs")?;
    // Zeros up to a multiple of 4 bytes: an archive loaded after this one (the PXE folder's
    // uncompressed root.cpio) is only read as cpio when it starts 4-byte aligned, and the kernel
    // skips zeros between archives.
    out.resize(out.len().next_multiple_of(INITRD_ALIGN), 0);
    Ok(out)
}

/// The compressed initramfs is padded to a multiple of this many bytes.
pub const INITRD_ALIGN: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn cpio_list(cpio: &[u8]) -> String {
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cpio runs (install cpio)");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(cpio)
            .expect("feed cpio");
        let out = child.wait_with_output().expect("cpio finishes");
        assert!(out.status.success());
        String::from_utf8(out.stdout).expect("utf-8 listing")
    }

    /// One parsed newc member: (header fields as numbers, name, content).
    fn parse_newc(bytes: &[u8]) -> Vec<([u32; 13], String, Vec<u8>)> {
        let mut members = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(&bytes[at..at + 6], b"070701", "magic at {at}");
            let mut fields = [0u32; 13];
            for (i, field) in fields.iter_mut().enumerate() {
                let hex =
                    std::str::from_utf8(&bytes[at + 6 + 8 * i..at + 14 + 8 * i]).expect("hex");
                *field = u32::from_str_radix(hex, 16).expect("hex field");
            }
            let namesize = fields[11] as usize;
            let name_start = at + 110;
            assert_eq!(
                bytes[name_start + namesize - 1],
                0,
                "name is NUL-terminated"
            );
            let name = String::from_utf8(bytes[name_start..name_start + namesize - 1].to_vec())
                .expect("utf-8 name");
            let data_start = (name_start + namesize).next_multiple_of(4);
            assert!(
                bytes[name_start + namesize..data_start]
                    .iter()
                    .all(|b| *b == 0),
                "name padding is zeros"
            );
            let size = fields[6] as usize;
            let data = bytes[data_start..data_start + size].to_vec();
            at = (data_start + size).next_multiple_of(4);
            assert!(
                bytes[data_start + size..at].iter().all(|b| *b == 0),
                "data padding is zeros"
            );
            let last = name == "TRAILER!!!";
            members.push((fields, name, data));
            if last {
                assert_eq!(at, bytes.len(), "nothing after the trailer");
                return members;
            }
        }
    }

    #[test]
    fn single_file_cpio_has_folder_file_and_trailer_in_newc_layout() {
        // 4097 bytes: the content needs 3 bytes of padding.
        let content: Vec<u8> = (0..4097u32).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        write_file_cpio(
            &mut out,
            "plinth/root.live",
            0o400,
            &mut &content[..],
            content.len() as u64,
            1_700_000_000,
        )
        .expect("writes");
        let members = parse_newc(&out);
        let names: Vec<&str> = members.iter().map(|m| m.1.as_str()).collect();
        assert_eq!(names, ["plinth", "plinth/root.live", "TRAILER!!!"]);
        let (dir, file, trailer) = (&members[0].0, &members[1].0, &members[2].0);
        // ino, mode, uid, gid, nlink, mtime, filesize, devs, namesize, check.
        assert_eq!(dir[1], 0o040755);
        assert_eq!((dir[4], dir[5], dir[6]), (2, 1_700_000_000, 0));
        assert_eq!(file[0], dir[0] + 1, "distinct inode numbers");
        assert_eq!(file[1], 0o100400);
        assert_eq!((file[2], file[3], file[4]), (0, 0, 1), "uid, gid, nlink");
        assert_eq!(file[5], 1_700_000_000);
        assert_eq!(file[6], 4097);
        assert_eq!(file[11] as usize, "plinth/root.live".len() + 1);
        assert_eq!(file[12], 0);
        assert_eq!(members[1].2, content);
        assert_eq!((trailer[0], trailer[6]), (0, 0));

        // A reader that ends early is an error, not a short member.
        let err = write_file_cpio(&mut Vec::new(), "a/b", 0o400, &mut &content[..10], 11, 0)
            .expect_err("short content");
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        // The reference tool reads it back too.
        let listing = cpio_list(&out);
        assert!(listing.contains("plinth/root.live"), "{listing}");
        assert!(
            listing.lines().any(|l| l.starts_with("-r--------")),
            "{listing}"
        );
    }

    #[test]
    fn archive_lists_with_cpio_and_is_deterministic() {
        let dir = tempfile::tempdir().expect("temp dir");
        let init = dir.path().join("plinth-init");
        std::fs::write(&init, b"\x7fELF fake init").expect("write init");
        let ko = dir.path().join("virtio_blk.ko");
        std::fs::write(&ko, b"module bytes").expect("write module");
        let tables = dir.path().join("tables");
        std::fs::create_dir(&tables).expect("mkdir");
        std::fs::write(
            tables.join("modules.dep"),
            "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko\nkernel/fs/ext4/ext4.ko:\n",
        )
        .expect("write dep");
        std::fs::write(
            tables.join("modules.alias"),
            "alias virtio:d00000002v* virtio_blk\nalias fs-ext4 ext4\n",
        )
        .expect("write alias");
        let modules = [Module {
            name: "virtio-blk".to_owned(),
            file: ko,
            relative: "kernel/drivers/block/virtio_blk.ko".to_owned(),
        }];
        let archive =
            build_archive(&init, &modules, "6.1.0-1-cloud-amd64", &tables).expect("archive builds");
        let mut first = Vec::new();
        archive
            .write_cpio(&mut first, 1_700_000_000)
            .expect("write");
        let mut second = Vec::new();
        archive
            .write_cpio(&mut second, 1_700_000_000)
            .expect("write");
        assert_eq!(first, second);

        let listing = cpio_list(&first);
        let names: Vec<&str> = listing
            .lines()
            .map(|l| l.split_whitespace().last().expect("name"))
            .collect();
        let base = "lib/modules/6.1.0-1-cloud-amd64";
        for want in [
            "init",
            "dev",
            "sysroot",
            "etc/plinth/initrd-modules",
            &format!("{base}/kernel/drivers/block/virtio_blk.ko"),
            &format!("{base}/modules.dep"),
        ] {
            assert!(names.contains(&want), "{want} missing from:\n{listing}");
        }
        let pos = |n: &str| names.iter().position(|x| *x == n).expect(n);
        assert!(pos("lib") < pos("lib/modules"));
        let init_line = listing
            .lines()
            .find(|l| l.ends_with(" init"))
            .expect("init line");
        assert!(init_line.starts_with("-rwxr-xr-x"), "{init_line}");
        assert!(init_line.contains("root"), "{init_line}");

        let file = |path: &str| match &archive.members[path] {
            Member::File { data, .. } => String::from_utf8(data.clone()).expect("utf-8"),
            Member::Dir => panic!("{path} is a folder"),
        };
        assert_eq!(file(MODULE_LIST), "kernel/drivers/block/virtio_blk.ko\n");
        assert_eq!(
            file(&format!("{base}/modules.dep")),
            "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko\n"
        );
        assert_eq!(
            file(&format!("{base}/modules.alias")),
            "alias virtio:d00000002v* virtio_blk\n"
        );

        // Extracting with cpio gives the init bytes back.
        let out = dir.path().join("out");
        std::fs::create_dir(&out).expect("mkdir");
        let mut child = Command::new("cpio")
            .args(["-i", "-d", "--quiet"])
            .current_dir(&out)
            .stdin(Stdio::piped())
            .spawn()
            .expect("cpio runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&first)
            .expect("feed");
        assert!(child.wait().expect("cpio finishes").success());
        assert_eq!(
            std::fs::read(out.join("init")).expect("init extracted"),
            b"\x7fELF fake init"
        );
    }
}
