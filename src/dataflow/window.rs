//! Windows: facts that enter at their tick and leave at `tick_of(e + W)`.
//!
//! A window is not a timer and not a pending update in differential's input:
//! it is the first stage of the join that re-keys facts to profiles
//! ([`profile_of`]), which passes each fact on at its effect tick and keeps
//! the matching retraction in a queue keyed by expiry tick, under the
//! operator's capability. When the facts' frontier reaches an expiry tick
//! the retractions for it join the updates waiting for that tick.
//! Differential therefore never holds future updates, and the cost of a
//! fact does not depend on how long its window is. The queue appends in
//! O(1) for facts in input order (see `Expiries`). When the input closes,
//! retractions still queued lie beyond the last written tick and are
//! dropped.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use differential_dataflow::hashable::Hashable;
use differential_dataflow::VecCollection;
use timely::progress::frontier::MutableAntichain;
use timely::ExchangeData;

use crate::core::clock::tick_of;
use crate::core::fact::FactOf;
use crate::core::fact::WindowedOf;
use crate::core::id::Key;
use crate::core::id::StreamId;
use crate::dataflow::total::{Stage, Updates};

/// A collection of facts with payload `P`, as a reader feeds them.
pub type Facts<'s, P> = VecCollection<'s, u64, FactOf<P>, isize>;

/// Windows every fact by its stream's length (`None`: lifetime; facts whose
/// expiry is not after their effect tick never count and are dropped) and
/// re-keys it from its anchor to the anchor's profile, in one operator:
/// a join with `labels` (anchor → profile) whose two left inputs are each
/// windowed first. All are keyed by anchor, so the windowed facts need no channel
/// and no buffer of their own before the join.
///
/// Facts come in two kinds, `P1` and `P2` (counted facts without a payload
/// and folded ones with, see `crate::dataflow::terms`), each windowed on
/// its own and joined in the one operator, so that an anchor's profile is
/// kept and looked up once for both. The outputs are
/// `logic1(anchor, (stream, payload), profile)` for the first kind and
/// `logic2(…)` for the second.
pub fn profile_of<'s, P1, P2, O1, O2, L1, L2>(
    (facts1, facts2): (Facts<'s, P1>, Facts<'s, P2>),
    (lengths, tick): (Rc<Vec<Option<u64>>>, u64),
    labels: VecCollection<'s, u64, (Key, Key), isize>,
    name: &str,
    logic: (L1, L2),
) -> (VecCollection<'s, u64, O1, isize>, VecCollection<'s, u64, O2, isize>)
where
    P1: ExchangeData + Clone + Ord,
    P2: ExchangeData + Clone + Ord,
    O1: ExchangeData + Clone,
    O2: ExchangeData + Clone,
    L1: FnMut(&Key, &(StreamId, P1), &Key) -> O1 + 'static,
    L2: FnMut(&Key, &(StreamId, P2), &Key) -> O2 + 'static,
{
    let left1 = (facts1, WindowStage::new(lengths.clone(), tick), |(id, _, _, _): &FactOf<P1>| {
        id.hashed()
    });
    let left2 = (facts2, WindowStage::new(lengths, tick), |(id, _, _, _): &FactOf<P2>| id.hashed());
    crate::dataflow::total::join_pair_staged((left1, left2), labels, name, logic)
}

/// The window as a stage of the join: passes each fact on at its effect
/// tick and holds its retraction until the input reaches its expiry tick.
struct WindowStage<P> {
    lengths: Rc<Vec<Option<u64>>>,
    tick: u64,
    expiries: Expiries<P>,
}

impl<P> WindowStage<P> {
    fn new(lengths: Rc<Vec<Option<u64>>>, tick: u64) -> Self {
        WindowStage {
            lengths,
            tick,
            expiries: Expiries::default(),
        }
    }
}

impl<P: Clone> Stage<FactOf<P>, WindowedOf<P>> for WindowStage<P> {
    fn admit(&mut self, data: &mut Vec<(FactOf<P>, u64, isize)>, into: &mut Updates<WindowedOf<P>>) {
        for ((id, stream, e, pay), t, r) in data.drain(..) {
            let fact = (id, (stream, pay));
            match self.lengths[stream.index()] {
                None => into.push((fact, t, r)),
                Some(w) => {
                    let expiry = tick_of(e.saturating_add(w), self.tick);
                    if expiry <= t {
                        continue;
                    }
                    into.push((fact.clone(), t, r));
                    self.expiries.push(w, expiry, fact, -r);
                }
            }
        }
    }

    fn release(&mut self, frontier: &MutableAntichain<u64>, into: &mut Updates<WindowedOf<P>>) {
        if frontier.is_empty() {
            // Past the last tick: nothing is written after it.
            self.expiries = Expiries::default();
        } else {
            self.expiries.release(|expiry| !frontier.less_than(expiry), into);
        }
    }

    fn next(&self) -> Option<u64> {
        self.expiries.next()
    }
}

/// Retractions waiting for their expiry tick. Facts of one window length
/// mostly arrive in the order of their expiry (the reader feeds in input
/// order), so each length has a queue in arrival order and a fact is
/// appended in O(1); one that would break a queue's order (a late event)
/// waits in an ordered map instead.
///
/// The queues are most of the memory of a long window (every fact in it
/// waits here), so an entry is small: the expiry tick is kept once per run
/// of facts that share it, and the multiplicity in 32 bits (one beyond
/// that is queued in parts). A counted fact waits in 16 bytes.
struct Expiries<P> {
    /// Per window length, in arrival order.
    queues: Vec<(u64, Queue<P>)>,
    stray: BTreeMap<u64, Vec<(WindowedOf<P>, isize)>>,
}

impl<P> Default for Expiries<P> {
    fn default() -> Self {
        Expiries {
            queues: Vec::new(),
            stray: BTreeMap::new(),
        }
    }
}

/// One window length's retractions in arrival order, and their expiry
/// ticks as runs `(expiry, how many)`.
struct Queue<P> {
    ticks: VecDeque<(u64, usize)>,
    facts: VecDeque<Waiting<P>>,
}

/// A retraction as it waits: a fact and its diff, flat (as a tuple of
/// tuples it would be padded to 24 bytes without a payload).
struct Waiting<P> {
    id: Key,
    stream: StreamId,
    r: i32,
    pay: P,
}

/// `r` in 32-bit parts: one, unless it is beyond ±2³¹.
fn parts(mut r: isize) -> impl Iterator<Item = i32> {
    std::iter::from_fn(move || {
        (r != 0).then(|| {
            let part = r.clamp(i32::MIN as isize, i32::MAX as isize);
            r -= part;
            part as i32
        })
    })
}

impl<P: Clone> Expiries<P> {
    fn push(&mut self, length: u64, expiry: u64, fact: WindowedOf<P>, r: isize) {
        let at = match self.queues.iter().position(|(l, _)| *l == length) {
            Some(at) => at,
            None => {
                let queue = Queue {
                    ticks: VecDeque::new(),
                    facts: VecDeque::new(),
                };
                self.queues.push((length, queue));
                self.queues.len() - 1
            }
        };
        let queue = &mut self.queues[at].1;
        if queue.ticks.back().is_none_or(|(last, _)| *last <= expiry) {
            let (id, (stream, pay)) = fact;
            let added = match i32::try_from(r) {
                Ok(0) => 0,
                Ok(r) => {
                    queue.facts.push_back(Waiting { id, stream, r, pay });
                    1
                }
                Err(_) => {
                    let before = queue.facts.len();
                    let part = |r| Waiting {
                        id,
                        stream,
                        r,
                        pay: pay.clone(),
                    };
                    queue.facts.extend(parts(r).map(part));
                    queue.facts.len() - before
                }
            };
            match queue.ticks.back_mut() {
                Some((last, n)) if *last == expiry => *n += added,
                _ if added > 0 => queue.ticks.push_back((expiry, added)),
                _ => {}
            }
        } else {
            self.stray.entry(expiry).or_default().push((fact, r));
        }
    }
}

impl<P> Expiries<P> {
    /// Moves every retraction whose expiry is `due` into `out`.
    fn release(&mut self, due: impl Fn(&u64) -> bool, out: &mut Vec<(WindowedOf<P>, u64, isize)>) {
        for (_, queue) in &mut self.queues {
            while let Some(&(expiry, n)) = queue.ticks.front().filter(|(expiry, _)| due(expiry)) {
                queue.ticks.pop_front();
                out.extend(queue.facts.drain(..n).map(|w| ((w.id, (w.stream, w.pay)), expiry, w.r as isize)));
            }
        }
        while let Some(entry) = self.stray.first_entry() {
            let expiry = *entry.key();
            if !due(&expiry) {
                break;
            }
            out.extend(entry.remove().into_iter().map(|(fact, r)| (fact, expiry, r)));
        }
    }

    /// The earliest expiry still waiting.
    fn next(&self) -> Option<u64> {
        let queued = self.queues.iter().filter_map(|(_, q)| q.ticks.front().map(|(e, _)| *e));
        queued.chain(self.stray.keys().next().copied()).min()
    }
}

#[cfg(test)]
mod queue_tests {
    use differential_dataflow::consolidation::consolidate_updates;

    use super::*;

    #[test]
    fn a_counted_fact_waits_in_16_bytes() {
        assert_eq!(std::mem::size_of::<Waiting<()>>(), 16);
    }

    #[test]
    fn a_diff_beyond_32_bits_waits_in_parts() {
        let big = i32::MAX as isize * 2 + 5;
        assert_eq!(parts(big).map(|p| p as isize).sum::<isize>(), big);
        assert_eq!(parts(-big).count(), 3);
        assert_eq!(parts(-1).collect::<Vec<_>>(), vec![-1]);
        assert_eq!(parts(0).count(), 0);
        let mut e = Expiries::<()>::default();
        e.push(10, 7, (1, (StreamId(0), ())), big);
        e.push(10, 7, (2, (StreamId(0), ())), -1);
        e.push(10, 9, (3, (StreamId(0), ())), 1);
        let mut out = Vec::new();
        e.release(|t| *t <= 7, &mut out);
        consolidate_updates(&mut out);
        assert_eq!(out, vec![((1, (StreamId(0), ())), 7, big), ((2, (StreamId(0), ())), 7, -1)]);
        assert_eq!(e.next(), Some(9));
    }
}

/// The test helper that advances and flushes an input, for the terms'
/// tests as well.
#[cfg(test)]
pub(crate) use tests::Advance;

#[cfg(test)]
mod tests {
    //! The fused window and join against differential's `join_core` over
    //! the same facts with their retractions fed explicitly at expiry.

    use crate::core::fact::FactOf;

    use std::sync::{Arc, Mutex};

    use differential_dataflow::consolidation::consolidate_updates;
    use differential_dataflow::input::Input;
    use proptest::prelude::*;
    use timely::dataflow::operators::{Inspect, Probe};

    use super::*;

    /// `(kind, (anchor, stream, payload, profile))`: which output.
    type Out = Vec<((bool, (u64, StreamId, u8, u64)), u64, isize)>;

    proptest! {
        #[test]
        fn profile_of_matches_a_join_over_explicit_retractions(
            // (anchor, stream, event time in ms, payload, tick it is fed at,
            // which kind)
            facts in prop::collection::vec((0u64..5, 0u32..3, 0u64..20_000, 0u8..3, 0u64..20, any::<bool>()), 0..40),
            // (anchor, profile, tick, enters or leaves)
            labels in prop::collection::vec((0u64..5, 10u64..13, 0u64..20, any::<bool>()), 0..12),
            workers in 1usize..3,
        ) {
            const TICK: u64 = 1_000;
            // Lengths: 2.5s, 7s, lifetime; ticks run 0..25, the last 5 without input.
            let lengths = vec![Some(2_500), Some(7_000), None];
            let ours: Arc<Mutex<Out>> = Arc::default();
            let theirs: Arc<Mutex<Out>> = Arc::default();
            let (o, t) = (ours.clone(), theirs.clone());
            // A worker's panic fails the test at once instead of hanging it.
            crate::dataflow::exit_when_a_worker_panics();
            timely::execute(timely::Config::process(workers), move |worker| {
                let (o, t) = (o.clone(), t.clone());
                let (mut f_in, mut g_in, mut w_in, mut l_in, probe) = worker.dataflow::<u64, _, _>(|scope| {
                    let (f_in, facts) = scope.new_collection::<FactOf<u8>, isize>();
                    let (g_in, others) = scope.new_collection::<FactOf<u8>, isize>();
                    let (w_in, windowed) = scope.new_collection::<(Key, (bool, StreamId, u8)), isize>();
                    let (l_in, labels) = scope.new_collection::<(Key, Key), isize>();
                    let logic = |kind: bool| move |a: &Key, (s, p): &(StreamId, u8), q: &Key| (kind, (*a, *s, *p, *q));
                    let windows = (Rc::new(lengths.clone()), TICK);
                    let (first, second) = profile_of((facts, others), windows, labels.clone(), "Ours", (logic(false), logic(true)));
                    let reference = windowed
                        .arrange_by_key()
                        .join_core(labels.arrange_by_key(), |a, (k, s, p), q| Some((*k, (*a, *s, *p, *q))));
                    let probe = first.concat(second).inner.inspect(move |x| o.lock().unwrap().push(*x)).probe().0;
                    reference.inner.inspect(move |x| t.lock().unwrap().push(*x));
                    (f_in, g_in, w_in, l_in, probe)
                });
                if worker.index() == 0 {
                    // Labels hold a set: each (anchor, profile) enters or leaves once.
                    let mut held = std::collections::BTreeSet::new();
                    for tick in 0..25u64 {
                        let now = tick * TICK;
                        for &(a, s, e, p, _, kind) in facts.iter().filter(|f| f.4 == tick) {
                            // A fact takes effect no sooner than its own tick.
                            let effect = now.max(tick_of(e, TICK));
                            let input = if kind { &mut g_in } else { &mut f_in };
                            input.update_at((a, StreamId(s), e, p), effect, 1);
                            let expiry = lengths[s as usize].map(|w| tick_of(e + w, TICK));
                            if expiry.is_none_or(|x| x > effect) {
                                w_in.update_at((a, (kind, StreamId(s), p)), effect, 1);
                                if let Some(x) = expiry {
                                    w_in.update_at((a, (kind, StreamId(s), p)), x, -1);
                                }
                            }
                        }
                        for &(a, q, _, enter) in labels.iter().filter(|l| l.2 == tick) {
                            if enter && held.insert((a, q)) {
                                l_in.update_at((a, q), now, 1);
                            } else if !enter && held.remove(&(a, q)) {
                                l_in.update_at((a, q), now, -1);
                            }
                        }
                        for input in [&mut f_in as &mut dyn Advance, &mut g_in, &mut w_in, &mut l_in] {
                            input.advance(now + TICK);
                        }
                        worker.step();
                    }
                    // As a reader does before it closes its inputs: every
                    // worker sees the last frontier (retractions queued past
                    // it are dropped when the inputs close).
                    worker.step_while(|| probe.less_than(&(25 * TICK)));
                }
            })
            .expect("timely runs");
            let take = |s: Arc<Mutex<Out>>| {
                let mut v = std::mem::take(&mut *s.lock().unwrap());
                // Only ticks both have finished: the reference's retractions
                // past the last tick are never released by the window.
                v.retain(|(_, t, _)| *t < 25 * TICK);
                consolidate_updates(&mut v);
                v
            };
            prop_assert_eq!(take(ours), take(theirs));
        }
    }

    /// Advances and flushes an input session of any record type (also
    /// for `crate::dataflow::terms`' tests).
    pub(crate) trait Advance {
        fn advance(&mut self, to: u64);
    }

    impl<D: differential_dataflow::Data> Advance for differential_dataflow::input::InputSession<u64, D, isize> {
        fn advance(&mut self, to: u64) {
            self.advance_to(to);
            self.flush();
        }
    }
}
