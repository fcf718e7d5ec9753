//! shoal: real-time behavioral segmentation on differential dataflow.
//!
//! The stages, one module each: [`event`] decodes Segment-spec lines,
//! [`ingest`] orders them on the [`clock`] (dedupe, ticks, lateness),
//! [`identity`] resolves profiles as connected components, [`window`] holds
//! windowed facts and their future retractions, [`terms`] maintains the
//! aggregates, [`rules`] turns predicates into membership collections, and
//! [`sink`] writes the enter/exit lines of SPEC §5. [`spec`] parses and
//! checks dataflow specs; [`plan`] shares their terms; [`engine`] wires it all
//! on timely workers.

pub mod clock;
pub mod event;
pub mod spec;
pub mod value;
pub mod engine;
