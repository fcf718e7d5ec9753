//! Throughput of one windowed count at the same event rate with a 1h and a
//! 30d window. Retractions wait in the window operator's queue, not in
//! differential's input, so the long window must not be slower.
//!
//!     cargo run --release --example window_throughput [-- EVENTS [WORKERS]]
//!
//! Events: `view`s from 100k users at 100 events per second of event time,
//! so a run of 2M events spans 5.5 hours: the 1h window retracts all along,
//! the 30d window holds every event until the end.

use std::sync::Arc;
use std::time::Instant;

use shoal::io::source::Source;
use shoal::run::{run, Job, RunOptions};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map(|a| a.parse().expect("EVENTS is a number")).unwrap_or(2_000_000);
    let workers: usize = args.next().map(|a| a.parse().expect("WORKERS is a number")).unwrap_or(1);
    let data = Arc::new(shoal::generate::synthetic(n, 100_000, 100, &["view"]));
    println!("{n} events, {workers} worker(s), 100 events/s of event time");
    for window in ["1h", "30d"] {
        let text = format!("[[segment]]\nname = \"viewer\"\nwhen = \"count('view', {window}) >= 3\"\n");
        let spec = shoal::spec::parse_spec(&text, 1000).expect("spec checks");
        let sources = vec![Source::Bytes {
            name: "bench".into(),
            data: data.clone(),
        }];
        let job = Job::quiet(
            spec,
            RunOptions {
                workers,
                ..RunOptions::default()
            },
            sources,
        );
        let started = Instant::now();
        let summary = run(job).expect("run");
        let secs = started.elapsed().as_secs_f64();
        println!(
            "window {window:>3}: {:>9.0} events/s ({secs:.2}s, {} membership changes)",
            n as f64 / secs,
            summary.diffs_written
        );
    }
}
