//! Progress reporting: a step line with its duration on every terminal or log, and byte progress
//! bars on a terminal (plain percentage lines otherwise).

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// A named build step; prints `==> name` when started and `    done in 1.2s` when finished.
#[derive(Debug)]
pub struct Step {
    name: String,
    started: Instant,
}

impl Step {
    pub fn start(name: impl Into<String>) -> Step {
        let name = name.into();
        eprintln!("==> {name}");
        Step {
            name,
            started: Instant::now(),
        }
    }

    /// Ends the step, printing how long it took, with an optional detail.
    pub fn done(self, detail: &str) {
        let secs = self.started.elapsed().as_secs_f64();
        if detail.is_empty() {
            eprintln!("    {} done in {secs:.1}s", self.name);
        } else {
            eprintln!("    {} done in {secs:.1}s ({detail})", self.name);
        }
    }
}

/// A byte counter shown as a bar on a terminal and as occasional plain lines otherwise.
#[derive(Debug)]
pub struct Bytes {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    done: u64,
    last_percent: u64,
}

impl Bytes {
    pub fn new(label: impl Into<String>, total: u64) -> Bytes {
        let label = label.into();
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "    {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(label.clone());
            bar
        });
        Bytes {
            bar,
            label,
            total,
            done: 0,
            last_percent: 0,
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        match &self.bar {
            Some(bar) => bar.inc(n),
            None => {
                let percent = (self.done * 100).checked_div(self.total).unwrap_or(100);
                if percent >= self.last_percent + 25 {
                    self.last_percent = percent - percent % 25;
                    eprintln!("    {}: {}%", self.label, self.last_percent);
                }
            }
        }
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
