//! Three Plinth machines form a Docker Swarm on a private layer-2 network that exists only on
//! this machine (a bridge inside a network namespace the test makes; each guest's NIC is a tap on
//! it, with a static address from its user data). One image for all three: version 2 of the
//! update test series (shared with `update.rs` and `pxe.rs`), whose instance data makes one node
//! the first manager (with a declared 3-replica service published through the routing mesh) and
//! the other two workers joining it with the token the test reads from the manager's Engine API;
//! all three update with `strategy = "swarm"`. Checked: `swarm-ready` on each node, three ready
//! nodes, the replicas spread over the three, the service answering on every node's published
//! port, a worker powered off (its replica rescheduled, the service still answering) and the same
//! worker booted again (it is back in the swarm without joining again). Then version 3 is
//! published on a release server inside the namespace: the three nodes update one at a time,
//! each drained before its reboot and active again after its bless, while the service keeps
//! answering.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use os_config::userdata::{UserData, FW_CFG_USER_DATA};
use qemu_tests::engine::{http_get, Engine};
use qemu_tests::netns::NetNs;
use qemu_tests::{image, series, Vm, VmOptions};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(420);
const BRIDGE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The service's port, published on every node through the routing mesh.
const SERVICE_PORT: u16 = 8090;

/// The update series' release server address, which the guests reach through the bridge (their
/// gateway), where the test serves its release folder.
const RELEASES: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);
/// How long the three nodes may take to update one after another.
const ROLLING: Duration = Duration::from_secs(1500);
/// The longest the service may go without answering on any node during the rolling update.
const LONGEST_SILENCE: Duration = Duration::from_secs(10);

/// A node of the test cluster: its guest, its address on the bridge and its engine (through a
/// forward into the namespace).
struct Node {
    name: &'static str,
    address: Ipv4Addr,
    engine: Engine,
    opts: VmOptions,
    vm: Option<Vm>,
}

impl Node {
    fn new(
        ns: &NetNs,
        dir: &Path,
        raw: &Path,
        (name, host): (&'static str, u8),
        swarm: &str,
    ) -> Result<Node> {
        let address = Ipv4Addr::new(10, 77, 0, host);
        let tap = format!("tap{host}");
        ns.add_tap(&tap)?;
        let folder = dir.join(name);
        std::fs::create_dir_all(&folder)?;
        let disk = image::private_copy(raw, &folder)?;
        let user_data = format!(
            "hostname = \"{name}\"\n\n[network]\nmode = \"static\"\naddress = \"{address}/24\"\ngateway = \"{BRIDGE}\"\n\n{swarm}\n[update]\nstrategy = \"swarm\"\n"
        );
        // The user data is Plinth's and valid before any guest sees it.
        UserData::parse(name, &user_data).map_err(|e| anyhow::anyhow!("{e}"))?;
        let file = folder.join("user-data.toml");
        std::fs::write(&file, &user_data)?;
        let mut opts = VmOptions::new(&disk);
        opts.tap = Some((ns.name().to_owned(), tap));
        opts.fw_cfg_files = vec![(FW_CFG_USER_DATA.to_owned(), file)];
        let engine = Engine {
            port: ns.forward(SocketAddr::from((address, 2375)))?,
        };
        Ok(Node {
            name,
            address,
            engine,
            opts,
            vm: None,
        })
    }

    fn boot(&mut self) -> Result<()> {
        self.vm = Some(Vm::boot(&self.opts).with_context(|| format!("booting {}", self.name))?);
        Ok(())
    }

    fn vm(&mut self) -> Result<&mut Vm> {
        self.vm
            .as_mut()
            .with_context(|| format!("{} is not running", self.name))
    }

    /// Waits for `PLINTH-STATUS swarm-ready` after console offset `from` and returns its fields.
    fn swarm_ready(&mut self, from: usize) -> Result<std::collections::BTreeMap<String, String>> {
        let name = self.name;
        let (line, _) = self
            .vm()?
            .wait_for_after("PLINTH-STATUS swarm-ready", from, BOOT)
            .with_context(|| format!("{name} did not report swarm-ready"))?;
        Ok(qemu_tests::parse_status(&line))
    }
}

#[test]
fn three_machines_form_a_swarm_keep_a_service_answering_when_one_fails_and_update_one_at_a_time(
) -> Result<()> {
    let total = Instant::now();
    let dir = tempfile::tempdir()?;
    let (key, secret) = series::trusted_key(dir.path())?;
    let public = secret.public().to_string();
    let (_, raw) = series::build_version(dir.path(), 2, &public)?;
    let (v3_text, v3_raw) = series::build_version(dir.path(), 3, &public)?;
    let ns = NetNs::create("swarm", BRIDGE)?;
    let releases = dir.path().join("releases");
    std::fs::create_dir_all(&releases)?;
    ns.add_address(RELEASES)?;
    ns.serve_folder(&releases, SocketAddr::from((RELEASES, 8000)))?;
    let manager_swarm = format!(
        r#"[swarm]
role = "manager"
init = true
advertise = "10.77.0.11"

[[service]]
name = "hello"
image = "plinth/busybox:1"
replicas = 3
ports = ["{SERVICE_PORT}:80"]
command = ["/bin/busybox", "sh", "-c", "/bin/busybox mkdir -p /www && /bin/busybox hostname > /www/index.html && exec /bin/busybox httpd -f -p 80 -h /www"]
"#
    );
    let mut manager = Node::new(&ns, dir.path(), &raw, ("m1", 11), &manager_swarm)?;

    // The manager first: it starts the swarm and creates the service.
    let started = Instant::now();
    manager.boot()?;
    let ready = manager.swarm_ready(0)?;
    ensure!(
        ready.get("role").map(String::as_str) == Some("manager"),
        "manager reported {ready:?}"
    );
    eprintln!(
        "manager swarm-ready at {:.0}s: {ready:?}",
        started.elapsed().as_secs_f64()
    );
    let swarm = manager.engine.call("GET", "/swarm", None)?;
    let token = swarm["JoinTokens"]["Worker"]
        .as_str()
        .with_context(|| format!("no worker token in {swarm}"))?
        .to_owned();

    // The two workers join with the token from their user data.
    let worker_swarm = |host: u8| {
        format!(
            "[swarm]\nrole = \"worker\"\njoin = [\"10.77.0.11:2377\"]\ntoken = \"{token}\"\nadvertise = \"10.77.0.{host}\"\nmanager-api = \"tcp://10.77.0.11:2375\"\n"
        )
    };
    let mut workers = vec![
        Node::new(&ns, dir.path(), &raw, ("w1", 12), &worker_swarm(12))?,
        Node::new(&ns, dir.path(), &raw, ("w2", 13), &worker_swarm(13))?,
    ];
    for worker in &mut workers {
        worker.boot()?;
    }
    for worker in &mut workers {
        let ready = worker.swarm_ready(0)?;
        ensure!(
            ready.get("role").map(String::as_str) == Some("worker"),
            "{} reported {ready:?}",
            worker.name
        );
        eprintln!(
            "{} swarm-ready at {:.0}s: {ready:?}",
            worker.name,
            started.elapsed().as_secs_f64()
        );
    }
    wait_until(BOOT, || Ok(ready_nodes(&manager.engine)?.len() == 3))
        .context("the manager does not see three ready nodes")?;
    let nodes = ready_nodes(&manager.engine)?;
    ensure!(
        nodes == BTreeSet::from(["m1".to_owned(), "w1".to_owned(), "w2".to_owned()]),
        "ready nodes: {nodes:?}"
    );

    // The manager created the service before the workers joined, so its three replicas run on
    // the manager; Swarm does not move running tasks to new nodes. A forced update (what
    // `docker service update --force hello` does) reschedules them, one node at a time, spread
    // over the three nodes.
    wait_until(BOOT, || {
        Ok(running_tasks(&manager.engine)?.values().sum::<usize>() == 3)
    })
    .context("the service's three replicas are not running")?;
    force_update(&manager.engine)?;
    wait_until(BOOT, || Ok(running_tasks(&manager.engine)?.len() == 3))
        .context("the service's three replicas are not running on three nodes")?;
    let spread = running_tasks(&manager.engine)?;
    eprintln!(
        "three replicas running at {:.0}s on {spread:?}",
        started.elapsed().as_secs_f64()
    );
    for node in std::iter::once(&manager).chain(workers.iter()) {
        answers(&ns, node.address, node.name)?;
    }

    // Worker w2 loses power: its replica goes to another node and the service keeps answering.
    let lost = workers.pop().context("no second worker")?;
    let mut lost = lost;
    lost.vm()?.kill();
    let cut = Instant::now();
    wait_until(BOOT, || {
        let tasks = running_tasks(&manager.engine)?;
        Ok(tasks.values().sum::<usize>() == 3
            && !tasks.contains_key(&node_id(&manager.engine, "w2")?))
    })
    .context("w2's replica was not rescheduled")?;
    eprintln!(
        "w2's replica rescheduled {:.0}s after its power cut: {:?}",
        cut.elapsed().as_secs_f64(),
        running_tasks(&manager.engine)?
    );
    answers(&ns, manager.address, manager.name)?;
    answers(&ns, workers[0].address, workers[0].name)?;

    // Version 3 is published, then w2 boots again from its own disk (still version 2): it is
    // still a member (nothing to join), ready again, and updates with the others.
    let mut nodes = vec![manager, workers.remove(0), lost];
    let from = publish_v3(&mut nodes, &v3_text, &v3_raw, &key, &releases, dir.path())?;
    let lost = &mut nodes[2];
    lost.vm = None;
    lost.boot()?;
    rolling_update(&ns, &mut nodes, from)?;

    // w2's return, from its console: swarm-ready as a worker before its update's reboot, and no
    // swarm error (it did not join again).
    let console = nodes[2].vm()?.console();
    let rebooting = console
        .find("PLINTH-STATUS update-rebooting")
        .context("w2 never rebooted into 3.0.0")?;
    let back = &console[..rebooting];
    let ready = back
        .lines()
        .find(|l| l.contains("PLINTH-STATUS swarm-ready"))
        .map(qemu_tests::parse_status)
        .with_context(|| format!("w2 did not report swarm-ready after its power cut:\n{back}"))?;
    ensure!(
        ready.get("role").map(String::as_str) == Some("worker"),
        "w2 reported {ready:?} after its power cut"
    );
    ensure!(
        !back.contains("swarm-error"),
        "w2 reported a swarm error after its power cut:\n{back}"
    );
    for node in &nodes {
        answers(&ns, node.address, node.name)?;
        eprintln!("{}: {}", node.name, memory_in_use(&node.engine)?);
    }
    eprintln!("whole test {:.0}s", total.elapsed().as_secs_f64());
    Ok(())
}

/// Publishes version 3 into the release folder; returns where each running node's console
/// stands (0 for one that is not running: its next boot starts a new console).
fn publish_v3(
    nodes: &mut [Node],
    v3_text: &str,
    v3_raw: &Path,
    key: &Path,
    releases: &Path,
    dir: &Path,
) -> Result<Vec<usize>> {
    let from = nodes
        .iter()
        .map(|n| n.vm.as_ref().map_or(0, |vm| vm.console().len()))
        .collect();
    let def = dir.join("publish-v3.toml");
    std::fs::write(&def, v3_text)?;
    builder::publish::publish(&builder::publish::Options {
        file: def,
        key: key.to_path_buf(),
        to: releases.to_path_buf(),
        disk: Some(v3_raw.to_path_buf()),
        rollout: None,
        expires: Default::default(),
    })?;
    eprintln!("published 3.0.0");
    Ok(from)
}

/// Watches the three nodes update to version 3 (published, their consoles read from `from`):
/// one at a time (each reboots only after the one before it was blessed), each drained before
/// its reboot, all active again and the swarm's update lock free at the end, and the service
/// answering on some node all along.
fn rolling_update(ns: &NetNs, nodes: &mut [Node], from: Vec<usize>) -> Result<()> {
    let started = Instant::now();

    // One prober per node: a request to the service on that node's published port every half
    // second, each in a thread of its own (a request the mesh sends to a task that is going
    // away may hang; it must not hold up the next one).
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut probers = Vec::new();
    for node in nodes.iter() {
        let port = ns.forward(SocketAddr::from((node.address, SERVICE_PORT)))?;
        let (answered, stop) = (answered.clone(), stop.clone());
        probers.push(std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let answered = answered.clone();
                std::thread::spawn(move || {
                    if probe(port) {
                        answered.lock().expect("lock").push(Instant::now());
                    }
                });
                std::thread::sleep(Duration::from_millis(500));
            }
        }));
    }

    // When each node was first seen rebooting into, and blessed in, version 3.
    let mut rebooting: Vec<Option<f64>> = vec![None; nodes.len()];
    let mut blessed: Vec<Option<f64>> = vec![None; nodes.len()];
    while blessed.iter().any(Option::is_none) {
        ensure!(
            started.elapsed() < ROLLING,
            "the rolling update did not finish within {ROLLING:?}: rebooting {rebooting:?}, blessed {blessed:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
        let now = started.elapsed().as_secs_f64();
        for (i, node) in nodes.iter_mut().enumerate() {
            let console = node.vm()?.console();
            let tail = console.get(from[i]..).unwrap_or_default();
            if rebooting[i].is_none() && tail.contains("PLINTH-STATUS update-rebooting") {
                rebooting[i] = Some(now);
                eprintln!("{} reboots into 3.0.0 at {now:.0}s", node.name);
            }
            if blessed[i].is_none()
                && tail.lines().any(|l| {
                    l.contains("PLINTH-STATUS boot-blessed") && l.contains("version=3.0.0")
                })
            {
                blessed[i] = Some(now);
                eprintln!("{} blessed 3.0.0 at {now:.0}s", node.name);
            }
        }
    }
    // The lock is given back after the bless: wait for the last one before looking.
    let manager = &Engine {
        port: nodes[0].engine.port,
    };
    wait_until(BOOT, || {
        let swarm = manager.call("GET", "/swarm", None)?;
        Ok(swarm["Spec"]["Labels"]["plinth.update-lock"].is_null())
    })
    .context("the swarm's update lock was not given back")?;
    wait_until(BOOT, || Ok(ready_nodes(manager)?.len() == 3))
        .context("not all three nodes are ready after the update")?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for prober in probers {
        let _ = prober.join();
    }

    // One at a time: sorted by their reboots, each reboots after the one before was blessed.
    let mut order: Vec<(f64, f64, &str)> = (0..nodes.len())
        .map(|i| {
            (
                rebooting[i].unwrap_or(0.0),
                blessed[i].unwrap_or(0.0),
                nodes[i].name,
            )
        })
        .collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    for pair in order.windows(2) {
        ensure!(
            pair[1].0 >= pair[0].1,
            "{} rebooted at {:.0}s, before {} was blessed at {:.0}s: {order:?}",
            pair[1].2,
            pair[1].0,
            pair[0].2,
            pair[0].1
        );
    }
    for (i, node) in nodes.iter_mut().enumerate() {
        let console = node.vm()?.console();
        let tail = console.get(from[i]..).unwrap_or_default();
        ensure!(
            tail.contains("reason=\"draining"),
            "{} did not wait for its drain before rebooting:\n{tail}",
            node.name
        );
    }
    let listed = manager.call("GET", "/nodes", None)?;
    for node in listed.as_array().context("/nodes is no list")? {
        ensure!(
            node["Spec"]["Availability"] == "active"
                && node["Spec"]["Labels"]["plinth.update-drained"].is_null(),
            "a node is not active again after its update: {node}"
        );
    }
    // The service answered on some node all along.
    let mut times: Vec<Instant> = answered.lock().expect("lock").clone();
    times.sort();
    let (mut silence, mut silent_from) = (Duration::ZERO, Duration::ZERO);
    let mut last = started;
    for t in &times {
        if t.saturating_duration_since(last) > silence {
            silence = t.saturating_duration_since(last);
            silent_from = last.saturating_duration_since(started);
        }
        last = *t;
    }
    eprintln!(
        "rolling update in {:.0}s, order {order:?}; {} answers, longest silence {:.1}s from {:.0}s",
        started.elapsed().as_secs_f64(),
        times.len(),
        silence.as_secs_f64(),
        silent_from.as_secs_f64()
    );
    ensure!(
        silence <= LONGEST_SILENCE,
        "the service did not answer on any node for {silence:?} from {silent_from:?} into the rolling update (order {order:?})"
    );
    Ok(())
}

/// How much of the guest's memory is in use (`MemTotal - MemAvailable`), read from a container
/// (`/proc/meminfo` is the machine's).
fn memory_in_use(engine: &Engine) -> Result<String> {
    let run = engine.run(
        "plinth/busybox:1",
        &["/bin/busybox", "cat", "/proc/meminfo"],
        false,
        &[],
    )?;
    let field = |name: &str| -> Result<u64> {
        run.output
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} in {}", run.output))
    };
    let (total, available) = (field("MemTotal:")?, field("MemAvailable:")?);
    Ok(format!(
        "{} MiB of {} MiB in use",
        (total - available) / 1024,
        total / 1024
    ))
}

/// Host names of the nodes the manager sees as ready.
fn ready_nodes(engine: &Engine) -> Result<BTreeSet<String>> {
    let nodes = engine.call("GET", "/nodes", None)?;
    Ok(nodes
        .as_array()
        .context("/nodes is no list")?
        .iter()
        .filter(|n| n["Status"]["State"] == "ready")
        .filter_map(|n| n["Description"]["Hostname"].as_str().map(str::to_owned))
        .collect())
}

/// The node id of the node with host name `name`.
fn node_id(engine: &Engine, name: &str) -> Result<String> {
    let nodes = engine.call("GET", "/nodes", None)?;
    nodes
        .as_array()
        .context("/nodes is no list")?
        .iter()
        .find(|n| n["Description"]["Hostname"] == name)
        .and_then(|n| n["ID"].as_str().map(str::to_owned))
        .with_context(|| format!("no node {name} in {nodes}"))
}

/// Asks the manager to reschedule every task of `hello` (the service's `ForceUpdate` counter).
fn force_update(engine: &Engine) -> Result<()> {
    let service = engine.call("GET", "/services/hello", None)?;
    let version = service["Version"]["Index"]
        .as_u64()
        .with_context(|| format!("no version in {service}"))?;
    let mut spec = service["Spec"].clone();
    let force = spec["TaskTemplate"]["ForceUpdate"].as_u64().unwrap_or(0) + 1;
    spec["TaskTemplate"]["ForceUpdate"] = force.into();
    engine.call(
        "POST",
        &format!("/services/hello/update?version={version}"),
        Some(&spec),
    )?;
    Ok(())
}

/// Running tasks of the `hello` service, counted by node id.
fn running_tasks(engine: &Engine) -> Result<std::collections::BTreeMap<String, usize>> {
    let tasks: Value = engine.call(
        "GET",
        "/tasks?filters=%7B%22service%22%3A%5B%22hello%22%5D%2C%22desired-state%22%3A%5B%22running%22%5D%7D",
        None,
    )?;
    let mut by_node = std::collections::BTreeMap::new();
    for task in tasks.as_array().context("/tasks is no list")? {
        if task["Status"]["State"] == "running" {
            let node = task["NodeID"].as_str().unwrap_or_default().to_owned();
            *by_node.entry(node).or_insert(0) += 1;
        }
    }
    Ok(by_node)
}

/// The service answers on `address`'s published port (the routing mesh sends the request to a
/// replica on any node).
fn answers(ns: &NetNs, address: Ipv4Addr, name: &str) -> Result<()> {
    let port = ns.forward(SocketAddr::from((address, SERVICE_PORT)))?;
    let page = http_get(port, "/", Duration::from_secs(120))
        .with_context(|| format!("the service does not answer on {name}'s port {SERVICE_PORT}"))?;
    ensure!(
        !page.trim().is_empty(),
        "empty page from {name}'s port {SERVICE_PORT}"
    );
    Ok(())
}

/// One request to the service through the forward at `port`: true if a page came back within
/// 3 s.
fn probe(port: u16) -> bool {
    use std::io::{Read, Write};
    let attempt = || -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.set_write_timeout(Some(Duration::from_secs(3)))?;
        stream.write_all(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply)
    };
    attempt().is_ok_and(|reply| {
        reply.starts_with("HTTP/1.") && reply.split_whitespace().nth(1) == Some("200")
    })
}

fn wait_until(timeout: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) if Instant::now() < deadline => std::thread::sleep(Duration::from_secs(2)),
            Ok(false) => anyhow::bail!("condition not met within {timeout:?}"),
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying: {e:#}");
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}
