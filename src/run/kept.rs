//! What `--state` keeps of the HTTP API beside the checkpoints: the
//! changes made at run time, journaled in `DIR/api-changes.jsonl` before
//! each is made (see `crate::io::journal`) and made again at their ticks on
//! a restart (see `crate::serve::model`), and the access rules in
//! `DIR/access.json` (token digests, never the tokens).
//!
//! The access rules of a run are those given on its command line; a
//! restart given none keeps the last ones given, so a run restarted by hand
//! or by a supervisor with fewer flags does not come back unlocked. To open
//! the API again, remove `access.json`.

use std::path::{Path, PathBuf};

use crate::io::journal::Journal;
use crate::run::error::EngineError;
use crate::serve::http::Access;
use crate::serve::model::Entry;

/// The API's part of a state directory.
pub struct Kept {
    pub journal: Journal,
    /// The changes journaled, oldest first.
    pub changes: Vec<Entry>,
    access: PathBuf,
}

impl Kept {
    /// Opens (creating) the journal in `dir` and reads it.
    pub fn open(dir: &Path) -> Result<Kept, EngineError> {
        std::fs::create_dir_all(dir).map_err(crate::io::Error::input(|| format!("create the state directory {}", dir.display())))?;
        let (journal, changes) = Journal::open(&dir.join("api-changes.jsonl"))?;
        Ok(Kept {
            journal,
            changes,
            access: dir.join("access.json"),
        })
    }

    /// The access rules to serve with: `given` when it sets any (and then
    /// kept), else those kept.
    pub fn access(&self, given: Access) -> Result<Access, EngineError> {
        let path = &self.access;
        if !given.open() {
            let text = serde_json::to_string_pretty(&given).expect("access rules serialize") + "\n";
            // Only the owner may read it: the digests of short tokens could
            // be guessed offline.
            crate::io::write_atomically(&path.with_extension("json.tmp"), path, text.as_bytes(), true)
                .map_err(crate::io::Error::input(|| format!("write {}", path.display())))?;
            return Ok(given);
        }
        match std::fs::read_to_string(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(given),
            Err(e) => Err(crate::io::Error::Input {
                what: format!("read {}", path.display()),
                error: e,
            }
            .into()),
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                EngineError::Refused(format!(
                    "{} is damaged ({e}): give --http-token-file, or remove it to serve without tokens",
                    path.display()
                ))
            }),
        }
    }
}
