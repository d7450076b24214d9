//! Dependency resolution over the binary packages of several suites, as apt would pick them:
//! the highest version of each name wins, `Pre-Depends` and `Depends` are followed,
//! alternatives are tried in order, and virtual packages are satisfied through `Provides`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use anyhow::{bail, Result};

use super::control::Paragraph;
use super::version::{compare, Relation};

/// The architectures a machine of this image runs.
pub const ARCHITECTURES: [&str; 2] = ["amd64", "all"];

/// One binary package as an index describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// The suite whose index listed it, e.g. `bookworm-security`.
    pub suite: String,
    /// Pool path relative to the archive root.
    pub filename: String,
    pub size: u64,
    pub sha256: String,
    /// `Pre-Depends` followed by `Depends`: each entry is a list of alternatives.
    pub depends: Vec<Vec<Dependency>>,
    /// Virtual names this package provides, with an optional version.
    pub provides: Vec<(String, Option<String>)>,
}

/// One alternative of a dependency: a name with an optional version constraint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub name: String,
    pub constraint: Option<(Relation, String)>,
}

impl fmt::Display for Dependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.constraint {
            Some((relation, version)) => {
                write!(f, "{} ({} {version})", self.name, relation.as_str())
            }
            None => f.write_str(&self.name),
        }
    }
}

impl Dependency {
    /// Whether a package or provided name at `version` satisfies this dependency.
    fn accepts(&self, version: &str) -> bool {
        match &self.constraint {
            Some((relation, reference)) => relation.holds(version, reference),
            None => true,
        }
    }

    /// Whether a `Provides` entry (which may carry no version) satisfies this dependency.
    fn accepts_provided(&self, version: Option<&str>) -> bool {
        match (&self.constraint, version) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(_), Some(version)) => self.accepts(version),
        }
    }
}

fn show_group(group: &[Dependency]) -> String {
    group
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Parses a relationship field (`Depends`): comma-separated groups of `|`-separated alternatives.
/// Architecture qualifiers (`:any`), architecture lists (`[amd64]`) and build profiles (`<!nocheck>`)
/// are dropped: binary packages of one architecture do not need them.
pub fn parse_relations(text: &str) -> Result<Vec<Vec<Dependency>>, String> {
    let mut groups = Vec::new();
    for group in text.split(',') {
        let group = group.trim();
        if group.is_empty() {
            continue;
        }
        let mut alternatives = Vec::new();
        for alternative in group.split('|') {
            alternatives.push(parse_dependency(alternative)?);
        }
        groups.push(alternatives);
    }
    Ok(groups)
}

fn parse_dependency(text: &str) -> Result<Dependency, String> {
    let text = strip_brackets(text, '[', ']');
    let text = strip_brackets(&text, '<', '>');
    let (name, constraint) = match text.split_once('(') {
        Some((name, rest)) => {
            let inner = rest
                .strip_suffix(')')
                .or_else(|| rest.trim_end().strip_suffix(')'))
                .ok_or_else(|| format!("unclosed `(` in dependency `{}`", text.trim()))?
                .trim();
            let op_len = inner
                .find(|c: char| !matches!(c, '<' | '>' | '='))
                .unwrap_or(inner.len());
            let (op, version) = inner.split_at(op_len);
            let relation = Relation::parse(op).ok_or_else(|| {
                format!(
                    "unknown version relation `{op}` in dependency `{}`",
                    text.trim()
                )
            })?;
            let version = version.trim();
            if version.is_empty() {
                return Err(format!("missing version in dependency `{}`", text.trim()));
            }
            (name, Some((relation, version.to_owned())))
        }
        None => (text.as_str(), None),
    };
    let name = name.trim();
    let name = name.split_once(':').map_or(name, |(name, _)| name);
    if name.is_empty() {
        return Err(format!(
            "empty package name in dependency `{}`",
            text.trim()
        ));
    }
    Ok(Dependency {
        name: name.to_owned(),
        constraint,
    })
}

/// Removes `open … close` spans (architecture lists, build profiles) outside the parentheses of
/// a version constraint, whose `<`/`>` are relations.
fn strip_brackets(text: &str, open: char, close: char) -> String {
    let mut out = String::with_capacity(text.len());
    let mut depth = 0usize;
    let mut in_parens = false;
    for c in text.chars() {
        if depth == 0 && c == '(' {
            in_parens = true;
        } else if depth == 0 && c == ')' {
            in_parens = false;
        }
        if in_parens {
            out.push(c);
        } else if c == open {
            depth += 1;
        } else if c == close && depth > 0 {
            depth -= 1;
        } else if depth == 0 {
            out.push(c);
        }
    }
    out
}

/// Reads one `Packages` paragraph; `Ok(None)` for architectures this image does not run.
pub fn package_from_paragraph(paragraph: &Paragraph, suite: &str) -> Result<Option<Package>> {
    let field = |name: &str| -> Result<&str> {
        match paragraph.get(name) {
            Some(value) => Ok(value),
            None => bail!(
                "package `{}` in {suite}: missing field `{name}`",
                paragraph.get("Package").unwrap_or("?")
            ),
        }
    };
    let name = field("Package")?;
    let architecture = field("Architecture")?;
    if !ARCHITECTURES.contains(&architecture) {
        return Ok(None);
    }
    let size = field("Size")?;
    let size = size
        .parse()
        .map_err(|_| anyhow::anyhow!("package `{name}` in {suite}: bad Size `{size}`"))?;
    let mut depends = Vec::new();
    for key in ["Pre-Depends", "Depends"] {
        if let Some(text) = paragraph.get(key) {
            depends.extend(
                parse_relations(text)
                    .map_err(|e| anyhow::anyhow!("package `{name}` in {suite}: {key}: {e}"))?,
            );
        }
    }
    let mut provides = Vec::new();
    if let Some(text) = paragraph.get("Provides") {
        let groups = parse_relations(text)
            .map_err(|e| anyhow::anyhow!("package `{name}` in {suite}: Provides: {e}"))?;
        for dependency in groups.into_iter().flatten() {
            let version = match dependency.constraint {
                Some((Relation::Equal, version)) => Some(version),
                Some(_) => bail!("package `{name}` in {suite}: Provides allows only `=` versions"),
                None => None,
            };
            provides.push((dependency.name, version));
        }
    }
    Ok(Some(Package {
        name: name.to_owned(),
        version: field("Version")?.to_owned(),
        architecture: architecture.to_owned(),
        suite: suite.to_owned(),
        filename: field("Filename")?.to_owned(),
        size,
        sha256: field("SHA256")?.to_ascii_lowercase(),
        depends,
        provides,
    }))
}

/// Every package the indices offer, reduced to the candidate (highest version) of each name.
#[derive(Debug, Default)]
pub struct Universe {
    suites: Vec<String>,
    candidates: BTreeMap<String, Package>,
    /// Virtual name → (provider, provided version), providers in name order.
    providers: BTreeMap<String, Vec<(String, Option<String>)>>,
}

impl Universe {
    /// An empty universe; `suites` are only used to name what was searched in errors.
    pub fn new(suites: Vec<String>) -> Universe {
        Universe {
            suites,
            ..Universe::default()
        }
    }

    /// Adds a package; it becomes the candidate when its version is higher than the current one
    /// (on equal versions the first one added stays).
    pub fn add(&mut self, package: Package) {
        match self.candidates.get(&package.name) {
            Some(current) if compare(&package.version, &current.version).is_le() => {}
            _ => {
                self.candidates.insert(package.name.clone(), package);
            }
        }
        self.providers.clear();
    }

    /// Number of candidate packages.
    pub fn len(&self) -> usize {
        self.candidates.len()
    }

    /// Whether no package was added.
    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }

    fn index_providers(&mut self) {
        let mut providers: BTreeMap<String, Vec<(String, Option<String>)>> = BTreeMap::new();
        for package in self.candidates.values() {
            for (name, version) in &package.provides {
                providers
                    .entry(name.clone())
                    .or_default()
                    .push((package.name.clone(), version.clone()));
            }
        }
        self.providers = providers;
    }

    /// Resolves `roots` and everything they depend on; packages come back sorted by name.
    pub fn resolve(&mut self, roots: &[String]) -> Result<Vec<Package>> {
        self.index_providers();
        let mut selected: BTreeMap<String, String> = BTreeMap::new(); // name -> parent
        let mut queue = VecDeque::new();
        for root in roots {
            let wanted = Dependency {
                name: root.clone(),
                constraint: None,
            };
            let Some(name) = self.choose(&wanted) else {
                bail!(
                    "unknown package `{root}`: no package of that name (or providing it) for {} in {}",
                    ARCHITECTURES.join("/"),
                    self.suites.join(", ")
                );
            };
            if !selected.contains_key(&name) {
                selected.insert(name.clone(), String::new());
                queue.push_back(name);
            }
        }
        while let Some(name) = queue.pop_front() {
            let Some(package) = self.candidates.get(&name) else {
                continue;
            };
            for group in &package.depends {
                if group.iter().any(|d| self.satisfied(d, &selected)) {
                    continue;
                }
                let Some(choice) = group.iter().find_map(|d| self.choose(d)) else {
                    let mut chain = vec![name.clone()];
                    let mut at = name.clone();
                    while let Some(parent) = selected.get(&at).filter(|p| !p.is_empty()) {
                        chain.push(parent.clone());
                        at = parent.clone();
                    }
                    chain.reverse();
                    chain.push(show_group(group));
                    bail!(
                        "unsatisfiable dependency: {}\n{}",
                        chain.join(" -> "),
                        group
                            .iter()
                            .map(|d| format!("  {}: {}", d, self.why_not(d)))
                            .collect::<Vec<_>>()
                            .join("\n")
                    );
                };
                if !selected.contains_key(&choice) {
                    selected.insert(choice.clone(), name.clone());
                    queue.push_back(choice);
                }
            }
        }
        Ok(selected
            .keys()
            .filter_map(|name| self.candidates.get(name).cloned())
            .collect())
    }

    /// Whether an already selected package (or what it provides) satisfies `dependency`.
    fn satisfied(&self, dependency: &Dependency, selected: &BTreeMap<String, String>) -> bool {
        if selected.contains_key(&dependency.name) {
            if let Some(package) = self.candidates.get(&dependency.name) {
                if dependency.accepts(&package.version) {
                    return true;
                }
            }
        }
        self.providers
            .get(&dependency.name)
            .into_iter()
            .flatten()
            .any(|(provider, version)| {
                selected.contains_key(provider) && dependency.accepts_provided(version.as_deref())
            })
    }

    /// The package that satisfies `dependency`: the real package of that name when its candidate
    /// fits, else the first provider (by name) whose provided version fits.
    fn choose(&self, dependency: &Dependency) -> Option<String> {
        if let Some(package) = self.candidates.get(&dependency.name) {
            if dependency.accepts(&package.version) {
                return Some(package.name.clone());
            }
        }
        self.providers
            .get(&dependency.name)
            .into_iter()
            .flatten()
            .find(|(_, version)| dependency.accepts_provided(version.as_deref()))
            .map(|(provider, _)| provider.clone())
    }

    /// Explains why nothing satisfies `dependency`.
    fn why_not(&self, dependency: &Dependency) -> String {
        match self.candidates.get(&dependency.name) {
            Some(package) => format!(
                "the candidate is version {} from {}",
                package.version, package.suite
            ),
            None => match self.providers.get(&dependency.name) {
                Some(providers) => format!(
                    "no provider fits (provided by {})",
                    providers
                        .iter()
                        .map(|(name, version)| match version {
                            Some(v) => format!("{name} as {v}"),
                            None => format!("{name} without a version"),
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => format!(
                    "no package of that name (or providing it) in {}",
                    self.suites.join(", ")
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::debian::control;

    fn universe(text: &str) -> Universe {
        let mut universe = Universe::new(vec!["test".to_owned(), "test-security".to_owned()]);
        for paragraph in control::parse(text).expect("control text") {
            let suite = paragraph.get("X-Suite").unwrap_or("test").to_owned();
            if let Some(package) = package_from_paragraph(&paragraph, &suite).expect("package") {
                universe.add(package);
            }
        }
        universe
    }

    fn names(packages: &[Package]) -> Vec<String> {
        packages
            .iter()
            .map(|p| format!("{}={}", p.name, p.version))
            .collect()
    }

    fn pkg(name: &str, version: &str, extra: &str) -> String {
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: amd64\nFilename: pool/{name}_{version}.deb\nSize: 10\nSHA256: {}\n{extra}\n",
            "0".repeat(64)
        )
    }

    #[test]
    fn parses_relations() {
        let groups = parse_relations(
            "libc6 (>= 2.34), python3:any (>>3.1) | perl [amd64] <!nocheck>, , x (= 1:2-3), y (<< 2) <!cross>, z (<= 1)",
        )
        .expect("parses");
        assert_eq!(groups.len(), 5);
        assert_eq!(groups[3][0].to_string(), "y (<< 2)");
        assert_eq!(groups[4][0].to_string(), "z (<= 1)");
        assert_eq!(groups[0][0].to_string(), "libc6 (>= 2.34)");
        assert_eq!(groups[1][0].to_string(), "python3 (>> 3.1)");
        assert_eq!(groups[1][1].to_string(), "perl");
        assert_eq!(groups[2][0].to_string(), "x (= 1:2-3)");
        assert!(parse_relations("a (>= 1").is_err());
        assert!(parse_relations("a (~ 1)").is_err());
    }

    #[test]
    fn highest_version_across_suites_wins() {
        let text = format!(
            "{}\n{}X-Suite: test-security\n\n{}",
            pkg("a", "1.0-1", "Depends: b"),
            pkg("a", "1.0-1+deb12u1", "Depends: b"),
            pkg("b", "2", "")
        );
        let mut universe = universe(&text);
        let resolved = universe.resolve(&["a".to_owned()]).expect("resolves");
        assert_eq!(names(&resolved), ["a=1.0-1+deb12u1", "b=2"]);
        assert_eq!(resolved[0].suite, "test-security");
    }

    #[test]
    fn alternatives_take_the_first_satisfiable() {
        let text = [
            pkg("root", "1", "Depends: missing | c (>= 2) | b, d | e"),
            pkg("b", "1", ""),
            pkg("c", "1", ""),
            pkg("d", "1", ""),
            pkg("e", "1", ""),
        ]
        .join("\n");
        let resolved = universe(&text)
            .resolve(&["root".to_owned()])
            .expect("resolves");
        assert_eq!(names(&resolved), ["b=1", "d=1", "root=1"]);
    }

    #[test]
    fn already_selected_alternative_is_kept() {
        let text = [
            pkg("root", "1", "Depends: b, a | b"),
            pkg("a", "1", ""),
            pkg("b", "1", ""),
        ]
        .join("\n");
        let resolved = universe(&text)
            .resolve(&["root".to_owned()])
            .expect("resolves");
        assert_eq!(names(&resolved), ["b=1", "root=1"]);
    }

    #[test]
    fn provides_plain_and_versioned() {
        let text = [
            pkg(
                "root",
                "1",
                "Pre-Depends: awk\nDepends: libfoo-abi (>= 3), real",
            ),
            pkg("mawk", "1", "Provides: awk"),
            pkg("gawk", "1", "Provides: awk"),
            pkg("foo-old", "1", "Provides: libfoo-abi (= 2)"),
            pkg("foo-new", "1", "Provides: libfoo-abi (= 3)"),
            pkg("foo-plain", "1", "Provides: libfoo-abi"),
            pkg("real", "1", ""),
            pkg("imposter", "1", "Provides: real"),
        ]
        .join("\n");
        let resolved = universe(&text)
            .resolve(&["root".to_owned()])
            .expect("resolves");
        // Providers are taken in name order; a real package beats a provider.
        assert_eq!(
            names(&resolved),
            ["foo-new=1", "gawk=1", "real=1", "root=1"]
        );
    }

    #[test]
    fn selected_provider_satisfies_later_dependency() {
        let text = [
            pkg("root", "1", "Depends: zz-mta, mail-transport-agent"),
            pkg("aa-mta", "1", "Provides: mail-transport-agent"),
            pkg("zz-mta", "1", "Provides: mail-transport-agent"),
        ]
        .join("\n");
        let resolved = universe(&text)
            .resolve(&["root".to_owned()])
            .expect("resolves");
        assert_eq!(names(&resolved), ["root=1", "zz-mta=1"]);
    }

    #[test]
    fn other_architectures_are_skipped() {
        let text = pkg("a", "1", "").replace("amd64", "arm64");
        assert!(universe(&text).is_empty());
    }

    #[test]
    fn unknown_root_names_package_and_suites() {
        let err = universe(&pkg("a", "1", ""))
            .resolve(&["nosuch".to_owned()])
            .expect_err("unknown");
        let text = err.to_string();
        assert!(text.contains("`nosuch`"), "{text}");
        assert!(text.contains("test, test-security"), "{text}");
    }

    #[test]
    fn unsatisfiable_dependency_prints_the_chain() {
        let text = [
            pkg("root", "1", "Depends: mid"),
            pkg("mid", "1", "Depends: leaf (>= 2) | gone"),
            pkg("leaf", "1", ""),
        ]
        .join("\n");
        let err = universe(&text)
            .resolve(&["root".to_owned()])
            .expect_err("unsatisfiable");
        let text = err.to_string();
        assert!(text.contains("root -> mid -> leaf (>= 2) | gone"), "{text}");
        assert!(text.contains("the candidate is version 1"), "{text}");
        assert!(text.contains("gone: no package"), "{text}");
    }
}
