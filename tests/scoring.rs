//! Scoring (SPEC §4): named scores, adaptive thresholds, RFM and clustering.
//!
//! RFM is checked on a purchase history whose scores were worked out by hand
//! (ties included) at two ticks, so that customers are seen moving between
//! tiers; percentiles on a population with a known answer; clustering on
//! well-separated blobs (recovered whole, same output with 1 and 2 workers)
//! and for quality: the inertia of shoal's model against a from-scratch
//! k-means++ with many restarts, written here independently. Everything that
//! runs through the engine is also held against the reference evaluator.

mod reference;

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reference::{evaluate, RefOptions};
use shoal::core::clock::format_time;
use shoal::dataflow::cluster::KMeans;
use shoal::run::{run_memory, RunOptions};

const BASE: u64 = 1_704_067_200_000; // 2024-01-01T00:00:00Z

fn track(user: &str, s: u64, name: &str, props: &str) -> String {
    format!(
        r#"{{"type":"track","event":"{name}","userId":"{user}","timestamp":{},"properties":{{{props}}}}}"#,
        BASE + s * 1000
    )
}

fn opts(workers: usize) -> RunOptions {
    RunOptions {
        lateness: 0,
        workers,
        ..RunOptions::default()
    }
}

/// Runs the engine with 1 and 2 workers and the reference; all must agree.
fn run_checked(spec_text: &str, input: &str) -> Vec<String> {
    let spec = shoal::spec::parse_spec(spec_text, 1000).unwrap_or_else(|e| panic!("{e:?}"));
    let expected = evaluate(
        &spec,
        input.as_bytes(),
        &RefOptions {
            lateness: 0,
            ..RefOptions::default()
        },
    );
    for workers in [1, 2] {
        let got = run_memory(&spec, input.as_bytes(), &opts(workers)).unwrap();
        assert_eq!(got.lines, expected.lines, "engine ({workers} workers) vs reference");
    }
    expected.lines
}

/// Members of each segment after applying every line up to tick `s`.
fn members_at(lines: &[String], s: u64) -> BTreeMap<String, BTreeSet<String>> {
    let cut = format_time(BASE + s * 1000, false);
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if v["time"].as_str().unwrap() > cut.as_str() {
            break;
        }
        let set = m.entry(v["segment"].as_str().unwrap().to_string()).or_default();
        let p = v["profile"].as_str().unwrap().to_string();
        if v["change"] == "enter" {
            set.insert(p);
        } else {
            set.remove(&p);
        }
    }
    m.retain(|_, s| !s.is_empty());
    m
}

/// The segments of one profile.
fn of(m: &BTreeMap<String, BTreeSet<String>>, profile: &str) -> Vec<String> {
    m.iter().filter(|(_, s)| s.contains(profile)).map(|(k, _)| k.clone()).collect()
}

fn rfm_spec(window: &str) -> String {
    let mut s = format!("[rfm]\npurchase = \"buy\"\nrevenue = \"amount\"\nwindow = \"{window}\"\n\n");
    for f in ["r", "f", "m"] {
        for v in 1..=5 {
            s += &format!("[[segment]]\nname = \"{f}{v}\"\nwhen = \"rfm.{f} == {v}\"\n\n");
        }
    }
    for g in [
        "hibernating",
        "at_risk",
        "promising",
        "loyal_customers",
        "potential_loyalists",
        "about_to_sleep",
    ] {
        s += &format!("[[segment]]\nname = \"{g}\"\nwhen = \"rfm.segment == '{g}'\"\n\n");
    }
    s
}

/// The purchase history of the hand computation (seconds after BASE).
fn purchases() -> String {
    let mut evs = vec![
        (5, "u4", 1),
        (10, "u1", 10),
        (12, "u5", 50),
        (15, "u4", 1),
        (20, "u2", 5),
        (25, "u4", 1),
        (30, "u2", 5),
        (30, "u3", 100),
        (40, "u4", 1),
        (40, "u5", 50),
    ]
    .into_iter()
    .map(|(s, u, a)| track(u, s, "buy", &format!("\"amount\":{a}")))
    .collect::<Vec<_>>();
    evs.push(track("u6", 41, "view", ""));
    evs.join("\n") + "\n"
}

#[test]
fn rfm_scores_and_segments_by_hand_with_ties() {
    let lines = run_checked(&rfm_spec("lifetime"), &purchases());
    // At 20s: u1 (R 10, F 1, M 10), u2 (20, 1, 5), u4 (15, 2, 2), u5 (12, 1, 50);
    // |P| = 4, score = 1 + floor(5 * smaller / 4).
    // R: smaller 0, 3, 2, 1 -> 1, 4, 3, 2. F: 0, 0, 3, 0 -> 1, 1, 4, 1.
    // M: 2, 1, 0, 3 -> 3, 2, 1, 4.
    let at20 = members_at(&lines, 20);
    assert_eq!(of(&at20, "user:u1"), ["f1", "hibernating", "m3", "r1"]);
    assert_eq!(of(&at20, "user:u2"), ["f1", "m2", "promising", "r4"]);
    assert_eq!(of(&at20, "user:u4"), ["f4", "loyal_customers", "m1", "r3"]);
    assert_eq!(of(&at20, "user:u5"), ["f1", "hibernating", "m4", "r2"]);
    // At 41s: u1 (10, 1, 10), u2 (30, 2, 10), u3 (30, 1, 100), u4 (40, 4, 4),
    // u5 (40, 2, 100); |P| = 5, score = 1 + smaller; ties score alike.
    // R: 0, 1, 1, 3, 3. F: 0, 2, 0, 4, 2. M: 1, 1, 3, 0, 3.
    let at41 = members_at(&lines, 41);
    assert_eq!(of(&at41, "user:u1"), ["f1", "hibernating", "m2", "r1"]);
    assert_eq!(of(&at41, "user:u2"), ["at_risk", "f3", "m2", "r2"]);
    assert_eq!(of(&at41, "user:u3"), ["f1", "hibernating", "m4", "r2"]);
    assert_eq!(of(&at41, "user:u4"), ["f5", "loyal_customers", "m1", "r4"]);
    assert_eq!(of(&at41, "user:u5"), ["f3", "m4", "potential_loyalists", "r4"]);
    // No purchase, no scores.
    assert!(of(&at41, "user:u6").is_empty());
    // u2 moves with purchases, its own and others' (with --lateness 0 the
    // second event of a second is late and counts one tick later): promising
    // at 20s; at 25s u4's buy pushes its recency to 3: about_to_sleep; its
    // second buy (30s) and u3's (31s) make it (R 4, F 4) loyal_customers; the
    // buys of u4 (40s) and u5 (41s) push its recency to 2: at_risk. Each move
    // is an exit and an enter at its tick.
    let line = |s: u64, seg: &str, change: &str| {
        let t = format_time(BASE + s * 1000, false);
        format!(r#"{{"time":"{t}","segment":"{seg}","profile":"user:u2","change":"{change}"}}"#)
    };
    for l in [
        line(20, "promising", "enter"),
        line(25, "promising", "exit"),
        line(25, "about_to_sleep", "enter"),
        line(31, "loyal_customers", "enter"),
        line(41, "loyal_customers", "exit"),
        line(41, "at_risk", "enter"),
    ] {
        assert!(lines.contains(&l), "{l}\n{}", lines.join("\n"));
    }
}

#[test]
fn rfm_moves_as_purchases_leave_the_window() {
    // window 20s: at 41s only purchases after 21s count: u2 (30, 1, 5),
    // u3 (30, 1, 100), u4 (40, 2, 2) [25 and 40], u5 (40, 1, 50); u1 is gone.
    // |P| = 4. R: smaller 0, 0, 2, 2 -> 1, 1, 3, 3. F: 0, 0, 3, 0 -> 1, 1, 4, 1.
    // M: 1, 3, 0, 2 -> 2, 4, 1, 3. Segments: (1, 1) hibernating twice,
    // (3, 4) loyal_customers, (3, 1) about_to_sleep.
    let mut input = purchases();
    input += &track("u6", 60, "view", "");
    let lines = run_checked(&rfm_spec("20s"), &input);
    let at41 = members_at(&lines, 41);
    assert!(of(&at41, "user:u1").is_empty());
    assert_eq!(of(&at41, "user:u2"), ["f1", "hibernating", "m2", "r1"]);
    assert_eq!(of(&at41, "user:u3"), ["f1", "hibernating", "m4", "r1"]);
    assert_eq!(of(&at41, "user:u4"), ["f4", "loyal_customers", "m1", "r3"]);
    assert_eq!(of(&at41, "user:u5"), ["about_to_sleep", "f1", "m3", "r3"]);
    // By 60s every purchase has left the window: nobody is scored.
    assert!(members_at(&lines, 60).is_empty());
}

#[test]
fn percentile_thresholds_follow_the_population() {
    // u1..u10 view 1..10 times; the 90th percentile (nearest rank) of the
    // counts is the 9th smallest, 9. Then u11 views 20 times: 11 values,
    // rank ceil(9.9) = 10, the threshold becomes 10 and u9 drops out.
    let mut evs = Vec::new();
    for u in 1..=10u64 {
        for i in 0..u {
            evs.push(track(&format!("u{u:02}"), 10 + i, "view", ""));
        }
    }
    for i in 0..20 {
        evs.push(track("u11", 40 + i, "view", ""));
    }
    let spec = r#"
[[score]]
name = "views"
expr = "count('view', lifetime)"

[[segment]]
name = "top"
when = "score.views >= percentile(score.views, 90)"
"#;
    let lines = run_checked(spec, &(evs.join("\n") + "\n"));
    let set = |s| members_at(&lines, s).remove("top").unwrap_or_default();
    assert_eq!(set(30), BTreeSet::from(["user:u09".to_string(), "user:u10".to_string()]));
    // u11 reaches 10 views at 49s: the threshold moves to 10 (u10 and u11);
    // from 50s on u11 leads and the threshold stays at 10.
    assert_eq!(set(60), BTreeSet::from(["user:u10".to_string(), "user:u11".to_string()]));
}

#[test]
fn the_weighted_score_formula_of_the_seeds() {
    // score = Σ signal_i * weight_i / sqrt(signal_variance + ε)
    let spec = r#"
[[score]]
name = "engagement"
expr = "(0.9 * count(page, 1h) + 0.6 * avg(page, dwell_ms, 1h) / 1000) / sqrt(var(page, dwell_ms, 1h) / 1000000 + 0.01)"

[[segment]]
name = "engaged"
when = "score.engagement >= 10"
"#;
    // Steady reader: 4 pages of 60s dwell: (3.6 + 36) / sqrt(0 + 0.01) = 396.
    // Erratic reader: dwell 1s and 119s: variance 3481 s^2:
    // (1.8 + 36) / sqrt(3481.01) ~ 0.64.
    let mut evs = Vec::new();
    for i in 0..4 {
        evs.push(format!(
            r#"{{"type":"page","name":"p","userId":"steady","timestamp":{},"properties":{{"dwell_ms":60000}}}}"#,
            BASE + i * 1000
        ));
    }
    for (i, d) in [1000, 119000].into_iter().enumerate() {
        evs.push(format!(
            r#"{{"type":"page","name":"p","userId":"erratic","timestamp":{},"properties":{{"dwell_ms":{d}}}}}"#,
            BASE + 10_000 + i as u64 * 1000
        ));
    }
    let lines = run_checked(spec, &(evs.join("\n") + "\n"));
    let m = members_at(&lines, 20);
    assert_eq!(m["engaged"], BTreeSet::from(["user:steady".to_string()]));
}

/// Three well-separated groups of ten users: (views, revenue) near (1, 0),
/// (12, 0) and (3, 500).
fn blobs() -> String {
    let mut evs = Vec::new();
    for u in 0..30u64 {
        let user = format!("u{u:02}");
        let group = u % 3;
        let views = [1, 12, 3][group as usize] + u % 2;
        for i in 0..views {
            evs.push((u + i * 30, track(&user, u + i * 30, "view", "")));
        }
        if group == 2 {
            evs.push((u + 400, track(&user, u + 400, "buy", &format!("\"amount\":{}", 480 + u))));
        }
    }
    // Someone at 1000s, so that the run goes past the refresh at 600s
    // (the first after the purchases): one more point near group 0.
    evs.push((1000, track("zz", 1000, "view", "")));
    evs.sort();
    evs.into_iter().map(|(_, e)| e).collect::<Vec<_>>().join("\n") + "\n"
}

const CLUSTER_SPEC: &str = r#"
[[clustering]]
name = "b"
k = 3
features = ["count('view', lifetime)", "sum('buy', amount, lifetime)"]
refresh = "5m"
seed = 11

[[segment]]
name = "c0"
when = "cluster.b == 0"

[[segment]]
name = "c1"
when = "cluster.b == 1"

[[segment]]
name = "c2"
when = "cluster.b == 2"
"#;

#[test]
fn clustering_recovers_known_clusters_with_1_and_2_workers() {
    let lines = run_checked(CLUSTER_SPEC, &blobs());
    // At the last tick (after the refresh at 10m), each group is one cluster.
    let m = members_at(&lines, 1000);
    let mut groups: Vec<BTreeSet<String>> = (0..3)
        .map(|g| (0..30).filter(|u| u % 3 == g).map(|u| format!("user:u{u:02}")).collect())
        .collect();
    groups[0].insert("user:zz".into());
    let mut found: Vec<BTreeSet<String>> = m.values().cloned().collect();
    found.sort();
    let mut want = groups.clone();
    want.sort();
    assert_eq!(found, want, "{m:?}");
}

#[test]
fn clustering_is_deterministic_for_a_seed() {
    let spec = shoal::spec::parse_spec(CLUSTER_SPEC, 1000).unwrap();
    let input = blobs();
    let a = run_memory(&spec, input.as_bytes(), &opts(1)).unwrap().lines;
    let b = run_memory(&spec, input.as_bytes(), &opts(2)).unwrap().lines;
    let c = run_memory(&spec, input.as_bytes(), &opts(1)).unwrap().lines;
    assert_eq!(a, b);
    assert_eq!(a, c);
}

// ---------------------------------------------------------------------------
// Quality: shoal's model against an independent k-means++ with restarts.

/// Lloyd's algorithm from a k-means++ start, written from the textbook.
fn textbook_kmeans(points: &[Vec<f64>], k: usize, rng: &mut ChaCha8Rng) -> f64 {
    let d2 = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
    let mut centers = vec![points[rng.gen_range(0..points.len())].clone()];
    while centers.len() < k {
        let w: Vec<f64> = points
            .iter()
            .map(|p| centers.iter().map(|c| d2(p, c)).fold(f64::INFINITY, f64::min))
            .collect();
        let total: f64 = w.iter().sum();
        let mut r = rng.gen::<f64>() * total;
        let mut pick = points.len() - 1;
        for (i, x) in w.iter().enumerate() {
            if r < *x {
                pick = i;
                break;
            }
            r -= x;
        }
        centers.push(points[pick].clone());
    }
    let mut last: Vec<usize> = Vec::new();
    for _ in 0..300 {
        let mut sums = vec![vec![0.0; points[0].len()]; k];
        let mut n = vec![0.0; k];
        let now: Vec<usize> = points
            .iter()
            .map(|p| (0..k).min_by(|&a, &b| d2(p, &centers[a]).total_cmp(&d2(p, &centers[b]))).unwrap())
            .collect();
        if now == last {
            break;
        }
        for (p, &j) in points.iter().zip(&now) {
            n[j] += 1.0;
            for (s, x) in sums[j].iter_mut().zip(p) {
                *s += x;
            }
        }
        for ((c, s), m) in centers.iter_mut().zip(&sums).zip(&n) {
            if *m > 0.0 {
                *c = s.iter().map(|v| v / m).collect();
            }
        }
        last = now;
    }
    points
        .iter()
        .map(|p| centers.iter().map(|c| d2(p, c)).fold(f64::INFINITY, f64::min))
        .sum()
}

/// z-scores, written here again.
fn zscores(points: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let n = points.len() as f64;
    let d = points[0].len();
    let mean: Vec<f64> = (0..d).map(|j| points.iter().map(|p| p[j]).sum::<f64>() / n).collect();
    let sd: Vec<f64> = (0..d)
        .map(|j| (points.iter().map(|p| (p[j] - mean[j]).powi(2)).sum::<f64>() / n).sqrt())
        .collect();
    points
        .iter()
        .map(|p| (0..d).map(|j| (p[j] - mean[j]) / if sd[j] > 0.0 { sd[j] } else { 1.0 }).collect())
        .collect()
}

/// Gaussian-ish blobs (sums of uniforms) with `spread`, on three features
/// of very different scales (a count, a dwell in ms, a percentage).
fn population(n: usize, k: usize, spread: f64, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let centers: Vec<Vec<f64>> = (0..k)
        .map(|_| vec![rng.gen_range(0.0..10.0), rng.gen_range(0.0..10.0), rng.gen_range(0.0..10.0)])
        .collect();
    let scales = [3.0, 4000.0, 10.0];
    (0..n)
        .map(|i| {
            let c = &centers[i % k];
            (0..3)
                .map(|j| {
                    let noise: f64 = (0..4).map(|_| rng.gen_range(-1.0..1.0)).sum::<f64>() * spread;
                    (c[j] + noise) * scales[j]
                })
                .collect()
        })
        .collect()
}

#[test]
fn clustering_inertia_against_kmeans_with_restarts() {
    let mut report = Vec::new();
    for (name, n, k, spread, seed) in [
        ("separated", 2000, 4, 0.3, 1),
        ("overlapping", 2000, 4, 1.5, 2),
        ("uniform-ish", 2000, 6, 5.0, 3),
        ("many", 5000, 8, 0.8, 4),
    ] {
        let points = population(n, k, spread, seed);
        let model = KMeans::fit(&points, k, 7, None);
        let ours = model.inertia(&points);
        let z = zscores(&points);
        let mut rng = ChaCha8Rng::seed_from_u64(1234);
        let best = (0..20).map(|_| textbook_kmeans(&z, k, &mut rng)).fold(f64::INFINITY, f64::min);
        let ratio = ours / best;
        report.push(format!("{name}: n={n} k={k} shoal {ours:.1} best-of-20 {best:.1} ratio {ratio:.4}"));
        assert!(ratio < 1.10, "{name}: inertia {ours} vs {best}");
    }
    eprintln!("{}", report.join("\n"));
}
