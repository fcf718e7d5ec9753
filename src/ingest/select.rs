//! Which streams an event feeds, and what each keeps of it: a stream's
//! selector (event type, name, `where` filter) is matched here, on the
//! reader's side, and [`extract`] turns a matching event into the stream's
//! [`Pay`]load.

use rustc_hash::FxHashMap;

use crate::core::fact::Pay;
use crate::core::id::StreamId;
use crate::core::value::{Dec, Value};
use crate::ingest::event::{EventOf, EventType};
use crate::plan::{Read, StreamDef};
use crate::spec::ast::{EventSel, Expr, ExprKind, Selector};

/// What `stream` keeps of `ev`, if it matches.
pub fn extract(stream: &StreamDef, ev: &EventOf<'_>) -> Option<Pay> {
    if !matches(&stream.sel, ev) {
        return None;
    }
    match &stream.read {
        Read::Unit => Some(Pay::Unit),
        Read::Value(p) => {
            let v = ev.value(&p.0).unwrap_or(Value::Missing);
            (!v.is_missing()).then_some(Pay::Val(v))
        }
        Read::Last(p) => {
            let json = ev.get(&p.0)?;
            let v = Value::from_json(json);
            (!v.is_missing()).then(|| Pay::stamped(ev.time, json.to_string(), v))
        }
        Read::Time => Some(Pay::Val(Value::Num(Dec::from_int(ev.time as i64)))),
        Read::Trait(name) => {
            let json = ev.traits.get(name)?;
            Some(Pay::stamped(ev.time, json.to_string(), Value::from_json(json)))
        }
        Read::Steps => {
            let mask = stream
                .steps
                .iter()
                .enumerate()
                .filter(|(_, s)| matches(s, ev))
                .fold(0u64, |m, (i, _)| m | 1 << i);
            (mask != 0).then_some(Pay::Steps { time: ev.time, mask })
        }
    }
}

/// Whether an event matches a selector, filter included.
pub fn matches(sel: &Selector, ev: &EventOf<'_>) -> bool {
    let kind_ok = match &sel.event {
        EventSel::Any => ev.kind != EventType::Group,
        EventSel::Identify => ev.kind == EventType::Identify,
        EventSel::Track(n) => ev.kind == EventType::Track && ev.name.as_deref() == Some(n.as_str()),
        EventSel::Page(n) => ev.kind == EventType::Page && n.as_ref().is_none_or(|n| ev.name.as_deref() == Some(n.as_str())),
        EventSel::Screen(n) => ev.kind == EventType::Screen && n.as_ref().is_none_or(|n| ev.name.as_deref() == Some(n.as_str())),
    };
    kind_ok && sel.filter.as_ref().is_none_or(|f| filter_value(f, ev) == Value::Bool(true))
}

/// Streams by the event name their selector takes.
type ByName = FxHashMap<String, Vec<StreamId>>;

/// The streams an event may match, by its type and name — what a selector
/// checks before its filter — so that an event is matched against those
/// alone: most streams select one track or page name, and checking every
/// stream's selector for every event was a tenth of the decoding thread.
#[derive(Clone, Debug, Default)]
pub struct Selectors {
    /// Streams of every event but a group (`EventSel::Any`).
    any: Vec<StreamId>,
    /// By event type (its index, see [`kind_index`]): the streams of every
    /// event of the type, and of each name. Looked up for every event: an
    /// array and Fx hashing, where std's SipHash was over 2% of the
    /// decoding thread.
    kinds: Box<[(Vec<StreamId>, ByName); 6]>,
}

impl Selectors {
    pub fn new(streams: &[StreamDef]) -> Selectors {
        let mut selectors = Selectors::default();
        for (i, stream) in streams.iter().enumerate() {
            let i = StreamId::of(i);
            let mut of = |kind: EventType, name: Option<&String>| {
                let (all, named) = &mut selectors.kinds[kind_index(kind)];
                match name {
                    None => all.push(i),
                    Some(n) => named.entry(n.clone()).or_default().push(i),
                }
            };
            match &stream.sel.event {
                EventSel::Any => selectors.any.push(i),
                EventSel::Identify => of(EventType::Identify, None),
                EventSel::Track(n) => of(EventType::Track, Some(n)),
                EventSel::Page(n) => of(EventType::Page, n.as_ref()),
                EventSel::Screen(n) => of(EventType::Screen, n.as_ref()),
            }
        }
        selectors
    }

    /// Calls `each` with every stream whose selector can match `ev`, in
    /// no particular order (each at most once).
    pub fn candidates(&self, ev: &EventOf<'_>, mut each: impl FnMut(StreamId)) {
        if ev.kind != EventType::Group {
            self.any.iter().for_each(|&i| each(i));
        }
        let (all, named) = &self.kinds[kind_index(ev.kind)];
        all.iter().for_each(|&i| each(i));
        if let Some(streams) = ev.name.as_deref().and_then(|n| named.get(n)) {
            streams.iter().for_each(|&i| each(i));
        }
    }
}

/// Where an event type's streams are in [`Selectors`].
fn kind_index(kind: EventType) -> usize {
    match kind {
        EventType::Track => 0,
        EventType::Page => 1,
        EventType::Screen => 2,
        EventType::Identify => 3,
        EventType::Alias => 4,
        EventType::Group => 5,
    }
}

/// Evaluates a `where` filter over one event.
pub fn filter_value(e: &Expr, ev: &EventOf<'_>) -> Value {
    match &e.kind {
        ExprKind::Path(p) => ev.value(&p.0).unwrap_or(Value::Missing),
        ExprKind::Num(d) => Value::Num(*d),
        ExprKind::Str(s) => Value::Str(s.as_str().into()),
        ExprKind::Bool(b) => Value::Bool(*b),
        ExprKind::Dur(d) => Value::Dur(*d as i64),
        ExprKind::Neg(a) => filter_value(a, ev).neg(),
        ExprKind::Abs(a) => filter_value(a, ev).abs(),
        ExprKind::Sqrt(a) => filter_value(a, ev).sqrt(),
        ExprKind::Arith(op, a, b) => filter_value(a, ev).arith(*op, &filter_value(b, ev)),
        ExprKind::Cmp(op, a, b) => Value::Bool(filter_value(a, ev).cmp_op(*op, &filter_value(b, ev))),
        ExprKind::Not(a) => Value::Bool(filter_value(a, ev) != Value::Bool(true)),
        ExprKind::And(a, b) => Value::Bool(filter_value(a, ev) == Value::Bool(true) && filter_value(b, ev) == Value::Bool(true)),
        ExprKind::Or(a, b) => Value::Bool(filter_value(a, ev) == Value::Bool(true) || filter_value(b, ev) == Value::Bool(true)),
        ExprKind::Time(a) => crate::plan::as_time(&filter_value(a, ev)),
        ExprKind::Distance(args) => crate::plan::distance(&args.iter().map(|a| filter_value(a, ev)).collect::<Vec<_>>()),
        ExprKind::Clock { part, time, zone } => {
            crate::plan::clock_part(*part, &filter_value(time, ev), zone.as_ref().map(|z| filter_value(z, ev)).as_ref())
        }
        _ => Value::Missing,
    }
}
