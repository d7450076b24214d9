//! Assembles a root tree from real Debian packages (downloaded with apt into `target/test-debs`)
//! and checks what a booted Plinth needs from it. Runs as root (it uses `chroot`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use builder::debian::FetchedPackage;
use builder::rootfs::{self, elf, kmod, paths};
use os_config::Definition;

/// What the default image draws from: the engine, the kernel, the boot loader, busybox, the CA
/// certificates. apt adds every dependency.
const PACKAGES: [&str; 9] = [
    "docker.io",
    "containerd",
    "runc",
    "tini",
    "iptables",
    "linux-image-cloud-amd64",
    "systemd-boot-efi",
    "busybox-static",
    "ca-certificates",
];

const DEFINITION: &str = r##"
[image]
name = "treetest"
version = "1.2.3"

[debian]
packages = ["busybox-static"]

[engine.settings]
log-driver = "json-file"
debug = false

[[file]]
path = "/etc/motd"
content = "hello\n"

[[file]]
path = "/usr/lib/plinth/hook"
mode = "0700"
content = "#!/bin/sh\n"
"##;

const EPOCH: u64 = 1_700_000_000;

fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-debs")
}

fn apt_download(dir: &Path) -> std::process::Output {
    Command::new("apt-get")
        .args([
            "install",
            "--download-only",
            "--yes",
            "--quiet",
            "--no-install-recommends",
        ])
        // An empty package status makes apt fetch every dependency, as for an empty system.
        .arg("-o")
        .arg("Dir::State::status=/dev/null")
        // Only the private archive folder is written; other apt users need not wait.
        .arg("-o")
        .arg("Debug::NoLocking=true")
        .arg("-o")
        .arg(format!("Dir::Cache::archives={}", dir.display()))
        .args(PACKAGES)
        .output()
        .expect("running apt-get (the test needs apt, as on a Debian host)")
}

/// Serialises the download between the tests of this file.
static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Downloads the packages and their dependencies once; later runs reuse the cache.
fn fetch_packages() -> Vec<FetchedPackage> {
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = cache_dir();
    let marker = dir.join(".complete");
    let wanted = PACKAGES.join("\n");
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("partial")).expect("creating target/test-debs");
        let mut out = apt_download(&dir);
        if !out.status.success() {
            // A fresh machine may not have package lists yet.
            let update = Command::new("apt-get")
                .args(["update", "--quiet"])
                .status()
                .expect("running apt-get update");
            assert!(update.success(), "apt-get update failed");
            out = apt_download(&dir);
        }
        assert!(
            out.status.success(),
            "apt-get --download-only failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&marker, &wanted).expect("writing cache marker");
    }
    let mut packages = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("reading target/test-debs") {
        let path = entry.expect("entry").path();
        let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = file.strip_suffix(".deb") else {
            continue;
        };
        let parts: Vec<&str> = stem.split('_').collect();
        assert_eq!(parts.len(), 3, "unexpected .deb name {file}");
        packages.push(FetchedPackage {
            name: parts[0].to_owned(),
            version: parts[1].replace("%3a", ":"),
            architecture: parts[2].to_owned(),
            path: path.clone(),
        });
    }
    packages.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(
        packages.len() > 40,
        "only {} packages in the cache",
        packages.len()
    );
    packages
}

fn assemble(packages: &[FetchedPackage], work: &Path) -> rootfs::Tree {
    let def = Definition::parse("treetest.toml", DEFINITION).expect("definition");
    let def_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let started = Instant::now();
    let tree = rootfs::assemble(&def, def_dir, packages, work, EPOCH).expect("assembling tree");
    eprintln!("assembled in {:.1} s", started.elapsed().as_secs_f64());
    tree
}

/// Every ELF executable or library in the tree finds its interpreter and libraries in the tree.
fn check_elf_closure(root: &Path) -> usize {
    let mut checked = 0;
    for rel in rootfs::tree::walk(root).expect("walk") {
        let path = root.join(&rel);
        let meta = std::fs::symlink_metadata(&path).expect("meta");
        if !meta.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read");
        let Some(deps) = elf::read_deps(&bytes).expect("parse ELF") else {
            continue;
        };
        checked += 1;
        if let Some(interp) = &deps.interpreter {
            let found = paths::resolve(root, interp, true).expect("resolve");
            assert!(found.exists, "/{rel}: interpreter {interp} missing");
        }
        let dirs = elf::search_dirs(&deps, paths::parent(&rel));
        for lib in &deps.needed {
            assert!(
                elf::find_library(root, lib, &dirs)
                    .expect("lookup")
                    .is_some(),
                "/{rel}: {lib} missing from the tree"
            );
        }
    }
    checked
}

/// Runs a program inside the tree with `chroot`: the host's dynamic loader plays no part.
fn run_in_tree(root: &Path, args: &[&str]) -> String {
    let out = Command::new("chroot")
        .arg(root)
        .args(args)
        .output()
        .expect("running chroot (the test runs as root)");
    assert!(
        out.status.success(),
        "chroot {} {args:?} failed ({}): {}{}",
        root.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn du(path: &Path) -> String {
    let out = Command::new("du")
        .args(["-sh", "--apparent-size"])
        .arg(path)
        .output()
        .expect("du");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn tree_from_real_debian_packages() {
    let packages = fetch_packages();
    let work = tempfile::tempdir().expect("tempdir");
    let tree = assemble(&packages, work.path());
    let root = &tree.root;

    // The engine is there, the CLI and documentation are not.
    for exe in [
        "usr/sbin/dockerd",
        "usr/bin/containerd",
        "usr/bin/containerd-shim-runc-v2",
        "usr/sbin/runc",
        "usr/sbin/docker-proxy",
        "usr/bin/docker-init",
        "usr/bin/busybox",
    ] {
        assert!(root.join(exe).is_file(), "/{exe} missing");
    }
    assert!(
        !root.join("usr/bin/docker").exists(),
        "the docker CLI is shipped"
    );
    assert!(!root.join("usr/share/doc").exists());
    assert!(!root.join("usr/share/man").exists());
    for name in ["iptables", "ip6tables-restore", "iptables-save"] {
        assert_eq!(
            std::fs::read_link(root.join("usr/sbin").join(name)).expect("iptables link"),
            Path::new("xtables-nft-multi")
        );
    }
    assert_eq!(
        std::fs::read_link(root.join("bin")).expect("/bin"),
        Path::new("usr/bin")
    );
    assert!(root
        .join("usr/lib/x86_64-linux-gnu/xtables/libxt_MASQUERADE.so")
        .exists());

    // Every ELF finds its libraries, and the main ones actually run from the tree.
    let checked = check_elf_closure(root);
    assert!(checked > 100, "only {checked} ELF objects checked");
    assert!(run_in_tree(root, &["/usr/sbin/dockerd", "--version"]).contains("Docker version"));
    assert!(run_in_tree(root, &["/usr/bin/dockerd", "--version"]).contains("Docker version"));
    assert!(run_in_tree(root, &["/usr/sbin/runc", "--version"]).contains("runc version"));
    assert!(run_in_tree(root, &["/usr/bin/containerd", "--version"]).contains("containerd"));
    assert!(run_in_tree(root, &["/usr/sbin/iptables", "--version"]).contains("nf_tables"));
    assert!(run_in_tree(root, &["/usr/bin/docker-init", "--version"]).contains("tini"));

    // Kernel, boot loader, modules and their tables.
    assert!(
        tree.kernel_version.ends_with("-cloud-amd64"),
        "{}",
        tree.kernel_version
    );
    let vmlinuz = std::fs::read(&tree.vmlinuz).expect("vmlinuz");
    assert!(vmlinuz.starts_with(b"MZ") && vmlinuz.len() > 4 << 20);
    assert!(std::fs::read(&tree.systemd_boot_efi)
        .expect("efi")
        .starts_with(b"MZ"));
    assert!(std::fs::read(&tree.linux_efi_stub)
        .expect("systemd-stub")
        .starts_with(b"MZ"));
    let modules_dir = root.join(format!("usr/lib/modules/{}", tree.kernel_version));
    let dep = std::fs::read_to_string(modules_dir.join("modules.dep")).expect("modules.dep");
    let virtio_blk = dep
        .lines()
        .find(|l| l.starts_with("kernel/drivers/block/virtio_blk.ko:"))
        .expect("virtio_blk in modules.dep");
    assert!(
        virtio_blk.contains("kernel/drivers/virtio/virtio_ring.ko"),
        "{virtio_blk}"
    );
    assert!(
        virtio_blk.contains("kernel/drivers/virtio/virtio.ko"),
        "{virtio_blk}"
    );
    let alias = std::fs::read_to_string(modules_dir.join("modules.alias")).expect("modules.alias");
    for line in [
        "alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci",
        "alias virtio:d00000002v* virtio_blk",
        "alias virtio:d00000008v* virtio_scsi",
    ] {
        assert!(
            alias.lines().any(|l| l == line),
            "{line} missing from modules.alias"
        );
    }
    let index = kmod::load(&modules_dir).expect("module index");
    let boot_modules = [
        "virtio_blk",
        "virtio_pci",
        "virtio_scsi",
        "sd_mod",
        "squashfs",
        "erofs",
        "dm_verity",
        "dm-mod",
        "nvme",
        "ext4",
        "overlay",
        "br_netfilter",
    ];
    let order = index.closure(&boot_modules).expect("closure");
    let position = |name: &str| {
        order
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} not in closure {order:?}"))
    };
    assert!(position("virtio_ring") < position("virtio_blk"));
    assert!(position("dm_mod") < position("dm_verity"));
    assert!(position("bridge") < position("br_netfilter"));
    assert!(index.is_builtin("ext4"));
    for (_, path) in &order {
        assert!(modules_dir.join(path).is_file(), "{}", path.display());
    }
    assert!(index.closure(&["no_such_module"]).is_err());
    // Only the modules an image can use ship (default platform `qemu`), and modules.dep lists
    // each of them: no file system, cluster storage or InfiniBand driver.
    let shipped = kmod::scan(&modules_dir).expect("scanning shipped modules");
    assert!(
        (60..200).contains(&shipped.len()),
        "{} modules shipped",
        shipped.len()
    );
    for module in &shipped {
        assert!(
            dep.lines()
                .any(|l| l.starts_with(&format!("{}:", module.path))),
            "{} shipped but not in modules.dep",
            module.path
        );
    }
    for name in [
        "xfs",
        "btrfs",
        "nfs",
        "ceph",
        "ib_core",
        "kvm",
        "gve",
        "hv_netvsc",
    ] {
        assert!(!index.contains(name), "{name} shipped");
    }
    for name in os_config::modules::ENGINE
        .iter()
        .chain(os_config::modules::NETWORK)
        .chain(["virtio_net", "efi_pstore"].iter())
    {
        assert!(index.contains(name), "{name} not shipped");
    }

    // Configuration.
    let os_release = std::fs::read_to_string(root.join("etc/os-release")).expect("os-release");
    assert!(os_release.contains("ID=plinth\n") && os_release.contains("VERSION_ID=1.2.3\n"));
    assert!(root.join("usr/lib/os-release").is_file());
    assert!(std::fs::read_to_string(root.join("etc/group"))
        .expect("group")
        .contains("docker:x:"));
    assert_eq!(
        std::fs::read_to_string(root.join("etc/docker/daemon.json")).expect("daemon.json"),
        "{\n  \"debug\": false,\n  \"log-driver\": \"json-file\"\n}\n"
    );
    let bundle =
        std::fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt")).expect("CA bundle");
    assert!(bundle.matches("BEGIN CERTIFICATE").count() > 100);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/motd")).expect("motd"),
        "hello\n"
    );
    assert_eq!(
        std::fs::read_link(root.join("etc/resolv.conf")).expect("link"),
        Path::new("../run/resolv.conf")
    );
    for dir in ["proc", "sys", "dev", "run", "var", "tmp", "sysroot"] {
        assert!(root.join(dir).is_dir(), "/{dir}");
    }
    assert!(!root.join("usr/bin/plinth-init").exists());

    // Figures for the record.
    let listing = rootfs::listing(root).expect("listing");
    eprintln!(
        "tree: {} entries, {} files, {}; {checked} ELF objects",
        listing.lines().count(),
        listing.lines().filter(|l| l.contains(" f ")).count(),
        du(root)
    );

    // The same inputs give the same tree, whatever the package order.
    let mut reversed = packages.clone();
    reversed.reverse();
    let work2 = tempfile::tempdir().expect("tempdir");
    let tree2 = assemble(&reversed, work2.path());
    let listing2 = rootfs::listing(&tree2.root).expect("listing");
    if listing != listing2 {
        let diff: Vec<_> = listing
            .lines()
            .zip(listing2.lines())
            .filter(|(a, b)| a != b)
            .take(5)
            .collect();
        panic!("two assemblies differ: {diff:?}");
    }
    assert_eq!(
        std::fs::read(&tree.vmlinuz).expect("vmlinuz"),
        std::fs::read(&tree2.vmlinuz).expect("vmlinuz")
    );
}

/// The generated module tables agree with Debian's own `depmod` (from the `kmod` package,
/// run inside a chroot of the extracted packages): same dependencies, aliases and soft
/// dependencies for every module, and a valid load order in each `modules.dep` line.
#[test]
fn module_tables_match_debian_depmod() {
    let packages = fetch_packages();
    let work = tempfile::tempdir().expect("tempdir");
    let full = work.path();
    for top in paths::MERGED_DIRS {
        std::os::unix::fs::symlink(format!("usr/{top}"), full.join(top)).expect("symlink");
    }
    for package in &packages {
        rootfs::deb::extract(&package.path, full).expect("extracting package");
    }
    let modules_root = full.join("usr/lib/modules");
    let mut versions: Vec<String> = std::fs::read_dir(&modules_root)
        .expect("modules dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    assert_eq!(versions.len(), 1, "{versions:?}");
    let version = versions.remove(0);
    let modules_dir = modules_root.join(&version);
    let count = kmod::write_tables(&modules_dir).expect("writing tables");
    assert!(count > 500, "only {count} modules");
    let read = |file: &str| std::fs::read_to_string(modules_dir.join(file)).expect(file);
    let (ours_dep, ours_alias, ours_softdep) = (
        read("modules.dep"),
        read("modules.alias"),
        read("modules.softdep"),
    );

    run_in_tree(full, &["/usr/sbin/depmod", &version]);
    let (debian_dep, debian_alias, debian_softdep) = (
        read("modules.dep"),
        read("modules.alias"),
        read("modules.softdep"),
    );
    assert!(
        modules_dir.join("modules.dep.bin").is_file(),
        "depmod did not write its tables"
    );

    let parse = |text: &str| -> std::collections::BTreeMap<String, Vec<String>> {
        text.lines()
            .map(|l| {
                let (module, deps) = l.split_once(':').expect("PATH: DEPS");
                (
                    module.to_owned(),
                    deps.split_whitespace().map(str::to_owned).collect(),
                )
            })
            .collect()
    };
    let (ours, debian) = (parse(&ours_dep), parse(&debian_dep));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        debian.keys().collect::<Vec<_>>(),
        "different module sets"
    );
    for (module, deps) in &ours {
        let mut a = deps.clone();
        let mut b = debian[module].clone();
        a.sort();
        b.sort();
        assert_eq!(a, b, "dependencies of {module}");
        // Loading from the end of the line backwards never loads a module before its deps.
        for (i, dep) in deps.iter().enumerate() {
            for later in &ours[dep] {
                assert!(
                    deps[i + 1..].contains(later),
                    "{module}: {dep} needs {later}, which is not after it"
                );
            }
        }
    }
    let sorted = |text: &str| {
        let mut lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        lines.sort();
        lines.join("\n")
    };
    assert_eq!(sorted(&ours_alias), sorted(&debian_alias));
    assert_eq!(sorted(&ours_softdep), sorted(&debian_softdep));
}
