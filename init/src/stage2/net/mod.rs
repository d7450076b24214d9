//! Network configuration of the machine: loopback, and the first Ethernet interface by DHCPv4 or
//! statically from `[network]`, with DNS servers written to a resolv.conf under `/run`.

#![warn(missing_docs)]

pub mod dhcp;
pub mod netlink;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use os_config::definition::{Network, NetworkMode};

use self::dhcp::Lease;
use self::netlink::{Route, RTPROT_BOOT, RTPROT_DHCP};

/// System paths the network code reads and writes, overridable for tests.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `/sys/class/net`.
    pub sys_class_net: PathBuf,
    /// Where DNS servers are written (`/etc/resolv.conf` links here).
    pub resolv_conf: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            sys_class_net: PathBuf::from("/sys/class/net"),
            resolv_conf: PathBuf::from("/run/resolv.conf"),
        }
    }
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Interface name, e.g. `ens3`.
    pub name: String,
    /// Kernel interface index.
    pub index: u32,
    /// Hardware (MAC) address.
    pub mac: [u8; 6],
}

fn read_trimmed(path: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

fn read_interface(sys_class_net: &Path, name: &str) -> Result<Interface> {
    let dir = sys_class_net.join(name);
    let index_path = dir.join("ifindex");
    let index_text = read_trimmed(&index_path)?;
    let index = index_text.parse().with_context(|| {
        format!(
            "{}: `{index_text}` is not an interface index",
            index_path.display()
        )
    })?;
    let mac_path = dir.join("address");
    let mac_text = read_trimmed(&mac_path)?;
    let mac = parse_mac(&mac_text).with_context(|| {
        format!(
            "{}: `{mac_text}` is not an Ethernet address",
            mac_path.display()
        )
    })?;
    Ok(Interface {
        name: name.to_owned(),
        index,
        mac,
    })
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The first physical Ethernet interface by name: not `lo`, `type` 1 (ARPHRD_ETHER), and backed
/// by a device (which leaves out bridges, veths and other virtual links).
pub fn find_ethernet(sys_class_net: &Path) -> Result<Option<Interface>> {
    let entries = std::fs::read_dir(sys_class_net)
        .with_context(|| format!("listing {}", sys_class_net.display()))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", sys_class_net.display()))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    for name in names {
        let dir = sys_class_net.join(&name);
        if name == "lo" || !dir.join("device").exists() {
            continue;
        }
        match std::fs::read_to_string(dir.join("type")) {
            Ok(kind) if kind.trim() == "1" => {
                return read_interface(sys_class_net, &name).map(Some)
            }
            _ => continue,
        }
    }
    Ok(None)
}

/// Waits up to `timeout` for an Ethernet interface to appear (its driver may still be loading).
pub fn wait_for_ethernet(sys_class_net: &Path, timeout: Duration) -> Result<Interface> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(interface) = find_ethernet(sys_class_net)? {
            return Ok(interface);
        }
        if Instant::now() >= deadline {
            bail!(
                "no Ethernet interface appeared in {} within {timeout:?} (is the network driver loaded?)",
                sys_class_net.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The IPv4 addresses of interface `name` (its index read under `sys_class_net`), as the kernel
/// lists them (the primary address first).
pub fn interface_ipv4(sys_class_net: &Path, name: &str) -> Result<Vec<Ipv4Addr>> {
    let index_path = sys_class_net.join(name).join("ifindex");
    let index_text =
        read_trimmed(&index_path).with_context(|| format!("no network interface `{name}`"))?;
    let index: u32 = index_text.parse().with_context(|| {
        format!(
            "{}: `{index_text}` is not an interface index",
            index_path.display()
        )
    })?;
    let mut socket = netlink::Socket::open().context("opening a netlink socket")?;
    let all = socket
        .ipv4_addresses()
        .with_context(|| format!("listing the addresses of {name}"))?;
    Ok(all
        .into_iter()
        .filter(|a| a.index == index)
        .map(|a| a.address)
        .collect())
}

/// Brings the loopback interface up (the kernel then gives it 127.0.0.1/8 and ::1).
pub fn loopback_up() -> Result<()> {
    loopback_up_in(&Paths::default())
}

/// [`loopback_up`] with overridable paths.
pub fn loopback_up_in(paths: &Paths) -> Result<()> {
    let index_path = paths.sys_class_net.join("lo/ifindex");
    let index: u32 = read_trimmed(&index_path)?
        .parse()
        .with_context(|| format!("parsing {}", index_path.display()))?;
    let mut socket = netlink::Socket::open().context("opening a netlink socket")?;
    socket
        .request(|seq| netlink::link_up(seq, index))
        .context("bringing lo up")
}

/// Parses `"10.0.2.15/24"`.
pub fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8)> {
    let (address, prefix) = text.split_once('/').with_context(|| {
        format!("`{text}`: expected an IPv4 address with prefix length, like \"10.0.2.15/24\"")
    })?;
    let address: Ipv4Addr = address
        .parse()
        .with_context(|| format!("`{text}`: `{address}` is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .with_context(|| format!("`{text}`: prefix length `{prefix}` is not 0-32"))?;
    Ok((address, prefix))
}

/// Where the address configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Static, from `[network]`.
    Static,
    /// A DHCP lease.
    Dhcp(Lease),
}

/// The configured state of the Ethernet interface.
#[derive(Debug, Clone)]
pub struct Configured {
    /// The configured interface.
    pub interface: Interface,
    /// Its IPv4 address.
    pub address: Ipv4Addr,
    /// Prefix length of the address.
    pub prefix: u8,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
    /// DNS servers written to resolv.conf.
    pub dns: Vec<Ipv4Addr>,
    /// Static configuration or the DHCP lease.
    pub source: Source,
    /// When [`Configured::renew`] should next run (DHCP only).
    next_renewal: Option<Instant>,
}

impl Configured {
    /// When the supervisor should call [`Configured::renew`]: T1 of the lease, then retries;
    /// `None` for a static configuration.
    pub fn renewal_due(&self) -> Option<Instant> {
        self.next_renewal
    }

    /// NTP servers from the DHCP lease (option 42); empty for a static configuration.
    pub fn ntp_servers(&self) -> Vec<Ipv4Addr> {
        match &self.source {
            Source::Static => Vec::new(),
            Source::Dhcp(lease) => lease.ntp.clone(),
        }
    }

    /// Renews the DHCP lease (unicast before T2, broadcast after, a new lease after expiry or
    /// refusal) and applies any change. On failure the lease is kept and the next attempt is
    /// scheduled halfway to T2 (or expiry), at least a minute away.
    pub fn renew(&mut self, paths: &Paths) -> Result<()> {
        let Source::Dhcp(lease) = &self.source else {
            return Ok(());
        };
        let lease = lease.clone();
        let now = Instant::now();
        let client = dhcp::Client::new(&self.interface.name, self.interface.mac);
        let result = if now >= lease.expires_at() {
            client.obtain()
        } else {
            match client.renew(&lease) {
                Err(dhcp::DhcpError::Nak { .. }) => client.obtain(),
                other => other,
            }
        };
        match result {
            Ok(new_lease) => {
                let mut socket = netlink::Socket::open().context("opening a netlink socket")?;
                if new_lease.address != self.address || new_lease.prefix != self.prefix {
                    socket
                        .request(|seq| {
                            netlink::delete_address(
                                seq,
                                self.interface.index,
                                self.address,
                                self.prefix,
                            )
                        })
                        .with_context(|| {
                            format!(
                                "removing {}/{} from {}",
                                self.address, self.prefix, self.interface.name
                            )
                        })?;
                }
                let configured = apply(
                    &mut socket,
                    &self.interface,
                    &new_lease_config(&new_lease),
                    paths,
                )?;
                *self = configured;
                self.next_renewal = Some(new_lease.renew_at());
                self.source = Source::Dhcp(new_lease);
                Ok(())
            }
            Err(e) => {
                let limit = if Instant::now() < lease.rebind_at() {
                    lease.rebind_at()
                } else {
                    lease.expires_at()
                };
                let wait = (limit.saturating_duration_since(Instant::now()) / 2)
                    .max(Duration::from_secs(60));
                self.next_renewal = Some(Instant::now() + wait);
                Err(e)
                    .with_context(|| format!("renewing the DHCP lease of {}", self.interface.name))
            }
        }
    }
}

/// One log line: `ens3 10.0.2.15/24 via 10.0.2.2, dns 10.0.2.3 (dhcp from 10.0.2.2, lease 86400s)`.
impl std::fmt::Display for Configured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}/{}",
            self.interface.name, self.address, self.prefix
        )?;
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        if !self.dns.is_empty() {
            let dns: Vec<String> = self.dns.iter().map(ToString::to_string).collect();
            write!(f, ", dns {}", dns.join(" "))?;
        }
        match &self.source {
            Source::Static => write!(f, " (static)"),
            Source::Dhcp(lease) => write!(
                f,
                " (dhcp from {}, lease {}s)",
                lease.server,
                lease.lease_time.as_secs()
            ),
        }
    }
}

/// An address configuration to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Addressing {
    address: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
    dns: Vec<Ipv4Addr>,
    domain: Option<String>,
    protocol: u8,
}

fn new_lease_config(lease: &Lease) -> Addressing {
    Addressing {
        address: lease.address,
        prefix: lease.prefix,
        gateway: lease.router,
        dns: lease.dns.clone(),
        domain: lease.domain.clone(),
        protocol: RTPROT_DHCP,
    }
}

fn static_config(cfg: &Network) -> Result<Addressing> {
    let address = cfg
        .address
        .as_deref()
        .context("[network] mode = \"static\" needs `address`")?;
    let (address, prefix) = parse_cidr(address).context("[network] address")?;
    let gateway = cfg
        .gateway
        .as_deref()
        .map(|g| {
            g.parse::<Ipv4Addr>()
                .with_context(|| format!("[network] gateway `{g}` is not an IPv4 address"))
        })
        .transpose()?;
    let dns = cfg
        .dns
        .iter()
        .map(|d| {
            d.parse::<Ipv4Addr>()
                .with_context(|| format!("[network] dns `{d}` is not an IPv4 address"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Addressing {
        address,
        prefix,
        gateway,
        dns,
        domain: None,
        protocol: RTPROT_BOOT,
    })
}

fn in_subnet(address: Ipv4Addr, network: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(address) & mask == u32::from(network) & mask
}

/// Sets the address and default route and writes resolv.conf.
fn apply(
    socket: &mut netlink::Socket,
    interface: &Interface,
    addressing: &Addressing,
    paths: &Paths,
) -> Result<Configured> {
    let name = &interface.name;
    let (address, prefix) = (addressing.address, addressing.prefix);
    socket
        .request(|seq| netlink::new_address(seq, interface.index, address, prefix))
        .with_context(|| format!("adding {address}/{prefix} to {name}"))?;
    if let Some(gateway) = addressing.gateway {
        if !in_subnet(gateway, address, prefix) {
            // A gateway outside the subnet (common in clouds) needs a route to itself first.
            let host = Route {
                destination: gateway,
                prefix: 32,
                gateway: None,
                interface: interface.index,
                protocol: addressing.protocol,
            };
            socket
                .request(|seq| netlink::new_route(seq, &host))
                .with_context(|| format!("adding a route to gateway {gateway} on {name}"))?;
        }
        let default = Route {
            destination: Ipv4Addr::UNSPECIFIED,
            prefix: 0,
            gateway: Some(gateway),
            interface: interface.index,
            protocol: addressing.protocol,
        };
        socket
            .request(|seq| netlink::new_route(seq, &default))
            .with_context(|| format!("adding the default route via {gateway} on {name}"))?;
    }
    write_resolv_conf(
        &paths.resolv_conf,
        &addressing.dns,
        addressing.domain.as_deref(),
    )?;
    Ok(Configured {
        interface: interface.clone(),
        address,
        prefix,
        gateway: addressing.gateway,
        dns: addressing.dns.clone(),
        source: Source::Static,
        next_renewal: None,
    })
}

/// The text of a resolv.conf naming `dns` (and searching `domain`).
pub fn resolv_conf_text(dns: &[Ipv4Addr], domain: Option<&str>) -> String {
    let mut text = String::from("# Written by plinth-init from the network configuration.\n");
    if let Some(domain) = domain {
        text.push_str(&format!("search {domain}\n"));
    }
    for server in dns {
        text.push_str(&format!("nameserver {server}\n"));
    }
    text
}

/// Writes resolv.conf atomically (temporary file, then rename).
pub fn write_resolv_conf(path: &Path, dns: &[Ipv4Addr], domain: Option<&str>) -> Result<()> {
    let temporary = path.with_extension("plinth-tmp");
    std::fs::write(&temporary, resolv_conf_text(dns, domain))
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path)
        .with_context(|| format!("renaming {} to {}", temporary.display(), path.display()))
}

/// Configures the first Ethernet interface from `[network]`: brings it up, then either applies
/// the static address or obtains a DHCP lease, sets the address and default route, and writes
/// the DNS servers. Waits up to 10 s for the interface to appear.
pub fn configure(cfg: &Network, paths: &Paths) -> Result<Configured> {
    let interface = wait_for_ethernet(&paths.sys_class_net, Duration::from_secs(10))?;
    configure_interface(cfg, &interface, paths)
}

/// [`configure`] for a given interface.
pub fn configure_interface(
    cfg: &Network,
    interface: &Interface,
    paths: &Paths,
) -> Result<Configured> {
    let name = &interface.name;
    let mut socket = netlink::Socket::open().context("opening a netlink socket")?;
    socket
        .request(|seq| netlink::link_up(seq, interface.index))
        .with_context(|| format!("bringing {name} up"))?;
    match cfg.mode {
        NetworkMode::Static => {
            let addressing = static_config(cfg)?;
            apply(&mut socket, interface, &addressing, paths)
        }
        NetworkMode::Dhcp => {
            // Without an address there is no route for 255.255.255.255; this link route sends
            // DHCP broadcasts out of this interface (the socket API has no SO_BINDTODEVICE here).
            let broadcast = Route {
                destination: Ipv4Addr::BROADCAST,
                prefix: 32,
                gateway: None,
                interface: interface.index,
                protocol: RTPROT_BOOT,
            };
            socket
                .request(|seq| netlink::new_route(seq, &broadcast))
                .with_context(|| format!("adding the broadcast route on {name}"))?;
            let lease = dhcp::Client::new(name, interface.mac).obtain()?;
            let mut configured = apply(&mut socket, interface, &new_lease_config(&lease), paths)?;
            configured.next_renewal = Some(lease.renew_at());
            configured.source = Source::Dhcp(lease);
            Ok(configured)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_link(root: &Path, name: &str, kind: &str, device: bool, index: u32) {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("type"), format!("{kind}\n")).expect("type");
        std::fs::write(dir.join("ifindex"), format!("{index}\n")).expect("ifindex");
        std::fs::write(dir.join("address"), "52:54:00:12:34:56\n").expect("address");
        if device {
            std::fs::create_dir(dir.join("device")).expect("device");
        }
    }

    #[test]
    fn first_physical_ethernet_is_chosen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        assert_eq!(find_ethernet(root).expect("lists"), None);
        fake_link(root, "lo", "772", false, 1);
        fake_link(root, "docker0", "1", false, 3);
        fake_link(root, "wlan0", "801", true, 5);
        fake_link(root, "ens4", "1", true, 4);
        fake_link(root, "ens3", "1", true, 2);
        let found = find_ethernet(root).expect("lists").expect("found");
        assert_eq!(
            found,
            Interface {
                name: "ens3".into(),
                index: 2,
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56]
            }
        );
        std::fs::write(root.join("ens3/address"), "zz\n").expect("write");
        let err = find_ethernet(root).expect_err("bad mac");
        assert!(format!("{err:#}").contains("ens3/address"), "{err:#}");
    }

    #[test]
    fn waiting_for_an_interface_times_out_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = wait_for_ethernet(dir.path(), Duration::from_millis(150)).expect_err("none");
        assert!(err.to_string().contains("no Ethernet interface"), "{err}");
    }

    #[test]
    fn static_configuration_parses() {
        let cfg = Network {
            mode: NetworkMode::Static,
            address: Some("192.168.10.5/24".into()),
            gateway: Some("192.168.10.1".into()),
            dns: vec!["192.168.10.1".into(), "9.9.9.9".into()],
        };
        let a = static_config(&cfg).expect("parses");
        assert_eq!(a.address, Ipv4Addr::new(192, 168, 10, 5));
        assert_eq!(a.prefix, 24);
        assert_eq!(a.gateway, Some(Ipv4Addr::new(192, 168, 10, 1)));
        assert_eq!(a.dns.len(), 2);
        let bad = Network {
            gateway: Some("router".into()),
            ..cfg.clone()
        };
        let err = static_config(&bad).expect_err("bad gateway");
        assert!(err.to_string().contains("gateway `router`"), "{err}");
        for text in ["10.0.0.1", "10.0.0.1/33", "10.0.0/8"] {
            assert!(parse_cidr(text).is_err(), "{text}");
        }
        assert!(in_subnet(
            Ipv4Addr::new(10, 0, 2, 2),
            Ipv4Addr::new(10, 0, 2, 15),
            24
        ));
        assert!(!in_subnet(
            Ipv4Addr::new(10, 0, 3, 1),
            Ipv4Addr::new(10, 0, 2, 15),
            24
        ));
        assert!(in_subnet(
            Ipv4Addr::new(1, 2, 3, 4),
            Ipv4Addr::new(10, 0, 2, 15),
            0
        ));
    }

    #[test]
    fn configuration_reads_as_one_line() {
        let configured = Configured {
            interface: Interface {
                name: "ens3".into(),
                index: 2,
                mac: [0; 6],
            },
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix: 24,
            gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
            dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
            source: Source::Static,
            next_renewal: None,
        };
        assert_eq!(
            configured.to_string(),
            "ens3 10.0.2.15/24 via 10.0.2.2, dns 10.0.2.3 (static)"
        );
        assert_eq!(configured.renewal_due(), None);
    }

    #[test]
    fn resolv_conf_is_written_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("resolv.conf");
        write_resolv_conf(
            &path,
            &[Ipv4Addr::new(10, 0, 2, 3)],
            Some("example.internal"),
        )
        .expect("writes");
        assert_eq!(
            std::fs::read_to_string(&path).expect("reads"),
            "# Written by plinth-init from the network configuration.\nsearch example.internal\nnameserver 10.0.2.3\n"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("lists").count(),
            1,
            "no temporary left"
        );
    }

    /// Runs `ip` (iproute2) in the calling thread's network namespace and returns its output.
    fn ip(args: &str) -> String {
        let output = std::process::Command::new("ip")
            .args(args.split_whitespace())
            .output()
            .expect("running ip (install iproute2)");
        assert!(
            output.status.success(),
            "ip {args}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A DHCP server that answers like QEMU's: OFFER/ACK 10.0.2.15/24, router 10.0.2.2,
    /// DNS 10.0.2.3, broadcast unless the client already has an address.
    fn serve_dhcp(socket: &std::net::UdpSocket, replies: usize) -> Vec<dhcp::MessageType> {
        use dhcp::{option, MessageType, Packet};
        let mut seen = Vec::new();
        let mut buffer = [0u8; 1500];
        while seen.len() < replies {
            let (length, _) = socket.recv_from(&mut buffer).expect("server receives");
            let request = Packet::decode(&buffer[..length]).expect("request decodes");
            let kind = request.message_type().expect("message type");
            seen.push(kind);
            let answer = match kind {
                MessageType::Discover => MessageType::Offer,
                MessageType::Request => MessageType::Ack,
                other => panic!("unexpected {other:?}"),
            };
            let reply = Packet {
                op: 2,
                xid: request.xid,
                secs: 0,
                broadcast: request.broadcast,
                ciaddr: request.ciaddr,
                yiaddr: Ipv4Addr::new(10, 0, 2, 15),
                siaddr: Ipv4Addr::new(10, 0, 2, 2),
                giaddr: Ipv4Addr::UNSPECIFIED,
                chaddr: request.chaddr,
                options: vec![
                    (option::MESSAGE_TYPE, vec![answer as u8]),
                    (option::SERVER_ID, vec![10, 0, 2, 2]),
                    (option::SUBNET_MASK, vec![255, 255, 255, 0]),
                    (option::ROUTER, vec![10, 0, 2, 2]),
                    (option::DNS, vec![10, 0, 2, 3]),
                    (option::LEASE_TIME, 86400u32.to_be_bytes().to_vec()),
                    (option::RENEWAL_TIME, 3600u32.to_be_bytes().to_vec()),
                ],
            };
            let to = if request.ciaddr.is_unspecified() {
                Ipv4Addr::BROADCAST
            } else {
                request.ciaddr
            };
            socket
                .send_to(&reply.encode(), (to, dhcp::CLIENT_PORT))
                .expect("server sends");
        }
        seen
    }

    /// The whole DHCP path against the real kernel: two network namespaces joined by a veth pair,
    /// a DHCP server in one, `configure_interface` and `renew` in the other.
    #[test]
    #[ignore = "needs root: creates network namespaces (run: cargo test -p init -- --ignored)"]
    fn dhcp_configures_a_veth_in_a_namespace() {
        use rustix::thread::{unshare, UnshareFlags};
        use std::sync::mpsc;
        let (tid_tx, tid_rx) = mpsc::channel();
        let (created_tx, created_rx) = mpsc::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            unshare(UnshareFlags::NEWNET).expect("creating a network namespace (needs root)");
            tid_tx
                .send(rustix::thread::gettid().as_raw_nonzero().get())
                .expect("sending tid");
            created_rx.recv().expect("veth created");
            ip("addr add 10.0.2.2/24 dev veth1");
            ip("link set veth1 up");
            ip("route add 255.255.255.255/32 dev veth1");
            let socket = std::net::UdpSocket::bind("0.0.0.0:67").expect("binding port 67");
            socket.set_broadcast(true).expect("SO_BROADCAST");
            socket
                .set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            ready_tx.send(()).expect("ready");
            serve_dhcp(&socket, 3)
        });
        let server_tid = tid_rx.recv().expect("server namespace");
        let client = std::thread::spawn(move || {
            unshare(UnshareFlags::NEWNET).expect("creating a network namespace (needs root)");
            ip(&format!(
                "link add veth0 address 52:54:00:12:34:56 type veth peer name veth1 netns {server_tid}"
            ));
            created_tx.send(()).expect("created");
            ready_rx.recv().expect("server ready");

            loopback_up().expect("lo up");
            let probe = std::net::UdpSocket::bind("127.0.0.1:0").expect("loopback works");
            probe
                .connect(probe.local_addr().expect("addr"))
                .expect("connect");
            probe.send(b"x").expect("loopback send");

            let link = ip("-o link show veth0");
            let index: u32 = link
                .split(':')
                .next()
                .expect("index")
                .trim()
                .parse()
                .expect("number");
            let interface = Interface {
                name: "veth0".into(),
                index,
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            };
            let dir = tempfile::tempdir().expect("tempdir");
            let paths = Paths {
                sys_class_net: dir.path().join("unused"),
                resolv_conf: dir.path().join("resolv.conf"),
            };
            let started = Instant::now();
            let mut configured = configure_interface(&Network::default(), &interface, &paths)
                .expect("DHCP configuration");
            let took = started.elapsed();
            assert_eq!(configured.address, Ipv4Addr::new(10, 0, 2, 15));
            assert_eq!(configured.prefix, 24);
            assert_eq!(configured.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
            assert_eq!(configured.dns, [Ipv4Addr::new(10, 0, 2, 3)]);
            let due = configured.renewal_due().expect("renewal scheduled");
            assert!(
                due > Instant::now() + Duration::from_secs(3500),
                "T1 from option 58"
            );
            assert!(ip("-4 -o addr show dev veth0").contains("inet 10.0.2.15/24"));
            let routes = ip("-4 route show default");
            assert!(
                routes.contains("default via 10.0.2.2 dev veth0 proto dhcp"),
                "{routes}"
            );
            assert!(std::fs::read_to_string(&paths.resolv_conf)
                .expect("resolv.conf")
                .contains("nameserver 10.0.2.3\n"));
            configured.renew(&paths).expect("renewing by unicast");
            assert!(
                configured.renewal_due().expect("due") > Instant::now() + Duration::from_secs(3500)
            );
            took
        });
        let took = client.join().expect("client thread");
        let seen = server.join().expect("server thread");
        use dhcp::MessageType::{Discover, Request};
        assert_eq!(seen, [Discover, Request, Request]);
        assert!(took < Duration::from_secs(5), "DHCP took {took:?}");
    }
}
