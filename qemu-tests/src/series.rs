//! The image series of the update tests (versions 1 to 4 of one definition, signed with one
//! test key), shared by the tests that boot them: the update tests and the PXE tests, which
//! install version 2 from the network and update it to version 3.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::image;

/// Where the guest finds the release server.
pub const GUEST_SERVER: &str = "10.0.2.100:8000";
/// The release signing key of the test series (test data only).
pub const TRUSTED_KEY: &str =
    "ed25519-secret:5e0535e4a41335869a3ac61d58c054fd1fb5dea855757edb9213939930e9dc92";
/// Pause of the agent after each durable stage in v1 (so the test can cut the power there).
pub const STAGE_DELAY_MS: u64 = 5000;
/// The kernel argument that sets it, honoured only by the `test-hooks` build of the agent.
pub const STAGE_DELAY_ARG: &str = "plinth.update-stage-delay-ms";

/// An image definition of the test series. The packages (and so the lock's roots) are those of
/// `e2e.toml`; versions differ in their version, their container and their bless times.
pub fn definition(version: &str, key: &str, healthy: bool, extra_cmdline: &str) -> String {
    let container = if healthy {
        "command = [\"/bin/busybox\", \"sh\", \"-c\", \"echo '<h1>Hello from Plinth</h1>' > /www/index.html; exec /bin/busybox httpd -f -p 80 -h /www\"]\nmounts = [\"/var/lib/web:/www\"]\nports = [\"8080:80\"]\nrestart = \"always\""
    } else {
        // A crash loop: the engine restarts it at once, so most looks see it running.
        "command = [\"/bin/busybox\", \"false\"]\nrestart = \"always\""
    };
    // Counted from the start of stage 2: the engine answers about 30 s later under TCG, and the
    // first reconciliation loads the image archive. Room for a busy machine (two guests and an
    // image build at once, where dockerd has been seen to give up on containerd after 95 s and
    // start again); v4 fails at its first restart, long before.
    let bless_timeout = "300s";
    format!(
        "[image]\nname = \"upd\"\nversion = \"{version}\"\n\n[debian]\nsuite = \"bookworm\"\n\n\
         [kernel]\ncmdline = [\"console=ttyS0\"{extra_cmdline}]\n\n\
         [engine]\nsettings = {{ hosts = [\"unix:///run/docker.sock\", \"tcp://0.0.0.0:2375\"] }}\ninsecure-tcp = true\n\n\
         [disk]\nroot = \"512MiB\"\nstate = \"1GiB\"\n\n\
         [update]\nurl = \"http://{GUEST_SERVER}\"\nkeys = [\"{key}\"]\nbless-after = \"5s\"\n\
         bless-timeout = \"{bless_timeout}\"\ninterval = \"10s\"\n\n\
         [[container]]\nname = \"web\"\nimage = \"plinth/busybox:1\"\n\
         build = {{ packages = [\"busybox-static\"] }}\n{container}\n"
    )
}

/// Builds one version of the series (with the shared lock); `qemu_tests::image` reuses an image
/// built earlier from the same inputs. A version that pauses its agent after each stage gets the
/// binaries built with init's `test-hooks` feature.
pub fn build(dir: &Path, stem: &str, text: &str) -> Result<PathBuf> {
    let (def, init) = prepare(dir, stem, text)?;
    image::build_with(&def, &image::workspace().join("images/qemu.lock"), &init)
}

/// [`build`] with the PXE folder too: returns the raw disk image and the folder.
pub fn build_pxe(dir: &Path, stem: &str, text: &str) -> Result<(PathBuf, PathBuf)> {
    let (def, init) = prepare(dir, stem, text)?;
    image::build_pxe(&def, &image::workspace().join("images/qemu.lock"), &init)
}

/// Writes the definition `stem.toml` into `dir`; returns it and the `plinth-init` to build with.
fn prepare(dir: &Path, stem: &str, text: &str) -> Result<(PathBuf, PathBuf)> {
    let init = if text.contains(STAGE_DELAY_ARG) {
        image::hooks_init_binary()?
    } else {
        image::init_binary()?
    };
    let def = dir.join(format!("{stem}.toml"));
    std::fs::write(&def, text).with_context(|| format!("writing {}", def.display()))?;
    Ok((def, init))
}

/// The definition of version `n` (1 to 4) of the update tests' image: v1 pauses its agent after
/// each update stage, so the power can be cut at a known point; v3 adds a `[[file]]` to v2; v4's
/// container crash-loops. The same text gives the same (cached) build in every test.
pub fn version_definition(n: u32, public: &str) -> String {
    let version = format!("{n}.0.0");
    match n {
        1 => definition(
            &version,
            public,
            true,
            &format!(", \"{STAGE_DELAY_ARG}={STAGE_DELAY_MS}\""),
        ),
        // v3 is v2 with one declared file more: the delta update of the rollback test.
        3 => format!(
            "{}\n[[file]]\npath = \"/etc/motd\"\ncontent = \"Plinth update test, release 3\"\n",
            definition(&version, public, true, "")
        ),
        4 => definition(&version, public, false, ""),
        _ => definition(&version, public, true, ""),
    }
}

/// The trusted release key, fixed test data, written where `plinth publish` reads it.
pub fn trusted_key(work: &Path) -> Result<(PathBuf, os_config::manifest::SecretKey)> {
    let key = work.join("release.key");
    std::fs::write(&key, format!("{TRUSTED_KEY}\n"))?;
    let secret = builder::publish::read_secret_key(&key)?;
    Ok((key, secret))
}

/// Builds version `n` (cached across tests and runs while its inputs are unchanged).
pub fn build_version(work: &Path, n: u32, public: &str) -> Result<(String, PathBuf)> {
    let started = Instant::now();
    let text = version_definition(n, public);
    let raw = build(work, &format!("update-v{n}"), &text)?;
    eprintln!(
        "built update-v{n} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok((text, raw))
}
