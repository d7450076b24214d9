//! An in-memory machine for tests: files, directories, and a log of every mutating call.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Cursor, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// An in-memory machine for tests: files, directories, and a log of every mutating call.
#[derive(Debug, Default)]
pub struct FakeSystem {
    files: RefCell<BTreeMap<PathBuf, Vec<u8>>>,
    dirs: RefCell<BTreeSet<PathBuf>>,
    calls: RefCell<Vec<String>>,
    clock: Cell<Duration>,
    /// Kernel release reported by `kernel_release`.
    pub release: String,
    /// Calls (by their logged text prefix) that fail with an error.
    failing: RefCell<Vec<String>>,
    next_dm_minor: Cell<u32>,
}

impl FakeSystem {
    /// An empty machine running kernel `release`.
    pub fn new(release: &str) -> FakeSystem {
        FakeSystem {
            release: release.to_string(),
            ..FakeSystem::default()
        }
    }

    /// Adds a file (and its parent directories).
    pub fn add_file(&self, path: impl AsRef<Path>, data: impl AsRef<[u8]>) {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent() {
            self.add_dir(parent);
        }
        self.files.borrow_mut().insert(path, data.as_ref().to_vec());
    }

    /// Adds a directory and its parents.
    pub fn add_dir(&self, path: impl AsRef<Path>) {
        let mut dirs = self.dirs.borrow_mut();
        for ancestor in path.as_ref().ancestors() {
            dirs.insert(ancestor.to_path_buf());
        }
    }

    /// Makes every later call whose log line starts with `prefix` fail.
    pub fn fail_on(&self, prefix: &str) {
        self.failing.borrow_mut().push(prefix.to_string());
    }

    /// The log of calls so far.
    pub fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }

    fn record(&self, call: String) -> io::Result<()> {
        let fails = self
            .failing
            .borrow()
            .iter()
            .any(|p| call.starts_with(p.as_str()));
        self.calls.borrow_mut().push(call.clone());
        if fails {
            return Err(io::Error::other(format!("fake failure of {call}")));
        }
        Ok(())
    }

    fn not_found(path: &Path) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} not found", path.display()),
        )
    }
}

impl System for FakeSystem {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()> {
        let ro = if flags.contains(MountFlags::RDONLY) {
            " ro"
        } else {
            ""
        };
        let data = if data.is_empty() {
            String::new()
        } else {
            format!(" {data}")
        };
        self.record(format!(
            "mount {fstype} {source} {}{ro}{data}",
            target.display()
        ))
    }

    fn move_mount(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.record(format!("move {} {}", from.display(), to.display()))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.files
            .borrow()
            .get(path)
            .cloned()
            .ok_or_else(|| Self::not_found(path))
    }

    fn open_read(&self, path: &Path) -> io::Result<Box<dyn ReadSeek>> {
        let mut cursor = Cursor::new(self.read(path)?);
        cursor.seek(SeekFrom::Start(0))?;
        Ok(Box::new(cursor))
    }

    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        self.record(format!("write {}", path.display()))?;
        self.files
            .borrow_mut()
            .insert(path.to_path_buf(), data.to_vec());
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.record(format!("rename {} {}", from.display(), to.display()))?;
        let data = self
            .files
            .borrow_mut()
            .remove(from)
            .ok_or_else(|| Self::not_found(from))?;
        self.files.borrow_mut().insert(to.to_path_buf(), data);
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        if !self.dirs.borrow().contains(path) {
            return Err(Self::not_found(path));
        }
        let mut names = BTreeSet::new();
        let files = self.files.borrow();
        let dirs = self.dirs.borrow();
        for entry in files.keys().chain(dirs.iter()) {
            if entry.parent() == Some(path) {
                if let Some(name) = entry.file_name() {
                    names.insert(name.to_string_lossy().into_owned());
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    fn exists(&self, path: &Path) -> bool {
        self.files.borrow().contains_key(path) || self.dirs.borrow().contains(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        if !self.dirs.borrow().contains(path) {
            self.record(format!("mkdir {}", path.display()))?;
        }
        self.add_dir(path);
        Ok(())
    }

    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        if self.exists(link) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", link.display()),
            ));
        }
        self.record(format!("symlink {} {}", link.display(), target.display()))?;
        self.add_file(link, target.as_os_str().as_encoded_bytes());
        Ok(())
    }

    fn mknod_block(&self, path: &Path, major: u32, minor: u32) -> io::Result<()> {
        self.record(format!("mknod {} {major}:{minor}", path.display()))?;
        self.add_file(path, b"");
        Ok(())
    }

    fn load_module(&self, path: &Path) -> io::Result<bool> {
        if !self.files.borrow().contains_key(path) {
            return Err(Self::not_found(path));
        }
        self.record(format!("load {}", path.display()))?;
        Ok(true)
    }

    fn kernel_release(&self) -> String {
        self.release.clone()
    }

    fn dm_create(
        &self,
        name: &str,
        targets: &[(u64, u64, &str, &str)],
        read_only: bool,
    ) -> io::Result<(u32, u32)> {
        let table: Vec<String> = targets
            .iter()
            .map(|(start, len, kind, params)| format!("{start} {len} {kind} {params}"))
            .collect();
        let ro = if read_only { " ro" } else { "" };
        self.record(format!("dm-create {name}{ro} {}", table.join("; ")))?;
        let minor = self.next_dm_minor.get();
        self.next_dm_minor.set(minor + 1);
        Ok((253, minor))
    }

    fn loop_attach(&self, file: &Path) -> io::Result<PathBuf> {
        let data = self.read(file)?;
        self.record(format!("loop-attach {}", file.display()))?;
        let node = PathBuf::from("/dev/loop0");
        self.add_file(&node, data);
        Ok(node)
    }

    fn switch_root(&self, new_root: &Path) -> io::Result<()> {
        self.record(format!("switch-root {}", new_root.display()))
    }

    fn exec(&self, program: &Path, args: &[String]) -> io::Error {
        match self.record(format!("exec {} {}", program.display(), args.join(" "))) {
            Err(e) => e,
            Ok(()) => io::Error::other("fake exec returns"),
        }
    }

    fn sleep(&self, duration: Duration) {
        self.clock.set(self.clock.get() + duration);
    }

    fn now(&self) -> Duration {
        self.clock.get()
    }

    fn set_hostname(&self, name: &str) -> io::Result<()> {
        self.record(format!("hostname {name}"))
    }

    fn interface_up(&self, name: &str) -> io::Result<()> {
        self.record(format!("link-up {name}"))
    }

    fn random_bytes(&self, buf: &mut [u8]) -> io::Result<()> {
        for (i, byte) in buf.iter_mut().enumerate() {
            *byte = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        Ok(())
    }
}
