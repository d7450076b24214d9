//! The image definition: one TOML file describing one OS image.
//!
//! Every table rejects unknown keys; values are parsed into validated types, so a `Definition`
//! that exists is one the builder can use. Cross-field rules are checked by [`Definition::parse`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::diagnostic::DefinitionError;
use crate::units::{ByteSize, Duration, FileMode, Name, Sha256, Version};

/// A whole image definition.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Definition {
    pub image: Image,
    #[serde(default)]
    pub debian: Debian,
    #[serde(default)]
    pub kernel: Kernel,
    #[serde(default)]
    pub engine: Engine,
    #[serde(default)]
    pub disk: Disk,
    #[serde(default)]
    pub network: Network,
    pub update: Option<Update>,
    #[serde(default, rename = "container")]
    pub containers: Vec<Container>,
    #[serde(default, rename = "file")]
    pub files: Vec<File>,
    #[serde(default)]
    pub time: Time,
    /// `[[container-network]]`: user-defined engine networks containers join by name (the key
    /// is not `[[network]]`, which `[network]`, the machine's own interface, already takes).
    #[serde(default, rename = "container-network")]
    pub container_networks: Vec<ContainerNetwork>,
    /// `[swarm]`: the machine's membership of a Docker Swarm [default: none; a node Plinth
    /// joined leaves].
    #[serde(default)]
    pub swarm: Option<Swarm>,
    /// `[[service]]`: Swarm services a manager makes exist as declared.
    #[serde(default, rename = "service")]
    pub services: Vec<Service>,
}

/// `[image]`: identity of the image.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Image {
    /// Short name; used in file names (`out/<name>-<version>.raw`) and update manifests.
    pub name: Name,
    /// OS version; updates only ever move to a higher one.
    pub version: Version,
    /// Host name of the booted machine [default: the image name].
    pub hostname: Option<Name>,
    /// dm-verity protection of the root. Turning it off is only for debugging images.
    #[serde(default = "yes")]
    pub verity: bool,
}

/// `[debian]`: where packages come from and which ones the image takes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Debian {
    /// Release suite; `<suite>-updates` and `<suite>-security` are resolved too.
    #[serde(default = "default_suite")]
    pub suite: String,
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    /// Extra packages whose files go into the image (besides the engine's and the kernel's).
    #[serde(default)]
    pub packages: Vec<String>,
    /// Archive URL [default: $PLINTH_DEBIAN_MIRROR, else the host's apt sources].
    pub mirror: Option<String>,
    /// Archive URL of `<suite>-security` [default: $PLINTH_DEBIAN_SECURITY_MIRROR, else the host's apt sources].
    pub security_mirror: Option<String>,
    /// OpenPGP keyring that signs the archive's `InRelease` [default: the host's Debian archive keyring].
    pub keyring: Option<String>,
}

impl Default for Debian {
    fn default() -> Self {
        Debian {
            suite: default_suite(),
            components: default_components(),
            packages: Vec::new(),
            mirror: None,
            security_mirror: None,
            keyring: None,
        }
    }
}

/// `[kernel]`: the kernel package and its command line.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Kernel {
    #[serde(default = "default_kernel_package")]
    pub package: String,
    /// Arguments appended to the ones Plinth sets (slot, version, root hash).
    #[serde(default = "default_cmdline")]
    pub cmdline: Vec<String>,
    /// Modules loaded at boot besides the ones Plinth needs.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Machine families whose drivers ship in the image [default: `["qemu"]`].
    #[serde(default = "default_platforms")]
    pub platforms: Vec<crate::modules::Platform>,
    /// Modules shipped in the image (with their dependencies) but not loaded at boot.
    #[serde(default)]
    pub include_modules: Vec<String>,
}

impl Default for Kernel {
    fn default() -> Self {
        Kernel {
            package: default_kernel_package(),
            cmdline: default_cmdline(),
            modules: Vec::new(),
            platforms: default_platforms(),
            include_modules: Vec::new(),
        }
    }
}

fn default_platforms() -> Vec<crate::modules::Platform> {
    crate::modules::DEFAULT_PLATFORMS.to_vec()
}

/// Which container engine runs on the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    #[default]
    Docker,
}

/// `[engine]`: the container engine and its settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Engine {
    #[serde(default)]
    pub kind: EngineKind,
    /// Written as the engine's own configuration (`/etc/docker/daemon.json` for Docker).
    #[serde(default)]
    pub settings: toml::Table,
    /// Mutual TLS for the engine's API on [`Engine::tls_listen`]: the CA that signs the clients'
    /// certificates and the engine's own certificate and key. The builder places the files at
    /// [`ENGINE_TLS_IN_IMAGE`].
    #[serde(default)]
    pub tls: Option<EngineTlsFiles>,
    /// The socket address the engine's TLS API listens on when `tls` is set
    /// [default: `0.0.0.0:2376`].
    #[serde(default = "default_tls_listen")]
    pub tls_listen: String,
    /// Accept plain `tcp://` entries in `settings.hosts` without TLS: anyone who reaches the port
    /// is root on the machine. Only for test machines reached through a private forward.
    #[serde(default)]
    pub insecure_tcp: bool,
}

impl Default for Engine {
    fn default() -> Self {
        Engine {
            kind: EngineKind::default(),
            settings: toml::Table::new(),
            tls: None,
            tls_listen: default_tls_listen(),
            insecure_tcp: false,
        }
    }
}

/// `[engine] tls`: PEM files, relative to the definition (or absolute), like
/// `{ ca = "ca.pem", cert = "server.pem", key = "server-key.pem" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EngineTlsFiles {
    /// The CA certificates a client's certificate must chain to.
    pub ca: std::path::PathBuf,
    /// The engine's certificate (chain).
    pub cert: std::path::PathBuf,
    /// The engine's private key.
    pub key: std::path::PathBuf,
}

/// Where the image holds the `[engine] tls` files: `ca.pem`, `cert.pem` and `key.pem`.
pub const ENGINE_TLS_IN_IMAGE: &str = "/usr/lib/plinth/engine-tls";

/// Where `plinth-init` writes the engine's TLS files given by user data (`ca.pem`, `cert.pem`,
/// `key.pem`); they take the place of the image's.
pub const ENGINE_TLS_IN_RUN: &str = "/run/plinth/engine-tls";

/// The names of the three engine TLS files in [`ENGINE_TLS_IN_IMAGE`] and [`ENGINE_TLS_IN_RUN`],
/// with their modes: the key is readable by root only.
pub const ENGINE_TLS_FILES: [(&str, u32); 3] =
    [("ca.pem", 0o644), ("cert.pem", 0o644), ("key.pem", 0o600)];

/// `[time]`: where the machine sets its clock from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Time {
    /// NTP servers: host names or IP addresses, each with an optional `:port`
    /// (`"time.example"`, `"10.0.0.1:123"`, `"[fd00::1]:123"`).
    #[serde(default)]
    pub servers: Vec<String>,
}

/// `[disk]`: partition sizes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Disk {
    #[serde(default = "default_esp")]
    pub esp: ByteSize,
    /// Size of each root slot (A and B).
    #[serde(default = "default_root")]
    pub root: ByteSize,
    /// Size of each verity slot.
    #[serde(default = "default_verity")]
    pub verity: ByteSize,
    /// Initial size of the `state` partition (it grows to fill the disk on first boot).
    #[serde(default = "default_state")]
    pub state: ByteSize,
}

impl Disk {
    /// Bytes of the whole disk image: 1 MiB before the partitions, esp, two root and two verity
    /// slots, state, and 1 MiB after them; `None` if the sum overflows.
    pub fn total_size(&self) -> Option<u64> {
        let alignment = crate::layout::ALIGNMENT;
        [
            self.esp.0,
            self.root.0,
            self.root.0,
            self.verity.0,
            self.verity.0,
            self.state.0,
        ]
        .into_iter()
        .try_fold(2 * alignment, u64::checked_add)
    }
}

impl Default for Disk {
    fn default() -> Self {
        Disk {
            esp: default_esp(),
            root: default_root(),
            verity: default_verity(),
            state: default_state(),
        }
    }
}

/// `[network]`: how the first Ethernet interface is configured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Network {
    /// `dhcp` (default) or `static`.
    #[serde(default)]
    pub mode: NetworkMode,
    /// Static address with prefix, e.g. `"10.0.2.15/24"`.
    pub address: Option<String>,
    pub gateway: Option<String>,
    #[serde(default)]
    pub dns: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkMode {
    #[default]
    Dhcp,
    Static,
}

/// `[update]`: where updates come from and how they are applied.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Update {
    /// Base URL of the release folder; the agent reads `<url>/<channel>/`.
    pub url: String,
    #[serde(default = "default_channel")]
    pub channel: Name,
    /// Trusted ed25519 public keys (as written by `plinth keygen`).
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub strategy: UpdateStrategy,
    /// How long the system must stay healthy before a new boot is blessed.
    #[serde(default = "default_bless_after")]
    pub bless_after: Duration,
    /// How long a new boot may take to become healthy before the machine reboots.
    #[serde(default = "default_bless_timeout")]
    pub bless_timeout: Duration,
    /// How often the agent polls for a release.
    #[serde(default = "default_interval")]
    pub interval: Duration,
    /// When `strategy = "window"` may reboot.
    #[serde(default)]
    pub window: Option<Window>,
    /// The lock server `strategy = "fleetlock"` asks before rebooting.
    #[serde(default)]
    pub fleetlock: Option<FleetLock>,
    /// A PEM file of CA certificates (relative to the definition) that `https://` update and
    /// FleetLock servers are also checked against, besides the image's CA bundle; the builder
    /// places it at [`UPDATE_CA_IN_IMAGE`].
    #[serde(default)]
    pub ca: Option<std::path::PathBuf>,
}

/// Where the image holds the `[update] ca` certificates.
pub const UPDATE_CA_IN_IMAGE: &str = "/usr/share/plinth/update-ca.pem";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateStrategy {
    /// Reboot into the new version as soon as it is written.
    #[default]
    Immediate,
    /// Stage only; reboot when the operator says so.
    Manual,
    /// Reboot once the maintenance window `[update] window` is open.
    Window,
    /// Reboot once the FleetLock server `[update] fleetlock` grants a reboot slot; give it back
    /// after a good boot.
    Fleetlock,
    /// On a Docker Swarm node (`[swarm]`): take the swarm's update lock (a label in its Raft
    /// store, so one node of the swarm reboots at a time and the managers keep their quorum),
    /// drain the node, reboot once its tasks have moved; after a good boot make it active
    /// again and give the lock back.
    Swarm,
}

/// `[update] window`: a maintenance window in UTC, for example
/// `{ days = ["sat", "sun"], start = "02:00", length = "3h" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Window {
    /// Days on which the window opens; every day when empty.
    #[serde(default)]
    pub days: Vec<Weekday>,
    /// When it opens, `HH:MM` UTC.
    pub start: TimeOfDay,
    /// How long it stays open (it may run past midnight).
    pub length: Duration,
}

/// A day of the week, as `mon` … `sun`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    /// Monday is 0.
    pub fn index(self) -> u64 {
        self as u64
    }
}

/// A time of day, `HH:MM` (24-hour), stored as minutes after midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct TimeOfDay(pub u32);

impl TryFrom<String> for TimeOfDay {
    type Error = String;

    fn try_from(text: String) -> Result<TimeOfDay, String> {
        let b = text.as_bytes();
        let digits =
            b.len() == 5 && b[2] == b':' && [0, 1, 3, 4].iter().all(|&i| b[i].is_ascii_digit());
        let parsed = digits.then(|| {
            let number = |i: usize| u32::from(b[i] - b'0') * 10 + u32::from(b[i + 1] - b'0');
            (number(0), number(3))
        });
        let parsed = parsed
            .filter(|(h, m)| *h < 24 && *m < 60)
            .map(|(h, m)| h * 60 + m);
        parsed.map(TimeOfDay).ok_or_else(|| {
            format!("`{text}` is not a time of day: expected HH:MM, 00:00 to 23:59 (UTC)")
        })
    }
}

impl From<TimeOfDay> for String {
    fn from(t: TimeOfDay) -> String {
        format!("{:02}:{:02}", t.0 / 60, t.0 % 60)
    }
}

/// `[update] fleetlock`: a FleetLock server (the protocol of Zincati and airlock).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FleetLock {
    /// Base URL; the agent posts to `<url>/v1/pre-reboot` and `<url>/v1/steady-state`.
    pub url: String,
    /// The group of machines that share the server's reboot slots.
    #[serde(default = "default_fleetlock_group")]
    pub group: Name,
}

/// `[[container]]`: one container that exists exactly as declared at every boot.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Container {
    pub name: Name,
    /// Image reference (`busybox:1.36`). Pulled from a registry unless `archive` or `build` is given.
    pub image: String,
    /// Load the image from an archive (`docker save` output) baked into the OS image.
    pub archive: Option<Source>,
    /// Build the image from Debian packages at `plinth build` time.
    pub build: Option<ImageBuild>,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Published ports, `"HOST:CONTAINER"` or `"HOST:CONTAINER/udp"`.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Bind mounts, `"/var/lib/NAME:/path/in/container"`; host side must lie under `/var`.
    #[serde(default)]
    pub mounts: Vec<String>,
    #[serde(default)]
    pub restart: RestartPolicy,
    pub health: Option<HealthCheck>,
    /// `[[container-network]]`s joined, by name or as `{ name, aliases }`; the first at create,
    /// the others before start. Empty: the engine's default bridge.
    #[serde(default)]
    pub networks: Vec<NetworkAttachment>,
    /// Allocate a pseudo-terminal (the engine's `Tty`).
    #[serde(default)]
    pub tty: bool,
    /// Keep standard input open (the engine's `OpenStdin`).
    #[serde(default)]
    pub stdin: bool,
    /// Declared containers started (and running, healthy if they have a health check) before
    /// this one.
    #[serde(default)]
    pub depends_on: Vec<Name>,
    /// `user`, `user:group`, `uid` or `uid:gid` the command runs as [default: the image's].
    pub user: Option<String>,
    /// Absolute working directory of the command [default: the image's].
    pub workdir: Option<String>,
    /// Memory limit, at least 6MiB (the engine's minimum).
    pub memory: Option<ByteSize>,
    /// CPU limit in CPUs, like `1.5`; more than 0, at most 1024.
    pub cpus: Option<f64>,
    /// Capabilities added, `NET_ADMIN` or `CAP_NET_ADMIN`, or `ALL`.
    #[serde(default)]
    pub cap_add: Vec<String>,
    /// Capabilities dropped, `NET_RAW` or `CAP_NET_RAW`, or `ALL`.
    #[serde(default)]
    pub cap_drop: Vec<String>,
    /// Mount the container's root file system read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Where the container's output goes [default: [`Log::default`], `json-file` rotated at
    /// 10m, 3 files].
    pub log: Option<Log>,
}

/// One entry of `[[container]] networks`: a network name, or `{ name = "back", aliases = ["db"] }`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(
    untagged,
    expecting = "a network name, or a table like { name = \"back\", aliases = [\"db\"] }"
)]
pub enum NetworkAttachment {
    /// Just the network's name.
    Name(Name),
    /// The network's name and the extra names the container answers to on it.
    Table(NetworkAttachmentTable),
}

/// `{ name = "back", aliases = ["db"] }` in `[[container]] networks`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NetworkAttachmentTable {
    pub name: Name,
    /// DNS names the container has on this network besides its own name.
    #[serde(default)]
    pub aliases: Vec<String>,
}

impl NetworkAttachment {
    /// The network's name.
    pub fn name(&self) -> &Name {
        match self {
            NetworkAttachment::Name(name) => name,
            NetworkAttachment::Table(table) => &table.name,
        }
    }

    /// The container's aliases on the network (none for the short form).
    pub fn aliases(&self) -> &[String] {
        match self {
            NetworkAttachment::Name(_) => &[],
            NetworkAttachment::Table(table) => &table.aliases,
        }
    }
}

/// `[[container]] log`: the engine's log driver and its rotation.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Log {
    #[serde(default)]
    pub driver: LogDriver,
    /// Size at which a log file is rotated, the engine's text: digits and `k`, `m` or `g`
    /// [default: `10m`; not with `driver = "none"`].
    pub max_size: Option<String>,
    /// How many log files are kept, at least 1 [default: 3; not with `driver = "none"`].
    pub max_file: Option<u32>,
}

impl Default for Log {
    /// `json-file`, rotated at 10m, 3 files kept: what a container without `log` gets.
    fn default() -> Self {
        Log {
            driver: LogDriver::JsonFile,
            max_size: None,
            max_file: None,
        }
    }
}

/// Rotation size when `log` does not give `max-size`.
pub const DEFAULT_LOG_MAX_SIZE: &str = "10m";
/// Files kept when `log` does not give `max-file`.
pub const DEFAULT_LOG_MAX_FILE: u32 = 3;

/// A log driver the engine ships and keeps logs on the machine with (or none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogDriver {
    #[default]
    JsonFile,
    Local,
    None,
}

impl LogDriver {
    /// The engine's name for the driver.
    pub fn name(self) -> &'static str {
        match self {
            LogDriver::JsonFile => "json-file",
            LogDriver::Local => "local",
            LogDriver::None => "none",
        }
    }
}

/// `[[container-network]]`: a user-defined engine network; containers on it resolve each other
/// by name and alias.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ContainerNetwork {
    pub name: Name,
    #[serde(default)]
    pub driver: NetworkDriver,
    /// Containers on it reach nothing outside it.
    #[serde(default)]
    pub internal: bool,
    /// Containers not created with it may join it later (`overlay` networks).
    #[serde(default)]
    pub attachable: bool,
    /// Address range, an IPv4 or IPv6 CIDR like `"172.30.0.0/24"` [default: the engine picks].
    pub subnet: Option<String>,
}

/// The engine's network driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkDriver {
    /// A bridge on this machine.
    #[default]
    Bridge,
    /// A network across Swarm nodes.
    Overlay,
}

impl NetworkDriver {
    /// The engine's name for the driver.
    pub fn name(self) -> &'static str {
        match self {
            NetworkDriver::Bridge => "bridge",
            NetworkDriver::Overlay => "overlay",
        }
    }
}

/// `[swarm]`: the machine's Docker Swarm membership, made to match at every engine start.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Swarm {
    /// `manager` or `worker`.
    pub role: SwarmRole,
    /// The address other nodes reach this one at: an interface name (`eth0`, resolved to its
    /// IPv4 address at boot) or an IP address [default: the engine picks].
    pub advertise: Option<String>,
    /// Where the swarm's management port listens [default: `0.0.0.0:2377`].
    #[serde(default = "default_swarm_listen")]
    pub listen: String,
    /// Managers to join, `HOST[:PORT]` (`"10.0.0.1:2377"`); the port defaults to 2377.
    #[serde(default)]
    pub join: Vec<String>,
    /// The join token (`SWMTKN-1-…`), for a node that joins.
    pub token: Option<String>,
    /// A file on the machine holding the join token, read at each join attempt (in place of
    /// `token`).
    pub token_file: Option<String>,
    /// Start a new swarm: only on the first manager, never with `join`.
    #[serde(default)]
    pub init: bool,
    /// A manager's Engine API, `tcp://HOST:PORT`, through which a worker with
    /// `[update] strategy = "swarm"` takes the update lock and drains itself (a worker's own
    /// engine cannot change the swarm).
    pub manager_api: Option<String>,
}

/// A node's role in the swarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwarmRole {
    /// Runs the swarm's control plane (and tasks).
    Manager,
    /// Runs tasks only.
    Worker,
}

impl SwarmRole {
    /// The name written in `[swarm] role`.
    pub fn name(self) -> &'static str {
        match self {
            SwarmRole::Manager => "manager",
            SwarmRole::Worker => "worker",
        }
    }
}

/// The default `[swarm] listen`.
pub const DEFAULT_SWARM_LISTEN: &str = "0.0.0.0:2377";
/// The swarm management port a `[swarm] join` entry without a port means.
pub const SWARM_PORT: u16 = 2377;

/// `[[service]]`: a Swarm service, made to exist as declared by a manager.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Service {
    pub name: Name,
    /// Image reference; a node without it loads it from a baked `[[container]]` archive that
    /// carries it, else pulls it.
    pub image: String,
    /// How many tasks run (replicated mode) [default: 1; not with `mode = "global"`].
    pub replicas: Option<u64>,
    /// `replicated` (default) or `global` (one task on every node that meets the constraints).
    pub mode: Option<ServiceMode>,
    /// Ports published through the routing mesh on every node, `"HOST:CONTAINER"` or
    /// `"HOST:CONTAINER/udp"` (ranges allowed, no address).
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Bind mounts, as `[[container]] mounts`; the host side must exist on every node a task
    /// runs on (it lies under `/var`).
    #[serde(default)]
    pub mounts: Vec<String>,
    /// `[[container-network]]`s with `driver = "overlay"` the tasks join.
    #[serde(default)]
    pub networks: Vec<Name>,
    /// Placement constraints, `"node.role==worker"`, `"node.labels.zone!=b"`.
    #[serde(default)]
    pub constraints: Vec<String>,
    /// Arguments replacing the image's `CMD`.
    #[serde(default)]
    pub command: Vec<String>,
    /// How a changed service is rolled out [default: one task at a time, no delay].
    pub update: Option<ServiceUpdate>,
}

/// How a service's tasks are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceMode {
    /// A fixed number of tasks (`replicas`).
    #[default]
    Replicated,
    /// One task on every eligible node.
    Global,
}

impl Service {
    /// The replica count of a replicated service (`None` for a global one).
    pub fn replica_count(&self) -> Option<u64> {
        match self.mode.unwrap_or_default() {
            ServiceMode::Global => None,
            ServiceMode::Replicated => Some(self.replicas.unwrap_or(1)),
        }
    }
}

/// `[service.update]`: the rolling update of a changed service.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServiceUpdate {
    /// Tasks updated at once; 0 updates all at once [default: 1].
    #[serde(default = "default_parallelism")]
    pub parallelism: u64,
    /// Pause between two batches [default: `0s`].
    #[serde(default = "default_update_delay")]
    pub delay: Duration,
}

impl Default for ServiceUpdate {
    fn default() -> Self {
        ServiceUpdate {
            parallelism: default_parallelism(),
            delay: default_update_delay(),
        }
    }
}

/// A container image assembled by `plinth` from Debian packages.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ImageBuild {
    pub packages: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    No,
    OnFailure,
    #[default]
    Always,
    UnlessStopped,
}

/// A container health check, run inside the container.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HealthCheck {
    pub command: Vec<String>,
    #[serde(default = "default_health_interval")]
    pub interval: Duration,
    #[serde(default = "default_health_retries")]
    pub retries: u32,
}

/// A pinned input: a URL or a path (relative to the definition) with its sha256.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Source {
    pub url: Option<String>,
    pub path: Option<String>,
    pub sha256: Sha256,
}

/// `[[file]]`: a file placed into the root tree.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct File {
    /// Absolute path in the image.
    pub path: String,
    #[serde(default = "default_file_mode")]
    pub mode: FileMode,
    /// Inline content.
    pub content: Option<String>,
    /// Content from a pinned source.
    pub source: Option<Source>,
}

impl Definition {
    /// Parses and validates a definition. `file` is only used to name the file in errors, which
    /// are located through the parser's spans of the offending key or value.
    pub fn parse(file: &str, source: &str) -> Result<Definition, DefinitionError> {
        let definition: Definition = DefinitionError::from_toml(file, source)?;
        crate::validate::definition(&definition)
            .map_err(|problem| DefinitionError::locate(file, source, &problem, None))?;
        Ok(definition)
    }

    /// [`Definition::parse`] of a file's bytes, which must be UTF-8 (an invalid byte is an error
    /// at its line and column).
    pub fn parse_bytes(file: &str, bytes: &[u8]) -> Result<Definition, DefinitionError> {
        Definition::parse(file, crate::diagnostic::decode(file, bytes)?)
    }

    /// The host name the machine takes.
    pub fn hostname(&self) -> &Name {
        self.image.hostname.as_ref().unwrap_or(&self.image.name)
    }
}

/// Parses a published port `"HOST:CONTAINER[/tcp|/udp]"` into (host, container, protocol).
pub use crate::validate::parse_port;

/// Parses a `[[container]] ports` entry, with an optional address and port ranges.
pub use crate::validate::{published_port, PublishedPort};

fn yes() -> bool {
    true
}
fn default_suite() -> String {
    "bookworm".to_owned()
}
fn default_components() -> Vec<String> {
    vec!["main".to_owned()]
}
fn default_kernel_package() -> String {
    "linux-image-cloud-amd64".to_owned()
}
fn default_cmdline() -> Vec<String> {
    vec!["console=ttyS0".to_owned(), "quiet".to_owned()]
}
fn default_tls_listen() -> String {
    "0.0.0.0:2376".to_owned()
}
fn default_swarm_listen() -> String {
    DEFAULT_SWARM_LISTEN.to_owned()
}
fn default_parallelism() -> u64 {
    1
}
fn default_update_delay() -> Duration {
    Duration(std::time::Duration::ZERO)
}
fn default_esp() -> ByteSize {
    ByteSize(256 * ByteSize::MIB)
}
fn default_root() -> ByteSize {
    ByteSize(512 * ByteSize::MIB)
}
fn default_verity() -> ByteSize {
    ByteSize(16 * ByteSize::MIB)
}
fn default_state() -> ByteSize {
    ByteSize(1024 * ByteSize::MIB)
}
fn default_channel() -> Name {
    Name::parse("stable").unwrap_or_else(|_| unreachable!("`stable` is a valid name"))
}
fn default_bless_after() -> Duration {
    Duration(std::time::Duration::from_secs(30))
}
fn default_bless_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(600))
}
fn default_fleetlock_group() -> Name {
    Name::parse("default").unwrap_or_else(|_| unreachable!("`default` is a valid name"))
}
fn default_interval() -> Duration {
    Duration(std::time::Duration::from_secs(3600))
}
fn default_health_interval() -> Duration {
    Duration(std::time::Duration::from_secs(10))
}
fn default_health_retries() -> u32 {
    3
}
fn default_file_mode() -> FileMode {
    FileMode(0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[image]\nname = \"demo\"\nversion = \"1.0\"\n";

    fn parse(src: &str) -> Result<Definition, DefinitionError> {
        Definition::parse("test.toml", src)
    }

    /// A public key that parses, for `[update] keys`.
    fn key() -> String {
        crate::manifest::SecretKey::from_seed([7; 32])
            .public()
            .to_string()
    }

    #[test]
    fn minimal_definition_takes_defaults() {
        let def = parse(MINIMAL).expect("minimal definition parses");
        assert_eq!(def.image.name.as_str(), "demo");
        assert_eq!(def.debian.suite, "bookworm");
        assert_eq!(def.kernel.package, "linux-image-cloud-amd64");
        assert_eq!(def.engine.kind, EngineKind::Docker);
        assert_eq!(def.disk.root, ByteSize(512 << 20));
        assert!(def.image.verity);
        assert_eq!(def.hostname().as_str(), "demo");
    }

    #[test]
    fn reboot_strategies_need_their_settings() {
        let update = &format!(
            "[update]\nurl = \"http://10.0.0.1/r\"\nkeys = [\"{}\"]\n",
            key()
        );
        let window = parse(&format!(
            "{MINIMAL}{update}strategy = \"window\"\nwindow = {{ days = [\"sat\", \"sun\"], start = \"23:30\", length = \"3h\" }}\n"
        ))
        .expect("a window parses");
        let w = window.update.and_then(|u| u.window).expect("window");
        assert_eq!(w.days, [Weekday::Sat, Weekday::Sun]);
        assert_eq!(w.start, TimeOfDay(23 * 60 + 30));
        assert_eq!(w.length.0, std::time::Duration::from_secs(3 * 3600));
        let lock = parse(&format!(
            "{MINIMAL}{update}strategy = \"fleetlock\"\nfleetlock = {{ url = \"http://10.0.0.2:3333\" }}\n"
        ))
        .expect("fleetlock parses");
        let lock = lock.update.and_then(|u| u.fleetlock).expect("fleetlock");
        assert_eq!(lock.group.as_str(), "default");

        let cases = [
            ("strategy = \"window\"\n", "needs a window"),
            ("strategy = \"fleetlock\"\n", "needs fleetlock"),
            (
                "window = { start = \"02:00\", length = \"1h\" }\n",
                "only used with strategy = \"window\"",
            ),
            (
                "strategy = \"window\"\nwindow = { start = \"24:00\", length = \"1h\" }\n",
                "expected HH:MM",
            ),
            (
                "strategy = \"window\"\nwindow = { days = [\"someday\"], start = \"02:00\", length = \"1h\" }\n",
                "sat",
            ),
            (
                "strategy = \"fleetlock\"\nfleetlock = { url = \"https://lock\" }\n",
                "expected an http:// URL",
            ),
        ];
        for (extra, want) in cases {
            let err = parse(&format!("{MINIMAL}{update}{extra}")).expect_err(extra);
            assert!(err.to_string().contains(want), "{extra}: {err}");
        }
    }

    #[test]
    fn misspelt_table_names_line_column_and_spelling() {
        let src = format!("{MINIMAL}\n[kernal]\npackage = \"x\"\n");
        let err = parse(&src).expect_err("misspelt table is refused");
        let text = err.to_string();
        assert!(text.starts_with("test.toml:5:"), "{text}");
        assert!(text.contains("did you mean `kernel`?"), "{text}");
    }

    #[test]
    fn misspelt_key_names_line_column_and_spelling() {
        let src = format!("{MINIMAL}[disk]\nrot = \"1GiB\"\n");
        let err = parse(&src).expect_err("misspelt key is refused");
        assert_eq!(err.location, Some((5, 1)), "{err}");
        assert!(err.message.contains("did you mean `root`?"), "{err}");
    }

    #[test]
    fn bad_values_say_what_is_allowed() {
        let cases = [
            ("[disk]\nroot = \"1 parsec\"\n", "allowed units"),
            ("[disk]\nroot = \"1MiB\"\n", "at least 64MiB"),
            ("[engine]\nkind = \"podman\"\n", "docker"),
            (
                "[[container]]\nname = \"a\"\nimage = \"x\"\nmounts = [\"/etc:/x\"]\n",
                "host side under /var",
            ),
            (
                "[[container]]\nname = \"a\"\nimage = \"x\"\nports = [\"80\"]\n",
                "HOST:CONTAINER",
            ),
            ("[[file]]\npath = \"etc/x\"\ncontent = \"\"\n", "absolute"),
            ("[[file]]\npath = \"/etc/x\"\n", "exactly one of"),
            (
                "[debian]\npackages = [\"Bad_Name\"]\n",
                "not a Debian package name",
            ),
        ];
        for (tail, want) in cases {
            let err = parse(&format!("{MINIMAL}{tail}")).expect_err(tail);
            assert!(err.to_string().contains(want), "{tail}: {err}");
            assert!(err.location.is_some(), "{tail}: {err}");
        }
    }

    #[test]
    fn plain_tcp_engine_api_needs_tls_or_an_explicit_choice() {
        let tcp = "[engine]\nsettings = { hosts = [\"unix:///run/docker.sock\", \"tcp://0.0.0.0:2375\"] }\n";
        let err = parse(&format!("{MINIMAL}{tcp}")).expect_err("plain tcp");
        assert_eq!(err.location, Some((5, 50)), "{err}");
        for want in [
            "engine.settings.hosts[1]",
            "tcp://0.0.0.0:2375",
            "[engine] tls",
            "insecure-tcp = true",
        ] {
            assert!(err.message.contains(want), "{want}: {err}");
        }
        let bare = "[engine]\nsettings = { hosts = [\"0.0.0.0:2375\"] }\n";
        assert!(
            parse(&format!("{MINIMAL}{bare}")).is_err(),
            "no scheme is tcp"
        );
        for way_out in [
            "insecure-tcp = true\n",
            "tls = { ca = \"ca.pem\", cert = \"c.pem\", key = \"k.pem\" }\n",
        ] {
            let def = parse(&format!("{MINIMAL}{tcp}{way_out}")).expect(way_out);
            assert_eq!(def.engine.tls_listen, "0.0.0.0:2376");
        }
        let verify =
            "[engine]\nsettings = { hosts = [\"tcp://0.0.0.0:2376\"], tlsverify = true }\n";
        parse(&format!("{MINIMAL}{verify}")).expect("tlsverify in the settings");
        let unix = "[engine]\nsettings = { hosts = [\"unix:///run/docker.sock\"] }\n";
        parse(&format!("{MINIMAL}{unix}")).expect("a unix socket only");
    }

    #[test]
    fn engine_tls_and_time_servers() {
        let def = parse(&format!(
            "{MINIMAL}[engine]\ntls = {{ ca = \"ca.pem\", cert = \"server.pem\", key = \"server-key.pem\" }}\ntls-listen = \"[::]:2376\"\n[time]\nservers = [\"time.example\", \"10.0.0.1:123\", \"[fd00::1]:123\", \"fd00::2\"]\n"
        ))
        .expect("tls and time parse");
        let tls = def.engine.tls.expect("tls");
        assert_eq!(tls.key, std::path::PathBuf::from("server-key.pem"));
        assert_eq!(def.time.servers.len(), 4);
        let cases = [
            (
                "[time]\nservers = [\"ok.example\", \"\"]\n",
                "time.servers",
                (5, 26),
                "is empty",
            ),
            (
                "[time]\nservers = [\"ntp://x\"]\n",
                "time.servers",
                (5, 12),
                "no scheme",
            ),
            (
                "[time]\nservers = [\"a b\"]\n",
                "time.servers",
                (5, 12),
                "holds ' '",
            ),
            (
                "[time]\nservers = [\"x:0\"]\n",
                "time.servers",
                (5, 12),
                "1-65535",
            ),
            (
                "[engine]\ntls-listen = \"localhost:2376\"\n",
                "engine.tls-listen",
                (5, 14),
                "IP:PORT",
            ),
            (
                "[engine]\ntls-listen = \"0.0.0.0:0\"\n",
                "engine.tls-listen",
                (5, 14),
                "1-65535",
            ),
        ];
        for (tail, key, location, want) in cases {
            let err = parse(&format!("{MINIMAL}{tail}")).expect_err(tail);
            assert!(err.message.starts_with(key), "{tail}: {err}");
            assert!(err.message.contains(want), "{tail}: {err}");
            assert_eq!(err.location, Some(location), "{tail}: {err}");
        }
    }

    const APP: &str = "[[container]]\nname = \"app\"\nimage = \"x\"\n";

    #[test]
    fn container_options_and_networks_parse() {
        let src = format!(
            r#"{MINIMAL}
[[container-network]]
name = "back"
internal = true
subnet = "172.30.0.0/24"

[[container-network]]
name = "front"
driver = "overlay"
attachable = true

[[container]]
name = "db"
image = "postgres:17"

[[container]]
name = "app"
image = "app:1"
networks = [{{ name = "back", aliases = ["api"] }}, "front"]
tty = true
stdin = true
depends-on = ["db"]
user = "1000:1000"
workdir = "/app"
memory = "256MiB"
cpus = 1.5
cap-add = ["NET_ADMIN", "cap_sys_time"]
cap-drop = ["ALL"]
read-only = true
ports = ["127.0.0.1:8080:80", "[::1]:8443:443", "8000-8010:9000-9010/udp"]
log = {{ driver = "local", max-size = "5m", max-file = 2 }}
"#
        );
        let def = parse(&src).expect("every option parses");
        let back = &def.container_networks[0];
        assert_eq!(
            (back.name.as_str(), back.driver, back.internal),
            ("back", NetworkDriver::Bridge, true)
        );
        assert_eq!(def.container_networks[1].driver, NetworkDriver::Overlay);
        let app = &def.containers[1];
        assert_eq!(app.networks[0].name().as_str(), "back");
        assert_eq!(app.networks[0].aliases(), ["api"]);
        assert_eq!(
            app.networks[1],
            NetworkAttachment::Name(Name::parse("front").expect("name"))
        );
        assert!(app.tty && app.stdin && app.read_only);
        assert_eq!(app.depends_on[0].as_str(), "db");
        assert_eq!(app.memory, Some(ByteSize(256 << 20)));
        assert_eq!(app.cpus, Some(1.5));
        assert_eq!(app.log.as_ref().map(|l| l.driver), Some(LogDriver::Local));
        let port = published_port(&app.ports[2]).expect("range");
        assert_eq!(
            (port.host, port.container, port.protocol, port.len()),
            ((8000, 8010), (9000, 9010), "udp", 11)
        );
        let plain = parse(&format!("{MINIMAL}{APP}")).expect("no options");
        assert_eq!(
            plain.containers[0].log, None,
            "the default log is applied by plinth-init"
        );
        assert!(plain.container_networks.is_empty());
    }

    #[test]
    fn container_options_refused_with_their_key() {
        let net = "[[container-network]]\nname = \"back\"\n";
        let db = "[[container]]\nname = \"db\"\nimage = \"x\"\n";
        let cases = [
            (
                format!("{APP}networks = [\"back\"]\n"),
                "container[0].networks[0]",
                "not declared",
            ),
            (
                format!("{APP}networks = [\"host\"]\n"),
                "container[0].networks[0]",
                "engine's own networks",
            ),
            (
                format!("{net}{APP}networks = [\"back\", {{ name = \"back\" }}]\n"),
                "container[0].networks[1]",
                "listed twice",
            ),
            (
                format!("{net}{APP}networks = [{{ name = \"back\", aliases = [\"a b\"] }}]\n"),
                "container[0].networks[0].aliases[0]",
                "not a DNS name",
            ),
            (
                format!("{APP}depends-on = [\"redis\"]\n"),
                "container[0].depends-on[0]",
                "not a declared container",
            ),
            (
                format!("{APP}depends-on = [\"app\"]\n"),
                "container[0].depends-on[0]",
                "itself",
            ),
            (
                format!("{APP}depends-on = [\"db\"]\n{db}depends-on = [\"app\"]\n"),
                "container[0].depends-on",
                "app → db → app",
            ),
            (
                format!("{APP}user = \"a:b:c\"\n"),
                "container[0].user",
                "not a user",
            ),
            (
                format!("{APP}workdir = \"app\"\n"),
                "container[0].workdir",
                "absolute",
            ),
            (
                format!("{APP}memory = \"4MiB\"\n"),
                "container[0].memory",
                "at least 6MiB",
            ),
            (format!("{APP}cpus = 0.0\n"), "container[0].cpus", "above 0"),
            (
                format!("{APP}cpus = 2000.0\n"),
                "container[0].cpus",
                "at most 1024",
            ),
            (
                format!("{APP}cap-add = [\"NET_ADMIN\", \"FLY\"]\n"),
                "container[0].cap-add[1]",
                "not a Linux capability",
            ),
            (
                format!("{APP}cap-drop = [\"CAP_\"]\n"),
                "container[0].cap-drop[0]",
                "not a Linux capability",
            ),
            (
                format!("{APP}log = {{ max-size = \"10MB\" }}\n"),
                "container[0].log.max-size",
                "k, m or g",
            ),
            (
                format!("{APP}log = {{ max-file = 0 }}\n"),
                "container[0].log.max-file",
                "at least 1",
            ),
            (
                format!("{APP}log = {{ driver = \"none\", max-file = 2 }}\n"),
                "container[0].log.max-file",
                "keeps no log",
            ),
            (
                format!("{APP}ports = [\"localhost:80:80\"]\n"),
                "container[0].ports[0]",
                "not an IPv4 address",
            ),
            (
                format!("{APP}ports = [\"::1:80:80\"]\n"),
                "container[0].ports[0]",
                "two ports",
            ),
            (
                format!("{APP}ports = [\"8000-8010:9000-9009\"]\n"),
                "container[0].ports[0]",
                "differ in length",
            ),
            (
                format!("{APP}ports = [\"8010-8000:9010-9000\"]\n"),
                "container[0].ports[0]",
                "ascending",
            ),
            (
                format!("{APP}ports = [\"8000-8010:80-90\", \"127.0.0.1:8005:80\"]\n"),
                "container[0].ports[1]",
                "already published by container[0].ports[0]",
            ),
            (
                format!("{APP}ports = [\"127.0.0.1:80:80\", \"0.0.0.0:80:81\"]\n"),
                "container[0].ports[1]",
                "80/tcp is already published",
            ),
            (
                "[[container-network]]\nname = \"bridge\"\n".to_owned(),
                "container-network[0].name",
                "engine's own",
            ),
            (
                format!("{net}{net}"),
                "container-network[1].name",
                "declared twice",
            ),
            (
                format!("{net}subnet = \"10.0.0.0/33\"\n"),
                "container-network[0].subnet",
                "not a subnet",
            ),
        ];
        for (tail, key, want) in cases {
            let err = parse(&format!("{MINIMAL}{tail}")).expect_err(&tail);
            assert!(
                err.message.starts_with(&format!("{key}: ")),
                "{tail}: {err}"
            );
            assert!(err.message.contains(want), "{tail}: {err}");
            assert!(err.location.is_some(), "{tail}: {err}");
        }
        let fine = format!("{MINIMAL}{APP}ports = [\"127.0.0.1:80:80\", \"127.0.0.2:80:80\", \"[::1]:80:80\", \"80:80/udp\"]\n");
        parse(&fine).expect("the same port on different addresses and protocols");
        let bad_table = parse(&format!(
            "{MINIMAL}{APP}networks = [{{ nam = \"back\" }}]\n"
        ))
        .expect_err("misspelt key");
        assert!(
            bad_table.message.contains("aliases = [\"db\"]"),
            "{bad_table}"
        );
        let bad_driver = parse(&format!(
            "{MINIMAL}{APP}log = {{ driver = \"journald\" }}\n"
        ))
        .expect_err("journald");
        assert!(bad_driver.message.contains("json-file"), "{bad_driver}");
    }

    const MANAGER: &str = "[swarm]\nrole = \"manager\"\ninit = true\n";
    const OVERLAY: &str = "[[container-network]]\nname = \"mesh\"\ndriver = \"overlay\"\n";
    const WEB: &str = "[[service]]\nname = \"web\"\nimage = \"nginx:1\"\n";
    const TOKEN: &str =
        "SWMTKN-1-3pu6hszjas19xyp7ghgosyx9k8atbfcr8p2is99znpy26u2lkl-1awxwuwd3z9j1z3puu7rcgdbx";

    #[test]
    fn swarm_and_services_parse() {
        let src = format!(
            r#"{MINIMAL}
[swarm]
role = "worker"
advertise = "eth0"
join = ["10.0.0.1:2377", "manager-2"]
token-file = "/var/lib/swarm/token"
"#
        );
        let def = parse(&src).expect("a worker parses");
        let swarm = def.swarm.expect("swarm");
        assert_eq!(swarm.role, SwarmRole::Worker);
        assert_eq!(swarm.listen, DEFAULT_SWARM_LISTEN);
        assert_eq!(swarm.join, ["10.0.0.1:2377", "manager-2"]);
        assert_eq!(swarm.token_file.as_deref(), Some("/var/lib/swarm/token"));
        assert!(!swarm.init);

        let src = format!(
            r#"{MINIMAL}{OVERLAY}
[swarm]
role = "manager"
join = ["[fd00::1]:2377"]
token = "{TOKEN}"
advertise = "10.0.0.2"
listen = "10.0.0.2:2377"

[[service]]
name = "web"
image = "nginx:1.27"
replicas = 3
ports = ["8080:80", "53:53/udp"]
env = {{ MODE = "prod" }}
mounts = ["/var/lib/web:/usr/share/nginx/html:ro"]
networks = ["mesh"]
constraints = ["node.role==worker", "node.labels.zone != b"]
command = ["nginx", "-g", "daemon off;"]
update = {{ parallelism = 2, delay = "10s" }}

[[service]]
name = "agent"
image = "agent:1"
mode = "global"
"#
        );
        let def = parse(&src).expect("a manager with services parses");
        let web = &def.services[0];
        assert_eq!(web.replica_count(), Some(3));
        assert_eq!(web.networks[0].as_str(), "mesh");
        let update = web.update.expect("update");
        assert_eq!(
            (update.parallelism, update.delay.0),
            (2, std::time::Duration::from_secs(10))
        );
        assert_eq!(def.services[1].replica_count(), None);
        let plain = parse(&format!("{MINIMAL}{MANAGER}{WEB}")).expect("defaults");
        assert_eq!(plain.services[0].replica_count(), Some(1));
        assert_eq!(plain.services[0].update, None);
        assert_eq!(ServiceUpdate::default().parallelism, 1);
        assert!(parse(MINIMAL).expect("minimal").swarm.is_none());
    }

    #[test]
    fn swarm_and_services_refused_with_their_key() {
        let worker = "[swarm]\nrole = \"worker\"\n";
        let joining =
            format!("[swarm]\nrole = \"worker\"\njoin = [\"10.0.0.1\"]\ntoken = \"{TOKEN}\"\n");
        let bridge = "[[container-network]]\nname = \"back\"\n";
        let swarm_update = format!(
            "[update]\nurl = \"http://10.0.0.1/r\"\nkeys = [\"{}\"]\nstrategy = \"swarm\"\n",
            key()
        );
        let cases = [
            (
                format!("{worker}init = true\n"),
                "swarm.init",
                "only role = \"manager\"",
            ),
            (
                format!("{MANAGER}join = [\"10.0.0.1:2377\"]\n"),
                "swarm.join",
                "give one or the other",
            ),
            (
                format!("{MANAGER}token = \"{TOKEN}\"\n"),
                "swarm.token",
                "only used to join",
            ),
            (worker.to_owned(), "swarm.role", "needs join"),
            (
                "[swarm]\nrole = \"manager\"\n".to_owned(),
                "swarm.role",
                "init = true",
            ),
            (
                format!("{worker}join = [\"10.0.0.1:2377\"]\n"),
                "swarm.join",
                "needs the swarm's join token",
            ),
            (
                format!("{joining}token-file = \"/var/lib/t\"\n"),
                "swarm.token-file",
                "not both",
            ),
            (
                format!("{worker}join = [\"m\"]\ntoken = \"secret-value\"\n"),
                "swarm.token",
                "SWMTKN-1-",
            ),
            (
                format!("{worker}join = [\"m\"]\ntoken-file = \"var/lib/t\"\n"),
                "swarm.token-file",
                "absolute",
            ),
            (
                format!("{joining}advertise = \"eth0/1\"\n"),
                "swarm.advertise",
                "interface name",
            ),
            (
                format!("{joining}listen = \"eth0:2377\"\n"),
                "swarm.listen",
                "IP:PORT",
            ),
            (
                format!("{worker}join = [\"http://m:2377\"]\ntoken = \"{TOKEN}\"\n"),
                "swarm.join[0]",
                "no scheme",
            ),
            (
                format!("{worker}join = [\"m:99999\"]\ntoken = \"{TOKEN}\"\n"),
                "swarm.join[0]",
                "1-65535",
            ),
            ("[swarm]\nrole = \"leader\"\n".to_owned(), "", "manager"),
            (WEB.to_owned(), "service[0].name", "role = \"manager\""),
            (
                format!("{joining}{WEB}"),
                "service[0].name",
                "role = \"manager\"",
            ),
            (
                format!("{MANAGER}{WEB}{WEB}"),
                "service[1].name",
                "declared twice",
            ),
            (
                format!("{MANAGER}{WEB}mode = \"global\"\nreplicas = 2\n"),
                "service[0].replicas",
                "not both",
            ),
            (
                format!("{MANAGER}{WEB}image = \"Bad\"\n").replace("image = \"nginx:1\"\n", ""),
                "service[0].image",
                "not an image reference",
            ),
            (
                format!("{MANAGER}{WEB}ports = [\"127.0.0.1:80:80\"]\n"),
                "service[0].ports[0]",
                "without an address",
            ),
            (
                format!("{MANAGER}{WEB}ports = [\"80\"]\n"),
                "service[0].ports[0]",
                "HOST:CONTAINER",
            ),
            (
                format!("{MANAGER}{WEB}ports = [\"80:80\", \"80:81\"]\n"),
                "service[0].ports[1]",
                "already published by service[0].ports[0]",
            ),
            (
                format!("{MANAGER}{APP}ports = [\"8080:80\"]\n{WEB}ports = [\"8080:80\"]\n"),
                "service[0].ports[0]",
                "already published by container[0].ports[0]",
            ),
            (
                format!("{MANAGER}{WEB}mounts = [\"/etc:/x\"]\n"),
                "service[0].mounts[0]",
                "host side under /var",
            ),
            (
                format!("{MANAGER}{WEB}networks = [\"mesh\"]\n"),
                "service[0].networks[0]",
                "not declared",
            ),
            (
                format!("{MANAGER}{bridge}{WEB}networks = [\"back\"]\n"),
                "service[0].networks[0]",
                "driver = \"overlay\"",
            ),
            (
                format!("{MANAGER}{OVERLAY}{WEB}networks = [\"mesh\", \"mesh\"]\n"),
                "service[0].networks[1]",
                "listed twice",
            ),
            (
                format!("{MANAGER}{WEB}constraints = [\"node.role=worker\"]\n"),
                "service[0].constraints[0]",
                "KEY==VALUE",
            ),
            (
                format!("{MANAGER}{WEB}env = {{ \"A=B\" = \"x\" }}\n"),
                "service[0].env.\"A=B\"",
                "environment variable name",
            ),
            (
                format!("{MANAGER}{WEB}update = {{ delay = \"soon\" }}\n"),
                "",
                "invalid duration",
            ),
            (swarm_update.clone(), "update.strategy", "has no [swarm]"),
            (
                format!("{joining}{swarm_update}"),
                "swarm.role",
                "manager-api = \"tcp://MANAGER:2375\"",
            ),
            (
                format!("{joining}manager-api = \"10.0.0.1:2375\"\n{swarm_update}"),
                "swarm.manager-api",
                "not a tcp:// address",
            ),
            (
                format!("{joining}manager-api = \"tcp://10.0.0.1\"\n{swarm_update}"),
                "swarm.manager-api",
                "has no port",
            ),
            (
                format!("{MANAGER}manager-api = \"tcp://10.0.0.1:2375\"\n{swarm_update}"),
                "swarm.manager-api",
                "only for role = \"worker\"",
            ),
            (
                format!("{joining}manager-api = \"tcp://10.0.0.1:2375\"\n"),
                "swarm.manager-api",
                "only used with [update] strategy = \"swarm\"",
            ),
        ];
        for (tail, key, want) in cases {
            let err = parse(&format!("{MINIMAL}{tail}")).expect_err(&tail);
            assert!(
                err.message.starts_with(&format!("{key}: ")) || key.is_empty(),
                "{tail}: {err}"
            );
            assert!(err.message.contains(want), "{tail}: {err}");
            assert!(err.location.is_some(), "{tail}: {err}");
        }
        let secret = parse(&format!(
            "{MINIMAL}{worker}join = [\"m\"]\ntoken = \"SWMTKN-1-a b\"\n"
        ))
        .expect_err("bad token");
        assert!(
            !secret.message.contains("a b"),
            "the token is not repeated: {secret}"
        );
    }

    #[test]
    fn full_definition_round_trips() {
        let src = r#"
[image]
name = "web"
version = "2.1"
hostname = "web-1"

[debian]
suite = "bookworm"
packages = ["busybox-static"]
mirror = "http://127.0.0.1:8080/debian"

[kernel]
cmdline = ["console=ttyS0"]
modules = ["vfio"]

[engine]
kind = "docker"
settings = { log-driver = "local" }

[disk]
root = "1GiB"

[update]
url = "http://127.0.0.1:9000/releases"
keys = ["KEY"]
bless-after = "10s"

[[container]]
name = "web"
image = "busybox:latest"
command = ["httpd", "-f"]
ports = ["8080:80"]
mounts = ["/var/lib/web:/www"]
health = { command = ["true"] }

[[file]]
path = "/etc/motd"
mode = "0600"
content = "hello\n"
"#;
        let def = parse(&src.replace("KEY", &key())).expect("full definition parses");
        assert_eq!(def.containers.len(), 1);
        assert_eq!(def.containers[0].ports, ["8080:80"]);
        assert_eq!(def.files[0].mode, FileMode(0o600));
        let update = def.update.as_ref().expect("update table");
        assert_eq!(update.channel.as_str(), "stable");
        assert_eq!(update.bless_after.0.as_secs(), 10);
        assert_eq!(def.engine.settings["log-driver"].as_str(), Some("local"));
    }
}
