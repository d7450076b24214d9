//! The update agent library behind `plinth-update`: release fetching and verification, writing the
//! inactive slot, boot entries and counting (named as `os_config::boot` defines them), rollback
//! detection and the health-gated bless ([`gate`]).
//!
//! How the pieces are called:
//! - `plinth-update` parses its command line with [`command::parse_args`] and runs it with
//!   [`command::run`]; `daemon` repeats check-and-apply in [`daemon::run`]. A command builds an
//!   [`Agent`] from [`Paths`] (the baked definition `/usr/lib/plinth/image.toml`,
//!   `/var/lib/plinth/update.json`, the boot record `/run/plinth/boot.json` that names the
//!   running slot and the boot disk), then calls [`Agent::detect_rollback`], [`Agent::check`], [`Agent::apply`], [`Agent::status`]
//!   or [`Agent::rollback`].
//! - `plinth-init`'s health gate calls [`bless_disk`] with the boot disk (from the boot record,
//!   see [`agent::read_boot_record`]) and the running slot and version, then prints
//!   `PLINTH-STATUS boot-blessed …`.
//! - Tests interrupt [`Agent::apply`] through its hook at any [`apply::Event`].
//! - `plinth-update install` (run by `plinth-init` on a live system with `plinth.install=`)
//!   writes a disk image to a local disk through [`install::install`].
//!
//! Console lines the agent prints: `update-progress stage=…`, `update-delta reused=… fetched=… bytes=… total-bytes=…` (see [`delta`]), `update-staged version=… slot=…`,
//! `update-waiting version=… reason="…"` (a window or FleetLock, see [`strategy`]),
//! `update-refused version=… reason="…"`, `update-rebooting`, `rollback from=… to=…`; and
//! `install-start`, `install-progress`, `install-done`, `install-failed` (see [`install`]).

pub mod agent;
pub mod apply;
pub mod blockdev;
pub mod command;
pub mod daemon;
pub mod delta;
pub mod esp;
pub mod fetch;
pub mod gate;
pub mod install;
pub mod media;
pub mod staging;
pub mod state;
pub mod strategy;
pub mod swarm_lock;
pub mod tls;
pub mod verity;

pub use agent::{bless_disk, Agent, Outcome, Paths, Rollback, Status};
pub use os_config::boot::{BootState, Counter, EntryName};
pub use os_config::layout::Slot;

/// Serializes a [`Slot`] as its letter (`"a"`, `"b"`) in the state file and `--json` output.
pub mod slot_serde {
    use os_config::layout::Slot;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the slot's letter.
    pub fn serialize<S: Serializer>(slot: &Slot, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(slot.as_str())
    }

    /// Reads `a` or `b`.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Slot, D::Error> {
        let text = String::deserialize(deserializer)?;
        Slot::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("slot `{text}`: expected a or b")))
    }
}
