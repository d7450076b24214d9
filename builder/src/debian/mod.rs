//! Debian archive access: sources, signed indices, version ordering, dependency resolution, locks.

pub mod archive;
pub mod control;
pub mod lock;
pub mod resolve;
pub mod sources;
pub mod version;

use std::path::Path;

use anyhow::{bail, Context, Result};
use os_config::definition::EngineKind;
use os_config::Definition;

use crate::cache::{self, Cache};
use crate::fetch::FetchError;
use crate::progress::{Bytes, Step};
use archive::human_bytes;
pub use lock::{load_lock, LockedPackage, Lockfile};

/// Packages every image needs besides the engine's: the boot loader and the TLS roots.
const BASE_PACKAGES: [&str; 2] = ["systemd-boot-efi", "ca-certificates"];

/// The packages an engine kind needs.
fn engine_packages(kind: EngineKind) -> &'static [&'static str] {
    match kind {
        EngineKind::Docker => &["docker.io", "containerd", "runc", "tini", "iptables"],
    }
}

/// The packages a definition asks for directly: the kernel, the boot loader, the engine's,
/// `ca-certificates`, `[debian] packages` and every container's `build.packages`; sorted, deduped.
pub fn roots(def: &Definition) -> Vec<String> {
    let mut roots: Vec<String> = std::iter::once(def.kernel.package.as_str())
        .chain(BASE_PACKAGES)
        .chain(engine_packages(def.engine.kind).iter().copied())
        .chain(def.debian.packages.iter().map(String::as_str))
        .chain(
            def.containers
                .iter()
                .filter_map(|c| c.build.as_ref())
                .flat_map(|b| b.packages.iter().map(String::as_str)),
        )
        .map(str::to_owned)
        .collect();
    roots.sort();
    roots.dedup();
    roots
}

/// Resolves the definition's packages against the archive `mirrors` name into a lock (network
/// required).
pub fn resolve_lock(
    def: &Definition,
    def_path: &Path,
    mirrors: &sources::Mirrors,
    cache: &Cache,
) -> Result<Lockfile> {
    let def_dir = def_path.parent().unwrap_or(Path::new("."));
    let keyring = sources::keyring(def, def_dir)?;
    let mut universe = archive::load_universe(mirrors, &keyring, &def.debian.components, cache)?;
    let roots = roots(def);
    let step = Step::start(format!("resolving {} root packages", roots.len()));
    let packages = universe.resolve(&roots)?;
    let lock = Lockfile::new(&def.debian.suite, roots, &packages, def_path);
    step.done(&format!(
        "{} packages, {} to download",
        lock.packages.len(),
        human_bytes(lock.total_size())
    ));
    Ok(lock)
}

/// What `plinth lock` is asked to do.
#[derive(Debug, Clone)]
pub struct LockOptions {
    /// The image definition whose packages are resolved.
    pub file: std::path::PathBuf,
    /// Re-resolve every package to the newest version, even if the lock still matches.
    pub update: bool,
    /// The download cache.
    pub cache: cache::Options,
}

/// `plinth lock FILE`.
pub fn lock_command(args: &LockOptions) -> Result<()> {
    let def = crate::build::load_definition(&args.file)?;
    let path = lock::lock_path(&args.file);
    let existing = match lock::read(&path, &args.file) {
        Ok(existing) => existing,
        Err(e) => {
            eprintln!("    warning: {e:#}; resolving again");
            None
        }
    };
    if let Some(existing) = existing
        .as_ref()
        .filter(|l| !args.update && l.matches(&def))
    {
        eprintln!(
            "{} is up to date ({} packages, {}); `plinth lock --update {}` re-resolves to the newest versions",
            path.display(),
            existing.packages.len(),
            human_bytes(existing.total_size()),
            args.file.display()
        );
        return Ok(());
    }
    if args.cache.offline {
        bail!("`plinth lock` reads the archive's current indices and needs the network; run it without --offline");
    }
    let cache = Cache::open(&args.cache)?;
    let mirrors = sources::mirrors(&def, Path::new(sources::APT_DIR))?;
    let lock = match resolve_lock(&def, &args.file, &mirrors, &cache) {
        Ok(lock) => lock,
        Err(err) => {
            let unreachable = err
                .downcast_ref::<FetchError>()
                .is_some_and(|e| matches!(e, FetchError::Unreachable { .. }));
            if let (true, Some(existing)) = (unreachable, existing.as_ref()) {
                if existing.matches(&def) && missing_from_cache(existing, &cache)?.is_empty() {
                    return Err(err.context(format!(
                        "the Debian mirror is unreachable; {} still matches the definition and every package it names is cached, so `plinth build --offline {}` works",
                        path.display(),
                        args.file.display()
                    )));
                }
            }
            if unreachable {
                return Err(err.context("the Debian mirror is unreachable"));
            }
            return Err(err);
        }
    };
    let changes = existing.as_ref().map(|old| describe_changes(old, &lock));
    lock::write(&lock, &path)?;
    eprintln!(
        "wrote {}: {} packages, {} in all{}",
        path.display(),
        lock.packages.len(),
        human_bytes(lock.total_size()),
        changes.map(|c| format!(" ({c})")).unwrap_or_default()
    );
    Ok(())
}

/// A one-line summary of what changed between two locks.
fn describe_changes(old: &Lockfile, new: &Lockfile) -> String {
    let find = |lock: &Lockfile, name: &str| {
        lock.packages
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.version.clone())
    };
    let added = new
        .packages
        .iter()
        .filter(|p| find(old, &p.name).is_none())
        .count();
    let removed = old
        .packages
        .iter()
        .filter(|p| find(new, &p.name).is_none())
        .count();
    let changed = new
        .packages
        .iter()
        .filter(|p| find(old, &p.name).is_some_and(|v| v != p.version))
        .count();
    format!("{added} added, {removed} removed, {changed} changed version")
}

/// The packages of `lock` the cache lacks (after re-hashing the ones it has).
fn missing_from_cache<'a>(lock: &'a Lockfile, cache: &Cache) -> Result<Vec<&'a LockedPackage>> {
    let mut missing = Vec::new();
    for package in &lock.packages {
        if cache.lookup(&package.sha256, Some(package.size))?.is_none() {
            missing.push(package);
        }
    }
    Ok(missing)
}

/// Every package of the lock as a verified file in the cache, downloading what is missing;
/// sorted by name. With `--offline` only the cache is used.
pub fn fetch_packages(
    lock: &Lockfile,
    def: &Definition,
    cache: &cache::Options,
) -> Result<Vec<FetchedPackage>> {
    let cache = Cache::open(cache)?;
    fetch_with(lock, def, &cache, Path::new(sources::APT_DIR))
}

/// [`fetch_packages`] with an opened cache and the apt configuration folder to consult.
pub fn fetch_with(
    lock: &Lockfile,
    def: &Definition,
    cache: &Cache,
    apt_dir: &Path,
) -> Result<Vec<FetchedPackage>> {
    let step = Step::start(format!("checking {} cached packages", lock.packages.len()));
    let missing = missing_from_cache(lock, cache)?;
    step.done(&format!(
        "{} cached, {} missing",
        lock.packages.len() - missing.len(),
        missing.len()
    ));
    let definition = lock.definition.display().to_string();
    let definition = if definition.is_empty() {
        "FILE".to_owned()
    } else {
        definition
    };
    if !missing.is_empty() {
        if cache.offline() {
            let names: Vec<String> = missing
                .iter()
                .map(|p| format!("{} {}", p.name, p.version))
                .collect();
            bail!(
                "offline: {} of {} packages are not in the cache {}: {}; run once without --offline to fetch them",
                missing.len(),
                lock.packages.len(),
                cache.dir().display(),
                names.join(", ")
            );
        }
        let mirrors = sources::mirrors(def, apt_dir)?;
        let total: u64 = missing.iter().map(|p| p.size).sum();
        let step = Step::start(format!(
            "downloading {} packages ({})",
            missing.len(),
            human_bytes(total)
        ));
        let mut progress = Bytes::new("packages", total);
        for (done, package) in missing.iter().enumerate() {
            let url = mirrors.url_of(&package.suite).with_context(|| {
                format!(
                    "package `{}` comes from suite {}, which the definition does not use; run `plinth lock --update {definition}`",
                    package.name, package.suite
                )
            })?;
            let location = format!("{url}/{}", package.filename);
            if let Err(err) = cache.fetch(
                &location,
                &package.sha256,
                Some(package.size),
                Some(&mut progress),
            ) {
                progress.finish();
                return Err(match err.downcast_ref::<FetchError>() {
                    Some(FetchError::NotFound { .. }) => err.context(format!(
                        "{} {} is no longer in the archive (superseded); run `plinth lock --update {definition}` to lock the current versions",
                        package.name, package.version
                    )),
                    Some(FetchError::Unreachable { .. }) => err.context(format!(
                        "the Debian mirror {url} is unreachable, and {} of {} packages are not in the cache {} yet",
                        missing.len() - done,
                        lock.packages.len(),
                        cache.dir().display()
                    )),
                    _ => err.context(format!("fetching {} {}", package.name, package.version)),
                });
            }
        }
        progress.finish();
        step.done("");
    }
    lock.packages
        .iter()
        .map(|package| {
            Ok(FetchedPackage {
                name: package.name.clone(),
                version: package.version.clone(),
                architecture: package.architecture.clone(),
                path: cache.path_of(&package.sha256),
            })
        })
        .collect()
}

/// A Debian package from the lock, verified and present in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedPackage {
    /// Package name, e.g. `docker.io`.
    pub name: String,
    /// Debian version, e.g. `20.10.24+dfsg1-1+deb12u1`.
    pub version: String,
    /// `amd64` or `all`.
    pub architecture: String,
    /// The verified `.deb` file in the cache.
    pub path: std::path::PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_sorted_and_deduped() {
        let text = "[image]\nname = \"t\"\nversion = \"1.0.0\"\n[debian]\npackages = [\"zstd\", \"iptables\"]\n[[container]]\nname = \"web\"\nimage = \"x:1\"\nbuild = { packages = [\"busybox-static\", \"zstd\"] }\n";
        let def = Definition::parse("t.toml", text).expect("definition");
        assert_eq!(
            roots(&def),
            [
                "busybox-static",
                "ca-certificates",
                "containerd",
                "docker.io",
                "iptables",
                "linux-image-cloud-amd64",
                "runc",
                "systemd-boot-efi",
                "tini",
                "zstd"
            ]
        );
    }
}
