//! Figures: one `figure NAME sdk=V baseline=V ratio=V unit=U` line each on stdout, and
//! `bench/results.md` at the end.

use std::{fmt::Write as _, sync::Mutex};

/// One measured figure: the SDK's value and the baseline's, measured in the same run.
#[derive(Debug, Clone)]
pub struct Figure {
    /// The figure's name, as scripts read it.
    pub name: String,
    /// The SDK's value.
    pub sdk: f64,
    /// The baseline's value.
    pub baseline: f64,
    /// The unit of both values.
    pub unit: &'static str,
    /// What the baseline is, for the results table.
    pub baseline_is: String,
    /// The target, in words, and whether it was met; `None` when the figure has none.
    pub target: Option<(String, bool)>,
}

impl Figure {
    /// A figure with no target yet.
    pub fn new(name: impl Into<String>, sdk: f64, baseline: f64, unit: &'static str) -> Self {
        Figure { name: name.into(), sdk, baseline, unit, baseline_is: String::new(), target: None }
    }

    /// Says what the baseline is.
    pub fn baseline_is(mut self, what: impl Into<String>) -> Self {
        self.baseline_is = what.into();
        self
    }

    /// The target in words and whether it was met.
    pub fn target(mut self, what: impl Into<String>, met: bool) -> Self {
        self.target = Some((what.into(), met));
        self
    }

    /// sdk / baseline; `None` when the baseline is zero.
    pub fn ratio(&self) -> Option<f64> {
        (self.baseline != 0.0).then(|| self.sdk / self.baseline)
    }

    /// The `figure NAME sdk=V baseline=V ratio=V unit=U` line.
    pub fn line(&self) -> String {
        let ratio = self.ratio().map_or("n/a".to_owned(), |r| format!("{r:.3}"));
        format!(
            "figure {} sdk={} baseline={} ratio={ratio} unit={}",
            self.name,
            number(self.sdk),
            number(self.baseline),
            self.unit
        )
    }
}

/// A value with as many decimals as its size calls for.
pub fn number(value: f64) -> String {
    if value.is_nan() {
        "nan".into()
    } else if value.abs() >= 1000.0 || value == value.trunc() {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    }
}

static FIGURES: Mutex<Vec<Figure>> = Mutex::new(Vec::new());
static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Prints the figure's line at once and keeps it for the results file.
pub fn emit(figure: Figure) {
    println!("{}", figure.line());
    FIGURES.lock().expect("figures lock").push(figure);
}

/// A remark for the results file (a skipped part, an explanation of a number).
pub fn note(text: impl Into<String>) {
    let text = text.into();
    eprintln!("note: {text}");
    NOTES.lock().expect("notes lock").push(text);
}

/// Every figure emitted so far.
pub fn figures() -> Vec<Figure> {
    FIGURES.lock().expect("figures lock").clone()
}

/// The median of `values` (the lower middle one for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len().saturating_sub(1) / 2).copied().unwrap_or(f64::NAN)
}

/// The `q` quantile (0..=1) of already sorted `values`.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}

/// The machine, for the results file.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kb: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs (nproc), {:.1} GiB memory, {model}, Linux {}", memory_kb / 1048576.0, kernel.trim())
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// A bar of `ratio` on a scale where 1.0 is 20 characters, capped at 40.
fn bar(ratio: f64) -> String {
    let cells = (ratio * 20.0).round().clamp(0.0, 40.0) as usize;
    let mut bar: String = "#".repeat(cells);
    if cells < 40 {
        bar.push_str(&" ".repeat(40 - cells));
    }
    if ratio * 20.0 > 40.0 {
        bar.replace_range(39..40, ">")
    }
    bar
}

/// The whole results file: command, machine, a table, a plot of the ratios, notes.
pub fn results_markdown(command: &str, elapsed_secs: f64, explanations: &str) -> String {
    let figures = figures();
    let mut out = String::new();
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let rustc = command_output("rustc", &["-V"]);
    let _ = writeln!(out, "# Benchmark results\n");
    let _ = writeln!(
        out,
        "Written by `{command}` (what `make bench` runs, inside `scripts/netns-run`) on {date}, \
         in {elapsed_secs:.0} s.\n"
    );
    let _ = writeln!(out, "- machine: {}", machine());
    if !rustc.is_empty() {
        let _ = writeln!(out, "- toolchain: {rustc}, release profile");
    }
    let _ = writeln!(
        out,
        "- method: the SDK and its baseline alternate within this one process run; each value is \
         the median of its rounds. Only the ratios of one run mean anything: absolute throughput \
         moves by about 30% from run to run on these machines.\n"
    );
    let _ = writeln!(out, "## Figures\n");
    let _ = writeln!(out, "| figure | SDK | baseline | ratio | unit | baseline is | target | met |");
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | --- | --- | --- | --- |");
    for f in &figures {
        let ratio = f.ratio().map_or("n/a".to_owned(), |r| format!("{r:.3}"));
        let (target, met) = match &f.target {
            Some((what, true)) => (what.as_str(), "yes"),
            Some((what, false)) => (what.as_str(), "**no**"),
            None => ("", ""),
        };
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {ratio} | {} | {} | {target} | {met} |",
            f.name,
            number(f.sdk),
            number(f.baseline),
            f.unit,
            f.baseline_is
        );
    }
    let _ = writeln!(out, "\n## Ratios at a glance\n");
    let _ = writeln!(
        out,
        "SDK ÷ baseline; `|` marks 1.0. For latency, time and memory lower is better; for \
         `_throughput_` higher is better.\n"
    );
    let _ = writeln!(out, "```");
    let width = figures.iter().map(|f| f.name.len()).max().unwrap_or(10);
    for f in figures.iter().filter(|f| f.ratio().is_some()) {
        let ratio = f.ratio().unwrap_or(0.0);
        let mut drawn = bar(ratio);
        drawn.replace_range(20..21, "|");
        let _ = writeln!(out, "{:<width$} {drawn} {ratio:.3}", f.name);
    }
    let _ = writeln!(out, "```\n");
    let _ = writeln!(out, "Raw lines, as `make bench` prints them:\n");
    let _ = writeln!(out, "```");
    for f in &figures {
        let _ = writeln!(out, "{}", f.line());
    }
    let _ = writeln!(out, "```\n");
    let notes = NOTES.lock().expect("notes lock").clone();
    if !notes.is_empty() {
        let _ = writeln!(out, "## Notes from this run\n");
        for n in notes {
            let _ = writeln!(out, "- {n}");
        }
        let _ = writeln!(out);
    }
    out.push_str(explanations);
    out
}
