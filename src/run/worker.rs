//! One timely worker of a run: the dataflow built, the sink wired, the
//! reader run to the end of its input.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::core::clock::format_time;
use crate::dataflow::build_with;
use crate::dataflow::identity;
use crate::ingest::stamp::Counters;
use crate::output::deliver::OpenOutput;
use crate::output::sink::{self, Note, Outputs, SinkState};
use crate::plan::Plan;
use crate::run::checkpointing::Checkpointing;
use crate::run::error::EngineError;
use crate::run::feeder::Feeder;
use crate::run::job::{Job, Summary};
use crate::run::lines::read_lines;
use crate::run::progress::Progress;
use crate::run::reader::{Reader, ReaderCheckpoints};

pub(super) fn run_worker(
    worker: &mut timely::worker::Worker,
    job: &Job,
    served: Option<Arc<crate::serve::model::Served>>,
    checkpointing: Option<Arc<Checkpointing>>,
) -> Result<Option<Summary>, EngineError> {
    let plan = Rc::new(Plan::new(&job.spec));
    let opts = &job.opts;
    let leader = worker.index() == 0;
    let state = Rc::new(RefCell::new(SinkState::default()));
    let restored = checkpointing.as_ref().and_then(|c| c.restored.as_ref());
    let resumed_at = restored.map(|s| (s.mark.frontier, s.mark.diffs));
    if let Some(snap) = restored.filter(|_| leader) {
        // Ticks before the checkpoint's frontier are out already.
        let mut st = state.borrow_mut();
        st.skip_before = snap.mark.frontier;
        st.diffs = snap.mark.diffs;
        st.dead_written = snap.mark.dead_written.clone();
    }
    let open = |o: &Option<OpenOutput>, resume: Option<u64>| match (o, leader) {
        (Some(open), true) => open(resume).map(Some),
        _ => Ok(None),
    };
    let outputs = Outputs {
        segments: Rc::new(plan.segments.iter().map(|s| s.name.clone()).collect()),
        groups: Rc::new(plan.segments.iter().map(|s| s.groups.clone()).collect()),
        show_ms: opts.tick < 1000,
        changes: open(&job.output, restored.map(|s| s.mark.changes.unwrap_or(0)))?,
        dead_letters: open(&job.dead_letters, restored.map(|s| s.mark.dead.unwrap_or(0)))?,
        state: state.clone(),
        timings: job.timings.clone(),
        observer: served
            .clone()
            .filter(|_| leader)
            .map(|s| s as Arc<dyn crate::output::sink::Observer>),
        delivered: checkpointing.as_ref().filter(|_| leader).map(|c| c.delivered.clone()),
        on_checkpoint: checkpointing.clone().filter(|_| leader).map(|c| {
            let hook: crate::output::sink::CheckpointHook = Box::new(move |note: &[u8]| c.arrived(note));
            hook
        }),
        stop: Some(job.stop.clone()),
    };
    // Every worker builds the same dataflow, serving or not.
    let serving = job.http.is_some();
    // Whether forget and unlink requests can come: from the API, from a
    // checkpoint (of a served run), or given at ticks (`RunOptions::requests`).
    let requests = serving || checkpointing.is_some() || !opts.requests.is_empty();
    // Serving with history: accepted events go to the model too.
    let history = job.http.as_ref().map(|h| h.history(&plan)).is_some_and(|h| h.keeps());
    // The models' latest state is what `GET /models/{name}/examples` reads.
    let memory = checkpointing.as_ref().map(|c| c.kept.clone()).or_else(|| {
        (job.http.is_some() && plan.models.iter().any(Option::is_some))
            .then(|| Arc::new(crate::dataflow::Kept::new(&plan, Vec::new(), Vec::new(), false)))
    });
    if let Some(served) = served.as_ref().filter(|_| leader) {
        *served.kept.lock().unwrap_or_else(|e| e.into_inner()) = memory.clone();
    }
    let placement = opts.identity.unwrap_or(match job.timely.communication {
        timely::CommunicationConfig::Cluster { .. } => identity::Placement::Partitioned,
        _ => identity::Placement::OneWorker,
    });
    let mut notes = timely::dataflow::InputHandleVec::new();
    // A cluster's checkpoint rounds, announced by worker 0 to every process.
    let mut rounds = timely::dataflow::InputHandleVec::<u64, crate::run::checkpointing::Announce>::new();
    let profiling = crate::run::profile::Profiling::start(worker);
    let (inputs, delivered) = worker.dataflow::<u64, _, _>(|scope| {
        use differential_dataflow::input::Input as _;
        use timely::dataflow::operators::{Input, Probe};
        let (mut inputs, built) = build_with(scope, &plan, opts.tick, memory, (serving, requests), placement);
        let notes = scope.input_from(&mut notes).container::<Vec<Note>>();
        let mut members = built.members.map(|(s, id)| crate::output::sink::Upd::Member(s, id));
        if serving {
            use crate::output::sink::Upd;
            let terms = built
                .terms
                .expect("asked for")
                .map(|((stream, p), values)| Upd::Term(p, stream, values));
            let names = built.names.map(|(p, id)| Upd::Name(p, id));
            let labels = built.labels.map(|(node, p)| Upd::Label(node, p));
            let nodes = built
                .nodes
                .expect("asked for")
                .flat_map(|(k, (seen, id, _))| seen.then_some(Upd::Node(k, id)));
            let fits = built.fits.map(|(m, fit)| Upd::Model(m, fit));
            members = members.concat(terms).concat(names).concat(labels).concat(nodes).concat(fits);
            if history {
                let (events_in, events) = scope.new_collection();
                inputs.events = Some(events_in);
                members = members.concat(events.map(|(anchor, ev)| Upd::Event(anchor, ev)));
            }
        }
        let (delivered, _) = sink::deliver(members, notes, outputs).probe();

        sink::profiles(built.universe, state.clone());
        if let Some(ck) = checkpointing.clone() {
            use timely::dataflow::operators::{vec::broadcast::Broadcast, Inspect};
            scope
                .input_from(&mut rounds)
                .container::<Vec<crate::run::checkpointing::Announce>>()
                .broadcast()
                .inspect(move |news| ck.announce(news.clone()));
        }
        (inputs, delivered)
    });
    let mut feeder = Feeder::new(plan, inputs, opts);
    feeder.suppress_with(job.suppression.clone(), &opts.requests);
    if leader {
        feeder.schedule(opts.requests.clone());
    }
    feeder.timings = job.timings.clone();
    if checkpointing.is_some() {
        feeder.retain();
    }
    let announcing = leader && checkpointing.is_some();
    let mut reader = Reader {
        worker,
        feeder,
        notes,
        delivered,
        in_flight: 0,
        pumped: std::collections::VecDeque::new(),
        progress: Progress::new(),
        opts: opts.clone(),
        stop: job.stop.clone(),
        served,
        serving,
        checkpoints: checkpointing.map(|shared| ReaderCheckpoints {
            shared,
            last: Instant::now(),
            dead: Default::default(),
            dead_sent: 0,
            given: None,
        }),
        rounds: announcing.then_some(rounds),
    };
    if let Some(ck) = reader.checkpoints.as_ref().map(|c| c.shared.clone()) {
        reader.announce(crate::run::checkpointing::Announce::Resumed(ck.resumed_seq()));
    }
    reader.same_checkpoint_as_process_0()?;
    let position = reader.restore();
    if let (Some(served), Some(frontier)) = (&reader.served, resumed_at) {
        served.resumed_at(frontier.0, frontier.1);
    }
    let result = match (&job.kafka, leader) {
        (Some(kafka), leader) => {
            // Events over HTTP beside Kafka are read by worker 0.
            let http = job.sources.iter().find(|s| matches!(s, crate::io::source::Source::Http(_)));
            crate::run::kafka::read(&mut reader, kafka, http.filter(|_| leader), position)
        }
        (None, true) => read_lines(&mut reader, &job.sources, position),
        (None, false) => Ok(()),
    };
    if let Some(served) = reader.served.as_ref().filter(|_| leader) {
        served.end_requests();
    }
    let stopped = reader.stopping();
    if let Err(e) = result {
        // Stop the other readers of this process too; what is final is kept.
        job.stop.store(true, Ordering::SeqCst);
        reader.stop();
        while worker.step_or_park(None) {}
        return Err(e);
    }
    if stopped {
        reader.stop();
    } else {
        reader.finish();
    }
    while worker.step_or_park(None) {}
    if let Some(p) = profiling {
        if let Some(log) = worker.logging() {
            log.flush();
        }
        p.finish(worker.index());
    }
    if !leader {
        return Ok(None);
    }
    let st = state.borrow();
    if let Some(e) = &st.error {
        return Err(EngineError::Write(e.clone()));
    }
    let Counters {
        read,
        accepted,
        bad,
        duplicates,
        late,
        ignored,
        suppressed,
    } = st.counters.clone();
    Ok(Some(Summary {
        events_read: read,
        accepted,
        bad,
        duplicates,
        late,
        ignored,
        suppressed,
        profiles: st.profiles_at_last(),
        diffs_written: st.diffs,
        clock: st.last.map(|t| format_time(t, opts.tick < 1000)),
    }))
}
