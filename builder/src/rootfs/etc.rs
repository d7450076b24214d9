//! Configuration files Plinth writes into the root: os-release, accounts, name service, engine
//! settings, and the files an image definition declares.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use os_config::definition::{Definition, File as FileEntry};
use sha2::{Digest, Sha256};

use super::paths;

/// Group id of the `docker` group (the socket's group).
pub const DOCKER_GID: u32 = 999;

/// Writes `content` at relative `rel` in `root` with `mode`, replacing whatever stood there and
/// creating parent directories.
pub fn write_file(root: &Path, rel: &str, content: &[u8], mode: u32) -> Result<()> {
    paths::create_dirs(root, paths::parent(rel))?;
    let path = root.join(rel);
    paths::remove_any(&path)?;
    std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode of {}", path.display()))
}

/// Creates a symlink at relative `rel` pointing at `target`, replacing whatever stood there.
pub fn write_symlink(root: &Path, rel: &str, target: &str) -> Result<()> {
    paths::create_dirs(root, paths::parent(rel))?;
    let path = root.join(rel);
    paths::remove_any(&path)?;
    symlink(target, &path).with_context(|| format!("creating symlink {}", path.display()))
}

/// The `os-release` text of an image.
pub fn os_release(def: &Definition, build_id: &str) -> String {
    let version = def.image.version.as_str();
    format!(
        "NAME=\"Plinth\"\nID=plinth\nVERSION=\"{version}\"\nVERSION_ID={version}\n\
PRETTY_NAME=\"Plinth {version}\"\nBUILD_ID={build_id}\nIMAGE_ID={}\nIMAGE_VERSION={version}\n",
        def.image.name
    )
}

/// `/etc/docker/daemon.json` from `[engine] settings`: JSON with sorted keys.
pub fn daemon_json(def: &Definition) -> Result<String> {
    let value = serde_json::to_value(&def.engine.settings)
        .context("converting [engine] settings to JSON")?;
    let mut text =
        serde_json::to_string_pretty(&value).context("writing [engine] settings as JSON")?;
    text.push('\n');
    Ok(text)
}

/// Writes the files Plinth owns in `/etc` and `/usr/lib`.
pub fn write_config(root: &Path, def: &Definition, build_id: &str) -> Result<()> {
    let hostname = def.hostname().as_str();
    write_file(
        root,
        "usr/lib/os-release",
        os_release(def, build_id).as_bytes(),
        0o644,
    )?;
    write_symlink(root, "etc/os-release", "../usr/lib/os-release")?;
    write_file(
        root,
        "etc/hostname",
        format!("{hostname}\n").as_bytes(),
        0o644,
    )?;
    write_file(
        root,
        "etc/hosts",
        format!("127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n")
            .as_bytes(),
        0o644,
    )?;
    write_symlink(root, "etc/resolv.conf", "../run/resolv.conf")?;
    write_symlink(root, "etc/machine-id", "../run/machine-id")?;
    write_symlink(root, "etc/mtab", "../proc/self/mounts")?;
    write_file(
        root,
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    )?;
    write_file(
        root,
        "etc/group",
        format!("root:x:0:\ndocker:x:{DOCKER_GID}:\nnogroup:x:65534:\n").as_bytes(),
        0o644,
    )?;
    write_file(
        root,
        "etc/shadow",
        b"root:*:1::::::\nnobody:*:1::::::\n",
        0o640,
    )?;
    write_file(
        root,
        "etc/nsswitch.conf",
        b"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\n\
protocols: files\nservices: files\nethers: files\nrpc: files\n",
        0o644,
    )?;
    write_file(
        root,
        "etc/docker/daemon.json",
        daemon_json(def)?.as_bytes(),
        0o644,
    )?;
    Ok(())
}

/// Writes the `[[file]]` entries of the definition, reading `path` sources relative to `def_dir`
/// and checking their sha256. [`Definition::parse`] has already refused paths that would collide
/// with the tree; the mount-point check stays as a last guard.
pub fn write_declared(root: &Path, def: &Definition, def_dir: &Path) -> Result<()> {
    for entry in &def.files {
        let top = entry
            .path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("");
        if os_config::rootfs::RUNTIME_MOUNTS.contains(&top) {
            bail!(
                "[[file]] {}: /{top} is mounted over at run time, so a file there would be hidden; \
                 allowed are paths in /etc, /usr and other directories of the read-only root",
                entry.path
            );
        }
        let content = declared_content(entry, def_dir)?;
        let rel = paths::merge_usr(entry.path.trim_start_matches('/'));
        write_file(root, &rel, &content, entry.mode.0)
            .with_context(|| format!("writing [[file]] {}", entry.path))?;
    }
    Ok(())
}

fn declared_content(entry: &FileEntry, def_dir: &Path) -> Result<Vec<u8>> {
    if let Some(content) = &entry.content {
        return Ok(content.as_bytes().to_vec());
    }
    let Some(source) = &entry.source else {
        bail!("[[file]] {}: give `content` or `source`", entry.path);
    };
    if let Some(url) = &source.url {
        bail!(
            "[[file]] {}: url sources ({url}) are not supported yet; download the file and use `path`",
            entry.path
        );
    }
    let Some(path) = &source.path else {
        bail!("[[file]] {}: source needs `url` or `path`", entry.path);
    };
    let full = def_dir.join(path);
    let bytes = std::fs::read(&full)
        .with_context(|| format!("reading [[file]] {} source {}", entry.path, full.display()))?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if !actual.eq_ignore_ascii_case(source.sha256.as_str()) {
        bail!(
            "[[file]] {}: {} has sha256 {actual}, the definition pins {}",
            entry.path,
            full.display(),
            source.sha256
        );
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(extra: &str) -> Definition {
        Definition::parse(
            "t.toml",
            &format!("[image]\nname = \"demo\"\nversion = \"2.1\"\n{extra}"),
        )
        .expect("definition")
    }

    #[test]
    fn os_release_fields() {
        let text = os_release(&def(""), "0123456789ab");
        assert!(text.contains("\nID=plinth\n"), "{text}");
        assert!(text.contains("VERSION_ID=2.1\n"), "{text}");
        assert!(text.contains("BUILD_ID=0123456789ab\n"), "{text}");
        assert!(text.contains("PRETTY_NAME=\"Plinth 2.1\"\n"), "{text}");
    }

    #[test]
    fn daemon_json_sorted() {
        let d = def("[engine.settings]\nlog-driver = \"json-file\"\ndebug = true\n\"insecure-registries\" = [\"a\"]\n");
        assert_eq!(
            daemon_json(&d).expect("json"),
            "{\n  \"debug\": true,\n  \"insecure-registries\": [\n    \"a\"\n  ],\n  \"log-driver\": \"json-file\"\n}\n"
        );
        assert_eq!(daemon_json(&def("")).expect("json"), "{}\n");
    }

    #[test]
    fn declared_files_with_modes_and_checked_sources() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("motd.txt"), b"hi\n").expect("write");
        let sha = hex::encode(Sha256::digest(b"hi\n"));
        let d = def(&format!(
            "[[file]]\npath = \"/etc/x/run.sh\"\nmode = \"0750\"\ncontent = \"#!/bin/sh\\n\"\n\
[[file]]\npath = \"/etc/motd\"\nsource = {{ path = \"motd.txt\", sha256 = \"{sha}\" }}\n"
        ));
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("mkdir");
        write_declared(&root, &d, dir.path()).expect("write");
        let meta = std::fs::metadata(root.join("etc/x/run.sh")).expect("file");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
        assert_eq!(std::fs::read(root.join("etc/motd")).expect("motd"), b"hi\n");

        let wrong = "0".repeat(64);
        let d = def(&format!(
            "[[file]]\npath = \"/etc/motd\"\nsource = {{ path = \"motd.txt\", sha256 = \"{wrong}\" }}\n"
        ));
        let err = write_declared(&root, &d, dir.path()).expect_err("sha mismatch");
        assert!(err.to_string().contains("pins"), "{err}");

        // `Definition::parse` refuses such a path; the writer still guards against one.
        let mut d = def("[[file]]\npath = \"/etc/web/index.html\"\ncontent = \"x\"\n");
        d.files[0].path = "/var/lib/web/index.html".to_owned();
        let err = write_declared(&root, &d, dir.path()).expect_err("under /var");
        assert!(err.to_string().contains("hidden"), "{err}");
    }
}
