//! Boot entries on the ESP: their file names with systemd-boot boot-counting suffixes, their
//! Boot Loader Specification (Type #1) contents, and the `plinth.*` kernel command-line arguments.
//!
//! Every slot's entry shares the sort-key [`SORT_KEY`] and carries the OS version, so systemd-boot
//! picks the newest entry that is good or still trying; an entry that ran out of tries sorts last.
//! A freshly written update entry is `plinth-<slot>-<version>+3.conf`; systemd-boot renames it on
//! each try (`+2-1`, `+1-2`, `+0-3`), and `plinth-init` blesses it by renaming it to
//! `plinth-<slot>-<version>.conf`.

use crate::cmdline::Cmdline;
use crate::layout::Slot;

/// Folder on the ESP holding the boot entries.
pub const ENTRIES_DIR: &str = "/loader/entries";
/// The loader configuration file on the ESP.
pub const LOADER_CONF: &str = "/loader/loader.conf";
/// The boot loader on the ESP (the removable-media path every UEFI firmware tries).
pub const BOOT_LOADER: &str = "/EFI/BOOT/BOOTX64.EFI";
/// The sort-key every Plinth entry carries.
pub const SORT_KEY: &str = "plinth";
/// Tries a new (untested) entry gets.
pub const TRIES: u32 = 3;
/// File-name prefix of Plinth entries.
const PREFIX: &str = "plinth-";

/// Kernel argument naming the booted slot (`a` or `b`).
pub const ARG_SLOT: &str = "plinth.slot";
/// Kernel argument carrying the OS version of the slot.
pub const ARG_VERSION: &str = "plinth.version";
/// Kernel argument carrying the slot's dm-verity root hash (64 hex digits).
pub const ARG_ROOTHASH: &str = "plinth.roothash";
/// Kernel argument that, when `plinth.verity=off`, mounts root without dm-verity (debug images only).
pub const ARG_VERITY: &str = "plinth.verity";

/// The `loader.conf` Plinth writes: boot the default entry at once, keep the firmware's console mode.
pub const LOADER_CONF_TEXT: &str = "timeout 0\nconsole-mode keep\neditor no\n";

/// A boot-counting suffix: `+LEFT` or `+LEFT-DONE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// Tries left.
    pub left: u32,
    /// Tries made so far (absent in a freshly written entry).
    pub done: Option<u32>,
}

/// Whether a slot's entry is known good, still being tried, or has failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootState {
    /// No counter: blessed (or the first image's entry).
    Good,
    /// On trial: try `attempt` (counted from 1) of `of`. For a running boot this is the try in
    /// progress; for an entry seen from outside, the try its next boot makes.
    Trying { attempt: u32, of: u32 },
    /// Every try was made and none was blessed: systemd-boot sorts it last.
    Bad { done: u32 },
}

impl std::fmt::Display for BootState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BootState::Good => f.write_str("good"),
            BootState::Trying { attempt, of } => write!(f, "trying {attempt}/{of}"),
            BootState::Bad { .. } => f.write_str("bad"),
        }
    }
}

/// The parsed file name of a Plinth boot entry: `plinth-<slot>-<version>[+LEFT[-DONE]].conf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryName {
    pub slot: Slot,
    pub version: String,
    pub counter: Option<Counter>,
}

impl EntryName {
    /// A known-good entry (no counter), as the first image writes for slot A.
    pub fn good(slot: Slot, version: &str) -> EntryName {
        EntryName {
            slot,
            version: version.to_owned(),
            counter: None,
        }
    }

    /// A new entry that has [`TRIES`] tries left, as an update writes.
    pub fn trying(slot: Slot, version: &str) -> EntryName {
        EntryName {
            slot,
            version: version.to_owned(),
            counter: Some(Counter {
                left: TRIES,
                done: None,
            }),
        }
    }

    /// The same entry without its counter: what blessing renames it to.
    pub fn blessed(&self) -> EntryName {
        EntryName {
            counter: None,
            ..self.clone()
        }
    }

    /// Parses a file name (no folder). Returns `None` for files that are not Plinth entries.
    pub fn parse(file_name: &str) -> Option<EntryName> {
        let stem = file_name.strip_suffix(".conf")?.strip_prefix(PREFIX)?;
        let (slot, rest) = stem.split_once('-')?;
        let slot = Slot::parse(slot)?;
        let (version, counter) = match rest.split_once('+') {
            None => (rest, None),
            Some((version, counter)) => (version, Some(parse_counter(counter)?)),
        };
        let version_ok = !version.is_empty()
            && version.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            && !version.starts_with('.')
            && !version.ends_with('.');
        version_ok.then(|| EntryName {
            slot,
            version: version.to_owned(),
            counter,
        })
    }

    /// The file name this entry is stored under.
    pub fn file_name(&self) -> String {
        let counter = match self.counter {
            None => String::new(),
            Some(Counter { left, done: None }) => format!("+{left}"),
            Some(Counter {
                left,
                done: Some(done),
            }) => format!("+{left}-{done}"),
        };
        format!("{PREFIX}{}-{}{counter}.conf", self.slot, self.version)
    }

    /// The full path on the ESP (`/loader/entries/<file name>`).
    pub fn esp_path(&self) -> String {
        format!("{ENTRIES_DIR}/{}", self.file_name())
    }

    /// Good, trying or bad, as seen from outside (not the running boot): `Trying` names the try
    /// the entry's next boot makes; with no try left it is `Bad`.
    pub fn state(&self) -> BootState {
        match self.counter {
            None => BootState::Good,
            Some(Counter { left: 0, done }) => BootState::Bad {
                done: done.unwrap_or(0),
            },
            Some(Counter { left, done }) => {
                let done = done.unwrap_or(0);
                BootState::Trying {
                    attempt: done + 1,
                    of: left + done,
                }
            }
        }
    }

    /// The state of the entry the machine is running from. systemd-boot counts a try before it
    /// boots it, so the counter already includes the running try: `+2-1` is try 1 of 3 and
    /// `+0-3` try 3 of 3, still on trial (it is bad only once that try has failed).
    pub fn running_state(&self) -> BootState {
        match self.counter {
            None => BootState::Good,
            Some(Counter { left, done }) => {
                // A counter not counted down (a loader without boot counting) is the first try.
                let done = done.unwrap_or(0);
                let attempt = done.max(1);
                BootState::Trying {
                    attempt,
                    of: (left + done).max(attempt),
                }
            }
        }
    }
}

fn parse_counter(text: &str) -> Option<Counter> {
    let number = |s: &str| -> Option<u32> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match text.split_once('-') {
        None => Some(Counter {
            left: number(text)?,
            done: None,
        }),
        Some((left, done)) => Some(Counter {
            left: number(left)?,
            done: Some(number(done)?),
        }),
    }
}

/// The contents of a BLS Type #1 entry for one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub slot: Slot,
    pub version: String,
    /// dm-verity root hash of the slot's root image (64 hex digits).
    pub root_hash: String,
    /// Kernel arguments besides the `plinth.*` ones this entry sets (the image's own).
    pub extra_args: Vec<String>,
    /// Whether the root is opened through dm-verity (false only in debug images).
    pub verity: bool,
}

impl Entry {
    /// Path of the slot's kernel on the ESP.
    pub fn kernel_path(slot: Slot) -> String {
        format!("{}/vmlinuz", slot.esp_dir())
    }

    /// Path of the slot's initrd on the ESP.
    pub fn initrd_path(slot: Slot) -> String {
        format!("{}/initrd", slot.esp_dir())
    }

    /// The kernel command line: `plinth.slot=`, `plinth.version=`, `plinth.roothash=`
    /// (and `plinth.verity=off` when verity is off), then the image's own arguments.
    pub fn options(&self) -> String {
        let mut args = vec![
            format!("{ARG_SLOT}={}", self.slot),
            crate::cmdline::format_arg(ARG_VERSION, Some(&self.version)),
            crate::cmdline::format_arg(ARG_ROOTHASH, Some(&self.root_hash)),
        ];
        if !self.verity {
            args.push(format!("{ARG_VERITY}=off"));
        }
        args.extend(self.extra_args.iter().cloned());
        args.join(" ")
    }

    /// The entry file's text.
    pub fn format(&self) -> String {
        format!(
            "title Plinth {version} (slot {slot})\nsort-key {SORT_KEY}\nversion {version}\nlinux {linux}\ninitrd {initrd}\noptions {options}\n",
            version = self.version,
            slot = self.slot,
            linux = Entry::kernel_path(self.slot),
            initrd = Entry::initrd_path(self.slot),
            options = self.options(),
        )
    }

    /// Reads an entry file's text back (the slot, version and root hash come from the options line).
    /// Every argument other than the four [`Entry::options`] writes is kept, in order, in
    /// `extra_args`, so that `format` gives back the options it was read from.
    pub fn parse(text: &str) -> Result<Entry, String> {
        let options = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("options"))
            .ok_or("boot entry has no `options` line")?;
        let args = BootArgs::from_cmdline(options);
        let slot = args.slot.ok_or_else(|| {
            format!(
                "boot entry options lack {ARG_SLOT}=a|b: `{}`",
                options.trim()
            )
        })?;
        let split = Cmdline::parse(options);
        // The kernel has no escape for a quote inside an argument, and a key with whitespace
        // (`"a b=c"`) is written back as two arguments: such arguments could not be written back
        // as they were read.
        if let Some((key, value)) = split.args().iter().find(|(key, value)| {
            key.contains(|c: char| c == '"' || c.is_ascii_whitespace() || c == '\x0b')
                || value.as_deref().is_some_and(|v| v.contains('"'))
        }) {
            return Err(format!(
                "boot entry options hold an argument with a quote inside or a space in its key (`{}`): no boot entry has one",
                crate::cmdline::format_arg(key, value.as_deref())
            ));
        }
        let extra_args = split
            .args()
            .iter()
            .filter(|(key, _)| {
                ![ARG_SLOT, ARG_VERSION, ARG_ROOTHASH, ARG_VERITY].contains(&key.as_str())
            })
            .map(|(key, value)| crate::cmdline::format_arg(key, value.as_deref()))
            .collect();
        Ok(Entry {
            slot,
            version: args.version.unwrap_or_default(),
            root_hash: args.root_hash.unwrap_or_default(),
            extra_args,
            verity: args.verity,
        })
    }
}

/// The `plinth.*` arguments of a kernel command line, read leniently: what is absent or not
/// understood is `None` (stage 1 insists on them, see `init::cmdline`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootArgs {
    pub slot: Option<Slot>,
    pub version: Option<String>,
    pub root_hash: Option<String>,
    /// False only when `plinth.verity=off` (or `0`) is given.
    pub verity: bool,
}

impl BootArgs {
    /// Reads the `plinth.*` arguments from a command line (`/proc/cmdline`) split by
    /// [`crate::cmdline::Cmdline`]: the last value of a key wins.
    pub fn from_cmdline(cmdline: &str) -> BootArgs {
        BootArgs::from_args(&Cmdline::parse(cmdline))
    }

    /// Reads the `plinth.*` arguments from a split command line.
    pub fn from_args(args: &Cmdline) -> BootArgs {
        BootArgs {
            slot: args.value(ARG_SLOT).and_then(Slot::parse),
            version: args.value(ARG_VERSION).map(str::to_owned),
            root_hash: args.value(ARG_ROOTHASH).map(str::to_ascii_lowercase),
            verity: !matches!(args.value(ARG_VERITY), Some(v) if verity_off(v)),
        }
    }
}

/// True for the `plinth.verity=` values that turn verity off (`off`, `0`).
pub fn verity_off(value: &str) -> bool {
    matches!(value, "off" | "0")
}

/// Where stage 1 records what it booted, relative to `/run` (a tmpfs stage 1 mounts and moves
/// into the new root, so stage 2 sees it at `/run/plinth/boot.json`).
pub const BOOT_RECORD_IN_RUN: &str = "plinth/boot.json";

/// What stage 1 booted: the disk it found the slot on, the slot and its root hash. Stage 2's
/// bless gate and the update agent read it instead of searching the disks again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BootRecord {
    /// The whole disk holding the slot (`/dev/vda`).
    pub disk: std::path::PathBuf,
    /// The booted slot.
    pub slot: Slot,
    /// The slot's dm-verity root hash (64 lowercase hex digits) from the command line; absent
    /// only when a debugging image gives none (`plinth.verity=off`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_hash: Option<String>,
}

impl BootRecord {
    /// Reads a record's JSON text.
    pub fn parse(text: &str) -> Result<BootRecord, String> {
        let record: BootRecord = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if let Some(hash) = &record.root_hash {
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "root-hash {hash:?} is not 64 hexadecimal digits (SHA-256)"
                ));
            }
        }
        Ok(record)
    }

    /// The record as JSON text (one object and a newline). Fails only for a disk path that is
    /// not UTF-8.
    pub fn to_json(&self) -> Result<String, String> {
        serde_json::to_string(self)
            .map(|text| text + "\n")
            .map_err(|e| format!("writing the boot record of {}: {e}", self.disk.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_round_trip_with_counters() {
        let cases = [
            (
                "plinth-a-1.0.0.conf",
                Slot::A,
                "1.0.0",
                None,
                BootState::Good,
            ),
            (
                "plinth-b-1.2+3.conf",
                Slot::B,
                "1.2",
                Some(Counter {
                    left: 3,
                    done: None,
                }),
                BootState::Trying { attempt: 1, of: 3 },
            ),
            (
                "plinth-b-2+1-2.conf",
                Slot::B,
                "2",
                Some(Counter {
                    left: 1,
                    done: Some(2),
                }),
                BootState::Trying { attempt: 3, of: 3 },
            ),
            (
                "plinth-a-2026.11.3+0-3.conf",
                Slot::A,
                "2026.11.3",
                Some(Counter {
                    left: 0,
                    done: Some(3),
                }),
                BootState::Bad { done: 3 },
            ),
        ];
        for (file, slot, version, counter, state) in cases {
            let name = EntryName::parse(file).expect(file);
            assert_eq!(name.slot, slot, "{file}");
            assert_eq!(name.version, version, "{file}");
            assert_eq!(name.counter, counter, "{file}");
            assert_eq!(name.state(), state, "{file}");
            assert_eq!(name.file_name(), file);
        }
    }

    #[test]
    fn foreign_and_malformed_names_are_rejected() {
        for file in [
            "debian.conf",
            "plinth-c-1.0.conf",
            "plinth-a-1.0",
            "plinth-a-.conf",
            "plinth-a-1.0+.conf",
            "plinth-a-1.0+x.conf",
            "plinth-a-1.0+1-.conf",
            "plinth-a-1.0-rc1.conf",
            "plinth-a-.1.conf",
        ] {
            assert_eq!(EntryName::parse(file), None, "{file}");
        }
    }

    #[test]
    fn new_entries_count_and_blessing_drops_the_counter() {
        let new = EntryName::trying(Slot::B, "1.1");
        assert_eq!(new.file_name(), "plinth-b-1.1+3.conf");
        assert_eq!(new.esp_path(), "/loader/entries/plinth-b-1.1+3.conf");
        let tried = EntryName::parse("plinth-b-1.1+2-1.conf").expect("valid");
        assert_eq!(tried.blessed().file_name(), "plinth-b-1.1.conf");
        assert_eq!(
            EntryName::good(Slot::A, "1.0").file_name(),
            "plinth-a-1.0.conf"
        );
    }

    #[test]
    fn entry_text_carries_slot_version_and_root_hash() {
        let hash = "ab".repeat(32);
        let entry = Entry {
            slot: Slot::A,
            version: "1.0.0".to_owned(),
            root_hash: hash.clone(),
            extra_args: vec!["console=ttyS0".to_owned(), "quiet".to_owned()],
            verity: true,
        };
        let text = entry.format();
        assert_eq!(
            text,
            format!(
                "title Plinth 1.0.0 (slot a)\nsort-key plinth\nversion 1.0.0\nlinux /plinth/a/vmlinuz\n\
                 initrd /plinth/a/initrd\noptions plinth.slot=a plinth.version=1.0.0 plinth.roothash={hash} console=ttyS0 quiet\n"
            )
        );
        assert_eq!(Entry::parse(&text), Ok(entry));
    }

    #[test]
    fn quoted_extra_arguments_survive_an_entry_round_trip() {
        let entry = Entry {
            slot: Slot::B,
            version: "2".to_owned(),
            root_hash: "cd".repeat(32),
            extra_args: vec!["console=ttyS0".to_owned(), "msg=\"a b\"".to_owned()],
            verity: false,
        };
        assert_eq!(Entry::parse(&entry.format()), Ok(entry));
    }

    #[test]
    fn entry_text_round_trips_with_verity_off_and_the_images_plinth_arguments() {
        let entry = Entry {
            slot: Slot::B,
            version: "2".to_owned(),
            root_hash: "cd".repeat(32),
            extra_args: vec!["plinth.debug=1".to_owned(), "quiet".to_owned()],
            verity: false,
        };
        let text = entry.format();
        assert!(
            text.contains(" plinth.verity=off plinth.debug=1 quiet\n"),
            "{text}"
        );
        assert_eq!(Entry::parse(&text), Ok(entry));
    }

    #[test]
    fn command_line_arguments_are_read() {
        let args = BootArgs::from_cmdline(
            "BOOT_IMAGE=x plinth.slot=b plinth.version=2 plinth.roothash=ABCD plinth.verity=off quiet",
        );
        assert_eq!(args.slot, Some(Slot::B));
        assert_eq!(args.version.as_deref(), Some("2"));
        assert_eq!(args.root_hash.as_deref(), Some("abcd"));
        assert!(!args.verity);
        let zero = BootArgs::from_cmdline("plinth.verity=0 plinth.slot=a plinth.slot=b");
        assert!(!zero.verity);
        assert_eq!(zero.slot, Some(Slot::B));
        let none = BootArgs::from_cmdline("console=ttyS0");
        assert_eq!(none.slot, None);
        assert!(none.verity);
        assert!(Entry::parse("title x\n").is_err());
    }

    #[test]
    fn entries_read_back_as_they_format() {
        // A quoted value with spaces is written quoted again.
        let spaced =
            Entry::parse("options plinth.slot=a plinth.version=\"1 2\" plinth.roothash=ab\n")
                .expect("entry");
        assert_eq!(spaced.version, "1 2");
        assert_eq!(Entry::parse(&spaced.format()), Ok(spaced));
        // A quote inside an argument cannot be written back: refused, naming the argument.
        for options in [
            "plinth.slot=a plinth.version=\"1\"2\"",
            "plinth.slot=a x\"y=1",
            "plinth.slot=a msg=\"a\"b c\"",
            "plinth.slot=a \"  key=value\"",
        ] {
            let error = Entry::parse(&format!("options {options}\n")).expect_err(options);
            assert!(error.contains("quote inside"), "{options}: {error}");
        }
    }

    #[test]
    fn boot_states_read_good_trying_n_of_3_or_bad() {
        let state = |name: &str| EntryName::parse(name).expect(name).state().to_string();
        assert_eq!(state("plinth-a-1.2.conf"), "good");
        assert_eq!(state("plinth-b-3+3.conf"), "trying 1/3");
        assert_eq!(state("plinth-b-3+2-1.conf"), "trying 2/3");
        assert_eq!(state("plinth-b-3+1-2.conf"), "trying 3/3");
        assert_eq!(state("plinth-a-2+0-3.conf"), "bad");
        // The running boot's own entry: the try in progress, and never bad while it runs.
        let running = |name: &str| {
            EntryName::parse(name)
                .expect(name)
                .running_state()
                .to_string()
        };
        assert_eq!(running("plinth-a-1.2.conf"), "good");
        assert_eq!(running("plinth-b-3+2-1.conf"), "trying 1/3");
        assert_eq!(running("plinth-b-3+1-2.conf"), "trying 2/3");
        assert_eq!(running("plinth-b-3+0-3.conf"), "trying 3/3");
        assert_eq!(running("plinth-b-3+3.conf"), "trying 1/3");
        for other in [
            "debian.conf",
            "plinth-c-1.conf",
            "plinth-a-.conf",
            "plinth-a-1+x.conf",
        ] {
            assert_eq!(EntryName::parse(other), None, "{other}");
        }
    }

    #[test]
    fn boot_records_round_trip_and_refuse_what_they_do_not_know() {
        let record = BootRecord {
            disk: "/dev/vda".into(),
            slot: Slot::B,
            root_hash: Some("ab".repeat(32)),
        };
        let text = record.to_json().expect("json");
        assert_eq!(
            text,
            format!(
                "{{\"disk\":\"/dev/vda\",\"slot\":\"b\",\"root-hash\":\"{}\"}}\n",
                "ab".repeat(32)
            )
        );
        assert_eq!(BootRecord::parse(&text), Ok(record));
        let no_hash =
            BootRecord::parse(r#"{"disk": "/dev/nvme0n1", "slot": "a"}"#).expect("parses");
        assert_eq!(no_hash.slot, Slot::A);
        assert_eq!(no_hash.root_hash, None);
        assert!(no_hash.to_json().expect("json").find("root-hash").is_none());
        for bad in [
            r#"{"disk": "/dev/vda", "slot": "c"}"#,
            r#"{"disk": "/dev/vda"}"#,
            r#"{"disk": "/dev/vda", "slot": "a", "extra": 1}"#,
            r#"{"disk": "/dev/vda", "slot": "a", "root-hash": "abc"}"#,
            "",
        ] {
            assert!(BootRecord::parse(bad).is_err(), "{bad}");
        }
    }
}
