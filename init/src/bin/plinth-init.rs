//! `plinth-init`: PID 1 of a Plinth machine, in the initramfs (stage 1) and in the real root
//! (stage 2). See `init::boot::select_stage` for how it tells the two apart.

use init::boot::{select_stage, Stage};
use std::sync::Arc;

fn main() {
    init::status::install_panic_hook();
    let args: Vec<String> = std::env::args().collect();
    let is_pid1 = rustix::process::getpid().is_init();
    let sysroot = std::path::Path::new("/sysroot").is_dir();
    match select_stage(&args, is_pid1, sysroot) {
        Ok(Stage::One) => init::stage1::run(),
        Ok(Stage::Two) => {
            let path = std::path::Path::new(init::stage2::workload::DEFINITION_PATH);
            // A live boot asked to install: no engine, the installer, then the installed disk.
            match init::stage2::install::requested() {
                Ok(Some(request)) => {
                    match init::stage2::install::InstallWorkload::load(request, path) {
                        Ok(workload) => init::stage2::run(Arc::new(workload)),
                        Err(e) => init::stage2::fatal(e),
                    }
                }
                Ok(None) => {}
                // Reported, then the live system comes up as it would without the request.
                Err(e) => init::status::status(
                    "install-failed",
                    &[("reason", "bad-arguments"), ("error", &format!("{e:#}"))],
                ),
            }
            match init::stage2::workload::DockerWorkload::load(path) {
                // A boot whose entry still carries a boot counter is blessed only once healthy.
                Ok(workload) => {
                    let gate = init::update::gate::bless_hook(init::update::Paths::default());
                    init::stage2::run(Arc::new(workload.on_start(gate)))
                }
                Err(e) => init::stage2::fatal(e),
            }
        }
        Err(message) => {
            eprintln!("plinth-init: {message}");
            std::process::exit(2);
        }
    }
}
