//! Events over HTTP, sustained (release build; prints, never asserts time):
//!
//!     cargo bench --bench http_ingest                   # 1M events, 100k users
//!     cargo bench --bench http_ingest -- 2000000        # another size
//!
//! Generated events go to `shoal run dataflows/retail.toml --http … --write-key-file …`
//! as `/v1/batch` requests of 100 events over several keep-alive
//! connections on loopback, without and with `--state` (every answer waits
//! for its group's fsync). Two loads each:
//!
//! - **closed loop**: 4 connections send as fast as they are answered; the
//!   figure is events/s from the first request until the output holds every
//!   change of the same events read from a file (accepted *and* processed);
//! - **open loop** at 100,000 events/s (1,000 requests/s over 8
//!   connections): answer times are measured from each request's due time,
//!   so a stall shows in the percentiles instead of slowing the load.
//!
//! Each run's output is compared with the file run's: a figure only counts
//! if the memberships are the same. Under `cargo test --all-targets` (no
//! `--bench` flag) a small smoke pass runs instead.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal::generate::{GenOptions, Generator};

const BATCH: usize = 100;

fn spec() -> String {
    format!("{}/dataflows/retail.toml", env!("CARGO_MANIFEST_DIR"))
}

/// Request bodies of [`BATCH`] events, the events' count and largest time.
fn bodies(events: u64, users: u64) -> (Vec<Vec<u8>>, Vec<String>, u64) {
    let mut lines = Vec::new();
    let mut max = 0;
    let mut at = Vec::new();
    for line in Generator::new(&GenOptions {
        events,
        users,
        seed: 42,
        ..GenOptions::default()
    }) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let Some(t) = v["timestamp"].as_str().and_then(|t| shoal::core::clock::parse_time_arg(t).ok()) else {
            continue;
        };
        max = max.max(t);
        at.push(t);
        lines.push(line);
    }
    // In time order (the generator interleaves sessions): requests sent
    // over several connections arrive a little out of order, and which
    // events are late must not depend on that.
    let mut order: Vec<usize> = (0..lines.len()).collect();
    order.sort_by_key(|&i| at[i]);
    let lines: Vec<String> = order.into_iter().map(|i| std::mem::take(&mut lines[i])).collect();
    let bodies = lines
        .chunks(BATCH)
        .map(|c| format!("{{\"batch\":[{}]}}", c.join(",")).into_bytes())
        .collect();
    (bodies, lines, max)
}

fn sentinel(max: u64) -> String {
    format!(
        r#"{{"type":"track","event":"Sentinel","userId":"zz-sentinel","messageId":"sentinel","timestamp":"{}"}}"#,
        shoal::core::clock::format_time(max + 2 * 86_400_000, true)
    )
}

/// Requests over several connections interleave, and one held back (a
/// 503, a slow answer) lets later ones pass: a day of lateness keeps every
/// event on time, so the output can be compared with the file run's.
const FLAGS: [&str; 2] = ["--lateness", "1d"];

fn bytes_in(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

struct Load {
    name: &'static str,
    connections: usize,
    /// Events per second offered (open loop), or as fast as answered.
    rate: Option<f64>,
    state: bool,
    /// Extra flags for `shoal run`.
    flags: &'static [&'static str],
}

struct Figures {
    /// Until the output was complete.
    seconds: f64,
    /// Until the last request was answered.
    sent_in: f64,
    latencies: Vec<Duration>,
    busy: u64,
    same: bool,
}

fn start(dir: &Path, max: u64, state: bool, flags: &[&str]) -> (Child, String) {
    std::fs::write(dir.join("keys"), "bench\n").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal"));
    cmd.args([
        "run",
        &spec(),
        "--http",
        "127.0.0.1:0",
        "--write-key-file",
        "keys",
        "--until",
        &max.to_string(),
    ])
    .args(FLAGS)
    .args(["--output", "out.jsonl"])
    .args(flags)
    .current_dir(dir)
    .stdin(Stdio::null())
    .stderr(Stdio::piped());
    if state {
        cmd.args(["--state", "state"]);
    }
    let mut child = cmd.spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("shoal: listening on http://").unwrap().to_string();
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    (child, addr)
}

fn post(agent: &ureq::Agent, addr: &str, body: &[u8]) -> Result<(), u16> {
    match agent
        .post(&format!("http://{addr}/v1/batch"))
        .set("Authorization", "Basic YmVuY2g6") // "bench:"
        .set("Content-Type", "application/json")
        .send_bytes(body)
    {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(s, _)) => Err(s),
        Err(e) => panic!("POST: {e}"),
    }
}

fn run(bodies: &Arc<Vec<Vec<u8>>>, max: u64, expected: &str, load: &Load) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start(dir.path(), max, load.state, load.flags);
    let next = Arc::new(AtomicUsize::new(0));
    let busy = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(bodies.len())));
    let started = Instant::now();
    let threads: Vec<_> = (0..load.connections)
        .map(|_| {
            let (bodies, next, busy, latencies, addr) = (bodies.clone(), next.clone(), busy.clone(), latencies.clone(), addr.clone());
            let rate = load.rate;
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(body) = bodies.get(i) else { break };
                    let due = match rate {
                        Some(r) => started + Duration::from_secs_f64(i as f64 * BATCH as f64 / r),
                        None => Instant::now(),
                    };
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    while let Err(status) = post(&agent, &addr, body) {
                        assert_eq!(status, 503, "only 503 is expected");
                        busy.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    mine.push(due.elapsed());
                }
                latencies.lock().unwrap().extend(mine);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let sent_in = started.elapsed().as_secs_f64();
    let agent = ureq::AgentBuilder::new().build();
    let last = format!("{{\"batch\":[{}]}}", sentinel(max));
    post(&agent, &addr, last.as_bytes()).unwrap_or_else(|s| panic!("sentinel: {s}"));
    // Done when the output is as long as the file run's (compared below),
    // or when it stopped growing for 30 s (it differs).
    let want = expected.len() as u64;
    let out = dir.path().join("out.jsonl");
    let mut last = (0, Instant::now());
    while bytes_in(&out) < want && last.1.elapsed() < Duration::from_secs(30) && child.try_wait().unwrap().is_none() {
        let now = bytes_in(&out);
        if now != last.0 {
            last = (now, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let seconds = started.elapsed().as_secs_f64();
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    let same = std::fs::read_to_string(&out).unwrap_or_default() == expected;
    let latencies = std::mem::take(&mut *latencies.lock().unwrap());
    Figures {
        seconds,
        sent_in,
        latencies,
        busy: busy.load(Ordering::Relaxed),
        same,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let events: u64 = args
        .iter()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(if bench { 1_000_000 } else { 5_000 });
    let (bodies, lines, max) = bodies(events, (events / 10).max(100));
    let sent = lines.len();
    // The same events read from a file: the output every run must equal.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n" + &sentinel(max) + "\n").unwrap();
    let t = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["run", &spec(), "--until", &max.to_string()])
        .args(FLAGS)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("ref.jsonl"))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let file_seconds = t.elapsed().as_secs_f64();
    let expected = std::fs::read_to_string(dir.path().join("ref.jsonl")).unwrap();
    println!(
        "http_ingest: {sent} events in {} requests of {BATCH}; the file run: {file_seconds:.2} s ({:.0} events/s), {} changes",
        bodies.len(),
        sent as f64 / file_seconds,
        expected.lines().count()
    );
    let bodies = Arc::new(bodies);
    // `--history 0`: the served model keeps no events for runtime
    // segments over new terms (by default it keeps the spec's longest
    // window of them, 7 days for retail, which costs the worker about a
    // quarter of its time; see docs/performance.md).
    let loads = [
        Load {
            name: "closed loop, 4 connections, default --history",
            connections: 4,
            rate: None,
            state: false,
            flags: &[],
        },
        Load {
            name: "closed loop, 4 connections",
            connections: 4,
            rate: None,
            state: false,
            flags: &["--history", "0"],
        },
        Load {
            name: "open loop at 100000 events/s, 8 connections",
            connections: 8,
            rate: Some(100_000.0),
            state: false,
            flags: &["--history", "0"],
        },
        Load {
            name: "closed loop, 4 connections",
            connections: 4,
            rate: None,
            state: true,
            flags: &["--history", "0"],
        },
        Load {
            name: "open loop at 100000 events/s, 8 connections",
            connections: 8,
            rate: Some(100_000.0),
            state: true,
            flags: &["--history", "0"],
        },
        Load {
            name: "the same, no checkpoint during the run",
            connections: 8,
            rate: Some(100_000.0),
            state: true,
            flags: &["--history", "0", "--checkpoint-every", "1h"],
        },
    ];
    for load in &loads {
        if !bench && (load.rate.is_some() || load.flags.is_empty()) {
            continue;
        }
        let f = run(&bodies, max, &expected, load);
        let mut l = f.latencies;
        l.sort();
        println!(
            "  {:<9} {:<48} {:>7.0} events/s answered, {:>7.0} processed ({:.2} s)   answer ms p50 {:>6.2} p99 {:>7.2} max {:>7.2}   503s {:>4}   output {}",
            if load.state { "--state" } else { "no state" },
            load.name,
            sent as f64 / f.sent_in,
            sent as f64 / f.seconds,
            f.seconds,
            percentile(&l, 0.5),
            percentile(&l, 0.99),
            percentile(&l, 1.0),
            f.busy,
            if f.same { "identical to the file run" } else { "DIFFERS from the file run" }
        );
        assert!(f.same, "the output over HTTP differs from the file run's");
    }
}
