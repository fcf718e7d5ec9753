//! One reader's side of a run: its feeder, its notes to the sink, pacing
//! against the delivered frontier, and its part of each checkpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::output::sink::{Note, Report};
use crate::run::checkpoint;
use crate::run::checkpointing::Checkpointing;
use crate::run::feeder::Feeder;
use crate::run::job::RunOptions;
use crate::run::progress::Progress;

/// Lines read between flushes of the inputs.
pub(super) const BATCH: usize = 4096;
/// Batches a reader may read beyond the frontier it must see delivered.
pub(super) const LEAD: usize = 4;

/// Live input is handed to the dataflow at least this often while it flows.
pub(super) const LIVE_PUMP: Duration = Duration::from_millis(5);

/// One reader's side of checkpointing.
pub(super) struct ReaderCheckpoints {
    pub(super) shared: Arc<Checkpointing>,
    pub(super) last: Instant,
    /// Dead letters sent and perhaps not yet written, oldest first.
    pub(super) dead: std::collections::VecDeque<String>,
    pub(super) dead_sent: u64,
    /// A reader of another process than 0: the last round it gave its part
    /// to, that round's frontier and its dead letters written by reader.
    pub(super) given: Option<(u64, u64, std::collections::BTreeMap<usize, u64>)>,
}

/// One reader's side of the run: its feeder, its notes to the sink, and
/// the pacing against the delivered frontier.
pub struct Reader<'w> {
    pub worker: &'w mut timely::worker::Worker,
    pub feeder: Feeder,
    pub(super) notes: timely::dataflow::InputHandleVec<u64, Note>,
    pub(super) delivered: timely::dataflow::ProbeHandle<u64>,
    pub(super) in_flight: u64,
    /// The reader's frontier at its last few pumps, oldest first.
    pub(super) pumped: std::collections::VecDeque<u64>,
    pub progress: Progress,
    pub opts: RunOptions,
    pub stop: Arc<AtomicBool>,
    /// The served model (process 0 with `--http`).
    pub served: Option<Arc<crate::serve::model::Served>>,
    /// Serving (`--http`, on every process): counters go to the sink.
    pub(super) serving: bool,
    pub(super) checkpoints: Option<ReaderCheckpoints>,
    /// Worker 0 of a cluster with several readers: announces each round it
    /// opens to every process (see [`Checkpointing`]).
    pub(super) rounds: Option<timely::dataflow::InputHandleVec<u64, crate::run::checkpointing::Announce>>,
}

impl Reader<'_> {
    /// Shows this reader's counters to `/metrics`: sent to the sink on
    /// worker 0 of process 0 through the dataflow, so readers of every
    /// process count (a note per batch; notes from one worker arrive in
    /// order).
    pub(super) fn publish_counters(&mut self) {
        if self.serving {
            self.notes.send(Note::Counters(self.worker.index(), self.feeder.counters().clone()));
        }
    }

    /// Feeds the forget and unlink requests made over the API (worker 0 of
    /// process 0): each at the first tick not yet final, journaled first
    /// with `--state`, and answered with that tick.
    pub(super) fn take_requests(&mut self) {
        let Some(served) = self.served.clone().filter(|_| self.worker.index() == 0) else {
            return;
        };
        let requests = std::mem::take(&mut *served.requests.lock().expect("not poisoned"));
        for (request, reply) in requests {
            if reply.is_closed() {
                // Its caller gave up (a timeout): it was told nothing was made.
                continue;
            }
            let at = self.feeder.request_tick();
            let result = if self.opts.until.is_some_and(|u| at > u) {
                // No tick after --until is ever final.
                Err(crate::serve::model::no_tick_follows())
            } else {
                served.journal_request(at, &request).map(|()| self.feeder.request(request))
            };
            let _ = reply.send(result);
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
        // A checkpoint waits while a forget's tick is not yet delivered: the
        // next one holds nothing of the forgotten ids (it can purge them).
        let due =
            ck.last.elapsed() >= shared.every && shared.delivered_past_written() && !self.feeder.forgets_from(self.delivered_frontier());
        if shared.readers_count == 1 {
            if due {
                self.checkpoint(position());
            }
            return;
        }
        let me = self.worker.index();
        if shared.process != 0 {
            return self.give_part(position);
        }
        if due && me == 0 {
            if let Some(round) = shared.open_round() {
                self.checkpoints.as_mut().expect("checked").last = Instant::now();
                self.announce(round);
            }
        }
        let Some(frontier) = shared.owed_by(me) else { return };
        let written = shared.round_written();
        let Some(st) = self.own_state(frontier, &written, position()) else {
            return;
        };
        shared.give(me, checkpoint::Part::State(Box::new(st)));
    }

    /// A reader of another process than 0: writes its part of the newest
    /// round announced, once, and tells process 0.
    fn give_part(&mut self, position: impl FnOnce() -> crate::io::Position) {
        let Some(ck) = &self.checkpoints else { return };
        let shared = ck.shared.clone();
        let Some((seq, frontier, written)) = shared.announced() else {
            return;
        };
        if ck.given.as_ref().is_some_and(|(s, _, _)| *s >= seq) {
            return;
        }
        let Some(st) = self.own_state(frontier, &written, position()) else {
            return;
        };
        self.checkpoints.as_mut().expect("checked").given = Some((seq, frontier, written));
        let note = shared.part(seq, frontier, false, &st);
        self.notes.send(Note::Checkpoint(note));
    }

    /// This reader's state at `frontier` (a copy; the logs stay).
    /// Its dead letters are those not written as of `written` (dead letters
    /// written by reader), a mark no later than any round it serves.
    pub(super) fn own_state(
        &mut self,
        frontier: u64,
        written: &std::collections::BTreeMap<usize, u64>,
        position: crate::io::Position,
    ) -> Option<checkpoint::ReaderState> {
        let lent = self.lend_state(frontier, written, position)?;
        let st = lent.clone();
        self.feeder.checkpointed(lent);
        Some(st)
    }

    /// This reader's state at `frontier`, its logs lent (give them back
    /// with [`Feeder::checkpointed`]), with the dead letters the sink has
    /// not written yet (`written`: dead letters written, by reader).
    pub(super) fn lend_state(
        &mut self,
        frontier: u64,
        written: &std::collections::BTreeMap<usize, u64>,
        position: crate::io::Position,
    ) -> Option<checkpoint::ReaderState> {
        self.advance_notes();
        let worker = self.worker.index();
        let ck = self.checkpoints.as_mut()?;
        let extra = ck.dead.len().saturating_sub(checkpoint::unwritten(worker, ck.dead_sent, written));
        ck.dead.drain(..extra);
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
        if shared.process != 0 {
            // Its log is compacted at the last round it gave to, which no
            // later round is before; a restart compacts it at its round's.
            let restored = || shared.delivered.lock().expect("not poisoned").mark.dead_written.clone();
            let (seq, frontier, written) = ck.given.clone().unwrap_or_else(|| (shared.resumed_seq(), 0, restored()));
            let Some(st) = self.own_state(frontier, &written, position) else {
                return;
            };
            let note = shared.part(seq, frontier, true, &st);
            self.notes.send(Note::Checkpoint(note));
            return;
        }
        let Some(frontier) = shared.final_frontier(self.feeder.frontier()) else {
            return;
        };
        let written = shared.round_written();
        let Some(st) = self.own_state(frontier, &written, position) else {
            return;
        };
        shared.stopped(self.worker.index(), frontier, checkpoint::Part::State(Box::new(st)));
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
        let mut readers = shared.write(
            crate::output::sink::Mark { frontier, ..mark },
            vec![checkpoint::Part::State(Box::new(reader))],
            None,
        );
        self.feeder.checkpointed(readers.pop().expect("one reader"));
    }

    /// Worker 0: tells every process `news` (see [`Checkpointing`]).
    pub(super) fn announce(&mut self, news: crate::run::checkpointing::Announce) {
        if let Some(rounds) = &mut self.rounds {
            rounds.send(news);
            rounds.flush();
        }
    }

    /// A process other than 0 of a cluster with checkpoints: waits until
    /// process 0 says which checkpoint it resumed from, and refuses to go
    /// on from another one.
    pub(super) fn same_checkpoint_as_process_0(&mut self) -> Result<(), crate::run::error::EngineError> {
        let Some(shared) = self.checkpoints.as_ref().map(|c| c.shared.clone()).filter(|s| s.process != 0) else {
            return Ok(());
        };
        let leader = loop {
            if let Some(seq) = shared.leader_resumed() {
                break seq;
            }
            if self.stopping() {
                return Ok(());
            }
            self.worker.step_or_park(Some(Duration::from_millis(1)));
        };
        let mine = shared.resumed_seq();
        if leader != mine {
            return Err(crate::run::error::EngineError::Refused(format!(
                "process 0 resumed from checkpoint {leader} and this process from {mine}: every process must see the same \
                 --state directory (stop them all and start them again)"
            )));
        }
        Ok(())
    }

    /// Takes up this reader's part of the checkpoint resumed from; returns
    /// its input position.
    pub(super) fn restore(&mut self) -> Option<crate::io::Position> {
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
        self.take_requests();
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
    pub(super) fn advance_notes(&mut self) {
        self.feeder.flush();
        let frontier = self.feeder.frontier();
        if frontier > *self.notes.time() {
            self.notes.advance_to(frontier);
        }
        self.notes.flush();
        if let Some(rounds) = self.rounds.as_mut().filter(|r| frontier > *r.time()) {
            rounds.advance_to(frontier);
        }
    }

    pub(super) fn report(&mut self, last: Option<u64>, stopped: bool) {
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
