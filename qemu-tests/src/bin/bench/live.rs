//! The live part: the least guest memory in which the default image, booted live from its PXE
//! folder (`boot.ipxe` over QEMU's TFTP), runs Docker Engine and the demo container with its page
//! served, found by bisection; beside it, the same bisection for the same image booted from its
//! disk. Then one installation to a blank disk from that live system, timed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use qemu_tests::{free_port, Vm, VmOptions};

use crate::build::Built;
use crate::stats::{load_now, Row, Side};
use crate::util::say;

/// The bisection's bounds and step, MiB: the goal is the upper bound.
const LOW_MIB: u32 = 192;
const HIGH_MIB: u32 = 512;
const STEP_MIB: u32 = 32;
/// A boot that has not served the page by then counts as failed (generous: under TCG on a loaded
/// machine a boot in ample memory has taken 290 s).
const BOOT_LIMIT: Duration = Duration::from_secs(600);
/// Where the guest finds the file server.
const GUEST_SERVER: &str = "10.0.2.100:8000";

/// How the image is booted.
#[derive(Debug, Clone, Copy)]
enum How<'a> {
    Live(&'a Path),
    Disk(&'a Path),
}

/// Boots once in `mem_mib`; `Some(seconds to the page)` if the container served its page.
fn boots(how: How<'_>, mem_mib: u32) -> Result<Option<f64>> {
    let web = free_port()?;
    let mut opts = match how {
        How::Live(pxe) => VmOptions::network_boot(pxe, builder::pxe::IPXE_FILE),
        How::Disk(disk) => {
            let mut opts = VmOptions::new(disk);
            opts.snapshot = true;
            opts
        }
    };
    opts.mem_mib = mem_mib;
    opts.forwards = vec![(web, 8080)];
    let mut vm = Vm::boot(&opts)?;
    let started = Instant::now();
    let running = vm.wait_for("PLINTH-STATUS container-running name=web", BOOT_LIMIT);
    let page =
        running.and_then(|_| qemu_tests::engine::http_get(web, "/", Duration::from_secs(30)));
    let seconds = started.elapsed().as_secs_f64();
    let console = vm.console();
    vm.kill();
    let ok = page.is_ok_and(|p| p.contains("Hello from Plinth"));
    let why = if ok {
        String::new()
    } else if console.contains("Out of memory") || console.contains("oom-kill") {
        " (out of memory)".to_owned()
    } else if console.contains("Kernel panic") {
        " (kernel panic)".to_owned()
    } else {
        " (no page within the limit)".to_owned()
    };
    say(&format!(
        "{how:?} with {mem_mib} MiB: {}{why} after {seconds:.0} s",
        if ok { "served the page" } else { "failed" }
    ));
    Ok(ok.then_some(seconds))
}

/// The least memory, to `STEP_MIB`, in which `how` serves the page; `None` if even `high`
/// does not.
fn minimum(how: How<'_>, high: u32) -> Result<Option<u32>> {
    if boots(how, high)?.is_none() {
        return Ok(None);
    }
    let (mut low, mut high) = (LOW_MIB, high);
    while high - low > STEP_MIB {
        let mid = (low + (high - low) / 2) / STEP_MIB * STEP_MIB;
        let mid = mid.clamp(low + STEP_MIB, high - STEP_MIB);
        if boots(how, mid)?.is_some() {
            high = mid;
        } else {
            low = mid;
        }
    }
    Ok(Some(high))
}

/// Builds the benchmark's definition with its PXE folder; returns the raw disk and the folder.
fn build_pxe(dir: &Path, built: &Built) -> Result<(PathBuf, PathBuf)> {
    let out = dir.join("live-out");
    let args = builder::build::Options {
        file: built.def.clone(),
        output: out,
        format: vec!["raw".to_owned(), "pxe".to_owned()],
        init: Some(qemu_tests::image::init_binary()?),
        keep_tree: None,
        cache: builder::cache::Options {
            dir: None,
            offline: false,
        },
        zstd_level: None,
    };
    let raw = builder::build::build_image(&args)?.raw;
    let pxe = builder::pxe::folder_for(&raw);
    Ok((raw, pxe))
}

/// One installation from the live system to a blank disk: guest seconds from `install-start` to
/// `install-done`, and QEMU start to `install-done`.
fn install(dir: &Path, pxe: &Path) -> Result<(f64, f64)> {
    let summary: builder::pxe::PxeSummary =
        serde_json::from_slice(&std::fs::read(pxe.join(builder::pxe::SUMMARY_FILE))?)?;
    let served = dir.join("live-served");
    let _ = std::fs::remove_dir_all(&served);
    std::fs::create_dir_all(&served)?;
    std::fs::copy(
        pxe.join(&summary.image.file),
        served.join(&summary.image.file),
    )?;
    let port = qemu_tests::serve_folder(&served)?;
    let disk = dir.join("live-install.raw");
    let file = std::fs::File::create(&disk)?;
    file.set_len(summary.image.size + (1 << 30))?;
    let mut opts = VmOptions::network_boot(pxe, builder::pxe::IPXE_FILE);
    opts.mem_mib = HIGH_MIB;
    opts.extra_disks = vec![disk.clone()];
    opts.guest_forwards = vec![(GUEST_SERVER.to_owned(), port)];
    opts.no_reboot = true;
    opts.fw_cfg = vec![(
        os_config::live::FW_CFG_CMDLINE.to_owned(),
        format!(
            "plinth.install=first-empty plinth.install.image=http://{GUEST_SERVER}/{} plinth.install.sha256={}",
            summary.image.file, summary.image.sha256
        ),
    )];
    let mut vm = Vm::boot(&opts)?;
    vm.wait_status("install-start", BOOT_LIMIT)?;
    let done = vm.wait_status("install-done", Duration::from_secs(900))?;
    let total = vm.elapsed().as_secs_f64();
    vm.kill();
    let _ = std::fs::remove_file(&disk);
    let seconds = done
        .get("seconds")
        .and_then(|s| s.parse::<f64>().ok())
        .context("install-done has no seconds=")?;
    Ok((seconds, total))
}

/// Runs the live part and adds its rows.
pub fn bench_live(dir: &Path, built: &Built, rows: &mut Vec<Row>) -> Result<()> {
    say("live: building the PXE folder");
    let (raw, pxe) = build_pxe(dir, built)?;
    let load = load_now();
    let live = minimum(How::Live(&pxe), HIGH_MIB)?;
    // The disk boot needs no more than the live one: bisect below the live figure only.
    let disk = match live {
        Some(live) => minimum(How::Disk(&raw), live)?,
        None => None,
    };
    let Some(live) = live else {
        bail!("the image does not serve its page in {HIGH_MIB} MiB booted live");
    };
    let mut row = Row::new(
        "live boot: least guest RAM serving the page",
        "MiB",
        "same image booted from disk",
    );
    row.push(Side::Ours, f64::from(live), load);
    match disk {
        Some(disk) => row.push(Side::Baseline, f64::from(disk), load),
        None => say(&format!(
            "the disk boot did not serve the page in {live} MiB"
        )),
    }
    rows.push(row);
    say("live: installing to a blank disk");
    let (seconds, total) = install(dir, &pxe)?;
    rows.push(Row::single(
        "install from the live system: install-start → install-done",
        "s",
        "—",
        seconds,
    ));
    rows.push(Row::single(
        "install from the live system: QEMU start → install-done",
        "s",
        "—",
        total,
    ));
    Ok(())
}
