//! Reference tools as test oracles, shared by the workspace's tests (feature `oracles`, enabled
//! only through dev-dependencies). They panic with the package to install when a tool is missing:
//! a test that needs an oracle fails, it does not skip.

use std::process::Command;

/// What `veritysetup format` made of some data.
#[derive(Debug, Clone)]
pub struct VerityFormat {
    /// The root hash, lowercase hex, as `veritysetup` prints it.
    pub root_hash: String,
    /// The whole hash device: superblock, then the tree.
    pub hash_device: Vec<u8>,
}

/// Runs `veritysetup format` (sha256, 4 KiB blocks) over `data`, with `salt` (hex) and `uuid` when
/// given, and returns the root hash and hash device it wrote.
pub fn veritysetup_format(data: &[u8], salt: Option<&str>, uuid: Option<&str>) -> VerityFormat {
    let dir = tempfile::tempdir().expect("a temporary folder for veritysetup");
    let (data_path, hash_path) = (dir.path().join("data"), dir.path().join("hash"));
    std::fs::write(&data_path, data).expect("writing the data for veritysetup");
    let mut cmd = Command::new("veritysetup");
    cmd.arg("format").arg(&data_path).arg(&hash_path);
    if let Some(salt) = salt {
        cmd.arg(format!("--salt={salt}"));
    }
    if let Some(uuid) = uuid {
        cmd.arg(format!("--uuid={uuid}"));
    }
    let out = cmd
        .output()
        .expect("veritysetup runs (install cryptsetup-bin: scripts/host-packages.sh)");
    assert!(
        out.status.success(),
        "veritysetup format failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let root_hash = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .expect("veritysetup printed a `Root hash:` line")
        .trim()
        .to_owned();
    VerityFormat {
        root_hash,
        hash_device: std::fs::read(&hash_path).expect("reading veritysetup's hash device"),
    }
}
