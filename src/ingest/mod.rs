//! From a line to a stamped event, on the reader's side of the dataflow.
//!
//! [`lines`] reads lines; [`event`] decodes one into an [`event::Event`]
//! (SPEC §1) or a reason it is bad; [`select`] finds the streams it feeds
//! and what each keeps of it; [`decode`] does both on a thread ahead of the
//! reader; [`stamp`] deduplicates, places the event on the clock (ticks,
//! lateness, SPEC §3) and turns its ids into identity nodes and links, each
//! at the tick it takes effect. Nothing here knows timely: the run's
//! feeder hands what this stage produces to the dataflow's inputs.

pub mod decode;
pub mod event;
pub mod lines;
pub mod select;
pub mod stamp;
