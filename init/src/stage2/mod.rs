//! Stage 2, PID 1 in the real root: prepare the system (cgroup2, tmpfs, hostname, loopback,
//! machine-id, modules), start the workload (engine and containers) and supervise forever.

pub mod containers;
pub mod docker;
pub mod install;
pub mod instance;
pub mod net;
pub mod services;
pub mod shutdown;
pub mod stability;
pub mod supervise;
pub mod swarm;
pub mod workload;

use crate::boot::{run_steps, Clock, Step};
use crate::coldplug::{log_report, ColdplugOnce, ModuleLoader};
use crate::mounts;
use crate::stage2::shutdown::Action;
use crate::stage2::supervise::{Service, Supervisor};
use crate::syscall::{self, signals};
use crate::system::{MountFlags, Paths, RealSystem, System};
use anyhow::{anyhow, Context as _, Result};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// What runs on top of the base system. The engine part implements it; `plinth-init` passes it
/// to `run`.
pub trait Workload: Send + Sync {
    /// Services to supervise, started in order (dockerd first).
    fn services(&self) -> Vec<Box<dyn Service>>;
    /// Runs once, in its own thread, after the services were spawned: wait for the engine, make
    /// the declared containers exist, health-check and bless. Must not wait on child processes
    /// (PID 1's reaper takes their status). An error is logged with `PLINTH-STATUS workload-failed`.
    fn after_start(&self) -> Result<()> {
        Ok(())
    }
    /// Stops the containers within `timeout` at shutdown.
    fn stop_containers(&self, _timeout: Duration) -> Result<()> {
        Ok(())
    }
    /// Modules to load at boot besides Plinth's own (the definition's `[kernel] modules`).
    fn modules(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The base workload: Docker Engine's daemon under supervision, nothing else.
#[derive(Debug, Default)]
pub struct EngineOnly;

impl Workload for EngineOnly {
    fn services(&self) -> Vec<Box<dyn Service>> {
        vec![Box::new(crate::stage2::supervise::Program::dockerd())]
    }
}

/// State carried between stage 2 steps.
pub struct Stage2<'a, S: System> {
    /// The machine.
    pub sys: &'a S,
    /// Paths (stage 2 layout: modules under `/usr/lib/modules`).
    pub paths: Paths,
    /// The machine ID (after `machine-id`).
    pub machine_id: Option<String>,
}

impl<S: System> std::fmt::Debug for Stage2<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage2")
            .field("paths", &self.paths)
            .field("machine_id", &self.machine_id)
            .finish()
    }
}

impl<S: System> Clock for Stage2<'_, S> {
    fn elapsed(&self) -> Duration {
        self.sys.now()
    }
}

impl<'a, S: System> Stage2<'a, S> {
    /// A fresh context.
    pub fn new(sys: &'a S, paths: Paths) -> Stage2<'a, S> {
        Stage2 {
            sys,
            paths,
            machine_id: None,
        }
    }
}

/// The preparation steps of stage 2, in order.
pub fn steps<'a, S: System>() -> Vec<Step<Stage2<'a, S>>> {
    vec![
        Step {
            name: "mount-api",
            run: mount_api,
        },
        Step {
            name: "report-root",
            run: report_root,
        },
        Step {
            name: "var-layout",
            run: var_layout,
        },
        Step {
            name: "hostname",
            run: hostname,
        },
        Step {
            name: "loopback",
            run: loopback,
        },
        Step {
            name: "machine-id",
            run: machine_id,
        },
        Step {
            name: "modules",
            run: modules,
        },
        Step {
            name: "engine-config",
            run: engine_config,
        },
    ]
}

fn mount_api<S: System>(ctx: &mut Stage2<S>) -> Result<()> {
    let p = &ctx.paths;
    // Stage 1 moved these in; mount them when booted without an initramfs.
    let basics = mounts::stage1_api(&p.proc_dir, &p.sys, &p.dev, &p.run);
    let present = [
        p.proc_dir.join("self"),
        p.sys.join("kernel"),
        p.dev.join("null"),
        p.run.clone(),
    ];
    for (spec, marker) in basics.iter().zip(present) {
        if !ctx.sys.exists(&marker) {
            spec.mount(ctx.sys)?;
        }
    }
    for spec in mounts::stage2_extra(&p.sys, &p.dev, &p.tmp) {
        spec.mount(ctx.sys)?;
    }
    Ok(())
}

/// Reports what the running system sees as `/` and `/var` (from mountinfo and the device-mapper
/// name in sysfs): `PLINTH-STATUS root source=/dev/dm-0 dm-name=root fstype=squashfs ro=yes`.
fn report_root<S: System>(ctx: &mut Stage2<S>) -> Result<()> {
    let path = ctx.paths.proc_dir.join("self/mountinfo");
    let text = ctx
        .sys
        .read(&path)
        .with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8_lossy(&text);
    let root = mounts::find_mount(&text, Path::new("/"))
        .ok_or_else(|| anyhow!("{} lists no mount on /", path.display()))?;
    let (major, minor) = root.dev;
    let dm_name = ctx
        .sys
        .read(
            &ctx.paths
                .sys
                .join(format!("dev/block/{major}:{minor}/dm/name")),
        )
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_else(|_| "-".into());
    let dev = format!("{major}:{minor}");
    crate::status::status(
        "root",
        &[
            ("source", &root.source),
            ("dev", &dev),
            ("dm-name", &dm_name),
            ("fstype", &root.fstype),
            ("ro", if root.read_only() { "yes" } else { "no" }),
        ],
    );
    let var = ctx.paths.var.clone();
    match mounts::find_mount(&text, &var) {
        Some(entry) => crate::status::status(
            "var",
            &[("source", &entry.source), ("fstype", &entry.fstype)],
        ),
        None => crate::info!(
            "{} is not a mount: its files are on the root filesystem",
            var.display()
        ),
    }
    Ok(())
}

/// `/var` is the persistent `state` partition: runtime directories under it point into `/run`.
fn var_layout<S: System>(ctx: &mut Stage2<S>) -> Result<()> {
    let var = &ctx.paths.var;
    for dir in ["lib/plinth", "log"] {
        let path = var.join(dir);
        ctx.sys
            .create_dir_all(&path)
            .with_context(|| format!("creating {}", path.display()))?;
    }
    let lock = ctx.paths.run.join("lock");
    ctx.sys
        .create_dir_all(&lock)
        .with_context(|| format!("creating {}", lock.display()))?;
    for (name, target) in [("run", "../run"), ("lock", "../run/lock")] {
        let link = var.join(name);
        match ctx.sys.symlink(Path::new(target), &link) {
            Ok(()) => {}
            // Made on an earlier boot (or a directory left by someone else): keep it.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("linking {} to {target}", link.display()))
            }
        }
    }
    Ok(())
}

fn hostname<S: System>(ctx: &mut Stage2<S>) -> Result<()> {
    let path = ctx.paths.etc.join("hostname");
    let name = match ctx.sys.read(&path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(e) => {
            crate::info!(
                "reading {} failed ({e}): host name stays \"plinth\"",
                path.display()
            );
            "plinth".to_string()
        }
    };
    let name = if name.is_empty() {
        "plinth".to_string()
    } else {
        name
    };
    ctx.sys
        .set_hostname(&name)
        .with_context(|| format!("setting host name {name:?}"))?;
    crate::info!("host name {name}");
    Ok(())
}

fn loopback<S: System>(ctx: &mut Stage2<S>) -> Result<()> {
    ctx.sys
        .interface_up("lo")
        .context("setting interface lo up")
}

/// Checks a machine ID: 32 lowercase hex digits, not all zero.
pub fn valid_machine_id(text: &str) -> bool {
    text.len() == 32
        && text
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        && text.chars().any(|c| c != '0')
}

/// Formats 16 random bytes as a machine ID (a version-4 UUID without dashes, as systemd does).
pub fn machine_id_from_random(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    hex::encode(bytes)
}

fn machine_id<S: System>(ctx: &mut Stage2<S>) -> Result<()> {
    let stored = ctx.paths.var.join("lib/plinth/machine-id");
    let existing = ctx
        .sys
        .read(&stored)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .filter(|id| valid_machine_id(id));
    let id = match existing {
        Some(id) => id,
        None => {
            let mut bytes = [0u8; 16];
            ctx.sys
                .random_bytes(&mut bytes)
                .context("reading random bytes for the machine ID")?;
            let id = machine_id_from_random(bytes);
            let temporary = stored.with_extension("new");
            ctx.sys
                .write(&temporary, format!("{id}\n").as_bytes())
                .with_context(|| format!("writing {}", temporary.display()))?;
            ctx.sys.rename(&temporary, &stored).with_context(|| {
                format!("renaming {} to {}", temporary.display(), stored.display())
            })?;
            crate::info!("new machine ID {id}");
            id
        }
    };
    let runtime = ctx.paths.run.join("machine-id");
    // Checked before /run/machine-id exists: true only for a real file in the image, which gets
    // the ID bind-mounted over it. The usual `/etc/machine-id -> ../run/machine-id` link needs nothing.
    let etc = ctx.paths.etc.join("machine-id");
    let etc_is_file = ctx.sys.exists(&etc);
    ctx.sys
        .write(&runtime, format!("{id}\n").as_bytes())
        .with_context(|| format!("writing {}", runtime.display()))?;
    if etc_is_file {
        ctx.sys
            .mount(&runtime.to_string_lossy(), &etc, "", MountFlags::BIND, "")
            .with_context(|| {
                format!("bind-mounting {} over {}", runtime.display(), etc.display())
            })?;
    }
    crate::status::status("machine-id", &[("id", &id)]);
    ctx.machine_id = Some(id);
    Ok(())
}

/// Loads the modules the engine needs before it starts. Everything else (coldplug of the devices
/// present, the power button, release media) waits for [`load_device_modules`], which runs beside
/// the starting engine: dockerd takes many seconds to answer, and nothing it does at start needs a
/// device driver.
fn modules<S: System>(ctx: &mut Stage2<S>) -> Result<()> {
    let Some(mut loader) = open_modules(ctx.sys, &ctx.paths) else {
        return Ok(());
    };
    let report = loader.load(ctx.sys, os_config::modules::ENGINE);
    log_report("engine modules", &report);
    Ok(())
}

fn open_modules<S: System + ?Sized>(sys: &S, paths: &Paths) -> Option<ModuleLoader> {
    let release = sys.kernel_release();
    match ModuleLoader::open(sys, &paths.modules, &release) {
        Ok(loader) => Some(loader),
        Err(e) => {
            crate::info!("no loadable modules ({e:#}): relying on built-in drivers");
            None
        }
    }
}

/// The coldplug of this boot: provisioning's, when a metadata service needs the network card's
/// driver first, else the one [`load_device_modules`] runs beside the starting engine.
pub static BOOT_COLDPLUG: ColdplugOnce = ColdplugOnce::new();

/// Coldplug of the devices present (network cards among them), unless `coldplug` already ran.
pub fn coldplug_devices<S: System + ?Sized>(sys: &S, paths: &Paths, coldplug: &ColdplugOnce) {
    if let Some(mut loader) = open_modules(sys, paths) {
        coldplug.run(&mut loader, sys, &paths.sys, 4);
    }
}

/// Coldplug of the devices present (network cards among them) unless `coldplug` already ran,
/// then the power button and media modules, then `extra` (the definition's `[kernel] modules`).
/// Runs after the engine was started, before the network is configured.
pub fn load_device_modules<S: System + ?Sized>(
    sys: &S,
    paths: &Paths,
    coldplug: &ColdplugOnce,
    extra: &[String],
) {
    let started = sys.now();
    let Some(mut loader) = open_modules(sys, paths) else {
        return;
    };
    coldplug.run(&mut loader, sys, &paths.sys, 4);
    let mut wanted: Vec<&str> = os_config::modules::POWER_BUTTON.to_vec();
    wanted.extend(os_config::modules::MEDIA);
    wanted.extend(extra.iter().map(String::as_str));
    let report = loader.load(sys, &wanted);
    log_report("power button, media and [kernel] modules", &report);
    crate::info!(
        "device modules done in {} ms",
        sys.now().saturating_sub(started).as_millis()
    );
}

/// `/etc` is read-only but dockerd writes `/etc/docker/key.json`: give it a persistent, writable
/// `/etc/docker` under `/var/lib/plinth/etc-docker`, refreshed from the image's files each boot.
fn engine_config<S: System>(ctx: &mut Stage2<S>) -> Result<()> {
    let etc_docker = ctx.paths.etc.join("docker");
    if !ctx.sys.exists(&etc_docker) {
        crate::info!(
            "{} does not exist: dockerd keeps its defaults",
            etc_docker.display()
        );
        return Ok(());
    }
    let writable = ctx.paths.var.join("lib/plinth/etc-docker");
    ctx.sys
        .create_dir_all(&writable)
        .with_context(|| format!("creating {}", writable.display()))?;
    for name in ctx
        .sys
        .list_dir(&etc_docker)
        .with_context(|| format!("listing {}", etc_docker.display()))?
    {
        let from = etc_docker.join(&name);
        if let Ok(data) = ctx.sys.read(&from) {
            let to = writable.join(&name);
            ctx.sys
                .write(&to, &data)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    ctx.sys
        .mount(
            &writable.to_string_lossy(),
            &etc_docker,
            "",
            MountFlags::BIND,
            "",
        )
        .with_context(|| {
            format!(
                "bind-mounting {} over {}",
                writable.display(),
                etc_docker.display()
            )
        })
}

/// Runs stage 2 as PID 1: prepare, make the workload (`make` runs once the system is prepared,
/// so it may read devices, firmware tables and the network: the instance's data), start it,
/// supervise forever, shut down on request. An error from `make` is fatal.
pub fn run(make: impl FnOnce(&Paths) -> Result<Arc<dyn Workload>>) -> ! {
    crate::status::open_sinks();
    crate::status::status("stage2-start", &[]);
    // Before any thread exists, so that every thread shares one small heap.
    crate::memory::limit_heap();
    if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        crate::info!("PR_SET_CHILD_SUBREAPER failed: {e}");
    }
    if let Err(e) = rustix::system::reboot(rustix::system::RebootCommand::CadOff) {
        crate::info!("disabling Ctrl-Alt-Del reboot failed: {e}");
    }
    // Blocked before any thread or child exists: threads inherit the mask, children get it reset.
    let set = match syscall::block_signals(&[
        signals::SIGCHLD,
        signals::SIGTERM,
        signals::SIGINT,
        signals::SIGPWR,
        signals::SIGUSR1,
    ]) {
        Ok(set) => set,
        Err(e) => fatal(anyhow!(e).context("blocking signals")),
    };
    let system = RealSystem::default();
    let mut ctx = Stage2::new(&system, Paths::stage2_under(Path::new("/")));
    if let Err(e) = run_steps("stage2", &steps(), &mut ctx) {
        fatal(e);
    }
    crate::status::status("stage2-ready", &[("uptime-ms", &uptime_ms())]);
    let workload = match make(&ctx.paths) {
        Ok(workload) => workload,
        Err(e) => fatal(e),
    };
    // The power button's modules are loaded with the other device modules, after the engine
    // started: the watcher waits for its input device that long.
    shutdown::watch_power_button(
        ctx.paths.sys.clone(),
        ctx.paths.dev.clone(),
        Duration::from_secs(60),
    );
    let mut supervisor = Supervisor::new(workload.services());
    supervisor.start_due(system.now());
    let after = workload.clone();
    let paths = ctx.paths.clone();
    let extra = workload.modules();
    let started = std::thread::Builder::new()
        .name("workload".into())
        .spawn(move || {
            load_device_modules(&RealSystem::default(), &paths, &BOOT_COLDPLUG, &extra);
            if let Err(e) = after.after_start() {
                crate::info!("workload failed: {e:#}");
                crate::status::status("workload-failed", &[("error", &format!("{e:#}"))]);
            }
        });
    if let Err(e) = started {
        crate::info!("starting the workload thread failed: {e}");
    }
    loop {
        let now = system.now();
        let timeout = supervisor
            .next_deadline()
            .map_or(Duration::from_secs(60), |at| at.saturating_sub(now))
            .clamp(Duration::from_millis(10), Duration::from_secs(60));
        match syscall::wait_signal(&set, timeout) {
            Ok(Some(signal)) => {
                if let Some(action) = Action::from_signal(signal) {
                    let stopper = workload.clone();
                    shutdown::shutdown(
                        action,
                        &mut supervisor,
                        Box::new(move |t| stopper.stop_containers(t)),
                    );
                }
            }
            Ok(None) => {}
            Err(e) => {
                crate::info!("waiting for signals failed: {e}");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        shutdown::reap(&mut supervisor, system.now());
        supervisor.start_due(system.now());
    }
}

/// Milliseconds since the kernel started, from `/proc/uptime` ("?" if unreadable).
pub fn uptime_ms() -> String {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<f64>().ok())
        .map_or("?".into(), |seconds| format!("{:.0}", seconds * 1000.0))
}

/// Logs a fatal error, stops everything and reboots. Never returns.
pub fn fatal(error: anyhow::Error) -> ! {
    crate::info!("fatal: {error:#}");
    crate::status::status("fatal", &[("error", &format!("{error:#}"))]);
    let mut none = Supervisor::new(Vec::new());
    none.stop();
    shutdown::terminate_all(&mut none);
    shutdown::finish(Action::Reboot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::FakeSystem;

    fn machine() -> FakeSystem {
        let sys = FakeSystem::new("6.1.0-test");
        sys.add_file("/etc/hostname", "demo\n");
        sys.add_file("/etc/machine-id", "");
        sys.add_file("/etc/docker/daemon.json", "{}");
        sys.add_dir("/var");
        sys.add_dir("/run");
        sys.add_dir("/proc/self");
        sys.add_dir("/sys/kernel");
        sys.add_file("/dev/null", "");
        sys.add_file(
            "/proc/self/mountinfo",
            "22 1 253:0 / / ro,relatime - squashfs /dev/dm-0 ro\n24 22 254:6 / /var rw - ext4 /dev/vda6 rw\n",
        );
        sys.add_file("/sys/dev/block/253:0/dm/name", "root\n");
        let modules = "/usr/lib/modules/6.1.0-test";
        sys.add_file(
            format!("{modules}/modules.dep"),
            "kernel/overlay.ko:\nkernel/veth.ko:\nkernel/evdev.ko:\n",
        );
        sys.add_file(format!("{modules}/modules.alias"), "");
        for m in ["overlay", "veth", "evdev"] {
            sys.add_file(format!("{modules}/kernel/{m}.ko"), "ko");
        }
        sys
    }

    fn run_on(sys: &FakeSystem) -> Result<Stage2<'_, FakeSystem>> {
        let mut ctx = Stage2::new(sys, Paths::stage2_under(Path::new("/")));
        run_steps("stage2", &steps(), &mut ctx)?;
        Ok(ctx)
    }

    #[test]
    fn prepares_the_system_in_order() {
        let sys = machine();
        let ctx = run_on(&sys).expect("stage 2 steps");
        let id = ctx.machine_id.clone().expect("machine id");
        assert!(valid_machine_id(&id), "{id}");
        let calls: Vec<String> = sys
            .calls()
            .into_iter()
            .filter(|c| !c.starts_with("mkdir"))
            .collect();
        assert_eq!(
            calls,
            [
                "mount cgroup2 cgroup2 /sys/fs/cgroup nsdelegate".to_string(),
                "mount devpts devpts /dev/pts gid=5,mode=620,ptmxmode=666".into(),
                "mount tmpfs tmpfs /dev/shm mode=1777".into(),
                "mount tmpfs tmpfs /tmp mode=1777".into(),
                "symlink /var/run ../run".into(),
                "symlink /var/lock ../run/lock".into(),
                "hostname demo".into(),
                "link-up lo".into(),
                "write /var/lib/plinth/machine-id.new".into(),
                "rename /var/lib/plinth/machine-id.new /var/lib/plinth/machine-id".into(),
                "write /run/machine-id".into(),
                "mount  /run/machine-id /etc/machine-id".into(),
                "load /usr/lib/modules/6.1.0-test/kernel/overlay.ko".into(),
                "load /usr/lib/modules/6.1.0-test/kernel/veth.ko".into(),
                "write /var/lib/plinth/etc-docker/daemon.json".into(),
                "mount  /var/lib/plinth/etc-docker /etc/docker".into(),
            ]
        );
    }

    #[test]
    fn device_modules_wait_until_after_the_steps() {
        let sys = machine();
        run_on(&sys).expect("stage 2 steps");
        let loads = |sys: &FakeSystem| -> Vec<String> {
            sys.calls()
                .into_iter()
                .filter(|c| c.starts_with("load "))
                .collect()
        };
        assert!(
            !loads(&sys).iter().any(|c| c.ends_with("evdev.ko")),
            "the power button's module is not loaded before the engine starts"
        );
        load_device_modules(
            &sys,
            &Paths::stage2_under(Path::new("/")),
            &ColdplugOnce::new(),
            &[],
        );
        assert_eq!(
            loads(&sys).last().map(String::as_str),
            Some("load /usr/lib/modules/6.1.0-test/kernel/evdev.ko")
        );
    }

    #[test]
    fn coldplug_runs_once_when_provisioning_ran_it() {
        let sys = machine();
        let modules = "/usr/lib/modules/6.1.0-test";
        sys.add_file(
            format!("{modules}/modules.dep"),
            "kernel/overlay.ko:\nkernel/veth.ko:\nkernel/evdev.ko:\nkernel/virtio_net.ko:\n",
        );
        sys.add_file(
            format!("{modules}/modules.alias"),
            "alias virtio:d00000001v* virtio_net\n",
        );
        sys.add_file(format!("{modules}/kernel/virtio_net.ko"), "ko");
        sys.add_file(
            "/sys/bus/virtio/devices/virtio0/modalias",
            "virtio:d00000001v00001AF4",
        );
        run_on(&sys).expect("stage 2 steps");
        let paths = Paths::stage2_under(Path::new("/"));
        let coldplug = ColdplugOnce::new();
        coldplug_devices(&sys, &paths, &coldplug);
        load_device_modules(&sys, &paths, &coldplug, &[]);
        let loads: Vec<String> = sys
            .calls()
            .into_iter()
            .filter(|c| c.starts_with("load ") && !c.contains("/overlay.") && !c.contains("/veth."))
            .collect();
        assert_eq!(
            loads,
            [
                "load /usr/lib/modules/6.1.0-test/kernel/virtio_net.ko",
                "load /usr/lib/modules/6.1.0-test/kernel/evdev.ko",
            ]
        );
    }

    #[test]
    fn loads_the_definitions_kernel_modules_too() {
        let sys = machine();
        sys.add_file(
            "/usr/lib/modules/6.1.0-test/modules.dep",
            "kernel/overlay.ko:\nkernel/veth.ko:\nkernel/evdev.ko:\nkernel/xfs.ko:\n",
        );
        sys.add_file("/usr/lib/modules/6.1.0-test/kernel/xfs.ko", "ko");
        run_on(&sys).expect("stage 2 steps");
        load_device_modules(
            &sys,
            &Paths::stage2_under(Path::new("/")),
            &ColdplugOnce::new(),
            &["xfs".to_string()],
        );
        let loads: Vec<String> = sys
            .calls()
            .into_iter()
            .filter(|c| c.starts_with("load "))
            .collect();
        assert_eq!(
            loads.last().map(String::as_str),
            Some("load /usr/lib/modules/6.1.0-test/kernel/xfs.ko")
        );
        assert_eq!(loads.len(), 4, "{loads:?}");
    }

    #[test]
    fn machine_id_persists_across_boots() {
        let sys = machine();
        sys.add_file(
            "/var/lib/plinth/machine-id",
            "0123456789abcdef0123456789abcdef\n",
        );
        let ctx = run_on(&sys).expect("stage 2 steps");
        assert_eq!(
            ctx.machine_id.as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        assert!(!sys
            .calls()
            .iter()
            .any(|c| c.contains("/var/lib/plinth/machine-id")));
        assert_eq!(
            sys.read(Path::new("/run/machine-id")).expect("runtime id"),
            b"0123456789abcdef0123456789abcdef\n"
        );
    }

    #[test]
    fn a_second_boot_keeps_links_and_id() {
        let sys = machine();
        let first = run_on(&sys).expect("first boot").machine_id;
        let second = run_on(&sys).expect("second boot").machine_id;
        assert_eq!(first, second);
        let links = sys
            .calls()
            .iter()
            .filter(|c| c.starts_with("symlink"))
            .count();
        assert_eq!(links, 2, "links made once");
    }

    #[test]
    fn machine_id_format() {
        let id = machine_id_from_random([0xff; 16]);
        assert_eq!(id, "ffffffffffff4fffbfffffffffffffff");
        assert!(valid_machine_id(&id));
        assert!(!valid_machine_id("00000000000000000000000000000000"));
        assert!(!valid_machine_id("0123456789ABCDEF0123456789abcdef"));
        assert!(!valid_machine_id("short"));
    }

    #[test]
    fn failing_mount_names_the_step_and_target() {
        let sys = machine();
        sys.fail_on("mount cgroup2");
        let err = run_on(&sys).expect_err("cgroup2 fails");
        let text = format!("{err:#}");
        assert!(text.contains("stage2 step mount-api"), "{text}");
        assert!(
            text.contains("mounting cgroup2 (cgroup2) at /sys/fs/cgroup"),
            "{text}"
        );
    }
}
