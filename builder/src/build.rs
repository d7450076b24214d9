//! The build pipeline: definition → lock → cached packages → root tree → disk image → outputs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use os_config::Definition;

use crate::progress::Step;

/// `SOURCE_DATE_EPOCH` used when the environment sets none: 2024-01-01T00:00:00Z, so that two
/// builds of the same inputs are identical without any setup.
pub const DEFAULT_SOURCE_DATE_EPOCH: u64 = 1_704_067_200;

/// Reads and validates a definition file.
pub fn load_definition(path: &Path) -> Result<Definition> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading image definition {}", path.display()))?;
    Ok(Definition::parse_bytes(
        &path.display().to_string(),
        &bytes,
    )?)
}

/// `plinth check FILE`.
pub fn check(file: &Path) -> Result<()> {
    let def = load_definition(file)?;
    println!(
        "{}: ok ({} {}, {} container(s), {} file(s))",
        file.display(),
        def.image.name,
        def.image.version,
        def.containers.len(),
        def.files.len()
    );
    Ok(())
}

/// The `SOURCE_DATE_EPOCH` of this build.
pub fn source_date_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(text) => text.trim().parse().with_context(|| {
            format!("SOURCE_DATE_EPOCH=`{text}` is not a number of seconds since 1970")
        }),
        Err(_) => Ok(DEFAULT_SOURCE_DATE_EPOCH),
    }
}

/// Where `scripts/build-init.sh` puts the static `plinth-init`, relative to the workspace.
pub const STATIC_INIT: &str = "target/x86_64-unknown-linux-gnu/release/plinth-init";

/// Finds the static `plinth-init` to put into the image: `--init`/`$PLINTH_INIT`, else the
/// static build of the workspace `plinth` was built in (or of the current folder). The binary
/// must be statically linked: the initramfs has no shared libraries.
pub fn find_init(explicit: Option<&Path>) -> Result<PathBuf> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => {
            let mut candidates = Vec::new();
            if let Ok(exe) = std::env::current_exe() {
                // target/<profile>/plinth → the workspace is two folders up.
                if let Some(top) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
                    candidates.push(top.join(STATIC_INIT));
                }
            }
            candidates.push(PathBuf::from(STATIC_INIT));
            candidates.into_iter().find(|c| c.is_file()).ok_or_else(|| {
                anyhow::anyhow!(
                    "no static plinth-init found at {STATIC_INIT}: build it with scripts/build-init.sh, or pass --init FILE"
                )
            })?
        }
    };
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading plinth-init binary {} (build it with scripts/build-init.sh)",
            path.display()
        )
    })?;
    let elf = goblin::elf::Elf::parse(&bytes)
        .with_context(|| format!("{} is not an ELF executable", path.display()))?;
    if let Some(interp) = elf.interpreter {
        bail!(
            "{} is dynamically linked (interpreter {interp}); the initramfs needs a static build: scripts/build-init.sh",
            path.display()
        );
    }
    Ok(path)
}

/// The output formats `plinth build --format` accepts.
pub const FORMATS: [&str; 6] = ["raw", "qcow2", "vhd", "vmdk", "gce", "pxe"];

/// Refuses an output format that is not in [`FORMATS`], naming the allowed ones.
pub fn check_formats(formats: &[String]) -> Result<()> {
    for format in formats {
        if !FORMATS.contains(&format.as_str()) {
            bail!(
                "unknown output format `{format}` in --format: use {}",
                FORMATS.join(", ")
            );
        }
    }
    Ok(())
}

/// What to build and where to write it.
#[derive(Debug, Clone)]
pub struct Options {
    /// The image definition to build.
    pub file: PathBuf,
    /// Folder the outputs are written to.
    pub output: PathBuf,
    /// Output formats: raw, qcow2, vhd, vmdk, gce, pxe (raw is always written).
    pub format: Vec<String>,
    /// Static plinth-init binary to put in the image; `None` looks for it (see [`find_init`]).
    pub init: Option<PathBuf>,
    /// Also keep the assembled root tree in this folder.
    pub keep_tree: Option<PathBuf>,
    /// The download cache.
    pub cache: crate::cache::Options,
    /// The zstd level of the squashfs root and the initramfs; `None` is their defaults (15 and 19),
    /// which what is published should keep. Lower levels build faster and larger (see
    /// [`crate::disk::rootimage`]).
    pub zstd_level: Option<u32>,
}

/// Paths of a finished build.
#[derive(Debug)]
pub struct Built {
    pub raw: PathBuf,
    pub outputs: Vec<PathBuf>,
    pub root_hash: String,
}

/// `plinth build FILE`.
pub fn build(args: &Options) -> Result<()> {
    let built = build_image(args)?;
    for output in &built.outputs {
        println!("{}", output.display());
    }
    Ok(())
}

/// Builds the image a definition describes; returns where it was written.
pub fn build_image(args: &Options) -> Result<Built> {
    let started = std::time::Instant::now();
    let def = load_definition(&args.file)?;
    let def_dir = args
        .file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Every refusal that needs no work comes before the output folder is touched.
    check_formats(&args.format)?;
    let lock = crate::debian::load_lock(&def, &args.file)?;
    check_local_archives(&def, def_dir)?;
    let mut tools = vec![crate::tools::MKSQUASHFS, crate::tools::MKFS_EXT4];
    if args
        .format
        .iter()
        .any(|f| !["raw", "pxe", "gce"].contains(&f.as_str()))
    {
        tools.push(crate::tools::QEMU_IMG);
    }
    let gce = args.format.iter().any(|f| f == "gce");
    if gce {
        tools.push(crate::tools::TAR);
    }
    let pxe = args.format.iter().any(|f| f == "pxe");
    if pxe {
        tools.push(crate::tools::OBJCOPY);
    }
    crate::tools::require(&tools)?;
    let init = find_init(args.init.as_deref())?;
    let epoch = source_date_epoch()?;

    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating output folder {}", args.output.display()))?;
    let work = tempfile::Builder::new()
        .prefix(".plinth-build-")
        .tempdir_in(&args.output)
        .with_context(|| {
            format!(
                "creating a work folder in {} (is it writable?)",
                args.output.display()
            )
        })?;

    let step = Step::start("fetching packages");
    let packages = crate::debian::fetch_packages(&lock, &def, &args.cache)?;
    step.done(&format!("{} packages", packages.len()));

    let step = Step::start("assembling root tree");
    let tree = crate::rootfs::assemble(&def, def_dir, &packages, work.path(), epoch)?;
    install_payload(&def, &args.file, &init, &tree.root)?;
    install_container_images(&def, def_dir, &tree, &args.cache, epoch)?;
    crate::rootfs::tree::normalise(&tree.root, epoch, &[("tmp", 0o1777), ("root", 0o700)])?;
    step.done("");

    let modules_dir = tree.root.join("usr/lib/modules").join(&tree.kernel_version);
    let index = crate::rootfs::kmod::ModuleIndex::load(&modules_dir)?;
    // The initramfs modules stage 1 loads by name (built-in and absent ones skipped).
    let wanted: Vec<&str> = os_config::initramfs::MODULES
        .iter()
        .copied()
        .filter(|m| !index.is_builtin(m) && index.contains(m))
        .collect();
    let modules = index.closure(&wanted)?;
    let initrd_modules: Vec<_> = modules
        .into_iter()
        .map(|(name, rel)| (name, modules_dir.join(&rel), rel.display().to_string()))
        .collect();

    let raw = args
        .output
        .join(format!("{}-{}.raw", def.image.name, def.image.version));
    let inputs = crate::disk::DiskInputs {
        def: &def,
        tree: &tree.root,
        vmlinuz: &tree.vmlinuz,
        systemd_boot_efi: &tree.systemd_boot_efi,
        init_binary: &init,
        initrd_modules: &initrd_modules,
        kernel_version: &tree.kernel_version,
        source_date_epoch: epoch,
        zstd_level: args.zstd_level,
    };
    let report = crate::disk::write_disk(&inputs, &raw)?;
    let step = Step::start("size by component");
    let sizes = crate::size_report::measure(
        &tree.root,
        &tree.kernel_version,
        report.kernel_size,
        report.initrd_size,
        report.root_image_size,
        &report.root_hash,
    )?;
    let sizes_path = crate::size_report::SizeReport::path_for(&raw);
    sizes.write(&sizes_path)?;
    step.done(&sizes_path.display().to_string());
    eprint!("{}", sizes.format_text());
    let mut outputs = vec![raw.clone()];
    let others: Vec<String> = args
        .format
        .iter()
        .filter(|f| !["raw", "pxe", "gce"].contains(&f.as_str()))
        .cloned()
        .collect();
    if !others.is_empty() {
        outputs.extend(crate::disk::convert(&raw, &others)?);
    }
    if gce {
        let step = Step::start("gce output");
        let out = crate::disk::gce::write_gce(&raw, epoch)?;
        step.done(&out.display().to_string());
        outputs.push(out);
    }
    if pxe {
        let inputs = crate::pxe::PxeInputs {
            raw: &raw,
            stub: &tree.linux_efi_stub,
            name: &def.image.name,
            version: &def.image.version,
            source_date_epoch: epoch,
        };
        let report = crate::pxe::write_pxe(&inputs, &crate::pxe::folder_for(&raw))?;
        outputs.push(report.folder);
    }
    if let Some(keep) = &args.keep_tree {
        if keep.exists() {
            std::fs::remove_dir_all(keep)
                .with_context(|| format!("removing old {}", keep.display()))?;
        }
        std::fs::rename(&tree.root, keep)
            .with_context(|| format!("keeping the tree at {}", keep.display()))?;
    }
    eprintln!(
        "==> built {} in {:.1}s (root hash {})",
        raw.display(),
        started.elapsed().as_secs_f64(),
        report.root_hash
    );
    Ok(Built {
        raw,
        outputs,
        root_hash: report.root_hash,
    })
}

/// Where `plinth-init` finds the archive of a container's image on the machine.
pub fn image_archive_path(container: &str) -> String {
    format!("{}/{container}.tar", os_config::rootfs::IMAGE_ARCHIVES)
}

/// Refuses, before anything is fetched, a `[[container]] archive = { path }` that names no file:
/// such archives are made by the user (`docker save`), and the error says how.
fn check_local_archives(def: &Definition, def_dir: &Path) -> Result<()> {
    for container in &def.containers {
        let Some(path) = container
            .archive
            .as_ref()
            .filter(|a| a.url.is_none())
            .and_then(|a| a.path.as_ref())
        else {
            continue;
        };
        let file = def_dir.join(path);
        if !file.is_file() {
            bail!(
                "[[container]] `{}`: its image archive {} does not exist; make it with \
                 `docker save {} -o {}` and put its `sha256sum` into `archive = {{ path, sha256 }}`",
                container.name,
                file.display(),
                container.image,
                file.display()
            );
        }
    }
    Ok(())
}

/// Writes the archive of every container image that is built from packages or given as an
/// archive into the tree, where `plinth-init` loads it on first boot.
fn install_container_images(
    def: &Definition,
    def_dir: &Path,
    tree: &crate::rootfs::Tree,
    cache: &crate::cache::Options,
    epoch: u64,
) -> Result<()> {
    for container in &def.containers {
        let dest = tree.root.join(image_archive_path(container.name.as_str()));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if let Some(source) = &container.archive {
            let location = match (&source.url, &source.path) {
                (Some(url), _) => url.clone(),
                (None, Some(path)) => def_dir.join(path).display().to_string(),
                (None, None) => bail!(
                    "[[container]] `{}` archive has neither url nor path",
                    container.name
                ),
            };
            let cached =
                crate::cache::fetch_verified(&location, source.sha256.as_str(), None, cache)
                    .with_context(|| {
                        format!(
                            "fetching the image archive of container `{}`",
                            container.name
                        )
                    })?;
            std::fs::copy(&cached, &dest)
                .with_context(|| format!("copying {} into the image", cached.display()))?;
        } else if container.build.is_some() {
            let layer = tree
                .images
                .iter()
                .find(|(name, _)| name == container.name.as_str())
                .map(|(_, layer)| layer)
                .with_context(|| {
                    format!(
                        "no image tree was assembled for container `{}`",
                        container.name
                    )
                })?;
            let config = crate::container_image::ImageConfig {
                reference: container.image.clone(),
                cmd: container.command.clone(),
                env: vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
                ],
            };
            let id = crate::container_image::write_docker_archive(layer, &config, epoch, &dest)?;
            eprintln!("    container image {} ({id})", container.image);
        }
    }
    Ok(())
}

/// Puts Plinth's own programs and the definition into the tree.
fn install_payload(def: &Definition, def_path: &Path, init: &Path, root: &Path) -> Result<()> {
    let bin = root.join("usr/bin");
    std::fs::create_dir_all(&bin)?;
    for name in ["plinth-init", "plinth-update"] {
        let source = init.with_file_name(name);
        if source.is_file() {
            let dest = bin.join(name);
            std::fs::copy(&source, &dest)
                .with_context(|| format!("copying {} into the image", source.display()))?;
        } else if name == "plinth-init" {
            bail!("{} does not exist", source.display());
        }
    }
    let dest = root.join(os_config::rootfs::IMAGE_DEFINITION);
    if let Some(lib) = dest.parent() {
        std::fs::create_dir_all(lib)?;
    }
    let text =
        std::fs::read(def_path).with_context(|| format!("reading {}", def_path.display()))?;
    std::fs::write(dest, text)?;
    if let Some(ca) = def.update.as_ref().and_then(|u| u.ca.as_ref()) {
        let def_dir = def_path.parent().unwrap_or(Path::new("."));
        let pem = read_update_ca(&def_dir.join(ca)).with_context(|| {
            format!("[update] ca = {:?} in {}", ca.display(), def_path.display())
        })?;
        let dest = root.join(os_config::definition::UPDATE_CA_IN_IMAGE.trim_start_matches('/'));
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&dest, pem).with_context(|| format!("writing {}", dest.display()))?;
    }
    if let Some(tls) = &def.engine.tls {
        let def_dir = def_path.parent().unwrap_or(Path::new("."));
        install_engine_tls(tls, def_dir, root)
            .with_context(|| format!("[engine] tls in {}", def_path.display()))?;
    }
    Ok(())
}

/// Places the `[engine] tls` files at [`os_config::definition::ENGINE_TLS_IN_IMAGE`] as
/// `ca.pem`, `cert.pem` (0644) and `key.pem` (0600), each checked to be PEM of its kind.
fn install_engine_tls(
    tls: &os_config::definition::EngineTlsFiles,
    def_dir: &Path,
    root: &Path,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join(os_config::definition::ENGINE_TLS_IN_IMAGE.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let sources = [
        ("ca", &tls.ca, "CERTIFICATE-----"),
        ("cert", &tls.cert, "CERTIFICATE-----"),
        ("key", &tls.key, "PRIVATE KEY-----"),
    ];
    for ((key, source, label), (name, mode)) in sources
        .into_iter()
        .zip(os_config::definition::ENGINE_TLS_FILES)
    {
        let path = def_dir.join(source);
        let pem = std::fs::read(&path).with_context(|| {
            format!("{key} = {:?}: reading {}", source.display(), path.display())
        })?;
        let text = String::from_utf8_lossy(&pem);
        let is_pem = text
            .lines()
            .any(|l| l.trim().starts_with("-----BEGIN") && l.trim().ends_with(label));
        if !is_pem {
            bail!(
                "{key} = {:?}: {} holds no PEM block ending in `{label}`",
                source.display(),
                path.display()
            );
        }
        let dest = dir.join(name);
        std::fs::write(&dest, &pem).with_context(|| format!("writing {}", dest.display()))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", dest.display()))?;
    }
    Ok(())
}

/// Reads the `[update] ca` file: PEM text with at least one certificate.
fn read_update_ca(path: &Path) -> Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8_lossy(&pem);
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        bail!(
            "{} holds no PEM certificate (expected `-----BEGIN CERTIFICATE-----` blocks)",
            path.display()
        );
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_formats_include_pxe_and_unknown_ones_name_the_allowed() {
        let formats = |list: &[&str]| list.iter().map(|f| (*f).to_owned()).collect::<Vec<_>>();
        check_formats(&formats(&["raw", "qcow2", "vhd", "vmdk", "gce", "pxe"])).expect("all known");
        let err = check_formats(&formats(&["raw", "iso"])).expect_err("iso is unknown");
        let text = err.to_string();
        assert!(text.contains("`iso`"), "{text}");
        assert!(text.contains("raw, qcow2, vhd, vmdk, gce, pxe"), "{text}");
    }

    #[test]
    fn engine_tls_files_are_placed_with_their_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let def_path = dir.path().join("image.toml");
        let text = "[image]\nname = \"demo\"\nversion = \"1\"\n\n[engine]\ntls = { ca = \"tls/ca.pem\", cert = \"tls/server.pem\", key = \"tls/server-key.pem\" }\n";
        std::fs::write(&def_path, text).expect("definition");
        let def = Definition::parse("image.toml", text).expect("parses");
        let init = dir.path().join("bin/plinth-init");
        std::fs::create_dir_all(init.parent().expect("bin")).expect("mkdir");
        std::fs::write(&init, "init").expect("init");
        let root = dir.path().join("root");
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let key = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
        std::fs::create_dir_all(dir.path().join("tls")).expect("mkdir");
        std::fs::write(dir.path().join("tls/ca.pem"), cert).expect("ca");
        std::fs::write(dir.path().join("tls/server.pem"), cert).expect("cert");
        // Missing key, then a certificate where the key goes: errors name the key and the file.
        let err = install_payload(&def, &def_path, &init, &root).expect_err("missing");
        let text = format!("{err:#}");
        assert!(
            text.contains("[engine] tls") && text.contains("key = \"tls/server-key.pem\""),
            "{text}"
        );
        std::fs::write(dir.path().join("tls/server-key.pem"), cert).expect("key");
        let err = install_payload(&def, &def_path, &init, &root).expect_err("not a key");
        assert!(format!("{err:#}").contains("PRIVATE KEY"), "{err:#}");
        std::fs::write(dir.path().join("tls/server-key.pem"), key).expect("key");
        install_payload(&def, &def_path, &init, &root).expect("installs");
        let placed = root.join("usr/lib/plinth/engine-tls");
        for (name, content, mode) in [
            ("ca.pem", cert, 0o644),
            ("cert.pem", cert, 0o644),
            ("key.pem", key, 0o600),
        ] {
            let path = placed.join(name);
            assert_eq!(std::fs::read_to_string(&path).expect("placed"), content);
            let meta = std::fs::metadata(&path).expect("metadata");
            assert_eq!(meta.permissions().mode() & 0o7777, mode, "{name}");
        }
    }

    #[test]
    fn the_update_ca_is_placed_where_the_agent_reads_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let def_path = dir.path().join("image.toml");
        let key = os_config::manifest::SecretKey::from_seed([7; 32]).public();
        let text = format!("[image]\nname = \"demo\"\nversion = \"1\"\n\n[update]\nurl = \"https://[fd00::1]/r\"\nkeys = [\"{key}\"]\nca = \"certs/ca.pem\"\n");
        std::fs::write(&def_path, &text).expect("definition");
        let def = Definition::parse("image.toml", &text).expect("parses");
        let init = dir.path().join("bin/plinth-init");
        std::fs::create_dir_all(init.parent().expect("bin")).expect("mkdir");
        std::fs::write(&init, "init").expect("init");
        let root = dir.path().join("root");
        // Missing, then not PEM: errors name the key and the file.
        let err = install_payload(&def, &def_path, &init, &root).expect_err("missing");
        let text = format!("{err:#}");
        assert!(
            text.contains("[update] ca = \"certs/ca.pem\"") && text.contains("certs/ca.pem"),
            "{text}"
        );
        std::fs::create_dir_all(dir.path().join("certs")).expect("mkdir");
        std::fs::write(dir.path().join("certs/ca.pem"), "not a certificate").expect("ca");
        let err = install_payload(&def, &def_path, &init, &root).expect_err("not pem");
        assert!(
            format!("{err:#}").contains("holds no PEM certificate"),
            "{err:#}"
        );
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        std::fs::write(dir.path().join("certs/ca.pem"), pem).expect("ca");
        install_payload(&def, &def_path, &init, &root).expect("installs");
        assert_eq!(
            std::fs::read_to_string(root.join("usr/share/plinth/update-ca.pem")).expect("placed"),
            pem
        );
    }
}
