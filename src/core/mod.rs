//! core

pub mod clock;
pub mod value;
