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
    // `[[segment]]` tables, or `segment = [{…}, …]` inline (the loader takes
    // both): either way each keeps everything it says (`groups` too).
    let given: Vec<Table> = match doc.get("segment") {
        Some(Item::ArrayOfTables(a)) => a.iter().cloned().collect(),
        Some(item) => item
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_inline_table().cloned().map(toml_edit::InlineTable::into_table))
            .collect(),
        None => Vec::new(),
    };
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
