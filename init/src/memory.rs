//! PID 1's own memory: a small, shared heap, given back after the busy start, and reported.
//!
//! glibc gives each thread that allocates an arena of its own and keeps freed memory mapped. For a
//! supervisor that is idle after boot both cost resident memory for nothing: one arena serves all
//! threads (they seldom allocate at once), buffers of 64 KiB and more are mapped on their own and
//! unmapped when freed, and the heap is trimmed once the boot settled.

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

/// Gives the heap's free pages back to the kernel.
pub fn trim() {
    syscall::malloc_trim();
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
}
