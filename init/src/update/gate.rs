//! `plinth-init`'s health-gated bless: from the start of stage 2, a boot whose entry still carries
//! a boot counter is blessed once the workload has been healthy for `[update] bless-after`, or the
//! machine reboots when that is not reached within `[update] bless-timeout` (an engine that never
//! answers counts as unhealthy), or at once when a container restarts during the trial (see
//! [`crate::stage2::stability`]). Once the boot is blessed or known good, the update agent may act
//! ([`crate::stage2::workload::SETTLED_MARKER`]). A boot that is
//! already good instead reports a rollback the update agent has not recorded yet. Every boot from
//! a slot reports `PLINTH-STATUS boot-state slot=… version=… state=…` first.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use os_config::boot::{BootArgs, EntryName, ARG_SLOT};
use os_config::definition::Update;
use os_config::layout::Slot;
use os_config::Definition;

use super::agent::{read_boot_record, read_disk_entries, Agent, Paths};
use super::esp::Blessed;
use crate::stage2::stability::GateResult;
use crate::stage2::workload::{wait_healthy, BootHook};

/// What the gate found about the running boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningBoot {
    /// The boot disk.
    pub disk: PathBuf,
    pub slot: Slot,
    pub version: String,
    /// The running slot's entry on the ESP, if it has one.
    pub entry: Option<EntryName>,
}

impl RunningBoot {
    /// True when the running entry still carries a boot counter: the boot is on trial.
    pub fn on_trial(&self) -> bool {
        self.entry.as_ref().is_some_and(|e| e.counter.is_some())
    }
}

/// The `[update]` table of `definition`, or os-config's defaults when it has none (the bless
/// gate runs on every counted boot, with or without an update server).
pub fn update_settings(definition: &Definition) -> Result<Update> {
    match &definition.update {
        Some(update) => Ok(update.clone()),
        None => serde_json::from_value(serde_json::json!({ "url": "" }))
            .context("reading the default [update] settings"),
    }
}

/// Finds the boot disk and the running slot's entry from the boot record stage 1 wrote at
/// `paths.boot_record`; `version` is the running image's version. `None` when the kernel command
/// line at `paths.cmdline` names no slot (the machine was not booted from a Plinth slot).
pub fn running_boot(paths: &Paths, version: &str) -> Result<Option<RunningBoot>> {
    let cmdline = std::fs::read_to_string(&paths.cmdline)
        .with_context(|| format!("reading {}", paths.cmdline.display()))?;
    let Some(slot) = BootArgs::from_cmdline(&cmdline).slot else {
        return Ok(None);
    };
    let record = read_boot_record(&paths.boot_record)?;
    if record.slot != slot {
        bail!(
            "the boot record {} names slot {}, the kernel command line {ARG_SLOT}={slot}",
            paths.boot_record.display(),
            record.slot
        );
    }
    let disk = paths.disk.clone().unwrap_or(record.disk);
    let entry = read_disk_entries(&disk)?
        .into_iter()
        .find(|e| e.slot == slot && e.version == version);
    Ok(Some(RunningBoot {
        disk,
        slot,
        version: version.to_owned(),
        entry,
    }))
}

/// What the gate decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not booted from a slot, or the running entry is already good.
    NotOnTrial,
    /// Healthy for long enough: the entry was renamed without its counter.
    Blessed { slot: Slot, version: String },
    /// Not healthy within the timeout, or a container restarted: the caller reboots.
    Unhealthy {
        slot: Slot,
        version: String,
        reason: String,
    },
}

/// Runs the gate for the running boot: waits for health through `healthy(bless_after,
/// bless_timeout)` and blesses on success. Never reboots itself.
pub fn run_gate(
    paths: &Paths,
    definition: &Definition,
    healthy: &dyn Fn(Duration, Duration) -> Result<GateResult>,
) -> Result<Verdict> {
    let version = definition.image.version.to_string();
    let Some(boot) = running_boot(paths, &version)? else {
        return Ok(Verdict::NotOnTrial);
    };
    let state = boot
        .entry
        .as_ref()
        .map_or("no-entry".to_owned(), |e| e.running_state().to_string());
    crate::status::status(
        "boot-state",
        &[
            ("slot", boot.slot.as_str()),
            ("version", &boot.version),
            ("state", &state),
        ],
    );
    if !boot.on_trial() {
        return Ok(Verdict::NotOnTrial);
    }
    let update = update_settings(definition)?;
    crate::info!(
        "boot of {} in slot {} is on trial: blessing it once healthy for {} s (within {} s)",
        boot.version,
        boot.slot,
        update.bless_after.0.as_secs(),
        update.bless_timeout.0.as_secs()
    );
    match healthy(update.bless_after.0, update.bless_timeout.0)? {
        GateResult::Healthy => {
            let _: Blessed = super::agent::bless_disk(&boot.disk, boot.slot, &boot.version)?;
            Ok(Verdict::Blessed {
                slot: boot.slot,
                version: boot.version,
            })
        }
        GateResult::Unhealthy(reason) => Ok(Verdict::Unhealthy {
            slot: boot.slot,
            version: boot.version,
            reason,
        }),
    }
}

/// Asks PID 1 for a clean reboot (SIGINT, as Ctrl-Alt-Del).
fn request_reboot() {
    if let Err(e) =
        rustix::process::kill_process(rustix::process::Pid::INIT, rustix::process::Signal::Int)
    {
        crate::info!("asking PID 1 to reboot failed: {e}");
    }
}

/// Reports a rollback the agent has not recorded yet (only for images with `[update]`).
fn report_rollback(paths: &Paths) {
    let result = Agent::load(paths.clone()).and_then(|agent| agent.detect_rollback());
    match result {
        Ok(Some(rb)) => crate::status::status("rollback", &[("from", &rb.from), ("to", &rb.to)]),
        Ok(None) => {}
        Err(e) => crate::info!("checking for a rollback failed: {e:#}"),
    }
}

/// The gate as a [`BootHook`] for [`crate::stage2::workload::DockerWorkload::on_start`]:
/// `PLINTH-STATUS boot-blessed slot=… version=…` on success; on failure `boot-unhealthy` and a
/// reboot (the boot counter is already spent, so the tries run out and the old slot boots).
pub fn bless_hook(paths: Paths) -> BootHook {
    Arc::new(move |boot| {
        let definition = &boot.definition;
        let reconciled = || boot.reconciled();
        let healthy = |after, timeout| {
            wait_healthy(
                &boot.client,
                &definition.containers,
                &reconciled,
                &boot.observer,
                after,
                timeout,
            )
        };
        match run_gate(&paths, definition, &healthy) {
            Ok(Verdict::NotOnTrial) => {
                boot.boot_is_good();
                if definition.update.is_some() {
                    report_rollback(&paths);
                }
            }
            Ok(Verdict::Blessed { slot, version }) => {
                crate::status::status(
                    "boot-blessed",
                    &[("slot", slot.as_str()), ("version", &version)],
                );
                boot.boot_is_good();
            }
            Ok(Verdict::Unhealthy {
                slot,
                version,
                reason,
            }) => {
                crate::status::status(
                    "boot-unhealthy",
                    &[
                        ("slot", slot.as_str()),
                        ("version", &version),
                        ("reason", &reason),
                    ],
                );
                crate::info!(
                    "{version} in slot {slot} is not healthy ({reason}); rebooting (its boot counter is spent)"
                );
                request_reboot();
            }
            // Not knowing whether the boot is on trial, rebooting could loop: leave the decision
            // to the boot counter (an unblessed entry runs out of tries on later boots). The
            // agent still refuses to replace the other slot while the running entry is counted.
            Err(e) => {
                crate::info!("the bless gate failed: {e:#}");
                boot.boot_is_good();
            }
        }
    })
}
