//! Progress on long runs.

use std::time::{Duration, Instant};

use crate::core::clock::format_time;
use crate::run::feeder::Feeder;

/// Progress on long runs: a line on stderr every few seconds when it is a
/// terminal, and a `tracing` event (`RUST_LOG=info`) otherwise.
pub struct Progress {
    started: Instant,
    last: Instant,
    terminal: bool,
    shown: bool,
}

impl Progress {
    pub fn new() -> Progress {
        use std::io::IsTerminal;
        Progress {
            started: Instant::now(),
            last: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            shown: false,
        }
    }

    /// Shows `extra` (e.g. Kafka lag) after the counters, every couple of seconds.
    pub fn tick(&mut self, feeder: &Feeder, tick: u64, extra: impl FnOnce() -> String) {
        if self.last.elapsed() < Duration::from_secs(2) {
            return;
        }
        self.last = Instant::now();
        let c = feeder.counters();
        let rate = c.read as f64 / self.started.elapsed().as_secs_f64();
        let clock = feeder.now().map(|t| format_time(t, tick < 1000)).unwrap_or_else(|| "-".into());
        let extra = extra();
        self.shown = true;
        if self.terminal {
            eprint!(
                "\rshoal: {} events, {:.0}/s, clock {clock}, {} bad, {} duplicates{extra}   ",
                c.read, rate, c.bad, c.duplicates
            );
        } else {
            tracing::info!(events = c.read, rate = rate as u64, clock = %clock, bad = c.bad, duplicates = c.duplicates, extra = %extra, "progress");
        }
    }

    pub(super) fn done(&self) {
        if self.terminal && self.shown {
            eprintln!();
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}
