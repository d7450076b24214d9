//! The `plinth` command as a user meets it: `check` on the shipped definitions, located errors for
//! typos, `--help` everywhere, and a build that refuses a stale lock without touching outputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn plinth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args(args)
        .output()
        .expect("running plinth")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

#[test]
fn shipped_definitions_pass_check() {
    let mut checked = 0;
    for dir in ["images", "qemu-tests/images"] {
        for entry in std::fs::read_dir(workspace().join(dir)).expect("read images") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let out = plinth(&["check", path.to_str().expect("utf-8 path")]);
                assert!(out.status.success(), "{}: {}", path.display(), text(&out));
                assert!(text(&out).contains(": ok"), "{}", text(&out));
                checked += 1;
            }
        }
    }
    assert!(checked >= 2, "only {checked} definitions found");
}

#[test]
fn misspelt_table_and_key_fail_with_location_and_spelling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "[image]\nname = \"x\"\nversion = \"1\"\n\n[kernal]\n",
            "bad.toml:5:",
            "did you mean `kernel`?",
        ),
        (
            "[image]\nname = \"x\"\nversion = \"1\"\n[disk]\nstat = \"1GiB\"\n",
            "bad.toml:5:1",
            "did you mean `state`?",
        ),
        (
            "[image]\nname = \"x\"\nversion = \"1\"\n[disk]\nroot = \"lots\"\n",
            "bad.toml:5:",
            "expected a number followed by a unit",
        ),
        (
            "[image]\nname = \"x\"\nversion = \"1\"\nverity = \"no\"\n",
            "bad.toml:4:",
            "invalid type",
        ),
    ];
    for (source, location, hint) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, source).expect("write definition");
        let out = plinth(&["check", path.to_str().expect("utf-8 path")]);
        let message = text(&out);
        assert!(!out.status.success(), "accepted:\n{source}");
        assert!(message.contains(location), "{source}\n→ {message}");
        assert!(message.contains(hint), "{source}\n→ {message}");
    }
}

#[test]
fn every_subcommand_has_help() {
    let out = plinth(&["--help"]);
    assert!(out.status.success(), "{}", text(&out));
    let listing = text(&out);
    let commands: Vec<&str> = listing
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(
        commands.contains(&"build") && commands.contains(&"check"),
        "{listing}"
    );
    for command in commands {
        let out = plinth(&[command, "--help"]);
        assert!(out.status.success(), "{command} --help: {}", text(&out));
        assert!(
            text(&out).contains("Usage:"),
            "{command} --help: {}",
            text(&out)
        );
    }
}

#[test]
fn build_refuses_a_stale_lock_and_names_the_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let def = dir.path().join("img.toml");
    let original =
        std::fs::read_to_string(workspace().join("images/qemu.toml")).expect("read qemu.toml");
    let changed = original.replace("[debian]\n", "[debian]\npackages = [\"curl\"]\n");
    assert_ne!(
        original, changed,
        "images/qemu.toml has no [debian] table to change"
    );
    std::fs::write(&def, changed).expect("write definition");
    std::fs::copy(
        workspace().join("images/qemu.lock"),
        dir.path().join("img.lock"),
    )
    .expect("copy lock");
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).expect("out dir");
    std::fs::write(out_dir.join("keep.raw"), b"previous output").expect("write old output");
    let out = plinth(&[
        "build",
        def.to_str().expect("utf-8"),
        "--output",
        out_dir.to_str().expect("utf-8"),
    ]);
    let message = text(&out);
    assert!(!out.status.success(), "{message}");
    assert!(message.contains("plinth lock"), "{message}");
    assert!(message.contains("curl"), "{message}");
    assert_eq!(
        std::fs::read(out_dir.join("keep.raw")).expect("old output"),
        b"previous output"
    );
}

#[test]
fn missing_definition_is_named() {
    let out = plinth(&["check", "/nonexistent/plinth.toml"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("/nonexistent/plinth.toml"),
        "{}",
        text(&out)
    );
}
