//! A private network that exists only on this machine: a network namespace made by the test, with
//! a bridge and tap devices in it, for guests that must reach a service the test runs (a DHCP
//! server, a time server) over UDP, which QEMU's user network cannot forward to the host. The
//! namespace, and every process started in it, goes away when the [`NetNs`] is dropped.

use std::io::Write;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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

impl NetNs {
    /// Forwards `127.0.0.1:PORT` of the test's own namespace to `target` inside this namespace
    /// (a guest's address on the bridge) and returns `PORT`: each connection is relayed from a
    /// thread that entered the namespace to connect. The listener lives as long as the test
    /// process; once the namespace is gone its connections fail.
    pub fn forward(&self, target: SocketAddr) -> Result<u16> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).context("binding a forward")?;
        let port = listener.local_addr()?.port();
        let netns = PathBuf::from(format!("/var/run/netns/{}", self.name));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let netns = netns.clone();
                std::thread::spawn(move || {
                    if let Err(e) = relay(client, &netns, target) {
                        eprintln!("netns forward to {target}: {e:#}");
                    }
                });
            }
        });
        Ok(port)
    }

    /// Gives the bridge one more address, `address/32`: a guest whose gateway is the bridge
    /// reaches it (as the release server address of the update test series).
    pub fn add_address(&self, address: Ipv4Addr) -> Result<()> {
        ip(&[
            "-n",
            &self.name,
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            "br0",
        ])
    }

    /// Serves the folder `root` (`builder::serve`'s static file server, as a release server) at
    /// `address` (one of the bridge's) inside this namespace, from a thread that entered it. The
    /// server lives as long as the test process.
    pub fn serve_folder(&self, root: &Path, address: SocketAddr) -> Result<()> {
        let netns = PathBuf::from(format!("/var/run/netns/{}", self.name));
        let root = root.to_path_buf();
        let (bound, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let listener = enter(&netns).and_then(|()| {
                TcpListener::bind(address).with_context(|| format!("binding {address}"))
            });
            let listener = match listener {
                Ok(listener) => {
                    let _ = bound.send(Ok(()));
                    listener
                }
                Err(e) => {
                    let _ = bound.send(Err(e));
                    return;
                }
            };
            for stream in listener.incoming().flatten() {
                let root = root.clone();
                std::thread::spawn(move || -> Result<()> {
                    let mut writer = stream.try_clone()?;
                    let mut reader = std::io::BufReader::new(stream);
                    builder::serve::serve_connection(&root, &mut reader, &mut writer)?;
                    Ok(())
                });
            }
        });
        ready
            .recv()
            .context("the file server thread ended before binding")?
    }
}

/// Moves this thread (only) into the network namespace at `netns`.
fn enter(netns: &Path) -> Result<()> {
    let ns = std::fs::File::open(netns)
        .with_context(|| format!("opening namespace {}", netns.display()))?;
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&ns),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .with_context(|| format!("entering namespace {}", netns.display()))
}

/// Connects to `target` from inside the namespace at `netns` (this thread only moves there) and
/// copies bytes both ways until either side closes.
fn relay(client: TcpStream, netns: &Path, target: SocketAddr) -> Result<()> {
    enter(netns)?;
    let upstream = match TcpStream::connect_timeout(&target, Duration::from_secs(10)) {
        Ok(stream) => stream,
        Err(e) => {
            let _ = client.shutdown(Shutdown::Both);
            return Err(e).with_context(|| format!("connecting to {target}"));
        }
    };
    let (mut up_read, mut client_write) = (upstream.try_clone()?, client.try_clone()?);
    let (mut client_read, mut up_write) = (client, upstream);
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut up_read, &mut client_write);
        let _ = client_write.flush();
        let _ = client_write.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut client_read, &mut up_write);
    let _ = up_write.shutdown(Shutdown::Write);
    let _ = back.join();
    Ok(())
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
