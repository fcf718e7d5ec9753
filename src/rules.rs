//! Rules: every segment's formula, evaluated per profile.
//!
//! Each atom (one comparison) is evaluated per profile from the terms it
//! reads: where the term's rows change when it reads one term — the rows
//! a tick retracts and inserts together, passing on only the atom values
//! that differ — and in one `reduce` keyed by `(atom, profile)` when it
//! reads several. A profile with no row
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
type AtomRow = ((u32, Key), bool);

/// `((atom, profile), holds)` for every atom of a profile that has a row for
/// one of the atom's terms.
pub fn atoms<'s>(
    terms: VecCollection<'s, u64, ((u32, Key), Vec<Value>), isize>,
    plan: Rc<Plan>,
) -> VecCollection<'s, u64, ((u32, Key), bool), isize> {
    // An atom over one term is a function of one term row: evaluate it in
    // place, for the rows that left and came at a tick together, and pass on
    // only the atoms that changed (a count going from 4 to 5 rarely flips a
    // comparison). Only atoms over several terms gather their slots in a
    // reduce.
    let (single, readers) = (plan.clone(), plan.clone());
    let mut net: Vec<(AtomRow, isize)> = Vec::new();
    let direct = crate::total::by_tick(terms.clone(), "Atoms", move |t, rows, out| {
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
    });
    if plan.atoms.iter().all(|a| a.terms.len() == 1) {
        return direct;
    }
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
    direct.concat(gathered)
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
    crate::total::reduce(rows, "Segments", move |_profile, rows, out| {
        if rows.last().is_none_or(|((atom, _), _)| *atom != EXISTS) {
            return;
        }
        let mut holds = empty_holds.clone();
        for ((atom, value), _) in &rows[..rows.len() - 1] {
            holds[*atom as usize] = *value;
        }
        let mut member = vec![false; plan.segments.len()];
        for &s in &plan.order {
            let is = plan.segments[s].formula.eval(&|a| holds[a], &|t| member[t]);
            member[s] = is;
        }
        out.extend(member.iter().enumerate().filter(|(_, m)| **m).map(|(s, _)| (s as u32, 1)));
    })
    .map(|(profile, segment)| (segment, profile))
}
