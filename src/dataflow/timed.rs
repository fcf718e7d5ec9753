//! Atoms that read `now`: values that change with the clock, not only with
//! events (SPEC §4 "Times").
//!
//! `time(trait.trial_ends_at) - now <= 3d` turns true for a profile at a
//! tick where nothing about it arrives. Such an atom ([`AtomDef::timed`])
//! is evaluated here, in one operator keyed by profile whose inputs are the
//! term rows its atoms read and the universe: every profile that exists has
//! a row for every timed atom (its value may change even over empty terms,
//! as `hour(now) >= 18` does), so the segments stage never falls back on an
//! empty value for it.
//!
//! A profile is evaluated when its terms change, when it enters the
//! universe, and at its *timer*: the earliest tick at which one of its
//! atoms may change with the terms as they are ([`AtomDef::next_change`]).
//! Timers wait in a heap and the operator asks its shell to run at the
//! earliest ([`Wakes`]); at that tick, once every input has passed it,
//! the profile is evaluated again, its changed atoms emitted, and its next
//! timer queued. A profile never evaluated at a tick where nothing changes
//! for it costs nothing at that tick. Timers past the last tick written
//! are dropped with the input, as window expiries are.
//!
//! Memory: per profile, the timed atoms' term values and last emitted
//! values; per pending timer, one heap entry (tick and profile, 16 bytes).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::rc::Rc;

use differential_dataflow::consolidation::consolidate;
use differential_dataflow::hashable::Hashable;
use differential_dataflow::VecCollection;
use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use crate::core::fact::AtomRow;
use crate::core::id::{AtomId, Key, StreamId};
use crate::core::value::Value;
use crate::dataflow::total::{binary_by_tick, Wakes};
use crate::plan::Plan;

/// A term value one timed atom reads: `(profile, (timed atom, slot, value))`,
/// the timed atom numbered in [`Plan::timed`] order.
type Slot = (Key, (u32, u32, Value));

/// One timed atom of one profile.
#[derive(Clone, Copy, Default)]
struct AtomState {
    /// The value last emitted (`None`: no row).
    emitted: Option<bool>,
    /// Whether its terms changed at this tick.
    changed: bool,
    /// The tick it may next change at with the same terms.
    next: Option<u64>,
}

/// One profile's timed atoms: inline for up to two atoms and two term
/// values, so a profile is one hash-map entry with no allocation of its own.
struct Profile {
    /// Its universe multiplicity.
    exists: isize,
    /// The term values the timed atoms read, one atom after the other
    /// (`at[i] .. at[i + 1]` for timed atom `i`; empty values by default).
    slots: SmallVec<[Value; 2]>,
    atoms: SmallVec<[AtomState; 2]>,
    /// Whether it entered or left the universe at this tick.
    moved: bool,
    /// The tick of its one live entry in the timers' heap, no later than
    /// the earliest of the atoms' `next`: a later next change does not
    /// queue another entry (that entry, when due, evaluates the profile and
    /// queues the next), so the heap holds about one entry per profile
    /// however often its terms change.
    queued: Option<u64>,
}

/// The bytes of one profile's entry in the operator's map (key and state,
/// hash-table slack not counted) and of one pending timer in its heap: the
/// state the timers themselves keep, for the benchmark to report.
pub fn state_bytes() -> (usize, usize) {
    (std::mem::size_of::<(Key, Profile)>(), std::mem::size_of::<Reverse<(u64, Key)>>())
}

/// `((atom, profile), holds)` for every timed atom of `plan` and every
/// profile of `universe`, at every tick where the value changes; `None`
/// when no atom reads `now`.
pub fn timed<'s>(
    rows: VecCollection<'s, u64, ((StreamId, Key), Vec<Value>), isize>,
    universe: VecCollection<'s, u64, Key, isize>,
    plan: Rc<Plan>,
    tick: u64,
) -> Option<VecCollection<'s, u64, AtomRow, isize>> {
    if plan.timed.is_empty() {
        return None;
    }
    // For each term, the timed atoms that read it, with the slot.
    let mut reading: Vec<Vec<(u32, u32)>> = vec![Vec::new(); plan.terms.len()];
    for (i, &a) in plan.timed.iter().enumerate() {
        for (slot, &t) in plan.atoms[a].terms.iter().enumerate() {
            reading[t].push((i as u32, slot as u32));
        }
    }
    let readers = plan.clone();
    let slots = rows.flat_map(move |((stream, profile), values)| {
        let mut out: Vec<Slot> = Vec::new();
        for (&term, value) in readers.folds[stream.index()].iter().zip(values) {
            for &(i, slot) in &reading[term] {
                out.push((profile, (i, slot, value.clone())));
            }
        }
        out
    });
    // Where each timed atom's term values start in `Profile::slots`.
    let mut at = vec![0usize];
    for &a in &plan.timed {
        at.push(at.last().copied().unwrap_or(0) + plan.atoms[a].terms.len());
    }
    let empty: SmallVec<[Value; 2]> = plan
        .timed
        .iter()
        .flat_map(|&a| plan.atoms[a].terms.iter().map(|&t| plan.terms[t].agg.empty()))
        .collect();
    let mut profiles: FxHashMap<Key, Profile> = FxHashMap::default();
    let mut timers: BinaryHeap<Reverse<(u64, Key)>> = BinaryHeap::new();
    let mut touched: Vec<Key> = Vec::new();
    let by_profile = (|(p, _): &Slot| p.hashed(), |p: &Key| p.hashed());
    // Evaluates at `t` the atoms of `h` whose terms changed, whose own
    // next change is due, or all of them when the profile moved; returns
    // the profile's next timer.
    let slots_at = at.clone();
    let evaluate = move |t: u64, p: Key, h: &mut Profile, out: &mut Vec<(AtomRow, u64, isize)>| {
        for (i, &a) in plan.timed.iter().enumerate() {
            let state = h.atoms[i];
            if !(h.moved || state.changed || state.next.is_some_and(|n| n <= t)) {
                continue;
            }
            let def = &plan.atoms[a];
            let slots = &h.slots[slots_at[i]..slots_at[i + 1]];
            let row = |v: bool| ((AtomId::of(a), p), v);
            let is = (h.exists > 0).then(|| def.holds_at(slots, Some(t)));
            if is != state.emitted {
                out.extend(state.emitted.map(|v| (row(v), t, -1)));
                out.extend(is.map(|v| (row(v), t, 1)));
            }
            h.atoms[i] = AtomState {
                emitted: is,
                changed: false,
                next: is.and_then(|_| def.next_change(slots, t, tick)),
            };
        }
        h.moved = false;
        h.atoms.iter().filter_map(|s| s.next).min()
    };
    let atoms = at.len() - 1;
    let logic = move |t: u64,
                      slots: &mut Vec<(Slot, isize)>,
                      exists: &mut Vec<(Key, isize)>,
                      out: &mut Vec<(AtomRow, u64, isize)>,
                      wakes: &mut Wakes| {
        let fresh = || Profile {
            exists: 0,
            slots: empty.clone(),
            atoms: smallvec::smallvec![AtomState::default(); atoms],
            moved: false,
            queued: None,
        };
        for &(p, r) in exists.iter() {
            let h = profiles.entry(p).or_insert_with(fresh);
            h.exists += r;
            h.moved = true;
            touched.push(p);
        }
        // Retractions first: a changed value's old row goes before its new one.
        consolidate(slots);
        slots.sort_by_key(|(_, r)| *r);
        for ((p, (i, slot, value)), r) in slots.drain(..) {
            let h = profiles.entry(p).or_insert_with(fresh);
            let (i, j) = (i as usize, at[i as usize] + slot as usize);
            h.slots[j] = if r > 0 { value } else { empty[j].clone() };
            h.atoms[i].changed = true;
            touched.push(p);
        }
        // Profiles whose timer is due.
        while let Some(&Reverse((w, p))) = timers.peek() {
            if w > t {
                break;
            }
            timers.pop();
            if let Some(h) = profiles.get_mut(&p).filter(|h| h.queued == Some(w)) {
                h.queued = None;
                touched.push(p);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for p in touched.drain(..) {
            let h = profiles.get_mut(&p).expect("a touched profile");
            let next = evaluate(t, p, h, out);
            if let Some(w) = next.filter(|&w| h.queued.is_none_or(|q| w < q)) {
                h.queued = Some(w);
                timers.push(Reverse((w, p)));
                wakes.at(w);
            }
            if h.exists <= 0 && h.slots == empty {
                profiles.remove(&p);
            }
        }
    };
    Some(binary_by_tick(slots, universe, "Timed", by_profile, logic))
}
