//! `[update] strategy = "swarm"`: a Docker Swarm node reboots into a staged update only while it
//! holds the swarm's update lock, and only once it is drained.
//!
//! The lock is a label of the swarm object itself ([`LOCK_LABEL`] = the holder's node ID), kept
//! in the managers' Raft store: the engine accepts a change of the swarm's spec only at the
//! version it was read at, so of two nodes that race for a free lock one wins and the other reads
//! it taken. One node of the swarm reboots at a time; a manager also waits while another manager
//! is not ready and reachable, so the managers keep their quorum. No server besides the swarm's
//! own managers is involved.
//!
//! Before the reboot the node first makes sure that draining it does not stop a service: a
//! replicated service whose running tasks all run on this node is given a forced update (what
//! `docker service update --force` does), which replaces its tasks one at a time under the
//! service's own update settings and spreads them over the available nodes, and the node waits
//! until one of them runs elsewhere (for at most [`SPREAD_LIMIT`], recorded in [`SPREAD_LABEL`]).
//! Swarm places tasks only when it creates them, so after a rolling update the last nodes to
//! come back would otherwise hold none and the next node to drain would hold them all. Then it
//! sets its own availability to `drain` (recording what it was in [`DRAINED_LABEL`]) and waits
//! until none of its tasks runs any more and the tasks that replace them elsewhere run (for at most [`DRAIN_LIMIT`], after which a task that cannot be placed
//! anywhere else does not hold the update back). After a good boot of the new version (or of
//! the old one, after a rollback) it makes itself available again and gives the lock back.
//!
//! A manager does all this through its own engine. A worker's engine cannot change the swarm, so
//! a worker talks to a manager's Engine API (`[swarm] manager-api`); only its own node ID comes
//! from its own engine.

#![warn(missing_docs)]

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::stage2::docker::{self, SwarmInfo};

/// The swarm label naming the node that holds the update lock.
pub const LOCK_LABEL: &str = "plinth.update-lock";
/// The node label recording the availability a node had before it drained itself for an update
/// (`active` or `pause`), with the Unix time the drain began: `active 1767225600`.
pub const DRAINED_LABEL: &str = "plinth.update-drained";
/// The node label recording when the node gave the services that ran only on it a forced
/// update, to spread them before its drain (Unix time).
pub const SPREAD_LABEL: &str = "plinth.update-spread";
/// How long a node waits for a service it spread to run elsewhere before it drains anyway.
pub const SPREAD_LIMIT: Duration = Duration::from_secs(300);
/// How long a drained node waits for its tasks to move before it reboots anyway.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(300);
/// How soon a node that waits for its drain asks again.
pub const DRAIN_RETRY: Duration = Duration::from_secs(5);
/// How soon a node that waits for the lock (or could not reach a manager) asks again.
pub const LOCK_RETRY: Duration = Duration::from_secs(20);

/// Task states of a task that has not ended.
const LIVE_STATES: &[&str] = &[
    "new",
    "allocated",
    "pending",
    "assigned",
    "accepted",
    "preparing",
    "ready",
    "starting",
    "running",
];

/// The swarm operations the strategy needs from a manager's engine; [`docker::Client`]
/// implements it, tests fake it.
pub trait LockEngine {
    /// `GET /swarm`.
    fn swarm_inspect(&self) -> docker::Result<Value>;
    /// `POST /swarm/update?version=`.
    fn swarm_update(&self, version: u64, spec: &Value) -> docker::Result<()>;
    /// `GET /nodes`.
    fn list_nodes(&self) -> docker::Result<Vec<Value>>;
    /// `POST /nodes/{id}/update?version=`.
    fn update_node(&self, id: &str, version: u64, spec: &Value) -> docker::Result<()>;
    /// `GET /tasks?filters=`.
    fn list_tasks(&self, filters: &Value) -> docker::Result<Vec<Value>>;
    /// `GET /services/{id}`.
    fn inspect_service(&self, id: &str) -> docker::Result<Value>;
    /// `POST /services/{id}/update?version=`.
    fn update_service(&self, id: &str, version: u64, spec: &Value) -> docker::Result<()>;
}

impl LockEngine for docker::Client {
    fn swarm_inspect(&self) -> docker::Result<Value> {
        docker::Client::swarm_inspect(self)
    }
    fn swarm_update(&self, version: u64, spec: &Value) -> docker::Result<()> {
        docker::Client::swarm_update(self, version, spec)
    }
    fn list_nodes(&self) -> docker::Result<Vec<Value>> {
        docker::Client::list_nodes(self)
    }
    fn update_node(&self, id: &str, version: u64, spec: &Value) -> docker::Result<()> {
        docker::Client::update_node(self, id, version, spec)
    }
    fn list_tasks(&self, filters: &Value) -> docker::Result<Vec<Value>> {
        docker::Client::list_tasks(self, filters)
    }
    fn inspect_service(&self, id: &str) -> docker::Result<Value> {
        docker::Client::inspect_service(self, id)
    }
    fn update_service(&self, id: &str, version: u64, spec: &Value) -> docker::Result<()> {
        docker::Client::update_service(self, id, version, spec)
    }
}

/// What the node may do about its staged update now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// It holds the lock and is drained: reboot.
    Reboot,
    /// Not yet: why, and how soon to ask again.
    Wait {
        /// Why, for the `update-waiting` line.
        reason: String,
        /// How soon to ask again.
        retry: Duration,
    },
}

/// The engines the strategy talks to for `[swarm]`: this machine's own (for its node ID) and a
/// manager's (the own one on a manager, `manager-api` on a worker).
pub fn engines(
    swarm: Option<&os_config::definition::Swarm>,
) -> Result<(docker::Client, docker::Client)> {
    let Some(swarm) = swarm else {
        bail!("[update] strategy = \"swarm\" needs [swarm] in the definition or the user data");
    };
    let timeouts =
        |c: docker::Client| c.with_timeouts(Duration::from_secs(20), Duration::from_secs(20));
    let local = timeouts(docker::Client::new(docker::DEFAULT_SOCKET));
    let api = match &swarm.manager_api {
        Some(url) => timeouts(docker::Client::tcp(
            url.strip_prefix("tcp://").unwrap_or(url),
        )),
        None => local.clone(),
    };
    Ok((local, api))
}

/// Before the reboot: takes the lock, drains the node and waits for its tasks to move. `info` is
/// this node's swarm state from its own engine, `now` the Unix time.
pub fn before_reboot(info: &SwarmInfo, api: &impl LockEngine, now: u64) -> Result<Step> {
    if info.local_node_state != "active" || info.node_id.is_empty() {
        // Not in a swarm (yet, or any more): nothing to drain and no lock to share.
        return Ok(Step::Reboot);
    }
    let me = info.node_id.as_str();
    if let Some(wait) = take_lock(info, api)? {
        return Ok(wait);
    }
    let node = find_node(api, me)?;
    let drained_at = match label(&node["Spec"], DRAINED_LABEL) {
        Some(value) => drain_started(&value),
        None => {
            if let Some(wait) = spread_first(api, &node, now)? {
                return Ok(wait);
            }
            drain(api, &node, now)?;
            return Ok(Step::Wait {
                reason: "draining this swarm node before the reboot".to_owned(),
                retry: DRAIN_RETRY,
            });
        }
    };
    let (here, elsewhere) = unsettled_tasks(api, me)?;
    if here + elsewhere == 0 {
        return Ok(Step::Reboot);
    }
    if now.saturating_sub(drained_at) >= DRAIN_LIMIT.as_secs() {
        eprintln!(
            "plinth-update: {here} task(s) still on this node and {elsewhere} not running elsewhere after {} s of draining: rebooting anyway",
            DRAIN_LIMIT.as_secs()
        );
        return Ok(Step::Reboot);
    }
    Ok(Step::Wait {
        reason: format!(
            "draining: {here} task(s) still on this node, {elsewhere} replacement(s) not running yet"
        ),
        retry: DRAIN_RETRY,
    })
}

/// After a good boot: makes the node available as it was before its drain, then gives the lock
/// back. True once done (or when there was nothing to do); false to try again later.
pub fn after_good_boot(info: &SwarmInfo, api: &impl LockEngine) -> Result<bool> {
    match info.local_node_state.as_str() {
        "active" if !info.node_id.is_empty() => {}
        // Still (re)connecting to the managers: the lock and the drain wait for it.
        "pending" => return Ok(false),
        _ => return Ok(true),
    }
    let me = info.node_id.as_str();
    let node = find_node(api, me)?;
    if let Some(value) = label(&node["Spec"], DRAINED_LABEL) {
        let before = value.split_whitespace().next().unwrap_or("active");
        let mut spec = node["Spec"].clone();
        spec["Availability"] = json!(before);
        remove_label(&mut spec, DRAINED_LABEL);
        api.update_node(me, version(&node)?, &spec)
            .context("making this swarm node available again after its update")?;
        eprintln!("plinth-update: swarm node {me} is {before} again");
    }
    let swarm = api.swarm_inspect()?;
    if label(&swarm["Spec"], LOCK_LABEL).as_deref() != Some(me) {
        return Ok(true);
    }
    let mut spec = swarm["Spec"].clone();
    remove_label(&mut spec, LOCK_LABEL);
    match api.swarm_update(version(&swarm)?, &spec) {
        Ok(()) => {
            eprintln!("plinth-update: gave the swarm's update lock back");
            Ok(true)
        }
        // The swarm changed since it was read: read it again next time.
        Err(e) if is_stale(&e) => Ok(false),
        Err(e) => Err(e).context("giving the swarm's update lock back"),
    }
}

/// Takes the swarm's update lock for this node, or says why not (`Some(wait)`).
fn take_lock(info: &SwarmInfo, api: &impl LockEngine) -> Result<Option<Step>> {
    let me = info.node_id.as_str();
    let swarm = api.swarm_inspect()?;
    match label(&swarm["Spec"], LOCK_LABEL) {
        Some(holder) if holder == me => return Ok(None),
        Some(holder) => {
            let name = node_name(api, &holder);
            return Ok(Some(Step::Wait {
                reason: format!("swarm node {name} holds the swarm's update lock"),
                retry: LOCK_RETRY,
            }));
        }
        None => {}
    }
    if info.control_available {
        if let Some(reason) = quorum_risk(api, me)? {
            return Ok(Some(Step::Wait {
                reason,
                retry: LOCK_RETRY,
            }));
        }
    }
    let mut spec = swarm["Spec"].clone();
    set_label(&mut spec, LOCK_LABEL, me);
    match api.swarm_update(version(&swarm)?, &spec) {
        Ok(()) => {
            eprintln!("plinth-update: took the swarm's update lock");
            Ok(None)
        }
        Err(e) if is_stale(&e) => Ok(Some(Step::Wait {
            reason: "another node changed the swarm while this one took its update lock".to_owned(),
            retry: DRAIN_RETRY,
        })),
        Err(e) => Err(e).context("taking the swarm's update lock"),
    }
}

/// Why rebooting this manager now could cost the managers their quorum: another manager that is
/// not ready and reachable.
fn quorum_risk(api: &impl LockEngine, me: &str) -> Result<Option<String>> {
    for node in api.list_nodes()? {
        let Some(status) = node.get("ManagerStatus").filter(|s| s.is_object()) else {
            continue;
        };
        if node["ID"].as_str() == Some(me) {
            continue;
        }
        let state = node["Status"]["State"].as_str().unwrap_or("unknown");
        let reachability = status["Reachability"].as_str().unwrap_or("unknown");
        if state != "ready" || reachability != "reachable" {
            return Ok(Some(format!(
                "manager {} is {state} and {reachability}: rebooting this manager now could cost the swarm its quorum",
                hostname(&node)
            )));
        }
    }
    Ok(None)
}

/// Before the drain: gives each replicated service whose running tasks all run on this node a
/// forced update, once, and waits (`Some`) until one of its tasks runs elsewhere or
/// [`SPREAD_LIMIT`] has passed. `None`: nothing stands in the way of the drain.
fn spread_first(api: &impl LockEngine, node: &Value, now: u64) -> Result<Option<Step>> {
    let me = node["ID"].as_str().unwrap_or_default();
    let lonely = lonely_services(api, me)?;
    if lonely.is_empty() {
        return Ok(None);
    }
    let names = lonely
        .iter()
        .map(|s| s["Spec"]["Name"].as_str().unwrap_or("?"))
        .collect::<Vec<_>>()
        .join(", ");
    let reason = format!("spreading: {names} run(s) only on this swarm node");
    let Some(since) = label(&node["Spec"], SPREAD_LABEL) else {
        for service in &lonely {
            force_update(api, service)?;
        }
        let mut spec = node["Spec"].clone();
        set_label(&mut spec, SPREAD_LABEL, &now.to_string());
        api.update_node(me, version(node)?, &spec)
            .context("recording the spread on this swarm node")?;
        eprintln!("plinth-update: gave {names} a forced update to spread it before the drain");
        return Ok(Some(Step::Wait {
            reason,
            retry: DRAIN_RETRY,
        }));
    };
    let since: u64 = since.parse().unwrap_or(0);
    if now.saturating_sub(since) >= SPREAD_LIMIT.as_secs() {
        eprintln!(
            "plinth-update: {names} still run(s) only on this node after {} s: draining anyway",
            SPREAD_LIMIT.as_secs()
        );
        return Ok(None);
    }
    Ok(Some(Step::Wait {
        reason,
        retry: DRAIN_RETRY,
    }))
}

/// The replicated services (as `GET /services/{id}` gives them) with a running task on node
/// `me` and none elsewhere, when another node is ready and active to take them.
fn lonely_services(api: &impl LockEngine, me: &str) -> Result<Vec<Value>> {
    let elsewhere_available = api.list_nodes()?.iter().any(|n| {
        n["ID"].as_str() != Some(me)
            && n["Status"]["State"] == "ready"
            && n["Spec"]["Availability"] == "active"
    });
    if !elsewhere_available {
        return Ok(Vec::new());
    }
    // Service ID -> (running here, running elsewhere).
    let mut counts = std::collections::BTreeMap::<&str, (usize, usize)>::new();
    let tasks = api.list_tasks(&json!({ "desired-state": ["running"] }))?;
    for task in &tasks {
        let (Some(service), "running") = (
            task["ServiceID"].as_str(),
            task["Status"]["State"].as_str().unwrap_or_default(),
        ) else {
            continue;
        };
        let entry = counts.entry(service).or_default();
        if task["NodeID"].as_str() == Some(me) {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
    }
    let mut lonely = Vec::new();
    for (id, _) in counts
        .into_iter()
        .filter(|(_, (here, away))| *here > 0 && *away == 0)
    {
        let service = api
            .inspect_service(id)
            .with_context(|| format!("reading service {id}"))?;
        if service["Spec"]["Mode"]["Replicated"].is_object() {
            lonely.push(service);
        }
    }
    Ok(lonely)
}

/// What `docker service update --force` does: the same spec with `TaskTemplate.ForceUpdate`
/// counted up, so the engine replaces every task under the service's own update settings.
fn force_update(api: &impl LockEngine, service: &Value) -> Result<()> {
    let id = service["ID"].as_str().unwrap_or_default();
    let mut spec = service["Spec"].clone();
    let count = spec["TaskTemplate"]["ForceUpdate"].as_u64().unwrap_or(0);
    spec["TaskTemplate"]["ForceUpdate"] = json!(count + 1);
    api.update_service(id, version(service)?, &spec)
        .with_context(|| format!("giving service {id} a forced update to spread it"))
}

/// Sets this node's availability to `drain`, recording the one before and the time.
fn drain(api: &impl LockEngine, node: &Value, now: u64) -> Result<()> {
    let id = node["ID"].as_str().unwrap_or_default();
    let mut spec = node["Spec"].clone();
    let before = spec["Availability"].as_str().unwrap_or("active").to_owned();
    // A node an operator drained stays drained after the update.
    set_label(&mut spec, DRAINED_LABEL, &format!("{before} {now}"));
    remove_label(&mut spec, SPREAD_LABEL);
    spec["Availability"] = json!("drain");
    api.update_node(id, version(node)?, &spec)
        .context("draining this swarm node")?;
    eprintln!("plinth-update: drained swarm node {id} (it was {before})");
    Ok(())
}

/// Tasks that have not ended on node `me`, and tasks elsewhere that should run but do not yet
/// (the replacements of this node's tasks among them).
fn unsettled_tasks(api: &impl LockEngine, me: &str) -> Result<(usize, usize)> {
    let tasks = api.list_tasks(&json!({ "desired-state": ["running"] }))?;
    let mut elsewhere = 0;
    for task in &tasks {
        let on_me = task["NodeID"].as_str() == Some(me);
        let state = task["Status"]["State"].as_str().unwrap_or_default();
        if !on_me && state != "running" {
            elsewhere += 1;
        }
    }
    let mine = api.list_tasks(&json!({ "node": [me] }))?;
    let here = mine
        .iter()
        .filter(|t| LIVE_STATES.contains(&t["Status"]["State"].as_str().unwrap_or_default()))
        .count();
    Ok((here, elsewhere))
}

fn find_node(api: &impl LockEngine, id: &str) -> Result<Value> {
    api.list_nodes()?
        .into_iter()
        .find(|n| n["ID"].as_str() == Some(id))
        .with_context(|| format!("the swarm's managers do not list this node ({id})"))
}

fn node_name(api: &impl LockEngine, id: &str) -> String {
    api.list_nodes()
        .ok()
        .and_then(|nodes| nodes.into_iter().find(|n| n["ID"].as_str() == Some(id)))
        .map_or_else(|| id.to_owned(), |n| format!("{} ({id})", hostname(&n)))
}

fn hostname(node: &Value) -> &str {
    node["Description"]["Hostname"]
        .as_str()
        .or_else(|| node["ID"].as_str())
        .unwrap_or("?")
}

fn version(object: &Value) -> Result<u64> {
    object["Version"]["Index"]
        .as_u64()
        .context("the engine's answer has no Version.Index")
}

fn label(spec: &Value, key: &str) -> Option<String> {
    spec["Labels"][key].as_str().map(str::to_owned)
}

fn set_label(spec: &mut Value, key: &str, value: &str) {
    if !spec["Labels"].is_object() {
        spec["Labels"] = json!({});
    }
    spec["Labels"][key] = json!(value);
}

fn remove_label(spec: &mut Value, key: &str) {
    if let Some(labels) = spec["Labels"].as_object_mut() {
        labels.remove(key);
    }
}

fn drain_started(value: &str) -> u64 {
    value
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

/// The engine refused a write made at an older version (`update out of sequence`).
fn is_stale(e: &docker::Error) -> bool {
    matches!(e, docker::Error::Api { message, .. } if message.contains("out of sequence"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A manager's view of a swarm: its spec, nodes and tasks, and the writes made.
    struct FakeManager {
        swarm: Mutex<Value>,
        nodes: Mutex<Vec<Value>>,
        tasks: Mutex<Vec<Value>>,
        services: Mutex<Vec<Value>>,
        /// Another node writes the swarm just before this one's next swarm write.
        race: Mutex<bool>,
    }

    impl FakeManager {
        fn new(nodes: Vec<Value>) -> FakeManager {
            FakeManager {
                swarm: Mutex::new(
                    json!({ "Version": { "Index": 10 }, "Spec": { "Name": "default", "Labels": {} } }),
                ),
                nodes: Mutex::new(nodes),
                tasks: Mutex::new(Vec::new()),
                services: Mutex::new(Vec::new()),
                race: Mutex::new(false),
            }
        }
        fn lock_holder(&self) -> Option<String> {
            label(&self.swarm.lock().expect("lock")["Spec"], LOCK_LABEL)
        }
        fn node(&self, id: &str) -> Value {
            self.nodes
                .lock()
                .expect("fake engine")
                .iter()
                .find(|n| n["ID"] == id)
                .cloned()
                .expect("fake engine")
        }
    }

    fn stale() -> docker::Error {
        docker::Error::Api {
            what: "update".into(),
            status: 500,
            message: "rpc error: code = Unknown desc = update out of sequence".into(),
        }
    }

    impl LockEngine for FakeManager {
        fn swarm_inspect(&self) -> docker::Result<Value> {
            Ok(self.swarm.lock().expect("lock").clone())
        }
        fn swarm_update(&self, version: u64, spec: &Value) -> docker::Result<()> {
            let mut swarm = self.swarm.lock().expect("lock");
            if std::mem::take(&mut *self.race.lock().expect("lock")) {
                swarm["Version"]["Index"] = json!(version + 1);
                swarm["Spec"]["Labels"][LOCK_LABEL] = json!("node-other");
            }
            if swarm["Version"]["Index"] != version {
                return Err(stale());
            }
            swarm["Version"]["Index"] = json!(version + 1);
            swarm["Spec"] = spec.clone();
            Ok(())
        }
        fn list_nodes(&self) -> docker::Result<Vec<Value>> {
            Ok(self.nodes.lock().expect("lock").clone())
        }
        fn update_node(&self, id: &str, version: u64, spec: &Value) -> docker::Result<()> {
            write_at(&mut self.nodes.lock().expect("lock"), id, version, spec)
        }
        fn list_tasks(&self, filters: &Value) -> docker::Result<Vec<Value>> {
            let tasks = self.tasks.lock().expect("lock").clone();
            Ok(tasks
                .into_iter()
                .filter(|t| {
                    filters["node"]
                        .as_array()
                        .is_none_or(|n| n.contains(&t["NodeID"]))
                })
                .filter(|t| {
                    filters["desired-state"]
                        .as_array()
                        .is_none_or(|d| d.contains(&t["DesiredState"]))
                })
                .collect())
        }
        fn inspect_service(&self, id: &str) -> docker::Result<Value> {
            Ok(self
                .services
                .lock()
                .expect("lock")
                .iter()
                .find(|s| s["ID"] == id)
                .cloned()
                .expect("fake engine"))
        }
        fn update_service(&self, id: &str, version: u64, spec: &Value) -> docker::Result<()> {
            write_at(&mut self.services.lock().expect("lock"), id, version, spec)
        }
    }

    /// Replaces the spec of the object `id` if it is still at `version`, as the engine does.
    fn write_at(objects: &mut [Value], id: &str, version: u64, spec: &Value) -> docker::Result<()> {
        let object = objects
            .iter_mut()
            .find(|o| o["ID"] == id)
            .expect("fake engine");
        if object["Version"]["Index"] != version {
            return Err(stale());
        }
        object["Version"]["Index"] = json!(version + 1);
        object["Spec"] = spec.clone();
        Ok(())
    }

    fn service(id: &str, name: &str, mode: Value) -> Value {
        json!({ "ID": id, "Version": { "Index": 5 }, "Spec": { "Name": name, "Mode": mode, "TaskTemplate": {} } })
    }

    fn service_task(service: &str, node: &str, state: &str) -> Value {
        json!({ "ServiceID": service, "NodeID": node, "DesiredState": "running", "Status": { "State": state } })
    }

    fn node(id: &str, manager: bool, state: &str, reachability: &str) -> Value {
        let mut node = json!({
            "ID": id,
            "Version": { "Index": 3 },
            "Spec": { "Role": if manager { "manager" } else { "worker" }, "Availability": "active", "Labels": { "zone": "a" } },
            "Description": { "Hostname": format!("host-{id}") },
            "Status": { "State": state },
        });
        if manager {
            node["ManagerStatus"] = json!({ "Reachability": reachability });
        }
        node
    }

    fn task(node: &str, desired: &str, state: &str) -> Value {
        json!({ "NodeID": node, "DesiredState": desired, "Status": { "State": state } })
    }

    fn info(id: &str, manager: bool) -> SwarmInfo {
        SwarmInfo {
            local_node_state: "active".into(),
            node_id: id.into(),
            control_available: manager,
            ..Default::default()
        }
    }

    fn three() -> FakeManager {
        FakeManager::new(vec![
            node("m1", true, "ready", "reachable"),
            node("w1", false, "ready", ""),
            node("w2", false, "ready", ""),
        ])
    }

    #[test]
    fn a_worker_takes_the_lock_drains_and_reboots_once_its_tasks_moved() {
        let api = three();
        *api.tasks.lock().expect("lock") = vec![
            task("w1", "running", "running"),
            task("m1", "running", "running"),
        ];
        let step = before_reboot(&info("w1", false), &api, 1000).expect("fake engine");
        assert!(matches!(step, Step::Wait { .. }), "{step:?}");
        assert_eq!(api.lock_holder().as_deref(), Some("w1"));
        let spec = api.node("w1")["Spec"].clone();
        assert_eq!(spec["Availability"], "drain");
        assert_eq!(spec["Labels"][DRAINED_LABEL], "active 1000");
        assert_eq!(spec["Labels"]["zone"], "a", "other labels are kept");

        // The engine shuts the task down and starts its replacement on w2.
        *api.tasks.lock().expect("lock") = vec![
            task("w1", "shutdown", "running"),
            task("w2", "running", "starting"),
            task("m1", "running", "running"),
        ];
        let step = before_reboot(&info("w1", false), &api, 1010).expect("fake engine");
        match step {
            Step::Wait { reason, .. } => assert!(
                reason.contains("1 task(s) still on this node, 1 replacement"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        *api.tasks.lock().expect("lock") = vec![
            task("w1", "shutdown", "shutdown"),
            task("w2", "running", "running"),
            task("m1", "running", "running"),
        ];
        assert_eq!(
            before_reboot(&info("w1", false), &api, 1020).expect("fake engine"),
            Step::Reboot
        );
    }

    #[test]
    fn a_node_running_every_replica_of_a_service_spreads_it_before_its_drain() {
        let api = three();
        *api.services.lock().expect("lock") = vec![
            service("s1", "hello", json!({ "Replicated": { "Replicas": 3 } })),
            service("s2", "agent", json!({ "Global": {} })),
            service("s3", "spread", json!({ "Replicated": { "Replicas": 2 } })),
        ];
        *api.tasks.lock().expect("lock") = vec![
            service_task("s1", "w1", "running"),
            service_task("s1", "w1", "running"),
            service_task("s2", "w1", "running"),
            service_task("s3", "w1", "running"),
            service_task("s3", "m1", "running"),
        ];
        let forced = |id: &str| {
            api.inspect_service(id).expect("fake")["Spec"]["TaskTemplate"]["ForceUpdate"].clone()
        };
        match before_reboot(&info("w1", false), &api, 1000).expect("fake engine") {
            Step::Wait { reason, .. } => {
                assert!(
                    reason.starts_with("spreading: hello run(s) only"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Only the replicated service that runs nowhere else is forced; the node is not drained.
        assert_eq!(forced("s1"), 1);
        assert!(forced("s2").is_null() && forced("s3").is_null());
        assert_eq!(api.node("w1")["Spec"]["Availability"], "active");
        assert_eq!(api.node("w1")["Spec"]["Labels"][SPREAD_LABEL], "1000");

        // Asked again while the update runs: it is not forced twice.
        assert!(matches!(
            before_reboot(&info("w1", false), &api, 1005).expect("fake engine"),
            Step::Wait { .. }
        ));
        assert_eq!(forced("s1"), 1);

        // One of its tasks runs on w2 now: the node drains, and the spread's label goes.
        api.tasks.lock().expect("lock")[0] = service_task("s1", "w2", "running");
        match before_reboot(&info("w1", false), &api, 1010).expect("fake engine") {
            Step::Wait { reason, .. } => assert!(reason.starts_with("draining"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let spec = api.node("w1")["Spec"].clone();
        assert_eq!(spec["Availability"], "drain");
        assert!(spec["Labels"][SPREAD_LABEL].is_null(), "{spec}");
    }

    #[test]
    fn a_spread_that_cannot_happen_holds_the_drain_back_only_for_its_limit() {
        let api = three();
        *api.services.lock().expect("lock") = vec![service(
            "s1",
            "hello",
            json!({ "Replicated": { "Replicas": 1 } }),
        )];
        *api.tasks.lock().expect("lock") = vec![service_task("s1", "w1", "running")];
        before_reboot(&info("w1", false), &api, 1000).expect("fake engine");
        before_reboot(&info("w1", false), &api, 1299).expect("fake engine");
        assert_eq!(api.node("w1")["Spec"]["Availability"], "active");
        before_reboot(&info("w1", false), &api, 1300).expect("fake engine");
        assert_eq!(api.node("w1")["Spec"]["Availability"], "drain");

        // With no other node to take them, nothing is forced at all.
        let api = FakeManager::new(vec![node("w1", false, "ready", "")]);
        *api.services.lock().expect("lock") = vec![service(
            "s1",
            "hello",
            json!({ "Replicated": { "Replicas": 1 } }),
        )];
        *api.tasks.lock().expect("lock") = vec![service_task("s1", "w1", "running")];
        before_reboot(&info("w1", false), &api, 1000).expect("fake engine");
        assert_eq!(api.node("w1")["Spec"]["Availability"], "drain");
        assert!(
            api.inspect_service("s1").expect("fake")["Spec"]["TaskTemplate"]["ForceUpdate"]
                .is_null()
        );
    }

    #[test]
    fn a_drain_that_cannot_finish_holds_the_update_back_only_for_its_limit() {
        let api = three();
        *api.tasks.lock().expect("lock") = vec![task("w2", "running", "pending")];
        assert!(matches!(
            before_reboot(&info("w1", false), &api, 1000).expect("fake engine"),
            Step::Wait { .. }
        ));
        assert!(matches!(
            before_reboot(&info("w1", false), &api, 1000 + 299).expect("fake engine"),
            Step::Wait { .. }
        ));
        assert_eq!(
            before_reboot(&info("w1", false), &api, 1000 + 300).expect("fake engine"),
            Step::Reboot
        );
    }

    #[test]
    fn a_lock_held_by_another_node_is_waited_for_without_touching_anything() {
        let api = three();
        api.swarm.lock().expect("lock")["Spec"]["Labels"][LOCK_LABEL] = json!("w2");
        match before_reboot(&info("w1", false), &api, 1000).expect("fake engine") {
            Step::Wait { reason, retry } => {
                assert!(reason.contains("host-w2 (w2) holds"), "{reason}");
                assert_eq!(retry, LOCK_RETRY);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(api.node("w1")["Spec"]["Availability"], "active");
        assert_eq!(api.swarm.lock().expect("lock")["Version"]["Index"], 10);
    }

    #[test]
    fn of_two_nodes_racing_for_the_lock_the_later_write_loses() {
        let api = three();
        *api.race.lock().expect("lock") = true;
        let step = before_reboot(&info("w1", false), &api, 1000).expect("fake engine");
        assert!(matches!(step, Step::Wait { .. }), "{step:?}");
        assert_eq!(api.lock_holder().as_deref(), Some("node-other"));
        assert_eq!(
            api.node("w1")["Spec"]["Availability"],
            "active",
            "not drained without the lock"
        );
    }

    #[test]
    fn a_manager_waits_while_another_manager_is_unreachable() {
        let api = FakeManager::new(vec![
            node("m1", true, "ready", "reachable"),
            node("m2", true, "down", "unreachable"),
            node("m3", true, "ready", "reachable"),
        ]);
        match before_reboot(&info("m1", true), &api, 1000).expect("fake engine") {
            Step::Wait { reason, .. } => assert!(
                reason.contains("host-m2 is down and unreachable"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(api.lock_holder(), None);
        // Once m2 is back, m1 takes the lock.
        api.nodes.lock().expect("lock")[1] = node("m2", true, "ready", "reachable");
        before_reboot(&info("m1", true), &api, 1000).expect("fake engine");
        assert_eq!(api.lock_holder().as_deref(), Some("m1"));
    }

    #[test]
    fn after_the_good_boot_the_node_is_available_as_before_and_the_lock_is_free() {
        let api = three();
        before_reboot(&info("w1", false), &api, 1000).expect("fake engine");
        assert_eq!(api.lock_holder().as_deref(), Some("w1"));
        assert!(after_good_boot(&info("w1", false), &api).expect("fake engine"));
        let spec = api.node("w1")["Spec"].clone();
        assert_eq!(spec["Availability"], "active");
        assert!(spec["Labels"].get(DRAINED_LABEL).is_none());
        assert_eq!(spec["Labels"]["zone"], "a");
        assert_eq!(api.lock_holder(), None);
        // Another node may take it now.
        before_reboot(&info("w2", false), &api, 1100).expect("fake engine");
        assert_eq!(api.lock_holder().as_deref(), Some("w2"));
    }

    #[test]
    fn a_node_an_operator_drained_stays_drained_and_a_pending_node_tries_again() {
        let api = three();
        let mut spec = api.node("w1")["Spec"].clone();
        spec["Availability"] = json!("pause");
        api.update_node("w1", 3, &spec).expect("fake engine");
        before_reboot(&info("w1", false), &api, 1000).expect("fake engine");
        assert_eq!(
            api.node("w1")["Spec"]["Labels"][DRAINED_LABEL],
            "pause 1000"
        );
        let mut pending = info("w1", false);
        pending.local_node_state = "pending".into();
        assert!(!after_good_boot(&pending, &api).expect("fake engine"));
        assert_eq!(
            api.lock_holder().as_deref(),
            Some("w1"),
            "kept until the node is back"
        );
        assert!(after_good_boot(&info("w1", false), &api).expect("fake engine"));
        assert_eq!(api.node("w1")["Spec"]["Availability"], "pause");
        // A node drained by hand, without the label, is left as it is.
        let mut spec = api.node("w2")["Spec"].clone();
        spec["Availability"] = json!("drain");
        api.update_node("w2", 3, &spec).expect("fake engine");
        assert!(after_good_boot(&info("w2", false), &api).expect("fake engine"));
        assert_eq!(api.node("w2")["Spec"]["Availability"], "drain");
    }

    #[test]
    fn a_node_outside_a_swarm_reboots_without_a_lock() {
        let api = three();
        let mut outside = info("", false);
        outside.local_node_state = "inactive".into();
        assert_eq!(
            before_reboot(&outside, &api, 0).expect("fake engine"),
            Step::Reboot
        );
        assert!(after_good_boot(&outside, &api).expect("fake engine"));
        assert_eq!(api.lock_holder(), None);
    }
}
