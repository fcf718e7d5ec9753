//! Everything inside timely workers: from the facts and identity updates
//! readers feed to the memberships of every segment.
//!
//! [`build`] shows the whole graph. Identity ([`identity`]) resolves ids to
//! profiles as connected components; [`window`] bounds facts in time and
//! re-keys them to profiles; [`terms`] folds them into one value per term
//! and profile; [`score`], [`rfm`], [`cluster`] and [`model`] compute the
//! population terms (percentiles, RFM scores, k-means clusters, predictions
//! of logistic regressions fitted by [`logit`]); [`timed`] evaluates
//! the atoms that read `now`, with timers; [`rules`] turns the
//! atoms of `when` expressions into memberships. [`total`] holds the
//! operators for totally ordered time (hash maps per key, measured against
//! and held to differential's own) that these stages are made of.

pub mod cluster;
pub mod identity;
pub mod logit;
pub mod memory;
pub mod model;
pub mod rfm;
pub mod rules;
pub mod score;
pub mod terms;
pub mod timed;
pub mod total;
pub mod window;

use std::rc::Rc;
use std::sync::Arc;

use differential_dataflow::input::{Input, InputSession};
use differential_dataflow::VecCollection;
use timely::dataflow::Scope;

use crate::core::fact::{Fact, FactOf};
use crate::core::id::SegmentId;
use crate::core::id::{Key, Label};
use crate::plan::Plan;

/// Makes a panic on a timely worker thread end the process with exit 101,
/// after the panic hook already installed has reported it (as a panic of
/// the main thread would). Without it, the other workers of a run wait for
/// the dead one's progress forever and the process hangs instead of
/// failing. A panic there is a bug (bad data is dead-lettered, never a
/// panic), so there is nothing to recover in the process; with `--state`,
/// a restart resumes from the last checkpoint. Installed once per process
/// by `shoal`'s `main`, and by the tests that run several workers (where
/// a worker's panic would otherwise hang the test).
pub fn exit_when_a_worker_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            before(info);
            if std::thread::current().name().is_some_and(|n| n.starts_with("timely:work")) {
                std::process::exit(101);
            }
        }));
    });
}

/// The differential inputs a reader feeds, at the ticks events take effect.
pub struct Inputs {
    /// Facts of streams with a payload to fold.
    pub facts: InputSession<u64, Fact, isize>,
    /// Facts of streams folded only by `count` ([`Plan::counted_streams`]).
    pub counts: InputSession<u64, FactOf<()>, isize>,
    pub nodes: InputSession<u64, (Key, Label), isize>,
    pub links: InputSession<u64, (Key, Key), isize>,
    /// Ids forgotten (SPEC §7 `DELETE /profiles/{id}`), each once.
    pub forgotten: InputSession<u64, Key, isize>,
    /// Pairs of ids unlinked (`POST /profiles/{id}/unlink`), each once and
    /// in both directions.
    pub unlinked: InputSession<u64, (Key, Key), isize>,
    /// Serving with `--history`: every accepted event and its anchor id,
    /// for the served model (see `crate::serve::model`).
    pub events: Option<InputSession<u64, (Key, crate::ingest::event::Kept), isize>>,
}

impl Inputs {
    pub(crate) fn advance_to(&mut self, t: u64) {
        if t > *self.facts.time() {
            self.facts.advance_to(t);
            self.counts.advance_to(t);
            self.nodes.advance_to(t);
            self.links.advance_to(t);
            self.forgotten.advance_to(t);
            self.unlinked.advance_to(t);
            if let Some(events) = &mut self.events {
                events.advance_to(t);
            }
        }
    }

    pub(crate) fn flush(&mut self) {
        self.facts.flush();
        self.counts.flush();
        self.nodes.flush();
        self.links.flush();
        self.forgotten.flush();
        self.unlinked.flush();
        if let Some(events) = &mut self.events {
            events.flush();
        }
    }
}

/// The collections a spec maintains.
pub struct Collections<'s> {
    /// `(segment index, the profile's name)` for every member of every
    /// segment.
    pub members: VecCollection<'s, u64, (SegmentId, crate::core::id::Id), isize>,
    /// `(profile, its id)` for every profile.
    pub names: VecCollection<'s, u64, (Key, crate::core::id::Id), isize>,
    /// Every profile that exists.
    pub universe: VecCollection<'s, u64, Key, isize>,
    /// Term rows: `((stream, profile), the values of its terms)`, when
    /// asked for (see [`build_with`]).
    pub terms: Option<VecCollection<'s, u64, crate::dataflow::terms::Row, isize>>,
    /// `(id, profile)` for every id of a profile.
    pub labels: VecCollection<'s, u64, (Key, Key), isize>,
    /// The identity nodes as fed, less those of forgotten ids, when asked
    /// for (see [`build_with`]).
    pub nodes: Option<VecCollection<'s, u64, (Key, Label), isize>>,
    /// `(model index, fit)`: each predictive model's fit in force.
    pub fits: VecCollection<'s, u64, (u32, model::Fitted), isize>,
}

/// What the population operators keep that a checkpoint needs besides the
/// inputs (see [`memory`]), shared with the checkpoint writer.
#[derive(Debug)]
pub struct Kept {
    pub clusters: Arc<cluster::Memory>,
    pub models: Arc<model::Models>,
}

impl Kept {
    /// For `plan`, starting from the restored states (empty: none); with
    /// `history`, states are kept until a checkpoint takes them, otherwise
    /// only the latest (for the HTTP API).
    pub fn new(plan: &Plan, clusters: Vec<Option<cluster::KMeans>>, models: Vec<Option<model::ModelState>>, history: bool) -> Kept {
        Kept {
            clusters: Arc::new(cluster::Memory::new(plan.clusters.len(), clusters, history)),
            models: Arc::new(model::Models::new(plan.models.len(), models, history)),
        }
    }
}

/// Builds the dataflow of `plan` in `scope`: identity, windows, terms, rules.
pub fn build<'s>(scope: Scope<'s, u64>, plan: &Rc<Plan>, tick: u64) -> (Inputs, Collections<'s>) {
    build_with(scope, plan, tick, None, (true, true), identity::Placement::OneWorker)
}

/// [`build`], with the clusterings' and models' state kept in (and started
/// from) `memory`, and the term rows computed only when `rows` asks for them
/// (or the plan reads them: population terms, atoms over several terms),
/// as are the remaining identity nodes (for serving), the forget and unlink
/// requests applied to the links only when `requests` says they can come
/// (see below), and the id graph kept as `placement` says.
///
/// Applying requests keeps every link in three joins (13% of the heap of
/// a retail run, in massif) for requests that only the HTTP API
/// makes, a checkpoint of a served run replays, or a caller gives at
/// ticks; every worker must build the same dataflow, so the caller decides
/// it from what every process knows alike (see `RunOptions::requests`).
pub fn build_with<'s>(
    scope: Scope<'s, u64>,
    plan: &Rc<Plan>,
    tick: u64,
    memory: Option<Arc<Kept>>,
    (rows, requests): (bool, bool),
    placement: identity::Placement,
) -> (Inputs, Collections<'s>) {
    let (facts_in, facts) = scope.new_collection();
    let (counts_in, counts) = scope.new_collection();
    let (nodes_in, nodes) = scope.new_collection();
    let (links_in, links) = scope.new_collection();
    let (forgotten_in, forgotten) = scope.new_collection();
    let (unlinked_in, unlinked) = scope.new_collection();
    let links = if requests {
        identity::requested(links, forgotten.clone(), unlinked)
    } else {
        links
    };
    let remaining = rows.then(|| identity::remaining(nodes.clone(), forgotten.clone()));
    let identity::Profiles { labels, names } = identity::profiles((nodes, forgotten, remaining.clone()), links, placement);
    let universe = identity::universe(names.clone());
    let rows = rows || !plan.values.is_empty() || !plan.timed.is_empty() || plan.atoms.iter().any(|a| a.terms.len() > 1);
    let (members, terms, fits) = if rows {
        let profiles = identity::Profiles {
            labels: labels.clone(),
            names: names.clone(),
        };
        members_from_rows(scope, (counts, facts), (profiles, universe.clone()), plan, (tick, memory))
    } else {
        // Every atom comes from one event-stream term: terms and segments
        // in one operator (see `terms::terms_and_segments`).
        let members = terms::terms_and_segments((counts, facts), labels.clone(), names.clone(), plan.clone(), tick);
        (members, None, differential_dataflow::collection::concatenate(scope, Vec::new()))
    };
    (
        Inputs {
            facts: facts_in,
            counts: counts_in,
            nodes: nodes_in,
            links: links_in,
            forgotten: forgotten_in,
            unlinked: unlinked_in,
            events: None,
        },
        Collections {
            members,
            names,
            universe,
            terms,
            labels,
            nodes: remaining,
            fits,
        },
    )
}

/// The memberships, the term rows when there are any, and the fits of
/// predictive models.
type Built<'s> = (
    Coll<'s, (SegmentId, crate::core::id::Id)>,
    Option<Coll<'s, terms::Row>>,
    Coll<'s, (u32, model::Fitted)>,
);

/// A collection at ticks.
type Coll<'s, D> = VecCollection<'s, u64, D, isize>;

/// The memberships of a plan whose term rows are read (see [`build_with`]):
/// the terms, the population terms over their rows, the atoms of rows
/// and `Segments`, each an operator of its own.
fn members_from_rows<'s>(
    scope: Scope<'s, u64>,
    facts: (window::Facts<'s, ()>, window::Facts<'s, crate::core::fact::Pay>),
    (identity::Profiles { labels, names }, universe): (identity::Profiles<'s>, Coll<'s, Key>),
    plan: &Rc<Plan>,
    (tick, memory): (u64, Option<Arc<Kept>>),
) -> Built<'s> {
    let built = terms::terms(facts, labels, plan.clone(), (tick, true));
    let mut atoms = built.atoms;
    let mut terms = built.rows;
    let mut fits = differential_dataflow::collection::concatenate(scope, Vec::new());
    if let Some(rows) = terms.as_mut().filter(|_| !plan.values.is_empty()) {
        // Population terms: percentiles, RFM, clusters (see crate::plan).
        let values = score::values(rows.clone(), universe.clone(), plan.clone());
        if !plan.percentiles.is_empty() {
            *rows = rows
                .clone()
                .concat(score::thresholds(values.clone(), universe.clone(), plan.clone()));
        }
        if plan.rfm.is_some() {
            *rows = rows.clone().concat(rfm::rfm(values.clone(), plan.clone()));
        }
        if plan.clusters.iter().any(Option::is_some) {
            let memory = memory.as_ref().map(|m| m.clusters.clone());
            *rows = rows.clone().concat(cluster::clusters(values.clone(), plan.clone(), memory));
        }
        if plan.models.iter().any(Option::is_some) {
            let (predictions, fitted) = model::models(values, names.clone(), plan.clone(), memory.as_ref().map(|m| m.models.clone()));
            *rows = rows.clone().concat(predictions);
            fits = fitted;
        }
    }
    if let Some(more) = terms.clone().and_then(|rows| rules::atoms(rows, plan.clone())) {
        atoms = atoms.concat(more);
    }
    if let Some(more) = terms
        .clone()
        .and_then(|rows| timed::timed(rows, universe.clone(), plan.clone(), tick))
    {
        atoms = atoms.concat(more);
    }
    let members = rules::segments(atoms, names, plan.clone());
    (members, terms, fits)
}
