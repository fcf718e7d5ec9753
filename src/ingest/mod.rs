//! ingest

pub mod decode;
pub mod event;
pub mod stamp;
