//! Rules: every segment's formula, evaluated per profile.
//!
//! Each atom (one comparison) is evaluated per profile from the terms it
//! reads. An atom over one term is a function of the term's row, so it is
//! evaluated where the row changes, on its old and new values, and only a
//! value that differs goes on ([`Plan::flips`]): inside the terms stage for
//! event streams (no row need travel), and from the rows a tick retracts
//! and inserts together for population streams. Atoms over several terms
//! gather them in one `reduce` keyed by `(atom, profile)`. A profile with no row
//! for an atom's terms sees their empty values (`count` 0, `avg` missing,
//! …), so the atom's value there is known in advance and need not be a row.
//!
//! Segments are then one operator keyed by profile (all three are built on
//! [`crate::dataflow::total`]'s shells): its inputs are the profile's atom values and
//! the universe, its state per profile three bit sets (atoms with a row,
//! their values, the segments it is in), and its output the segments the
//! profile is in, each formula evaluated in `in_segment` order over those
//! values. A change of one atom re-evaluates
//! one profile's formulas — a handful of boolean operations — and only the
//! memberships that changed are emitted. (Rendering each
//! `and` as a semijoin and each `or` as a distinct union instead took one
//! or two arrangements per operator; on `retail.toml` both cost about the
//! same instructions, and this has fewer operators and no universe-sized
//! sets — see `docs/decisions.md`.) When every atom comes from one
//! event-stream term and no term rows are read, that state is kept in the
//! terms stage's entry for the profile instead
//! (`crate::dataflow::terms::terms_and_segments`, with [`Rules`]).

use differential_dataflow::consolidation::consolidate;
use differential_dataflow::VecCollection;
use std::rc::Rc;

use crate::core::fact::AtomRow;
use crate::core::id::AtomId;
use crate::core::id::Key;
use crate::core::id::SegmentId;
use crate::core::id::StreamId;
use crate::core::value::Value;
use crate::dataflow::total::{binary_by_tick, TotalOps, Updates};
use crate::plan::{Formula, Plan};

/// The universe with each profile's name: `(profile, name)`.
type Profiles<'s, N> = VecCollection<'s, u64, (Key, N), isize>;

/// `((atom, profile), holds)` from term rows, for what the terms stage
/// does not evaluate itself ([`Plan::flips`]): the atoms over one term of a
/// population stream (thresholds, RFM, clusters), and the atoms over
/// several terms. `None` when the plan has neither.
pub fn atoms<'s>(
    terms: VecCollection<'s, u64, ((StreamId, Key), Vec<Value>), isize>,
    plan: Rc<Plan>,
) -> Option<VecCollection<'s, u64, AtomRow, isize>> {
    let events = plan.streams.len();
    let population = events < plan.folds.len();
    let several = plan.atoms.iter().any(|a| a.terms.len() > 1 && !a.timed);
    let direct = population.then(|| {
        let single = plan.clone();
        // The rows a tick retracts and inserts together, evaluated in
        // place: only the atom values that differ go on.
        let mut net: Vec<(AtomRow, isize)> = Vec::new();
        let rows = terms.clone().filter(move |((stream, _), _)| stream.index() >= events);
        rows.by_tick("Atoms", move |t, rows, out| {
            for (((stream, profile), values), r) in rows.drain(..) {
                for (&term, value) in single.folds[stream.index()].iter().zip(&values) {
                    for &(atom, _) in &single.readers[term] {
                        let def = &single.atoms[atom];
                        if def.terms.len() == 1 && !def.timed {
                            net.push((((AtomId::of(atom), profile), def.holds(std::slice::from_ref(value))), r));
                        }
                    }
                }
            }
            consolidate(&mut net);
            out.extend(net.drain(..).map(|(atom, r)| (atom, t, r)));
        })
    });
    if !several {
        return direct;
    }
    let readers = plan.clone();
    let slots = terms.flat_map(move |((stream, profile), values)| {
        let mut rows = Vec::new();
        for (&term, value) in readers.folds[stream.index()].iter().zip(values) {
            for &(atom, slot) in &readers.readers[term] {
                if readers.atoms[atom].terms.len() > 1 && !readers.atoms[atom].timed {
                    rows.push(((AtomId::of(atom), profile), (slot as u32, value.clone())));
                }
            }
        }
        rows
    });
    let gathered = slots.reduce_total("AtomsOfSeveral", {
        let plan = plan.clone();
        move |(atom, _profile), slots, out| {
            let def = &plan.atoms[atom.index()];
            let mut values: Vec<Value> = def.terms.iter().map(|&t| plan.terms[t].agg.empty()).collect();
            for ((slot, value), _) in slots {
                values[*slot as usize] = value.clone();
            }
            out.push((def.holds(&values), 1));
        }
    });
    Some(match direct {
        Some(direct) => direct.concat(gathered),
        None => gathered,
    })
}

/// One profile's state in `Segments`: whether it exists (its universe
/// multiplicity) and whether that changed at this tick, its name, and four
/// bit sets of `words` words each, side by side: the atoms with a row,
/// their values, the segments it is in, and the atoms updated at this tick.
/// Inline up to 64 atoms and 64 segments, so a profile is one hash-map
/// entry with no allocation of its own.
pub(crate) struct Held<N> {
    exists: isize,
    touched: bool,
    moved: bool,
    name: Option<N>,
    bits: smallvec::SmallVec<[u64; 4]>,
}

impl<N> Held<N> {
    /// Notes the profile as touched at this tick; true the first time.
    pub(crate) fn touch(&mut self) -> bool {
        !std::mem::replace(&mut self.touched, true)
    }

    pub(crate) fn is_touched(&self) -> bool {
        self.touched
    }

    /// Whether it holds nothing: not in the universe, no atom row.
    pub(crate) fn is_empty(&self) -> bool {
        debug_assert!(self.exists >= 0, "a profile leaves the universe once");
        self.exists <= 0 && self.bits[..self.bits.len() / 4].iter().all(|w| *w == 0)
    }
}

/// Whether bit `i` of `words` is set.
fn bit(words: &[u64], i: usize) -> bool {
    words[i / 64] >> (i % 64) & 1 == 1
}

/// The indices of the bits set in `words`.
fn ones(words: impl IntoIterator<Item = u64>) -> impl Iterator<Item = usize> {
    words.into_iter().enumerate().flat_map(|(i, w)| {
        let mut w = w;
        std::iter::from_fn(move || {
            (w != 0).then(|| {
                let s = i * 64 + w.trailing_zeros() as usize;
                w &= w - 1;
                s
            })
        })
    })
}

/// Whether `a` and `b` share a set bit.
fn meet(a: &[u64], b: &[u64]) -> bool {
    a.iter().zip(b).any(|(x, y)| x & y != 0)
}

/// What a formula reads: `(atoms, segments)` as bit sets of `words` words.
fn reads(f: &Formula, words: usize) -> (Vec<u64>, Vec<u64>) {
    fn walk(f: &Formula, atoms: &mut [u64], segments: &mut [u64]) {
        match f {
            Formula::True | Formula::False => {}
            Formula::Atom(a) => set(atoms, *a, true),
            Formula::Segment(s) => set(segments, *s, true),
            Formula::Not(x) => walk(x, atoms, segments),
            Formula::And(x, y) | Formula::Or(x, y) => {
                walk(x, atoms, segments);
                walk(y, atoms, segments);
            }
        }
    }
    let (mut atoms, mut segments) = (vec![0; words], vec![0; words]);
    walk(f, &mut atoms, &mut segments);
    (atoms, segments)
}

fn set(words: &mut [u64], i: usize, to: bool) {
    let mask = 1 << (i % 64);
    if to {
        words[i / 64] |= mask;
    } else {
        words[i / 64] &= !mask;
    }
}

/// The members of every segment, as `(segment, the profile's name)`, from
/// the atom values [`atoms`] gives and the universe with each profile's
/// name (`crate::dataflow::identity`'s `names`): one operator keyed by profile
/// that keeps each profile's atom values and memberships as bit sets
/// ([`Held`]). A tick's changed profiles evaluate, in `in_segment` order,
/// the formulas that read an atom updated at the tick or a segment whose
/// membership just changed (all of them when the profile enters the
/// universe), an atom without a row taking its value over empty terms, and
/// only memberships that changed are emitted. A profile that does not
/// exist is in no segment.
///
/// Each atom of a profile has at most one row at a complete tick (one term
/// row, or one reduce, is its only source), so a tick's updates are
/// consolidated, its retractions applied before its insertions, and a row
/// is a bit, not a multiset.
///
/// Memberships come out named: the profile's name is kept in its row here,
/// where a row per profile is kept anyway, instead of a join of every
/// membership with every profile's name (a hash-map entry per profile, a
/// tenth of a profile's memory, and an exchange per membership change).
/// A profile has one name (its key is its name's hash); should a name
/// change (two ids whose keys collide), the memberships held move to the
/// new one.
pub fn segments<'s, N>(
    atoms: VecCollection<'s, u64, AtomRow, isize>,
    universe: Profiles<'s, N>,
    plan: Rc<Plan>,
) -> VecCollection<'s, u64, (SegmentId, N), isize>
where
    N: timely::ExchangeData + Clone + Ord,
{
    use differential_dataflow::hashable::Hashable;
    let mut rules = Rules::new(plan);
    let mut held: rustc_hash::FxHashMap<Key, Held<N>> = Default::default();
    let mut touched: Vec<Key> = Vec::new();
    let by_profile = (|((_, p), _): &AtomRow| p.hashed(), |(p, _): &(Key, N)| p.hashed());
    binary_by_tick(atoms, universe, "Segments", by_profile, move |t, rows, exists, out, _| {
        // Consolidated, so that a name both given and taken back within
        // the tick does not count.
        consolidate(exists);
        for ((p, name), r) in exists.drain(..) {
            let h = held.entry(p).or_insert_with(|| rules.held());
            if h.touch() {
                touched.push(p);
            }
            rules.name(p, h, name, r);
        }
        // Consolidated, then retractions first: a changed atom's old row
        // goes before its new one.
        consolidate(rows);
        rows.sort_unstable_by_key(|(_, r)| *r);
        crate::dataflow::total::warm(&held, rows.iter().map(|(((_, p), _), _)| p), |h| h.exists as usize);
        for &(((atom, p), value), r) in rows.iter() {
            let h = held.entry(p).or_insert_with(|| rules.held());
            if h.touch() {
                touched.push(p);
            }
            rules.atom(h, atom, value, r);
        }
        for p in touched.drain(..) {
            let h = held.get_mut(&p).expect("a touched profile");
            rules.evaluate(t, p, h, out);
            if h.is_empty() {
                held.remove(&p);
            }
        }
    })
}

/// How a profile's memberships follow from its [`Held`] state: the plan's
/// formulas, what each reads, the atoms' values over empty terms, and room
/// reused for every profile. `Segments` keeps a [`Held`] per profile in a
/// map of its own; the terms stage keeps it next to the profile's terms
/// when nothing else feeds atoms (`crate::dataflow::terms`), so that an
/// event's facts, atoms and memberships are one entry.
pub(crate) struct Rules<N> {
    plan: Rc<Plan>,
    words: usize,
    /// Each atom's value over empty terms.
    empty: Vec<u64>,
    /// What each segment's formula reads: `(atoms, segments)`.
    reads: Vec<(Vec<u64>, Vec<u64>)>,
    /// Profiles renamed at this tick, with their old names.
    renamed: Vec<(Key, N)>,
    /// Reused for every profile: which atoms hold, which segments it is
    /// in, which memberships changed.
    holds: Vec<u64>,
    member: Vec<u64>,
    flipped: Vec<u64>,
}

impl<N: Clone + Eq> Rules<N> {
    pub(crate) fn new(plan: Rc<Plan>) -> Self {
        let words = plan.atoms.len().max(plan.segments.len()).div_ceil(64).max(1);
        let mut empty = vec![0u64; words];
        for (i, a) in plan.atoms.iter().enumerate() {
            set(
                &mut empty,
                i,
                a.holds(&a.terms.iter().map(|&t| plan.terms[t].agg.empty()).collect::<Vec<_>>()),
            );
        }
        let reads = plan.segments.iter().map(|s| reads(&s.formula, words)).collect();
        Rules {
            plan,
            words,
            empty,
            reads,
            renamed: Vec::new(),
            holds: vec![0; words],
            member: vec![0; words],
            flipped: vec![0; words],
        }
    }

    /// A profile's state before anything is known of it.
    pub(crate) fn held(&self) -> Held<N> {
        Held {
            exists: 0,
            touched: false,
            moved: false,
            name: None,
            bits: smallvec::smallvec![0; 4 * self.words],
        }
    }

    /// `p` entering (`r > 0`) or leaving the universe under `name`; a tick's
    /// updates consolidated.
    pub(crate) fn name(&mut self, p: Key, h: &mut Held<N>, name: N, r: isize) {
        h.exists += r;
        h.moved = true;
        if r > 0 && h.name.as_ref() != Some(&name) {
            if let Some(old) = h.name.replace(name) {
                // Moved from the name held before the tick, once.
                if !self.renamed.iter().any(|(q, _)| *q == p) {
                    self.renamed.push((p, old));
                }
            }
        }
    }

    /// An atom's row: a retraction (`r < 0`) of the value held, or a new
    /// value of an atom without a row; a changed atom's retraction first.
    pub(crate) fn atom(&self, h: &mut Held<N>, atom: AtomId, value: bool, r: isize) {
        let words = self.words;
        let (present, rest) = h.bits.split_at_mut(words);
        let (values, rest) = rest.split_at_mut(words);
        let a = atom.index();
        set(&mut rest[words..], a, true);
        if r < 0 {
            debug_assert!(bit(present, a) && bit(values, a) == value, "a retracted atom row is held");
            set(present, a, false);
        } else {
            debug_assert!(!bit(present, a), "one row per atom and profile");
            set(present, a, true);
            set(values, a, value);
        }
    }

    /// Evaluates a profile touched at `t`, in `in_segment` order, the
    /// formulas that read an atom updated at the tick or a segment whose
    /// membership just changed (all of them when the profile entered or
    /// left the universe), and emits the memberships that changed.
    pub(crate) fn evaluate(&mut self, t: u64, p: Key, h: &mut Held<N>, out: &mut Updates<(SegmentId, N)>) {
        let words = self.words;
        h.touched = false;
        let (present, rest) = h.bits.split_at_mut(words);
        let (values, rest) = rest.split_at_mut(words);
        let (was, dirty) = rest.split_at_mut(words);
        // Named before it can be in a segment: only a profile in the
        // universe is, and the universe brings its name.
        let name = || h.name.as_ref().expect("a member has a name");
        if let Some(at) = self.renamed.iter().position(|(q, _)| *q == p) {
            let (_, old) = self.renamed.swap_remove(at);
            let name = name();
            for s in ones(was.iter().copied()).filter(|_| old != *name) {
                out.push(((SegmentId::of(s), old.clone()), t, -1));
                out.push(((SegmentId::of(s), name.clone()), t, 1));
            }
        }
        let (holds, member, flipped) = (&mut self.holds, &mut self.member, &mut self.flipped);
        member.iter_mut().for_each(|w| *w = 0);
        if h.exists > 0 {
            for (i, w) in holds.iter_mut().enumerate() {
                *w = present[i] & values[i] | !present[i] & self.empty[i];
            }
            // A formula whose reads did not change keeps its value.
            let all = h.moved;
            if !all {
                member.copy_from_slice(was);
            }
            flipped.iter_mut().for_each(|w| *w = 0);
            for &s in &self.plan.order {
                let (atoms, segments) = &self.reads[s];
                if all || meet(dirty, atoms) || meet(flipped, segments) {
                    let is = self.plan.segments[s].formula.eval(&|a| bit(holds, a), &|s| bit(member, s));
                    if is != bit(member, s) {
                        set(member, s, is);
                        set(flipped, s, true);
                    }
                }
            }
        }
        h.moved = false;
        dirty.iter_mut().for_each(|w| *w = 0);
        for s in ones(was.iter().zip(member.iter()).map(|(old, new)| old ^ new)) {
            out.push(((SegmentId::of(s), name().clone()), t, if bit(member, s) { 1 } else { -1 }));
        }
        was.copy_from_slice(member);
    }
}

#[cfg(test)]
mod tests {
    //! `segments` against memberships recomputed from scratch at every tick.

    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::{Arc, Mutex};

    use differential_dataflow::consolidation::consolidate_updates;
    use differential_dataflow::input::Input;
    use proptest::prelude::*;
    use timely::dataflow::operators::Inspect;

    use super::*;

    const SPEC: &str = r#"
[[segment]]
name = "a"
when = "count('A', 1h) >= 2 or count('B', 1h) == 0"
[[segment]]
name = "b"
when = "in_segment('a') and not count('C', 1h) >= 1"
[[segment]]
name = "c"
when = "not in_segment('b') or sum('A', x, 1h) > 3"
"#;

    /// A chain of 70 segments over 70 atoms, so the bit sets take two words.
    fn wide() -> String {
        (0..70)
            .map(|i| {
                let when = match i {
                    0 => "count('A', 1h) >= 100".to_string(),
                    i if i % 3 == 0 => format!("not in_segment('s{}') and count('B', 1h) >= {i}", i - 1),
                    i => format!("count('A', 1h) >= {i} or in_segment('s{}')", i - 1),
                };
                format!("[[segment]]\nname = \"s{i}\"\nwhen = \"{when}\"\n")
            })
            .collect()
    }

    fn plan(spec: &str) -> Plan {
        Plan::new(&crate::spec::parse_spec(spec, 1000).expect("a valid spec"))
    }

    type Out = Vec<((SegmentId, Key), u64, isize)>;

    /// The members at the end of every tick from the atom rows and the
    /// universe as they stand then: the definition, from scratch.
    fn naive(plan: &Plan, rows: &BTreeMap<(AtomId, Key), bool>, universe: &BTreeSet<Key>) -> BTreeSet<(SegmentId, Key)> {
        let mut members = BTreeSet::new();
        for &p in universe {
            let holds = |a: usize| {
                let atom = &plan.atoms[a];
                rows.get(&(AtomId::of(a), p))
                    .copied()
                    .unwrap_or_else(|| atom.holds(&atom.terms.iter().map(|&t| plan.terms[t].agg.empty()).collect::<Vec<_>>()))
            };
            let mut member = vec![false; plan.segments.len()];
            for &s in &plan.order {
                member[s] = plan.segments[s].formula.eval(&holds, &|t| member[t]);
                if member[s] {
                    members.insert((SegmentId::of(s), p));
                }
            }
        }
        members
    }

    /// An atom's row: (tick, atom, profile, new value: `None` removes it).
    type AtomChange = (u64, u32, u64, Option<bool>);
    /// A profile entering or leaving the universe: (tick, profile, enters).
    type Move = (u64, u64, bool);

    /// Memberships carry the profile's name; a profile whose name changes
    /// (two ids whose keys collide) moves its memberships to the new name,
    /// as a join of memberships with names would.
    #[test]
    fn memberships_follow_the_profiles_name() {
        type Named = Vec<((SegmentId, String), u64, isize)>;
        let got: Arc<Mutex<Named>> = Arc::default();
        let g = got.clone();
        timely::execute(timely::Config::process(1), move |worker| {
            let (g, plan) = (
                g.clone(),
                Rc::new(plan("[[segment]]\nname = \"idle\"\nwhen = \"count('A', 1h) == 0\"\n")),
            );
            let (mut a_in, mut u_in) = worker.dataflow::<u64, _, _>(|scope| {
                let (a_in, atoms) = scope.new_collection::<AtomRow, isize>();
                let (u_in, universe) = scope.new_collection::<(Key, String), isize>();
                segments(atoms, universe, plan)
                    .inner
                    .inspect(move |x| g.lock().unwrap().push(x.clone()));
                (a_in, u_in)
            });
            // Renamed at 1; at 2 a name given and taken back in one tick
            // (after the held one) changes nothing; gone at 3.
            let updates = [
                ((7, "x"), 0, 1),
                ((7, "x"), 1, -1),
                ((7, "y"), 1, 1),
                ((7, "z"), 2, 1),
                ((7, "z"), 2, -1),
                ((7, "y"), 3, -1),
            ];
            for (d, t, r) in updates {
                u_in.update_at((d.0, d.1.to_string()), t, r);
            }
            a_in.advance_to(4);
            u_in.advance_to(4);
        })
        .expect("timely runs");
        let mut got = std::mem::take(&mut *got.lock().unwrap());
        consolidate_updates(&mut got);
        let idle = |n: &str| (SegmentId::of(0), n.to_string());
        assert_eq!(
            got,
            vec![(idle("x"), 0, 1), (idle("x"), 1, -1), (idle("y"), 1, 1), (idle("y"), 3, -1)]
        );
    }

    proptest! {
        #[test]
        fn segments_match_a_recomputation_at_every_tick(
            changes in prop::collection::vec((0u64..12, 0u32..4, 0u64..5, prop::option::of(any::<bool>())), 0..60),
            moves in prop::collection::vec((0u64..12, 0u64..5, any::<bool>()), 0..20),
            workers in 1usize..3,
        ) {
            check(SPEC, changes, moves, workers)?;
        }

        #[test]
        fn segments_past_64_atoms_and_segments_match_a_recomputation(
            changes in prop::collection::vec((0u64..12, 0u32..70, 0u64..3, prop::option::of(any::<bool>())), 0..150),
            moves in prop::collection::vec((0u64..12, 0u64..3, any::<bool>()), 0..10),
        ) {
            check(&wide(), changes, moves, 1)?;
        }
    }

    /// Feeds `changes` and `moves` to `segments` over `spec` on `workers`
    /// workers, and holds the output against the members recomputed at
    /// every tick.
    fn check(spec: &str, changes: Vec<AtomChange>, moves: Vec<Move>, workers: usize) -> Result<(), TestCaseError> {
        let plan = plan(spec);
        let atoms = plan.atoms.len() as u32;
        prop_assert!(changes.iter().all(|c| c.1 < atoms), "{} atoms", atoms);
        // Both inputs as updates, and the expected members at each tick.
        let (mut rows, mut universe) = (BTreeMap::new(), BTreeSet::new());
        let (mut atom_updates, mut universe_updates) = (Vec::new(), Vec::new());
        let mut expected: Out = Vec::new();
        let mut before = BTreeSet::new();
        for tick in 0..12u64 {
            for &(_, a, p, to) in changes.iter().filter(|c| c.0 == tick) {
                let a = AtomId(a);
                let was = rows.get(&(a, p)).copied();
                if was != to {
                    atom_updates.extend(was.map(|w| (((a, p), w), tick, -1)));
                    atom_updates.extend(to.map(|v| (((a, p), v), tick, 1)));
                    match to {
                        Some(v) => rows.insert((a, p), v),
                        None => rows.remove(&(a, p)),
                    };
                }
            }
            for &(_, p, enter) in moves.iter().filter(|m| m.0 == tick) {
                if enter && universe.insert(p) {
                    universe_updates.push((p, tick, 1));
                } else if !enter && universe.remove(&p) {
                    universe_updates.push((p, tick, -1));
                }
            }
            let now = naive(&plan, &rows, &universe);
            expected.extend(before.difference(&now).map(|m| (*m, tick, -1)));
            expected.extend(now.difference(&before).map(|m| (*m, tick, 1)));
            before = now;
        }
        consolidate_updates(&mut expected);
        let got: Arc<Mutex<Out>> = Arc::default();
        let (g, spec) = (got.clone(), spec.to_string());
        // A worker's panic fails the test at once instead of hanging it.
        crate::dataflow::exit_when_a_worker_panics();
        timely::execute(timely::Config::process(workers), move |worker| {
            let (g, plan) = (g.clone(), Rc::new(self::plan(&spec)));
            let (mut a_in, mut u_in) = worker.dataflow::<u64, _, _>(|scope| {
                let (a_in, atoms) = scope.new_collection();
                let (u_in, universe) = scope.new_collection();
                let named = universe.map(|p: Key| (p, p));
                segments(atoms, named, plan).inner.inspect(move |x| g.lock().unwrap().push(*x));
                (a_in, u_in)
            });
            if worker.index() == 0 {
                for &(d, t, r) in &atom_updates {
                    a_in.update_at(d, t, r);
                }
                for &(d, t, r) in &universe_updates {
                    u_in.update_at(d, t, r);
                }
            }
            a_in.advance_to(12);
            u_in.advance_to(12);
        })
        .expect("timely runs");
        let mut got = std::mem::take(&mut *got.lock().unwrap());
        consolidate_updates(&mut got);
        prop_assert_eq!(got, expected);
        Ok(())
    }
}
