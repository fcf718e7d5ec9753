//! ingest

pub mod decode;
pub mod event;
pub mod lines;
pub mod select;
pub mod stamp;
