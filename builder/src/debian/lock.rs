//! The lock file (`FILE.lock` next to `FILE.toml`): the exact Debian packages an image is built
//! from, and the definition inputs (suite, root packages) they were resolved for.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use os_config::Definition;
use serde::{Deserialize, Serialize};

use super::resolve::Package;

/// First lines of every lock file.
const HEADER: &str = "# Written by `plinth lock`: the exact Debian packages this image is built from.\n# Do not edit; refresh with `plinth lock --update` on the definition.\n\n";

/// A whole lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Lockfile {
    /// `[debian] suite` of the definition.
    pub suite: String,
    /// The root packages (see [`super::roots`]), sorted.
    pub roots: Vec<String>,
    /// Every resolved package, sorted by name.
    #[serde(default, rename = "package")]
    pub packages: Vec<LockedPackage>,
    /// The definition this lock belongs to (set when loaded; not stored).
    #[serde(skip)]
    pub definition: PathBuf,
}

/// One pinned package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LockedPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// The suite it was resolved from, e.g. `bookworm-security`.
    pub suite: String,
    /// Pool path relative to the archive root.
    pub filename: String,
    pub size: u64,
    pub sha256: String,
}

impl From<&Package> for LockedPackage {
    fn from(package: &Package) -> LockedPackage {
        LockedPackage {
            name: package.name.clone(),
            version: package.version.clone(),
            architecture: package.architecture.clone(),
            suite: package.suite.clone(),
            filename: package.filename.clone(),
            size: package.size,
            sha256: package.sha256.clone(),
        }
    }
}

impl Lockfile {
    /// A lock for `roots` from resolved `packages` (sorted here).
    pub fn new(
        suite: &str,
        roots: Vec<String>,
        packages: &[Package],
        definition: &Path,
    ) -> Lockfile {
        let mut packages: Vec<LockedPackage> = packages.iter().map(LockedPackage::from).collect();
        packages.sort_by(|a, b| a.name.cmp(&b.name));
        Lockfile {
            suite: suite.to_owned(),
            roots,
            packages,
            definition: definition.to_owned(),
        }
    }

    /// Parses lock text; `name` is only used in errors.
    pub fn parse(name: &str, text: &str) -> Result<Lockfile> {
        let lock: Lockfile =
            toml::from_str(text).with_context(|| format!("parsing lock file {name}"))?;
        for package in &lock.packages {
            if package.sha256.len() != 64 || !package.sha256.bytes().all(|b| b.is_ascii_hexdigit())
            {
                bail!(
                    "lock file {name}: package `{}` has a bad sha256 `{}`",
                    package.name,
                    package.sha256
                );
            }
            if package.filename.starts_with('/') || package.filename.split('/').any(|p| p == "..") {
                bail!(
                    "lock file {name}: package `{}` has a bad filename `{}`",
                    package.name,
                    package.filename
                );
            }
        }
        Ok(lock)
    }

    /// The lock as TOML text: stable field and package order.
    pub fn to_text(&self) -> Result<String> {
        let body = toml::to_string_pretty(self).context("serializing the lock file")?;
        Ok(format!("{HEADER}{body}"))
    }

    /// Whether this lock was resolved for what `def` asks for now.
    pub fn matches(&self, def: &Definition) -> bool {
        self.mismatch(def).is_none()
    }

    /// How this lock differs from what `def` asks for, if it does.
    pub fn mismatch(&self, def: &Definition) -> Option<String> {
        if self.suite != def.debian.suite {
            return Some(format!(
                "it is for suite {}, the definition names {}",
                self.suite, def.debian.suite
            ));
        }
        let roots = super::roots(def);
        if self.roots != roots {
            let added: Vec<&str> = roots
                .iter()
                .filter(|r| !self.roots.contains(r))
                .map(String::as_str)
                .collect();
            let removed: Vec<&str> = self
                .roots
                .iter()
                .filter(|r| !roots.contains(r))
                .map(String::as_str)
                .collect();
            let mut parts = Vec::new();
            if !added.is_empty() {
                parts.push(format!("added {}", added.join(", ")));
            }
            if !removed.is_empty() {
                parts.push(format!("removed {}", removed.join(", ")));
            }
            return Some(format!(
                "the definition's packages changed ({})",
                parts.join("; ")
            ));
        }
        None
    }

    /// Total size of every package, in bytes.
    pub fn total_size(&self) -> u64 {
        self.packages.iter().map(|p| p.size).sum()
    }
}

/// Where the lock of the definition at `def_path` lives: same name, `.lock` extension.
pub fn lock_path(def_path: &Path) -> PathBuf {
    def_path.with_extension("lock")
}

/// Reads the lock at `path`; `Ok(None)` when there is none.
pub fn read(path: &Path, def_path: &Path) -> Result<Option<Lockfile>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading lock file {}", path.display())),
    };
    let mut lock = Lockfile::parse(&path.display().to_string(), &text)?;
    lock.definition = def_path.to_owned();
    Ok(Some(lock))
}

/// Writes the lock atomically: a temporary file in the same folder, synced, then renamed.
pub fn write(lock: &Lockfile, path: &Path) -> Result<()> {
    let text = lock.to_text()?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".plinth-lock-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    std::io::Write::write_all(&mut temp, text.as_bytes())
        .with_context(|| format!("writing {}", temp.path().display()))?;
    temp.as_file()
        .sync_all()
        .with_context(|| format!("syncing {}", temp.path().display()))?;
    temp.persist(path)
        .with_context(|| format!("writing lock file {}", path.display()))?;
    Ok(())
}

/// The lock `plinth build` uses: present, parseable and resolved for this definition, or an
/// error naming the command that makes it so.
pub fn load_lock(def: &Definition, def_path: &Path) -> Result<Lockfile> {
    let path = lock_path(def_path);
    let command = format!("plinth lock {}", def_path.display());
    let lock = match read(&path, def_path) {
        Ok(Some(lock)) => lock,
        Ok(None) => bail!(
            "no lock file {} for {}: run `{command}` to resolve the Debian packages",
            path.display(),
            def_path.display()
        ),
        Err(e) => {
            return Err(e.context(format!(
                "the lock is unreadable: run `{command}` to write it again"
            )))
        }
    };
    if let Some(why) = lock.mismatch(def) {
        bail!(
            "lock file {} does not match {}: {why}; run `{command}`",
            path.display(),
            def_path.display()
        );
    }
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(packages: &str) -> Definition {
        let text = format!("[image]\nname = \"t\"\nversion = \"1.0.0\"\n[debian]\nsuite = \"bookworm\"\npackages = [{packages}]\n");
        Definition::parse("t.toml", &text).expect("definition")
    }

    fn package(name: &str) -> Package {
        Package {
            name: name.to_owned(),
            version: "1.0-1".to_owned(),
            architecture: "amd64".to_owned(),
            suite: "bookworm-security".to_owned(),
            filename: format!("pool/main/{name}_1.0-1_amd64.deb"),
            size: 1234,
            sha256: "ab".repeat(32),
            depends: Vec::new(),
            provides: Vec::new(),
        }
    }

    #[test]
    fn round_trips_sorted_and_stable() {
        let def = definition("\"zsh\"");
        let lock = Lockfile::new(
            "bookworm",
            super::super::roots(&def),
            &[package("zz"), package("aa")],
            Path::new("t.toml"),
        );
        assert_eq!(lock.packages[0].name, "aa");
        let text = lock.to_text().expect("text");
        assert!(text.starts_with("# Written by `plinth lock`"), "{text}");
        assert!(text.contains("[[package]]\nname = \"aa\""), "{text}");
        assert!(!text.contains("t.toml"), "{text}");
        let mut again = Lockfile::parse("t.lock", &text).expect("parses");
        again.definition = PathBuf::from("t.toml");
        assert_eq!(again, lock);
        assert_eq!(again.to_text().expect("text"), text);
    }

    #[test]
    fn load_lock_refuses_missing_and_stale_locks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let def_path = dir.path().join("img.toml");
        let def = definition("\"zsh\"");
        let err = load_lock(&def, &def_path).expect_err("missing");
        assert!(
            err.to_string()
                .contains(&format!("run `plinth lock {}`", def_path.display())),
            "{err}"
        );

        let lock = Lockfile::new(
            "bookworm",
            super::super::roots(&def),
            &[package("zsh")],
            &def_path,
        );
        write(&lock, &lock_path(&def_path)).expect("write");
        assert!(dir.path().join("img.lock").is_file());
        assert_eq!(load_lock(&def, &def_path).expect("loads"), lock);

        let changed = definition("\"zsh\", \"curl\"");
        let err = load_lock(&changed, &def_path).expect_err("stale");
        let text = err.to_string();
        assert!(text.contains("added curl"), "{text}");
        assert!(
            text.contains(&format!("run `plinth lock {}`", def_path.display())),
            "{text}"
        );

        std::fs::write(lock_path(&def_path), "suite = 1\n").expect("write");
        let err = load_lock(&def, &def_path).expect_err("garbage");
        assert!(format!("{err:#}").contains("plinth lock"), "{err:#}");
    }

    #[test]
    fn rejects_unsafe_filenames() {
        let text = format!("suite = \"bookworm\"\nroots = []\n[[package]]\nname = \"a\"\nversion = \"1\"\narchitecture = \"all\"\nsuite = \"bookworm\"\nfilename = \"../../etc/passwd\"\nsize = 1\nsha256 = \"{}\"\n", "a".repeat(64));
        assert!(Lockfile::parse("t.lock", &text).is_err());
    }
}
