//! Helpers for gkvm's end-to-end benchmark runners: timing loops and the
//! ratio table they print. Benchmarks are not tests: nothing here asserts a
//! time; the runners print figures beside a bare-QEMU baseline measured in
//! the same run.
#![deny(missing_docs)]

use std::time::{Duration, Instant};

/// Median and spread of repeated timings.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// Median duration.
    pub median: Duration,
    /// 10th percentile.
    pub p10: Duration,
    /// 90th percentile.
    pub p90: Duration,
}

impl Stats {
    /// The median and spread of samples (at least one).
    pub fn of(mut samples: Vec<Duration>) -> Stats {
        if samples.is_empty() {
            samples.push(Duration::ZERO);
        }
        samples.sort_unstable();
        // Nearest-rank percentile: q in [0, 1] picks an index in range.
        let last = samples.len() - 1;
        let at = |percent: usize| samples[(last * percent + 50) / 100];
        Stats {
            median: at(50),
            p10: at(10),
            p90: at(90),
        }
    }
}

/// Times `f` `n` times (after `warmup` untimed runs).
pub fn measure(n: usize, warmup: usize, mut f: impl FnMut()) -> Stats {
    for _ in 0..warmup {
        f();
    }
    Stats::of(
        (0..n.max(1))
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

/// One row of a ratio table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// Its timings.
    pub stats: Stats,
    /// The baseline's median, when this row is compared to one.
    pub baseline: Option<Duration>,
    /// The goal for `median / baseline`, when there is one.
    pub goal: Option<f64>,
}

/// Prints rows as an aligned table with ratios and goals.
pub fn print_table(title: &str, rows: &[Row]) {
    println!("\n{title}");
    println!(
        "{:<44} {:>12} {:>12} {:>12} {:>8} {:>8}",
        "measurement", "median", "p10", "p90", "ratio", "goal"
    );
    for r in rows {
        let ratio = r
            .baseline
            .map(|b| format!("{:.2}x", r.stats.median.as_secs_f64() / b.as_secs_f64()))
            .unwrap_or_default();
        let goal = r.goal.map(|g| format!("<={g:.2}x")).unwrap_or_default();
        println!(
            "{:<44} {:>12} {:>12} {:>12} {:>8} {:>8}",
            r.name,
            fmt(r.stats.median),
            fmt(r.stats.p10),
            fmt(r.stats.p90),
            ratio,
            goal
        );
    }
}

/// A duration in a readable unit.
pub fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// Raw QMP, the baseline of the QMP rows: connects to `path`, reads the
/// greeting, then sends `qmp_capabilities` and each of `commands`, waiting
/// for each reply (events skipped). Panics on any I/O error.
pub fn raw_qmp(path: &std::path::Path, commands: &[&str]) {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(path).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    for c in std::iter::once("qmp_capabilities").chain(commands.iter().copied()) {
        w.write_all(format!("{{\"execute\":\"{c}\"}}\n").as_bytes())
            .unwrap();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if !line.contains("\"event\"") {
                break;
            }
        }
    }
}
