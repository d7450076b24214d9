//! The update part: `plinth-update apply` against `zstd -d | dd` of the same artifacts in the
//! same guest, one after the other in every run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use qemu_tests::engine::Engine;

use crate::boot::load_image;
use crate::build::Built;
use crate::stats::{load_now, Row, Side};
use crate::util::{published_manifest, run, say, sh};

/// The update part's definitions: the benchmark image as version `version`, staging updates
/// only (`strategy = "manual"`), so an apply can be timed without the reboot.
pub fn update_definition(dir: &Path, base: &Path, version: &str) -> Result<PathBuf> {
    let text =
        std::fs::read_to_string(base).with_context(|| format!("reading {}", base.display()))?;
    let old = "version = \"1.0.0\"";
    if !text.contains(old) || !text.trim_end().ends_with("interval = \"1h\"") {
        bail!(
            "{} no longer has `{old}` and a final [update] table: update the benchmark",
            base.display()
        );
    }
    let text = format!(
        "{}strategy = \"manual\"\n",
        text.replacen(old, &format!("version = \"{version}\""), 1)
    );
    let def = dir.join(format!("bench-update-{version}.toml"));
    std::fs::write(&def, text).with_context(|| format!("writing {}", def.display()))?;
    Ok(def)
}

/// A container image with the host's `zstd` (and the shared libraries it loads) and busybox from
/// the locked `busybox-static` package: the baseline's tools inside the guest.
pub fn tools_archive(dir: &Path, lock: &Path) -> Result<PathBuf> {
    let layer = dir.join("tools-layer");
    if layer.exists() {
        std::fs::remove_dir_all(&layer)?;
    }
    std::fs::create_dir_all(layer.join("usr/bin"))?;
    for top in ["bin", "lib", "lib64"] {
        std::os::unix::fs::symlink(format!("usr/{top}"), layer.join(top))?;
    }
    let zstd = sh("command -v zstd")?.trim().to_owned();
    let mut files = vec![PathBuf::from(&zstd)];
    for line in run(Command::new("ldd").arg(&zstd))?.lines() {
        // `libzstd.so.1 => /lib/x86_64-linux-gnu/libzstd.so.1 (0x…)` or `/lib64/ld-linux….so.2 (0x…)`
        let path = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        files.extend(path.map(PathBuf::from));
    }
    for file in &files {
        let real = std::fs::canonicalize(file)?;
        let rel = file.strip_prefix("/")?;
        let to = layer
            .join("usr")
            .join(rel.strip_prefix("usr").unwrap_or(rel));
        std::fs::create_dir_all(to.parent().context("library path")?)?;
        std::fs::copy(&real, &to).with_context(|| format!("copying {}", real.display()))?;
    }
    let debs = crate::build::cached_debs(lock)?;
    let (_, deb) = debs
        .iter()
        .find(|(name, _)| name == "busybox-static")
        .with_context(|| format!("{} has no busybox-static", lock.display()))?;
    sh(&format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' ./bin/busybox",
        deb.display(),
        dir.display()
    ))?;
    std::fs::rename(dir.join("bin/busybox"), layer.join("usr/bin/busybox"))?;
    let archive = dir.join("tools.tar");
    builder::container_image::write_docker_archive(
        &layer,
        &builder::container_image::ImageConfig {
            reference: "bench/tools:1".to_owned(),
            cmd: vec!["/usr/bin/busybox".to_owned(), "sh".to_owned()],
            env: vec!["PATH=/usr/bin".to_owned()],
        },
        builder::build::DEFAULT_SOURCE_DATE_EPOCH,
        &archive,
    )?;
    Ok(archive)
}

/// Seconds a shell snippet takes in the guest, from `/proc/uptime` before and after, run in a
/// privileged tools container in the host's PID namespace; returns them with the output.
pub fn guest_timed(engine: Engine, script: &str) -> Result<(f64, String)> {
    let wrapped = format!(
        "read a _ < /proc/uptime; echo 3 > /proc/sys/vm/drop_caches; read s _ < /proc/uptime; \
         ( {script} ) 2>&1; rc=$?; read e _ < /proc/uptime; echo BENCH-TIME $s $e $rc $a"
    );
    let r = engine.run(
        "bench/tools:1",
        &["/usr/bin/busybox", "sh", "-c", &wrapped],
        true,
        &[],
    )?;
    let line = r
        .output
        .lines()
        .find(|l| l.starts_with("BENCH-TIME "))
        .with_context(|| format!("no timing from the guest:\n{}", r.output))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| words.get(i).and_then(|w| w.parse::<f64>().ok());
    let (Some(start), Some(end)) = (num(1), num(2)) else {
        bail!("bad timing line `{line}`");
    };
    if words.get(3) != Some(&"0") {
        bail!("the timed guest command failed:\n{}", r.output);
    }
    Ok((end - start, r.output))
}

/// Update: `plinth-update apply --from` a release disk (download, zstd, sha256, write, read back,
/// boot files), against `zstd -d | dd conv=fsync` of the same root and verity artifacts from the
/// same disk, in the same guest; page cache dropped before each.
pub fn bench_update(dir: &Path, built: &Built, runs: usize, rows: &mut Vec<Row>) -> Result<()> {
    let work = dir.join("update");
    std::fs::create_dir_all(&work)?;
    let lock = dir.join("bench.lock");
    let mut raws = Vec::new();
    for version in ["1.0.0", "1.0.1"] {
        say(&format!("update: building version {version}"));
        let def = update_definition(&work, &built.def, version)?;
        raws.push(qemu_tests::image::build(&def, &lock)?);
    }
    let release = work.join("release");
    if release.exists() {
        std::fs::remove_dir_all(&release)?;
    }
    builder::publish::publish(&builder::publish::Options {
        file: work.join("bench-update-1.0.1.toml"),
        key: dir.join("bench-key.key"),
        to: release.clone(),
        disk: Some(raws[1].clone()),
        rollout: None,
        expires: Default::default(),
    })?;
    let manifest = published_manifest(&release)?;
    let (root, verity) = (&manifest.artifacts.root, &manifest.artifacts.verity);
    let written = (root.uncompressed_size + verity.uncompressed_size) as f64;
    let media = work.join("media.img");
    let _ = std::fs::remove_file(&media);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&release)
        .arg(&media)
        .arg("512M"))?;
    let tools = tools_archive(&work, &lock)?;
    // No `|` in the name: it is a Markdown table cell.
    let baseline_name = "zstd -d into dd conv=fsync, root and verity artifacts";
    let mut wall = Row::new(
        "Update: apply from a local release disk, wall time",
        "s",
        baseline_name,
    );
    let mut rate = Row::new(
        "Update: apply throughput (uncompressed MB written per s)",
        "MB/s",
        baseline_name,
    );
    for i in 0..runs {
        say(&format!("update {}/{runs}", i + 1));
        let port = qemu_tests::free_port()?;
        let mut opts = qemu_tests::VmOptions::new(&raws[0]);
        opts.snapshot = true;
        opts.forwards = vec![(port, 2375)];
        opts.extra_disks = vec![media.clone()];
        let mut vm = qemu_tests::Vm::boot(&opts)?;
        vm.wait_for("PLINTH-STATUS container-running", Duration::from_secs(300))?;
        let engine = Engine { port };
        engine.wait_ready(Duration::from_secs(60))?;
        load_image(engine, &tools)?;
        // Slot B is partitions 4 (root) and 5 (verity) of the boot disk.
        let baseline_script = format!(
            "mkdir -p /m && mount -o ro /dev/vdb /m && \
             zstd -q -d -c /m/{} | dd of=/dev/vda4 bs=1M conv=fsync 2>/dev/null && \
             zstd -q -d -c /m/{} | dd of=/dev/vda5 bs=1M conv=fsync 2>/dev/null && umount /m",
            root.path, verity.path
        );
        // The first read of an artifact file in a guest takes about 11.5 s for 64 MB, every later
        // one about 3 s, even with the guest's page cache dropped; reading the whole medium with
        // `dd` or touching 1.5 GB of guest memory first does not take that cost, reading the file
        // once does. So both files are read once, untimed, before either side runs, and the order
        // of the sides still alternates from guest to guest.
        guest_timed(
            engine,
            &format!(
                "mkdir -p /m && mount -o ro /dev/vdb /m && cat /m/{} /m/{} > /dev/null && umount /m",
                root.path, verity.path
            ),
        )?;
        let order = if i % 2 == 0 {
            [Side::Ours, Side::Baseline]
        } else {
            [Side::Baseline, Side::Ours]
        };
        for side in order {
            let load = load_now();
            let secs = match side {
                Side::Ours => {
                    // Each line of the agent stamped with the guest's uptime: where the time goes.
                    let (secs, output) = guest_timed(
                        engine,
                        "set -o pipefail; nsenter -t 1 -m -- /usr/bin/plinth-update apply --from /dev/vdb 2>&1 | \
                         while IFS= read -r l; do read u _ < /proc/uptime; echo \"AT $u $l\"; done",
                    )?;
                    if !output.contains("update-staged version=1.0.1") {
                        bail!("the apply did not stage 1.0.1:\n{output}");
                    }
                    print_profile(&output);
                    secs
                }
                Side::Baseline => guest_timed(engine, &baseline_script)?.0,
            };
            eprintln!("     {side:?}: {secs:.1} s (load before {load:.2})");
            wall.push(side, secs, load);
            rate.push(side, written / 1e6 / secs, load);
        }
        vm.kill();
    }
    rows.push(wall);
    rows.push(rate);
    Ok(())
}

/// Prints the agent's lines with the seconds since its first line (the guest's uptime stamps that
/// `AT <uptime>` puts before each), so a run shows which step of the apply took the time.
fn print_profile(output: &str) {
    let mut first = None;
    for line in output.lines() {
        let Some(rest) = line.strip_prefix("AT ") else {
            continue;
        };
        let Some((at, text)) = rest.split_once(' ') else {
            continue;
        };
        let Ok(at) = at.parse::<f64>() else {
            continue;
        };
        let start = *first.get_or_insert(at);
        eprintln!("     +{:6.2} s  {text}", at - start);
    }
}
