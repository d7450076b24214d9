//! Debian archive access: sources, signed indices, version ordering, dependency resolution, locks.

use anyhow::Result;

use crate::cli::LockArgs;

/// `plinth lock FILE`.
pub fn lock_command(args: &LockArgs) -> Result<()> {
    let _def = crate::build::load_definition(&args.file)?;
    anyhow::bail!("lock is not implemented yet")
}

/// A Debian package from the lock, verified and present in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedPackage {
    /// Package name, e.g. `docker.io`.
    pub name: String,
    /// Debian version, e.g. `20.10.24+dfsg1-1+deb12u1`.
    pub version: String,
    /// `amd64` or `all`.
    pub architecture: String,
    /// The verified `.deb` file in the cache.
    pub path: std::path::PathBuf,
}
