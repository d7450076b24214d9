//! The whole system under QEMU (OVMF, TCG): boot to running containers, the demo page through a
//! host forward, a read-only root with `/var` on the state partition, container and engine
//! restarts, no zombies after a container storm, clean power-off, and `/var` data across a reboot.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use qemu_tests::engine::{http_get, Engine};
use qemu_tests::{free_port, image, Vm, VmOptions};

const BOOT: Duration = Duration::from_secs(240);
const HELPER_IMAGE: &str = "plinth/busybox:1";

fn e2e_image() -> Result<std::path::PathBuf> {
    let top = image::workspace();
    image::build(
        &top.join("qemu-tests/images/e2e.toml"),
        &top.join("images/qemu.lock"),
    )
}

#[test]
fn boots_runs_supervises_and_shuts_down() -> Result<()> {
    let raw = e2e_image()?;
    let dir = tempfile::tempdir()?;
    let disk = image::private_copy(&raw, dir.path())?;
    let (web, api) = (free_port()?, free_port()?);
    let mut opts = VmOptions::new(&disk);
    opts.forwards = vec![(web, 8080), (api, 2375)];

    let mut vm = Vm::boot(&opts)?;
    let started = Instant::now();
    let phase = |what: &str| eprintln!("{what} at {:.0}s", started.elapsed().as_secs_f64());
    vm.wait_status("engine-ready", BOOT)?;
    let engine_ready = started.elapsed();
    vm.wait_for("PLINTH-STATUS container-running name=web", BOOT)?;
    eprintln!(
        "QEMU start to engine-ready {:.1}s, to container-running {:.1}s",
        engine_ready.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // The demo page, fetched from the host through the forwarded port.
    let page = http_get(web, "/", Duration::from_secs(60))?;
    ensure!(
        page.contains("Hello from Plinth"),
        "unexpected page: {page}"
    );

    let engine = Engine { port: api };
    engine.wait_ready(Duration::from_secs(60))?;

    // The container options real applications use, as the engine applied them to `probe`; it
    // reaches `web` by its alias on the user-defined network `back`.
    vm.wait_for("PLINTH-STATUS container-running name=probe", BOOT)?;
    let probe = engine.inspect("probe")?;
    let config = &probe["Config"];
    let host = &probe["HostConfig"];
    ensure!(
        config["Tty"] == true && config["User"] == "1000:1000" && config["WorkingDir"] == "/tmp",
        "probe's TTY, user or working folder: {config}"
    );
    ensure!(
        host["Memory"] == 64 << 20
            && host["NanoCpus"] == 500_000_000
            && host["ReadonlyRootfs"] == true
            && host["CapDrop"].to_string().contains("ALL"),
        "probe's limits, read-only root or capabilities: {host}"
    );
    ensure!(
        host["LogConfig"]["Type"] == "json-file"
            && host["LogConfig"]["Config"]["max-size"] == "10m"
            && host["LogConfig"]["Config"]["max-file"] == "3",
        "log rotation is not on by default: {}",
        host["LogConfig"]
    );
    ensure!(
        host["PortBindings"]["81/tcp"][0]["HostIp"] == "127.0.0.1",
        "probe's port is not bound to the loopback address: {}",
        host["PortBindings"]
    );
    let aliases = probe["NetworkSettings"]["Networks"]["back"]["Aliases"].to_string();
    ensure!(
        aliases.contains("probe-alias"),
        "probe is not on `back` with its alias: {}",
        probe["NetworkSettings"]["Networks"]
    );
    let web_started = engine.inspect("web")?["State"]["StartedAt"].to_string();
    let probe_started = probe["State"]["StartedAt"].to_string();
    ensure!(
        probe_started >= web_started,
        "probe (depends on web) started at {probe_started}, before web at {web_started}"
    );
    wait_until(Duration::from_secs(120), || {
        let (_, logs) = engine.request("GET", "/containers/probe/logs?stdout=1", None)?;
        Ok(String::from_utf8_lossy(&logs).contains("Hello from Plinth"))
    })
    .context("probe never fetched the page from web's alias `www` on the network `back`")?;

    phase("probe checked");
    // The root is read-only and /var is the ext4 state partition.
    let touch = engine.run(
        HELPER_IMAGE,
        &["/bin/busybox", "touch", "/host/usr/plinth-write-test"],
        true,
        &["/:/host"],
    )?;
    ensure!(
        touch.exit_code != 0,
        "writing under /usr succeeded: {touch:?}"
    );
    ensure!(
        touch.output.contains("Read-only file system"),
        "unexpected error: {touch:?}"
    );
    let mounts = engine.run(
        HELPER_IMAGE,
        &["/bin/busybox", "cat", "/proc/1/mountinfo"],
        true,
        &[],
    )?;
    let var = mounts
        .output
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/var"))
        .with_context(|| format!("no /var mount in PID 1's mountinfo:\n{}", mounts.output))?;
    ensure!(var.contains(" - ext4 "), "/var is not ext4: {var}");
    let root = mounts
        .output
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .context("no / mount")?;
    ensure!(
        root.split_whitespace()
            .nth(5)
            .is_some_and(|o| o.starts_with("ro")),
        "root not read-only: {root}"
    );

    phase("root and /var checked");
    // A container whose process is killed is restarted by its restart policy.
    let before = engine.inspect("web")?;
    let pid = before["State"]["Pid"].as_i64().context("web has no pid")?;
    let restarts = before["RestartCount"].as_i64().unwrap_or(0);
    engine.run(
        HELPER_IMAGE,
        &["/bin/busybox", "kill", "-9", &pid.to_string()],
        true,
        &[],
    )?;
    wait_until(Duration::from_secs(60), || {
        let now = engine.inspect("web")?;
        Ok(now["RestartCount"].as_i64().unwrap_or(0) > restarts && now["State"]["Running"] == true)
    })
    .context("web was not restarted after its process was killed")?;

    phase("web restarted");
    // No zombies after a storm of short containers (without a network: what leaves zombies is
    // the shims and runtimes PID 1 inherits, and a veth pair per container would only make each
    // start seconds slower under TCG).
    for i in 0..STORM {
        let created = engine.call(
            "POST",
            &format!("/containers/create?name=storm-{i}"),
            Some(&serde_json::json!({ "Image": HELPER_IMAGE, "Cmd": ["/bin/busybox", "true"], "HostConfig": { "AutoRemove": true, "NetworkMode": "none" } })),
        )?;
        let id = created["Id"].as_str().context("no id")?;
        engine.call("POST", &format!("/containers/{id}/start"), None)?;
    }
    wait_until(Duration::from_secs(120), || {
        let list = engine.call(
            "GET",
            "/containers/json?all=1&filters=%7B%22name%22%3A%5B%22storm-%22%5D%7D",
            None,
        )?;
        Ok(list.as_array().is_some_and(Vec::is_empty))
    })
    .context("storm containers did not all finish")?;
    let zombies = zombie_count(&engine)?;
    ensure!(
        zombies == "0",
        "zombie processes after the storm: {zombies}"
    );

    phase("storm reaped");
    // dockerd killed with SIGKILL is restarted by plinth-init and the containers come back.
    let mark = vm.console().len();
    let _killed = engine.run(
        HELPER_IMAGE,
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "kill -9 $(/bin/busybox pidof dockerd)",
        ],
        true,
        &[],
    );
    let (_, after) = vm.wait_for_after("PLINTH-STATUS engine-ready", mark, BOOT)?;
    vm.wait_for_after("PLINTH-STATUS container-running name=web", after, BOOT)?;
    let page = http_get(web, "/", Duration::from_secs(60))?;
    ensure!(
        page.contains("Hello from Plinth"),
        "unexpected page after engine restart: {page}"
    );
    // The killed dockerd's children (containerd, the shims) were handed to PID 1, which reaped
    // every one that exited.
    engine.wait_ready(Duration::from_secs(60))?;
    let zombies = zombie_count(&engine)?;
    ensure!(
        zombies == "0",
        "zombie processes after dockerd was killed: {zombies}"
    );

    phase("engine restarted");
    let boots_before = http_get(web, "/boots.txt", Duration::from_secs(60))?
        .lines()
        .count();

    // ACPI power button: a clean shutdown, QEMU exits 0 within 30 s.
    let mark = vm.console().len();
    vm.monitor("system_powerdown")?;
    vm.wait_for_after("PLINTH-STATUS shutdown", mark, Duration::from_secs(30))?;
    let status = vm.wait_exit(Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "QEMU exited with {status}\n{}",
        vm.console()
    );
    drop(vm);

    phase("powered off");
    // What a container wrote into its /var volume survives the reboot.
    let mut vm = Vm::boot(&opts)?;
    vm.wait_for("PLINTH-STATUS container-running name=web", BOOT)?;
    let boots = http_get(web, "/boots.txt", Duration::from_secs(60))?;
    ensure!(
        boots.lines().count() > boots_before && boots.lines().all(|l| l == "boot"),
        "boots.txt had {boots_before} lines before the reboot, now: {boots:?}"
    );
    phase("second boot checked");
    Ok(())
}

/// How many processes of the machine are zombies, counted from a container in the host's PID
/// namespace.
fn zombie_count(engine: &Engine) -> Result<String> {
    let run = engine.run(
        HELPER_IMAGE,
        &["/bin/busybox", "sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null | /bin/busybox awk '$3 == \"Z\"' | /bin/busybox wc -l"],
        true,
        &[],
    )?;
    ensure!(run.exit_code == 0, "counting zombies failed: {run:?}");
    Ok(run.output.trim().to_owned())
}

/// Short containers started one after another in the zombie check.
const STORM: usize = 16;

fn wait_until(timeout: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) if Instant::now() < deadline => std::thread::sleep(Duration::from_secs(1)),
            Ok(false) => anyhow::bail!("condition not met within {timeout:?}"),
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying: {e:#}");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}
