//! The `gce` output: the raw disk as Google Compute Engine imports it
//! (`gcloud compute images create --source-uri gs://…/NAME-VERSION.gce.tar.gz`): a gzip-compressed
//! GNU tar archive (`oldgnu` format, sparse) holding exactly one file, `disk.raw`.
//!
//! GNU tar writes the archive, because the `tar` crate writes no sparse entries and a disk is
//! mostly holes; holes are found by scanning for zero blocks (`--hole-detection=raw`), so the
//! archive depends on the bytes alone and not on how a filesystem stores them. The gzip layer is
//! written here with no time or name in its header. Owner, group, mode and time are fixed, so the
//! same raw disk and `SOURCE_DATE_EPOCH` give the same archive.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::tools;

/// The one file a GCE image archive holds.
pub const DISK_NAME: &str = "disk.raw";

/// Where the `gce` output of `raw` goes: `x.raw` → `x.gce.tar.gz`.
pub fn path_for(raw: &Path) -> PathBuf {
    raw.with_extension("gce.tar.gz")
}

/// Writes the `gce` archive of `raw` next to it (see [`path_for`]), under a temporary name that
/// is renamed once the archive is complete; returns its path.
pub fn write_gce(raw: &Path, source_date_epoch: u64) -> Result<PathBuf> {
    let out = path_for(raw);
    let partial = raw.with_extension("gce.tar.gz.partial");
    let result = write_archive(raw, &partial, source_date_epoch);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &out)
        .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
    Ok(out)
}

/// The GNU tar arguments that archive `raw` as the only member `disk.raw`, to standard output.
fn tar_args(raw: &Path, source_date_epoch: u64) -> Result<Vec<String>> {
    let dir = raw
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = raw
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no UTF-8 file name", raw.display()))?;
    Ok(vec![
        "--create".to_owned(),
        "--format=oldgnu".to_owned(),
        "--sparse".to_owned(),
        "--hole-detection=raw".to_owned(),
        format!("--mtime=@{source_date_epoch}"),
        "--owner=0".to_owned(),
        "--group=0".to_owned(),
        "--numeric-owner".to_owned(),
        "--mode=0644".to_owned(),
        // The member is named disk.raw whatever the raw file is called.
        format!("--transform=s|^.*$|{DISK_NAME}|"),
        "--file=-".to_owned(),
        format!("--directory={}", dir.display()),
        "--".to_owned(),
        name.to_owned(),
    ])
}

/// Runs GNU tar over `raw` and gzips its output into `dest`.
fn write_archive(raw: &Path, dest: &Path, source_date_epoch: u64) -> Result<()> {
    let file = File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut gzip = flate2::GzBuilder::new()
        .mtime(0)
        .write(file, flate2::Compression::default());
    let mut child = Command::new(tools::TAR.find()?)
        .args(tar_args(raw, source_date_epoch)?)
        .stdout(Stdio::piped())
        .spawn()
        .context("running tar")?;
    let copied = match child.stdout.take() {
        Some(mut stdout) => std::io::copy(&mut stdout, &mut gzip)
            .with_context(|| format!("compressing the archive of {}", raw.display())),
        None => Err(anyhow::anyhow!("tar's output was not captured")),
    };
    let status = child.wait().context("waiting for tar")?;
    if !status.success() {
        bail!("tar failed ({status}) archiving {}", raw.display());
    }
    copied?;
    let mut file = gzip
        .finish()
        .with_context(|| format!("writing {}", dest.display()))?;
    file.flush()
        .with_context(|| format!("writing {}", dest.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", dest.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_holds_only_disk_raw_with_the_same_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("demo-1.0.raw");
        // A sparse 3 MiB disk with data at its start and end.
        let mut bytes = vec![0u8; 3 << 20];
        bytes[..4096].fill(0xa5);
        let len = bytes.len();
        bytes[len - 512..].fill(0x5a);
        std::fs::write(&raw, &bytes).expect("raw");
        let out = write_gce(&raw, 1_700_000_000).expect("gce archive");
        assert_eq!(out, dir.path().join("demo-1.0.gce.tar.gz"));
        let listing = Command::new("tar")
            .arg("-tzvf")
            .arg(&out)
            .output()
            .expect("tar -t");
        assert!(listing.status.success());
        let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 1, "{listing}");
        assert!(lines[0].starts_with("-rw-r--r-- 0/0 "), "{listing}");
        assert!(lines[0].contains(&format!(" {len} ")), "{listing}");
        assert!(lines[0].ends_with(" disk.raw"), "{listing}");

        let unpacked = dir.path().join("unpacked");
        std::fs::create_dir(&unpacked).expect("mkdir");
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(&out)
            .arg("-C")
            .arg(&unpacked)
            .status()
            .expect("tar -x");
        assert!(status.success());
        assert!(std::fs::read(unpacked.join("disk.raw")).expect("disk.raw") == bytes);

        // Reproducible: the same disk gives the same archive; no partial file is left.
        let first = std::fs::read(&out).expect("archive");
        write_gce(&raw, 1_700_000_000).expect("again");
        assert!(
            std::fs::read(&out).expect("archive") == first,
            "archives differ"
        );
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".partial")), "{names:?}");
        // gzip header: no modification time.
        assert_eq!(&first[4..8], &[0, 0, 0, 0]);
    }
}
