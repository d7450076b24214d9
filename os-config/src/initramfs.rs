//! The kernel modules the initramfs carries: the builder packs them (with their dependencies) and
//! stage 1 loads them by name before it looks for the root. One list, so that what is packed and
//! what is loaded cannot drift apart.

/// Modules the initramfs carries and stage 1 loads by name, in load order. A kernel that has one
/// built in, or does not ship it, is fine: the builder skips it and stage 1 reports it as "not a
/// loadable module" and goes on. Devices of other drivers are found by coldplug.
pub const MODULES: &[&str] = &[
    // Disk controllers the root may sit behind, on the common virtual machines (QEMU/KVM and
    // most clouds: virtio; Xen: blkfront; Hyper-V and Azure: storvsc) and physical machines
    // (SCSI/SATA disks through sd_mod, NVMe, AHCI).
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "nvme",
    "ahci",
    "xen_blkfront",
    "hv_storvsc",
    // Filesystems of the root image (squashfs or erofs) and of the `state` partition (ext4).
    "squashfs",
    "erofs",
    "ext4",
    // Device-mapper and dm-verity, which open the root through its hash tree.
    "dm_mod",
    "dm_verity",
    // A live (network) boot's root is a file in the initramfs, opened through a loop device; on
    // QEMU, fw_cfg may carry installation arguments (`os_config::live::FW_CFG_CMDLINE`).
    "loop",
    "qemu_fw_cfg",
    // `plinth.root-url=` fetches the live root in stage 1: the virtual machines' network card.
    "virtio_net",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_in_modules_dep_spelling() {
        let mut seen = std::collections::BTreeSet::new();
        for name in MODULES {
            assert!(seen.insert(*name), "{name} listed twice");
            assert!(
                !name.contains('-'),
                "{name}: spelled with `_`, as modules.dep normalises"
            );
        }
    }
}
