//! Facts: what the dataflow is fed about each event. A reader turns an
//! event into one fact per stream it matches, `(anchor id, stream, event
//! time, payload)`; the window stage keys them by anchor as [`Windowed`].

use serde::{Deserialize, Serialize};

use crate::core::id::{AtomId, Key, StreamId};
use crate::core::value::Value;

/// What a stream keeps of one event.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Pay {
    /// That it happened.
    Unit,
    /// A value read at a path.
    Val(Value),
    /// A value with its event time and JSON text, for "latest wins, ties by
    /// greatest text" (`last`, traits). Boxed: it is rare, and inline it
    /// would double the size of every fact.
    Stamped(Box<Stamp>),
    /// An event of a funnel (`steps()`): its time and which steps it
    /// matches, as a bit mask.
    Steps { time: u64, mask: u64 },
}

/// A stamped value (see [`Pay::Stamped`]); ordered by time, then text.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub time: u64,
    pub text: String,
    pub value: Value,
}

impl Pay {
    pub fn stamped(time: u64, text: String, value: Value) -> Pay {
        Pay::Stamped(Box::new(Stamp { time, text, value }))
    }
}

/// A fact about one event as the reader emits it: the anchor id, the stream,
/// the event's own time (for expiry) and what the stream reads of it.
pub type Fact = FactOf<Pay>;

/// A fact with payload `P`: [`Pay`], or `()` for streams folded only by
/// `count`, which need nothing but the fact's multiplicity.
pub type FactOf<P> = (Key, StreamId, u64, P);

/// A windowed fact: keyed by anchor id, with its stream and payload.
pub type Windowed = WindowedOf<Pay>;

/// A windowed fact with payload `P`.
pub type WindowedOf<P> = (Key, (StreamId, P));

/// An atom's row for a profile: `((atom, profile), holds)`. A profile has
/// a row for an atom while it has one for the atom's terms.
pub type AtomRow = ((AtomId, Key), bool);
