//! The few system calls `rustix` does not wrap safely: device-mapper, block-device, interface and
//! RTC ioctls, setting and slewing the system clock, reading PTP clocks, signal masks and waiting, and `kill(-1)`. The
//! only module of this crate allowed to use `unsafe`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

/// Issues a device-mapper ioctl (`request` from `verity::DmCommand::request`) with `buf`, which
/// starts with a `struct dm_ioctl` whose `data_size` is `buf.len()`.
pub fn dm_ioctl(control: BorrowedFd<'_>, request: u32, buf: &mut [u8]) -> io::Result<()> {
    if buf.len() < crate::stage1::verity::DM_IOCTL_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "device-mapper buffer shorter than struct dm_ioctl",
        ));
    }
    let declared = u32::from_ne_bytes([buf[12], buf[13], buf[14], buf[15]]) as usize;
    if declared > buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "device-mapper buffer shorter than its data_size",
        ));
    }
    // SAFETY: `buf` is a live, writable allocation of at least `data_size` bytes (checked above),
    // which is all the kernel reads or writes for device-mapper requests; the fd is borrowed and
    // stays open for the duration of the call.
    let rc = unsafe {
        libc::ioctl(
            control.as_raw_fd(),
            request as libc::Ioctl,
            buf.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `IFF_UP` on a network interface (for `lo`) with `SIOCGIFFLAGS`/`SIOCSIFFLAGS`.
pub fn interface_up(name: &str) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} is not 1..15 bytes without NUL"),
        ));
    }
    let socket = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    )?;
    // SAFETY: `ifreq` is a plain C struct of integers and arrays; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: `request` is a valid, NUL-terminated `ifreq` (zeroed, name shorter than IFNAMSIZ)
    // that outlives the call; SIOCGIFFLAGS writes only `ifr_flags` inside it.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS succeeded, so the union holds `ifru_flags`.
    unsafe {
        request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above; SIOCSIFFLAGS only reads the name and flags from `request`.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BLKPG` (`_IO(0x12, 105)`): add, delete or resize a partition in the kernel's view.
const BLKPG: libc::Ioctl = 0x1269 as libc::Ioctl;
/// `BLKPG_RESIZE_PARTITION` operation of `BLKPG`.
const BLKPG_RESIZE_PARTITION: libc::c_int = 3;
/// `EXT4_IOC_RESIZE_FS` (`_IOW('f', 16, __u64)`): grow a mounted ext4 filesystem.
const EXT4_IOC_RESIZE_FS: libc::Ioctl = 0x4008_6610 as libc::Ioctl;

/// `struct blkpg_partition` of `<linux/blkpg.h>`.
#[repr(C)]
struct BlkpgPartition {
    start: libc::c_longlong,
    length: libc::c_longlong,
    pno: libc::c_int,
    devname: [libc::c_char; 64],
    volname: [libc::c_char; 64],
}

/// `struct blkpg_ioctl_arg` of `<linux/blkpg.h>`.
#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}

/// Tells the kernel that partition `number` of the whole disk `disk` now spans `length` bytes from
/// byte `start` (`BLKPG_RESIZE_PARTITION`; works while the partition is in use).
pub fn resize_partition(
    disk: BorrowedFd<'_>,
    number: u32,
    start: u64,
    length: u64,
) -> io::Result<()> {
    let (Ok(pno), Ok(start), Ok(length)) = (
        libc::c_int::try_from(number),
        libc::c_longlong::try_from(start),
        libc::c_longlong::try_from(length),
    ) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("partition {number} at {start}+{length} does not fit struct blkpg_partition"),
        ));
    };
    let mut partition = BlkpgPartition {
        start,
        length,
        pno,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
        data: (&mut partition as *mut BlkpgPartition).cast(),
    };
    // SAFETY: `arg` and the `partition` it points to are valid, initialized C structs that outlive
    // the call; the kernel copies `datalen` bytes from `data` and writes nothing back.
    if unsafe { libc::ioctl(disk.as_raw_fd(), BLKPG, &mut arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Grows the mounted ext4 filesystem that `fd` (any file or directory on it) belongs to, to
/// `blocks` filesystem blocks (`EXT4_IOC_RESIZE_FS`).
pub fn ext4_resize(fd: BorrowedFd<'_>, blocks: u64) -> io::Result<()> {
    let count: u64 = blocks;
    // SAFETY: the kernel reads one `__u64` from the pointer, which points at `count`, alive for
    // the duration of the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), EXT4_IOC_RESIZE_FS, &count as *const u64) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BLKZEROOUT` (`_IO(0x12, 127)`): zero a byte range of a block device.
const BLKZEROOUT: libc::Ioctl = 0x127f as libc::Ioctl;

/// Zeroes `len` bytes of the block device `disk` from byte `start` (`BLKZEROOUT`: the device
/// unmaps or writes zeros itself, fast on virtual and thin disks). Both must be multiples of the
/// logical sector size; a regular file fails with `ENOTTY`.
pub fn zero_range(disk: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [start, len];
    // SAFETY: the kernel reads two `__u64` (start, length) from the pointer, which points at
    // `range`, alive for the duration of the call; it writes nothing back.
    if unsafe { libc::ioctl(disk.as_raw_fd(), BLKZEROOUT, range.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A set of blocked signals to wait on synchronously.
pub struct SignalSet(libc::sigset_t);

impl std::fmt::Debug for SignalSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignalSet")
    }
}

/// Blocks `signals` in the calling thread (threads spawned later inherit the mask) so they stay
/// pending until `wait_signal` takes them. `std::process::Command` resets the mask in children.
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<SignalSet> {
    // SAFETY: `sigset_t` is plain data; all-zero is a valid value and `sigemptyset` initializes it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed `sigset_t` for each call.
    unsafe {
        libc::sigemptyset(&mut set);
        for &signal in signals {
            if libc::sigaddset(&mut set, signal) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    // SAFETY: `set` is initialized; the old mask is not requested (null is allowed).
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(SignalSet(set))
}

/// Makes `command`'s child start with no blocked and no ignored signals. PID 1 blocks the signals
/// it waits for, and a forked child inherits the mask (std does not reset it): a dockerd with
/// SIGTERM blocked would ignore the shutdown. Ignored signals also stay ignored across exec (a
/// process started from a shell's background job ignores SIGINT and SIGQUIT), so every standard
/// signal goes back to its default action too.
pub fn unblock_signals_in_child(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: `sigset_t` is plain data; all-zero is a valid value and `sigemptyset` initializes it.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `empty` is a valid, exclusively borrowed `sigset_t`.
    unsafe { libc::sigemptyset(&mut empty) };
    // SAFETY: the hook runs between fork and exec and only calls `pthread_sigmask` (the
    // `rt_sigprocmask` system call) on a set copied into the closure before the fork, and
    // `signal` with `SIG_DFL` (a `rt_sigaction` system call); both are async-signal-safe. It
    // neither allocates nor takes locks (a raw OS error needs no allocation).
    unsafe {
        command.pre_exec(move || {
            let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            for signal in 1..32 {
                if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                    libc::signal(signal, libc::SIG_DFL);
                }
            }
            Ok(())
        });
    }
}

/// Waits up to `timeout` for one of the blocked signals in `set`; None on timeout or interruption.
pub fn wait_signal(set: &SignalSet, timeout: Duration) -> io::Result<Option<libc::c_int>> {
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set.0` was initialized by `block_signals`; `info` may be null; `timeout` is a valid
    // timespec that outlives the call.
    let signal = unsafe { libc::sigtimedwait(&set.0, std::ptr::null_mut(), &timeout) };
    if signal < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(signal))
}

/// Sends `signal` to every process except PID 1 and the caller (`kill(-1, signal)`).
/// Returns false if there was no process to signal.
pub fn kill_all(signal: libc::c_int) -> io::Result<bool> {
    // SAFETY: `kill` takes plain integers and has no memory-safety preconditions.
    if unsafe { libc::kill(-1, signal) } < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Ok(false);
        }
        return Err(err);
    }
    Ok(true)
}

/// Signal numbers used by PID 1.
pub mod signals {
    /// A child changed state.
    pub const SIGCHLD: i32 = libc::SIGCHLD;
    /// Power off.
    pub const SIGTERM: i32 = libc::SIGTERM;
    /// Ctrl-Alt-Del (after `reboot(RB_DISABLE_CAD)`): reboot.
    pub const SIGINT: i32 = libc::SIGINT;
    /// Power off (sent by some power daemons and container managers).
    pub const SIGPWR: i32 = libc::SIGPWR;
    /// Reboot (another convention, kept for symmetry with the halt/poweroff signals of sysvinit).
    pub const SIGUSR1: i32 = libc::SIGUSR1;
    /// Forcibly stop a process.
    pub const SIGKILL: i32 = libc::SIGKILL;
}

/// Sets one of glibc's `mallopt` parameters; false if glibc refused it.
pub fn mallopt(param: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: `mallopt` takes two integers and only changes the allocator's tunables; glibc
    // checks the values itself.
    unsafe { libc::mallopt(param, value) == 1 }
}

/// Returns the heap's free memory to the kernel (`malloc_trim(0)`); true if any was released.
pub fn malloc_trim() -> bool {
    // SAFETY: `malloc_trim` takes an integer and only releases free pages of the allocator.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// `madvise(start, len, MADV_PAGEOUT)` (Linux 5.4): asks the kernel to reclaim the resident pages
/// of a range of this process's mappings, which are read back from their file on their next use.
pub fn madvise_pageout(start: usize, len: usize) -> std::io::Result<()> {
    // SAFETY: MADV_PAGEOUT only reclaims pages; their content stays what the mapping says (file
    // pages are read back), so no memory of this process changes. A range that is not mapped
    // fails with ENOMEM and changes nothing.
    let done = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_PAGEOUT) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `LOOP_CTL_GET_FREE` of `<linux/loop.h>`: the number of a free loop device (created if needed).
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
/// `LOOP_CONFIGURE` (Linux 5.8): attach a file and set its flags in one call.
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
/// `LO_FLAGS_READ_ONLY`.
const LO_FLAGS_READ_ONLY: u32 = 1;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Asks `/dev/loop-control` for a free loop device; returns its number.
pub fn loop_get_free(control: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument; the descriptor is borrowed and open.
    let rc = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(rc).map_err(|_| io::Error::other("LOOP_CTL_GET_FREE returned a negative number"))
}

/// Attaches `backing` to the loop device `device`, read-only, with 4096-byte logical blocks
/// (`LOOP_CONFIGURE`).
pub fn loop_configure_read_only(device: BorrowedFd<'_>, backing: BorrowedFd<'_>) -> io::Result<()> {
    let fd = u32::try_from(backing.as_raw_fd())
        .map_err(|_| io::Error::other("negative file descriptor"))?;
    // SAFETY: both structs are plain integers and byte arrays, for which all zeros is valid.
    let mut config: LoopConfig = unsafe { std::mem::zeroed() };
    config.fd = fd;
    config.block_size = 4096;
    config.info.flags = LO_FLAGS_READ_ONLY;
    // SAFETY: `config` is a live `struct loop_config` the kernel only reads; both descriptors
    // are borrowed and open.
    let rc = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            LOOP_CONFIGURE,
            &config as *const LoopConfig,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves `CLOCK_REALTIME` by `offset_ns` nanoseconds at once (`clock_gettime` then
/// `clock_settime`; needs `CAP_SYS_TIME`).
pub fn clock_step(offset_ns: i64) -> io::Result<()> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, exclusively borrowed timespec that outlives the call; the kernel
    // only writes it.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let current = i128::from(now.tv_sec) * 1_000_000_000 + i128::from(now.tv_nsec);
    let target = current + i128::from(offset_ns);
    let (Ok(seconds), Ok(nanos)) = (
        libc::time_t::try_from(target.div_euclid(1_000_000_000)),
        libc::c_long::try_from(target.rem_euclid(1_000_000_000)),
    ) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("stepping the clock by {offset_ns} ns leaves the range of time_t"),
        ));
    };
    if seconds < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("stepping the clock by {offset_ns} ns would set it before 1970"),
        ));
    }
    let target = libc::timespec {
        tv_sec: seconds,
        tv_nsec: nanos,
    };
    // SAFETY: `target` is a valid, normalised timespec (0 <= tv_nsec < 10^9) that outlives the
    // call; the kernel only reads it.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &target) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Slews `CLOCK_REALTIME` by `offset_us` microseconds (`adjtimex` with `ADJ_OFFSET_SINGLESHOT`,
/// the `adjtime(3)` mode: the kernel runs the clock up to 0.5 ms/s faster or slower until the
/// offset is made up; a new call replaces what is left of the previous one). Offsets beyond
/// ±2000 s are cut to that.
pub fn clock_slew(offset_us: i64) -> io::Result<()> {
    // The kernel takes at most about ±2145 s (a 32-bit `long` of µs); callers slew far less.
    let limited = offset_us.clamp(-2_000_000_000, 2_000_000_000);
    let offset = libc::c_long::try_from(limited).unwrap_or(0);
    // SAFETY: `timex` is a plain C struct of integers; all-zero is a valid value (no modes).
    let mut request: libc::timex = unsafe { std::mem::zeroed() };
    request.modes = libc::ADJ_OFFSET_SINGLESHOT;
    request.offset = offset;
    // SAFETY: `request` is a valid, exclusively borrowed `timex` that outlives the call; with
    // ADJ_OFFSET_SINGLESHOT the kernel reads `offset` and writes the current state back.
    if unsafe { libc::adjtimex(&mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `CLOCKFD`: the low bits of a dynamic POSIX clock id that say it names a file descriptor.
const CLOCKFD: libc::clockid_t = 3;

/// The clock id of the dynamic POSIX clock open as `fd` (a `/dev/ptpN`): the kernel's
/// `FD_TO_CLOCKID(fd)`, `((~fd) << 3) | CLOCKFD`, a negative id no static clock uses.
pub fn fd_clock_id(fd: RawFd) -> libc::clockid_t {
    ((!fd) << 3) | CLOCKFD
}

/// Reads the dynamic POSIX clock open as `clock` (a PTP hardware clock, `/dev/ptpN`) with
/// `clock_gettime`: nanoseconds since 1970 on that clock. Fails with `EINVAL` when the file is
/// not a clock.
pub fn clock_gettime_fd(clock: BorrowedFd<'_>) -> io::Result<i64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, exclusively borrowed timespec that outlives the call; the kernel
    // only writes it. The clock id names `clock`, which stays open for the call (borrowed).
    if unsafe { libc::clock_gettime(fd_clock_id(clock.as_raw_fd()), &mut now) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let nanos = i128::from(now.tv_sec) * 1_000_000_000 + i128::from(now.tv_nsec);
    i64::try_from(nanos).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the clock reads {} s, beyond 2262", now.tv_sec),
        )
    })
}

/// `RTC_SET_TIME` (`_IOW('p', 0x0a, struct rtc_time)`).
const RTC_SET_TIME: libc::Ioctl = 0x4024_700a as libc::Ioctl;

/// `struct rtc_time` of `<linux/rtc.h>` (the fields of `struct tm`).
#[repr(C)]
struct RtcTime {
    tm_sec: libc::c_int,
    tm_min: libc::c_int,
    tm_hour: libc::c_int,
    tm_mday: libc::c_int,
    tm_mon: libc::c_int,
    tm_year: libc::c_int,
    tm_wday: libc::c_int,
    tm_yday: libc::c_int,
    tm_isdst: libc::c_int,
}

/// Sets the hardware clock `rtc` (an open `/dev/rtcN`) to the UTC time `time`.
pub fn rtc_set_time(rtc: BorrowedFd<'_>, time: &os_config::units::CivilTime) -> io::Result<()> {
    let Ok(year) = libc::c_int::try_from(time.year - 1900) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("year {} does not fit the RTC", time.year),
        ));
    };
    // Month, day and time of day are at most 60, so the conversions cannot fail.
    let field = |value: u32| libc::c_int::try_from(value).unwrap_or(0);
    let value = RtcTime {
        tm_sec: field(time.second),
        tm_min: field(time.minute),
        tm_hour: field(time.hour),
        tm_mday: field(time.day),
        tm_mon: field(time.month) - 1,
        tm_year: year,
        tm_wday: 0,
        tm_yday: 0,
        tm_isdst: 0,
    };
    // SAFETY: the kernel reads one `struct rtc_time` from the pointer, which points at `value`,
    // alive for the duration of the call; the descriptor is borrowed and open.
    if unsafe { libc::ioctl(rtc.as_raw_fd(), RTC_SET_TIME, &value as *const RtcTime) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_clock_ids_follow_fd_to_clockid() {
        // FD_TO_CLOCKID of <linux/posix-timers.h>: ((~fd) << 3) | 3.
        assert_eq!(fd_clock_id(0), -5);
        assert_eq!(fd_clock_id(3), -29);
        assert_eq!(fd_clock_id(1000), -8005);
        // CLOCKFD in the low three bits, and never a static clock id.
        for fd in [0, 5, 17, 1 << 20] {
            assert_eq!(fd_clock_id(fd) & 7, 3, "fd {fd}");
            assert!(fd_clock_id(fd) < 0, "fd {fd}");
        }
    }

    #[test]
    fn a_file_that_is_not_a_clock_is_not_read() {
        let file = tempfile::tempfile().expect("temporary file");
        use std::os::fd::AsFd;
        let err = clock_gettime_fd(file.as_fd()).expect_err("a plain file has no clock");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }

    /// Hex mask of a `Sig…:` line of /proc/<pid>/status as printed by a child.
    fn child_status_line(field: &str) -> String {
        let mut command = std::process::Command::new("grep");
        command.arg(field).arg("/proc/self/status");
        unblock_signals_in_child(&mut command);
        let out = command.output().expect("grep runs");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[test]
    fn children_start_with_no_blocked_signals() {
        // Runs in its own test thread; the mask is per thread.
        let _set = block_signals(&[signals::SIGTERM, signals::SIGCHLD]).expect("block");
        let blocked = child_status_line("SigBlk");
        assert_eq!(
            blocked, "SigBlk:\t0000000000000000",
            "child inherited a blocked mask"
        );
        let ignored = child_status_line("SigIgn");
        let mask =
            u64::from_str_radix(ignored.trim_start_matches("SigIgn:").trim(), 16).expect("hex");
        for signal in [signals::SIGTERM, signals::SIGINT, signals::SIGCHLD] {
            assert_eq!(
                mask & (1 << (signal - 1)),
                0,
                "signal {signal} ignored in the child: {ignored}"
            );
        }
    }
}
