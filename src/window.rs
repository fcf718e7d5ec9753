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
use differential_dataflow::{AsCollection, VecCollection};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::ExchangeData;

use crate::clock::tick_of;
use crate::ingest::Key;
use crate::terms::Pay;

/// A fact about one event as the reader emits it: the anchor id, the stream,
/// the event's own time (for expiry) and what the stream reads of it.
pub type Fact = FactOf<Pay>;

/// A fact with payload `P`: [`Pay`], or `()` for streams folded only by
/// `count`, which need nothing but the fact's multiplicity.
pub type FactOf<P> = (Key, u32, u64, P);

/// A windowed fact: keyed by anchor id, with its stream and payload.
pub type Windowed = WindowedOf<Pay>;

/// A windowed fact with payload `P`.
pub type WindowedOf<P> = (Key, (u32, P));

/// Windows every fact by its stream's length (`None`: lifetime); facts whose
/// expiry is not after their effect tick never count and are dropped.
pub fn window<'s, P: ExchangeData + Clone>(
    facts: VecCollection<'s, u64, FactOf<P>, isize>,
    lengths: Rc<Vec<Option<u64>>>,
    tick: u64,
) -> VecCollection<'s, u64, WindowedOf<P>, isize> {
    let pact = Exchange::new(|(d, _t, _r): &(FactOf<P>, u64, isize)| d.0.hashed());
    facts
        .inner
        .unary_frontier::<CapacityContainerBuilder<Vec<(WindowedOf<P>, u64, isize)>>, _, _, _>(pact, "Window", move |_cap, _info| {
            let mut pending = Expiries::default();
            let mut held: Option<Capability<u64>> = None;
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    let mut session = output.session(&cap);
                    for ((id, stream, e, pay), t, r) in data.drain(..) {
                        let fact = (id, (stream, pay));
                        match lengths[stream as usize] {
                            None => session.give((fact, t, r)),
                            Some(w) => {
                                let expiry = tick_of(e.saturating_add(w), tick);
                                if expiry <= t {
                                    continue;
                                }
                                session.give((fact.clone(), t, r));
                                pending.push(w, expiry, fact, -r);
                                if held.as_ref().is_none_or(|h| *h.time() > expiry) {
                                    held = Some(cap.delayed(&expiry, 0));
                                }
                            }
                        }
                    }
                });
                if frontier.is_empty() {
                    pending = Expiries::default();
                    held = None;
                    return;
                }
                if let Some(cap) = held.as_mut() {
                    // Every retraction is at or after the held capability:
                    // one session carries all that are due, each at its tick.
                    let mut due = Vec::new();
                    pending.release(|expiry| !frontier.less_than(expiry), &mut due);
                    if !due.is_empty() {
                        output.session(&*cap).give_container(&mut due);
                    }
                    match pending.next() {
                        Some(next) => cap.downgrade(&next),
                        None => held = None,
                    }
                }
            }
        })
        .as_collection()
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
