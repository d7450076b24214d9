//! Shutdown: the power button watcher, stopping everything in order, unmounting, `reboot(2)`.

use crate::stage2::supervise::Supervisor;
use crate::syscall::signals;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What to do once everything is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Power the machine off (SIGTERM, SIGPWR, the power button).
    PowerOff,
    /// Reboot (SIGINT from Ctrl-Alt-Del, SIGUSR1, fatal errors).
    Reboot,
}

impl Action {
    /// Name used in status lines.
    pub fn name(self) -> &'static str {
        match self {
            Action::PowerOff => "poweroff",
            Action::Reboot => "reboot",
        }
    }

    /// The action a signal asks PID 1 for, if any.
    pub fn from_signal(signal: i32) -> Option<Action> {
        match signal {
            signals::SIGTERM | signals::SIGPWR => Some(Action::PowerOff),
            signals::SIGINT | signals::SIGUSR1 => Some(Action::Reboot),
            _ => None,
        }
    }
}

/// How long the engine gets to stop containers.
pub const CONTAINER_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long processes get between SIGTERM and SIGKILL.
pub const TERM_TIMEOUT: Duration = Duration::from_secs(10);

/// `EV_KEY` event type.
pub const EV_KEY: u16 = 1;
/// `KEY_POWER` key code.
pub const KEY_POWER: u16 = 116;
/// Size of `struct input_event` on 64-bit Linux (timeval, type, code, value).
pub const INPUT_EVENT_SIZE: usize = 24;

/// True if a buffer of `struct input_event`s holds a press of the power key.
pub fn has_power_press(events: &[u8]) -> bool {
    events.chunks_exact(INPUT_EVENT_SIZE).any(|event| {
        let kind = u16::from_ne_bytes([event[16], event[17]]);
        let code = u16::from_ne_bytes([event[18], event[19]]);
        let value = i32::from_ne_bytes([event[20], event[21], event[22], event[23]]);
        kind == EV_KEY && code == KEY_POWER && value == 1
    })
}

/// Event devices (`<dev>/input/eventN`) whose name in `<sys>/class/input/eventN/device/name` is
/// "Power Button".
pub fn power_button_devices(sys: &Path, dev: &Path) -> Vec<PathBuf> {
    let class = sys.join("class/input");
    let Ok(entries) = std::fs::read_dir(&class) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("event") {
            continue;
        }
        let label =
            std::fs::read_to_string(class.join(&name).join("device/name")).unwrap_or_default();
        if label.trim() == "Power Button" {
            found.push(dev.join("input").join(&name));
        }
    }
    found.sort();
    found
}

/// Watches every "Power Button" input device in background threads; a press sends SIGTERM to
/// this process (power off). Devices are looked for for up to `wait` (modules load late).
pub fn watch_power_button(sys: PathBuf, dev: PathBuf, wait: Duration) {
    let spawned = std::thread::Builder::new()
        .name("power-button".into())
        .spawn(move || {
            let start = Instant::now();
            let devices = loop {
                let devices = power_button_devices(&sys, &dev);
                if !devices.is_empty() || start.elapsed() >= wait {
                    break devices;
                }
                std::thread::sleep(Duration::from_millis(500));
            };
            if devices.is_empty() {
                crate::info!("no \"Power Button\" input device: the power button is not handled");
                return;
            }
            for device in devices {
                crate::info!("watching power button {}", device.display());
                let _ = std::thread::Builder::new()
                    .name("power-button".into())
                    .spawn(move || watch_device(&device));
            }
        });
    if let Err(e) = spawned {
        crate::info!("starting the power button watcher failed: {e}");
    }
}

fn watch_device(device: &Path) {
    use std::io::Read;
    let mut file = match std::fs::File::open(device) {
        Ok(file) => file,
        Err(e) => {
            crate::info!("opening {} failed: {e}", device.display());
            return;
        }
    };
    let mut buf = [0u8; INPUT_EVENT_SIZE * 16];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if has_power_press(&buf[..n - n % INPUT_EVENT_SIZE]) {
                    crate::info!("power button pressed");
                    // Blocked in every thread, so the main loop takes it from the pending set.
                    let _ = rustix::process::kill_process(
                        rustix::process::getpid(),
                        rustix::process::Signal::Term,
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                crate::info!("reading {} failed: {e}", device.display());
                return;
            }
        }
    }
}

/// Reaps every exited child without blocking; returns false once no children are left.
pub fn reap(supervisor: &mut Supervisor, now: Duration) -> bool {
    use rustix::process::{wait, WaitOptions};
    loop {
        match wait(WaitOptions::NOHANG) {
            Ok(Some((pid, status))) => {
                let text = describe(status);
                let pid = pid.as_raw_nonzero().get() as u32;
                if supervisor.on_exit(pid, &text, now).is_none() {
                    record_watched_exit(pid, &text);
                }
            }
            Ok(None) => return true,
            Err(rustix::io::Errno::CHILD) => return false,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                crate::info!("waitpid failed: {e}");
                return true;
            }
        }
    }
}

/// Exit statuses of the children [`spawn_watched`] started: `None` while one runs.
static WATCHED: std::sync::Mutex<BTreeMap<u32, Option<String>>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Starts `command` as a child whose exit status the reaper keeps for [`watched_exit`]: code in
/// PID 1 must not wait on its own children, as the reaper takes every status first.
pub fn spawn_watched(command: &mut std::process::Command) -> std::io::Result<u32> {
    // Held across the spawn, so that the reaper cannot see the exit before the pid is watched.
    let mut watched = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
    let child = command.spawn()?;
    let pid = child.id();
    // The reaper collects the status; dropping `Child` neither kills nor waits.
    drop(child);
    watched.insert(pid, None);
    Ok(pid)
}

/// The exit status of a child from [`spawn_watched`] (`exit 0`, `signal 9`) once it exited; it
/// is forgotten once read.
pub fn watched_exit(pid: u32) -> Option<String> {
    let mut watched = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
    let status = watched.get(&pid).cloned().flatten()?;
    watched.remove(&pid);
    Some(status)
}

fn record_watched_exit(pid: u32, status: &str) {
    let mut watched = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(slot) = watched.get_mut(&pid) {
        *slot = Some(status.to_owned());
    }
}

/// Describes a wait status (`exit 1`, `signal 9`).
pub fn describe(status: rustix::process::WaitStatus) -> String {
    if let Some(code) = status.exit_status() {
        format!("exit {code}")
    } else if let Some(signal) = status.terminating_signal() {
        format!("signal {signal}")
    } else {
        format!("status {}", status.as_raw())
    }
}

/// Stops containers with `stop_containers` (bounded by `CONTAINER_STOP_TIMEOUT`), terminates and
/// kills every process, syncs, unmounts and powers off or reboots. Never returns.
pub fn shutdown(
    action: Action,
    supervisor: &mut Supervisor,
    stop_containers: Box<dyn FnOnce(Duration) -> anyhow::Result<()> + Send>,
) -> ! {
    crate::status::status("shutdown", &[("action", action.name())]);
    supervisor.stop();
    let (done_tx, done_rx) = mpsc::channel();
    let stopper = std::thread::Builder::new()
        .name("stop-containers".into())
        .spawn(move || {
            let _ = done_tx.send(stop_containers(CONTAINER_STOP_TIMEOUT));
        });
    match stopper {
        Ok(_) => match done_rx.recv_timeout(CONTAINER_STOP_TIMEOUT + Duration::from_secs(2)) {
            Ok(Ok(())) => crate::info!("containers stopped"),
            Ok(Err(e)) => crate::info!("stopping containers failed: {e:#}"),
            Err(_) => crate::info!("stopping containers timed out"),
        },
        Err(e) => crate::info!("starting the container stopper failed: {e}"),
    }
    terminate_all(supervisor);
    finish(action)
}

/// SIGTERM to every process, up to `TERM_TIMEOUT` for them to exit, then SIGKILL.
pub fn terminate_all(supervisor: &mut Supervisor) {
    let start = Instant::now();
    if let Err(e) = crate::syscall::kill_all(signals::SIGTERM) {
        crate::info!("sending SIGTERM to all processes failed: {e}");
    }
    while start.elapsed() < TERM_TIMEOUT {
        if !reap(supervisor, start.elapsed()) {
            crate::info!(
                "all processes exited after {} ms",
                start.elapsed().as_millis()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    crate::info!(
        "processes still running after {} s: sending SIGKILL",
        TERM_TIMEOUT.as_secs()
    );
    if let Err(e) = crate::syscall::kill_all(signals::SIGKILL) {
        crate::info!("sending SIGKILL to all processes failed: {e}");
    }
    let kill_start = Instant::now();
    while kill_start.elapsed() < Duration::from_secs(3) && reap(supervisor, start.elapsed()) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Syncs, unmounts everything it can (remounting the rest read-only), and calls `reboot(2)`.
pub fn finish(action: Action) -> ! {
    rustix::fs::sync();
    unmount_all();
    rustix::fs::sync();
    crate::info!(
        "{}",
        match action {
            Action::PowerOff => "powering off",
            Action::Reboot => "rebooting",
        }
    );
    let command = match action {
        Action::PowerOff => rustix::system::RebootCommand::PowerOff,
        Action::Reboot => rustix::system::RebootCommand::Restart,
    };
    if let Err(e) = rustix::system::reboot(command) {
        crate::info!("reboot(2) failed: {e}");
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Unmounts every mount in reverse order except the API filesystems that must stay; a busy
/// filesystem is remounted read-only so its journal is clean.
pub fn unmount_all() {
    use rustix::mount::{mount_remount, unmount, MountFlags, UnmountFlags};
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let keep = [
        Path::new("/proc"),
        Path::new("/sys"),
        Path::new("/dev"),
        Path::new("/run"),
    ];
    for target in crate::mounts::unmount_order(&crate::mounts::mountinfo_targets(&text)) {
        if keep.contains(&target.as_path()) {
            continue;
        }
        if let Err(unmount_error) = unmount(&target, UnmountFlags::empty()) {
            match mount_remount(&target, MountFlags::RDONLY, "") {
                Ok(()) => crate::info!("{} busy ({unmount_error}): remounted read-only", target.display()),
                Err(e) => crate::info!(
                    "unmounting {} failed ({unmount_error}) and remounting it read-only failed ({e})",
                    target.display()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> Vec<u8> {
        let mut e = vec![0u8; INPUT_EVENT_SIZE];
        e[16..18].copy_from_slice(&kind.to_ne_bytes());
        e[18..20].copy_from_slice(&code.to_ne_bytes());
        e[20..24].copy_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn power_press_is_key_power_down() {
        let mut buf = event(EV_KEY, KEY_POWER, 0);
        buf.extend(event(0, 0, 0));
        assert!(!has_power_press(&buf), "release and sync only");
        buf.extend(event(EV_KEY, 115, 1));
        assert!(!has_power_press(&buf), "another key");
        buf.extend(event(EV_KEY, KEY_POWER, 1));
        assert!(has_power_press(&buf));
    }

    #[test]
    fn finds_power_button_by_name() {
        let root = std::env::temp_dir().join(format!("plinth-input-{}", std::process::id()));
        for (event, name) in [
            ("event0", "AT Translated Set 2 keyboard"),
            ("event1", "Power Button"),
        ] {
            let dir = root.join("sys/class/input").join(event).join("device");
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("name"), format!("{name}\n")).expect("write");
        }
        std::fs::create_dir_all(root.join("sys/class/input/input3")).expect("mkdir");
        let found = power_button_devices(&root.join("sys"), Path::new("/dev"));
        assert_eq!(found, [PathBuf::from("/dev/input/event1")]);
        std::fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn signals_map_to_actions() {
        assert_eq!(
            Action::from_signal(signals::SIGTERM),
            Some(Action::PowerOff)
        );
        assert_eq!(Action::from_signal(signals::SIGINT), Some(Action::Reboot));
        assert_eq!(Action::from_signal(signals::SIGCHLD), None);
    }
}
