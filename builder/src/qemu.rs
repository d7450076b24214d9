//! `plinth run`: boots a disk image under QEMU with OVMF (UEFI), its serial console on this
//! terminal. [`qemu_command`] builds the command line as a pure function so the QEMU test harness
//! boots images exactly as users do.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{serve, tools};

/// OVMF firmware code (read-only flash), from Debian's `ovmf`.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// Template of the UEFI variable store; every disk gets its own copy.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// How long `--accel auto` waits for the first byte from a KVM guest before retrying with TCG.
const KVM_SILENCE: Duration = Duration::from_secs(10);

/// CPU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation: slow, works everywhere.
    Tcg,
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// This terminal, with the QEMU monitor multiplexed (Ctrl-A C; Ctrl-A X quits).
    Terminal,
    /// QEMU's standard output only, no monitor (for programs reading the console).
    Stdio,
    /// A file on the host.
    File(PathBuf),
}

/// A forwarded port: host side on 127.0.0.1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub host: u16,
    pub guest: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

/// Everything that determines a QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuOptions {
    pub disk: PathBuf,
    /// `raw` or `qcow2`.
    pub disk_format: String,
    pub ovmf_code: PathBuf,
    /// This machine's own, writable copy of the UEFI variables.
    pub ovmf_vars: PathBuf,
    pub accel: Accel,
    pub mem_mib: u32,
    pub cpus: u32,
    pub forwards: Vec<Forward>,
    /// Extra `guestfwd=` rules of the user network (`tcp:10.0.2.100:80-tcp:127.0.0.1:8000`, or
    /// `tcp:10.0.2.100:8000-cmd:COMMAND`); commas in them are doubled on the command line.
    pub guest_forwards: Vec<String>,
    /// Writes go to a throw-away overlay.
    pub snapshot: bool,
    pub console: Console,
    /// Arguments appended as they are.
    pub extra: Vec<String>,
}

impl QemuOptions {
    /// Defaults for booting `disk`: raw, TCG, 2 GiB, 2 CPUs, console on the terminal.
    pub fn new(disk: &Path, ovmf_vars: &Path) -> QemuOptions {
        QemuOptions {
            disk: disk.to_path_buf(),
            disk_format: "raw".to_owned(),
            ovmf_code: PathBuf::from(OVMF_CODE),
            ovmf_vars: ovmf_vars.to_path_buf(),
            accel: Accel::Tcg,
            mem_mib: 2048,
            cpus: 2,
            forwards: Vec::new(),
            guest_forwards: Vec::new(),
            snapshot: false,
            console: Console::Terminal,
            extra: Vec::new(),
        }
    }
}

/// The `qemu-system-x86_64` arguments (without the program) for `opts`. The guest network is
/// QEMU's user network with `restrict=on`: the guest reaches nothing but the forwards given.
pub fn qemu_command(opts: &QemuOptions) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    let (accel, cpu) = match opts.accel {
        Accel::Tcg => ("tcg", "max"),
        Accel::Kvm => ("kvm", "host"),
    };
    push(&["-machine", "q35", "-accel", accel, "-cpu", cpu]);
    push(&[
        "-m",
        &opts.mem_mib.to_string(),
        "-smp",
        &opts.cpus.to_string(),
    ]);
    push(&[
        "-drive",
        &format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            opts.ovmf_code.display()
        ),
        "-drive",
        &format!(
            "if=pflash,format=raw,unit=1,file={}",
            opts.ovmf_vars.display()
        ),
    ]);
    let snapshot = if opts.snapshot { ",snapshot=on" } else { "" };
    push(&[
        "-drive",
        &format!(
            "if=none,id=disk0,format={},file={}{snapshot}",
            opts.disk_format,
            opts.disk.display()
        ),
        "-device",
        "virtio-blk-pci,drive=disk0,bootindex=1",
    ]);
    let mut netdev = "user,id=n0,restrict=on".to_owned();
    for f in &opts.forwards {
        netdev.push_str(&format!(
            ",hostfwd={}:127.0.0.1:{}-:{}",
            f.protocol, f.host, f.guest
        ));
    }
    for g in &opts.guest_forwards {
        // QEMU's option parser reads a doubled comma as one comma inside a value.
        netdev.push_str(&format!(",guestfwd={}", g.replace(',', ",,")));
    }
    push(&["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0"]);
    push(&["-device", "virtio-rng-pci"]);
    match &opts.console {
        Console::Terminal => push(&["-nographic", "-serial", "mon:stdio"]),
        Console::Stdio => push(&["-display", "none", "-monitor", "none", "-serial", "stdio"]),
        Console::File(path) => push(&[
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            &format!("file:{}", path.display()),
        ]),
    }
    args.extend(opts.extra.iter().cloned());
    args
}

/// Parses `HOST:GUEST[/tcp|/udp]`.
pub fn parse_forward(text: &str) -> Result<Forward> {
    match os_config::definition::parse_port(text) {
        Some((host, guest, protocol)) => Ok(Forward {
            host,
            guest,
            protocol: protocol.to_owned(),
        }),
        None => {
            bail!("port forward `{text}`: expected HOST:GUEST or HOST:GUEST/udp with ports 1-65535")
        }
    }
}

/// `qcow2` if the file starts with the qcow2 magic, else `raw`.
pub fn detect_format(disk: &Path) -> Result<&'static str> {
    let mut magic = [0u8; 4];
    let mut file =
        std::fs::File::open(disk).with_context(|| format!("opening {}", disk.display()))?;
    let n = file
        .read(&mut magic)
        .with_context(|| format!("reading {}", disk.display()))?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

/// The disk's own UEFI variable store, `<disk>.vars.fd` next to it (created from the OVMF
/// template on first use), so boot entries and firmware settings persist like a real machine's.
pub fn vars_for(disk: &Path) -> Result<PathBuf> {
    let mut name = disk.as_os_str().to_owned();
    name.push(".vars.fd");
    let vars = PathBuf::from(name);
    if !vars.exists() {
        std::fs::copy(OVMF_VARS, &vars).with_context(|| {
            format!(
                "copying the UEFI variable template {OVMF_VARS} to {} (install `ovmf`)",
                vars.display()
            )
        })?;
    }
    Ok(vars)
}

/// What `plinth run` is asked to boot, as the user wrote it (checked by [`run`]).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The disk image to boot (raw or qcow2).
    pub disk: PathBuf,
    /// Accelerator: `tcg`, `kvm`, or `auto` (kvm, falling back to tcg when the guest stays silent).
    pub accel: String,
    /// Guest memory, in MiB.
    pub mem: u32,
    /// Forwarded ports, each `HOST:GUEST` (see [`parse_forward`]).
    pub forwards: Vec<String>,
    /// Boot a throw-away copy-on-write overlay instead of the disk itself.
    pub snapshot: bool,
    /// Release folder served to the guest at [`serve::GUEST_URL`].
    pub serve: Option<PathBuf>,
    /// Instance user data, passed through QEMU's fw_cfg.
    pub user_data: Option<PathBuf>,
}

/// Checks `--user-data FILE` (Plinth user data must parse; other kinds are passed on as they
/// are) and returns QEMU's arguments that carry it.
pub fn user_data_args(file: &Path) -> Result<Vec<String>> {
    let bytes =
        std::fs::read(file).with_context(|| format!("reading the user data {}", file.display()))?;
    match os_config::userdata::classify(&file.display().to_string(), &bytes)? {
        os_config::userdata::UserDataKind::Foreign(kind) => eprintln!(
            "plinth: {} is {kind} user data, not Plinth's: the guest will ignore it",
            file.display()
        ),
        os_config::userdata::UserDataKind::Empty => {
            eprintln!("plinth: {} is empty", file.display())
        }
        os_config::userdata::UserDataKind::Plinth(_) => {}
    }
    let path = std::path::absolute(file)
        .with_context(|| format!("finding {}", file.display()))?
        .display()
        .to_string();
    Ok(vec![
        "-fw_cfg".to_owned(),
        format!(
            "name={},file={}",
            os_config::userdata::FW_CFG_USER_DATA,
            path.replace(',', ",,")
        ),
    ])
}

/// Runs `plinth run`.
pub fn run(args: &RunOptions) -> Result<()> {
    if !["tcg", "kvm", "auto"].contains(&args.accel.as_str()) {
        bail!("--accel `{}`: use tcg, kvm or auto", args.accel);
    }
    let forwards = args
        .forwards
        .iter()
        .map(|f| parse_forward(f))
        .collect::<Result<Vec<_>>>()?;
    let served = args
        .serve
        .as_deref()
        .map(serve::release_folder)
        .transpose()?;
    let user_data = args.user_data.as_deref().map(user_data_args).transpose()?;
    tools::require(&[tools::QEMU_SYSTEM])?;
    for firmware in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(firmware).is_file() {
            bail!("UEFI firmware {firmware} is missing: install it with `apt-get install ovmf`");
        }
    }
    if !args.disk.is_file() {
        bail!("disk image {} does not exist", args.disk.display());
    }
    let mut opts = QemuOptions::new(&args.disk, &vars_for(&args.disk)?);
    opts.disk_format = detect_format(&args.disk)?.to_owned();
    opts.mem_mib = args.mem;
    opts.snapshot = args.snapshot;
    opts.forwards = forwards;
    opts.extra.extend(user_data.into_iter().flatten());
    if let Some(dir) = served {
        let plinth = std::env::current_exe().context("finding the plinth program")?;
        opts.guest_forwards
            .push(serve::guest_forward(&plinth, &dir)?);
        eprintln!(
            "plinth: serving {} to the guest at {}",
            dir.display(),
            serve::GUEST_URL
        );
    }
    let qemu = tools::QEMU_SYSTEM.find()?;
    match args.accel.as_str() {
        "tcg" => exec(&qemu, &opts),
        "kvm" => {
            opts.accel = Accel::Kvm;
            exec(&qemu, &opts)
        }
        "auto" => {
            if std::fs::File::open("/dev/kvm").is_ok() {
                opts.accel = Accel::Kvm;
                if try_kvm(&qemu, &opts)? {
                    return Ok(());
                }
                eprintln!(
                    "plinth: the KVM guest printed nothing in {}s; booting again with TCG",
                    KVM_SILENCE.as_secs()
                );
            }
            opts.accel = Accel::Tcg;
            exec(&qemu, &opts)
        }
        other => bail!("--accel `{other}`: use tcg, kvm or auto"),
    }
}

fn exec(qemu: &Path, opts: &QemuOptions) -> Result<()> {
    let status = Command::new(qemu)
        .args(qemu_command(opts))
        .status()
        .with_context(|| format!("starting {}", qemu.display()))?;
    if !status.success() {
        bail!("qemu exited with {status}");
    }
    Ok(())
}

/// Boots with KVM, passing the console through; returns false (after stopping QEMU) if the guest
/// stays silent for [`KVM_SILENCE`].
fn try_kvm(qemu: &Path, opts: &QemuOptions) -> Result<bool> {
    let mut child = Command::new(qemu)
        .args(qemu_command(opts))
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", qemu.display()))?;
    let mut stdout = child.stdout.take().context("taking qemu's output")?;
    let (tx, rx) = mpsc::channel();
    let pump = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        let mut first = true;
        loop {
            let n = stdout.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            if first {
                first = false;
                let _ = tx.send(());
            }
            out.write_all(&buf[..n])?;
            out.flush()?;
        }
    });
    if rx.recv_timeout(KVM_SILENCE).is_err() {
        child.kill().context("stopping the silent KVM guest")?;
        child.wait().context("waiting for qemu")?;
        let _ = pump.join();
        return Ok(false);
    }
    let status = child.wait().context("waiting for qemu")?;
    let _ = pump.join();
    if !status.success() {
        bail!("qemu exited with {status}");
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_boots_the_disk_with_ovmf_and_a_restricted_network() {
        let mut opts = QemuOptions::new(Path::new("/img/d.raw"), Path::new("/img/d.raw.vars.fd"));
        opts.forwards = vec![parse_forward("8080:80").expect("valid")];
        opts.guest_forwards = vec!["tcp:10.0.2.100:80-tcp:127.0.0.1:8000".to_owned()];
        opts.snapshot = true;
        let args = qemu_command(&opts);
        let line = args.join(" ");
        let has = |pair: &[&str]| args.windows(pair.len()).any(|w| w == pair);
        assert!(has(&["-accel", "tcg"]), "{line}");
        assert!(has(&["-m", "2048"]), "{line}");
        assert!(has(&[
            "-drive",
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
        ]));
        assert!(has(&[
            "-drive",
            "if=pflash,format=raw,unit=1,file=/img/d.raw.vars.fd"
        ]));
        assert!(has(&[
            "-drive",
            "if=none,id=disk0,format=raw,file=/img/d.raw,snapshot=on"
        ]));
        assert!(has(&["-device", "virtio-blk-pci,drive=disk0,bootindex=1"]));
        assert!(has(&[
            "-netdev",
            "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:8080-:80,guestfwd=tcp:10.0.2.100:80-tcp:127.0.0.1:8000"
        ]), "{line}");
        assert!(has(&["-device", "virtio-net-pci,netdev=n0"]));
        assert!(has(&["-nographic", "-serial", "mon:stdio"]));

        opts.accel = Accel::Kvm;
        opts.console = Console::File(PathBuf::from("/tmp/console.log"));
        opts.snapshot = false;
        let args = qemu_command(&opts);
        let has = |pair: &[&str]| args.windows(pair.len()).any(|w| w == pair);
        assert!(has(&["-accel", "kvm", "-cpu", "host"]));
        assert!(has(&["-serial", "file:/tmp/console.log"]));
        assert!(!args.iter().any(|a| a.contains("snapshot")));
    }

    #[test]
    fn a_served_folder_is_a_command_rule_with_its_commas_doubled() {
        let mut opts = QemuOptions::new(Path::new("/img/d.raw"), Path::new("/img/d.raw.vars.fd"));
        let rule = serve::guest_forward(Path::new("/opt/a,b/plinth"), Path::new("/srv/releases"))
            .expect("rule");
        opts.guest_forwards = vec![rule];
        let args = qemu_command(&opts);
        let netdev = args
            .windows(2)
            .find(|w| w[0] == "-netdev")
            .map(|w| w[1].clone())
            .expect("-netdev");
        assert_eq!(
            netdev,
            "user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:8000-cmd:'/opt/a,,b/plinth' serve-connection '/srv/releases'"
        );
    }

    #[test]
    fn forwards_parse_or_say_what_is_expected() {
        assert_eq!(
            parse_forward("2222:22/udp").expect("valid"),
            Forward {
                host: 2222,
                guest: 22,
                protocol: "udp".to_owned()
            }
        );
        let err = parse_forward("80").expect_err("no guest port");
        assert!(err.to_string().contains("HOST:GUEST"), "{err}");
    }

    #[test]
    fn bad_run_arguments_are_named_before_anything_starts() {
        let args = |disk: &str, accel: &str, forward: &str| RunOptions {
            disk: PathBuf::from(disk),
            accel: accel.to_owned(),
            mem: 512,
            forwards: vec![forward.to_owned()],
            snapshot: true,
            serve: None,
            user_data: None,
        };
        let mut serving = args("/nonexistent/d.raw", "tcg", "1:2");
        serving.serve = Some(PathBuf::from("/nonexistent/releases"));
        let err = run(&serving).expect_err("no release folder");
        assert!(
            err.to_string()
                .contains("release folder /nonexistent/releases does not exist"),
            "{err}"
        );
        let err = run(&args("/nonexistent/d.raw", "tcg", "1:2")).expect_err("no disk");
        assert!(
            err.to_string()
                .contains("/nonexistent/d.raw does not exist"),
            "{err}"
        );
        let err = run(&args("/nonexistent/d.raw", "hvf", "1:2")).expect_err("bad accel");
        assert!(err.to_string().contains("use tcg, kvm or auto"), "{err}");
        let err = run(&args("/nonexistent/d.raw", "tcg", "x")).expect_err("bad forward");
        assert!(err.to_string().contains("HOST:GUEST"), "{err}");
    }

    #[test]
    fn user_data_is_checked_and_passed_through_fw_cfg() {
        let dir = tempfile::tempdir().expect("temp dir");
        let good = dir.path().join("a,b.toml");
        std::fs::write(&good, "#plinth\nhostname = \"vm-1\"\n").expect("write");
        let args = user_data_args(&good).expect("valid user data");
        assert_eq!(args[0], "-fw_cfg");
        assert_eq!(
            args[1],
            format!(
                "name=opt/plinth/user-data,file={}",
                good.display().to_string().replace(',', ",,")
            )
        );
        let foreign = dir.path().join("cloud.yaml");
        std::fs::write(&foreign, "#cloud-config\npackages: []\n").expect("write");
        assert!(
            user_data_args(&foreign).is_ok(),
            "passed on, ignored by the guest"
        );
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "hostname = \"vm-1\"\nhostnme = \"x\"\n").expect("write");
        let err = user_data_args(&bad).expect_err("misspelt key").to_string();
        assert!(err.contains("bad.toml:2:1"), "{err}");
        let mut missing = RunOptions {
            disk: PathBuf::from("/nonexistent/d.raw"),
            accel: "tcg".to_owned(),
            mem: 512,
            forwards: Vec::new(),
            snapshot: true,
            serve: None,
            user_data: Some(dir.path().join("absent.toml")),
        };
        let err = run(&missing).expect_err("no user data file").to_string();
        assert!(err.contains("absent.toml"), "{err}");
        missing.user_data = None;
        assert!(run(&missing).is_err());
    }

    #[test]
    fn formats_are_detected_by_magic() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (raw, qcow) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&raw, [0u8; 512]).expect("write");
        std::fs::write(&qcow, b"QFI\xfb\0\0\0\x03").expect("write");
        assert_eq!(detect_format(&raw).expect("raw"), "raw");
        assert_eq!(detect_format(&qcow).expect("qcow2"), "qcow2");
    }
}
