//! dataflow

pub mod cluster;
pub mod identity;
pub mod rfm;
pub mod rules;
pub mod score;
pub mod terms;
pub mod total;
pub mod window;
