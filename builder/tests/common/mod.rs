//! Helpers shared by the integration tests: synthetic disk images shaped like `plinth build`'s.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use builder::disk::slice::Slice;

pub const MIB: u64 = 1 << 20;

/// Runs `veritysetup format` over `data` and returns (hash device bytes, root hash hex).
pub fn verity_format(data: &[u8]) -> (Vec<u8>, String) {
    let f = os_config::oracle::veritysetup_format(data, Some("0123456789abcdef"), None);
    (f.hash_device, f.root_hash)
}

/// A disk image shaped like `plinth build`'s output; returns the root hash of slot A.
pub fn make_disk(path: &Path, seed: u8, blocks: usize) -> (Vec<u8>, String) {
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
