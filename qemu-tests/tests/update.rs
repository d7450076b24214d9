//! A/B updates under QEMU (OVMF, TCG), with releases served by a static HTTP server on 127.0.0.1
//! that the guest reaches through `guestfwd`. Power cuts: a release signed with another key is
//! refused; power cuts mid-download, mid-write, after the partition write, mid-ESP write and just
//! before the reboot each leave a machine that boots slot A and whose agent carries on with the
//! update; v1 → v2 (slot B) is blessed (that release offers no chunk index: the whole artifacts,
//! so the download can be stalled). Bless and rollback, beside it from a v2 disk: v2 → v3
//! (slot B, blessed) as a delta update (v3 adds one `[[file]]`; the agent downloads only the
//! chunks of v3's root that v2's lacks, checked against both chunk indexes); a tampered v4 is refused before anything is written; a v4 whose container
//! exits at once is tried three times, never blessed, rolled back to v3 by itself, marked bad and
//! never downloaded again.
//! Offline: releases on ext4 and FAT disks are applied with `plinth-update apply --from /dev/…`,
//! and a lower version, another image's release and a flipped artifact byte are refused with
//! nothing staged.
//! FleetLock, over HTTPS with a test CA given through `[update] ca`: an expired manifest is refused
//! without a download and a root artifact longer than its manifest says is refused; a staged update
//! waits while the lock server's group is full, reboots once it grants a slot, and gives the slot
//! back after the bless.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use builder::publish::Expiry;
use os_config::manifest::{self, Manifest};
use qemu_tests::series::{
    build, build_version, definition, trusted_key, GUEST_SERVER, STAGE_DELAY_MS, TRUSTED_KEY,
};
use qemu_tests::{image, parse_status, Vm, VmOptions};

/// One boot, from QEMU start (or a reboot) to the bless, under TCG on a busy machine.
const BOOT: Duration = Duration::from_secs(420);
/// A minimal static file server for the release folder, switchable to another folder (publishing
/// a new release), logging every request path, and able to stall one download midway.
struct Server {
    root: Arc<Mutex<PathBuf>>,
    log: Arc<Mutex<Vec<(Instant, String)>>>,
    stall: Arc<Stall>,
    port: u16,
}

/// A download the server holds back: after `after` bytes of `path` it sends nothing more until
/// released, as a stalled network would.
#[derive(Default)]
struct Stall {
    state: Mutex<StallState>,
    changed: Condvar,
}

#[derive(Default)]
struct StallState {
    path: Option<String>,
    after: u64,
    reached: bool,
}

impl Server {
    /// A plain HTTP server.
    fn start(root: &Path) -> Result<Server> {
        Server::start_with(root, None)
    }

    /// An HTTPS server with `tls` (every guest connection a TLS session of its own, one after
    /// the other on the stream QEMU's `guestfwd` keeps open).
    fn start_tls(root: &Path, tls: Arc<rustls::ServerConfig>) -> Result<Server> {
        Server::start_with(root, Some(tls))
    }

    fn start_with(root: &Path, tls: Option<Arc<rustls::ServerConfig>>) -> Result<Server> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the release server")?;
        let port = listener.local_addr()?.port();
        let root = Arc::new(Mutex::new(root.to_path_buf()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stall = Arc::new(Stall::default());
        let (r, l, st) = (Arc::clone(&root), Arc::clone(&log), Arc::clone(&stall));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (r, l, st) = (Arc::clone(&r), Arc::clone(&l), Arc::clone(&st));
                let tls = tls.clone();
                std::thread::spawn(move || {
                    let served = match &tls {
                        None => serve(stream, &r, &l, &st),
                        Some(config) => {
                            qemu_tests::tls::serve_sessions(stream, config, |session| {
                                serve(session, &r, &l, &st)
                            })
                        }
                    };
                    if let Err(e) = served {
                        eprintln!("release server: {e:#}");
                    }
                });
            }
        });
        Ok(Server {
            root,
            log,
            stall,
            port,
        })
    }

    /// From now on, a download of `path` stops after `after` bytes until [`Server::release`].
    fn stall(&self, path: &str, after: u64) {
        if let Ok(mut state) = self.stall.state.lock() {
            *state = StallState {
                path: Some(path.to_owned()),
                after,
                reached: false,
            };
        }
    }

    /// Waits until a download has reached the stall point.
    fn wait_stalled(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut state = self
            .stall
            .state
            .lock()
            .map_err(|_| anyhow::anyhow!("stall lock poisoned"))?;
        while !state.reached {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(!left.is_zero(), "no download reached the stall point");
            state = self
                .stall
                .changed
                .wait_timeout(state, left)
                .map_err(|_| anyhow::anyhow!("stall lock poisoned"))?
                .0;
        }
        Ok(())
    }

    /// Lets a stalled download go on (to a guest that may be gone).
    fn release(&self) {
        if let Ok(mut state) = self.stall.state.lock() {
            *state = StallState::default();
        }
        self.stall.changed.notify_all();
    }

    /// Serves `root` from now on.
    fn publish(&self, root: &Path) {
        if let Ok(mut current) = self.root.lock() {
            *current = root.to_path_buf();
        }
    }

    /// Request paths since `since`.
    fn requests_since(&self, since: Instant) -> Vec<String> {
        self.log.lock().map_or_else(
            |_| Vec::new(),
            |log| {
                log.iter()
                    .filter(|(t, _)| *t >= since)
                    .map(|(_, p)| p.clone())
                    .collect()
            },
        )
    }
}

/// Answers the GET requests arriving on one connection (or TLS session), one after the other.
/// QEMU's `guestfwd` connects once to this server and carries every guest connection over that
/// one stream, so it is never closed from this side and every response has a `Content-Length`.
fn serve(
    stream: impl Read + Write,
    root: &Mutex<PathBuf>,
    log: &Mutex<Vec<(Instant, String)>>,
    stall: &Stall,
) -> Result<()> {
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader)? {
        let path = &request.path;
        let offset = request
            .header("range")
            .and_then(|v| v.strip_prefix("bytes="))
            .and_then(|v| v.strip_suffix('-'))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0u64);
        if let Ok(mut log) = log.lock() {
            log.push((Instant::now(), path.clone()));
        }
        respond(reader.get_mut(), root, path, offset, stall)?;
    }
    Ok(())
}

/// One HTTP request: its path, its headers (names in lowercase) and its body.
struct Request {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads the next request of a connection (the body by its `Content-Length`); `None` once the
/// peer has closed it.
fn read_request(reader: &mut impl BufRead) -> Result<Option<Request>> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let path = line
        .split_whitespace()
        .nth(1)
        .context("request line without a path")?
        .to_owned();
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let mut request = Request {
        path,
        headers,
        body: Vec::new(),
    };
    let length = request
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0usize);
    request.body = vec![0u8; length];
    reader.read_exact(&mut request.body)?;
    Ok(Some(request))
}

fn respond(
    out: &mut impl Write,
    root: &Mutex<PathBuf>,
    path: &str,
    offset: u64,
    stall: &Stall,
) -> Result<()> {
    let dir = root
        .lock()
        .map_err(|_| anyhow::anyhow!("root lock poisoned"))?
        .clone();
    let relative = path.trim_start_matches('/');
    let file = (!relative.split('/').any(|p| p == ".."))
        .then(|| std::fs::File::open(dir.join(relative)).ok())
        .flatten()
        .filter(|f| f.metadata().is_ok_and(|m| m.is_file()));
    let Some(mut file) = file else {
        out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
        return Ok(());
    };
    let len = file.metadata()?.len();
    let start = if offset > 0 && offset < len {
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(offset))?;
        write!(
            out,
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {offset}-{}/{len}\r\n\r\n",
            len - offset,
            len - 1
        )?;
        offset
    } else {
        write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n")?;
        0
    };
    let held_at = stall
        .state
        .lock()
        .ok()
        .and_then(|s| (s.path.as_deref() == Some(path) && s.after > start).then_some(s.after));
    if let Some(after) = held_at {
        std::io::copy(&mut (&mut file).take(after - start), out)?;
        out.flush()?;
        let mut state = stall
            .state
            .lock()
            .map_err(|_| anyhow::anyhow!("stall lock poisoned"))?;
        state.reached = true;
        stall.changed.notify_all();
        while state.path.as_deref() == Some(path) {
            state = stall
                .changed
                .wait(state)
                .map_err(|_| anyhow::anyhow!("stall lock poisoned"))?;
        }
    }
    std::io::copy(&mut file, out)?;
    out.flush()?;
    Ok(())
}

/// Publishes a built disk into a release folder of its own.
fn publish(def_text: &str, raw: &Path, key: &Path, to: &Path, dir: &Path) -> Result<Manifest> {
    publish_expiring(def_text, raw, key, to, dir, Expiry::default())
}

/// [`publish`] with the manifest's expiry given.
fn publish_expiring(
    def_text: &str,
    raw: &Path,
    key: &Path,
    to: &Path,
    dir: &Path,
    expires: Expiry,
) -> Result<Manifest> {
    let def = dir.join("publish.toml");
    std::fs::write(&def, def_text)?;
    builder::publish::publish(&builder::publish::Options {
        file: def,
        key: key.to_path_buf(),
        to: to.to_path_buf(),
        disk: Some(raw.to_path_buf()),
        rollout: None,
        expires,
    })?;
    let bytes = std::fs::read(to.join("stable").join(manifest::MANIFEST_FILE))?;
    Manifest::parse(&bytes).context("reading back the published manifest")
}

/// Copies a release folder (hard links: artifacts are never rewritten).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let status = std::process::Command::new("cp")
        .args(["-al"])
        .arg(from)
        .arg(to)
        .status()
        .context("running cp -al")?;
    ensure!(status.success(), "copying {} failed", from.display());
    Ok(())
}

/// A slot of a disk as the host reads it: the sha256 of its root and verity partitions, their
/// partition UUIDs, and its boot entries.
#[derive(Debug, PartialEq, Eq)]
struct SlotContent {
    sha256: String,
    uuids: Vec<String>,
    entries: Vec<String>,
}

fn slot_content(disk: &Path, slot: &str) -> Result<SlotContent> {
    use sha2::Digest as _;
    use std::io::Seek as _;
    let info = builder::inspect::inspect_disk(disk)?;
    let mut hasher = sha2::Sha256::new();
    let mut uuids = Vec::new();
    let mut file = std::fs::File::open(disk)?;
    for label in [format!("root-{slot}"), format!("verity-{slot}")] {
        let part = info
            .partitions
            .iter()
            .find(|p| p.label == label)
            .with_context(|| format!("no {label} on {}", disk.display()))?;
        file.seek(std::io::SeekFrom::Start(part.start))?;
        std::io::copy(&mut (&mut file).take(part.size), &mut hasher)?;
        uuids.push(part.uuid.clone());
    }
    let entries = info
        .entries
        .iter()
        .filter(|e| e.slot == Some(slot))
        .map(|e| e.file.clone())
        .collect();
    Ok(SlotContent {
        sha256: hex::encode(hasher.finalize()),
        uuids,
        entries,
    })
}

/// Copies a release folder whose root artifact differs from its manifest: `tamper` changes the
/// artifact's bytes. The manifest is written again in another layout, without its chunk index
/// (so the agent downloads the root artifact instead of building the root from chunks), and
/// signed with `key`, so it is a different manifest from the original's (a refusal is
/// remembered per manifest).
fn tampered_release(
    from: &Path,
    to: &Path,
    manifest: &Manifest,
    key: &os_config::manifest::SecretKey,
    tamper: impl Fn(&mut Vec<u8>),
) -> Result<()> {
    copy_tree(from, to)?;
    let artifact = to.join(&manifest.artifacts.root.path);
    let mut bytes = std::fs::read(&artifact)?;
    tamper(&mut bytes);
    std::fs::remove_file(&artifact)?;
    std::fs::write(&artifact, &bytes)?;
    for manifest_dir in [
        to.join("stable"),
        to.join("stable").join(manifest.version.as_str()),
    ] {
        let path = manifest_dir.join(manifest::MANIFEST_FILE);
        let mut value: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        if let Some(fields) = value.as_object_mut() {
            fields.remove("root-chunks");
        }
        let text = serde_json::to_vec(&value)?;
        std::fs::remove_file(&path)?;
        std::fs::write(&path, &text)?;
        let sig = manifest_dir.join(manifest::SIGNATURE_FILE);
        std::fs::remove_file(&sig)?;
        std::fs::write(&sig, key.sign(&text))?;
    }
    Ok(())
}

/// Waits for the next `PLINTH-STATUS <event>` line after console offset `*at`, moves `*at` past
/// it and returns its fields.
fn next_status(
    vm: &mut Vm,
    at: &mut usize,
    needle: &str,
    timeout: Duration,
) -> Result<std::collections::BTreeMap<String, String>> {
    next_line(vm, at, needle, timeout).map(|line| parse_status(&line))
}

/// Like [`next_status`], returning the whole line.
fn next_line(vm: &mut Vm, at: &mut usize, needle: &str, timeout: Duration) -> Result<String> {
    let (line, end) = vm.wait_for_after(&format!("PLINTH-STATUS {needle}"), *at, timeout)?;
    *at = end;
    Ok(line)
}

fn expect_field(
    fields: &std::collections::BTreeMap<String, String>,
    key: &str,
    want: &str,
) -> Result<()> {
    let got = fields.get(key).map(String::as_str);
    ensure!(
        got == Some(want),
        "expected {key}={want} in {fields:?}, got {got:?}"
    );
    Ok(())
}

// The longest test of the file: its name sorts first, so it starts first and the two shorter
// ones run beside it, one after the other.
#[test]
fn a_power_cut_at_each_update_stage_leaves_a_machine_that_finishes_the_update() -> Result<()> {
    let total = Instant::now();
    let dir = tempfile::tempdir()?;
    let work = dir.path();
    let (key, trusted) = trusted_key(work)?;
    let public = trusted.public().to_string();
    // The key a forged release is signed with is made by `plinth keygen`.
    builder::publish::write_keypair(&work.join("other"))?;
    let other = builder::publish::read_secret_key(&work.join("other.key"))?;
    ensure!(
        other.public().to_string() != public,
        "keygen repeated the test key"
    );
    let (_, v1_raw) = build_version(work, 1, &public)?;
    let (v2_text, v2_raw) = build_version(work, 2, &public)?;
    let v2 = publish(&v2_text, &v2_raw, &key, &work.join("rel2-chunked"), work)?;
    // The whole artifacts only (no chunk index), so that the root artifact's download can stall
    // and resume: the same release, signed again.
    tampered_release(
        &work.join("rel2-chunked"),
        &work.join("rel2"),
        &v2,
        &trusted,
        |_| {},
    )?;
    // The forged release: v2's folder with its manifest signed by the other key.
    let forged = work.join("forged");
    copy_tree(&work.join("rel2"), &forged)?;
    for manifest_dir in [forged.join("stable"), forged.join("stable/2.0.0")] {
        let sig = manifest_dir.join(manifest::SIGNATURE_FILE);
        let bytes = std::fs::read(manifest_dir.join(manifest::MANIFEST_FILE))?;
        std::fs::remove_file(&sig)?;
        std::fs::write(&sig, other.sign(&bytes))?;
    }

    let server = Server::start(&forged)?;
    let disk = image::private_copy(&v1_raw, work)?;
    let mut opts = VmOptions::new(&disk);
    opts.guest_forwards = vec![(GUEST_SERVER.to_owned(), server.port)];
    let qemu_started = Instant::now();

    // Boot 1 (v1, slot A): the forged release is refused before anything is written.
    let mut vm = Vm::boot(&opts)?;
    let mut at = 0;
    let line = next_line(&mut vm, &mut at, "update-refused", BOOT)?;
    ensure!(
        line.contains("signature does not verify"),
        "unexpected refusal: {line}"
    );
    ensure!(
        !vm.console().contains("update-progress"),
        "a refused release started an update:\n{}",
        vm.console()
    );
    // The agent looked only once the boot had settled: after the first reconciliation.
    let console = vm.console();
    let (complete, refused) = (
        console.find("PLINTH-STATUS boot-complete"),
        console.find("PLINTH-STATUS update-refused"),
    );
    ensure!(
        matches!((complete, refused), (Some(c), Some(r)) if c < r),
        "the agent checked for a release before the containers were reconciled:\n{console}"
    );
    // The gate's line comes after boot-complete, before or after the agent's first check.
    let boot1 = next_status(&mut vm, &mut 0, "boot-state", BOOT)?;
    expect_field(&boot1, "slot", "a")?;
    expect_field(&boot1, "version", "1.0.0")?;
    expect_field(&boot1, "state", "good")?;

    // Power cut 1, mid-download: the server stops sending the root artifact halfway through, and
    // the power goes while the agent waits for the rest (what it got is partly written).
    let root_artifact = &v2.artifacts.root;
    server.stall(&format!("/{}", root_artifact.path), root_artifact.size / 2);
    server.publish(&work.join("rel2"));
    server.wait_stalled(BOOT)?;
    std::thread::sleep(Duration::from_secs(2));
    vm.kill();
    server.release();
    ensure!(
        !vm.console()[at..].contains("update-progress"),
        "the update started writing although its download stalled halfway:\n{}",
        &vm.console()[at..]
    );
    eprintln!(
        "power cut 1 (mid-download: {} of {} bytes of the root artifact sent) at {:.0}s",
        root_artifact.size / 2,
        root_artifact.size,
        qemu_started.elapsed().as_secs_f64()
    );

    // Boots 2 to 4: slot A and v1 again each time, the agent carries on with the update (resuming
    // the root from its last synced frame); power cut 2 while the rest of the root is written,
    // power cut 3 after both partitions are written, power cut 4 while the kernel and initrd go
    // to the ESP (checked from the stages the agent reported).
    for (cut, stage, wait_ms, not_reached, point) in [
        (
            2,
            "entry-removed",
            STAGE_DELAY_MS + 1500,
            "stage=root-written",
            "mid-write of the root partition",
        ),
        (
            3,
            "verity-written",
            0,
            "stage=verified",
            "after the partition write",
        ),
        (
            4,
            "uuids-set",
            STAGE_DELAY_MS + 700,
            "stage=boot-files-written",
            "mid-ESP write",
        ),
    ] {
        let mut vm = Vm::boot(&opts)?;
        let mut at = 0;
        let mounted = next_status(&mut vm, &mut at, "root-mounted", BOOT)?;
        expect_field(&mounted, "slot", "a")?;
        next_status(
            &mut vm,
            &mut at,
            &format!("update-progress stage={stage}"),
            BOOT,
        )?;
        std::thread::sleep(Duration::from_millis(wait_ms));
        vm.kill();
        let reached = vm.console()[at..].contains(not_reached);
        eprintln!(
            "power cut {cut} ({point}{}) at {:.0}s",
            if reached { ", later than meant" } else { "" },
            qemu_started.elapsed().as_secs_f64()
        );
    }

    // Boot 5: slot A and v1 again; the agent completes the update; power cut 5 just before the
    // reboot it asks for.
    let mut vm = Vm::boot(&opts)?;
    let mut at = 0;
    let mounted = next_status(&mut vm, &mut at, "root-mounted", BOOT)?;
    expect_field(&mounted, "slot", "a")?;
    let staged = next_status(&mut vm, &mut at, "update-staged", BOOT)?;
    expect_field(&staged, "version", "2.0.0")?;
    expect_field(&staged, "slot", "b")?;
    next_status(&mut vm, &mut at, "update-rebooting", BOOT)?;
    vm.kill();
    eprintln!(
        "power cut 5 (before reboot) at {:.0}s",
        qemu_started.elapsed().as_secs_f64()
    );
    qemu_tests::fsck_esp(&disk)?;

    // Boot 6: v2 in slot B on trial, blessed once healthy.
    let mut vm = Vm::boot(&opts)?;
    let mut at = 0;
    let mounted = next_status(&mut vm, &mut at, "root-mounted", BOOT)?;
    expect_field(&mounted, "slot", "b")?;
    let state = next_status(&mut vm, &mut at, "boot-state", BOOT)?;
    expect_field(&state, "version", "2.0.0")?;
    expect_field(&state, "state", "trying 1/3")?;
    let blessed = next_status(&mut vm, &mut at, "boot-blessed", BOOT)?;
    expect_field(&blessed, "slot", "b")?;
    expect_field(&blessed, "version", "2.0.0")?;
    eprintln!("v2 blessed at {:.0}s", qemu_started.elapsed().as_secs_f64());
    vm.kill();
    qemu_tests::fsck_esp(&disk)?;
    eprintln!(
        "QEMU time {:.0}s, whole test {:.0}s",
        qemu_started.elapsed().as_secs_f64(),
        total.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn bless_of_a_healthy_release_and_rollback_of_a_crash_looping_one() -> Result<()> {
    let total = Instant::now();
    let dir = tempfile::tempdir()?;
    let work = dir.path();
    let (key, trusted) = trusted_key(work)?;
    let public = trusted.public().to_string();
    // v3 and v4 first: v2 is likely built by the power-cut test meanwhile.
    let (v3_text, v3_raw) = build_version(work, 3, &public)?;
    let (v4_text, v4_raw) = build_version(work, 4, &public)?;
    let (v2_text, v2_raw) = build_version(work, 2, &public)?;
    // v2 and v3 into one folder, as a publisher keeps releasing into the same place: v3 adds
    // only the chunks around its one changed file to the chunk store.
    let v2_manifest = publish(&v2_text, &v2_raw, &key, &work.join("rel3"), work)?;
    let manifests = [
        publish(&v3_text, &v3_raw, &key, &work.join("rel3"), work)?,
        publish(&v4_text, &v4_raw, &key, &work.join("rel4"), work)?,
    ];
    let delta = expected_delta(&work.join("rel3"), &v2_manifest, &manifests[0])?;
    eprintln!(
        "v3 over v2: {} of {} chunks not in v2's root, {} compressed bytes with the index, of the {} byte root artifact ({:.2}%)",
        delta.chunks.len(),
        delta.of,
        delta.bytes,
        manifests[0].artifacts.root.size,
        delta.bytes as f64 * 100.0 / manifests[0].artifacts.root.size as f64
    );

    // A machine installed with v2 (slot A) finds v3 published.
    let server = Server::start(&work.join("rel3"))?;
    let disk = image::private_copy(&v2_raw, work)?;
    let mut opts = VmOptions::new(&disk);
    opts.guest_forwards = vec![(GUEST_SERVER.to_owned(), server.port)];
    let qemu_started = Instant::now();
    let mut vm = Vm::boot(&opts)?;
    let mut at = 0;
    // The gate's line and the agent's first lines may come in either order.
    let state = next_status(&mut vm, &mut 0, "boot-state", BOOT)?;
    expect_field(&state, "slot", "a")?;
    expect_field(&state, "version", "2.0.0")?;
    expect_field(&state, "state", "good")?;

    // The agent writes v3 to slot B and reboots by itself; v3 is blessed.
    next_status(&mut vm, &mut at, "update-progress stage=downloaded", BOOT)?;
    eprintln!(
        "v3 downloaded and checked on /var at {:.0}s",
        qemu_started.elapsed().as_secs_f64()
    );
    next_status(&mut vm, &mut at, "update-progress stage=accepted", BOOT)?;
    let accepted_at = at;
    let applying = Instant::now();
    let staged = next_status(&mut vm, &mut at, "update-staged", BOOT)?;
    let wall = applying.elapsed().as_secs_f64();
    expect_field(&staged, "version", "3.0.0")?;
    expect_field(&staged, "slot", "b")?;
    let v3 = &manifests[0];
    // The root was built from v2's chunks and the downloaded ones: exactly the chunks v2 lacks.
    let mut delta_at = accepted_at;
    let report = next_status(&mut vm, &mut delta_at, "update-delta", BOOT)?;
    let field = |key: &str| -> Result<u64> {
        report
            .get(key)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("update-delta has no number {key}: {report:?}"))
    };
    let (bytes, fetched, reused) = (field("bytes")?, field("fetched")?, field("reused")?);
    ensure!(
        field("total-bytes")? == v3.artifacts.root.size,
        "update-delta total-bytes is not the root artifact's size: {report:?}"
    );
    ensure!(
        bytes == delta.bytes && fetched == delta.chunks.len() as u64,
        "the agent downloaded {fetched} chunks, {bytes} bytes; the indexes say {} chunks, {} bytes (with the index)",
        delta.chunks.len(),
        delta.bytes
    );
    ensure!(
        reused + fetched + delta.repeats == delta.of as u64,
        "update-delta counts {reused} reused and {fetched} fetched of {} chunks ({} repeat a downloaded one)",
        delta.of,
        delta.repeats
    );
    ensure!(
        bytes * 20 <= v3.artifacts.root.size,
        "the delta downloaded {bytes} bytes, more than 5% of the {} byte root artifact",
        v3.artifacts.root.size
    );
    // What the server sent agrees: the index and each missing chunk once, never the root artifact.
    let requests = server.requests_since(qemu_started);
    let root_path = format!("/{}", v3.artifacts.root.path);
    ensure!(
        !requests.contains(&root_path),
        "the delta update downloaded the whole root artifact"
    );
    let mut chunk_requests: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("/chunks/"))
        .collect();
    chunk_requests.sort();
    let mut wanted: Vec<String> = delta.paths();
    wanted.sort();
    ensure!(
        chunk_requests
            .iter()
            .map(|r| r.as_str())
            .eq(wanted.iter().map(String::as_str)),
        "the server was asked for {chunk_requests:?}, the indexes say {wanted:?}"
    );
    let served: u64 = chunk_requests
        .iter()
        .map(|r| std::fs::metadata(work.join("rel3").join(&r[1..])).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    ensure!(
        served == bytes,
        "the server sent {served} bytes of chunks and index, the agent counted {bytes}"
    );
    // The whole update: the kernel and initramfs are v2's (the ESP holds them), so besides the
    // chunks only the verity tree comes down, and all of it is at most 5% of the full payload.
    for (name, old, new) in [
        (
            "kernel",
            &v2_manifest.artifacts.kernel,
            &v3.artifacts.kernel,
        ),
        (
            "initrd",
            &v2_manifest.artifacts.initrd,
            &v3.artifacts.initrd,
        ),
    ] {
        let count = requests
            .iter()
            .filter(|r| **r == format!("/{}", new.path))
            .count();
        let expected = usize::from(old.uncompressed_sha256 != new.uncompressed_sha256);
        ensure!(
            count == expected,
            "v3's {name} was requested {count} times (expected {expected}: v2's is the same: {})",
            expected == 0
        );
    }
    let downloaded: u64 = requests
        .iter()
        .filter(|r| !r.ends_with(".json") && !r.ends_with(".sig"))
        .map(|r| std::fs::metadata(work.join("rel3").join(&r[1..])).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    let full: u64 = v3.artifacts.named().iter().map(|(_, a)| a.size).sum();
    ensure!(
        downloaded * 20 <= full,
        "the update downloaded {downloaded} bytes, more than 5% of the {full} byte full payload: {requests:?}"
    );
    eprintln!(
        "v3 over v2 downloaded {downloaded} bytes of a {full} byte full payload ({:.2}%)",
        downloaded as f64 * 100.0 / full as f64
    );
    let written = v3.artifacts.root.uncompressed_size + v3.artifacts.verity.uncompressed_size;
    eprintln!(
        "v3 applied in {wall:.1}s: {:.1} MB written to root-b and verity-b ({:.1} MB/s); delta: {reused} chunks reused, {fetched} downloaded, {:.2} MB of the {:.1} MB root artifact ({:.2}%), verity {:.1} MB",
        written as f64 / 1e6,
        written as f64 / 1e6 / wall,
        bytes as f64 / 1e6,
        v3.artifacts.root.size as f64 / 1e6,
        bytes as f64 * 100.0 / v3.artifacts.root.size as f64,
        v3.artifacts.verity.size as f64 / 1e6
    );
    let mounted = next_status(&mut vm, &mut at, "root-mounted", BOOT)?;
    expect_field(&mounted, "slot", "b")?;
    eprintln!(
        "v3 root mounted at {:.0}s",
        qemu_started.elapsed().as_secs_f64()
    );
    let blessed = next_status(&mut vm, &mut at, "boot-blessed", BOOT)?;
    expect_field(&blessed, "slot", "b")?;
    expect_field(&blessed, "version", "3.0.0")?;
    eprintln!("v3 blessed at {:.0}s", qemu_started.elapsed().as_secs_f64());

    // Slot A holds v2, the fallback. A v4 whose root artifact was tampered with is refused
    // before anything is written, remembered, and not downloaded again; slot A is unchanged.
    let fallback = slot_content(&disk, "a")?;
    ensure!(
        fallback.entries == ["plinth-a-2.0.0.conf"],
        "slot A does not hold the blessed v2: {fallback:?}"
    );
    let v4 = &manifests[1];
    tampered_release(
        &work.join("rel4"),
        &work.join("rel4-tampered"),
        v4,
        &trusted,
        |bytes| {
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x01;
        },
    )?;
    let tampered_published = Instant::now();
    server.publish(&work.join("rel4-tampered"));
    let line = next_line(&mut vm, &mut at, "update-refused version=4.0.0", BOOT)?;
    ensure!(
        line.contains("artifact root: sha256 of the download is"),
        "unexpected refusal: {line}"
    );
    let line = next_line(&mut vm, &mut at, "update-refused version=4.0.0", BOOT)?;
    ensure!(
        line.contains("refused before"),
        "unexpected refusal: {line}"
    );
    let root_path = format!("/{}", v4.artifacts.root.path);
    let fetched = server
        .requests_since(tampered_published)
        .iter()
        .filter(|r| **r == root_path)
        .count();
    ensure!(
        fetched == 1,
        "the tampered root artifact was requested {fetched} times (expected once)"
    );
    ensure!(
        !vm.console()[at..].contains("stage=entry-removed"),
        "a refused release removed an entry"
    );
    let after = slot_content(&disk, "a")?;
    ensure!(
        after == fallback,
        "a refused release changed slot A: {fallback:?} -> {after:?}"
    );
    eprintln!(
        "tampered v4 refused twice, slot A unchanged, at {:.0}s",
        qemu_started.elapsed().as_secs_f64()
    );

    // v4's container crash-loops (`restart = "always"`, exits at once): each of the three tries
    // fails at its first restart, never blessed, back on v3 by itself.
    let v4_published = Instant::now();
    server.publish(&work.join("rel4"));
    let staged = next_status(&mut vm, &mut at, "update-staged", BOOT)?;
    expect_field(&staged, "version", "4.0.0")?;
    for attempt in 1..=3 {
        let state = next_status(&mut vm, &mut at, "boot-state", BOOT)?;
        let tried_from = at;
        expect_field(&state, "slot", "a")?;
        expect_field(&state, "version", "4.0.0")?;
        expect_field(&state, "state", &format!("trying {attempt}/3"))?;
        let unhealthy = next_status(&mut vm, &mut at, "boot-unhealthy", BOOT)?;
        expect_field(&unhealthy, "version", "4.0.0")?;
        let reason = unhealthy.get("reason").cloned().unwrap_or_default();
        ensure!(
            reason.contains("container web restarted"),
            "v4 try {attempt} failed for another reason: {reason}"
        );
        let tried = &vm.console()[tried_from..at];
        ensure!(
            tried.contains("PLINTH-STATUS container-restarting name=web restarts="),
            "no container-restarting line in try {attempt}"
        );
        ensure!(
            !tried.contains("PLINTH-STATUS container-running name=web"),
            "a crash-looping container was reported running in try {attempt}"
        );
        eprintln!(
            "v4 try {attempt} failed at {:.0}s",
            qemu_started.elapsed().as_secs_f64()
        );
    }
    // The agent (started before the gate) or the gate reports the rollback, whichever is first.
    let mut from_boot = at;
    let state = next_status(&mut vm, &mut at, "boot-state", BOOT)?;
    expect_field(&state, "slot", "b")?;
    expect_field(&state, "version", "3.0.0")?;
    expect_field(&state, "state", "good")?;
    let rollback = next_status(&mut vm, &mut from_boot, "rollback", BOOT)?;
    at = at.max(from_boot);
    expect_field(&rollback, "from", "4.0.0")?;
    expect_field(&rollback, "to", "3.0.0")?;
    ensure!(
        !vm.console().contains("boot-blessed slot=a version=4.0.0"),
        "v4 was blessed"
    );
    eprintln!(
        "rolled back to v3 at {:.0}s",
        qemu_started.elapsed().as_secs_f64()
    );

    // The agent keeps polling and refuses v4 as bad, without downloading it again.
    let line = next_line(&mut vm, &mut at, "update-refused version=4.0.0", BOOT)?;
    ensure!(line.contains("marked bad"), "unexpected refusal: {line}");
    next_status(&mut vm, &mut at, "update-refused version=4.0.0", BOOT)?;
    let requests = server.requests_since(v4_published);
    for (name, artifact) in v4.artifacts.named() {
        let path = format!("/{}", artifact.path);
        let count = requests.iter().filter(|r| **r == path).count();
        // v4's root comes from chunks (v3's and downloaded ones), not the root artifact; its
        // kernel and initramfs are copied on the ESP where v3's are the same.
        let expected = match name {
            "root" => usize::from(v4.root_chunks.is_none()),
            "kernel" | "initrd" => {
                let (_, held) = v3
                    .artifacts
                    .named()
                    .into_iter()
                    .find(|(n, _)| *n == name)
                    .context("v3's artifacts")?;
                usize::from(held.uncompressed_sha256 != artifact.uncompressed_sha256)
            }
            _ => 1,
        };
        ensure!(
            count == expected,
            "v4's {name} artifact {path} was requested {count} times (expected {expected}): {requests:?}"
        );
    }
    let index_path = v4.root_chunks.as_ref().map(|i| format!("/{}", i.path));
    let index_count = requests
        .iter()
        .filter(|r| Some(r.as_str()) == index_path.as_deref())
        .count();
    ensure!(
        index_count == usize::from(index_path.is_some()),
        "v4's chunk index was requested {index_count} times: {requests:?}"
    );
    vm.kill();
    qemu_tests::fsck_esp(&disk)?;
    eprintln!(
        "QEMU time {:.0}s, whole test {:.0}s",
        qemu_started.elapsed().as_secs_f64(),
        total.elapsed().as_secs_f64()
    );
    if requests.is_empty() {
        bail!("the release server saw no requests");
    }
    Ok(())
}

/// What a delta update from one release to the next downloads, computed on the host from the two
/// chunk indexes in the release folder `dir`.
struct ExpectedDelta {
    /// The chunks of the new root that the old one lacks, each once.
    chunks: Vec<os_config::chunk::Chunk>,
    /// Their compressed sizes plus the new index's size.
    bytes: u64,
    index_path: String,
    /// Chunks of the new index, and how many of them repeat a missing chunk named before.
    of: usize,
    repeats: u64,
}

impl ExpectedDelta {
    /// The request paths the server sees: the index and each missing chunk.
    fn paths(&self) -> Vec<String> {
        std::iter::once(format!("/{}", self.index_path))
            .chain(self.chunks.iter().map(|c| format!("/{}", c.path())))
            .collect()
    }
}

fn expected_delta(dir: &Path, old: &Manifest, new: &Manifest) -> Result<ExpectedDelta> {
    let read = |m: &Manifest| -> Result<(os_config::chunk::ChunkIndex, manifest::IndexFile)> {
        let file = m
            .root_chunks
            .clone()
            .with_context(|| format!("release {} has no chunk index", m.version))?;
        let bytes = std::fs::read(dir.join(&file.path))
            .with_context(|| format!("reading {}", file.path))?;
        Ok((os_config::chunk::ChunkIndex::parse(&bytes)?, file))
    };
    let (old_index, _) = read(old)?;
    let (new_index, file) = read(new)?;
    let have: std::collections::HashSet<[u8; 32]> =
        old_index.chunks.iter().map(|c| c.sha256).collect();
    let mut seen = std::collections::HashSet::new();
    let mut chunks = Vec::new();
    let mut repeats = 0;
    for c in &new_index.chunks {
        if have.contains(&c.sha256) {
            continue;
        }
        if seen.insert(c.sha256) {
            chunks.push(*c);
        } else {
            repeats += 1;
        }
    }
    let bytes = file.size
        + chunks
            .iter()
            .map(|c| u64::from(c.compressed_length))
            .sum::<u64>();
    Ok(ExpectedDelta {
        chunks,
        bytes,
        index_path: file.path,
        of: new_index.chunks.len(),
        repeats,
    })
}

/// A release folder on a disk image of its own: ext4 (`mkfs.ext4 -d`) or FAT (`mkfs.vfat` and
/// `mcopy`), as a user would carry it on a USB stick.
fn release_disk(release: &Path, image: &Path, fat: bool) -> Result<()> {
    let run = |cmd: &mut std::process::Command| -> Result<()> {
        let out = cmd
            .output()
            .with_context(|| format!("running {cmd:?} (scripts/host-packages.sh installs it)"))?;
        ensure!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    if fat {
        run(std::process::Command::new("mkfs.vfat")
            .args(["-n", "PLINTHREL", "-C"])
            .arg(image)
            .arg("262144"))?;
        let mut mcopy = std::process::Command::new("mcopy");
        mcopy.args(["-s", "-i"]).arg(image);
        for entry in std::fs::read_dir(release)? {
            mcopy.arg(entry?.path());
        }
        run(mcopy.arg("::/"))
    } else {
        run(std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "plinth-release", "-d"])
            .arg(release)
            .arg(image)
            .arg("256M"))
    }
}

/// Runs `plinth-update ARGS` on the guest from a privileged container in the host's PID
/// namespace (`nsenter` into PID 1's mount namespace), as a user without a shell on the machine
/// would; returns its exit code and output.
fn plinth_update(engine: &qemu_tests::engine::Engine, args: &[&str]) -> Result<(i64, String)> {
    let mut cmd = vec![
        "/bin/busybox",
        "nsenter",
        "-t",
        "1",
        "-m",
        "--",
        "/usr/bin/plinth-update",
    ];
    cmd.extend_from_slice(args);
    let run = engine.run("plinth/busybox:1", &cmd, true, &[])?;
    Ok((run.exit_code, run.output))
}

/// Flushes every write of the guest to its disks (`sync(2)` is machine-wide, so a container
/// can ask for it).
fn guest_sync(engine: &qemu_tests::engine::Engine) -> Result<(i64, String)> {
    let run = engine.run("plinth/busybox:1", &["/bin/busybox", "sync"], true, &[])?;
    Ok((run.exit_code, run.output))
}

#[test]
fn offline_releases_from_media_are_checked_before_anything_is_written() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let work = dir.path();
    let (key, secret) = trusted_key(work)?;
    let public = secret.public().to_string();
    // The same definitions (so the same cached builds) as the power-cut and rollback tests.
    let (v1_text, v1) = build_version(work, 1, &public)?;
    let (_, v2) = build_version(work, 2, &public)?;
    let (v3_text, v3) = build_version(work, 3, &public)?;
    publish(&v1_text, &v1, &key, &work.join("lower"), work)?;
    let manifest = publish(&v3_text, &v3, &key, &work.join("good"), work)?;
    // Media are applied from the whole artifacts: the chunk store stays off them (it would
    // double their size).
    for folder in ["lower", "good"] {
        std::fs::remove_dir_all(work.join(folder).join("chunks"))?;
    }

    // A medium with one flipped byte in the root artifact (a real copy: the good one is kept),
    // one whose root artifact is longer than its manifest says, and one signed with another key.
    tampered_release(
        &work.join("good"),
        &work.join("flipped"),
        &manifest,
        &secret,
        |bytes| {
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x01;
        },
    )?;
    tampered_release(
        &work.join("good"),
        &work.join("longer"),
        &manifest,
        &secret,
        |bytes| bytes.extend_from_slice(&[0u8; 4096]),
    )?;
    builder::publish::write_keypair(&work.join("stranger"))?;
    let stranger = builder::publish::read_secret_key(&work.join("stranger.key"))?;
    tampered_release(
        &work.join("good"),
        &work.join("otherkey"),
        &manifest,
        &stranger,
        |_| {},
    )?;
    // A release of another image, signed with the trusted key.
    copy_tree(&work.join("good"), &work.join("other"))?;
    for manifest_dir in [work.join("other/stable"), work.join("other/stable/3.0.0")] {
        let path = manifest_dir.join(manifest::MANIFEST_FILE);
        let mut value: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        value["name"] = serde_json::json!("other");
        let text = serde_json::to_vec_pretty(&value)?;
        std::fs::remove_file(&path)?;
        std::fs::write(&path, &text)?;
        let sig = manifest_dir.join(manifest::SIGNATURE_FILE);
        std::fs::remove_file(&sig)?;
        std::fs::write(&sig, secret.sign(&text))?;
    }
    let mut disks = Vec::new();
    for (name, fat) in [
        ("lower", false),
        ("flipped", false),
        ("other", false),
        ("longer", false),
        ("otherkey", false),
        ("good", true),
    ] {
        let image = work.join(format!("{name}.img"));
        release_disk(&work.join(name), &image, fat)?;
        disks.push(image);
    }

    // v2 in slot A; the media are vdb (lower) … vdg (good, FAT). The release server has nothing,
    // so the agent's own polling finds no release.
    let empty = work.join("empty");
    std::fs::create_dir_all(&empty)?;
    let server = Server::start(&empty)?;
    let disk = image::private_copy(&v2, work)?;
    let slot_b_before = slot_content(&disk, "b")?;
    let api = qemu_tests::free_port()?;
    let mut opts = VmOptions::new(&disk);
    opts.guest_forwards = vec![(GUEST_SERVER.to_owned(), server.port)];
    opts.forwards = vec![(api, 2375)];
    opts.extra_disks = disks;
    let mut vm = Vm::boot(&opts)?;
    let mut at = 0;
    next_status(&mut vm, &mut at, "container-running name=web", BOOT)?;
    let engine = qemu_tests::engine::Engine { port: api };
    engine.wait_ready(Duration::from_secs(60))?;

    for (device, version, reason) in [
        (
            "/dev/vdb",
            "1.0.0",
            "version 1.0.0 is not newer than the running version 2.0.0",
        ),
        ("/dev/vdc", "3.0.0", "artifact root: "),
        (
            "/dev/vdd",
            "3.0.0",
            "release is for image `other`, this machine runs `upd`",
        ),
        ("/dev/vde", "3.0.0", "artifact root: the file is "),
        ("/dev/vdf", "?", "signature does not verify"),
    ] {
        let (code, output) = plinth_update(&engine, &["apply", "--from", device])?;
        eprintln!("apply --from {device}: exit {code}\n{output}");
        let refused = output
            .lines()
            .find(|l| l.contains("PLINTH-STATUS update-refused"))
            .with_context(|| format!("apply --from {device} was not refused:\n{output}"))?;
        expect_field(&parse_status(refused), "version", version)?;
        ensure!(refused.contains(reason), "unexpected refusal: {refused}");
        ensure!(code != 0, "a refused apply exits non-zero: {output}");
        ensure!(
            !output.contains("stage=boot-files-written") && !output.contains("update-staged"),
            "a refused release got as far as the boot files:\n{output}"
        );
    }
    // Nothing was staged: slot B still has no version and no boot entry.
    let (code, output) = plinth_update(&engine, &["--json", "status"])?;
    ensure!(code == 0, "plinth-update status failed:\n{output}");
    let json = output
        .lines()
        .skip_while(|l| !l.starts_with('{'))
        .collect::<Vec<_>>()
        .join("\n");
    let status: serde_json::Value =
        serde_json::from_str(&json).with_context(|| format!("status JSON:\n{output}"))?;
    let status_b = status["slots"]
        .as_array()
        .and_then(|slots| slots.iter().find(|s| s["slot"] == "b"))
        .with_context(|| format!("no slot b in {status}"))?;
    ensure!(
        status_b["version"].is_null() && status_b["boot"] == "empty",
        "a refused release left a boot entry: {status_b}"
    );
    ensure!(status["staged"].is_null(), "something is staged: {status}");
    // Byte for byte, slot B is what it was before the machine booted (the guest's writes, if
    // any, flushed first).
    let (code, output) = guest_sync(&engine)?;
    ensure!(code == 0, "sync failed:\n{output}");
    let slot_b_after = slot_content(&disk, "b")?;
    ensure!(
        slot_b_after == slot_b_before,
        "refused releases changed slot B: {slot_b_before:?} -> {slot_b_after:?}"
    );

    // The good medium (FAT): staged into slot B, and the machine reboots into it on trial. The
    // engine goes away with the reboot, so the container's output may not come back.
    let applying = Instant::now();
    match plinth_update(&engine, &["apply", "--from", "/dev/vdg"]) {
        Ok((code, output)) => {
            eprintln!("apply --from /dev/vdg: exit {code}\n{output}");
            ensure!(
                !output.contains("update-refused"),
                "the good medium was refused:\n{output}"
            );
        }
        Err(e) => eprintln!("apply --from /dev/vdg: no reply ({e:#}); the machine reboots"),
    }
    let mounted = next_status(&mut vm, &mut at, "root-mounted", BOOT)?;
    expect_field(&mounted, "slot", "b")?;
    eprintln!(
        "applied from FAT media and rebooted into slot B in {:.0}s",
        applying.elapsed().as_secs_f64()
    );
    let state = next_status(&mut vm, &mut at, "boot-state", BOOT)?;
    expect_field(&state, "slot", "b")?;
    expect_field(&state, "version", "3.0.0")?;
    ensure!(
        state.get("state").is_some_and(|s| s.starts_with("trying")),
        "v3 from the medium does not boot on trial: {state:?}"
    );
    vm.kill();
    qemu_tests::fsck_esp(&disk)?;
    Ok(())
}

/// Where the guest finds the FleetLock server.
const GUEST_LOCK_SERVER: &str = "10.0.2.101:8001";

/// A FleetLock server for the guest: answers every request on a connection (QEMU's `guestfwd`
/// keeps one open) with the current status, and logs `<path> -> <status>`.
struct LockServer {
    status: Arc<Mutex<u16>>,
    log: Arc<Mutex<Vec<String>>>,
    port: u16,
}

impl LockServer {
    fn start(status: u16) -> Result<LockServer> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the lock server")?;
        let port = listener.local_addr()?.port();
        let (status, log) = (
            Arc::new(Mutex::new(status)),
            Arc::new(Mutex::new(Vec::new())),
        );
        let (st, lg) = (Arc::clone(&status), Arc::clone(&log));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (st, lg) = (Arc::clone(&st), Arc::clone(&lg));
                std::thread::spawn(move || {
                    let _ = lock_serve(stream, &st, &lg);
                });
            }
        });
        Ok(LockServer { status, log, port })
    }

    fn answer(&self, status: u16) {
        if let Ok(mut current) = self.status.lock() {
            *current = status;
        }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

fn lock_serve(stream: TcpStream, status: &Mutex<u16>, log: &Mutex<Vec<String>>) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    while let Some(request) = read_request(&mut reader)? {
        let (path, body) = (&request.path, &request.body);
        let protocol = request
            .header("fleet-lock-protocol")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let group = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["client_params"]["group"].as_str().map(str::to_owned));
        let code = if protocol && group.as_deref() == Some("workers") {
            *status
                .lock()
                .map_err(|_| anyhow::anyhow!("lock poisoned"))?
        } else {
            400
        };
        let reply = if code == 200 {
            String::new()
        } else {
            r#"{"kind":"failed_lock","value":"all reboot slots of group workers are taken"}"#
                .to_owned()
        };
        if let Ok(mut log) = log.lock() {
            log.push(format!("{path} -> {code}"));
        }
        write!(
            out,
            "HTTP/1.1 {code} X\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        )?;
        out.flush()?;
    }
    Ok(())
}

/// Where the test CA's certificate is written for the images' `[update] ca` (a fixed path, so a
/// definition names the same file on every run).
fn test_ca_file(ca: &qemu_tests::tls::TestCa) -> Result<PathBuf> {
    let dir = image::workspace().join("target/qemu-tests/update-tls");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("ca.pem");
    std::fs::write(&path, ca.pem()).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

// The release server speaks HTTPS with a certificate for the guest's view of it (10.0.2.100),
// signed by a test CA that the images trust through `[update] ca`. Within the one boot of v2, before
// the good v3: an expired v3 manifest is refused without a download, and a v3 whose root artifact
// is one byte longer than its manifest says is refused after it.
#[test]
fn fleetlock_takes_a_reboot_slot_first_and_gives_it_back_after_the_bless() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let work = dir.path();
    let key = work.join("release.key");
    std::fs::write(&key, format!("{TRUSTED_KEY}\n"))?;
    let trusted = builder::publish::read_secret_key(&key)?;
    let public = trusted.public().to_string();
    let ca = qemu_tests::tls::TestCa::new()?;
    let ca_file = test_ca_file(&ca)?;
    // The CA's digest in the definition: an image is reused only if it trusts this very CA.
    let ca_sha256 = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(ca.pem().as_bytes()))
    };
    let (guest_host, _) = GUEST_SERVER
        .split_once(':')
        .context("GUEST_SERVER has a port")?;
    let fleetlock = |version: &str| {
        definition(version, &public, true, "")
            .replacen(
                "interval = \"10s\"\n",
                &format!(
                    "interval = \"10s\"\nstrategy = \"fleetlock\"\nfleetlock = {{ url = \"http://{GUEST_LOCK_SERVER}\", group = \"workers\" }}\n"
                ),
                1,
            )
            .replacen(
                &format!("url = \"http://{GUEST_SERVER}\"\n"),
                &format!(
                    "url = \"https://{GUEST_SERVER}\"\n# test CA sha256 {ca_sha256}\nca = \"{}\"\n",
                    ca_file.display()
                ),
                1,
            )
    };
    let (v2_text, v3_text) = (fleetlock("2.0.0"), fleetlock("3.0.0"));
    ensure!(v2_text.contains("strategy = \"fleetlock\""), "{v2_text}");
    ensure!(v2_text.contains("url = \"https://"), "{v2_text}");
    let v2 = build(work, "update-fl-v2", &v2_text)?;
    let v3 = build(work, "update-fl-v3", &v3_text)?;
    let v3_manifest = publish(&v3_text, &v3, &key, &work.join("rel3"), work)?;
    // Published with an expiry that has passed: `plinth publish --expires-at 2020-01-01T00:00:00Z`.
    let expired_at = manifest::parse_rfc3339("2020-01-01T00:00:00Z").map_err(anyhow::Error::msg)?;
    let expired = publish_expiring(
        &v3_text,
        &v3,
        &key,
        &work.join("rel3-expired"),
        work,
        Expiry::At(expired_at),
    )?;
    ensure!(
        expired.expires == "2020-01-01T00:00:00Z",
        "{}",
        expired.expires
    );
    // One byte more than the manifest says at the end of the root artifact (the manifest is
    // signed again in another layout: a refusal is remembered per manifest).
    tampered_release(
        &work.join("rel3"),
        &work.join("rel3-longer"),
        &v3_manifest,
        &trusted,
        |bytes| bytes.push(0),
    )?;

    let serving = Instant::now();
    let releases = Server::start_tls(&work.join("rel3-expired"), ca.server_config(&[guest_host])?)?;
    let lock = LockServer::start(409)?;
    let disk = image::private_copy(&v2, work)?;
    let mut opts = VmOptions::new(&disk);
    opts.guest_forwards = vec![
        (GUEST_SERVER.to_owned(), releases.port),
        (GUEST_LOCK_SERVER.to_owned(), lock.port),
    ];
    let mut vm = Vm::boot(&opts)?;
    let mut at = 0;
    // The expired manifest (fetched over HTTPS, so the CA is trusted): refused, nothing fetched.
    let line = next_line(&mut vm, &mut at, "update-refused version=3.0.0", BOOT)?;
    ensure!(
        line.contains("manifest expired at 2020-01-01T00:00:00Z"),
        "unexpected refusal: {line}"
    );
    let requests = releases.requests_since(serving);
    ensure!(
        requests.iter().any(|r| r.ends_with("/manifest.json"))
            && !requests.iter().any(|r| r.contains("/artifacts/")),
        "the expired release: {requests:?}"
    );
    // A root artifact longer than its manifest says: refused once it has sent one byte too many.
    releases.publish(&work.join("rel3-longer"));
    let line = next_line(&mut vm, &mut at, "update-refused version=3.0.0", BOOT)?;
    ensure!(
        line.contains(&format!(
            "artifact root: the download is more than the {} bytes the manifest says",
            v3_manifest.artifacts.root.size
        )),
        "unexpected refusal of the longer root artifact: {line}"
    );
    ensure!(
        !vm.console()[..at].contains("stage=entry-removed"),
        "a refused release removed an entry"
    );
    releases.publish(&work.join("rel3"));
    let staged = next_status(&mut vm, &mut at, "update-staged", BOOT)?;
    expect_field(&staged, "version", "3.0.0")?;
    // The group is full: the staged update waits, and asks again at the next poll.
    let waiting = next_status(&mut vm, &mut at, "update-waiting", BOOT)?;
    expect_field(&waiting, "version", "3.0.0")?;
    let reason = waiting.get("reason").cloned().unwrap_or_default();
    ensure!(
        reason.contains("all reboot slots of group workers are taken"),
        "unexpected wait: {reason}"
    );
    next_status(&mut vm, &mut at, "update-waiting", BOOT)?;
    ensure!(
        !vm.console()[..at].contains("update-rebooting"),
        "rebooted without a slot"
    );
    // A slot frees up: the agent takes it and reboots into v3, which is blessed; then it gives
    // the slot back.
    lock.answer(200);
    next_status(&mut vm, &mut at, "update-rebooting", BOOT)?;
    let mounted = next_status(&mut vm, &mut at, "root-mounted", BOOT)?;
    expect_field(&mounted, "slot", "b")?;
    let blessed = next_status(&mut vm, &mut at, "boot-blessed", BOOT)?;
    expect_field(&blessed, "version", "3.0.0")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    // The agent's steady-state at the first boot was refused (409); the one after the bless
    // is the release.
    while !lock.log().iter().any(|l| l == "/v1/steady-state -> 200") {
        ensure!(
            Instant::now() < deadline,
            "no steady-state after the bless: {:?}",
            lock.log()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    vm.kill();
    qemu_tests::fsck_esp(&disk)?;
    let log = lock.log();
    eprintln!("FleetLock requests: {log:?}");
    let granted = log
        .iter()
        .position(|l| l == "/v1/pre-reboot -> 200")
        .context("no granted pre-reboot")?;
    ensure!(
        log[..granted]
            .iter()
            .filter(|l| *l == "/v1/pre-reboot -> 409")
            .count()
            >= 2,
        "the agent did not wait on the full group: {log:?}"
    );
    let released = log
        .iter()
        .position(|l| l == "/v1/steady-state -> 200")
        .context("no steady-state")?;
    ensure!(released > granted, "released before the reboot: {log:?}");
    ensure!(
        !log.iter().any(|l| l.ends_with("-> 400")),
        "a request without the protocol header or the group: {log:?}"
    );
    Ok(())
}
