//! A run's checkpoints, shared by the workers of a process: opening the
//! state directory, the delivered mark, rounds over several readers.
//!
//! A cluster (`--processes N`) checkpoints in rounds too, over one state
//! directory that every process reaches. Worker 0 (process 0) opens a
//! round at the delivered mark and announces it to every process through
//! the dataflow ([`Checkpointing::announce`]). A reader of another process
//! writes its state at the round's frontier as a part file beside the
//! checkpoints ([`Checkpointing::part`]) and tells process 0 with a note
//! to the sink, which hands it to [`Checkpointing::arrived`]. Process 0
//! writes the checkpoint, naming every part by file and checksum, once
//! every reader is in: that write commits the round. A restart (of every
//! process) takes the newest checkpoint whose parts are all whole, and
//! each reader takes up its own part.

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
    rounds: Mutex<checkpoint::Rounds<checkpoint::Part>>,
    /// The number of the open round (process 0).
    round: std::sync::atomic::AtomicU64,
    /// This process's index in the cluster (0 alone).
    pub(super) process: usize,
    /// Another process: the newest round announced, and the checkpoint
    /// process 0 resumed from (told at the start).
    announced: Mutex<Option<Announce>>,
    leader_resumed: Mutex<Option<u64>>,
    /// The delivered frontier of the last checkpoint written.
    written: std::sync::atomic::AtomicU64,
    /// Held while a checkpoint is numbered and written, so that numbers
    /// follow frontiers.
    writing: Mutex<()>,
    pub(super) windows: Vec<Option<u64>>,
    pub(super) tick: u64,
    /// HTTP input, and its index among the line sources: told what each
    /// checkpoint holds, so that its log can be compacted behind it.
    intake: Option<(usize, Arc<crate::io::intake::Intake>)>,
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
        let (workers, process, threads) = match &config.communication {
            timely::CommunicationConfig::Process(n) => (*n, 0, *n),
            timely::CommunicationConfig::Cluster {
                threads,
                process,
                addresses,
                ..
            } => (threads * addresses.len(), *process, *threads),
            _ => (1, 0, 1),
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
                None => job
                    .sources
                    .iter()
                    .map(|s| match s {
                        // The generator's stream depends on all its options.
                        Source::Generate(g) => format!("generate({g:?})"),
                        s => s.name(),
                    })
                    .collect(),
            },
            readers: readers_count,
        };
        let store = checkpoint::Store::open(&state.dir)?;
        let mut restored = store.latest(&fingerprint, |w| eprintln!("shoal: {w}"))?;
        if let Some(snap) = &restored {
            tracing::info!(seq = snap.seq, frontier = snap.mark.frontier, "resuming from a checkpoint");
        }
        let seq = store.next_seq(restored.as_ref().map(|s| s.seq))?;
        let plan = Plan::new(&job.spec);
        let kept = crate::dataflow::Kept::new(
            &plan,
            restored.as_ref().map(|s| s.clusters.clone()).unwrap_or_default(),
            restored.as_ref().map(|s| s.models.clone()).unwrap_or_default(),
            true,
        );
        let mark = restored.as_ref().map(|s| s.mark.clone()).unwrap_or_default();
        let frontier = mark.frontier;
        let windows: Vec<Option<u64>> = plan.streams.iter().map(|s| s.window).collect();
        // This process's readers whose states are parts: read, and
        // compacted at the checkpoint's frontier.
        if let Some(snap) = &mut restored {
            let local = process * threads..(process + 1) * threads;
            for part in snap.parts.iter().filter(|p| local.contains(&p.worker)) {
                let mut st = store
                    .read_part(part)
                    .map_err(|checkpoint::Corrupt(why)| EngineError::Refused(format!("checkpoint {} is unusable: {why}", snap.seq)))?;
                st.compact(frontier, job.opts.tick, &windows);
                snap.readers.push(st);
            }
            // A reader's dead letters written by the checkpoint's mark are
            // out (a stopped reader's state serves later marks too).
            for st in &mut snap.readers {
                st.unwritten(&snap.mark.dead_written);
            }
        }
        Ok(Checkpointing {
            store,
            every: state.every,
            fingerprint,
            readers: Mutex::new(restored.as_ref().map(|s| s.readers.clone()).unwrap_or_default()),
            readers_count,
            rounds: Mutex::new(checkpoint::Rounds::new(readers_count)),
            round: 0.into(),
            process,
            announced: Mutex::new(None),
            leader_resumed: Mutex::new(None),
            written: frontier.into(),
            writing: Mutex::new(()),
            windows,
            tick: job.opts.tick,
            seq: seq.into(),
            restored,
            kept: Arc::new(kept),
            // Until the sink says more, what the checkpoint had is out.
            delivered: Arc::new(Mutex::new(crate::output::sink::Delivered { mark, files: Vec::new() })),
            intake: job.sources.iter().enumerate().find_map(|(i, s)| match s {
                Source::Http(intake) => Some((i, intake.clone())),
                _ => None,
            }),
            intake_offsets: Mutex::default(),
            served,
        })
    }

    /// Writes a snapshot of `states` at `mark`; failures are reported. One
    /// older than a checkpoint already written (a round completed while the
    /// last reader wrote the final one) is skipped: the newest number must
    /// be the newest frontier, which a restart resumes from. A round's
    /// checkpoint has the number `seq` its round took when it opened.
    /// Returns the states of this process's readers.
    pub(super) fn write(
        &self,
        mark: crate::output::sink::Mark,
        parts: Vec<checkpoint::Part>,
        seq: Option<u64>,
    ) -> Vec<checkpoint::ReaderState> {
        let (mut readers, mut files) = (Vec::new(), Vec::new());
        for part in parts {
            match part {
                checkpoint::Part::State(st) => readers.push(*st),
                checkpoint::Part::File(f) => files.push(f),
            }
        }
        let frontier = mark.frontier;
        let _one = self.writing.lock().expect("not poisoned");
        if frontier < self.written.load(Ordering::SeqCst) || self.process != 0 {
            tracing::debug!(frontier, "a checkpoint older than the last one written; skipped");
            return readers;
        }
        let snapshot = checkpoint::Snapshot {
            fingerprint: self.fingerprint.clone(),
            seq: seq.unwrap_or_else(|| self.seq.fetch_add(1, Ordering::SeqCst)),
            parts: files,
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
        let Some((source, intake)) = &self.intake else { return };
        let Some(offset) = readers.iter().find_map(|r| intake_offset(&r.position, *source)) else {
            return;
        };
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

    /// A copy of a stopped reader's final state, compacted at `frontier`
    /// (a part in a file is compacted when a restart reads it).
    pub(super) fn compacted(&self, part: &checkpoint::Part, frontier: u64) -> checkpoint::Part {
        match part {
            checkpoint::Part::State(st) => {
                let mut st = st.clone();
                st.compact(frontier, self.tick, &self.windows);
                checkpoint::Part::State(st)
            }
            file => file.clone(),
        }
    }

    /// Whether the delivered frontier moved past the last checkpoint written.
    pub(super) fn delivered_past_written(&self) -> bool {
        self.delivered.lock().expect("not poisoned").mark.frontier > self.written.load(Ordering::SeqCst)
    }

    /// Several readers (worker 0, when one is due): opens a round at the
    /// delivered mark unless one is open; returns its number and frontier
    /// (announced to the other processes). The mark is read under the
    /// rounds' lock, so a reader that stops meanwhile takes its final state
    /// no later than this round.
    pub(super) fn open_round(&self) -> Option<Announce> {
        let mut rounds = self.rounds.lock().expect("not poisoned");
        if rounds.is_open() {
            return None;
        }
        let mark = self.mark()?;
        let (frontier, written) = (mark.frontier, mark.dead_written.clone());
        if !rounds.open(mark) {
            return None;
        }
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        self.round.store(seq, Ordering::SeqCst);
        Some(Announce::Round { seq, frontier, written })
    }

    /// The dead letters written per reader as of the open round's mark, or
    /// else the delivered mark: no later than any round a state taken now
    /// serves, so a reader keeps every letter such a round has not written.
    pub(super) fn round_written(&self) -> std::collections::BTreeMap<usize, u64> {
        let rounds = self.rounds.lock().expect("not poisoned");
        match rounds.mark() {
            Some(mark) => mark.dead_written.clone(),
            None => self.delivered.lock().expect("not poisoned").mark.dead_written.clone(),
        }
    }

    /// The frontier at which `reader` owes the open round its state.
    pub(super) fn owed_by(&self, reader: usize) -> Option<u64> {
        self.rounds.lock().expect("not poisoned").owed_by(reader)
    }

    /// Takes `reader`'s state for the open round, and writes the round if
    /// it was the last one owed.
    pub(super) fn give(&self, reader: usize, st: checkpoint::Part) {
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
    pub(super) fn stopped(&self, reader: usize, frontier: u64, st: checkpoint::Part) {
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
                self.write(mark, states, None);
            }
        }
    }

    /// Several readers: writes the open round once every reader has given
    /// its state or stopped reading.
    pub(super) fn complete_round(&self) {
        let (complete, seq) = {
            let mut rounds = self.rounds.lock().expect("not poisoned");
            // Rounds open under this lock: the number is this round's.
            (
                rounds.complete(|st, frontier| self.compacted(st, frontier)),
                self.round.load(Ordering::SeqCst),
            )
        };
        if let Some((mark, states)) = complete {
            self.write(mark, states, Some(seq));
        }
    }
}

/// What worker 0 tells every process.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Announce {
    /// At the start: the checkpoint process 0 resumed from (0: none). A
    /// process that resumed from another one stops.
    Resumed(u64),
    /// Round `seq` opened at `frontier`, with the dead letters written per
    /// reader as of its mark.
    Round {
        seq: u64,
        frontier: u64,
        written: std::collections::BTreeMap<usize, u64>,
    },
}

/// What a reader of another process tells process 0 about a round.
#[derive(serde::Serialize, serde::Deserialize)]
enum Arrival {
    /// Its state is in this part.
    Part(checkpoint::PartRef),
    /// It could not write its part for round `seq`: the round is given up.
    Failed { seq: u64 },
    /// It stopped reading and could not write its last part: the state
    /// itself, which process 0's checkpoints then hold.
    Last { taken: u64, state: Box<checkpoint::ReaderState> },
}

/// A cluster's rounds, on the processes other than 0 and on process 0.
impl Checkpointing {
    /// Another process learns what worker 0 announced. Rounds are kept
    /// newest first whatever order a process's workers see them in.
    pub(super) fn announce(&self, news: Announce) {
        if self.process == 0 {
            return;
        }
        match news {
            Announce::Resumed(seq) => *self.leader_resumed.lock().expect("not poisoned") = Some(seq),
            Announce::Round { seq, .. } => {
                let mut announced = self.announced.lock().expect("not poisoned");
                let newer = match &*announced {
                    Some(Announce::Round { seq: old, .. }) => seq > *old,
                    _ => true,
                };
                if newer {
                    *announced = Some(news);
                }
            }
        }
    }

    /// The newest round announced to this process: its number, frontier
    /// and dead letters written by reader.
    pub(super) fn announced(&self) -> Option<(u64, u64, std::collections::BTreeMap<usize, u64>)> {
        match &*self.announced.lock().expect("not poisoned") {
            Some(Announce::Round { seq, frontier, written }) => Some((*seq, *frontier, written.clone())),
            _ => None,
        }
    }

    /// The checkpoint this process resumed from (0: none).
    pub(super) fn resumed_seq(&self) -> u64 {
        self.restored.as_ref().map_or(0, |s| s.seq)
    }

    /// Another process: what process 0 resumed from, once told.
    pub(super) fn leader_resumed(&self) -> Option<u64> {
        *self.leader_resumed.lock().expect("not poisoned")
    }

    /// Writes a reader's state as a part of round `seq` (taken at
    /// `taken`; `last`: its reader stopped); returns the note for process
    /// 0. A failed write is reported, and process 0 gives the round up.
    pub(super) fn part(&self, seq: u64, taken: u64, last: bool, st: &checkpoint::ReaderState) -> Vec<u8> {
        let arrival = match self.store.write_part(seq, taken, last, st) {
            Ok(part) => Arrival::Part(part),
            Err(e) if last => {
                eprintln!("shoal: {e}; the reader's last state goes to process 0 instead");
                Arrival::Last {
                    taken,
                    state: Box::new(st.clone()),
                }
            }
            Err(e) => {
                eprintln!("shoal: {e}; the last good checkpoint is kept");
                Arrival::Failed { seq }
            }
        };
        postcard::to_stdvec(&arrival).expect("a note serializes")
    }

    /// Process 0 (the sink, on worker 0): a reader of another process
    /// wrote its part, or could not.
    pub(super) fn arrived(&self, note: &[u8]) {
        let Ok(arrival) = postcard::from_bytes::<Arrival>(note) else {
            tracing::error!("an undecodable checkpoint note; ignored");
            return;
        };
        let open = self.round.load(Ordering::SeqCst);
        if let Arrival::Part(part) = &arrival {
            // Committed only if process 0 can read it here: a restart reads
            // it from this directory.
            if let Err(checkpoint::Corrupt(why)) = self.store.check_part(part) {
                tracing::error!(
                    "checkpoint round {} given up: process 0 cannot read {why}; every process must be given the same \
                     --state directory (a shared file system), or no checkpoint of the cluster can be resumed",
                    part.seq
                );
                if part.seq == open && !part.last {
                    self.rounds.lock().expect("not poisoned").give_up();
                }
                return;
            }
        }
        match arrival {
            Arrival::Part(part) if part.last => self.stopped(part.worker, part.taken, checkpoint::Part::File(part)),
            Arrival::Part(part) if part.seq == open => self.give(part.worker, checkpoint::Part::File(part)),
            Arrival::Part(_) => {}
            Arrival::Last { taken, state } => self.stopped(state.worker, taken, checkpoint::Part::State(state)),
            Arrival::Failed { seq } => {
                if seq == open {
                    self.rounds.lock().expect("not poisoned").give_up();
                }
            }
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

/// How far into the HTTP log (line source `http`, or Kafka's HTTP
/// partition) a reader at `position` has read: a line source before it
/// (a file read first) has read none of it; a byte offset of that source
/// is not one of the log.
fn intake_offset(position: &crate::io::Position, http: usize) -> Option<u64> {
    match position {
        crate::io::Position::Lines { source, offset, .. } => match source.cmp(&http) {
            std::cmp::Ordering::Less => Some(0),
            std::cmp::Ordering::Equal => Some(*offset),
            std::cmp::Ordering::Greater => None,
        },
        crate::io::Position::Kafka(ps) => ps.iter().find(|p| p.topic == crate::io::kafka::HTTP_TOPIC).map(|p| p.next as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::intake_offset;
    use crate::io::Position;

    #[test]
    fn the_http_log_offset_is_read_only_from_the_http_source() {
        let at = |source, offset| Position::Lines { source, offset, line: 9 };
        // `--input big.jsonl` before HTTP: deep in the file, none of the log is read.
        assert_eq!(intake_offset(&at(0, 80_000_000), 1), Some(0));
        assert_eq!(intake_offset(&at(1, 4_096), 1), Some(4_096));
    }
}
