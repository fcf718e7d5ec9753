//! The syntax tree of the `when` language (SPEC §4).
//!
//! The parser produces these nodes; the checker types them; the planner
//! (`crate::plan`) turns them into shared terms, atoms and set formulas; the
//! test suite's reference evaluator interprets them directly.

/// What `hour()` and `weekday()` read of a time.
pub use crate::core::clock::Part as ClockPart;
use crate::core::value::Dec;
pub use crate::core::value::{ArithOp, CmpOp};

/// A 1-based position inside a `when` (or `expr`) source string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

/// An expression node with the position where it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub pos: Pos,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    /// A number literal, exact (six decimal places).
    Num(Dec),
    /// A string literal.
    Str(String),
    /// A duration literal in milliseconds.
    Dur(u64),
    Bool(bool),
    /// A path read from the event, only inside a selector's `where` filter.
    Path(Path),
    Neg(Box<Expr>),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Arith(ArithOp, Box<Expr>, Box<Expr>),
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    /// `count(sel, window)`: `path` is `None`; every other aggregate has a path.
    Agg {
        kind: AggKind,
        sel: Selector,
        path: Option<Path>,
        window: Window,
    },
    /// `last(sel, path)`.
    Last {
        sel: Selector,
        path: Path,
    },
    /// `since(sel)`; the checker allows it only as `since(sel) OP DURATION`.
    Since(Selector),
    Sqrt(Box<Expr>),
    Abs(Box<Expr>),
    /// `percentile(expr, P)` (scoring issue; reported unsupported for now).
    Percentile(Box<Expr>, f64),
    InSegment(String),
    /// `now`: the tick being computed (SPEC §4 "Times").
    Now,
    /// `time(expr)`: a timestamp string or epoch milliseconds as a time.
    Time(Box<Expr>),
    /// `last_time(sel)` (`first`: false) and `first_time(sel)` (true).
    EventTime {
        sel: Selector,
        first: bool,
    },
    /// `steps(s1, …, sn, D)` (SPEC §4 "Sequences"): how many steps of the
    /// funnel a profile went through, in order, within `D` ms.
    /// `sequence(…)` is parsed as `steps(…) == n`.
    Steps {
        sels: Vec<Selector>,
        window: u64,
    },
    /// `distance(lat1, lon1, lat2, lon2)` in km (SPEC §4 "Places").
    Distance(Vec<Expr>),
    /// `inside(lat, lon, 'zone')`.
    Inside(Box<Expr>, Box<Expr>, String),
    /// `hour(t[, zone])` and `weekday(t[, zone])`.
    Clock {
        part: ClockPart,
        time: Box<Expr>,
        zone: Option<Box<Expr>>,
    },
    Trait(String),
    Score(String),
    Rfm(RfmField),
    Cluster(String),
    /// `predict.NAME`: a `[[model]]`'s probability (SPEC §4 "Predictive models").
    Predict(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AggKind {
    Count,
    Sum,
    Avg,
    Min,
    Max,
    Var,
    Distinct,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RfmField {
    R,
    F,
    M,
    Segment,
}

/// Which events a selector matches, before its optional `where` filter.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventSel {
    /// A `track` event of this name.
    Track(String),
    /// `page` events, optionally only those with this `name`.
    Page(Option<String>),
    /// `screen` events, optionally only those with this `name`.
    Screen(Option<String>),
    Identify,
    /// Every accepted event, `identify` and `alias` included.
    Any,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Selector {
    pub event: EventSel,
    /// A boolean expression over the event's paths (`ExprKind::Path`).
    pub filter: Option<Box<Expr>>,
}

/// A dotted path into the event, already resolved: a bare `NAME` in the source
/// is `["properties", NAME]`; `context.…`, `traits.…` and `properties.…` are
/// kept as written.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Path(pub Vec<String>);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Window {
    /// Milliseconds, > 0.
    Dur(u64),
    Lifetime,
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.join("."))
    }
}
