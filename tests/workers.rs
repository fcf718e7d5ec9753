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
        // The id graph spread over the workers gives the same profiles.
        let spread = run(&spec, &input, &["--workers", "4", "--identity", "partitioned"]);
        assert!(one == spread, "{} differs with the id graph partitioned", spec.display());
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

/// The identity labels of `events` through retail.toml on `workers`
/// embedded workers, worker 0 reading, with the memberships built and read
/// by nobody; `paced`: stepping every 1000 lines as the binary does, else
/// the whole input fed before any worker steps. Returns the consolidated
/// `(tick, id, profile, diff)`.
fn embedded(events: &[String], workers: usize, paced: bool) -> Vec<(u64, u64, u64, isize)> {
    use std::rc::Rc;
    use std::sync::{Arc, Mutex};
    use timely::dataflow::operators::{Inspect, Probe};
    let spec = shoal::spec::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("dataflows/retail.toml"), 1000).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (seen_in, events) = (seen.clone(), Arc::new(events.to_vec()));
    timely::execute(timely::Config::process(workers), move |worker| {
        let plan = Rc::new(shoal::plan::Plan::new(&spec));
        let seen = seen_in.clone();
        let (inputs, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let placement = shoal::dataflow::identity::Placement::OneWorker;
            let (inputs, built) = shoal::dataflow::build_with(scope, &plan, 1000, None, (false, false), placement);
            let (probe, _) = built
                .labels
                .inner
                .inspect(move |((id, p), t, r)| seen.lock().unwrap().push((*t, *id, *p, *r)))
                .probe();
            (inputs, probe)
        });
        if worker.index() != 0 {
            return;
        }
        let mut feeder = shoal::run::feeder::Feeder::new(plan, inputs, &shoal::run::RunOptions::default());
        for (i, line) in events.iter().enumerate() {
            feeder.read(line.as_bytes());
            if paced && i % 1000 == 999 {
                feeder.flush();
                let frontier = feeder.frontier();
                worker.step_while(|| probe.less_than(&frontier));
            }
        }
        feeder.finish();
        let end = feeder.frontier();
        feeder.flush();
        worker.step_while(|| probe.less_than(&end));
    })
    .expect("timely runs");
    let mut seen: Vec<_> = seen.lock().unwrap().iter().map(|(t, i, p, r)| ((*t, *i, *p), *r)).collect();
    differential_dataflow::consolidation::consolidate(&mut seen);
    seen.into_iter().map(|((t, i, p), r)| (t, i, p, r)).collect()
}

/// An operator whose output nobody reads (here the memberships, in an
/// embedding that reads only identity): timely hands its output buffer
/// back holding what it was given ("should be cleared before it is
/// reused"), which the operator once sent again at its next output, and
/// at the end with no capability left: a panic. Fed whole or paced, on 1
/// or 4 workers, the labels are the same and nothing panics.
#[test]
fn an_operator_whose_output_nobody_reads_runs_to_the_end() {
    let mut g = shoal::generate::Generator::new(&shoal::generate::GenOptions {
        users: 2_000,
        events: 20_000,
        seed: 42,
        ..Default::default()
    });
    let mut events = Vec::new();
    while let Some(l) = g.next_line() {
        events.push(l.to_string());
    }
    let paced = embedded(&events, 1, true);
    assert!(paced.len() > 1000, "{} diffs", paced.len());
    for workers in [1, 4] {
        assert!(embedded(&events, workers, false) == paced, "fed whole on {workers} workers");
    }
}

/// A worker that panics (a bug: bad data is dead-lettered, never a panic)
/// ends the process with its message and exit 101, instead of leaving the
/// other workers waiting for its progress forever
/// (`shoal::dataflow::exit_when_a_worker_panics`, which `shoal` installs). The
/// test runs itself again as a child whose worker 1 of 2 panics while
/// worker 0 waits for its progress; without the hook the child hangs (the
/// main thread joins worker 0 first, which never finishes) and is killed
/// at the deadline.
#[test]
fn a_panicking_worker_ends_the_process_instead_of_hanging() {
    use differential_dataflow::input::Input;
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    use timely::dataflow::operators::{Inspect, Probe};
    const NAME: &str = "a_panicking_worker_ends_the_process_instead_of_hanging";
    if std::env::var_os("SHOAL_PANIC_CHILD").is_some() {
        if std::env::var_os("SHOAL_PANIC_NO_HOOK").is_none() {
            shoal::dataflow::exit_when_a_worker_panics();
        }
        let _ = timely::execute(timely::Config::process(2), |worker| {
            let index = worker.index();
            let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, numbers) = scope.new_collection::<u64, isize>();
                let numbers = numbers.inner.inspect(move |_| assert!(index != 1, "a bug on worker 1"));
                (input, numbers.probe().0)
            });
            if index == 1 {
                input.insert(7);
            }
            input.advance_to(1);
            input.flush();
            worker.step_while(|| probe.less_than(&1));
        });
        // Not a panic: the harness would report it with exit 101 too.
        std::process::exit(3);
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env("SHOAL_PANIC_CHILD", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the process hung after a worker panicked");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("a bug on worker 1"), "the panic is reported: {stderr}");
    assert_eq!(status.code(), Some(101), "{stderr}");
}
