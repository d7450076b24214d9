//! The update agent library behind `plinth-update`: release fetching and verification, writing the
//! inactive slot, boot entries and counting, rollback detection and blessing.
//!
//! How the pieces are called:
//! - `plinth-update` builds an [`Agent`] from [`Paths`] (the baked definition
//!   `/usr/lib/plinth/image.toml`, `/var/lib/plinth/update.json`, `/proc/cmdline`, the boot disk),
//!   then calls [`Agent::detect_rollback`], [`Agent::check`], [`Agent::apply`], [`Agent::status`]
//!   or [`Agent::rollback`].
//! - `plinth-init`'s health gate calls [`bless_disk`] with the boot disk (see
//!   [`blockdev::find_boot_disk`]) and the running slot and version, then prints
//!   `PLINTH-STATUS boot-blessed …`.
//! - Tests interrupt [`Agent::apply`] through its hook at any [`apply::Event`].
//!
//! Console lines the agent prints: `update-progress stage=…`, `update-staged version=… slot=…`,
//! `update-refused version=… reason="…"`, `update-rebooting`, `rollback from=… to=…`.

pub mod agent;
pub mod apply;
pub mod blockdev;
pub mod bootentry;
pub mod esp;
pub mod fetch;
pub mod state;
pub mod verity;

pub use agent::{bless_disk, Agent, Outcome, Paths, Rollback, Status};
pub use bootentry::{Counter, EntryName, Slot};
