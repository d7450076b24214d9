//! `plinth-update`: the update agent. Parses arguments and dispatches to `init::update`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use init::update::agent::{self, Agent, Outcome, Paths};
use init::update::apply::Event;
use init::update::fetch::Source;
use init::update::media;
use init::update::strategy::{self, Decision};
use os_config::status;

const USAGE: &str = "usage: plinth-update [--json] [--disk DEVICE] [--definition FILE] [--state FILE] [--boot-record FILE] [--settled FILE] COMMAND
commands:
  status              slots, versions, boot states and the agent's state
  check [--from SRC]  look for a newer release without writing anything
  apply [--from SRC]  write a newer release to the other slot, then reboot as [update] strategy says
                      (immediate; window: once it is open; fleetlock: once a slot is granted)
                      SRC: a release folder, or a block device (mounted read-only) holding one
  rollback            boot the other slot next and mark the running version bad
  bless               mark the running boot good (plinth-init's health gate does this)
  daemon              check and apply every [update] interval (with jitter), report rollbacks
exit status: 0 done, 1 error, 3 the release was refused (apply and check)";

/// Exit status of `apply` and `check` when the release is refused (bad signature, not newer,
/// another image, an artifact that does not match its manifest).
const EXIT_REFUSED: u8 = 3;

struct Args {
    json: bool,
    paths: Paths,
    command: String,
    from: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        json: false,
        paths: Paths::default(),
        command: String::new(),
        from: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--json" => args.json = true,
            "--disk" => args.paths.disk = Some(value("--disk")?.into()),
            "--definition" => args.paths.definition = value("--definition")?.into(),
            "--state" => args.paths.state = value("--state")?.into(),
            "--boot-record" => args.paths.boot_record = value("--boot-record")?.into(),
            "--settled" => args.paths.settled = value("--settled")?.into(),
            "--from" => args.from = Some(value("--from")?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            cmd if !cmd.starts_with('-') && args.command.is_empty() => {
                args.command = cmd.to_owned()
            }
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    if args.command.is_empty() {
        bail!("no command given\n{USAGE}");
    }
    if args.from.is_some() && args.command != "apply" && args.command != "check" {
        bail!("--from is only for apply and check\n{USAGE}");
    }
    Ok(args)
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

/// Reports each durable stage as `PLINTH-STATUS update-progress stage=…`. With
/// `PLINTH_UPDATE_STAGE_DELAY_MS` set, or `plinth.update-stage-delay-ms=` on the kernel command
/// line (tests that cut the power at a given stage), it pauses that long after each stage and
/// before rebooting.
fn progress(event: &Event) -> Result<()> {
    if *event == Event::Downloaded {
        println!(
            "{}",
            status::format("update-progress", &[("stage", "downloaded")])
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

/// Kernel argument with the same meaning as `PLINTH_UPDATE_STAGE_DELAY_MS` (the environment
/// wins), so a test image can slow its agent down without changing how plinth-init starts it.
const STAGE_DELAY_ARG: &str = "plinth.update-stage-delay-ms";

fn stage_delay() {
    let delay = std::env::var("PLINTH_UPDATE_STAGE_DELAY_MS")
        .ok()
        .or_else(|| {
            let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
            os_config::cmdline::Cmdline::parse(&cmdline)
                .value(STAGE_DELAY_ARG)
                .map(str::to_owned)
        })
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(ms) = delay {
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_millis(ms));
    }
}

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

/// Interval ± 10 %, so a fleet does not poll in step.
fn jittered(interval: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().wrapping_mul(2_654_435_761);
    let spread = interval.as_millis() as u64 / 5;
    let offset = if spread == 0 {
        0
    } else {
        u64::from(nanos) % spread
    };
    Duration::from_millis(interval.as_millis() as u64 - spread / 2 + offset)
}

fn run(args: Args) -> Result<ExitCode> {
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
    match args.command.as_str() {
        "status" => {
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
        "check" => {
            report_rollback(&agent)?;
            let outcome = agent.check(from.as_ref())?;
            print_outcome(args.json, &outcome)?;
            return Ok(exit_for(&outcome));
        }
        "apply" => {
            report_rollback(&agent)?;
            return Ok(exit_for(&apply_once(&agent, from.as_ref(), args.json)?.0));
        }
        "rollback" => {
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
        "bless" => {
            let blessed = agent.bless()?;
            println!("{blessed:?}");
        }
        "daemon" => {
            let mut released = false;
            loop {
                let mut next = jittered(agent.interval);
                match report_rollback(&agent).and_then(|()| apply_once(&agent, None, args.json)) {
                    Ok((outcome, retry)) => {
                        // A good boot with nothing staged gives its FleetLock slot back (once
                        // per start); a staged update keeps, or has just taken, the slot.
                        let settled = !matches!(
                            outcome,
                            Outcome::WaitingForBless { .. }
                                | Outcome::NotSettled
                                | Outcome::Staged { .. }
                                | Outcome::AlreadyStaged { .. }
                        );
                        if settled && !released {
                            match strategy::release_after_good_boot(&agent) {
                                Ok(done) => released = done,
                                Err(e) => eprintln!("plinth-update: {e:#}"),
                            }
                        }
                        if let Some(retry) = retry {
                            next = next.min(retry + Duration::from_secs(1));
                        }
                        // The first check of a boot comes before it settles: look again soon.
                        if outcome == Outcome::NotSettled {
                            next = next.min(strategy::SETTLE_RETRY);
                        }
                    }
                    Err(e) => {
                        eprintln!("plinth-update: {e:#}");
                        // The server may be gone while an update is staged: its window or lock
                        // does not depend on the server.
                        if let Some(retry) = reboot_if_staged(&agent) {
                            next = next.min(retry + Duration::from_secs(1));
                        }
                    }
                }
                std::thread::sleep(next);
            }
        }
        other => bail!("unknown command `{other}`\n{USAGE}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match parse_args().and_then(run) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("plinth-update: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
