//! What a run is given: a [`Job`] (spec, options, inputs, outputs) and
//! what it returns, a [`Summary`].

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::io::source::Source;
use crate::output::deliver::OpenOutput;
use crate::output::sink::Timings;
use crate::plan::Plan;
use crate::spec::Spec;

/// Forgotten ids by the tick they were forgotten at, shared by the readers
/// of a process: each drops the events naming one (see
/// `crate::run::feeder::Feeder::suppress_with`).
pub type Suppression = Arc<std::sync::RwLock<rustc_hash::FxHashMap<crate::core::id::Key, u64>>>;

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
    /// Threads decoding file input ahead of its reader (at least one).
    pub decoders: usize,
    /// Where the id graph is kept; `None`: partitioned over the workers of
    /// a cluster of several processes, on one worker otherwise.
    pub identity: Option<crate::dataflow::identity::Placement>,
    /// Requests (forget, unlink) fed at given ticks, as if made over the
    /// API then (tests, and a journal's after a restart). Whether there
    /// are any decides whether the dataflow applies requests at all, so in
    /// a cluster without `--http` and `--state` (which apply them anyway)
    /// every process must be given them alike.
    pub requests: Vec<(u64, crate::core::id::Request)>,
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
            identity: None,
            decoders: 1,
            requests: Vec::new(),
        }
    }
}

/// Checkpoints (`--state DIR`, `--checkpoint-every`); see `crate::run::checkpoint`.
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
    /// Set once every process of the cluster is connected and the workers
    /// run (at once with one process).
    pub connected: Arc<AtomicBool>,
    /// Wall-clock marks for the latency benchmark.
    pub timings: Option<Arc<Timings>>,
    /// Serve the HTTP API (SPEC §7) on this address (process 0 only), and
    /// keep serving after the input ends until the stop flag.
    pub http: Option<HttpOptions>,
    /// Write checkpoints there, and resume from the newest.
    pub state: Option<StateOptions>,
    /// Forgotten ids, shared by this process's readers.
    pub suppression: Suppression,
}

/// Where the HTTP API listens.
#[derive(Clone)]
pub struct HttpOptions {
    pub addr: String,
    /// How long the served model keeps accepted events, for segments defined
    /// at run time over terms the spec does not compute (`--history`);
    /// `None`: the longest window of the spec.
    pub history: Option<crate::serve::model::History>,
    /// Take events over HTTP (`/v1/…`, `--write-key-file`): the write keys
    /// and the intake, which is also the run's source.
    pub events: Option<Arc<crate::serve::events::EventsIn>>,
    /// How long membership changes are kept for `?at=` (`--retain`).
    pub retain: crate::serve::model::History,
    /// The spec file's text, for `GET /spec` (without it, the running
    /// spec is written from the segments alone).
    pub spec_text: Option<String>,
    /// Bearer tokens for the API (`--http-token-file`, `--http-read-token-file`).
    pub access: crate::serve::http::Access,
    /// Serve a non-loopback address without a token (`--http-insecure`).
    pub insecure: bool,
    /// Serve HTTPS (`--http-tls-cert`, `--http-tls-key`).
    pub tls: Option<crate::serve::http::TlsConfig>,
    /// A client's time for its headers, and for its body and the answer
    /// (`--http-timeout`).
    pub timeout: std::time::Duration,
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
            connected: Arc::default(),
            timings: None,
            http: None,
            state: None,
            suppression: Default::default(),
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
    /// Events dropped because they name a forgotten id.
    pub suppressed: u64,
    pub profiles: i64,
    pub diffs_written: u64,
    /// The final clock, RFC 3339; `None` when no event was accepted.
    pub clock: Option<String>,
}
