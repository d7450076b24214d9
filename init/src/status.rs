//! Console logging: human lines prefixed `plinth-init: ` and machine-readable `PLINTH-STATUS` lines.
//!
//! Lines go to `/dev/console` (falling back to stderr) and to `/dev/kmsg`. Records in the kernel log
//! use the `daemon.debug` priority so that the kernel does not echo them to the console a second
//! time at the default console log level (7).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::Mutex;

/// Where log lines are written.
struct Sinks {
    console: Option<File>,
    kmsg: Option<File>,
}

static SINKS: Mutex<Sinks> = Mutex::new(Sinks {
    console: None,
    kmsg: None,
});

/// (Re)opens `/dev/console` and `/dev/kmsg`; call again after mounting devtmpfs.
///
/// Missing devices are not an error: lines then go to stderr only.
pub fn open_sinks() {
    let console = OpenOptions::new().write(true).open("/dev/console").ok();
    let kmsg = OpenOptions::new().write(true).open("/dev/kmsg").ok();
    if let Ok(mut sinks) = SINKS.lock() {
        sinks.console = console;
        sinks.kmsg = kmsg;
    }
}

/// Writes one line to the console (or stderr) and, if `to_kmsg`, to the kernel log.
fn emit(line: &str, to_kmsg: bool) {
    let mut guard = match SINKS.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    let text = format!("{line}\n");
    let written = match guard.console.as_mut() {
        Some(console) => console.write_all(text.as_bytes()).is_ok(),
        None => false,
    };
    if !written {
        // Tests use `eprint!` so the harness captures it; PID 1 must not panic on a failed write.
        #[cfg(test)]
        eprint!("{text}");
        #[cfg(not(test))]
        let _ = std::io::stderr().write_all(text.as_bytes());
    }
    if to_kmsg {
        if let Some(kmsg) = guard.kmsg.as_mut() {
            // One write per record; `<31>` is facility daemon, priority debug.
            let _ = kmsg.write_all(format!("<31>{line}").as_bytes());
        }
    }
}

/// Logs a human-readable line: `plinth-init: <message>`.
pub fn log(message: &str) {
    for line in message.lines() {
        emit(&format!("plinth-init: {line}"), true);
    }
}

/// Prints a `PLINTH-STATUS` line ([`os_config::status::format`]) to the console and the kernel log.
pub fn status(event: &str, fields: &[(&str, &str)]) {
    emit(&os_config::status::format(event, fields), true);
}

/// Logs a formatted human-readable line (`plinth-init: …`).
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => {
        $crate::status::log(&format!($($arg)*))
    };
}

/// Installs a panic hook that writes the panic to the console and the kernel log. As PID 1 it
/// then syncs and reboots after 5 s: with `panic = "abort"` the kernel would otherwise panic.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        log(&format!("panic: {info}"));
        if rustix::process::getpid().is_init() {
            status("fatal", &[("error", &format!("panic: {info}"))]);
            std::thread::sleep(std::time::Duration::from_secs(5));
            rustix::fs::sync();
            let _ = rustix::system::reboot(rustix::system::RebootCommand::Restart);
        }
    }));
}
