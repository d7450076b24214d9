//! Everything that runs on a Plinth machine: `plinth-init` (PID 1, in the initramfs and in the real
//! root) and `plinth-update`, sharing this library.

pub mod status;

pub mod boot;
pub mod cmdline;
pub mod coldplug;
pub mod containers;
pub mod docker;
pub mod grow;
pub mod http;
pub mod kmod;
pub mod mounts;
pub mod net;
pub mod shutdown;
pub mod stability;
pub mod stage1;
pub mod stage2;
pub mod supervise;
pub mod sys;
pub mod system;
pub mod update;
pub mod verity;
pub mod workload;
