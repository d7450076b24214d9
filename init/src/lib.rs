//! Everything that runs on a Plinth machine: `plinth-init` (PID 1, in the initramfs and in the real
//! root) and `plinth-update`, sharing this library.

pub mod update;
