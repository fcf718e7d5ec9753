//! What leaves the dataflow: [`sink::deliver`], the operator on worker 0
//! that writes each final tick's enter/exit lines (SPEC §5) and dead
//! letters and reports the delivered frontier, and [`deliver`], where the
//! lines go (files, writers, memory; Kafka is in `crate::io::kafka`).

pub mod deliver;
pub mod sink;
