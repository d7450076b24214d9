//! Cloud user data: what one instance of an image changes in the image's definition at boot.
//!
//! `plinth-init` fetches the instance's user data (QEMU fw_cfg, a NoCloud volume, a cloud's
//! metadata service) and hands the bytes to [`classify`]. Data meant for other tools (a
//! `#cloud-config` file, a script, a MIME multipart) is [`UserDataKind::Foreign`] and ignored;
//! anything else is Plinth's own TOML, [`UserData`], which [`UserData::apply`] lays over the baked
//! definition. The result is checked by every definition rule, so user data can do nothing a
//! definition could not. User data may not change where updates come from or which keys are
//! trusted, nor bake container archives, which only exist at build time.
//!
//! The accepted user data is kept at `/run/`[`USER_DATA_IN_RUN`] for later stages (the update
//! agent), which read the machine's definition through [`effective_definition`].

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::definition::{
    Container, ContainerNetwork, Definition, EngineTlsFiles, FleetLock, Network, Service, Swarm,
    Time, UpdateStrategy, Window, ENGINE_TLS_IN_RUN,
};
use crate::diagnostic::{DefinitionError, KeyPath};
use crate::units::{Duration, Name};
use crate::validate::Problem;

/// Where `plinth-init` writes the accepted user data, relative to `/run`.
pub const USER_DATA_IN_RUN: &str = "plinth/user-data.toml";

/// The QEMU fw_cfg item plinth-init reads user data from (`-fw_cfg name=…,file=…`; `plinth run
/// --user-data` passes it).
pub const FW_CFG_USER_DATA: &str = "opt/plinth/user-data";

/// What a user-data blob is.
// Made once per boot and taken apart at once: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum UserDataKind {
    /// Plinth's own user data, parsed and checked on its own (not yet against the image).
    Plinth(UserData),
    /// Data for another tool, named by its kind (`cloud-config`, `script`, `mime-multipart`, …):
    /// the caller reports it as ignored.
    Foreign(&'static str),
    /// Nothing, or only white space.
    Empty,
}

/// Openings of the formats other tools read (cloud-init's and Windows agents'), longest first
/// where one is the start of another.
const FOREIGN_PREFIXES: [(&[u8], &str); 15] = [
    (b"#cloud-config-archive", "cloud-config-archive"),
    (b"#cloud-config-jsonp", "cloud-config-jsonp"),
    (b"#cloud-config", "cloud-config"),
    (b"#cloud-boothook", "cloud-boothook"),
    (b"#include-once", "include"),
    (b"#include", "include"),
    (b"#part-handler", "part-handler"),
    (b"#upstart-job", "upstart-job"),
    (b"## template:", "jinja-template"),
    (b"#ps1", "powershell"),
    (b"<powershell>", "powershell"),
    (b"<script>", "windows-script"),
    (b"<?xml", "xml"),
    (b"#!", "script"),
    (b"{", "json"),
];

/// MIME headers, matched without regard to case.
const MIME_PREFIXES: [&[u8]; 2] = [b"content-type:", b"mime-version:"];

/// The gzip magic number.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Tells Plinth's user data from other tools' and parses it. `file` names the source in errors,
/// which carry `file:line:col` like [`Definition::parse`]'s.
pub fn classify(file: &str, bytes: &[u8]) -> Result<UserDataKind, DefinitionError> {
    if bytes.starts_with(&GZIP_MAGIC) {
        return Ok(UserDataKind::Foreign("gzip"));
    }
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let head = &bytes[start..];
    if head.is_empty() {
        return Ok(UserDataKind::Empty);
    }
    if let Some((_, kind)) = FOREIGN_PREFIXES.iter().find(|(p, _)| head.starts_with(p)) {
        return Ok(UserDataKind::Foreign(kind));
    }
    let mime = MIME_PREFIXES
        .iter()
        .any(|p| head.len() >= p.len() && head[..p.len()].eq_ignore_ascii_case(p));
    if mime {
        return Ok(UserDataKind::Foreign("mime-multipart"));
    }
    UserData::parse_bytes(file, bytes).map(UserDataKind::Plinth)
}

/// Plinth's user data: every key optional, each one laid over the image's definition by
/// [`UserData::apply`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UserData {
    /// The machine's host name, in place of the image's.
    pub hostname: Option<Name>,
    /// Replaces the image's `[network]` as a whole.
    pub network: Option<Network>,
    /// Changes to `[engine]`.
    pub engine: Option<UserEngine>,
    /// Changes to how updates are applied (not where they come from).
    pub update: Option<UserUpdate>,
    /// `[[container]]`: one with the name of an image container replaces it; others are added.
    #[serde(default, rename = "container")]
    pub containers: Vec<Container>,
    /// Replaces the image's `[time]` as a whole.
    pub time: Option<Time>,
    /// `[[container-network]]`: one with the name of an image network replaces it; others are
    /// added.
    #[serde(default, rename = "container-network")]
    pub container_networks: Vec<ContainerNetwork>,
    /// Replaces the image's `[swarm]` as a whole.
    pub swarm: Option<Swarm>,
    /// `[[service]]`: one with the name of an image service replaces it; others are added.
    #[serde(default, rename = "service")]
    pub services: Vec<Service>,
}

/// `[engine]` in user data.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UserEngine {
    /// Merged key by key over the image's `[engine] settings`: a top-level key given here
    /// replaces the image's value of that key.
    #[serde(default)]
    pub settings: toml::Table,
    /// Mutual TLS for the engine's API, as PEM text; `plinth-init` writes it to
    /// [`ENGINE_TLS_IN_RUN`], where it takes the place of the image's `[engine] tls`.
    pub tls: Option<EngineTlsPem>,
    /// Replaces the image's `[engine] insecure-tcp`.
    pub insecure_tcp: Option<bool>,
}

/// `[engine] tls` in user data: the PEM text itself, since user data comes with no files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EngineTlsPem {
    /// CA certificates a client's certificate must chain to.
    pub ca: String,
    /// The engine's certificate (chain).
    pub cert: String,
    /// The engine's private key.
    pub key: String,
}

/// `[update]` in user data: how and when updates are applied. `url`, `keys` and `ca` (where
/// updates come from and who is trusted) are read only to be refused with a reason.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UserUpdate {
    pub channel: Option<Name>,
    pub strategy: Option<UpdateStrategy>,
    pub window: Option<Window>,
    pub fleetlock: Option<FleetLock>,
    pub interval: Option<Duration>,
    pub bless_after: Option<Duration>,
    pub bless_timeout: Option<Duration>,
    /// Refused: user data may not change where updates come from.
    #[serde(default, skip_serializing)]
    pub url: Option<toml::Value>,
    /// Refused: user data may not change which keys are trusted.
    #[serde(default, skip_serializing)]
    pub keys: Option<toml::Value>,
    /// Refused: user data may not change which servers are trusted.
    #[serde(default, skip_serializing)]
    pub ca: Option<toml::Value>,
}

/// Where a container of the merged definition came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Image(usize),
    UserData(usize),
}

/// Where the merged definition's containers, networks and services came from.
struct Origins {
    containers: Vec<Origin>,
    networks: Vec<Origin>,
    services: Vec<Origin>,
}

impl UserData {
    /// Parses and checks user data on its own (PEM text, refused keys). `file` names the source
    /// in errors, located at `file:line:col`.
    pub fn parse(file: &str, source: &str) -> Result<UserData, DefinitionError> {
        let data: UserData = DefinitionError::from_toml(file, source)?;
        data.check()
            .map_err(|problem| locate(file, source, &problem))?;
        Ok(data)
    }

    /// [`UserData::parse`] of bytes, which must be UTF-8.
    pub fn parse_bytes(file: &str, bytes: &[u8]) -> Result<UserData, DefinitionError> {
        UserData::parse(file, crate::diagnostic::decode(file, bytes)?)
    }

    /// The rules user data follows before it meets an image.
    fn check(&self) -> Result<(), Problem> {
        if let Some(update) = &self.update {
            let path = KeyPath::root("update");
            let refused = [
                ("url", update.url.is_some(), "where updates come from"),
                (
                    "keys",
                    update.keys.is_some(),
                    "which release keys are trusted",
                ),
                (
                    "ca",
                    update.ca.is_some(),
                    "which update servers are trusted",
                ),
            ];
            for (key, given, what) in refused {
                if given {
                    return Err(problem(
                        path.key(key).at_key(),
                        format!("user data may not change {what}: `{key}` is fixed by the image (its [update] {key}); user data may set channel, strategy, window, fleetlock, interval, bless-after and bless-timeout"),
                    ));
                }
            }
        }
        for (i, c) in self.containers.iter().enumerate() {
            let path = KeyPath::root("container").index(i);
            for (key, given) in [
                ("archive", c.archive.is_some()),
                ("build", c.build.is_some()),
            ] {
                if given {
                    return Err(problem(
                        path.key(key).at_key(),
                        format!("container `{}`: user data cannot use `{key}`, which is resolved when the image is built; give an `image` the engine pulls from a registry", c.name),
                    ));
                }
            }
        }
        if let Some(tls) = self.engine.as_ref().and_then(|e| e.tls.as_ref()) {
            let path = KeyPath::root("engine").key("tls");
            pem(&tls.ca, "CERTIFICATE", &path.key("ca"))?;
            pem(&tls.cert, "CERTIFICATE", &path.key("cert"))?;
            pem(&tls.key, "PRIVATE KEY", &path.key("key"))?;
        }
        Ok(())
    }

    /// The definition `def` becomes with this user data laid over it, checked by every definition
    /// rule. Errors name the user-data key at fault (`container[1].ports[0]: …`). Does not write
    /// anything: the engine TLS PEMs are only referred to at [`ENGINE_TLS_IN_RUN`], where the
    /// caller writes them.
    pub fn apply(&self, def: &Definition) -> Result<Definition, String> {
        self.merge(def)
            .map_err(|p| format!("{}: {}", first_path(&p), p.message))
    }

    /// [`UserData::apply`], with errors as user-data key paths.
    fn merge(&self, def: &Definition) -> Result<Definition, Problem> {
        self.check()?;
        let mut merged = def.clone();
        if let Some(hostname) = &self.hostname {
            merged.image.hostname = Some(hostname.clone());
        }
        if let Some(network) = &self.network {
            merged.network = network.clone();
        }
        if let Some(time) = &self.time {
            merged.time = time.clone();
        }
        if let Some(swarm) = &self.swarm {
            merged.swarm = Some(swarm.clone());
        }
        if let Some(engine) = &self.engine {
            for (key, value) in &engine.settings {
                merged.engine.settings.insert(key.clone(), value.clone());
            }
            if engine.tls.is_some() {
                let run = Path::new(ENGINE_TLS_IN_RUN);
                merged.engine.tls = Some(EngineTlsFiles {
                    ca: run.join("ca.pem"),
                    cert: run.join("cert.pem"),
                    key: run.join("key.pem"),
                });
            }
            if let Some(insecure) = engine.insecure_tcp {
                merged.engine.insecure_tcp = insecure;
            }
        }
        if let Some(update) = &self.update {
            update.apply(&mut merged)?;
        }
        let origins = self.merge_containers(&mut merged);
        let network_origins = self.merge_networks(&mut merged);
        let service_origins = self.merge_services(&mut merged);
        crate::validate::definition(&merged).map_err(|p| {
            self.rename(
                p,
                &Origins {
                    containers: origins,
                    networks: network_origins,
                    services: service_origins,
                },
            )
        })?;
        Ok(merged)
    }

    /// Replaces or adds the user-data containers; returns where each merged container came from.
    fn merge_containers(&self, merged: &mut Definition) -> Vec<Origin> {
        let mut origins: Vec<Origin> = (0..merged.containers.len()).map(Origin::Image).collect();
        for (j, container) in self.containers.iter().enumerate() {
            let existing = merged
                .containers
                .iter()
                .position(|c| c.name == container.name);
            match existing {
                Some(i) => {
                    merged.containers[i] = container.clone();
                    origins[i] = Origin::UserData(j);
                }
                None => {
                    merged.containers.push(container.clone());
                    origins.push(Origin::UserData(j));
                }
            }
        }
        origins
    }

    /// Replaces or adds the user-data networks; returns where each merged network came from.
    fn merge_networks(&self, merged: &mut Definition) -> Vec<Origin> {
        let networks = &mut merged.container_networks;
        let mut origins: Vec<Origin> = (0..networks.len()).map(Origin::Image).collect();
        for (j, network) in self.container_networks.iter().enumerate() {
            match networks.iter().position(|n| n.name == network.name) {
                Some(i) => {
                    networks[i] = network.clone();
                    origins[i] = Origin::UserData(j);
                }
                None => {
                    networks.push(network.clone());
                    origins.push(Origin::UserData(j));
                }
            }
        }
        origins
    }

    /// Replaces or adds the user-data services; returns where each merged service came from.
    fn merge_services(&self, merged: &mut Definition) -> Vec<Origin> {
        let services = &mut merged.services;
        let mut origins: Vec<Origin> = (0..services.len()).map(Origin::Image).collect();
        for (j, service) in self.services.iter().enumerate() {
            match services.iter().position(|s| s.name == service.name) {
                Some(i) => {
                    services[i] = service.clone();
                    origins[i] = Origin::UserData(j);
                }
                None => {
                    services.push(service.clone());
                    origins.push(Origin::UserData(j));
                }
            }
        }
        origins
    }

    /// Turns a problem of the merged definition into one named by user-data keys.
    fn rename(&self, mut problem: Problem, origins: &Origins) -> Problem {
        let mut image_container = None;
        problem.paths = problem
            .paths
            .iter()
            .map(|path| match (path.root_key(), path.root_index()) {
                (Some("image"), _) => KeyPath::root("hostname"),
                (Some("container-network"), Some(i)) => match origins.networks.get(i) {
                    Some(Origin::UserData(j)) => path.with_root_index(*j),
                    _ => path.clone(),
                },
                (Some("service"), Some(i)) => match origins.services.get(i) {
                    Some(Origin::UserData(j)) => path.with_root_index(*j),
                    _ => path.clone(),
                },
                (Some("container"), Some(i)) => match origins.containers.get(i) {
                    Some(Origin::UserData(j)) => path.with_root_index(*j),
                    _ => {
                        image_container = Some(i);
                        path.clone()
                    }
                },
                _ => path.clone(),
            })
            .collect();
        if let Some(i) = image_container {
            problem.message = format!("(the image's container[{i}]) {}", problem.message);
        }
        problem
    }
}

impl UserUpdate {
    /// Lays these settings over the image's `[update]`. A strategy given without its window or
    /// lock server drops the image's, which only the image's strategy used.
    fn apply(&self, merged: &mut Definition) -> Result<(), Problem> {
        let Some(update) = merged.update.as_mut() else {
            return Err(problem(
                KeyPath::root("update"),
                "the image has no [update] table to override: user data can change how updates are applied, not add a source of updates".to_owned(),
            ));
        };
        if let Some(channel) = &self.channel {
            update.channel = channel.clone();
        }
        if let Some(strategy) = self.strategy {
            update.strategy = strategy;
            if strategy != UpdateStrategy::Window && self.window.is_none() {
                update.window = None;
            }
            if strategy != UpdateStrategy::Fleetlock && self.fleetlock.is_none() {
                update.fleetlock = None;
            }
        }
        if let Some(window) = &self.window {
            update.window = Some(window.clone());
        }
        if let Some(fleetlock) = &self.fleetlock {
            update.fleetlock = Some(fleetlock.clone());
        }
        if let Some(interval) = self.interval {
            update.interval = interval;
        }
        if let Some(bless_after) = self.bless_after {
            update.bless_after = bless_after;
        }
        if let Some(bless_timeout) = self.bless_timeout {
            update.bless_timeout = bless_timeout;
        }
        Ok(())
    }
}

/// PEM text with a `-----BEGIN … {label}-----` block (`CERTIFICATE`, or `PRIVATE KEY` of any
/// kind).
fn pem(text: &str, label: &str, path: &KeyPath) -> Result<(), Problem> {
    let found = match label {
        "CERTIFICATE" => text.contains("-----BEGIN CERTIFICATE-----"),
        _ => text.lines().any(|line| {
            let line = line.trim();
            line.starts_with("-----BEGIN") && line.ends_with("PRIVATE KEY-----")
        }),
    };
    if found {
        Ok(())
    } else {
        Err(problem(
            path.clone(),
            format!("expected PEM text with a `-----BEGIN {label}-----` block (the file's content, not its path)"),
        ))
    }
}

fn problem(path: KeyPath, message: String) -> Problem {
    Problem {
        paths: vec![path],
        message,
    }
}

/// What a problem that names no key is about.
const USER_DATA: &str = "user data";

fn first_path(problem: &Problem) -> String {
    problem
        .paths
        .first()
        .map_or_else(|| USER_DATA.to_owned(), ToString::to_string)
}

/// A problem located in `source` through its spans, named `key: message` (`user data: message`
/// when it names no key).
fn locate(file: &str, source: &str, problem: &Problem) -> DefinitionError {
    DefinitionError::locate(file, source, problem, Some(USER_DATA))
}

/// The definition a machine runs by: the image's (`image_toml`, the baked
/// `/usr/lib/plinth/image.toml`) with the user data at `user_data` (`/run/`[`USER_DATA_IN_RUN`])
/// applied when that file exists. Errors name the file at fault, with line and column.
pub fn effective_definition(
    image_toml: &Path,
    user_data: &Path,
) -> Result<Definition, DefinitionError> {
    let image_name = image_toml.display().to_string();
    let bytes = read(image_toml)?;
    let def = Definition::parse_bytes(&image_name, &bytes)?;
    let user_name = user_data.display().to_string();
    let bytes = match std::fs::read(user_data) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(def),
        Err(e) => return Err(io_error(user_data, &e)),
    };
    let source = crate::diagnostic::decode(&user_name, &bytes)?;
    let data = UserData::parse(&user_name, source)?;
    data.merge(&def).map_err(|problem| {
        let mut err = locate(&user_name, source, &problem);
        err.message = format!(
            "{} (applied over {image_name})",
            err.message.trim_end_matches('.')
        );
        err
    })
}

fn read(path: &Path) -> Result<Vec<u8>, DefinitionError> {
    std::fs::read(path).map_err(|e| io_error(path, &e))
}

fn io_error(path: &Path, e: &std::io::Error) -> DefinitionError {
    DefinitionError {
        file: path.display().to_string(),
        location: None,
        message: format!("cannot be read: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        crate::manifest::SecretKey::from_seed([7; 32])
            .public()
            .to_string()
    }

    /// An image with a container, engine settings and updates.
    fn image() -> Definition {
        let text = format!(
            "[image]\nname = \"demo\"\nversion = \"1.0\"\n\n[engine]\nsettings = {{ log-driver = \"local\", debug = false }}\n\n[update]\nurl = \"http://10.0.0.1/r\"\nkeys = [\"{}\"]\nstrategy = \"window\"\nwindow = {{ start = \"02:00\", length = \"1h\" }}\n\n[[container]]\nname = \"web\"\nimage = \"busybox:1\"\nports = [\"8080:80\"]\n\n[[container]]\nname = \"db\"\nimage = \"postgres:16\"\n",
            key()
        );
        Definition::parse("image.toml", &text).expect("image parses")
    }

    fn plinth(text: &str) -> UserData {
        match classify("user-data", text.as_bytes()) {
            Ok(UserDataKind::Plinth(data)) => data,
            other => panic!("not Plinth user data: {other:?}"),
        }
    }

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----\n";

    #[test]
    fn foreign_formats_are_recognised() {
        let cases: [(&[u8], &str); 16] = [
            (b"#cloud-config\nusers: []\n", "cloud-config"),
            (b"#cloud-config-archive\n- x\n", "cloud-config-archive"),
            (b"#!/bin/sh\necho hi\n", "script"),
            (b"#include\nhttp://x/\n", "include"),
            (
                b"Content-Type: multipart/mixed; boundary=x\n",
                "mime-multipart",
            ),
            (b"MIME-Version: 1.0\n", "mime-multipart"),
            (b"\x1f\x8b\x08\x00\x00\x00", "gzip"),
            (b"#cloud-boothook\n", "cloud-boothook"),
            (b"<?xml version=\"1.0\"?>", "xml"),
            (b"{\"hostname\": \"x\"}", "json"),
            (b"  \n{\"a\": 1}", "json"),
            (b"#ps1\nGet-Item\n", "powershell"),
            (b"<powershell>x</powershell>", "powershell"),
            (b"#part-handler\n", "part-handler"),
            (b"#upstart-job\n", "upstart-job"),
            (b"## template: jinja\n#cloud-config\n", "jinja-template"),
        ];
        for (bytes, kind) in cases {
            let got = classify("ud", bytes).expect("classified");
            assert_eq!(got, UserDataKind::Foreign(kind), "{bytes:?}");
        }
        assert_eq!(classify("ud", b"").expect("empty"), UserDataKind::Empty);
        assert_eq!(
            classify("ud", b" \n\t\n").expect("blank"),
            UserDataKind::Empty
        );
        let only_marker = plinth("#plinth\n");
        assert_eq!(only_marker, UserData::default());
    }

    #[test]
    fn plinth_user_data_is_laid_over_the_image() {
        let data = plinth(
            "#plinth\nhostname = \"node-7\"\n\n[engine]\nsettings = { debug = true, max-concurrent-downloads = 6 }\n\n[update]\nstrategy = \"immediate\"\nchannel = \"beta\"\n\n[time]\nservers = [\"10.0.0.1\"]\n\n[[container]]\nname = \"db\"\nimage = \"postgres:17\"\n\n[[container]]\nname = \"cache\"\nimage = \"redis:7\"\nports = [\"6379:6379\"]\n",
        );
        let merged = data.apply(&image()).expect("applies");
        assert_eq!(merged.hostname().as_str(), "node-7");
        let settings = &merged.engine.settings;
        assert_eq!(settings["debug"].as_bool(), Some(true));
        assert_eq!(settings["log-driver"].as_str(), Some("local"));
        assert_eq!(settings["max-concurrent-downloads"].as_integer(), Some(6));
        let update = merged.update.as_ref().expect("update");
        assert_eq!(update.strategy, UpdateStrategy::Immediate);
        assert_eq!(update.window, None, "the window went with its strategy");
        assert_eq!(update.channel.as_str(), "beta");
        assert_eq!(update.url, "http://10.0.0.1/r");
        let names: Vec<&str> = merged.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["web", "db", "cache"]);
        assert_eq!(merged.containers[1].image, "postgres:17");
        assert_eq!(merged.containers[2].ports, ["6379:6379"]);
        assert_eq!(merged.time.servers, ["10.0.0.1"]);
        assert_eq!(merged.engine.tls, None);
    }

    #[test]
    fn engine_tls_pem_is_checked_and_points_at_run() {
        let tls = |ca: &str, cert: &str, key: &str| {
            format!("[engine]\nsettings = {{ hosts = [\"tcp://0.0.0.0:2376\"] }}\ntls = {{ ca = {ca:?}, cert = {cert:?}, key = {key:?} }}\n")
        };
        let merged = plinth(&tls(CERT, CERT, KEY))
            .apply(&image())
            .expect("tls applies");
        let files = merged.engine.tls.expect("tls files");
        assert_eq!(files.key, Path::new("/run/plinth/engine-tls/key.pem"));
        let cases = [
            (tls("ca.pem", CERT, KEY), "engine.tls.ca", "{ ca = "),
            (tls(CERT, KEY, KEY), "engine.tls.cert", ", cert = "),
            (tls(CERT, CERT, CERT), "engine.tls.key", ", key = "),
        ];
        for (text, key, before) in cases {
            let err = classify("ud", text.as_bytes()).expect_err(key);
            assert!(err.message.starts_with(key), "{err}");
            assert!(err.message.contains("PEM"), "{err}");
            // The value's opening quote, right after its key on the table's line.
            let line = text.lines().nth(2).expect("the tls line");
            let column = line.find(before).expect("key") + before.len() + 1;
            assert_eq!(err.location, Some((3, column)), "{err}");
        }
        let err = plinth("[engine]\nsettings = { hosts = [\"tcp://0.0.0.0:2375\"] }\n")
            .apply(&image())
            .expect_err("plain tcp from user data");
        assert!(err.starts_with("engine.settings.hosts[0]: "), "{err}");
        plinth("[engine]\nsettings = { hosts = [\"tcp://0.0.0.0:2375\"] }\ninsecure-tcp = true\n")
            .apply(&image())
            .expect("accepted explicitly");
    }

    #[test]
    fn errors_have_line_and_column() {
        let err = classify("ud", b"hostname = \"a\"\n[update]\nstratgy = \"manual\"\n")
            .expect_err("misspelt key");
        assert_eq!(err.location, Some((3, 1)), "{err}");
        assert!(err.message.contains("did you mean `strategy`?"), "{err}");
        assert!(err.to_string().starts_with("ud:3:1: "), "{err}");
        let err = classify("ud", b"[update]\ninterval = \"soon\"\n").expect_err("bad value");
        assert_eq!(err.location, Some((2, 12)), "{err}");
        let err = classify("ud", b"hostname = \"a\xff\"\n").expect_err("bad byte");
        assert_eq!(err.location, Some((1, 14)), "{err}");
        let err = classify("ud", b"[network\n").expect_err("bad toml");
        assert!(err.location.is_some(), "{err}");
    }

    #[test]
    fn update_sources_and_keys_are_refused() {
        for key in ["url", "keys", "ca"] {
            let text = format!("[update]\nchannel = \"beta\"\n{key} = \"x\"\n");
            let err = classify("ud", text.as_bytes()).expect_err(key);
            assert_eq!(err.location, Some((3, 1)), "{err}");
            assert!(err.message.contains("user data may not change"), "{err}");
            assert!(err.message.starts_with(&format!("update.{key}: ")), "{err}");
        }
        let mut no_update = image();
        no_update.update = None;
        let err = plinth("[update]\nstrategy = \"manual\"\n")
            .apply(&no_update)
            .expect_err("nothing to override");
        assert!(
            err.contains("the image has no [update] table to override"),
            "{err}"
        );
    }

    #[test]
    fn containers_from_user_data_are_checked_under_their_own_names() {
        let sha = "0".repeat(64);
        let text =
            format!("[[container]]\nname = \"x\"\nimage = \"x:1\"\narchive = {{ path = \"x.tar\", sha256 = \"{sha}\" }}\n");
        let err = classify("ud", text.as_bytes()).expect_err("archive");
        assert!(err.message.contains("container `x`"), "{err}");
        assert!(err.message.contains("`archive`"), "{err}");
        assert_eq!(err.location, Some((4, 1)), "{err}");
        let text =
            "[[container]]\nname = \"x\"\nimage = \"x:1\"\nbuild = { packages = [\"zsh\"] }\n";
        let err = classify("ud", text.as_bytes()).expect_err("build");
        assert!(err.message.contains("`build`"), "{err}");

        // A clash with the image's port is blamed on the user data's container, by its index.
        let data = plinth("[[container]]\nname = \"a\"\nimage = \"a:1\"\n\n[[container]]\nname = \"b\"\nimage = \"b:1\"\nports = [\"8080:80\"]\n");
        let err = data.apply(&image()).expect_err("port clash");
        assert!(err.starts_with("container[1].ports[0]: "), "{err}");
        assert!(err.contains("already published"), "{err}");
    }

    #[test]
    fn networks_from_user_data_are_merged_by_name() {
        let data = plinth("[[container-network]]\nname = \"back\"\ninternal = true\n\n[[container]]\nname = \"db\"\nimage = \"postgres:17\"\nnetworks = [\"back\"]\ndepends-on = [\"web\"]\n");
        let merged = data.apply(&image()).expect("applies");
        assert_eq!(merged.container_networks.len(), 1);
        assert!(merged.container_networks[0].internal);
        assert_eq!(merged.containers[1].networks[0].name().as_str(), "back");
        let bad = plinth(
            "[[container-network]]\nname = \"ok\"\n\n[[container-network]]\nname = \"none\"\n",
        );
        let err = bad.apply(&image()).expect_err("engine network name");
        assert!(err.starts_with("container-network[1].name: "), "{err}");
    }

    #[test]
    fn swarm_is_replaced_and_services_merged_by_name() {
        let mut with_swarm = image();
        let base = Definition::parse(
            "image.toml",
            "[image]\nname = \"demo\"\nversion = \"1.0\"\n\n[swarm]\nrole = \"manager\"\ninit = true\n\n[[container-network]]\nname = \"mesh\"\ndriver = \"overlay\"\n\n[[service]]\nname = \"web\"\nimage = \"nginx:1\"\nreplicas = 2\n\n[[service]]\nname = \"api\"\nimage = \"api:1\"\n",
        )
        .expect("image with services parses");
        with_swarm.swarm = base.swarm.clone();
        with_swarm.container_networks = base.container_networks.clone();
        with_swarm.services = base.services.clone();
        let data = plinth(
            "[swarm]\nrole = \"manager\"\njoin = [\"10.0.0.1:2377\"]\ntoken-file = \"/var/lib/swarm/token\"\nadvertise = \"eth0\"\n\n[[service]]\nname = \"api\"\nimage = \"api:2\"\nnetworks = [\"mesh\"]\n\n[[service]]\nname = \"cache\"\nimage = \"redis:7\"\nmode = \"global\"\n",
        );
        let merged = data.apply(&with_swarm).expect("applies");
        let swarm = merged.swarm.as_ref().expect("swarm");
        assert!(
            !swarm.init,
            "the instance's [swarm] replaces the image's whole"
        );
        assert_eq!(swarm.join, ["10.0.0.1:2377"]);
        let names: Vec<&str> = merged.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web", "api", "cache"]);
        assert_eq!(merged.services[0].replicas, Some(2));
        assert_eq!(merged.services[1].image, "api:2");
        assert_eq!(merged.services[1].networks[0].as_str(), "mesh");

        // A worker's [swarm] over an image with services: the image's service is blamed.
        let worker =
            plinth("[swarm]\nrole = \"worker\"\njoin = [\"m\"]\ntoken = \"SWMTKN-1-abc-def\"\n");
        let err = worker
            .apply(&with_swarm)
            .expect_err("services need a manager");
        assert!(err.starts_with("service[0].name: "), "{err}");
        assert!(err.contains("role = \"manager\""), "{err}");
        // A bad service of the user data is named by its own index.
        let bad = plinth("[[service]]\nname = \"ok\"\nimage = \"ok:1\"\n\n[[service]]\nname = \"x\"\nimage = \"x:1\"\nnetworks = [\"nope\"]\n");
        let err = bad.apply(&with_swarm).expect_err("undeclared network");
        assert!(err.starts_with("service[1].networks[0]: "), "{err}");
        // User data may add a swarm to an image that has none.
        let added = plinth("[swarm]\nrole = \"manager\"\ninit = true\n\n[[service]]\nname = \"w\"\nimage = \"w:1\"\n");
        let merged = added.apply(&image()).expect("swarm added");
        assert_eq!(merged.services.len(), 1);
        let err =
            classify("ud", b"[swarm]\nrole = \"worker\"\nint = true\n").expect_err("misspelt");
        assert!(err.message.contains("did you mean `init`?"), "{err}");
    }

    #[test]
    fn effective_definition_reads_both_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image_path = dir.path().join("image.toml");
        std::fs::write(&image_path, "[image]\nname = \"demo\"\nversion = \"1.0\"\n").expect("w");
        let user = dir.path().join("user-data.toml");
        let def = effective_definition(&image_path, &user).expect("no user data");
        assert_eq!(def.hostname().as_str(), "demo");
        std::fs::write(&user, "hostname = \"node-1\"\n").expect("w");
        let def = effective_definition(&image_path, &user).expect("user data");
        assert_eq!(def.hostname().as_str(), "node-1");
        std::fs::write(&user, "[update]\nstrategy = \"manual\"\n").expect("w");
        let err = effective_definition(&image_path, &user).expect_err("no [update]");
        assert_eq!(err.file, user.display().to_string());
        assert_eq!(err.location, Some((1, 1)), "{err}");
        std::fs::write(&user, "hostname = \"Bad_Name\"\n").expect("w");
        let err = effective_definition(&image_path, &user).expect_err("bad name");
        assert_eq!(err.location, Some((1, 12)), "{err}");
        let err = effective_definition(&dir.path().join("none.toml"), &user).expect_err("no image");
        assert!(
            err.to_string().contains("none.toml: cannot be read"),
            "{err}"
        );
    }
}
