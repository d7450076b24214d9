//! How long the agent's ESP path takes to copy a kernel-sized file from one slot's folder to the
//! other's and to read it back, each after the page cache was dropped (as the agent does between
//! writing and checking): `cargo run --release -p init --example esp_copy [MiB]`. A diagnostic of
//! the update apply's boot-file step (see qemu-tests/BENCHMARKS.md); it needs `mkfs.vfat`.

use std::io::{self, Read, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use init::update::esp::Esp;

fn main() -> Result<()> {
    let mib: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse().context("the size in MiB")?,
        None => 8,
    };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("esp.img");
    std::fs::File::create(&path)?.set_len(256 << 20)?;
    let made = std::process::Command::new("mkfs.vfat")
        .args(["-F", "32"])
        .arg(&path)
        .output()
        .context("running mkfs.vfat")?;
    ensure!(made.status.success(), "mkfs.vfat failed: {made:?}");
    let data: Vec<u8> = (0..(mib << 20) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)?;
    let esp = Esp::open(&mut file)?;
    esp.write_file("/plinth/a/vmlinuz", &data)?;
    esp.close()?;
    drop_cache(&file, &path)?;

    let started = Instant::now();
    let esp = Esp::open(&mut file)?;
    {
        let mut source = esp.open_file("/plinth/a/vmlinuz")?;
        let mut target = esp.create_file("/plinth/b/vmlinuz")?;
        io::copy(&mut source, &mut target)?;
        target.flush()?;
    }
    esp.close()?;
    let copied = started.elapsed();
    drop_cache(&file, &path)?;

    let started = Instant::now();
    let esp = Esp::open(&mut file)?;
    let mut back = Vec::new();
    esp.open_file("/plinth/b/vmlinuz")?.read_to_end(&mut back)?;
    esp.close()?;
    let read = started.elapsed();
    ensure!(back == data, "the copy differs from the original");
    println!(
        "{mib} MiB on the ESP: copy {:.1} ms, read back {:.1} ms",
        copied.as_secs_f64() * 1000.0,
        read.as_secs_f64() * 1000.0
    );
    Ok(())
}

/// Writes the image out and drops its cached pages, so the next step reads from the medium.
fn drop_cache(file: &std::fs::File, path: &Path) -> Result<()> {
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    rustix::fs::fadvise(file, 0, 0, rustix::fs::Advice::DontNeed)?;
    Ok(())
}
