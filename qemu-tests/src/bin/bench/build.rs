//! The build part: our build against the standard tools doing the same work (unpacking the same
//! packages, copying the same files, making the same images), run alternately with the page
//! cache dropped before each run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::stats::{interleaved, load_now, Row, Side};
use crate::util::{part, partitions, run, say, sh};

/// The `/etc/motd` text of `images/qemu.toml`.
pub const MOTD: &str = "Plinth: a minimal container OS.\n";

/// How a benchmark definition differs from `images/qemu.toml`.
#[derive(Debug, Clone)]
pub struct Variant<'a> {
    /// The `content` of the one declared `[[file]]`, `/etc/motd`.
    pub motd: &'a str,
    /// `[image] version`.
    pub version: &'a str,
    /// Extra `[debian] packages`; with any, the lock is made by `plinth lock` instead of copied.
    pub packages: &'a [String],
}

impl Variant<'_> {
    /// `images/qemu.toml` as it is.
    pub const DEFAULT: Variant<'static> = Variant {
        motd: MOTD,
        version: "1.0.0",
        packages: &[],
    };
}

/// Writes `<dir>/<name>.toml`: the default image definition with the engine also on TCP 2375
/// (for the guest measurements), an `[update]` table, and `variant`'s changes; and its lock
/// `<dir>/<name>.lock`, a copy of `images/qemu.lock` or, with extra packages, made by
/// `plinth lock` (network required).
pub fn write_definition(dir: &Path, name: &str, variant: &Variant) -> Result<PathBuf> {
    let ws = qemu_tests::image::workspace();
    let source = ws.join("images/qemu.toml");
    let text = std::fs::read_to_string(&source)
        .with_context(|| format!("reading {}", source.display()))?;
    let mut text = text;
    for (old, new) in [
        (
            "content = \"Plinth: a minimal container OS.\\n\"".to_owned(),
            format!("content = {:?}", variant.motd),
        ),
        (
            "version = \"1.0.0\"".to_owned(),
            format!("version = {:?}", variant.version),
        ),
        (
            "suite = \"bookworm\"".to_owned(),
            format!(
                "suite = \"bookworm\"\npackages = {}",
                serde_json::to_string(variant.packages)?
            ),
        ),
    ] {
        if !text.contains(&old) {
            bail!(
                "{} no longer has `{old}`: update the benchmark's write_definition",
                source.display()
            );
        }
        text = text.replacen(&old, &new, 1);
    }
    let key = dir.join("bench-key");
    if !key.with_extension("pub").is_file() {
        builder::publish::write_keypair(&key)?;
    }
    let public = std::fs::read_to_string(key.with_extension("pub"))
        .context("reading the benchmark's public key")?;
    // The engine also on TCP for the guest measurements, and an update source that never
    // answers, so the update agent runs (and can be measured) as on a real machine.
    let text = format!(
        "{text}\n[engine]\nsettings = {{ hosts = [\"unix:///run/docker.sock\", \"tcp://0.0.0.0:2375\"] }}\ninsecure-tcp = true\n\n[update]\nurl = \"http://10.0.2.2:9/releases\"\nkeys = [{:?}]\ninterval = \"1h\"\n",
        public.trim()
    );
    let def = dir.join(format!("{name}.toml"));
    std::fs::write(&def, text).with_context(|| format!("writing {}", def.display()))?;
    builder::build::load_definition(&def)?;
    let lock = builder::debian::lock::lock_path(&def);
    if variant.packages.is_empty() {
        std::fs::copy(ws.join("images/qemu.lock"), &lock)
            .with_context(|| format!("copying images/qemu.lock to {}", lock.display()))?;
    } else {
        builder::debian::lock_command(&builder::debian::LockOptions {
            file: def.clone(),
            update: false,
            cache: builder::cache::Options::default(),
        })
        .with_context(|| format!("locking {}", def.display()))?;
    }
    Ok(def)
}

pub fn build_args(
    def: &Path,
    out: &Path,
    keep: Option<&Path>,
    cache: Option<&Path>,
) -> Result<builder::build::Options> {
    Ok(builder::build::Options {
        file: def.to_path_buf(),
        output: out.to_path_buf(),
        format: vec!["raw".to_owned()],
        init: Some(qemu_tests::image::init_binary()?),
        keep_tree: keep.map(Path::to_path_buf),
        cache: builder::cache::Options {
            dir: cache.map(Path::to_path_buf),
            offline: false,
        },
        zstd_level: None,
    })
}

/// Everything the later measurements need from the build.
pub struct Built {
    pub disk: PathBuf,
    pub tree: PathBuf,
    pub def: PathBuf,
    /// The last rebuild (one `[[file]]` changed, version 1.0.1): its definition and disk.
    pub rebuilt: Option<(PathBuf, PathBuf)>,
}

/// Writes dirty pages and drops the page cache, dentries and inodes, so every build run starts
/// from the disk; returns whether that worked (it needs root).
pub fn drop_caches() -> bool {
    sh("sync").is_ok() && std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

fn remove(path: &Path) -> Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))?;
    } else if path.exists() {
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// One timed run of our build: the old output and kept tree are removed first (untimed), so
/// every run writes into the same empty state; the time ends after `sync`, as the baseline's.
pub fn our_build(args: &builder::build::Options) -> Result<f64> {
    let def = builder::build::load_definition(&args.file)?;
    remove(
        &args
            .output
            .join(format!("{}-{}.raw", def.image.name, def.image.version)),
    )?;
    if let Some(keep) = &args.keep_tree {
        remove(keep)?;
    }
    let start = Instant::now();
    builder::build::build_image(args)?;
    sh("sync")?;
    Ok(start.elapsed().as_secs_f64())
}

/// The `.deb` files of a lock, from the package cache: (package name, path).
pub fn cached_debs(lock: &Path) -> Result<Vec<(String, PathBuf)>> {
    let text =
        std::fs::read_to_string(lock).with_context(|| format!("reading {}", lock.display()))?;
    let locked = builder::debian::lock::Lockfile::parse(&lock.display().to_string(), &text)?;
    let cache = builder::cache::Cache::open(&builder::cache::Options {
        dir: None,
        offline: true,
    })?;
    locked
        .packages
        .iter()
        .map(|p| {
            let deb = cache.lookup(&p.sha256, Some(p.size))?.with_context(|| {
                format!(
                    "{} {} of {} is not in the package cache: run the build first",
                    p.name,
                    p.version,
                    lock.display()
                )
            })?;
            Ok((p.name.clone(), deb))
        })
        .collect()
}

/// Every entry of a tree (files, links, folders), relative, sorted.
pub fn tree_list(tree: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            out.push(rel);
            if entry.file_type()?.is_dir() {
                walk(root, &path, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(tree, tree, &mut out)?;
    out.sort();
    Ok(out)
}

/// What the standard tools build from: the lock's packages, our kept tree (for its file list
/// and for the files no package holds) and our ESP's files and initramfs tree.
pub struct BaselineInputs<'a> {
    pub debs: &'a [(String, PathBuf)],
    pub tree: &'a Path,
    pub espdir: &'a Path,
    pub initrd_tree: &'a Path,
    pub ours: &'a Path,
}

/// The standard tools' build, timed in two parts: (tree assembly, image steps), seconds.
pub fn standard_build(dir: &Path, inputs: &BaselineInputs) -> Result<(f64, f64)> {
    let unpack = dir.join("standard-unpack");
    let tree = dir.join("standard-tree");
    let wanted = tree_list(inputs.tree)?;
    let start = Instant::now();
    assemble_tree(inputs.debs, &wanted, inputs.tree, &unpack, &tree)?;
    let tree_secs = start.elapsed().as_secs_f64();
    let image_secs = image_steps(dir, &tree, inputs.espdir, inputs.initrd_tree, inputs.ours)?;
    Ok((tree_secs, image_secs))
}

/// The tree as the standard tools make it: every package unpacked by `dpkg-deb --fsys-tarfile |
/// tar -x` into `unpack`, laid out merged-/usr (as ours), then `cpio -pdm` into `tree` of exactly
/// the `wanted` paths, from `unpack` where a package has them, else from `made` (what our build
/// makes itself: Plinth's programs, the definition, generated `/etc` files, the container image
/// archives). Returns how many paths came from the packages.
pub fn assemble_tree(
    debs: &[(String, PathBuf)],
    wanted: &[String],
    made: &Path,
    unpack: &Path,
    tree: &Path,
) -> Result<usize> {
    remove(unpack)?;
    remove(tree)?;
    std::fs::create_dir_all(tree)?;
    for top in os_config::rootfs::MERGED_USR_DIRS {
        std::fs::create_dir_all(unpack.join("usr").join(top))?;
        std::os::unix::fs::symlink(format!("usr/{top}"), unpack.join(top))?;
    }
    for (name, deb) in debs {
        sh(&format!(
            "dpkg-deb --fsys-tarfile '{}' | tar -x --keep-directory-symlink -C '{}'",
            deb.display(),
            unpack.display()
        ))
        .with_context(|| format!("unpacking {name}"))?;
    }
    let (from_packages, from_ours): (Vec<&String>, Vec<&String>) = wanted
        .iter()
        .partition(|p| std::fs::symlink_metadata(unpack.join(p)).is_ok());
    for (from, list) in [(unpack, &from_packages), (made, &from_ours)] {
        let mut child = Command::new("cpio")
            .args(["-pdm", "--quiet"])
            .arg(tree)
            .current_dir(from)
            .stdin(Stdio::piped())
            .spawn()
            .context("running cpio -pdm")?;
        let mut stdin = child.stdin.take().context("cpio stdin")?;
        for p in list.iter() {
            writeln!(stdin, "{p}")?;
        }
        drop(stdin);
        if !child.wait()?.success() {
            bail!(
                "cpio -pdm from {} into {} failed",
                from.display(),
                tree.display()
            );
        }
    }
    Ok(from_packages.len())
}

/// Measures the build part; returns what the later parts measure.
pub fn bench_build(dir: &Path, runs: usize, cold: bool, rows: &mut Vec<Row>) -> Result<Built> {
    let out = dir.join("out");
    let tree = dir.join("tree");
    let espdir = dir.join("esp-files");
    let initrd_tree = dir.join("initrd-tree");
    let def = write_definition(dir, "bench", &Variant::DEFAULT)?;
    // Filled after the first build, which fetches any package the cache lacks.
    let mut debs = Vec::new();
    let base_name = "standard tools: dpkg-deb + tar of the lock's packages, cpio -pdm of the same files, mksquashfs, veritysetup, cpio + zstd, mkfs.vfat + mcopy, mkfs.ext4, sfdisk + dd";
    let mut warm = Row::new("Build, warm package cache (wall)", "s", base_name);
    let mut tree_part = Row::new(
        "Build: of which tree assembly (baseline only)",
        "s",
        "dpkg-deb + tar, cpio -pdm",
    );
    let mut image_part = Row::new(
        "Build: of which image steps (baseline only; the previous benchmark's whole baseline)",
        "s",
        "mksquashfs, veritysetup, cpio + zstd, mkfs.vfat + mcopy, mkfs.ext4, sfdisk + dd",
    );
    let mut dropped = true;
    let disk = out.join("qemu-1.0.0.raw");
    let baseline = |debs: &[(String, PathBuf)], tree: &Path| -> Result<(f64, f64)> {
        let inputs = BaselineInputs {
            debs,
            tree,
            espdir: &espdir,
            initrd_tree: &initrd_tree,
            ours: &disk,
        };
        standard_build(dir, &inputs)
    };
    for (i, side) in interleaved(runs) {
        dropped &= drop_caches();
        let load = load_now();
        match side {
            Side::Ours => {
                say(&format!("warm build {}/{runs}", i + 1));
                let secs = our_build(&build_args(&def, &out, Some(&tree), None)?)?;
                warm.push(side, secs, load);
                if i == 0 {
                    debs = cached_debs(&dir.join("bench.lock"))?;
                    extract_esp(&disk, &espdir, &initrd_tree)?;
                    // The ESP's extraction read the disk: drop its pages again.
                    dropped &= drop_caches();
                }
            }
            Side::Baseline => {
                say(&format!("standard tools build {}/{runs}", i + 1));
                let (t, img) = baseline(&debs, &tree)?;
                warm.push(side, t + img, load);
                tree_part.push(side, t, load);
                image_part.push(side, img, load);
            }
        }
    }
    rows.extend([warm, tree_part, image_part]);

    let mut rebuild = Row::new(
        "Rebuild after changing one [[file]] (wall)",
        "s",
        "the same standard tools steps on the changed tree",
    );
    let rebuild_runs = runs.min(2);
    let rebuild_tree = dir.join("tree-rebuild");
    let rebuild_out = dir.join("out-rebuild");
    let mut rebuilt = None;
    for (i, side) in interleaved(rebuild_runs) {
        dropped &= drop_caches();
        let load = load_now();
        match side {
            Side::Ours => {
                say(&format!(
                    "rebuild with a changed /etc/motd {}/{rebuild_runs}",
                    i + 1
                ));
                let motd = format!("Plinth: changed {i}.\n");
                let variant = Variant {
                    motd: &motd,
                    version: "1.0.1",
                    ..Variant::DEFAULT
                };
                let def = write_definition(dir, "bench-rebuild", &variant)?;
                let secs = our_build(&build_args(&def, &rebuild_out, Some(&rebuild_tree), None)?)?;
                rebuild.push(side, secs, load);
                rebuilt = Some((def, rebuild_out.join("qemu-1.0.1.raw")));
            }
            Side::Baseline => {
                say(&format!("standard tools rebuild {}/{rebuild_runs}", i + 1));
                let (t, img) = baseline(&debs, &rebuild_tree)?;
                rebuild.push(side, t + img, load);
            }
        }
    }
    rows.push(rebuild);

    if cold {
        let mut row = Row::new(
            "Build, empty package cache (wall, downloads every package)",
            "s",
            "ours with the package cache full, run alternately",
        );
        let cold_runs = runs.min(2);
        let cold_out = dir.join("out-cold");
        for (i, side) in interleaved(cold_runs) {
            let cache = tempfile::tempdir_in(dir).context("creating an empty cache folder")?;
            dropped &= drop_caches();
            let load = load_now();
            let secs = match side {
                Side::Ours => {
                    say(&format!("cold build {}/{cold_runs} (empty package cache, downloads from the configured mirror)", i + 1));
                    our_build(&build_args(&def, &cold_out, None, Some(cache.path()))?)?
                }
                Side::Baseline => {
                    say(&format!(
                        "warm build beside the cold one {}/{cold_runs}",
                        i + 1
                    ));
                    our_build(&build_args(&def, &cold_out, None, None)?)?
                }
            };
            row.push(side, secs, load);
        }
        rows.push(row);
    }
    if !dropped {
        eprintln!(
            "warning: could not drop the page cache (not root?): build runs are not comparable"
        );
    }
    Ok(Built {
        disk,
        tree,
        def,
        rebuilt,
    })
}

/// Copies the ESP's files out of the built disk, and unpacks its initramfs.
pub fn extract_esp(disk: &Path, espdir: &Path, initrd_tree: &Path) -> Result<()> {
    let parts = partitions(disk)?;
    let esp = part(&parts, "esp")?;
    for d in [espdir, initrd_tree] {
        if d.exists() {
            std::fs::remove_dir_all(d)?;
        }
        std::fs::create_dir_all(d)?;
    }
    run(Command::new("mcopy")
        .args(["-s", "-n", "-i"])
        .arg(format!("{}@@{}", disk.display(), esp.start))
        .arg("::/*")
        .arg(espdir))?;
    let initrd = espdir.join(
        os_config::boot::Entry::initrd_path(os_config::layout::Slot::A).trim_start_matches('/'),
    );
    sh(&format!(
        "cd '{}' && zstd -dc '{}' | cpio -id --quiet",
        initrd_tree.display(),
        initrd.display()
    ))?;
    Ok(())
}

/// The build's image steps done by the standard tools alone on a finished tree; returns seconds.
fn image_steps(
    dir: &Path,
    tree: &Path,
    espdir: &Path,
    initrd_tree: &Path,
    ours: &Path,
) -> Result<f64> {
    let work = dir.join("standard");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let parts = partitions(ours)?;
    let layout = run(Command::new("sfdisk").arg("--dump").arg(ours))?;
    let layout: String = layout
        .lines()
        .filter(|l| !l.starts_with("device:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let total = std::fs::metadata(ours)?.len();
    let initrd_rel = os_config::boot::Entry::initrd_path(os_config::layout::Slot::A);
    let start = Instant::now();
    let w = work.display();
    run(Command::new("mksquashfs")
        .arg(tree)
        .arg(work.join("root.img"))
        .args(builder::disk::rootimage::SQUASHFS_OPTIONS)
        .arg("-Xcompression-level")
        .arg(builder::disk::rootimage::DEFAULT_ZSTD_LEVEL.to_string()))?;
    run(Command::new("veritysetup")
        .arg("format")
        .arg(work.join("root.img"))
        .arg(work.join("verity.img")))?;
    sh(&format!(
        "cd '{}' && find . | LC_ALL=C sort | cpio -o -H newc --quiet | zstd -19 -q -c > '{w}/initrd'",
        initrd_tree.display()
    ))?;
    let esp = part(&parts, "esp")?;
    run(Command::new("mkfs.vfat")
        .args(["-F", "32", "-n", "ESP", "-C"])
        .arg(work.join("esp.img"))
        .arg((esp.size / 1024).to_string()))?;
    // The ESP's files, with the initramfs just made.
    sh(&format!(
        "cp -r '{}' '{w}/esp' && cp '{w}/initrd' '{w}/esp{initrd_rel}' && mcopy -s -i '{w}/esp.img' '{w}/esp/'* ::/",
        espdir.display()
    ))?;
    let state = part(&parts, "state")?;
    sh(&format!(
        "truncate -s {} '{w}/state.img' && mkfs.ext4 -q -F -L state '{w}/state.img'",
        state.size
    ))?;
    sh(&format!("truncate -s {total} '{w}/disk.raw'"))?;
    let mut child = Command::new("sfdisk")
        .arg("--quiet")
        .arg(work.join("disk.raw"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("running sfdisk")?;
    child
        .stdin
        .take()
        .context("sfdisk stdin")?
        .write_all(layout.as_bytes())?;
    if !child.wait()?.success() {
        bail!("sfdisk could not write the partition table");
    }
    for (image, name) in [
        ("esp.img", "esp"),
        ("root.img", "root-a"),
        ("verity.img", "verity-a"),
        ("state.img", "state"),
    ] {
        let p = part(&parts, name)?;
        sh(&format!(
            "dd if='{w}/{image}' of='{w}/disk.raw' bs=1M oflag=seek_bytes seek={} conv=notrunc,sparse status=none",
            p.start
        ))?;
    }
    sh("sync")?;
    Ok(start.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.deb` holding `files` (path, content), built by `dpkg-deb --build`.
    fn deb(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root = dir.join(format!("{name}-src"));
        std::fs::create_dir_all(root.join("DEBIAN")).expect("DEBIAN");
        std::fs::write(
            root.join("DEBIAN/control"),
            format!("Package: {name}\nVersion: 1\nArchitecture: all\nMaintainer: t <t@localhost>\nDescription: t\n"),
        )
        .expect("control");
        for (path, content) in files {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, content).expect("file");
        }
        let out = dir.join(format!("{name}.deb"));
        run(Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group"])
            .arg(&root)
            .arg(&out))
        .expect("dpkg-deb --build");
        out
    }

    #[test]
    fn the_standard_tree_holds_exactly_the_wanted_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let debs = vec![
            (
                "a".to_owned(),
                deb(
                    d,
                    "a",
                    &[("bin/tool", "tool"), ("usr/share/doc/a/README", "doc")],
                ),
            ),
            ("b".to_owned(), deb(d, "b", &[("usr/lib/b.so", "lib")])),
        ];
        // Our tree: the chosen package files plus one the build made itself.
        let ours = d.join("ours");
        for (path, content) in [
            ("usr/bin/tool", "tool"),
            ("usr/lib/b.so", "lib"),
            ("usr/bin/plinth-init", "init"),
        ] {
            std::fs::create_dir_all(ours.join(path).parent().expect("parent")).expect("mkdir");
            std::fs::write(ours.join(path), content).expect("write");
        }
        let wanted = tree_list(&ours).expect("list");
        let tree = d.join("tree");
        let from_packages =
            assemble_tree(&debs, &wanted, &ours, &d.join("unpack"), &tree).expect("assemble");
        assert_eq!(tree_list(&tree).expect("list"), wanted);
        // usr, usr/bin, usr/lib, usr/bin/tool (from ./bin/tool, merged-/usr), usr/lib/b.so.
        assert_eq!(from_packages, 5);
        assert_eq!(
            std::fs::read_to_string(tree.join("usr/bin/plinth-init")).expect("init"),
            "init"
        );
        assert!(!tree.join("usr/share/doc").exists());
    }
}
