//! The contract between the Plinth build host and the running OS: the image definition schema and
//! its validation, the partition layout and verity superblock, GPT reading, boot entries and the boot record,
//! the kernel command line, the `PLINTH-STATUS` line, the initramfs module set and the update
//! manifest format. No I/O beyond parsing (except [`oracle`], the tests' reference tools, for
//! tests only).

pub mod boot;
pub mod cmdline;
pub mod definition;
pub mod diagnostic;
pub mod gpt;
pub mod initramfs;
pub mod layout;
pub mod manifest;
#[cfg(any(test, feature = "oracles"))]
pub mod oracle;
pub mod rootfs;
pub mod slice;
pub mod status;
pub mod units;
pub mod validate;

pub use definition::Definition;
pub use diagnostic::DefinitionError;
