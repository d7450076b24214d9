//! Container stability over time, shared by the bless gate and the console status lines.
//!
//! One look at the engine says whether a container runs now; it cannot tell a container that has
//! been up for a minute from one that crashes every second and is restarted by its policy. So
//! every declared container is followed across looks by its *run*: its ID, `State.StartedAt` and
//! `RestartCount`. A restart by the engine, or a container created again, is a new run.
//!
//! - The console hears `container-running` only once a container has kept one run up (and healthy,
//!   where it has a health check) for [`SETTLE`]; `container-restarting restarts=N` at each
//!   restart; `container-stopped` when it exits and is not restarted.
//! - The bless gate ([`gate`]) passes only after every container has been up, healthy and without
//!   a new run for the whole `bless-after` period; any restart during the trial fails the trial at
//!   once, so a crash loop is rolled back instead of being blessed between two crashes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::stage2::containers::{ContainerHealth, Health, Run};

/// How long a container keeps one run up before `container-running` is reported. Docker Engine
/// treats a container as started successfully once it has run for 10 s (its restart backoff is
/// reset then); Plinth uses the same mark.
pub const SETTLE: Duration = Duration::from_secs(10);

/// Something that changed about a container, for the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// It has kept one run up (and healthy) for the settle time.
    Running { name: String },
    /// The engine restarted it, or it was created again; `restarts` counts every restart seen
    /// since it was first observed.
    Restarting { name: String, restarts: u64 },
    /// It stopped and is not being restarted.
    Stopped {
        name: String,
        status: String,
        exit_code: i64,
    },
}

impl Event {
    /// The `PLINTH-STATUS` event name and fields.
    pub fn status(&self) -> (&'static str, Vec<(&'static str, String)>) {
        match self {
            Event::Running { name } => ("container-running", vec![("name", name.clone())]),
            Event::Restarting { name, restarts } => (
                "container-restarting",
                vec![("name", name.clone()), ("restarts", restarts.to_string())],
            ),
            Event::Stopped {
                name,
                status,
                exit_code,
            } => (
                "container-stopped",
                vec![
                    ("name", name.clone()),
                    ("status", status.clone()),
                    ("exit-code", exit_code.to_string()),
                ],
            ),
        }
    }
}

/// What the gate makes of one look at the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judgement {
    /// Everything runs and is healthy, with no restart seen.
    Healthy,
    /// Not healthy yet (or not any more); the healthy period starts again.
    NotYet(String),
    /// Cannot become stable in this trial (a container restarted): the trial fails at once.
    Failed(String),
}

/// One container followed across looks.
#[derive(Debug, Default)]
struct Track {
    /// The run seen last.
    run: Option<Run>,
    /// Restarts seen since the first look.
    restarts: u64,
    /// Since when (clock time) the current run has been up and healthy.
    up_since: Option<Duration>,
    reported_up: bool,
    reported_stopped: bool,
    /// The state at the last look.
    health: Option<ContainerHealth>,
}

/// How many restarts lie between two runs of one container.
fn restarts_between(before: &Run, after: &Run) -> u64 {
    if before.id != after.id {
        // Created again: its restart count starts from zero.
        1
    } else if after.restarts > before.restarts {
        after.restarts - before.restarts
    } else if after.started_at != before.started_at && !never_started(before) {
        // Started again without the policy counting it (an engine restart, a manual start).
        1
    } else {
        0
    }
}

/// Whether a run has not started yet: the engine reports the zero time (or nothing) as its start.
fn never_started(run: &Run) -> bool {
    run.started_at.is_empty() || run.started_at.starts_with("0001-01-01")
}

/// Follows every declared container across looks.
#[derive(Debug)]
pub struct Tracker {
    settle: Duration,
    tracks: BTreeMap<String, Track>,
    /// Declaration order, for reasons and events.
    order: Vec<String>,
}

impl Tracker {
    /// A tracker that reports a container running after `settle` of one run.
    pub fn new(settle: Duration) -> Tracker {
        Tracker {
            settle,
            tracks: BTreeMap::new(),
            order: Vec::new(),
        }
    }

    /// Takes one look made at clock time `now`; returns what changed since the last one.
    pub fn observe(&mut self, now: Duration, health: &Health) -> Vec<Event> {
        let mut events = Vec::new();
        self.order = health.containers.iter().map(|c| c.name.clone()).collect();
        for seen in &health.containers {
            let track = self.tracks.entry(seen.name.clone()).or_default();
            let restarted = match (&track.run, &seen.run) {
                (Some(before), Some(after)) => restarts_between(before, after),
                _ => 0,
            };
            if seen.run.is_some() {
                track.run = seen.run.clone();
            }
            if restarted > 0 {
                track.restarts += restarted;
                track.up_since = None;
                track.reported_up = false;
                track.reported_stopped = false;
                events.push(Event::Restarting {
                    name: seen.name.clone(),
                    restarts: track.restarts,
                });
            }
            match &seen.health {
                ContainerHealth::Healthy => {
                    let since = *track.up_since.get_or_insert(now);
                    if !track.reported_up && now.saturating_sub(since) >= self.settle {
                        track.reported_up = true;
                        events.push(Event::Running {
                            name: seen.name.clone(),
                        });
                    }
                }
                ContainerHealth::NotRunning(status) if status != "restarting" => {
                    track.up_since = None;
                    track.reported_up = false;
                    if !track.reported_stopped {
                        track.reported_stopped = true;
                        events.push(Event::Stopped {
                            name: seen.name.clone(),
                            status: status.clone(),
                            exit_code: seen.exit_code,
                        });
                    }
                }
                _ => {
                    track.up_since = None;
                    track.reported_up = false;
                }
            }
            track.health = Some(seen.health.clone());
        }
        events
    }

    /// True when every container has been reported running or stopped: nothing is on its way up.
    pub fn settled(&self) -> bool {
        !self.order.is_empty()
            && self.order.iter().all(|name| {
                self.tracks
                    .get(name)
                    .is_some_and(|t| t.reported_up || t.reported_stopped)
            })
    }

    /// The gate's judgement of everything seen so far: a restart fails the trial; otherwise the
    /// first container not running and healthy at the last look says why it is not healthy yet.
    pub fn judge(&self) -> Judgement {
        for name in &self.order {
            let Some(track) = self.tracks.get(name) else {
                continue;
            };
            if track.restarts > 0 {
                return Judgement::Failed(format!(
                    "container {name} restarted {} time{} during the trial",
                    track.restarts,
                    if track.restarts == 1 { "" } else { "s" }
                ));
            }
        }
        for name in &self.order {
            match self.tracks.get(name).and_then(|t| t.health.as_ref()) {
                Some(ContainerHealth::Healthy) => {}
                Some(state) => return Judgement::NotYet(format!("container {name}: {state}")),
                None => return Judgement::NotYet(format!("container {name}: not seen yet")),
            }
        }
        Judgement::Healthy
    }
}

/// Monotonic time and sleeping for the health gate; tests use a fake one.
pub trait GateClock {
    /// Time since an arbitrary fixed start.
    fn now(&self) -> Duration;
    /// Waits `duration`.
    fn sleep(&self, duration: Duration);
}

/// The real clock.
#[derive(Debug, Clone, Copy)]
pub struct RealClock(Instant);

impl Default for RealClock {
    fn default() -> RealClock {
        RealClock(Instant::now())
    }
}

impl GateClock for RealClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// What the gate decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateResult {
    /// Healthy without a break for the whole bless time.
    Healthy,
    /// Failed, or not healthy for long enough within the timeout; says why.
    Unhealthy(String),
}

/// Looks at the system through `check` every `poll` (passing the clock time) until it has been
/// [`Judgement::Healthy`] without a break for `bless_after` ([`GateResult::Healthy`]), until it
/// is [`Judgement::Failed`], or until `timeout` has passed. Reasons are logged when they change.
pub fn gate(
    mut check: impl FnMut(Duration) -> Judgement,
    clock: &dyn GateClock,
    bless_after: Duration,
    timeout: Duration,
    poll: Duration,
) -> Result<GateResult> {
    if bless_after > timeout {
        bail!(
            "the bless time {} s is longer than the time allowed to become healthy ({} s)",
            bless_after.as_secs(),
            timeout.as_secs()
        );
    }
    let start = clock.now();
    let mut healthy_since: Option<Duration> = None;
    let mut last_reason: Option<String> = None;
    loop {
        let now = clock.now();
        match check(now) {
            Judgement::Healthy => {
                let since = *healthy_since.get_or_insert(now);
                if last_reason.take().is_some() {
                    crate::info!("health gate: healthy");
                }
                if now - since >= bless_after {
                    return Ok(GateResult::Healthy);
                }
            }
            Judgement::NotYet(reason) => {
                healthy_since = None;
                if last_reason.as_ref() != Some(&reason) {
                    crate::info!("health gate: {reason}");
                    last_reason = Some(reason);
                }
            }
            Judgement::Failed(reason) => {
                crate::info!("health gate: {reason}");
                return Ok(GateResult::Unhealthy(reason));
            }
        }
        let elapsed = now - start;
        if elapsed >= timeout {
            let reason = last_reason.unwrap_or_else(|| "not healthy for long enough".to_owned());
            return Ok(GateResult::Unhealthy(format!(
                "not healthy for {} s within {} s: {reason}",
                bless_after.as_secs(),
                timeout.as_secs()
            )));
        }
        clock.sleep(poll.min(timeout - elapsed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage2::containers::Observed;
    use std::cell::{Cell, RefCell};

    /// A clock that only moves when the gate sleeps.
    struct FakeClock(Cell<Duration>);

    impl GateClock for FakeClock {
        fn now(&self) -> Duration {
            self.0.get()
        }
        fn sleep(&self, duration: Duration) {
            self.0.set(self.0.get() + duration);
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// Runs the gate over `states` (one per poll of 1 s; the last repeats); returns the result
    /// and the fake time at which it came.
    fn run_gate(states: &[Judgement], bless_after: u64, timeout: u64) -> (GateResult, u64) {
        let clock = FakeClock(Cell::new(S(100)));
        let polls = RefCell::new(0usize);
        let check = |_now| {
            let mut n = polls.borrow_mut();
            let state = states[(*n).min(states.len() - 1)].clone();
            *n += 1;
            state
        };
        let result = gate(check, &clock, S(bless_after), S(timeout), S(1)).expect("gate");
        (result, clock.now().as_secs() - 100)
    }

    use Judgement::{Healthy as H, NotYet};

    fn missing() -> Judgement {
        NotYet("container web: missing".into())
    }

    #[test]
    fn the_gate_passes_after_a_continuous_healthy_period() {
        assert_eq!(run_gate(&[H], 5, 60), (GateResult::Healthy, 5));
        assert_eq!(
            run_gate(&[missing(), missing(), H], 5, 60),
            (GateResult::Healthy, 7)
        );
        assert_eq!(run_gate(&[H], 0, 60), (GateResult::Healthy, 0));
    }

    #[test]
    fn a_break_restarts_the_healthy_period() {
        let states = [H, H, H, H, missing(), H];
        assert_eq!(run_gate(&states, 5, 60), (GateResult::Healthy, 10));
    }

    #[test]
    fn the_gate_fails_at_the_timeout_with_the_last_reason() {
        let (result, at) = run_gate(&[missing()], 5, 30);
        assert_eq!(at, 30);
        assert_eq!(
            result,
            GateResult::Unhealthy("not healthy for 5 s within 30 s: container web: missing".into())
        );
        // Healthy too late to last the bless time before the timeout.
        let mut late = vec![missing(); 28];
        late.push(H);
        assert!(matches!(
            run_gate(&late, 5, 30),
            (GateResult::Unhealthy(_), 30)
        ));
    }

    #[test]
    fn a_failure_ends_the_gate_at_once() {
        let states = [
            H,
            H,
            Judgement::Failed("container web restarted 1 time".into()),
        ];
        assert_eq!(
            run_gate(&states, 5, 60),
            (
                GateResult::Unhealthy("container web restarted 1 time".into()),
                2
            )
        );
    }

    #[test]
    fn a_bless_time_beyond_the_timeout_is_an_error() {
        let clock = FakeClock(Cell::new(Duration::ZERO));
        let error = gate(|_| H, &clock, S(60), S(30), S(1)).expect_err("impossible");
        assert!(error.to_string().contains("bless time 60 s"), "{error}");
    }

    /// What the engine says about container `web` at one look.
    #[derive(Clone)]
    struct Look {
        health: ContainerHealth,
        started_at: &'static str,
        restarts: u64,
        id: &'static str,
    }

    fn up(started_at: &'static str, restarts: u64) -> Look {
        Look {
            health: ContainerHealth::Healthy,
            started_at,
            restarts,
            id: "c1",
        }
    }

    fn state(health: ContainerHealth, started_at: &'static str, restarts: u64) -> Look {
        Look {
            health,
            started_at,
            restarts,
            id: "c1",
        }
    }

    fn snapshot(look: &Look) -> Health {
        Health {
            containers: vec![Observed {
                name: "web".into(),
                health: look.health.clone(),
                run: Some(Run {
                    id: look.id.into(),
                    started_at: look.started_at.into(),
                    restarts: look.restarts,
                }),
                exit_code: 1,
            }],
        }
    }

    /// Replays engine looks (one per 2 s poll, the last repeating) through a tracker and the
    /// gate with bless-after 10 s and a 120 s timeout; returns the result, when it came, and the
    /// status events in order.
    fn replay(looks: &[Look]) -> (GateResult, u64, Vec<Event>) {
        let clock = FakeClock(Cell::new(S(0)));
        let tracker = RefCell::new(Tracker::new(SETTLE));
        let events = RefCell::new(Vec::new());
        let polls = Cell::new(0usize);
        let check = |now| {
            let look = &looks[polls.get().min(looks.len() - 1)];
            polls.set(polls.get() + 1);
            let mut tracker = tracker.borrow_mut();
            events
                .borrow_mut()
                .extend(tracker.observe(now, &snapshot(look)));
            tracker.judge()
        };
        let result = gate(check, &clock, S(10), S(120), S(2)).expect("gate");
        (result, clock.now().as_secs(), events.into_inner())
    }

    fn restarting() -> ContainerHealth {
        ContainerHealth::NotRunning("restarting".into())
    }

    #[test]
    fn a_crash_loop_fails_the_trial_even_when_most_looks_see_it_running() {
        // `restart = "always"` with a command that exits at once: the engine restarts it between
        // looks, so most looks see a running container, each with a new start time.
        let looks = [
            up("t0", 0),
            up("t1", 1),
            state(restarting(), "t1", 1),
            up("t2", 2),
            up("t3", 3),
        ];
        let (result, at, events) = replay(&looks);
        assert_eq!(
            result,
            GateResult::Unhealthy("container web restarted 1 time during the trial".into())
        );
        assert_eq!(at, 2, "failed at the first restart, not at the timeout");
        assert_eq!(
            events,
            [Event::Restarting {
                name: "web".into(),
                restarts: 1
            }]
        );
        assert!(!events.iter().any(|e| matches!(e, Event::Running { .. })));
    }

    #[test]
    fn the_loop_is_reported_with_a_growing_restart_count() {
        let mut tracker = Tracker::new(SETTLE);
        let mut lines = Vec::new();
        for (t, look) in [up("t0", 0), up("t1", 1), up("t1", 3), up("t9", 3)]
            .iter()
            .enumerate()
        {
            for event in tracker.observe(S(2 * t as u64), &snapshot(look)) {
                let (name, fields) = event.status();
                let fields: Vec<(&str, &str)> =
                    fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
                lines.push(os_config::status::format(name, &fields));
            }
        }
        assert_eq!(
            lines,
            [
                "PLINTH-STATUS container-restarting name=web restarts=1",
                "PLINTH-STATUS container-restarting name=web restarts=3",
                "PLINTH-STATUS container-restarting name=web restarts=4",
            ]
        );
        assert!(!tracker.settled());
    }

    #[test]
    fn a_single_restart_within_the_window_fails_the_trial() {
        // Up for 8 s, exits once, is restarted by its policy and then stays up.
        let looks = [
            up("t0", 0),
            up("t0", 0),
            up("t0", 0),
            up("t0", 0),
            up("t0", 0),
            up("t10", 1),
        ];
        let (result, at, _) = replay(&looks);
        assert!(
            matches!(&result, GateResult::Unhealthy(r) if r.contains("restarted 1 time")),
            "{result:?}"
        );
        assert_eq!(at, 10);
    }

    #[test]
    fn a_container_created_again_counts_as_a_restart() {
        let mut again = up("t4", 0);
        again.id = "c2";
        let (result, _, events) = replay(&[up("t0", 0), again]);
        assert!(matches!(result, GateResult::Unhealthy(_)), "{result:?}");
        assert_eq!(
            events,
            [Event::Restarting {
                name: "web".into(),
                restarts: 1
            }]
        );
    }

    #[test]
    fn a_slow_start_that_settles_is_blessed() {
        // Created, then running with its health check starting for 10 s, then healthy for good.
        let looks = [
            state(
                ContainerHealth::NotRunning("created".into()),
                "0001-01-01T00:00:00Z",
                0,
            ),
            state(ContainerHealth::Starting, "t2", 0),
            state(ContainerHealth::Starting, "t2", 0),
            state(ContainerHealth::Starting, "t2", 0),
            state(ContainerHealth::Starting, "t2", 0),
            state(ContainerHealth::Starting, "t2", 0),
            up("t2", 0),
        ];
        let (result, at, events) = replay(&looks);
        assert_eq!(result, GateResult::Healthy);
        assert_eq!(at, 22, "healthy from 12 s, blessed 10 s later");
        assert_eq!(
            events,
            [
                Event::Stopped {
                    name: "web".into(),
                    status: "created".into(),
                    exit_code: 1
                },
                Event::Running { name: "web".into() }
            ]
        );
    }

    #[test]
    fn a_health_check_that_flips_restarts_the_healthy_period() {
        let flip = state(ContainerHealth::Unhealthy, "t0", 0);
        let looks = [
            up("t0", 0),
            up("t0", 0),
            up("t0", 0),
            flip.clone(),
            up("t0", 0),
            up("t0", 0),
            flip,
            up("t0", 0),
        ];
        let (result, at, events) = replay(&looks);
        assert_eq!(result, GateResult::Healthy);
        assert_eq!(at, 24, "healthy again from 14 s, for 10 s");
        // Reported running once it has been up and healthy for the settle time.
        assert_eq!(events, [Event::Running { name: "web".into() }]);
    }

    #[test]
    fn a_container_that_exits_for_good_is_stopped_and_never_healthy() {
        let looks = [
            up("t0", 0),
            state(ContainerHealth::NotRunning("exited".into()), "t0", 0),
        ];
        let (result, at, events) = replay(&looks);
        assert!(
            matches!(&result, GateResult::Unhealthy(r) if r.contains("container web: not running (exited)")),
            "{result:?}"
        );
        assert_eq!(at, 120);
        assert_eq!(
            events,
            [Event::Stopped {
                name: "web".into(),
                status: "exited".into(),
                exit_code: 1
            }]
        );
    }

    #[test]
    fn settled_once_every_container_is_up_or_stopped() {
        let mut tracker = Tracker::new(SETTLE);
        assert!(!tracker.settled(), "nothing seen yet");
        tracker.observe(S(0), &snapshot(&up("t0", 0)));
        assert!(!tracker.settled());
        assert_eq!(
            tracker.observe(S(10), &snapshot(&up("t0", 0))),
            [Event::Running { name: "web".into() }]
        );
        assert!(tracker.settled());
        assert_eq!(tracker.judge(), Judgement::Healthy);
    }
}
