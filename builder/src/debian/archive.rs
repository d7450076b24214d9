//! Signed archive indices: `dists/<suite>/InRelease` checked with `gpgv` against the keyring,
//! then each component's `Packages` index checked against the sha256 the release lists.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::control;
use super::resolve::{package_from_paragraph, Universe};
use super::sources::Mirrors;
use crate::cache::Cache;
use crate::fetch;
use crate::progress::Step;
use crate::tools;

/// The architecture whose indices are read.
pub const ARCH: &str = "amd64";

/// What a verified `InRelease` says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Release {
    pub suite: Option<String>,
    pub codename: Option<String>,
    /// `Valid-Until` as seconds since the epoch.
    pub valid_until: Option<i64>,
    /// Path below `dists/<suite>/` → (sha256, size).
    pub files: BTreeMap<String, (String, u64)>,
    /// Whether `Architecture: all` packages have an index of their own (`binary-all`) that
    /// must be read besides the per-architecture one: `all` is among the `Architectures` and
    /// the release does not say `No-Support-for-Architecture-all: Packages`.
    pub separate_all_index: bool,
}

/// Parses the (already verified) text of a `Release`/`InRelease` file.
pub fn parse_release(text: &str) -> Result<Release> {
    let paragraphs = control::parse(text).map_err(anyhow::Error::msg)?;
    let Some(paragraph) = paragraphs.first() else {
        bail!("empty release file");
    };
    let mut files = BTreeMap::new();
    for line in paragraph.get("SHA256").unwrap_or("").lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [sha, size, path] = words[..] {
            let size = size
                .parse()
                .with_context(|| format!("bad size in release line `{line}`"))?;
            files.insert(path.to_owned(), (sha.to_ascii_lowercase(), size));
        }
    }
    if files.is_empty() {
        bail!("release file lists no SHA256 checksums");
    }
    let valid_until = match paragraph.get("Valid-Until") {
        Some(date) => Some(parse_date(date).with_context(|| format!("bad Valid-Until `{date}`"))?),
        None => None,
    };
    Ok(Release {
        suite: paragraph.get("Suite").map(str::to_owned),
        codename: paragraph.get("Codename").map(str::to_owned),
        valid_until,
        files,
        separate_all_index: paragraph
            .get("Architectures")
            .is_some_and(|a| a.split_whitespace().any(|a| a == "all"))
            && paragraph
                .get("No-Support-for-Architecture-all")
                .is_none_or(|v| v != "Packages"),
    })
}

/// Parses an RFC 2822 date as used in release files (`Sat, 02 Dec 2026 22:33:12 UTC`).
pub fn parse_date(text: &str) -> Result<i64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let words = match words.first() {
        Some(first) if first.ends_with(',') => &words[1..],
        _ => &words[..],
    };
    let [day, month, year, time, zone] = words else {
        bail!("expected `Day, DD Mon YYYY HH:MM:SS UTC`");
    };
    if !matches!(*zone, "UTC" | "GMT" | "+0000" | "Z") {
        bail!("time zone `{zone}` is not UTC");
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS
        .iter()
        .position(|m| m == month)
        .context("unknown month")? as i64
        + 1;
    let day: i64 = day.parse().context("bad day")?;
    let year: i64 = year.parse().context("bad year")?;
    let hms: Vec<i64> = time
        .split(':')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("bad time")?;
    let [h, m, s] = hms[..] else {
        bail!("bad time `{time}`");
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days * 86_400 + h * 3600 + m * 60 + s)
}

/// Checks the OpenPGP signature of a cleartext-signed `InRelease` with `gpgv` and returns the
/// signed text (only what the signature covers).
pub fn verify_signed(signed: &[u8], keyring: &Path, what: &str) -> Result<String> {
    let gpgv = tools::GPGV.find()?;
    let keyring = std::fs::canonicalize(keyring)
        .with_context(|| format!("reading keyring {}", keyring.display()))?;
    let mut file = tempfile::NamedTempFile::new().context("creating a temporary file")?;
    std::io::Write::write_all(&mut file, signed).context("writing a temporary file")?;
    let output = Command::new(&gpgv)
        .arg("--quiet")
        .arg("--keyring")
        .arg(&keyring)
        .arg("--output")
        .arg("-")
        .arg(file.path())
        .output()
        .with_context(|| format!("running {}", gpgv.display()))?;
    if !output.status.success() {
        bail!(
            "the signature of {what} does not verify against {}:\n{}",
            keyring.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("{what} is not UTF-8"))
}

/// Fetches and verifies one suite's release file.
pub fn fetch_release(url: &str, suite: &str, keyring: &Path) -> Result<Release> {
    let location = format!("{url}/dists/{suite}/InRelease");
    let signed = fetch::get_bytes(&location, 64 * 1024 * 1024)?;
    let text = verify_signed(&signed, keyring, &location)?;
    let release = parse_release(&text).with_context(|| format!("parsing {location}"))?;
    if release.codename.as_deref() != Some(suite) && release.suite.as_deref() != Some(suite) {
        bail!(
            "{location} describes suite {} (codename {}), not {suite}",
            release.suite.as_deref().unwrap_or("?"),
            release.codename.as_deref().unwrap_or("?")
        );
    }
    if let Some(until) = release.valid_until {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if until < now {
            bail!(
                "{location} expired {} hours ago (Valid-Until); the mirror is stale",
                (now - until) / 3600
            );
        }
    }
    Ok(release)
}

/// Reads the binary package indices of every suite into a universe of candidates.
pub fn load_universe(
    mirrors: &Mirrors,
    keyring: &Path,
    components: &[String],
    cache: &Cache,
) -> Result<Universe> {
    tools::require(&[tools::GPGV])?;
    let mut universe = Universe::new(mirrors.suite_names());
    for (suite, url) in &mirrors.suites {
        let step = Step::start(format!("reading the {suite} index"));
        let release = fetch_release(url, suite, keyring)?;
        let mut count = 0usize;
        let mut bytes = 0u64;
        for component in components {
            let mut indices = vec![format!("{component}/binary-{ARCH}")];
            let all = format!("{component}/binary-all");
            if release.separate_all_index
                && release
                    .files
                    .keys()
                    .any(|p| p.starts_with(&format!("{all}/Packages")))
            {
                indices.push(all);
            }
            for index in indices {
                let (path, (sha256, size)) = ["Packages.xz", "Packages"]
                    .iter()
                    .map(|name| format!("{index}/{name}"))
                    .find_map(|path| release.files.get(&path).map(|entry| (path, entry.clone())))
                    .with_context(|| {
                        format!("{url}/dists/{suite}/InRelease lists no {index}/Packages(.xz)")
                    })?;
                let location = format!("{url}/dists/{suite}/{path}");
                let file = cache
                    .fetch(&location, &sha256, Some(size), None)
                    .with_context(|| format!("fetching {location}"))?;
                bytes += size;
                let text = read_index(&file, path.ends_with(".xz"))
                    .with_context(|| format!("reading {location}"))?;
                let paragraphs = control::parse(&text)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("parsing {location}"))?;
                for paragraph in &paragraphs {
                    if let Some(package) = package_from_paragraph(paragraph, suite)
                        .with_context(|| format!("parsing {location}"))?
                    {
                        universe.add(package);
                        count += 1;
                    }
                }
            }
        }
        step.done(&format!(
            "{count} packages, {} of indices",
            human_bytes(bytes)
        ));
    }
    Ok(universe)
}

fn read_index(path: &Path, xz: bool) -> Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut text = String::new();
    if xz {
        xz2::read::XzDecoder::new(file)
            .read_to_string(&mut text)
            .context("decompressing")?;
    } else {
        std::io::BufReader::new(file)
            .read_to_string(&mut text)
            .context("reading")?;
    }
    Ok(text)
}

/// A byte count for people: `12.3 MiB`.
pub use crate::disk::human as human_bytes;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release_checksums() {
        let text = "Origin: Debian\nSuite: stable-security\nCodename: bookworm-security\nValid-Until: Wed, 02 Dec 2026 22:33:12 UTC\nArchitectures: all amd64\nNo-Support-for-Architecture-all: Packages\nMD5Sum:\n 0f 1 main/binary-amd64/Packages.xz\nSHA256:\n AB 42 main/binary-amd64/Packages.xz\n cd   7 main/binary-all/Packages\n";
        let release = parse_release(text).expect("parses");
        assert_eq!(release.codename.as_deref(), Some("bookworm-security"));
        assert_eq!(
            release.files.get("main/binary-amd64/Packages.xz"),
            Some(&("ab".to_owned(), 42))
        );
        assert_eq!(release.files.len(), 2);
        assert!(!release.separate_all_index);
        let separate =
            parse_release("Architectures: all amd64\nSHA256:\n ab 1 main/binary-all/Packages\n")
                .expect("parses");
        assert!(separate.separate_all_index);
        assert_eq!(release.valid_until, Some(1_796_250_792));
    }

    #[test]
    fn parses_dates() {
        assert_eq!(
            parse_date("Thu, 01 Jan 1970 00:00:00 UTC").expect("date"),
            0
        );
        assert_eq!(
            parse_date("Sat, 10 Jun 2023 08:55:33 UTC").expect("date"),
            1_686_387_333
        );
        assert!(parse_date("Sat, 10 Jun 2023 08:55:33 +0200").is_err());
        assert!(parse_date("yesterday").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
    }
}
