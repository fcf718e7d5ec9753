//! Sinks: membership changes out as SPEC §5 lines.
//!
//! All changes go to worker 0, which holds them per tick until the frontier
//! passes the tick, then consolidates (a change that nets to nothing is not
//! written), sorts by the segment's place in the spec and the profile id's
//! bytes, and writes. Ticks after the last tick of the run (`--until`, or the
//! end of file input) are never written.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::Write;
use std::rc::Rc;

use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;

use crate::clock::format_time;
use crate::event::Id;
use crate::ingest::Key;

/// A membership change: (segment, profile) and its diff.
type Change = ((u32, Key), isize);

/// What the sinks saw, read by the driver after the run.
#[derive(Debug, Default)]
pub struct SinkState {
    pub diffs: u64,
    pub profiles: i64,
    /// The first write error; writing stops there.
    pub error: Option<String>,
}

/// One membership line, keys in SPEC order.
pub fn membership_line(time: u64, show_ms: bool, segment: &str, profile: &str, enter: bool) -> String {
    let mut line = String::with_capacity(96);
    line.push_str("{\"time\":\"");
    line.push_str(&format_time(time, show_ms));
    line.push_str("\",\"segment\":");
    line.push_str(&serde_json::to_string(segment).expect("string"));
    line.push_str(",\"profile\":");
    line.push_str(&serde_json::to_string(profile).expect("string"));
    line.push_str(if enter { ",\"change\":\"enter\"}" } else { ",\"change\":\"exit\"}" });
    line
}

/// Writes the changes of `(segment, profile)` memberships to `out` on worker 0.
/// `last` is the last tick to write, set by the driver once it is known.
pub fn memberships<'s>(
    members: VecCollection<'s, u64, (u32, Key), isize>,
    ids: Rc<RefCell<Vec<Id>>>,
    names: Rc<Vec<String>>,
    show_ms: bool,
    last: Rc<Cell<Option<u64>>>,
    mut out: Option<Box<dyn Write>>,
    state: Rc<RefCell<SinkState>>,
) {
    let pact = Exchange::new(|_: &((u32, Key), u64, isize)| 0u64);
    let mut pending: BTreeMap<u64, Vec<Change>> = BTreeMap::new();
    members.inner.sink(pact, "WriteMemberships", move |(input, frontier)| {
        input.for_each(|_cap, data| {
            for (d, t, r) in data.drain(..) {
                pending.entry(t).or_default().push((d, r));
            }
        });
        while let Some(entry) = pending.first_entry() {
            let t = *entry.key();
            if frontier.less_equal(&t) {
                break;
            }
            let mut changes = entry.remove();
            if last.get().is_some_and(|l| t > l) {
                continue;
            }
            differential_dataflow::consolidation::consolidate(&mut changes);
            let ids = ids.borrow();
            let mut lines: Vec<(u32, String, bool)> = changes
                .into_iter()
                .filter(|(_, r)| *r != 0)
                .map(|((seg, p), r)| (seg, ids[p as usize].to_string(), r > 0))
                .collect();
            lines.sort();
            let mut st = state.borrow_mut();
            for (seg, profile, enter) in lines {
                st.diffs += 1;
                if let (Some(w), None) = (out.as_mut(), &st.error) {
                    let line = membership_line(t, show_ms, &names[seg as usize], &profile, enter);
                    if let Err(e) = writeln!(w, "{line}") {
                        st.error = Some(e.to_string());
                    }
                }
            }
            if let (Some(w), None) = (out.as_mut(), &st.error) {
                if let Err(e) = w.flush() {
                    st.error = Some(e.to_string());
                }
            }
        }
    });
}

/// Counts the profiles that exist at the last tick, on worker 0.
pub fn profiles<'s>(universe: VecCollection<'s, u64, Key, isize>, last: Rc<Cell<Option<u64>>>, state: Rc<RefCell<SinkState>>) {
    let pact = Exchange::new(|_: &((), u64, isize)| 0u64);
    universe.map(|_| ()).inner.sink(pact, "CountProfiles", move |(input, _frontier)| {
        input.for_each(|_cap, data| {
            let mut st = state.borrow_mut();
            for ((), t, r) in data.drain(..) {
                if last.get().is_none_or(|l| t <= l) {
                    st.profiles += r as i64;
                }
            }
        });
    });
}
