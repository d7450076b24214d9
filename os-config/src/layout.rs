//! The partition layout of a Plinth disk: labels, order and Discoverable Partitions Specification
//! type GUIDs, shared by the builder (which writes it) and the running OS (which finds its slots by it).

/// One root slot: `a` or `b` (in JSON too).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    /// Both slots, in partition order.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The slot's letter as used in labels, entry names and `plinth.slot=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// Parses `a` or `b`.
    pub fn parse(text: &str) -> Option<Slot> {
        match text {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }

    /// The other slot (the one an update writes to).
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// GPT label of the slot's root partition (`root-a`).
    pub fn root_label(self) -> &'static str {
        match self {
            Slot::A => ROOT_A,
            Slot::B => ROOT_B,
        }
    }

    /// GPT label of the slot's verity partition (`verity-a`).
    pub fn verity_label(self) -> &'static str {
        match self {
            Slot::A => VERITY_A,
            Slot::B => VERITY_B,
        }
    }

    /// Folder on the ESP holding the slot's kernel and initrd (`/plinth/a`).
    pub fn esp_dir(self) -> &'static str {
        match self {
            Slot::A => "/plinth/a",
            Slot::B => "/plinth/b",
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// GPT label of the EFI system partition.
pub const ESP: &str = "esp";
/// GPT label of slot A's root partition.
pub const ROOT_A: &str = "root-a";
/// GPT label of slot A's verity partition.
pub const VERITY_A: &str = "verity-a";
/// GPT label of slot B's root partition.
pub const ROOT_B: &str = "root-b";
/// GPT label of slot B's verity partition.
pub const VERITY_B: &str = "verity-b";
/// GPT label of the writable state partition, mounted at `/var`.
pub const STATE: &str = "state";

/// DPS type GUID of an EFI system partition.
pub const TYPE_ESP: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
/// DPS type GUID of an x86-64 root partition.
pub const TYPE_ROOT_X86_64: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
/// DPS type GUID of an x86-64 root verity partition.
pub const TYPE_ROOT_VERITY_X86_64: &str = "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5";
/// DPS type GUID of a `/var` partition.
pub const TYPE_VAR: &str = "4d21b016-b534-45c2-a9fb-5c16e091fd2d";

/// What a partition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Esp,
    Root(Slot),
    Verity(Slot),
    State,
}

/// One partition of the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionSpec {
    /// GPT partition number (1-based).
    pub number: u32,
    /// GPT partition name.
    pub label: &'static str,
    /// DPS type GUID, lowercase.
    pub type_guid: &'static str,
    pub role: Role,
}

/// The partitions of a Plinth disk, in on-disk order.
pub const PARTITIONS: [PartitionSpec; 6] = [
    PartitionSpec {
        number: 1,
        label: ESP,
        type_guid: TYPE_ESP,
        role: Role::Esp,
    },
    PartitionSpec {
        number: 2,
        label: ROOT_A,
        type_guid: TYPE_ROOT_X86_64,
        role: Role::Root(Slot::A),
    },
    PartitionSpec {
        number: 3,
        label: VERITY_A,
        type_guid: TYPE_ROOT_VERITY_X86_64,
        role: Role::Verity(Slot::A),
    },
    PartitionSpec {
        number: 4,
        label: ROOT_B,
        type_guid: TYPE_ROOT_X86_64,
        role: Role::Root(Slot::B),
    },
    PartitionSpec {
        number: 5,
        label: VERITY_B,
        type_guid: TYPE_ROOT_VERITY_X86_64,
        role: Role::Verity(Slot::B),
    },
    PartitionSpec {
        number: 6,
        label: STATE,
        type_guid: TYPE_VAR,
        role: Role::State,
    },
];

/// Looks up a partition of the layout by its GPT label.
pub fn by_label(label: &str) -> Option<&'static PartitionSpec> {
    PARTITIONS.iter().find(|p| p.label == label)
}

/// Partition starts and sizes are multiples of this (1 MiB).
pub const ALIGNMENT: u64 = 1 << 20;

/// The partition UUIDs of a slot as the DPS derives them from its verity root hash (hex, 64
/// digits): root = first 128 bits, verity = last 128 bits, both formatted as lowercase UUIDs.
/// Returns `None` if `root_hash` is not 64 hex digits.
pub fn slot_uuids(root_hash: &str) -> Option<(String, String)> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(root_hash, &mut hash).ok()?;
    Some(slot_uuids_of(&hash))
}

/// [`slot_uuids`] of a root hash's 32 bytes.
pub fn slot_uuids_of(root_hash: &[u8; 32]) -> (String, String) {
    (uuid_text(&root_hash[..16]), uuid_text(&root_hash[16..]))
}

/// Formats 16 bytes in order as a lowercase `8-4-4-4-12` UUID.
fn uuid_text(bytes: &[u8]) -> String {
    let hex32 = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex32[..8],
        &hex32[8..12],
        &hex32[12..16],
        &hex32[16..20],
        &hex32[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_numbered_in_order_with_unique_labels() {
        for (i, p) in PARTITIONS.iter().enumerate() {
            assert_eq!(p.number as usize, i + 1);
            assert_eq!(by_label(p.label), Some(p));
        }
        assert_eq!(by_label("root-c"), None);
        assert_eq!(Slot::A.root_label(), "root-a");
        assert_eq!(Slot::B.verity_label(), "verity-b");
        assert_eq!(Slot::A.other(), Slot::B);
        assert_eq!(Slot::parse("b"), Some(Slot::B));
        assert_eq!(Slot::parse("c"), None);
    }

    #[test]
    fn the_verity_superblock_written_is_the_one_read() {
        let sb = VeritySuperblock {
            data_blocks: 300,
            salt: vec![0xab; 32],
            uuid: [7; 16],
        };
        let bytes = sb.to_bytes();
        assert_eq!(bytes.len(), VERITY_BLOCK_SIZE as usize);
        assert_eq!(VeritySuperblock::parse(&bytes), Ok(sb));
    }

    #[test]
    fn slot_uuids_split_the_root_hash() {
        let hash = "0123456789abcdef0123456789ABCDEFfedcba9876543210fedcba9876543210";
        let (root, verity) = slot_uuids(hash).expect("valid hash");
        assert_eq!(root, "01234567-89ab-cdef-0123-456789abcdef");
        assert_eq!(verity, "fedcba98-7654-3210-fedc-ba9876543210");
        assert_eq!(slot_uuids("abc"), None);
        assert_eq!(slot_uuids(&"g".repeat(64)), None);
    }
}

/// What the verity superblock (block 0 of a verity partition) records; `plinth-init` builds the
/// dm-verity table from it and the root hash on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VeritySuperblock {
    /// Number of 4 KiB data blocks of the root image the tree covers.
    pub data_blocks: u64,
    pub salt: Vec<u8>,
    pub uuid: [u8; 16],
}

/// Size of data and hash blocks Plinth uses.
pub const VERITY_BLOCK_SIZE: u64 = 4096;

impl VeritySuperblock {
    /// Size of the on-disk superblock: the bytes [`VeritySuperblock::parse`] needs.
    pub const SIZE: usize = 512;

    /// Parses the first 512 bytes of a verity partition; only the format Plinth writes (format
    /// version 1, sha256, 4 KiB blocks) is accepted. Every field is checked before it is used.
    pub fn parse(bytes: &[u8]) -> Result<VeritySuperblock, String> {
        if bytes.len() < Self::SIZE || &bytes[..8] != b"verity\0\0" {
            return Err("no verity superblock (signature `verity` missing)".to_owned());
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let (version, hash_type) = (u32_at(8), u32_at(12));
        let algorithm = bytes[32..64].split(|b| *b == 0).next().unwrap_or_default();
        if version != 1 || hash_type != 1 || algorithm != b"sha256" {
            return Err(format!(
                "unsupported verity superblock: version {version}, hash type {hash_type}, algorithm {}",
                String::from_utf8_lossy(algorithm)
            ));
        }
        let (data_block_size, hash_block_size) = (u32_at(64), u32_at(68));
        if u64::from(data_block_size) != VERITY_BLOCK_SIZE
            || u64::from(hash_block_size) != VERITY_BLOCK_SIZE
        {
            return Err(format!(
                "unsupported verity data block size {data_block_size} / hash block size {hash_block_size} (expected {VERITY_BLOCK_SIZE})"
            ));
        }
        let mut data_blocks = [0u8; 8];
        data_blocks.copy_from_slice(&bytes[72..80]);
        let data_blocks = u64::from_le_bytes(data_blocks);
        if data_blocks == 0 {
            return Err("verity superblock covers 0 data blocks".to_owned());
        }
        // Sectors must fit in a u64 for the device-mapper table.
        if data_blocks.checked_mul(VERITY_BLOCK_SIZE).is_none() {
            return Err(format!(
                "verity superblock covers {data_blocks} data blocks: too many"
            ));
        }
        let salt_size = usize::from(u16::from_le_bytes([bytes[80], bytes[81]]));
        if salt_size > 256 {
            return Err(format!("verity salt size {salt_size} is larger than 256"));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&bytes[16..32]);
        Ok(VeritySuperblock {
            data_blocks,
            salt: bytes[88..88 + salt_size].to_vec(),
            uuid,
        })
    }

    /// The superblock as `veritysetup format` writes it (format 1, sha256, 4 KiB blocks), padded
    /// to one hash block: what [`VeritySuperblock::parse`] reads. The salt must be at most 256
    /// bytes (longer ones are cut there).
    pub fn to_bytes(&self) -> Vec<u8> {
        let block = VERITY_BLOCK_SIZE as usize;
        let salt = &self.salt[..self.salt.len().min(256)];
        let mut sb = Vec::with_capacity(block);
        sb.extend_from_slice(b"verity\0\0");
        sb.extend_from_slice(&1u32.to_le_bytes()); // superblock version
        sb.extend_from_slice(&1u32.to_le_bytes()); // hash type: normal (format 1)
        sb.extend_from_slice(&self.uuid);
        let mut algorithm = [0u8; 32];
        algorithm[..6].copy_from_slice(b"sha256");
        sb.extend_from_slice(&algorithm);
        sb.extend_from_slice(&(VERITY_BLOCK_SIZE as u32).to_le_bytes()); // data block size
        sb.extend_from_slice(&(VERITY_BLOCK_SIZE as u32).to_le_bytes()); // hash block size
        sb.extend_from_slice(&self.data_blocks.to_le_bytes());
        sb.extend_from_slice(&(salt.len() as u16).to_le_bytes());
        sb.extend_from_slice(&[0u8; 6]);
        let mut padded_salt = [0u8; 256];
        padded_salt[..salt.len()].copy_from_slice(salt);
        sb.extend_from_slice(&padded_salt);
        sb.resize(block, 0);
        sb
    }

    /// Bytes of root data the superblock says the tree covers (no overflow: [`Self::parse`]
    /// refuses counts whose byte length does not fit a `u64`).
    pub fn data_bytes(&self) -> u64 {
        self.data_blocks.saturating_mul(VERITY_BLOCK_SIZE)
    }

    /// Checks the superblock against the partitions it describes, before anything is read or
    /// allocated by its block count: the data must fit the root partition (`root_label`,
    /// `root_size` bytes) and the superblock plus hash tree the verity partition. Returns the
    /// size of superblock plus tree in bytes.
    pub fn check_fits(
        &self,
        root_label: &str,
        root_size: u64,
        verity_label: &str,
        verity_size: u64,
    ) -> Result<u64, String> {
        let data = self.data_bytes();
        if data > root_size {
            return Err(format!(
                "the verity superblock of {verity_label} covers {} data blocks ({data} bytes), more than {root_label} holds ({root_size} bytes)",
                self.data_blocks
            ));
        }
        let tree = crate::manifest::verity_size(self.data_blocks);
        if tree > verity_size {
            return Err(format!(
                "the verity superblock and tree of {} data blocks take {tree} bytes, more than {verity_label} holds ({verity_size} bytes)",
                self.data_blocks
            ));
        }
        Ok(tree)
    }

    /// Length of the protected data in 512-byte sectors.
    pub fn data_sectors(&self) -> u64 {
        self.data_blocks * (VERITY_BLOCK_SIZE / 512)
    }

    /// Parameters of the `verity` target (what follows `verity` in a table line): the hash tree
    /// starts at hash block 1, after this superblock. `extra` are optional arguments such as
    /// `restart_on_corruption`.
    pub fn table_params(
        &self,
        data_dev: &str,
        hash_dev: &str,
        root_hash: &str,
        extra: &[&str],
    ) -> String {
        self.table_params_at(data_dev, hash_dev, 1, root_hash, extra)
    }

    /// [`Self::table_params`] with the hash tree at block `hash_start` of `hash_dev` (the block
    /// after this superblock): a live root holds data, superblock and tree in one file.
    pub fn table_params_at(
        &self,
        data_dev: &str,
        hash_dev: &str,
        hash_start: u64,
        root_hash: &str,
        extra: &[&str],
    ) -> String {
        let salt = if self.salt.is_empty() {
            "-".to_owned()
        } else {
            hex::encode(&self.salt)
        };
        let mut params = format!(
            "1 {data_dev} {hash_dev} {VERITY_BLOCK_SIZE} {VERITY_BLOCK_SIZE} {} {hash_start} sha256 {root_hash} {salt}",
            self.data_blocks
        );
        if !extra.is_empty() {
            params.push_str(&format!(" {} {}", extra.len(), extra.join(" ")));
        }
        params
    }

    /// The device-mapper table line of the verity target (`dmsetup create --table` syntax).
    pub fn table(&self, data_dev: &str, hash_dev: &str, root_hash: &str, extra: &[&str]) -> String {
        format!(
            "0 {} verity {}",
            self.data_sectors(),
            self.table_params(data_dev, hash_dev, root_hash, extra)
        )
    }
}

#[cfg(test)]
mod verity_tests {
    use super::*;

    fn superblock() -> Vec<u8> {
        let mut sb = vec![0u8; 512];
        sb[..8].copy_from_slice(b"verity\0\0");
        sb[8] = 1;
        sb[12] = 1;
        sb[16..32].copy_from_slice(&[0x11; 16]);
        sb[32..38].copy_from_slice(b"sha256");
        sb[64..68].copy_from_slice(&4096u32.to_le_bytes());
        sb[68..72].copy_from_slice(&4096u32.to_le_bytes());
        sb[72..80].copy_from_slice(&300u64.to_le_bytes());
        sb[80] = 2;
        sb[88] = 0xab;
        sb[89] = 0xcd;
        sb
    }

    #[test]
    fn superblock_parses_and_gives_the_table() {
        let sb = VeritySuperblock::parse(&superblock()).expect("valid superblock");
        assert_eq!(sb.data_blocks, 300);
        assert_eq!(sb.salt, [0xab, 0xcd]);
        assert_eq!(sb.uuid, [0x11; 16]);
        assert_eq!(
            sb.table("/dev/vda2", "/dev/vda3", "ff00", &["restart_on_corruption"]),
            "0 2400 verity 1 /dev/vda2 /dev/vda3 4096 4096 300 1 sha256 ff00 abcd 1 restart_on_corruption"
        );
    }

    #[test]
    fn superblocks_larger_than_their_partitions_are_refused() {
        let sb = VeritySuperblock::parse(&superblock()).expect("valid superblock");
        let tree = crate::manifest::verity_size(300);
        assert_eq!(
            sb.check_fits("root-a", 300 * 4096, "verity-a", tree),
            Ok(tree)
        );
        let cases: [(u64, u64, u64, &str); 4] = [
            (
                300,
                299 * 4096,
                tree,
                "covers 300 data blocks (1228800 bytes), more than root-a holds (1224704 bytes)",
            ),
            (300, 300 * 4096, tree - 1, "more than verity-a holds"),
            (
                1 << 40,
                1 << 30,
                1 << 20,
                "covers 1099511627776 data blocks",
            ),
            (
                (1 << 52) - 1,
                u64::MAX,
                1 << 20,
                "more than verity-a holds (1048576 bytes)",
            ),
        ];
        for (blocks, root, verity, expected) in cases {
            let sb = VeritySuperblock {
                data_blocks: blocks,
                ..sb.clone()
            };
            let err = sb
                .check_fits("root-a", root, "verity-a", verity)
                .expect_err(expected);
            assert!(err.contains(expected), "{blocks}: {err}");
        }
    }

    #[test]
    fn foreign_superblocks_are_refused() {
        assert!(VeritySuperblock::parse(&[0u8; 512]).is_err());
        let mut sb = superblock();
        sb[32..38].copy_from_slice(b"sha512");
        let err = VeritySuperblock::parse(&sb).expect_err("sha512");
        assert!(err.contains("sha512"), "{err}");
        let mut sb = superblock();
        sb[64..68].copy_from_slice(&512u32.to_le_bytes());
        assert!(VeritySuperblock::parse(&sb).is_err());
        let mut sb = superblock();
        sb[72..80].copy_from_slice(&0u64.to_le_bytes());
        let err = VeritySuperblock::parse(&sb).expect_err("no data blocks");
        assert!(err.contains("0 data blocks"), "{err}");
        assert!(VeritySuperblock::parse(&superblock()[..511]).is_err());
        let mut sb = superblock();
        sb[72..80].copy_from_slice(&((1u64 << 52) + 1).to_le_bytes());
        let err = VeritySuperblock::parse(&sb).expect_err("more blocks than bytes");
        assert!(
            err.contains("4503599627370497 data blocks: too many"),
            "{err}"
        );
    }
}
