//! The vocabulary every stage shares, and nothing else: [`value::Value`]
//! (exact decimals, strings, booleans, missing), the [`clock`] (times,
//! ticks, durations), [`id`] (ids as the input names them, keys as the
//! dataflow does, identity labels) and [`fact`] (what the dataflow is fed
//! about each event). Imports nothing else of the crate.

pub mod clock;
pub mod fact;
pub mod id;
pub mod value;
