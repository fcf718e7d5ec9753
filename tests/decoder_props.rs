// Bad input (docs/reliability.md): every line given to shoal becomes an
// event or a dead letter. These properties feed the decoder and the ingest
// stage arbitrary bytes, JSON-shaped junk (Segment fields with the wrong
// types, huge numbers, deep nesting, invalid UTF-8 and lone surrogates inside
// strings) and valid events rewritten with other whitespace and key order.
// The fuzz targets in fuzz/ search the same space for longer.
//
// PROPTEST_CASES=N runs N cases per property; without it, 256.

use proptest::prelude::*;
use shoal::ingest::event::{decode, Event};
use shoal::ingest::stamp::{dead_letter, Ingest, Outcome};

/// Reads `line` through a fresh ingest stage and checks the bookkeeping:
/// a non-blank line is counted once as read and once as exactly one fate, and
/// a bad one makes a one-line JSON dead letter naming it.
fn read_one(ingest: &mut Ingest, line: &[u8]) -> Outcome {
    let before = ingest.counters.clone();
    let outcome = ingest.read(line);
    let c = &ingest.counters;
    let fates = |c: &shoal::ingest::stamp::Counters| c.accepted + c.bad + c.duplicates + c.ignored;
    match &outcome {
        Outcome::Blank => {
            assert!(line.iter().all(u8::is_ascii_whitespace));
            assert_eq!(*c, before, "a blank line is not counted");
        }
        other => {
            assert_eq!(c.read, before.read + 1);
            assert_eq!(fates(c), fates(&before) + 1, "one fate per line: {other:?}");
            if let Outcome::Bad(reason) = other {
                assert!(!reason.is_empty());
                check_dead_letter(reason, line);
            }
        }
    }
    outcome
}

fn check_dead_letter(reason: &str, line: &[u8]) {
    let dead = dead_letter("input.jsonl", 42, reason, line);
    assert!(!dead.contains('\n'), "one line: {dead}");
    let v: serde_json::Value = serde_json::from_str(&dead).expect("a dead letter is JSON");
    assert_eq!(v["source"], "input.jsonl");
    assert_eq!(v["line"], 42);
    assert_eq!(v["reason"], reason);
    assert!(v["text"].is_string());
}

// ---------------------------------------------------------------------------
// (a) Any bytes.

/// Bytes that are mostly JSON punctuation and field names, so the decoder
/// gets past its first checks more often than uniform bytes would.
fn jsonish_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        any::<u8>().prop_map(|b| vec![b]),
        prop::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            ":",
            ",",
            "\"",
            "\\",
            " ",
            "\n",
            "\r",
            "null",
            "true",
            "-",
            "0",
            "1e999",
            "\"type\"",
            "\"track\"",
            "\"event\"",
            "\"userId\"",
            "\"timestamp\"",
            "\"properties\"",
            "\"2024-01-01T00:00:00Z\"",
            "\\u",
            "d800",
            "\u{0}",
            "\u{feff}",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
    ];
    prop::collection::vec(piece, 0..64).prop_map(|v| v.concat())
}

// ---------------------------------------------------------------------------
// (b) JSON-shaped input, written as bytes so it may be subtly invalid.

const FIELDS: &[&str] = &[
    "type",
    "event",
    "name",
    "messageId",
    "timestamp",
    "userId",
    "anonymousId",
    "previousId",
    "properties",
    "traits",
    "context",
];

/// A JSON-shaped value: usually valid JSON, sometimes with invalid UTF-8,
/// lone surrogates, bad escapes or numbers out of any range.
fn value() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        Just(b"null".to_vec()),
        Just(b"true".to_vec()),
        Just(b"false".to_vec()),
        any::<i64>().prop_map(|n| n.to_string().into_bytes()),
        any::<u64>().prop_map(|n| n.to_string().into_bytes()),
        any::<f64>().prop_map(|f| format!("{f:?}").into_bytes()),
        prop::sample::select(vec![
            "18446744073709551615",
            "18446744073709551616",
            "253402300799999",
            "253402300800000",
            "-0",
            "1e400",
            "-1e-400",
            "0.5",
            "123456789012345678901234567890",
            "1E+2",
            "\"2024-01-01T00:00:00Z\"",
            "\"9999-12-31T23:59:59.999Z\"",
            "\"1969-12-31T23:59:59Z\"",
            "\"2024-02-30T00:00:00Z\"",
            "\"track\"",
            "\"identify\"",
            "\"alias\"",
            "\"group\"",
            "\"page\"",
            "\"\"",
            "\"\\ud800\"",
            "\"\\udc00\\ud800\"",
            "\"\\u00zz\"",
            "\"\\x\"",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        ".{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..8).prop_map(|raw| {
            // Raw bytes inside quotes: invalid UTF-8, control characters.
            let mut v = vec![b'"'];
            v.extend(raw.into_iter().filter(|&b| b != b'"' && b != b'\\'));
            v.push(b'"');
            v
        }),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|items| join(b'[', items, b']')),
            prop::collection::vec((key(), inner), 0..6).prop_map(object),
        ]
    })
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![3 => prop::sample::select(FIELDS).prop_map(String::from), 1 => "[a-zA-Z]{0,6}"]
}

fn join(open: u8, items: Vec<Vec<u8>>, close: u8) -> Vec<u8> {
    let mut v = vec![open];
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            v.push(b',');
        }
        v.extend(item);
    }
    v.push(close);
    v
}

fn object(kvs: Vec<(String, Vec<u8>)>) -> Vec<u8> {
    let items = kvs
        .into_iter()
        .map(|(k, v)| {
            let mut item = serde_json::to_vec(&k).unwrap();
            item.push(b':');
            item.extend(v);
            item
        })
        .collect();
    join(b'{', items, b'}')
}

/// A top-level object: mostly Segment fields with arbitrary values, often a
/// valid type, identifier and timestamp so the later checks are reached.
fn event_shaped() -> impl Strategy<Value = Vec<u8>> {
    let base = prop::collection::vec((key(), value()), 0..8);
    let good = (
        prop::sample::select(vec!["track", "page", "screen", "identify", "alias", "group"]),
        any::<bool>(),
        any::<bool>(),
    );
    (base, good, prop::collection::vec(any::<u8>(), 0..3)).prop_map(|(mut kvs, (kind, with_kind, with_id), tail)| {
        if with_kind {
            kvs.insert(0, ("type".into(), format!("\"{kind}\"").into_bytes()));
            kvs.push(("timestamp".into(), b"1704067200000".to_vec()));
            kvs.push(("event".into(), b"\"x\"".to_vec()));
        }
        if with_id {
            kvs.push(("userId".into(), b"\"u\"".to_vec()));
            kvs.push(("previousId".into(), b"\"p\"".to_vec()));
        }
        let mut line = object(kvs);
        // Sometimes a stray byte or two after the object.
        if tail.len() == 2 {
            line.extend(tail);
        }
        line
    })
}

/// Nesting far deeper than any parser should recurse, where an event keeps
/// its objects: inside `properties`, and as an unknown field.
fn deeply_nested() -> impl Strategy<Value = Vec<u8>> {
    (
        1usize..20_000,
        prop::sample::select(vec!["properties", "context", "other"]),
        any::<bool>(),
    )
        .prop_map(|(depth, field, arrays)| {
            let (open, close) = if arrays { ("[", "]") } else { ("{\"a\":", "}") };
            format!(
                r#"{{"type":"track","event":"x","userId":"u","timestamp":0,"{field}":{{"a":{}1{}}}}}"#,
                open.repeat(depth),
                close.repeat(depth)
            )
            .into_bytes()
        })
}

// ---------------------------------------------------------------------------
// (c) Valid events, rewritten.

#[derive(Clone, Debug)]
struct Valid {
    /// Key-value pairs of a valid event, values as JSON text.
    fields: Vec<(&'static str, String)>,
}

fn valid_event() -> impl Strategy<Value = Valid> {
    let kind = prop::sample::select(vec!["track", "page", "screen", "identify", "alias", "group"]);
    let timestamp = prop_oneof![
        (0u64..4_000_000_000_000).prop_map(|ms| ms.to_string()),
        Just("\"2024-03-01T12:34:56.789+02:00\"".to_string()),
    ];
    let props = prop::collection::btree_map(
        "[a-z]{1,4}",
        prop_oneof![
            any::<i32>().prop_map(|n| n.to_string()),
            "[ -~]{0,6}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            Just("{\"deep\":[1,{\"x\":null}]}".to_string()),
        ],
        0..4,
    );
    (kind, timestamp, props, any::<bool>(), any::<bool>()).prop_map(|(kind, ts, props, with_msg, numeric_id)| {
        let mut fields = vec![("type", format!("\"{kind}\"")), ("timestamp", ts)];
        fields.push(("userId", if numeric_id { "42".to_string() } else { "\"u 1\"".to_string() }));
        fields.push(("anonymousId", "\"a\\u00e9\"".to_string()));
        match kind {
            "track" => fields.push(("event", "\"Order Completed\"".to_string())),
            "page" | "screen" => fields.push(("name", "\"Home\"".to_string())),
            "alias" => fields.push(("previousId", "\"old\"".to_string())),
            _ => {}
        }
        if with_msg {
            fields.push(("messageId", "\"m-1\"".to_string()));
        }
        let body: Vec<String> = props.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        fields.push(("properties", format!("{{{}}}", body.join(","))));
        fields.push(("context", "{\"device\":{\"type\":\"ios\"}}".to_string()));
        Valid { fields }
    })
}

/// Whitespace JSON allows between tokens.
fn ws() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec![" ", "\t", "\r", "  "]), 0..3).prop_map(|v| v.concat())
}

fn write(fields: &[(&str, String)], gaps: &[String]) -> Vec<u8> {
    let mut gap = gaps.iter().cycle();
    let mut s = format!("{}{{", gap.next().unwrap());
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            s.push_str(gap.next().unwrap());
            s.push(',');
        }
        s.push_str(&format!(
            "{}\"{k}\"{}:{}{v}",
            gap.next().unwrap(),
            gap.next().unwrap(),
            gap.next().unwrap()
        ));
    }
    s.push_str(&format!("{}}}{}", gap.next().unwrap(), gap.next().unwrap()));
    s.into_bytes()
}

/// The decoded event without its line-hash key (whitespace changes the
/// line's bytes; a `messageId` key does not change).
fn comparable(mut e: Event, has_message_id: bool) -> Event {
    if !has_message_id {
        e.key = 0;
    }
    e
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn any_bytes_are_an_outcome_or_a_dead_letter(
        lines in prop::collection::vec(prop_oneof![prop::collection::vec(any::<u8>(), 0..256), jsonish_bytes()], 1..8)
    ) {
        let mut ingest = Ingest::new(1000, 5000, 3_600_000);
        for line in &lines {
            let decoded = decode(line);
            match read_one(&mut ingest, line) {
                Outcome::Bad(reason) => prop_assert_eq!(Some(reason), decoded.err().map(|e| e.0)),
                Outcome::Blank => {}
                _ => prop_assert!(decoded.is_ok()),
            }
        }
    }

    #[test]
    fn json_shaped_input_is_an_event_or_a_reason(line in prop_oneof![3 => event_shaped(), 1 => value(), 1 => deeply_nested()]) {
        let mut ingest = Ingest::new(1000, 0, 3_600_000);
        match (decode(&line), read_one(&mut ingest, &line)) {
            (Ok(event), Outcome::Accepted(s)) => {
                prop_assert_eq!(&*s.event, &event);
                // What the dataflow reads of an accepted event.
                let _ = (event.anchor(), event.links());
                let _ = event.get(&["properties".into(), "a".into()]);
            }
            (Ok(_), Outcome::Ignored) => {}
            (Err(e), Outcome::Bad(reason)) => prop_assert_eq!(e.0, reason),
            (d, o) => prop_assert!(false, "decode gave {:?} but ingest {:?}", d, o),
        }
    }

    #[test]
    fn valid_events_survive_whitespace_and_key_order(
        ev in valid_event(),
        seed in any::<u64>(),
        gaps_a in prop::collection::vec(ws(), 1..8),
        gaps_b in prop::collection::vec(ws(), 1..8),
    ) {
        let has_msg = ev.fields.iter().any(|(k, _)| *k == "messageId");
        let plain = write(&ev.fields, &[String::new()]);
        let expected = decode(&plain).map(|e| comparable(e, has_msg));
        prop_assert!(expected.is_ok(), "{}: {:?}", String::from_utf8_lossy(&plain), expected);
        // Another key order (a seeded rotation and swap) and other spacing.
        let mut fields = ev.fields.clone();
        let n = fields.len();
        fields.rotate_left((seed % n as u64) as usize);
        fields.swap(0, ((seed >> 8) % n as u64) as usize);
        let line = write(&fields, &gaps_a);
        let again = decode(&line).map(|e| comparable(e, has_msg));
        prop_assert_eq!(&again, &expected, "{}", String::from_utf8_lossy(&line));
        let spaced = write(&ev.fields, &gaps_b);
        prop_assert_eq!(decode(&spaced).map(|e| comparable(e, has_msg)), expected);
    }
}
