//! Ingest: the one sequential stage. Lines in input order become stamped
//! events on the clock.
//!
//! SPEC §1 and §3 make the fate of a line depend on everything read before
//! it: the clock (`T` minus lateness) decides whether an event is late, and
//! the dedupe memory is forgotten as the clock passes `e + horizon`, while
//! only accepted, non-duplicate events move `T`. So [`Ingest`] reads lines in
//! order on one worker, and everything after it is data-parallel.
//!
//! Dedupe memory: one `u128` key and one `u64` time per event in the last
//! horizon, about `events/s × horizon × 40 bytes` with the map and heap.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

use serde::{Deserialize, Serialize};

use crate::core::clock::{tick_of, Clock};
use crate::core::id::{key_of, Id, IdKind, Key, Label};
use crate::ingest::event::{decode, Event, EventType};

/// An accepted event with the tick at which it takes effect.
#[derive(Clone, Debug)]
pub struct Stamped {
    /// Boxed as decoded: an event is a few hundred bytes, moved from the
    /// decoding thread to the output without being copied.
    pub event: Box<Event>,
    pub effect: u64,
    pub late: bool,
}

/// What became of one line.
#[derive(Debug)]
pub enum Outcome {
    Blank,
    Bad(String),
    /// `group`: valid, then dropped.
    Ignored,
    Duplicate,
    Accepted(Stamped),
}

/// Counters for the summary line and metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub read: u64,
    pub accepted: u64,
    pub bad: u64,
    pub duplicates: u64,
    pub late: u64,
    pub ignored: u64,
    /// Accepted, then dropped: they name a forgotten id (SPEC §7).
    pub suppressed: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.read += o.read;
        self.accepted += o.accepted;
        self.bad += o.bad;
        self.duplicates += o.duplicates;
        self.late += o.late;
        self.ignored += o.ignored;
        self.suppressed += o.suppressed;
    }
}

/// Dedupe keys by the time they may be forgotten (`e + horizon`). Events
/// come mostly in time order, so most keys join a queue in arrival order
/// (O(1) in and out, and read in sequence); one that would break its order
/// waits in a heap instead. A heap alone cost a cache miss per level for
/// every event.
#[derive(Default)]
struct Forget {
    queue: std::collections::VecDeque<(u64, u128)>,
    stray: BinaryHeap<Reverse<(u64, u128)>>,
}

impl Forget {
    fn push(&mut self, until: u64, key: u128) {
        if self.queue.back().is_none_or(|&(last, _)| last <= until) {
            self.queue.push_back((until, key));
        } else {
            self.stray.push(Reverse((until, key)));
        }
    }

    /// The earliest key whose time is before `now`, taken out.
    fn pop_before(&mut self, now: u64) -> Option<(u64, u128)> {
        let queued = self.queue.front().copied().filter(|&(until, _)| until < now);
        let stray = self.stray.peek().map(|r| r.0).filter(|&(until, _)| until < now);
        match (queued, stray) {
            (Some(q), Some(s)) if s < q => self.stray.pop().map(|r| r.0),
            (Some(_), _) => self.queue.pop_front(),
            (None, Some(_)) => self.stray.pop().map(|r| r.0),
            (None, None) => None,
        }
    }
}

pub struct Ingest {
    pub clock: Clock,
    horizon: u64,
    remembered: FxHashMap<u128, u64>,
    forget: Forget,
    pub counters: Counters,
    /// The clock follows a watermark given from outside (Kafka: the least
    /// over partitions) instead of the largest event time read.
    pub external_clock: bool,
}

impl Ingest {
    pub fn new(tick: u64, lateness: u64, horizon: u64) -> Ingest {
        Ingest {
            clock: Clock::new(tick, lateness),
            horizon,
            remembered: FxHashMap::default(),
            forget: Forget::default(),
            counters: Counters::default(),
            external_clock: false,
        }
    }

    /// Reads one line (without its line ending).
    pub fn read(&mut self, line: &[u8]) -> Outcome {
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            return Outcome::Blank;
        }
        self.counters.read += 1;
        match decode(line) {
            Ok(event) => self.accept(Box::new(event)),
            Err(e) => self.reject(e.0),
        }
    }

    /// A line that did not decode (already counted as read).
    pub fn reject(&mut self, reason: String) -> Outcome {
        self.counters.bad += 1;
        Outcome::Bad(reason)
    }

    /// Takes an event decoded elsewhere (already counted as read).
    pub fn accept(&mut self, event: Box<Event>) -> Outcome {
        if event.kind == EventType::Group {
            self.counters.ignored += 1;
            return Outcome::Ignored;
        }
        // One lookup: a key remembered within the horizon is a duplicate,
        // otherwise it is remembered from this event on.
        match self.remembered.entry(event.key) {
            std::collections::hash_map::Entry::Occupied(mut first) => {
                if self.clock.now.is_none_or(|now| now <= first.get().saturating_add(self.horizon)) {
                    self.counters.duplicates += 1;
                    return Outcome::Duplicate;
                }
                first.insert(event.time);
            }
            std::collections::hash_map::Entry::Vacant(new) => {
                new.insert(event.time);
            }
        }
        self.forget.push(event.time.saturating_add(self.horizon), event.key);
        let (effect, late) = self.clock.effect_tick(event.time);
        self.counters.accepted += 1;
        if late {
            self.counters.late += 1;
        }
        if self.external_clock {
            self.clock.max_time = self.clock.max_time.max(Some(event.time));
        } else if self.clock.observe(event.time) {
            self.forget_passed();
        }
        Outcome::Accepted(Stamped { event, effect, late })
    }

    /// Moves the clock to `t` without an event (live input gone idle).
    pub fn advance_clock(&mut self, t: u64) {
        if self.clock.advance_to(t / self.clock.tick * self.clock.tick) {
            self.forget_passed();
        }
    }

    /// Moves the clock by an event-time watermark `w`: to `w` minus the
    /// lateness, rounded down to the tick (SPEC §3 with `T = w`).
    pub fn advance_watermark(&mut self, w: u64) {
        if w >= self.clock.lateness {
            self.advance_clock(w - self.clock.lateness);
        }
    }

    /// The state a checkpoint keeps (see `crate::run::checkpoint`).
    pub fn state(&self) -> crate::ingest::stamp::IngestState {
        let mut remembered: Vec<(u128, u64)> = self.remembered.iter().map(|(k, t)| (*k, *t)).collect();
        remembered.sort_unstable();
        crate::ingest::stamp::IngestState {
            max_time: self.clock.max_time,
            now: self.clock.now,
            remembered,
            counters: self.counters.clone(),
        }
    }

    /// Takes up the state of a checkpoint.
    pub fn restore(&mut self, st: crate::ingest::stamp::IngestState) {
        self.clock.max_time = st.max_time;
        self.clock.now = st.now;
        self.counters = st.counters;
        self.forget = Forget::default();
        for &(k, t) in &st.remembered {
            self.forget.push(t.saturating_add(self.horizon), k);
        }
        self.remembered = st.remembered.into_iter().collect();
    }

    /// Drops dedupe keys whose `e + horizon` the clock has passed.
    fn forget_passed(&mut self) {
        let Some(now) = self.clock.now else { return };
        while let Some((until, key)) = self.forget.pop_before(now) {
            if let std::collections::hash_map::Entry::Occupied(first) = self.remembered.entry(key) {
                if first.get().saturating_add(self.horizon) == until {
                    first.remove();
                }
            }
        }
    }

    /// The last tick of file input: the clock moves to the tick of the
    /// largest event time, then to `until` when that is later; with `until`
    /// nothing after it is written. `None` when no event was accepted.
    pub fn final_tick(&self, until: Option<u64>) -> Option<u64> {
        let tick = self.clock.tick;
        let last = self.clock.max_time.map(|t| tick_of(t, tick).max(self.clock.now.unwrap_or(0)))?;
        Some(match until {
            Some(u) => u / tick * tick,
            None => last,
        })
    }
}

/// Tracks the earliest tick at which each id and link exists, so identity
/// updates go in once per id and move earlier when an event out of order
/// shows one sooner.
#[derive(Default)]
pub struct Identities {
    /// By key: the earliest tick seen as an eligible id (named by the
    /// event's own `userId` or `anonymousId`), and seen at all; `u64::MAX`
    /// for never. Both in one entry: an event looks each of its ids up
    /// once.
    ids: FxHashMap<Key, [u64; 2]>,
    links: FxHashMap<(Key, Key), u64>,
}

/// A change to an identity input: data, time, diff.
pub type Change<D> = (D, u64, isize);

impl Identities {
    /// Drops every trace of `keys` (forgotten ids: no event naming them is
    /// fed again).
    pub fn forget(&mut self, keys: &rustc_hash::FxHashSet<Key>) {
        self.ids.retain(|k, _| !keys.contains(k));
        self.links.retain(|(a, b), _| !keys.contains(a) && !keys.contains(b));
    }

    /// The state a checkpoint keeps.
    pub fn state(&self) -> crate::ingest::stamp::IdentityState {
        fn sorted<K: Ord>(ticks: impl Iterator<Item = (K, u64)>) -> Vec<(K, u64)> {
            let mut v: Vec<(K, u64)> = ticks.filter(|(_, t)| *t != u64::MAX).collect();
            v.sort_unstable();
            v
        }
        crate::ingest::stamp::IdentityState {
            seen: sorted(self.ids.iter().map(|(k, t)| (*k, t[1]))),
            named: sorted(self.ids.iter().map(|(k, t)| (*k, t[0]))),
            links: sorted(self.links.iter().map(|(k, t)| (*k, *t))),
        }
    }

    /// Takes up the state of a checkpoint.
    pub fn restore(st: crate::ingest::stamp::IdentityState) -> Identities {
        let mut ids: FxHashMap<Key, [u64; 2]> = FxHashMap::default();
        for (which, ticks) in [(0, st.named), (1, st.seen)] {
            for (k, t) in ticks {
                ids.entry(k).or_insert([u64::MAX; 2])[which] = t;
            }
        }
        Identities {
            ids,
            links: st.links.into_iter().collect(),
        }
    }

    /// The node and link changes an accepted event makes, and its anchor's
    /// key (its `userId`'s, else its `anonymousId`'s). Most events change
    /// nothing (their ids are known, no sooner): that path hashes each id
    /// once, looks keys up and allocates nothing. The links are those of
    /// `Event::link_refs`, whose ends other than the event's own ids are
    /// nodes too.
    pub fn changes(&mut self, s: &Stamped, nodes: &mut Vec<Change<(Key, Label)>>, links: &mut Vec<Change<(Key, Key)>>) -> Key {
        let t = s.effect;
        // `t` becomes the earliest tick of `k`'s node as an eligible id
        // (`false`) or an ineligible one (`true`), for each of `which`.
        let mut node = |ids: &mut FxHashMap<Key, [u64; 2]>, kind: IdKind, name: &str, k: Key, which: &[bool]| {
            let ticks = ids.entry(k).or_insert([u64::MAX; 2]);
            for &ineligible in which {
                let at = &mut ticks[ineligible as usize];
                if t < *at {
                    let old = std::mem::replace(at, t);
                    let label = (ineligible, Id { kind, name: name.into() }, k);
                    if old != u64::MAX {
                        nodes.push(((k, label.clone()), old, -1));
                    }
                    nodes.push(((k, label), t, 1));
                }
            }
        };
        let ev = &s.event;
        let user = ev.user_id.as_deref().map(|u| (u, key_of(IdKind::User, u)));
        let anon = ev.anonymous_id.as_deref().map(|a| (a, key_of(IdKind::Anon, a)));
        for (kind, id) in [(IdKind::User, user), (IdKind::Anon, anon)] {
            if let Some((name, k)) = id {
                node(&mut self.ids, kind, name, k, &[false, true]);
            }
        }
        let mut link = |(ka, kb): (Key, Key)| {
            let pair = (ka.min(kb), ka.max(kb));
            let old = match self.links.get_mut(&pair) {
                Some(old) if *old <= t => return,
                Some(old) => Some(std::mem::replace(old, t)),
                None => {
                    self.links.insert(pair, t);
                    None
                }
            };
            for (x, y) in [(ka, kb), (kb, ka)] {
                links.push(((x, y), t, 1));
                if let Some(old) = old {
                    links.push(((x, y), old, -1));
                }
            }
        };
        if let (Some((_, ku)), Some((_, ka))) = (user, anon) {
            link((ku, ka));
        }
        if let (EventType::Alias, Some((_, ku)), Some(previous)) = (ev.kind, user, ev.previous_id.as_deref()) {
            for kind in [IdKind::User, IdKind::Anon] {
                let kp = key_of(kind, previous);
                node(&mut self.ids, kind, previous, kp, &[true]);
                link((ku, kp));
            }
        }
        match (user, anon) {
            (Some((_, k)), _) | (None, Some((_, k))) => k,
            (None, None) => unreachable!("accepted events have an id"),
        }
    }
}

/// A dead-letter line: `at`'s fields (where the line was), why it was
/// refused, and its text (the first 4 KB). Every input's dead letters are
/// made here, each with its own kind of position.
pub fn dead_letter_of(at: impl Serialize, reason: &str, text: &[u8]) -> String {
    #[derive(Serialize)]
    struct Dead<'a, P> {
        #[serde(flatten)]
        at: P,
        reason: &'a str,
        text: &'a str,
    }
    let text = String::from_utf8_lossy(&text[..text.len().min(4096)]);
    serde_json::to_string(&Dead { at, reason, text: &text }).expect("serializable")
}

/// The dead letter of a line of a file or stream: its source and number.
pub fn dead_letter(source: &str, line: u64, reason: &str, text: &[u8]) -> String {
    #[derive(Serialize)]
    struct At<'a> {
        source: &'a str,
        line: u64,
    }
    dead_letter_of(At { source, line }, reason, text)
}

/// The dead letter of an event that came over HTTP: its position is its
/// request's receive time and its index in the request (SPEC §8).
pub fn dead_letter_at(place: crate::ingest::decode::Place, reason: &str, text: &[u8]) -> String {
    #[derive(Serialize)]
    struct At {
        source: &'static str,
        received: String,
        index: u32,
    }
    let at = At {
        source: "http",
        received: crate::core::clock::format_time(place.received, true),
        index: place.index,
    };
    dead_letter_of(at, reason, text)
}

/// The sequential state of [`Ingest`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestState {
    pub max_time: Option<u64>,
    pub now: Option<u64>,
    /// Dedupe memory: key and first time.
    pub remembered: Vec<(u128, u64)>,
    pub counters: Counters,
}

/// The identity ticks of [`Identities`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityState {
    pub seen: Vec<(Key, u64)>,
    pub named: Vec<(Key, u64)>,
    pub links: Vec<((Key, Key), u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(t: u64, id: &str) -> Vec<u8> {
        format!(r#"{{"type":"track","event":"x","userId":"u","timestamp":{t},"messageId":"{id}"}}"#).into_bytes()
    }

    #[test]
    fn late_events_take_effect_at_the_next_tick() {
        let mut ing = Ingest::new(1000, 2000, 3_600_000);
        let stamp = |o: Outcome| match o {
            Outcome::Accepted(s) => (s.effect, s.late),
            other => panic!("not accepted: {other:?}"),
        };
        assert_eq!(stamp(ing.read(&line(10_000, "a"))), (10_000, false));
        assert_eq!(stamp(ing.read(&line(20_000, "b"))), (20_000, false));
        assert_eq!(stamp(ing.read(&line(12_000, "c"))), (19_000, true));
        assert_eq!(ing.counters.late, 1);
    }

    #[test]
    fn duplicates_are_forgotten_after_the_horizon() {
        let mut ing = Ingest::new(1000, 0, 10_000);
        assert!(matches!(ing.read(&line(0, "same")), Outcome::Accepted(_)));
        assert!(matches!(ing.read(&line(3_000, "same")), Outcome::Duplicate));
        assert!(matches!(ing.read(&line(10_000, "other")), Outcome::Accepted(_)));
        assert!(
            matches!(ing.read(&line(10_500, "same")), Outcome::Duplicate),
            "now == e + horizon still remembers"
        );
        assert!(matches!(ing.read(&line(30_000, "x")), Outcome::Accepted(_)));
        assert!(matches!(ing.read(&line(31_000, "same")), Outcome::Accepted(_)));
        assert_eq!(ing.counters.duplicates, 2);
    }

    #[test]
    fn forget_yields_every_key_due_whatever_the_order_it_came_in() {
        let mut f = Forget::default();
        for (until, key) in [(5, 1), (3, 2), (7, 3), (6, 4), (5, 5), (2, 6)] {
            f.push(until, key);
        }
        let mut due: Vec<(u64, u128)> = std::iter::from_fn(|| f.pop_before(7)).collect();
        assert!(due.is_sorted(), "earliest first: {due:?}");
        due.sort_unstable();
        assert_eq!(due, vec![(2, 6), (3, 2), (5, 1), (5, 5), (6, 4)]);
        assert_eq!(f.pop_before(8), Some((7, 3)));
        assert_eq!(f.pop_before(u64::MAX), None);
    }

    #[test]
    fn identity_changes_move_earlier_once() {
        let mut ids = Identities::default();
        let ev = |t: u64| Stamped {
            event: Box::new(decode(format!(r#"{{"type":"identify","userId":"u","anonymousId":"a","timestamp":{t}}}"#).as_bytes()).unwrap()),
            effect: t,
            late: false,
        };
        let (mut nodes, mut links) = (Vec::new(), Vec::new());
        ids.changes(&ev(5000), &mut nodes, &mut links);
        assert_eq!(links.len(), 2);
        let n = nodes.len();
        ids.changes(&ev(6000), &mut nodes, &mut links);
        assert_eq!((nodes.len(), links.len()), (n, 2), "a later repeat changes nothing");
        ids.changes(&ev(4000), &mut nodes, &mut links);
        assert_eq!(links.len(), 6, "an earlier one moves both directions earlier");
    }

    #[test]
    fn identity_ticks_survive_a_checkpoint() {
        let stamped = |json: &str, t: u64| Stamped {
            event: Box::new(decode(json.replace("T", &t.to_string()).as_bytes()).unwrap()),
            effect: t,
            late: false,
        };
        let (mut nodes, mut links) = (Vec::new(), Vec::new());
        let mut ids = Identities::default();
        // `p` is seen (as an alias's previous id), never named by an event.
        ids.changes(
            &stamped(r#"{"type":"alias","userId":"u","previousId":"p","timestamp":T}"#, 5000),
            &mut nodes,
            &mut links,
        );
        ids.changes(
            &stamped(r#"{"type":"track","event":"x","anonymousId":"a","timestamp":T}"#, 6000),
            &mut nodes,
            &mut links,
        );
        let state = ids.state();
        let (u, a, pu, pa) = (
            key_of(IdKind::User, "u"),
            key_of(IdKind::Anon, "a"),
            key_of(IdKind::User, "p"),
            key_of(IdKind::Anon, "p"),
        );
        let sorted = |mut v: Vec<(Key, u64)>| {
            v.sort_unstable();
            v
        };
        assert_eq!(state.named, sorted(vec![(u, 5000), (a, 6000)]));
        assert_eq!(state.seen, sorted(vec![(u, 5000), (a, 6000), (pu, 5000), (pa, 5000)]));
        let mut back = Identities::restore(state.clone());
        assert_eq!(back.state(), state);
        // Named at last, `p` gets its eligible node and nothing else.
        nodes.clear();
        back.changes(
            &stamped(r#"{"type":"track","event":"x","userId":"p","timestamp":T}"#, 7000),
            &mut nodes,
            &mut links,
        );
        let eligible = (
            false,
            Id {
                kind: IdKind::User,
                name: "p".into(),
            },
            pu,
        );
        assert_eq!(nodes, vec![((pu, eligible), 7000, 1)]);
    }
}
