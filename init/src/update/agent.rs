//! The update agent: configuration from the baked image definition, status, check, apply,
//! rollback detection and manual rollback. The CLI (`plinth-update`) and the QEMU tests call this.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use os_config::definition::UpdateStrategy;
use os_config::manifest::{self, Manifest, PublicKey, Refusal, Running};
use os_config::units::{Name, Version};
use os_config::Definition;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::apply::{self, ApplyError, Event, Job};
use super::blockdev::Disk;
use super::delta;
use super::esp::{self, Blessed, Esp};
use super::fetch::{self, Client, FetchError, Source};
use super::staging::Staging;
use super::state::{InProgress, Refused, Staged, State};
use super::tls::Trust;
use os_config::boot::{BootRecord, BootState, Counter, EntryName, BOOT_RECORD_IN_RUN};
use os_config::layout::Slot;

/// Every system path the agent touches, overridable for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// The image definition baked into the root.
    pub definition: PathBuf,
    /// The agent's state file.
    pub state: PathBuf,
    /// The kernel command line: the bless gate reads whether the machine booted from a slot.
    pub cmdline: PathBuf,
    /// What stage 1 booted (disk, slot, root hash): [`os_config::boot::BootRecord`].
    pub boot_record: PathBuf,
    /// The machine id, which seeds the machine's moment in a staged rollout.
    pub machine_id: PathBuf,
    /// The boot disk; the boot record's when not given.
    pub disk: Option<PathBuf>,
    /// Present while the running boot has settled (`plinth-init` writes it): updates act only then.
    pub settled: PathBuf,
    /// The image's CA bundle, used for `https://` servers when present.
    pub ca_bundle: PathBuf,
    /// The image's update CA (`[update] ca`), used besides the bundle when the definition sets it.
    pub update_ca: PathBuf,
    /// The instance's user data, which plinth-init keeps when it is Plinth's and valid: its
    /// `[update]` settings apply over the definition's.
    pub user_data: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            definition: PathBuf::from("/usr/lib/plinth/image.toml"),
            state: PathBuf::from("/var/lib/plinth/update.json"),
            cmdline: PathBuf::from("/proc/cmdline"),
            boot_record: Path::new("/run").join(BOOT_RECORD_IN_RUN),
            machine_id: PathBuf::from("/etc/machine-id"),
            disk: None,
            settled: PathBuf::from(crate::stage2::workload::SETTLED_MARKER),
            ca_bundle: PathBuf::from(super::tls::SYSTEM_CA_BUNDLE),
            update_ca: PathBuf::from(os_config::definition::UPDATE_CA_IN_IMAGE),
            user_data: Path::new("/run").join(os_config::userdata::USER_DATA_IN_RUN),
        }
    }
}

/// The agent of one running machine.
#[derive(Debug)]
pub struct Agent {
    pub definition: Definition,
    pub keys: Vec<PublicKey>,
    /// The configured release folder (`[update] url`).
    pub source: Source,
    /// How the agent talks to servers (TLS trust, pace), for the release and FleetLock servers.
    pub client: Client,
    pub channel: Name,
    pub strategy: UpdateStrategy,
    pub interval: std::time::Duration,
    pub running_slot: Slot,
    pub running_version: Version,
    pub disk: PathBuf,
    pub paths: Paths,
    /// Reconnections allowed per artifact download.
    pub retries: u32,
    /// The current time in seconds since the Unix epoch (tests move it).
    pub clock: fn() -> u64,
}

fn system_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The outcome of one check or apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Outcome {
    /// No release is published on the channel.
    NoRelease,
    /// The published release is the running one.
    UpToDate { version: String },
    /// The published release is already written to the other slot, waiting for a reboot.
    AlreadyStaged {
        version: String,
        #[serde(with = "super::slot_serde")]
        slot: Slot,
    },
    /// The running boot is still on trial (its entry carries a counter): the other slot is its
    /// fallback and is not touched until the boot is blessed.
    WaitingForBless {
        #[serde(with = "super::slot_serde")]
        slot: Slot,
        version: String,
    },
    /// The running boot has not settled yet (its bless is pending or its containers are being
    /// reconciled): nothing is fetched or written until it has.
    NotSettled,
    /// A newer release exists, but this machine's moment in its staged rollout is still to come.
    Deferred { version: String, until: String },
    /// A newer release exists (`check` only).
    Available { version: String },
    /// The release was refused; `reason` says why. The other slot's entry was not written.
    Refused {
        version: Option<String>,
        reason: String,
    },
    /// The release was written to `slot`; its counted entry is on the ESP.
    Staged {
        version: String,
        #[serde(with = "super::slot_serde")]
        slot: Slot,
    },
}

/// A slot as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotStatus {
    #[serde(with = "super::slot_serde")]
    pub slot: Slot,
    pub version: Option<String>,
    /// `good`, `trying N/3`, `bad` or `empty`.
    pub boot: String,
    pub running: bool,
}

/// What `plinth-update status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub image: String,
    pub channel: String,
    #[serde(with = "super::slot_serde")]
    pub running_slot: Slot,
    pub running_version: String,
    pub slots: Vec<SlotStatus>,
    pub newest_accepted: Option<String>,
    pub bad_versions: Vec<String>,
    pub in_progress: Option<InProgress>,
    pub staged: Option<Staged>,
    /// Releases refused for their content, with the reason; not downloaded again.
    pub refused: Vec<Refused>,
}

/// A rollback found at startup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rollback {
    pub from: String,
    pub to: String,
}

/// Reads the record of what stage 1 booted; a missing record is an error that names the file.
pub fn read_boot_record(path: &Path) -> Result<BootRecord> {
    let text = match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "the boot record {} is missing: plinth-init's stage 1 writes it with the disk and slot it booted (was this machine booted through Plinth's initramfs?)",
            path.display()
        ),
        result => result.with_context(|| format!("reading the boot record {}", path.display()))?,
    };
    BootRecord::parse(&text)
        .map_err(|e| anyhow::anyhow!("reading the boot record {}: {e}", path.display()))
}

impl Agent {
    /// Reads the definition and the boot record (the running slot and the boot disk).
    pub fn load(paths: Paths) -> Result<Agent> {
        let definition =
            os_config::userdata::effective_definition(&paths.definition, &paths.user_data)?;
        let Some(update) = definition.update.clone() else {
            bail!(
                "{} has no [update] table: this image does not take updates",
                paths.definition.display()
            );
        };
        let keys = update
            .keys
            .iter()
            .map(|k| PublicKey::parse(k))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("reading [update] keys of {}", paths.definition.display()))?;
        let record = read_boot_record(&paths.boot_record)?;
        let running_slot = record.slot;
        let disk = paths.disk.clone().unwrap_or(record.disk);
        let trust = Trust {
            bundle: paths.ca_bundle.clone(),
            update_ca: update.ca.as_ref().map(|_| paths.update_ca.clone()),
        };
        let client = Client::new(Some(trust), fetch::PACE);
        Ok(Agent {
            keys,
            source: Source::parse_with(&update.url, client.clone())?,
            client,
            channel: update.channel.clone(),
            strategy: update.strategy,
            interval: update.interval.0,
            running_slot,
            running_version: definition.image.version.clone(),
            definition,
            disk,
            paths,
            retries: 5,
            clock: system_clock,
        })
    }

    /// Holds an exclusive lock beside the state file for as long as the returned file lives, so
    /// the daemon and a manual `apply` never write the same slot at once.
    fn lock(&self) -> Result<std::fs::File> {
        let path = self.paths.state.with_file_name("update.lock");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .with_context(|| {
                format!(
                    "another plinth-update is updating this machine (lock {} is held)",
                    path.display()
                )
            })?;
        Ok(file)
    }

    fn load_state(&self) -> Result<State> {
        let mut state = State::load(&self.paths.state)?;
        // A staged version that now runs (or is older) is no longer pending. Only changed in
        // memory: the state file is written under the lock, by whoever changes it next.
        if state
            .staged
            .as_ref()
            .is_some_and(|s| s.version <= self.running_version)
        {
            state.staged = None;
        }
        Ok(state)
    }

    /// Slots, versions, boot states and the agent's state.
    pub fn status(&self) -> Result<Status> {
        let state = self.load_state()?;
        let mut disk = Disk::open(&self.disk)?;
        let entries = read_entries(&mut disk)?;
        let slots = [Slot::A, Slot::B]
            .into_iter()
            .map(|slot| {
                let entry = entries.iter().find(|e| e.slot == slot);
                let running = slot == self.running_slot;
                let state = |e: &EntryName| {
                    if running && e.version == self.running_version.as_str() {
                        e.running_state()
                    } else {
                        e.state()
                    }
                };
                SlotStatus {
                    slot,
                    version: entry.map(|e| e.version.clone()),
                    boot: entry.map_or("empty".to_owned(), |e| state(e).to_string()),
                    running,
                }
            })
            .collect();
        Ok(Status {
            image: self.definition.image.name.to_string(),
            channel: self.channel.to_string(),
            running_slot: self.running_slot,
            running_version: self.running_version.to_string(),
            slots,
            newest_accepted: state.newest_accepted.as_ref().map(ToString::to_string),
            bad_versions: state.bad_versions.iter().map(ToString::to_string).collect(),
            in_progress: state.in_progress,
            staged: state.staged,
            refused: state.refused,
        })
    }

    /// At startup: when the running slot's entry is good and the other slot's entry ran out of
    /// tries, that version failed: record it as bad (once) and report the rollback.
    pub fn detect_rollback(&self) -> Result<Option<Rollback>> {
        let mut disk = Disk::open(&self.disk)?;
        let entries = read_entries(&mut disk)?;
        let running_good = entries
            .iter()
            .any(|e| e.slot == self.running_slot && e.counter.is_none());
        let bad = entries.iter().find(|e| {
            e.slot == self.running_slot.other() && matches!(e.state(), BootState::Bad { .. })
        });
        let (true, Some(bad)) = (running_good, bad) else {
            return Ok(None);
        };
        // Another agent holding the lock (the daemon) runs this detection itself.
        let Ok(_lock) = self.lock() else {
            return Ok(None);
        };
        let version = Version::parse(&bad.version).map_err(anyhow::Error::msg)?;
        let mut state = self.load_state()?;
        if state.is_bad(&version) {
            return Ok(None);
        }
        state.bad_versions.push(version.clone());
        if state
            .staged
            .as_ref()
            .is_some_and(|s| s.version.cmp(&version).is_eq())
        {
            state.staged = None;
        }
        if state
            .in_progress
            .as_ref()
            .is_some_and(|p| p.version.cmp(&version).is_eq())
        {
            state.in_progress = None;
        }
        state.save(&self.paths.state)?;
        Ok(Some(Rollback {
            from: version.to_string(),
            to: self.running_version.to_string(),
        }))
    }

    /// Fetches and verifies the channel manifest of `source`; `configured` when that is the
    /// configured URL (which honours the staged rollout and the refusals remembered). Returns the
    /// manifest and the sha256 of its bytes, or the outcome that ends the check.
    fn fetch(
        &self,
        source: &Source,
        state: &State,
        configured: bool,
    ) -> Result<Result<(Manifest, String), Outcome>> {
        let path = format!("{}/{}", self.channel, manifest::MANIFEST_FILE);
        let sig_path = format!("{}/{}", self.channel, manifest::SIGNATURE_FILE);
        let bytes = match source.get(&path) {
            Ok(bytes) => bytes,
            Err(FetchError::NotFound(_)) => return Ok(Err(Outcome::NoRelease)),
            // Not the configured server (or not set up to be checked): nothing it says is read.
            Err(FetchError::Untrusted(reason)) => {
                return Ok(Err(Outcome::Refused {
                    version: None,
                    reason,
                }))
            }
            Err(e) => return Err(e).context("fetching the release manifest"),
        };
        let signature = match source.get(&sig_path) {
            Ok(sig) => sig,
            Err(FetchError::NotFound(what)) => {
                return Ok(Err(Outcome::Refused {
                    version: None,
                    reason: format!("the manifest has no signature ({what})"),
                }))
            }
            Err(e) => return Err(e).context("fetching the manifest signature"),
        };
        let manifest = match manifest::verify_signed(&bytes, &signature, &self.keys) {
            Ok(m) => m,
            Err(e) => {
                return Ok(Err(Outcome::Refused {
                    version: None,
                    reason: format!("{}: {e}", source.describe(&path)),
                }))
            }
        };
        // A manifest past its expiry (or made too far ahead of this clock) is refused before
        // anything else is looked at or downloaded; it is not remembered: a renewed one is
        // taken at the next check.
        if let Err(refusal) = manifest::current(&manifest, (self.clock)()) {
            return Ok(Err(Outcome::Refused {
                version: Some(manifest.version.to_string()),
                reason: format!("{}: {refusal}", source.describe(&path)),
            }));
        }
        let running = Running {
            name: &self.definition.image.name,
            channel: &self.channel,
            version: &self.running_version,
        };
        let version = manifest.version.to_string();
        match manifest::acceptable(
            &manifest,
            &running,
            state.newest_accepted.as_ref(),
            &state.bad_versions,
        ) {
            Ok(()) => {}
            Err(Refusal::NotNewer { candidate, running }) if candidate.cmp(&running).is_eq() => {
                return Ok(Err(Outcome::UpToDate { version }))
            }
            Err(Refusal::NotNewerThanAccepted { .. })
                if state
                    .staged
                    .as_ref()
                    .is_some_and(|s| s.version.cmp(&manifest.version).is_eq()) =>
            {
                let slot = state
                    .staged
                    .as_ref()
                    .map_or(self.running_slot.other(), |s| s.slot);
                return Ok(Err(Outcome::AlreadyStaged { version, slot }));
            }
            Err(refusal) => {
                return Ok(Err(Outcome::Refused {
                    version: Some(version),
                    reason: refusal.to_string(),
                }))
            }
        }
        if let (Some(rollout), true) = (manifest.rollout, configured) {
            let machine_id = match std::fs::read_to_string(&self.paths.machine_id) {
                Ok(id) => id,
                // Without a machine id every machine gets the same moment; still deterministic.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("reading {}", self.paths.machine_id.display()))
                }
            };
            let due = rollout.due(&machine_id, &manifest.version);
            if (self.clock)() < due {
                return Ok(Err(Outcome::Deferred {
                    version,
                    until: manifest::rfc3339(due),
                }));
            }
        }
        let digest = hex::encode(Sha256::digest(&bytes));
        // A release refused from the configured server is not fetched again; one given with
        // `--from` (say, a fresh copy on another medium) is the operator's choice and is checked.
        if let Some(refused) = state.refusal(&digest).filter(|_| configured) {
            return Ok(Err(Outcome::Refused {
                version: Some(version),
                reason: format!(
                    "{} (refused before; waiting for a different manifest)",
                    refused.reason
                ),
            }));
        }
        Ok(Ok((manifest, digest)))
    }

    /// Looks for a release without writing anything. A release given with `from` (an operator's
    /// explicit choice) ignores the staged rollout.
    pub fn check(&self, from: Option<&Source>) -> Result<Outcome> {
        let state = self.load_state()?;
        Ok(
            match self.fetch(from.unwrap_or(&self.source), &state, from.is_none())? {
                Ok((manifest, _)) => Outcome::Available {
                    version: manifest.version.to_string(),
                },
                Err(outcome) => outcome,
            },
        )
    }

    /// Checks and, when a release is acceptable, writes it to the inactive slot. `hook` sees
    /// every stage and write (tests interrupt the update through it).
    pub fn apply(
        &self,
        from: Option<&Source>,
        hook: &mut dyn FnMut(&Event) -> Result<()>,
    ) -> Result<Outcome> {
        let source = from.unwrap_or(&self.source);
        if !self.settled() {
            return Ok(Outcome::NotSettled);
        }
        let _lock = self.lock()?;
        let mut disk = Disk::open(&self.disk)?;
        let on_trial = read_entries(&mut disk)?.into_iter().any(|e| {
            e.slot == self.running_slot
                && e.version == self.running_version.as_str()
                && e.counter.is_some()
        });
        if on_trial {
            return Ok(Outcome::WaitingForBless {
                slot: self.running_slot,
                version: self.running_version.to_string(),
            });
        }
        let mut state = self.load_state()?;
        let (manifest, digest) = match self.fetch(source, &state, from.is_none())? {
            Ok(found) => found,
            Err(outcome) => return Ok(outcome),
        };
        let slot = self.running_slot.other();
        let remember = from.is_none();
        if let Some(reason) = fits_slot(&mut disk, &manifest, slot)? {
            return self.refuse(&mut state, &manifest, &digest, reason, remember);
        }
        // A delta update writes the root image from chunks (see `delta.rs`); the rest is staged.
        // Offline media (`--from`) carry the whole artifacts and save no network: full path.
        let planned = match from {
            None => self.plan_delta(source, &manifest, &digest, &state, &mut disk, slot, hook),
            Some(_) => Ok(None),
        };
        let delta = match planned {
            Ok(delta) => delta,
            Err(ApplyError::Rejected(reason)) => {
                return self.refuse(&mut state, &manifest, &digest, reason, remember)
            }
            Err(ApplyError::Failed(e)) => {
                return Err(e.context(format!(
                    "preparing the delta update to {} {}",
                    manifest.name, manifest.version
                )))
            }
        };
        let mut delta = delta;
        if let Some(Some(d)) = delta.as_mut() {
            match d.stage_chunks(source, &self.staging_dir(), self.retries) {
                Ok(()) => {}
                Err(ApplyError::Rejected(reason)) => {
                    return self.refuse(&mut state, &manifest, &digest, reason, remember)
                }
                Err(ApplyError::Failed(e)) => {
                    return Err(e.context(format!(
                        "downloading the chunks of {} {}",
                        manifest.name, manifest.version
                    )))
                }
            }
        }
        // Boot files the ESP already holds (an update that keeps the kernel) are not downloaded.
        let held = apply::boot_files_on_esp(&mut disk, &manifest, slot)
            .map_err(|e| e.context("reading the boot files on the ESP"))?;
        hook(&Event::HeldOnEsp(held.iter().map(|h| h.name).collect()))?;
        let mut skip: Vec<&str> = held.iter().map(|h| h.name).collect();
        if delta.is_some() {
            skip.push("root");
        }
        let skip = skip.as_slice();
        // Everything is downloaded and checked on /var (or, from a folder on this machine,
        // checked where it lies) before the first byte of the slot, its entry or the ESP changes.
        let staging = Staging::new(self.staging_dir());
        let staged = match source {
            Source::Dir(dir) => Staging::check_in_place(dir, &manifest, skip, hook),
            Source::Http { .. } => {
                staging.stage_except(source, &manifest, self.retries, skip, hook)
            }
        };
        match staged {
            Ok(()) => hook(&Event::Downloaded)?,
            Err(ApplyError::Rejected(reason)) => {
                return self.refuse(&mut state, &manifest, &digest, reason, remember)
            }
            Err(ApplyError::Failed(e)) => {
                return Err(e.context(format!(
                    "downloading {} {}",
                    manifest.name, manifest.version
                )))
            }
        }
        if let Some(Some(delta)) = &delta {
            let job = Job {
                source,
                manifest: &manifest,
                manifest_sha256: &digest,
                slot,
                retries: self.retries,
                held: &held,
            };
            match delta.write_root(&job, &mut disk, &mut state, &self.paths.state, hook) {
                Ok(report) => hook(&Event::Delta(report))?,
                Err(ApplyError::Rejected(reason)) => {
                    state.in_progress = None;
                    return self.refuse(&mut state, &manifest, &digest, reason, remember);
                }
                Err(ApplyError::Failed(e)) => {
                    return Err(e.context(format!(
                        "writing the root image of {} {} to slot {slot} from chunks",
                        manifest.name, manifest.version
                    )))
                }
            }
        }
        let staged = match source {
            Source::Dir(_) => source.clone(),
            Source::Http { .. } => staging.source(),
        };
        let job = Job {
            source: &staged,
            manifest: &manifest,
            manifest_sha256: &digest,
            slot,
            retries: self.retries,
            held: &held,
        };
        match apply::apply(&job, &mut disk, &mut state, &self.paths.state, hook) {
            Ok(()) => {
                staging.clear()?;
                Ok(Outcome::Staged {
                    version: manifest.version.to_string(),
                    slot,
                })
            }
            Err(ApplyError::Rejected(reason)) => {
                state.in_progress = None;
                self.refuse(&mut state, &manifest, &digest, reason, remember)
            }
            Err(ApplyError::Failed(e)) => Err(e.context(format!(
                "applying {} {} to slot {slot}",
                manifest.name, manifest.version
            ))),
        }
    }

    /// Whether the root image is written by a delta update: `None` for the full artifacts,
    /// `Some(None)` when an interrupted update already wrote it, `Some(Some(delta))` to write it.
    #[allow(clippy::too_many_arguments)]
    fn plan_delta(
        &self,
        source: &Source,
        manifest: &Manifest,
        digest: &str,
        state: &State,
        disk: &mut Disk,
        slot: Slot,
        hook: &mut dyn FnMut(&Event) -> Result<()>,
    ) -> Result<Option<Option<delta::Delta>>, ApplyError> {
        if manifest.root_chunks.is_none() {
            return Ok(None);
        }
        let root_written = state.in_progress.as_ref().is_some_and(|p| {
            p.version == manifest.version
                && p.slot == slot
                && p.manifest_sha256 == digest
                && p.stage >= super::state::Stage::RootWritten
        });
        if root_written {
            return Ok(Some(None));
        }
        match delta::prepare(source, manifest, disk, self.running_slot, self.retries)? {
            delta::Plan::Delta(delta) => Ok(Some(Some(*delta))),
            delta::Plan::Full { reason } => {
                eprintln!(
                    "plinth-update: no delta update ({reason}): downloading the whole root image"
                );
                hook(&Event::DeltaFallback { reason })?;
                Ok(None)
            }
        }
    }

    /// Where releases are staged before they are written: beside the state file.
    pub fn staging_dir(&self) -> PathBuf {
        self.paths.state.with_file_name("staging")
    }

    /// Records a release refused for its content when it came from the configured server (so it
    /// is not downloaded again), drops what was staged of it, and returns the outcome.
    fn refuse(
        &self,
        state: &mut State,
        manifest: &Manifest,
        digest: &str,
        reason: String,
        remember: bool,
    ) -> Result<Outcome> {
        if remember {
            state.remember_refusal(Refused {
                manifest_sha256: digest.to_owned(),
                version: manifest.version.clone(),
                reason: reason.clone(),
            });
        }
        state.save(&self.paths.state)?;
        Staging::new(self.staging_dir()).clear()?;
        Ok(Outcome::Refused {
            version: Some(manifest.version.to_string()),
            reason,
        })
    }

    /// Makes the other slot boot next by marking the running entry as out of tries; the running
    /// version is then recorded as bad after the reboot.
    pub fn rollback(&self) -> Result<Rollback> {
        let _lock = self.lock()?;
        let mut disk = Disk::open(&self.disk)?;
        let esp_part = disk.partition("esp")?;
        let rollback = {
            let esp = Esp::open(disk.region(&esp_part).context("opening the ESP")?)?;
            let entries = esp.entries()?;
            let Some(other) = entries.iter().find(|e| {
                e.slot == self.running_slot.other() && !matches!(e.state(), BootState::Bad { .. })
            }) else {
                bail!(
                    "slot {} has no bootable entry: there is nothing to roll back to",
                    self.running_slot.other()
                );
            };
            let Some(current) = entries.iter().find(|e| {
                e.slot == self.running_slot && e.version == self.running_version.as_str()
            }) else {
                bail!(
                    "the ESP has no entry for the running slot {}",
                    self.running_slot
                );
            };
            let exhausted = EntryName {
                counter: Some(Counter {
                    left: 0,
                    done: Some(0),
                }),
                ..current.clone()
            };
            esp.rename_entry(current, &exhausted)?;
            let rollback = Rollback {
                from: self.running_version.to_string(),
                to: other.version.clone(),
            };
            esp.close()?;
            rollback
        };
        disk.sync()?;
        Ok(rollback)
    }

    /// Whether the running boot has settled: blessed or good, containers reconciled, no
    /// reconciliation under way (see [`crate::stage2::workload::SETTLED_MARKER`]).
    pub fn settled(&self) -> bool {
        self.paths.settled.exists()
    }

    /// Blesses the running boot (see [`bless_disk`]).
    pub fn bless(&self) -> Result<Blessed> {
        bless_disk(&self.disk, self.running_slot, self.running_version.as_str())
    }
}

/// Why the release cannot go into `slot` of `disk` (a partition too small for its artifact),
/// checked before anything is downloaded or written.
fn fits_slot(disk: &mut Disk, manifest: &Manifest, slot: Slot) -> Result<Option<String>> {
    for (name, artifact, label) in [
        ("root", &manifest.artifacts.root, slot.root_label()),
        ("verity", &manifest.artifacts.verity, slot.verity_label()),
    ] {
        let part = disk.partition(label)?;
        if artifact.uncompressed_size > part.size {
            return Ok(Some(format!(
                "artifact {name}: {} bytes do not fit partition {} ({} bytes)",
                artifact.uncompressed_size, part.label, part.size
            )));
        }
    }
    Ok(None)
}

/// Marks the running boot good on `disk` and syncs: renames the counted entry of `slot` and
/// `version` to its plain name. Called by `plinth-init`'s health gate.
pub fn bless_disk(disk: &Path, slot: Slot, version: &str) -> Result<Blessed> {
    let mut disk = Disk::open(disk)?;
    let esp_part = disk.partition("esp")?;
    let esp = Esp::open(disk.region(&esp_part).context("opening the ESP")?)?;
    let blessed = esp::bless(&esp, slot, version)?;
    esp.close()?;
    disk.sync()?;
    Ok(blessed)
}

/// The Plinth boot entries on the ESP of `disk`.
pub fn read_disk_entries(disk: &Path) -> Result<Vec<EntryName>> {
    read_entries(&mut Disk::open(disk)?)
}

fn read_entries(disk: &mut Disk) -> Result<Vec<EntryName>> {
    let esp_part = disk.partition("esp")?;
    let esp = Esp::open(disk.region(&esp_part).context("opening the ESP")?)?;
    let entries = esp.entries()?;
    esp.close()?;
    Ok(entries)
}

/// A `PLINTH-STATUS` line for an outcome, or `None` when nothing is worth reporting.
pub fn status_line(outcome: &Outcome) -> Option<String> {
    match outcome {
        Outcome::Staged { version, slot } => Some(os_config::status::format(
            "update-staged",
            &[("version", version), ("slot", slot.as_str())],
        )),
        Outcome::Refused { version, reason } => Some(os_config::status::format(
            "update-refused",
            &[
                ("version", version.as_deref().unwrap_or("?")),
                ("reason", reason),
            ],
        )),
        _ => None,
    }
}
