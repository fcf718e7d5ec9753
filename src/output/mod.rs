//! output

pub mod deliver;
pub mod sink;
