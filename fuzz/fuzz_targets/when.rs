//! Any text as a `when` expression and as a whole spec: the parser and the
//! checks never panic, hang or allocate without bound; they accept or they
//! return errors at positions inside the text (docs/reliability.md).

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::spec::{compile_when, parse_spec, SpecError};

/// The small fixed spec every expression is compiled against: its segments
/// are the names `in_segment` may refer to, and the expression is also
/// spliced in as one more segment so the file-position mapping runs too.
const SPEC: &str = r#"
[[score]]
name = "activity"
expr = "count(any, 7d)"

[[segment]]
name = "buyer"
when = "count('buy', 1h) >= 1"

[[segment]]
name = "bot"
when = "count(any, 1m) >= 100"
"#;

const TICK_MS: u64 = 1000;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };

    // The text as a `when` on its own (the HTTP API's preview path).
    let is_segment = |name: &str| matches!(name, "buyer" | "bot");
    if let Err(errors) = compile_when(text, TICK_MS, &is_segment) {
        check_errors(&errors, text);
    }

    // The text as a segment's `when` inside the fixed spec, written as a TOML
    // basic string (escapes and all).
    let spliced = format!("{SPEC}\n[[segment]]\nname = \"fuzzed\"\nwhen = {}\n", toml_edit::Value::from(text));
    if let Err(errors) = parse_spec(&spliced, TICK_MS) {
        check_errors(&errors, &spliced);
    }

    // The text as a whole spec file.
    if let Err(errors) = parse_spec(text, TICK_MS) {
        check_errors(&errors, text);
    }
});

/// Errors exist, say something, and point inside the text (1-based; one
/// past the last line for an error at the very end).
fn check_errors(errors: &[SpecError], text: &str) {
    assert!(!errors.is_empty(), "an Err without errors");
    let lines = text.split('\n').count();
    for e in errors {
        assert!(!e.message.is_empty(), "an error without a message");
        assert!(e.line <= lines + 1, "error line {} beyond the text ({lines} lines): {e}", e.line);
    }
}
