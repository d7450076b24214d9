//! Choosing what of an extracted tree goes into the image: named paths with the symlinks that
//! lead to them, and the shared-library closure of every ELF chosen.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::elf;
use super::paths::{self, Resolved};

/// A set of paths (relative, as they exist in the extracted tree) chosen for the image.
#[derive(Debug)]
pub struct Selection {
    tree: PathBuf,
    entries: BTreeSet<String>,
}

impl Selection {
    /// An empty selection from the extracted tree at `tree`.
    pub fn new(tree: &Path) -> Selection {
        Selection {
            tree: tree.to_owned(),
            entries: BTreeSet::new(),
        }
    }

    /// The chosen paths, sorted.
    pub fn entries(&self) -> &BTreeSet<String> {
        &self.entries
    }

    /// Chooses `path` and every symlink passed to reach it; with `follow` also what a final
    /// symlink points at. Returns the resolution (`exists` false if nothing is there).
    pub fn add(&mut self, path: &str, follow: bool) -> Result<Resolved> {
        let resolved = paths::resolve(&self.tree, path, follow)?;
        self.entries.extend(resolved.links.iter().cloned());
        if resolved.exists {
            self.entries.insert(resolved.path.clone());
        }
        Ok(resolved)
    }

    /// Chooses `path`, which must exist, following symlinks to their target.
    pub fn require(&mut self, path: &str, what: &str) -> Result<String> {
        let resolved = self.add(path, true)?;
        if !resolved.exists {
            bail!("{what}: `/{path}` is not in the extracted packages");
        }
        Ok(resolved.path)
    }

    /// Adds the interpreter and `DT_NEEDED` libraries of every chosen ELF object, repeatedly,
    /// until nothing new is needed. A library that cannot be found is an error.
    pub fn add_elf_closure(&mut self) -> Result<()> {
        let mut done: BTreeSet<String> = BTreeSet::new();
        loop {
            let pending: Vec<String> = self
                .entries
                .iter()
                .filter(|e| !done.contains(*e))
                .cloned()
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            for rel in pending {
                done.insert(rel.clone());
                let full = self.tree.join(&rel);
                let meta = std::fs::symlink_metadata(&full)
                    .with_context(|| format!("reading {}", full.display()))?;
                if !meta.is_file() {
                    continue;
                }
                let Some(deps) = elf::read_file_deps(&full)? else {
                    continue;
                };
                if let Some(interp) = &deps.interpreter {
                    let found = self.add(interp, true)?;
                    if !found.exists {
                        bail!(
                            "/{rel} needs the ELF interpreter {interp}, which is not in the tree"
                        );
                    }
                }
                let dirs = elf::search_dirs(&deps, paths::parent(&rel));
                for soname in &deps.needed {
                    let found = elf::find_library(&self.tree, soname, &dirs)?;
                    if found.is_none() && self.chose_library(soname) {
                        // A plugin that names its host's library without a path to it (the
                        // JRE's `lib/*.so` need `lib/server/libjvm.so`): the loader reuses the
                        // copy the program loaded first, which is in the image.
                        continue;
                    }
                    let Some(found) = found else {
                        bail!(
                            "/{rel} needs {soname}, which is in none of {} of the extracted packages \
                             (is the package that ships it among the fetched packages?)",
                            dirs.iter()
                                .map(|d| format!("/{d}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                    };
                    self.entries.extend(found.links);
                    self.entries.insert(found.path);
                }
            }
        }
    }

    /// Whether a chosen file is named `soname` (the library itself, not a link to it).
    fn chose_library(&self, soname: &str) -> bool {
        self.entries.iter().any(|rel| {
            Path::new(rel).file_name() == Some(std::ffi::OsStr::new(soname))
                && std::fs::symlink_metadata(self.tree.join(rel)).is_ok_and(|m| m.is_file())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Copies the host's `ls` and the libraries it needs into a small tree laid out like Debian's.
    fn host_tree() -> (tempfile::TempDir, Vec<String>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let libdir = root.join("usr/lib/x86_64-linux-gnu");
        std::fs::create_dir_all(&libdir).expect("mkdir");
        std::fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
        std::fs::create_dir_all(root.join("usr/lib64")).expect("mkdir");
        for top in ["bin", "lib", "lib64"] {
            symlink(format!("usr/{top}"), root.join(top)).expect("symlink");
        }
        std::fs::copy("/usr/bin/ls", root.join("usr/bin/ls")).expect("copy ls");
        let bytes = std::fs::read("/usr/bin/ls").expect("read ls");
        let deps = elf::read_deps(&bytes).expect("parse").expect("elf");
        let mut libs = Vec::new();
        let mut queue = deps.needed.clone();
        while let Some(lib) = queue.pop() {
            if libs.contains(&lib) {
                continue;
            }
            let host = Path::new("/usr/lib/x86_64-linux-gnu").join(&lib);
            let real = std::fs::canonicalize(&host).expect("host library");
            let bytes = std::fs::read(&real).expect("read lib");
            let file = real.file_name().expect("name").to_str().expect("utf-8");
            std::fs::write(libdir.join(file), &bytes).expect("copy lib");
            if file != lib {
                symlink(file, libdir.join(&lib)).expect("soname link");
            }
            queue.extend(elf::read_deps(&bytes).expect("parse").expect("elf").needed);
            libs.push(lib);
        }
        std::fs::copy(
            "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            libdir.join("ld-linux-x86-64.so.2"),
        )
        .expect("copy loader");
        symlink(
            "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            root.join("usr/lib64/ld-linux-x86-64.so.2"),
        )
        .expect("loader link");
        std::fs::write(libdir.join("libunused.so.1"), b"\x7fELF junk").expect("write");
        (dir, libs)
    }

    #[test]
    fn closure_of_host_ls() {
        let (dir, libs) = host_tree();
        let mut selection = Selection::new(dir.path());
        selection.require("usr/bin/ls", "test").expect("ls");
        selection.add_elf_closure().expect("closure");
        let entries = selection.entries();
        assert!(
            entries.contains("usr/lib64/ld-linux-x86-64.so.2"),
            "{entries:?}"
        );
        assert!(
            entries.contains("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
            "{entries:?}"
        );
        for lib in &libs {
            assert!(
                entries.contains(&format!("usr/lib/x86_64-linux-gnu/{lib}")),
                "{lib} missing from {entries:?}"
            );
        }
        assert!(!entries.iter().any(|e| e.contains("libunused")));
    }

    #[test]
    fn missing_library_is_named() {
        let (dir, _) = host_tree();
        std::fs::remove_file(dir.path().join("usr/lib/x86_64-linux-gnu/libc.so.6"))
            .expect("remove libc");
        let mut selection = Selection::new(dir.path());
        selection.require("usr/bin/ls", "test").expect("ls");
        let err = selection.add_elf_closure().expect_err("libc is missing");
        assert!(format!("{err:#}").contains("needs libc.so.6"), "{err:#}");
    }

    #[test]
    fn library_chosen_elsewhere_satisfies_a_plugin() {
        // As the JRE's plugins need `lib/server/libjvm.so`: the library is outside every
        // search directory, but the image holds it because it was chosen by path.
        let (dir, _) = host_tree();
        let libdir = dir.path().join("usr/lib/x86_64-linux-gnu");
        let real = std::fs::canonicalize(libdir.join("libselinux.so.1")).expect("libselinux");
        let server = dir.path().join("usr/lib/jvm/server");
        std::fs::create_dir_all(&server).expect("mkdir");
        std::fs::copy(&real, server.join("libselinux.so.1")).expect("copy");
        std::fs::remove_file(libdir.join("libselinux.so.1")).expect("remove link");
        let _ = std::fs::remove_file(&real);

        let mut alone = Selection::new(dir.path());
        alone.require("usr/bin/ls", "test").expect("ls");
        let err = alone
            .add_elf_closure()
            .expect_err("libselinux is not chosen");
        assert!(
            format!("{err:#}").contains("needs libselinux.so.1"),
            "{err:#}"
        );

        let mut selection = Selection::new(dir.path());
        selection.require("usr/bin/ls", "test").expect("ls");
        selection
            .require("usr/lib/jvm/server/libselinux.so.1", "test")
            .expect("library");
        selection.add_elf_closure().expect("closure");
        assert!(selection
            .entries()
            .contains("usr/lib/jvm/server/libselinux.so.1"));
    }
}
