//! Disk image writers: root image, verity, initramfs, ESP, GPT, output formats.
