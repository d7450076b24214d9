//! Content-defined chunking of a root image and the chunk index `plinth publish` writes beside a
//! release, so that an agent builds the new root from chunks its running slot already holds and
//! downloads only the others (`chunks/<sha256>.zst`).
//!
//! The chunker is a gear rolling hash with normalised chunking (as FastCDC): a cut falls where
//! the top bits of the hash are zero, with a stricter mask before the average size and a looser
//! one after it, between [`MIN_CHUNK`] and [`MAX_CHUNK`]. Cuts depend only on the last 64 bytes,
//! so data that shifts (squashfs packs file data one after another) is cut at the same places
//! and re-uses its chunks; only the chunks around an edit change.
//!
//! Sizes: 16 KiB / 64 KiB / 256 KiB. squashfs compresses files in 128 KiB blocks, so an edited
//! file changes whole blocks anyway: smaller chunks would save little and cost one request and
//! 40 index bytes each; larger ones would re-download more around each edit.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

/// Smallest chunk (but the last).
pub const MIN_CHUNK: usize = 16 << 10;
/// Average chunk size the masks aim at.
pub const AVG_CHUNK: usize = 64 << 10;
/// Largest chunk: a cut is forced here.
pub const MAX_CHUNK: usize = 256 << 10;
/// Largest index accepted: 16 MiB, about 400 000 chunks, a 25 GiB root image.
pub const MAX_INDEX_SIZE: u64 = 16 << 20;
/// What an index file starts with.
pub const MAGIC: &[u8; 8] = b"PLCHUNK1";

const HEADER_SIZE: usize = 8 + 4 * 3 + 8 + 4;
const ENTRY_SIZE: usize = 4 + 4 + 32;
/// Cut when the top 18 bits are zero (1 in 2^18) before the average size, 14 bits after.
const STRICT_BITS: u32 = 18;
const LOOSE_BITS: u32 = 14;

/// 256 pseudo-random 64-bit values (splitmix64 from a fixed seed): the same on every machine.
const GEAR: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut state: u64 = 0x706c_696e_7468_6364; // "plinthcd"
    let mut i = 0;
    while i < 256 {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
};

/// Length of the chunk that starts `data` (all of `data` when it is the end of the input and
/// shorter than a cut point would be).
pub fn cut(data: &[u8]) -> usize {
    if data.len() <= MIN_CHUNK {
        return data.len();
    }
    let end = data.len().min(MAX_CHUNK);
    let normal = end.min(AVG_CHUNK);
    let mut hash = 0u64;
    let mut i = MIN_CHUNK;
    while i < normal {
        hash = (hash << 1).wrapping_add(GEAR[usize::from(data[i])]);
        if hash >> (64 - STRICT_BITS) == 0 {
            return i + 1;
        }
        i += 1;
    }
    while i < end {
        hash = (hash << 1).wrapping_add(GEAR[usize::from(data[i])]);
        if hash >> (64 - LOOSE_BITS) == 0 {
            return i + 1;
        }
        i += 1;
    }
    end
}

/// Cuts a stream into chunks, reading it once through a fixed buffer.
pub struct Chunker<R> {
    reader: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    offset: u64,
}

impl<R: Read> Chunker<R> {
    pub fn new(reader: R) -> Chunker<R> {
        Chunker {
            reader,
            buf: vec![0u8; 4 * MAX_CHUNK],
            start: 0,
            end: 0,
            eof: false,
            offset: 0,
        }
    }

    /// The next chunk and its offset in the stream, or `None` at the end.
    pub fn next_chunk(&mut self) -> io::Result<Option<(u64, &[u8])>> {
        if self.end - self.start < MAX_CHUNK && !self.eof {
            if self.buf.len() - self.start < MAX_CHUNK {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            while self.end - self.start < MAX_CHUNK {
                match self.reader.read(&mut self.buf[self.end..]) {
                    Ok(0) => {
                        self.eof = true;
                        break;
                    }
                    Ok(n) => self.end += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if self.start == self.end {
            return Ok(None);
        }
        let len = cut(&self.buf[self.start..self.end]);
        let offset = self.offset;
        let chunk = &self.buf[self.start..self.start + len];
        self.start += len;
        self.offset += len as u64;
        Ok(Some((offset, chunk)))
    }
}

/// One chunk of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Where it starts in the uncompressed image.
    pub offset: u64,
    /// Its uncompressed length.
    pub length: u32,
    /// sha256 of its uncompressed bytes.
    pub sha256: [u8; 32],
    /// Size of `chunks/<sha256>.zst`.
    pub compressed_length: u32,
}

impl Chunk {
    /// Path of the chunk's compressed file in a release folder.
    pub fn path(&self) -> String {
        chunk_path(&self.sha256)
    }
}

/// Path of the compressed chunk with this digest: `chunks/<sha256>.zst`.
pub fn chunk_path(sha256: &[u8; 32]) -> String {
    format!("chunks/{}.zst", hex::encode(sha256))
}

/// Path of a chunk index whose file has this sha256 (hex): `chunks/<sha256>.index`.
pub fn index_path(sha256: &str) -> String {
    format!("chunks/{sha256}.index")
}

/// sha256 of `data`.
pub fn digest(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Largest compressed size accepted for a chunk of `length` bytes: zstd's bound plus room for
/// frame header and checksum.
pub fn max_compressed(length: u32) -> u32 {
    length + length / 128 + 1024
}

/// Why a chunk index was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chunk index: {0}")]
pub struct IndexError(pub String);

/// The ordered chunks of one image, covering it without gaps.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChunkIndex {
    pub chunks: Vec<Chunk>,
}

impl ChunkIndex {
    /// The size of the image the index describes.
    pub fn total_length(&self) -> u64 {
        self.chunks
            .last()
            .map_or(0, |c| c.offset + u64::from(c.length))
    }

    /// The sum of the compressed sizes of all chunks.
    pub fn compressed_length(&self) -> u64 {
        self.chunks
            .iter()
            .map(|c| u64::from(c.compressed_length))
            .sum()
    }

    /// Appends the next chunk (at the end of the image so far).
    pub fn push(&mut self, length: u32, sha256: [u8; 32], compressed_length: u32) {
        let offset = self.total_length();
        self.chunks.push(Chunk {
            offset,
            length,
            sha256,
            compressed_length,
        });
    }

    /// The file: [`MAGIC`], the chunker's min/avg/max sizes (u32 LE), the image length (u64 LE),
    /// the chunk count (u32 LE), then per chunk its length and compressed length (u32 LE) and
    /// sha256. Offsets follow from the lengths.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_SIZE + ENTRY_SIZE * self.chunks.len());
        out.extend_from_slice(MAGIC);
        for size in [MIN_CHUNK, AVG_CHUNK, MAX_CHUNK] {
            out.extend_from_slice(&(size as u32).to_le_bytes());
        }
        out.extend_from_slice(&self.total_length().to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.length.to_le_bytes());
            out.extend_from_slice(&c.compressed_length.to_le_bytes());
            out.extend_from_slice(&c.sha256);
        }
        out
    }

    /// Parses an index file, checking every field against what this chunker can have written:
    /// the sizes it was made with, chunk lengths within bounds (only the last may be shorter than
    /// the minimum), lengths that add up to the image length, compressed lengths within zstd's
    /// bound, and nothing after the last entry. Allocates only by the input's own length.
    pub fn parse(bytes: &[u8]) -> Result<ChunkIndex, IndexError> {
        let bad = |what: String| Err(IndexError(what));
        if bytes.len() as u64 > MAX_INDEX_SIZE {
            return bad(format!(
                "{} bytes, more than the limit of {MAX_INDEX_SIZE}",
                bytes.len()
            ));
        }
        if bytes.len() < HEADER_SIZE {
            return bad(format!(
                "{} bytes, shorter than its {HEADER_SIZE}-byte header",
                bytes.len()
            ));
        }
        if &bytes[..8] != MAGIC {
            return bad("does not start with `PLCHUNK1`".to_owned());
        }
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(b)
        };
        let sizes = [u32_at(8), u32_at(12), u32_at(16)];
        let ours = [MIN_CHUNK as u32, AVG_CHUNK as u32, MAX_CHUNK as u32];
        if sizes != ours {
            return bad(format!(
                "made with chunk sizes {}/{}/{} (min/avg/max), this program cuts {}/{}/{}",
                sizes[0], sizes[1], sizes[2], ours[0], ours[1], ours[2]
            ));
        }
        let mut total = [0u8; 8];
        total.copy_from_slice(&bytes[20..28]);
        let total = u64::from_le_bytes(total);
        let count = u32_at(28) as usize;
        let body = &bytes[HEADER_SIZE..];
        if Some(body.len()) != count.checked_mul(ENTRY_SIZE) {
            return bad(format!(
                "says {count} chunks ({} bytes of entries) but {} bytes follow the header",
                count.saturating_mul(ENTRY_SIZE),
                body.len()
            ));
        }
        let mut index = ChunkIndex {
            chunks: Vec::with_capacity(count),
        };
        for (i, entry) in body.chunks_exact(ENTRY_SIZE).enumerate() {
            let length = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
            let compressed = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]);
            let mut sha256 = [0u8; 32];
            sha256.copy_from_slice(&entry[8..40]);
            let last = i + 1 == count;
            if length == 0
                || length as usize > MAX_CHUNK
                || (!last && (length as usize) < MIN_CHUNK)
            {
                return bad(format!(
                    "chunk {i} is {length} bytes; chunks are {MIN_CHUNK} to {MAX_CHUNK} bytes (the last at least 1)"
                ));
            }
            if compressed == 0 || compressed > max_compressed(length) {
                return bad(format!(
                    "chunk {i} of {length} bytes claims {compressed} compressed bytes; allowed are 1 to {}",
                    max_compressed(length)
                ));
            }
            index.push(length, sha256, compressed);
        }
        if index.total_length() != total {
            return bad(format!(
                "the chunks add up to {} bytes, the header says {total}",
                index.total_length()
            ));
        }
        Ok(index)
    }
}

/// Chunks everything `reader` gives and calls `each(offset, chunk)`; returns the total length.
pub fn for_each_chunk(
    reader: impl Read,
    mut each: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<u64> {
    let mut chunker = Chunker::new(reader);
    let mut total = 0;
    while let Some((offset, chunk)) = chunker.next_chunk()? {
        total = offset + chunk.len() as u64;
        each(offset, chunk)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::noise;

    fn chunks_of(data: &[u8]) -> Vec<(u64, [u8; 32], usize)> {
        let mut out = Vec::new();
        for_each_chunk(data, |offset, chunk| {
            out.push((offset, digest(chunk), chunk.len()));
            Ok(())
        })
        .expect("in memory");
        out
    }

    #[test]
    fn chunks_cover_the_input_within_bounds_and_average_near_the_target() {
        let data = noise(1, 16 << 20);
        let chunks = chunks_of(&data);
        let mut at = 0u64;
        for (i, (offset, _, len)) in chunks.iter().enumerate() {
            assert_eq!(*offset, at);
            assert!(*len <= MAX_CHUNK);
            assert!(
                *len >= MIN_CHUNK || i + 1 == chunks.len(),
                "chunk {i}: {len}"
            );
            at += *len as u64;
        }
        assert_eq!(at, data.len() as u64);
        let avg = data.len() / chunks.len();
        assert!(
            (AVG_CHUNK * 3 / 4..AVG_CHUNK * 3 / 2).contains(&avg),
            "average {avg}"
        );
        // Deterministic, and the same through a reader that returns one byte at a time.
        assert_eq!(chunks_of(&data), chunks);
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(buf.len()).min(7);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut trickled = Vec::new();
        for_each_chunk(Trickle(&data[..2 << 20]), |offset, chunk| {
            trickled.push((offset, digest(chunk), chunk.len()));
            Ok(())
        })
        .expect("reads");
        let direct = chunks_of(&data[..2 << 20]);
        assert_eq!(trickled, direct);
        // Empty and tiny inputs.
        assert!(chunks_of(&[]).is_empty());
        assert_eq!(chunks_of(&[1, 2, 3]).len(), 1);
        // Input with no cut points (zeros) is cut at the maximum.
        let zeros = chunks_of(&vec![0u8; MAX_CHUNK * 3 + 5]);
        assert_eq!(
            zeros.iter().map(|c| c.2).collect::<Vec<_>>(),
            [MAX_CHUNK, MAX_CHUNK, MAX_CHUNK, 5]
        );
    }

    #[test]
    fn a_shifted_input_reuses_every_chunk_but_those_around_the_edit() {
        let old = noise(2, 8 << 20);
        // Insert 1000 bytes and change 10 bytes further on: everything after shifts.
        let mut new = old[..3 << 20].to_vec();
        new.extend_from_slice(&noise(3, 1000));
        new.extend_from_slice(&old[3 << 20..5 << 20]);
        new.extend_from_slice(&[0xaa; 10]);
        new.extend_from_slice(&old[(5 << 20) + 10..]);
        let known: std::collections::HashSet<[u8; 32]> =
            chunks_of(&old).iter().map(|c| c.1).collect();
        let chunks = chunks_of(&new);
        let missing: Vec<_> = chunks.iter().filter(|c| !known.contains(&c.1)).collect();
        let missing_bytes: usize = missing.iter().map(|c| c.2).sum();
        assert!(
            (2..=6).contains(&missing.len()),
            "{} of {} chunks new",
            missing.len(),
            chunks.len()
        );
        assert!(missing_bytes < 4 * MAX_CHUNK, "{missing_bytes} bytes new");
        // The new chunks lie around the two edits.
        for (offset, _, len) in &missing {
            let end = offset + *len as u64;
            let near = |at: u64| *offset <= at + MAX_CHUNK as u64 && end + MAX_CHUNK as u64 >= at;
            assert!(near(3 << 20) || near((5 << 20) + 1000), "chunk at {offset}");
        }
    }

    fn index_of(data: &[u8]) -> ChunkIndex {
        let mut index = ChunkIndex::default();
        for_each_chunk(data, |_, chunk| {
            index.push(
                chunk.len() as u32,
                digest(chunk),
                chunk.len() as u32 / 2 + 1,
            );
            Ok(())
        })
        .expect("in memory");
        index
    }

    #[test]
    fn index_round_trips() {
        let data = noise(4, 3 << 20);
        let index = index_of(&data);
        let bytes = index.to_bytes();
        assert_eq!(bytes.len(), HEADER_SIZE + ENTRY_SIZE * index.chunks.len());
        let parsed = ChunkIndex::parse(&bytes).expect("parses");
        assert_eq!(parsed, index);
        assert_eq!(parsed.total_length(), data.len() as u64);
        assert_eq!(
            ChunkIndex::parse(&ChunkIndex::default().to_bytes()),
            Ok(ChunkIndex::default())
        );
    }

    #[test]
    fn index_parser_refuses_hostile_input_with_a_reason() {
        let good = index_of(&noise(5, 1 << 20)).to_bytes();
        let set = |at: usize, value: &[u8]| {
            let mut b = good.clone();
            b[at..at + value.len()].copy_from_slice(value);
            b
        };
        let entry = |i: usize| HEADER_SIZE + ENTRY_SIZE * i;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "shorter than its 32-byte header"),
            (good[..HEADER_SIZE - 1].to_vec(), "shorter than"),
            (set(0, b"PLCHUNK2"), "does not start with"),
            (
                set(12, &1u32.to_le_bytes()),
                "made with chunk sizes 16384/1/262144",
            ),
            (set(28, &u32::MAX.to_le_bytes()), "says 4294967295 chunks"),
            (set(28, &0u32.to_le_bytes()), "says 0 chunks"),
            (good[..good.len() - 1].to_vec(), "bytes follow the header"),
            ([good.clone(), vec![0]].concat(), "bytes follow the header"),
            (set(entry(0), &0u32.to_le_bytes()), "chunk 0 is 0 bytes"),
            (set(entry(0), &100u32.to_le_bytes()), "chunk 0 is 100 bytes"),
            (
                set(entry(1), &(MAX_CHUNK as u32 + 1).to_le_bytes()),
                "chunk 1 is 262145 bytes",
            ),
            (
                set(entry(0) + 4, &0u32.to_le_bytes()),
                "claims 0 compressed",
            ),
            (
                set(entry(0) + 4, &u32::MAX.to_le_bytes()),
                "claims 4294967295 compressed",
            ),
            (set(20, &1u64.to_le_bytes()), "the header says 1"),
            (
                vec![0u8; MAX_INDEX_SIZE as usize + 1],
                "more than the limit",
            ),
        ];
        for (bytes, want) in cases {
            let err = ChunkIndex::parse(&bytes).expect_err(want);
            assert!(err.to_string().contains(want), "{want}: {err}");
            assert!(err.to_string().starts_with("chunk index: "), "{err}");
        }
    }
}
