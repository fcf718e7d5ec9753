//! shoal: real-time behavioral segmentation on differential dataflow.

pub mod core;
pub mod dataflow;
pub mod generate;
pub mod ingest;
pub mod io;
pub mod output;
pub mod plan;
pub mod run;
pub mod serve;
pub mod spec;
