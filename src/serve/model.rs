//! The served state behind `--http` (SPEC §7): a model of the run at its
//! last final tick, kept by the sink on worker 0 and read by the HTTP
//! server (see `crate::serve::http`).
//!
//! The sink applies each tick once it is final, under one write lock: the
//! membership changes it writes, and — only when serving — the tick's
//! changes to term rows, profile names, identity labels and ids. Every
//! answer reads the model under one read lock, so all its figures are at
//! one tick, `clock`.
//!
//! The model can evaluate any `when` over the terms the running plan
//! computes (the same rows the dataflow's atoms read, with the same empty
//! values), which gives profile lookups with their `why`, previews, and
//! runtime segments: a segment added or changed with `PUT` is evaluated
//! here, over every profile at once when it is defined, then for the
//! profiles a tick touches; its changes are written with the spec's own.
//! `PUT`/`DELETE` run on worker 0 (the sink owns the output) as commands.
//!
//! A `when` may also read terms the running plan does not compute (another
//! selector, filter, window, path or aggregate). Those the model computes
//! itself, from the accepted events it keeps for `--history` ([`History`]):
//! the readers send every accepted event, stamped with the tick it takes
//! effect, to worker 0 through the dataflow like the model's other updates,
//! and the model keeps them by anchor id until they are older than the
//! history. A model term of a profile is then the engine's own fold
//! (`crate::dataflow::terms::value`) over what `crate::ingest::select::extract` keeps of the
//! profile's events still in the term's window at the clock, so it has the
//! engine's semantics by construction and a new segment starts complete.
//! Model terms are computed when read (no second copy to keep in step);
//! what changes them is a new event, an identity merge (both mark the
//! profile touched) or an event leaving a window, which an expiry queue by
//! tick turns into a touch at the right tick, even a tick with no update
//! from the dataflow (the sink asks [`Model::next_due`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use rustc_hash::{FxHashMap, FxHashSet};

use crate::core::clock::tick_of;
use crate::core::id::StreamId;
use crate::core::id::{key_of, Key};
use crate::core::id::{Id, IdKind};
use crate::core::value::Value;
use crate::ingest::event::Kept;
use crate::ingest::stamp::Counters;
use crate::io::journal::Journal;
use crate::output::sink::membership_line;
use crate::output::sink::Upd;
use crate::output::sink::{Answer, Observer, ProfileLine};
use crate::plan::{Agg, Formula, Plan, StreamDef};
use crate::spec::ast::{Expr, ExprKind};
use crate::spec::parse::format_duration;
use crate::spec::Spec;

/// How long the served model keeps accepted events (`--history`), so that
/// segments defined at run time over terms the spec does not compute start
/// complete: any window up to it (`All`: `lifetime` too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum History {
    /// Events whose every window up to this many ms has passed are dropped;
    /// `Keep(0)` keeps none (and the readers send none).
    Keep(u64),
    All,
}

impl History {
    /// The default: the longest window among the plan's streams (0 when
    /// every stream is `lifetime` or there is none).
    pub fn default_for(plan: &Plan) -> History {
        History::Keep(plan.streams.iter().filter_map(|s| s.window).max().unwrap_or(0))
    }

    /// The newest tick whose changes are no longer kept at tick `t`.
    pub fn horizon(self, t: u64) -> Option<u64> {
        match self {
            History::All => None,
            History::Keep(r) => t.checked_sub(r),
        }
    }

    /// Whether any event is kept (and so sent to the model).
    pub fn keeps(self) -> bool {
        self != History::Keep(0)
    }

    /// Whether a term over a window of `window` ms (`None`: lifetime) can be
    /// computed from what is kept.
    pub fn covers(self, window: Option<u64>) -> bool {
        match (self, window) {
            (History::All, _) => true,
            (History::Keep(h), Some(w)) => h > 0 && w <= h,
            (History::Keep(_), None) => false,
        }
    }

    /// As written on the command line.
    pub fn text(self) -> String {
        match self {
            History::All => "all".into(),
            History::Keep(0) => "0".into(),
            History::Keep(ms) => format_duration(ms),
        }
    }
}

/// The events the model keeps, and what they make due.
pub struct Retained {
    pub history: History,
    /// Anchor id → its events with their effect ticks, in tick order.
    by_anchor: FxHashMap<Key, Vec<(u64, Kept)>>,
    /// Tick → anchors with an event whose history runs out then.
    drops: BTreeMap<u64, Vec<Key>>,
    /// Tick → anchors with an event that leaves a model term's window then.
    due: BTreeMap<u64, FxHashSet<Key>>,
    /// The windows (ms) of the model terms runtime segments read.
    windows: BTreeSet<u64>,
    /// Events kept.
    pub count: usize,
    /// Events taking effect before this tick are not kept (a run resumed
    /// from a checkpoint that held no events).
    pub complete_from: u64,
    /// The events were restored from a checkpoint.
    pub restored: bool,
}

impl Retained {
    fn new(history: History) -> Retained {
        Retained {
            history,
            by_anchor: FxHashMap::default(),
            drops: BTreeMap::new(),
            due: BTreeMap::new(),
            windows: BTreeSet::new(),
            count: 0,
            complete_from: 0,
            restored: false,
        }
    }

    /// Keeps an event taking effect at `t`, unless its history is over.
    fn keep(&mut self, anchor: Key, t: u64, ev: Kept, tick: u64) {
        if let History::Keep(h) = self.history {
            let until = tick_of(ev.0.time.saturating_add(h), tick);
            if until <= t {
                return;
            }
            self.drops.entry(until).or_default().push(anchor);
        }
        for &w in &self.windows {
            let expiry = tick_of(ev.0.time.saturating_add(w), tick);
            if expiry > t {
                self.due.entry(expiry).or_default().insert(anchor);
            }
        }
        self.by_anchor.entry(anchor).or_default().push((t, ev));
        self.count += 1;
    }

    /// At tick `t`: drops events whose history is over; returns the anchors
    /// with an event leaving a model term's window at or before `t`.
    /// The events kept that took effect before `frontier`, for a checkpoint.
    fn before(&self, frontier: u64) -> Vec<(Key, u64, Kept)> {
        let mut out: Vec<(Key, u64, Kept)> = self
            .by_anchor
            .iter()
            .flat_map(|(anchor, evs)| evs.iter().filter(|(t, _)| *t < frontier).map(|(t, ev)| (*anchor, *t, ev.clone())))
            .collect();
        out.sort_by_key(|a| (a.1, a.0));
        out
    }

    /// Drops the events kept for `anchor` (a forgotten id).
    fn forget(&mut self, anchor: Key) {
        if let Some(evs) = self.by_anchor.remove(&anchor) {
            self.count -= evs.len();
        }
    }

    fn advance(&mut self, t: u64, tick: u64) -> Vec<Key> {
        if let History::Keep(h) = self.history {
            while let Some(entry) = self.drops.first_entry() {
                if *entry.key() > t {
                    break;
                }
                for anchor in entry.remove() {
                    if let Some(evs) = self.by_anchor.get_mut(&anchor) {
                        let before = evs.len();
                        evs.retain(|(_, ev)| tick_of(ev.0.time.saturating_add(h), tick) > t);
                        self.count -= before - evs.len();
                        if evs.is_empty() {
                            self.by_anchor.remove(&anchor);
                        }
                    }
                }
            }
        }
        let mut anchors = Vec::new();
        while let Some(entry) = self.due.first_entry() {
            if *entry.key() > t {
                break;
            }
            anchors.extend(entry.remove());
        }
        anchors
    }

    /// Sets the windows model terms read, and rebuilds the expiry queue for
    /// them after clock `t`.
    fn set_windows(&mut self, windows: BTreeSet<u64>, t: u64, tick: u64) {
        if windows == self.windows {
            return;
        }
        self.windows = windows;
        self.due.clear();
        for (anchor, evs) in &self.by_anchor {
            for (_, ev) in evs {
                for &w in &self.windows {
                    let expiry = tick_of(ev.0.time.saturating_add(w), tick);
                    if expiry > t {
                        self.due.entry(expiry).or_default().insert(*anchor);
                    }
                }
            }
        }
    }
}

/// How a segment of the model is evaluated.
#[derive(Clone, Debug)]
pub enum Def {
    /// Maintained by the dataflow (a spec segment, unchanged).
    Spec,
    /// Evaluated by the model (added or changed at run time).
    Runtime { plan: Arc<Plan>, formula: Formula },
    /// Removed.
    Deleted,
}

#[derive(Clone, Debug)]
pub struct SegState {
    pub name: String,
    pub description: Option<String>,
    /// The `when` text.
    pub source: String,
    /// The checked `when` (the tree `def`'s formula was planned from).
    pub expr: Option<Expr>,
    pub def: Def,
    /// The dataflow's members of a spec segment changed or removed at run
    /// time: spec segments that read it with `in_segment` still read these.
    pub engine_keys: Option<FxHashSet<Key>>,
    /// Members by id text (for paging by bytes).
    pub members: BTreeSet<String>,
    pub keys: FxHashSet<Key>,
    /// `(tick, size)` at every tick the size changed.
    pub history: Vec<(u64, usize)>,
    /// The membership changes kept for `?at=` (`--retain`): `(tick, id,
    /// enter)` in the order applied.
    pub changes: VecDeque<(u64, String, bool)>,
    pub entered: u64,
    pub exited: u64,
    /// Its `groups` (SPEC §4 "Groups"), and how many members each has.
    pub groups: Vec<crate::spec::Group>,
    pub group_sizes: Vec<usize>,
}

impl SegState {
    /// The group a member with id `id` is in, by index into `groups`.
    fn group_index(&self, id: &str) -> Option<usize> {
        let name = crate::spec::group_of(&self.name, &self.groups, id)?;
        self.groups.iter().position(|g| g.name == name)
    }

    pub fn live(&self) -> bool {
        !matches!(self.def, Def::Deleted)
    }

    /// The size at tick `t`, from the change points.
    pub fn size_at(&self, t: u64) -> usize {
        match self.history.partition_point(|(at, _)| *at <= t) {
            0 => 0,
            i => self.history[i - 1].1,
        }
    }
}

/// One membership change: segment slot, profile key, its id text, enter.
pub type MemberChange = (usize, Key, String, bool);

/// The run as of its last final tick.
pub struct Model {
    pub clock: Option<u64>,
    pub tick: u64,
    pub show_ms: bool,
    pub plan: Arc<Plan>,
    pub segments: Vec<SegState>,
    /// The spec's `[[model]]`s, and the fit in force of each.
    pub models: Vec<crate::spec::ModelDef>,
    pub fits: Vec<Option<crate::dataflow::model::Fitted>>,
    /// Profile → stream → the stream's term values.
    pub terms: FxHashMap<Key, FxHashMap<StreamId, Vec<Value>>>,
    /// Profiles and their ids.
    pub names: FxHashMap<Key, Id>,
    /// Id key → profile.
    pub labels: FxHashMap<Key, Key>,
    /// Profile → its id keys.
    pub ids: FxHashMap<Key, BTreeSet<Key>>,
    /// Id key → its text, with a count (several readers may feed one id).
    pub nodes: FxHashMap<Key, (Id, isize)>,
    pub diffs: u64,
    /// Recent changes (SPEC §5 lines), for late `/stream` subscribers' rates.
    pub recent: VecDeque<(u64, String)>,
    /// The accepted events kept for terms the plan does not compute.
    pub retained: Retained,
    /// How long membership changes are kept for `?at=` (`--retain`).
    pub retain: History,
    /// The oldest tick whose memberships the changes kept can tell.
    pub looks_back_to: u64,
    /// Membership changes kept, over all segments.
    pub changes_kept: usize,
    /// Journaled changes not yet made again after a restart, oldest first.
    pub pending: VecDeque<Entry>,
    /// The delivered frontier of the checkpoint resumed from (0: none).
    pub resumed: u64,
    /// The lines its output had.
    pub resumed_diffs: u64,
    /// Lines of journaled changes made again while replaying, which the
    /// checkpoint's output did not have: written at the next chance.
    pub unwritten: Vec<ProfileLine>,
}

/// A `/stream` message.
pub type Line = Arc<str>;

/// What the HTTP server and the sink share.
pub struct Served {
    pub model: RwLock<Model>,
    /// Runtime definitions, run by the sink on worker 0.
    pub commands: Mutex<Vec<Command>>,
    /// Membership changes as SPEC §5 lines.
    pub stream: tokio::sync::broadcast::Sender<Line>,
    /// Each reader's counters, by worker index (this process).
    pub counters: Mutex<FxHashMap<usize, Counters>>,
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    /// Set when the run is over: the server stops accepting, `/stream`
    /// subscriptions end, answers in flight finish (see `crate::serve::http`).
    pub closing: tokio::sync::watch::Sender<bool>,
    /// With `--state`: where changes are journaled before they are made.
    journal: Mutex<Option<Journal>>,
    /// The population operators' latest state (the predictive models'
    /// examples), set by worker 0 when it builds the dataflow.
    pub kept: Mutex<Option<Arc<crate::dataflow::Kept>>>,
    /// Forget and unlink requests, taken by worker 0's reader, which feeds
    /// each at its first tick not yet final and answers with that tick.
    pub requests: Mutex<Vec<(crate::core::id::Request, RequestReply)>>,
    /// Set once the input has ended: no tick follows, so no request can
    /// take effect.
    pub ended: std::sync::atomic::AtomicBool,
    /// The spec file's text, which `GET /spec` edits into the running spec.
    pub spec_text: Option<String>,
    /// How many segments the spec file has (the first of the model's).
    pub spec_segments: usize,
}

/// A reply to a runtime definition.
pub type Reply = tokio::sync::oneshot::Sender<Result<usize, ApiError>>;

/// A reply to a forget or unlink request: the tick it takes effect at.
pub type RequestReply = tokio::sync::oneshot::Sender<Result<u64, ApiError>>;

/// 409: the input has ended.
pub fn no_tick_follows() -> ApiError {
    ApiError::Conflict("the input has ended: no tick follows at which a request could take effect".into())
}

/// A change to the running spec made over the API. With `--state` it is
/// journaled (see `crate::io::journal`) before it takes effect, with the
/// clock it takes effect at, and a restart applies it again at that tick.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// A segment added or changed.
    Put {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        when: String,
    },
    /// A segment removed.
    Delete { name: String },
    /// A forget or unlink request, fed by a reader at `at` (the model sees
    /// its effects through the dataflow).
    Request(crate::core::id::Request),
}

/// A journaled change: the clock it took effect at.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub at: u64,
    /// Lines the output had before this change's: after a restart its
    /// lines are written again when the checkpoint's output had fewer.
    #[serde(default)]
    pub diffs: u64,
    pub change: Change,
}

/// A change from the API, waiting for the sink, and who waits for it.
pub struct Command {
    pub change: Change,
    pub reply: Reply,
}

/// An answer that is not a success.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiError {
    /// 400 with where.
    Expression { message: String, line: usize, column: usize },
    /// 404.
    NotFound { message: String, profile: Option<String> },
    /// 400 otherwise.
    Bad(String),
    /// 410: a past tick older than the changes kept, and the oldest kept.
    Gone { message: String, oldest: String },
    /// 409: the request cannot take effect.
    Conflict(String),
    /// 503: the change could not be journaled (`--state`), so it was not made.
    Unavailable(String),
    /// 422: valid, but needs something the running engine does not compute.
    Unprocessable(String),
}

impl Served {
    pub fn new(
        spec: &Spec,
        spec_text: Option<String>,
        plan: Arc<Plan>,
        tick: u64,
        (history, retain): (History, History),
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> Arc<Served> {
        let segments = spec
            .segments
            .iter()
            .map(|s| SegState {
                name: s.name.clone(),
                description: s.description.clone(),
                source: s.source.clone(),
                expr: Some(s.when.clone()),
                def: Def::Spec,
                engine_keys: None,
                members: BTreeSet::new(),
                keys: FxHashSet::default(),
                history: Vec::new(),
                changes: VecDeque::new(),
                entered: 0,
                exited: 0,
                group_sizes: vec![0; s.groups.len()],
                groups: s.groups.clone(),
            })
            .collect();
        Arc::new(Served {
            model: RwLock::new(Model {
                clock: None,
                tick,
                show_ms: tick < 1000,
                plan,
                segments,
                models: spec.models.clone(),
                fits: vec![None; spec.models.len()],
                terms: FxHashMap::default(),
                names: FxHashMap::default(),
                labels: FxHashMap::default(),
                ids: FxHashMap::default(),
                nodes: FxHashMap::default(),
                diffs: 0,
                recent: VecDeque::new(),
                retained: Retained::new(history),
                retain,
                looks_back_to: 0,
                changes_kept: 0,
                pending: VecDeque::new(),
                resumed: 0,
                resumed_diffs: 0,
                unwritten: Vec::new(),
            }),
            journal: Mutex::new(None),
            kept: Mutex::new(None),
            requests: Mutex::new(Vec::new()),
            ended: std::sync::atomic::AtomicBool::new(false),
            spec_text,
            spec_segments: spec.segments.len(),
            commands: Mutex::new(Vec::new()),
            stream: tokio::sync::broadcast::channel(4096).0,
            counters: Mutex::new(FxHashMap::default()),
            stop,
            closing: tokio::sync::watch::Sender::new(false),
        })
    }

    /// The sum of the readers' counters.
    pub fn counters(&self) -> Counters {
        let mut c = Counters::default();
        for v in self.counters.lock().expect("not poisoned").values() {
            c.add(v);
        }
        c
    }

    /// The run resumed from a checkpoint at `frontier`, whose output had
    /// `diffs` lines. Unless the checkpoint held the events kept
    /// ([`Served::restore_kept`]), the model's history starts here.
    pub fn resumed_at(&self, frontier: u64, diffs: u64) {
        let mut model = self.model.write().expect("not poisoned");
        model.resumed = frontier;
        model.resumed_diffs = diffs;
        if !model.retained.restored {
            model.retained.complete_from = frontier;
        }
        // Ticks before it come back consolidated into its last one.
        model.looks_back_to = frontier.saturating_sub(model.tick);
    }

    /// Journals changes in `journal` from now on, and makes the changes it
    /// holds again, each at its tick (a restart with `--state`).
    pub fn keep_changes(&self, journal: Journal, entries: Vec<Entry>) {
        // Requests are fed again by a reader (see `crate::run::run`), not here.
        let changes = entries.into_iter().filter(|e| !matches!(e.change, Change::Request(_)));
        self.model.write().expect("not poisoned").pending = changes.collect();
        *self.journal.lock().expect("not poisoned") = Some(journal);
    }

    /// Journals a request taking effect at `at` (see [`Served::journal`]).
    pub fn journal_request(&self, at: u64, request: &crate::core::id::Request) -> Result<(), ApiError> {
        self.journal(at, 0, &Change::Request(request.clone()))
    }

    /// The input ended: requests waiting are refused, later ones too.
    pub fn end_requests(&self) {
        let mut queue = self.requests.lock().expect("not poisoned");
        self.ended.store(true, std::sync::atomic::Ordering::SeqCst);
        for (_, reply) in queue.drain(..) {
            let _ = reply.send(Err(no_tick_follows()));
        }
    }

    /// Journals `change`, taking effect at `at`, before it is made.
    fn journal(&self, at: u64, diffs: u64, change: &Change) -> Result<(), ApiError> {
        match &mut *self.journal.lock().expect("not poisoned") {
            None => Ok(()),
            Some(j) => j
                .append(&Entry {
                    at,
                    diffs,
                    change: change.clone(),
                })
                .map_err(|e| ApiError::Unavailable(format!("the change was not made: {e}"))),
        }
    }

    /// The events the model kept that took effect before `frontier` (a
    /// checkpoint's part of the history; see `crate::run::checkpoint`).
    pub fn kept_before(&self, frontier: u64) -> Option<Vec<(Key, u64, Kept)>> {
        let model = self.model.read().expect("not poisoned");
        // A history restored only in part is not whole either.
        let whole = model.retained.history.keeps() && model.retained.complete_from == 0;
        whole.then(|| model.retained.before(frontier))
    }

    /// Takes back the events a checkpoint kept: the history is then
    /// complete across the restart.
    pub fn restore_kept(&self, kept: Vec<(Key, u64, Kept)>) {
        let mut model = self.model.write().expect("not poisoned");
        let tick = model.tick;
        let retained = &mut model.retained;
        for (anchor, t, ev) in kept {
            retained.keep(anchor, t, ev, tick);
        }
        retained.restored = true;
    }

    /// Sends written lines to `/stream` subscribers.
    pub fn publish(&self, lines: &[ProfileLine]) {
        if self.stream.receiver_count() > 0 {
            for (_, l) in lines {
                let _ = self.stream.send(Arc::from(l.as_str()));
            }
        }
    }
}

impl Observer for Served {
    fn passed(&self, t: u64) {
        let behind = |m: &Model| m.clock.is_none_or(|c| c < (t / m.tick) * m.tick);
        if !behind(&self.model.read().expect("not poisoned")) {
            return;
        }
        let mut model = self.model.write().expect("not poisoned");
        if behind(&model) {
            model.clock = Some((t / model.tick) * model.tick);
        }
    }

    fn next_due(&self) -> Option<u64> {
        self.model.read().expect("not poisoned").next_due()
    }

    fn replay(&self, t: u64, changes: Vec<(Upd, isize)>) {
        let mut model = self.model.write().expect("not poisoned");
        model.apply_tick(t, changes);
        let lines = model.catch_up(t);
        model.unwritten.extend(lines);
    }

    fn tick(&self, t: u64, changes: Vec<(Upd, isize)>, write: &mut dyn FnMut(&[ProfileLine])) {
        let lines = {
            let mut model = self.model.write().expect("not poisoned");
            // Journaled changes due before it (those before the checkpoint
            // with no replayed tick after them), then the tick, then those
            // made at it.
            let mut lines = std::mem::take(&mut model.unwritten);
            lines.extend(model.catch_up(t.saturating_sub(1)));
            let changes = model.apply_tick(t, changes);
            lines.extend(model.lines(t, changes));
            lines.extend(model.catch_up(t));
            write(&lines);
            lines
        };
        self.publish(&lines);
    }

    fn run_requests(&self, mut diffs: u64, write: &mut dyn FnMut(u64, &[ProfileLine])) -> Vec<Answer> {
        {
            let mut model = self.model.write().expect("not poisoned");
            let unwritten = std::mem::take(&mut model.unwritten);
            if !unwritten.is_empty() {
                let t = model.clock.unwrap_or(0);
                write(t, &unwritten);
                diffs += unwritten.len() as u64;
            }
            if !model.pending.is_empty() {
                // Still making journaled changes again: new ones wait their turn.
                return Vec::new();
            }
        }
        let commands = std::mem::take(&mut *self.commands.lock().expect("not poisoned"));
        let mut answers: Vec<Answer> = Vec::with_capacity(commands.len());
        for Command { change, reply } in commands {
            if reply.is_closed() {
                // Its caller gave up (a timeout): it was told nothing was made.
                continue;
            }
            let (result, lines) = {
                let mut model = self.model.write().expect("not poisoned");
                let t = model.clock.unwrap_or(0);
                let made = model.check(&change).and_then(|()| self.journal(t, diffs, &change));
                let (result, changes) = match made {
                    Ok(()) => model.run(change),
                    Err(e) => (Err(e), Vec::new()),
                };
                let lines = model.lines(t, changes);
                // Written under the lock: a reader sees the model and the output agree.
                if !lines.is_empty() {
                    write(t, &lines);
                    diffs += lines.len() as u64;
                }
                (result, lines)
            };
            self.publish(&lines);
            answers.push(Box::new(move || {
                let _ = reply.send(result);
            }));
        }
        answers
    }

    fn counters(&self, reader: usize, counters: Counters) {
        self.counters.lock().expect("not poisoned").insert(reader, counters);
    }

    fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The key of an id's text (`user:…`, `anon:…`).
pub fn parse_id(text: &str) -> Option<(Key, Id)> {
    let (kind, name) = if let Some(n) = text.strip_prefix("user:") {
        (IdKind::User, n)
    } else if let Some(n) = text.strip_prefix("anon:") {
        (IdKind::Anon, n)
    } else {
        return None;
    };
    Some((key_of(kind, name), Id { kind, name: name.into() }))
}

/// A value as JSON.
pub fn value_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Missing => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::Num(d) => serde_json::from_str(&d.to_string()).unwrap_or(serde_json::Value::Null),
        Value::Float(f) => serde_json::Number::from_f64(f.0).map_or(serde_json::Value::Null, Into::into),
        Value::Str(s) => s.as_str().into(),
        Value::Dur(ms) => (*ms).into(),
        Value::Time(ms) if (0..=crate::core::clock::MAX_TIME as i64).contains(ms) => {
            crate::core::clock::format_time(*ms as u64, ms % 1000 != 0).into()
        }
        Value::Time(ms) => (*ms).into(),
    }
}

impl Model {
    /// The slot of a live segment.
    pub fn slot(&self, name: &str) -> Option<usize> {
        self.segments.iter().position(|s| s.name == name && s.live())
    }

    /// The value of `term` of `plan` for `profile` (its empty value without a row).
    /// A term `plan` has beyond the running plan's is the model's own
    /// ([`Model::model_term`]).
    pub fn term_value(&self, plan: &Plan, term: usize, profile: Key) -> Value {
        let def = plan.terms[term];
        if term >= self.plan.terms.len() {
            return match plan.streams.get(def.stream) {
                Some(stream) => self.model_term(stream, def.agg, profile),
                None => Value::Missing,
            };
        }
        let pos = plan.folds[def.stream].iter().position(|&t| t == term).unwrap_or(usize::MAX);
        self.terms
            .get(&profile)
            .and_then(|rows| rows.get(&StreamId::of(def.stream)))
            .and_then(|row| row.get(pos))
            .cloned()
            .unwrap_or_else(|| def.agg.empty())
    }

    /// `predict.NAME` of `spec.models[m]` for `profile` at the clock, and
    /// the features it is computed from (missing before a first fit, or
    /// when a feature is).
    pub fn prediction(&self, m: usize, profile: Key) -> (Value, Vec<Value>) {
        let plan = &self.plan;
        let Some(def) = &plan.models[m] else {
            return (Value::Missing, Vec::new());
        };
        let value = &plan.values[def.features];
        let slots: Vec<Value> = value.terms.iter().map(|&t| self.term_value(plan, t, profile)).collect();
        let features = value.eval(&slots);
        let stream = StreamId::of(plan.model_stream(m));
        let p = self
            .terms
            .get(&profile)
            .and_then(|rows| rows.get(&stream))
            .and_then(|row| row.first())
            .cloned()
            .unwrap_or(Value::Missing);
        (p, features)
    }

    /// A term the running plan does not compute, for `profile` at the clock:
    /// the engine's fold (`crate::dataflow::terms::value`) over what `stream` keeps
    /// (`crate::ingest::select::extract`) of the profile's kept events that are in
    /// effect and still in the window — as the dataflow counts a fact from
    /// its effect tick until `tick_of(e + W)` — and its empty value without
    /// any. Every id of the profile contributes its events, so a merge
    /// re-keys history as the dataflow's join with the labels does.
    pub fn model_term(&self, stream: &StreamDef, agg: Agg, profile: Key) -> Value {
        let t = self.clock.unwrap_or(0);
        let mut facts = Vec::new();
        for anchor in self.ids.get(&profile).into_iter().flatten() {
            for (effect, ev) in self.retained.by_anchor.get(anchor).into_iter().flatten() {
                let inside = stream.window.is_none_or(|w| tick_of(ev.0.time.saturating_add(w), self.tick) > t);
                if *effect <= t && inside {
                    facts.extend(crate::ingest::select::extract(stream, &ev.0));
                }
            }
        }
        if facts.is_empty() {
            agg.empty()
        } else {
            crate::dataflow::terms::value(agg, facts.iter().map(|p| (p, 1)))
        }
    }

    /// Why a term over `stream` cannot be computed by the model, if it
    /// cannot: its window is longer than the history kept, or reaches
    /// before the checkpoint a resumed run started from.
    fn uncomputable(&self, stream: Option<&StreamDef>) -> Option<String> {
        let Some(stream) = stream else {
            return Some("reads a population term, which cannot be defined at run time".into());
        };
        let history = self.retained.history;
        let need = match stream.window {
            Some(w) => format!("the events of the last {}", format_duration(w)),
            None => "every event since the start (a lifetime term)".into(),
        };
        if !history.covers(stream.window) {
            let kept = match history {
                History::Keep(0) => "no events".to_string(),
                History::Keep(h) => format!("{} of events", format_duration(h)),
                History::All => "every event".to_string(),
            };
            let raise = stream.window.map_or("all".to_string(), format_duration);
            return Some(format!(
                "needs {need}, but this run keeps {kept} (--history {}): start shoal with --history {raise}{} \
                 to define it at run time, or add it to the spec file",
                history.text(),
                if stream.window.is_some() { " or more" } else { "" },
            ));
        }
        let from = self.retained.complete_from;
        let clock = self.clock.unwrap_or(0);
        if from > 0 && stream.window.is_none_or(|w| clock < from.saturating_add(w)) {
            let show = |t: u64| crate::core::clock::format_time(t, self.show_ms);
            let when = match stream.window {
                Some(w) => format!("it can be defined from {} on", show(from.saturating_add(w))),
                None => "a lifetime term cannot be defined in this run".into(),
            };
            return Some(format!(
                "needs {need}, but this run resumed from a checkpoint at {} and keeps events only from then on: {when}",
                show(from)
            ));
        }
        None
    }

    /// Whether `f` holds of `profile` (a profile of the universe), reading
    /// the served memberships for `in_segment` (runtime segments, previews).
    pub fn holds(&self, plan: &Plan, f: &Formula, profile: Key) -> bool {
        self.holds_as(plan, f, profile, Reads::Served)
    }

    /// Whether `f` holds of `profile`, with the same semantics as the
    /// dataflow (`crate::dataflow::rules`): an atom over the term values (a term
    /// without a row has its empty value; a comparison with a missing side
    /// is false), `not` the complement within the universe, `in_segment` the
    /// memberships `reads` names.
    pub fn holds_as(&self, plan: &Plan, f: &Formula, profile: Key, reads: Reads) -> bool {
        let atom = |a: usize| {
            let def = &plan.atoms[a];
            let slots: Vec<Value> = def.terms.iter().map(|&t| self.term_value(plan, t, profile)).collect();
            // An atom that reads `now` at the model's clock, as the dataflow has it.
            def.holds_at(&slots, self.clock)
        };
        let segment = |s: usize| {
            self.segments.get(s).is_some_and(|s| match (reads, &s.engine_keys) {
                (Reads::Engine, Some(keys)) => keys.contains(&profile),
                _ => s.keys.contains(&profile),
            })
        };
        f.eval(&atom, &segment)
    }

    /// Why `profile` is in or out of segment `slot`: each condition of its
    /// `when` (comparisons, `since`, `in_segment`, bare values; under `not`,
    /// the condition it negates) with whether it holds now and the values
    /// of the terms it reads. Each condition is the very sub-formula the
    /// segment's formula was planned from, evaluated over the model's term
    /// rows as the dataflow evaluates it (a spec segment's `in_segment`
    /// reads the dataflow's memberships), so `holds` is always a boolean
    /// and the segment's formula over them gives `member`.
    pub fn why(&self, slot: usize, profile: Key) -> Vec<Condition> {
        let seg = &self.segments[slot];
        let (plan, formula, reads) = match &seg.def {
            Def::Spec => match self.plan.segments.get(slot) {
                Some(s) => (&*self.plan, &s.formula, Reads::Engine),
                None => return Vec::new(),
            },
            Def::Runtime { plan, formula } => (&**plan, formula, Reads::Served),
            Def::Deleted => return Vec::new(),
        };
        let Some(expr) = &seg.expr else {
            return Vec::new();
        };
        let mut leaves = Vec::new();
        condition_leaves(expr, formula, &mut leaves);
        let texts = condition_texts(&seg.source, &leaves.iter().map(|(e, _)| *e).collect::<Vec<_>>());
        leaves
            .into_iter()
            .zip(texts)
            .map(|((_, f), text)| {
                let mut atoms = Vec::new();
                atoms_of(f, &mut atoms);
                let values = atoms
                    .iter()
                    .flat_map(|&a| plan.atoms[a].terms.iter().map(|&t| self.term_value(plan, t, profile)))
                    .collect();
                Condition {
                    text,
                    holds: self.holds_as(plan, f, profile, reads),
                    values,
                }
            })
            .collect()
    }

    /// Compiles a `when` against the running plan. `slot` is the segment
    /// being defined, if any: a definition may read only segments before it
    /// (no cycles).
    pub fn compile(&self, source: &str, slot: Option<usize>) -> Result<(Expr, Plan, Formula), ApiError> {
        let before = slot.unwrap_or(self.segments.len());
        let live: HashMap<&str, usize> = self.segments[..before]
            .iter()
            .enumerate()
            .filter(|(_, s)| s.live())
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let is_segment = |n: &str| live.contains_key(n);
        let zones: Vec<String> = self.plan.zones.iter().map(|z| z.name.clone()).collect();
        let expr = crate::spec::compile_when(source, self.tick, &is_segment, &zones).map_err(|errors| {
            let e = &errors[0];
            ApiError::Expression {
                message: e.message.clone(),
                line: e.line,
                column: e.column,
            }
        })?;
        if crate::spec::check::reads_now(&expr) {
            // The served model has no timers: a runtime segment over `now`
            // would not move when the clock alone changes it.
            return Err(ApiError::Unprocessable(
                "a segment defined over the API cannot read `now` yet: define it in the spec file".into(),
            ));
        }
        let (plan, formula) = self.plan.extend(&expr, &live);
        let refused = |plan: &Plan| plan.new_terms(&self.plan).find_map(|(_, stream, _)| self.uncomputable(stream));
        if refused(&plan).is_some() {
            // Name each condition that needs a term the model cannot compute, as written.
            let mut leaves = Vec::new();
            expr_leaves(&expr, &mut leaves);
            let texts = condition_texts(source, &leaves);
            let problems: Vec<String> = leaves
                .iter()
                .zip(texts)
                .filter_map(|(leaf, text)| Some(format!("{text} {}", refused(&self.plan.extend(leaf, &live).0)?)))
                .collect();
            return Err(ApiError::Unprocessable(problems.join("; ")));
        }
        Ok((expr, plan, formula))
    }

    /// The profiles for which `formula` holds, by id text.
    pub fn evaluate(&self, plan: &Plan, formula: &Formula) -> BTreeSet<String> {
        self.names
            .iter()
            .filter(|(k, _)| self.holds(plan, formula, **k))
            .map(|(_, id)| id.to_string())
            .collect()
    }

    fn set_member(&mut self, slot: usize, key: Key, id: String, enter: bool) {
        let s = &mut self.segments[slot];
        if let Some(g) = s.group_index(&id) {
            s.group_sizes[g] = if enter {
                s.group_sizes[g] + 1
            } else {
                s.group_sizes[g].saturating_sub(1)
            };
        }
        if enter {
            s.keys.insert(key);
            s.members.insert(id);
            s.entered += 1;
        } else {
            s.keys.remove(&key);
            s.members.remove(&id);
            s.exited += 1;
        }
    }

    /// Re-evaluates runtime segment `slot` for `profiles`, applying and
    /// returning the changes.
    fn refresh(&mut self, slot: usize, profiles: &[Key], out: &mut Vec<MemberChange>) {
        let Def::Runtime { plan, formula } = self.segments[slot].def.clone() else {
            return;
        };
        for &p in profiles {
            let should = self.names.contains_key(&p) && self.holds(&plan, &formula, p);
            if should != self.segments[slot].keys.contains(&p) {
                let id = match self.names.get(&p) {
                    Some(id) => id.to_string(),
                    // Gone from the universe: its id is the one it had.
                    None => match self.segments[slot]
                        .members
                        .iter()
                        .find(|m| parse_id(m).is_some_and(|(k, _)| k == p))
                    {
                        Some(m) => m.clone(),
                        None => continue,
                    },
                };
                self.set_member(slot, p, id.clone(), should);
                out.push((slot, p, id, should));
            }
        }
    }

    /// Applies the final tick `t`: the dataflow's changes (consolidated),
    /// then runtime segments for the profiles it touched. Returns the
    /// membership changes, sorted for output.
    pub fn apply_tick(&mut self, t: u64, updates: Vec<(Upd, isize)>) -> Vec<MemberChange> {
        let mut touched: FxHashSet<Key> = FxHashSet::default();
        let mut members = Vec::new();
        let mut events = Vec::new();
        // Retractions first, so a replaced row or label ends up with its new value.
        let (minus, plus): (Vec<_>, Vec<_>) = updates.into_iter().partition(|(_, r)| *r < 0);
        for (u, r) in minus.into_iter().chain(plus) {
            match u {
                Upd::Member(seg, id) => members.push((seg.index(), id, r)),
                Upd::Term(p, stream, values) => {
                    touched.insert(p);
                    let rows = self.terms.entry(p).or_default();
                    if r > 0 {
                        rows.insert(stream, values);
                    } else if rows.get(&stream) == Some(&values) {
                        rows.remove(&stream);
                        if rows.is_empty() {
                            self.terms.remove(&p);
                        }
                    }
                }
                Upd::Name(p, id) => {
                    touched.insert(p);
                    if r > 0 {
                        self.names.insert(p, id);
                    } else if self.names.get(&p) == Some(&id) {
                        self.names.remove(&p);
                    }
                }
                Upd::Label(node, p) => {
                    // A merge moves the id's kept events to another profile.
                    touched.insert(p);
                    if r > 0 {
                        self.labels.insert(node, p);
                        self.ids.entry(p).or_default().insert(node);
                    } else {
                        if self.labels.get(&node) == Some(&p) {
                            self.labels.remove(&node);
                        }
                        if let Some(set) = self.ids.get_mut(&p) {
                            set.remove(&node);
                            if set.is_empty() {
                                self.ids.remove(&p);
                            }
                        }
                    }
                }
                Upd::Node(k, id) => {
                    let e = self.nodes.entry(k).or_insert((id, 0));
                    e.1 += r;
                    if e.1 <= 0 {
                        self.nodes.remove(&k);
                        // Gone from the graph: forgotten (SPEC §7), so are its events.
                        self.retained.forget(k);
                    }
                }
                Upd::Event(anchor, ev) => {
                    for _ in 0..r.max(0) {
                        events.push((anchor, ev.clone()));
                    }
                }
                Upd::Model(m, fit) => {
                    let slot = &mut self.fits[m as usize];
                    if r > 0 {
                        *slot = Some(fit);
                    } else if slot.as_ref() == Some(&fit) {
                        *slot = None;
                    }
                }
            }
        }
        // Model terms at `t`: new events, and events leaving their windows.
        self.clock = Some(t);
        let mut anchors = self.retained.advance(t, self.tick);
        // An event of a forgotten id (its node gone) is not kept.
        for (anchor, ev) in events.into_iter().filter(|(a, _)| self.nodes.contains_key(a)) {
            anchors.push(anchor);
            self.retained.keep(anchor, t, ev, self.tick);
        }
        touched.extend(anchors.iter().filter_map(|a| self.labels.get(a)));
        let mut out = Vec::new();
        for (seg, id, r) in members {
            let Some(s) = self.segments.get_mut(seg).filter(|_| r != 0) else {
                continue;
            };
            let key = key_of(id.kind, &id.name);
            if !matches!(s.def, Def::Spec) {
                // Changed or removed at run time: served by the model, but
                // spec segments reading it still see the dataflow's members.
                if let Some(keys) = s.engine_keys.as_mut() {
                    if r > 0 {
                        keys.insert(key);
                    } else {
                        keys.remove(&key);
                    }
                }
                continue;
            }
            touched.insert(key);
            let id = id.to_string();
            self.set_member(seg, key, id.clone(), r > 0);
            out.push((seg, key, id, r > 0));
        }
        let touched: Vec<Key> = touched.into_iter().collect();
        for slot in 0..self.segments.len() {
            self.refresh(slot, &touched, &mut out);
        }
        self.record(t, &mut out);
        out
    }

    /// Sorts changes for output and notes sizes.
    fn record(&mut self, t: u64, out: &mut [MemberChange]) {
        out.sort_by(|a, b| (a.0, &a.2).cmp(&(b.0, &b.2)));
        self.diffs += out.len() as u64;
        let mut changed: Vec<usize> = out.iter().map(|c| c.0).collect();
        changed.dedup();
        for slot in changed {
            let s = &mut self.segments[slot];
            let size = s.members.len();
            match s.history.last_mut() {
                Some((at, n)) if *at == t => *n = size,
                _ => s.history.push((t, size)),
            }
        }
        match self.retain {
            History::Keep(0) => self.looks_back_to = t,
            retain => {
                for (slot, _, id, enter) in out.iter() {
                    self.segments[*slot].changes.push_back((t, id.clone(), *enter));
                }
                self.changes_kept += out.len();
                // Keep every change after `t - r`: the memberships of any
                // tick since can be told.
                if let Some(horizon) = retain.horizon(t) {
                    for s in &mut self.segments {
                        while s.changes.front().is_some_and(|c| c.0 <= horizon) {
                            let (at, _, _) = s.changes.pop_front().expect("a front");
                            self.looks_back_to = self.looks_back_to.max(at);
                            self.changes_kept -= 1;
                        }
                    }
                }
            }
        }
    }

    /// Every id of profile `profile`, its own included.
    pub fn ids_of(&self, profile: Key) -> BTreeSet<Id> {
        let ids = self.ids.get(&profile).into_iter().flatten();
        let named = ids.filter_map(|k| self.nodes.get(k).map(|(id, _)| id.clone()));
        named.chain(self.names.get(&profile).cloned()).collect()
    }

    /// The changes of `slot` after tick `t`, newest first, to undo; `Err`
    /// with the oldest tick the changes kept can tell when `t` is older.
    fn since(&self, slot: usize, t: u64) -> Result<impl Iterator<Item = &(u64, String, bool)>, u64> {
        if t < self.looks_back_to && self.clock.is_some_and(|c| t < c) {
            return Err(self.looks_back_to);
        }
        Ok(self.segments[slot].changes.iter().rev().take_while(move |c| c.0 > t))
    }

    /// The members of `slot` at tick `t` (as after the last tick at or
    /// before `t`), from its members now with the changes since undone.
    pub fn members_at(&self, slot: usize, t: u64) -> Result<BTreeSet<String>, u64> {
        let mut members = self.segments[slot].members.clone();
        for (_, id, enter) in self.since(slot, t)? {
            if *enter {
                members.remove(id);
            } else {
                members.insert(id.clone());
            }
        }
        Ok(members)
    }

    /// Whether any of `ids` was a member of `slot` at tick `t` (see
    /// [`Model::members_at`]).
    pub fn member_at(&self, slot: usize, t: u64, ids: &BTreeSet<String>) -> Result<bool, u64> {
        let mut now: BTreeSet<&String> = ids.iter().filter(|id| self.segments[slot].members.contains(*id)).collect();
        for (_, id, enter) in self.since(slot, t)? {
            if let Some(id) = ids.get(id) {
                if *enter {
                    now.remove(id);
                } else {
                    now.insert(id);
                }
            }
        }
        Ok(!now.is_empty())
    }

    /// The sizes of every intersection of two or more of `slots` at the
    /// clock: `(its slots, size)`, by number of segments, then in the
    /// order given.
    pub fn overlaps(&self, slots: &[usize]) -> Vec<(Vec<usize>, usize)> {
        // Each member's segments as a bit mask; members counted by mask.
        let mut of: FxHashMap<&String, u32> = FxHashMap::default();
        for (bit, &slot) in slots.iter().enumerate() {
            for m in &self.segments[slot].members {
                *of.entry(m).or_default() |= 1 << bit;
            }
        }
        let mut masks: FxHashMap<u32, usize> = FxHashMap::default();
        for mask in of.into_values() {
            *masks.entry(mask).or_default() += 1;
        }
        let n = slots.len();
        let bits = |m: u32| (0..n).filter(move |b| m & (1 << b) != 0);
        let mut subsets: Vec<u32> = (1u32..1 << n).filter(|m| m.count_ones() >= 2).collect();
        subsets.sort_by_key(|&m| (m.count_ones(), bits(m).collect::<Vec<_>>()));
        subsets
            .into_iter()
            .map(|subset| {
                let size = masks.iter().filter(|(m, _)| *m & subset == subset).map(|(_, c)| c).sum();
                (bits(subset).map(|b| slots[b]).collect(), size)
            })
            .collect()
    }

    /// The SPEC §5 lines of `changes` at tick `t`, each after its profile.
    pub fn lines(&self, t: u64, changes: Vec<MemberChange>) -> Vec<ProfileLine> {
        let time = crate::core::clock::format_time(t, self.show_ms);
        changes
            .into_iter()
            .map(|(slot, _, id, enter)| {
                let s = &self.segments[slot];
                let line = membership_line(&time, &s.name, &id, enter, crate::spec::group_of(&s.name, &s.groups, &id));
                (id, line)
            })
            .collect()
    }

    /// Whether `change` can be made now (it is checked again when made).
    pub fn check(&self, change: &Change) -> Result<(), ApiError> {
        match change {
            Change::Put { name, when, .. } => {
                let (expr, _, _) = self.compile(when, self.segments.iter().position(|s| &s.name == name))?;
                match self.cycle_with(name, &expr) {
                    None => Ok(()),
                    Some(cycle) => Err(ApiError::Conflict(format!(
                        "segments would read each other in a cycle: {} (the running spec would not load)",
                        cycle.join(" -> ")
                    ))),
                }
            }
            Change::Delete { name } => {
                let slot = self.slot(name).ok_or_else(|| ApiError::NotFound {
                    message: format!("no segment named {name:?}"),
                    profile: None,
                })?;
                // A segment another one reads cannot go: the running spec
                // (`GET /spec`) would not load.
                let readers: Vec<&str> = self
                    .segments
                    .iter()
                    .enumerate()
                    .filter(|(i, s)| *i != slot && s.live() && s.expr.as_ref().is_some_and(|e| reads_segment(e, name)))
                    .map(|(_, s)| s.name.as_str())
                    .collect();
                match readers.as_slice() {
                    [] => Ok(()),
                    _ => Err(ApiError::Conflict(format!(
                        "{name} is read by {} (in_segment('{name}')): change or remove {} first",
                        readers.join(", "),
                        if readers.len() == 1 { "it" } else { "them" }
                    ))),
                }
            }
            Change::Request(_) => Ok(()),
        }
    }

    /// Makes a change at the clock; returns the answer and the membership
    /// changes.
    pub fn run(&mut self, change: Change) -> (Result<usize, ApiError>, Vec<MemberChange>) {
        let mut out = Vec::new();
        let result = match change {
            Change::Put {
                name,
                description,
                when: source,
            } => {
                let existing = self.segments.iter().position(|s| s.name == name);
                // Compile again here: the segments may have changed since the check.
                match self.compile(&source, existing) {
                    Err(e) => Err(e),
                    Ok((expr, plan, formula)) => {
                        let slot = existing.unwrap_or_else(|| {
                            self.segments.push(SegState {
                                name: name.clone(),
                                description: None,
                                source: String::new(),
                                expr: None,
                                def: Def::Deleted,
                                engine_keys: None,
                                members: BTreeSet::new(),
                                keys: FxHashSet::default(),
                                history: Vec::new(),
                                changes: VecDeque::new(),
                                entered: 0,
                                exited: 0,
                                groups: Vec::new(),
                                group_sizes: Vec::new(),
                            });
                            self.segments.len() - 1
                        });
                        let s = &mut self.segments[slot];
                        s.description = description.or(s.description.take());
                        s.source = source;
                        s.expr = Some(expr);
                        if matches!(s.def, Def::Spec) {
                            s.engine_keys = Some(s.keys.clone());
                        }
                        s.def = Def::Runtime {
                            plan: Arc::new(plan),
                            formula,
                        };
                        self.redefine(slot, &mut out);
                        Ok(self.segments[slot].members.len())
                    }
                }
            }
            Change::Delete { name } => match self.slot(&name) {
                None => Err(ApiError::NotFound {
                    message: format!("no segment named {name:?}"),
                    profile: None,
                }),
                Some(slot) => {
                    let s = &mut self.segments[slot];
                    if matches!(s.def, Def::Spec) {
                        s.engine_keys = Some(s.keys.clone());
                    }
                    s.def = Def::Deleted;
                    self.redefine(slot, &mut out);
                    Ok(0)
                }
            },
            // Made by a reader; after a restart, fed again from the journal.
            Change::Request(_) => Ok(0),
        };
        self.update_windows();
        let t = self.clock.unwrap_or(0);
        self.record(t, &mut out);
        (result, out)
    }

    /// Makes the journaled changes that took effect at or before `upto`
    /// again (a restart): silently those before the checkpoint resumed
    /// from (their lines are out), the others with their lines returned.
    fn catch_up(&mut self, upto: u64) -> Vec<ProfileLine> {
        let mut lines = Vec::new();
        while self.pending.front().is_some_and(|e| e.at <= upto) {
            let entry = self.pending.pop_front().expect("a front");
            let (result, changes) = self.run(entry.change.clone());
            if let Err(e) = result {
                tracing::error!("a change journaled at {} no longer applies: {e:?}", entry.at);
            }
            // Its lines are out when the checkpoint's output had them.
            if entry.diffs >= self.resumed_diffs {
                lines.extend(self.lines(entry.at, changes));
            }
        }
        lines
    }

    /// Schedules window expiries for the model terms runtime segments read.
    fn update_windows(&mut self) {
        let mut windows = BTreeSet::new();
        for s in &self.segments {
            if let Def::Runtime { plan, .. } = &s.def {
                windows.extend(plan.new_terms(&self.plan).filter_map(|(_, stream, _)| stream?.window));
            }
        }
        let t = self.clock.unwrap_or(0);
        self.retained.set_windows(windows, t, self.tick);
    }

    /// The next tick after the clock at which a model term changes with no
    /// update from the dataflow (an event leaves its window): the sink
    /// applies that tick even if the dataflow has nothing for it.
    pub fn next_due(&self) -> Option<u64> {
        let Some(clock) = self.clock else {
            return self.pending.front().map(|e| e.at);
        };
        let window = self.retained.due.range(clock + 1..).next().map(|(t, _)| *t);
        // A journaled change takes effect again at its own tick.
        let journaled = self.pending.front().map(|e| e.at.max(clock + self.tick) / self.tick * self.tick);
        window.into_iter().chain(journaled).min()
    }

    /// Re-evaluates `slot` and every runtime segment after it (they may read
    /// it) over every profile.
    fn redefine(&mut self, slot: usize, out: &mut Vec<MemberChange>) {
        let mut all: FxHashSet<Key> = self.names.keys().copied().collect();
        all.extend(self.segments[slot].keys.iter().copied());
        let all: Vec<Key> = all.into_iter().collect();
        if let Def::Deleted = self.segments[slot].def {
            let gone: Vec<(Key, String)> = self.segments[slot]
                .members
                .iter()
                .filter_map(|m| parse_id(m).map(|(k, _)| (k, m.clone())))
                .collect();
            for (k, id) in gone {
                self.set_member(slot, k, id.clone(), false);
                out.push((slot, k, id, false));
            }
        } else {
            self.refresh(slot, &all, out);
        }
        for later in slot + 1..self.segments.len() {
            self.refresh(later, &all, out);
        }
    }
}

/// Whose memberships `in_segment` reads when evaluating a formula.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reads {
    /// The served members (what runtime segments and previews read).
    Served,
    /// The dataflow's members (what a spec segment's formula reads inside
    /// the dataflow, even after the segment it names was changed at run
    /// time).
    Engine,
}

/// One condition of a segment for one profile (`GET /profiles/{id}`).
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    /// Its text in the segment's `when`.
    pub text: String,
    pub holds: bool,
    /// The current values of the terms it reads.
    pub values: Vec<Value>,
}

impl Model {
    /// A cycle of `in_segment` reads among the live segments if `name` were
    /// defined as `expr` (a spec segment may read a later one, so changing
    /// one at run time could close a loop).
    fn cycle_with(&self, name: &str, expr: &Expr) -> Option<Vec<String>> {
        let mut reads: HashMap<&str, Vec<String>> = HashMap::new();
        for s in self.segments.iter().filter(|s| s.live() && s.name != name) {
            reads.insert(&s.name, s.expr.as_ref().map(segments_read).unwrap_or_default());
        }
        reads.insert(name, segments_read(expr));
        // Depth first from `name`: a path back to it is the cycle.
        let mut path = vec![name.to_string()];
        fn back(reads: &HashMap<&str, Vec<String>>, to: &str, path: &mut Vec<String>, seen: &mut BTreeSet<String>) -> bool {
            let last = path.last().expect("a start").clone();
            for next in reads.get(last.as_str()).into_iter().flatten() {
                if next == to {
                    path.push(next.clone());
                    return true;
                }
                if seen.insert(next.clone()) {
                    path.push(next.clone());
                    if back(reads, to, path, seen) {
                        return true;
                    }
                    path.pop();
                }
            }
            false
        }
        back(&reads, name, &mut path, &mut BTreeSet::new()).then_some(path)
    }
}

/// The segments `e` reads with `in_segment`.
fn segments_read(e: &Expr) -> Vec<String> {
    let mut names = Vec::new();
    crate::spec::check::visit(e, &mut |x| {
        if let ExprKind::InSegment(n) = &x.kind {
            names.push(n.clone());
        }
    });
    names
}

/// Whether `e` reads segment `name` with `in_segment`.
fn reads_segment(e: &Expr, name: &str) -> bool {
    let mut reads = false;
    crate::spec::check::visit(e, &mut |x| reads |= matches!(&x.kind, ExprKind::InSegment(n) if n == name));
    reads
}

/// The atoms a formula reads.
fn atoms_of(f: &Formula, out: &mut Vec<usize>) {
    match f {
        Formula::Atom(a) => out.push(*a),
        Formula::Not(x) => atoms_of(x, out),
        Formula::And(x, y) | Formula::Or(x, y) => {
            atoms_of(x, out);
            atoms_of(y, out)
        }
        _ => {}
    }
}

/// The conditions of a checked `when` paired with their sub-formulas:
/// `Plan::formula` maps `and`/`or`/`not` one to one, so walking both trees
/// together finds, for each leaf of the expression (a comparison, a
/// `since` comparison, `in_segment`, a bare value), the formula it became.
fn condition_leaves<'a>(e: &'a Expr, f: &'a Formula, out: &mut Vec<(&'a Expr, &'a Formula)>) {
    match (&e.kind, f) {
        (ExprKind::And(a, b), Formula::And(x, y)) | (ExprKind::Or(a, b), Formula::Or(x, y)) => {
            condition_leaves(a, x, out);
            condition_leaves(b, y, out)
        }
        (ExprKind::Not(a), Formula::Not(x)) => condition_leaves(a, x, out),
        _ => out.push((e, f)),
    }
}

/// The conditions of a `when` (as [`condition_leaves`], without a formula).
fn expr_leaves<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
    match &e.kind {
        ExprKind::And(a, b) | ExprKind::Or(a, b) => {
            expr_leaves(a, out);
            expr_leaves(b, out)
        }
        ExprKind::Not(a) => expr_leaves(a, out),
        _ => out.push(e),
    }
}

/// The text in `source` of each leaf (in source order): from where it
/// starts up to where the next begins, without what joins them.
fn condition_texts(source: &str, leaves: &[&Expr]) -> Vec<String> {
    let offset = |e: &Expr| -> usize {
        let mut off = 0;
        for (i, line) in source.split_inclusive('\n').enumerate() {
            if i + 1 == e.pos.line {
                return off
                    + line
                        .char_indices()
                        .nth(e.pos.column.saturating_sub(1))
                        .map_or(line.len(), |(b, _)| b);
            }
            off += line.len();
        }
        source.len()
    };
    let starts: Vec<usize> = leaves.iter().map(|e| offset(e)).collect();
    (0..leaves.len())
        .map(|i| {
            let end = starts.get(i + 1).copied().unwrap_or(source.len()).max(starts[i]);
            trim_condition(&source[starts[i]..end])
        })
        .collect()
}

/// The text of one condition sliced up to the next: drops what joins it to
/// the next (`and`, `or`, `not`, parentheses it does not open) and
/// parentheses around the whole of it.
fn trim_condition(text: &str) -> String {
    let mut t = text.trim_end();
    loop {
        let before = t;
        for word in ["and", "or", "not"] {
            if let Some(rest) = t.strip_suffix(word) {
                if rest.is_empty() || rest.ends_with(|c: char| c.is_whitespace() || c == ')') {
                    t = rest.trim_end();
                }
            }
        }
        if let Some(rest) = t.strip_suffix('(') {
            t = rest.trim_end();
        }
        if t.ends_with(')') && depths(t).last().is_some_and(|&d| d < 0) {
            t = t[..t.len() - 1].trim_end();
        }
        // `(x >= 1)`: the group's parentheses, when they enclose all of it.
        if t.starts_with('(') && t.ends_with(')') && !depths(&t[..t.len() - 1]).contains(&0) {
            t = t[1..t.len() - 1].trim();
        }
        if t == before {
            return t.to_string();
        }
    }
}

/// The parenthesis depth after each character of `t` (opens minus
/// closes), skipping those inside string literals.
fn depths(t: &str) -> Vec<i32> {
    let (mut depth, mut quote, mut escaped) = (0, None, false);
    t.chars()
        .map(|c| {
            match quote {
                Some(_) if escaped => escaped = false,
                Some(_) if c == '\\' => escaped = true,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => match c {
                    '\'' | '"' => quote = Some(c),
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                },
            }
            depth
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::event::Kept;

    fn texts(source: &str) -> Vec<String> {
        let e = crate::spec::compile_when(source, 1000, &|_| true, &[]).expect("a valid when");
        let mut leaves = Vec::new();
        expr_leaves(&e, &mut leaves);
        condition_texts(source, &leaves)
    }

    fn kept(t: u64) -> Kept {
        let line = format!(r#"{{"type":"track","event":"x","userId":"u","timestamp":{t},"properties":{{"a":1}}}}"#);
        Kept(Box::new(crate::ingest::event::decode(line.as_bytes()).expect("an event")))
    }

    #[test]
    fn history_covers_windows_up_to_it() {
        assert!(History::Keep(3_600_000).covers(Some(3_600_000)));
        assert!(!History::Keep(3_600_000).covers(Some(3_600_001)));
        assert!(!History::Keep(3_600_000).covers(None));
        assert!(!History::Keep(0).covers(Some(1_000)));
        assert!(History::All.covers(None));
        assert_eq!(
            (History::Keep(0).text(), History::Keep(7_200_000).text()),
            ("0".into(), "2h".to_string())
        );
    }

    #[test]
    fn kept_events_are_dropped_after_the_history_and_due_at_window_ends() {
        let mut r = Retained::new(History::Keep(10_000));
        r.set_windows([3_000].into(), 0, 1_000);
        r.keep(7, 5_000, kept(4_500), 1_000);
        // Its history ended before it took effect: not kept.
        r.keep(7, 20_000, kept(9_000), 1_000);
        assert_eq!(r.count, 1);
        assert_eq!(r.due.keys().copied().collect::<Vec<_>>(), [8_000]);
        assert!(r.advance(7_000, 1_000).is_empty());
        assert_eq!(r.advance(8_000, 1_000), [7]);
        assert_eq!(r.count, 1);
        r.advance(15_000, 1_000);
        assert_eq!((r.count, r.by_anchor.len()), (0, 0));
    }

    #[test]
    fn kept_events_cross_processes_intact() {
        let k = kept(1_000);
        let bytes = bincode::serialize(&k).expect("encodes");
        let back: Kept = bincode::deserialize(&bytes).expect("decodes");
        assert_eq!(back, k);
        assert_eq!(back.0.properties.get("a"), Some(&serde_json::json!(1)));
    }

    #[test]
    fn condition_texts_drop_what_joins_them() {
        assert_eq!(
            texts("not (count('a', 1h) >= 1 or trait.vip)\n  and ((since('b') < 2h))"),
            ["count('a', 1h) >= 1", "trait.vip", "since('b') < 2h"]
        );
        assert_eq!(
            texts("(count('a', 1h) + 1) * 2 >= 3 and (in_segment('x'))"),
            ["(count('a', 1h) + 1) * 2 >= 3", "in_segment('x')"]
        );
        // Parentheses inside strings do not count.
        assert_eq!(
            texts("in_segment('a)b') or (trait.x == '(' and count(page where name == ':)', 1h) >= 1)"),
            ["in_segment('a)b')", "trait.x == '('", "count(page where name == ':)', 1h) >= 1"]
        );
    }
}
