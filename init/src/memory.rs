//! PID 1's own memory: a small, shared heap, given back after the busy start, and reported.
//!
//! glibc gives each thread that allocates an arena of its own and keeps freed memory mapped. For a
//! supervisor that is idle after boot both cost resident memory for nothing: one arena serves all
//! threads (they seldom allocate at once), buffers of 64 KiB and more are mapped on their own and
//! unmapped when freed, and the heap is trimmed once the boot settled. The executable's own pages
//! are the rest of PID 1's memory: once the boot settled they are given back too, and only what
//! runs again comes back.

use crate::syscall;

/// Allocations of this size and more get their own mapping, returned to the kernel when freed.
const MMAP_THRESHOLD: libc::c_int = 64 * 1024;
/// Free memory at the top of the heap beyond this is returned to the kernel.
const TRIM_THRESHOLD: libc::c_int = 64 * 1024;

/// Configures the allocator; call before any thread is started.
pub fn limit_heap() {
    for (name, param, value) in [
        ("M_ARENA_MAX", libc::M_ARENA_MAX, 1),
        ("M_MMAP_THRESHOLD", libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("M_TRIM_THRESHOLD", libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ] {
        if !syscall::mallopt(param, value) {
            crate::info!("mallopt({name}, {value}) was refused");
        }
    }
}

/// Gives the heap's free pages back to the kernel, and the resident pages of this executable's
/// code and constants: after the busy start (provisioning, image archives, the first
/// reconciliation) little of the code runs again, and what the watch loop runs is read back from
/// the root on its next use. Returns the bytes of the executable's mappings advised.
pub fn trim() -> usize {
    syscall::malloc_trim();
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return 0;
    };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return 0;
    };
    let mut advised = 0;
    for (start, end) in read_only_ranges(&maps, &exe.to_string_lossy()) {
        // A kernel without MADV_PAGEOUT (before 5.4) says EINVAL: the pages just stay.
        if syscall::madvise_pageout(start, end - start).is_ok() {
            advised += end - start;
        }
    }
    advised
}

/// The read-only mappings (code, constants) of the file at `path` in a `/proc/PID/maps` text,
/// as address ranges. Writable mappings (data, relocations) are private memory and stay.
pub fn read_only_ranges(maps: &str, path: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            // offset, device, inode, then the path (which has no spaces for an executable).
            if fields.nth(3)? != path || perms.contains('w') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (end > start).then_some((start, end))
        })
        .collect()
}

/// Resident memory of this process, from `/proc/self/status`, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// `VmRSS`: all resident pages.
    pub rss_kib: u64,
    /// `RssAnon`: heap, stacks and other private memory.
    pub anon_kib: u64,
    /// `RssFile`: pages of the executable (and other files) that are mapped and resident.
    pub file_kib: u64,
}

impl Usage {
    /// This process's usage now; `None` where `/proc` cannot tell.
    pub fn current() -> Option<Usage> {
        let text = std::fs::read_to_string("/proc/self/status").ok()?;
        Usage::parse(&text)
    }

    /// Reads the `VmRSS`, `RssAnon` and `RssFile` lines of a `/proc/PID/status` text.
    pub fn parse(status: &str) -> Option<Usage> {
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            let value = line[name.len()..].trim().strip_suffix("kB")?;
            value.trim().parse().ok()
        };
        Some(Usage {
            rss_kib: field("VmRSS:")?,
            anon_kib: field("RssAnon:").unwrap_or(0),
            file_kib: field("RssFile:").unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_resident_set_lines() {
        let status = "Name:\tplinth-init\nVmRSS:\t    2048 kB\nRssAnon:\t     900 kB\nRssFile:\t    1148 kB\nRssShmem:\t       0 kB\n";
        assert_eq!(
            Usage::parse(status),
            Some(Usage {
                rss_kib: 2048,
                anon_kib: 900,
                file_kib: 1148
            })
        );
        assert_eq!(Usage::parse("Name:\tx\n"), None);
        assert_eq!(Usage::parse("VmRSS:\t12 MB\n"), None, "unit must be kB");
    }

    #[test]
    fn the_allocator_accepts_the_limits() {
        limit_heap();
        trim();
        let usage = Usage::current().expect("/proc/self/status");
        assert!(usage.rss_kib > 0 && usage.rss_kib >= usage.anon_kib);
    }

    #[test]
    fn only_the_executables_read_only_mappings_are_given_back() {
        let maps = "\
55d0a0000000-55d0a0100000 r--p 00000000 00:1a 12 /usr/bin/plinth-init
55d0a0100000-55d0a0500000 r-xp 00100000 00:1a 12 /usr/bin/plinth-init
55d0a0500000-55d0a0600000 r--p 00500000 00:1a 12 /usr/bin/plinth-init
55d0a0600000-55d0a0610000 rw-p 00600000 00:1a 12 /usr/bin/plinth-init
55d0a0610000-55d0a0700000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000001000 r-xp 00000000 00:1a 99 /usr/bin/plinth-init-old
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(
            read_only_ranges(maps, "/usr/bin/plinth-init"),
            vec![
                (0x55d0a0000000, 0x55d0a0100000),
                (0x55d0a0100000, 0x55d0a0500000),
                (0x55d0a0500000, 0x55d0a0600000)
            ]
        );
        assert!(read_only_ranges(maps, "/usr/bin/other").is_empty());
    }

    #[test]
    fn giving_the_executables_pages_back_lowers_the_resident_file_pages() {
        // This test binary's own code: touched by running, given back by `trim`.
        let before = Usage::current().expect("/proc/self/status");
        let advised = trim();
        let after = Usage::current().expect("/proc/self/status");
        assert!(
            advised > 0,
            "no read-only mapping of the test executable was advised"
        );
        assert!(
            after.file_kib < before.file_kib,
            "resident file pages went from {} KiB to {} KiB",
            before.file_kib,
            after.file_kib
        );
    }
}
