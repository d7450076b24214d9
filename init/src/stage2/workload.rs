//! The Docker workload of stage 2: dockerd and the update agent under supervision, the network,
//! the declared containers made to exist after each engine start, their health watched, and the
//! health gate the bless waits on.

#![warn(missing_docs)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use os_config::definition::{Container, Engine};
use os_config::Definition;

use crate::stage2::containers::{self, ContainerHealth, Health, StatusSink};
use crate::stage2::docker;
use crate::stage2::net;
use crate::stage2::stability::{self, GateClock as _, GateResult, Judgement, RealClock, Tracker};
use crate::stage2::supervise::{command, Program, Service, DOCKER_SOCKET};
use crate::stage2::swarm;
use crate::stage2::{uptime_ms, Workload};

/// The image definition baked into the root by the builder.
pub const DEFINITION_PATH: &str = "/usr/lib/plinth/image.toml";
/// The update agent, started as `plinth-update daemon` when the definition has `[update]`.
pub const UPDATE_AGENT: &str = "/usr/bin/plinth-update";
/// Where dockerd's configuration goes when `[engine] settings` list `hosts` without the socket.
pub const AMENDED_CONFIG: &str = "/run/plinth/dockerd.json";
/// How long the first wait for the engine lasts before it is reported as late.
pub const ENGINE_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the engine and the containers are checked once up.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(10);
/// How often the health gate polls.
pub const GATE_POLL: Duration = Duration::from_secs(2);

/// The `hosts` entries that name the socket plinth-init talks to (`/var/run` links to `/run`).
const SOCKET_HOSTS: [&str; 2] = ["unix:///run/docker.sock", "unix:///var/run/docker.sock"];

/// How dockerd is told where to listen. dockerd refuses a `--host` flag when its configuration
/// file has `hosts`, so the flag is given only when the settings have none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// No `hosts` in the settings: `--host=unix:///run/docker.sock`.
    Flag,
    /// `hosts` lists the socket: `/etc/docker/daemon.json` alone.
    ConfigFile,
    /// `hosts` lacks the socket: this JSON (the settings with the socket added to `hosts`) is
    /// written to [`AMENDED_CONFIG`] and passed with `--config-file`.
    Amended(String),
}

impl Listen {
    /// dockerd's arguments for this choice.
    pub fn args(&self) -> Vec<String> {
        match self {
            Listen::Flag => vec![format!("--host=unix://{DOCKER_SOCKET}")],
            Listen::ConfigFile => Vec::new(),
            Listen::Amended(_) => vec![format!("--config-file={AMENDED_CONFIG}")],
        }
    }
}

/// Chooses how dockerd listens from `[engine] settings`; `hosts`, if set, must be an array of
/// strings. With `tls` (the folder of `ca.pem`, `cert.pem` and `key.pem`), dockerd also listens
/// on `[engine] tls-listen` over TCP and admits only clients whose certificate that CA signed.
pub fn dockerd_listen(engine: &Engine, tls: Option<&Path>) -> Result<Listen> {
    let hosts = settings_hosts(engine)?;
    let has_socket = |hosts: &[String]| hosts.iter().any(|h| SOCKET_HOSTS.contains(&h.as_str()));
    let mut settings =
        serde_json::to_value(&engine.settings).context("converting [engine] settings to JSON")?;
    match (tls, hosts) {
        (None, None) => return Ok(Listen::Flag),
        (None, Some(hosts)) if has_socket(&hosts) => return Ok(Listen::ConfigFile),
        (None, Some(mut hosts)) => {
            hosts.insert(0, format!("unix://{DOCKER_SOCKET}"));
            settings["hosts"] = hosts.into();
        }
        (Some(dir), hosts) => {
            let mut hosts = hosts.unwrap_or_default();
            if !has_socket(&hosts) {
                hosts.insert(0, format!("unix://{DOCKER_SOCKET}"));
            }
            let tcp = format!("tcp://{}", engine.tls_listen);
            if !hosts.contains(&tcp) {
                hosts.push(tcp);
            }
            settings["hosts"] = hosts.into();
            settings["tlsverify"] = true.into();
            for (key, file) in [
                ("tlscacert", "ca.pem"),
                ("tlscert", "cert.pem"),
                ("tlskey", "key.pem"),
            ] {
                settings[key] = dir.join(file).display().to_string().into();
            }
        }
    }
    let json = serde_json::to_string_pretty(&settings).context("writing dockerd's settings")?;
    Ok(Listen::Amended(json))
}

/// `hosts` from `[engine] settings`, which must be an array of strings if set.
fn settings_hosts(engine: &Engine) -> Result<Option<Vec<String>>> {
    let Some(hosts) = engine.settings.get("hosts") else {
        return Ok(None);
    };
    hosts
        .as_array()
        .and_then(|items| items.iter().map(|h| h.as_str().map(str::to_owned)).collect())
        .map(Some)
        .with_context(|| {
            format!("[engine] settings: `hosts` must be an array of strings such as [\"unix://{DOCKER_SOCKET}\"], not {hosts}")
        })
}

/// The flag that tells dockerd plain TCP is intended: `--tls=false`, when the definition accepts
/// plain TCP (`[engine] insecure-tcp = true`), lists a `tcp://` host, sets up no TLS of its own
/// and leaves dockerd's `tls` and `tlsverify` settings unset (dockerd refuses a flag that its
/// configuration file also sets). Without it dockerd takes a plain TCP listener as possibly
/// unintended and sleeps 15 s at every start to show its warning; `insecure-tcp` is that intent,
/// already stated in the definition.
pub fn plain_tcp_flag(engine: &Engine, tls: Option<&Path>) -> Result<Option<&'static str>> {
    let tcp = settings_hosts(engine)?
        .is_some_and(|hosts| hosts.iter().any(|h| os_config::validate::is_tcp_host(h)));
    let tls_set = ["tls", "tlsverify"]
        .iter()
        .any(|key| engine.settings.contains_key(*key));
    Ok((engine.insecure_tcp && tcp && tls.is_none() && !tls_set).then_some("--tls=false"))
}

/// dockerd as the supervisor runs it: writes the amended configuration when needed and counts
/// its starts, so the workload notices a restart even when the engine came back between checks.
#[derive(Debug)]
pub struct EngineService {
    /// The daemon and its arguments.
    pub dockerd: Program,
    /// How it listens.
    pub listen: Listen,
    /// Where an amended configuration is written.
    pub amended_config: PathBuf,
    /// Incremented at each successful start.
    pub starts: Arc<AtomicU64>,
}

impl Service for EngineService {
    fn name(&self) -> &str {
        self.dockerd.name()
    }

    fn spawn(&self) -> Result<Child> {
        if let Listen::Amended(json) = &self.listen {
            let path = &self.amended_config;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        }
        let child = self.dockerd.spawn()?;
        self.starts.fetch_add(1, Ordering::SeqCst);
        Ok(child)
    }

    fn exited(&self) {
        self.dockerd.exited();
    }
}

/// The update agent, `plinth-update daemon`; its output goes to the console.
#[derive(Debug, Clone)]
pub struct UpdateAgent {
    /// The executable.
    pub program: PathBuf,
}

impl Service for UpdateAgent {
    fn name(&self) -> &str {
        "plinth-update"
    }

    fn spawn(&self) -> Result<Child> {
        command(&self.program)
            .arg("daemon")
            .spawn()
            .with_context(|| format!("starting {} daemon", self.program.display()))
    }
}

/// Prints reconciliation events as `PLINTH-STATUS` lines on the console and in the kernel log.
struct ConsoleStatus;

impl StatusSink for ConsoleStatus {
    fn status(&self, event: &str, fields: &[(&str, &str)]) {
        crate::status::status(event, fields);
    }
}

/// Something to run once per boot, in its own thread, as soon as stage 2 starts the workload
/// (the bless gate), with a client for the engine that may not answer yet.
pub type BootHook = Arc<dyn Fn(&BootContext) + Send + Sync>;

/// What the start hook works with.
#[derive(Debug, Clone)]
pub struct BootContext {
    /// A client for the engine (which may not answer yet).
    pub client: docker::Client,
    /// The image definition.
    pub definition: Definition,
    /// The containers followed over the boot.
    pub observer: Arc<Observer>,
    settle: Arc<Settle>,
}

impl BootContext {
    /// Whether the first reconciliation of this boot is done (`boot-complete`): before it, a
    /// container may run briefly on its way to being judged failed.
    pub fn reconciled(&self) -> bool {
        self.settle.get().reconciled_once
    }

    /// Records that the boot is good (blessed, or not on trial): updates may act once the
    /// containers are reconciled.
    pub fn boot_is_good(&self) {
        self.settle.update(|s| s.boot_good = true);
    }
}

/// Where plinth-init says that the boot has settled, for the update agent: the boot is blessed
/// or was already good, the declared containers were reconciled once, and no reconciliation is
/// under way. The agent applies nothing and reboots for nothing while it is absent.
pub const SETTLED_MARKER: &str = "/run/plinth/boot-settled";

/// What settling depends on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SettleState {
    /// Blessed, or good from the start.
    pub boot_good: bool,
    /// The first reconciliation of this boot is done.
    pub reconciled_once: bool,
    /// A reconciliation is under way.
    pub reconciling: bool,
    /// The engine has not answered within [`ENGINE_TIMEOUT`] of its first start on this boot:
    /// an update, which may be the cure, does not wait for it any longer.
    pub engine_late: bool,
}

impl SettleState {
    /// Whether the update agent may act: on a good boot once the containers were reconciled, or
    /// once the engine is late and there is nothing to reconcile with.
    pub fn settled(&self) -> bool {
        self.boot_good && (self.reconciled_once || self.engine_late) && !self.reconciling
    }
}

/// The settle state, mirrored by a marker file that exists exactly while it is settled.
#[derive(Debug)]
pub struct Settle {
    marker: PathBuf,
    state: std::sync::Mutex<SettleState>,
}

impl Settle {
    /// A state with nothing settled; removes a marker left from an earlier stage 2.
    pub fn new(marker: PathBuf) -> Settle {
        let settle = Settle {
            marker,
            state: std::sync::Mutex::new(SettleState::default()),
        };
        settle.update(|_| {});
        settle
    }

    /// The current state.
    pub fn get(&self) -> SettleState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the state and makes the marker follow it, under one lock.
    pub fn update(&self, change: impl FnOnce(&mut SettleState)) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut state);
        let result = if state.settled() {
            self.marker
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&self.marker, b"settled\n"))
        } else {
            match std::fs::remove_file(&self.marker) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        };
        if let Err(e) = result {
            crate::info!("updating {} failed: {e}", self.marker.display());
        }
    }
}

/// Docker Engine and the containers an image definition declares.
pub struct DockerWorkload {
    definition: Definition,
    listen: Listen,
    /// dockerd's arguments: [`Listen::args`] and [`plain_tcp_flag`].
    dockerd_args: Vec<String>,
    /// The engine socket plinth-init talks to.
    pub socket: PathBuf,
    /// The update agent's executable (started only if it exists and `[update]` is set).
    pub update_agent: PathBuf,
    /// Stage 1's boot record: a boot without one (a live boot) has no slot to update.
    pub boot_record: PathBuf,
    /// Where reconciliation finds image archives and mount sources.
    pub options: containers::Options,
    /// Where the swarm rounds keep their marker and find token files and interfaces (their
    /// image archives are [`DockerWorkload::options`]').
    pub swarm: swarm::Options,
    engine_starts: Arc<AtomicU64>,
    stopping: AtomicBool,
    on_start: Option<BootHook>,
    settle: Arc<Settle>,
    observer: Arc<Observer>,
    watch_interval: Duration,
    /// The platform's name, for its time source (`ec2`, `gce`, …).
    platform: &'static str,
}

impl std::fmt::Debug for DockerWorkload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerWorkload")
            .field("image", &self.definition.image.name.as_str())
            .field("listen", &self.listen)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl DockerWorkload {
    /// Reads and validates the image definition at `path` (normally [`DEFINITION_PATH`]).
    pub fn read_definition(path: &Path) -> Result<Definition> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the image definition {}", path.display()))?;
        Definition::parse(&path.display().to_string(), &text)
            .with_context(|| format!("parsing the image definition {}", path.display()))
    }

    /// [`DockerWorkload::new`] of the image definition at `path`, without instance data.
    pub fn load(path: &Path) -> Result<DockerWorkload> {
        DockerWorkload::new(DockerWorkload::read_definition(path)?)
    }

    /// The workload for a parsed definition; fails if its engine settings cannot be used. The
    /// engine's TLS files, if `[engine] tls` is set, are the image's.
    pub fn new(definition: Definition) -> Result<DockerWorkload> {
        let tls = definition
            .engine
            .tls
            .as_ref()
            .map(|_| PathBuf::from(os_config::definition::ENGINE_TLS_IN_IMAGE));
        DockerWorkload::build(definition, tls.as_deref(), "")
    }

    /// The workload of a provisioned instance: its definition (user data applied), its engine
    /// TLS files and its platform's time source.
    pub fn for_instance(instance: crate::stage2::instance::Instance) -> Result<DockerWorkload> {
        DockerWorkload::build(
            instance.definition,
            instance.engine_tls.as_deref(),
            instance.platform.name(),
        )
    }

    fn build(
        definition: Definition,
        tls: Option<&Path>,
        platform: &'static str,
    ) -> Result<DockerWorkload> {
        let listen = dockerd_listen(&definition.engine, tls)?;
        let mut dockerd_args = listen.args();
        dockerd_args.extend(plain_tcp_flag(&definition.engine, tls)?.map(str::to_owned));
        Ok(DockerWorkload {
            platform,
            definition,
            listen,
            dockerd_args,
            socket: PathBuf::from(DOCKER_SOCKET),
            update_agent: PathBuf::from(UPDATE_AGENT),
            boot_record: Path::new("/run").join(os_config::boot::BOOT_RECORD_IN_RUN),
            options: containers::Options::default(),
            swarm: swarm::Options::default(),
            engine_starts: Arc::new(AtomicU64::new(0)),
            stopping: AtomicBool::new(false),
            on_start: None,
            settle: Arc::new(Settle::new(PathBuf::from(SETTLED_MARKER))),
            observer: Arc::new(Observer::default()),
            watch_interval: WATCH_INTERVAL,
        })
    }

    /// Runs `hook` once per boot, in its own thread, when stage 2 starts the workload: before the
    /// network and the engine, so that the bless gate's timeout also covers an engine that never
    /// comes up.
    pub fn on_start(mut self, hook: BootHook) -> DockerWorkload {
        self.on_start = Some(hook);
        self
    }

    /// The image definition.
    pub fn definition(&self) -> &Definition {
        &self.definition
    }

    /// How dockerd listens.
    pub fn listen(&self) -> &Listen {
        &self.listen
    }

    /// A client for the engine socket.
    pub fn client(&self) -> docker::Client {
        docker::Client::new(&self.socket)
    }

    /// How many times the supervisor has started dockerd.
    pub fn engine_starts(&self) -> u64 {
        self.engine_starts.load(Ordering::SeqCst)
    }

    /// dockerd as the supervisor runs it, with the arguments [`DockerWorkload::listen`] calls for
    /// and the [`plain_tcp_flag`].
    pub fn engine_service(&self) -> EngineService {
        EngineService {
            dockerd: Program {
                args: self.dockerd_args.clone(),
                ..Program::dockerd()
            },
            listen: self.listen.clone(),
            amended_config: PathBuf::from(AMENDED_CONFIG),
            starts: self.engine_starts.clone(),
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Waits until the engine answers, logging progress; false if shutdown began meanwhile.
    fn wait_engine(&self, client: &docker::Client) -> bool {
        let start = Instant::now();
        let mut reported_late = false;
        loop {
            if self.stopping() {
                return false;
            }
            match client.wait_ready(Duration::from_secs(15)) {
                Ok(()) => {
                    crate::info!("engine answers after {} s", start.elapsed().as_secs());
                    return true;
                }
                Err(e) if start.elapsed() >= ENGINE_TIMEOUT && !reported_late => {
                    reported_late = true;
                    let first = !self.settle.get().reconciled_once;
                    crate::info!(
                        "the engine has not answered within {} s ({e}); still waiting, see /var/log/dockerd.log{}",
                        ENGINE_TIMEOUT.as_secs(),
                        if first { "; updates no longer wait for it" } else { "" }
                    );
                    if first {
                        self.settle.update(|s| s.engine_late = true);
                    }
                }
                Err(e) => crate::info!(
                    "waiting for the engine ({} s so far): {e}",
                    start.elapsed().as_secs()
                ),
            }
        }
    }

    /// Makes the declared containers exist and run; `container-running`/`container-failed` lines.
    fn reconcile(&self, client: &docker::Client) {
        match containers::reconcile(
            client,
            &self.definition.containers,
            &self.definition.container_networks,
            &self.options,
            &ConsoleStatus,
        ) {
            Ok(report) => {
                crate::info!("containers: {report}");
                for warning in &report.warnings {
                    crate::info!("containers: {warning}");
                }
            }
            Err(e) => crate::info!("reconciling containers failed: {e}"),
        }
    }

    /// Checks the engine and the containers, every [`GATE_POLL`] while a container is on its way
    /// up and every [`WATCH_INTERVAL`] once all are up or stopped; reports `container-running`,
    /// `container-restarting` and `container-stopped` (see [`stability`]); runs the swarm rounds
    /// when they are due. Returns when the engine stopped answering or was restarted since
    /// `generation`, or at shutdown.
    fn watch(&self, client: &docker::Client, generation: u64, swarm: &mut swarm::Rounds) {
        let mut last: Option<Health> = None;
        loop {
            if self.stopping() {
                return;
            }
            if self.engine_starts() != generation {
                crate::info!("dockerd was restarted: waiting for the engine again");
                return;
            }
            if let Err(e) = client.ping() {
                crate::info!("the engine stopped answering ({e}): waiting for it again");
                return;
            }
            match self.observer.look(client, &self.definition.containers) {
                Ok(health) => {
                    if last.as_ref() != Some(&health) {
                        log_health(&health);
                    }
                    last = Some(health);
                }
                Err(e) => crate::info!("checking container health failed: {e}"),
            }
            swarm.tick(client, Instant::now(), &ConsoleStatus);
            let pause = if self.observer.settled() || self.definition.containers.is_empty() {
                self.watch_interval
            } else {
                GATE_POLL.min(self.watch_interval)
            };
            std::thread::sleep(pause);
        }
    }
}

/// Logs every container that is not healthy, or that all are.
fn log_health(health: &Health) {
    if health.is_healthy() {
        crate::info!("all {} containers healthy", health.containers.len());
        return;
    }
    for container in &health.containers {
        if container.health != ContainerHealth::Healthy {
            crate::info!("container {}: {}", container.name, container.health);
        }
    }
}

/// Configures the network from `[network]` and keeps a DHCP lease renewed in a thread, once per
/// boot (provisioning may need it before the workload starts); returns the NTP servers DHCP
/// named (option 42).
pub fn start_network(network: &os_config::definition::Network) -> Vec<std::net::Ipv4Addr> {
    static STARTED: std::sync::OnceLock<Vec<std::net::Ipv4Addr>> = std::sync::OnceLock::new();
    STARTED.get_or_init(|| configure_network(network)).clone()
}

fn configure_network(network: &os_config::definition::Network) -> Vec<std::net::Ipv4Addr> {
    let paths = net::Paths::default();
    let configured = match net::configure(network, &paths) {
        Ok(configured) => configured,
        Err(e) => {
            crate::info!("network configuration failed: {e:#}");
            return Vec::new();
        }
    };
    crate::info!("network {configured}");
    let address = format!("{}/{}", configured.address, configured.prefix);
    let gateway = configured.gateway.map_or("-".to_owned(), |g| g.to_string());
    crate::status::status(
        "network",
        &[
            ("interface", &configured.interface.name),
            ("address", &address),
            ("gateway", &gateway),
            (
                "source",
                match configured.source {
                    net::Source::Static => "static",
                    net::Source::Dhcp(_) => "dhcp",
                },
            ),
        ],
    );
    let ntp = configured.ntp_servers();
    if configured.renewal_due().is_none() {
        return ntp;
    }
    let renewer = std::thread::Builder::new()
        .name("dhcp-renew".into())
        .spawn(move || renew_forever(configured, &paths));
    if let Err(e) = renewer {
        crate::info!("starting the DHCP renewal thread failed: {e}");
    }
    ntp
}

/// Keeps the clock in step, in its own thread, from `[time] servers`, the NTP servers DHCP named
/// and the platform's time source, in that order.
fn start_clock(configured: &[String], dhcp: &[std::net::Ipv4Addr], platform: &str) {
    let (sources, errors) = crate::clock::sources(configured, dhcp, platform);
    for error in errors {
        crate::info!("[time] servers: {error}");
    }
    let started = std::thread::Builder::new()
        .name("clock".into())
        .spawn(move || {
            crate::clock::keep_time(
                sources,
                crate::clock::KernelClock::default(),
                PathBuf::from(crate::clock::CLOCK_MARKER),
            )
        });
    if let Err(e) = started {
        crate::info!("starting the clock thread failed: {e}");
    }
}

/// Renews the DHCP lease whenever it is due, forever; failures are logged and retried (the lease
/// schedules its own retry).
fn renew_forever(mut configured: net::Configured, paths: &net::Paths) {
    while let Some(due) = configured.renewal_due() {
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        match configured.renew(paths) {
            Ok(()) => crate::info!("DHCP lease renewed: {configured}"),
            Err(e) => crate::info!("{e:#}"),
        }
    }
}

impl Workload for DockerWorkload {
    fn modules(&self) -> Vec<String> {
        os_config::modules::declared(&self.definition)
    }

    fn services(&self) -> Vec<Box<dyn Service>> {
        let mut services: Vec<Box<dyn Service>> = vec![Box::new(self.engine_service())];
        let booted_from_slot = self.boot_record.exists();
        if self.definition.update.is_some() && !booted_from_slot {
            crate::info!("a live boot has no slot to update: no update agent");
        } else if self.definition.update.is_some() {
            let executable = std::fs::metadata(&self.update_agent)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
            if executable {
                services.push(Box::new(UpdateAgent {
                    program: self.update_agent.clone(),
                }));
            } else {
                crate::info!(
                    "[update] is set but {} is missing: no update agent",
                    self.update_agent.display()
                );
            }
        }
        services
    }

    fn after_start(&self) -> Result<()> {
        self.start_hook();
        let ntp = start_network(&self.definition.network);
        start_clock(&self.definition.time.servers, &ntp, self.platform);
        self.engine_loop();
        Ok(())
    }

    fn stop_containers(&self, timeout: Duration) -> Result<()> {
        self.stopping.store(true, Ordering::SeqCst);
        stop_containers(&self.socket, timeout)
    }
}

impl DockerWorkload {
    /// Runs the start hook (the bless gate) in its own thread: it may wait a long time, and it
    /// must see an engine that never answers as well as one that does.
    fn start_hook(&self) {
        let Some(hook) = self.on_start.clone() else {
            return;
        };
        let context = BootContext {
            client: self.client(),
            definition: self.definition.clone(),
            observer: Arc::clone(&self.observer),
            settle: Arc::clone(&self.settle),
        };
        let started = std::thread::Builder::new()
            .name("start-hook".into())
            .spawn(move || hook(&context));
        if let Err(e) = started {
            crate::info!("starting the bless gate failed: {e}");
        }
    }

    /// After each engine start: wait for the engine, `engine-ready`, reconcile, (the first time)
    /// `boot-complete`, the swarm membership and services, then watch until the engine goes
    /// away. Returns at shutdown.
    fn engine_loop(&self) {
        let client = self.client();
        let mut booted = false;
        let mut swarm = swarm::Rounds::new(
            &self.definition,
            swarm::Options {
                containers: self.options.clone(),
                ..self.swarm.clone()
            },
        );
        loop {
            swarm.now_due();
            let generation = self.engine_starts();
            if !self.wait_engine(&client) {
                return;
            }
            crate::status::status("engine-ready", &[("uptime-ms", &uptime_ms())]);
            self.settle.update(|s| s.reconciling = true);
            self.reconcile(&client);
            let first = !booted && !self.stopping();
            if first {
                // Before the boot counts as settled: the update agent acts only after this line.
                booted = true;
                crate::status::status("boot-complete", &[("uptime-ms", &uptime_ms())]);
            }
            self.settle.update(|s| {
                s.reconciling = false;
                s.reconciled_once = true;
            });
            if self.stopping() {
                return;
            }
            // The busy part (image archives, the engine's answers) is over: give its memory back.
            crate::memory::trim();
            if first {
                if let Some(usage) = crate::memory::Usage::current() {
                    crate::info!(
                        "memory: {} KiB resident ({} KiB private, {} KiB of mapped files)",
                        usage.rss_kib,
                        usage.anon_kib,
                        usage.file_kib
                    );
                }
            }
            // After boot-complete: a join may wait for managers that boot later, and its
            // failures are retried from the watch loop.
            swarm.tick(&client, Instant::now(), &ConsoleStatus);
            self.watch(&client, generation, &mut swarm);
        }
    }
}

/// Stops the managed containers through the engine at `socket` within about `timeout`; fails
/// within 2 s if the engine does not answer.
pub fn stop_containers(socket: &Path, timeout: Duration) -> Result<()> {
    let call = Duration::from_secs(2);
    let client = docker::Client::new(socket).with_timeouts(call, call);
    client
        .ping()
        .context("asking the engine to stop the containers")?;
    // Each stop call may take the grace time plus `call`: keep the total under `timeout`.
    let grace = timeout.saturating_sub(call + Duration::from_secs(1));
    let report = containers::stop_all(&client, grace).context("stopping the containers")?;
    if !report.stopped.is_empty() {
        crate::info!("stopped containers: {}", report.stopped.join(", "));
    }
    if let Some((name, reason)) = report.failed.first() {
        bail!(
            "{} containers could not be stopped; {name}: {reason}",
            report.failed.len()
        );
    }
    Ok(())
}

/// One look at the declared containers through an engine that must answer; `Err` says why
/// there was nothing to look at.
pub fn look(client: &docker::Client, decls: &[Container]) -> std::result::Result<Health, String> {
    client.ping().map_err(|e| e.to_string())?;
    containers::health(client, decls).map_err(|e| e.to_string())
}

/// The declared containers followed over the whole boot: one [`Tracker`], fed by the watcher
/// and by the bless gate, so that each change is reported once on the console and the gate
/// judges from the freshest look. It is kept across engine restarts: a container the restarted
/// engine starts again has a new run, which a trial boot must not miss.
#[derive(Debug)]
pub struct Observer {
    clock: RealClock,
    tracker: std::sync::Mutex<Tracker>,
}

impl Default for Observer {
    fn default() -> Observer {
        Observer {
            clock: RealClock::default(),
            tracker: std::sync::Mutex::new(Tracker::new(stability::SETTLE)),
        }
    }
}

impl Observer {
    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Looks at the declared containers through `client` and prints what changed
    /// (`container-running`, `container-restarting`, `container-stopped`); `Err` says why there
    /// was nothing to look at.
    pub fn look(
        &self,
        client: &docker::Client,
        decls: &[Container],
    ) -> std::result::Result<Health, String> {
        let health = look(client, decls)?;
        let mut tracker = self.tracker();
        for event in tracker.observe(self.clock.now(), &health) {
            let (name, fields) = event.status();
            let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            crate::status::status(name, &fields);
        }
        Ok(health)
    }

    /// The gate's judgement of everything seen so far.
    pub fn judge(&self) -> Judgement {
        self.tracker().judge()
    }

    /// Whether every container has been reported running or stopped.
    pub fn settled(&self) -> bool {
        self.tracker().settled()
    }
}

/// The bless gate: healthy once the engine has answered, the first reconciliation is done
/// (`reconciled`), and every declared container has kept one run up (and healthy where declared)
/// for `bless_after`; unhealthy at once when a container restarts, or when that did not happen
/// within `timeout`.
pub fn wait_healthy(
    client: &docker::Client,
    decls: &[Container],
    reconciled: &dyn Fn() -> bool,
    observer: &Observer,
    bless_after: Duration,
    timeout: Duration,
) -> Result<GateResult> {
    stability::gate(
        |_now| {
            if !reconciled() {
                return match client.ping() {
                    Ok(()) => Judgement::NotYet(
                        "the declared containers are not reconciled yet".to_owned(),
                    ),
                    Err(e) => Judgement::NotYet(e.to_string()),
                };
            }
            match observer.look(client, decls) {
                Ok(_) => observer.judge(),
                Err(reason) => Judgement::NotYet(reason),
            }
        },
        &observer.clock,
        bless_after,
        timeout,
        GATE_POLL,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_good_boot_settles_after_reconciling_or_when_the_engine_is_late() {
        use super::SettleState;
        let good = SettleState {
            boot_good: true,
            ..SettleState::default()
        };
        assert!(!good.settled(), "nothing reconciled yet");
        let late = SettleState {
            engine_late: true,
            ..good
        };
        assert!(late.settled(), "a late engine does not hold updates back");
        assert!(
            !SettleState {
                reconciling: true,
                ..late
            }
            .settled(),
            "not while a reconciliation runs"
        );
        assert!(
            !SettleState {
                boot_good: false,
                ..late
            }
            .settled(),
            "a boot on trial waits for its bless"
        );
        assert!(SettleState {
            reconciled_once: true,
            ..good
        }
        .settled());
    }

    use super::*;

    const BASE: &str =
        "[image]\nname = \"demo\"\nversion = \"1.0.0\"\n\n[debian]\nsuite = \"bookworm\"\n";

    fn definition(extra: &str) -> Definition {
        Definition::parse("test.toml", &format!("{BASE}{extra}")).expect("valid definition")
    }

    #[test]
    fn dockerd_gets_the_host_flag_only_without_hosts_in_the_settings() {
        let plain = definition("");
        assert_eq!(
            dockerd_listen(&plain.engine, None).expect("listen"),
            Listen::Flag
        );
        assert_eq!(Listen::Flag.args(), ["--host=unix:///run/docker.sock"]);

        let with_socket = definition(
            "[engine.settings]\nhosts = [\"tcp://0.0.0.0:2376\", \"unix:///var/run/docker.sock\"]\ntlsverify = true\n",
        );
        let listen = dockerd_listen(&with_socket.engine, None).expect("listen");
        assert_eq!(listen, Listen::ConfigFile);
        assert!(
            listen.args().is_empty(),
            "no -H next to hosts in daemon.json"
        );
    }

    #[test]
    fn engine_tls_adds_the_tls_listener_and_its_files() {
        let def = definition("[engine]\ntls-listen = \"[::]:2376\"\nsettings = { debug = true }\n");
        let listen =
            dockerd_listen(&def.engine, Some(Path::new("/run/plinth/engine-tls"))).expect("listen");
        let Listen::Amended(json) = &listen else {
            panic!("expected an amended configuration, got {listen:?}");
        };
        let value: serde_json::Value = serde_json::from_str(json).expect("JSON");
        assert_eq!(
            value["hosts"],
            serde_json::json!(["unix:///run/docker.sock", "tcp://[::]:2376"])
        );
        assert_eq!(value["tlsverify"], true);
        assert_eq!(value["tlscacert"], "/run/plinth/engine-tls/ca.pem");
        assert_eq!(value["tlscert"], "/run/plinth/engine-tls/cert.pem");
        assert_eq!(value["tlskey"], "/run/plinth/engine-tls/key.pem");
        assert_eq!(value["debug"], true, "other settings are kept");
        // The socket named in the settings is not repeated.
        let def =
            definition("[engine]\nsettings = { hosts = [\"unix:///var/run/docker.sock\"] }\n");
        let Listen::Amended(json) =
            dockerd_listen(&def.engine, Some(Path::new("/t"))).expect("listen")
        else {
            panic!("expected an amended configuration");
        };
        let value: serde_json::Value = serde_json::from_str(&json).expect("JSON");
        assert_eq!(
            value["hosts"],
            serde_json::json!(["unix:///var/run/docker.sock", "tcp://0.0.0.0:2376"])
        );
    }

    #[test]
    fn hosts_without_the_socket_get_it_in_an_amended_configuration() {
        let def =
            definition("[engine.settings]\nhosts = [\"tcp://0.0.0.0:2376\"]\ntlsverify = true\n");
        let listen = dockerd_listen(&def.engine, None).expect("listen");
        let Listen::Amended(json) = &listen else {
            panic!("expected an amended configuration, got {listen:?}");
        };
        let value: serde_json::Value = serde_json::from_str(json).expect("JSON");
        assert_eq!(
            value["hosts"],
            serde_json::json!(["unix:///run/docker.sock", "tcp://0.0.0.0:2376"])
        );
        assert_eq!(value["tlsverify"], true, "other settings are kept");
        assert_eq!(listen.args(), ["--config-file=/run/plinth/dockerd.json"]);
        assert!(!listen.args().iter().any(|a| a.starts_with("--host")));
    }

    #[test]
    fn accepted_plain_tcp_is_stated_to_dockerd_and_nothing_else_is() {
        let plain = "[engine]\nsettings = { hosts = [\"unix:///run/docker.sock\", \"tcp://0.0.0.0:2375\"] }\ninsecure-tcp = true\n";
        let def = definition(plain);
        assert_eq!(
            plain_tcp_flag(&def.engine, None).expect("flag"),
            Some("--tls=false")
        );
        let workload = DockerWorkload::build(def.clone(), None, "").expect("workload");
        assert_eq!(workload.engine_service().dockerd.args, ["--tls=false"]);
        // Plinth's own TLS, the settings' own tls or tlsverify, no TCP host, or no
        // insecure-tcp: no flag.
        assert_eq!(
            plain_tcp_flag(&def.engine, Some(Path::new("/t"))).expect("flag"),
            None
        );
        for other in [
            plain.replace("] }", "], tls = false }"),
            plain.replace("] }", "], tlsverify = false }"),
            plain.replace(", \"tcp://0.0.0.0:2375\"", ""),
            plain.replace(
                "insecure-tcp = true\n",
                "tls = { ca = \"c\", cert = \"s\", key = \"k\" }\n",
            ),
        ] {
            let def = definition(&other);
            assert_eq!(
                plain_tcp_flag(&def.engine, None).expect("flag"),
                None,
                "{other}"
            );
            let workload = DockerWorkload::build(def, None, "").expect("workload");
            assert!(
                !workload
                    .engine_service()
                    .dockerd
                    .args
                    .contains(&"--tls=false".to_owned()),
                "{other}"
            );
        }
    }

    #[test]
    fn hosts_that_are_not_a_list_of_strings_are_refused() {
        for bad in ["hosts = \"unix:///run/docker.sock\"", "hosts = [1]"] {
            let def = definition(&format!("[engine.settings]\n{bad}\n"));
            let error = dockerd_listen(&def.engine, None)
                .expect_err(bad)
                .to_string();
            assert!(
                error.contains("`hosts` must be an array of strings"),
                "{error}"
            );
            assert!(DockerWorkload::new(def).is_err());
        }
    }

    #[test]
    fn load_reads_the_definition_and_names_the_file_in_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image.toml");
        let missing = DockerWorkload::load(&path).expect_err("missing file");
        assert!(format!("{missing:#}").contains(&path.display().to_string()));

        std::fs::write(&path, "[image]\nname = \"demo\"\n").expect("write");
        let invalid = format!("{:#}", DockerWorkload::load(&path).expect_err("invalid"));
        assert!(
            invalid.contains("parsing the image definition"),
            "{invalid}"
        );
        assert!(invalid.contains("image.toml"), "{invalid}");

        std::fs::write(
            &path,
            format!("{BASE}[[container]]\nname = \"web\"\nimage = \"busybox:1.36\"\n"),
        )
        .expect("write");
        let workload = DockerWorkload::load(&path).expect("valid");
        assert_eq!(workload.definition().containers.len(), 1);
        assert_eq!(workload.listen(), &Listen::Flag);
    }

    fn names(services: &[Box<dyn Service>]) -> Vec<&str> {
        services.iter().map(|s| s.name()).collect()
    }

    #[test]
    fn the_update_agent_runs_only_with_update_and_an_executable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = dir.path().join("plinth-update");
        let key = os_config::manifest::SecretKey::from_seed([7; 32]).public();
        let update =
            format!("[update]\nurl = \"http://127.0.0.1:8000/releases\"\nkeys = [\"{key}\"]\n");

        let record = dir.path().join("boot.json");
        std::fs::write(&record, "{}").expect("record");
        let mut without = DockerWorkload::new(definition("")).expect("workload");
        without.update_agent = agent.clone();
        without.boot_record = record.clone();
        std::fs::write(&agent, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(names(&without.services()), ["dockerd"]);

        let mut with = DockerWorkload::new(definition(&update)).expect("workload");
        with.update_agent = agent.clone();
        with.boot_record = record.clone();
        assert_eq!(names(&with.services()), ["dockerd", "plinth-update"]);

        // A live boot: no boot record, no slot, no agent.
        with.boot_record = dir.path().join("no-record.json");
        assert_eq!(names(&with.services()), ["dockerd"]);
        with.boot_record = record;

        with.update_agent = dir.path().join("absent");
        assert_eq!(names(&with.services()), ["dockerd"]);
    }

    #[test]
    fn the_engine_service_writes_its_configuration_and_counts_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("run/dockerd.json");
        let starts = Arc::new(AtomicU64::new(0));
        let service = EngineService {
            dockerd: Program {
                name: "dockerd".into(),
                program: PathBuf::from("true"),
                args: Vec::new(),
                log: dir.path().join("log/dockerd.log"),
            },
            listen: Listen::Amended("{\"hosts\": []}".into()),
            amended_config: config.clone(),
            starts: starts.clone(),
        };
        assert_eq!(service.name(), "dockerd");
        let mut child = service.spawn().expect("spawn");
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        assert_eq!(
            std::fs::read_to_string(&config).expect("config"),
            "{\"hosts\": []}"
        );
        child.wait().expect("wait");

        let failing = EngineService {
            dockerd: Program {
                program: dir.path().join("no-such-dockerd"),
                ..service.dockerd.clone()
            },
            listen: Listen::Flag,
            amended_config: config,
            starts: starts.clone(),
        };
        assert!(failing.spawn().is_err());
        assert_eq!(
            starts.load(Ordering::SeqCst),
            1,
            "a failed start is no start"
        );
    }

    #[test]
    fn services_pass_the_listen_arguments_to_dockerd() {
        let def = definition("[engine.settings]\nhosts = [\"unix:///run/docker.sock\"]\n");
        let workload = DockerWorkload::new(def).expect("workload");
        assert_eq!(workload.listen(), &Listen::ConfigFile);
        assert!(workload.engine_service().dockerd.args.is_empty());
        assert_eq!(names(&workload.services()), ["dockerd"]);

        let plain = DockerWorkload::new(definition("")).expect("workload");
        let service = plain.engine_service();
        assert_eq!(service.dockerd.args, ["--host=unix:///run/docker.sock"]);
        assert_eq!(service.dockerd.program, Path::new("dockerd"));
        service.starts.fetch_add(1, Ordering::SeqCst);
        assert_eq!(
            plain.engine_starts(),
            1,
            "the workload sees the service's starts"
        );
    }

    #[test]
    fn stopping_without_an_engine_fails_quickly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        let error = stop_containers(&dir.path().join("docker.sock"), Duration::from_secs(15))
            .expect_err("no engine");
        assert!(start.elapsed() < Duration::from_secs(3));
        assert!(format!("{error:#}").contains("docker.sock"), "{error:#}");
    }

    #[test]
    fn health_without_an_engine_names_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let client = docker::Client::new(dir.path().join("docker.sock"));
        let reason = look(&client, &[]).expect_err("no engine");
        assert!(reason.contains("docker.sock"), "{reason}");
    }

    /// A fake engine answering `_ping`, an empty container list, an active swarm manager's
    /// `/info` and an empty service list, or hanging up on every request while `down` is set;
    /// counts container list and `/info` requests.
    fn fake_engine(socket: &Path) -> (Arc<AtomicU64>, Arc<AtomicBool>, Arc<AtomicU64>) {
        use std::io::{BufRead as _, BufReader, Write as _};
        let listener = std::os::unix::net::UnixListener::bind(socket).expect("bind");
        let lists = Arc::new(AtomicU64::new(0));
        let counter = lists.clone();
        let down = Arc::new(AtomicBool::new(false));
        let is_down = down.clone();
        let infos = Arc::new(AtomicU64::new(0));
        let info_counter = infos.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                if is_down.load(Ordering::SeqCst) {
                    continue;
                }
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut request = String::new();
                reader.read_line(&mut request).expect("request line");
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let body = if request.contains("/containers/json") {
                    counter.fetch_add(1, Ordering::SeqCst);
                    "[]"
                } else if request.contains("/info ") {
                    info_counter.fetch_add(1, Ordering::SeqCst);
                    r#"{"Swarm":{"LocalNodeState":"active","NodeID":"n1","ControlAvailable":true,"Managers":1,"Nodes":2}}"#
                } else if request.contains("/services ") {
                    "[]"
                } else {
                    "OK"
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (lists, down, infos)
    }

    fn wait_for(what: &str, condition: impl Fn() -> bool) {
        let start = Instant::now();
        while !condition() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out: {what}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn containers_are_reconciled_again_after_a_dockerd_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("docker.sock");
        let (lists, down, infos) = fake_engine(&socket);
        let mut workload = DockerWorkload::new(definition("")).expect("workload");
        workload.socket = socket;
        workload.watch_interval = Duration::from_millis(20);
        workload.swarm.marker = dir.path().join("swarm-joined");
        let workload = Arc::new(workload);
        workload.engine_starts.store(1, Ordering::SeqCst);
        let looping = workload.clone();
        let engine_loop = std::thread::spawn(move || looping.engine_loop());

        wait_for("first reconcile", || lists.load(Ordering::SeqCst) == 1);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            lists.load(Ordering::SeqCst),
            1,
            "no reconcile while nothing changed"
        );

        workload.engine_starts.fetch_add(1, Ordering::SeqCst);
        wait_for("reconcile after the restart", || {
            lists.load(Ordering::SeqCst) == 2
        });

        // An engine that stops answering is waited for, then reconciled again.
        down.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(lists.load(Ordering::SeqCst), 2);
        down.store(false, Ordering::SeqCst);
        wait_for("reconcile after the engine answers again", || {
            lists.load(Ordering::SeqCst) == 3
        });

        workload.stopping.store(true, Ordering::SeqCst);
        engine_loop.join().expect("the loop ends at shutdown");
        assert_eq!(lists.load(Ordering::SeqCst), 3);
        assert_eq!(
            infos.load(Ordering::SeqCst),
            0,
            "no [swarm]: the engine is not asked about it"
        );
    }

    #[test]
    fn a_declared_swarm_is_reconciled_after_the_containers_and_again_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("docker.sock");
        let (lists, _down, infos) = fake_engine(&socket);
        let mut workload =
            DockerWorkload::new(definition("[swarm]\nrole = \"manager\"\ninit = true\n"))
                .expect("workload");
        workload.socket = socket;
        workload.watch_interval = Duration::from_millis(20);
        workload.swarm.marker = dir.path().join("swarm-joined");
        let workload = Arc::new(workload);
        workload.engine_starts.store(1, Ordering::SeqCst);
        let looping = workload.clone();
        let engine_loop = std::thread::spawn(move || looping.engine_loop());

        wait_for("the swarm's state is read", || {
            infos.load(Ordering::SeqCst) == 1
        });
        assert_eq!(lists.load(Ordering::SeqCst), 1, "containers came first");
        assert!(workload.settle.get().reconciled_once);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            infos.load(Ordering::SeqCst),
            1,
            "a node in the swarm as declared is not asked again before the recheck"
        );
        workload.engine_starts.fetch_add(1, Ordering::SeqCst);
        wait_for("the swarm after the restart", || {
            infos.load(Ordering::SeqCst) == 2
        });
        workload.stopping.store(true, Ordering::SeqCst);
        engine_loop.join().expect("the loop ends at shutdown");
        assert!(
            !dir.path().join("swarm-joined").exists(),
            "a node already in the swarm was not joined by Plinth"
        );
    }

    #[test]
    fn the_start_hook_runs_without_waiting_for_the_engine() {
        // No engine listens on the socket: the hook (the bless gate) must still run, so that its
        // timeout covers an engine that never comes up.
        let dir = tempfile::tempdir().expect("tempdir");
        let (calls, engine_answered) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(true)));
        let (counted, answered) = (calls.clone(), engine_answered.clone());
        let mut workload = DockerWorkload::new(definition(""))
            .expect("workload")
            .on_start(Arc::new(move |boot| {
                answered.store(boot.client.ping().is_ok(), Ordering::SeqCst);
                assert_eq!(boot.definition.image.name.as_str(), "demo");
                assert!(!boot.reconciled(), "nothing was reconciled yet");
                counted.fetch_add(1, Ordering::SeqCst);
            }));
        workload.socket = dir.path().join("docker.sock");
        workload.start_hook();
        wait_for("the start hook", || calls.load(Ordering::SeqCst) == 1);
        assert!(
            !engine_answered.load(Ordering::SeqCst),
            "the hook ran against a missing engine"
        );
    }
}
