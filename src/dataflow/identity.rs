//! Identity resolution: profiles as connected components of the id graph.
//!
//! Every id that has been seen is a node labelled `(true, id, key)`; every id
//! that named an accepted event (an *eligible* id, SPEC §2) also carries the
//! label `(false, id, key)`. Labels propagate along links and each node keeps
//! the least, so a component's label is its smallest eligible id — every
//! `user:` before every `anon:`, then by bytes — which is the profile. Links
//! from events only ever accumulate, so labels mostly shrink, which label
//! propagation handles incrementally: a late merge re-labels just the merged
//! component. Requests over the API ([`requested`]) remove nodes and links:
//! forgetting a profile retracts its ids' nodes and every link touching
//! them, unlinking two ids retracts the links between them, and propagation
//! rebuilds only the components they touched.
//! Where the id graph lives is a [`Placement`]. On one worker, propagation
//! is [`crate::dataflow::total::propagate`]: components kept on the last
//! worker and merged by union, about nine times cheaper per change than
//! differential's fixed-point iteration. Partitioned, it is differential's
//! own `propagate`: nodes and links spread over every worker by id, labels
//! iterated to a fixed point across workers, so no machine of a cluster
//! holds the whole graph. Both give every node the least label of its
//! component (a property test holds the first against the second), so the
//! output does not depend on the placement.

use differential_dataflow::VecCollection;

use crate::core::id::Id;
use crate::core::id::{Key, Label};
use crate::dataflow::total::TotalOps;

/// The result of identity resolution.
pub struct Profiles<'s> {
    /// `(id, profile)` for every id in a component with an eligible id.
    pub labels: VecCollection<'s, u64, (Key, Key), isize>,
    /// `(profile, its id)` for every profile: how output names a profile key.
    pub names: VecCollection<'s, u64, (Key, Id), isize>,
}

/// Identity nodes: `(id, label)`.
pub type Nodes<'s> = VecCollection<'s, u64, (Key, Label), isize>;
/// Identity links, or pairs of ids: `(id, id)`.
pub type Links<'s> = VecCollection<'s, u64, (Key, Key), isize>;

/// The ids forgotten over the API, each once.
pub type Forgotten<'s> = VecCollection<'s, u64, Key, isize>;

/// The identity links with requests applied: the links touching forgotten
/// ids, and unlinked pairs, retracted — from the tick of the request, as
/// negative updates, so that label propagation splits or drops just the
/// components they touched. The nodes of forgotten ids are retracted
/// where the graph is kept ([`profiles`]), or by [`remaining`].
///
/// Each removal is the semijoin of the links with the requests, negated.
/// A link can be removed for several reasons (both ends forgotten, or
/// forgotten and unlinked), so the link removals are counted by inclusion
/// and exclusion: every removed link once, whatever its multiplicity.
/// `forgotten` and `unlinked` must hold each id or pair once.
pub fn requested<'s>(links: Links<'s>, forgotten: Forgotten<'s>, unlinked: Links<'s>) -> Links<'s> {
    let gone = forgotten.map(|k| (k, ()));
    // Links with their first end forgotten, their second, and both.
    let from = links.clone().join_total(gone.clone(), "ForgetFrom", |a, b, ()| (*b, *a));
    let to = links
        .clone()
        .map(|(a, b)| (b, a))
        .join_total(gone.clone(), "ForgetTo", |b, a, ()| (*a, *b));
    let both = from.clone().join_total(gone, "ForgetBoth", |b, a, ()| (*a, *b));
    let from = from.map(|(b, a)| (a, b));
    let forgotten_links = from.concat(to).concat(both.negate());
    // Unlinked links, less those already gone as forgotten.
    let pairs = unlinked.map(|p| (p, ()));
    let cut = links.clone().map(|p| (p, ())).join_total(pairs.clone(), "Unlink", |p, (), ()| *p);
    let cut_forgotten = forgotten_links
        .clone()
        .map(|p| (p, ()))
        .join_total(pairs, "UnlinkForgotten", |p, (), ()| *p);
    let links_gone = forgotten_links.concat(cut).concat(cut_forgotten.negate());
    links.concat(links_gone.negate())
}

/// The nodes less those of forgotten ids, retracted from the tick of the
/// request (the semijoin of the nodes with the forgotten ids, negated).
pub fn remaining<'s>(nodes: Nodes<'s>, forgotten: Forgotten<'s>) -> Nodes<'s> {
    let gone = forgotten_nodes(nodes.clone(), forgotten.map(|k| (k, ())));
    nodes.concat(gone.negate())
}

/// The nodes of forgotten ids: the semijoin of `nodes` with `gone`, as a
/// join would give it (each label with the product of multiplicities, from
/// the tick either side changes).
///
/// It keeps a row per id that was ever seen, for the rare forget, so the
/// row is small: a node's labels are `(true, id, key)` and `(false, id,
/// key)` with its own id and key, so the id is kept once with the two
/// multiplicities, not as two labels in a vector (which cost about a
/// tenth of a profile's memory). A label of any other shape (two ids
/// whose keys collide) is kept apart, whole.
fn forgotten_nodes<'s>(nodes: Nodes<'s>, gone: VecCollection<'s, u64, (Key, ()), isize>) -> Nodes<'s> {
    use differential_dataflow::hashable::Hashable;
    use rustc_hash::FxHashMap;

    /// An id's labels by eligibility (`[eligible, not]`), and how many
    /// times it is forgotten.
    struct Row {
        id: Id,
        labels: [isize; 2],
        gone: isize,
    }
    // A row is made by the first label or forget of its id; a forget
    // leaves the id to the first label.
    let empty = || Row {
        id: Id::user(""),
        labels: [0, 0],
        gone: 0,
    };
    let mut rows: FxHashMap<Key, Row> = FxHashMap::default();
    let mut odd: FxHashMap<Key, Vec<(Label, isize)>> = FxHashMap::default();
    let by_key = (|(k, _): &(Key, Label)| k.hashed(), |(k, ()): &(Key, ())| k.hashed());
    crate::dataflow::total::binary_by_tick(nodes, gone, "ForgetNodes", by_key, move |t, labels, gone, out, _| {
        // Forgets meet the labels as they were, then labels meet the
        // forgets as they are now, as a join's two sides do.
        for ((k, ()), r) in gone.drain(..) {
            if let Some(row) = rows.get_mut(&k) {
                for (ineligible, n) in [false, true].into_iter().zip(row.labels) {
                    if n != 0 {
                        out.push(((k, (ineligible, row.id.clone(), k)), t, n * r));
                    }
                }
            }
            for (label, n) in odd.get(&k).into_iter().flatten() {
                out.push(((k, label.clone()), t, n * r));
            }
            let row = rows.entry(k).or_insert_with(empty);
            row.gone += r;
            if row.labels == [0, 0] && row.gone == 0 {
                rows.remove(&k);
            }
        }
        for ((k, label), r) in labels.drain(..) {
            let row = rows.entry(k).or_insert_with(empty);
            if row.labels == [0, 0] && label.2 == k {
                row.id.clone_from(&label.1);
            }
            if row.gone != 0 {
                out.push(((k, label.clone()), t, r * row.gone));
            }
            if label.2 == k && label.1 == row.id {
                row.labels[label.0 as usize] += r;
            } else {
                let kept = odd.entry(k).or_default();
                crate::dataflow::total::add(kept, label, r);
                if kept.is_empty() {
                    odd.remove(&k);
                }
            }
            if row.labels == [0, 0] && row.gone == 0 {
                rows.remove(&k);
            }
        }
    })
}

/// Where the id graph is kept and labels propagate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// All of it on one worker, merged by union: the cheapest per event,
    /// bounded by one machine's memory.
    #[default]
    OneWorker,
    /// Spread over every worker by id, labels propagated between them.
    Partitioned,
}

/// Resolves ids into profiles. `links` must hold both directions of every
/// link (with requests applied: [`requested`]). Label propagation yields
/// one label per node whatever the multiplicity of its inputs, so several
/// readers may each feed the same node or link. The nodes of `forgotten`
/// ids lose their labels: on one worker inside the graph, which keeps
/// every node's labels anyway; partitioned, by [`remaining`] before it
/// (`remaining`, if the caller has built it already).
pub fn profiles<'s>(
    (nodes, forgotten, remaining): (Nodes<'s>, Forgotten<'s>, Option<Nodes<'s>>),
    links: Links<'s>,
    placement: Placement,
) -> Profiles<'s> {
    let labelled = match placement {
        Placement::OneWorker => {
            let nodes = nodes.map(|(k, label)| (k, Some(label))).concat(forgotten.map(|k| (k, None)));
            crate::dataflow::total::propagate_forgetting(links, nodes, "Propagate")
        }
        Placement::Partitioned => {
            let nodes = remaining.unwrap_or_else(|| self::remaining(nodes, forgotten));
            differential_dataflow::algorithms::graphs::propagate::propagate(links, nodes)
        }
    };
    let eligible = labelled.filter(|(_, (ineligible, _, _))| !ineligible);
    let names = eligible
        .clone()
        .flat_map(|(id, (_, name, profile))| (id == profile).then_some((profile, name)));
    let labels = eligible.map(|(id, (_, _, profile))| (id, profile));
    Profiles { labels, names }
}

/// The profiles that exist: one per component with an eligible id.
pub fn universe<'s>(names: VecCollection<'s, u64, (Key, Id), isize>) -> VecCollection<'s, u64, Key, isize> {
    names.map(|(profile, _)| profile)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use differential_dataflow::consolidation::consolidate_updates;
    use differential_dataflow::input::Input;
    use proptest::prelude::*;
    use timely::dataflow::operators::Inspect;

    use super::*;

    type Out = Vec<((Key, Label), u64, isize)>;

    /// A node update: key, label (the node's own id and key when `own`,
    /// else another id: a colliding key), tick, diff.
    fn node_update() -> impl Strategy<Value = ((Key, Label), u64, isize)> {
        (
            0u64..4,
            any::<bool>(),
            any::<bool>(),
            0u64..10,
            prop_oneof![Just(1isize), Just(-1), Just(2)],
        )
            .prop_map(|(k, ineligible, own, t, r)| {
                let id = Id::user(if own { format!("u{k}") } else { format!("other{k}") });
                ((k, (ineligible, id, if own { k } else { k + 100 })), t, r)
            })
    }

    proptest! {
        /// `forgotten_nodes` is the semijoin of the nodes with the
        /// forgotten ids: the same updates at the same ticks, on one and
        /// two workers, for any history (labels and forgets in any order,
        /// retracted, with any multiplicity, and labels of other shapes).
        #[test]
        fn forgotten_nodes_is_the_semijoin(
            nodes in prop::collection::vec(node_update(), 0..40),
            gone in prop::collection::vec((0u64..4, 0u64..10, prop_oneof![Just(1isize), Just(-1)]), 0..8),
            workers in 1usize..3,
        ) {
            let ours: Arc<Mutex<Out>> = Arc::default();
            let theirs: Arc<Mutex<Out>> = Arc::default();
            let (o, th) = (ours.clone(), theirs.clone());
            // A worker's panic fails the test at once instead of hanging it.
            crate::dataflow::exit_when_a_worker_panics();
            timely::execute(timely::Config::process(workers), move |worker| {
                let (o, th) = (o.clone(), th.clone());
                let (mut n_in, mut g_in) = worker.dataflow::<u64, _, _>(|scope| {
                    let (n_in, n) = scope.new_collection::<(Key, Label), isize>();
                    let (g_in, g) = scope.new_collection::<Key, isize>();
                    forgotten_nodes(n.clone(), g.clone().map(|k| (k, ()))).inner.inspect(move |x| o.lock().unwrap().push(x.clone()));
                    n.semijoin(g).inner.inspect(move |x| th.lock().unwrap().push(x.clone()));
                    (n_in, g_in)
                });
                if worker.index() == 0 {
                    for tick in 0..12 {
                        for (d, _, r) in nodes.iter().filter(|u| u.1 == tick) {
                            n_in.update(d.clone(), *r);
                        }
                        for (k, _, r) in gone.iter().filter(|u| u.1 == tick) {
                            g_in.update(*k, *r);
                        }
                        n_in.advance_to(tick + 1);
                        g_in.advance_to(tick + 1);
                        n_in.flush();
                        g_in.flush();
                        worker.step();
                    }
                }
            })
            .expect("timely runs");
            let take = |s: &Arc<Mutex<Out>>| {
                let mut v = std::mem::take(&mut *s.lock().unwrap());
                consolidate_updates(&mut v);
                v
            };
            prop_assert_eq!(take(&ours), take(&theirs));
        }
    }
}
