//! The `when` language: a hand-written lexer and recursive-descent parser
//! (SPEC §4).
//!
//! Precedence, loosest first: `or` < `and` < `not` < comparison (one, not
//! chained) < `+ -` < `* /` < unary `-` < primary. Every error carries the
//! 1-based line and column *within the parsed text*; [`crate::spec::parse_spec`]
//! maps them to the TOML file. Types are not checked here but in
//! [`crate::spec::check`].
//!
//! Names: outside a selector's `where` filter a bare name is an error (it is
//! almost always a forgotten `trait.` or forgotten quotes); inside a filter a
//! name or dotted path reads the event ([`ExprKind::Path`]). A name that is a
//! function (`count`, `last`, …) is a call only when `(` follows, so a filter
//! can still read a property called `count`.

use super::ast::{AggKind, ArithOp, ClockPart, CmpOp, EventSel, Expr, ExprKind, Path, Pos, RfmField, Selector, Window};
use super::def::SpecError;
use crate::core::clock::parse_duration;
use crate::core::value::Dec;

/// Parses one `when` (or score `expr`, or clustering feature) expression.
pub fn parse_when(src: &str) -> Result<Expr, SpecError> {
    let mut p = Parser::new(src)?;
    let e = p.expr()?;
    p.expect_end()?;
    Ok(e)
}

/// Parses a dotted event path such as `revenue` or `context.device.type`
/// (resolved as in a `where` filter: a bare name is `properties.NAME`).
pub fn parse_path(src: &str) -> Result<Path, SpecError> {
    let mut p = Parser::new(src)?;
    let path = p.path()?;
    p.expect_end()?;
    Ok(path)
}

/// Formats milliseconds with the largest unit that divides them exactly
/// (`1s`, `1500ms`, `48h`), as durations are written in specs.
pub fn format_duration(ms: u64) -> String {
    const UNITS: [(u64, &str); 5] = [(604_800_000, "w"), (86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1_000, "s")];
    if ms > 0 {
        for (unit, name) in UNITS {
            if ms.is_multiple_of(unit) {
                return format!("{}{name}", ms / unit);
            }
        }
    }
    format!("{ms}ms")
}

/// Nesting deeper than this is refused rather than risking the stack.
const MAX_DEPTH: usize = 100;

fn error(pos: Pos, message: impl Into<String>) -> SpecError {
    SpecError {
        line: pos.line,
        column: pos.column,
        message: message.into(),
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    /// A decimal literal as written.
    Num(String),
    /// A duration literal: milliseconds and the text as written.
    Dur(u64, String),
    Str(String),
    Name(String),
    LParen,
    RParen,
    Comma,
    Dot,
    Plus,
    Minus,
    Star,
    Slash,
    Cmp(CmpOp),
    Eof,
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Num(s) => format!("number `{s}`"),
        Tok::Dur(_, s) => format!("duration `{s}`"),
        Tok::Str(s) => format!("string {}", quote(s)),
        Tok::Name(s) => format!("`{s}`"),
        Tok::LParen => "`(`".into(),
        Tok::RParen => "`)`".into(),
        Tok::Comma => "`,`".into(),
        Tok::Dot => "`.`".into(),
        Tok::Plus => "`+`".into(),
        Tok::Minus => "`-`".into(),
        Tok::Star => "`*`".into(),
        Tok::Slash => "`/`".into(),
        Tok::Cmp(op) => format!("`{}`", cmp_text(*op)),
        Tok::Eof => "the end of the expression".into(),
    }
}

/// The operator as written.
pub fn cmp_text(op: CmpOp) -> &'static str {
    match op {
        CmpOp::Ge => ">=",
        CmpOp::Gt => ">",
        CmpOp::Le => "<=",
        CmpOp::Lt => "<",
        CmpOp::Eq => "==",
        CmpOp::Ne => "!=",
    }
}

/// A string literal as it could be written back in the language.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    pos: Pos,
}

fn lex(src: &str) -> Result<Vec<Token>, SpecError> {
    let chars: Vec<char> = src.chars().collect();
    let mut toks = Vec::new();
    let (mut i, mut line, mut column) = (0usize, 1usize, 1usize);
    // Advances over `n` characters, none of them a newline.
    macro_rules! bump {
        ($n:expr) => {{
            i += $n;
            column += $n;
        }};
    }
    while i < chars.len() {
        let c = chars[i];
        let pos = Pos { line, column };
        let next = chars.get(i + 1).copied();
        if c == '\n' {
            i += 1;
            line += 1;
            column = 1;
            continue;
        }
        if c.is_whitespace() {
            bump!(1);
            continue;
        }
        let tok = if c.is_ascii_digit() {
            let start = i;
            let mut end = i;
            while end < chars.len() && chars[end].is_ascii_digit() {
                end += 1;
            }
            let mut fraction = false;
            if end + 1 < chars.len() && chars[end] == '.' && chars[end + 1].is_ascii_digit() {
                fraction = true;
                end += 1;
                while end < chars.len() && chars[end].is_ascii_digit() {
                    end += 1;
                }
            }
            let number_end = end;
            while end < chars.len() && (chars[end].is_alphanumeric() || chars[end] == '_') {
                end += 1;
            }
            let text: String = chars[start..end].iter().collect();
            bump!(end - start);
            if end == number_end {
                Tok::Num(text)
            } else if fraction {
                return Err(error(
                    pos,
                    format!("`{text}` is not a duration: a duration is a whole number followed by ms, s, m, h, d or w (e.g. 90m)"),
                ));
            } else {
                match parse_duration(&text) {
                    Ok(ms) => Tok::Dur(ms, text),
                    Err(m) => return Err(error(pos, m)),
                }
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            let mut end = i;
            while end < chars.len() && (chars[end].is_alphanumeric() || chars[end] == '_') {
                end += 1;
            }
            let text: String = chars[start..end].iter().collect();
            bump!(end - start);
            Tok::Name(text)
        } else if c == '\'' || c == '"' {
            let mut value = String::new();
            bump!(1);
            loop {
                let Some(&d) = chars.get(i) else {
                    return Err(error(pos, "unterminated string: it has no closing quote"));
                };
                if d == c {
                    bump!(1);
                    break;
                }
                if d == '\\' {
                    let esc_pos = Pos { line, column };
                    let e = chars.get(i + 1).copied();
                    let decoded = match e {
                        Some('\\') => '\\',
                        Some('\'') => '\'',
                        Some('"') => '"',
                        Some('n') => '\n',
                        Some('t') => '\t',
                        Some(other) if other != '\n' => {
                            return Err(error(esc_pos, format!("unknown escape `\\{other}` (known: \\\\ \\' \\\" \\n \\t)")));
                        }
                        _ => return Err(error(esc_pos, "a backslash must be followed by \\, ', \", n or t")),
                    };
                    value.push(decoded);
                    bump!(2);
                    continue;
                }
                value.push(d);
                if d == '\n' {
                    i += 1;
                    line += 1;
                    column = 1;
                } else {
                    bump!(1);
                }
            }
            Tok::Str(value)
        } else {
            let (tok, len) = match (c, next) {
                ('(', _) => (Tok::LParen, 1),
                (')', _) => (Tok::RParen, 1),
                (',', _) => (Tok::Comma, 1),
                ('.', _) => (Tok::Dot, 1),
                ('+', _) => (Tok::Plus, 1),
                ('-', _) => (Tok::Minus, 1),
                ('*', _) => (Tok::Star, 1),
                ('/', _) => (Tok::Slash, 1),
                ('>', Some('=')) => (Tok::Cmp(CmpOp::Ge), 2),
                ('>', _) => (Tok::Cmp(CmpOp::Gt), 1),
                ('<', Some('=')) => (Tok::Cmp(CmpOp::Le), 2),
                ('<', Some('>')) => return Err(error(pos, "`<>` is not an operator; write `!=`")),
                ('<', _) => (Tok::Cmp(CmpOp::Lt), 1),
                ('=', Some('=')) => (Tok::Cmp(CmpOp::Eq), 2),
                ('!', Some('=')) => (Tok::Cmp(CmpOp::Ne), 2),
                ('=', _) => return Err(error(pos, "`=` is not an operator; write `==` to compare")),
                ('!', _) => return Err(error(pos, "`!` is not an operator; write `not` (or `!=` to compare)")),
                ('&', _) => return Err(error(pos, "`&` is not an operator; write `and`")),
                ('|', _) => return Err(error(pos, "`|` is not an operator; write `or`")),
                _ => return Err(error(pos, format!("unexpected character `{c}`"))),
            };
            bump!(len);
            tok
        };
        toks.push(Token { tok, pos });
    }
    toks.push(Token {
        tok: Tok::Eof,
        pos: Pos { line, column },
    });
    Ok(toks)
}

/// Words that are never a name: reserved in every position.
fn is_keyword(s: &str) -> bool {
    matches!(s, "and" | "or" | "not" | "true" | "false" | "where" | "lifetime")
}

fn agg_kind(s: &str) -> Option<AggKind> {
    Some(match s {
        "count" => AggKind::Count,
        "sum" => AggKind::Sum,
        "avg" => AggKind::Avg,
        "min" => AggKind::Min,
        "max" => AggKind::Max,
        "var" => AggKind::Var,
        "distinct" => AggKind::Distinct,
        _ => return None,
    })
}

fn is_function(s: &str) -> bool {
    agg_kind(s).is_some()
        || matches!(
            s,
            "last"
                | "since"
                | "sqrt"
                | "abs"
                | "percentile"
                | "in_segment"
                | "time"
                | "last_time"
                | "first_time"
                | "hour"
                | "weekday"
                | "distance"
                | "inside"
                | "steps"
                | "sequence"
        )
}

/// Resolves a written path: `properties.…`, `context.…` and `traits.…` are
/// kept, anything else is under `properties`.
fn resolve_path(segments: Vec<String>) -> Path {
    let keep = segments.len() > 1 && matches!(segments[0].as_str(), "properties" | "context" | "traits");
    if keep {
        Path(segments)
    } else {
        let mut v = Vec::with_capacity(segments.len() + 1);
        v.push("properties".to_string());
        v.extend(segments);
        Path(v)
    }
}

struct Parser {
    toks: Vec<Token>,
    i: usize,
    /// Inside a selector's `where` filter: names read the event.
    in_filter: bool,
    depth: usize,
}

impl Parser {
    fn new(src: &str) -> Result<Parser, SpecError> {
        Ok(Parser {
            toks: lex(src)?,
            i: 0,
            in_filter: false,
            depth: 0,
        })
    }

    fn peek(&self) -> &Tok {
        &self.toks[self.i].tok
    }

    fn peek_at(&self, k: usize) -> &Tok {
        let j = (self.i + k).min(self.toks.len() - 1);
        &self.toks[j].tok
    }

    fn pos(&self) -> Pos {
        self.toks[self.i].pos
    }

    fn advance(&mut self) -> Token {
        let t = self.toks[self.i].clone();
        if self.i + 1 < self.toks.len() {
            self.i += 1;
        }
        t
    }

    fn is_name(&self, s: &str) -> bool {
        matches!(self.peek(), Tok::Name(n) if n == s)
    }

    fn unexpected(&self, expected: &str) -> SpecError {
        error(self.pos(), format!("expected {expected}, found {}", describe(self.peek())))
    }

    fn expect(&mut self, tok: Tok, context: &str) -> Result<(), SpecError> {
        if *self.peek() == tok {
            self.advance();
            Ok(())
        } else {
            Err(self.unexpected(&format!("{} {context}", describe(&tok))))
        }
    }

    fn expect_end(&mut self) -> Result<(), SpecError> {
        match self.peek() {
            Tok::Eof => Ok(()),
            Tok::RParen => Err(error(self.pos(), "unmatched `)`")),
            Tok::Cmp(_) => Err(error(
                self.pos(),
                "comparisons cannot be chained (as in `a < b < c`); combine them with `and`",
            )),
            _ => Err(self.unexpected("an operator such as `and` or `or`, or the end of the expression")),
        }
    }

    /// One level deeper in the tree being built; refused past [`MAX_DEPTH`].
    fn deeper(&mut self) -> Result<(), SpecError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(error(
                self.pos(),
                format!("the expression is nested too deeply (more than {MAX_DEPTH} levels)"),
            ));
        }
        Ok(())
    }

    fn expr(&mut self) -> Result<Expr, SpecError> {
        self.deeper()?;
        let e = self.or();
        self.depth -= 1;
        e
    }

    fn or(&mut self) -> Result<Expr, SpecError> {
        let base = self.depth;
        let mut l = self.and()?;
        while self.is_name("or") {
            self.deeper()?;
            self.advance();
            let r = self.and()?;
            let pos = l.pos;
            l = Expr {
                kind: ExprKind::Or(Box::new(l), Box::new(r)),
                pos,
            };
        }
        self.depth = base;
        Ok(l)
    }

    fn and(&mut self) -> Result<Expr, SpecError> {
        let base = self.depth;
        let mut l = self.not()?;
        while self.is_name("and") {
            self.deeper()?;
            self.advance();
            let r = self.not()?;
            let pos = l.pos;
            l = Expr {
                kind: ExprKind::And(Box::new(l), Box::new(r)),
                pos,
            };
        }
        self.depth = base;
        Ok(l)
    }

    fn not(&mut self) -> Result<Expr, SpecError> {
        if self.is_name("not") {
            self.deeper()?;
            let pos = self.advance().pos;
            let e = self.not()?;
            self.depth -= 1;
            return Ok(Expr {
                kind: ExprKind::Not(Box::new(e)),
                pos,
            });
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, SpecError> {
        let l = self.additive()?;
        let Tok::Cmp(op) = *self.peek() else {
            return Ok(l);
        };
        self.advance();
        let r = self.additive()?;
        if let Tok::Cmp(_) = self.peek() {
            return Err(error(
                self.pos(),
                "comparisons cannot be chained (as in `a < b < c`); combine them with `and`",
            ));
        }
        let pos = l.pos;
        Ok(Expr {
            kind: ExprKind::Cmp(op, Box::new(l), Box::new(r)),
            pos,
        })
    }

    fn additive(&mut self) -> Result<Expr, SpecError> {
        let base = self.depth;
        let mut l = self.multiplicative()?;
        loop {
            let op = match self.peek() {
                Tok::Plus => ArithOp::Add,
                Tok::Minus => ArithOp::Sub,
                _ => {
                    self.depth = base;
                    return Ok(l);
                }
            };
            self.deeper()?;
            self.advance();
            let r = self.multiplicative()?;
            let pos = l.pos;
            l = Expr {
                kind: ExprKind::Arith(op, Box::new(l), Box::new(r)),
                pos,
            };
        }
    }

    fn multiplicative(&mut self) -> Result<Expr, SpecError> {
        let base = self.depth;
        let mut l = self.unary()?;
        loop {
            let op = match self.peek() {
                Tok::Star => ArithOp::Mul,
                Tok::Slash => ArithOp::Div,
                _ => {
                    self.depth = base;
                    return Ok(l);
                }
            };
            self.deeper()?;
            self.advance();
            let r = self.unary()?;
            let pos = l.pos;
            l = Expr {
                kind: ExprKind::Arith(op, Box::new(l), Box::new(r)),
                pos,
            };
        }
    }

    fn unary(&mut self) -> Result<Expr, SpecError> {
        if *self.peek() == Tok::Minus {
            self.deeper()?;
            let pos = self.advance().pos;
            let e = self.unary()?;
            self.depth -= 1;
            // A negative number literal is a literal.
            let kind = match e.kind {
                ExprKind::Num(d) => ExprKind::Num(Dec(-d.0)),
                kind => ExprKind::Neg(Box::new(Expr { kind, pos: e.pos })),
            };
            return Ok(Expr { kind, pos });
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, SpecError> {
        let pos = self.pos();
        let kind = match self.peek().clone() {
            Tok::Num(text) => {
                self.advance();
                match Dec::parse(&text) {
                    Some(d) => ExprKind::Num(d),
                    None => return Err(error(pos, format!("number `{text}` is too large"))),
                }
            }
            Tok::Dur(ms, _) => {
                self.advance();
                ExprKind::Dur(ms)
            }
            Tok::Str(s) => {
                self.advance();
                ExprKind::Str(s)
            }
            Tok::LParen => {
                self.advance();
                let e = self.expr()?;
                self.expect(Tok::RParen, "to close the `(`")?;
                // Parentheses only group: the node keeps its own kind but
                // starts where the group starts.
                return Ok(Expr { kind: e.kind, pos });
            }
            Tok::Name(name) => return self.name(name, pos),
            Tok::Eof => return Err(error(pos, "expected an expression, found the end of the expression")),
            _ => return Err(self.unexpected("an expression")),
        };
        Ok(Expr { kind, pos })
    }

    /// A primary that starts with a name.
    fn name(&mut self, name: String, pos: Pos) -> Result<Expr, SpecError> {
        let call = *self.peek_at(1) == Tok::LParen;
        let dotted = *self.peek_at(1) == Tok::Dot;
        let kind = match name.as_str() {
            "true" | "false" => {
                self.advance();
                ExprKind::Bool(name == "true")
            }
            "now" if !call && !dotted && !self.in_filter => {
                self.advance();
                ExprKind::Now
            }
            _ if is_keyword(&name) => return Err(self.unexpected("an expression")),
            _ if call && is_function(&name) => {
                self.advance();
                self.advance();
                let kind = self.call(&name)?;
                self.expect(Tok::RParen, &format!("to close {name}(…)"))?;
                kind
            }
            "trait" | "score" | "cluster" | "predict" | "rfm" if dotted => {
                self.advance();
                self.advance();
                let field_pos = self.pos();
                let Tok::Name(field) = self.peek().clone() else {
                    return Err(self.unexpected(&format!("a name after `{name}.`")));
                };
                self.advance();
                if *self.peek() == Tok::Dot {
                    return Err(error(
                        self.pos(),
                        format!("`{name}.{field}` is followed by `.`: {name}.NAME takes a single name"),
                    ));
                }
                match name.as_str() {
                    "trait" => ExprKind::Trait(field),
                    "score" => ExprKind::Score(field),
                    "cluster" => ExprKind::Cluster(field),
                    "predict" => ExprKind::Predict(field),
                    _ => ExprKind::Rfm(match field.as_str() {
                        "r" => RfmField::R,
                        "f" => RfmField::F,
                        "m" => RfmField::M,
                        "segment" => RfmField::Segment,
                        _ => {
                            return Err(error(
                                field_pos,
                                format!("unknown `rfm.{field}`: expected rfm.r, rfm.f, rfm.m or rfm.segment"),
                            ))
                        }
                    }),
                }
            }
            _ if self.in_filter => ExprKind::Path(self.path()?),
            _ if is_function(&name) => {
                return Err(error(pos, format!("`{name}` is a function: write {name}(…)")));
            }
            "trait" | "score" | "cluster" | "predict" | "rfm" => {
                return Err(error(pos, format!("`{name}` needs a name: write {name}.NAME")));
            }
            "page" | "screen" | "identify" | "any" => {
                return Err(error(
                    pos,
                    format!("`{name}` selects events: use it inside an aggregate, e.g. count({name}, 1h)"),
                ));
            }
            _ if dotted => {
                let path = self.path()?;
                let written = path_as_written(&path);
                return Err(error(
                    pos,
                    format!("`{written}` is a field of an event: read it inside a `where` filter or with last(any, {written})"),
                ));
            }
            _ => {
                return Err(error(
                    pos,
                    format!("unknown name `{name}`; did you mean trait.{name} or a quoted string?"),
                ));
            }
        };
        Ok(Expr { kind, pos })
    }

    /// The arguments of a call, after `name(`; the caller takes the `)`.
    fn call(&mut self, name: &str) -> Result<ExprKind, SpecError> {
        if let Some(kind) = agg_kind(name) {
            let sel = self.selector()?;
            self.expect(Tok::Comma, &format!("after the events of {name}(…)"))?;
            let path = if kind == AggKind::Count {
                None
            } else {
                let p = self.path()?;
                self.expect(Tok::Comma, &format!("after the path in {name}(…)"))?;
                Some(p)
            };
            let window = self.window()?;
            return Ok(ExprKind::Agg { kind, sel, path, window });
        }
        Ok(match name {
            "last" => {
                let sel = self.selector()?;
                self.expect(Tok::Comma, "after the events of last(…)")?;
                let path = self.path()?;
                ExprKind::Last { sel, path }
            }
            "since" => ExprKind::Since(self.selector()?),
            "time" => ExprKind::Time(Box::new(self.expr()?)),
            "last_time" | "first_time" => ExprKind::EventTime {
                sel: self.selector()?,
                first: name == "first_time",
            },
            "steps" | "sequence" => {
                let mut sels = vec![self.selector()?];
                let window = loop {
                    self.expect(Tok::Comma, &format!("between the steps of {name}(…), and before its window"))?;
                    if let Tok::Dur(ms, _) = *self.peek() {
                        self.advance();
                        break ms;
                    }
                    sels.push(self.selector()?);
                };
                if sels.len() < 2 {
                    return Err(error(
                        self.pos(),
                        format!(
                            "{name}(…) needs at least two steps before its window, as in {name}('Product Viewed', 'Order Completed', 7d)"
                        ),
                    ));
                }
                let n = sels.len();
                let steps = ExprKind::Steps { sels, window };
                if name == "sequence" {
                    // sequence(…) is steps(…) == n.
                    let pos = self.pos();
                    let steps = Expr { kind: steps, pos };
                    let n = Expr {
                        kind: ExprKind::Num(Dec::from_int(n as i64)),
                        pos,
                    };
                    ExprKind::Cmp(CmpOp::Eq, Box::new(steps), Box::new(n))
                } else {
                    steps
                }
            }
            "distance" => {
                let mut args = vec![self.expr()?];
                for _ in 0..3 {
                    self.expect(Tok::Comma, "between the four arguments of distance(lat1, lon1, lat2, lon2)")?;
                    args.push(self.expr()?);
                }
                ExprKind::Distance(args)
            }
            "inside" => {
                let lat = Box::new(self.expr()?);
                self.expect(Tok::Comma, "after the latitude in inside(lat, lon, 'zone')")?;
                let lon = Box::new(self.expr()?);
                self.expect(Tok::Comma, "after the longitude in inside(lat, lon, 'zone')")?;
                let Tok::Str(zone) = self.peek().clone() else {
                    return Err(self.unexpected("a quoted zone name, as in inside(lat, lon, 'brooklyn')"));
                };
                self.advance();
                ExprKind::Inside(lat, lon, zone)
            }
            "hour" | "weekday" => {
                let time = Box::new(self.expr()?);
                let zone = if *self.peek() == Tok::Comma {
                    self.advance();
                    Some(Box::new(self.expr()?))
                } else {
                    None
                };
                let part = if name == "hour" { ClockPart::Hour } else { ClockPart::Weekday };
                ExprKind::Clock { part, time, zone }
            }
            "sqrt" => ExprKind::Sqrt(Box::new(self.expr()?)),
            "abs" => ExprKind::Abs(Box::new(self.expr()?)),
            "percentile" => {
                let e = self.expr()?;
                self.expect(Tok::Comma, "after the expression in percentile(…)")?;
                let pos = self.pos();
                let Tok::Num(text) = self.peek().clone() else {
                    return Err(self.unexpected("a number (the percentile, 0 to 100)"));
                };
                self.advance();
                let p: f64 = text.parse().map_err(|_| error(pos, format!("`{text}` is not a number")))?;
                if !(0.0..=100.0).contains(&p) {
                    return Err(error(pos, format!("percentile {text} is not between 0 and 100")));
                }
                ExprKind::Percentile(Box::new(e), p)
            }
            "in_segment" => {
                let Tok::Str(s) = self.peek().clone() else {
                    return Err(self.unexpected("a quoted segment name, as in in_segment('buyers')"));
                };
                self.advance();
                ExprKind::InSegment(s)
            }
            _ => unreachable!("is_function and call agree"),
        })
    }

    fn selector(&mut self) -> Result<Selector, SpecError> {
        let event = match self.peek().clone() {
            Tok::Str(s) => {
                self.advance();
                EventSel::Track(s)
            }
            Tok::Name(n) if n == "page" || n == "screen" => {
                self.advance();
                let name = if let Tok::Str(s) = self.peek().clone() {
                    self.advance();
                    Some(s)
                } else {
                    None
                };
                if n == "page" {
                    EventSel::Page(name)
                } else {
                    EventSel::Screen(name)
                }
            }
            Tok::Name(n) if n == "identify" => {
                self.advance();
                EventSel::Identify
            }
            Tok::Name(n) if n == "any" => {
                self.advance();
                EventSel::Any
            }
            _ => return Err(self.unexpected("events: a quoted event name such as 'Order Completed', page, screen, identify or any")),
        };
        let filter = if self.is_name("where") {
            self.advance();
            let outer = std::mem::replace(&mut self.in_filter, true);
            let f = self.expr();
            self.in_filter = outer;
            Some(Box::new(f?))
        } else {
            None
        };
        Ok(Selector { event, filter })
    }

    fn path(&mut self) -> Result<Path, SpecError> {
        let Tok::Name(first) = self.peek().clone() else {
            return Err(self.unexpected("a path such as `amount` or `context.device.type`"));
        };
        self.advance();
        let mut segments = vec![first];
        while *self.peek() == Tok::Dot {
            self.advance();
            let Tok::Name(next) = self.peek().clone() else {
                return Err(self.unexpected("a name after `.`"));
            };
            self.advance();
            segments.push(next);
        }
        Ok(resolve_path(segments))
    }

    fn window(&mut self) -> Result<Window, SpecError> {
        match self.peek().clone() {
            Tok::Dur(ms, _) => {
                self.advance();
                Ok(Window::Dur(ms))
            }
            Tok::Name(n) if n == "lifetime" => {
                self.advance();
                Ok(Window::Lifetime)
            }
            Tok::Num(n) => Err(error(
                self.pos(),
                format!("a window needs a unit: write {n}s, {n}m, {n}h, {n}d, … or lifetime"),
            )),
            _ => Err(self.unexpected("a window: a duration such as 48h, or lifetime")),
        }
    }
}

/// A resolved path as the user most likely wrote it (`properties.` dropped).
fn path_as_written(p: &Path) -> String {
    if p.0.len() > 1 && p.0[0] == "properties" {
        p.0[1..].join(".")
    } else {
        p.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(src: &str) -> Expr {
        parse_when(src).unwrap_or_else(|e| panic!("{src}: {e}"))
    }

    fn err(src: &str) -> SpecError {
        match parse_when(src) {
            Ok(e) => panic!("{src} parsed: {e:?}"),
            Err(e) => e,
        }
    }

    /// A compact rendering of the tree, to assert shapes.
    fn show(e: &Expr) -> String {
        use ExprKind::*;
        match &e.kind {
            Num(d) => d.to_string(),
            Str(s) => quote(s),
            Dur(ms) => format!("{ms}ms"),
            Bool(b) => b.to_string(),
            Path(p) => format!("${p}"),
            Neg(a) => format!("(-{})", show(a)),
            Not(a) => format!("(not {})", show(a)),
            And(a, b) => format!("({} and {})", show(a), show(b)),
            Or(a, b) => format!("({} or {})", show(a), show(b)),
            Arith(op, a, b) => format!("({} {:?} {})", show(a), op, show(b)),
            Cmp(op, a, b) => format!("({} {} {})", show(a), cmp_text(*op), show(b)),
            Agg { kind, sel, path, window } => {
                let path = path.as_ref().map(|p| format!(" ${p}")).unwrap_or_default();
                format!("{kind:?}[{}{path} {window:?}]", show_sel(sel))
            }
            Last { sel, path } => format!("Last[{} ${path}]", show_sel(sel)),
            Since(sel) => format!("Since[{}]", show_sel(sel)),
            Sqrt(a) => format!("sqrt({})", show(a)),
            Abs(a) => format!("abs({})", show(a)),
            Percentile(a, q) => format!("percentile({}, {q})", show(a)),
            InSegment(s) => format!("in_segment({s})"),
            Trait(s) => format!("trait.{s}"),
            Score(s) => format!("score.{s}"),
            Rfm(f) => format!("rfm.{f:?}"),
            Cluster(s) => format!("cluster.{s}"),
            Predict(s) => format!("predict.{s}"),
            Now => "now".into(),
            Distance(args) => format!("distance({})", args.iter().map(show).collect::<Vec<_>>().join(", ")),
            Steps { sels, window } => format!("steps({}, {window}ms)", sels.iter().map(show_sel).collect::<Vec<_>>().join(", ")),
            Inside(a, b, z) => format!("inside({}, {}, {z})", show(a), show(b)),
            Time(a) => format!("time({})", show(a)),
            EventTime { sel, first } => format!("{}[{}]", if *first { "FirstTime" } else { "LastTime" }, show_sel(sel)),
            Clock { part, time, zone } => match zone {
                Some(z) => format!("{part:?}({}, {})", show(time), show(z)),
                None => format!("{part:?}({})", show(time)),
            },
        }
    }

    #[test]
    fn times() {
        assert_eq!(
            show(&p("time(trait.trial_ends_at) - now <= 3d")),
            "((time(trait.trial_ends_at) Sub now) <= 259200000ms)"
        );
        assert_eq!(
            show(&p("hour(now, last(any, context.timezone)) >= 18 and weekday(last_time('x')) < 5")),
            "((Hour(now, Last[Any $context.timezone]) >= 18) and (Weekday(LastTime[Track(\"x\")]) < 5))"
        );
        assert_eq!(
            show(&p("now - first_time(page) > -2h")),
            "((now Sub FirstTime[Page(None)]) > (-7200000ms))"
        );
        // Inside a filter `now` is a field of the event, like any name.
        assert_eq!(
            show(&p("count('x' where now > 1, 1h) > 0")),
            "(Count[Track(\"x\") where ($properties.now > 1) Dur(3600000)] > 0)"
        );
        assert_eq!(err("hour()").message, "expected an expression, found `)`");
        assert_eq!(
            show(&p("sequence('a', page 'pricing', 7d)")),
            "(steps(Track(\"a\"), Page(Some(\"pricing\")), 604800000ms) == 2)"
        );
        assert!(err("steps('a', 1h) > 1").message.contains("needs at least two steps"));
        assert!(err("steps('a', 'b') > 1").message.contains("between the steps of steps(…)"));
    }

    fn show_sel(s: &Selector) -> String {
        match &s.filter {
            Some(f) => format!("{:?} where {}", s.event, show(f)),
            None => format!("{:?}", s.event),
        }
    }

    #[test]
    fn precedence() {
        // Bare names are only valid in filters; use traits for the shape.
        assert_eq!(
            show(&p("trait.a or trait.b and not trait.c")),
            "(trait.a or (trait.b and (not trait.c)))"
        );
        assert_eq!(show(&p("not trait.a == 1 and true")), "((not (trait.a == 1)) and true)");
        assert_eq!(show(&p("1 + 2 * 3 - -4 / 2 >= 5")), "(((1 Add (2 Mul 3)) Sub (-4 Div 2)) >= 5)");
        assert_eq!(show(&p("-(trait.x) * 2")), "((-trait.x) Mul 2)");
        assert_eq!(show(&p("(trait.a or trait.b) and trait.c")), "((trait.a or trait.b) and trait.c)");
        assert_eq!(show(&p("1 - 2 - 3")), "((1 Sub 2) Sub 3)");
    }

    #[test]
    fn filter_inside_count_ends_at_comma() {
        let e = p("count(page where scroll_pct >= 75, 1h) >= 1");
        assert_eq!(
            show(&e),
            "(Count[Page(None) where ($properties.scroll_pct >= 75) Dur(3600000)] >= 1)"
        );
        let e = p("sum('buy' where amount > 5 and context.app.version != '1.0', amount, lifetime)");
        assert_eq!(
            show(&e),
            "Sum[Track(\"buy\") where (($properties.amount > 5) and ($context.app.version != '1.0')) $properties.amount Lifetime]"
        );
        let e = p("count(page 'pricing', 1h) >= 2 and distinct(any, session, 1h) >= 2");
        assert_eq!(
            show(&e),
            "((Count[Page(Some(\"pricing\")) Dur(3600000)] >= 2) and (Distinct[Any $properties.session Dur(3600000)] >= 2))"
        );
        assert_eq!(
            show(&p("last(any, context.device.type) == 'mobile'")),
            "(Last[Any $context.device.type] == 'mobile')"
        );
        assert_eq!(
            show(&p("since(screen where count > 1) > 30s")),
            "(Since[Screen(None) where ($properties.count > 1)] > 30000ms)"
        );
        assert_eq!(show(&p("count(identify, 1d) >= 1")), "(Count[Identify Dur(86400000)] >= 1)");
        assert_eq!(
            show(&p("last(identify, traits.plan) == 'pro'")),
            "(Last[Identify $traits.plan] == 'pro')"
        );
    }

    #[test]
    fn string_escapes() {
        let e = p(r#"trait.name == 'it\'s a \\ "q" \n\t' or trait.name == "say \"hi\"""#);
        let ExprKind::Or(a, b) = e.kind else { panic!() };
        let ExprKind::Cmp(_, _, s) = a.kind else { panic!() };
        assert_eq!(s.kind, ExprKind::Str("it's a \\ \"q\" \n\t".into()));
        let ExprKind::Cmp(_, _, s) = b.kind else { panic!() };
        assert_eq!(s.kind, ExprKind::Str("say \"hi\"".into()));
        let e = err("trait.a == 'x\\q'");
        assert_eq!((e.line, e.column), (1, 14));
        assert!(e.message.contains("unknown escape"), "{e}");
        let e = err("trait.a == 'open");
        assert_eq!((e.line, e.column), (1, 12));
        assert!(e.message.contains("unterminated"), "{e}");
    }

    #[test]
    fn durations_and_numbers() {
        let dur = |s: &str| match p(&format!("since(any) > {s}")).kind {
            ExprKind::Cmp(_, _, d) => d.kind,
            _ => panic!(),
        };
        assert_eq!(dur("250ms"), ExprKind::Dur(250));
        assert_eq!(dur("30s"), ExprKind::Dur(30_000));
        assert_eq!(dur("5m"), ExprKind::Dur(300_000));
        assert_eq!(dur("48h"), ExprKind::Dur(48 * 3_600_000));
        assert_eq!(dur("2d"), ExprKind::Dur(2 * 86_400_000));
        assert_eq!(dur("1w"), ExprKind::Dur(604_800_000));
        assert_eq!(dur("0.25"), ExprKind::Num(Dec(250_000)));
        assert_eq!(dur("-3"), ExprKind::Num(Dec::from_int(-3)));
        assert!(err("since(any) > 0s").message.contains("greater than zero"));
        assert!(err("since(any) > 1.5h").message.contains("not a duration"));
        assert!(err("since(any) > 3x").message.contains("not a duration"));
        assert!(err("count(any, 48) > 1").message.contains("needs a unit"));
        match p("count('x', 90m) > 1").kind {
            ExprKind::Cmp(_, a, _) => assert!(matches!(
                a.kind,
                ExprKind::Agg {
                    window: Window::Dur(5_400_000),
                    ..
                }
            )),
            _ => panic!(),
        }
        assert_eq!(format_duration(1000), "1s");
        assert_eq!(format_duration(1500), "1500ms");
        assert_eq!(format_duration(48 * 3_600_000), "2d");
        assert_eq!(format_duration(90 * 60_000), "90m");
    }

    #[test]
    fn other_primaries() {
        assert_eq!(show(&p("in_segment('buyer')")), "in_segment(buyer)");
        assert_eq!(show(&p("score.engagement > 10")), "(score.engagement > 10)");
        assert_eq!(show(&p("rfm.segment == 'champions'")), "(rfm.Segment == 'champions')");
        assert_eq!(show(&p("cluster.behavior == 2")), "(cluster.behavior == 2)");
        assert_eq!(
            show(&p("sqrt(abs(trait.x)) > percentile(trait.x, 90)")),
            "(sqrt(abs(trait.x)) > percentile(trait.x, 90))"
        );
        assert!(err("rfm.q > 1").message.contains("rfm.r"));
    }

    #[test]
    fn errors_have_positions() {
        let e = err("plan == 'x'");
        assert_eq!((e.line, e.column), (1, 1));
        assert_eq!(e.message, "unknown name `plan`; did you mean trait.plan or a quoted string?");
        let e = err("count('a', 1h) >= 1\n  and  foo > 2");
        assert_eq!((e.line, e.column), (2, 8));
        let e = err("count('a', 1h) >= 1 >= 2");
        assert!(e.message.contains("chained"), "{e}");
        let e = err("count('a' 1h)");
        assert_eq!(
            (e.line, e.column, e.message.as_str()),
            (1, 11, "expected `,` after the events of count(…), found duration `1h`")
        );
        let e = err("count('a', 1h) >= ");
        assert_eq!((e.line, e.column), (1, 19));
        let e = err("trait.a = 1");
        assert!(e.message.contains("=="), "{e}");
        let e = err("context.device.type == 'x'");
        assert!(e.message.contains("last(any, context.device.type)"), "{e}");
        let e = err("(trait.a");
        assert!(e.message.contains("`)`"), "{e}");
        let e = err("trait.a)");
        assert_eq!(e.message, "unmatched `)`");
        assert!(parse_when(&"(".repeat(1000)).is_err());
        assert!(parse_when(&"not ".repeat(1000)).is_err());
        assert!(parse_when(&"- ".repeat(1000)).is_err());
        assert!(parse_when(&format!("true{}", " and true".repeat(1000)))
            .unwrap_err()
            .message
            .contains("too deeply"));
        assert!(parse_when(&format!("1{} > 0", " + 1".repeat(1000)))
            .unwrap_err()
            .message
            .contains("too deeply"));
    }

    #[test]
    fn paths() {
        assert_eq!(parse_path("revenue").unwrap().0, vec!["properties", "revenue"]);
        assert_eq!(parse_path("properties.a.b").unwrap().0, vec!["properties", "a", "b"]);
        assert_eq!(parse_path("traits.plan").unwrap().0, vec!["traits", "plan"]);
        assert_eq!(parse_path("cart.total").unwrap().0, vec!["properties", "cart", "total"]);
        assert!(parse_path("a.").is_err());
        assert!(parse_path("a b").is_err());
    }
}
