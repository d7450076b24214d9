//! The kernel command line: `plinth.slot=`, `plinth.version=`, `plinth.roothash=`, `plinth.verity=`.

use std::fmt;

/// An A/B root slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Slot A (`root-a`, `verity-a`).
    A,
    /// Slot B (`root-b`, `verity-b`).
    B,
}

impl Slot {
    /// The slot letter as written in partition labels and on the command line.
    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// GPT label of the slot's root partition.
    pub fn root_label(self) -> String {
        format!("root-{}", self.letter())
    }

    /// GPT label of the slot's verity partition.
    pub fn verity_label(self) -> String {
        format!("verity-{}", self.letter())
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.letter())
    }
}

/// A dm-verity root hash (SHA-256, 32 bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RootHash(pub [u8; 32]);

impl RootHash {
    /// Parses 64 hexadecimal digits.
    pub fn parse(text: &str) -> Result<RootHash, String> {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(text, &mut hash).map_err(|_| {
            format!("{text:?} is not a root hash: expected 64 hexadecimal digits (SHA-256)")
        })?;
        Ok(RootHash(hash))
    }

    /// Lowercase hexadecimal form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// UUID of the root partition per the Discoverable Partitions Specification: the first 128 bits.
    pub fn root_uuid(&self) -> String {
        format_uuid(&self.0[..16])
    }

    /// UUID of the verity partition per the Discoverable Partitions Specification: the last 128 bits.
    pub fn verity_uuid(&self) -> String {
        format_uuid(&self.0[16..])
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

/// Formats 16 bytes in order as a lowercase `8-4-4-4-12` UUID string.
pub fn format_uuid(bytes: &[u8]) -> String {
    let hex = hex::encode(bytes);
    if hex.len() != 32 {
        return hex;
    }
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// What Plinth reads from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    /// The slot to boot (`plinth.slot=`).
    pub slot: Slot,
    /// The OS version of the booted entry (`plinth.version=`), if given.
    pub version: Option<String>,
    /// The verity root hash (`plinth.roothash=`); required unless verity is off.
    pub roothash: Option<RootHash>,
    /// False only when `plinth.verity=off` (or `0`) is present (debugging images).
    pub verity: bool,
    /// Every argument as (key, value), in order, including the ones above.
    pub args: Vec<(String, Option<String>)>,
}

impl Cmdline {
    /// Parses `/proc/cmdline` content. Double quotes group words (`key="a b"`).
    pub fn parse(text: &str) -> Result<Cmdline, String> {
        let args = split_args(text);
        let get = |key: &str| {
            args.iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone().unwrap_or_default())
        };
        let slot = match get("plinth.slot").as_deref() {
            Some("a") => Slot::A,
            Some("b") => Slot::B,
            Some(other) => {
                return Err(format!(
                    "plinth.slot={other:?} on the kernel command line: allowed values are a and b"
                ))
            }
            None => return Err("plinth.slot= is missing from the kernel command line".into()),
        };
        let verity = match get("plinth.verity").as_deref() {
            None | Some("1" | "on") => true,
            Some("0" | "off") => false,
            Some(other) => {
                return Err(format!(
                    "plinth.verity={other:?} on the kernel command line: allowed values are off (or 0) and on (or 1)"
                ))
            }
        };
        let roothash = match get("plinth.roothash") {
            Some(text) => Some(
                RootHash::parse(&text).map_err(|e| format!("plinth.roothash on the kernel command line: {e}"))?,
            ),
            None if verity => {
                return Err("plinth.roothash= is missing from the kernel command line (needed for dm-verity; only debugging images may set plinth.verity=0)".into())
            }
            None => None,
        };
        Ok(Cmdline {
            slot,
            version: get("plinth.version"),
            roothash,
            verity,
            args,
        })
    }
}

/// Splits a command line into `key[=value]` arguments, honouring double quotes.
fn split_args(text: &str) -> Vec<(String, Option<String>)> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(current);
    }
    words
        .into_iter()
        .map(|word| match word.split_once('=') {
            Some((key, value)) => (key.to_string(), Some(value.to_string())),
            None => (word, None),
        })
        .collect()
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
        assert_eq!(cmdline.slot, Slot::B);
        assert_eq!(cmdline.version.as_deref(), Some("1.2.3"));
        assert!(cmdline.verity);
        let hash = cmdline.roothash.expect("hash");
        assert_eq!(hash.to_hex(), HASH);
        assert_eq!(hash.root_uuid(), "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(hash.verity_uuid(), "01234567-89ab-cdef-0123-456789abcdef");
        assert!(cmdline.args.contains(&("quiet".into(), None)));
        assert!(cmdline.args.contains(&("msg".into(), Some("a b".into()))));
        assert!(cmdline
            .args
            .contains(&("console".into(), Some("ttyS0".into()))));
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
            slot: os_config::layout::Slot::A,
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
