//! Identity resolution: profiles as connected components of the id graph.
//!
//! Every id that has been seen is a node labelled `(true, id, key)`; every id
//! that named an accepted event (an *eligible* id, SPEC §2) also carries the
//! label `(false, id, key)`. Labels propagate along links and each node keeps
//! the least, so a component's label is its smallest eligible id — every
//! `user:` before every `anon:`, then by bytes — which is the profile. Links
//! only ever accumulate, so labels only ever shrink, which label propagation
//! handles incrementally: a late merge re-labels just the merged component.
//! Propagation is [`crate::dataflow::total::propagate`], components kept on the last worker
//! and merged by union, rather than differential's fixed-point iteration.

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

/// Resolves ids into profiles. `links` must hold both directions of every
/// link. Label propagation yields one label per node whatever the
/// multiplicity of its inputs, so several readers may each feed the same
/// node or link.
pub fn profiles<'s>(nodes: VecCollection<'s, u64, (Key, Label), isize>, links: VecCollection<'s, u64, (Key, Key), isize>) -> Profiles<'s> {
    let eligible = crate::dataflow::total::propagate(links, nodes, "Propagate").filter(|(_, (ineligible, _, _))| !ineligible);
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
