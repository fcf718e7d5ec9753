//! Checks of parsed expressions and specs (SPEC §4): types, the place of
//! `since`, windows and durations against the tick, `in_segment` names and
//! cycles, and the names and places of the scoring terms (`score.`, `rfm.`,
//! `cluster.`, `percentile`).
//!
//! **Two levels of terms.** Event terms (aggregates, `last`, traits) are per
//! profile; `percentile`, `rfm.` and `cluster.` are computed over the whole
//! population from per-profile values. A percentile's argument and a
//! clustering's features must therefore be made of event terms only (scores
//! included, as long as they are themselves made of event terms): the
//! checker refuses a percentile, `rfm.` or `cluster.` inside them. Scores
//! may read other scores, without cycles.
//!
//! Types: number, duration, string, `true`/`false` (a literal), condition (a
//! formula: comparison, `and`/`or`/`not`, `in_segment`) and *any* (`trait.x`,
//! `last(…)` and, inside a `where` filter, event paths: their type is only
//! known at run time, so they compare with anything).
//!
//! **Any in a boolean position.** A value of type any where a condition is
//! expected (a `when`, an operand of `and`/`or`/`not`, a `where` filter), as
//! in `trait.vip and count('x', 1h) > 0`, means `trait.vip == true`. The
//! checker *rewrites* the tree to that comparison (at the same position), so
//! after a successful check every boolean position holds a condition or a
//! `true`/`false` literal and later stages need no special case.
//!
//! All positions here are those of the expression's own source; the caller
//! ([`crate::spec::parse_spec`]) maps them to the TOML file.

use super::ast::{ArithOp, CmpOp, Expr, ExprKind, Path, Pos, Selector, Window};
use super::def::{Segment, Spec, SpecError};
use super::parse::{format_duration, quote};

/// What an expression must produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// A segment's `when`: a condition.
    Condition,
    /// A score's `expr`: a number.
    Number,
    /// A clustering feature: a number made of event terms only.
    Feature,
    /// A model's feature: the same, for `predict.`.
    ModelFeature,
    /// A model's label: a condition made of event terms only.
    Label,
}

/// What the checker needs to know beyond the expression.
pub struct Ctx<'a> {
    /// The tick in milliseconds; windows and durations must be multiples of
    /// it (0 disables that check).
    pub tick_ms: u64,
    /// Whether a segment of this name exists (for `in_segment`).
    pub is_segment: &'a dyn Fn(&str) -> bool,
    /// What `score.`, `rfm.` and `cluster.` may name.
    pub scoring: Scoring<'a>,
    /// The `[[zone]]` names `inside` may name.
    pub zones: &'a [String],
}

/// The scoring names a spec defines.
#[derive(Clone, Copy, Default)]
pub struct Scoring<'a> {
    /// Every `[[score]]` name.
    pub scores: &'a [String],
    /// Scores that read `percentile`, `rfm.` or `cluster.` (directly or
    /// through another score): refused where only event terms may be read.
    pub global_scores: &'a [String],
    /// Whether there is an `[rfm]` block.
    pub rfm: bool,
    /// Every `[[clustering]]` name.
    pub clusterings: &'a [String],
    /// Every `[[model]]` name.
    pub models: &'a [String],
    /// Scores that read `now` (directly or through another score): the
    /// checks on where `now` may appear look through them.
    pub timed_scores: &'a [String],
}

/// Which part of a [`Spec`] an [`Issue`] is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `spec.segments[i].when`.
    Segment(usize),
    /// `spec.scores[i].expr`.
    Score(usize),
    /// `spec.clusterings[c].features[i]`.
    Feature(usize, usize),
    /// `spec.models[m].label`.
    Label(usize),
    /// `spec.models[m].features[i]`.
    ModelFeature(usize, usize),
}

/// An error inside one expression of a spec, at a position of that
/// expression's source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    pub origin: Origin,
    pub error: SpecError,
}

/// Checks every expression of `spec` (rewriting as described in the module
/// documentation) and the `in_segment` graph. Duplicate names and the TOML
/// structure are [`crate::spec::parse_spec`]'s business.
pub fn check(spec: &mut Spec, tick_ms: u64) -> Vec<Issue> {
    let names: Vec<String> = spec.segments.iter().map(|s| s.name.clone()).collect();
    let is_segment = |n: &str| names.iter().any(|m| m == n);
    let scores: Vec<String> = spec.scores.iter().map(|s| s.name.clone()).collect();
    let global_scores = global_scores(spec);
    let timed_scores = timed_scores(spec);
    let clusterings: Vec<String> = spec.clusterings.iter().map(|c| c.name.clone()).collect();
    let models: Vec<String> = spec.models.iter().map(|m| m.name.clone()).collect();
    let zones: Vec<String> = spec.zones.iter().map(|z| z.name.clone()).collect();
    let mut issues = Vec::new();
    let ctx = Ctx {
        tick_ms,
        is_segment: &is_segment,
        scoring: Scoring {
            scores: &scores,
            global_scores: &global_scores,
            rfm: spec.rfm.is_some(),
            clusterings: &clusterings,
            models: &models,
            timed_scores: &timed_scores,
        },
        zones: &zones,
    };
    for (i, seg) in spec.segments.iter_mut().enumerate() {
        for error in check_expr(&mut seg.when, Want::Condition, &ctx) {
            issues.push(Issue {
                origin: Origin::Segment(i),
                error,
            });
        }
    }
    for (i, score) in spec.scores.iter_mut().enumerate() {
        for error in check_expr(&mut score.expr, Want::Number, &ctx) {
            issues.push(Issue {
                origin: Origin::Score(i),
                error,
            });
        }
    }
    for (c, clustering) in spec.clusterings.iter_mut().enumerate() {
        for (i, feature) in clustering.features.iter_mut().enumerate() {
            for error in check_expr(feature, Want::Feature, &ctx) {
                issues.push(Issue {
                    origin: Origin::Feature(c, i),
                    error,
                });
            }
        }
    }
    for (m, model) in spec.models.iter_mut().enumerate() {
        for error in check_expr(&mut model.label, Want::Label, &ctx) {
            issues.push(Issue {
                origin: Origin::Label(m),
                error,
            });
        }
        for (i, feature) in model.features.iter_mut().enumerate() {
            for error in check_expr(feature, Want::ModelFeature, &ctx) {
                issues.push(Issue {
                    origin: Origin::ModelFeature(m, i),
                    error,
                });
            }
        }
    }
    issues.extend(score_cycles(spec));
    issues.extend(segment_cycles(&spec.segments));
    issues
}

/// The scores that read a percentile, `rfm.`, `cluster.` or `now` (a
/// percentile or a feature is computed from values that change only with
/// events), directly or through other scores.
fn global_scores(spec: &Spec) -> Vec<String> {
    scores_reading(spec, &|k| {
        matches!(
            k,
            ExprKind::Percentile(..) | ExprKind::Rfm(_) | ExprKind::Cluster(_) | ExprKind::Predict(_) | ExprKind::Now
        )
    })
}

/// The scores that read `now`, directly or through other scores.
fn timed_scores(spec: &Spec) -> Vec<String> {
    scores_reading(spec, &|k| matches!(k, ExprKind::Now))
}

/// The scores whose expression has a node `leaf` accepts, directly or
/// through other such scores (a fixed point over `score.` references).
fn scores_reading(spec: &Spec, leaf: &dyn Fn(&ExprKind) -> bool) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    loop {
        let before = found.len();
        for s in &spec.scores {
            if !found.contains(&s.name) && reads_through(&s.expr, leaf, &found) {
                found.push(s.name.clone());
            }
        }
        if found.len() == before {
            return found;
        }
    }
}

/// Whether `e` has a node `leaf` accepts, or reads one of `scores`.
fn reads_through(e: &Expr, leaf: &dyn Fn(&ExprKind) -> bool, scores: &[String]) -> bool {
    let mut hit = false;
    visit(e, &mut |x| {
        hit |= match &x.kind {
            ExprKind::Score(n) => scores.contains(n),
            k => leaf(k),
        }
    });
    hit
}

/// Whether `e` reads `now`, directly or through one of `timed_scores`.
fn reads_now_through(e: &Expr, timed_scores: &[String]) -> bool {
    reads_through(e, &|k| matches!(k, ExprKind::Now), timed_scores)
}

/// A score that reads itself, directly or through others, at its first
/// `score.` reference on the cycle.
fn score_cycles(spec: &Spec) -> Vec<Issue> {
    let index = |n: &str| spec.scores.iter().position(|s| s.name == n);
    let edges: Vec<Vec<(usize, Pos)>> = spec
        .scores
        .iter()
        .map(|s| {
            let mut refs = Vec::new();
            visit(&s.expr, &mut |x| {
                if let ExprKind::Score(n) = &x.kind {
                    if let Some(j) = index(n) {
                        refs.push((j, x.pos));
                    }
                }
            });
            refs
        })
        .collect();
    let scc = components(&edges);
    let mut issues = Vec::new();
    let mut reported = vec![false; spec.scores.len()];
    for (i, out) in edges.iter().enumerate() {
        let cyclic = out.iter().any(|&(j, _)| scc[j] == scc[i]);
        if !cyclic || reported[scc[i]] {
            continue;
        }
        reported[scc[i]] = true;
        let pos = out.iter().find(|&&(j, _)| scc[j] == scc[i]).map(|&(_, p)| p).unwrap_or_default();
        let mut members: Vec<&str> = (0..spec.scores.len())
            .filter(|&j| scc[j] == scc[i])
            .map(|j| spec.scores[j].name.as_str())
            .collect();
        members.sort();
        issues.push(Issue {
            origin: Origin::Score(i),
            error: SpecError {
                line: pos.line,
                column: pos.column,
                message: format!("scores read each other in a cycle: {}", members.join(", ")),
            },
        });
    }
    issues
}

/// Types and checks one expression; returns every error found, at positions
/// of the expression's source. May rewrite `any` in boolean positions.
pub fn check_expr(e: &mut Expr, want: Want, ctx: &Ctx<'_>) -> Vec<SpecError> {
    let mut c = Checker {
        ctx,
        errors: Vec::new(),
        in_filter: false,
        population: match want {
            Want::Feature => Some("a clustering feature"),
            Want::ModelFeature => Some("a model's feature"),
            Want::Label => Some("a model's label"),
            Want::Condition | Want::Number => None,
        },
    };
    match want {
        Want::Condition => c.condition(e, "a segment's `when`"),
        Want::Label => c.condition(e, "a model's `label`"),
        Want::Number | Want::Feature | Want::ModelFeature => {
            let t = c.ty(e);
            if !matches!(t, Ty::Num | Ty::Any | Ty::Err) {
                c.error(e.pos, format!("this expression must be a number, not {}", t.name()));
            }
        }
    }
    c.errors.sort_by_key(|e| (e.line, e.column));
    c.errors
}

/// Finds the cycles among segments through `in_segment` (a segment that
/// refers to itself included). Each cycle is reported once, in the segment
/// that comes first in the spec, at its `in_segment` that starts the cycle:
/// `cycle: a -> b -> a`.
pub fn segment_cycles(segments: &[Segment]) -> Vec<Issue> {
    let index = |n: &str| segments.iter().position(|s| s.name == n);
    // Edges in source order: (target, position of the in_segment).
    let edges: Vec<Vec<(usize, Pos)>> = segments
        .iter()
        .map(|s| {
            let mut refs = Vec::new();
            in_segments(&s.when, &mut refs);
            refs.into_iter().filter_map(|(name, pos)| index(&name).map(|j| (j, pos))).collect()
        })
        .collect();
    let scc = components(&edges);
    let mut issues = Vec::new();
    let mut reported = vec![false; segments.len()];
    for start in 0..segments.len() {
        if reported[scc[start]] {
            continue;
        }
        // Shortest way back to `start` inside its component (BFS).
        let mut prev: Vec<Option<usize>> = vec![None; segments.len()];
        let mut queue = std::collections::VecDeque::from([start]);
        let mut seen = vec![false; segments.len()];
        let mut closing = None;
        'bfs: while let Some(u) = queue.pop_front() {
            for &(v, _) in &edges[u] {
                if scc[v] != scc[start] {
                    continue;
                }
                if v == start {
                    closing = Some(u);
                    break 'bfs;
                }
                if !seen[v] {
                    seen[v] = true;
                    prev[v] = Some(u);
                    queue.push_back(v);
                }
            }
        }
        let Some(last) = closing else { continue };
        reported[scc[start]] = true;
        let mut path = vec![last];
        while let Some(p) = prev[*path.last().expect("non-empty")] {
            path.push(p);
        }
        if *path.last().expect("non-empty") != start {
            path.push(start);
        }
        path.reverse(); // start, …, last
        let second = if path.len() > 1 { path[1] } else { start };
        let pos = edges[start].iter().find(|(v, _)| *v == second).map(|(_, p)| *p).unwrap_or_default();
        let mut names: Vec<&str> = path.iter().map(|&i| segments[i].name.as_str()).collect();
        names.push(&segments[start].name);
        issues.push(Issue {
            origin: Origin::Segment(start),
            error: SpecError {
                line: pos.line,
                column: pos.column,
                message: format!("cycle: {}", names.join(" -> ")),
            },
        });
    }
    issues
}

/// Every `in_segment` name in `e`, with its position, in source order.
fn in_segments(e: &Expr, out: &mut Vec<(String, Pos)>) {
    visit(e, &mut |x| {
        if let ExprKind::InSegment(n) = &x.kind {
            out.push((n.clone(), x.pos));
        }
    });
}

/// Calls `f` on every node of `e`, selectors' filters included, parents
/// before children.
pub fn visit(e: &Expr, f: &mut dyn FnMut(&Expr)) {
    f(e);
    let sel = |s: &Selector, f: &mut dyn FnMut(&Expr)| {
        if let Some(x) = &s.filter {
            visit(x, f);
        }
    };
    match &e.kind {
        ExprKind::Num(_)
        | ExprKind::Str(_)
        | ExprKind::Dur(_)
        | ExprKind::Bool(_)
        | ExprKind::Path(_)
        | ExprKind::InSegment(_)
        | ExprKind::Trait(_)
        | ExprKind::Score(_)
        | ExprKind::Rfm(_)
        | ExprKind::Cluster(_)
        | ExprKind::Predict(_)
        | ExprKind::Now => {}
        ExprKind::Neg(a)
        | ExprKind::Not(a)
        | ExprKind::Sqrt(a)
        | ExprKind::Abs(a)
        | ExprKind::Percentile(a, _)
        | ExprKind::Time(a)
        | ExprKind::Clock { time: a, zone: None, .. } => visit(a, f),
        ExprKind::Clock {
            time: a, zone: Some(b), ..
        }
        | ExprKind::Inside(a, b, _) => {
            visit(a, f);
            visit(b, f);
        }
        ExprKind::Distance(args) => args.iter().for_each(|a| visit(a, f)),
        ExprKind::Steps { sels, .. } => sels.iter().for_each(|s| sel(s, f)),
        ExprKind::And(a, b) | ExprKind::Or(a, b) | ExprKind::Arith(_, a, b) | ExprKind::Cmp(_, a, b) => {
            visit(a, f);
            visit(b, f);
        }
        ExprKind::Agg { sel: s, .. } | ExprKind::Last { sel: s, .. } | ExprKind::Since(s) | ExprKind::EventTime { sel: s, .. } => sel(s, f),
    }
}

/// Whether `e` reads `now` (SPEC §4 "Times").
pub fn reads_now(e: &Expr) -> bool {
    reads_now_through(e, &[])
}

/// Strongly connected components (Tarjan, iterative); returns each node's
/// component number.
fn components(edges: &[Vec<(usize, Pos)>]) -> Vec<usize> {
    let n = edges.len();
    let mut index = vec![usize::MAX; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut comp = vec![usize::MAX; n];
    let (mut next_index, mut next_comp) = (0, 0);
    for root in 0..n {
        if index[root] != usize::MAX {
            continue;
        }
        // (node, next edge to look at)
        let mut work = vec![(root, 0usize)];
        index[root] = next_index;
        low[root] = next_index;
        next_index += 1;
        stack.push(root);
        on_stack[root] = true;
        while let Some(&mut (u, ref mut k)) = work.last_mut() {
            if let Some(&(v, _)) = edges[u].get(*k) {
                *k += 1;
                if index[v] == usize::MAX {
                    index[v] = next_index;
                    low[v] = next_index;
                    next_index += 1;
                    stack.push(v);
                    on_stack[v] = true;
                    work.push((v, 0));
                } else if on_stack[v] {
                    low[u] = low[u].min(index[v]);
                }
            } else {
                work.pop();
                if let Some(&(parent, _)) = work.last() {
                    low[parent] = low[parent].min(low[u]);
                }
                if low[u] == index[u] {
                    while let Some(w) = stack.pop() {
                        on_stack[w] = false;
                        comp[w] = next_comp;
                        if w == u {
                            break;
                        }
                    }
                    next_comp += 1;
                }
            }
        }
    }
    comp
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ty {
    Num,
    Dur,
    /// An instant (`now`, `time(…)`, `last_time(…)`).
    Time,
    Str,
    /// A `true`/`false` literal: a value that also works as a condition.
    Bool,
    /// A formula: comparison, `and`, `or`, `not`, `in_segment`.
    Cond,
    /// Known only at run time.
    Any,
    /// Already reported; accepted everywhere so one mistake is one error.
    Err,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Num => "a number",
            Ty::Dur => "a duration",
            Ty::Time => "a time",
            Ty::Str => "a string",
            Ty::Bool => "true/false",
            Ty::Cond => "a condition",
            Ty::Any => "a value",
            Ty::Err => "an error",
        }
    }
}

fn op_text(op: ArithOp) -> &'static str {
    match op {
        ArithOp::Add => "+",
        ArithOp::Sub => "-",
        ArithOp::Mul => "*",
        ArithOp::Div => "/",
    }
}

struct Checker<'a> {
    ctx: &'a Ctx<'a>,
    errors: Vec<SpecError>,
    in_filter: bool,
    /// Inside a percentile's argument or a clustering feature (named here):
    /// only event terms may be read.
    population: Option<&'static str>,
}

impl Checker<'_> {
    fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.errors.push(SpecError {
            line: pos.line,
            column: pos.column,
            message: message.into(),
        });
    }

    /// Refuses a population-level term where only event terms may be read.
    fn event_terms_only(&mut self, pos: Pos, what: &str) {
        if let Some(place) = self.population {
            self.error(
                pos,
                format!("{what} cannot be used in {place}: it is computed over all profiles from event terms"),
            );
        }
    }

    /// Reports a profile-level term used inside a `where` filter.
    fn not_in_filter(&mut self, pos: Pos, what: &str) -> bool {
        if self.in_filter {
            self.error(
                pos,
                format!("{what} cannot be used inside a `where` filter: a filter reads only the event's fields"),
            );
        }
        self.in_filter
    }

    fn tick_multiple(&mut self, pos: Pos, what: &str, ms: u64) {
        let tick = self.ctx.tick_ms;
        if tick > 0 && !ms.is_multiple_of(tick) {
            self.error(
                pos,
                format!(
                    "{what} {} is not a multiple of the tick {}",
                    format_duration(ms),
                    format_duration(tick)
                ),
            );
        }
    }

    /// Whether `e` reads `now`, through the spec's scores too.
    fn now_in(&self, e: &Expr) -> bool {
        reads_now_through(e, self.ctx.scoring.timed_scores)
    }

    /// A use of `now` the timers cannot follow: between the instants where
    /// an `hour()` or `weekday()` changes, each side of a comparison must
    /// move one way with `now`, so that the next change of a profile's
    /// membership can be found without evaluating every tick.
    fn now_not_monotone(&mut self, pos: Pos, what: &str) {
        self.error(
            pos,
            format!("now cannot be used under {what} (in a divisor, on both sides of `*`, in sqrt, abs, distance or inside): conditions on now must move one way with the clock"),
        );
    }

    /// Requires a condition in a boolean position; rewrites `any` to
    /// `any == true`.
    fn condition(&mut self, e: &mut Expr, place: &str) {
        match self.ty(e) {
            Ty::Cond | Ty::Bool | Ty::Err => {}
            Ty::Any => {
                let pos = e.pos;
                let value = std::mem::replace(
                    e,
                    Expr {
                        kind: ExprKind::Bool(true),
                        pos,
                    },
                );
                let truth = Expr {
                    kind: ExprKind::Bool(true),
                    pos,
                };
                *e = Expr {
                    kind: ExprKind::Cmp(CmpOp::Eq, Box::new(value), Box::new(truth)),
                    pos,
                };
            }
            t => self.error(e.pos, format!("{place} must be a condition (true or false), not {}", t.name())),
        }
    }

    fn selector(&mut self, sel: &mut Selector) {
        if let Some(f) = &mut sel.filter {
            let outer = std::mem::replace(&mut self.in_filter, true);
            self.condition(f, "a `where` filter");
            self.in_filter = outer;
        }
    }

    fn ty(&mut self, e: &mut Expr) -> Ty {
        let pos = e.pos;
        match &mut e.kind {
            ExprKind::Num(_) => Ty::Num,
            ExprKind::Str(_) => Ty::Str,
            ExprKind::Bool(_) => Ty::Bool,
            ExprKind::Dur(ms) => {
                let ms = *ms;
                self.tick_multiple(pos, "duration", ms);
                Ty::Dur
            }
            ExprKind::Path(p) => {
                if self.in_filter {
                    Ty::Any
                } else {
                    self.error(
                        pos,
                        format!("`{p}` is a field of an event: read it inside a `where` filter or with last(any, {p})"),
                    );
                    Ty::Err
                }
            }
            ExprKind::Now => {
                self.event_terms_only(pos, "now");
                Ty::Time
            }
            ExprKind::Time(a) => match self.ty(a) {
                Ty::Str | Ty::Num | Ty::Any | Ty::Time => Ty::Time,
                Ty::Err => Ty::Err,
                t => {
                    self.error(
                        pos,
                        format!("time(…) needs a timestamp string or epoch milliseconds, not {}", t.name()),
                    );
                    Ty::Err
                }
            },
            ExprKind::EventTime { sel, first } => {
                let name = if *first { "first_time(…)" } else { "last_time(…)" };
                self.not_in_filter(pos, name);
                self.selector(sel);
                Ty::Time
            }
            ExprKind::Clock { part, time, zone } => {
                let name = if *part == super::ast::ClockPart::Hour { "hour" } else { "weekday" };
                match self.ty(time) {
                    Ty::Time | Ty::Err => {}
                    t => self.error(
                        time.pos,
                        format!(
                            "{name}(…) needs a time, not {}: write {name}(time(…)) for a timestamp or epoch milliseconds",
                            t.name()
                        ),
                    ),
                }
                if let Some(zone) = zone {
                    match self.ty(zone) {
                        Ty::Str | Ty::Any | Ty::Err => {}
                        t => self.error(
                            zone.pos,
                            format!("the time zone of {name}(…) is an IANA name (a string), not {}", t.name()),
                        ),
                    }
                    if let ExprKind::Str(name) = &zone.kind {
                        if jiff::tz::TimeZone::get(name).is_err() {
                            self.error(
                                zone.pos,
                                format!("unknown time zone {}: expected an IANA name such as 'Europe/Paris'", quote(name)),
                            );
                        }
                    }
                }
                Ty::Num
            }
            ExprKind::Steps { sels, window } => {
                self.not_in_filter(pos, "steps(…)");
                let window = *window;
                self.tick_multiple(pos, "window", window);
                if sels.len() > 64 {
                    self.error(pos, format!("steps(…) takes at most 64 steps, not {}", sels.len()));
                }
                for s in sels.iter_mut() {
                    self.selector(s);
                }
                Ty::Num
            }
            ExprKind::Distance(args) => {
                if args.iter().any(|a| self.now_in(a)) {
                    self.now_not_monotone(pos, "distance");
                }
                for a in args.iter_mut() {
                    match self.ty(a) {
                        Ty::Num | Ty::Any | Ty::Err => {}
                        t => self.error(a.pos, format!("distance(…) takes degrees (numbers), not {}", t.name())),
                    }
                }
                Ty::Num
            }
            ExprKind::Inside(lat, lon, zone) => {
                // A filter is evaluated as each event is read, without the
                // spec's zones.
                self.not_in_filter(pos, "inside(…)");
                if self.now_in(lat) || self.now_in(lon) {
                    self.now_not_monotone(pos, "inside");
                }
                for a in [lat, lon] {
                    match self.ty(a) {
                        Ty::Num | Ty::Any | Ty::Err => {}
                        t => self.error(a.pos, format!("inside(…) takes degrees (numbers), not {}", t.name())),
                    }
                }
                if !self.ctx.zones.contains(zone) {
                    let zone = zone.clone();
                    self.error(pos, format!("unknown zone {}: declare it in a [[zone]] block", quote(&zone)));
                }
                Ty::Bool
            }
            ExprKind::Neg(a) => match self.ty(a) {
                t @ (Ty::Num | Ty::Dur | Ty::Err) => t,
                Ty::Any => Ty::Num,
                t => {
                    self.error(pos, format!("`-` needs a number or a duration, not {}", t.name()));
                    Ty::Err
                }
            },
            ExprKind::Not(a) => {
                self.condition(a, "the operand of `not`");
                Ty::Cond
            }
            ExprKind::And(a, b) => {
                self.condition(a, "each side of `and`");
                self.condition(b, "each side of `and`");
                Ty::Cond
            }
            ExprKind::Or(a, b) => {
                self.condition(a, "each side of `or`");
                self.condition(b, "each side of `or`");
                Ty::Cond
            }
            ExprKind::Arith(op, a, b) => {
                let op = *op;
                if (op == ArithOp::Div && self.now_in(b)) || (op == ArithOp::Mul && self.now_in(a) && self.now_in(b)) {
                    self.now_not_monotone(pos, &format!("`{}`", op_text(op)));
                }
                let (ta, tb) = (self.ty(a), self.ty(b));
                let num = |t: Ty| matches!(t, Ty::Num | Ty::Any);
                match (ta, tb) {
                    (Ty::Err, _) | (_, Ty::Err) => Ty::Err,
                    (x, y) if num(x) && num(y) => Ty::Num,
                    (Ty::Dur, Ty::Dur) if matches!(op, ArithOp::Add | ArithOp::Sub) => Ty::Dur,
                    (Ty::Dur, Ty::Dur) if op == ArithOp::Div => Ty::Num,
                    (Ty::Time, Ty::Time) if op == ArithOp::Sub => Ty::Dur,
                    (Ty::Time, Ty::Dur) if matches!(op, ArithOp::Add | ArithOp::Sub) => Ty::Time,
                    (Ty::Dur, Ty::Time) if op == ArithOp::Add => Ty::Time,
                    (Ty::Dur, y) if op == ArithOp::Mul && num(y) => Ty::Dur,
                    (x, Ty::Dur) if op == ArithOp::Mul && num(x) => Ty::Dur,
                    (x, y) => {
                        self.error(
                            pos,
                            format!(
                                "`{}` needs numbers (or durations and times: d + d, d - d, d * n, d / d, t - t, t ± d), not {} and {}",
                                op_text(op),
                                x.name(),
                                y.name()
                            ),
                        );
                        Ty::Err
                    }
                }
            }
            ExprKind::Cmp(op, a, b) => {
                let op = *op;
                let a_since = matches!(a.kind, ExprKind::Since(_));
                let b_since = matches!(b.kind, ExprKind::Since(_));
                if a_since || b_since {
                    self.since_comparison(op, a, b);
                    return Ty::Cond;
                }
                let (ta, tb) = (self.ty(a), self.ty(b));
                for (t, side) in [(ta, &**a), (tb, &**b)] {
                    if t == Ty::Cond {
                        self.error(
                            side.pos,
                            format!(
                                "`{}` compares values, not conditions; combine conditions with `and`, `or`, `not`",
                                super::parse::cmp_text(op)
                            ),
                        );
                        return Ty::Cond;
                    }
                }
                match (ta, tb) {
                    (Ty::Err, _) | (_, Ty::Err) => {}
                    // A value read from events is never a time or a
                    // duration (SPEC §4 Times: any other mix is an error).
                    (t @ (Ty::Time | Ty::Dur), Ty::Any) | (Ty::Any, t @ (Ty::Time | Ty::Dur)) => self.error(
                        pos,
                        format!(
                            "cannot compare {} with a value read from events, which is never one: convert it, as in \
                             time(trait.trial_ends_at) or trait.grace_days * 1d",
                            t.name()
                        ),
                    ),
                    (Ty::Any, _) | (_, Ty::Any) => {}
                    (x, y) if x == y => {}
                    (x, y) => self.error(pos, format!("cannot compare {} with {}", x.name(), y.name())),
                }
                Ty::Cond
            }
            ExprKind::Agg { kind, sel, window, .. } => {
                let name = format!("{kind:?}").to_lowercase();
                self.not_in_filter(pos, &format!("{name}(…)"));
                if let Window::Dur(ms) = *window {
                    self.tick_multiple(pos, "window", ms);
                }
                self.selector(sel);
                Ty::Num
            }
            ExprKind::Last { sel, .. } => {
                self.not_in_filter(pos, "last(…)");
                self.selector(sel);
                Ty::Any
            }
            ExprKind::Since(sel) => {
                self.selector(sel);
                self.error(
                    pos,
                    "since(…) can only be compared with a constant duration, as in since('Order Completed') > 30d",
                );
                Ty::Err
            }
            ExprKind::Sqrt(a) | ExprKind::Abs(a) if self.now_in(a) => {
                let name = if matches!(e.kind, ExprKind::Sqrt(_)) { "sqrt" } else { "abs" };
                self.now_not_monotone(pos, name);
                Ty::Err
            }
            ExprKind::Sqrt(a) => match self.ty(a) {
                Ty::Num | Ty::Any => Ty::Num,
                Ty::Err => Ty::Err,
                t => {
                    self.error(pos, format!("sqrt needs a number, not {}", t.name()));
                    Ty::Err
                }
            },
            ExprKind::Abs(a) => match self.ty(a) {
                Ty::Num | Ty::Any => Ty::Num,
                t @ (Ty::Dur | Ty::Err) => t,
                t => {
                    self.error(pos, format!("abs needs a number or a duration, not {}", t.name()));
                    Ty::Err
                }
            },
            ExprKind::Percentile(a, _) => {
                self.not_in_filter(pos, "percentile(…)");
                self.event_terms_only(pos, "percentile(…)");
                let outer = self.population.replace("the argument of percentile(…)");
                match self.ty(a) {
                    Ty::Num | Ty::Any | Ty::Err => {}
                    t => self.error(a.pos, format!("percentile needs a number, not {}", t.name())),
                }
                self.population = outer;
                Ty::Num
            }
            ExprKind::InSegment(name) => {
                let name = name.clone();
                self.event_terms_only(pos, "in_segment(…)");
                if !self.not_in_filter(pos, "in_segment(…)") && !(self.ctx.is_segment)(&name) {
                    self.error(pos, format!("unknown segment {} in in_segment({})", quote(&name), quote(&name)));
                }
                Ty::Cond
            }
            ExprKind::Trait(name) => {
                let name = name.clone();
                if self.in_filter {
                    self.error(
                        pos,
                        format!("trait.{name} cannot be used inside a `where` filter: the event's own traits are traits.{name}"),
                    );
                    return Ty::Err;
                }
                Ty::Any
            }
            ExprKind::Score(name) => {
                let name = name.clone();
                let what = format!("score.{name}");
                if self.not_in_filter(pos, &what) {
                    return Ty::Err;
                }
                let scoring = self.ctx.scoring;
                if !scoring.scores.contains(&name) {
                    self.error(pos, format!("unknown score `{name}`: define it in a [[score]] block"));
                    return Ty::Err;
                }
                if scoring.global_scores.contains(&name) {
                    self.event_terms_only(pos, &what);
                }
                Ty::Num
            }
            ExprKind::Rfm(field) => {
                let field = *field;
                let what = format!("rfm.{}", format!("{field:?}").to_lowercase());
                if self.not_in_filter(pos, &what) {
                    return Ty::Err;
                }
                if !self.ctx.scoring.rfm {
                    self.error(pos, format!("{what} needs an [rfm] block"));
                    return Ty::Err;
                }
                self.event_terms_only(pos, &what);
                if field == super::ast::RfmField::Segment {
                    Ty::Str
                } else {
                    Ty::Num
                }
            }
            ExprKind::Cluster(name) => {
                let known = self.ctx.scoring.clusterings.contains(name);
                self.block_number(pos, ("cluster", name), "clustering", known)
            }
            ExprKind::Predict(name) => {
                let known = self.ctx.scoring.models.contains(name);
                self.block_number(pos, ("predict", name), "model", known)
            }
        }
    }

    /// `cluster.NAME` or `predict.NAME`: a number per profile that a
    /// `[[kind]]` block named NAME computes over all profiles (so not in a
    /// filter, nor where only event terms may be read).
    fn block_number(&mut self, pos: Pos, (prefix, name): (&str, &str), kind: &str, known: bool) -> Ty {
        let what = format!("{prefix}.{name}");
        if self.not_in_filter(pos, &what) {
            return Ty::Err;
        }
        if !known {
            self.error(pos, format!("unknown {kind} `{name}`: define it in a [[{kind}]] block"));
            return Ty::Err;
        }
        self.event_terms_only(pos, &what);
        Ty::Num
    }

    /// `since(sel) OP D` or `D OP since(sel)`, D a constant duration.
    fn since_comparison(&mut self, op: CmpOp, a: &mut Expr, b: &mut Expr) {
        let (s, d) = if matches!(a.kind, ExprKind::Since(_)) { (a, b) } else { (b, a) };
        if let ExprKind::Since(sel) = &mut s.kind {
            self.selector(sel);
        }
        if matches!(d.kind, ExprKind::Since(_)) {
            self.error(
                d.pos,
                "two since(…) cannot be compared with each other; compare each with a constant duration",
            );
            return;
        }
        // Typed for its own errors (a duration that is not a tick multiple).
        let t = self.ty(d);
        if !is_constant_duration(d) && t != Ty::Err {
            self.error(
                d.pos,
                format!(
                    "since(…) `{}` needs a constant duration on the other side, such as 30s or 2 * 1h, not {}",
                    super::parse::cmp_text(op),
                    t.name()
                ),
            );
        }
        if self.in_filter {
            self.error(
                s.pos,
                "since(…) cannot be used inside a `where` filter: a filter reads only the event's fields",
            );
        }
    }
}

/// A duration literal, or `+`/`-` of constant durations, or a constant
/// duration times a number literal. Its literals must be tick multiples
/// like any duration's (`Checker::ty` checks them).
fn is_constant_duration(e: &Expr) -> bool {
    let is_num = |e: &Expr| matches!(e.kind, ExprKind::Num(_));
    match &e.kind {
        ExprKind::Dur(_) => true,
        ExprKind::Arith(ArithOp::Add | ArithOp::Sub, a, b) => is_constant_duration(a) && is_constant_duration(b),
        ExprKind::Arith(ArithOp::Mul, a, b) => (is_constant_duration(a) && is_num(b)) || (is_num(a) && is_constant_duration(b)),
        _ => false,
    }
}

/// The paths an expression reads from events (in filters and aggregates).
pub fn paths(e: &Expr) -> Vec<Path> {
    let mut out = Vec::new();
    visit(e, &mut |x| match &x.kind {
        ExprKind::Path(p) => out.push(p.clone()),
        ExprKind::Agg { path: Some(p), .. } | ExprKind::Last { path: p, .. } => out.push(p.clone()),
        _ => {}
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse::parse_when;

    fn errors_with(src: &str, tick_ms: u64, segments: &[&str]) -> Vec<String> {
        let mut e = parse_when(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        let is_segment = |n: &str| segments.contains(&n);
        let ctx = Ctx {
            tick_ms,
            is_segment: &is_segment,
            scoring: Scoring::default(),
            zones: &[],
        };
        check_expr(&mut e, Want::Condition, &ctx)
            .into_iter()
            .map(|e| e.to_string())
            .collect()
    }

    fn errors(src: &str) -> Vec<String> {
        errors_with(src, 1000, &["buyer"])
    }

    fn clean(src: &str) {
        assert_eq!(errors(src), Vec::<String>::new(), "{src}");
    }

    #[test]
    fn real_examples_are_clean() {
        for src in [
            "count('Product Viewed', 48h) >= 3 and count('Product Added', 48h) >= 1 and count('Order Completed', 48h) == 0",
            "trait.plan == 'premium' and trait.city == 'New York'",
            "count(page 'pricing', 1h) >= 2 and distinct(any, session, 1h) >= 2",
            "count(page where scroll_pct >= 75, 1h) >= 1",
            "last(any, context.device.type) == 'mobile'",
            "count('buy', lifetime) >= 1 and since('buy') > 30s",
            "not (avg('buy', amount, lifetime) > 5)",
            "count(any, 1m) >= 2 and not in_segment('buyer')",
            "sum('buy', amount, lifetime) == 0.3",
            "30s < since(page 'home') and since('x') <= 2 * 1h + 1s",
            "trait.vip == true or trait.age + 1 > 30 or sqrt(var('x', v, 1d)) < abs(-2)",
            "count('x' where is_test, 1h) == 0",
            "true",
        ] {
            clean(src);
        }
    }

    #[test]
    fn deepest_accepted_expressions_check_without_overflow() {
        // The parser refuses deeper trees, so these are the worst cases.
        let nested = format!("{}trait.a{} == 1", "(".repeat(95), ")".repeat(95));
        let chained = format!("trait.a{}", " and not trait.a".repeat(45));
        let filters = format!("{}1 > 0{}", "count('x' where ".repeat(45), ", 1h) > 0".repeat(45));
        for src in [nested, chained, filters] {
            let mut e = parse_when(&src).unwrap_or_else(|e| panic!("{e}"));
            let ctx = Ctx {
                tick_ms: 1000,
                is_segment: &|_| false,
                scoring: Scoring::default(),
                zones: &[],
            };
            let _ = check_expr(&mut e, Want::Condition, &ctx);
        }
    }

    #[test]
    fn bare_any_in_boolean_position_means_equal_true() {
        let mut e = parse_when("trait.vip and not trait.banned").unwrap();
        let ctx = Ctx {
            tick_ms: 1000,
            is_segment: &|_| false,
            scoring: Scoring::default(),
            zones: &[],
        };
        assert!(check_expr(&mut e, Want::Condition, &ctx).is_empty());
        let ExprKind::And(a, b) = &e.kind else { panic!() };
        assert!(matches!(&a.kind, ExprKind::Cmp(CmpOp::Eq, x, t)
            if x.kind == ExprKind::Trait("vip".into()) && t.kind == ExprKind::Bool(true)));
        let ExprKind::Not(n) = &b.kind else { panic!() };
        assert!(matches!(&n.kind, ExprKind::Cmp(CmpOp::Eq, _, _)));
    }

    #[test]
    fn type_errors() {
        assert_eq!(errors("count('x', 1h) >= 'a'"), ["1:1: cannot compare a number with a string"]);
        assert_eq!(errors("count('x', 1h) >= 1h"), ["1:1: cannot compare a number with a duration"]);
        assert_eq!(
            errors("count('x', 1h)"),
            ["1:1: a segment's `when` must be a condition (true or false), not a number"]
        );
        assert_eq!(errors("count('x', 1h) + 'a' > 1").len(), 1);
        assert!(errors("count('x', 1h) > 1 and 3")[0].contains("each side of `and`"));
        assert!(errors("in_segment('buyer') == true")[0].contains("compares values, not conditions"));
        assert!(errors("(count('x', 1h) > 1) > 0")[0].contains("compares values"));
        assert!(errors("count('x' where amount + 1, 1h) > 0")[0].contains("`where` filter must be a condition"));
        assert!(errors("count('x' where trait.a == 1, 1h) > 0")[0].contains("traits.a"));
        assert!(errors("count('x' where count('y', 1h) > 1, 1h) > 0")[0].contains("inside a `where` filter"));
        assert!(errors("1h * 2 == 2h").is_empty());
        assert!(errors("1h / 30m == 2").is_empty());
        assert!(errors("1h + 2 == 2h")[0].contains("needs numbers"));
        // trait and last compare with anything
        assert!(errors("trait.a == 'x' and trait.b > 3 and last(any, x) == true").is_empty());
    }

    #[test]
    fn times_durations_and_numbers_are_told_apart() {
        for clean in [
            "time(trait.trial_ends_at) - now <= 3d and time(trait.trial_ends_at) > now",
            "now - first_time('Signed Up') >= 30d",
            "hour(now, last(any, context.timezone)) >= 18 and weekday(now) < 5",
            "hour(last_time(page), 'America/New_York') == 9",
            "(now - last_time(any)) / 1d > 2.5",
            "now - time(trait.signup) > -(2h) and 1h + now > time(trait.x)",
            "count(page where hour(time(ts), 'Europe/Paris') >= 18, 7d) >= 1",
        ] {
            assert!(errors(clean).is_empty(), "{clean}: {:?}", errors(clean));
        }
        assert_eq!(errors("time(trait.x) > 3d"), ["1:1: cannot compare a time with a duration"]);
        // Found by review: these passed check and could never hold.
        for never in [
            "now >= trait.trial_ends_at",
            "last(any, ts) < now",
            "now - time(trait.signup) > trait.grace",
        ] {
            assert!(
                errors(never)[0].contains("with a value read from events, which is never one"),
                "{never}: {:?}",
                errors(never)
            );
        }
        assert_eq!(
            errors("now - 3 > now"),
            ["1:1: `-` needs numbers (or durations and times: d + d, d - d, d * n, d / d, t - t, t ± d), not a time and a number"]
        );
        assert!(errors("now + now > now")[0].contains("not a time and a time"));
        assert!(errors("now - time(trait.x) > 3")[0].contains("cannot compare a duration with a number"));
        assert!(errors("hour(trait.x) > 3")[0].contains("hour(…) needs a time, not a value: write hour(time(…))"));
        assert!(errors("weekday(now, 5) > 3")[0].contains("the time zone of weekday(…) is an IANA name"));
        assert_eq!(
            errors("hour(now, 'Mars/Olympus') > 3"),
            ["1:11: unknown time zone 'Mars/Olympus': expected an IANA name such as 'Europe/Paris'"]
        );
        assert!(errors("time(3d) > now")[0].contains("time(…) needs a timestamp string or epoch milliseconds, not a duration"));
        assert!(errors("last_time('x') > now and count('y' where last_time('z') > now, 1h) > 0")[0].contains("inside a `where` filter"));
        // Funnels.
        assert!(errors("steps('a', 'b' where amount > 3, page 'pricing', 7d) >= 2 and sequence(any, 'x', 1h)").is_empty());
        assert!(errors("steps('a', 'b', 1500ms) >= 2")[0].contains("window 1500ms is not a multiple of the tick 1s"));
        assert!(errors("count('x' where steps('a', 'b', 1h) > 1, 1h) > 0")[0].contains("inside a `where` filter"));
        assert!(errors("steps('a', 'b' where count('c', 1h) > 1, 1h) > 0")[0].contains("inside a `where` filter"));
        assert!(errors("sequence('a', 'b', 1h) == true")[0].contains("compares values, not conditions"));
        let many = (0..65).map(|i| format!("'e{i}'")).collect::<Vec<_>>().join(", ");
        assert!(errors(&format!("steps({many}, 1h) > 1"))[0].contains("at most 64 steps, not 65"));
        assert!(errors("count('x', 1h) > percentile((now - last_time(any)) / 1d, 50)")[0]
            .contains("now cannot be used in the argument of percentile"));
        assert!(errors("count(any where inside(lat, lon, 'z'), 1h) > 0")[0].contains("inside(…) cannot be used inside a `where` filter"));
        assert!(errors("count(any where distance(lat, lon, 40.0, -74.0) < 5, 1h) > 0").is_empty());
        // Where the timers could not follow the clock.
        for bad in [
            "abs(now - time(trait.x)) < 1d",
            "1d / (now - time(trait.x)) > 2",
            "(now - time(trait.x)) / 1d * ((now - time(trait.x)) / 1d) > 2",
        ] {
            assert!(
                errors(bad)[0].contains("conditions on now must move one way with the clock"),
                "{bad}: {:?}",
                errors(bad)
            );
        }
    }

    #[test]
    fn windows_and_durations_are_tick_multiples() {
        assert_eq!(
            errors("count('x', 1500ms) > 1"),
            ["1:1: window 1500ms is not a multiple of the tick 1s"]
        );
        assert_eq!(
            errors("count('x', lifetime) > 1 and 2 * 1500ms == 3s"),
            ["1:34: duration 1500ms is not a multiple of the tick 1s"]
        );
        // since's constant is a duration of the spec like any other.
        assert_eq!(
            errors("since('x') > 1500ms"),
            ["1:14: duration 1500ms is not a multiple of the tick 1s"]
        );
        assert!(errors_with("since('x') > 1500ms", 500, &[]).is_empty());
        assert!(errors_with("count('x', 1500ms) > 1", 500, &[]).is_empty());
    }

    #[test]
    fn since_only_against_constant_durations() {
        assert!(errors("since('x') > 1")[0].contains("constant duration"));
        assert!(errors("since('x') > trait.t")[0].contains("constant duration"));
        assert!(errors("since('x') + 1s > 2s")[0].contains("since(…) can only be compared"));
        assert!(errors("not since('x')")[0].contains("since(…) can only be compared"));
        assert!(errors("since('x') > since('y')")[0].contains("two since"));
        assert!(errors("since('x') > 2s * 3").is_empty());
        assert!(errors("since('x') > 1h - 30m").is_empty());
    }

    #[test]
    fn in_segment_and_scoring_names() {
        assert_eq!(errors("in_segment('nope')"), ["1:1: unknown segment 'nope' in in_segment('nope')"]);
        assert_eq!(
            errors("score.engagement > 10"),
            ["1:1: unknown score `engagement`: define it in a [[score]] block"]
        );
        assert_eq!(errors("rfm.segment == 'x'"), ["1:1: rfm.segment needs an [rfm] block"]);
        assert_eq!(
            errors("cluster.behavior == 1"),
            ["1:1: unknown clustering `behavior`: define it in a [[clustering]] block"]
        );
        assert!(errors("percentile(count('x', 1h), 90) < 3").is_empty());
        let scores = ["e".to_string(), "g".to_string()];
        let global = ["g".to_string()];
        let clusterings = ["b".to_string()];
        let with = |src: &str| {
            let mut e = parse_when(src).unwrap();
            let ctx = Ctx {
                tick_ms: 1000,
                is_segment: &|_| false,
                scoring: Scoring {
                    scores: &scores,
                    global_scores: &global,
                    rfm: true,
                    clusterings: &clusterings,
                    models: &[],
                    timed_scores: &[],
                },
                zones: &[],
            };
            check_expr(&mut e, Want::Condition, &ctx)
                .into_iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
        };
        assert!(with("score.e >= percentile(score.e, 90) and rfm.segment == 'x' and cluster.b == 1").is_empty());
        assert_eq!(with("rfm.segment == 1").len(), 1);
        assert!(with("percentile(score.g, 50) > 1")[0].contains("cannot be used in the argument of percentile"));
        assert!(with("percentile(rfm.m + 1, 50) > 1")[0].contains("cannot be used in the argument"));
        assert!(with("percentile(percentile(score.e, 5), 50) > 1")[0].contains("cannot be used"));
        assert!(with("count('x' where score.e > 1, 1h) > 1")[0].contains("inside a `where` filter"));
    }

    fn seg(name: &str, when: &str) -> Segment {
        Segment {
            name: name.into(),
            description: None,
            when: parse_when(when).unwrap(),
            source: when.into(),
            groups: Vec::new(),
        }
    }

    #[test]
    fn cycles() {
        let segs = vec![
            seg("a", "count('x', 1h) > 1 and in_segment('b')"),
            seg("b", "in_segment('c') or in_segment('a')"),
            seg("c", "in_segment('zzz')"),
            seg("d", "in_segment('d')"),
            seg("e", "in_segment('a')"),
        ];
        let issues = segment_cycles(&segs);
        let got: Vec<(Origin, String)> = issues.iter().map(|i| (i.origin, i.error.to_string())).collect();
        assert_eq!(
            got,
            [
                (Origin::Segment(0), "1:24: cycle: a -> b -> a".to_string()),
                (Origin::Segment(3), "1:1: cycle: d -> d".into())
            ]
        );
        let mut spec = Spec {
            segments: segs,
            ..Default::default()
        };
        let all = check(&mut spec, 1000);
        assert_eq!(all.len(), 3, "{all:?}"); // two cycles and the unknown zzz
    }
}
