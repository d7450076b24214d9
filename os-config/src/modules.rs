//! The kernel modules an image ships: the ones `plinth-init` loads by name in stage 2 (engine,
//! power button, release media), the drivers of each platform an image declares
//! (`[kernel] platforms`) and the network modules of Swarm. The builder ships the closure
//! (`depends=` and soft dependencies) of these plus the initramfs set
//! ([`crate::initramfs::MODULES`]) and the definition's `[kernel] modules` and
//! `include-modules`; every other module of the kernel package stays out of the image. One list
//! each, so that what ships and what stage 2 loads cannot drift apart.
//!
//! Names are checked against Debian bookworm's `linux-image-6.1.0-*-cloud-amd64`; where a name
//! is not a module of that kernel the comment says so (it is a module of Debian's generic
//! `linux-image-amd64`, which bare metal wants). A platform module the kernel does not ship is
//! reported by the builder as a note, not an error.

use serde::{Deserialize, Serialize};

/// Modules the container engine needs (overlay storage, bridge networking, nftables NAT); stage 2
/// loads them at every boot.
pub const ENGINE: &[&str] = &[
    "overlay",
    "bridge",
    "br_netfilter",
    "veth",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nf_nat",
    "xt_MASQUERADE",
    "xt_nat",
    "xt_conntrack",
    "xt_addrtype",
    "xt_tcpudp",
];

/// Filesystems of offline release media (`plinth-update apply --from /dev/…`): FAT with its
/// default code pages, and ISO 9660 (ext4 is built into the kernel). Loaded at every boot.
pub const MEDIA: &[&str] = &["vfat", "nls_cp437", "nls_utf8", "nls_ascii", "isofs"];

/// Modules for the ACPI power button and its input events. Loaded at every boot.
pub const POWER_BUTTON: &[&str] = &["button", "evdev"];

/// What Docker's Swarm mode needs beyond [`ENGINE`]: VXLAN overlay networks, IPVS service load
/// balancing, conntrack over netlink, encrypted overlays (ESP/xfrm), VLANs and the macvlan and
/// ipvlan network drivers. Shipped in every image; a swarm node loads [`SWARM`], the others are
/// loaded when named in `[kernel] modules`.
pub const NETWORK: &[&str] = &[
    "vxlan",
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_sh",
    "xt_ipvs",
    "xt_mark",
    "xt_multiport",
    "xt_REDIRECT",
    "nf_conntrack_netlink",
    "esp4",
    "xfrm_user",
    "8021q",
    "macvlan",
    "ipvlan",
];

/// What a node of a Docker Swarm loads besides [`ENGINE`] when `[swarm]` is declared: VXLAN
/// overlay networks (with their UDP tunnel helpers), IPVS load balancing of the routing mesh,
/// the marks and conntrack netlink it uses, the `REDIRECT` target of each task's published
/// ports, and the `u32` match of encrypted overlays. Shipped
/// in every image (user data may declare `[swarm]` on an image that does not), loaded by
/// plinth-init only on a swarm node.
pub const SWARM: &[&str] = &[
    "vxlan",
    "udp_tunnel",
    "ip6_udp_tunnel",
    "ip_vs",
    "ip_vs_rr",
    "xt_ipvs",
    "xt_mark",
    "xt_REDIRECT",
    "nf_conntrack_netlink",
    "xt_u32",
];

/// The modules a definition asks stage 2 to load besides Plinth's own: [`SWARM`] when `[swarm]`
/// is declared, then `[kernel] modules`.
pub fn declared(def: &crate::Definition) -> Vec<String> {
    let swarm = def.swarm.as_ref().map_or(&[][..], |_| SWARM);
    swarm
        .iter()
        .map(|m| (*m).to_owned())
        .chain(def.kernel.modules.iter().cloned())
        .collect()
}

/// A machine family an image boots on (`[kernel] platforms`): its drivers ship in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Platform {
    /// QEMU/KVM and other virtio machines (also what `plinth run` boots).
    Qemu,
    /// Amazon EC2 (Nitro: ENA and NVMe; Xen instances: blkfront and netfront).
    Aws,
    /// Google Compute Engine (gVNIC, virtio).
    Gcp,
    /// Microsoft Azure and Hyper-V (VMBus devices, accelerated networking).
    Azure,
    /// Physical machines: SATA/PATA and SCSI disks, common NICs, USB input and storage.
    Metal,
}

/// The platforms of an image whose definition has no `[kernel] platforms`.
pub const DEFAULT_PLATFORMS: &[Platform] = &[Platform::Qemu];

impl Platform {
    /// Every platform, in the order the documentation lists them.
    pub const ALL: [Platform; 5] = [
        Platform::Qemu,
        Platform::Aws,
        Platform::Gcp,
        Platform::Azure,
        Platform::Metal,
    ];

    /// The name written in `[kernel] platforms`.
    pub fn name(self) -> &'static str {
        match self {
            Platform::Qemu => "qemu",
            Platform::Aws => "aws",
            Platform::Gcp => "gcp",
            Platform::Azure => "azure",
            Platform::Metal => "metal",
        }
    }

    /// The driver modules this platform needs besides the initramfs set (which already has the
    /// disk controllers the root may sit behind). Every UEFI platform has `efi_pstore`, which
    /// keeps the kernel's last messages before a crash in EFI variables.
    pub fn modules(self) -> &'static [&'static str] {
        match self {
            Platform::Qemu => &[
                "efi_pstore",
                "virtio_pci",
                "virtio_mmio",
                "virtio_blk",
                "virtio_net",
                "virtio_scsi",
                "virtio_console",
                "virtio_rng",
                "virtio_balloon",
                "qemu_fw_cfg",
                "pvpanic_pci",
                "ptp_kvm",
                "sr_mod",
                "ata_piix",
                "ata_generic",
                // Not modules of the cloud kernel (e1000/e1000e NICs, AHCI disks): generic kernel.
                "e1000",
                "e1000e",
                "ahci",
            ],
            Platform::Aws => &[
                "efi_pstore",
                "ena",
                "xen_blkfront",
                "xen_netfront",
                "ixgbevf",
                "ptp_kvm",
                "pvpanic",
            ],
            Platform::Gcp => &[
                "efi_pstore",
                "gve",
                "virtio_pci",
                "virtio_net",
                "virtio_scsi",
                "virtio_blk",
                "virtio_rng",
                "virtio_balloon",
                "pvpanic",
            ],
            Platform::Azure => &[
                "efi_pstore",
                "hv_vmbus",
                "hv_storvsc",
                "hv_netvsc",
                "hv_utils",
                "hv_balloon",
                "hv_sock",
                "hyperv_keyboard",
                "hid_hyperv",
                "mlx5_core",
                "mlx4_en",
                "mana",
            ],
            Platform::Metal => &[
                "efi_pstore",
                "ata_piix",
                "ata_generic",
                "sr_mod",
                "sg",
                "hid_generic",
                "mlx5_core",
                "mlx4_en",
                // Not modules of the cloud kernel: the generic kernel's disks, NICs and USB.
                "ahci",
                "megaraid_sas",
                "mpt3sas",
                "e1000e",
                "igb",
                "igc",
                "ixgbe",
                "i40e",
                "ice",
                "bnxt_en",
                "tg3",
                "r8169",
                "xhci_pci",
                "ehci_pci",
                "usb_storage",
                "uas",
                "usbhid",
            ],
        }
    }
}

/// The modules stage 2 loads by name at every boot: [`ENGINE`], [`POWER_BUTTON`], [`MEDIA`].
pub fn stage2_loaded() -> Vec<&'static str> {
    let mut out = ENGINE.to_vec();
    out.extend(POWER_BUTTON);
    out.extend(MEDIA);
    out
}

/// The modules Plinth itself needs in every image, whatever the platforms: the initramfs set,
/// [`stage2_loaded`], [`NETWORK`] and [`SWARM`].
pub fn always_shipped() -> Vec<&'static str> {
    let mut out = crate::initramfs::MODULES.to_vec();
    out.extend(stage2_loaded());
    out.extend(NETWORK);
    out.extend(SWARM);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_module_names_unique_per_list() {
        let mut lists: Vec<(&str, &[&str])> = vec![
            ("engine", ENGINE),
            ("media", MEDIA),
            ("power button", POWER_BUTTON),
            ("network", NETWORK),
            ("swarm", SWARM),
        ];
        for platform in Platform::ALL {
            lists.push((platform.name(), platform.modules()));
        }
        for (list, names) in lists {
            let mut seen = std::collections::BTreeSet::new();
            for name in names {
                assert!(seen.insert(*name), "{name} listed twice in {list}");
                assert!(
                    crate::validate::module_name(name).is_ok() && !name.contains('-'),
                    "{list}: {name} is not a module name spelled with `_`"
                );
            }
        }
    }

    #[test]
    fn swarm_modules_are_loaded_only_on_a_swarm_node() {
        let plain = crate::Definition::parse(
            "t.toml",
            "[image]\nname = \"a\"\nversion = \"1\"\n[kernel]\nmodules = [\"vfio\"]\n",
        )
        .expect("parses");
        assert_eq!(declared(&plain), ["vfio"]);
        let swarm = crate::Definition::parse(
            "t.toml",
            "[image]\nname = \"a\"\nversion = \"1\"\n[kernel]\nmodules = [\"vfio\"]\n[swarm]\nrole = \"manager\"\ninit = true\n",
        )
        .expect("parses");
        let loaded = declared(&swarm);
        assert_eq!(loaded.len(), SWARM.len() + 1);
        for name in [
            "vxlan",
            "ip_vs",
            "ip_vs_rr",
            "xt_ipvs",
            "nf_conntrack_netlink",
            "vfio",
        ] {
            assert!(loaded.iter().any(|m| m == name), "{name}");
        }
    }

    #[test]
    fn platform_names_round_trip_through_toml() {
        #[derive(Deserialize)]
        struct T {
            p: Vec<Platform>,
        }
        let names: Vec<String> = Platform::ALL
            .iter()
            .map(|p| format!("\"{}\"", p.name()))
            .collect();
        let t: T = toml::from_str(&format!("p = [{}]", names.join(", "))).expect("parse");
        assert_eq!(t.p, Platform::ALL.to_vec());
        assert!(toml::from_str::<T>("p = [\"vmware\"]").is_err());
        assert!(always_shipped().contains(&"dm_verity"));
        assert!(always_shipped().contains(&"vxlan"));
        assert!(always_shipped().contains(&"xt_u32"));
        assert_eq!(stage2_loaded().len(), ENGINE.len() + 2 + MEDIA.len());
    }
}
