//! Terms: one aggregate value per profile, maintained incrementally.
//!
//! The reader turns each event into [`Pay`]loads for the streams it matches
//! ([`crate::ingest::select::extract`]); [`window`](crate::dataflow::window) bounds them in time; [`terms`]
//! re-keys them from anchor id to profile through the identity labels and
//! keeps every term of a profile in one entry keyed by profile (a
//! [`Book`]): a count for a stream whose every term is a `count` (those
//! facts travel without their payload; one join re-keys both kinds,
//! keeping each id's profile once), otherwise the stream's facts and the
//! values folded from them. The join and the operator keyed by profile
//! are built on [`crate::dataflow::total`]'s shells for totally ordered
//! time. A merge of two profiles is a change of label, so the join re-keys
//! every fact of the merged side and every aggregate downstream corrects
//! itself.
//!
//! Where a term changes, the atoms over it are evaluated on its old and new
//! value and only those that flip go on. When nothing else feeds atoms
//! and no term rows are read (see `crate::dataflow::build_with`), the
//! segments' state sits in the same entry too ([`terms_and_segments`]): an
//! event's facts, the atoms they flip and the memberships those change are
//! one hash-map lookup, with nothing queued between them.

use differential_dataflow::consolidation::consolidate;
use differential_dataflow::hashable::Hashable;
use differential_dataflow::VecCollection;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::rc::Rc;
use timely::ExchangeData;

use crate::core::fact::AtomRow;
use crate::core::fact::Pay;
use crate::core::id::Key;
use crate::core::id::SegmentId;
use crate::core::id::StreamId;
use crate::core::value::{Dec, Float, Value};
use crate::dataflow::rules::{Held, Rules};
use crate::dataflow::total::{binary_by_tick, merge_one, room, ternary_by_tick, warm};
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
/// one number, far cheaper than a fold, and a fact without a payload is
/// cheaper to queue and join. Both kinds meet in one operator keyed by
/// profile, whose entry holds all of a profile's terms ([`Book`]), so the
/// facts an event brings for several streams find their state in one place.
pub fn terms<'s>(
    facts: (Facts<'s, ()>, Facts<'s, Pay>),
    labels: VecCollection<'s, u64, (Key, Key), isize>,
    plan: Rc<Plan>,
    (tick, rows): (u64, bool),
) -> Terms<'s> {
    let (counted, folded) = rekey(facts, labels, &plan, tick);
    let mut ledger: Ledger<()> = Ledger::default();
    let mut changes: Vec<(Change, isize)> = Vec::new();
    let by_profile = (|((_, p), ()): &Keyed<()>| p.hashed(), |((_, p), _): &Keyed<Pay>| p.hashed());
    let changes = binary_by_tick(counted, folded, "Terms", by_profile, move |t, counted, folded, out, _| {
        ledger.gather((counted, folded), || ());
        ledger.settle(
            &plan,
            |(), key, old, new| changed(&plan, key, old, new, rows, &mut changes),
            |()| false,
        );
        out.extend(changes.drain(..).map(|(c, r)| (c, t, r)));
    });
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

/// [`terms`] and [`rules::segments`] in one operator, for a plan whose
/// atoms all come from single event-stream terms and a run that needs no
/// term rows (see `crate::dataflow::build_with`): each profile's entry
/// holds its terms, its atom values and its memberships ([`Held`]), so an
/// event's facts, the atoms they flip and the segments those change are
/// one hash-map lookup, with no atom rows queued or exchanged between.
/// Its output is [`rules::segments`]'s: `(segment, the profile's name)`
/// for every member, from `names` (`(profile, name)` for every profile).
pub fn terms_and_segments<'s, N>(
    facts: (Facts<'s, ()>, Facts<'s, Pay>),
    labels: VecCollection<'s, u64, (Key, Key), isize>,
    names: VecCollection<'s, u64, (Key, N), isize>,
    plan: Rc<Plan>,
    tick: u64,
) -> VecCollection<'s, u64, (SegmentId, N), isize>
where
    N: ExchangeData + Clone + Ord,
{
    let (counted, folded) = rekey(facts, labels, &plan, tick);
    let mut rules = Rules::new(plan.clone());
    let mut ledger: Ledger<Held<N>> = Ledger::default();
    let mut touched: Vec<Key> = Vec::new();
    let by_profile = (
        |((_, p), ()): &Keyed<()>| p.hashed(),
        |((_, p), _): &Keyed<Pay>| p.hashed(),
        |(p, _): &(Key, N)| p.hashed(),
    );
    ternary_by_tick(
        (counted, folded, names),
        "Terms",
        by_profile,
        move |t, (counted, folded, names), out| {
            // Consolidated, so that a name both given and taken back within
            // the tick does not count.
            consolidate(names);
            for ((p, name), r) in names.drain(..) {
                let held = &mut ledger.entry(p, || rules.held()).more;
                if held.touch() {
                    touched.push(p);
                }
                rules.name(p, held, name, r);
            }
            ledger.gather((counted, folded), || rules.held());
            ledger.settle(
                &plan,
                |held, key, old, new| {
                    plan.flips(key, old, new, |((atom, p), value), r| {
                        if held.touch() {
                            touched.push(p);
                        }
                        rules.atom(held, atom, value, r);
                    })
                },
                |held| held.is_touched() || !held.is_empty(),
            );
            for p in touched.drain(..) {
                let entry = ledger.profiles.get_mut(&p).expect("a touched profile");
                rules.evaluate(t, p, &mut entry.more, out);
                if entry.more.is_empty() && entry.book.is_empty() {
                    ledger.profiles.remove(&p);
                }
            }
        },
    )
}

/// A fact of a stream re-keyed to its profile, with its payload.
type Keyed<P> = ((StreamId, Key), P);

/// A tick's re-keyed facts, as the operator's shell hands them over.
type Batch<P> = Vec<(Keyed<P>, isize)>;

/// Facts re-keyed to profiles.
type Rekeyed<'s, P> = VecCollection<'s, u64, Keyed<P>, isize>;

/// The profiles a tick touched, each with where its counts before the tick
/// start in the ledger's `before`.
type Touched = Vec<(Key, usize)>;

/// Windows the facts and re-keys them from anchor to profile (see
/// [`profile_of`]): `((stream, profile), ())` for counted streams and
/// `((stream, profile), payload)` for folded ones.
fn rekey<'s>(
    (counted, folded): (Facts<'s, ()>, Facts<'s, Pay>),
    labels: VecCollection<'s, u64, (Key, Key), isize>,
    plan: &Plan,
    tick: u64,
) -> (Rekeyed<'s, ()>, Rekeyed<'s, Pay>) {
    let windows = (Rc::new(plan.streams.iter().map(|s| s.window).collect::<Vec<_>>()), tick);
    profile_of(
        (counted, folded),
        windows,
        labels,
        "ProfileOf",
        (
            |_anchor, (stream, ()), profile| ((*stream, *profile), ()),
            |_anchor, (stream, pay), profile| ((*stream, *profile), pay.clone()),
        ),
    )
}

/// One profile's event-stream terms, each kept in stream order: the count
/// of each counted stream it has facts of, and the facts of each folded
/// stream with the values last folded from them.
#[derive(Default)]
struct Book {
    counts: Vec<(StreamId, isize)>,
    folds: Vec<Fold>,
    /// Whether its facts changed at the tick being processed.
    touched: bool,
}

impl Book {
    fn is_empty(&self) -> bool {
        self.counts.is_empty() && self.folds.is_empty()
    }
}

/// A folded stream's facts (sorted, consolidated) and their values.
struct Fold {
    stream: StreamId,
    facts: Vec<(Pay, isize)>,
    values: Option<TermValues>,
    /// Whether its facts changed at the tick being processed.
    touched: bool,
}

/// A profile's entry: its terms, and what the operator keeps beside them.
#[derive(Default)]
struct Entry<H> {
    book: Book,
    more: H,
}

/// Every profile's [`Book`], and the tick's changes to them.
struct Ledger<H> {
    profiles: FxHashMap<Key, Entry<H>>,
    /// The profiles whose facts changed at this tick.
    touched: Touched,
    before: Vec<(StreamId, isize)>,
}

impl<H> Default for Ledger<H> {
    fn default() -> Self {
        Ledger {
            profiles: FxHashMap::default(),
            touched: Vec::new(),
            before: Vec::new(),
        }
    }
}

impl<H> Ledger<H> {
    /// `p`'s entry, made with `fresh` if it has none.
    fn entry(&mut self, p: Key, fresh: impl FnOnce() -> H) -> &mut Entry<H> {
        entry_of(&mut self.profiles, p, fresh)
    }

    /// Adds a tick's facts to their profiles' books, noting each profile
    /// they touch once, with its counts as they were.
    fn gather(&mut self, (counted, folded): (&mut Batch<()>, &mut Batch<Pay>), fresh: impl Fn() -> H) {
        let keys = counted.iter().map(|(((_, p), ()), _)| p);
        warm(&self.profiles, keys.chain(folded.iter().map(|(((_, p), _), _)| p)), |e| {
            e.book.counts.len()
        });
        let Ledger { profiles, touched, before } = self;
        // A run of one profile's facts (an event's, kept together since
        // the reader fed them) finds its book once.
        let mut counted = counted.drain(..).peekable();
        while let Some((((stream, p), ()), r)) = counted.next() {
            let counts = &mut book_of(profiles, (touched, before), p, &fresh).counts;
            add_count(counts, stream, r);
            while let Some((((stream, _), ()), r)) = counted.next_if(|(((_, q), ()), _)| *q == p) {
                add_count(counts, stream, r);
            }
        }
        let mut folded = folded.drain(..).peekable();
        while let Some((((stream, p), pay), r)) = folded.next() {
            let folds = &mut book_of(profiles, (touched, before), p, &fresh).folds;
            add_fact(folds, stream, pay, r);
            while let Some((((stream, _), pay), r)) = folded.next_if(|(((_, q), _), _)| *q == p) {
                add_fact(folds, stream, pay, r);
            }
        }
    }
}

/// `p`'s entry, made with `fresh` if it has none.
fn entry_of<H>(profiles: &mut FxHashMap<Key, Entry<H>>, p: Key, fresh: impl FnOnce() -> H) -> &mut Entry<H> {
    profiles.entry(p).or_insert_with(|| Entry {
        book: Book::default(),
        more: fresh(),
    })
}

/// `p`'s book, noted as touched at this tick (with its counts as they
/// were) the first time.
fn book_of<'a, H>(
    profiles: &'a mut FxHashMap<Key, Entry<H>>,
    (touched, before): (&mut Touched, &mut Vec<(StreamId, isize)>),
    p: Key,
    fresh: &impl Fn() -> H,
) -> &'a mut Book {
    let entry = entry_of(profiles, p, fresh);
    if !std::mem::replace(&mut entry.book.touched, true) {
        touched.push((p, before.len()));
        before.extend_from_slice(&entry.book.counts);
    }
    &mut entry.book
}

/// Adds `r` to `stream`'s count (a book's counts are in stream order).
fn add_count(counts: &mut Vec<(StreamId, isize)>, stream: StreamId, r: isize) {
    match counts.binary_search_by_key(&stream, |c| c.0) {
        Ok(at) => counts[at].1 += r,
        Err(at) => {
            room(counts);
            counts.insert(at, (stream, r));
        }
    }
}

/// Adds a fact of `stream` to a book's folds (in stream order), noting
/// the stream as touched.
fn add_fact(folds: &mut Vec<Fold>, stream: StreamId, pay: Pay, r: isize) {
    let at = match folds.binary_search_by_key(&stream, |f| f.stream) {
        Ok(at) => at,
        Err(at) => {
            room(folds);
            let fold = Fold {
                stream,
                facts: Vec::new(),
                values: None,
                touched: false,
            };
            folds.insert(at, fold);
            at
        }
    };
    folds[at].touched = true;
    merge_one(&mut folds[at].facts, pay, r);
}

impl<H> Ledger<H> {
    /// For every term the tick changed, `changed` sees the profile's other
    /// state, the key, and the term's old and new values (`None`: no facts);
    /// a profile left without facts is dropped unless `keep` says otherwise.
    fn settle(
        &mut self,
        plan: &Plan,
        mut changed: impl FnMut(&mut H, (StreamId, Key), Option<&[Value]>, Option<&[Value]>),
        keep: impl Fn(&H) -> bool,
    ) {
        let count = |n: isize| (n != 0).then(|| [Value::Num(Dec::from_int(n as i64))]);
        for (n, &(p, from)) in self.touched.iter().enumerate() {
            let to = self.touched.get(n + 1).map_or(self.before.len(), |next| next.1);
            let entry = self.profiles.get_mut(&p).expect("a touched profile");
            let (book, more) = (&mut entry.book, &mut entry.more);
            book.touched = false;
            let (old, new) = (&self.before[from..to], &book.counts);
            let (mut i, mut j) = (0, 0);
            while i < old.len() || j < new.len() {
                let (stream, was, is) = match (old.get(i), new.get(j)) {
                    (Some(a), Some(b)) if a.0 == b.0 => {
                        i += 1;
                        j += 1;
                        (a.0, a.1, b.1)
                    }
                    (Some(a), b) if b.is_none_or(|b| a.0 < b.0) => {
                        i += 1;
                        (a.0, a.1, 0)
                    }
                    (_, b) => {
                        let b = b.expect("one side left");
                        j += 1;
                        (b.0, 0, b.1)
                    }
                };
                if was != is {
                    let (was, is) = (count(was), count(is));
                    changed(more, (stream, p), was.as_ref().map(|v| &v[..]), is.as_ref().map(|v| &v[..]));
                }
            }
            book.counts.retain(|c| c.1 != 0);
            for fold in book.folds.iter_mut().filter(|f| f.touched) {
                fold.touched = false;
                let fresh = (!fold.facts.is_empty()).then(|| -> TermValues {
                    plan.folds[fold.stream.index()]
                        .iter()
                        .map(|&t| value(plan.terms[t].agg, fold.facts.iter().map(|(p, n)| (p, *n))))
                        .collect()
                });
                if fresh != fold.values {
                    changed(more, (fold.stream, p), fold.values.as_deref(), fresh.as_deref());
                    fold.values = fresh;
                }
            }
            book.folds.retain(|f| !f.facts.is_empty());
            if book.is_empty() && !keep(more) {
                self.profiles.remove(&p);
            }
        }
        self.touched.clear();
        self.before.clear();
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

#[cfg(test)]
mod fused_tests {
    //! `terms_and_segments` against `terms` followed by `rules::segments`
    //! (each held against recomputations of its own, and the whole engine
    //! against the reference evaluator in `tests/reference_props.rs`): the
    //! same memberships at the same ticks, over random facts, merges of
    //! profiles and profiles entering and leaving the universe.

    use std::sync::{Arc, Mutex};

    use differential_dataflow::consolidation::consolidate_updates;
    use differential_dataflow::input::Input;
    use proptest::prelude::*;
    use timely::dataflow::operators::{Inspect, Probe};

    use super::*;
    use crate::core::fact::FactOf;
    use crate::dataflow::rules::segments;
    use crate::dataflow::window::Advance;

    const SPEC: &str = r#"
[[segment]]
name = "a"
when = "count('A', 3s) >= 2 or count('B', 5s) == 0"
[[segment]]
name = "b"
when = "in_segment('a') and not count('C', lifetime) >= 1"
[[segment]]
name = "c"
when = "not in_segment('b') or sum('A', x, 3s) > 3"
[[segment]]
name = "d"
when = "max('C', x, 4s) >= 2 and count('B', 5s) >= 1"
"#;

    type Out = Vec<((SegmentId, Key), u64, isize)>;

    /// A fact: (anchor, stream, event time in ms, value of `x`, tick fed).
    type In = (u64, u32, u64, u8, u64);

    proptest! {
        #[test]
        fn fused_matches_terms_then_segments(
            facts in prop::collection::vec((0u64..5, 0u32..3, 0u64..15_000, 0u8..4, 0u64..15), 0..60),
            // (anchor, profile, tick, enters or leaves)
            labels in prop::collection::vec((0u64..5, 10u64..13, 0u64..15, any::<bool>()), 0..12),
            // (profile, tick, enters or leaves)
            names in prop::collection::vec((10u64..13, 0u64..15, any::<bool>()), 0..12),
            workers in 1usize..3,
        ) {
            let run = |fused: bool| run(fused, &facts, &labels, &names, workers);
            prop_assert_eq!(run(true), run(false));
        }
    }

    fn run(fused: bool, facts: &[In], labels: &[(u64, u64, u64, bool)], names: &[(u64, u64, bool)], workers: usize) -> Out {
        const TICK: u64 = 1_000;
        let (facts, labels, names) = (facts.to_vec(), labels.to_vec(), names.to_vec());
        let got: Arc<Mutex<Out>> = Arc::default();
        let g = got.clone();
        // A worker's panic fails the test at once instead of hanging it.
        crate::dataflow::exit_when_a_worker_panics();
        timely::execute(timely::Config::process(workers), move |worker| {
            let g = g.clone();
            let plan = Rc::new(Plan::new(&crate::spec::parse_spec(SPEC, TICK).expect("a valid spec")));
            let counted = plan.counted_streams();
            let (mut c_in, mut f_in, mut l_in, mut n_in, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (c_in, c) = scope.new_collection::<FactOf<()>, isize>();
                let (f_in, f) = scope.new_collection::<FactOf<Pay>, isize>();
                let (l_in, l) = scope.new_collection::<(Key, Key), isize>();
                let (n_in, n) = scope.new_collection::<(Key, Key), isize>();
                let members = if fused {
                    terms_and_segments((c, f), l, n, plan.clone(), TICK)
                } else {
                    let atoms = terms((c, f), l, plan.clone(), (TICK, false)).atoms;
                    segments(atoms, n, plan.clone())
                };
                let probe = members.inner.inspect(move |x| g.lock().unwrap().push(*x)).probe().0;
                (c_in, f_in, l_in, n_in, probe)
            });
            if worker.index() == 0 {
                let (mut held, mut named) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
                for tick in 0..15u64 {
                    let now = tick * TICK;
                    for &(a, s, e, x, _) in facts.iter().filter(|f| f.4 == tick) {
                        let effect = now.max(crate::core::clock::tick_of(e, TICK));
                        let stream = StreamId(s);
                        if counted[s as usize] {
                            c_in.update_at((a, stream, e, ()), effect, 1);
                        } else {
                            let pay = Pay::Val(Value::Num(Dec::from_int(x as i64)));
                            f_in.update_at((a, stream, e, pay), effect, 1);
                        }
                    }
                    for &(a, p, _, enter) in labels.iter().filter(|l| l.2 == tick) {
                        if enter && held.insert((a, p)) {
                            l_in.update_at((a, p), now, 1);
                        } else if !enter && held.remove(&(a, p)) {
                            l_in.update_at((a, p), now, -1);
                        }
                    }
                    for &(p, _, enter) in names.iter().filter(|n| n.1 == tick) {
                        if enter && named.insert(p) {
                            n_in.update_at((p, p), now, 1);
                        } else if !enter && named.remove(&p) {
                            n_in.update_at((p, p), now, -1);
                        }
                    }
                }
            }
            for input in [&mut c_in as &mut dyn Advance, &mut f_in, &mut l_in, &mut n_in] {
                input.advance(15 * TICK);
            }
            // Every tick complete before the inputs close, so that expiries
            // up to the last tick are released, not dropped.
            worker.step_while(|| probe.less_than(&(15 * TICK)));
        })
        .expect("timely runs");
        let mut got = std::mem::take(&mut *got.lock().unwrap());
        // Only complete ticks: expiries past the last are dropped alike.
        got.retain(|(_, t, _)| *t < 15 * TICK);
        consolidate_updates(&mut got);
        got
    }
}
