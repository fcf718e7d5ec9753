//! The reference evaluator against the hand-worked conformance cases: before
//! it judges the engine, it must agree with every case in tests/conformance.

mod reference;

use std::fs;
use std::path::{Path, PathBuf};

use reference::{evaluate, evaluate_sparse, RefOptions};
use shoal::core::clock::{parse_duration_or_zero, parse_time_arg};

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance");
    let mut dirs: Vec<PathBuf> = fs::read_dir(&root)
        .expect("tests/conformance")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("spec.toml").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 15, "conformance cases are missing from {}", root.display());
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
        let spec = shoal::spec::load(&dir.join("spec.toml"), opts.tick).unwrap_or_else(|e| panic!("{name}/spec.toml: {e:?}"));
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

fn spec(text: &str, tick: u64) -> shoal::spec::Spec {
    shoal::spec::parse_spec(text, tick).unwrap_or_else(|e| panic!("{e:?}"))
}

/// A small deterministic generator (xorshift), so the test needs no seed file.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
}

const BASE: u64 = 1_704_067_200_000; // 2024-01-01T00:00:00Z

/// Random events over about a minute, out of order, with duplicates, merges,
/// traits, bad lines and `group`s.
fn random_input(rng: &mut Rng, n: usize) -> String {
    let mut out = String::new();
    let mut t = BASE;
    for i in 0..n {
        t += rng.below(4_000);
        let time = t.saturating_sub(rng.below(3) * rng.below(6_000));
        let who = match rng.below(3) {
            0 => format!(r#""userId":"{}""#, rng.pick(&["u1", "u2", "u3"])),
            1 => format!(r#""anonymousId":"{}""#, rng.pick(&["a1", "a2", "a3"])),
            _ => format!(
                r#""userId":"{}","anonymousId":"{}""#,
                rng.pick(&["u1", "u2", "u3"]),
                rng.pick(&["a1", "a2", "a3"])
            ),
        };
        let id = if rng.below(6) == 0 {
            format!("m{}", rng.below(i as u64 + 1))
        } else {
            format!("m{i}")
        };
        let amount = rng.pick(&["1", "2.5", "7", "0.1", "\"9\"", "null", "-3"]);
        let line = match rng.below(9) {
            0 | 1 => format!(
                r#"{{"type":"track","event":"view","timestamp":{time},{who},"messageId":"{id}","properties":{{"sku":"{}"}}}}"#,
                rng.pick(&["x", "y", "z"])
            ),
            2 | 3 => format!(
                r#"{{"type":"track","event":"buy","timestamp":{time},{who},"messageId":"{id}","properties":{{"amount":{amount}}}}}"#
            ),
            4 => format!(
                r#"{{"type":"page","name":"{}","timestamp":{time},{who},"messageId":"{id}","properties":{{"scroll":{}}},"context":{{"os":"{}"}}}}"#,
                rng.pick(&["home", "pricing"]),
                rng.below(100),
                rng.pick(&["ios", "android"])
            ),
            5 => format!(
                r#"{{"type":"identify","timestamp":{time},{who},"messageId":"{id}","traits":{{"plan":{}}}}}"#,
                rng.pick(&["\"pro\"", "\"free\"", "null"])
            ),
            6 => format!(
                r#"{{"type":"alias","timestamp":{time},"userId":"{}","previousId":"{}","messageId":"{id}"}}"#,
                rng.pick(&["u1", "u2", "u3"]),
                rng.pick(&["u1", "a2", "a3"])
            ),
            7 => format!(r#"{{"type":"group","timestamp":{time},{who},"messageId":"{id}"}}"#),
            _ => r#"{"type":"track","timestamp":1}"#.to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

const RICH_SPEC: &str = r#"
[[segment]]
name = "viewer"
when = "count('view', 10s) >= 2 and not in_segment('buyer')"

[[segment]]
name = "buyer"
when = "sum('buy', amount, 20s) > 5 or avg('buy', amount, lifetime) >= 3"

[[segment]]
name = "lapsed"
when = "since('buy') > 7s and since(page where scroll >= 50) <= 15s"

[[segment]]
name = "pro_or_ios"
when = "trait.plan == 'pro' or last(any, context.os) == 'ios'"

[[segment]]
name = "spread"
when = "max('buy', amount, 30s) - min('buy', amount, 30s) >= 2 and var('buy', amount, 30s) > 0.5"

[[segment]]
name = "browsing"
when = "distinct(any, sku, 15s) >= 2 and 20s > since(any)"
"#;

/// The sparse choice of ticks (effect ticks, window expiries, `since`
/// thresholds) must give exactly what evaluating every tick gives.
#[test]
fn sparse_ticks_lose_nothing() {
    let spec = spec(RICH_SPEC, 1_000);
    let mut rng = Rng(0x5eed_1234_abcd);
    let mut written = 0;
    for round in 0..40 {
        let input = random_input(&mut rng, 10 + round);
        let opts = RefOptions {
            tick: 1_000,
            lateness: [0, 2_000, 5_000][round % 3],
            dedupe_horizon: [3_000, 3_600_000][round % 2],
            until: if round % 4 == 0 { None } else { Some(BASE + 90_000) },
        };
        let dense = evaluate(&spec, input.as_bytes(), &opts);
        let sparse = evaluate_sparse(&spec, input.as_bytes(), &opts);
        assert_eq!(dense, sparse, "round {round}\n{input}");
        written += dense.lines.len();
    }
    assert!(written > 100, "the random inputs should exercise the spec ({written} lines)");
}

/// Rules that no conformance case pins down, worked out by hand.
#[test]
fn hand_worked_rules() {
    let twice = spec("[[segment]]\nname = \"twice\"\nwhen = \"count('view', 3s) >= 2\"\n", 1_000);
    let opts = RefOptions {
        lateness: 2_000,
        until: Some(BASE + 30_000),
        ..RefOptions::default()
    };
    let view = |s: u64, id: &str| {
        format!(
            r#"{{"type":"track","event":"view","userId":"u","timestamp":{},"messageId":"{id}"}}"#,
            BASE + s * 1000
        )
    };

    // Late events keep their own time for windows: read at now = 8s, the
    // events of 1s and 2s take effect at 9s, when their 3s window is over.
    let input = [view(10, "a"), view(1, "b"), view(2, "c")].join("\n");
    assert_eq!(evaluate(&twice, input.as_bytes(), &opts).lines, Vec::<String>::new());
    // Read at now = 8s, the events of 7s and 8s are late: both take effect
    // at 9s and count together until the one of 8s leaves at 11s (the one of
    // 10s takes effect at its own tick).
    let input = [view(10, "a"), view(7, "b"), view(8, "c")].join("\n");
    assert_eq!(
        evaluate(&twice, input.as_bytes(), &opts).lines,
        vec![
            r#"{"time":"2024-01-01T00:00:09Z","segment":"twice","profile":"user:u","change":"enter"}"#,
            r#"{"time":"2024-01-01T00:00:11Z","segment":"twice","profile":"user:u","change":"exit"}"#,
        ]
    );

    // The dedupe horizon counts from the remembered copy's time; a `group`
    // neither moves the clock nor is remembered for dedupe.
    let short = RefOptions {
        lateness: 0,
        dedupe_horizon: 1_000,
        until: Some(BASE + 30_000),
        ..RefOptions::default()
    };
    let group = format!(r#"{{"type":"group","userId":"u","timestamp":{},"messageId":"a"}}"#, BASE + 20_000);
    let input = [group, view(0, "a"), view(5, "a"), view(1, "b")].join("\n");
    // group: dropped. view(0,a): accepted, now = 0. view(5,a): now 0 <= 0 + 1s:
    // duplicate. view(1,b): accepted, not late (own 1s > now 0s).
    assert_eq!(
        evaluate(&twice, input.as_bytes(), &short).lines,
        vec![
            r#"{"time":"2024-01-01T00:00:01Z","segment":"twice","profile":"user:u","change":"enter"}"#,
            r#"{"time":"2024-01-01T00:00:03Z","segment":"twice","profile":"user:u","change":"exit"}"#,
        ]
    );
}
