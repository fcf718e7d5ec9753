//! The conformance cases of `tests/conformance/` (copied from the contract),
//! run through the real `shoal` binary with 1 and 2 workers: the output must
//! equal `expected.jsonl` byte for byte and the dead letters must number
//! `expected-dead-letters`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("spec.toml").is_file())
        .collect();
    cases.sort();
    assert!(cases.len() >= 15, "conformance cases are missing from {}", root.display());
    cases
}

fn run_case(case: &Path, workers: usize) -> Result<(), String> {
    let tmp = tempfile::tempdir().unwrap();
    let (out, dead) = (tmp.path().join("out.jsonl"), tmp.path().join("dead.jsonl"));
    let args = std::fs::read_to_string(case.join("args")).unwrap();
    let result = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .current_dir(case)
        .args(["run", "spec.toml", "--input", "events.jsonl", "--output"])
        .arg(&out)
        .arg("--dead-letter")
        .arg(&dead)
        .args(args.split_whitespace())
        .args(["--workers", &workers.to_string()])
        .output()
        .unwrap();
    if !result.status.success() {
        return Err(format!("exit {:?}: {}", result.status, String::from_utf8_lossy(&result.stderr)));
    }
    let expected = std::fs::read_to_string(case.join("expected.jsonl")).unwrap();
    let got = std::fs::read_to_string(&out).unwrap_or_default();
    if got != expected {
        return Err(format!("output differs\n--- expected\n{expected}--- got\n{got}"));
    }
    let want_dead: usize = std::fs::read_to_string(case.join("expected-dead-letters"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let got_dead = std::fs::read_to_string(&dead)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .count();
    if got_dead != want_dead {
        return Err(format!("{got_dead} dead letters, expected {want_dead}"));
    }
    Ok(())
}

fn run_all(workers: usize) {
    let failures: Vec<String> = cases()
        .iter()
        .filter_map(|c| {
            run_case(c, workers)
                .err()
                .map(|e| format!("{}: {e}", c.file_name().unwrap().to_string_lossy()))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} case(s) failed with {workers} worker(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn conformance_one_worker() {
    run_all(1);
}

#[test]
fn conformance_two_workers() {
    run_all(2);
}
