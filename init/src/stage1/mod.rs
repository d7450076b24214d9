//! Stage 1, PID 1 in the initramfs: find the slot's root, open it through dm-verity, mount it with
//! `state` at its `/var`, switch into it and exec stage 2.

pub mod cmdline;
pub mod grow;
pub mod live;
pub mod verity;

use crate::boot::{Clock, Step};
use crate::coldplug::{log_report, ModuleLoader};
use crate::mounts::{self, FsKind};
use crate::stage1::cmdline::{Cmdline, RootHash};
use crate::system::{MountFlags, Paths, System};
use anyhow::{anyhow, bail, Context as _, Result};
use os_config::boot::{BootRecord, BOOT_RECORD_IN_RUN};
use os_config::gpt::{self, Partition};
use os_config::layout::{Slot, VeritySuperblock};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Modules stage 1 loads by name when the kernel has them as modules (disk controllers, root
/// filesystems, device-mapper): the set the builder packs into the initramfs. Others are found by
/// coldplug.
pub const MODULES: &[&str] = os_config::initramfs::MODULES;

/// Name of the device-mapper device of the verified root.
pub const DM_NAME: &str = "root";

/// The block devices of the booted slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotDevices {
    /// Whole disk (`/dev/vda`).
    pub disk: PathBuf,
    /// Sector size of its GPT.
    pub sector_size: u64,
    /// `root-<slot>` partition and its device node.
    pub root: (Partition, PathBuf),
    /// `verity-<slot>` partition and its device node.
    pub verity: Option<(Partition, PathBuf)>,
    /// `state` partition and its device node.
    pub state: Option<(Partition, PathBuf)>,
}

/// The root hash on the command line does not match the slot's partition UUIDs.
#[derive(Debug, thiserror::Error)]
#[error(
    "root hash mismatch on slot {slot} ({disk}): the kernel command line says plinth.roothash={expected}, \
     the partitions {root_label} (UUID {root_uuid}) and {verity_label} (UUID {verity_uuid}) belong to root hash {found}"
)]
pub struct RootHashMismatch {
    /// The slot.
    pub slot: Slot,
    /// The disk.
    pub disk: String,
    /// Hash from the command line.
    pub expected: RootHash,
    /// Hash the partition UUIDs spell (root UUID ‖ verity UUID).
    pub found: String,
    /// Root partition label.
    pub root_label: String,
    /// Root partition UUID.
    pub root_uuid: String,
    /// Verity partition label.
    pub verity_label: String,
    /// Verity partition UUID.
    pub verity_uuid: String,
}

/// State carried between stage 1 steps.
pub struct Stage1<'a, S: System> {
    /// The machine.
    pub sys: &'a S,
    /// Paths on the machine.
    pub paths: Paths,
    /// How long to wait for the boot disk.
    pub disk_timeout: Duration,
    /// Parsed command line (after `read-cmdline`).
    pub cmdline: Option<Cmdline>,
    /// Module loader (after `load-modules`).
    pub loader: Option<ModuleLoader>,
    /// The slot's devices (after `find-disk`).
    pub devices: Option<SlotDevices>,
    /// A live boot's root file and loop device (after `live-root`).
    pub live: Option<live::LiveRoot>,
    /// Device to mount as root (after `verity`).
    pub root_device: Option<PathBuf>,
    /// Whether `root_device` is the dm-verity device.
    pub root_verified: bool,
    /// Arguments passed on to stage 2.
    pub args: Vec<String>,
}

impl<S: System> std::fmt::Debug for Stage1<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage1")
            .field("paths", &self.paths)
            .field("devices", &self.devices)
            .finish()
    }
}

impl<S: System> Clock for Stage1<'_, S> {
    fn elapsed(&self) -> Duration {
        self.sys.now()
    }
}

impl<'a, S: System> Stage1<'a, S> {
    /// A fresh context.
    pub fn new(sys: &'a S, paths: Paths) -> Stage1<'a, S> {
        Stage1 {
            sys,
            paths,
            disk_timeout: Duration::from_secs(10),
            cmdline: None,
            loader: None,
            devices: None,
            live: None,
            root_device: None,
            root_verified: false,
            args: Vec::new(),
        }
    }

    fn cmdline(&self) -> Result<&Cmdline> {
        self.cmdline
            .as_ref()
            .ok_or_else(|| anyhow!("kernel command line not read yet"))
    }

    fn devices(&self) -> Result<&SlotDevices> {
        self.devices
            .as_ref()
            .ok_or_else(|| anyhow!("boot disk not found yet"))
    }
}

/// The steps of stage 1, in order.
pub fn steps<'a, S: System>() -> Vec<Step<Stage1<'a, S>>> {
    vec![
        Step {
            name: "mount-api",
            run: mount_api,
        },
        Step {
            name: "read-cmdline",
            run: read_cmdline,
        },
        Step {
            name: "load-modules",
            run: load_modules,
        },
        Step {
            name: "coldplug",
            run: coldplug,
        },
        Step {
            name: "live-root",
            run: live::live_root,
        },
        Step {
            name: "find-disk",
            run: find_disk,
        },
        Step {
            name: "record-boot",
            run: record_boot,
        },
        Step {
            name: "verity",
            run: verity,
        },
        Step {
            name: "mount-root",
            run: mount_root,
        },
        Step {
            name: "mount-state",
            run: mount_state,
        },
        Step {
            name: "grow-state",
            run: crate::stage1::grow::grow_state,
        },
        Step {
            name: "move-api",
            run: move_api,
        },
        Step {
            name: "switch-root",
            run: switch_root,
        },
        Step {
            name: "exec-stage2",
            run: exec_stage2,
        },
    ]
}

fn mount_api<S: System>(ctx: &mut Stage1<S>) -> Result<()> {
    let p = &ctx.paths;
    for spec in mounts::stage1_api(&p.proc_dir, &p.sys, &p.dev, &p.run) {
        spec.mount(ctx.sys)?;
    }
    crate::status::open_sinks();
    unlimit_kmsg(ctx.sys, &ctx.paths.proc_dir);
    Ok(())
}

/// Turns off the kernel's rate limit on `/dev/kmsg` writers, which would drop boot log lines.
pub fn unlimit_kmsg<S: System + ?Sized>(sys: &S, proc_dir: &Path) {
    let path = proc_dir.join("sys/kernel/printk_devkmsg");
    if let Err(e) = sys.write(&path, b"on\n") {
        crate::info!("writing {} failed: {e}", path.display());
    }
}

fn read_cmdline<S: System>(ctx: &mut Stage1<S>) -> Result<()> {
    let path = &ctx.paths.cmdline;
    let bytes = ctx
        .sys
        .read(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let cmdline =
        Cmdline::parse(&text).map_err(|e| anyhow!("{e} (command line: {})", text.trim()))?;
    crate::info!(
        "{} version {} verity {}",
        cmdline
            .slot
            .map_or_else(|| "live boot".to_owned(), |slot| format!("slot {slot}")),
        cmdline.version.as_deref().unwrap_or("unknown"),
        if cmdline.verity {
            "on"
        } else {
            "OFF (plinth.verity=0, debugging image)"
        }
    );
    if let Some(value) = cmdline.args.value("plinth.disk-timeout") {
        match value.parse::<u64>() {
            Ok(seconds) => ctx.disk_timeout = Duration::from_secs(seconds),
            Err(_) => crate::info!("ignoring plinth.disk-timeout={value}: expected whole seconds"),
        }
    }
    ctx.cmdline = Some(cmdline);
    Ok(())
}

fn load_modules<S: System>(ctx: &mut Stage1<S>) -> Result<()> {
    let release = ctx.sys.kernel_release();
    let mut loader = match ModuleLoader::open(ctx.sys, &ctx.paths.modules, &release) {
        Ok(loader) => loader,
        Err(e) => {
            // A kernel with its disk, filesystem and device-mapper drivers built in needs none.
            crate::info!("no loadable modules ({e:#}): relying on built-in drivers");
            return Ok(());
        }
    };
    let report = loader.load(ctx.sys, MODULES);
    log_report("modules", &report);
    ctx.loader = Some(loader);
    Ok(())
}

fn coldplug<S: System>(ctx: &mut Stage1<S>) -> Result<()> {
    let Some(loader) = ctx.loader.as_mut() else {
        return Ok(());
    };
    let report = loader.coldplug(ctx.sys, &ctx.paths.sys, 4);
    log_report("coldplug", &report);
    Ok(())
}

/// Reads `/sys/class/block/<name>/<file>` as trimmed text.
fn sysfs_text<S: System>(sys: &S, class_block: &Path, name: &str, file: &str) -> Option<String> {
    sys.read(&class_block.join(name).join(file))
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
}

/// A whole disk that carries the slot's root label.
struct Candidate {
    disk: String,
    table: gpt::Table,
}

fn find_disk<S: System>(ctx: &mut Stage1<S>) -> Result<()> {
    let cmdline = ctx.cmdline()?.clone();
    let Some(slot) = cmdline.slot else {
        // A live boot's root is in the initramfs.
        return Ok(());
    };
    let root_label = slot.root_label();
    let verity_label = slot.verity_label();
    let class_block = ctx.paths.sys.join("class/block");
    let deadline = ctx.sys.now() + ctx.disk_timeout;
    let mut next_report = ctx.sys.now() + Duration::from_secs(2);
    loop {
        let mut candidates = Vec::new();
        let mut seen = Vec::new();
        for name in ctx.sys.list_dir(&class_block).unwrap_or_default() {
            if ctx.sys.exists(&class_block.join(&name).join("partition")) || !may_hold_gpt(&name) {
                continue;
            }
            // Empty loop devices and drives without a medium report size 0.
            if sysfs_text(ctx.sys, &class_block, &name, "size").as_deref() == Some("0") {
                continue;
            }
            let node = ctx.paths.dev.join(&name);
            let table = ctx
                .sys
                .open_read(&node)
                .map_err(gpt::GptError::from)
                .and_then(|mut disk| gpt::read(&mut disk));
            match table {
                Ok(table) => {
                    if table.from_backup {
                        crate::info!("the primary GPT of {name} is damaged: using its backup");
                    }
                    seen.push(format!("{name} (GPT: {})", labels(&table)));
                    if table.by_label(root_label).is_some() {
                        candidates.push(Candidate { disk: name, table });
                    }
                }
                Err(e) => seen.push(format!("{name} ({e})")),
            }
        }
        if !candidates.is_empty() {
            let chosen = choose_candidate(&cmdline, slot, &candidates, root_label, verity_label)?;
            let devices = slot_devices(ctx, chosen, root_label, verity_label)?;
            crate::info!(
                "boot disk {}: {} on {}, {} on {}, state on {}",
                devices.disk.display(),
                root_label,
                devices.root.1.display(),
                verity_label,
                devices
                    .verity
                    .as_ref()
                    .map_or("-".into(), |v| v.1.display().to_string()),
                devices
                    .state
                    .as_ref()
                    .map_or("-".into(), |s| s.1.display().to_string()),
            );
            ctx.devices = Some(devices);
            return Ok(());
        }
        let now = ctx.sys.now();
        if now >= deadline {
            bail!(
                "no disk with a GPT partition labelled {root_label:?} after {} s; block devices: {}",
                ctx.disk_timeout.as_secs(),
                if seen.is_empty() { "none".to_string() } else { seen.join(", ") }
            );
        }
        if now >= next_report {
            crate::info!(
                "waiting for a disk with partition {root_label:?}; seen: {}",
                seen.join(", ")
            );
            next_report = now + Duration::from_secs(2);
        }
        ctx.sys.sleep(Duration::from_millis(250));
        // Controllers can reveal disks late; load drivers for whatever appeared meanwhile.
        if let Some(loader) = ctx.loader.as_mut() {
            let report = loader.coldplug(ctx.sys, &ctx.paths.sys, 2);
            log_report("coldplug", &report);
        }
    }
}

/// Records the disk, slot and root hash this boot found under `/run`
/// ([`os_config::boot::BootRecord`]); stage 2's bless gate and the update agent read it instead of
/// searching the disks again. `/run` moves into the new root with the other API filesystems.
fn record_boot<S: System>(ctx: &mut Stage1<S>) -> Result<()> {
    let cmdline = ctx.cmdline()?;
    let Some(slot) = cmdline.slot else {
        // A live boot has no slot to bless or update.
        return Ok(());
    };
    let record = BootRecord {
        disk: ctx.devices()?.disk.clone(),
        slot,
        root_hash: cmdline.roothash.map(|hash| hash.to_hex()),
    };
    let text = record.to_json().map_err(anyhow::Error::msg)?;
    let path = ctx.paths.run.join(BOOT_RECORD_IN_RUN);
    if let Some(dir) = path.parent() {
        ctx.sys
            .create_dir_all(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    ctx.sys
        .write(&path, text.as_bytes())
        .with_context(|| format!("writing the boot record {}", path.display()))
}

/// Whole-disk names worth reading a GPT from: not loop, RAM, floppy, optical or device-mapper
/// devices (a floppy probe alone can stall for seconds).
fn may_hold_gpt(name: &str) -> bool {
    !["loop", "ram", "zram", "fd", "sr", "dm-"]
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

fn labels(table: &gpt::Table) -> String {
    let names: Vec<&str> = table.partitions.iter().map(|p| p.label.as_str()).collect();
    names.join(" ")
}

/// Picks the disk whose partition UUIDs match the root hash (any disk when verity is off).
fn choose_candidate<'c>(
    cmdline: &Cmdline,
    slot: Slot,
    candidates: &'c [Candidate],
    root_label: &str,
    verity_label: &str,
) -> Result<&'c Candidate> {
    let Some(hash) = cmdline.roothash.filter(|_| cmdline.verity) else {
        return candidates
            .first()
            .ok_or_else(|| anyhow!("no candidate disk"));
    };
    for candidate in candidates {
        let root = candidate.table.by_label(root_label);
        let verity = candidate.table.by_label(verity_label);
        if let (Some(root), Some(verity)) = (root, verity) {
            if root.uuid.to_string() == hash.root_uuid()
                && verity.uuid.to_string() == hash.verity_uuid()
            {
                return Ok(candidate);
            }
        }
    }
    let first = candidates
        .first()
        .ok_or_else(|| anyhow!("no candidate disk"))?;
    let root = first
        .table
        .by_label(root_label)
        .ok_or_else(|| anyhow!("{root_label} vanished"))?;
    let Some(verity) = first.table.by_label(verity_label) else {
        bail!(
            "disk {} has partition {root_label} but no partition labelled {verity_label:?} (the dm-verity hash tree of slot {}); partitions: {}",
            first.disk,
            slot,
            labels(&first.table)
        );
    };
    let found = format!("{}{}", root.uuid.simple(), verity.uuid.simple());
    Err(RootHashMismatch {
        slot,
        disk: first.disk.clone(),
        expected: hash,
        found,
        root_label: root_label.to_string(),
        root_uuid: root.uuid.to_string(),
        verity_label: verity_label.to_string(),
        verity_uuid: verity.uuid.to_string(),
    }
    .into())
}

/// Maps the chosen disk's partitions to device nodes (creating a node devtmpfs has not made yet).
fn slot_devices<S: System>(
    ctx: &Stage1<S>,
    chosen: &Candidate,
    root_label: &str,
    verity_label: &str,
) -> Result<SlotDevices> {
    let node_of =
        |partition: &Partition| partition_node(ctx.sys, &ctx.paths, &chosen.disk, partition);
    let find = |label: &str| -> Result<Option<(Partition, PathBuf)>> {
        match chosen.table.by_label(label) {
            Some(partition) => Ok(Some((partition.clone(), node_of(partition)?))),
            None => Ok(None),
        }
    };
    let root =
        find(root_label)?.ok_or_else(|| anyhow!("{root_label} vanished from {}", chosen.disk))?;
    Ok(SlotDevices {
        disk: ctx.paths.dev.join(&chosen.disk),
        sector_size: chosen.table.sector_size,
        root,
        verity: find(verity_label)?,
        state: find("state")?,
    })
}

/// The device node of `partition` on the whole disk `disk` (a kernel name), created if devtmpfs
/// has not made it yet.
pub(crate) fn partition_node<S: System>(
    sys: &S,
    paths: &Paths,
    disk: &str,
    partition: &Partition,
) -> Result<PathBuf> {
    let disk_dir = paths.sys.join("class/block").join(disk);
    for child in sys.list_dir(&disk_dir).unwrap_or_default() {
        let number = sysfs_text(sys, &disk_dir, &child, "partition");
        if number.as_deref() != Some(partition.number.to_string().as_str()) {
            continue;
        }
        let node = paths.dev.join(&child);
        if !sys.exists(&node) {
            let dev = sysfs_text(sys, &disk_dir, &child, "dev").unwrap_or_default();
            let (major, minor) = parse_dev(&dev)
                .ok_or_else(|| anyhow!("{}: sysfs dev {dev:?} is not MAJOR:MINOR", child))?;
            sys.mknod_block(&node, major, minor)
                .with_context(|| format!("creating device node {}", node.display()))?;
        }
        return Ok(node);
    }
    bail!(
        "the kernel shows no partition {} ({:?}) on /dev/{disk}: is partition support (CONFIG_EFI_PARTITION) missing?",
        partition.number,
        partition.label,
    )
}

/// Parses sysfs `MAJOR:MINOR`.
fn parse_dev(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

fn verity<S: System>(ctx: &mut Stage1<S>) -> Result<()> {
    let cmdline = ctx.cmdline()?.clone();
    if cmdline.live {
        return live::verity(ctx);
    }
    let devices = ctx.devices()?.clone();
    let (root_part, root_node) = &devices.root;
    let hash = match cmdline.roothash {
        Some(hash) if cmdline.verity => hash,
        _ => {
            crate::info!("verity is off: mounting {} directly", root_node.display());
            ctx.root_device = Some(root_node.clone());
            return Ok(());
        }
    };
    let (_, verity_node) = devices.verity.as_ref().ok_or_else(|| {
        anyhow!(
            "disk {} has no partition labelled {:?} for slot {}",
            devices.disk.display(),
            cmdline.slot.map_or("", |s| s.verity_label()),
            cmdline.slot.map_or("?", Slot::as_str)
        )
    })?;
    let mut head = vec![0u8; VeritySuperblock::SIZE];
    ctx.sys
        .open_read(verity_node)
        .and_then(|mut dev| {
            dev.seek(SeekFrom::Start(0))?;
            dev.read_exact(&mut head)
        })
        .with_context(|| format!("reading the verity superblock of {}", verity_node.display()))?;
    let superblock =
        VeritySuperblock::parse(&head).map_err(|e| anyhow!("{}: {e}", verity_node.display()))?;
    let partition_sectors =
        (root_part.last_lba + 1 - root_part.first_lba) * devices.sector_size / 512;
    if superblock.data_sectors() > partition_sectors {
        bail!(
            "verity superblock on {} covers {} sectors, but {} ({}) has only {}",
            verity_node.display(),
            superblock.data_sectors(),
            root_part.label,
            root_node.display(),
            partition_sectors
        );
    }
    // A corrupted block restarts the machine: boot counting then falls back to the other slot.
    let params = superblock.table_params(
        &root_node.to_string_lossy(),
        &verity_node.to_string_lossy(),
        &hash.to_hex(),
        &["restart_on_corruption"],
    );
    let node = create_verity(ctx, &params, superblock.data_sectors())?;
    crate::info!(
        "dm-verity device {} over {} with hash tree on {}, table `0 {} verity {params}`",
        node.display(),
        root_node.display(),
        verity_node.display(),
        superblock.data_sectors()
    );
    ctx.root_device = Some(node);
    ctx.root_verified = true;
    Ok(())
}

/// Creates the read-only device-mapper device [`DM_NAME`] with one `verity` target of
/// `data_sectors` sectors; returns its node (made if devtmpfs lags behind).
fn create_verity<S: System>(ctx: &Stage1<S>, params: &str, data_sectors: u64) -> Result<PathBuf> {
    let (major, minor) = ctx
        .sys
        .dm_create(DM_NAME, &[(0, data_sectors, "verity", params)], true)
        .with_context(|| {
            format!("creating dm-verity device {DM_NAME:?} with table `verity {params}`")
        })?;
    let node = ctx.paths.dev.join(format!("dm-{minor}"));
    let deadline = ctx.sys.now() + Duration::from_secs(2);
    while !ctx.sys.exists(&node) && ctx.sys.now() < deadline {
        ctx.sys.sleep(Duration::from_millis(50));
    }
    if !ctx.sys.exists(&node) {
        ctx.sys
            .mknod_block(&node, major, minor)
            .with_context(|| format!("creating device node {}", node.display()))?;
    }
    Ok(node)
}

fn detect_on<S: System>(sys: &S, node: &Path) -> Result<Option<FsKind>> {
    let mut head = vec![0u8; mounts::DETECT_LEN];
    sys.open_read(node)
        .and_then(|mut dev| dev.read_exact(&mut head))
        .with_context(|| format!("reading the filesystem superblock of {}", node.display()))?;
    Ok(mounts::detect(&head))
}

fn mount_root<S: System>(ctx: &mut Stage1<S>) -> Result<()> {
    let cmdline = ctx.cmdline()?.clone();
    let node = ctx
        .root_device
        .clone()
        .ok_or_else(|| anyhow!("root device not set up yet"))?;
    let slot = cmdline.slot.map_or("live", Slot::as_str);
    let kind = detect_on(ctx.sys, &node)?;
    let fstype = match kind {
        Some(kind @ (FsKind::Squashfs | FsKind::Erofs)) => kind.fstype(),
        other => bail!(
            "{} (root of slot {slot}) holds {}, expected a squashfs or erofs root filesystem",
            node.display(),
            other.map_or("no recognized filesystem", FsKind::fstype)
        ),
    };
    let sysroot = ctx.paths.sysroot.clone();
    ctx.sys
        .create_dir_all(&sysroot)
        .with_context(|| format!("creating {}", sysroot.display()))?;
    ctx.sys
        .mount(
            &node.to_string_lossy(),
            &sysroot,
            fstype,
            MountFlags::RDONLY,
            "",
        )
        .with_context(|| {
            format!(
                "mounting {} ({fstype}) read-only at {}",
                node.display(),
                sysroot.display()
            )
        })?;
    let init = sysroot.join(&ctx.paths.init_in_root);
    if !ctx.sys.exists(&init) {
        bail!(
            "the root filesystem of slot {slot} ({}) has no {}",
            node.display(),
            ctx.paths.init_in_root.display()
        );
    }
    let verity = if ctx.root_verified { "yes" } else { "no" };
    crate::status::status(
        "root-mounted",
        &[
            ("device", &node.to_string_lossy()),
            ("verity", verity),
            ("fstype", fstype),
            ("slot", slot),
        ],
    );
    Ok(())
}

fn mount_state<S: System>(ctx: &mut Stage1<S>) -> Result<()> {
    let var = ctx.paths.sysroot.join("var");
    if !ctx.sys.exists(&var) {
        bail!(
            "the root filesystem has no /var mountpoint ({} is missing)",
            var.display()
        );
    }
    if ctx.cmdline()?.live {
        return live::mount_state(ctx, &var);
    }
    let Some((_, node)) = ctx.devices()?.state.clone() else {
        crate::info!("no partition labelled \"state\": /var is a tmpfs and nothing persists");
        crate::status::status("state-missing", &[]);
        return ctx
            .sys
            .mount(
                "tmpfs",
                &var,
                "tmpfs",
                MountFlags::NOSUID | MountFlags::NODEV,
                "mode=0755",
            )
            .with_context(|| format!("mounting tmpfs at {}", var.display()));
    };
    match detect_on(ctx.sys, &node)? {
        Some(FsKind::Ext4) => {}
        other => bail!(
            "partition \"state\" ({}) holds {}, expected ext4",
            node.display(),
            other.map_or("no recognized filesystem", FsKind::fstype)
        ),
    }
    ctx.sys
        .mount(
            &node.to_string_lossy(),
            &var,
            "ext4",
            MountFlags::NOSUID | MountFlags::NODEV,
            "",
        )
        .with_context(|| {
            format!(
                "mounting state partition {} (ext4) at {}",
                node.display(),
                var.display()
            )
        })?;
    crate::status::status("state-mounted", &[("device", &node.to_string_lossy())]);
    Ok(())
}

fn move_api<S: System>(ctx: &mut Stage1<S>) -> Result<()> {
    let p = &ctx.paths;
    for (from, name) in [
        (&p.proc_dir, "proc"),
        (&p.sys, "sys"),
        (&p.dev, "dev"),
        (&p.run, "run"),
    ] {
        let to = p.sysroot.join(name);
        if !ctx.sys.exists(&to) {
            bail!(
                "the root filesystem has no /{name} mountpoint ({} is missing)",
                to.display()
            );
        }
        ctx.sys
            .move_mount(from, &to)
            .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

fn switch_root<S: System>(ctx: &mut Stage1<S>) -> Result<()> {
    let sysroot = ctx.paths.sysroot.clone();
    ctx.sys
        .switch_root(&sysroot)
        .with_context(|| format!("switching root to {}", sysroot.display()))
}

fn exec_stage2<S: System>(ctx: &mut Stage1<S>) -> Result<()> {
    let program = Path::new("/").join(&ctx.paths.init_in_root);
    crate::status::status(
        "stage1-done",
        &[
            ("ms", &ctx.sys.now().as_millis().to_string()),
            ("uptime-ms", &crate::stage2::uptime_ms()),
        ],
    );
    let err = ctx.sys.exec(&program, &ctx.args);
    Err(anyhow!(err).context(format!("executing {} in the new root", program.display())))
}

/// Runs stage 1 as PID 1. Never returns: it execs stage 2, or reports a failed boot and reboots.
pub fn run() -> ! {
    crate::status::open_sinks();
    crate::status::status("stage1-start", &[]);
    let system = crate::system::RealSystem::default();
    let mut ctx = Stage1::new(&system, Paths::default());
    let error = match crate::boot::run_steps("stage1", &steps(), &mut ctx) {
        Ok(_) => anyhow!("stage 2 was not executed"),
        Err(e) => e,
    };
    boot_failed(&system, &ctx.paths, error)
}

/// How long a failed boot's message stays on screen before the reboot.
pub const FAILED_BOOT_DELAY: Duration = Duration::from_secs(5);

/// Reports a failed boot (both hashes for a root hash mismatch) and reboots after a delay. The
/// boot entry is not blessed, so boot counting falls back to the other slot.
fn boot_failed<S: System>(sys: &S, paths: &Paths, error: anyhow::Error) -> ! {
    crate::info!("boot failed: {error:#}");
    if let Some(mismatch) = error.downcast_ref::<RootHashMismatch>() {
        crate::status::status(
            "roothash-mismatch",
            &[
                ("slot", mismatch.slot.as_str()),
                ("expected", &mismatch.expected.to_hex()),
                ("found", &mismatch.found),
            ],
        );
    }
    crate::status::status(
        "boot-failed",
        &[("stage", "1"), ("error", &format!("{error:#}"))],
    );
    crate::info!("rebooting in {} s", FAILED_BOOT_DELAY.as_secs());
    sys.sleep(FAILED_BOOT_DELAY);
    rustix::fs::sync();
    // The state partition may be mounted already: leave its journal clean.
    let _ = rustix::mount::unmount(
        paths.sysroot.join("var"),
        rustix::mount::UnmountFlags::empty(),
    );
    if let Err(e) = rustix::system::reboot(rustix::system::RebootCommand::Restart) {
        crate::info!("reboot(2) failed: {e}");
    }
    loop {
        sys.sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::run_steps;
    use crate::system::FakeSystem;
    use os_config::gpt::testing::{build_disk, ROOT_TYPE, VERITY_TYPE};

    const HASH: &str = "00112233445566778899aabbccddeeff0123456789abcdef0123456789abcdef";
    const STATE_TYPE: &str = "4d21b016-b534-45c2-a9fb-5c16e091fd2d";

    fn superblock(data_blocks: u64) -> Vec<u8> {
        VeritySuperblock {
            data_blocks,
            salt: vec![1, 2, 3, 4],
            uuid: [0; 16],
        }
        .to_bytes()
    }

    /// A machine whose disk vda holds slot A with the given partition UUIDs.
    fn machine(root_uuid: &str, verity_uuid: &str, with_state: bool) -> FakeSystem {
        let sys = FakeSystem::new("6.1.0-test");
        sys.add_file(
            "/proc/cmdline",
            format!("plinth.slot=a plinth.version=1.0 plinth.roothash={HASH} console=ttyS0\n"),
        );
        let modules = "/lib/modules/6.1.0-test";
        sys.add_file(
            format!("{modules}/modules.dep"),
            "kernel/dm-verity.ko: kernel/dm-mod.ko\nkernel/dm-mod.ko:\nkernel/virtio_blk.ko:\n",
        );
        sys.add_file(
            format!("{modules}/modules.alias"),
            "alias virtio:d00000002v* virtio_blk\n",
        );
        for m in ["dm-verity", "dm-mod", "virtio_blk"] {
            sys.add_file(format!("{modules}/kernel/{m}.ko"), b"ko");
        }
        sys.add_file(
            "/sys/bus/virtio/devices/virtio1/modalias",
            "virtio:d00000002v00001AF4\n",
        );
        let mut parts = vec![
            (
                "esp",
                "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
                "aaaaaaaa-0000-0000-0000-000000000001",
                40,
                59,
            ),
            ("root-a", ROOT_TYPE, root_uuid, 60, 99),
            ("verity-a", VERITY_TYPE, verity_uuid, 100, 109),
        ];
        if with_state {
            parts.push((
                "state",
                STATE_TYPE,
                "bbbbbbbb-0000-0000-0000-000000000006",
                110,
                199,
            ));
        }
        sys.add_file("/dev/vda", build_disk(512, 200, &parts));
        sys.add_file("/sys/class/block/vda/dev", "254:0\n");
        for n in 1..=parts.len() {
            sys.add_file(
                format!("/sys/class/block/vda/vda{n}/partition"),
                format!("{n}\n"),
            );
            sys.add_file(
                format!("/sys/class/block/vda/vda{n}/dev"),
                format!("254:{n}\n"),
            );
            sys.add_file(
                format!("/sys/class/block/vda{n}/partition"),
                format!("{n}\n"),
            );
        }
        // vda2's node is left for stage 1 to create (devtmpfs may lag behind).
        for n in [1, 4] {
            sys.add_file(format!("/dev/vda{n}"), b"");
        }
        sys.add_file("/dev/vda3", superblock(4));
        let mut squash = vec![0u8; 4096];
        squash[0..4].copy_from_slice(b"hsqs");
        sys.add_file("/dev/dm-0", squash);
        let mut ext4 = vec![0u8; 4096];
        ext4[1080..1082].copy_from_slice(&[0x53, 0xef]);
        sys.add_file("/dev/vda4", ext4);
        sys.add_file("/sysroot/usr/bin/plinth-init", b"ELF");
        for dir in ["var", "proc", "sys", "dev", "run"] {
            sys.add_dir(format!("/sysroot/{dir}"));
        }
        sys
    }

    fn run(sys: &FakeSystem) -> Result<Vec<&'static str>> {
        let mut ctx = Stage1::new(sys, Paths::default());
        run_steps("stage1", &steps(), &mut ctx)
    }

    #[test]
    fn boots_slot_a_through_verity_in_order() {
        let sys = machine(
            "00112233-4455-6677-8899-aabbccddeeff",
            "01234567-89ab-cdef-0123-456789abcdef",
            true,
        );
        let err = run(&sys).expect_err("the fake exec returns, so the last step fails");
        assert!(
            format!("{err:#}").contains("executing /usr/bin/plinth-init"),
            "{err:#}"
        );
        let calls: Vec<String> = sys
            .calls()
            .into_iter()
            .filter(|c| !c.starts_with("mkdir"))
            .collect();
        let params = format!(
            "0 32 verity 1 /dev/vda2 /dev/vda3 4096 4096 4 1 sha256 {HASH} 01020304 1 restart_on_corruption"
        );
        assert_eq!(
            calls,
            [
                "mount proc proc /proc".to_string(),
                "mount sysfs sysfs /sys".into(),
                "mount devtmpfs devtmpfs /dev mode=0755".into(),
                "mount tmpfs tmpfs /run mode=0755".into(),
                "write /proc/sys/kernel/printk_devkmsg".into(),
                "load /lib/modules/6.1.0-test/kernel/virtio_blk.ko".into(),
                "load /lib/modules/6.1.0-test/kernel/dm-mod.ko".into(),
                "load /lib/modules/6.1.0-test/kernel/dm-verity.ko".into(),
                "mknod /dev/vda2 254:2".into(),
                "write /run/plinth/boot.json".into(),
                format!("dm-create root ro {params}"),
                "mount squashfs /dev/dm-0 /sysroot ro".into(),
                "mount ext4 /dev/vda4 /sysroot/var".into(),
                "move /proc /sysroot/proc".into(),
                "move /sys /sysroot/sys".into(),
                "move /dev /sysroot/dev".into(),
                "move /run /sysroot/run".into(),
                "switch-root /sysroot".into(),
                "exec /usr/bin/plinth-init ".into(),
            ]
        );
        let record = sys
            .read(Path::new("/run/plinth/boot.json"))
            .expect("boot record");
        let record = BootRecord::parse(&String::from_utf8_lossy(&record)).expect("parses");
        assert_eq!(
            record,
            BootRecord {
                disk: PathBuf::from("/dev/vda"),
                slot: Slot::A,
                root_hash: Some(HASH.to_owned()),
            }
        );
    }

    /// A diskless machine booted live: `root.live` of `data_blocks` blocks in the initramfs.
    fn live_machine(data_blocks: u64, extra: &str) -> FakeSystem {
        let sys = FakeSystem::new("6.1.0-test");
        sys.add_file(
            "/proc/cmdline",
            format!(
                "plinth.live plinth.version=1.0 plinth.roothash={HASH} console=ttyS0 {extra}\n"
            ),
        );
        let block = os_config::layout::VERITY_BLOCK_SIZE;
        let mut live = vec![0u8; (data_blocks * block) as usize];
        live[0..4].copy_from_slice(b"hsqs");
        let mut verity = superblock(data_blocks);
        verity.resize(os_config::manifest::verity_size(data_blocks) as usize, 0);
        live.extend_from_slice(&verity);
        sys.add_file("/plinth/root.live", live);
        let mut squash = vec![0u8; 4096];
        squash[0..4].copy_from_slice(b"hsqs");
        sys.add_file("/dev/dm-0", squash);
        sys.add_file("/sysroot/usr/bin/plinth-init", b"ELF");
        for dir in ["var", "proc", "sys", "dev", "run"] {
            sys.add_dir(format!("/sysroot/{dir}"));
        }
        sys.add_dir("/sys/class/block");
        sys
    }

    #[test]
    fn a_live_boot_opens_the_initramfs_root_through_a_loop_device_and_verity() {
        let sys = live_machine(130, "");
        let err = run(&sys).expect_err("the fake exec returns, so the last step fails");
        assert!(
            format!("{err:#}").contains("executing /usr/bin/plinth-init"),
            "{err:#}"
        );
        let calls: Vec<String> = sys
            .calls()
            .into_iter()
            .filter(|c| {
                !c.starts_with("mkdir") && !c.starts_with("mount ") || c.contains("sysroot")
            })
            .collect();
        // Data and tree on one device: the tree starts after 130 data blocks and the superblock.
        let params = format!(
            "0 1040 verity 1 /dev/loop0 /dev/loop0 4096 4096 130 131 sha256 {HASH} 01020304 1 restart_on_corruption"
        );
        assert_eq!(
            calls,
            [
                "write /proc/sys/kernel/printk_devkmsg".to_string(),
                "loop-attach /plinth/root.live".into(),
                format!("dm-create root ro {params}"),
                "mount squashfs /dev/dm-0 /sysroot ro".into(),
                "mount tmpfs tmpfs /sysroot/var mode=0755".into(),
                "move /proc /sysroot/proc".into(),
                "move /sys /sysroot/sys".into(),
                "move /dev /sysroot/dev".into(),
                "move /run /sysroot/run".into(),
                "switch-root /sysroot".into(),
                "exec /usr/bin/plinth-init ".into(),
            ]
        );
        // No slot: no boot record for the bless gate or the update agent.
        assert!(!sys.exists(Path::new("/run/plinth/boot.json")));
    }

    #[test]
    fn a_live_boot_mounts_the_named_state_partition() {
        let sys = live_machine(8, "plinth.state=vdb1");
        let mut ext4 = vec![0u8; 4096];
        ext4[1080..1082].copy_from_slice(&[0x53, 0xef]);
        sys.add_file("/dev/vdb1", ext4);
        run(&sys).expect_err("the fake exec returns");
        assert!(
            sys.calls()
                .contains(&"mount ext4 /dev/vdb1 /sysroot/var".to_string()),
            "{:?}",
            sys.calls()
        );
    }

    #[test]
    fn a_live_boot_refuses_a_missing_or_malformed_root_and_a_slot() {
        let sys = live_machine(8, "");
        sys.add_file("/plinth/root.live", vec![0u8; 4096 * 3 + 1]);
        let err = run(&sys).expect_err("malformed");
        assert!(
            format!("{err:#}").contains("no root image followed by its verity hash device"),
            "{err:#}"
        );
        let sys = FakeSystem::new("6.1.0-test");
        sys.add_file(
            "/proc/cmdline",
            format!("plinth.live plinth.roothash={HASH}\n"),
        );
        let err = run(&sys).expect_err("missing");
        assert!(format!("{err:#}").contains("root.cpio"), "{err:#}");
        let err = Cmdline::parse(&format!("plinth.live plinth.slot=a plinth.roothash={HASH}"))
            .expect_err("both");
        assert!(err.contains("a live boot has no slot"), "{err}");
    }

    #[test]
    fn wrong_root_hash_names_slot_and_both_hashes() {
        let sys = machine(
            "ffffffff-4455-6677-8899-aabbccddeeff",
            "01234567-89ab-cdef-0123-456789abcdef",
            true,
        );
        let err = run(&sys).expect_err("mismatch");
        let mismatch = err.downcast_ref::<RootHashMismatch>().expect("typed error");
        assert_eq!(mismatch.slot, Slot::A);
        let text = format!("{err:#}");
        assert!(text.contains("step find-disk"), "{text}");
        assert!(text.contains(HASH), "{text}");
        assert!(
            text.contains("ffffffff445566778899aabbccddeeff0123456789abcdef0123456789abcdef"),
            "{text}"
        );
        assert!(!sys
            .calls()
            .iter()
            .any(|c| c.starts_with("dm-create") || c.contains("/sysroot")));
    }

    #[test]
    fn missing_partition_is_named_after_waiting() {
        let sys = machine(
            "00112233-4455-6677-8899-aabbccddeeff",
            "01234567-89ab-cdef-0123-456789abcdef",
            true,
        );
        sys.add_file(
            "/proc/cmdline",
            format!("plinth.slot=b plinth.roothash={HASH}"),
        );
        let err = run(&sys).expect_err("no root-b");
        let text = format!("{err:#}");
        assert!(
            text.contains("partition labelled \"root-b\" after 10 s"),
            "{text}"
        );
        assert!(
            text.contains("vda (GPT: esp root-a verity-a state)"),
            "{text}"
        );
        assert!(sys.now() >= Duration::from_secs(10));
    }

    #[test]
    fn disk_timeout_comes_from_the_command_line_and_odd_devices_are_skipped() {
        let sys = machine(
            "00112233-4455-6677-8899-aabbccddeeff",
            "01234567-89ab-cdef-0123-456789abcdef",
            true,
        );
        sys.add_file(
            "/proc/cmdline",
            format!("plinth.slot=b plinth.roothash={HASH} plinth.disk-timeout=30"),
        );
        sys.add_file("/sys/class/block/loop0/size", "0\n");
        sys.add_file("/sys/class/block/sr0/size", "2048\n");
        sys.add_file("/sys/class/block/vdb/size", "0\n");
        let err = run(&sys).expect_err("no root-b");
        let text = format!("{err:#}");
        assert!(
            text.contains("after 30 s; block devices: vda (GPT"),
            "{text}"
        );
        assert!(
            !text.contains("loop0") && !text.contains("sr0") && !text.contains("vdb"),
            "{text}"
        );
    }

    #[test]
    fn a_kernel_without_modules_still_boots() {
        let sys = machine(
            "00112233-4455-6677-8899-aabbccddeeff",
            "01234567-89ab-cdef-0123-456789abcdef",
            true,
        );
        let mut ctx = Stage1::new(&sys, Paths::default());
        ctx.paths.modules = PathBuf::from("/nonexistent");
        let err = run_steps("stage1", &steps(), &mut ctx).expect_err("fake exec returns");
        assert!(format!("{err:#}").contains("step exec-stage2"), "{err:#}");
        assert!(!sys.calls().iter().any(|c| c.starts_with("load ")));
    }

    #[test]
    fn verity_off_mounts_the_partition_and_missing_state_gives_tmpfs() {
        let sys = machine(
            "00000000-0000-0000-0000-000000000000",
            "00000000-0000-0000-0000-000000000000",
            false,
        );
        sys.add_file("/proc/cmdline", "plinth.slot=a plinth.verity=0");
        let mut squash = vec![0u8; 4096];
        squash[0..4].copy_from_slice(b"hsqs");
        sys.add_file("/dev/vda2", squash);
        let steps = run(&sys).expect_err("fake exec returns");
        assert!(format!("{steps:#}").contains("exec-stage2"));
        let calls = sys.calls();
        assert!(
            calls.contains(&"mount squashfs /dev/vda2 /sysroot ro".to_string()),
            "{calls:?}"
        );
        assert!(
            calls.contains(&"mount tmpfs tmpfs /sysroot/var mode=0755".to_string()),
            "{calls:?}"
        );
        assert!(!calls.iter().any(|c| c.starts_with("dm-create")));
    }

    #[test]
    fn non_ext4_state_is_refused() {
        let sys = machine(
            "00112233-4455-6677-8899-aabbccddeeff",
            "01234567-89ab-cdef-0123-456789abcdef",
            true,
        );
        sys.add_file("/dev/vda4", vec![0u8; 4096]);
        let err = run(&sys).expect_err("state not ext4");
        let text = format!("{err:#}");
        assert!(
            text.contains(
                "partition \"state\" (/dev/vda4) holds no recognized filesystem, expected ext4"
            ),
            "{text}"
        );
    }
}
