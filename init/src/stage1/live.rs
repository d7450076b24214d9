//! Stage 1 of a live (network) boot, `plinth.live` on the kernel command line: the root is
//! `root.live` in the initramfs (see `os_config::live`), or downloaded into `/run` from
//! `plinth.root-url=` after DHCP, attached to a loop device and opened
//! through dm-verity against `plinth.roothash=` as a disk root is. It stays compressed in memory:
//! the initramfs file is the loop device's backing store, never unpacked. `/var` is the partition
//! `plinth.state=` names, else a partition labelled `state` on a local disk, else a tmpfs; an
//! installation (`plinth.install`) always uses a tmpfs, as its target may hold a `state`.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use os_config::gpt;
use os_config::layout::VeritySuperblock;
use os_config::live::{ARG_INSTALL, ARG_ROOT_URL, ARG_STATE};

use super::{detect_on, may_hold_gpt, partition_node, sysfs_text, Stage1};
use crate::mounts::FsKind;
use crate::system::{MountFlags, System};

/// The live root attached to its loop device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveRoot {
    /// `root.live` in the initramfs.
    pub file: PathBuf,
    /// The loop device over it.
    pub device: PathBuf,
    /// Root data blocks (4096 bytes); the verity superblock is the block after them.
    pub data_blocks: u64,
}

/// Step `live-root`: attaches `root.live` to a loop device (a no-op unless the boot is live).
pub fn live_root<S: System>(ctx: &mut Stage1<S>) -> Result<()> {
    let cmdline = ctx.cmdline()?.clone();
    if !cmdline.live {
        return Ok(());
    }
    let file = match cmdline.args.value(ARG_ROOT_URL) {
        Some(url) => {
            let file = ctx
                .paths
                .run
                .join("plinth")
                .join(os_config::live::ROOT_FILE);
            fetch_root(url, &file).with_context(|| format!("{ARG_ROOT_URL}={url}"))?;
            file
        }
        None => ctx.paths.live_root.clone(),
    };
    let len = ctx
        .sys
        .open_read(&file)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .with_context(|| {
            format!(
                "{} is not in the initramfs: a live boot needs the PXE folder's root.cpio loaded as a second initrd",
                file.display()
            )
        })?;
    let data_blocks = os_config::live::data_blocks_of(len).ok_or_else(|| {
        anyhow!(
            "{} is {len} bytes, which is no root image followed by its verity hash device",
            file.display()
        )
    })?;
    let device = ctx
        .sys
        .loop_attach(&file)
        .with_context(|| format!("attaching {} to a loop device", file.display()))?;
    crate::info!(
        "live root {} ({len} bytes, {data_blocks} data blocks) on {}",
        file.display(),
        device.display()
    );
    ctx.live = Some(LiveRoot {
        file,
        device,
        data_blocks,
    });
    Ok(())
}

/// How long a root download may go without a byte.
const FETCH_STALL: Duration = Duration::from_secs(60);

/// Downloads `root.live` from the http:// `url` into `dest` (under `/run`: memory), after
/// configuring the first Ethernet interface by DHCP. Nothing in it is trusted until dm-verity
/// checks each block against the root hash on the command line.
fn fetch_root(url: &str, dest: &Path) -> Result<()> {
    use std::io::{BufReader, Write as _};
    let parsed = crate::update::fetch::HttpUrl::parse(url)?;
    if parsed.scheme != crate::update::fetch::Scheme::Http {
        bail!("stage 1 fetches the root over http:// only (dm-verity checks what arrives)");
    }
    let network = crate::stage2::net::configure(
        &os_config::definition::Network::default(),
        &crate::stage2::net::Paths::default(),
    )
    .context("configuring the network by DHCP to fetch the root")?;
    crate::info!("network {network}");
    let started = std::time::Instant::now();
    let address = std::net::ToSocketAddrs::to_socket_addrs(&(parsed.host.as_str(), parsed.port))
        .with_context(|| format!("resolving {}", parsed.host))?
        .next()
        .ok_or_else(|| anyhow!("{} has no address", parsed.host))?;
    let stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(30))
        .with_context(|| format!("connecting to {address}"))?;
    stream.set_read_timeout(Some(FETCH_STALL))?;
    let mut writer = stream.try_clone()?;
    crate::http::write_head(
        &mut writer,
        "GET",
        &parsed.path,
        &[("Host", &parsed.authority()), ("Connection", "close")],
    )?;
    writer.flush()?;
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let head = crate::http::read_head(&mut reader)?;
    if head.status != 200 {
        bail!("the server answered {} instead of 200", head.status);
    }
    let mut body = crate::http::Body::new(&mut reader, &head, false)?;
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut out =
        std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    let bytes = std::io::copy(&mut body, &mut out)
        .with_context(|| format!("downloading into {}", dest.display()))?;
    if let Some(expected) = body.content_length().filter(|n| *n != bytes) {
        bail!("the download ended after {bytes} of {expected} bytes");
    }
    crate::status::status(
        "root-fetched",
        &[
            ("bytes", &bytes.to_string()),
            ("ms", &started.elapsed().as_millis().to_string()),
        ],
    );
    Ok(())
}

/// The `verity` step of a live boot: data and hash tree on the same loop device.
pub fn verity<S: System>(ctx: &mut Stage1<S>) -> Result<()> {
    let cmdline = ctx.cmdline()?.clone();
    let live = ctx
        .live
        .clone()
        .ok_or_else(|| anyhow!("the live root is not attached yet"))?;
    let hash = match cmdline.roothash {
        Some(hash) if cmdline.verity => hash,
        _ => {
            crate::info!("verity is off: mounting {} directly", live.device.display());
            ctx.root_device = Some(live.device);
            return Ok(());
        }
    };
    let mut head = vec![0u8; VeritySuperblock::SIZE];
    ctx.sys
        .open_read(&live.device)
        .and_then(|mut dev| {
            dev.seek(SeekFrom::Start(
                live.data_blocks * os_config::layout::VERITY_BLOCK_SIZE,
            ))?;
            dev.read_exact(&mut head)
        })
        .with_context(|| format!("reading the verity superblock of {}", live.file.display()))?;
    let superblock =
        VeritySuperblock::parse(&head).map_err(|e| anyhow!("{}: {e}", live.file.display()))?;
    if superblock.data_blocks != live.data_blocks {
        bail!(
            "{}: the verity superblock covers {} blocks, the file holds {}",
            live.file.display(),
            superblock.data_blocks,
            live.data_blocks
        );
    }
    let device = live.device.to_string_lossy();
    let params = superblock.table_params_at(
        &device,
        &device,
        live.data_blocks + 1,
        &hash.to_hex(),
        &["restart_on_corruption"],
    );
    let node = super::create_verity(ctx, &params, superblock.data_sectors())?;
    crate::info!(
        "dm-verity device {} over the live root {}, table `0 {} verity {params}`",
        node.display(),
        live.device.display(),
        superblock.data_sectors()
    );
    ctx.root_device = Some(node);
    ctx.root_verified = true;
    Ok(())
}

/// The `mount-state` step of a live boot.
pub fn mount_state<S: System>(ctx: &mut Stage1<S>, var: &Path) -> Result<()> {
    let cmdline = ctx.cmdline()?.clone();
    let node = if let Some(named) = cmdline.args.value(ARG_STATE) {
        let node = if named.starts_with('/') {
            PathBuf::from(named)
        } else {
            ctx.paths.dev.join(named)
        };
        wait_for(ctx, &node, Duration::from_secs(10))
            .with_context(|| format!("{ARG_STATE}={named}"))?;
        Some(node)
    } else if cmdline.args.has(ARG_INSTALL) {
        crate::info!("installing: /var is a tmpfs, whatever the local disks hold");
        None
    } else {
        find_state(ctx)
    };
    let Some(node) = node else {
        crate::status::status("state-tmpfs", &[("reason", "live")]);
        return ctx
            .sys
            .mount(
                "tmpfs",
                var,
                "tmpfs",
                MountFlags::NOSUID | MountFlags::NODEV,
                "mode=0755",
            )
            .with_context(|| format!("mounting tmpfs at {}", var.display()));
    };
    match detect_on(ctx.sys, &node)? {
        Some(FsKind::Ext4) => {}
        other => bail!(
            "{} (the live system's state) holds {}, expected ext4",
            node.display(),
            other.map_or("no recognized filesystem", FsKind::fstype)
        ),
    }
    ctx.sys
        .mount(
            &node.to_string_lossy(),
            var,
            "ext4",
            MountFlags::NOSUID | MountFlags::NODEV,
            "",
        )
        .with_context(|| format!("mounting {} (ext4) at {}", node.display(), var.display()))?;
    crate::status::status("state-mounted", &[("device", &node.to_string_lossy())]);
    Ok(())
}

/// Waits up to `timeout` for a device node to exist.
fn wait_for<S: System>(ctx: &Stage1<S>, node: &Path, timeout: Duration) -> Result<()> {
    let deadline = ctx.sys.now() + timeout;
    while !ctx.sys.exists(node) {
        if ctx.sys.now() >= deadline {
            bail!(
                "{} did not appear within {} s",
                node.display(),
                timeout.as_secs()
            );
        }
        ctx.sys.sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A partition labelled `state` on a local disk, if one is there now (the first by disk name).
fn find_state<S: System>(ctx: &Stage1<S>) -> Option<PathBuf> {
    let class_block = ctx.paths.sys.join("class/block");
    let mut names = ctx.sys.list_dir(&class_block).unwrap_or_default();
    names.sort();
    for name in names {
        if ctx.sys.exists(&class_block.join(&name).join("partition")) || !may_hold_gpt(&name) {
            continue;
        }
        if sysfs_text(ctx.sys, &class_block, &name, "size").as_deref() == Some("0") {
            continue;
        }
        let table = ctx
            .sys
            .open_read(&ctx.paths.dev.join(&name))
            .map_err(gpt::GptError::from)
            .and_then(|mut disk| gpt::read(&mut disk));
        let Ok(table) = table else { continue };
        let Some(state) = table.by_label("state") else {
            continue;
        };
        match partition_node(ctx.sys, &ctx.paths, &name, state) {
            Ok(node) => {
                crate::info!("live system: using the state partition {}", node.display());
                return Some(node);
            }
            Err(e) => crate::info!("live system: the state partition on {name}: {e:#}"),
        }
    }
    None
}
