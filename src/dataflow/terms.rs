//! Terms: one aggregate value per profile, maintained incrementally.
//!
//! The reader turns each event into [`Pay`]loads for the streams it matches
//! ([`crate::ingest::select::extract`]); [`window`](crate::dataflow::window) bounds them in time; [`terms`]
//! re-keys them from anchor id to profile through the identity labels and
//! folds each stream's terms in one `reduce` keyed by `(stream, profile)`,
//! or counts them when every term of the stream is a `count` (those facts
//! travel without their payload; one join re-keys both kinds, keeping each
//! id's profile once). The join, the reduce and the count are
//! [`crate::dataflow::total`]'s operators for totally ordered time.
//! A merge of two profiles is a change of label, so the join re-keys every
//! fact of the merged side and every aggregate downstream corrects itself.

use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};
use std::rc::Rc;

use crate::core::fact::AtomRow;
use crate::core::fact::Pay;
use crate::core::id::Key;
use crate::core::id::StreamId;
use crate::core::value::{Dec, Float, Value};
use crate::dataflow::total::{CountTotalOps, TotalOps};
use crate::dataflow::window::{profile_of, Facts};
use crate::plan::{Agg, Plan};

/// Folds a term's facts (with multiplicities) into its value.
pub fn fold<'a>(agg: Agg, facts: impl Iterator<Item = (&'a Pay, isize)> + Clone) -> Value {
    let vals = facts.filter_map(|(p, n)| match p {
        Pay::Val(v) => Some((v, n)),
        _ => None,
    });
    match agg {
        Agg::Count => unreachable!("counts are folded by their multiplicity"),
        Agg::Sum | Agg::Avg | Agg::Var => numeric(agg, vals),
        Agg::Min | Agg::Max => {
            let nums = vals.map(|(v, _)| v).filter(|v| v.is_number());
            let best = if agg == Agg::Min {
                nums.min_by(|a, b| a.compare(b).unwrap_or(std::cmp::Ordering::Equal))
            } else {
                nums.max_by(|a, b| a.compare(b).unwrap_or(std::cmp::Ordering::Equal))
            };
            best.cloned().unwrap_or(Value::Missing)
        }
        Agg::Distinct => {
            let mut seen: Vec<&Value> = Vec::new();
            for (v, _) in vals {
                if !seen.iter().any(|s| s.compare(v) == Some(std::cmp::Ordering::Equal)) {
                    seen.push(v);
                }
            }
            Value::Num(Dec::from_int(seen.len() as i64))
        }
        Agg::Last | Agg::Steps(_) | Agg::Derived(_) => Value::Missing,
    }
}

/// `steps(s1, …, sn, D)` over the facts in the window (SPEC §4
/// "Sequences"): the largest `k` such that distinct events `e1 … ek` match
/// `s1 … sk` with non-decreasing times. Taking each step as early as
/// possible is optimal, so events are visited in time order; events of the
/// same time may be used in any order among themselves, so each such group
/// takes as many further steps as a matching of steps to its events allows
/// (augmenting paths, [`further_steps`]). Cost: the events in the window
/// times the steps, once per change of the profile's facts.
fn steps<'a>(n: usize, facts: impl Iterator<Item = (&'a Pay, isize)>) -> Value {
    let mut events: Vec<(u64, u64)> = Vec::new();
    for (pay, k) in facts {
        if let Pay::Steps { time, mask } = *pay {
            events.extend(std::iter::repeat_n((time, mask), k.max(0) as usize));
        }
    }
    events.sort_unstable();
    let mut done = 0;
    for group in events.chunk_by(|a, b| a.0 == b.0) {
        if done == n {
            break;
        }
        done += further_steps(group.iter().map(|e| e.1), done, n);
    }
    Value::Num(Dec::from_int(done as i64))
}

#[cfg(test)]
mod step_tests {
    use super::further_steps;

    #[test]
    fn events_of_one_time_are_matched_to_steps() {
        // An event that can take step 0 or 1 and one that can take only 0:
        // taken in order, the first would block the second.
        assert_eq!(further_steps([0b11, 0b01].into_iter(), 0, 2), 2);
        assert_eq!(further_steps([0b01, 0b11].into_iter(), 0, 2), 2);
        // One event is one step, even if it matches several.
        assert_eq!(further_steps([0b111].into_iter(), 0, 3), 1);
        // Steps are taken in order from `from`: step 1 missing stops at 1.
        assert_eq!(further_steps([0b101, 0b001].into_iter(), 0, 3), 1);
        assert_eq!(further_steps([0b110, 0b100].into_iter(), 1, 3), 2);
        assert_eq!(further_steps(std::iter::empty(), 0, 3), 0);
    }
}

/// How many of the steps `from, from + 1, …` (below `n`) events of one time,
/// given by the masks of the steps each matches, can take, each event at
/// most one step: steps are added in order while a matching of them to
/// distinct events exists (Kuhn's augmenting paths).
pub fn further_steps(masks: impl Iterator<Item = u64>, from: usize, n: usize) -> usize {
    let masks: Vec<u64> = masks.collect();
    // The step each event takes, if any.
    let mut taken: Vec<Option<usize>> = vec![None; masks.len()];
    fn augment(step: usize, masks: &[u64], taken: &mut [Option<usize>], seen: &mut [bool]) -> bool {
        for e in 0..masks.len() {
            if masks[e] >> step & 1 == 1 && !seen[e] {
                seen[e] = true;
                if taken[e].is_none_or(|other| augment(other, masks, taken, seen)) {
                    taken[e] = Some(step);
                    return true;
                }
            }
        }
        false
    }
    let mut step = from;
    while step < n {
        let mut seen = vec![false; masks.len()];
        if !augment(step, &masks, &mut taken, &mut seen) {
            break;
        }
        step += 1;
    }
    step - from
}

/// `sum`, `avg` and `var` as decisions.md fixes them: exact over exact
/// numbers (a sum that overflows is missing; `avg` and `var` come from the
/// exact sums, rounded once), otherwise in floating point over the values in
/// ascending order, so the result never depends on arrival order; a result
/// that is not finite is missing.
fn numeric<'a>(agg: Agg, vals: impl Iterator<Item = (&'a Value, isize)> + Clone) -> Value {
    let finite = |f: f64| if f.is_finite() { Value::Float(Float(f)) } else { Value::Missing };
    let mut n: i128 = 0;
    let mut exact = true;
    // The sum of squares only for `var`: an i128 product per value.
    let squares = agg == Agg::Var;
    let (mut s1, mut s2): (Option<i128>, Option<i128>) = (Some(0), Some(0));
    for (v, k) in vals.clone() {
        match v {
            Value::Num(d) => {
                let k = k as i128;
                s1 = s1.and_then(|s| s.checked_add(d.0.checked_mul(k)?));
                if squares {
                    s2 = s2.and_then(|s| s.checked_add(d.0.checked_mul(d.0)?.checked_mul(k)?));
                }
            }
            Value::Float(_) => exact = false,
            _ => continue,
        }
        n += k as i128;
    }
    if n == 0 {
        return if agg == Agg::Sum { Value::Num(Dec::ZERO) } else { Value::Missing };
    }
    // The values in ascending order, only when the exact sums cannot answer.
    let floats = || {
        let mut floats: Vec<f64> = vals
            .clone()
            .filter_map(|(v, k)| Some((v.as_f64()?, k)))
            .flat_map(|(x, k)| std::iter::repeat_n(x, k.max(0) as usize))
            .collect();
        floats.sort_by(|a, b| a.total_cmp(b));
        floats
    };
    let float_sum = |floats: &[f64]| floats.iter().sum::<f64>();
    match agg {
        Agg::Sum if exact => s1.map(|s| Value::Num(Dec(s))).unwrap_or(Value::Missing),
        Agg::Sum => finite(float_sum(&floats())),
        Agg::Avg => match s1.filter(|_| exact) {
            Some(s) => finite(s as f64 / (crate::core::value::SCALE as f64 * n as f64)),
            None => finite(float_sum(&floats()) / n as f64),
        },
        _ => {
            let exact_var = (|| n.checked_mul(s2?)?.checked_sub(s1?.checked_mul(s1?)?))().filter(|_| exact);
            match exact_var {
                Some(num) => finite(num as f64 / ((n as f64) * (n as f64) * 1e12)),
                None => {
                    let floats = floats();
                    let mean = float_sum(&floats) / n as f64;
                    finite(floats.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64)
                }
            }
        }
    }
}

/// The latest stamped value (greatest time, then greatest JSON text).
pub fn latest<'a>(facts: impl Iterator<Item = (&'a Pay, isize)>) -> Value {
    facts
        .filter_map(|(p, _)| match p {
            Pay::Stamped(s) => Some((&s.time, s.text.as_bytes(), &s.value)),
            _ => None,
        })
        .max_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
        .map(|(_, _, v)| v.clone())
        .unwrap_or(Value::Missing)
}

/// The value of a term over its facts (with multiplicities), for a profile
/// with at least one fact (without any it is `agg.empty()`): the one fold
/// of the dataflow's `Terms` reduce and of the served model's own terms
/// (`crate::serve::model`), so both have the same semantics by construction.
pub fn value<'a>(agg: Agg, facts: impl Iterator<Item = (&'a Pay, isize)> + Clone) -> Value {
    match agg {
        Agg::Count => Value::Num(Dec::from_int(facts.map(|(_, n)| n as i64).sum())),
        Agg::Last => latest(facts),
        Agg::Steps(n) => steps(n as usize, facts),
        agg => fold(agg, facts),
    }
}

/// A term row: `((stream, profile), values)`, one value per term of the
/// stream in `plan.folds` order.
pub type Row = ((StreamId, Key), Vec<Value>);

/// What the terms stage gives.
pub struct Terms<'s> {
    /// `((atom, profile), holds)` for every atom over one event-stream term
    /// (see [`Plan::flips`]), evaluated where the term changes.
    pub atoms: VecCollection<'s, u64, AtomRow, isize>,
    /// The term rows, when asked for (serving, population terms and atoms
    /// over several terms read them).
    pub rows: Option<VecCollection<'s, u64, Row, isize>>,
}

/// One change the terms stage emits: a term row, or an atom's row.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Change {
    Row(Row),
    Atom(AtomRow),
}

/// Re-keys windowed facts to profiles and folds every stream's terms: a
/// row `((stream, profile), values)` for each profile with at least one
/// fact. The atoms over one term are evaluated right there, on the row's
/// old and new values, and only those that flip go on: a count going from
/// 4 to 5 rarely flips a comparison, and the rows themselves (two per
/// change, each a vector) are emitted only when `rows` asks for them.
///
/// Streams folded only by `count` come as `counted`, without payloads (the
/// reader feeds them apart, see [`Plan::counted_streams`]): a count keeps
/// one number per key, far cheaper than a reduce, and a fact without a
/// payload is cheaper to queue and join.
pub fn terms<'s>(
    (counted, folded): (Facts<'s, ()>, Facts<'s, Pay>),
    labels: VecCollection<'s, u64, (Key, Key), isize>,
    plan: Rc<Plan>,
    (tick, rows): (u64, bool),
) -> Terms<'s> {
    let windows = (Rc::new(plan.streams.iter().map(|s| s.window).collect::<Vec<_>>()), tick);
    let (counts, folded) = profile_of(
        (counted, folded),
        windows,
        labels,
        "ProfileOf",
        (
            |_anchor, (stream, ()), profile| ((*stream, *profile), ()),
            |_anchor, (stream, pay), profile| ((*stream, *profile), pay.clone()),
        ),
    );
    let counts = counts.count_total_with("CountTotal", {
        let plan = plan.clone();
        move |&(stream, profile), old, new, out| {
            let value = |n: isize| (n != 0).then(|| [Value::Num(Dec::from_int(n as i64))]);
            changed(
                &plan,
                (stream, profile),
                value(old).as_ref().map(|v| &v[..]),
                value(new).as_ref().map(|v| &v[..]),
                rows,
                out,
            );
        }
    });
    let folds = plan.clone();
    let folded = folded.fold_total(
        "Terms",
        move |(stream, _profile), facts| -> TermValues {
            folds.folds[stream.index()]
                .iter()
                .map(|&t| value(folds.terms[t].agg, facts.iter().map(|(p, n)| (p, *n))))
                .collect()
        },
        move |&key, old, new, out| {
            changed(&plan, key, old.map(|v| &v[..]), new.map(|v| &v[..]), rows, out);
        },
    );
    let changes = counts.concat(folded);
    Terms {
        atoms: changes.clone().flat_map(|c| match c {
            Change::Atom(a) => Some(a),
            Change::Row(_) => None,
        }),
        rows: rows.then(|| {
            changes.flat_map(|c| match c {
                Change::Row(r) => Some(r),
                Change::Atom(_) => None,
            })
        }),
    }
}

/// A stream's term values for one profile, in `plan.folds` order: inline
/// for a stream with one term, as most are.
type TermValues = smallvec::SmallVec<[Value; 1]>;

/// What a profile's row for a stream going from `old` to `new` (`None`:
/// no row) emits: the atoms it flips, and the rows when asked for.
fn changed(plan: &Plan, key: (StreamId, Key), old: Option<&[Value]>, new: Option<&[Value]>, rows: bool, out: &mut Vec<(Change, isize)>) {
    if rows {
        out.extend(old.map(|v| (Change::Row((key, v.to_vec())), -1)));
        out.extend(new.map(|v| (Change::Row((key, v.to_vec())), 1)));
    }
    plan.flips(key, old, new, |atom, r| out.push((Change::Atom(atom), r)));
}
