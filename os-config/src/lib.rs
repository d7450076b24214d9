//! The contract between the Plinth build host and the running OS: the image definition schema and
//! its validation, the partition layout and verity superblock, GPT reading, boot entries and the boot record,
//! the kernel command line, the `PLINTH-STATUS` line, the initramfs module set and the modules an image ships and the update
//! manifest format, the cloud user data laid over a definition at boot, and the FAT folder-entry repair both the builder and the agent apply to the ESP.
//! No I/O beyond parsing, that repair and reading the two files of
//! [`userdata::effective_definition`] (except [`oracle`], the tests' reference tools, for
//! tests only).

pub mod boot;
pub mod chunk;
pub mod cmdline;
pub mod definition;
pub mod diagnostic;
pub mod fat;
pub mod gpt;
pub mod initramfs;
pub mod layout;
pub mod live;
pub mod manifest;
pub mod modules;
#[cfg(any(test, feature = "oracles"))]
pub mod oracle;
pub mod rootfs;
pub mod slice;
pub mod status;
#[cfg(any(test, feature = "test-disks"))]
pub mod test_data;
pub mod units;
pub mod userdata;
pub mod validate;

pub use definition::Definition;
pub use diagnostic::DefinitionError;
