//! A deliberately naive, from-scratch reference evaluator of SPEC.md §1–§5.
//!
//! It is held against the dataflow engine in property tests, so it must be
//! obviously right rather than fast, and share nothing with the engine: it
//! uses only the decoder (`shoal::ingest::event`), the `when` syntax tree
//! (`shoal::spec`), scalar arithmetic (`shoal::core::value`) and the two pure clock
//! helpers `tick_of` and `format_time`. Everything else (the clock, dedupe,
//! lateness, identity resolution, windows, aggregates, the output diff) is
//! rewritten here straight from the SPEC's words.
//!
//! The method: read the input once in order, deciding for every line whether
//! it is a dead letter, a dropped `group`, a duplicate or an accepted event,
//! and the tick at which an accepted event takes effect (its own tick, or
//! `now + tick` when late). Then, for every tick that is evaluated, rebuild
//! everything from nothing: a union-find over the links in effect, the
//! profile of every visible event, every term of every segment for every
//! profile, and the membership sets. The output is the difference between
//! consecutive evaluated ticks.
//!
//! Ticks evaluated: every tick from the first effect tick to the last tick
//! written when that span is small; otherwise only the ticks at which a
//! membership can change (effect ticks, window expiries `tick_of(e + W)`,
//! and `since` thresholds `tick_of(e + D)`, `tick_of(e + D + 1)`).
//!
//! Floats: `avg` and `var` are computed from exact sums when every value is
//! an exact number (one rounding at the end), otherwise over the values in
//! sorted order, so that they never depend on the order of the input.
//!
//! Scoring: `score.NAME` is its expression evaluated in place; percentiles,
//! RFM scores and clusters are computed per tick over all profiles before
//! the memberships (nearest rank and the rank rule written here from the
//! SPEC's words). Clustering keeps one piece of state from tick to tick, the
//! model: it is trained at the first tick with a population and then at
//! every tick that is a multiple of `refresh` whose population differs from
//! the one it was last trained on. The model itself (standardize, k-means++,
//! numbering) is `shoal::dataflow::cluster::KMeans`, a pure function of the population
//! that has its own tests (tests/scoring.rs holds it against an independent
//! k-means); what is checked here is when it is trained and how profiles
//! follow it.
//!
//! Predictive models are refitted from scratch at every evaluated tick `r`
//! that is a multiple of `refresh`: the profiles of tick `r - horizon` are
//! rebuilt from the events, and those that are profiles at `r` too, are
//! sampled (XXH3 as the SPEC writes it) and have every feature at
//! `r - horizon` are the examples, labelled at `r`. The fit itself is
//! `shoal::dataflow::logit::Logit`, a pure function of the sorted examples
//! held against scikit-learn in tests/models.rs.
#![allow(dead_code)]

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value as Json;
use shoal::core::clock::{format_time, tick_of};
use shoal::core::id::{Id, Request};
use shoal::core::value::{Dec, Value};
use shoal::dataflow::cluster::KMeans;
use shoal::dataflow::logit::{sort_examples, Example, Logit};
use shoal::ingest::event::{decode, Event, EventType};
use shoal::spec::ast::{AggKind, CmpOp, EventSel, Expr, ExprKind, Path, RfmField, Selector, Window};
use shoal::spec::Spec;

/// How the run is clocked and bounded; all in milliseconds.
#[derive(Clone, Debug)]
pub struct RefOptions {
    pub tick: u64,
    pub lateness: u64,
    pub dedupe_horizon: u64,
    pub until: Option<u64>,
}

impl Default for RefOptions {
    fn default() -> Self {
        RefOptions {
            tick: 1_000,
            lateness: 5_000,
            dedupe_horizon: 3_600_000,
            until: None,
        }
    }
}

/// What the reference writes: the SPEC §5 lines and the number of dead letters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefOutput {
    pub lines: Vec<String>,
    pub dead: usize,
}

/// Above this many ticks between the first and the last one, only the ticks
/// at which something can change are evaluated.
const DENSE_LIMIT: u64 = 20_000;

/// Evaluates `spec` over `input` (JSON lines) the naive way.
pub fn evaluate(spec: &Spec, input: &[u8], opts: &RefOptions) -> RefOutput {
    run(spec, input, opts, false, &[])
}

/// [`evaluate`] with requests made at given ticks (SPEC §7). Forgetting
/// ids at tick `f`: from `f` on, every event that names any of them (as
/// `userId`, `anonymousId` or an end of a link) is as if never read. Unlinking
/// two ids at tick `u`: from `u` on, a link between them counts for nothing;
/// an event still counts for the profile of its anchor (`userId`, else
/// `anonymousId`).
pub fn evaluate_requests(spec: &Spec, input: &[u8], opts: &RefOptions, requests: &[(u64, Request)]) -> RefOutput {
    run(spec, input, opts, false, requests)
}

/// The ids of the profile of `id` at tick `t` (empty when it has none):
/// what a request made at that clock forgets.
pub fn profile_ids(input: &[u8], opts: &RefOptions, requests: &[(u64, Request)], id: &Id, t: u64) -> Vec<Id> {
    let ing = ingest(input, opts);
    let (_, components) = resolve(&ing.accepted, t, requests);
    components
        .into_iter()
        .find(|c| c.contains(id))
        .map(|c| c.into_iter().collect())
        .unwrap_or_default()
}

/// Like [`evaluate`], but always evaluates only the change points, whatever
/// the span (to check that the sparse choice of ticks loses nothing).
pub fn evaluate_sparse(spec: &Spec, input: &[u8], opts: &RefOptions) -> RefOutput {
    run(spec, input, opts, true, &[])
}

/// An accepted event and the tick at which it takes effect.
struct Accepted {
    ev: Event,
    effect: u64,
}

/// The result of reading the input in order.
struct Ingested {
    accepted: Vec<Accepted>,
    dead: usize,
    /// `now` after the last line (`None`: nothing final yet).
    now: Option<u64>,
    /// The largest accepted event time.
    max_time: Option<u64>,
}

/// SPEC §1 and §3: dead letters, `group`, dedupe, the clock, late events.
fn ingest(input: &[u8], opts: &RefOptions) -> Ingested {
    let tick = opts.tick;
    let mut accepted = Vec::new();
    let mut dead = 0;
    let mut max_time: Option<u64> = None;
    let mut now: Option<u64> = None;
    // key -> time of the remembered (first accepted) copy
    let mut remembered: HashMap<u128, u64> = HashMap::new();
    for raw in input.split(|b| *b == b'\n') {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let ev = match decode(line) {
            Ok(ev) => ev,
            Err(_) => {
                dead += 1;
                continue;
            }
        };
        if ev.kind == EventType::Group {
            continue; // validated, then dropped
        }
        // `now` here is the clock before this line.
        if let Some(&first) = remembered.get(&ev.key) {
            let still_remembered = match now {
                None => true,
                Some(n) => n <= first.saturating_add(opts.dedupe_horizon),
            };
            if still_remembered {
                continue; // a duplicate: counted, not applied, does not move T
            }
        }
        remembered.insert(ev.key, ev.time);
        let own = tick_of(ev.time, tick);
        let effect = match now {
            Some(n) if own <= n => n + tick,
            _ => own,
        };
        let t = max_time.map_or(ev.time, |m| m.max(ev.time));
        max_time = Some(t);
        if t >= opts.lateness {
            let candidate = (t - opts.lateness) / tick * tick;
            now = Some(now.map_or(candidate, |n| n.max(candidate)));
        }
        accepted.push(Accepted { ev, effect });
    }
    Ingested {
        accepted,
        dead,
        now,
        max_time,
    }
}

impl Ingested {
    /// The first effect tick and the last tick written (the final clock, cut
    /// at --until); `None` when no event was accepted or nothing falls in it.
    fn span(&self, opts: &RefOptions) -> Option<(u64, u64)> {
        let tick = opts.tick;
        let max_time = self.max_time?;
        let last = match opts.until {
            Some(u) => u / tick * tick,
            None => self.now.unwrap_or(0).max(tick_of(max_time, tick)),
        };
        let first = self.accepted.iter().map(|a| a.effect).min()?;
        (first <= last).then_some((first, last))
    }
}

fn run(spec: &Spec, input: &[u8], opts: &RefOptions, force_sparse: bool, requests: &[(u64, Request)]) -> RefOutput {
    assert!(opts.tick > 0, "tick must be positive");
    let tick = opts.tick;
    let ing = ingest(input, opts);
    let mut out = RefOutput {
        lines: Vec::new(),
        dead: ing.dead,
    };
    let Some((first, last)) = ing.span(opts) else {
        return out; // nothing is written
    };
    // A spec over `now` may change at any tick: every one is evaluated,
    // even when sparse evaluation is asked for.
    let timed = reads_now(spec);
    assert!(
        !timed || (last - first) / tick <= 100 * DENSE_LIMIT,
        "a spec over now is evaluated at every tick: keep its span short"
    );
    let ticks: Vec<u64> = if timed || !force_sparse && (last - first) / tick <= DENSE_LIMIT {
        (first / tick..=last / tick).map(|i| i * tick).collect()
    } else {
        let mut points = change_points(spec, &ing.accepted, tick);
        points.extend(requests.iter().map(|(at, _)| *at));
        // A clustering may retrain, and a model refit, at any multiple of
        // its refresh.
        for refresh in spec
            .clusterings
            .iter()
            .map(|c| c.refresh)
            .chain(spec.models.iter().map(|m| m.refresh))
        {
            let mut r = first.div_ceil(refresh) * refresh;
            while r <= last {
                points.insert(r);
                r += refresh;
            }
        }
        points.into_iter().filter(|t| (first..=last).contains(t)).collect()
    };
    let mut models = Models::new(spec);

    let show_ms = tick < 1000;
    let mut previous: BTreeSet<(usize, String)> = BTreeSet::new();
    for t in ticks {
        let current = members_at(spec, &ing.accepted, t, &mut models, requests);
        let mut changes: Vec<(usize, &String, &str)> = Vec::new();
        for (seg, profile) in current.difference(&previous) {
            changes.push((*seg, profile, "enter"));
        }
        for (seg, profile) in previous.difference(&current) {
            changes.push((*seg, profile, "exit"));
        }
        // by the segment's order in the spec, then by profile id bytes
        changes.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.as_bytes().cmp(b.1.as_bytes())));
        let time = format_time(t, show_ms);
        for (seg, profile, change) in changes {
            out.lines.push(line(spec, &time, seg, profile, change));
        }
        previous = current;
    }
    out
}

/// Whether any expression of `spec` reads `now`.
fn reads_now(spec: &Spec) -> bool {
    let exprs = spec.segments.iter().map(|s| &s.when).chain(spec.scores.iter().map(|s| &s.expr));
    exprs.into_iter().any(shoal::spec::check::reads_now)
}

/// One SPEC §5 line: keys in order, `group` after `change` for a segment
/// with groups.
fn line(spec: &Spec, time: &str, seg: usize, profile: &str, change: &str) -> String {
    let group = ref_group(&spec.segments[seg], profile).map(|g| format!(",\"group\":{}", json_str(g)));
    format!(
        "{{\"time\":{},\"segment\":{},\"profile\":{},\"change\":\"{}\"{}}}",
        json_str(time),
        json_str(&spec.segments[seg].name),
        json_str(profile),
        change,
        group.unwrap_or_default()
    )
}

/// SPEC §4 "Groups", from its words: `b = xxh3_64(segment name bytes, 0x00,
/// profile id bytes) mod W`, the first group in the order written whose
/// running sum of weights exceeds `b`.
fn ref_group<'s>(segment: &'s shoal::spec::Segment, profile: &str) -> Option<&'s str> {
    if segment.groups.is_empty() {
        return None;
    }
    let w: u64 = segment.groups.iter().map(|g| g.weight).sum();
    let bytes: Vec<u8> = [segment.name.as_bytes(), &[0u8], profile.as_bytes()].concat();
    let b = xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, 0) % w;
    let mut running = 0;
    for g in &segment.groups {
        running += g.weight;
        if running > b {
            return Some(&g.name);
        }
    }
    unreachable!("the running sum reaches W > b")
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// Every tick at which some membership may change: effect ticks, window
/// expiries and `since` thresholds (a superset is fine).
fn change_points(spec: &Spec, events: &[Accepted], tick: u64) -> BTreeSet<u64> {
    let mut windows = BTreeSet::new();
    let mut since_durations = BTreeSet::new();
    for seg in &spec.segments {
        collect_thresholds(&seg.when, &mut windows, &mut since_durations);
    }
    for score in &spec.scores {
        collect_thresholds(&score.expr, &mut windows, &mut since_durations);
    }
    for f in spec
        .clusterings
        .iter()
        .flat_map(|c| &c.features)
        .chain(spec.models.iter().flat_map(|m| &m.features))
    {
        collect_thresholds(f, &mut windows, &mut since_durations);
    }
    if let Some(Window::Dur(w)) = spec.rfm.as_ref().map(|r| r.window) {
        windows.insert(w);
    }
    let mut points = BTreeSet::new();
    for a in events {
        let e = a.ev.time;
        points.insert(a.effect);
        for w in &windows {
            points.insert(tick_of(e.saturating_add(*w), tick));
        }
        for d in &since_durations {
            // since = t - e; the comparison flips at t - e >= D or t - e > D
            if *d >= 0 {
                let d = *d as u64;
                points.insert(tick_of(e.saturating_add(d), tick));
                points.insert(tick_of(e.saturating_add(d).saturating_add(1), tick));
            }
        }
    }
    points
}

fn collect_thresholds(expr: &Expr, windows: &mut BTreeSet<u64>, since_durations: &mut BTreeSet<i64>) {
    match &expr.kind {
        ExprKind::Num(_) | ExprKind::Str(_) | ExprKind::Dur(_) | ExprKind::Bool(_) | ExprKind::Path(_) => {}
        ExprKind::InSegment(_)
        | ExprKind::Trait(_)
        | ExprKind::Score(_)
        | ExprKind::Rfm(_)
        | ExprKind::Cluster(_)
        | ExprKind::Predict(_) => {}
        ExprKind::Neg(a) | ExprKind::Not(a) | ExprKind::Sqrt(a) | ExprKind::Abs(a) | ExprKind::Percentile(a, _) => {
            collect_thresholds(a, windows, since_durations)
        }
        ExprKind::And(a, b) | ExprKind::Or(a, b) | ExprKind::Arith(_, a, b) => {
            collect_thresholds(a, windows, since_durations);
            collect_thresholds(b, windows, since_durations);
        }
        ExprKind::Cmp(_, a, b) => {
            for (side, other) in [(a, b), (b, a)] {
                if matches!(side.kind, ExprKind::Since(_)) {
                    if let Value::Dur(d) = constant(other) {
                        since_durations.insert(d);
                    }
                }
            }
            collect_thresholds(a, windows, since_durations);
            collect_thresholds(b, windows, since_durations);
        }
        ExprKind::Agg { sel, window, .. } => {
            if let Window::Dur(w) = window {
                windows.insert(*w);
            }
            collect_selector(sel, windows, since_durations);
        }
        ExprKind::Last { sel, .. } | ExprKind::Since(sel) | ExprKind::EventTime { sel, .. } => {
            collect_selector(sel, windows, since_durations)
        }
        // Specs over `now` are evaluated at every tick (see `run`).
        ExprKind::Now => {}
        ExprKind::Distance(args) => args.iter().for_each(|a| collect_thresholds(a, windows, since_durations)),
        ExprKind::Steps { sels, window } => {
            windows.insert(*window);
            for s in sels {
                collect_selector(s, windows, since_durations);
            }
        }
        ExprKind::Inside(a, b, _) => {
            collect_thresholds(a, windows, since_durations);
            collect_thresholds(b, windows, since_durations);
        }
        ExprKind::Time(a) | ExprKind::Clock { time: a, zone: None, .. } => collect_thresholds(a, windows, since_durations),
        ExprKind::Clock {
            time: a, zone: Some(b), ..
        } => {
            collect_thresholds(a, windows, since_durations);
            collect_thresholds(b, windows, since_durations);
        }
    }
}

fn collect_selector(sel: &Selector, windows: &mut BTreeSet<u64>, since_durations: &mut BTreeSet<i64>) {
    if let Some(f) = &sel.filter {
        collect_thresholds(f, windows, since_durations);
    }
}

/// The value of a constant expression (the `D` of `since(sel) OP D`).
fn constant(expr: &Expr) -> Value {
    let none: Vec<&Event> = Vec::new();
    let spec = Spec::default();
    let globals = Globals::default();
    let mut ctx = Ctx {
        spec: &spec,
        t: 0,
        events: &none,
        memo: Vec::new(),
        profile: String::new(),
        globals: &globals,
    };
    ctx.eval(expr, None)
}

// ---------------------------------------------------------------------------
// Identity (SPEC §2), rebuilt for one tick.

struct UnionFind {
    parent: Vec<usize>,
}

impl UnionFind {
    fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.parent[ra.max(rb)] = ra.min(rb);
        }
    }
}

/// Every id an event names: its `userId`, its `anonymousId`, the ends of
/// its links.
fn ids_named(ev: &Event) -> Vec<Id> {
    let mut ids = ev.named_ids();
    ids.extend(ev.links().into_iter().flat_map(|(a, b)| [a, b]));
    ids
}

/// The visible events of tick `t` grouped by the profile they belong to.
fn profiles_at<'e>(events: &'e [Accepted], t: u64, requests: &[(u64, Request)]) -> BTreeMap<Id, Vec<&'e Event>> {
    resolve(events, t, requests).0
}

/// Identity at tick `t` (SPEC §2, with §7's requests in effect): the
/// visible events by profile, and every component's ids.
///
/// Forgetting ids at `f`: an event naming any of them that takes effect at
/// or after `f` is dropped whole (suppressed, as if never read); from `f`
/// on, the ids are gone from the graph with every link touching them, and
/// the events anchored at them count for no one. Other ids an earlier event
/// named stay. Unlinking: from its tick the link between the two counts for
/// nothing.
fn resolve<'e>(events: &'e [Accepted], t: u64, requests: &[(u64, Request)]) -> (BTreeMap<Id, Vec<&'e Event>>, Vec<BTreeSet<Id>>) {
    let mut forgotten_at: BTreeMap<u64, u64> = BTreeMap::new();
    let mut unlinked: BTreeSet<(u64, u64)> = BTreeSet::new();
    for (at, r) in requests {
        match r {
            Request::Forget(keys) => {
                for k in keys {
                    let f = forgotten_at.entry(*k).or_insert(*at);
                    *f = (*f).min(*at);
                }
            }
            Request::Unlink(a, b) if *at <= t => {
                unlinked.insert((*a, *b));
                unlinked.insert((*b, *a));
            }
            Request::Unlink(..) => {}
        }
    }
    let gone = |id: &Id| forgotten_at.get(&id.key()).is_some_and(|f| *f <= t);
    let read: Vec<&Accepted> = events
        .iter()
        .filter(|a| a.effect <= t)
        .filter(|a| {
            !ids_named(&a.ev)
                .iter()
                .any(|id| forgotten_at.get(&id.key()).is_some_and(|f| *f <= a.effect))
        })
        .collect();
    let mut index: BTreeMap<Id, usize> = BTreeMap::new();
    fn intern(id: Id, index: &mut BTreeMap<Id, usize>) -> usize {
        let n = index.len();
        *index.entry(id).or_insert(n)
    }
    let mut links = Vec::new();
    let mut eligible = BTreeSet::new();
    for a in &read {
        for id in a.ev.named_ids().into_iter().filter(|id| !gone(id)) {
            intern(id.clone(), &mut index);
            eligible.insert(id);
        }
        for (x, y) in a.ev.links() {
            if gone(&x) || gone(&y) {
                continue;
            }
            let cut = unlinked.contains(&(x.key(), y.key()));
            let (ix, iy) = (intern(x, &mut index), intern(y, &mut index));
            if !cut {
                links.push((ix, iy));
            }
        }
    }
    let visible: Vec<&Event> = read.iter().map(|a| &a.ev).filter(|ev| !gone(&ev.anchor())).collect();
    let mut uf = UnionFind {
        parent: (0..index.len()).collect(),
    };
    for (a, b) in links {
        uf.union(a, b);
    }
    // the profile id of a component: its smallest eligible id (Id's Ord)
    let mut profile_of_root: HashMap<usize, Id> = HashMap::new();
    for id in &eligible {
        let root = uf.find(index[id]);
        profile_of_root.entry(root).or_insert_with(|| id.clone()); // ascending order: first is smallest
    }
    // Every component with an eligible id is a profile (§2), even one no
    // event counts for (an id unlinked from the anchor of its events).
    let mut profiles: BTreeMap<Id, Vec<&Event>> = profile_of_root.values().map(|p| (p.clone(), Vec::new())).collect();
    for ev in visible {
        let root = uf.find(index[&ev.anchor()]);
        let profile = profile_of_root[&root].clone();
        profiles.entry(profile).or_default().push(ev);
    }
    let mut components: BTreeMap<usize, BTreeSet<Id>> = BTreeMap::new();
    for id in index.keys() {
        let root = uf.find(index[id]);
        components.entry(root).or_default().insert(id.clone());
    }
    (profiles, components.into_values().collect())
}

/// The population-level values of one tick.
#[derive(Default)]
struct Globals {
    /// By the percentile node's debug text.
    percentiles: HashMap<String, Value>,
    /// `[r, f, m, segment]` of each scored profile.
    rfm: HashMap<String, [Value; 4]>,
    /// The cluster of each clustered profile, per clustering name.
    clusters: HashMap<(String, String), u32>,
    /// `predict.NAME` of each profile that has a prediction, per model name.
    predictions: HashMap<(String, String), f64>,
}

/// Feature vectors by profile id.
type Population = BTreeMap<String, Vec<f64>>;

/// Each clustering's model and the population it was trained on.
pub struct Models {
    models: Vec<Option<(KMeans, Population)>>,
    /// Each predictive model's latest fit.
    fits: Vec<Option<Logit>>,
}

impl Models {
    fn new(spec: &Spec) -> Models {
        Models {
            models: vec![None; spec.clusterings.len()],
            fits: vec![None; spec.models.len()],
        }
    }
}

/// SPEC §4's sampling of a model's training profiles, from its words.
fn sampled(model: &str, sample: f64, profile: &str) -> bool {
    let bytes = [model.as_bytes(), &[0], profile.as_bytes()].concat();
    ((xxhash_rust::xxh3::xxh3_64(&bytes) % 1_000_000) as f64) < sample * 1e6
}

/// All of `features` of a profile's events at `t`, when every one is a number.
fn feature_values(spec: &Spec, t: u64, evs: &[&Event], features: &[Expr]) -> Option<Vec<f64>> {
    features
        .iter()
        .map(|f| plain_eval(spec, t, evs, f).as_f64().filter(|x| x.is_finite()).map(|x| x + 0.0))
        .collect()
}

/// Refits every model due at `t` from the events, then predicts for every
/// profile of `profiles` (the universe at `t`) with all the features.
fn predictions_at(
    spec: &Spec,
    events: &[Accepted],
    profiles: &BTreeMap<Id, Vec<&Event>>,
    t: u64,
    models: &mut Models,
    requests: &[(u64, Request)],
) -> HashMap<(String, String), f64> {
    let mut out = HashMap::new();
    for (m, def) in spec.models.iter().enumerate() {
        if t > 0 && t.is_multiple_of(def.refresh) && t >= def.horizon {
            let s = t - def.horizon;
            let then = profiles_at(events, s, requests);
            let mut examples = Vec::new();
            for (id, evs) in &then {
                let text = id.to_string();
                let Some(now_evs) = profiles.get(id) else { continue };
                if !sampled(&def.name, def.sample, &text) {
                    continue;
                }
                let Some(x) = feature_values(spec, s, evs, &def.features) else {
                    continue;
                };
                let y = truthy(&plain_eval(spec, t, now_evs, &def.label));
                examples.push(Example { x, y });
            }
            sort_examples(&mut examples);
            if let Some(fit) = (!examples.is_empty()).then(|| Logit::fit(&examples, def.l2)).flatten() {
                models.fits[m] = Some(fit);
            }
        }
        let Some(fit) = &models.fits[m] else { continue };
        for (id, evs) in profiles {
            if let Some(x) = feature_values(spec, t, evs, &def.features) {
                out.insert((def.name.clone(), id.to_string()), fit.predict(&x));
            }
        }
    }
    out
}

/// Whether `spec` reads anything computed over all profiles.
pub fn has_population_terms(spec: &Spec) -> bool {
    let mut found = false;
    for root in spec.segments.iter().map(|s| &s.when).chain(spec.scores.iter().map(|s| &s.expr)) {
        shoal::spec::check::visit(root, &mut |e| {
            found |= matches!(
                e.kind,
                ExprKind::Percentile(..) | ExprKind::Rfm(_) | ExprKind::Cluster(_) | ExprKind::Predict(_)
            )
        });
    }
    found
}

/// A profile's evaluation context with no population values (for the
/// arguments of percentiles, RFM metrics and features: event terms only).
fn plain_eval(spec: &Spec, t: u64, evs: &[&Event], expr: &Expr) -> Value {
    let globals = Globals::default();
    let mut ctx = Ctx {
        spec,
        t,
        events: evs,
        memo: vec![None; spec.segments.len()],
        profile: String::new(),
        globals: &globals,
    };
    ctx.eval(expr, None)
}

/// `x < y` for the RFM rank rule: numbers only; exactly when both are exact.
fn rfm_less(x: &Value, y: &Value, as_floats: bool) -> bool {
    match (x, y) {
        (Value::Num(a), Value::Num(b)) if !as_floats => a < b,
        (a, b) if a.is_number() && b.is_number() => a.as_f64().unwrap() + 0.0 < b.as_f64().unwrap() + 0.0,
        _ => false,
    }
}

fn globals_at(spec: &Spec, profiles: &BTreeMap<Id, Vec<&Event>>, t: u64, models: &mut Models) -> Globals {
    let mut g = Globals::default();
    // Percentiles: every one written in a segment or a score.
    let mut nodes: Vec<Expr> = Vec::new();
    let roots = spec.segments.iter().map(|s| &s.when).chain(spec.scores.iter().map(|s| &s.expr));
    for root in roots {
        shoal::spec::check::visit(root, &mut |e| {
            if matches!(e.kind, ExprKind::Percentile(..)) {
                nodes.push(e.clone());
            }
        });
    }
    for node in nodes {
        let ExprKind::Percentile(arg, p) = &node.kind else { unreachable!() };
        let mut xs: Vec<f64> = profiles
            .values()
            .filter_map(|evs| plain_eval(spec, t, evs, arg).as_f64().map(|x| x + 0.0))
            .collect();
        xs.sort_by(|a, b| a.total_cmp(b));
        let v = if xs.is_empty() {
            Value::Missing
        } else {
            // nearest rank: the smallest value with at least P% of the values at or below it
            let n = xs.len() as f64;
            let rank = ((p * n / 100.0).ceil() as usize).max(1).min(xs.len());
            float(xs[rank - 1])
        };
        g.percentiles.insert(format!("{:?}", node.kind), v);
    }
    // RFM over the profiles with a purchase in the window.
    if let Some(rfm) = &spec.rfm {
        let mut scored: Vec<(String, [Value; 3])> = Vec::new();
        for (profile, evs) in profiles {
            let buys: Vec<&Event> = evs
                .iter()
                .filter(|e| e.kind == EventType::Track && e.name.as_deref() == Some(rfm.purchase.as_str()))
                .filter(|e| match rfm.window {
                    Window::Lifetime => true,
                    Window::Dur(w) => e.time.saturating_add(w) > t,
                })
                .copied()
                .collect();
            if buys.is_empty() {
                continue;
            }
            let r = Value::Num(Dec::from_int(buys.iter().map(|e| e.time).max().unwrap() as i64));
            let f = Value::Num(Dec::from_int(buys.len() as i64));
            let m = aggregate(AggKind::Sum, &buys, Some(&rfm.revenue));
            scored.push((profile.to_string(), [r, f, m]));
        }
        let n = scored.len();
        let mut scores = vec![[0usize; 3]; n];
        for j in 0..3 {
            let as_floats = scored.iter().any(|(_, x)| matches!(x[j], Value::Float(_)));
            for (c, (_, x)) in scored.iter().enumerate() {
                let smaller = scored.iter().filter(|(_, y)| rfm_less(&y[j], &x[j], as_floats)).count();
                scores[c][j] = 1 + 5 * smaller / n;
            }
        }
        for ((profile, _), s) in scored.into_iter().zip(scores) {
            let num = |x: usize| Value::Num(Dec::from_int(x as i64));
            let segment = Value::Str(rfm.grid[s[0] - 1][s[1] - 1].as_str().into());
            g.rfm.insert(profile, [num(s[0]), num(s[1]), num(s[2]), segment]);
        }
    }
    // Clusterings: retrain when due, then assign every profile with all features.
    for (c, def) in spec.clusterings.iter().enumerate() {
        let mut population: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (profile, evs) in profiles {
            let xs: Option<Vec<f64>> = def
                .features
                .iter()
                .map(|f| plain_eval(spec, t, evs, f).as_f64().map(|x| x + 0.0))
                .collect();
            if let Some(xs) = xs {
                population.insert(profile.to_string(), xs);
            }
        }
        let slot = &mut models.models[c];
        let due = match slot {
            None => true,
            Some((_, trained)) => t.is_multiple_of(def.refresh) && *trained != population,
        };
        if due && !population.is_empty() {
            let points: Vec<Vec<f64>> = population.values().cloned().collect();
            let model = KMeans::fit(&points, def.k, def.seed, slot.as_ref().map(|(m, _)| m));
            *slot = Some((model, population.clone()));
        }
        if let Some((model, _)) = slot {
            for (profile, xs) in &population {
                g.clusters.insert((def.name.clone(), profile.clone()), model.assign(xs));
            }
        }
    }
    g
}

/// Every (segment index, profile id text) that is a member at tick `t`.
fn members_at(spec: &Spec, events: &[Accepted], t: u64, models: &mut Models, requests: &[(u64, Request)]) -> BTreeSet<(usize, String)> {
    let mut members = BTreeSet::new();
    // The universe: profiles with at least one event in effect at `t`.
    let profiles = profiles_at(events, t, requests);
    let mut globals = globals_at(spec, &profiles, t, models);
    globals.predictions = predictions_at(spec, events, &profiles, t, models, requests);
    for (profile, evs) in profiles {
        let mut ctx = Ctx {
            spec,
            t,
            events: &evs,
            memo: vec![None; spec.segments.len()],
            profile: profile.to_string(),
            globals: &globals,
        };
        for seg in 0..spec.segments.len() {
            if ctx.member(seg) {
                members.insert((seg, profile.to_string()));
            }
        }
    }
    members
}

// ---------------------------------------------------------------------------
// The `when` language (SPEC §4) for one profile at one tick.

/// One profile at one tick.
struct Ctx<'a> {
    spec: &'a Spec,
    t: u64,
    /// The profile's visible events (effect tick <= t, hence time <= t).
    events: &'a [&'a Event],
    /// Memberships of this profile at this tick, filled on demand.
    memo: Vec<Option<bool>>,
    /// The profile id.
    profile: String,
    /// Percentiles, RFM and clusters at this tick.
    globals: &'a Globals,
}

/// One side of a comparison: a value, or the infinite `since` of no event.
enum Operand {
    Val(Value),
    Infinite,
}

fn truthy(v: &Value) -> bool {
    // a value in boolean position means `== true`
    v.cmp_op(CmpOp::Eq, &Value::Bool(true))
}

fn float(f: f64) -> Value {
    if f.is_finite() {
        Value::Float(shoal::core::value::Float(f))
    } else {
        Value::Missing
    }
}

fn path_value(ev: &Event, path: &Path) -> Value {
    ev.get(&path.0).map(Value::from_json).unwrap_or(Value::Missing)
}

fn is_scalar(j: &Json) -> bool {
    matches!(j, Json::Bool(_) | Json::Number(_) | Json::String(_))
}

fn json_text(j: &Json) -> String {
    serde_json::to_string(j).expect("JSON serializes")
}

fn apply(op: CmpOp, o: Ordering) -> bool {
    match op {
        CmpOp::Ge => o != Ordering::Less,
        CmpOp::Gt => o == Ordering::Greater,
        CmpOp::Le => o != Ordering::Greater,
        CmpOp::Lt => o == Ordering::Less,
        CmpOp::Eq => o == Ordering::Equal,
        CmpOp::Ne => o != Ordering::Equal,
    }
}

/// Picks, among `(time, json)` candidates, the one with the largest time,
/// ties broken by the greatest JSON text bytewise.
fn latest<'j>(candidates: impl Iterator<Item = (u64, &'j Json)>) -> Option<&'j Json> {
    candidates
        .map(|(e, j)| (e, json_text(j), j))
        .max_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.as_bytes().cmp(b.1.as_bytes())))
        .map(|c| c.2)
}

/// A scalar value as `distinct` tells values apart.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum DistinctKey {
    Bool(bool),
    Num(Dec),
    Float(u64),
    Str(String),
}

impl<'a> Ctx<'a> {
    fn member(&mut self, seg: usize) -> bool {
        if let Some(m) = self.memo[seg] {
            return m;
        }
        let spec = self.spec;
        let m = truthy(&self.eval(&spec.segments[seg].when, None));
        self.memo[seg] = Some(m);
        m
    }

    /// Whether `ev` is matched by `sel` (event kind, name, `where` filter).
    fn matches(&mut self, sel: &Selector, ev: &Event) -> bool {
        let kind_ok = match &sel.event {
            EventSel::Track(name) => ev.kind == EventType::Track && ev.name.as_deref() == Some(name.as_str()),
            EventSel::Page(None) => ev.kind == EventType::Page,
            EventSel::Page(Some(name)) => ev.kind == EventType::Page && ev.name.as_deref() == Some(name.as_str()),
            EventSel::Screen(None) => ev.kind == EventType::Screen,
            EventSel::Screen(Some(name)) => ev.kind == EventType::Screen && ev.name.as_deref() == Some(name.as_str()),
            EventSel::Identify => ev.kind == EventType::Identify,
            EventSel::Any => ev.kind != EventType::Group,
        };
        kind_ok
            && match &sel.filter {
                None => true,
                Some(f) => truthy(&self.eval(f, Some(ev))),
            }
    }

    /// The profile's visible events matched by `sel` inside `window`.
    fn selected(&mut self, sel: &Selector, window: Window) -> Vec<&'a Event> {
        let t = self.t;
        let events = self.events;
        let mut out = Vec::new();
        for ev in events {
            debug_assert!(ev.time <= t);
            let in_window = match window {
                Window::Lifetime => true,
                Window::Dur(w) => ev.time.saturating_add(w) > t, // t - W < e <= t
            };
            if in_window && self.matches(sel, ev) {
                out.push(*ev);
            }
        }
        out
    }

    fn operand(&mut self, expr: &Expr, ev: Option<&Event>) -> Operand {
        match &expr.kind {
            ExprKind::Since(sel) => match self.since(sel) {
                Some(d) => Operand::Val(Value::Dur(d)),
                None => Operand::Infinite,
            },
            _ => Operand::Val(self.eval(expr, ev)),
        }
    }

    /// `now - e` of the latest matching event; `None` is infinite.
    fn since(&mut self, sel: &Selector) -> Option<i64> {
        let latest = self.selected(sel, Window::Lifetime).iter().map(|e| e.time).max()?;
        Some(self.t as i64 - latest as i64)
    }

    fn eval(&mut self, expr: &Expr, ev: Option<&Event>) -> Value {
        match &expr.kind {
            ExprKind::Num(d) => Value::Num(*d),
            ExprKind::Str(s) => Value::Str(s.as_str().into()),
            ExprKind::Dur(ms) => Value::Dur(*ms as i64),
            ExprKind::Bool(b) => Value::Bool(*b),
            ExprKind::Path(p) => ev.map(|e| path_value(e, p)).unwrap_or(Value::Missing),
            ExprKind::Neg(a) => self.eval(a, ev).neg(),
            ExprKind::Abs(a) => self.eval(a, ev).abs(),
            ExprKind::Sqrt(a) => self.eval(a, ev).sqrt(),
            ExprKind::Not(a) => Value::Bool(!truthy(&self.eval(a, ev))),
            ExprKind::And(a, b) => {
                let (x, y) = (truthy(&self.eval(a, ev)), truthy(&self.eval(b, ev)));
                Value::Bool(x && y)
            }
            ExprKind::Or(a, b) => {
                let (x, y) = (truthy(&self.eval(a, ev)), truthy(&self.eval(b, ev)));
                Value::Bool(x || y)
            }
            ExprKind::Arith(op, a, b) => {
                let (x, y) = (self.eval(a, ev), self.eval(b, ev));
                x.arith(*op, &y)
            }
            ExprKind::Cmp(op, a, b) => {
                let (x, y) = (self.operand(a, ev), self.operand(b, ev));
                let holds = match (x, y) {
                    (Operand::Val(x), Operand::Val(y)) => x.cmp_op(*op, &y),
                    // infinite is greater than any duration; missing compares false
                    (Operand::Infinite, Operand::Val(Value::Dur(_))) => apply(*op, Ordering::Greater),
                    (Operand::Val(Value::Dur(_)), Operand::Infinite) => apply(*op, Ordering::Less),
                    (Operand::Infinite, Operand::Infinite) => apply(*op, Ordering::Equal),
                    _ => false,
                };
                Value::Bool(holds)
            }
            ExprKind::Since(sel) => match self.since(sel) {
                Some(d) => Value::Dur(d),
                None => Value::Missing,
            },
            ExprKind::Agg { kind, sel, path, window } => {
                let evs = self.selected(sel, *window);
                aggregate(*kind, &evs, path.as_ref())
            }
            ExprKind::Last { sel, path } => {
                let evs = self.selected(sel, Window::Lifetime);
                let value = latest(
                    evs.iter()
                        .filter_map(|e| e.get(&path.0).filter(|j| is_scalar(j)).map(|j| (e.time, j))),
                );
                value.map(Value::from_json).unwrap_or(Value::Missing)
            }
            ExprKind::Trait(name) => {
                let value = latest(
                    self.events
                        .iter()
                        .filter(|e| e.kind == EventType::Identify)
                        .filter_map(|e| e.traits.get(name).map(|j| (e.time, j))),
                );
                // set to null (or not a scalar) it is unset
                value.map(Value::from_json).unwrap_or(Value::Missing)
            }
            ExprKind::Now => Value::Time(self.t as i64),
            ExprKind::Time(a) => {
                let v = self.eval(a, ev);
                ref_time(&v)
            }
            ExprKind::EventTime { sel, first } => {
                let times = self.selected(sel, Window::Lifetime).into_iter().map(|e| e.time);
                let t = if *first { times.min() } else { times.max() };
                t.map(|t| Value::Time(t as i64)).unwrap_or(Value::Missing)
            }
            ExprKind::Steps { sels, window } => {
                // The events inside (now - D, now], each with the steps it matches.
                let mut evs: Vec<(u64, Vec<bool>)> = Vec::new();
                for e in self.selected(
                    &Selector {
                        event: EventSel::Any,
                        filter: None,
                    },
                    Window::Dur(*window),
                ) {
                    let matched: Vec<bool> = sels.iter().map(|s| self.matches(s, e)).collect();
                    if matched.contains(&true) {
                        evs.push((e.time, matched));
                    }
                }
                Value::Num(Dec::from_int(ref_steps(&evs, sels.len()) as i64))
            }
            ExprKind::Distance(args) => {
                let d: Vec<Option<f64>> = args.iter().map(|a| self.eval(a, ev).as_f64()).collect();
                match (d[0], d[1], d[2], d[3]) {
                    (Some(a), Some(b), Some(c), Some(d)) => ref_distance(a, b, c, d),
                    _ => Value::Missing,
                }
            }
            ExprKind::Inside(lat, lon, zone) => {
                let (lat, lon) = (self.eval(lat, ev).as_f64(), self.eval(lon, ev).as_f64());
                let zone = self.spec.zones.iter().find(|z| &z.name == zone).expect("a checked zone");
                Value::Bool(match (lat, lon) {
                    (Some(lat), Some(lon)) => ref_inside(&zone.rings, lat, lon),
                    _ => false,
                })
            }
            ExprKind::Clock { part, time, zone } => {
                let time = self.eval(time, ev);
                let zone = zone.as_ref().map(|z| self.eval(z, ev));
                ref_clock(*part, &time, zone.as_ref())
            }
            ExprKind::InSegment(name) => {
                let seg = self.spec.segments.iter().position(|s| &s.name == name);
                let seg = seg.unwrap_or_else(|| panic!("in_segment of unknown segment {name:?}"));
                Value::Bool(self.member(seg))
            }
            ExprKind::Score(name) => {
                let spec = self.spec;
                let score = spec.scores.iter().find(|s| &s.name == name).expect("a known score");
                self.eval(&score.expr, ev)
            }
            ExprKind::Percentile(..) => self.globals.percentiles[&format!("{:?}", expr.kind)].clone(),
            ExprKind::Rfm(field) => {
                let i = match field {
                    RfmField::R => 0,
                    RfmField::F => 1,
                    RfmField::M => 2,
                    RfmField::Segment => 3,
                };
                self.globals.rfm.get(&self.profile).map(|r| r[i].clone()).unwrap_or(Value::Missing)
            }
            ExprKind::Cluster(name) => self
                .globals
                .clusters
                .get(&(name.clone(), self.profile.clone()))
                .map(|&c| Value::Num(Dec::from_int(c as i64)))
                .unwrap_or(Value::Missing),
            ExprKind::Predict(name) => self
                .globals
                .predictions
                .get(&(name.clone(), self.profile.clone()))
                .map(|&p| float(p))
                .unwrap_or(Value::Missing),
        }
    }
}

/// `time(v)` from the SPEC's words: a time; a string in a `timestamp`
/// format (RFC 3339, finer than ms truncated, not before 1970); integer
/// epoch milliseconds; else missing. Times stop at the end of 9999.
fn ref_time(v: &Value) -> Value {
    const END: i64 = 253_402_300_799_999;
    let ms = match v {
        Value::Time(ms) => Some(*ms),
        Value::Str(s) => time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .ok()
            .map(|t| (t.unix_timestamp_nanos().div_euclid(1_000_000)) as i64),
        Value::Num(d) => {
            let text = d.to_string();
            text.parse::<i64>().ok()
        }
        _ => None,
    };
    match ms {
        Some(ms) if (0..=END).contains(&ms) => Value::Time(ms),
        _ => Value::Missing,
    }
}

/// SPEC §4 `steps`, from its words: the largest `k` such that distinct
/// events `e1 … ek` exist, `ei` matching step `i`, with `t1 <= … <= tk`.
///
/// The events of one time may take steps in any order among themselves,
/// and those of a later time only later steps: so a choice is how many
/// steps each time's events take, in time order. The set of step counts
/// reachable after each time is carried forward (every count, not only the
/// largest), and whether a time's events can take steps `k+1 … k+m` is an
/// exhaustive search over those few events.
fn ref_steps(evs: &[(u64, Vec<bool>)], n: usize) -> usize {
    // Whether `events` (distinct) can take steps `from .. to` between them.
    fn can_take(events: &[&Vec<bool>], used: &mut Vec<bool>, step: usize, to: usize) -> bool {
        if step == to {
            return true;
        }
        for i in 0..events.len() {
            if !used[i] && events[i][step] {
                used[i] = true;
                let ok = can_take(events, used, step + 1, to);
                used[i] = false;
                if ok {
                    return true;
                }
            }
        }
        false
    }
    let mut times: Vec<u64> = evs.iter().map(|e| e.0).collect();
    times.sort_unstable();
    times.dedup();
    let mut reachable: BTreeSet<usize> = BTreeSet::from([0]);
    for t in times {
        let events: Vec<&Vec<bool>> = evs.iter().filter(|e| e.0 == t).map(|e| &e.1).collect();
        let mut next = reachable.clone();
        for &k in &reachable {
            for to in k + 1..=n {
                if can_take(&events, &mut vec![false; events.len()], k, to) {
                    next.insert(to);
                }
            }
        }
        reachable = next;
    }
    reachable.into_iter().max().unwrap_or(0)
}

/// SPEC §4 `distance`: haversine on a sphere of 6371.0088 km; missing out
/// of range.
fn ref_distance(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> Value {
    if lat1.abs() > 90.0 || lat2.abs() > 90.0 || lon1.abs() > 180.0 || lon2.abs() > 180.0 {
        return Value::Missing;
    }
    let rad = std::f64::consts::PI / 180.0;
    let h = ((lat2 - lat1) * rad / 2.0).sin().powi(2) + (lat1 * rad).cos() * (lat2 * rad).cos() * ((lon2 - lon1) * rad / 2.0).sin().powi(2);
    Value::Float(shoal::core::value::Float(2.0 * 6371.0088 * h.min(1.0).sqrt().asin()))
}

/// SPEC §4 `inside`, the even-odd rule exactly as the SPEC writes it, over
/// every ring (each closed implicitly).
fn ref_inside(rings: &[Vec<(f64, f64)>], lat: f64, lon: f64) -> bool {
    let mut toggles = 0;
    for ring in rings {
        let n = ring.len();
        for i in 0..n {
            let (a, b) = (ring[i], ring[(i + 1) % n]);
            if (a.0 > lat) != (b.0 > lat) && lon < (b.1 - a.1) * (lat - a.0) / (b.0 - a.0) + a.1 {
                toggles += 1;
            }
        }
    }
    toggles % 2 == 1
}

/// `hour(t, zone)` / `weekday(t, zone)` through jiff's zoned date-time (the
/// engine computes offsets itself): UTC without a zone; an unknown zone or
/// a `t` that is not a time is missing.
fn ref_clock(part: shoal::spec::ast::ClockPart, time: &Value, zone: Option<&Value>) -> Value {
    let Value::Time(ms) = time else { return Value::Missing };
    let zone = match zone {
        None => jiff::tz::TimeZone::UTC,
        Some(Value::Str(name)) => match jiff::tz::TimeZone::get(name) {
            Ok(z) => z,
            Err(_) => return Value::Missing,
        },
        Some(_) => return Value::Missing,
    };
    let Ok(at) = jiff::Timestamp::from_millisecond(*ms) else {
        return Value::Missing;
    };
    let local = at.to_zoned(zone);
    let n = match part {
        shoal::spec::ast::ClockPart::Hour => local.hour() as i64,
        shoal::spec::ast::ClockPart::Weekday => local.weekday().to_monday_zero_offset() as i64,
    };
    Value::Num(Dec::from_int(n))
}

/// `count`, `sum`, `avg`, `min`, `max`, `var`, `distinct` over the selected events.
fn aggregate(kind: AggKind, evs: &[&Event], path: Option<&Path>) -> Value {
    if kind == AggKind::Count {
        return Value::Num(Dec::from_int(evs.len() as i64));
    }
    let path = path.expect("every aggregate but count has a path");
    let values: Vec<Value> = evs.iter().map(|e| path_value(e, path)).collect();
    if kind == AggKind::Distinct {
        let mut seen = BTreeSet::new();
        for v in values {
            let key = match v {
                Value::Bool(b) => DistinctKey::Bool(b),
                Value::Num(d) => DistinctKey::Num(d),
                Value::Float(f) => DistinctKey::Float(f.0.to_bits()),
                Value::Str(s) => DistinctKey::Str(s.to_string()),
                _ => continue,
            };
            seen.insert(key);
        }
        return Value::Num(Dec::from_int(seen.len() as i64));
    }
    // The numeric aggregates skip whatever is not a number.
    let nums: Vec<Value> = values.into_iter().filter(|v| v.is_number()).collect();
    let exact: Option<Vec<i128>> = nums.iter().map(|v| if let Value::Num(d) = v { Some(d.0) } else { None }).collect();
    let exact_sum: Option<i128> = exact.as_ref().and_then(|xs| xs.iter().try_fold(0i128, |s, x| s.checked_add(*x)));
    // floats, in a canonical order so that the result never depends on input order
    let mut floats: Vec<f64> = nums.iter().filter_map(|v| v.as_f64()).collect();
    floats.sort_by(|a, b| a.total_cmp(b));
    let n = nums.len();
    match kind {
        AggKind::Sum => match (&exact, exact_sum) {
            (Some(_), Some(s)) => Value::Num(Dec(s)),
            (Some(_), None) => Value::Missing, // overflow
            (None, _) => float(floats.iter().sum()),
        },
        AggKind::Avg if n == 0 => Value::Missing,
        AggKind::Avg => match exact_sum {
            Some(s) => float(s as f64 / (shoal::core::value::SCALE as f64 * n as f64)),
            None => float(floats.iter().sum::<f64>() / n as f64),
        },
        AggKind::Min | AggKind::Max => {
            let mut best: Option<Value> = None;
            for v in nums {
                let better = match &best {
                    None => true,
                    Some(b) => {
                        let o = v.compare(b).unwrap_or(Ordering::Equal);
                        if kind == AggKind::Min {
                            o == Ordering::Less
                        } else {
                            o == Ordering::Greater
                        }
                    }
                };
                if better {
                    best = Some(v);
                }
            }
            best.unwrap_or(Value::Missing)
        }
        AggKind::Var if n == 0 => Value::Missing,
        AggKind::Var => {
            // exactly when possible: (n Σx² - (Σx)²) / n², in units of 1e-12
            let exact_var = exact.as_ref().and_then(|xs| {
                let s1 = exact_sum?;
                let s2 = xs.iter().try_fold(0i128, |s, x| s.checked_add(x.checked_mul(*x)?))?;
                (n as i128).checked_mul(s2)?.checked_sub(s1.checked_mul(s1)?)
            });
            match exact_var {
                Some(num) => float(num as f64 / ((n as f64) * (n as f64) * 1e12)),
                None => {
                    let mean = floats.iter().sum::<f64>() / n as f64;
                    float(floats.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64)
                }
            }
        }
        AggKind::Count | AggKind::Distinct => unreachable!(),
    }
}

// ---------------------------------------------------------------------------
// A sample of the profiles, for inputs too large to evaluate whole.

/// Like [`evaluate_sparse`], restricted to the profiles made of ids that
/// satisfy `keep`: the lines it writes are exactly the lines
/// [`evaluate_sparse`] writes for those profiles, provided the kept ids are
/// closed under identity links (a union of whole connected components of the
/// final id graph). Then a kept profile's identity, universe membership,
/// terms and `in_segment` depend only on its own component's events.
///
/// The clock, dedupe, late effect ticks and the final clock depend on every
/// line, so the pass over the input is the same full pass as always. Only
/// then are the accepted events cut down to those whose ids all satisfy
/// `keep` (an event with some ids kept and some not means the kept set is not
/// closed: that panics), and those are evaluated one final component at a
/// time, at that component's own change points. A component's memberships
/// can only change at its own change points, so the diff between its
/// consecutive change points is the diff between the global ones.
pub fn evaluate_sample(spec: &Spec, input: &[u8], opts: &RefOptions, keep: &dyn Fn(&Id) -> bool) -> RefOutput {
    assert!(opts.tick > 0, "tick must be positive");
    assert!(
        !has_population_terms(spec),
        "a sample of profiles cannot be evaluated on its own when percentiles, scores, RFM or clusters read the whole population"
    );
    let tick = opts.tick;
    let ing = ingest(input, opts);
    let mut out = RefOutput {
        lines: Vec::new(),
        dead: ing.dead,
    };
    let Some((first, last)) = ing.span(opts) else {
        return out; // nothing is written
    };

    // The kept events, grouped by their final component.
    let mut index: HashMap<Id, usize> = HashMap::new();
    let mut uf = UnionFind { parent: Vec::new() };
    let mut kept: Vec<(usize, Accepted)> = Vec::new();
    for a in ing.accepted {
        let mut ids = a.ev.named_ids();
        let links = a.ev.links();
        ids.extend(links.iter().flat_map(|(x, y)| [x.clone(), y.clone()]));
        let n_kept = ids.iter().filter(|id| keep(id)).count();
        if n_kept == 0 {
            continue;
        }
        assert!(
            n_kept == ids.len(),
            "the kept ids are not closed under identity links: {:?}",
            ids.iter().map(|id| (id.to_string(), keep(id))).collect::<Vec<_>>()
        );
        let mut node = |id: Id, uf: &mut UnionFind| {
            let n = index.len();
            *index.entry(id).or_insert_with(|| {
                uf.parent.push(n);
                n
            })
        };
        let anchor = node(a.ev.anchor(), &mut uf);
        for (x, y) in links {
            let (x, y) = (node(x, &mut uf), node(y, &mut uf));
            uf.union(x, y);
        }
        kept.push((anchor, a));
    }
    let mut components: BTreeMap<usize, Vec<Accepted>> = BTreeMap::new();
    for (anchor, a) in kept {
        components.entry(uf.find(anchor)).or_default().push(a);
    }

    // (tick, segment, profile id, change), every component on its own.
    let mut changes: Vec<(u64, usize, String, &str)> = Vec::new();
    for events in components.values() {
        let mut previous: BTreeSet<(usize, String)> = BTreeSet::new();
        // A spec over `now` may change at any tick: every one is evaluated.
        let points: Vec<u64> = if reads_now(spec) {
            (first / tick..=last / tick).map(|i| i * tick).collect()
        } else {
            change_points(spec, events, tick).into_iter().collect()
        };
        for t in points.into_iter().filter(|t| (first..=last).contains(t)) {
            let current = members_at(spec, events, t, &mut Models::new(spec), &[]);
            for (seg, profile) in current.difference(&previous) {
                changes.push((t, *seg, profile.clone(), "enter"));
            }
            for (seg, profile) in previous.difference(&current) {
                changes.push((t, *seg, profile.clone(), "exit"));
            }
            previous = current;
        }
    }
    // in tick order; within a tick by the segment's order, then by profile id bytes
    changes.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| a.1.cmp(&b.1))
            .then_with(|| a.2.as_bytes().cmp(b.2.as_bytes()))
    });
    let show_ms = tick < 1000;
    for (t, seg, profile, change) in changes {
        out.lines.push(line(spec, &format_time(t, show_ms), seg, &profile, change));
    }
    out
}
