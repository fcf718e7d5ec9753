//! run

pub mod checkpoint;
pub mod engine;
pub mod kafka;
pub mod profile;
