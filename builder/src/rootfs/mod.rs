//! Root filesystem tree assembly from Debian packages.
//!
//! Every fetched package is extracted into a staging tree (merged-/usr), then only what the image
//! needs is linked into the root: the engine's executables, every file of the packages the
//! definition names, the kernel's modules, and the shared-library closure of all of it. Plinth's
//! own configuration files follow, and finally every timestamp is fixed.

pub mod deb;
pub mod elf;
pub mod etc;
pub mod kmod;
pub mod paths;
pub mod select;
pub mod tree;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use os_config::rootfs::MOUNTPOINTS;
use os_config::Definition;
use sha2::{Digest, Sha256};

use crate::debian::FetchedPackage;
use crate::progress::Step;
use select::Selection;

pub use tree::listing;

/// Executables of the Docker engine, looked up in `/usr/sbin` and `/usr/bin`.
pub(crate) const DOCKER_EXECUTABLES: [&str; 6] = [
    "dockerd",
    "docker-proxy",
    "containerd",
    "containerd-shim-runc-v2",
    "runc",
    "xtables-nft-multi",
];

/// Names that point at `xtables-nft-multi`, as Debian's alternatives would set them.
const IPTABLES_LINKS: [&str; 6] = [
    "iptables",
    "iptables-save",
    "iptables-restore",
    "ip6tables",
    "ip6tables-save",
    "ip6tables-restore",
];

/// Directory of iptables' extensions, which it loads with `dlopen`.
pub(crate) const XTABLES_DIR: &str = "usr/lib/x86_64-linux-gnu/xtables";

/// Files of netbase that name services and protocols read.
const NETBASE_FILES: [&str; 3] = ["etc/protocols", "etc/services", "etc/ethertypes"];

/// The systemd-boot EFI binary, from `systemd-boot-efi`.
const SYSTEMD_BOOT: &str = "usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// systemd-stub, the EFI stub of Unified Kernel Images, from `systemd-boot-efi` as well.
const LINUX_EFI_STUB: &str = "usr/lib/systemd/boot/efi/linuxx64.efi.stub";

/// An assembled root tree and the boot files that go to the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// The root filesystem tree (`work/root`).
    pub root: PathBuf,
    /// Kernel release, e.g. `6.1.0-28-cloud-amd64`; modules are in `usr/lib/modules/<it>`.
    pub kernel_version: String,
    /// The kernel image (`work/boot/vmlinuz`).
    pub vmlinuz: PathBuf,
    /// systemd-boot's EFI binary (`work/boot/systemd-bootx64.efi`).
    pub systemd_boot_efi: PathBuf,
    /// systemd-stub (`work/boot/linuxx64.efi.stub`), the base of the PXE folder's UKI.
    pub linux_efi_stub: PathBuf,
    /// Trees of the container images declared with `build = { packages = [...] }`: (container
    /// name, folder under `work/images`), each the files of the named packages and their ELF
    /// shared-library closure.
    pub images: Vec<(String, PathBuf)>,
}

/// Assembles the root tree of `def` from `packages` into the empty folder `work`: the tree in
/// `work/root`, the kernel and boot loader in `work/boot`. Every timestamp is `source_date_epoch`.
pub fn assemble(
    def: &Definition,
    def_dir: &Path,
    packages: &[FetchedPackage],
    work: &Path,
    source_date_epoch: u64,
) -> Result<Tree> {
    let not_empty = std::fs::read_dir(work)
        .with_context(|| format!("reading work folder {}", work.display()))?
        .next()
        .is_some();
    if not_empty {
        bail!("work folder {} is not empty", work.display());
    }
    let stage = work.join("stage");
    let root = work.join("root");
    let boot = work.join("boot");
    for dir in [&stage, &root, &boot] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for top in paths::MERGED_DIRS {
        etc::write_symlink(&stage, top, &format!("usr/{top}"))?;
    }

    let mut sorted: Vec<&FetchedPackage> = packages.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.name, &a.version, &a.architecture).cmp(&(&b.name, &b.version, &b.architecture))
    });
    let step = Step::start("extract packages");
    let mut contents: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for package in &sorted {
        let written = deb::extract(&package.path, &stage)
            .with_context(|| format!("extracting package {} {}", package.name, package.version))?;
        contents
            .entry(package.name.as_str())
            .or_default()
            .extend(written);
    }

    step.done(&format!("{} packages", sorted.len()));

    let step = Step::start("select files and shared libraries");
    let kernel_version = find_kernel(&contents, &def.kernel.package)?;
    let mut selection = Selection::new(&stage);
    select_engine(&mut selection, &stage)?;
    for name in &def.debian.packages {
        let files = contents.get(name.as_str()).with_context(|| {
            format!("[debian] packages names `{name}`, which is not among the fetched packages")
        })?;
        for file in files {
            let found = selection.add(file, false)?;
            if found.exists {
                // A symlink brings what it points at, when that is in the tree.
                selection.add(file, true)?;
            }
        }
    }
    for file in NETBASE_FILES {
        selection.add(file, true)?;
    }
    let modules_prefix = format!("usr/lib/modules/{kernel_version}/");
    let modules = select_modules(def, &stage.join(&modules_prefix), &kernel_version)?;
    let shipped_paths: std::collections::BTreeSet<String> = modules
        .shipped
        .iter()
        .map(|m| format!("{modules_prefix}{}", m.path))
        .collect();
    for files in contents.values() {
        for file in files.iter().filter(|f| f.starts_with(&modules_prefix)) {
            let is_module = kmod::MODULE_SUFFIXES.iter().any(|s| file.ends_with(s));
            if !is_module || shipped_paths.contains(file) {
                selection.add(file, false)?;
            }
        }
    }
    selection.add_elf_closure()?;

    for top in ["bin", "sbin", "lib", "lib64"] {
        etc::write_symlink(&root, top, &format!("usr/{top}"))?;
    }
    copy_selection(&stage, &root, &selection)?;
    step.done(&format!("{} entries", selection.entries().len()));

    if contents.contains_key("ca-certificates") {
        write_ca_bundle(&stage, &root)?;
    }
    let modules_dir = root.join(format!("usr/lib/modules/{kernel_version}"));
    let step = Step::start("kernel module tables");
    kmod::write_tables_of(&modules_dir, &modules.shipped)
        .with_context(|| format!("writing module tables in {}", modules_dir.display()))?;
    let index = kmod::load(&modules_dir)?;
    let wanted: Vec<&str> = def.kernel.modules.iter().map(String::as_str).collect();
    index
        .closure(&wanted)
        .with_context(|| format!("[kernel] modules for kernel {kernel_version}"))?;
    step.done(&format!(
        "{} of {} modules of kernel {kernel_version} shipped, {} of {}",
        modules.shipped.len(),
        modules.available,
        crate::disk::human(modules.shipped_bytes),
        crate::disk::human(modules.available_bytes),
    ));

    etc::write_config(&root, def, &build_id(def, packages)?)?;
    for dir in MOUNTPOINTS {
        paths::create_dirs(&root, dir)?;
    }
    etc::write_declared(&root, def, def_dir)?;

    let vmlinuz = boot.join("vmlinuz");
    let kernel_source = regular_file(&stage, &format!("boot/vmlinuz-{kernel_version}"))?
        .context("the kernel image is not a regular file")?;
    copy_file(&kernel_source, &vmlinuz)?;
    let systemd_boot_efi = boot.join("systemd-bootx64.efi");
    let efi_source = regular_file(&stage, SYSTEMD_BOOT)?.with_context(|| {
        format!(
            "/{SYSTEMD_BOOT} is not in the fetched packages; add the `systemd-boot-efi` package"
        )
    })?;
    copy_file(&efi_source, &systemd_boot_efi)?;
    let linux_efi_stub = boot.join("linuxx64.efi.stub");
    let stub_source = regular_file(&stage, LINUX_EFI_STUB)?.with_context(|| {
        format!(
            "/{LINUX_EFI_STUB} is not in the fetched packages; add the `systemd-boot-efi` package"
        )
    })?;
    copy_file(&stub_source, &linux_efi_stub)?;

    let images = build_image_layers(def, &stage, &contents, &work.join("images"))?;

    std::fs::remove_dir_all(&stage)
        .with_context(|| format!("removing staging tree {}", stage.display()))?;
    normalise(&root, source_date_epoch)?;
    tree::normalise(&boot, source_date_epoch, &[])?;
    for (_, layer) in &images {
        tree::normalise(layer, source_date_epoch, &[])?;
    }
    Ok(Tree {
        root,
        images,
        kernel_version,
        vmlinuz,
        systemd_boot_efi,
        linux_efi_stub,
    })
}

/// The kernel modules an image ships, chosen by [`select_modules`].
struct ModuleSelection {
    /// The shipped modules, paths relative to the modules directory.
    shipped: Vec<kmod::Module>,
    /// Bytes of the shipped module files.
    shipped_bytes: u64,
    /// How many modules the kernel package has.
    available: usize,
    /// Bytes of all its module files.
    available_bytes: u64,
}

/// Chooses the modules of `modules_dir` (the kernel package's, in the staging tree) that ship:
/// the closure ([`kmod::ship_closure`]) of the ones Plinth needs
/// ([`os_config::modules::always_shipped`]), the drivers of `[kernel] platforms` and the
/// definition's `[kernel] modules` and `include-modules`. A name of the definition that is
/// neither a module of this kernel nor built in is an error; a platform's module the kernel does
/// not have is a note (the lists also name drivers of Debian's generic kernel).
fn select_modules(
    def: &Definition,
    modules_dir: &Path,
    kernel_version: &str,
) -> Result<ModuleSelection> {
    let all = kmod::scan(modules_dir)?;
    let builtin_path = modules_dir.join("modules.builtin");
    let builtin: std::collections::BTreeSet<String> = match std::fs::read_to_string(&builtin_path) {
        Ok(text) => text.lines().map(kmod::name_from_path).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", builtin_path.display())),
    };
    let known = |name: &str| {
        let name = kmod::normalise_name(name);
        builtin.contains(&name) || all.iter().any(|m| m.name == name)
    };
    for (key, names) in [
        ("modules", &def.kernel.modules),
        ("include-modules", &def.kernel.include_modules),
    ] {
        if let Some(name) = names.iter().find(|n| !known(n)) {
            bail!(
                "[kernel] {key} names `{name}`, which is neither a module of kernel \
                 {kernel_version} nor built into it"
            );
        }
    }
    let mut roots = os_config::modules::always_shipped();
    for platform in &def.kernel.platforms {
        let missing: Vec<&str> = platform
            .modules()
            .iter()
            .copied()
            .filter(|n| !known(n))
            .collect();
        if !missing.is_empty() {
            eprintln!(
                "    note: platform `{}`: kernel {kernel_version} has no module {} (skipped)",
                platform.name(),
                missing.join(", ")
            );
        }
        roots.extend(platform.modules());
    }
    roots.extend(def.kernel.modules.iter().map(String::as_str));
    roots.extend(def.kernel.include_modules.iter().map(String::as_str));
    let size = |m: &kmod::Module| -> Result<u64> {
        let path = modules_dir.join(&m.path);
        Ok(std::fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .len())
    };
    let shipped: Vec<kmod::Module> = kmod::ship_closure(&all, roots)?
        .into_iter()
        .cloned()
        .collect();
    let mut shipped_bytes = 0;
    for module in &shipped {
        shipped_bytes += size(module)?;
    }
    let mut available_bytes = 0;
    for module in &all {
        available_bytes += size(module)?;
    }
    Ok(ModuleSelection {
        shipped,
        shipped_bytes,
        available: all.len(),
        available_bytes,
    })
}

/// Directories whose mode is not `0755`.
const SPECIAL_DIRS: [(&str, u32); 2] = [("tmp", 0o1777), ("root", 0o700)];

/// Gives every directory of an assembled root its fixed mode and every entry the timestamp
/// `source_date_epoch`, as [`assemble`] does; for callers that add files afterwards (such as
/// `plinth-init` in `usr/bin/`).
pub fn normalise(root: &Path, source_date_epoch: u64) -> Result<()> {
    tree::normalise(root, source_date_epoch, &SPECIAL_DIRS)
}

/// The kernel release shipped by the fetched packages: the one `boot/vmlinuz-<release>` with a
/// matching `lib/modules/<release>/`. Exactly one must exist.
fn find_kernel(contents: &BTreeMap<&str, Vec<String>>, kernel_package: &str) -> Result<String> {
    let mut versions: Vec<(String, &str)> = Vec::new();
    for (package, files) in contents {
        for file in files {
            if let Some(version) = file.strip_prefix("boot/vmlinuz-") {
                let modules = format!("usr/lib/modules/{version}/");
                if files.iter().any(|f| f.starts_with(&modules)) {
                    versions.push((version.to_owned(), package));
                }
            }
        }
    }
    match versions.as_slice() {
        [(version, _)] => Ok(version.clone()),
        [] => bail!(
            "no kernel among the fetched packages: none ships /boot/vmlinuz-<release> with \
             /lib/modules/<release>/ (is `{kernel_package}` resolved with its dependencies?)"
        ),
        many => bail!(
            "several kernels among the fetched packages ({}); the image takes exactly one",
            many.iter()
                .map(|(v, p)| format!("{v} from {p}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Chooses the Docker engine's executables, its `docker-init`, the iptables names and the
/// iptables extensions.
fn select_engine(selection: &mut Selection, stage: &Path) -> Result<()> {
    for name in DOCKER_EXECUTABLES {
        let sbin = format!("usr/sbin/{name}");
        let path = if paths::resolve(stage, &sbin, true)?.exists {
            sbin
        } else {
            format!("usr/bin/{name}")
        };
        selection.require(&path, &format!("the Docker engine needs `{name}`"))?;
    }
    // Debian installs dockerd in /usr/sbin; it is also reachable as /usr/bin/dockerd, where
    // other distributions (and Docker's own packages) put it.
    if !paths::resolve(stage, "usr/bin/dockerd", false)?.exists {
        etc::write_symlink(stage, "usr/bin/dockerd", "../sbin/dockerd")?;
    }
    selection.require("usr/bin/dockerd", "the Docker engine needs `dockerd`")?;
    if !paths::resolve(stage, "usr/bin/docker-init", true)?.exists {
        let tini = ["tini-static", "tini"]
            .into_iter()
            .find(|t| stage.join("usr/bin").join(t).is_file())
            .context("the Docker engine needs `docker-init`: neither docker.io's nor tini's /usr/bin/tini-static or /usr/bin/tini is in the fetched packages")?;
        etc::write_symlink(stage, "usr/bin/docker-init", tini)?;
    }
    selection.require(
        "usr/bin/docker-init",
        "the Docker engine needs `docker-init`",
    )?;
    for name in IPTABLES_LINKS {
        let rel = format!("usr/sbin/{name}");
        etc::write_symlink(stage, &rel, "xtables-nft-multi")?;
        selection.require(&rel, "iptables")?;
    }
    let xtables = stage.join(XTABLES_DIR);
    let mut plugins: Vec<String> = std::fs::read_dir(&xtables)
        .with_context(|| format!("reading iptables extensions in /{XTABLES_DIR}"))?
        .map(|e| {
            e.map(|e| e.file_name().to_string_lossy().into_owned())
                .with_context(|| format!("reading {}", xtables.display()))
        })
        .collect::<Result<_>>()?;
    plugins.sort();
    for plugin in plugins.iter().filter(|p| p.ends_with(".so")) {
        selection.add(&format!("{XTABLES_DIR}/{plugin}"), true)?;
    }
    Ok(())
}

/// Links (or copies) every chosen entry from the staging tree into the root.
/// Assembles the tree of every container image built from packages, from the same extracted
/// packages as the root.
fn build_image_layers(
    def: &Definition,
    stage: &Path,
    contents: &BTreeMap<&str, Vec<String>>,
    images: &Path,
) -> Result<Vec<(String, PathBuf)>> {
    let mut layers = Vec::new();
    for container in &def.containers {
        let Some(build) = &container.build else {
            continue;
        };
        let name = container.name.as_str();
        let mut selection = Selection::new(stage);
        for package in &build.packages {
            let files = contents.get(package.as_str()).with_context(|| {
                format!("[[container]] `{name}` builds from `{package}`, which is not among the fetched packages")
            })?;
            for file in files {
                if selection.add(file, false)?.exists {
                    selection.add(file, true)?;
                }
            }
        }
        selection.add_elf_closure()?;
        let layer = images.join(name);
        std::fs::create_dir_all(&layer).with_context(|| format!("creating {}", layer.display()))?;
        for top in ["bin", "sbin", "lib", "lib64"] {
            etc::write_symlink(&layer, top, &format!("usr/{top}"))?;
        }
        copy_selection(stage, &layer, &selection)?;
        layers.push((name.to_owned(), layer));
    }
    Ok(layers)
}

fn copy_selection(stage: &Path, root: &Path, selection: &Selection) -> Result<()> {
    for rel in selection.entries() {
        let from = stage.join(rel);
        let to = root.join(rel);
        let meta = std::fs::symlink_metadata(&from)
            .with_context(|| format!("reading {}", from.display()))?;
        if meta.is_dir() {
            paths::create_dirs(root, rel)?;
            continue;
        }
        if std::fs::symlink_metadata(&to).is_ok() {
            // Top-level merged-/usr links are already there.
            continue;
        }
        paths::create_dirs(root, paths::parent(rel))?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&from)
                .with_context(|| format!("reading symlink {}", from.display()))?;
            std::os::unix::fs::symlink(&target, &to)
                .with_context(|| format!("creating symlink {}", to.display()))?;
        } else if meta.is_file() {
            if std::fs::hard_link(&from, &to).is_err() {
                copy_file(&from, &to)?;
            }
        } else {
            bail!("/{rel} is neither a file, a directory nor a symlink");
        }
    }
    Ok(())
}

/// The regular file that `rel` resolves to inside `tree` (symlinks followed inside the tree
/// only), or `None` if there is none.
fn regular_file(tree: &Path, rel: &str) -> Result<Option<PathBuf>> {
    let resolved = paths::resolve(tree, rel, true)?;
    if !resolved.exists {
        return Ok(None);
    }
    let path = tree.join(&resolved.path);
    let meta =
        std::fs::symlink_metadata(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(meta.is_file().then_some(path))
}

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .map(|_| ())
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}

/// `/etc/ssl/certs/ca-certificates.crt`: every certificate of `ca-certificates`, sorted by path.
fn write_ca_bundle(stage: &Path, root: &Path) -> Result<()> {
    let base = stage.join("usr/share/ca-certificates");
    let mut certs: Vec<String> = tree::walk(&base)?
        .into_iter()
        .filter(|c| c.ends_with(".crt"))
        .collect();
    certs.sort();
    if certs.is_empty() {
        bail!("ca-certificates has no certificates in /usr/share/ca-certificates");
    }
    let mut bundle = Vec::new();
    for cert in &certs {
        // Only regular files: a symlink could point anywhere on the build host.
        let Some(path) = regular_file(stage, &format!("usr/share/ca-certificates/{cert}"))? else {
            continue;
        };
        let mut bytes =
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if !bytes.ends_with(b"\n") {
            bytes.push(b'\n');
        }
        bundle.extend(bytes);
    }
    etc::write_file(root, "etc/ssl/certs/ca-certificates.crt", &bundle, 0o644)
}

/// Short identifier of the build inputs: the first 12 hex digits of a sha256 over the package
/// list and the definition.
pub fn build_id(def: &Definition, packages: &[FetchedPackage]) -> Result<String> {
    let mut lines: Vec<String> = packages
        .iter()
        .map(|p| format!("{} {} {}\n", p.name, p.version, p.architecture))
        .collect();
    lines.sort();
    let mut hasher = Sha256::new();
    for line in &lines {
        hasher.update(line.as_bytes());
    }
    hasher.update(serde_json::to_vec(def).context("serialising the definition")?);
    Ok(hex::encode(hasher.finalize())[..12].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    enum Item<'a> {
        File(&'a str, Vec<u8>, u32),
        Link(&'a str, &'a str),
    }

    fn file<'a>(path: &'a str, content: &[u8], mode: u32) -> Item<'a> {
        Item::File(path, content.to_vec(), mode)
    }

    /// Writes a `.deb` holding `items`, its data compressed as `compression` (gz, xz or zst).
    fn deb(dir: &Path, name: &str, compression: &str, items: Vec<Item<'_>>) -> FetchedPackage {
        let mut tar = tar::Builder::new(Vec::new());
        for item in items {
            let mut header = tar::Header::new_gnu();
            match item {
                Item::File(path, content, mode) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(mode);
                    header.set_size(content.len() as u64);
                    tar.append_data(&mut header, format!("./{path}"), &content[..])
                        .expect("tar file");
                }
                Item::Link(path, target) => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_size(0);
                    tar.append_link(&mut header, format!("./{path}"), target)
                        .expect("tar link");
                }
            }
        }
        let data = tar.into_inner().expect("tar");
        let packed = match compression {
            "gz" => {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                enc.write_all(&data).expect("gz");
                enc.finish().expect("gz")
            }
            "xz" => {
                let mut enc = xz2::write::XzEncoder::new(Vec::new(), 1);
                enc.write_all(&data).expect("xz");
                enc.finish().expect("xz")
            }
            _ => zstd::stream::encode_all(&data[..], 1).expect("zst"),
        };
        let path = dir.join(format!("{name}_1.0_amd64.deb"));
        let mut ar = ar::Builder::new(std::fs::File::create(&path).expect("create deb"));
        for (id, content) in [
            ("debian-binary".to_owned(), b"2.0\n".to_vec()),
            ("control.tar.gz".to_owned(), Vec::new()),
            (format!("data.tar.{compression}"), packed),
        ] {
            let header = ar::Header::new(id.into_bytes(), content.len() as u64);
            ar.append(&header, &content[..]).expect("ar member");
        }
        FetchedPackage {
            name: name.to_owned(),
            version: "1.0".to_owned(),
            architecture: "amd64".to_owned(),
            path,
        }
    }

    const KVER: &str = "6.1.0-9-cloud-amd64";

    fn packages(dir: &Path) -> Vec<FetchedPackage> {
        let script = b"#!/bin/sh\n";
        let mods = format!("lib/modules/{KVER}");
        vec![
            deb(
                dir,
                "docker.io",
                "xz",
                vec![
                    file("usr/sbin/dockerd", script, 0o755),
                    file("usr/sbin/docker-proxy", script, 0o755),
                    file("usr/bin/docker", script, 0o755),
                    file("usr/share/doc/docker.io/README", b"doc", 0o644),
                    file("lib/systemd/system/docker.service", b"[Unit]", 0o644),
                ],
            ),
            deb(
                dir,
                "containerd",
                "zst",
                vec![
                    file("usr/bin/containerd", script, 0o755),
                    file("usr/bin/containerd-shim-runc-v2", script, 0o755),
                    file("usr/bin/ctr", script, 0o755),
                ],
            ),
            deb(
                dir,
                "runc",
                "gz",
                vec![
                    file("usr/sbin/runc", script, 0o4755),
                    Item::Link("usr/bin/runc", "../sbin/runc"),
                ],
            ),
            deb(
                dir,
                "tini",
                "gz",
                vec![
                    file("usr/bin/tini", script, 0o755),
                    file("usr/bin/tini-static", script, 0o755),
                ],
            ),
            deb(
                dir,
                "iptables",
                "gz",
                vec![
                    file("usr/sbin/xtables-nft-multi", script, 0o755),
                    file("usr/sbin/xtables-legacy-multi", script, 0o755),
                    file(
                        "usr/lib/x86_64-linux-gnu/xtables/libxt_NAT.so",
                        b"so",
                        0o644,
                    ),
                    Item::Link(
                        "usr/lib/x86_64-linux-gnu/xtables/libxt_MASQUERADE.so",
                        "libxt_NAT.so",
                    ),
                ],
            ),
            deb(
                dir,
                &format!("linux-image-{KVER}"),
                "xz",
                vec![
                    file(&format!("boot/vmlinuz-{KVER}"), b"MZkernel", 0o644),
                    file(&format!("boot/config-{KVER}"), b"CONFIG_X=y", 0o644),
                    file(
                        &format!("{mods}/kernel/drivers/virtio/virtio.ko"),
                        &kmod::fake_module(&["name=virtio"]),
                        0o644,
                    ),
                    file(
                        &format!("{mods}/kernel/drivers/block/virtio_blk.ko"),
                        &kmod::fake_module(&[
                            "name=virtio_blk",
                            "depends=virtio",
                            "alias=virtio:d00000002v*",
                        ]),
                        0o644,
                    ),
                    file(
                        &format!("{mods}/kernel/fs/xfs/xfs.ko"),
                        &kmod::fake_module(&["name=xfs", "softdep=pre: crc32c post: virtio"]),
                        0o644,
                    ),
                    file(
                        &format!("{mods}/modules.builtin"),
                        b"kernel/fs/ext4/ext4.ko\n",
                        0o644,
                    ),
                ],
            ),
            deb(
                dir,
                "linux-image-cloud-amd64",
                "xz",
                vec![file(
                    "usr/share/doc/linux-image-cloud-amd64/copyright",
                    b"c",
                    0o644,
                )],
            ),
            deb(
                dir,
                "systemd-boot-efi",
                "gz",
                vec![
                    file(SYSTEMD_BOOT, b"MZboot", 0o755),
                    file(LINUX_EFI_STUB, b"MZstub", 0o644),
                ],
            ),
            deb(
                dir,
                "busybox-static",
                "gz",
                vec![
                    file("bin/busybox", script, 0o755),
                    file("usr/share/man/man1/busybox.1.gz", b"man", 0o644),
                ],
            ),
            deb(
                dir,
                "ca-certificates",
                "gz",
                vec![
                    file("usr/share/ca-certificates/mozilla/B.crt", b"B\n", 0o644),
                    file("usr/share/ca-certificates/mozilla/A.crt", b"A", 0o644),
                    file("usr/sbin/update-ca-certificates", script, 0o755),
                ],
            ),
            deb(
                dir,
                "netbase",
                "gz",
                vec![file("etc/protocols", b"tcp 6 TCP\n", 0o644)],
            ),
            deb(
                dir,
                "libc6",
                "gz",
                vec![
                    file("lib/x86_64-linux-gnu/libc.so.6", b"not needed", 0o755),
                    Item::Link(
                        "lib64/ld-linux-x86-64.so.2",
                        "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                    ),
                ],
            ),
        ]
    }

    fn definition() -> Definition {
        Definition::parse(
            "t.toml",
            "[image]\nname = \"demo\"\nversion = \"1.0\"\n[debian]\npackages = [\"busybox-static\"]\n\
[[file]]\npath = \"/etc/motd\"\nmode = \"0600\"\ncontent = \"hi\\n\"\n",
        )
        .expect("definition")
    }

    #[test]
    fn assembles_synthetic_packages() {
        let debs = tempfile::tempdir().expect("tempdir");
        let packages = packages(debs.path());
        let work = tempfile::tempdir().expect("tempdir");
        let tree = assemble(
            &definition(),
            debs.path(),
            &packages,
            work.path(),
            1_234_567,
        )
        .expect("assemble");
        let root = &tree.root;
        assert_eq!(tree.kernel_version, KVER);
        assert_eq!(std::fs::read(&tree.vmlinuz).expect("vmlinuz"), b"MZkernel");
        assert_eq!(
            std::fs::read(&tree.systemd_boot_efi).expect("efi"),
            b"MZboot"
        );
        assert_eq!(
            std::fs::read(&tree.linux_efi_stub).expect("stub"),
            b"MZstub"
        );
        assert!(!work.path().join("stage").exists());

        // A file added afterwards gets the same treatment from `normalise`.
        std::fs::write(root.join("usr/bin/added"), b"x").expect("write");
        normalise(root, 1_234_567).expect("normalise");
        let added = std::fs::metadata(root.join("usr/bin/added")).expect("added");
        assert_eq!(added.mtime(), 1_234_567);
        std::fs::remove_file(root.join("usr/bin/added")).expect("remove");
        normalise(root, 1_234_567).expect("normalise");

        let listing = listing(root).expect("listing");
        for present in [
            "/bin l -> usr/bin",
            "/lib64 l -> usr/lib64",
            "/usr/bin/busybox f 0755",
            "/usr/sbin/runc f 0755",
            "/usr/bin/docker-init l -> tini-static",
            "/usr/bin/dockerd l -> ../sbin/dockerd",
            "/usr/sbin/dockerd f 0755",
            "/usr/bin/tini-static f 0755",
            "/usr/sbin/iptables l -> xtables-nft-multi",
            "/usr/sbin/ip6tables-save l -> xtables-nft-multi",
            "/usr/lib/x86_64-linux-gnu/xtables/libxt_MASQUERADE.so l -> libxt_NAT.so",
            "/usr/lib/x86_64-linux-gnu/xtables/libxt_NAT.so f 0644",
            "/etc/protocols f",
            "/etc/motd f 0600 3 ",
            "/etc/os-release l -> ../usr/lib/os-release",
            "/etc/resolv.conf l -> ../run/resolv.conf",
            "/etc/machine-id l -> ../run/machine-id",
            "/tmp d 1777",
            "/sysroot d 0755",
            "/usr/lib/plinth d 0755",
            "/usr/lib/modules/6.1.0-9-cloud-amd64/kernel/drivers/block/virtio_blk.ko f 0644",
        ] {
            assert!(listing.contains(present), "{present} missing:\n{listing}");
        }
        for absent in [
            "/usr/bin/docker ",
            "/usr/bin/ctr",
            "/usr/bin/tini ",
            "xtables-legacy-multi",
            "update-ca-certificates",
            "/usr/share/doc",
            "/usr/share/man",
            "docker.service",
            "libc.so.6",
            "/boot",
        ] {
            assert!(!listing.contains(absent), "{absent} present:\n{listing}");
        }
        assert_eq!(
            std::fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt")).expect("ca"),
            "A\nB\n"
        );
        let modules = root.join(format!("usr/lib/modules/{KVER}"));
        assert_eq!(
            std::fs::read_to_string(modules.join("modules.dep")).expect("dep"),
            "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko\n\
kernel/drivers/virtio/virtio.ko:\n"
        );
        let os_release = std::fs::read_to_string(root.join("usr/lib/os-release")).expect("os");
        let id = build_id(&definition(), &packages).expect("build id");
        assert!(
            os_release.contains(&format!("BUILD_ID={id}\n")),
            "{os_release}"
        );
        for rel in ["", "usr", "usr/bin/busybox", "etc/os-release", "etc/motd"] {
            let meta = std::fs::symlink_metadata(root.join(rel)).expect("meta");
            assert_eq!(meta.mtime(), 1_234_567, "/{rel}");
        }
        assert_eq!(
            std::fs::metadata(root.join("etc/motd"))
                .expect("motd")
                .permissions()
                .mode()
                & 0o7777,
            0o600
        );

        // Same inputs in another order, another folder: the same tree.
        let mut reversed = packages.clone();
        reversed.reverse();
        let work2 = tempfile::tempdir().expect("tempdir");
        let tree2 = assemble(
            &definition(),
            debs.path(),
            &reversed,
            work2.path(),
            1_234_567,
        )
        .expect("assemble again");
        assert_eq!(listing, super::listing(&tree2.root).expect("listing"));

        // A non-empty work folder and a missing listed package are refused with their names.
        let err = assemble(&definition(), debs.path(), &packages, work.path(), 1)
            .expect_err("work folder in use");
        assert!(err.to_string().contains("not empty"), "{err}");
        let mut def = definition();
        def.kernel.modules.push("virtio-blk".to_owned());
        def.kernel.modules.push("ext4".to_owned());
        let work4 = tempfile::tempdir().expect("tempdir");
        let tree4 = assemble(&def, debs.path(), &packages, work4.path(), 1).expect("known modules");
        // A module no list names (xfs) does not ship; `include-modules` ships it.
        let xfs = format!("usr/lib/modules/{KVER}/kernel/fs/xfs/xfs.ko");
        assert!(!tree4.root.join(&xfs).exists());
        assert!(!listing.contains("xfs"), "{listing}");
        def.kernel.include_modules.push("xfs".to_owned());
        let work6 = tempfile::tempdir().expect("tempdir");
        let tree6 = assemble(&def, debs.path(), &packages, work6.path(), 1).expect("xfs");
        assert!(tree6.root.join(&xfs).is_file());
        let dep = std::fs::read_to_string(
            tree6
                .root
                .join(format!("usr/lib/modules/{KVER}/modules.dep")),
        )
        .expect("dep");
        assert!(dep.contains("kernel/fs/xfs/xfs.ko:\n"), "{dep}");
        def.kernel.include_modules.push("btrfs".to_owned());
        let work7 = tempfile::tempdir().expect("tempdir");
        let err = assemble(&def, debs.path(), &packages, work7.path(), 1).expect_err("btrfs");
        assert!(
            format!("{err:#}").contains("[kernel] include-modules names `btrfs`"),
            "{err:#}"
        );
        def.kernel.include_modules.pop();
        def.kernel.modules.push("nosuch".to_owned());
        let work5 = tempfile::tempdir().expect("tempdir");
        let err = assemble(&def, debs.path(), &packages, work5.path(), 1).expect_err("nosuch");
        assert!(format!("{err:#}").contains("`nosuch`"), "{err:#}");
        let mut def = definition();
        def.debian.packages.push("nano".to_owned());
        let work3 = tempfile::tempdir().expect("tempdir");
        let err = assemble(&def, debs.path(), &packages, work3.path(), 1).expect_err("nano");
        assert!(format!("{err:#}").contains("`nano`"), "{err:#}");
    }
}
