//! The figures and their statistics: runs of ours and of the baseline with the machine's load
//! before each, median and spread, the run order, growth per doubling, and the Markdown table.

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// Which of the two a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Ours,
    Baseline,
}

/// The order figures with a baseline are measured in: ours, baseline, ours, baseline, …, so a
/// change in the machine's load falls on both alike. Each entry is (run index, side).
pub fn interleaved(runs: usize) -> Vec<(usize, Side)> {
    (0..runs)
        .flat_map(|i| [(i, Side::Ours), (i, Side::Baseline)])
        .collect()
}

/// The 1-minute load average from `/proc/loadavg` text (its first field).
pub fn parse_loadavg(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// The machine's 1-minute load average now (NaN when `/proc/loadavg` cannot be read).
pub fn load_now() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| parse_loadavg(&t))
        .unwrap_or(f64::NAN)
}

/// One figure: ours and the baseline, each a list of runs with the load average before each.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub unit: &'static str,
    pub ours: Vec<f64>,
    pub ours_load: Vec<f64>,
    pub baseline_name: String,
    pub baseline: Vec<f64>,
    pub baseline_load: Vec<f64>,
}

impl Row {
    pub fn new(name: &str, unit: &'static str, baseline_name: &str) -> Row {
        Row {
            name: name.to_owned(),
            unit,
            ours: Vec::new(),
            ours_load: Vec::new(),
            baseline_name: baseline_name.to_owned(),
            baseline: Vec::new(),
            baseline_load: Vec::new(),
        }
    }

    /// Records one run of `side` that started at 1-minute load average `load`.
    pub fn push(&mut self, side: Side, value: f64, load: f64) {
        match side {
            Side::Ours => {
                self.ours.push(value);
                self.ours_load.push(load);
            }
            Side::Baseline => {
                self.baseline.push(value);
                self.baseline_load.push(load);
            }
        }
    }

    /// A figure measured once, with no run-to-run spread (a size).
    pub fn single(name: &str, unit: &'static str, baseline_name: &str, ours: f64) -> Row {
        let mut r = Row::new(name, unit, baseline_name);
        r.push(Side::Ours, ours, load_now());
        r
    }

    /// The load range over all the runs of this figure, both sides.
    pub fn load_range(&self) -> Option<(f64, f64)> {
        let all: Vec<f64> = self
            .ours_load
            .iter()
            .chain(&self.baseline_load)
            .copied()
            .filter(|x| x.is_finite())
            .collect();
        Some((min(&all)?, max(&all)?))
    }

    pub fn json(&self) -> Value {
        let side = |runs: &[f64], load: &[f64]| json!({ "runs": runs, "load1_before": load, "median": median(runs), "min": min(runs), "max": max(runs) });
        json!({
            "name": self.name,
            "unit": self.unit,
            "ours": side(&self.ours, &self.ours_load),
            "baseline_name": self.baseline_name,
            "baseline": side(&self.baseline, &self.baseline_load),
            "ratio": ratio(&self.ours, &self.baseline),
        })
    }

    /// Reads a row back from [`Row::json`]'s form.
    pub fn from_json(r: &Value) -> Row {
        let list = |x: &Value| -> Vec<f64> {
            x.as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default()
        };
        Row {
            name: r["name"].as_str().unwrap_or("").to_owned(),
            unit: unit_named(r["unit"].as_str().unwrap_or("")),
            ours: list(&r["ours"]["runs"]),
            ours_load: list(&r["ours"]["load1_before"]),
            baseline_name: r["baseline_name"].as_str().unwrap_or("").to_owned(),
            baseline: list(&r["baseline"]["runs"]),
            baseline_load: list(&r["baseline"]["load1_before"]),
        }
    }
}

/// The units the table knows how to show.
fn unit_named(name: &str) -> &'static str {
    match name {
        "s" => "s",
        "bytes" => "bytes",
        "KiB" => "KiB",
        "MB/s" => "MB/s",
        "x" => "x",
        _ => "",
    }
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

pub fn min(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::min)
}

pub fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

/// Median over median; `None` without both or with a zero baseline.
pub fn ratio(ours: &[f64], base: &[f64]) -> Option<f64> {
    match (median(ours), median(base)) {
        (Some(o), Some(b)) if b != 0.0 => Some(o / b),
        _ => None,
    }
}

/// Growth factor per doubling of the input over a series measured at inputs 1×, 2×, 4×, …:
/// the ratio of each step to the one before.
pub fn growth_per_doubling(series: &[f64]) -> Vec<f64> {
    series
        .windows(2)
        .map(|w| if w[0] == 0.0 { f64::NAN } else { w[1] / w[0] })
        .collect()
}

/// How a figure grows with its input, read from its growth factors against the input's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Growth {
    /// Grows less than the input at every step (a fixed part weighs in).
    Sublinear,
    /// Grows as the input does (within the tolerance) at every step.
    Linear,
    /// Grows more than the input at some step (beyond the tolerance).
    Superlinear,
}

/// Classifies a figure's growth factors against the input's growth factors step by step: each
/// quotient figure/input above `1 + tolerance` anywhere is superlinear, all within
/// `1 ± tolerance` linear, otherwise sublinear. `None` without steps or with a non-finite factor.
pub fn classify_growth(factors: &[f64], input: &[f64], tolerance: f64) -> Option<Growth> {
    if factors.is_empty() || factors.len() != input.len() {
        return None;
    }
    let q: Vec<f64> = factors.iter().zip(input).map(|(f, i)| f / i).collect();
    if q.iter().any(|x| !x.is_finite()) {
        return None;
    }
    if q.iter().any(|x| *x > 1.0 + tolerance) {
        Some(Growth::Superlinear)
    } else if q.iter().all(|x| (x - 1.0).abs() <= tolerance) {
        Some(Growth::Linear)
    } else {
        Some(Growth::Sublinear)
    }
}

/// Formats a figure in its unit, short enough for the table.
pub fn show(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "-".to_owned(),
        Some(v) if unit == "bytes" => {
            if v >= 1024.0 * 1024.0 {
                format!("{:.1} MiB", v / 1048576.0)
            } else {
                format!("{:.0} KiB", v / 1024.0)
            }
        }
        Some(v) if unit == "s" => format!("{v:.1} s"),
        Some(v) if unit == "KiB" => format!("{:.1} MiB", v / 1024.0),
        Some(v) if unit == "MB/s" => format!("{v:.1} MB/s"),
        Some(v) if unit == "x" => format!("{v:.2}×"),
        Some(v) => format!("{v:.1}"),
    }
}

/// Median and, with more than one run, `[min..max]`.
pub fn cell(v: &[f64], unit: &str) -> String {
    if v.len() > 1 {
        format!(
            "{} [{}..{}]",
            show(median(v), unit),
            show(min(v), unit),
            show(max(v), unit)
        )
    } else {
        show(median(v), unit)
    }
}

/// Renders the rows as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| Figure | Ours: median [min..max] | Baseline | Baseline: median [min..max] | Ours / baseline | Load (1 min) during its runs |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let load = r
            .load_range()
            .map_or("-".to_owned(), |(lo, hi)| format!("{lo:.2}..{hi:.2}"));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.name,
            cell(&r.ours, r.unit),
            r.baseline_name,
            cell(&r.baseline, r.unit),
            ratio(&r.ours, &r.baseline).map_or("-".to_owned(), |x| format!("{x:.2}")),
            load,
        ));
    }
    out
}

/// Reads the rows back from a `bench.json`.
pub fn rows_from_json(path: &std::path::Path) -> Result<Vec<Row>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let list = v["rows"]
        .as_array()
        .with_context(|| format!("no `rows` in {}", path.display()))?;
    Ok(list.iter().map(Row::from_json).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        for (runs, want) in [
            (vec![3.0, 1.0, 2.0], Some(2.0)),
            (vec![4.0, 1.0, 3.0, 2.0], Some(2.5)),
            (vec![7.0], Some(7.0)),
            (vec![], None),
        ] {
            assert_eq!(median(&runs), want, "median of {runs:?}");
        }
    }

    #[test]
    fn spread_is_min_and_max() {
        let runs = [5.0, 2.5, 9.0, 4.0];
        assert_eq!((min(&runs), max(&runs)), (Some(2.5), Some(9.0)));
        assert_eq!(cell(&runs, "s"), "4.5 s [2.5 s..9.0 s]");
        assert_eq!(cell(&[1.25], "s"), "1.2 s");
        assert_eq!(cell(&[], "s"), "-");
    }

    #[test]
    fn ratio_is_median_over_median() {
        assert_eq!(ratio(&[2.0, 4.0, 100.0], &[2.0, 2.0, 1.0]), Some(2.0));
        assert_eq!(ratio(&[1.0], &[]), None);
        assert_eq!(ratio(&[1.0], &[0.0]), None);
    }

    #[test]
    fn runs_alternate_ours_first() {
        assert_eq!(
            interleaved(3),
            vec![
                (0, Side::Ours),
                (0, Side::Baseline),
                (1, Side::Ours),
                (1, Side::Baseline),
                (2, Side::Ours),
                (2, Side::Baseline),
            ]
        );
        assert!(interleaved(0).is_empty());
    }

    #[test]
    fn rows_keep_the_load_of_each_run_and_its_range() {
        let mut r = Row::new("x", "s", "b");
        for ((i, side), load) in interleaved(2).into_iter().zip([1.5, 0.5, 3.0, f64::NAN]) {
            r.push(side, i as f64, load);
        }
        assert_eq!(r.ours, vec![0.0, 1.0]);
        assert_eq!(r.baseline, vec![0.0, 1.0]);
        assert_eq!(r.ours_load, vec![1.5, 3.0]);
        // An unreadable load (NaN) is left out of the range.
        assert_eq!(r.load_range(), Some((0.5, 3.0)));
        let back = Row::from_json(&r.json());
        assert_eq!(back.ours_load, r.ours_load);
        assert_eq!(back.baseline, r.baseline);
        assert_eq!(back.unit, "s");
        assert!(table(&[r]).contains("| 0.50..3.00 |"));
    }

    #[test]
    fn loadavg_first_field() {
        assert_eq!(parse_loadavg("0.86 1.06 1.48 2/88 3316\n"), Some(0.86));
        assert_eq!(parse_loadavg(""), None);
        assert_eq!(parse_loadavg("x 1 2"), None);
    }

    #[test]
    fn growth_factors_and_their_class() {
        let f = growth_per_doubling(&[10.0, 20.0, 40.0]);
        assert_eq!(f, vec![2.0, 2.0]);
        let doubling = [2.0, 2.0];
        assert_eq!(classify_growth(&f, &doubling, 0.15), Some(Growth::Linear));
        // Against an input that grew 1.8× then 2.2×, 1.9× and 2.1× is still linear.
        assert_eq!(
            classify_growth(&[1.9, 2.1], &[1.8, 2.2], 0.15),
            Some(Growth::Linear)
        );
        let f = growth_per_doubling(&[30.0, 36.0, 48.0]);
        assert_eq!(f, vec![1.2, 48.0 / 36.0]);
        assert_eq!(
            classify_growth(&f, &doubling, 0.15),
            Some(Growth::Sublinear)
        );
        let f = growth_per_doubling(&[10.0, 21.0, 60.0]);
        assert_eq!(
            classify_growth(&f, &doubling, 0.15),
            Some(Growth::Superlinear)
        );
        let f = growth_per_doubling(&[0.0, 1.0]);
        assert!(f[0].is_nan());
        assert_eq!(classify_growth(&f, &[2.0], 0.15), None);
        assert_eq!(classify_growth(&[], &[], 0.15), None);
        assert_eq!(classify_growth(&[2.0], &[2.0, 2.0], 0.15), None);
    }
}
