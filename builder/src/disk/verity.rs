//! dm-verity hash tree (format version 1, sha256, 4 KiB data and hash blocks) with the standard
//! verity superblock at offset 0 of the hash device, byte-identical to what `veritysetup format`
//! writes for the same salt and UUID.
//!
//! Layout of the hash device: block 0 is the superblock; the tree follows from block 1, its top
//! level first and the level that hashes the data blocks last. Each digest is
//! `sha256(salt || block)`; each hash block holds 128 digests, zero-padded. The root hash is the
//! digest of the single top block.

use std::io::Read;

use anyhow::{bail, Context, Result};
use os_config::layout::VeritySuperblock;
use sha2::{Digest, Sha256};

/// Data and hash block size.
pub const BLOCK_SIZE: usize = 4096;
const DIGEST_SIZE: usize = 32;
const HASHES_PER_BLOCK: usize = BLOCK_SIZE / DIGEST_SIZE;

/// The parameters that, with the data, determine the hash device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerityParams {
    pub salt: [u8; 32],
    /// UUID recorded in the superblock.
    pub uuid: [u8; 16],
}

/// A computed hash device.
#[derive(Debug, Clone)]
pub struct HashTree {
    pub root_hash: [u8; 32],
    /// Number of 4 KiB data blocks covered.
    pub data_blocks: u64,
    /// The whole hash device: superblock block, then the tree.
    pub device: Vec<u8>,
}

impl HashTree {
    /// The root hash as lowercase hex.
    pub fn root_hash_hex(&self) -> String {
        hex::encode(self.root_hash)
    }
}

/// Computes the hash device of `data_size` bytes read from `data`. The size must be a multiple of
/// 4096 (pad the image first) and not zero.
pub fn hash_tree(data: &mut impl Read, data_size: u64, params: &VerityParams) -> Result<HashTree> {
    if data_size == 0 || !data_size.is_multiple_of(BLOCK_SIZE as u64) {
        bail!("verity data size {data_size} is not a positive multiple of {BLOCK_SIZE} bytes");
    }
    let data_blocks = data_size / BLOCK_SIZE as u64;
    let mut salted = Sha256::new();
    salted.update(params.salt);

    // Level 0: the digest of every data block.
    let mut level: Vec<u8> = Vec::with_capacity(padded_len(data_blocks as usize));
    let mut block = vec![0u8; BLOCK_SIZE];
    for index in 0..data_blocks {
        data.read_exact(&mut block)
            .with_context(|| format!("reading verity data block {index} of {data_blocks}"))?;
        level.extend_from_slice(&salted.clone().chain_update(&block).finalize());
    }
    let mut levels: Vec<Vec<u8>> = Vec::new();
    // Each stored level is its digests zero-padded to whole blocks; the next level hashes those
    // blocks, until one block remains.
    let mut count = data_blocks as usize;
    while count > 1 {
        level.resize(padded_len(count), 0);
        let next: Vec<u8> = level
            .chunks(BLOCK_SIZE)
            .flat_map(|b| salted.clone().chain_update(b).finalize().to_vec())
            .collect();
        count = level.len() / BLOCK_SIZE;
        levels.push(std::mem::replace(&mut level, next));
    }
    // `level` now holds one digest: of the only data block (no tree) or of the top hash block.
    let mut root_hash = [0u8; 32];
    root_hash.copy_from_slice(&level[..DIGEST_SIZE]);

    let mut device = superblock(data_blocks, params);
    for stored in levels.iter().rev() {
        device.extend_from_slice(stored);
    }
    Ok(HashTree {
        root_hash,
        data_blocks,
        device,
    })
}

/// Bytes of `count` digests padded to whole hash blocks.
fn padded_len(count: usize) -> usize {
    count.div_ceil(HASHES_PER_BLOCK) * BLOCK_SIZE
}

/// The verity superblock, padded to a whole hash block (os-config's format).
fn superblock(data_blocks: u64, params: &VerityParams) -> Vec<u8> {
    VeritySuperblock {
        data_blocks,
        salt: params.salt.to_vec(),
        uuid: params.uuid,
    }
    .to_bytes()
}

/// Reads a verity superblock (format 1, sha256, 4 KiB blocks), refusing anything else.
pub fn read_superblock(bytes: &[u8]) -> Result<VeritySuperblock> {
    VeritySuperblock::parse(bytes).map_err(anyhow::Error::msg)
}

/// The result of checking a slot's data against its hash device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every block hashes to the tree and the tree to the expected root hash.
    Intact,
    /// This data block (4 KiB, counted from 0) does not match its recorded digest.
    BadDataBlock(u64),
    /// The data matches the stored tree, but the stored tree does not give the expected root hash
    /// (or its upper levels were changed).
    BadTree { computed_root: String },
}

impl Verdict {
    /// What the verdict says about the root partition `root_label` whose boot entry or manifest
    /// names `expected_root`: `intact`, or what does not match.
    pub fn describe(&self, root_label: &str, expected_root: &str) -> String {
        match self {
            Verdict::Intact => "intact".to_owned(),
            Verdict::BadDataBlock(block) => format!(
                "data block {block} of {root_label} (byte {} of the partition) does not match its hash",
                block * BLOCK_SIZE as u64
            ),
            Verdict::BadTree { computed_root } => format!(
                "the verity tree gives root hash {computed_root}, the boot entry says {expected_root}"
            ),
        }
    }
}

/// Checks `data` (a root partition) against `hash_device` (its verity partition, at least as long
/// as the tree) and the expected root hash, entirely in Rust.
pub fn verify(data: &mut impl Read, hash_device: &[u8], expected_root: &str) -> Result<Verdict> {
    let sb = read_superblock(hash_device)?;
    let salt: [u8; 32] =
        sb.salt.as_slice().try_into().map_err(|_| {
            anyhow::anyhow!("verity salt is {} bytes; Plinth writes 32", sb.salt.len())
        })?;
    let params = VerityParams {
        salt,
        uuid: sb.uuid,
    };
    // The tree's size follows from the block count the superblock claims: check it against
    // what is really there before hashing (and allocating) by that count.
    let tree_len = os_config::manifest::verity_size(sb.data_blocks);
    if tree_len > hash_device.len() as u64 {
        bail!(
            "the verity partition is shorter ({} bytes) than the tree of the {} data blocks its superblock claims ({tree_len} bytes)",
            hash_device.len(),
            sb.data_blocks
        );
    }
    let tree = hash_tree(data, sb.data_bytes(), &params)?;
    let stored = hash_device.get(..tree.device.len()).with_context(|| {
        format!(
            "the verity partition is shorter ({} bytes) than its tree ({} bytes)",
            hash_device.len(),
            tree.device.len()
        )
    })?;
    // The level hashing the data blocks is the last one on the device.
    let level0_start = tree.device.len() - padded_len(sb.data_blocks as usize);
    // A changed data block changes its level-0 digest (and every level above it): look there first.
    let bad_digest = tree.device[level0_start..]
        .chunks(DIGEST_SIZE)
        .zip(stored[level0_start..].chunks(DIGEST_SIZE))
        .position(|(a, b)| a != b);
    if let (Some(index), true) = (bad_digest, sb.data_blocks > 1) {
        return Ok(Verdict::BadDataBlock(index as u64));
    }
    let computed_root = tree.root_hash_hex();
    if tree.device.as_slice() != stored || !computed_root.eq_ignore_ascii_case(expected_root) {
        if sb.data_blocks == 1 {
            return Ok(Verdict::BadDataBlock(0));
        }
        return Ok(Verdict::BadTree { computed_root });
    }
    Ok(Verdict::Intact)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut state = Sha256::digest([seed]);
        while out.len() < len {
            out.extend_from_slice(&state);
            state = Sha256::digest(state);
        }
        out.truncate(len);
        out
    }

    /// Runs `veritysetup format` and returns (root hash hex, hash device bytes).
    fn veritysetup_format(data: &[u8], params: &VerityParams) -> (String, Vec<u8>) {
        let uuid = uuid::Uuid::from_bytes(params.uuid).to_string();
        let f = os_config::oracle::veritysetup_format(
            data,
            Some(&hex::encode(params.salt)),
            Some(&uuid),
        );
        (f.root_hash, f.hash_device)
    }

    #[test]
    fn hash_device_matches_veritysetup() {
        let params = VerityParams {
            salt: Sha256::digest(b"plinth test salt").into(),
            uuid: *b"0123456789abcdef",
        };
        // One block (no tree), one full hash block, just over it, and three levels.
        for blocks in [1usize, 2, 128, 129, 300, 128 * 128 + 1] {
            let data = pseudo_random(blocks * BLOCK_SIZE, blocks as u8);
            let tree = hash_tree(&mut data.as_slice(), data.len() as u64, &params).expect("hash");
            let (root, device) = veritysetup_format(&data, &params);
            assert_eq!(tree.root_hash_hex(), root, "{blocks} blocks");
            assert_eq!(tree.device.len(), device.len(), "{blocks} blocks");
            assert!(
                tree.device == device,
                "{blocks} blocks: hash device bytes differ"
            );
            let sb = read_superblock(&tree.device).expect("superblock");
            assert_eq!(sb.data_blocks, blocks as u64);
            assert_eq!(sb.salt, params.salt);
            assert_eq!(sb.uuid, params.uuid);
        }
    }

    #[test]
    fn verify_names_the_changed_block() {
        let params = VerityParams {
            salt: [3; 32],
            uuid: [4; 16],
        };
        let mut data = pseudo_random(300 * BLOCK_SIZE, 9);
        let tree = hash_tree(&mut data.as_slice(), data.len() as u64, &params).expect("hash");
        let root = tree.root_hash_hex();
        let mut device = tree.device.clone();
        device.resize(1 << 20, 0);
        assert_eq!(
            verify(&mut data.as_slice(), &device, &root).expect("verify"),
            Verdict::Intact
        );
        data[200 * BLOCK_SIZE + 17] ^= 1;
        assert_eq!(
            verify(&mut data.as_slice(), &device, &root).expect("verify"),
            Verdict::BadDataBlock(200)
        );
        data[200 * BLOCK_SIZE + 17] ^= 1;
        let wrong = "00".repeat(32);
        assert!(matches!(
            verify(&mut data.as_slice(), &device, &wrong).expect("verify"),
            Verdict::BadTree { computed_root } if computed_root == root
        ));
    }

    #[test]
    fn superblock_claiming_more_blocks_than_its_partition_holds_is_refused() {
        let params = VerityParams {
            salt: [1; 32],
            uuid: [2; 16],
        };
        let data = pseudo_random(4096, 3);
        let mut device = hash_tree(&mut data.as_slice(), 4096, &params)
            .expect("tree")
            .device;
        // 2^40 blocks would need a 32 TiB tree; it must be refused before anything is sized by it.
        device[72..80].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let error = verify(&mut data.as_slice(), &device, &"0".repeat(64))
            .expect_err("too many blocks")
            .to_string();
        assert!(error.contains("1099511627776 data blocks"), "{error}");
    }

    #[test]
    fn unaligned_or_empty_data_is_refused() {
        let params = VerityParams {
            salt: [0; 32],
            uuid: [0; 16],
        };
        let err = hash_tree(&mut [0u8; 100].as_slice(), 100, &params).expect_err("unaligned");
        assert!(err.to_string().contains("multiple of 4096"), "{err}");
        assert!(hash_tree(&mut [].as_slice(), 0, &params).is_err());
        let err = read_superblock(&[0u8; 4096]).expect_err("no superblock");
        assert!(err.to_string().contains("signature"), "{err}");
    }
}
