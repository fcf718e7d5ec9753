//! output

pub mod sink;
