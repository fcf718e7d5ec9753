//! Rules: predicates as sets of profiles, combined by set operators.
//!
//! Each atom (one comparison) is evaluated per profile from the terms it
//! reads: in place on the term's row when it reads one term, in one `reduce`
//! keyed by `(atom, profile)` when it reads several; a profile with no fact
//! for a term sees the term's empty value (`count` 0, `avg` missing, …).
//! When an atom holds on all-empty terms (`count(x, 1h) == 0`) its set is the
//! universe minus the profiles where it fails, otherwise the profiles where it
//! holds. `and` is a semijoin (`and not` an antijoin), `or` a distinct union, `not` the universe minus
//! the set, `in_segment` the other segment's set: every formula is a
//! collection of profiles with multiplicity one, kept current by differential.

use differential_dataflow::{AsCollection, VecCollection};
use std::rc::Rc;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::core::Partition;

use crate::ingest::Key;
use crate::plan::{Formula, Plan};
use crate::value::Value;

type Profiles<'s> = VecCollection<'s, u64, Key, isize>;

/// `(atom, profile)` for every atom that holds of a profile.
pub fn atoms<'s>(
    terms: VecCollection<'s, u64, ((u32, Key), Vec<Value>), isize>,
    universe: Profiles<'s>,
    plan: Rc<Plan>,
) -> VecCollection<'s, u64, (u32, Key), isize> {
    // An atom over one term is a function of one term row: evaluate it in
    // place. Only atoms over several terms gather their slots in a reduce.
    let (single, readers) = (plan.clone(), plan.clone());
    let direct = terms.clone().flat_map(move |((stream, profile), values)| {
        let mut rows = Vec::new();
        for (&term, value) in single.folds[stream as usize].iter().zip(values) {
            for &(atom, _) in &single.readers[term] {
                let def = &single.atoms[atom];
                if def.terms.len() == 1 {
                    rows.push(((atom as u32, profile), def.holds(std::slice::from_ref(&value))));
                }
            }
        }
        rows
    });
    let gathered = terms
        .flat_map(move |((stream, profile), values)| {
            let mut rows = Vec::new();
            for (&term, value) in readers.folds[stream as usize].iter().zip(values) {
                for &(atom, slot) in &readers.readers[term] {
                    if readers.atoms[atom].terms.len() > 1 {
                        rows.push(((atom as u32, profile), (slot as u32, value.clone())));
                    }
                }
            }
            rows
        })
        .reduce_named("Atoms", {
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
    let evaluated = direct.concat(gathered);
    let empty_holds: Rc<Vec<bool>> = Rc::new(
        plan.atoms
            .iter()
            .map(|a| a.holds(&a.terms.iter().map(|&t| plan.terms[t].agg.empty()).collect::<Vec<_>>()))
            .collect(),
    );
    let (h1, h2, h3) = (empty_holds.clone(), empty_holds.clone(), empty_holds.clone());
    let holds = evaluated
        .clone()
        .flat_map(move |((a, p), holds)| (holds && !h1[a as usize]).then_some((a, p)));
    let fails = evaluated.flat_map(move |((a, p), holds)| (!holds && h2[a as usize]).then_some((a, p)));
    let by_default = universe.flat_map(move |p| {
        h3.iter()
            .enumerate()
            .filter(|(_, h)| **h)
            .map(|(a, _)| (a as u32, p))
            .collect::<Vec<_>>()
    });
    holds.concat(by_default).concat(fails.negate())
}

/// The members of every segment, as `(segment, profile)`.
pub fn segments<'s>(
    atoms: VecCollection<'s, u64, (u32, Key), isize>,
    universe: Profiles<'s>,
    plan: &Plan,
) -> VecCollection<'s, u64, (u32, Key), isize> {
    // One stream per atom, split once rather than filtered once per use.
    let by_atom: Vec<Profiles<'s>> = atoms
        .inner
        .partition::<CapacityContainerBuilder<Vec<_>>, _, _>(plan.atoms.len().max(1) as u64, |((a, p), t, r)| (a as u64, (p, t, r)))
        .into_iter()
        .map(|s| s.as_collection())
        .collect();
    let mut rendered: Vec<Option<Profiles<'s>>> = vec![None; plan.segments.len()];
    for &s in &plan.order {
        let members = render(&plan.segments[s].formula, &by_atom, &universe, &rendered);
        rendered[s] = Some(members);
    }
    let all = rendered
        .into_iter()
        .enumerate()
        .map(|(s, m)| m.expect("rendered in order").map(move |p| (s as u32, p)));
    differential_dataflow::collection::concatenate(universe.scope(), all)
}

fn render<'s>(f: &Formula, atoms: &[Profiles<'s>], universe: &Profiles<'s>, segs: &[Option<Profiles<'s>>]) -> Profiles<'s> {
    match f {
        Formula::True => universe.clone(),
        Formula::False => universe.clone().filter(|_| false),
        Formula::Atom(a) => atoms[*a].clone(),
        Formula::Segment(s) => segs[*s].clone().expect("in_segment targets come first"),
        Formula::Not(x) => universe.clone().concat(render(x, atoms, universe, segs).negate()),
        // `x and not y` is `x` minus `y`: no universe-sized set to arrange.
        Formula::And(x, y) => match (x.as_ref(), y.as_ref()) {
            (x, Formula::Not(y)) | (Formula::Not(y), x) => {
                let x = render(x, atoms, universe, segs).map(|p| (p, ()));
                x.antijoin(render(y, atoms, universe, segs)).map(|(p, ())| p)
            }
            (x, y) => {
                let x = render(x, atoms, universe, segs).map(|p| (p, ()));
                x.semijoin(render(y, atoms, universe, segs)).map(|(p, ())| p)
            }
        },
        Formula::Or(x, y) => render(x, atoms, universe, segs).concat(render(y, atoms, universe, segs)).distinct(),
    }
}
