//! `plinth publish` on synthetic disk images: GPT and FAT written here, the verity tree by
//! `veritysetup format` (the reference implementation) as an oracle for the root hash.

use std::fs;
use std::io::Read;
use std::path::Path;

use builder::publish::{self, Release};
use os_config::manifest::{self, Manifest, SecretKey};
use os_config::units::{Name, Version};

mod common;
use common::make_disk;

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
        expires: 1_795_820_399 + 86_400,
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
    // The chunk index of the root image, and its chunks, are in the folder.
    let index_file = m1.root_chunks.clone().expect("a chunk index");
    let index =
        os_config::chunk::ChunkIndex::parse(&fs::read(out.join(&index_file.path)).expect("index"))
            .expect("index parses");
    assert_eq!(index.total_length(), m1.artifacts.root.uncompressed_size);
    assert!(index.chunks.iter().all(|c| out.join(c.path()).is_file()));

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
    let args = publish::Options {
        file: def,
        key: prefix.with_extension("key"),
        to: tmp.path().join("out"),
        disk: Some(tmp.path().join("missing.raw")),
        rollout: None,
        expires: Default::default(),
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

/// The host-side commands of the README's Updates section, run as printed with the built `plinth`
/// in a scratch folder: the `sh` block (the comment line that asks for the public key in
/// `[update] keys` is done here, with the `[update] url` that `plinth run --serve` serves), and
/// the `mkfs.ext4 …` of the offline updates. The disk that `plinth publish` would otherwise build
/// is a synthetic one at the path the command reads; `plinth run --serve` boots it until QEMU has
/// accepted the guest network with its `-cmd:` rule and quits through the console's Ctrl-A X.
#[test]
fn readme_updates_commands_run_as_printed() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    let readme = fs::read_to_string(workspace.join("README.md")).expect("README.md");
    let section = readme
        .split("\n## Updates\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README.md has an `## Updates` section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("the Updates section starts with an sh block");
    let mut commands: Vec<String> = block
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim().to_owned())
        .filter(|line| !line.is_empty())
        .collect();
    let offline = section
        .split('`')
        .find(|span| span.starts_with("mkfs.ext4 "))
        .expect("the offline updates paragraph shows a mkfs.ext4 command");
    commands.push(offline.to_owned());
    assert!(commands.len() >= 4, "{commands:?}");

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let plinth = env!("CARGO_BIN_EXE_plinth");
    let mut public_key = None;
    for command in &commands {
        let words: Vec<&str> = command.split_whitespace().collect();
        eprintln!("$ {command}");
        match words.as_slice() {
            ["plinth", "keygen", args @ ..] => {
                let out = std::process::Command::new(plinth)
                    .arg("keygen")
                    .args(args)
                    .current_dir(dir)
                    .output()
                    .expect("running plinth keygen");
                assert!(out.status.success(), "{command}: {out:?}");
                public_key = Some(
                    String::from_utf8(out.stdout)
                        .expect("utf-8")
                        .trim()
                        .to_owned(),
                );
            }
            ["plinth", "publish", definition, args @ ..] => {
                // The README's comment line: the public key into [update] keys of the definition.
                let key = public_key.as_deref().expect("keygen runs before publish");
                let source = fs::read_to_string(workspace.join(definition)).expect(definition);
                let target = dir.join(definition);
                fs::create_dir_all(target.parent().expect("folder")).expect("mkdir");
                fs::write(
                    &target,
                    format!("{source}\n[update]\nurl = \"http://10.0.2.100:8000\"\nkeys = [\"{key}\"]\n"),
                )
                .expect("definition");
                let def = builder::build::load_definition(&target).expect("edited definition");
                let disk = dir.join(format!("out/{}-{}.raw", def.image.name, def.image.version));
                fs::create_dir_all(dir.join("out")).expect("mkdir");
                make_disk(&disk, 3, 64);
                let out = std::process::Command::new(plinth)
                    .args(["publish", definition])
                    .args(args)
                    .current_dir(dir)
                    .output()
                    .expect("running plinth publish");
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(out.status.success(), "{command}: {out:?}");
                assert!(!stderr.contains("warning"), "{command}: {stderr}");
                let to = args
                    .windows(2)
                    .find(|w| w[0] == "--to")
                    .map(|w| w[1])
                    .expect("--to");
                let bytes = fs::read(dir.join(to).join("stable/manifest.json")).expect("manifest");
                let sig = fs::read(dir.join(to).join("stable/manifest.json.sig")).expect("sig");
                let trusted = os_config::manifest::PublicKey::parse(key).expect("public key");
                let m = manifest::verify_signed(&bytes, &sig, &[trusted]).expect("signed");
                assert_eq!(m.version, def.image.version);
            }
            ["plinth", "run", args @ ..] => run_until_qemu_is_up(plinth, args, dir, command),
            ["mkfs.ext4", args @ ..] => {
                let mkfs = builder::tools::MKFS_EXT4.find().expect("mkfs.ext4");
                let out = std::process::Command::new(mkfs)
                    .args(args)
                    .current_dir(dir)
                    .output()
                    .expect("running mkfs.ext4");
                assert!(out.status.success(), "{command}: {out:?}");
            }
            _ => panic!(
                "the README's Updates section shows `{command}`, which this test does not run yet"
            ),
        }
    }
}

/// Runs `plinth run ARGS` until it says what it serves and QEMU has been up for 3 s, then quits
/// QEMU as a user does (Ctrl-A X on the console) and expects a clean exit.
fn run_until_qemu_is_up(plinth: &str, args: &[&str], dir: &Path, command: &str) {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let mut child = std::process::Command::new(plinth)
        .arg("run")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("running plinth run");
    let group = child.id();
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let serving = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{command}: nothing on stderr ({e})"));
    let kill_group = || {
        let _ = rustix::process::kill_process_group(
            rustix::process::Pid::from_raw(group as i32).expect("pid"),
            rustix::process::Signal::Kill,
        );
    };
    if !serving.contains("to the guest at http://10.0.2.100:8000") {
        kill_group();
        panic!("{command}: stderr starts with `{serving}`");
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    if let Some(status) = child.try_wait().expect("wait") {
        let rest: Vec<String> = rx.try_iter().collect();
        panic!("{command}: exited early with {status}: {rest:?}");
    }
    let mut stdin = child.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, b"\x01x").expect("Ctrl-A X");
    drop(stdin);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let rest: Vec<String> = rx.try_iter().collect();
            assert!(status.success(), "{command}: {status}: {rest:?}");
            return;
        }
        if std::time::Instant::now() > deadline {
            kill_group();
            panic!("{command}: QEMU did not quit on Ctrl-A X");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Two root images built by the builder's own squashfs writer from trees that differ in one
/// declared file (`[[file]]` `/etc/motd`), published into one chunk store: the second adds only
/// the chunks around the change. Prints the fraction of the full root artifact that a machine
/// running the first downloads for the second (the delta: new chunks plus the index).
#[test]
fn a_one_file_change_adds_few_chunks_to_the_store() {
    use builder::disk::rootimage::{self, RootFormat};
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let tree = dir.join("tree");
    // A tree shaped like a root: many files of executable-like (incompressible) and text-like
    // content, in several folders, from a few bytes to a few MiB.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words = [
        "lib",
        "error",
        "config",
        "the",
        "value",
        "container",
        "mount",
        "=",
    ];
    for folder in [
        "usr/bin",
        "usr/lib/x86_64-linux-gnu",
        "usr/share/doc",
        "etc",
    ] {
        fs::create_dir_all(tree.join(folder)).expect("mkdir");
    }
    let mut total = 0usize;
    for i in 0..160 {
        let size = match next() % 10 {
            0 => 1 << 20 | (next() % (3 << 20)) as usize,
            1..=4 => (next() % 200_000) as usize,
            _ => (next() % 8_000) as usize,
        };
        let (folder, data): (&str, Vec<u8>) = if i % 3 == 0 {
            let mut text = String::new();
            while text.len() < size {
                text.push_str(words[(next() % words.len() as u64) as usize]);
                text.push(if next() % 9 == 0 { '\n' } else { ' ' });
            }
            ("usr/share/doc", text.into_bytes())
        } else {
            let folder = if i % 2 == 0 {
                "usr/bin"
            } else {
                "usr/lib/x86_64-linux-gnu"
            };
            (folder, (0..size).map(|_| next() as u8).collect())
        };
        total += data.len();
        fs::write(tree.join(folder).join(format!("file-{i:03}")), data).expect("write");
    }
    let build = |motd: &str, out: &str| {
        fs::write(tree.join("etc/motd"), motd).expect("motd");
        let image = dir.join(out);
        rootimage::build(
            RootFormat::Squashfs,
            &tree,
            &image,
            1_700_000_000,
            &uuid::Uuid::from_u128(3),
            None,
        )
        .expect("mksquashfs");
        fs::read(image).expect("image")
    };
    let v1 = build("Welcome to version 1\n", "v1.img");
    let v2 = build("Welcome to version 2, with a longer message\n", "v2.img");
    assert_ne!(v1, v2);

    let store = dir.join("release");
    fs::create_dir_all(store.join("artifacts")).expect("mkdir");
    let (_, first) = publish::store_chunks(&v1[..], &store).expect("chunks of v1");
    assert_eq!(first.reused, 0);
    let (index_file, second) = publish::store_chunks(&v2[..], &store).expect("chunks of v2");
    let full = publish::store_artifact_framed(&v2[..], &store, publish::FRAME_SIZE)
        .expect("root artifact of v2");
    let delta = second.new_bytes + second.index_bytes;
    let fraction = delta as f64 / full.size as f64;
    eprintln!(
        "one [[file]] changed in a {:.1} MiB squashfs ({:.1} MiB of files): {second}; \
         delta {delta} bytes of the {} byte root artifact = {:.2}%",
        v2.len() as f64 / f64::from(1 << 20),
        total as f64 / f64::from(1 << 20),
        full.size,
        fraction * 100.0
    );
    assert!(second.new >= 1, "the changed file is in a new chunk");
    assert!(
        fraction <= 0.05,
        "delta is {:.2}% of the payload",
        fraction * 100.0
    );
    // The index lists v2 and every chunk it names is in the store, compressed on its own.
    let index = os_config::chunk::ChunkIndex::parse(
        &fs::read(store.join(&index_file.path)).expect("index"),
    )
    .expect("index parses");
    assert_eq!(index.total_length(), v2.len() as u64);
    let mut rebuilt = Vec::new();
    for c in &index.chunks {
        let compressed = fs::read(store.join(c.path())).expect("chunk file");
        assert_eq!(compressed.len() as u64, u64::from(c.compressed_length));
        rebuilt.extend(zstd::decode_all(&compressed[..]).expect("chunk decodes"));
    }
    assert!(rebuilt == v2, "the chunks make up v2");
    // Publishing v2 again adds nothing.
    let (_, again) = publish::store_chunks(&v2[..], &store).expect("again");
    assert_eq!((again.new, again.new_bytes), (0, 0));
    // A chunk file whose content was altered is never overwritten.
    let victim = store.join(index.chunks[0].path());
    fs::write(&victim, b"not zstd").expect("corrupt");
    let err = publish::store_chunks(&v2[..], &store).expect_err("corrupt chunk");
    assert!(format!("{err:#}").contains("never overwritten"), "{err:#}");
}
