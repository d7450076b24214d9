//! Writes the seed corpora of the fuzz targets: `cargo run -p fuzz-targets --example seeds --
//! fuzz/corpus`. Seeds are real inputs made with the project's own writers (manifests, boot
//! entries, DHCP packets, GPT disks, verity superblocks), the example definitions and cloud user
//! data as instances receive it; each file
//! is named `seed-<what>` so that minimised fuzzer finds (`id:…`) can sit beside them.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use fuzz_targets::disk::{FLAG_4K, FLAG_MIRROR, FLAG_SEAL};
use init::stage2::net::dhcp::{option, MessageType, Packet};
use os_config::boot::{BootRecord, Counter, Entry, EntryName};
use os_config::gpt::testing::{add_backup, build_disk, reseal, ROOT_TYPE, VERITY_TYPE};
use os_config::layout::{self, Slot, VeritySuperblock};
use os_config::manifest::{rfc3339, Artifact, Artifacts, Manifest, Rollout, SecretKey};
use os_config::units::{Name, Sha256, Version};
use sha2::Digest;

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut seeds = Seeds { out };

    for file in ["images/qemu.toml", "qemu-tests/images/e2e.toml"] {
        let name = Path::new(file)
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        seeds.write("definition", &name, &fs::read(root.join(file))?)?;
    }
    seeds.write(
        "definition",
        "minimal.toml",
        b"[image]\nname = \"demo\"\nversion = \"1.0\"\n",
    )?;

    manifests(&mut seeds)?;
    gpt_disks(&mut seeds)?;
    verity(&mut seeds)?;
    chunk_index(&mut seeds)?;
    boot_entries(&mut seeds)?;
    for (name, line) in [
        (
            "plinth",
            "plinth.slot=a plinth.version=1.0.0 plinth.roothash=00ff console=ttyS0 quiet",
        ),
        (
            "quoted",
            "BOOT_IMAGE=/vmlinuz \"msg=a b\" dyndbg=\"file x.c +p\" init=/sbin/init -- x",
        ),
        (
            "verity-off",
            "plinth.slot=b plinth.verity=off root= ro  \t panic=10\n",
        ),
    ] {
        seeds.write("cmdline", name, line.as_bytes())?;
    }
    dhcp(&mut seeds)?;
    http(&mut seeds)?;
    engine(&mut seeds)?;
    tar(&mut seeds)?;
    userdata(&mut seeds)?;
    Ok(())
}

struct Seeds {
    out: PathBuf,
}

impl Seeds {
    fn write(&mut self, target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        let dir = self.out.join(target);
        fs::create_dir_all(&dir)?;
        fs::File::create(dir.join(format!("seed-{name}")))?.write_all(bytes)
    }
}

fn sha(bytes: &[u8]) -> Sha256 {
    Sha256::parse(&hex::encode(sha2::Sha256::digest(bytes))).expect("a digest is hex")
}

fn artifact(content: &[u8], uncompressed_size: u64) -> Artifact {
    let sha256 = sha(content);
    Artifact {
        path: Artifact::path_for(&sha256),
        size: content.len() as u64 * 1000,
        sha256,
        uncompressed_size,
        uncompressed_sha256: sha(b"uncompressed"),
        frames: Vec::new(),
    }
}

fn manifests(seeds: &mut Seeds) -> std::io::Result<()> {
    let mut manifest = Manifest {
        format: os_config::manifest::FORMAT,
        name: Name::parse("demo").expect("name"),
        version: Version::parse("1.2.0").expect("version"),
        channel: Name::parse("stable").expect("name"),
        created: rfc3339(1_704_067_200),
        expires: rfc3339(1_704_067_200 + 30 * 86_400),
        root_hash: sha(b"root"),
        salt: "00ff".to_owned(),
        data_blocks: 2,
        cmdline: vec!["console=ttyS0".to_owned()],
        rollout: None,
        root_chunks: None,
        artifacts: Artifacts {
            root: artifact(b"root", 8192),
            verity: artifact(b"verity", 8192),
            kernel: artifact(b"kernel", 100),
            initrd: artifact(b"initrd", 100),
        },
    };
    manifest.artifacts.root.frames = vec![
        os_config::manifest::Frame {
            offset: 0,
            uncompressed_offset: 0,
        },
        os_config::manifest::Frame {
            offset: 10,
            uncompressed_offset: 4096,
        },
    ];
    // Signed by the target's own key (no NUL: the target signs it).
    let bytes = manifest.to_bytes();
    seeds.write("manifest", "plain.json", &bytes)?;
    // With a detached signature after a NUL, by the target's key and by another one.
    for (name, seed) in [("signed", [7u8; 32]), ("other-key", [9u8; 32])] {
        let mut signed = bytes.clone();
        signed.push(0);
        signed.extend_from_slice(SecretKey::from_seed(seed).sign(&bytes).as_bytes());
        seeds.write("manifest", name, &signed)?;
    }
    manifest.rollout = Some(Rollout {
        start: 1_704_067_200,
        spread_seconds: 86_400,
    });
    seeds.write("manifest", "rollout.json", &manifest.to_bytes())?;
    Ok(())
}

/// The `gpt` target's encoding of `disk` (512-byte sectors unless `FLAG_4K`): flags, the size
/// in sectors beyond 3, then the body.
fn encode_disk(flags: u8, sector: usize, disk: &[u8], body: &[u8]) -> Vec<u8> {
    let sectors = u16::try_from(disk.len() / sector - 3).expect("small disk");
    let mut out = vec![flags];
    out.extend_from_slice(&sectors.to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn plinth_partitions() -> Vec<(&'static str, &'static str, &'static str, u64, u64)> {
    vec![
        (
            layout::ESP,
            layout::TYPE_ESP,
            "0c0c0c0c-0000-4000-8000-000000000001",
            40,
            47,
        ),
        (
            layout::ROOT_A,
            ROOT_TYPE,
            "0a0a0a0a-0000-4000-8000-000000000002",
            48,
            55,
        ),
        (
            layout::VERITY_A,
            VERITY_TYPE,
            "0b0b0b0b-0000-4000-8000-000000000003",
            56,
            57,
        ),
        (
            layout::ROOT_B,
            ROOT_TYPE,
            "0a0a0a0a-0000-4000-8000-000000000004",
            58,
            65,
        ),
        (
            layout::VERITY_B,
            VERITY_TYPE,
            "0b0b0b0b-0000-4000-8000-000000000005",
            66,
            67,
        ),
        (
            layout::STATE,
            layout::TYPE_VAR,
            "0d0d0d0d-0000-4000-8000-000000000006",
            68,
            90,
        ),
    ]
}

fn gpt_disks(seeds: &mut Seeds) -> std::io::Result<()> {
    // 512-byte sectors, both tables valid: the body is LBA 1..=33, the backup derived.
    let mut disk = build_disk(512, 128, &plinth_partitions());
    add_backup(&mut disk, 512);
    let primary = &disk[512..34 * 512];
    seeds.write(
        "gpt",
        "mirrored",
        &encode_disk(FLAG_MIRROR, 512, &disk, primary),
    )?;

    // Primary header damaged, the backup intact: the body is the primary's sectors, then the
    // backup's entries and header (the last 33 sectors).
    let mut damaged = primary.to_vec();
    damaged[40] ^= 0xff;
    damaged.extend_from_slice(&disk[disk.len() - 33 * 512..]);
    seeds.write("gpt", "backup-only", &encode_disk(0, 512, &disk, &damaged))?;

    // A short entry array (8 entries), CRCs recomputed by the target.
    let mut short = disk[512..4 * 512].to_vec();
    short[80..84].copy_from_slice(&8u32.to_le_bytes());
    reseal(&mut short, 0);
    seeds.write(
        "gpt",
        "eight-entries",
        &encode_disk(FLAG_MIRROR | FLAG_SEAL, 512, &disk, &short),
    )?;

    // 4096-byte sectors: one sector each, one after the other from LBA 6 (after the header and
    // the 16 KiB entry array).
    let parts: Vec<_> = plinth_partitions()
        .into_iter()
        .zip(6u64..)
        .map(|((l, t, u, _, _), lba)| (l, t, u, lba, lba))
        .collect();
    let disk4k = build_disk(4096, 16, &parts);
    seeds.write(
        "gpt",
        "4k",
        &encode_disk(
            FLAG_4K | FLAG_MIRROR,
            4096,
            &disk4k,
            &disk4k[4096..6 * 4096],
        ),
    )?;
    Ok(())
}

fn verity(seeds: &mut Seeds) -> std::io::Result<()> {
    // A real tree of one data block: its superblock, then the data (the target's layout).
    let data = vec![0x5a; 4096];
    let params = builder::disk::verity::VerityParams {
        salt: [0x11; 32],
        uuid: [0x22; 16],
    };
    let tree = builder::disk::verity::hash_tree(&mut data.as_slice(), 4096, &params)
        .expect("hash tree of one block");
    let mut one = tree.device.clone();
    one.extend_from_slice(&data);
    seeds.write("verity", "one-block", &one)?;
    let sb = VeritySuperblock {
        data_blocks: 300,
        salt: vec![0xab, 0xcd],
        uuid: [0x11; 16],
    };
    seeds.write(
        "verity",
        "superblock",
        &sb.to_bytes()[..VeritySuperblock::SIZE],
    )?;
    Ok(())
}

fn chunk_index(seeds: &mut Seeds) -> std::io::Result<()> {
    use os_config::chunk::{ChunkIndex, MIN_CHUNK};
    let mut index = ChunkIndex::default();
    index.push(MIN_CHUNK as u32, [0x11; 32], 100);
    index.push(70_000, [0x22; 32], 70_100);
    index.push(5, [0x33; 32], 14);
    seeds.write("chunk-index", "three", &index.to_bytes())?;
    seeds.write("chunk-index", "empty", &ChunkIndex::default().to_bytes())?;
    Ok(())
}

fn boot_entries(seeds: &mut Seeds) -> std::io::Result<()> {
    let hash = "ab".repeat(32);
    for (name, entry_name, verity) in [
        ("good", EntryName::good(Slot::A, "1.0.0"), true),
        ("trying", EntryName::trying(Slot::B, "1.1.0"), true),
        (
            "tried",
            EntryName {
                slot: Slot::B,
                version: "2.0".to_owned(),
                counter: Some(Counter {
                    left: 0,
                    done: Some(3),
                }),
            },
            false,
        ),
    ] {
        let entry = Entry {
            slot: entry_name.slot,
            version: entry_name.version.clone(),
            root_hash: hash.clone(),
            extra_args: vec!["console=ttyS0".to_owned(), "quiet".to_owned()],
            verity,
        };
        let text = format!("{}\n{}", entry_name.file_name(), entry.format());
        seeds.write("boot-entry", name, text.as_bytes())?;
    }
    let record = BootRecord {
        disk: "/dev/vda".into(),
        slot: Slot::A,
        root_hash: Some(hash),
    };
    let json = record.to_json().expect("UTF-8 path");
    seeds.write("boot-entry", "record.json", json.as_bytes())?;
    Ok(())
}

fn dhcp(seeds: &mut Seeds) -> std::io::Result<()> {
    for (name, kind) in [("offer", MessageType::Offer), ("ack", MessageType::Ack)] {
        let packet = Packet {
            op: 2,
            xid: 0x1234_5678,
            secs: 0,
            broadcast: true,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::new(10, 0, 2, 15),
            siaddr: Ipv4Addr::new(10, 0, 2, 2),
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            options: vec![
                (option::MESSAGE_TYPE, vec![kind as u8]),
                (option::SERVER_ID, vec![10, 0, 2, 2]),
                (option::LEASE_TIME, 86_400u32.to_be_bytes().to_vec()),
                (option::RENEWAL_TIME, 43_200u32.to_be_bytes().to_vec()),
                (option::REBINDING_TIME, 75_600u32.to_be_bytes().to_vec()),
                (option::SUBNET_MASK, vec![255, 255, 255, 0]),
                (option::ROUTER, vec![10, 0, 2, 2]),
                (option::DNS, vec![10, 0, 2, 3, 1, 1, 1, 1]),
                (option::DOMAIN_NAME, b"example.test".to_vec()),
            ],
        };
        seeds.write("dhcp", name, &packet.encode())?;
    }
    Ok(())
}

fn http(seeds: &mut Seeds) -> std::io::Result<()> {
    // The first byte is the target's control byte: bit 0 = answer to HEAD, the rest the
    // read-buffer size.
    for (name, control, response) in [
        (
            "length",
            0xfe,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        ),
        (
            "chunked",
            0x10,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\nTrailer: x\r\n\r\n",
        ),
        ("close", 0x00, "HTTP/1.0 404 Not Found\nServer: test\n\nno such file\n"),
        ("head", 0x01, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
        ("no-content", 0x40, "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
        (
            "partial",
            0x20,
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 10-13/100\r\nContent-Length: 4\r\n\r\nwxyz",
        ),
    ] {
        let mut bytes = vec![control];
        bytes.extend_from_slice(response.as_bytes());
        seeds.write("http", name, &bytes)?;
    }
    Ok(())
}

fn engine(seeds: &mut Seeds) -> std::io::Result<()> {
    let id = "4b".repeat(32);
    let samples = [
        (
            "version.json",
            r#"{"Version":"20.10.24+dfsg1","ApiVersion":"1.41","Os":"linux","Arch":"amd64","KernelVersion":"6.1.0"}"#.to_owned(),
        ),
        (
            "list.json",
            format!(
                r#"[{{"Id":"{id}","Names":["/web"],"Image":"busybox:latest","ImageID":"sha256:{id}","Labels":{{"plinth.spec":"abc"}},"State":"running"}},{{"Id":"x","Names":null,"Labels":null}}]"#
            ),
        ),
        (
            "inspect.json",
            format!(
                r#"{{"Id":"{id}","Name":"/web","Image":"sha256:{id}","State":{{"Status":"running","Running":true,"Restarting":false,"ExitCode":0,"StartedAt":"2024-01-01T00:00:00Z","Error":"","Health":{{"Status":"healthy","FailingStreak":0}}}},"RestartCount":2,"Config":{{"Labels":{{"plinth.spec":"abc"}}}}}}"#
            ),
        ),
        (
            "image.json",
            format!(r#"{{"Id":"sha256:{id}","RepoTags":["busybox:latest"]}}"#),
        ),
        (
            "stream.json",
            r#"{"status":"Loading layer","progressDetail":{"current":1,"total":2}}
{"stream":"Loaded image: busybox:latest\n"}
{"errorDetail":{"message":"boom"},"error":"boom"}"#
                .to_owned(),
        ),
        ("error.json", r#"{"message":"No such container: web"}"#.to_owned()),
        (
            "response",
            "HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n0\r\n\r\n".to_owned(),
        ),
    ];
    for (name, text) in samples {
        seeds.write("engine", name, text.as_bytes())?;
    }
    Ok(())
}

fn tar_file(build: impl FnOnce(&mut tar::Builder<Vec<u8>>) -> std::io::Result<()>) -> Vec<u8> {
    let mut archive = tar::Builder::new(Vec::new());
    build(&mut archive).expect("writing to memory");
    archive.into_inner().expect("finishing the archive")
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_mtime(1_704_067_200);
    header
}

fn tar(seeds: &mut Seeds) -> std::io::Result<()> {
    let id = "4b".repeat(32);
    let manifest = format!(
        r#"[{{"Config":"{id}.json","RepoTags":["busybox:latest"],"Layers":["layer.tar"]}}]"#
    );
    let docker = tar_file(|a| {
        let config = b"{}";
        a.append_data(
            &mut header(tar::EntryType::Regular, 2, 0o644),
            format!("{id}.json"),
            &config[..],
        )?;
        a.append_data(
            &mut header(tar::EntryType::Regular, manifest.len() as u64, 0o644),
            "manifest.json",
            manifest.as_bytes(),
        )
    });
    seeds.write("tar", "docker-save", &docker)?;

    let deb = tar_file(|a| {
        a.append_data(
            &mut header(tar::EntryType::Directory, 0, 0o755),
            "./usr/bin/",
            &[][..],
        )?;
        a.append_data(
            &mut header(tar::EntryType::Regular, 5, 0o755),
            "./usr/bin/tool",
            &b"#!/x\n"[..],
        )?;
        let mut link = header(tar::EntryType::Symlink, 0, 0o777);
        a.append_link(&mut link, "./bin/tool2", "../usr/bin/tool")?;
        let mut hard = header(tar::EntryType::Link, 0, 0o644);
        a.append_link(&mut hard, "./usr/bin/tool3", "./usr/bin/tool")?;
        let long = format!("./usr/share/{}/file", "d".repeat(120));
        a.append_data(
            &mut header(tar::EntryType::Regular, 1, 0o644),
            long,
            &b"x"[..],
        )?;
        a.append_data(
            &mut header(tar::EntryType::Regular, 1, 0o644),
            "./usr/share/doc/x",
            &b"y"[..],
        )
    });
    seeds.write("tar", "deb-data", &deb)?;
    Ok(())
}

/// PEM text of the shape `[engine] tls` in user data asks for (the target checks the blocks'
/// labels, not the keys inside).
const PEM_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBkTCB+wIJAKHBfpegPjMCMA0GCSqGSIb3DQEBCwUAMBExDzANBgNVBAMMBnBs\n-----END CERTIFICATE-----\n";
const PEM_KEY: &str = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkNsZ1y1QnBxRz6bl6Bf3uEhR9yOKxXhFvJ4kH5Q0eQoAoGCCqGSM49\n-----END EC PRIVATE KEY-----\n";

/// Cloud user data: Plinth's own (laid over the target's image), other tools' formats, and
/// what must be refused.
fn userdata(seeds: &mut Seeds) -> std::io::Result<()> {
    let plinth = "#plinth\nhostname = \"node-7\"\n\n[engine]\nsettings = { debug = true, max-concurrent-downloads = 6 }\n\n[update]\nchannel = \"beta\"\nstrategy = \"immediate\"\ninterval = \"30m\"\n\n[time]\nservers = [\"10.0.0.1\", \"time.example:123\"]\n\n[[container]]\nname = \"db\"\nimage = \"postgres:17\"\n\n[[container]]\nname = \"cache\"\nimage = \"redis:7\"\nports = [\"6379:6379\"]\nrestart = \"always\"\n";
    let tls = format!(
        "[engine]\nsettings = {{ hosts = [\"unix:///run/docker.sock\", \"tcp://0.0.0.0:2376\"] }}\n\n[engine.tls]\nca = {PEM_CERT:?}\ncert = {PEM_CERT:?}\nkey = {PEM_KEY:?}\n"
    );
    let mime = "Content-Type: multipart/mixed; boundary=\"==BOUNDARY==\"\nMIME-Version: 1.0\n\n--==BOUNDARY==\nContent-Type: text/cloud-config; charset=\"us-ascii\"\n\n#cloud-config\nhostname: node-7\n--==BOUNDARY==--\n";
    let cases: [(&str, &[u8]); 8] = [
        ("plinth.toml", plinth.as_bytes()),
        ("engine-tls.toml", tls.as_bytes()),
        (
            "cloud-config.yaml",
            b"#cloud-config\nhostname: node-7\nusers:\n  - name: admin\n",
        ),
        ("mime-multipart", mime.as_bytes()),
        (
            "update-url.toml",
            b"[update]\nchannel = \"beta\"\nurl = \"http://evil.example/releases\"\n",
        ),
        (
            "bad-toml.toml",
            b"hostname = \"node-7\n[engine\nsettings = {\n",
        ),
        ("bad-utf8.toml", b"hostname = \"node\xff\xfe-7\"\n"),
        (
            "plain-tcp.toml",
            b"[engine]\nsettings = { hosts = [\"tcp://0.0.0.0:2375\"] }\n",
        ),
    ];
    for (name, bytes) in cases {
        seeds.write("userdata", name, bytes)?;
    }
    Ok(())
}
