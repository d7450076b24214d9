//! Everything that runs on a Plinth machine: `plinth-init` (PID 1, in the initramfs and in the real
//! root) and `plinth-update`, sharing this library.

pub mod status;

// Shared by both stages and the agent.
pub mod boot;
pub mod clock;
pub mod coldplug;
pub mod http;
pub mod kmod;
pub mod memory;
pub mod mounts;
pub mod syscall;
pub mod system;
pub mod udp;

// Stage 1 (initramfs), stage 2 (real root), the update agent.
pub mod stage1;
pub mod stage2;
// Stage 2's instance data from the cloud or hypervisor.
pub mod provision;
pub mod update;
