//! Terms: one aggregate value per profile, maintained incrementally.
//!
//! The reader turns each event into [`Pay`]loads for the streams it matches
//! ([`extract`]); [`window`](crate::window) bounds them in time; [`terms`]
//! re-keys them from anchor id to profile through the identity labels and
//! folds each term's stream in one `reduce` keyed by `(term, profile)`.
//! A merge of two profiles is a change of label, so the join re-keys every
//! fact of the merged side and every aggregate downstream corrects itself.

use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};
use std::rc::Rc;

use crate::event::Event;
use crate::ingest::Key;
use crate::plan::{Agg, Plan, Read, StreamDef};
use crate::value::{Dec, Float, Value};
use crate::window::Windowed;

/// What a stream keeps of one event.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Pay {
    /// That it happened.
    Unit,
    /// A value read at a path.
    Val(Value),
    /// A value with its event time and JSON text, for "latest wins, ties by
    /// greatest text" (`last`, traits).
    Stamped(u64, String, Value),
}

/// What `stream` keeps of `ev`, if it matches.
pub fn extract(stream: &StreamDef, ev: &Event) -> Option<Pay> {
    if !crate::plan::matches(&stream.sel, ev) {
        return None;
    }
    match &stream.read {
        Read::Unit => Some(Pay::Unit),
        Read::Value(p) => {
            let v = ev.get(&p.0).map(Value::from_json).unwrap_or(Value::Missing);
            (!v.is_missing()).then_some(Pay::Val(v))
        }
        Read::Last(p) => {
            let json = ev.get(&p.0)?;
            let v = Value::from_json(json);
            (!v.is_missing()).then(|| Pay::Stamped(ev.time, json.to_string(), v))
        }
        Read::Trait(name) => {
            let json = ev.traits.get(name)?;
            Some(Pay::Stamped(ev.time, json.to_string(), Value::from_json(json)))
        }
    }
}

/// Folds a term's facts (with multiplicities) into its value.
pub fn fold<'a>(agg: Agg, facts: impl Iterator<Item = (&'a Pay, isize)>) -> Value {
    let vals = facts.filter_map(|(p, n)| match p {
        Pay::Val(v) => Some((v, n)),
        _ => None,
    });
    match agg {
        Agg::Count => unreachable!("counts are folded by their multiplicity"),
        Agg::Sum => {
            let mut exact = Some(Dec::ZERO);
            let mut float = 0.0;
            for (v, n) in vals {
                match v {
                    Value::Num(d) => {
                        exact = exact.and_then(|s| s.checked_add(Dec(d.0.checked_mul(n as i128)?)));
                        float += d.to_f64() * n as f64;
                    }
                    Value::Float(f) => {
                        exact = None;
                        float += f.0 * n as f64;
                    }
                    _ => {}
                }
            }
            exact.map(Value::Num).unwrap_or(Value::Float(Float(float)))
        }
        Agg::Avg | Agg::Var => {
            let (mut k, mut sum, mut sq) = (0.0, 0.0, 0.0);
            for (v, n) in vals {
                if let Some(x) = v.as_f64() {
                    k += n as f64;
                    sum += x * n as f64;
                    sq += x * x * n as f64;
                }
            }
            if k == 0.0 {
                return Value::Missing;
            }
            let mean = sum / k;
            if agg == Agg::Avg {
                Value::Float(Float(mean))
            } else {
                Value::Float(Float((sq / k - mean * mean).max(0.0)))
            }
        }
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
        Agg::Last => Value::Missing,
    }
}

/// The latest stamped value (greatest time, then greatest JSON text).
pub fn latest<'a>(facts: impl Iterator<Item = (&'a Pay, isize)>) -> Value {
    facts
        .filter_map(|(p, _)| match p {
            Pay::Stamped(e, text, v) => Some((e, text.as_bytes(), v)),
            _ => None,
        })
        .max_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
        .map(|(_, _, v)| v.clone())
        .unwrap_or(Value::Missing)
}

/// Re-keys windowed facts to profiles and folds every stream's terms:
/// `((stream, profile), values)` with one value per term of the stream (in
/// `plan.folds` order), for each profile with at least one fact.
pub fn terms<'s>(
    windowed: VecCollection<'s, u64, Windowed, isize>,
    labels: VecCollection<'s, u64, (Key, Key), isize>,
    plan: Rc<Plan>,
) -> VecCollection<'s, u64, ((u32, Key), Vec<Value>), isize> {
    let labels = labels.arrange_by_key_named("ProfileOfId");
    windowed
        .join_core(labels, |_anchor, (stream, pay), profile| Some(((*stream, *profile), pay.clone())))
        .reduce_named("Terms", move |(stream, _profile), facts, out| {
            let values = plan.folds[*stream as usize]
                .iter()
                .map(|&t| match plan.terms[t].agg {
                    Agg::Count => Value::Num(Dec::from_int(facts.iter().map(|(_, n)| *n as i64).sum())),
                    Agg::Last => latest(facts.iter().map(|(p, n)| (*p, *n))),
                    agg => fold(agg, facts.iter().map(|(p, n)| (*p, *n))),
                })
                .collect();
            out.push((values, 1));
        })
}
