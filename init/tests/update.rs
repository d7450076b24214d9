//! The update agent end to end on file-backed disks (GPT + FAT ESP + slot partitions), with
//! releases served by a small HTTP server on 127.0.0.1: applying, resuming a broken download,
//! refusing bad releases, interrupting the update at every stage, rollback detection, blessing;
//! and `plinth-update install` writing a disk image to an empty file-backed disk found in a
//! fake sysfs.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use init::update::agent::{bless_disk, status_line, Agent, Outcome, Paths};
use init::update::apply::Event;
use init::update::blockdev::Disk;
use init::update::esp::{Blessed, Esp};
use init::update::fetch::Source;
use init::update::state::{Stage, State};
use init::update::Slot;
use os_config::manifest::{self, Artifact, Artifacts, Manifest, SecretKey};
use os_config::units::{Name, Sha256, Version};
use sha2::Digest;

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- HTTP server

/// What the test server saw and how it misbehaves.
#[derive(Default)]
struct Control {
    /// Requests as `PATH` or `PATH range=N-`.
    log: Vec<String>,
    /// Close the connection after this many body bytes, once, for a path ending like this.
    cut: Option<(String, usize)>,
    /// Close the connection after this many body bytes, every time, for a path ending like this.
    cut_always: Option<(String, usize)>,
}

struct Server {
    url: String,
    control: Arc<Mutex<Control>>,
}

impl Server {
    fn start(root: PathBuf) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("addr").port();
        let control = Arc::new(Mutex::new(Control::default()));
        let shared = control.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let root = root.clone();
                let control = shared.clone();
                std::thread::spawn(move || serve(stream, &root, &control));
            }
        });
        Server {
            url: format!("http://127.0.0.1:{port}/releases"),
            control,
        }
    }

    fn requests(&self, suffix: &str) -> Vec<String> {
        let control = self.control.lock().expect("lock");
        control
            .log
            .iter()
            .filter(|l| l.contains(suffix))
            .cloned()
            .collect()
    }

    fn artifact_requests(&self) -> usize {
        self.requests("/artifacts/").len()
    }
}

fn serve(stream: TcpStream, root: &Path, control: &Mutex<Control>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("request line");
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut range = None;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).expect("header");
        if header.trim().is_empty() {
            break;
        }
        if let Some(r) = header.strip_prefix("Range: bytes=") {
            range = r.trim().trim_end_matches('-').parse::<usize>().ok();
        }
    }
    let cut = {
        let mut c = control.lock().expect("lock");
        c.log.push(match range {
            Some(r) => format!("{path} range={r}-"),
            None => path.clone(),
        });
        match (&c.cut, &c.cut_always) {
            (Some((suffix, n)), _) if path.ends_with(suffix.as_str()) => {
                let n = *n;
                c.cut = None;
                Some(n)
            }
            (_, Some((suffix, n))) if path.ends_with(suffix.as_str()) => Some(*n),
            _ => None,
        }
    };
    let mut stream = stream;
    let file = path.strip_prefix("/releases/").map(|p| root.join(p));
    let Some(Ok(data)) = file.map(fs::read) else {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let start = range.unwrap_or(0).min(data.len());
    let body = &data[start..];
    let head = match range {
        Some(_) => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
            body.len(),
            data.len().saturating_sub(1),
            data.len()
        ),
        None => format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()),
    };
    let _ = stream.write_all(head.as_bytes());
    let end = cut.map_or(body.len(), |n| n.min(body.len()));
    let _ = stream.write_all(&body[..end]);
}

// ---------------------------------------------------------------- releases

struct Content {
    root: Vec<u8>,
    verity: Vec<u8>,
    root_hash: String,
    kernel: Vec<u8>,
    initrd: Vec<u8>,
}

fn content(seed: u8, blocks: usize) -> Content {
    content_of(noise(seed, blocks * 4096), seed)
}

/// Pseudo-random bytes, so that they do not compress (like a squashfs image).
fn noise(seed: u8, len: usize) -> Vec<u8> {
    os_config::test_data::noise(u64::from(seed), len)
}

/// A release whose root image is `root` (a whole number of 4096-byte blocks).
fn content_of(root: Vec<u8>, seed: u8) -> Content {
    let oracle = os_config::oracle::veritysetup_format(&root, Some("a1b2c3d4"), None);
    Content {
        root,
        verity: oracle.hash_device,
        root_hash: oracle.root_hash,
        kernel: (0..200_000u32).map(|i| (i % 253) as u8 ^ seed).collect(),
        initrd: format!("initrd of release {seed}").into_bytes(),
    }
}

fn sha(data: &[u8]) -> Sha256 {
    Sha256::parse(&hex::encode(sha2::Sha256::digest(data))).expect("hex")
}

/// Frame size of test artifacts: small, so that resuming at a frame is exercised.
const FRAME: usize = 256 << 10;

/// Stores `data` zstd-compressed, cut into independent frames like `plinth publish` does.
fn store(dir: &Path, data: &[u8]) -> Artifact {
    let mut compressed = Vec::new();
    let mut frames = Vec::new();
    for (i, chunk) in data.chunks(FRAME).enumerate() {
        frames.push(manifest::Frame {
            offset: compressed.len() as u64,
            uncompressed_offset: (i * FRAME) as u64,
        });
        compressed.extend(zstd::encode_all(chunk, 3).expect("zstd"));
    }
    if frames.len() == 1 {
        frames.clear();
    }
    let digest = sha(&compressed);
    let path = Artifact::path_for(&digest);
    fs::create_dir_all(dir.join("artifacts")).expect("mkdir");
    fs::write(dir.join(&path), &compressed).expect("write artifact");
    Artifact {
        path,
        size: compressed.len() as u64,
        sha256: digest,
        uncompressed_size: data.len() as u64,
        uncompressed_sha256: sha(data),
        frames,
    }
}

/// Publishes `c` as `name` `version` into `dir/stable/`, signed with `key`.
fn publish(dir: &Path, key: &SecretKey, name: &str, version: &str, c: &Content) -> Manifest {
    publish_with(dir, key, name, version, c, None)
}

fn publish_with(
    dir: &Path,
    key: &SecretKey,
    name: &str,
    version: &str,
    c: &Content,
    rollout: Option<manifest::Rollout>,
) -> Manifest {
    let m = Manifest {
        format: manifest::FORMAT,
        name: Name::parse(name).expect("name"),
        version: Version::parse(version).expect("version"),
        channel: Name::parse("stable").expect("channel"),
        created: manifest::rfc3339(0),
        // 2100-01-01: valid for as long as these tests run.
        expires: manifest::rfc3339(4_102_444_800),
        root_hash: Sha256::parse(&c.root_hash).expect("hash"),
        salt: "a1b2c3d4".to_owned(),
        data_blocks: c.root.len() as u64 / 4096,
        cmdline: vec!["console=ttyS0".to_owned()],
        rollout,
        artifacts: Artifacts {
            root: store(dir, &c.root),
            verity: store(dir, &c.verity),
            kernel: store(dir, &c.kernel),
            initrd: store(dir, &c.initrd),
        },
        root_chunks: None,
    };
    sign_and_write(dir, key, &m);
    m
}

/// Writes `m` as the channel manifest of `dir`, signed with `key`.
fn sign_and_write(dir: &Path, key: &SecretKey, m: &Manifest) {
    let bytes = m.to_bytes();
    fs::create_dir_all(dir.join("stable")).expect("mkdir");
    fs::write(dir.join("stable/manifest.json"), &bytes).expect("manifest");
    fs::write(dir.join("stable/manifest.json.sig"), key.sign(&bytes)).expect("sig");
}

/// Publishes `c` like [`publish`], with the chunk index of its root image and its chunks
/// (written by `plinth publish`'s own chunk store).
fn publish_chunked(dir: &Path, key: &SecretKey, version: &str, c: &Content) -> Manifest {
    let m = publish(dir, key, "demo", version, c);
    let (index, _) = builder::publish::store_chunks(&c.root[..], dir).expect("chunk store");
    let m = Manifest {
        root_chunks: Some(index),
        ..m
    };
    sign_and_write(dir, key, &m);
    m
}

// ---------------------------------------------------------------- machine

struct Machine {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    disk: PathBuf,
    releases: PathBuf,
    key: SecretKey,
    server: Server,
    v1: Content,
}

impl Machine {
    /// A machine running `demo` 1 from slot A, its update URL pointing at the test server.
    fn new() -> Machine {
        Machine::with_esp_folders(&builder::disk::esp::folders())
    }

    /// [`Machine::new`] on a disk whose ESP was made with only `folders` (an image from a builder
    /// that did not create every slot's folder up front).
    fn with_esp_folders(folders: &[&str]) -> Machine {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        let releases = dir.join("releases");
        fs::create_dir_all(&releases).expect("mkdir");
        let server = Server::start(releases.clone());
        let key = SecretKey::from_seed([5; 32]);
        let v1 = content(1, 300);
        let disk = dir.join("disk.raw");
        make_disk(&disk, &v1, folders);
        let machine = Machine {
            _tmp: tmp,
            dir,
            disk,
            releases,
            key,
            server,
            v1,
        };
        machine.boot(Slot::A, "1");
        machine
    }

    /// The marker plinth-init writes once the boot has settled.
    fn settled_marker(&self) -> PathBuf {
        self.dir.join("run/boot-settled")
    }

    /// Where stage 1 records what it booted.
    fn boot_record(&self) -> PathBuf {
        self.dir.join("run/plinth/boot.json")
    }

    /// Writes the definition, command line and boot record of `version` running from `slot`,
    /// whose boot has settled (as plinth-init says once it is blessed and its containers are
    /// reconciled).
    fn boot(&self, slot: Slot, version: &str) {
        fs::create_dir_all(self.dir.join("run")).expect("mkdir");
        fs::write(self.settled_marker(), "settled\n").expect("settled");
        let definition = format!(
            "[image]\nname = \"demo\"\nversion = \"{version}\"\n\n[update]\nurl = \"{}\"\nkeys = [\"{}\"]\nstrategy = \"manual\"\n",
            self.server.url,
            self.key.public()
        );
        fs::write(self.dir.join("image.toml"), definition).expect("definition");
        fs::write(
            self.dir.join("cmdline"),
            format!("console=ttyS0 plinth.slot={slot} plinth.version={version}\n"),
        )
        .expect("cmdline");
        // As stage 1 writes it; the agent and the gate do not read the root hash.
        let record = os_config::boot::BootRecord {
            disk: self.disk.clone(),
            slot,
            root_hash: None,
        };
        fs::create_dir_all(self.dir.join("run/plinth")).expect("mkdir");
        fs::write(self.boot_record(), record.to_json().expect("json")).expect("boot record");
    }

    fn agent(&self) -> Agent {
        let mut agent = Agent::load(Paths {
            definition: self.dir.join("image.toml"),
            state: self.dir.join("var/lib/plinth/update.json"),
            cmdline: self.dir.join("cmdline"),
            boot_record: self.boot_record(),
            machine_id: self.dir.join("machine-id"),
            settled: self.settled_marker(),
            ..Paths::default()
        })
        .expect("agent loads");
        agent.retries = 3;
        agent
    }

    fn state(&self) -> State {
        State::load(&self.dir.join("var/lib/plinth/update.json")).expect("state")
    }

    fn partition(&self, label: &str, len: usize) -> Vec<u8> {
        let mut disk = Disk::open(&self.disk).expect("disk");
        let part = disk.partition(label).expect(label);
        let mut region = disk.region(&part).expect("region");
        let mut data = vec![0u8; len];
        region.read_exact(&mut data).expect("read partition");
        data
    }

    /// Every byte of slot B's partitions and of the ESP, and the GPT (whose partition UUIDs
    /// carry the slot's root hash).
    fn slot_b_and_esp(&self) -> Vec<u8> {
        let mut disk = Disk::open(&self.disk).expect("disk");
        let mut bytes = Vec::new();
        for label in ["root-b", "verity-b", "esp"] {
            let part = disk.partition(label).expect(label);
            let mut region = disk.region(&part).expect("region");
            region.read_to_end(&mut bytes).expect("read partition");
        }
        let mut gpt = vec![0u8; 34 * 512];
        let mut file = fs::File::open(&self.disk).expect("disk");
        file.read_exact(&mut gpt).expect("GPT");
        bytes.extend_from_slice(&gpt);
        bytes
    }

    fn entries(&self) -> Vec<String> {
        let mut disk = Disk::open(&self.disk).expect("disk");
        let part = disk.partition("esp").expect("esp");
        let esp = Esp::open(disk.region(&part).expect("region")).expect("fat");
        let mut names: Vec<String> = esp
            .entries()
            .expect("entries")
            .iter()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        names
    }

    fn esp_file(&self, path: &str) -> Vec<u8> {
        let mut disk = Disk::open(&self.disk).expect("disk");
        let part = disk.partition("esp").expect("esp");
        let esp = Esp::open(disk.region(&part).expect("region")).expect("fat");
        esp.read_file(path).expect(path)
    }

    fn write_entry(&self, name: &str) {
        let mut disk = Disk::open(&self.disk).expect("disk");
        let part = disk.partition("esp").expect("esp");
        let esp = Esp::open(disk.region(&part).expect("region")).expect("fat");
        esp.write_file(&format!("loader/entries/{name}"), b"title x\n")
            .expect("entry");
        esp.close().expect("close");
    }

    fn rename_entry(&self, from: &str, to: &str) {
        let mut disk = Disk::open(&self.disk).expect("disk");
        let part = disk.partition("esp").expect("esp");
        let esp = Esp::open(disk.region(&part).expect("region")).expect("fat");
        let parse = |n| init::update::EntryName::parse(n).expect("entry name");
        esp.rename_entry(&parse(from), &parse(to)).expect("rename");
        esp.close().expect("close");
    }

    /// Checks slot B holds `c` completely, with its counted entry and DPS partition UUIDs.
    fn assert_slot_b_holds(&self, c: &Content, version: &str) {
        assert_eq!(
            self.partition("root-b", c.root.len()),
            c.root,
            "root-b content"
        );
        assert_eq!(
            self.partition("verity-b", c.verity.len()),
            c.verity,
            "verity-b content"
        );
        assert_eq!(self.esp_file("plinth/b/vmlinuz"), c.kernel);
        assert_eq!(self.esp_file("plinth/b/initrd"), c.initrd);
        let entry = format!("loader/entries/plinth-b-{version}+3.conf");
        let text = String::from_utf8(self.esp_file(&entry)).expect("entry text");
        assert!(
            text.contains(&format!(
                "options plinth.slot=b plinth.version={version} plinth.roothash={} console=ttyS0",
                c.root_hash
            )),
            "{text}"
        );
        let disk = Disk::open(&self.disk).expect("disk");
        let root = disk.partition("root-b").expect("root-b");
        let verity = disk.partition("verity-b").expect("verity-b");
        assert_eq!(hex::encode(root.uuid), c.root_hash[..32]);
        assert_eq!(hex::encode(verity.uuid), c.root_hash[32..]);
        // The backup GPT agrees: sgdisk-free check through the gpt crate with only the backup.
        let mut file = fs::File::open(&self.disk).expect("disk");
        let gpt = gpt::GptConfig::new()
            .open_from_device(&mut file)
            .expect("gpt");
        assert!(
            gpt.primary_header().is_ok() && gpt.backup_header().is_ok(),
            "both GPT headers valid"
        );
        assert_eq!(
            self.entries()
                .iter()
                .filter(|e| e.starts_with("plinth-a-"))
                .count(),
            1,
            "slot a untouched"
        );
    }

    fn fsck_esp(&self) {
        let mut disk = Disk::open(&self.disk).expect("disk");
        let part = disk.partition("esp").expect("esp");
        let mut region = disk.region(&part).expect("region");
        let mut bytes = Vec::new();
        region.read_to_end(&mut bytes).expect("read esp");
        let path = self.dir.join("esp.img");
        fs::write(&path, bytes).expect("write esp copy");
        let out = Command::new("fsck.vfat")
            .arg("-n")
            .arg(&path)
            .output()
            .expect("fsck.vfat must be installed (dosfstools)");
        let text = String::from_utf8_lossy(&out.stdout);
        // A clean volume gives the version line and the summary line, nothing else.
        assert!(
            out.status.success() && text.lines().count() == 2,
            "fsck.vfat: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// GPT (esp, root-a, verity-a, root-b, verity-b, state) with release `c` as version 1 in slot A,
/// its ESP written by the builder's writer with `folders` created up front.
fn make_disk(path: &Path, c: &Content, folders: &[&str]) {
    let size = 96 * MIB;
    fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .expect("disk file");
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    gpt::mbr::ProtectiveMBR::with_lb_size((size / 512 - 1) as u32)
        .overwrite_lba0(&mut file)
        .expect("mbr");
    let mut gpt = gpt::GptConfig::new()
        .writable(true)
        .create_from_device(&mut file, Some(uuid::Uuid::from_u128(7)))
        .expect("gpt");
    for (name, size) in [
        // FAT32, as the builder writes it, needs at least 33 MiB.
        ("esp", 40 * MIB),
        ("root-a", 4 * MIB),
        ("verity-a", MIB),
        ("root-b", 4 * MIB),
        ("verity-b", MIB),
        ("state", 8 * MIB),
    ] {
        gpt.add_partition(name, size, gpt::partition_types::LINUX_FS, 0, Some(2048))
            .expect("partition");
    }
    gpt.write().expect("write gpt");
    let mut disk = Disk::open(path).expect("disk");
    for (label, data) in [("root-a", &c.root), ("verity-a", &c.verity)] {
        let part = disk.partition(label).expect(label);
        disk.region(&part)
            .expect("region")
            .write_all(data)
            .expect("write");
    }
    // The ESP as the builder writes it: its own FAT32 writer, version 1 in slot A.
    let esp = disk.partition("esp").expect("esp");
    let entry = os_config::boot::Entry {
        slot: Slot::A,
        version: "1".to_owned(),
        root_hash: c.root_hash.clone(),
        extra_args: Vec::new(),
        verity: true,
    };
    let file = |path: String, data: &[u8]| builder::disk::esp::EspFile {
        path,
        data: data.to_vec(),
    };
    builder::disk::esp::write_esp(
        disk.region(&esp).expect("region"),
        0x1234_5678,
        builder::build::DEFAULT_SOURCE_DATE_EPOCH,
        folders,
        &[
            file(os_config::boot::Entry::kernel_path(Slot::A), &c.kernel),
            file(os_config::boot::Entry::initrd_path(Slot::A), &c.initrd),
            file(
                os_config::boot::EntryName::good(Slot::A, "1").esp_path(),
                entry.format().as_bytes(),
            ),
        ],
    )
    .expect("esp");
    disk.sync().expect("sync");
}

fn refused_reason(outcome: Outcome) -> String {
    match outcome {
        Outcome::Refused { reason, .. } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn applies_a_release_over_http_resuming_a_broken_download() {
    let m = Machine::new();
    let agent = m.agent();
    assert_eq!(agent.check(None).expect("check"), Outcome::NoRelease);
    let v2 = content(2, 400);
    let manifest = publish(&m.releases, &m.key, "demo", "2", &v2);
    assert_eq!(
        agent.check(None).expect("check"),
        Outcome::Available {
            version: "2".into()
        }
    );

    // The root download breaks after 100 kB; the agent resumes it with a Range request.
    m.server.control.lock().expect("lock").cut =
        Some((manifest.artifacts.root.path.clone(), 100_000));
    let outcome = agent.apply(None, &mut |_| Ok(())).expect("apply");
    assert_eq!(
        outcome,
        Outcome::Staged {
            version: "2".into(),
            slot: Slot::B
        }
    );
    let root_requests = m.server.requests(&manifest.artifacts.root.path);
    assert_eq!(root_requests.len(), 2, "{root_requests:?}");
    assert!(
        root_requests[1].ends_with("range=100000-"),
        "{root_requests:?}"
    );

    m.assert_slot_b_holds(&v2, "2");
    m.fsck_esp();
    let state = m.state();
    assert_eq!(state.newest_accepted, Version::parse("2").ok());
    assert_eq!(state.in_progress, None);
    assert_eq!(
        agent.check(None).expect("check"),
        Outcome::AlreadyStaged {
            version: "2".into(),
            slot: Slot::B
        }
    );

    // After the reboot into slot B, nothing touches slot A (the fallback) until the boot is
    // blessed; then the health gate blesses it.
    m.boot(Slot::B, "2");
    m.rename_entry("plinth-b-2+3.conf", "plinth-b-2+2-1.conf");
    let v3 = content(3, 200);
    publish(&m.releases, &m.key, "demo", "3", &v3);
    assert_eq!(
        m.agent()
            .apply(None, &mut |_| Ok(()))
            .expect("apply on trial"),
        Outcome::WaitingForBless {
            slot: Slot::B,
            version: "2".into()
        }
    );
    assert_eq!(m.entries(), ["plinth-a-1.conf", "plinth-b-2+2-1.conf"]);
    assert_eq!(m.partition("root-a", m.v1.root.len()), m.v1.root);
    publish(&m.releases, &m.key, "demo", "2", &v2);
    let blessed = bless_disk(&m.disk, Slot::B, "2").expect("bless");
    assert_eq!(
        blessed,
        Blessed::Blessed {
            from: "plinth-b-2+2-1.conf".into(),
            to: "plinth-b-2.conf".into()
        }
    );
    assert_eq!(m.entries(), ["plinth-a-1.conf", "plinth-b-2.conf"]);
    assert_eq!(
        bless_disk(&m.disk, Slot::B, "2").expect("bless again"),
        Blessed::AlreadyGood
    );
    let agent = m.agent();
    assert_eq!(
        agent.check(None).expect("check"),
        Outcome::UpToDate {
            version: "2".into()
        }
    );
    let status = agent.status().expect("status");
    assert_eq!(status.slots[1].boot, "good");
    assert!(status.slots[1].running);
    assert_eq!(status.staged, None);

    // v3 goes to slot A, which is removed first and rewritten.
    let v3 = content(3, 200);
    publish(&m.releases, &m.key, "demo", "3", &v3);
    assert_eq!(
        agent.apply(None, &mut |_| Ok(())).expect("apply v3"),
        Outcome::Staged {
            version: "3".into(),
            slot: Slot::A
        }
    );
    assert_eq!(m.entries(), ["plinth-a-3+3.conf", "plinth-b-2.conf"]);
    assert_eq!(m.partition("root-a", v3.root.len()), v3.root);
    m.fsck_esp();
}

#[test]
fn the_esp_stays_fsck_clean_through_updates_a_b_a_b() {
    // A current image (every slot folder made by the builder) and an older one whose ESP lacks
    // /plinth/b, which the agent creates on the first update.
    let current = builder::disk::esp::folders();
    let old: &[&str] = &[Slot::A.esp_dir(), os_config::boot::ENTRIES_DIR];
    for folders in [&current[..], old] {
        let m = Machine::with_esp_folders(folders);
        m.fsck_esp();
        let mut running = (Slot::A, "1".to_owned());
        for version in 2..=5u8 {
            let next = content(version, 100 + usize::from(version));
            let version = version.to_string();
            publish(&m.releases, &m.key, "demo", &version, &next);
            let target = running.0.other();
            assert_eq!(
                m.agent().apply(None, &mut |_| Ok(())).expect("apply"),
                Outcome::Staged {
                    version: version.clone(),
                    slot: target
                },
                "{folders:?}"
            );
            m.fsck_esp();
            assert_eq!(
                m.esp_file(&os_config::boot::Entry::kernel_path(target)),
                next.kernel
            );
            m.boot(target, &version);
            bless_disk(&m.disk, target, &version).expect("bless");
            m.fsck_esp();
            running = (target, version);
        }
        assert_eq!(running, (Slot::A, "5".to_owned()));
    }
}

#[test]
fn boot_files_the_esp_already_holds_are_copied_not_downloaded() {
    let m = Machine::new();
    // Version 2 changes the root only: same kernel and initrd as the running version 1.
    let mut v2 = content(2, 320);
    v2.kernel = m.v1.kernel.clone();
    v2.initrd = m.v1.initrd.clone();
    let manifest = publish(&m.releases, &m.key, "demo", "2", &v2);
    assert_eq!(
        m.agent().apply(None, &mut |_| Ok(())).expect("apply"),
        Outcome::Staged {
            version: "2".into(),
            slot: Slot::B
        }
    );
    for path in [
        &manifest.artifacts.kernel.path,
        &manifest.artifacts.initrd.path,
    ] {
        assert!(m.server.requests(path).is_empty(), "{path} was downloaded");
    }
    assert_eq!(m.server.requests(&manifest.artifacts.root.path).len(), 1);
    m.assert_slot_b_holds(&v2, "2");
    m.fsck_esp();

    // Version 3 changes the kernel: it is downloaded; the initrd is still copied.
    let mut v3 = content(3, 330);
    v3.initrd = m.v1.initrd.clone();
    let manifest = publish(&m.releases, &m.key, "demo", "3", &v3);
    m.boot(Slot::B, "2");
    bless_disk(&m.disk, Slot::B, "2").expect("bless");
    assert_eq!(
        m.agent().apply(None, &mut |_| Ok(())).expect("apply"),
        Outcome::Staged {
            version: "3".into(),
            slot: Slot::A
        }
    );
    assert_eq!(m.server.requests(&manifest.artifacts.kernel.path).len(), 1);
    assert!(m
        .server
        .requests(&manifest.artifacts.initrd.path)
        .is_empty());
    assert_eq!(
        m.esp_file(&os_config::boot::Entry::kernel_path(Slot::A)),
        v3.kernel
    );
    assert_eq!(
        m.esp_file(&os_config::boot::Entry::initrd_path(Slot::A)),
        v3.initrd
    );
    m.fsck_esp();
}

#[test]
fn offline_apply_from_a_folder() {
    let m = Machine::new();
    let v2 = content(2, 150);
    let usb = m.dir.join("usb");
    let manifest = publish(&usb, &m.key, "demo", "2", &v2);
    let agent = m.agent();
    assert_eq!(agent.check(None).expect("online"), Outcome::NoRelease);
    let from = Source::Dir(usb.clone());

    // A medium whose root image has one byte changed (same size) is refused before the slot is
    // touched, naming the artifact.
    let root_file = usb.join(&manifest.artifacts.root.path);
    let good = std::fs::read(&root_file).expect("root artifact");
    let mut bad = good.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x40;
    std::fs::write(&root_file, &bad).expect("corrupt");
    let before = m.slot_b_and_esp();
    match agent.apply(Some(&from), &mut |_| Ok(())).expect("apply") {
        Outcome::Refused { reason, .. } => {
            assert!(reason.contains("artifact root"), "{reason}")
        }
        other => panic!("a corrupt medium was not refused: {other:?}"),
    }
    assert!(m.slot_b_and_esp() == before, "slot B or the ESP changed");
    std::fs::write(&root_file, &good).expect("restore");

    // Checked where it lies: when the checks are done, nothing of it was copied to /var.
    let staged_dir = m.dir.join("var/lib/plinth/staging/artifacts");
    let mut copied = None;
    let outcome = agent
        .apply(Some(&from), &mut |event| {
            if matches!(event, Event::Downloaded) {
                copied = Some(staged_dir.exists());
            }
            Ok(())
        })
        .expect("apply");
    assert_eq!(
        outcome,
        Outcome::Staged {
            version: "2".into(),
            slot: Slot::B
        }
    );
    assert_eq!(copied, Some(false), "the release was copied to /var");
    m.assert_slot_b_holds(&v2, "2");
}

#[test]
fn expired_and_future_manifests_are_refused_before_any_download() {
    let m = Machine::new();
    let mut agent = m.agent();
    agent.clock = || 2_000_000_000;
    let v2 = content(2, 150);
    let good = publish(&m.releases, &m.key, "demo", "2", &v2);
    let sign = |manifest: &Manifest| {
        let bytes = manifest.to_bytes();
        fs::write(m.releases.join("stable/manifest.json"), &bytes).expect("manifest");
        fs::write(
            m.releases.join("stable/manifest.json.sig"),
            m.key.sign(&bytes),
        )
        .expect("sig");
    };
    for (created, expires, want) in [
        (
            0,
            1_999_999_999,
            "manifest expired at 2033-05-18T03:33:19Z (the machine's clock says 2033-05-18T03:33:20Z)",
        ),
        (0, 2_000_000_000, "manifest expired at 2033-05-18T03:33:20Z"),
        (
            2_000_000_000 + manifest::MAX_CLOCK_SKEW_SECONDS + 1,
            4_102_444_800,
            "manifest created at 2033-05-18T03:43:21Z, later than the machine's clock",
        ),
    ] {
        sign(&Manifest {
            created: manifest::rfc3339(created),
            expires: manifest::rfc3339(expires),
            ..good.clone()
        });
        let outcome = agent.apply(None, &mut |_| Ok(())).expect("apply");
        let line = status_line(&outcome).expect("a status line");
        assert!(
            line.starts_with("PLINTH-STATUS update-refused version=2 reason=")
                && line.contains(want),
            "{line}"
        );
        assert_eq!(m.server.artifact_requests(), 0, "{want}");
        assert!(m.state().refused.is_empty(), "an expiry is not remembered");
    }
    // Published again with a fresh expiry: taken at the next check.
    sign(&Manifest {
        created: manifest::rfc3339(2_000_000_000 + manifest::MAX_CLOCK_SKEW_SECONDS),
        ..good
    });
    assert_eq!(
        agent.check(None).expect("check"),
        Outcome::Available {
            version: "2".to_owned()
        }
    );
}

#[test]
fn refuses_bad_releases_and_never_writes_the_entry() {
    let m = Machine::new();
    let agent = m.agent();
    let v2 = content(2, 150);
    let zeros = vec![0u8; v2.root.len()];

    // Signed with another key.
    publish(
        &m.releases,
        &SecretKey::from_seed([6; 32]),
        "demo",
        "2",
        &v2,
    );
    let reason = refused_reason(agent.apply(None, &mut |_| Ok(())).expect("apply"));
    assert!(reason.contains("signature does not verify"), "{reason}");
    assert_eq!(m.server.artifact_requests(), 0);

    // For another image.
    publish(&m.releases, &m.key, "other", "2", &v2);
    let reason = refused_reason(agent.apply(None, &mut |_| Ok(())).expect("apply"));
    assert!(
        reason.contains("release is for image `other`, this machine runs `demo`"),
        "{reason}"
    );

    // A lower version.
    publish(&m.releases, &m.key, "demo", "0.9", &v2);
    let reason = refused_reason(agent.apply(None, &mut |_| Ok(())).expect("apply"));
    assert!(
        reason.contains("version 0.9 is not newer than the running version 1"),
        "{reason}"
    );
    assert_eq!(m.server.artifact_requests(), 0);
    assert_eq!(
        m.partition("root-b", zeros.len()),
        zeros,
        "nothing written before the artifacts"
    );

    // Slot B holds an older version with its entry: the fallback a refused release must not
    // cost. Nothing of it, nor of the ESP, changes through the refusals below.
    m.write_entry("plinth-b-0.5.conf");
    let before = m.slot_b_and_esp();

    // A flipped byte in the root artifact: refused with the hash mismatch before anything is
    // written.
    let manifest = publish(&m.releases, &m.key, "demo", "2", &v2);
    let path = m.releases.join(&manifest.artifacts.root.path);
    let mut data = fs::read(&path).expect("artifact");
    let middle = data.len() / 2;
    data[middle] ^= 0x40;
    fs::write(&path, &data).expect("flip");
    let reason = refused_reason(agent.apply(None, &mut |_| Ok(())).expect("apply"));
    assert!(
        reason.contains("artifact root: sha256 of the download is"),
        "{reason}"
    );
    assert!(
        m.slot_b_and_esp() == before,
        "a refused release changed slot B or the ESP"
    );
    assert_eq!(m.entries(), ["plinth-a-1.conf", "plinth-b-0.5.conf"]);
    // Remembered with its reason: the same manifest is refused again without a download.
    let requests = m.server.artifact_requests();
    let reason = refused_reason(agent.apply(None, &mut |_| Ok(())).expect("apply"));
    assert!(
        reason.contains("sha256 of the download is") && reason.contains("refused before"),
        "{reason}"
    );
    assert_eq!(m.server.artifact_requests(), requests, "downloaded again");
    assert_eq!(m.state().refused.len(), 1);
    assert_eq!(m.state().refused[0].version.as_str(), "2");

    // A flipped byte near the end of the kernel, the third artifact: still nothing written.
    let manifest = publish(&m.releases, &m.key, "demo", "2.0.1", &v2);
    let path = m.releases.join(&manifest.artifacts.kernel.path);
    let mut data = fs::read(&path).expect("artifact");
    let last = data.len() - 5;
    data[last] ^= 1;
    fs::write(&path, &data).expect("flip");
    let reason = refused_reason(agent.apply(None, &mut |_| Ok(())).expect("apply"));
    assert!(reason.contains("artifact kernel:"), "{reason}");
    assert!(
        m.slot_b_and_esp() == before,
        "a refused kernel changed slot B or the ESP"
    );

    // An artifact longer than its manifest says (the server sends more bytes).
    let manifest = publish(&m.releases, &m.key, "demo", "2.0.2", &v2);
    let path = m.releases.join(&manifest.artifacts.verity.path);
    let mut data = fs::read(&path).expect("artifact");
    data.extend_from_slice(b"more");
    fs::write(&path, &data).expect("extend");
    let reason = refused_reason(agent.apply(None, &mut |_| Ok(())).expect("apply"));
    assert!(
        reason.contains("artifact verity: the download is more than"),
        "{reason}"
    );
    assert!(
        m.slot_b_and_esp() == before,
        "a longer artifact changed slot B or the ESP"
    );
    let state = m.state();
    assert_eq!(
        (state.staged, state.newest_accepted, state.in_progress),
        (None, None, None)
    );
    assert_eq!(state.refused.len(), 3);
    assert!(
        !m.dir.join("var/lib/plinth/staging/artifacts").exists(),
        "refused downloads are not kept"
    );

    // The same manifest stays refused from the server even once it sends the right bytes; an
    // operator's `--from` with a good copy of it is checked afresh and taken.
    publish(&m.releases, &m.key, "demo", "2.0.2", &v2);
    let reason = refused_reason(agent.apply(None, &mut |_| Ok(())).expect("apply"));
    assert!(reason.contains("refused before"), "{reason}");
    let usb = m.dir.join("usb");
    publish(&usb, &m.key, "demo", "2.0.2", &v2);
    assert_eq!(
        agent
            .apply(Some(&Source::Dir(usb)), &mut |_| Ok(()))
            .expect("apply"),
        Outcome::Staged {
            version: "2.0.2".into(),
            slot: Slot::B
        }
    );
    m.fsck_esp();
}

#[test]
fn nothing_is_fetched_or_written_before_the_boot_settles() {
    let m = Machine::new();
    let v2 = content(2, 150);
    publish(&m.releases, &m.key, "demo", "2", &v2);
    fs::remove_file(m.settled_marker()).expect("unsettle");
    let agent = m.agent();
    assert_eq!(
        agent.apply(None, &mut |_| Ok(())).expect("apply"),
        Outcome::NotSettled
    );
    assert!(m.server.requests("/").is_empty(), "fetched before settling");
    assert_eq!(m.entries(), ["plinth-a-1.conf"]);
    fs::write(m.settled_marker(), "settled\n").expect("settle");
    assert!(matches!(
        agent.apply(None, &mut |_| Ok(())).expect("apply"),
        Outcome::Staged { .. }
    ));
}

#[test]
fn an_interrupted_update_resumes_or_restarts_and_never_exposes_a_partial_slot() {
    type Stop = Box<dyn Fn(&Event) -> bool>;
    let stops: Vec<(&str, Stop)> = vec![
        (
            "accepted",
            Box::new(|e| *e == Event::Stage(Stage::Accepted)),
        ),
        (
            "entry removed",
            Box::new(|e| *e == Event::Stage(Stage::EntryRemoved)),
        ),
        (
            "mid root",
            Box::new(|e| matches!(e, Event::Written { artifact: "root", bytes } if *bytes >= MIB)),
        ),
        (
            "root written",
            Box::new(|e| *e == Event::Stage(Stage::RootWritten)),
        ),
        (
            "mid verity",
            Box::new(|e| {
                matches!(
                    e,
                    Event::Written {
                        artifact: "verity",
                        ..
                    }
                )
            }),
        ),
        (
            "verity written",
            Box::new(|e| *e == Event::Stage(Stage::VerityWritten)),
        ),
        (
            "verified",
            Box::new(|e| *e == Event::Stage(Stage::Verified)),
        ),
        (
            "uuids set",
            Box::new(|e| *e == Event::Stage(Stage::UuidsSet)),
        ),
        (
            "mid kernel",
            Box::new(|e| {
                matches!(
                    e,
                    Event::Written {
                        artifact: "kernel",
                        ..
                    }
                )
            }),
        ),
        (
            "boot files written",
            Box::new(|e| *e == Event::Stage(Stage::BootFilesWritten)),
        ),
    ];
    for (point, stop) in stops {
        let m = Machine::new();
        let v2 = content(2, 600);
        let manifest = publish(&m.releases, &m.key, "demo", "2", &v2);
        m.write_entry("plinth-b-0.5.conf");
        let agent = m.agent();
        let err = agent
            .apply(None, &mut |e| {
                if stop(e) {
                    anyhow::bail!("power cut at {point}")
                } else {
                    Ok(())
                }
            })
            .expect_err(point);
        assert!(format!("{err:#}").contains("power cut"), "{point}: {err:#}");
        // What a reboot now finds: slot A bootable, slot B without an entry.
        let entries = m.entries();
        assert!(
            entries == ["plinth-a-1.conf"]
                || (point == "accepted" && entries == ["plinth-a-1.conf", "plinth-b-0.5.conf"]),
            "{point}: {entries:?}"
        );
        assert_eq!(m.esp_file("plinth/a/vmlinuz"), m.v1.kernel, "{point}");
        assert_eq!(m.partition("root-a", m.v1.root.len()), m.v1.root, "{point}");
        let stage = m.state().in_progress.map(|p| p.stage);
        let root_requests = m.server.requests(&manifest.artifacts.root.path).len();

        let mut first_root_write = None;
        let outcome = m
            .agent()
            .apply(None, &mut |e| {
                if let Event::Written {
                    artifact: "root",
                    bytes,
                } = e
                {
                    first_root_write.get_or_insert(*bytes);
                }
                Ok(())
            })
            .expect(point);
        assert_eq!(
            outcome,
            Outcome::Staged {
                version: "2".into(),
                slot: Slot::B
            },
            "{point}"
        );
        m.assert_slot_b_holds(&v2, "2");
        m.fsck_esp();
        // Every artifact was staged on /var before the first write: nothing is downloaded again.
        let requests = m.server.requests(&manifest.artifacts.root.path);
        assert_eq!(requests.len(), root_requests, "{point}: stage {stage:?}");
        // Completed stages are not redone. An interrupted root write resumes at the first frame
        // not yet synced; the partition is synced every `SYNC_BYTES` (at a frame end), more than
        // this root image, so a cut in the middle starts it again (apply.rs's unit tests cut
        // between syncs).
        let frames = &manifest.artifacts.root.frames;
        assert!(manifest.artifacts.root.uncompressed_size < init::update::apply::SYNC_BYTES);
        match point {
            _ if stage.is_some_and(|s| s >= Stage::RootWritten) => {
                assert_eq!(
                    first_root_write, None,
                    "{point}: the root was written again"
                )
            }
            _ => assert!(first_root_write.is_some_and(|b| b <= frames[1].uncompressed_offset)),
        }
    }
}

#[test]
fn a_download_cut_short_resumes_from_what_was_staged_and_writes_nothing_before() {
    let m = Machine::new();
    let v2 = content(2, 400);
    let manifest = publish(&m.releases, &m.key, "demo", "2", &v2);
    m.write_entry("plinth-b-0.5.conf");
    let before = m.slot_b_and_esp();
    // The connection breaks after 100 kB and this agent does not reconnect: the apply fails
    // with what arrived kept under /var (as after a power cut mid-download).
    m.server.control.lock().expect("lock").cut =
        Some((manifest.artifacts.root.path.clone(), 100_000));
    let mut agent = m.agent();
    agent.retries = 0;
    let error = agent.apply(None, &mut |_| Ok(())).expect_err("cut short");
    assert!(format!("{error:#}").contains("artifact root"), "{error:#}");
    assert!(
        m.slot_b_and_esp() == before,
        "an unfinished download changed slot B"
    );
    let part = m
        .dir
        .join("var/lib/plinth/staging")
        .join(format!("{}.part", manifest.artifacts.root.path));
    assert_eq!(fs::metadata(&part).expect("partial file").len(), 100_000);

    let outcome = m.agent().apply(None, &mut |_| Ok(())).expect("apply");
    assert!(matches!(outcome, Outcome::Staged { .. }), "{outcome:?}");
    let requests = m.server.requests(&manifest.artifacts.root.path);
    assert!(
        requests
            .last()
            .is_some_and(|r| r.ends_with("range=100000-")),
        "{requests:?}"
    );
    m.assert_slot_b_holds(&v2, "2");
}

#[test]
fn a_version_that_ran_out_of_tries_is_recorded_bad_and_not_downloaded_again() {
    let m = Machine::new();
    let v2 = content(2, 150);
    publish(&m.releases, &m.key, "demo", "2", &v2);
    let agent = m.agent();
    assert_eq!(
        agent.apply(None, &mut |_| Ok(())).expect("apply"),
        Outcome::Staged {
            version: "2".into(),
            slot: Slot::B
        }
    );
    // systemd-boot tried it three times; plinth-init never blessed it; slot A booted again.
    m.rename_entry("plinth-b-2+3.conf", "plinth-b-2+0-3.conf");
    let agent = m.agent();
    let rollback = agent
        .detect_rollback()
        .expect("detect")
        .expect("a rollback");
    assert_eq!((rollback.from.as_str(), rollback.to.as_str()), ("2", "1"));
    assert_eq!(
        agent.detect_rollback().expect("detect"),
        None,
        "reported once"
    );
    let state = m.state();
    assert_eq!(state.bad_versions, [Version::parse("2").expect("v")]);
    assert_eq!(state.staged, None);
    let status = agent.status().expect("status");
    assert_eq!(status.slots[1].boot, "bad");

    let before = m.server.artifact_requests();
    let reason = refused_reason(agent.apply(None, &mut |_| Ok(())).expect("apply"));
    assert!(reason.contains("version 2 is marked bad"), "{reason}");
    assert_eq!(
        m.server.artifact_requests(),
        before,
        "a bad version is not downloaded again"
    );

    // A fixed v3 is accepted and replaces the bad entry.
    let v3 = content(3, 150);
    publish(&m.releases, &m.key, "demo", "3", &v3);
    assert_eq!(
        agent.apply(None, &mut |_| Ok(())).expect("apply"),
        Outcome::Staged {
            version: "3".into(),
            slot: Slot::B
        }
    );
    assert_eq!(m.entries(), ["plinth-a-1.conf", "plinth-b-3+3.conf"]);
}

#[test]
fn manual_rollback_boots_the_other_slot_and_marks_the_version_bad() {
    let m = Machine::new();
    let v2 = content(2, 150);
    publish(&m.releases, &m.key, "demo", "2", &v2);
    m.agent().apply(None, &mut |_| Ok(())).expect("apply");
    m.boot(Slot::B, "2");
    bless_disk(&m.disk, Slot::B, "2").expect("bless");
    let rollback = m.agent().rollback().expect("rollback");
    assert_eq!((rollback.from.as_str(), rollback.to.as_str()), ("2", "1"));
    assert_eq!(m.entries(), ["plinth-a-1.conf", "plinth-b-2+0-0.conf"]);
    m.boot(Slot::A, "1");
    let detected = m
        .agent()
        .detect_rollback()
        .expect("detect")
        .expect("rollback seen");
    assert_eq!(detected.from, "2");
}

#[test]
fn the_command_line_applies_from_a_folder_and_reports_status() {
    let m = Machine::new();
    let v2 = content(2, 150);
    let usb = m.dir.join("usb");
    publish(&usb, &m.key, "demo", "2", &v2);
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_plinth-update"))
            .arg("--definition")
            .arg(m.dir.join("image.toml"))
            .arg("--state")
            .arg(m.dir.join("var/lib/plinth/update.json"))
            .arg("--boot-record")
            .arg(m.boot_record())
            .arg("--settled")
            .arg(m.settled_marker())
            .args(args)
            .output()
            .expect("run plinth-update");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = run(&["apply", "--from", usb.to_str().expect("utf8")]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("PLINTH-STATUS update-staged version=2 slot=b"),
        "{stdout}"
    );
    for stage in [
        "accepted",
        "entry-removed",
        "root-written",
        "verified",
        "boot-files-written",
    ] {
        assert!(
            stdout.contains(&format!("PLINTH-STATUS update-progress stage={stage}\n")),
            "{stdout}"
        );
    }
    let (ok, stdout, stderr) = run(&["--json", "status"]);
    assert!(ok, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(status["slots"][1]["boot"], "trying 1/3", "{stdout}");
    assert_eq!(status["staged"]["version"], "2", "{stdout}");
    let (ok, _, stderr) = run(&["frobnicate"]);
    assert!(
        !ok && stderr.contains("unknown command `frobnicate`"),
        "{stderr}"
    );
}

#[test]
fn two_agents_never_apply_at_once() {
    let m = Machine::new();
    let v2 = content(2, 150);
    publish(&m.releases, &m.key, "demo", "2", &v2);
    let first = m.agent();
    let second = m.agent();
    let err = first
        .apply(None, &mut |e| {
            if *e == Event::Stage(Stage::EntryRemoved) {
                let inner = second.apply(None, &mut |_| Ok(())).expect_err("locked out");
                assert!(
                    format!("{inner:#}").contains("another plinth-update"),
                    "{inner:#}"
                );
                anyhow::bail!("checked");
            }
            Ok(())
        })
        .expect_err("stopped by the hook");
    assert!(format!("{err:#}").contains("checked"), "{err:#}");
}

#[test]
fn the_boot_disk_and_slot_come_from_the_boot_record() {
    use init::update::gate::running_boot;
    let m = Machine::new();
    // The agent finds the disk through the record alone (Machine::agent passes no --disk).
    let agent = m.agent();
    assert_eq!(agent.disk, m.disk);
    assert_eq!(agent.running_slot, Slot::A);
    let boot = running_boot(&agent.paths, "1")
        .expect("gate reads the record")
        .expect("booted from a slot");
    assert_eq!(
        (boot.disk.as_path(), boot.slot),
        (m.disk.as_path(), Slot::A)
    );
    assert_eq!(
        boot.entry.map(|e| e.file_name()).as_deref(),
        Some("plinth-a-1.conf")
    );
    // An explicit disk wins over the record's.
    let other = m.dir.join("other.raw");
    fs::copy(&m.disk, &other).expect("copy");
    let paths = Paths {
        disk: Some(other.clone()),
        ..agent.paths.clone()
    };
    assert_eq!(Agent::load(paths).expect("loads").disk, other);
    // A record of another slot than the command line's is refused by the gate.
    fs::write(
        m.dir.join("cmdline"),
        "console=ttyS0 plinth.slot=b plinth.version=1\n",
    )
    .expect("cmdline");
    let err = running_boot(&agent.paths, "1").expect_err("slots disagree");
    assert!(format!("{err:#}").contains("names slot a"), "{err:#}");
    // Without a record, both say which file is missing.
    fs::remove_file(m.boot_record()).expect("rm");
    let err = Agent::load(agent.paths.clone()).expect_err("no record");
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!(
            "boot record {} is missing",
            m.boot_record().display()
        )),
        "{text}"
    );
    let err = running_boot(&agent.paths, "1").expect_err("no record");
    assert!(format!("{err:#}").contains("is missing"), "{err:#}");
    // A machine not booted from a slot has no running boot to judge.
    fs::write(m.dir.join("cmdline"), "console=ttyS0\n").expect("cmdline");
    assert_eq!(running_boot(&agent.paths, "1").expect("no slot"), None);
}

#[test]
fn a_staged_rollout_defers_the_release_until_the_machines_moment() {
    let m = Machine::new();
    fs::write(
        m.dir.join("machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .expect("machine id");
    let v2 = content(2, 150);
    let rollout = manifest::Rollout {
        start: 1_000_000,
        spread_seconds: 86_400,
    };
    publish_with(&m.releases, &m.key, "demo", "2", &v2, Some(rollout));
    let due = rollout.due(
        "0123456789abcdef0123456789abcdef",
        &Version::parse("2").expect("v"),
    );
    assert!(due > rollout.start, "this machine id is not first in line");
    let mut agent = m.agent();
    agent.clock = || 1_000_000;
    match agent.apply(None, &mut |_| Ok(())).expect("apply") {
        Outcome::Deferred { version, until } => {
            assert_eq!(version, "2");
            assert_eq!(until, manifest::rfc3339(due));
        }
        other => panic!("expected a deferral, got {other:?}"),
    }
    assert_eq!(m.server.artifact_requests(), 0);
    // An operator's explicit --from ignores the rollout.
    let from = Source::Dir(m.releases.clone());
    assert!(matches!(
        agent.check(Some(&from)).expect("check"),
        Outcome::Available { .. }
    ));
    // Once the machine's moment has come, the release is applied.
    agent.clock = || 1_000_000 + 86_400;
    assert_eq!(
        agent.apply(None, &mut |_| Ok(())).expect("apply"),
        Outcome::Staged {
            version: "2".into(),
            slot: Slot::B
        }
    );
}

#[test]
fn the_gate_blesses_a_healthy_trial_boot_and_leaves_an_unhealthy_one_counted() {
    use init::stage2::stability::GateResult;
    use init::update::gate::{run_gate, Verdict};
    let m = Machine::new();
    let v2 = content(2, 150);
    publish(&m.releases, &m.key, "demo", "2", &v2);
    assert!(matches!(
        m.agent().apply(None, &mut |_| Ok(())).expect("apply"),
        Outcome::Staged { .. }
    ));
    let paths = m.agent().paths.clone();
    let definition = |m: &Machine| {
        let text = fs::read_to_string(m.dir.join("image.toml")).expect("definition");
        os_config::Definition::parse("image.toml", &text).expect("parses")
    };

    // Slot A's entry is good: no trial, the health check is never asked.
    let never = |_: Duration, _: Duration| -> anyhow::Result<GateResult> { panic!("not on trial") };
    assert_eq!(
        run_gate(&paths, &definition(&m), &never).expect("gate"),
        Verdict::NotOnTrial
    );

    // First try of v2 in slot B (systemd-boot counted it down): unhealthy leaves the counter.
    m.rename_entry("plinth-b-2+3.conf", "plinth-b-2+2-1.conf");
    m.boot(Slot::B, "2");
    let asked = std::cell::Cell::new(None);
    let unhealthy = |after: Duration, timeout: Duration| -> anyhow::Result<GateResult> {
        asked.set(Some((after, timeout)));
        Ok(GateResult::Unhealthy(
            "container web restarted 1 time".into(),
        ))
    };
    assert_eq!(
        run_gate(&paths, &definition(&m), &unhealthy).expect("gate"),
        Verdict::Unhealthy {
            slot: Slot::B,
            version: "2".into(),
            reason: "container web restarted 1 time".into()
        }
    );
    // No [update] bless times in this definition: os-config's defaults (30 s within 600 s).
    assert_eq!(
        asked.get(),
        Some((Duration::from_secs(30), Duration::from_secs(600)))
    );
    assert_eq!(m.entries(), ["plinth-a-1.conf", "plinth-b-2+2-1.conf"]);

    // Second try: healthy, blessed by renaming the entry without its counter.
    m.rename_entry("plinth-b-2+2-1.conf", "plinth-b-2+1-2.conf");
    let healthy =
        |_: Duration, _: Duration| -> anyhow::Result<GateResult> { Ok(GateResult::Healthy) };
    assert_eq!(
        run_gate(&paths, &definition(&m), &healthy).expect("gate"),
        Verdict::Blessed {
            slot: Slot::B,
            version: "2".into()
        }
    );
    assert_eq!(m.entries(), ["plinth-a-1.conf", "plinth-b-2.conf"]);
    m.fsck_esp();
    // Blessed now: the next boot of it is not on trial.
    assert_eq!(
        run_gate(&paths, &definition(&m), &never).expect("gate"),
        Verdict::NotOnTrial
    );
}

/// A FleetLock server on 127.0.0.1 that answers every request with `status` and `body`; returns
/// its URL and how many requests it answered.
fn lock_server(status: u16, body: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            log.lock().expect("log").push(line.trim().to_owned());
            // Read the whole request before answering: closing with unread bytes resets the
            // connection, and the client may see the reset before the answer.
            let mut length = 0usize;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
            }
            let _ = std::io::copy(&mut (&mut reader).take(length as u64), &mut std::io::sink());
            let _ = write!(
                &stream,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, seen)
}

#[test]
fn staged_updates_reboot_as_the_strategy_says() {
    use init::update::strategy::{decide, Decision};
    let m = Machine::new();
    fs::write(
        m.dir.join("machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .expect("machine-id");
    let with_update = |extra: &str| {
        let text = fs::read_to_string(m.dir.join("image.toml")).expect("definition");
        let text = text.replace("strategy = \"manual\"\n", extra);
        fs::write(m.dir.join("image.toml"), text).expect("definition");
        let agent = m.agent();
        m.boot(Slot::A, "1");
        agent
    };
    assert_eq!(decide(&m.agent()), Decision::Never, "manual");

    // A window that opened an hour ago and one that opens in an hour (UTC, every day).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let at = |secs: u64| format!("{:02}:{:02}", secs % 86_400 / 3600, secs % 3600 / 60);
    let open = with_update(&format!(
        "strategy = \"window\"\nwindow = {{ start = \"{}\", length = \"2h\" }}\n",
        at(now - 3600)
    ));
    assert_eq!(decide(&open), Decision::Reboot);
    let closed = with_update(&format!(
        "strategy = \"window\"\nwindow = {{ start = \"{}\", length = \"30m\" }}\n",
        at(now + 3600 + 60)
    ));
    match decide(&closed) {
        Decision::Wait { reason, retry } => {
            assert!(retry > Duration::from_secs(3600), "{retry:?}");
            assert!(retry <= Duration::from_secs(3600 + 120), "{retry:?}");
            assert!(reason.contains("maintenance window opens in"), "{reason}");
        }
        other => panic!("a closed window allowed {other:?}"),
    }

    // FleetLock: a full group waits, a granted slot reboots, no server waits too.
    let (full, seen) = lock_server(409, r#"{"kind":"failed_lock","value":"no slot left"}"#);
    let refused = with_update(&format!(
        "strategy = \"fleetlock\"\nfleetlock = {{ url = \"{full}\", group = \"workers\" }}\n"
    ));
    match decide(&refused) {
        Decision::Wait { reason, .. } => assert!(reason.contains("no slot left"), "{reason}"),
        other => panic!("a refused lock allowed {other:?}"),
    }
    assert_eq!(
        seen.lock().expect("log").as_slice(),
        ["POST /v1/pre-reboot HTTP/1.1"]
    );
    let (granting, _) = lock_server(200, "");
    let granted = with_update(&format!(
        "strategy = \"fleetlock\"\nfleetlock = {{ url = \"{granting}\" }}\n"
    ));
    assert_eq!(decide(&granted), Decision::Reboot);
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let gone = with_update(&format!(
        "strategy = \"fleetlock\"\nfleetlock = {{ url = \"http://127.0.0.1:{port}\" }}\n"
    ));
    assert!(matches!(decide(&gone), Decision::Wait { .. }));
}

// ---------------------------------------------------------------- delta updates

/// v1's root with 4096 bytes inserted at 600 kB and 10 bytes changed at 1 MB: everything after
/// the insertion shifts, as in a squashfs image where one file grew.
fn edited(v1: &Content) -> Content {
    let mut root = v1.root[..600_000].to_vec();
    root.extend_from_slice(&noise(9, 4096));
    root.extend_from_slice(&v1.root[600_000..]);
    root[1_000_000..1_000_010].copy_from_slice(&[0xaa; 10]);
    content_of(root, 2)
}

/// The chunks of `new`'s index that `old` lacks (each once), and their compressed bytes.
fn missing_chunks(old: &[u8], index: &os_config::chunk::ChunkIndex) -> (u64, u64) {
    let mut have = std::collections::HashSet::new();
    os_config::chunk::for_each_chunk(old, |_, chunk| {
        have.insert(os_config::chunk::digest(chunk));
        Ok(())
    })
    .expect("in memory");
    let mut counted = std::collections::HashSet::new();
    let (mut n, mut bytes) = (0, 0);
    for c in &index.chunks {
        if !have.contains(&c.sha256) && counted.insert(c.sha256) {
            n += 1;
            bytes += u64::from(c.compressed_length);
        }
    }
    (n, bytes)
}

fn read_index(dir: &Path, m: &Manifest) -> os_config::chunk::ChunkIndex {
    let file = m.root_chunks.as_ref().expect("index");
    os_config::chunk::ChunkIndex::parse(&fs::read(dir.join(&file.path)).expect("index file"))
        .expect("index parses")
}

/// Applies with a hook that records the delta report and the fallback reason.
fn apply_recording(
    agent: &Agent,
    mut also: impl FnMut(&Event),
) -> (
    anyhow::Result<Outcome>,
    Option<init::update::delta::Report>,
    Option<String>,
) {
    let mut report = None;
    let mut fallback = None;
    let outcome = agent.apply(None, &mut |event| {
        match event {
            Event::Delta(r) => report = Some(*r),
            Event::DeltaFallback { reason } => fallback = Some(reason.clone()),
            _ => {}
        }
        also(event);
        Ok(())
    });
    (outcome, report, fallback)
}

#[test]
fn a_delta_update_reuses_the_running_slots_chunks_and_downloads_only_the_others() {
    let m = Machine::new();
    let v2 = edited(&m.v1);
    let manifest = publish_chunked(&m.releases, &m.key, "2", &v2);
    let index = read_index(&m.releases, &manifest);
    let (missing, missing_bytes) = missing_chunks(&m.v1.root, &index);
    assert!(
        (1..=6).contains(&missing),
        "{missing} of {} chunks are new",
        index.chunks.len()
    );

    let (outcome, report, fallback) = apply_recording(&m.agent(), |_| {});
    assert_eq!(
        outcome.expect("apply"),
        Outcome::Staged {
            version: "2".into(),
            slot: Slot::B
        }
    );
    assert_eq!(fallback, None);
    let report = report.expect("a delta report");
    let index_size = manifest.root_chunks.as_ref().expect("index").size;
    assert_eq!(report.fetched, missing);
    assert_eq!(report.reused, index.chunks.len() as u64 - missing);
    assert_eq!(report.bytes, index_size + missing_bytes);
    assert_eq!(report.total_bytes, manifest.artifacts.root.size);
    assert!(
        report.bytes * 2 < report.total_bytes,
        "{} of {} bytes",
        report.bytes,
        report.total_bytes
    );
    assert!(report
        .status_line()
        .starts_with("PLINTH-STATUS update-delta reused="));
    // The whole root artifact was never asked for; each missing chunk once.
    assert!(m.server.requests(&manifest.artifacts.root.path).is_empty());
    assert_eq!(m.server.requests("/chunks/").len() as u64, missing + 1);
    m.assert_slot_b_holds(&v2, "2");
    assert_eq!(m.state().in_progress, None);
    assert!(
        !m.dir.join("var/lib/plinth/staging/chunks").exists(),
        "staged chunks are removed once the release is written"
    );
}

#[test]
fn chunks_read_from_the_running_slot_are_checked_again_and_downloaded_when_changed() {
    let m = Machine::new();
    let v2 = edited(&m.v1);
    let manifest = publish_chunked(&m.releases, &m.key, "2", &v2);
    let (missing, _) = missing_chunks(&m.v1.root, &read_index(&m.releases, &manifest));
    // After the running slot was chunked, its first block changes under the agent.
    let disk = m.disk.clone();
    let (outcome, report, _) = apply_recording(&m.agent(), |event| {
        if *event == Event::Stage(Stage::EntryRemoved) {
            let mut disk = Disk::open(&disk).expect("disk");
            let part = disk.partition("root-a").expect("root-a");
            disk.region(&part)
                .expect("region")
                .write_all(&[0u8; 4096])
                .expect("write");
        }
    });
    assert!(matches!(outcome.expect("apply"), Outcome::Staged { .. }));
    let report = report.expect("a delta report");
    assert_eq!(
        report.fetched,
        missing + 1,
        "the changed chunk is downloaded"
    );
    m.assert_slot_b_holds(&v2, "2");
}

#[test]
fn a_corrupted_or_missing_chunk_stops_the_delta_update_before_the_entry_is_written() {
    // A chunk whose bytes differ from the index: the release is refused, slot B stays without
    // an entry.
    let m = Machine::new();
    let v2 = edited(&m.v1);
    let manifest = publish_chunked(&m.releases, &m.key, "2", &v2);
    let index = read_index(&m.releases, &manifest);
    let mut have = std::collections::HashSet::new();
    os_config::chunk::for_each_chunk(&m.v1.root[..], |_, c| {
        have.insert(os_config::chunk::digest(c));
        Ok(())
    })
    .expect("in memory");
    let new_chunk = index
        .chunks
        .iter()
        .find(|c| !have.contains(&c.sha256))
        .expect("a new chunk");
    let path = m.releases.join(new_chunk.path());
    let mut bytes = fs::read(&path).expect("chunk");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    fs::write(&path, &bytes).expect("corrupt");
    // Slot B holds an older release with its entry: a refused release must leave both.
    m.write_entry("plinth-b-0.5.conf");
    let slot_b = m.slot_b_and_esp();
    let mut stages = Vec::new();
    let (outcome, _, _) = apply_recording(&m.agent(), |event| {
        if let Event::Stage(stage) = event {
            stages.push(*stage);
        }
    });
    let reason = refused_reason(outcome.expect("apply"));
    assert!(
        reason.contains(&new_chunk.path()) && reason.contains("of the root image"),
        "{reason}"
    );
    assert!(stages.is_empty(), "nothing written: {stages:?}");
    assert!(m.slot_b_and_esp() == slot_b, "slot B and the ESP unchanged");

    // A chunk missing on the server: a clear error, retried at the next check.
    let m = Machine::new();
    let manifest = publish_chunked(&m.releases, &m.key, "2", &v2);
    let index = read_index(&m.releases, &manifest);
    let gone = index
        .chunks
        .iter()
        .find(|c| !have.contains(&c.sha256))
        .expect("a new chunk");
    fs::remove_file(m.releases.join(gone.path())).expect("remove chunk");
    let mut stages = Vec::new();
    let (outcome, _, _) = apply_recording(&m.agent(), |event| {
        if let Event::Stage(stage) = event {
            stages.push(*stage);
        }
    });
    let err = format!("{:#}", outcome.expect_err("missing chunk"));
    assert!(
        err.contains("is missing on the server") && err.contains(&gone.path()),
        "{err}"
    );
    assert!(stages.is_empty(), "nothing written: {stages:?}");
    assert_eq!(m.entries(), ["plinth-a-1.conf"]);
    // Once the chunk is back, the next attempt restarts the delta and succeeds.
    builder::publish::store_chunks(&v2.root[..], &m.releases).expect("chunks again");
    let (outcome, report, _) = apply_recording(&m.agent(), |_| {});
    assert!(matches!(outcome.expect("apply"), Outcome::Staged { .. }));
    assert!(report.is_some());
    m.assert_slot_b_holds(&v2, "2");
}

#[test]
fn without_a_readable_running_slot_the_whole_root_image_is_downloaded() {
    let m = Machine::new();
    // The running slot's verity superblock is gone: its root image length is unknown.
    {
        let mut disk = Disk::open(&m.disk).expect("disk");
        let part = disk.partition("verity-a").expect("verity-a");
        disk.region(&part)
            .expect("region")
            .write_all(&[0u8; 512])
            .expect("write");
    }
    let v2 = edited(&m.v1);
    let manifest = publish_chunked(&m.releases, &m.key, "2", &v2);
    let (outcome, report, fallback) = apply_recording(&m.agent(), |_| {});
    assert!(matches!(outcome.expect("apply"), Outcome::Staged { .. }));
    assert_eq!(report, None);
    let fallback = fallback.expect("a fallback");
    assert!(fallback.contains("verity-a"), "{fallback}");
    assert_eq!(m.server.requests(&manifest.artifacts.root.path).len(), 1);
    m.assert_slot_b_holds(&v2, "2");
}

#[test]
fn an_interrupted_delta_update_restarts_and_a_written_root_is_not_written_again() {
    let m = Machine::new();
    let v2 = edited(&m.v1);
    publish_chunked(&m.releases, &m.key, "2", &v2);
    // Power cut half way through the root image.
    let outcome = m.agent().apply(None, &mut |event| match event {
        Event::Written {
            artifact: "root",
            bytes,
        } if *bytes > 500_000 => {
            anyhow::bail!("power cut")
        }
        _ => Ok(()),
    });
    assert!(outcome.is_err());
    assert_eq!(m.entries(), ["plinth-a-1.conf"]);
    assert_eq!(
        m.state().in_progress.expect("in progress").stage,
        Stage::EntryRemoved
    );
    // The chunks staged on /var are kept: the restart downloads only the index again.
    let chunk_requests = m.server.requests("/chunks/").len();
    // Power cut once the root is written: the next run does not write it again.
    let outcome = m.agent().apply(None, &mut |event| match event {
        Event::Stage(Stage::VerityWritten) => anyhow::bail!("power cut"),
        _ => Ok(()),
    });
    assert!(outcome.is_err());
    assert_eq!(m.server.requests("/chunks/").len(), chunk_requests + 1);
    let chunk_requests = m.server.requests("/chunks/").len();
    let (outcome, report, _) = apply_recording(&m.agent(), |event| {
        assert!(
            !matches!(
                event,
                Event::Written {
                    artifact: "root",
                    ..
                }
            ),
            "root written again"
        );
    });
    assert!(matches!(outcome.expect("apply"), Outcome::Staged { .. }));
    assert_eq!(report, None, "no delta: the root was already written");
    assert_eq!(m.server.requests("/chunks/").len(), chunk_requests);
    m.assert_slot_b_holds(&v2, "2");
}

// ---------------------------------------------------------------- installation

use init::update::fetch::Client;
use init::update::install::{self, Contents, InstallError, Reason, Request};

/// A fake `/sys/class/block` and `/dev` in a temporary folder, with file-backed disks.
struct Disks {
    dir: tempfile::TempDir,
    machine: install::Machine,
}

/// A disk of the fake machine: kernel name, size, PCI address, serial (virtio) or model and
/// serial (NVMe).
struct FakeDisk<'a> {
    name: &'a str,
    size: u64,
    pci: &'a str,
    serial: &'a str,
    model: &'a str,
    read_only: bool,
}

impl FakeDisk<'_> {
    fn virtio<'a>(name: &'a str, size: u64, pci: &'a str, serial: &'a str) -> FakeDisk<'a> {
        FakeDisk {
            name,
            size,
            pci,
            serial,
            model: "",
            read_only: false,
        }
    }
}

impl Disks {
    fn new(disks: &[FakeDisk]) -> Disks {
        let dir = tempfile::tempdir().expect("tempdir");
        let class = dir.path().join("sys/class/block");
        let dev = dir.path().join("dev");
        fs::create_dir_all(&class).expect("class");
        fs::create_dir_all(&dev).expect("dev");
        for d in disks {
            let parent = if d.name.starts_with("nvme") {
                format!("nvme/{}", d.name.split_once('n').map_or("", |(_, r)| r))
            } else {
                "virtio1".to_owned()
            };
            let block = dir.path().join(format!(
                "sys/devices/pci0000:00/{}/{parent}/block/{}",
                d.pci, d.name
            ));
            fs::create_dir_all(block.join("device")).expect("device");
            fs::write(block.join("size"), format!("{}\n", d.size / 512)).expect("size");
            fs::write(block.join("ro"), if d.read_only { "1\n" } else { "0\n" }).expect("ro");
            fs::write(block.join("device/serial"), format!("{}\n", d.serial)).expect("serial");
            if !d.model.is_empty() {
                fs::write(block.join("device/model"), format!("{}  \n", d.model)).expect("model");
            }
            // A partition, listed but never a target.
            let part = block.join(format!("{}1", d.name));
            fs::create_dir_all(&part).expect("partition");
            fs::write(part.join("partition"), "1\n").expect("partition");
            std::os::unix::fs::symlink(&block, class.join(d.name)).expect("link");
            std::os::unix::fs::symlink(&part, class.join(format!("{}1", d.name))).expect("link");
            fs::File::create(dev.join(d.name))
                .and_then(|f| f.set_len(d.size))
                .expect("disk file");
        }
        fs::create_dir_all(dir.path().join("sys/devices/virtual/block/loop0")).expect("loop");
        fs::write(
            dir.path().join("sys/devices/virtual/block/loop0/size"),
            "0\n",
        )
        .expect("size");
        std::os::unix::fs::symlink(
            dir.path().join("sys/devices/virtual/block/loop0"),
            class.join("loop0"),
        )
        .expect("link");
        let machine = install::Machine {
            sys_block: class,
            dev,
            in_use: Vec::new(),
            client: Client::default(),
        };
        Disks { dir, machine }
    }

    fn disk(&self, name: &str) -> PathBuf {
        self.machine.dev.join(name)
    }

    fn install(&self, target: &str, image: &str, sha256: &str, wipe: bool) -> Installed {
        let request = Request {
            target: target.to_owned(),
            image: image.to_owned(),
            sha256: Sha256::parse(sha256).expect("sha256"),
            wipe,
        };
        let mut lines = Vec::new();
        let result = install::install(&request, &self.machine, &mut |line| lines.push(line));
        Installed { result, lines }
    }
}

struct Installed {
    result: Result<install::Report, InstallError>,
    lines: Vec<String>,
}

impl Installed {
    fn events(&self) -> Vec<String> {
        self.lines
            .iter()
            .map(|l| os_config::status::parse(l).expect("status line").event)
            .collect()
    }

    fn failure(self) -> InstallError {
        match self.result {
            Ok(report) => panic!("installed: {report:?}"),
            Err(e) => e,
        }
    }
}

/// A 16 MiB Plinth-like disk image (protective MBR, primary and backup GPT with the Plinth
/// labels, data in some partitions, zeros elsewhere), compressed with its size in the frame
/// header. Returns the raw image, the compressed file and its sha256.
fn plinth_image(dir: &Path, labels: &[&str]) -> (Vec<u8>, PathBuf, String) {
    let raw_path = dir.join("image.raw");
    let size = 16 * MIB;
    fs::File::create(&raw_path)
        .and_then(|f| f.set_len(size))
        .expect("image file");
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&raw_path)
        .expect("open");
    gpt::mbr::ProtectiveMBR::with_lb_size((size / 512 - 1) as u32)
        .overwrite_lba0(&mut file)
        .expect("mbr");
    let mut table = gpt::GptConfig::new()
        .writable(true)
        .create_from_device(&mut file, Some(uuid::Uuid::from_u128(9)))
        .expect("gpt");
    for (i, name) in labels.iter().enumerate() {
        let size = if i == 0 { 4 * MIB } else { 2 * MIB };
        table
            .add_partition(name, size, gpt::partition_types::LINUX_FS, 0, Some(2048))
            .expect("partition");
    }
    table.write().expect("write gpt");
    let mut raw = fs::read(&raw_path).expect("read image");
    // Data in the first partition and in the middle of the third; zeros elsewhere.
    raw[(MIB as usize)..(MIB as usize + 300_000)].copy_from_slice(&noise(3, 300_000));
    raw[(8 * MIB as usize)..(8 * MIB as usize + 5000)].copy_from_slice(&noise(4, 5000));
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).expect("encoder");
    encoder
        .set_pledged_src_size(Some(raw.len() as u64))
        .expect("pledge");
    encoder.include_contentsize(true).expect("content size");
    encoder.write_all(&raw).expect("compress");
    let compressed = encoder.finish().expect("finish");
    let zst = dir.join("demo-1.raw.zst");
    fs::write(&zst, &compressed).expect("write zst");
    (raw, zst, hex::encode(sha2::Sha256::digest(&compressed)))
}

const PLINTH_LABELS: [&str; 6] = ["esp", "root-a", "verity-a", "root-b", "verity-b", "state"];

/// The disk holds the image and zeros after it.
fn assert_installed(disk: &Path, raw: &[u8]) {
    let written = fs::read(disk).expect("read disk");
    assert!(written[..raw.len()] == *raw, "the disk holds the image");
    assert!(
        written[raw.len()..].iter().all(|b| *b == 0),
        "the rest of the disk is zero"
    );
    let table = os_config::gpt::read(&mut fs::File::open(disk).expect("open")).expect("gpt");
    assert!(table.by_label("state").is_some());
}

/// Neither GPT nor boot sector is on the disk: its first and last MiB are zeros.
fn assert_unbootable(disk: &Path) {
    let written = fs::read(disk).expect("read disk");
    let mib = MIB as usize;
    assert!(written[..mib].iter().all(|b| *b == 0), "first MiB zeroed");
    assert!(
        written[written.len() - mib..].iter().all(|b| *b == 0),
        "last MiB zeroed"
    );
    assert!(os_config::gpt::read(&mut fs::File::open(disk).expect("open")).is_err());
}

#[test]
fn installs_an_image_over_http_and_from_a_file_on_the_first_empty_disks() {
    let disks = Disks::new(&[
        FakeDisk::virtio("vda", 64 * MIB, "0000:00:04.0", "one"),
        FakeDisk::virtio("vdb", 64 * MIB, "0000:00:05.0", "two"),
    ]);
    let releases = disks.dir.path().join("releases");
    fs::create_dir_all(&releases).expect("releases");
    let (raw, zst, sha) = plinth_image(&releases, &PLINTH_LABELS);
    let server = Server::start(releases);
    let url = format!("{}/demo-1.raw.zst", server.url);

    let installed = disks.install("first-empty", &url, &sha, false);
    let events = installed.events();
    let report = installed.result.expect("installed over http");
    assert_eq!(report.target, disks.disk("vda"));
    assert_eq!(report.bytes, raw.len() as u64);
    assert_installed(&disks.disk("vda"), &raw);
    assert_eq!(events.first().map(String::as_str), Some("install-start"));
    assert_eq!(events.last().map(String::as_str), Some("install-done"));
    assert!(events[1..events.len() - 1]
        .iter()
        .all(|e| e == "install-progress"));
    assert!(events.len() >= 3, "{events:?}");
    let start = os_config::status::parse(&installed.lines[0]).expect("start");
    assert_eq!(start.get("target"), disks.disk("vda").to_str());
    assert_eq!(start.get("size"), Some("67108864"));
    assert_eq!(start.get("image"), Some(url.as_str()));
    assert_eq!(start.get("image-size"), Some("16777216"));
    let last_progress =
        os_config::status::parse(&installed.lines[events.len() - 2]).expect("progress");
    assert_eq!(last_progress.get("percent"), Some("100"));
    assert_eq!(last_progress.get("written"), Some("16777216"));
    let done = os_config::status::parse(installed.lines.last().expect("done")).expect("done");
    assert_eq!(done.get("bytes"), Some("16777216"));

    // vda holds a GPT now: the next first-empty disk is vdb; the image is a local file.
    let file_url = format!("file://{}", zst.display());
    let report = disks
        .install("first-empty:32M", &file_url, &sha, false)
        .result
        .expect("installed from file://");
    assert_eq!(report.target, disks.disk("vdb"));
    assert_installed(&disks.disk("vdb"), &raw);

    // No empty disk is left: the refusal lists both, with what they hold.
    let e = disks
        .install("first-empty", &file_url, &sha, false)
        .failure();
    assert_eq!(e.reason, Reason::NoDisk);
    assert!(e.reason.refused());
    for part in [
        "install target `first-empty`",
        "vda (67108864 bytes): not empty: holds a GPT with partitions esp, root-a, verity-a, root-b, verity-b, state",
        "vdb (67108864 bytes): not empty",
        "virtual devices, never used: loop0",
    ] {
        assert!(e.message.contains(part), "{part}: {}", e.message);
    }
    assert!(e
        .status_line()
        .starts_with("PLINTH-STATUS install-failed reason=no-disk error=\""));
}

#[test]
fn a_disk_that_holds_data_is_refused_without_wipe_and_installed_with_it() {
    let disks = Disks::new(&[FakeDisk::virtio("vda", 64 * MIB, "0000:00:04.0", "one")]);
    let (raw, zst, sha) = plinth_image(disks.dir.path(), &PLINTH_LABELS);
    let disk = disks.disk("vda");
    let mut old = noise(7, 64 * MIB as usize);
    old[..2048].fill(0);
    old[1080..1082].copy_from_slice(&[0x53, 0xef]);
    fs::write(&disk, &old).expect("old data");

    let e = disks
        .install("/dev/vda", zst.to_str().expect("utf8"), &sha, false)
        .failure();
    assert_eq!(e.reason, Reason::DiskNotEmpty);
    assert!(e.message.contains("ext2/3/4 filesystem"), "{}", e.message);
    assert!(e.message.contains("--wipe"), "{}", e.message);
    assert!(fs::read(&disk).expect("read") == old, "nothing written");

    disks
        .install("vda", zst.to_str().expect("utf8"), &sha, true)
        .result
        .expect("installed with --wipe");
    let written = fs::read(&disk).expect("read");
    assert!(written[..raw.len()] == raw, "the image is on the disk");
    assert!(
        written[written.len() - MIB as usize..]
            .iter()
            .all(|b| *b == 0),
        "the old data at the disk's end (a stale backup GPT there) is zeroed"
    );
}

#[test]
fn a_wrong_sha256_leaves_the_disk_without_a_partition_table() {
    let disks = Disks::new(&[FakeDisk::virtio("vda", 64 * MIB, "0000:00:04.0", "one")]);
    let (raw, zst, _) = plinth_image(disks.dir.path(), &PLINTH_LABELS);
    let disk = disks.disk("vda");
    // An older installation is on the disk.
    let mut old = raw.clone();
    old.resize(64 * MIB as usize, 0);
    fs::write(&disk, &old).expect("old install");
    let wrong = "ab".repeat(32);
    let installed = disks.install("vda", zst.to_str().expect("utf8"), &wrong, true);
    let events = installed.events();
    let e = installed.failure();
    assert_eq!(e.reason, Reason::Sha256Mismatch);
    assert!(e.reason.refused(), "exit status 3");
    assert!(e.message.contains(&wrong), "{}", e.message);
    assert_eq!(events.first().map(String::as_str), Some("install-start"));
    assert!(!events.contains(&"install-done".to_owned()));
    assert_unbootable(&disk);
}

#[test]
fn a_download_cut_short_every_time_leaves_the_disk_without_a_partition_table() {
    let disks = Disks::new(&[FakeDisk::virtio("vda", 64 * MIB, "0000:00:04.0", "one")]);
    let releases = disks.dir.path().join("releases");
    fs::create_dir_all(&releases).expect("releases");
    let (_, zst, sha) = plinth_image(&releases, &PLINTH_LABELS);
    let len = fs::metadata(&zst).expect("zst").len() as usize;
    let server = Server::start(releases);
    server.control.lock().expect("lock").cut_always = Some(("demo-1.raw.zst".to_owned(), len / 2));
    let e = disks
        .install(
            "vda",
            &format!("{}/demo-1.raw.zst", server.url),
            &sha,
            false,
        )
        .failure();
    assert_eq!(e.reason, Reason::DownloadFailed);
    assert!(!e.reason.refused(), "exit status 1");
    assert_eq!(
        server.requests("demo-1.raw.zst").len(),
        1 + install::DOWNLOAD_RETRIES as usize,
        "started again from the beginning, then given up"
    );
    assert_unbootable(&disks.disk("vda"));
}

#[test]
fn an_image_without_the_plinth_partitions_is_never_made_bootable() {
    let disks = Disks::new(&[FakeDisk::virtio("vda", 64 * MIB, "0000:00:04.0", "one")]);
    let (_, zst, sha) = plinth_image(disks.dir.path(), &["esp", "data"]);
    let e = disks
        .install("vda", zst.to_str().expect("utf8"), &sha, false)
        .failure();
    assert_eq!(e.reason, Reason::NotAPlinthImage);
    assert!(
        e.message.contains("root-a, verity-a, state"),
        "{}",
        e.message
    );
    assert_unbootable(&disks.disk("vda"));
}

#[test]
fn an_image_larger_than_the_disk_is_refused_before_anything_is_written() {
    let disks = Disks::new(&[FakeDisk::virtio("vda", 8 * MIB, "0000:00:04.0", "one")]);
    let (_, zst, sha) = plinth_image(disks.dir.path(), &PLINTH_LABELS);
    let old = noise(5, 8 * MIB as usize);
    let mut old_zeroed = old.clone();
    old_zeroed[..MIB as usize].fill(0);
    fs::write(disks.disk("vda"), &old).expect("old data");
    let installed = disks.install("vda", zst.to_str().expect("utf8"), &sha, true);
    assert!(installed.lines.is_empty(), "{:?}", installed.lines);
    let e = installed.failure();
    assert_eq!(e.reason, Reason::TooSmall);
    assert!(e.message.contains("8388608 bytes"), "{}", e.message);
    assert!(
        fs::read(disks.disk("vda")).expect("read") == old,
        "nothing written"
    );
}

#[test]
fn targets_are_found_by_name_id_and_path_and_refusals_list_the_disks() {
    let mut disks = Disks::new(&[
        FakeDisk::virtio("vda", 64 * MIB, "0000:00:04.0", "boot disk"),
        FakeDisk::virtio("vdb", 8 * MIB, "0000:00:05.0", "small"),
        FakeDisk {
            read_only: true,
            ..FakeDisk::virtio("vdc", 64 * MIB, "0000:00:06.0", "cdrom")
        },
        FakeDisk {
            model: "QEMU NVMe Ctrl",
            ..FakeDisk::virtio("nvme0n1", 64 * MIB, "0000:00:07.0", "deadbeef")
        },
    ]);
    disks.machine.in_use = vec!["vda".to_owned()];
    let chosen = |spec: &str| {
        install::resolve(spec, &disks.machine)
            .map(|c| c.name)
            .map_err(|e| (e.reason, e.message))
    };
    assert_eq!(chosen("vdb"), Ok("vdb".to_owned()));
    assert_eq!(chosen("/dev/vdb"), Ok("vdb".to_owned()));
    assert_eq!(chosen("/dev/disk/by-id/virtio-small"), Ok("vdb".to_owned()));
    assert_eq!(
        chosen("/dev/disk/by-path/pci-0000:00:05.0"),
        Ok("vdb".to_owned())
    );
    assert_eq!(
        chosen("/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_deadbeef"),
        Ok("nvme0n1".to_owned())
    );
    assert_eq!(
        chosen("/dev/disk/by-path/pci-0000:00:07.0-nvme-1"),
        Ok("nvme0n1".to_owned())
    );
    // First-empty in kernel name order, skipping what is in use, read-only or too small.
    assert_eq!(chosen("first-empty"), Ok("nvme0n1".to_owned()));
    std::os::unix::fs::FileExt::write_all_at(
        &fs::OpenOptions::new()
            .write(true)
            .open(disks.disk("nvme0n1"))
            .expect("open"),
        b"XFSB",
        0,
    )
    .expect("xfs");
    assert_eq!(chosen("first-empty"), Ok("vdb".to_owned()));
    let (reason, message) = chosen("first-empty:16M").expect_err("nothing fits");
    assert_eq!(reason, Reason::NoDisk);
    for part in [
        "install target `first-empty:16M`: no disk can be used",
        "nvme0n1 (67108864 bytes): not empty: holds an xfs filesystem",
        "vda (67108864 bytes): in use by the running system",
        "vdb (8388608 bytes): smaller than 16777216 bytes",
        "vdc (67108864 bytes): read-only",
    ] {
        assert!(message.contains(part), "{part}: {message}");
    }
    // A named disk may hold data (--wipe decides); a disk in use, a partition or a missing
    // name is refused.
    let held = install::resolve("nvme0n1", &disks.machine).expect("named");
    assert_eq!(
        held.contents,
        Contents::Holds("an xfs filesystem".to_owned())
    );
    let (_, message) = chosen("/dev/vda").expect_err("in use");
    assert!(
        message.contains("vda (67108864 bytes): in use by the running system"),
        "{message}"
    );
    let (_, message) = chosen("vdb1").expect_err("partition");
    assert!(
        message.contains("vdb1 is a partition; name a whole disk"),
        "{message}"
    );
    let (_, message) = chosen("loop0").expect_err("loop");
    assert!(message.contains("loop0 is a virtual device"), "{message}");
    let (_, message) = chosen("/dev/disk/by-id/virtio-nope").expect_err("no such id");
    assert!(
        message.contains("vdb (8388608 bytes): not named so"),
        "{message}"
    );
}

#[test]
fn the_command_line_takes_install_options_only_for_install() {
    use init::update::command::{parse_args, Command as Cmd, Parsed};
    let parse = |args: &[&str]| parse_args(args.iter().map(|a| a.to_string()));
    let sha = "0".repeat(64);
    let Parsed::Run(args) = parse(&[
        "install",
        "--target",
        "first-empty:8G",
        "--image",
        "http://h/i.raw.zst",
        "--sha256",
        &sha,
        "--wipe",
    ])
    .expect("parses") else {
        panic!("help");
    };
    assert_eq!(args.command, Cmd::Install);
    let request = args.install.expect("request");
    assert_eq!(
        (
            request.target.as_str(),
            request.image.as_str(),
            request.wipe
        ),
        ("first-empty:8G", "http://h/i.raw.zst", true)
    );
    for (args, message) in [
        (
            &["install", "--target", "vda"][..],
            "install needs --target, --image and --sha256",
        ),
        (
            &["status", "--wipe"][..],
            "--target, --image, --sha256 and --wipe are only for install",
        ),
        (
            &[
                "install", "--target", "vda", "--image", "/i", "--sha256", "xyz",
            ][..],
            "--sha256: invalid sha256 `xyz`",
        ),
    ] {
        let text = format!("{:#}", parse(args).expect_err("refused"));
        assert!(text.starts_with(message), "{args:?}: {text}");
    }
}
