//! Windows: facts that enter at their tick and leave at `tick_of(e + W)`.
//!
//! A window is not a timer and not a pending update in differential's input:
//! the [`window`] operator passes each fact on at its effect tick and keeps
//! the matching retraction in a queue keyed by expiry tick, holding one
//! capability for the earliest. When the input frontier reaches an expiry
//! tick the retractions for it are released. Differential therefore never
//! holds future updates, and the cost of a fact does not depend on how long
//! its window is. The queue appends in O(1) for facts in input order (see
//! `Expiries`). When the input closes, retractions still queued lie beyond
//! the last written tick and are dropped.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use differential_dataflow::hashable::Hashable;
use differential_dataflow::VecCollection;
use timely::progress::frontier::MutableAntichain;
use timely::ExchangeData;

use crate::clock::tick_of;
use crate::ingest::Key;
use crate::terms::Pay;
use crate::total::{Stage, Updates};

/// A fact about one event as the reader emits it: the anchor id, the stream,
/// the event's own time (for expiry) and what the stream reads of it.
pub type Fact = FactOf<Pay>;

/// A fact with payload `P`: [`Pay`], or `()` for streams folded only by
/// `count`, which need nothing but the fact's multiplicity.
pub type FactOf<P> = (Key, u32, u64, P);

/// A collection of facts with payload `P`, as a reader feeds them.
pub type Facts<'s, P> = VecCollection<'s, u64, FactOf<P>, isize>;

/// A windowed fact: keyed by anchor id, with its stream and payload.
pub type Windowed = WindowedOf<Pay>;

/// A windowed fact with payload `P`.
pub type WindowedOf<P> = (Key, (u32, P));

/// Windows every fact by its stream's length (`None`: lifetime; facts whose
/// expiry is not after their effect tick never count and are dropped) and
/// re-keys it from its anchor to the anchor's profile, in one operator:
/// a join with `labels` (anchor → profile) whose left input is windowed
/// first. Both are keyed by anchor, so the windowed facts need no channel
/// and no buffer of their own before the join; the join's output is
/// `logic(anchor, (stream, payload), profile)`.
pub fn profile_of<'s, P, O, L>(
    facts: Facts<'s, P>,
    (lengths, tick): (Rc<Vec<Option<u64>>>, u64),
    labels: VecCollection<'s, u64, (Key, Key), isize>,
    name: &str,
    logic: L,
) -> VecCollection<'s, u64, O, isize>
where
    P: ExchangeData + Clone + Ord,
    O: ExchangeData + Clone,
    L: FnMut(&Key, &(u32, P), &Key) -> O + 'static,
{
    let window = Window {
        lengths,
        tick,
        expiries: Expiries::default(),
    };
    let anchor = |(id, _, _, _): &FactOf<P>| id.hashed();
    crate::total::join_staged((facts, window), anchor, labels, name, logic)
}

/// The window as a stage of the join: passes each fact on at its effect
/// tick and holds its retraction until the input reaches its expiry tick.
struct Window<P> {
    lengths: Rc<Vec<Option<u64>>>,
    tick: u64,
    expiries: Expiries<P>,
}

impl<P: Clone> Stage<FactOf<P>, WindowedOf<P>> for Window<P> {
    fn admit(&mut self, data: &mut Vec<(FactOf<P>, u64, isize)>, into: &mut Updates<WindowedOf<P>>) {
        for ((id, stream, e, pay), t, r) in data.drain(..) {
            let fact = (id, (stream, pay));
            match self.lengths[stream as usize] {
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
struct Expiries<P> {
    /// Per window length: `(expiry, fact, diff)` in arrival order.
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

type Queue<P> = VecDeque<(u64, WindowedOf<P>, isize)>;

impl<P> Expiries<P> {
    fn push(&mut self, length: u64, expiry: u64, fact: WindowedOf<P>, r: isize) {
        let at = match self.queues.iter().position(|(l, _)| *l == length) {
            Some(at) => at,
            None => {
                self.queues.push((length, VecDeque::new()));
                self.queues.len() - 1
            }
        };
        let queue = &mut self.queues[at].1;
        if queue.back().is_none_or(|(last, _, _)| *last <= expiry) {
            queue.push_back((expiry, fact, r));
        } else {
            self.stray.entry(expiry).or_default().push((fact, r));
        }
    }

    /// Moves every retraction whose expiry is `due` into `out`.
    fn release(&mut self, due: impl Fn(&u64) -> bool, out: &mut Vec<(WindowedOf<P>, u64, isize)>) {
        for (_, queue) in &mut self.queues {
            while queue.front().is_some_and(|(expiry, _, _)| due(expiry)) {
                let (expiry, fact, r) = queue.pop_front().expect("a front");
                out.push((fact, expiry, r));
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
        let queued = self.queues.iter().filter_map(|(_, q)| q.front().map(|(e, _, _)| *e));
        queued.chain(self.stray.keys().next().copied()).min()
    }
}
