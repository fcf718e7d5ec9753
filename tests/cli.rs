//! The command line as users meet it: `check` errors with line and column and
//! exit 2, runtime I/O failures exit 1 naming the file, stdin input, the
//! generator's determinism, and every spec in `dataflows/` checked and run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn shoal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_spec(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("spec.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_accepts_every_shipped_spec() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dataflows");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            let o = shoal().arg("check").arg(&p).output().unwrap();
            assert!(o.status.success(), "{}: {}", p.display(), stderr(&o));
            n += 1;
        }
    }
    assert!(n >= 3);
}

#[test]
fn check_reports_line_and_column_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(
        dir.path(),
        "[[segment]]\nname = \"a\"\nwhen = \"count('x', 1h) >= 'three'\"\n\n[[segment]]\nname = \"b\"\nwhen = \"in_segment('nope')\"\n",
    );
    let o = shoal().arg("check").arg(&spec).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("spec.toml:3:"), "{err}");
    assert!(err.contains("string"), "{err}");
    assert!(err.contains("spec.toml:7:") && err.contains("nope"), "{err}");
}

#[test]
fn check_refuses_windows_off_the_tick() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), "[[segment]]\nname = \"a\"\nwhen = \"count('x', 1500ms) >= 1\"\n");
    let o = shoal().arg("check").arg(&spec).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a multiple of the tick"), "{}", stderr(&o));
    let o = shoal().arg("check").arg(&spec).args(["--tick", "500ms"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn scoring_names_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), "[[segment]]\nname = \"a\"\nwhen = \"score.nope >= 1 and rfm.r == 5\"\n");
    let check = shoal().arg("check").arg(&spec).output().unwrap();
    let run = shoal().arg("run").arg(&spec).args(["--input", "/dev/null"]).output().unwrap();
    for o in [check, run] {
        assert_eq!(o.status.code(), Some(2));
        assert!(stderr(&o).contains("3:9: unknown score `nope`"), "{}", stderr(&o));
        assert!(stderr(&o).contains("rfm.r needs an [rfm] block"), "{}", stderr(&o));
    }
}

#[test]
fn flags_that_would_do_nothing_are_refused_naming_what_they_need() {
    // SPEC §6: nothing given is silently ignored.
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("dataflows/retail.toml");
    for (flag, needs) in [
        (&["--webhook-format", "segment"][..], "--output-webhook"),
        (&["--webhook-timeout", "5s"], "--output-webhook"),
        (&["--checkpoint-every", "1s"], "--state"),
        (&["--kafka-group", "g"], "--kafka-topic"),
        (&["--kafka-partition-idle", "2s"], "--kafka-topic"),
        (&["--kafka-option", "a=b"], "--kafka-topic"),
    ] {
        let o = shoal()
            .arg("run")
            .arg(&spec)
            .args(["--generate", "10", "--output", "/dev/null"])
            .args(flag)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{flag:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needs), "{flag:?}: {}", stderr(&o));
    }
}

#[test]
fn dead_letters_on_stderr_append_to_its_log() {
    // `2>>log`: the default dead letters go to the stderr given, not to
    // /dev/stderr opened again (which truncated the log).
    let dir = tempfile::tempdir().unwrap();
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("dataflows/retail.toml");
    let log = dir.path().join("shoal.log");
    std::fs::write(&log, "kept from before\n").unwrap();
    let appending = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    let mut child = shoal()
        .arg("run")
        .arg(&spec)
        .args(["--input", "-", "--output", "/dev/null"])
        .stdin(Stdio::piped())
        .stderr(Stdio::from(appending))
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"not json\n").unwrap();
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("kept from before\n"), "{text}");
    assert!(text.contains("not JSON") && text.contains("\"events_read\":1"), "{text}");
}

#[test]
fn a_missing_input_exits_1_naming_it() {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("dataflows/retail.toml");
    let o = shoal()
        .arg("run")
        .arg(&spec)
        .args(["--input", "/no/such/events.jsonl"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/no/such/events.jsonl"), "{}", stderr(&o));
}

#[test]
fn an_output_that_cannot_be_written_exits_1_naming_it_once() {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("dataflows/retail.toml");
    let o = shoal()
        .arg("run")
        .arg(&spec)
        .args(["--generate", "100", "--output", "/no/such/dir/changes.jsonl"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("cannot write /no/such/dir/changes.jsonl: "), "{err}");
    // The OS's reason once: the typed error carries it in its message, not
    // again as a cause that the report would repeat.
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
}

#[test]
fn stdin_is_read_when_piped_and_bad_lines_never_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), "[[segment]]\nname = \"seen\"\nwhen = \"count(any, lifetime) >= 1\"\n");
    let mut child = shoal()
        .arg("run")
        .arg(&spec)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"garbage\n{\"type\":\"track\",\"event\":\"x\",\"userId\":\"u\",\"timestamp\":\"2024-01-01T00:00:01Z\"}\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "{\"time\":\"2024-01-01T00:00:01Z\",\"segment\":\"seen\",\"profile\":\"user:u\",\"change\":\"enter\"}\n"
    );
    let err = stderr(&o);
    assert!(
        err.contains("\"reason\":\"not JSON"),
        "the dead letter goes to stderr by default: {err}"
    );
    assert!(err.contains("\"bad\":1") && err.contains("\"accepted\":1"), "summary: {err}");
}

#[test]
fn generate_is_deterministic_for_a_seed() {
    let gen = |seed: &str| {
        shoal()
            .args(["generate", "--events", "3000", "--seed", seed])
            .output()
            .unwrap()
            .stdout
    };
    let (a, b, c) = (gen("5"), gen("5"), gen("6"));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a.iter().filter(|&&b| b == b'\n').count(), 3000);
}

#[test]
fn every_shipped_spec_finds_members_in_generated_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let o = shoal()
        .args(["generate", "--events", "30000", "--users", "800", "--output"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(o.status.success());
    let specs = Path::new(env!("CARGO_MANIFEST_DIR")).join("dataflows");
    for name in ["retail.toml", "saas_leads.toml", "email_lifecycle.toml", "engagement.toml"] {
        let spec = shoal::spec::load(&specs.join(name), 1000).unwrap();
        let o = shoal()
            .arg("run")
            .arg(specs.join(name))
            .arg("--input")
            .arg(&input)
            .args(["--dead-letter", "/dev/null"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        let entered: std::collections::BTreeSet<&str> = out
            .lines()
            .filter(|l| l.ends_with("\"enter\"}"))
            .map(|l| l.split("\"segment\":\"").nth(1).unwrap().split('"').next().unwrap())
            .collect();
        // Lapsing/dormant segments need months of silence; everything else shows up within the week generated.
        let slow = ["at_risk_customer", "dormant", "lapsing"];
        for seg in &spec.segments {
            if !slow.contains(&seg.name.as_str()) {
                assert!(entered.contains(seg.name.as_str()), "{name}: nobody entered {}", seg.name);
            }
        }
    }
}

#[test]
fn live_stdin_clock_follows_wall_time_when_idle() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), "[[segment]]\nname = \"active\"\nwhen = \"count(any, 2s) >= 1\"\n");
    let mut child = shoal()
        .arg("run")
        .arg(&spec)
        .args(["--input", "-", "--lateness", "0s", "--idle", "200ms", "--dead-letter", "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"{\"type\":\"track\",\"event\":\"x\",\"userId\":\"u\",\"timestamp\":\"2024-01-01T00:00:10Z\"}\n")
        .unwrap();
    stdin.flush().unwrap();
    // With stdin still open and nothing more sent, the window must still expire.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap());
        }
    });
    let first = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the enter line comes while input is open");
    assert!(
        first.contains("\"time\":\"2024-01-01T00:00:10Z\"") && first.contains("enter"),
        "{first}"
    );
    let second = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the exit comes from the clock following wall time");
    assert!(
        second.contains("\"time\":\"2024-01-01T00:00:12Z\"") && second.contains("exit"),
        "{second}"
    );
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_live_run_whose_output_cannot_be_written_stops_and_says_so() {
    // /dev/full fails every write. Input stays open: before, the run went on
    // reading (and would have committed Kafka offsets and checkpoints past
    // the lost changes) and named the error only when stopped.
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), "[[segment]]\nname = \"active\"\nwhen = \"count(any, 2s) >= 1\"\n");
    let mut child = shoal()
        .arg("run")
        .arg(&spec)
        .args([
            "--input",
            "-",
            "--lateness",
            "0s",
            "--idle",
            "200ms",
            "--output",
            "/dev/full",
            "--dead-letter",
            "/dev/null",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"{\"type\":\"track\",\"event\":\"x\",\"userId\":\"u\",\"timestamp\":\"2024-01-01T00:00:10Z\"}\n")
        .unwrap();
    stdin.flush().unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the run went on with its output failing");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    drop(stdin);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("cannot write output"), "{err}");
}

#[test]
fn nothing_after_until_is_written_even_when_the_clock_runs_past_it() {
    // More lines than one read batch, so the dataflow runs while the clock
    // passes --until; a window expiring after it must not show.
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), "[[segment]]\nname = \"quiet\"\nwhen = \"count(any, 10s) < 1\"\n");
    let mut input = String::new();
    let base = 1_704_067_200_000u64;
    input.push_str(&format!(
        "{{\"type\":\"track\",\"userId\":\"once\",\"timestamp\":{base},\"event\":\"view\",\"messageId\":\"first\"}}\n"
    ));
    for i in 0..10_000u64 {
        let t = base + 1_000 + i * 10;
        input.push_str(&format!(
            "{{\"type\":\"track\",\"userId\":\"busy\",\"timestamp\":{t},\"event\":\"view\",\"messageId\":\"m{i}\"}}\n"
        ));
    }
    let path = dir.path().join("events.jsonl");
    std::fs::write(&path, input).unwrap();
    let until = (base + 5_000).to_string();
    let o = shoal()
        .args(["run"])
        .arg(&spec)
        .arg("--input")
        .arg(&path)
        .args(["--until", &until, "--lateness", "0s"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out, "", "\"once\" leaves its window at 10s, after --until");
    let summary: serde_json::Value = serde_json::from_str(stderr(&o).lines().last().unwrap()).unwrap();
    assert_eq!(summary["clock"], "2024-01-01T00:00:05Z");
}

#[test]
fn generate_at_a_rate_piped_into_run_is_live() {
    // `shoal generate --rate N | shoal run SPEC --input -`: changes come out
    // while the generator is still writing, not only at its end.
    use std::io::{BufRead, BufReader};
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("dataflows/retail.toml");
    let mut gen = shoal()
        .args(["generate", "--events", "4000", "--users", "200", "--rate", "1000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut run = shoal()
        .arg("run")
        .arg(&spec)
        .args(["--input", "-", "--idle", "200ms", "--dead-letter", "/dev/null"])
        .stdin(gen.stdout.take().unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let mut out = BufReader::new(run.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let first_at = started.elapsed();
    assert!(first.contains("\"change\""), "{first}");
    assert!(
        gen.try_wait().unwrap().is_none(),
        "the first change came after {first_at:?}, while the generator still ran"
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(gen.wait().unwrap().success());
    let o = run.wait_with_output().unwrap();
    assert!(o.status.success());
    let summary: serde_json::Value = serde_json::from_str(stderr(&o).lines().last().unwrap()).unwrap();
    assert_eq!(summary["events_read"], 4000);
    assert_eq!(summary["diffs_written"].as_u64().unwrap() as usize, 1 + rest.lines().count());
}

#[test]
fn history_is_a_usage_error_without_http_and_its_help_teaches_the_cost() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), "[[segment]]\nname = \"a\"\nwhen = \"count('x', 1h) >= 1\"\n");
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "").unwrap();
    let o = shoal()
        .arg("run")
        .arg(&spec)
        .arg("--input")
        .arg(&input)
        .args(["--history", "2h"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--http"), "{}", stderr(&o));
    let o = shoal().args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    let history = &help[help.find("--history").expect("--history in --help")..];
    for words in ["all", "memory on process 0", "longest window"] {
        assert!(history.contains(words), "{words} in {history}");
    }
}
