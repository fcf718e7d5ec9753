//! The shape of `src/`: one folder per stage, imports only downward.
//!
//! [`LAYERS`] is the one table of the stages, bottom first. The test reads
//! every file under `src/` and fails when
//!
//! - a file is outside the table's folders (besides `lib.rs` and `main.rs`);
//! - a module refers (`crate::stage::…`) to a stage later in the table;
//! - the modules of one stage import each other in a cycle;
//! - `lib.rs` does not declare the stages in the table's order.
//!
//! Unit tests (`#[cfg(test)]` modules at the end of a file) may use anything:
//! they are leaves, nothing imports them. Comments and doc links are not
//! imports. A reference is read as `crate::stage::module`, so grouped roots
//! (`use crate::{a, b}`) are refused: they would hide a stage from this test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The stages in data order, bottom first: each may import only itself and
/// the stages before it.
const LAYERS: &[(&str, &str)] = &[
    ("core", "shared vocabulary: values, the clock, ids and keys, facts"),
    ("spec", "dataflow specs: TOML and the `when` language, parsed and checked"),
    ("plan", "a checked spec as shared streams, terms, atoms and formulas"),
    ("ingest", "lines to stamped events: decode, select, dedupe, clock, identity links"),
    ("generate", "realistic synthetic traffic"),
    ("dataflow", "everything inside timely workers, from facts to memberships"),
    ("output", "lines, their delivery, the sink operator"),
    ("io", "files, stdin, Kafka"),
    ("serve", "the served model and the HTTP API"),
    ("run", "jobs, workers, readers, checkpoints, progress"),
];

/// A file's stage and module: `src/dataflow/terms.rs` is `("dataflow", "terms")`.
fn module_of(src: &Path, file: &Path) -> Option<(String, String)> {
    let rel = file.strip_prefix(src).ok()?;
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    match parts.as_slice() {
        [_single] => None,
        [stage, rest @ ..] => {
            let module = rest.join("/").trim_end_matches(".rs").to_string();
            Some((stage.clone(), module))
        }
        [] => None,
    }
}

/// The code of a file without comments and without its unit-test modules
/// (`#[cfg(test)] mod … { … }`, wherever they are).
fn code(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| match l.find("//") {
            // A `//` inside a string literal ("http://…") is rare here;
            // a line whose `//` follows a quote is kept whole.
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect();
    let text = lines.join("\n");
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let is_mod = after["#[cfg(test)]".len()..].trim_start().starts_with("mod ");
        let Some(open) = after.find('{').filter(|_| is_mod) else {
            out.push_str("#[cfg(test)]");
            rest = &after["#[cfg(test)]".len()..];
            continue;
        };
        let mut depth = 0usize;
        let mut end = after.len();
        for (j, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + j + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Every `crate::a::b` in `code`, as `(a, b)` (`b` empty for `crate::a`);
/// a group `crate::a::{b, c::d}` gives `(a, b)` and `(a, c)`.
fn references(code: &str) -> Vec<(String, String)> {
    let word = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let first = word(after);
        let tail = &after[first.len()..];
        match tail.strip_prefix("::") {
            Some(group) if group.starts_with('{') => {
                let inner = &group[1..group.find('}').unwrap_or(group.len())];
                for item in inner.split(',') {
                    out.push((first.clone(), word(item.trim())));
                }
            }
            Some(more) => out.push((first.clone(), word(more))),
            None => out.push((first.clone(), String::new())),
        }
        rest = after;
    }
    out
}

/// Whether `name` is a module of `stage` (a file or folder in it), not an
/// item its `mod.rs` declares.
fn is_module(src: &Path, stage: &str, name: &str) -> bool {
    src.join(stage).join(format!("{name}.rs")).exists() || src.join(stage).join(name).join("mod.rs").exists()
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn imports_only_go_down_the_stages_and_never_in_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rank: BTreeMap<&str, usize> = LAYERS.iter().enumerate().map(|(i, (name, _))| (*name, i)).collect();
    let mut all = Vec::new();
    files(&src, &mut all);
    all.sort();
    let mut problems = Vec::new();
    // Within a stage: module -> modules it imports.
    let mut edges: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for file in &all {
        let name = file.strip_prefix(&src).unwrap().display().to_string();
        let text = std::fs::read_to_string(file).unwrap();
        let Some((stage, module)) = module_of(&src, file) else {
            if name != "lib.rs" && name != "main.rs" {
                problems.push(format!("{name}: a file outside every stage's folder"));
            }
            continue;
        };
        let Some(&mine) = rank.get(stage.as_str()) else {
            problems.push(format!("{name}: folder {stage} is not a stage of LAYERS"));
            continue;
        };
        let code = code(&text);
        if code.contains("crate::{") {
            problems.push(format!("{name}: a grouped `crate::{{…}}` import; name each stage's path"));
        }
        // `super::` from a stage's mod.rs, or `super::super::` from one of
        // its modules, is the crate root: read it as `crate::`. What is left
        // of `super::` then names a sibling.
        let root = if module == "mod" { "super::" } else { "super::super::" };
        let code = code.replace(root, "crate::");
        let refs = references(&code);
        let mine_edges = edges.entry((stage.clone(), module.clone())).or_default();
        for (to, sub) in refs {
            match rank.get(to.as_str()) {
                Some(&theirs) if theirs > mine => {
                    problems.push(format!("{name}: {stage} imports {to}::{sub}, a later stage"));
                }
                Some(_) if to == stage && !sub.is_empty() => {
                    // A module, or an item of the stage's mod.rs.
                    let target = if is_module(&src, &stage, &sub) { sub } else { "mod".to_string() };
                    if target != module {
                        mine_edges.insert(target);
                    }
                }
                Some(_) => {}
                None if to.is_empty() => {}
                None => problems.push(format!("{name}: crate::{to} is not a stage")),
            }
        }
        // A stage's mod.rs may name its modules by relative paths (`check::x`).
        if module == "mod" {
            let dir = src.join(&stage);
            for entry in std::fs::read_dir(&dir).unwrap() {
                let child = entry.unwrap().path();
                let name = child.file_stem().unwrap().to_string_lossy().into_owned();
                let relative = format!("{name}::");
                let used = code.match_indices(&relative).any(|(i, _)| {
                    let before = code[..i].chars().next_back();
                    !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
                });
                if name != "mod" && used && is_module(&src, &stage, &name) {
                    mine_edges.insert(name);
                }
            }
        }
        // `super::x` inside a stage's module is its sibling x, or an item
        // of the stage's mod.rs.
        if module != "mod" {
            for (i, _) in code.match_indices("super::") {
                let after = &code[i + "super::".len()..];
                let names: Vec<String> = match after.strip_prefix('{') {
                    Some(group) => group[..group.find('}').unwrap_or(group.len())]
                        .split(',')
                        .map(|w| w.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect())
                        .collect(),
                    None => vec![after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()],
                };
                for word in names.into_iter().filter(|w: &String| !w.is_empty()) {
                    let target = if is_module(&src, &stage, &word) { word } else { "mod".to_string() };
                    if target != module {
                        mine_edges.insert(target);
                    }
                }
            }
        }
    }
    // Cycles among the modules of each stage.
    for ((stage, module), _) in edges.iter() {
        let mut path = vec![module.clone()];
        if let Some(cycle) = cycle_from(&edges, stage, module, &mut path) {
            problems.push(format!("{stage}: modules import each other in a cycle: {}", cycle.join(" -> ")));
        }
    }
    problems.sort();
    problems.dedup();
    assert!(problems.is_empty(), "the layering of src/ is broken:\n{}", problems.join("\n"));
}

/// A cycle back to `path[0]` through the stage's module edges, if any.
fn cycle_from(edges: &BTreeMap<(String, String), BTreeSet<String>>, stage: &str, at: &str, path: &mut Vec<String>) -> Option<Vec<String>> {
    let next = edges.get(&(stage.to_string(), at.to_string()))?;
    for n in next {
        if *n == path[0] {
            let mut c = path.clone();
            c.push(n.clone());
            return Some(c);
        }
        if path.contains(n) {
            continue;
        }
        path.push(n.clone());
        if let Some(c) = cycle_from(edges, stage, n, path) {
            return Some(c);
        }
        path.pop();
    }
    None
}

#[test]
fn lib_declares_the_stages_in_order() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let declared: Vec<&str> = lib.lines().filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';')).collect();
    let want: Vec<&str> = LAYERS.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        declared, want,
        "src/lib.rs declares the stages of tests/architecture.rs, in its order"
    );
}

/// The checker itself: an upward import and a cycle are found.
#[test]
fn the_checker_finds_an_upward_import_and_a_cycle() {
    assert_eq!(
        references("use crate::run::job::Job;\nlet x = crate::core::value::Value::Missing;"),
        vec![("run".to_string(), "job".to_string()), ("core".to_string(), "value".to_string())]
    );
    assert_eq!(
        code("use a; // crate::run\n#[cfg(test)]\nmod tests { use crate::run; }\nuse b;"),
        "use a; \n\nuse b;"
    );
    assert_eq!(
        references("use crate::run::{job::Job, EngineError};"),
        vec![
            ("run".to_string(), "job".to_string()),
            ("run".to_string(), "EngineError".to_string())
        ]
    );
    let mut edges = BTreeMap::new();
    edges.insert(("x".to_string(), "a".to_string()), BTreeSet::from(["b".to_string()]));
    edges.insert(("x".to_string(), "b".to_string()), BTreeSet::from(["a".to_string()]));
    assert_eq!(
        cycle_from(&edges, "x", "a", &mut vec!["a".to_string()]),
        Some(vec!["a".into(), "b".into(), "a".into()])
    );
    edges.insert(("x".to_string(), "b".to_string()), BTreeSet::new());
    assert_eq!(cycle_from(&edges, "x", "a", &mut vec!["a".to_string()]), None);
}
