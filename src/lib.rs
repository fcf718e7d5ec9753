//! shoal: real-time behavioral segmentation on differential dataflow.
//!
//! The source is a row of stages, one folder each, in data order. A stage
//! imports only itself and the stages above it in this list
//! (`tests/architecture.rs` holds the table and fails on an upward import
//! or a cycle); `docs/architecture.md` follows one event through them.
//!
//! 1. [`core`]: the vocabulary every stage shares: values, the clock, ids
//!    and keys, facts. Imports nothing else of the crate.
//! 2. [`spec`]: dataflow specs (TOML and the `when` language), parsed and
//!    type-checked, errors with line and column.
//! 3. [`plan`]: a checked spec as shared streams, terms, atoms and segment
//!    formulas: a term used by ten segments is computed once.
//! 4. [`ingest`]: a line becomes a stamped event: decoded (SPEC §1),
//!    matched to the streams it feeds, deduplicated, placed on the clock
//!    (SPEC §3), its ids turned into identity updates.
//! 5. [`generate`]: realistic synthetic traffic.
//! 6. [`dataflow`]: everything inside timely workers: identity as
//!    connected components, windows, terms, population scores (percentiles,
//!    RFM, clusters), rules, memberships; [`dataflow::build`] shows the graph.
//! 7. [`output`]: enter/exit lines (SPEC §5), their delivery, and the sink
//!    operator that writes them and reports the delivered frontier.
//! 8. [`io`]: the outside world's ends: files, stdin, Kafka in and out.
//! 9. [`serve`]: the served model and the HTTP API (SPEC §7), which observe
//!    the sink through [`output::sink::Observer`].
//! 10. [`run`]: a job on timely workers: readers, pacing, checkpoints,
//!     progress, the summary.

pub mod core;
pub mod spec;
pub mod plan;
pub mod ingest;
pub mod generate;
pub mod dataflow;
pub mod output;
pub mod io;
pub mod serve;
pub mod run;
