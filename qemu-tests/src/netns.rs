//! A private network that exists only on this machine: a network namespace made by the test, with
//! a bridge and tap devices in it, for guests that must reach a service the test runs (a DHCP
//! server, a time server) over UDP, which QEMU's user network cannot forward to the host. The
//! namespace, and every process started in it, goes away when the [`NetNs`] is dropped.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

/// A network namespace with a bridge `br0` holding `address/24`.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    address: Ipv4Addr,
    children: Vec<Child>,
}

/// Runs `ip ARGS`, failing with its output.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (package iproute2)")?;
    ensure!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl NetNs {
    /// Makes namespace `plinth-<tag>-<pid>` with loopback up and a bridge at `address/24`. Needs
    /// root (CI runs as root); fails, naming what is missing, otherwise.
    pub fn create(tag: &str, address: Ipv4Addr) -> Result<NetNs> {
        if !is_root() {
            bail!("a network namespace needs root: run the QEMU tests as root, as CI does");
        }
        let name = format!("plinth-{tag}-{}", std::process::id());
        // A namespace left by a killed run of the same process id.
        let _ = ip(&["netns", "delete", &name]);
        ip(&["netns", "add", &name])?;
        let ns = NetNs {
            name,
            address,
            children: Vec::new(),
        };
        let n = ns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&["-n", n, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", n, "link", "set", "br0", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bridge's address.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// Adds tap device `tap` on the bridge, for a guest's NIC.
    pub fn add_tap(&self, tap: &str) -> Result<()> {
        let n = self.name.as_str();
        ip(&["-n", n, "tuntap", "add", "dev", tap, "mode", "tap"])?;
        ip(&["-n", n, "link", "set", tap, "master", "br0"])?;
        ip(&["-n", n, "link", "set", tap, "up"])?;
        Ok(())
    }

    /// Starts `program ARGS` inside the namespace; it is killed when the namespace is dropped.
    pub fn spawn(&mut self, program: &str, args: &[String]) -> Result<()> {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {program} in namespace {}", self.name))?;
        self.children.push(child);
        Ok(())
    }

    /// Starts dnsmasq (package dnsmasq-base) as the bridge's DHCP server only (no DNS), leasing
    /// `.50`–`.99` of its /24 and passing `options` (`--dhcp-option` values such as `42,10.0.0.1`).
    pub fn dhcp_server(&mut self, options: &[String]) -> Result<()> {
        let [a, b, c, _] = self.address.octets();
        let mut args = vec![
            "--keep-in-foreground".to_owned(),
            "--no-resolv".to_owned(),
            "--no-hosts".to_owned(),
            "--port=0".to_owned(),
            "--interface=br0".to_owned(),
            "--bind-interfaces".to_owned(),
            "--leasefile-ro".to_owned(),
            "--log-dhcp".to_owned(),
            "--pid-file=".to_owned(),
            format!("--dhcp-range={a}.{b}.{c}.50,{a}.{b}.{c}.99,255.255.255.0,1h"),
        ];
        args.extend(options.iter().map(|o| format!("--dhcp-option={o}")));
        self.spawn("dnsmasq", &args)
    }
}

/// Whether this process runs as root.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = ip(&["netns", "delete", &self.name]);
    }
}
