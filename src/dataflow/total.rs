//! Operators for totally ordered time that keep their state in hash maps.
//!
//! shoal's time is the tick, a `u64`: totally ordered, and an operator knows
//! a tick is complete once its input frontier has passed it. Over such time
//! a reduce or a join never needs a trace that can answer "as of time t" for
//! any t: it needs the state as of the last complete tick and the updates of
//! the next one. [`reduce`], [`count`], [`join`] and [`propagate`] keep
//! exactly that, one hash-map entry per key (per node for `propagate`), and
//! process complete ticks in ascending order through three shells,
//! [`by_tick`], `by_tick2` and `by_tick3` (two left inputs and two
//! outputs, for [`join_pair_staged`]) — the same specialisation differential's own
//! `count_total` and `threshold_total` make for total orders. Their outputs
//! are the collections differential's `reduce`, `count_total`, `join_core`
//! and `propagate` produce (the tests below hold them against those
//! operators), without a batcher, spine merges, cursor navigation or
//! fixed-point iteration per update, which were most of the worker's
//! instructions (see `docs/performance.md`).
//!
//! The cost is that their state is not an arrangement another operator could
//! share; nothing in shoal shares these.
//!
//! Stages use them as methods of collections ([`TotalOps`],
//! [`CountTotalOps`]), or [`binary_by_tick`] for a binary operator of their
//! own. A [`Stage`] is what an operator's input passes through before it
//! waits for its tick: the window is one (`crate::dataflow::window`), fused
//! into the join that re-keys facts to profiles ([`join_pair_staged`]).

use std::collections::VecDeque;
use std::hash::Hash;

use differential_dataflow::consolidation::consolidate;
use differential_dataflow::hashable::Hashable;
use differential_dataflow::{AsCollection, VecCollection};
use rustc_hash::FxHashMap;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::channels::pushers;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::{InputHandleCore, Operator, OutputBuilderSession};
use timely::dataflow::operators::Capability;
use timely::progress::frontier::MutableAntichain;
use timely::ExchangeData;

pub type Updates<D> = Vec<(D, u64, isize)>;
type Output<D> = CapacityContainerBuilder<Updates<D>>;

/// What an operator's input goes through before its updates wait for their
/// tick: [`Direct`] passes them on; a window (`crate::dataflow::window`) passes each
/// fact on and holds its retraction until the input reaches its expiry.
/// A stage holds updates only at ticks later than the input capability
/// they came with, so the capabilities the operator holds cover them.
pub trait Stage<D0, D> {
    /// Turns updates as they arrive into the operator's input, taking them
    /// out of `data`.
    fn admit(&mut self, data: &mut Vec<(D0, u64, isize)>, into: &mut Updates<D>);
    /// Adds the updates held for ticks the input's `frontier` has reached.
    fn release(&mut self, frontier: &MutableAntichain<u64>, into: &mut Updates<D>);
    /// The earliest tick of an update still held.
    fn next(&self) -> Option<u64>;
}

/// The stage that passes updates on as they are.
pub struct Direct;

impl<D> Stage<D, D> for Direct {
    fn admit(&mut self, data: &mut Vec<(D, u64, isize)>, into: &mut Updates<D>) {
        into.append(data);
    }
    fn release(&mut self, _frontier: &MutableAntichain<u64>, _into: &mut Updates<D>) {}
    fn next(&self) -> Option<u64> {
        None
    }
}

/// Updates that wait for their tick to complete, and the earliest tick
/// among them.
struct Pending<D> {
    updates: Updates<D>,
    least: Option<u64>,
}

impl<D> Default for Pending<D> {
    fn default() -> Self {
        Pending {
            updates: Vec::new(),
            least: None,
        }
    }
}

/// The first tick not yet complete for every input: times are totally
/// ordered, so each frontier is at most one tick (`None`: all closed).
fn bound(frontiers: &[&MutableAntichain<u64>]) -> Option<u64> {
    frontiers.iter().filter_map(|f| f.frontier().first().copied()).min()
}

impl<D> Pending<D> {
    /// Moves everything `input` holds into the pending updates, and makes
    /// `held` capabilities no later than any of them.
    fn absorb<D0, S, P>(&mut self, input: &mut InputHandleCore<u64, Vec<(D0, u64, isize)>, P>, held: &mut Held, stage: &mut S)
    where
        S: Stage<D0, D>,
        P: timely::communication::Pull<timely::dataflow::channels::Message<u64, Vec<(D0, u64, isize)>>>,
    {
        input.for_each(|cap, data| {
            let Some(least) = cap.least() else { return };
            if held.caps.first().is_none_or(|h| h.time() > least) {
                held.caps = (0..held.outputs).filter_map(|o| cap.retain_least(o)).collect();
            }
            let from = self.updates.len();
            stage.admit(data, &mut self.updates);
            self.noted(from);
        });
    }

    /// Takes note of the updates added from `from` on.
    fn noted(&mut self, from: usize) {
        let first = self.updates[from..].iter().map(|(_, t, _)| *t).min();
        self.least = self.least.into_iter().chain(first).min();
    }

    /// Adds what `stage` holds that its input's `frontier` has reached.
    fn release<D0, S: Stage<D0, D>>(&mut self, stage: &mut S, frontier: &MutableAntichain<u64>) {
        let from = self.updates.len();
        stage.release(frontier, &mut self.updates);
        self.noted(from);
    }

    /// Moves the updates of every tick that all `frontiers` have passed into
    /// `ready`, in no particular order. Does nothing, without looking at
    /// the updates, when none can be ready.
    fn ready(&mut self, frontiers: &[&MutableAntichain<u64>], ready: &mut Vec<(D, u64, isize)>) {
        let bound = bound(frontiers);
        let done = |t: u64| bound.is_none_or(|b| t < b);
        if !self.least.is_some_and(done) {
            return;
        }
        if self.updates.iter().all(|(_, t, _)| done(*t)) {
            if ready.is_empty() {
                std::mem::swap(ready, &mut self.updates);
            } else {
                ready.append(&mut self.updates);
            }
        } else {
            ready.extend(self.updates.extract_if(.., |(_, t, _)| done(*t)));
        }
        self.least = self.updates.iter().map(|(_, t, _)| *t).min();
    }

    /// The earliest pending tick.
    fn first(&self) -> Option<u64> {
        self.least
    }
}

/// Orders complete updates by tick. They come in runs already in tick
/// order (one per message), which the stable sort merges; none is needed
/// when there is one run.
fn by_tick_order<D>(ready: &mut [(D, u64, isize)]) {
    if !ready.is_sorted_by_key(|(_, t, _)| *t) {
        ready.sort_by_key(|(_, t, _)| *t);
    }
}

/// Sends `out` at `cap`, and keeps room for as many updates next time: the
/// buffer goes to the channel, and growing a new one from nothing copied
/// every update several times. Timely may hand back a recycled buffer with
/// anything in it ("should be cleared before it is reused"): it is cleared,
/// or those updates would go out again. (An output nobody reads gets its
/// buffer back full: its updates went out again at every later output and
/// at the end with no capability left, a panic.)
fn send<O: ExchangeData>(output: &mut OutputBuilderSession<'_, u64, Output<O>>, cap: &Capability<u64>, out: &mut Updates<O>) {
    let sent = out.len();
    output.session(cap).give_container(out);
    out.clear();
    out.reserve(sent);
}

/// [`send`] for an output of an operator built by hand (several outputs).
fn send_to<O: ExchangeData>(output: &mut pushers::Output<u64, Updates<O>>, cap: &Capability<u64>, out: &mut Updates<O>) {
    let sent = out.len();
    output.activate().give(cap, out);
    out.clear();
    out.reserve(sent);
}

/// The capabilities an operator keeps while it has updates pending: one
/// per output, all at the earliest pending tick.
struct Held {
    outputs: usize,
    caps: Vec<Capability<u64>>,
}

impl Held {
    fn new(outputs: usize) -> Self {
        Held { outputs, caps: Vec::new() }
    }

    fn at(&self, output: usize) -> &Capability<u64> {
        self.caps.get(output).expect("a capability for pending updates")
    }

    /// Releases what is held when nothing is pending, or moves it to the
    /// earliest pending tick.
    fn hold(&mut self, next: Option<u64>) {
        match next {
            Some(t) => self.caps.iter_mut().for_each(|cap| cap.downgrade(&t)),
            None => self.caps.clear(),
        }
    }
}

/// One input of a by-tick shell ([`by_tick`], `by_tick2`, `by_tick3`):
/// the stage its updates go through, those waiting for their tick, and
/// those of complete ticks, handed out one tick at a time. Each shell is
/// its lanes gathered, then a loop over the least next tick among them.
struct Lane<D0, D, S> {
    stage: S,
    pending: Pending<D>,
    /// Updates of complete ticks, in tick order, taken from the front.
    ready: VecDeque<(D, u64, isize)>,
    /// The updates of the tick being handed out.
    run: Vec<(D, isize)>,
    arriving: std::marker::PhantomData<D0>,
}

impl<D0, D, S: Stage<D0, D>> Lane<D0, D, S> {
    fn new(stage: S) -> Self {
        Lane {
            stage,
            pending: Pending::default(),
            ready: VecDeque::new(),
            run: Vec::new(),
            arriving: std::marker::PhantomData,
        }
    }

    /// Takes out the updates of every tick all `frontiers` have passed:
    /// those that waited, those `input` brings through the stage, and those
    /// the stage releases as the input's own `frontier` moves. What waited
    /// is taken before new input joins it: the ready updates are then
    /// usually all of it, moved without a scan (one input's frontier often
    /// trails another's by a step, so the updates that waited are ready
    /// and the new ones are not). `held` covers whatever stays.
    fn gather<P>(
        &mut self,
        (input, frontier): (&mut InputHandleCore<u64, Updates<D0>, P>, &MutableAntichain<u64>),
        frontiers: &[&MutableAntichain<u64>],
        held: &mut Held,
    ) where
        P: timely::communication::Pull<timely::dataflow::channels::Message<u64, Vec<(D0, u64, isize)>>>,
    {
        let mut ready = Vec::from(std::mem::take(&mut self.ready));
        self.pending.ready(frontiers, &mut ready);
        self.pending.absorb(input, held, &mut self.stage);
        self.pending.release(&mut self.stage, frontier);
        self.pending.ready(frontiers, &mut ready);
        by_tick_order(&mut ready);
        self.ready = ready.into();
    }

    /// The tick of the next complete update.
    fn next(&self) -> Option<u64> {
        self.ready.front().map(|u| u.1)
    }

    /// The updates of tick `t` (none when the next is later).
    fn take(&mut self, t: u64) -> &mut Vec<(D, isize)> {
        self.run.clear();
        while let Some((d, _, r)) = self.ready.pop_front_if(|u| u.1 == t) {
            self.run.push((d, r));
        }
        &mut self.run
    }

    /// The earliest tick of an update still waiting or staged.
    fn first(&self) -> Option<u64> {
        [self.pending.first(), self.stage.next()].into_iter().flatten().min()
    }
}

/// One key's accumulated input (sorted, consolidated) and the output last
/// emitted for it: rows for [`reduce_with`], one value for [`fold_with`].
struct Group<V, S> {
    input: Vec<(V, isize)>,
    output: S,
    /// Whether the input changed at the tick being processed.
    touched: bool,
}

impl<V, S: Default> Default for Group<V, S> {
    fn default() -> Self {
        Group {
            input: Vec::new(),
            output: S::default(),
            touched: false,
        }
    }
}

/// Merges a tick's updates into their keys' inputs, and lists each key
/// whose input they touched once in `touched`.
fn gather<K, V, S>(groups: &mut FxHashMap<K, Group<V, S>>, touched: &mut Vec<K>, updates: &mut Vec<((K, V), isize)>)
where
    K: Clone + Hash + Eq,
    V: Ord,
    S: Default,
{
    warm(groups, updates.iter().map(|((k, _), _)| k), |g| {
        g.input.first().map_or(0, |u| u.1 as usize)
    });
    for ((key, v), r) in updates.drain(..) {
        let group = match groups.get_mut(&key) {
            Some(group) => group,
            None => groups.entry(key.clone()).or_default(),
        };
        if !group.touched {
            group.touched = true;
            touched.push(key);
        }
        merge_one(&mut group.input, v, r);
    }
}

/// The size of a map's entries from which [`warm`] reads ahead: the last-level
/// cache of a server core's share is a few tens of MB. Retail on one worker
/// (`docs/performance.md`, "Session 22"): warming every map cost 3.5% at 1M
/// events (64k profiles, every map under 10 MB) and saved about 10% at
/// 10M (636k profiles, and about a million ids in the re-keying join's map).
const WARM_FROM: usize = 32 << 20;

/// Reads the state of each of `keys` in `map`, and what `deep` reads of
/// it, before the loop that updates them one by one. With hundreds of
/// thousands of keys a key's entry is rarely in cache, and in that loop
/// each miss waits for the last (the hash table's control bytes, then the
/// entry, then the vector it points to, then the update); here the reads
/// of different keys are independent, so the core has many misses in
/// flight at once, and the loop then finds the entries in cache. Nothing
/// is changed: only when the memory is read.
///
/// Only a map of at least [`WARM_FROM`] bytes of entries is warmed: one
/// that fits in cache gains nothing and pays the extra lookups.
pub(crate) fn warm<'k, K: Hash + Eq + 'k, V>(map: &FxHashMap<K, V>, keys: impl Iterator<Item = &'k K>, deep: impl Fn(&V) -> usize) {
    if map.len() * std::mem::size_of::<(K, V)>() < WARM_FROM {
        return;
    }
    let mut sum = 0usize;
    for k in keys {
        sum = sum.wrapping_add(map.get(k).map_or(0, &deep));
    }
    std::hint::black_box(sum);
}

/// Makes room for one more element in a vector of per-key state, growing
/// by half rather than doubling from four: most keys hold one or two
/// values, and with millions of keys the slack of `Vec`'s growth was a
/// large part of the memory per profile.
pub(crate) fn room<T, S: Store<T>>(v: &mut S) {
    if v.len() == v.capacity() {
        v.reserve_exact((v.len() / 2).max(1));
    }
}

/// What per-key updates are kept in: a vector, or a small vector with room
/// for one inline where a key mostly has one small value (the profile an
/// id belongs to, on the right of the join that re-keys facts), so that
/// one value costs no allocation.
pub(crate) trait Store<T>: Default + std::ops::DerefMut<Target = [T]> {
    fn capacity(&self) -> usize;
    fn reserve_exact(&mut self, more: usize);
    fn insert(&mut self, at: usize, t: T);
    fn remove(&mut self, at: usize) -> T;
    fn push(&mut self, t: T);
    fn truncate(&mut self, len: usize);
}

impl<T> Store<T> for Vec<T> {
    fn capacity(&self) -> usize {
        Vec::capacity(self)
    }
    fn reserve_exact(&mut self, more: usize) {
        Vec::reserve_exact(self, more)
    }
    fn insert(&mut self, at: usize, t: T) {
        Vec::insert(self, at, t)
    }
    fn remove(&mut self, at: usize) -> T {
        Vec::remove(self, at)
    }
    fn push(&mut self, t: T) {
        Vec::push(self, t)
    }
    fn truncate(&mut self, len: usize) {
        Vec::truncate(self, len)
    }
}

/// A vector with one update inline.
type One<T> = smallvec::SmallVec<[T; 1]>;

impl<T> Store<T> for One<T> {
    fn capacity(&self) -> usize {
        smallvec::SmallVec::capacity(self)
    }
    fn reserve_exact(&mut self, more: usize) {
        smallvec::SmallVec::reserve_exact(self, more)
    }
    fn insert(&mut self, at: usize, t: T) {
        smallvec::SmallVec::insert(self, at, t)
    }
    fn remove(&mut self, at: usize) -> T {
        smallvec::SmallVec::remove(self, at)
    }
    fn push(&mut self, t: T) {
        smallvec::SmallVec::push(self, t)
    }
    fn truncate(&mut self, len: usize) {
        smallvec::SmallVec::truncate(self, len)
    }
}

/// Adds `r` to `v`'s multiplicity in `into` (sorted, consolidated), keeping
/// it so.
pub(crate) fn merge_one<V: Ord, S: Store<(V, isize)>>(into: &mut S, v: V, r: isize) {
    match into.binary_search_by(|(w, _)| w.cmp(&v)) {
        Ok(at) => {
            into[at].1 += r;
            if into[at].1 == 0 {
                into.remove(at);
            }
        }
        Err(at) => {
            room(into);
            into.insert(at, (v, r));
        }
    }
}

/// A unary operator that hands `on_tick` each complete tick's updates, in
/// ascending order of ticks, with the updates to emit. Updates are
/// exchanged by key; within a tick they come in no particular order and
/// not consolidated: each operator groups them by key in the hash map it
/// keeps its state in anyway, which costs less than sorting them (a sort
/// by data was a fifth of all instructions). The shell of [`reduce`] and
/// [`count`], and of stages that need a tick's updates of a key together
/// (`crate::dataflow::rules`).
pub fn by_tick<'s, K, V, O, L>(input: VecCollection<'s, u64, (K, V), isize>, name: &str, mut on_tick: L) -> VecCollection<'s, u64, O, isize>
where
    K: ExchangeData + Hashable + Ord,
    V: ExchangeData,
    O: ExchangeData,
    L: FnMut(u64, &mut Vec<((K, V), isize)>, &mut Updates<O>) + 'static,
{
    let pact = Exchange::new(|((k, _), _, _): &((K, V), u64, isize)| k.hashed().into());
    input
        .inner
        .unary_frontier::<Output<O>, _, _, _>(pact, name, move |_cap, _info| {
            let mut lane = Lane::new(Direct);
            let mut held = Held::new(1);
            let mut out = Vec::new();
            move |(input, frontier), output| {
                lane.gather((input, frontier), &[frontier], &mut held);
                while let Some(t) = lane.next() {
                    on_tick(t, lane.take(t), &mut out);
                }
                if !out.is_empty() {
                    send(output, held.at(0), &mut out);
                }
                held.hold(lane.first());
            }
        })
        .as_collection()
}

/// `reduce` for totally ordered time: for every key whose input changed at a
/// tick, `logic` sees the key's accumulated input (sorted by value, with
/// multiplicities, never empty; differential's passes references) and
/// pushes its output; what differs from the
/// key's previous output is emitted at that tick.
pub fn reduce<'s, K, V, O, L>(input: VecCollection<'s, u64, (K, V), isize>, name: &str, logic: L) -> VecCollection<'s, u64, (K, O), isize>
where
    K: ExchangeData + Clone + Hashable + Hash + Ord,
    V: ExchangeData + Clone + Ord,
    O: ExchangeData + Clone + Ord,
    L: FnMut(&K, &[(V, isize)], &mut Vec<(O, isize)>) + 'static,
{
    reduce_with(input, name, logic, emit_change)
}

/// [`reduce`], with what a changed key emits up to `emit`: it sees the
/// key's previous and new output (each sorted and consolidated, empty for
/// none; they differ) and pushes updates at that tick. They must be
/// consolidated, and distinct from any other key's (as they are when they
/// include the key).
/// A stage that only needs a function of the output's change (the atoms a
/// term's new value flips, `crate::dataflow::terms`) emits that instead of the rows.
pub fn reduce_with<'s, K, V, O, X, L, E>(
    input: VecCollection<'s, u64, (K, V), isize>,
    name: &str,
    mut logic: L,
    mut emit: E,
) -> VecCollection<'s, u64, X, isize>
where
    K: ExchangeData + Clone + Hashable + Hash + Ord,
    V: ExchangeData + Clone + Ord,
    O: ExchangeData + Clone + Ord,
    X: ExchangeData,
    L: FnMut(&K, &[(V, isize)], &mut Vec<(O, isize)>) + 'static,
    E: FnMut(&K, &[(O, isize)], &[(O, isize)], &mut Vec<(X, isize)>) + 'static,
{
    let mut groups: FxHashMap<K, Group<V, Vec<(O, isize)>>> = FxHashMap::default();
    let mut touched: Vec<K> = Vec::new();
    let mut fresh: Vec<(O, isize)> = Vec::new();
    let mut changes: Vec<(X, isize)> = Vec::new();
    by_tick(input, name, move |t, updates, out| {
        gather(&mut groups, &mut touched, updates);
        for key in touched.drain(..) {
            let group = groups.get_mut(&key).expect("a touched group");
            group.touched = false;
            fresh.clear();
            if !group.input.is_empty() {
                logic(&key, &group.input, &mut fresh);
                consolidate(&mut fresh);
            }
            if fresh != group.output {
                emit(&key, &group.output, &fresh, &mut changes);
                // Moved, not swapped: the group's vector stays as long as
                // its output, and `fresh` keeps its room for the next key.
                group.output.clear();
                group.output.reserve_exact(fresh.len());
                group.output.append(&mut fresh);
            }
            if group.input.is_empty() {
                groups.remove(&key);
            }
        }
        stamp(&mut changes, t, out);
    })
}

/// [`reduce_with`] for a reduction to exactly one value per key (with a
/// multiplicity of one): `logic` folds a key's accumulated input (sorted by
/// value, with multiplicities, never empty) into its value, and for every
/// key whose value changed at a tick `emit` sees the old and new value
/// (`None`: no input) and pushes updates at that tick, consolidated and
/// distinct from any other key's. The value is kept as it is, not as a
/// one-row vector of rows (`crate::dataflow::terms` folds every term this way).
pub fn fold_with<'s, K, V, O, X, L, E>(
    input: VecCollection<'s, u64, (K, V), isize>,
    name: &str,
    mut logic: L,
    mut emit: E,
) -> VecCollection<'s, u64, X, isize>
where
    K: ExchangeData + Clone + Hashable + Hash + Ord,
    V: ExchangeData + Clone + Ord,
    O: PartialEq + 'static,
    X: ExchangeData,
    L: FnMut(&K, &[(V, isize)]) -> O + 'static,
    E: FnMut(&K, Option<&O>, Option<&O>, &mut Vec<(X, isize)>) + 'static,
{
    let mut groups: FxHashMap<K, Group<V, Option<O>>> = FxHashMap::default();
    let mut touched: Vec<K> = Vec::new();
    let mut changes: Vec<(X, isize)> = Vec::new();
    by_tick(input, name, move |t, updates, out| {
        gather(&mut groups, &mut touched, updates);
        for key in touched.drain(..) {
            let group = groups.get_mut(&key).expect("a touched group");
            group.touched = false;
            let fresh = (!group.input.is_empty()).then(|| logic(&key, &group.input));
            if fresh != group.output {
                emit(&key, group.output.as_ref(), fresh.as_ref(), &mut changes);
                group.output = fresh;
            }
            if group.input.is_empty() {
                groups.remove(&key);
            }
        }
        stamp(&mut changes, t, out);
    })
}

/// Moves a tick's `changes` to `out` at `t`.
fn stamp<X>(changes: &mut Vec<(X, isize)>, t: u64, out: &mut Updates<X>) {
    out.extend(changes.drain(..).map(|(x, r)| (x, t, r)));
}

/// `count_total` for totally ordered time, without an arrangement: each
/// key with its (non-zero) accumulated multiplicity. Records are `(key, ())`
/// so that they are grouped as [`by_tick`] groups them.
pub fn count<'s, K>(input: VecCollection<'s, u64, (K, ()), isize>, name: &str) -> VecCollection<'s, u64, (K, isize), isize>
where
    K: ExchangeData + Clone + Hashable + Hash + Ord,
{
    count_with(input, name, |key, old, new, out| {
        if old != 0 {
            out.push(((key.clone(), old), -1));
        }
        if new != 0 {
            out.push(((key.clone(), new), 1));
        }
    })
}

/// [`count`], with what a changed key emits up to `emit`: it sees the
/// key's previous and new count (0 for none; they differ) and pushes
/// updates at that tick, as [`reduce_with`] requires them.
pub fn count_with<'s, K, X, E>(input: VecCollection<'s, u64, (K, ()), isize>, name: &str, mut emit: E) -> VecCollection<'s, u64, X, isize>
where
    K: ExchangeData + Clone + Hashable + Hash + Ord,
    X: ExchangeData,
    E: FnMut(&K, isize, isize, &mut Vec<(X, isize)>) + 'static,
{
    // By key: the count, and the count before this tick if it changed.
    let mut counts: FxHashMap<K, (isize, Option<isize>)> = FxHashMap::default();
    let mut touched: Vec<K> = Vec::new();
    let mut changes: Vec<(X, isize)> = Vec::new();
    by_tick(input, name, move |t, updates, out| {
        warm(&counts, updates.iter().map(|((k, ()), _)| k), |c| c.0 as usize);
        for ((key, ()), r) in updates.drain(..) {
            let count = match counts.get_mut(&key) {
                Some(count) => count,
                None => counts.entry(key.clone()).or_insert((0, None)),
            };
            if count.1.is_none() {
                count.1 = Some(count.0);
                touched.push(key);
            }
            count.0 += r;
        }
        for key in touched.drain(..) {
            let count = counts.get_mut(&key).expect("a touched count");
            let (new, old) = (count.0, count.1.take().expect("touched"));
            if new == 0 {
                counts.remove(&key);
            }
            if old != new {
                emit(&key, old, new, &mut changes);
            }
        }
        stamp(&mut changes, t, out);
    })
}

/// Pushes `new - old` (both sorted and consolidated) for `key`.
fn emit_change<K: Clone, O: Ord + Clone>(key: &K, old: &[(O, isize)], new: &[(O, isize)], out: &mut Vec<((K, O), isize)>) {
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        let order = match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) => a.0.cmp(&b.0),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                out.push(((key.clone(), old[i].0.clone()), -old[i].1));
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(((key.clone(), new[j].0.clone()), new[j].1));
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                let r = new[j].1 - old[i].1;
                if r != 0 {
                    out.push(((key.clone(), new[j].0.clone()), r));
                }
                i += 1;
                j += 1;
            }
        }
    }
}

/// One key's accumulated updates on one side of a [`join`], consolidated
/// lazily: appended as they come, sorted and consolidated when they have
/// doubled since the last time (amortised O(log n) per update), before they
/// are read whole, and when their multiplicities sum to zero, which in a
/// collection without negative multiplicities means the side is empty.
///
/// The two counters are 32-bit, so that a side is a vector and eight bytes
/// and a key's entry in a join's hash map is 72 bytes, not 88 (there is an
/// entry per id and per profile). `net` only decides when to consolidate
/// early, never what a side holds, so its wrapping (more than 2³¹ updates
/// of one key held at once) costs time at most, not correctness.
struct Side<V, S = Vec<(V, isize)>> {
    updates: S,
    consolidated: u32,
    net: i32,
    _values: std::marker::PhantomData<V>,
}

impl<V, S: Default> Default for Side<V, S> {
    fn default() -> Self {
        Side {
            updates: S::default(),
            consolidated: 0,
            net: 0,
            _values: std::marker::PhantomData,
        }
    }
}

impl<V: Ord, S: Store<(V, isize)>> Side<V, S> {
    /// Appends an update; small sides are kept consolidated (by inserting
    /// in place: sorting the whole side again on every push was most of a
    /// join's work), and a side whose values all left is seen to be empty
    /// (and dropped) at once.
    fn push(&mut self, v: V, r: isize) {
        self.net = self.net.wrapping_add(r as i32);
        if self.consolidated as usize == self.updates.len() && self.updates.len() < 8 {
            merge_one(&mut self.updates, v, r);
            self.consolidated = self.updates.len() as u32;
            return;
        }
        room(&mut self.updates);
        self.updates.push((v, r));
        if self.net == 0 || self.updates.len() > 2 * self.consolidated as usize {
            self.consolidate();
        }
    }

    /// Every value held, consolidated, with its multiplicity.
    fn each(&mut self, mut f: impl FnMut(&V, isize)) {
        if !self.updates.is_empty() {
            self.consolidate();
            self.updates.iter().for_each(|(v, q)| f(v, *q));
        }
    }

    fn consolidate(&mut self) {
        let len = differential_dataflow::consolidation::consolidate_slice(&mut self.updates);
        self.updates.truncate(len);
        self.consolidated = self.updates.len() as u32;
    }
}

/// What a join keeps of one key's left-hand values: one [`Side`], or two
/// for a join of two left inputs ([`join_pair_staged`]), each kept compact
/// in a vector of its own type, in the key's one entry.
trait Left: Default {
    fn is_empty(&self) -> bool;
    /// Reads the first update of each side (see [`warm`]).
    fn touch(&self) -> usize;
}

impl<V> Left for Side<V> {
    fn is_empty(&self) -> bool {
        self.updates.is_empty()
    }
    fn touch(&self) -> usize {
        self.updates.first().map_or(0, |u| u.1 as usize)
    }
}

impl<V1, V2> Left for (Side<V1>, Side<V2>) {
    fn is_empty(&self) -> bool {
        self.0.updates.is_empty() && self.1.updates.is_empty()
    }
    fn touch(&self) -> usize {
        self.0.touch().wrapping_add(self.1.touch())
    }
}

/// Both sides of one key of a [`join`], in one hash-map entry: an update
/// reads the other side and appends to its own with a single lookup. The
/// right side keeps one value inline: every right side in shoal is a
/// profile key or `()`, one per key.
struct Both<A, W> {
    left: A,
    right: Side<W, One<(W, isize)>>,
}

impl<A: Default, W> Default for Both<A, W> {
    fn default() -> Self {
        Both {
            left: A::default(),
            right: Side::default(),
        }
    }
}

impl<A: Left, W> Both<A, W> {
    fn is_empty(&self) -> bool {
        self.left.is_empty() && self.right.updates.is_empty()
    }
}

/// Drops `key`'s entry once both its sides are empty.
fn settle<K: Hash + Eq, A: Left, W>(sides: &mut FxHashMap<K, Both<A, W>>, key: &K) {
    if sides.get(key).is_some_and(Both::is_empty) {
        sides.remove(key);
    }
}

/// The two-input [`by_tick`]: each complete tick's updates of `left` (as
/// its `stage` passes them on) and of `right` (exchanged by `key1` and
/// `key2`; in no particular order, not consolidated) go to `on_tick`
/// together, in ascending order of ticks. The shell of [`join`],
/// [`join_staged`] and [`propagate`].
fn by_tick2<'s, D0, D1, D2, O, S, F1, F2, L>(
    (left, stage): (VecCollection<'s, u64, D0, isize>, S),
    right: VecCollection<'s, u64, D2, isize>,
    name: &str,
    (key1, key2): (F1, F2),
    mut on_tick: L,
) -> VecCollection<'s, u64, O, isize>
where
    D0: ExchangeData,
    D1: 'static,
    D2: ExchangeData,
    O: ExchangeData,
    S: Stage<D0, D1> + 'static,
    F1: Fn(&D0) -> u64 + 'static,
    F2: Fn(&D2) -> u64 + 'static,
    L: FnMut(u64, &mut Vec<(D1, isize)>, &mut Vec<(D2, isize)>, &mut Updates<O>, &mut Wakes) + 'static,
{
    let pact1 = Exchange::new(move |(d, _, _): &(D0, u64, isize)| key1(d));
    let pact2 = Exchange::new(move |(d, _, _): &(D2, u64, isize)| key2(d));
    left.inner
        .binary_frontier::<_, Output<O>, _, _, _, _>(right.inner, pact1, pact2, name, move |_cap, _info| {
            let (mut lane1, mut lane2) = (Lane::new(stage), Lane::new(Direct));
            let mut held = Held::new(1);
            let mut out = Vec::new();
            let mut wakes = Wakes::default();
            move |(input1, frontier1), (input2, frontier2), output| {
                let frontiers = [frontier1, frontier2];
                lane1.gather((input1, frontier1), &frontiers, &mut held);
                lane2.gather((input2, frontier2), &frontiers, &mut held);
                let bound = bound(&frontiers);
                loop {
                    let woken = wakes.next().filter(|&w| bound.is_some_and(|b| w < b));
                    let Some(t) = [lane1.next(), lane2.next(), woken].into_iter().flatten().min() else {
                        break;
                    };
                    while wakes.next() == Some(t) {
                        wakes.0.pop();
                    }
                    wakes.1 = t;
                    on_tick(t, lane1.take(t), lane2.take(t), &mut out, &mut wakes);
                }
                if bound.is_none() {
                    // Past the last tick, nothing is written: wakes asked
                    // for, even by this very run, are dropped, or their
                    // capability would hold the dataflow open for ever.
                    wakes.0.clear();
                }
                if !out.is_empty() {
                    send(output, held.at(0), &mut out);
                }
                held.hold([lane1.first(), lane2.first(), wakes.next()].into_iter().flatten().min());
            }
        })
        .as_collection()
}

/// [`by_tick2`] with two left inputs, each through its own stage, and two
/// outputs: each complete tick's updates of the three inputs go to
/// `on_tick` together, in ascending order of ticks. The shell of
/// [`join_pair_staged`].
#[allow(clippy::type_complexity)]
fn by_tick3<'s, A0, A, B0, B, C, O1, O2, SA, SB, FA, FB, FC, L>(
    ((left1, stage1), (left2, stage2)): ((VecCollection<'s, u64, A0, isize>, SA), (VecCollection<'s, u64, B0, isize>, SB)),
    right: VecCollection<'s, u64, C, isize>,
    name: &str,
    (key1, key2, key3): (FA, FB, FC),
    mut on_tick: L,
) -> (VecCollection<'s, u64, O1, isize>, VecCollection<'s, u64, O2, isize>)
where
    A0: ExchangeData,
    B0: ExchangeData,
    C: ExchangeData,
    A: 'static,
    B: 'static,
    O1: ExchangeData,
    O2: ExchangeData,
    SA: Stage<A0, A> + 'static,
    SB: Stage<B0, B> + 'static,
    FA: Fn(&A0) -> u64 + 'static,
    FB: Fn(&B0) -> u64 + 'static,
    FC: Fn(&C) -> u64 + 'static,
    L: FnMut(u64, (&mut Vec<(A, isize)>, &mut Vec<(B, isize)>, &mut Vec<(C, isize)>), (&mut Updates<O1>, &mut Updates<O2>)) + 'static,
{
    let mut builder = OperatorBuilder::new(name.to_owned(), left1.inner.scope());
    let mut input1 = builder.new_input(left1.inner, Exchange::new(move |(d, _, _): &(A0, u64, isize)| key1(d)));
    let mut input2 = builder.new_input(left2.inner, Exchange::new(move |(d, _, _): &(B0, u64, isize)| key2(d)));
    let mut input3 = builder.new_input(right.inner, Exchange::new(move |(d, _, _): &(C, u64, isize)| key3(d)));
    let (mut output1, stream1) = builder.new_output::<Updates<O1>>();
    let (mut output2, stream2) = builder.new_output::<Updates<O2>>();
    builder.build(move |_caps| {
        let (mut lane1, mut lane2, mut lane3) = (Lane::new(stage1), Lane::new(stage2), Lane::new(Direct));
        let mut held = Held::new(2);
        let (mut out1, mut out2) = (Vec::new(), Vec::new());
        move |frontiers| {
            let frontiers = [&frontiers[0], &frontiers[1], &frontiers[2]];
            lane1.gather((&mut input1, frontiers[0]), &frontiers, &mut held);
            lane2.gather((&mut input2, frontiers[1]), &frontiers, &mut held);
            lane3.gather((&mut input3, frontiers[2]), &frontiers, &mut held);
            while let Some(t) = [lane1.next(), lane2.next(), lane3.next()].into_iter().flatten().min() {
                on_tick(t, (lane1.take(t), lane2.take(t), lane3.take(t)), (&mut out1, &mut out2));
            }
            if !out1.is_empty() {
                send_to(&mut output1, held.at(0), &mut out1);
            }
            if !out2.is_empty() {
                send_to(&mut output2, held.at(1), &mut out2);
            }
            held.hold([lane1.first(), lane2.first(), lane3.first()].into_iter().flatten().min());
        }
    });
    (stream1.as_collection(), stream2.as_collection())
}

/// The ticks at which an operator asked to run again with no input (see
/// [`binary_by_tick`]): each is handed to the operator once every input has
/// passed it, under the capability the operator keeps for it. When the
/// inputs close, those still asked for lie beyond the last tick and are
/// dropped, as a window's pending retractions are.
#[derive(Default)]
pub struct Wakes(std::collections::BinaryHeap<std::cmp::Reverse<u64>>, u64);

impl Wakes {
    /// Asks for a run at tick `t`, later than the tick being processed.
    pub fn at(&mut self, t: u64) {
        debug_assert!(t > self.1, "a wake after the tick being processed");
        if self.next() != Some(t) {
            self.0.push(std::cmp::Reverse(t));
        }
    }

    fn next(&self) -> Option<u64> {
        self.0.peek().map(|w| w.0)
    }
}

/// `join_core` for totally ordered time: `(k, v)` and `(k, w)` give
/// `logic(k, v, w)` while both hold, with the product of multiplicities.
pub fn join<'s, K, V, W, O, L>(
    left: VecCollection<'s, u64, (K, V), isize>,
    right: VecCollection<'s, u64, (K, W), isize>,
    name: &str,
    logic: L,
) -> VecCollection<'s, u64, O, isize>
where
    K: ExchangeData + Clone + Hashable + Hash + Ord,
    V: ExchangeData + Clone + Ord,
    W: ExchangeData + Clone + Ord,
    O: ExchangeData + Clone,
    L: FnMut(&K, &V, &W) -> O + 'static,
{
    join_staged((left, Direct), |(k, _): &(K, V)| k.hashed().into(), right, name, logic)
}

/// [`join`], with the left input going through `stage` first, in the same
/// operator (a window, see `crate::dataflow::window`); `key` is the hash of the key
/// an arriving left update will have.
pub fn join_staged<'s, D0, S, H, K, V, W, O, L>(
    left: (VecCollection<'s, u64, D0, isize>, S),
    key: H,
    right: VecCollection<'s, u64, (K, W), isize>,
    name: &str,
    mut logic: L,
) -> VecCollection<'s, u64, O, isize>
where
    D0: ExchangeData,
    S: Stage<D0, (K, V)> + 'static,
    H: Fn(&D0) -> u64 + 'static,
    K: ExchangeData + Clone + Hashable + Hash + Ord,
    V: ExchangeData + Clone + Ord,
    W: ExchangeData + Clone + Ord,
    O: ExchangeData + Clone,
    L: FnMut(&K, &V, &W) -> O + 'static,
{
    let mut sides: FxHashMap<K, Both<Side<V>, W>> = FxHashMap::default();
    let by_key = (key, |(k, _): &(K, W)| k.hashed().into());
    by_tick2(left, right, name, by_key, move |t, dv, dw, out, _| {
        let keys = dw.iter().map(|((k, _), _)| k).chain(dv.iter().map(|((k, _), _)| k));
        warm(&sides, keys, |both| both.left.touch());
        // New right-hand values meet the left as it was; then new left-hand
        // values meet the right as it is now.
        right_meets_left(&mut sides, dw, |both, k, w, r| {
            both.left.each(|v, q| out.push((logic(k, v, w), t, q * r)))
        });
        left_meets_right(&mut sides, dv, |both| &mut both.left, &mut logic, (t, out));
    })
}

/// [`join_staged`] for two left inputs that join the same right, say facts
/// without a payload and facts with one: one operator, one entry and one
/// lookup per key for both, each kept in a vector of its own type, and an
/// output for each (`logic1` and `logic2`).
#[allow(clippy::type_complexity)]
pub fn join_pair_staged<'s, D1, S1, H1, V1, D2, S2, H2, V2, K, W, O1, O2, L1, L2>(
    (left1, left2): (
        (VecCollection<'s, u64, D1, isize>, S1, H1),
        (VecCollection<'s, u64, D2, isize>, S2, H2),
    ),
    right: VecCollection<'s, u64, (K, W), isize>,
    name: &str,
    (mut logic1, mut logic2): (L1, L2),
) -> (VecCollection<'s, u64, O1, isize>, VecCollection<'s, u64, O2, isize>)
where
    D1: ExchangeData,
    D2: ExchangeData,
    S1: Stage<D1, (K, V1)> + 'static,
    S2: Stage<D2, (K, V2)> + 'static,
    H1: Fn(&D1) -> u64 + 'static,
    H2: Fn(&D2) -> u64 + 'static,
    K: ExchangeData + Clone + Hashable + Hash + Ord,
    V1: ExchangeData + Clone + Ord,
    V2: ExchangeData + Clone + Ord,
    W: ExchangeData + Clone + Ord,
    O1: ExchangeData + Clone,
    O2: ExchangeData + Clone,
    L1: FnMut(&K, &V1, &W) -> O1 + 'static,
    L2: FnMut(&K, &V2, &W) -> O2 + 'static,
{
    let mut sides: FxHashMap<K, Both<(Side<V1>, Side<V2>), W>> = FxHashMap::default();
    let (left1, stage1, key1) = left1;
    let (left2, stage2, key2) = left2;
    let keys = (key1, key2, |(k, _): &(K, W)| k.hashed().into());
    by_tick3(
        ((left1, stage1), (left2, stage2)),
        right,
        name,
        keys,
        move |t, (dv1, dv2, dw), (out1, out2)| {
            let keys = dw.iter().map(|((k, _), _)| k);
            let keys = keys.chain(dv1.iter().map(|((k, _), _)| k)).chain(dv2.iter().map(|((k, _), _)| k));
            warm(&sides, keys, |both| both.left.touch());
            right_meets_left(&mut sides, dw, |both, k, w, r| {
                both.left.0.each(|v, q| out1.push((logic1(k, v, w), t, q * r)));
                both.left.1.each(|v, q| out2.push((logic2(k, v, w), t, q * r)));
            });
            left_meets_right(&mut sides, dv1, |both| &mut both.left.0, &mut logic1, (t, out1));
            left_meets_right(&mut sides, dv2, |both| &mut both.left.1, &mut logic2, (t, out2));
        },
    )
}

/// A tick's new right-hand values meet the left as it was (`meet` emits
/// the products), then join their key's right side.
fn right_meets_left<K, A, W>(
    sides: &mut FxHashMap<K, Both<A, W>>,
    dw: &mut Vec<((K, W), isize)>,
    mut meet: impl FnMut(&mut Both<A, W>, &K, &W, isize),
) where
    K: Clone + Hash + Eq,
    A: Left,
    W: Ord,
{
    for ((k, w), r) in dw.drain(..) {
        let both = sides.entry(k.clone()).or_default();
        meet(both, &k, &w, r);
        both.right.push(w, r);
        if both.right.updates.is_empty() {
            settle(sides, &k);
        }
    }
}

/// A tick's new left-hand values, of the kind `side` picks, meet the right
/// as it is now, then join their key's left side. A run of updates of one
/// key (the facts of one event, which the reader feeds one after the
/// other and every stage keeps together) looks the key up once.
fn left_meets_right<K, A, V, W, O>(
    sides: &mut FxHashMap<K, Both<A, W>>,
    dv: &mut Vec<((K, V), isize)>,
    side: impl Fn(&mut Both<A, W>) -> &mut Side<V>,
    logic: &mut impl FnMut(&K, &V, &W) -> O,
    (t, out): (u64, &mut Updates<O>),
) where
    K: Clone + Hash + Eq,
    A: Left,
    V: Ord,
    W: Ord,
{
    let mut updates = dv.drain(..).peekable();
    while let Some(((k, v), r)) = updates.next() {
        let both = sides.entry(k.clone()).or_default();
        if !both.right.updates.is_empty() {
            both.right.consolidate();
        }
        let mut meet = |both: &mut Both<A, W>, v: V, r: isize| {
            out.extend(both.right.updates.iter().map(|(w, q)| (logic(&k, &v, w), t, q * r)));
            side(both).push(v, r);
        };
        meet(both, v, r);
        while let Some(((_, v), r)) = updates.next_if(|((next, _), _)| *next == k) {
            meet(both, v, r);
        }
        if side(both).updates.is_empty() {
            settle(sides, &k);
        }
    }
}

/// `propagate` (label propagation) for totally ordered time over a graph
/// whose edges come in both directions: every node in a component with at
/// least one label gets the least label of the component.
///
/// The graph lives on the last worker (worker 0 reads and writes) as
/// components with their members (union by size): an edge between two
/// components merges the smaller into the larger and relabels the members
/// whose least label changed; a new label relabels its component if it is
/// less. Only removals — an edge or label whose multiplicity drops to zero:
/// an id seen earlier than before (cancelled within a tick), or a forget or
/// unlink request (`crate::dataflow::identity::requested`) — rebuild a
/// component by a search of its edges, which splits it where a removed
/// edge was a bridge. Differential's `propagate` iterates
/// to a fixed point per change in a nested scope, which was a seventh of a
/// worker's time on retail traffic.
pub fn propagate<'s, N, L>(
    edges: VecCollection<'s, u64, (N, N), isize>,
    nodes: VecCollection<'s, u64, (N, L), isize>,
    name: &str,
) -> VecCollection<'s, u64, (N, L), isize>
where
    N: ExchangeData + Clone + Hash + Ord,
    L: ExchangeData + Clone + Ord,
{
    propagate_forgetting(edges, nodes.map(|(n, l)| (n, Some(l))), name)
}

/// [`propagate`] with nodes removed in place: `(n, None)` forgets node
/// `n`, which loses its labels and ignores any later ones, as if every
/// label of `n` were retracted from the tick of the forget on (the
/// semijoin `crate::dataflow::identity::remaining` retracts when the graph
/// is partitioned). It saves keeping every node's labels a second time
/// for a rare request. A node is forgotten once: a forget taken back
/// (`(n, None)` with a negative count) makes it take labels again, but
/// does not bring back those it lost.
pub fn propagate_forgetting<'s, N, L>(
    edges: VecCollection<'s, u64, (N, N), isize>,
    nodes: VecCollection<'s, u64, (N, Option<L>), isize>,
    name: &str,
) -> VecCollection<'s, u64, (N, L), isize>
where
    N: ExchangeData + Clone + Hash + Ord,
    L: ExchangeData + Clone + Ord,
{
    let mut graph = Graph::default();
    // The last worker: worker 0 reads the input and writes the output.
    let last = edges.inner.scope().peers() as u64 - 1;
    let everything_to_the_last_worker = (move |_: &(N, N)| last, move |_: &(N, Option<L>)| last);
    by_tick2(
        (edges, Direct),
        nodes,
        name,
        everything_to_the_last_worker,
        move |t, de, dn, out, _| {
            consolidate(de);
            consolidate(dn);
            let mut emit = |n: &N, l: &L, r: isize| out.push(((n.clone(), l.clone()), t, r));
            // Consolidated, so a tick's forgets (`None`) come before its
            // labels, which they cancel.
            for ((n, l), r) in dn.drain(..) {
                match l {
                    Some(l) => graph.label(n, l, r, &mut emit),
                    None => graph.forget(n, r, &mut emit),
                }
            }
            for ((a, b), r) in de.drain(..) {
                graph.edge(a, b, r, &mut emit);
            }
            graph.rebuild(&mut emit);
        },
    )
}

/// The state of [`propagate`]: nodes with their labels, edges and
/// component; components with their members and least label. A node
/// alone in its component (most ids: a profile of one id) has no entry in
/// `comps` ([`ALONE`]): its least label is its own least, found when it
/// changes, and it gets an entry when an edge joins it to another.
struct Graph<N, L> {
    nodes: FxHashMap<N, Node<N, L>>,
    comps: FxHashMap<u64, Comp<N, L>>,
    next: u64,
    /// Nodes whose component lost an edge or a label this tick.
    dirty: Vec<N>,
    /// Forgotten nodes (few), with their count.
    gone: FxHashMap<N, isize>,
}

struct Node<N, L> {
    labels: Vec<(L, isize)>,
    edges: Vec<(N, isize)>,
    comp: u64,
}

/// The component of a node alone in it, which has no entry in `comps`.
const ALONE: u64 = u64::MAX;

impl<N, L: Ord + Clone> Node<N, L> {
    /// The least of the node's own labels.
    fn least(&self) -> Option<L> {
        self.labels.iter().map(|(l, _)| l).min().cloned()
    }
}

struct Comp<N, L> {
    members: Vec<N>,
    least: Option<L>,
}

impl<N, L> Default for Graph<N, L> {
    fn default() -> Self {
        Graph {
            nodes: FxHashMap::default(),
            comps: FxHashMap::default(),
            next: 0,
            dirty: Vec::new(),
            gone: FxHashMap::default(),
        }
    }
}

/// Adds `r` to `v`'s multiplicity in `into`; whether it dropped to zero.
pub(crate) fn add<V: PartialEq>(into: &mut Vec<(V, isize)>, v: V, r: isize) -> bool {
    match into.iter().position(|(w, _)| *w == v) {
        Some(at) => {
            into[at].1 += r;
            if into[at].1 == 0 {
                into.swap_remove(at);
                return true;
            }
            false
        }
        None => {
            room(into);
            into.push((v, r));
            false
        }
    }
}

impl<N: Clone + Hash + Eq, L: Clone + Ord> Graph<N, L> {
    /// The node `n`, alone in its component if new.
    fn node(&mut self, n: &N) -> &mut Node<N, L> {
        if !self.nodes.contains_key(n) {
            let node = Node {
                labels: Vec::new(),
                edges: Vec::new(),
                comp: ALONE,
            };
            self.nodes.insert(n.clone(), node);
        }
        self.nodes.get_mut(n).expect("just made")
    }

    /// The component of `n`, given an entry in `comps` if `n` is alone.
    fn comp(&mut self, n: &N) -> u64 {
        let node = self.nodes.get_mut(n).expect("a node");
        if node.comp == ALONE {
            node.comp = self.next;
            self.next += 1;
            let least = node.least();
            self.comps.insert(
                node.comp,
                Comp {
                    members: vec![n.clone()],
                    least,
                },
            );
        }
        node.comp
    }

    /// Gives component `c` the least label `least`, emitting the change for
    /// each member.
    fn relabel(&mut self, c: u64, least: Option<L>, emit: &mut impl FnMut(&N, &L, isize)) {
        let comp = self.comps.get_mut(&c).expect("a component");
        if comp.least == least {
            return;
        }
        for m in &comp.members {
            if let Some(old) = &comp.least {
                emit(m, old, -1);
            }
            if let Some(new) = &least {
                emit(m, new, 1);
            }
        }
        comp.least = least;
    }

    /// Forgets `n` (see [`propagate_forgetting`]): drops its labels.
    fn forget(&mut self, n: N, r: isize, emit: &mut impl FnMut(&N, &L, isize)) {
        let count = self.gone.entry(n.clone()).or_insert(0);
        *count += r;
        if *count <= 0 {
            self.gone.remove(&n);
            return;
        }
        // A node never seen has no labels to lose (and later ones are
        // ignored through `gone`).
        let Some(node) = self.nodes.get_mut(&n).filter(|node| !node.labels.is_empty()) else {
            return;
        };
        if node.comp == ALONE {
            if let Some(old) = node.least() {
                emit(&n, &old, -1);
            }
            node.labels.clear();
        } else {
            node.labels.clear();
            self.dirty.push(n);
        }
    }

    fn label(&mut self, n: N, l: L, r: isize, emit: &mut impl FnMut(&N, &L, isize)) {
        if self.gone.contains_key(&n) {
            return;
        }
        let node = self.node(&n);
        let c = node.comp;
        if c == ALONE {
            let old = node.least();
            add(&mut node.labels, l, r);
            let new = node.least();
            if old != new {
                old.into_iter().for_each(|old| emit(&n, &old, -1));
                new.into_iter().for_each(|new| emit(&n, &new, 1));
            }
            return;
        }
        if add(&mut node.labels, l.clone(), r) {
            self.dirty.push(n);
            return;
        }
        let least = self.comps[&c].least.clone();
        if least.as_ref().is_none_or(|least| l < *least) {
            self.relabel(c, Some(l), emit);
        }
    }

    fn edge(&mut self, a: N, b: N, r: isize, emit: &mut impl FnMut(&N, &L, isize)) {
        self.node(&b);
        let node = self.node(&a);
        if add(&mut node.edges, b.clone(), r) {
            self.dirty.push(a);
            return;
        }
        if a == b {
            return;
        }
        let (ca, cb) = (node.comp, self.nodes[&b].comp);
        if ca == cb && ca != ALONE {
            return;
        }
        let (ca, cb) = (self.comp(&a), self.comp(&b));
        // The smaller component joins the larger; each side whose least
        // label is not the merged one is relabelled first.
        let (big, small) = if self.comps[&ca].members.len() >= self.comps[&cb].members.len() {
            (ca, cb)
        } else {
            (cb, ca)
        };
        let least = self.comps[&ca].least.clone().into_iter().chain(self.comps[&cb].least.clone()).min();
        self.relabel(big, least.clone(), emit);
        self.relabel(small, least, emit);
        let moved = self.comps.remove(&small).expect("a component").members;
        for m in &moved {
            self.nodes.get_mut(m).expect("a member").comp = big;
        }
        self.comps.get_mut(&big).expect("a component").members.extend(moved);
    }

    /// Splits every component that lost an edge or a label into the
    /// components its remaining edges make, each with its least label.
    fn rebuild(&mut self, emit: &mut impl FnMut(&N, &L, isize)) {
        for n in std::mem::take(&mut self.dirty) {
            let c = self.nodes[&n].comp;
            // A node alone has its least label already (see `label`).
            let Some(comp) = self.comps.remove(&c) else { continue };
            // Members keep their old component until they are searched.
            let mut unseen: rustc_hash::FxHashSet<N> = comp.members.iter().cloned().collect();
            for start in &comp.members {
                if !unseen.remove(start) {
                    continue;
                }
                let id = self.next;
                self.next += 1;
                let (mut members, mut least): (Vec<N>, Option<L>) = (vec![start.clone()], None);
                let mut at = 0;
                while at < members.len() {
                    let node = self.nodes.get_mut(&members[at]).expect("a member");
                    node.comp = id;
                    least = least.into_iter().chain(node.labels.iter().map(|(l, _)| l.clone())).min();
                    for (m, _) in &node.edges {
                        if unseen.remove(m) {
                            members.push(m.clone());
                        }
                    }
                    at += 1;
                }
                for m in &members {
                    if least != comp.least {
                        if let Some(old) = &comp.least {
                            emit(m, old, -1);
                        }
                        if let Some(new) = &least {
                            emit(m, new, 1);
                        }
                    }
                }
                if members.len() == 1 {
                    self.nodes.get_mut(&members[0]).expect("a member").comp = ALONE;
                } else {
                    self.comps.insert(id, Comp { members, least });
                }
            }
        }
    }
}

/// This module's operators as methods of collections, the way differential
/// offers `count_total` and `threshold_total`: a stage reads
/// `facts.fold_total("Terms", logic, emit)`, one named operator after
/// another, not calls into this module. Each method is the free function
/// of the same family; their docs hold the details.
pub trait TotalOps<'s, K, V> {
    /// [`by_tick`]: `on_tick` sees each complete tick's updates, once.
    fn by_tick<O, L>(self, name: &str, on_tick: L) -> VecCollection<'s, u64, O, isize>
    where
        O: ExchangeData,
        L: FnMut(u64, &mut Vec<((K, V), isize)>, &mut Updates<O>) + 'static;

    /// [`reduce`]: each changed key's output from its whole input.
    fn reduce_total<O, L>(self, name: &str, logic: L) -> VecCollection<'s, u64, (K, O), isize>
    where
        O: ExchangeData + Clone + Ord,
        L: FnMut(&K, &[(V, isize)], &mut Vec<(O, isize)>) + 'static;

    /// [`fold_with`]: one value per key, and what its change emits.
    fn fold_total<O, X, L, E>(self, name: &str, logic: L, emit: E) -> VecCollection<'s, u64, X, isize>
    where
        O: PartialEq + 'static,
        X: ExchangeData,
        L: FnMut(&K, &[(V, isize)]) -> O + 'static,
        E: FnMut(&K, Option<&O>, Option<&O>, &mut Vec<(X, isize)>) + 'static;

    /// [`join`]: every pair of a key's values on both sides.
    fn join_total<W, O, L>(self, right: VecCollection<'s, u64, (K, W), isize>, name: &str, logic: L) -> VecCollection<'s, u64, O, isize>
    where
        W: ExchangeData + Clone + Ord,
        O: ExchangeData + Clone,
        L: FnMut(&K, &V, &W) -> O + 'static;
}

impl<'s, K, V> TotalOps<'s, K, V> for VecCollection<'s, u64, (K, V), isize>
where
    K: ExchangeData + Clone + Hashable + Hash + Ord,
    V: ExchangeData + Clone + Ord,
{
    fn by_tick<O, L>(self, name: &str, on_tick: L) -> VecCollection<'s, u64, O, isize>
    where
        O: ExchangeData,
        L: FnMut(u64, &mut Vec<((K, V), isize)>, &mut Updates<O>) + 'static,
    {
        by_tick(self, name, on_tick)
    }

    fn reduce_total<O, L>(self, name: &str, logic: L) -> VecCollection<'s, u64, (K, O), isize>
    where
        O: ExchangeData + Clone + Ord,
        L: FnMut(&K, &[(V, isize)], &mut Vec<(O, isize)>) + 'static,
    {
        reduce(self, name, logic)
    }

    fn fold_total<O, X, L, E>(self, name: &str, logic: L, emit: E) -> VecCollection<'s, u64, X, isize>
    where
        O: PartialEq + 'static,
        X: ExchangeData,
        L: FnMut(&K, &[(V, isize)]) -> O + 'static,
        E: FnMut(&K, Option<&O>, Option<&O>, &mut Vec<(X, isize)>) + 'static,
    {
        fold_with(self, name, logic, emit)
    }

    fn join_total<W, O, L>(self, right: VecCollection<'s, u64, (K, W), isize>, name: &str, logic: L) -> VecCollection<'s, u64, O, isize>
    where
        W: ExchangeData + Clone + Ord,
        O: ExchangeData + Clone,
        L: FnMut(&K, &V, &W) -> O + 'static,
    {
        join(self, right, name, logic)
    }
}

/// [`count_with`] as a method of collections of keys: the count of each
/// changed key, and what its change emits.
pub trait CountTotalOps<'s, K> {
    fn count_total_with<X, E>(self, name: &str, emit: E) -> VecCollection<'s, u64, X, isize>
    where
        X: ExchangeData,
        E: FnMut(&K, isize, isize, &mut Vec<(X, isize)>) + 'static;
}

impl<'s, K> CountTotalOps<'s, K> for VecCollection<'s, u64, (K, ()), isize>
where
    K: ExchangeData + Clone + Hashable + Hash + Ord,
{
    fn count_total_with<X, E>(self, name: &str, emit: E) -> VecCollection<'s, u64, X, isize>
    where
        X: ExchangeData,
        E: FnMut(&K, isize, isize, &mut Vec<(X, isize)>) + 'static,
    {
        count_with(self, name, emit)
    }
}

/// A binary operator over ticks: `on_tick` sees each complete tick's
/// updates of both inputs, exchanged by `keys` so that one worker sees all
/// of a key. It may also ask, through [`Wakes`], to run at a later tick
/// with no input (timers: `crate::dataflow::timed`). [`TotalOps`] covers
/// the common shapes; this is for a stage whose logic is its own
/// (memberships from atoms and the universe, timed atoms).
pub fn binary_by_tick<'s, D1, D2, O, F1, F2, L>(
    left: VecCollection<'s, u64, D1, isize>,
    right: VecCollection<'s, u64, D2, isize>,
    name: &str,
    keys: (F1, F2),
    on_tick: L,
) -> VecCollection<'s, u64, O, isize>
where
    D1: ExchangeData,
    D2: ExchangeData,
    O: ExchangeData,
    F1: Fn(&D1) -> u64 + 'static,
    F2: Fn(&D2) -> u64 + 'static,
    L: FnMut(u64, &mut Vec<(D1, isize)>, &mut Vec<(D2, isize)>, &mut Updates<O>, &mut Wakes) + 'static,
{
    by_tick2((left, Direct), right, name, keys, on_tick)
}

/// A collection at ticks.
type Coll<'s, D> = VecCollection<'s, u64, D, isize>;

/// [`binary_by_tick`] for three inputs: each complete tick's updates of
/// all three (exchanged by `keys`), together, in ascending order of ticks.
pub fn ternary_by_tick<'s, A, B, C, O, FA, FB, FC, L>(
    (a, b, c): (Coll<'s, A>, Coll<'s, B>, Coll<'s, C>),
    name: &str,
    keys: (FA, FB, FC),
    mut on_tick: L,
) -> VecCollection<'s, u64, O, isize>
where
    A: ExchangeData,
    B: ExchangeData,
    C: ExchangeData,
    O: ExchangeData,
    FA: Fn(&A) -> u64 + 'static,
    FB: Fn(&B) -> u64 + 'static,
    FC: Fn(&C) -> u64 + 'static,
    L: FnMut(u64, (&mut Vec<(A, isize)>, &mut Vec<(B, isize)>, &mut Vec<(C, isize)>), &mut Updates<O>) + 'static,
{
    let (out, _none) =
        by_tick3::<_, _, _, _, _, _, (), _, _, _, _, _, _>(((a, Direct), (b, Direct)), c, name, keys, move |t, inputs, (out, _)| {
            on_tick(t, inputs, out)
        });
    out
}

#[cfg(test)]
mod tests {
    //! Each operator against differential's own on random histories, with
    //! one and two workers: the same updates must come out at the same ticks.

    use std::sync::{Arc, Mutex};

    use super::*;

    use differential_dataflow::consolidation::consolidate_updates;
    use differential_dataflow::input::Input;
    use differential_dataflow::operators::CountTotal;
    use proptest::prelude::*;
    use timely::dataflow::operators::Inspect;

    type Update = (u8, u8, u64, isize);
    type Out = Vec<((u8, u8, u8), u64, isize)>;
    type Seen = Arc<Mutex<Out>>;

    /// Updates `(key, value, tick, diff)` in tick order, as an input feeds them.
    fn history() -> impl Strategy<Value = Vec<Update>> {
        prop::collection::vec((0u8..6, 0u8..5, 0u64..12, prop_oneof![Just(1isize), Just(-1), Just(2)]), 0..80).prop_map(|mut u| {
            u.sort_by_key(|x| x.2);
            u
        })
    }

    /// Updates of a collection that never has a negative multiplicity: each
    /// record enters at one tick and may leave at a later one.
    fn well_formed() -> impl Strategy<Value = Vec<Update>> {
        prop::collection::vec((0u8..8, 0u8..5, 0u64..12, prop::option::of(1u64..6)), 0..40).prop_map(|records| {
            let mut u: Vec<Update> = records
                .into_iter()
                .flat_map(|(k, v, t, stay)| {
                    let leave = stay.map(|d| (k, v, t + d, -1));
                    std::iter::once((k, v, t, 1)).chain(leave)
                })
                .collect();
            u.sort_by_key(|x| x.2);
            u
        })
    }

    /// Runs `build` over `left` and `right` on `workers` workers and returns
    /// the consolidated updates of the two collections it returns, ours first.
    fn run<F>(workers: usize, left: Vec<Update>, right: Vec<Update>, build: F) -> (Out, Out)
    where
        F: for<'s> Fn(
                VecCollection<'s, u64, (u8, u8), isize>,
                VecCollection<'s, u64, (u8, u8), isize>,
            ) -> (
                VecCollection<'s, u64, (u8, u8, u8), isize>,
                VecCollection<'s, u64, (u8, u8, u8), isize>,
            ) + Send
            + Sync
            + 'static,
    {
        let ours: Seen = Arc::default();
        let theirs: Seen = Arc::default();
        let (o, t) = (ours.clone(), theirs.clone());
        // A worker's panic fails the test at once instead of hanging it.
        crate::dataflow::exit_when_a_worker_panics();
        timely::execute(timely::Config::process(workers), move |worker| {
            let (o, t) = (o.clone(), t.clone());
            let (mut l_in, mut r_in) = worker.dataflow::<u64, _, _>(|scope| {
                let (l_in, l) = scope.new_collection();
                let (r_in, r) = scope.new_collection();
                let (a, b) = build(l, r);
                a.inner.inspect(move |x| o.lock().unwrap().push(*x));
                b.inner.inspect(move |x| t.lock().unwrap().push(*x));
                (l_in, r_in)
            });
            if worker.index() == 0 {
                for tick in 0..20 {
                    for &(k, v, _, r) in left.iter().filter(|u| u.2 == tick) {
                        l_in.update((k, v), r);
                    }
                    for &(k, v, _, r) in right.iter().filter(|u| u.2 == tick) {
                        r_in.update((k, v), r);
                    }
                    l_in.advance_to(tick + 1);
                    r_in.advance_to(tick + 1);
                    l_in.flush();
                    r_in.flush();
                    worker.step();
                }
            }
        })
        .expect("timely runs");
        let take = |s: Seen| {
            let mut v = std::mem::take(&mut *s.lock().unwrap());
            consolidate_updates(&mut v);
            v
        };
        (take(ours), take(theirs))
    }

    /// A reduce whose output depends on every value and multiplicity.
    fn summary(_k: &u8, input: &[(u8, isize)], out: &mut Vec<(u8, isize)>) {
        let total: isize = input.iter().map(|(v, r)| *v as isize * r).sum();
        out.push((input[0].0.wrapping_add(total as u8), 1));
        if input.len() > 1 {
            out.push((200, input.len() as isize));
        }
    }

    proptest! {
        #[test]
        fn reduce_matches_differential(updates in history(), workers in 1usize..3) {
            let (ours, theirs) = run(workers, updates, Vec::new(), |l, _r| {
                let ours = reduce(l.clone(), "Ours", summary).map(|(k, o)| (k, o, 0));
                let theirs = l
                    .reduce(|k, input, out| summary(k, &input.iter().map(|(v, r)| (**v, *r)).collect::<Vec<_>>(), out))
                    .map(|(k, o)| (k, o, 0));
                (ours, theirs)
            });
            prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn fold_matches_differential(updates in history(), workers in 1usize..3) {
            // One value per key, emitted as differential's reduce emits rows.
            let fold = |input: &[(u8, isize)]| {
                let total: isize = input.iter().map(|(v, r)| *v as isize * r).sum();
                input[0].0.wrapping_add(total as u8)
            };
            let (ours, theirs) = run(workers, updates, Vec::new(), move |l, _r| {
                let ours = fold_with(l.clone(), "Ours", move |_k, input| fold(input), |k, old, new, out| {
                    out.extend(old.map(|o| ((*k, *o, 0), -1)));
                    out.extend(new.map(|n| ((*k, *n, 0), 1)));
                });
                let theirs = l
                    .reduce(move |_k, input, out| out.push((fold(&input.iter().map(|(v, r)| (**v, *r)).collect::<Vec<_>>()), 1)))
                    .map(|(k, o)| (k, o, 0));
                (ours, theirs)
            });
            prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn count_matches_differential(updates in history(), workers in 1usize..3) {
            let (ours, theirs) = run(workers, updates, Vec::new(), |l, _r| {
                let ours = count(l.clone().map(|kv| (kv, ())), "Ours").map(|((k, v), n)| (k, v, n as u8));
                let theirs = l.count_total().map(|((k, v), n)| (k, v, n as u8));
                (ours, theirs)
            });
            prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn propagate_matches_differential(edges in well_formed(), labels in well_formed(), workers in 1usize..3) {
            // Edges in both directions, as identity feeds them.
            let edges = edges.into_iter().flat_map(|(a, b, t, r)| [(a, b, t, r), (b, a, t, r)]).collect();
            let (ours, theirs) = run(workers, edges, labels, |e, n| {
                let ours = propagate(e.clone(), n.clone(), "Ours").map(|(n, l)| (n, l, 0));
                let theirs = differential_dataflow::algorithms::graphs::propagate::propagate(e, n).map(|(n, l)| (n, l, 0));
                (ours, theirs)
            });
            prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn propagate_forgetting_matches_differential(edges in well_formed(), labels in well_formed(), workers in 1usize..3) {
            // Label 4 stands for a forget of the node: each node forgotten
            // at most once and never taken back, as the API forgets.
            let edges = edges.into_iter().flat_map(|(a, b, t, r)| [(a, b, t, r), (b, a, t, r)]).collect();
            let mut forgotten = std::collections::BTreeSet::new();
            let labels = labels.into_iter().filter(|&(n, l, _, r)| l != 4 || (r > 0 && forgotten.insert(n))).collect();
            let (ours, theirs) = run(workers, edges, labels, |e, n| {
                let ours = propagate_forgetting(e.clone(), n.clone().map(|(n, l)| (n, (l != 4).then_some(l))), "Ours")
                    .map(|(n, l)| (n, l, 0));
                let labelled = n.clone().filter(|(_, l)| *l != 4);
                let gone = n.filter(|(_, l)| *l == 4).map(|(n, _)| n);
                let remaining = labelled.clone().concat(labelled.semijoin(gone).negate());
                let theirs = differential_dataflow::algorithms::graphs::propagate::propagate(e, remaining).map(|(n, l)| (n, l, 0));
                (ours, theirs)
            });
            prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn join_matches_differential(left in history(), right in history(), workers in 1usize..3) {
            let (ours, theirs) = run(workers, left, right, |l, r| {
                let ours = join(l.clone(), r.clone(), "Ours", |k, v, w| (*k, *v, *w));
                let theirs = l.arrange_by_key().join_core(r.arrange_by_key(), |k, v, w| Some((*k, *v, *w)));
                (ours, theirs)
            });
            prop_assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn a_key_whose_values_all_left_is_dropped() {
        let mut sides: FxHashMap<u8, Both<Side<u8>, u8>> = FxHashMap::default();
        let mut push = |k: u8, v: u8, r: isize| {
            sides.entry(k).or_default().left.push(v, r);
            settle(&mut sides, &k);
            sides.len()
        };
        push(1, 7, 1);
        assert_eq!(push(1, 7, -1), 0, "an empty key must not stay behind");
        for v in 0..100 {
            push(2, v, 1);
        }
        let left: Vec<usize> = (0..100).map(|v| push(2, v, -1)).collect();
        assert_eq!(left[98], 1, "a key with values left stays");
        assert_eq!(left[99], 0, "a large side that empties must be dropped too");
    }
}
