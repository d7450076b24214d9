//! The image's size by component (kernel, initramfs, modules, engine, Plinth's programs,
//! container images, shared libraries, the rest): what `plinth build` prints at its end and
//! writes to `<image>.size-report.json`, and what `plinth inspect` reads back.
//!
//! Uncompressed sizes are exact. What a component takes in the compressed root image is
//! estimated cheaply: each file is compressed in squashfs-sized blocks with fast zstd (a block
//! that does not shrink is counted raw, as squashfs stores it), and the estimates are scaled so
//! that together they equal the real size of the root image. The kernel and the initramfs sit
//! on the ESP as they are.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Block size of the squashfs root (`-b 131072` in [`crate::disk::rootimage::SQUASHFS_OPTIONS`]).
const BLOCK: usize = 128 << 10;
/// zstd level of the estimate: fast; the scaling to the real image size corrects its ratio.
const ESTIMATE_LEVEL: i32 = 3;

/// How compressed sizes were found; written into the report.
pub const METHOD: &str = "root image components: each file compressed in 128 KiB blocks with zstd \
level 3 (incompressible blocks raw), scaled so that they sum to the real root image size; kernel \
and initramfs: their size on the ESP";

/// The size report of one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizeReport {
    /// Root hash of the image's slot A, so a reader can tell the report belongs to a disk.
    pub root_hash: String,
    /// Bytes of the compressed root filesystem image.
    pub root_image: u64,
    /// How `compressed` was found.
    pub method: String,
    pub components: Vec<Component>,
}

/// One component of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    pub name: String,
    pub files: u64,
    /// Bytes of its files.
    pub bytes: u64,
    /// Bytes it takes in the image (estimated inside the root image, see [`METHOD`]).
    pub compressed: u64,
}

/// Components of the root tree, in report order, each with the path prefixes (relative to the
/// root) of its files. A file belongs to the first component one of whose prefixes it has.
fn root_components(kernel_version: &str) -> Vec<(&'static str, Vec<String>)> {
    let mut engine: Vec<String> = crate::rootfs::DOCKER_EXECUTABLES
        .iter()
        .flat_map(|exe| [format!("usr/bin/{exe}"), format!("usr/sbin/{exe}")])
        .collect();
    engine.push(format!("{}/", crate::rootfs::XTABLES_DIR));
    vec![
        (
            "modules",
            vec![format!("usr/lib/modules/{kernel_version}/")],
        ),
        ("engine", engine),
        ("plinth-init", vec!["usr/bin/plinth-init".to_owned()]),
        ("plinth-update", vec!["usr/bin/plinth-update".to_owned()]),
        (
            "container-images",
            vec![format!("{}/", os_config::rootfs::IMAGE_ARCHIVES)],
        ),
        (
            "shared-libraries",
            vec![
                "usr/lib/x86_64-linux-gnu/".to_owned(),
                "usr/lib64/".to_owned(),
            ],
        ),
        ("rest", vec![String::new()]),
    ]
}

/// Measures `tree` (the root tree that became `root_image` bytes) and adds the kernel and the
/// initramfs as they are on the ESP.
pub fn measure(
    tree: &Path,
    kernel_version: &str,
    kernel_size: u64,
    initrd_size: u64,
    root_image: u64,
    root_hash: &str,
) -> Result<SizeReport> {
    let components = root_components(kernel_version);
    // name → (files, bytes, estimate)
    let mut sums: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
    let mut files = Vec::new();
    collect_files(tree, PathBuf::new(), &mut files)?;
    let mut buffer = vec![0u8; BLOCK];
    for rel in files {
        let text = rel.to_string_lossy();
        let Some((name, _)) = components
            .iter()
            .find(|(_, prefixes)| prefixes.iter().any(|p| text.starts_with(p.as_str())))
        else {
            continue;
        };
        let (bytes, estimate) = estimate_file(&tree.join(&rel), &mut buffer)?;
        let sum = sums.entry(name).or_default();
        sum.0 += 1;
        sum.1 += bytes;
        sum.2 += estimate;
    }
    let estimated: u64 = sums.values().map(|s| s.2).sum();
    let mut report = SizeReport {
        root_hash: root_hash.to_owned(),
        root_image,
        method: METHOD.to_owned(),
        components: vec![
            Component {
                name: "kernel".into(),
                files: 1,
                bytes: kernel_size,
                compressed: kernel_size,
            },
            Component {
                name: "initramfs".into(),
                files: 1,
                bytes: initrd_size,
                compressed: initrd_size,
            },
        ],
    };
    for (name, _) in &components {
        let (files, bytes, estimate) = sums.get(name).copied().unwrap_or_default();
        let scaled = if estimated == 0 {
            0
        } else {
            u64::try_from(u128::from(estimate) * u128::from(root_image) / u128::from(estimated))
                .unwrap_or(u64::MAX)
        };
        report.components.push(Component {
            name: (*name).to_owned(),
            files,
            bytes,
            compressed: scaled,
        });
    }
    Ok(report)
}

/// Every regular file below `dir`, relative to the tree root; symbolic links are not counted.
fn collect_files(root: &Path, rel: PathBuf, out: &mut Vec<PathBuf>) -> Result<()> {
    let dir = root.join(&rel);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading directory {}", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading directory {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let kind = entry
            .file_type()
            .with_context(|| format!("reading {}", entry.path().display()))?;
        let child = rel.join(entry.file_name());
        if kind.is_dir() {
            collect_files(root, child, out)?;
        } else if kind.is_file() {
            out.push(child);
        }
    }
    Ok(())
}

/// A file's size and its estimated compressed size (squashfs-sized blocks, each compressed
/// alone and stored raw where that is smaller).
fn estimate_file(path: &Path, buffer: &mut [u8]) -> Result<(u64, u64)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut bytes = 0u64;
    let mut estimate = 0u64;
    loop {
        let mut filled = 0;
        while filled < buffer.len() {
            let n = file
                .read(&mut buffer[filled..])
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        let block = &buffer[..filled];
        let compressed = zstd::bulk::compress(block, ESTIMATE_LEVEL)
            .with_context(|| format!("compressing {}", path.display()))?;
        bytes += filled as u64;
        estimate += compressed.len().min(filled) as u64;
        if filled < buffer.len() {
            break;
        }
    }
    Ok((bytes, estimate))
}

impl SizeReport {
    /// Where the report of the disk image `raw` (`NAME-VERSION.raw`) is written:
    /// `NAME-VERSION.size-report.json` beside it; also found from the other formats' files.
    pub fn path_for(disk: &Path) -> PathBuf {
        disk.with_extension("size-report.json")
    }

    /// Writes the report as JSON to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).context("formatting the size report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// Reads the report beside `disk`, if there is one.
    pub fn read_beside(disk: &Path) -> Result<Option<SizeReport>> {
        let path = SizeReport::path_for(disk);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .with_context(|| format!("parsing {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The report as a table: one line per component, then the total.
    pub fn format_text(&self) -> String {
        use crate::disk::human;
        let mut out = format!(
            "  {:<17} {:>6} {:>11} {:>11}\n",
            "component", "files", "size", "in image"
        );
        let (mut bytes, mut compressed) = (0u64, 0u64);
        for c in &self.components {
            bytes += c.bytes;
            compressed += c.compressed;
            out.push_str(&format!(
                "  {:<17} {:>6} {:>11} {:>11}\n",
                c.name,
                c.files,
                human(c.bytes),
                human(c.compressed)
            ));
        }
        out.push_str(&format!(
            "  {:<17} {:>6} {:>11} {:>11}\n",
            "total",
            "",
            human(bytes),
            human(compressed)
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_components_and_scales_to_the_root_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("root");
        let write = |rel: &str, data: &[u8]| {
            let path = tree.join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, data).expect("write");
        };
        let text = b"plinth ".repeat(40_000); // 280 kB, compresses well
        let noise: Vec<u8> = (0u32..300_000)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        write("usr/lib/modules/6.1.0-9/kernel/a.ko", &text);
        write("usr/sbin/dockerd", &noise);
        write("usr/bin/plinth-init", b"init");
        write("usr/lib/plinth/images/web.tar", &text[..1000]);
        write("usr/lib/x86_64-linux-gnu/libc.so.6", b"libc");
        write("etc/os-release", b"ID=plinth\n");
        std::os::unix::fs::symlink("plinth-init", tree.join("usr/bin/link")).expect("symlink");
        let report = measure(&tree, "6.1.0-9", 5000, 777, 400_000, "ab").expect("measure");
        let get = |name: &str| {
            report
                .components
                .iter()
                .find(|c| c.name == name)
                .unwrap_or_else(|| panic!("{name} missing"))
                .clone()
        };
        assert_eq!(get("kernel").bytes, 5000);
        assert_eq!(get("initramfs").compressed, 777);
        assert_eq!(get("modules").bytes, 280_000);
        assert_eq!(get("engine").bytes, 300_000);
        assert_eq!((get("plinth-init").files, get("plinth-init").bytes), (1, 4));
        assert_eq!(get("plinth-update").files, 0);
        assert_eq!(get("container-images").bytes, 1000);
        assert_eq!(get("shared-libraries").bytes, 4);
        assert_eq!((get("rest").files, get("rest").bytes), (1, 10));
        // Noise does not shrink, text does; the root image's components add up to its size.
        assert!(get("engine").compressed > 10 * get("modules").compressed);
        let inside: u64 = report.components[2..].iter().map(|c| c.compressed).sum();
        assert!((399_990..=400_000).contains(&inside), "{inside}");

        let path = SizeReport::path_for(&dir.path().join("demo-1.0.raw"));
        assert!(path.ends_with("demo-1.0.size-report.json"));
        assert_eq!(
            SizeReport::read_beside(&dir.path().join("demo-1.0.raw")).expect("none"),
            None
        );
        report.write(&path).expect("write");
        let back = SizeReport::read_beside(&dir.path().join("demo-1.0.qcow2"))
            .expect("read")
            .expect("present");
        assert_eq!(back, report);
        let table = report.format_text();
        assert!(table.contains("modules"), "{table}");
        assert!(
            table.lines().last().is_some_and(|l| l.contains("total")),
            "{table}"
        );
    }
}
