//! `plinth-init`: PID 1 of a Plinth machine, in the initramfs (stage 1) and in the real root
//! (stage 2). See `init::boot::select_stage` for how it tells the two apart.

use init::boot::{select_stage, Stage};
use init::stage2::workload::{DockerWorkload, DEFINITION_PATH};
use init::stage2::Workload;
use init::system::Paths;
use std::path::Path;
use std::sync::Arc;

fn main() {
    init::status::install_panic_hook();
    let args: Vec<String> = std::env::args().collect();
    let is_pid1 = rustix::process::getpid().is_init();
    let sysroot = std::path::Path::new("/sysroot").is_dir();
    match select_stage(&args, is_pid1, sysroot) {
        Ok(Stage::One) => init::stage1::run(),
        Ok(Stage::Two) => init::stage2::run(stage2_workload),
        Err(message) => {
            eprintln!("plinth-init: {message}");
            std::process::exit(2);
        }
    }
}

/// Stage 2's workload, made once the system is prepared: the installer when a live boot was asked
/// to install, else Docker Engine and the declared containers of the image definition with the
/// instance's user data over it.
fn stage2_workload(paths: &Paths) -> anyhow::Result<Arc<dyn Workload>> {
    let path = Path::new(DEFINITION_PATH);
    // A live boot asked to install: no engine, the installer, then the installed disk.
    match init::stage2::install::requested() {
        Ok(Some(request)) => {
            let workload = init::stage2::install::InstallWorkload::load(request, path)?;
            return Ok(Arc::new(workload));
        }
        Ok(None) => {}
        // Reported, then the live system comes up as it would without the request.
        Err(e) => init::status::status(
            "install-failed",
            &[("reason", "bad-arguments"), ("error", &format!("{e:#}"))],
        ),
    }
    let image = DockerWorkload::read_definition(path)?;
    let instance = init::stage2::instance::provision(paths, image);
    // A boot whose entry still carries a boot counter is blessed only once healthy.
    let gate = init::update::gate::bless_hook(init::update::Paths::default());
    Ok(Arc::new(
        DockerWorkload::for_instance(instance)?.on_start(gate),
    ))
}
