//! Container images built from Debian packages at `plinth build` time, written in the
//! `docker save` archive format that the engine loads on first boot (`POST /images/load`).
//!
//! The archive is reproducible: one layer, entries sorted, owner 0:0, every timestamp the build's
//! `SOURCE_DATE_EPOCH`.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use os_config::manifest::rfc3339;
use sha2::{Digest, Sha256};

/// What the image runs and how it is named.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// `repository:tag`, as declared in `[[container]] image`.
    pub reference: String,
    /// Default command (the declaration's `command` usually overrides it).
    pub cmd: Vec<String>,
    pub env: Vec<String>,
}

/// Writes a `docker save` archive of the tree under `layer_root` to `out`; returns the image id
/// (`sha256:` of the config).
pub fn write_docker_archive(
    layer_root: &Path,
    config: &ImageConfig,
    epoch: u64,
    out: &Path,
) -> Result<String> {
    let mut layer = Vec::new();
    write_layer(layer_root, epoch, &mut layer)
        .with_context(|| format!("archiving {} as an image layer", layer_root.display()))?;
    let layer_digest = hex::encode(Sha256::digest(&layer));
    let created = rfc3339(epoch);
    let config_json = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {
            "Env": config.env,
            "Cmd": config.cmd,
            "Labels": { "org.opencontainers.image.ref.name": config.reference },
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_digest}")] },
        "history": [{ "created": created, "created_by": "plinth build" }],
    });
    let config_bytes = serde_json::to_vec(&config_json)?;
    let config_digest = hex::encode(Sha256::digest(&config_bytes));
    let manifest = serde_json::json!([{
        "Config": format!("{config_digest}.json"),
        "RepoTags": [config.reference],
        "Layers": [format!("{layer_digest}/layer.tar")],
    }]);
    let manifest_bytes = serde_json::to_vec(&manifest)?;

    let tmp = out.with_extension("tar.tmp");
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut archive = tar::Builder::new(BufWriter::new(file));
    append_bytes(&mut archive, &format!("{layer_digest}/"), &[], epoch, true)?;
    append_bytes(
        &mut archive,
        &format!("{layer_digest}/layer.tar"),
        &layer,
        epoch,
        false,
    )?;
    append_bytes(
        &mut archive,
        &format!("{config_digest}.json"),
        &config_bytes,
        epoch,
        false,
    )?;
    append_bytes(&mut archive, "manifest.json", &manifest_bytes, epoch, false)?;
    let mut writer = archive.into_inner()?;
    writer.flush()?;
    writer
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {} into place", out.display()))?;
    Ok(format!("sha256:{config_digest}"))
}

fn append_bytes<W: Write>(
    archive: &mut tar::Builder<W>,
    path: &str,
    data: &[u8],
    epoch: u64,
    dir: bool,
) -> Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(if dir {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    header.set_mode(if dir { 0o755 } else { 0o644 });
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(epoch);
    header.set_size(data.len() as u64);
    archive
        .append_data(&mut header, path, data)
        .with_context(|| format!("writing {path} into the image archive"))
}

/// Writes a reproducible tar of everything under `root` (sorted, 0:0, fixed mtimes).
pub fn write_layer<W: Write>(root: &Path, epoch: u64, out: W) -> io::Result<()> {
    let mut archive = tar::Builder::new(out);
    archive.mode(tar::HeaderMode::Deterministic);
    archive.follow_symlinks(false);
    let mut stack = vec![root.to_path_buf()];
    let mut entries = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.symlink_metadata()?.is_dir() {
                stack.push(path.clone());
            }
            entries.push(path);
        }
    }
    entries.sort();
    for path in entries {
        let rel = path.strip_prefix(root).map_err(io::Error::other)?;
        let meta = path.symlink_metadata()?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
        header.set_mtime(epoch);
        header.set_uid(0);
        header.set_gid(0);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path)?;
            header.set_size(0);
            archive.append_link(&mut header, rel, target)?;
        } else if meta.is_dir() {
            header.set_size(0);
            archive.append_data(&mut header, rel, io::empty())?;
        } else {
            archive.append_data(&mut header, rel, File::open(&path)?)?;
        }
    }
    archive.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_reproducible_and_loadable_shape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("bin")).expect("mkdir");
        std::fs::write(root.join("bin/hello"), b"#!/bin/sh\necho hi\n").expect("write");
        std::os::unix::fs::symlink("hello", root.join("bin/hi")).expect("symlink");
        let config = ImageConfig {
            reference: "plinth/test:1".into(),
            cmd: vec!["/bin/hello".into()],
            env: vec!["PATH=/bin".into()],
        };
        let a = dir.path().join("a.tar");
        let b = dir.path().join("b.tar");
        let id_a = write_docker_archive(&root, &config, 1_704_067_200, &a).expect("archive a");
        let id_b = write_docker_archive(&root, &config, 1_704_067_200, &b).expect("archive b");
        assert_eq!(id_a, id_b);
        assert_eq!(
            std::fs::read(&a).expect("read a"),
            std::fs::read(&b).expect("read b")
        );

        let mut names = Vec::new();
        let mut manifest = None;
        let mut archive = tar::Archive::new(File::open(&a).expect("open"));
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let name = entry.path().expect("path").display().to_string();
            if name == "manifest.json" {
                let mut text = String::new();
                io::Read::read_to_string(&mut entry, &mut text).expect("read manifest");
                manifest = Some(text);
            }
            names.push(name);
        }
        let manifest: serde_json::Value =
            serde_json::from_str(&manifest.expect("manifest.json present")).expect("json");
        assert_eq!(manifest[0]["RepoTags"][0], "plinth/test:1");
        let layer = manifest[0]["Layers"][0].as_str().expect("layer path");
        assert!(names.iter().any(|n| n == layer), "{names:?}");
        assert_eq!(
            format!(
                "sha256:{}",
                manifest[0]["Config"]
                    .as_str()
                    .expect("config")
                    .trim_end_matches(".json")
            ),
            id_a
        );
    }
}
