//! Clustering (SPEC §4): k-means over standardized features, refreshed
//! every `refresh` of event time, with a profile's cluster following its
//! features at once.
//!
//! The model ([`KMeans`]) is a pure function of the population — the
//! multiset of feature vectors of the profiles that have all features — and
//! of the previous model (for the numbering): features are standardized by
//! z-score over the population, k-means++ starts are drawn from a ChaCha RNG
//! seeded with `seed`, Lloyd iterations run to a fixed point, the best of a
//! few restarts wins, and a new centroid takes the number of the nearest old
//! one. Points are sorted by their values first, so neither the order of
//! arrival nor the profile ids nor the number of workers changes a float.
//!
//! The dataflow side ([`clusters`]) is one operator per clustering on a
//! single worker (the population is global): it applies each tick's feature
//! changes once the tick is complete, trains at the first tick with a
//! population and then at every tick that is a multiple of `refresh` if the
//! population changed since the last training, and otherwise assigns only
//! the profiles whose features changed to the nearest centroid. Like the
//! window operator, it holds a capability for the next refresh tick so that
//! a refresh happens even when no event arrives then.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use differential_dataflow::{AsCollection, VecCollection};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;

use crate::core::id::Key;
use crate::core::id::StreamId;
use crate::core::id::ValueId;
use crate::core::value::{Dec, Float, Value};
use crate::dataflow::score::{Rows, Values};
use crate::plan::{ClusterPlan, Plan};

/// k-means++ restarts per training; the one with the least inertia wins.
pub const RESTARTS: usize = 3;
/// Lloyd iterations at most per restart.
pub const MAX_ITERATIONS: usize = 100;

/// A trained clustering.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KMeans {
    /// Per feature: the population mean and standard deviation (1 when the
    /// feature is constant).
    pub mean: Vec<f64>,
    pub scale: Vec<f64>,
    /// Centroids in standardized space.
    pub centroids: Vec<Vec<f64>>,
    /// The cluster number of each centroid.
    pub numbers: Vec<u32>,
}

fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// The index of the nearest centroid (the first on ties) and its distance².
pub fn nearest(x: &[f64], centroids: &[Vec<f64>]) -> (usize, f64) {
    let mut best = (0, f64::INFINITY);
    for (i, c) in centroids.iter().enumerate() {
        let d = dist2(x, c);
        if d < best.1 {
            best = (i, d);
        }
    }
    best
}

/// Sum of squared distances of points to their nearest centroid.
pub fn inertia(points: &[Vec<f64>], centroids: &[Vec<f64>]) -> f64 {
    points.iter().map(|x| nearest(x, centroids).1).sum()
}

/// k-means++ seeding then Lloyd iterations on `points` (in the given order);
/// returns the centroids (at most `k`: fewer when there are fewer distinct
/// points) and their inertia.
pub fn kmeans(points: &[Vec<f64>], k: usize, rng: &mut ChaCha8Rng) -> (Vec<Vec<f64>>, f64) {
    let n = points.len();
    let mut centroids = vec![points[rng.gen_range(0..n)].clone()];
    let mut d2: Vec<f64> = points.iter().map(|x| dist2(x, &centroids[0])).collect();
    while centroids.len() < k {
        let total: f64 = d2.iter().sum();
        if total.is_nan() || total <= 0.0 {
            break;
        }
        let r = rng.gen::<f64>() * total;
        let mut acc = 0.0;
        let mut pick = None;
        for (i, d) in d2.iter().enumerate() {
            if *d > 0.0 {
                pick = Some(i);
                acc += d;
                if acc > r {
                    break;
                }
            }
        }
        let Some(pick) = pick else { break };
        let c = points[pick].clone();
        for (x, d) in points.iter().zip(d2.iter_mut()) {
            *d = d.min(dist2(x, &c));
        }
        centroids.push(c);
    }
    let dims = points[0].len();
    let mut assignment = vec![usize::MAX; n];
    for _ in 0..MAX_ITERATIONS {
        let mut moved = false;
        for (x, a) in points.iter().zip(assignment.iter_mut()) {
            let (i, _) = nearest(x, &centroids);
            moved |= *a != i;
            *a = i;
        }
        if !moved {
            break;
        }
        let mut sums = vec![vec![0.0; dims]; centroids.len()];
        let mut counts = vec![0usize; centroids.len()];
        for (x, &a) in points.iter().zip(&assignment) {
            counts[a] += 1;
            for (s, v) in sums[a].iter_mut().zip(x) {
                *s += v;
            }
        }
        for ((c, s), &m) in centroids.iter_mut().zip(sums).zip(&counts) {
            if m > 0 {
                *c = s.into_iter().map(|v| v / m as f64).collect();
            }
        }
    }
    let inertia = inertia(points, &centroids);
    (centroids, inertia)
}

impl KMeans {
    /// Trains on a population (any order; at least one point, all of the
    /// same length), numbering clusters after `previous`.
    pub fn fit(points: &[Vec<f64>], k: usize, seed: u64, previous: Option<&KMeans>) -> KMeans {
        let mut points: Vec<Vec<f64>> = points.iter().map(|x| x.iter().map(|v| v + 0.0).collect()).collect();
        points.sort_by(|a, b| {
            a.iter()
                .zip(b)
                .map(|(x, y)| x.total_cmp(y))
                .find(|o| o.is_ne())
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let n = points.len() as f64;
        let dims = points[0].len();
        // Σ x/n rather than Σx / n: no overflow on huge values.
        let mean: Vec<f64> = (0..dims).map(|j| points.iter().map(|x| x[j] / n).sum::<f64>()).collect();
        let scale: Vec<f64> = (0..dims)
            .map(|j| {
                let var = points.iter().map(|x| (x[j] - mean[j]) * (x[j] - mean[j])).sum::<f64>() / n;
                let sd = var.sqrt();
                if sd > 0.0 && sd.is_finite() {
                    sd
                } else {
                    1.0
                }
            })
            .collect();
        let z: Vec<Vec<f64>> = points.iter().map(|x| standardize(x, &mean, &scale)).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut best: Option<(Vec<Vec<f64>>, f64)> = None;
        for _ in 0..RESTARTS {
            let (c, i) = kmeans(&z, k, &mut rng);
            if best.as_ref().is_none_or(|b| i < b.1) {
                best = Some((c, i));
            }
        }
        let centroids = best.expect("at least one restart").0;
        let numbers = match previous {
            None => (0..centroids.len() as u32).collect(),
            Some(old) => {
                // The old centroids in this model's standardized space.
                let olds: Vec<Vec<f64>> = old
                    .centroids
                    .iter()
                    .map(|c| {
                        let raw: Vec<f64> = c.iter().zip(&old.scale).zip(&old.mean).map(|((v, s), m)| v * s + m).collect();
                        standardize(&raw, &mean, &scale)
                    })
                    .collect();
                let mut pairs: Vec<(f64, usize, usize)> = Vec::new();
                for (i, c) in centroids.iter().enumerate() {
                    for (j, o) in olds.iter().enumerate() {
                        pairs.push((dist2(c, o), i, j));
                    }
                }
                pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
                let mut numbers: Vec<Option<u32>> = vec![None; centroids.len()];
                let mut taken: BTreeSet<u32> = BTreeSet::new();
                for (_, i, j) in pairs {
                    if numbers[i].is_none() && !taken.contains(&old.numbers[j]) {
                        numbers[i] = Some(old.numbers[j]);
                        taken.insert(old.numbers[j]);
                    }
                }
                let mut free = (0u32..).filter(|n| !taken.contains(n));
                numbers
                    .into_iter()
                    .map(|n| n.unwrap_or_else(|| free.next().expect("numbers are plenty")))
                    .collect()
            }
        };
        KMeans {
            mean,
            scale,
            centroids,
            numbers,
        }
    }

    /// The cluster number of a feature vector: its nearest centroid (the
    /// lowest number on ties).
    pub fn assign(&self, x: &[f64]) -> u32 {
        let z = standardize(x, &self.mean, &self.scale);
        let mut best = (f64::INFINITY, u32::MAX);
        for (c, &n) in self.centroids.iter().zip(&self.numbers) {
            // Features near f64::MAX can overflow to inf - inf: NaN is far.
            let d = dist2(&z, c);
            let d = if d.is_nan() { f64::INFINITY } else { d };
            if d < best.0 || (d == best.0 && n < best.1) {
                best = (d, n);
            }
        }
        best.1
    }

    /// The inertia of `points` (raw features) against this model, in its
    /// standardized space.
    pub fn inertia(&self, points: &[Vec<f64>]) -> f64 {
        let z: Vec<Vec<f64>> = points.iter().map(|x| standardize(x, &self.mean, &self.scale)).collect();
        inertia(&z, &self.centroids)
    }
}

/// z-scores of `x`.
pub fn standardize(x: &[f64], mean: &[f64], scale: &[f64]) -> Vec<f64> {
    x.iter().zip(mean).zip(scale).map(|((v, m), s)| (v - m) / s).collect()
}

/// The models trained, kept for checkpoints: a model's numbering depends on
/// the models before it, so a restart takes up the model as of its
/// checkpoint instead of training afresh.
pub type Memory = crate::dataflow::memory::Memory<KMeans>;

/// The rows of every clustering's stream: `cluster.NAME` of every profile
/// that has all the features.
pub fn clusters<'s>(values: Values<'s>, plan: Rc<Plan>, memory: Option<std::sync::Arc<Memory>>) -> Rows<'s> {
    let scope = values.scope();
    let mut out = Vec::new();
    for (c, def) in plan.clusters.iter().enumerate() {
        let Some(def) = def.clone() else { continue };
        let v = ValueId::of(def.value);
        let features = values.clone().flat_map(move |((value, profile), vals)| {
            // Only this clustering's value is converted.
            let xs: Option<Vec<Float>> = (value == v)
                .then(|| vals.iter().map(|x| x.as_f64().map(|f| Float(f + 0.0))).collect())
                .flatten();
            xs.map(|xs| (profile, xs))
        });
        let stream = StreamId::of(plan.cluster_stream(c));
        out.push(cluster(features, def, c, memory.clone()).map(move |(p, n)| ((stream, p), vec![Value::Num(Dec::from_int(n as i64))])));
    }
    differential_dataflow::collection::concatenate(scope, out)
}

type Update = ((Key, Vec<Float>), isize);

/// One clustering over `(profile, features)`, on worker 0.
fn cluster<'s>(
    features: VecCollection<'s, u64, (Key, Vec<Float>), isize>,
    def: ClusterPlan,
    index: usize,
    memory: Option<std::sync::Arc<Memory>>,
) -> VecCollection<'s, u64, (Key, u32), isize> {
    let pact = Exchange::new(|_: &((Key, Vec<Float>), u64, isize)| 0u64);
    let name = format!("Cluster {}", def.name);
    features
        .inner
        .unary_frontier::<CapacityContainerBuilder<Vec<((Key, u32), u64, isize)>>, _, _, _>(pact, &name, move |_cap, _info| {
            let mut pending: BTreeMap<u64, Vec<Update>> = BTreeMap::new();
            let mut held: Option<Capability<u64>> = None;
            // Each profile's feature rows (one with count 1 once consolidated).
            let mut rows: BTreeMap<Key, Vec<(Vec<Float>, isize)>> = BTreeMap::new();
            let mut points: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
            let mut assigned: BTreeMap<Key, u32> = BTreeMap::new();
            let mut model: Option<KMeans> = memory.as_ref().and_then(|m| m.restored(index));
            // The population changed since the model was trained.
            let mut dirty = false;
            let mut refresh_at: Option<u64> = None;
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    for (d, t, r) in data.drain(..) {
                        if held.as_ref().is_none_or(|h| *h.time() > t) {
                            held = Some(cap.delayed(&t, 0));
                        }
                        pending.entry(t).or_default().push((d, r));
                    }
                });
                loop {
                    let next = match (pending.keys().next(), refresh_at) {
                        (Some(&p), Some(r)) => p.min(r),
                        (Some(&p), None) => p,
                        (None, Some(r)) => r,
                        (None, None) => break,
                    };
                    if frontier.less_equal(&next) {
                        break;
                    }
                    let t = next;
                    let mut changed = BTreeSet::new();
                    for ((p, xs), r) in pending.remove(&t).unwrap_or_default() {
                        let e = rows.entry(p).or_default();
                        match e.iter_mut().find(|(ys, _)| *ys == xs) {
                            Some((_, c)) => *c += r,
                            None => e.push((xs, r)),
                        }
                        changed.insert(p);
                    }
                    for p in &changed {
                        let e = rows.get_mut(p).expect("just touched");
                        e.retain(|(_, c)| *c != 0);
                        match e.iter().find(|(_, c)| *c > 0) {
                            Some((xs, _)) => {
                                points.insert(*p, xs.iter().map(|f| f.0).collect());
                            }
                            None => {
                                points.remove(p);
                            }
                        }
                        if e.is_empty() {
                            rows.remove(p);
                        }
                    }
                    dirty |= !changed.is_empty();
                    let refresh_point = def.refresh > 0 && t % def.refresh == 0;
                    let train = !points.is_empty() && dirty && (model.is_none() || refresh_point);
                    if train {
                        let population: Vec<Vec<f64>> = points.values().cloned().collect();
                        let fitted = KMeans::fit(&population, def.k, def.seed, model.as_ref());
                        if let Some(memory) = &memory {
                            memory.record(index, t, fitted.clone());
                        }
                        model = Some(fitted);
                        dirty = false;
                    } else if refresh_point && points.is_empty() {
                        dirty = false; // nothing to train on: the model stays
                    }
                    refresh_at = (dirty && def.refresh > 0).then(|| (t / def.refresh + 1) * def.refresh);
                    let check: Vec<Key> = if train {
                        points
                            .keys()
                            .chain(assigned.keys())
                            .copied()
                            .collect::<BTreeSet<_>>()
                            .into_iter()
                            .collect()
                    } else {
                        changed.into_iter().collect()
                    };
                    let cap = held.as_ref().expect("a capability for every pending time").delayed(&t);
                    let mut session = output.session(&cap);
                    for p in check {
                        let new = match (&model, points.get(&p)) {
                            (Some(m), Some(x)) => Some(m.assign(x)),
                            _ => None,
                        };
                        let old = assigned.get(&p).copied();
                        if new != old {
                            if let Some(o) = old {
                                session.give(((p, o), t, -1));
                            }
                            match new {
                                Some(n) => assigned.insert(p, n),
                                None => assigned.remove(&p),
                            };
                            if let Some(n) = new {
                                session.give(((p, n), t, 1));
                            }
                        }
                    }
                }
                let next = match (pending.keys().next(), refresh_at) {
                    (Some(&p), Some(r)) => Some(p.min(r)),
                    (p, r) => p.copied().or(r),
                };
                match next {
                    Some(n) => held.as_mut().expect("held").downgrade(&n),
                    None => held = None,
                }
            }
        })
        .as_collection()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_is_a_function_of_the_multiset() {
        let pts: Vec<Vec<f64>> = (0..40).map(|i| vec![(i % 7) as f64, (i * i % 11) as f64]).collect();
        let mut rev = pts.clone();
        rev.reverse();
        assert_eq!(KMeans::fit(&pts, 3, 7, None), KMeans::fit(&rev, 3, 7, None));
    }

    #[test]
    fn numbers_follow_the_nearest_old_centroid() {
        let blob = |cx: f64, cy: f64| (0..10).map(move |i| vec![cx + (i % 3) as f64 * 0.1, cy + (i % 4) as f64 * 0.1]);
        let pts: Vec<Vec<f64>> = blob(0.0, 0.0).chain(blob(10.0, 0.0)).chain(blob(0.0, 10.0)).collect();
        let m1 = KMeans::fit(&pts, 3, 1, None);
        // Same blobs, shifted a little, trained with another seed: the
        // numbers stay with the blobs.
        let moved: Vec<Vec<f64>> = pts.iter().map(|x| vec![x[0] + 0.5, x[1] + 0.5]).collect();
        let m2 = KMeans::fit(&moved, 3, 99, Some(&m1));
        for x in &pts {
            assert_eq!(m1.assign(x), m2.assign(&[x[0] + 0.5, x[1] + 0.5]));
        }
        // fewer distinct points than k: fewer centroids
        let m = KMeans::fit(&[vec![1.0], vec![1.0]], 4, 0, None);
        assert_eq!(m.centroids.len(), 1);
    }
}
