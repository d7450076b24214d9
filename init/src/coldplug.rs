//! Loading kernel modules by name and by coldplug (each device's `modalias` against `modules.alias`).

use crate::kmod::ModuleIndex;
use crate::system::System;
use anyhow::{Context as _, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Loads modules of one kernel, dependencies first, each at most once.
#[derive(Debug)]
pub struct ModuleLoader {
    /// `<modules>/<kernel release>`.
    pub dir: PathBuf,
    /// The kernel's `modules.dep` and `modules.alias`.
    pub index: ModuleIndex,
    /// Modules this loader has loaded or found loaded.
    pub loaded: BTreeSet<String>,
}

/// What a batch of loads did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Modules loaded now (dependencies included), in order; not the ones already loaded.
    pub loaded: Vec<String>,
    /// Requested names not in `modules.dep`: built into the kernel, or not shipped.
    pub not_modules: Vec<String>,
    /// (module, error) for loads the kernel refused.
    pub failed: Vec<(String, String)>,
    /// Modules whose init found no device (ENODEV): normal for coldplug matches like cpufreq.
    pub no_device: Vec<String>,
}

impl ModuleLoader {
    /// Reads `modules.dep` and `modules.alias` from `modules/<release>`.
    pub fn open<S: System + ?Sized>(
        sys: &S,
        modules: &Path,
        release: &str,
    ) -> Result<ModuleLoader> {
        let dir = modules.join(release);
        let read = |name: &str| -> Result<String> {
            let path = dir.join(name);
            let bytes = sys
                .read(&path)
                .with_context(|| format!("reading {} (kernel {release})", path.display()))?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        };
        let dep = read("modules.dep")?;
        // A kernel without loadable aliases still boots; a missing alias file only disables coldplug.
        let alias = read("modules.alias").unwrap_or_default();
        let index = ModuleIndex::parse(&dep, &alias).map_err(|e| {
            anyhow::anyhow!(
                "parsing modules of kernel {release} in {}: {e}",
                dir.display()
            )
        })?;
        Ok(ModuleLoader {
            dir,
            index,
            loaded: BTreeSet::new(),
        })
    }

    /// Loads `names` with their dependencies. Failures are reported, not fatal: the step that
    /// needs the module names what is missing.
    pub fn load<S: System + ?Sized, N: AsRef<str>>(&mut self, sys: &S, names: &[N]) -> LoadReport {
        let (order, not_modules) = self.index.load_order(names);
        let mut report = LoadReport {
            not_modules,
            ..LoadReport::default()
        };
        for name in order {
            if self.loaded.contains(&name) {
                continue;
            }
            let Some(relative) = self.index.path(&name) else {
                continue;
            };
            let path = self.dir.join(relative);
            match sys.load_module(&path) {
                Ok(newly) => {
                    self.loaded.insert(name.clone());
                    if newly {
                        report.loaded.push(name);
                    }
                }
                Err(e) if e.raw_os_error() == Some(19) => report.no_device.push(name),
                Err(e) => report
                    .failed
                    .push((name, format!("{}: {e}", path.display()))),
            }
        }
        report
    }

    /// Loads what matches the modaliases of devices present now and repeats while new modules
    /// appear (a bus driver reveals the devices behind it), at most `rounds` times.
    pub fn coldplug<S: System + ?Sized>(
        &mut self,
        sys: &S,
        sysfs: &Path,
        rounds: usize,
    ) -> LoadReport {
        let mut total = LoadReport::default();
        let mut tried = BTreeSet::new();
        for _ in 0..rounds {
            let mut wanted = Vec::new();
            for modalias in modaliases(sys, sysfs) {
                for module in self.index.match_alias(&modalias) {
                    if !self.loaded.contains(&module) && tried.insert(module.clone()) {
                        wanted.push(module);
                    }
                }
            }
            if wanted.is_empty() {
                break;
            }
            let report = self.load(sys, &wanted);
            total.loaded.extend(report.loaded);
            total.failed.extend(report.failed);
            total.no_device.extend(report.no_device);
        }
        total
    }
}

/// A coldplug that runs at most once, however many steps ask for it: provisioning needs the
/// network card's driver before it asks a metadata service, and the device-module thread needs
/// every driver later in the same boot.
#[derive(Debug, Default)]
pub struct ColdplugOnce {
    report: OnceLock<LoadReport>,
}

impl ColdplugOnce {
    /// A coldplug that has not run yet.
    pub const fn new() -> ColdplugOnce {
        ColdplugOnce {
            report: OnceLock::new(),
        }
    }

    /// The first call runs [`ModuleLoader::coldplug`] with `loader` and logs its report under
    /// `coldplug`; later calls load and log nothing and return that first report. A call made
    /// while the first runs (in another thread) waits for it.
    pub fn run<S: System + ?Sized>(
        &self,
        loader: &mut ModuleLoader,
        sys: &S,
        sysfs: &Path,
        rounds: usize,
    ) -> &LoadReport {
        self.report.get_or_init(|| {
            let report = loader.coldplug(sys, sysfs, rounds);
            log_report("coldplug", &report);
            report
        })
    }
}

/// Every device's `modalias` under `<sysfs>/bus/*/devices/*/modalias`, deduplicated, sorted.
pub fn modaliases<S: System + ?Sized>(sys: &S, sysfs: &Path) -> Vec<String> {
    let mut found = BTreeSet::new();
    let bus_dir = sysfs.join("bus");
    for bus in sys.list_dir(&bus_dir).unwrap_or_default() {
        let devices = bus_dir.join(&bus).join("devices");
        for device in sys.list_dir(&devices).unwrap_or_default() {
            if let Ok(bytes) = sys.read(&devices.join(&device).join("modalias")) {
                let text = String::from_utf8_lossy(&bytes).trim().to_string();
                if !text.is_empty() {
                    found.insert(text);
                }
            }
        }
    }
    found.into_iter().collect()
}

/// Logs a load report under a heading (`stage1 modules`).
pub fn log_report(what: &str, report: &LoadReport) {
    if !report.loaded.is_empty() {
        crate::info!("{what}: loaded {}", report.loaded.join(" "));
    }
    if !report.not_modules.is_empty() {
        crate::info!(
            "{what}: not loadable modules of this kernel (built in or not shipped): {}",
            report.not_modules.join(" ")
        );
    }
    if !report.no_device.is_empty() {
        crate::info!("{what}: found no device: {}", report.no_device.join(" "));
    }
    for (name, error) in &report.failed {
        crate::info!("{what}: loading {name} failed: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::FakeSystem;

    fn fake() -> FakeSystem {
        let sys = FakeSystem::new("6.1.0-test");
        let dir = "/lib/modules/6.1.0-test";
        sys.add_file(
            format!("{dir}/modules.dep"),
            "kernel/virtio_pci.ko: kernel/virtio.ko\nkernel/virtio.ko:\nkernel/virtio_blk.ko: kernel/virtio.ko\nkernel/button.ko:\n",
        );
        sys.add_file(
            format!("{dir}/modules.alias"),
            "alias pci:v00001AF4d* virtio_pci\nalias virtio:d00000002v* virtio_blk\nalias acpi*:LNXPWRBN:* button\n",
        );
        for module in ["virtio_pci", "virtio", "virtio_blk", "button"] {
            sys.add_file(format!("{dir}/kernel/{module}.ko"), b"\x7fELF");
        }
        sys.add_file(
            "/sys/bus/pci/devices/0000:00:04.0/modalias",
            "pci:v00001AF4d00001001sv1sd2bc01sc00i00\n",
        );
        sys.add_file(
            "/sys/bus/acpi/devices/LNXPWRBN:00/modalias",
            "acpi:LNXPWRBN:\n",
        );
        sys.add_dir("/sys/bus/virtio/devices");
        sys
    }

    #[test]
    fn coldplug_loads_matches_with_dependencies() {
        let sys = fake();
        let mut loader =
            ModuleLoader::open(&sys, Path::new("/lib/modules"), "6.1.0-test").expect("opens");
        let report = loader.coldplug(&sys, Path::new("/sys"), 4);
        assert_eq!(report.loaded, ["button", "virtio", "virtio_pci"]);
        // The virtio bus appears once virtio_pci is loaded: the next coldplug picks up the disk.
        sys.add_file(
            "/sys/bus/virtio/devices/virtio0/modalias",
            "virtio:d00000002v00001AF4",
        );
        let report = loader.coldplug(&sys, Path::new("/sys"), 4);
        assert_eq!(report.loaded, ["virtio_blk"]);
        let loads: Vec<String> = sys
            .calls()
            .into_iter()
            .filter(|c| c.starts_with("load "))
            .collect();
        assert_eq!(loads.len(), 4, "each module loaded once: {loads:?}");
    }

    #[test]
    fn coldplug_once_runs_only_the_first_time() {
        let sys = fake();
        let open =
            || ModuleLoader::open(&sys, Path::new("/lib/modules"), "6.1.0-test").expect("opens");
        let once = ColdplugOnce::new();
        let first = once.run(&mut open(), &sys, Path::new("/sys"), 4).clone();
        assert_eq!(first.loaded, ["button", "virtio", "virtio_pci"]);
        // A new device would be found by a second coldplug; the guard hands back the first one.
        sys.add_file(
            "/sys/bus/virtio/devices/virtio0/modalias",
            "virtio:d00000002v00001AF4",
        );
        let second = once.run(&mut open(), &sys, Path::new("/sys"), 4);
        assert_eq!(second, &first);
        let loads = sys
            .calls()
            .into_iter()
            .filter(|c| c.starts_with("load "))
            .count();
        assert_eq!(loads, 3, "the second call loads nothing");
    }

    #[test]
    fn named_modules_report_builtin_ones() {
        let sys = fake();
        let mut loader =
            ModuleLoader::open(&sys, Path::new("/lib/modules"), "6.1.0-test").expect("opens");
        let report = loader.load(&sys, &["virtio_blk", "nvme"]);
        assert_eq!(report.loaded, ["virtio", "virtio_blk"]);
        assert_eq!(report.not_modules, ["nvme"]);
        let err = ModuleLoader::open(&sys, Path::new("/lib/modules"), "5.0").expect_err("no dir");
        assert!(
            format!("{err:#}").contains("/lib/modules/5.0/modules.dep"),
            "{err:#}"
        );
    }
}
