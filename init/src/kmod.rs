//! Kernel module tables: `modules.dep` (load order) and `modules.alias` (modalias matching).

use std::collections::{BTreeMap, BTreeSet};

/// Normalizes a module name: `dm-verity` and `dm_verity` are the same module.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name of a path in `modules.dep` (`kernel/drivers/md/dm-verity.ko.xz` → `dm_verity`).
pub fn name_of_path(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    normalize(stem)
}

/// The parsed `modules.dep` and `modules.alias` of one kernel.
#[derive(Debug, Default, Clone)]
pub struct ModuleIndex {
    /// Module name → (path relative to the modules directory, dependency names).
    modules: BTreeMap<String, (String, Vec<String>)>,
    /// (glob pattern, module name), in file order.
    aliases: Vec<(String, String)>,
}

impl ModuleIndex {
    /// Parses `modules.dep` (`path: dep dep…`) and `modules.alias` (`alias PATTERN NAME`) text.
    pub fn parse(dep: &str, alias: &str) -> Result<ModuleIndex, String> {
        let mut modules = BTreeMap::new();
        for (number, line) in dep.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (path, deps) = line.split_once(':').ok_or_else(|| {
                format!(
                    "modules.dep line {}: {line:?} has no ':' (expected `path.ko: dep.ko …`)",
                    number + 1
                )
            })?;
            let deps = deps.split_whitespace().map(name_of_path).collect();
            modules.insert(name_of_path(path.trim()), (path.trim().to_string(), deps));
        }
        let mut aliases = Vec::new();
        for (number, line) in alias.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("alias"), Some(pattern), Some(module)) => {
                    aliases.push((pattern.to_string(), normalize(module)))
                }
                _ => {
                    return Err(format!(
                        "modules.alias line {}: {line:?} (expected `alias PATTERN MODULE`)",
                        number + 1
                    ))
                }
            }
        }
        Ok(ModuleIndex { modules, aliases })
    }

    /// True if the module is a loadable module of this kernel (not built in, not absent).
    pub fn contains(&self, name: &str) -> bool {
        self.modules.contains_key(&normalize(name))
    }

    /// Path of a module relative to the modules directory.
    pub fn path(&self, name: &str) -> Option<&str> {
        self.modules.get(&normalize(name)).map(|(p, _)| p.as_str())
    }

    /// The modules to load for `names`, each after its dependencies, without duplicates.
    ///
    /// Names that are not in `modules.dep` (built in, or absent) are returned in the second list.
    pub fn load_order<S: AsRef<str>>(&self, names: &[S]) -> (Vec<String>, Vec<String>) {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut missing = Vec::new();
        for name in names {
            let name = normalize(name.as_ref());
            if !self.modules.contains_key(&name) {
                missing.push(name);
                continue;
            }
            self.visit(&name, &mut seen, &mut order);
        }
        (order, missing)
    }

    /// Depth-first: dependencies before the module. `seen` also breaks (invalid) cycles.
    fn visit(&self, name: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(name.to_string()) {
            return;
        }
        if let Some((_, deps)) = self.modules.get(name) {
            for dep in deps {
                self.visit(dep, seen, order);
            }
            order.push(name.to_string());
        }
    }

    /// Modules whose alias pattern matches a device's `modalias`, in file order, deduplicated.
    pub fn match_alias(&self, modalias: &str) -> Vec<String> {
        let mut found: Vec<String> = Vec::new();
        for (pattern, module) in &self.aliases {
            if glob_match(pattern, modalias) && !found.contains(module) {
                found.push(module.clone());
            }
        }
        found
    }
}

/// Shell-style glob matching as `fnmatch(3)` without flags: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`/`[^x]`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0usize, 0usize);
    // Position after the last `*` and the text position it was tried at (classic backtracking).
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                '*' => {
                    star = Some((p + 1, t));
                    p += 1;
                    continue;
                }
                '?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = match_class(&pattern, p, text[t]) {
                        if matched {
                            p = next;
                            t += 1;
                            continue;
                        }
                    } else if text[t] == '[' {
                        // An unterminated `[` matches itself.
                        p += 1;
                        t += 1;
                        continue;
                    }
                }
                c if c == text[t] => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((after, tried)) => {
                p = after;
                t = tried + 1;
                star = Some((after, tried + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// Matches `c` against the bracket expression starting at `pattern[start] == '['`.
/// Returns (matched, index after `]`), or None if the expression is not terminated.
fn match_class(pattern: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(pattern.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let current = *pattern.get(i)?;
        if current == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if pattern.get(i + 1) == Some(&'-') && pattern.get(i + 2).is_some_and(|&e| e != ']') {
            let end = pattern[i + 2];
            if current <= c && c <= end {
                matched = true;
            }
            i += 3;
        } else {
            if current == c {
                matched = true;
            }
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/md/dm-verity.ko: kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko kernel/lib/reed_solomon.ko
kernel/drivers/md/dm-bufio.ko:
kernel/drivers/md/dm-mod.ko:
kernel/lib/reed_solomon.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/fs/squashfs/squashfs.ko.xz:
";

    const ALIAS: &str = "\
# Aliases extracted from modules themselves.
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias virtio:d00000002v* virtio_blk
alias acpi*:LNXPWRBN:* button
alias usb:v*p*d*dc*dsc*dp*ic03isc01ip0[12]in* usbhid
alias devname:mapper/control dm_mod
";

    fn index() -> ModuleIndex {
        ModuleIndex::parse(DEP, ALIAS).expect("parses")
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let (order, missing) =
            index().load_order(&["virtio_blk", "virtio-pci", "dm-verity", "nvme"]);
        assert_eq!(
            order,
            [
                "virtio",
                "virtio_ring",
                "virtio_blk",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "dm_bufio",
                "dm_mod",
                "reed_solomon",
                "dm_verity"
            ]
        );
        assert_eq!(missing, ["nvme"]);
        for (position, name) in order.iter().enumerate() {
            let (_, deps) = &index().modules[name];
            for dep in deps {
                let dep_position = order.iter().position(|m| m == dep).expect("dep loaded");
                assert!(dep_position < position, "{dep} must load before {name}");
            }
        }
    }

    #[test]
    fn compressed_paths_keep_their_name() {
        assert_eq!(
            index().path("squashfs"),
            Some("kernel/fs/squashfs/squashfs.ko.xz")
        );
        assert!(index().contains("dm-mod"));
    }

    #[test]
    fn modalias_matching() {
        let index = index();
        assert_eq!(
            index.match_alias("pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00"),
            ["virtio_pci"]
        );
        assert_eq!(
            index.match_alias("virtio:d00000002v00001AF4"),
            ["virtio_blk"]
        );
        assert!(index.match_alias("virtio:d00000001v00001AF4").is_empty());
        assert_eq!(index.match_alias("acpi:LNXPWRBN:"), ["button"]);
        assert_eq!(
            index.match_alias("usb:v0627p0001d0000dc00dsc00dp00ic03isc01ip02in00"),
            ["usbhid"]
        );
        assert!(index
            .match_alias("usb:v0627p0001d0000dc00dsc00dp00ic03isc01ip03in00")
            .is_empty());
    }

    #[test]
    fn glob_table() {
        let cases = [
            ("abc", "abc", true),
            ("abc", "abd", false),
            ("a*c", "abbbc", true),
            ("a*c", "abbbd", false),
            ("*", "", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("[a-c]x", "bx", true),
            ("[a-c]x", "dx", false),
            ("[!a-c]x", "dx", true),
            ("[^a-c]x", "ax", false),
            ("[]]", "]", true),
            ("a[b", "a[b", true),
            ("*d*sv*", "pci:v1d2sv3", true),
            ("*a*a*a", "aaaa", true),
            ("*a*a*b", "aaaa", false),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(glob_match(pattern, text), expected, "{pattern} vs {text}");
        }
    }

    #[test]
    fn bad_lines_are_named() {
        let err = ModuleIndex::parse("foo.ko bar.ko\n", "").expect_err("bad dep");
        assert!(err.contains("modules.dep line 1"), "{err}");
        let err = ModuleIndex::parse("", "alias onlypattern\n").expect_err("bad alias");
        assert!(err.contains("modules.alias line 1"), "{err}");
    }
}
