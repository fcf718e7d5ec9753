//! Event time and the clock (SPEC §3).
//!
//! All times are epoch milliseconds (`u64`). An event's tick is its time
//! rounded *up* to a multiple of the tick; the clock `now` is
//! `floor((T - lateness) / tick) * tick` for the largest accepted event time
//! `T` read so far and never goes back. Ticks at or before `now` are final.
//! The dataflow's timestamps are these ticks.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The latest event time there is: 9999-12-31T23:59:59.999Z, the last
/// instant RFC 3339 can write. Later epoch milliseconds are refused like any
/// other bad time, so ticks, lateness and window expiries computed from an
/// event time stay far from `u64::MAX` and can always be written as times.
pub const MAX_TIME: u64 = 253_402_300_799_999;

/// Parses an RFC 3339 time (offsets allowed) to epoch milliseconds,
/// truncating anything finer. Times before 1970 are refused.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| format!("{s:?} is not RFC 3339 ({e})"))?;
    let nanos = t.unix_timestamp_nanos();
    if nanos < 0 {
        return Err(format!("{s:?} is before 1970-01-01T00:00:00Z"));
    }
    Ok((nanos / 1_000_000) as u64)
}

/// Parses `--until` and `--start`: RFC 3339 or integer epoch milliseconds.
pub fn parse_time_arg(s: &str) -> Result<u64, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| format!("{s:?} is too large"));
    }
    parse_time(s)
}

/// Formats a tick as SPEC §5 wants: UTC with `Z`, milliseconds only when
/// `show_ms` (the tick is under a second). A tick rounded up past the last
/// event time (`MAX_TIME`, the end of 9999) has a five-digit year
/// (`time`'s `large-dates`, good to the year 999999).
///
/// The digits are written directly: through `format!` this was 2,700
/// instructions a call, once for every tick with output.
pub fn format_time(ms: u64, show_ms: bool) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).expect("time in range");
    let mut s = String::with_capacity(25);
    let mut field = |n: u32, width: u32, after: char| {
        // At least `width` digits: a year past 9999 takes five.
        let digits = n.checked_ilog10().unwrap_or(0) + 1;
        for place in (0..digits.max(width)).rev() {
            s.push(char::from(b'0' + (n / 10u32.pow(place) % 10) as u8));
        }
        s.push(after);
    };
    field(t.year() as u32, 4, '-');
    field(t.month() as u32, 2, '-');
    field(t.day() as u32, 2, 'T');
    field(t.hour() as u32, 2, ':');
    field(t.minute() as u32, 2, ':');
    if show_ms {
        field(t.second() as u32, 2, '.');
        field(t.millisecond() as u32, 3, 'Z');
    } else {
        field(t.second() as u32, 2, 'Z');
    }
    s
}

/// Parses a duration such as `48h`, `500ms`, `2w` to milliseconds. The number
/// is a whole number greater than zero.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let digits = s.bytes().take_while(|b| b.is_ascii_digit()).count();
    let (num, unit) = s.split_at(digits);
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 604_800_000,
        _ => {
            return Err(format!(
                "{s:?} is not a duration: expected digits then ms, s, m, h, d or w (e.g. 48h)"
            ))
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: expected a whole number before the unit"))?;
    if n == 0 {
        return Err(format!("{s:?}: a duration must be greater than zero"));
    }
    // At most the span of representable times (year 0 to 9999), so that a
    // time plus a duration, a tick rounding it up, or a duration as a
    // signed number never overflows.
    n.checked_mul(unit_ms).filter(|ms| *ms <= MAX_TIME).ok_or_else(|| {
        format!(
            "{s:?} is too long: a duration is at most {}w (about 8000 years)",
            MAX_TIME / 604_800_000
        )
    })
}

/// Like [`parse_duration`] but also accepts zero (for `--lateness 0s`).
pub fn parse_duration_or_zero(s: &str) -> Result<u64, String> {
    let digits = s.bytes().take_while(|b| b.is_ascii_digit()).count();
    if digits > 0 && s[..digits].bytes().all(|b| b == b'0') && parse_duration(&format!("1{}", &s[digits..])).is_ok() {
        return Ok(0);
    }
    parse_duration(s)
}

/// Rounds up to a multiple of `tick`.
pub fn tick_of(time: u64, tick: u64) -> u64 {
    time.div_ceil(tick) * tick
}

/// The clock of SPEC §3: follows the largest accepted event time.
#[derive(Clone, Debug)]
pub struct Clock {
    pub tick: u64,
    pub lateness: u64,
    /// Largest accepted event time read so far.
    pub max_time: Option<u64>,
    /// `now`; `None` before the first event (nothing is final yet).
    pub now: Option<u64>,
}

impl Clock {
    pub fn new(tick: u64, lateness: u64) -> Clock {
        Clock {
            tick,
            lateness,
            max_time: None,
            now: None,
        }
    }

    /// The tick at which an event of time `e` takes effect, read at the
    /// current clock: its own tick, or `now + tick` when that is final.
    pub fn effect_tick(&self, e: u64) -> (u64, bool) {
        let own = tick_of(e, self.tick);
        match self.now {
            Some(now) if own <= now => (now + self.tick, true),
            _ => (own, false),
        }
    }

    /// The first tick that is not final.
    pub fn frontier(&self) -> u64 {
        self.now.map(|n| n + self.tick).unwrap_or(0)
    }

    /// Accounts an accepted event's time; returns whether `now` moved.
    pub fn observe(&mut self, e: u64) -> bool {
        if self.max_time.is_some_and(|t| t >= e) {
            return false;
        }
        self.max_time = Some(e);
        let candidate = e.saturating_sub(self.lateness) / self.tick * self.tick;
        // Before lateness has elapsed since the epoch there is nothing final.
        if e < self.lateness {
            return false;
        }
        self.advance_to(candidate)
    }

    /// Moves `now` forward to `t` (a multiple of the tick); never back.
    pub fn advance_to(&mut self, t: u64) -> bool {
        if self.now.is_none_or(|n| t > n) {
            self.now = Some(t);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        let t = parse_time("2024-03-13T10:23:32.123456+01:00").unwrap();
        assert_eq!(format_time(t, true), "2024-03-13T09:23:32.123Z");
        assert_eq!(format_time(t / 1000 * 1000, false), "2024-03-13T09:23:32Z");
        assert!(parse_time("1969-12-31T23:59:59Z").is_err());
        assert_eq!(parse_time_arg("1500").unwrap(), 1500);
    }

    #[test]
    fn durations_are_bounded_so_that_time_arithmetic_cannot_overflow() {
        // Found by review: `count('x', 30500568904w)` passed check, and
        // e + w then overflowed in tick_of (a panic in debug, every fact
        // dropped in release).
        assert!(parse_duration("30500568904w").unwrap_err().contains("too long"));
        assert!(parse_duration("15250284453w").is_err());
        let longest = parse_duration(&format!("{}w", MAX_TIME / 604_800_000)).unwrap();
        assert!(tick_of(MAX_TIME + longest, 604_800_000) > MAX_TIME);
        assert!(i64::try_from(longest).is_ok());
    }

    #[test]
    fn ticks_after_the_last_event_time_can_be_written() {
        // Found with fuzz/decode: an event at 9999-12-31T23:59:59.999Z takes
        // effect at the next tick, in the year 10000, and the sink panicked.
        let last = crate::core::clock::MAX_TIME;
        assert_eq!(format_time(last, true), "9999-12-31T23:59:59.999Z");
        assert_eq!(format_time(tick_of(last, 1000), false), "10000-01-01T00:00:00Z");
        assert_eq!(format_time(tick_of(last, 604_800_000), false), "10000-01-06T00:00:00Z");
    }

    proptest::proptest! {
        #[test]
        fn formats_as_format_would(ms in 0..=tick_of(crate::core::clock::MAX_TIME, 604_800_000), show_ms: bool) {
            let t = OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).unwrap();
            let (y, mo, d, h, mi, s) = (t.year(), t.month() as u8, t.day(), t.hour(), t.minute(), t.second());
            let expected = if show_ms {
                format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z", t.millisecond())
            } else {
                format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
            };
            proptest::prop_assert_eq!(format_time(ms, show_ms), expected);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("48h").unwrap(), 48 * 3_600_000);
        assert_eq!(parse_duration("250ms").unwrap(), 250);
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1.5h").is_err());
        assert!(parse_duration("10").is_err());
        assert_eq!(parse_duration_or_zero("0s").unwrap(), 0);
    }

    #[test]
    fn clock_follows_largest_time_minus_lateness() {
        let mut c = Clock::new(1000, 2000);
        assert_eq!(c.effect_tick(10_500), (11_000, false));
        c.observe(10_000);
        assert_eq!(c.now, Some(8_000));
        c.observe(20_000);
        assert_eq!(c.now, Some(18_000));
        assert_eq!(c.effect_tick(12_000), (19_000, true));
        assert!(!c.observe(15_000));
        assert_eq!(c.now, Some(18_000));
    }
}

/// What [`local_part`] reads of an instant: its hour (0–23) or its weekday
/// (0 Monday – 6 Sunday).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    Hour,
    Weekday,
}

impl Part {
    /// The length of one value in local time.
    fn unit(self) -> i64 {
        match self {
            Part::Hour => 3_600_000,
            Part::Weekday => 86_400_000,
        }
    }
}

/// A time zone by its IANA name, from the tz database bundled with the
/// binary; `None` for a name it does not know.
pub fn zone(name: &str) -> Option<jiff::tz::TimeZone> {
    jiff::tz::TimeZone::get(name).ok()
}

/// The offset from UTC of `zone` (`None`: UTC) at epoch milliseconds `ms`,
/// in milliseconds; `None` out of the zone library's range.
fn offset(ms: i64, zone: Option<&jiff::tz::TimeZone>) -> Option<i64> {
    let Some(zone) = zone else { return Some(0) };
    let at = jiff::Timestamp::from_millisecond(ms).ok()?;
    Some(zone.to_offset(at).seconds() as i64 * 1000)
}

/// `hour(t, zone)` or `weekday(t, zone)` of SPEC §4: `part` of the instant
/// `ms` in local time.
pub fn local_part(ms: i64, zone: Option<&jiff::tz::TimeZone>, part: Part) -> Option<i64> {
    let local = ms.checked_add(offset(ms, zone)?)?;
    Some(match part {
        Part::Hour => local.div_euclid(3_600_000).rem_euclid(24),
        // 1970-01-01 was a Thursday (3 with Monday 0).
        Part::Weekday => (local.div_euclid(86_400_000) + 3).rem_euclid(7),
    })
}

/// The instants `[start, end)` around `ms` over which [`local_part`] keeps
/// its value: the local hour (or day) that holds `ms`, cut at the zone's
/// offset changes next to it. Exact where the offset does not change, and
/// never wider than the value's true span.
pub fn part_span(ms: i64, zone: Option<&jiff::tz::TimeZone>, part: Part) -> Option<(i64, i64)> {
    let off = offset(ms, zone)?;
    let unit = part.unit();
    let start_local = ms.checked_add(off)?.div_euclid(unit) * unit;
    let (mut start, mut end) = (start_local - off, start_local + unit - off);
    if let Some(zone) = zone {
        let at = jiff::Timestamp::from_millisecond(ms).ok()?;
        // The last change at or before `ms`, and the first after it.
        let just_after = jiff::Timestamp::from_millisecond(ms + 1).ok()?;
        if let Some(before) = zone.preceding(just_after).next() {
            start = start.max(before.timestamp().as_millisecond());
        }
        if let Some(after) = zone.following(at).next() {
            end = end.min(after.timestamp().as_millisecond());
        }
    }
    Some((start, end))
}

#[cfg(test)]
mod zone_tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        parse_time(s).unwrap() as i64
    }

    #[test]
    fn hours_and_weekdays_in_utc_and_in_zones() {
        let t = ms("2024-03-13T23:30:00Z"); // a Wednesday
        assert_eq!(local_part(t, None, Part::Hour), Some(23));
        assert_eq!(local_part(t, None, Part::Weekday), Some(2));
        let paris = zone("Europe/Paris").unwrap();
        assert_eq!(local_part(t, Some(&paris), Part::Hour), Some(0));
        assert_eq!(local_part(t, Some(&paris), Part::Weekday), Some(3));
        let kathmandu = zone("Asia/Kathmandu").unwrap(); // +05:45
        assert_eq!(local_part(t, Some(&kathmandu), Part::Hour), Some(5));
        assert_eq!(local_part(ms("1970-01-05T00:00:00Z"), None, Part::Weekday), Some(0));
        assert!(zone("Mars/Olympus_Mons").is_none());
    }

    #[test]
    fn spans_hold_one_value_and_stop_at_offset_changes() {
        let paris = zone("Europe/Paris").unwrap();
        // 2024-03-31 01:30Z is 03:30 CEST, just after the 01:00Z change.
        let t = ms("2024-03-31T01:30:00Z");
        assert_eq!(
            part_span(t, Some(&paris), Part::Hour),
            Some((ms("2024-03-31T01:00:00Z"), ms("2024-03-31T02:00:00Z")))
        );
        // That Sunday in Paris began at 23:00Z and ends at 22:00Z (23 hours).
        assert_eq!(
            part_span(t, Some(&paris), Part::Weekday),
            Some((ms("2024-03-31T01:00:00Z"), ms("2024-03-31T22:00:00Z")))
        );
        let kathmandu = zone("Asia/Kathmandu").unwrap();
        assert_eq!(
            part_span(ms("2024-03-13T23:30:00Z"), Some(&kathmandu), Part::Hour),
            Some((ms("2024-03-13T23:15:00Z"), ms("2024-03-14T00:15:00Z")))
        );
        // Every instant of a span has the value of its start.
        for (z, step) in [(Some(&paris), 600_000), (Some(&kathmandu), 900_000), (None, 3_600_000)] {
            let mut t = ms("2024-03-30T00:00:00Z");
            while t < ms("2024-04-02T00:00:00Z") {
                for part in [Part::Hour, Part::Weekday] {
                    let (s, e) = part_span(t, z, part).unwrap();
                    assert!(s <= t && t < e);
                    assert_eq!(local_part(s, z, part), local_part(t, z, part));
                    assert_eq!(local_part(e - 1, z, part), local_part(t, z, part));
                }
                t += step;
            }
        }
    }
}
