//! run

pub mod checkpoint;
pub mod engine;
pub mod profile;
