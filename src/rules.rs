//! Rules: every segment's formula, evaluated per profile.
//!
//! Each atom (one comparison) is evaluated per profile from the terms it
//! reads. An atom over one term is a function of the term's row, so it is
//! evaluated where the row changes, on its old and new values, and only a
//! value that differs goes on ([`flips`]): inside the terms stage for
//! event streams (no row need travel), and from the rows a tick retracts
//! and inserts together for population streams. Atoms over several terms
//! gather them in one `reduce` keyed by `(atom, profile)`. A profile with no row
//! for an atom's terms sees their empty values (`count` 0, `avg` missing,
//! …), so the atom's value there is known in advance and need not be a row.
//!
//! Segments are then one `reduce` keyed by profile (all three are
//! [`crate::total`] operators): its input is the
//! profile's atom values and a mark that the profile exists (the universe),
//! and its output the segments the profile is in, each formula evaluated in
//! `in_segment` order over those values. A change of one atom re-evaluates
//! one profile's formulas — a handful of boolean operations — and only the
//! memberships that changed are emitted. (Rendering each
//! `and` as a semijoin and each `or` as a distinct union instead took one
//! or two arrangements per operator; on `retail.toml` both cost about the
//! same instructions, and this has fewer operators and no universe-sized
//! sets — see `docs/decisions.md`.)

use differential_dataflow::consolidation::consolidate;
use differential_dataflow::VecCollection;
use std::rc::Rc;

use crate::ingest::Key;
use crate::plan::Plan;
use crate::value::Value;

type Profiles<'s> = VecCollection<'s, u64, Key, isize>;

/// `((atom, profile), holds)`.
pub type AtomRow = ((u32, Key), bool);

/// The rows of the atoms over one term of `stream` when a profile's row
/// for it goes from `old` to `new` (`None`: no row): an atom has a row
/// while its term does, and only a row whose value differs is retracted
/// and inserted. Updates for one `(stream, profile)` are consolidated and
/// no other key's include them (an atom reads one term, of one stream),
/// as `crate::total::reduce_with` requires. The terms stage calls this
/// where each event-stream term changes.
pub fn flips(
    plan: &Plan,
    (stream, profile): (u32, Key),
    old: Option<&[Value]>,
    new: Option<&[Value]>,
    mut push: impl FnMut(AtomRow, isize),
) {
    for (slot, &term) in plan.folds[stream as usize].iter().enumerate() {
        for &(atom, _) in &plan.readers[term] {
            let def = &plan.atoms[atom];
            if def.terms.len() != 1 {
                continue;
            }
            let holds = |values: &[Value]| def.holds(std::slice::from_ref(&values[slot]));
            let (was, is) = (old.map(holds), new.map(holds));
            if was != is {
                if let Some(was) = was {
                    push(((atom as u32, profile), was), -1);
                }
                if let Some(is) = is {
                    push(((atom as u32, profile), is), 1);
                }
            }
        }
    }
}

/// `((atom, profile), holds)` from term rows, for what the terms stage
/// does not evaluate itself ([`flips`]): the atoms over one term of a
/// population stream (thresholds, RFM, clusters), and the atoms over
/// several terms. `None` when the plan has neither.
pub fn atoms<'s>(
    terms: VecCollection<'s, u64, ((u32, Key), Vec<Value>), isize>,
    plan: Rc<Plan>,
) -> Option<VecCollection<'s, u64, AtomRow, isize>> {
    let events = plan.streams.len() as u32;
    let population = (events as usize) < plan.folds.len();
    let several = plan.atoms.iter().any(|a| a.terms.len() > 1);
    let direct = population.then(|| {
        let single = plan.clone();
        // The rows a tick retracts and inserts together, evaluated in
        // place: only the atom values that differ go on.
        let mut net: Vec<(AtomRow, isize)> = Vec::new();
        let rows = terms.clone().filter(move |((stream, _), _)| *stream >= events);
        crate::total::by_tick(rows, "Atoms", move |t, rows, out| {
            for (((stream, profile), values), r) in rows.drain(..) {
                for (&term, value) in single.folds[stream as usize].iter().zip(&values) {
                    for &(atom, _) in &single.readers[term] {
                        let def = &single.atoms[atom];
                        if def.terms.len() == 1 {
                            net.push((((atom as u32, profile), def.holds(std::slice::from_ref(value))), r));
                        }
                    }
                }
            }
            consolidate(&mut net);
            out.extend(net.drain(..).map(|(atom, r)| (atom, t, r)));
        })
    });
    if !several {
        return direct;
    }
    let readers = plan.clone();
    let slots = terms.flat_map(move |((stream, profile), values)| {
        let mut rows = Vec::new();
        for (&term, value) in readers.folds[stream as usize].iter().zip(values) {
            for &(atom, slot) in &readers.readers[term] {
                if readers.atoms[atom].terms.len() > 1 {
                    rows.push(((atom as u32, profile), (slot as u32, value.clone())));
                }
            }
        }
        rows
    });
    let gathered = crate::total::reduce(slots, "AtomsOfSeveral", {
        let plan = plan.clone();
        move |(atom, _profile), slots, out| {
            let def = &plan.atoms[*atom as usize];
            let mut values: Vec<Value> = def.terms.iter().map(|&t| plan.terms[t].agg.empty()).collect();
            for ((slot, value), _) in slots {
                values[*slot as usize] = value.clone();
            }
            out.push((def.holds(&values), 1));
        }
    });
    Some(match direct {
        Some(direct) => direct.concat(gathered),
        None => gathered,
    })
}

/// Marks a profile of the universe among its atom rows (after every atom).
const EXISTS: u32 = u32::MAX;

/// The members of every segment, as `(segment, profile)`, from the atom
/// values [`atoms`] gives.
pub fn segments<'s>(
    atoms: VecCollection<'s, u64, ((u32, Key), bool), isize>,
    universe: Profiles<'s>,
    plan: Rc<Plan>,
) -> VecCollection<'s, u64, (u32, Key), isize> {
    let empty_holds: Vec<bool> = plan
        .atoms
        .iter()
        .map(|a| a.holds(&a.terms.iter().map(|&t| plan.terms[t].agg.empty()).collect::<Vec<_>>()))
        .collect();
    let rows = atoms
        .map(|((atom, profile), holds)| (profile, (atom, holds)))
        .concat(universe.map(|profile| (profile, (EXISTS, true))));
    // Reused for every profile: which atoms hold, which segments it is in.
    let (mut holds, mut member) = (Vec::new(), Vec::new());
    crate::total::reduce(rows, "Segments", move |_profile, rows, out| {
        if rows.last().is_none_or(|((atom, _), _)| *atom != EXISTS) {
            return;
        }
        holds.clone_from(&empty_holds);
        for ((atom, value), _) in &rows[..rows.len() - 1] {
            holds[*atom as usize] = *value;
        }
        member.clear();
        member.resize(plan.segments.len(), false);
        for &s in &plan.order {
            let is = plan.segments[s].formula.eval(&|a| holds[a], &|t| member[t]);
            member[s] = is;
        }
        out.extend(member.iter().enumerate().filter(|(_, m)| **m).map(|(s, _)| (s as u32, 1)));
    })
    .map(|(profile, segment)| (segment, profile))
}
