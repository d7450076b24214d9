//! `plinth inspect`: describes a disk image: its partitions, each slot's version and root hash
//! (from the boot entries on the ESP) and whether the slot's partition UUIDs match that hash, and
//! the boot entries with their boot-counting state. Reads only; never writes to the image.

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};
use os_config::boot::{Entry, EntryName, ENTRIES_DIR};
use os_config::layout::{self, Slot};
use serde::Serialize;

use crate::disk::esp::EspReader;
use os_config::gpt::Partition;

use crate::disk::gpt::read_gpt;
use crate::disk::slice::{ReadOnly, Slice};
use crate::disk::{human, verity};
use crate::size_report::SizeReport;

/// Everything `inspect` reports.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub disk_guid: String,
    /// The partition table was read from the backup GPT because the primary one is damaged.
    pub gpt_from_backup: bool,
    pub size: u64,
    pub partitions: Vec<PartitionInfo>,
    pub slots: Vec<SlotInfo>,
    pub entries: Vec<EntryInfo>,
    /// Size by component, from `plinth build`'s `<image>.size-report.json` beside the disk when
    /// its root hash is one of the slots' (a report of another build is not shown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_report: Option<SizeReport>,
}

/// One GPT partition.
#[derive(Debug, Serialize)]
pub struct PartitionInfo {
    pub number: u32,
    pub label: String,
    pub type_guid: String,
    /// What the type GUID means in the Plinth layout (`esp`, `root`, `root-verity`, `var`).
    pub type_name: &'static str,
    pub start: u64,
    pub size: u64,
    pub uuid: String,
}

/// One root slot.
#[derive(Debug, Serialize)]
pub struct SlotInfo {
    pub slot: &'static str,
    /// File name of the slot's boot entry, if it has one.
    pub entry: Option<String>,
    pub version: Option<String>,
    pub root_hash: Option<String>,
    /// Whether root-X and verity-X carry the UUIDs the root hash gives them (DPS).
    pub uuids_match: Option<bool>,
    /// Data blocks recorded in the slot's verity superblock, if it has one.
    pub verity_data_blocks: Option<u64>,
    /// With `--verify`: `intact`, or what does not match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verity_check: Option<String>,
}

/// One boot entry on the ESP.
#[derive(Debug, Serialize)]
pub struct EntryInfo {
    pub file: String,
    pub slot: Option<&'static str>,
    pub version: Option<String>,
    /// `good`, `trying N/3`, `bad`, or `foreign` for entries Plinth did not write.
    pub state: String,
    pub options: Option<String>,
}

/// How `plinth inspect` reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Print JSON for scripts instead of a table.
    pub json: bool,
    /// Also check every slot's root against its dm-verity tree and root hash.
    pub verify: bool,
}

/// Runs `plinth inspect`.
pub fn inspect(disk: &Path, options: Options) -> Result<()> {
    let mut info = inspect_disk(disk)?;
    if options.verify {
        verify_slots(disk, &mut info)?;
    }
    if options.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&info).context("formatting JSON")?
        );
    } else {
        print!("{}", format_text(&info));
    }
    check_verdicts(&info)
}

/// Runs `plinth verify`: checks every slot that has a boot entry against its verity tree and
/// root hash, prints one line per slot, and fails naming the first changed block of any slot
/// that does not match (or when no slot has a boot entry to check).
pub fn verify(disk: &Path) -> Result<()> {
    let mut info = inspect_disk(disk)?;
    verify_slots(disk, &mut info)?;
    let mut checked = 0;
    for slot in &info.slots {
        match (&slot.verity_check, &slot.root_hash) {
            (Some(check), Some(hash)) => {
                checked += 1;
                println!("slot {}: root hash {hash}: {check}", slot.slot);
            }
            _ => println!("slot {}: empty (no boot entry)", slot.slot),
        }
    }
    if checked == 0 {
        bail!(
            "{} has no boot entry for any slot: nothing to verify",
            disk.display()
        );
    }
    check_verdicts(&info)
}

/// Fails with every slot whose verity check is not `intact`.
fn check_verdicts(info: &Inspection) -> Result<()> {
    let failed: Vec<String> = info
        .slots
        .iter()
        .filter_map(|s| {
            s.verity_check
                .as_ref()
                .filter(|c| *c != "intact")
                .map(|c| format!("slot {}: {c}", s.slot))
        })
        .collect();
    if !failed.is_empty() {
        bail!("verification failed: {}", failed.join("; "));
    }
    Ok(())
}

/// Checks each slot that has a boot entry against its verity tree and root hash. A slot whose
/// partitions or superblock are damaged gets a verdict saying what is wrong (so the report names
/// it and [`check_verdicts`] fails), never `intact`.
pub fn verify_slots(path: &Path, info: &mut Inspection) -> Result<()> {
    for slot in &mut info.slots {
        let Some(root_hash) = slot.root_hash.clone() else {
            continue;
        };
        let slot_enum = Slot::parse(slot.slot).context("slot letter")?;
        slot.verity_check = Some(
            match verify_slot(path, &info.partitions, slot_enum, &root_hash) {
                Ok(verdict) => verdict,
                Err(e) => format!("damaged: {e:#}"),
            },
        );
    }
    Ok(())
}

/// The verdict on one slot: its superblock is bounded by the partitions before anything is
/// read by the block count it claims.
fn verify_slot(
    path: &Path,
    partitions: &[PartitionInfo],
    slot: Slot,
    root_hash: &str,
) -> Result<String> {
    use std::io::Read;
    let part = |label: &str| {
        partitions
            .iter()
            .find(|p| p.label == label)
            .with_context(|| format!("{} has no partition {label}", path.display()))
    };
    let (root, verity) = (part(slot.root_label())?, part(slot.verity_label())?);
    let open = || File::open(path).with_context(|| format!("opening {}", path.display()));
    let mut block = vec![0u8; os_config::layout::VeritySuperblock::SIZE];
    Slice::new(open()?, verity.start, verity.size)
        .read_exact(&mut block)
        .with_context(|| format!("reading the verity superblock of {}", verity.label))?;
    let sb = verity::read_superblock(&block)
        .with_context(|| format!("reading the verity superblock of {}", verity.label))?;
    let tree_len = sb
        .check_fits(&root.label, root.size, &verity.label, verity.size)
        .map_err(anyhow::Error::msg)?;
    let mut hash_device = Vec::new();
    Slice::new(open()?, verity.start, tree_len)
        .read_to_end(&mut hash_device)
        .with_context(|| format!("reading {}", verity.label))?;
    let mut data = std::io::BufReader::with_capacity(
        1 << 20,
        Slice::new(open()?, root.start, sb.data_bytes()),
    );
    let verdict = verity::verify(&mut data, &hash_device, root_hash)
        .with_context(|| format!("verifying slot {slot}"))?;
    Ok(verdict.describe(&root.label, root_hash))
}

fn type_name(guid: &str) -> &'static str {
    match guid {
        layout::TYPE_ESP => "esp",
        layout::TYPE_ROOT_X86_64 => "root",
        layout::TYPE_ROOT_VERITY_X86_64 => "root-verity",
        layout::TYPE_VAR => "var",
        _ => "other",
    }
}

/// Reads a raw disk image and describes it.
pub fn inspect_disk(path: &Path) -> Result<Inspection> {
    let open = || File::open(path).with_context(|| format!("opening {}", path.display()));
    let size = open()?
        .metadata()
        .with_context(|| format!("reading size of {}", path.display()))?
        .len();
    let table = read_gpt(ReadOnly(open()?)).with_context(|| {
        format!(
            "reading the partition table of {} (a raw disk image?)",
            path.display()
        )
    })?;
    let parts = &table.partitions;
    let find = |label: &str| table.by_label(label);
    let Some(esp) = find(layout::ESP) else {
        bail!(
            "{} has no partition labelled `esp`: not a Plinth disk",
            path.display()
        );
    };

    let reader = EspReader::open(Slice::new(ReadOnly(open()?), esp.start, esp.size))?;
    let mut entries = Vec::new();
    let mut parsed: Vec<(EntryName, Entry)> = Vec::new();
    let has_entries = reader.list("/")?.iter().any(|n| n == "loader")
        && reader.list("/loader")?.iter().any(|n| n == "entries");
    let files = if has_entries {
        reader.list(ENTRIES_DIR)?
    } else {
        Vec::new()
    };
    for file in files {
        let name = EntryName::parse(&file);
        let text =
            String::from_utf8_lossy(&reader.read(&format!("{ENTRIES_DIR}/{file}"))?).into_owned();
        let entry = Entry::parse(&text).ok();
        entries.push(EntryInfo {
            file: file.clone(),
            slot: name.as_ref().map(|n| n.slot.as_str()),
            version: name.as_ref().map(|n| n.version.clone()),
            state: name
                .as_ref()
                .map_or("foreign".to_owned(), |n| n.state().to_string()),
            options: entry.as_ref().map(Entry::options),
        });
        if let (Some(name), Some(entry)) = (name, entry) {
            parsed.push((name, entry));
        }
    }

    let mut slots = Vec::new();
    for slot in Slot::ALL {
        let found = parsed.iter().find(|(name, _)| name.slot == slot);
        let root_hash = found.map(|(_, e)| e.root_hash.clone());
        let uuids_match = root_hash.as_deref().map(|hash| {
            let want = layout::slot_uuids(hash);
            let have = |label: &str| find(label).map(|p: &Partition| p.uuid.to_string());
            want.is_some_and(|(root, verity)| {
                have(slot.root_label()) == Some(root) && have(slot.verity_label()) == Some(verity)
            })
        });
        let verity_data_blocks = match find(slot.verity_label()) {
            Some(part) => read_superblock(open()?, part).ok().map(|sb| sb.data_blocks),
            None => None,
        };
        slots.push(SlotInfo {
            slot: slot.as_str(),
            entry: found.map(|(n, _)| n.file_name()),
            version: found.map(|(n, _)| n.version.clone()),
            root_hash,
            uuids_match,
            verity_data_blocks,
            verity_check: None,
        });
    }

    Ok(Inspection {
        disk_guid: table.disk_guid.to_string(),
        gpt_from_backup: table.from_backup,
        size,
        partitions: parts
            .iter()
            .map(|p| {
                let type_guid = p.type_guid.to_string();
                PartitionInfo {
                    number: p.number,
                    label: p.label.clone(),
                    type_name: type_name(&type_guid),
                    type_guid,
                    start: p.start,
                    size: p.size,
                    uuid: p.uuid.to_string(),
                }
            })
            .collect(),
        size_report: SizeReport::read_beside(path)?.filter(|report| {
            slots
                .iter()
                .any(|s| s.root_hash.as_deref() == Some(report.root_hash.as_str()))
        }),
        slots,
        entries,
    })
}

fn read_superblock(
    mut file: File,
    part: &Partition,
) -> Result<os_config::layout::VeritySuperblock> {
    use std::io::{Read, Seek, SeekFrom};
    let mut block = vec![0u8; 512];
    file.seek(SeekFrom::Start(part.start))?;
    file.read_exact(&mut block)?;
    verity::read_superblock(&block)
}

/// The human-readable report.
pub fn format_text(info: &Inspection) -> String {
    let mut out = format!("disk {} ({})\n", info.disk_guid, human(info.size));
    if info.gpt_from_backup {
        out.push_str("the primary GPT is damaged: partitions read from the backup GPT\n");
    }
    out.push_str("\npartitions:\n");
    out.push_str(&format!(
        "  {:<3} {:<9} {:<12} {:>10} {:>10}  {}\n",
        "#", "label", "type", "start", "size", "uuid"
    ));
    for p in &info.partitions {
        out.push_str(&format!(
            "  {:<3} {:<9} {:<12} {:>10} {:>10}  {}\n",
            p.number,
            p.label,
            p.type_name,
            human(p.start),
            human(p.size),
            p.uuid
        ));
    }
    out.push_str("\nslots:\n");
    for s in &info.slots {
        match (&s.version, &s.root_hash) {
            (Some(version), Some(hash)) => out.push_str(&format!(
                "  {}: version {version}, root hash {hash}, partition UUIDs {}\n",
                s.slot,
                if s.uuids_match == Some(true) {
                    "match"
                } else {
                    "DO NOT MATCH"
                }
            )),
            _ => out.push_str(&format!("  {}: empty (no boot entry)\n", s.slot)),
        }
        if let Some(check) = &s.verity_check {
            out.push_str(&format!("     verity: {check}\n"));
        }
    }
    out.push_str("\nboot entries:\n");
    if info.entries.is_empty() {
        out.push_str("  none\n");
    }
    for e in &info.entries {
        out.push_str(&format!("  {}: {}\n", e.file, e.state));
    }
    if let Some(report) = &info.size_report {
        out.push_str(&format!(
            "\nsize by component (root hash {}):\n",
            report.root_hash
        ));
        out.push_str(&report.format_text());
    }
    out
}
