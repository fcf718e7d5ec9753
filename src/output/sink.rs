//! Sinks: membership changes and dead letters out, and the run's summary in.
//!
//! One operator, [`deliver`], runs on worker 0 (of process 0) and writes
//! everything the run puts out:
//!
//! - membership changes, held per tick until the frontier passes the tick,
//!   then consolidated (a change that nets to nothing is not written), sorted
//!   by the segment's place in the spec and the profile id's bytes (SPEC §5);
//! - dead letters from every reader, written as they come;
//! - each reader's [`Report`] at its end, summed into the summary line.
//!
//! Its output carries no data; its frontier is the *delivered* frontier. The
//! operator keeps a capability for every written tick whose lines the output
//! has not yet acknowledged (a Kafka producer acknowledges asynchronously; a
//! file at once), so a probe on the output tells every worker, in every
//! process, which ticks are safely out. Readers commit input positions and
//! pace themselves by that probe: nothing is committed before the changes it
//! caused are delivered, and a stalled output stalls the input rather than
//! growing a queue.
//!
//! Ticks after the last tick of the run (`--until`, or the end of bounded
//! input) are never written; on a stop (SIGINT/SIGTERM) nothing that was not
//! final when the stop came is written.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use crate::core::clock::format_time;
use crate::core::id::Id;
use crate::core::id::Key;
use crate::core::id::SegmentId;
use crate::core::id::StreamId;
use crate::core::value::Value;
use crate::ingest::event::Kept;
use crate::ingest::stamp::Counters;
use crate::output::deliver::Deliver;
use std::sync::Mutex;
use std::time::Instant;

/// A change of a named membership, or (when serving) of the served model.
type NamedChange = (Upd, isize);

/// What the sink applies to the model besides memberships (only when serving).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Upd {
    /// A membership of a spec segment.
    Member(SegmentId, Id),
    /// A term row: `(profile, stream)` and the values of the stream's terms.
    Term(Key, StreamId, Vec<Value>),
    /// A profile and its id.
    Name(Key, Id),
    /// An id (node) and its profile.
    Label(Key, Key),
    /// An id's key and its text.
    Node(Key, Id),
    /// An accepted event (at the tick it takes effect) and its anchor id,
    /// kept for `--history`.
    Event(Key, Kept),
    /// The fit in force of `spec.models[m]`.
    Model(u32, crate::dataflow::model::Fitted),
}

/// What one reader saw, sent once at its end.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub counters: Counters,
    /// The reader's last tick (`None`: no event accepted).
    pub last: Option<u64>,
    /// The reader stopped (a signal or an error): nothing after `last` may be written.
    pub stopped: bool,
}

/// What the readers tell the sink: dead letters as they come, a report at the end.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Note {
    /// A dead letter from the reader on that worker.
    Dead(usize, String),
    Report(Report),
    /// Serving: the counters so far of the reader on that worker (a global
    /// index, any process), for `/metrics`.
    Counters(usize, Counters),
    /// A cluster checkpoint: a reader of another process wrote its part of
    /// a round (opaque here; [`Outputs::on_checkpoint`] reads it).
    Checkpoint(Vec<u8>),
}

/// What the sink saw, read by the driver after the run.
#[derive(Debug, Default)]
pub struct SinkState {
    pub diffs: u64,
    /// Profile count changes by tick.
    pub profiles: BTreeMap<u64, i64>,
    pub counters: Counters,
    /// The last tick of the run: the latest of the readers' last ticks, or
    /// the earliest of them when a reader stopped.
    pub last: Option<u64>,
    /// Set by a stopped reader: no tick after it is written.
    pub cutoff: Option<u64>,
    /// The first write error. Writing stops there, and so does the run:
    /// [`Outputs::stop`] is set, the ticks written since the last
    /// acknowledgement are never taken for delivered (a Kafka commit or a
    /// checkpoint stays before them), and the run ends with this error.
    pub error: Option<String>,
    /// Ticks before this were delivered before a restart: not written again.
    pub skip_before: u64,
    /// Dead letters written, by reader.
    pub dead_written: BTreeMap<usize, u64>,
}

impl SinkState {
    /// Profiles that exist at the last tick.
    pub fn profiles_at_last(&self) -> i64 {
        let last = self.last.unwrap_or(0);
        self.profiles.range(..=last).map(|(_, n)| n).sum()
    }
}

/// One membership line, keys in SPEC order, at `time` as [`format_time`]
/// writes it: a tick's lines share it, and formatting it once per line was
/// a third of the sink's work.
/// A member of a segment with `groups` names its group after `change`.
pub fn membership_line(time: &str, segment: &str, profile: &str, enter: bool, group: Option<&str>) -> String {
    let mut line = String::with_capacity(64 + time.len() + segment.len() + profile.len());
    line.push_str("{\"time\":\"");
    line.push_str(time);
    line.push_str("\",\"segment\":");
    push_json_str(&mut line, segment);
    line.push_str(",\"profile\":");
    push_json_str(&mut line, profile);
    line.push_str(if enter { ",\"change\":\"enter\"" } else { ",\"change\":\"exit\"" });
    if let Some(group) = group {
        line.push_str(",\"group\":");
        push_json_str(&mut line, group);
    }
    line.push('}');
    line
}

/// Appends `s` as a JSON string: as it is between quotes when nothing in it
/// needs escaping (nearly always), else as serde_json escapes it.
fn push_json_str(line: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        line.push('"');
        line.push_str(s);
        line.push('"');
    } else {
        line.push_str(&serde_json::to_string(s).expect("a string serializes"));
    }
}

/// The output as of the checkpoint's delivered frontier.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// Every tick before it is written and acknowledged.
    pub frontier: u64,
    /// Byte length of the output file (`None`: not a regular file).
    pub changes: Option<u64>,
    /// Byte length of the dead-letter file.
    pub dead: Option<u64>,
    /// Lines written so far.
    pub diffs: u64,
    /// Dead letters written so far, by reader (worker index).
    pub dead_written: BTreeMap<usize, u64>,
}

/// The latest [`Mark`] the sink recorded, and handles of its output files
/// to fsync before a checkpoint that counts their bytes is written.
#[derive(Debug, Default)]
pub struct Delivered {
    pub mark: Mark,
    pub files: Vec<std::fs::File>,
}

impl Delivered {
    /// The mark, once the bytes it counts are on disk.
    pub fn synced(&self) -> std::io::Result<Mark> {
        for f in &self.files {
            f.sync_data()?;
        }
        Ok(self.mark.clone())
    }
}

/// Wall-clock marks of a run: when the reader's clock made ticks final, and
/// when the sink wrote each tick's last change.
#[derive(Debug, Default)]
pub struct Timings {
    /// `(frontier, when)`: every tick before `frontier` was final at `when`.
    pub finals: Mutex<Vec<(u64, Instant)>>,
    /// `(tick, when)`: the tick's changes were written (and flushed) at `when`.
    pub written: Mutex<Vec<(u64, Instant)>>,
}

impl Timings {
    /// For each written tick, the time from its becoming final to its last
    /// change written.
    pub fn latencies(&self) -> Vec<Duration> {
        let finals = self.finals.lock().expect("not poisoned");
        let written = self.written.lock().expect("not poisoned");
        written
            .iter()
            .filter_map(|&(t, at)| {
                let i = finals.partition_point(|&(f, _)| f <= t);
                finals.get(i).map(|&(_, final_at)| at.saturating_duration_since(final_at))
            })
            .collect()
    }
}

/// A line to write, after the profile it is about (Kafka's message key).
pub type ProfileLine = (String, String);

/// An answer to a request, sent once the request's lines are flushed.
pub type Answer = Box<dyn FnOnce() + Send>;

/// An observer of the output: the served model, with `--http`. The sink
/// hands it every tick it writes and asks it for the lines; the observer
/// may have lines of its own (a term leaving a window, requests from
/// outside), which the sink writes at their ticks. The sink knows nothing
/// else of it, and the observer nothing of the sink.
pub trait Observer: Send + Sync {
    /// The next tick at which the observer has changes of its own.
    fn next_due(&self) -> Option<u64>;
    /// A tick delivered before a restart (its changes consolidated): seen,
    /// not written.
    fn replay(&self, t: u64, changes: Vec<(Upd, isize)>);
    /// A tick's consolidated changes: the observer applies them and calls
    /// `write` with the tick's lines, `(profile, line)`, while it holds its
    /// state, so that whoever reads it finds it and the output agree.
    fn tick(&self, t: u64, changes: Vec<(Upd, isize)>, write: &mut dyn FnMut(&[ProfileLine]));
    /// Runs the requests that came from outside, at the observer's clock,
    /// writing their lines through `write(tick, lines)`; returns their
    /// answers, which the sink sends once those lines are flushed.
    /// `diffs`: the lines written so far.
    fn run_requests(&self, diffs: u64, write: &mut dyn FnMut(u64, &[ProfileLine])) -> Vec<Answer>;
    /// A reader's counters so far (by worker index, any process).
    fn counters(&self, reader: usize, counters: Counters);
    /// Whether the run should end (serving keeps it alive until then).
    fn stopped(&self) -> bool;
    /// Every time up to `t` is final: ticks there with no change move the
    /// observer's clock too (SPEC §7: the served clock is the run's).
    fn passed(&self, t: u64);
}

/// How [`deliver`] writes.
pub struct Outputs {
    /// Segment names, in spec order.
    pub segments: Rc<Vec<String>>,
    /// Each segment's `groups` (SPEC §4 "Groups"), in spec order.
    pub groups: Rc<Vec<Vec<crate::spec::Group>>>,
    pub show_ms: bool,
    pub changes: Option<Box<dyn Deliver>>,
    pub dead_letters: Option<Box<dyn Deliver>>,
    pub state: Rc<RefCell<SinkState>>,
    /// Marks when each tick is written (the latency benchmark).
    pub timings: Option<std::sync::Arc<crate::output::sink::Timings>>,
    /// The served model (worker 0 with `--http`): each written tick goes
    /// to it, its requests run here, and the dataflow is kept alive until it
    /// says stop.
    pub observer: Option<std::sync::Arc<dyn Observer>>,
    /// With checkpoints: where the output as of the delivered frontier is recorded.
    pub delivered: Option<std::sync::Arc<std::sync::Mutex<crate::output::sink::Delivered>>>,
    /// With checkpoints in a cluster: takes the readers' checkpoint notes.
    pub on_checkpoint: Option<CheckpointHook>,
    /// Set on the first write error, so that the readers stop (see
    /// [`SinkState::error`]).
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// Takes a cluster's checkpoint notes on process 0 (see [`Note::Checkpoint`]).
pub type CheckpointHook = Box<dyn Fn(&[u8])>;

/// Writes memberships and dead letters on worker 0 and sums the reports;
/// returns the delivered frontier as a stream (see the module docs).
pub fn deliver<'s>(
    members: VecCollection<'s, u64, Upd, isize>,
    notes: StreamVec<'s, u64, Note>,
    mut outs: Outputs,
) -> StreamVec<'s, u64, ()> {
    let to_leader = Exchange::new(|_: &(Upd, u64, isize)| 0u64);
    let notes_to_leader = Exchange::new(|_: &Note| 0u64);
    let scope = members.inner.scope();
    if let Some(cell) = &outs.delivered {
        let files = [&outs.changes, &outs.dead_letters]
            .into_iter()
            .flatten()
            .filter_map(|d| d.file()?.try_clone().ok());
        cell.lock().expect("not poisoned").files.extend(files);
    }
    members.inner.binary_frontier::<_, CapacityContainerBuilder<Vec<()>>, _, _, _, _>(
        notes,
        to_leader,
        notes_to_leader,
        "Deliver",
        move |cap, info| {
            let activator = scope.activator_for(info.address.clone());
            // Serving: a capability no tick reaches keeps the dataflow (and
            // the server's model) alive after the input ends, until a stop.
            let mut keep = outs.observer.as_ref().map(|_| cap.delayed(&u64::MAX));
            let mut pending: BTreeMap<u64, (Capability<u64>, Vec<NamedChange>)> = BTreeMap::new();
            // Written ticks not yet acknowledged, with their line counts.
            // Lines the observer wrote on its own (requests, model-only
            // ticks) hold no capability, but the delivered mark stays
            // before them all the same.
            let mut awaiting: Awaiting = BTreeMap::new();
            // After a stop: held at the cutoff so that no reader takes the
            // ticks dropped after it for delivered.
            let mut barrier: Option<Capability<u64>> = None;
            // Ticks written since the last flush.
            let mut written: Vec<u64> = Vec::new();
            move |(changes, frontier), (notes, notes_frontier), _output| {
                notes.for_each(|cap, data| {
                    for note in data.drain(..) {
                        match note {
                            Note::Dead(reader, line) => write_dead(&mut outs, reader, &line),
                            Note::Counters(reader, counters) => {
                                if let Some(observer) = &outs.observer {
                                    observer.counters(reader, counters);
                                }
                            }
                            Note::Checkpoint(note) => {
                                if let Some(hook) = &outs.on_checkpoint {
                                    hook(&note);
                                }
                            }
                            Note::Report(r) => {
                                let mut st = outs.state.borrow_mut();
                                st.counters.add(&r.counters);
                                if r.stopped {
                                    let cut = r.last.unwrap_or(0);
                                    st.cutoff = Some(st.cutoff.map_or(cut, |c| c.min(cut)));
                                    let at = cap.least().copied().unwrap_or(0).max(cut + 1);
                                    if barrier.as_ref().is_none_or(|b| *b.time() > at) {
                                        barrier = Some(cap.delayed(&at, 0));
                                    }
                                }
                                st.last = match (st.cutoff, st.last.max(r.last)) {
                                    (Some(c), last) => Some(last.map_or(c, |l| l.min(c))),
                                    (None, last) => last,
                                };
                            }
                        }
                    }
                });
                changes.for_each(|cap, data| {
                    for (d, t, r) in data.drain(..) {
                        pending.entry(t).or_insert_with(|| (cap.delayed(&t, 0), Vec::new())).1.push((d, r));
                    }
                });
                // A tick is final once both the changes and every reader's
                // notes are past it (a reader's report comes before its end).
                let (cutoff, all_in) = (outs.state.borrow().cutoff, notes_frontier.is_empty());
                let last = all_in.then(|| outs.state.borrow().last.unwrap_or(0));
                loop {
                    // The next tick: the dataflow's, or one at which only a
                    // term of the served model changes (an event leaving a
                    // window), which has no update of its own.
                    let next = pending.keys().next().copied();
                    let due = outs.observer.as_ref().and_then(|o| o.next_due());
                    let Some(t) = next.into_iter().chain(due).min() else { break };
                    if frontier.less_equal(&t) || notes_frontier.less_equal(&t) {
                        break;
                    }
                    if next != Some(t) {
                        if last.is_some_and(|l| t > l) || cutoff.is_some_and(|c| t > c) {
                            break;
                        }
                        // No capability: like a request's, these lines are
                        // marked delivered only once acknowledged.
                        if t < outs.state.borrow().skip_before {
                            if let Some(observer) = &outs.observer {
                                observer.replay(t, Vec::new());
                            }
                        } else {
                            let before = outs.state.borrow().diffs;
                            write_tick(&mut outs, t, Vec::new());
                            let lines = outs.state.borrow().diffs - before;
                            if lines > 0 {
                                awaiting.entry(t).or_default().1 += lines;
                            }
                        }
                        continue;
                    }
                    let (cap, changes) = pending.remove(&t).expect("the first pending tick");
                    if last.is_some_and(|l| t > l) || cutoff.is_some_and(|c| t > c) {
                        continue;
                    }
                    if t < outs.state.borrow().skip_before {
                        // Out before a restart: only the served model sees it.
                        if let Some(observer) = &outs.observer {
                            let mut changes = changes;
                            differential_dataflow::consolidation::consolidate(&mut changes);
                            observer.replay(t, changes);
                        }
                        continue;
                    }
                    let before = outs.state.borrow().diffs;
                    write_tick(&mut outs, t, changes);
                    written.push(t);
                    let entry = awaiting.entry(t).or_default();
                    entry.0 = Some(cap);
                    entry.1 += outs.state.borrow().diffs - before;
                }
                flush(&mut outs, &mut written);
                if let Some(observer) = &outs.observer {
                    // Final: before both frontiers, and (input over) up to
                    // the readers' last tick, never past a stop's cutoff.
                    let bound = [frontier.frontier().first(), notes_frontier.frontier().first()]
                        .into_iter()
                        .flatten()
                        .min()
                        .copied();
                    let upto = match bound {
                        Some(b) => b.checked_sub(1).map(|u| last.map_or(u, |l| u.min(l))),
                        None => last,
                    };
                    if let Some(u) = upto.map(|u| cutoff.map_or(u, |c| u.min(c))) {
                        observer.passed(u);
                    }
                }
                if all_in && frontier.is_empty() {
                    pending.clear();
                    barrier = None;
                }
                if let Some(observer) = outs.observer.clone() {
                    run_requests(&mut outs, observer.as_ref(), &mut written, &mut awaiting);
                    if observer.stopped() {
                        keep = None;
                    }
                }
                // After the requests: a checkpoint taken from this mark holds
                // the changes they journaled, and the output they wrote.
                let unacked = outs.changes.as_mut().and_then(|c| c.unacknowledged());
                let failed = outs.state.borrow().error.clone();
                match failed {
                    // Nothing is acknowledged past a failed write, and the
                    // run stops.
                    Some(error) => {
                        if outs
                            .stop
                            .as_ref()
                            .is_some_and(|s| !s.swap(true, std::sync::atomic::Ordering::SeqCst))
                        {
                            tracing::error!("{error}: stopping");
                        }
                        if all_in && frontier.is_empty() {
                            // The inputs are closed (the readers have
                            // committed and checkpointed before them): let
                            // the dataflow end.
                            awaiting.clear();
                        }
                    }
                    None => awaiting.retain(|&t, _| unacked.is_some_and(|u| u <= t)),
                }
                let unacked_lines = awaiting.values().map(|(_, n)| n).sum();
                mark(
                    &outs,
                    [
                        frontier.frontier().first(),
                        notes_frontier.frontier().first(),
                        awaiting.keys().next(),
                    ],
                    unacked_lines,
                );
                if !awaiting.is_empty() {
                    activator.activate_after(Duration::from_millis(5));
                } else if keep.is_some() {
                    activator.activate_after(Duration::from_millis(50));
                }
            }
        },
    )
}

/// Written ticks not yet acknowledged: the capability of a dataflow tick
/// (none for lines the observer wrote on its own) and the lines written.
type Awaiting = BTreeMap<u64, (Option<Capability<u64>>, u64)>;

/// Records the output as of the delivered frontier: the least of the
/// inputs' frontiers and the first unacknowledged tick (`u64::MAX` when
/// everything is out); the lines of unacknowledged ticks do not count.
fn mark(outs: &Outputs, bounds: [Option<&u64>; 3], unacked_lines: u64) {
    let Some(cell) = &outs.delivered else { return };
    let st = outs.state.borrow();
    // Ticks before `skip_before` were out before a restart.
    let frontier = bounds.into_iter().flatten().copied().min().unwrap_or(u64::MAX).max(st.skip_before);
    cell.lock().expect("not poisoned").mark = crate::output::sink::Mark {
        frontier,
        changes: outs.changes.as_ref().and_then(|c| c.position()),
        dead: outs.dead_letters.as_ref().and_then(|d| d.position()),
        diffs: st.diffs - unacked_lines,
        dead_written: st.dead_written.clone(),
    };
}

fn write_dead(outs: &mut Outputs, reader: usize, line: &str) {
    let mut st = outs.state.borrow_mut();
    *st.dead_written.entry(reader).or_default() += 1;
    if let (Some(d), None) = (outs.dead_letters.as_mut(), &st.error) {
        if let Err(e) = d.send(0, "", line) {
            st.error = Some(format!("cannot write dead letters: {e}"));
        }
    }
}

/// Runs the observer's requests (runtime definitions over HTTP): their
/// changes are written (stamped with its clock) and flushed, and only then
/// answered, so a client that reads the output after its answer finds them
/// there.
fn run_requests(outs: &mut Outputs, observer: &dyn Observer, written: &mut Vec<u64>, awaiting: &mut Awaiting) {
    let diffs = outs.state.borrow().diffs;
    let answers = observer.run_requests(diffs, &mut |t, lines| {
        send_lines(outs, t, lines);
        awaiting.entry(t).or_default().1 += lines.len() as u64;
    });
    flush(outs, written);
    for answer in answers {
        answer();
    }
}

fn write_tick(outs: &mut Outputs, t: u64, mut changes: Vec<NamedChange>) {
    differential_dataflow::consolidation::consolidate(&mut changes);
    if let Some(observer) = outs.observer.clone() {
        observer.tick(t, changes, &mut |lines| send_lines(outs, t, lines));
        return;
    }
    let mut lines: Vec<(SegmentId, String, bool)> = changes
        .into_iter()
        .filter(|(_, r)| *r != 0)
        .filter_map(|(u, r)| match u {
            Upd::Member(seg, id) => Some((seg, id.to_string(), r > 0)),
            _ => None,
        })
        .collect();
    lines.sort();
    let time = format_time(t, outs.show_ms);
    let lines: Vec<(String, String)> = lines
        .into_iter()
        .map(|(seg, profile, enter)| {
            let name = &outs.segments[seg.index()];
            let group = crate::spec::group_of(name, &outs.groups[seg.index()], &profile);
            let line = membership_line(&time, name, &profile, enter, group);
            (profile, line)
        })
        .collect();
    send_lines(outs, t, &lines);
}

/// Writes one tick's lines, `(profile, line)`, and counts them.
fn send_lines(outs: &mut Outputs, t: u64, lines: &[(String, String)]) {
    let mut st = outs.state.borrow_mut();
    st.diffs += lines.len() as u64;
    let Some(out) = outs.changes.as_mut() else { return };
    if st.error.is_some() {
        return;
    }
    for (profile, line) in lines {
        if let Err(e) = out.send(t, profile, line) {
            st.error = Some(format!("cannot write output: {e}"));
            return;
        }
    }
    if let Err(e) = out.end_tick(t) {
        st.error = Some(format!("cannot write output: {e}"));
    }
}

/// Flushes both outputs (see [`Deliver::flush`]); the ticks `written`
/// since the last flush are out now (the latency benchmark's mark).
fn flush(outs: &mut Outputs, written: &mut Vec<u64>) {
    let mut st = outs.state.borrow_mut();
    for (out, what) in [(&mut outs.changes, "output"), (&mut outs.dead_letters, "dead letters")] {
        if let (Some(out), None) = (out.as_mut(), &st.error) {
            if let Err(e) = out.flush() {
                st.error = Some(format!("cannot write {what}: {e}"));
            }
        }
    }
    if let Some(timings) = &outs.timings {
        let now = std::time::Instant::now();
        timings
            .written
            .lock()
            .expect("not poisoned")
            .extend(written.iter().map(|&t| (t, now)));
    }
    written.clear();
}

/// Counts profile changes by tick, on worker 0.
pub fn profiles<'s>(universe: VecCollection<'s, u64, Key, isize>, state: Rc<RefCell<SinkState>>) {
    let pact = Exchange::new(|_: &((), u64, isize)| 0u64);
    universe.map(|_| ()).inner.sink(pact, "CountProfiles", move |(input, _frontier)| {
        input.for_each(|_cap, data| {
            let mut st = state.borrow_mut();
            for ((), t, r) in data.drain(..) {
                *st.profiles.entry(t).or_default() += r as i64;
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A line reads back, as JSON, as the segment and profile it was
        /// written for, whatever characters they hold, in SPEC's key order.
        #[test]
        fn lines_read_back_as_written(segment in "\\PC*|[\"\\\\\u{0}-\u{1f}a]{0,6}", profile in "\\PC*|[\"\\\\\u{0}-\u{1f}a]{0,6}", enter: bool, t in 0u64..4_000_000_000_000) {
            let time = format_time(t, true);
            let group = (t % 2 == 0).then_some(segment.as_str());
            let line = membership_line(&time, &segment, &profile, enter, group);
            let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            prop_assert_eq!(v["group"].as_str(), group);
            prop_assert_eq!(v["segment"].as_str(), Some(segment.as_str()));
            prop_assert_eq!(v["profile"].as_str(), Some(profile.as_str()));
            prop_assert_eq!(v["time"].as_str(), Some(time.as_str()));
            prop_assert_eq!(v["change"].as_str(), Some(if enter { "enter" } else { "exit" }));
            let mut keys = vec!["\"time\":", "\"segment\":", "\"profile\":", "\"change\":"];
            keys.extend(group.map(|_| "\"group\":"));
            let at: Vec<usize> = keys.iter().map(|k| line.find(k).expect("every key")).collect();
            prop_assert!(at.windows(2).all(|w| w[0] < w[1]), "keys in SPEC order: {}", line);
        }
    }
}
