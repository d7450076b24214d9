//! The `plinth-update` commands: the command line ([`parse_args`]) and what each command does
//! ([`run`]). The binary only parses and dispatches; the daemon loop is in [`super::daemon`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::agent::{self, Agent, Outcome, Paths};
use super::apply::Event;
use super::daemon::{self, SystemClock, Updater};
use super::fetch::{self, Client, Source};
use super::install::{self, Machine, Request};
use super::media;
use super::strategy::{self, Decision};
use super::tls::Trust;
use os_config::status;

/// How long the daemon waits for plinth-init to set the clock before its first check.
const CLOCK_WAIT: Duration = Duration::from_secs(30);

/// The usage text `--help` prints and argument errors end with.
pub const USAGE: &str = "usage: plinth-update [--json] [--disk DEVICE] [--definition FILE] [--state FILE] [--boot-record FILE] [--settled FILE] COMMAND
commands:
  status              slots, versions, boot states and the agent's state
  check [--from SRC]  look for a newer release without writing anything
  apply [--from SRC]  write a newer release to the other slot, then reboot as [update] strategy says
                      (immediate; window: once it is open; fleetlock: once a slot is granted)
                      SRC: a release folder, or a block device (mounted read-only) holding one
  rollback            boot the other slot next and mark the running version bad
  bless               mark the running boot good (plinth-init's health gate does this)
  daemon              check and apply every [update] interval (with jitter), report rollbacks
  install --target DISK --image URL --sha256 HEX [--wipe]
                      write a zstd-compressed Plinth disk image (http://, https://, file:// or a
                      path; HEX: sha256 of the compressed file) to DISK, bootable only once
                      written and verified; DISK: vda, /dev/vda, /dev/disk/by-id/NAME,
                      /dev/disk/by-path/NAME, first-empty or first-empty:MIN (like 8G); a disk
                      that holds data is refused without --wipe
exit status: 0 done, 1 error, 3 the release was refused (apply and check), or the disk or image
(install)";

/// Exit status of `apply` and `check` when the release is refused (bad signature, not newer,
/// another image, an artifact that does not match its manifest), and of `install` when the disk
/// or the image is refused ([`install::Reason::refused`]).
pub const EXIT_REFUSED: u8 = 3;

/// A `plinth-update` command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Slots, versions, boot states and the agent's state.
    Status,
    /// Look for a newer release without writing anything.
    Check,
    /// Write a newer release to the other slot, then reboot as the strategy says.
    Apply,
    /// Boot the other slot next and mark the running version bad.
    Rollback,
    /// Mark the running boot good.
    Bless,
    /// Check and apply every interval.
    Daemon,
    /// Write a disk image to a local disk.
    Install,
}

impl Command {
    fn parse(name: &str) -> Option<Command> {
        Some(match name {
            "status" => Command::Status,
            "check" => Command::Check,
            "apply" => Command::Apply,
            "rollback" => Command::Rollback,
            "bless" => Command::Bless,
            "daemon" => Command::Daemon,
            "install" => Command::Install,
            _ => return None,
        })
    }
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// `--json`: machine-readable output.
    pub json: bool,
    /// Where the agent's files and disk are (`--disk`, `--definition`, …).
    pub paths: Paths,
    /// What to do.
    pub command: Command,
    /// `--from`: a release folder or a block device holding one (apply and check).
    pub from: Option<PathBuf>,
    /// What `install` installs where (`--target`, `--image`, `--sha256`, `--wipe`).
    pub install: Option<Request>,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// `-h` or `--help`: print [`USAGE`].
    Help,
    /// Run a command.
    Run(Box<Args>),
}

/// Parses the arguments after the program name. `-h` wins as soon as it is seen; a later bad
/// argument is not looked at.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Parsed> {
    let mut json = false;
    let mut paths = Paths::default();
    let mut command = String::new();
    let mut from: Option<PathBuf> = None;
    let mut install = InstallFlags::default();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--json" => json = true,
            "--disk" => paths.disk = Some(value("--disk")?.into()),
            "--definition" => paths.definition = value("--definition")?.into(),
            "--state" => paths.state = value("--state")?.into(),
            "--boot-record" => paths.boot_record = value("--boot-record")?.into(),
            "--settled" => paths.settled = value("--settled")?.into(),
            "--from" => from = Some(value("--from")?.into()),
            "--target" => install.target = Some(value("--target")?),
            "--image" => install.image = Some(value("--image")?),
            "--sha256" => install.sha256 = Some(value("--sha256")?),
            "--wipe" => install.wipe = true,
            "-h" | "--help" => return Ok(Parsed::Help),
            cmd if !cmd.starts_with('-') && command.is_empty() => command = cmd.to_owned(),
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    if command.is_empty() {
        bail!("no command given\n{USAGE}");
    }
    if from.is_some() && command != "apply" && command != "check" {
        bail!("--from is only for apply and check\n{USAGE}");
    }
    let Some(command) = Command::parse(&command) else {
        bail!("unknown command `{command}`\n{USAGE}");
    };
    let install = install.request(command == Command::Install)?;
    Ok(Parsed::Run(Box::new(Args {
        json,
        paths,
        command,
        from,
        install,
    })))
}

/// The `install` options as given.
#[derive(Debug, Default)]
struct InstallFlags {
    target: Option<String>,
    image: Option<String>,
    sha256: Option<String>,
    wipe: bool,
}

impl InstallFlags {
    /// The request of an `install` command line (all of `--target`, `--image` and `--sha256`
    /// given, the sha256 valid); `None` for other commands, which take none of them.
    fn request(self, installing: bool) -> Result<Option<Request>> {
        if !installing {
            if self.target.is_some() || self.image.is_some() || self.sha256.is_some() || self.wipe {
                bail!("--target, --image, --sha256 and --wipe are only for install\n{USAGE}");
            }
            return Ok(None);
        }
        let (Some(target), Some(image), Some(sha256)) = (self.target, self.image, self.sha256)
        else {
            bail!("install needs --target, --image and --sha256\n{USAGE}");
        };
        let sha256 = os_config::units::Sha256::parse(&sha256)
            .map_err(|e| anyhow::anyhow!("--sha256: {e}\n{USAGE}"))?;
        Ok(Some(Request {
            target,
            image,
            sha256,
            wipe: self.wipe,
        }))
    }
}

/// Asks `plinth-init` for a clean reboot: it reboots on SIGINT, as on Ctrl-Alt-Del. An update's
/// reboot (`settle`) first waits while plinth-init reconciles the containers, so it never
/// interrupts a reconciliation.
fn reboot(settle: Option<&Agent>) -> Result<()> {
    println!("{}", status::format("update-rebooting", &[]));
    stage_delay();
    if let Some(agent) = settle {
        let mut said = false;
        while !agent.settled() {
            if !said {
                eprintln!(
                    "plinth-update: waiting for plinth-init to finish reconciling the containers"
                );
                said = true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    rustix::process::kill_process(rustix::process::Pid::INIT, rustix::process::Signal::Int)
        .context("asking plinth-init (PID 1) to reboot")
}

fn print_outcome(json: bool, outcome: &Outcome) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(outcome)?);
    } else if let Some(line) = agent::status_line(outcome) {
        println!("{line}");
    } else {
        match outcome {
            Outcome::NoRelease => println!("no release published on this channel"),
            Outcome::UpToDate { version } => println!("up to date ({version})"),
            Outcome::AlreadyStaged { version, slot } => {
                println!("{version} is staged in slot {slot}; reboot to use it")
            }
            Outcome::Available { version } => println!("{version} is available"),
            Outcome::Deferred { version, until } => {
                println!(
                    "{version} is available; this machine takes it from {until} (staged rollout)"
                )
            }
            Outcome::WaitingForBless { slot, version } => {
                println!("{version} in slot {slot} is not blessed yet; updates wait until it is")
            }
            Outcome::NotSettled => println!(
                "the running boot has not settled yet (bless pending or containers being reconciled); updates wait until it has"
            ),
            _ => {}
        }
    }
    Ok(())
}

fn report_rollback(agent: &Agent) -> Result<()> {
    if let Some(rb) = agent.detect_rollback()? {
        println!(
            "{}",
            status::format("rollback", &[("from", &rb.from), ("to", &rb.to)])
        );
    }
    Ok(())
}

/// Reports each durable stage as `PLINTH-STATUS update-progress stage=…` (and, in test builds,
/// pauses after it: [`stage_delay`]).
fn progress(event: &Event) -> Result<()> {
    // Progress of the check before anything is written, for a person watching a long apply.
    if let Event::HeldOnEsp(names) = event {
        if !names.is_empty() {
            eprintln!(
                "plinth-update: the ESP already holds the release's {}: not read from the release",
                names.join(" and ")
            );
        }
    }
    if let Event::Checking {
        artifact,
        bytes,
        download,
    } = event
    {
        let how = if *download {
            "downloading and checking"
        } else {
            "checking"
        };
        eprintln!(
            "plinth-update: {how} artifact {artifact} ({:.1} MB)",
            *bytes as f64 / 1e6
        );
    }
    if *event == Event::Downloaded {
        println!(
            "{}",
            status::format("update-progress", &[("stage", "downloaded")])
        );
    }
    if let Event::Delta(report) = event {
        println!("{}", report.status_line());
    }
    if let Event::DeltaFallback { reason } = event {
        println!(
            "{}",
            status::format("update-delta-fallback", &[("reason", reason)])
        );
    }
    if let Event::Stage(stage) = event {
        let name = serde_json::to_value(stage)?;
        println!(
            "{}",
            status::format(
                "update-progress",
                &[("stage", name.as_str().unwrap_or("?"))]
            )
        );
        stage_delay();
    }
    Ok(())
}

/// Kernel argument that makes a test build pause after each stage and before rebooting, so a
/// QEMU test can cut the power at a known point.
#[cfg(feature = "test-hooks")]
const STAGE_DELAY_ARG: &str = "plinth.update-stage-delay-ms";

/// Pauses for `plinth.update-stage-delay-ms=` on the kernel command line (only in builds with
/// the `test-hooks` feature).
#[cfg(feature = "test-hooks")]
fn stage_delay() {
    let delay = std::fs::read_to_string("/proc/cmdline")
        .ok()
        .and_then(|cmdline| {
            os_config::cmdline::Cmdline::parse(&cmdline)
                .value(STAGE_DELAY_ARG)
                .and_then(|v| v.parse::<u64>().ok())
        });
    if let Some(ms) = delay {
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Production builds never pause.
#[cfg(not(feature = "test-hooks"))]
fn stage_delay() {}

/// Applies a release; once one is staged, reboots when the strategy allows it. Returns the
/// outcome and, when a staged update waits for its window or lock, how soon to ask again.
fn apply_once(
    agent: &Agent,
    from: Option<&Source>,
    json: bool,
) -> Result<(Outcome, Option<Duration>)> {
    let outcome = agent.apply(from, &mut progress)?;
    print_outcome(json, &outcome)?;
    let mut retry = None;
    if let Outcome::Staged { version, .. } | Outcome::AlreadyStaged { version, .. } = &outcome {
        retry = reboot_when_allowed(agent, version)?;
    }
    Ok((outcome, retry))
}

/// Reboots into the staged `version` when the strategy allows it now; otherwise says why and
/// returns how soon to ask again.
fn reboot_when_allowed(agent: &Agent, version: &str) -> Result<Option<Duration>> {
    match strategy::decide(agent) {
        Decision::Reboot => reboot(Some(agent)).map(|()| None),
        Decision::Never => Ok(None),
        Decision::Wait { reason, retry } => {
            println!(
                "{}",
                status::format(
                    "update-waiting",
                    &[("version", version), ("reason", &reason)]
                )
            );
            Ok(Some(retry))
        }
    }
}

/// [`reboot_when_allowed`] for the update the state records as staged (and not running yet).
fn reboot_if_staged(agent: &Agent) -> Option<Duration> {
    let staged = agent.status().ok()?.staged?;
    reboot_when_allowed(agent, &staged.version.to_string()).unwrap_or_else(|e| {
        eprintln!("plinth-update: {e:#}");
        None
    })
}

/// The exit status for what `apply` or `check` found.
fn exit_for(outcome: &Outcome) -> ExitCode {
    match outcome {
        Outcome::Refused { .. } => ExitCode::from(EXIT_REFUSED),
        _ => ExitCode::SUCCESS,
    }
}

/// Installs as `request` says on this machine, printing status lines; returns the exit status:
/// success, [`EXIT_REFUSED`] when the disk or image is refused, else failure. The machine is not
/// rebooted here: `plinth-init` does that once this returns success.
fn run_install(request: &Request, paths: &Paths) -> ExitCode {
    let trust = Trust {
        bundle: paths.ca_bundle.clone(),
        update_ca: paths.update_ca.exists().then(|| paths.update_ca.clone()),
    };
    let client = Client::new(Some(trust), fetch::PACE);
    let result = Machine::running(client, &paths.boot_record)
        .map_err(|e| install::InstallError {
            reason: install::Reason::NoDisk,
            message: format!("{e:#}"),
        })
        .and_then(|machine| install::install(request, &machine, &mut |line| println!("{line}")));
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            println!("{}", e.status_line());
            eprintln!("plinth-update: install: {}", e.message);
            if e.reason.refused() {
                ExitCode::from(EXIT_REFUSED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs a parsed command line; returns the exit status.
pub fn run(args: Args) -> Result<ExitCode> {
    // A live system installing to a disk has no boot record or update configuration.
    if let Some(request) = &args.install {
        return Ok(run_install(request, &args.paths));
    }
    let agent = Agent::load(args.paths.clone())?;
    // Media stay mounted until `run` returns.
    let media = match &args.from {
        Some(device) if media::is_block_device(device) => {
            let mounted = media::Mounted::mount(device, Path::new(media::MEDIA_ROOT))?;
            eprintln!(
                "plinth-update: reading the release on {} ({})",
                device.display(),
                mounted.fstype()
            );
            Some(mounted)
        }
        _ => None,
    };
    let from = match &media {
        Some(mounted) => Some(Source::Dir(mounted.path().to_owned())),
        None => args.from.as_ref().map(|d| Source::Dir(d.clone())),
    };
    match args.command {
        Command::Status => {
            report_rollback(&agent)?;
            let status = agent.status()?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!(
                    "{} {} on channel {} (slot {})",
                    status.image, status.running_version, status.channel, status.running_slot
                );
                for slot in &status.slots {
                    println!(
                        "  slot {}: {} {}{}",
                        slot.slot,
                        slot.version.as_deref().unwrap_or("-"),
                        slot.boot,
                        if slot.running { " (running)" } else { "" }
                    );
                }
                if !status.bad_versions.is_empty() {
                    println!("  bad versions: {}", status.bad_versions.join(", "));
                }
                if let Some(p) = &status.in_progress {
                    println!(
                        "  in progress: {} to slot {} ({:?})",
                        p.version, p.slot, p.stage
                    );
                }
            }
        }
        Command::Check => {
            report_rollback(&agent)?;
            let outcome = agent.check(from.as_ref())?;
            print_outcome(args.json, &outcome)?;
            return Ok(exit_for(&outcome));
        }
        Command::Apply => {
            report_rollback(&agent)?;
            return Ok(exit_for(&apply_once(&agent, from.as_ref(), args.json)?.0));
        }
        Command::Rollback => {
            let rb = agent.rollback()?;
            if args.json {
                println!("{}", serde_json::to_string(&rb)?);
            } else {
                println!(
                    "slot {} ({}) boots next; {} will be marked bad",
                    agent.running_slot.other(),
                    rb.to,
                    rb.from
                );
            }
            reboot(None)?;
        }
        Command::Bless => {
            let blessed = agent.bless()?;
            println!("{blessed:?}");
        }
        Command::Install => bail!("install needs --target, --image and --sha256\n{USAGE}"),
        Command::Daemon => {
            // Expiry dates and certificates mean nothing before plinth-init has set the clock.
            let marker = Path::new(crate::clock::CLOCK_MARKER);
            if !crate::clock::wait_for_clock(marker, CLOCK_WAIT) {
                eprintln!(
                    "plinth-update: {} is still missing after {CLOCK_WAIT:?}: checking with the clock as it is",
                    marker.display()
                );
            }
            daemon::run(
                &mut AgentUpdater {
                    agent: &agent,
                    json: args.json,
                },
                &mut SystemClock,
                agent.interval,
            )
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The daemon's [`Updater`]: the agent, printing what it does as the other commands do.
struct AgentUpdater<'a> {
    agent: &'a Agent,
    json: bool,
}

impl Updater for AgentUpdater<'_> {
    fn check_and_apply(&mut self) -> Result<(Outcome, Option<Duration>)> {
        report_rollback(self.agent).and_then(|()| apply_once(self.agent, None, self.json))
    }

    fn release_after_good_boot(&mut self) -> Result<bool> {
        strategy::release_after_good_boot(self.agent)
    }

    fn reboot_if_staged(&mut self) -> Option<Duration> {
        reboot_if_staged(self.agent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Parsed> {
        parse_args(args.iter().map(|a| a.to_string()))
    }

    fn run_args(args: &[&str]) -> Args {
        match parse(args).expect("parses") {
            Parsed::Run(args) => *args,
            Parsed::Help => panic!("help for {args:?}"),
        }
    }

    #[test]
    fn commands_and_options_parse() {
        let args = run_args(&[
            "--json",
            "--disk",
            "/dev/vdb",
            "--definition",
            "/d.toml",
            "--state",
            "/s.json",
            "--boot-record",
            "/c",
            "--settled",
            "/run/x",
            "apply",
            "--from",
            "/srv",
        ]);
        let paths = Paths {
            disk: Some("/dev/vdb".into()),
            definition: "/d.toml".into(),
            state: "/s.json".into(),
            boot_record: "/c".into(),
            settled: "/run/x".into(),
            ..Paths::default()
        };
        assert_eq!(
            args,
            Args {
                json: true,
                paths,
                command: Command::Apply,
                from: Some("/srv".into()),
                install: None,
            }
        );
        for (name, command) in [
            ("status", Command::Status),
            ("check", Command::Check),
            ("apply", Command::Apply),
            ("rollback", Command::Rollback),
            ("bless", Command::Bless),
            ("daemon", Command::Daemon),
        ] {
            let args = run_args(&[name]);
            assert_eq!((args.command, args.json), (command, false));
            assert_eq!(args.paths, Paths::default());
        }
        assert_eq!(run_args(&["check", "--from", "/m"]).from, Some("/m".into()));
    }

    #[test]
    fn help_wins_as_soon_as_it_is_seen() {
        assert_eq!(parse(&["-h"]).expect("help"), Parsed::Help);
        assert_eq!(parse(&["--help", "--bogus"]).expect("help"), Parsed::Help);
        assert_eq!(parse(&["nonsense", "--help"]).expect("help"), Parsed::Help);
        assert!(parse(&["--bogus", "-h"]).is_err());
    }

    #[test]
    fn bad_command_lines_are_errors_with_the_usage() {
        for (args, message) in [
            (&[][..], "no command given"),
            (&["--json"], "no command given"),
            (&["status", "--bogus"], "unknown argument `--bogus`"),
            (&["status", "check"], "unknown argument `check`"),
            (&["--disk"], "--disk needs a value"),
            (&["apply", "--from"], "--from needs a value"),
            (
                &["status", "--from", "/m"],
                "--from is only for apply and check",
            ),
            (
                &["daemon", "--from", "/m"],
                "--from is only for apply and check",
            ),
            (&["frobnicate"], "unknown command `frobnicate`"),
        ] {
            let err = parse(args).expect_err("refused");
            let text = format!("{err:#}");
            assert!(text.starts_with(message), "{args:?}: {text}");
            assert!(text.ends_with(USAGE), "{args:?}: {text}");
        }
    }
}
