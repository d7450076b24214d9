//! `plinth check` refuses every definition that `plinth build` would refuse for a definition
//! value, before any package is fetched: one row per class of build error, run through the
//! `plinth` binary, with the `file:line:col` of the key at fault.

use std::process::{Command, Output};

fn check(source: &[u8]) -> (Output, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("img.toml");
    std::fs::write(&path, source).expect("write definition");
    let out = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args(["check", path.to_str().expect("utf-8 path")])
        .output()
        .expect("running plinth");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

const HEAD: &str = "[image]\nname = \"demo\"\nversion = \"1.0\"\n";

#[test]
fn check_refuses_what_build_would_refuse() {
    let sha = "0".repeat(64);
    // (the build step that would refuse it, body after HEAD, location, message fragment)
    let cases = [
        (
            "rootfs::etc::write_declared: a file under a run-time mount",
            "[[file]]\npath = \"/var/lib/web/index.html\"\ncontent = \"x\"\n".to_owned(),
            "img.toml:5:8:",
            "mounted over at run time",
        ),
        (
            "rootfs::etc::declared_content: neither content nor source",
            "[[file]]\npath = \"/etc/x\"\n".to_owned(),
            "img.toml:5:8:",
            "exactly one of `content` or `source`",
        ),
        (
            "rootfs::etc::declared_content: url sources unsupported",
            format!("[[file]]\npath = \"/etc/x\"\nsource = {{ url = \"http://127.0.0.1/x\", sha256 = \"{sha}\" }}\n"),
            "img.toml:6:18:",
            "use `path`",
        ),
        (
            "rootfs::etc::declared_content: a source with neither url nor path",
            format!("[[file]]\npath = \"/etc/x\"\nsource = {{ sha256 = \"{sha}\" }}\n"),
            "img.toml:6:10:",
            "exactly one of `url` or `path`",
        ),
        (
            "build::install_container_images: an archive with neither url nor path",
            format!("[[container]]\nname = \"a\"\nimage = \"a:1\"\narchive = {{ sha256 = \"{sha}\" }}\n"),
            "img.toml:7:11:",
            "exactly one of `url` or `path`",
        ),
        (
            "disk::gpt::plan: a partition that is not a whole number of MiB",
            "[disk]\nverity = \"1536KiB\"\n".to_owned(),
            "img.toml:5:10:",
            "whole number of MiB",
        ),
        (
            "rootfs::etc::daemon_json: [engine] settings without a JSON form",
            "[engine.settings]\nstarted = 1979-05-27T07:32:00Z\n".to_owned(),
            "img.toml:5:11:",
            "no JSON form",
        ),
        (
            "rootfs::etc::write_file: a file where the tree has a folder",
            "[[file]]\npath = \"/usr/lib\"\ncontent = \"x\"\n".to_owned(),
            "img.toml:5:8:",
            "directory every image has",
        ),
        (
            "rootfs::paths::create_dirs: a file under another declared file",
            "[[file]]\npath = \"/etc/a\"\ncontent = \"\"\n[[file]]\npath = \"/etc/a/b\"\ncontent = \"\"\n".to_owned(),
            "img.toml:8:8:",
            "folder of the other",
        ),
        (
            "build::install_payload: a file Plinth writes after the declared ones",
            "[[file]]\npath = \"/bin/plinth-init\"\ncontent = \"\"\n".to_owned(),
            "img.toml:5:8:",
            "Plinth's own program",
        ),
        (
            "rootfs::etc::daemon_json: the engine's API on plain TCP without TLS",
            "[engine]\nsettings = { hosts = [\"tcp://0.0.0.0:2375\"] }\n".to_owned(),
            "img.toml:5:23:",
            "insecure-tcp = true",
        ),
        (
            "rootfs::kmod::closure: a module name that names no module",
            "[kernel]\nmodules = [\"../x\"]\n".to_owned(),
            "img.toml:5:12:",
            "not a kernel module name",
        ),
    ];
    let mut failures = Vec::new();
    for (step, body, location, fragment) in cases {
        let source = format!("{HEAD}{body}");
        let (out, text) = check(source.as_bytes());
        if out.status.success() || !text.contains(location) || !text.contains(fragment) {
            failures.push(format!("{step}:\n{source}→ {text}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn invalid_utf8_is_located_at_its_byte() {
    let mut source = HEAD.as_bytes().to_vec();
    source.extend_from_slice(b"[debian]\n# caf\xe9\n");
    let (out, text) = check(&source);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("img.toml:5:6: invalid UTF-8"), "{text}");
}

#[test]
fn comments_are_never_blamed() {
    let source =
        format!("{HEAD}# packages = [\"x\"]\n[debian]\n# state = \"1MiB\"\npackages = [\"x\"]\n");
    let (out, text) = check(source.as_bytes());
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("img.toml:7:13: debian.packages[0]"), "{text}");
}

/// The folder of example definitions (`images/examples/`).
fn examples_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/examples")
}

#[test]
fn every_example_passes_check() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(examples_dir()).expect("reading images/examples") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let out = Command::new(env!("CARGO_BIN_EXE_plinth"))
            .args(["check", path.to_str().expect("utf-8 path")])
            .output()
            .expect("running plinth");
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            path.with_extension("lock").is_file(),
            "{} has no lock beside it",
            path.display()
        );
        names.push(
            path.file_stem()
                .expect("stem")
                .to_string_lossy()
                .into_owned(),
        );
    }
    names.sort();
    assert_eq!(
        names,
        ["celery", "ghost", "irssi", "jetty", "registry", "rethinkdb"],
        "the examples the README lists"
    );
}

/// The RethinkDB example's archive is made by the user: without it, `plinth build` stops before
/// fetching anything and says which file is missing and how to make it.
#[test]
fn missing_image_archive_is_named_before_anything_is_fetched() {
    let dir = tempfile::tempdir().expect("tempdir");
    for file in ["rethinkdb.toml", "rethinkdb.lock"] {
        std::fs::copy(examples_dir().join(file), dir.path().join(file)).expect("copy example");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args([
            "build",
            "rethinkdb.toml",
            "--offline",
            "--cache-dir",
            "cache",
        ])
        .current_dir(dir.path())
        .output()
        .expect("running plinth");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(
            "[[container]] `rethinkdb`: its image archive ./rethinkdb.tar does not exist"
        ) && text.contains("docker save rethinkdb:2.4.4-bookworm-slim -o ./rethinkdb.tar"),
        "{text}"
    );
    assert!(
        !dir.path().join("out").exists(),
        "the build made its output folder: {text}"
    );
    assert!(
        !dir.path().join("cache").exists(),
        "the build touched its cache: {text}"
    );
}
