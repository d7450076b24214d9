//! The boot sequence as data: named steps run in order against a context, each logged with timing.

use anyhow::{Context as _, Result};
use std::time::Duration;

/// One named step of a boot stage.
pub struct Step<C> {
    /// Short name, used in logs, status lines and errors (`mount-root`).
    pub name: &'static str,
    /// The step itself.
    pub run: fn(&mut C) -> Result<()>,
}

impl<C> std::fmt::Debug for Step<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step").field("name", &self.name).finish()
    }
}

/// Gives the steps' runner a clock (monotonic time since boot start).
pub trait Clock {
    /// Monotonic time.
    fn elapsed(&self) -> Duration;
}

/// Runs `steps` in order, logging each with its duration; stops at the first error, which names
/// the step. Returns the names of the steps that ran.
pub fn run_steps<C: Clock>(
    stage: &str,
    steps: &[Step<C>],
    ctx: &mut C,
) -> Result<Vec<&'static str>> {
    let mut done = Vec::new();
    for step in steps {
        let start = ctx.elapsed();
        crate::info!("{stage}: {} …", step.name);
        (step.run)(ctx).with_context(|| format!("{stage} step {}", step.name))?;
        let took = ctx.elapsed().saturating_sub(start);
        crate::info!(
            "{stage}: {} done in {} ms (at {} ms)",
            step.name,
            took.as_millis(),
            ctx.elapsed().as_millis()
        );
        done.push(step.name);
    }
    Ok(done)
}

/// Which part of `plinth-init` a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// PID 1 in the initramfs.
    One,
    /// PID 1 in the real root.
    Two,
}

/// Chooses the stage. An explicit `stage1`/`stage2` argument wins. Otherwise a PID 1 started as
/// `/init` (the kernel runs the initramfs's `/init`) with a `/sysroot` directory is stage 1, and any
/// other PID 1 is stage 2 (stage 1 execs `/usr/bin/plinth-init`). Other arguments are ignored when
/// PID 1: the kernel passes unrecognized command line words (`single`) to init, and PID 1 must not
/// exit over them. Not PID 1: refuse, so running the binary by hand never mounts or reboots anything.
pub fn select_stage(args: &[String], is_pid1: bool, sysroot_exists: bool) -> Result<Stage, String> {
    if !is_pid1 {
        return Err("plinth-init runs only as PID 1 (the kernel starts it)".into());
    }
    match args.get(1).map(String::as_str) {
        Some("stage1") => return Ok(Stage::One),
        Some("stage2") => return Ok(Stage::Two),
        _ => {}
    }
    let argv0 = args.first().map(String::as_str).unwrap_or_default();
    if argv0 == "/init" && sysroot_exists {
        Ok(Stage::One)
    } else {
        Ok(Stage::Two)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stage_selection() {
        assert_eq!(select_stage(&args(&["/init"]), true, true), Ok(Stage::One));
        assert_eq!(select_stage(&args(&["/init"]), true, false), Ok(Stage::Two));
        assert_eq!(
            select_stage(&args(&["/usr/bin/plinth-init"]), true, true),
            Ok(Stage::Two)
        );
        assert_eq!(
            select_stage(&args(&["/sbin/init", "stage1"]), true, false),
            Ok(Stage::One)
        );
        assert!(select_stage(&args(&["plinth-init"]), false, true).is_err());
        assert_eq!(
            select_stage(&args(&["/init", "single"]), true, true),
            Ok(Stage::One)
        );
    }

    struct Counter(Duration);
    impl Clock for Counter {
        fn elapsed(&self) -> Duration {
            self.0
        }
    }

    #[test]
    fn steps_run_in_order_and_stop_at_the_first_error() {
        fn ok(c: &mut Counter) -> Result<()> {
            c.0 += Duration::from_millis(5);
            Ok(())
        }
        fn broken(_: &mut Counter) -> Result<()> {
            anyhow::bail!("disk on fire")
        }
        let steps = [
            Step {
                name: "first",
                run: ok,
            },
            Step {
                name: "second",
                run: broken,
            },
            Step {
                name: "third",
                run: ok,
            },
        ];
        let mut counter = Counter(Duration::ZERO);
        let err = run_steps("test", &steps, &mut counter).expect_err("second fails");
        assert_eq!(format!("{err:#}"), "test step second: disk on fire");
        assert_eq!(counter.0, Duration::from_millis(5), "third never ran");
        let done = run_steps("test", &steps[..1], &mut counter).expect("first alone");
        assert_eq!(done, ["first"]);
    }
}
