//! Runs every committed fuzz input through its target: the minimised corpora
//! (`fuzz/corpus/<target>/`) and the inputs of crashes found and fixed
//! (`fuzz/regressions/<target>/`). A target must not panic on any of them. Each target needs a
//! non-empty corpus folder, so the test cannot pass by finding nothing.

use std::fs;
use std::panic;
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted; an empty list when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("reading a fuzz folder entry").path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep"))
        .collect();
    files.sort();
    files
}

/// Runs `files` through the target `name`; returns the inputs it panicked on.
fn replay(name: &str, files: &[PathBuf]) -> Vec<String> {
    let target = fuzz_targets::by_name(name).expect("a known target");
    let mut failures = Vec::new();
    for file in files {
        let data = fs::read(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        if panic::catch_unwind(|| target(&data)).is_err() {
            failures.push(file.display().to_string());
        }
    }
    failures
}

#[test]
fn every_target_has_a_corpus_and_survives_it() {
    let mut failures = Vec::new();
    for (name, _) in fuzz_targets::TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        let corpus = files(&dir);
        assert!(
            !corpus.is_empty(),
            "{} is missing or empty: every target needs seeds",
            dir.display()
        );
        failures.extend(replay(name, &corpus));
    }
    assert!(failures.is_empty(), "targets panicked on: {failures:#?}");
}

#[test]
fn crash_regressions_stay_fixed() {
    let mut failures = Vec::new();
    for (name, _) in fuzz_targets::TARGETS {
        let dir = fuzz_dir().join("regressions").join(name);
        assert!(
            dir.is_dir(),
            "{} is missing (keep it, with a .gitkeep when empty)",
            dir.display()
        );
        failures.extend(replay(name, &files(&dir)));
    }
    assert!(failures.is_empty(), "targets panicked on: {failures:#?}");
}

#[test]
fn corpus_folders_are_targets() {
    for kind in ["corpus", "regressions"] {
        for entry in fs::read_dir(fuzz_dir().join(kind)).expect("reading the fuzz folder") {
            let name = entry.expect("entry").file_name();
            let name = name.to_string_lossy();
            assert!(
                fuzz_targets::by_name(&name).is_some(),
                "fuzz/{kind}/{name} names no target (known: {:?})",
                fuzz_targets::TARGETS
                    .iter()
                    .map(|(n, _)| n)
                    .collect::<Vec<_>>()
            );
        }
    }
}

/// The GPT seeds are real Plinth disks: they must read, or the target never gets past the
/// header checks.
#[test]
fn gpt_seeds_read_as_plinth_disks() {
    for file in files(&fuzz_dir().join("corpus/gpt")) {
        let name = file
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if !name.starts_with("seed-") {
            continue;
        }
        let data = fs::read(&file).expect("reading a seed");
        let mut disk = fuzz_targets::disk::SparseDisk::from_fuzz(&data);
        let table = os_config::gpt::read(&mut disk).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            table.by_label("state").is_some(),
            "{name}: no state partition"
        );
        assert_eq!(table.from_backup, name == "seed-backup-only", "{name}");
    }
}

/// The Plinth user-data seeds apply over the target's image, or the target never gets past
/// the merge; those meant to be refused are.
#[test]
fn userdata_seeds_reach_the_merge() {
    use os_config::userdata::{classify, UserDataKind};
    let image = fuzz_targets::userdata_image();
    for (name, applies) in [
        ("seed-plinth.toml", true),
        ("seed-engine-tls.toml", true),
        ("seed-plain-tcp.toml", false),
    ] {
        let data = fs::read(fuzz_dir().join("corpus/userdata").join(name)).expect("reading a seed");
        let UserDataKind::Plinth(parsed) =
            classify(name, &data).unwrap_or_else(|e| panic!("{name}: {e}"))
        else {
            panic!("{name} is not Plinth user data");
        };
        assert_eq!(parsed.apply(image).is_ok(), applies, "{name}");
    }
    for (name, kind) in [
        ("seed-cloud-config.yaml", "cloud-config"),
        ("seed-mime-multipart", "mime-multipart"),
    ] {
        let data = fs::read(fuzz_dir().join("corpus/userdata").join(name)).expect("reading a seed");
        assert_eq!(
            classify(name, &data).ok(),
            Some(UserDataKind::Foreign(kind)),
            "{name}"
        );
    }
    for name in [
        "seed-update-url.toml",
        "seed-bad-toml.toml",
        "seed-bad-utf8.toml",
    ] {
        let data = fs::read(fuzz_dir().join("corpus/userdata").join(name)).expect("reading a seed");
        assert!(classify(name, &data).is_err(), "{name} is refused");
    }
}
