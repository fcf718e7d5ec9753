//! Wiring: builds the dataflow for a spec on timely workers and drives it.
//!
//! Readers feed the dataflow. File input, stdin and the generator are read
//! in order by one reader, on worker 0 of process 0; Kafka partitions are
//! spread over every worker of every process, each worker reading its own
//! (see `kafka`). A reader runs a [`Feeder`]: its own [`Ingest`] (dedupe,
//! clock, lateness) that feeds three differential inputs — facts for the
//! windowed streams, identity nodes and identity links — each at the tick
//! the event takes effect, plus a stream of notes (dead letters, and a
//! report at the end) for the sink. Readers advance their inputs with their
//! clock, a batch of lines at a time (never a round trip per tick), and keep
//! at most a few batches beyond what the output has *delivered*, so a
//! slow output slows the input instead of growing a queue. The dataflow's
//! frontier is the least of the readers' clocks; a worker with nothing to
//! read closes its inputs at once and runs its share of the dataflow.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use differential_dataflow::input::{Input, InputSession};
use differential_dataflow::VecCollection;
use serde::Serialize;
use timely::dataflow::Scope;

use crate::core::clock::format_time;
use crate::core::fact::Fact;
use crate::core::fact::FactOf;
use crate::core::fact::Pay;
use crate::core::id::{Key, Label};
use crate::dataflow::{cluster, identity, rfm, rules, score, terms};
use crate::ingest::stamp::{dead_letter, Change, Counters, Identities, Ingest, Outcome, Stamped};
use crate::io::source::Next;
pub use crate::io::source::Source;
use crate::output::deliver::memory_output;
use crate::output::deliver::OpenOutput;
use crate::output::sink::Timings;
use crate::output::sink::{self, Note, Outputs, Report, SinkState};
use crate::plan::Plan;
use crate::run::checkpoint;
use crate::spec::Spec;

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

/// Checkpoints (`--state DIR`, `--checkpoint-every`); see `checkpoint`.
#[derive(Clone, Debug)]
pub struct StateOptions {
    pub dir: PathBuf,
    pub every: Duration,
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
    /// Kafka input, read by every worker (instead of `sources`).
    pub kafka: Option<crate::io::kafka::KafkaInput>,
    /// Set (by a signal handler) to stop: readers stop reading, what is
    /// final is delivered and committed, nothing else is written.
    pub stop: Arc<AtomicBool>,
    /// Wall-clock marks for the latency benchmark.
    pub timings: Option<Arc<Timings>>,
    /// Serve the HTTP API (SPEC §7) on this address (process 0 only), and
    /// keep serving after the input ends until the stop flag.
    pub http: Option<HttpOptions>,
    /// Write checkpoints there, and resume from the newest.
    pub state: Option<StateOptions>,
}

/// Where the HTTP API listens.
#[derive(Clone)]
pub struct HttpOptions {
    pub addr: String,
    /// How long the served model keeps accepted events, for segments defined
    /// at run time over terms the spec does not compute (`--history`);
    /// `None`: the longest window of the spec.
    pub history: Option<crate::serve::model::History>,
    /// Called with the bound address once listening (e.g. to print it).
    pub on_listen: Option<Arc<dyn Fn(std::net::SocketAddr) + Send + Sync>>,
}

impl HttpOptions {
    /// The history kept for `plan`: as given, else its longest window.
    pub fn history(&self, plan: &Plan) -> crate::serve::model::History {
        self.history.unwrap_or_else(|| crate::serve::model::History::default_for(plan))
    }
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
            kafka: None,
            stop: Arc::default(),
            timings: None,
            http: None,
            state: None,
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

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Options that cannot go together, or input that cannot do what they ask (exit 2).
    #[error("{0}")]
    Unsupported(String),
    #[error("timely: {0}")]
    Timely(String),
    /// A checkpoint that cannot be used for this run (exit 2).
    #[error("{0}")]
    Refused(String),
    /// The state directory failed.
    #[error(transparent)]
    Checkpoint(checkpoint::CheckpointError),
    /// An input (a file, stdin, Kafka) failed.
    #[error(transparent)]
    Input(#[from] crate::io::Error),
    /// An output cannot be opened.
    #[error(transparent)]
    Output(#[from] crate::output::deliver::OpenError),
    /// Writing the output failed; what was written before stays.
    #[error("{0}")]
    Write(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the HTTP server: {0}")]
    Server(#[source] std::io::Error),
}

impl From<checkpoint::CheckpointError> for EngineError {
    fn from(e: checkpoint::CheckpointError) -> Self {
        match e {
            checkpoint::CheckpointError::Refused(m) => EngineError::Refused(m),
            e => EngineError::Checkpoint(e),
        }
    }
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
        kafka: None,
        stop: Arc::default(),
        timings: None,
        http: None,
        state: None,
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
/// Batches a reader may read beyond the frontier it must see delivered.
const LEAD: usize = 4;

/// Live input is handed to the dataflow at least this often while it flows.
const LIVE_PUMP: Duration = Duration::from_millis(5);

/// Runs a job to the end of its input; the summary comes from worker 0.
pub fn run(job: Job) -> Result<Summary, EngineError> {
    let config = job.timely.clone();
    let process = match &config.communication {
        timely::CommunicationConfig::Cluster { process, .. } => *process,
        _ => 0,
    };
    // Only process 0 serves: it holds worker 0, where the output is written.
    let (served, server) = match (&job.http, process) {
        (Some(http), 0) => {
            let plan = Arc::new(Plan::new(&job.spec));
            let history = http.history(&plan);
            let served = crate::serve::model::Served::new(&job.spec, plan, job.opts.tick, history, job.stop.clone());
            let listener = std::net::TcpListener::bind(&http.addr).map_err(|source| EngineError::Listen {
                addr: http.addr.clone(),
                source,
            })?;
            let addr = listener.local_addr().map_err(EngineError::Server)?;
            let server = crate::serve::http::spawn(listener, served.clone()).map_err(EngineError::Server)?;
            if let Some(f) = &http.on_listen {
                f(addr);
            }
            (Some(served), Some(server))
        }
        _ => (None, None),
    };
    let checkpointing = match &job.state {
        Some(state) => Some(Arc::new(Checkpointing::open(&job, state, &config)?)),
        None => None,
    };
    let job = Arc::new(job);
    let guards = timely::execute(config, move |worker| {
        run_worker(worker, &job, served.clone(), checkpointing.clone())
    })
    .map_err(EngineError::Timely)?;
    let mut summary = None;
    let mut error = None;
    for r in guards.join() {
        match r.map_err(EngineError::Timely)? {
            Ok(Some(s)) => summary = Some(s),
            Ok(None) => {}
            Err(e) => error = error.or(Some(e)),
        }
    }
    // The run is over: close the HTTP server and wait for it (dropping it
    // on an early return does the same).
    if let Some(server) = server {
        server.shutdown();
    }
    match error {
        Some(e) => Err(e),
        None => Ok(summary.unwrap_or_default()),
    }
}

/// A run's checkpoints, shared by the workers of this process.
pub struct Checkpointing {
    store: checkpoint::Store,
    every: Duration,
    fingerprint: checkpoint::Fingerprint,
    /// The checkpoint resumed from.
    restored: Option<checkpoint::Snapshot>,
    /// Each reader's part of it, taken by the reader.
    readers: Mutex<Vec<checkpoint::ReaderState>>,
    seq: std::sync::atomic::AtomicU64,
    clusters: Arc<cluster::Memory>,
    delivered: Arc<Mutex<crate::output::sink::Delivered>>,
    /// Readers in this run: 1 for line input, every worker for Kafka.
    readers_count: usize,
    /// Several readers: the checkpoint being gathered, and the final states
    /// of readers that stopped reading.
    rounds: Mutex<checkpoint::Rounds>,
    /// The delivered frontier of the last checkpoint written.
    written: std::sync::atomic::AtomicU64,
    windows: Vec<Option<u64>>,
    tick: u64,
}

impl Checkpointing {
    /// Opens the state directory and reads the newest usable checkpoint.
    fn open(job: &Job, state: &StateOptions, config: &timely::Config) -> Result<Checkpointing, EngineError> {
        if let timely::CommunicationConfig::Cluster { .. } = config.communication {
            return Err(EngineError::Unsupported(
                "--state with --processes is not supported yet: run one process".into(),
            ));
        }
        let workers = match config.communication {
            timely::CommunicationConfig::Process(n) => n,
            _ => 1,
        };
        let readers_count = if job.kafka.is_some() { workers } else { 1 };
        if let Some(s) = job.sources.iter().find(|s| !s.replayable()) {
            let name = if matches!(s, Source::Stdin) {
                "stdin".to_string()
            } else {
                s.name()
            };
            return Err(EngineError::Unsupported(format!(
                "--state needs input that can be read again from a checkpoint's position (files or --generate); \
                 {name} cannot be read again (write it to a file first)"
            )));
        }
        let fingerprint = checkpoint::Fingerprint {
            version: env!("CARGO_PKG_VERSION").to_string(),
            spec: xxhash_rust::xxh3::xxh3_64(format!("{:?}", job.spec).as_bytes()),
            tick: job.opts.tick,
            lateness: job.opts.lateness,
            dedupe_horizon: job.opts.dedupe_horizon,
            until: job.opts.until,
            inputs: match &job.kafka {
                Some(k) => k.topics.iter().map(|t| format!("kafka:{t}")).collect(),
                None => job.sources.iter().map(Source::name).collect(),
            },
            readers: readers_count,
        };
        let store = checkpoint::Store::open(&state.dir)?;
        let restored = store.latest(&fingerprint, |w| eprintln!("shoal: {w}"))?;
        if let Some(snap) = &restored {
            tracing::info!(seq = snap.seq, frontier = snap.mark.frontier, "resuming from a checkpoint");
        }
        let plan = Plan::new(&job.spec);
        let clusters = cluster::Memory::new(
            plan.clusters.len(),
            restored.as_ref().map(|s| s.clusters.clone()).unwrap_or_default(),
        );
        let mark = restored.as_ref().map(|s| s.mark.clone()).unwrap_or_default();
        let frontier = mark.frontier;
        Ok(Checkpointing {
            store,
            every: state.every,
            fingerprint,
            readers: Mutex::new(restored.as_ref().map(|s| s.readers.clone()).unwrap_or_default()),
            readers_count,
            rounds: Mutex::new(checkpoint::Rounds::new(readers_count)),
            written: frontier.into(),
            windows: plan.streams.iter().map(|s| s.window).collect(),
            tick: job.opts.tick,
            seq: (restored.as_ref().map_or(0, |s| s.seq) + 1).into(),
            restored,
            clusters: Arc::new(clusters),
            // Until the sink says more, what the checkpoint had is out.
            delivered: Arc::new(Mutex::new(crate::output::sink::Delivered { mark, files: Vec::new() })),
        })
    }

    /// Writes a snapshot of `states` at `mark`; failures are reported.
    fn write(&self, mark: crate::output::sink::Mark, readers: Vec<checkpoint::ReaderState>) -> Vec<checkpoint::ReaderState> {
        let frontier = mark.frontier;
        let snapshot = checkpoint::Snapshot {
            fingerprint: self.fingerprint.clone(),
            seq: self.seq.fetch_add(1, Ordering::SeqCst),
            clusters: self.clusters.before(frontier),
            mark,
            readers,
        };
        match self.store.write(&snapshot) {
            Ok(path) => {
                tracing::debug!(path = %path.display(), frontier, "checkpoint written");
                self.written.fetch_max(frontier, Ordering::SeqCst);
            }
            Err(e) => eprintln!("shoal: {e}; the last good checkpoint is kept"),
        }
        snapshot.readers
    }

    /// The delivered mark, once the output files are synced.
    fn mark(&self) -> Option<crate::output::sink::Mark> {
        match self.delivered.lock().expect("not poisoned").synced() {
            Ok(mark) => Some(mark),
            Err(e) => {
                eprintln!("shoal: cannot sync the output before a checkpoint: {e}; the last good checkpoint is kept");
                None
            }
        }
    }

    /// A copy of a stopped reader's final state, compacted at `frontier`.
    fn compacted(&self, st: &checkpoint::ReaderState, frontier: u64) -> checkpoint::ReaderState {
        let mut st = st.clone();
        st.compact(frontier, self.tick, &self.windows);
        st
    }

    /// Several readers: writes the open round once every reader has given
    /// its state or stopped reading.
    fn complete_round(&self) {
        let complete = self
            .rounds
            .lock()
            .expect("not poisoned")
            .complete(|st, frontier| self.compacted(st, frontier));
        if let Some((mark, states)) = complete {
            self.write(mark, states);
        }
    }
}

impl Checkpointing {
    /// The restored state of the reader on `worker`, once.
    fn take_reader(&self, worker: usize) -> Option<checkpoint::ReaderState> {
        let mut readers = self.readers.lock().expect("not poisoned");
        let i = readers.iter().position(|r| r.worker == worker)?;
        Some(readers.swap_remove(i))
    }
}

/// One reader's side of checkpointing.
struct ReaderCheckpoints {
    shared: Arc<Checkpointing>,
    last: Instant,
    /// Dead letters sent and perhaps not yet written, oldest first.
    dead: std::collections::VecDeque<String>,
    dead_sent: u64,
}

/// The differential inputs a reader feeds, at the ticks events take effect.
pub struct Inputs {
    /// Facts of streams with a payload to fold.
    pub facts: InputSession<u64, Fact, isize>,
    /// Facts of streams folded only by `count` ([`Plan::counted_streams`]).
    pub counts: InputSession<u64, FactOf<()>, isize>,
    pub nodes: InputSession<u64, (Key, Label), isize>,
    pub links: InputSession<u64, (Key, Key), isize>,
    /// Serving with `--history`: every accepted event and its anchor id,
    /// for the served model (see `crate::serve::model`).
    pub events: Option<InputSession<u64, (Key, crate::ingest::event::Kept), isize>>,
}

impl Inputs {
    fn advance_to(&mut self, t: u64) {
        if t > *self.facts.time() {
            self.facts.advance_to(t);
            self.counts.advance_to(t);
            self.nodes.advance_to(t);
            self.links.advance_to(t);
            if let Some(events) = &mut self.events {
                events.advance_to(t);
            }
        }
    }

    fn flush(&mut self) {
        self.facts.flush();
        self.counts.flush();
        self.nodes.flush();
        self.links.flush();
        if let Some(events) = &mut self.events {
            events.flush();
        }
    }
}

/// The collections a spec maintains.
pub struct Collections<'s> {
    /// `(segment index, profile)` for every member of every segment.
    pub members: VecCollection<'s, u64, (u32, Key), isize>,
    /// `(profile, its id)` for every profile.
    pub names: VecCollection<'s, u64, (Key, crate::core::id::Id), isize>,
    /// Every profile that exists.
    pub universe: VecCollection<'s, u64, Key, isize>,
    /// Term rows: `((stream, profile), the values of its terms)`, when
    /// asked for (see [`build_with`]).
    pub terms: Option<VecCollection<'s, u64, crate::dataflow::terms::Row, isize>>,
    /// `(id, profile)` for every id of a profile.
    pub labels: VecCollection<'s, u64, (Key, Key), isize>,
    /// The identity nodes as fed.
    pub nodes: VecCollection<'s, u64, (Key, Label), isize>,
}

/// Builds the dataflow of `plan` in `scope`: identity, windows, terms, rules.
pub fn build<'s>(scope: Scope<'s, u64>, plan: &Rc<Plan>, tick: u64) -> (Inputs, Collections<'s>) {
    build_with(scope, plan, tick, None, true)
}

/// [`build`], with the clusterings' models kept in (and started from)
/// `memory`, and the term rows computed only when `rows` asks for them
/// (or the plan reads them: population terms, atoms over several terms).
pub fn build_with<'s>(
    scope: Scope<'s, u64>,
    plan: &Rc<Plan>,
    tick: u64,
    memory: Option<Arc<cluster::Memory>>,
    rows: bool,
) -> (Inputs, Collections<'s>) {
    let (facts_in, facts) = scope.new_collection();
    let (counts_in, counts) = scope.new_collection();
    let (nodes_in, nodes) = scope.new_collection();
    let (links_in, links) = scope.new_collection();
    let identity::Profiles { labels, names } = identity::profiles(nodes.clone(), links);
    let universe = identity::universe(names.clone());
    let rows = rows || !plan.values.is_empty() || plan.atoms.iter().any(|a| a.terms.len() > 1);
    let built = terms::terms((facts, counts), labels.clone(), plan.clone(), (tick, rows));
    let mut atoms = built.atoms;
    let mut terms = built.rows;
    if let Some(rows) = terms.as_mut().filter(|_| !plan.values.is_empty()) {
        // Population terms: percentiles, RFM, clusters (see crate::plan).
        let values = score::values(rows.clone(), universe.clone(), plan.clone());
        if !plan.percentiles.is_empty() {
            *rows = rows
                .clone()
                .concat(score::thresholds(values.clone(), universe.clone(), plan.clone()));
        }
        if plan.rfm.is_some() {
            *rows = rows.clone().concat(rfm::rfm(values.clone(), plan.clone()));
        }
        if plan.clusters.iter().any(Option::is_some) {
            *rows = rows.clone().concat(cluster::clusters(values, plan.clone(), memory));
        }
    }
    if let Some(more) = terms.clone().and_then(|rows| rules::atoms(rows, plan.clone())) {
        atoms = atoms.concat(more);
    }
    let members = rules::segments(atoms, universe.clone(), plan.clone());
    (
        Inputs {
            facts: facts_in,
            counts: counts_in,
            nodes: nodes_in,
            links: links_in,
            events: None,
        },
        Collections {
            members,
            names,
            universe,
            terms,
            labels,
            nodes,
        },
    )
}

/// Reads events and feeds the inputs: the sequential front of one reader
/// (see [`Ingest`]).
pub struct Feeder {
    plan: Rc<Plan>,
    /// By stream: fed to `Inputs::counts` without its payload.
    counted: Vec<bool>,
    /// How lines read here are decoded (decoding threads get a copy).
    decoding: crate::ingest::decode::Decoding,
    inputs: Inputs,
    ingest: Ingest,
    identities: Identities,
    until: Option<u64>,
    /// For lifetime "latest value" streams: the fact fed last that still wins.
    winners: rustc_hash::FxHashMap<(Key, u32), (u64, Pay)>,
    node_changes: Vec<Change<(Key, Label)>>,
    link_changes: Vec<Change<(Key, Key)>>,
    /// Marks when ticks become final (the latency benchmark).
    pub timings: Option<Arc<Timings>>,
    /// With `--state`: every update fed, for checkpoints.
    retained: Option<Retained>,
}

/// The updates a reader fed, compacted at each checkpoint (see `checkpoint`).
#[derive(Default)]
struct Retained {
    facts: checkpoint::Log<Fact>,
    nodes: checkpoint::Log<(Key, Label)>,
    links: checkpoint::Log<(Key, Key)>,
}

impl Feeder {
    pub fn new(plan: Rc<Plan>, inputs: Inputs, opts: &RunOptions) -> Feeder {
        Feeder {
            counted: plan.counted_streams(),
            decoding: crate::ingest::decode::Decoding::new(&plan.streams, inputs.events.is_some()),
            plan,
            inputs,
            ingest: Ingest::new(opts.tick, opts.lateness, opts.dedupe_horizon),
            identities: Identities::default(),
            until: opts.until,
            winners: Default::default(),
            node_changes: Vec::new(),
            link_changes: Vec::new(),
            timings: None,
            retained: None,
        }
    }

    /// Keeps every update fed, so that [`Feeder::checkpoint`] can save them.
    pub fn retain(&mut self) {
        self.retained.get_or_insert_with(Retained::default);
    }

    fn fact(&mut self, d: Fact, t: u64, r: isize) {
        if let Some(log) = &mut self.retained {
            log.facts.push(d.clone(), t, r);
        }
        self.input(d, t, r);
    }

    /// Feeds a fact to the input of its stream's kind.
    fn input(&mut self, d: Fact, t: u64, r: isize) {
        let (anchor, stream, time, pay) = d;
        if self.counted[stream as usize] {
            self.inputs.counts.update_at((anchor, stream, time, ()), t, r);
        } else {
            self.inputs.facts.update_at((anchor, stream, time, pay), t, r);
        }
    }

    /// The reader's state for a checkpoint whose delivered frontier is
    /// `frontier`: its logs compacted there (see `checkpoint`), its clock,
    /// dedupe memory and identity ticks. `None` unless [`Feeder::retain`]ed.
    pub fn checkpoint(&mut self, frontier: u64, worker: usize, position: crate::io::Position) -> Option<checkpoint::ReaderState> {
        let tick = self.ingest.clock.tick;
        let windows: Vec<Option<u64>> = self.plan.streams.iter().map(|s| s.window).collect();
        let log = self.retained.as_mut()?;
        log.facts
            .compact(frontier, tick, |f, last| checkpoint::expired(f, last, &windows, tick));
        log.nodes.compact(frontier, tick, |_, _| false);
        log.links.compact(frontier, tick, |_, _| false);
        let mut winners: Vec<((Key, u32), (u64, Pay))> = self.winners.iter().map(|(k, v)| (*k, v.clone())).collect();
        winners.sort();
        Some(checkpoint::ReaderState {
            worker,
            ingest: self.ingest.state(),
            identities: self.identities.state(),
            winners,
            // Lent to the checkpoint, and given back by `Feeder::checkpointed`.
            facts: std::mem::take(&mut log.facts.updates),
            nodes: std::mem::take(&mut log.nodes.updates),
            links: std::mem::take(&mut log.links.updates),
            dead: Vec::new(),
            dead_sent: 0,
            position,
        })
    }

    /// Takes back the logs lent to a checkpoint by [`Feeder::checkpoint`].
    pub fn checkpointed(&mut self, st: checkpoint::ReaderState) {
        if let Some(log) = &mut self.retained {
            log.facts.updates = st.facts;
            log.nodes.updates = st.nodes;
            log.links.updates = st.links;
        }
    }

    /// Takes up a reader's checkpointed state: feeds its updates at their
    /// ticks and moves the inputs to its clock.
    pub fn restore(&mut self, st: checkpoint::ReaderState) {
        self.ingest.restore(st.ingest);
        self.identities = Identities::restore(st.identities);
        self.winners = st.winners.into_iter().collect();
        for (d, t, r) in &st.facts {
            self.input(d.clone(), *t, *r);
        }
        for (d, t, r) in &st.nodes {
            self.inputs.nodes.update_at(d.clone(), *t, *r);
        }
        for (d, t, r) in &st.links {
            self.inputs.links.update_at(*d, *t, *r);
        }
        if let Some(log) = &mut self.retained {
            log.facts.updates = st.facts;
            log.nodes.updates = st.nodes;
            log.links.updates = st.links;
        }
        self.advance_inputs();
    }

    /// What this reader needs decoded: every stream's facts, and the events'
    /// objects only when it keeps whole events (the served model's history).
    pub fn decoding(&self) -> crate::ingest::decode::Decoding {
        self.decoding.clone()
    }

    /// The clock follows [`Feeder::advance_watermark`] instead of the largest event time.
    pub fn external_clock(&mut self) {
        self.ingest.external_clock = true;
    }

    /// Reads one line (without its line ending) and feeds what it means.
    pub fn read(&mut self, line: &[u8]) -> Outcome {
        let outcome = self.ingest.read(line);
        self.fed(outcome, None)
    }

    /// Feeds a line as a source decoded it (see `crate::ingest::decode`).
    pub fn read_prepared(&mut self, prepared: crate::ingest::decode::Prepared) -> Outcome {
        use crate::ingest::decode::Item;
        match prepared.item {
            Item::Blank => self.fed(Outcome::Blank, None),
            Item::Bad { reason, .. } => {
                self.ingest.counters.read += 1;
                let outcome = self.ingest.reject(reason);
                self.fed(outcome, None)
            }
            Item::Event { event, facts } => {
                self.ingest.counters.read += 1;
                let outcome = self.ingest.accept(event);
                self.fed(outcome, Some(facts))
            }
        }
    }

    fn fed(&mut self, outcome: Outcome, facts: Option<crate::ingest::decode::Facts>) -> Outcome {
        if let Outcome::Accepted(s) = &outcome {
            if self.until.is_none_or(|u| s.effect <= u) {
                let facts = facts.unwrap_or_else(|| self.decoding.facts(&s.event));
                self.feed(s, facts);
            }
        }
        self.advance_inputs();
        outcome
    }

    fn feed(&mut self, s: &Stamped, facts: crate::ingest::decode::Facts) {
        let anchor = self.identities.changes(s, &mut self.node_changes, &mut self.link_changes);
        for (d, t, r) in self.node_changes.drain(..) {
            if let Some(log) = &mut self.retained {
                log.nodes.push(d.clone(), t, r);
            }
            self.inputs.nodes.update_at(d, t, r);
        }
        for (d, t, r) in self.link_changes.drain(..) {
            if let Some(log) = &mut self.retained {
                log.links.push(d, t, r);
            }
            self.inputs.links.update_at(d, t, r);
        }
        if let Some(events) = &mut self.inputs.events {
            events.update_at((anchor, crate::ingest::event::Kept(s.event.clone())), s.effect, 1);
        }
        for (stream, pay) in facts {
            if let Pay::Stamped(..) = pay {
                self.latest(anchor, stream, s, pay);
            } else {
                self.fact((anchor, stream, s.event.time, pay), s.effect, 1);
            }
        }
    }

    /// Feeds a stamped fact of a lifetime "latest value" stream, keeping only
    /// the facts that can still win: one per anchor and stream once effects
    /// arrive in order. A newer value retracts the one it beats at its own
    /// effect tick; one that can never win (older, and effective no sooner)
    /// is not fed at all; one effective sooner than the current winner (read
    /// out of order) is fed as it is, and the term's fold takes the max.
    /// Several readers each keep their own winners; the fold takes the max
    /// over all of them.
    fn latest(&mut self, anchor: Key, stream: u32, s: &Stamped, pay: Pay) {
        let rank = |p: &Pay| match p {
            Pay::Stamped(s) => (s.time, s.text.clone()),
            _ => unreachable!("stamped"),
        };
        // A fact carries its own event time, so a retraction cancels its fact.
        let fact = |pay: Pay| match pay {
            Pay::Stamped(ref st) => (anchor, stream, st.time, pay),
            _ => (anchor, stream, s.event.time, pay),
        };
        match self.winners.get_mut(&(anchor, stream)) {
            Some((eff, best)) if s.effect >= *eff => {
                if rank(&pay) > rank(best) {
                    let old = std::mem::replace(best, pay.clone());
                    *eff = s.effect;
                    self.fact(fact(old), s.effect, -1);
                    self.fact(fact(pay), s.effect, 1);
                }
            }
            Some(_) => self.fact(fact(pay), s.effect, 1),
            None => {
                self.winners.insert((anchor, stream), (s.effect, pay.clone()));
                self.fact(fact(pay), s.effect, 1);
            }
        }
    }

    /// Moves the inputs with the clock, but never past `until`: ticks after
    /// it are never final, so nothing after it is computed or written.
    fn advance_inputs(&mut self) {
        let tick = self.ingest.clock.tick;
        let frontier = self.ingest.clock.frontier();
        self.advance_inputs_to(self.until.map_or(frontier, |u| frontier.min(u / tick * tick + tick)));
    }

    fn advance_inputs_to(&mut self, frontier: u64) {
        if let Some(timings) = self.timings.as_ref().filter(|_| frontier > *self.inputs.facts.time()) {
            timings.finals.lock().expect("not poisoned").push((frontier, Instant::now()));
        }
        self.inputs.advance_to(frontier);
    }

    /// Moves the clock to `t` with no event (live input gone idle).
    pub fn advance_clock(&mut self, t: u64) {
        self.ingest.advance_clock(t);
        self.advance_inputs();
    }

    /// Moves the clock by an event-time watermark (see [`Ingest::advance_watermark`]).
    pub fn advance_watermark(&mut self, w: u64) {
        self.ingest.advance_watermark(w);
        self.advance_inputs();
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

    /// Ends bounded input: the clock moves to the last tick (SPEC §3) and the
    /// inputs to just past it. Returns the last tick, if any event counted.
    pub fn finish(&mut self) -> Option<u64> {
        let last = self.ingest.final_tick(self.until);
        if let Some(t) = last {
            self.advance_inputs_to(t + self.ingest.clock.tick);
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

    fn done(&self) {
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

/// One reader's side of the run: its feeder, its notes to the sink, and
/// the pacing against the delivered frontier.
pub struct Reader<'w> {
    pub worker: &'w mut timely::worker::Worker,
    pub feeder: Feeder,
    notes: timely::dataflow::InputHandleVec<u64, Note>,
    delivered: timely::dataflow::ProbeHandle<u64>,
    in_flight: u64,
    /// The reader's frontier at its last few pumps, oldest first.
    pumped: std::collections::VecDeque<u64>,
    pub progress: Progress,
    pub opts: RunOptions,
    pub stop: Arc<AtomicBool>,
    /// The served model (process 0 with `--http`).
    pub served: Option<Arc<crate::serve::model::Served>>,
    /// Serving (`--http`, on every process): counters go to the sink.
    serving: bool,
    checkpoints: Option<ReaderCheckpoints>,
}

impl Reader<'_> {
    /// Shows this reader's counters to `/metrics`: sent to the sink on
    /// worker 0 of process 0 through the dataflow, so readers of every
    /// process count (a note per batch; notes from one worker arrive in
    /// order).
    fn publish_counters(&mut self) {
        if self.serving {
            self.notes.send(Note::Counters(self.worker.index(), self.feeder.counters().clone()));
        }
    }

    /// Whether this run keeps checkpoints (`--state`).
    pub fn checkpointing(&self) -> bool {
        self.checkpoints.is_some()
    }

    /// Sends a dead letter to the sink.
    pub fn dead_letter(&mut self, line: String) {
        if let Some(ck) = &mut self.checkpoints {
            ck.dead.push_back(line.clone());
            ck.dead_sent += 1;
        }
        self.notes.send(Note::Dead(self.worker.index(), line));
    }

    /// Takes a checkpoint when one is due and the delivered frontier moved
    /// since the last one. With several readers (Kafka), worker 0 opens a
    /// round at the delivered mark, every reader adds its state at that
    /// frontier when it next comes by, and the last one writes it.
    pub fn checkpoint_if_due(&mut self, position: impl FnOnce() -> crate::io::Position) {
        let Some(ck) = &self.checkpoints else { return };
        let shared = ck.shared.clone();
        let due = ck.last.elapsed() >= shared.every
            && shared.delivered.lock().expect("not poisoned").mark.frontier > shared.written.load(Ordering::SeqCst);
        if shared.readers_count == 1 {
            if due {
                self.checkpoint(position());
            }
            return;
        }
        let me = self.worker.index();
        if due && me == 0 {
            let Some(mark) = shared.mark() else { return };
            if shared.rounds.lock().expect("not poisoned").open(mark) {
                self.checkpoints.as_mut().expect("checked").last = Instant::now();
            }
        }
        let Some(frontier) = shared.rounds.lock().expect("not poisoned").owed_by(me) else {
            return;
        };
        let Some(st) = self.own_state(frontier, position()) else { return };
        shared.rounds.lock().expect("not poisoned").give(me, st);
        shared.complete_round();
    }

    /// This reader's state at `frontier` (a copy; the logs stay).
    fn own_state(&mut self, frontier: u64, position: crate::io::Position) -> Option<checkpoint::ReaderState> {
        let shared = self.checkpoints.as_ref()?.shared.clone();
        let written = shared.delivered.lock().expect("not poisoned").mark.dead_written.clone();
        let lent = self.lend_state(frontier, &written, position)?;
        let st = lent.clone();
        self.feeder.checkpointed(lent);
        Some(st)
    }

    /// This reader's state at `frontier`, its logs lent (give them back
    /// with [`Feeder::checkpointed`]), with the dead letters the sink has
    /// not written yet (`written`: dead letters written, by reader).
    fn lend_state(
        &mut self,
        frontier: u64,
        written: &std::collections::BTreeMap<usize, u64>,
        position: crate::io::Position,
    ) -> Option<checkpoint::ReaderState> {
        self.advance_notes();
        let worker = self.worker.index();
        let ck = self.checkpoints.as_mut()?;
        let unwritten = ck.dead_sent.saturating_sub(written.get(&worker).copied().unwrap_or(0)) as usize;
        while ck.dead.len() > unwritten {
            ck.dead.pop_front();
        }
        let (dead, dead_sent) = (ck.dead.iter().cloned().collect(), ck.dead_sent);
        let mut st = self.feeder.checkpoint(frontier, worker, position)?;
        st.dead = dead;
        st.dead_sent = dead_sent;
        Some(st)
    }

    /// The last checkpoint of a reader that stops reading (the end of
    /// bounded input, or a stop): with one reader, a checkpoint now; with
    /// several, its final state is kept for every later checkpoint, and the
    /// last reader to stop writes one with them all.
    pub fn checkpoint_final(&mut self, position: crate::io::Position) {
        let Some(ck) = &self.checkpoints else { return };
        let shared = ck.shared.clone();
        if shared.readers_count == 1 {
            return self.checkpoint(position);
        }
        let Some(mark) = shared.mark() else { return };
        // Taken after the mark: a round opened since is at the mark or later.
        let frontier = shared
            .rounds
            .lock()
            .expect("not poisoned")
            .final_frontier(mark.frontier.min(self.feeder.frontier()));
        let Some(st) = self.own_state(frontier, position) else { return };
        let all = shared.rounds.lock().expect("not poisoned").stop(self.worker.index(), frontier, st);
        shared.complete_round();
        if all {
            let Some(mark) = shared.mark() else { return };
            let finals = shared
                .rounds
                .lock()
                .expect("not poisoned")
                .finals(&mark, |st, frontier| shared.compacted(st, frontier));
            if let Some(states) = finals {
                shared.write(mark, states);
            }
        }
    }

    /// Writes a checkpoint at the delivered frontier with this reader at
    /// `position` (one reader: line input on worker 0, or Kafka with one
    /// worker). A failed write is reported and retried at the next one; the
    /// last good checkpoint stays.
    pub fn checkpoint(&mut self, position: crate::io::Position) {
        let Some(ck) = self.checkpoints.as_mut() else { return };
        ck.last = Instant::now();
        let shared = ck.shared.clone();
        let Some(mark) = shared.mark() else { return };
        // Every tick before the mark is out; ticks after the reader's clock
        // hold nothing yet.
        let frontier = mark.frontier.min(self.feeder.frontier());
        // The logs are lent to the snapshot, not copied, and given back.
        let Some(reader) = self.lend_state(frontier, &mark.dead_written, position) else {
            return;
        };
        let mut readers = shared.write(crate::output::sink::Mark { frontier, ..mark }, vec![reader]);
        self.feeder.checkpointed(readers.pop().expect("one reader"));
    }

    /// Takes up this reader's part of the checkpoint resumed from; returns
    /// its input position.
    fn restore(&mut self) -> Option<crate::io::Position> {
        let worker = self.worker.index();
        let st = self.checkpoints.as_ref()?.shared.take_reader(worker)?;
        let (dead, dead_sent, position) = (st.dead.clone(), st.dead_sent, st.position.clone());
        self.feeder.restore(st);
        let ck = self.checkpoints.as_mut().expect("checked");
        ck.dead_sent = dead_sent;
        for line in &dead {
            self.notes.send(Note::Dead(worker, line.clone()));
        }
        ck.dead = dead.into();
        Some(position)
    }

    /// Whether a stop was asked for.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Hands what was read to the dataflow and keeps at most [`LEAD`] + 1
    /// batches beyond what was delivered; `live` waits until the batch is
    /// out, so changes follow events promptly. (With a lead of one batch,
    /// the reading worker waited for each batch's ticks to be written
    /// before reading on, while the other worker had nothing to do: four
    /// are 6% faster on 2 workers, see `docs/performance.md`.) While it
    /// waits the worker parks when it has nothing to do (woken by the
    /// others' messages): spinning took its share of a core from the
    /// decoding thread and the other workers.
    pub fn pump(&mut self, live: bool, extra: impl FnOnce() -> String) {
        self.progress.tick(&self.feeder, self.opts.tick, extra);
        self.publish_counters();
        self.advance_notes();
        let frontier = self.feeder.frontier();
        while self.delivered.less_than(&self.in_flight) && !self.stopping() {
            self.worker.step_or_park(Some(Duration::from_millis(1)));
        }
        if live {
            self.in_flight = frontier;
        } else {
            self.pumped.push_back(frontier);
            if self.pumped.len() > LEAD {
                self.in_flight = self.pumped.pop_front().expect("pumped");
            }
        }
        self.worker.step();
        if live {
            while self.delivered.less_than(&self.in_flight) && !self.stopping() {
                self.worker.step_or_park(Some(Duration::from_millis(1)));
            }
        }
    }

    /// Whether everything before `t` is delivered.
    pub fn delivered_past(&self, t: u64) -> bool {
        !self.delivered.less_than(&t)
    }

    /// The delivered frontier: every tick before it is out.
    pub fn delivered_frontier(&self) -> u64 {
        self.delivered.with_frontier(|f| f.first().copied().unwrap_or(u64::MAX))
    }

    /// Steps the worker until everything before the reader's frontier is
    /// delivered (or a stop).
    pub fn drain(&mut self) {
        self.advance_notes();
        let end = self.feeder.frontier();
        while self.delivered.less_than(&end) && !self.stopping() {
            self.worker.step_or_park(Some(Duration::from_millis(1)));
        }
    }

    /// Ends bounded input: moves the clock to the last tick and waits until
    /// everything up to it is delivered.
    pub fn finish_input(&mut self) -> Option<u64> {
        let last = self.feeder.finish();
        self.drain();
        last
    }

    /// On a stop: waits until what is final is delivered, or until the
    /// delivered frontier stops moving for a while (other readers may be
    /// further behind).
    pub fn settle(&mut self) {
        self.advance_notes();
        let end = self.feeder.frontier();
        let (mut seen, mut since) = (self.delivered_frontier(), Instant::now());
        while self.delivered.less_than(&end) && since.elapsed() < Duration::from_millis(500) {
            self.worker.step_or_park(Some(Duration::from_millis(1)));
            if self.delivered_frontier() != seen {
                (seen, since) = (self.delivered_frontier(), Instant::now());
            }
        }
    }

    /// Ends bounded input: moves the clock to the last tick, reports, and
    /// closes the inputs.
    pub fn finish(mut self) {
        self.progress.done();
        let last = self.finish_input();
        self.report(last, false);
    }

    /// Hands buffered updates and notes to the dataflow, notes at the clock.
    fn advance_notes(&mut self) {
        self.feeder.flush();
        let frontier = self.feeder.frontier();
        if frontier > *self.notes.time() {
            self.notes.advance_to(frontier);
        }
        self.notes.flush();
    }

    fn report(&mut self, last: Option<u64>, stopped: bool) {
        self.publish_counters();
        self.advance_notes();
        self.notes.send(Note::Report(Report {
            counters: self.feeder.counters().clone(),
            last,
            stopped,
        }));
    }

    /// Ends on a stop: reports without moving the clock (what was not final
    /// stays unwritten), then closes.
    pub fn stop(mut self) {
        self.progress.done();
        self.feeder.flush();
        let last = self.feeder.frontier().checked_sub(self.opts.tick);
        self.report(last, true);
    }
}

fn run_worker(
    worker: &mut timely::worker::Worker,
    job: &Job,
    served: Option<Arc<crate::serve::model::Served>>,
    checkpointing: Option<Arc<Checkpointing>>,
) -> Result<Option<Summary>, EngineError> {
    let plan = Rc::new(Plan::new(&job.spec));
    let opts = &job.opts;
    let leader = worker.index() == 0;
    let state = Rc::new(RefCell::new(SinkState::default()));
    let restored = checkpointing.as_ref().and_then(|c| c.restored.as_ref());
    let resumed_at = restored.map(|s| s.mark.frontier);
    if let Some(snap) = restored.filter(|_| leader) {
        // Ticks before the checkpoint's frontier are out already.
        let mut st = state.borrow_mut();
        st.skip_before = snap.mark.frontier;
        st.diffs = snap.mark.diffs;
        st.dead_written = snap.mark.dead_written.clone();
    }
    let open = |o: &Option<OpenOutput>, resume: Option<u64>| match (o, leader) {
        (Some(open), true) => open(resume).map(Some),
        _ => Ok(None),
    };
    let outputs = Outputs {
        segments: Rc::new(plan.segments.iter().map(|s| s.name.clone()).collect()),
        show_ms: opts.tick < 1000,
        changes: open(&job.output, restored.map(|s| s.mark.changes.unwrap_or(0)))?,
        dead_letters: open(&job.dead_letters, restored.map(|s| s.mark.dead.unwrap_or(0)))?,
        state: state.clone(),
        timings: job.timings.clone(),
        observer: served
            .clone()
            .filter(|_| leader)
            .map(|s| s as Arc<dyn crate::output::sink::Observer>),
        delivered: checkpointing.as_ref().filter(|_| leader).map(|c| c.delivered.clone()),
    };
    // Every worker builds the same dataflow, serving or not.
    let serving = job.http.is_some();
    // Serving with history: accepted events go to the model too.
    let history = job.http.as_ref().map(|h| h.history(&plan)).is_some_and(|h| h.keeps());
    let memory = checkpointing.as_ref().map(|c| c.clusters.clone());
    let mut notes = timely::dataflow::InputHandleVec::new();
    let profiling = crate::run::profile::Profiling::start(worker);
    let (inputs, delivered) = worker.dataflow::<u64, _, _>(|scope| {
        use differential_dataflow::input::Input as _;
        use timely::dataflow::operators::{Input, Probe};
        let (mut inputs, built) = build_with(scope, &plan, opts.tick, memory, serving);
        let notes = scope.input_from(&mut notes).container::<Vec<Note>>();
        let mut members = identity::named(built.members, built.names.clone()).map(|(s, id)| crate::output::sink::Upd::Member(s, id));
        if serving {
            use crate::output::sink::Upd;
            let terms = built
                .terms
                .expect("asked for")
                .map(|((stream, p), values)| Upd::Term(p, stream, values));
            let names = built.names.map(|(p, id)| Upd::Name(p, id));
            let labels = built.labels.map(|(node, p)| Upd::Label(node, p));
            let nodes = built.nodes.flat_map(|(k, (seen, id, _))| seen.then_some(Upd::Node(k, id)));
            members = members.concat(terms).concat(names).concat(labels).concat(nodes);
            if history {
                let (events_in, events) = scope.new_collection();
                inputs.events = Some(events_in);
                members = members.concat(events.map(|(anchor, ev)| Upd::Event(anchor, ev)));
            }
        }
        let (delivered, _) = sink::deliver(members, notes, outputs).probe();

        sink::profiles(built.universe, state.clone());
        (inputs, delivered)
    });
    let mut feeder = Feeder::new(plan, inputs, opts);
    feeder.timings = job.timings.clone();
    if checkpointing.is_some() {
        feeder.retain();
    }
    let mut reader = Reader {
        worker,
        feeder,
        notes,
        delivered,
        in_flight: 0,
        pumped: std::collections::VecDeque::new(),
        progress: Progress::new(),
        opts: opts.clone(),
        stop: job.stop.clone(),
        served,
        serving,
        checkpoints: checkpointing.map(|shared| ReaderCheckpoints {
            shared,
            last: Instant::now(),
            dead: Default::default(),
            dead_sent: 0,
        }),
    };
    let position = reader.restore();
    if let (Some(served), Some(frontier)) = (&reader.served, resumed_at) {
        // The checkpoint holds facts, not events: the model's history starts here.
        served.model.write().expect("not poisoned").retained.complete_from = frontier;
    }
    let result = match (&job.kafka, leader) {
        (Some(kafka), _) => crate::run::kafka::read(&mut reader, kafka, position),
        (None, true) => read_lines(&mut reader, &job.sources, position),
        (None, false) => Ok(()),
    };
    let stopped = reader.stopping();
    if let Err(e) = result {
        // Stop the other readers of this process too; what is final is kept.
        job.stop.store(true, Ordering::SeqCst);
        reader.stop();
        while worker.step_or_park(None) {}
        return Err(e);
    }
    if stopped {
        reader.stop();
    } else {
        reader.finish();
    }
    while worker.step_or_park(None) {}
    if let Some(p) = profiling {
        if let Some(log) = worker.logging() {
            log.flush();
        }
        p.finish(worker.index());
    }
    if !leader {
        return Ok(None);
    }
    let st = state.borrow();
    if let Some(e) = &st.error {
        return Err(EngineError::Write(e.clone()));
    }
    let Counters {
        read,
        accepted,
        bad,
        duplicates,
        late,
        ignored,
    } = st.counters.clone();
    Ok(Some(Summary {
        events_read: read,
        accepted,
        bad,
        duplicates,
        late,
        ignored,
        profiles: st.profiles_at_last(),
        diffs_written: st.diffs,
        clock: st.last.map(|t| format_time(t, opts.tick < 1000)),
    }))
}

/// Reads the line sources in order (worker 0 of process 0), from `start`
/// when resuming; checkpoints as it goes, at a stop, and at the end.
fn read_lines(reader: &mut Reader<'_>, sources: &[Source], start: Option<crate::io::Position>) -> Result<(), EngineError> {
    let mut line = Vec::new();
    let opts = reader.opts.clone();
    let tick = Duration::from_millis(opts.tick);
    let idle = Duration::from_millis(opts.idle);
    let (first, offset, mut number) = match start {
        Some(crate::io::Position::Lines { source, offset, line }) => (source, offset, line),
        _ => (0, 0, 0),
    };
    let at = |source: usize, lines: &crate::io::source::Lines, line: u64| crate::io::Position::Lines {
        source,
        offset: lines.offset(),
        line,
    };
    for (index, source) in sources.iter().enumerate().skip(first) {
        let name = source.name();
        let decoding = reader.feeder.decoding();
        let mut lines = if index == first {
            source.open_at(offset, &decoding)?
        } else {
            source.open(&decoding)?
        };
        if index != first {
            number = 0;
        }
        let live = lines.is_live();
        // Live clock: when the last event came, and the clock then.
        let mut last_event = (Instant::now(), reader.feeder.now());
        let mut batch = 0usize;
        let mut last_pump = Instant::now();
        loop {
            if reader.stopping() {
                reader.settle();
                reader.checkpoint(at(index, &lines, number));
                return Ok(());
            }
            let wait = if batch > 0 { Duration::from_millis(20) } else { tick.min(idle) };
            let next = lines
                .next(&mut line, wait)
                .map_err(crate::io::Error::input(format!("read {name}")))?;
            match next {
                Next::End => break,
                Next::Idle => {
                    let (at, now) = last_event;
                    if let Some(now) = now.filter(|_| at.elapsed() >= idle) {
                        reader
                            .feeder
                            .advance_clock(now + (at.elapsed().as_millis() as u64 / opts.tick) * opts.tick);
                    }
                    batch = 0;
                    reader.pump(live, String::new);
                }
                Next::Prepared(prepared) => {
                    number += 1;
                    let outcome = reader.feeder.read_prepared(*prepared);
                    if let Outcome::Bad(reason) = &outcome {
                        reader.dead_letter(dead_letter(&name, number, reason, &line));
                    }
                    if matches!(outcome, Outcome::Accepted(_)) {
                        last_event = (Instant::now(), reader.feeder.now());
                    }
                    batch += 1;
                    // Live, a steady stream is pushed through every few
                    // milliseconds, not only when a batch fills.
                    if batch >= BATCH || (live && last_pump.elapsed() >= LIVE_PUMP) {
                        batch = 0;
                        reader.pump(live, String::new);
                        last_pump = Instant::now();
                        reader.checkpoint_if_due(|| at(index, &lines, number));
                    }
                }
            }
        }
    }
    if reader.checkpoints.is_some() {
        // The end: everything delivered, then a checkpoint past the input,
        // so that running the same command again writes nothing more.
        reader.finish_input();
        reader.checkpoint(crate::io::Position::Lines {
            source: sources.len(),
            offset: 0,
            line: 0,
        });
    }
    Ok(())
}
