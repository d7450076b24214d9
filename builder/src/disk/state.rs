//! The `state` partition: an empty ext4 filesystem made reproducibly with `mkfs.ext4` (fixed UUID,
//! directory hash seed and time) on a temporary file.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::tools;

/// Makes an empty ext4 filesystem labelled `state` of `size` bytes in the file `out`.
pub fn make_state(out: &Path, size: u64, uuid: &uuid::Uuid, epoch: u64) -> Result<()> {
    let program = tools::MKFS_EXT4.find()?;
    let file = std::fs::File::create(out)
        .with_context(|| format!("creating state image {}", out.display()))?;
    file.set_len(size)
        .with_context(|| format!("sizing state image {}", out.display()))?;
    drop(file);
    let output = Command::new(&program)
        .args([
            "-q", "-F", "-t", "ext4", "-b", "4096", "-T", "default", "-L",
        ])
        .arg(os_config::layout::STATE)
        .arg("-U")
        .arg(uuid.to_string())
        .arg("-E")
        .arg(format!(
            "root_owner=0:0,hash_seed={uuid},nodiscard,lazy_itable_init=1"
        ))
        .arg(out)
        // Without this, mke2fs stamps the current time into the superblock and inodes.
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        // Ignore the invoking user's mke2fs.conf overrides.
        .env_remove("MKE2FS_CONFIG")
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "mkfs.ext4 failed ({}) on {}: {}",
            output.status,
            out.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
