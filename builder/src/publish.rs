//! `plinth keygen` and `plinth publish`: signing keys, and a static release folder built from a disk
//! image (content-addressed zstd artifacts, a signed manifest per version and per channel).

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use os_config::boot::Entry;
use os_config::manifest::{
    self, Artifact, Artifacts, Frame, Manifest, PublicKey, SecretKey, VeritySuperblock,
    VERITY_BLOCK_SIZE,
};
use os_config::units::{Name, Sha256, Version};
use sha2::{Digest, Sha256 as Hasher};

/// zstd level of published artifacts: a good ratio at a speed a build machine tolerates.
pub const ZSTD_LEVEL: i32 = 10;
/// Uncompressed size of each independent zstd frame of the root and verity artifacts: an
/// interrupted download resumes at a frame boundary.
pub const FRAME_SIZE: usize = 16 << 20;
/// How long a published manifest stays valid by default: 30 days from the time of publishing.
pub const DEFAULT_VALIDITY: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// When a published manifest expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// This long after the wall-clock time of publishing (not `SOURCE_DATE_EPOCH`: an old
    /// reproducible build time must not publish an already expired release).
    In(std::time::Duration),
    /// At this time, seconds since the Unix epoch: the same manifest bytes on every run.
    At(u64),
}

impl Default for Expiry {
    fn default() -> Self {
        Expiry::In(DEFAULT_VALIDITY)
    }
}

impl Expiry {
    /// The expiry time, seconds since the Unix epoch, for a release published at `now`.
    pub fn at(self, now: u64) -> u64 {
        match self {
            Expiry::In(validity) => now.saturating_add(validity.as_secs()),
            Expiry::At(at) => at,
        }
    }
}

/// `plinth keygen --out PREFIX`.
pub fn keygen(out: &Path) -> Result<()> {
    let public = write_keypair(out)?;
    println!("{public}");
    eprintln!(
        "wrote {0}.key (keep it secret) and {0}.pub; put the line above into [update] keys",
        out.display()
    );
    Ok(())
}

/// Writes `PREFIX.key` (mode 0600, never overwritten) and `PREFIX.pub`; returns the public key.
/// Everything that can be checked is checked before anything is written (an existing key, a
/// `.pub` path that is a folder, a missing or unwritable folder); if writing fails after the key
/// was created, the key and the temporary `.pub` are removed again, so a refusal leaves the
/// folder as it was.
pub fn write_keypair(prefix: &Path) -> Result<PublicKey> {
    let key_path = with_suffix(prefix, ".key");
    let pub_path = with_suffix(prefix, ".pub");
    let folder = match prefix.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    if !folder.is_dir() {
        bail!(
            "cannot write {}: folder {} does not exist",
            key_path.display(),
            folder.display()
        );
    }
    if key_path.symlink_metadata().is_ok() {
        bail!(
            "{} already exists: an existing key is never overwritten",
            key_path.display()
        );
    }
    if pub_path.is_dir() {
        bail!(
            "cannot write {}: it is a folder (choose another --out prefix)",
            pub_path.display()
        );
    }
    let mut seed = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("reading 32 random bytes from /dev/urandom")?;
    let secret = SecretKey::from_seed(seed);
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(|e| {
                let why = match e.kind() {
                    io::ErrorKind::AlreadyExists => {
                        "it already exists: an existing key is never overwritten".to_owned()
                    }
                    io::ErrorKind::PermissionDenied => {
                        format!("permission denied in folder {}", folder.display())
                    }
                    io::ErrorKind::NotFound => {
                        format!("folder {} does not exist", folder.display())
                    }
                    _ => e.to_string(),
                };
                anyhow::anyhow!("cannot create {}: {why}", key_path.display())
            })?
    };
    let public = secret.public();
    let written = file
        .write_all(secret.to_text().as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", key_path.display()))
        .and_then(|()| write_atomic(&pub_path, format!("{public}\n").as_bytes()));
    if let Err(e) = written {
        // Only what this call created: the key (create_new above) and the temporary .pub.
        let _ = fs::remove_file(&key_path);
        let _ = fs::remove_file(with_suffix(&pub_path, ".tmp"));
        return Err(e);
    }
    Ok(public)
}

/// Reads a private key written by `plinth keygen`.
pub fn read_secret_key(path: &Path) -> Result<SecretKey> {
    let text =
        fs::read_to_string(path).with_context(|| format!("reading key {}", path.display()))?;
    SecretKey::parse(&text).with_context(|| format!("parsing key {}", path.display()))
}

/// What `plinth publish` is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The image definition whose built disk image is published.
    pub file: PathBuf,
    /// Private key written by `plinth keygen`.
    pub key: PathBuf,
    /// Release folder.
    pub to: PathBuf,
    /// The built disk image; `None` is `out/<name>-<version>.raw`, built first if missing.
    pub disk: Option<PathBuf>,
    /// Staged rollout: spread machines over this window from now.
    pub rollout: Option<os_config::units::Duration>,
    /// When the manifest expires.
    pub expires: Expiry,
}

/// `plinth publish FILE --key KEY --to DIR [--disk IMAGE]`.
pub fn publish(args: &Options) -> Result<()> {
    let def = crate::build::load_definition(&args.file)?;
    let disk = args.disk.clone().unwrap_or_else(|| {
        PathBuf::from("out").join(format!("{}-{}.raw", def.image.name, def.image.version))
    });
    // The key first: a wrong key path fails before a long build.
    let key = read_secret_key(&args.key)?;
    let disk = if disk.exists() {
        disk
    } else if args.disk.is_some() {
        bail!(
            "disk image {} does not exist: run `plinth build {}` first, or leave out --disk to build it",
            disk.display(),
            args.file.display()
        );
    } else {
        eprintln!(
            "{} does not exist: building {} first",
            disk.display(),
            args.file.display()
        );
        let build = crate::build::Options {
            file: args.file.clone(),
            output: disk
                .parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
            format: vec!["raw".to_owned()],
            init: std::env::var_os("PLINTH_INIT").map(PathBuf::from),
            keep_tree: None,
            cache: crate::cache::Options {
                dir: std::env::var_os("PLINTH_CACHE_DIR").map(PathBuf::from),
                offline: false,
            },
            zstd_level: None,
        };
        let built = crate::build::build_image(&build)
            .with_context(|| format!("building {} to publish it", args.file.display()))?;
        built.raw
    };
    let channel = match &def.update {
        Some(update) => update.channel.clone(),
        None => Name::parse("stable").map_err(anyhow::Error::msg)?,
    };
    if let Some(update) = &def.update {
        let public = key.public();
        let trusted = update
            .keys
            .iter()
            .any(|k| PublicKey::parse(k).is_ok_and(|k| k == public));
        if !trusted {
            eprintln!(
                "warning: {} is not among [update] keys of {}; machines running this image will refuse releases signed with it",
                public,
                args.file.display()
            );
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let expires = args.expires.at(now);
    if expires <= now {
        eprintln!(
            "warning: the manifest expires at {}, which has passed: machines will refuse this release",
            manifest::rfc3339(expires)
        );
    }
    let release = Release {
        disk: &disk,
        name: &def.image.name,
        version: &def.image.version,
        channel: &channel,
        cmdline: &def.kernel.cmdline,
        created: source_date_epoch()?,
        // The rollout starts when the release is published, whatever SOURCE_DATE_EPOCH says.
        rollout: args.rollout.map(|spread| manifest::Rollout {
            start: now,
            spread_seconds: spread.0.as_secs(),
        }),
        expires,
    };
    let manifest = publish_release(&release, &key, &args.to)?;
    println!(
        "published {} {} to {}/{}/{} (root hash {}, expires {})",
        manifest.name,
        manifest.version,
        args.to.display(),
        manifest.channel,
        manifest.version,
        manifest.root_hash,
        manifest.expires
    );
    Ok(())
}

/// What one release is made from.
#[derive(Debug)]
pub struct Release<'a> {
    /// The built disk image; slot A is published.
    pub disk: &'a Path,
    pub name: &'a Name,
    pub version: &'a Version,
    pub channel: &'a Name,
    /// Kernel arguments used when the disk's slot A entry cannot be read.
    pub cmdline: &'a [String],
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Staged rollout, if any.
    pub rollout: Option<manifest::Rollout>,
    /// Expiry time, seconds since the Unix epoch.
    pub expires: u64,
}

/// Extracts slot A of `release.disk`, writes its artifacts and signed manifests into `to`.
pub fn publish_release(release: &Release<'_>, key: &SecretKey, to: &Path) -> Result<Manifest> {
    let disk_path = release.disk;
    let mut disk = fs::File::open(disk_path)
        .with_context(|| format!("opening disk image {}", disk_path.display()))?;
    let slot = read_slot_a(&mut disk, disk_path)?;
    let (root, verity, sb, root_hash) =
        (&slot.root, &slot.verity, &slot.superblock, slot.root_hash);
    let (root_size, verity_size) = (slot.root_size, slot.verity_size);
    let (kernel, initrd) = (&slot.kernel, &slot.initrd);
    let cmdline = match &slot.entry {
        Some(entry) => release_cmdline(entry),
        None => release.cmdline.to_vec(),
    };

    let artifacts_dir = to.join("artifacts");
    fs::create_dir_all(&artifacts_dir)
        .with_context(|| format!("creating {}", artifacts_dir.display()))?;
    let mut region = |part: &Partition, len: u64| -> Result<Artifact> {
        disk.seek(SeekFrom::Start(part.start))?;
        let reader = (&mut disk).take(len);
        store_artifact_framed(reader, to, FRAME_SIZE)
    };
    let root_artifact = region(root, root_size)
        .with_context(|| format!("publishing root-a of {}", disk_path.display()))?;
    let verity_artifact = region(verity, verity_size)
        .with_context(|| format!("publishing verity-a of {}", disk_path.display()))?;
    disk.seek(SeekFrom::Start(root.start))
        .with_context(|| format!("reading root-a of {}", disk_path.display()))?;
    let (root_chunks, stats) = store_chunks((&mut disk).take(root_size), to)
        .with_context(|| format!("chunking root-a of {}", disk_path.display()))?;
    eprintln!("{stats}");
    let kernel_artifact = store_artifact(&kernel[..], to).context("publishing the kernel")?;
    let initrd_artifact = store_artifact(&initrd[..], to).context("publishing the initrd")?;

    let manifest = Manifest {
        format: manifest::FORMAT,
        name: release.name.clone(),
        version: release.version.clone(),
        channel: release.channel.clone(),
        created: manifest::rfc3339(release.created),
        expires: manifest::rfc3339(release.expires),
        root_hash: Sha256::parse(&hex::encode(root_hash)).map_err(anyhow::Error::msg)?,
        salt: hex::encode(&sb.salt),
        data_blocks: sb.data_blocks,
        cmdline,
        rollout: release.rollout,
        artifacts: Artifacts {
            root: root_artifact,
            verity: verity_artifact,
            kernel: kernel_artifact,
            initrd: initrd_artifact,
        },
        root_chunks: Some(root_chunks),
    };
    let bytes = manifest.to_bytes();
    // Check what we are about to sign parses back.
    Manifest::parse(&bytes).context("checking the manifest about to be signed")?;
    let signature = key.sign(&bytes);

    let version_dir = to
        .join(manifest.channel.as_str())
        .join(manifest.version.as_str());
    fs::create_dir_all(&version_dir)
        .with_context(|| format!("creating {}", version_dir.display()))?;
    let version_manifest = version_dir.join(manifest::MANIFEST_FILE);
    if let Ok(existing) = fs::read(&version_manifest) {
        let same = Manifest::parse(&existing)
            // Publishing the same release again renews its times (and so its expiry), and adds
            // the chunk index to a release published before there was one.
            .map(|old| Manifest {
                format: manifest.format,
                created: manifest.created.clone(),
                expires: manifest.expires.clone(),
                root_chunks: manifest.root_chunks.clone(),
                ..old
            })
            .is_ok_and(|old| old == manifest);
        if !same {
            bail!(
                "{} already holds a different release {}: publish a higher version instead",
                version_manifest.display(),
                manifest.version
            );
        }
    }
    write_atomic(
        &version_dir.join(manifest::SIGNATURE_FILE),
        signature.as_bytes(),
    )?;
    write_atomic(&version_manifest, &bytes)?;

    let channel_dir = to.join(manifest.channel.as_str());
    let channel_manifest = channel_dir.join(manifest::MANIFEST_FILE);
    let newer_exists = fs::read(&channel_manifest)
        .ok()
        .and_then(|b| Manifest::parse(&b).ok())
        .is_some_and(|current| current.version > manifest.version);
    if newer_exists {
        eprintln!(
            "note: {} points to a newer version; left unchanged",
            channel_manifest.display()
        );
    } else {
        // Signature first: a reader that sees the new manifest with the old signature refuses it
        // and tries again; it never accepts an unsigned pair.
        write_atomic(
            &channel_dir.join(manifest::SIGNATURE_FILE),
            signature.as_bytes(),
        )?;
        write_atomic(&channel_manifest, &bytes)?;
    }
    Ok(manifest)
}

/// What publishing the chunks of a root image added to the chunk store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkStats {
    /// Chunks of the image (a chunk that occurs twice counts twice).
    pub chunks: u64,
    /// Distinct chunks that were not in the store yet, and their compressed bytes.
    pub new: u64,
    pub new_bytes: u64,
    /// Distinct chunks already in the store (from an earlier release), and their compressed bytes.
    pub reused: u64,
    pub reused_bytes: u64,
    /// Size of the index file.
    pub index_bytes: u64,
}

impl std::fmt::Display for ChunkStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "root image: {} chunks, {} new in the chunk store ({} bytes compressed), {} already there ({} bytes); index {} bytes",
            self.chunks, self.new, self.new_bytes, self.reused, self.reused_bytes, self.index_bytes
        )
    }
}

/// Cuts the image `reader` gives into chunks ([`os_config::chunk`]), stores each missing one as
/// `DIR/chunks/<sha256>.zst` (compressed on its own, so any release can fetch it alone), checks
/// the ones already stored, and writes the index `DIR/chunks/<sha256>.index`.
pub fn store_chunks(reader: impl Read, dir: &Path) -> Result<(manifest::IndexFile, ChunkStats)> {
    use os_config::chunk::{self, ChunkIndex};
    let chunks_dir = dir.join("chunks");
    fs::create_dir_all(&chunks_dir)
        .with_context(|| format!("creating {}", chunks_dir.display()))?;
    let mut index = ChunkIndex::default();
    let mut stats = ChunkStats::default();
    let mut seen = std::collections::HashMap::new();
    let temp = chunks_dir.join(format!(".incoming-{}", std::process::id()));
    chunk::for_each_chunk(reader, |_, data| {
        let sha256 = chunk::digest(data);
        stats.chunks += 1;
        let compressed_length = match seen.get(&sha256) {
            Some(len) => *len,
            None => {
                let target = dir.join(chunk::chunk_path(&sha256));
                let len = match fs::read(&target) {
                    Ok(existing) => {
                        let content = zstd::decode_all(&existing[..]).ok();
                        if content.as_deref().map(chunk::digest) != Some(sha256) {
                            return Err(io::Error::other(format!(
                                "{} exists but does not decompress to the chunk it names; it is never overwritten: remove it and publish again",
                                target.display()
                            )));
                        }
                        stats.reused += 1;
                        stats.reused_bytes += existing.len() as u64;
                        existing.len()
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        let compressed = zstd::bulk::compress(data, ZSTD_LEVEL)?;
                        let mut file = fs::File::create(&temp)?;
                        file.write_all(&compressed)?;
                        file.sync_all()?;
                        fs::rename(&temp, &target)?;
                        stats.new += 1;
                        stats.new_bytes += compressed.len() as u64;
                        compressed.len()
                    }
                    Err(e) => return Err(e),
                };
                let len = u32::try_from(len).map_err(io::Error::other)?;
                seen.insert(sha256, len);
                len
            }
        };
        index.push(data.len() as u32, sha256, compressed_length);
        Ok(())
    })
    .with_context(|| format!("storing chunks in {}", chunks_dir.display()))?;
    sync_dir(&chunks_dir)?;
    let bytes = index.to_bytes();
    ChunkIndex::parse(&bytes).context("checking the chunk index about to be written")?;
    let sha256 = Sha256::parse(&hex::encode(Hasher::digest(&bytes))).map_err(anyhow::Error::msg)?;
    let path = chunk::index_path(sha256.as_str());
    write_atomic(&dir.join(&path), &bytes)?;
    stats.index_bytes = bytes.len() as u64;
    Ok((
        manifest::IndexFile {
            path,
            size: bytes.len() as u64,
            sha256,
        },
        stats,
    ))
}

/// `SOURCE_DATE_EPOCH` if set (reproducible builds), else the current time.
pub fn source_date_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(text) => text.trim().parse().with_context(|| {
            format!("SOURCE_DATE_EPOCH `{text}`: expected seconds since 1970 as a whole number")
        }),
        Err(_) => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)),
    }
}

/// Slot A of a built disk image: where its root and verity tree are, and its ESP files.
#[derive(Debug)]
pub(crate) struct SlotA {
    /// The `root-a` partition.
    pub root: Partition,
    /// The `verity-a` partition.
    pub verity: Partition,
    /// The verity superblock at the start of `verity-a`.
    pub superblock: VeritySuperblock,
    /// Bytes of root image the tree covers (`data_blocks` × 4096).
    pub root_size: u64,
    /// Bytes of `verity-a` in use: the superblock block and the tree levels.
    pub verity_size: u64,
    /// The verity root hash, computed from the tree on the disk.
    pub root_hash: [u8; 32],
    /// `plinth/a/vmlinuz` on the ESP.
    pub kernel: Vec<u8>,
    /// `plinth/a/initrd` on the ESP.
    pub initrd: Vec<u8>,
    /// Slot A's boot entry, if the ESP has one; its root hash (if any) matches `root_hash`.
    pub entry: Option<Entry>,
}

/// Reads slot A of the disk image `disk` (opened from `disk_path`): partitions, verity
/// superblock and root hash, and the kernel, initrd and boot entry from the ESP. Refuses a boot
/// entry that names another root hash than the tree gives.
pub(crate) fn read_slot_a(disk: &mut fs::File, disk_path: &Path) -> Result<SlotA> {
    let parts = read_partitions(disk, disk_path)?;
    let find = |label: &str| {
        parts
            .iter()
            .find(|p| p.label == label)
            .cloned()
            .with_context(|| {
                format!(
                    "disk image {} has no GPT partition labelled `{label}`",
                    disk_path.display()
                )
            })
    };
    let (root, verity, esp) = (find("root-a")?, find("verity-a")?, find("esp")?);

    let mut sb_bytes = vec![0u8; VeritySuperblock::SIZE];
    disk.seek(SeekFrom::Start(verity.start))
        .and_then(|_| disk.read_exact(&mut sb_bytes))
        .with_context(|| format!("reading verity superblock of {}", disk_path.display()))?;
    let superblock = VeritySuperblock::parse(&sb_bytes)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("reading partition verity-a of {}", disk_path.display()))?;
    let root_size = superblock.data_bytes();
    let verity_size = superblock
        .check_fits(&root.label, root.size, &verity.label, verity.size)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("reading partition verity-a of {}", disk_path.display()))?;
    let root_hash = compute_root_hash(disk, &root, &verity, &superblock)
        .with_context(|| format!("reading verity tree of {}", disk_path.display()))?;

    let (kernel, initrd, entry_text) = read_esp(disk, &esp).with_context(|| {
        format!(
            "reading slot a files from the ESP of {}",
            disk_path.display()
        )
    })?;
    let entry = match entry_text {
        Some(text) => {
            let entry = Entry::parse(&text)
                .map_err(anyhow::Error::msg)
                .with_context(|| {
                    format!(
                        "reading the boot entry of slot a in {}",
                        disk_path.display()
                    )
                })?;
            let hash = &entry.root_hash;
            if !hash.is_empty() && *hash != hex::encode(root_hash) {
                bail!(
                    "boot entry of slot a in {} names root hash {hash}, but the verity tree gives {}",
                    disk_path.display(),
                    hex::encode(root_hash)
                );
            }
            Some(entry)
        }
        None => None,
    };
    Ok(SlotA {
        root,
        verity,
        superblock,
        root_size,
        verity_size,
        root_hash,
        kernel,
        initrd,
        entry,
    })
}

/// A GPT partition, as the one reader gives it.
pub use os_config::gpt::Partition;

/// Reads the GPT partition table of a disk image through the one reader.
pub fn read_partitions(disk: &mut fs::File, path: &Path) -> Result<Vec<Partition>> {
    let table = crate::disk::gpt::read_gpt(disk)
        .with_context(|| format!("reading GPT of {}", path.display()))?;
    Ok(table.partitions)
}

/// The verity root hash: the hash of the single top-level block (or of the one data block).
fn compute_root_hash(
    disk: &mut fs::File,
    root: &Partition,
    verity: &Partition,
    sb: &VeritySuperblock,
) -> io::Result<[u8; 32]> {
    let mut block = vec![0u8; VERITY_BLOCK_SIZE as usize];
    let offset = match manifest::verity_levels(sb.data_blocks).last() {
        Some((position, _)) => verity.start + position * VERITY_BLOCK_SIZE,
        None => root.start,
    };
    disk.seek(SeekFrom::Start(offset))?;
    disk.read_exact(&mut block)?;
    Ok(manifest::verity_hash(&sb.salt, &block))
}

/// Reads slot A's kernel, initrd and boot entry text from the FAT ESP, through the bounded
/// reader `plinth inspect` uses.
fn read_esp(disk: &mut fs::File, esp: &Partition) -> Result<(Vec<u8>, Vec<u8>, Option<String>)> {
    let region = crate::disk::slice::Slice::new(disk, esp.start, esp.size);
    let reader = crate::disk::esp::EspReader::open(region).context("opening FAT")?;
    let kernel = reader.read("plinth/a/vmlinuz")?;
    let initrd = reader.read("plinth/a/initrd")?;
    let mut entry_text = None;
    let has_entries = reader.list("/")?.iter().any(|n| n == "loader")
        && reader.list("/loader")?.iter().any(|n| n == "entries");
    let entries = if has_entries {
        reader.list(os_config::boot::ENTRIES_DIR)?
    } else {
        Vec::new()
    };
    for name in entries {
        if name.starts_with("plinth-a-") && name.ends_with(".conf") {
            let path = format!("{}/{name}", os_config::boot::ENTRIES_DIR);
            let text = String::from_utf8(reader.read(&path)?)
                .with_context(|| format!("reading {path} on the ESP: not UTF-8"))?;
            entry_text = Some(text);
        }
    }
    Ok((kernel, initrd, entry_text))
}

/// The kernel arguments a release carries from the boot entry it was built with: everything but
/// the slot, version and root hash, which the agent writes for the slot it installs into.
pub(crate) fn release_cmdline(entry: &Entry) -> Vec<String> {
    let verity_off = (!entry.verity).then(|| format!("{}=off", os_config::boot::ARG_VERITY));
    verity_off
        .into_iter()
        .chain(entry.extra_args.iter().cloned())
        .collect()
}

/// Compresses `reader` as one zstd frame into `DIR/artifacts/<sha256>.zst`, never replacing
/// different content.
pub fn store_artifact(reader: impl Read, dir: &Path) -> Result<Artifact> {
    store_artifact_framed(reader, dir, usize::MAX)
}

/// Like [`store_artifact`], cutting the content into independent frames of `frame_size` bytes
/// (recorded in the artifact) when it is larger than one frame.
pub fn store_artifact_framed(
    mut reader: impl Read,
    dir: &Path,
    frame_size: usize,
) -> Result<Artifact> {
    let artifacts = dir.join("artifacts");
    let temp = artifacts.join(format!(".incoming-{}", std::process::id()));
    let file = fs::File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
    let mut hashed_out = HashWriter::new(file);
    let mut hashed_in = HashWriter::new(io::sink());
    let mut frames = Vec::new();
    let mut buf = vec![0u8; frame_size.min(FRAME_SIZE)];
    loop {
        // One frame: up to `frame_size` bytes, read in buffer-sized pieces.
        let start = (hashed_out.len, hashed_in.len);
        let mut encoder: Option<zstd::stream::Encoder<'_, &mut HashWriter<fs::File>>> = None;
        let mut in_frame = 0usize;
        while in_frame < frame_size {
            let want = buf.len().min(frame_size - in_frame);
            let n = os_config::slice::read_full(&mut reader, &mut buf[..want])
                .with_context(|| format!("reading content for {}", temp.display()))?;
            if n == 0 {
                break;
            }
            if encoder.is_none() {
                let mut e = zstd::stream::Encoder::new(&mut hashed_out, ZSTD_LEVEL)
                    .context("starting zstd")?;
                e.include_checksum(true).context("configuring zstd")?;
                encoder = Some(e);
            }
            if let Some(e) = encoder.as_mut() {
                e.write_all(&buf[..n])
                    .with_context(|| format!("compressing into {}", temp.display()))?;
            }
            hashed_in.write_all(&buf[..n])?;
            in_frame += n;
        }
        let Some(encoder) = encoder else { break };
        encoder
            .finish()
            .with_context(|| format!("compressing into {}", temp.display()))?;
        frames.push(Frame {
            offset: start.0,
            uncompressed_offset: start.1,
        });
        if in_frame < frame_size {
            break;
        }
    }
    if frames.is_empty() {
        // Empty content is still one (empty) frame.
        zstd::stream::Encoder::new(&mut hashed_out, ZSTD_LEVEL)
            .and_then(|e| e.finish())
            .with_context(|| format!("compressing into {}", temp.display()))?;
    }
    if frames.len() == 1 {
        frames.clear();
    }
    let (uncompressed_size, uncompressed_sha256) = hashed_in.finish();
    let (size, sha256) = hashed_out.finish();
    hashed_out
        .inner
        .sync_all()
        .with_context(|| format!("writing {}", temp.display()))?;
    let sha256 = Sha256::parse(&sha256).map_err(anyhow::Error::msg)?;
    let path = Artifact::path_for(&sha256);
    let target = dir.join(&path);
    if target.exists() {
        let existing = hash_file(&target)?;
        fs::remove_file(&temp).with_context(|| format!("removing {}", temp.display()))?;
        if existing != sha256.as_str() {
            bail!(
                "{} exists with different content (sha256 {existing}); it is never overwritten: check the release folder",
                target.display()
            );
        }
    } else {
        fs::rename(&temp, &target)
            .with_context(|| format!("renaming {} to {}", temp.display(), target.display()))?;
        sync_dir(&artifacts)?;
    }
    Ok(Artifact {
        path,
        size,
        sha256,
        uncompressed_size,
        uncompressed_sha256: Sha256::parse(&uncompressed_sha256).map_err(anyhow::Error::msg)?,
        frames,
    })
}

fn hash_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = HashWriter::new(io::sink());
    io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hasher.finish().1)
}

/// Writes `bytes` to `path` through a temporary file and a rename, then syncs the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let temp = with_suffix(path, ".tmp");
    let mut file =
        fs::File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", temp.display()))?;
    fs::rename(&temp, path)
        .with_context(|| format!("renaming {} to {}", temp.display(), path.display()))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Syncs a folder, so the names of the files renamed into it are on disk.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing folder {}", dir.display()))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A writer that counts and hashes what passes through it.
pub(crate) struct HashWriter<W> {
    pub(crate) inner: W,
    hasher: Hasher,
    len: u64,
}

impl<W: Write> HashWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Hasher::new(),
            len: 0,
        }
    }

    /// Length and hex sha256 of everything written so far.
    pub(crate) fn finish(&mut self) -> (u64, String) {
        (self.len, hex::encode(self.hasher.clone().finalize()))
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_counts_from_publishing_or_is_fixed() {
        let now = 1_795_820_399;
        assert_eq!(Expiry::default().at(now), now + 30 * 86_400);
        assert_eq!(
            Expiry::In(std::time::Duration::from_secs(3600)).at(now),
            now + 3600
        );
        assert_eq!(Expiry::At(1_577_836_800).at(now), 1_577_836_800);
        assert_eq!(
            Expiry::In(std::time::Duration::MAX).at(now),
            u64::MAX,
            "saturates"
        );
    }

    #[test]
    fn entry_options_split_off_plinth_arguments() {
        let entry = Entry::parse(
            "options plinth.slot=a plinth.version=1 plinth.roothash=abcd console=ttyS0 quiet\n",
        )
        .expect("parses");
        assert_eq!(entry.root_hash, "abcd");
        assert_eq!(release_cmdline(&entry), ["console=ttyS0", "quiet"]);
        let debug = Entry::parse("options plinth.slot=a plinth.verity=off console=ttyS0\n")
            .expect("parses");
        assert_eq!(debug.root_hash, "");
        assert_eq!(
            release_cmdline(&debug),
            ["plinth.verity=off", "console=ttyS0"]
        );
    }
}
