//! The scale study: the definition built with about 1×, 2× and 4× its packages (extra
//! `[debian] packages` from a fixed list, locked by `plinth lock`), with build time, image size,
//! `plinth publish` payload and the update agent's apply time at each step, and how each grows per
//! doubling.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, Result};
use init::update::apply::{self, Job};
use init::update::blockdev::Disk;
use init::update::fetch::Source;
use init::update::staging::Staging;
use init::update::state::{Stage, State};
use init::update::Slot;
use serde_json::{json, Value};

use crate::build::{build_args, drop_caches, our_build, write_definition, Variant, MOTD};
use crate::stats::{classify_growth, growth_per_doubling, load_now, show, Growth};
use crate::util::{dir_bytes, lock_bytes, published_manifest, run, say};

/// Extra roots for the 2× step: common command-line packages of the suite, chosen so that the
/// lock (with their dependencies) holds about twice the default image's packages (180 against
/// 83 when written).
const EXTRA_2X: [&str; 9] = [
    "python3",
    "git",
    "curl",
    "vim-nox",
    "rsync",
    "jq",
    "less",
    "openssh-client",
    "gdb",
];

/// Extra roots added to those for the 4× step (about four times the default's packages: 320
/// against 83 when written).
const EXTRA_4X: [&str; 20] = [
    "perl",
    "nginx-light",
    "postgresql-client",
    "sqlite3",
    "tmux",
    "htop",
    "strace",
    "lsof",
    "tcpdump",
    "file",
    "zstd",
    "xz-utils",
    "unzip",
    "wget",
    "gnupg",
    "build-essential",
    "imagemagick",
    "ruby",
    "php-cli",
    "nodejs",
];

/// One step of the study.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// 1, 2 or 4: the intended multiple of the default's packages.
    pub factor: u32,
    /// Packages in the lock and the sum of their sizes: the input.
    pub packages: usize,
    pub package_bytes: f64,
    pub build_seconds: f64,
    pub load_before: f64,
    /// The disk image's allocated bytes.
    pub image_bytes: f64,
    /// The `plinth publish` folder's bytes.
    pub payload_bytes: f64,
    /// The update agent's check and write of the step's release into slot B of a copy of its own
    /// disk image, on the host, best of three (see [`host_apply`]).
    pub apply_seconds: f64,
}

/// The figures of the study, each with how it is read from a step.
const FIGURES: [(&str, &str); 4] = [
    ("build time (wall)", "s"),
    ("disk image, allocated", "bytes"),
    ("update payload (plinth publish)", "bytes"),
    ("update apply (host, check + write + verify)", "s"),
];

fn figure(step: &Step, i: usize) -> f64 {
    match i {
        0 => step.build_seconds,
        1 => step.image_bytes,
        2 => step.payload_bytes,
        _ => step.apply_seconds,
    }
}

/// Growth of the input, the lock's package count, per step.
fn input_growth(steps: &[Step]) -> Vec<f64> {
    growth_per_doubling(&steps.iter().map(|s| s.packages as f64).collect::<Vec<_>>())
}

/// The study as a Markdown table: one row per step, then each figure's growth per doubling
/// against the input's, and whether it grows linearly with the packages.
pub fn scale_table(steps: &[Step]) -> String {
    let mut out = String::from(
        "| Packages | Lock (.deb bytes) | Build (wall) | Load (1 min) before | Disk image, allocated | Update payload | Update apply (host) |\n|---|---|---|---|---|---|---|\n",
    );
    for s in steps {
        out.push_str(&format!(
            "| {}× ({} packages) | {} | {} | {:.2} | {} | {} | {} |\n",
            s.factor,
            s.packages,
            show(Some(s.package_bytes), "bytes"),
            show(Some(s.build_seconds), "s"),
            s.load_before,
            show(Some(s.image_bytes), "bytes"),
            show(Some(s.payload_bytes), "bytes"),
            show(Some(s.apply_seconds), "s"),
        ));
    }
    let input = input_growth(steps);
    let bytes = growth_per_doubling(&steps.iter().map(|s| s.package_bytes).collect::<Vec<_>>());
    out.push_str(&format!(
        "\n| Figure | Growth per step (packages: {}; their .deb bytes: {}) | Growth against the package count |\n|---|---|---|\n",
        factors_text(&input),
        factors_text(&bytes)
    ));
    for (i, (name, _)) in FIGURES.iter().enumerate() {
        let series: Vec<f64> = steps.iter().map(|s| figure(s, i)).collect();
        let g = growth_per_doubling(&series);
        let verdict = match classify_growth(&g, &input, 0.15) {
            Some(Growth::Linear) => "linear",
            Some(Growth::Sublinear) => "sublinear (a fixed part weighs in)",
            Some(Growth::Superlinear) => "superlinear",
            None => "-",
        };
        out.push_str(&format!("| {name} | {} | {verdict} |\n", factors_text(&g)));
    }
    out
}

fn factors_text(f: &[f64]) -> String {
    f.iter()
        .map(|x| format!("{x:.2}×"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn steps_json(steps: &[Step]) -> Value {
    json!(steps
        .iter()
        .map(|s| json!({
            "factor": s.factor,
            "packages": s.packages,
            "package_bytes": s.package_bytes,
            "build_seconds": s.build_seconds,
            "load1_before": s.load_before,
            "image_bytes": s.image_bytes,
            "payload_bytes": s.payload_bytes,
            "apply_seconds": s.apply_seconds,
        }))
        .collect::<Vec<_>>())
}

/// Runs the study (network needed for `plinth lock` and the extra packages); returns its steps.
pub fn bench_scale(dir: &Path) -> Result<Vec<Step>> {
    let work = dir.join("scale");
    std::fs::create_dir_all(&work)?;
    let mut steps = Vec::new();
    for factor in [1u32, 2, 4] {
        let extra: Vec<String> = match factor {
            1 => Vec::new(),
            2 => EXTRA_2X.iter().map(|s| s.to_string()).collect(),
            _ => EXTRA_2X
                .iter()
                .chain(&EXTRA_4X)
                .map(|s| s.to_string())
                .collect(),
        };
        say(&format!("scale {factor}×: plinth lock and build"));
        let variant = Variant {
            motd: MOTD,
            version: "1.0.0",
            packages: &extra,
        };
        let name = format!("scale-{factor}x");
        let def = write_definition(&work, &name, &variant)?;
        let lock = builder::debian::lock::lock_path(&def);
        let text = std::fs::read_to_string(&lock)?;
        let packages = builder::debian::lock::Lockfile::parse(&lock.display().to_string(), &text)?
            .packages
            .len();
        // The first build fills the package cache with the new packages: the timed one is warm.
        let out = work.join(format!("out-{factor}x"));
        let args = build_args(&def, &out, None, None)?;
        builder::build::build_image(&args)?;
        drop_caches();
        let load_before = load_now();
        let build_seconds = our_build(&args)?;
        let disk = out.join("qemu-1.0.0.raw");
        let release = work.join(format!("release-{factor}x"));
        if release.exists() {
            std::fs::remove_dir_all(&release)?;
        }
        builder::publish::publish(&builder::publish::Options {
            file: def.clone(),
            key: work.join("bench-key.key"),
            to: release.clone(),
            disk: Some(disk.clone()),
            rollout: None,
            expires: Default::default(),
        })?;
        say(&format!(
            "scale {factor}×: the update agent applies the release on the host"
        ));
        // Best of three: each apply takes under a second on the host, where a compile beside it
        // weighs more than the bytes do.
        let mut apply_seconds = f64::INFINITY;
        for _ in 0..3 {
            apply_seconds = apply_seconds.min(host_apply(&work, &disk, &release)?);
        }
        steps.push(Step {
            factor,
            packages,
            package_bytes: lock_bytes(&lock)? as f64,
            build_seconds,
            load_before,
            image_bytes: (std::fs::metadata(&disk)?.blocks() * 512) as f64,
            payload_bytes: dir_bytes(&release)? as f64,
            apply_seconds,
        });
        eprintln!("     {:?}", steps.last());
    }
    Ok(steps)
}

/// The update agent's own code applies `release` as `plinth-update apply --from DIR` does, on the
/// host: the check pass over every artifact where it lies ([`Staging::check_in_place`]), then the
/// root and verity images written into slot B of a copy of `disk` (the step's own image, so the
/// slot has the size the builder gave it) and checked against the signed root hash
/// ([`apply::write_images`]). The page cache is dropped first. The boot files on the ESP are left
/// out: they are the same kernel and initramfs at every step. Returns the wall time in seconds
/// (the study keeps the best of three).
fn host_apply(work: &Path, disk: &Path, release: &Path) -> Result<f64> {
    let manifest = published_manifest(release)?;
    let target = work.join("apply-target.raw");
    let _ = std::fs::remove_file(&target);
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(disk)
        .arg(&target))?;
    let state = work.join("apply-state.json");
    let _ = std::fs::remove_file(&state);
    let source = Source::Dir(release.to_owned());
    let job = Job {
        source: &source,
        manifest: &manifest,
        manifest_sha256: "00",
        slot: Slot::B,
        retries: 0,
        held: &[],
    };
    drop_caches();
    let start = Instant::now();
    Staging::check_in_place(release, &manifest, &[], &mut |_| Ok(()))
        .map_err(|e| anyhow!("{e:#}"))?;
    let mut target_disk = Disk::open(&target)?;
    apply::write_images(
        &job,
        &mut target_disk,
        &mut State::default(),
        &state,
        Stage::Accepted,
        &mut |_| Ok(()),
    )
    .map_err(|e| anyhow!("{e:#}"))?;
    let seconds = start.elapsed().as_secs_f64();
    std::fs::remove_file(&target)?;
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(factor: u32, package_bytes: f64, build: f64, image: f64) -> Step {
        Step {
            factor,
            packages: factor as usize * 80,
            package_bytes,
            build_seconds: build,
            load_before: 1.0,
            image_bytes: image,
            payload_bytes: image * 0.9,
            apply_seconds: build / 10.0,
        }
    }

    #[test]
    fn the_table_gives_growth_and_verdicts() {
        let mib = 1048576.0;
        let steps = [
            step(1, 100.0 * mib, 30.0, 90.0 * mib),
            step(2, 200.0 * mib, 40.0, 180.0 * mib),
            step(4, 400.0 * mib, 60.0, 360.0 * mib),
        ];
        let t = scale_table(&steps);
        assert!(
            t.contains(
                "| 2× (160 packages) | 200.0 MiB | 40.0 s | 1.00 | 180.0 MiB | 162.0 MiB | 4.0 s |"
            ),
            "{t}"
        );
        assert!(
            t.contains("packages: 2.00×, 2.00×; their .deb bytes: 2.00×, 2.00×"),
            "{t}"
        );
        assert!(
            t.contains("| build time (wall) | 1.33×, 1.50× | sublinear"),
            "{t}"
        );
        assert!(
            t.contains("| disk image, allocated | 2.00×, 2.00× | linear |"),
            "{t}"
        );
    }

    #[test]
    fn the_package_lists_do_not_repeat() {
        let all: std::collections::BTreeSet<&str> =
            EXTRA_2X.iter().chain(&EXTRA_4X).copied().collect();
        assert_eq!(all.len(), EXTRA_2X.len() + EXTRA_4X.len());
    }
}
