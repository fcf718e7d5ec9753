//! Identity resolution: profiles as connected components of the id graph.
//!
//! Every id that has been seen is a node labelled `(true, id, key)`; every id
//! that named an accepted event (an *eligible* id, SPEC §2) also carries the
//! label `(false, id, key)`. Labels propagate along links and each node keeps
//! the least, so a component's label is its smallest eligible id — every
//! `user:` before every `anon:`, then by bytes — which is the profile. Links
//! only ever accumulate, so labels only ever shrink, which label propagation
//! handles incrementally: a late merge re-labels just the merged component.

use differential_dataflow::algorithms::graphs::propagate::propagate;
use differential_dataflow::VecCollection;

use crate::ingest::{Key, Label};

/// `(id, profile)` for every id in a component with an eligible id.
/// `links` must hold both directions of every link.
pub fn profiles<'s>(
    nodes: VecCollection<'s, u64, (Key, Label), isize>,
    links: VecCollection<'s, u64, (Key, Key), isize>,
) -> VecCollection<'s, u64, (Key, Key), isize> {
    propagate(links, nodes).flat_map(|(id, (ineligible, _name, profile))| (!ineligible).then_some((id, profile)))
}

/// The profiles that exist: one per component with an eligible id, i.e.
/// the ids that are their own profile.
pub fn universe<'s>(labels: VecCollection<'s, u64, (Key, Key), isize>) -> VecCollection<'s, u64, Key, isize> {
    labels.flat_map(|(id, profile)| (id == profile).then_some(profile))
}
