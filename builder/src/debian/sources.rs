//! Where the archive is: the definition's `[debian]` mirrors, else the environment, else the
//! host's apt sources (deb822 `*.sources` files and one-line `sources.list`/`*.list` files).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use os_config::Definition;

use super::control;

/// Environment variable naming the main archive.
pub const MIRROR_ENV: &str = "PLINTH_DEBIAN_MIRROR";
/// Environment variable naming the security archive.
pub const SECURITY_MIRROR_ENV: &str = "PLINTH_DEBIAN_SECURITY_MIRROR";
/// The host's apt configuration folder.
pub const APT_DIR: &str = "/etc/apt";
/// Keyring used when the definition names none.
pub const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// One `deb` entry of the host's apt sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    pub uris: Vec<String>,
    pub suites: Vec<String>,
    pub components: Vec<String>,
}

/// The suites to resolve, each with the archive URL that serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirrors {
    /// `(suite, archive URL without trailing slash)`, in resolution order.
    pub suites: Vec<(String, String)>,
}

impl Mirrors {
    /// The archive URL serving `suite`.
    pub fn url_of(&self, suite: &str) -> Option<&str> {
        self.suites
            .iter()
            .find(|(s, _)| s == suite)
            .map(|(_, url)| url.as_str())
    }

    /// The suite names, for messages.
    pub fn suite_names(&self) -> Vec<String> {
        self.suites.iter().map(|(s, _)| s.clone()).collect()
    }
}

/// The suites a definition resolves against: `S`, `S-updates` and `S-security`.
pub fn suites(def: &Definition) -> [String; 3] {
    let suite = &def.debian.suite;
    [
        suite.clone(),
        format!("{suite}-updates"),
        format!("{suite}-security"),
    ]
}

/// Works out where each suite comes from. `apt_dir` is the apt configuration folder
/// (`/etc/apt` on a host, a temporary folder in tests).
pub fn mirrors(def: &Definition, apt_dir: &Path) -> Result<Mirrors> {
    mirrors_with_env(def, apt_dir, |name| std::env::var(name).ok())
}

/// The keyring that signs the archive: `[debian] keyring` (relative to `def_dir`), else the
/// host's Debian archive keyring.
pub fn keyring(def: &Definition, def_dir: &Path) -> Result<PathBuf> {
    let keyring = match &def.debian.keyring {
        Some(path) => def_dir.join(path),
        None => PathBuf::from(DEFAULT_KEYRING),
    };
    if !keyring.is_file() {
        if def.debian.keyring.is_none() {
            bail!(
                "archive keyring {} not found: install it with `apt-get install debian-archive-keyring`, or set [debian] keyring",
                keyring.display()
            );
        }
        bail!("[debian] keyring {} not found", keyring.display());
    }
    Ok(keyring)
}

/// [`mirrors`] with the environment given as a lookup function.
pub fn mirrors_with_env(
    def: &Definition,
    apt_dir: &Path,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Mirrors> {
    let [main, updates, security] = suites(def);
    let env = |name: &str| lookup(name).filter(|v| !v.is_empty());
    let mut host: Option<Vec<AptSource>> = None;
    let mut from_host = |wanted: &[&str]| -> Result<Option<String>> {
        if host.is_none() {
            host = Some(read_apt_sources(apt_dir)?);
        }
        Ok(host.iter().flatten().find_map(|source| {
            wanted
                .iter()
                .find(|w| source.suites.iter().any(|s| s == *w))
                .and_then(|_| source.uris.first().cloned())
        }))
    };
    let main_url = match def.debian.mirror.clone().or_else(|| env(MIRROR_ENV)) {
        Some(url) => url,
        None => from_host(&[&main, &updates])?.with_context(|| {
            format!(
                "no Debian mirror for {main}: set [debian] mirror, or {MIRROR_ENV}, or add {main} to the apt sources in {}",
                apt_dir.display()
            )
        })?,
    };
    let updates_url = match def.debian.mirror.clone().or_else(|| env(MIRROR_ENV)) {
        Some(url) => url,
        None => from_host(&[&updates])?.unwrap_or_else(|| main_url.clone()),
    };
    let security_url = match def
        .debian
        .security_mirror
        .clone()
        .or_else(|| env(SECURITY_MIRROR_ENV))
    {
        Some(url) => url,
        None => from_host(&[&security])?.with_context(|| {
            format!(
                "no security archive for {security}: set [debian] security-mirror, or {SECURITY_MIRROR_ENV}, or add {security} to the apt sources in {}",
                apt_dir.display()
            )
        })?,
    };
    let trim = |url: String| url.trim_end_matches('/').to_owned();
    Ok(Mirrors {
        suites: vec![
            (main, trim(main_url)),
            (updates, trim(updates_url)),
            (security, trim(security_url)),
        ],
    })
}

/// Reads `sources.list`, `sources.list.d/*.list` and `sources.list.d/*.sources` under `apt_dir`
/// (other file names are ignored, as apt does), in that order, files sorted by name.
pub fn read_apt_sources(apt_dir: &Path) -> Result<Vec<AptSource>> {
    let mut sources = Vec::new();
    let list = apt_dir.join("sources.list");
    if list.is_file() {
        let text = std::fs::read_to_string(&list)
            .with_context(|| format!("reading {}", list.display()))?;
        sources.extend(parse_one_line(&text));
    }
    let folder = apt_dir.join("sources.list.d");
    let mut files = Vec::new();
    if folder.is_dir() {
        for entry in
            std::fs::read_dir(&folder).with_context(|| format!("listing {}", folder.display()))?
        {
            let path = entry
                .with_context(|| format!("listing {}", folder.display()))?
                .path();
            files.push(path);
        }
    }
    files.sort();
    for path in files {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let deb822 = name.ends_with(".sources");
        if !(deb822 || name.ends_with(".list")) || name.starts_with('.') {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        if deb822 {
            sources.extend(
                parse_deb822(&text).with_context(|| format!("parsing {}", path.display()))?,
            );
        } else {
            sources.extend(parse_one_line(&text));
        }
    }
    Ok(sources)
}

/// Parses deb822 `.sources` text, keeping enabled entries of type `deb`.
pub fn parse_deb822(text: &str) -> Result<Vec<AptSource>> {
    let paragraphs = control::parse(text).map_err(anyhow::Error::msg)?;
    let words = |value: Option<&str>| -> Vec<String> {
        value
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    Ok(paragraphs
        .iter()
        .filter(|p| words(p.get("Types")).iter().any(|t| t == "deb"))
        .filter(|p| {
            !p.get("Enabled")
                .is_some_and(|e| e.eq_ignore_ascii_case("no"))
        })
        .map(|p| AptSource {
            uris: words(p.get("URIs")),
            suites: words(p.get("Suites")),
            components: words(p.get("Components")),
        })
        .filter(|s| !s.uris.is_empty())
        .collect())
}

/// Parses one-line `sources.list` text (`deb [options] URI suite component…`).
pub fn parse_one_line(text: &str) -> Vec<AptSource> {
    let mut sources = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb\t"))
        else {
            continue;
        };
        let mut rest = rest.trim_start();
        if rest.starts_with('[') {
            match rest.find(']') {
                Some(end) => rest = rest[end + 1..].trim_start(),
                None => continue,
            }
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        sources.push(AptSource {
            uris: vec![uri.to_owned()],
            suites: vec![suite.to_owned()],
            components: words.map(str::to_owned).collect(),
        });
    }
    sources
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "Types: deb deb-src\n# comment\nURIs: http://127.0.0.1:1/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /k.gpg\n\nTypes: deb\nURIs: http://127.0.0.1:1/security\nSuites: bookworm-security\nComponents: main\n\nTypes: deb\nEnabled: no\nURIs: http://127.0.0.1:1/off\nSuites: trixie\n\nTypes: deb-src\nURIs: http://127.0.0.1:1/src\nSuites: sid\n";

    #[test]
    fn parses_deb822() {
        let sources = parse_deb822(DEB822).expect("parses");
        assert_eq!(sources.len(), 2);
        assert_eq!(sources[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(sources[1].uris, ["http://127.0.0.1:1/security"]);
    }

    #[test]
    fn parses_one_line() {
        let text = "# c\ndeb [arch=amd64 signed-by=/k] http://127.0.0.1:1/d bookworm main contrib\ndeb-src http://127.0.0.1:1/d bookworm main\ndeb http://127.0.0.1:1/s bookworm-security main # trailing\n";
        let sources = parse_one_line(text);
        assert_eq!(sources.len(), 2);
        assert_eq!(sources[0].uris, ["http://127.0.0.1:1/d"]);
        assert_eq!(sources[0].components, ["main", "contrib"]);
        assert_eq!(sources[1].suites, ["bookworm-security"]);
    }

    fn definition(extra: &str) -> Definition {
        let text = format!(
            "[image]\nname = \"t\"\nversion = \"1.0.0\"\n[debian]\nsuite = \"bookworm\"\n{extra}"
        );
        Definition::parse("t.toml", &text).expect("definition")
    }

    #[test]
    fn mirrors_from_host_sources_only_read_known_file_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("sources.list.d");
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("debian.sources"), DEB822).expect("write");
        std::fs::write(
            d.join("other.list.disabled"),
            "deb http://127.0.0.1:1/wrong bookworm-security main\n",
        )
        .expect("write");
        std::fs::write(dir.path().join("k.gpg"), b"k").expect("write");
        let def = definition("keyring = \"k.gpg\"\n");
        let mirrors = mirrors_with_env(&def, dir.path(), |_| None).expect("mirrors");
        assert_eq!(
            mirrors.suites,
            [
                (
                    "bookworm".to_owned(),
                    "http://127.0.0.1:1/debian".to_owned()
                ),
                (
                    "bookworm-updates".to_owned(),
                    "http://127.0.0.1:1/debian".to_owned()
                ),
                (
                    "bookworm-security".to_owned(),
                    "http://127.0.0.1:1/security".to_owned()
                ),
            ]
        );
        assert_eq!(
            keyring(&def, dir.path()).expect("keyring"),
            dir.path().join("k.gpg")
        );
        let missing = definition("keyring = \"nope.gpg\"\n");
        assert!(keyring(&missing, dir.path()).is_err());
    }

    #[test]
    fn definition_mirrors_win_and_missing_security_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("k.gpg"), b"k").expect("write");
        let def = definition("keyring = \"k.gpg\"\nmirror = \"http://127.0.0.1:2/d/\"\nsecurity-mirror = \"http://127.0.0.1:2/s\"\n");
        let mirrors = mirrors_with_env(&def, dir.path(), |_| None).expect("mirrors");
        assert_eq!(
            mirrors.url_of("bookworm-updates"),
            Some("http://127.0.0.1:2/d")
        );
        assert_eq!(
            mirrors.url_of("bookworm-security"),
            Some("http://127.0.0.1:2/s")
        );

        let def = definition("keyring = \"k.gpg\"\nmirror = \"http://127.0.0.1:2/d/\"\n");
        let err = mirrors_with_env(&def, dir.path(), |_| None).expect_err("no security");
        assert!(err.to_string().contains("bookworm-security"), "{err}");

        let from_env = mirrors_with_env(&def, dir.path(), |name| {
            (name == SECURITY_MIRROR_ENV).then(|| "http://127.0.0.1:3/s".to_owned())
        })
        .expect("mirrors");
        assert_eq!(
            from_env.url_of("bookworm-security"),
            Some("http://127.0.0.1:3/s")
        );
    }
}
