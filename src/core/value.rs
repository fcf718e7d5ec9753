//! Scalar values and their arithmetic (SPEC §4 "Numbers" and "Missing").
//!
//! Exact numbers are [`Dec`]: a fixed-point decimal with six places held in an
//! `i128`, so `0.1 + 0.2 == 0.3` and money never drifts. Results of `avg`,
//! `var`, `/` and `sqrt` are [`Value::Float`]. `Missing` is a value like any
//! other so that it flows through the dataflow; every operation on it yields
//! `Missing`, and every comparison with it is false.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;

/// Units per 1 in a [`Dec`].
pub const SCALE: i128 = 1_000_000;

/// An exact decimal number with six decimal places.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
// Aligned to 8, not 16: an i128 would make every `Value` (and every fact
// payload) 32 bytes with padding; packed it is 24.
#[repr(C, packed(8))]
pub struct Dec(pub i128);

impl Dec {
    pub const ZERO: Dec = Dec(0);

    pub fn from_int(n: i64) -> Dec {
        Dec(n as i128 * SCALE)
    }

    /// Parses a JSON number's text exactly, rounding beyond six decimal
    /// places half-even. `None` when it does not fit.
    pub fn parse(text: &str) -> Option<Dec> {
        Dec::parse_plain(text).or_else(|| Dec::parse_general(text))
    }

    /// The common case — at most 18 integer digits and 6 decimals, no
    /// exponent — in one pass, without allocating; `None` leaves the text
    /// to [`Dec::parse_general`] (a unit test holds both to the same
    /// answers).
    fn parse_plain(text: &str) -> Option<Dec> {
        let bytes = text.as_bytes();
        let (neg, bytes) = match bytes.first()? {
            b'-' => (true, &bytes[1..]),
            _ => (false, bytes),
        };
        let (int, frac) = match bytes.iter().position(|&b| b == b'.') {
            Some(i) if i + 1 < bytes.len() => (&bytes[..i], &bytes[i + 1..]),
            Some(_) => return None,
            None => (bytes, &bytes[..0]),
        };
        if int.is_empty() || int.len() > 18 || frac.len() > 6 {
            return None;
        }
        let mut units: i128 = 0;
        for &b in int.iter().chain(frac) {
            if !b.is_ascii_digit() {
                return None;
            }
            units = units * 10 + (b - b'0') as i128;
        }
        units *= 10i128.pow(6 - frac.len() as u32);
        Some(Dec(if neg { -units } else { units }))
    }

    /// Any number's text: exponents, long mantissas, rounding.
    fn parse_general(text: &str) -> Option<Dec> {
        let (neg, rest) = match text.as_bytes().first()? {
            b'-' => (true, &text[1..]),
            b'+' => (false, &text[1..]),
            _ => (false, text),
        };
        let (mantissa, exp) = match rest.find(['e', 'E']) {
            Some(i) => (&rest[..i], rest[i + 1..].parse::<i32>().ok()?),
            None => (rest, 0),
        };
        let (int, frac) = match mantissa.find('.') {
            Some(i) => (&mantissa[..i], &mantissa[i + 1..]),
            None => (mantissa, ""),
        };
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        // digits = int ++ frac, value = digits * 10^(exp - frac.len())
        let digits: String = int.chars().chain(frac.chars()).collect();
        let digits = digits.trim_start_matches('0');
        let shift = exp as i64 - frac.len() as i64 + 6; // power of ten on the unit count
        if digits.is_empty() {
            return Some(Dec(0));
        }
        if digits.len() as i64 + shift > 36 {
            return None;
        }
        let units = if shift >= 0 {
            let mut v: i128 = digits.parse().ok()?;
            for _ in 0..shift {
                v = v.checked_mul(10)?;
            }
            v
        } else {
            let cut = (-shift) as usize;
            if cut > digits.len() {
                // Everything is below the sixth place: rounds to zero unless
                // it is more than half a unit, which needs cut == len + 0.
                let lead = digits.as_bytes()[0];
                let rounds_up = cut == digits.len() && (lead > b'5' || (lead == b'5' && digits[1..].bytes().any(|b| b != b'0')));
                if rounds_up {
                    1
                } else {
                    0
                }
            } else {
                let (keep, dropped) = digits.split_at(digits.len() - cut);
                let mut v: i128 = if keep.is_empty() { 0 } else { keep.parse().ok()? };
                let first = dropped.as_bytes()[0];
                let rest_nonzero = dropped[1..].bytes().any(|b| b != b'0');
                let up = first > b'5' || (first == b'5' && (rest_nonzero || v % 2 == 1));
                if up {
                    v += 1;
                }
                v
            }
        };
        Some(Dec(if neg { -units } else { units }))
    }

    pub fn to_f64(self) -> f64 {
        self.0 as f64 / SCALE as f64
    }

    pub fn checked_add(self, o: Dec) -> Option<Dec> {
        self.0.checked_add(o.0).map(Dec)
    }

    pub fn checked_sub(self, o: Dec) -> Option<Dec> {
        self.0.checked_sub(o.0).map(Dec)
    }

    /// Exact product rounded half-even to six places; `None` only when the
    /// result does not fit. The scaled product `a·b` can exceed an i128
    /// while `a·b / SCALE` fits, so it is taken in parts: with
    /// `a = aq·S + ar` and `b = bq·S + br`, `a·b / S = a·bq + aq·br +
    /// ar·br / S` (all truncating toward zero with the sign of `a·b`).
    pub fn checked_mul(self, o: Dec) -> Option<Dec> {
        let (a, b) = (self.0, o.0);
        let (aq, ar, bq, br) = (a / SCALE, a % SCALE, b / SCALE, b % SCALE);
        let whole = a.checked_mul(bq)?.checked_add(aq.checked_mul(br)?)?;
        let (q, r) = (whole.checked_add(ar * br / SCALE)?, ar * br % SCALE);
        let negative = (a < 0) != (b < 0);
        let half = SCALE / 2;
        let adj = match r.abs().cmp(&half) {
            Ordering::Greater => 1,
            Ordering::Less => 0,
            Ordering::Equal => (q % 2 != 0) as i128,
        };
        Some(Dec(if negative { q.checked_sub(adj)? } else { q.checked_add(adj)? }))
    }
}

impl std::fmt::Display for Dec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let a = self.0.unsigned_abs();
        let int = a / SCALE as u128;
        let frac = a % SCALE as u128;
        if frac == 0 {
            write!(f, "{sign}{int}")
        } else {
            let s = format!("{frac:06}");
            write!(f, "{sign}{int}.{}", s.trim_end_matches('0'))
        }
    }
}

/// A 64-bit float with a total order, so it can live in a collection.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Float(pub f64);

impl PartialEq for Float {
    fn eq(&self, o: &Self) -> bool {
        self.0.total_cmp(&o.0) == Ordering::Equal
    }
}
impl Eq for Float {}
impl PartialOrd for Float {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Float {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0)
    }
}
impl std::hash::Hash for Float {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.to_bits().hash(h)
    }
}

/// A runtime value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Value {
    Missing,
    Bool(bool),
    Num(Dec),
    Float(Float),
    Str(compact_str::CompactString),
    /// A duration in milliseconds, possibly negative.
    Dur(i64),
    /// An instant, in milliseconds since the Unix epoch (SPEC §4 "Times").
    Time(i64),
}

impl Value {
    /// The value of a JSON scalar as read from an event: `null`, arrays and
    /// objects read as missing; numbers keep their exact text.
    pub fn from_json(v: &serde_json::Value) -> Value {
        match v {
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => Value::from_number(n.as_str()),
            serde_json::Value::String(s) => Value::Str(s.as_str().into()),
            _ => Value::Missing,
        }
    }

    /// The value of a JSON number's text: exact when it fits a [`Dec`].
    pub fn from_number(text: &str) -> Value {
        match Dec::parse(text) {
            Some(d) => Value::Num(d),
            // A number beyond f64 (`1e400`) parses to infinity: missing,
            // as every other non-finite value is.
            None => text.parse::<f64>().map(Value::float).unwrap_or(Value::Missing),
        }
    }

    pub fn is_missing(&self) -> bool {
        matches!(self, Value::Missing)
    }

    /// The numeric value as a float, for numbers only.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Num(d) => Some(d.to_f64()),
            Value::Float(f) => Some(f.0),
            _ => None,
        }
    }

    pub fn is_number(&self) -> bool {
        matches!(self, Value::Num(_) | Value::Float(_))
    }

    fn float(f: f64) -> Value {
        if f.is_finite() {
            Value::Float(Float(f))
        } else {
            Value::Missing
        }
    }

    /// `self OP other` for `+ - * /` with SPEC §4's rules: exact over exact
    /// numbers, float as soon as a float is involved, `/` always float,
    /// missing on a missing operand, a wrong type, `x / 0` or overflow.
    pub fn arith(&self, op: crate::core::value::ArithOp, other: &Value) -> Value {
        use crate::core::value::ArithOp::*;
        match (self, other) {
            (Value::Num(a), Value::Num(b)) => match op {
                Add => a.checked_add(*b).map(Value::Num).unwrap_or(Value::Missing),
                Sub => a.checked_sub(*b).map(Value::Num).unwrap_or(Value::Missing),
                Mul => a.checked_mul(*b).map(Value::Num).unwrap_or(Value::Missing),
                Div => {
                    if b.0 == 0 {
                        Value::Missing
                    } else {
                        Value::float(a.0 as f64 / b.0 as f64)
                    }
                }
            },
            (Value::Time(a), Value::Time(b)) if op == Sub => a.checked_sub(*b).map(Value::Dur).unwrap_or(Value::Missing),
            (Value::Time(a), Value::Dur(b)) if matches!(op, Add | Sub) => {
                let t = if op == Add { a.checked_add(*b) } else { a.checked_sub(*b) };
                t.map(Value::Time).unwrap_or(Value::Missing)
            }
            (Value::Dur(a), Value::Time(b)) if op == Add => a.checked_add(*b).map(Value::Time).unwrap_or(Value::Missing),
            (Value::Dur(a), Value::Dur(b)) => match op {
                Add => a.checked_add(*b).map(Value::Dur).unwrap_or(Value::Missing),
                Sub => a.checked_sub(*b).map(Value::Dur).unwrap_or(Value::Missing),
                Div if *b != 0 => Value::float(*a as f64 / *b as f64),
                _ => Value::Missing,
            },
            (Value::Dur(d), n) | (n, Value::Dur(d)) if op == Mul && n.is_number() => {
                // Beyond an i64 of milliseconds the product is missing,
                // not saturated (a saturated one overflowed `abs`, `-`).
                let f = (*d as f64 * n.as_f64().unwrap_or(f64::NAN)).round();
                if f.is_finite() && f.abs() < i64::MAX as f64 {
                    Value::Dur(f as i64)
                } else {
                    Value::Missing
                }
            }
            (a, b) if a.is_number() && b.is_number() => {
                let (x, y) = (a.as_f64().unwrap_or(f64::NAN), b.as_f64().unwrap_or(f64::NAN));
                match op {
                    Add => Value::float(x + y),
                    Sub => Value::float(x - y),
                    Mul => Value::float(x * y),
                    Div if y == 0.0 => Value::Missing,
                    Div => Value::float(x / y),
                }
            }
            _ => Value::Missing,
        }
    }

    pub fn neg(&self) -> Value {
        match self {
            Value::Num(d) => d.0.checked_neg().map_or(Value::Missing, |n| Value::Num(Dec(n))),
            Value::Float(f) => Value::float(-f.0),
            Value::Dur(d) => d.checked_neg().map_or(Value::Missing, Value::Dur),
            _ => Value::Missing,
        }
    }

    pub fn abs(&self) -> Value {
        match self {
            Value::Num(d) => d.0.checked_abs().map_or(Value::Missing, |n| Value::Num(Dec(n))),
            Value::Float(f) => Value::float(f.0.abs()),
            Value::Dur(d) => d.checked_abs().map_or(Value::Missing, Value::Dur),
            _ => Value::Missing,
        }
    }

    pub fn sqrt(&self) -> Value {
        match self.as_f64() {
            Some(x) if x >= 0.0 => Value::float(x.sqrt()),
            _ => Value::Missing,
        }
    }

    /// Compares two values of the same kind; `None` when either is missing
    /// or their kinds cannot be compared (the comparison is then false).
    pub fn compare(&self, other: &Value) -> Option<Ordering> {
        match (self, other) {
            (Value::Num(a), Value::Num(b)) => Some(a.cmp(b)),
            (a, b) if a.is_number() && b.is_number() => a.as_f64()?.partial_cmp(&b.as_f64()?),
            (Value::Str(a), Value::Str(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
            (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
            (Value::Dur(a), Value::Dur(b)) => Some(a.cmp(b)),
            (Value::Time(a), Value::Time(b)) => Some(a.cmp(b)),
            _ => None,
        }
    }

    /// `self OP other`, false whenever either side is missing or the kinds
    /// differ (`!=` too).
    pub fn cmp_op(&self, op: crate::core::value::CmpOp, other: &Value) -> bool {
        use crate::core::value::CmpOp::*;
        match self.compare(other) {
            None => false,
            Some(o) => match op {
                Ge => o != Ordering::Less,
                Gt => o == Ordering::Greater,
                Le => o != Ordering::Greater,
                Lt => o == Ordering::Less,
                Eq => o == Ordering::Equal,
                Ne => o != Ordering::Equal,
            },
        }
    }
}

/// An arithmetic operator of the `when` language.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
/// A comparison of the `when` language.
pub enum CmpOp {
    Ge,
    Gt,
    Le,
    Lt,
    Eq,
    Ne,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ast::{ArithOp, CmpOp};

    proptest::proptest! {
        /// The product in parts is the product in one, wherever that one fits.
        #[test]
        fn products_in_parts_agree_with_the_scaled_product(a in proptest::num::i128::ANY, b in -(1i128 << 70)..(1i128 << 70)) {
            let (a, b) = (a >> (a.unsigned_abs() as u32 % 100), b);
            if let Some(p) = a.checked_mul(b) {
                let (q, r) = (p / SCALE, p % SCALE);
                let adj = match r.abs().cmp(&(SCALE / 2)) {
                    Ordering::Greater => 1,
                    Ordering::Less => 0,
                    Ordering::Equal => (q % 2 != 0) as i128,
                };
                let want = if p < 0 { q - adj } else { q + adj };
                proptest::prop_assert_eq!(Dec(a).checked_mul(Dec(b)).map(|d| d.0), Some(want));
            }
        }
    }

    #[test]
    fn large_products_that_fit_are_exact() {
        // Found by review: 1e24 × 1000 overflowed the scaled product.
        let big = Dec(1_000_000_000_000_000_000_000_000 * SCALE);
        let product = big.checked_mul(Dec::from_int(1000)).expect("fits");
        assert_eq!({ product.0 }, 1_000_000_000_000_000_000_000_000_000 * SCALE);
        assert_eq!(big.checked_mul(Dec::from_int(-1000)).map(|d| -d.0), Some(product.0));
        assert!(Dec(i128::MAX).checked_mul(Dec::from_int(2)).is_none());
    }

    #[test]
    fn durations_beyond_an_i64_are_missing_not_saturated() {
        let hour = Value::Dur(3_600_000);
        let huge = hour.arith(ArithOp::Mul, &Value::Float(Float(-1e30)));
        assert!(huge.is_missing(), "{huge:?}");
        assert!(huge.abs().is_missing() && huge.neg().is_missing());
        assert!(Value::Dur(i64::MIN).abs().is_missing());
        assert!(Value::Dur(i64::MIN).neg().is_missing());
        assert_eq!(hour.arith(ArithOp::Mul, &Value::Num(Dec::from_int(2))), Value::Dur(7_200_000));
    }

    #[test]
    fn numbers_beyond_a_float_are_missing() {
        assert!(Value::from_number("1e400").is_missing());
        assert!(Value::from_number("-1e400").is_missing());
        assert_eq!(Value::from_number("1e300"), Value::Float(Float(1e300)));
    }

    proptest::proptest! {
        /// The one-pass reading answers only where the general one agrees.
        #[test]
        fn plain_parsing_agrees_with_the_general(text in "[-+]?[0-9]{0,21}(\\.[0-9]{0,8})?([eE][-+]?[0-9]{1,2})?") {
            if let Some(plain) = Dec::parse_plain(&text) {
                proptest::prop_assert_eq!(Some(plain), Dec::parse_general(&text), "{}", text);
            }
        }
    }

    #[test]
    fn plain_parsing_reads_what_it_should() {
        for (text, units) in [
            ("0", 0),
            ("-0", 0),
            ("007", 7_000_000),
            ("12.5", 12_500_000),
            ("-3.000001", -3_000_001),
            ("999999999999999999.999999", 999_999_999_999_999_999_999_999),
        ] {
            assert_eq!(Dec::parse_plain(text), Some(Dec(units)), "{text}");
        }
        for text in ["1.", ".5", "1e3", "1.0000001", "1234567890123456789", "+1", "", "-"] {
            assert_eq!(Dec::parse_plain(text), None, "{text}");
        }
    }

    fn d(s: &str) -> Dec {
        Dec::parse(s).unwrap()
    }

    #[test]
    fn parses_exactly_and_rounds_half_even() {
        assert_eq!({ d("0.1").0 }, 100_000);
        assert_eq!({ d("-2.5").0 }, -2_500_000);
        assert_eq!({ d("1e3").0 }, 1_000_000_000);
        assert_eq!({ d("1.5E-6").0 }, 2);
        assert_eq!({ d("2.5E-6").0 }, 2);
        assert_eq!({ d("0.0000005").0 }, 0);
        assert_eq!({ d("0.0000006").0 }, 1);
        assert_eq!({ d("0.00000051").0 }, 1);
        assert_eq!({ d("3.0000015").0 }, 3_000_002);
        assert_eq!(Dec::parse("1e40"), None);
        assert_eq!(Dec::parse("abc"), None);
    }

    #[test]
    fn money_does_not_drift() {
        let sum = Value::Num(d("0.1")).arith(ArithOp::Add, &Value::Num(d("0.2")));
        assert!(sum.cmp_op(CmpOp::Eq, &Value::Num(d("0.3"))));
        assert_eq!({ d("1.5").checked_mul(d("0.000001")).unwrap().0 }, 2);
    }

    #[test]
    fn missing_and_mismatched_compare_false() {
        let m = Value::Missing;
        assert!(!m.cmp_op(CmpOp::Ne, &Value::Num(Dec::ZERO)));
        assert!(!Value::Str("9".into()).cmp_op(CmpOp::Eq, &Value::Num(d("9"))));
        assert!(Value::Num(d("1")).arith(ArithOp::Div, &Value::Num(Dec::ZERO)).is_missing());
        assert!(Value::Num(d("-1")).sqrt().is_missing());
    }

    #[test]
    fn displays_trimmed() {
        assert_eq!(d("12.340").to_string(), "12.34");
        assert_eq!(d("-0.5").to_string(), "-0.5");
        assert_eq!(d("7").to_string(), "7");
    }
}

#[cfg(test)]
mod size_tests {
    #[test]
    fn values_and_facts_stay_small() {
        // Every windowed fact is held twice (window queue, arrangement):
        // their size is most of the memory per event in a window.
        assert_eq!(std::mem::size_of::<super::Value>(), 24);
        assert_eq!(std::mem::size_of::<crate::core::fact::Pay>(), 24);
        assert_eq!(std::mem::size_of::<crate::core::fact::Windowed>(), 40);
    }
}
