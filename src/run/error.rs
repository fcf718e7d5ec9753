//! Why a run fails: each variant names what failed, and `main` maps the
//! usage errors (exit 2) apart from the failures of a run (exit 1).

use crate::run::checkpoint;

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Options that cannot go together, or input that cannot do what they ask (exit 2).
    #[error("{0}")]
    Unsupported(String),
    #[error("timely: {0}")]
    Timely(String),
    /// A checkpoint that cannot be used for this run (exit 2).
    #[error("{0}")]
    Refused(String),
    /// The state directory failed.
    #[error(transparent)]
    Checkpoint(checkpoint::CheckpointError),
    /// An input (a file, stdin, Kafka) failed.
    #[error(transparent)]
    Input(#[from] crate::io::Error),
    /// An output cannot be opened.
    #[error(transparent)]
    Output(#[from] crate::output::deliver::OpenError),
    /// Writing the output failed; what was written before stays.
    #[error("{0}")]
    Write(String),
    #[error("cannot listen on {addr}: {error}")]
    Listen { addr: String, error: std::io::Error },
    #[error("cannot start the HTTP server: {0}")]
    Server(std::io::Error),
}

impl From<checkpoint::CheckpointError> for EngineError {
    fn from(e: checkpoint::CheckpointError) -> Self {
        match e {
            checkpoint::CheckpointError::Refused(m) => EngineError::Refused(m),
            e => EngineError::Checkpoint(e),
        }
    }
}
