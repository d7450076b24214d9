//! Makes the declared `[[container]]`s exist exactly as declared, through the engine API.
//!
//! Every container Plinth creates carries `plinth.managed=1` and `plinth.spec=<sha256>` (the hash
//! of its canonical declaration). At each boot a container whose hash and image are unchanged is
//! kept (and started); a changed one is removed and created again; managed containers no longer
//! declared are removed. Containers without the managed label are left alone unless they take a
//! declared name.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};
use std::time::Duration;

use os_config::definition::{
    published_port, Container, ContainerNetwork, Log, RestartPolicy, DEFAULT_LOG_MAX_FILE,
    DEFAULT_LOG_MAX_SIZE,
};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::stage2::docker::{self, ContainerDetails, ContainerSummary, NetworkSummary};

/// Label marking a container as created by Plinth.
pub const MANAGED_LABEL: &str = "plinth.managed";
/// Label holding the hash of the declaration a container was created from.
pub const SPEC_LABEL: &str = "plinth.spec";
/// Where the builder places image archives (`<container name>.tar`, `docker save` format).
pub const DEFAULT_IMAGES_DIR: &str = "/usr/lib/plinth/images";

/// The engine operations reconciliation needs; [`docker::Client`] implements it, tests fake it.
pub trait Engine {
    /// All containers, stopped ones too.
    fn list_containers(&self) -> docker::Result<Vec<ContainerSummary>>;
    /// A container by name or ID, `None` if absent.
    fn inspect_container(&self, name: &str) -> docker::Result<Option<ContainerDetails>>;
    /// The ID of the image a reference names, `None` if the engine lacks it.
    fn image_id(&self, reference: &str) -> docker::Result<Option<String>>;
    /// Loads a `docker save` archive.
    fn load_image(&self, archive: &Path) -> docker::Result<Vec<String>>;
    /// Pulls an image from its registry.
    fn pull_image(&self, reference: &str) -> docker::Result<()>;
    /// Creates a container; returns its ID.
    fn create_container(&self, name: &str, body: &Value) -> docker::Result<String>;
    /// Starts a container.
    fn start_container(&self, id: &str) -> docker::Result<()>;
    /// Stops a container, killing it after `timeout`.
    fn stop_container(&self, id: &str, timeout: Duration) -> docker::Result<()>;
    /// Removes a container, running or not.
    fn remove_container(&self, id: &str) -> docker::Result<()>;
    /// Deletes images no tag and no container refers to; returns the bytes reclaimed.
    fn prune_images(&self) -> docker::Result<u64>;
    /// Networks carrying [`MANAGED_LABEL`].
    fn list_managed_networks(&self) -> docker::Result<Vec<NetworkSummary>>;
    /// Creates a network from a `POST /networks/create` body; returns its ID.
    fn create_network(&self, name: &str, body: &Value) -> docker::Result<String>;
    /// Removes a network.
    fn remove_network(&self, id: &str) -> docker::Result<()>;
    /// Connects a (created, not yet started) container to a network with extra DNS names.
    fn connect_network(
        &self,
        network: &str,
        container: &str,
        aliases: &[String],
    ) -> docker::Result<()>;
}

impl Engine for docker::Client {
    fn list_containers(&self) -> docker::Result<Vec<ContainerSummary>> {
        docker::Client::list_containers(self, None)
    }
    fn inspect_container(&self, name: &str) -> docker::Result<Option<ContainerDetails>> {
        docker::Client::inspect_container(self, name)
    }
    fn image_id(&self, reference: &str) -> docker::Result<Option<String>> {
        Ok(self.inspect_image(reference)?.map(|i| i.id))
    }
    fn load_image(&self, archive: &Path) -> docker::Result<Vec<String>> {
        docker::Client::load_image(self, archive)
    }
    fn pull_image(&self, reference: &str) -> docker::Result<()> {
        docker::Client::pull_image(self, reference)
    }
    fn create_container(&self, name: &str, body: &Value) -> docker::Result<String> {
        docker::Client::create_container(self, name, body)
    }
    fn start_container(&self, id: &str) -> docker::Result<()> {
        docker::Client::start_container(self, id)
    }
    fn stop_container(&self, id: &str, timeout: Duration) -> docker::Result<()> {
        docker::Client::stop_container(self, id, timeout)
    }
    fn remove_container(&self, id: &str) -> docker::Result<()> {
        docker::Client::remove_container(self, id)
    }
    fn prune_images(&self) -> docker::Result<u64> {
        self.prune_dangling_images()
    }
    fn list_managed_networks(&self) -> docker::Result<Vec<NetworkSummary>> {
        self.list_networks(Some(&format!("{MANAGED_LABEL}=1")))
    }
    fn create_network(&self, name: &str, body: &Value) -> docker::Result<String> {
        docker::Client::create_network(self, name, body)
    }
    fn remove_network(&self, id: &str) -> docker::Result<()> {
        docker::Client::remove_network(self, id)
    }
    fn connect_network(
        &self,
        network: &str,
        container: &str,
        aliases: &[String],
    ) -> docker::Result<()> {
        docker::Client::connect_network(self, network, container, aliases)
    }
}

/// Receives machine-readable status events (`PLINTH-STATUS <event> key=value…`).
pub trait StatusSink {
    /// Reports one event with its fields.
    fn status(&self, event: &str, fields: &[(&str, &str)]);
}

/// Any `Fn(&str)` is a sink that receives the whole `PLINTH-STATUS` line, formatted by
/// [`os_config::status::format`] as the console's lines are.
impl<F: Fn(&str)> StatusSink for F {
    fn status(&self, event: &str, fields: &[(&str, &str)]) {
        self(&os_config::status::format(event, fields));
    }
}

/// Paths reconciliation touches, overridable for tests.
#[derive(Debug, Clone)]
pub struct Options {
    /// Folder of baked-in image archives, `<container name>.tar`.
    pub images_dir: PathBuf,
    /// Prefix for the host side of mounts (`/` on the machine).
    pub host_root: PathBuf,
    /// How long a container waits for each of its `depends-on` to run (and be healthy) before
    /// it is started anyway.
    pub dependency_timeout: Duration,
    /// How often a dependency is looked at while waiting.
    pub dependency_poll: Duration,
}

/// How long a container waits for a dependency by default.
pub const DEFAULT_DEPENDENCY_TIMEOUT: Duration = Duration::from_secs(120);

impl Default for Options {
    fn default() -> Self {
        Options {
            images_dir: PathBuf::from(DEFAULT_IMAGES_DIR),
            host_root: PathBuf::from("/"),
            dependency_timeout: DEFAULT_DEPENDENCY_TIMEOUT,
            dependency_poll: Duration::from_secs(1),
        }
    }
}

/// What reconciliation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Declared containers found as declared (started if they were stopped).
    pub kept: Vec<String>,
    /// Declared containers that did not exist.
    pub created: Vec<String>,
    /// Containers whose declaration or image changed.
    pub recreated: Vec<String>,
    /// Managed containers no longer declared.
    pub removed: Vec<String>,
    /// Declared networks created (or created again after their declaration changed).
    pub networks_created: Vec<String>,
    /// Managed networks no longer declared, removed.
    pub networks_removed: Vec<String>,
    /// Containers that could not be brought to their declared state, with the reason.
    pub failed: Vec<(String, String)>,
    /// Bytes freed by deleting images that replaced or removed containers left unused.
    pub pruned_bytes: u64,
    /// Problems that did not keep any container from running as declared.
    pub warnings: Vec<String>,
}

/// One log line: `kept 1, created 1, recreated 0, removed 0, failed 0`.
impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kept {}, created {}, recreated {}, removed {}, failed {}",
            self.kept.len(),
            self.created.len(),
            self.recreated.len(),
            self.removed.len(),
            self.failed.len()
        )?;
        for (name, reason) in &self.failed {
            write!(f, "; {name}: {reason}")?;
        }
        Ok(())
    }
}

impl Report {
    /// True when every declared container runs as declared.
    pub fn all_running(&self) -> bool {
        self.failed.is_empty()
    }
}

/// What to do with one declared container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Exists as declared: keep it, start it if stopped.
    Keep {
        /// The existing container.
        id: String,
    },
    /// Exists but differs (declaration, image, or not ours): remove, then create.
    Recreate {
        /// The existing container.
        id: String,
    },
    /// Does not exist.
    Create,
}

/// Decides the fate of a declared container given its spec hash, the ID of the image it should
/// run and the container of that name, if any.
pub fn decide(spec_hash: &str, image_id: &str, existing: Option<&ContainerSummary>) -> Decision {
    let Some(existing) = existing else {
        return Decision::Create;
    };
    let same = existing.labels.get(MANAGED_LABEL).map(String::as_str) == Some("1")
        && existing.labels.get(SPEC_LABEL).map(String::as_str) == Some(spec_hash)
        && existing.image_id == image_id;
    if same {
        Decision::Keep {
            id: existing.id.clone(),
        }
    } else {
        Decision::Recreate {
            id: existing.id.clone(),
        }
    }
}

/// The sha256 (hex) of the declaration's canonical JSON: object keys sorted, no whitespace.
pub fn spec_hash(decl: &Container) -> String {
    canonical_hash(decl)
}

/// The sha256 (hex) of a `[[container-network]]` declaration's canonical JSON.
pub fn network_spec_hash(decl: &ContainerNetwork) -> String {
    canonical_hash(decl)
}

/// The sha256 (hex) of any declaration's canonical JSON: object keys sorted, no whitespace.
pub(crate) fn canonical_hash<T: serde::Serialize>(decl: &T) -> String {
    let value = serde_json::to_value(decl).unwrap_or_else(|e| json!(e.to_string()));
    let mut canonical = String::new();
    write_canonical(&value, &mut canonical);
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The engine's restart policy name for a declared policy.
fn restart_name(policy: RestartPolicy) -> &'static str {
    match policy {
        RestartPolicy::No => "no",
        RestartPolicy::OnFailure => "on-failure",
        RestartPolicy::Always => "always",
        RestartPolicy::UnlessStopped => "unless-stopped",
    }
}

/// The `POST /containers/create` body for a declaration.
pub fn create_body(decl: &Container, spec_hash: &str) -> Value {
    let mut body = Map::new();
    body.insert("Image".into(), json!(decl.image));
    if !decl.command.is_empty() {
        body.insert("Cmd".into(), json!(decl.command));
    }
    let env: Vec<String> = decl.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    body.insert("Env".into(), json!(env));
    body.insert(
        "Labels".into(),
        json!({ MANAGED_LABEL: "1", SPEC_LABEL: spec_hash }),
    );
    let (exposed, bindings) = port_bindings(decl);
    body.insert("ExposedPorts".into(), Value::Object(exposed));
    if decl.tty {
        body.insert("Tty".into(), json!(true));
    }
    if decl.stdin {
        body.insert("OpenStdin".into(), json!(true));
    }
    if let Some(user) = &decl.user {
        body.insert("User".into(), json!(user));
    }
    if let Some(workdir) = &decl.workdir {
        body.insert("WorkingDir".into(), json!(workdir));
    }
    if let Some(first) = decl.networks.first() {
        body.insert(
            "NetworkingConfig".into(),
            json!({ "EndpointsConfig": { first.name().as_str(): { "Aliases": first.aliases() } } }),
        );
    }
    if let Some(health) = &decl.health {
        let mut test = vec!["CMD".to_owned()];
        test.extend(health.command.iter().cloned());
        body.insert(
            "Healthcheck".into(),
            json!({
                "Test": test,
                "Interval": u64::try_from(health.interval.0.as_nanos()).unwrap_or(u64::MAX),
                "Retries": health.retries,
            }),
        );
    }
    body.insert("HostConfig".into(), host_config(decl, bindings));
    Value::Object(body)
}

/// `ExposedPorts` and `HostConfig.PortBindings`: one entry per port of a range.
fn port_bindings(decl: &Container) -> (Map<String, Value>, Map<String, Value>) {
    let mut exposed = Map::new();
    let mut bindings = Map::new();
    // The definition was validated when parsed; an unparsable port cannot reach here.
    for port in decl.ports.iter().filter_map(|p| published_port(p).ok()) {
        let host_ip = port
            .host_ip
            .map_or_else(|| "0.0.0.0".to_owned(), |ip| ip.to_string());
        for (host, guest) in port.pairs() {
            let key = format!("{guest}/{}", port.protocol);
            exposed.insert(key.clone(), json!({}));
            let entry = bindings.entry(key).or_insert_with(|| json!([]));
            if let Value::Array(list) = entry {
                list.push(json!({ "HostIp": host_ip, "HostPort": host.to_string() }));
            }
        }
    }
    (exposed, bindings)
}

/// `HostConfig`: mounts, ports, restart policy, network, limits, capabilities and logging.
fn host_config(decl: &Container, bindings: Map<String, Value>) -> Value {
    let mut host = Map::new();
    host.insert("Binds".into(), json!(decl.mounts));
    host.insert("PortBindings".into(), Value::Object(bindings));
    host.insert(
        "RestartPolicy".into(),
        json!({ "Name": restart_name(decl.restart), "MaximumRetryCount": 0 }),
    );
    host.insert("LogConfig".into(), log_config(decl.log.as_ref()));
    if let Some(first) = decl.networks.first() {
        host.insert("NetworkMode".into(), json!(first.name().as_str()));
    }
    if let Some(memory) = decl.memory {
        host.insert("Memory".into(), json!(memory.0));
    }
    if let Some(cpus) = decl.cpus {
        // Validated to 0 < cpus ≤ 1024, so the product fits.
        host.insert("NanoCpus".into(), json!((cpus * 1e9).round() as i64));
    }
    let capabilities = |names: &[String]| -> Vec<String> {
        names
            .iter()
            .filter_map(|n| os_config::validate::capability(n).ok())
            .collect()
    };
    if !decl.cap_add.is_empty() {
        host.insert("CapAdd".into(), json!(capabilities(&decl.cap_add)));
    }
    if !decl.cap_drop.is_empty() {
        host.insert("CapDrop".into(), json!(capabilities(&decl.cap_drop)));
    }
    if decl.read_only {
        host.insert("ReadonlyRootfs".into(), json!(true));
    }
    Value::Object(host)
}

/// `HostConfig.LogConfig`: rotation on unless the declaration says `driver = "none"`.
fn log_config(log: Option<&Log>) -> Value {
    let default = Log::default();
    let log = log.unwrap_or(&default);
    let mut config = Map::new();
    if log.driver != os_config::definition::LogDriver::None {
        let size = log.max_size.as_deref().unwrap_or(DEFAULT_LOG_MAX_SIZE);
        let files = log.max_file.unwrap_or(DEFAULT_LOG_MAX_FILE);
        config.insert("max-size".into(), json!(size));
        config.insert("max-file".into(), json!(files.to_string()));
    }
    json!({ "Type": log.driver.name(), "Config": config })
}

/// The `POST /networks/create` body for a `[[container-network]]`.
pub fn network_body(decl: &ContainerNetwork, spec_hash: &str) -> Value {
    let mut body = json!({
        "Name": decl.name.as_str(),
        "CheckDuplicate": true,
        "Driver": decl.driver.name(),
        "Internal": decl.internal,
        "Attachable": decl.attachable,
        "Labels": { MANAGED_LABEL: "1", SPEC_LABEL: spec_hash },
    });
    if let Some(subnet) = &decl.subnet {
        body["IPAM"] = json!({ "Driver": "default", "Config": [{ "Subnet": subnet }] });
    }
    body
}

/// Reads the image ID (`sha256:<config digest>`) and tags of the image in a `docker save` archive
/// from its `manifest.json`, picking the entry tagged `reference` when there are several.
pub fn archive_image<R: Read + Seek>(
    archive: &mut R,
    reference: &str,
) -> io::Result<(String, Vec<String>)> {
    let manifest = tar_member(archive, "manifest.json")?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "no manifest.json: not a `docker save` archive",
        )
    })?;
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(rename = "Config")]
        config: String,
        #[serde(rename = "RepoTags", default)]
        repo_tags: Option<Vec<String>>,
    }
    let entries: Vec<Entry> = serde_json::from_slice(&manifest)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("manifest.json: {e}")))?;
    let wanted = normalise_reference(reference);
    let entry = match entries.iter().find(|e| {
        e.repo_tags
            .iter()
            .flatten()
            .any(|t| normalise_reference(t) == wanted)
    }) {
        Some(entry) => entry,
        None if entries.len() == 1 => &entries[0],
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "manifest.json holds {} images, none tagged `{reference}`",
                    entries.len()
                ),
            ))
        }
    };
    // `<hex>.json` (docker-archive) or `blobs/sha256/<hex>` (OCI layout).
    let file = entry.config.rsplit('/').next().unwrap_or_default();
    let hex = file.strip_suffix(".json").unwrap_or(file);
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("manifest.json Config `{}` is not a digest", entry.config),
        ));
    }
    Ok((
        format!("sha256:{hex}"),
        entry.repo_tags.clone().unwrap_or_default(),
    ))
}

/// `busybox` → `busybox:latest`; references with a tag or digest are returned unchanged.
fn normalise_reference(reference: &str) -> String {
    let (repo, tag) = docker::split_reference(reference);
    if reference.contains('@') {
        format!("{repo}@{tag}")
    } else {
        format!("{repo}:{tag}")
    }
}

/// Largest `manifest.json` read from an image archive.
const MAX_MANIFEST: u64 = 16 << 20;

/// Finds a top-level member of a tar archive (ustar, GNU long names and base-256 sizes, PAX
/// `path` and `size` records, as the `tar` crate reads them) and returns its content. Members
/// before it are skipped by seeking, not read.
fn tar_member<R: Read + Seek>(archive: &mut R, wanted: &str) -> io::Result<Option<Vec<u8>>> {
    let mut archive = tar::Archive::new(archive);
    for entry in archive.entries_with_seek()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path_bytes();
        let name = String::from_utf8_lossy(&path);
        let name = name.trim_start_matches("./");
        if name != wanted {
            continue;
        }
        let size = entry.size();
        if size > MAX_MANIFEST {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("tar archive: {name} is {size} bytes, more than {MAX_MANIFEST}"),
            ));
        }
        let mut data = Vec::with_capacity(size as usize);
        entry.read_to_end(&mut data)?;
        return Ok(Some(data));
    }
    Ok(None)
}

/// Makes sure the engine has the image a declaration runs; returns the image ID.
fn ensure_image(
    engine: &dyn Engine,
    decl: &Container,
    options: &Options,
) -> Result<String, String> {
    let present = engine.image_id(&decl.image).map_err(|e| e.to_string())?;
    if decl.archive.is_some() || decl.build.is_some() {
        let path = options.images_dir.join(format!("{}.tar", decl.name));
        let (archive_id, tags) = File::open(&path)
            .and_then(|mut f| archive_image(&mut f, &decl.image))
            .map_err(|e| format!("reading image archive {}: {e}", path.display()))?;
        if present.as_deref() == Some(archive_id.as_str()) {
            return Ok(archive_id);
        }
        engine.load_image(&path).map_err(|e| e.to_string())?;
        let loaded = engine.image_id(&decl.image).map_err(|e| e.to_string())?;
        if loaded.as_deref() != Some(archive_id.as_str()) {
            return Err(format!(
                "image archive {} is tagged {tags:?}, which does not provide `{}`",
                path.display(),
                decl.image
            ));
        }
        Ok(archive_id)
    } else {
        if let Some(id) = present {
            return Ok(id);
        }
        // A container of the instance's user data may run an image the OS image carries for
        // one of its own containers: load that archive instead of pulling.
        if let Some(path) = baked_archive_of(&decl.image, &options.images_dir) {
            engine.load_image(&path).map_err(|e| e.to_string())?;
            if let Some(id) = engine.image_id(&decl.image).map_err(|e| e.to_string())? {
                return Ok(id);
            }
        }
        engine.pull_image(&decl.image).map_err(|e| e.to_string())?;
        engine
            .image_id(&decl.image)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("image `{}` is still missing after the pull", decl.image))
    }
}

/// The archive in `images_dir` (`<container name>.tar`) whose image is tagged `reference`.
pub(crate) fn baked_archive_of(reference: &str, images_dir: &Path) -> Option<PathBuf> {
    let wanted = normalise_reference(reference);
    let mut archives: Vec<_> = std::fs::read_dir(images_dir)
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "tar"))
        .collect();
    archives.sort();
    archives.into_iter().find(|path| {
        File::open(path)
            .and_then(|mut f| archive_image(&mut f, reference))
            .is_ok_and(|(_, tags)| tags.iter().any(|t| normalise_reference(t) == wanted))
    })
}

/// Creates the host side of every bind mount (under `/var`), so the engine does not create it
/// as root-owned with default permissions somewhere unexpected.
fn create_mount_dirs(decl: &Container, options: &Options) -> Result<(), String> {
    for mount in &decl.mounts {
        let host = mount.split_once(':').map_or(mount.as_str(), |(h, _)| h);
        let path = options.host_root.join(host.trim_start_matches('/'));
        std::fs::create_dir_all(&path)
            .map_err(|e| format!("creating mount folder {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Brings one declared container to its declared state; returns what was done. A created
/// container joins its other networks before it starts.
fn reconcile_one(
    engine: &dyn Engine,
    decl: &Container,
    existing: Option<&ContainerSummary>,
    options: &Options,
) -> Result<Decision, String> {
    let image_id = ensure_image(engine, decl, options)?;
    let hash = spec_hash(decl);
    let decision = decide(&hash, &image_id, existing);
    create_mount_dirs(decl, options)?;
    let id = match &decision {
        Decision::Keep { id } => id.clone(),
        Decision::Recreate { id } => {
            engine.remove_container(id).map_err(|e| e.to_string())?;
            create_connected(engine, decl, &hash)?
        }
        Decision::Create => create_connected(engine, decl, &hash)?,
    };
    engine.start_container(&id).map_err(|e| e.to_string())?;
    match engine.inspect_container(&id).map_err(|e| e.to_string())? {
        Some(details) if details.state.running || details.state.restarting => Ok(decision),
        Some(details) => Err(format!(
            "exited right after start (status {}, exit code {}{})",
            details.state.status,
            details.state.exit_code,
            if details.state.error.is_empty() {
                String::new()
            } else {
                format!(", {}", details.state.error)
            }
        )),
        None => Err("vanished right after start".to_owned()),
    }
}

/// Creates a container (on its first network) and connects it to the others; returns its ID.
fn create_connected(engine: &dyn Engine, decl: &Container, hash: &str) -> Result<String, String> {
    let id = engine
        .create_container(decl.name.as_str(), &create_body(decl, hash))
        .map_err(|e| e.to_string())?;
    // The engine (API 1.41) attaches only one network at create.
    for network in decl.networks.iter().skip(1) {
        engine
            .connect_network(network.name().as_str(), &id, network.aliases())
            .map_err(|e| e.to_string())?;
    }
    Ok(id)
}

/// Waits until `dependency` runs, and is healthy if it has a health check, for at most
/// [`Options::dependency_timeout`].
fn wait_for(engine: &dyn Engine, dependency: &Container, options: &Options) -> Result<(), String> {
    let deadline = std::time::Instant::now() + options.dependency_timeout;
    loop {
        let state = health(engine, std::slice::from_ref(dependency)).map_err(|e| e.to_string())?;
        let observed = state.containers.first().map(|c| &c.health);
        match observed {
            Some(ContainerHealth::Healthy) => return Ok(()),
            Some(other) if std::time::Instant::now() >= deadline => {
                return Err(format!(
                    "`{}` is {other} after {} s",
                    dependency.name,
                    options.dependency_timeout.as_secs()
                ))
            }
            _ => std::thread::sleep(options.dependency_poll),
        }
    }
}

/// Waits for every `depends-on` of `decl` that was brought up in this run; a dependency that
/// failed or stays down past the timeout is a warning, and `decl` is started anyway (its
/// restart policy covers a dependency that comes up later).
fn wait_for_dependencies(
    engine: &dyn Engine,
    decl: &Container,
    decls: &[Container],
    options: &Options,
    report: &mut Report,
) {
    for name in &decl.depends_on {
        let Some(dependency) = decls.iter().find(|d| &d.name == name) else {
            continue;
        };
        if report
            .failed
            .iter()
            .any(|(failed, _)| failed == name.as_str())
        {
            report.warnings.push(format!(
                "container {}: starting without its dependency {name}, which failed",
                decl.name
            ));
            continue;
        }
        crate::info!("container {}: waiting for {name}", decl.name);
        if let Err(e) = wait_for(engine, dependency, options) {
            report
                .warnings
                .push(format!("container {}: starting anyway: {e}", decl.name));
        }
    }
}

/// Makes the declared networks exist as declared, before any container joins them. A network
/// whose declaration changed is created again, after the declared containers on it (which the
/// engine would not let go of it) are removed; they are created again afterwards. Returns the
/// names of the containers removed for that.
fn reconcile_networks(
    engine: &dyn Engine,
    networks: &[ContainerNetwork],
    decls: &[Container],
    existing: &[ContainerSummary],
    report: &mut Report,
) -> Vec<String> {
    let mut dropped = Vec::new();
    let managed = match engine.list_managed_networks() {
        Ok(list) => list,
        Err(e) => {
            report.warnings.push(e.to_string());
            return dropped;
        }
    };
    for network in networks {
        let name = network.name.as_str();
        let hash = network_spec_hash(network);
        let current = managed.iter().find(|n| n.name == name);
        if let Some(current) = current {
            if current.labels.get(SPEC_LABEL) == Some(&hash) {
                continue;
            }
            let on_it = decls
                .iter()
                .filter(|d| d.networks.iter().any(|n| n.name() == &network.name));
            for decl in on_it {
                let Some(container) = existing
                    .iter()
                    .find(|c| c.name() == Some(decl.name.as_str()))
                else {
                    continue;
                };
                match engine.remove_container(&container.id) {
                    Ok(()) => dropped.push(decl.name.to_string()),
                    Err(e) => report.warnings.push(e.to_string()),
                }
            }
            if let Err(e) = engine.remove_network(&current.id) {
                report.warnings.push(e.to_string());
                continue;
            }
        }
        match engine.create_network(name, &network_body(network, &hash)) {
            Ok(_) => report.networks_created.push(name.to_owned()),
            Err(e) => report.warnings.push(e.to_string()),
        }
    }
    dropped
}

/// Removes managed networks that are no longer declared (their containers are gone by now).
fn remove_stale_networks(engine: &dyn Engine, networks: &[ContainerNetwork], report: &mut Report) {
    let managed = match engine.list_managed_networks() {
        Ok(list) => list,
        Err(e) => return report.warnings.push(e.to_string()),
    };
    for stale in managed
        .iter()
        .filter(|n| !networks.iter().any(|d| d.name.as_str() == n.name))
    {
        match engine.remove_network(&stale.id) {
            Ok(()) => report.networks_removed.push(stale.name.clone()),
            Err(e) => report.warnings.push(e.to_string()),
        }
    }
}

/// Declared containers in the order they are brought up: each after its `depends-on`.
fn start_order(decls: &[Container]) -> Vec<usize> {
    let mut order = Vec::new();
    // Validation refused cycles; should one slip through, declaration order still starts all.
    if os_config::validate::container_order(decls, &mut order).is_err() {
        order = (0..decls.len()).collect();
    }
    order
}

/// Makes every declared network and container exist exactly as declared, containers running
/// (each after its `depends-on`), removes managed containers and then networks no longer
/// declared, and reports `container-started`/`container-failed` per declared container
/// (`container-running` comes later, from [`crate::stage2::stability`], once a container has
/// stayed up). Fails only when the engine cannot list its containers; a container or network
/// that cannot be brought up is recorded in the report and does not stop the others.
pub fn reconcile(
    engine: &dyn Engine,
    decls: &[Container],
    networks: &[ContainerNetwork],
    options: &Options,
    sink: &dyn StatusSink,
) -> docker::Result<Report> {
    let existing = engine.list_containers()?;
    let mut report = Report::default();
    // Stale containers go first: they may hold host ports a declared container needs.
    for container in &existing {
        let name = container.name().unwrap_or(&container.id);
        let managed = container.labels.get(MANAGED_LABEL).map(String::as_str) == Some("1");
        if managed && !decls.iter().any(|d| d.name.as_str() == name) {
            match engine.remove_container(&container.id) {
                Ok(()) => report.removed.push(name.to_owned()),
                Err(e) => report.warnings.push(e.to_string()),
            }
        }
    }
    let dropped = reconcile_networks(engine, networks, decls, &existing, &mut report);
    let by_name: BTreeMap<&str, &ContainerSummary> = existing
        .iter()
        .filter_map(|c| Some((c.name()?, c)))
        .filter(|(name, _)| !dropped.iter().any(|d| d == name))
        .collect();
    for i in start_order(decls) {
        let decl = &decls[i];
        let name = decl.name.as_str();
        wait_for_dependencies(engine, decl, decls, options, &mut report);
        match reconcile_one(engine, decl, by_name.get(name).copied(), options) {
            Ok(decision) => {
                match decision {
                    Decision::Keep { .. } => report.kept.push(name.to_owned()),
                    Decision::Recreate { .. } => report.recreated.push(name.to_owned()),
                    Decision::Create if dropped.iter().any(|d| d == name) => {
                        report.recreated.push(name.to_owned())
                    }
                    Decision::Create => report.created.push(name.to_owned()),
                }
                sink.status("container-started", &[("name", name)]);
            }
            Err(reason) => {
                sink.status("container-failed", &[("name", name), ("reason", &reason)]);
                report.failed.push((name.to_owned(), reason));
            }
        }
    }
    remove_stale_networks(engine, networks, &mut report);
    // Images superseded by a new archive or left by removed containers would otherwise fill
    // /var over many updates.
    if !report.recreated.is_empty() || !report.removed.is_empty() || !report.created.is_empty() {
        match engine.prune_images() {
            Ok(bytes) => report.pruned_bytes = bytes,
            Err(e) => report.warnings.push(e.to_string()),
        }
    }
    Ok(report)
}

/// What [`stop_all`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopReport {
    /// Containers stopped.
    pub stopped: Vec<String>,
    /// Containers that could not be stopped, with the reason.
    pub failed: Vec<(String, String)>,
}

/// Stops every running managed container in parallel, each with `timeout` before it is killed.
pub fn stop_all<E: Engine + Sync>(engine: &E, timeout: Duration) -> docker::Result<StopReport> {
    let running: Vec<ContainerSummary> = engine
        .list_containers()?
        .into_iter()
        .filter(|c| {
            c.labels.get(MANAGED_LABEL).map(String::as_str) == Some("1")
                && matches!(c.state.as_str(), "running" | "restarting" | "paused")
        })
        .collect();
    let results: Vec<(String, docker::Result<()>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = running
            .iter()
            .map(|c| {
                let name = c.name().unwrap_or(&c.id).to_owned();
                (
                    name,
                    scope.spawn(move || engine.stop_container(&c.id, timeout)),
                )
            })
            .collect();
        handles
            .into_iter()
            .map(|(name, h)| {
                let result = h.join().unwrap_or_else(|_| {
                    Err(docker::Error::Protocol {
                        what: format!("stopping container {name}"),
                        detail: "stopping thread panicked".to_owned(),
                    })
                });
                (name, result)
            })
            .collect()
    });
    let mut report = StopReport::default();
    for (name, result) in results {
        match result {
            Ok(()) => report.stopped.push(name),
            Err(e) => report.failed.push((name, e.to_string())),
        }
    }
    Ok(report)
}

/// The state of one declared container as the bless gate sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerHealth {
    /// Running, and healthy if it has a health check.
    Healthy,
    /// Running; its health check has not passed yet.
    Starting,
    /// Running, but its health check fails.
    Unhealthy,
    /// Exists but does not run (engine status given).
    NotRunning(String),
    /// Does not exist.
    Missing,
}

impl std::fmt::Display for ContainerHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ContainerHealth::Healthy => f.write_str("healthy"),
            ContainerHealth::Starting => f.write_str("health check not passed yet"),
            ContainerHealth::Unhealthy => f.write_str("unhealthy"),
            ContainerHealth::NotRunning(status) => write!(f, "not running ({status})"),
            ContainerHealth::Missing => f.write_str("missing"),
        }
    }
}

/// One run of a container: what changes when the engine restarts it or it is created again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// The container ID (a new one after it was created again).
    pub id: String,
    /// When the run started (`State.StartedAt`).
    pub started_at: String,
    /// Restarts under the restart policy so far (`RestartCount`).
    pub restarts: u64,
}

/// One declared container as seen at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The declared name.
    pub name: String,
    /// Running and healthy, or why not.
    pub health: ContainerHealth,
    /// Its current run; `None` when it does not exist.
    pub run: Option<Run>,
    /// Exit code of its last run (meaningful when it is not running).
    pub exit_code: i64,
}

/// Health of all declared containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Each declared container, in declaration order.
    pub containers: Vec<Observed>,
}

impl Health {
    /// True when every declared container is [`ContainerHealth::Healthy`].
    pub fn is_healthy(&self) -> bool {
        self.containers
            .iter()
            .all(|c| c.health == ContainerHealth::Healthy)
    }

    /// The first container that is not healthy, for log lines.
    pub fn first_problem(&self) -> Option<&Observed> {
        self.containers
            .iter()
            .find(|c| c.health != ContainerHealth::Healthy)
    }
}

/// Looks at every declared container: does it run, and is it healthy where it has a health check.
pub fn health(engine: &dyn Engine, decls: &[Container]) -> docker::Result<Health> {
    let mut containers = Vec::new();
    for decl in decls {
        let details = engine.inspect_container(decl.name.as_str())?;
        let health = match &details {
            None => ContainerHealth::Missing,
            // A container between restarts counts as running for the engine, not for us.
            Some(details) if !details.state.running || details.state.restarting => {
                ContainerHealth::NotRunning(details.state.status.clone())
            }
            Some(details) => match (&decl.health, &details.state.health) {
                (None, _) => ContainerHealth::Healthy,
                (Some(_), Some(h)) if h.status == "healthy" => ContainerHealth::Healthy,
                (Some(_), Some(h)) if h.status == "unhealthy" => ContainerHealth::Unhealthy,
                (Some(_), _) => ContainerHealth::Starting,
            },
        };
        containers.push(Observed {
            name: decl.name.to_string(),
            health,
            exit_code: details.as_ref().map_or(0, |d| d.state.exit_code),
            run: details.map(|d| Run {
                id: d.id,
                started_at: d.state.started_at,
                restarts: d.restart_count,
            }),
        });
    }
    Ok(Health { containers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage2::docker::{ContainerConfig, ContainerState};
    use os_config::definition::{
        HealthCheck, ImageBuild, LogDriver, NetworkAttachment, NetworkAttachmentTable,
        NetworkDriver,
    };
    use os_config::units::{ByteSize, Duration as ConfigDuration, Name};
    use std::cell::RefCell;
    use std::io::Cursor;
    use std::sync::Mutex;

    fn web() -> Container {
        Container {
            name: Name::parse("web").expect("name"),
            image: "busybox:1.36".to_owned(),
            archive: None,
            build: None,
            command: vec!["httpd".into(), "-f".into(), "-p".into(), "80".into()],
            env: BTreeMap::from([("B".into(), "2".into()), ("A".into(), "1".into())]),
            ports: vec!["8080:80".into(), "53:53/udp".into()],
            mounts: vec!["/var/lib/web:/www".into()],
            restart: RestartPolicy::Always,
            health: Some(HealthCheck {
                command: vec![
                    "wget".into(),
                    "-q".into(),
                    "-O-".into(),
                    "http://127.0.0.1/".into(),
                ],
                interval: ConfigDuration(Duration::from_secs(5)),
                retries: 3,
            }),
            networks: Vec::new(),
            tty: false,
            stdin: false,
            depends_on: Vec::new(),
            user: None,
            workdir: None,
            memory: None,
            cpus: None,
            cap_add: Vec::new(),
            cap_drop: Vec::new(),
            read_only: false,
            log: None,
        }
    }

    #[test]
    fn create_body_matches_the_engine_api() {
        let body = create_body(&web(), "abc");
        let expected = json!({
            "Image": "busybox:1.36",
            "Cmd": ["httpd", "-f", "-p", "80"],
            "Env": ["A=1", "B=2"],
            "Labels": { "plinth.managed": "1", "plinth.spec": "abc" },
            "ExposedPorts": { "80/tcp": {}, "53/udp": {} },
            "Healthcheck": {
                "Test": ["CMD", "wget", "-q", "-O-", "http://127.0.0.1/"],
                "Interval": 5_000_000_000u64,
                "Retries": 3
            },
            "HostConfig": {
                "Binds": ["/var/lib/web:/www"],
                "PortBindings": {
                    "80/tcp": [{ "HostIp": "0.0.0.0", "HostPort": "8080" }],
                    "53/udp": [{ "HostIp": "0.0.0.0", "HostPort": "53" }]
                },
                "RestartPolicy": { "Name": "always", "MaximumRetryCount": 0 },
                "LogConfig": { "Type": "json-file", "Config": { "max-size": "10m", "max-file": "3" } }
            }
        });
        assert_eq!(body, expected);
        let mut bare = web();
        bare.command.clear();
        bare.health = None;
        bare.restart = RestartPolicy::UnlessStopped;
        let body = create_body(&bare, "abc");
        assert!(body.get("Cmd").is_none(), "empty command keeps the image's");
        assert!(body.get("Healthcheck").is_none());
        assert_eq!(
            body["HostConfig"]["RestartPolicy"]["Name"],
            json!("unless-stopped")
        );
    }

    /// `web()` with every option set.
    fn everything() -> Container {
        let mut c = web();
        c.ports = vec![
            "127.0.0.1:8080:80".into(),
            "[::1]:8443:443".into(),
            "8000-8002:9000-9002/udp".into(),
        ];
        c.networks = vec![
            NetworkAttachment::Table(NetworkAttachmentTable {
                name: Name::parse("back").expect("name"),
                aliases: vec!["db".into()],
            }),
            NetworkAttachment::Name(Name::parse("front").expect("name")),
        ];
        c.tty = true;
        c.stdin = true;
        c.depends_on = vec![Name::parse("redis").expect("name")];
        c.user = Some("1000:1000".into());
        c.workdir = Some("/app".into());
        c.memory = Some(ByteSize(256 << 20));
        c.cpus = Some(1.5);
        c.cap_add = vec!["net_admin".into(), "CAP_SYS_TIME".into()];
        c.cap_drop = vec!["ALL".into()];
        c.read_only = true;
        c.log = Some(Log {
            driver: LogDriver::Local,
            max_size: Some("5m".into()),
            max_file: Some(2),
        });
        c
    }

    #[test]
    fn create_body_carries_every_option() {
        let body = create_body(&everything(), "abc");
        assert_eq!(body["Tty"], json!(true));
        assert_eq!(body["OpenStdin"], json!(true));
        assert_eq!(body["User"], json!("1000:1000"));
        assert_eq!(body["WorkingDir"], json!("/app"));
        assert_eq!(
            body["NetworkingConfig"],
            json!({ "EndpointsConfig": { "back": { "Aliases": ["db"] } } })
        );
        assert_eq!(
            body["ExposedPorts"],
            json!({ "80/tcp": {}, "443/tcp": {}, "9000/udp": {}, "9001/udp": {}, "9002/udp": {} })
        );
        let host = &body["HostConfig"];
        assert_eq!(host["NetworkMode"], json!("back"));
        assert_eq!(host["Memory"], json!(268_435_456u64));
        assert_eq!(host["NanoCpus"], json!(1_500_000_000i64));
        assert_eq!(host["CapAdd"], json!(["CAP_NET_ADMIN", "CAP_SYS_TIME"]));
        assert_eq!(host["CapDrop"], json!(["ALL"]));
        assert_eq!(host["ReadonlyRootfs"], json!(true));
        assert_eq!(
            host["LogConfig"],
            json!({ "Type": "local", "Config": { "max-size": "5m", "max-file": "2" } })
        );
        assert_eq!(
            host["PortBindings"],
            json!({
                "80/tcp": [{ "HostIp": "127.0.0.1", "HostPort": "8080" }],
                "443/tcp": [{ "HostIp": "::1", "HostPort": "8443" }],
                "9000/udp": [{ "HostIp": "0.0.0.0", "HostPort": "8000" }],
                "9001/udp": [{ "HostIp": "0.0.0.0", "HostPort": "8001" }],
                "9002/udp": [{ "HostIp": "0.0.0.0", "HostPort": "8002" }],
            })
        );
        // Without the options: nothing of theirs, and log rotation on all the same.
        let body = create_body(&web(), "abc");
        for key in ["Tty", "OpenStdin", "User", "WorkingDir", "NetworkingConfig"] {
            assert!(body.get(key).is_none(), "{key}");
        }
        for key in [
            "NetworkMode",
            "Memory",
            "NanoCpus",
            "CapAdd",
            "CapDrop",
            "ReadonlyRootfs",
        ] {
            assert!(body["HostConfig"].get(key).is_none(), "{key}");
        }
        assert_eq!(
            body["HostConfig"]["LogConfig"],
            json!({ "Type": "json-file", "Config": { "max-size": "10m", "max-file": "3" } })
        );
        let mut quiet = web();
        quiet.log = Some(Log {
            driver: LogDriver::None,
            max_size: None,
            max_file: None,
        });
        assert_eq!(
            create_body(&quiet, "abc")["HostConfig"]["LogConfig"],
            json!({ "Type": "none", "Config": {} })
        );
    }

    #[test]
    fn network_body_matches_the_engine_api() {
        let network = ContainerNetwork {
            name: Name::parse("back").expect("name"),
            driver: NetworkDriver::Bridge,
            internal: true,
            attachable: false,
            subnet: Some("172.30.0.0/24".into()),
        };
        assert_eq!(
            network_body(&network, "h"),
            json!({
                "Name": "back",
                "CheckDuplicate": true,
                "Driver": "bridge",
                "Internal": true,
                "Attachable": false,
                "Labels": { "plinth.managed": "1", "plinth.spec": "h" },
                "IPAM": { "Driver": "default", "Config": [{ "Subnet": "172.30.0.0/24" }] },
            })
        );
        let mut changed = network.clone();
        changed.internal = false;
        assert_ne!(network_spec_hash(&network), network_spec_hash(&changed));
    }

    #[test]
    fn spec_hash_is_stable_and_tracks_every_field() {
        let full = spec_hash(&everything());
        let changes: [fn(&mut Container); 13] = [
            |c| c.networks.pop().map(drop).unwrap_or_default(),
            |c| c.networks.reverse(),
            |c| c.tty = false,
            |c| c.stdin = false,
            |c| c.depends_on.clear(),
            |c| c.user = Some("0".into()),
            |c| c.workdir = None,
            |c| c.memory = Some(ByteSize(512 << 20)),
            |c| c.cpus = Some(2.0),
            |c| c.cap_add.pop().map(drop).unwrap_or_default(),
            |c| c.cap_drop.clear(),
            |c| c.read_only = false,
            |c| c.log = None,
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut changed = everything();
            change(&mut changed);
            assert_ne!(full, spec_hash(&changed), "change {i}");
        }
        let a = spec_hash(&web());
        assert_eq!(a.len(), 64);
        assert_eq!(a, spec_hash(&web()));
        let mut changed = web();
        changed.env.insert("C".into(), "3".into());
        assert_ne!(a, spec_hash(&changed));
        let mut changed = web();
        changed.ports.pop();
        assert_ne!(a, spec_hash(&changed));
        let mut changed = web();
        changed.restart = RestartPolicy::No;
        assert_ne!(a, spec_hash(&changed));
        let mut canonical = String::new();
        write_canonical(
            &json!({"b": [1, {"d": 1, "c": "x"}], "a": null}),
            &mut canonical,
        );
        assert_eq!(canonical, r#"{"a":null,"b":[1,{"c":"x","d":1}]}"#);
    }

    fn summary(
        name: &str,
        labels: &[(&str, &str)],
        image_id: &str,
        state: &str,
    ) -> ContainerSummary {
        ContainerSummary {
            id: format!("id-{name}"),
            names: vec![format!("/{name}")],
            image: String::new(),
            image_id: image_id.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            state: state.to_owned(),
        }
    }

    #[test]
    fn decisions() {
        let ours = summary(
            "web",
            &[(MANAGED_LABEL, "1"), (SPEC_LABEL, "h1")],
            "sha256:i1",
            "exited",
        );
        assert_eq!(decide("h1", "sha256:i1", None), Decision::Create);
        assert_eq!(
            decide("h1", "sha256:i1", Some(&ours)),
            Decision::Keep {
                id: "id-web".into()
            }
        );
        let recreate = Decision::Recreate {
            id: "id-web".into(),
        };
        assert_eq!(
            decide("h2", "sha256:i1", Some(&ours)),
            recreate,
            "spec changed"
        );
        assert_eq!(
            decide("h1", "sha256:i2", Some(&ours)),
            recreate,
            "image changed"
        );
        let foreign = summary("web", &[(SPEC_LABEL, "h1")], "sha256:i1", "running");
        assert_eq!(
            decide("h1", "sha256:i1", Some(&foreign)),
            recreate,
            "not managed"
        );
    }

    /// An in-memory engine that records the calls made to it.
    #[derive(Default)]
    struct FakeEngine {
        containers: Mutex<Vec<ContainerSummary>>,
        networks: Mutex<Vec<NetworkSummary>>,
        images: Mutex<BTreeMap<String, String>>,
        pullable: BTreeMap<String, String>,
        calls: Mutex<Vec<String>>,
        fail_start: Option<String>,
    }

    impl FakeEngine {
        fn log(&self, call: String) {
            self.calls.lock().expect("lock").push(call);
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().expect("lock").clone()
        }
    }

    impl Engine for FakeEngine {
        fn list_containers(&self) -> docker::Result<Vec<ContainerSummary>> {
            Ok(self.containers.lock().expect("lock").clone())
        }
        fn inspect_container(&self, name: &str) -> docker::Result<Option<ContainerDetails>> {
            let list = self.containers.lock().expect("lock");
            Ok(list
                .iter()
                .find(|c| c.id == name || c.name() == Some(name))
                .map(|c| ContainerDetails {
                    id: c.id.clone(),
                    name: format!("/{}", c.name().unwrap_or_default()),
                    image: c.image_id.clone(),
                    state: ContainerState {
                        status: c.state.clone(),
                        running: c.state == "running" || c.state == "restarting",
                        restarting: c.state == "restarting",
                        health: Some(docker::HealthState {
                            status: "healthy".into(),
                            failing_streak: 0,
                        }),
                        ..Default::default()
                    },
                    restart_count: 0,
                    config: ContainerConfig {
                        labels: c.labels.clone(),
                    },
                }))
        }
        fn image_id(&self, reference: &str) -> docker::Result<Option<String>> {
            Ok(self.images.lock().expect("lock").get(reference).cloned())
        }
        fn load_image(&self, archive: &Path) -> docker::Result<Vec<String>> {
            let name = archive.file_name().unwrap_or_default().to_string_lossy();
            self.log(format!("load {name}"));
            let mut file = File::open(archive).expect("archive exists");
            let (id, tags) = archive_image(&mut file, "").expect("archive parses");
            for tag in &tags {
                self.images
                    .lock()
                    .expect("lock")
                    .insert(tag.clone(), id.clone());
            }
            Ok(tags)
        }
        fn pull_image(&self, reference: &str) -> docker::Result<()> {
            self.log(format!("pull {reference}"));
            match self.pullable.get(reference) {
                Some(id) => {
                    self.images
                        .lock()
                        .expect("lock")
                        .insert(reference.into(), id.clone());
                    Ok(())
                }
                None => Err(docker::Error::Stream {
                    what: format!("pulling image {reference}"),
                    message: "manifest unknown".into(),
                }),
            }
        }
        fn create_container(&self, name: &str, body: &Value) -> docker::Result<String> {
            self.log(format!("create {name}"));
            let labels: Vec<(&str, &str)> = body["Labels"]
                .as_object()
                .expect("labels")
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str().expect("label value")))
                .collect();
            let image = body["Image"].as_str().expect("image");
            let image_id = self.images.lock().expect("lock")[image].clone();
            self.containers
                .lock()
                .expect("lock")
                .push(summary(name, &labels, &image_id, "created"));
            Ok(format!("id-{name}"))
        }
        fn start_container(&self, id: &str) -> docker::Result<()> {
            self.log(format!("start {id}"));
            let mut list = self.containers.lock().expect("lock");
            let c = list
                .iter_mut()
                .find(|c| c.id == id)
                .expect("started container exists");
            c.state = if self.fail_start.as_deref() == Some(id) {
                "exited".into()
            } else {
                "running".into()
            };
            Ok(())
        }
        fn stop_container(&self, id: &str, _timeout: Duration) -> docker::Result<()> {
            self.log(format!("stop {id}"));
            Ok(())
        }
        fn prune_images(&self) -> docker::Result<u64> {
            self.log("prune".to_owned());
            Ok(42)
        }
        fn remove_container(&self, id: &str) -> docker::Result<()> {
            self.log(format!("remove {id}"));
            self.containers.lock().expect("lock").retain(|c| c.id != id);
            Ok(())
        }
        fn list_managed_networks(&self) -> docker::Result<Vec<NetworkSummary>> {
            let list = self.networks.lock().expect("lock");
            Ok(list
                .iter()
                .filter(|n| n.labels.get(MANAGED_LABEL).map(String::as_str) == Some("1"))
                .cloned()
                .collect())
        }
        fn create_network(&self, name: &str, body: &Value) -> docker::Result<String> {
            self.log(format!("create network {name}"));
            let labels = serde_json::from_value(body["Labels"].clone()).expect("labels");
            let id = format!("net-{name}");
            self.networks.lock().expect("lock").push(NetworkSummary {
                id: id.clone(),
                name: name.to_owned(),
                labels,
            });
            Ok(id)
        }
        fn remove_network(&self, id: &str) -> docker::Result<()> {
            self.log(format!("remove network {id}"));
            self.networks.lock().expect("lock").retain(|n| n.id != id);
            Ok(())
        }
        fn connect_network(
            &self,
            network: &str,
            container: &str,
            aliases: &[String],
        ) -> docker::Result<()> {
            self.log(format!("connect {container} to {network} as {aliases:?}"));
            Ok(())
        }
    }

    /// Appends one ustar member (`typeflag` b'0' file, b'2' symlink to `link`, b'5' folder).
    fn tar_member(out: &mut Vec<u8>, name: &str, data: &[u8], mode: u32, typeflag: u8, link: &str) {
        let mut header = [0u8; 512];
        header[..name.len()].copy_from_slice(name.as_bytes());
        header[100..107].copy_from_slice(format!("{mode:07o}").as_bytes());
        header[108..115].copy_from_slice(b"0000000");
        header[116..123].copy_from_slice(b"0000000");
        header[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        header[136..147].copy_from_slice(b"00000000000");
        header[156] = typeflag;
        header[157..157 + link.len()].copy_from_slice(link.as_bytes());
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        header[148..156].copy_from_slice(b"        ");
        let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
        header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    /// Overwrites a header's size field and writes its checksum again.
    fn set_size_field(header: &mut [u8], size: &[u8; 12]) {
        header[124..136].copy_from_slice(size);
        header[148..156].copy_from_slice(b"        ");
        let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
        header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    }

    /// A minimal `docker save` archive: a layer, then manifest.json.
    fn archive_bytes(config_hex: &str, tag: &str) -> Vec<u8> {
        let mut out = Vec::new();
        tar_member(&mut out, "abc/layer.tar", &[7u8; 700], 0o644, b'0', "");
        let manifest = format!(
            r#"[{{"Config":"{config_hex}.json","RepoTags":["{tag}"],"Layers":["abc/layer.tar"]}}]"#
        );
        tar_member(
            &mut out,
            "manifest.json",
            manifest.as_bytes(),
            0o644,
            b'0',
            "",
        );
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    fn sha256_hex(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    /// A real `docker save`-format archive of a one-layer image holding a static busybox.
    fn busybox_archive(busybox: &[u8], tag: &str) -> Vec<u8> {
        let mut layer = Vec::new();
        tar_member(&mut layer, "bin/", &[], 0o755, b'5', "");
        tar_member(&mut layer, "bin/busybox", busybox, 0o755, b'0', "");
        tar_member(&mut layer, "bin/sh", &[], 0o777, b'2', "busybox");
        tar_member(&mut layer, "www/", &[], 0o755, b'5', "");
        layer.extend_from_slice(&[0u8; 1024]);
        let diff_id = sha256_hex(&layer);
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"] },
            "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
        })
        .to_string();
        let config_hex = sha256_hex(config.as_bytes());
        let manifest = json!([{
            "Config": format!("{config_hex}.json"),
            "RepoTags": [tag],
            "Layers": [format!("{diff_id}/layer.tar")],
        }])
        .to_string();
        let mut out = Vec::new();
        tar_member(
            &mut out,
            &format!("{diff_id}/layer.tar"),
            &layer,
            0o644,
            b'0',
            "",
        );
        tar_member(
            &mut out,
            &format!("{config_hex}.json"),
            config.as_bytes(),
            0o644,
            b'0',
            "",
        );
        tar_member(
            &mut out,
            "manifest.json",
            manifest.as_bytes(),
            0o644,
            b'0',
            "",
        );
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    /// Reconciliation against a real dockerd: load a baked archive, create, keep, recreate on a
    /// changed declaration, wait for the health check (which reads a bind-mounted file), stop and
    /// remove. Needs `PLINTH_TEST_DOCKER_SOCKET` (a dockerd, networking may be off) and
    /// `PLINTH_TEST_BUSYBOX` (a static busybox, e.g. from Debian's busybox-static).
    /// Real-engine tests remove every managed container, so they run one at a time.
    static REAL_ENGINE: Mutex<()> = Mutex::new(());

    #[test]
    #[ignore = "needs a running dockerd: set PLINTH_TEST_DOCKER_SOCKET and PLINTH_TEST_BUSYBOX"]
    fn reconcile_against_a_real_engine() {
        let _serial = REAL_ENGINE.lock().unwrap_or_else(|e| e.into_inner());
        let socket = std::env::var("PLINTH_TEST_DOCKER_SOCKET")
            .expect("PLINTH_TEST_DOCKER_SOCKET names the engine socket");
        let busybox = std::fs::read(
            std::env::var("PLINTH_TEST_BUSYBOX")
                .expect("PLINTH_TEST_BUSYBOX names a static busybox"),
        )
        .expect("reading busybox");
        let client = docker::Client::new(socket);
        client
            .wait_ready(Duration::from_secs(10))
            .expect("engine answers");
        let dir = tempfile::tempdir().expect("tempdir");
        let options = Options {
            images_dir: dir.path().join("images"),
            host_root: PathBuf::from("/"),
            ..Options::default()
        };
        std::fs::create_dir_all(&options.images_dir).expect("mkdir");
        let tag = "plinth-test/busybox:1";
        std::fs::write(
            options.images_dir.join("plinth-web.tar"),
            busybox_archive(&busybox, tag),
        )
        .expect("writing archive");
        let www = format!("/var/tmp/plinth-engine-test-{}", std::process::id());
        std::fs::create_dir_all(&www).expect("mkdir www");
        std::fs::write(format!("{www}/index.html"), "hello\n").expect("index");
        let mut decl = web();
        decl.name = Name::parse("plinth-web").expect("name");
        decl.image = tag.to_owned();
        decl.build = Some(ImageBuild {
            packages: vec!["busybox-static".into()],
        });
        decl.ports.clear();
        decl.command = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
            .map(String::from)
            .to_vec();
        decl.mounts = vec![format!("{www}:/www")];
        decl.health = Some(HealthCheck {
            command: [
                "/bin/busybox",
                "wget",
                "-q",
                "-O",
                "/dev/null",
                "http://127.0.0.1:8080/index.html",
            ]
            .map(String::from)
            .to_vec(),
            interval: ConfigDuration(Duration::from_secs(1)),
            retries: 3,
        });
        let lines = Mutex::new(Vec::new());
        let sink = |line: &str| lines.lock().expect("lock").push(line.to_owned());

        let report = reconcile(&client, &[], &[], &options, &sink).expect("clean slate");
        assert!(report.failed.is_empty(), "{report:?}");
        let one = std::slice::from_ref(&decl);
        let timed = |what: &str| {
            let start = std::time::Instant::now();
            let report = reconcile(&client, one, &[], &options, &sink).expect("reconcile");
            eprintln!("{what}: {:?}", start.elapsed());
            assert!(report.warnings.is_empty(), "{report:?}");
            report
        };
        let report = timed("load, create, start");
        assert_eq!(report.created, ["plinth-web"], "{report:?}");
        let report = timed("keep");
        assert_eq!(report.kept, ["plinth-web"], "{report:?}");
        decl.env.insert("CHANGED".into(), "1".into());
        let one = std::slice::from_ref(&decl);
        let start = std::time::Instant::now();
        let report = reconcile(&client, one, &[], &options, &sink).expect("reconcile");
        eprintln!("recreate: {:?}", start.elapsed());
        assert_eq!(report.recreated, ["plinth-web"], "{report:?}");
        assert!(report.warnings.is_empty(), "{report:?}");
        let start = std::time::Instant::now();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let state = super::health(&client, std::slice::from_ref(&decl)).expect("health");
            if state.is_healthy() {
                eprintln!("healthy after {:?}", start.elapsed());
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never healthy: {state:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let stop = stop_all(&client, Duration::from_secs(5)).expect("stop");
        assert_eq!(stop.stopped, ["plinth-web"], "{stop:?}");
        let report = reconcile(&client, &[], &[], &options, &sink).expect("remove");
        assert_eq!(report.removed, ["plinth-web"], "{report:?}");
        std::fs::remove_dir_all(&www).expect("cleanup");
        assert_eq!(
            lines.lock().expect("lock").as_slice(),
            ["PLINTH-STATUS container-started name=plinth-web"; 3]
        );
    }

    #[test]
    fn tar_reader_follows_pax_and_gnu_extensions() {
        let mut out = Vec::new();
        // A PAX header renaming the next member and giving its real size.
        let pax = b"22 path=manifest.json\n10 size=5\n";
        tar_member(&mut out, "PaxHeaders/x", pax, 0o644, b'x', "");
        let start = out.len();
        tar_member(&mut out, "truncated-nam", b"[1,2]", 0o644, b'0', "");
        // Only the PAX record carries the size (as for members over 8 GiB).
        set_size_field(&mut out[start..start + 512], b"00000000000\0");
        let mut cursor = Cursor::new(out.clone());
        assert_eq!(
            super::tar_member(&mut cursor, "manifest.json").expect("reads"),
            Some(b"[1,2]".to_vec())
        );
        // A GNU long name, then a member whose size is in base-256.
        let mut out = Vec::new();
        tar_member(
            &mut out,
            "././@LongLink",
            b"manifest.json\0",
            0o644,
            b'L',
            "",
        );
        let start = out.len();
        tar_member(&mut out, "x", b"[3]", 0o644, b'0', "");
        set_size_field(
            &mut out[start..start + 512],
            &[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3],
        );
        let mut cursor = Cursor::new(out);
        assert_eq!(
            super::tar_member(&mut cursor, "manifest.json").expect("reads"),
            Some(b"[3]".to_vec())
        );
    }

    #[test]
    fn archive_manifest_gives_image_id() {
        let hex = "a".repeat(64);
        let bytes = archive_bytes(&hex, "web:1");
        let (id, tags) = archive_image(&mut Cursor::new(&bytes), "web:1").expect("parses");
        assert_eq!(id, format!("sha256:{hex}"));
        assert_eq!(tags, ["web:1"]);
        let err = archive_image(&mut Cursor::new(vec![0u8; 1024]), "web:1").expect_err("empty");
        assert!(err.to_string().contains("manifest.json"), "{err}");
        assert_eq!(normalise_reference("busybox"), "busybox:latest");
        assert_eq!(normalise_reference("a/b@sha256:00"), "a/b@sha256:00");
    }

    #[test]
    fn an_image_without_an_archive_of_its_own_comes_from_a_baked_archive_before_a_pull() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = Options {
            images_dir: dir.path().join("images"),
            host_root: dir.path().join("root"),
            ..Options::default()
        };
        std::fs::create_dir_all(&options.images_dir).expect("mkdir");
        let hex = "c".repeat(64);
        std::fs::write(
            options.images_dir.join("web.tar"),
            archive_bytes(&hex, "plinth/busybox:1"),
        )
        .expect("write archive");
        std::fs::write(
            options.images_dir.join("other.tar"),
            archive_bytes(&"d".repeat(64), "other:1"),
        )
        .expect("write archive");
        let engine = FakeEngine::default();
        // A user-data container: no archive or build of its own, the image the OS image carries.
        let mut extra = web();
        extra.name = Name::parse("extra").expect("name");
        extra.image = "plinth/busybox:1".into();
        let id = ensure_image(&engine, &extra, &options).expect("loaded from web.tar");
        assert_eq!(id, format!("sha256:{hex}"));
        assert_eq!(engine.calls(), ["load web.tar"]);
        // An image no archive carries is pulled (and fails here: the fake registry is empty).
        extra.image = "absent:2".into();
        let err = ensure_image(&engine, &extra, &options).expect_err("not pullable");
        assert!(err.contains("manifest unknown"), "{err}");
        assert_eq!(engine.calls(), ["load web.tar", "pull absent:2"]);
    }

    #[test]
    fn reconcile_keeps_recreates_creates_and_removes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = Options {
            images_dir: dir.path().join("images"),
            host_root: dir.path().join("root"),
            ..Options::default()
        };
        std::fs::create_dir_all(&options.images_dir).expect("mkdir");
        let hex = "b".repeat(64);
        std::fs::write(
            options.images_dir.join("baked.tar"),
            archive_bytes(&hex, "baked:1"),
        )
        .expect("write archive");

        let kept = web();
        let mut changed = web();
        changed.name = Name::parse("changed").expect("name");
        changed.ports.clear();
        let mut baked = web();
        baked.name = Name::parse("baked").expect("name");
        baked.image = "baked:1".into();
        baked.build = Some(ImageBuild {
            packages: vec!["busybox-static".into()],
        });
        baked.ports.clear();
        let mut missing = web();
        missing.name = Name::parse("nopull").expect("name");
        missing.image = "absent:1".into();

        let old_changed = {
            let mut c = changed.clone();
            c.env.clear();
            c
        };
        let engine = FakeEngine {
            containers: Mutex::new(vec![
                summary(
                    "web",
                    &[(MANAGED_LABEL, "1"), (SPEC_LABEL, &spec_hash(&kept))],
                    "sha256:bb",
                    "exited",
                ),
                summary(
                    "changed",
                    &[(MANAGED_LABEL, "1"), (SPEC_LABEL, &spec_hash(&old_changed))],
                    "sha256:bb",
                    "running",
                ),
                summary(
                    "old",
                    &[(MANAGED_LABEL, "1"), (SPEC_LABEL, "x")],
                    "sha256:bb",
                    "running",
                ),
                summary("admin", &[], "sha256:bb", "running"),
            ]),
            images: Mutex::new(BTreeMap::from([(
                "busybox:1.36".into(),
                "sha256:bb".into(),
            )])),
            ..Default::default()
        };
        let lines = RefCell::new(Vec::new());
        let sink = |line: &str| lines.borrow_mut().push(line.to_owned());
        let decls = [kept, changed, baked, missing];
        let report = reconcile(&engine, &decls, &[], &options, &sink).expect("reconcile");

        assert_eq!(report.kept, ["web"]);
        assert_eq!(report.recreated, ["changed"]);
        assert_eq!(report.created, ["baked"]);
        assert_eq!(report.removed, ["old"]);
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.failed[0].0, "nopull");
        assert!(
            report.failed[0].1.contains("manifest unknown"),
            "{:?}",
            report.failed
        );
        assert_eq!(
            engine.calls(),
            [
                "remove id-old",
                "start id-web",
                "remove id-changed",
                "create changed",
                "start id-changed",
                "load baked.tar",
                "create baked",
                "start id-baked",
                "pull absent:1",
                "prune",
            ]
        );
        assert_eq!(report.pruned_bytes, 42);
        assert_eq!(
            report.to_string(),
            "kept 1, created 1, recreated 1, removed 1, failed 1; nopull: pulling image absent:1: manifest unknown"
        );
        assert_eq!(
            *lines.borrow(),
            [
                "PLINTH-STATUS container-started name=web",
                "PLINTH-STATUS container-started name=changed",
                "PLINTH-STATUS container-started name=baked",
                "PLINTH-STATUS container-failed name=nopull reason=\"pulling image absent:1: manifest unknown\"",
            ]
        );
        assert!(
            dir.path().join("root/var/lib/web").is_dir(),
            "mount folder created"
        );
        let baked_id = engine.images.lock().expect("lock")["baked:1"].clone();
        assert_eq!(baked_id, format!("sha256:{hex}"));

        // A second run with nothing changed keeps everything and loads nothing.
        engine.calls.lock().expect("lock").clear();
        let report = reconcile(&engine, &decls[..3], &[], &options, &sink).expect("reconcile");
        assert_eq!(report.kept, ["web", "changed", "baked"]);
        assert!(report.all_running());
        assert_eq!(
            engine.calls(),
            ["start id-web", "start id-changed", "start id-baked"]
        );

        let health = health(&engine, &decls).expect("health");
        assert!(!health.is_healthy());
        assert_eq!(
            health.first_problem().map(|c| (c.name.as_str(), &c.health)),
            Some(("nopull", &ContainerHealth::Missing))
        );
        assert!(super::health(&engine, &decls[..3])
            .expect("health")
            .is_healthy());

        engine.calls.lock().expect("lock").clear();
        let stop = stop_all(&engine, Duration::from_secs(1)).expect("stop");
        assert_eq!(stop.stopped, ["web", "changed", "baked"]);
        assert!(stop.failed.is_empty());
        assert_eq!(
            engine.calls().len(),
            3,
            "admin is not ours: {:?}",
            engine.calls()
        );
    }

    #[test]
    fn reconcile_makes_networks_first_and_starts_dependencies_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = Options {
            images_dir: dir.path().join("images"),
            host_root: dir.path().join("root"),
            dependency_timeout: Duration::from_millis(50),
            dependency_poll: Duration::from_millis(10),
        };
        let network = |name: &str| ContainerNetwork {
            name: Name::parse(name).expect("name"),
            driver: NetworkDriver::Bridge,
            internal: false,
            attachable: false,
            subnet: None,
        };
        let mut app = web();
        app.name = Name::parse("app").expect("name");
        app.ports.clear();
        app.networks = everything().networks;
        app.depends_on = vec![Name::parse("db").expect("name")];
        let mut db = web();
        db.name = Name::parse("db").expect("name");
        db.ports.clear();
        db.networks = vec![NetworkAttachment::Name(Name::parse("back").expect("name"))];
        let networks = [network("back"), network("front")];
        let engine = FakeEngine {
            containers: Mutex::new(vec![summary(
                "gone",
                &[(MANAGED_LABEL, "1"), (SPEC_LABEL, "x")],
                "sha256:bb",
                "running",
            )]),
            networks: Mutex::new(vec![
                NetworkSummary {
                    id: "net-old".into(),
                    name: "old".into(),
                    labels: BTreeMap::from([(MANAGED_LABEL.into(), "1".into())]),
                },
                NetworkSummary {
                    id: "net-admin".into(),
                    name: "admin".into(),
                    labels: BTreeMap::new(),
                },
            ]),
            images: Mutex::new(BTreeMap::from([(
                "busybox:1.36".into(),
                "sha256:bb".into(),
            )])),
            ..Default::default()
        };
        let sink = |_: &str| {};
        // `app` is declared first but depends on `db`.
        let decls = [app.clone(), db.clone()];
        let report = reconcile(&engine, &decls, &networks, &options, &sink).expect("reconcile");
        assert_eq!(report.created, ["db", "app"], "{report:?}");
        assert_eq!(report.networks_created, ["back", "front"]);
        assert_eq!(report.networks_removed, ["old"]);
        assert!(report.warnings.is_empty(), "{report:?}");
        assert_eq!(
            engine.calls(),
            [
                "remove id-gone",
                "create network back",
                "create network front",
                "create db",
                "start id-db",
                "create app",
                "connect id-app to front as []",
                "start id-app",
                "remove network net-old",
                "prune",
            ]
        );

        // Unchanged: nothing is created; a changed network is made again, and the declared
        // container on it with it.
        engine.calls.lock().expect("lock").clear();
        let mut internal = networks.clone();
        internal[1].internal = true;
        let report = reconcile(&engine, &decls, &internal, &options, &sink).expect("reconcile");
        assert_eq!(report.kept, ["db"], "{report:?}");
        assert_eq!(report.recreated, ["app"], "{report:?}");
        assert_eq!(report.networks_created, ["front"]);
        assert_eq!(
            engine.calls(),
            [
                "remove id-app",
                "remove network net-front",
                "create network front",
                "start id-db",
                "create app",
                "connect id-app to front as []",
                "start id-app",
                "prune",
            ]
        );

        // A dependency that never comes up: the dependent waits (bounded), then starts anyway.
        engine.calls.lock().expect("lock").clear();
        let stuck = FakeEngine {
            images: Mutex::new(BTreeMap::from([(
                "busybox:1.36".into(),
                "sha256:bb".into(),
            )])),
            fail_start: Some("id-db".into()),
            ..Default::default()
        };
        let report = reconcile(&stuck, &decls, &networks, &options, &sink).expect("reconcile");
        assert_eq!(report.failed.len(), 1, "{report:?}");
        assert_eq!(report.created, ["app"]);
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.contains("without its dependency db")),
            "{report:?}"
        );
    }

    #[test]
    fn container_exiting_at_start_is_reported_failed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = Options {
            images_dir: dir.path().join("images"),
            host_root: dir.path().to_path_buf(),
            ..Options::default()
        };
        let engine = FakeEngine {
            images: Mutex::new(BTreeMap::from([(
                "busybox:1.36".into(),
                "sha256:bb".into(),
            )])),
            fail_start: Some("id-web".into()),
            ..Default::default()
        };
        let lines = RefCell::new(Vec::new());
        let sink = |line: &str| lines.borrow_mut().push(line.to_owned());
        let report = reconcile(&engine, &[web()], &[], &options, &sink).expect("reconcile");
        assert!(!report.all_running());
        assert!(
            lines.borrow()[0].starts_with(
                "PLINTH-STATUS container-failed name=web reason=\"exited right after start"
            ),
            "{:?}",
            lines.borrow()
        );
    }

    /// Pulling a declared image from a registry, and a clear failure for a tag that does not
    /// exist. Needs `PLINTH_TEST_DOCKER_SOCKET` and `PLINTH_TEST_REGISTRY_IMAGE`, a busybox image
    /// reference on a registry at 127.0.0.1 (e.g. `127.0.0.1:5000/plinth-test/busybox:1`).
    #[test]
    #[ignore = "needs dockerd and a registry: set PLINTH_TEST_DOCKER_SOCKET and PLINTH_TEST_REGISTRY_IMAGE"]
    fn pull_against_a_real_registry() {
        let _serial = REAL_ENGINE.lock().unwrap_or_else(|e| e.into_inner());
        let socket = std::env::var("PLINTH_TEST_DOCKER_SOCKET")
            .expect("PLINTH_TEST_DOCKER_SOCKET names the engine socket");
        let image = std::env::var("PLINTH_TEST_REGISTRY_IMAGE")
            .expect("PLINTH_TEST_REGISTRY_IMAGE names an image on a registry at 127.0.0.1");
        assert!(
            image.starts_with("127.0.0.1:"),
            "tests talk only to 127.0.0.1"
        );
        let client = docker::Client::new(socket);
        client
            .wait_ready(Duration::from_secs(10))
            .expect("engine answers");
        client.remove_image(&image).expect("removing a cached copy");
        let mut decl = web();
        decl.name = Name::parse("plinth-pulled").expect("name");
        decl.image = image.clone();
        decl.ports.clear();
        decl.mounts.clear();
        decl.health = None;
        decl.command = ["/bin/busybox", "sleep", "600"].map(String::from).to_vec();
        let (name, _) = docker::split_reference(&image);
        let mut missing = decl.clone();
        missing.name = Name::parse("plinth-missing").expect("name");
        missing.image = format!("{name}:no-such-tag");
        let lines = Mutex::new(Vec::new());
        let sink = |line: &str| lines.lock().expect("lock").push(line.to_owned());
        let options = Options::default();
        let report =
            reconcile(&client, &[decl.clone(), missing], &[], &options, &sink).expect("reconcile");
        assert_eq!(report.created, ["plinth-pulled"], "{report:?}");
        assert!(
            client.inspect_image(&image).expect("inspect").is_some(),
            "pulled"
        );
        assert_eq!(report.failed.len(), 1, "{report:?}");
        let line = lines.lock().expect("lock")[1].clone();
        assert!(
            line.starts_with(
                "PLINTH-STATUS container-failed name=plinth-missing reason=\"pulling image"
            ),
            "{line}"
        );
        let report = reconcile(&client, &[], &[], &options, &sink).expect("cleanup");
        assert_eq!(report.removed, ["plinth-pulled"], "{report:?}");
    }

    #[test]
    fn crash_looping_container_is_not_healthy() {
        let mut plain = web();
        plain.health = None;
        let engine = FakeEngine {
            containers: Mutex::new(vec![summary(
                "web",
                &[(MANAGED_LABEL, "1")],
                "sha256:bb",
                "restarting",
            )]),
            ..Default::default()
        };
        let state = health(&engine, &[plain]).expect("health");
        assert_eq!(
            state.containers[0].health,
            ContainerHealth::NotRunning("restarting".into())
        );
        assert_eq!(state.containers[0].name, "web");
        let stop = stop_all(&engine, Duration::from_secs(1)).expect("stop");
        assert_eq!(
            stop.stopped,
            ["web"],
            "a restarting container is stopped too"
        );
    }
}
