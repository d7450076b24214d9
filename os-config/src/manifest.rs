//! The release manifest `plinth publish` writes and `plinth-update` trusts: format, ed25519 keys and
//! detached signatures, the dm-verity superblock it describes, and the rules for which version a
//! machine accepts. Pure functions over bytes; no I/O.

use std::fmt;

use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256 as Sha256Hasher};

use crate::units::{Name, Sha256, Version};

/// The manifest format this code writes: 2 added `expires`, 3 the optional `root-chunks`.
pub const FORMAT: u32 = 3;
/// The oldest format this code reads: a format 2 manifest is a format 3 one without `root-chunks`.
pub const OLDEST_FORMAT: u32 = 2;
/// How far a manifest's `created` may lie ahead of the machine's clock before it is refused.
pub const MAX_CLOCK_SKEW_SECONDS: u64 = 10 * 60;
/// File name of a manifest inside a channel or version folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of the detached signature beside the manifest.
pub const SIGNATURE_FILE: &str = "manifest.json.sig";
/// The verity superblock and block size, shared with the disk layout.
pub use crate::layout::{VeritySuperblock, VERITY_BLOCK_SIZE};

/// Why a manifest, key or signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("malformed manifest: {0}")]
    Malformed(String),
    #[error("manifest format {found} is not supported (this agent reads formats {OLDEST_FORMAT} to {FORMAT})")]
    UnsupportedFormat { found: u32 },
    #[error(
        "manifest format 1 has no expiry time, which this agent requires (format {FORMAT}): publish the release again with this version of `plinth publish`"
    )]
    NoExpiry,
    #[error("malformed key `{text}`: {reason}")]
    MalformedKey { text: String, reason: String },
    #[error("malformed signature: {0}")]
    MalformedSignature(String),
    #[error("signature does not verify with any of the {keys} trusted key(s)")]
    BadSignature { keys: usize },
    #[error("no trusted keys are configured ([update] keys is empty)")]
    NoKeys,
}

/// A signed description of one release of one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: u32,
    /// Image name (`[image] name`); an agent only accepts its own image's releases.
    pub name: Name,
    pub version: Version,
    pub channel: Name,
    /// Creation time, RFC 3339 UTC (from `SOURCE_DATE_EPOCH` when set).
    pub created: String,
    /// Expiry time, RFC 3339 UTC: an agent refuses the manifest from then on, so a server (or a
    /// mirror, or an attacker in between) cannot keep serving an old release for ever.
    pub expires: String,
    /// dm-verity root hash of the root image (hex).
    pub root_hash: Sha256,
    /// dm-verity salt (hex, may be empty).
    pub salt: String,
    /// Number of 4096-byte data blocks of the root image covered by the verity tree.
    pub data_blocks: u64,
    /// The image's own kernel arguments, appended after Plinth's `plinth.*` ones.
    #[serde(default)]
    pub cmdline: Vec<String>,
    /// Staged rollout: machines take the release at times spread over a window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    pub artifacts: Artifacts,
    /// The chunk index of the root image (format 3): an agent that has most of these chunks in
    /// its running slot downloads only the others, from `chunks/<sha256>.zst`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_chunks: Option<IndexFile>,
}

/// A chunk index file ([`crate::chunk::ChunkIndex`]) of a release, stored uncompressed (it is
/// mostly hashes) at `chunks/<sha256>.index`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct IndexFile {
    /// Path relative to the release folder: `chunks/<sha256 of the file>.index`.
    pub path: String,
    /// Size of the file, at most [`crate::chunk::MAX_INDEX_SIZE`].
    pub size: u64,
    /// sha256 of the file.
    pub sha256: Sha256,
}

/// A staged rollout: each machine takes the release at its own moment within
/// `[start, start + spread-seconds)`, seeded by its machine id, so a fleet updates in waves and a
/// bad release can be pulled before it reaches everyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Rollout {
    /// Start of the rollout, seconds since the Unix epoch.
    pub start: u64,
    /// Length of the window over which machines are spread.
    pub spread_seconds: u64,
}

impl Rollout {
    /// When the machine with `machine_id` takes `version` (seconds since the Unix epoch). The
    /// same machine and version always get the same moment; machines spread evenly.
    pub fn due(&self, machine_id: &str, version: &Version) -> u64 {
        let mut h = Sha256Hasher::new();
        h.update(machine_id.trim().as_bytes());
        h.update(b"\0");
        h.update(version.as_str().as_bytes());
        let digest = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        let fraction = u64::from_be_bytes(first);
        let offset = (u128::from(fraction) * u128::from(self.spread_seconds)) >> 64;
        self.start.saturating_add(offset as u64)
    }
}

/// The four files a release consists of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Artifacts {
    /// The root filesystem image (exactly `data-blocks * 4096` bytes).
    pub root: Artifact,
    /// The verity superblock followed by the hash tree.
    pub verity: Artifact,
    pub kernel: Artifact,
    pub initrd: Artifact,
}

impl Artifacts {
    /// The artifacts with their names, in the order the agent applies them.
    pub fn named(&self) -> [(&'static str, &Artifact); 4] {
        [
            ("root", &self.root),
            ("verity", &self.verity),
            ("kernel", &self.kernel),
            ("initrd", &self.initrd),
        ]
    }
}

/// One zstd-compressed, content-addressed file of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Artifact {
    /// Path relative to the release folder: `artifacts/<sha256 of the compressed bytes>.zst`.
    pub path: String,
    /// Size of the compressed file.
    pub size: u64,
    /// sha256 of the compressed file.
    pub sha256: Sha256,
    /// Size after decompression.
    pub uncompressed_size: u64,
    /// sha256 after decompression.
    pub uncompressed_sha256: Sha256,
    /// Where each independent zstd frame starts, when the artifact is cut into frames; an
    /// interrupted download resumes at the last frame fully written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<Frame>,
}

/// The start of one independent zstd frame of an artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Frame {
    /// Offset in the compressed file.
    pub offset: u64,
    /// Offset in the decompressed content.
    pub uncompressed_offset: u64,
}

impl Artifact {
    /// The content-addressed path for compressed bytes with this digest.
    pub fn path_for(sha256: &Sha256) -> String {
        format!("artifacts/{sha256}.zst")
    }
}

impl Manifest {
    /// Parses manifest bytes and checks what the schema cannot: format, artifact paths, salt.
    /// Does not check the signature: use [`verify_signed`] for anything received.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        #[derive(Deserialize)]
        struct Format {
            format: u32,
        }
        // The format first: an older manifest fails with what to do rather than a missing field.
        match serde_json::from_slice::<Format>(bytes).map(|f| f.format) {
            Ok(1) => return Err(ManifestError::NoExpiry),
            Ok(found) if !(OLDEST_FORMAT..=FORMAT).contains(&found) => {
                return Err(ManifestError::UnsupportedFormat { found })
            }
            _ => {}
        }
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        for (key, value) in [
            ("created", &manifest.created),
            ("expires", &manifest.expires),
        ] {
            parse_rfc3339(value).map_err(|e| ManifestError::Malformed(format!("{key}: {e}")))?;
        }
        for (name, artifact) in manifest.artifacts.named() {
            if artifact.path != Artifact::path_for(&artifact.sha256) {
                return Err(ManifestError::Malformed(format!(
                    "artifact {name}: path `{}` is not `{}`",
                    artifact.path,
                    Artifact::path_for(&artifact.sha256)
                )));
            }
        }
        for (name, artifact) in manifest.artifacts.named() {
            let starts_at_zero = artifact
                .frames
                .first()
                .is_none_or(|f| f.offset == 0 && f.uncompressed_offset == 0);
            let increasing = artifact.frames.windows(2).all(|w| {
                w[0].offset < w[1].offset && w[0].uncompressed_offset < w[1].uncompressed_offset
            });
            let inside = artifact.frames.last().is_none_or(|f| {
                f.offset < artifact.size && f.uncompressed_offset < artifact.uncompressed_size
            });
            if !(starts_at_zero && increasing && inside) {
                return Err(ManifestError::Malformed(format!(
                    "artifact {name}: frames must start at 0, increase and lie inside the artifact"
                )));
            }
        }
        if let Some(index) = &manifest.root_chunks {
            if manifest.format < 3 {
                return Err(ManifestError::Malformed(format!(
                    "root-chunks needs format 3, the manifest says format {}",
                    manifest.format
                )));
            }
            let path = crate::chunk::index_path(index.sha256.as_str());
            if index.path != path {
                return Err(ManifestError::Malformed(format!(
                    "root-chunks: path `{}` is not `{path}`",
                    index.path
                )));
            }
            if index.size > crate::chunk::MAX_INDEX_SIZE {
                return Err(ManifestError::Malformed(format!(
                    "root-chunks: {} bytes, more than the limit of {}",
                    index.size,
                    crate::chunk::MAX_INDEX_SIZE
                )));
            }
        }
        if hex::decode(&manifest.salt).map_or(true, |s| s.len() > 256) {
            return Err(ManifestError::Malformed(format!(
                "salt `{}`: expected at most 256 bytes as hex",
                manifest.salt
            )));
        }
        // Checked, not saturating: `u64::MAX` blocks must not match a `u64::MAX`-byte root.
        if manifest.data_blocks == 0
            || manifest.data_blocks.checked_mul(VERITY_BLOCK_SIZE)
                != Some(manifest.artifacts.root.uncompressed_size)
        {
            return Err(ManifestError::Malformed(format!(
                "root artifact is {} bytes but data-blocks {} needs {} bytes",
                manifest.artifacts.root.uncompressed_size,
                manifest.data_blocks,
                manifest.data_blocks.saturating_mul(VERITY_BLOCK_SIZE)
            )));
        }
        Ok(manifest)
    }

    /// The canonical bytes of this manifest (pretty JSON with a final newline); these are signed.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self)
            .unwrap_or_else(|_| unreachable!("a manifest always serializes"));
        bytes.push(b'\n');
        bytes
    }
}

/// A trusted ed25519 public key, written `ed25519:<64 hex digits>`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{}", hex::encode(self.0.to_bytes()))
    }
}

impl PublicKey {
    /// Parses `ed25519:<hex>` as written by `plinth keygen` into `[update] keys`.
    pub fn parse(text: &str) -> Result<PublicKey, ManifestError> {
        let bad = |reason: &str| ManifestError::MalformedKey {
            text: text.to_owned(),
            reason: reason.to_owned(),
        };
        let hex_part = text
            .trim()
            .strip_prefix("ed25519:")
            .ok_or_else(|| bad("expected `ed25519:` followed by 64 hex digits"))?;
        let bytes: [u8; 32] = hex::decode(hex_part)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("expected 64 hex digits after `ed25519:`"))?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| bad("not a valid ed25519 point"))
    }
}

/// An ed25519 signing key, written `ed25519-secret:<64 hex digits of the seed>`.
pub struct SecretKey(ed25519_dalek::SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.public())
    }
}

impl SecretKey {
    /// Makes a key from 32 random bytes (the caller supplies the randomness).
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// Parses the text `plinth keygen` writes to `PREFIX.key`.
    pub fn parse(text: &str) -> Result<SecretKey, ManifestError> {
        let bytes: [u8; 32] = text
            .trim()
            .strip_prefix("ed25519-secret:")
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| ManifestError::MalformedKey {
                text: "<secret key file>".to_owned(),
                reason: "expected `ed25519-secret:` followed by 64 hex digits".to_owned(),
            })?;
        Ok(SecretKey::from_seed(bytes))
    }

    /// The text form stored in the private key file (with a final newline).
    pub fn to_text(&self) -> String {
        format!("ed25519-secret:{}\n", hex::encode(self.0.to_bytes()))
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs `bytes`; returns the detached signature file content (hex, final newline).
    pub fn sign(&self, bytes: &[u8]) -> String {
        format!("{}\n", hex::encode(self.0.sign(bytes).to_bytes()))
    }
}

/// Checks a detached signature (hex text) over `bytes` against any of `keys`.
pub fn verify_signature(
    bytes: &[u8],
    signature: &[u8],
    keys: &[PublicKey],
) -> Result<(), ManifestError> {
    if keys.is_empty() {
        return Err(ManifestError::NoKeys);
    }
    let text = std::str::from_utf8(signature)
        .map_err(|_| ManifestError::MalformedSignature("not text".to_owned()))?;
    let raw: [u8; 64] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ManifestError::MalformedSignature("expected 128 hex digits".to_owned()))?;
    let signature = ed25519_dalek::Signature::from_bytes(&raw);
    if keys.iter().any(|k| k.0.verify(bytes, &signature).is_ok()) {
        Ok(())
    } else {
        Err(ManifestError::BadSignature { keys: keys.len() })
    }
}

/// Verifies the signature first, then parses: nothing from an unverified manifest is interpreted.
pub fn verify_signed(
    bytes: &[u8],
    signature: &[u8],
    keys: &[PublicKey],
) -> Result<Manifest, ManifestError> {
    verify_signature(bytes, signature, keys)?;
    Manifest::parse(bytes)
}

/// What the machine is running, as the version rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running<'a> {
    pub name: &'a Name,
    pub channel: &'a Name,
    pub version: &'a Version,
}

/// Why a correctly signed manifest is still not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("release is for image `{found}`, this machine runs `{expected}`")]
    OtherImage { expected: Name, found: Name },
    #[error("release is for channel `{found}`, this machine follows `{expected}`")]
    OtherChannel { expected: Name, found: Name },
    #[error("version {candidate} is not newer than the running version {running}")]
    NotNewer {
        candidate: Version,
        running: Version,
    },
    #[error("version {candidate} is not newer than {newest}, the newest version already accepted")]
    NotNewerThanAccepted { candidate: Version, newest: Version },
    #[error("version {version} is marked bad (it was rolled back) and is never retried")]
    MarkedBad { version: Version },
    #[error("manifest expired at {expires} (the machine's clock says {now}): publish it again")]
    Expired { expires: String, now: String },
    #[error(
        "manifest created at {created}, later than the machine's clock ({now}) allows (at most {MAX_CLOCK_SKEW_SECONDS} s ahead): check the clock"
    )]
    CreatedInFuture { created: String, now: String },
}

/// The time rules, with `now` in seconds since the Unix epoch: a manifest is refused from its
/// `expires` time on, and while its `created` time lies more than [`MAX_CLOCK_SKEW_SECONDS`]
/// ahead (a machine whose clock is far behind cannot tell an expired manifest).
pub fn current(candidate: &Manifest, now: u64) -> Result<(), Refusal> {
    // `Manifest::parse` checked both times; an unparsable one counts as already expired.
    let created = parse_rfc3339(&candidate.created).unwrap_or(u64::MAX);
    let expires = parse_rfc3339(&candidate.expires).unwrap_or(0);
    if created > now.saturating_add(MAX_CLOCK_SKEW_SECONDS) {
        return Err(Refusal::CreatedInFuture {
            created: candidate.created.clone(),
            now: rfc3339(now),
        });
    }
    if now >= expires {
        return Err(Refusal::Expired {
            expires: candidate.expires.clone(),
            now: rfc3339(now),
        });
    }
    Ok(())
}

/// The version rules: same image and channel, newer than the running version and than the newest
/// version ever accepted, and not marked bad.
pub fn acceptable(
    candidate: &Manifest,
    running: &Running<'_>,
    newest_accepted: Option<&Version>,
    bad_versions: &[Version],
) -> Result<(), Refusal> {
    if &candidate.name != running.name {
        return Err(Refusal::OtherImage {
            expected: running.name.clone(),
            found: candidate.name.clone(),
        });
    }
    if &candidate.channel != running.channel {
        return Err(Refusal::OtherChannel {
            expected: running.channel.clone(),
            found: candidate.channel.clone(),
        });
    }
    if bad_versions
        .iter()
        .any(|b| b.cmp(&candidate.version).is_eq())
    {
        return Err(Refusal::MarkedBad {
            version: candidate.version.clone(),
        });
    }
    if candidate.version <= *running.version {
        return Err(Refusal::NotNewer {
            candidate: candidate.version.clone(),
            running: running.version.clone(),
        });
    }
    if let Some(newest) = newest_accepted {
        if candidate.version <= *newest {
            return Err(Refusal::NotNewerThanAccepted {
                candidate: candidate.version.clone(),
                newest: newest.clone(),
            });
        }
    }
    Ok(())
}

/// Where each level of a verity hash tree lies, in hash blocks from the start of the verity
/// partition (block 0 is the superblock). Level 0 hashes the data; the last level is one block.
pub fn verity_levels(data_blocks: u64) -> Vec<(u64, u64)> {
    const BITS: u32 = 7; // 4096 / 32 hashes per block
    let mut levels = 0u32;
    while BITS * levels < 64 && (data_blocks.saturating_sub(1) >> (BITS * levels)) != 0 {
        levels += 1;
    }
    let mut position = 1u64;
    let mut out = vec![(0, 0); levels as usize];
    for i in (0..levels).rev() {
        let shift = BITS * (i + 1);
        let count = if shift >= 64 {
            1
        } else {
            (data_blocks + (1u64 << shift) - 1) >> shift
        };
        out[i as usize] = (position, count);
        position += count;
    }
    out
}

/// Size in bytes of superblock plus hash tree for `data_blocks` blocks.
pub fn verity_size(data_blocks: u64) -> u64 {
    let blocks: u64 = 1 + verity_levels(data_blocks)
        .iter()
        .map(|(_, n)| n)
        .sum::<u64>();
    blocks * VERITY_BLOCK_SIZE
}

/// The verity hash of one block (format 1: salt first).
pub fn verity_hash(salt: &[u8], block: &[u8]) -> [u8; 32] {
    let mut h = Sha256Hasher::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// The GPT partition UUIDs (as 16 raw bytes each, in textual order) of a slot's root and verity
/// partitions, per the Discoverable Partitions Specification: the halves of the root hash.
pub fn slot_partition_uuids(root_hash: &[u8; 32]) -> ([u8; 16], [u8; 16]) {
    let mut root = [0u8; 16];
    let mut verity = [0u8; 16];
    root.copy_from_slice(&root_hash[..16]);
    verity.copy_from_slice(&root_hash[16..]);
    (root, verity)
}

/// Formats seconds since the Unix epoch as RFC 3339 UTC (`2026-11-27T23:10:00Z`).
pub fn rfc3339(unix_seconds: u64) -> String {
    let t = crate::units::CivilTime::from_unix(unix_seconds);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// Parses the RFC 3339 UTC form [`rfc3339`] writes (`2026-11-27T23:10:00Z`) into seconds since
/// the Unix epoch; other offsets, fractions and dates before 1970 are refused.
pub fn parse_rfc3339(text: &str) -> Result<u64, String> {
    let bad = || {
        format!("`{text}` is not a UTC time like `2026-11-27T23:10:00Z` (RFC 3339, seconds, `Z`)")
    };
    let b = text.as_bytes();
    let layout_ok = b.len() == 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'Z';
    if !layout_ok {
        return Err(bad());
    }
    let number = |range: std::ops::Range<usize>| -> Result<u64, String> {
        let part = &text[range];
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if year < 1970 || day == 0 || day > month_days || hour > 23 || minute > 59 || second > 59 {
        return Err(bad());
    }
    // Days since 1970-01-01 (Howard Hinnant's days-from-civil, years counted from March).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days * 86_400 + hour * 3600 + minute * 60 + second)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> Sha256 {
        Sha256::parse(&hex::encode(Sha256Hasher::digest(b))).expect("digest is hex")
    }

    fn artifact(content: &[u8], uncompressed: u64) -> Artifact {
        let sha256 = sha(content);
        Artifact {
            path: Artifact::path_for(&sha256),
            size: content.len() as u64,
            sha256,
            uncompressed_size: uncompressed,
            uncompressed_sha256: sha(b"x"),
            frames: Vec::new(),
        }
    }

    fn manifest(version: &str) -> Manifest {
        Manifest {
            format: FORMAT,
            name: Name::parse("demo").expect("name"),
            version: Version::parse(version).expect("version"),
            channel: Name::parse("stable").expect("name"),
            created: rfc3339(0),
            expires: rfc3339(30 * 86_400),
            root_hash: sha(b"root"),
            salt: "00ff".to_owned(),
            data_blocks: 2,
            cmdline: vec!["console=ttyS0".to_owned()],
            rollout: None,
            artifacts: Artifacts {
                root: artifact(b"r", 8192),
                verity: artifact(b"v", 8192),
                kernel: artifact(b"k", 1),
                initrd: artifact(b"i", 1),
            },
            root_chunks: Some(IndexFile {
                path: crate::chunk::index_path(sha(b"index").as_str()),
                size: 72,
                sha256: sha(b"index"),
            }),
        }
    }

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    #[test]
    fn manifest_round_trips_and_verifies() {
        let m = manifest("1.2");
        let bytes = m.to_bytes();
        let sig = key(1).sign(&bytes);
        let parsed = verify_signed(&bytes, sig.as_bytes(), &[key(2).public(), key(1).public()])
            .expect("verifies with the second key");
        assert_eq!(parsed, m);
        // A format 2 manifest (no chunk index) is still read.
        let old = Manifest {
            format: 2,
            root_chunks: None,
            ..m
        };
        assert_eq!(Manifest::parse(&old.to_bytes()), Ok(old));
    }

    #[test]
    fn data_blocks_whose_size_overflows_are_refused() {
        let mut m = manifest("1.2");
        m.data_blocks = u64::MAX;
        m.artifacts.root.uncompressed_size = u64::MAX;
        assert!(matches!(
            Manifest::parse(&m.to_bytes()),
            Err(ManifestError::Malformed(e)) if e.contains("data-blocks 18446744073709551615")
        ));
    }

    #[test]
    fn wrong_key_and_flipped_bytes_are_refused() {
        let bytes = manifest("1.2").to_bytes();
        let sig = key(1).sign(&bytes);
        assert_eq!(
            verify_signed(&bytes, sig.as_bytes(), &[key(2).public()]),
            Err(ManifestError::BadSignature { keys: 1 })
        );
        for i in [0, bytes.len() / 2, bytes.len() - 2] {
            let mut flipped = bytes.clone();
            flipped[i] ^= 1;
            assert!(
                matches!(
                    verify_signed(&flipped, sig.as_bytes(), &[key(1).public()]),
                    Err(ManifestError::BadSignature { .. })
                ),
                "flip at {i}"
            );
        }
        let mut bad_sig = sig.clone().into_bytes();
        bad_sig[3] = if bad_sig[3] == b'0' { b'1' } else { b'0' };
        assert!(verify_signed(&bytes, &bad_sig, &[key(1).public()]).is_err());
        assert_eq!(
            verify_signed(&bytes, sig.as_bytes(), &[]),
            Err(ManifestError::NoKeys)
        );
    }

    #[test]
    fn malformed_input_is_refused_with_a_reason() {
        let good = String::from_utf8(manifest("1").to_bytes()).expect("utf8");
        let cases: Vec<(String, &str)> = vec![
            ("".to_owned(), "malformed manifest"),
            ("{".to_owned(), "malformed manifest"),
            (
                good.replace("\"format\": 3", "\"format\": 7"),
                "format 7 is not supported (this agent reads formats 2 to 3)",
            ),
            (
                good.replace("\"format\": 3", "\"format\": 1"),
                "format 1 has no expiry time",
            ),
            (
                good.replace("\"format\": 3", "\"format\": 2"),
                "root-chunks needs format 3",
            ),
            (
                good.replace("\"size\": 72", "\"size\": 16777217"),
                "root-chunks: 16777217 bytes, more than the limit",
            ),
            (
                good.replace("chunks/", "artifacts/"),
                "root-chunks: path `artifacts/",
            ),
            (
                good.replace("\"expires\": \"1970-01-31T00:00:00Z\",", ""),
                "missing field `expires`",
            ),
            (
                good.replace("1970-01-31T00:00:00Z", "1970-01-31 00:00:00"),
                "expires: `1970-01-31 00:00:00` is not a UTC time",
            ),
            (
                good.replace("1970-01-01T00:00:00Z", "1970-02-30T00:00:00Z"),
                "created: `1970-02-30T00:00:00Z`",
            ),
            (good.replace("\"demo\"", "\"Demo\""), "invalid name"),
            (good.replace("\"1\"", "\"1.x\""), "invalid version"),
            (good.replace("\"cmdline\"", "\"cmd-line\""), "unknown field"),
            (good.replace("artifacts/", "../"), "is not `artifacts/"),
            (good.replace("00ff", "zz"), "salt"),
            (
                good.replace(
                    "\"uncompressed-size\": 8192,",
                    "\"uncompressed-size\": 8192, \"frames\": [{\"offset\": 1, \"uncompressed-offset\": 0}],",
                ),
                "frames must start at 0",
            ),
            (
                good.replace("\"data-blocks\": 2", "\"data-blocks\": 3"),
                "needs 12288 bytes",
            ),
        ];
        for (text, want) in cases {
            let err = Manifest::parse(text.as_bytes()).expect_err(want);
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
        let sig_cases: [&[u8]; 3] = [b"", b"zz", &[0xff, 0xfe]];
        for sig in sig_cases {
            assert!(matches!(
                verify_signed(good.as_bytes(), sig, &[key(1).public()]),
                Err(ManifestError::MalformedSignature(_))
            ));
        }
    }

    #[test]
    fn keys_parse_and_print() {
        let k = key(9);
        let text = k.public().to_string();
        assert!(
            text.starts_with("ed25519:") && text.len() == 8 + 64,
            "{text}"
        );
        assert_eq!(PublicKey::parse(&text).expect("parses"), k.public());
        let again = SecretKey::parse(&k.to_text()).expect("secret parses");
        assert_eq!(again.public(), k.public());
        for bad in ["", "ed25519:", "ed25519:abcd", "rsa:00", &text[8..]] {
            assert!(PublicKey::parse(bad).is_err(), "{bad}");
        }
        assert!(SecretKey::parse("ed25519:00").is_err());
    }

    #[test]
    fn version_rules() {
        let name = Name::parse("demo").expect("name");
        let other = Name::parse("other").expect("name");
        let stable = Name::parse("stable").expect("name");
        let v = |s| Version::parse(s).expect("version");
        let running_v = v("2");
        let running = Running {
            name: &name,
            channel: &stable,
            version: &running_v,
        };
        assert_eq!(acceptable(&manifest("3"), &running, None, &[]), Ok(()));
        assert_eq!(
            acceptable(&manifest("3"), &running, Some(&v("2.5")), &[]),
            Ok(())
        );
        let refused = |m: &Manifest, newest: Option<&Version>, bad: &[Version]| {
            acceptable(m, &running, newest, bad).expect_err("refused")
        };
        assert!(matches!(
            refused(&manifest("2.0"), None, &[]),
            Refusal::NotNewer { .. }
        ));
        assert!(matches!(
            refused(&manifest("1"), None, &[]),
            Refusal::NotNewer { .. }
        ));
        assert!(matches!(
            refused(&manifest("3"), Some(&v("3")), &[]),
            Refusal::NotNewerThanAccepted { .. }
        ));
        assert!(matches!(
            refused(&manifest("3"), None, &[v("3.0")]),
            Refusal::MarkedBad { .. }
        ));
        let mut foreign = manifest("3");
        foreign.name = other.clone();
        assert!(refused(&foreign, None, &[])
            .to_string()
            .contains("for image `other`, this machine runs `demo`"));
        let mut beta = manifest("3");
        beta.channel = other;
        assert!(matches!(
            refused(&beta, None, &[]),
            Refusal::OtherChannel { .. }
        ));
    }

    #[test]
    fn verity_geometry_matches_veritysetup() {
        // Sizes veritysetup format reports for 4096-byte blocks.
        assert_eq!(verity_levels(2), vec![(1, 1)]);
        assert_eq!(verity_levels(128), vec![(1, 1)]);
        assert_eq!(verity_levels(129), vec![(2, 2), (1, 1)]);
        assert_eq!(verity_size(129), 4 * 4096);
        assert_eq!(verity_levels(16384 + 1), vec![(4, 129), (2, 2), (1, 1)]);

        // The same sizes, and where each level lies, read from what `veritysetup format` wrote:
        // every level holds the salted hashes of the blocks below it (level 0: the data), zero
        // padded, and the root hash is the hash of the one top block.
        let salt_hex = "0123456789abcdef";
        let salt = hex::decode(salt_hex).expect("hex salt");
        let size = VERITY_BLOCK_SIZE as usize;
        for blocks in [1u64, 2, 128, 129, 16384 + 1] {
            let mut data = vec![0u8; blocks as usize * size];
            for (i, block) in data.chunks_mut(size).enumerate() {
                block[..8].copy_from_slice(&(i as u64).to_le_bytes());
            }
            let oracle = crate::oracle::veritysetup_format(&data, Some(salt_hex), None);
            let device = &oracle.hash_device;
            assert_eq!(device.len() as u64, verity_size(blocks), "{blocks} blocks");
            let sb = VeritySuperblock::parse(device).expect("veritysetup's superblock parses");
            assert_eq!(sb.data_blocks, blocks);
            assert_eq!(sb.salt, salt);
            let mut below: Vec<&[u8]> = data.chunks(size).collect();
            for (position, count) in verity_levels(blocks) {
                let (start, end) = (position as usize * size, (position + count) as usize * size);
                let mut expected: Vec<u8> =
                    below.iter().flat_map(|b| verity_hash(&salt, b)).collect();
                expected.resize(end - start, 0);
                assert!(
                    device[start..end] == expected[..],
                    "{blocks} blocks: the level at block {position} ({count} blocks) differs"
                );
                below = device[start..end].chunks(size).collect();
            }
            assert_eq!(below.len(), 1, "{blocks} blocks: one top block");
            assert_eq!(
                hex::encode(verity_hash(&salt, below[0])),
                oracle.root_hash,
                "{blocks} blocks"
            );
        }
    }

    #[test]
    fn verity_superblock_parses() {
        let mut sb = vec![0u8; 512];
        sb[0..8].copy_from_slice(b"verity\0\0");
        sb[8..12].copy_from_slice(&1u32.to_le_bytes());
        sb[12..16].copy_from_slice(&1u32.to_le_bytes());
        sb[32..38].copy_from_slice(b"sha256");
        sb[64..68].copy_from_slice(&4096u32.to_le_bytes());
        sb[68..72].copy_from_slice(&4096u32.to_le_bytes());
        sb[72..80].copy_from_slice(&300u64.to_le_bytes());
        sb[80..82].copy_from_slice(&2u16.to_le_bytes());
        sb[88..90].copy_from_slice(&[0xab, 0xcd]);
        let parsed = VeritySuperblock::parse(&sb).expect("parses");
        assert_eq!(parsed.data_blocks, 300);
        assert_eq!(parsed.salt, vec![0xab, 0xcd]);
        sb[32..38].copy_from_slice(b"sha512");
        assert!(VeritySuperblock::parse(&sb).is_err());
        assert!(VeritySuperblock::parse(&sb[..100]).is_err());
    }

    #[test]
    fn rollout_spreads_machines_over_the_window_deterministically() {
        let rollout = Rollout {
            start: 1000,
            spread_seconds: 3600,
        };
        let v = Version::parse("2").expect("v");
        let dues: Vec<u64> = (0..400)
            .map(|i| rollout.due(&format!("{i:032x}"), &v))
            .collect();
        assert!(dues.iter().all(|d| (1000..4600).contains(d)));
        let early = dues.iter().filter(|d| **d < 1000 + 1800).count();
        assert!(
            (150..250).contains(&early),
            "{early} of 400 in the first half"
        );
        assert_eq!(rollout.due("abc\n", &v), rollout.due("abc", &v));
        let none = Rollout {
            start: 5,
            spread_seconds: 0,
        };
        assert_eq!(none.due("abc", &v), 5);
        let mut m = manifest("3");
        m.rollout = Some(rollout);
        assert_eq!(
            Manifest::parse(&m.to_bytes()).expect("parses").rollout,
            Some(rollout)
        );
    }

    #[test]
    fn expired_and_future_manifests_are_refused() {
        let mut m = manifest("3");
        m.created = rfc3339(1_000_000);
        m.expires = rfc3339(2_000_000);
        assert_eq!(current(&m, 1_000_000), Ok(()));
        assert_eq!(current(&m, 1_999_999), Ok(()));
        // Within the allowed skew ahead of the clock, and just past it.
        assert_eq!(current(&m, 1_000_000 - MAX_CLOCK_SKEW_SECONDS), Ok(()));
        let err = current(&m, 1_000_000 - MAX_CLOCK_SKEW_SECONDS - 1).expect_err("future");
        assert!(matches!(err, Refusal::CreatedInFuture { .. }), "{err}");
        assert!(err.to_string().contains("check the clock"), "{err}");
        for now in [2_000_000, 5_000_000] {
            let err = current(&m, now).expect_err("expired");
            assert_eq!(
                err.to_string(),
                format!(
                    "manifest expired at 1970-01-24T03:33:20Z (the machine's clock says {}): publish it again",
                    rfc3339(now)
                )
            );
        }
    }

    #[test]
    fn rfc3339_parses_what_it_formats_and_nothing_else() {
        for t in [
            0,
            59,
            951_782_400,
            951_868_799,
            1_795_820_399,
            4_102_444_800,
        ] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), Ok(t), "{t}");
        }
        for bad in [
            "",
            "2026-11-27T23:10:00",
            "2026-11-27T23:10:00+01:00",
            "2026-11-27T23:10:00.5Z",
            "2026-11-27 23:10:00Z",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-27T24:00:00Z",
            "1969-12-31T23:59:59Z",
            "+026-11-27T23:10:00Z",
        ] {
            let err = parse_rfc3339(bad).expect_err(bad);
            assert!(err.contains("is not a UTC time"), "{err}");
        }
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_820_399), "2026-11-27T22:59:59Z");
    }
}
