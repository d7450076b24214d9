//! Disk image writers: root image, verity, initramfs, ESP, GPT, output formats.

pub mod esp;
pub mod gpt;
pub mod initramfs;
pub mod slice;
pub mod verity;
