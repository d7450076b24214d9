//! Builds test images with the real builder from real Debian packages, caching the result per
//! definition for the test process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

/// The workspace's top folder.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The static `plinth-init` that `scripts/build-init.sh` builds.
pub fn init_binary() -> Result<PathBuf> {
    static_binary("target/x86_64-unknown-linux-gnu/release/plinth-init")
}

/// The static `plinth-init` (with its `plinth-update`) built with init's `test-hooks` feature:
/// the agent pauses after each update stage when the kernel command line says
/// `plinth.update-stage-delay-ms=`. `scripts/build-init.sh` builds it too.
pub fn hooks_init_binary() -> Result<PathBuf> {
    static_binary("target/test-hooks/x86_64-unknown-linux-gnu/release/plinth-init")
}

fn static_binary(relative: &str) -> Result<PathBuf> {
    let path = workspace().join(relative);
    if !path.is_file() {
        bail!(
            "{} is missing: build it with scripts/build-init.sh (scripts/test.sh does)",
            path.display()
        );
    }
    Ok(path)
}

static BUILT: Mutex<BTreeMap<PathBuf, PathBuf>> = Mutex::new(BTreeMap::new());

/// Builds `definition` (with `lock`, the lock file to use, which must resolve the same roots)
/// into a folder under `target/qemu-tests`, once per test process (tests that need different
/// images build them side by side). Returns the raw disk image.
///
/// A lock whose packages are gone from the archive does not fail the tests: the copy is
/// re-locked against the mirror and the build retried, with a warning.
pub fn build(definition: &Path, lock: &Path) -> Result<PathBuf> {
    build_with(definition, lock, &init_binary()?)
}

/// [`build`] with the static `plinth-init` (and the `plinth-update` beside it) at `init`.
pub fn build_with(definition: &Path, lock: &Path, init: &Path) -> Result<PathBuf> {
    build_formats(definition, lock, init, false)
}

/// [`build_with`] that also writes the PXE folder (`plinth build --format pxe`); returns the raw
/// disk image and the folder.
pub fn build_pxe(definition: &Path, lock: &Path, init: &Path) -> Result<(PathBuf, PathBuf)> {
    let raw = build_formats(definition, lock, init, true)?;
    Ok((raw.clone(), builder::pxe::folder_for(&raw)))
}

/// Builds `definition` as raw, and with `pxe` also as a PXE folder, reusing an earlier build of
/// the same inputs that wrote what is asked for.
fn build_formats(definition: &Path, lock: &Path, init: &Path, pxe: bool) -> Result<PathBuf> {
    let has_pxe = |raw: &Path| !pxe || builder::pxe::folder_for(raw).join("pxe.json").is_file();
    let built = || {
        BUILT
            .lock()
            .map_err(|_| anyhow::anyhow!("image cache lock poisoned"))
    };
    if let Some(raw) = built()?.get(definition).filter(|raw| has_pxe(raw)) {
        return Ok(raw.clone());
    }
    let stem = definition
        .file_stem()
        .and_then(|s| s.to_str())
        .context("definition file name")?;
    let dir = workspace().join("target/qemu-tests").join(stem);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Tests of one process, and test processes running at the same time (the suite runs two
    // lanes of test binaries), build one folder at a time: the second waits, then reuses the
    // first's image. Different images build side by side.
    let _folder = lock_folder(&dir)?;
    let def_copy = dir.join(format!("{stem}.toml"));
    std::fs::copy(definition, &def_copy)
        .with_context(|| format!("copying {}", definition.display()))?;
    let lock_copy = builder::debian::lock::lock_path(&def_copy);
    std::fs::copy(lock, &lock_copy).with_context(|| format!("copying {}", lock.display()))?;
    let mut args = build_args(&def_copy, &dir.join("out"), init);
    if pxe {
        args.format.push("pxe".to_owned());
    }
    let key = inputs_key(&def_copy, &lock_copy, args.init.as_deref())?;
    let key_file = dir.join("inputs.sha256");
    if let Some(raw) = reusable(&key_file, &key, &args)?.filter(|raw| has_pxe(raw)) {
        built()?.insert(definition.to_path_buf(), raw.clone());
        return Ok(raw);
    }
    let _ = std::fs::remove_file(&key_file);
    let result = builder::build::build_image(&args);
    let result = match result {
        Err(err) if format!("{err:#}").contains("lock --update") => {
            eprintln!(
                "warning: {err:#}\nwarning: re-locking a copy of {} and building again",
                definition.display()
            );
            builder::debian::lock_command(&builder::debian::LockOptions {
                file: def_copy.clone(),
                update: true,
                cache: args.cache.clone(),
            })?;
            builder::build::build_image(&args)
        }
        other => other,
    };
    let raw = result
        .with_context(|| format!("building test image {}", definition.display()))?
        .raw;
    std::fs::write(&key_file, &key).with_context(|| format!("writing {}", key_file.display()))?;
    built()?.insert(definition.to_path_buf(), raw.clone());
    Ok(raw)
}

/// An exclusive lock on `dir` (on its `.lock` file) for as long as the returned file is open.
fn lock_folder(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

/// A digest of everything a test image is made from: the definition, its lock, the static
/// programs, and the builder's and the contract's sources. Test processes that find an image
/// built from the same inputs reuse it instead of building it again.
fn inputs_key(def: &Path, lock: &Path, init: Option<&Path>) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut files = vec![def.to_path_buf(), lock.to_path_buf()];
    if let Some(init) = init {
        files.push(init.to_path_buf());
        files.push(init.with_file_name("plinth-update"));
    }
    for dir in ["builder/src", "os-config/src"] {
        let mut stack = vec![workspace().join(dir)];
        while let Some(dir) = stack.pop() {
            for entry in
                std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
            {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    files.push(path);
                }
            }
        }
    }
    files[2..].sort();
    let mut hasher = Sha256::new();
    for file in files.iter().filter(|f| f.exists()) {
        hasher.update(file.display().to_string().as_bytes());
        hasher.update(std::fs::read(file).with_context(|| format!("reading {}", file.display()))?);
    }
    for var in ["SOURCE_DATE_EPOCH", "PLINTH_ROOT_FS"] {
        hasher.update(std::env::var(var).unwrap_or_default().as_bytes());
    }
    hasher.update(format!("zstd-level {:?}", zstd_level()).as_bytes());
    Ok(hex::encode(hasher.finalize()))
}

/// The raw image of an earlier build from the same inputs, if it is still there.
fn reusable(key_file: &Path, key: &str, args: &builder::build::Options) -> Result<Option<PathBuf>> {
    let Ok(old) = std::fs::read_to_string(key_file) else {
        return Ok(None);
    };
    let def = builder::build::load_definition(&args.file)?;
    let raw = args
        .output
        .join(format!("{}-{}.raw", def.image.name, def.image.version));
    Ok((old.trim() == key && raw.is_file()).then_some(raw))
}

/// The zstd level test images are built at: 3, which builds the root image about 30 times
/// faster than the default 15 for a 12% larger image (none when `PLINTH_ROOT_FS=erofs`, which
/// takes no level). What the tests check does not depend on the level; the benchmark and the
/// size report keep the default.
fn zstd_level() -> Option<u32> {
    matches!(
        builder::disk::RootFormat::from_env(),
        Ok(builder::disk::RootFormat::Squashfs)
    )
    .then_some(3)
}

fn build_args(def: &Path, out: &Path, init: &Path) -> builder::build::Options {
    builder::build::Options {
        file: def.to_path_buf(),
        output: out.to_path_buf(),
        format: vec!["raw".to_owned()],
        init: Some(init.to_path_buf()),
        keep_tree: None,
        cache: builder::cache::Options {
            dir: None,
            offline: false,
        },
        zstd_level: zstd_level(),
    }
}

/// Copies a built disk image (sparse-aware through `cp`) so a test can change it freely.
pub fn private_copy(raw: &Path, dir: &Path) -> Result<PathBuf> {
    let dest = dir.join(raw.file_name().context("disk file name")?);
    let status = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(raw)
        .arg(&dest)
        .status()
        .context("running cp")?;
    if !status.success() {
        bail!("copying {} to {} failed", raw.display(), dest.display());
    }
    Ok(dest)
}
