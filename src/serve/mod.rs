//! The served model and the HTTP API (SPEC §7): [`model`] keeps the
//! memberships, terms and profiles as the sink writes them (it observes the
//! sink through `crate::output::sink::Observer`) and runs segments defined
//! at run time; [`http`] serves it with axum; [`events`] takes events in
//! over Segment's HTTP tracking API (`/v1/…`); [`running`] writes the
//! running spec back as TOML.

pub mod events;
pub mod http;
pub mod model;
pub mod running;
