//! `plinth inspect`: describes a disk image.

use anyhow::Result;

use crate::cli::InspectArgs;

pub fn inspect(_args: &InspectArgs) -> Result<()> {
    anyhow::bail!("inspect is not implemented yet")
}
