//! Static IPv4 settings for the first Ethernet interface from a local source: an OpenStack
//! `network_data.json` (JSON) or a NoCloud `network-config` (cloud-init network config version 1
//! or 2, a YAML subset read by the small parser here). DHCP, or no settings, is `None`. Every
//! result passes the same checks as a definition's `[network]` ([`os_config::validate::network`]).

use std::net::Ipv4Addr;

use anyhow::{anyhow, bail, Context, Result};
use os_config::definition::{Network, NetworkMode};

/// The static settings `address` (with prefix), `gateway` and `dns`, checked like a definition's
/// `[network]`.
fn static_network(address: String, gateway: Option<String>, dns: Vec<String>) -> Result<Network> {
    let network = Network {
        mode: NetworkMode::Static,
        address: Some(address),
        gateway,
        dns,
    };
    os_config::validate::network(&network).map_err(|problem| {
        let keys: Vec<String> = problem.paths.iter().map(ToString::to_string).collect();
        anyhow!(
            "the settings read give {}: {}",
            keys.join(", "),
            problem.message
        )
    })?;
    Ok(network)
}

/// The prefix length of a dotted IPv4 netmask (`255.255.255.0` → 24); contiguous masks only.
pub fn netmask_prefix(mask: &str) -> Result<u8, String> {
    let bits = mask
        .parse::<Ipv4Addr>()
        .map(u32::from)
        .map_err(|_| format!("netmask `{mask}` is not a dotted IPv4 netmask like 255.255.255.0"))?;
    let prefix = bits.leading_ones();
    let contiguous = bits.checked_shl(prefix).unwrap_or(0) == 0;
    if !contiguous {
        return Err(format!(
            "netmask `{mask}` is not contiguous: allowed are masks of leading one bits like 255.255.255.0"
        ));
    }
    // leading_ones of a u32 is at most 32.
    Ok(prefix as u8)
}

/// Adds the IPv4 addresses among `addresses` to `dns`, each once; IPv6 ones are left out since
/// only IPv4 is configured.
fn add_dns<'a>(dns: &mut Vec<String>, addresses: impl IntoIterator<Item = &'a str>) {
    for address in addresses {
        if !address.contains(':') && !dns.iter().any(|d| d == address) {
            dns.push(address.to_owned());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// OpenStack network_data.json

/// The settings in an OpenStack `network_data.json`: its first IPv4 network decides. Type `ipv4`
/// gives `ip_address`, `netmask` (dotted) and the gateway of the route to `0.0.0.0`/`0.0.0.0`;
/// DNS servers are the `services` of type `dns` of that network, then the top-level ones. Type
/// `ipv4_dhcp` (or `dhcp4`), or no IPv4 network, is `None`. The link the network names is logged,
/// not followed: the first Ethernet interface is configured.
pub fn parse_network_data(text: &str) -> Result<Option<Network>> {
    let json: serde_json::Value = serde_json::from_str(text).context("it is not JSON")?;
    let networks = match json.get("networks") {
        None => return Ok(None),
        Some(networks) => networks
            .as_array()
            .ok_or_else(|| anyhow!("`networks` is not a list"))?,
    };
    let Some((index, network)) = networks.iter().enumerate().find(|(_, n)| {
        matches!(
            n.get("type").and_then(|t| t.as_str()),
            Some("ipv4" | "ipv4_dhcp" | "dhcp4")
        )
    }) else {
        return Ok(None);
    };
    let what = format!("networks[{index}]");
    if network.get("type").and_then(|t| t.as_str()) != Some("ipv4") {
        return Ok(None);
    }
    if let Some(link) = network.get("link").and_then(|l| l.as_str()) {
        if let Some(mac) = link_mac(&json, link) {
            crate::info!(
                "config-2: network_data.json sets {what} on link {link} ({mac}); \
                 the first Ethernet interface is configured"
            );
        }
    }
    let field = |key: &str| -> Result<&str> {
        network
            .get(key)
            .and_then(|v| v.as_str())
            .ok_or_else(|| anyhow!("{what} of type ipv4 has no `{key}` text"))
    };
    let address = field("ip_address")?;
    let prefix = netmask_prefix(field("netmask")?).map_err(|e| anyhow!("{what}: {e}"))?;
    let gateway = default_gateway(network.get("routes"), &what)?;
    let mut dns = Vec::new();
    add_dns(&mut dns, dns_services(network.get("services")));
    add_dns(&mut dns, dns_services(json.get("services")));
    static_network(format!("{address}/{prefix}"), gateway, dns).map(Some)
}

/// The MAC address of the entry of `links` with id `link`.
fn link_mac<'a>(json: &'a serde_json::Value, link: &str) -> Option<&'a str> {
    json.get("links")?
        .as_array()?
        .iter()
        .find(|l| l.get("id").and_then(|i| i.as_str()) == Some(link))?
        .get("ethernet_mac_address")?
        .as_str()
}

/// The gateway of the default route (`network` and `netmask` both `0.0.0.0`) among `routes`.
fn default_gateway(routes: Option<&serde_json::Value>, what: &str) -> Result<Option<String>> {
    let Some(routes) = routes else {
        return Ok(None);
    };
    let routes = routes
        .as_array()
        .ok_or_else(|| anyhow!("{what}: `routes` is not a list"))?;
    let default = routes.iter().find(|r| {
        r.get("network").and_then(|n| n.as_str()) == Some("0.0.0.0")
            && r.get("netmask").and_then(|n| n.as_str()) == Some("0.0.0.0")
    });
    match default {
        None => Ok(None),
        Some(route) => route
            .get("gateway")
            .and_then(|g| g.as_str())
            .map(|g| Some(g.to_owned()))
            .ok_or_else(|| anyhow!("{what}: the default route has no `gateway` text")),
    }
}

/// The addresses of the `services` entries of type `dns`.
fn dns_services(services: Option<&serde_json::Value>) -> impl Iterator<Item = &str> {
    services
        .and_then(|s| s.as_array())
        .into_iter()
        .flatten()
        .filter(|s| s.get("type").and_then(|t| t.as_str()) == Some("dns"))
        .filter_map(|s| s.get("address").and_then(|a| a.as_str()))
}

// ---------------------------------------------------------------------------------------------
// NoCloud network-config: a YAML subset

/// A value in a `network-config` file, with the line (from 1) it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    line: usize,
    value: Value,
}

/// The YAML subset read: plain or quoted scalars, flow lists of scalars, block lists and maps.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    /// `key:` with nothing under it.
    Empty,
    Scalar(String),
    List(Vec<Node>),
    /// Keys in file order, each once.
    Map(Vec<(String, Node)>),
}

/// One line with content: its number (from 1), indentation in spaces and text without the
/// indentation and any comment.
#[derive(Debug, Clone, Copy)]
struct Line<'a> {
    no: usize,
    indent: usize,
    text: &'a str,
}

/// `text` without a comment: a `#` at its start or after a blank, outside quotes.
fn strip_comment(text: &str) -> &str {
    let mut quote = None;
    let mut previous = ' ';
    for (i, c) in text.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' && previous.is_whitespace() => return &text[..i],
            None => {}
        }
        previous = c;
    }
    text
}

/// The lines with content of `text`, a leading `---` left out; a tab in the indentation is an
/// error.
fn lines(text: &str) -> Result<Vec<Line<'_>>> {
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let no = i + 1;
        let content = strip_comment(raw).trim_end();
        let text = content.trim_start_matches(' ');
        if text.is_empty() {
            continue;
        }
        if text.starts_with('\t') {
            bail!("line {no}: expected spaces for indentation, found a tab");
        }
        if lines.is_empty() && text == "---" {
            continue;
        }
        lines.push(Line {
            no,
            indent: content.len() - text.len(),
            text,
        });
    }
    Ok(lines)
}

/// Whether `text` is a block list item (`- x` or `-`).
fn is_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

/// `text` without matching surrounding quotes; an unmatched quote is an error.
fn unquote(text: &str, no: usize) -> Result<&str> {
    for q in ['"', '\''] {
        if let Some(rest) = text.strip_prefix(q) {
            return rest
                .strip_suffix(q)
                .ok_or_else(|| anyhow!("line {no}: expected a closing {q} in {text}"));
        }
    }
    Ok(text)
}

/// `key: value` or `key:` split into the key (unquoted) and the value (maybe empty); `None` when
/// `text` is not a key.
fn split_key(text: &str) -> Option<(&str, &str)> {
    let (key, rest) = match text.strip_prefix(['"', '\'']) {
        Some(quoted) => {
            let q = text.chars().next()?;
            let end = quoted.find(q)?;
            (&quoted[..end], quoted[end + 1..].strip_prefix(':')?)
        }
        None => {
            let end = text
                .find(": ")
                .or_else(|| text.ends_with(':').then(|| text.len() - 1))?;
            (&text[..end], &text[end + 1..])
        }
    };
    (!key.is_empty()).then_some((key, rest.trim_start()))
}

/// A value written on the key's or item's line: a flow list `[a, b]` or a scalar.
fn inline_value(text: &str, no: usize) -> Result<Value> {
    if let Some(inner) = text.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| anyhow!("line {no}: expected `]` closing the list {text}"))?;
        if inner.trim().is_empty() {
            return Ok(Value::List(Vec::new()));
        }
        return inner
            .split(',')
            .map(|item| {
                let item = item.trim();
                if item.is_empty() || item.starts_with(['[', '{']) {
                    bail!("line {no}: expected plain values in the list {text}");
                }
                Ok(Node {
                    line: no,
                    value: Value::Scalar(unquote(item, no)?.to_owned()),
                })
            })
            .collect::<Result<_>>()
            .map(Value::List);
    }
    if text.starts_with(['{', '|', '>', '&', '*', '!']) {
        bail!(
            "line {no}: expected a plain value, a quoted one or a list [a, b]; \
             flow maps, block text, anchors and tags are not read: {text}"
        );
    }
    Ok(Value::Scalar(unquote(text, no)?.to_owned()))
}

/// The block reader over a file's lines.
struct Reader<'a> {
    lines: Vec<Line<'a>>,
    pos: usize,
}

impl<'a> Reader<'a> {
    /// The next line not read yet.
    fn peek(&self) -> Option<Line<'a>> {
        self.lines.get(self.pos).copied()
    }

    /// The block starting at the next line, indented by `indent`: a list or a map.
    fn block(&mut self, indent: usize) -> Result<Node> {
        match self.peek() {
            Some(line) if is_item(line.text) => self.list(indent),
            _ => self.map(indent),
        }
    }

    /// The value under `key:` (or `-`) on line `no`, indented by `indent`: a deeper block, a list
    /// at the same indentation, or nothing. It is located at line `no`, where errors about it
    /// point.
    fn under(&mut self, no: usize, indent: usize) -> Result<Node> {
        let value = match self.peek() {
            Some(next) if next.indent > indent => self.block(next.indent)?.value,
            Some(next) if next.indent == indent && is_item(next.text) => self.list(indent)?.value,
            _ => Value::Empty,
        };
        Ok(Node { line: no, value })
    }

    /// The list items `- …` at `indent`.
    fn list(&mut self, indent: usize) -> Result<Node> {
        let first = self.peek().map_or(0, |l| l.no);
        let mut items = Vec::new();
        while let Some(line) = self.peek() {
            if line.indent < indent || (line.indent == indent && !is_item(line.text)) {
                break;
            }
            if line.indent > indent {
                bail!(
                    "line {}: expected a list item `- ` at column {}, found more indentation",
                    line.no,
                    indent + 1
                );
            }
            let rest = &line.text[1..];
            let content = rest.trim_start();
            if content.is_empty() {
                self.pos += 1;
                items.push(self.under(line.no, indent)?);
                continue;
            }
            let column = indent + 1 + rest.len() - content.len();
            if is_item(content) || split_key(content).is_some() {
                // The item's content starts a block at its own column.
                self.lines[self.pos] = Line {
                    no: line.no,
                    indent: column,
                    text: content,
                };
                items.push(self.block(column)?);
            } else {
                self.pos += 1;
                items.push(Node {
                    line: line.no,
                    value: inline_value(content, line.no)?,
                });
            }
        }
        Ok(Node {
            line: first,
            value: Value::List(items),
        })
    }

    /// The `key: value` lines at `indent`.
    fn map(&mut self, indent: usize) -> Result<Node> {
        let first = self.peek().map_or(0, |l| l.no);
        let mut entries: Vec<(String, Node)> = Vec::new();
        while let Some(line) = self.peek() {
            if line.indent < indent {
                break;
            }
            if line.indent > indent {
                bail!(
                    "line {}: expected a key at column {}, found more indentation",
                    line.no,
                    indent + 1
                );
            }
            let (key, rest) = split_key(line.text)
                .ok_or_else(|| anyhow!("line {}: expected `key: value` or `key:`", line.no))?;
            if entries.iter().any(|(k, _)| k == key) {
                bail!(
                    "line {}: expected each key once, `{key}` is repeated",
                    line.no
                );
            }
            self.pos += 1;
            let value = if rest.is_empty() {
                self.under(line.no, indent)?
            } else {
                Node {
                    line: line.no,
                    value: inline_value(rest, line.no)?,
                }
            };
            entries.push((key.to_owned(), value));
        }
        Ok(Node {
            line: first,
            value: Value::Map(entries),
        })
    }
}

/// The tree of a YAML-subset text: indentation by spaces, `#` comments, quotes stripped.
fn parse_tree(text: &str) -> Result<Node> {
    let lines = lines(text)?;
    let Some(first) = lines.first().copied() else {
        bail!("line 1: expected `version: 1` or `version: 2`, the file is empty");
    };
    let mut reader = Reader { lines, pos: 0 };
    let tree = reader.block(first.indent)?;
    if let Some(line) = reader.peek() {
        bail!(
            "line {}: expected nothing less indented than line {}",
            line.no,
            first.no
        );
    }
    Ok(tree)
}

impl Node {
    /// The entries of this map; `what` names it in the error otherwise.
    fn map(&self, what: &str) -> Result<&[(String, Node)]> {
        match &self.value {
            Value::Map(entries) => Ok(entries),
            Value::Empty => Ok(&[]),
            _ => bail!("line {}: expected {what} as `key: value` lines", self.line),
        }
    }

    /// The items of this list.
    fn list(&self, what: &str) -> Result<&[Node]> {
        match &self.value {
            Value::List(items) => Ok(items),
            Value::Empty => Ok(&[]),
            _ => bail!("line {}: expected {what} as a list", self.line),
        }
    }

    /// This scalar's text.
    fn scalar(&self, what: &str) -> Result<&str> {
        match &self.value {
            Value::Scalar(text) => Ok(text),
            _ => bail!("line {}: expected {what} as a single value", self.line),
        }
    }

    /// The texts of this list of scalars, or of this one scalar.
    fn scalars(&self, what: &str) -> Result<Vec<&str>> {
        match &self.value {
            Value::Scalar(text) => Ok(vec![text]),
            _ => self.list(what)?.iter().map(|n| n.scalar(what)).collect(),
        }
    }

    /// This boolean (`true`/`false`, `yes`/`no`, `on`/`off`).
    fn boolean(&self, what: &str) -> Result<bool> {
        match self.scalar(what)?.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" => Ok(true),
            "false" | "no" | "off" => Ok(false),
            other => bail!(
                "line {}: expected {what} to be true or false, found `{other}`",
                self.line
            ),
        }
    }
}

/// The value of `key` among `entries`.
fn get<'n>(entries: &'n [(String, Node)], key: &str) -> Option<&'n Node> {
    entries.iter().find(|(k, _)| k == key).map(|(_, n)| n)
}

/// An error for the first key of `entries` not in `allowed`; `what` names the map.
fn known_keys(entries: &[(String, Node)], allowed: &[&str], what: &str) -> Result<()> {
    match entries.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some((key, node)) => bail!(
            "line {}: expected one of {} in {what}, found `{key}`",
            node.line,
            allowed.join(", ")
        ),
    }
}

/// The settings in a NoCloud `network-config`: cloud-init network config version 1 or 2 (or
/// either under a top-level `network:`), its first Ethernet interface. DHCP is `None`. An error
/// names the line and what was expected there.
pub fn parse_network_config(text: &str) -> Result<Option<Network>> {
    let tree = parse_tree(text)?;
    let mut top = tree.map("the network config")?;
    if let (Some(inner), 1) = (get(top, "network"), top.len()) {
        top = inner.map("`network`")?;
    }
    let version = get(top, "version").ok_or_else(|| {
        anyhow!(
            "line {}: expected `version: 1` or `version: 2`",
            tree.line.max(1)
        )
    })?;
    match version.scalar("`version`")? {
        "1" => version1(top),
        "2" => version2(top),
        other => bail!(
            "line {}: expected `version: 1` or `version: 2`, found `{other}`",
            version.line
        ),
    }
}

/// Version 2 (netplan): `ethernets:` → the first interface → `dhcp4` or `addresses`,
/// `gateway4` or a default route under `routes`, `nameservers: addresses`.
fn version2(top: &[(String, Node)]) -> Result<Option<Network>> {
    known_keys(top, &["version", "renderer", "ethernets"], "version 2")?;
    let Some(ethernets) = get(top, "ethernets") else {
        return Ok(None);
    };
    let Some((name, iface)) = ethernets.map("`ethernets`")?.first() else {
        return Ok(None);
    };
    let what = format!("ethernet `{name}`");
    let keys = iface.map(&what)?;
    known_keys(
        keys,
        &[
            "match",
            "set-name",
            "mtu",
            "optional",
            "macaddress",
            "wakeonlan",
            "critical",
            "accept-ra",
            "link-local",
            "dhcp4",
            "dhcp6",
            "dhcp-identifier",
            "addresses",
            "gateway4",
            "gateway6",
            "routes",
            "nameservers",
        ],
        &what,
    )?;
    if let Some(dhcp4) = get(keys, "dhcp4") {
        if dhcp4.boolean("`dhcp4`")? {
            return Ok(None);
        }
    }
    let addresses = match get(keys, "addresses") {
        Some(node) => node.scalars("`addresses`")?,
        None => Vec::new(),
    };
    let Some(address) = addresses.into_iter().find(|a| !a.contains(':')) else {
        bail!(
            "line {}: expected `dhcp4: true` or an IPv4 address with prefix in `addresses` of {what}",
            iface.line
        );
    };
    let mut gateway = match get(keys, "gateway4") {
        Some(node) => Some(node.scalar("`gateway4`")?.to_owned()),
        None => None,
    };
    if let Some(routes) = get(keys, "routes") {
        for route in routes.list("`routes`")? {
            if let Some(via) = default_route_v2(route)? {
                if gateway.as_deref().is_some_and(|g| g != via) {
                    bail!(
                        "line {}: expected one IPv4 default gateway, found `{via}` besides `gateway4`",
                        route.line
                    );
                }
                gateway = Some(via.to_owned());
            }
        }
    }
    let mut dns = Vec::new();
    if let Some(nameservers) = get(keys, "nameservers") {
        let entries = nameservers.map("`nameservers`")?;
        known_keys(entries, &["addresses", "search"], "`nameservers`")?;
        if let Some(addresses) = get(entries, "addresses") {
            add_dns(&mut dns, addresses.scalars("`nameservers: addresses`")?);
        }
    }
    static_network(address.to_owned(), gateway, dns)
        .map_err(|e| anyhow!("line {}: {e}", iface.line))
        .map(Some)
}

/// The `via` of a version 2 route to `default` or `0.0.0.0/0`; `None` for an IPv6 route. Any
/// other IPv4 route is an error: only the default route is configured.
fn default_route_v2(route: &Node) -> Result<Option<&str>> {
    let entries = route.map("a route")?;
    known_keys(
        entries,
        &[
            "to", "via", "metric", "on-link", "table", "scope", "type", "from",
        ],
        "a route",
    )?;
    let field = |key: &str| -> Result<&str> {
        get(entries, key)
            .ok_or_else(|| anyhow!("line {}: expected `{key}` in the route", route.line))?
            .scalar(&format!("`{key}`"))
    };
    let (to, via) = (field("to")?, field("via")?);
    if via.contains(':') || to.contains(':') {
        return Ok(None);
    }
    if to != "default" && to != "0.0.0.0/0" {
        bail!(
            "line {}: expected only the default route (`to: default` or `to: 0.0.0.0/0`), found `to: {to}`",
            route.line
        );
    }
    Ok(Some(via))
}

/// Version 1: the first `type: physical` entry of `config` and its first IPv4 subnet (`static`
/// with `address` and a prefix or `netmask`, `gateway`, `dns_nameservers`; or `dhcp`), plus the
/// `type: nameserver` entries' `address`.
fn version1(top: &[(String, Node)]) -> Result<Option<Network>> {
    known_keys(top, &["version", "config"], "version 1")?;
    let Some(config) = get(top, "config") else {
        return Ok(None);
    };
    let mut physical = None;
    let mut global_dns = Vec::new();
    for entry in config.list("`config`")? {
        let keys = entry.map("a `config` entry")?;
        let kind = get(keys, "type")
            .ok_or_else(|| anyhow!("line {}: expected `type` in the `config` entry", entry.line))?;
        match kind.scalar("`type`")? {
            "physical" => {
                physical.get_or_insert(entry);
            }
            "nameserver" => {
                known_keys(
                    keys,
                    &["type", "address", "search", "interface"],
                    "a nameserver",
                )?;
                if let Some(address) = get(keys, "address") {
                    add_dns(&mut global_dns, address.scalars("`address`")?);
                }
            }
            other => bail!(
                "line {}: expected `type: physical` or `type: nameserver`, found `type: {other}`",
                kind.line
            ),
        }
    }
    let Some(physical) = physical else {
        return Ok(None);
    };
    let keys = physical.map("the physical interface")?;
    known_keys(
        keys,
        &["type", "name", "mac_address", "mtu", "subnets", "accept-ra"],
        "the physical interface",
    )?;
    let subnets = get(keys, "subnets").ok_or_else(|| {
        anyhow!(
            "line {}: expected `subnets` in the physical interface",
            physical.line
        )
    })?;
    for subnet in subnets.list("`subnets`")? {
        if let Some(network) = subnet_v1(subnet, &global_dns)? {
            return Ok(network);
        }
    }
    bail!(
        "line {}: expected an IPv4 subnet (`type: static` or `type: dhcp`) in `subnets`",
        subnets.line
    )
}

/// A version 1 subnet: `Some(None)` for DHCP, `Some(Some(..))` for static IPv4, `None` for an
/// IPv6 one. `global_dns` follows the subnet's own `dns_nameservers`.
fn subnet_v1(subnet: &Node, global_dns: &[String]) -> Result<Option<Option<Network>>> {
    let keys = subnet.map("a subnet")?;
    known_keys(
        keys,
        &[
            "type",
            "address",
            "netmask",
            "gateway",
            "dns_nameservers",
            "dns_search",
            "control",
            "metric",
        ],
        "a subnet",
    )?;
    let kind = get(keys, "type")
        .ok_or_else(|| anyhow!("line {}: expected `type` in the subnet", subnet.line))?;
    match kind.scalar("`type`")? {
        "dhcp" | "dhcp4" => return Ok(Some(None)),
        "static" | "static4" => {}
        "static6" | "dhcp6" | "ipv6_slaac" | "ipv6_dhcpv6-stateless" | "ipv6_dhcpv6-stateful" => {
            return Ok(None)
        }
        other => bail!(
            "line {}: expected a subnet `type` of static, dhcp, static6 or dhcp6, found `{other}`",
            kind.line
        ),
    }
    let address_node = get(keys, "address").ok_or_else(|| {
        anyhow!(
            "line {}: expected `address` in the static subnet",
            subnet.line
        )
    })?;
    let address = address_node.scalar("`address`")?;
    if address.contains(':') {
        return Ok(None);
    }
    let address = match (address.contains('/'), get(keys, "netmask")) {
        (true, None) => address.to_owned(),
        (false, Some(netmask)) => {
            let mask = netmask.scalar("`netmask`")?;
            let prefix = if mask.bytes().all(|b| b.is_ascii_digit()) && !mask.is_empty() {
                mask.to_owned()
            } else {
                netmask_prefix(mask)
                    .map_err(|e| anyhow!("line {}: {e}", netmask.line))?
                    .to_string()
            };
            format!("{address}/{prefix}")
        }
        (true, Some(netmask)) => bail!(
            "line {}: expected either a prefix in `address` or `netmask`, found both",
            netmask.line
        ),
        (false, None) => bail!(
            "line {}: expected `address` with a prefix like 10.0.0.5/24, or a `netmask`",
            address_node.line
        ),
    };
    let gateway = match get(keys, "gateway") {
        Some(node) => Some(node.scalar("`gateway`")?.to_owned()),
        None => None,
    };
    let mut dns = Vec::new();
    if let Some(servers) = get(keys, "dns_nameservers") {
        add_dns(&mut dns, servers.scalars("`dns_nameservers`")?);
    }
    add_dns(&mut dns, global_dns.iter().map(String::as_str));
    static_network(address, gateway, dns)
        .map_err(|e| anyhow!("line {}: {e}", subnet.line))
        .map(|n| Some(Some(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A static network with `address`, `gateway` and `dns`.
    fn fixed(address: &str, gateway: Option<&str>, dns: &[&str]) -> Option<Network> {
        Some(Network {
            mode: NetworkMode::Static,
            address: Some(address.to_owned()),
            gateway: gateway.map(str::to_owned),
            dns: dns.iter().map(|d| (*d).to_owned()).collect(),
        })
    }

    const NETWORK_DATA: &str = r#"{
        "links": [{"id": "tap1", "type": "ovs", "ethernet_mac_address": "fa:16:3e:60:32:83"}],
        "networks": [
            {"id": "network0", "type": "ipv6", "link": "tap1", "ip_address": "fd00::5",
             "netmask": "ffff:ffff:ffff:ffff::"},
            {"id": "network1", "type": "ipv4", "link": "tap1", "ip_address": "10.192.35.66",
             "netmask": "255.255.252.0",
             "routes": [
                {"network": "10.1.0.0", "netmask": "255.255.0.0", "gateway": "10.192.35.1"},
                {"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.192.35.254"}],
             "services": [{"type": "dns", "address": "10.0.0.53"}]}
        ],
        "services": [
            {"type": "dns", "address": "10.255.250.40"},
            {"type": "dns", "address": "2001:db8::53"},
            {"type": "ntp", "address": "10.0.0.123"},
            {"type": "dns", "address": "10.0.0.53"}
        ]
    }"#;

    #[test]
    fn network_data_gives_a_static_address_gateway_and_dns() {
        assert_eq!(
            parse_network_data(NETWORK_DATA).expect("static"),
            fixed(
                "10.192.35.66/22",
                Some("10.192.35.254"),
                &["10.0.0.53", "10.255.250.40"]
            )
        );
        let no_route = r#"{"networks": [{"type": "ipv4", "ip_address": "10.0.0.5",
            "netmask": "255.255.255.0"}], "services": []}"#;
        assert_eq!(
            parse_network_data(no_route).expect("static"),
            fixed("10.0.0.5/24", None, &[])
        );
    }

    #[test]
    fn network_data_with_dhcp_or_without_ipv4_is_none() {
        for text in [
            r#"{"networks": [{"type": "ipv4_dhcp", "link": "tap1"},
                {"type": "ipv4", "ip_address": "10.0.0.5", "netmask": "255.255.255.0"}]}"#,
            r#"{"networks": [{"type": "dhcp4"}]}"#,
            r#"{"networks": [{"type": "ipv6_slaac"}], "services": []}"#,
            r#"{"links": []}"#,
        ] {
            assert_eq!(parse_network_data(text).expect("dhcp"), None, "{text}");
        }
    }

    #[test]
    fn bad_network_data_is_an_error_saying_what() {
        for (text, want) in [
            (
                r#"{"networks": [{"type": "ipv4", "ip_address": "10.0.0.5", "netmask": "255.0.255.0"}]}"#,
                "netmask `255.0.255.0` is not contiguous",
            ),
            (
                r#"{"networks": [{"type": "ipv4", "ip_address": "10.0.0.5", "netmask": "24"}]}"#,
                "netmask `24` is not a dotted IPv4 netmask",
            ),
            (
                r#"{"networks": [{"type": "ipv4", "netmask": "255.255.255.0"}]}"#,
                "networks[0] of type ipv4 has no `ip_address`",
            ),
            (
                r#"{"networks": [{"type": "ipv4", "ip_address": "10.0.0.300", "netmask": "255.255.255.0"}]}"#,
                "network.address",
            ),
            (
                r#"{"networks": [{"type": "ipv4", "ip_address": "10.0.0.5", "netmask": "255.255.255.0",
                    "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "gw"}]}]}"#,
                "network.gateway",
            ),
            (r#"{"networks": {}}"#, "`networks` is not a list"),
            ("networks:", "not JSON"),
        ] {
            let err = format!("{:#}", parse_network_data(text).expect_err(text));
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn netmasks_become_prefixes_if_contiguous() {
        for (mask, want) in [
            ("255.255.255.0", Some(24)),
            ("255.255.252.0", Some(22)),
            ("255.255.255.255", Some(32)),
            ("0.0.0.0", Some(0)),
            ("128.0.0.0", Some(1)),
            ("255.255.255.1", None),
            ("0.255.255.255", None),
            ("255.255.255", None),
            ("", None),
        ] {
            assert_eq!(netmask_prefix(mask).ok(), want, "{mask}");
        }
    }

    #[test]
    fn network_config_version_2_in_its_forms() {
        for (text, want) in [
            (
                // Flow lists and gateway4.
                "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: \"52:54:00:12:34:56\"\n    \
                 set-name: eth0\n    addresses: [10.0.0.5/24, 'fd00::5/64']\n    gateway4: 10.0.0.1\n    \
                 nameservers:\n      addresses: [10.0.0.53, \"2001:db8::53\", 1.1.1.1]\n      search: [lan]\n",
                fixed("10.0.0.5/24", Some("10.0.0.1"), &["10.0.0.53", "1.1.1.1"]),
            ),
            (
                // Block lists, a default route, comments, a `network:` wrapper and `---`.
                "---\n# written by hand\nnetwork:\n  version: 2\n  renderer: networkd\n  ethernets:\n    \
                 id0:\n      dhcp4: false  # static\n      addresses:\n        - \"fd00::5/64\"\n        \
                 - 192.168.1.20/24\n      routes:\n        - to: ::/0\n          via: fd00::1\n        \
                 - to: default\n          via: 192.168.1.1\n          metric: 100\n      nameservers:\n        \
                 addresses:\n        - 192.168.1.1\n",
                fixed("192.168.1.20/24", Some("192.168.1.1"), &["192.168.1.1"]),
            ),
            (
                "version: 2\nethernets:\n  eth0:\n    addresses: [10.0.0.5/24]\n    routes:\n    \
                 - to: 0.0.0.0/0\n      via: 10.0.0.254\n",
                fixed("10.0.0.5/24", Some("10.0.0.254"), &[]),
            ),
            (
                "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n    addresses: [10.0.0.5/24]\n",
                None,
            ),
            ("version: 2\nethernets:\n  eth0:\n    dhcp4: yes\n", None),
            ("version: 2\n", None),
        ] {
            assert_eq!(parse_network_config(text).expect(text), want, "{text}");
        }
    }

    #[test]
    fn network_config_version_1_in_its_forms() {
        for (text, want) in [
            (
                "version: 1\nconfig:\n  - type: physical\n    name: eth0\n    mac_address: '52:54:00:12:34:56'\n    \
                 subnets:\n      - type: static\n        address: 10.0.0.5/24\n        gateway: 10.0.0.1\n        \
                 dns_nameservers: [10.0.0.53]\n  - type: nameserver\n    address: [1.1.1.1, 10.0.0.53]\n    \
                 search: [lan]\n",
                fixed("10.0.0.5/24", Some("10.0.0.1"), &["10.0.0.53", "1.1.1.1"]),
            ),
            (
                // Netmask form, the list at the key's indentation, IPv6 subnet first.
                "version: 1\nconfig:\n- type: physical\n  name: eth0\n  subnets:\n  - type: static6\n    \
                 address: fd00::5/64\n  - type: static\n    address: 172.16.0.9\n    netmask: 255.255.0.0\n    \
                 gateway: 172.16.0.1\n- type: nameserver\n  address: 172.16.0.2\n",
                fixed("172.16.0.9/16", Some("172.16.0.1"), &["172.16.0.2"]),
            ),
            (
                "version: 1\nconfig:\n  - type: physical\n    name: eth0\n    subnets:\n      - type: dhcp\n  \
                 - type: nameserver\n    address: [1.1.1.1]\n",
                None,
            ),
        ] {
            assert_eq!(parse_network_config(text).expect(text), want, "{text}");
        }
    }

    #[test]
    fn malformed_network_config_names_the_line_and_what_was_expected() {
        for (text, want) in [
            (
                "version: 2\nethernets:\n  eth0:\n    addresses: [10.0.0.5/24\n",
                "line 4: expected `]`",
            ),
            (
                "version: 2\nethernets:\n  eth0:\n    addresses:\n      - 10.0.0.5/24\n     - 10.0.0.6/24\n",
                "line 6:",
            ),
            (
                "version: 2\nethernets:\n  eth0:\n\taddresses: [10.0.0.5/24]\n",
                "line 4: expected spaces for indentation",
            ),
            (
                "version: 2\nbonds:\n  bond0: {}\n",
                "line 3: expected a plain value",
            ),
            (
                "version: 2\nbonds:\n  bond0:\n    interfaces: [eth0]\n",
                "line 2: expected one of version, renderer, ethernets in version 2, found `bonds`",
            ),
            ("version: 3\n", "line 1: expected `version: 1` or `version: 2`, found `3`"),
            ("# nothing\n", "the file is empty"),
            ("ethernets: {}\n", "line 1: expected a plain value"),
            (
                "version: 2\nethernets:\n  eth0:\n    dhcp4: maybe\n",
                "line 4: expected `dhcp4` to be true or false",
            ),
            (
                "version: 2\nethernets:\n  eth0:\n    dhcp6: true\n",
                "line 3: expected `dhcp4: true` or an IPv4 address",
            ),
            (
                "version: 2\nethernets:\n  eth0:\n    addresses: [10.0.0.5/24]\n    routes:\n      \
                 - to: 10.1.0.0/16\n        via: 10.0.0.1\n",
                "line 6: expected only the default route",
            ),
            (
                "version: 2\nethernets:\n  eth0:\n    addresses: [10.0.0.5/33]\n",
                "line 3: the settings read give network.address",
            ),
            (
                "version: 2\nversion: 2\n",
                "line 2: expected each key once",
            ),
            (
                "version: 1\nconfig:\n  - type: bond\n    name: bond0\n",
                "line 3: expected `type: physical` or `type: nameserver`, found `type: bond`",
            ),
            (
                "version: 1\nconfig:\n  - type: physical\n    subnets:\n      - type: static\n        \
                 address: 10.0.0.5\n",
                "line 6: expected `address` with a prefix",
            ),
            (
                "version: 1\nconfig:\n  - type: physical\n    subnets:\n      - type: static\n        \
                 address: 10.0.0.5\n        netmask: 255.0.255.0\n",
                "line 7: netmask `255.0.255.0` is not contiguous",
            ),
            (
                "version: 1\nconfig:\n  - type: physical\n    name: eth0\n",
                "line 3: expected `subnets`",
            ),
            (
                "version: 1\nconfig:\n  - type: physical\n    subnets:\n      - type: static\n        \
                 address: 10.0.0.5/24\n        gateway: 10.0.0\n",
                "line 5: the settings read give network.gateway",
            ),
        ] {
            let err = format!("{:#}", parse_network_config(text).expect_err(text));
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn comments_are_cut_outside_quotes_only() {
        for (line, want) in [
            ("a: b # c", "a: b "),
            ("# all", ""),
            ("a: 'x # y' # z", "a: 'x # y' "),
            ("a: x#y", "a: x#y"),
        ] {
            assert_eq!(strip_comment(line), want, "{line}");
        }
    }
}
