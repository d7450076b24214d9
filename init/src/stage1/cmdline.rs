//! What stage 1 requires of the kernel command line: `plinth.slot=` (or `plinth.live`),
//! `plinth.version=`, `plinth.roothash=`, `plinth.verity=`. The line is split by `os_config::cmdline` (the kernel's
//! quoting, the last value of a key wins); the keys are `os_config::boot`'s.

use std::fmt;

use os_config::boot::{verity_off, ARG_ROOTHASH, ARG_SLOT, ARG_VERITY, ARG_VERSION};
use os_config::cmdline::Cmdline as Args;
use os_config::layout::Slot;
use os_config::live::ARG_LIVE;

/// A dm-verity root hash (SHA-256, 32 bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RootHash(pub [u8; 32]);

impl RootHash {
    /// Parses 64 hexadecimal digits.
    pub fn parse(text: &str) -> Result<RootHash, String> {
        let bytes = hex::decode(text)
            .ok()
            .filter(|bytes| bytes.len() == 32)
            .ok_or_else(|| {
                format!("{text:?} is not a root hash: expected 64 hexadecimal digits (SHA-256)")
            })?;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes);
        Ok(RootHash(hash))
    }

    /// Lowercase hexadecimal form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// UUID of the root partition per the Discoverable Partitions Specification: the first 128 bits.
    pub fn root_uuid(&self) -> String {
        os_config::layout::slot_uuids_of(&self.0).0
    }

    /// UUID of the verity partition per the Discoverable Partitions Specification: the last 128 bits.
    pub fn verity_uuid(&self) -> String {
        os_config::layout::slot_uuids_of(&self.0).1
    }
}

impl fmt::Debug for RootHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootHash({})", self.to_hex())
    }
}

impl fmt::Display for RootHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// What Plinth reads from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    /// The slot to boot (`plinth.slot=`); `None` for a live boot.
    pub slot: Option<Slot>,
    /// A live (network) boot: `plinth.live`, the root from the initramfs or `plinth.root-url=`.
    pub live: bool,
    /// The OS version of the booted entry (`plinth.version=`), if given.
    pub version: Option<String>,
    /// The verity root hash (`plinth.roothash=`); required unless verity is off.
    pub roothash: Option<RootHash>,
    /// False only when `plinth.verity=off` (or `0`) is present (debugging images).
    pub verity: bool,
    /// Every argument, including the ones above.
    pub args: Args,
}

impl Cmdline {
    /// Parses `/proc/cmdline` content. Double quotes group words (`key="a b"`).
    pub fn parse(text: &str) -> Result<Cmdline, String> {
        let args = Args::parse(text);
        let live = args.has(ARG_LIVE);
        let slot = match args.value(ARG_SLOT) {
            Some(_) if live => {
                return Err(format!(
                    "{ARG_LIVE} and {ARG_SLOT}= are both on the kernel command line: a live boot has no slot"
                ))
            }
            Some(text) => Some(Slot::parse(text).ok_or_else(|| {
                format!(
                    "{ARG_SLOT}={text:?} on the kernel command line: allowed values are a and b"
                )
            })?),
            None if live => None,
            None => {
                return Err(format!(
                    "{ARG_SLOT}= is missing from the kernel command line (or {ARG_LIVE} for a live boot)"
                ))
            }
        };
        let verity = match args.value(ARG_VERITY) {
            None | Some("1" | "on") => true,
            Some(value) if verity_off(value) => false,
            Some(other) => {
                return Err(format!(
                    "{ARG_VERITY}={other:?} on the kernel command line: allowed values are off (or 0) and on (or 1)"
                ))
            }
        };
        let roothash = match args.value(ARG_ROOTHASH) {
            Some(text) => Some(
                RootHash::parse(text).map_err(|e| format!("{ARG_ROOTHASH} on the kernel command line: {e}"))?,
            ),
            None if verity => {
                return Err(format!("{ARG_ROOTHASH}= is missing from the kernel command line (needed for dm-verity; only debugging images may set {ARG_VERITY}=0)"))
            }
            None => None,
        };
        Ok(Cmdline {
            slot,
            live,
            version: args.value(ARG_VERSION).map(str::to_owned),
            roothash,
            verity,
            args,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "00112233445566778899aabbccddeeff0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_slot_version_hash_and_keeps_other_args() {
        let line = format!(
            "BOOT_IMAGE=/vmlinuz plinth.slot=b plinth.version=1.2.3 plinth.roothash={HASH} console=ttyS0 quiet msg=\"a b\"\n"
        );
        let cmdline = Cmdline::parse(&line).expect("parses");
        assert_eq!(cmdline.slot, Some(Slot::B));
        assert!(!cmdline.live);
        assert_eq!(cmdline.version.as_deref(), Some("1.2.3"));
        assert!(cmdline.verity);
        let hash = cmdline.roothash.expect("hash");
        assert_eq!(hash.to_hex(), HASH);
        assert_eq!(hash.root_uuid(), "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(hash.verity_uuid(), "01234567-89ab-cdef-0123-456789abcdef");
        let args = cmdline.args.args();
        assert!(args.contains(&("quiet".into(), None)));
        assert!(args.contains(&("msg".into(), Some("a b".into()))));
        assert!(args.contains(&("console".into(), Some("ttyS0".into()))));
    }

    #[test]
    fn verity_off_needs_no_hash() {
        let cmdline = Cmdline::parse("plinth.slot=a plinth.verity=0").expect("parses");
        assert!(!cmdline.verity);
        assert_eq!(cmdline.roothash, None);
    }

    #[test]
    fn verity_off_as_the_builder_writes_it() {
        // The boot entry of a `[image] verity = false` image keeps the hash and adds `off`.
        let hash = "ab".repeat(32);
        let line = os_config::boot::Entry {
            slot: Slot::A,
            version: "1.0".into(),
            root_hash: hash.clone(),
            extra_args: vec!["console=ttyS0".into()],
            verity: false,
        }
        .options();
        let cmdline = Cmdline::parse(&line).expect("parses");
        assert!(!cmdline.verity, "{line}");
        assert_eq!(cmdline.roothash.map(|h| h.to_hex()), Some(hash));
        let on = Cmdline::parse(&format!("{line} plinth.verity=on")).expect("parses");
        assert!(on.verity);
    }

    #[test]
    fn errors_name_the_argument() {
        let cases = [
            ("console=ttyS0", "plinth.slot= is missing"),
            ("plinth.slot=c", "allowed values are a and b"),
            ("plinth.slot=a", "plinth.roothash= is missing"),
            (
                "plinth.slot=a plinth.roothash=abc",
                "expected 64 hexadecimal digits",
            ),
            (
                "plinth.slot=a plinth.verity=no",
                "allowed values are off (or 0) and on (or 1)",
            ),
        ];
        for (line, expected) in cases {
            let err = Cmdline::parse(line).expect_err(line);
            assert!(err.contains(expected), "{line}: {err}");
        }
    }
}
