//! Network boot under QEMU (OVMF, TCG): diskless guests boot the PXE folder's `boot.ipxe` from
//! QEMU's built-in TFTP server (the NIC's iPXE option ROM under OVMF runs the script, which loads
//! `vmlinuz`, `initrd.img` and `root.cpio` over TFTP; QEMU's DHCP names the script); the guest
//! reaches a local HTTP server on 127.0.0.1, serving the image to install and a release, only
//! through `guestfwd`. Nothing leaves the machine.
//!
//! Live, one guest after the other: in 512 MiB of RAM the root comes from the initramfs through
//! dm-verity, `/var` is a tmpfs, and the demo container serves its page; the root fetched by
//! stage 1 from `plinth.root-url=` (a script loading only the kernel and the initramfs) serves
//! the page too; an installation to `first-empty` passes over a disk holding ext4 (left as it
//! was) and a wrong sha256 is refused after the download, the blank disk staying unbootable.
//! Install, beside it (one blank disk): a power cut in the middle of the write leaves no
//! partition table; the next install succeeds, the installed disk boots with its container
//! running and takes the next release from the release server (v2 → v3, slot B, blessed).
//! The installation arguments reach the guest through QEMU's fw_cfg (`opt/plinth/cmdline`), which
//! stands in for the `plinth-args` a site's iPXE configuration would set.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use os_config::live::FW_CFG_CMDLINE;
use qemu_tests::series::{build, build_pxe, trusted_key, version_definition, GUEST_SERVER};
use qemu_tests::{free_port, parse_status, serve_folder as serve, Vm, VmOptions};

/// From QEMU start to a running container, under TCG on a busy machine (the boot file comes over
/// TFTP first).
const BOOT: Duration = Duration::from_secs(420);
/// The live guests' memory: the goal (the benchmark finds the real minimum).
const LIVE_MEM_MIB: u32 = 512;
/// The blank disk installed to: the image is about 2.1 GiB.
const DISK_BYTES: u64 = 4 << 30;
const MIB: u64 = 1 << 20;

/// A network-booted guest of `pxe` with `disks`, installation arguments `install` (fw_cfg), and
/// the demo container's port forwarded to `web` on the host.
fn live_guest(
    pxe: &Path,
    disks: &[&Path],
    install: Option<&str>,
    server: u16,
    web: u16,
) -> VmOptions {
    let mut opts = VmOptions::network_boot(pxe, builder::pxe::IPXE_FILE);
    opts.mem_mib = LIVE_MEM_MIB;
    opts.extra_disks = disks.iter().map(|d| d.to_path_buf()).collect();
    opts.guest_forwards = vec![(GUEST_SERVER.to_owned(), server)];
    opts.forwards = vec![(web, 8080)];
    if let Some(args) = install {
        opts.fw_cfg = vec![(FW_CFG_CMDLINE.to_owned(), args.to_owned())];
        // The installer reboots into the disk: QEMU exits instead.
        opts.no_reboot = true;
    }
    opts
}

/// The PXE folder's summary.
fn summary(pxe: &Path) -> Result<builder::pxe::PxeSummary> {
    let path = pxe.join(builder::pxe::SUMMARY_FILE);
    serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| format!("reading {}", path.display()))
}

/// A sparse blank disk of `size` bytes.
fn blank_disk(path: &Path, size: u64) -> Result<PathBuf> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.set_len(size)?;
    Ok(path.to_path_buf())
}

/// Whether `len` bytes at `at` of `disk` are all zero.
fn zeros_at(disk: &Path, at: u64, len: u64) -> Result<bool> {
    let mut file = std::fs::File::open(disk)?;
    file.seek(SeekFrom::Start(at))?;
    let mut buf = vec![0u8; len as usize];
    file.read_exact(&mut buf)?;
    Ok(buf.iter().all(|b| *b == 0))
}

/// Checks that firmware finds no partition table on `disk`: its first and last MiB are zeros.
fn expect_unbootable(disk: &Path, after: &str) -> Result<()> {
    let size = std::fs::metadata(disk)?.len();
    ensure!(
        zeros_at(disk, 0, MIB)? && zeros_at(disk, size - MIB, MIB)?,
        "after {after}, {} holds data in its first or last MiB (a GPT the firmware could boot)",
        disk.display()
    );
    let mut file = std::fs::File::open(disk)?;
    ensure!(
        os_config::gpt::read(&mut file).is_err(),
        "after {after}, {} has a readable GPT",
        disk.display()
    );
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// A folder for the file server with the PXE folder's disk image under `install/`; returns the
/// folder and the image's URL as the guest sees it.
fn serve_image(work: &Path, pxe: &Path, image: &str) -> Result<(PathBuf, String)> {
    let served = work.join("served");
    std::fs::create_dir_all(served.join("install"))?;
    let (from, to) = (pxe.join(image), served.join("install").join(image));
    std::fs::hard_link(&from, &to).or_else(|_| std::fs::copy(&from, &to).map(|_| ()))?;
    Ok((served, format!("http://{GUEST_SERVER}/install/{image}")))
}

/// The install arguments for fw_cfg.
fn install_args(target: &str, image_url: &str, sha256: &str, wipe: bool) -> String {
    format!(
        "plinth.install={target} plinth.install.image={image_url} plinth.install.sha256={sha256}{}",
        if wipe { " plinth.install.wipe" } else { "" }
    )
}

#[test]
fn a_live_boot_in_512_mib_serves_the_page_and_an_install_passes_over_a_used_disk_and_refuses_a_wrong_checksum(
) -> Result<()> {
    let work_dir = tempfile::tempdir()?;
    let work = work_dir.path();
    let (_, trusted) = trusted_key(work)?;
    let public = trusted.public().to_string();
    let (_, pxe) = build_pxe(work, "update-v2", &version_definition(2, &public))?;
    let summary = summary(&pxe)?;
    let (served, url) = serve_image(work, &pxe, &summary.image.file)?;
    let server = serve(&served)?;

    // The live system: root from the initramfs through dm-verity, /var a tmpfs, the page served.
    let web = free_port()?;
    let mut vm = Vm::boot(&live_guest(&pxe, &[], None, server, web))?;
    let root = vm.wait_status("root-mounted", BOOT)?;
    ensure!(
        root.get("slot").map(String::as_str) == Some("live")
            && root.get("verity").map(String::as_str) == Some("yes"),
        "the live root was not mounted through dm-verity: {root:?}"
    );
    vm.wait_status("state-tmpfs", BOOT)?;
    let running = vm.wait_status("container-running", BOOT)?;
    ensure!(
        running.get("name").map(String::as_str) == Some("web"),
        "{running:?}"
    );
    let page = qemu_tests::engine::http_get(web, "/", Duration::from_secs(60))?;
    ensure!(
        page.contains("Hello from Plinth"),
        "the live guest served {page:?}"
    );
    let console = vm.console();
    ensure!(
        console.contains(&format!("plinth.roothash={}", summary.root_hash)),
        "the live kernel command line lacks the image's root hash"
    );
    ensure!(
        !console.contains("service-started name=plinth-update"),
        "a live system started the update agent"
    );
    eprintln!(
        "live guest served its page at {:.0}s",
        vm.elapsed().as_secs_f64()
    );
    vm.kill();

    // The root fetched by stage 1 (plinth.root-url=) instead of carried in the initramfs: a
    // script that loads the kernel and the initramfs only.
    let tftp = work.join("tftp-net");
    std::fs::create_dir_all(&tftp)?;
    for file in [builder::pxe::KERNEL_FILE, builder::pxe::INITRD_FILE] {
        std::fs::copy(pxe.join(file), tftp.join(file))?;
    }
    std::fs::copy(
        pxe.join(os_config::live::ROOT_FILE),
        served.join(os_config::live::ROOT_FILE),
    )?;
    std::fs::write(
        tftp.join("net.ipxe"),
        format!(
            "#!ipxe\nkernel vmlinuz initrd=initrd.img {} plinth.root-url=http://{GUEST_SERVER}/{}\ninitrd initrd.img\nboot\n",
            summary.cmdline,
            os_config::live::ROOT_FILE
        ),
    )?;
    let web = free_port()?;
    let mut opts = live_guest(&tftp, &[], None, server, web);
    opts.tftp = Some((tftp.clone(), "net.ipxe".to_owned()));
    let mut vm = Vm::boot(&opts)?;
    let fetched = vm.wait_status("root-fetched", BOOT)?;
    ensure!(
        fetched.get("bytes").map(String::as_str)
            == Some(
                std::fs::metadata(pxe.join(os_config::live::ROOT_FILE))?
                    .len()
                    .to_string()
                    .as_str()
            ),
        "stage 1 fetched {fetched:?}"
    );
    let root = vm.wait_status("root-mounted", BOOT)?;
    ensure!(
        root.get("verity").map(String::as_str) == Some("yes"),
        "the fetched root was not mounted through dm-verity: {root:?}"
    );
    vm.wait_status("container-running", BOOT)?;
    let page = qemu_tests::engine::http_get(web, "/", Duration::from_secs(60))?;
    ensure!(
        page.contains("Hello from Plinth"),
        "the guest with a fetched root served {page:?}"
    );
    vm.kill();

    // A wrong checksum, with a disk holding an ext4 filesystem in front of a blank one:
    // `first-empty` passes over the used disk and leaves it as it was; the whole image is
    // downloaded and written to the blank disk, then refused, and that disk has no GPT. (The
    // refusal of a named used disk without `plinth.install.wipe` is unit-tested in
    // init/tests/update.rs.)
    let used = blank_disk(&work.join("used.raw"), 2 << 30)?;
    let status = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&used)
        .status()
        .context("running mkfs.ext4")?;
    ensure!(status.success(), "mkfs.ext4 failed");
    let before = sha256_file(&used)?;
    let disk = blank_disk(&work.join("blank.raw"), DISK_BYTES)?;
    let wrong = "0".repeat(64);
    let mut vm = Vm::boot(&live_guest(
        &pxe,
        &[&used, &disk],
        Some(&install_args("first-empty:2G", &url, &wrong, false)),
        server,
        free_port()?,
    ))?;
    let start = vm.wait_status("install-start", BOOT)?;
    ensure!(
        start.get("target").is_some_and(|t| t.ends_with("vdb")),
        "first-empty did not pass over the disk holding ext4: {start:?}"
    );
    let failed = vm.wait_status("install-failed", BOOT)?;
    ensure!(
        failed.get("reason").map(String::as_str) == Some("sha256-mismatch"),
        "expected install-failed reason=sha256-mismatch, got {failed:?}"
    );
    vm.kill();
    expect_unbootable(&disk, "a refused checksum")?;
    ensure!(
        sha256_file(&used)? == before,
        "the disk holding ext4 was changed"
    );

    Ok(())
}

#[test]
fn an_install_survives_a_power_cut_then_boots_and_updates() -> Result<()> {
    let work_dir = tempfile::tempdir()?;
    let work = work_dir.path();
    let (key, trusted) = trusted_key(work)?;
    let public = trusted.public().to_string();
    let (_, pxe) = build_pxe(work, "update-v2", &version_definition(2, &public))?;
    let v3_text = version_definition(3, &public);
    let v3 = build(work, "update-v3", &v3_text)?;
    let summary = summary(&pxe)?;

    // The server: the image to install under install/, the v3 release at the top.
    let (served, url) = serve_image(work, &pxe, &summary.image.file)?;
    let def = work.join("publish.toml");
    std::fs::write(&def, &v3_text)?;
    builder::publish::publish(&builder::publish::Options {
        file: def,
        key,
        to: served.clone(),
        disk: Some(v3),
        rollout: None,
        expires: builder::publish::Expiry::default(),
    })?;
    let server = serve(&served)?;
    let disk = blank_disk(&work.join("disk.raw"), DISK_BYTES)?;

    // A power cut while the image is being written: still no GPT.
    let args = install_args("first-empty:2G", &url, &summary.image.sha256, false);
    let mut vm = Vm::boot(&live_guest(
        &pxe,
        &[&disk],
        Some(&args),
        server,
        free_port()?,
    ))?;
    vm.wait_status("install-start", BOOT)?;
    let progress = vm.wait_status("install-progress", BOOT)?;
    vm.kill();
    eprintln!("power cut at {progress:?}");
    expect_unbootable(&disk, "a power cut during the install")?;

    // The install that completes; the installer reboots, which ends QEMU (-no-reboot).
    let mut vm = Vm::boot(&live_guest(
        &pxe,
        &[&disk],
        Some(&args),
        server,
        free_port()?,
    ))?;
    let start = vm.wait_status("install-start", BOOT)?;
    ensure!(
        start.get("target").map(String::as_str) == Some("/dev/vda"),
        "the installer chose {start:?}"
    );
    let done = vm.wait_status("install-done", BOOT)?;
    eprintln!(
        "installed in {} s (guest figure, download and write of {} bytes)",
        done.get("seconds").map_or("?", String::as_str),
        done.get("bytes").map_or("?", String::as_str)
    );
    let exit = vm.wait_exit(Duration::from_secs(120))?;
    ensure!(exit.success(), "QEMU ended with {exit} after the install");
    drop(vm);

    // The installed disk boots by itself: slot A, the container, then v3 from the release server.
    let mut opts = VmOptions::new(&disk);
    opts.guest_forwards = vec![(GUEST_SERVER.to_owned(), server)];
    let mut vm = Vm::boot(&opts)?;
    let root = vm.wait_status("root-mounted", BOOT)?;
    ensure!(
        root.get("slot").map(String::as_str) == Some("a"),
        "{root:?}"
    );
    vm.wait_status("container-running", BOOT)?;
    let staged = vm.wait_status("update-staged", BOOT)?;
    eprintln!("installed machine staged {staged:?}");
    let mut at = 0;
    let blessed = loop {
        let (line, end) = vm.wait_for_after("PLINTH-STATUS boot-blessed", at, BOOT)?;
        at = end;
        let fields = parse_status(&line);
        if fields.get("version").map(String::as_str) == Some("3.0.0") {
            break fields;
        }
    };
    ensure!(
        blessed.get("slot").map(String::as_str) == Some("b"),
        "{blessed:?}"
    );
    vm.kill();
    qemu_tests::fsck_esp(&disk)?;
    Ok(())
}
