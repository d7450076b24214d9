//! The `plinth-update daemon` loop: check and apply every `[update] interval` (with jitter),
//! give a FleetLock reboot slot back once per start after a good boot, and look again sooner
//! while the boot settles or a staged update waits for its window or lock.
//!
//! The loop talks to the agent through [`Updater`] and sleeps through [`Clock`], so its timing
//! and its lock state machine are tested with fakes.

use std::time::Duration;

use anyhow::Result;

use super::agent::Outcome;
use super::strategy;

/// What the loop asks of the agent.
pub trait Updater {
    /// Reports a rollback, then applies a newer release and, once one is staged, reboots when the
    /// strategy allows it. Returns the outcome and, when a staged update waits for its window or
    /// lock, how soon to ask again.
    fn check_and_apply(&mut self) -> Result<(Outcome, Option<Duration>)>;

    /// Gives a FleetLock reboot slot back (`steady-state`); true once the server agreed, and
    /// always for the other strategies.
    fn release_after_good_boot(&mut self) -> Result<bool>;

    /// Reboots into an update the state records as staged when the strategy allows it now;
    /// otherwise how soon to ask again (`None`: nothing staged, or never).
    fn reboot_if_staged(&mut self) -> Option<Duration>;
}

/// Time as the loop sees it.
pub trait Clock {
    /// A value that differs between machines and starts, to spread their checks.
    fn jitter_seed(&mut self) -> u32;
    /// Waits for `duration`.
    fn sleep(&mut self, duration: Duration);
}

/// The real clock: jitter from the time and process id, `std::thread::sleep`.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn jitter_seed(&mut self) -> u32 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id().wrapping_mul(2_654_435_761)
    }

    fn sleep(&mut self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// `interval` ± 10 %, picked by `seed`, so a fleet does not poll in step.
pub fn jittered(interval: Duration, seed: u32) -> Duration {
    let spread = interval.as_millis() as u64 / 5;
    let offset = if spread == 0 {
        0
    } else {
        u64::from(seed) % spread
    };
    Duration::from_millis(interval.as_millis() as u64 - spread / 2 + offset)
}

/// The loop's state across rounds.
#[derive(Debug, Default)]
pub struct Daemon {
    /// Whether the FleetLock slot was given back since this start.
    released: bool,
}

impl Daemon {
    /// A loop that has released nothing yet.
    pub fn new() -> Daemon {
        Daemon::default()
    }

    /// One round: check and apply, release the lock after a good boot, and return how long to
    /// wait before the next round.
    pub fn round(&mut self, updater: &mut impl Updater, interval: Duration, seed: u32) -> Duration {
        let mut next = jittered(interval, seed);
        match updater.check_and_apply() {
            Ok((outcome, retry)) => {
                // A good boot with nothing staged gives its FleetLock slot back (once per start);
                // a staged update keeps, or has just taken, the slot.
                let settled = !matches!(
                    outcome,
                    Outcome::WaitingForBless { .. }
                        | Outcome::NotSettled
                        | Outcome::Staged { .. }
                        | Outcome::AlreadyStaged { .. }
                );
                if settled && !self.released {
                    match updater.release_after_good_boot() {
                        Ok(done) => self.released = done,
                        Err(e) => eprintln!("plinth-update: {e:#}"),
                    }
                    // A lock not given back yet is asked about again soon, not an interval later.
                    if !self.released {
                        next = next.min(strategy::RELEASE_RETRY);
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
                // The server may be gone while an update is staged: its window or lock does not
                // depend on the server.
                if let Some(retry) = updater.reboot_if_staged() {
                    next = next.min(retry + Duration::from_secs(1));
                }
            }
        }
        next
    }
}

/// Runs the loop for ever: a round every `interval` (jittered), sooner when a round asks.
pub fn run(updater: &mut impl Updater, clock: &mut impl Clock, interval: Duration) -> ! {
    let mut daemon = Daemon::new();
    loop {
        let seed = clock.jitter_seed();
        let next = daemon.round(updater, interval, seed);
        clock.sleep(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use os_config::layout::Slot;
    use std::collections::VecDeque;

    const HOUR: Duration = Duration::from_secs(3600);

    /// A fake clock: a fixed seed, and the time advanced by each sleep.
    #[derive(Default)]
    struct FakeClock {
        now: Duration,
        sleeps: Vec<Duration>,
    }

    impl Clock for FakeClock {
        fn jitter_seed(&mut self) -> u32 {
            0
        }

        fn sleep(&mut self, duration: Duration) {
            self.now += duration;
            self.sleeps.push(duration);
        }
    }

    /// A fake agent answering each round from a script, and a lock server that is reachable
    /// or not and grants a release or not.
    #[derive(Default)]
    struct FakeUpdater {
        rounds: VecDeque<Result<(Outcome, Option<Duration>), String>>,
        releases: VecDeque<Result<bool, String>>,
        staged_retry: Option<Duration>,
        calls: Vec<&'static str>,
    }

    impl Updater for FakeUpdater {
        fn check_and_apply(&mut self) -> Result<(Outcome, Option<Duration>)> {
            self.calls.push("apply");
            match self.rounds.pop_front() {
                Some(Ok(r)) => Ok(r),
                Some(Err(e)) => Err(anyhow::anyhow!(e)),
                None => Ok((Outcome::NoRelease, None)),
            }
        }

        fn release_after_good_boot(&mut self) -> Result<bool> {
            self.calls.push("release");
            match self.releases.pop_front() {
                Some(Ok(done)) => Ok(done),
                Some(Err(e)) => Err(anyhow::anyhow!(e)),
                None => Ok(true),
            }
        }

        fn reboot_if_staged(&mut self) -> Option<Duration> {
            self.calls.push("reboot-if-staged");
            self.staged_retry
        }
    }

    fn rounds(updater: &mut FakeUpdater, interval: Duration, n: usize) -> FakeClock {
        let mut clock = FakeClock::default();
        let mut daemon = Daemon::new();
        for _ in 0..n {
            let seed = clock.jitter_seed();
            let next = daemon.round(updater, interval, seed);
            clock.sleep(next);
        }
        clock
    }

    fn up_to_date() -> Result<(Outcome, Option<Duration>), String> {
        Ok((
            Outcome::UpToDate {
                version: "1".into(),
            },
            None,
        ))
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for seed in [0, 1, 7_199, 7_200, 123_456_789, u32::MAX] {
            let d = jittered(HOUR, seed);
            assert!(d >= HOUR * 9 / 10 && d < HOUR * 11 / 10, "{seed}: {d:?}");
        }
        assert_eq!(jittered(HOUR, 0), HOUR * 9 / 10);
        assert_eq!(jittered(HOUR, 360_000), HOUR);
        assert_eq!(
            jittered(Duration::from_millis(4), 3),
            Duration::from_millis(4)
        );
    }

    #[test]
    fn the_lock_is_released_once_per_start_after_a_good_boot() {
        let mut updater = FakeUpdater {
            rounds: [up_to_date(), up_to_date(), up_to_date()].into(),
            ..FakeUpdater::default()
        };
        let clock = rounds(&mut updater, HOUR, 3);
        assert_eq!(
            updater.calls,
            ["apply", "release", "apply", "apply"],
            "released once"
        );
        assert_eq!(clock.sleeps, [HOUR * 9 / 10; 3]);
        assert_eq!(clock.now, HOUR * 27 / 10);
    }

    #[test]
    fn a_refused_or_failed_release_is_tried_again_next_round() {
        let mut updater = FakeUpdater {
            rounds: [up_to_date(), up_to_date(), up_to_date(), up_to_date()].into(),
            releases: [Ok(false), Err("server unreachable".into()), Ok(true)].into(),
            ..FakeUpdater::default()
        };
        rounds(&mut updater, HOUR, 4);
        assert_eq!(
            updater.calls,
            ["apply", "release", "apply", "release", "apply", "release", "apply"]
        );
    }

    #[test]
    fn no_release_before_the_boot_settles_or_while_an_update_is_staged() {
        let staged = |retry| {
            Ok((
                Outcome::Staged {
                    version: "2".into(),
                    slot: Slot::B,
                },
                retry,
            ))
        };
        let mut updater = FakeUpdater {
            rounds: [
                Ok((Outcome::NotSettled, None)),
                Ok((
                    Outcome::WaitingForBless {
                        slot: Slot::A,
                        version: "1".into(),
                    },
                    None,
                )),
                staged(Some(Duration::from_secs(300))),
                Ok((
                    Outcome::AlreadyStaged {
                        version: "2".into(),
                        slot: Slot::B,
                    },
                    None,
                )),
                up_to_date(),
            ]
            .into(),
            ..FakeUpdater::default()
        };
        let clock = rounds(&mut updater, HOUR, 5);
        assert_eq!(
            updater.calls,
            ["apply", "apply", "apply", "apply", "apply", "release"]
        );
        assert_eq!(
            clock.sleeps,
            [
                // NotSettled: look again after SETTLE_RETRY.
                strategy::SETTLE_RETRY,
                // WaitingForBless: the ordinary interval.
                HOUR * 9 / 10,
                // A staged update waiting for its lock: one second after the retry it named.
                Duration::from_secs(301),
                HOUR * 9 / 10,
                HOUR * 9 / 10,
            ]
        );
    }

    #[test]
    fn a_wait_retry_never_lengthens_the_interval() {
        let mut updater = FakeUpdater {
            rounds: [Ok((
                Outcome::AlreadyStaged {
                    version: "2".into(),
                    slot: Slot::B,
                },
                Some(HOUR * 5),
            ))]
            .into(),
            ..FakeUpdater::default()
        };
        let clock = rounds(&mut updater, HOUR, 1);
        assert_eq!(clock.sleeps, [HOUR * 9 / 10]);
    }

    #[test]
    fn an_unreachable_server_still_reboots_into_a_staged_update() {
        let mut updater = FakeUpdater {
            rounds: [Err("connecting to the release server".into())].into(),
            staged_retry: Some(Duration::from_secs(60)),
            ..FakeUpdater::default()
        };
        let clock = rounds(&mut updater, HOUR, 1);
        assert_eq!(updater.calls, ["apply", "reboot-if-staged"]);
        assert_eq!(clock.sleeps, [Duration::from_secs(61)]);
        // Nothing staged: the ordinary interval, and no release after an error.
        let mut updater = FakeUpdater {
            rounds: [Err("offline".into()), up_to_date()].into(),
            ..FakeUpdater::default()
        };
        let clock = rounds(&mut updater, HOUR, 2);
        assert_eq!(
            updater.calls,
            ["apply", "reboot-if-staged", "apply", "release"]
        );
        assert_eq!(clock.sleeps, [HOUR * 9 / 10; 2]);
    }
}
