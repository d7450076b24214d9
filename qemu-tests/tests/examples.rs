//! The example definitions of `images/examples/` built and booted under QEMU (OVMF, TCG), each
//! run to what it is for:
//!
//! - `jetty.toml`: Jetty's page, fetched through a host forward to the published port, and
//!   Jetty's own 404 for a missing one.
//! - `irssi.toml`: `/eval echo hello $V` typed into irssi through the Engine API's attach
//!   stream; its output comes back on the terminal.
//! - `ghost.toml`: the page of Debian's Node.js, fetched the same way.
//! - `celery.toml`: the `submit` container's task, processed by the worker through the Redis
//!   broker on their user network, printed in its log (`add(2, 3) = 5`).
//! - `registry.toml`: an image pushed to the registry by the guest's engine, seen in
//!   the registry's catalog from the host, removed and pulled back.
//!
//! The examples are for users and open no Engine API listener. The tests that drive the engine
//! (irssi, Celery, the registry) build a copy of the example with a test-only `[engine]` that
//! adds a plain TCP listener on 2375, reached only through QEMU's forward on 127.0.0.1; the
//! packages are the same, so the example's lock serves the copy.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use qemu_tests::engine::{demux, http_get, Engine};
use qemu_tests::{free_port, image, Vm, VmOptions};
use serde_json::Value;

/// From QEMU start to a running container, under TCG on a busy machine.
const BOOT: Duration = Duration::from_secs(420);
/// Appended to an example to reach its engine from the test (see the file's comment).
const TEST_ENGINE: &str = r#"
# Added by qemu-tests/tests/examples.rs: the Engine API on TCP 2375 for the test, reached only
# through QEMU's forward on 127.0.0.1.
[engine]
settings = { hosts = ["unix:///run/docker.sock", "tcp://0.0.0.0:2375"] }
insecure-tcp = true
"#;

/// An example's definition and lock.
fn example(name: &str) -> (PathBuf, PathBuf) {
    let dir = image::workspace().join("images/examples");
    (
        dir.join(format!("{name}.toml")),
        dir.join(format!("{name}.lock")),
    )
}

/// Builds the example as it is.
fn build_example(name: &str) -> Result<PathBuf> {
    let (def, lock) = example(name);
    image::build(&def, &lock).with_context(|| format!("building images/examples/{name}.toml"))
}

/// Builds a copy of the example with the test's Engine API listener.
fn build_with_engine(name: &str) -> Result<PathBuf> {
    let (def, lock) = example(name);
    let text =
        std::fs::read_to_string(&def).with_context(|| format!("reading {}", def.display()))?;
    ensure!(
        !text.contains("\n[engine]"),
        "{} has an [engine] table of its own",
        def.display()
    );
    let dir = image::workspace().join("target/qemu-tests/example-variants");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let copy = dir.join(format!("example-{name}.toml"));
    std::fs::write(&copy, format!("{text}{TEST_ENGINE}"))
        .with_context(|| format!("writing {}", copy.display()))?;
    image::build(&copy, &lock)
        .with_context(|| format!("building {} with the test engine", def.display()))
}

/// Boots `disk` on a throw-away overlay with `forwards` (host port, guest port).
fn boot(disk: PathBuf, forwards: Vec<(u16, u16)>) -> Result<Vm> {
    let mut opts = VmOptions::new(disk);
    opts.snapshot = true;
    opts.forwards = forwards;
    Vm::boot(&opts)
}

/// Waits for `container-running name=NAME` on the console.
fn wait_running(vm: &mut Vm, name: &str) -> Result<()> {
    vm.wait_for(
        &format!("PLINTH-STATUS container-running name={name}"),
        BOOT,
    )
    .map(|_| ())
}

/// [`wait_running`] for a guest whose engine the test reaches: a container that never stays up
/// is reported with its log.
fn wait_running_logged(vm: &mut Vm, engine: &Engine, name: &str) -> Result<()> {
    wait_running(vm, name).map_err(|err| {
        let logs = engine
            .request(
                "GET",
                &format!("/containers/{name}/logs?stdout=1&stderr=1&tail=40"),
                None,
            )
            .map(|(_, raw)| demux(&raw))
            .unwrap_or_else(|e| format!("(no log: {e:#})"));
        err.context(format!(
            "container {name} never stayed up; the end of its log:\n{logs}"
        ))
    })
}

/// An Engine API request with extra header lines; returns the status and the body.
fn engine_request(port: u16, method: &str, path: &str, headers: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to the guest engine on 127.0.0.1:{port}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    write!(
        stream,
        "{method} /v1.41{path} HTTP/1.0\r\nHost: engine\r\n{headers}Content-Length: 0\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .with_context(|| format!("reading the reply to {method} {path}"))?;
    let text = String::from_utf8_lossy(&reply).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed reply to {method} {path}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in reply to {method} {path}: {head}"))?;
    Ok((status, body.to_owned()))
}

/// A streamed engine progress reply (push, pull): every line JSON, none an error.
fn check_progress(what: &str, status: u16, body: &str) -> Result<()> {
    ensure!(status == 200, "{what}: HTTP {status}: {body}");
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line)
            .with_context(|| format!("{what}: a progress line is not JSON: {line}"))?;
        ensure!(value.get("error").is_none(), "{what} failed: {line}");
    }
    Ok(())
}

#[test]
fn jetty_serves_its_page() -> Result<()> {
    qemu_tests::require_qemu()?;
    let disk = build_example("jetty")?;
    let web = free_port()?;
    let mut vm = boot(disk, vec![(web, 8080)])?;
    wait_running(&mut vm, "jetty")?;
    // The JVM and Jetty start slowly under TCG: the page may take minutes after the container runs.
    let page = http_get(web, "/", BOOT).context("fetching Jetty's page")?;
    ensure!(
        page.contains("<h1>Hello from Jetty on Plinth</h1>"),
        "unexpected page: {page}"
    );
    // A path with nothing behind it is Jetty's 404, not the page: Jetty answers, not a stand-in.
    let mut stream = TcpStream::connect(("127.0.0.1", web))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.write_all(b"GET /missing.html HTTP/1.0\r\nHost: guest\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    ensure!(
        reply.starts_with("HTTP/1.1 404") && reply.contains("Jetty"),
        "unexpected reply to a missing page: {}",
        reply.lines().take(12).collect::<Vec<_>>().join("\n")
    );
    eprintln!("jetty: page served {:.0?} after QEMU started", vm.elapsed());
    Ok(())
}

#[test]
fn node_serves_its_page() -> Result<()> {
    qemu_tests::require_qemu()?;
    let disk = build_example("ghost")?;
    let web = free_port()?;
    let mut vm = boot(disk, vec![(web, 2368)])?;
    wait_running(&mut vm, "node")?;
    let page = http_get(web, "/", BOOT).context("fetching the Node.js page")?;
    ensure!(
        page.contains("<h1>Hello from Node.js on Plinth</h1>"),
        "unexpected page: {page}"
    );
    Ok(())
}

#[test]
fn irssi_echoes_what_is_typed() -> Result<()> {
    qemu_tests::require_qemu()?;
    let disk = build_with_engine("irssi")?;
    let api = free_port()?;
    let mut vm = boot(disk, vec![(api, 2375)])?;
    let engine = Engine { port: api };
    engine.wait_ready(BOOT)?;
    wait_running_logged(&mut vm, &engine, "irssi")?;
    let info = engine.inspect("irssi")?;
    ensure!(
        info["Config"]["Tty"] == true && info["Config"]["OpenStdin"] == true,
        "irssi has no TTY or no open stdin: {}",
        info["Config"]
    );
    engine.call("POST", "/containers/irssi/resize?h=24&w=80", None)?;

    let mut stream = TcpStream::connect(("127.0.0.1", api))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(
        b"POST /v1.41/containers/irssi/attach?stream=1&stdin=1&stdout=1&stderr=1 HTTP/1.1\r\n\
          Host: engine\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n",
    )?;
    let mut transcript = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !transcript.windows(4).any(|w| w == b"\r\n\r\n") {
        ensure!(Instant::now() < deadline, "no reply to attach");
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf) {
            Ok(0) => bail!("the engine closed the attach connection"),
            Ok(n) => transcript.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(e).context("reading the attach reply"),
        }
    }
    let head = String::from_utf8_lossy(&transcript).into_owned();
    ensure!(
        head.starts_with("HTTP/1.1 101"),
        "attach not upgraded: {head}"
    );

    // `/eval` expands `$V`, irssi's release date (YYYYMMDD), before it runs `echo`: the input
    // line shows `$V`, only the command's output shows the digits, so finding them proves
    // irssi ran what was typed.
    stream.write_all(b"/eval echo hello $V\r")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let echoed = |text: &str| {
        text.match_indices("hello ").any(|(at, m)| {
            let rest = &text.as_bytes()[at + m.len()..];
            rest.len() >= 8 && rest[..8].iter().all(u8::is_ascii_digit)
        })
    };
    loop {
        let text = String::from_utf8_lossy(&transcript).into_owned();
        if echoed(&text) {
            break;
        }
        if Instant::now() >= deadline {
            bail!("irssi never printed `hello <date>`; its terminal showed: {text:?}");
        }
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf) {
            Ok(0) => bail!("the attach stream closed; its terminal showed: {text:?}"),
            Ok(n) => transcript.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(e).context("reading irssi's terminal"),
        }
    }
    // Still running after the session: typing did not end it.
    let info = engine.inspect("irssi")?;
    ensure!(
        info["State"]["Running"] == true,
        "irssi stopped: {}",
        info["State"]
    );
    Ok(())
}

#[test]
fn celery_worker_processes_a_task() -> Result<()> {
    qemu_tests::require_qemu()?;
    let disk = build_with_engine("celery")?;
    let api = free_port()?;
    let mut vm = boot(disk, vec![(api, 2375)])?;
    let engine = Engine { port: api };
    engine.wait_ready(BOOT)?;
    wait_running_logged(&mut vm, &engine, "worker")?;

    let deadline = Instant::now() + BOOT;
    let output = loop {
        let (_, logs) = engine.request("GET", "/containers/submit/logs?stdout=1&stderr=1", None)?;
        let output = demux(&logs);
        let state = engine.inspect("submit")?;
        if state["State"]["Status"] == "exited" && output.contains("add(2, 3) =") {
            ensure!(
                state["State"]["ExitCode"] == 0,
                "submit exited {}: {output}",
                state["State"]["ExitCode"]
            );
            break output;
        }
        ensure!(
            Instant::now() < deadline,
            "submit printed no result; its log: {output}"
        );
        std::thread::sleep(Duration::from_secs(5));
    };
    ensure!(
        output.lines().any(|l| l.trim() == "add(2, 3) = 5"),
        "unexpected result: {output}"
    );
    let (_, logs) = engine.request("GET", "/containers/worker/logs?stdout=1&stderr=1", None)?;
    let worker = demux(&logs);
    ensure!(
        worker.contains("Task tasks.add[") && worker.contains("succeeded"),
        "the worker's log shows no processed task: {worker}"
    );
    // The three containers share the user network and nothing else.
    let network = engine.call("GET", "/networks/tasks", None)?;
    let members: Vec<&str> = network["Containers"]
        .as_object()
        .map(|m| m.values().filter_map(|c| c["Name"].as_str()).collect())
        .unwrap_or_default();
    for name in ["redis", "worker"] {
        ensure!(
            members.contains(&name),
            "{name} is not on the tasks network: {members:?}"
        );
    }
    Ok(())
}

#[test]
fn registry_takes_a_push_and_gives_it_back() -> Result<()> {
    qemu_tests::require_qemu()?;
    let disk = build_with_engine("registry")?;
    let api = free_port()?;
    let registry = free_port()?;
    let mut vm = boot(disk, vec![(api, 2375), (registry, 5000)])?;
    let engine = Engine { port: api };
    engine.wait_ready(BOOT)?;
    wait_running_logged(&mut vm, &engine, "registry")?;
    let catalog = http_get(registry, "/v2/_catalog", BOOT)?;
    ensure!(
        catalog.contains(r#""repositories":[]"#),
        "a new registry is not empty: {catalog}"
    );

    // The guest's one image, tagged for the registry on the machine's loopback.
    let pushed = "127.0.0.1:5000/examples/registry";
    let original = engine.call("GET", "/images/plinth/registry:1/json", None)?;
    engine.call(
        "POST",
        &format!("/images/plinth/registry:1/tag?repo={pushed}&tag=v1"),
        None,
    )?;
    // An anonymous registry: the engine still wants an X-Registry-Auth header (`{}`).
    let auth = "X-Registry-Auth: e30=\r\n";
    let (status, body) =
        engine_request(api, "POST", &format!("/images/{pushed}/push?tag=v1"), auth)?;
    check_progress("push", status, &body)?;
    ensure!(
        body.contains("digest: sha256:"),
        "push named no digest: {body}"
    );

    let catalog = http_get(registry, "/v2/_catalog", Duration::from_secs(30))?;
    ensure!(
        catalog.contains("examples/registry"),
        "the pushed repository is not in the catalog: {catalog}"
    );
    let tags = http_get(
        registry,
        "/v2/examples/registry/tags/list",
        Duration::from_secs(30),
    )?;
    ensure!(tags.contains(r#""v1""#), "tag v1 not listed: {tags}");

    engine.call("DELETE", &format!("/images/{pushed}:v1"), None)?;
    let (status, _) = engine.request("GET", &format!("/images/{pushed}:v1/json"), None)?;
    ensure!(
        status == 404,
        "the local tag is still there after removal (HTTP {status})"
    );
    let (status, body) = engine_request(
        api,
        "POST",
        &format!("/images/create?fromImage={pushed}&tag=v1"),
        auth,
    )?;
    check_progress("pull", status, &body)?;
    let pulled = engine.call("GET", &format!("/images/{pushed}:v1/json"), None)?;
    ensure!(
        pulled["Id"] == original["Id"],
        "the pulled image {} is not the one pushed {}",
        pulled["Id"],
        original["Id"]
    );
    Ok(())
}
