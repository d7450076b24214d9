//! Damaged and hostile disk images through `plinth inspect --verify`, `plinth verify` and
//! `plinth publish`: each is reported as damaged, saying what is wrong, and none panics, loops or
//! allocates by a length the disk claims. The disks start from a small valid one written by the
//! builder's own GPT, verity and ESP writers.

use std::io::Cursor;
use std::path::Path;

use builder::disk::esp::{write_esp, EspFile};
use builder::disk::gpt::{plan, write_gpt, Sizes};
use builder::disk::slice::Slice;
use builder::disk::verity::{hash_tree, VerityParams};
use builder::inspect::{inspect_disk, verify_slots};
use builder::publish::{publish_release, Release};
use os_config::boot::{Entry, EntryName};
use os_config::gpt::testing::{edit_entries, edit_headers};
use os_config::layout::Slot;
use os_config::manifest::SecretKey;
use os_config::units::{Name, Version};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

/// Where the partitions of the valid disk lie: (label, start, size).
struct Valid {
    disk: Vec<u8>,
    parts: Vec<(&'static str, u64, u64)>,
}

impl Valid {
    fn part(&self, label: &str) -> (u64, u64) {
        let (_, start, size) = self.parts.iter().find(|p| p.0 == label).expect(label);
        (*start, *size)
    }
}

/// A small disk as `plinth build` lays it out: slot A holds 8 data blocks and their verity tree,
/// the ESP its kernel, initrd and boot entry; slot B is empty.
fn valid_disk() -> Valid {
    let data: Vec<u8> = (0..8 * 4096u32).map(|i| (i * 7 + i / 4096) as u8).collect();
    let params = VerityParams {
        salt: [9; 32],
        uuid: [3; 16],
    };
    let tree = hash_tree(&mut data.as_slice(), data.len() as u64, &params).expect("tree");
    let sizes = Sizes {
        esp: 33 * MIB,
        root: MIB,
        verity: MIB,
        state: MIB,
    };
    let plan = plan(sizes, "hostile 1", &tree.root_hash).expect("plan");
    let mut disk = write_gpt(Cursor::new(vec![0u8; plan.total_size as usize]), &plan)
        .expect("GPT")
        .into_inner();
    let parts: Vec<(&'static str, u64, u64)> = plan
        .partitions
        .iter()
        .map(|p| (p.spec.label, p.start, p.size))
        .collect();
    let valid = Valid {
        disk: Vec::new(),
        parts,
    };
    let (root, _) = valid.part("root-a");
    let (verity, _) = valid.part("verity-a");
    disk[root as usize..root as usize + data.len()].copy_from_slice(&data);
    disk[verity as usize..verity as usize + tree.device.len()].copy_from_slice(&tree.device);
    let entry = Entry {
        slot: Slot::A,
        version: "1".to_owned(),
        root_hash: tree.root_hash_hex(),
        extra_args: vec!["console=ttyS0".to_owned()],
        verity: true,
    };
    let file = |path: String, data: &[u8]| EspFile {
        path,
        data: data.to_vec(),
    };
    let (esp_start, esp_size) = valid.part("esp");
    let mut cursor = Cursor::new(disk);
    write_esp(
        Slice::new(&mut cursor, esp_start, esp_size),
        0x0bad_d15c,
        1_700_000_000,
        &builder::disk::esp::folders(),
        &[
            file(Entry::kernel_path(Slot::A), &[0x4d; 70_000]),
            file(Entry::initrd_path(Slot::A), b"initrd"),
            file(
                EntryName::good(Slot::A, "1").esp_path(),
                entry.format().as_bytes(),
            ),
        ],
    )
    .expect("ESP");
    Valid {
        disk: cursor.into_inner(),
        ..valid
    }
}

/// What `plinth verify`, `plinth inspect --verify` and `plinth publish` make of `disk`: `Ok` or
/// the error text, for each.
fn outcomes(disk: &[u8]) -> [Result<String, String>; 2] {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, disk).expect("write disk");
    let verify = builder::inspect::verify(&path).map(|()| {
        let mut info = inspect_disk(&path).expect("inspects");
        verify_slots(&path, &mut info).expect("verifies");
        builder::inspect::format_text(&info)
    });
    let publish = publish(&path, &dir.path().join("releases")).map(|()| "published".to_owned());
    [
        verify.map_err(|e| format!("{e:#}")),
        publish.map_err(|e| format!("{e:#}")),
    ]
}

fn publish(disk: &Path, to: &Path) -> anyhow::Result<()> {
    let name = Name::parse("hostile").expect("name");
    let channel = Name::parse("stable").expect("channel");
    let version = Version::parse("1").expect("version");
    let release = Release {
        disk,
        name: &name,
        version: &version,
        channel: &channel,
        cmdline: &[],
        created: 1_700_000_000,
        expires: 1_700_000_000 + 30 * 86_400,
        rollout: None,
    };
    publish_release(&release, &SecretKey::from_seed([1; 32]), to).map(|_| ())
}

fn set_u32(at: usize, value: u32) -> impl Fn(&mut [u8]) {
    move |b: &mut [u8]| b[at..at + 4].copy_from_slice(&value.to_le_bytes())
}

fn set_u64(at: usize, value: u64) -> impl Fn(&mut [u8]) {
    move |b: &mut [u8]| b[at..at + 8].copy_from_slice(&value.to_le_bytes())
}

/// Sets the first and last LBA of partition `number` (1-based) in every entry array.
fn set_lbas(number: usize, first: u64, last: u64) -> impl Fn(&mut Vec<u8>) {
    move |disk: &mut Vec<u8>| {
        edit_entries(disk, SECTOR, |entries| {
            let e = &mut entries[(number - 1) * 128..number * 128];
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
        })
    }
}

/// Writes `data_blocks` into the verity superblock of slot A.
fn verity_blocks(valid: &Valid, data_blocks: u64) -> impl Fn(&mut Vec<u8>) {
    let (start, _) = valid.part("verity-a");
    move |disk: &mut Vec<u8>| {
        let at = start as usize + 72;
        disk[at..at + 8].copy_from_slice(&data_blocks.to_le_bytes());
    }
}

/// The offset of the 8.3 directory entry `name` (11 bytes, space padded) in the ESP.
fn dir_entry(valid: &Valid, disk: &[u8], name: &[u8; 11]) -> usize {
    let (start, size) = valid.part("esp");
    let esp = &disk[start as usize..(start + size) as usize];
    let at = (0..esp.len())
        .step_by(32)
        .find(|&o| &esp[o..o + 11] == name)
        .expect("directory entry");
    start as usize + at
}

/// Makes the kernel file on the ESP claim 4 GiB - 1 bytes and its cluster chain loop onto its
/// own first cluster.
fn looping_kernel(valid: &Valid) -> impl Fn(&mut Vec<u8>) + '_ {
    move |disk: &mut Vec<u8>| {
        let entry = dir_entry(valid, disk, b"VMLINUZ    ");
        disk[entry + 28..entry + 32].copy_from_slice(&u32::MAX.to_le_bytes());
        let cluster = u32::from(u16::from_le_bytes([disk[entry + 20], disk[entry + 21]])) << 16
            | u32::from(u16::from_le_bytes([disk[entry + 26], disk[entry + 27]]));
        let (esp, _) = valid.part("esp");
        let boot = &disk[esp as usize..esp as usize + 512];
        let fat = esp as usize
            + usize::from(u16::from_le_bytes([boot[14], boot[15]]))
                * usize::from(u16::from_le_bytes([boot[11], boot[12]]));
        let at = fat + cluster as usize * 4;
        disk[at..at + 4].copy_from_slice(&cluster.to_le_bytes());
    }
}

type Damage<'a> = Box<dyn Fn(&mut Vec<u8>) + 'a>;

/// How a command must react: succeed, with this in its report, or fail saying this.
enum Expect {
    Ok(&'static str),
    Err(&'static str),
}

#[test]
fn damaged_disks_are_reported_damaged_saying_what_is_wrong() {
    let valid = valid_disk();
    let last_lba = valid.disk.len() as u64 / SECTOR - 1;
    let (esp, esp_size) = valid.part("esp");
    let (root, _) = valid.part("root-a");
    let cases: Vec<(&str, Damage<'_>, Expect, Expect)> = vec![
        (
            "the valid disk",
            Box::new(|_| {}),
            Expect::Ok("a: version 1"),
            Expect::Ok("published"),
        ),
        (
            "entry size 0x80000000",
            Box::new(|d| edit_headers(d, SECTOR, set_u32(84, 0x8000_0000))),
            Expect::Err("partition entry size 2147483648 bytes (expected a multiple of 128 from 128 to 4096); the backup: partition entry size 2147483648"),
            Expect::Err("partition entry size 2147483648 bytes"),
        ),
        (
            "1,000,000 entries",
            Box::new(|d| edit_headers(d, SECTOR, set_u32(80, 1_000_000))),
            Expect::Err("1000000 partition entries of 128 bytes (at most 1048576 bytes of entries are accepted)"),
            Expect::Err("1000000 partition entries"),
        ),
        (
            "entry array over the header",
            Box::new(move |d| {
                edit_headers(d, SECTOR, |h| {
                    let own = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
                    set_u64(72, own)(h)
                })
            }),
            Expect::Err("overlaps the header at LBA 1; the backup: the partition entry array at LBA"),
            Expect::Err("overlaps the header at LBA 1"),
        ),
        (
            "a superblock claiming 2^40 data blocks",
            Box::new(verity_blocks(&valid, 1 << 40)),
            Expect::Err("slot a: damaged: the verity superblock of verity-a covers 1099511627776 data blocks (4503599627370496 bytes), more than root-a holds (1048576 bytes)"),
            Expect::Err("covers 1099511627776 data blocks"),
        ),
        (
            "a superblock claiming 2^52+1 data blocks",
            Box::new(verity_blocks(&valid, (1 << 52) + 1)),
            Expect::Err("slot a: damaged: reading the verity superblock of verity-a: verity superblock covers 4503599627370497 data blocks: too many"),
            Expect::Err("4503599627370497 data blocks: too many"),
        ),
        (
            "a superblock claiming one block more than root-a holds",
            Box::new(verity_blocks(&valid, 257)),
            Expect::Err("slot a: damaged: the verity superblock of verity-a covers 257 data blocks (1052672 bytes), more than root-a holds (1048576 bytes)"),
            Expect::Err("covers 257 data blocks (1052672 bytes), more than root-a holds"),
        ),
        (
            "truncated to half",
            Box::new(|d| d.truncate(d.len() / 2)),
            Expect::Err("lies beyond the disk's last LBA"),
            Expect::Err("no backup GPT header in the disk's last sector"),
        ),
        (
            "truncated to 10 MiB",
            Box::new(|d| d.truncate(10 * MIB as usize)),
            Expect::Err("lies beyond the disk's last LBA 20479 (did the disk shrink?); no backup GPT header"),
            Expect::Err("did the disk shrink?"),
        ),
        (
            "a partition past the end of the disk",
            Box::new(set_lbas(6, 2048 * 37, last_lba + 1)),
            Expect::Err("partition 6 (\"state\") ends at LBA 81920, beyond the disk's last LBA 81919"),
            Expect::Err("beyond the disk's last LBA"),
        ),
        (
            "overlapping partitions",
            Box::new(set_lbas(3, 2048 * 35 - 1, 2048 * 36 - 1)),
            Expect::Err("partition 3 (\"verity-a\", LBA 71679..=73727) overlaps partition 2 (\"root-a\", LBA 69632..=71679)"),
            Expect::Err("overlaps partition 2"),
        ),
        (
            "last LBA before first",
            Box::new(set_lbas(4, 2048 * 36, 2048 * 36 - 1)),
            Expect::Err("partition 4 (\"root-b\") ends at LBA 73727, before its first LBA 73728"),
            Expect::Err("before its first LBA"),
        ),
        (
            "the primary entry array zeroed, the backup intact",
            Box::new(|d| d[2 * SECTOR as usize..34 * SECTOR as usize].fill(0)),
            Expect::Ok("the primary GPT is damaged: partitions read from the backup GPT"),
            Expect::Ok("published"),
        ),
        (
            "a changed root block",
            Box::new(move |d| d[root as usize + 5 * 4096 + 1] ^= 0x40),
            Expect::Err("slot a: data block 5 of root-a (byte 20480 of the partition) does not match its hash"),
            // publish takes the root hash from the stored tree and does not re-hash the data;
            // the machine's agent checks every block against the tree and refuses the release.
            Expect::Ok("published"),
        ),
        (
            "an ESP file whose size and cluster chain lie",
            Box::new(looping_kernel(&valid)),
            Expect::Ok("a: version 1"),
            Expect::Err("/plinth/a/vmlinuz on the ESP goes on past the ESP's"),
        ),
        (
            "the ESP zeroed",
            Box::new(move |d| d[esp as usize..(esp + esp_size) as usize].fill(0)),
            Expect::Err("reading the ESP (FAT)"),
            Expect::Err("opening FAT"),
        ),
    ];
    let mut failures = Vec::new();
    for (name, damage, verify, publish) in cases {
        let mut disk = valid.disk.clone();
        damage(&mut disk);
        let [verified, published] = outcomes(&disk);
        for (command, expect, got) in [
            ("verify", verify, verified),
            ("publish", publish, published),
        ] {
            let fine = match (&expect, &got) {
                (Expect::Ok(text), Ok(report)) | (Expect::Err(text), Err(report)) => {
                    report.contains(text)
                }
                _ => false,
            };
            if !fine {
                let want = match expect {
                    Expect::Ok(t) => format!("success with {t:?}"),
                    Expect::Err(t) => format!("an error with {t:?}"),
                };
                failures.push(format!("{name}: {command}: expected {want}, got {got:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
