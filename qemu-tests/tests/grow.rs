//! The `state` partition grows to fill an enlarged disk on first boot (GPT moved and extended,
//! ext4 grown online), and the next boot leaves it alone.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use qemu_tests::{image, parse_status, Vm, VmOptions};

const BOOT: Duration = Duration::from_secs(180);
const GROW_BYTES: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Runs a host tool and returns its stdout; fails clearly when it is missing or fails.
fn run(program: &str, args: &[&str], package: &str) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (install the {package} package)"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `(start, size)` in 512-byte sectors of the partition named `state`, and the table's last LBA.
fn state_partition(disk: &Path) -> Result<(u64, u64, u64)> {
    let json = run("sfdisk", &["--json", &disk.to_string_lossy()], "fdisk")?;
    let value: serde_json::Value = serde_json::from_str(&json).context("parsing sfdisk --json")?;
    let table = &value["partitiontable"];
    ensure!(table["sectorsize"] == 512, "unexpected sector size: {json}");
    let state = table["partitions"]
        .as_array()
        .and_then(|parts| parts.iter().find(|p| p["name"] == "state"))
        .with_context(|| format!("no partition named state: {json}"))?;
    let number = |v: &serde_json::Value| v.as_u64().with_context(|| format!("not a number: {v}"));
    Ok((
        number(&state["start"])?,
        number(&state["size"])?,
        number(&table["lastlba"])?,
    ))
}

/// Copies `sectors` sectors from `start` of `disk` into `dest`, leaving holes for zeroed MiBs.
fn extract(disk: &Path, start: u64, sectors: u64, dest: &Path) -> Result<()> {
    let mut from = std::fs::File::open(disk)?;
    from.seek(SeekFrom::Start(start * 512))?;
    let mut to = std::fs::File::create(dest)?;
    let mut buf = vec![0u8; MIB as usize];
    let mut left = sectors * 512;
    while left > 0 {
        let chunk = left.min(MIB) as usize;
        from.read_exact(&mut buf[..chunk])?;
        if buf[..chunk].iter().all(|&b| b == 0) {
            to.seek(SeekFrom::Current(chunk as i64))?;
        } else {
            to.write_all(&buf[..chunk])?;
        }
        left -= chunk as u64;
    }
    to.set_len(sectors * 512)?;
    to.flush()?;
    Ok(())
}

/// Boots until `stage2-ready`, then cuts the power; returns the console and the QEMU time.
/// (Growing happens in stage 1 and is flushed there; a power cut is what it must survive.)
fn boot_once(disk: &Path) -> Result<(String, Duration)> {
    let mut vm = Vm::boot(&VmOptions::new(disk))?;
    vm.wait_status("stage2-ready", BOOT)?;
    let elapsed = vm.elapsed();
    vm.kill();
    Ok((vm.console(), elapsed))
}

#[test]
fn state_grows_to_fill_an_enlarged_disk_once() -> Result<()> {
    let top = image::workspace();
    let raw = image::build(
        &top.join("qemu-tests/images/e2e.toml"),
        &top.join("images/qemu.lock"),
    )?;
    let dir = tempfile::tempdir()?;
    let disk = image::private_copy(&raw, dir.path())?;
    let (start, old_size, old_last) = state_partition(&disk)?;
    let image_bytes = std::fs::metadata(&disk)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)?
        .set_len(image_bytes + GROW_BYTES)
        .context("enlarging the disk copy")?;

    let started = Instant::now();
    let (console, first) = boot_once(&disk)?;
    let grown = console
        .lines()
        .find(|l| l.contains("PLINTH-STATUS state-grown"))
        .with_context(|| format!("no state-grown line on the first boot:\n{console}"))?;
    let fields = parse_status(grown.trim_end_matches('\r'));
    let from: u64 = fields.get("from").context("from=")?.parse()?;
    let to: u64 = fields.get("to").context("to=")?.parse()?;
    ensure!(
        from <= old_size * 512 && to > from + GROW_BYTES - 2 * MIB,
        "state-grown from={from} to={to}, partition was {} bytes",
        old_size * 512
    );

    // On the host: the table covers the new disk and state ends within 1 MiB of its end.
    let total_sectors = (image_bytes + GROW_BYTES) / 512;
    run("sfdisk", &["--verify", &disk.to_string_lossy()], "fdisk")?;
    let (new_start, new_size, last) = state_partition(&disk)?;
    ensure!(new_start == start, "state moved: {start} -> {new_start}");
    ensure!(
        last == total_sectors - 34 && last > old_last,
        "last usable LBA {last}, disk has {total_sectors} sectors"
    );
    let end = new_start + new_size - 1;
    ensure!(
        end <= last && last - end < MIB / 512 && (end + 1) % (MIB / 512) == 0,
        "state ends at LBA {end}, last usable {last}"
    );
    ensure!(
        new_size * 512 == to,
        "partition {} bytes, filesystem {to}",
        new_size * 512
    );

    // The filesystem fills the partition and is clean.
    let part = dir.path().join("state.img");
    extract(&disk, new_start, new_size, &part)?;
    let part_arg = part.to_string_lossy().into_owned();
    // Replay the journal as the next mount would (the power was cut), then check read-only.
    // Exit status 1 means "errors corrected", which a journal replay may report.
    let replay = Command::new("e2fsck")
        .args(["-E", "journal_only", "-p", &part_arg])
        .output()
        .context("running e2fsck (install the e2fsprogs package)")?;
    ensure!(
        matches!(replay.status.code(), Some(0 | 1)),
        "e2fsck -E journal_only failed ({}): {}{}",
        replay.status,
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr)
    );
    run("e2fsck", &["-n", "-f", &part_arg], "e2fsprogs")?;
    let header = run("dumpe2fs", &["-h", &part_arg], "e2fsprogs")?;
    let field = |name: &str| -> Result<u64> {
        header
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("no {name} in dumpe2fs -h:\n{header}"))?
            .trim()
            .parse()
            .with_context(|| format!("{name} is not a number"))
    };
    let fs_bytes = field("Block count:")? * field("Block size:")?;
    ensure!(
        fs_bytes == new_size * 512,
        "filesystem {fs_bytes} bytes in a partition of {} bytes",
        new_size * 512
    );
    std::fs::remove_file(&part)?;

    // The second boot changes nothing.
    let table_before = run("sfdisk", &["--dump", &disk.to_string_lossy()], "fdisk")?;
    let (console, second) = boot_once(&disk)?;
    ensure!(
        !console.contains("state-grown") && console.contains("PLINTH-STATUS state-mounted"),
        "second boot grew again or did not mount state:\n{console}"
    );
    let table_after = run("sfdisk", &["--dump", &disk.to_string_lossy()], "fdisk")?;
    ensure!(
        table_before == table_after,
        "{table_before}\n---\n{table_after}"
    );
    eprintln!(
        "grow: first boot {:.1}s, second boot {:.1}s of QEMU time ({:.1}s wall)",
        first.as_secs_f64(),
        second.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
