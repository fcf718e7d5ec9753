//! Durability through the binary: checkpoints (`--state`), restart after
//! SIGKILL with byte-identical output, a corrupt checkpoint skipped, a
//! checkpoint of another spec refused, and a checkpoint directory that is
//! full or read-only (a real tmpfs, mounted in a user namespace).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};

fn shoal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
}

fn spec(name: &str) -> String {
    format!("{}/dataflows/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Generated events (two seeds, so some are late and some duplicates
/// cross over), with a bad line between them.
fn events(path: &Path, events: u64) {
    let gen = |seed: &str, start: &str| {
        let out = shoal()
            .args([
                "generate",
                "--events",
                &events.to_string(),
                "--users",
                "3000",
                "--seed",
                seed,
                "--start",
                start,
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        out.stdout
    };
    let mut bytes = gen("1", "2024-01-01T00:00:00Z");
    bytes.extend_from_slice(b"not json\n");
    bytes.extend(gen("9", "2024-01-02T00:00:00Z"));
    std::fs::write(path, bytes).unwrap();
}

/// `shoal run SPEC --input IN --output OUT --dead-letter DEAD [extra]`.
fn run_cmd(spec_name: &str, dir: &Path, input: &str, extra: &[&str]) -> Command {
    let mut c = shoal();
    c.args(["run", &spec(spec_name), "--input", input])
        .arg("--output")
        .arg(dir.join("out.jsonl"))
        .arg("--dead-letter")
        .arg(dir.join("dead.jsonl"))
        .args(extra)
        .current_dir(dir);
    c
}

/// Kills `child` with SIGKILL if it is still running (`None`); else its
/// summary line, as [`finished_summary`] checks it.
fn kill_or_summary(mut child: std::process::Child) -> Option<String> {
    if child.try_wait().unwrap().is_none() {
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        return None;
    }
    Some(finished_summary(child))
}

/// Waits for `child` (stderr piped) to end; it must succeed without ever
/// finding a torn checkpoint. Returns its summary line.
fn finished_summary(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("unusable"), "no checkpoint is ever torn: {stderr}");
    stderr.lines().last().unwrap().to_string()
}

/// An uninterrupted run without checkpoints: (output, dead letters, summary line).
fn reference(spec_name: &str, input: &Path) -> (Vec<u8>, Vec<u8>, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = run_cmd(spec_name, dir.path(), input.to_str().unwrap(), &[]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = String::from_utf8_lossy(&out.stderr).lines().last().unwrap().to_string();
    (
        std::fs::read(dir.path().join("out.jsonl")).unwrap(),
        std::fs::read(dir.path().join("dead.jsonl")).unwrap(),
        summary,
    )
}

#[test]
fn sigkill_at_random_moments_leaves_the_output_byte_identical() {
    let data = tempfile::tempdir().unwrap();
    let input = data.path().join("events.jsonl");
    events(&input, 100_000);
    let (want_out, want_dead, want_summary) = reference("engagement.toml", &input);
    assert!(want_out.len() > 100_000 && !want_dead.is_empty());

    // A checkpoint at every batch (4096 lines) at which the output moved.
    // Runs start afresh until enough kills have landed: how many a run
    // takes depends on the machine's speed, not on what is checked.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (mut kills, mut resumed_mid_run, mut runs) = (0, 0, 0);
    let (dir, state) = loop {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let args = ["--state", state.to_str().unwrap(), "--checkpoint-every", "1ms"];
        let summary = loop {
            let before = common::newest_checkpoint(&state);
            if before.is_some() {
                resumed_mid_run += 1;
            }
            let mut child = run_cmd("engagement.toml", dir.path(), input.to_str().unwrap(), &args)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // Half the kills come after the run made progress (a new
            // checkpoint), at a random moment up to 80 ms after it; the
            // others at a random moment up to 250 ms after the start (while
            // resuming, reading, or writing a checkpoint).
            if rng.gen_ratio(1, 2) {
                common::wait_for_checkpoint(&mut child, &state, &before);
                std::thread::sleep(Duration::from_millis(rng.gen_range(0..80)));
            } else {
                std::thread::sleep(Duration::from_millis(rng.gen_range(0..250)));
            }
            match kill_or_summary(child) {
                Some(summary) => break summary,
                None => kills += 1,
            }
        };
        runs += 1;
        let got_out = std::fs::read(dir.path().join("out.jsonl")).unwrap();
        assert!(got_out == want_out, "output differs after {kills} kills in {runs} runs");
        assert_eq!(
            std::fs::read(dir.path().join("dead.jsonl")).unwrap(),
            want_dead,
            "dead letters differ"
        );
        assert_eq!(summary, want_summary, "the summary counts every event once");
        if (kills >= 20 && resumed_mid_run >= 10) || runs == 10 {
            break (dir, state);
        }
    };
    let args = ["--state", state.to_str().unwrap(), "--checkpoint-every", "1ms"];
    eprintln!("{kills} kills, {resumed_mid_run} resumes from a checkpoint, {runs} runs to the end");
    assert!(kills >= 20, "only {kills} kills in {runs} runs");
    assert!(resumed_mid_run >= 10, "only {resumed_mid_run} resumes from a checkpoint");

    // Running the same command again resumes at the end: nothing changes.
    let again = run_cmd("engagement.toml", dir.path(), input.to_str().unwrap(), &args)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(std::fs::read(dir.path().join("out.jsonl")).unwrap() == want_out);
}

#[test]
fn a_corrupt_newest_checkpoint_is_skipped_for_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    events(&input, 20_000);
    let (want_out, want_dead, _) = reference("retail.toml", &input);
    let state = dir.path().join("state");
    let args = ["--state", state.to_str().unwrap(), "--checkpoint-every", "1ms"];
    let first = run_cmd("retail.toml", dir.path(), input.to_str().unwrap(), &args).output().unwrap();
    assert!(first.status.success());
    // The newest (the end of the run) loses its last byte; the one before
    // is from the middle of the run, which is where the second run resumes.
    let newest = common::newest_checkpoint(&state).unwrap();
    let len = std::fs::metadata(&newest).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    // Lines past what the older checkpoint covers are cut back.
    std::fs::write(dir.path().join("out.jsonl"), [&want_out[..], b"garbage\n"].concat()).unwrap();
    let second = run_cmd("retail.toml", dir.path(), input.to_str().unwrap(), &args).output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert!(stderr.contains("is unusable (truncated"), "{stderr}");
    assert!(
        stderr.contains(newest.file_name().unwrap().to_str().unwrap()),
        "names the file: {stderr}"
    );
    assert!(std::fs::read(dir.path().join("out.jsonl")).unwrap() == want_out);
    assert_eq!(std::fs::read(dir.path().join("dead.jsonl")).unwrap(), want_dead);
}

#[test]
fn a_checkpoint_of_another_spec_or_tick_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    events(&input, 2_000);
    let state = dir.path().join("state");
    let st = ["--state", state.to_str().unwrap()];
    assert!(run_cmd("retail.toml", dir.path(), input.to_str().unwrap(), &st)
        .output()
        .unwrap()
        .status
        .success());
    let before = std::fs::read(dir.path().join("out.jsonl")).unwrap();
    let other = run_cmd("saas_leads.toml", dir.path(), input.to_str().unwrap(), &st)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert_eq!(other.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("was made for a different spec"), "{stderr}");
    let tick = run_cmd(
        "retail.toml",
        dir.path(),
        input.to_str().unwrap(),
        &[&st[..], &["--tick", "2s"]].concat(),
    )
    .output()
    .unwrap();
    assert_eq!(tick.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&tick.stderr).contains("--tick"));
    assert_eq!(
        std::fs::read(dir.path().join("out.jsonl")).unwrap(),
        before,
        "a refused run writes nothing"
    );
}

#[test]
fn a_checkpoint_of_another_generator_size_is_refused() {
    // `--generate N`'s stream depends on N (users, time spread): resuming
    // one size's checkpoint with another would read on at a byte offset of
    // another stream.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let run = |n: &str| {
        shoal()
            .args([
                "run",
                &spec("retail.toml"),
                "--generate",
                n,
                "--dead-letter",
                "/dev/null",
                "--output",
            ])
            .arg(dir.path().join(format!("out-{n}.jsonl")))
            .arg("--state")
            .arg(&state)
            .output()
            .unwrap()
    };
    assert!(run("1000").status.success());
    let other = run("2000");
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert_eq!(other.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("different input") && stderr.contains("events: 2000"), "{stderr}");
}

#[test]
fn state_needs_input_that_can_be_read_again_and_a_usable_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = shoal()
        .args(["run", &spec("retail.toml"), "--input", "-", "--state"])
        .arg(dir.path().join("s"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be read again"));

    let input = dir.path().join("events.jsonl");
    events(&input, 100);
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let out = run_cmd(
        "retail.toml",
        dir.path(),
        input.to_str().unwrap(),
        &["--state", not_a_dir.to_str().unwrap()],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("checkpoint directory {}", not_a_dir.display())),
        "{stderr}"
    );
}

/// Runs `script` with `sh` as root of a new user and mount namespace, where
/// it may mount a tmpfs; `None` when this machine has no user namespaces.
fn in_namespace(script: &str) -> Option<std::process::Output> {
    let probe = Command::new("unshare").args(["-Urm", "true"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: `unshare -Urm` is not available here, so no tmpfs can be mounted");
        return None;
    }
    Some(Command::new("unshare").args(["-Urm", "sh", "-ec", script]).output().unwrap())
}

#[test]
fn a_full_or_read_only_state_directory_is_reported_and_the_last_good_checkpoint_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    events(&dir.path().join("a.jsonl"), 3_000);
    events(&dir.path().join("more.jsonl"), 3_000);
    let bin = env!("CARGO_BIN_EXE_shoal");
    let retail = spec("retail.toml");
    // In a tmpfs of 8 MiB: run once (checkpoints fit), fill the disk, append
    // events and run again (every checkpoint write fails), then make it
    // read-only and run a third time (refused at start).
    let script = format!(
        r#"
        cd {d}; mkdir state; mount -t tmpfs -o size=8m tmpfs state
        run() {{ {bin} run {retail} --input events.jsonl --output out.jsonl --dead-letter dead.jsonl --state state --checkpoint-every 1ms; }}
        cp a.jsonl events.jsonl
        run 2> first.err
        ls state > first.ls; cat state/*.shoal | md5sum > first.sum
        dd if=/dev/zero of=state/filler bs=4k 2>/dev/null || true
        cat more.jsonl >> events.jsonl
        run 2> second.err; echo $? > second.code
        ls state > second.ls; cat state/*.shoal | md5sum > second.sum
        mount -o remount,ro state
        run 2> third.err || echo $? > third.code
        "#
    );
    let Some(out) = in_namespace(&script) else { return };
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        read("first.err")
    );
    assert_eq!(
        read("second.code").trim(),
        "0",
        "a failed checkpoint does not stop the run: {}",
        read("second.err")
    );
    let second = read("second.err");
    assert!(second.contains("No space left on device"), "{second}");
    assert!(second.contains("the last good checkpoint is kept"), "{second}");
    assert!(
        second.contains("checkpoint directory state: cannot write checkpoint state/ckpt-"),
        "names the file: {second}"
    );
    assert_eq!(read("first.ls").replace("filler\n", ""), read("second.ls").replace("filler\n", ""));
    assert_eq!(read("first.sum"), read("second.sum"), "the checkpoints are untouched");
    assert!(!read("second.ls").contains(".tmp"), "no torn temporary file is left");
    assert_eq!(read("third.code").trim(), "1");
    assert!(read("third.err").contains("Read-only file system"), "{}", read("third.err"));

    // The second run's output is what a healthy directory gives for the
    // same two runs.
    let healthy = tempfile::tempdir().unwrap();
    let h = healthy.path();
    std::fs::copy(dir.path().join("a.jsonl"), h.join("events.jsonl")).unwrap();
    let st = ["--state", "state"];
    assert!(run_cmd("retail.toml", h, "events.jsonl", &st).output().unwrap().status.success());
    let mut all = std::fs::read(h.join("events.jsonl")).unwrap();
    all.extend(std::fs::read(dir.path().join("more.jsonl")).unwrap());
    std::fs::write(h.join("events.jsonl"), all).unwrap();
    assert!(run_cmd("retail.toml", h, "events.jsonl", &st).output().unwrap().status.success());
    assert_eq!(
        std::fs::read(h.join("out.jsonl")).unwrap(),
        std::fs::read(dir.path().join("out.jsonl")).unwrap()
    );
}

/// Timers, funnels, zones and groups (SPEC §4) survive SIGKILL exactly:
/// runs of `saas_lifecycle.toml` (timers, funnels) and
/// `retail_journeys.toml` (groups, places, funnels) and `predictions.toml`
/// (models: snapshots set aside for refreshes to come) with a checkpoint at
/// every batch, killed at random moments until one reaches the end, give
/// the uninterrupted run's output byte for byte.
#[test]
fn sigkill_keeps_timers_funnels_places_groups_and_models_exact() {
    let data = tempfile::tempdir().unwrap();
    let input = data.path().join("events.jsonl");
    events(&input, 30_000);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(14);
    // predictions.toml: the models' snapshots and fits live in the checkpoints.
    for spec_name in ["saas_lifecycle.toml", "retail_journeys.toml", "predictions.toml"] {
        let (want_out, _, want_summary) = reference(spec_name, &input);
        assert!(want_out.len() > 10_000, "{spec_name} writes changes");
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let args = ["--state", state.to_str().unwrap(), "--checkpoint-every", "1ms"];
        let mut kills = 0;
        let summary = loop {
            let before = common::newest_checkpoint(&state);
            let mut child = run_cmd(spec_name, dir.path(), input.to_str().unwrap(), &args)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            if kills < 8 {
                common::wait_for_checkpoint(&mut child, &state, &before);
                std::thread::sleep(Duration::from_millis(rng.gen_range(0..60)));
                match kill_or_summary(child) {
                    Some(summary) => break summary,
                    None => kills += 1,
                }
            } else {
                break finished_summary(child);
            }
        };
        eprintln!("{spec_name}: {kills} kills");
        assert!(kills >= 1, "{spec_name}: the run ended before any kill");
        assert!(
            std::fs::read(dir.path().join("out.jsonl")).unwrap() == want_out,
            "{spec_name}: output differs after {kills} kills"
        );
        assert_eq!(summary, want_summary, "{spec_name}: the summary counts every event once");
    }
}

/// A cluster of 2 processes × 2 workers over one state directory: random
/// processes SIGKILLed at random moments (the other stops by itself), all
/// started again, and the output is still the uninterrupted run's, byte
/// for byte.
#[test]
fn sigkill_of_any_process_of_a_cluster_leaves_the_output_byte_identical() {
    let data = tempfile::tempdir().unwrap();
    let input = data.path().join("events.jsonl");
    events(&input, 60_000);
    let (want_out, want_dead, want_summary) = reference("engagement.toml", &input);
    common::cluster_runs(17, |_, rng| {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let lives = common::cluster_until_done(dir.path(), &state, 12, rng, |process, hostfile| {
            run_cmd(
                "engagement.toml",
                dir.path(),
                input.to_str().unwrap(),
                &["--checkpoint-every", "1ms"],
            )
            .args([
                "--workers",
                "2",
                "--processes",
                "2",
                "--connect-timeout",
                "5s",
                "--process",
                &process.to_string(),
            ])
            .arg("--hostfile")
            .arg(hostfile)
            .arg("--state")
            .arg(&state)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        });
        let got = std::fs::read(dir.path().join("out.jsonl")).unwrap();
        assert!(got == want_out, "the output differs after {} kills", lives.kills);
        assert_eq!(
            std::fs::read(dir.path().join("dead.jsonl")).unwrap(),
            want_dead,
            "dead letters differ"
        );
        assert_eq!(
            lives.last.lines().last().unwrap(),
            want_summary,
            "the summary counts every event once"
        );
        lives
    });
}
