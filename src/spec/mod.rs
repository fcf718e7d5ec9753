//! Dataflow specs: the TOML file of SPEC §4 and the `when` language.
//!
//! `load`/`parse_spec` read the TOML, parse every `when` with [`parse`], and
//! run the [`check`]s; every error carries the TOML file's 1-based line and
//! column. The planner (`crate::plan`) only ever sees a checked [`Spec`].
//!
//! Positions: columns count characters (not bytes). An error inside a `when`
//! string is placed at the file position of the character it refers to,
//! following TOML's own decoding (the newline right after an opening `"""` is
//! trimmed, escapes in basic strings take their written width, a
//! line-ending backslash is followed to where the text resumes).
//!
//! `[[score]]`, `[rfm]` and `[[clustering]]` are read into [`ScoreDef`],
//! [`RfmDef`] and [`ClusteringDef`]; their expressions are checked like every
//! `when` (see [`check`] for what scores, percentiles and features may read).

pub mod ast;
pub mod check;
pub mod def;
pub mod parse;

pub use def::{
    default_rfm_grid, distance_km, group_of, sampled, ClusteringDef, Group, ModelDef, RfmDef, ScoreDef, Segment, Spec, SpecError, ZoneDef,
};

use ast::{Expr, ExprKind, Pos};
use std::ops::Range;
use toml_edit::{ImDocument, Item, TableLike, Value};

/// Reads and checks a spec file. A file that cannot be read is one error at
/// `0:0` naming the file.
pub fn load(path: &std::path::Path, tick_ms: u64) -> Result<Spec, Vec<SpecError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![SpecError {
            line: 0,
            column: 0,
            message: format!("cannot read spec file {}: {e}", path.display()),
        }]
    })?;
    parse_spec_in(&text, tick_ms, path.parent())
}

/// Parses and checks a spec's TOML text; returns every error found, sorted
/// by position.
pub fn parse_spec(text: &str, tick_ms: u64) -> Result<Spec, Vec<SpecError>> {
    parse_spec_in(text, tick_ms, None)
}

/// [`parse_spec`] for a spec in directory `base`: a `[[zone]]`'s `geojson`
/// file is relative to it (to the working directory when `None`).
pub fn parse_spec_in(text: &str, tick_ms: u64, base: Option<&std::path::Path>) -> Result<Spec, Vec<SpecError>> {
    let doc = match ImDocument::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let (line, column) = file_pos(text, e.span().map(|s| s.start).unwrap_or(0));
            let message = e
                .message()
                .trim()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            return Err(vec![SpecError {
                line,
                column,
                message: format!("TOML: {message}"),
            }]);
        }
    };
    let mut l = Loader {
        base: base.map(|b| b.to_path_buf()),
        text,
        tick_ms,
        errors: Vec::new(),
        spec: Spec::default(),
        segment_maps: Vec::new(),
        score_maps: Vec::new(),
        feature_maps: Vec::new(),
        model_maps: Vec::new(),
    };
    let root = doc.as_table();
    for (key, item) in root.iter() {
        let key_at = root.key(key).and_then(|k| k.span()).map(|s| s.start).unwrap_or(0);
        match key {
            "segment" => {
                for (t, at) in l.tables(item, key_at, "segment", true) {
                    l.segment(t, at);
                }
            }
            "score" => {
                for (t, at) in l.tables(item, key_at, "score", true) {
                    l.score(t, at);
                }
            }
            "zone" => {
                for (t, at) in l.tables(item, key_at, "zone", true) {
                    l.zone(t, at);
                }
            }
            "clustering" => {
                for (t, at) in l.tables(item, key_at, "clustering", true) {
                    l.clustering(t, at);
                }
            }
            "model" => {
                for (t, at) in l.tables(item, key_at, "model", true) {
                    l.model(t, at);
                }
            }
            "rfm" => {
                for (t, at) in l.tables(item, key_at, "rfm", false) {
                    l.rfm(t, at);
                }
            }
            other => l.error(
                key_at,
                format!("unknown key `{other}` (expected [[segment]], [[score]], [rfm], [[clustering]], [[model]] or [[zone]])"),
            ),
        }
    }
    l.finish()
}

/// Parses and checks one segment's `when` on its own (for the HTTP API's
/// preview and PUT): errors are at positions of `src`. Cycles through
/// `in_segment` need the whole spec: see [`check::segment_cycles`].
/// `zones` are the running spec's `[[zone]]` names.
pub fn compile_when(src: &str, tick_ms: u64, is_segment: &dyn Fn(&str) -> bool, zones: &[String]) -> Result<Expr, Vec<SpecError>> {
    let mut e = parse::parse_when(src).map_err(|e| vec![e])?;
    let ctx = check::Ctx {
        tick_ms,
        is_segment,
        scoring: check::Scoring::default(),
        zones,
    };
    let errors = check::check_expr(&mut e, check::Want::Condition, &ctx);
    if errors.is_empty() {
        Ok(e)
    } else {
        Err(errors)
    }
}

/// The rings of a GeoJSON file as `(lat, lon)` points: a Polygon's rings,
/// every ring of a MultiPolygon, or those of a Feature's geometry. Each
/// ring needs at least 3 positions, each position `[lon, lat, …]` in range.
fn geojson_rings(path: &std::path::Path) -> Result<Vec<Vec<(f64, f64)>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it ({e})"))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
    let mut geometry = &json;
    if geometry["type"] == "Feature" {
        geometry = &json["geometry"];
    }
    let kind = geometry["type"].as_str().unwrap_or("no `type`");
    let polygons: Vec<&serde_json::Value> = match kind {
        "Polygon" => vec![&geometry["coordinates"]],
        "MultiPolygon" => geometry["coordinates"]
            .as_array()
            .ok_or("a MultiPolygon's `coordinates` must be an array of polygons")?
            .iter()
            .collect(),
        other => return Err(format!("expected a Polygon, a MultiPolygon or a Feature of one, found {other}")),
    };
    let mut rings = Vec::new();
    for polygon in polygons {
        for ring in polygon.as_array().ok_or("a polygon's coordinates must be an array of rings")? {
            let positions = ring.as_array().ok_or("a ring must be an array of [lon, lat] positions")?;
            if positions.len() < 3 {
                return Err(format!("a ring has {} positions; it needs at least 3", positions.len()));
            }
            let mut points = Vec::with_capacity(positions.len());
            for p in positions {
                let (lon, lat) = match (p.get(0).and_then(|v| v.as_f64()), p.get(1).and_then(|v| v.as_f64())) {
                    (Some(lon), Some(lat)) => (lon, lat),
                    _ => return Err(format!("position {p} is not [lon, lat] numbers")),
                };
                if lat.abs() > 90.0 || lon.abs() > 180.0 {
                    return Err(format!("position {p} is out of range (GeoJSON is [lon, lat]: longitude first)"));
                }
                points.push((lat, lon));
            }
            rings.push(points);
        }
    }
    if rings.is_empty() {
        return Err("no ring in it".into());
    }
    Ok(rings)
}

/// The 1-based line and column (in characters) of a byte offset of `text`.
fn file_pos(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (before.matches('\n').count() + 1, text[line_start..offset].chars().count() + 1)
}

/// Where each character of a decoded TOML string came from.
struct StrMap {
    /// Byte offset in the file of each decoded character, plus one for the
    /// end (the closing quote).
    offsets: Vec<usize>,
}

impl StrMap {
    /// Maps a string's raw TOML token at `span` of `text`; `value` is the
    /// decoded string toml_edit produced, used to verify the decoding.
    fn new(text: &str, span: Option<Range<usize>>, value: &str) -> StrMap {
        let Some(span) = span else {
            return StrMap {
                offsets: vec![0; value.chars().count() + 1],
            };
        };
        match decode_with_offsets(&text[span.clone()]) {
            Some((decoded, offsets)) if decoded == value => StrMap {
                offsets: offsets.into_iter().map(|o| span.start + o).collect(),
            },
            // Should not happen; point every character at the string.
            _ => StrMap {
                offsets: vec![span.start; value.chars().count() + 1],
            },
        }
    }

    /// The file offset of a position inside the decoded string `src`.
    fn offset(&self, src: &str, p: Pos) -> usize {
        let (mut line, mut column) = (1, 1);
        let mut idx = src.chars().count();
        for (i, c) in src.chars().enumerate() {
            if line > p.line || (line == p.line && column >= p.column) {
                idx = i;
                break;
            }
            if c == '\n' {
                line += 1;
                column = 1;
            } else {
                column += 1;
            }
        }
        self.offsets[idx.min(self.offsets.len() - 1)]
    }
}

/// Decodes a TOML string token (quotes included) the way TOML does, and
/// gives the byte offset in the token of each decoded character plus the
/// end. `None` if it is not a string token.
fn decode_with_offsets(raw: &str) -> Option<(String, Vec<usize>)> {
    let (delim, literal) = if raw.starts_with("\"\"\"") {
        ("\"\"\"", false)
    } else if raw.starts_with("'''") {
        ("'''", true)
    } else if raw.starts_with('"') {
        ("\"", false)
    } else if raw.starts_with('\'') {
        ("'", true)
    } else {
        return None;
    };
    let multi = delim.len() == 3;
    let (start, end) = (delim.len(), raw.len().checked_sub(delim.len())?);
    if end < start {
        return None;
    }
    let mut body_start = start;
    if multi {
        if raw[start..end].starts_with("\r\n") {
            body_start += 2;
        } else if raw[start..end].starts_with('\n') {
            body_start += 1;
        }
    }
    let body = &raw[body_start..end];
    let mut out = String::new();
    let mut offsets = Vec::new();
    let mut it = body.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        let at = body_start + i;
        if multi && c == '\r' && it.peek().map(|&(_, d)| d) == Some('\n') {
            it.next();
            out.push('\n');
            offsets.push(at);
            continue;
        }
        if literal || c != '\\' {
            out.push(c);
            offsets.push(at);
            continue;
        }
        let (_, e) = it.next()?;
        let decoded = match e {
            'b' => '\u{8}',
            't' => '\t',
            'n' => '\n',
            'f' => '\u{c}',
            'r' => '\r',
            'e' => '\u{1b}',
            '"' => '"',
            '\\' => '\\',
            'u' | 'U' => {
                let n = if e == 'u' { 4 } else { 8 };
                let mut hex = String::new();
                for _ in 0..n {
                    hex.push(it.next()?.1);
                }
                char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?
            }
            c if multi && c.is_whitespace() => {
                // Line-ending backslash: skip all whitespace and newlines.
                while it.peek().is_some_and(|&(_, d)| d.is_whitespace()) {
                    it.next();
                }
                continue;
            }
            _ => return None,
        };
        out.push(decoded);
        offsets.push(at);
    }
    offsets.push(end);
    Some((out, offsets))
}

/// Builds the [`Spec`] from the TOML tree, collecting every error.
struct Loader<'t> {
    /// Where the spec file is: `geojson` paths are relative to it.
    base: Option<std::path::PathBuf>,
    text: &'t str,
    tick_ms: u64,
    errors: Vec<SpecError>,
    spec: Spec,
    /// Per segment: where its `when` came from; `None` for a placeholder
    /// whose `when` did not parse.
    segment_maps: Vec<Option<StrMap>>,
    score_maps: Vec<Option<StrMap>>,
    /// Per clustering, per feature that parsed.
    feature_maps: Vec<Vec<StrMap>>,
    /// Per model: its label's map (`None` when it did not parse), and one
    /// per feature that parsed.
    model_maps: Vec<(Option<StrMap>, Vec<StrMap>)>,
}

/// A string value with its span.
struct Str {
    value: String,
    span: Option<Range<usize>>,
}

impl<'t> Loader<'t> {
    fn error(&mut self, offset: usize, message: impl Into<String>) {
        let (line, column) = file_pos(self.text, offset);
        self.errors.push(SpecError {
            line,
            column,
            message: message.into(),
        });
    }

    /// The tables of a top-level key: an array of tables (or an array of
    /// inline tables) when `array`, else one table; each with the offset of
    /// its header.
    fn tables<'a>(&mut self, item: &'a Item, key_at: usize, key: &str, array: bool) -> Vec<(&'a dyn TableLike, usize)> {
        let start = |s: Option<Range<usize>>| s.map(|s| s.start).unwrap_or(key_at);
        let mut out: Vec<(&'a dyn TableLike, usize)> = Vec::new();
        match item {
            Item::ArrayOfTables(a) if array => {
                for t in a.iter() {
                    out.push((t, start(t.span())));
                }
            }
            Item::Value(Value::Array(a)) if array => {
                for v in a.iter() {
                    match v.as_inline_table() {
                        Some(t) => out.push((t, start(t.span()))),
                        None => self.error(start(v.span()), format!("each `{key}` must be a table: write [[{key}]] blocks")),
                    }
                }
            }
            Item::Table(t) if !array => out.push((t, start(t.span()))),
            Item::Value(Value::InlineTable(t)) if !array => out.push((t, start(t.span()))),
            _ if array => self.error(start(item.span()), format!("`{key}` must be an array of tables: write [[{key}]]")),
            _ => self.error(start(item.span()), format!("`{key}` must be a table: write [{key}]")),
        }
        out
    }

    /// Reports keys of `t` other than `allowed`.
    fn known_keys(&mut self, t: &dyn TableLike, block: &str, allowed: &[&str]) {
        for (k, item) in t.iter() {
            if !allowed.contains(&k) {
                let at = t
                    .key(k)
                    .and_then(|k| k.span())
                    .or_else(|| item.span())
                    .map(|s| s.start)
                    .unwrap_or(0);
                let expected = allowed.iter().map(|a| format!("`{a}`")).collect::<Vec<_>>().join(", ");
                self.error(at, format!("unknown key `{k}` in {block} (expected {expected})"));
            }
        }
    }

    fn at(t: &dyn TableLike, key: &str, fallback: usize) -> usize {
        t.get(key)
            .and_then(|i| i.span())
            .or_else(|| t.key(key).and_then(|k| k.span()))
            .map(|s| s.start)
            .unwrap_or(fallback)
    }

    /// Reports a block's `name` that is empty, or `taken` by another block
    /// of this `kind`; whether it is usable.
    fn block_name(&mut self, n: &Str, header: usize, kind: &str, taken: bool) -> bool {
        let at = n.span.as_ref().map(|s| s.start).unwrap_or(header);
        if n.value.is_empty() {
            self.error(at, format!("a {kind}'s `name` cannot be empty"));
        } else if taken {
            self.error(at, format!("duplicate {kind} name `{}`", n.value));
        }
        !n.value.is_empty() && !taken
    }

    /// A string value; reports a wrong type, and a missing one if `required`.
    fn string(&mut self, t: &dyn TableLike, key: &str, block: &str, header: usize, required: bool) -> Option<Str> {
        match t.get(key) {
            None => {
                if required {
                    self.error(header, format!("{block} has no `{key}`"));
                }
                None
            }
            Some(Item::Value(Value::String(s))) => Some(Str {
                value: s.value().clone(),
                span: s.span(),
            }),
            Some(_) => {
                let at = Self::at(t, key, header);
                self.error(at, format!("`{key}` in {block} must be a string"));
                None
            }
        }
    }

    fn integer(&mut self, t: &dyn TableLike, key: &str, block: &str, header: usize, required: bool) -> Option<i64> {
        match t.get(key) {
            None => {
                if required {
                    self.error(header, format!("{block} has no `{key}`"));
                }
                None
            }
            Some(i) => {
                let v = i.as_integer();
                if v.is_none() {
                    let at = Self::at(t, key, header);
                    self.error(at, format!("`{key}` in {block} must be an integer"));
                }
                v
            }
        }
    }

    /// A duration string (`"1h"`, or `"lifetime"` when `lifetime_ok`) that
    /// must be a multiple of the tick.
    fn duration(&mut self, s: &Str, what: &str, lifetime_ok: bool) {
        let at = s.span.as_ref().map(|s| s.start).unwrap_or(0);
        if lifetime_ok && s.value == "lifetime" {
            return;
        }
        match crate::core::clock::parse_duration(&s.value) {
            Ok(ms) if self.tick_ms > 0 && !ms.is_multiple_of(self.tick_ms) => self.error(
                at,
                format!(
                    "{what} {} is not a multiple of the tick {}",
                    parse::format_duration(ms),
                    parse::format_duration(self.tick_ms)
                ),
            ),
            Ok(_) => {}
            Err(m) => self.error(at, if lifetime_ok { format!("{m}; or \"lifetime\"") } else { m }),
        }
    }

    /// Parses an expression string; a syntax error is reported at its file
    /// position.
    fn expression(&mut self, s: &Str) -> (Option<Expr>, StrMap) {
        let map = StrMap::new(self.text, s.span.clone(), &s.value);
        match parse::parse_when(&s.value) {
            Ok(e) => (Some(e), map),
            Err(e) => {
                let at = map.offset(
                    &s.value,
                    Pos {
                        line: e.line,
                        column: e.column,
                    },
                );
                self.error(at, e.message);
                (None, map)
            }
        }
    }

    fn segment(&mut self, t: &dyn TableLike, header: usize) {
        const BLOCK: &str = "[[segment]]";
        self.known_keys(t, BLOCK, &["name", "when", "description", "groups"]);
        let name = self.string(t, "name", BLOCK, header, true);
        let description = self.string(t, "description", BLOCK, header, false).map(|d| d.value);
        let block = match &name {
            Some(n) => format!("segment `{}`", n.value),
            None => BLOCK.to_string(),
        };
        let when = self.string(t, "when", &block, header, true);
        if let Some(n) = &name {
            let taken = self.spec.segments.iter().any(|s| s.name == n.value);
            self.block_name(n, header, "segment", taken);
        }
        let (expr, map, source) = match when {
            Some(when) => {
                let (expr, map) = self.expression(&when);
                let map = expr.is_some().then_some(map);
                (expr, map, when.value)
            }
            None => (None, None, String::new()),
        };
        // A segment whose `when` is missing or did not parse stays as a
        // placeholder so that `in_segment` references to it are not
        // reported as unknown; the spec has an error anyway.
        let expr = expr.unwrap_or(Expr {
            kind: ExprKind::Bool(false),
            pos: Pos { line: 1, column: 1 },
        });
        let groups = match t.get("groups") {
            Some(g) => self.groups(g, Self::at(t, "groups", header)),
            None => Vec::new(),
        };
        self.spec.segments.push(Segment {
            name: name.map(|n| n.value).unwrap_or_default(),
            description,
            when: expr,
            source,
            groups,
        });
        self.segment_maps.push(map);
    }

    /// A segment's `groups`: an array of `{ name = "…", weight = N }`,
    /// names distinct and not empty, weights whole numbers from 1.
    fn groups(&mut self, item: &Item, at: usize) -> Vec<def::Group> {
        const SHAPE: &str =
            "`groups` must be an array such as [{ name = \"treatment\", weight = 90 }, { name = \"control\", weight = 10 }]";
        let Some(array) = item.as_array() else {
            self.error(at, SHAPE);
            return Vec::new();
        };
        let mut groups: Vec<def::Group> = Vec::new();
        for value in array.iter() {
            let value_at = value.span().map(|s| s.start).unwrap_or(at);
            let Some(g) = value.as_inline_table() else {
                self.error(value_at, SHAPE);
                continue;
            };
            for (key, _) in g.iter() {
                if key != "name" && key != "weight" {
                    self.error(
                        Self::at(g, key, value_at),
                        format!("unknown key `{key}` in a group (expected name and weight)"),
                    );
                }
            }
            let name = match g.get("name").and_then(|v| v.as_str()) {
                Some(n) if !n.is_empty() => n.to_string(),
                _ => {
                    self.error(Self::at(g, "name", value_at), "a group needs a `name`, a string that is not empty");
                    continue;
                }
            };
            if groups.iter().any(|h| h.name == name) {
                self.error(Self::at(g, "name", value_at), format!("duplicate group name `{name}`"));
                continue;
            }
            let weight = match g.get("weight").and_then(|v| v.as_integer()) {
                Some(w) if w >= 1 && w <= u32::MAX as i64 => w as u64,
                _ => {
                    self.error(
                        Self::at(g, "weight", value_at),
                        format!("group `{name}` needs a `weight`, a whole number from 1 (such as 90 for 90 in 100)"),
                    );
                    continue;
                }
            };
            groups.push(def::Group { name, weight });
        }
        if array.is_empty() {
            self.error(at, SHAPE);
        }
        groups
    }

    /// A `[[zone]]` (SPEC §4 "Places"): a `name` and either a `polygon` of
    /// `[lat, lon]` pairs (at least 3) or a `geojson` file (a Polygon, a
    /// MultiPolygon or a Feature of one, `[lon, lat]` positions).
    fn zone(&mut self, t: &dyn TableLike, header: usize) {
        const BLOCK: &str = "[[zone]]";
        self.known_keys(t, BLOCK, &["name", "polygon", "geojson"]);
        let name = self.string(t, "name", BLOCK, header, true);
        let Some(name) = name else { return };
        let taken = self.spec.zones.iter().any(|z| z.name == name.value);
        if !self.block_name(&name, header, "zone", taken) {
            return;
        }
        let rings = match (t.get("polygon"), self.string(t, "geojson", BLOCK, header, false)) {
            (Some(p), None) => self.polygon(p, Self::at(t, "polygon", header)),
            (None, Some(file)) => {
                let at = file.span.as_ref().map(|s| s.start).unwrap_or(header);
                let path = self.base.as_deref().unwrap_or(std::path::Path::new(".")).join(&file.value);
                match geojson_rings(&path) {
                    Ok(rings) => Some(rings),
                    Err(e) => {
                        self.error(at, format!("zone `{}`: {}: {e}", name.value, path.display()));
                        None
                    }
                }
            }
            _ => {
                self.error(
                    header,
                    format!(
                        "zone `{}` needs exactly one of `polygon` ([[lat, lon], …]) and `geojson` (a file)",
                        name.value
                    ),
                );
                None
            }
        };
        // A zone that did not load is still declared: `inside` naming it is
        // not reported as unknown on top of its own error.
        self.spec.zones.push(def::ZoneDef {
            name: name.value,
            rings: rings.unwrap_or_default(),
        });
    }

    /// `polygon = [[lat, lon], …]`: one ring of at least 3 points in range.
    fn polygon(&mut self, item: &Item, at: usize) -> Option<Vec<Vec<(f64, f64)>>> {
        const SHAPE: &str = "`polygon` must be an array of at least 3 [lat, lon] pairs in degrees, such as [[40.68, -74.02], [40.70, -73.90], [40.60, -73.95]]";
        let Some(points) = item.as_array() else {
            self.error(at, SHAPE);
            return None;
        };
        let mut ring = Vec::new();
        for p in points.iter() {
            let p_at = p.span().map(|s| s.start).unwrap_or(at);
            let pair: Option<Vec<f64>> = p.as_array().filter(|a| a.len() == 2).and_then(|a| {
                a.iter()
                    .map(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)))
                    .collect()
            });
            match pair.as_deref() {
                Some(&[lat, lon]) if lat.abs() <= 90.0 && lon.abs() <= 180.0 => ring.push((lat, lon)),
                Some(&[lat, lon]) => {
                    self.error(
                        p_at,
                        format!("[{lat}, {lon}] is not a place: latitude is -90 to 90, longitude -180 to 180 ([lat, lon] order)"),
                    );
                    return None;
                }
                _ => {
                    self.error(p_at, SHAPE);
                    return None;
                }
            }
        }
        if ring.len() < 3 {
            self.error(at, SHAPE);
            return None;
        }
        Some(vec![ring])
    }

    fn score(&mut self, t: &dyn TableLike, header: usize) {
        const BLOCK: &str = "[[score]]";
        self.known_keys(t, BLOCK, &["name", "expr"]);
        let name = self.string(t, "name", BLOCK, header, true);
        let expr = self.string(t, "expr", BLOCK, header, true);
        if let Some(n) = &name {
            let taken = self.spec.scores.iter().any(|s| s.name == n.value);
            self.block_name(n, header, "score", taken);
        }
        let Some(source) = expr else { return };
        if let (Some(e), map) = self.expression(&source) {
            self.spec.scores.push(ScoreDef {
                name: name.map(|n| n.value).unwrap_or_default(),
                expr: e,
                source: source.value,
            });
            self.score_maps.push(Some(map));
        }
    }

    fn rfm(&mut self, t: &dyn TableLike, header: usize) {
        const BLOCK: &str = "[rfm]";
        self.known_keys(t, BLOCK, &["purchase", "revenue", "window", "map"]);
        let mut ok = true;
        let purchase = self.string(t, "purchase", BLOCK, header, true);
        if let Some(p) = &purchase {
            if p.value.is_empty() {
                self.error(
                    p.span.clone().map(|s| s.start).unwrap_or(header),
                    "`purchase` in [rfm] cannot be empty",
                );
            }
        }
        let mut revenue = None;
        if let Some(r) = self.string(t, "revenue", BLOCK, header, true) {
            match parse::parse_path(&r.value) {
                Ok(p) => revenue = Some(p),
                Err(e) => {
                    let map = StrMap::new(self.text, r.span.clone(), &r.value);
                    let at = map.offset(
                        &r.value,
                        Pos {
                            line: e.line,
                            column: e.column,
                        },
                    );
                    self.error(
                        at,
                        format!(
                            "`revenue` in [rfm] must be a path such as revenue or properties.total: {}",
                            e.message
                        ),
                    );
                }
            }
        }
        let mut window = ast::Window::Lifetime;
        if let Some(w) = self.string(t, "window", BLOCK, header, false) {
            let errors = self.errors.len();
            self.duration(&w, "window", true);
            ok &= self.errors.len() == errors;
            if w.value != "lifetime" {
                if let Ok(ms) = crate::core::clock::parse_duration(&w.value) {
                    window = ast::Window::Dur(ms);
                }
            }
        }
        let grid = match t.get("map") {
            None => default_rfm_grid(),
            Some(m) => match m.as_table_like() {
                Some(m) => self.rfm_map(m, Self::at(t, "map", header)).unwrap_or_else(default_rfm_grid),
                None => {
                    let at = Self::at(t, "map", header);
                    self.error(at, "`map` in [rfm] must be a table of segment = [\"RF\", …] codes");
                    default_rfm_grid()
                }
            },
        };
        if let (Some(purchase), Some(revenue), true) = (purchase, revenue, ok) {
            self.spec.rfm = Some(RfmDef {
                purchase: purchase.value,
                revenue,
                window,
                grid,
            });
        }
    }

    /// `[rfm.map]`: each key a segment name, each value an array of two-
    /// character codes `RF`, each character a score 1–5 or `*` for any. The
    /// first entry (in file order) whose code matches a cell names it; every
    /// one of the 25 cells must be named.
    fn rfm_map(&mut self, m: &dyn TableLike, at: usize) -> Option<Vec<Vec<String>>> {
        let mut grid: Vec<Vec<Option<String>>> = vec![vec![None; 5]; 5];
        let mut ok = true;
        for (name, item) in m.iter() {
            let item_at = Self::at(m, name, at);
            let Some(codes) = item.as_array() else {
                self.error(
                    item_at,
                    format!("`{name}` in [rfm.map] must be an array of codes such as [\"55\", \"4*\"]"),
                );
                ok = false;
                continue;
            };
            for code in codes.iter() {
                let code_at = code.span().map(|s| s.start).unwrap_or(item_at);
                let digits: Option<Vec<Option<usize>>> = code.as_str().and_then(|c| {
                    (c.chars().count() == 2).then_some(())?;
                    c.chars()
                        .map(|ch| match ch {
                            '*' => Some(None),
                            '1'..='5' => Some(Some(ch as usize - '1' as usize)),
                            _ => None,
                        })
                        .collect()
                });
                let Some(d) = digits else {
                    self.error(
                        code_at,
                        "an RFM code is two characters, R then F, each 1 to 5 or * (any), as in \"55\" or \"1*\"",
                    );
                    ok = false;
                    continue;
                };
                for (r, row) in grid.iter_mut().enumerate() {
                    for (f, cell) in row.iter_mut().enumerate() {
                        if d[0].is_none_or(|x| x == r) && d[1].is_none_or(|x| x == f) && cell.is_none() {
                            *cell = Some(name.to_string());
                        }
                    }
                }
            }
        }
        if !ok {
            return None;
        }
        let missing: Vec<String> = (0..25)
            .filter(|i| grid[i / 5][i % 5].is_none())
            .map(|i| format!("{}{}", i / 5 + 1, i % 5 + 1))
            .collect();
        if !missing.is_empty() {
            self.error(
                at,
                format!("[rfm.map] names no segment for the (R, F) codes {}", missing.join(", ")),
            );
            return None;
        }
        Some(
            grid.into_iter()
                .map(|r| r.into_iter().map(|c| c.unwrap_or_default()).collect())
                .collect(),
        )
    }

    fn clustering(&mut self, t: &dyn TableLike, header: usize) {
        const BLOCK: &str = "[[clustering]]";
        self.known_keys(t, BLOCK, &["name", "k", "features", "refresh", "seed"]);
        let errors = self.errors.len();
        let mut def = ClusteringDef {
            name: String::new(),
            k: 1,
            features: Vec::new(),
            sources: Vec::new(),
            refresh: 0,
            seed: 0,
        };
        if let Some(n) = self.string(t, "name", BLOCK, header, true) {
            let taken = self.spec.clusterings.iter().any(|c| c.name == n.value);
            self.block_name(&n, header, "clustering", taken);
            def.name = n.value;
        }
        if let Some(k) = self.integer(t, "k", BLOCK, header, true) {
            if !(1..=1000).contains(&k) {
                let at = Self::at(t, "k", header);
                self.error(at, "`k` in [[clustering]] must be between 1 and 1000");
            }
            def.k = k.clamp(1, 1000) as usize;
        }
        if let Some(s) = self.integer(t, "seed", BLOCK, header, false) {
            if s < 0 {
                let at = Self::at(t, "seed", header);
                self.error(at, "`seed` in [[clustering]] must not be negative");
            }
            def.seed = s.max(0) as u64;
        }
        if let Some(r) = self.string(t, "refresh", BLOCK, header, true) {
            self.duration(&r, "refresh", false);
            def.refresh = crate::core::clock::parse_duration(&r.value).unwrap_or(0);
        }
        let (features, sources, maps) = self.features(t, BLOCK, header);
        def.features = features;
        def.sources = sources;
        // A block with errors is still kept (so that `cluster.NAME` is not
        // also reported unknown); the spec fails anyway.
        let _ = errors;
        self.spec.clusterings.push(def);
        self.feature_maps.push(maps);
    }

    /// The `features` array of a `[[clustering]]` or `[[model]]`: the
    /// expressions that parsed, as written, with their maps.
    fn features(&mut self, t: &dyn TableLike, block: &str, header: usize) -> (Vec<Expr>, Vec<String>, Vec<StrMap>) {
        let (mut exprs, mut sources, mut maps) = (Vec::new(), Vec::new(), Vec::new());
        match t.get("features") {
            None => self.error(header, format!("{block} has no `features`")),
            Some(item) => {
                let at = Self::at(t, "features", header);
                match item.as_array() {
                    None => self.error(at, format!("`features` in {block} must be an array of expressions")),
                    Some(arr) => {
                        if arr.is_empty() {
                            self.error(at, format!("`features` in {block} must not be empty"));
                        }
                        for v in arr.iter() {
                            let Some(s) = v.as_str() else {
                                self.error(v.span().map(|s| s.start).unwrap_or(at), "each feature must be a string expression");
                                continue;
                            };
                            let s = Str {
                                value: s.to_string(),
                                span: v.span(),
                            };
                            let (Some(e), map) = self.expression(&s) else { continue };
                            exprs.push(e);
                            sources.push(s.value);
                            maps.push(map);
                        }
                    }
                }
            }
        }
        (exprs, sources, maps)
    }

    /// A number in `range` (an integer is read as a float), or `default`
    /// when absent.
    fn fraction(&mut self, t: &dyn TableLike, key: &str, block: &str, header: usize, default: f64, valid: (&str, fn(f64) -> bool)) -> f64 {
        let Some(item) = t.get(key) else { return default };
        let at = Self::at(t, key, header);
        match item.as_float().or_else(|| item.as_integer().map(|i| i as f64)) {
            Some(x) if valid.1(x) => x,
            Some(_) => {
                self.error(at, format!("`{key}` in {block} must be {}", valid.0));
                default
            }
            None => {
                self.error(at, format!("`{key}` in {block} must be a number"));
                default
            }
        }
    }

    fn model(&mut self, t: &dyn TableLike, header: usize) {
        const BLOCK: &str = "[[model]]";
        self.known_keys(t, BLOCK, &["name", "label", "horizon", "features", "refresh", "l2", "sample"]);
        let mut def = ModelDef {
            name: String::new(),
            label: Expr {
                kind: ast::ExprKind::Bool(false),
                pos: Pos::default(),
            },
            label_source: String::new(),
            horizon: 0,
            features: Vec::new(),
            sources: Vec::new(),
            refresh: 0,
            l2: 1.0,
            sample: 1.0,
        };
        if let Some(n) = self.string(t, "name", BLOCK, header, true) {
            let taken = self.spec.models.iter().any(|m| m.name == n.value);
            self.block_name(&n, header, "model", taken);
            def.name = n.value;
        }
        let mut label_map = None;
        if let Some(label) = self.string(t, "label", BLOCK, header, true) {
            let (expr, map) = self.expression(&label);
            if let Some(e) = expr {
                def.label = e;
                def.label_source = label.value;
                label_map = Some(map);
            }
        }
        for (key, slot) in [("horizon", &mut def.horizon), ("refresh", &mut def.refresh)] {
            if let Some(d) = self.string(t, key, BLOCK, header, true) {
                self.duration(&d, key, false);
                *slot = crate::core::clock::parse_duration(&d.value).unwrap_or(0);
            }
        }
        def.l2 = self.fraction(t, "l2", BLOCK, header, 1.0, ("a positive number", |x| x > 0.0 && x.is_finite()));
        def.sample = self.fraction(
            t,
            "sample",
            BLOCK,
            header,
            1.0,
            ("a share above 0 and at most 1", |x| x > 0.0 && x <= 1.0),
        );
        let (features, sources, maps) = self.features(t, BLOCK, header);
        def.features = features;
        def.sources = sources;
        self.spec.models.push(def);
        self.model_maps.push((label_map, maps));
    }

    fn finish(mut self) -> Result<Spec, Vec<SpecError>> {
        for issue in check::check(&mut self.spec, self.tick_ms) {
            let (map, source) = match issue.origin {
                check::Origin::Segment(i) => (self.segment_maps[i].as_ref(), &self.spec.segments[i].source),
                check::Origin::Score(i) => (self.score_maps[i].as_ref(), &self.spec.scores[i].source),
                check::Origin::Feature(c, i) => (Some(&self.feature_maps[c][i]), &self.spec.clusterings[c].sources[i]),
                check::Origin::Label(m) => (self.model_maps[m].0.as_ref(), &self.spec.models[m].label_source),
                check::Origin::ModelFeature(m, i) => (Some(&self.model_maps[m].1[i]), &self.spec.models[m].sources[i]),
            };
            let Some(map) = map else { continue };
            let at = map.offset(
                source,
                Pos {
                    line: issue.error.line,
                    column: issue.error.column,
                },
            );
            let (line, column) = file_pos(self.text, at);
            self.errors.push(SpecError {
                line,
                column,
                message: issue.error.message,
            });
        }
        if self.errors.is_empty() {
            Ok(self.spec)
        } else {
            self.errors.sort_by_key(|e| (e.line, e.column));
            self.errors.dedup();
            Err(self.errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(text: &str) -> Vec<String> {
        match parse_spec(text, 1000) {
            Ok(spec) => panic!("parsed: {spec:?}"),
            Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    const EXAMPLE: &str = r#"
[[segment]]
name = "high_intent_price_sensitive"
description = "Viewed 3+ products in 48h, carted, did not buy"
when = """
  count('Product Viewed', 48h) >= 3
  and count('Product Added', 48h) >= 1
  and count('Order Completed', 48h) == 0
"""

[[segment]]
name = "premium_new_york"
when = "trait.plan == 'premium' and trait.city == 'New York'"

[[segment]]
name = "pricing"
when = 'count(page "pricing", 1h) >= 2 and distinct(any, session, 1h) >= 2'

[[segment]]
name = "readers"
when = "count(page where scroll_pct >= 75, 1h) >= 1"

[[segment]]
name = "mobile"
when = "last(any, context.device.type) == 'mobile'"

[[segment]]
name = "buyer"
when = "count('buy', lifetime) >= 1 and since('buy') > 30s"

[[segment]]
name = "small"
when = "not (avg('buy', amount, lifetime) > 5)"

[[segment]]
name = "browsing"
when = "count(any, 1m) >= 2 and not in_segment('buyer')"

[[segment]]
name = "exact"
when = "sum('buy', amount, lifetime) == 0.3"
"#;

    #[test]
    fn parses_the_examples() {
        let spec = parse_spec(EXAMPLE, 1000).unwrap_or_else(|e| panic!("{e:?}"));
        let names: Vec<&str> = spec.segments.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "high_intent_price_sensitive",
                "premium_new_york",
                "pricing",
                "readers",
                "mobile",
                "buyer",
                "small",
                "browsing",
                "exact"
            ]
        );
        assert_eq!(
            spec.segments[0].description.as_deref(),
            Some("Viewed 3+ products in 48h, carted, did not buy")
        );
        assert!(spec.segments[0].source.starts_with("  count('Product Viewed'"));
        assert!(spec.scores.is_empty() && spec.rfm.is_none() && spec.clusterings.is_empty());
    }

    #[test]
    fn when_errors_map_into_multiline_strings() {
        let text = "# a spec\n\n[[segment]]\nname = \"x\"\nwhen = \"\"\"\n  count('a', 1h) >= 1\n  and  plan == 'x'\n\"\"\"\n";
        // `plan` is on line 7 of the file, column 8.
        assert_eq!(
            errs(text),
            ["7:8: unknown name `plan`; did you mean trait.plan or a quoted string?"]
        );
        // The same in a single-line basic string with escapes before the error.
        let text = "[[segment]]\nname = \"x\"\nwhen = \"count(\\\"a\\\", 1h) >= 'b'\"\n";
        assert_eq!(errs(text), ["3:9: cannot compare a number with a string"]);
        let text = "[[segment]]\nname = \"x\"\nwhen = \"count(\\\"a\\\", 1h) >= 1 and zz\"\n";
        assert_eq!(errs(text), ["3:35: unknown name `zz`; did you mean trait.zz or a quoted string?"]);
        // Literal multi-line string, type error on its second line.
        let text = "[[segment]]\nname = \"x\"\nwhen = '''\ncount('a', 1h) >= 1 and\n    count('b', 1h) == '2'\n'''\n";
        assert_eq!(errs(text), ["5:5: cannot compare a number with a string"]);
        // Line-ending backslash in a multi-line basic string.
        let text = "[[segment]]\nname = \"x\"\nwhen = \"\"\"count('a', 1h) >= 1 and \\\n      count('b', 1500ms) > 1\"\"\"\n";
        assert_eq!(errs(text), ["4:7: window 1500ms is not a multiple of the tick 1s"]);
    }

    #[test]
    fn groups_are_read_and_checked() {
        let spec = parse_spec(
            "[[segment]]\nname = \"s\"\nwhen = \"true\"\ngroups = [{ name = \"treatment\", weight = 90 }, { name = \"control\", weight = 10 }]\n",
            1000,
        )
        .unwrap();
        let names: Vec<(&str, u64)> = spec.segments[0].groups.iter().map(|g| (g.name.as_str(), g.weight)).collect();
        assert_eq!(names, [("treatment", 90), ("control", 10)]);
        let bad = |groups: &str| errs(&format!("[[segment]]\nname = \"s\"\nwhen = \"true\"\ngroups = {groups}\n"));
        assert_eq!(
            bad("\"a\"")[0],
            "4:10: `groups` must be an array such as [{ name = \"treatment\", weight = 90 }, { name = \"control\", weight = 10 }]"
        );
        assert!(bad("[]")[0].contains("must be an array such as"));
        assert_eq!(
            bad("[{ name = \"a\", weight = 0 }]")[0],
            "4:34: group `a` needs a `weight`, a whole number from 1 (such as 90 for 90 in 100)"
        );
        assert!(bad("[{ name = \"a\", weight = 1.5 }]")[0].contains("needs a `weight`"));
        assert!(bad("[{ name = \"a\" }]")[0].contains("needs a `weight`"));
        assert!(bad("[{ weight = 3 }]")[0].contains("a group needs a `name`"));
        assert!(bad("[{ name = \"a\", weight = 1 }, { name = \"a\", weight = 2 }]")[0].contains("duplicate group name `a`"));
        assert!(bad("[{ name = \"a\", weight = 1, size = 2 }]")[0].contains("unknown key `size` in a group"));
    }

    #[test]
    fn zones_are_read_from_polygons_and_geojson_files_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write(
            "park.geojson",
            r#"{"type":"Feature","geometry":{"type":"Polygon","coordinates":[
                [[0,0],[10,0],[10,10],[0,10],[0,0]], [[4,4],[6,4],[6,6],[4,6],[4,4]]]}}"#,
        );
        write(
            "two.geojson",
            r#"{"type":"MultiPolygon","coordinates":[[[[0,0],[1,0],[1,1]]],[[[5,5],[6,5],[6,6]]]]}"#,
        );
        write("line.geojson", r#"{"type":"LineString","coordinates":[[0,0],[1,1]]}"#);
        write("swapped.geojson", r#"{"type":"Polygon","coordinates":[[[0,0],[0,100],[1,100]]]}"#);
        write("broken.geojson", r#"{"type":"Polygon","#);
        let spec = |zones: &str| {
            let text = format!("{zones}\n[[segment]]\nname = \"s\"\nwhen = \"inside(trait.lat, trait.lon, 'park')\"\n");
            parse_spec_in(&text, 1000, Some(dir.path()))
        };
        let ok = spec("[[zone]]\nname = \"park\"\ngeojson = \"park.geojson\"\n").unwrap();
        let park = &ok.zones[0];
        assert_eq!(park.rings.len(), 2);
        // [lon, lat] in the file, (lat, lon) here; the hole is not inside.
        assert!(park.contains(2.0, 3.0) && !park.contains(5.0, 5.0) && !park.contains(11.0, 5.0));
        let poly = spec("[[zone]]\nname = \"park\"\npolygon = [[0, 0], [0, 10], [10, 10.5]]\n").unwrap();
        assert_eq!(poly.zones[0].rings, [vec![(0.0, 0.0), (0.0, 10.0), (10.0, 10.5)]]);
        let two = spec("[[zone]]\nname = \"park\"\ngeojson = \"two.geojson\"\n").unwrap();
        assert_eq!(two.zones[0].rings.len(), 2);
        let err = |zones: &str| spec(zones).unwrap_err().into_iter().map(|e| e.to_string()).collect::<Vec<_>>();
        let file = |f: &str| dir.path().join(f).display().to_string();
        assert_eq!(
            err("[[zone]]\nname = \"park\"\ngeojson = \"line.geojson\"\n"),
            [format!(
                "3:11: zone `park`: {}: expected a Polygon, a MultiPolygon or a Feature of one, found LineString",
                file("line.geojson")
            )]
        );
        assert!(err("[[zone]]\nname = \"park\"\ngeojson = \"swapped.geojson\"\n")[0].contains("GeoJSON is [lon, lat]: longitude first"));
        assert!(err("[[zone]]\nname = \"park\"\ngeojson = \"broken.geojson\"\n")[0].contains("broken.geojson: not JSON"));
        assert!(err("[[zone]]\nname = \"park\"\ngeojson = \"none.geojson\"\n")[0].contains("none.geojson: cannot read it"));
        assert!(err("[[zone]]\nname = \"park\"\npolygon = [[0, 0], [1, 1]]\n")[0].contains("at least 3 [lat, lon] pairs"));
        assert!(err("[[zone]]\nname = \"park\"\npolygon = [[0, 0], [1, 1], [100, 1]]\n")[0].contains("[100, 1] is not a place"));
        assert!(err("[[zone]]\nname = \"park\"\n")[0].contains("exactly one of `polygon`"));
        let unknown = spec("[[zone]]\nname = \"garden\"\npolygon = [[0, 0], [0, 1], [1, 1]]\n").unwrap_err();
        assert_eq!(unknown[0].to_string(), "7:9: unknown zone 'park': declare it in a [[zone]] block");
    }

    #[test]
    fn now_read_through_a_score_is_checked_where_it_lands() {
        let spec = |when: &str| {
            format!(
                "[[score]]\nname = \"days\"\nexpr = \"(now - time(trait.signup)) / 1d\"\n\
                 [[score]]\nname = \"weeks\"\nexpr = \"score.days / 7\"\n\
                 [[segment]]\nname = \"s\"\nwhen = \"{when}\"\n"
            )
        };
        assert!(parse_spec(&spec("score.days >= 30 and score.weeks < 8"), 1000).is_ok());
        for bad in ["abs(score.days - 30) < 2", "score.weeks * score.days > 2", "1 / score.weeks > 2"] {
            let e = errs(&spec(bad));
            assert!(e[0].contains("conditions on now must move one way with the clock"), "{bad}: {e:?}");
        }
    }

    #[test]
    fn distances_are_haversine_on_the_mean_radius() {
        // New York to London, about 5570 km; a degree of latitude 111.195 km.
        let d = distance_km(40.7128, -74.0060, 51.5074, -0.1278).unwrap();
        assert!((d - 5570.2).abs() < 1.0, "{d}");
        let degree = distance_km(0.0, 0.0, 1.0, 0.0).unwrap();
        assert!((degree - 6371.0088 * std::f64::consts::PI / 180.0).abs() < 1e-9, "{degree}");
        assert_eq!(distance_km(10.0, 20.0, 10.0, 20.0), Some(0.0));
        assert_eq!(distance_km(91.0, 0.0, 0.0, 0.0), None);
        assert_eq!(distance_km(0.0, 0.0, 0.0, -180.5), None);
    }

    #[test]
    fn every_member_lands_in_one_group_by_weight() {
        // Over many ids the shares follow the weights (90/10 within a point).
        let groups = [
            Group {
                name: "treatment".into(),
                weight: 90,
            },
            Group {
                name: "control".into(),
                weight: 10,
            },
        ];
        let control = (0..20_000)
            .filter(|i| group_of("s", &groups, &format!("user:u{i}")) == Some("control"))
            .count();
        assert!((1_800..2_200).contains(&control), "{control} of 20000 in control");
        assert_eq!(group_of("s", &[], "user:u1"), None);
        // The segment's name is part of the hash: another segment splits otherwise.
        let same = (0..1_000).filter(|i| {
            let id = format!("user:u{i}");
            group_of("s", &groups, &id) == group_of("t", &groups, &id)
        });
        assert!(same.count() < 1_000);
    }

    #[test]
    fn structure_errors() {
        assert_eq!(
            errs("[[segment]]\nname = \"a\"\nwhen = \"true\"\ncolour = 1\n"),
            ["4:1: unknown key `colour` in [[segment]] (expected `name`, `when`, `description`, `groups`)"]
        );
        assert_eq!(
            errs("segments = 1\n"),
            ["1:1: unknown key `segments` (expected [[segment]], [[score]], [rfm], [[clustering]], [[model]] or [[zone]])"]
        );
        assert_eq!(errs("[[segment]]\nwhen = \"true\"\n"), ["1:1: [[segment]] has no `name`"]);
        assert_eq!(errs("[[segment]]\nname = \"a\"\n"), ["1:1: segment `a` has no `when`"]);
        assert_eq!(
            errs("[[segment]]\nname = 3\nwhen = \"true\"\n"),
            ["2:8: `name` in [[segment]] must be a string"]
        );
        assert_eq!(
            errs("[segment]\nname = \"a\"\n"),
            ["1:1: `segment` must be an array of tables: write [[segment]]"]
        );
        assert_eq!(
            errs("[[segment]]\nname = \"a\"\nwhen = \"true\"\n[[segment]]\nname = \"a\"\nwhen = \"true\"\n"),
            ["5:8: duplicate segment name `a`"]
        );
        assert_eq!(
            errs("[[segment]]\nname = \"\"\nwhen = \"true\"\n"),
            ["2:8: a segment's `name` cannot be empty"]
        );
        // A TOML syntax error has its position.
        let e = errs("[[segment]]\nname = \"a\"\nwhen = \n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("3:8: TOML: "), "{e:?}");
        // Inline array of tables is the same thing.
        let spec = parse_spec("segment = [{ name = \"a\", when = \"true\" }]\n", 1000).unwrap();
        assert_eq!(spec.segments[0].name, "a");
    }

    #[test]
    fn check_errors_are_all_reported_in_order() {
        let text = r#"
[[segment]]
name = "a"
when = "in_segment('b') and count('x', 1500ms) > 1"

[[segment]]
name = "b"
when = "in_segment('a') or in_segment('nope') or since('x') and true"
"#;
        assert_eq!(
            errs(text),
            [
                "4:9: cycle: a -> b -> a",
                "4:29: window 1500ms is not a multiple of the tick 1s",
                "8:28: unknown segment 'nope' in in_segment('nope')",
                "8:50: since(…) can only be compared with a constant duration, as in since('Order Completed') > 30d",
            ]
        );
        // A segment whose `when` does not parse still exists for in_segment.
        let text = "[[segment]]\nname = \"a\"\nwhen = \"count(\"\n[[segment]]\nname = \"b\"\nwhen = \"in_segment('a')\"\n";
        assert_eq!(errs(text).len(), 1);
        let text = "[[segment]]\nname = \"a\"\n[[segment]]\nname = \"b\"\nwhen = \"in_segment('a')\"\n";
        assert_eq!(errs(text), ["1:1: segment `a` has no `when`"]);
    }

    #[test]
    fn scoring_blocks_are_read() {
        let text = r#"[[segment]]
name = "s"
when = "score.engagement > 10 and rfm.segment == 'champions' and cluster.behavior == 1"

[[score]]
name = "engagement"
expr = "10 * count('Order Completed', 30d) + 5 * count('Email Opened', 30d)"

[rfm]
purchase = "Order Completed"
revenue = "revenue"
window = "365d"

[[clustering]]
name = "behavior"
k = 4
features = ["count(page, 1h)", "avg(page, dwell_ms, 1h)", "avg(page, scroll_pct, 1h)"]
refresh = "1h"
seed = 7
"#;
        let spec = parse_spec(text, 1000).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(spec.scores[0].name, "engagement");
        let rfm = spec.rfm.as_ref().unwrap();
        assert_eq!(rfm.purchase, "Order Completed");
        assert_eq!(rfm.revenue, ast::Path(vec!["properties".into(), "revenue".into()]));
        assert_eq!(rfm.window, ast::Window::Dur(365 * 86_400_000));
        assert_eq!(rfm.grid, default_rfm_grid());
        let c = &spec.clusterings[0];
        assert_eq!(
            (c.name.as_str(), c.k, c.refresh, c.seed, c.features.len()),
            ("behavior", 4, 3_600_000, 7, 3)
        );
    }

    #[test]
    fn the_default_rfm_grid_is_the_spec_table() {
        let g = default_rfm_grid();
        assert_eq!(g[0], g[1]);
        assert_eq!(g[0][4], "cant_lose");
        assert_eq!(g[2][3], "loyal_customers");
        assert_eq!(g[3][0], "promising");
        assert_eq!(g[4][0], "new_customers");
        assert_eq!(g[4][3], "champions");
    }

    #[test]
    fn rfm_maps() {
        let text =
            "[rfm]\npurchase = \"buy\"\nrevenue = \"amount\"\n[rfm.map]\nbest = [\"55\", \"45\"]\nrecent = [\"5*\"]\nrest = [\"**\"]\n";
        let spec = parse_spec(text, 1000).unwrap_or_else(|e| panic!("{e:?}"));
        let g = &spec.rfm.unwrap().grid;
        assert_eq!(
            (g[4][4].as_str(), g[3][4].as_str(), g[4][0].as_str(), g[0][0].as_str()),
            ("best", "best", "recent", "rest")
        );
        assert_eq!(spec_errs_rfm_map("best = [\"55\"]"), ["4:1: [rfm.map] names no segment for the (R, F) codes 11, 12, 13, 14, 15, 21, 22, 23, 24, 25, 31, 32, 33, 34, 35, 41, 42, 43, 44, 45, 51, 52, 53, 54"]);
        assert_eq!(
            spec_errs_rfm_map("best = [\"56\"]"),
            ["5:9: an RFM code is two characters, R then F, each 1 to 5 or * (any), as in \"55\" or \"1*\""]
        );
    }

    fn spec_errs_rfm_map(entry: &str) -> Vec<String> {
        errs(&format!("[rfm]\npurchase = \"buy\"\nrevenue = \"amount\"\n[rfm.map]\n{entry}\n"))
    }

    #[test]
    fn scoring_errors() {
        let text = r#"[[segment]]
name = "s"
when = "score.nope > 10 or cluster.c == 1"

[[score]]
name = "a"
expr = "score.b + 1"

[[score]]
name = "b"
expr = "score.a * 2"

[[clustering]]
name = "c"
k = 0
features = ["count(page, 1h)", "percentile(count(page, 1h), 5)", "avg(page scroll_pct, 1h)"]
refresh = "1500ms"
"#;
        assert_eq!(
            errs(text),
            [
                "3:9: unknown score `nope`: define it in a [[score]] block",
                "7:9: scores read each other in a cycle: a, b",
                "15:5: `k` in [[clustering]] must be between 1 and 1000",
                "16:33: percentile(…) cannot be used in a clustering feature: it is computed over all profiles from event terms",
                "16:76: expected `,` after the events of avg(…), found `scroll_pct`",
                "17:11: refresh 1500ms is not a multiple of the tick 1s",
            ]
        );
        let text = "[[score]]\nname = \"e\"\nexpr = \"count('x', 1h) > \"\n[rfm]\npurchase = \"x\"\nrevenue = \"r\"\nwindow = \"1500ms\"\n";
        assert_eq!(
            errs(text),
            [
                "3:26: expected an expression, found the end of the expression",
                "7:10: window 1500ms is not a multiple of the tick 1s",
            ]
        );
    }

    #[test]
    fn load_names_the_file() {
        let e = load(std::path::Path::new("/nonexistent/spec.toml"), 1000).unwrap_err();
        assert_eq!((e[0].line, e[0].column), (0, 0));
        assert!(e[0].message.contains("/nonexistent/spec.toml"), "{e:?}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        assert_eq!(load(&path, 1000).unwrap().segments.len(), 9);
    }

    #[test]
    fn compile_when_for_the_api() {
        assert!(compile_when("count('x', 1h) > 1 and in_segment('a')", 1000, &|n| n == "a", &[]).is_ok());
        let e = compile_when("count('x', 1h) > 1 and\n in_segment('b')", 1000, &|n| n == "a", &[]).unwrap_err();
        assert_eq!(e[0].to_string(), "2:2: unknown segment 'b' in in_segment('b')");
    }

    #[test]
    fn model_blocks_are_checked_where_they_are_written() {
        let text = r#"
[[model]]
name = "m"
label = "count('buy', 1d)"
horizon = "1d"
features = ["predict.m", "count('x', 1h)", "now - time(trait.t)"]
refresh = "1d"
l2 = 0
sample = 1.5

[[model]]
name = "n"
label = "in_segment('s') or percentile(count('x', 1h), 50) > 1"
features = ["count('x', 1h)"]
refresh = "1d"

[[segment]]
name = "s"
when = "predict.nope > 0.5 or predict.m > 'a'"
"#;
        assert_eq!(
            errs(text),
            [
                "4:10: a model's `label` must be a condition (true or false), not a number",
                "6:14: predict.m cannot be used in a model's feature: it is computed over all profiles from event terms",
                "6:45: now cannot be used in a model's feature: it is computed over all profiles from event terms",
                "6:45: this expression must be a number, not a duration",
                "8:6: `l2` in [[model]] must be a positive number",
                "9:10: `sample` in [[model]] must be a share above 0 and at most 1",
                "11:1: [[model]] has no `horizon`",
                "13:10: in_segment(…) cannot be used in a model's label: it is computed over all profiles from event terms",
                "13:29: percentile(…) cannot be used in a model's label: it is computed over all profiles from event terms",
                "19:9: unknown model `nope`: define it in a [[model]] block",
                "19:31: cannot compare a number with a string",
            ]
        );
        let ok = parse_spec(include_str!("../../dataflows/predictions.toml"), 1000).expect("the bundled spec");
        let m = &ok.models[1];
        assert_eq!(
            (m.name.as_str(), m.horizon, m.refresh, m.l2, m.sample),
            ("churn_14d", 14 * 86_400_000, 86_400_000, 1.0, 0.5)
        );
        assert_eq!(m.features.len(), 5);
    }
}
