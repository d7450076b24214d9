//! The rules a definition's values follow beyond their types: names, URLs, image references,
//! addresses, ports, mounts, `[[file]]` paths and the rules between keys. Each rule names what is
//! allowed; [`definition`] applies them all and says which key broke one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::definition::{
    Container, Definition, LogDriver, Network, NetworkDriver, NetworkMode, ServiceMode, Source,
    Swarm, SwarmRole, UpdateStrategy,
};
use crate::diagnostic::KeyPath;
use crate::units::ByteSize;

/// A broken rule: the keys it is about (the first one present in the file is blamed) and what is
/// allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub paths: Vec<KeyPath>,
    pub message: String,
}

trait At {
    fn at(self, path: &KeyPath) -> Result<(), Problem>;
}

impl At for Result<(), String> {
    fn at(self, path: &KeyPath) -> Result<(), Problem> {
        self.map_err(|message| Problem {
            paths: vec![path.clone()],
            message,
        })
    }
}

/// [`At::at`] for a rule that also returns the parsed value.
trait AtValue<T> {
    fn at_value(self, path: &KeyPath) -> Result<T, Problem>;
}

impl<T> AtValue<T> for Result<T, String> {
    fn at_value(self, path: &KeyPath) -> Result<T, Problem> {
        self.map_err(|message| Problem {
            paths: vec![path.clone()],
            message,
        })
    }
}

fn fail(path: &KeyPath, message: String) -> Result<(), Problem> {
    Err(message).at(path)
}

/// The shortest `[update] interval`: the agent polls no more often than this.
pub const MIN_UPDATE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// The shortest health-check interval.
pub const MIN_HEALTH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest maintenance window.
pub const MAX_WINDOW: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);
/// The largest disk image a definition may describe (16 TiB, the largest file ext4 holds).
pub const MAX_DISK: u64 = 16 << 40;
/// Longest kernel module name (the kernel's `MODULE_NAME_LEN` less its terminating NUL).
pub const MAX_MODULE_NAME: usize = 55;

/// A Debian package name (Debian policy 5.6.1), shared by `[debian] packages`, `[kernel] package`
/// and `[[container]] build.packages`.
pub fn package_name(name: &str) -> Result<(), String> {
    let ok = name.len() >= 2
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("`{name}` is not a Debian package name: at least 2 of lowercase letters, digits, `+`, `-`, `.`, starting with a letter or digit"))
    }
}

/// A Debian suite or component name: `bookworm`, `bookworm-backports`, `non-free-firmware`.
pub fn archive_name(name: &str, what: &str) -> Result<(), String> {
    let ok = name.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a {what} name: lowercase letters, digits and `-`, starting with a letter"
        ))
    }
}

/// A kernel module name: `[a-zA-Z0-9_-]`, 1 to 55 characters.
pub fn module_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_MODULE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a kernel module name: 1 to {MAX_MODULE_NAME} letters, digits, `_` or `-`"
        ))
    }
}

/// A DNS name of RFC 1123 labels (letters, digits, `-` inside), at most 253 characters.
fn is_dns_name(text: &str) -> bool {
    text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The machine's host name: RFC 1123 labels of lowercase letters, digits and inner `-`.
pub fn hostname(name: &str) -> Result<(), String> {
    if is_dns_name(name) && !name.bytes().any(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(format!("`{name}` is not a host name: dot-separated labels of 1 to 63 lowercase letters, digits and `-` (not first or last), at most 253 characters"))
    }
}

/// A URL's parts, as [`url`] reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url<'a> {
    pub scheme: &'a str,
    /// Without brackets for an IPv6 literal; empty for `file:`.
    pub host: &'a str,
    pub port: Option<u16>,
    pub path: &'a str,
}

/// Parses `scheme://host[:port][/path]` (host a DNS name, an IPv4 address or a bracketed IPv6
/// literal, port 1-65535) or `file:///path`, for one of `schemes`.
pub fn url<'a>(text: &'a str, schemes: &[&str]) -> Result<Url<'a>, String> {
    let mut allowed: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
    let last = allowed.pop().unwrap_or_default();
    let allowed = match allowed.is_empty() {
        true => last,
        false => format!("{} or {last}", allowed.join(", ")),
    };
    let bad = |why: &str| format!("`{text}` {why} (expected an {allowed} URL)");
    let file = text
        .strip_prefix("file://")
        .or_else(|| text.strip_prefix("file:"));
    let (scheme, rest) = match file {
        Some(rest) => ("file", rest),
        None => text.split_once("://").ok_or_else(|| bad("is not a URL"))?,
    };
    if !schemes.contains(&scheme) {
        return Err(bad("has the wrong scheme"));
    }
    if let Some(c) = text.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(&format!("holds {c:?}")));
    }
    if scheme == "file" {
        if !rest.starts_with('/') {
            return Err(bad(
                "names no absolute path: a file URL is file:///absolute/path",
            ));
        }
        return Ok(Url {
            scheme,
            host: "",
            port: None,
            path: rest,
        });
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.contains('@') {
        return Err(bad("holds a user name: put no credentials in a definition"));
    }
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let (literal, after) = inner
            .split_once(']')
            .ok_or_else(|| bad("has no `]` closing its IPv6 address"))?;
        literal
            .parse::<Ipv6Addr>()
            .map_err(|_| bad(&format!("has `{literal}`, which is not an IPv6 address")))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| bad("has text after its IPv6 address"))?,
            ),
        };
        (literal, port)
    } else {
        if authority.matches(':').count() > 1 {
            return Err(bad(
                "holds an IPv6 address without brackets: write it like http://[::1]:8080/",
            ));
        }
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        if host.parse::<Ipv4Addr>().is_err() && !is_dns_name(host) {
            return Err(bad(&format!("has host `{host}`, which is neither a DNS name nor an IPv4 address (an IPv6 address goes in brackets: http://[::1]:8080/)")));
        }
        (host, port)
    };
    let port = port
        .map(|p| {
            parse_port_number(p)
                .ok_or_else(|| bad(&format!("has port `{p}`: expected a number 1-65535")))
        })
        .transpose()?;
    Ok(Url {
        scheme,
        host,
        port,
        path,
    })
}

/// A port number: decimal digits only, 1-65535.
fn parse_port_number(text: &str) -> Option<u16> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|p| *p > 0)
}

/// Parses a published port `"HOST:CONTAINER[/tcp|/udp]"` into (host, container, protocol); ports
/// are digits only, 1-65535.
pub fn parse_port(text: &str) -> Option<(u16, u16, &str)> {
    let (ports, proto) = match text.split_once('/') {
        Some((p, proto @ ("tcp" | "udp"))) => (p, proto),
        Some(_) => return None,
        None => (text, "tcp"),
    };
    let (host, guest) = ports.split_once(':')?;
    Some((parse_port_number(host)?, parse_port_number(guest)?, proto))
}

/// A `[[container]] ports` entry: `"[ADDR:]HOST:CONTAINER[/tcp|/udp]"`, where ADDR is an IPv4
/// or bracketed IPv6 address and HOST and CONTAINER are ports or equally long ranges `A-B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishedPort {
    /// The host address the port is bound on; `None` for every address.
    pub host_ip: Option<IpAddr>,
    /// First and last host port (equal for a single port).
    pub host: (u16, u16),
    /// First and last container port; as many as host ports.
    pub container: (u16, u16),
    /// `tcp` or `udp`.
    pub protocol: &'static str,
}

impl PublishedPort {
    /// How many ports the entry publishes.
    pub fn len(&self) -> u32 {
        u32::from(self.host.1 - self.host.0) + 1
    }

    /// Always false: an entry publishes at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Each (host port, container port) pair, in order.
    pub fn pairs(&self) -> impl Iterator<Item = (u16, u16)> + '_ {
        (self.host.0..=self.host.1).zip(self.container.0..=self.container.1)
    }

    /// Whether both entries may want the same host port: same protocol, overlapping ranges,
    /// and addresses that are equal or include each other (none given, `0.0.0.0` or `::`).
    pub fn clashes_with(&self, other: &PublishedPort) -> bool {
        let wide = |ip: Option<IpAddr>| ip.is_none_or(|ip| ip.is_unspecified());
        self.protocol == other.protocol
            && self.host.0 <= other.host.1
            && other.host.0 <= self.host.1
            && (wide(self.host_ip) || wide(other.host_ip) || self.host_ip == other.host_ip)
    }
}

/// A port or a range `A-B` (A ≤ B), each 1-65535.
fn port_range(text: &str) -> Option<(u16, u16)> {
    match text.split_once('-') {
        Some((first, last)) => {
            let range = (parse_port_number(first)?, parse_port_number(last)?);
            (range.0 <= range.1).then_some(range)
        }
        None => parse_port_number(text).map(|p| (p, p)),
    }
}

/// Parses a `[[container]] ports` entry (see [`PublishedPort`]); the error says what is allowed.
pub fn published_port(text: &str) -> Result<PublishedPort, String> {
    let bad = |why: &str| {
        format!("`{text}`: {why} (expected \"HOST:CONTAINER\", \"HOST:CONTAINER/udp\", \"127.0.0.1:HOST:CONTAINER\", \"[::1]:HOST:CONTAINER\" or ranges \"8000-8010:9000-9010\", ports of digits 1-65535)")
    };
    let (ports, protocol) = match text.split_once('/') {
        Some((p, "tcp")) => (p, "tcp"),
        Some((p, "udp")) => (p, "udp"),
        Some((_, other)) => return Err(bad(&format!("protocol `{other}` is not tcp or udp"))),
        None => (text, "tcp"),
    };
    let (host_ip, ports) = match ports.strip_prefix('[') {
        Some(inner) => {
            let (literal, rest) = inner
                .split_once("]:")
                .ok_or_else(|| bad("an IPv6 address in brackets is followed by `:`"))?;
            let ip = literal
                .parse::<Ipv6Addr>()
                .map_err(|_| bad(&format!("`{literal}` is not an IPv6 address")))?;
            (Some(IpAddr::V6(ip)), rest)
        }
        None => match ports.matches(':').count() {
            1 => (None, ports),
            2 => {
                let (address, rest) = ports.split_once(':').unwrap_or_default();
                let ip = address.parse::<Ipv4Addr>().map_err(|_| {
                    bad(&format!(
                        "`{address}` is not an IPv4 address (an IPv6 address goes in brackets)"
                    ))
                })?;
                (Some(IpAddr::V4(ip)), rest)
            }
            _ => return Err(bad("it is not two ports with an optional address")),
        },
    };
    let (host, container) = ports
        .split_once(':')
        .ok_or_else(|| bad("it is not two ports with an optional address"))?;
    let host = port_range(host)
        .ok_or_else(|| bad(&format!("`{host}` is not a port or an ascending range")))?;
    let container = port_range(container).ok_or_else(|| {
        bad(&format!(
            "`{container}` is not a port or an ascending range"
        ))
    })?;
    if host.1 - host.0 != container.1 - container.0 {
        return Err(bad("the host and container ranges differ in length"));
    }
    Ok(PublishedPort {
        host_ip,
        host,
        container,
        protocol,
    })
}

/// The Linux capabilities (`capabilities(7)`), without their `CAP_` prefix.
pub const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// A capability name for `cap-add`/`cap-drop`, with or without `CAP_`, in any case, or `ALL`;
/// returns the engine's form, `CAP_NET_ADMIN` or `ALL`.
pub fn capability(text: &str) -> Result<String, String> {
    let upper = text.to_ascii_uppercase();
    if upper == "ALL" {
        return Ok(upper);
    }
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    if CAPABILITIES.contains(&bare) {
        Ok(format!("CAP_{bare}"))
    } else {
        Err(format!(
            "`{text}` is not a Linux capability: expected ALL or one of {} (with or without CAP_)",
            CAPABILITIES.join(", ")
        ))
    }
}

/// A container's `user`: a name or number, optionally `:group` (`"1000:1000"`, `"nobody"`).
pub fn container_user(text: &str) -> Result<(), String> {
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 32
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    };
    let ok = match text.split_once(':') {
        Some((user, group)) => part(user) && part(group),
        None => part(text),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("`{text}` is not a user: expected a name or number, optionally with `:group`, like \"1000:1000\" or \"nobody\" (letters, digits, `_`, `.`, `-`)"))
    }
}

/// A log file size as the engine's log drivers read it: digits and `k`, `m` or `g`, like `10m`.
pub fn log_size(text: &str) -> Result<(), String> {
    let ok = text.len() >= 2
        && text.len() <= 12
        && text.ends_with(['k', 'm', 'g'])
        && text[..text.len() - 1].bytes().all(|b| b.is_ascii_digit())
        && text[..text.len() - 1].bytes().any(|b| b != b'0');
    if ok {
        Ok(())
    } else {
        Err(format!("`{text}` is not a log size: expected a number above 0 followed by k, m or g, like \"10m\""))
    }
}

/// A network's address range: an IPv4 or IPv6 address with a prefix length, like
/// `"172.30.0.0/24"` or `"fd00:1::/64"`.
pub fn subnet(text: &str) -> Result<(), String> {
    let ok = text.split_once('/').is_some_and(|(address, prefix)| {
        let max = match address.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => 32,
            Ok(IpAddr::V6(_)) => 128,
            Err(_) => return false,
        };
        !prefix.is_empty()
            && prefix.len() <= 3
            && prefix.bytes().all(|b| b.is_ascii_digit())
            && prefix.parse::<u8>().is_ok_and(|p| p <= max)
    });
    if ok {
        Ok(())
    } else {
        Err(format!("`{text}` is not a subnet: expected an IPv4 or IPv6 address with a prefix length, like \"172.30.0.0/24\" or \"fd00:1::/64\""))
    }
}

/// A container image reference as the engine reads it: `[host[:port]/]path[:tag][@sha256:hex]`,
/// with path components of lowercase letters and digits joined by `.`, `_`, `__` or dashes, a
/// tag of `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}` and a digest of 64 hex digits.
pub fn image_reference(text: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "`{text}` is not an image reference: {why} (expected [host[:port]/]name[:tag][@sha256:<64 hex>], like \"busybox:1.36\" or \"registry.example:5000/team/app:2\")"
        ))
    };
    let (rest, digest) = match text.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (text, None),
    };
    if let Some(digest) = digest {
        let hex = digest.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return bad("a digest is sha256: and 64 lowercase hex digits");
        }
    }
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let ok = tag.len() <= 128
            && tag.bytes().next().is_some_and(word)
            && tag.bytes().all(|b| word(b) || b == b'.' || b == b'-');
        if !ok {
            return bad(&format!("tag `{tag}` is not 1 to 128 of letters, digits, `_`, `.`, `-` (not starting with `.` or `-`)"));
        }
    }
    if name.is_empty() {
        return bad("the name is empty");
    }
    if name.len() > 255 {
        return bad("the name is longer than 255 characters");
    }
    let mut components: Vec<&str> = name.split('/').collect();
    let first = components[0];
    let is_domain = components.len() > 1
        && (first.contains(['.', ':'])
            || first == "localhost"
            || first.bytes().any(|b| b.is_ascii_uppercase()));
    if is_domain {
        let (host, port) = match first.strip_prefix('[') {
            Some(inner) => match inner.split_once(']') {
                Some((literal, after)) if literal.parse::<Ipv6Addr>().is_ok() => (None, after),
                _ => return bad(&format!("registry `{first}` is not a host")),
            },
            None => match first.split_once(':') {
                Some((h, p)) => (Some(h), p),
                None => (Some(first), ""),
            },
        };
        if host.is_some_and(|h| !is_dns_name(h)) {
            return bad(&format!("registry `{first}` is not a host name"));
        }
        let port = match port {
            "" => None,
            p => p
                .strip_prefix(':')
                .or(if host.is_some() { Some(p) } else { None }),
        };
        if port.is_some_and(|p| parse_port_number(p).is_none()) {
            return bad(&format!("registry `{first}` has a bad port"));
        }
        components.remove(0);
    }
    for component in components {
        if !is_path_component(component) {
            return bad(&format!("path component `{component}` is not lowercase letters and digits joined by `.`, `_`, `__` or `-`"));
        }
    }
    Ok(())
}

/// `[a-z0-9]+` joined by one of `.`, `_`, `__`, or a run of `-`.
fn is_path_component(text: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = text.as_bytes();
    if !bytes.first().copied().is_some_and(alnum) || !bytes.last().copied().is_some_and(alnum) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &text[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// An environment variable name: not empty, no `=`, no NUL.
pub fn env_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.contains(['=', '\0']) {
        Err(format!(
            "`{}` is not an environment variable name: it must be non-empty, without `=` or NUL",
            key.escape_debug()
        ))
    } else {
        Ok(())
    }
}

fn no_nul(text: &str) -> Result<(), String> {
    if text.contains('\0') {
        Err(format!("`{}` holds a NUL character", text.escape_debug()))
    } else {
        Ok(())
    }
}

/// An IPv4 address with prefix length, `"10.0.2.15/24"` (what the network setup on the machine reads).
pub fn ipv4_cidr(text: &str) -> Result<(), String> {
    let ok = text.split_once('/').is_some_and(|(address, prefix)| {
        address.parse::<Ipv4Addr>().is_ok()
            && !prefix.is_empty()
            && prefix.len() <= 2
            && prefix.bytes().all(|b| b.is_ascii_digit())
            && prefix.parse::<u8>().is_ok_and(|p| p <= 32)
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{text}` is not an IPv4 address with prefix length 0-32, like \"10.0.2.15/24\""
        ))
    }
}

fn ipv4(text: &str) -> Result<(), String> {
    text.parse::<Ipv4Addr>()
        .map(|_| ())
        .map_err(|_| format!("`{text}` is not an IPv4 address, like \"10.0.2.2\""))
}

/// The lexical normal form of an absolute path: no empty, `.` or `..` components, no trailing
/// `/`. `None` when `path` is not absolute or `..` climbs above `/`.
pub fn normal_form(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            _ => parts.push(part),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// An absolute path that is already in its normal form, without control characters.
fn normal_path(path: &str, what: &str) -> Result<(), String> {
    if let Some(c) = path.chars().find(|c| c.is_control()) {
        return Err(format!(
            "{what} `{}` holds {c:?}: control characters are not allowed",
            path.escape_debug()
        ));
    }
    match normal_form(path) {
        None => Err(format!(
            "{what} `{path}` is not an absolute path inside `/`"
        )),
        Some(normal) if normal != path => Err(format!(
            "{what} `{path}` is not normalised: write `{normal}`"
        )),
        Some(_) => Ok(()),
    }
}

/// A bind mount the engine accepts and the machine can create: `"/var/HOST:/CONTAINER"` with an
/// optional `:ro` or `:rw`, both paths absolute and normalised, the host side under `/var`.
pub fn mount(text: &str) -> Result<(), String> {
    let expected = "expected \"/var/...:/path\" or \"/var/...:/path:ro\" (host side under /var; options ro or rw)";
    let mut parts = text.split(':');
    let (Some(host), Some(guest)) = (parts.next(), parts.next()) else {
        return Err(format!("`{text}`: {expected}"));
    };
    match (parts.next(), parts.next()) {
        (None, _) | (Some("ro" | "rw"), None) => {}
        (Some(option), None) => {
            return Err(format!(
                "`{text}`: option `{option}` is not supported; {expected}"
            ))
        }
        _ => return Err(format!("`{text}`: {expected}")),
    }
    normal_path(host, "host path").map_err(|e| format!("`{text}`: {e}; {expected}"))?;
    normal_path(guest, "container path").map_err(|e| format!("`{text}`: {e}; {expected}"))?;
    if !host.starts_with("/var/") {
        return Err(format!("`{text}`: {expected}"));
    }
    if guest == "/" {
        return Err(format!(
            "`{text}`: the container's `/` cannot be a mount; {expected}"
        ));
    }
    Ok(())
}

/// `[[file]] path`: absolute, normalised, without control characters, in a part of the tree the
/// build writes and the machine shows. Returns the merged-/usr relative path.
pub fn file_path(path: &str) -> Result<String, String> {
    normal_path(path, "path")?;
    if path.split('/').any(|c| c.len() > 255) || path.len() > 4095 {
        return Err(format!(
            "path `{path}` is too long: at most 255 bytes a component and 4095 in all"
        ));
    }
    let rel = crate::rootfs::merge_usr(path.trim_start_matches('/'));
    let top = rel.split('/').next().unwrap_or("");
    if crate::rootfs::RUNTIME_MOUNTS.contains(&top) {
        return Err(format!(
            "path `{path}`: /{top} is mounted over at run time, so a file there would be hidden; allowed are paths in /etc, /usr and other directories of the read-only root"
        ));
    }
    if crate::rootfs::DIRECTORIES.contains(&rel.as_str())
        || crate::rootfs::MOUNTPOINTS.contains(&rel.as_str())
    {
        return Err(format!(
            "path `{path}` is a directory every image has; give a file path inside it"
        ));
    }
    for (owned, instead) in crate::rootfs::OWNED_FILES {
        if rel == owned || rel.starts_with(&format!("{owned}/")) {
            return Err(format!(
                "path `{path}` is written by Plinth itself ({instead})"
            ));
        }
    }
    let archives = crate::rootfs::IMAGE_ARCHIVES;
    if rel == crate::rootfs::IMAGE_DEFINITION || rel.starts_with(&format!("{archives}/")) {
        return Err(format!(
            "path `{path}` is written by Plinth itself (the image's definition and container archives)"
        ));
    }
    Ok(rel)
}

fn source(source: &Source, path: &KeyPath, url_ok: bool) -> Result<(), Problem> {
    match (&source.url, &source.path) {
        (Some(u), None) => {
            if !url_ok {
                return fail(&path.key("url"), format!("`{u}`: url sources are not supported here yet; download the file and use `path` (relative to the definition)"));
            }
            url(u, &["http", "https"]).map(|_| ()).at(&path.key("url"))
        }
        (None, Some(p)) if p.is_empty() || p.contains('\0') => fail(
            &path.key("path"),
            "expected a file path (relative to the definition)".to_owned(),
        ),
        (None, Some(_)) => Ok(()),
        _ => fail(path, "give exactly one of `url` or `path`".to_owned()),
    }
}

fn at_least(
    value: std::time::Duration,
    min: std::time::Duration,
    text: &str,
) -> Result<(), String> {
    if value < min {
        Err(format!(
            "`{}ms` is too short: at least {text}",
            value.as_millis()
        ))
    } else {
        Ok(())
    }
}

/// Checks every rule of `def`; the first broken one is returned.
pub fn definition(def: &Definition) -> Result<(), Problem> {
    let image = KeyPath::root("image");
    match &def.image.hostname {
        Some(name) => hostname(name.as_str()).at(&image.key("hostname"))?,
        None => hostname(def.image.name.as_str())
            .map_err(|e| {
                format!("{e}; the image name is the host name unless [image] hostname is set")
            })
            .at(&image.key("name"))?,
    }

    let debian = KeyPath::root("debian");
    archive_name(&def.debian.suite, "Debian suite").at(&debian.key("suite"))?;
    for (i, component) in def.debian.components.iter().enumerate() {
        archive_name(component, "Debian component").at(&debian.key("components").index(i))?;
    }
    for (i, package) in def.debian.packages.iter().enumerate() {
        package_name(package).at(&debian.key("packages").index(i))?;
    }
    for key in ["mirror", "security-mirror"] {
        let value = if key == "mirror" {
            &def.debian.mirror
        } else {
            &def.debian.security_mirror
        };
        if let Some(u) = value {
            url(u, &["http", "https", "file"])
                .map(|_| ())
                .at(&debian.key(key))?;
        }
    }
    if def
        .debian
        .keyring
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.contains('\0'))
    {
        fail(
            &debian.key("keyring"),
            "expected a file path (relative to the definition)".to_owned(),
        )?;
    }

    let kernel = KeyPath::root("kernel");
    package_name(&def.kernel.package).at(&kernel.key("package"))?;
    for (i, arg) in def.kernel.cmdline.iter().enumerate() {
        crate::cmdline::check_image_arg(arg).at(&kernel.key("cmdline").index(i))?;
    }
    for (i, module) in def.kernel.modules.iter().enumerate() {
        module_name(module).at(&kernel.key("modules").index(i))?;
    }
    for (i, module) in def.kernel.include_modules.iter().enumerate() {
        module_name(module).at(&kernel.key("include-modules").index(i))?;
    }
    for (i, platform) in def.kernel.platforms.iter().enumerate() {
        if def.kernel.platforms[..i].contains(platform) {
            fail(
                &kernel.key("platforms").index(i),
                format!(
                    "`{}` is listed twice; allowed: each of {} at most once",
                    platform.name(),
                    crate::modules::Platform::ALL
                        .map(|p| format!("`{}`", p.name()))
                        .join(", ")
                ),
            )?;
        }
    }

    engine(def)?;
    time(def)?;
    disk(def)?;
    network(&def.network)?;
    update(def)?;
    containers(def)?;
    dependency_cycles(def)?;
    swarm(def)?;
    services(def)?;
    files(def)
}

/// An NTP server: a host name, an IPv4 address or an IPv6 address (in brackets when a port
/// follows), with an optional `:port`, like `"time.example"`, `"10.0.0.1:123"`, `"[fd00::1]:123"`.
pub fn time_server(text: &str) -> Result<(), String> {
    host_port(text).map_err(|why| {
        format!(
            "`{text}` is not a time server: {why} (expected a host name or IP address with an optional :port, like \"time.example\", \"10.0.0.1:123\" or \"[fd00::1]:123\")"
        )
    })
}

/// A swarm manager to join (`[swarm] join`): a host name or IP address (IPv6 in brackets when a
/// port follows) with an optional `:port`, like `"10.0.0.1:2377"` or `"manager-1"`.
pub fn swarm_manager(text: &str) -> Result<(), String> {
    host_port(text).map_err(|why| {
        format!(
            "`{text}` is not a manager address: {why} (expected a host name or IP address with an optional :port, like \"10.0.0.1:2377\", \"manager-1\" or \"[fd00::1]:2377\")"
        )
    })
}

/// A host name or IP address with an optional `:port`; the error says why not.
fn host_port(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("it is empty".to_owned());
    }
    if text.contains("://") {
        return Err("give no scheme".to_owned());
    }
    if let Some(c) = text.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("it holds {c:?}"));
    }
    if text.parse::<Ipv6Addr>().is_ok() {
        return Ok(());
    }
    let (host, port) = match text.strip_prefix('[') {
        Some(inner) => match inner.split_once(']') {
            Some((literal, after)) if literal.parse::<Ipv6Addr>().is_ok() => {
                match after.strip_prefix(':') {
                    Some(port) => (None, Some(port)),
                    None if after.is_empty() => (None, None),
                    None => return Err("text follows the IPv6 address".to_owned()),
                }
            }
            _ => return Err("no IPv6 address in the brackets".to_owned()),
        },
        None => match text.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(text), None),
        },
    };
    if let Some(host) = host {
        if host.parse::<Ipv4Addr>().is_err() && !is_dns_name(host) {
            return Err(format!("`{host}` is neither a host name nor an IP address"));
        }
    }
    if port.is_some_and(|p| parse_port_number(p).is_none()) {
        return Err("the port is not a number 1-65535".to_owned());
    }
    Ok(())
}

/// A socket address to listen on: an IPv4 or bracketed IPv6 address and a port 1-65535, like
/// `"0.0.0.0:2376"` or `"[::]:2376"`.
pub fn listen_address(text: &str) -> Result<(), String> {
    match text.parse::<std::net::SocketAddr>() {
        Ok(address) if address.port() != 0 => Ok(()),
        _ => Err(format!(
            "`{text}` is not an address to listen on: expected IP:PORT with a port 1-65535, like \"0.0.0.0:2376\" or \"[::]:2376\""
        )),
    }
}

/// Whether an engine API address (an entry of Docker's `hosts`) is plain TCP: `tcp://…`, or an
/// address without a scheme, which Docker reads as TCP too.
pub fn is_tcp_host(host: &str) -> bool {
    match host.split_once("://") {
        Some((scheme, _)) => scheme.eq_ignore_ascii_case("tcp"),
        None => !host.is_empty(),
    }
}

/// `[engine]`: settings that have a JSON form, TLS files, the TLS address, and no engine API on
/// plain TCP unless it is protected by TLS or explicitly accepted.
fn engine(def: &Definition) -> Result<(), Problem> {
    let path = KeyPath::root("engine");
    let engine = &def.engine;
    engine_settings(&engine.settings, &path.key("settings"))?;
    if let Some(tls) = &engine.tls {
        for (key, file) in [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)] {
            let text = file.to_string_lossy();
            if text.is_empty() || text.contains('\0') {
                fail(
                    &path.key("tls").key(key),
                    "expected a PEM file path (relative to the definition)".to_owned(),
                )?;
            }
        }
    }
    listen_address(&engine.tls_listen).at(&path.key("tls-listen"))?;
    let verified = engine.tls.is_some()
        || engine.insecure_tcp
        || engine
            .settings
            .get("tlsverify")
            .and_then(toml::Value::as_bool)
            == Some(true);
    let Some(toml::Value::Array(hosts)) = engine.settings.get("hosts") else {
        return Ok(());
    };
    for (i, host) in hosts.iter().enumerate() {
        let Some(host) = host.as_str() else { continue };
        if is_tcp_host(host) && !verified {
            fail(
                &path.key("settings").key("hosts").index(i),
                format!(
                    "`{host}` in engine.settings.hosts serves the engine's API over plain TCP, and whoever reaches that port is root on the machine; set [engine] tls = {{ ca = \"ca.pem\", cert = \"server.pem\", key = \"server-key.pem\" }} for mutual TLS on port 2376, or insecure-tcp = true in [engine] to accept that anyone reaching the port is root on the machine"
                ),
            )?;
        }
    }
    Ok(())
}

/// `[time] servers`.
fn time(def: &Definition) -> Result<(), Problem> {
    let path = KeyPath::root("time").key("servers");
    for (i, server) in def.time.servers.iter().enumerate() {
        time_server(server).at(&path.index(i))?;
    }
    Ok(())
}

/// `[engine] settings` become JSON: a TOML date-time or a float that is not finite has no JSON form.
fn engine_settings(table: &toml::Table, path: &KeyPath) -> Result<(), Problem> {
    fn value(v: &toml::Value, path: &KeyPath) -> Result<(), Problem> {
        match v {
            toml::Value::Datetime(_) => fail(
                path,
                "a date-time has no JSON form; write it as a string".to_owned(),
            ),
            toml::Value::Float(f) if !f.is_finite() => {
                fail(path, format!("{f} has no JSON form: give a finite number"))
            }
            toml::Value::Array(items) => items
                .iter()
                .enumerate()
                .try_for_each(|(i, item)| value(item, &path.index(i))),
            toml::Value::Table(table) => engine_settings(table, path),
            _ => Ok(()),
        }
    }
    table.iter().try_for_each(|(k, v)| value(v, &path.key(k)))
}

fn disk(def: &Definition) -> Result<(), Problem> {
    let path = KeyPath::root("disk");
    let d = &def.disk;
    for (key, size, min) in [
        ("esp", d.esp, 64 * ByteSize::MIB),
        ("root", d.root, 64 * ByteSize::MIB),
        ("verity", d.verity, ByteSize::MIB),
        ("state", d.state, 64 * ByteSize::MIB),
    ] {
        if size.0 < min || !size.0.is_multiple_of(ByteSize::MIB) {
            fail(
                &path.key(key),
                format!(
                    "\"{size}\": must be a whole number of MiB and at least {}",
                    ByteSize(min)
                ),
            )?;
        }
    }
    let total = d.total_size();
    if total.is_none_or(|t| t > MAX_DISK) {
        let paths = ["root", "state", "esp", "verity"]
            .map(|k| path.key(k))
            .to_vec();
        return Err(Problem {
            paths,
            message: format!(
                "the disk (1MiB + esp + 2 × root + 2 × verity + state + 1MiB) would be {}: at most {} (the largest file ext4 holds)",
                total.map_or("more than 16EiB".to_owned(), |t| ByteSize(t).to_string()),
                ByteSize(MAX_DISK)
            ),
        });
    }
    Ok(())
}

/// The rules of `[network]`: a static mode needs an IPv4 `address` with prefix, DHCP takes no
/// address, gateway or DNS servers, and gateway and DNS servers are IPv4 addresses. Shared with
/// the network settings read from a cloud's instance data, which must pass the same checks.
pub fn network(n: &Network) -> Result<(), Problem> {
    let path = KeyPath::root("network");
    match (n.mode, &n.address) {
        (NetworkMode::Static, None) => fail(
            &path.key("mode"),
            "mode = \"static\" needs `address`, like address = \"10.0.2.15/24\"".to_owned(),
        )?,
        (NetworkMode::Dhcp, _)
            if n.address.is_some() || n.gateway.is_some() || !n.dns.is_empty() =>
        {
            let key = if n.address.is_some() {
                "address"
            } else if n.gateway.is_some() {
                "gateway"
            } else {
                "dns"
            };
            fail(
                &path.key(key),
                "only used with mode = \"static\" (DHCP supplies it otherwise)".to_owned(),
            )?
        }
        (_, Some(address)) => ipv4_cidr(address).at(&path.key("address"))?,
        _ => {}
    }
    if let Some(gateway) = &n.gateway {
        ipv4(gateway).at(&path.key("gateway"))?;
    }
    for (i, dns) in n.dns.iter().enumerate() {
        ipv4(dns).at(&path.key("dns").index(i))?;
    }
    Ok(())
}

fn update(def: &Definition) -> Result<(), Problem> {
    let Some(update) = &def.update else {
        return Ok(());
    };
    let path = KeyPath::root("update");
    url(&update.url, &["http", "https", "file"])
        .map(|_| ())
        .at(&path.key("url"))?;
    if update.url.starts_with("file:") && !update.url.starts_with("file:///") {
        fail(
            &path.key("url"),
            format!(
                "`{}`: the update agent reads a folder as file:///absolute/path",
                update.url
            ),
        )?;
    }
    if update.keys.is_empty() {
        fail(&path.key("keys"), "at least one trusted key is needed to accept a release: keys = [\"ed25519:…\"] (as written by `plinth keygen`)".to_owned())?;
    }
    for (i, key) in update.keys.iter().enumerate() {
        crate::manifest::PublicKey::parse(key)
            .map(|_| ())
            .map_err(|e| e.to_string())
            .at(&path.key("keys").index(i))?;
    }
    at_least(update.interval.0, MIN_UPDATE_INTERVAL, "10s").at(&path.key("interval"))?;
    if update.bless_timeout <= update.bless_after {
        return Err(Problem {
            paths: vec![path.key("bless-timeout"), path.key("bless-after")],
            message: "bless-timeout must be longer than bless-after".to_owned(),
        });
    }
    match (update.strategy, &update.window, &update.fleetlock) {
        (UpdateStrategy::Window, None, _) => fail(&path.key("strategy"), "strategy = \"window\" needs a window, for example window = { days = [\"sat\", \"sun\"], start = \"02:00\", length = \"3h\" }".to_owned())?,
        (UpdateStrategy::Fleetlock, _, None) => fail(&path.key("strategy"), "strategy = \"fleetlock\" needs fleetlock = { url = \"http://…\", group = \"default\" }".to_owned())?,
        (strategy, Some(_), _) if strategy != UpdateStrategy::Window => fail(&path.key("window"), "window is only used with strategy = \"window\"".to_owned())?,
        (strategy, _, Some(_)) if strategy != UpdateStrategy::Fleetlock => fail(&path.key("fleetlock"), "fleetlock is only used with strategy = \"fleetlock\"".to_owned())?,
        _ => {}
    }
    if let Some(window) = &update.window {
        if window.length.0.is_zero() || window.length.0 > MAX_WINDOW {
            fail(
                &path.key("window").key("length"),
                "a window's length must be more than 0 and at most 7 days (168h)".to_owned(),
            )?;
        }
    }
    if let Some(lock) = &update.fleetlock {
        url(&lock.url, &["http"])
            .map(|_| ())
            .at(&path.key("fleetlock").key("url"))?;
    }
    Ok(())
}

fn containers(def: &Definition) -> Result<(), Problem> {
    let mut names = BTreeSet::new();
    let mut published: Vec<(PublishedPort, KeyPath)> = Vec::new();
    container_networks(def)?;
    for (i, c) in def.containers.iter().enumerate() {
        let path = KeyPath::root("container").index(i);
        let name = c.name.as_str();
        if !names.insert(name) {
            fail(
                &path.key("name"),
                format!("container name `{name}` is declared twice"),
            )?;
        }
        image_reference(&c.image).at(&path.key("image"))?;
        match (&c.archive, &c.build) {
            (Some(_), Some(_)) => fail(
                &path.key("build"),
                format!("container `{name}`: give `archive` or `build`, not both"),
            )?,
            (Some(archive), None) => source(archive, &path.key("archive"), true)?,
            (None, Some(build)) => {
                if build.packages.is_empty() {
                    fail(
                        &path.key("build").key("packages"),
                        "give at least one package".to_owned(),
                    )?;
                }
                for (j, package) in build.packages.iter().enumerate() {
                    package_name(package).at(&path.key("build").key("packages").index(j))?;
                }
            }
            (None, None) => {}
        }
        for (j, arg) in c.command.iter().enumerate() {
            no_nul(arg).at(&path.key("command").index(j))?;
        }
        for (key, value) in &c.env {
            env_key(key).at(&path.key("env").key(key).at_key())?;
            no_nul(value).at(&path.key("env").key(key))?;
        }
        for (j, port) in c.ports.iter().enumerate() {
            let here = path.key("ports").index(j);
            let port = published_port(port).at_value(&here)?;
            if let Some((_, first)) = published.iter().find(|(p, _)| p.clashes_with(&port)) {
                fail(&here, already_published(&port, first))?;
            }
            published.push((port, here));
        }
        container_options(def, c, &path)?;
        for (j, m) in c.mounts.iter().enumerate() {
            mount(m).at(&path.key("mounts").index(j))?;
        }
        if let Some(health) = &c.health {
            let path = path.key("health");
            if health.command.is_empty() {
                fail(&path.key("command"), "give the command to run, like command = [\"wget\", \"-q\", \"-O-\", \"http://127.0.0.1/\"]".to_owned())?;
            }
            for (j, arg) in health.command.iter().enumerate() {
                no_nul(arg).at(&path.key("command").index(j))?;
            }
            at_least(health.interval.0, MIN_HEALTH_INTERVAL, "1s").at(&path.key("interval"))?;
            if health.retries == 0 {
                fail(&path.key("retries"), "at least 1".to_owned())?;
            }
        }
    }
    Ok(())
}

/// `host port 8080/tcp is already published by container[0].ports[1]` (a range as `8000-8010`).
fn already_published(port: &PublishedPort, first: &KeyPath) -> String {
    let (low, high) = port.host;
    let ports = match low == high {
        true => format!("{low}"),
        false => format!("{low}-{high}"),
    };
    format!(
        "host port {ports}/{} is already published by {first}",
        port.protocol
    )
}

/// The smallest memory limit the engine accepts.
pub const MIN_CONTAINER_MEMORY: u64 = 6 * ByteSize::MIB;
/// The largest `cpus` a container may be given.
pub const MAX_CPUS: f64 = 1024.0;
/// Network names the engine keeps for itself.
pub const ENGINE_NETWORKS: [&str; 3] = ["bridge", "host", "none"];

/// `[[container]]` keys beyond the image, ports and mounts: networks, dependencies, user,
/// working directory, limits, capabilities and logging.
fn container_options(def: &Definition, c: &Container, path: &KeyPath) -> Result<(), Problem> {
    container_attachments(def, c, path)?;
    for (j, dependency) in c.depends_on.iter().enumerate() {
        let here = path.key("depends-on").index(j);
        if dependency == &c.name {
            fail(
                &here,
                format!("container `{}` cannot depend on itself", c.name),
            )?;
        }
        if !def.containers.iter().any(|d| &d.name == dependency) {
            fail(&here, format!("`{dependency}` is not a declared container; depends-on names [[container]] names"))?;
        }
    }
    if let Some(user) = &c.user {
        container_user(user).at(&path.key("user"))?;
    }
    if let Some(workdir) = &c.workdir {
        normal_path(workdir, "workdir").at(&path.key("workdir"))?;
    }
    if let Some(memory) = c.memory {
        if memory.0 < MIN_CONTAINER_MEMORY {
            fail(
                &path.key("memory"),
                format!(
                    "\"{memory}\" is below the engine's minimum: at least {}",
                    ByteSize(MIN_CONTAINER_MEMORY)
                ),
            )?;
        }
    }
    if let Some(cpus) = c.cpus {
        if !(cpus > 0.0 && cpus <= MAX_CPUS) {
            fail(
                &path.key("cpus"),
                format!("{cpus} CPUs: expected a number above 0 and at most {MAX_CPUS}, like 1.5"),
            )?;
        }
    }
    for key in ["cap-add", "cap-drop"] {
        let list = if key == "cap-add" {
            &c.cap_add
        } else {
            &c.cap_drop
        };
        for (j, name) in list.iter().enumerate() {
            capability(name).at_value(&path.key(key).index(j))?;
        }
    }
    if let Some(log) = &c.log {
        let path = path.key("log");
        if log.driver == LogDriver::None {
            for (key, given) in [
                ("max-size", log.max_size.is_some()),
                ("max-file", log.max_file.is_some()),
            ] {
                if given {
                    fail(&path.key(key), format!("driver = \"none\" keeps no log: `{key}` applies to json-file and local"))?;
                }
            }
        }
        if let Some(size) = &log.max_size {
            log_size(size).at(&path.key("max-size"))?;
        }
        if log.max_file == Some(0) {
            fail(&path.key("max-file"), "at least 1".to_owned())?;
        }
    }
    Ok(())
}

/// `[[container]] networks`: declared `[[container-network]]`s, each once, with DNS-name aliases.
fn container_attachments(def: &Definition, c: &Container, path: &KeyPath) -> Result<(), Problem> {
    for (j, attachment) in c.networks.iter().enumerate() {
        let here = path.key("networks").index(j);
        let name = attachment.name().as_str();
        if ENGINE_NETWORKS.contains(&name) {
            fail(&here, format!("`{name}` is one of the engine's own networks ({}): leave `networks` empty for the default bridge; `host` and `none` cannot be combined with user networks and are not offered", ENGINE_NETWORKS.join(", ")))?;
        }
        if !def
            .container_networks
            .iter()
            .any(|n| n.name.as_str() == name)
        {
            fail(
                &here,
                format!(
                    "network `{name}` is not declared: add [[container-network]] name = \"{name}\""
                ),
            )?;
        }
        if c.networks[..j].iter().any(|n| n.name().as_str() == name) {
            fail(&here, format!("network `{name}` is listed twice"))?;
        }
        for (k, alias) in attachment.aliases().iter().enumerate() {
            if !is_dns_name(alias) {
                fail(&here.key("aliases").index(k), format!("`{alias}` is not a DNS name: dot-separated labels of 1 to 63 letters, digits and `-` (not first or last)"))?;
            }
        }
    }
    Ok(())
}

/// `[[container-network]]`: unique names other than the engine's own, subnets as CIDR.
fn container_networks(def: &Definition) -> Result<(), Problem> {
    for (i, network) in def.container_networks.iter().enumerate() {
        let path = KeyPath::root("container-network").index(i);
        let name = network.name.as_str();
        if ENGINE_NETWORKS.contains(&name) {
            fail(
                &path.key("name"),
                format!(
                    "`{name}` is the name of one of the engine's own networks ({}); choose another",
                    ENGINE_NETWORKS.join(", ")
                ),
            )?;
        }
        if def.container_networks[..i]
            .iter()
            .any(|n| n.name == network.name)
        {
            fail(
                &path.key("name"),
                format!("network name `{name}` is declared twice"),
            )?;
        }
        if let Some(range) = &network.subnet {
            subnet(range).at(&path.key("subnet"))?;
        }
    }
    Ok(())
}

/// `depends-on` without cycles; the error names the chain, `a → b → a`.
fn dependency_cycles(def: &Definition) -> Result<(), Problem> {
    let mut order = Vec::new();
    container_order(&def.containers, &mut order).map_err(|(i, chain)| Problem {
        paths: vec![KeyPath::root("container").index(i).key("depends-on")],
        message: format!(
            "containers depend on each other in a cycle: {}",
            chain.join(" → ")
        ),
    })
}

/// Orders `containers` so that every one comes after what it `depends-on` (declaration order
/// otherwise), appending indexes to `order`. On a cycle, gives the index of a container on it
/// and the chain of names. Names that are not declared are ignored.
pub fn container_order(
    containers: &[Container],
    order: &mut Vec<usize>,
) -> Result<(), (usize, Vec<String>)> {
    fn visit(
        containers: &[Container],
        i: usize,
        stack: &mut Vec<usize>,
        order: &mut Vec<usize>,
    ) -> Result<(), (usize, Vec<String>)> {
        if order.contains(&i) {
            return Ok(());
        }
        if let Some(at) = stack.iter().position(|&s| s == i) {
            let mut chain: Vec<String> = stack[at..]
                .iter()
                .map(|&s| containers[s].name.to_string())
                .collect();
            chain.push(containers[i].name.to_string());
            return Err((i, chain));
        }
        stack.push(i);
        for dependency in &containers[i].depends_on {
            if let Some(j) = containers.iter().position(|c| &c.name == dependency) {
                visit(containers, j, stack, order)?;
            }
        }
        stack.pop();
        order.push(i);
        Ok(())
    }
    for i in 0..containers.len() {
        visit(containers, i, &mut Vec::new(), order)?;
    }
    Ok(())
}

/// A network interface name as the kernel allows it: 1 to 15 bytes, none of them `/`, `:`,
/// white space or control characters, and not `.` or `..`.
fn is_interface_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 15
        && text != "."
        && text != ".."
        && !text
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// `[swarm] advertise`: an IP address, or an interface name (`eth0`) whose IPv4 address is
/// advertised.
pub fn swarm_advertise(text: &str) -> Result<(), String> {
    if text.parse::<IpAddr>().is_ok() || is_interface_name(text) {
        Ok(())
    } else {
        Err(format!("`{text}` is neither an IP address nor an interface name: expected an address like \"10.0.0.5\" or an interface like \"eth0\" (1 to 15 characters without `/`, `:` or spaces)"))
    }
}

/// A swarm join token as `docker swarm join-token -q` prints it: `SWMTKN-1-` and letters,
/// digits and `-`. The error does not repeat the token, which is a secret.
pub fn swarm_token(text: &str) -> Result<(), String> {
    let ok = text.len() <= 256
        && text.strip_prefix("SWMTKN-1-").is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err("the value is not a swarm join token: expected SWMTKN-1- followed by letters, digits and `-`, as `docker swarm join-token -q worker` (or `manager`) prints it".to_owned())
    }
}

/// A service placement constraint, `KEY==VALUE` or `KEY!=VALUE`, like `"node.role==worker"` or
/// `"node.labels.zone!=b"`.
pub fn placement_constraint(text: &str) -> Result<(), String> {
    let (key, value) = text
        .split_once("==")
        .or_else(|| text.split_once("!="))
        .unwrap_or_default();
    let key = key.trim();
    let value = value.trim();
    let key_ok = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    let value_ok = !value.is_empty() && !value.chars().any(char::is_control);
    if key_ok && value_ok {
        Ok(())
    } else {
        Err(format!("`{}` is not a placement constraint: expected KEY==VALUE or KEY!=VALUE, like \"node.role==worker\", \"node.hostname!=web-1\" or \"node.labels.zone==a\"", text.escape_debug()))
    }
}

/// `[swarm]`: addresses and the token, and the rules between `role`, `init`, `join` and the
/// token.
fn swarm(def: &Definition) -> Result<(), Problem> {
    let Some(swarm) = &def.swarm else {
        if def.update.as_ref().map(|u| u.strategy) == Some(UpdateStrategy::Swarm) {
            fail(&KeyPath::root("update").key("strategy"), "strategy = \"swarm\" takes the update lock of the machine's Docker Swarm, and this machine has no [swarm]: declare one (role, join, token) or choose another strategy".to_owned())?;
        }
        return Ok(());
    };
    let path = KeyPath::root("swarm");
    if let Some(advertise) = &swarm.advertise {
        swarm_advertise(advertise).at(&path.key("advertise"))?;
    }
    listen_address(&swarm.listen).at(&path.key("listen"))?;
    for (i, manager) in swarm.join.iter().enumerate() {
        swarm_manager(manager).at(&path.key("join").index(i))?;
    }
    if let Some(token) = &swarm.token {
        swarm_token(token).at(&path.key("token"))?;
    }
    swarm_updates(def, swarm)?;
    if let Some(file) = &swarm.token_file {
        normal_path(file, "token-file").at(&path.key("token-file"))?;
        if swarm.token.is_some() {
            fail(
                &path.key("token-file"),
                "give `token` or `token-file`, not both".to_owned(),
            )?;
        }
    }
    let token_key = match (&swarm.token, &swarm.token_file) {
        (Some(_), _) => Some("token"),
        (None, Some(_)) => Some("token-file"),
        (None, None) => None,
    };
    if swarm.init {
        if swarm.role == SwarmRole::Worker {
            fail(&path.key("init"), "init = true starts a new swarm, which only role = \"manager\" can; a worker joins one with join = [\"MANAGER:2377\"] and a token".to_owned())?;
        }
        if !swarm.join.is_empty() {
            fail(&path.key("join"), "init = true starts a new swarm and `join` joins an existing one: give one or the other (init only on the first manager)".to_owned())?;
        }
        if let Some(key) = token_key {
            fail(&path.key(key), format!("`{key}` is only used to join a swarm; a swarm started with init = true makes its own tokens"))?;
        }
        return Ok(());
    }
    if swarm.join.is_empty() {
        let needs = match swarm.role {
            SwarmRole::Worker => "role = \"worker\" needs join = [\"MANAGER:2377\", …] and a token".to_owned(),
            SwarmRole::Manager => "role = \"manager\" needs init = true (the first manager) or join = [\"MANAGER:2377\", …] and a token (the others)".to_owned(),
        };
        fail(&path.key("role"), needs)?;
    }
    if token_key.is_none() {
        fail(&path.key("join"), format!("joining as a {} needs the swarm's join token: token = \"SWMTKN-1-…\" or token-file = \"/var/lib/…\" (`docker swarm join-token -q {}` on a manager prints it)", swarm.role.name(), swarm.role.name()))?;
    }
    Ok(())
}

/// `[swarm] manager-api` and `[update] strategy = "swarm"`: a worker reaches a manager's
/// engine to drain itself; a manager uses its own.
fn swarm_updates(def: &Definition, swarm: &Swarm) -> Result<(), Problem> {
    let path = KeyPath::root("swarm");
    let strategy = def.update.as_ref().map(|u| u.strategy);
    if let Some(api) = &swarm.manager_api {
        manager_api(api).at(&path.key("manager-api"))?;
        if swarm.role == SwarmRole::Manager {
            fail(&path.key("manager-api"), "a manager drains itself through its own engine: manager-api is only for role = \"worker\"".to_owned())?;
        }
        if strategy != Some(UpdateStrategy::Swarm) {
            fail(
                &path.key("manager-api"),
                "manager-api is only used with [update] strategy = \"swarm\"".to_owned(),
            )?;
        }
    } else if swarm.role == SwarmRole::Worker && strategy == Some(UpdateStrategy::Swarm) {
        fail(&path.key("role"), "a worker with [update] strategy = \"swarm\" drains itself through a manager's Engine API, which its own engine cannot do: add manager-api = \"tcp://MANAGER:2375\"".to_owned())?;
    }
    Ok(())
}

/// `[swarm] manager-api`: `tcp://HOST:PORT` of a manager's Engine API.
pub fn manager_api(text: &str) -> Result<(), String> {
    let expected =
        "expected tcp://HOST:PORT of a manager's Engine API, like \"tcp://10.0.0.1:2375\"";
    let Some(rest) = text.strip_prefix("tcp://") else {
        return Err(format!("`{text}` is not a tcp:// address: {expected}"));
    };
    host_port(rest).map_err(|why| format!("`{text}`: {why} ({expected})"))?;
    let has_port = rest
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.ends_with(':') && port.parse::<u16>().is_ok());
    if !has_port {
        return Err(format!("`{text}` has no port: {expected}"));
    }
    Ok(())
}

/// `[[service]]`: a manager to create them, unique names, the container rules for image, env,
/// command and mounts, routing-mesh ports, overlay networks and placement constraints.
fn services(def: &Definition) -> Result<(), Problem> {
    let mut published: Vec<(PublishedPort, KeyPath)> = Vec::new();
    for (i, c) in def.containers.iter().enumerate() {
        for (j, port) in c.ports.iter().enumerate() {
            if let Ok(port) = published_port(port) {
                published.push((
                    port,
                    KeyPath::root("container").index(i).key("ports").index(j),
                ));
            }
        }
    }
    for (i, service) in def.services.iter().enumerate() {
        let path = KeyPath::root("service").index(i);
        let name = service.name.as_str();
        let manager = def
            .swarm
            .as_ref()
            .is_some_and(|s| s.role == SwarmRole::Manager);
        if !manager {
            fail(&path.key("name"), format!("service `{name}`: services are created through a swarm manager: declare [swarm] with role = \"manager\""))?;
        }
        if def.services[..i].iter().any(|s| s.name == service.name) {
            fail(
                &path.key("name"),
                format!("service name `{name}` is declared twice"),
            )?;
        }
        image_reference(&service.image).at(&path.key("image"))?;
        if service.replicas.is_some() && service.mode == Some(ServiceMode::Global) {
            fail(&path.key("replicas"), "mode = \"global\" runs one task on every eligible node: give `replicas` (replicated mode) or mode = \"global\", not both".to_owned())?;
        }
        for (j, arg) in service.command.iter().enumerate() {
            no_nul(arg).at(&path.key("command").index(j))?;
        }
        for (key, value) in &service.env {
            env_key(key).at(&path.key("env").key(key).at_key())?;
            no_nul(value).at(&path.key("env").key(key))?;
        }
        for (j, m) in service.mounts.iter().enumerate() {
            mount(m).at(&path.key("mounts").index(j))?;
        }
        service_ports(service, &path, &mut published)?;
        service_networks(def, service, &path)?;
        for (j, constraint) in service.constraints.iter().enumerate() {
            placement_constraint(constraint).at(&path.key("constraints").index(j))?;
        }
    }
    Ok(())
}

/// A service's ports: no address (the routing mesh publishes on every one), and no host port
/// another service or a container already publishes.
fn service_ports(
    service: &crate::definition::Service,
    path: &KeyPath,
    published: &mut Vec<(PublishedPort, KeyPath)>,
) -> Result<(), Problem> {
    for (j, port) in service.ports.iter().enumerate() {
        let here = path.key("ports").index(j);
        let port = published_port(port).at_value(&here)?;
        if port.host_ip.is_some() {
            fail(&here, format!("`{}`: the routing mesh publishes a service's port on every address of every node; give \"HOST:CONTAINER\" or \"HOST:CONTAINER/udp\" without an address", service.ports[j]))?;
        }
        if let Some((_, first)) = published.iter().find(|(p, _)| p.clashes_with(&port)) {
            fail(&here, already_published(&port, first))?;
        }
        published.push((port, here));
    }
    Ok(())
}

/// A service's networks: declared `[[container-network]]`s with `driver = "overlay"`, each once.
fn service_networks(
    def: &Definition,
    service: &crate::definition::Service,
    path: &KeyPath,
) -> Result<(), Problem> {
    for (j, name) in service.networks.iter().enumerate() {
        let here = path.key("networks").index(j);
        let Some(network) = def.container_networks.iter().find(|n| &n.name == name) else {
            return fail(&here, format!("network `{name}` is not declared: add [[container-network]] name = \"{name}\" with driver = \"overlay\""));
        };
        if network.driver != NetworkDriver::Overlay {
            fail(&here, format!("network `{name}` has driver = \"{}\": a service's tasks span nodes and join only networks with driver = \"overlay\"", network.driver.name()))?;
        }
        if service.networks[..j].contains(name) {
            fail(&here, format!("network `{name}` is listed twice"))?;
        }
    }
    Ok(())
}

fn files(def: &Definition) -> Result<(), Problem> {
    let mut seen: BTreeMap<String, KeyPath> = BTreeMap::new();
    for (i, f) in def.files.iter().enumerate() {
        let path = KeyPath::root("file").index(i);
        let rel = file_path(&f.path).map_err(|message| Problem {
            paths: vec![path.key("path")],
            message,
        })?;
        if let Some(first) = seen.get(&rel) {
            fail(
                &path.key("path"),
                format!(
                    "`{}` is the same file as {first} (after /bin, /lib, … → /usr/…)",
                    f.path
                ),
            )?;
        }
        for (other, first) in &seen {
            if rel.starts_with(&format!("{other}/")) || other.starts_with(&format!("{rel}/")) {
                fail(
                    &path.key("path"),
                    format!(
                        "`{}` and {first} cannot both exist: one would be a folder of the other",
                        f.path
                    ),
                )?;
            }
        }
        seen.insert(rel, path.key("path"));
        match (&f.content, &f.source) {
            (Some(_), None) => {}
            (None, Some(s)) => source(s, &path.key("source"), false)?,
            _ => fail(
                &path.key("path"),
                format!("`{}`: give exactly one of `content` or `source`", f.path),
            )?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_follow_the_engine_grammar() {
        let ok = [
            "busybox",
            "busybox:1.36",
            "plinth/busybox:1",
            "library/nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "registry.example:5000/team/app:2",
            "localhost/app",
            "[::1]:5000/app:v1",
            "a__b/c-d---e/f.g_h:_tag",
        ];
        for text in ok {
            assert_eq!(image_reference(text), Ok(()), "{text}");
        }
        let bad = [
            "",
            "UPPER CASE::bad ref",
            "Busybox",
            "busybox:",
            "busybox:.x",
            "a..b",
            "a___b",
            "-a",
            "a/",
            "/a",
            "busybox@sha256:abc",
            "reg.example:0/app",
            "a/b:c/d",
        ];
        for text in bad {
            assert!(image_reference(text).is_err(), "{text}");
        }
    }

    #[test]
    fn urls_need_a_host_and_a_real_port() {
        let parsed = url("http://[::1]:8080/r", &["http"]).expect("IPv6 literal");
        assert_eq!(
            (parsed.host, parsed.port, parsed.path),
            ("::1", Some(8080), "/r")
        );
        let parsed = url("https://updates.example/a", &["https"]).expect("name");
        assert_eq!((parsed.host, parsed.port), ("updates.example", None));
        assert!(url("file:///srv/releases", &["file"]).is_ok());
        assert!(url("file:/srv/debian", &["file"]).is_ok());
        let bad = [
            ("http://", "no host"),
            ("http:///x", "no host"),
            ("http://h:0/", "1-65535"),
            ("http://h:65536/", "1-65535"),
            ("http://h:+80/", "1-65535"),
            ("http://h:/", "1-65535"),
            ("http://::1/", "brackets"),
            ("http://[::1/", "`]`"),
            ("http://[zz]/", "not an IPv6"),
            ("http://a b/", "holds"),
            ("http://u@h/", "user name"),
            ("ftp://h/", "wrong scheme"),
            ("h/x", "not a URL"),
            ("file://host/x", "file:///"),
            ("http://-h/", "neither a DNS name"),
        ];
        for (text, want) in bad {
            let err = url(text, &["http", "file"]).expect_err(text);
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn paths_mounts_and_addresses() {
        assert_eq!(normal_form("//etc/./motd/"), Some("/etc/motd".to_owned()));
        assert_eq!(normal_form("/../x"), None);
        assert_eq!(file_path("/bin/tool"), Ok("usr/bin/tool".to_owned()));
        for (path, want) in [
            ("//etc/motd", "write `/etc/motd`"),
            ("/etc", "directory every image has"),
            ("/usr/bin", "directory every image has"),
            ("/lib64", "directory every image has"),
            ("/", "directory every image has"),
            ("/var/lib/x", "mounted over"),
            ("/tmp/x", "mounted over"),
            ("/etc/hostname", "[image] hostname"),
            ("/usr/lib/plinth/image.toml", "Plinth itself"),
            ("/etc/a\nb", "control"),
            ("etc/x", "absolute"),
        ] {
            let err = file_path(path).expect_err(path);
            assert!(err.contains(want), "{path:?}: {err}");
        }
        for ok in ["/var/lib/web:/www", "/var/lib/web:/www:ro", "/var/x:/y:rw"] {
            assert_eq!(mount(ok), Ok(()), "{ok}");
        }
        for bad in [
            "/etc:/x",
            "/var/lib/web:/www:z",
            "/var/lib/../../etc:/x",
            "/var/a:/",
            "/var/a:www",
            "/var/a",
            "/var/a:/b:ro:rw",
        ] {
            assert!(mount(bad).is_err(), "{bad}");
        }
        assert!(ipv4_cidr("10.0.2.15/24").is_ok());
        for bad in [
            "not-an-ip",
            "10.0.2.15",
            "10.0.2.15/33",
            "10.0.2.15/+8",
            "::1/64",
        ] {
            assert!(ipv4_cidr(bad).is_err(), "{bad}");
        }
        assert!(hostname("web-1.lan").is_ok());
        for bad in ["my_host", "host-", "-host", "a..b", ""] {
            assert!(hostname(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_port("8080:80"), Some((8080, 80, "tcp")));
        assert_eq!(parse_port("53:53/udp"), Some((53, 53, "udp")));
        for bad in ["0:80", "8080:80/sctp", "+8080:+80", "80", "8080:080000"] {
            assert_eq!(parse_port(bad), None, "{bad}");
        }
    }
}
