//! Windows: facts that enter at their tick and leave at `tick_of(e + W)`.
//!
//! A window is not a timer and not a pending update in differential's input:
//! the [`window`] operator passes each fact on at its effect tick and keeps
//! the matching retraction in a queue keyed by expiry tick, holding one
//! capability for the earliest. When the input frontier reaches an expiry
//! tick the retractions for it are released. Differential therefore never
//! holds future updates, and the cost of a fact does not depend on how long
//! its window is. When the input closes, retractions still queued lie beyond
//! the last written tick and are dropped.

use std::collections::BTreeMap;
use std::rc::Rc;

use differential_dataflow::hashable::Hashable;
use differential_dataflow::{AsCollection, VecCollection};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;

use crate::clock::tick_of;
use crate::ingest::Key;
use crate::terms::Pay;

/// A fact about one event as the reader emits it: the anchor id, the stream,
/// the event's own time (for expiry) and what the stream reads of it.
pub type Fact = (Key, u32, u64, Pay);

/// A windowed fact: keyed by anchor id, with its stream and payload.
pub type Windowed = (Key, (u32, Pay));

/// Windows every fact by its stream's length (`None`: lifetime); facts whose
/// expiry is not after their effect tick never count and are dropped.
pub fn window<'s>(
    facts: VecCollection<'s, u64, Fact, isize>,
    lengths: Rc<Vec<Option<u64>>>,
    tick: u64,
) -> VecCollection<'s, u64, Windowed, isize> {
    let pact = Exchange::new(|(d, _t, _r): &(Fact, u64, isize)| d.0.hashed());
    facts
        .inner
        .unary_frontier::<CapacityContainerBuilder<Vec<(Windowed, u64, isize)>>, _, _, _>(pact, "Window", move |_cap, _info| {
            let mut pending: BTreeMap<u64, Vec<(Windowed, isize)>> = BTreeMap::new();
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
                                pending.entry(expiry).or_default().push((fact, -r));
                                if held.as_ref().is_none_or(|h| *h.time() > expiry) {
                                    held = Some(cap.delayed(&expiry, 0));
                                }
                            }
                        }
                    }
                });
                if frontier.is_empty() {
                    pending.clear();
                    held = None;
                    return;
                }
                while let Some(entry) = pending.first_entry() {
                    let expiry = *entry.key();
                    if frontier.less_than(&expiry) {
                        break;
                    }
                    let batch = entry.remove();
                    let cap = held.as_ref().expect("a capability for every pending expiry").delayed(&expiry);
                    output.session(&cap).give_iterator(batch.into_iter().map(|(d, r)| (d, expiry, r)));
                }
                match pending.keys().next() {
                    Some(&next) => held.as_mut().expect("held").downgrade(&next),
                    None => held = None,
                }
            }
        })
        .as_collection()
}
