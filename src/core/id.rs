//! Ids and keys: who an event is about, as the input names it ([`Id`]) and
//! as the dataflow names it ([`Key`], a hash of the id), and the labels that
//! identity resolution propagates.

use compact_str::CompactString;
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
    /// Inline up to 24 bytes (most ids): the dataflow keeps an id in its
    /// identity labels and in the names of profiles, once per id, and a
    /// heap string was about a tenth of the memory of a profile.
    pub name: CompactString,
}

impl Id {
    pub fn user(name: impl Into<CompactString>) -> Id {
        Id {
            kind: IdKind::User,
            name: name.into(),
        }
    }
    pub fn anon(name: impl Into<CompactString>) -> Id {
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

/// Numbers the plan gives its parts. Each travels beside a profile key in
/// the dataflow (`(StreamId, Key)` is a stream's row of a profile,
/// `(AtomId, Key)` an atom's, `(SegmentId, Key)` a membership), so each has
/// its own type: one cannot be read as another. Serialized as the number.
macro_rules! plan_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u32);

        impl $name {
            /// Its place in the plan's list.
            pub fn index(self) -> usize {
                self.0 as usize
            }

            pub fn of(index: usize) -> $name {
                $name(index as u32)
            }
        }
    };
}

plan_id!(
    /// A stream of the plan: event streams first, then the virtual streams
    /// of population terms (scores, RFM, clusters).
    StreamId
);
plan_id!(
    /// An atom of the plan: one comparison over terms, shared by segments.
    AtomId
);
plan_id!(
    /// A segment of the spec, in spec order (the order of output lines).
    SegmentId
);
plan_id!(
    /// A profile value of the plan: an input of percentiles, RFM or
    /// clusters, computed for every profile.
    ValueId
);

/// A request about ids (SPEC §7), fed to the dataflow at a tick: from then
/// on, what it names no longer counts. Both are retractions of identity
/// updates, not rebuilds (see `crate::dataflow::identity::requested`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Forget a profile: the ids with these keys (its ids when asked) and
    /// every event naming any of them; later events naming them are
    /// suppressed. Keys, not ids: what is kept of the request (the journal,
    /// checkpoints) does not spell out whom it forgot.
    Forget(Vec<Key>),
    /// Never count a link between these two ids again, from any event.
    /// Keys too: an unlinked pair may be forgotten later.
    Unlink(Key, Key),
}

impl Id {
    /// The id's key.
    pub fn key(&self) -> Key {
        key_of(self.kind, &self.name)
    }
}
