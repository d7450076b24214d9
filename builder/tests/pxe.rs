//! `plinth build --format pxe` on synthetic disk images: the PXE folder's files against the disk
//! they come from, with `veritysetup`, `cpio`, zstd and goblin's PE parser as oracles. Needs
//! `objcopy` (binutils): without it these tests fail, they do not skip.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

use builder::pxe::{self, PxeImage, PxeInputs, PxeSummary};
use os_config::manifest::VeritySuperblock;
use os_config::units::{Name, Version};
use sha2::{Digest, Sha256};

mod common;
use common::make_disk;

const EPOCH: u64 = 1_700_000_000;
const BLOCKS: usize = 300;

/// A minimal PE32+ EFI application (one `.text` section), standing in for systemd-stub.
fn fake_stub(path: &Path) {
    let mut pe = vec![0u8; 0x600];
    pe[0..2].copy_from_slice(b"MZ");
    pe[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
    let mut at = 0x80;
    let mut put = |bytes: &[u8]| {
        pe[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(b"PE\0\0");
    // COFF header: x86-64, one section, no symbols, 240-byte optional header, executable.
    put(&0x8664u16.to_le_bytes());
    put(&1u16.to_le_bytes());
    put(&[0; 12]);
    put(&240u16.to_le_bytes());
    put(&0x0206u16.to_le_bytes());
    // Optional header (PE32+).
    put(&0x20bu16.to_le_bytes());
    put(&[2, 40]);
    put(&0x200u32.to_le_bytes()); // SizeOfCode
    put(&0u32.to_le_bytes()); // SizeOfInitializedData
    put(&0u32.to_le_bytes()); // SizeOfUninitializedData
    put(&0x1000u32.to_le_bytes()); // AddressOfEntryPoint
    put(&0x1000u32.to_le_bytes()); // BaseOfCode
    put(&0x1_4000_0000u64.to_le_bytes()); // ImageBase
    put(&0x1000u32.to_le_bytes()); // SectionAlignment
    put(&0x200u32.to_le_bytes()); // FileAlignment
    put(&[0; 16]); // OS, image, subsystem versions; Win32VersionValue
    put(&0x2000u32.to_le_bytes()); // SizeOfImage
    put(&0x400u32.to_le_bytes()); // SizeOfHeaders
    put(&0u32.to_le_bytes()); // CheckSum
    put(&10u16.to_le_bytes()); // Subsystem: EFI application
    put(&0u16.to_le_bytes()); // DllCharacteristics
    put(&[0; 32]); // stack and heap sizes
    put(&0u32.to_le_bytes()); // LoaderFlags
    put(&16u32.to_le_bytes()); // NumberOfRvaAndSizes
    put(&[0; 128]); // data directories
                    // Section table: .text at RVA 0x1000, file offset 0x400.
    put(b".text\0\0\0");
    put(&0x10u32.to_le_bytes());
    put(&0x1000u32.to_le_bytes());
    put(&0x200u32.to_le_bytes());
    put(&0x400u32.to_le_bytes());
    put(&[0; 12]);
    put(&0x6000_0020u32.to_le_bytes());
    pe[0x400..0x410].copy_from_slice(&[0xc3; 16]);
    fs::write(path, pe).expect("write fake stub");
}

struct Setup {
    dir: tempfile::TempDir,
    raw: PathBuf,
    stub: PathBuf,
    root_data: Vec<u8>,
    root_hash: String,
    name: Name,
    version: Version,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("demo-1.raw");
    let (root_data, root_hash) = make_disk(&raw, 1, BLOCKS);
    let stub = dir.path().join("linuxx64.efi.stub");
    fake_stub(&stub);
    Setup {
        raw,
        stub,
        root_data,
        root_hash,
        name: Name::parse("demo").expect("name"),
        version: Version::parse("1").expect("version"),
        dir,
    }
}

impl Setup {
    fn inputs(&self) -> PxeInputs<'_> {
        PxeInputs {
            raw: &self.raw,
            stub: &self.stub,
            name: &self.name,
            version: &self.version,
            source_date_epoch: EPOCH,
        }
    }
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("list folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The used part of partition `label` of the disk: `len` bytes from its start.
fn partition_bytes(disk: &Path, label: &str, len: usize) -> Vec<u8> {
    let mut file = fs::File::open(disk).expect("open disk");
    let parts = builder::publish::read_partitions(&mut file, disk).expect("gpt");
    let part = parts.iter().find(|p| p.label == label).expect(label);
    let mut bytes = vec![0u8; len];
    file.seek(SeekFrom::Start(part.start)).expect("seek");
    file.read_exact(&mut bytes).expect("read partition");
    bytes
}

fn run(program: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
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

#[test]
fn pxe_folder_matches_the_disk_and_is_reproducible() {
    let s = setup();
    let folder = pxe::folder_for(&s.raw);
    let report = pxe::write_pxe(&s.inputs(), &folder).expect("PXE folder written");
    assert_eq!(report.folder, s.dir.path().join("demo-1.pxe"));
    assert_eq!(
        names(&folder),
        [
            "boot.ipxe",
            "demo-1.raw.zst",
            "demo-1.raw.zst.sha256",
            "initrd.img",
            "live.efi",
            "pxe.json",
            "root.cpio",
            "root.live",
            "vmlinuz",
        ]
    );
    assert_eq!(
        names(s.dir.path()),
        ["demo-1.pxe", "demo-1.raw", "linuxx64.efi.stub"],
        "no temporary folder is left behind"
    );
    let read = |name: &str| fs::read(folder.join(name)).expect(name);

    // Kernel and initrd: slot A's, byte for byte.
    assert_eq!(read("vmlinuz"), vec![1u8; 300_000]);
    assert_eq!(read("initrd.img"), b"initrd 1");

    // root.live: the root image, then verity-a's superblock and tree at block data_blocks.
    let live = read("root.live");
    let data_bytes = BLOCKS * 4096;
    assert_eq!(&live[..data_bytes], &s.root_data[..]);
    let sb = VeritySuperblock::parse(&live[data_bytes..data_bytes + VeritySuperblock::SIZE])
        .expect("the verity superblock follows the root image");
    assert_eq!(sb.data_blocks, BLOCKS as u64);
    let hash_len = live.len() - data_bytes;
    assert_eq!(
        hash_len as u64,
        os_config::manifest::verity_size(BLOCKS as u64),
        "superblock block and tree, nothing more"
    );
    assert_eq!(
        &live[data_bytes..],
        &partition_bytes(&s.raw, "verity-a", hash_len)[..]
    );
    // The reference implementation accepts it as one file with the hash device at that offset.
    run(
        "veritysetup",
        &[
            "verify",
            "root.live",
            "root.live",
            &s.root_hash,
            &format!("--hash-offset={data_bytes}"),
        ],
        &folder,
    );

    // root.cpio: plinth/root.live, as cpio extracts it.
    let extracted = s.dir.path().join("extracted");
    fs::create_dir(&extracted).expect("mkdir");
    let cpio = fs::File::open(folder.join("root.cpio")).expect("root.cpio");
    let status = Command::new("cpio")
        .args(["-i", "-d", "--quiet"])
        .current_dir(&extracted)
        .stdin(cpio)
        .status()
        .expect("cpio runs (install cpio)");
    assert!(status.success());
    assert_eq!(
        fs::read(extracted.join(os_config::live::ROOT_IN_INITRD)).expect("extracted"),
        live
    );

    // The compressed image: the raw disk, its size in the frame header, sha256 beside it.
    let zst = read("demo-1.raw.zst");
    let raw = fs::read(&s.raw).expect("raw");
    assert_eq!(
        zstd::zstd_safe::get_frame_content_size(&zst).ok(),
        Some(Some(raw.len() as u64))
    );
    assert!(zstd::decode_all(&zst[..]).expect("decompresses") == raw);
    let zst_sha = sha256(&zst);
    assert_eq!(
        String::from_utf8(read("demo-1.raw.zst.sha256")).expect("utf-8"),
        format!("{zst_sha}  demo-1.raw.zst\n")
    );

    // pxe.json, spelled out.
    let cmdline = format!(
        "plinth.live plinth.version=1 plinth.roothash={} console=ttyS0 quiet",
        s.root_hash
    );
    let expected = PxeSummary {
        name: "demo".to_owned(),
        version: "1".to_owned(),
        root_hash: s.root_hash.clone(),
        cmdline: cmdline.clone(),
        kernel: "vmlinuz".to_owned(),
        initrd: vec!["initrd.img".to_owned(), "root.cpio".to_owned()],
        uki: "live.efi".to_owned(),
        root_live: "root.live".to_owned(),
        image: PxeImage {
            file: "demo-1.raw.zst".to_owned(),
            sha256: zst_sha.clone(),
            size: raw.len() as u64,
            compressed_size: zst.len() as u64,
        },
    };
    let json: PxeSummary = serde_json::from_slice(&read("pxe.json")).expect("pxe.json parses");
    assert_eq!(json, expected);
    assert_eq!(report.summary, expected);
    let json_text = String::from_utf8(read("pxe.json")).expect("utf-8");
    assert!(
        json_text.find("\"name\"") < json_text.find("\"image\""),
        "{json_text}"
    );

    // boot.ipxe.
    let ipxe = String::from_utf8(read("boot.ipxe")).expect("utf-8");
    assert_eq!(
        ipxe,
        format!(
            "#!ipxe\n\
# demo 1: live boot (root hash {hash})\n\
# Append install arguments by setting plinth-args first (see README), e.g.\n\
#   set plinth-args plinth.install=first-empty plinth.install.image=http://server/demo-1.raw.zst plinth.install.sha256={zst_sha}\n\
isset ${{plinth-args}} || set plinth-args\n\
kernel vmlinuz initrd=initrd.img initrd=root.cpio {cmdline} ${{plinth-args}}\n\
initrd initrd.img\n\
initrd root.cpio\n\
boot\n",
            hash = s.root_hash
        )
    );
    assert!(!ipxe.contains("plinth.slot"), "{ipxe}");

    // live.efi: the stub plus four sections at aligned, disjoint addresses after the stub's.
    check_uki(&read("live.efi"), &cmdline, &read("vmlinuz"), &{
        let mut initrd = read("initrd.img");
        initrd.extend(read("root.cpio"));
        initrd
    });

    // The UKI's header carries the build time, and a checksum objcopy agrees with: objcopy
    // stamps a copy with its own time and checksum, which stamping that time again keeps.
    let uki = read("live.efi");
    let pe_offset = u32::from_le_bytes(uki[0x3c..0x40].try_into().expect("4 bytes")) as usize;
    let field =
        |bytes: &[u8], at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
    assert_eq!(field(&uki, pe_offset + 8), EPOCH as u32);
    let copy = s.dir.path().join("objcopy.efi");
    run(
        "objcopy",
        &[
            folder.join("live.efi").to_str().expect("utf-8"),
            copy.to_str().expect("utf-8"),
        ],
        s.dir.path(),
    );
    let copied = fs::read(&copy).expect("copy");
    let (objcopy_time, objcopy_sum) = (
        field(&copied, pe_offset + 8),
        field(&copied, pe_offset + 88),
    );
    assert_ne!(objcopy_sum, 0, "objcopy computed a checksum");
    pxe::stamp_pe(&copy, u64::from(objcopy_time)).expect("stamp");
    assert_eq!(
        field(&fs::read(&copy).expect("copy"), pe_offset + 88),
        objcopy_sum
    );
    fs::remove_file(&copy).expect("remove");

    // The same disk gives the same bytes, in another folder and when replacing this one.
    let other = s.dir.path().join("again/demo-1.pxe");
    fs::create_dir_all(other.parent().expect("parent")).expect("mkdir");
    pxe::write_pxe(&s.inputs(), &other).expect("written again");
    pxe::write_pxe(&s.inputs(), &folder).expect("replaced");
    for name in names(&folder) {
        assert!(
            fs::read(folder.join(&name)).expect("first")
                == fs::read(other.join(&name)).expect("second"),
            "{name} differs between two writes from the same disk"
        );
    }
    assert_eq!(names(&folder), names(&other));
    assert_eq!(
        names(s.dir.path()),
        [
            "again",
            "demo-1.pxe",
            "demo-1.raw",
            "extracted",
            "linuxx64.efi.stub"
        ]
    );
}

/// Parses the UKI as PE and checks the four added sections against their inputs.
fn check_uki(uki: &[u8], cmdline: &str, kernel: &[u8], initrd: &[u8]) {
    let pe = goblin::pe::PE::parse(uki).expect("live.efi parses as PE");
    let section = |name: &str| {
        pe.sections
            .iter()
            .find(|s| s.name().ok() == Some(name))
            .unwrap_or_else(|| panic!("live.efi has no {name} section"))
    };
    let expected: [(&str, &[u8]); 4] = [
        (".osrel", b""),
        (".cmdline", cmdline.as_bytes()),
        (".linux", kernel),
        (".initrd", initrd),
    ];
    let text = section(".text");
    let mut previous_end = u64::from(text.virtual_address) + u64::from(text.virtual_size);
    for (name, content) in expected {
        let s = section(name);
        let start = s.pointer_to_raw_data as usize;
        let raw = &uki[start..start + s.size_of_raw_data as usize];
        if name == ".osrel" {
            let osrel = String::from_utf8_lossy(&raw[..s.virtual_size as usize]).into_owned();
            assert!(osrel.contains("ID=plinth\n"), "{osrel}");
            assert!(osrel.contains("IMAGE_VERSION=1\n"), "{osrel}");
        } else {
            assert_eq!(s.virtual_size as usize, content.len(), "{name} size");
            assert!(&raw[..content.len()] == content, "{name} holds its input");
        }
        let vma = u64::from(s.virtual_address);
        assert_eq!(vma % 4096, 0, "{name} is page-aligned");
        assert!(vma >= previous_end, "{name} overlaps the section before it");
        previous_end = vma + u64::from(s.virtual_size);
    }
    let size_of_image = pe
        .header
        .optional_header
        .expect("optional header")
        .windows_fields
        .size_of_image;
    assert!(u64::from(size_of_image) >= previous_end);
}

#[test]
fn a_failed_write_keeps_the_older_folder_and_leaves_no_partial_one() {
    let s = setup();
    let folder = pxe::folder_for(&s.raw);
    pxe::write_pxe(&s.inputs(), &folder).expect("first write");
    let before: Vec<(String, Vec<u8>)> = names(&folder)
        .into_iter()
        .map(|n| (n.clone(), fs::read(folder.join(&n)).expect("read")))
        .collect();

    // A missing stub fails before anything is written.
    let missing = s.dir.path().join("no-such.stub");
    let mut inputs = s.inputs();
    inputs.stub = &missing;
    let err = pxe::write_pxe(&inputs, &folder).expect_err("missing stub");
    assert!(format!("{err:#}").contains("no-such.stub"), "{err:#}");

    // A stub that is not PE, and a disk with another version, fail as well.
    let not_pe = s.dir.path().join("not-pe.stub");
    fs::write(&not_pe, b"MZ but nothing else").expect("write");
    inputs.stub = &not_pe;
    let err = pxe::write_pxe(&inputs, &folder).expect_err("not PE");
    assert!(format!("{err:#}").contains("not-pe.stub"), "{err:#}");
    let v2 = Version::parse("2").expect("version");
    let mut inputs = s.inputs();
    inputs.version = &v2;
    let err = pxe::write_pxe(&inputs, &folder).expect_err("another version");
    assert!(format!("{err:#}").contains("version 1"), "{err:#}");

    let after: Vec<(String, Vec<u8>)> = names(&folder)
        .into_iter()
        .map(|n| (n.clone(), fs::read(folder.join(&n)).expect("read")))
        .collect();
    assert!(before == after, "the older folder is intact");

    // A write that fails midway (a raw disk without a GPT) leaves no folder and no temporary one.
    let broken = s.dir.path().join("broken-1.raw");
    fs::write(&broken, vec![0u8; 1 << 20]).expect("write");
    let mut inputs = s.inputs();
    inputs.raw = &broken;
    let target = pxe::folder_for(&broken);
    pxe::write_pxe(&inputs, &target).expect_err("no GPT");
    assert!(!target.exists());
    assert_eq!(
        names(s.dir.path()),
        [
            "broken-1.raw",
            "demo-1.pxe",
            "demo-1.raw",
            "linuxx64.efi.stub",
            "not-pe.stub"
        ]
    );
}
