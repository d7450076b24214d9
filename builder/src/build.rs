//! The build pipeline: definition → lock → cached packages → root tree → disk image → outputs.

use std::path::Path;

use anyhow::{Context, Result};
use os_config::Definition;

use crate::cli::{BuildArgs, CheckArgs};

/// Reads and validates a definition file.
pub fn load_definition(path: &Path) -> Result<Definition> {
    let source = std::fs::read_to_string(path)
        .with_context(|| format!("reading image definition {}", path.display()))?;
    Ok(Definition::parse(&path.display().to_string(), &source)?)
}

/// `plinth check FILE`.
pub fn check(args: &CheckArgs) -> Result<()> {
    let def = load_definition(&args.file)?;
    println!(
        "{}: ok ({} {}, {} container(s), {} file(s))",
        args.file.display(),
        def.image.name,
        def.image.version,
        def.containers.len(),
        def.files.len()
    );
    Ok(())
}

/// `plinth build FILE`.
pub fn build(args: &BuildArgs) -> Result<()> {
    let _def = load_definition(&args.file)?;
    anyhow::bail!("build is not implemented yet")
}
