//! A run: a [`Job`] on timely workers, from its inputs to its summary.
//!
//! [`run`] starts the workers (and the HTTP server, on process 0); each
//! worker ([`worker`]) builds the dataflow, wires the sink and runs its
//! reader ([`reader`]) over line sources ([`lines`]) or Kafka partitions
//! ([`kafka`]). A reader's [`feeder`] hands stamped events to the
//! dataflow's inputs; [`checkpointing`] and [`checkpoint`] make the run
//! durable, with [`kept`] for what the API changed; [`progress`] and
//! [`profile`] report on it.
//!
//! Readers feed the dataflow. File input, stdin and the generator are read
//! in order by one reader, on worker 0 of process 0; Kafka partitions are
//! spread over every worker of every process, each worker reading its own
//! (see [`kafka`]). A reader runs a [`feeder::Feeder`]: its own `Ingest` (dedupe,
//! clock, lateness) that feeds three differential inputs — facts for the
//! windowed streams, identity nodes and identity links — each at the tick
//! the event takes effect, plus a stream of notes (dead letters, and a
//! report at the end) for the sink. Readers advance their inputs with their
//! clock, a batch of lines at a time (never a round trip per tick), and keep
//! at most a few batches beyond what the output has *delivered*, so a
//! slow output slows the input instead of growing a queue. The dataflow's
//! frontier is the least of the readers' clocks; a worker with nothing to
//! read closes its inputs at once and runs its share of the dataflow.

pub mod checkpoint;
pub mod checkpointing;
pub mod error;
pub mod feeder;
pub mod job;
pub mod kafka;
pub mod kept;
pub mod lines;
pub mod profile;
pub mod progress;
pub mod reader;
pub mod worker;

use std::sync::{Arc, Mutex};

use crate::io::source::Source;
use crate::output::deliver::memory_output;
use crate::plan::Plan;
use crate::run::checkpointing::Checkpointing;
use crate::run::worker::run_worker;
use crate::serve::model::Served;
use crate::spec::Spec;

pub use crate::run::error::EngineError;
pub use crate::run::job::{HttpOptions, Job, RunOptions, StateOptions, Summary};

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
    let source = Source::Bytes {
        name: "input".into(),
        data: Arc::new(input.to_vec()),
    };
    let job = Job {
        output: Some(memory_output(out.clone())),
        dead_letters: Some(memory_output(dead.clone())),
        ..Job::quiet(spec.clone(), opts.clone(), vec![source])
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

/// Starts serving `http`: the served model, with what `--state` kept of
/// the API's changes and access rules, and the server on its thread.
fn serve(job: &Job, http: &HttpOptions) -> Result<Served_, EngineError> {
    let plan = Arc::new(Plan::new(&job.spec));
    let history = http.history(&plan);
    let text = http.spec_text.clone();
    let served = Served::new(&job.spec, text, plan, job.opts.tick, (history, http.retain), job.stop.clone());
    let mut access = http.access.clone();
    let mut requests = Vec::new();
    if let Some(state) = &job.state {
        let kept = kept::Kept::open(&state.dir)?;
        access = kept.access(access)?;
        for entry in &kept.changes {
            if let crate::serve::model::Change::Request(r) = &entry.change {
                requests.push((entry.at, r.clone()));
            }
        }
        served.keep_changes(kept.journal, kept.changes);
    }
    let listener = std::net::TcpListener::bind(&http.addr).map_err(|error| EngineError::Listen {
        addr: http.addr.clone(),
        error,
    })?;
    let addr = listener.local_addr().map_err(EngineError::Server)?;
    if !addr.ip().is_loopback() && access.open() && !http.insecure {
        return Err(EngineError::Refused(format!(
            "--http {}: serving an address other hosts can reach needs --http-token-file \
             (or --http-insecure to serve it open to anyone)",
            http.addr
        )));
    }
    let server = crate::serve::http::spawn(
        listener,
        served.clone(),
        http.events.clone(),
        access,
        http.tls.clone(),
        http.timeout,
    )
    .map_err(EngineError::Server)?;
    if let Some(f) = &http.on_listen {
        f(addr);
    }
    Ok((served, server, requests))
}

/// What [`serve`] starts: the model, the server, and the forget and unlink
/// requests journaled before a restart.
type Served_ = (Arc<Served>, crate::serve::http::Server, Vec<(u64, crate::core::id::Request)>);

/// Runs a job to the end of its input; the summary comes from worker 0.
pub fn run(mut job: Job) -> Result<Summary, EngineError> {
    let config = job.timely.clone();
    let process = match &config.communication {
        timely::CommunicationConfig::Cluster { process, .. } => *process,
        _ => 0,
    };
    // Only process 0 serves: it holds worker 0, where the output is written.
    let (served, server, journaled) = match (&job.http, process) {
        (Some(http), 0) => {
            let (served, server, journaled) = serve(&job, http)?;
            (Some(served), Some(server), journaled)
        }
        _ => (None, None, Vec::new()),
    };
    let checkpointing = match &job.state {
        Some(state) => Some(Arc::new(Checkpointing::open(&job, state, &config, served.clone())?)),
        None => None,
    };
    // Requests journaled after the checkpoint resumed from are fed again
    // at their ticks; the checkpoint holds the earlier ones.
    let restored = checkpointing.as_ref().and_then(|c| c.restored.as_ref());
    if let (Some(served), Some(kept)) = (&served, restored.and_then(|s| s.kept.as_ref())) {
        served.restore_kept(kept.clone());
    }
    let resumed = restored.map_or(0, |s| s.mark.frontier);
    job.opts.requests.extend(journaled.into_iter().filter(|(at, _)| *at >= resumed));
    let connected = job.connected.clone();
    let job = Arc::new(job);
    let guards = timely::execute(config, move |worker| {
        run_worker(worker, &job, served.clone(), checkpointing.clone())
    })
    .map_err(EngineError::Timely)?;
    // `execute` returns once the cluster is connected.
    connected.store(true, std::sync::atomic::Ordering::SeqCst);
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
