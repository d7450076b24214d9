//! ELF dynamic dependencies: the interpreter, `DT_NEEDED` libraries and their search path, and
//! finding those libraries inside a tree as the dynamic loader would without `ld.so.cache`.

use std::path::Path;

use anyhow::{Context, Result};

use super::paths::{self, Resolved};

/// Directories the loader searches after `RPATH`/`RUNPATH` on Debian x86-64 (merged-/usr trees
/// reach the same files through the top-level symlinks).
pub const DEFAULT_LIB_DIRS: [&str; 6] = [
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib64",
    "usr/lib64",
    "lib",
    "usr/lib",
];

/// What a dynamically linked ELF object needs at load time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ElfDeps {
    /// `PT_INTERP`: the dynamic loader, an absolute path.
    pub interpreter: Option<String>,
    /// `DT_NEEDED` sonames, in order.
    pub needed: Vec<String>,
    /// `DT_RPATH` entries (only used when there is no `DT_RUNPATH`).
    pub rpath: Vec<String>,
    /// `DT_RUNPATH` entries.
    pub runpath: Vec<String>,
}

/// Reads the load-time dependencies of an ELF executable or shared object. Returns `None` for
/// anything else (not ELF, or a relocatable object such as a kernel module).
pub fn read_deps(bytes: &[u8]) -> Result<Option<ElfDeps>> {
    use goblin::elf::header::{ET_DYN, ET_EXEC};
    if !bytes.starts_with(b"\x7fELF") {
        return Ok(None);
    }
    // The header alone tells relocatable objects (kernel modules) apart, before a full parse.
    let header = goblin::elf::Elf::parse_header(bytes).context("parsing ELF header")?;
    if header.e_type != ET_EXEC && header.e_type != ET_DYN {
        return Ok(None);
    }
    let elf = goblin::elf::Elf::parse(bytes).context("parsing ELF")?;
    if elf.header.e_type != ET_EXEC && elf.header.e_type != ET_DYN {
        return Ok(None);
    }
    let split = |list: &[&str]| -> Vec<String> {
        list.iter()
            .flat_map(|l| l.split(':'))
            .filter(|d| !d.is_empty())
            .map(str::to_owned)
            .collect()
    };
    Ok(Some(ElfDeps {
        interpreter: elf.interpreter.map(str::to_owned),
        needed: elf.libraries.iter().map(|l| (*l).to_owned()).collect(),
        rpath: split(&elf.rpaths),
        runpath: split(&elf.runpaths),
    }))
}

/// [`read_deps`] of a file, reading it whole only when its header says it is an executable or
/// a shared object.
pub fn read_file_deps(path: &Path) -> Result<Option<ElfDeps>> {
    use goblin::elf::header::{ET_DYN, ET_EXEC};
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut head = Vec::with_capacity(64);
    (&mut file)
        .take(64)
        .read_to_end(&mut head)
        .with_context(|| format!("reading {}", path.display()))?;
    if !head.starts_with(b"\x7fELF") || head.len() < 64 {
        return Ok(None);
    }
    let header = goblin::elf::Elf::parse_header(&head)
        .with_context(|| format!("parsing ELF header of {}", path.display()))?;
    if header.e_type != ET_EXEC && header.e_type != ET_DYN {
        return Ok(None);
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    read_deps(&bytes).with_context(|| format!("reading ELF {}", path.display()))
}

/// The directories searched for a library of `deps`, relative to the tree root. `origin` is the
/// directory (relative to the root) of the object itself, for `$ORIGIN`.
pub fn search_dirs(deps: &ElfDeps, origin: &str) -> Vec<String> {
    let expand = |dir: &String| -> String {
        let dir = dir
            .replace("${ORIGIN}", &format!("/{origin}"))
            .replace("$ORIGIN", &format!("/{origin}"));
        dir.trim_start_matches('/').to_owned()
    };
    let mut dirs: Vec<String> = Vec::new();
    if deps.runpath.is_empty() {
        dirs.extend(deps.rpath.iter().map(expand));
    }
    dirs.extend(deps.runpath.iter().map(expand));
    dirs.extend(DEFAULT_LIB_DIRS.iter().map(|d| (*d).to_owned()));
    dirs
}

/// Finds library `soname` in `root` along `dirs`, following symlinks inside the tree.
pub fn find_library(root: &Path, soname: &str, dirs: &[String]) -> Result<Option<Resolved>> {
    if soname.contains('/') {
        let found = paths::resolve(root, soname, true)?;
        return Ok(found.exists.then_some(found));
    }
    for dir in dirs {
        let found = paths::resolve(root, &format!("{dir}/{soname}"), true)?;
        if found.exists
            && std::fs::metadata(root.join(&found.path))
                .with_context(|| format!("reading {}", found.path))?
                .is_file()
        {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_host_executable() {
        let bytes = std::fs::read("/usr/bin/ls").expect("host /usr/bin/ls");
        let deps = read_deps(&bytes).expect("parse").expect("ELF executable");
        assert_eq!(
            deps.interpreter.as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert!(deps.needed.contains(&"libc.so.6".to_owned()), "{deps:?}");
        assert_eq!(read_deps(b"#!/bin/sh\n").expect("script"), None);
    }

    #[test]
    fn search_order_and_origin() {
        let deps = ElfDeps {
            rpath: vec!["/opt/r".into()],
            runpath: vec!["$ORIGIN/../lib".into()],
            ..ElfDeps::default()
        };
        let dirs = search_dirs(&deps, "usr/bin");
        assert_eq!(dirs[0], "usr/bin/../lib");
        assert!(
            !dirs.contains(&"opt/r".to_owned()),
            "RPATH is ignored with RUNPATH"
        );
        assert_eq!(dirs[1], "lib/x86_64-linux-gnu");
        let deps = ElfDeps {
            rpath: vec!["/opt/r".into()],
            ..ElfDeps::default()
        };
        assert_eq!(search_dirs(&deps, "x")[0], "opt/r");
    }
}
