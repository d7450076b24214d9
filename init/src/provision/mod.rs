//! Instance data from the platform the machine runs on: which cloud or hypervisor it is (from
//! DMI), then its host name and raw user data from a local source (QEMU `fw_cfg`, a NoCloud
//! `cidata` volume, an OpenStack `config-2` drive) or, once the network is up, the platform's
//! metadata service (EC2, GCE, Azure). A NoCloud volume's `network-config` (version 1 or 2) and a
//! config drive's `network_data.json` may also give static IPv4 settings for the first Ethernet
//! interface, checked like a definition's `[network]`; the other sources leave the network to
//! DHCP. Only bytes and those settings are found here: parsing and applying the user data, and
//! configuring the network, is the caller's. Nothing here is fatal to boot: every failure is a
//! returned error or a logged line (an unreadable network file is logged, and DHCP used).

mod azure;
mod dmi;
pub mod label;
mod local;
mod metadata;
mod network_config;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

pub use azure::{goal_state, health_report, GoalState};
pub use dmi::{classify, Dmi};
pub use local::{
    parse_config_drive_meta, parse_nocloud_meta, read_config_drive, read_config_drive_network,
    read_fw_cfg, read_nocloud, read_nocloud_network,
};
pub use network_config::{netmask_prefix, parse_network_config, parse_network_data};

/// Largest user data accepted, in bytes (1 MiB).
pub const USER_DATA_LIMIT: u64 = 1 << 20;

/// The fw_cfg file QEMU is given user data in, as `plinth run --user-data` names it.
pub use os_config::userdata::FW_CFG_USER_DATA;

/// The platform the machine runs on, as its DMI tables tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// QEMU/KVM outside any cloud named here.
    Qemu,
    /// Amazon EC2 (Nitro or Xen).
    Ec2,
    /// Google Compute Engine.
    Gce,
    /// Microsoft Azure.
    Azure,
    /// OpenStack Nova.
    OpenStack,
    /// Anything else (bare metal, another hypervisor).
    Other,
}

impl Platform {
    /// The platform's name for logs and status lines.
    pub fn name(&self) -> &'static str {
        match self {
            Platform::Qemu => "qemu",
            Platform::Ec2 => "ec2",
            Platform::Gce => "gce",
            Platform::Azure => "azure",
            Platform::OpenStack => "openstack",
            Platform::Other => "other",
        }
    }
}

/// What a source holds for this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Where it came from: `fw_cfg`, `nocloud`, `config-2`, `ec2`, `gce` or `azure`.
    pub source: &'static str,
    /// The host name from the source's meta data: its first label, checked to be a valid host
    /// name (an invalid one is dropped with a log line).
    pub hostname: Option<String>,
    /// The raw user data, at most [`USER_DATA_LIMIT`] bytes.
    pub user_data: Option<Vec<u8>>,
    /// Static IPv4 settings for the first Ethernet interface (`mode = "static"`, checked like a
    /// definition's `[network]`) from a NoCloud `network-config` or a config drive's
    /// `network_data.json`; `None`: DHCP, as for every other source.
    pub network: Option<os_config::definition::Network>,
}

/// Every path and address the sources are read from, overridable for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// DMI attributes (`/sys/class/dmi/id`).
    pub dmi: PathBuf,
    /// QEMU fw_cfg files by name (`/sys/firmware/qemu_fw_cfg/by_name`).
    pub fw_cfg: PathBuf,
    /// Block devices (`/sys/class/block`).
    pub sys_block: PathBuf,
    /// Device nodes (`/dev`).
    pub dev: PathBuf,
    /// Where a labelled volume is mounted while it is read (`/run/plinth/provision`).
    pub mount_root: PathBuf,
    /// The instance metadata service of EC2, GCE and Azure (`169.254.169.254:80`).
    pub metadata: SocketAddr,
    /// Azure's wireserver, told when the machine is ready (`168.63.129.16:80`).
    pub wireserver: SocketAddr,
    /// How long one connection, or a pause in an answer, may take.
    pub timeout: Duration,
    /// How long a service that does not answer yet is asked again, in all.
    pub retry_for: Duration,
    /// The pause between two tries.
    pub retry_pause: Duration,
}

impl Default for Env {
    fn default() -> Env {
        Env {
            dmi: PathBuf::from("/sys/class/dmi/id"),
            fw_cfg: PathBuf::from("/sys/firmware/qemu_fw_cfg/by_name"),
            sys_block: PathBuf::from("/sys/class/block"),
            dev: PathBuf::from("/dev"),
            mount_root: PathBuf::from("/run/plinth/provision"),
            metadata: SocketAddr::from(([169, 254, 169, 254], 80)),
            wireserver: SocketAddr::from(([168, 63, 129, 16], 80)),
            timeout: Duration::from_secs(2),
            retry_for: Duration::from_secs(10),
            retry_pause: Duration::from_millis(500),
        }
    }
}

/// The platform the DMI tables under `env.dmi` name; [`Platform::Other`] if they are missing.
pub fn detect_platform(env: &Env) -> Platform {
    classify(&Dmi::read(&env.dmi))
}

/// Local sources first (no network): fw_cfg `opt/plinth/user-data`, then a volume labelled
/// `cidata` (NoCloud, vfat or iso9660, any case) or `config-2` (OpenStack config drive).
/// `Ok(None)`: none is there.
pub fn find_local(env: &Env) -> Result<Option<Found>> {
    if let Some(found) = read_fw_cfg(&env.fw_cfg)? {
        return Ok(Some(found));
    }
    local::find_volume(env)
}

/// Whether [`find_network`] asks a metadata service on `platform` (EC2, GCE, Azure). OpenStack's
/// is not asked: its config drive is the source.
pub fn needs_network(platform: Platform) -> bool {
    matches!(platform, Platform::Ec2 | Platform::Gce | Platform::Azure)
}

/// The platform's metadata service, asked after the network is up; `Ok(None)` for a platform
/// without one ([`needs_network`] false).
pub fn find_network(env: &Env, platform: Platform) -> Result<Option<Found>> {
    match platform {
        Platform::Ec2 => metadata::ec2(env).map(Some),
        Platform::Gce => metadata::gce(env).map(Some),
        Platform::Azure => metadata::azure(env).map(Some),
        Platform::Qemu | Platform::OpenStack | Platform::Other => Ok(None),
    }
}

/// Azure only: tells the wireserver the machine is ready; until then Azure considers the
/// provisioning unfinished. Call after provisioning.
pub fn azure_report_ready(env: &Env) -> Result<()> {
    azure::report_ready(env)
}

/// The host name `raw` from `source`'s meta data names, as this machine's: lowercase, its first
/// label; `None` (with a log line) when that is not a valid host name.
pub fn sanitize_hostname(source: &str, raw: &str) -> Option<String> {
    let lower = raw.trim().to_ascii_lowercase();
    let label = lower.split('.').next().unwrap_or_default();
    match os_config::validate::hostname(label) {
        Ok(()) => Some(label.to_owned()),
        Err(e) => {
            crate::info!("{source}: host name {raw:?} dropped: {e}");
            None
        }
    }
}

/// An error naming `what` and `len` unless user data of `len` bytes fits in [`USER_DATA_LIMIT`].
fn check_size(what: &str, len: u64) -> Result<()> {
    if len > USER_DATA_LIMIT {
        anyhow::bail!(
            "{what}: user data of {len} bytes is larger than the limit of {USER_DATA_LIMIT} bytes"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_lowercased_cut_to_their_first_label_and_checked() {
        for (raw, want) in [
            ("ip-10-0-0-1.ec2.internal", Some("ip-10-0-0-1")),
            ("MyVM", Some("myvm")),
            ("  web-1\n", Some("web-1")),
            ("vm.c.project.internal", Some("vm")),
            ("-bad", None),
            ("bad-", None),
            ("under_score", None),
            ("", None),
            (".lead", None),
            (&"a".repeat(64), None),
        ] {
            assert_eq!(sanitize_hostname("test", raw).as_deref(), want, "{raw:?}");
        }
        assert_eq!(
            sanitize_hostname("test", &"a".repeat(63)),
            Some("a".repeat(63))
        );
    }

    #[test]
    fn only_clouds_with_a_metadata_service_need_the_network() {
        for (platform, want) in [
            (Platform::Ec2, true),
            (Platform::Gce, true),
            (Platform::Azure, true),
            (Platform::OpenStack, false),
            (Platform::Qemu, false),
            (Platform::Other, false),
        ] {
            assert_eq!(needs_network(platform), want, "{}", platform.name());
        }
        let env = Env::default();
        assert_eq!(find_network(&env, Platform::Qemu).expect("none"), None);
        assert_eq!(find_network(&env, Platform::OpenStack).expect("none"), None);
    }

    #[test]
    fn the_size_limit_names_the_size() {
        assert!(check_size("x", USER_DATA_LIMIT).is_ok());
        let err = check_size("fw_cfg", USER_DATA_LIMIT + 1).expect_err("too large");
        assert!(
            err.to_string().contains("1048577 bytes") && err.to_string().contains("fw_cfg"),
            "{err}"
        );
    }
}
