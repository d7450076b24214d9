//! `cargo run --release -p qemu-tests --bin bench`: measures build time, sizes, boot time, update
//! apply time and guest memory of the default image against baselines measured in the same run,
//! ours and the baseline alternately with the load average before each run; prints one table and
//! writes the raw numbers to `target/bench/bench.json`.
//!
//! Environment: `BENCH_RUNS` (runs per figure, default 3), `BENCH_ONLY` (comma-separated subset
//! of `build,cold,size,boot,update,scale,live`; default all but `scale` and `live`), `PLINTH_TEST_CONSOLE=1` to
//! echo guest consoles, `BENCH_TABLE=target/bench/bench.json` to print the table of an earlier
//! run's numbers, `BENCH_BASELINE_ONLY=1` to boot only the baseline (when debugging its scripts).

mod boot;
mod build;
mod live;
mod scale;
mod size;
mod stats;
mod update;
mod util;

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use build::{Built, Variant};
use stats::{rows_from_json, table, Row};

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_owned()))
        .unwrap_or_default();
    let mem = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
        .unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "mem_total_kib": mem,
        "loadavg": read("/proc/loadavg").trim(),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
    })
}

/// The parts `BENCH_ONLY` can name.
const PARTS: [&str; 7] = ["build", "cold", "size", "boot", "update", "scale", "live"];

/// The figures' table, and the scale study's tables when it ran.
fn markdown(rows: &[Row], scale: &[scale::Step]) -> String {
    let mut out = String::new();
    if !rows.is_empty() {
        out.push_str(&table(rows));
    }
    if !scale.is_empty() {
        out.push_str("\nScale study:\n\n");
        out.push_str(&scale::scale_table(scale));
    }
    out
}

fn main() -> Result<()> {
    if let Some(path) = std::env::var_os("BENCH_TABLE") {
        // Prints the table of an earlier run's raw numbers.
        print!("{}", table(&rows_from_json(Path::new(&path))?));
        return Ok(());
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .map(|v| v.parse().context("BENCH_RUNS must be a number"))
        .transpose()?
        .unwrap_or(3)
        .max(1);
    let only =
        std::env::var("BENCH_ONLY").unwrap_or_else(|_| "build,cold,size,boot,update".to_owned());
    for part in only.split(',').map(str::trim) {
        if !PARTS.contains(&part) {
            bail!(
                "BENCH_ONLY names `{part}`: the parts are {}",
                PARTS.join(", ")
            );
        }
    }
    let want = |w: &str| only.split(',').any(|x| x.trim() == w);
    let dir = qemu_tests::image::workspace().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let before = machine();
    let mut rows = Vec::new();
    let built = if want("build") {
        build::bench_build(&dir, runs, want("cold"), &mut rows)?
    } else {
        // Reuse the previous run's build (and rebuild, for the delta update).
        let def = build::write_definition(&dir, "bench", &Variant::DEFAULT)?;
        let rebuilt = (
            dir.join("bench-rebuild.toml"),
            dir.join("out-rebuild/qemu-1.0.1.raw"),
        );
        Built {
            disk: dir.join("out/qemu-1.0.0.raw"),
            tree: dir.join("tree"),
            def,
            rebuilt: (rebuilt.0.is_file() && rebuilt.1.is_file()).then_some(rebuilt),
        }
    };
    // The size and boot parts measure the build's disk and tree; the update part builds its own.
    let measures_build = want("size") || want("boot");
    if measures_build && (!built.disk.is_file() || !built.tree.is_dir()) {
        bail!(
            "no build in {}: include `build` in BENCH_ONLY",
            dir.display()
        );
    }
    if measures_build && !dir.join("esp-files").is_dir() {
        build::extract_esp(
            &built.disk,
            &dir.join("esp-files"),
            &dir.join("initrd-tree"),
        )?;
    }
    let json_path = dir.join("bench.json");
    // Written after each part, so a long run leaves its figures so far.
    let mut scale_steps = Vec::new();
    let save = |rows: &[Row], scale: &[scale::Step]| -> Result<()> {
        let report = json!({
            "machine_before": before,
            "machine_after": machine(),
            "runs": runs,
            "total_seconds": started.elapsed().as_secs_f64(),
            "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
            "scale": scale::steps_json(scale),
        });
        std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
        std::fs::write(dir.join("bench.md"), markdown(rows, scale))?;
        Ok(())
    };
    save(&rows, &scale_steps)?;
    if want("size") {
        size::bench_size(&dir, &built, &mut rows)?;
        save(&rows, &scale_steps)?;
    }
    if want("boot") {
        boot::bench_boot(&dir, &built, runs, &mut rows)?;
        save(&rows, &scale_steps)?;
    }
    if want("update") {
        update::bench_update(&dir, &built, runs, &mut rows)?;
        save(&rows, &scale_steps)?;
    }
    if want("live") {
        live::bench_live(&dir, &built, &mut rows)?;
        save(&rows, &scale_steps)?;
    }
    if want("scale") {
        scale_steps = scale::bench_scale(&dir)?;
        save(&rows, &scale_steps)?;
    }
    println!("{}", markdown(&rows, &scale_steps));
    println!(
        "runs per figure: {runs}; total {:.0} s; machine {}; raw numbers in {}",
        started.elapsed().as_secs_f64(),
        before,
        json_path.display()
    );
    Ok(())
}
