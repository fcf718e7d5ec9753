//! core

pub mod clock;
pub mod fact;
pub mod id;
pub mod value;
