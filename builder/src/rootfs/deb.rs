//! Extracting `.deb` packages in-process: the `ar` container and its `data.tar.*` member,
//! written into a merged-/usr tree without ever writing outside it.

use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::paths;

/// Paths (merged-/usr, relative) whose content an image never needs: documentation, manual
/// pages, translations, shell completions, packaging metadata, and the hooks and service files
/// of init systems and initramfs generators Plinth does not use.
const DROPPED: [&str; 21] = [
    "usr/share/doc",
    "usr/share/doc-base",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/linda",
    "usr/share/bash-completion",
    "usr/share/zsh",
    "usr/share/fish",
    "usr/share/bug",
    "usr/share/menu",
    "usr/share/gtk-doc",
    "usr/share/help",
    "usr/share/initramfs-tools",
    "usr/share/apport",
    "etc/init.d",
    "etc/initramfs-tools",
    "usr/lib/systemd/system",
    "usr/lib/systemd/user",
    "usr/lib/tmpfiles.d",
];

/// Whether a merged-/usr relative path is documentation or similar and is never extracted.
pub fn is_dropped(rel: &str) -> bool {
    DROPPED
        .iter()
        .any(|d| rel == *d || rel.strip_prefix(d).is_some_and(|r| r.starts_with('/')))
}

/// Normalised permission of a regular file from a package: executable or not, nothing else.
pub fn file_mode(mode: u32) -> u32 {
    if mode & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

/// Extracts the data archive of the `.deb` at `deb` into `dest` (merged-/usr layout) and returns
/// the relative paths of the files, symlinks and hard links it wrote, in archive order.
pub fn extract(deb: &Path, dest: &Path) -> Result<Vec<String>> {
    let file = File::open(deb).with_context(|| format!("opening {}", deb.display()))?;
    let mut archive = ar::Archive::new(BufReader::new(file));
    while let Some(entry) = archive.next_entry() {
        let entry = entry.with_context(|| format!("reading ar archive {}", deb.display()))?;
        let id = String::from_utf8_lossy(entry.header().identifier()).into_owned();
        let reader: Box<dyn Read + '_> = match id.as_str() {
            "data.tar.xz" => Box::new(xz2::read::XzDecoder::new(entry)),
            "data.tar.zst" => Box::new(
                zstd::stream::read::Decoder::new(entry)
                    .with_context(|| format!("starting zstd decoder for {}", deb.display()))?,
            ),
            "data.tar.gz" => Box::new(flate2::read::GzDecoder::new(entry)),
            "data.tar" => Box::new(entry),
            other if other.starts_with("data.tar") => bail!(
                "{}: member `{other}` uses an unsupported compression (allowed: .xz, .zst, .gz, none)",
                deb.display()
            ),
            _ => continue,
        };
        return unpack(reader, dest).with_context(|| format!("extracting {}", deb.display()));
    }
    bail!(
        "{} has no data.tar member; is it a Debian package?",
        deb.display()
    )
}

/// Unpacks a tar stream into `dest`, mapping paths to merged-/usr and skipping dropped paths.
pub fn unpack(reader: impl Read, dest: &Path) -> Result<Vec<String>> {
    let mut written = Vec::new();
    let mut tar = tar::Archive::new(reader);
    for entry in tar.entries().context("reading tar stream")? {
        let mut entry = entry.context("reading tar entry")?;
        if entry.header().entry_type().is_pax_global_extensions() {
            // Archive-wide metadata (such as a commit id), not a member.
            continue;
        }
        let raw = match String::from_utf8(entry.path_bytes().into_owned()) {
            Ok(raw) => raw,
            Err(e) => {
                // No name in the image definition can select such a file; leaving it out
                // beats failing the whole build.
                eprintln!(
                    "warning: skipping archive entry with a non-UTF-8 path {:?}",
                    String::from_utf8_lossy(e.as_bytes())
                );
                continue;
            }
        };
        let Some(rel) = paths::normalise(&raw)? else {
            continue;
        };
        let rel = paths::merge_usr(&rel);
        if is_dropped(&rel) {
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            let resolved = paths::resolve(dest, &rel, true)?;
            paths::create_dirs(dest, &resolved.path)?;
            continue;
        }
        // Directories already in the tree may be symlinks (as dpkg follows them); the entry
        // lands where its parent resolves to, which is always inside `dest`.
        let name = rel.rsplit('/').next().unwrap_or(&rel);
        let parent = paths::resolve(dest, paths::parent(&rel), true)?;
        paths::create_dirs(dest, &parent.path)?;
        let target_rel = if parent.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}/{name}", parent.path)
        };
        let target = dest.join(&target_rel);
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
            bail!("`{raw}` would replace the directory {}", target.display());
        }
        if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
            paths::remove_any(&target)?;
            let mode = file_mode(entry.header().mode().context("reading tar entry mode")?);
            let mut out =
                File::create(&target).with_context(|| format!("creating {}", target.display()))?;
            std::io::copy(&mut entry, &mut out)
                .with_context(|| format!("writing {}", target.display()))?;
            out.set_permissions(std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting mode of {}", target.display()))?;
        } else if kind.is_symlink() {
            let link = entry
                .link_name_bytes()
                .with_context(|| format!("symlink `{raw}` without a target"))?;
            let link = String::from_utf8(link.into_owned())
                .with_context(|| format!("symlink `{raw}` with a non-UTF-8 target"))?;
            paths::remove_any(&target)?;
            symlink(&link, &target)
                .with_context(|| format!("creating symlink {}", target.display()))?;
        } else if kind.is_hard_link() {
            let link = entry
                .link_name_bytes()
                .with_context(|| format!("hard link `{raw}` without a target"))?;
            let link = String::from_utf8(link.into_owned())
                .with_context(|| format!("hard link `{raw}` with a non-UTF-8 target"))?;
            let Some(link_rel) = paths::normalise(&link)? else {
                bail!("hard link `{raw}` points at the archive root");
            };
            let link_rel = paths::merge_usr(&link_rel);
            if is_dropped(&link_rel) {
                continue;
            }
            let source = paths::resolve(dest, &link_rel, false)?;
            if !source.exists {
                bail!("hard link `{raw}` points at `{link}`, which the archive has not created");
            }
            paths::remove_any(&target)?;
            std::fs::hard_link(dest.join(&source.path), &target)
                .with_context(|| format!("linking {} to {}", target.display(), source.path))?;
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            // Device nodes and FIFOs have no place in a package's data; they are ignored.
            continue;
        } else {
            bail!("`{raw}` has an unsupported tar entry type {kind:?}");
        }
        written.push(target_rel);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        builder.into_inner().expect("finish tar")
    }

    fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h
    }

    /// Writes a raw path into a header, bypassing the checks of `set_path`.
    fn raw_path(h: &mut tar::Header, path: &str) {
        let name = &mut h.as_old_mut().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
    }

    #[test]
    fn unpacks_merged_usr_with_links() {
        let data = tar_with(|b| {
            let mut h = header(tar::EntryType::Directory, 0, 0o755);
            raw_path(&mut h, "./bin/");
            b.append(&h, &[][..]).expect("dir");
            let mut h = header(tar::EntryType::Regular, 5, 0o4755);
            raw_path(&mut h, "./bin/busybox");
            b.append(&h, &b"hello"[..]).expect("file");
            let mut h = header(tar::EntryType::Symlink, 0, 0o777);
            h.set_link_name("busybox").expect("link");
            raw_path(&mut h, "./bin/sh");
            b.append(&h, &[][..]).expect("symlink");
            let mut h = header(tar::EntryType::Link, 0, 0o644);
            h.set_link_name("./bin/busybox").expect("link");
            raw_path(&mut h, "./usr/bin/bb2");
            b.append(&h, &[][..]).expect("hardlink");
            let mut h = header(tar::EntryType::Regular, 3, 0o644);
            raw_path(&mut h, "./usr/share/doc/x/README");
            b.append(&h, &b"doc"[..]).expect("doc");
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let written = unpack(&data[..], dir.path()).expect("unpack");
        assert_eq!(
            written,
            vec!["usr/bin/busybox", "usr/bin/sh", "usr/bin/bb2"]
        );
        let meta = std::fs::metadata(dir.path().join("usr/bin/busybox")).expect("file");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        assert_eq!(
            std::fs::read_link(dir.path().join("usr/bin/sh")).expect("link"),
            Path::new("busybox")
        );
        assert_eq!(
            std::fs::read(dir.path().join("usr/bin/bb2")).expect("hardlink"),
            b"hello"
        );
        assert!(!dir.path().join("usr/share/doc").exists());
        assert!(!dir.path().join("bin").exists());
        assert!(is_dropped("usr/share/man"));
        assert!(is_dropped("usr/lib/systemd/system/docker.service"));
        assert!(!is_dropped("usr/lib/systemd/boot/efi/systemd-bootx64.efi"));
        assert!(!is_dropped("usr/share/mandoc"));
    }

    #[test]
    fn refuses_escaping_paths() {
        for bad in ["../evil", "/etc/evil", "./usr/../../evil"] {
            let data = tar_with(|b| {
                let mut h = header(tar::EntryType::Regular, 1, 0o644);
                raw_path(&mut h, bad);
                b.append(&h, &b"x"[..]).expect("file");
            });
            let dir = tempfile::tempdir().expect("tempdir");
            let sub = dir.path().join("root");
            std::fs::create_dir(&sub).expect("mkdir");
            assert!(unpack(&data[..], &sub).is_err(), "{bad} was accepted");
            assert!(!dir.path().join("evil").exists());
        }
    }

    #[test]
    fn symlinked_directory_cannot_lead_outside() {
        let outside = tempfile::tempdir().expect("tempdir");
        let target = outside.path().to_str().expect("utf-8").to_owned();
        let data = tar_with(|b| {
            let mut h = header(tar::EntryType::Symlink, 0, 0o777);
            h.set_link_name(&target).expect("link");
            raw_path(&mut h, "./etc");
            b.append(&h, &[][..]).expect("symlink");
            let mut h = header(tar::EntryType::Regular, 1, 0o644);
            raw_path(&mut h, "./etc/passwd");
            b.append(&h, &b"x"[..]).expect("file");
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let written = unpack(&data[..], dir.path()).expect("unpack");
        // The absolute link target is taken relative to the tree root, so the file lands inside.
        assert!(!outside.path().join("passwd").exists());
        let inside = format!("{}/passwd", target.trim_start_matches('/'));
        assert_eq!(written.last().map(String::as_str), Some(inside.as_str()));
        assert!(dir.path().join(&inside).is_file());
    }
}
