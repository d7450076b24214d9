//! Reference tools as test oracles, shared by the workspace's tests (this crate's own, and others'
//! through the feature `oracles`, enabled only in dev-dependencies). They panic with the package to install when a tool is missing:
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

/// How `dpkg --compare-versions` orders Debian versions `a` and `b`.
pub fn dpkg_compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    // Exit status 0: the relation holds; 1: it does not; anything else: dpkg refused. Its
    // warnings (a version not starting with a digit) are kept out of the test output.
    let holds = |relation: &str| -> bool {
        let out = Command::new("dpkg")
            .args(["--compare-versions", a, relation, b])
            .output()
            .expect("dpkg runs (the test needs the Debian package manager)");
        match out.status.code() {
            Some(0) => true,
            Some(1) => false,
            _ => panic!(
                "dpkg --compare-versions {a} {relation} {b} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    };
    if holds("lt") {
        std::cmp::Ordering::Less
    } else if holds("eq") {
        std::cmp::Ordering::Equal
    } else {
        std::cmp::Ordering::Greater
    }
}
