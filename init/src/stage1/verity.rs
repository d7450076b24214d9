//! dm-verity: device-mapper ioctl buffers for the `verity` target (the superblock and the table
//! parameters are `os_config::layout::VeritySuperblock`'s).
//!
//! The buffers are built and parsed here; `syscall::dm_ioctl` only passes them to the kernel.

/// Device-mapper ioctl interface version this code speaks.
pub const DM_VERSION: [u32; 3] = [4, 0, 0];
/// Size of `struct dm_ioctl`.
pub const DM_IOCTL_SIZE: usize = 312;
/// Size of `struct dm_target_spec`.
pub const DM_TARGET_SPEC_SIZE: usize = 40;
/// `DM_READONLY_FLAG`.
pub const DM_READONLY_FLAG: u32 = 1 << 0;
/// `DM_SUSPEND_FLAG`.
pub const DM_SUSPEND_FLAG: u32 = 1 << 1;

/// Device-mapper commands used here (`_IOWR(0xfd, nr, struct dm_ioctl)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmCommand {
    /// `DM_DEV_CREATE`.
    DevCreate = 3,
    /// `DM_DEV_REMOVE`.
    DevRemove = 4,
    /// `DM_DEV_SUSPEND` (suspend or resume, by flag).
    DevSuspend = 6,
    /// `DM_TABLE_LOAD`.
    TableLoad = 9,
}

impl DmCommand {
    /// The ioctl request number.
    pub fn request(self) -> u32 {
        (3 << 30) | ((DM_IOCTL_SIZE as u32) << 16) | (0xfd << 8) | self as u32
    }

    /// The command's name in the kernel headers, for error messages.
    pub fn name(self) -> &'static str {
        match self {
            DmCommand::DevCreate => "DM_DEV_CREATE",
            DmCommand::DevRemove => "DM_DEV_REMOVE",
            DmCommand::DevSuspend => "DM_DEV_SUSPEND",
            DmCommand::TableLoad => "DM_TABLE_LOAD",
        }
    }
}

/// Room the kernel may use for replies after the request.
const DM_BUFFER_SIZE: usize = 16 * 1024;

/// Builds a `struct dm_ioctl` buffer for `name` with `flags`, followed by `targets`
/// (`(start_sector, length_sectors, target_type, params)`).
pub fn dm_buffer(
    name: &str,
    flags: u32,
    targets: &[(u64, u64, &str, &str)],
) -> Result<Vec<u8>, String> {
    if name.is_empty() || name.len() >= 128 || name.contains('/') {
        return Err(format!(
            "device-mapper name {name:?}: 1..127 bytes without '/' allowed"
        ));
    }
    let mut payload = Vec::new();
    for (start, length, target_type, params) in targets {
        if target_type.len() >= 16 {
            return Err(format!(
                "target type {target_type:?} is longer than 15 bytes"
            ));
        }
        let spec_len = (DM_TARGET_SPEC_SIZE + params.len() + 1).div_ceil(8) * 8;
        let mut spec = vec![0u8; spec_len];
        spec[0..8].copy_from_slice(&start.to_ne_bytes());
        spec[8..16].copy_from_slice(&length.to_ne_bytes());
        // status (i32) stays 0; `next` is the offset from this spec to the following one.
        spec[20..24].copy_from_slice(&(spec_len as u32).to_ne_bytes());
        spec[24..24 + target_type.len()].copy_from_slice(target_type.as_bytes());
        spec[40..40 + params.len()].copy_from_slice(params.as_bytes());
        payload.extend_from_slice(&spec);
    }
    let total = (DM_IOCTL_SIZE + payload.len()).max(DM_BUFFER_SIZE);
    let mut buf = vec![0u8; total];
    for (i, part) in DM_VERSION.iter().enumerate() {
        buf[i * 4..i * 4 + 4].copy_from_slice(&part.to_ne_bytes());
    }
    buf[12..16].copy_from_slice(&(total as u32).to_ne_bytes()); // data_size
    buf[16..20].copy_from_slice(&(DM_IOCTL_SIZE as u32).to_ne_bytes()); // data_start
    buf[20..24].copy_from_slice(&(targets.len() as u32).to_ne_bytes()); // target_count
    buf[28..32].copy_from_slice(&flags.to_ne_bytes());
    buf[48..48 + name.len()].copy_from_slice(name.as_bytes());
    buf[DM_IOCTL_SIZE..DM_IOCTL_SIZE + payload.len()].copy_from_slice(&payload);
    Ok(buf)
}

/// The `dev` field (kernel `huge_encode_dev` format) of a `struct dm_ioctl` reply, as (major, minor).
pub fn dm_reply_dev(buf: &[u8]) -> (u32, u32) {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&buf[40..48]);
    let dev = u64::from_ne_bytes(raw);
    let major = ((dev >> 8) & 0xfff) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff_ff00)) as u32;
    (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::stage1::cmdline::RootHash;
    use os_config::layout::VeritySuperblock;

    /// A superblock as `veritysetup format` writes it (sha256, 4096/4096, 8 blocks, 32-byte salt).
    fn superblock_bytes() -> Vec<u8> {
        let mut sb = vec![0u8; 512];
        sb[0..8].copy_from_slice(b"verity\0\0");
        sb[8..12].copy_from_slice(&1u32.to_le_bytes());
        sb[12..16].copy_from_slice(&1u32.to_le_bytes());
        sb[16..32].copy_from_slice(&[0xab; 16]);
        sb[32..38].copy_from_slice(b"sha256");
        sb[64..68].copy_from_slice(&4096u32.to_le_bytes());
        sb[68..72].copy_from_slice(&4096u32.to_le_bytes());
        sb[72..80].copy_from_slice(&8u64.to_le_bytes());
        sb[80..82].copy_from_slice(&32u16.to_le_bytes());
        for (i, byte) in sb[88..120].iter_mut().enumerate() {
            *byte = i as u8;
        }
        sb
    }

    /// The table parameters stage 1 loads: the hash tree restarts the machine on corruption.
    fn stage1_params(sb: &VeritySuperblock, hash: &RootHash) -> String {
        sb.table_params(
            "/dev/vda2",
            "/dev/vda3",
            &hash.to_hex(),
            &["restart_on_corruption"],
        )
    }

    #[test]
    fn parses_superblock_and_builds_table() {
        let sb = VeritySuperblock::parse(&superblock_bytes()).expect("parses");
        assert_eq!(sb.data_blocks, 8);
        assert_eq!(sb.data_sectors(), 64);
        assert_eq!(sb.salt.len(), 32);
        let hash = RootHash([0x5a; 32]);
        assert_eq!(
            stage1_params(&sb, &hash),
            format!(
                "1 /dev/vda2 /dev/vda3 4096 4096 8 1 sha256 {} 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f 1 restart_on_corruption",
                "5a".repeat(32)
            )
        );
    }

    #[test]
    fn table_from_a_veritysetup_superblock() {
        let bytes: Vec<u8> = (0..16 * 4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let salt = "5a".repeat(32);
        let oracle = os_config::oracle::veritysetup_format(&bytes, Some(&salt), None);
        let (root, device) = (oracle.root_hash, oracle.hash_device);
        let sb = VeritySuperblock::parse(&device).expect("veritysetup's superblock parses");
        assert_eq!(sb.data_blocks, 16);
        assert_eq!(hex::encode(&sb.salt), salt);
        let hash = RootHash::parse(&root).expect("root hash");
        // Format version 1, hash type 1, sha256 and 4096-byte blocks, as veritysetup wrote them.
        assert_eq!(
            stage1_params(&sb, &hash),
            format!(
                "1 /dev/vda2 /dev/vda3 4096 4096 16 1 sha256 {root} {salt} 1 restart_on_corruption"
            )
        );
        assert_eq!(sb.data_sectors(), 16 * 8);
    }

    #[test]
    fn empty_salt_is_a_dash() {
        let mut bytes = superblock_bytes();
        bytes[80..82].copy_from_slice(&0u16.to_le_bytes());
        let sb = VeritySuperblock::parse(&bytes).expect("parses");
        let params = sb.table_params(
            "a",
            "b",
            &RootHash([0; 32]).to_hex(),
            &["restart_on_corruption"],
        );
        assert!(
            params.contains(&format!("{} - 1 restart", "00".repeat(32))),
            "{params}"
        );
    }

    #[test]
    fn rejects_bad_superblocks() {
        let cases: [(usize, &[u8], &str); 5] = [
            (0, b"VERITY", "no verity superblock"),
            (8, &2u32.to_le_bytes(), "version 2"),
            (64, &1000u32.to_le_bytes(), "data block size 1000"),
            (80, &300u16.to_le_bytes(), "salt size 300"),
            (72, &0u64.to_le_bytes(), "0 data blocks"),
        ];
        for (offset, patch, expected) in cases {
            let mut bytes = superblock_bytes();
            bytes[offset..offset + patch.len()].copy_from_slice(patch);
            let err = VeritySuperblock::parse(&bytes).expect_err(expected);
            assert!(err.contains(expected), "{err}");
        }
        assert!(VeritySuperblock::parse(&[0u8; 100]).is_err());
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(DmCommand::DevCreate.request(), 0xc138_fd03);
        assert_eq!(DmCommand::DevSuspend.request(), 0xc138_fd06);
        assert_eq!(DmCommand::TableLoad.request(), 0xc138_fd09);
    }

    #[test]
    fn table_load_buffer_layout() {
        let buf =
            dm_buffer("root", DM_READONLY_FLAG, &[(0, 64, "verity", "1 a b")]).expect("buffer");
        assert_eq!(buf.len(), 16 * 1024);
        assert_eq!(&buf[0..4], &4u32.to_ne_bytes());
        assert_eq!(&buf[16..20], &312u32.to_ne_bytes());
        assert_eq!(&buf[20..24], &1u32.to_ne_bytes());
        assert_eq!(&buf[28..32], &1u32.to_ne_bytes());
        assert_eq!(&buf[48..53], b"root\0");
        let spec = &buf[312..];
        assert_eq!(&spec[8..16], &64u64.to_ne_bytes());
        assert_eq!(&spec[20..24], &48u32.to_ne_bytes());
        assert_eq!(&spec[24..31], b"verity\0");
        assert_eq!(&spec[40..46], b"1 a b\0");
        assert!(dm_buffer("a/b", 0, &[]).is_err());
    }

    #[test]
    fn reply_dev_decodes_major_minor() {
        let mut buf = vec![0u8; 312];
        // major 253, minor 0x123: huge_encode_dev = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
        let dev: u64 = 0x23 | (253 << 8) | (0x100 << 12);
        buf[40..48].copy_from_slice(&dev.to_ne_bytes());
        assert_eq!(dm_reply_dev(&buf), (253, 0x123));
    }
}
