//! `plinth run`: boots a disk image under QEMU with OVMF.

use anyhow::Result;

use crate::cli::RunArgs;

pub fn run(_args: &RunArgs) -> Result<()> {
    anyhow::bail!("run is not implemented yet")
}
