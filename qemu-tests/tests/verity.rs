//! The verified root under QEMU (OVMF, TCG): root is served by a dm-verity device, a changed
//! block of `root-a` is refused (the kernel logs it and restarts the machine), a boot entry with
//! the wrong root hash never mounts root and reboots, and `plinth verify` names a changed block
//! offline and passes an untouched disk.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use builder::cli::{Cli, Command as PlinthCommand, VerifyArgs};
use builder::inspect::{inspect_disk, verify_slots, Inspection};
use os_config::boot::ENTRIES_DIR;
use qemu_tests::{image, Vm, VmOptions};

/// How long any one boot phase may take under TCG on a loaded host.
const PHASE: Duration = Duration::from_secs(180);
/// The stage 2 program in the root image, read (and executed) by every boot.
const STAGE2: &str = "usr/bin/plinth-init";
/// dm-verity data block size.
const BLOCK: u64 = 4096;

/// One guest at a time: the tests share two host cores with everything else.
static QEMU: Mutex<()> = Mutex::new(());

fn e2e_image() -> Result<PathBuf> {
    let top = image::workspace();
    image::build(
        &top.join("qemu-tests/images/e2e.toml"),
        &top.join("images/qemu.lock"),
    )
}

/// Boots `opts`, runs `check`, kills QEMU, and reports the QEMU time used.
fn with_vm(name: &str, opts: &VmOptions, check: impl FnOnce(&mut Vm) -> Result<()>) -> Result<()> {
    let _one = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let mut vm = Vm::boot(opts)?;
    let result = check(&mut vm);
    vm.kill();
    eprintln!("{name}: QEMU ran {:.1}s", vm.elapsed().as_secs_f64());
    result
}

/// A partition's byte range on the disk.
fn partition(info: &Inspection, label: &str) -> Result<(u64, u64)> {
    info.partitions
        .iter()
        .find(|p| p.label == label)
        .map(|p| (p.start, p.size))
        .with_context(|| format!("the disk has no partition {label}"))
}

fn slot_a_hash(info: &Inspection) -> Result<String> {
    info.slots
        .iter()
        .find(|s| s.slot == "a")
        .and_then(|s| s.root_hash.clone())
        .context("slot a has no boot entry with a root hash")
}

#[test]
fn default_image_mounts_root_through_verity() -> Result<()> {
    let raw = e2e_image()?;
    let info = inspect_disk(&raw)?;
    let hash = slot_a_hash(&info)?;
    let mut opts = VmOptions::new(&raw);
    opts.snapshot = true;
    with_vm("verity root", &opts, |vm| {
        let mounted = vm.wait_status("root-mounted", PHASE)?;
        ensure!(
            mounted["device"].starts_with("/dev/dm-") && mounted["verity"] == "yes",
            "root not mounted from a verity device: {mounted:?}"
        );
        ensure!(mounted["slot"] == "a", "booted slot: {mounted:?}");
        // Stage 1 logs the table it loaded: a verity target over root-a with the entry's hash.
        let table = vm.wait_for(" verity 1 /dev/", Duration::from_secs(5))?;
        ensure!(
            table.contains(&format!(" sha256 {hash} ")) && table.contains("restart_on_corruption"),
            "verity table does not carry the boot entry's root hash {hash} and restart_on_corruption: {table}"
        );
        // Stage 2 reports what it sees as `/` from mountinfo and sysfs.
        let root = vm.wait_status("root ", PHASE)?;
        ensure!(
            root["source"] == mounted["device"] && root["dm-name"] == "root" && root["ro"] == "yes",
            "stage 2 sees another root: {root:?} (stage 1 mounted {mounted:?})"
        );
        vm.wait_status("stage2-ready", PHASE)?;
        Ok(())
    })
}

#[test]
fn changed_root_block_is_refused_and_named_by_verify() -> Result<()> {
    let raw = e2e_image()?;
    let dir = tempfile::tempdir()?;
    let disk = image::private_copy(&raw, dir.path())?;
    let info = inspect_disk(&disk)?;
    let (root_start, _) = partition(&info, "root-a")?;
    let blocks = info
        .slots
        .iter()
        .find(|s| s.slot == "a")
        .and_then(|s| s.verity_data_blocks)
        .context("verity-a has no superblock")?;

    // The untouched copy passes `plinth verify`.
    let verify = |disk: &Path| {
        builder::cli::dispatch(Cli {
            command: PlinthCommand::Verify(VerifyArgs {
                disk: disk.to_path_buf(),
            }),
        })
    };
    verify(&disk).context("plinth verify on the untouched image")?;

    // Flip one byte in the first data block of the stage 2 program, found in a copy of the
    // root image with `unsquashfs` as the judge of which bytes belong to the file.
    let root_img = dir.path().join("root-a.img");
    {
        let mut src = File::open(&disk)?;
        src.seek(SeekFrom::Start(root_start))?;
        let mut out = File::create(&root_img)?;
        std::io::copy(&mut src.take(blocks * BLOCK), &mut out)?;
    }
    let started = Instant::now();
    let offset = first_data_byte(&root_img, STAGE2)?;
    eprintln!(
        "{STAGE2}'s data starts at byte {offset} of root-a (found in {:.1}s)",
        started.elapsed().as_secs_f64()
    );
    flip(&disk, root_start + offset)?;
    let block = offset / BLOCK;

    // Offline: `plinth verify` fails and names the block.
    let err = verify(&disk).expect_err("plinth verify passed a changed root");
    let text = format!("{err:#}");
    ensure!(
        text.contains(&format!("slot a: data block {block} of root-a")),
        "plinth verify did not name data block {block}: {text}"
    );
    let mut checked = inspect_disk(&disk)?;
    verify_slots(&disk, &mut checked)?;
    ensure!(
        checked.slots[0]
            .verity_check
            .as_deref()
            .is_some_and(|c| c.starts_with(&format!("data block {block} "))),
        "{:?}",
        checked.slots[0]
    );

    // Under QEMU: the kernel refuses the block and restarts the machine; stage 2 never runs.
    let opts = VmOptions::new(&disk);
    with_vm("changed block", &opts, |vm| {
        let (_, first) = vm.wait_for_after("PLINTH-STATUS stage1-start", 0, PHASE)?;
        let (line, after) = vm.wait_for_after(" is corrupted", first, PHASE)?;
        ensure!(
            line.contains("verity") && line.contains(&format!("data block {block} is corrupted")),
            "the kernel reported another block than {block}: {line}"
        );
        vm.wait_for_after("dm-verity device corrupted", after, Duration::from_secs(30))
            .context("the kernel did not restart for the corrupted block")?;
        vm.wait_for_after("PLINTH-STATUS stage1-start", after, PHASE)
            .context("the machine did not restart after the corrupted block")?;
        let console = vm.console();
        for never in [
            "PLINTH-STATUS stage2-ready",
            "PLINTH-STATUS container-started",
            "PLINTH-STATUS container-running",
        ] {
            ensure!(
                !console.contains(never),
                "`{never}` appeared although the root was changed\n{console}"
            );
        }
        Ok(())
    })
}

#[test]
fn wrong_root_hash_stops_the_boot_and_reboots() -> Result<()> {
    let raw = e2e_image()?;
    let dir = tempfile::tempdir()?;
    let disk = image::private_copy(&raw, dir.path())?;
    let info = inspect_disk(&disk)?;
    let real = slot_a_hash(&info)?;
    let entry = info
        .slots
        .iter()
        .find(|s| s.slot == "a")
        .and_then(|s| s.entry.clone())
        .context("slot a has no boot entry")?;
    let (esp_start, _) = partition(&info, "esp")?;
    let esp = format!("{}@@{esp_start}", disk.display());
    let path = format!("::{ENTRIES_DIR}/{entry}");

    // Rewrite slot A's entry with another root hash (every hex digit moved by one).
    let text = String::from_utf8(mtools("mtype", &["-i", &esp, &path])?)?;
    let wrong: String = real
        .chars()
        .map(|c| {
            let d = c.to_digit(16).unwrap_or(0);
            char::from_digit((d + 1) % 16, 16).unwrap_or('0')
        })
        .collect();
    ensure!(text.contains(&real), "entry {entry} lacks {real}:\n{text}");
    let changed = dir.path().join(&entry);
    std::fs::write(&changed, text.replace(&real, &wrong))?;
    mtools(
        "mcopy",
        &["-o", "-i", &esp, changed.to_str().context("path")?, &path],
    )?;
    ensure!(
        slot_a_hash(&inspect_disk(&disk)?)? == wrong,
        "the entry was not rewritten"
    );

    let opts = VmOptions::new(&disk);
    with_vm("wrong root hash", &opts, |vm| {
        let (_, first) = vm.wait_for_after("PLINTH-STATUS stage1-start", 0, PHASE)?;
        let (line, after) = vm.wait_for_after("PLINTH-STATUS roothash-mismatch", first, PHASE)?;
        let fields = qemu_tests::parse_status(&line);
        ensure!(
            fields.get("slot").map(String::as_str) == Some("a")
                && fields.get("expected") == Some(&wrong)
                && fields.get("found") == Some(&real),
            "mismatch line does not name slot a, expected {wrong} and found {real}: {line}"
        );
        vm.wait_for_after("PLINTH-STATUS boot-failed", after, Duration::from_secs(30))?;
        vm.wait_for_after("PLINTH-STATUS stage1-start", after, PHASE)
            .context("the machine did not reboot after the failed boot")?;
        let console = vm.console();
        ensure!(
            !console.contains("PLINTH-STATUS root-mounted"),
            "root was mounted with a wrong root hash\n{console}"
        );
        Ok(())
    })
}

/// Runs an mtools program on the ESP and returns its standard output.
fn mtools(program: &str, args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new(program)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .with_context(|| format!("running {program} (install mtools)"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// Inverts one byte of a file in place.
fn flip(path: &Path, offset: u64) -> Result<()> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(&mut byte)?;
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(&[byte[0] ^ 0xff])?;
    Ok(())
}

/// The lowest byte of a squashfs image whose change alters what `unsquashfs -cat` returns for
/// `file`: the start of the file's first compressed data block. Only the data area (between
/// the superblock and the inode table) is searched, so metadata changes cannot be mistaken for
/// file data.
fn first_data_byte(img: &Path, file: &str) -> Result<u64> {
    let mut head = [0u8; 96];
    File::open(img)?.read_exact(&mut head)?;
    ensure!(
        &head[..4] == b"hsqs",
        "root-a is not squashfs (this test reads squashfs; unset PLINTH_ROOT_FS)"
    );
    let inode_table = u64::from_le_bytes(head[64..72].try_into()?);
    let cat = || -> Result<Option<Vec<u8>>> {
        let out = Command::new("unsquashfs")
            .args(["-cat", img.to_str().context("path")?, file])
            .output()
            .context("running unsquashfs (install squashfs-tools)")?;
        Ok(out.status.success().then_some(out.stdout))
    };
    let reference = cat()?.with_context(|| format!("unsquashfs cannot read {file}"))?;
    let changes = |offset: u64| -> Result<bool> {
        flip(img, offset)?;
        let seen = cat();
        flip(img, offset)?;
        Ok(seen?.as_ref() != Some(&reference))
    };
    // A static stage 2 compresses to well over 256 KiB, so this step cannot skip it.
    let step = 256 * 1024;
    let mut below = 96;
    let mut hit = None;
    let mut offset = 96 + step;
    while offset < inode_table {
        if changes(offset)? {
            hit = Some(offset);
            break;
        }
        below = offset;
        offset += step;
    }
    let mut above = hit.with_context(|| format!("no byte of {file}'s data found"))?;
    while above - below > 1 {
        let mid = below + (above - below) / 2;
        if changes(mid)? {
            above = mid;
        } else {
            below = mid;
        }
    }
    Ok(above)
}

#[test]
fn shipped_definitions_keep_verity_on() -> Result<()> {
    let top = image::workspace();
    let mut seen = 0;
    for folder in ["images", "qemu-tests/images"] {
        for entry in std::fs::read_dir(top.join(folder))? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            let def = os_config::definition::Definition::parse(&path.display().to_string(), &text)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            ensure!(
                def.image.verity,
                "{} turns dm-verity off: only debugging images may",
                path.display()
            );
            seen += 1;
        }
    }
    ensure!(seen >= 2, "found only {seen} definitions");
    Ok(())
}
