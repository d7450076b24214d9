//! Boot-entry naming and boot counting on the ESP (BLS Type #1 with systemd-boot's `+LEFT-DONE`
//! counter). Kept in this one file so it can follow `os_config`'s boot module when that lands.

use std::fmt;

/// Number of tries a freshly written entry gets.
pub const TRIES: u32 = 3;
/// Folder of the boot entries on the ESP.
pub const ENTRIES_DIR: &str = "loader/entries";

/// One of the two A/B slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    /// Parses `a` or `b`.
    pub fn parse(text: &str) -> Option<Slot> {
        match text {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }

    /// The lowercase letter used in labels, paths and entry names.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// GPT label of this slot's root partition.
    pub fn root_label(self) -> String {
        format!("root-{}", self.as_str())
    }

    /// GPT label of this slot's verity partition.
    pub fn verity_label(self) -> String {
        format!("verity-{}", self.as_str())
    }

    /// ESP path (no leading slash) of this slot's kernel.
    pub fn kernel_path(self) -> String {
        format!("plinth/{}/vmlinuz", self.as_str())
    }

    /// ESP path (no leading slash) of this slot's initrd.
    pub fn initrd_path(self) -> String {
        format!("plinth/{}/initrd", self.as_str())
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The boot-counting state an entry name carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// No counter: a blessed (good) entry.
    Good,
    /// `+LEFT` or `+LEFT-DONE`, with tries left.
    Trying { left: u32, done: u32 },
    /// `+0-DONE`: tries exhausted; systemd-boot sorts it last.
    Bad { done: u32 },
}

/// A parsed entry file name `plinth-<slot>-<version>[+LEFT[-DONE]].conf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryName {
    pub slot: Slot,
    pub version: String,
    pub counter: Counter,
}

impl EntryName {
    /// A new entry with the full number of tries.
    pub fn counted(slot: Slot, version: &str) -> EntryName {
        EntryName {
            slot,
            version: version.to_owned(),
            counter: Counter::Trying {
                left: TRIES,
                done: 0,
            },
        }
    }

    /// Parses a file name in `loader/entries`; `None` for files that are not Plinth entries.
    pub fn parse(file_name: &str) -> Option<EntryName> {
        let stem = file_name.strip_suffix(".conf")?.strip_prefix("plinth-")?;
        let (slot, rest) = stem.split_once('-')?;
        let slot = Slot::parse(slot)?;
        let (version, counter) = match rest.split_once('+') {
            None => (rest, Counter::Good),
            Some((version, count)) => {
                let (left, done) = match count.split_once('-') {
                    Some((l, d)) => (l.parse().ok()?, d.parse().ok()?),
                    None => (count.parse().ok()?, 0),
                };
                let counter = if left == 0 {
                    Counter::Bad { done }
                } else {
                    Counter::Trying { left, done }
                };
                (version, counter)
            }
        };
        let valid_version =
            !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        valid_version.then(|| EntryName {
            slot,
            version: version.to_owned(),
            counter,
        })
    }

    /// The file name, with its counter.
    pub fn file_name(&self) -> String {
        let base = format!("plinth-{}-{}", self.slot, self.version);
        match self.counter {
            Counter::Good => format!("{base}.conf"),
            Counter::Trying { left, done: 0 } => format!("{base}+{left}.conf"),
            Counter::Trying { left, done } => format!("{base}+{left}-{done}.conf"),
            Counter::Bad { done } => format!("{base}+0-{done}.conf"),
        }
    }

    /// The name without a counter, which a blessed entry has.
    pub fn blessed(&self) -> EntryName {
        EntryName {
            counter: Counter::Good,
            ..self.clone()
        }
    }

    /// `good`, `trying N/3` or `bad`, as `status` and `plinth inspect` print it.
    pub fn describe(&self) -> String {
        match self.counter {
            Counter::Good => "good".to_owned(),
            Counter::Trying { left, done } => format!("trying {}/{}", done + 1, left + done),
            Counter::Bad { .. } => "bad".to_owned(),
        }
    }
}

/// The text of a slot's entry.
pub fn entry_text(slot: Slot, version: &str, root_hash: &str, cmdline: &[String]) -> String {
    let mut options =
        format!("plinth.slot={slot} plinth.version={version} plinth.roothash={root_hash}");
    for arg in cmdline {
        options.push(' ');
        options.push_str(arg);
    }
    format!(
        "title Plinth {version} (slot {slot})\nsort-key plinth\nversion {version}\nlinux /{}\ninitrd /{}\noptions {options}\n",
        slot.kernel_path(),
        slot.initrd_path()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_round_trip() {
        let cases = [
            ("plinth-a-1.2.conf", Slot::A, "1.2", Counter::Good, "good"),
            (
                "plinth-b-3+3.conf",
                Slot::B,
                "3",
                Counter::Trying { left: 3, done: 0 },
                "trying 1/3",
            ),
            (
                "plinth-b-3+1-2.conf",
                Slot::B,
                "3",
                Counter::Trying { left: 1, done: 2 },
                "trying 3/3",
            ),
            (
                "plinth-a-2+0-3.conf",
                Slot::A,
                "2",
                Counter::Bad { done: 3 },
                "bad",
            ),
        ];
        for (name, slot, version, counter, describe) in cases {
            let parsed = EntryName::parse(name).expect(name);
            assert_eq!(
                parsed,
                EntryName {
                    slot,
                    version: version.to_owned(),
                    counter
                }
            );
            assert_eq!(parsed.file_name(), name);
            assert_eq!(parsed.describe(), describe);
        }
        for other in [
            "debian.conf",
            "plinth-c-1.conf",
            "plinth-a-.conf",
            "plinth-a-1+x.conf",
            "plinth-a-1.txt",
        ] {
            assert_eq!(EntryName::parse(other), None, "{other}");
        }
        assert_eq!(
            EntryName::counted(Slot::B, "4").file_name(),
            "plinth-b-4+3.conf"
        );
        assert_eq!(
            EntryName::parse("plinth-b-4+2-1.conf")
                .expect("parses")
                .blessed()
                .file_name(),
            "plinth-b-4.conf"
        );
    }

    #[test]
    fn entry_text_names_the_slot_files() {
        let text = entry_text(Slot::B, "2", "ab", &["console=ttyS0".to_owned()]);
        assert!(text.contains("linux /plinth/b/vmlinuz\n"), "{text}");
        assert!(text.contains("initrd /plinth/b/initrd\n"), "{text}");
        assert!(text.contains("sort-key plinth\nversion 2\n"), "{text}");
        assert!(
            text.contains(
                "options plinth.slot=b plinth.version=2 plinth.roothash=ab console=ttyS0\n"
            ),
            "{text}"
        );
    }
}
