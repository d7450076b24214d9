//! Command-line interface of `plinth`: argument parsing and dispatch only.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

/// Build minimal, read-only, A/B-updatable container OS images from a TOML definition.
#[derive(Debug, Parser)]
#[command(name = "plinth", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate an image definition without touching the network.
    Check(CheckArgs),
    /// Resolve the Debian packages a definition names into FILE.lock.
    Lock(LockArgs),
    /// Build a bootable disk image from a definition and its lock.
    Build(BuildArgs),
    /// Boot a disk image under QEMU with OVMF, serial console on this terminal.
    Run(RunArgs),
    /// Show the partitions, slots and boot entries of a disk image.
    Inspect(InspectArgs),
    /// Check every slot's root against its dm-verity tree and the root hash in its boot entry.
    Verify(VerifyArgs),
    /// Write an ed25519 key pair for signing releases.
    Keygen(KeygenArgs),
    /// Write a signed release of a built image into a static folder.
    Publish(PublishArgs),
    /// Answer one guest connection on standard input and output with files of a release folder
    /// (started by QEMU for `plinth run --serve`).
    #[command(hide = true)]
    ServeConnection(ServeConnectionArgs),
}

/// Options shared by every command that reads packages.
#[derive(Debug, Args, Clone)]
pub struct CacheArgs {
    /// Folder of the content-addressed download cache [default: $XDG_CACHE_HOME/plinth].
    #[arg(long, env = "PLINTH_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Never touch the network; use only what the cache holds.
    #[arg(long)]
    pub offline: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The image definition to validate.
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct LockArgs {
    /// The image definition whose packages are resolved.
    pub file: PathBuf,
    /// Re-resolve every package to the newest version the mirror has, even if the lock still matches.
    #[arg(long)]
    pub update: bool,
    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The image definition to build.
    pub file: PathBuf,
    /// Folder the outputs are written to.
    #[arg(long, short, default_value = "out", value_name = "DIR")]
    pub output: PathBuf,
    /// Output formats, comma separated: raw, qcow2, vhd (fixed, whole MiB, for Azure), vmdk, gce
    /// (<name>-<version>.gce.tar.gz holding disk.raw, for Google Compute Engine), pxe (the
    /// network-boot folder <name>-<version>.pxe/); raw is always written.
    #[arg(long, value_delimiter = ',', default_value = "raw")]
    pub format: Vec<String>,
    /// Static plinth-init binary to put in the image [default: next to plinth, or target/x86_64-unknown-linux-gnu/release].
    #[arg(long, env = "PLINTH_INIT", value_name = "FILE")]
    pub init: Option<PathBuf>,
    /// Also keep the assembled root tree in this folder (for inspection).
    #[arg(long, value_name = "DIR")]
    pub keep_tree: Option<PathBuf>,
    /// zstd level of the squashfs root and the initramfs, 1-22 [default: 15 and 19]. Lower builds
    /// much faster and a little larger (level 3: the root 30 times faster, 12% larger); for
    /// development images, not for releases.
    #[arg(long, value_name = "LEVEL", value_parser = clap::value_parser!(u32).range(zstd_levels()))]
    pub zstd_level: Option<u32>,
    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The disk image to boot (raw or qcow2).
    pub disk: PathBuf,
    /// Accelerator: tcg, kvm, or auto (kvm, falling back to tcg when the guest stays silent).
    #[arg(long, default_value = "tcg")]
    pub accel: String,
    /// Guest memory, in MiB.
    #[arg(long, default_value_t = 2048)]
    pub mem: u32,
    /// Forward a host port to a guest port: HOST:GUEST (TCP, host side on 127.0.0.1).
    #[arg(long = "forward", short = 'p', value_name = "HOST:GUEST")]
    pub forwards: Vec<String>,
    /// Boot a throw-away copy-on-write overlay instead of the disk itself.
    #[arg(long)]
    pub snapshot: bool,
    /// Serve this release folder (as `plinth publish --to DIR` writes it) to the guest at
    /// http://10.0.2.100:8000, the `[update] url` to build the image with.
    #[arg(long, value_name = "DIR")]
    pub serve: Option<PathBuf>,
    /// Instance user data for the guest (QEMU fw_cfg `opt/plinth/user-data`): Plinth's TOML is
    /// checked before the boot; other formats are passed on (and ignored by the guest).
    #[arg(long, value_name = "FILE")]
    pub user_data: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The disk image to describe.
    pub disk: PathBuf,
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also check every slot's root against its dm-verity tree and root hash (offline, in Rust);
    /// exits with an error naming the first changed block if one does not match.
    #[arg(long)]
    pub verify: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The disk image to check (offline, in Rust); exits with an error naming the first changed
    /// block of any slot that does not match.
    pub disk: PathBuf,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Writes PREFIX.key (private, mode 0600) and PREFIX.pub.
    #[arg(long, value_name = "PREFIX")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The image definition whose built disk image is published.
    pub file: PathBuf,
    /// Private key written by `plinth keygen`.
    #[arg(long, value_name = "KEY")]
    pub key: PathBuf,
    /// Release folder (served as is by any static HTTP server).
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// The built disk image [default: out/<name>-<version>.raw].
    #[arg(long, value_name = "IMAGE")]
    pub disk: Option<PathBuf>,
    /// Staged rollout: spread machines over this window from now, such as "6h" or "48h".
    #[arg(long, value_name = "DURATION", value_parser = os_config::units::Duration::parse)]
    pub rollout: Option<os_config::units::Duration>,
    /// The manifest expires this long after publishing, such as "720h" (machines refuse it from
    /// then on; publish again to renew) [default: 720h, 30 days].
    #[arg(long, value_name = "DURATION", value_parser = os_config::units::Duration::parse, conflicts_with = "expires_at")]
    pub expires_in: Option<os_config::units::Duration>,
    /// The manifest expires at this UTC time, such as "2027-01-01T00:00:00Z" (the same manifest
    /// on every run, for reproducible releases).
    #[arg(long, value_name = "TIME", value_parser = os_config::manifest::parse_rfc3339)]
    pub expires_at: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ServeConnectionArgs {
    /// The release folder whose files are served.
    pub dir: PathBuf,
}

/// Runs the command the user asked for.
pub fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Check(args) => crate::build::check(&args.file),
        Command::Lock(args) => crate::debian::lock_command(&args.into()),
        Command::Build(args) => crate::build::build(&args.into()),
        Command::Run(args) => crate::qemu::run(&args.into()),
        Command::Inspect(args) => crate::inspect::inspect(
            &args.disk,
            crate::inspect::Options {
                json: args.json,
                verify: args.verify,
            },
        ),
        Command::Verify(args) => crate::inspect::verify(&args.disk),
        Command::Keygen(args) => crate::publish::keygen(&args.out),
        Command::Publish(args) => crate::publish::publish(&args.into()),
        Command::ServeConnection(args) => crate::serve::serve_stdio(&args.dir),
    }
}

impl From<CacheArgs> for crate::cache::Options {
    fn from(args: CacheArgs) -> Self {
        crate::cache::Options {
            dir: args.cache_dir,
            offline: args.offline,
        }
    }
}

impl From<LockArgs> for crate::debian::LockOptions {
    fn from(args: LockArgs) -> Self {
        crate::debian::LockOptions {
            file: args.file,
            update: args.update,
            cache: args.cache.into(),
        }
    }
}

impl From<BuildArgs> for crate::build::Options {
    fn from(args: BuildArgs) -> Self {
        crate::build::Options {
            file: args.file,
            output: args.output,
            format: args.format,
            init: args.init,
            keep_tree: args.keep_tree,
            cache: args.cache.into(),
            zstd_level: args.zstd_level,
        }
    }
}

impl From<RunArgs> for crate::qemu::RunOptions {
    fn from(args: RunArgs) -> Self {
        crate::qemu::RunOptions {
            disk: args.disk,
            accel: args.accel,
            mem: args.mem,
            forwards: args.forwards,
            snapshot: args.snapshot,
            serve: args.serve,
            user_data: args.user_data,
        }
    }
}

impl From<PublishArgs> for crate::publish::Options {
    fn from(args: PublishArgs) -> Self {
        crate::publish::Options {
            file: args.file,
            key: args.key,
            to: args.to,
            disk: args.disk,
            rollout: args.rollout,
            expires: match (args.expires_at, args.expires_in) {
                (Some(at), _) => crate::publish::Expiry::At(at),
                (None, Some(validity)) => crate::publish::Expiry::In(validity.0),
                (None, None) => crate::publish::Expiry::default(),
            },
        }
    }
}

/// The levels `--zstd-level` takes: those the root image writer accepts.
fn zstd_levels() -> std::ops::RangeInclusive<i64> {
    let levels = crate::disk::rootimage::ZSTD_LEVELS;
    i64::from(*levels.start())..=i64::from(*levels.end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_takes_a_disk() {
        let cli = Cli::try_parse_from(["plinth", "verify", "out/x.raw"]).expect("parses");
        assert!(
            matches!(cli.command, Command::Verify(ref a) if a.disk == std::path::Path::new("out/x.raw")),
            "{cli:?}"
        );
        assert!(Cli::try_parse_from(["plinth", "verify"]).is_err());
    }

    #[test]
    fn publish_expiry_flags_parse() {
        use crate::publish::{Expiry, Options};
        let options = |extra: &[&str]| -> Result<Options, clap::Error> {
            let base = ["plinth", "publish", "x.toml", "--key", "k", "--to", "r"];
            let cli = Cli::try_parse_from(base.iter().chain(extra))?;
            match cli.command {
                Command::Publish(args) => Ok(args.into()),
                other => panic!("not publish: {other:?}"),
            }
        };
        let expires = |extra: &[&str]| options(extra).expect("parses").expires;
        assert_eq!(expires(&[]), Expiry::default());
        assert_eq!(
            expires(&["--expires-in", "48h"]),
            Expiry::In(std::time::Duration::from_secs(48 * 3600))
        );
        assert_eq!(
            expires(&["--expires-at", "2020-01-01T00:00:00Z"]),
            Expiry::At(1_577_836_800)
        );
        for bad in [
            &["--expires-in", "3d"][..],
            &["--expires-at", "2020-01-01"],
            &["--expires-in", "1h", "--expires-at", "2020-01-01T00:00:00Z"],
        ] {
            assert!(options(bad).is_err(), "{bad:?}");
        }
        let err = options(&["--expires-at", "tomorrow"]).expect_err("bad time");
        assert!(err.to_string().contains("is not a UTC time"), "{err}");
    }

    #[test]
    fn verify_refuses_a_file_that_is_not_a_disk() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("not-a-disk.raw");
        std::fs::write(&file, vec![0u8; 64 * 1024]).expect("write");
        let err = dispatch(Cli {
            command: Command::Verify(VerifyArgs { disk: file }),
        })
        .expect_err("a zero-filled file is not a disk");
        assert!(format!("{err:#}").contains("not-a-disk.raw"), "{err:#}");
    }
}
