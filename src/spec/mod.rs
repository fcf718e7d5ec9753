//! Dataflow specs: the TOML file of SPEC §4 and the `when` language.
//!
//! `load`/`parse_spec` read the TOML, parse every `when` with [`parse`], and
//! run the [`check`]s; every error carries the TOML file's 1-based line and
//! column. The planner (`crate::plan`) only ever sees a checked [`Spec`].

pub mod ast;
pub mod check;
pub mod parse;

use ast::Expr;

/// One `[[segment]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub name: String,
    pub description: Option<String>,
    pub when: Expr,
    /// The `when` text as written, for messages and the API's `why`.
    pub source: String,
}

/// One `[[score]]` (parsed; the scoring issue gives it meaning).
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreDef {
    pub name: String,
    pub expr: Expr,
    pub source: String,
}

/// A checked spec.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Spec {
    pub segments: Vec<Segment>,
    pub scores: Vec<ScoreDef>,
    /// Whether an `[rfm]` block is present.
    pub has_rfm: bool,
    /// Names of the `[[clustering]]` blocks.
    pub clusterings: Vec<String>,
}

/// An error in a spec, at a 1-based line and column of the TOML file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{column}: {message}")]
pub struct SpecError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}
