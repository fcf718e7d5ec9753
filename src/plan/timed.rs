//! When an atom that reads `now` can next change (SPEC §4 "Times").
//!
//! With its terms fixed, such an atom is a function of the clock alone,
//! and its value must change at exactly the right tick with no event
//! arriving. Evaluating every profile at every tick would cost the
//! population times the ticks; instead each profile's next possible change
//! is computed once and queued (`crate::dataflow::timed`), the way a
//! window's expiries are.
//!
//! The checker guarantees what makes this computable: `now` appears only
//! where each side of the comparison moves one way with the clock (never
//! in a divisor, under `sqrt` or `abs`, or on both sides of `*`), except
//! through `hour()` and `weekday()`, which are constant between the
//! instants where their local hour or day turns over. So:
//!
//! 1. every `hour()`/`weekday()` node that reads `now` keeps its value
//!    while its argument stays inside the span of its current hour or day
//!    ([`part_span`]); its argument is monotone in the clock, so the first
//!    tick where it leaves the span is found by bisection. The earliest of
//!    these is the *horizon*: before it, every clock part is constant;
//! 2. before the horizon each side of the comparison is monotone in the
//!    clock, so `lhs <= rhs` and `lhs >= rhs` each change at most once; the
//!    first tick where either changes is found by bisection too;
//! 3. the atom's next change is the earlier of the two, or the horizon,
//!    where everything is evaluated again.
//!
//! Bisection runs over ticks (the only instants a membership can change
//! at), from the current tick outwards in doubling steps, then inwards:
//! about `2·log2(distance / tick)` evaluations, 50 or so for a change a
//! month away at a one-second tick. The result is exact: the tick found is
//! the first at which the evaluated value differs.

use crate::core::clock::{part_span, MAX_TIME};
use crate::core::value::{ArithOp, CmpOp, Value};
use crate::plan::{AtomDef, Calc};

impl AtomDef {
    /// The first tick after `now` at which the atom may hold differently
    /// over the same `slots`: exactly where its comparison changes, or
    /// earlier where an `hour()`/`weekday()` turns over (the caller
    /// evaluates again there and asks anew). `None`: never again.
    pub fn next_change(&self, slots: &[Value], now: u64, tick: u64) -> Option<u64> {
        let last = MAX_TIME / tick * tick;
        let mut horizon = last;
        for side in [&self.lhs, &self.rhs] {
            side.clock_horizon(slots, now, tick, &mut horizon);
        }
        // Before the horizon both sides are monotone; at it, evaluate anew.
        let mut next = (horizon < last).then_some(horizon);
        if !self.lhs.reads_now_outside_clocks() && !self.rhs.reads_now_outside_clocks() {
            // Only clock parts move, and they are constant before the horizon.
            return next;
        }
        let compare = |op: CmpOp| move |t: u64| self.lhs.eval_at(slots, Some(t)).cmp_op(op, &self.rhs.eval_at(slots, Some(t)));
        for op in [CmpOp::Le, CmpOp::Ge] {
            if let Some(t) = first_change(compare(op), now, horizon.saturating_sub(tick), tick) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        next
    }
}

impl Calc {
    /// Whether the calc reads `now` other than through `hour()`/`weekday()`.
    fn reads_now_outside_clocks(&self) -> bool {
        match self {
            Calc::Lit(_) | Calc::Slot(_) | Calc::Clock(..) => false,
            Calc::Now => true,
            Calc::Neg(a) | Calc::Abs(a) | Calc::Sqrt(a) | Calc::Time(a) | Calc::Not(a) => a.reads_now_outside_clocks(),
            Calc::Arith(_, a, b) | Calc::Inside(a, b, _) | Calc::Cmp(_, a, b) | Calc::And(a, b) | Calc::Or(a, b) => {
                a.reads_now_outside_clocks() || b.reads_now_outside_clocks()
            }
            Calc::Distance(args) => args.iter().any(Calc::reads_now_outside_clocks),
        }
    }

    /// `now` itself, or `now` plus or minus a constant duration: the shift
    /// from the clock, for arguments whose span end gives the tick directly.
    fn clock_shift(&self) -> Option<i64> {
        match self {
            Calc::Now => Some(0),
            Calc::Arith(op @ (ArithOp::Add | ArithOp::Sub), a, b) => match (a.clock_shift(), &**b) {
                (Some(s), Calc::Lit(Value::Dur(d))) => {
                    if *op == ArithOp::Add {
                        s.checked_add(*d)
                    } else {
                        s.checked_sub(*d)
                    }
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// Lowers `horizon` to the first tick after `now` at which an
    /// `hour()`/`weekday()` node of this calc that reads `now` may take
    /// another value. Inner nodes first: an outer node's argument is
    /// monotone only while the inner ones are constant.
    fn clock_horizon(&self, slots: &[Value], now: u64, tick: u64, horizon: &mut u64) {
        match self {
            Calc::Lit(_) | Calc::Slot(_) | Calc::Now => {}
            Calc::Neg(a) | Calc::Abs(a) | Calc::Sqrt(a) | Calc::Time(a) | Calc::Not(a) => a.clock_horizon(slots, now, tick, horizon),
            Calc::Arith(_, a, b) | Calc::Inside(a, b, _) | Calc::Cmp(_, a, b) | Calc::And(a, b) | Calc::Or(a, b) => {
                a.clock_horizon(slots, now, tick, horizon);
                b.clock_horizon(slots, now, tick, horizon);
            }
            Calc::Distance(args) => args.iter().for_each(|a| a.clock_horizon(slots, now, tick, horizon)),
            Calc::Clock(part, time, zone) => {
                time.clock_horizon(slots, now, tick, horizon);
                if !time.reads_now() {
                    return;
                }
                let zone_at = |t: u64| match zone.as_ref().map(|z| z.eval_at(slots, Some(t))) {
                    None => Some(None),
                    Some(Value::Str(name)) => crate::core::clock::zone(&name).map(Some),
                    Some(_) => None,
                };
                // A missing time or zone stays missing: the clock never
                // makes a value appear (only a zone that reads `now` could,
                // and zones are strings, which never do).
                let (Value::Time(x), Some(z)) = (time.eval_at(slots, Some(now)), zone_at(now)) else {
                    return;
                };
                let Some((start, end)) = part_span(x, z.as_ref(), *part) else {
                    return;
                };
                if let Some(shift) = time.clock_shift() {
                    // The argument moves with the clock: it leaves the span
                    // at the first tick `t` with `t + shift >= end`.
                    let t = end.saturating_sub(shift).max(0) as u64;
                    *horizon = (*horizon).min(t.div_ceil(tick) * tick).max(now + tick);
                    return;
                }
                let inside = |t: u64| matches!(time.eval_at(slots, Some(t)), Value::Time(x) if start <= x && x < end);
                let limit = horizon.saturating_sub(tick);
                if let Some(t) = first_change(inside, now, limit, tick) {
                    *horizon = (*horizon).min(t);
                }
            }
        }
    }
}

/// The first tick `t` in `(from, limit]` (ticks are multiples of `tick`)
/// with `holds(t) != holds(from)`, for `holds` monotone over that range;
/// `None` when it keeps its value up to `limit`.
pub fn first_change(holds: impl Fn(u64) -> bool, from: u64, limit: u64, tick: u64) -> Option<u64> {
    if limit <= from {
        return None;
    }
    let at_from = holds(from);
    // Outwards in doubling steps until the value differs or the limit.
    let (mut lo, mut step) = (from, tick);
    let mut hi = loop {
        let t = from.saturating_add(step).min(limit);
        if holds(t) != at_from {
            break t;
        }
        if t == limit {
            return None;
        }
        lo = t;
        step = step.saturating_mul(2);
    };
    // Inwards: `lo` keeps the value, `hi` does not.
    while hi - lo > tick {
        let mid = lo + (hi - lo) / tick / 2 * tick;
        if holds(mid) != at_from {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Plan;
    use proptest::prelude::*;

    const TICK: u64 = 1_000;

    fn atom(when: &str) -> AtomDef {
        let spec = format!("[[segment]]\nname = \"s\"\nwhen = \"\"\"{when}\"\"\"\n");
        let plan = Plan::new(&crate::spec::parse_spec(&spec, TICK).expect("a valid spec"));
        assert_eq!(plan.atoms.len(), 1, "{when}");
        plan.atoms[0].clone()
    }

    /// The next change by stepping through every tick, up to `until`.
    fn stepping(a: &AtomDef, slots: &[Value], now: u64, until: u64) -> Option<u64> {
        let at = a.holds_at(slots, Some(now));
        (1..=(until - now) / TICK)
            .map(|i| now + i * TICK)
            .find(|&t| a.holds_at(slots, Some(t)) != at)
    }

    fn time(s: &str) -> Value {
        Value::Time(crate::core::clock::parse_time(s).unwrap() as i64)
    }

    #[test]
    fn first_change_finds_the_first_tick() {
        for edge in [1_000, 2_000, 7_000, 1_000_000, 123_456_000] {
            assert_eq!(first_change(|t| t >= edge, 0, 200_000_000, TICK), Some(edge));
        }
        assert_eq!(first_change(|t| t >= 5_000, 0, 4_000, TICK), None);
        assert_eq!(first_change(|_| true, 0, 1_000_000, TICK), None);
    }

    #[test]
    fn a_trial_ending_enters_and_exits_at_exact_ticks() {
        let a = atom("time(trait.trial_ends_at) - now <= 3d");
        let slots = [Value::Str("2024-03-20T12:00:00.500Z".into())];
        let now = 1_710_000_000_000; // 2024-03-09T16:00:00Z
        assert!(!a.holds_at(&slots, Some(now)));
        // trial_ends - t <= 3d first at t = 2024-03-17T12:00:01 (ticks are whole seconds).
        let enter = crate::core::clock::parse_time("2024-03-17T12:00:01Z").unwrap();
        assert_eq!(a.next_change(&slots, now, TICK), Some(enter));
        assert!(a.holds_at(&slots, Some(enter)));
        assert_eq!(a.next_change(&slots, enter, TICK), None);
        // The other half of the SPEC's example exits at the first tick at
        // or after the end: 12:00:01, as the end is not on a tick.
        let b = atom("time(trait.trial_ends_at) > now");
        let exit = crate::core::clock::parse_time("2024-03-20T12:00:01Z").unwrap();
        assert_eq!(b.next_change(&slots, enter, TICK), Some(exit));
        assert_eq!(time("2024-03-20T12:00:00.500Z"), crate::plan::as_time(&slots[0]));
    }

    #[test]
    fn missing_terms_never_change() {
        let a = atom("time(trait.trial_ends_at) - now <= 3d");
        assert_eq!(a.next_change(&[Value::Missing], 0, TICK), None);
        assert_eq!(a.next_change(&[Value::Str("not a time".into())], 0, TICK), None);
    }

    proptest! {
        /// The next change computed equals the one found by stepping
        /// through every tick, for times and hours around the clock.
        #[test]
        fn next_change_equals_stepping(
            which in 0usize..6,
            base in 0u64..2_000_000,
            offset in -200_000i64..200_000,
            hour in 0i64..24,
            zone in prop::sample::select(vec!["UTC", "Europe/Paris", "Asia/Kathmandu", "America/St_Johns", "Australia/Lord_Howe"]),
        ) {
            let whens = [
                "time(trait.x) - now <= 3h",
                "now - time(trait.x) > 90m and now - time(trait.x) < 5h",
                "hour(now) >= 18",
                "hour(now + 30m, trait.zone) == 7",
                "weekday(now, trait.zone) >= 5",
                "hour(time(trait.x)) + hour(now, trait.zone) == 20",
            ];
            let (when, n) = ((whens[which]), if which == 1 { 2 } else { 1 });
            let spec = format!("[[segment]]\nname = \"s\"\nwhen = \"{when}\"\n");
            let plan = Plan::new(&crate::spec::parse_spec(&spec, TICK).unwrap());
            prop_assert_eq!(plan.atoms.len(), n);
            // Around the 2024-03-31 and 2024-10-27 changes in Europe.
            let now = 1_711_800_000_000 + base * 10_000 / TICK * TICK;
            let x = (now as i64 + offset * 1_000) as u64;
            for a in &plan.atoms {
                let slots: Vec<Value> = a.terms.iter().map(|&t| match plan.streams[plan.terms[t].stream].read {
                    crate::plan::Read::Trait(ref name) if name == "zone" => Value::Str(zone.into()),
                    _ => Value::Str(crate::core::clock::format_time(x, true).into()),
                }).collect();
                let until = now + 3 * 86_400_000;
                let got = a.next_change(&slots, now, TICK).filter(|&t| t <= until);
                let want = stepping(a, &slots, now, until);
                // The computed tick may come early only where nothing changes:
                // then asking again from it must lead to the stepped one.
                let mut at = now;
                let mut next = got;
                while let Some(t) = next.filter(|&t| Some(t) != want && t <= until) {
                    prop_assert!(want.is_none_or(|w| t < w), "{} jumped past {:?} to {}", when, want, t);
                    prop_assert_eq!(a.holds_at(&slots, Some(t)), a.holds_at(&slots, Some(at)));
                    at = t;
                    next = a.next_change(&slots, t, TICK).filter(|&t| t <= until);
                }
                prop_assert_eq!(next, want, "{} hour {}", when, hour);
            }
        }
    }
}
