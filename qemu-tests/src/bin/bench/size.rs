//! The size part: the image and its update payload against the packages it is made from, the
//! shipped binaries, the image by component, and the bytes a one-file update adds to a release
//! folder.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use os_config::boot::Entry;
use os_config::layout::Slot;
use sha2::{Digest, Sha256};

use crate::build::{tree_list, Built};
use crate::stats::Row;
use crate::util::{dir_bytes, lock_bytes, part, partitions, say, sh};

/// The components the image's size is split into, in the table's order.
pub const COMPONENTS: [&str; 8] = [
    "kernel",
    "initramfs",
    "modules",
    "engine",
    "init",
    "agent",
    "container images",
    "rest",
];

/// The packages whose files count as the engine's (the builder's engine packages for Docker).
pub const ENGINE_PACKAGES: [&str; 5] = ["docker.io", "containerd", "runc", "tini", "iptables"];

/// The component a path of the root tree (relative, merged-/usr) belongs to; `engine` holds the
/// paths the engine packages ship. The kernel and initramfs are not in the tree (they are on the
/// ESP) and are counted from there.
pub fn component_of(path: &str, engine: &BTreeSet<String>) -> &'static str {
    let images = format!("{}/", os_config::rootfs::IMAGE_ARCHIVES);
    if path.starts_with("usr/lib/modules/") {
        "modules"
    } else if path == "usr/bin/plinth-init" {
        "init"
    } else if path == "usr/bin/plinth-update" {
        "agent"
    } else if path.starts_with(&images) {
        "container images"
    } else if engine.contains(path) {
        "engine"
    } else {
        "rest"
    }
}

/// A path as `tar -t` lists it in a package's data archive, as it lands in the merged-/usr tree.
pub fn tree_path(listed: &str) -> Option<String> {
    let p = listed.trim_start_matches("./").trim_end_matches('/');
    (!p.is_empty() && p != ".").then(|| os_config::rootfs::merge_usr(p))
}

/// Bytes of `zstd -19` over the given files concatenated.
pub fn zstd_bytes(files: Vec<PathBuf>) -> Result<u64> {
    let mut child = Command::new("zstd")
        .args(["-19", "-T0", "-q", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running zstd")?;
    let mut stdin = child.stdin.take().context("zstd stdin")?;
    let writer = std::thread::spawn(move || -> Result<()> {
        for f in &files {
            let mut from =
                std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
            std::io::copy(&mut from, &mut stdin)
                .with_context(|| format!("compressing {}", f.display()))?;
        }
        stdin.flush()?;
        Ok(())
    });
    let mut stdout = child.stdout.take().context("zstd stdout")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut compressed = 0u64;
    loop {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            break;
        }
        compressed += n as u64;
    }
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the zstd writer thread panicked"))??;
    if !child.wait()?.success() {
        bail!("zstd -19 failed");
    }
    Ok(compressed)
}

/// The paths the engine packages put into a merged-/usr tree, from the lock's cached packages.
fn engine_paths(debs: &[(String, PathBuf)]) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for (name, deb) in debs
        .iter()
        .filter(|(n, _)| ENGINE_PACKAGES.contains(&n.as_str()))
    {
        let listing = sh(&format!(
            "dpkg-deb --fsys-tarfile '{}' | tar -t",
            deb.display()
        ))
        .with_context(|| format!("listing {name}"))?;
        out.extend(listing.lines().filter_map(tree_path));
    }
    Ok(out)
}

/// Rows: every component's file bytes and the `zstd -19` of its files concatenated.
fn component_rows(dir: &Path, built: &Built, rows: &mut Vec<Row>) -> Result<()> {
    say("image size by component (zstd -19 of each component's files)");
    let debs = crate::build::cached_debs(&dir.join("bench.lock"))?;
    let engine = engine_paths(&debs)?;
    let mut files: BTreeMap<&str, Vec<PathBuf>> = BTreeMap::new();
    let esp = dir.join("esp-files");
    files.insert(
        "kernel",
        vec![esp.join(Entry::kernel_path(Slot::A).trim_start_matches('/'))],
    );
    files.insert(
        "initramfs",
        vec![esp.join(Entry::initrd_path(Slot::A).trim_start_matches('/'))],
    );
    for rel in tree_list(&built.tree)? {
        let path = built.tree.join(&rel);
        if std::fs::symlink_metadata(&path)?.is_file() {
            files
                .entry(component_of(&rel, &engine))
                .or_default()
                .push(path);
        }
    }
    for name in COMPONENTS {
        let list = files.remove(name).unwrap_or_default();
        let mut bytes = 0;
        for f in &list {
            bytes += std::fs::metadata(f)?.len();
        }
        let count = list.len();
        let compressed = zstd_bytes(list)?;
        rows.push(Row::single(
            &format!(
                "Image by component: {name} ({count} file{}), file bytes",
                if count == 1 { "" } else { "s" }
            ),
            "bytes",
            "-",
            bytes as f64,
        ));
        rows.push(Row::single(
            &format!("Image by component: {name}, zstd -19 of its files"),
            "bytes",
            "-",
            compressed as f64,
        ));
    }
    Ok(())
}

/// Every file of a folder, relative, with its size and sha256.
fn folder_files(dir: &Path) -> Result<BTreeMap<String, (u64, [u8; 32])>> {
    let mut out = BTreeMap::new();
    for rel in tree_list(dir)? {
        let path = dir.join(&rel);
        if std::fs::symlink_metadata(&path)?.is_file() {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            out.insert(rel, (bytes.len() as u64, Sha256::digest(&bytes).into()));
        }
    }
    Ok(out)
}

/// Bytes of the files in `after` that `before` did not hold with the same content.
pub fn new_bytes(
    before: &BTreeMap<String, (u64, [u8; 32])>,
    after: &BTreeMap<String, (u64, [u8; 32])>,
) -> u64 {
    after
        .iter()
        .filter(|(path, file)| before.get(*path) != Some(file))
        .map(|(_, (size, _))| size)
        .sum()
}

fn publish(def: &Path, disk: &Path, key: &Path, to: &Path) -> Result<()> {
    builder::publish::publish(&builder::publish::Options {
        file: def.to_path_buf(),
        key: key.to_path_buf(),
        to: to.to_path_buf(),
        disk: Some(disk.to_path_buf()),
        rollout: None,
        expires: Default::default(),
    })
}

/// The delta update: `plinth publish` of the build and then of the rebuild (one `[[file]]`
/// changed, version 1.0.1) into one folder; the bytes the second publish added (new files or
/// files whose content changed) against the second release published alone. Whatever the
/// publish format (whole artifacts, or a chunk store where unchanged chunks are shared), this is
/// what a release server must add, and a client fetch at most, for the one-file update.
pub fn delta_rows(dir: &Path, built: &Built, rows: &mut Vec<Row>) -> Result<()> {
    let Some((def2, disk2)) = &built.rebuilt else {
        eprintln!("no rebuild in this run (include `build` in BENCH_ONLY): no delta update row");
        return Ok(());
    };
    say("delta update: plinth publish of 1.0.0, then of 1.0.1 (one [[file]] changed)");
    let key = dir.join("bench-key.key");
    let both = dir.join("delta-release");
    let alone = dir.join("delta-alone");
    for d in [&both, &alone] {
        if d.exists() {
            std::fs::remove_dir_all(d)?;
        }
    }
    publish(&built.def, &built.disk, &key, &both)?;
    let before = folder_files(&both)?;
    publish(def2, disk2, &key, &both)?;
    let after = folder_files(&both)?;
    publish(def2, disk2, &key, &alone)?;
    let manifests = release_manifests(&both)?;
    let (Some(old), Some(new)) = (manifests.first(), manifests.last()) else {
        bail!("{} holds no manifests", both.display());
    };
    let full: u64 = new.artifacts.named().iter().map(|(_, a)| a.size).sum();
    let index = |m: &os_config::manifest::Manifest| -> Result<os_config::chunk::ChunkIndex> {
        let file = m
            .root_chunks
            .as_ref()
            .with_context(|| format!("release {} has no chunk index", m.version))?;
        let bytes = std::fs::read(both.join(&file.path))?;
        os_config::chunk::ChunkIndex::parse(&bytes).map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    let download = delta_download(old, &index(old)?, new, &index(new)?);
    rows.push(Row::single(
        "Delta update: bytes the agent downloads for a release with one [[file]] changed",
        "bytes",
        "the full update payload (root, verity, kernel and initramfs artifacts)",
        download as f64,
    ));
    if let Some(r) = rows.last_mut() {
        r.push(
            crate::stats::Side::Baseline,
            full as f64,
            crate::stats::load_now(),
        );
    }
    rows.push(Row {
        baseline_name: "the same release published alone (whole release folder)".to_owned(),
        baseline: vec![dir_bytes(&alone)? as f64],
        baseline_load: vec![crate::stats::load_now()],
        ..Row::single(
            "Delta update: bytes added to the release folder by a release with one [[file]] changed",
            "bytes",
            "",
            new_bytes(&before, &after) as f64,
        )
    });
    Ok(())
}

/// The manifests of every version in a release folder (`CHANNEL/VERSION/manifest.json`), oldest
/// version first.
fn release_manifests(dir: &Path) -> Result<Vec<os_config::manifest::Manifest>> {
    let mut out = Vec::new();
    for rel in tree_list(dir)? {
        if rel.matches('/').count() == 2 && rel.ends_with(os_config::manifest::MANIFEST_FILE) {
            let bytes = std::fs::read(dir.join(&rel))?;
            out.push(
                os_config::manifest::Manifest::parse(&bytes)
                    .map_err(|e| anyhow::anyhow!("{rel}: {e:?}"))?,
            );
        }
    }
    out.sort_by_key(|m| m.version.to_string());
    Ok(out)
}

/// What the agent running `old` downloads to update to `new`: the chunk index, each distinct
/// chunk of the new root that the old root lacks (compressed), the verity tree, and the kernel and
/// initramfs unless the running slot already has the same ones.
pub fn delta_download(
    old: &os_config::manifest::Manifest,
    old_index: &os_config::chunk::ChunkIndex,
    new: &os_config::manifest::Manifest,
    new_index: &os_config::chunk::ChunkIndex,
) -> u64 {
    let held: BTreeSet<[u8; 32]> = old_index.chunks.iter().map(|c| c.sha256).collect();
    let mut fetched = BTreeSet::new();
    let mut bytes = new.root_chunks.as_ref().map_or(0, |f| f.size);
    for chunk in &new_index.chunks {
        if !held.contains(&chunk.sha256) && fetched.insert(chunk.sha256) {
            bytes += u64::from(chunk.compressed_length);
        }
    }
    bytes += new.artifacts.verity.size;
    for (same, artifact) in [
        (
            old.artifacts.kernel.uncompressed_sha256 == new.artifacts.kernel.uncompressed_sha256,
            &new.artifacts.kernel,
        ),
        (
            old.artifacts.initrd.uncompressed_sha256 == new.artifacts.initrd.uncompressed_sha256,
            &new.artifacts.initrd,
        ),
    ] {
        if !same {
            bytes += artifact.size;
        }
    }
    bytes
}

pub fn bench_size(dir: &Path, built: &Built, rows: &mut Vec<Row>) -> Result<()> {
    let packages = lock_bytes(&dir.join("bench.lock"))? as f64;
    let base = "the .deb packages of the lock (sum of sizes)";
    let meta = std::fs::metadata(&built.disk)?;
    let mut row = |name: &str, value: f64| {
        let mut r = Row::single(name, "bytes", base, value);
        r.push(
            crate::stats::Side::Baseline,
            packages,
            crate::stats::load_now(),
        );
        rows.push(r);
    };
    row(
        "Disk image, allocated (sparse)",
        (meta.blocks() * 512) as f64,
    );
    say("zstd -19 of the disk image");
    row(
        "Disk image, zstd -19",
        zstd_bytes(vec![built.disk.clone()])? as f64,
    );
    let parts = partitions(&built.disk)?;
    let root = part(&parts, "root-a")?;
    let mut file = std::fs::File::open(&built.disk)?;
    let mut sb = [0u8; 48];
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(root.start))?;
    file.read_exact(&mut sb)?;
    if &sb[..4] != b"hsqs" {
        bail!(
            "root-a of {} does not hold a squashfs",
            built.disk.display()
        );
    }
    let mut used = [0u8; 8];
    used.copy_from_slice(&sb[40..48]);
    row("Root image (squashfs)", u64::from_le_bytes(used) as f64);
    let initrd = dir
        .join("esp-files")
        .join(Entry::initrd_path(Slot::A).trim_start_matches('/'));
    row("Initramfs", std::fs::metadata(&initrd)?.len() as f64);

    say("plinth publish");
    let release = dir.join("release");
    if release.exists() {
        std::fs::remove_dir_all(&release)?;
    }
    publish(
        &built.def,
        &built.disk,
        &dir.join("bench-key.key"),
        &release,
    )?;
    row(
        "Update payload (plinth publish folder)",
        dir_bytes(&release)? as f64,
    );

    // The binaries as shipped: the files in the image's tree.
    let size_of = |rel: &str| -> Result<f64> {
        let p = built.tree.join(rel);
        Ok(std::fs::metadata(&p)
            .with_context(|| format!("reading the size of {}", p.display()))?
            .len() as f64)
    };
    let busybox = crate::boot::find_busybox(&built.tree)?;
    let mut init = Row::single(
        "File size: plinth-init (static, as shipped)",
        "bytes",
        "busybox (static, busybox-static), the boot baseline's PID 1",
        size_of("usr/bin/plinth-init")?,
    );
    init.push(
        crate::stats::Side::Baseline,
        std::fs::metadata(&busybox)?.len() as f64,
        crate::stats::load_now(),
    );
    rows.push(init);
    rows.push(Row::single(
        "File size: plinth-update (static, as shipped)",
        "bytes",
        "-",
        size_of("usr/bin/plinth-update")?,
    ));
    component_rows(dir, built, rows)?;
    delta_rows(dir, built, rows)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_fall_into_their_component() {
        let engine: BTreeSet<String> = ["usr/bin/dockerd".to_owned()].into();
        for (path, want) in [
            ("usr/lib/modules/6.1.0/kernel/fs/overlay.ko", "modules"),
            ("usr/bin/plinth-init", "init"),
            ("usr/bin/plinth-update", "agent"),
            ("usr/lib/plinth/images/web.tar", "container images"),
            ("usr/bin/dockerd", "engine"),
            ("usr/lib/x86_64-linux-gnu/libc.so.6", "rest"),
            ("usr/bin/plinth-init2", "rest"),
        ] {
            assert_eq!(component_of(path, &engine), want, "{path}");
        }
    }

    #[test]
    fn listed_paths_map_to_merged_usr() {
        assert_eq!(
            tree_path("./sbin/xtables-nft-multi").as_deref(),
            Some("usr/sbin/xtables-nft-multi")
        );
        assert_eq!(tree_path("./usr/bin/").as_deref(), Some("usr/bin"));
        assert_eq!(tree_path("./"), None);
    }

    #[test]
    fn zstd_bytes_compresses_the_files_concatenated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        std::fs::write(&a, vec![0u8; 1 << 20]).expect("write");
        let one = zstd_bytes(vec![a.clone()]).expect("zstd");
        assert!(one > 0 && one < 1024, "1 MiB of zeros gave {one} bytes");
        // The same file twice is one stream, so barely larger than once.
        let two = zstd_bytes(vec![a.clone(), a]).expect("zstd");
        assert!(two >= one && two < one + 64, "{one} then {two}");
        assert!(zstd_bytes(vec![dir.path().join("missing")]).is_err());
    }

    #[test]
    fn new_bytes_counts_new_and_changed_files_only() {
        let f = |size: u64, b: u8| (size, [b; 32]);
        let before: BTreeMap<String, _> =
            [("a".to_owned(), f(10, 1)), ("b".to_owned(), f(20, 2))].into();
        let after: BTreeMap<String, _> = [
            ("a".to_owned(), f(10, 1)),
            ("b".to_owned(), f(21, 3)),
            ("c".to_owned(), f(5, 4)),
        ]
        .into();
        assert_eq!(new_bytes(&before, &after), 26);
        assert_eq!(new_bytes(&after, &after), 0);
    }
}
