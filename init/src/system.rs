//! The `System` trait: every operation the boot steps perform on the machine, with the real
//! implementation (`RealSystem`) and an in-memory fake (`FakeSystem`) that records calls for tests.

use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::os::fd::AsFd;
use std::os::unix::fs::symlink;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use rustix::mount::MountFlags;

/// Every path the boot steps touch, overridable for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// procfs mountpoint (`/proc`).
    pub proc_dir: PathBuf,
    /// sysfs mountpoint (`/sys`).
    pub sys: PathBuf,
    /// devtmpfs mountpoint (`/dev`).
    pub dev: PathBuf,
    /// tmpfs for runtime state (`/run`).
    pub run: PathBuf,
    /// Mountpoint of the new root in the initramfs (`/sysroot`).
    pub sysroot: PathBuf,
    /// The kernel command line (`/proc/cmdline`).
    pub cmdline: PathBuf,
    /// Directory holding `<kernel release>/modules.dep` (`/lib/modules`, `/usr/lib/modules`).
    pub modules: PathBuf,
    /// `/etc`.
    pub etc: PathBuf,
    /// `/var` (the `state` partition).
    pub var: PathBuf,
    /// `/tmp`.
    pub tmp: PathBuf,
    /// The plinth-init executable inside the new root, relative to it (`usr/bin/plinth-init`).
    pub init_in_root: PathBuf,
    /// A live boot's root in the initramfs (`/plinth/root.live`).
    pub live_root: PathBuf,
}

impl Default for Paths {
    fn default() -> Paths {
        Paths::under(Path::new("/"))
    }
}

impl Paths {
    /// The standard layout with every path below `root` (`/` on a real machine).
    pub fn under(root: &Path) -> Paths {
        Paths {
            proc_dir: root.join("proc"),
            sys: root.join("sys"),
            dev: root.join("dev"),
            run: root.join("run"),
            sysroot: root.join("sysroot"),
            cmdline: root.join("proc/cmdline"),
            modules: root.join("lib/modules"),
            etc: root.join("etc"),
            var: root.join("var"),
            tmp: root.join("tmp"),
            init_in_root: PathBuf::from("usr/bin/plinth-init"),
            live_root: root.join(os_config::live::ROOT_IN_INITRD),
        }
    }

    /// Stage 2's layout: like `under`, with modules under `usr/lib/modules`.
    pub fn stage2_under(root: &Path) -> Paths {
        Paths {
            modules: root.join("usr/lib/modules"),
            ..Paths::under(root)
        }
    }
}

/// Something readable and seekable (a block device, or bytes in a test).
pub trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

/// The operations boot steps perform. Paths are absolute on the machine (see `Paths`).
pub trait System {
    /// `mount(2)`.
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()>;
    /// `mount --move`.
    fn move_mount(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Reads a whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Opens a file or block device for reading.
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn ReadSeek>>;
    /// Writes a whole file (creating or truncating it).
    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// Renames a file (atomically replacing `to`); the content and the rename are made durable.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Names in a directory, sorted.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// True if the path exists (symlinks followed).
    fn exists(&self, path: &Path) -> bool;
    /// `mkdir -p`.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Creates a symbolic link `link` → `target`.
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()>;
    /// Creates a block device node.
    fn mknod_block(&self, path: &Path, major: u32, minor: u32) -> io::Result<()>;
    /// Loads a kernel module from a file (`finit_module`); Ok(false) if it was already loaded.
    fn load_module(&self, path: &Path) -> io::Result<bool>;
    /// The running kernel's release (`uname -r`).
    fn kernel_release(&self) -> String;
    /// Creates a device-mapper device with `targets` `(start, length, type, params)`, loads the
    /// table and resumes it; returns its (major, minor).
    fn dm_create(
        &self,
        name: &str,
        targets: &[(u64, u64, &str, &str)],
        read_only: bool,
    ) -> io::Result<(u32, u32)>;
    /// Attaches `file` read-only to a free loop device (4096-byte blocks); returns its node.
    fn loop_attach(&self, file: &Path) -> io::Result<PathBuf>;
    /// Makes `new_root` the root: chdir, move it onto `/`, chroot.
    fn switch_root(&self, new_root: &Path) -> io::Result<()>;
    /// Replaces the process image; returns only on failure.
    fn exec(&self, program: &Path, args: &[String]) -> io::Error;
    /// Sleeps (the fake advances its clock).
    fn sleep(&self, duration: Duration);
    /// Monotonic time since an arbitrary start.
    fn now(&self) -> Duration;
    /// `sethostname(2)`.
    fn set_hostname(&self, name: &str) -> io::Result<()>;
    /// Sets a network interface up.
    fn interface_up(&self, name: &str) -> io::Result<()>;
    /// Fills `buf` from the kernel's random source.
    fn random_bytes(&self, buf: &mut [u8]) -> io::Result<()>;
}

/// The machine itself.
#[derive(Debug)]
pub struct RealSystem {
    start: Instant,
}

impl Default for RealSystem {
    fn default() -> RealSystem {
        RealSystem {
            start: Instant::now(),
        }
    }
}

/// Module flag: the file is compressed and the kernel decompresses it.
const MODULE_INIT_COMPRESSED_FILE: i32 = 4;

impl System for RealSystem {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()> {
        rustix::mount::mount(source, target, fstype, flags, data).map_err(io::Error::from)
    }

    fn move_mount(&self, from: &Path, to: &Path) -> io::Result<()> {
        rustix::mount::mount_move(from, to).map_err(io::Error::from)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn open_read(&self, path: &Path) -> io::Result<Box<dyn ReadSeek>> {
        Ok(Box::new(File::open(path)?))
    }

    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        fs::write(path, data)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        // Write-then-rename replaces state files: make the content durable before the name.
        File::open(from)?.sync_all()?;
        fs::rename(from, to)?;
        if let Some(parent) = to.parent() {
            File::open(parent)?.sync_all()?;
        }
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(path)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        symlink(target, link)
    }

    fn mknod_block(&self, path: &Path, major: u32, minor: u32) -> io::Result<()> {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::BlockDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            rustix::fs::makedev(major, minor),
        )
        .map_err(io::Error::from)
    }

    fn load_module(&self, path: &Path) -> io::Result<bool> {
        let file = File::open(path)?;
        let name = path.to_string_lossy();
        let flags = if name.ends_with(".ko") {
            0
        } else {
            MODULE_INIT_COMPRESSED_FILE
        };
        match rustix::system::finit_module(file.as_fd(), c"", flags) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::EXIST) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn kernel_release(&self) -> String {
        rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned()
    }

    fn dm_create(
        &self,
        name: &str,
        targets: &[(u64, u64, &str, &str)],
        read_only: bool,
    ) -> io::Result<(u32, u32)> {
        use crate::stage1::verity::{dm_buffer, dm_reply_dev, DmCommand, DM_READONLY_FLAG};
        let control = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/mapper/control")
            .or_else(|_| {
                // devtmpfs names the node `mapper/control`; create it if it is missing.
                fs::create_dir_all("/dev/mapper")?;
                let _ = self.mknod_char_misc_control();
                fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/mapper/control")
            })
            .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/mapper/control: {e}")))?;
        let flags = if read_only { DM_READONLY_FLAG } else { 0 };
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
        let run = |command: DmCommand, buf: &mut Vec<u8>| {
            crate::syscall::dm_ioctl(control.as_fd(), command.request(), buf)
                .map_err(|e| io::Error::new(e.kind(), format!("{} of {name}: {e}", command.name())))
        };
        let mut create = dm_buffer(name, flags, &[]).map_err(invalid)?;
        run(DmCommand::DevCreate, &mut create)?;
        let mut load = dm_buffer(name, flags, targets).map_err(invalid)?;
        let loaded = run(DmCommand::TableLoad, &mut load).and_then(|()| {
            let mut resume = dm_buffer(name, 0, &[]).map_err(invalid)?;
            run(DmCommand::DevSuspend, &mut resume)?;
            Ok(dm_reply_dev(&resume))
        });
        if loaded.is_err() {
            // Leave no half-made device behind; the error of the failed step is what matters.
            if let Ok(mut remove) = dm_buffer(name, 0, &[]) {
                let _ = run(DmCommand::DevRemove, &mut remove);
            }
        }
        loaded
    }

    fn loop_attach(&self, file: &Path) -> io::Result<PathBuf> {
        let context =
            |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
        let control = fs::File::open("/dev/loop-control").map_err(context(
            "opening /dev/loop-control (is the loop driver loaded?)".into(),
        ))?;
        let number = crate::syscall::loop_get_free(control.as_fd()).map_err(context(
            "asking /dev/loop-control for a free loop device".into(),
        ))?;
        let node = PathBuf::from(format!("/dev/loop{number}"));
        if !node.exists() {
            // devtmpfs may lag behind the new device: loop devices are block major 7.
            self.mknod_block(&node, 7, number)
                .map_err(context(format!("creating {}", node.display())))?;
        }
        let device = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&node)
            .or_else(|_| fs::File::open(&node))
            .map_err(context(format!("opening {}", node.display())))?;
        let backing =
            fs::File::open(file).map_err(context(format!("opening {}", file.display())))?;
        crate::syscall::loop_configure_read_only(device.as_fd(), backing.as_fd()).map_err(
            context(format!(
                "attaching {} to {}",
                file.display(),
                node.display()
            )),
        )?;
        Ok(node)
    }

    fn switch_root(&self, new_root: &Path) -> io::Result<()> {
        if let Err(e) = free_initramfs(new_root) {
            crate::info!("freeing the initramfs failed (its files stay in memory): {e}");
        }
        std::env::set_current_dir(new_root)?;
        rustix::mount::mount_move(".", "/")?;
        rustix::process::chroot(".")?;
        std::env::set_current_dir("/")
    }

    fn exec(&self, program: &Path, args: &[String]) -> io::Error {
        std::process::Command::new(program)
            .arg0(program)
            .args(args)
            .exec()
    }

    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn set_hostname(&self, name: &str) -> io::Result<()> {
        rustix::system::sethostname(name.as_bytes()).map_err(io::Error::from)
    }

    fn interface_up(&self, name: &str) -> io::Result<()> {
        crate::syscall::interface_up(name)
    }

    fn random_bytes(&self, buf: &mut [u8]) -> io::Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            filled +=
                rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty())?;
        }
        Ok(())
    }
}

/// Deletes the initramfs's files, which would otherwise stay in memory after the switch, as
/// `switch_root(8)` does. Only when `/` is a ramfs/tmpfs; never crosses into another filesystem
/// (the new root and anything mounted is skipped by device number) and never follows symlinks.
fn free_initramfs(keep: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    let stat = rustix::fs::statfs("/")?;
    let kind = stat.f_type as u64;
    if kind != RAMFS_MAGIC && kind != TMPFS_MAGIC {
        return Ok(());
    }
    let root_dev = fs::symlink_metadata("/")?.dev();
    remove_tree(Path::new("/"), root_dev, keep);
    Ok(())
}

/// Removes what lies on device `dev` under `dir`, except `keep`; best effort.
fn remove_tree(dir: &Path, dev: u64, keep: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path == keep {
            continue;
        }
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            remove_tree(&path, dev, keep);
            let _ = fs::remove_dir(&path);
        } else {
            let _ = fs::remove_file(&path);
        }
    }
}

impl RealSystem {
    /// Creates `/dev/mapper/control` (misc 10:236) when devtmpfs has not.
    fn mknod_char_misc_control(&self) -> io::Result<()> {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            "/dev/mapper/control",
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            rustix::fs::makedev(10, 236),
        )
        .map_err(io::Error::from)
    }
}

/// The in-memory machine the unit tests boot (compiled for tests only).
#[cfg(test)]
mod fake;
#[cfg(test)]
pub use fake::FakeSystem;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn remove_tree_keeps_the_new_root_and_follows_no_symlink() {
        let base = std::env::temp_dir().join(format!("plinth-free-{}", std::process::id()));
        let rootfs = base.join("rootfs");
        let outside = base.join("outside");
        fs::create_dir_all(rootfs.join("lib/modules/6.1")).expect("mkdir");
        fs::create_dir_all(rootfs.join("sysroot/usr")).expect("mkdir");
        fs::create_dir_all(&outside).expect("mkdir");
        fs::write(rootfs.join("init"), "elf").expect("write");
        fs::write(rootfs.join("lib/modules/6.1/a.ko"), "ko").expect("write");
        fs::write(rootfs.join("sysroot/usr/keep"), "keep").expect("write");
        fs::write(outside.join("precious"), "data").expect("write");
        symlink(&outside, rootfs.join("link")).expect("symlink");
        let dev = fs::metadata(&rootfs).expect("stat").dev();
        remove_tree(&rootfs, dev, &rootfs.join("sysroot"));
        let mut left: Vec<String> = fs::read_dir(&rootfs)
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["sysroot"]);
        assert!(rootfs.join("sysroot/usr/keep").exists());
        assert!(outside.join("precious").exists(), "a symlink was followed");
        fs::remove_dir_all(&base).expect("cleanup");
    }
}
