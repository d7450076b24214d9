//! Supervision of long-running children (dockerd, the update agent): spawn, notice exits through
//! the reaper, restart with exponential backoff.
//!
//! PID 1 reaps every child with `waitpid(-1)`, so code running inside PID 1 must not wait on a
//! child of its own (`Child::wait`, `Command::output`): the reaper may take its status first.

use anyhow::{Context as _, Result};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A long-running program PID 1 keeps alive.
pub trait Service: Send {
    /// Short name for logs and status lines (`dockerd`).
    fn name(&self) -> &str;
    /// Starts the program. Build the command with `supervise::command`, which gives the child
    /// an empty signal mask and a clean environment.
    fn spawn(&self) -> Result<Child>;
    /// Called after the process exited, before a restart is scheduled (e.g. to log its output).
    fn exited(&self) {}
}

/// Unix socket the supervised dockerd listens on.
pub const DOCKER_SOCKET: &str = "/run/docker.sock";

/// `PATH` given to supervised programs.
pub const SERVICE_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// A command for a supervised program: `PATH` and `HOME` only, stdin from /dev/null, and no
/// signals blocked in the child (PID 1 blocks the ones it waits for; a child would inherit them).
pub fn command(program: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .env_clear()
        .env("PATH", SERVICE_PATH)
        .env("HOME", "/root")
        .stdin(Stdio::null());
    crate::syscall::unblock_signals_in_child(&mut command);
    command
}

/// A supervised program whose output goes to a log file under `/var/log`; the file's last lines
/// are echoed to the console when it exits.
#[derive(Debug, Clone)]
pub struct Program {
    /// Name for logs and status lines.
    pub name: String,
    /// The executable: an absolute path, or a name looked up in `SERVICE_PATH`.
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Log file for its stdout and stderr.
    pub log: PathBuf,
}

impl Program {
    /// Docker Engine's daemon, listening on `DOCKER_SOCKET`. Found through `SERVICE_PATH`:
    /// Debian installs it as `/usr/sbin/dockerd`.
    pub fn dockerd() -> Program {
        Program {
            name: "dockerd".into(),
            program: PathBuf::from("dockerd"),
            args: vec![format!("--host=unix://{DOCKER_SOCKET}")],
            log: PathBuf::from("/var/log/dockerd.log"),
        }
    }

    /// The update agent.
    pub fn update_agent() -> Program {
        Program {
            name: "plinth-update".into(),
            program: PathBuf::from("plinth-update"),
            args: Vec::new(),
            log: PathBuf::from("/var/log/plinth-update.log"),
        }
    }
}

/// Log files above this size are rotated to `<name>.1` when the service starts.
const LOG_ROTATE_BYTES: u64 = 16 * 1024 * 1024;

impl Service for Program {
    fn name(&self) -> &str {
        &self.name
    }

    fn spawn(&self) -> Result<Child> {
        if let Some(parent) = self.log.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        if std::fs::metadata(&self.log).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
            let rotated = self.log.with_extension("log.1");
            std::fs::rename(&self.log, &rotated).with_context(|| {
                format!("rotating {} to {}", self.log.display(), rotated.display())
            })?;
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let err = log
            .try_clone()
            .with_context(|| format!("duplicating {}", self.log.display()))?;
        command(&self.program)
            .args(&self.args)
            .stdout(log)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))
    }

    fn exited(&self) {
        for line in tail_lines(&self.log, 8) {
            crate::info!("{}: {line}", self.name);
        }
    }
}

/// The last `count` lines of a text file (empty if unreadable).
pub fn tail_lines(path: &Path, count: usize) -> Vec<String> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// Delay before the `failures`-th consecutive restart: 1 s, 2 s, 4 s … capped at 60 s.
pub fn backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(6);
    Duration::from_secs(1u64 << exponent).min(MAX_BACKOFF)
}

/// Longest delay between restarts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A run at least this long resets the failure count.
pub const STABLE_RUN: Duration = Duration::from_secs(60);

struct Entry {
    service: Box<dyn Service>,
    pid: Option<u32>,
    started_at: Duration,
    failures: u32,
    next_start: Option<Duration>,
}

/// Keeps services running. Time is passed in (monotonic, since boot) so the policy is testable.
pub struct Supervisor {
    entries: Vec<Entry>,
    stopping: bool,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.entries.iter().map(|e| e.service.name()).collect();
        f.debug_struct("Supervisor")
            .field("services", &names)
            .finish()
    }
}

impl Supervisor {
    /// Supervises `services`; each starts at the first `start_due`.
    pub fn new(services: Vec<Box<dyn Service>>) -> Supervisor {
        Supervisor {
            entries: services
                .into_iter()
                .map(|service| Entry {
                    service,
                    pid: None,
                    started_at: Duration::ZERO,
                    failures: 0,
                    next_start: Some(Duration::ZERO),
                })
                .collect(),
            stopping: false,
        }
    }

    /// Starts every service whose (re)start time has come.
    pub fn start_due(&mut self, now: Duration) {
        if self.stopping {
            return;
        }
        for entry in &mut self.entries {
            if entry.next_start.is_none_or(|at| at > now) {
                continue;
            }
            entry.next_start = None;
            match entry.service.spawn() {
                Ok(child) => {
                    let pid = child.id();
                    // The reaper collects the exit status; dropping `Child` neither kills nor waits.
                    drop(child);
                    entry.pid = Some(pid);
                    entry.started_at = now;
                    crate::status::status(
                        "service-started",
                        &[("name", entry.service.name()), ("pid", &pid.to_string())],
                    );
                }
                Err(e) => {
                    entry.failures += 1;
                    let delay = backoff(entry.failures);
                    entry.next_start = Some(now + delay);
                    crate::info!(
                        "starting {} failed: {e:#}; retrying in {} s",
                        entry.service.name(),
                        delay.as_secs()
                    );
                    crate::status::status(
                        "service-failed",
                        &[
                            ("name", entry.service.name()),
                            ("restart-in", &format!("{}s", delay.as_secs())),
                        ],
                    );
                }
            }
        }
    }

    /// Records that `pid` exited with `status` (text); schedules a restart if it was a service.
    /// Returns the service's name.
    pub fn on_exit(&mut self, pid: u32, status: &str, now: Duration) -> Option<String> {
        let stopping = self.stopping;
        let entry = self.entries.iter_mut().find(|e| e.pid == Some(pid))?;
        entry.pid = None;
        let ran = now.saturating_sub(entry.started_at);
        entry.failures = if ran >= STABLE_RUN {
            1
        } else {
            entry.failures + 1
        };
        let delay = backoff(entry.failures);
        let name = entry.service.name().to_string();
        if stopping {
            return Some(name);
        }
        entry.service.exited();
        entry.next_start = Some(now + delay);
        crate::info!(
            "{name} (pid {pid}) exited ({status}) after {} s; restarting in {} s",
            ran.as_secs(),
            delay.as_secs()
        );
        crate::status::status(
            "service-exited",
            &[
                ("name", &name),
                ("status", status),
                ("restart-in", &format!("{}s", delay.as_secs())),
            ],
        );
        Some(name)
    }

    /// The earliest pending (re)start, if any.
    pub fn next_deadline(&self) -> Option<Duration> {
        if self.stopping {
            return None;
        }
        self.entries.iter().filter_map(|e| e.next_start).min()
    }

    /// PIDs of running services.
    pub fn running(&self) -> Vec<(String, u32)> {
        self.entries
            .iter()
            .filter_map(|e| e.pid.map(|pid| (e.service.name().to_string(), pid)))
            .collect()
    }

    /// Stops restarting services (shutdown).
    pub fn stop(&mut self) {
        self.stopping = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// Starts `true` (a real, short process) and counts spawns; can be told to fail.
    struct Probe {
        spawns: Arc<AtomicU32>,
        fail: bool,
    }

    impl Service for Probe {
        fn name(&self) -> &str {
            "probe"
        }
        fn spawn(&self) -> Result<Child> {
            self.spawns.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                anyhow::bail!("probe refuses to start");
            }
            Ok(Command::new("true")
                .spawn()
                .expect("`true` runs on the test host"))
        }
    }

    #[test]
    fn bare_names_are_found_in_the_service_path() {
        // The test process's own PATH does not matter: the child's PATH is SERVICE_PATH.
        let status = command(Path::new("true"))
            .status()
            .expect("`true` found via SERVICE_PATH");
        assert!(status.success());
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let delays: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn restarts_with_backoff_and_resets_after_a_stable_run() {
        let spawns = Arc::new(AtomicU32::new(0));
        let mut sup = Supervisor::new(vec![Box::new(Probe {
            spawns: spawns.clone(),
            fail: false,
        })]);
        let s = Duration::from_secs;
        sup.start_due(s(0));
        assert_eq!(spawns.load(Ordering::SeqCst), 1);
        let (_, pid) = sup.running()[0].clone();
        assert_eq!(
            sup.on_exit(pid + 100_000, "exit 1", s(1)),
            None,
            "unknown pid"
        );
        assert_eq!(sup.on_exit(pid, "exit 1", s(1)).as_deref(), Some("probe"));
        assert_eq!(sup.next_deadline(), Some(s(2)));
        sup.start_due(s(1));
        assert_eq!(spawns.load(Ordering::SeqCst), 1, "not before the backoff");
        sup.start_due(s(2));
        assert_eq!(spawns.load(Ordering::SeqCst), 2);
        let (_, pid) = sup.running()[0].clone();
        sup.on_exit(pid, "signal 9", s(3));
        assert_eq!(sup.next_deadline(), Some(s(5)), "second failure waits 2 s");
        sup.start_due(s(5));
        let (_, pid) = sup.running()[0].clone();
        sup.on_exit(pid, "exit 1", s(500));
        assert_eq!(
            sup.next_deadline(),
            Some(s(501)),
            "a long run resets the backoff"
        );
        sup.stop();
        sup.start_due(s(1000));
        assert_eq!(
            spawns.load(Ordering::SeqCst),
            3,
            "no restarts while stopping"
        );
    }

    #[test]
    fn spawn_failures_back_off_too() {
        let spawns = Arc::new(AtomicU32::new(0));
        let mut sup = Supervisor::new(vec![Box::new(Probe {
            spawns: spawns.clone(),
            fail: true,
        })]);
        let s = Duration::from_secs;
        sup.start_due(s(0));
        assert_eq!(sup.next_deadline(), Some(s(1)));
        sup.start_due(s(1));
        assert_eq!(sup.next_deadline(), Some(s(3)));
        assert!(sup.running().is_empty());
        assert_eq!(spawns.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn tail_of_a_log() {
        let dir = std::env::temp_dir().join(format!("plinth-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let log = dir.join("x.log");
        std::fs::write(&log, "a\nb\nc\n").expect("write");
        assert_eq!(tail_lines(&log, 2), ["b", "c"]);
        assert!(tail_lines(&dir.join("missing"), 2).is_empty());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
