//! Host tools Plinth relies on where they are the standard implementation of a format, each
//! checked up front so a missing one fails with the package to install.

use std::path::PathBuf;

use anyhow::{bail, Result};

/// A host program and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

pub const MKSQUASHFS: Tool = Tool {
    program: "mksquashfs",
    package: "squashfs-tools",
};
pub const MKFS_EXT4: Tool = Tool {
    program: "mkfs.ext4",
    package: "e2fsprogs",
};
pub const QEMU_IMG: Tool = Tool {
    program: "qemu-img",
    package: "qemu-utils",
};
pub const QEMU_SYSTEM: Tool = Tool {
    program: "qemu-system-x86_64",
    package: "qemu-system-x86",
};
pub const OBJCOPY: Tool = Tool {
    program: "objcopy",
    package: "binutils",
};
/// GNU tar, for the `gce` output's sparse `oldgnu` archive.
pub const TAR: Tool = Tool {
    program: "tar",
    package: "tar",
};
pub const GPGV: Tool = Tool {
    program: "gpgv",
    package: "gpgv",
};

impl Tool {
    /// Finds the program on `PATH` (and the sbin folders, which a non-root `PATH` may lack).
    pub fn find(self) -> Result<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let dirs = std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from));
        for dir in dirs {
            let candidate = dir.join(self.program);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        bail!(
            "`{}` was not found on PATH: install it with `apt-get install {}`",
            self.program,
            self.package
        )
    }
}

/// Checks every tool in `tools`, naming all missing ones at once.
pub fn require(tools: &[Tool]) -> Result<()> {
    let missing: Vec<Tool> = tools
        .iter()
        .copied()
        .filter(|t| t.find().is_err())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let programs: Vec<&str> = missing.iter().map(|t| t.program).collect();
    let mut packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
    packages.dedup();
    bail!(
        "missing host tools: {}; install them with `apt-get install {}`",
        programs.join(", "),
        packages.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_its_package() {
        let tool = Tool {
            program: "plinth-no-such-program",
            package: "plinth-no-such-package",
        };
        let err = require(&[tool]).expect_err("missing tool is reported");
        let text = err.to_string();
        assert!(text.contains("plinth-no-such-program"), "{text}");
        assert!(
            text.contains("apt-get install plinth-no-such-package"),
            "{text}"
        );
    }
}
