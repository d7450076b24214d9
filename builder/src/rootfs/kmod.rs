//! Kernel modules: reading `.modinfo`, writing `modules.dep`/`modules.alias`/`modules.softdep`
//! in kmod's text formats (no host `depmod`), and the load-order closure of named modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// What a module's `.modinfo` section says about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    /// `name=`, if the module records it.
    pub name: Option<String>,
    /// `depends=`: modules whose symbols it uses (normalised names).
    pub depends: Vec<String>,
    /// `alias=` patterns (device ids, filesystem and crypto names).
    pub aliases: Vec<String>,
    /// `softdep=` values, e.g. `pre: crc32c`.
    pub softdeps: Vec<String>,
}

/// Parses the NUL-separated `key=value` strings of a `.modinfo` section.
pub fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for item in section.split(|b| *b == 0) {
        let Ok(item) = std::str::from_utf8(item) else {
            continue;
        };
        let Some((key, value)) = item.split_once('=') else {
            continue;
        };
        match key {
            "name" => info.name = Some(normalise_name(value)),
            "depends" => info.depends.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(normalise_name),
            ),
            "alias" => info.aliases.push(value.to_owned()),
            "softdep" => info.softdeps.push(value.to_owned()),
            _ => {}
        }
    }
    info
}

/// Finds the `.modinfo` section of a module's ELF image.
pub fn modinfo_section(elf: &[u8]) -> Result<&[u8]> {
    use goblin::container::Ctx;
    use goblin::elf::{Elf, SectionHeader};
    let header = Elf::parse_header(elf).context("parsing ELF header")?;
    let ctx = Ctx::new(
        header.container().context("reading ELF class")?,
        header.endianness().context("reading ELF byte order")?,
    );
    let sections = SectionHeader::parse(
        elf,
        usize::try_from(header.e_shoff).context("section table offset")?,
        usize::from(header.e_shnum),
        ctx,
    )
    .context("parsing ELF section headers")?;
    let slice = |sh: &SectionHeader| -> Option<&[u8]> {
        let start = usize::try_from(sh.sh_offset).ok()?;
        let len = usize::try_from(sh.sh_size).ok()?;
        elf.get(start..start.checked_add(len)?)
    };
    let names = sections
        .get(usize::from(header.e_shstrndx))
        .and_then(slice)
        .context("ELF section name table is missing or out of bounds")?;
    for sh in &sections {
        let Some(name) = names.get(sh.sh_name..) else {
            continue;
        };
        if name.starts_with(b".modinfo\0") {
            return slice(sh).context(".modinfo section out of bounds");
        }
    }
    bail!("no .modinfo section (not a kernel module?)")
}

/// A module name with `-` spelt `_`, as the kernel and kmod compare them.
pub fn normalise_name(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path such as `kernel/fs/fuse/fuse.ko`: file name without `.ko`.
pub fn name_from_path(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.find(".ko").map_or(file, |i| &file[..i]);
    normalise_name(stem)
}

/// One module found in a modules directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Normalised module name.
    pub name: String,
    /// Path relative to the modules directory (`kernel/drivers/...ko`).
    pub path: String,
    /// Its `.modinfo`.
    pub info: ModInfo,
}

/// File name endings of kernel modules: plain, or compressed as the kernel can load them.
pub const MODULE_SUFFIXES: [&str; 4] = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"];

/// Reads a module file, decompressing `.ko.xz`, `.ko.zst` and `.ko.gz`.
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.to_string_lossy();
    let mut out = Vec::new();
    let result = if name.ends_with(".ko.xz") {
        xz2::read::XzDecoder::new(&raw[..]).read_to_end(&mut out)
    } else if name.ends_with(".ko.zst") {
        zstd::stream::read::Decoder::new(&raw[..]).and_then(|mut d| d.read_to_end(&mut out))
    } else if name.ends_with(".ko.gz") {
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out)
    } else {
        return Ok(raw);
    };
    result.with_context(|| format!("decompressing {}", path.display()))?;
    Ok(out)
}

/// Reads every module (`*.ko`, also compressed) below `modules_dir`, sorted by path.
pub fn scan(modules_dir: &Path) -> Result<Vec<Module>> {
    let mut files = Vec::new();
    collect_modules(modules_dir, "", &mut files)?;
    files.sort();
    let mut modules = Vec::with_capacity(files.len());
    for rel in files {
        let full = modules_dir.join(&rel);
        let bytes = read_module(&full)?;
        let section =
            modinfo_section(&bytes).with_context(|| format!("reading {}", full.display()))?;
        let info = parse_modinfo(section);
        let name = info.name.clone().unwrap_or_else(|| name_from_path(&rel));
        modules.push(Module {
            name,
            path: rel,
            info,
        });
    }
    Ok(modules)
}

fn collect_modules(dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading directory {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading directory {}", dir.display()))?;
        let name = entry.file_name();
        let name = name
            .to_str()
            .with_context(|| format!("non-UTF-8 file name in {}", dir.display()))?;
        let child = if rel.is_empty() {
            name.to_owned()
        } else {
            format!("{rel}/{name}")
        };
        let kind = entry
            .file_type()
            .with_context(|| format!("reading {}", entry.path().display()))?;
        if kind.is_dir() {
            collect_modules(&entry.path(), &child, out)?;
        } else if kind.is_file() && MODULE_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            out.push(child);
        }
    }
    Ok(())
}

/// Load order of `roots` (dependencies first, each module once) over a dependency relation.
fn load_order<'a>(
    roots: impl IntoIterator<Item = &'a str>,
    deps: &dyn Fn(&str) -> Result<Vec<String>>,
) -> Result<Vec<String>> {
    #[derive(PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        name: &str,
        deps: &dyn Fn(&str) -> Result<Vec<String>>,
        marks: &mut BTreeMap<String, Mark>,
        order: &mut Vec<String>,
        chain: &mut Vec<String>,
    ) -> Result<()> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                bail!("module dependency cycle: {} -> {name}", chain.join(" -> "))
            }
            None => {}
        }
        marks.insert(name.to_owned(), Mark::Visiting);
        chain.push(name.to_owned());
        for dep in deps(name)? {
            visit(&dep, deps, marks, order, chain)?;
        }
        chain.pop();
        marks.insert(name.to_owned(), Mark::Done);
        order.push(name.to_owned());
        Ok(())
    }
    let mut marks = BTreeMap::new();
    let mut order = Vec::new();
    for root in roots {
        visit(root, deps, &mut marks, &mut order, &mut Vec::new())?;
    }
    Ok(order)
}

/// `modules.dep`: for each module, every module it needs, the direct ones first and the ones
/// to load first last (kmod's order).
pub fn dep_table(modules: &[Module]) -> Result<String> {
    let by_name: BTreeMap<&str, &Module> = modules.iter().map(|m| (m.name.as_str(), m)).collect();
    let direct = |name: &str| -> Result<Vec<String>> {
        let module = by_name
            .get(name)
            .with_context(|| format!("no module named `{name}`"))?;
        check_depends(module, &by_name)?;
        Ok(module.info.depends.clone())
    };
    let mut out = String::new();
    for module in modules {
        let order = load_order([module.name.as_str()], &direct)?;
        out.push_str(&module.path);
        out.push(':');
        for dep in order.iter().rev().skip(1) {
            out.push(' ');
            out.push_str(&by_name[dep.as_str()].path);
        }
        out.push('\n');
    }
    Ok(out)
}

/// `modules.alias`: one `alias PATTERN NAME` line per alias.
pub fn alias_table(modules: &[Module]) -> String {
    let mut out = String::from("# Aliases extracted from modules themselves.\n");
    for module in modules {
        for alias in &module.info.aliases {
            out.push_str(&format!("alias {alias} {}\n", module.name));
        }
    }
    out
}

/// `modules.softdep`: one `softdep NAME pre: … post: …` line per declared soft dependency.
pub fn softdep_table(modules: &[Module]) -> String {
    let mut out = String::from("# Soft dependencies extracted from modules themselves.\n");
    for module in modules {
        for softdep in &module.info.softdeps {
            out.push_str(&format!("softdep {} {softdep}\n", module.name));
        }
    }
    out
}

/// Scans `modules_dir` and writes `modules.dep`, `modules.alias` and `modules.softdep` into it.
/// Returns the number of modules.
pub fn write_tables(modules_dir: &Path) -> Result<usize> {
    let modules = scan(modules_dir)?;
    write_tables_of(modules_dir, &modules)?;
    Ok(modules.len())
}

/// Writes `modules.dep`, `modules.alias` and `modules.softdep` of `modules` (paths relative to
/// `modules_dir`) into `modules_dir`.
pub fn write_tables_of(modules_dir: &Path, modules: &[Module]) -> Result<()> {
    let tables = [
        ("modules.dep", dep_table(modules)?),
        ("modules.alias", alias_table(modules)),
        ("modules.softdep", softdep_table(modules)),
    ];
    for (file, text) in tables {
        let path = modules_dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The module names of a `softdep=` value (`pre: a b post: c`), both kinds.
fn softdep_names(value: &str) -> impl Iterator<Item = String> + '_ {
    value
        .split_whitespace()
        .filter(|w| *w != "pre:" && *w != "post:")
        .map(normalise_name)
}

/// An error naming `module` and the first module its `depends=` names that `by_name` lacks.
fn check_depends(module: &Module, by_name: &BTreeMap<&str, &Module>) -> Result<()> {
    if let Some(dep) = module
        .info
        .depends
        .iter()
        .find(|dep| !by_name.contains_key(dep.as_str()))
    {
        bail!(
            "module `{}` ({}) depends on `{dep}`, which is not among the modules",
            module.name,
            module.path
        );
    }
    Ok(())
}

/// The modules of `all` an image ships: `roots` and, transitively, every module they depend on
/// (`depends=`) or name as a soft dependency (`pre:` and `post:`), so that `modules.dep` of the
/// result is complete. A root or soft dependency that is not among `all` (built in, or not in
/// this kernel) is skipped: the caller decides which roots must exist. A `depends=` naming a
/// module that is not among `all` is an error, as in [`dep_table`].
pub fn ship_closure<'a>(
    all: &'a [Module],
    roots: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<&'a Module>> {
    let by_name: BTreeMap<&str, &Module> = all.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut shipped = BTreeSet::new();
    let mut todo: Vec<String> = roots.into_iter().map(normalise_name).collect();
    while let Some(name) = todo.pop() {
        let Some(module) = by_name.get(name.as_str()) else {
            continue;
        };
        if !shipped.insert(module.name.as_str()) {
            continue;
        }
        check_depends(module, &by_name)?;
        todo.extend(module.info.depends.iter().cloned());
        for softdep in &module.info.softdeps {
            todo.extend(softdep_names(softdep));
        }
    }
    Ok(all
        .iter()
        .filter(|m| shipped.contains(m.name.as_str()))
        .collect())
}

/// The modules of one kernel as `modules.dep`, `modules.builtin` and `modules.softdep` describe them.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    /// Name → (path, every dependency as listed in `modules.dep`).
    modules: BTreeMap<String, (PathBuf, Vec<String>)>,
    builtin: BTreeSet<String>,
    /// Name → modules to load before it (`pre:` soft dependencies).
    pre_softdeps: BTreeMap<String, Vec<String>>,
}

/// Reads the kernel's module tables from a modules directory (`…/lib/modules/<version>`).
pub fn load(modules_dir: &Path) -> Result<ModuleIndex> {
    ModuleIndex::load(modules_dir)
}

impl ModuleIndex {
    /// Reads `modules.dep` (required), `modules.builtin` and `modules.softdep` (if present).
    pub fn load(modules_dir: &Path) -> Result<ModuleIndex> {
        let read = |file: &str, required: bool| -> Result<String> {
            let path = modules_dir.join(file);
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(text),
                Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                    Ok(String::new())
                }
                Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
            }
        };
        ModuleIndex::parse(
            &read("modules.dep", true)?,
            &read("modules.builtin", false)?,
            &read("modules.softdep", false)?,
        )
        .with_context(|| format!("reading module tables in {}", modules_dir.display()))
    }

    /// Parses the text of `modules.dep`, `modules.builtin` and `modules.softdep`.
    pub fn parse(dep: &str, builtin: &str, softdep: &str) -> Result<ModuleIndex> {
        let mut index = ModuleIndex::default();
        for (number, line) in dep.lines().enumerate() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (path, deps) = line.split_once(':').with_context(|| {
                format!("modules.dep line {}: expected `PATH: DEPS`", number + 1)
            })?;
            let deps = deps.split_whitespace().map(name_from_path).collect();
            index
                .modules
                .insert(name_from_path(path), (PathBuf::from(path), deps));
        }
        index.builtin = builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(name_from_path)
            .collect();
        for line in softdep.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(name) = words.next() else {
                continue;
            };
            let mut pre = false;
            for word in words {
                match word {
                    "pre:" => pre = true,
                    "post:" => pre = false,
                    dep if pre => index
                        .pre_softdeps
                        .entry(normalise_name(name))
                        .or_default()
                        .push(normalise_name(dep)),
                    _ => {}
                }
            }
        }
        Ok(index)
    }

    /// Whether the module is compiled into the kernel (listed in `modules.builtin`).
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalise_name(name))
    }

    /// Whether a loadable module of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.modules.contains_key(&normalise_name(name))
    }

    /// Path (relative to the modules directory) of a loadable module.
    pub fn path(&self, name: &str) -> Option<&Path> {
        self.modules
            .get(&normalise_name(name))
            .map(|(p, _)| p.as_path())
    }

    /// Every loadable module the named ones need, in load order (dependencies first), each once:
    /// `(name, path relative to the modules directory)`. Built-in modules are skipped; `pre:` soft
    /// dependencies that exist are loaded first. An unknown name is an error.
    pub fn closure(&self, names: &[&str]) -> Result<Vec<(String, PathBuf)>> {
        let mut roots = Vec::new();
        for name in names {
            let name = normalise_name(name);
            if self.modules.contains_key(&name) {
                roots.push(name);
            } else if !self.builtin.contains(&name) {
                bail!(
                    "kernel module `{name}` is neither a loadable module (modules.dep) nor built in (modules.builtin)"
                );
            }
        }
        let deps = |name: &str| -> Result<Vec<String>> {
            let (_, deps) = self
                .modules
                .get(name)
                .with_context(|| format!("modules.dep names `{name}` but has no line for it"))?;
            let mut out: Vec<String> = self
                .pre_softdeps
                .get(name)
                .into_iter()
                .flatten()
                .filter(|d| self.modules.contains_key(d.as_str()))
                .cloned()
                .collect();
            // modules.dep lists the modules to load first last.
            out.extend(deps.iter().rev().cloned());
            Ok(out)
        };
        let order = load_order(roots.iter().map(String::as_str), &deps)?;
        Ok(order
            .into_iter()
            .map(|name| {
                let path = self.modules[&name].0.clone();
                (name, path)
            })
            .collect())
    }
}

/// A minimal ELF64 relocatable object whose only content is a `.modinfo` section.
#[cfg(test)]
pub(crate) fn fake_module(modinfo: &[&str]) -> Vec<u8> {
    let mut info = Vec::new();
    for item in modinfo {
        info.extend_from_slice(item.as_bytes());
        info.push(0);
    }
    let names = b"\0.modinfo\0.shstrtab\0";
    let info_at = 64u64;
    let names_at = info_at + info.len() as u64;
    let shoff = (names_at + names.len() as u64).div_ceil(8) * 8;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&1u16.to_le_bytes()); // ET_REL
    elf.extend_from_slice(&62u16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&0u64.to_le_bytes()); // entry
    elf.extend_from_slice(&0u64.to_le_bytes()); // phoff
    elf.extend_from_slice(&shoff.to_le_bytes());
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    for half in [64u16, 0, 0, 64, 3, 2] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&info);
    elf.extend_from_slice(names);
    elf.resize(usize::try_from(shoff).unwrap_or(0), 0);
    let section = |elf: &mut Vec<u8>, name: u32, kind: u32, offset: u64, size: u64| {
        elf.extend_from_slice(&name.to_le_bytes());
        elf.extend_from_slice(&kind.to_le_bytes());
        for field in [0u64, 0, offset, size] {
            elf.extend_from_slice(&field.to_le_bytes());
        }
        elf.extend_from_slice(&0u32.to_le_bytes());
        elf.extend_from_slice(&0u32.to_le_bytes());
        elf.extend_from_slice(&1u64.to_le_bytes());
        elf.extend_from_slice(&0u64.to_le_bytes());
    };
    section(&mut elf, 0, 0, 0, 0);
    section(&mut elf, 1, 1, info_at, info.len() as u64);
    section(&mut elf, 10, 3, names_at, names.len() as u64);
    elf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_modules_and_writes_tables() {
        let dir = tempfile::tempdir().expect("tempdir");
        let modules = [
            (
                "kernel/drivers/virtio/virtio.ko",
                vec!["name=virtio", "depends="],
            ),
            (
                "kernel/drivers/virtio/virtio_ring.ko",
                vec!["depends=virtio", "name=virtio_ring"],
            ),
            (
                "kernel/drivers/block/virtio_blk.ko",
                vec![
                    "alias=virtio:d00000002v*",
                    "depends=virtio_ring,virtio",
                    "name=virtio_blk",
                ],
            ),
            (
                "kernel/drivers/md/dm-verity.ko",
                vec!["softdep=pre: virtio", "depends=dm-mod"],
            ),
            ("kernel/drivers/md/dm-mod.ko", vec!["depends="]),
        ];
        for (path, info) in &modules {
            let full = dir.path().join(path);
            std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
            std::fs::write(&full, fake_module(info)).expect("write module");
        }
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/fs/ext4/ext4.ko\n",
        )
        .expect("builtin");
        assert_eq!(write_tables(dir.path()).expect("tables"), 5);
        let dep = std::fs::read_to_string(dir.path().join("modules.dep")).expect("dep");
        assert!(
            dep.contains(
                "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n"
            ),
            "{dep}"
        );
        assert!(
            dep.contains("kernel/drivers/md/dm-verity.ko: kernel/drivers/md/dm-mod.ko\n"),
            "{dep}"
        );
        let alias = std::fs::read_to_string(dir.path().join("modules.alias")).expect("alias");
        assert!(
            alias.contains("alias virtio:d00000002v* virtio_blk\n"),
            "{alias}"
        );
        let softdep = std::fs::read_to_string(dir.path().join("modules.softdep")).expect("softdep");
        assert!(
            softdep.contains("softdep dm_verity pre: virtio\n"),
            "{softdep}"
        );

        let index = load(dir.path()).expect("index");
        let order: Vec<(String, PathBuf)> = index
            .closure(&["dm-verity", "virtio_blk", "ext4"])
            .expect("closure");
        let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            vec!["virtio", "dm_mod", "dm_verity", "virtio_ring", "virtio_blk"]
        );
        assert_eq!(order[1].1, PathBuf::from("kernel/drivers/md/dm-mod.ko"));
        assert!(index.is_builtin("ext4"));

        // A compressed module is read through its compression.
        let zst = zstd::stream::encode_all(&fake_module(&["name=zmod", "depends=virtio"])[..], 1)
            .expect("zstd");
        std::fs::write(dir.path().join("kernel/zmod.ko.zst"), zst).expect("write");
        assert_eq!(write_tables(dir.path()).expect("tables"), 6);
        let dep = std::fs::read_to_string(dir.path().join("modules.dep")).expect("dep");
        assert!(
            dep.contains("kernel/zmod.ko.zst: kernel/drivers/virtio/virtio.ko\n"),
            "{dep}"
        );

        std::fs::write(dir.path().join("kernel/bad.ko"), b"not an ELF").expect("write");
        assert!(write_tables(dir.path()).is_err());
    }

    fn module(name: &str, path: &str, depends: &[&str], aliases: &[&str]) -> Module {
        Module {
            name: name.into(),
            path: path.into(),
            info: ModInfo {
                name: Some(name.into()),
                depends: depends.iter().map(|d| d.to_string()).collect(),
                aliases: aliases.iter().map(|a| a.to_string()).collect(),
                softdeps: Vec::new(),
            },
        }
    }

    #[test]
    fn parses_modinfo_strings() {
        let section = b"alias=pci:v00001AF4d00001001sv*sd*bc*sc*i*\0depends=virtio,virtio-ring\0\
retpoline=Y\0intree=Y\0name=virtio_blk\0vermagic=6.1.0 SMP mod_unload\0softdep=pre: crc32c\0\0\0";
        let info = parse_modinfo(section);
        assert_eq!(info.name.as_deref(), Some("virtio_blk"));
        assert_eq!(info.depends, vec!["virtio", "virtio_ring"]);
        assert_eq!(info.aliases, vec!["pci:v00001AF4d00001001sv*sd*bc*sc*i*"]);
        assert_eq!(info.softdeps, vec!["pre: crc32c"]);
        assert_eq!(parse_modinfo(b"depends=\0").depends, Vec::<String>::new());
    }

    #[test]
    fn names_from_paths() {
        assert_eq!(
            name_from_path("kernel/drivers/md/dm-verity.ko"),
            "dm_verity"
        );
        assert_eq!(name_from_path("kernel/fs/ext4/ext4.ko.xz"), "ext4");
        assert_eq!(name_from_path("virtio_blk.ko"), "virtio_blk");
    }

    fn sample() -> Vec<Module> {
        vec![
            module(
                "bridge",
                "kernel/net/bridge/bridge.ko",
                &["stp", "llc"],
                &[],
            ),
            module(
                "br_netfilter",
                "kernel/net/bridge/br_netfilter.ko",
                &["bridge"],
                &[],
            ),
            module("llc", "kernel/net/llc/llc.ko", &[], &[]),
            module("stp", "kernel/net/802/stp.ko", &["llc"], &[]),
            module(
                "virtio_blk",
                "kernel/drivers/block/virtio_blk.ko",
                &[],
                &["virtio:d00000002v*"],
            ),
        ]
    }

    #[test]
    fn dep_table_lists_transitive_deps_load_last_first() {
        let text = dep_table(&sample()).expect("table");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko"
        );
        assert_eq!(
            lines[1],
            "kernel/net/bridge/br_netfilter.ko: kernel/net/bridge/bridge.ko kernel/net/802/stp.ko kernel/net/llc/llc.ko"
        );
        assert_eq!(lines[2], "kernel/net/llc/llc.ko:");
        assert_eq!(
            alias_table(&sample()).lines().nth(1),
            Some("alias virtio:d00000002v* virtio_blk")
        );
    }

    #[test]
    fn dep_table_refuses_unknown_and_cyclic_dependencies() {
        let mut modules = sample();
        modules.push(module("a", "a.ko", &["missing"], &[]));
        let err = dep_table(&modules).expect_err("unknown dep").to_string();
        assert!(err.contains("`missing`"), "{err}");
        let cyclic = vec![
            module("a", "a.ko", &["b"], &[]),
            module("b", "b.ko", &["a"], &[]),
        ];
        let err = dep_table(&cyclic).expect_err("cycle").to_string();
        assert!(err.contains("cycle"), "{err}");
    }

    #[test]
    fn ship_closure_follows_depends_and_softdeps() {
        let mut modules = sample();
        let mut dm_verity = module(
            "dm_verity",
            "kernel/drivers/md/dm-verity.ko",
            &["dm_mod"],
            &[],
        );
        dm_verity.info.softdeps = vec!["pre: crc32c_generic post: virtio_blk".into()];
        modules.push(dm_verity);
        modules.push(module("dm_mod", "kernel/drivers/md/dm-mod.ko", &[], &[]));
        modules.push(module("xfs", "kernel/fs/xfs/xfs.ko", &[], &[]));
        let names = |roots: &[&str]| -> Vec<String> {
            ship_closure(&modules, roots.iter().copied())
                .expect("closure")
                .into_iter()
                .map(|m| m.name.clone())
                .collect()
        };
        // Built-in or absent roots and soft dependencies are skipped; post: ones ship too.
        assert_eq!(
            names(&["dm-verity", "ext4"]),
            vec!["virtio_blk", "dm_verity", "dm_mod"]
        );
        assert_eq!(
            names(&["br_netfilter"]),
            vec!["bridge", "br_netfilter", "llc", "stp"]
        );
        assert_eq!(names(&[]), Vec::<String>::new());
        // The shipped set's modules.dep is complete, so dep_table of it cannot fail.
        let shipped: Vec<Module> = ship_closure(&modules, ["br_netfilter", "dm_verity"])
            .expect("closure")
            .into_iter()
            .cloned()
            .collect();
        assert!(!shipped.iter().any(|m| m.name == "xfs"));
        dep_table(&shipped).expect("complete table");
        modules.push(module("broken", "broken.ko", &["missing"], &[]));
        let err = ship_closure(&modules, ["broken"])
            .expect_err("missing dependency")
            .to_string();
        assert!(err.contains("`missing`"), "{err}");
    }

    #[test]
    fn closure_in_load_order_through_generated_table() {
        let dep = dep_table(&sample()).expect("table");
        let index = ModuleIndex::parse(
            &dep,
            "kernel/fs/ext4/ext4.ko\nkernel/drivers/md/dm-mod.ko\n",
            "softdep virtio_blk pre: llc\n",
        )
        .expect("index");
        let order: Vec<String> = index
            .closure(&["br-netfilter", "ext4", "virtio_blk", "stp"])
            .expect("closure")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            order,
            vec!["llc", "stp", "bridge", "br_netfilter", "virtio_blk"]
        );
        assert!(index.is_builtin("dm-mod"));
        assert!(!index.is_builtin("bridge"));
        assert_eq!(
            index.path("virtio-blk"),
            Some(Path::new("kernel/drivers/block/virtio_blk.ko"))
        );
        let err = index.closure(&["nosuch"]).expect_err("unknown").to_string();
        assert!(err.contains("`nosuch`"), "{err}");
    }
}
