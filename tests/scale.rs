//! Scale: generated traffic through the `shoal` binary, held against the
//! reference evaluator (tests/reference) on a sample of the profiles.
//!
//! - `retail_one_million_events` (ignored; run it with
//!   `cargo test --release --test scale -- --ignored --nocapture`): 1,000,000
//!   generated events, `dataflows/retail.toml` with 1 and 2 workers
//!   (byte-identical output, wall time and events/s printed, never asserted),
//!   and ~300 whole identity components checked against the reference.
//! - `retail_matches_reference`, `saas_leads_matches_reference`,
//!   `email_lifecycle_matches_reference`: ~20,000 generated events through
//!   each spec in `dataflows/`, all profiles checked against the reference.
//! - `sample_reference_matches_full_reference`: the sampled reference
//!   (`evaluate_sample`) against the plain one (`evaluate_sparse`), so that the
//!   tests above can trust it.
//!
//! Why a sample is exact: a profile's id, its universe membership, its terms
//! and `in_segment` depend only on the events of its own connected component
//! of the final id graph. So if the kept ids are a union of whole components,
//! the reference evaluated over just their events (after a full pass over all
//! lines for the clock, dedupe and lateness) writes exactly the lines of
//! their profiles.

mod reference;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use reference::{evaluate_sample, evaluate_sparse, RefOptions, RefOutput};
use shoal::core::clock::parse_time_arg;
use shoal::core::id::{Id, IdKind};
use shoal::generate::{write_all, GenOptions};
use shoal::ingest::event::{decode, EventType};
use shoal::spec::Spec;

fn manifest(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn load_spec(name: &str, tick: u64) -> Spec {
    let path = manifest(name);
    shoal::spec::load(&path, tick).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()))
}

/// Generates `events` lines into `path`; returns the time it took.
fn generate(path: &Path, events: u64, users: u64, seed: u64) -> Duration {
    let began = Instant::now();
    let opts = GenOptions {
        users,
        events,
        seed,
        ..GenOptions::default()
    };
    let mut file = std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let written = write_all(&opts, &mut file, None).expect("generate");
    assert_eq!(written, events);
    began.elapsed()
}

/// One run of the binary.
struct Run {
    output: Vec<u8>,
    dead_letters: usize,
    /// The one-line JSON summary from stderr.
    summary: String,
    wall: Duration,
}

fn run_shoal(spec: &Path, input: &Path, dir: &Path, workers: usize, extra: &[&str]) -> Run {
    let output = dir.join(format!("changes-{workers}.jsonl"));
    let dead = dir.join(format!("dead-{workers}.jsonl"));
    let began = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .arg("run")
        .arg(spec)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(&output)
        .arg("--dead-letter")
        .arg(&dead)
        .args(["--workers", &workers.to_string()])
        .args(extra)
        .output()
        .expect("shoal runs");
    let wall = began.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "shoal run {} with {workers} worker(s) failed ({}): {stderr}",
        spec.display(),
        out.status
    );
    let summary = stderr.lines().rev().find(|l| l.starts_with('{')).unwrap_or("").to_string();
    let dead_letters = std::fs::read(&dead)
        .expect("dead letters")
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    Run {
        output: std::fs::read(&output).expect("output"),
        dead_letters,
        summary,
        wall,
    }
}

fn lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8(bytes.to_vec())
        .expect("UTF-8 output")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The `profile` field of a SPEC §5 line.
fn profile_of(line: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    v["profile"].as_str().unwrap_or_else(|| panic!("no profile: {line}")).to_owned()
}

/// How many lines each segment has.
fn by_segment(lines: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        *counts
            .entry(v["segment"].as_str().unwrap_or_else(|| panic!("no segment: {l}")).to_owned())
            .or_insert(0) += 1;
    }
    counts
}

/// Engine and reference lines must be equal; on a difference, says where and
/// shows both sides for the first profile that differs.
fn compare(what: &str, engine: &[String], reference: &[String]) {
    if engine == reference {
        return;
    }
    let at = engine
        .iter()
        .zip(reference)
        .position(|(a, b)| a != b)
        .unwrap_or(engine.len().min(reference.len()));
    let line = engine.get(at).or(reference.get(at)).expect("a differing line");
    let profile = profile_of(line);
    let mine = |ls: &[String]| -> Vec<String> { ls.iter().filter(|l| profile_of(l) == profile).cloned().collect() };
    panic!(
        "{what}: engine ({} lines) and reference ({} lines) differ from line {at}:\n  engine:    {}\n  reference: {}\n\
         --- engine lines of {profile}\n{}\n--- reference lines of {profile}\n{}",
        engine.len(),
        reference.len(),
        engine.get(at).map_or("(end)", String::as_str),
        reference.get(at).map_or("(end)", String::as_str),
        mine(engine).join("\n"),
        mine(reference).join("\n"),
    );
}

// ---------------------------------------------------------------------------
// The final id graph of the input, and a sample of its components.

/// Per-component facts, for choosing a varied sample.
#[derive(Default)]
struct Component {
    ids: Vec<Id>,
    events: usize,
    aliases: usize,
}

impl Component {
    fn smallest(&self) -> &Id {
        self.ids.iter().min().expect("a component has ids")
    }
    fn has(&self, kind: IdKind) -> bool {
        self.ids.iter().any(|id| id.kind == kind)
    }
}

/// The connected components of the links made by every decodable line
/// (duplicates and lines a clock would call late included: extra links only
/// make components coarser, and a union of whole components stays exact).
fn components(input: &[u8]) -> Vec<Component> {
    let mut index: HashMap<Id, usize> = HashMap::new();
    let mut parent: Vec<usize> = Vec::new();
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    let mut anchors: Vec<(usize, bool)> = Vec::new();
    for line in input.split(|b| *b == b'\n') {
        let Ok(ev) = decode(line.strip_suffix(b"\r").unwrap_or(line)) else {
            continue;
        };
        if ev.kind == EventType::Group {
            continue; // dropped: makes no link
        }
        let mut node = |id: Id, parent: &mut Vec<usize>| {
            let n = index.len();
            *index.entry(id).or_insert_with(|| {
                parent.push(n);
                n
            })
        };
        let anchor = node(ev.anchor(), &mut parent);
        for (a, b) in ev.links() {
            let (a, b) = (node(a, &mut parent), node(b, &mut parent));
            let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
            parent[ra.max(rb)] = ra.min(rb);
        }
        anchors.push((anchor, ev.kind == EventType::Alias));
    }
    let mut by_root: HashMap<usize, Component> = HashMap::new();
    for (id, n) in &index {
        let root = find(&mut parent, *n);
        by_root.entry(root).or_default().ids.push(id.clone());
    }
    for (anchor, alias) in anchors {
        let c = by_root.get_mut(&find(&mut parent, anchor)).expect("anchored");
        c.events += 1;
        c.aliases += alias as usize;
    }
    let mut all: Vec<Component> = by_root.into_values().collect();
    for c in &mut all {
        c.ids.sort();
    }
    all.sort_by(|a, b| a.smallest().cmp(b.smallest()));
    all
}

/// FNV-1a, so the sample does not depend on std's hasher.
fn fnv(s: &str) -> u64 {
    s.bytes()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Up to `quota` components of each kind, those whose smallest id hashes
/// lowest: a deterministic, varied sample.
fn sample(all: &[Component], quotas: &[(&str, usize)]) -> (HashSet<Id>, BTreeMap<&'static str, (usize, usize)>) {
    let kind = |c: &Component| -> &'static str {
        if c.events >= 150 {
            "large (150+ events)"
        } else if c.aliases > 0 {
            "merged by alias"
        } else if c.ids.len() > 1 {
            "merged by a login"
        } else if c.has(IdKind::Anon) {
            "anonymous only"
        } else {
            "user only"
        }
    };
    let mut ranked: Vec<(&'static str, u64, &Component)> = all.iter().map(|c| (kind(c), fnv(&c.smallest().to_string()), c)).collect();
    ranked.sort_by_key(|(k, h, c)| (*k, *h, c.smallest().clone()));
    let mut keep = HashSet::new();
    let mut taken: BTreeMap<&'static str, (usize, usize)> = BTreeMap::new();
    for (k, _, c) in ranked {
        let quota = quotas.iter().find(|(name, _)| *name == k).map_or(0, |q| q.1);
        let entry = taken.entry(k).or_default();
        if entry.0 < quota {
            entry.0 += 1;
            entry.1 += c.events;
            keep.extend(c.ids.iter().cloned());
        }
    }
    (keep, taken)
}

fn rate(events: u64, d: Duration) -> String {
    format!("{:.1} s, {:.0} events/s", d.as_secs_f64(), events as f64 / d.as_secs_f64())
}

// ---------------------------------------------------------------------------

#[test]
#[ignore = "slow (1M events, minutes): cargo test --release --test scale -- --ignored --nocapture"]
fn retail_one_million_events() {
    const EVENTS: u64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let took = generate(&input, EVENTS, 50_000, 7);
    println!("generated {EVENTS} events (50,000 users, seed 7) in {}", rate(EVENTS, took));

    let spec_path = manifest("dataflows/retail.toml");
    let one = run_shoal(&spec_path, &input, dir.path(), 1, &[]);
    println!("1 worker:  {}  {}", rate(EVENTS, one.wall), one.summary);
    let two = run_shoal(&spec_path, &input, dir.path(), 2, &[]);
    println!("2 workers: {}  {}", rate(EVENTS, two.wall), two.summary);
    let engine = lines(&one.output);
    assert!(
        engine.len() > 10_000,
        "retail.toml wrote only {} lines over 1M events",
        engine.len()
    );
    assert!(one.output == two.output, "the output differs between 1 and 2 workers");
    assert_eq!(one.dead_letters, two.dead_letters);

    // A sample of whole components, checked against the reference.
    let began = Instant::now();
    let bytes = std::fs::read(&input).unwrap();
    let all = components(&bytes);
    let (keep, taken) = sample(
        &all,
        &[
            ("large (150+ events)", 20),
            ("merged by alias", 40),
            ("merged by a login", 110),
            ("anonymous only", 100),
            ("user only", 30),
        ],
    );
    println!("{} components; sampled {} ids:", all.len(), keep.len());
    for (k, (n, events)) in &taken {
        println!("  {k}: {n} components, {events} events");
    }
    let keep_text: HashSet<String> = keep.iter().map(Id::to_string).collect();
    let engine_sample: Vec<String> = engine.iter().filter(|l| keep_text.contains(&profile_of(l))).cloned().collect();
    let spec = load_spec("dataflows/retail.toml", 1_000);
    let reference = evaluate_sample(&spec, &bytes, &RefOptions::default(), &|id| keep.contains(id));
    println!("reference over the sample: {:.1} s", began.elapsed().as_secs_f64());
    println!(
        "sample: {} of {} output lines, {} profiles; lines by segment {:?}",
        engine_sample.len(),
        engine.len(),
        engine_sample.iter().map(|l| profile_of(l)).collect::<HashSet<_>>().len(),
        by_segment(&engine_sample)
    );
    assert!(engine_sample.len() >= 200, "the sample is too thin: {} lines", engine_sample.len());
    assert_eq!(reference.dead, one.dead_letters, "dead letters");
    compare("retail.toml, 1M events, sampled profiles", &engine_sample, &reference.lines);
}

/// One spec of `dataflows/` over ~20,000 generated events (1,000 users),
/// every profile held against the reference; `must_show` are segments that
/// must see some traffic, so the comparison is not vacuous.
fn generated_traffic_matches_reference(spec_name: &str, until: Option<&str>, must_show: &[&str]) {
    generated_traffic_matches_reference_at(spec_name, until, must_show, (20_000, 1_000), 1_000);
}

/// [`generated_traffic_matches_reference`] with `(events, users)` and the
/// tick in ms.
fn generated_traffic_matches_reference_at(
    spec_name: &str,
    until: Option<&str>,
    must_show: &[&str],
    (events, users): (u64, u64),
    tick: u64,
) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    generate(&input, events, users, 5);
    let bytes = std::fs::read(&input).unwrap();
    let tick_arg = format!("{tick}ms");
    let mut extra: Vec<&str> = until.iter().flat_map(|u| ["--until", *u]).collect();
    extra.extend(["--tick", &tick_arg]);
    let run = run_shoal(&manifest(spec_name), &input, dir.path(), 1, &extra);
    let engine = lines(&run.output);
    let spec = load_spec(spec_name, tick);
    let opts = RefOptions {
        until: until.map(|u| parse_time_arg(u).unwrap()),
        tick,
        ..RefOptions::default()
    };
    let began = Instant::now();
    let reference: RefOutput = evaluate_sample(&spec, &bytes, &opts, &|_| true);
    let segments = by_segment(&engine);
    println!(
        "{spec_name}: {} lines; engine {:.1} s, reference {:.1} s; by segment {segments:?}",
        engine.len(),
        run.wall.as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
    assert!(engine.len() > 500, "{spec_name} wrote only {} lines", engine.len());
    for s in must_show {
        assert!(segments.contains_key(*s), "{spec_name}: nobody ever entered {s}");
    }
    assert_eq!(reference.dead, run.dead_letters, "{spec_name}: dead letters");
    compare(spec_name, &engine, &reference.lines);
}

#[test]
fn retail_matches_reference() {
    generated_traffic_matches_reference(
        "dataflows/retail.toml",
        None,
        &["bot", "high_intent_price_sensitive", "cart_abandoner", "high_aov"],
    );
}

/// Groups, distances and zones over generated places (SPEC §4 "Places",
/// "Groups").
#[test]
fn retail_journeys_matches_reference() {
    generated_traffic_matches_reference(
        "dataflows/retail_journeys.toml",
        None,
        &["cart_abandoner", "far_from_any_city_centre", "near_flagship_store"],
    );
}

#[test]
fn saas_leads_matches_reference() {
    generated_traffic_matches_reference("dataflows/saas_leads.toml", None, &["bot", "signed_up_inactive", "hot_lead"]);
}

/// Conditions on `now` (SPEC §4 "Times"), carried two weeks past the
/// traffic so that trials end with no event arriving. The reference
/// evaluates every tick from scratch, hence a 10-minute tick and fewer
/// events.
#[test]
fn saas_lifecycle_matches_reference() {
    generated_traffic_matches_reference_at(
        "dataflows/saas_lifecycle.toml",
        Some("2024-01-22T00:00:00Z"),
        &[
            "trial_ending_soon",
            "trial_expired_not_converted",
            "new_this_week",
            "evening_reader",
            "working_hours_now",
        ],
        (3_000, 300),
        600_000,
    );
}

/// The 60- and 90-day segments need the clock carried on: generated data
/// spans about a week from 2024-01-01 (see the comment in the spec).
#[test]
fn email_lifecycle_matches_reference() {
    generated_traffic_matches_reference(
        "dataflows/email_lifecycle.toml",
        Some("2024-04-15T00:00:00Z"),
        &["dormant", "at_risk_customer", "lapsing", "cart_reminder"],
    );
}

/// The sampled reference agrees with the plain one: on everything, and on a
/// sample of whole components.
#[test]
fn sample_reference_matches_full_reference() {
    let mut input = Vec::new();
    write_all(
        &GenOptions {
            users: 40,
            events: 600,
            seed: 9,
            ..GenOptions::default()
        },
        &mut input,
        None,
    )
    .unwrap();
    let all = components(&input);
    let (keep, _) = sample(
        &all,
        &[
            ("merged by alias", 2),
            ("merged by a login", 4),
            ("anonymous only", 3),
            ("user only", 2),
        ],
    );
    let keep_text: HashSet<String> = keep.iter().map(Id::to_string).collect();
    for (spec_name, until) in [
        ("dataflows/retail.toml", None),
        ("dataflows/email_lifecycle.toml", Some("2024-04-15T00:00:00Z")),
    ] {
        let spec = load_spec(spec_name, 1_000);
        let opts = RefOptions {
            until: until.map(|u| parse_time_arg(u).unwrap()),
            ..RefOptions::default()
        };
        let full = evaluate_sparse(&spec, &input, &opts);
        assert!(
            full.lines.len() > 20,
            "{spec_name}: too little output to compare ({})",
            full.lines.len()
        );
        assert_eq!(
            evaluate_sample(&spec, &input, &opts, &|_| true),
            full,
            "{spec_name}: keeping everything"
        );
        let sampled = evaluate_sample(&spec, &input, &opts, &|id| keep.contains(id));
        let expected: Vec<String> = full.lines.iter().filter(|l| keep_text.contains(&profile_of(l))).cloned().collect();
        assert!(!expected.is_empty(), "{spec_name}: the sample has no output");
        assert_eq!(sampled.lines, expected, "{spec_name}: a sample of components");
    }
}
