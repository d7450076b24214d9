//! A small Docker Engine API client: HTTP/1.1 with JSON bodies over the engine's unix socket
//! (or, for a swarm worker reaching a manager's engine, over TCP).
//!
//! One connection per request (`Connection: close`), so there is no connection state to go stale
//! when the engine restarts. Speaks API v1.41, which Debian bookworm's Docker Engine 20.10 serves.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

use crate::http;

/// The API version every versioned request is made with.
pub const API_VERSION: &str = "v1.41";

/// Where dockerd listens on a Plinth machine.
pub const DEFAULT_SOCKET: &str = "/run/docker.sock";

/// Largest response body accepted; progress streams of big pulls stay well below it.
pub const MAX_BODY: u64 = 64 << 20;

/// What went wrong talking to the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be opened (engine not running or not ready yet).
    #[error("connecting to the engine at {path}: {source}")]
    Connect {
        /// The engine socket (or `HOST:PORT` of a TCP endpoint).
        path: PathBuf,
        /// Why connecting failed.
        source: io::Error,
    },
    /// The connection failed mid-request.
    #[error("{what}: talking to the engine: {source}")]
    Io {
        /// The operation, e.g. `creating container web`.
        what: String,
        /// The I/O failure.
        source: io::Error,
    },
    /// The engine answered with an error status; `message` is the engine's own explanation.
    #[error("{what}: engine answered HTTP {status}: {message}")]
    Api {
        /// The operation.
        what: String,
        /// The HTTP status, e.g. 404 or 409.
        status: u16,
        /// The engine's `message`.
        message: String,
    },
    /// The engine's answer was not valid HTTP or not the JSON expected.
    #[error("{what}: malformed answer from the engine: {detail}")]
    Protocol {
        /// The operation.
        what: String,
        /// What was wrong with the answer.
        detail: String,
    },
    /// An image reference with nothing after its `:` or `@`, or nothing before them; the
    /// engine would pull every tag of the repository for an empty tag.
    #[error("image reference `{reference}` has an empty name, tag or digest (expected e.g. `busybox:1.36`)")]
    BadReference {
        /// The reference as given.
        reference: String,
    },
    /// A streaming operation (pull, load) reported an error inside a successful response.
    #[error("{what}: {message}")]
    Stream {
        /// The operation.
        what: String,
        /// The engine's error message from the stream.
        message: String,
    },
}

impl Error {
    /// The HTTP status of an API error, if this is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    fn protocol(what: &str, detail: impl Into<String>) -> Error {
        Error::Protocol {
            what: what.to_owned(),
            detail: detail.into(),
        }
    }
}

/// Result of an engine call.
pub type Result<T> = std::result::Result<T, Error>;

pub use crate::http::Response;

/// The engine's error `message` from a JSON error body, else the body as text.
pub fn error_message(response: &Response) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        message: String,
    }
    match serde_json::from_slice::<ErrorBody>(&response.body) {
        Ok(e) => e.message,
        Err(_) => {
            let text = String::from_utf8_lossy(&response.body).trim().to_owned();
            if text.is_empty() {
                format!("HTTP status {} with an empty body", response.status)
            } else {
                text
            }
        }
    }
}

/// Percent-encodes a query-string value.
pub fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Splits an image reference into the repository and the tag or digest the pull API takes
/// (`busybox` → `("busybox", "latest")`, `host:5000/a/b:1` → `("host:5000/a/b", "1")`).
pub fn split_reference(reference: &str) -> (&str, &str) {
    if let Some((name, digest)) = reference.split_once('@') {
        return (name, digest);
    }
    let last_slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[last_slash..].rfind(':') {
        Some(i) => (
            &reference[..last_slash + i],
            &reference[last_slash + i + 1..],
        ),
        None => (reference, "latest"),
    }
}

/// The engine's `/version` answer (the fields Plinth logs).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Version {
    /// Engine version, e.g. `20.10.24+dfsg1`.
    pub version: String,
    /// Highest API version the engine speaks.
    pub api_version: String,
    /// Operating system, `linux`.
    #[serde(default)]
    pub os: String,
    /// CPU architecture, e.g. `amd64`.
    #[serde(default)]
    pub arch: String,
    /// Kernel release the engine runs on.
    #[serde(default)]
    pub kernel_version: String,
}

/// One entry of the container list.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerSummary {
    /// The container ID.
    pub id: String,
    /// Names with the engine's leading `/`.
    #[serde(default)]
    pub names: Vec<String>,
    /// The image reference the container was created from.
    #[serde(default)]
    pub image: String,
    /// The image ID (`sha256:…`) the container runs.
    #[serde(default, rename = "ImageID")]
    pub image_id: String,
    /// Labels set at creation.
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    /// `created`, `running`, `exited`, …
    #[serde(default)]
    pub state: String,
}

impl ContainerSummary {
    /// The container's name without the leading `/`.
    pub fn name(&self) -> Option<&str> {
        self.names.first().map(|n| n.trim_start_matches('/'))
    }
}

/// One entry of the network list.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkSummary {
    /// The network ID.
    pub id: String,
    /// The network's name.
    pub name: String,
    /// Labels set at creation.
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
}

/// The `Swarm` part of the engine's `GET /info` answer.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "PascalCase")]
pub struct SwarmInfo {
    /// `inactive`, `pending`, `active`, `error` or `locked`.
    #[serde(default)]
    pub local_node_state: String,
    /// This node's ID in the swarm (empty outside one).
    #[serde(default, rename = "NodeID")]
    pub node_id: String,
    /// True on a manager.
    #[serde(default)]
    pub control_available: bool,
    /// Why the node is in the `error` state.
    #[serde(default)]
    pub error: String,
    /// Managers in the swarm (known to managers only).
    #[serde(default)]
    pub managers: u64,
    /// Nodes in the swarm (known to managers only).
    #[serde(default)]
    pub nodes: u64,
    /// The managers this node knows of.
    #[serde(default, deserialize_with = "null_as_default")]
    pub remote_managers: Vec<RemoteManager>,
}

/// A manager a swarm node knows of.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "PascalCase")]
pub struct RemoteManager {
    /// The manager's node ID.
    #[serde(default, rename = "NodeID")]
    pub node_id: String,
    /// Its swarm address, `IP:2377`.
    #[serde(default)]
    pub addr: String,
}

/// One entry of the service list (the parts Plinth reads).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceSummary {
    /// The service ID.
    #[serde(rename = "ID")]
    pub id: String,
    /// The version an update must name.
    #[serde(default)]
    pub version: ObjectVersion,
    /// The service's name and labels.
    #[serde(default)]
    pub spec: ServiceSpecSummary,
}

/// A swarm object's version (`Version.Index`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "PascalCase")]
pub struct ObjectVersion {
    /// Increases with every change.
    #[serde(default)]
    pub index: u64,
}

/// The name and labels of a service's spec.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceSpecSummary {
    /// The service's name.
    #[serde(default)]
    pub name: String,
    /// Labels of the service.
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
}

/// The parts of a container inspection Plinth uses.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerDetails {
    /// The container ID.
    pub id: String,
    /// Name with the engine's leading `/`.
    #[serde(default)]
    pub name: String,
    /// The image ID the container runs.
    #[serde(default)]
    pub image: String,
    /// Runtime state.
    pub state: ContainerState,
    /// How many times the engine restarted it under its restart policy since it was started.
    #[serde(default)]
    pub restart_count: u64,
    /// Configuration it was created with.
    #[serde(default)]
    pub config: ContainerConfig,
}

/// A container's runtime state.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerState {
    /// `created`, `running`, `restarting`, `exited`, …
    #[serde(default)]
    pub status: String,
    /// True while running (also between restarts).
    #[serde(default)]
    pub running: bool,
    /// True while the engine waits to restart it.
    #[serde(default)]
    pub restarting: bool,
    /// Exit code of the last run.
    #[serde(default)]
    pub exit_code: i64,
    /// When the current (or last) run started, RFC 3339; changes at every restart.
    #[serde(default)]
    pub started_at: String,
    /// Why the last start failed, if it did.
    #[serde(default)]
    pub error: String,
    /// Health-check state, for containers that have one.
    #[serde(default)]
    pub health: Option<HealthState>,
}

/// Health-check state of a container that has one.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "PascalCase")]
pub struct HealthState {
    /// `starting`, `healthy` or `unhealthy`.
    #[serde(default)]
    pub status: String,
    /// Consecutive failed checks.
    #[serde(default)]
    pub failing_streak: u64,
}

/// A container's configuration (the part Plinth reads).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    /// Labels set at creation.
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
}

/// The parts of an image inspection Plinth uses.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ImageDetails {
    /// `sha256:<config digest>`.
    pub id: String,
    /// References tagging this image.
    #[serde(default, deserialize_with = "null_as_default")]
    pub repo_tags: Vec<String>,
}

fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A connection to the engine.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

/// Writes to a socket with `MSG_NOSIGNAL`: an engine that closes the connection early must
/// give an error, never a SIGPIPE (which would kill PID 1 if it did not ignore the signal).
struct NoSigpipe<'a>(&'a Stream);

impl Write for NoSigpipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        rustix::net::send(self.0, buf, rustix::net::SendFlags::NOSIGNAL).map_err(io::Error::from)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connects to `HOST:PORT`, trying each address it resolves to within `timeout`.
fn connect_tcp(address: &str, timeout: Duration) -> io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("{address} resolves to no address"),
    );
    for candidate in address.to_socket_addrs()? {
        match TcpStream::connect_timeout(&candidate, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A request body.
enum Body<'a> {
    None,
    Json(&'a Value),
    File(&'a Path),
}

/// Where an engine listens.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    /// A unix socket (the machine's own engine).
    Unix(PathBuf),
    /// `HOST:PORT` over plain TCP (another machine's engine on a private network).
    Tcp(String),
}

/// A client for one engine socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    endpoint: Endpoint,
    timeout: Duration,
    long_timeout: Duration,
}

impl Client {
    /// A client for the engine listening on `socket`. Nothing is opened until the first call.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        let socket = socket.into();
        Client {
            endpoint: Endpoint::Unix(socket.clone()),
            socket,
            timeout: Duration::from_secs(60),
            long_timeout: Duration::from_secs(30 * 60),
        }
    }

    /// A client for the engine listening on TCP at `address` (`HOST:PORT`, as `[swarm]
    /// manager-api` gives it without its `tcp://`). Nothing is opened until the first call.
    pub fn tcp(address: &str) -> Client {
        Client {
            endpoint: Endpoint::Tcp(address.to_owned()),
            ..Client::new(address)
        }
    }

    /// Sets the read/write timeout of ordinary calls and of image pulls and loads.
    pub fn with_timeouts(mut self, timeout: Duration, long_timeout: Duration) -> Client {
        self.timeout = timeout;
        self.long_timeout = long_timeout;
        self
    }

    /// The socket path this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn request(
        &self,
        what: &str,
        method: &str,
        path: &str,
        body: Body<'_>,
        timeout: Duration,
    ) -> Result<Response> {
        let io_err = |source: io::Error| Error::Io {
            what: what.to_owned(),
            source,
        };
        let connected = match &self.endpoint {
            Endpoint::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
            Endpoint::Tcp(address) => connect_tcp(address, timeout).map(Stream::Tcp),
        };
        let stream = connected.map_err(|source| Error::Connect {
            path: self.socket.clone(),
            source,
        })?;
        stream.set_timeouts(timeout).map_err(io_err)?;
        let mut writer = NoSigpipe(&stream);
        let mut headers = vec![
            ("Host", "localhost".to_owned()),
            ("User-Agent", "plinth-init".to_owned()),
            ("Connection", "close".to_owned()),
        ];
        let mut json = None;
        let mut file = None;
        match body {
            Body::None => {
                if method == "POST" {
                    headers.push(("Content-Length", "0".to_owned()));
                }
            }
            Body::Json(value) => {
                let bytes = serde_json::to_vec(value)
                    .map_err(|e| Error::protocol(what, format!("encoding request: {e}")))?;
                headers.push(("Content-Type", "application/json".to_owned()));
                headers.push(("Content-Length", bytes.len().to_string()));
                json = Some(bytes);
            }
            Body::File(path) => {
                let input = File::open(path).map_err(|source| Error::Io {
                    what: format!("{what}: opening {}", path.display()),
                    source,
                })?;
                let length = input.metadata().map_err(io_err)?.len();
                headers.push(("Content-Type", "application/x-tar".to_owned()));
                headers.push(("Content-Length", length.to_string()));
                file = Some((path, input, length));
            }
        }
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        http::write_head(&mut writer, method, path, &headers).map_err(io_err)?;
        if let Some(json) = &json {
            writer.write_all(json).map_err(io_err)?;
        }
        if let Some((path, mut input, length)) = file {
            let copied = io::copy(&mut input, &mut writer).map_err(io_err)?;
            if copied != length {
                return Err(Error::protocol(
                    what,
                    format!("{} changed size while being sent", path.display()),
                ));
            }
        }
        writer.flush().map_err(io_err)?;
        let mut reader = BufReader::new(stream);
        http::read_response(&mut reader, method == "HEAD", MAX_BODY).map_err(|source| {
            if source.kind() == io::ErrorKind::InvalidData {
                Error::protocol(what, source.to_string())
            } else {
                io_err(source)
            }
        })
    }

    /// Makes a call and turns statuses outside `ok` into [`Error::Api`].
    fn call(
        &self,
        what: &str,
        method: &str,
        path: &str,
        body: Body<'_>,
        ok: &[u16],
    ) -> Result<Response> {
        let path = format!("/{API_VERSION}{path}");
        let response = self.request(what, method, &path, body, self.timeout)?;
        check(what, response, ok)
    }

    /// `GET /_ping`: succeeds when the engine answers.
    pub fn ping(&self) -> Result<()> {
        self.ping_within(self.timeout)
    }

    fn ping_within(&self, timeout: Duration) -> Result<()> {
        let response = self.request("ping", "GET", "/_ping", Body::None, timeout)?;
        check("ping", response, &[200]).map(drop)
    }

    /// Polls `_ping` until the engine answers or `timeout` passes; returns the last error then.
    /// Each try waits at most 5 s, so an engine that accepts but hangs cannot stall the caller.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let per_try = left.clamp(Duration::from_millis(100), Duration::from_secs(5));
            match self.ping_within(per_try) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// `GET /version`.
    pub fn version(&self) -> Result<Version> {
        let response = self.call("engine version", "GET", "/version", Body::None, &[200])?;
        json("engine version", &response)
    }

    /// Lists containers, stopped ones too; `label` filters on `key` or `key=value`.
    pub fn list_containers(&self, label: Option<&str>) -> Result<Vec<ContainerSummary>> {
        let mut path = "/containers/json?all=1".to_owned();
        if let Some(label) = label {
            let filters = serde_json::json!({ "label": [label] }).to_string();
            path.push_str(&format!("&filters={}", query_escape(&filters)));
        }
        let response = self.call("listing containers", "GET", &path, Body::None, &[200])?;
        json("listing containers", &response)
    }

    /// Inspects a container by name or ID; `None` if it does not exist.
    pub fn inspect_container(&self, name: &str) -> Result<Option<ContainerDetails>> {
        let what = format!("inspecting container {name}");
        let path = format!("/containers/{}/json", query_escape(name));
        let response = self.call(&what, "GET", &path, Body::None, &[200, 404])?;
        if response.status == 404 {
            return Ok(None);
        }
        json(&what, &response).map(Some)
    }

    /// Creates a container named `name` from a create body; returns its ID.
    pub fn create_container(&self, name: &str, body: &Value) -> Result<String> {
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "Id")]
            id: String,
        }
        let what = format!("creating container {name}");
        let path = format!("/containers/create?name={}", query_escape(name));
        let response = self.call(&what, "POST", &path, Body::Json(body), &[201])?;
        json::<Created>(&what, &response).map(|c| c.id)
    }

    /// Starts a container; starting a running one is not an error.
    pub fn start_container(&self, id: &str) -> Result<()> {
        let what = format!("starting container {id}");
        let path = format!("/containers/{}/start", query_escape(id));
        self.call(&what, "POST", &path, Body::None, &[204, 304])
            .map(drop)
    }

    /// Stops a container, killing it after `timeout`; stopping a stopped one is not an error.
    pub fn stop_container(&self, id: &str, timeout: Duration) -> Result<()> {
        let what = format!("stopping container {id}");
        let path = format!(
            "/containers/{}/stop?t={}",
            query_escape(id),
            timeout.as_secs()
        );
        // The engine answers only once the container is down: allow for the grace time.
        let response = self.request(
            &what,
            "POST",
            &format!("/{API_VERSION}{path}"),
            Body::None,
            self.timeout + timeout,
        )?;
        check(&what, response, &[204, 304]).map(drop)
    }

    /// Removes a container, killing it first if it runs.
    pub fn remove_container(&self, id: &str) -> Result<()> {
        let what = format!("removing container {id}");
        let path = format!("/containers/{}?force=1", query_escape(id));
        self.call(&what, "DELETE", &path, Body::None, &[204])
            .map(drop)
    }

    /// Lists networks; `label` filters on `key` or `key=value`.
    pub fn list_networks(&self, label: Option<&str>) -> Result<Vec<NetworkSummary>> {
        let mut path = "/networks".to_owned();
        if let Some(label) = label {
            let filters = serde_json::json!({ "label": [label] }).to_string();
            path.push_str(&format!("?filters={}", query_escape(&filters)));
        }
        let response = self.call("listing networks", "GET", &path, Body::None, &[200])?;
        json("listing networks", &response)
    }

    /// Creates a network from a `POST /networks/create` body (which names it); returns its ID.
    pub fn create_network(&self, name: &str, body: &Value) -> Result<String> {
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "Id")]
            id: String,
        }
        let what = format!("creating network {name}");
        let response = self.call(&what, "POST", "/networks/create", Body::Json(body), &[201])?;
        json::<Created>(&what, &response).map(|c| c.id)
    }

    /// Removes a network; one that is already gone is not an error.
    pub fn remove_network(&self, id: &str) -> Result<()> {
        let what = format!("removing network {id}");
        let path = format!("/networks/{}", query_escape(id));
        self.call(&what, "DELETE", &path, Body::None, &[204, 404])
            .map(drop)
    }

    /// Connects a container to a network, with extra DNS names on it.
    pub fn connect_network(
        &self,
        network: &str,
        container: &str,
        aliases: &[String],
    ) -> Result<()> {
        let what = format!("connecting container {container} to network {network}");
        let path = format!("/networks/{}/connect", query_escape(network));
        let body = serde_json::json!({
            "Container": container,
            "EndpointConfig": { "Aliases": aliases },
        });
        self.call(&what, "POST", &path, Body::Json(&body), &[200])
            .map(drop)
    }

    /// `GET /info`: the `Swarm` part.
    pub fn swarm_info(&self) -> Result<SwarmInfo> {
        #[derive(Deserialize)]
        struct Info {
            #[serde(rename = "Swarm", default)]
            swarm: SwarmInfo,
        }
        let what = "reading the engine's swarm state";
        let response = self.call(what, "GET", "/info", Body::None, &[200])?;
        json::<Info>(what, &response).map(|i| i.swarm)
    }

    /// `POST /swarm/init` with an init body; returns the new node's ID.
    pub fn swarm_init(&self, body: &Value) -> Result<String> {
        let what = "starting a swarm";
        let response = self.call(what, "POST", "/swarm/init", Body::Json(body), &[200])?;
        json(what, &response)
    }

    /// `POST /swarm/join` with a join body.
    pub fn swarm_join(&self, body: &Value) -> Result<()> {
        self.call(
            "joining the swarm",
            "POST",
            "/swarm/join",
            Body::Json(body),
            &[200],
        )
        .map(drop)
    }

    /// `POST /swarm/leave?force=true`: leaves even as the last manager.
    pub fn swarm_leave(&self) -> Result<()> {
        let what = "leaving the swarm";
        self.call(what, "POST", "/swarm/leave?force=true", Body::None, &[200])
            .map(drop)
    }

    /// `GET /services`: every service of the swarm.
    pub fn list_services(&self) -> Result<Vec<ServiceSummary>> {
        let what = "listing services";
        let response = self.call(what, "GET", "/services", Body::None, &[200])?;
        json(what, &response)
    }

    /// `POST /services/create`; returns the service's ID.
    pub fn create_service(&self, name: &str, body: &Value) -> Result<String> {
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let what = format!("creating service {name}");
        let response = self.call(&what, "POST", "/services/create", Body::Json(body), &[201])?;
        json::<Created>(&what, &response).map(|c| c.id)
    }

    /// `GET /services/{id}`: the service with its `Version.Index` and whole `Spec`.
    pub fn inspect_service(&self, id: &str) -> Result<Value> {
        let what = format!("reading service {id}");
        let path = format!("/services/{}", query_escape(id));
        let response = self.call(&what, "GET", &path, Body::None, &[200])?;
        json(&what, &response)
    }

    /// `POST /services/{id}/update?version=N`: replaces the spec of the service at `version`.
    pub fn update_service(&self, id: &str, version: u64, body: &Value) -> Result<()> {
        let what = format!("updating service {id}");
        let path = format!("/services/{}/update?version={version}", query_escape(id));
        self.call(&what, "POST", &path, Body::Json(body), &[200])
            .map(drop)
    }

    /// `GET /swarm` (managers only): the swarm object, with its `Version.Index` and `Spec`.
    pub fn swarm_inspect(&self) -> Result<Value> {
        let what = "reading the swarm's settings";
        let response = self.call(what, "GET", "/swarm", Body::None, &[200])?;
        json(what, &response)
    }

    /// `POST /swarm/update?version=…`: replaces the swarm's spec, if nobody changed it since
    /// `version` (the engine refuses a stale version: the Raft store orders the writers).
    pub fn swarm_update(&self, version: u64, spec: &Value) -> Result<()> {
        let what = "updating the swarm's settings";
        let path = format!("/swarm/update?version={version}");
        self.call(what, "POST", &path, Body::Json(spec), &[200])
            .map(drop)
    }

    /// `GET /nodes` (managers only): every node, as the engine describes it.
    pub fn list_nodes(&self) -> Result<Vec<Value>> {
        let what = "listing the swarm's nodes";
        let response = self.call(what, "GET", "/nodes", Body::None, &[200])?;
        json(what, &response)
    }

    /// `POST /nodes/{id}/update?version=…`: replaces a node's spec (role, availability, labels).
    pub fn update_node(&self, id: &str, version: u64, spec: &Value) -> Result<()> {
        let what = format!("updating node {id}");
        let path = format!("/nodes/{}/update?version={version}", query_escape(id));
        self.call(&what, "POST", &path, Body::Json(spec), &[200])
            .map(drop)
    }

    /// `GET /tasks?filters=…` (managers only): the tasks the filters select, e.g.
    /// `{"node": ["ID"], "desired-state": ["running"]}`.
    pub fn list_tasks(&self, filters: &Value) -> Result<Vec<Value>> {
        let what = "listing the swarm's tasks";
        let path = format!("/tasks?filters={}", query_escape(&filters.to_string()));
        let response = self.call(what, "GET", &path, Body::None, &[200])?;
        json(what, &response)
    }

    /// `DELETE /services/{id}`; one already gone is not an error.
    pub fn remove_service(&self, id: &str) -> Result<()> {
        let what = format!("removing service {id}");
        let path = format!("/services/{}", query_escape(id));
        self.call(&what, "DELETE", &path, Body::None, &[200, 404])
            .map(drop)
    }

    /// Inspects an image by reference or ID; `None` if the engine does not have it.
    pub fn inspect_image(&self, reference: &str) -> Result<Option<ImageDetails>> {
        let what = format!("inspecting image {reference}");
        // Image names contain `/` and `:`, which the engine expects unescaped in the path.
        let path = format!("/images/{reference}/json");
        let response = self.call(&what, "GET", &path, Body::None, &[200, 404])?;
        if response.status == 404 {
            return Ok(None);
        }
        json(&what, &response).map(Some)
    }

    /// Deletes dangling (untagged, unused) images; returns the bytes reclaimed.
    pub fn prune_dangling_images(&self) -> Result<u64> {
        #[derive(Deserialize)]
        struct Pruned {
            #[serde(rename = "SpaceReclaimed", default)]
            space_reclaimed: u64,
        }
        let what = "pruning dangling images";
        let filters = serde_json::json!({ "dangling": ["true"] }).to_string();
        let path = format!("/images/prune?filters={}", query_escape(&filters));
        let response = self.call(what, "POST", &path, Body::None, &[200])?;
        json::<Pruned>(what, &response).map(|p| p.space_reclaimed)
    }

    /// Removes an image reference (untagging it, and deleting the image when no tag is left);
    /// returns false if the engine did not have it.
    pub fn remove_image(&self, reference: &str) -> Result<bool> {
        let what = format!("removing image {reference}");
        let path = format!("/images/{reference}");
        let response = self.call(&what, "DELETE", &path, Body::None, &[200, 404])?;
        Ok(response.status == 200)
    }

    /// Loads a `docker save` archive; returns the references and IDs the engine reports loaded.
    pub fn load_image(&self, archive: &Path) -> Result<Vec<String>> {
        let what = format!("loading image archive {}", archive.display());
        let response = self.request(
            &what,
            "POST",
            &format!("/{API_VERSION}/images/load?quiet=1"),
            Body::File(archive),
            self.long_timeout,
        )?;
        let response = check(&what, response, &[200])?;
        let messages = stream_messages(&what, &response.body)?;
        Ok(messages
            .iter()
            .filter_map(|m| m.get("stream").and_then(Value::as_str))
            .filter_map(|s| {
                s.trim()
                    .strip_prefix("Loaded image: ")
                    .or_else(|| s.trim().strip_prefix("Loaded image ID: "))
            })
            .map(str::to_owned)
            .collect())
    }

    /// Pulls an image from its registry.
    pub fn pull_image(&self, reference: &str) -> Result<()> {
        let what = format!("pulling image {reference}");
        let (name, tag) = split_reference(reference);
        if name.is_empty() || tag.is_empty() {
            return Err(Error::BadReference {
                reference: reference.to_owned(),
            });
        }
        let path = format!(
            "/{API_VERSION}/images/create?fromImage={}&tag={}",
            query_escape(name),
            query_escape(tag)
        );
        let response = self.request(&what, "POST", &path, Body::None, self.long_timeout)?;
        let response = check(&what, response, &[200])?;
        stream_messages(&what, &response.body).map(drop)
    }
}

fn check(what: &str, response: Response, ok: &[u16]) -> Result<Response> {
    if ok.contains(&response.status) {
        Ok(response)
    } else {
        Err(Error::Api {
            what: what.to_owned(),
            status: response.status,
            message: error_message(&response),
        })
    }
}

fn json<T: serde::de::DeserializeOwned>(what: &str, response: &Response) -> Result<T> {
    serde_json::from_slice(&response.body).map_err(|e| Error::protocol(what, e.to_string()))
}

/// Splits a JSON message stream (pull/load progress) and fails on the first `error` message.
pub fn stream_messages(what: &str, body: &[u8]) -> Result<Vec<Value>> {
    let mut messages = Vec::new();
    for message in serde_json::Deserializer::from_slice(body).into_iter::<Value>() {
        let message = message.map_err(|e| Error::protocol(what, e.to_string()))?;
        if let Some(error) = message.get("error") {
            let text = error
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| error.to_string());
            return Err(Error::Stream {
                what: what.to_owned(),
                message: text,
            });
        }
        messages.push(message);
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read};
    use std::os::unix::net::UnixListener;

    fn parse(bytes: &[u8]) -> io::Result<Response> {
        http::read_response(&mut Cursor::new(bytes), false, MAX_BODY)
    }

    #[test]
    fn engine_error_message_is_extracted() {
        let r = parse(b"HTTP/1.1 409 Conflict\r\nContent-Length: 51\r\n\r\n{\"message\":\"Conflict. The name is already in use\"}\n")
            .expect("parses");
        assert_eq!(error_message(&r), "Conflict. The name is already in use");
        let err = check("creating container web", r, &[201]).expect_err("409 is an error");
        assert_eq!(err.status(), Some(409));
        assert_eq!(
            err.to_string(),
            "creating container web: engine answered HTTP 409: Conflict. The name is already in use"
        );
    }

    #[test]
    fn stream_errors_are_reported() {
        let body = b"{\"status\":\"Pulling from library/x\"}\r\n{\"errorDetail\":{\"message\":\"not found\"},\"error\":\"manifest unknown\"}\r\n";
        let err = stream_messages("pulling image x", body).expect_err("error message fails");
        assert_eq!(err.to_string(), "pulling image x: manifest unknown");
        let ok = stream_messages("loading", b"{\"stream\":\"Loaded image: a:1\\n\"}\n")
            .expect("no error");
        assert_eq!(ok.len(), 1);
    }

    #[test]
    fn references_split_into_name_and_tag() {
        assert_eq!(split_reference("busybox"), ("busybox", "latest"));
        assert_eq!(split_reference("busybox:1.36"), ("busybox", "1.36"));
        assert_eq!(
            split_reference("127.0.0.1:5000/a/b:v2"),
            ("127.0.0.1:5000/a/b", "v2")
        );
        assert_eq!(
            split_reference("127.0.0.1:5000/a/b"),
            ("127.0.0.1:5000/a/b", "latest")
        );
        assert_eq!(split_reference("a/b@sha256:abcd"), ("a/b", "sha256:abcd"));
        assert_eq!(query_escape("a b/c:d"), "a%20b%2Fc%3Ad");
    }

    #[test]
    fn references_with_an_empty_part_are_not_pulled() {
        // Refused before connecting: the socket does not exist.
        let client = Client::new("/nonexistent/docker.sock");
        for reference in ["busybox:", "busybox@", ":1.36", "@sha256:abcd", ""] {
            match client.pull_image(reference) {
                Err(Error::BadReference { reference: r }) => assert_eq!(r, reference),
                other => panic!("{reference:?}: {other:?}"),
            }
        }
    }

    /// Request lines and bodies the fake engine received.
    type Seen = Vec<(String, Vec<u8>)>;

    /// A one-thread fake engine: answers each connection from a table of (request line → response).
    fn fake_engine(
        dir: &Path,
        answers: Vec<(&'static str, &'static str)>,
    ) -> (PathBuf, std::thread::JoinHandle<Seen>) {
        let socket = dir.join("docker.sock");
        let listener = UnixListener::bind(&socket).expect("binding fake engine socket");
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (expect, answer) in answers {
                let (stream, _) = listener.accept().expect("accepting");
                let mut reader = BufReader::new(stream);
                let request_line = http::read_line(&mut reader).expect("request line");
                let mut length = 0;
                loop {
                    let line = http::read_line(&mut reader).expect("header");
                    if line.is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().expect("length");
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).expect("body");
                assert_eq!(request_line, expect);
                reader
                    .get_mut()
                    .write_all(answer.as_bytes())
                    .expect("answering");
                seen.push((request_line, body));
            }
            seen
        });
        (socket, handle)
    }

    #[test]
    fn client_talks_to_a_fake_engine_over_a_unix_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, engine) = fake_engine(
            dir.path(),
            vec![
                (
                    "GET /_ping HTTP/1.1",
                    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK",
                ),
                (
                    "POST /v1.41/containers/create?name=web HTTP/1.1",
                    "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
                     10\r\n{\"Id\":\"abc123\",\"\r\nd\r\nWarnings\":[]}\r\n0\r\n\r\n",
                ),
                (
                    "POST /v1.41/containers/abc123/start HTTP/1.1",
                    "HTTP/1.1 204 No Content\r\n\r\n",
                ),
                (
                    "GET /v1.41/containers/gone/json HTTP/1.1",
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 38\r\n\r\n{\"message\":\"No such container: gone\"}\n",
                ),
                (
                    "DELETE /v1.41/containers/gone?force=1 HTTP/1.1",
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 38\r\n\r\n{\"message\":\"No such container: gone\"}\n",
                ),
            ],
        );
        let client = Client::new(&socket);
        client
            .wait_ready(Duration::from_secs(5))
            .expect("fake engine answers ping");
        let body = serde_json::json!({ "Image": "busybox:1.36" });
        let id = client.create_container("web", &body).expect("create");
        assert_eq!(id, "abc123");
        client.start_container(&id).expect("start");
        assert_eq!(client.inspect_container("gone").expect("inspect"), None);
        let err = client.remove_container("gone").expect_err("404 on remove");
        assert_eq!(err.status(), Some(404));
        assert!(err.to_string().contains("No such container: gone"), "{err}");
        let seen = engine.join().expect("fake engine thread");
        let sent: Value = serde_json::from_slice(&seen[1].1).expect("create body is JSON");
        assert_eq!(sent, body);
    }

    #[test]
    fn networks_are_listed_created_connected_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, engine) = fake_engine(
            dir.path(),
            vec![
                (
                    "GET /v1.41/networks?filters=%7B%22label%22%3A%5B%22plinth.managed%3D1%22%5D%7D HTTP/1.1",
                    "HTTP/1.1 200 OK\r\nContent-Length: 59\r\n\r\n[{\"Id\":\"n1\",\"Name\":\"back\",\"Labels\":{\"plinth.managed\":\"1\"}}]",
                ),
                (
                    "POST /v1.41/networks/create HTTP/1.1",
                    "HTTP/1.1 201 Created\r\nContent-Length: 11\r\n\r\n{\"Id\":\"n2\"}",
                ),
                (
                    "POST /v1.41/networks/front/connect HTTP/1.1",
                    "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                ),
                (
                    "DELETE /v1.41/networks/n1 HTTP/1.1",
                    "HTTP/1.1 204 No Content\r\n\r\n",
                ),
            ],
        );
        let client = Client::new(&socket);
        let listed = client
            .list_networks(Some("plinth.managed=1"))
            .expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].id.as_str(), listed[0].name.as_str()),
            ("n1", "back")
        );
        assert_eq!(listed[0].labels["plinth.managed"], "1");
        let body = serde_json::json!({ "Name": "front", "Driver": "bridge" });
        assert_eq!(client.create_network("front", &body).expect("create"), "n2");
        client
            .connect_network("front", "c1", &["web".to_owned()])
            .expect("connect");
        client.remove_network("n1").expect("remove");
        let seen = engine.join().expect("fake engine thread");
        let sent: Value = serde_json::from_slice(&seen[1].1).expect("create body");
        assert_eq!(sent, body);
        let sent: Value = serde_json::from_slice(&seen[2].1).expect("connect body");
        assert_eq!(
            sent,
            serde_json::json!({ "Container": "c1", "EndpointConfig": { "Aliases": ["web"] } })
        );
    }

    #[test]
    fn swarm_and_service_calls_match_the_engine_api() {
        let dir = tempfile::tempdir().expect("tempdir");
        let info = r#"{"ID":"x","Swarm":{"NodeID":"n1","LocalNodeState":"active","ControlAvailable":true,"Error":"","RemoteManagers":[{"NodeID":"n1","Addr":"10.0.0.1:2377"}],"Nodes":3,"Managers":1}}"#;
        let services = r#"[{"ID":"s1","Version":{"Index":42},"Spec":{"Name":"web","Labels":{"plinth.managed":"1"}}}]"#;
        let ok = |body: &str| {
            let text = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            &*Box::leak(text.into_boxed_str())
        };
        let (socket, engine) = fake_engine(
            dir.path(),
            vec![
                ("GET /v1.41/info HTTP/1.1", ok(info)),
                ("POST /v1.41/swarm/init HTTP/1.1", ok("\"n1\"")),
                ("POST /v1.41/swarm/join HTTP/1.1", ok("")),
                ("POST /v1.41/swarm/leave?force=true HTTP/1.1", ok("")),
                ("GET /v1.41/services HTTP/1.1", ok(services)),
                (
                    "POST /v1.41/services/create HTTP/1.1",
                    "HTTP/1.1 201 Created\r\nContent-Length: 11\r\n\r\n{\"ID\":\"s2\"}",
                ),
                (
                    "POST /v1.41/services/s1/update?version=42 HTTP/1.1",
                    ok("{}"),
                ),
                (
                    "DELETE /v1.41/services/s1 HTTP/1.1",
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}",
                ),
            ],
        );
        let client = Client::new(&socket);
        let swarm = client.swarm_info().expect("info");
        assert_eq!(
            (
                swarm.local_node_state.as_str(),
                swarm.node_id.as_str(),
                swarm.control_available
            ),
            ("active", "n1", true)
        );
        assert_eq!((swarm.managers, swarm.nodes), (1, 3));
        assert_eq!(swarm.remote_managers[0].addr, "10.0.0.1:2377");
        let init = serde_json::json!({ "ListenAddr": "0.0.0.0:2377" });
        assert_eq!(client.swarm_init(&init).expect("init"), "n1");
        let join = serde_json::json!({ "RemoteAddrs": ["10.0.0.1:2377"], "JoinToken": "t" });
        client.swarm_join(&join).expect("join");
        client.swarm_leave().expect("leave");
        let listed = client.list_services().expect("services");
        assert_eq!(
            (
                listed[0].id.as_str(),
                listed[0].version.index,
                listed[0].spec.name.as_str()
            ),
            ("s1", 42, "web")
        );
        let body = serde_json::json!({ "Name": "api" });
        assert_eq!(client.create_service("api", &body).expect("create"), "s2");
        client.update_service("s1", 42, &body).expect("update");
        client.remove_service("s1").expect("a service already gone");
        let seen = engine.join().expect("fake engine thread");
        let sent: Value = serde_json::from_slice(&seen[2].1).expect("join body");
        assert_eq!(sent, join);
        let sent: Value = serde_json::from_slice(&seen[6].1).expect("update body");
        assert_eq!(sent, body);
    }

    #[test]
    fn wait_ready_gives_up_on_a_silent_engine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("silent.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let held = std::thread::spawn(move || {
            // Accept connections and never answer.
            let mut open = Vec::new();
            for stream in listener.incoming().take(3) {
                open.push(stream);
            }
            open.len()
        });
        let start = Instant::now();
        let err = Client::new(&socket)
            .wait_ready(Duration::from_millis(400))
            .expect_err("silent engine is not ready");
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        assert!(matches!(err, Error::Io { .. }), "{err}");
        drop(held);
    }

    #[test]
    fn wait_ready_times_out_without_an_engine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let client = Client::new(dir.path().join("absent.sock"));
        let start = Instant::now();
        let err = client
            .wait_ready(Duration::from_millis(300))
            .expect_err("nobody listens");
        assert!(matches!(err, Error::Connect { .. }), "{err}");
        assert!(start.elapsed() >= Duration::from_millis(300));
    }
}
