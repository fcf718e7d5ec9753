//! The sequential front of one reader: it stamps events (dedupe, clock,
//! lateness), resolves their ids to identity updates and feeds the
//! dataflow's inputs at the ticks the events take effect.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use crate::core::fact::{Fact, Pay};
use crate::core::id::StreamId;
use crate::core::id::{Key, Label, Request};
use crate::dataflow::Inputs;
use crate::ingest::stamp::{Change, Counters, Identities, Ingest, Outcome, Stamped};
use crate::output::sink::Timings;
use crate::plan::Plan;
use crate::run::checkpoint;
use crate::run::job::{RunOptions, Suppression};

/// Reads events and feeds the inputs: the sequential front of one reader
/// (see [`Ingest`]).
pub struct Feeder {
    plan: Rc<Plan>,
    /// By stream: fed to `Inputs::counts` without its payload.
    counted: Vec<bool>,
    /// How lines read here are decoded (decoding threads get a copy).
    decoding: crate::ingest::decode::Decoding,
    inputs: Inputs,
    ingest: Ingest,
    identities: Identities,
    until: Option<u64>,
    /// For lifetime "latest value" streams: the fact fed last that still wins.
    winners: rustc_hash::FxHashMap<(Key, StreamId), (u64, Pay)>,
    node_changes: Vec<Change<(Key, Label)>>,
    link_changes: Vec<Change<(Key, Key)>>,
    /// Marks when ticks become final (the latency benchmark).
    pub timings: Option<Arc<Timings>>,
    /// With `--state`: every update fed, for checkpoints.
    log: Option<FedLog>,
    /// Forgotten ids and the tick they were forgotten at: an event naming
    /// one that takes effect then or later is suppressed (SPEC §7).
    forgotten: Suppression,
    /// Requests this reader feeds (worker 0's), by tick, oldest first.
    requests: std::collections::VecDeque<(u64, Request)>,
    /// What it fed of them: each id and pair once (a second request for
    /// the same is a no-op).
    requested: rustc_hash::FxHashSet<(Key, Key)>,
    /// The latest effect tick of an event fed.
    fed_until: Option<u64>,
}

/// Puts `keys` on the suppression list from tick `at` (an id forgotten
/// twice keeps the earlier tick).
fn forget(list: &mut rustc_hash::FxHashMap<Key, u64>, keys: &[Key], at: u64) {
    for k in keys {
        let f = list.entry(*k).or_insert(at);
        *f = (*f).min(at);
    }
}

/// The updates a reader fed, compacted at each checkpoint (see `crate::run::checkpoint`).
#[derive(Default)]
pub(super) struct FedLog {
    facts: checkpoint::Log<Fact>,
    nodes: checkpoint::Log<(Key, Label)>,
    links: checkpoint::Log<(Key, Key)>,
    forgotten: checkpoint::Log<Key>,
    unlinked: checkpoint::Log<(Key, Key)>,
    /// Events fed to the served model (with `--history`); a checkpoint
    /// keeps those at or after its frontier, the model's snapshot the rest.
    events: checkpoint::Log<(Key, crate::ingest::event::Kept)>,
}

impl Feeder {
    pub fn new(plan: Rc<Plan>, inputs: Inputs, opts: &RunOptions) -> Feeder {
        Feeder {
            counted: plan.counted_streams(),
            decoding: crate::ingest::decode::Decoding::new(&plan.streams, inputs.events.is_some()).on_threads(opts.decoders),
            plan,
            inputs,
            ingest: Ingest::new(opts.tick, opts.lateness, opts.dedupe_horizon),
            identities: Identities::default(),
            until: opts.until,
            winners: Default::default(),
            node_changes: Vec::new(),
            link_changes: Vec::new(),
            timings: None,
            log: None,
            forgotten: Default::default(),
            requests: Default::default(),
            requested: Default::default(),
            fed_until: None,
        }
    }

    /// Shares the suppression list with the other readers of the process,
    /// and knows the forgets among `requests` (every reader suppresses).
    pub fn suppress_with(&mut self, shared: Suppression, requests: &[(u64, Request)]) {
        {
            let mut list = shared.write().expect("not poisoned");
            for (at, r) in requests {
                if let Request::Forget(keys) = r {
                    forget(&mut list, keys, *at);
                }
            }
        }
        self.forgotten = shared;
    }

    /// Feeds `requests` to the dataflow, each at its tick (one reader only:
    /// worker 0's), as the inputs move past it.
    pub fn schedule(&mut self, mut requests: Vec<(u64, Request)>) {
        requests.sort_by_key(|(at, _)| *at);
        self.requests.extend(requests);
    }

    /// The tick a request made now takes effect at: the first not yet
    /// final and after every event already fed, so that each of those
    /// counts until it and none after it (see [`Feeder::request`]).
    pub fn request_tick(&self) -> u64 {
        let tick = self.ingest.clock.tick;
        self.frontier().max(self.fed_until.map_or(0, |e| e + tick))
    }

    /// Feeds a request now, at [`Feeder::request_tick`]; returns that tick.
    pub fn request(&mut self, r: Request) -> u64 {
        let at = self.request_tick();
        if let Request::Forget(keys) = &r {
            forget(&mut self.forgotten.write().expect("not poisoned"), keys, at);
        }
        self.feed_request(at, r);
        at
    }

    fn feed_request(&mut self, at: u64, r: Request) {
        match r {
            Request::Forget(keys) => {
                // A forgotten id is the pair (id, id).
                for k in keys.into_iter().filter(|k| self.requested.insert((*k, *k))) {
                    if let Some(log) = &mut self.log {
                        log.forgotten.push(k, at, 1);
                    }
                    self.inputs.forgotten.update_at(k, at, 1);
                }
            }
            Request::Unlink(a, b) => {
                if a == b || !self.requested.insert((a, b)) {
                    return;
                }
                self.requested.insert((b, a));
                for pair in [(a, b), (b, a)] {
                    if let Some(log) = &mut self.log {
                        log.unlinked.push(pair, at, 1);
                    }
                    self.inputs.unlinked.update_at(pair, at, 1);
                }
            }
        }
    }

    /// Whether an id is forgotten at or after `t`.
    pub fn forgets_from(&self, t: u64) -> bool {
        self.forgotten.read().expect("not poisoned").values().any(|at| *at >= t)
    }

    /// Whether `s` names an id forgotten at or before its effect tick.
    fn suppressed(&self, s: &Stamped) -> bool {
        let list = self.forgotten.read().expect("not poisoned");
        if list.is_empty() {
            return false;
        }
        let forgotten = |kind, name: &str| list.get(&crate::core::id::key_of(kind, name)).is_some_and(|at| *at <= s.effect);
        let e = &s.event;
        e.user_id.as_deref().is_some_and(|u| forgotten(crate::core::id::IdKind::User, u))
            || e.anonymous_id
                .as_deref()
                .is_some_and(|a| forgotten(crate::core::id::IdKind::Anon, a))
            || e.link_refs().any(|((ka, a), (kb, b))| forgotten(ka, a) || forgotten(kb, b))
    }

    /// Keeps every update fed, so that [`Feeder::checkpoint`] can save them.
    pub fn retain(&mut self) {
        self.log.get_or_insert_with(FedLog::default);
    }

    pub(super) fn fact(&mut self, d: Fact, t: u64, r: isize) {
        if let Some(log) = &mut self.log {
            log.facts.push(d.clone(), t, r);
        }
        self.input(d, t, r);
    }

    /// Feeds a fact to the input of its stream's kind.
    pub(super) fn input(&mut self, d: Fact, t: u64, r: isize) {
        let (anchor, stream, time, pay) = d;
        if self.counted[stream.index()] {
            self.inputs.counts.update_at((anchor, stream, time, ()), t, r);
        } else {
            self.inputs.facts.update_at((anchor, stream, time, pay), t, r);
        }
    }

    /// The reader's state for a checkpoint whose delivered frontier is
    /// `frontier`: its logs compacted there (see `crate::run::checkpoint`), its clock,
    /// dedupe memory and identity ticks. `None` unless [`Feeder::retain`]ed.
    pub fn checkpoint(&mut self, frontier: u64, worker: usize, position: crate::io::Position) -> Option<checkpoint::ReaderState> {
        let tick = self.ingest.clock.tick;
        let windows: Vec<Option<u64>> = self.plan.streams.iter().map(|s| s.window).collect();
        let log = self.log.as_mut()?;
        log.facts
            .compact(frontier, tick, |f, last| checkpoint::expired(f, last, &windows, tick));
        log.nodes.compact(frontier, tick, |_, _| false);
        log.links.compact(frontier, tick, |_, _| false);
        log.forgotten.compact(frontier, tick, |_, _| false);
        log.unlinked.compact(frontier, tick, |_, _| false);
        log.events.updates.retain(|(_, t, _)| *t >= frontier);
        // What was forgotten before the frontier leaves the checkpoint: every
        // update of its ids, whatever its tick (none counts any more).
        let purge: rustc_hash::FxHashSet<Key> = self
            .forgotten
            .read()
            .expect("not poisoned")
            .iter()
            .filter(|(_, at)| **at < frontier)
            .map(|(k, _)| *k)
            .collect();
        if !purge.is_empty() {
            log.facts.updates.retain(|((anchor, ..), _, _)| !purge.contains(anchor));
            log.nodes.updates.retain(|((k, _), _, _)| !purge.contains(k));
            log.links.updates.retain(|((a, b), _, _)| !purge.contains(a) && !purge.contains(b));
            log.events.updates.retain(|((anchor, _), _, _)| !purge.contains(anchor));
            self.winners.retain(|(anchor, _), _| !purge.contains(anchor));
            self.identities.forget(&purge);
        }
        let mut winners: Vec<((Key, StreamId), (u64, Pay))> = self.winners.iter().map(|(k, v)| (*k, v.clone())).collect();
        winners.sort();
        Some(checkpoint::ReaderState {
            worker,
            ingest: self.ingest.state(),
            identities: self.identities.state(),
            winners,
            // Lent to the checkpoint, and given back by `Feeder::checkpointed`.
            facts: std::mem::take(&mut log.facts.updates),
            nodes: std::mem::take(&mut log.nodes.updates),
            links: std::mem::take(&mut log.links.updates),
            forgotten: std::mem::take(&mut log.forgotten.updates),
            unlinked: std::mem::take(&mut log.unlinked.updates),
            events: std::mem::take(&mut log.events.updates),
            dead: Vec::new(),
            dead_sent: 0,
            position,
        })
    }

    /// Takes back the logs lent to a checkpoint by [`Feeder::checkpoint`]
    /// (and, from [`Feeder::restore`], the logs of the checkpoint it
    /// restores: the log goes on from what was fed).
    pub fn checkpointed(&mut self, st: checkpoint::ReaderState) {
        if let Some(log) = &mut self.log {
            log.facts.updates = st.facts;
            log.nodes.updates = st.nodes;
            log.links.updates = st.links;
            log.forgotten.updates = st.forgotten;
            log.unlinked.updates = st.unlinked;
            log.events.updates = st.events;
        }
    }

    /// Takes up a reader's checkpointed state: feeds its updates at their
    /// ticks and moves the inputs to its clock.
    pub fn restore(&mut self, mut st: checkpoint::ReaderState) {
        self.ingest.restore(std::mem::take(&mut st.ingest));
        self.identities = Identities::restore(std::mem::take(&mut st.identities));
        self.winners = std::mem::take(&mut st.winners).into_iter().collect();
        for (d, t, r) in &st.facts {
            self.input(d.clone(), *t, *r);
        }
        for (d, t, r) in &st.nodes {
            self.inputs.nodes.update_at(d.clone(), *t, *r);
        }
        for (d, t, r) in &st.links {
            self.inputs.links.update_at(*d, *t, *r);
        }
        {
            let mut list = self.forgotten.write().expect("not poisoned");
            for (k, t, r) in &st.forgotten {
                self.inputs.forgotten.update_at(*k, *t, *r);
                self.requested.insert((*k, *k));
                forget(&mut list, &[*k], *t);
            }
        }
        for (p, t, r) in &st.unlinked {
            self.inputs.unlinked.update_at(*p, *t, *r);
            self.requested.insert(*p);
        }
        if let Some(events) = &mut self.inputs.events {
            for (d, t, r) in &st.events {
                events.update_at(d.clone(), *t, *r);
            }
        }
        // The log goes on from what was fed, as after a checkpoint.
        self.checkpointed(st);
        self.advance_inputs();
    }

    /// What this reader needs decoded: every stream's facts, and the events'
    /// objects only when it keeps whole events (the served model's history).
    pub fn decoding(&self) -> crate::ingest::decode::Decoding {
        self.decoding.clone()
    }

    /// The clock follows [`Feeder::advance_watermark`] instead of the largest event time.
    pub fn external_clock(&mut self) {
        self.ingest.external_clock = true;
    }

    /// Reads one line (without its line ending) and feeds what it means.
    pub fn read(&mut self, line: &[u8]) -> Outcome {
        let outcome = self.ingest.read(line);
        self.fed(outcome, None)
    }

    /// Feeds a line as a source decoded it (see `crate::ingest::decode`).
    pub fn read_prepared(&mut self, prepared: crate::ingest::decode::Prepared) -> Outcome {
        use crate::ingest::decode::Item;
        match prepared.item {
            Item::Blank => self.fed(Outcome::Blank, None),
            Item::Bad { reason, .. } => {
                self.ingest.counters.read += 1;
                let outcome = self.ingest.reject(reason);
                self.fed(outcome, None)
            }
            Item::Event { event, facts } => {
                self.ingest.counters.read += 1;
                let outcome = self.ingest.accept(event);
                self.fed(outcome, Some(facts))
            }
        }
    }

    pub(super) fn fed(&mut self, outcome: Outcome, facts: Option<crate::ingest::decode::StreamPays>) -> Outcome {
        if let Outcome::Accepted(s) = &outcome {
            if self.suppressed(s) {
                // Read and placed on the clock like any event, then dropped.
                self.ingest.counters.accepted -= 1;
                self.ingest.counters.suppressed += 1;
            } else if self.until.is_none_or(|u| s.effect <= u) {
                self.fed_until = self.fed_until.max(Some(s.effect));
                let facts = facts.unwrap_or_else(|| self.decoding.facts(&s.event));
                self.feed(s, facts);
            }
        }
        self.advance_inputs();
        outcome
    }

    pub(super) fn feed(&mut self, s: &Stamped, facts: crate::ingest::decode::StreamPays) {
        let anchor = self.identities.changes(s, &mut self.node_changes, &mut self.link_changes);
        for (d, t, r) in self.node_changes.drain(..) {
            if let Some(log) = &mut self.log {
                log.nodes.push(d.clone(), t, r);
            }
            self.inputs.nodes.update_at(d, t, r);
        }
        for (d, t, r) in self.link_changes.drain(..) {
            if let Some(log) = &mut self.log {
                log.links.push(d, t, r);
            }
            self.inputs.links.update_at(d, t, r);
        }
        if let Some(events) = &mut self.inputs.events {
            let kept = (anchor, crate::ingest::event::Kept(s.event.clone()));
            if let Some(log) = &mut self.log {
                log.events.push(kept.clone(), s.effect, 1);
            }
            events.update_at(kept, s.effect, 1);
        }
        for (stream, pay) in facts {
            if let Pay::Stamped(..) = pay {
                self.latest(anchor, stream, s, pay);
            } else {
                self.fact((anchor, stream, s.event.time, pay), s.effect, 1);
            }
        }
    }

    /// Feeds a stamped fact of a lifetime "latest value" stream, keeping only
    /// the facts that can still win: one per anchor and stream once effects
    /// arrive in order. A newer value retracts the one it beats at its own
    /// effect tick; one that can never win (older, and effective no sooner)
    /// is not fed at all; one effective sooner than the current winner (read
    /// out of order) is fed as it is, and the term's fold takes the max.
    /// Several readers each keep their own winners; the fold takes the max
    /// over all of them.
    pub(super) fn latest(&mut self, anchor: Key, stream: StreamId, s: &Stamped, pay: Pay) {
        let rank = |p: &Pay| match p {
            Pay::Stamped(s) => (s.time, s.text.clone()),
            _ => unreachable!("stamped"),
        };
        // A fact carries its own event time, so a retraction cancels its fact.
        let fact = |pay: Pay| match pay {
            Pay::Stamped(ref st) => (anchor, stream, st.time, pay),
            _ => (anchor, stream, s.event.time, pay),
        };
        match self.winners.get_mut(&(anchor, stream)) {
            Some((eff, best)) if s.effect >= *eff => {
                if rank(&pay) > rank(best) {
                    let old = std::mem::replace(best, pay.clone());
                    *eff = s.effect;
                    self.fact(fact(old), s.effect, -1);
                    self.fact(fact(pay), s.effect, 1);
                }
            }
            Some(_) => self.fact(fact(pay), s.effect, 1),
            None => {
                self.winners.insert((anchor, stream), (s.effect, pay.clone()));
                self.fact(fact(pay), s.effect, 1);
            }
        }
    }

    /// Moves the inputs with the clock, but never past `until`: ticks after
    /// it are never final, so nothing after it is computed or written.
    pub(super) fn advance_inputs(&mut self) {
        let tick = self.ingest.clock.tick;
        let frontier = self.ingest.clock.frontier();
        self.advance_inputs_to(self.until.map_or(frontier, |u| frontier.min(u / tick * tick + tick)));
    }

    pub(super) fn advance_inputs_to(&mut self, frontier: u64) {
        // Requests due before the new frontier, at their ticks.
        while self.requests.front().is_some_and(|(at, _)| *at < frontier) {
            let (at, r) = self.requests.pop_front().expect("a front");
            let at = at.max(*self.inputs.facts.time());
            self.feed_request(at, r);
        }
        if let Some(timings) = self.timings.as_ref().filter(|_| frontier > *self.inputs.facts.time()) {
            timings.finals.lock().expect("not poisoned").push((frontier, Instant::now()));
        }
        self.inputs.advance_to(frontier);
    }

    /// Moves the clock to `t` with no event (live input gone idle).
    pub fn advance_clock(&mut self, t: u64) {
        self.ingest.advance_clock(t);
        self.advance_inputs();
    }

    /// Moves the clock by an event-time watermark (see [`Ingest::advance_watermark`]).
    pub fn advance_watermark(&mut self, w: u64) {
        self.ingest.advance_watermark(w);
        self.advance_inputs();
    }

    /// The clock `now`, once an event was accepted.
    pub fn now(&self) -> Option<u64> {
        self.ingest.clock.now
    }

    /// Hands buffered updates to the dataflow.
    pub fn flush(&mut self) {
        self.inputs.flush();
    }

    /// The first tick not yet final: everything before it may be computed.
    pub fn frontier(&self) -> u64 {
        *self.inputs.facts.time()
    }

    /// Ends bounded input: the clock moves to the last tick (SPEC §3) and the
    /// inputs to just past it. Returns the last tick, if any event counted.
    pub fn finish(&mut self) -> Option<u64> {
        let last = self.ingest.final_tick(self.until);
        if let Some(t) = last {
            self.advance_inputs_to(t + self.ingest.clock.tick);
        }
        self.flush();
        last
    }

    pub fn counters(&self) -> &Counters {
        &self.ingest.counters
    }
}
