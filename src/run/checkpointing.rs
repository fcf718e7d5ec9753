//! A run's checkpoints, shared by the workers of a process: opening the
//! state directory, the delivered mark, rounds over several readers.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::io::source::Source;
use crate::plan::Plan;
use crate::run::checkpoint;
use crate::run::error::EngineError;
use crate::run::job::{Job, StateOptions};

/// A run's checkpoints, shared by the workers of this process.
pub struct Checkpointing {
    pub(super) store: checkpoint::Store,
    pub(super) every: Duration,
    pub(super) fingerprint: checkpoint::Fingerprint,
    /// The checkpoint resumed from.
    pub(super) restored: Option<checkpoint::Snapshot>,
    /// Each reader's part of it, taken by the reader.
    pub(super) readers: Mutex<Vec<checkpoint::ReaderState>>,
    pub(super) seq: std::sync::atomic::AtomicU64,
    pub(super) kept: Arc<crate::dataflow::Kept>,
    pub(super) delivered: Arc<Mutex<crate::output::sink::Delivered>>,
    /// Readers in this run: 1 for line input, every worker for Kafka.
    pub(super) readers_count: usize,
    /// Several readers: the checkpoint being gathered, and the final states
    /// of readers that stopped reading.
    rounds: Mutex<checkpoint::Rounds>,
    /// The delivered frontier of the last checkpoint written.
    written: std::sync::atomic::AtomicU64,
    /// Held while a checkpoint is numbered and written, so that numbers
    /// follow frontiers.
    writing: Mutex<()>,
    pub(super) windows: Vec<Option<u64>>,
    pub(super) tick: u64,
    /// HTTP input: told what each checkpoint holds, so that its log can be
    /// compacted behind it.
    intake: Option<Arc<crate::io::intake::Intake>>,
    /// The HTTP offsets of the checkpoints written, oldest first (at most
    /// [`checkpoint::KEEP`]).
    intake_offsets: Mutex<std::collections::VecDeque<u64>>,
    /// The served model (with `--http`): its kept events go in checkpoints.
    served: Option<Arc<crate::serve::model::Served>>,
}

impl Checkpointing {
    /// Opens the state directory and reads the newest usable checkpoint.
    pub(super) fn open(
        job: &Job,
        state: &StateOptions,
        config: &timely::Config,
        served: Option<Arc<crate::serve::model::Served>>,
    ) -> Result<Checkpointing, EngineError> {
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
                "--state needs input that can be read again from a checkpoint's position (files, --generate, or HTTP input, whose requests --state logs); \
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
        let kept = crate::dataflow::Kept::new(
            &plan,
            restored.as_ref().map(|s| s.clusters.clone()).unwrap_or_default(),
            restored.as_ref().map(|s| s.models.clone()).unwrap_or_default(),
            true,
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
            writing: Mutex::new(()),
            windows: plan.streams.iter().map(|s| s.window).collect(),
            tick: job.opts.tick,
            seq: (restored.as_ref().map_or(0, |s| s.seq) + 1).into(),
            restored,
            kept: Arc::new(kept),
            // Until the sink says more, what the checkpoint had is out.
            delivered: Arc::new(Mutex::new(crate::output::sink::Delivered { mark, files: Vec::new() })),
            intake: job.sources.iter().find_map(|s| match s {
                Source::Http(intake) => Some(intake.clone()),
                _ => None,
            }),
            intake_offsets: Mutex::default(),
            served,
        })
    }

    /// Writes a snapshot of `states` at `mark`; failures are reported. One
    /// older than a checkpoint already written (a round completed while the
    /// last reader wrote the final one) is skipped: the newest number must
    /// be the newest frontier, which a restart resumes from.
    pub(super) fn write(&self, mark: crate::output::sink::Mark, readers: Vec<checkpoint::ReaderState>) -> Vec<checkpoint::ReaderState> {
        let frontier = mark.frontier;
        let _one = self.writing.lock().expect("not poisoned");
        if frontier < self.written.load(Ordering::SeqCst) {
            tracing::debug!(frontier, "a checkpoint older than the last one written; skipped");
            return readers;
        }
        let snapshot = checkpoint::Snapshot {
            fingerprint: self.fingerprint.clone(),
            seq: self.seq.fetch_add(1, Ordering::SeqCst),
            clusters: self.kept.clusters.before(frontier),
            models: self.kept.models.before(frontier),
            mark,
            readers,
            kept: self.served.as_ref().and_then(|s| s.kept_before(frontier)),
        };
        match self.store.write(&snapshot) {
            Ok(path) => {
                tracing::debug!(path = %path.display(), frontier, "checkpoint written");
                self.written.fetch_max(frontier, Ordering::SeqCst);
                self.compact_intake(&snapshot.readers);
            }
            Err(e) => eprintln!("shoal: {e}; the last good checkpoint is kept"),
        }
        snapshot.readers
    }

    /// Lets the HTTP intake's log go behind the oldest checkpoint the store
    /// keeps ([`checkpoint::KEEP`]): any of them may be the one resumed
    /// from, when the newer ones are unreadable.
    fn compact_intake(&self, readers: &[checkpoint::ReaderState]) {
        let Some(intake) = &self.intake else { return };
        let offset = readers.iter().find_map(|r| match &r.position {
            crate::io::Position::Lines { offset, .. } => Some(*offset),
            crate::io::Position::Kafka(ps) => ps.iter().find(|p| p.topic == crate::io::kafka::HTTP_TOPIC).map(|p| p.next as u64),
        });
        let Some(offset) = offset else { return };
        let mut kept = self.intake_offsets.lock().expect("not poisoned");
        kept.push_back(offset);
        while kept.len() > checkpoint::KEEP {
            kept.pop_front();
        }
        if kept.len() == checkpoint::KEEP {
            intake.compact_before(kept[0]);
        }
    }

    /// The delivered mark, once the output files are synced.
    pub(super) fn mark(&self) -> Option<crate::output::sink::Mark> {
        match self.delivered.lock().expect("not poisoned").synced() {
            Ok(mark) => Some(mark),
            Err(e) => {
                eprintln!("shoal: cannot sync the output before a checkpoint: {e}; the last good checkpoint is kept");
                None
            }
        }
    }

    /// A copy of a stopped reader's final state, compacted at `frontier`.
    pub(super) fn compacted(&self, st: &checkpoint::ReaderState, frontier: u64) -> checkpoint::ReaderState {
        let mut st = st.clone();
        st.compact(frontier, self.tick, &self.windows);
        st
    }

    /// Whether the delivered frontier moved past the last checkpoint written.
    pub(super) fn delivered_past_written(&self) -> bool {
        self.delivered.lock().expect("not poisoned").mark.frontier > self.written.load(Ordering::SeqCst)
    }

    /// Several readers (worker 0, when one is due): opens a round at the
    /// delivered mark unless one is open; returns whether it did. The mark
    /// is read under the rounds' lock, so a reader that stops meanwhile
    /// takes its final state no later than this round.
    pub(super) fn open_round(&self) -> bool {
        let mut rounds = self.rounds.lock().expect("not poisoned");
        if rounds.is_open() {
            return false;
        }
        self.mark().is_some_and(|mark| rounds.open(mark))
    }

    /// The frontier at which `reader` owes the open round its state.
    pub(super) fn owed_by(&self, reader: usize) -> Option<u64> {
        self.rounds.lock().expect("not poisoned").owed_by(reader)
    }

    /// Takes `reader`'s state for the open round, and writes the round if
    /// it was the last one owed.
    pub(super) fn give(&self, reader: usize, st: checkpoint::ReaderState) {
        self.rounds.lock().expect("not poisoned").give(reader, st);
        self.complete_round();
    }

    /// The frontier a stopping reader, whose clock is at `own`, takes its
    /// final state at: the delivered mark's (or its own, if behind), no
    /// later than the open round's. Read under the rounds' lock, where
    /// rounds open: a round opened later has a later mark.
    pub(super) fn final_frontier(&self, own: u64) -> Option<u64> {
        let rounds = self.rounds.lock().expect("not poisoned");
        let mark = self.mark()?;
        Some(rounds.final_frontier(mark.frontier.min(own)))
    }

    /// Keeps a stopped reader's final state, taken at `frontier`; writes
    /// the open round if it was waiting for it, and the last checkpoint
    /// once every reader has stopped.
    pub(super) fn stopped(&self, reader: usize, frontier: u64, st: checkpoint::ReaderState) {
        let all = self.rounds.lock().expect("not poisoned").stop(reader, frontier, st);
        self.complete_round();
        if all {
            let Some(mark) = self.mark() else { return };
            let finals = self
                .rounds
                .lock()
                .expect("not poisoned")
                .finals(&mark, |st, frontier| self.compacted(st, frontier));
            if let Some(states) = finals {
                self.write(mark, states);
            }
        }
    }

    /// Several readers: writes the open round once every reader has given
    /// its state or stopped reading.
    pub(super) fn complete_round(&self) {
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
    pub(super) fn take_reader(&self, worker: usize) -> Option<checkpoint::ReaderState> {
        let mut readers = self.readers.lock().expect("not poisoned");
        let i = readers.iter().position(|r| r.worker == worker)?;
        Some(readers.swap_remove(i))
    }
}
