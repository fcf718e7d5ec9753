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
use crate::core::id::SegmentId;
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

/// The identity graph with requests applied: the nodes of forgotten ids
/// and the links touching them, and unlinked pairs, retracted — from the
/// tick of the request, as negative updates, so that label propagation
/// splits or drops just the components they touched.
///
/// Each removal is the semijoin of the graph with the requests, negated.
/// A link can be removed for several reasons (both ends forgotten, or
/// forgotten and unlinked), so the link removals are counted by inclusion
/// and exclusion: every removed link once, whatever its multiplicity.
/// `forgotten` and `unlinked` must hold each id or pair once.
pub fn requested<'s>(
    nodes: Nodes<'s>,
    links: Links<'s>,
    forgotten: VecCollection<'s, u64, Key, isize>,
    unlinked: Links<'s>,
) -> (Nodes<'s>, Links<'s>) {
    let gone = forgotten.map(|k| (k, ()));
    let nodes_gone = nodes
        .clone()
        .join_total(gone.clone(), "ForgetNodes", |k, label, ()| (*k, label.clone()));
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
    (nodes.concat(nodes_gone.negate()), links.concat(links_gone.negate()))
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
/// link. Label propagation yields one label per node whatever the
/// multiplicity of its inputs, so several readers may each feed the same
/// node or link.
pub fn profiles<'s>(
    nodes: VecCollection<'s, u64, (Key, Label), isize>,
    links: VecCollection<'s, u64, (Key, Key), isize>,
    placement: Placement,
) -> Profiles<'s> {
    let labelled = match placement {
        Placement::OneWorker => crate::dataflow::total::propagate(links, nodes, "Propagate"),
        Placement::Partitioned => differential_dataflow::algorithms::graphs::propagate::propagate(links, nodes),
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

/// Names the profiles of `(segment, profile)` memberships.
pub fn named<'s>(
    members: VecCollection<'s, u64, (SegmentId, Key), isize>,
    names: VecCollection<'s, u64, (Key, Id), isize>,
) -> VecCollection<'s, u64, (SegmentId, Id), isize> {
    let by_profile = members.map(|(segment, profile)| (profile, segment));
    by_profile.join_total(names, "Names", |_, segment, id| (*segment, id.clone()))
}
