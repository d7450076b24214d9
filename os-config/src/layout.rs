//! The partition layout of a Plinth disk: labels, order and Discoverable Partitions Specification
//! type GUIDs, shared by the builder (which writes it) and the running OS (which finds its slots by it).

/// One root slot: `a` or `b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
    if root_hash.len() != 64 || !root_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let hash = root_hash.to_ascii_lowercase();
    Some((uuid_text(&hash[..32]), uuid_text(&hash[32..])))
}

/// Formats 32 hex digits as `8-4-4-4-12`.
fn uuid_text(hex32: &str) -> String {
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
    fn slot_uuids_split_the_root_hash() {
        let hash = "0123456789abcdef0123456789ABCDEFfedcba9876543210fedcba9876543210";
        let (root, verity) = slot_uuids(hash).expect("valid hash");
        assert_eq!(root, "01234567-89ab-cdef-0123-456789abcdef");
        assert_eq!(verity, "fedcba98-7654-3210-fedc-ba9876543210");
        assert_eq!(slot_uuids("abc"), None);
        assert_eq!(slot_uuids(&"g".repeat(64)), None);
    }
}
