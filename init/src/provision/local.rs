//! The sources on the machine itself: QEMU's fw_cfg, and a labelled volume (NoCloud `cidata`,
//! OpenStack `config-2`) that is mounted read-only for as long as its files are read.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rustix::mount::{MountFlags, UnmountFlags};

use os_config::definition::Network;

use super::label::{read_label, VolumeFs};
use super::network_config::{parse_network_config, parse_network_data};
use super::{sanitize_hostname, Env, Found, FW_CFG_USER_DATA, USER_DATA_LIMIT};

/// Largest meta data file read.
const META_DATA_LIMIT: u64 = 64 * 1024;

/// Block devices never holding a labelled volume of interest: loop, RAM and device-mapper ones.
const SKIPPED_DEVICES: &[&str] = &["loop", "ram", "zram", "dm-"];

/// Which kind of labelled volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// NoCloud, label `cidata`.
    NoCloud,
    /// OpenStack config drive, label `config-2`.
    ConfigDrive,
}

/// A block device holding a labelled volume.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Volume {
    /// The name in `/sys/class/block` (`vdb`, `sr0`).
    name: String,
    device: PathBuf,
    fs: VolumeFs,
    kind: Kind,
}

/// Reads `path` whole if it is there, at most `limit` bytes (more is an error naming the size).
fn read_limited(path: &Path, limit: u64) -> Result<Option<Vec<u8>>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let mut data = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading {}", path.display()))?;
    if data.len() as u64 > limit {
        let size = std::fs::metadata(path).map_or(0, |m| m.len());
        let size = if size > limit {
            format!("{size} bytes")
        } else {
            format!("more than {limit} bytes")
        };
        bail!(
            "{} holds {size}, more than the limit of {limit} bytes",
            path.display()
        );
    }
    Ok(Some(data))
}

/// User data at `path`, at most [`USER_DATA_LIMIT`] bytes.
fn read_user_data(path: &Path) -> Result<Option<Vec<u8>>> {
    read_limited(path, USER_DATA_LIMIT)
}

/// User data given to QEMU as fw_cfg file `opt/plinth/user-data`, from `by_name`
/// (`/sys/firmware/qemu_fw_cfg/by_name`, the `qemu_fw_cfg` module loaded by the caller).
pub fn read_fw_cfg(by_name: &Path) -> Result<Option<Found>> {
    let path = by_name.join(FW_CFG_USER_DATA).join("raw");
    let data = read_user_data(&path).context("fw_cfg")?;
    Ok(data.map(|data| Found {
        source: "fw_cfg",
        hostname: None,
        user_data: Some(data),
        network: None,
    }))
}

/// The host name in a NoCloud `meta-data` text: the value of its top-level `local-hostname:`
/// line, else of `hostname:`, quotes removed.
pub fn parse_nocloud_meta(text: &str) -> Option<String> {
    let value = |key: &str| {
        text.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            (k == key).then(|| {
                let v = v.split(" #").next().unwrap_or_default().trim();
                let unquoted = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                    .unwrap_or(v);
                unquoted.to_owned()
            })
        })
    };
    value("local-hostname")
        .or_else(|| value("hostname"))
        .filter(|v| !v.is_empty())
}

/// The host name in an OpenStack `meta_data.json`: `hostname`, else `name`.
pub fn parse_config_drive_meta(text: &str) -> Result<Option<String>> {
    let json: serde_json::Value =
        serde_json::from_str(text).context("meta_data.json is not JSON")?;
    Ok(["hostname", "name"]
        .iter()
        .find_map(|key| json.get(key).and_then(|v| v.as_str()))
        .map(str::to_owned))
}

/// A meta data file's text, if it is there.
fn read_meta(path: &Path) -> Result<Option<String>> {
    let Some(bytes) = read_limited(path, META_DATA_LIMIT)? else {
        return Ok(None);
    };
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| anyhow::anyhow!("{} is not UTF-8", path.display()))
}

/// The network settings in the file at `path` read by `parse`, if the file is there; an error
/// names the file.
fn read_network(
    path: &Path,
    parse: fn(&str) -> Result<Option<Network>>,
) -> Result<Option<Network>> {
    match read_meta(path)? {
        Some(text) => parse(&text).with_context(|| format!("reading {}", path.display())),
        None => Ok(None),
    }
}

/// The static network settings in a NoCloud volume's `network-config` in `dir` (cloud-init
/// network config version 1 or 2); `None` for DHCP or no file.
pub fn read_nocloud_network(dir: &Path) -> Result<Option<Network>> {
    read_network(&dir.join("network-config"), parse_network_config)
}

/// The static network settings in a config drive's `openstack/latest/network_data.json` in
/// `dir`; `None` for DHCP or no file.
pub fn read_config_drive_network(dir: &Path) -> Result<Option<Network>> {
    read_network(
        &dir.join("openstack/latest/network_data.json"),
        parse_network_data,
    )
}

/// `network` read from `source`; a failure is logged and DHCP (`None`) used, so that the host
/// name and user data still apply.
fn network_or_dhcp(source: &str, network: Result<Option<Network>>) -> Option<Network> {
    network.unwrap_or_else(|e| {
        crate::info!("{source}: {e:#}; the network is configured by DHCP");
        None
    })
}

/// A NoCloud volume's files in `dir`: `meta-data` (the host name), `user-data` and
/// `network-config` (see [`read_nocloud_network`]; unreadable, it is logged and DHCP used).
pub fn read_nocloud(dir: &Path) -> Result<Found> {
    let meta = read_meta(&dir.join("meta-data"))?;
    let hostname = meta
        .as_deref()
        .and_then(parse_nocloud_meta)
        .and_then(|raw| sanitize_hostname("nocloud", &raw));
    Ok(Found {
        source: "nocloud",
        hostname,
        user_data: read_user_data(&dir.join("user-data"))?,
        network: network_or_dhcp("nocloud", read_nocloud_network(dir)),
    })
}

/// An OpenStack config drive's files in `dir`: `openstack/latest/meta_data.json` (the host name),
/// `openstack/latest/user_data` and `openstack/latest/network_data.json` (see
/// [`read_config_drive_network`]; unreadable, it is logged and DHCP used).
pub fn read_config_drive(dir: &Path) -> Result<Found> {
    let latest = dir.join("openstack/latest");
    let meta_path = latest.join("meta_data.json");
    let hostname = match read_meta(&meta_path)? {
        Some(text) => parse_config_drive_meta(&text)
            .with_context(|| format!("reading {}", meta_path.display()))?,
        None => None,
    }
    .and_then(|raw| sanitize_hostname("config-2", &raw));
    Ok(Found {
        source: "config-2",
        hostname,
        user_data: read_user_data(&latest.join("user_data"))?,
        network: network_or_dhcp("config-2", read_config_drive_network(dir)),
    })
}

/// The labelled volumes among the block devices, NoCloud ones first, each kind in name order.
fn scan(env: &Env) -> Vec<Volume> {
    let mut names: Vec<String> = match std::fs::read_dir(&env.sys_block) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) => {
            crate::info!("listing {}: {e}", env.sys_block.display());
            return Vec::new();
        }
    };
    names.sort();
    let mut volumes = Vec::new();
    for name in names {
        if SKIPPED_DEVICES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        // An empty drive (a CD-ROM without a disc) has size 0.
        let size = std::fs::read_to_string(env.sys_block.join(&name).join("size"));
        if size.is_ok_and(|s| s.trim() == "0") {
            continue;
        }
        let device = env.dev.join(&name);
        let label = std::fs::File::open(&device).and_then(|mut f| read_label(&mut f));
        let (fs, label) = match label {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(e) => {
                crate::info!("reading the label of {}: {e}", device.display());
                continue;
            }
        };
        let kind = if label.eq_ignore_ascii_case("cidata") {
            Kind::NoCloud
        } else if label.eq_ignore_ascii_case("config-2") {
            Kind::ConfigDrive
        } else {
            continue;
        };
        volumes.push(Volume {
            name,
            device,
            fs,
            kind,
        });
    }
    volumes.sort_by_key(|v| v.kind != Kind::NoCloud);
    volumes
}

/// The first labelled volume's instance data, if there is one.
pub fn find_volume(env: &Env) -> Result<Option<Found>> {
    let Some(volume) = scan(env).into_iter().next() else {
        return Ok(None);
    };
    crate::info!(
        "instance data volume {} ({}, label {})",
        volume.device.display(),
        volume.fs.fstype(),
        match volume.kind {
            Kind::NoCloud => "cidata",
            Kind::ConfigDrive => "config-2",
        }
    );
    let mount = Mounted::mount(
        &volume.device,
        &env.mount_root.join(&volume.name),
        volume.fs,
    )?;
    let found = match volume.kind {
        Kind::NoCloud => read_nocloud(mount.path()),
        Kind::ConfigDrive => read_config_drive(mount.path()),
    };
    if let Err(e) = mount.close() {
        crate::info!("{e:#}");
    }
    found.map(Some)
}

/// A volume mounted read-only while its files are read; unmounted by [`Mounted::close`] or,
/// failing that, when dropped. A mount point that stays mounted is never removed.
#[derive(Debug)]
struct Mounted {
    dir: PathBuf,
    /// False once unmounted.
    mounted: bool,
}

impl Mounted {
    /// Mounts `device` as `fs` on `dir` (created), read-only, without devices, setuid or
    /// executables.
    fn mount(device: &Path, dir: &Path, fs: VolumeFs) -> Result<Mounted> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the mount point {}", dir.display()))?;
        let flags =
            MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        if let Err(e) = rustix::mount::mount(device, dir, fs.fstype(), flags, "") {
            let _ = std::fs::remove_dir(dir);
            bail!(
                "mounting {} ({}) on {}: {e}",
                device.display(),
                fs.fstype(),
                dir.display()
            );
        }
        Ok(Mounted {
            dir: dir.to_owned(),
            mounted: true,
        })
    }

    /// The mounted volume's top folder.
    fn path(&self) -> &Path {
        &self.dir
    }

    /// Unmounts the volume and removes the (then empty) mount point.
    fn close(mut self) -> Result<()> {
        rustix::mount::unmount(&self.dir, UnmountFlags::empty())
            .with_context(|| format!("unmounting {}", self.dir.display()))?;
        self.mounted = false;
        std::fs::remove_dir(&self.dir).with_context(|| format!("removing {}", self.dir.display()))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = rustix::mount::unmount(&self.dir, UnmountFlags::DETACH) {
                crate::info!("unmounting {}: {e}", self.dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fw_cfg_user_data_is_read_from_its_by_name_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_fw_cfg(dir.path()).expect("none"), None);
        let file = dir.path().join("opt/plinth/user-data");
        std::fs::create_dir_all(&file).expect("mkdir");
        std::fs::write(file.join("raw"), b"[network]\n").expect("write");
        assert_eq!(
            read_fw_cfg(dir.path()).expect("found"),
            Some(Found {
                source: "fw_cfg",
                hostname: None,
                user_data: Some(b"[network]\n".to_vec()),
                network: None,
            })
        );
        let env = Env {
            fw_cfg: dir.path().to_owned(),
            sys_block: dir.path().join("no-block"),
            ..Env::default()
        };
        assert_eq!(
            super::super::find_local(&env)
                .expect("found")
                .map(|f| f.source),
            Some("fw_cfg")
        );
    }

    #[test]
    fn user_data_over_the_limit_is_an_error_naming_its_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("opt/plinth/user-data");
        std::fs::create_dir_all(&file).expect("mkdir");
        std::fs::write(file.join("raw"), vec![b'x'; USER_DATA_LIMIT as usize + 5]).expect("write");
        let err = format!("{:#}", read_fw_cfg(dir.path()).expect_err("too large"));
        assert!(
            err.contains("1048581 bytes")
                && err.contains("limit of 1048576")
                && err.contains("raw"),
            "{err}"
        );
    }

    #[test]
    fn nocloud_meta_data_gives_the_host_name() {
        for (text, want) in [
            ("instance-id: i-1\nlocal-hostname: web-1\n", Some("web-1")),
            (
                "local-hostname: \"Quoted.Example.COM\"\n",
                Some("Quoted.Example.COM"),
            ),
            ("hostname: 'single'\n", Some("single")),
            ("hostname: b\nlocal-hostname: a\n", Some("a")),
            ("local-hostname: c # comment\n", Some("c")),
            ("  local-hostname: nested\n", None),
            ("instance-id: i-1\n", None),
            ("local-hostname:\n", None),
            ("", None),
        ] {
            assert_eq!(parse_nocloud_meta(text).as_deref(), want, "{text:?}");
        }
    }

    #[test]
    fn config_drive_meta_data_gives_the_host_name() {
        let text = r#"{"uuid": "u", "hostname": "vm-1.novalocal", "name": "vm-1"}"#;
        assert_eq!(
            parse_config_drive_meta(text).expect("json").as_deref(),
            Some("vm-1.novalocal")
        );
        assert_eq!(
            parse_config_drive_meta(r#"{"name": "only-name"}"#)
                .expect("json")
                .as_deref(),
            Some("only-name")
        );
        assert_eq!(parse_config_drive_meta("{}").expect("json"), None);
        assert!(parse_config_drive_meta("hostname: x").is_err());
    }

    #[test]
    fn a_nocloud_folder_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            read_nocloud(dir.path()).expect("empty"),
            Found {
                source: "nocloud",
                hostname: None,
                user_data: None,
                network: None,
            }
        );
        std::fs::write(
            dir.path().join("meta-data"),
            "instance-id: x\nlocal-hostname: Node-7.lan\n",
        )
        .expect("write");
        std::fs::write(dir.path().join("user-data"), "[network]\n").expect("write");
        assert_eq!(
            read_nocloud(dir.path()).expect("read"),
            Found {
                source: "nocloud",
                hostname: Some("node-7".into()),
                user_data: Some(b"[network]\n".to_vec()),
                network: None,
            }
        );
        // An invalid host name is dropped, the user data still read.
        std::fs::write(dir.path().join("meta-data"), "local-hostname: bad_name\n").expect("write");
        let found = read_nocloud(dir.path()).expect("read");
        assert_eq!((found.hostname, found.user_data.is_some()), (None, true));
    }

    #[test]
    fn a_config_drive_folder_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let latest = dir.path().join("openstack/latest");
        std::fs::create_dir_all(&latest).expect("mkdir");
        std::fs::write(
            latest.join("meta_data.json"),
            r#"{"hostname": "vm-1.novalocal"}"#,
        )
        .expect("write");
        std::fs::write(latest.join("user_data"), b"data").expect("write");
        assert_eq!(
            read_config_drive(dir.path()).expect("read"),
            Found {
                source: "config-2",
                hostname: Some("vm-1".into()),
                user_data: Some(b"data".to_vec()),
                network: None,
            }
        );
        std::fs::write(latest.join("meta_data.json"), "not json").expect("write");
        let err = format!("{:#}", read_config_drive(dir.path()).expect_err("bad json"));
        assert!(err.contains("meta_data.json"), "{err}");
    }

    #[test]
    fn a_nocloud_folder_gives_its_network_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_nocloud_network(dir.path()).expect("no file"), None);
        std::fs::write(dir.path().join("user-data"), "[network]\n").expect("write");
        std::fs::write(
            dir.path().join("network-config"),
            "version: 2\nethernets:\n  eth0:\n    addresses: [10.0.0.5/24]\n    gateway4: 10.0.0.1\n",
        )
        .expect("write");
        let want = Network {
            mode: os_config::definition::NetworkMode::Static,
            address: Some("10.0.0.5/24".into()),
            gateway: Some("10.0.0.1".into()),
            dns: Vec::new(),
        };
        assert_eq!(read_nocloud(dir.path()).expect("read").network, Some(want));
        // A file that cannot be read names itself and its line; the volume's user data is still
        // read, with DHCP.
        std::fs::write(
            dir.path().join("network-config"),
            "version: 2\nethernets: [eth0\n",
        )
        .expect("write");
        let err = format!("{:#}", read_nocloud_network(dir.path()).expect_err("bad"));
        assert!(err.contains("network-config: line 2:"), "{err}");
        let found = read_nocloud(dir.path()).expect("read");
        assert_eq!((found.network, found.user_data.is_some()), (None, true));
        std::fs::write(
            dir.path().join("network-config"),
            "version: 1\nconfig:\n- type: physical\n  subnets:\n  - type: dhcp\n",
        )
        .expect("write");
        assert_eq!(read_nocloud_network(dir.path()).expect("dhcp"), None);
    }

    #[test]
    fn a_config_drive_folder_gives_its_network_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let latest = dir.path().join("openstack/latest");
        std::fs::create_dir_all(&latest).expect("mkdir");
        assert_eq!(
            read_config_drive_network(dir.path()).expect("no file"),
            None
        );
        std::fs::write(
            latest.join("network_data.json"),
            r#"{"networks": [{"type": "ipv4", "ip_address": "10.0.0.5", "netmask": "255.255.255.0",
                "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.0.0.1"}]}],
                "services": [{"type": "dns", "address": "10.0.0.2"}]}"#,
        )
        .expect("write");
        let want = Network {
            mode: os_config::definition::NetworkMode::Static,
            address: Some("10.0.0.5/24".into()),
            gateway: Some("10.0.0.1".into()),
            dns: vec!["10.0.0.2".into()],
        };
        assert_eq!(
            read_config_drive(dir.path()).expect("read").network,
            Some(want)
        );
        std::fs::write(
            latest.join("network_data.json"),
            r#"{"networks": [{"type": "ipv4_dhcp"}]}"#,
        )
        .expect("write");
        assert_eq!(read_config_drive(dir.path()).expect("read").network, None);
        std::fs::write(
            latest.join("network_data.json"),
            r#"{"networks": [{"type": "ipv4", "ip_address": "10.0.0.5", "netmask": "255.255.0.255"}]}"#,
        )
        .expect("write");
        let err = format!(
            "{:#}",
            read_config_drive_network(dir.path()).expect_err("bad")
        );
        assert!(
            err.contains("network_data.json") && err.contains("not contiguous"),
            "{err}"
        );
        assert_eq!(read_config_drive(dir.path()).expect("read").network, None);
    }

    #[test]
    fn labelled_volumes_are_found_by_scanning_block_devices() {
        let root = tempfile::tempdir().expect("tempdir");
        let sys = root.path().join("sys/class/block");
        let dev = root.path().join("dev");
        std::fs::create_dir_all(&dev).expect("mkdir");
        let mut fat = vec![0u8; 4096];
        fat[0x26] = 0x29;
        fat[0x2B..0x36].copy_from_slice(b"CIDATA     ");
        fat[0x36..0x3E].copy_from_slice(b"FAT16   ");
        let mut iso = vec![0u8; 40 * 1024];
        iso[32 * 1024..32 * 1024 + 7].copy_from_slice(b"\x01CD001\x01");
        iso[32 * 1024 + 40..32 * 1024 + 72].fill(b' ');
        iso[32 * 1024 + 40..32 * 1024 + 48].copy_from_slice(b"config-2");
        for (name, size, bytes) in [
            ("loop0", "8", fat.clone()),
            ("sr0", "0", fat.clone()),
            ("vda", "100", vec![0u8; 4096]),
            ("vdb", "80", iso),
            ("vdc1", "8", fat),
        ] {
            std::fs::create_dir_all(sys.join(name)).expect("mkdir");
            std::fs::write(sys.join(name).join("size"), size).expect("size");
            std::fs::write(dev.join(name), bytes).expect("dev");
        }
        let env = Env {
            sys_block: sys,
            dev: dev.clone(),
            ..Env::default()
        };
        let volumes = scan(&env);
        assert_eq!(
            volumes,
            [
                Volume {
                    name: "vdc1".into(),
                    device: dev.join("vdc1"),
                    fs: VolumeFs::Vfat,
                    kind: Kind::NoCloud,
                },
                Volume {
                    name: "vdb".into(),
                    device: dev.join("vdb"),
                    fs: VolumeFs::Iso9660,
                    kind: Kind::ConfigDrive,
                },
            ]
        );
    }
}
