//! Scores and adaptive thresholds (SPEC §4): profile values and percentiles.
//!
//! A `score.NAME` needs no operator of its own: the planner inlines its
//! expression wherever it is read, so it is an atom over terms like any
//! other arithmetic. What is new here is the population level:
//!
//! - [`values`] evaluates each *profile value* of the plan (arithmetic over
//!   event terms) for every profile of the universe, in one `reduce` keyed by
//!   `(value, profile)`: a profile with no fact for a term sees the term's
//!   empty value, exactly as atoms do;
//! - [`thresholds`] keeps each `percentile(x, P)` over all profiles in one
//!   `reduce` per percentile (nearest rank over the numeric values, missing
//!   values left out), gathers them into one row, and hands that row to every
//!   profile (a join with the universe), as the terms of the thresholds
//!   stream. A threshold is re-derived whenever some profile's value
//!   changes, and every profile's atoms see the new one at the same tick.

use std::rc::Rc;

use differential_dataflow::VecCollection;

use crate::core::id::Key;
use crate::core::id::StreamId;
use crate::core::id::ValueId;
use crate::core::value::{Float, Value};
use crate::plan::{Agg, Plan};

/// `((stream, profile), values)`: rows of term values, event or virtual.
pub type Rows<'s> = VecCollection<'s, u64, ((StreamId, Key), Vec<Value>), isize>;

/// `((value, profile), values)` for every profile value of the plan and every
/// profile of the universe.
pub type Values<'s> = VecCollection<'s, u64, ((ValueId, Key), Vec<Value>), isize>;

/// Every profile value of `plan` for every profile of `universe`.
pub fn values<'s>(terms: Rows<'s>, universe: VecCollection<'s, u64, Key, isize>, plan: Rc<Plan>) -> Values<'s> {
    let readers = plan.clone();
    let rows = terms.flat_map(move |((stream, profile), values)| {
        let mut rows = Vec::new();
        if readers.is_event_stream(stream.index()) {
            for (&term, value) in readers.folds[stream.index()].iter().zip(values) {
                for &(v, slot) in &readers.value_readers[term] {
                    rows.push(((ValueId::of(v), profile), Some((slot as u32, value.clone()))));
                }
            }
        }
        rows
    });
    let n = plan.values.len();
    let members = universe.flat_map(move |p| (0..n).map(move |v| ((ValueId::of(v), p), None)));
    // The total-order reduce (hash maps per key, no arrangement): each
    // profile's values are recomputed whenever one of its terms changes.
    crate::dataflow::total::reduce(rows.concat(members), "ProfileValues", move |(v, _profile), input, out| {
        let def = &plan.values[v.index()];
        let mut slots: Vec<Value> = def.terms.iter().map(|&t| plan.terms[t].agg.empty()).collect();
        let mut member = false;
        for (row, _) in input {
            match row {
                None => member = true,
                Some((slot, value)) => slots[*slot as usize] = value.clone(),
            }
        }
        if member {
            out.push((def.eval(&slots), 1));
        }
    })
}

/// The nearest rank of percentile `p` (0–100) among `n > 0` values:
/// `ceil(p * n / 100)`, at least 1.
pub fn nearest_rank(p: f64, n: u64) -> u64 {
    ((p * n as f64 / 100.0).ceil() as u64).clamp(1, n)
}

/// The rows of the thresholds stream: every profile of the universe gets
/// the current value of every percentile (missing when no profile has a
/// number for it).
pub fn thresholds<'s>(values: Values<'s>, universe: VecCollection<'s, u64, Key, isize>, plan: Rc<Plan>) -> Rows<'s> {
    let wanted = plan.clone();
    let numbers = values.flat_map(move |((v, _profile), vals)| {
        let x = vals[0].as_f64().map(|x| Float(x + 0.0)); // -0 is 0
        wanted
            .percentiles
            .iter()
            .enumerate()
            .filter(move |(_, q)| q.value == v.index())
            .filter_map(move |(i, _)| x.map(|x| (i as u32, x)))
            .collect::<Vec<_>>()
    });
    let ps = plan.clone();
    let each = numbers.reduce_named("Percentile", move |i, input, out| {
        // `input` is in ascending order (Float's total order).
        let n: isize = input.iter().map(|(_, c)| *c).sum();
        if n <= 0 {
            return;
        }
        let rank = nearest_rank(ps.percentiles[*i as usize].p, n as u64) as isize;
        let mut seen = 0;
        for (x, c) in input {
            seen += c;
            if seen >= rank {
                out.push((**x, 1));
                return;
            }
        }
    });
    let stream = plan.thresholds_stream();
    let row = each.map(|(i, x)| ((), (i, x))).reduce_named("Thresholds", move |_, input, out| {
        let values = plan.folds[stream]
            .iter()
            .map(|&t| match plan.terms[t].agg {
                Agg::Derived(i) => input
                    .iter()
                    .find(|((j, _), _)| *j == i)
                    .map(|((_, x), _)| Value::Float(*x))
                    .unwrap_or(Value::Missing),
                _ => Value::Missing,
            })
            .collect::<Vec<_>>();
        out.push((values, 1));
    });
    let stream = StreamId::of(stream);
    universe
        .map(|p| ((), p))
        .join_map(row, move |_, p, values| ((stream, *p), values.clone()))
}
