//! Wiring: builds the dataflow for a spec on timely workers and drives it.

use crate::spec::Spec;

/// How a run is clocked and bounded (all durations and times in ms).
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub tick: u64,
    pub lateness: u64,
    pub dedupe_horizon: u64,
    pub until: Option<u64>,
    /// Worker threads (in this process).
    pub workers: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { tick: 1_000, lateness: 5_000, dedupe_horizon: 3_600_000, until: None, workers: 1 }
    }
}

/// What a run over in-memory input produced.
#[derive(Clone, Debug, Default)]
pub struct MemoryOutput {
    /// SPEC §5 lines, in output order, without line endings.
    pub lines: Vec<String>,
    /// Dead-letter JSON lines.
    pub dead_letters: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Timely(String),
}

/// Runs `spec` over `input` (JSON lines) and returns everything it wrote.
pub fn run_memory(_spec: &Spec, _input: &[u8], _opts: &RunOptions) -> Result<MemoryOutput, EngineError> {
    Err(EngineError::Unsupported("engine not built yet".into()))
}
