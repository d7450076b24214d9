//! Host micro-benchmark of the update agent's write path: writes a ~70 MiB root image and its
//! verity tree (zstd, 16 MiB frames, as `plinth publish` stores them) into file-backed partitions
//! with [`apply::write_images`], and the same artifacts with `zstd -d -c | dd bs=1M conv=fsync` on
//! the same file system, then prints the throughput ratio and what each part costs alone.
//!
//! `cargo run --release -p init --example apply_bench [DIR] [MIB]` (DIR: a folder on the file
//! system to measure, default the system's temporary folder; MIB: root image size, default 70).

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use init::update::apply::{self, Job};
use init::update::blockdev::Disk;
use init::update::fetch::Source;
use init::update::state::{Stage, State};
use init::update::Slot;
use os_config::manifest::{self, Artifacts, Manifest};
use os_config::units::{Name, Sha256, Version};
use sha2::Digest;

const MIB: u64 = 1 << 20;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let base = args.next().map_or_else(std::env::temp_dir, PathBuf::from);
    let mib: u64 = match args.next() {
        Some(text) => text
            .parse()
            .with_context(|| format!("size `{text}` in MiB"))?,
        None => 70,
    };
    let tmp =
        tempfile::tempdir_in(&base).with_context(|| format!("a folder in {}", base.display()))?;
    let dir = tmp.path();

    // Root content: a squashfs-like mix of incompressible and compressible 64 KiB runs.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut root = Vec::with_capacity((mib * MIB) as usize);
    let text = b"plinth writes the inactive slot at disk speed; ".repeat(1400);
    while (root.len() as u64) < mib * MIB {
        if (root.len() >> 16) % 3 == 0 {
            root.extend_from_slice(&text[..65536]);
        } else {
            for _ in 0..8192 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                root.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
    root.truncate((mib * MIB) as usize);
    let params = builder::disk::verity::VerityParams {
        salt: [7; 32],
        uuid: [9; 16],
    };
    let tree = builder::disk::verity::hash_tree(&mut &root[..], root.len() as u64, &params)?;
    let releases = dir.join("release");
    fs::create_dir_all(releases.join("artifacts"))?;
    let store = |data: &[u8]| {
        builder::publish::store_artifact_framed(data, &releases, builder::publish::FRAME_SIZE)
    };
    let (root_artifact, verity_artifact) = (store(&root)?, store(&tree.device)?);
    let manifest = Manifest {
        format: manifest::FORMAT,
        name: Name::parse("bench").map_err(anyhow::Error::msg)?,
        version: Version::parse("2").map_err(anyhow::Error::msg)?,
        channel: Name::parse("stable").map_err(anyhow::Error::msg)?,
        created: manifest::rfc3339(0),
        expires: manifest::rfc3339(4_102_444_800),
        root_hash: Sha256::parse(&tree.root_hash_hex()).map_err(anyhow::Error::msg)?,
        salt: hex::encode(params.salt),
        data_blocks: tree.data_blocks,
        cmdline: Vec::new(),
        root_chunks: None,
        rollout: None,
        artifacts: Artifacts {
            root: root_artifact,
            verity: verity_artifact,
            kernel: store(b"kernel")?,
            initrd: store(b"initrd")?,
        },
    };
    let root_zst = releases.join(&manifest.artifacts.root.path);
    let verity_zst = releases.join(&manifest.artifacts.verity.path);
    println!(
        "root {} MiB ({} MiB compressed, {} frames), verity {} KiB, in {}",
        root.len() as u64 / MIB,
        manifest.artifacts.root.size / MIB,
        manifest.artifacts.root.frames.len().max(1),
        tree.device.len() / 1024,
        dir.display()
    );

    // The disk: a GPT with the slot's two partitions, written once so no run allocates blocks.
    let disk_path = dir.join("disk.img");
    make_disk(
        &disk_path,
        root.len() as u64 + MIB,
        tree.device.len() as u64 + MIB,
    )?;
    let baseline_root = dir.join("root.img");
    let baseline_verity = dir.join("verity.img");
    for (path, len) in [
        (&baseline_root, root.len()),
        (&baseline_verity, tree.device.len()),
    ] {
        fs::write(path, vec![0u8; len])?;
    }
    sync_path(&disk_path)?;

    let mut ours = Vec::new();
    let mut baseline = Vec::new();
    for _ in 0..3 {
        baseline.push(time(|| {
            for (zst, out) in [(&root_zst, &baseline_root), (&verity_zst, &baseline_verity)] {
                let status = Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "zstd -q -d -c '{}' | dd of='{}' bs=1M conv=fsync,notrunc status=none",
                        zst.display(),
                        out.display()
                    ))
                    .status()?;
                if !status.success() {
                    bail!("zstd | dd failed: {status}");
                }
            }
            Ok(())
        })?);
        ours.push(time(|| {
            write_images(&releases, &manifest, &disk_path, dir)
        })?);
    }
    let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    let (ours, baseline) = (best(&ours), best(&baseline));
    println!(
        "apply::write_images {:>7.3} s   zstd -d | dd conv=fsync {:>7.3} s   throughput ratio {:.2}",
        ours.as_secs_f64(),
        baseline.as_secs_f64(),
        baseline.as_secs_f64() / ours.as_secs_f64()
    );

    // Each part alone, on one CPU.
    let compressed = fs::read(&root_zst)?;
    println!("parts alone (root image, one CPU):");
    let part = |name: &str, d: Duration| {
        println!(
            "  {name:<34} {:>7.3} s  {:>6.0} MiB/s",
            d.as_secs_f64(),
            root.len() as f64 / MIB as f64 / d.as_secs_f64()
        )
    };
    part(
        "zstd decompress",
        time(|| {
            std::io::copy(
                &mut zstd::stream::read::Decoder::new(&compressed[..])?,
                &mut std::io::sink(),
            )?;
            Ok(())
        })?,
    );
    part(
        "sha256 of the compressed stream",
        time(|| {
            sha2::Sha256::digest(&compressed);
            Ok(())
        })?,
    );
    part(
        "sha256 of the uncompressed stream",
        time(|| {
            sha2::Sha256::digest(&root);
            Ok(())
        })?,
    );
    part(
        "verity hash of every 4 KiB block",
        time(|| {
            for block in root.chunks(4096) {
                std::hint::black_box(manifest::verity_hash(&params.salt, block));
            }
            Ok(())
        })?,
    );
    let mut file = fs::OpenOptions::new().write(true).open(&baseline_root)?;
    part(
        "write(2), 1 MiB at a time",
        time(|| {
            file.seek(SeekFrom::Start(0))?;
            for piece in root.chunks(MIB as usize) {
                file.write_all(piece)?;
            }
            Ok(())
        })?,
    );
    part(
        "fsync after that",
        time(|| {
            file.sync_all()?;
            Ok(())
        })?,
    );
    part(
        "read back after dropping the cache",
        time(|| {
            let mut file = fs::File::open(&baseline_root)?;
            rustix::fs::fadvise(&file, 0, 0, rustix::fs::Advice::DontNeed)?;
            let mut buf = vec![0u8; MIB as usize];
            while file.read(&mut buf)? > 0 {}
            Ok(())
        })?,
    );
    Ok(())
}

/// One run of the agent's write path into slot B, from the start.
fn write_images(releases: &Path, manifest: &Manifest, disk: &Path, dir: &Path) -> Result<()> {
    let source = Source::Dir(releases.to_owned());
    let job = Job {
        source: &source,
        manifest,
        manifest_sha256: "00",
        slot: Slot::B,
        retries: 0,
        held: &[],
    };
    let mut disk = Disk::open(disk)?;
    let mut state = State::default();
    let state_path = dir.join("state.json");
    apply::write_images(
        &job,
        &mut disk,
        &mut state,
        &state_path,
        Stage::Accepted,
        &mut |_| Ok(()),
    )
    .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    Ok(())
}

fn time(mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed())
}

fn sync_path(path: &Path) -> Result<()> {
    fs::File::open(path)?.sync_all()?;
    Ok(())
}

/// A GPT disk image with partitions `root-b` and `verity-b` of these sizes, all zeros written.
fn make_disk(path: &Path, root: u64, verity: u64) -> Result<()> {
    let size = root + verity + 4 * MIB;
    fs::write(path, vec![0u8; size as usize])?;
    let mut file = fs::OpenOptions::new().read(true).write(true).open(path)?;
    gpt::mbr::ProtectiveMBR::with_lb_size((size / 512 - 1) as u32).overwrite_lba0(&mut file)?;
    let mut gpt = gpt::GptConfig::new()
        .writable(true)
        .create_from_device(&mut file, Some(uuid::Uuid::from_u128(7)))?;
    for (name, size) in [("root-b", root), ("verity-b", verity)] {
        gpt.add_partition(name, size, gpt::partition_types::LINUX_FS, 0, Some(2048))?;
    }
    gpt.write()?;
    Ok(())
}
