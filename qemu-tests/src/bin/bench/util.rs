//! Small helpers: running host commands, timing, reading partition tables and folder sizes.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Runs a command to success; returns its stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
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
pub fn sh(script: &str) -> Result<String> {
    run(Command::new("sh").args(["-c", script]))
}

/// A partition of a disk as `sfdisk --json` lists it, in bytes.
#[derive(Debug, Clone)]
pub struct Part {
    pub index: usize,
    pub name: String,
    pub start: u64,
    pub size: u64,
}

pub fn partitions(disk: &Path) -> Result<Vec<Part>> {
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

pub fn part<'a>(parts: &'a [Part], name: &str) -> Result<&'a Part> {
    parts
        .iter()
        .find(|p| p.name == name)
        .with_context(|| format!("the disk has no partition `{name}`"))
}

/// The sum of the sizes of a lock's packages.
pub fn lock_bytes(lock: &Path) -> Result<u64> {
    let text =
        std::fs::read_to_string(lock).with_context(|| format!("reading {}", lock.display()))?;
    let locked = builder::debian::lock::Lockfile::parse(&lock.display().to_string(), &text)?;
    Ok(locked.total_size())
}

/// The bytes of every file under a folder.
pub fn dir_bytes(dir: &Path) -> Result<u64> {
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

pub fn say(text: &str) {
    eprintln!("\n#### bench: {text}");
}

/// The signed manifest of the `stable` channel in a `plinth publish` folder.
pub fn published_manifest(release: &Path) -> Result<os_config::manifest::Manifest> {
    let path = release
        .join("stable")
        .join(os_config::manifest::MANIFEST_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    os_config::manifest::Manifest::parse(&bytes)
        .with_context(|| format!("parsing {}", path.display()))
}
