//! The read-only root filesystem image of a slot: squashfs (zstd) through `mksquashfs`, or EROFS
//! (lz4hc) through `mkfs.erofs`, both reproducible: every owner root, every timestamp
//! `SOURCE_DATE_EPOCH`, no extended attributes, and the image padded to whole 4 KiB blocks for
//! dm-verity.
//!
//! Squashfs (zstd level 15, 128 KiB blocks) is the default. Measured on the extracted files of
//! `docker.io containerd runc tini iptables libc6` (263 MiB, 2 shared cores under load):
//!
//! | format                      | image     | time   |
//! |-----------------------------|-----------|--------|
//! | squashfs zstd-19, 128 KiB   | 80.8 MiB  | 215 s  |
//! | squashfs zstd-15, 128 KiB   | 81.4 MiB  |  99 s  |
//! | squashfs zstd-19, 1 MiB     | 75.3 MiB  | 272 s  |
//! | squashfs xz, 128 KiB        | 74.0 MiB  | 112 s  |
//! | erofs lz4hc-12              | 129.9 MiB |  17 s  |
//! | erofs lz4                   | 143.9 MiB |   1 s  |
//!
//! EROFS is much faster to build but 60% larger with the only compressors the host's
//! erofs-utils 1.5 offers (lz4, lz4hc); the image is what updates download, so size wins.
//! zstd-19 buys 0.7% over level 15 for twice the time. `PLINTH_ROOT_FS=erofs` selects EROFS.
//! `plinth-init` tells the two apart by their magic (`hsqs` at byte 0, `0xE0F5E1E2` at 1024).
//!
//! `plinth build --zstd-level` trades size for time on development builds: on the 382 MiB tree of
//! the Jetty example, level 15 took 50.4 s for 128.5 MiB, level 6 4.3 s for 136.6 MiB, level 3
//! 1.7 s for 143.8 MiB (12% larger). The QEMU tests build their images at level 3.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::tools::{self, Tool};

/// `mkfs.erofs`, the EROFS image writer.
pub const MKFS_EROFS: Tool = Tool {
    program: "mkfs.erofs",
    package: "erofs-utils",
};

/// Filesystem of the root image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootFormat {
    Squashfs,
    Erofs,
}

impl RootFormat {
    /// The format chosen by `PLINTH_ROOT_FS` (`squashfs` or `erofs`), squashfs when unset.
    pub fn from_env() -> Result<RootFormat> {
        match std::env::var("PLINTH_ROOT_FS").as_deref() {
            Err(_) | Ok("") | Ok("squashfs") => Ok(RootFormat::Squashfs),
            Ok("erofs") => Ok(RootFormat::Erofs),
            Ok(other) => {
                bail!("PLINTH_ROOT_FS=`{other}` is not a root filesystem: use squashfs or erofs")
            }
        }
    }

    /// The host tool that writes this format.
    pub fn tool(self) -> Tool {
        match self {
            RootFormat::Squashfs => tools::MKSQUASHFS,
            RootFormat::Erofs => MKFS_EROFS,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RootFormat::Squashfs => "squashfs",
            RootFormat::Erofs => "erofs",
        }
    }
}

/// The zstd level of a squashfs root unless the build names another (`plinth build --zstd-level`).
pub const DEFAULT_ZSTD_LEVEL: u32 = 15;

/// The zstd levels `mksquashfs` takes.
pub const ZSTD_LEVELS: std::ops::RangeInclusive<u32> = 1..=22;

/// The `mksquashfs` options of every squashfs root image (after the tree and the output; the
/// build adds the zstd level and its timestamps). Public so that benchmarks compare against the
/// same settings.
pub const SQUASHFS_OPTIONS: &[&str] = &[
    "-noappend",
    "-comp",
    "zstd",
    "-b",
    "131072",
    "-all-root",
    "-no-xattrs",
    "-no-exports",
    "-quiet",
    "-no-progress",
];

/// Writes the root image of `tree` to `out` (replacing it) and returns its size, a multiple of
/// 4096. `uuid` is the filesystem UUID where the format has one (EROFS); `zstd_level` is the
/// squashfs compression level ([`DEFAULT_ZSTD_LEVEL`] when `None`; EROFS takes none).
pub fn build(
    format: RootFormat,
    tree: &Path,
    out: &Path,
    epoch: u64,
    uuid: &uuid::Uuid,
    zstd_level: Option<u32>,
) -> Result<u64> {
    if !tree.is_dir() {
        bail!("root tree {} is not a folder", tree.display());
    }
    let level = zstd_level.unwrap_or(DEFAULT_ZSTD_LEVEL);
    if !ZSTD_LEVELS.contains(&level) {
        bail!(
            "zstd level {level} is out of range: use {} to {}",
            ZSTD_LEVELS.start(),
            ZSTD_LEVELS.end()
        );
    }
    if format == RootFormat::Erofs && zstd_level.is_some() {
        bail!("a zstd level applies to squashfs roots only: PLINTH_ROOT_FS=erofs compresses with lz4hc");
    }
    let program = format.tool().find()?;
    let epoch = epoch.to_string();
    let mut cmd = Command::new(&program);
    match format {
        RootFormat::Squashfs => {
            cmd.arg(tree).arg(out).args(SQUASHFS_OPTIONS).args([
                "-Xcompression-level",
                &level.to_string(),
                "-mkfs-time",
                &epoch,
                "-all-time",
                &epoch,
            ]);
        }
        RootFormat::Erofs => {
            let _ = std::fs::remove_file(out);
            cmd.args(["-zlz4hc,12", "-x", "-1", "--all-root", "--quiet"])
                .arg(format!("-T{epoch}"))
                .arg(format!("-U{uuid}"))
                .arg(out)
                .arg(tree);
        }
    }
    let output = cmd
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}) writing {} from {}: {}",
            format.tool().program,
            output.status,
            out.display(),
            tree.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(out)
        .with_context(|| format!("opening root image {}", out.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("reading size of {}", out.display()))?
        .len();
    let padded = len.div_ceil(4096) * 4096;
    if padded != len {
        file.set_len(padded)
            .with_context(|| format!("padding root image {}", out.display()))?;
    }
    Ok(padded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(dir: &Path) -> std::path::PathBuf {
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("usr/bin")).expect("mkdir");
        std::fs::write(tree.join("usr/bin/hello"), "hello\n".repeat(1000)).expect("write");
        std::fs::write(tree.join("etc-os-release"), "ID=plinth\n").expect("write");
        tree
    }

    #[test]
    fn both_formats_are_reproducible_and_block_aligned() {
        let dir = tempfile::tempdir().expect("temp dir");
        let tree = tree(dir.path());
        let uuid = uuid::Uuid::from_bytes([7; 16]);
        for format in [RootFormat::Squashfs, RootFormat::Erofs] {
            let (a, b) = (dir.path().join("a"), dir.path().join("b"));
            let size = build(format, &tree, &a, 1_700_000_000, &uuid, None).expect("image builds");
            // A later mtime on the tree must not change the image.
            std::fs::write(tree.join("usr/bin/hello"), "hello\n".repeat(1000)).expect("touch");
            build(format, &tree, &b, 1_700_000_000, &uuid, None).expect("image builds");
            assert_eq!(size % 4096, 0, "{format:?}");
            assert!(
                std::fs::read(&a).expect("read") == std::fs::read(&b).expect("read"),
                "{format:?} image differs between builds"
            );
        }
    }

    #[test]
    fn missing_tree_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = build(
            RootFormat::Squashfs,
            &dir.path().join("nope"),
            &dir.path().join("out"),
            0,
            &uuid::Uuid::nil(),
            None,
        )
        .expect_err("no tree");
        assert!(err.to_string().contains("is not a folder"), "{err}");
    }

    #[test]
    fn a_zstd_level_sets_the_squashfs_compression_and_is_checked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let tree = tree(dir.path());
        let uuid = uuid::Uuid::nil();
        let at = |level: Option<u32>, name: &str| {
            let out = dir.path().join(name);
            build(RootFormat::Squashfs, &tree, &out, 0, &uuid, level).map(|_| out)
        };
        let (fast, default) = (
            at(Some(1), "fast").expect("level 1"),
            at(None, "default").expect("default level"),
        );
        assert_ne!(
            std::fs::read(fast).expect("read"),
            std::fs::read(default).expect("read"),
            "level 1 wrote the same image as level 15"
        );
        for bad in [0, 23] {
            let err = at(Some(bad), "bad").expect_err("out of range");
            assert!(err.to_string().contains("use 1 to 22"), "{err}");
        }
        let err = build(
            RootFormat::Erofs,
            &tree,
            &dir.path().join("e"),
            0,
            &uuid,
            Some(3),
        )
        .expect_err("EROFS takes no zstd level");
        assert!(err.to_string().contains("squashfs roots only"), "{err}");
    }
}
