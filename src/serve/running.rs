//! `GET /spec`: the running spec as a TOML file `shoal run` loads — the
//! spec file as given, with the segments changed at run time written in.
//!
//! The file's text is edited, not regenerated: its comments, scores, RFM
//! and clusterings stay as written, and each spec segment's table stays
//! where it was. A segment changed at run time gets its new `when` (and
//! `description`) in its own table; a removed one loses its table; one
//! added at run time is appended, in the order added, after the spec's —
//! the order the running spec evaluates them in, so every `in_segment`
//! still names a segment before it.

use toml_edit::{value, ArrayOfTables, DocumentMut, Item, Table};

use crate::serve::model::{Def, SegState};

/// The running spec: `text` (the spec file, whose first `spec_count`
/// segments are the first of `segments`) with `segments` written in.
pub fn running_spec(text: &str, spec_count: usize, segments: &[SegState]) -> String {
    let mut doc: DocumentMut = text.parse().unwrap_or_default();
    let given: Vec<Table> = doc
        .get("segment")
        .and_then(Item::as_array_of_tables)
        .map(|a| a.iter().cloned().collect())
        .unwrap_or_default();
    let mut tables = ArrayOfTables::new();
    for (slot, seg) in segments.iter().enumerate() {
        let mut table = match given.get(slot).filter(|_| slot < spec_count) {
            Some(t) => t.clone(),
            None => {
                let mut t = Table::new();
                t.insert("name", value(seg.name.as_str()));
                t
            }
        };
        match &seg.def {
            Def::Deleted => continue,
            Def::Spec if slot < given.len() => {}
            Def::Spec | Def::Runtime { .. } => {
                if let Some(d) = &seg.description {
                    table.insert("description", value(d.as_str()));
                }
                table.insert("when", value(seg.source.as_str()));
            }
        }
        tables.push(table);
    }
    doc.insert("segment", Item::ArrayOfTables(tables));
    doc.to_string()
}
