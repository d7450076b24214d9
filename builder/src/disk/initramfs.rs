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
    let namesize = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{mtime:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, data.len(), 0, 0, 0, 0, 0
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    out.write_all(&vec![0; pad4(110 + namesize)])?;
    out.write_all(data)?;
    out.write_all(&vec![0; pad4(data.len())])
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

/// The archive as a zstd-compressed cpio (level 19, single-threaded so the output is
/// deterministic), the form the kernel takes as an initrd.
pub fn compressed(archive: &Archive, mtime: u64) -> Result<Vec<u8>> {
    let mut cpio = Vec::new();
    archive
        .write_cpio(&mut cpio, mtime)
        .context("writing the initramfs archive")?;
    zstd::bulk::compress(&cpio, 19).context("compressing the initramfs")
}

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
