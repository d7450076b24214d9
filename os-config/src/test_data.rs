//! Data for tests of the workspace (enabled by the `test-disks` feature, which only tests turn
//! on).

/// `len` pseudo-random bytes from `seed` (xorshift64), the same for the same seed: they do not
/// compress, like a squashfs root image, and tests use them as image content.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_repeats_per_seed_and_differs_between_seeds() {
        assert_eq!(noise(1, 4096), noise(1, 4096));
        assert_ne!(noise(1, 4096), noise(2, 4096));
        // It does not compress: hardly any byte value is missing in 64 KiB.
        let data = noise(3, 65536);
        let mut seen = [false; 256];
        for b in &data {
            seen[usize::from(*b)] = true;
        }
        assert!(seen.iter().filter(|s| **s).count() > 250);
    }
}
