//! Embedding shoal: build the dataflow for a spec from Rust, feed it events,
//! attach a probe, and read membership diffs as they become final.
//!
//!     cargo run --release --example embed
//!
//! Two workers: worker 0 reads (input order defines the clock), both compute.

use std::rc::Rc;
use std::sync::{Arc, Mutex};

use shoal::dataflow::build;
use shoal::plan::Plan;
use shoal::run::feeder::Feeder;
use shoal::run::RunOptions;

const SPEC: &str = r#"
[[segment]]
name = "browsing"
when = "count('Product Viewed', 10m) >= 3 and count('Order Completed', 10m) == 0"

[[segment]]
name = "buyer"
when = "count('Order Completed', 1h) >= 1"
"#;

fn main() {
    let spec = shoal::spec::parse_spec(SPEC, 1000).expect("the spec checks");
    let opts = RunOptions::default();
    // Diffs observed by any worker, as (tick, segment index, profile id, +1/-1).
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen_by_workers = seen.clone();

    timely::execute(timely::Config::process(2), move |worker| {
        let plan = Rc::new(Plan::new(&spec));
        let seen = seen_by_workers.clone();
        let (inputs, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (inputs, collections) = build(scope, &plan, opts.tick);
            // Members carry the profiles' names (their least eligible ids).
            let (probe, _) = collections
                .members
                .consolidate()
                .inspect(move |((segment, profile), tick, diff)| seen.lock().unwrap().push((*tick, *segment, profile.to_string(), *diff)))
                .probe();
            (inputs, probe)
        });
        if worker.index() != 0 {
            return; // only worker 0 reads; dropping `inputs` closes its share
        }
        let mut feeder = Feeder::new(plan.clone(), inputs, &opts);
        let events = shoal::generate::Generator::new(&shoal::generate::GenOptions {
            users: 200,
            events: 20_000,
            ..Default::default()
        });
        for (i, line) in events.enumerate() {
            feeder.read(line.as_bytes());
            if i % 1000 == 999 {
                feeder.flush();
                // Everything before the frontier is final once the probe passes it.
                let frontier = feeder.frontier();
                worker.step_while(|| probe.less_than(&frontier));
            }
        }
        let last = feeder.finish();
        let end = feeder.frontier();
        worker.step_while(|| probe.less_than(&end));
        println!(
            "clock ended at {:?}; {} events accepted",
            last.map(|t| shoal::core::clock::format_time(t, false)),
            feeder.counters().accepted
        );
    })
    .expect("timely runs");

    let mut diffs = seen.lock().unwrap().clone();
    diffs.sort();
    let segments = ["browsing", "buyer"];
    for (tick, segment, profile, diff) in diffs.iter().take(10) {
        println!(
            "{} {:>8} {:<24} {}",
            shoal::core::clock::format_time(*tick, false),
            segments[segment.index()],
            profile,
            if *diff > 0 { "enter" } else { "exit" }
        );
    }
    let entered = diffs.iter().filter(|d| d.3 > 0).count();
    println!("… {} changes in all, {entered} enters", diffs.len());
}
