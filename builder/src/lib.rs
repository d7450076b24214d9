//! The Plinth image builder: sources, Debian resolver, root tree, disk writers, QEMU runner.

pub mod build;
pub mod cache;
pub mod cli;
pub mod container_image;
pub mod debian;
pub mod disk;
pub mod fetch;
pub mod inspect;
pub mod progress;
pub mod publish;
pub mod pxe;
pub mod qemu;
pub mod rootfs;
pub mod serve;
pub mod size_report;
pub mod tools;
