//! Whole-tree passes: fixed timestamps and directory modes, and a sorted text listing used to
//! compare trees.

use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// Every entry below `root` (not `root` itself) as relative paths, sorted byte-wise, parents
/// before children.
pub fn walk(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    walk_into(root, "", &mut out)?;
    Ok(out)
}

fn walk_into(dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<()> {
    let mut names = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("reading directory {}", dir.display()))?
    {
        let entry = entry.with_context(|| format!("reading directory {}", dir.display()))?;
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| anyhow::anyhow!("non-UTF-8 file name {n:?} in {}", dir.display()))?;
        let kind = entry
            .file_type()
            .with_context(|| format!("reading {}", entry.path().display()))?;
        names.push((name, kind.is_dir()));
    }
    names.sort();
    for (name, is_dir) in names {
        let child = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        out.push(child.clone());
        if is_dir {
            walk_into(&dir.join(&name), &child, out)?;
        }
    }
    Ok(())
}

/// Sets every directory's mode to `0755` (except the ones in `special`, given with their mode)
/// and the modification and access time of every entry, `root` included, to `epoch`.
pub fn normalise(root: &Path, epoch: u64, special: &[(&str, u32)]) -> Result<()> {
    let time = filetime::FileTime::from_unix_time(
        i64::try_from(epoch).context("SOURCE_DATE_EPOCH is too large")?,
        0,
    );
    let mut entries = walk(root)?;
    // Children first, so nothing touches a directory after its time is set.
    entries.reverse();
    entries.push(String::new());
    for rel in entries {
        let path = if rel.is_empty() {
            root.to_owned()
        } else {
            root.join(&rel)
        };
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        if meta.is_dir() {
            let mode = special
                .iter()
                .find(|(p, _)| *p == rel)
                .map_or(0o755, |(_, m)| *m);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting mode of {}", path.display()))?;
        }
        filetime::set_symlink_file_times(&path, time, time)
            .with_context(|| format!("setting times of {}", path.display()))?;
    }
    Ok(())
}

/// One line per entry below `root`, sorted: `/path type mode size sha256` for files,
/// `/path d mode` for directories, `/path l -> target` for symlinks.
pub fn listing(root: &Path) -> Result<String> {
    let mut out = String::new();
    for rel in walk(root)? {
        let path = root.join(&rel);
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mode = meta.permissions().mode() & 0o7777;
        let kind = meta.file_type();
        if kind.is_symlink() {
            let target = std::fs::read_link(&path)
                .with_context(|| format!("reading symlink {}", path.display()))?;
            let _ = writeln!(out, "/{rel} l -> {}", target.display());
        } else if kind.is_dir() {
            let _ = writeln!(out, "/{rel} d {mode:04o}");
        } else if kind.is_file() {
            let _ = writeln!(
                out,
                "/{rel} f {mode:04o} {} {}",
                meta.len(),
                sha256_file(&path)?
            );
        } else {
            let _ = writeln!(out, "/{rel} ? {mode:04o}");
        }
    }
    Ok(out)
}

/// Hex sha256 of a file's content.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt};

    #[test]
    fn listing_and_normalise() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
        std::fs::create_dir_all(root.join("tmp")).expect("mkdir");
        std::fs::write(root.join("usr/bin/a"), b"abc").expect("write");
        std::fs::set_permissions(
            root.join("usr/bin/a"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        symlink("usr/bin", root.join("bin")).expect("symlink");
        normalise(root, 1_700_000_000, &[("tmp", 0o1777)]).expect("normalise");
        for p in ["", "usr", "usr/bin/a", "tmp"] {
            let meta = std::fs::symlink_metadata(root.join(p)).expect("meta");
            assert_eq!(meta.mtime(), 1_700_000_000, "{p}");
        }
        let link = std::fs::symlink_metadata(root.join("bin")).expect("meta");
        assert_eq!(link.mtime(), 1_700_000_000);
        assert_eq!(
            listing(root).expect("listing"),
            "/bin l -> usr/bin\n/tmp d 1777\n/usr d 0755\n/usr/bin d 0755\n\
/usr/bin/a f 0755 3 ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
        );
    }
}
