//! Paths inside a tree: normalising archive paths, the merged-/usr mapping, and resolving
//! symlinks as if the tree were `/` (never leaving it).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub use os_config::rootfs::{merge_usr, MERGED_USR_DIRS as MERGED_DIRS};

/// Most symlinks followed while resolving one path (as the kernel's limit).
const MAX_SYMLINKS: usize = 40;

/// Normalises a path from a package archive (`./usr/bin/x`, `usr/bin/x/`) into relative
/// components, refusing absolute paths and `..`. Returns `None` for the archive root itself.
pub fn normalise(raw: &str) -> Result<Option<String>> {
    if raw.starts_with('/') {
        bail!("absolute path `{raw}` in archive (only relative paths are allowed)");
    }
    let mut parts = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => bail!("path `{raw}` in archive contains `..`"),
            _ => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    Ok(Some(parts.join("/")))
}

/// The result of resolving a path inside a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The path with every symlink resolved, relative to the tree root.
    pub path: String,
    /// Every symlink passed on the way, relative to the tree root, in order.
    pub links: Vec<String>,
    /// Whether `path` exists.
    pub exists: bool,
}

/// Resolves `path` (absolute or relative to the tree root) inside `root`, following symlinks as
/// a process chrooted into `root` would: absolute targets start again at `root`, and `..` never
/// climbs above it. With `follow_last` false a final symlink is not followed.
pub fn resolve(root: &Path, path: &str, follow_last: bool) -> Result<Resolved> {
    let mut pending: Vec<String> = path
        .split('/')
        .filter(|p| !p.is_empty())
        .rev()
        .map(str::to_owned)
        .collect();
    let mut current: Vec<String> = Vec::new();
    let mut links = Vec::new();
    // Once an entry is missing (or not a directory), nothing below it exists: the rest of the
    // path is only normalised, never looked up.
    let mut exists = true;
    while let Some(part) = pending.pop() {
        match part.as_str() {
            "." => continue,
            ".." => {
                current.pop();
                continue;
            }
            _ => {}
        }
        current.push(part);
        if !exists {
            continue;
        }
        let rel = current.join("/");
        let full = root.join(&rel);
        let meta = match std::fs::symlink_metadata(&full) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                exists = false;
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", full.display())),
        };
        let is_last = pending.is_empty();
        if meta.file_type().is_symlink() && (!is_last || follow_last) {
            if links.len() >= MAX_SYMLINKS {
                bail!(
                    "too many levels of symbolic links resolving `{path}` in {}",
                    root.display()
                );
            }
            let target = std::fs::read_link(&full)
                .with_context(|| format!("reading symlink {}", full.display()))?;
            let target = target
                .to_str()
                .with_context(|| format!("symlink {} has a non-UTF-8 target", full.display()))?
                .to_owned();
            links.push(rel);
            current.pop();
            if target.starts_with('/') {
                current.clear();
            }
            pending.extend(
                target
                    .split('/')
                    .filter(|p| !p.is_empty())
                    .rev()
                    .map(str::to_owned),
            );
        } else if !is_last && !meta.is_dir() {
            exists = false;
        }
    }
    Ok(Resolved {
        path: current.join("/"),
        links,
        exists,
    })
}

/// Creates every missing directory of relative `dir` inside `root`, refusing to pass through a
/// symlink or a non-directory, so nothing is ever written outside `root`.
pub fn create_dirs(root: &Path, dir: &str) -> Result<()> {
    let mut path = PathBuf::from(root);
    for part in dir.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            bail!(
                "refusing to create `{dir}` in {}: `.` and `..` are not allowed",
                root.display()
            );
        }
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => bail!(
                "{} is not a directory (a symlink or file stands where a directory is needed)",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&path)
                    .with_context(|| format!("creating directory {}", path.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
    Ok(())
}

/// The parent of a relative path (`""` for a top-level entry).
pub fn parent(rel: &str) -> &str {
    rel.rsplit_once('/').map_or("", |(p, _)| p)
}

/// Removes whatever stands at `path` (file, symlink or directory tree), if anything.
pub fn remove_any(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path)
            .with_context(|| format!("removing directory {}", path.display())),
        Ok(_) => std::fs::remove_file(path).with_context(|| format!("removing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn normalise_refuses_escapes() {
        assert_eq!(
            normalise("./usr/bin/x").expect("ok"),
            Some("usr/bin/x".into())
        );
        assert_eq!(normalise("./").expect("ok"), None);
        assert_eq!(normalise("usr//lib/").expect("ok"), Some("usr/lib".into()));
        assert!(normalise("/etc/passwd").is_err());
        assert!(normalise("./usr/../../etc").is_err());
    }

    #[test]
    fn resolve_stays_inside_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/lib/x86_64-linux-gnu")).expect("mkdir");
        std::fs::write(root.join("usr/lib/x86_64-linux-gnu/libc.so.6"), b"x").expect("write");
        symlink("usr/lib", root.join("lib")).expect("symlink");
        std::fs::create_dir_all(root.join("usr/lib64")).expect("mkdir");
        symlink(
            "/lib/x86_64-linux-gnu/libc.so.6",
            root.join("usr/lib64/ld.so"),
        )
        .expect("symlink");
        symlink("../../../../../../etc/shadow", root.join("usr/escape")).expect("symlink");

        let r = resolve(root, "/usr/lib64/../../usr/lib64/ld.so", true).expect("resolve");
        assert_eq!(r.path, "usr/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(r.links, vec!["usr/lib64/ld.so", "lib"]);
        assert!(r.exists);

        let r = resolve(root, "usr/lib64/ld.so", false).expect("resolve");
        assert_eq!(r.path, "usr/lib64/ld.so");
        assert!(r.links.is_empty());

        let r = resolve(root, "usr/escape", true).expect("resolve");
        assert_eq!(r.path, "etc/shadow");
        assert!(!r.exists);

        // `..` after a missing entry is applied to the path, not looked up.
        symlink("missing/../../../../etc", root.join("usr/dangling")).expect("symlink");
        let r = resolve(root, "usr/dangling/x", true).expect("resolve");
        assert_eq!(r.path, "etc/x");
        assert!(!r.exists);

        symlink("loop", root.join("loop")).expect("symlink");
        assert!(resolve(root, "loop", true).is_err());
    }

    #[test]
    fn create_dirs_refuses_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        symlink(outside.path(), dir.path().join("evil")).expect("symlink");
        assert!(create_dirs(dir.path(), "evil/x").is_err());
        assert!(create_dirs(dir.path(), "a/../../x").is_err());
        create_dirs(dir.path(), "a/b/c").expect("plain dirs");
        assert!(dir.path().join("a/b/c").is_dir());
    }
}
