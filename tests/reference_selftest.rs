//! The reference evaluator against the hand-worked conformance cases: before
//! it judges the engine, it must agree with every case in tests/conformance.

mod reference;

use std::fs;
use std::path::{Path, PathBuf};

use reference::{evaluate, evaluate_sparse, RefOptions};
use shoal::clock::{parse_duration_or_zero, parse_time_arg};

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance");
    let mut dirs: Vec<PathBuf> = fs::read_dir(&root)
        .expect("tests/conformance")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("spec.toml").is_file())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no conformance case under {}", root.display());
    dirs
}

/// The flags of a case's `args` file.
fn options(args: &str) -> RefOptions {
    let mut opts = RefOptions::default();
    let words: Vec<&str> = args.split_whitespace().collect();
    let mut i = 0;
    while i < words.len() {
        let value = words.get(i + 1).unwrap_or_else(|| panic!("{} needs a value", words[i]));
        let duration = || parse_duration_or_zero(value).unwrap_or_else(|e| panic!("{}: {e}", words[i]));
        match words[i] {
            "--until" => opts.until = Some(parse_time_arg(value).unwrap_or_else(|e| panic!("--until: {e}"))),
            "--tick" => opts.tick = duration(),
            "--lateness" => opts.lateness = duration(),
            "--dedupe-horizon" => opts.dedupe_horizon = duration(),
            other => panic!("unknown flag {other}"),
        }
        i += 2;
    }
    opts
}

#[test]
fn reference_agrees_with_every_conformance_case() {
    let mut failures = Vec::new();
    for dir in cases() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{name}/{f}: {e}"));
        let opts = options(&read("args"));
        let spec = shoal::spec::parse_spec(&read("spec.toml"), opts.tick).unwrap_or_else(|e| panic!("{name}/spec.toml: {e:?}"));
        let input = fs::read(dir.join("events.jsonl")).unwrap();
        let expected: Vec<String> = read("expected.jsonl").lines().map(str::to_owned).collect();
        let expected_dead: usize = read("expected-dead-letters").trim().parse().expect("a count");

        for (how, out) in [
            ("dense", evaluate(&spec, &input, &opts)),
            ("sparse", evaluate_sparse(&spec, &input, &opts)),
        ] {
            if out.lines != expected || out.dead != expected_dead {
                failures.push(format!(
                    "{name} ({how}): dead {} (expected {expected_dead})\n--- expected\n{}\n--- reference\n{}",
                    out.dead,
                    expected.join("\n"),
                    out.lines.join("\n")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
