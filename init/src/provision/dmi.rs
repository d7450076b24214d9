//! Which platform the machine runs on, from the DMI (SMBIOS) attributes the kernel exposes.

use std::path::Path;

use super::Platform;

/// Azure's chassis asset tag, on every Azure VM.
const AZURE_ASSET_TAG: &str = "7783-7084-3265-9085-8269-3286-77";

/// The DMI attributes that tell platforms apart, trimmed; empty when missing or unreadable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dmi {
    /// System manufacturer (`Amazon EC2`, `Google`, `QEMU`).
    pub sys_vendor: String,
    /// Product name (`Google Compute Engine`, `OpenStack Nova`).
    pub product_name: String,
    /// System UUID (`ec2…` on EC2; readable by root only).
    pub product_uuid: String,
    /// BIOS vendor (`Amazon EC2`, `Xen`).
    pub bios_vendor: String,
    /// Board manufacturer.
    pub board_vendor: String,
    /// Board asset tag.
    pub board_asset_tag: String,
    /// Chassis asset tag (Azure's fixed tag).
    pub chassis_asset_tag: String,
}

impl Dmi {
    /// Reads the attributes from `dir` (`/sys/class/dmi/id`); a missing one stays empty.
    pub fn read(dir: &Path) -> Dmi {
        let get = |name: &str| {
            std::fs::read(dir.join(name))
                .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
                .unwrap_or_default()
        };
        Dmi {
            sys_vendor: get("sys_vendor"),
            product_name: get("product_name"),
            product_uuid: get("product_uuid"),
            bios_vendor: get("bios_vendor"),
            board_vendor: get("board_vendor"),
            board_asset_tag: get("board_asset_tag"),
            chassis_asset_tag: get("chassis_asset_tag"),
        }
    }
}

/// The platform `dmi` names. The clouds come before QEMU: they run on KVM and some of them
/// (OpenStack, EC2 in tests with `-smbios`) keep QEMU's other strings.
pub fn classify(dmi: &Dmi) -> Platform {
    let starts_ec2 = |s: &str| s.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ec2"));
    if dmi.sys_vendor == "Microsoft Corporation" && dmi.chassis_asset_tag == AZURE_ASSET_TAG {
        Platform::Azure
    } else if dmi.sys_vendor == "Google" || dmi.product_name == "Google Compute Engine" {
        Platform::Gce
    } else if dmi.sys_vendor == "Amazon EC2"
        || dmi.bios_vendor == "Amazon EC2"
        || dmi.board_vendor == "Amazon EC2"
        || starts_ec2(&dmi.product_uuid)
        || starts_ec2(&dmi.board_asset_tag)
    {
        Platform::Ec2
    } else if ["OpenStack Nova", "OpenStack Compute"]
        .iter()
        .any(|name| dmi.product_name == *name || dmi.chassis_asset_tag == *name)
    {
        Platform::OpenStack
    } else if dmi.sys_vendor == "QEMU" {
        Platform::Qemu
    } else {
        Platform::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/sys/class/dmi/id` holding `attributes`.
    fn tree(attributes: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, value) in attributes {
            std::fs::write(dir.path().join(name), format!("{value}\n")).expect("write");
        }
        dir
    }

    #[test]
    fn every_platform_is_told_from_its_dmi_tree() {
        let cases: &[(&[(&str, &str)], Platform)] = &[
            (
                &[
                    ("sys_vendor", "Amazon EC2"),
                    ("product_name", "t3.micro"),
                    ("bios_vendor", "Amazon EC2"),
                ],
                Platform::Ec2,
            ),
            // QEMU tests: `-smbios type=1,manufacturer=Amazon EC2,product=…` only.
            (
                &[("sys_vendor", "Amazon EC2"), ("bios_vendor", "SeaBIOS")],
                Platform::Ec2,
            ),
            // Xen-based EC2.
            (
                &[
                    ("sys_vendor", "Xen"),
                    ("bios_vendor", "Xen"),
                    ("product_uuid", "EC2E1916-9099-7CAF-FD21-012345ABCDEF"),
                ],
                Platform::Ec2,
            ),
            (
                &[
                    ("sys_vendor", "Google"),
                    ("product_name", "Google Compute Engine"),
                ],
                Platform::Gce,
            ),
            (&[("sys_vendor", "Google")], Platform::Gce),
            (
                &[
                    ("sys_vendor", "Microsoft Corporation"),
                    ("product_name", "Virtual Machine"),
                    ("chassis_asset_tag", AZURE_ASSET_TAG),
                ],
                Platform::Azure,
            ),
            // Hyper-V outside Azure.
            (
                &[
                    ("sys_vendor", "Microsoft Corporation"),
                    ("product_name", "Virtual Machine"),
                ],
                Platform::Other,
            ),
            (
                &[
                    ("sys_vendor", "OpenStack Foundation"),
                    ("product_name", "OpenStack Nova"),
                ],
                Platform::OpenStack,
            ),
            (
                &[
                    ("sys_vendor", "QEMU"),
                    ("product_name", "OpenStack Compute"),
                ],
                Platform::OpenStack,
            ),
            (
                &[
                    ("sys_vendor", "QEMU"),
                    ("product_name", "Standard PC (Q35 + ICH9, 2009)"),
                    ("product_uuid", "e2c5a6b0-0000-0000-0000-000000000000"),
                ],
                Platform::Qemu,
            ),
            (&[("sys_vendor", "Dell Inc.")], Platform::Other),
            (&[], Platform::Other),
        ];
        for (attributes, want) in cases {
            let dir = tree(attributes);
            let env = super::super::Env {
                dmi: dir.path().to_owned(),
                ..Default::default()
            };
            assert_eq!(super::super::detect_platform(&env), *want, "{attributes:?}");
        }
    }

    #[test]
    fn a_missing_dmi_folder_is_other() {
        let dmi = Dmi::read(Path::new("/nonexistent/dmi/id"));
        assert_eq!(dmi, Dmi::default());
        assert_eq!(classify(&dmi), Platform::Other);
    }
}
