//! RFM (SPEC §4): recency, frequency and monetary scores 1–5 and a segment.
//!
//! The metrics are a profile value of three event terms over the purchase
//! stream and its window (`max` of the event time, `count`, `sum` of the
//! revenue): see `Plan::rfm_plan`. The scored population `P` is every
//! profile with a purchase in the window (`F >= 1`). Scoring is a rank rule
//! over the whole population, `1 + floor(5 * |{d : x_d < x_c}| / |P|)`, so
//! it is one `reduce` over all of `P` (key `()`): whenever a purchase comes
//! in or leaves the window, every profile's scores are re-derived and
//! differential passes on only the profiles whose scores or segment moved.
//! Ties get the same score (they count no one of each other as smaller).

use std::rc::Rc;

use crate::core::id::Key;
use crate::core::id::StreamId;
use crate::core::id::ValueId;
use crate::core::value::{Dec, Float, Value};
use crate::dataflow::score::{Rows, Values};
use crate::plan::{Agg, Plan};

/// The rank score 1–5 of every value: `1 + floor(5 * smaller / n)` with
/// `smaller` the number of values strictly less and `n` all of them. A value
/// that is not a number (a revenue sum that overflowed) is less than nothing
/// and scores by the values below it: none, so 1. Exact numbers compare
/// exactly; with a float among them all compare as floats.
pub fn rank_scores(xs: &[Value]) -> Vec<u8> {
    let n = xs.len();
    let any_float = xs.iter().any(|x| matches!(x, Value::Float(_)));
    let key = |x: &Value| -> Option<Value> {
        match x {
            Value::Num(d) if any_float => Some(Value::Float(Float(d.to_f64() + 0.0))),
            Value::Float(f) => Some(Value::Float(Float(f.0 + 0.0))),
            Value::Num(_) => Some(x.clone()),
            _ => None,
        }
    };
    let mut sorted: Vec<Value> = xs.iter().filter_map(key).collect();
    sorted.sort();
    xs.iter()
        .map(|x| match key(x) {
            None => 1,
            Some(k) => (1 + 5 * sorted.partition_point(|y| *y < k) / n) as u8,
        })
        .collect()
}

/// `(r, f, m)` scores of every `(profile, [R, F, M])`, in input order.
pub fn score_all(metrics: &[(Key, [Value; 3])]) -> Vec<[u8; 3]> {
    let column = |j: usize| rank_scores(&metrics.iter().map(|(_, m)| m[j].clone()).collect::<Vec<_>>());
    let (r, f, m) = (column(0), column(1), column(2));
    (0..metrics.len()).map(|i| [r[i], f[i], m[i]]).collect()
}

/// The rows of the RFM stream: `rfm.r`, `rfm.f`, `rfm.m`, `rfm.segment` of
/// every profile with a purchase in the window.
pub fn rfm<'s>(values: Values<'s>, plan: Rc<Plan>) -> Rows<'s> {
    let def = plan.rfm.clone().expect("an RFM plan");
    let v = ValueId::of(def.value);
    let scored = values.flat_map(move |((value, profile), m)| {
        let buys = value == v && matches!(&m[1], Value::Num(d) if d.0 > 0);
        buys.then(|| ((), (profile, [m[0].clone(), m[1].clone(), m[2].clone()])))
    });
    let stream = plan.rfm_stream();
    scored
        .reduce_named("Rfm", move |_, input, out| {
            let metrics: Vec<(Key, [Value; 3])> = input.iter().map(|((p, m), _)| (*p, m.clone())).collect();
            for ((profile, _), s) in metrics.iter().zip(score_all(&metrics)) {
                let segment = def.grid[s[0] as usize - 1][s[1] as usize - 1].clone();
                let row = plan.folds[stream]
                    .iter()
                    .map(|&t| match plan.terms[t].agg {
                        Agg::Derived(3) => Value::Str(segment.as_str().into()),
                        Agg::Derived(i) if i < 3 => Value::Num(Dec::from_int(s[i as usize] as i64)),
                        _ => Value::Missing,
                    })
                    .collect::<Vec<_>>();
                out.push(((*profile, row), 1));
            }
        })
        .map(move |((), (profile, row))| ((StreamId::of(stream), profile), row))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(x: i64) -> Value {
        Value::Num(Dec::from_int(x))
    }

    #[test]
    fn ranks_with_ties() {
        // 1 + floor(5 * smaller / 6): smaller = 0, 0, 2, 3, 3, 5
        assert_eq!(rank_scores(&[n(1), n(1), n(2), n(3), n(3), n(9)]), [1, 1, 2, 3, 3, 5]);
        assert_eq!(rank_scores(&[n(7)]), [1]);
        assert_eq!(rank_scores(&[n(7), n(7), n(7)]), [1, 1, 1]);
        // a float among them: all compare as floats
        assert_eq!(rank_scores(&[n(1), Value::Float(Float(0.5)), Value::Missing]), [2, 1, 1]);
    }
}
