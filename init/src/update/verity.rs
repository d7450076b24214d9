//! Checks a dm-verity hash tree against the data it covers and recomputes its root hash, reading
//! block by block (memory: a few blocks, whatever the image size).

use std::io::{self, Read, Seek, SeekFrom};

use os_config::manifest::{verity_hash, verity_levels, VeritySuperblock, VERITY_BLOCK_SIZE};

const BLOCK: usize = VERITY_BLOCK_SIZE as usize;
const HASHES_PER_BLOCK: usize = BLOCK / 32;

/// Why a verity tree does not match its data.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    #[error("reading the verity tree or its data: {0}")]
    Io(#[from] io::Error),
    #[error("verity superblock: {0}")]
    Superblock(String),
    #[error("verity superblock covers {found} data blocks, the release says {expected}")]
    DataBlocks { expected: u64, found: u64 },
    #[error("verity hash block {block} (level {level}) does not match the data it covers")]
    Mismatch { level: usize, block: u64 },
}

/// Verifies every level of the tree in `tree` (superblock at offset 0) against `data`, and
/// returns the root hash. `data` is read once, front to back (callers may hash it on the way).
pub fn verify_tree<D: Read, T: Read + Seek>(
    data: &mut D,
    tree: &mut T,
    expected_blocks: u64,
) -> Result<[u8; 32], VerityError> {
    let mut block = vec![0u8; BLOCK];
    verify_tree_with(tree, expected_blocks, &mut |salt| {
        data.read_exact(&mut block)?;
        Ok(verity_hash(salt, &block))
    })
}

/// Like [`verify_tree`], with the data blocks' hashes (`sha256(salt || block)`, in order) known
/// already, for example computed while the data was written: nothing of the data is read.
pub fn verify_tree_hashes<T: Read + Seek>(
    hashes: &[[u8; 32]],
    tree: &mut T,
    expected_blocks: u64,
) -> Result<[u8; 32], VerityError> {
    let mut next = hashes.iter();
    verify_tree_with(tree, expected_blocks, &mut |_| {
        next.next().copied().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} data block hashes for {expected_blocks} blocks",
                    hashes.len()
                ),
            )
            .into()
        })
    })
}

/// The hash of the next data block, given the tree's salt.
type DataHash<'a> = &'a mut dyn FnMut(&[u8]) -> Result<[u8; 32], VerityError>;

fn verify_tree_with<T: Read + Seek>(
    tree: &mut T,
    expected_blocks: u64,
    data_hash: DataHash<'_>,
) -> Result<[u8; 32], VerityError> {
    let mut sb_bytes = vec![0u8; 512];
    tree.seek(SeekFrom::Start(0))?;
    tree.read_exact(&mut sb_bytes)?;
    let sb =
        VeritySuperblock::parse(&sb_bytes).map_err(|e| VerityError::Superblock(e.to_string()))?;
    if sb.data_blocks != expected_blocks {
        return Err(VerityError::DataBlocks {
            expected: expected_blocks,
            found: sb.data_blocks,
        });
    }
    let levels = verity_levels(sb.data_blocks);
    let mut block = vec![0u8; BLOCK];
    if levels.is_empty() {
        // One data block: the root hash is its hash.
        return data_hash(&sb.salt);
    }
    let mut expected = vec![0u8; BLOCK];
    let mut stored = vec![0u8; BLOCK];
    // Level 0 hashes the data; level i hashes the (already checked) blocks of level i-1.
    for (level, &(position, count)) in levels.iter().enumerate() {
        let (source_start, source_count) = if level == 0 {
            (None, sb.data_blocks)
        } else {
            let (p, n) = levels[level - 1];
            (Some(p), n)
        };
        for hash_block in 0..count {
            expected.fill(0);
            let first = hash_block * HASHES_PER_BLOCK as u64;
            let last = (first + HASHES_PER_BLOCK as u64).min(source_count);
            for (slot, index) in (first..last).enumerate() {
                let hash = match source_start {
                    None => data_hash(&sb.salt)?,
                    Some(p) => {
                        tree.seek(SeekFrom::Start((p + index) * VERITY_BLOCK_SIZE))?;
                        tree.read_exact(&mut block)?;
                        verity_hash(&sb.salt, &block)
                    }
                };
                expected[slot * 32..slot * 32 + 32].copy_from_slice(&hash);
            }
            tree.seek(SeekFrom::Start((position + hash_block) * VERITY_BLOCK_SIZE))?;
            tree.read_exact(&mut stored)?;
            if stored != expected {
                return Err(VerityError::Mismatch {
                    level,
                    block: position + hash_block,
                });
            }
        }
    }
    // The top level is one block at the start of the tree.
    tree.seek(SeekFrom::Start(VERITY_BLOCK_SIZE))?;
    tree.read_exact(&mut block)?;
    Ok(verity_hash(&sb.salt, &block))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_veritysetup_and_catches_a_flipped_byte() {
        for blocks in [2u64, 128, 129, 300] {
            let data: Vec<u8> = (0..blocks * 4096)
                .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
                .collect();
            let oracle = os_config::oracle::veritysetup_format(&data, None, None);
            let (want, tree) = (oracle.root_hash, oracle.hash_device);
            let got = verify_tree(
                &mut io::Cursor::new(&data),
                &mut io::Cursor::new(&tree),
                blocks,
            )
            .expect("verifies");
            assert_eq!(hex::encode(got), want, "{blocks} blocks");
            let salt = VeritySuperblock::parse(&tree[..512])
                .expect("superblock")
                .salt;
            let mut hashes: Vec<[u8; 32]> =
                data.chunks(BLOCK).map(|b| verity_hash(&salt, b)).collect();
            let got = verify_tree_hashes(&hashes, &mut io::Cursor::new(&tree), blocks);
            assert_eq!(hex::encode(got.expect("verifies")), want, "{blocks} blocks");
            hashes[blocks as usize / 2][0] ^= 1;
            assert!(matches!(
                verify_tree_hashes(&hashes, &mut io::Cursor::new(&tree), blocks),
                Err(VerityError::Mismatch { level: 0, .. })
            ));
            assert!(verify_tree_hashes(&hashes[1..], &mut io::Cursor::new(&tree), blocks).is_err());
            let mut bad = data.clone();
            bad[(blocks as usize - 1) * 4096 + 17] ^= 1;
            assert!(matches!(
                verify_tree(
                    &mut io::Cursor::new(&bad),
                    &mut io::Cursor::new(&tree),
                    blocks
                ),
                Err(VerityError::Mismatch { level: 0, .. })
            ));
            assert!(matches!(
                verify_tree(
                    &mut io::Cursor::new(&data),
                    &mut io::Cursor::new(&tree),
                    blocks + 1
                ),
                Err(VerityError::DataBlocks { .. })
            ));
        }
    }
}
