//! End-to-end test harness: boots Plinth disk images with OVMF under QEMU (TCG), reads the serial
//! console, waits for `PLINTH-STATUS` lines with timeouts, and on failure saves the console log
//! and prints its Plinth lines and tail.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod engine;
pub mod image;
pub mod netns;
pub mod series;
pub mod tls;

/// UEFI firmware code and variable template, as Debian's `ovmf` package installs them.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// How to boot a guest.
#[derive(Debug, Clone)]
pub struct VmOptions {
    pub disk: PathBuf,
    pub mem_mib: u32,
    /// Host TCP port (on 127.0.0.1) → guest port.
    pub forwards: Vec<(u16, u16)>,
    /// `guestfwd` rules: guest `ip:port` → host `127.0.0.1:port`.
    pub guest_forwards: Vec<(String, u16)>,
    /// `guestfwd` rules that run a command per connection: guest `ip:port` → command line (QEMU
    /// allows only one chardev-backed forward per port number).
    pub guest_commands: Vec<(String, String)>,
    /// Extra raw disks attached as virtio drives after the boot disk.
    pub extra_disks: Vec<PathBuf>,
    /// Write guest changes to a throw-away overlay instead of the disk.
    pub snapshot: bool,
    /// Network boot: QEMU's built-in TFTP server serves this folder and DHCP names this boot
    /// file (OVMF loads it over TFTP as a UEFI program).
    pub tftp: Option<(PathBuf, String)>,
    /// QEMU fw_cfg items: `name=…,string=…`.
    pub fw_cfg: Vec<(String, String)>,
    /// Exit QEMU instead of rebooting the guest (`-no-reboot`).
    pub no_reboot: bool,
    /// QEMU fw_cfg items from files: `name=…,file=…` (for contents with commas or newlines).
    pub fw_cfg_files: Vec<(String, PathBuf)>,
    /// `-smbios` arguments, such as `type=1,manufacturer=Amazon EC2,product=m7i.large`.
    pub smbios: Vec<String>,
    /// The user network's addresses, such as `169.254.0.0/16` for a guest that must see a
    /// cloud's link-local metadata address (default: QEMU's 10.0.2.0/24).
    pub user_net: Option<String>,
    /// `-rtc base=…`: the guest's clock at power-on, such as `2015-06-01T00:00:00`.
    pub rtc_base: Option<String>,
    /// Instead of the user network: QEMU runs inside this network namespace, and the guest's
    /// only NIC is this tap device in it (made by [`netns::NetNs::add_tap`]).
    pub tap: Option<(String, String)>,
}

impl VmOptions {
    pub fn new(disk: impl Into<PathBuf>) -> VmOptions {
        VmOptions {
            disk: disk.into(),
            mem_mib: 2048,
            forwards: Vec::new(),
            guest_forwards: Vec::new(),
            guest_commands: Vec::new(),
            extra_disks: Vec::new(),
            snapshot: false,
            tftp: None,
            fw_cfg: Vec::new(),
            no_reboot: false,
            fw_cfg_files: Vec::new(),
            smbios: Vec::new(),
            user_net: None,
            rtc_base: None,
            tap: None,
        }
    }

    /// A guest without a boot disk that boots `boot_file` from `folder` over the network
    /// (OVMF's PXE client, QEMU's DHCP and TFTP); `extra_disks` are its local disks.
    pub fn network_boot(folder: impl Into<PathBuf>, boot_file: &str) -> VmOptions {
        VmOptions {
            tftp: Some((folder.into(), boot_file.to_owned())),
            ..VmOptions::new(PathBuf::new())
        }
    }
}

/// The console output seen so far, shared with the reader thread.
#[derive(Debug, Default)]
struct Console {
    text: Mutex<String>,
    changed: Condvar,
    /// When the guest last printed anything.
    last_output: Mutex<Option<Instant>>,
}

/// How long the console may stay silent after the guest's `reboot: machine restart` before the
/// harness presses reset: under TCG, OVMF now and then hangs in the reset the guest asked for
/// (nothing, not even the firmware's boot lines, follows), which is the emulator's fault, not
/// the guest's. A real machine would need its reset button or a watchdog alike.
pub const RESET_SILENCE: Duration = Duration::from_secs(90);

/// A running QEMU guest. Killed when dropped.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    console: Arc<Console>,
    monitor: PathBuf,
    dir: tempfile::TempDir,
    started: Instant,
    /// Console length at which reset was last pressed (once per hang).
    reset_pressed_at: Option<usize>,
}

/// Virtual CPUs of a test guest. One: the tests run two guests at a time on two host cores, and
/// a single vCPU per guest under multi-threaded TCG neither oversubscribes the host (a descheduled
/// vCPU holding a lock stalls the other) nor lets one vCPU run code another has just patched
/// (the kernel's `text_poke` int3 sequence), which once left a guest stuck in its int3 handler.
/// A boot to running containers measured the same with one vCPU as with two.
pub const GUEST_CPUS: &str = "1";

/// Checks that QEMU and OVMF are installed; tests fail (not skip) without them.
pub fn require_qemu() -> Result<()> {
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    if !matches!(qemu, Ok(ref out) if out.status.success()) {
        bail!("qemu-system-x86_64 is not installed: run scripts/host-packages.sh (apt-get install qemu-system-x86)");
    }
    for file in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(file).is_file() {
            bail!("{file} is missing: run scripts/host-packages.sh (apt-get install ovmf)");
        }
    }
    Ok(())
}

impl Vm {
    /// Starts QEMU with OVMF under TCG, user networking with `restrict=on`, serial on a pipe.
    pub fn boot(opts: &VmOptions) -> Result<Vm> {
        require_qemu()?;
        let dir = tempfile::tempdir().context("creating a folder for the guest's files")?;
        let vars = dir.path().join("OVMF_VARS.fd");
        std::fs::copy(OVMF_VARS, &vars).with_context(|| format!("copying {OVMF_VARS}"))?;
        let monitor = dir.path().join("monitor.sock");
        let mut netdev = String::from("user,id=n0,restrict=on");
        if let Some(net) = &opts.user_net {
            netdev.push_str(&format!(",net={net}"));
        }
        if let Some((folder, boot_file)) = &opts.tftp {
            netdev.push_str(&format!(",tftp={},bootfile={boot_file}", folder.display()));
        }
        for (host, guest) in &opts.forwards {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        for (guest, host) in &opts.guest_forwards {
            netdev.push_str(&format!(",guestfwd=tcp:{guest}-tcp:127.0.0.1:{host}"));
        }
        for (guest, command) in &opts.guest_commands {
            netdev.push_str(&format!(
                ",guestfwd=tcp:{guest}-cmd:{}",
                command.replace(',', ",,")
            ));
        }
        if let Some((_, tap)) = &opts.tap {
            netdev = format!("tap,id=n0,ifname={tap},script=no,downscript=no");
        }
        // Guests on one bridge need MAC addresses of their own (QEMU gives each the same).
        let nic = match &opts.tap {
            Some((_, tap)) => format!("virtio-net-pci,netdev=n0,mac={}", tap_mac(tap)),
            None => "virtio-net-pci,netdev=n0".to_owned(),
        };
        let mut cmd = match &opts.tap {
            Some((namespace, _)) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", namespace, "qemu-system-x86_64"]);
                cmd
            }
            None => Command::new("qemu-system-x86_64"),
        };
        cmd.args([
            "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", GUEST_CPUS,
        ])
        .args(["-m", &opts.mem_mib.to_string()])
        .args(["-nodefaults", "-display", "none", "-serial", "stdio"])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
        ))
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ))
        .args(["-netdev", &netdev, "-device", &nic])
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()));
        if !opts.disk.as_os_str().is_empty() {
            cmd.arg("-drive").arg(format!(
                "if=virtio,format=raw,file={}{}",
                opts.disk.display(),
                if opts.snapshot { ",snapshot=on" } else { "" }
            ));
        }
        for (name, value) in &opts.fw_cfg {
            cmd.arg("-fw_cfg")
                .arg(format!("name={name},string={value}"));
        }
        for (name, file) in &opts.fw_cfg_files {
            cmd.arg("-fw_cfg")
                .arg(format!("name={name},file={}", file.display()));
        }
        for smbios in &opts.smbios {
            cmd.arg("-smbios").arg(smbios);
        }
        if let Some(base) = &opts.rtc_base {
            cmd.arg("-rtc").arg(format!("base={base}"));
        }
        if opts.no_reboot {
            cmd.arg("-no-reboot");
        }
        for disk in &opts.extra_disks {
            cmd.arg("-drive")
                .arg(format!("if=virtio,format=raw,file={}", disk.display()));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
        let console = Arc::new(Console::default());
        let echo = std::env::var_os("PLINTH_TEST_CONSOLE").is_some();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let console = Arc::clone(&console);
            std::thread::spawn(move || pump(stream, &console, echo));
        }
        Ok(Vm {
            child,
            console,
            monitor,
            dir,
            started: Instant::now(),
            reset_pressed_at: None,
        })
    }

    /// Seconds since QEMU started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Everything the guest printed so far.
    pub fn console(&self) -> String {
        self.console
            .text
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default()
    }

    /// Waits until a console line contains `needle`; returns that line. On timeout the error
    /// carries the console report of [`Vm::report`].
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_for_after(needle, 0, timeout)
            .map(|(line, _)| line)
    }

    /// Like [`Vm::wait_for`], but only looks at text from byte `from` of the console on; returns
    /// the line and the offset just past it, so a test can wait for the next occurrence.
    pub fn wait_for_after(
        &mut self,
        needle: &str,
        from: usize,
        timeout: Duration,
    ) -> Result<(String, usize)> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let text = self
                    .console
                    .text
                    .lock()
                    .map_err(|_| anyhow::anyhow!("console lock poisoned"))?;
                let from = from.min(text.len());
                if let Some(pos) = text[from..].find(needle) {
                    let start = from + text[from..pos + from].rfind('\n').map_or(0, |i| i + 1);
                    let end = text[from + pos..]
                        .find('\n')
                        .map_or(text.len(), |i| from + pos + i);
                    return Ok((text[start..end].trim_end_matches('\r').to_owned(), end));
                }
                let now = Instant::now();
                if now >= deadline {
                    drop(text);
                    bail!(
                        "timed out after {timeout:?} waiting for `{needle}` on the guest console\n{}",
                        self.report()
                    );
                }
                let _unused = self
                    .console
                    .changed
                    .wait_timeout(text, (deadline - now).min(Duration::from_millis(500)));
            }
            self.unstick_reset();
            if let Some(status) = self.child.try_wait()? {
                let text = self.console();
                if !text[from.min(text.len())..].contains(needle) {
                    bail!(
                        "QEMU exited ({status}) before `{needle}` appeared\n{}",
                        self.report()
                    );
                }
            }
        }
    }

    /// Waits for `PLINTH-STATUS <event>` and returns its key=value fields.
    pub fn wait_status(
        &mut self,
        event: &str,
        timeout: Duration,
    ) -> Result<BTreeMap<String, String>> {
        let line = self.wait_for(&format!("PLINTH-STATUS {event}"), timeout)?;
        Ok(parse_status(&line))
    }

    /// Sends a human monitor command (e.g. `system_powerdown`) and returns its reply.
    pub fn monitor(&self, command: &str) -> Result<String> {
        let mut stream = UnixStream::connect(&self.monitor).with_context(|| {
            format!(
                "connecting to the QEMU monitor at {}",
                self.monitor.display()
            )
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("{command}\n").as_bytes())?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    reply.extend_from_slice(&buf[..n]);
                    if String::from_utf8_lossy(&reply).matches("(qemu)").count() >= 2 {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }

    /// Waits for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("QEMU still running after {timeout:?}\n{}", self.report());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What a failing test prints about the guest: the whole console goes to a file under
    /// `target/qemu-tests/logs` (named in the report); the report itself holds Plinth's own
    /// lines and the console's last lines, so it stays readable in a long CI log.
    pub fn report(&self) -> String {
        let text = self.console();
        let saved = save_log(&text);
        console_report(&text, saved.as_deref())
    }

    /// Presses reset (the monitor's `system_reset`) once when the guest asked for a reboot and
    /// then printed nothing for [`RESET_SILENCE`]; see there.
    fn unstick_reset(&mut self) {
        let text = self.console();
        let quiet = self
            .console
            .last_output
            .lock()
            .ok()
            .and_then(|last| last.map(|t| t.elapsed()))
            .unwrap_or_default();
        if needs_reset(&text, quiet, self.reset_pressed_at) {
            self.reset_pressed_at = Some(text.len());
            eprintln!(
                "harness: the guest printed nothing for {} s after `reboot: machine restart` (a firmware hang on reset under TCG); pressing reset",
                quiet.as_secs()
            );
            if let Err(e) = self.monitor("system_reset") {
                eprintln!("harness: pressing reset failed: {e:#}");
            }
        }
    }

    /// Kills QEMU at once, as a power cut would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Folder holding this guest's private files (UEFI variables, monitor socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pump(stream: Box<dyn Read + Send>, console: &Console, echo: bool) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                if echo {
                    eprint!("{text}");
                }
                if let Ok(mut all) = console.text.lock() {
                    all.push_str(&text);
                }
                if let Ok(mut last) = console.last_output.lock() {
                    *last = Some(Instant::now());
                }
                console.changed.notify_all();
            }
        }
    }
}

/// Whether a console that ends with the guest's reboot and has been quiet for `quiet` needs reset
/// pressed (not again for the same hang, marked by the console length `pressed_at`).
fn needs_reset(text: &str, quiet: Duration, pressed_at: Option<usize>) -> bool {
    text.trim_end().ends_with("reboot: machine restart")
        && quiet >= RESET_SILENCE
        && pressed_at != Some(text.len())
}

/// Lines of the console tail a failure report shows.
const REPORT_TAIL_LINES: usize = 60;

/// Writes a console log to `target/qemu-tests/logs/console-<pid>-<n>.log`; returns its path.
fn save_log(text: &str) -> Option<PathBuf> {
    static SAVED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = image::workspace().join("target/qemu-tests/logs");
    std::fs::create_dir_all(&dir).ok()?;
    let n = SAVED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = dir.join(format!("console-{}-{n}.log", std::process::id()));
    std::fs::write(&path, text).ok()?;
    Some(path)
}

/// The failure report of [`Vm::report`] for console text `text`.
/// A locally administered MAC address for the guest on tap `tap`, the same for the same name
/// (FNV-1a of the name).
fn tap_mac(tap: &str) -> String {
    let hash = tap.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let [_, a, b, c] = hash.to_be_bytes();
    format!("52:54:00:{a:02x}:{b:02x}:{c:02x}")
}

/// Whether a console line is the guest kernel reporting a fault or a stall (an oops, a lockup,
/// an RCU stall, a warning, a panic): such a line explains a guest that stopped making progress.
fn kernel_trouble(line: &str) -> bool {
    const MARKS: [&str; 9] = [
        "BUG:",
        "Oops",
        "soft lockup",
        "hard LOCKUP",
        "rcu: INFO",
        "self-detected stall",
        "Kernel panic",
        "WARNING: CPU",
        "int3: 0000",
    ];
    MARKS.iter().any(|mark| line.contains(mark))
}

fn console_report(text: &str, saved: Option<&Path>) -> String {
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    let tail_from = lines.len().saturating_sub(REPORT_TAIL_LINES);
    let plinth: Vec<&str> = lines[..tail_from]
        .iter()
        .copied()
        .filter(|l| {
            l.contains("plinth-init")
                || l.contains("plinth-update")
                || l.contains("Command line:")
                || kernel_trouble(l)
        })
        .collect();
    let mut out = match saved {
        Some(path) => format!("whole console log: {}\n", path.display()),
        None => "whole console log: could not be saved\n".to_owned(),
    };
    if let Some(first) = lines.iter().find(|l| kernel_trouble(l)) {
        out.push_str(&format!(
            "the guest kernel reported trouble first here: {first}\n"
        ));
    }
    out.push_str(&format!(
        "----- Plinth lines before the tail ({}) -----\n",
        plinth.len()
    ));
    for line in plinth {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&format!(
        "----- last {} console lines -----\n",
        lines.len() - tail_from
    ));
    for line in &lines[tail_from..] {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("----- end of console log -----");
    out
}

/// Runs `fsck.vfat -n` over the ESP of the raw disk image `disk` (its place read from the GPT
/// through `os_config::gpt`, copied to a temporary file): an error with fsck's output unless the
/// FAT is clean. Call it only while the guest is powered off.
pub fn fsck_esp(disk: &Path) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut file =
        std::fs::File::open(disk).with_context(|| format!("opening {}", disk.display()))?;
    let table = os_config::gpt::read(&mut file)
        .with_context(|| format!("reading the GPT of {}", disk.display()))?;
    let esp = table
        .by_label(os_config::layout::ESP)
        .with_context(|| format!("{} has no partition `esp`", disk.display()))?;
    let mut copy = tempfile::NamedTempFile::new().context("creating a temporary ESP copy")?;
    file.seek(SeekFrom::Start(esp.start))?;
    let copied = std::io::copy(&mut (&mut file).take(esp.size), copy.as_file_mut())
        .with_context(|| format!("copying the ESP of {}", disk.display()))?;
    if copied != esp.size {
        bail!(
            "the ESP of {} is {} bytes but only {copied} could be read",
            disk.display(),
            esp.size
        );
    }
    let out = Command::new("fsck.vfat")
        .arg("-n")
        .arg(copy.path())
        .output()
        .context("running fsck.vfat (install dosfstools)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A clean volume gives the version line and the summary line, nothing else.
    if !out.status.success() || text.lines().count() != 2 {
        bail!(
            "fsck.vfat -n finds the ESP of {} unclean ({}):\n{text}",
            disk.display(),
            out.status
        );
    }
    Ok(())
}

/// Reads `... PLINTH-STATUS event k=v k2=v2` with os-config's parser (the one the guest's
/// formatter is tested against) into its fields, plus `event`; empty when the line has none.
pub fn parse_status(line: &str) -> BTreeMap<String, String> {
    let Some(status) = os_config::status::parse(line) else {
        return BTreeMap::new();
    };
    let mut fields: BTreeMap<String, String> = status.fields.into_iter().collect();
    fields.insert("event".to_owned(), status.event);
    fields
}

/// A free TCP port on 127.0.0.1 for a forward.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A static file server on 127.0.0.1 for `root` (`builder::serve`'s), for QEMU's `guestfwd`,
/// which carries every guest connection over one host connection: each is answered until the host
/// side sees its end. Returns the port.
pub fn serve_folder(root: &Path) -> Result<u16> {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).context("binding the file server")?;
    let port = listener.local_addr()?.port();
    let root = root.to_path_buf();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let root = root.clone();
            std::thread::spawn(move || -> Result<()> {
                let mut writer = stream.try_clone()?;
                let mut reader = BufReader::new(stream);
                // One guest connection after another, on the same stream.
                while !reader.fill_buf()?.is_empty() {
                    builder::serve::serve_connection(&root, &mut reader, &mut writer)?;
                }
                Ok(())
            });
        }
    });
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        let f =
            parse_status("[  3.1] plinth-init: PLINTH-STATUS container-running name=web id=abc");
        assert_eq!(f["event"], "container-running");
        assert_eq!(f["name"], "web");
        assert_eq!(f["id"], "abc");
        assert!(parse_status("no status here").is_empty());
        let quoted = parse_status(
            "PLINTH-STATUS boot-state slot=b state=\"trying 2/3\" reason=\"a \\\"b\\\" c\" v=1",
        );
        assert_eq!(quoted["state"], "trying 2/3");
        assert_eq!(quoted["reason"], "a \"b\" c");
        assert_eq!(quoted["v"], "1");
        assert_eq!(quoted["slot"], "b");
        let formatted = os_config::status::format(
            "update-refused",
            &[("version", "4"), ("reason", "bad \"sig\"\nsecond line")],
        );
        let refused = parse_status(&format!("[ 9.9] {formatted}\r"));
        assert_eq!(refused["reason"], "bad \"sig\"\nsecond line");
        assert_eq!(refused["version"], "4");
    }

    #[test]
    fn reset_is_pressed_once_for_a_silent_reboot_only() {
        let hung = "[ 54.68] reboot: Restarting system\r\n[ 54.69] reboot: machine restart\r\n";
        let long = RESET_SILENCE + Duration::from_secs(1);
        assert!(needs_reset(hung, long, None));
        assert!(!needs_reset(hung, long, Some(hung.len())), "once per hang");
        assert!(
            !needs_reset(hung, Duration::from_secs(5), None),
            "not before the silence"
        );
        let booting = format!("{hung}BdsDxe: loading Boot0001\r\n");
        assert!(!needs_reset(&booting, long, None), "the firmware came back");
        assert!(!needs_reset("plinth-init: waiting\n", long, None));
    }

    #[test]
    fn failure_reports_keep_plinth_lines_and_the_tail() {
        let mut text = String::from("[    0.0] Command line: plinth.slot=a\r\n");
        for i in 0..200 {
            text.push_str(&format!("[ {i}.0] kernel noise {i}\n"));
            if i == 50 {
                text.push_str("[ 50.5] plinth-init: PLINTH-STATUS root-mounted slot=a\n");
            }
        }
        let report = console_report(&text, Some(Path::new("/tmp/x.log")));
        assert!(report.starts_with("whole console log: /tmp/x.log\n"));
        assert!(report.contains("Command line: plinth.slot=a\n"), "{report}");
        assert!(report.contains("PLINTH-STATUS root-mounted slot=a"));
        assert!(!report.contains("kernel noise 139\n"), "{report}");
        assert!(report.contains("kernel noise 140\n"));
        assert!(report.contains("kernel noise 199\n"));
        assert!(!report.contains('\r'));
        assert!(!report.contains("trouble"), "{report}");
    }

    #[test]
    fn guests_on_taps_get_macs_of_their_own() {
        assert_ne!(tap_mac("tap11"), tap_mac("tap12"));
        assert_eq!(tap_mac("tap11"), tap_mac("tap11"));
        assert!(tap_mac("tap0").starts_with("52:54:00:"));
        assert_eq!(tap_mac("tap0").len(), 17);
    }

    #[test]
    fn failure_reports_name_the_first_kernel_fault() {
        let mut text = String::new();
        for i in 0..100 {
            text.push_str(&format!("[ {i}.0] kernel noise {i}\n"));
            if i == 10 {
                text.push_str(
                    "[ 10.5] watchdog: BUG: soft lockup - CPU#0 stuck for 23s! [dockerd:301]\n",
                );
            }
        }
        let report = console_report(&text, None);
        assert!(
            report.contains(
                "the guest kernel reported trouble first here: [ 10.5] watchdog: BUG: soft lockup"
            ),
            "{report}"
        );
        assert_eq!(report.matches("CPU#0 stuck").count(), 2, "{report}");
    }
}
