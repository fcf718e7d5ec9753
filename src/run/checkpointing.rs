//! A run's checkpoints, shared by the workers of a process: opening the
//! state directory, the delivered mark, rounds over several readers.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::dataflow::cluster;
use crate::io::source::Source;
use crate::plan::Plan;
use crate::run::checkpoint;
use crate::run::job::{Job, StateOptions};
use crate::run::EngineError;

/// A run's checkpoints, shared by the workers of this process.
pub struct Checkpointing {
    pub(crate) store: checkpoint::Store,
    pub(crate) every: Duration,
    pub(crate) fingerprint: checkpoint::Fingerprint,
    /// The checkpoint resumed from.
    pub(crate) restored: Option<checkpoint::Snapshot>,
    /// Each reader's part of it, taken by the reader.
    pub(crate) readers: Mutex<Vec<checkpoint::ReaderState>>,
    pub(crate) seq: std::sync::atomic::AtomicU64,
    pub(crate) clusters: Arc<cluster::Memory>,
    pub(crate) delivered: Arc<Mutex<crate::output::sink::Delivered>>,
    /// Readers in this run: 1 for line input, every worker for Kafka.
    pub(crate) readers_count: usize,
    /// Several readers: the checkpoint being gathered, and the final states
    /// of readers that stopped reading.
    pub(crate) rounds: Mutex<checkpoint::Rounds>,
    /// The delivered frontier of the last checkpoint written.
    pub(crate) written: std::sync::atomic::AtomicU64,
    pub(crate) windows: Vec<Option<u64>>,
    pub(crate) tick: u64,
}

impl Checkpointing {
    /// Opens the state directory and reads the newest usable checkpoint.
    pub(crate) fn open(job: &Job, state: &StateOptions, config: &timely::Config) -> Result<Checkpointing, EngineError> {
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
    pub(crate) fn write(&self, mark: crate::output::sink::Mark, readers: Vec<checkpoint::ReaderState>) -> Vec<checkpoint::ReaderState> {
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
    pub(crate) fn mark(&self) -> Option<crate::output::sink::Mark> {
        match self.delivered.lock().expect("not poisoned").synced() {
            Ok(mark) => Some(mark),
            Err(e) => {
                eprintln!("shoal: cannot sync the output before a checkpoint: {e}; the last good checkpoint is kept");
                None
            }
        }
    }

    /// A copy of a stopped reader's final state, compacted at `frontier`.
    pub(crate) fn compacted(&self, st: &checkpoint::ReaderState, frontier: u64) -> checkpoint::ReaderState {
        let mut st = st.clone();
        st.compact(frontier, self.tick, &self.windows);
        st
    }

    /// Several readers: writes the open round once every reader has given
    /// its state or stopped reading.
    pub(crate) fn complete_round(&self) {
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
    pub(crate) fn take_reader(&self, worker: usize) -> Option<checkpoint::ReaderState> {
        let mut readers = self.readers.lock().expect("not poisoned");
        let i = readers.iter().position(|r| r.worker == worker)?;
        Some(readers.swap_remove(i))
    }
}
