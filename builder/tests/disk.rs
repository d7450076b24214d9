//! Disk image tests: builds a disk from a small synthetic tree and checks it with the reference
//! tools (sfdisk, fsck.vfat, mtools, unsquashfs, veritysetup, e2fsck) as oracles.

use std::path::{Path, PathBuf};
use std::process::Command;

use builder::disk::{self, DiskInputs, DiskReport};
use os_config::Definition;
use sha2::{Digest, Sha256};

const EPOCH: u64 = 1_700_000_000;
const MIB: u64 = 1 << 20;

const DEFINITION: &str = r#"
[image]
name = "test"
version = "1.2.3"

[kernel]
cmdline = ["console=ttyS0", "quiet"]

[disk]
esp = "64MiB"
root = "64MiB"
verity = "1MiB"
state = "64MiB"
"#;

/// Bytes that do not compress (xorshift).
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len.div_ceil(8))
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .take(len)
        .collect()
}

struct Fixture {
    dir: tempfile::TempDir,
    def: Definition,
    modules: Vec<(String, PathBuf, String)>,
}

impl Fixture {
    fn new(definition: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path();
        let tree = p.join("tree");
        let kver = "6.1.0-99-cloud-amd64";
        let moddir = tree.join("lib/modules").join(kver);
        std::fs::create_dir_all(moddir.join("kernel/drivers/block")).expect("mkdir");
        std::fs::create_dir_all(tree.join("usr/bin")).expect("mkdir");
        std::fs::create_dir_all(tree.join("etc")).expect("mkdir");
        std::fs::write(tree.join("etc/os-release"), "ID=plinth\nVERSION_ID=1.2.3\n").expect("w");
        std::fs::write(tree.join("usr/bin/dockerd"), noise(256 << 10)).expect("w");
        let ko = moddir.join("kernel/drivers/block/virtio_blk.ko");
        std::fs::write(&ko, b"fake module").expect("w");
        std::fs::write(
            moddir.join("modules.dep"),
            "kernel/drivers/block/virtio_blk.ko:\n",
        )
        .expect("w");
        std::fs::write(p.join("vmlinuz"), vec![0x4du8; 3 * MIB as usize]).expect("w");
        std::fs::write(p.join("systemd-bootx64.efi"), b"MZ fake systemd-boot").expect("w");
        std::fs::write(p.join("plinth-init"), b"\x7fELF fake init").expect("w");
        let def = Definition::parse("test.toml", definition).expect("definition parses");
        Fixture {
            def,
            modules: vec![(
                "virtio_blk".to_owned(),
                ko,
                "kernel/drivers/block/virtio_blk.ko".to_owned(),
            )],
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn build(&self, out: &Path) -> anyhow::Result<DiskReport> {
        self.build_as(out, disk::RootFormat::Squashfs)
    }

    fn build_as(&self, out: &Path, format: disk::RootFormat) -> anyhow::Result<DiskReport> {
        let (tree, vmlinuz, efi, init) = (
            self.path("tree"),
            self.path("vmlinuz"),
            self.path("systemd-bootx64.efi"),
            self.path("plinth-init"),
        );
        let inputs = DiskInputs {
            def: &self.def,
            tree: &tree,
            vmlinuz: &vmlinuz,
            systemd_boot_efi: &efi,
            init_binary: &init,
            initrd_modules: &self.modules,
            kernel_version: "6.1.0-99-cloud-amd64",
            source_date_epoch: EPOCH,
            zstd_level: None,
        };
        disk::write_disk_as(&inputs, out, format)
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Copies one partition (by sfdisk's start/size in sectors) out of the disk into its own file.
fn extract(disk: &Path, start: u64, size: u64, out: &Path) {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(disk).expect("open disk");
    file.seek(SeekFrom::Start(start * 512)).expect("seek");
    let mut data = vec![0u8; (size * 512) as usize];
    file.read_exact(&mut data).expect("read partition");
    std::fs::write(out, data).expect("write partition");
}

fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).expect("read")))
}

#[test]
fn built_disk_passes_the_reference_tools() {
    let fx = Fixture::new(DEFINITION);
    let out = fx.path("test-1.2.3.raw");
    let started = std::time::Instant::now();
    let report = fx.build(&out).expect("disk builds");
    eprintln!("disk build took {:.1}s", started.elapsed().as_secs_f64());
    assert_eq!(report.root_hash.len(), 64);
    assert_eq!(report.boot_entry, "plinth-a-1.2.3.conf");
    assert_eq!(
        std::fs::metadata(&out).expect("disk exists").len(),
        (1 + 64 + 64 + 1 + 64 + 1 + 64 + 1) * MIB
    );

    // Partition table.
    let json: serde_json::Value =
        serde_json::from_str(&run("sfdisk", &["--json", out.to_str().expect("utf-8")]))
            .expect("sfdisk prints JSON");
    let table = &json["partitiontable"];
    assert_eq!(table["label"], "gpt");
    let parts = table["partitions"].as_array().expect("partitions");
    let want = [
        ("esp", "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
        ("root-a", "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
        ("verity-a", "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5"),
        ("root-b", "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
        ("verity-b", "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5"),
        ("state", "4D21B016-B534-45C2-A9FB-5C16E091FD2D"),
    ];
    assert_eq!(parts.len(), 6, "{table}");
    for (part, (label, type_guid)) in parts.iter().zip(want) {
        assert_eq!(part["name"], label, "{part}");
        assert_eq!(part["type"], type_guid, "{part}");
        assert_eq!(part["start"].as_u64().expect("start") % 2048, 0, "{part}");
    }
    let sector = |i: usize, key: &str| parts[i][key].as_u64().expect("number");
    let uuid = |i: usize| {
        parts[i]["uuid"]
            .as_str()
            .expect("uuid")
            .to_ascii_lowercase()
            .replace('-', "")
    };
    // DPS: root-a = first 128 bits of the root hash, verity-a = the last 128.
    assert_eq!(uuid(1), report.root_hash[..32]);
    assert_eq!(uuid(2), report.root_hash[32..]);
    let verify = run("sfdisk", &["--verify", out.to_str().expect("utf-8")]);
    assert!(
        verify.contains("No errors detected"),
        "sfdisk --verify: {verify}"
    );

    // ESP.
    let esp = fx.path("esp.img");
    extract(&out, sector(0, "start"), sector(0, "size"), &esp);
    let esp_s = esp.to_str().expect("utf-8");
    run("fsck.vfat", &["-n", esp_s]);
    let listing = run("mdir", &["-i", esp_s, "-/", "-b", "::/"]);
    for want in [
        "::/EFI/BOOT/BOOTX64.EFI",
        "::/loader/loader.conf",
        "::/loader/entries/plinth-a-1.2.3.conf",
        "::/plinth/a/vmlinuz",
        "::/plinth/a/initrd",
    ] {
        assert!(
            listing.contains(want),
            "{want} missing from ESP:\n{listing}"
        );
    }
    let entry = run(
        "mtype",
        &["-i", esp_s, "::/loader/entries/plinth-a-1.2.3.conf"],
    );
    assert!(entry.contains("sort-key plinth\n"), "{entry}");
    assert!(entry.contains("version 1.2.3\n"), "{entry}");
    assert!(
        entry.contains(&format!(
            "options plinth.slot=a plinth.version=1.2.3 plinth.roothash={} console=ttyS0 quiet\n",
            report.root_hash
        )),
        "{entry}"
    );
    let kernel = run("mtype", &["-i", esp_s, "::/plinth/a/vmlinuz"]);
    assert_eq!(kernel.len(), 3 * MIB as usize);
    let initrd = Command::new("mtype")
        .args(["-i", esp_s, "::/plinth/a/initrd"])
        .output()
        .expect("mtype runs")
        .stdout;
    assert_eq!(initrd.len() as u64, report.initrd_size);
    use std::io::Read as _;
    // One zstd frame, then zeros up to a multiple of 4 bytes (for an archive loaded after it).
    assert_eq!(initrd.len() % builder::disk::initramfs::INITRD_ALIGN, 0);
    let mut cpio = Vec::new();
    zstd::stream::read::Decoder::new(initrd.as_slice())
        .expect("initrd is zstd")
        .single_frame()
        .read_to_end(&mut cpio)
        .expect("initrd decompresses");
    assert!(cpio.starts_with(b"070701"), "initrd is a newc cpio");

    // Root image and verity.
    let root = fx.path("root-a.img");
    extract(&out, sector(1, "start"), sector(1, "size"), &root);
    let files = run("unsquashfs", &["-l", root.to_str().expect("utf-8")]);
    for want in [
        "squashfs-root/usr/bin/dockerd",
        "squashfs-root/etc/os-release",
    ] {
        assert!(files.contains(want), "{want} missing:\n{files}");
    }
    let verity = fx.path("verity-a.img");
    extract(&out, sector(2, "start"), sector(2, "size"), &verity);
    let (root_s, verity_s) = (
        root.to_str().expect("utf-8"),
        verity.to_str().expect("utf-8"),
    );
    run(
        "veritysetup",
        &["verify", root_s, verity_s, &report.root_hash],
    );
    // A changed root hash is refused.
    let mut wrong = report.root_hash.clone().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let refused = Command::new("veritysetup")
        .args([
            "verify",
            root_s,
            verity_s,
            &String::from_utf8(wrong).expect("hex"),
        ])
        .status()
        .expect("veritysetup runs");
    assert!(!refused.success(), "veritysetup accepted a wrong root hash");

    // State.
    let state = fx.path("state.img");
    extract(&out, sector(5, "start"), sector(5, "size"), &state);
    run("e2fsck", &["-n", "-f", state.to_str().expect("utf-8")]);
    let dump = run("dumpe2fs", &["-h", state.to_str().expect("utf-8")]);
    assert!(dump.contains("Filesystem volume name:   state"), "{dump}");

    // plinth inspect reads it back.
    let info = builder::inspect::inspect_disk(&out).expect("inspect");
    assert_eq!(info.partitions.len(), 6);
    let a = &info.slots[0];
    assert_eq!(a.slot, "a");
    assert_eq!(a.version.as_deref(), Some("1.2.3"));
    assert_eq!(a.root_hash.as_deref(), Some(report.root_hash.as_str()));
    assert_eq!(a.uuids_match, Some(true));
    assert_eq!(a.verity_data_blocks, Some(report.root_image_size / 4096));
    assert_eq!(info.slots[1].entry, None);
    assert_eq!(info.entries.len(), 1);
    assert_eq!(info.entries[0].state, "good");
    let json = run(
        env!("CARGO_BIN_EXE_plinth"),
        &["inspect", "--json", out.to_str().expect("utf-8")],
    );
    let json: serde_json::Value = serde_json::from_str(&json).expect("inspect prints JSON");
    assert_eq!(json["slots"][0]["root_hash"], report.root_hash.as_str());
    assert_eq!(json["partitions"][5]["label"], "state");
    let text = run(
        env!("CARGO_BIN_EXE_plinth"),
        &["inspect", out.to_str().expect("utf-8")],
    );
    assert!(text.contains("a: version 1.2.3"), "{text}");
    assert!(text.contains("partition UUIDs match"), "{text}");
    assert!(text.contains("b: empty"), "{text}");
    assert!(text.contains("plinth-a-1.2.3.conf: good"), "{text}");
    assert!(!text.contains("size by component"), "{text}");

    // The size report `plinth build` writes beside the disk is part of inspect's output; one
    // of another build (root hash) is not.
    let sizes = builder::size_report::measure(
        &fx.path("tree"),
        "6.1.0-99-cloud-amd64",
        report.kernel_size,
        report.initrd_size,
        report.root_image_size,
        &report.root_hash,
    )
    .expect("size report");
    let sizes_path = builder::size_report::SizeReport::path_for(&out);
    sizes.write(&sizes_path).expect("write size report");
    let json = run(
        env!("CARGO_BIN_EXE_plinth"),
        &["inspect", "--json", out.to_str().expect("utf-8")],
    );
    let json: serde_json::Value = serde_json::from_str(&json).expect("inspect prints JSON");
    let components = json["size_report"]["components"]
        .as_array()
        .expect("components");
    let engine = components
        .iter()
        .find(|c| c["name"] == "engine")
        .expect("engine component");
    assert_eq!(engine["bytes"], 256 << 10);
    assert_eq!(components[0]["bytes"], report.kernel_size);
    let text = run(
        env!("CARGO_BIN_EXE_plinth"),
        &["inspect", out.to_str().expect("utf-8")],
    );
    assert!(text.contains("size by component"), "{text}");
    assert!(text.contains("  engine "), "{text}");
    let mut foreign = sizes.clone();
    foreign.root_hash = "00".repeat(32);
    foreign.write(&sizes_path).expect("write size report");
    let info = builder::inspect::inspect_disk(&out).expect("inspect");
    assert_eq!(info.size_report, None);
    std::fs::remove_file(&sizes_path).expect("remove size report");

    // Byte-identical second build.
    let second = fx.path("second.raw");
    let again = fx.build(&second).expect("second build");
    assert_eq!(again.root_hash, report.root_hash);
    assert_eq!(sha256(&out), sha256(&second), "two builds differ");

    // No temporary files are left next to the output.
    let leftovers: Vec<String> = std::fs::read_dir(fx.dir.path())
        .expect("list")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");

    // Output formats.
    let outputs =
        disk::convert(&out, &["raw".to_owned(), "qcow2".to_owned()]).expect("qcow2 conversion");
    assert_eq!(outputs, [out.clone(), out.with_extension("qcow2")]);
    let info = run(
        "qemu-img",
        &["info", "--output=json", outputs[1].to_str().expect("utf-8")],
    );
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");

    // Offline verification passes, then names a flipped byte's block.
    let plinth = env!("CARGO_BIN_EXE_plinth");
    let text = run(
        plinth,
        &["inspect", "--verify", out.to_str().expect("utf-8")],
    );
    assert!(text.contains("verity: intact"), "{text}");
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut disk = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&out)
            .expect("open disk");
        let offset = sector(1, "start") * 512 + 5 * 4096 + 100;
        let mut byte = [0u8];
        disk.seek(SeekFrom::Start(offset)).expect("seek");
        disk.read_exact(&mut byte).expect("read");
        disk.seek(SeekFrom::Start(offset)).expect("seek");
        disk.write_all(&[byte[0] ^ 0xff]).expect("flip");
    }
    let flipped = Command::new(plinth)
        .args(["inspect", "--verify", out.to_str().expect("utf-8")])
        .output()
        .expect("plinth runs");
    let stderr = String::from_utf8_lossy(&flipped.stderr);
    assert!(
        !flipped.status.success(),
        "a flipped byte passed verification"
    );
    assert!(
        stderr.contains("slot a: data block 5 of root-a"),
        "{stderr}"
    );
}

#[test]
fn erofs_root_passes_fsck_and_verity() {
    let fx = Fixture::new(DEFINITION);
    let out = fx.path("erofs.raw");
    let report = fx
        .build_as(&out, disk::RootFormat::Erofs)
        .expect("disk builds");
    assert_eq!(report.root_format, "erofs");
    let part = |label: &str| {
        report
            .partitions
            .iter()
            .find(|p| p.0 == label)
            .map(|p| (p.1 / 512, p.2 / 512))
            .expect(label)
    };
    let (root, verity) = (fx.path("root.img"), fx.path("verity.img"));
    let (start, size) = part("root-a");
    extract(&out, start, size, &root);
    let (start, size) = part("verity-a");
    extract(&out, start, size, &verity);
    // fsck.erofs wants the image alone, not the padded partition.
    let image = std::fs::read(&root).expect("read root");
    std::fs::write(&root, &image[..report.root_image_size as usize]).expect("trim");
    let root_s = root.to_str().expect("utf-8");
    run("fsck.erofs", &[root_s]);
    run(
        "veritysetup",
        &[
            "verify",
            root_s,
            verity.to_str().expect("utf-8"),
            &report.root_hash,
        ],
    );
    let again = fx
        .build_as(&fx.path("erofs2.raw"), disk::RootFormat::Erofs)
        .expect("second build");
    assert_eq!(again.root_hash, report.root_hash, "EROFS builds differ");
}

#[test]
fn root_image_larger_than_its_slot_names_both_sizes() {
    let fx = Fixture::new(DEFINITION);
    std::fs::write(fx.path("tree/usr/bin/big"), noise(80 * MIB as usize)).expect("write");
    let out = fx.path("big.raw");
    let err = fx.build(&out).expect_err("root does not fit");
    let text = format!("{err:#}");
    assert!(text.contains("the root image is"), "{text}");
    assert!(text.contains("[disk] root = \"64MiB\""), "{text}");
    assert!(
        !out.exists(),
        "no image under the final name after a failure"
    );
}

#[test]
fn unwritable_output_folder_is_named() {
    let fx = Fixture::new(DEFINITION);
    let out = fx.path("no/such/folder/x.raw");
    let err = fx.build(&out).expect_err("folder missing");
    let text = format!("{err:#}");
    assert!(text.contains("no/such/folder"), "{text}");
    assert!(text.contains("writable"), "{text}");
}

#[test]
fn too_small_esp_is_refused_clearly() {
    let def = DEFINITION.replace("esp = \"64MiB\"", "esp = \"1MiB\"");
    let err = Definition::parse("test.toml", &def).expect_err("esp too small");
    assert!(err.to_string().contains("at least 64MiB"), "{err}");
    // A kernel larger than the ESP is refused before anything is written.
    let fx = Fixture::new(DEFINITION);
    std::fs::write(fx.path("vmlinuz"), vec![1u8; 70 * MIB as usize]).expect("write");
    let out = fx.path("x.raw");
    let err = fx.build(&out).expect_err("kernel does not fit");
    assert!(format!("{err:#}").contains("raise [disk] esp"), "{err:#}");
    assert!(!out.exists());
}

/// Downloads (once) and extracts Debian's cloud kernel and systemd-boot under `target/test-debs`,
/// returning (vmlinuz, systemd-bootx64.efi).
fn real_kernel_and_loader() -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-debs");
    std::fs::create_dir_all(&dir).expect("create target/test-debs");
    let have = |prefix: &str| {
        std::fs::read_dir(&dir)
            .expect("list test-debs")
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                name.is_some_and(|n| n.starts_with(prefix) && n.ends_with(".deb"))
            })
    };
    if have("linux-image-6").is_none() || have("systemd-boot-efi_").is_none() {
        let depends = run("apt-cache", &["depends", "linux-image-cloud-amd64"]);
        let kernel = depends
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
            .map(|v| format!("linux-image-{v}"))
            .expect("linux-image-cloud-amd64 depends on a versioned kernel package");
        let out = Command::new("apt-get")
            .args(["download", &kernel, "systemd-boot-efi"])
            .current_dir(&dir)
            .output()
            .expect("apt-get runs");
        assert!(
            out.status.success(),
            "apt-get download {kernel} systemd-boot-efi failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let root = dir.join("extracted");
    for deb in [
        have("linux-image-6").expect("kernel .deb"),
        have("systemd-boot-efi_").expect("systemd-boot .deb"),
    ] {
        run(
            "dpkg-deb",
            &[
                "-x",
                deb.to_str().expect("utf-8"),
                root.to_str().expect("utf-8"),
            ],
        );
    }
    let vmlinuz = std::fs::read_dir(root.join("boot"))
        .expect("kernel extracted")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("vmlinuz-"))
        .expect("boot/vmlinuz-*");
    let efi = root.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    assert!(efi.is_file(), "{} missing", efi.display());
    (vmlinuz, efi)
}

/// OVMF starts systemd-boot from the ESP, which boots slot A's kernel with the entry's command
/// line (the kernel prints it on the serial console, then panics on the fake init: fine here).
#[test]
fn qemu_boots_slot_a_kernel_through_systemd_boot() {
    use builder::qemu::{qemu_command, Console, QemuOptions};
    use std::io::{BufRead, BufReader};

    let fx = Fixture::new(&DEFINITION.replace("\"console=ttyS0\", \"quiet\"", "\"console=ttyS0\""));
    let (vmlinuz, efi) = real_kernel_and_loader();
    std::fs::copy(&vmlinuz, fx.path("vmlinuz")).expect("copy kernel");
    std::fs::copy(&efi, fx.path("systemd-bootx64.efi")).expect("copy systemd-boot");
    let out = fx.path("boot.raw");
    let report = fx.build(&out).expect("disk builds");
    let vars = fx.path("vars.fd");
    std::fs::copy(builder::qemu::OVMF_VARS, &vars).expect("copy OVMF vars (install ovmf)");
    let mut opts = QemuOptions::new(&out, &vars);
    opts.mem_mib = 512;
    opts.console = Console::Stdio;
    opts.extra = vec!["-no-reboot".to_owned()];
    let mut child = Command::new("qemu-system-x86_64")
        .args(qemu_command(&opts))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 starts (install qemu-system-x86)");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut seen = Vec::new();
    let mut found = None;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.contains("Command line:") && line.contains("plinth.slot=a") {
                    found = Some(line);
                    break;
                }
                seen.push(line);
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = found.unwrap_or_else(|| {
        panic!(
            "no kernel command line with plinth.slot=a on the console; last lines:\n{}",
            seen[seen.len().saturating_sub(30)..].join("\n")
        )
    });
    assert!(line.contains("plinth.version=1.2.3"), "{line}");
    assert!(
        line.contains(&format!("plinth.roothash={}", report.root_hash)),
        "{line}"
    );
}
