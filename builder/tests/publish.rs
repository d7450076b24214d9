//! `plinth publish` on synthetic disk images: GPT and FAT written here, the verity tree by
//! `veritysetup format` (the reference implementation) as an oracle for the root hash.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use builder::cli::PublishArgs;
use builder::disk::slice::Slice;
use builder::publish::{self, Release};
use os_config::manifest::{self, Manifest, SecretKey};
use os_config::units::{Name, Version};

const MIB: u64 = 1 << 20;

/// Runs `veritysetup format` over `data` and returns (hash device bytes, root hash hex).
fn verity_format(data: &[u8]) -> (Vec<u8>, String) {
    let f = os_config::oracle::veritysetup_format(data, Some("0123456789abcdef"), None);
    (f.hash_device, f.root_hash)
}

/// A disk image shaped like `plinth build`'s output; returns the root hash of slot A.
fn make_disk(path: &Path, seed: u8, blocks: usize) -> (Vec<u8>, String) {
    let root_data: Vec<u8> = (0..blocks * 4096)
        .map(|i| (i as u8).wrapping_mul(seed).wrapping_add((i >> 12) as u8))
        .collect();
    let (verity, root_hash) = verity_format(&root_data);
    let file = fs::File::create(path).expect("create disk");
    file.set_len(64 * MIB).expect("size disk");
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open disk");
    gpt::mbr::ProtectiveMBR::with_lb_size(((64 * MIB) / 512 - 1) as u32)
        .overwrite_lba0(&mut file)
        .expect("mbr");
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .create_from_device(&mut file, Some(uuid::Uuid::from_u128(1)))
        .expect("gpt");
    let sizes = [
        ("esp", 33 * MIB, gpt::partition_types::EFI),
        ("root-a", 8 * MIB, gpt::partition_types::LINUX_FS),
        ("verity-a", MIB, gpt::partition_types::LINUX_FS),
        ("root-b", 8 * MIB, gpt::partition_types::LINUX_FS),
        ("verity-b", MIB, gpt::partition_types::LINUX_FS),
        ("state", 8 * MIB, gpt::partition_types::LINUX_FS),
    ];
    for (name, size, kind) in sizes {
        disk.add_partition(name, size, kind, 0, Some(2048))
            .expect("add partition");
    }
    let parts: Vec<(String, u64, u64)> = disk
        .partitions()
        .values()
        .map(|p| {
            (
                p.name.clone(),
                p.bytes_start(gpt::disk::LogicalBlockSize::Lb512)
                    .expect("start"),
                p.bytes_len(gpt::disk::LogicalBlockSize::Lb512)
                    .expect("len"),
            )
        })
        .collect();
    disk.write().expect("write gpt");
    let at = |label: &str| parts.iter().find(|p| p.0 == label).cloned().expect(label);
    let (_, root_start, _) = at("root-a");
    let (_, verity_start, _) = at("verity-a");
    file.seek(SeekFrom::Start(root_start)).expect("seek");
    file.write_all(&root_data).expect("root");
    file.seek(SeekFrom::Start(verity_start)).expect("seek");
    file.write_all(&verity).expect("verity");
    let (_, esp_start, esp_len) = at("esp");
    let mut region = Slice::new(&mut file, esp_start, esp_len);
    fatfs::format_volume(
        &mut region,
        fatfs::FormatVolumeOptions::new().fat_type(fatfs::FatType::Fat32),
    )
    .expect("format esp");
    region.seek(SeekFrom::Start(0)).expect("rewind");
    let fs = fatfs::FileSystem::new(region, fatfs::FsOptions::new()).expect("fat");
    let root = fs.root_dir();
    root.create_dir("plinth").expect("dir");
    root.create_dir("plinth/a").expect("dir");
    root.create_dir("loader").expect("dir");
    root.create_dir("loader/entries").expect("dir");
    let put = |path: &str, data: &[u8]| {
        let mut f = root.create_file(path).expect(path);
        f.truncate().expect("truncate");
        f.write_all(data).expect(path);
    };
    put("plinth/a/vmlinuz", &vec![seed; 300_000]);
    put("plinth/a/initrd", format!("initrd {seed}").as_bytes());
    put(
        &format!("loader/entries/plinth-a-{seed}.conf"),
        format!(
            "title Plinth\nsort-key plinth\nversion {seed}\nlinux /plinth/a/vmlinuz\ninitrd /plinth/a/initrd\noptions plinth.slot=a plinth.version={seed} plinth.roothash={root_hash} console=ttyS0 quiet\n"
        )
        .as_bytes(),
    );
    drop(root);
    fs.unmount().expect("unmount");
    (root_data, root_hash)
}

fn unzstd(path: &Path) -> Vec<u8> {
    zstd::decode_all(fs::File::open(path).expect("artifact")).expect("zstd")
}

fn release<'a>(
    disk: &'a Path,
    name: &'a Name,
    version: &'a Version,
    channel: &'a Name,
) -> Release<'a> {
    Release {
        disk,
        name,
        version,
        channel,
        cmdline: &[],
        created: 1_795_820_399,
        rollout: None,
    }
}

#[test]
fn publishes_signed_content_addressed_releases_and_keeps_older_ones() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let out = dir.join("releases");
    let key = SecretKey::from_seed([7; 32]);
    let name = Name::parse("demo").expect("name");
    let channel = Name::parse("stable").expect("name");
    let v1 = Version::parse("1").expect("v");
    let v2 = Version::parse("2").expect("v");

    let disk1 = dir.join("demo-1.raw");
    let (root1, hash1) = make_disk(&disk1, 1, 300);
    let m1 = publish::publish_release(&release(&disk1, &name, &v1, &channel), &key, &out)
        .expect("publish v1");
    assert_eq!(
        m1.root_hash.as_str(),
        hash1,
        "root hash agrees with veritysetup"
    );
    assert_eq!(m1.data_blocks, 300);
    assert_eq!(m1.salt, "0123456789abcdef");
    assert_eq!(m1.cmdline, ["console=ttyS0", "quiet"]);
    assert_eq!(m1.created, "2026-11-27T22:59:59Z");

    // The channel manifest verifies with the public key and names artifacts that decompress to
    // exactly what the disk holds.
    let bytes = fs::read(out.join("stable/manifest.json")).expect("channel manifest");
    let sig = fs::read(out.join("stable/manifest.json.sig")).expect("signature");
    let parsed = manifest::verify_signed(&bytes, &sig, &[key.public()]).expect("verifies");
    assert_eq!(parsed, m1);
    assert!(
        manifest::verify_signed(&bytes, &sig, &[SecretKey::from_seed([8; 32]).public()]).is_err()
    );
    assert_eq!(unzstd(&out.join(&m1.artifacts.root.path)), root1);
    let verity = unzstd(&out.join(&m1.artifacts.verity.path));
    assert_eq!(verity.len() as u64, manifest::verity_size(300));
    assert_eq!(&verity[..6], b"verity");
    assert_eq!(
        unzstd(&out.join(&m1.artifacts.kernel.path)),
        vec![1u8; 300_000]
    );
    assert_eq!(unzstd(&out.join(&m1.artifacts.initrd.path)), b"initrd 1");
    assert_eq!(
        fs::metadata(out.join(&m1.artifacts.kernel.path))
            .expect("kernel")
            .len(),
        m1.artifacts.kernel.size
    );

    // Publishing the same release again is a no-op; a different release under the same version
    // is refused.
    publish::publish_release(&release(&disk1, &name, &v1, &channel), &key, &out)
        .expect("republish identical v1");
    let disk2 = dir.join("demo-2.raw");
    let (root2, _) = make_disk(&disk2, 2, 200);
    let err = publish::publish_release(&release(&disk2, &name, &v1, &channel), &key, &out)
        .expect_err("different content under v1");
    assert!(
        format!("{err:#}").contains("already holds a different release"),
        "{err:#}"
    );

    let m2 = publish::publish_release(&release(&disk2, &name, &v2, &channel), &key, &out)
        .expect("publish v2");
    let channel_now =
        Manifest::parse(&fs::read(out.join("stable/manifest.json")).expect("read")).expect("parse");
    assert_eq!(channel_now.version, v2);
    assert_eq!(unzstd(&out.join(&m2.artifacts.root.path)), root2);
    // v1 stays published, with its artifacts.
    let old = Manifest::parse(&fs::read(out.join("stable/1/manifest.json")).expect("v1 kept"))
        .expect("parse");
    assert_eq!(old, m1);
    assert!(out.join(&m1.artifacts.root.path).exists());

    // Publishing v1 after v2 leaves the channel on v2.
    fs::remove_dir_all(out.join("stable/1")).expect("remove v1");
    publish::publish_release(&release(&disk1, &name, &v1, &channel), &key, &out).expect("v1 again");
    let channel_now =
        Manifest::parse(&fs::read(out.join("stable/manifest.json")).expect("read")).expect("parse");
    assert_eq!(channel_now.version, v2);

    // An artifact whose file was altered is never overwritten.
    let kernel_path = out.join(&m1.artifacts.kernel.path);
    let mut data = fs::read(&kernel_path).expect("read");
    data[10] ^= 0xff;
    fs::write(&kernel_path, &data).expect("corrupt");
    let err = publish::publish_release(&release(&disk1, &name, &v1, &channel), &key, &out)
        .expect_err("corrupt artifact");
    assert!(format!("{err:#}").contains("never overwritten"), "{err:#}");
    assert_eq!(fs::read(&kernel_path).expect("read"), data);
}

#[test]
fn keygen_writes_a_private_key_and_the_public_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let prefix = tmp.path().join("release");
    let public = publish::write_keypair(&prefix).expect("keygen");
    let secret = publish::read_secret_key(&tmp.path().join("release.key")).expect("read key");
    assert_eq!(secret.public(), public);
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(tmp.path().join("release.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut line = String::new();
    fs::File::open(tmp.path().join("release.pub"))
        .expect("pub")
        .read_to_string(&mut line)
        .expect("read");
    assert_eq!(line.trim(), public.to_string());
    assert!(
        publish::write_keypair(&prefix).is_err(),
        "never overwrites a key"
    );
}

#[test]
fn publish_without_a_built_disk_says_to_build_first() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let def = tmp.path().join("demo.toml");
    fs::write(&def, "[image]\nname = \"demo\"\nversion = \"1.0\"\n").expect("definition");
    let prefix = tmp.path().join("release");
    publish::write_keypair(&prefix).expect("keygen");
    let args = PublishArgs {
        file: def,
        key: prefix.with_extension("key"),
        to: tmp.path().join("out"),
        disk: Some(tmp.path().join("missing.raw")),
        rollout: None,
    };
    let err = publish::publish(&args).expect_err("no disk");
    assert!(format!("{err:#}").contains("run `plinth build"), "{err:#}");
}

#[test]
fn large_artifacts_are_cut_into_independent_frames() {
    let tmp = tempfile::tempdir().expect("tempdir");
    fs::create_dir_all(tmp.path().join("artifacts")).expect("mkdir");
    let content: Vec<u8> = (0..1_048_576u32).map(|i| (i * 7 % 251) as u8).collect();
    let artifact =
        publish::store_artifact_framed(&content[..], tmp.path(), 262_144).expect("store");
    let compressed = fs::read(tmp.path().join(&artifact.path)).expect("artifact");
    assert_eq!(artifact.frames.len(), 4, "{:?}", artifact.frames);
    for frame in &artifact.frames {
        let tail =
            zstd::decode_all(&compressed[frame.offset as usize..]).expect("frame decodes alone");
        assert_eq!(tail, content[frame.uncompressed_offset as usize..]);
    }
    assert_eq!(zstd::decode_all(&compressed[..]).expect("whole"), content);
    let small =
        publish::store_artifact_framed(&content[..1000], tmp.path(), 262_144).expect("store");
    assert!(small.frames.is_empty(), "one frame needs no frame table");
}
