//! The agent's durable state in `/var/lib/plinth/update.json`: newest accepted version, versions
//! marked bad, the update in progress (for resuming). Written atomically.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use os_config::units::Version;
use serde::{Deserialize, Serialize};

use os_config::layout::Slot;

/// How far an update got; each stage is durable (synced) before it is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// The manifest was accepted; nothing written yet.
    Accepted,
    /// The target slot's boot entry is gone: its partitions may now be overwritten.
    EntryRemoved,
    /// The root partition holds the new root image (hash checked while writing).
    RootWritten,
    /// The verity partition holds the new tree.
    VerityWritten,
    /// Both were read back from the medium and the verity root hash matches.
    Verified,
    /// The slot's GPT partition UUIDs carry the new root hash.
    UuidsSet,
    /// The slot's kernel and initrd are on the ESP.
    BootFilesWritten,
    /// The counted boot entry is written: the update is staged.
    EntryWritten,
}

/// An update that has started and not finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InProgress {
    pub version: Version,
    #[serde(with = "super::slot_serde")]
    pub slot: Slot,
    /// sha256 of the manifest bytes: a resumed update continues only the very same release.
    pub manifest_sha256: String,
    pub stage: Stage,
    /// The frame of a partition artifact to continue from (earlier frames are written and synced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
}

/// Where an interrupted partition write continues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Resume {
    /// `root` or `verity`.
    pub artifact: String,
    /// Index of the first frame not yet written.
    pub frame: usize,
}

/// A release written to the inactive slot and waiting for a reboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Staged {
    pub version: Version,
    #[serde(with = "super::slot_serde")]
    pub slot: Slot,
}

/// A release that was refused for what its artifacts hold; it is not downloaded again until the
/// server publishes a different manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Refused {
    /// sha256 of the refused manifest's bytes.
    pub manifest_sha256: String,
    pub version: Version,
    pub reason: String,
}

/// How many refused releases are remembered (the oldest is forgotten first).
pub const REFUSED_KEPT: usize = 16;

/// Everything the agent remembers across boots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct State {
    /// The newest version ever staged; never go back below or to it.
    pub newest_accepted: Option<Version>,
    /// Versions that were rolled back; never retried.
    #[serde(default)]
    pub bad_versions: Vec<Version>,
    pub in_progress: Option<InProgress>,
    pub staged: Option<Staged>,
    /// Releases refused for their artifacts, newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<Refused>,
}

impl State {
    /// The refusal recorded for the manifest with this sha256, if any.
    pub fn refusal(&self, manifest_sha256: &str) -> Option<&Refused> {
        self.refused
            .iter()
            .find(|r| r.manifest_sha256 == manifest_sha256)
    }

    /// Remembers a refused release (keeping the newest [`REFUSED_KEPT`]).
    pub fn remember_refusal(&mut self, refused: Refused) {
        self.refused
            .retain(|r| r.manifest_sha256 != refused.manifest_sha256);
        self.refused.push(refused);
        let excess = self.refused.len().saturating_sub(REFUSED_KEPT);
        self.refused.drain(..excess);
    }

    /// Reads the state; a missing file is the empty state.
    pub fn load(path: &Path) -> Result<State> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing update state {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e).with_context(|| format!("reading update state {}", path.display())),
        }
    }

    /// Writes the state atomically (temporary file, fsync, rename, fsync of the folder).
    pub fn save(&self, path: &Path) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let temp = dir.join(".update.json.tmp");
        let mut bytes = serde_json::to_vec_pretty(self).context("serializing update state")?;
        bytes.push(b'\n');
        let mut file =
            fs::File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", temp.display()))?;
        fs::rename(&temp, path)
            .with_context(|| format!("renaming {} to {}", temp.display(), path.display()))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))
    }

    /// Whether `version` is marked bad.
    pub fn is_bad(&self, version: &Version) -> bool {
        self.bad_versions.iter().any(|b| b.cmp(version).is_eq())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_missing_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lib/plinth/update.json");
        assert_eq!(
            State::load(&path).expect("missing is empty"),
            State::default()
        );
        let state = State {
            newest_accepted: Version::parse("2").ok(),
            bad_versions: vec![Version::parse("3").expect("v")],
            in_progress: Some(InProgress {
                version: Version::parse("4").expect("v"),
                slot: Slot::B,
                manifest_sha256: "00".repeat(32),
                stage: Stage::RootWritten,
                resume: Some(Resume {
                    artifact: "root".to_owned(),
                    frame: 3,
                }),
            }),
            staged: None,
            refused: Vec::new(),
        };
        state.save(&path).expect("save");
        assert_eq!(State::load(&path).expect("load"), state);
        assert!(state.is_bad(&Version::parse("3.0").expect("v")));
        std::fs::write(&path, "{\"newest-accepted\": 1}").expect("write");
        assert!(State::load(&path).is_err());
    }
}
