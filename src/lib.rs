//! shoal: real-time behavioral segmentation on differential dataflow.
//!
//! The stages, one module each: [`event`] decodes Segment-spec lines,
//! [`ingest`] orders them on the [`clock`] (dedupe, ticks, lateness),
//! [`identity`] resolves profiles as connected components, [`window`] holds
//! windowed facts and their future retractions, [`terms`] maintains the
//! aggregates, [`score`], [`rfm`] and [`cluster`] compute the population
//! terms (percentiles, RFM scores, k-means clusters), [`rules`] turns
//! predicates into membership collections, and
//! [`sink`] writes the enter/exit lines of SPEC §5. [`spec`] parses and
//! checks dataflow specs; [`plan`] shares their terms; [`engine`] wires it all
//! on timely workers; [`generate`] makes realistic traffic.

pub mod checkpoint;
pub mod clock;
pub mod cluster;
pub mod decode;
pub mod engine;
pub mod event;
pub mod generate;
pub mod http;
pub mod identity;
pub mod ingest;
pub mod kafka;
pub mod plan;
pub mod profile;
pub mod rfm;
pub mod rules;
pub mod score;
pub mod serve;
pub mod sink;
pub mod source;
pub mod spec;
pub mod terms;
pub mod total;
pub mod value;
pub mod window;
