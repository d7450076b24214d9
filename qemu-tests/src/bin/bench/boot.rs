//! The boot part: ours and a busybox baseline booting the same disk under QEMU/TCG, run
//! alternately, with the guest's memory once the container runs.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use qemu_tests::engine::Engine;
use serde_json::json;

use crate::build::Built;
use crate::stats::{interleaved, load_now, Row, Side};
use crate::util::{part, partitions, run, say, sh};

/// Marker the baseline guest prints, like `PLINTH-STATUS` in ours.
pub const BASE_MARK: &str = "BENCH-BASELINE";

/// A guest under QEMU/OVMF/TCG whose console lines are kept with the host time they arrived.
pub struct Guest {
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
pub const BASE_INIT: &str = r#"#!/bin/busybox sh
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
/// `/etc/docker/daemon.json` (so listening on the socket and TCP 2375 like ours) and, as
/// plinth-init passes for a plain TCP listener the definition accepts, `--tls=false` (without
/// it dockerd sleeps 15 s at start to warn about plain TCP).
pub const BASE_STAGE2: &str = r#"B=/run/busybox
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
echo "BENCH-BASELINE dockerd-start"
dockerd --tls=false > /var/log/dockerd.log 2>&1 &
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
pub fn baseline_disk(dir: &Path, built: &Built) -> Result<PathBuf> {
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
pub fn find_busybox(tree: &Path) -> Result<PathBuf> {
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
pub fn load_image(engine: Engine, archive: &Path) -> Result<()> {
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
pub fn start_web(engine: Engine, archive: &Path) -> Result<()> {
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

/// Memory figures read in the guest by a helper container in the host PID namespace, in KiB:
/// `init` (VmRSS of PID 1), `update` (VmRSS of `plinth-update`), `used` (MemTotal −
/// MemAvailable), one `map <perms> <file>` entry per kind of PID 1's mappings with resident pages
/// (from `/proc/1/smaps`), and from those `init-exe` (the resident read-only pages of its
/// executable: code and constants, which the page cache holds and can drop) and `init-private`
/// (the rest: heap, stacks, data).
pub fn footprint(engine: Engine) -> Result<BTreeMap<String, f64>> {
    let script = "grep VmRSS /proc/1/status | sed 's/^/init /'; \
        /bin/busybox awk '/^[0-9a-f]+-[0-9a-f]+ /{m=$2\" \"($6==\"\"?\"[anon]\":$6)} /^Rss:/{if($2>0)r[m]+=$2} END{for(k in r)print \"map\",r[k],k}' /proc/1/smaps; \
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
    Ok(parse_footprint(&r.output))
}

/// The figures of [`footprint`] from its helper's output.
fn parse_footprint(output: &str) -> BTreeMap<String, f64> {
    let mut f = BTreeMap::new();
    for line in output.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| words.get(i).and_then(|w| w.parse::<f64>().ok());
        // The key, and which word holds its KiB.
        let (key, at) = match (words.first(), words.get(1)) {
            (Some(&"init"), Some(&"VmRSS:")) => ("init".to_owned(), 2),
            (Some(&"map"), _) => (format!("map {}", words[2..].join(" ")), 1),
            (Some(&"update"), _) => ("update".to_owned(), 2),
            (Some(&"MemTotal:"), _) => ("total".to_owned(), 1),
            (Some(&"MemAvailable:"), _) => ("avail".to_owned(), 1),
            _ => continue,
        };
        f.extend(num(at).map(|v| (key, v)));
    }
    if let (Some(t), Some(a)) = (f.get("total"), f.get("avail")) {
        let used = t - a;
        f.insert("used".to_owned(), used);
    }
    let (mut exe, mut private) = (0.0, 0.0);
    for (key, kib) in &f {
        let Some((perms, file)) = key.strip_prefix("map ").and_then(|m| m.split_once(' ')) else {
            continue;
        };
        if file.starts_with('/') && !perms.contains('w') {
            exe += kib;
        } else {
            private += kib;
        }
    }
    f.insert("init-exe".to_owned(), exe);
    f.insert("init-private".to_owned(), private);
    f
}

pub const BOOT_EVENTS: [&str; 6] = [
    "kernel start",
    "stage 1 start",
    "root mounted",
    "dockerd started",
    "engine ready",
    "first container running",
];

/// One boot of ours (`base` false) or of the baseline: seconds from QEMU start to each event,
/// and the footprint 10 s after the container runs.
pub fn boot_once(
    disk: &Path,
    base: bool,
    archive: &Path,
) -> Result<(Vec<f64>, BTreeMap<String, f64>)> {
    let port = qemu_tests::free_port()?;
    let mut g = Guest::boot(disk, &[(port, 2375)])?;
    let limit = Duration::from_secs(300);
    let mut t = vec![0.0; BOOT_EVENTS.len()];
    let (s1, root, dockerd, ready) = if base {
        (
            format!("{BASE_MARK} stage1-start"),
            format!("{BASE_MARK} root-mounted"),
            format!("{BASE_MARK} dockerd-start"),
            format!("{BASE_MARK} engine-ready"),
        )
    } else {
        (
            "PLINTH-STATUS stage1-start".to_owned(),
            "PLINTH-STATUS root-mounted".to_owned(),
            "PLINTH-STATUS service-started name=dockerd".to_owned(),
            "PLINTH-STATUS engine-ready".to_owned(),
        )
    };
    t[1] = g.wait(&s1, limit)?;
    t[2] = g.wait(&root, limit)?;
    t[3] = g.wait(&dockerd, limit)?;
    t[4] = g.wait(&ready, limit)?;
    let engine = Engine { port };
    if base {
        engine.wait_ready(Duration::from_secs(60))?;
        start_web(engine, archive)?;
        t[5] = g.elapsed();
    } else {
        // Started, as the baseline's figure is (`container-running` follows 10 s later, once
        // the container has stayed up).
        t[5] = g.wait("PLINTH-STATUS container-started", limit)?;
        engine.wait_ready(Duration::from_secs(60))?;
        // Stage 2's steps with their times: where the time up to dockerd goes.
        for line in g.console().lines() {
            if line.contains("stage2: ") && line.contains(" done in ") {
                eprintln!("     {line}");
            }
        }
    }
    t[0] = g.kernel_start()?;
    std::thread::sleep(Duration::from_secs(10));
    let f = footprint(engine)?;
    Ok((t, f))
}

pub fn bench_boot(dir: &Path, built: &Built, runs: usize, rows: &mut Vec<Row>) -> Result<()> {
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
        Row::new(
            "Guest: RSS of PID 1, its executable's code and constants (smaps)",
            "KiB",
            "busybox sh as PID 1",
        ),
        Row::new(
            "Guest: RSS of PID 1, the rest: heap, stacks, data (smaps)",
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
    for (i, side) in interleaved(runs) {
        let base = side == Side::Baseline;
        if !base && std::env::var_os("BENCH_BASELINE_ONLY").is_some() {
            continue;
        }
        say(&format!(
            "boot {} {}/{runs}",
            if base { "baseline" } else { "ours" },
            i + 1
        ));
        let load = load_now();
        let disk = if base { &base_disk } else { &built.disk };
        let (times, f) = boot_once(disk, base, &archive)?;
        eprintln!("     times {times:?}, footprint {f:?}, load before {load:.2}");
        for (row, t) in boot_rows.iter_mut().zip(times) {
            row.push(side, t, load);
        }
        for (row, key) in mem
            .iter_mut()
            .zip(["init", "init-exe", "init-private", "update", "used"])
        {
            if let Some(v) = f.get(key) {
                row.push(side, *v, load);
            }
        }
    }
    rows.extend(boot_rows);
    rows.extend(mem);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_footprint_splits_pid_1_into_its_executable_and_the_rest() {
        let output = "init VmRSS:\t    2360 kB
map 300 r--p /usr/bin/plinth-init
map 2000 r-xp /usr/bin/plinth-init
map 16 rw-p /usr/bin/plinth-init
map 168 rw-p [heap]
map 4 r-xp [vdso]
update VmRSS:\t    3028 kB
MemTotal:       2019652 kB
MemAvailable:   1768492 kB
";
        let f = parse_footprint(output);
        assert_eq!(f["init"], 2360.0);
        assert_eq!(f["update"], 3028.0);
        assert_eq!(f["used"], 2019652.0 - 1768492.0);
        assert_eq!(f["init-exe"], 2300.0, "r--p and r-xp of the file");
        assert_eq!(f["init-private"], 188.0, "its data, the heap and the vdso");
        assert_eq!(f["map r-xp /usr/bin/plinth-init"], 2000.0);
    }
}
