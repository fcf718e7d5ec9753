//! Ids and keys: who an event is about, as the input names it ([`Id`]) and
//! as the dataflow names it ([`Key`], a hash of the id), and the labels that
//! identity resolution propagates.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The kind of an identifier: every `user:` id sorts before every `anon:` id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum IdKind {
    User,
    Anon,
}

/// A typed identifier, `user:<userId>` or `anon:<anonymousId>`. Its `Ord` is
/// the eligibility order of SPEC §2 (user before anon, then UTF-8 bytes).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Id {
    pub kind: IdKind,
    pub name: String,
}

impl Id {
    pub fn user(name: impl Into<String>) -> Id {
        Id {
            kind: IdKind::User,
            name: name.into(),
        }
    }
    pub fn anon(name: impl Into<String>) -> Id {
        Id {
            kind: IdKind::Anon,
            name: name.into(),
        }
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            IdKind::User => write!(f, "user:{}", self.name),
            IdKind::Anon => write!(f, "anon:{}", self.name),
        }
    }
}

/// A profile or id key inside the dataflow: the 64-bit xxh3 hash of the id,
/// so every reader — one per Kafka partition owner, on any worker of any
/// process — names an id the same way without sharing a table. Ids travel
/// beside their keys in identity labels, and the output looks names up in
/// the dataflow's `names` collection (see `identity`). Two ids collide with
/// probability about n²/2⁶⁵ (≈3·10⁻⁸ for a million ids); see docs/decisions.md.
pub type Key = u64;

/// The key of an id.
pub fn key_of(kind: IdKind, name: &str) -> Key {
    let seed = match kind {
        IdKind::User => 1,
        IdKind::Anon => 2,
    };
    xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), seed)
}

/// A node's label in identity resolution: `(not eligible, id, key)`; the
/// least label of a component is its profile.
pub type Label = (bool, Id, Key);
