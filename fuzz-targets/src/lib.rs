//! Fuzz targets for Plinth's parsers of untrusted bytes: one function per target, each taking
//! the fuzzer's input. A target must not panic on any input; the parser under test may return an
//! error, and when it succeeds the target checks cheap invariants (round trips through the
//! matching writer, lengths inside what was read). `fuzz/afl` drives them under AFL++ and
//! `tests/replay.rs` runs the committed corpora and crash regressions through them.
//!
//! A failed invariant panics on purpose: that is the crash the fuzzer reports.

pub mod disk;

use std::io::{BufReader, Cursor, Read};
use std::sync::OnceLock;
use std::time::Instant;

use init::http;
use init::stage2::docker::{self, ContainerDetails, ContainerSummary, ImageDetails, Version};
use init::stage2::net::dhcp::{Lease, Packet};
use os_config::boot::{BootArgs, BootRecord, Entry, EntryName};
use os_config::cmdline::{format_arg, Cmdline};
use os_config::layout::VeritySuperblock;
use os_config::manifest::{self, Manifest, SecretKey};
use os_config::userdata::{self, UserDataKind};
use os_config::Definition;

/// A fuzz target: takes any bytes, panics only when an invariant of the code under test fails.
pub type Target = fn(&[u8]);

/// Every target by name, as `scripts/fuzz.sh`, the AFL++ binaries and the replay test name them
/// (the folder names under `fuzz/corpus/` and `fuzz/regressions/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("definition", definition),
    ("manifest", manifest),
    ("gpt", gpt),
    ("verity", verity),
    ("boot-entry", boot_entry),
    ("cmdline", cmdline),
    ("dhcp", dhcp),
    ("http", http),
    ("engine", engine),
    ("tar", tar),
    ("chunk-index", chunk_index),
    ("userdata", userdata),
];

/// The target called `name`.
pub fn by_name(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// An image definition: UTF-8, then parse and validate (`os_config::Definition::parse`).
pub fn definition(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(definition) = Definition::parse("fuzz.toml", text) else {
        return;
    };
    let _ = definition.hostname();
    for container in &definition.containers {
        for port in &container.ports {
            let _ = os_config::definition::parse_port(port);
            let _ = os_config::definition::published_port(port);
        }
    }
    // Parsing is a function of the text alone.
    let again = Definition::parse("fuzz.toml", text);
    assert!(again.is_ok(), "a definition parsed once but not twice");
}

/// The image definition the `userdata` target lays user data over: a host name, engine settings,
/// two containers, `[update]` (its key is the public half of [`manifest_key`]) and `[time]`.
pub const USERDATA_IMAGE: &str = r#"[image]
name = "fuzz"
version = "1.0"
hostname = "fuzz-host"

[engine]
settings = { log-driver = "local", debug = false }

[update]
url = "http://10.0.0.1/releases"
keys = ["ed25519:ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c"]
strategy = "window"
window = { start = "02:00", length = "1h" }

[time]
servers = ["10.0.2.2"]

[[container]]
name = "web"
image = "busybox:1"
ports = ["8080:80"]

[[container]]
name = "db"
image = "postgres:16"
"#;

/// [`USERDATA_IMAGE`], parsed once.
pub fn userdata_image() -> &'static Definition {
    static IMAGE: OnceLock<Definition> = OnceLock::new();
    IMAGE.get_or_init(|| {
        Definition::parse("userdata-image.toml", USERDATA_IMAGE)
            .unwrap_or_else(|e| panic!("the userdata target's image does not parse: {e}"))
    })
}

/// Cloud user data (`os_config::userdata::classify`), and Plinth's own laid over
/// [`USERDATA_IMAGE`] (`UserData::apply`): what applies is a valid definition whose update
/// source and trusted keys are the image's, and every error says something.
pub fn userdata(data: &[u8]) {
    let kind = match userdata::classify("user-data", data) {
        Ok(kind) => kind,
        Err(e) => {
            assert!(
                !e.message.trim().is_empty(),
                "user data refused without a message"
            );
            return;
        }
    };
    let parsed = match kind {
        UserDataKind::Plinth(parsed) => parsed,
        UserDataKind::Foreign(name) => {
            assert!(!name.is_empty(), "foreign user data without a kind");
            return;
        }
        UserDataKind::Empty => return,
    };
    let image = userdata_image();
    let merged = match parsed.apply(image) {
        Ok(merged) => merged,
        Err(message) => {
            // `key.path: what is wrong`: the part after the key must say something.
            let what = message
                .split_once(": ")
                .map_or(message.as_str(), |(_, m)| m);
            assert!(
                !what.trim().is_empty(),
                "user data not applied, without a message: {message:?}"
            );
            return;
        }
    };
    if let Err(problem) = os_config::validate::definition(&merged) {
        panic!("applied user data gives an invalid definition: {problem:?}");
    }
    let source = |d: &Definition| d.update.as_ref().map(|u| (u.url.clone(), u.keys.clone()));
    assert_eq!(
        source(&merged),
        source(image),
        "user data changed where updates come from or which keys are trusted"
    );
}

/// Key the `manifest` target signs with (a fixed seed: fuzzing needs no secret).
fn manifest_key() -> SecretKey {
    SecretKey::from_seed([7; 32])
}

/// A signed manifest: the input is the manifest bytes, then optionally a NUL and the detached
/// signature. Without a NUL the target signs the manifest itself, so the fuzzer reaches the
/// parser behind the signature check.
pub fn manifest(data: &[u8]) {
    let key = manifest_key();
    let keys = [key.public()];
    let (bytes, signature) = match data.iter().position(|b| *b == 0) {
        Some(nul) => (&data[..nul], data[nul + 1..].to_vec()),
        None => (data, key.sign(data).into_bytes()),
    };
    if let Ok(text) = std::str::from_utf8(&signature) {
        let _ = manifest::PublicKey::parse(text);
        let _ = SecretKey::parse(text);
    }
    let Ok(parsed) = manifest::verify_signed(bytes, &signature, &keys) else {
        let _ = Manifest::parse(bytes);
        return;
    };
    // What an agent does with an accepted manifest.
    if let Some(rollout) = &parsed.rollout {
        let _ = rollout.due("machine-id", &parsed.version);
    }
    let running = manifest::Running {
        name: &parsed.name,
        channel: &parsed.channel,
        version: &parsed.version,
    };
    assert!(
        manifest::acceptable(&parsed, &running, None, &[]).is_err(),
        "a manifest is acceptable over its own version"
    );
    let _ = manifest::verity_size(parsed.data_blocks);
    // The canonical bytes parse back to the same manifest and carry a signature that verifies.
    let canonical = parsed.to_bytes();
    let signature = key.sign(&canonical);
    let again = manifest::verify_signed(&canonical, signature.as_bytes(), &keys)
        .unwrap_or_else(|e| panic!("canonical bytes of a manifest do not read back: {e}"));
    assert_eq!(again, parsed, "manifest round trip");
}

/// A GPT disk made from the input by [`disk::SparseDisk::from_fuzz`], read by
/// `os_config::gpt::read`.
pub fn gpt(data: &[u8]) {
    let mut disk = disk::SparseDisk::from_fuzz(data);
    let len = disk.len();
    let Ok(table) = os_config::gpt::read(&mut disk) else {
        return;
    };
    let sector = table.sector_size;
    assert!(sector == 512 || sector == 4096, "sector size {sector}");
    for p in &table.partitions {
        assert!(
            p.first_lba <= p.last_lba,
            "partition {} ends before it starts",
            p.number
        );
        assert_eq!(
            p.start,
            p.first_lba * sector,
            "start of partition {}",
            p.number
        );
        assert_eq!(
            p.size,
            (p.last_lba - p.first_lba + 1) * sector,
            "size of partition {}",
            p.number
        );
        assert!(
            p.start + p.size <= len,
            "partition {} ends past the disk",
            p.number
        );
        assert!(
            p.number >= 1 && p.number <= table.header.entry_count,
            "partition number {}",
            p.number
        );
    }
    if let Some(first) = table.partitions.first() {
        assert_eq!(
            table.by_label(&first.label).map(|p| p.label.as_str()),
            Some(first.label.as_str())
        );
    }
}

/// A verity partition: the superblock parser (`os_config::layout::VeritySuperblock`) and the
/// builder's offline check (`plinth verify`, `builder::disk::verity::verify`) of a root whose
/// data is the input after its first 4 KiB, against the input as the hash device.
pub fn verity(data: &[u8]) {
    if let Ok(sb) = VeritySuperblock::parse(data) {
        let bytes = sb.to_bytes();
        let again = VeritySuperblock::parse(&bytes)
            .unwrap_or_else(|e| panic!("a written superblock does not read back: {e}"));
        assert_eq!(again, sb, "superblock round trip");
        let _ = sb.table("/dev/data", "/dev/hash", "00", &["restart_on_corruption"]);
    }
    let root_data = data.get(4096..).unwrap_or_default();
    let expected_root = "0".repeat(64);
    let _ = builder::disk::verity::verify(&mut Cursor::new(root_data), data, &expected_root);
}

/// A chunk index of a delta update (`os_config::chunk::ChunkIndex::parse`): what parses writes
/// back to the same bytes, and its chunks cover the image without gaps within the size bounds.
pub fn chunk_index(data: &[u8]) {
    use os_config::chunk::{ChunkIndex, MAX_CHUNK};
    let Ok(index) = ChunkIndex::parse(data) else {
        return;
    };
    assert_eq!(index.to_bytes(), data, "chunk index round trip");
    let mut at = 0u64;
    for c in &index.chunks {
        assert_eq!(c.offset, at, "chunks follow each other");
        assert!(
            c.length as usize <= MAX_CHUNK && c.length > 0,
            "chunk length"
        );
        at += u64::from(c.length);
    }
    assert_eq!(at, index.total_length());
}

/// Boot entries: the file name (first line), the entry text (all of it) and the boot record
/// (all of it, as JSON) of `os_config::boot`.
pub fn boot_entry(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let first_line = text.lines().next().unwrap_or_default();
    if let Some(name) = EntryName::parse(first_line) {
        let file_name = name.file_name();
        assert_eq!(
            EntryName::parse(&file_name),
            Some(name.clone()),
            "entry name round trip"
        );
        let _ = (name.state(), name.running_state(), name.esp_path());
        assert_eq!(
            EntryName::parse(&name.blessed().file_name()),
            Some(name.blessed())
        );
    }
    if let Ok(entry) = Entry::parse(&text) {
        let formatted = entry.format();
        let again = Entry::parse(&formatted)
            .unwrap_or_else(|e| panic!("a formatted entry does not read back: {e}\n{formatted}"));
        assert_eq!(again.format(), formatted, "boot entry round trip");
    }
    let _ = BootArgs::from_cmdline(&text);
    if let Ok(record) = BootRecord::parse(&text) {
        if let Ok(json) = record.to_json() {
            assert_eq!(
                BootRecord::parse(&json),
                Ok(record),
                "boot record round trip"
            );
        }
    }
}

/// A kernel command line (`os_config::cmdline`): split, then arguments without quotes written
/// back with `format_arg` split the same way.
pub fn cmdline(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let parsed = Cmdline::parse(&text);
    for (key, _) in parsed.args() {
        assert!(!key.is_empty(), "empty key");
        assert!(
            parsed.has(key) && parsed.value(key).is_some(),
            "key {key:?} not found"
        );
    }
    let plain: Vec<(String, Option<String>)> = parsed
        .args()
        .iter()
        // The kernel has no escape for a quote, and `format_arg` writes values, not keys.
        .filter(|(k, v)| {
            !k.contains(|c: char| c == '"' || c.is_ascii_whitespace() || c == '\x0b')
                && !v.as_deref().unwrap_or("").contains('"')
        })
        .cloned()
        .collect();
    let written: Vec<String> = plain
        .iter()
        .map(|(k, v)| format_arg(k, v.as_deref()))
        .collect();
    let again = Cmdline::parse(&written.join(" "));
    assert_eq!(again.args(), plain.as_slice(), "command line round trip");
    let _ = BootArgs::from_args(&parsed);
}

/// A DHCP reply (`init::stage2::net::dhcp`): decode, re-encode, and read a lease from an ACK.
pub fn dhcp(data: &[u8]) {
    let Ok(packet) = Packet::decode(data) else {
        return;
    };
    let _ = packet.message_type();
    let encoded = packet.encode();
    let again = Packet::decode(&encoded)
        .unwrap_or_else(|e| panic!("an encoded packet does not decode: {e}"));
    // Options with an empty value are not written (no server sends one the client reads).
    let mut expected = packet.clone();
    expected.options.retain(|(_, value)| !value.is_empty());
    assert_eq!(again, expected, "DHCP packet round trip");
    if let Ok(lease) = Lease::from_ack(&packet, Instant::now()) {
        assert!(lease.prefix <= 32, "prefix {}", lease.prefix);
        assert!(
            lease.renew_at() <= lease.expires_at(),
            "renewal after expiry"
        );
        assert!(
            lease.rebind_at() <= lease.expires_at(),
            "rebinding after expiry"
        );
    }
}

/// Largest body the `http` target reads whole.
const HTTP_LIMIT: u64 = 1 << 20;

/// An HTTP response (`init::http`) from an in-memory peer: read whole (bounded), and streamed
/// through [`http::Body`]. The first byte chooses whether it answers a `HEAD` request and how
/// small the reads are.
pub fn http(data: &[u8]) {
    let Some((&control, response)) = data.split_first() else {
        return;
    };
    let head_request = control & 1 != 0;
    let capacity = 1 + usize::from(control >> 1);
    let mut reader = BufReader::with_capacity(capacity, response);
    if let Ok(whole) = http::read_response(&mut reader, head_request, HTTP_LIMIT) {
        assert!(whole.body.len() as u64 <= HTTP_LIMIT, "body over the limit");
        if let Some(length) = whole.headers.get("content-length") {
            let chunked = whole
                .headers
                .get("transfer-encoding")
                .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
            let no_body = head_request
                || whole.status == 204
                || whole.status == 304
                || (100..200).contains(&whole.status);
            if !chunked && !no_body {
                assert_eq!(
                    length.parse::<u64>().ok(),
                    Some(whole.body.len() as u64),
                    "body length differs from Content-Length"
                );
            }
        }
    }
    let mut reader = BufReader::with_capacity(capacity, response);
    let Ok(head) = http::read_head(&mut reader) else {
        return;
    };
    let Ok(body) = http::Body::new(&mut reader, &head, head_request) else {
        return;
    };
    let mut sink = Vec::new();
    let _ = body.take(HTTP_LIMIT).read_to_end(&mut sink);
}

/// Engine API answers (`init::stage2::docker`): the input as the body of each JSON answer Plinth
/// reads (version, container list, container and image inspection, error bodies, progress
/// streams), and as a whole HTTP response read the way the engine client reads one.
pub fn engine(data: &[u8]) {
    let _ = serde_json::from_slice::<Version>(data);
    if let Ok(list) = serde_json::from_slice::<Vec<ContainerSummary>>(data) {
        for container in &list {
            let _ = container.name();
        }
    }
    let _ = serde_json::from_slice::<ContainerDetails>(data);
    let _ = serde_json::from_slice::<ImageDetails>(data);
    let _ = docker::stream_messages("fuzzing", data);
    let response = docker::Response {
        status: 500,
        headers: Default::default(),
        body: data.to_vec(),
    };
    let _ = docker::error_message(&response);
    if let Ok(text) = std::str::from_utf8(data) {
        let (repository, tag) = docker::split_reference(text);
        assert!(
            text.starts_with(repository),
            "repository of {text:?} is {repository:?}"
        );
        assert!(
            text.ends_with(tag) || tag == "latest",
            "tag of {text:?} is {tag:?}"
        );
        let _ = docker::query_escape(text);
    }
    if let Ok(response) = http::read_response(&mut Cursor::new(data), false, HTTP_LIMIT) {
        if let Ok(list) = serde_json::from_slice::<Vec<ContainerSummary>>(&response.body) {
            let _ = list.first().and_then(ContainerSummary::name);
        }
        let _ = docker::error_message(&response);
    }
}

/// A tar archive: the `docker save` reader the engine's image loading uses
/// (`init::stage2::containers::archive_image`), and the `.deb` data extraction of the builder
/// (`builder::rootfs::deb::unpack`, into a temporary folder), whose written paths must all be
/// plain relative paths inside it.
pub fn tar(data: &[u8]) {
    if let Ok((id, _tags)) =
        init::stage2::containers::archive_image(&mut Cursor::new(data), "busybox:latest")
    {
        assert!(id.starts_with("sha256:") && id.len() == 71, "image id {id}");
    }
    // A GNU sparse member may claim terabytes of holes: the builder only unpacks verified
    // Debian packages, and the fuzzer must not fill the disk it runs on.
    let mut scan = ::tar::Archive::new(data);
    let sparse = scan.entries().is_ok_and(|mut entries| {
        entries.any(|e| e.is_ok_and(|e| e.header().entry_type().is_gnu_sparse()))
    });
    if sparse {
        return;
    }
    let Ok(dest) = tempfile::tempdir() else {
        return;
    };
    if let Ok(written) = builder::rootfs::deb::unpack(data, dest.path()) {
        for path in &written {
            assert!(
                !path.starts_with('/') && !path.split('/').any(|c| c == ".." || c.is_empty()),
                "unpack wrote outside its folder: {path:?}"
            );
        }
    }
}
