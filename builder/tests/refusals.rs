//! Refusals write nothing: `plinth keygen`, `plinth publish` and `plinth build` refused for a bad
//! input leave every folder they were pointed at exactly as it was (the listing, sizes and
//! contents before and after are identical), and say why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Every file and folder under `dir` (relative path → content hash, or `dir` for a folder);
/// empty when `dir` does not exist.
fn listing(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("folder entry").path();
            let rel = path.strip_prefix(dir).expect("under dir").to_path_buf();
            if path.is_dir() {
                out.insert(rel, "dir".to_owned());
                pending.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read file");
                out.insert(rel, hex::encode(Sha256::digest(bytes)));
            }
        }
    }
    out
}

const DEFINITION: &[u8] = b"[image]\nname = \"demo\"\nversion = \"1.0\"\n";

/// One refusal: files to put in the work folder first (relative path, content; a path ending in
/// `/` is a folder), the arguments (`{dir}` is the work folder), what the message must say, and
/// the folder whose listing must not change (relative to the work folder).
struct Case {
    name: &'static str,
    setup: &'static [(&'static str, &'static [u8])],
    args: &'static [&'static str],
    says: &'static str,
    watched: &'static str,
}

#[test]
fn refused_commands_leave_the_output_folder_as_it_was() {
    let cases = [
        Case {
            name: "keygen: the .pub path is a folder",
            setup: &[("keys/release.pub/", b"")],
            args: &["keygen", "--out", "{dir}/keys/release"],
            says: "release.pub: it is a folder",
            watched: "keys",
        },
        Case {
            name: "keygen: the key exists",
            setup: &[("keys/release.key", b"old secret")],
            args: &["keygen", "--out", "{dir}/keys/release"],
            says: "release.key already exists: an existing key is never overwritten",
            watched: "keys",
        },
        Case {
            name: "keygen: the folder does not exist",
            setup: &[("keys/other", b"x")],
            args: &["keygen", "--out", "{dir}/keys/missing/release"],
            says: "keys/missing does not exist",
            watched: "keys",
        },
        Case {
            name: "publish: a disk that is not a disk",
            setup: &[
                ("demo.toml", DEFINITION),
                ("release.key", b""),
                ("disk.raw", &[0u8; 8192]),
                ("releases/stable/manifest.json", b"{}"),
            ],
            args: &[
                "publish",
                "{dir}/demo.toml",
                "--key",
                "{dir}/release.key",
                "--to",
                "{dir}/releases",
                "--disk",
                "{dir}/disk.raw",
            ],
            says: "no GPT",
            watched: "releases",
        },
        Case {
            name: "publish: a key that is not a key",
            setup: &[
                ("demo.toml", DEFINITION),
                ("release.key", b"not a key\n"),
                ("disk.raw", &[0u8; 8192]),
                ("releases/stable/manifest.json", b"{}"),
            ],
            args: &[
                "publish",
                "{dir}/demo.toml",
                "--key",
                "{dir}/release.key",
                "--to",
                "{dir}/releases",
                "--disk",
                "{dir}/disk.raw",
            ],
            says: "parsing key",
            watched: "releases",
        },
        Case {
            name: "build: a definition with an unknown key",
            setup: &[
                (
                    "demo.toml",
                    b"[image]\nname = \"demo\"\nversion = \"1.0\"\nsizee = 1\n",
                ),
                ("out/demo-0.9.raw", b"previous image"),
            ],
            args: &["build", "{dir}/demo.toml", "--output", "{dir}/out"],
            says: "sizee",
            watched: "out",
        },
        Case {
            name: "build: no lock",
            setup: &[
                ("demo.toml", DEFINITION),
                ("out/demo-1.0.raw", b"previous image"),
            ],
            args: &["build", "{dir}/demo.toml", "--output", "{dir}/out"],
            says: "plinth lock",
            watched: "out",
        },
        Case {
            name: "build: no lock, into a folder that does not exist yet",
            setup: &[("demo.toml", DEFINITION)],
            args: &["build", "{dir}/demo.toml", "--output", "{dir}/new/out"],
            says: "plinth lock",
            watched: "new",
        },
    ];
    let mut failures = Vec::new();
    for case in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        // A key publish can read, for the cases that need one.
        for (path, content) in case.setup {
            let at = root.join(path);
            if path.ends_with('/') {
                std::fs::create_dir_all(&at).expect("setup folder");
                continue;
            }
            std::fs::create_dir_all(at.parent().expect("parent")).expect("setup folder");
            if *path == "release.key" && content.is_empty() {
                let prefix = root.join("release");
                builder::publish::write_keypair(&prefix).expect("key pair");
                std::fs::remove_file(root.join("release.pub")).expect("remove .pub");
                continue;
            }
            std::fs::write(&at, content).expect("setup file");
        }
        let watched = root.join(case.watched);
        let before = listing(&watched);
        let args: Vec<String> = case
            .args
            .iter()
            .map(|a| a.replace("{dir}", &root.display().to_string()))
            .collect();
        let out = Command::new(env!("CARGO_BIN_EXE_plinth"))
            .args(&args)
            .current_dir(root)
            .env("PLINTH_CACHE_DIR", root.join("cache"))
            .output()
            .expect("running plinth");
        let message = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let after = listing(&watched);
        if out.status.success() {
            failures.push(format!("{}: not refused: {message}", case.name));
        } else if !message.contains(case.says) {
            failures.push(format!(
                "{}: the message does not say {:?}: {message}",
                case.name, case.says
            ));
        }
        if before != after {
            failures.push(format!(
                "{}: {} changed: {before:?} -> {after:?}",
                case.name, case.watched
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn keygen_refused_for_permissions_says_so_and_writes_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).expect("folder");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    if std::fs::write(keys.join("probe"), b"").is_ok() {
        // Running as root: permissions do not stop writes, so there is nothing to refuse.
        eprintln!("skipped: this user writes into read-only folders");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args(["keygen", "--out"])
        .arg(keys.join("release"))
        .output()
        .expect("running plinth");
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(message.contains("permission denied in folder"), "{message}");
    assert!(listing(&keys).is_empty());
}
