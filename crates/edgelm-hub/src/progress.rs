//! Progress reporting: an indicatif bar when stderr is a terminal, short
//! log lines otherwise (so CI logs and pipes stay readable).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How much a [`crate::Hub`] tells the user on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verbosity {
    /// Bars on a terminal, log lines otherwise.
    #[default]
    Auto,
    /// Log lines only, never bars.
    Plain,
    /// Nothing (errors are still returned).
    Quiet,
}

pub(crate) struct Reporter {
    verbosity: Verbosity,
    bar: Option<ProgressBar>,
}

impl Reporter {
    pub(crate) fn new(verbosity: Verbosity) -> Self {
        Reporter {
            verbosity,
            bar: None,
        }
    }

    fn use_bar(&self) -> bool {
        self.verbosity == Verbosity::Auto && std::io::stderr().is_terminal()
    }

    /// A log line; printed above the bar if one is showing.
    pub(crate) fn log(&self, msg: &str) {
        match (&self.bar, self.verbosity) {
            (_, Verbosity::Quiet) => {}
            (Some(bar), _) => bar.println(format!("edgelm: {msg}")),
            (None, _) => eprintln!("edgelm: {msg}"),
        }
    }

    /// Start a byte-counting bar of `total` bytes (no-op without a terminal).
    pub(crate) fn start(&mut self, total: u64, msg: &str) {
        if !self.use_bar() {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{msg:8} [{wide_bar:.cyan/blue}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(msg.to_string());
        // Keeps the bar alive while pip runs and no bytes move.
        bar.enable_steady_tick(Duration::from_millis(200));
        self.bar = Some(bar);
    }

    /// Update the bar's (short) label, or log the long form when there is
    /// no bar; long labels would wrap the bar on narrow terminals.
    pub(crate) fn stage(&self, short: &str, long: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(short.to_string()),
            None => self.log(long),
        }
    }

    pub(crate) fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    pub(crate) fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        // On an error path the bar must not linger over the error message.
        self.finish();
    }
}

/// Human-readable byte count for log lines.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
