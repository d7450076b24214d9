//! `cargo run --release -p qemu-tests --bin bench`: measures build time, sizes, boot time, update
//! apply time and guest memory of the default image against baselines measured in the same run, prints one
//! table and writes the raw numbers to `target/bench/bench.json`.
//!
//! Environment: `BENCH_RUNS` (runs per figure, default 3), `BENCH_ONLY` (comma-separated subset
//! of `build,cold,size,boot,update`), `PLINTH_TEST_CONSOLE=1` to echo guest consoles,
//! `BENCH_TABLE=target/bench/bench.json` to print the table of an earlier run's numbers,
//! `BENCH_BASELINE_ONLY=1` to boot only the baseline (when debugging its scripts).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use qemu_tests::engine::Engine;
use serde_json::{json, Value};

/// Marker the baseline guest prints, like `PLINTH-STATUS` in ours.
const BASE_MARK: &str = "BENCH-BASELINE";

/// One figure: ours and the baseline, each a list of runs.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    unit: &'static str,
    ours: Vec<f64>,
    baseline_name: String,
    baseline: Vec<f64>,
}

impl Row {
    fn new(name: &str, unit: &'static str, baseline_name: &str) -> Row {
        Row {
            name: name.to_owned(),
            unit,
            ours: Vec::new(),
            baseline_name: baseline_name.to_owned(),
            baseline: Vec::new(),
        }
    }

    fn json(&self) -> Value {
        json!({
            "name": self.name,
            "unit": self.unit,
            "ours": { "runs": self.ours, "median": median(&self.ours), "min": min(&self.ours), "max": max(&self.ours) },
            "baseline_name": self.baseline_name,
            "baseline": { "runs": self.baseline, "median": median(&self.baseline), "min": min(&self.baseline), "max": max(&self.baseline) },
            "ratio": ratio(&self.ours, &self.baseline),
        })
    }
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn min(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::min)
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

fn ratio(ours: &[f64], base: &[f64]) -> Option<f64> {
    match (median(ours), median(base)) {
        (Some(o), Some(b)) if b != 0.0 => Some(o / b),
        _ => None,
    }
}

/// Formats a figure in its unit, short enough for the table.
fn show(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "-".to_owned(),
        Some(v) if unit == "bytes" => {
            if v >= 1024.0 * 1024.0 {
                format!("{:.1} MiB", v / 1048576.0)
            } else {
                format!("{:.0} KiB", v / 1024.0)
            }
        }
        Some(v) if unit == "s" => format!("{v:.1} s"),
        Some(v) if unit == "KiB" => format!("{:.1} MiB", v / 1024.0),
        Some(v) if unit == "MB/s" => format!("{v:.1} MB/s"),
        Some(v) => format!("{v:.1}"),
    }
}

fn cell(v: &[f64], unit: &str) -> String {
    if v.len() > 1 {
        format!(
            "{} [{}..{}]",
            show(median(v), unit),
            show(min(v), unit),
            show(max(v), unit)
        )
    } else {
        show(median(v), unit)
    }
}

/// Renders the rows as a Markdown table.
fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| Figure | Ours: median [min..max] | Baseline | Baseline: median [min..max] | Ours / baseline |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.name,
            cell(&r.ours, r.unit),
            r.baseline_name,
            cell(&r.baseline, r.unit),
            ratio(&r.ours, &r.baseline).map_or("-".to_owned(), |x| format!("{x:.2}"))
        ));
    }
    out
}

/// Runs a command to success; returns its stdout.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a shell pipeline to success.
fn sh(script: &str) -> Result<String> {
    run(Command::new("sh").args(["-c", script]))
}

/// Times a closure in seconds.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
    let start = Instant::now();
    let value = f()?;
    Ok((start.elapsed().as_secs_f64(), value))
}

/// A partition of a disk as `sfdisk --json` lists it, in bytes.
#[derive(Debug, Clone)]
struct Part {
    index: usize,
    name: String,
    start: u64,
    size: u64,
}

fn partitions(disk: &Path) -> Result<Vec<Part>> {
    let text = run(Command::new("sfdisk").arg("--json").arg(disk))?;
    let v: Value = serde_json::from_str(&text).context("parsing sfdisk --json")?;
    let sector = v["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    let list = v["partitiontable"]["partitions"]
        .as_array()
        .context("sfdisk --json lists no partitions")?;
    Ok(list
        .iter()
        .enumerate()
        .map(|(i, p)| Part {
            index: i + 1,
            name: p["name"].as_str().unwrap_or("").to_owned(),
            start: p["start"].as_u64().unwrap_or(0) * sector,
            size: p["size"].as_u64().unwrap_or(0) * sector,
        })
        .collect())
}

fn part<'a>(parts: &'a [Part], name: &str) -> Result<&'a Part> {
    parts
        .iter()
        .find(|p| p.name == name)
        .with_context(|| format!("the disk has no partition `{name}`"))
}

/// The default image definition with the engine also on TCP 2375 (for the guest measurements)
/// and the given `/etc/motd` text, next to a copy of its lock.
fn write_definition(dir: &Path, motd: &str) -> Result<PathBuf> {
    let ws = qemu_tests::image::workspace();
    let source = ws.join("images/qemu.toml");
    let text = std::fs::read_to_string(&source)
        .with_context(|| format!("reading {}", source.display()))?;
    let old = "content = \"Plinth: a minimal container OS.\\n\"";
    if !text.contains(old) {
        bail!(
            "{} no longer declares /etc/motd as `{old}`: update the benchmark",
            source.display()
        );
    }
    let text = text.replace(old, &format!("content = {motd:?}"));
    let key = dir.join("bench-key");
    if !key.with_extension("pub").is_file() {
        builder::publish::write_keypair(&key)?;
    }
    let public = std::fs::read_to_string(key.with_extension("pub"))
        .context("reading the benchmark's public key")?;
    // The engine also on TCP for the guest measurements, and an update source that never
    // answers, so the update agent runs (and can be measured) as on a real machine.
    let text = format!(
        "{text}\n[engine]\nsettings = {{ hosts = [\"unix:///run/docker.sock\", \"tcp://0.0.0.0:2375\"] }}\n\n[update]\nurl = \"http://10.0.2.2:9/releases\"\nkeys = [{:?}]\ninterval = \"1h\"\n",
        public.trim()
    );
    let def = dir.join("bench.toml");
    std::fs::write(&def, text).with_context(|| format!("writing {}", def.display()))?;
    builder::build::load_definition(&def)?;
    std::fs::copy(ws.join("images/qemu.lock"), dir.join("bench.lock"))
        .context("copying images/qemu.lock")?;
    Ok(def)
}

fn build_args(
    def: &Path,
    out: &Path,
    keep: Option<&Path>,
    cache: Option<&Path>,
) -> Result<builder::build::Options> {
    Ok(builder::build::Options {
        file: def.to_path_buf(),
        output: out.to_path_buf(),
        format: vec!["raw".to_owned()],
        init: Some(qemu_tests::image::init_binary()?),
        keep_tree: keep.map(Path::to_path_buf),
        cache: builder::cache::Options {
            dir: cache.map(Path::to_path_buf),
            offline: false,
        },
    })
}

/// Everything the later measurements need from the build.
struct Built {
    disk: PathBuf,
    tree: PathBuf,
    def: PathBuf,
}

fn say(text: &str) {
    eprintln!("\n#### bench: {text}");
}

fn bench_build(dir: &Path, runs: usize, cold: bool, rows: &mut Vec<Row>) -> Result<Built> {
    let out = dir.join("out");
    let tree = dir.join("tree");
    let def = write_definition(dir, "Plinth: a minimal container OS.\n")?;
    let mut warm = Row::new(
        "Build, warm cache (wall)",
        "s",
        "standard tools on the same tree: mksquashfs, veritysetup, cpio + zstd, mkfs.vfat + mcopy, mkfs.ext4, sfdisk + dd",
    );
    let mut disk = PathBuf::new();
    for i in 0..runs {
        say(&format!("warm build {}/{runs}", i + 1));
        let args = build_args(&def, &out, Some(&tree), None)?;
        let (secs, built) = timed(|| builder::build::build_image(&args))?;
        warm.ours.push(secs);
        disk = built.raw;
    }
    let espdir = dir.join("esp-files");
    let initrd_tree = dir.join("initrd-tree");
    extract_esp(&disk, &espdir, &initrd_tree)?;
    for i in 0..runs {
        say(&format!("standard tools build {}/{runs}", i + 1));
        let secs = standard_build(dir, &tree, &espdir, &initrd_tree, &disk)?;
        warm.baseline.push(secs);
    }
    rows.push(warm);

    let mut rebuild = Row::new(
        "Rebuild after changing one [[file]] (wall)",
        "s",
        "same standard tools steps",
    );
    let rebuild_runs = runs.min(2);
    for i in 0..rebuild_runs {
        say(&format!(
            "rebuild with a changed /etc/motd {}/{rebuild_runs}",
            i + 1
        ));
        let def = write_definition(dir, &format!("Plinth: changed {i}.\n"))?;
        let args = build_args(&def, &dir.join("out-rebuild"), None, None)?;
        let (secs, _) = timed(|| builder::build::build_image(&args))?;
        rebuild.ours.push(secs);
    }
    rebuild.baseline = rows[0].baseline.clone();
    rows.push(rebuild);

    let def = write_definition(dir, "Plinth: a minimal container OS.\n")?;
    if cold {
        say("cold build (empty package cache, downloads from the configured mirror)");
        let cache = tempfile::tempdir_in(dir).context("creating an empty cache folder")?;
        let args = build_args(&def, &dir.join("out-cold"), None, Some(cache.path()))?;
        let (secs, _) = timed(|| builder::build::build_image(&args))?;
        let mut row = Row::new(
            "Build, cold cache (wall, 1 run)",
            "s",
            "same standard tools steps (no download)",
        );
        row.ours.push(secs);
        row.baseline = rows[0].baseline.clone();
        rows.push(row);
    }
    Ok(Built { disk, tree, def })
}

/// Copies the ESP's files out of the built disk, and unpacks its initramfs.
fn extract_esp(disk: &Path, espdir: &Path, initrd_tree: &Path) -> Result<()> {
    let parts = partitions(disk)?;
    let esp = part(&parts, "esp")?;
    for d in [espdir, initrd_tree] {
        if d.exists() {
            std::fs::remove_dir_all(d)?;
        }
        std::fs::create_dir_all(d)?;
    }
    run(Command::new("mcopy")
        .args(["-s", "-n", "-i"])
        .arg(format!("{}@@{}", disk.display(), esp.start))
        .arg("::/*")
        .arg(espdir))?;
    let initrd = espdir.join(
        os_config::boot::Entry::initrd_path(os_config::layout::Slot::A).trim_start_matches('/'),
    );
    sh(&format!(
        "cd '{}' && zstd -dc '{}' | cpio -id --quiet",
        initrd_tree.display(),
        initrd.display()
    ))?;
    Ok(())
}

/// The build's image steps done by the standard tools alone on the kept tree; returns seconds.
fn standard_build(
    dir: &Path,
    tree: &Path,
    espdir: &Path,
    initrd_tree: &Path,
    ours: &Path,
) -> Result<f64> {
    let work = dir.join("standard");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let parts = partitions(ours)?;
    let layout = run(Command::new("sfdisk").arg("--dump").arg(ours))?;
    let layout: String = layout
        .lines()
        .filter(|l| !l.starts_with("device:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let total = std::fs::metadata(ours)?.len();
    let initrd_rel = os_config::boot::Entry::initrd_path(os_config::layout::Slot::A);
    let start = Instant::now();
    let w = work.display();
    run(Command::new("mksquashfs")
        .arg(tree)
        .arg(work.join("root.img"))
        .args(builder::disk::rootimage::SQUASHFS_OPTIONS))?;
    run(Command::new("veritysetup")
        .arg("format")
        .arg(work.join("root.img"))
        .arg(work.join("verity.img")))?;
    sh(&format!(
        "cd '{}' && find . | LC_ALL=C sort | cpio -o -H newc --quiet | zstd -19 -q -c > '{w}/initrd'",
        initrd_tree.display()
    ))?;
    let esp = part(&parts, "esp")?;
    run(Command::new("mkfs.vfat")
        .args(["-F", "32", "-n", "ESP", "-C"])
        .arg(work.join("esp.img"))
        .arg((esp.size / 1024).to_string()))?;
    // The ESP's files, with the initramfs just made.
    sh(&format!(
        "cp -r '{}' '{w}/esp' && cp '{w}/initrd' '{w}/esp{initrd_rel}' && mcopy -s -i '{w}/esp.img' '{w}/esp/'* ::/",
        espdir.display()
    ))?;
    let state = part(&parts, "state")?;
    sh(&format!(
        "truncate -s {} '{w}/state.img' && mkfs.ext4 -q -F -L state '{w}/state.img'",
        state.size
    ))?;
    sh(&format!("truncate -s {total} '{w}/disk.raw'"))?;
    let mut child = Command::new("sfdisk")
        .arg("--quiet")
        .arg(work.join("disk.raw"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("running sfdisk")?;
    child
        .stdin
        .take()
        .context("sfdisk stdin")?
        .write_all(layout.as_bytes())?;
    if !child.wait()?.success() {
        bail!("sfdisk could not write the partition table");
    }
    for (image, name) in [
        ("esp.img", "esp"),
        ("root.img", "root-a"),
        ("verity.img", "verity-a"),
        ("state.img", "state"),
    ] {
        let p = part(&parts, name)?;
        sh(&format!(
            "dd if='{w}/{image}' of='{w}/disk.raw' bs=1M oflag=seek_bytes seek={} conv=notrunc,sparse status=none",
            p.start
        ))?;
    }
    sh("sync")?;
    Ok(start.elapsed().as_secs_f64())
}

/// Sum of `size = N` over the lock's packages.
fn lock_bytes(lock: &Path) -> Result<u64> {
    let text =
        std::fs::read_to_string(lock).with_context(|| format!("reading {}", lock.display()))?;
    let mut total = 0;
    for line in text.lines() {
        if let Some(v) = line.trim().strip_prefix("size = ") {
            total += v
                .trim()
                .parse::<u64>()
                .with_context(|| format!("size `{v}` in {}", lock.display()))?;
        }
    }
    Ok(total)
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

fn bench_size(dir: &Path, built: &Built, rows: &mut Vec<Row>) -> Result<()> {
    let packages = lock_bytes(&dir.join("bench.lock"))? as f64;
    let base = "the .deb packages of the lock (sum of sizes)";
    let meta = std::fs::metadata(&built.disk)?;
    let mut row = |name: &str, value: f64| {
        let mut r = Row::new(name, "bytes", base);
        r.ours.push(value);
        r.baseline.push(packages);
        rows.push(r);
    };
    row(
        "Disk image, allocated (sparse)",
        (meta.blocks() * 512) as f64,
    );
    say("zstd -19 of the disk image");
    let mut child = Command::new("zstd")
        .args(["-19", "-T2", "-q", "-c"])
        .arg(&built.disk)
        .stdout(Stdio::piped())
        .spawn()
        .context("running zstd")?;
    let mut stdout = child.stdout.take().context("zstd stdout")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut compressed = 0u64;
    loop {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            break;
        }
        compressed += n as u64;
    }
    if !child.wait()?.success() {
        bail!("zstd failed on {}", built.disk.display());
    }
    row("Disk image, zstd -19", compressed as f64);
    let parts = partitions(&built.disk)?;
    let root = part(&parts, "root-a")?;
    let mut file = std::fs::File::open(&built.disk)?;
    let mut sb = [0u8; 48];
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(root.start))?;
    file.read_exact(&mut sb)?;
    if &sb[..4] != b"hsqs" {
        bail!(
            "root-a of {} does not hold a squashfs",
            built.disk.display()
        );
    }
    let mut used = [0u8; 8];
    used.copy_from_slice(&sb[40..48]);
    row("Root image (squashfs)", u64::from_le_bytes(used) as f64);
    let initrd = dir.join("esp-files").join(
        os_config::boot::Entry::initrd_path(os_config::layout::Slot::A).trim_start_matches('/'),
    );
    row("Initramfs", std::fs::metadata(&initrd)?.len() as f64);

    say("plinth publish");
    let release = dir.join("release");
    if release.exists() {
        std::fs::remove_dir_all(&release)?;
    }
    let key = dir.join("bench-key");
    builder::publish::publish(&builder::publish::Options {
        file: built.def.clone(),
        key: key.with_extension("key"),
        to: release.clone(),
        disk: Some(built.disk.clone()),
        rollout: None,
        expires: Default::default(),
    })?;
    row(
        "Update payload (plinth publish folder)",
        dir_bytes(&release)? as f64,
    );
    Ok(())
}

/// A guest under QEMU/OVMF/TCG whose console lines are kept with the host time they arrived.
struct Guest {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<(f64, String)>>>,
    started: Instant,
    _vars: tempfile::TempDir,
}

impl Guest {
    fn boot(disk: &Path, forwards: &[(u16, u16)]) -> Result<Guest> {
        qemu_tests::require_qemu()?;
        let vars = tempfile::tempdir()?;
        let vars_file = vars.path().join("vars.fd");
        std::fs::copy(qemu_tests::OVMF_VARS, &vars_file)?;
        let mut netdev = String::from("user,id=n0,restrict=on");
        for (h, g) in forwards {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{h}-:{g}"));
        }
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048",
            ])
            .args(["-nodefaults", "-display", "none", "-serial", "stdio"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                qemu_tests::OVMF_CODE
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars_file.display()
            ))
            .arg("-drive")
            .arg(format!(
                "if=virtio,format=raw,file={},snapshot=on",
                disk.display()
            ))
            .args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let started = Instant::now();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().context("qemu stdout")?;
        let sink = Arc::clone(&lines);
        let echo = std::env::var_os("PLINTH_TEST_CONSOLE").is_some();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = Vec::new();
            while let Ok(n) = reader.read_until(b'\n', &mut line) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                if echo {
                    eprintln!("{text}");
                }
                if let Ok(mut all) = sink.lock() {
                    all.push((started.elapsed().as_secs_f64(), text));
                }
                line.clear();
            }
        });
        Ok(Guest {
            child,
            lines,
            started,
            _vars: vars,
        })
    }

    /// Host seconds since start at which a line containing `needle` arrived.
    fn wait(&mut self, needle: &str, timeout: Duration) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(lines) = self.lines.lock() {
                if let Some((t, _)) = lines.iter().find(|(_, l)| l.contains(needle)) {
                    return Ok(*t);
                }
            }
            if Instant::now() > deadline || self.child.try_wait()?.is_some() {
                bail!(
                    "`{needle}` did not appear on the guest console\n----- console -----\n{}",
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn console(&self) -> String {
        self.lines
            .lock()
            .map(|l| {
                l.iter()
                    .map(|(t, s)| format!("[host {t:7.2}] {s}\n"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// When the kernel started, in host seconds: the smallest (arrival − printk time) over the
    /// kernel's timestamped lines, as early lines are printed late when the console registers.
    fn kernel_start(&self) -> Result<f64> {
        let lines = self
            .lines
            .lock()
            .map_err(|_| anyhow::anyhow!("console lock"))?;
        lines
            .iter()
            .filter_map(|(t, l)| {
                let rest = l.trim_start().strip_prefix('[')?;
                let (stamp, _) = rest.split_once(']')?;
                stamp.trim().parse::<f64>().ok().map(|k| t - k)
            })
            .reduce(f64::min)
            .context("no timestamped kernel line on the console")
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The baseline's initramfs `/init`: busybox mounts the API filesystems, loads the same modules
/// as ours in the same order, mounts the squashfs root read-only (no dm-verity) and switches to
/// it with the second script.
const BASE_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /bin /proc /sys /dev /run /newroot
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "BENCH-BASELINE stage1-start"
K=/lib/modules/$(uname -r)
while read m; do insmod "$K/$m" 2>/dev/null; done < /etc/plinth/initrd-modules
while [ ! -b /dev/vda2 ]; do sleep 0.05; done
mount -t squashfs -o ro /dev/vda2 /newroot
echo "BENCH-BASELINE root-mounted"
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mount -t ext4 /dev/vda6 /newroot/var
cp /bin/busybox /newroot/run/busybox
cp /stage2 /newroot/run/stage2
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /run/busybox sh /run/stage2
"#;

/// The baseline's second script, on the real root: writable places, the engine's modules, a
/// static network address (QEMU user networking's), then dockerd with the image's own
/// `/etc/docker/daemon.json` (so listening on the socket and TCP 2375 like ours).
const BASE_STAGE2: &str = r#"B=/run/busybox
$B mount -t tmpfs tmpfs /tmp
$B mount -t cgroup2 cgroup2 /sys/fs/cgroup
$B mkdir -p /dev/pts /dev/shm /run/etc
$B mount -t devpts devpts /dev/pts
$B mount -t tmpfs tmpfs /dev/shm
$B cp -a /etc/. /run/etc/
$B mount --bind /run/etc /etc
$B hostname demo
for m in overlay bridge br_netfilter veth nf_tables nft_compat nft_chain_nat nf_nat xt_MASQUERADE xt_nat xt_conntrack xt_addrtype xt_tcpudp virtio_net; do $B modprobe $m; done
$B ip link set lo up
$B ip link set eth0 up
$B ip addr add 10.0.2.15/24 dev eth0
$B ip route add default via 10.0.2.2
$B mkdir -p /var/lib/web /var/log
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
dockerd > /var/log/dockerd.log 2>&1 &
D=$!
until $B wget -q -O /dev/null http://127.0.0.1:2375/_ping 2>/dev/null; do
  if ! $B kill -0 $D 2>/dev/null; then echo "BENCH-BASELINE dockerd-exited"; $B cat /var/log/dockerd.log; $B poweroff -f; fi
  $B sleep 0.1
done
echo "BENCH-BASELINE engine-ready"
while true; do $B sleep 3600; done
"#;

/// Makes the baseline disk: the built disk with the initramfs on the ESP replaced by the
/// busybox one, so both boot through the same firmware, boot loader, kernel and command line.
fn baseline_disk(dir: &Path, built: &Built) -> Result<PathBuf> {
    let tree = dir.join("baseline-initrd");
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    run(Command::new("cp")
        .arg("-a")
        .arg(dir.join("initrd-tree"))
        .arg(&tree))?;
    std::fs::remove_file(tree.join("init"))?;
    std::fs::create_dir_all(tree.join("bin"))?;
    let busybox = find_busybox(&built.tree)?;
    std::fs::copy(&busybox, tree.join("bin/busybox"))?;
    for (name, text) in [("init", BASE_INIT), ("stage2", BASE_STAGE2)] {
        let path = tree.join(name);
        std::fs::write(&path, text)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::set_permissions(
        tree.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    let initrd = dir.join("baseline-initrd.zst");
    sh(&format!(
        "cd '{}' && find . | LC_ALL=C sort | cpio -o -H newc --quiet | zstd -19 -q -c > '{}'",
        tree.display(),
        initrd.display()
    ))?;
    let disk = dir.join("baseline.raw");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&built.disk)
        .arg(&disk))?;
    let parts = partitions(&disk)?;
    let esp = part(&parts, "esp")?;
    run(Command::new("mcopy")
        .args(["-o", "-i"])
        .arg(format!("{}@@{}", disk.display(), esp.start))
        .arg(&initrd)
        .arg(format!(
            "::{}",
            os_config::boot::Entry::initrd_path(os_config::layout::Slot::A)
        )))?;
    if part(&parts, "root-a")?.index != 2 || part(&parts, "state")?.index != 6 {
        bail!("the baseline script expects root-a on partition 2 and state on 6");
    }
    Ok(disk)
}

/// `bin/busybox` of the busybox-static package, taken from the container image in the tree.
fn find_busybox(tree: &Path) -> Result<PathBuf> {
    let out = tree.parent().unwrap_or(tree).join("busybox");
    if out.is_file() {
        return Ok(out);
    }
    let archive = tree.join(builder::build::image_archive_path("web"));
    let work = tempfile::tempdir()?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(work.path()))?;
    let layers = sh(&format!(
        "ls '{}'/*/layer.tar '{}'/blobs/sha256/* 2>/dev/null || true",
        work.path().display(),
        work.path().display()
    ))?;
    for layer in layers.lines() {
        let listing = run(Command::new("tar").arg("-tf").arg(layer)).unwrap_or_default();
        if let Some(name) = listing.lines().find(|l| {
            l.trim_start_matches("./") == "bin/busybox"
                || l.trim_start_matches("./") == "usr/bin/busybox"
        }) {
            run(Command::new("tar")
                .arg("-xf")
                .arg(layer)
                .arg("-C")
                .arg(work.path())
                .arg(name))?;
            std::fs::copy(work.path().join(name), &out)?;
            return Ok(out);
        }
    }
    bail!("no bin/busybox in {}", archive.display())
}

/// Loads a `docker save` archive into a guest's engine.
fn load_image(engine: Engine, archive: &Path) -> Result<()> {
    let tar = std::fs::read(archive).with_context(|| format!("reading {}", archive.display()))?;
    let mut stream = TcpStream::connect(("127.0.0.1", engine.port))?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let head = format!(
        "POST /v1.41/images/load?quiet=1 HTTP/1.0\r\nHost: engine\r\nContent-Type: application/x-tar\r\nContent-Length: {}\r\n\r\n",
        tar.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&tar)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    if !reply.starts_with("HTTP/1.0 200") && !reply.starts_with("HTTP/1.1 200") {
        bail!("loading the image: {}", reply.lines().next().unwrap_or(""));
    }
    Ok(())
}

/// Loads the container image into a baseline engine and starts the `web` container as ours
/// declares it, over the Engine API.
fn start_web(engine: Engine, archive: &Path) -> Result<()> {
    load_image(engine, archive)?;
    let web = qemu_tests::image::workspace().join("images/qemu.toml");
    let text = std::fs::read_to_string(&web)?;
    let def = os_config::Definition::parse(&web.display().to_string(), &text)
        .with_context(|| format!("parsing {}", web.display()))?;
    let c = def
        .containers
        .iter()
        .find(|c| c.name.as_str() == "web")
        .context("images/qemu.toml declares no `web` container")?;
    engine.call(
        "POST",
        "/containers/create?name=web",
        Some(&json!({
            "Image": c.image,
            "Cmd": c.command,
            "ExposedPorts": { "80/tcp": {} },
            "HostConfig": {
                "Binds": ["/var/lib/web:/www"],
                "PortBindings": { "80/tcp": [{ "HostPort": "8080" }] },
                "RestartPolicy": { "Name": "always" },
            },
        })),
    )?;
    engine.call("POST", "/containers/web/start", None)?;
    Ok(())
}

/// Memory figures read in the guest by a helper container in the host PID namespace: VmRSS
/// (KiB) of PID 1 and of `plinth-update`, and MemTotal − MemAvailable (KiB).
fn footprint(engine: Engine) -> Result<BTreeMap<String, f64>> {
    let script = "grep VmRSS /proc/1/status | sed 's/^/init /'; \
        for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = plinth-update ] && grep VmRSS $p/status | sed 's/^/update /'; done; \
        grep -E '^(MemTotal|MemAvailable):' /proc/meminfo";
    let r = engine.run(
        "plinth/busybox:1",
        &["/bin/busybox", "sh", "-c", script],
        true,
        &[],
    )?;
    if r.exit_code != 0 && !r.output.contains("MemTotal") {
        bail!("the footprint helper failed: {}", r.output);
    }
    let mut f = BTreeMap::new();
    for line in r.output.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| words.get(i).and_then(|w| w.parse::<f64>().ok());
        match words.first() {
            Some(&"init") => f.extend(num(2).map(|v| ("init".to_owned(), v))),
            Some(&"update") => f.extend(num(2).map(|v| ("update".to_owned(), v))),
            Some(&"MemTotal:") => f.extend(num(1).map(|v| ("total".to_owned(), v))),
            Some(&"MemAvailable:") => f.extend(num(1).map(|v| ("avail".to_owned(), v))),
            _ => {}
        }
    }
    if let (Some(t), Some(a)) = (f.get("total"), f.get("avail")) {
        let used = t - a;
        f.insert("used".to_owned(), used);
    }
    Ok(f)
}

const BOOT_EVENTS: [&str; 5] = [
    "kernel start",
    "stage 1 start",
    "root mounted",
    "engine ready",
    "first container running",
];

/// One boot of ours (`base` false) or of the baseline: seconds from QEMU start to each event,
/// and the footprint 10 s after the container runs.
fn boot_once(disk: &Path, base: bool, archive: &Path) -> Result<(Vec<f64>, BTreeMap<String, f64>)> {
    let port = qemu_tests::free_port()?;
    let mut g = Guest::boot(disk, &[(port, 2375)])?;
    let limit = Duration::from_secs(300);
    let mut t = vec![0.0; 5];
    let (s1, root, ready) = if base {
        (
            format!("{BASE_MARK} stage1-start"),
            format!("{BASE_MARK} root-mounted"),
            format!("{BASE_MARK} engine-ready"),
        )
    } else {
        (
            "PLINTH-STATUS stage1-start".to_owned(),
            "PLINTH-STATUS root-mounted".to_owned(),
            "PLINTH-STATUS engine-ready".to_owned(),
        )
    };
    t[1] = g.wait(&s1, limit)?;
    t[2] = g.wait(&root, limit)?;
    t[3] = g.wait(&ready, limit)?;
    let engine = Engine { port };
    if base {
        engine.wait_ready(Duration::from_secs(60))?;
        start_web(engine, archive)?;
        t[4] = g.elapsed();
    } else {
        // Started, as the baseline's figure is (`container-running` follows 10 s later, once
        // the container has stayed up).
        t[4] = g.wait("PLINTH-STATUS container-started", limit)?;
        engine.wait_ready(Duration::from_secs(60))?;
    }
    t[0] = g.kernel_start()?;
    std::thread::sleep(Duration::from_secs(10));
    let f = footprint(engine)?;
    Ok((t, f))
}

fn bench_boot(dir: &Path, built: &Built, runs: usize, rows: &mut Vec<Row>) -> Result<()> {
    let base_disk = baseline_disk(dir, built)?;
    let archive = built.tree.join(builder::build::image_archive_path("web"));
    let base_name = "same disk, kernel, firmware; busybox /init script starting dockerd";
    let mut boot_rows: Vec<Row> = BOOT_EVENTS
        .iter()
        .map(|e| Row::new(&format!("Boot (TCG): QEMU start to {e}"), "s", base_name))
        .collect();
    let mut mem = [
        Row::new(
            "Guest: RSS of PID 1 (plinth-init vs busybox sh)",
            "KiB",
            "busybox sh as PID 1",
        ),
        Row::new("Guest: RSS of plinth-update", "KiB", "(no update agent)"),
        Row::new(
            "Guest: used memory (MemTotal-MemAvailable) with the web container",
            "KiB",
            "busybox /init + dockerd + web container",
        ),
    ];
    for i in 0..runs {
        for base in [false, true] {
            if !base && std::env::var_os("BENCH_BASELINE_ONLY").is_some() {
                continue;
            }
            say(&format!(
                "boot {} {}/{runs}",
                if base { "baseline" } else { "ours" },
                i + 1
            ));
            let disk = if base { &base_disk } else { &built.disk };
            let (times, f) = boot_once(disk, base, &archive)?;
            for (row, t) in boot_rows.iter_mut().zip(times) {
                if base {
                    row.baseline.push(t);
                } else {
                    row.ours.push(t);
                }
            }
            eprintln!(
                "     times {times:?}, footprint {f:?}",
                times = boot_rows
                    .iter()
                    .map(|r| if base {
                        r.baseline.last().copied()
                    } else {
                        r.ours.last().copied()
                    })
                    .collect::<Vec<_>>()
            );
            for (row, key) in mem.iter_mut().zip(["init", "update", "used"]) {
                if let Some(v) = f.get(key) {
                    if base {
                        row.baseline.push(*v);
                    } else {
                        row.ours.push(*v);
                    }
                }
            }
        }
    }
    rows.extend(boot_rows);
    rows.extend(mem);
    Ok(())
}

/// The update part's definitions: the benchmark image as version `version`, staging updates
/// only (`strategy = "manual"`), so an apply can be timed without the reboot.
fn update_definition(dir: &Path, base: &Path, version: &str) -> Result<PathBuf> {
    let text =
        std::fs::read_to_string(base).with_context(|| format!("reading {}", base.display()))?;
    let old = "version = \"1.0.0\"";
    if !text.contains(old) || !text.trim_end().ends_with("interval = \"1h\"") {
        bail!(
            "{} no longer has `{old}` and a final [update] table: update the benchmark",
            base.display()
        );
    }
    let text = format!(
        "{}strategy = \"manual\"\n",
        text.replacen(old, &format!("version = \"{version}\""), 1)
    );
    let def = dir.join(format!("bench-update-{version}.toml"));
    std::fs::write(&def, text).with_context(|| format!("writing {}", def.display()))?;
    Ok(def)
}

/// A container image with the host's `zstd` (and the shared libraries it loads) and busybox from
/// the locked `busybox-static` package: the baseline's tools inside the guest.
fn tools_archive(dir: &Path, lock: &Path) -> Result<PathBuf> {
    let layer = dir.join("tools-layer");
    if layer.exists() {
        std::fs::remove_dir_all(&layer)?;
    }
    std::fs::create_dir_all(layer.join("usr/bin"))?;
    for top in ["bin", "lib", "lib64"] {
        std::os::unix::fs::symlink(format!("usr/{top}"), layer.join(top))?;
    }
    let zstd = sh("command -v zstd")?.trim().to_owned();
    let mut files = vec![PathBuf::from(&zstd)];
    for line in run(Command::new("ldd").arg(&zstd))?.lines() {
        // `libzstd.so.1 => /lib/x86_64-linux-gnu/libzstd.so.1 (0x…)` or `/lib64/ld-linux….so.2 (0x…)`
        let path = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        files.extend(path.map(PathBuf::from));
    }
    for file in &files {
        let real = std::fs::canonicalize(file)?;
        let rel = file.strip_prefix("/")?;
        let to = layer
            .join("usr")
            .join(rel.strip_prefix("usr").unwrap_or(rel));
        std::fs::create_dir_all(to.parent().context("library path")?)?;
        std::fs::copy(&real, &to).with_context(|| format!("copying {}", real.display()))?;
    }
    let text = std::fs::read_to_string(lock)?;
    let locked = builder::debian::lock::Lockfile::parse(&lock.display().to_string(), &text)?;
    let busybox = locked
        .packages
        .iter()
        .find(|p| p.name == "busybox-static")
        .context("the lock has no busybox-static")?;
    let cache = builder::cache::Cache::open(&builder::cache::Options {
        dir: None,
        offline: true,
    })?;
    let deb = cache
        .lookup(&busybox.sha256, Some(busybox.size))?
        .context("busybox-static is not in the package cache: run the build first")?;
    sh(&format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' ./bin/busybox",
        deb.display(),
        dir.display()
    ))?;
    std::fs::rename(dir.join("bin/busybox"), layer.join("usr/bin/busybox"))?;
    let archive = dir.join("tools.tar");
    builder::container_image::write_docker_archive(
        &layer,
        &builder::container_image::ImageConfig {
            reference: "bench/tools:1".to_owned(),
            cmd: vec!["/usr/bin/busybox".to_owned(), "sh".to_owned()],
            env: vec!["PATH=/usr/bin".to_owned()],
        },
        builder::build::DEFAULT_SOURCE_DATE_EPOCH,
        &archive,
    )?;
    Ok(archive)
}

/// Seconds a shell snippet takes in the guest, from `/proc/uptime` before and after, run in a
/// privileged tools container in the host's PID namespace; returns them with the output.
fn guest_timed(engine: Engine, script: &str) -> Result<(f64, String)> {
    let wrapped = format!(
        "read a _ < /proc/uptime; echo 3 > /proc/sys/vm/drop_caches; read s _ < /proc/uptime; \
         ( {script} ) 2>&1; rc=$?; read e _ < /proc/uptime; echo BENCH-TIME $s $e $rc $a"
    );
    let r = engine.run(
        "bench/tools:1",
        &["/usr/bin/busybox", "sh", "-c", &wrapped],
        true,
        &[],
    )?;
    let line = r
        .output
        .lines()
        .find(|l| l.starts_with("BENCH-TIME "))
        .with_context(|| format!("no timing from the guest:\n{}", r.output))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| words.get(i).and_then(|w| w.parse::<f64>().ok());
    let (Some(start), Some(end)) = (num(1), num(2)) else {
        bail!("bad timing line `{line}`");
    };
    if words.get(3) != Some(&"0") {
        bail!("the timed guest command failed:\n{}", r.output);
    }
    Ok((end - start, r.output))
}

/// Update: `plinth-update apply --from` a release disk (download, zstd, sha256, write, read back,
/// boot files), against `zstd -d | dd conv=fsync` of the same root and verity artifacts from the
/// same disk, in the same guest; page cache dropped before each.
fn bench_update(dir: &Path, built: &Built, runs: usize, rows: &mut Vec<Row>) -> Result<()> {
    let work = dir.join("update");
    std::fs::create_dir_all(&work)?;
    let lock = dir.join("bench.lock");
    let mut raws = Vec::new();
    for version in ["1.0.0", "1.0.1"] {
        say(&format!("update: building version {version}"));
        let def = update_definition(&work, &built.def, version)?;
        raws.push(qemu_tests::image::build(&def, &lock)?);
    }
    let release = work.join("release");
    if release.exists() {
        std::fs::remove_dir_all(&release)?;
    }
    builder::publish::publish(&builder::publish::Options {
        file: work.join("bench-update-1.0.1.toml"),
        key: dir.join("bench-key.key"),
        to: release.clone(),
        disk: Some(raws[1].clone()),
        rollout: None,
        expires: Default::default(),
    })?;
    let manifest_bytes = std::fs::read(
        release
            .join("stable")
            .join(os_config::manifest::MANIFEST_FILE),
    )?;
    let manifest = os_config::manifest::Manifest::parse(&manifest_bytes)?;
    let (root, verity) = (&manifest.artifacts.root, &manifest.artifacts.verity);
    let written = (root.uncompressed_size + verity.uncompressed_size) as f64;
    let media = work.join("media.img");
    let _ = std::fs::remove_file(&media);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&release)
        .arg(&media)
        .arg("512M"))?;
    let tools = tools_archive(&work, &lock)?;
    // No `|` in the name: it is a Markdown table cell.
    let baseline_name = "zstd -d into dd conv=fsync, root and verity artifacts";
    let mut wall = Row::new(
        "Update: apply from a local release disk, wall time",
        "s",
        baseline_name,
    );
    let mut rate = Row::new(
        "Update: apply throughput (uncompressed MB written per s)",
        "MB/s",
        baseline_name,
    );
    for i in 0..runs {
        say(&format!("update {}/{runs}", i + 1));
        let port = qemu_tests::free_port()?;
        let mut opts = qemu_tests::VmOptions::new(&raws[0]);
        opts.snapshot = true;
        opts.forwards = vec![(port, 2375)];
        opts.extra_disks = vec![media.clone()];
        let mut vm = qemu_tests::Vm::boot(&opts)?;
        vm.wait_for("PLINTH-STATUS container-running", Duration::from_secs(300))?;
        let engine = Engine { port };
        engine.wait_ready(Duration::from_secs(60))?;
        load_image(engine, &tools)?;
        // Slot B is partitions 4 (root) and 5 (verity) of the boot disk.
        let (base, _) = guest_timed(
            engine,
            &format!(
                "mkdir -p /m && mount -o ro /dev/vdb /m && \
                 zstd -q -d -c /m/{} | dd of=/dev/vda4 bs=1M conv=fsync 2>/dev/null && \
                 zstd -q -d -c /m/{} | dd of=/dev/vda5 bs=1M conv=fsync 2>/dev/null && umount /m",
                root.path, verity.path
            ),
        )?;
        let (ours, output) = guest_timed(
            engine,
            "nsenter -t 1 -m -- /usr/bin/plinth-update apply --from /dev/vdb",
        )?;
        if !output.contains("update-staged version=1.0.1") {
            bail!("the apply did not stage 1.0.1:\n{output}");
        }
        eprintln!("     apply {ours:.1} s, zstd | dd {base:.1} s");
        vm.kill();
        wall.ours.push(ours);
        wall.baseline.push(base);
        rate.ours.push(written / 1e6 / ours);
        rate.baseline.push(written / 1e6 / base);
    }
    rows.push(wall);
    rows.push(rate);
    Ok(())
}

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_owned()))
        .unwrap_or_default();
    let mem = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
        .unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "mem_total_kib": mem,
        "loadavg": read("/proc/loadavg").trim(),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
    })
}

/// Reads the rows back from a `bench.json`.
fn rows_from_json(path: &Path) -> Result<Vec<Row>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let runs = |x: &Value| -> Vec<f64> {
        x["runs"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let list = v["rows"].as_array().context("no `rows` in the report")?;
    Ok(list
        .iter()
        .map(|r| Row {
            name: r["name"].as_str().unwrap_or("").to_owned(),
            unit: match r["unit"].as_str() {
                Some("s") => "s",
                Some("bytes") => "bytes",
                Some("KiB") => "KiB",
                Some("MB/s") => "MB/s",
                _ => "",
            },
            ours: runs(&r["ours"]),
            baseline_name: r["baseline_name"].as_str().unwrap_or("").to_owned(),
            baseline: runs(&r["baseline"]),
        })
        .collect())
}

fn main() -> Result<()> {
    if let Some(path) = std::env::var_os("BENCH_TABLE") {
        // Prints the table of an earlier run's raw numbers.
        print!("{}", table(&rows_from_json(Path::new(&path))?));
        return Ok(());
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .map(|v| v.parse().context("BENCH_RUNS must be a number"))
        .transpose()?
        .unwrap_or(3)
        .max(1);
    let only =
        std::env::var("BENCH_ONLY").unwrap_or_else(|_| "build,cold,size,boot,update".to_owned());
    let want = |w: &str| only.split(',').any(|x| x.trim() == w);
    let dir = qemu_tests::image::workspace().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let before = machine();
    let mut rows = Vec::new();
    let built = if want("build") {
        bench_build(&dir, runs, want("cold"), &mut rows)?
    } else {
        // Reuse the previous run's build.
        let def = write_definition(&dir, "Plinth: a minimal container OS.\n")?;
        Built {
            disk: dir.join("out/qemu-1.0.0.raw"),
            tree: dir.join("tree"),
            def,
        }
    };
    // The size and boot parts measure the build's disk and tree; the update part builds its own.
    let measures_build = want("size") || want("boot");
    if measures_build && (!built.disk.is_file() || !built.tree.is_dir()) {
        bail!(
            "no build in {}: include `build` in BENCH_ONLY",
            dir.display()
        );
    }
    if measures_build && !dir.join("esp-files").is_dir() {
        extract_esp(
            &built.disk,
            &dir.join("esp-files"),
            &dir.join("initrd-tree"),
        )?;
    }
    let json_path = dir.join("bench.json");
    // Written after each part, so a long run leaves its figures so far.
    let save = |rows: &[Row]| -> Result<()> {
        let report = json!({
            "machine_before": before,
            "machine_after": machine(),
            "runs": runs,
            "total_seconds": started.elapsed().as_secs_f64(),
            "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        });
        std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
        std::fs::write(dir.join("bench.md"), table(rows))?;
        Ok(())
    };
    save(&rows)?;
    if want("size") {
        bench_size(&dir, &built, &mut rows)?;
        save(&rows)?;
    }
    if want("boot") {
        bench_boot(&dir, &built, runs, &mut rows)?;
        save(&rows)?;
    }
    if want("update") {
        bench_update(&dir, &built, runs, &mut rows)?;
        save(&rows)?;
    }
    println!("{}", table(&rows));
    println!(
        "runs per figure: {runs}; total {:.0} s; machine {}; raw numbers in {}",
        started.elapsed().as_secs_f64(),
        before,
        json_path.display()
    );
    Ok(())
}
