//! Logistic regression as SPEC §4 "Predictive models" defines the fit: the
//! features standardized by the examples' mean and population standard
//! deviation (a constant feature left out), then the intercept `b` and
//! weights `w` minimizing `Σ log-loss + (l2/2)·|w|²` (`b` unpenalized),
//! solved to a gradient norm below [`TOLERANCE`] (or until a Newton step
//! is below the rounding of the weights, where more steps cannot help).
//!
//! The solver is Newton's method from zero with a backtracking line search
//! (the objective is strictly convex for `l2 > 0`, so the optimum is unique
//! and Newton converges in a handful of steps). Every sum over examples is
//! compensated (Neumaier) and taken in the order of the examples as given;
//! callers sort them by value ([`sort_examples`]), so the result is a
//! function of the multiset of examples: the same bits for any number of
//! workers or processes, and close to the exact optimum even over millions
//! of examples, where a plain sum's rounding would exceed the tolerance.
//!
//! Cost per Newton step: `n·(k+1)(k+2)/2` multiply-adds for the Hessian
//! (`n` examples, `k` kept features) plus a solve of size `k + 1`.

use serde::{Deserialize, Serialize};

/// The gradient norm at which the fit stops.
pub const TOLERANCE: f64 = 1e-9;
/// Newton steps at most (a fit that needs more stops at the best found).
pub const MAX_STEPS: usize = 100;

/// One training example: features (raw) and label.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub x: Vec<f64>,
    pub y: bool,
}

/// A fitted model in the terms of the features as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Logit {
    pub intercept: f64,
    /// Per feature: its weight on the standardized feature, `None` for a
    /// feature left out (deviation 0 among the examples).
    pub weights: Vec<Option<f64>>,
    /// Per feature: the examples' mean and population standard deviation.
    pub mean: Vec<f64>,
    pub scale: Vec<f64>,
    /// Examples, and how many of them had a true label.
    pub examples: u64,
    pub positives: u64,
    /// Newton steps taken, and the gradient norm reached.
    pub steps: u32,
    pub gradient: f64,
}

/// Orders examples by their values (features in total order, then label),
/// so that a fit does not depend on the order they were gathered in.
pub fn sort_examples(examples: &mut [Example]) {
    examples.sort_by(|a, b| {
        a.x.iter()
            .zip(&b.x)
            .map(|(p, q)| p.total_cmp(q))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.y.cmp(&b.y))
    });
}

/// A compensated (Neumaier) sum.
#[derive(Clone, Copy, Default)]
struct Sum {
    s: f64,
    c: f64,
}

impl Sum {
    fn add(&mut self, x: f64) {
        let t = self.s + x;
        if self.s.abs() >= x.abs() {
            self.c += (self.s - t) + x;
        } else {
            self.c += (x - t) + self.s;
        }
        self.s = t;
    }

    fn value(self) -> f64 {
        self.s + self.c
    }
}

/// `1 / (1 + e^-η)`, without overflow on either side.
pub fn sigmoid(eta: f64) -> f64 {
    if eta >= 0.0 {
        1.0 / (1.0 + (-eta).exp())
    } else {
        let e = eta.exp();
        e / (1.0 + e)
    }
}

/// `log(1 + e^η) - y·η`: one example's log-loss at linear predictor `η`.
fn log_loss(eta: f64, y: bool) -> f64 {
    let softplus = eta.max(0.0) + (-eta.abs()).exp().ln_1p();
    if y {
        softplus - eta
    } else {
        softplus
    }
}

impl Logit {
    /// The fit over `examples` (in the order given, features finite) with
    /// penalty `l2 > 0`; `None` when they hold fewer than two classes (or,
    /// for features near the largest float, when the fit overflows).
    #[allow(clippy::needless_range_loop)] // matrix indices, as written on paper
    pub fn fit(examples: &[Example], l2: f64) -> Option<Logit> {
        let n = examples.len();
        let positives = examples.iter().filter(|e| e.y).count();
        if positives == 0 || positives == n {
            return None;
        }
        let d = examples[0].x.len();
        let mut mean = vec![0.0; d];
        let mut scale = vec![1.0; d];
        let mut kept = Vec::new();
        for j in 0..d {
            let first = examples[0].x[j];
            // Deviation 0 is every value equal: decided on the values, not
            // on a variance that rounding may leave a hair above zero.
            if examples.iter().all(|e| e.x[j] == first) {
                mean[j] = first;
                continue;
            }
            // Sums of x/n and of squares of deviations scaled by the
            // largest: no overflow for any finite features.
            let mut sum = Sum::default();
            examples.iter().for_each(|e| sum.add(e.x[j] / n as f64));
            mean[j] = sum.value();
            let big = examples.iter().map(|e| (e.x[j] - mean[j]).abs()).fold(0.0, f64::max);
            let mut sq = Sum::default();
            examples.iter().for_each(|e| sq.add(((e.x[j] - mean[j]) / big).powi(2)));
            scale[j] = big * (sq.value() / n as f64).sqrt();
            if !(scale[j] > 0.0 && scale[j].is_finite()) {
                return None;
            }
            kept.push(j);
        }
        let z: Vec<Vec<f64>> = examples
            .iter()
            .map(|e| kept.iter().map(|&j| (e.x[j] - mean[j]) / scale[j]).collect())
            .collect();
        let k = kept.len() + 1; // the intercept first
        let eta = |theta: &[f64], zi: &[f64]| theta[0] + zi.iter().zip(&theta[1..]).map(|(a, b)| a * b).sum::<f64>();
        let objective = |theta: &[f64]| {
            let mut f = Sum::default();
            for (zi, e) in z.iter().zip(examples) {
                f.add(log_loss(eta(theta, zi), e.y));
            }
            f.value() + 0.5 * l2 * theta[1..].iter().map(|w| w * w).sum::<f64>()
        };
        let mut theta = vec![0.0; k];
        let mut f = objective(&theta);
        let mut steps = 0;
        let mut gnorm;
        loop {
            let mut g = vec![Sum::default(); k];
            let mut h = vec![Sum::default(); k * (k + 1) / 2];
            for (zi, e) in z.iter().zip(examples) {
                let p = sigmoid(eta(&theta, zi));
                let r = p - if e.y { 1.0 } else { 0.0 };
                let v = p * (1.0 - p);
                let a = |i: usize| if i == 0 { 1.0 } else { zi[i - 1] };
                let mut at = 0;
                for i in 0..k {
                    g[i].add(r * a(i));
                    for j in 0..=i {
                        h[at].add(v * a(i) * a(j));
                        at += 1;
                    }
                }
            }
            let mut grad: Vec<f64> = g.iter().map(|s| s.value()).collect();
            let mut hess = vec![vec![0.0; k]; k];
            let mut at = 0;
            for i in 0..k {
                if i > 0 {
                    grad[i] += l2 * theta[i];
                }
                for j in 0..=i {
                    hess[i][j] = h[at].value();
                    hess[j][i] = hess[i][j];
                    at += 1;
                }
                if i > 0 {
                    hess[i][i] += l2;
                }
            }
            gnorm = grad.iter().map(|x| x * x).sum::<f64>().sqrt();
            if gnorm < TOLERANCE || steps >= MAX_STEPS {
                break;
            }
            // A Hessian that is not positive definite at working precision
            // (collinear features under a vanishing `l2`): no model.
            let delta = solve(hess, &grad)?;
            // A step below the rounding of the weights cannot help: the
            // optimum at working precision (over some 10^7 examples the
            // gradient's own rounding can exceed the tolerance).
            let size = theta.iter().fold(1.0f64, |m, t| m.max(t.abs()));
            if delta.iter().all(|d| d.abs() <= 4.0 * f64::EPSILON * size) {
                break;
            }
            // Backtracking: halve the Newton step until the objective does
            // not rise (beyond its own rounding, near the optimum).
            let mut step = 1.0;
            let mut moved = false;
            for _ in 0..60 {
                let next: Vec<f64> = theta.iter().zip(&delta).map(|(t, d)| t - step * d).collect();
                let fn_ = objective(&next);
                if fn_ <= f + 1e-13 * f.abs().max(1.0) {
                    theta = next;
                    f = fn_;
                    moved = true;
                    break;
                }
                step /= 2.0;
            }
            steps += 1;
            if !moved {
                break;
            }
        }
        if !theta.iter().all(|t| t.is_finite()) {
            return None;
        }
        let mut weights = vec![None; d];
        for (i, &j) in kept.iter().enumerate() {
            weights[j] = Some(theta[i + 1]);
        }
        Some(Logit {
            intercept: theta[0],
            weights,
            mean,
            scale,
            examples: n as u64,
            positives: positives as u64,
            steps: steps as u32,
            gradient: gnorm,
        })
    }

    /// `sigmoid(b + w·z)` of raw features `x`.
    pub fn predict(&self, x: &[f64]) -> f64 {
        let mut eta = self.intercept;
        for (j, w) in self.weights.iter().enumerate() {
            if let Some(w) = w {
                eta += w * (x[j] - self.mean[j]) / self.scale[j];
            }
        }
        sigmoid(eta)
    }

    /// The area under the ROC curve of this model's predictions on
    /// `examples` (ties count half); `None` without both classes.
    pub fn auc(&self, examples: &[Example]) -> Option<f64> {
        let scored: Vec<(f64, bool)> = examples.iter().map(|e| (self.predict(&e.x), e.y)).collect();
        auc(scored)
    }
}

/// The area under the ROC curve of `(score, label)` pairs: the chance that
/// a random positive scores above a random negative, ties counting half
/// (Mann–Whitney); `None` without both classes.
pub fn auc(mut scored: Vec<(f64, bool)>) -> Option<f64> {
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut negatives_below, mut wins) = (0.0, 0.0);
    let (mut pos, mut neg) = (0u64, 0u64);
    let mut i = 0;
    while i < scored.len() {
        let j = i + scored[i..].iter().take_while(|s| s.0.total_cmp(&scored[i].0).is_eq()).count();
        let p = scored[i..j].iter().filter(|s| s.1).count() as f64;
        let q = (j - i) as f64 - p;
        wins += p * (negatives_below + q / 2.0);
        negatives_below += q;
        pos += p as u64;
        neg += q as u64;
        i = j;
    }
    (pos > 0 && neg > 0).then(|| wins / (pos as f64 * neg as f64))
}

/// Solves `a·x = b` for symmetric positive definite `a` (Cholesky);
/// `None` when `a` is not.
#[allow(clippy::needless_range_loop)] // matrix indices, as written on paper
fn solve(mut a: Vec<Vec<f64>>, b: &[f64]) -> Option<Vec<f64>> {
    let k = b.len();
    for j in 0..k {
        let mut d = a[j][j];
        for p in 0..j {
            d -= a[j][p] * a[j][p];
        }
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        a[j][j] = d;
        for i in j + 1..k {
            let mut s = a[i][j];
            for p in 0..j {
                s -= a[i][p] * a[j][p];
            }
            a[i][j] = s / d;
        }
    }
    let mut y = b.to_vec();
    for i in 0..k {
        for p in 0..i {
            y[i] -= a[i][p] * y[p];
        }
        y[i] /= a[i][i];
    }
    for i in (0..k).rev() {
        for p in i + 1..k {
            y[i] -= a[p][i] * y[p];
        }
        y[i] /= a[i][i];
    }
    Some(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(n: usize, seed: u64) -> Vec<Example> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let x: Vec<f64> = vec![rng.gen_range(0..20) as f64, rng.gen::<f64>() * 100.0, 3.0];
                let p = sigmoid(-1.0 + 0.2 * x[0] - 0.01 * x[1]);
                Example {
                    x,
                    y: rng.gen::<f64>() < p,
                }
            })
            .collect()
    }

    /// The optimum by another road: plain gradient descent on the same
    /// objective, run long, must land on Newton's answer.
    #[test]
    fn newton_lands_where_gradient_descent_does() {
        let ex = examples(300, 1);
        let m = Logit::fit(&ex, 1.0).expect("two classes");
        assert!(m.gradient < TOLERANCE, "gradient {}", m.gradient);
        assert_eq!(m.weights[2], None, "a constant feature is left out");
        let z: Vec<[f64; 2]> = ex
            .iter()
            .map(|e| [(e.x[0] - m.mean[0]) / m.scale[0], (e.x[1] - m.mean[1]) / m.scale[1]])
            .collect();
        let mut t = [0.0f64; 3];
        for _ in 0..200_000 {
            let mut g = [0.0, t[1], t[2]];
            for (zi, e) in z.iter().zip(&ex) {
                let r = sigmoid(t[0] + t[1] * zi[0] + t[2] * zi[1]) - e.y as u8 as f64;
                g[0] += r;
                g[1] += r * zi[0];
                g[2] += r * zi[1];
            }
            for i in 0..3 {
                t[i] -= 0.002 * g[i];
            }
        }
        assert!((t[0] - m.intercept).abs() < 1e-7, "{t:?} vs {m:?}");
        assert!((t[1] - m.weights[0].unwrap()).abs() < 1e-7);
        assert!((t[2] - m.weights[1].unwrap()).abs() < 1e-7);
    }

    #[test]
    fn the_fit_is_a_function_of_the_multiset() {
        let mut a = examples(500, 2);
        let mut b = a.clone();
        b.reverse();
        sort_examples(&mut a);
        sort_examples(&mut b);
        assert_eq!(Logit::fit(&a, 0.5), Logit::fit(&b, 0.5));
    }

    #[test]
    fn one_class_is_no_model_and_separable_data_still_converges() {
        let one: Vec<Example> = (0..5)
            .map(|i| Example {
                x: vec![i as f64],
                y: true,
            })
            .collect();
        assert_eq!(Logit::fit(&one, 1.0), None);
        let sep: Vec<Example> = (0..10)
            .map(|i| Example {
                x: vec![i as f64],
                y: i >= 5,
            })
            .collect();
        let m = Logit::fit(&sep, 0.01).expect("two classes");
        assert!(
            m.gradient < TOLERANCE && m.predict(&[9.0]) > 0.99 && m.predict(&[0.0]) < 0.01,
            "{m:?}"
        );
    }

    #[test]
    fn features_near_the_largest_float_fit_like_small_ones() {
        let small: Vec<Example> = (0..40)
            .map(|i| Example {
                x: vec![(i % 7) as f64],
                y: i % 3 == 0,
            })
            .collect();
        let huge: Vec<Example> = small
            .iter()
            .map(|e| Example {
                x: vec![e.x[0] * 1e300],
                y: e.y,
            })
            .collect();
        let (a, b) = (Logit::fit(&small, 1.0).unwrap(), Logit::fit(&huge, 1.0).unwrap());
        assert!((a.weights[0].unwrap() - b.weights[0].unwrap()).abs() < 1e-9, "{a:?} {b:?}");
        assert!((a.predict(&[3.0]) - b.predict(&[3e300])).abs() < 1e-9);
    }

    #[test]
    fn auc_counts_ties_half() {
        assert_eq!(auc(vec![(f64::NAN, false), (f64::NAN, true), (0.5, true)]), Some(0.25));
        assert_eq!(auc(vec![(0.1, false), (0.9, true)]), Some(1.0));
        assert_eq!(auc(vec![(0.5, false), (0.5, true)]), Some(0.5));
        assert_eq!(auc(vec![(0.2, true), (0.1, false), (0.3, false)]), Some(0.5));
        assert_eq!(auc(vec![(0.2, true)]), None);
    }
}
