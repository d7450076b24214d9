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
use os_config::Definition;
use sha2::{Digest, Sha256};

use crate::debian::FetchedPackage;
use select::Selection;

pub use tree::listing;

/// Executables of the Docker engine, looked up in `/usr/sbin` and `/usr/bin`.
const DOCKER_EXECUTABLES: [&str; 6] = [
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
const XTABLES_DIR: &str = "usr/lib/x86_64-linux-gnu/xtables";

/// Files of netbase that name services and protocols read.
const NETBASE_FILES: [&str; 3] = ["etc/protocols", "etc/services", "etc/ethertypes"];

/// Empty directories the system mounts over or writes at run time.
const MOUNTPOINTS: [&str; 9] = [
    "proc",
    "sys",
    "dev",
    "run",
    "var",
    "tmp",
    "sysroot",
    "root",
    "usr/lib/plinth",
];

/// The systemd-boot EFI binary, from `systemd-boot-efi`.
const SYSTEMD_BOOT: &str = "usr/lib/systemd/boot/efi/systemd-bootx64.efi";

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
    let mut contents: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for package in &sorted {
        let written = deb::extract(&package.path, &stage)
            .with_context(|| format!("extracting package {} {}", package.name, package.version))?;
        contents
            .entry(package.name.as_str())
            .or_default()
            .extend(written);
    }

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
    for files in contents.values() {
        for file in files.iter().filter(|f| f.starts_with(&modules_prefix)) {
            selection.add(file, false)?;
        }
    }
    selection.add_elf_closure()?;

    for top in ["bin", "sbin", "lib", "lib64"] {
        etc::write_symlink(&root, top, &format!("usr/{top}"))?;
    }
    copy_selection(&stage, &root, &selection)?;

    if contents.contains_key("ca-certificates") {
        write_ca_bundle(&stage, &root)?;
    }
    let modules_dir = root.join(format!("usr/lib/modules/{kernel_version}"));
    kmod::write_tables(&modules_dir)
        .with_context(|| format!("writing module tables in {}", modules_dir.display()))?;

    etc::write_config(&root, def, &build_id(def, packages)?)?;
    for dir in MOUNTPOINTS {
        paths::create_dirs(&root, dir)?;
    }
    etc::write_declared(&root, def, def_dir)?;

    let vmlinuz = boot.join("vmlinuz");
    copy_file(
        &stage.join(format!("boot/vmlinuz-{kernel_version}")),
        &vmlinuz,
    )?;
    let systemd_boot_efi = boot.join("systemd-bootx64.efi");
    let efi_source = stage.join(SYSTEMD_BOOT);
    if !efi_source.is_file() {
        bail!("/{SYSTEMD_BOOT} is not in the fetched packages; add the `systemd-boot-efi` package");
    }
    copy_file(&efi_source, &systemd_boot_efi)?;

    std::fs::remove_dir_all(&stage)
        .with_context(|| format!("removing staging tree {}", stage.display()))?;
    tree::normalise(
        &root,
        source_date_epoch,
        &[("tmp", 0o1777), ("root", 0o700)],
    )?;
    tree::normalise(&boot, source_date_epoch, &[])?;
    Ok(Tree {
        root,
        kernel_version,
        vmlinuz,
        systemd_boot_efi,
    })
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
        let path = base.join(cert);
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
