//! Makes the engine's Docker Swarm membership match `[swarm]`, through the engine API only.
//!
//! A node in the declared role stays as it is. An inactive node starts the swarm (`init = true`)
//! or joins it (`join` and a token); a join whose managers do not answer yet is tried again later
//! with a growing pause, without holding up anything else. Before asking the engine to init or
//! join, Plinth writes [`JOINED_MARKER`] with the declaration it acted on: a node that carries it
//! was joined by Plinth, so it leaves the swarm once no `[swarm]` is declared any more, and it
//! leaves and joins again when the declaration it joined with changed. A node in the swarm in a
//! role other than the declared one leaves and joins again too, unless Plinth itself joined it
//! with this very declaration (joining again would give the same role: the token is the other
//! role's), which is reported instead.

#![warn(missing_docs)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use os_config::definition::{ContainerNetwork, Definition, Service, Swarm, SwarmRole};
use serde_json::{json, Value};

use crate::stage2::containers::{self, StatusSink};
use crate::stage2::docker::{self, ServiceSummary, SwarmInfo};

/// Where Plinth records that it made this node init or join a swarm, and with which
/// declaration (`role=`, `init=`, `join=` lines).
pub const JOINED_MARKER: &str = "/var/lib/plinth/swarm-joined";

/// The first pause after a failed round; it doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(5);
/// The longest pause between two failed rounds.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often a converged node checks its membership and services again.
pub const RECHECK: Duration = Duration::from_secs(300);

/// The swarm operations plinth-init needs beyond the containers'; [`docker::Client`] implements
/// it, tests fake it.
pub trait SwarmEngine: containers::Engine {
    /// The engine's swarm state (`GET /info`).
    fn swarm_info(&self) -> docker::Result<SwarmInfo>;
    /// Starts a swarm; returns the node ID.
    fn swarm_init(&self, body: &Value) -> docker::Result<String>;
    /// Joins a swarm.
    fn swarm_join(&self, body: &Value) -> docker::Result<()>;
    /// Leaves the swarm, forced.
    fn swarm_leave(&self) -> docker::Result<()>;
    /// Every service.
    fn list_services(&self) -> docker::Result<Vec<ServiceSummary>>;
    /// Creates a service; returns its ID.
    fn create_service(&self, name: &str, body: &Value) -> docker::Result<String>;
    /// Replaces a service's spec at `version`.
    fn update_service(&self, id: &str, version: u64, body: &Value) -> docker::Result<()>;
    /// Removes a service.
    fn remove_service(&self, id: &str) -> docker::Result<()>;
}

impl SwarmEngine for docker::Client {
    fn swarm_info(&self) -> docker::Result<SwarmInfo> {
        docker::Client::swarm_info(self)
    }
    fn swarm_init(&self, body: &Value) -> docker::Result<String> {
        docker::Client::swarm_init(self, body)
    }
    fn swarm_join(&self, body: &Value) -> docker::Result<()> {
        docker::Client::swarm_join(self, body)
    }
    fn swarm_leave(&self) -> docker::Result<()> {
        docker::Client::swarm_leave(self)
    }
    fn list_services(&self) -> docker::Result<Vec<ServiceSummary>> {
        docker::Client::list_services(self)
    }
    fn create_service(&self, name: &str, body: &Value) -> docker::Result<String> {
        docker::Client::create_service(self, name, body)
    }
    fn update_service(&self, id: &str, version: u64, body: &Value) -> docker::Result<()> {
        docker::Client::update_service(self, id, version, body)
    }
    fn remove_service(&self, id: &str) -> docker::Result<()> {
        docker::Client::remove_service(self, id)
    }
}

/// Paths membership touches, overridable for tests.
#[derive(Debug, Clone)]
pub struct Options {
    /// [`JOINED_MARKER`].
    pub marker: PathBuf,
    /// Prefix of `[swarm] token-file` (`/` on the machine).
    pub host_root: PathBuf,
    /// `/sys/class/net`, where an `advertise` interface is looked up.
    pub sys_class_net: PathBuf,
    /// Image archives and mount sources, as for containers.
    pub containers: containers::Options,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            marker: PathBuf::from(JOINED_MARKER),
            host_root: PathBuf::from("/"),
            sys_class_net: PathBuf::from("/sys/class/net"),
            containers: containers::Options::default(),
        }
    }
}

/// A node in the swarm as declared: the `swarm-ready` line's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// `manager` or `worker`.
    pub role: SwarmRole,
    /// The node's ID.
    pub node_id: String,
    /// Managers in the swarm (0 when a worker cannot tell).
    pub managers: u64,
    /// Nodes in the swarm (0 when a worker cannot tell).
    pub nodes: u64,
}

/// What a membership round found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// No `[swarm]` and no swarm Plinth joined: nothing was asked of the engine.
    Undeclared,
    /// No `[swarm]`: the swarm Plinth had joined was left.
    Left,
    /// In the swarm as declared.
    Ready(Ready),
}

/// The marker's text for a declaration: what decides which swarm and role the node is in.
pub fn marker_text(swarm: &Swarm) -> String {
    format!(
        "role={}\ninit={}\njoin={}\n",
        swarm.role.name(),
        swarm.init,
        swarm.join.join(",")
    )
}

/// The role a swarm state says the node has.
fn role_of(info: &SwarmInfo) -> SwarmRole {
    if info.control_available {
        SwarmRole::Manager
    } else {
        SwarmRole::Worker
    }
}

/// The marker's text, `None` when there is none.
fn read_marker(path: &Path) -> Result<Option<String>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

fn remove_marker(path: &Path) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("removing {}: {e}", path.display()))
        }
        _ => Ok(()),
    }
}

fn write_marker(path: &Path, swarm: &Swarm) -> Result<(), String> {
    let write = |path: &Path| -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, marker_text(swarm))
    };
    write(path).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// The address to advertise: `advertise` itself when it is an IP address, else the first IPv4
/// address of that interface; empty (the engine picks) when not declared.
fn advertise_address(swarm: &Swarm, options: &Options) -> Result<String, String> {
    let Some(advertise) = &swarm.advertise else {
        return Ok(String::new());
    };
    if advertise.parse::<IpAddr>().is_ok() {
        return Ok(advertise.clone());
    }
    let addresses = crate::stage2::net::interface_ipv4(&options.sys_class_net, advertise)
        .map_err(|e| format!("[swarm] advertise = \"{advertise}\": {e:#}"))?;
    addresses.first().map(ToString::to_string).ok_or_else(|| {
        format!("[swarm] advertise = \"{advertise}\": the interface has no IPv4 address yet")
    })
}

/// The join token: `token`, or the trimmed content of `token-file` under the host root.
fn join_token(swarm: &Swarm, options: &Options) -> Result<String, String> {
    if let Some(token) = &swarm.token {
        return Ok(token.clone());
    }
    let Some(file) = &swarm.token_file else {
        return Err("[swarm] has neither token nor token-file".to_owned());
    };
    let path = options.host_root.join(file.trim_start_matches('/'));
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("[swarm] token-file = \"{file}\": {e}"))?;
    let token = text.trim();
    os_config::validate::swarm_token(token)
        .map_err(|e| format!("[swarm] token-file = \"{file}\": {e}"))?;
    Ok(token.to_owned())
}

/// The `POST /swarm/init` body.
pub fn init_body(swarm: &Swarm, advertise: &str) -> Value {
    json!({ "ListenAddr": swarm.listen, "AdvertiseAddr": advertise, "ForceNewCluster": false })
}

/// The `POST /swarm/join` body.
pub fn join_body(swarm: &Swarm, advertise: &str, token: &str) -> Value {
    json!({
        "ListenAddr": swarm.listen,
        "AdvertiseAddr": advertise,
        "RemoteAddrs": swarm.join,
        "JoinToken": token,
    })
}

/// Makes the node's membership match `declared`. Without a declaration and without
/// [`JOINED_MARKER`] it asks the engine nothing. An error says why the node is not (yet) in the
/// swarm as declared; the caller tries again later.
pub fn reconcile_membership(
    engine: &dyn SwarmEngine,
    declared: Option<&Swarm>,
    options: &Options,
) -> Result<Membership, String> {
    let marker = read_marker(&options.marker)?;
    let Some(swarm) = declared else {
        if marker.is_none() {
            return Ok(Membership::Undeclared);
        }
        let info = engine.swarm_info().map_err(|e| e.to_string())?;
        if info.local_node_state != "inactive" {
            crate::info!("swarm: no [swarm] is declared: leaving the swarm Plinth joined");
            engine.swarm_leave().map_err(|e| e.to_string())?;
        }
        remove_marker(&options.marker)?;
        return Ok(Membership::Left);
    };
    let info = engine.swarm_info().map_err(|e| e.to_string())?;
    let ours = marker.as_deref() == Some(marker_text(swarm).as_str());
    let changed = marker.is_some() && !ours;
    match info.local_node_state.as_str() {
        "active" if role_of(&info) == swarm.role && !changed => return ready(&info, swarm.role),
        "active" if role_of(&info) != swarm.role && ours => {
            return Err(format!(
                "the node joined as a {} although role = \"{}\": the join token is probably the {}s' (`docker swarm join-token -q {}` prints the right one)",
                role_of(&info).name(),
                swarm.role.name(),
                role_of(&info).name(),
                swarm.role.name()
            ))
        }
        "active" => {
            crate::info!(
                "swarm: the node is a {} of a swarm{}, declared is a {}: leaving to join as declared",
                role_of(&info).name(),
                if changed { " joined under another declaration" } else { "" },
                swarm.role.name()
            );
            leave(engine, options)?;
        }
        "pending" if !changed => {
            return Err(
                "joining is under way: the managers have not answered yet".to_owned(),
            )
        }
        "pending" | "error" => {
            if !info.error.is_empty() {
                crate::info!("swarm: the node is in state {}: {}", info.local_node_state, info.error);
            }
            leave(engine, options)?;
        }
        "locked" => {
            return Err("the swarm is locked (autolock): unlock it with `docker swarm unlock`".to_owned())
        }
        _ => {}
    }
    enter(engine, swarm, options)?;
    let info = engine.swarm_info().map_err(|e| e.to_string())?;
    match info.local_node_state.as_str() {
        "active" => ready(&info, swarm.role),
        state => Err(format!(
            "the node is {state} after joining{}",
            match info.error.as_str() {
                "" => String::new(),
                error => format!(": {error}"),
            }
        )),
    }
}

fn ready(info: &SwarmInfo, declared: SwarmRole) -> Result<Membership, String> {
    let role = role_of(info);
    if role != declared {
        return Err(format!(
            "the node is a {} although role = \"{}\"",
            role.name(),
            declared.name()
        ));
    }
    Ok(Membership::Ready(Ready {
        role,
        node_id: info.node_id.clone(),
        managers: info.managers,
        nodes: info.nodes,
    }))
}

fn leave(engine: &dyn SwarmEngine, options: &Options) -> Result<(), String> {
    engine.swarm_leave().map_err(|e| e.to_string())?;
    remove_marker(&options.marker)
}

/// Inits or joins as declared, after recording in the marker that Plinth did.
fn enter(engine: &dyn SwarmEngine, swarm: &Swarm, options: &Options) -> Result<(), String> {
    let advertise = advertise_address(swarm, options)?;
    if swarm.init {
        write_marker(&options.marker, swarm)?;
        let node = engine
            .swarm_init(&init_body(swarm, &advertise))
            .map_err(|e| e.to_string())?;
        crate::info!("swarm: started a new swarm as node {node}");
        return Ok(());
    }
    let token = join_token(swarm, options)?;
    write_marker(&options.marker, swarm)?;
    engine
        .swarm_join(&join_body(swarm, &advertise, &token))
        .map_err(|e| e.to_string())?;
    crate::info!("swarm: joined through {}", swarm.join.join(", "));
    Ok(())
}

/// Membership, then (on a manager) services, retried with a growing pause after a failure and
/// checked again every [`RECHECK`] once in place. Prints `swarm-ready` when the node's state
/// changes and `swarm-error` after each failed round.
#[derive(Debug)]
pub struct Rounds {
    swarm: Option<Swarm>,
    services: Vec<Service>,
    networks: Vec<ContainerNetwork>,
    options: Options,
    next: Option<Instant>,
    backoff: Duration,
    last_ready: Option<Ready>,
}

impl Rounds {
    /// The rounds for a definition's `[swarm]`, `[[service]]`s and `[[container-network]]`s.
    pub fn new(definition: &Definition, options: Options) -> Rounds {
        Rounds {
            swarm: definition.swarm.clone(),
            services: definition.services.clone(),
            networks: definition.container_networks.clone(),
            options,
            next: None,
            backoff: FIRST_BACKOFF,
            last_ready: None,
        }
    }

    /// Makes the next [`Rounds::tick`] run at once (after the engine was restarted).
    pub fn now_due(&mut self) {
        self.next = None;
    }

    /// The time the next round is due, `None` if at once.
    pub fn next_due(&self) -> Option<Instant> {
        self.next
    }

    /// Runs a round if one is due at `now`. Without `[swarm]` and without a swarm Plinth
    /// joined, this only looks for the marker file.
    pub fn tick(&mut self, engine: &dyn SwarmEngine, now: Instant, sink: &dyn StatusSink) {
        if self.next.is_some_and(|due| now < due) {
            return;
        }
        match self.round(engine) {
            Ok(None) => self.next = Some(now + RECHECK),
            Ok(Some(ready)) => {
                if self.last_ready.as_ref() != Some(&ready) {
                    sink.status(
                        "swarm-ready",
                        &[
                            ("role", ready.role.name()),
                            ("node-id", &ready.node_id),
                            ("managers", &ready.managers.to_string()),
                            ("nodes", &ready.nodes.to_string()),
                        ],
                    );
                    self.last_ready = Some(ready);
                }
                self.backoff = FIRST_BACKOFF;
                self.next = Some(now + RECHECK);
            }
            Err(reason) => {
                sink.status("swarm-error", &[("reason", &reason)]);
                self.last_ready = None;
                self.next = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// Membership, then services on a manager; the node's state when in the swarm.
    fn round(&self, engine: &dyn SwarmEngine) -> Result<Option<Ready>, String> {
        match reconcile_membership(engine, self.swarm.as_ref(), &self.options)? {
            Membership::Undeclared | Membership::Left => Ok(None),
            Membership::Ready(ready) => {
                if ready.role == SwarmRole::Manager {
                    let report = crate::stage2::services::reconcile(
                        engine,
                        &self.services,
                        &self.networks,
                        &self.options.containers,
                    )?;
                    crate::info!("services: {report}");
                    for warning in &report.warnings {
                        crate::info!("services: {warning}");
                    }
                    if let Some((name, reason)) = report.failed.first() {
                        return Err(format!("service {name}: {reason}"));
                    }
                }
                Ok(Some(ready))
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use crate::stage2::docker::{ContainerDetails, ContainerSummary, NetworkSummary};

    /// A swarm-capable fake engine: a node state, services and networks, and a log of calls.
    #[derive(Default)]
    pub(crate) struct FakeSwarm {
        pub info: Mutex<SwarmInfo>,
        /// Joins that fail (managers not reachable yet) before one succeeds.
        pub join_failures: Mutex<u32>,
        /// The role a successful join gives.
        pub joined_role: Option<SwarmRole>,
        pub services: Mutex<Vec<ServiceSummary>>,
        pub networks: Mutex<Vec<NetworkSummary>>,
        pub images: Mutex<BTreeMap<String, String>>,
        pub calls: Mutex<Vec<String>>,
        pub bodies: Mutex<Vec<Value>>,
    }

    impl FakeSwarm {
        pub fn in_state(state: &str, manager: bool) -> FakeSwarm {
            let fake = FakeSwarm::default();
            *fake.info.lock().expect("lock") = SwarmInfo {
                local_node_state: state.into(),
                node_id: if state == "inactive" {
                    String::new()
                } else {
                    "node-a".into()
                },
                control_available: manager,
                managers: u64::from(manager),
                nodes: if manager { 2 } else { 0 },
                ..Default::default()
            };
            fake
        }
        fn log(&self, call: String) {
            self.calls.lock().expect("lock").push(call);
        }
        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().expect("lock").clone()
        }
        fn set_active(&self, manager: bool) {
            let mut info = self.info.lock().expect("lock");
            info.local_node_state = "active".into();
            info.node_id = "node-a".into();
            info.control_available = manager;
            info.managers = 1;
            info.nodes = 1;
        }
    }

    fn unused<T>() -> docker::Result<T> {
        Err(docker::Error::Protocol {
            what: "fake".into(),
            detail: "not used by swarm code".into(),
        })
    }

    impl containers::Engine for FakeSwarm {
        fn list_containers(&self) -> docker::Result<Vec<ContainerSummary>> {
            unused()
        }
        fn inspect_container(&self, _: &str) -> docker::Result<Option<ContainerDetails>> {
            unused()
        }
        fn image_id(&self, reference: &str) -> docker::Result<Option<String>> {
            Ok(self.images.lock().expect("lock").get(reference).cloned())
        }
        fn load_image(&self, archive: &Path) -> docker::Result<Vec<String>> {
            self.log(format!("load {}", archive.display()));
            Ok(Vec::new())
        }
        fn pull_image(&self, _: &str) -> docker::Result<()> {
            unused()
        }
        fn create_container(&self, _: &str, _: &Value) -> docker::Result<String> {
            unused()
        }
        fn start_container(&self, _: &str) -> docker::Result<()> {
            unused()
        }
        fn stop_container(&self, _: &str, _: Duration) -> docker::Result<()> {
            unused()
        }
        fn remove_container(&self, _: &str) -> docker::Result<()> {
            unused()
        }
        fn prune_images(&self) -> docker::Result<u64> {
            unused()
        }
        fn list_managed_networks(&self) -> docker::Result<Vec<NetworkSummary>> {
            Ok(self.networks.lock().expect("lock").clone())
        }
        fn create_network(&self, name: &str, body: &Value) -> docker::Result<String> {
            self.log(format!("create network {name} {}", body["Driver"]));
            self.networks.lock().expect("lock").push(NetworkSummary {
                id: format!("net-{name}"),
                name: name.into(),
                labels: BTreeMap::new(),
            });
            Ok(format!("net-{name}"))
        }
        fn remove_network(&self, _: &str) -> docker::Result<()> {
            unused()
        }
        fn connect_network(&self, _: &str, _: &str, _: &[String]) -> docker::Result<()> {
            unused()
        }
    }

    impl SwarmEngine for FakeSwarm {
        fn swarm_info(&self) -> docker::Result<SwarmInfo> {
            self.log("info".into());
            Ok(self.info.lock().expect("lock").clone())
        }
        fn swarm_init(&self, body: &Value) -> docker::Result<String> {
            self.log("init".into());
            self.bodies.lock().expect("lock").push(body.clone());
            self.set_active(true);
            Ok("node-a".into())
        }
        fn swarm_join(&self, body: &Value) -> docker::Result<()> {
            self.log("join".into());
            self.bodies.lock().expect("lock").push(body.clone());
            let mut failures = self.join_failures.lock().expect("lock");
            if *failures > 0 {
                *failures -= 1;
                return Err(docker::Error::Api {
                    what: "joining the swarm".into(),
                    status: 500,
                    message: "could not connect to 10.0.0.1:2377".into(),
                });
            }
            self.set_active(self.joined_role == Some(SwarmRole::Manager));
            Ok(())
        }
        fn swarm_leave(&self) -> docker::Result<()> {
            self.log("leave".into());
            *self.info.lock().expect("lock") = SwarmInfo {
                local_node_state: "inactive".into(),
                ..Default::default()
            };
            Ok(())
        }
        fn list_services(&self) -> docker::Result<Vec<ServiceSummary>> {
            Ok(self.services.lock().expect("lock").clone())
        }
        fn create_service(&self, name: &str, body: &Value) -> docker::Result<String> {
            self.log(format!("create service {name}"));
            self.bodies.lock().expect("lock").push(body.clone());
            Ok(format!("svc-{name}"))
        }
        fn update_service(&self, id: &str, version: u64, body: &Value) -> docker::Result<()> {
            self.log(format!("update service {id} version {version}"));
            self.bodies.lock().expect("lock").push(body.clone());
            Ok(())
        }
        fn remove_service(&self, id: &str) -> docker::Result<()> {
            self.log(format!("remove service {id}"));
            Ok(())
        }
    }

    pub(crate) fn definition(tail: &str) -> Definition {
        Definition::parse(
            "test.toml",
            &format!("[image]\nname = \"node\"\nversion = \"1\"\n{tail}"),
        )
        .expect("definition parses")
    }

    const TOKEN: &str = "SWMTKN-1-abc-def";

    fn options(dir: &Path) -> Options {
        Options {
            marker: dir.join("var/lib/plinth/swarm-joined"),
            host_root: dir.to_path_buf(),
            sys_class_net: dir.join("sys/class/net"),
            containers: containers::Options {
                images_dir: dir.join("images"),
                host_root: dir.to_path_buf(),
                ..containers::Options::default()
            },
        }
    }

    /// Collects `PLINTH-STATUS` lines.
    #[derive(Default)]
    struct Lines(Mutex<Vec<String>>);

    impl StatusSink for Lines {
        fn status(&self, event: &str, fields: &[(&str, &str)]) {
            self.0
                .lock()
                .expect("lock")
                .push(os_config::status::format(event, fields));
        }
    }

    #[test]
    fn an_inactive_first_manager_starts_the_swarm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = options(dir.path());
        let def =
            definition("[swarm]\nrole = \"manager\"\ninit = true\nadvertise = \"10.0.0.5\"\n");
        let engine = FakeSwarm::in_state("inactive", false);
        let mut rounds = Rounds::new(&def, options.clone());
        let lines = Lines::default();
        let now = Instant::now();
        rounds.tick(&engine, now, &lines);
        assert_eq!(
            engine.calls(),
            ["info", "init", "info",],
            "no services declared: none listed"
        );
        let body = &engine.bodies.lock().expect("lock")[0];
        assert_eq!(
            *body,
            json!({ "ListenAddr": "0.0.0.0:2377", "AdvertiseAddr": "10.0.0.5", "ForceNewCluster": false })
        );
        let marker = std::fs::read_to_string(&options.marker).expect("marker written");
        assert_eq!(marker, "role=manager\ninit=true\njoin=\n");
        let lines = lines.0.lock().expect("lock").clone();
        assert_eq!(
            lines,
            ["PLINTH-STATUS swarm-ready role=manager node-id=node-a managers=1 nodes=1"]
        );
        assert_eq!(rounds.next_due(), Some(now + RECHECK));
    }

    #[test]
    fn a_manager_round_reconciles_services_and_reports_a_failed_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let def = definition(
            "[swarm]\nrole = \"manager\"\ninit = true\n[[service]]\nname = \"web\"\nimage = \"nginx:1\"\n",
        );
        let engine = FakeSwarm::in_state("active", true);
        engine.services.lock().expect("lock").push(ServiceSummary {
            id: "s1".into(),
            version: Default::default(),
            spec: docker::ServiceSpecSummary {
                name: "web".into(),
                labels: BTreeMap::new(),
            },
        });
        let mut rounds = Rounds::new(&def, options(dir.path()));
        let lines = Lines::default();
        let now = Instant::now();
        rounds.tick(&engine, now, &lines);
        let printed = lines.0.lock().expect("lock").clone();
        assert_eq!(printed.len(), 1, "{printed:?}");
        assert!(
            printed[0].starts_with("PLINTH-STATUS swarm-error reason=\"service web: "),
            "{printed:?}"
        );
        assert_eq!(rounds.next_due(), Some(now + FIRST_BACKOFF));
        engine.services.lock().expect("lock").clear();
        rounds.tick(&engine, now + FIRST_BACKOFF, &lines);
        assert_eq!(
            engine.calls().last().map(String::as_str),
            Some("create service web")
        );
        let printed = lines.0.lock().expect("lock").clone();
        assert_eq!(
            printed[1],
            "PLINTH-STATUS swarm-ready role=manager node-id=node-a managers=1 nodes=2"
        );
    }

    #[test]
    fn a_node_already_in_its_role_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = options(dir.path());
        for (tail, manager) in [
            ("[swarm]\nrole = \"manager\"\ninit = true\n", true),
            (
                &*format!(
                    "[swarm]\nrole = \"worker\"\njoin = [\"10.0.0.1:2377\"]\ntoken = \"{TOKEN}\"\n"
                ),
                false,
            ),
        ] {
            let def = definition(tail);
            let engine = FakeSwarm::in_state("active", manager);
            let got = reconcile_membership(&engine, def.swarm.as_ref(), &options).expect("ready");
            assert_eq!(engine.calls(), ["info"], "{tail}");
            let Membership::Ready(ready) = got else {
                panic!("{tail}: {got:?}")
            };
            assert_eq!(ready.role, def.swarm.as_ref().expect("swarm").role);
            assert!(
                !options.marker.exists(),
                "a node Plinth did not join gets no marker"
            );
        }
    }

    #[test]
    fn a_worker_join_is_retried_with_backoff_until_the_manager_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = options(dir.path());
        let token_file = dir.path().join("var/lib/swarm/token");
        std::fs::create_dir_all(token_file.parent().expect("parent")).expect("mkdir");
        std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token");
        let def = definition(
            "[swarm]\nrole = \"worker\"\njoin = [\"10.0.0.1:2377\"]\ntoken-file = \"/var/lib/swarm/token\"\n",
        );
        let engine = FakeSwarm::in_state("inactive", false);
        *engine.join_failures.lock().expect("lock") = 2;
        let mut rounds = Rounds::new(&def, options.clone());
        let lines = Lines::default();
        let start = Instant::now();
        rounds.tick(&engine, start, &lines);
        assert_eq!(rounds.next_due(), Some(start + FIRST_BACKOFF));
        rounds.tick(&engine, start + Duration::from_secs(1), &lines);
        assert_eq!(
            engine.calls().iter().filter(|c| *c == "join").count(),
            1,
            "not due yet"
        );
        rounds.tick(&engine, start + FIRST_BACKOFF, &lines);
        assert_eq!(
            rounds.next_due(),
            Some(start + FIRST_BACKOFF + FIRST_BACKOFF * 2),
            "the pause doubles"
        );
        rounds.tick(&engine, start + FIRST_BACKOFF * 3, &lines);
        assert_eq!(engine.calls().iter().filter(|c| *c == "join").count(), 3);
        let lines = lines.0.lock().expect("lock").clone();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines[0].starts_with("PLINTH-STATUS swarm-error reason="),
            "{lines:?}"
        );
        assert!(lines[0].contains("could not connect"), "{lines:?}");
        assert_eq!(
            lines[2],
            "PLINTH-STATUS swarm-ready role=worker node-id=node-a managers=1 nodes=1"
        );
        let body = engine.bodies.lock().expect("lock")[2].clone();
        assert_eq!(
            body,
            json!({ "ListenAddr": "0.0.0.0:2377", "AdvertiseAddr": "", "RemoteAddrs": ["10.0.0.1:2377"], "JoinToken": TOKEN })
        );
        assert!(options.marker.exists());
    }

    #[test]
    fn leaving_changing_and_refusing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = options(dir.path());
        let worker = definition(&format!(
            "[swarm]\nrole = \"worker\"\njoin = [\"10.0.0.1\"]\ntoken = \"{TOKEN}\"\n"
        ));
        // Nothing declared, no marker: the engine is not asked anything.
        let engine = FakeSwarm::in_state("active", false);
        assert_eq!(
            reconcile_membership(&engine, None, &options),
            Ok(Membership::Undeclared)
        );
        assert!(engine.calls().is_empty());
        // Nothing declared, joined by Plinth: leave, and forget the marker.
        write_marker(&options.marker, worker.swarm.as_ref().expect("swarm")).expect("marker");
        assert_eq!(
            reconcile_membership(&engine, None, &options),
            Ok(Membership::Left)
        );
        assert_eq!(engine.calls(), ["info", "leave"]);
        assert!(!options.marker.exists());
        // Declared a worker, in the swarm as a manager: leave, then join as declared.
        let engine = FakeSwarm::in_state("active", true);
        let got = reconcile_membership(&engine, worker.swarm.as_ref(), &options);
        assert!(matches!(got, Ok(Membership::Ready(_))), "{got:?}");
        assert_eq!(engine.calls(), ["info", "leave", "join", "info"]);
        // Joined by Plinth with another declaration: leave and join again.
        let other = definition(&format!(
            "[swarm]\nrole = \"worker\"\njoin = [\"10.9.9.9\"]\ntoken = \"{TOKEN}\"\n"
        ));
        let engine = FakeSwarm::in_state("active", false);
        reconcile_membership(&engine, other.swarm.as_ref(), &options).expect("rejoined");
        assert_eq!(engine.calls(), ["info", "leave", "join", "info"]);
        assert!(std::fs::read_to_string(&options.marker)
            .expect("marker")
            .contains("join=10.9.9.9"));
        // Joined by Plinth with this declaration but the token gave the other role: reported.
        let manager = definition(&format!(
            "[swarm]\nrole = \"manager\"\njoin = [\"10.0.0.1\"]\ntoken = \"{TOKEN}\"\n"
        ));
        let engine = FakeSwarm::in_state("inactive", false);
        let err = reconcile_membership(&engine, manager.swarm.as_ref(), &options)
            .expect_err("joined as a worker");
        assert!(err.contains("worker although role = \"manager\""), "{err}");
        let err = reconcile_membership(&engine, manager.swarm.as_ref(), &options)
            .expect_err("still a worker");
        assert!(err.contains("join token is probably"), "{err}");
        assert_eq!(engine.calls().iter().filter(|c| *c == "leave").count(), 0);
        // A locked swarm or a pending join is waited for, not changed.
        for state in ["locked", "pending"] {
            let engine = FakeSwarm::in_state(state, false);
            std::fs::remove_file(&options.marker).ok();
            let err =
                reconcile_membership(&engine, worker.swarm.as_ref(), &options).expect_err(state);
            assert!(
                err.contains(if state == "locked" {
                    "unlock"
                } else {
                    "under way"
                }),
                "{err}"
            );
            assert_eq!(engine.calls(), ["info"], "{state}");
        }
        // An interface to advertise that does not exist is a clear error.
        let eth = definition(&format!(
            "[swarm]\nrole = \"worker\"\njoin = [\"10.0.0.1\"]\ntoken = \"{TOKEN}\"\nadvertise = \"eth9\"\n"
        ));
        let engine = FakeSwarm::in_state("inactive", false);
        let err = reconcile_membership(&engine, eth.swarm.as_ref(), &options).expect_err("no eth9");
        assert!(
            err.contains("advertise = \"eth9\"") && err.contains("no network interface"),
            "{err}"
        );
    }
}
