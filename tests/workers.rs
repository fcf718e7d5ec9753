//! The output never depends on the number of workers or processes (SPEC's one
//! rule above all): the same generated traffic through every spec in
//! `dataflows/` with 1, 2 and 4 worker threads and with 2 processes × 2
//! workers on 127.0.0.1 (and retail with 4 processes × 1 worker) gives
//! byte-identical output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn shoal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "shoal failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn generated(dir: &Path, events: u64) -> PathBuf {
    let path = dir.join("events.jsonl");
    ok(shoal()
        .args([
            "generate",
            "--events",
            &events.to_string(),
            "--users",
            "400",
            "--seed",
            "11",
            "--output",
        ])
        .arg(&path)
        .output()
        .unwrap());
    path
}

fn specs() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dataflows");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    assert!(v.len() >= 3);
    v
}

fn run(spec: &Path, input: &Path, extra: &[&str]) -> String {
    let out = ok(shoal()
        .arg("run")
        .arg(spec)
        .arg("--input")
        .arg(input)
        .args(["--output", "-", "--dead-letter", "/dev/null"])
        .args(extra)
        .output()
        .unwrap());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn threads_do_not_change_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = generated(dir.path(), 12_000);
    for spec in specs() {
        let one = run(&spec, &input, &["--workers", "1"]);
        assert!(
            one.lines().count() > 50,
            "{} wrote too little to compare: {}",
            spec.display(),
            one.lines().count()
        );
        for w in ["2", "4"] {
            let many = run(&spec, &input, &["--workers", w]);
            assert!(one == many, "{} differs between 1 and {w} workers", spec.display());
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `spec` over `input` on a loopback cluster of `processes` × `workers`;
/// process 0's output.
fn cluster(spec: &Path, input: &Path, processes: usize, workers: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let hostfile = dir.path().join("hosts");
    let hosts: String = (0..processes).map(|_| format!("127.0.0.1:{}\n", free_port())).collect();
    std::fs::write(&hostfile, hosts).unwrap();
    let out_path = dir.path().join("out.jsonl");
    let children: Vec<_> = (0..processes)
        .map(|i| {
            shoal()
                .arg("run")
                .arg(spec)
                .arg("--input")
                .arg(input)
                .arg("--output")
                .arg(&out_path)
                .args(["--dead-letter", "/dev/null", "--workers", &workers.to_string()])
                .args(["--processes", &processes.to_string(), "--process", &i.to_string(), "--hostfile"])
                .arg(&hostfile)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children.into_iter().rev() {
        ok(child.wait_with_output().unwrap());
    }
    std::fs::read_to_string(&out_path).unwrap()
}

#[test]
fn processes_do_not_change_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = generated(dir.path(), 10_000);
    for spec in specs() {
        let single = run(&spec, &input, &["--workers", "1"]);
        assert!(single.lines().count() > 50, "{} wrote too little to compare", spec.display());
        assert!(
            single == cluster(&spec, &input, 2, 2),
            "{}: 2 processes × 2 workers differ from 1 worker",
            spec.display()
        );
    }
    // Four processes of one worker on loopback: every exchange crosses a
    // socket.
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("dataflows/retail.toml");
    let single = run(&spec, &input, &["--workers", "1"]);
    assert!(
        single == cluster(&spec, &input, 4, 1),
        "4 processes × 1 worker differ from 1 worker"
    );
}
