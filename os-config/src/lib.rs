//! The contract between the Plinth build host and the running OS: the image definition schema and
//! its validation, the partition layout, boot-entry naming and the update manifest format.
//! No I/O beyond parsing.

pub mod boot;
pub mod definition;
pub mod diagnostic;
pub mod layout;
pub mod manifest;
pub mod units;

pub use definition::Definition;
pub use diagnostic::DefinitionError;
