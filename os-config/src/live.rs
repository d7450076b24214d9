//! The contract of network (PXE) boots, shared by the builder, which writes the PXE folder, and
//! `plinth-init`, which boots it: the kernel arguments of a live boot and of an installation, and
//! where the live root sits in the initramfs.
//!
//! A live boot carries no slot: `plinth.live` replaces `plinth.slot=`, the root comes from the
//! initramfs (or from `plinth.root-url=`) as one file, `root.live`, checked through dm-verity
//! against `plinth.roothash=` exactly as a disk root is. `root.live` is the root image padded to
//! whole 4096-byte blocks, followed by its verity hash device (superblock, then the tree), so the
//! superblock is at block `data_blocks` and the tree starts one block later.

/// Kernel argument: boot live, the root from the initramfs or `plinth.root-url=`, not from a disk.
pub const ARG_LIVE: &str = "plinth.live";
/// Kernel argument: fetch `root.live` from this http:// URL in stage 1 instead of the initramfs.
pub const ARG_ROOT_URL: &str = "plinth.root-url";
/// Kernel argument: the live system's `/var` is this partition (`/dev/vdb1`, or a kernel name);
/// without it a partition labelled `state` on a local disk is used if there is one, else a tmpfs.
pub const ARG_STATE: &str = "plinth.state";
/// Kernel argument: install to this disk (a kernel name, `/dev/...`, `/dev/disk/by-id/...`,
/// `/dev/disk/by-path/...` or a rule such as `first-empty:8G`), then reboot into it.
pub const ARG_INSTALL: &str = "plinth.install";
/// Kernel argument: the zstd-compressed disk image to install (http://, https://, file://).
pub const ARG_INSTALL_IMAGE: &str = "plinth.install.image";
/// Kernel argument: sha256 of the compressed image file.
pub const ARG_INSTALL_SHA256: &str = "plinth.install.sha256";
/// Kernel argument: install even over a disk that holds partitions or filesystems.
pub const ARG_INSTALL_WIPE: &str = "plinth.install.wipe";

/// Path of the live root inside the initramfs (without a leading `/`).
pub const ROOT_IN_INITRD: &str = "plinth/root.live";
/// File name of the live root in the PXE folder (and what `plinth.root-url=` points at).
pub const ROOT_FILE: &str = "root.live";

/// Name of the QEMU fw_cfg item whose text is appended to the kernel command line
/// (`-fw_cfg name=opt/plinth/cmdline,string=...`). Only the installation arguments are taken
/// from it: the hypervisor may choose the disk and image to install, never the root hash.
pub const FW_CFG_CMDLINE: &str = "opt/plinth/cmdline";

/// The arguments `FW_CFG_CMDLINE` may carry.
pub const FW_CFG_ALLOWED: [&str; 4] = [
    ARG_INSTALL,
    ARG_INSTALL_IMAGE,
    ARG_INSTALL_SHA256,
    ARG_INSTALL_WIPE,
];

/// The number of root data blocks in a `root.live` of `len` bytes: the `d` for which `d` blocks
/// plus their verity device (superblock and tree) are exactly `len` bytes. `None` when no `d`
/// fits, so the file cannot be a live root.
pub fn data_blocks_of(len: u64) -> Option<u64> {
    let block = crate::manifest::VERITY_BLOCK_SIZE;
    if !len.is_multiple_of(block) {
        return None;
    }
    let size = |d: u64| d * block + crate::manifest::verity_size(d);
    // `size` grows strictly with `d`: search the smallest `d` whose size reaches `len`.
    let (mut low, mut high) = (0u64, len / block);
    while low < high {
        let mid = low + (high - low) / 2;
        if size(mid) < len {
            low = mid + 1;
        } else {
            high = mid;
        }
    }
    (low > 0 && size(low) == len).then_some(low)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_blocks_of_a_live_root_are_found_from_its_length() {
        let block = crate::manifest::VERITY_BLOCK_SIZE;
        for d in [1u64, 2, 127, 128, 129, 4096, 16_384, 16_385, 13_421] {
            let len = d * block + crate::manifest::verity_size(d);
            assert_eq!(data_blocks_of(len), Some(d), "{d}");
        }
        // Not whole blocks, empty, or a length no data size gives (one block too many).
        assert_eq!(data_blocks_of(4097), None);
        assert_eq!(data_blocks_of(0), None);
        let len = 128 * block + crate::manifest::verity_size(128);
        assert_eq!(data_blocks_of(len + block), None);
    }
}
