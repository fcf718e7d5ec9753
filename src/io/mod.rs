//! The outside world's ends: line sources ([`source`]: files, stdin, the
//! generator, read ahead on a decoding thread) and Kafka ([`kafka`]: the
//! client settings, partitions dealt to workers, offsets, and the producer
//! that delivers changes). A reader's [`Position`] in its input is what a
//! checkpoint stores to resume it.

pub mod intake;
pub mod journal;
pub mod kafka;
pub mod source;
pub mod webhook;

use serde::{Deserialize, Serialize};

/// Where a reader is in its input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Position {
    /// Line sources: the source's index, the byte offset in it of the next
    /// line, and the number of lines read from it.
    Lines { source: usize, offset: u64, line: u64 },
    /// Kafka: per partition, the next offset and the largest event time read.
    Kafka(Vec<PartitionPosition>),
}

/// A Kafka partition's place: the next offset, and the largest event time
/// and latest effect tick read from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionPosition {
    pub topic: String,
    pub partition: i32,
    pub next: i64,
    pub max_time: Option<u64>,
    pub effect: u64,
}

/// Why an input or a Kafka client cannot be used. Each message names the
/// input and ends with the underlying error's own (it is not a separate
/// `source`, which `main`'s report would print a second time).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file, stream or thread of an input failed.
    #[error("cannot {what}: {error}")]
    Input {
        /// What was being done, naming the input (`read events.jsonl`).
        what: String,
        error: std::io::Error,
    },
    /// An input that cannot do what the run asks of it.
    #[error("{0}")]
    Unsupported(String),
    /// An input that no longer matches a checkpoint's position.
    #[error("{0}")]
    Changed(String),
    /// A Kafka client call failed.
    #[error("kafka {brokers}: {what}: {error}")]
    Kafka {
        brokers: String,
        what: String,
        error: Box<rdkafka::error::KafkaError>,
    },
    /// A topic or partition the run needs is not as it must be, or no
    /// broker could be reached with the settings given (TLS, SASL).
    #[error("kafka {brokers}: {what}")]
    Topic { brokers: String, what: String },
}

/// Writes `bytes` to `path` so that a crash leaves the old file or the new
/// one, never part of one: into `tmp` (created only for its owner when
/// `owner_only`), fsynced, renamed over `path`, and the directory fsynced.
/// On failure `tmp` is removed.
pub fn write_atomically(tmp: &std::path::Path, path: &std::path::Path, bytes: &[u8], owner_only: bool) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let written = (|| {
        let mode = if owner_only { 0o600 } else { 0o666 };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(tmp, path)?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    written
}

impl Error {
    /// An input failure: `what` names the action and the input, and is
    /// only called on failure (reading a line must not format a message).
    pub fn input(what: impl FnOnce() -> String) -> impl FnOnce(std::io::Error) -> Error {
        move |error| Error::Input { what: what(), error }
    }
}
