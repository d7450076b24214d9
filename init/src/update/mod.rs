//! The update agent library behind `plinth-update`: release fetching and verification, writing the
//! inactive slot, boot entries and counting, rollback detection and blessing.

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
