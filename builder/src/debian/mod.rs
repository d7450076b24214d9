//! Debian archive access: sources, signed indices, version ordering, dependency resolution, locks.

use anyhow::Result;

use crate::cli::LockArgs;

/// `plinth lock FILE`.
pub fn lock_command(args: &LockArgs) -> Result<()> {
    let _def = crate::build::load_definition(&args.file)?;
    anyhow::bail!("lock is not implemented yet")
}
