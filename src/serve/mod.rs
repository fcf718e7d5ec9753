//! serve

pub mod http;
pub mod model;
