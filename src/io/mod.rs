//! io

pub mod kafka;
pub mod source;
