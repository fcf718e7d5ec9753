//! Wiring: builds the dataflow for a spec on timely workers and drives it.
//!
//! Worker 0 (of process 0) reads the input in order through [`Ingest`],
//! writes dead letters, and feeds three differential inputs: facts for the
//! windowed streams, identity nodes and identity links, each at the tick the
//! event takes effect. It advances the inputs with the clock, a batch of
//! lines at a time (never a round trip per tick), and keeps at most a couple
//! of batches in flight so memory stays bounded. The other workers close
//! their inputs at once and simply run their share of the dataflow.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use differential_dataflow::input::{Input, InputSession};
use differential_dataflow::VecCollection;
use serde::Serialize;
use timely::dataflow::Scope;

use crate::clock::format_time;
use crate::ingest::{dead_letter, Change, Counters, Identities, Ingest, Interner, Key, Label, Outcome, Stamped};
use crate::plan::Plan;
use crate::sink::{self, SinkState};
use crate::source::Next;
pub use crate::source::Source;
use crate::spec::Spec;
use crate::terms::{extract, Pay};
use crate::window::Fact;
use crate::{cluster, identity, rfm, rules, score, terms, window};

/// How a run is clocked and bounded (all durations and times in ms).
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub tick: u64,
    pub lateness: u64,
    pub dedupe_horizon: u64,
    pub until: Option<u64>,
    /// Live input: after this long without events the clock follows wall time.
    pub idle: u64,
    /// Worker threads (in this process).
    pub workers: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            tick: 1_000,
            lateness: 5_000,
            dedupe_horizon: 3_600_000,
            until: None,
            idle: 1_000,
            workers: 1,
        }
    }
}

/// Opens an output on worker 0 (called once, inside the worker).
pub type OpenOutput = Arc<dyn Fn() -> std::io::Result<Box<dyn Write>> + Send + Sync>;

/// An output that opens (creating or truncating) a file, or stdout for `-`.
pub fn file_output(path: PathBuf) -> OpenOutput {
    Arc::new(move || -> std::io::Result<Box<dyn Write>> {
        if path.as_os_str() == "-" {
            Ok(Box::new(std::io::BufWriter::new(std::io::stdout())))
        } else {
            let f =
                std::fs::File::create(&path).map_err(|e| std::io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display())))?;
            Ok(Box::new(std::io::BufWriter::with_capacity(1 << 16, f)))
        }
    })
}

/// An output collecting lines in memory.
pub fn memory_output(buf: Arc<Mutex<Vec<u8>>>) -> OpenOutput {
    struct Mem(Arc<Mutex<Vec<u8>>>);
    impl Write for Mem {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    Arc::new(move || -> std::io::Result<Box<dyn Write>> { Ok(Box::new(Mem(buf.clone()))) })
}

/// Everything a run needs.
#[derive(Clone)]
pub struct Job {
    pub spec: Spec,
    pub opts: RunOptions,
    pub sources: Vec<Source>,
    pub output: Option<OpenOutput>,
    pub dead_letters: Option<OpenOutput>,
    pub timely: timely::Config,
}

impl Job {
    /// A job that writes nothing (benchmarks, embedding), with `opts.workers`
    /// threads in this process.
    pub fn quiet(spec: Spec, opts: RunOptions, sources: Vec<Source>) -> Job {
        let timely = if opts.workers <= 1 {
            timely::Config::thread()
        } else {
            timely::Config::process(opts.workers)
        };
        Job {
            spec,
            opts,
            sources,
            output: None,
            dead_letters: None,
            timely,
        }
    }
}

/// The end-of-run summary (SPEC §5).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub events_read: u64,
    pub accepted: u64,
    pub bad: u64,
    pub duplicates: u64,
    pub late: u64,
    pub ignored: u64,
    pub profiles: i64,
    pub diffs_written: u64,
    /// The final clock, RFC 3339; `None` when no event was accepted.
    pub clock: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Io(String),
    #[error("timely: {0}")]
    Timely(String),
}

/// What a run over in-memory input produced.
#[derive(Clone, Debug, Default)]
pub struct MemoryOutput {
    /// SPEC §5 lines, in output order, without line endings.
    pub lines: Vec<String>,
    /// Dead-letter JSON lines.
    pub dead_letters: Vec<String>,
    pub summary: Summary,
}

/// Runs `spec` over `input` (JSON lines) with `opts.workers` threads and
/// returns everything it wrote.
pub fn run_memory(spec: &Spec, input: &[u8], opts: &RunOptions) -> Result<MemoryOutput, EngineError> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let dead = Arc::new(Mutex::new(Vec::new()));
    let job = Job {
        spec: spec.clone(),
        opts: opts.clone(),
        sources: vec![Source::Bytes {
            name: "input".into(),
            data: Arc::new(input.to_vec()),
        }],
        output: Some(memory_output(out.clone())),
        dead_letters: Some(memory_output(dead.clone())),
        timely: if opts.workers <= 1 {
            timely::Config::thread()
        } else {
            timely::Config::process(opts.workers)
        },
    };
    let summary = run(job)?;
    let lines = |b: &Arc<Mutex<Vec<u8>>>| {
        String::from_utf8_lossy(&b.lock().expect("not poisoned"))
            .lines()
            .map(str::to_string)
            .collect()
    };
    Ok(MemoryOutput {
        lines: lines(&out),
        dead_letters: lines(&dead),
        summary,
    })
}

/// Lines read between flushes of the inputs.
const BATCH: usize = 4096;

/// Runs a job to the end of its input; the summary comes from worker 0.
pub fn run(job: Job) -> Result<Summary, EngineError> {
    let config = job.timely.clone();
    let job = Arc::new(job);
    let guards = timely::execute(config, move |worker| run_worker(worker, &job)).map_err(EngineError::Timely)?;
    let mut summary = None;
    for r in guards.join() {
        if let Some(s) = r.map_err(EngineError::Timely)?? {
            summary = Some(s);
        }
    }
    Ok(summary.unwrap_or_default())
}

/// The differential inputs the reader feeds, at the ticks events take effect.
pub struct Inputs {
    pub facts: InputSession<u64, Fact, isize>,
    pub nodes: InputSession<u64, (Key, Label), isize>,
    pub links: InputSession<u64, (Key, Key), isize>,
}

impl Inputs {
    fn advance_to(&mut self, t: u64) {
        if t > *self.facts.time() {
            self.facts.advance_to(t);
            self.nodes.advance_to(t);
            self.links.advance_to(t);
        }
    }

    fn flush(&mut self) {
        self.facts.flush();
        self.nodes.flush();
        self.links.flush();
    }
}

/// The collections a spec maintains.
pub struct Collections<'s> {
    /// `(segment index, profile)` for every member of every segment.
    pub members: VecCollection<'s, u64, (u32, Key), isize>,
    /// Every profile that exists.
    pub universe: VecCollection<'s, u64, Key, isize>,
}

/// Builds the dataflow of `plan` in `scope`: identity, windows, terms, rules.
pub fn build<'s>(scope: Scope<'s, u64>, plan: &Rc<Plan>, tick: u64) -> (Inputs, Collections<'s>) {
    let (facts_in, facts) = scope.new_collection();
    let (nodes_in, nodes) = scope.new_collection();
    let (links_in, links) = scope.new_collection();
    let labels = identity::profiles(nodes, links);
    let universe = identity::universe(labels.clone());
    let lengths = Rc::new(plan.streams.iter().map(|s| s.window).collect::<Vec<_>>());
    let windowed = window::window(facts, lengths, tick);
    let mut terms = terms::terms(windowed, labels, plan.clone());
    if !plan.values.is_empty() {
        // Population terms: percentiles, RFM, clusters (see crate::plan).
        let values = score::values(terms.clone(), universe.clone(), plan.clone());
        if !plan.percentiles.is_empty() {
            terms = terms.concat(score::thresholds(values.clone(), universe.clone(), plan.clone()));
        }
        if plan.rfm.is_some() {
            terms = terms.concat(rfm::rfm(values.clone(), plan.clone()));
        }
        if plan.clusters.iter().any(Option::is_some) {
            terms = terms.concat(cluster::clusters(values, plan.clone()));
        }
    }
    let atoms = rules::atoms(terms, universe.clone(), plan.clone());
    let members = rules::segments(atoms, universe.clone(), plan);
    (
        Inputs {
            facts: facts_in,
            nodes: nodes_in,
            links: links_in,
        },
        Collections { members, universe },
    )
}

/// Reads lines in input order on one worker and feeds the inputs: the
/// sequential front of the engine (see [`Ingest`]).
pub struct Feeder {
    plan: Rc<Plan>,
    inputs: Inputs,
    ingest: Ingest,
    identities: Identities,
    /// Key to id; shared with whoever writes profile ids.
    pub interner: Interner,
    until: Option<u64>,
    /// For lifetime "latest value" streams: the fact fed last that still wins.
    winners: rustc_hash::FxHashMap<(Key, u32), (u64, Pay)>,
    node_changes: Vec<Change<(Key, Label)>>,
    link_changes: Vec<Change<(Key, Key)>>,
}

impl Feeder {
    pub fn new(plan: Rc<Plan>, inputs: Inputs, interner: Interner, opts: &RunOptions) -> Feeder {
        Feeder {
            plan,
            inputs,
            ingest: Ingest::new(opts.tick, opts.lateness, opts.dedupe_horizon),
            identities: Identities::default(),
            interner,
            until: opts.until,
            winners: Default::default(),
            node_changes: Vec::new(),
            link_changes: Vec::new(),
        }
    }

    /// Reads one line (without its line ending) and feeds what it means.
    pub fn read(&mut self, line: &[u8]) -> Outcome {
        let outcome = self.ingest.read(line);
        self.fed(outcome)
    }

    /// Feeds an event decoded elsewhere (the pre-decoded benchmarks).
    pub fn read_event(&mut self, event: crate::event::Event) -> Outcome {
        self.ingest.counters.read += 1;
        let outcome = self.ingest.accept(event);
        self.fed(outcome)
    }

    fn fed(&mut self, outcome: Outcome) -> Outcome {
        if let Outcome::Accepted(s) = &outcome {
            if self.until.is_none_or(|u| s.effect <= u) {
                self.feed(s);
            }
        }
        self.inputs.advance_to(self.ingest.clock.frontier());
        outcome
    }

    fn feed(&mut self, s: &Stamped) {
        self.identities
            .changes(s, &mut self.interner, &mut self.node_changes, &mut self.link_changes);
        for (d, t, r) in self.node_changes.drain(..) {
            self.inputs.nodes.update_at(d, t, r);
        }
        for (d, t, r) in self.link_changes.drain(..) {
            self.inputs.links.update_at(d, t, r);
        }
        let anchor = match (&s.event.user_id, &s.event.anonymous_id) {
            (Some(u), _) => self.interner.key_of(crate::event::IdKind::User, u),
            (None, Some(a)) => self.interner.key_of(crate::event::IdKind::Anon, a),
            (None, None) => unreachable!("accepted events have an id"),
        };
        let plan = self.plan.clone();
        for (i, stream) in plan.streams.iter().enumerate() {
            let Some(pay) = extract(stream, &s.event) else { continue };
            if let Pay::Stamped(..) = pay {
                self.latest(anchor, i as u32, s, pay);
            } else {
                self.inputs.facts.update_at((anchor, i as u32, s.event.time, pay), s.effect, 1);
            }
        }
    }

    /// Feeds a stamped fact of a lifetime "latest value" stream, keeping only
    /// the facts that can still win: one per anchor and stream once effects
    /// arrive in order. A newer value retracts the one it beats at its own
    /// effect tick; one that can never win (older, and effective no sooner)
    /// is not fed at all; one effective sooner than the current winner (read
    /// out of order) is fed as it is, and the term's fold takes the max.
    fn latest(&mut self, anchor: Key, stream: u32, s: &Stamped, pay: Pay) {
        let rank = |p: &Pay| match p {
            Pay::Stamped(e, text, _) => (*e, text.clone()),
            _ => unreachable!("stamped"),
        };
        let fact = |pay: Pay| (anchor, stream, s.event.time, pay);
        match self.winners.get_mut(&(anchor, stream)) {
            Some((eff, best)) if s.effect >= *eff => {
                if rank(&pay) > rank(best) {
                    let old = std::mem::replace(best, pay.clone());
                    *eff = s.effect;
                    self.inputs.facts.update_at(fact(old), s.effect, -1);
                    self.inputs.facts.update_at(fact(pay), s.effect, 1);
                }
            }
            Some(_) => self.inputs.facts.update_at(fact(pay), s.effect, 1),
            None => {
                self.winners.insert((anchor, stream), (s.effect, pay.clone()));
                self.inputs.facts.update_at(fact(pay), s.effect, 1);
            }
        }
    }

    /// Moves the clock to `t` with no event (live input gone idle).
    pub fn advance_clock(&mut self, t: u64) {
        self.ingest.advance_clock(t);
        self.inputs.advance_to(self.ingest.clock.frontier());
    }

    /// The clock `now`, once an event was accepted.
    pub fn now(&self) -> Option<u64> {
        self.ingest.clock.now
    }

    /// Hands buffered updates to the dataflow.
    pub fn flush(&mut self) {
        self.inputs.flush();
    }

    /// The first tick not yet final: everything before it may be computed.
    pub fn frontier(&self) -> u64 {
        *self.inputs.facts.time()
    }

    /// Ends file input: the clock moves to the last tick (SPEC §3) and the
    /// inputs to just past it. Returns the last tick, if any event counted.
    pub fn finish(&mut self) -> Option<u64> {
        let last = self.ingest.final_tick(self.until);
        if let Some(t) = last {
            self.inputs.advance_to(t + self.ingest.clock.tick);
        }
        self.flush();
        last
    }

    pub fn counters(&self) -> &Counters {
        &self.ingest.counters
    }
}

/// Progress on long runs: a line on stderr every few seconds when it is a
/// terminal, and a `tracing` event (`RUST_LOG=info`) otherwise.
struct Progress {
    started: Instant,
    last: Instant,
    terminal: bool,
    shown: bool,
}

impl Progress {
    fn new() -> Progress {
        use std::io::IsTerminal;
        Progress {
            started: Instant::now(),
            last: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            shown: false,
        }
    }

    fn tick(&mut self, feeder: &Feeder, tick: u64) {
        if self.last.elapsed() < Duration::from_secs(2) {
            return;
        }
        self.last = Instant::now();
        let c = feeder.counters();
        let rate = c.read as f64 / self.started.elapsed().as_secs_f64();
        let clock = feeder.now().map(|t| format_time(t, tick < 1000)).unwrap_or_else(|| "-".into());
        self.shown = true;
        if self.terminal {
            eprint!(
                "\rshoal: {} lines, {:.0}/s, clock {clock}, {} bad, {} duplicates   ",
                c.read, rate, c.bad, c.duplicates
            );
        } else {
            tracing::info!(lines = c.read, rate = rate as u64, clock = %clock, bad = c.bad, duplicates = c.duplicates, "progress");
        }
    }

    fn done(&self) {
        if self.terminal && self.shown {
            eprintln!();
        }
    }
}

fn run_worker(worker: &mut timely::worker::Worker, job: &Job) -> Result<Option<Summary>, EngineError> {
    let plan = Rc::new(Plan::new(&job.spec));
    let opts = &job.opts;
    let leader = worker.index() == 0;
    let last = Rc::new(Cell::new(None));
    let state = Rc::new(RefCell::new(SinkState::default()));
    let out = match (&job.output, leader) {
        (Some(open), true) => Some(open().map_err(|e| EngineError::Io(e.to_string()))?),
        _ => None,
    };
    let interner = Interner::default();
    let names = Rc::new(plan.segments.iter().map(|s| s.name.clone()).collect::<Vec<_>>());
    let (inputs, probe) = worker.dataflow::<u64, _, _>(|scope| {
        let (inputs, built) = build(scope, &plan, opts.tick);
        let (probe, members) = built.members.probe();
        sink::memberships(
            members,
            interner.names.clone(),
            names,
            opts.tick < 1000,
            last.clone(),
            out,
            state.clone(),
        );
        sink::profiles(built.universe, last.clone(), state.clone());
        (inputs, probe)
    });
    if !leader {
        return Ok(None);
    }
    let mut feeder = Feeder::new(plan, inputs, interner, opts);
    let mut dead = match &job.dead_letters {
        Some(open) => Some(open().map_err(|e| EngineError::Io(e.to_string()))?),
        None => None,
    };
    let mut in_batch = 0;
    let mut in_flight = 0u64;
    let mut line = Vec::new();
    let mut progress = Progress::new();
    let tick = Duration::from_millis(opts.tick);
    let idle = Duration::from_millis(opts.idle);
    for source in &job.sources {
        let name = source.name();
        let mut lines = source.open()?;
        let live = lines.is_live();
        let mut number = 0u64;
        // Live clock: when the last event came, and the clock then.
        let mut last_event = (Instant::now(), feeder.now());
        loop {
            let wait = if in_batch > 0 { Duration::from_millis(20) } else { tick.min(idle) };
            let next = lines
                .next(&mut line, wait)
                .map_err(|e| EngineError::Io(format!("cannot read {name}: {e}")))?;
            match next {
                Next::End => break,
                Next::Idle => {
                    let (at, now) = last_event;
                    if let Some(now) = now.filter(|_| at.elapsed() >= idle) {
                        feeder.advance_clock(now + (at.elapsed().as_millis() as u64 / opts.tick) * opts.tick);
                    }
                    in_batch = BATCH; // make what we have visible
                }
                next @ (Next::Line | Next::Event(_)) => {
                    number += 1;
                    let outcome = match next {
                        Next::Event(ev) => feeder.read_event(*ev),
                        _ => feeder.read(&line),
                    };
                    if let Outcome::Bad(reason) = &outcome {
                        if let Some(d) = dead.as_mut() {
                            writeln!(d, "{}", dead_letter(&name, number, reason, &line))
                                .map_err(|e| EngineError::Io(format!("cannot write dead letters: {e}")))?;
                            if live {
                                d.flush().map_err(|e| EngineError::Io(format!("cannot write dead letters: {e}")))?;
                            }
                        }
                    }
                    if matches!(outcome, Outcome::Accepted(_)) {
                        last_event = (Instant::now(), feeder.now());
                    }
                    in_batch += 1;
                }
            }
            if in_batch >= BATCH {
                in_batch = 0;
                progress.tick(&feeder, opts.tick);
                feeder.flush();
                // Keep at most about two batches in flight.
                while probe.less_than(&in_flight) {
                    worker.step();
                }
                in_flight = feeder.frontier();
                worker.step();
                if live {
                    worker.step_while(|| probe.less_than(&in_flight));
                }
            }
        }
    }
    if let Some(d) = dead.as_mut() {
        d.flush().map_err(|e| EngineError::Io(format!("cannot write dead letters: {e}")))?;
    }

    progress.done();
    let final_tick = feeder.finish();
    last.set(Some(final_tick.unwrap_or(0)));
    let end = feeder.frontier();
    while probe.less_than(&end) {
        worker.step();
    }
    let counters = feeder.counters().clone();
    drop(feeder);
    while worker.step_or_park(None) {}

    let st = state.borrow();
    if let Some(e) = &st.error {
        return Err(EngineError::Io(format!("cannot write output: {e}")));
    }
    let Counters {
        read,
        accepted,
        bad,
        duplicates,
        late,
        ignored,
    } = counters;
    Ok(Some(Summary {
        events_read: read,
        accepted,
        bad,
        duplicates,
        late,
        ignored,
        profiles: st.profiles,
        diffs_written: st.diffs,
        clock: final_tick.map(|t| format_time(t, opts.tick < 1000)),
    }))
}
