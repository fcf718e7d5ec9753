//! From a checked spec to shared pieces of dataflow.
//!
//! A `when` expression is split three ways, each shared across segments:
//!
//! - **streams**: which events (selector + filter), for how long (window),
//!   and what to read of each (nothing, a path, a stamped latest value);
//! - **terms**: an aggregate over one stream (`count`, `sum`, …, `last`), one
//!   value per profile, computed once however many segments use it;
//! - **atoms**: one comparison over terms (`count(…) >= 3`), the set of
//!   profiles for which it holds.
//!
//! What is left of a segment is a [`Formula`] of atoms and other segments
//! under `and` / `or` / `not`, which `crate::dataflow::rules` renders as set operators.
//! `since(sel) OP D` becomes a formula over `count(sel, D or D+1ms) >= 1`.
//!
//! Scoring (SPEC §4) adds terms computed over the whole population:
//!
//! - `score.NAME` is its expression, inlined where it is read (so a score is
//!   as incremental as any arithmetic over terms and shares their terms);
//! - **profile values** ([`ValueDef`]): arithmetic over event terms for every
//!   profile of the universe: a percentile's argument, the R/F/M metrics, a
//!   clustering's features;
//! - **population terms** (`Agg::Derived`): `percentile`, `rfm.*` and
//!   `cluster.*`, produced by `crate::dataflow::score`, `crate::dataflow::rfm` and
//!   `crate::dataflow::cluster` from the profile values as rows of *virtual streams*
//!   numbered after the event streams, so atoms read them like any term.
use std::collections::HashMap;

pub mod timed;

use crate::core::fact::AtomRow;
use crate::core::id::{AtomId, Key, StreamId};
use crate::core::value::{Dec, Value};
use crate::spec::ast::{AggKind, ArithOp, ClockPart, CmpOp, EventSel, Expr, ExprKind, Path, RfmField, Selector, Window};
use crate::spec::Spec;

/// What a stream keeps of each matching event.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Read {
    /// Nothing: only that it happened (for `count`).
    Unit,
    /// The value at a path (for `sum`, `avg`, …, `distinct`).
    Value(Path),
    /// The value at a path with its time, for `last` (scalars only).
    Last(Path),
    /// `traits.NAME` of `identify` events with its time; `null` unsets.
    Trait(String),
    /// The event's own time in ms, as an exact number (RFM recency).
    Time,
    /// Which of the stream's `steps` the event matches, as a bit mask,
    /// with its time (`steps()`, SPEC §4 "Sequences").
    Steps,
}

/// A windowed stream of facts about events.
#[derive(Clone, Debug)]
pub struct StreamDef {
    /// Which events; a `steps()` stream takes every event (`any`) and keeps
    /// those that match one of its `steps`.
    pub sel: Selector,
    /// The funnel's steps, for `Read::Steps` (empty otherwise).
    pub steps: Vec<Selector>,
    /// Window length in ms; `None` is `lifetime`.
    pub window: Option<u64>,
    pub read: Read,
}

/// How a term folds its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Agg {
    Count,
    Sum,
    Avg,
    Min,
    Max,
    Var,
    Distinct,
    Last,
    /// `steps()` of a funnel of this many steps.
    Steps(u8),
    /// Position `i` of a population term's row (see the module docs).
    Derived(u32),
}

impl Agg {
    /// The value of the term for a profile with no fact in its stream.
    pub fn empty(self) -> Value {
        match self {
            Agg::Count | Agg::Sum | Agg::Distinct | Agg::Steps(_) => Value::Num(Dec::ZERO),
            _ => Value::Missing,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TermDef {
    pub stream: usize,
    pub agg: Agg,
}

/// Arithmetic over term slots.
#[derive(Clone, Debug, PartialEq)]
pub enum Calc {
    Lit(Value),
    /// Index into the atom's `terms`.
    Slot(usize),
    Neg(Box<Calc>),
    Abs(Box<Calc>),
    Sqrt(Box<Calc>),
    Arith(ArithOp, Box<Calc>, Box<Calc>),
    /// `now`: the tick being computed (SPEC §4 "Times").
    Now,
    /// `time(x)`, and `last_time`/`first_time` over an event-time term.
    Time(Box<Calc>),
    /// `hour(t[, zone])` or `weekday(t[, zone])`; no zone is UTC.
    Clock(ClockPart, Box<Calc>, Option<Box<Calc>>),
    /// `distance(lat1, lon1, lat2, lon2)` (SPEC §4 "Places").
    Distance(Vec<Calc>),
    /// `inside(lat, lon, zone)`.
    Inside(Box<Calc>, Box<Calc>, std::sync::Arc<crate::spec::ZoneDef>),
    /// A comparison, as a value (a model's label): true or false, false
    /// with a missing side, as an atom.
    Cmp(CmpOp, Box<Calc>, Box<Calc>),
    /// `not`, `and`, `or` over values that are true or not.
    Not(Box<Calc>),
    And(Box<Calc>, Box<Calc>),
    Or(Box<Calc>, Box<Calc>),
}

impl Calc {
    /// The value over term values `slots`, for a calc that does not read
    /// `now` (one that does reads it as missing: see [`Calc::eval_at`]).
    pub fn eval(&self, slots: &[Value]) -> Value {
        self.eval_at(slots, None)
    }

    /// The value over `slots` with the clock at tick `now`.
    pub fn eval_at(&self, slots: &[Value], now: Option<u64>) -> Value {
        match self {
            Calc::Lit(v) => v.clone(),
            Calc::Slot(i) => slots[*i].clone(),
            Calc::Neg(a) => a.eval_at(slots, now).neg(),
            Calc::Abs(a) => a.eval_at(slots, now).abs(),
            Calc::Sqrt(a) => a.eval_at(slots, now).sqrt(),
            Calc::Arith(op, a, b) => a.eval_at(slots, now).arith(*op, &b.eval_at(slots, now)),
            Calc::Now => now.map_or(Value::Missing, |t| Value::Time(t as i64)),
            Calc::Time(a) => as_time(&a.eval_at(slots, now)),
            Calc::Clock(part, t, zone) => clock_part(*part, &t.eval_at(slots, now), zone.as_ref().map(|z| z.eval_at(slots, now)).as_ref()),
            Calc::Distance(args) => distance(&args.iter().map(|a| a.eval_at(slots, now)).collect::<Vec<_>>()),
            Calc::Inside(lat, lon, zone) => match (lat.eval_at(slots, now).as_f64(), lon.eval_at(slots, now).as_f64()) {
                (Some(lat), Some(lon)) => Value::Bool(zone.contains(lat, lon)),
                // A missing argument gives false (SPEC §4 "Places").
                _ => Value::Bool(false),
            },
            Calc::Cmp(op, a, b) => Value::Bool(a.eval_at(slots, now).cmp_op(*op, &b.eval_at(slots, now))),
            Calc::Not(a) => Value::Bool(!a.truth(slots, now)),
            Calc::And(a, b) => Value::Bool(a.truth(slots, now) && b.truth(slots, now)),
            Calc::Or(a, b) => Value::Bool(a.truth(slots, now) || b.truth(slots, now)),
        }
    }

    /// Whether the value is `true`.
    fn truth(&self, slots: &[Value], now: Option<u64>) -> bool {
        self.eval_at(slots, now) == Value::Bool(true)
    }

    /// Whether the calc reads `now`.
    pub fn reads_now(&self) -> bool {
        match self {
            Calc::Lit(_) | Calc::Slot(_) => false,
            Calc::Now => true,
            Calc::Neg(a) | Calc::Abs(a) | Calc::Sqrt(a) | Calc::Time(a) | Calc::Clock(_, a, None) | Calc::Not(a) => a.reads_now(),
            Calc::Arith(_, a, b)
            | Calc::Clock(_, a, Some(b))
            | Calc::Inside(a, b, _)
            | Calc::Cmp(_, a, b)
            | Calc::And(a, b)
            | Calc::Or(a, b) => a.reads_now() || b.reads_now(),
            Calc::Distance(args) => args.iter().any(Calc::reads_now),
        }
    }

    /// The value of a literal or a slot, borrowed (nothing to compute).
    fn borrowed<'a>(&'a self, slots: &'a [Value]) -> Option<&'a Value> {
        match self {
            Calc::Lit(v) => Some(v),
            Calc::Slot(i) => Some(&slots[*i]),
            _ => None,
        }
    }
}

/// One comparison over terms.
#[derive(Clone, Debug, PartialEq)]
pub struct AtomDef {
    pub op: CmpOp,
    pub lhs: Calc,
    pub rhs: Calc,
    /// The terms the sides read, by slot.
    pub terms: Vec<usize>,
    /// The source text, for messages.
    pub text: String,
    /// Whether it reads `now`: its value may change with no event, so it is
    /// evaluated by `crate::dataflow::timed` for every profile, with timers.
    pub timed: bool,
}

impl AtomDef {
    /// Whether the comparison holds over `slots`, for an atom that does
    /// not read `now`.
    pub fn holds(&self, slots: &[Value]) -> bool {
        // Most atoms compare a term with a literal: no value need be cloned.
        match (self.lhs.borrowed(slots), self.rhs.borrowed(slots)) {
            (Some(a), Some(b)) => a.cmp_op(self.op, b),
            _ => self.holds_at(slots, None),
        }
    }

    /// Whether the comparison holds over `slots` with the clock at `now`.
    pub fn holds_at(&self, slots: &[Value], now: Option<u64>) -> bool {
        self.lhs.eval_at(slots, now).cmp_op(self.op, &self.rhs.eval_at(slots, now))
    }
}

/// `distance(lat1, lon1, lat2, lon2)` of four values (SPEC §4 "Places"):
/// missing unless all are numbers in range.
pub fn distance(degrees: &[Value]) -> Value {
    let d: Option<Vec<f64>> = degrees.iter().map(Value::as_f64).collect();
    match d.and_then(|d| crate::spec::distance_km(d[0], d[1], d[2], d[3])) {
        Some(km) => Value::Float(crate::core::value::Float(km)),
        None => Value::Missing,
    }
}

/// `hour(time, zone)` or `weekday(time, zone)` (SPEC §4 "Times"): missing
/// unless `time` is a time and `zone`, if given, a zone's IANA name.
pub fn clock_part(part: ClockPart, time: &Value, zone: Option<&Value>) -> Value {
    let Value::Time(ms) = *time else {
        return Value::Missing;
    };
    let local = match zone {
        None => crate::core::clock::local_part(ms, None, part),
        Some(Value::Str(name)) => crate::core::clock::zone(name).and_then(|z| crate::core::clock::local_part(ms, Some(&z), part)),
        Some(_) => None,
    };
    local.map_or(Value::Missing, |n| Value::Num(Dec::from_int(n)))
}

/// `time(v)` (SPEC §4 "Times"): a time as it is; a timestamp string as an
/// event's `timestamp` is read (RFC 3339); integer epoch milliseconds;
/// anything else is missing.
pub fn as_time(v: &Value) -> Value {
    let ms = match v {
        Value::Time(ms) => Some(*ms),
        Value::Str(s) => crate::core::clock::parse_time(s).ok().map(|ms| ms as i64),
        Value::Num(d) if d.0 % crate::core::value::SCALE == 0 => i64::try_from(d.0 / crate::core::value::SCALE).ok(),
        _ => None,
    };
    match ms {
        Some(ms) if (0..=crate::core::clock::MAX_TIME as i64).contains(&ms) => Value::Time(ms),
        _ => Value::Missing,
    }
}

/// Arithmetic over event terms, evaluated for every profile of the universe.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueDef {
    pub calcs: Vec<Calc>,
    /// The event terms the calcs read, by slot.
    pub terms: Vec<usize>,
}

impl ValueDef {
    pub fn eval(&self, slots: &[Value]) -> Vec<Value> {
        self.calcs.iter().map(|c| c.eval(slots)).collect()
    }
}

/// `percentile(value, p)`: one threshold over all profiles.
#[derive(Clone, Debug, PartialEq)]
pub struct PercentilePlan {
    /// Index into `Plan::values` (one calc).
    pub value: usize,
    pub p: f64,
}

/// The `[rfm]` block: its profile value is `[R, F, M]`.
#[derive(Clone, Debug, PartialEq)]
pub struct RfmPlan {
    pub value: usize,
    pub grid: Vec<Vec<String>>,
}

/// One `[[clustering]]`: its profile value is the features.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterPlan {
    pub name: String,
    pub value: usize,
    pub k: usize,
    pub refresh: u64,
    pub seed: u64,
}

/// One `[[model]]`: its profile values are the features and the label.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelPlan {
    pub name: String,
    /// The features' profile value.
    pub features: usize,
    /// The label's profile value (one calc, true or false).
    pub label: usize,
    pub horizon: u64,
    pub refresh: u64,
    pub l2: f64,
    pub sample: f64,
}

/// Virtual stream numbers while planning (renumbered after the event
/// streams once those are all known).
const VIRTUAL: usize = 1 << 40;
const V_THRESHOLDS: usize = VIRTUAL;
const V_RFM: usize = VIRTUAL + 1;
const V_CLUSTER: usize = VIRTUAL + 2;

/// A segment's `when` once its atoms are shared.
#[derive(Clone, Debug, PartialEq)]
pub enum Formula {
    True,
    False,
    Atom(usize),
    Segment(usize),
    Not(Box<Formula>),
    And(Box<Formula>, Box<Formula>),
    Or(Box<Formula>, Box<Formula>),
}

impl Formula {
    /// Whether the formula holds, given which atoms hold and which segments
    /// (`in_segment`) the profile is in; `not` is the complement within the
    /// universe, so it is only asked of profiles that exist.
    ///
    /// Generic rather than over `dyn Fn`: every changed profile evaluates
    /// every segment, and an indirect call per leaf was most of the walk.
    pub fn eval<A: Fn(usize) -> bool, S: Fn(usize) -> bool>(&self, atom: &A, segment: &S) -> bool {
        match self {
            Formula::True => true,
            Formula::False => false,
            Formula::Atom(a) => atom(*a),
            Formula::Segment(s) => segment(*s),
            Formula::Not(x) => !x.eval(atom, segment),
            Formula::And(x, y) => x.eval(atom, segment) && y.eval(atom, segment),
            Formula::Or(x, y) => x.eval(atom, segment) || y.eval(atom, segment),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SegmentPlan {
    pub name: String,
    pub formula: Formula,
    /// Its `groups` (SPEC §4 "Groups"): which group a member's line names.
    pub groups: Vec<crate::spec::Group>,
}

/// The shared plan of a spec.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub streams: Vec<StreamDef>,
    pub terms: Vec<TermDef>,
    pub atoms: Vec<AtomDef>,
    pub segments: Vec<SegmentPlan>,
    /// Segment indices such that every `in_segment` target comes first.
    pub order: Vec<usize>,
    /// For each term, the atoms that read it, with the slot.
    pub readers: Vec<Vec<(usize, usize)>>,
    /// The atoms that read `now`, in atom order (see [`AtomDef::timed`]).
    pub timed: Vec<usize>,
    /// The spec's `[[zone]]`s, for `inside`.
    pub zones: Vec<std::sync::Arc<crate::spec::ZoneDef>>,
    /// For each stream, the terms that fold it (event streams, then the
    /// virtual streams: thresholds, RFM, one per clustering).
    pub folds: Vec<Vec<usize>>,
    /// Profile values (percentile arguments, RFM metrics, features).
    pub values: Vec<ValueDef>,
    /// For each term, the profile values that read it, with the slot.
    pub value_readers: Vec<Vec<(usize, usize)>>,
    pub percentiles: Vec<PercentilePlan>,
    pub rfm: Option<RfmPlan>,
    /// Only the clusterings some segment reads; `clusters[c]` is the one
    /// named `spec.clusterings[c]` when read.
    pub clusters: Vec<Option<ClusterPlan>>,
    /// Every `[[model]]` of the spec (`Some` once planned: all are).
    pub models: Vec<Option<ModelPlan>>,
    scores: HashMap<String, Expr>,
    spec_rfm: Option<crate::spec::RfmDef>,
    spec_clusterings: Vec<crate::spec::ClusteringDef>,
    spec_models: Vec<crate::spec::ModelDef>,
    value_keys: HashMap<String, usize>,
    stream_keys: HashMap<String, usize>,
    term_keys: HashMap<TermDef, usize>,
    atom_keys: HashMap<String, usize>,
}

impl Plan {
    /// The rows of the atoms over one term of `stream` when a profile's row
    /// for it goes from `old` to `new` (`None`: no row): an atom has a row
    /// while its term does, and only a row whose value differs is retracted
    /// and inserted. Updates for one `(stream, profile)` are consolidated and
    /// no other key's include them (an atom reads one term, of one stream),
    /// as the terms stage's fold requires: it calls this where each event-stream
    /// term changes (`crate::dataflow::terms`).
    pub fn flips(
        &self,
        (stream, profile): (StreamId, Key),
        old: Option<&[Value]>,
        new: Option<&[Value]>,
        mut push: impl FnMut(AtomRow, isize),
    ) {
        for (slot, &term) in self.folds[stream.index()].iter().enumerate() {
            for &(atom, _) in &self.readers[term] {
                let def = &self.atoms[atom];
                if def.terms.len() != 1 || def.timed {
                    continue;
                }
                let holds = |values: &[Value]| def.holds(std::slice::from_ref(&values[slot]));
                let (was, is) = (old.map(holds), new.map(holds));
                if was != is {
                    if let Some(was) = was {
                        push(((AtomId::of(atom), profile), was), -1);
                    }
                    if let Some(is) = is {
                        push(((AtomId::of(atom), profile), is), 1);
                    }
                }
            }
        }
    }

    pub fn new(spec: &Spec) -> Plan {
        let mut plan = Plan {
            scores: spec.scores.iter().map(|s| (s.name.clone(), s.expr.clone())).collect(),
            spec_rfm: spec.rfm.clone(),
            spec_clusterings: spec.clusterings.clone(),
            clusters: vec![None; spec.clusterings.len()],
            spec_models: spec.models.clone(),
            models: vec![None; spec.models.len()],
            zones: spec.zones.iter().cloned().map(std::sync::Arc::new).collect(),
            ..Plan::default()
        };
        let names: HashMap<&str, usize> = spec.segments.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
        for seg in &spec.segments {
            let formula = plan.formula(&seg.when, &names);
            plan.segments.push(SegmentPlan {
                name: seg.name.clone(),
                formula,
                groups: seg.groups.clone(),
            });
        }
        plan.order = plan.topological_order();
        // Every model is fitted, read or not: `GET /models` shows it.
        for m in 0..spec.models.len() {
            plan.model_plan(m);
        }
        // Virtual streams come right after the event streams.
        let base = plan.streams.len();
        for term in &mut plan.terms {
            if term.stream >= VIRTUAL {
                term.stream = base + (term.stream - VIRTUAL);
            }
        }
        plan.term_keys.clear();
        plan.readers = vec![Vec::new(); plan.terms.len()];
        for (a, atom) in plan.atoms.iter().enumerate() {
            for (slot, &t) in atom.terms.iter().enumerate() {
                plan.readers[t].push((a, slot));
            }
        }
        plan.timed = (0..plan.atoms.len()).filter(|&a| plan.atoms[a].timed).collect();
        plan.folds = vec![Vec::new(); plan.streams.len() + 2 + plan.clusters.len() + plan.models.len()];
        for (t, term) in plan.terms.iter().enumerate() {
            plan.folds[term.stream].push(t);
        }
        plan.value_readers = vec![Vec::new(); plan.terms.len()];
        for (v, value) in plan.values.iter().enumerate() {
            for (slot, &t) in value.terms.iter().enumerate() {
                plan.value_readers[t].push((v, slot));
            }
        }
        plan
    }

    /// For each stream, whether every term that folds it is a `count`: such
    /// streams need no payload, only a multiplicity (see `crate::dataflow::terms`).
    pub fn counted_streams(&self) -> Vec<bool> {
        self.folds
            .iter()
            .map(|ts| ts.iter().all(|&t| self.terms[t].agg == Agg::Count))
            .collect()
    }

    /// Plans one more `when` over this plan (the HTTP API's preview and
    /// runtime segments): a copy of the plan with the new streams, terms and
    /// atoms, and the formula. `names` maps segment names to the indices
    /// `Formula::Segment` will carry.
    ///
    /// Streams and terms are only ever appended, so the copy's terms from
    /// `self.terms.len()` on are exactly those the running dataflow does not
    /// compute; the served model computes them from the events it keeps
    /// (`crate::serve::model`), reading their stream from the copy's `streams`. A
    /// new stream's number may be that of one of this plan's virtual
    /// streams: the dataflow's rows are read only for this plan's own terms,
    /// by their own stream numbers, so the two never meet.
    pub fn extend(&self, e: &Expr, names: &HashMap<&str, usize>) -> (Plan, Formula) {
        let mut p = self.clone();
        p.term_keys = p.terms.iter().enumerate().map(|(i, t)| (*t, i)).collect();
        let f = p.formula(e, names);
        (p, f)
    }

    /// The terms of `self` (an [`extend`](Plan::extend)ed copy of `base`)
    /// that `base` does not compute, with their event streams (`None` for a
    /// population term, which the HTTP API's checker refuses before this).
    pub fn new_terms<'a>(&'a self, base: &Plan) -> impl Iterator<Item = (usize, Option<&'a StreamDef>, Agg)> + 'a {
        (base.terms.len()..self.terms.len()).map(|t| (t, self.streams.get(self.terms[t].stream), self.terms[t].agg))
    }

    /// The virtual stream of the percentile thresholds.
    pub fn thresholds_stream(&self) -> usize {
        self.streams.len()
    }

    /// The virtual stream of `rfm.*`.
    pub fn rfm_stream(&self) -> usize {
        self.streams.len() + 1
    }

    /// The virtual stream of `cluster.NAME` for `spec.clusterings[c]`.
    pub fn cluster_stream(&self, c: usize) -> usize {
        self.streams.len() + 2 + c
    }

    /// The virtual stream of `predict.NAME` for `spec.models[m]`.
    pub fn model_stream(&self, m: usize) -> usize {
        self.streams.len() + 2 + self.clusters.len() + m
    }

    /// Whether `stream` is an event stream (fed by the reader).
    pub fn is_event_stream(&self, stream: usize) -> bool {
        stream < self.streams.len()
    }

    /// A profile value over `exprs` (shared when the same one is asked again).
    fn value(&mut self, exprs: &[&Expr]) -> usize {
        let mut terms = Vec::new();
        let calcs: Vec<Calc> = exprs.iter().map(|e| self.calc(e, &mut terms)).collect();
        let key = format!("{calcs:?}|{terms:?}");
        if let Some(&i) = self.value_keys.get(&key) {
            return i;
        }
        self.values.push(ValueDef { calcs, terms });
        self.value_keys.insert(key, self.values.len() - 1);
        self.values.len() - 1
    }

    /// The RFM metrics as a profile value, planned on first use.
    fn rfm_plan(&mut self) {
        if self.rfm.is_some() {
            return;
        }
        let Some(def) = self.spec_rfm.clone() else { return };
        let sel = Selector {
            event: EventSel::Track(def.purchase.clone()),
            filter: None,
        };
        let w = match def.window {
            Window::Dur(ms) => Some(ms),
            Window::Lifetime => None,
        };
        let recency = self.stream(&sel, w, Read::Time);
        let count = self.stream(&sel, w, Read::Unit);
        let money = self.stream(&sel, w, Read::Value(def.revenue.clone()));
        let terms = vec![
            self.term(TermDef {
                stream: recency,
                agg: Agg::Max,
            }),
            self.term(TermDef {
                stream: count,
                agg: Agg::Count,
            }),
            self.term(TermDef {
                stream: money,
                agg: Agg::Sum,
            }),
        ];
        self.values.push(ValueDef {
            calcs: (0..3).map(Calc::Slot).collect(),
            terms,
        });
        self.rfm = Some(RfmPlan {
            value: self.values.len() - 1,
            grid: def.grid,
        });
    }

    fn topological_order(&self) -> Vec<usize> {
        fn deps(f: &Formula, out: &mut Vec<usize>) {
            match f {
                Formula::Segment(s) => out.push(*s),
                Formula::Not(a) => deps(a, out),
                Formula::And(a, b) | Formula::Or(a, b) => {
                    deps(a, out);
                    deps(b, out)
                }
                _ => {}
            }
        }
        fn visit(i: usize, plan: &Plan, seen: &mut Vec<bool>, order: &mut Vec<usize>) {
            if seen[i] {
                return;
            }
            seen[i] = true;
            let mut d = Vec::new();
            deps(&plan.segments[i].formula, &mut d);
            for j in d {
                visit(j, plan, seen, order);
            }
            order.push(i);
        }
        let mut seen = vec![false; self.segments.len()];
        let mut order = Vec::new();
        for i in 0..self.segments.len() {
            visit(i, self, &mut seen, &mut order);
        }
        order
    }

    fn stream(&mut self, sel: &Selector, window: Option<u64>, read: Read) -> usize {
        // Without source positions: the same filter written elsewhere (another
        // segment, or a `when` sent to the HTTP API) is the same stream.
        let key = without_positions(&format!("{:?}|{:?}|{:?}|{:?}", sel.event, sel.filter, window, read));
        if let Some(&i) = self.stream_keys.get(&key) {
            return i;
        }
        self.streams.push(StreamDef {
            sel: sel.clone(),
            steps: Vec::new(),
            window,
            read,
        });
        self.stream_keys.insert(key, self.streams.len() - 1);
        self.streams.len() - 1
    }

    /// The stream of a funnel's steps over `window` ms: every event that
    /// matches one of them, with the steps it matches.
    fn steps_stream(&mut self, steps: &[Selector], window: u64) -> usize {
        let text: Vec<String> = steps.iter().map(|s| format!("{:?}|{:?}", s.event, s.filter)).collect();
        let key = without_positions(&format!("steps|{text:?}|{window}"));
        if let Some(&i) = self.stream_keys.get(&key) {
            return i;
        }
        self.streams.push(StreamDef {
            sel: Selector {
                event: EventSel::Any,
                filter: None,
            },
            steps: steps.to_vec(),
            window: Some(window),
            read: Read::Steps,
        });
        self.stream_keys.insert(key, self.streams.len() - 1);
        self.streams.len() - 1
    }

    fn term(&mut self, def: TermDef) -> usize {
        if let Some(&i) = self.term_keys.get(&def) {
            return i;
        }
        self.terms.push(def);
        self.term_keys.insert(def, self.terms.len() - 1);
        self.terms.len() - 1
    }

    fn atom(&mut self, op: CmpOp, lhs: &Expr, rhs: &Expr) -> Formula {
        let mut terms = Vec::new();
        let l = self.calc(lhs, &mut terms);
        let r = self.calc(rhs, &mut terms);
        let text = format!("{op:?}|{l:?}|{r:?}|{terms:?}");
        let timed = l.reads_now() || r.reads_now();
        let def = AtomDef {
            op,
            lhs: l,
            rhs: r,
            terms,
            text: text.clone(),
            timed,
        };
        if def.terms.is_empty() && !timed {
            return if def.holds(&[]) { Formula::True } else { Formula::False };
        }
        if let Some(&i) = self.atom_keys.get(&text) {
            return Formula::Atom(i);
        }
        self.atoms.push(def);
        self.atom_keys.insert(text, self.atoms.len() - 1);
        Formula::Atom(self.atoms.len() - 1)
    }

    /// `count(sel, w) >= 1` as a formula (`w` may be any number of ms).
    fn seen_within(&mut self, sel: &Selector, w: i64) -> Formula {
        if w <= 0 {
            return Formula::False;
        }
        let stream = self.stream(sel, Some(w as u64), Read::Unit);
        let t = self.term(TermDef { stream, agg: Agg::Count });
        let def = AtomDef {
            op: CmpOp::Ge,
            lhs: Calc::Slot(0),
            rhs: Calc::Lit(Value::Num(Dec::from_int(1))),
            terms: vec![t],
            text: format!("seen|{t}"),
            timed: false,
        };
        if let Some(&i) = self.atom_keys.get(&def.text) {
            return Formula::Atom(i);
        }
        self.atom_keys.insert(def.text.clone(), self.atoms.len());
        self.atoms.push(def);
        Formula::Atom(self.atoms.len() - 1)
    }

    /// `since(sel) OP d`, with `since` on the left.
    fn since(&mut self, sel: &Selector, op: CmpOp, d: i64) -> Formula {
        let lt = |p: &mut Plan| p.seen_within(sel, d); // since < d
        let le = |p: &mut Plan| p.seen_within(sel, d.saturating_add(1)); // since <= d
        let not = |f: Formula| Formula::Not(Box::new(f));
        match op {
            CmpOp::Lt => lt(self),
            CmpOp::Le => le(self),
            CmpOp::Gt => not(le(self)),
            CmpOp::Ge => not(lt(self)),
            CmpOp::Eq => Formula::And(Box::new(le(self)), Box::new(not(lt(self)))),
            CmpOp::Ne => not(Formula::And(Box::new(le(self)), Box::new(not(lt(self))))),
        }
    }

    fn formula(&mut self, e: &Expr, names: &HashMap<&str, usize>) -> Formula {
        match &e.kind {
            ExprKind::Bool(true) => Formula::True,
            ExprKind::Bool(false) => Formula::False,
            ExprKind::Not(a) => Formula::Not(Box::new(self.formula(a, names))),
            ExprKind::And(a, b) => Formula::And(Box::new(self.formula(a, names)), Box::new(self.formula(b, names))),
            ExprKind::Or(a, b) => Formula::Or(Box::new(self.formula(a, names)), Box::new(self.formula(b, names))),
            ExprKind::InSegment(s) => Formula::Segment(names[s.as_str()]),
            ExprKind::Cmp(op, a, b) => match (&a.kind, &b.kind) {
                (ExprKind::Since(sel), _) => self.since(sel, *op, const_duration(b)),
                (_, ExprKind::Since(sel)) => self.since(sel, flip(*op), const_duration(a)),
                _ => self.atom(*op, a, b),
            },
            // A bare value in boolean position means `== true`.
            _ => {
                let t = Expr {
                    kind: ExprKind::Bool(true),
                    pos: e.pos,
                };
                self.atom(CmpOp::Eq, e, &t)
            }
        }
    }

    fn calc(&mut self, e: &Expr, terms: &mut Vec<usize>) -> Calc {
        let mut slot = |plan: &mut Plan, def: TermDef| {
            let t = plan.term(def);
            let i = terms.iter().position(|&x| x == t).unwrap_or_else(|| {
                terms.push(t);
                terms.len() - 1
            });
            Calc::Slot(i)
        };
        match &e.kind {
            ExprKind::Num(d) => Calc::Lit(Value::Num(*d)),
            ExprKind::Str(s) => Calc::Lit(Value::Str(s.as_str().into())),
            ExprKind::Dur(ms) => Calc::Lit(Value::Dur(*ms as i64)),
            ExprKind::Bool(b) => Calc::Lit(Value::Bool(*b)),
            ExprKind::Neg(a) => Calc::Neg(Box::new(self.calc(a, terms))),
            ExprKind::Abs(a) => Calc::Abs(Box::new(self.calc(a, terms))),
            ExprKind::Sqrt(a) => Calc::Sqrt(Box::new(self.calc(a, terms))),
            ExprKind::Arith(op, a, b) => Calc::Arith(*op, Box::new(self.calc(a, terms)), Box::new(self.calc(b, terms))),
            ExprKind::Agg { kind, sel, path, window } => {
                let w = match window {
                    Window::Dur(ms) => Some(*ms),
                    Window::Lifetime => None,
                };
                let read = match path {
                    Some(p) => Read::Value(p.clone()),
                    None => Read::Unit,
                };
                let stream = self.stream(sel, w, read);
                let agg = match kind {
                    AggKind::Count => Agg::Count,
                    AggKind::Sum => Agg::Sum,
                    AggKind::Avg => Agg::Avg,
                    AggKind::Min => Agg::Min,
                    AggKind::Max => Agg::Max,
                    AggKind::Var => Agg::Var,
                    AggKind::Distinct => Agg::Distinct,
                };
                slot(self, TermDef { stream, agg })
            }
            ExprKind::Last { sel, path } => {
                let stream = self.stream(sel, None, Read::Last(path.clone()));
                slot(self, TermDef { stream, agg: Agg::Last })
            }
            ExprKind::Now => Calc::Now,
            ExprKind::Steps { sels, window } => {
                let stream = self.steps_stream(sels, *window);
                slot(
                    self,
                    TermDef {
                        stream,
                        agg: Agg::Steps(sels.len() as u8),
                    },
                )
            }
            ExprKind::Distance(args) => Calc::Distance(args.iter().map(|a| self.calc(a, terms)).collect()),
            ExprKind::Inside(lat, lon, zone) => {
                let (lat, lon) = (Box::new(self.calc(lat, terms)), Box::new(self.calc(lon, terms)));
                match self.zones.iter().find(|z| &z.name == zone) {
                    Some(z) => Calc::Inside(lat, lon, z.clone()),
                    None => Calc::Lit(Value::Bool(false)),
                }
            }
            ExprKind::Time(a) => Calc::Time(Box::new(self.calc(a, terms))),
            ExprKind::EventTime { sel, first } => {
                // The latest (earliest) event time of a lifetime stream:
                // events at or before `now` are the ones that have taken effect.
                let stream = self.stream(sel, None, Read::Time);
                let agg = if *first { Agg::Min } else { Agg::Max };
                Calc::Time(Box::new(slot(self, TermDef { stream, agg })))
            }
            ExprKind::Clock { part, time, zone } => {
                let time = Box::new(self.calc(time, terms));
                let zone = zone.as_ref().map(|z| Box::new(self.calc(z, terms)));
                Calc::Clock(*part, time, zone)
            }
            ExprKind::Trait(name) => {
                let sel = Selector {
                    event: EventSel::Identify,
                    filter: None,
                };
                let stream = self.stream(&sel, None, Read::Trait(name.clone()));
                slot(self, TermDef { stream, agg: Agg::Last })
            }
            ExprKind::Score(name) => {
                let expr = self.scores.get(name).cloned().unwrap_or(Expr {
                    kind: ExprKind::Bool(false),
                    pos: e.pos,
                });
                self.calc(&expr, terms)
            }
            ExprKind::Percentile(arg, p) => {
                let value = self.value(&[arg]);
                let i = match self.percentiles.iter().position(|q| q.value == value && q.p == *p) {
                    Some(i) => i,
                    None => {
                        self.percentiles.push(PercentilePlan { value, p: *p });
                        self.percentiles.len() - 1
                    }
                };
                slot(
                    self,
                    TermDef {
                        stream: V_THRESHOLDS,
                        agg: Agg::Derived(i as u32),
                    },
                )
            }
            ExprKind::Rfm(field) => {
                self.rfm_plan();
                let i = match field {
                    RfmField::R => 0,
                    RfmField::F => 1,
                    RfmField::M => 2,
                    RfmField::Segment => 3,
                };
                slot(
                    self,
                    TermDef {
                        stream: V_RFM,
                        agg: Agg::Derived(i),
                    },
                )
            }
            ExprKind::Cluster(name) => {
                let Some(c) = self.spec_clusterings.iter().position(|d| &d.name == name) else {
                    return Calc::Lit(Value::Missing);
                };
                if self.clusters[c].is_none() {
                    let def = self.spec_clusterings[c].clone();
                    let features: Vec<&Expr> = def.features.iter().collect();
                    let value = self.value(&features);
                    self.clusters[c] = Some(ClusterPlan {
                        name: def.name.clone(),
                        value,
                        k: def.k,
                        refresh: def.refresh,
                        seed: def.seed,
                    });
                }
                slot(
                    self,
                    TermDef {
                        stream: V_CLUSTER + c,
                        agg: Agg::Derived(0),
                    },
                )
            }
            ExprKind::Predict(name) => {
                let Some(m) = self.spec_models.iter().position(|d| &d.name == name) else {
                    return Calc::Lit(Value::Missing);
                };
                self.model_plan(m);
                slot(
                    self,
                    TermDef {
                        stream: V_CLUSTER + self.clusters.len() + m,
                        agg: Agg::Derived(0),
                    },
                )
            }
            // The checker refuses everything else before a plan is made.
            _ => Calc::Lit(Value::Missing),
        }
    }

    /// Plans `spec.models[m]` (its features and label as profile values)
    /// on first use.
    fn model_plan(&mut self, m: usize) {
        if self.models[m].is_some() {
            return;
        }
        let def = self.spec_models[m].clone();
        let features: Vec<&Expr> = def.features.iter().collect();
        let features = self.value(&features);
        let mut terms = Vec::new();
        let calcs = vec![self.truth(&def.label, &mut terms)];
        self.values.push(ValueDef { calcs, terms });
        self.models[m] = Some(ModelPlan {
            name: def.name.clone(),
            features,
            label: self.values.len() - 1,
            horizon: def.horizon,
            refresh: def.refresh,
            l2: def.l2,
            sample: def.sample,
        });
    }

    /// A checked condition as a value that is true or false (a model's
    /// label): what [`Plan::formula`] makes of it, over values instead of
    /// atoms. `in_segment` is refused by the checker there.
    fn truth(&mut self, e: &Expr, terms: &mut Vec<usize>) -> Calc {
        let b = Box::new;
        match &e.kind {
            ExprKind::Not(a) => Calc::Not(b(self.truth(a, terms))),
            ExprKind::And(x, y) => Calc::And(b(self.truth(x, terms)), b(self.truth(y, terms))),
            ExprKind::Or(x, y) => Calc::Or(b(self.truth(x, terms)), b(self.truth(y, terms))),
            ExprKind::Cmp(op, x, y) => match (&x.kind, &y.kind) {
                (ExprKind::Since(sel), _) => self.since_calc(sel, *op, const_duration(y), terms),
                (_, ExprKind::Since(sel)) => self.since_calc(sel, flip(*op), const_duration(x), terms),
                _ => Calc::Cmp(*op, b(self.calc(x, terms)), b(self.calc(y, terms))),
            },
            ExprKind::Bool(v) => Calc::Lit(Value::Bool(*v)),
            _ => Calc::Cmp(CmpOp::Eq, b(self.calc(e, terms)), b(Calc::Lit(Value::Bool(true)))),
        }
    }

    /// `since(sel) OP d` as a value, as [`Plan::since`] makes it a formula.
    fn since_calc(&mut self, sel: &Selector, op: CmpOp, d: i64, terms: &mut Vec<usize>) -> Calc {
        let mut seen = |p: &mut Plan, w: i64| -> Calc {
            if w <= 0 {
                return Calc::Lit(Value::Bool(false));
            }
            let stream = p.stream(sel, Some(w as u64), Read::Unit);
            let t = p.term(TermDef { stream, agg: Agg::Count });
            let i = terms.iter().position(|&x| x == t).unwrap_or_else(|| {
                terms.push(t);
                terms.len() - 1
            });
            Calc::Cmp(
                CmpOp::Ge,
                Box::new(Calc::Slot(i)),
                Box::new(Calc::Lit(Value::Num(Dec::from_int(1)))),
            )
        };
        let lt = seen(self, d);
        let le = seen(self, d.saturating_add(1));
        let not = |c: Calc| Calc::Not(Box::new(c));
        let and = |a: Calc, b: Calc| Calc::And(Box::new(a), Box::new(b));
        match op {
            CmpOp::Lt => lt,
            CmpOp::Le => le,
            CmpOp::Gt => not(le),
            CmpOp::Ge => not(lt),
            CmpOp::Eq => and(le, not(lt)),
            CmpOp::Ne => not(and(le, not(lt))),
        }
    }
}

/// A `Debug` rendering with every `pos: Pos { … }` removed, outside the
/// string literals it renders (whose text is the spec's own: a filter
/// comparing with `'pos: Pos {a}'` keeps it, or two different filters would
/// share a stream).
fn without_positions(debug: &str) -> String {
    const MARK: &str = "pos: Pos {";
    let mut out = String::with_capacity(debug.len());
    let (mut at, mut in_string) = (0, false);
    let bytes = debug.as_bytes();
    while at < bytes.len() {
        match bytes[at] {
            // `Debug` escapes a quote and a backslash inside a literal.
            b'\\' if in_string => {
                out.push_str(&debug[at..at + 2]);
                at += 2;
                continue;
            }
            b'"' => in_string = !in_string,
            _ if !in_string && debug[at..].starts_with(MARK) => {
                at += MARK.len();
                at += debug[at..].find('}').map_or(debug.len() - at, |j| j + 1);
                continue;
            }
            _ => {}
        }
        let next = at + debug[at..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&debug[at..next]);
        at = next;
    }
    out
}

fn flip(op: CmpOp) -> CmpOp {
    match op {
        CmpOp::Ge => CmpOp::Le,
        CmpOp::Gt => CmpOp::Lt,
        CmpOp::Le => CmpOp::Ge,
        CmpOp::Lt => CmpOp::Gt,
        o => o,
    }
}

/// Folds a constant duration expression (checked by `spec::check`).
fn const_duration(e: &Expr) -> i64 {
    fn eval(e: &Expr) -> Value {
        match &e.kind {
            ExprKind::Dur(ms) => Value::Dur(*ms as i64),
            ExprKind::Num(d) => Value::Num(*d),
            ExprKind::Neg(a) => eval(a).neg(),
            ExprKind::Arith(op, a, b) => eval(a).arith(*op, &eval(b)),
            _ => Value::Missing,
        }
    }
    match eval(e) {
        Value::Dur(d) => d,
        _ => i64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::Plan;

    #[test]
    fn filters_that_differ_only_in_a_literal_like_a_position_are_two_streams() {
        // Found by review: the stream key stripped `pos: Pos {…}` inside
        // string literals too, so these two shared one stream.
        let spec = "[[segment]]\nname = \"a\"\nwhen = \"count('x' where t == 'pos: Pos {a}', 1h) >= 1\"\n\n\
                    [[segment]]\nname = \"b\"\nwhen = \"count('x' where t == 'pos: Pos {b}', 1h) >= 1\"\n\n\
                    [[segment]]\nname = \"c\"\nwhen = \"count('x' where  t == 'pos: Pos {a}', 1h) >= 1\"\n";
        let plan = Plan::new(&crate::spec::parse_spec(spec, 1000).expect("a valid spec"));
        // a and c differ only in where their filter starts: one stream.
        assert_eq!(
            plan.streams.len(),
            2,
            "{:?}",
            plan.streams.iter().map(|s| &s.sel).collect::<Vec<_>>()
        );
    }
}
