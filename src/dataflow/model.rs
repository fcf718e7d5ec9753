//! Predictive models (SPEC §4 "Predictive models"): `predict.NAME`, a
//! logistic regression of a label on features, refitted at every multiple
//! `r` of `refresh` on the examples whose label has matured.
//!
//! One operator per model, on worker 0 (the fit is over the whole
//! population, like a clustering's), keeps each profile's current features
//! (those with every feature a number) and label (every profile of the
//! universe has one, true or false, sampled or not). Its work happens at
//! three kinds of tick:
//!
//! - at `s = r - horizon` it sets aside the features of the sampled
//!   profiles: the *snapshot* for refresh `r`, taken once when the clock
//!   passes `s` (never recomputed from history);
//! - at `r` the examples are the snapshot's profiles that still exist (same
//!   id), with their label now; they are sorted by value and fitted
//!   ([`Logit::fit`]), and every profile's prediction follows the new model;
//! - at any other tick, only the profiles whose features changed get a new
//!   prediction, `sigmoid(b + w·z)`.
//!
//! The operator asks its shell ([`Wakes`]) to run at the next snapshot and
//! refresh ticks, so both happen with no event then; like every wake, those
//! past the last tick are dropped ("when the clock reaches it").
//!
//! Memory: the current features and labels (profiles × features), the
//! predictions, and the snapshots waiting for their refresh: profiles ×
//! features × `ceil(horizon / refresh)` pending refreshes, cut by `sample`.
//! The snapshots and the last fit are state that the inputs at one tick do
//! not hold, so a checkpoint keeps them ([`ModelState`], through
//! [`Memory`]).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;

use differential_dataflow::VecCollection;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::core::id::{Id, Key, StreamId, ValueId};
use crate::core::value::{Float, Value};
use crate::dataflow::logit::{sort_examples, Example, Logit};
use crate::dataflow::memory::Memory;
use crate::dataflow::score::{Rows, Values};
use crate::dataflow::total::{binary_by_tick, join, Updates, Wakes};
use crate::plan::{ModelPlan, Plan};

/// A model as fitted at refresh tick `time`, with the AUC of its
/// predictions on the examples of the refresh before (`None` when there
/// were none, or they held one class).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fitted {
    pub time: u64,
    pub logit: Logit,
    pub auc: Option<f64>,
}

impl Fitted {
    /// Every number's bits, for a total order and a hash.
    fn bits(&self) -> Vec<u64> {
        let l = &self.logit;
        let mut b = vec![
            self.time,
            l.intercept.to_bits(),
            l.examples,
            l.positives,
            l.steps as u64,
            l.gradient.to_bits(),
        ];
        b.extend(l.weights.iter().map(|w| w.map_or(u64::MAX, f64::to_bits)));
        b.extend(l.mean.iter().chain(&l.scale).map(|x| x.to_bits()));
        b.push(self.auc.map_or(u64::MAX, f64::to_bits));
        b
    }
}

impl Eq for Fitted {}
impl PartialOrd for Fitted {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Fitted {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.bits().cmp(&o.bits())
    }
}
impl Hash for Fitted {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.bits().hash(h)
    }
}

/// Features set aside at `r - horizon`: `(profile, features)`, by profile.
pub type Snapshot = Arc<Vec<(Key, Vec<f64>)>>;

/// What a model keeps from tick to tick beyond its inputs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelState {
    /// The latest fit.
    pub fitted: Option<Fitted>,
    /// Snapshots waiting for their refresh tick.
    pub pending: BTreeMap<u64, Snapshot>,
    /// The examples of the last refresh that had any, and its tick: the
    /// next refresh's fit is scored on them when they are of the refresh
    /// just before.
    pub examples: Option<(u64, Arc<Vec<Example>>)>,
    /// The examples the fit in force was made on (`GET /models/{name}/examples`).
    pub fitted_on: Option<Arc<Vec<Example>>>,
}

/// The models' states, kept for checkpoints.
pub type Models = Memory<ModelState>;

/// What the operator writes: predictions, and the fit in force.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
enum Out {
    Predict(Key, Float),
    Fit(Fitted),
}

/// The rows of every model's stream (`predict.NAME` of every profile that
/// has all the features, once there is a model), and `(model, fit)` for
/// the fit in force of each.
#[allow(clippy::type_complexity)]
pub fn models<'s>(
    values: Values<'s>,
    names: VecCollection<'s, u64, (Key, Id), isize>,
    plan: Rc<Plan>,
    memory: Option<Arc<Models>>,
) -> (Rows<'s>, VecCollection<'s, u64, (u32, Fitted), isize>) {
    let scope = values.scope();
    let (mut rows, mut fits) = (Vec::new(), Vec::new());
    for (m, def) in plan.models.iter().enumerate() {
        let Some(def) = def.clone() else { continue };
        let (fv, lv) = (ValueId::of(def.features), ValueId::of(def.label));
        let features = values.clone().flat_map(move |((v, profile), vals)| {
            // Only this model's features are converted; one that is not a
            // finite number is missing.
            let xs: Option<Vec<Float>> = (v == fv)
                .then(|| {
                    vals.iter()
                        .map(|x| x.as_f64().filter(|f| f.is_finite()).map(|f| Float(f + 0.0)))
                        .collect()
                })
                .flatten();
            xs.map(|xs| (profile, xs))
        });
        let labels = values
            .clone()
            .flat_map(move |((v, profile), vals)| (v == lv).then(|| (profile, vals[0] == Value::Bool(true))));
        let labels = if def.sample < 1.0 {
            let (name, share) = (def.name.clone(), def.sample);
            join(labels, names.clone(), &format!("Sampled {}", def.name), move |p, y, id| {
                (*p, (crate::spec::sampled(&name, share, &id.to_string()), *y))
            })
        } else {
            labels.map(|(p, y)| (p, (true, y)))
        };
        let out = learn(features, labels, def, m, memory.clone());
        let stream = StreamId::of(plan.model_stream(m));
        rows.push(out.clone().flat_map(move |o| match o {
            Out::Predict(p, x) => Some(((stream, p), vec![Value::Float(x)])),
            Out::Fit(_) => None,
        }));
        fits.push(out.flat_map(move |o| match o {
            Out::Fit(f) => Some((m as u32, f)),
            Out::Predict(..) => None,
        }));
    }
    (
        differential_dataflow::collection::concatenate(scope, rows),
        differential_dataflow::collection::concatenate(scope, fits),
    )
}

/// A tick's updates of one input, applied to each key's current row
/// (`now`): the changed keys and their rows after the tick (a profile has
/// at most one row once a tick's updates are in). Only the tick's keys are
/// held while it is applied.
fn settle<V: PartialEq + Clone>(updates: &mut Vec<((Key, V), isize)>, now: impl Fn(&Key) -> Option<V>) -> Vec<(Key, Option<V>)> {
    let mut rows: FxHashMap<Key, SmallVec<[(V, isize); 2]>> = FxHashMap::default();
    for ((k, v), r) in updates.drain(..) {
        let held = rows.entry(k).or_insert_with(|| now(&k).map(|c| (c, 1)).into_iter().collect());
        match held.iter_mut().find(|(w, _)| *w == v) {
            Some((_, c)) => *c += r,
            None => held.push((v, r)),
        }
    }
    let mut settled: Vec<(Key, Option<V>)> = rows
        .into_iter()
        .map(|(k, held)| (k, held.into_iter().find(|(_, c)| *c > 0).map(|(v, _)| v)))
        .collect();
    settled.sort_unstable_by_key(|(k, _)| *k);
    settled
}

/// One model over `(profile, features)` and `(profile, (sampled, label))`,
/// on worker 0.
fn learn<'s>(
    features: VecCollection<'s, u64, (Key, Vec<Float>), isize>,
    labels: VecCollection<'s, u64, (Key, (bool, bool)), isize>,
    def: ModelPlan,
    index: usize,
    memory: Option<Arc<Models>>,
) -> VecCollection<'s, u64, Out, isize> {
    // Only worker 0 runs the model: the others keep nothing.
    let mut state = memory
        .as_ref()
        .filter(|_| features.scope().index() == 0)
        .and_then(|m| m.restored(index))
        .unwrap_or_default();
    let mut x: BTreeMap<Key, Vec<Float>> = BTreeMap::new();
    let mut y: FxHashMap<Key, (bool, bool)> = FxHashMap::default();
    let mut predicted: FxHashMap<Key, Float> = FxHashMap::default();
    let mut asked: BTreeSet<u64> = BTreeSet::new();
    // The restored fit has not been written by this dataflow yet.
    let mut written: Option<Fitted> = None;
    let name = format!("Model {}", def.name);
    binary_by_tick(
        features,
        labels,
        &name,
        (|_: &(Key, Vec<Float>)| 0, |_: &(Key, (bool, bool))| 0),
        move |t, xs, ys, out: &mut Updates<Out>, wakes: &mut Wakes| {
            asked.remove(&t);
            let mut changed = Vec::new();
            for (p, v) in settle(xs, |p| x.get(p).cloned()) {
                match v {
                    Some(v) => x.insert(p, v),
                    None => x.remove(&p),
                };
                changed.push(p);
            }
            for (p, v) in settle(ys, |p| y.get(p).copied()) {
                match v {
                    Some(v) => y.insert(p, v),
                    None => y.remove(&p),
                };
            }
            let mut moved = false;
            // The features at `r - horizon`, set aside for refresh `r`.
            if (t + def.horizon).is_multiple_of(def.refresh) {
                let snapshot: Vec<(Key, Vec<f64>)> = x
                    .iter()
                    .filter(|(p, _)| y.get(p).is_some_and(|(sampled, _)| *sampled))
                    .map(|(p, v)| (*p, v.iter().map(|f| f.0).collect()))
                    .collect();
                if !snapshot.is_empty() {
                    state.pending.insert(t + def.horizon, Arc::new(snapshot));
                    moved = true;
                }
            }
            if let Some(snapshot) = state.pending.remove(&t) {
                moved = true;
                let mut examples: Vec<Example> = snapshot
                    .iter()
                    .filter_map(|(p, v)| y.get(p).map(|(_, label)| Example { x: v.clone(), y: *label }))
                    .collect();
                sort_examples(&mut examples);
                let examples = Arc::new(examples);
                if let Some(logit) = (!examples.is_empty()).then(|| Logit::fit(&examples, def.l2)).flatten() {
                    // Scored on the examples of the refresh just before, if it had any.
                    let before = state.examples.as_ref().filter(|(r, _)| *r + def.refresh == t);
                    let auc = before.and_then(|(_, e)| logit.auc(e));
                    state.fitted = Some(Fitted { time: t, logit, auc });
                    state.fitted_on = Some(examples.clone());
                }
                if !examples.is_empty() {
                    state.examples = Some((t, examples));
                }
            }
            // A new fit (or the restored one, at the first tick): written,
            // and every profile's prediction follows it.
            let refit = written != state.fitted;
            if refit {
                out.extend(written.take().map(|f| (Out::Fit(f), t, -1)));
                out.extend(state.fitted.clone().map(|f| (Out::Fit(f), t, 1)));
                written = state.fitted.clone();
            }
            let check: Vec<Key> = if refit {
                x.keys()
                    .chain(predicted.keys())
                    .copied()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect()
            } else {
                changed
            };
            let mut v = Vec::new();
            for p in check {
                let new = match (&state.fitted, x.get(&p)) {
                    (Some(f), Some(xs)) => {
                        v.clear();
                        v.extend(xs.iter().map(|f| f.0));
                        Some(Float(f.logit.predict(&v)))
                    }
                    _ => None,
                };
                let old = predicted.get(&p).copied();
                if new != old {
                    out.extend(old.map(|o| (Out::Predict(p, o), t, -1)));
                    out.extend(new.map(|n| (Out::Predict(p, n), t, 1)));
                    match new {
                        Some(n) => predicted.insert(p, n),
                        None => predicted.remove(&p),
                    };
                }
            }
            if moved {
                if let Some(memory) = &memory {
                    memory.record(index, t, state.clone());
                }
            }
            // The next snapshot (while there are features to set aside)
            // and the next refresh with a snapshot waiting.
            let next_snapshot = ((t + def.horizon) / def.refresh + 1) * def.refresh - def.horizon;
            let wanted = [(!x.is_empty()).then_some(next_snapshot), state.pending.keys().next().copied()];
            for w in wanted.into_iter().flatten() {
                if asked.insert(w) {
                    wakes.at(w);
                }
            }
        },
    )
}
