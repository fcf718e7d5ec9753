//! `shoal generate`: seeded, deterministic Segment-spec traffic (SPEC §1, §6).
//!
//! The generator simulates a population of `users` people, each with a small
//! state machine: sessions of page views with the funnel events they lead to
//! (`Product Viewed` → `Product Added` → `Checkout Started` → `Order
//! Completed`), email sessions (`Email Opened` → `Email Clicked`), SaaS lead
//! actions (`Demo Requested`, `Form Submitted`, `Signed Up`), `identify` calls
//! whose traits change now and then, anonymous visitors who log in later (an
//! `identify` carrying both ids, or an `alias`), a few `group` calls, and ~1%
//! bots that fire bursts of 20–50 page views within a minute with no dwell.
//! The line stream then gets its imperfections: ~1% of events stamped up to
//! 5 s early (out of order, within the default lateness), ~0.2% delivered
//! 5–60 lines after their turn (late arrivals), ~0.5% exact duplicate lines
//! (same `messageId`, replayed within 20 lines) and ~0.2% bad lines
//! (truncated JSON, a missing or invalid timestamp, a field of the wrong
//! type). Every other line has its own `messageId`, `m-<seed>-<n>`.
//!
//! Time: each person's next event sits in a heap, so events come out in time
//! order (but for the imperfections). Within a session the gap to the next
//! page is the dwell on the current one (seconds to minutes); between sessions
//! the gap is drawn (minutes to days) so that `events` lines span about
//! `max(7 days, events / 20 s)` of event time.
//!
//! Determinism: one `ChaCha8Rng` seeded from `seed`, integer draws of fixed
//! width only, and no platform math library (`ln`/`exp` below use only IEEE
//! basic operations), so a seed gives the same bytes on every machine (a test
//! pins the hash of the default output). Memory is O(users): per-person state,
//! the current line and the few lines held back for replay.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::Write as _;
use std::io::Write;
use std::time::{Duration, Instant};

/// What to generate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenOptions {
    /// People simulated (bots included); at least 1 is used.
    pub users: u64,
    /// Lines written, duplicates and bad lines included.
    pub events: u64,
    pub seed: u64,
    /// Event time of the first events, epoch milliseconds.
    pub start_ms: u64,
    /// Days of event time the traffic spreads over (at least; more when
    /// `events` would otherwise come faster than 20 a second).
    pub days: u64,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            users: 1000,
            events: 10_000,
            seed: 1,
            start_ms: 1_704_067_200_000,
            days: 7,
        }
    }
}

/// Counts of what was generated so far (for tests and curious callers).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GenStats {
    /// Lines produced, duplicates and bad lines included.
    pub lines: u64,
    /// Lines that repeat an earlier line byte for byte.
    pub duplicates: u64,
    /// Lines that are bad events on purpose (SPEC §1).
    pub malformed: u64,
    /// Of those, lines that are not JSON at all (truncated).
    pub truncated: u64,
    /// Lines whose timestamp was moved up to 5 s into the past (out of
    /// order, but within the default lateness).
    pub late: u64,
    /// Lines delivered 5–60 lines after their turn (late arrivals that may
    /// fall behind the clock).
    pub delayed: u64,
    pub pages: u64,
    pub tracks: u64,
    pub identifies: u64,
    pub aliases: u64,
    pub groups: u64,
    /// `identify` events carrying both `userId` and `anonymousId` at login.
    pub login_links: u64,
    pub orders: u64,
    /// People that are bots, and the page views they made.
    pub bot_users: u64,
    pub bot_pages: u64,
}

/// Streams `opts.events` lines, each with `'\n'`, and flushes. With
/// `rate = Some(r)` (lines per second, r > 0) it paces itself, writing ~5 ms
/// worth of lines at a time and flushing before each sleep. Returns the number
/// of lines written.
pub fn write_all(opts: &GenOptions, out: &mut impl Write, rate: Option<f64>) -> std::io::Result<u64> {
    let mut gen = Generator::new(opts);
    let mut out = std::io::BufWriter::with_capacity(1 << 16, out);
    let mut written = 0u64;
    match rate.filter(|r| r.is_finite() && *r > 0.0) {
        None => {
            while let Some(line) = gen.next_line() {
                out.write_all(line.as_bytes())?;
                out.write_all(b"\n")?;
                written += 1;
            }
        }
        Some(r) => {
            let batch = ((r * 0.005).ceil() as u64).max(1);
            let began = Instant::now();
            while let Some(line) = gen.next_line() {
                out.write_all(line.as_bytes())?;
                out.write_all(b"\n")?;
                written += 1;
                if written.is_multiple_of(batch) {
                    out.flush()?;
                    let due = Duration::from_secs_f64(written as f64 / r);
                    let elapsed = began.elapsed();
                    if due > elapsed {
                        std::thread::sleep(due - elapsed);
                    }
                }
            }
        }
    }
    out.flush()?;
    Ok(written)
}

// ---------------------------------------------------------------------------
// Deterministic math: only + - * / and bit manipulation (IEEE exact rounding).

const LN2: f64 = std::f64::consts::LN_2;

/// Natural logarithm of a positive, finite, normal `x`.
fn det_ln(x: f64) -> f64 {
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > std::f64::consts::SQRT_2 {
        m /= 2.0;
        e += 1;
    }
    // ln(m) = 2 atanh(z), |z| <= 0.172.
    let z = (m - 1.0) / (m + 1.0);
    let z2 = z * z;
    let mut term = z;
    let mut sum = 0.0;
    let mut k = 1.0;
    for _ in 0..12 {
        sum += term / k;
        term *= z2;
        k += 2.0;
    }
    2.0 * sum + e as f64 * LN2
}

/// `e^x` for |x| < 700.
fn det_exp(x: f64) -> f64 {
    let k = (x / LN2).round();
    let r = x - k * LN2;
    let mut term = 1.0;
    let mut sum = 1.0;
    for i in 1..18 {
        term *= r / i as f64;
        sum += term;
    }
    sum * f64::from_bits(((k as i64 + 1023) as u64) << 52)
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

// ---------------------------------------------------------------------------
// Fast text: the hot fields are written without `core::fmt`.

fn push_u64(buf: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in &digits[i..] {
        buf.push(*d as char);
    }
}

/// Cents as a JSON number with exactly two decimals, e.g. `49.90`.
fn push_cents(buf: &mut String, cents: u64) {
    push_u64(buf, cents / 100);
    buf.push('.');
    buf.push((b'0' + (cents / 10 % 10) as u8) as char);
    buf.push((b'0' + (cents % 10) as u8) as char);
}

/// A product id, `p-0042`.
fn push_product_id(buf: &mut String, k: u32) {
    buf.push_str("p-");
    for div in [1000, 100, 10, 1] {
        buf.push((b'0' + (k / div % 10) as u8) as char);
    }
}

/// An anonymous id, `anon-` and 16 hex digits.
fn push_anon(buf: &mut String, anon: u64) {
    buf.push_str("anon-");
    for i in (0..16).rev() {
        buf.push(b"0123456789abcdef"[((anon >> (4 * i)) & 0xf) as usize] as char);
    }
}

// ---------------------------------------------------------------------------
// Vocabulary.

const PAGE_HOME: u8 = 0;
const PAGE_PRICING: u8 = 1;
const PAGE_PRODUCT: u8 = 2;
const PAGE_DOCS: u8 = 3;
const PAGE_BLOG: u8 = 4;
const PAGE_CHECKOUT: u8 = 5;
const PAGE_NAMES: [&str; 6] = ["home", "pricing", "product", "docs", "blog", "checkout"];
/// Bots come back less often than people (their sessions are 20-50 hits).
const BOT_GAP: f64 = 1.5;
/// Landing (no page yet).
const PAGE_NONE: u8 = 6;

/// Next-page weights [home, pricing, product, docs, blog, checkout] by
/// persona (shopper, lead) and current page (PAGE_NONE = landing).
const NEXT_PAGE: [[[u32; 6]; 7]; 2] = [
    [
        [5, 8, 70, 2, 15, 0],
        [25, 5, 55, 5, 10, 0],
        [8, 3, 80, 1, 6, 0],
        [30, 10, 40, 10, 10, 0],
        [25, 5, 50, 0, 20, 0],
        [30, 0, 60, 0, 10, 0],
        [35, 5, 45, 2, 13, 0],
    ],
    [
        [5, 45, 10, 20, 20, 0],
        [15, 15, 10, 40, 20, 0],
        [20, 40, 20, 10, 10, 0],
        [10, 30, 5, 45, 10, 0],
        [20, 30, 5, 15, 30, 0],
        [40, 20, 20, 10, 10, 0],
        [35, 25, 5, 15, 20, 0],
    ],
];
/// Weight of going to checkout from a product page with a non-empty cart.
const CHECKOUT_WEIGHT: [u32; 2] = [25, 10];

const DOC_TOPICS: [&str; 5] = ["getting-started", "api", "integrations", "billing", "security"];
const BLOG_SLUGS: [&str; 5] = [
    "spring-lookbook",
    "pricing-explained",
    "customer-stories",
    "release-notes",
    "how-to-choose",
];
const REFERRERS: [&str; 4] = [
    "https://www.google.com/",
    "https://www.bing.com/",
    "https://t.co/",
    "https://news.ycombinator.com/",
];
const CATEGORIES: [&str; 8] = ["shoes", "apparel", "electronics", "home", "beauty", "books", "toys", "sports"];
const N_PRODUCTS: u32 = 240;
const CAMPAIGNS: [&str; 5] = ["spring_sale", "weekly_digest", "cart_reminder", "product_launch", "winback"];
const FORMS: [&str; 3] = ["contact", "whitepaper", "newsletter"];
const PLANS: [&str; 3] = ["free", "pro", "premium"];
/// (city, weight, locale)
/// (city, weight, locale, IANA time zone)
const CITIES: [(&str, u32, &str, &str); 10] = [
    ("New York", 20, "en-US", "America/New_York"),
    ("San Francisco", 12, "en-US", "America/Los_Angeles"),
    ("Chicago", 10, "en-US", "America/Chicago"),
    ("Austin", 8, "en-US", "America/Chicago"),
    ("London", 12, "en-GB", "Europe/London"),
    ("Berlin", 8, "de-DE", "Europe/Berlin"),
    ("Paris", 8, "fr-FR", "Europe/Paris"),
    ("Toronto", 8, "en-CA", "America/Toronto"),
    ("Sydney", 7, "en-AU", "Australia/Sydney"),
    ("Tokyo", 7, "ja-JP", "Asia/Tokyo"),
];
/// Each city's centre in micro-degrees (lat, lon), in `CITIES` order: a
/// mobile device reports a place within about 15 km of it.
const CENTRES: [(i64, i64); 10] = [
    (40_712_800, -74_006_000),
    (37_774_900, -122_419_400),
    (41_878_100, -87_629_800),
    (30_267_200, -97_743_100),
    (51_507_400, -127_800),
    (52_520_000, 13_405_000),
    (48_856_600, 2_352_200),
    (43_653_200, -79_383_200),
    (-33_868_800, 151_209_300),
    (35_676_200, 139_650_300),
];
/// How long a SaaS lead's trial lasts after it signs up (a week, so that
/// the default week of traffic sees trials end).
const TRIAL: u64 = 7 * 86_400_000;
/// (company, domain, employees)
const COMPANIES: [(&str, &str, u32); 10] = [
    ("Acme Corp", "acme.example", 1200),
    ("Globex", "globex.example", 5400),
    ("Initech", "initech.example", 180),
    ("Umbrella", "umbrella.example", 22000),
    ("Hooli", "hooli.example", 9000),
    ("Pied Piper", "piedpiper.example", 25),
    ("Stark Industries", "stark.example", 3100),
    ("Wayne Enterprises", "wayne.example", 15000),
    ("Vandelay Industries", "vandelay.example", 40),
    ("Soylent", "soylent.example", 650),
];
const FREE_MAIL: [&str; 3] = ["gmail.example", "outlook.example", "proton.example"];

/// (device type, os name, user agent)
const AGENTS: [(&str, &str, &str); 7] = [
    (
        "desktop",
        "macOS",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Safari/605.1.15",
    ),
    (
        "desktop",
        "Windows",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    ),
    ("desktop", "Linux", "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"),
    (
        "mobile",
        "iOS",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Mobile/15E148 Safari/604.1",
    ),
    (
        "mobile",
        "Android",
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36",
    ),
    (
        "tablet",
        "iPadOS",
        "Mozilla/5.0 (iPad; CPU OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Mobile/15E148 Safari/604.1",
    ),
    (
        "tablet",
        "Android",
        "Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    ),
];
const BOT_AGENTS: [&str; 5] = [
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
    "Mozilla/5.0 (compatible; SemrushBot/7~bl; +http://www.semrush.com/bot.html)",
    "python-requests/2.31.0 (scraper bot)",
];

/// Product `k`: (category, price in cents).
fn product(k: u32) -> (&'static str, u64) {
    let h = splitmix(0x5eed_0000 + k as u64);
    let cat = CATEGORIES[(h % CATEGORIES.len() as u64) as usize];
    let tier = (h >> 8) % 100;
    let r = h >> 16;
    let dollars = match tier {
        0..=29 => 5 + r % 25,
        30..=64 => 30 + r % 70,
        65..=89 => 100 + r % 200,
        _ => 300 + r % 600,
    };
    let cents = [99, 0, 50, 95][((h >> 40) % 4) as usize];
    (cat, dollars * 100 + cents)
}

// ---------------------------------------------------------------------------
// People.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Has a userId from the first event (signed up before the data starts).
    Known,
    /// Anonymous at first, logs in at some session.
    Latent,
    /// Never logs in.
    Visitor,
    Bot,
}

/// Follow-up actions queued within a session.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Act {
    Page(u8),
    Viewed,
    Added,
    CheckoutStarted,
    Ordered,
    EmailOpened,
    EmailClicked,
    Demo,
    Form(u8),
    SignedUp,
    Login,
    IdentifyFull,
    IdentifyChange,
    Group,
}

struct Person {
    kind: Kind,
    /// Number behind the anonymous id.
    anon: u64,
    logged_in: bool,
    /// Events of a logged-in person also carry the anonymousId.
    send_anon: bool,
    /// Logs in with an `alias` (previousId = anonymousId) instead of a linking identify.
    via_alias: bool,
    /// 0 shopper, 1 SaaS lead.
    persona: u8,
    agent: u8,
    city: u8,
    /// When it first identified (epoch ms; 0: not yet): its sign-up.
    signup: u64,
    plan: u8,
    /// 0 none, else 1 + index in COMPANIES.
    company: u8,
    favorite: u8,
    /// Dwell multiplier (engaged readers are slow).
    pace: f64,
    /// Add-to-cart propensity multiplier.
    intent: f64,
    sessions: u32,
    login_session: u32,
    login_step: u16,
    /// Pages left in the current session.
    left: u16,
    step: u16,
    last_page: u8,
    email_session: u8,
    campaign: u8,
    referrer: u8,
    /// Milliseconds until the next page (the rest of the current dwell).
    remaining: u64,
    product: u32,
    cart_cents: u64,
    cart_items: u32,
    order: u64,
    pending: [Act; 6],
    npending: u8,
}

impl Person {
    fn push(&mut self, a: Act) {
        if (self.npending as usize) < self.pending.len() {
            self.pending[self.npending as usize] = a;
            self.npending += 1;
        }
    }
    fn pop(&mut self) -> Option<Act> {
        if self.npending == 0 {
            return None;
        }
        let a = self.pending[0];
        self.pending.copy_within(1..self.npending as usize, 0);
        self.npending -= 1;
        Some(a)
    }
    fn has_user(&self) -> bool {
        matches!(self.kind, Kind::Known) || self.logged_in
    }
}

/// A line to write later.
struct Held {
    /// The line index from which it may go.
    due: u64,
    line: String,
    duplicate: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bad {
    Truncated,
    NoTimestamp,
    InvalidTimestamp,
    TimestampWrongType,
    ObjectWrongType,
    IdWrongType,
}

/// The generator: an iterator of lines (no line ending), exactly `events` of them.
pub struct Generator {
    rng: ChaCha8Rng,
    seed: u64,
    start_ms: u64,
    total: u64,
    people: Vec<Person>,
    heap: BinaryHeap<Reverse<(u64, u32)>>,
    /// Mean gap between sessions of one person, ms.
    session_gap: f64,
    event_no: u64,
    order_no: u64,
    /// Lines held back: duplicates to replay and delayed deliveries.
    held: Vec<Held>,
    buf: String,
    day_cache: (u64, String),
    stats: GenStats,
}

fn pick_weighted(rng: &mut ChaCha8Rng, weights: &[u32]) -> usize {
    let total: u32 = weights.iter().sum();
    let mut x = rng.gen_range(0..total);
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    weights.len() - 1
}

fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.gen::<u64>() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn exponential(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    -mean * det_ln(1.0 - uniform(rng))
}

/// An approximately standard normal draw (Irwin–Hall of 4, bounded ±3.46).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let x = rng.gen::<u64>();
    let s: u64 = (x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48);
    (s as f64 / 65536.0 - 2.0) * 1.732_050_807_568_877_2
}

/// How often a person comes back, relative to the mean (1 on average):
/// lognormal with σ = 0.9, fixed per person and drawn from its anonymous id
/// (not from the random stream). Some people visit daily, others monthly,
/// so what someone did lately predicts what they do next: the signal the
/// predictive models of `dataflows/predictions.toml` learn.
fn activity(anon: u64) -> f64 {
    const SIGMA: f64 = 0.9;
    let x = splitmix(anon ^ 0xac71_u64);
    let s: u64 = (x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48);
    let z = (s as f64 / 65536.0 - 2.0) * 1.732_050_807_568_877_2;
    det_exp(SIGMA * z - SIGMA * SIGMA / 2.0)
}

fn lognormal(rng: &mut ChaCha8Rng, median: f64, sigma: f64) -> f64 {
    median * det_exp(sigma * normal(rng))
}

impl Generator {
    pub fn new(opts: &GenOptions) -> Generator {
        let users = opts.users.clamp(1, u32::MAX as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let span_ms = (opts.days.max(1) as f64 * 86_400_000.0).max(opts.events as f64 * 50.0);
        // Events per session, pages and follow-ups, measured on the model.
        let per_session = 7.5;
        let in_session_ms = 35_000.0 * per_session;
        let sessions = (opts.events as f64 / per_session).max(1.0);
        let session_gap = (span_ms * users as f64 / sessions - in_session_ms).max(5.0 * 60_000.0);
        let mut people = Vec::with_capacity(users as usize);
        let mut heap = BinaryHeap::with_capacity(users as usize);
        let city_w: Vec<u32> = CITIES.iter().map(|c| c.1).collect();
        for i in 0..users {
            let r = rng.gen_range(0..1000u32);
            let kind = match r {
                0..=9 => Kind::Bot,
                10..=359 => Kind::Known,
                360..=759 => Kind::Latent,
                _ => Kind::Visitor,
            };
            let agent = match kind {
                Kind::Bot => 2,
                _ => pick_weighted(&mut rng, &[22, 28, 5, 20, 18, 5, 2]) as u8,
            };
            let company = if rng.gen_bool(0.4) {
                rng.gen_range(1..=COMPANIES.len() as u8)
            } else {
                0
            };
            let reader = rng.gen_bool(0.12);
            let pace = lognormal(&mut rng, 1.0, 0.4) * if reader { 4.0 } else { 1.0 };
            let via_alias = kind == Kind::Latent && rng.gen_bool(0.12);
            let person = Person {
                kind,
                anon: splitmix(opts.seed ^ splitmix(i)),
                logged_in: false,
                send_anon: !via_alias && rng.gen_bool(0.7),
                via_alias,
                persona: if rng.gen_bool(0.6) { 0 } else { 1 },
                agent,
                city: pick_weighted(&mut rng, &city_w) as u8,
                signup: 0,
                plan: pick_weighted(&mut rng, &[60, 25, 15]) as u8,
                company,
                favorite: rng.gen_range(0..CATEGORIES.len() as u8),
                pace,
                intent: 0.4 + 1.2 * uniform(&mut rng),
                sessions: 0,
                login_session: rng.gen_range(1..=3),
                login_step: 0,
                left: 0,
                step: 0,
                last_page: PAGE_NONE,
                email_session: 0,
                campaign: 0,
                referrer: 0,
                remaining: 0,
                product: 0,
                cart_cents: 0,
                cart_items: 0,
                order: 0,
                pending: [Act::Viewed; 6],
                npending: 0,
            };
            // The first visit: the gap's residual life, so that the population
            // is in its steady state from the start.
            let residual = if rng.gen_bool(0.35) { 0.5 } else { 2.1667 };
            let first = exponential(&mut rng, session_gap * residual * if kind == Kind::Bot { BOT_GAP } else { 1.0 }) as u64;
            heap.push(Reverse((opts.start_ms.saturating_add(first), i as u32)));
            people.push(person);
        }
        let stats = GenStats {
            bot_users: people.iter().filter(|p| p.kind == Kind::Bot).count() as u64,
            ..GenStats::default()
        };
        Generator {
            rng,
            seed: opts.seed,
            start_ms: opts.start_ms,
            total: opts.events,
            people,
            heap,
            session_gap,
            event_no: 0,
            order_no: 0,
            held: Vec::new(),
            buf: String::with_capacity(1024),
            day_cache: (u64::MAX, String::new()),
            stats,
        }
    }

    /// What was generated so far.
    pub fn stats(&self) -> &GenStats {
        &self.stats
    }

    /// The next line, borrowed (no allocation); `None` after `events` lines.
    pub fn next_line(&mut self) -> Option<&str> {
        if self.stats.lines >= self.total {
            return None;
        }
        let index = self.stats.lines;
        self.stats.lines += 1;
        // Lines left after this one; held lines must all fit in them.
        let room = self.total - self.stats.lines;
        let due = if self.held.len() as u64 > room {
            self.held.iter().enumerate().min_by_key(|(i, h)| (h.due, *i)).map(|(i, _)| i)
        } else {
            self.held.iter().position(|h| h.due <= index)
        };
        if let Some(pos) = due {
            let held = self.held.swap_remove(pos);
            self.buf = held.line;
            if held.duplicate {
                self.stats.duplicates += 1;
            } else {
                self.stats.delayed += 1;
            }
            return Some(&self.buf);
        }
        loop {
            let bad = self.roll_bad();
            self.event(bad);
            if let Some(b) = bad {
                self.stats.malformed += 1;
                if b == Bad::Truncated {
                    self.stats.truncated += 1;
                    let cut = self.rng.gen_range(1..self.buf.len() as u64) as usize;
                    self.buf.truncate(cut);
                }
                return Some(&self.buf);
            }
            let roll = self.rng.gen_range(0..1000u32);
            if (self.held.len() as u64) < room {
                if roll < 2 {
                    // Delivered late: held back for a while, another line goes first.
                    let due = index + self.rng.gen_range(5..=60u64);
                    self.held.push(Held {
                        due,
                        line: self.buf.clone(),
                        duplicate: false,
                    });
                    continue;
                }
                if roll < 7 {
                    let due = index + self.rng.gen_range(1..=20u64);
                    self.held.push(Held {
                        due,
                        line: self.buf.clone(),
                        duplicate: true,
                    });
                }
            }
            return Some(&self.buf);
        }
    }

    fn roll_bad(&mut self) -> Option<Bad> {
        if self.rng.gen_range(0..1000u32) < 2 {
            Some(match self.rng.gen_range(0..6u32) {
                0 => Bad::Truncated,
                1 => Bad::NoTimestamp,
                2 => Bad::InvalidTimestamp,
                3 => Bad::TimestampWrongType,
                4 => Bad::ObjectWrongType,
                _ => Bad::IdWrongType,
            })
        } else {
            None
        }
    }

    /// Produces the next event of the person due first into `self.buf`.
    fn event(&mut self, bad: Option<Bad>) {
        let Reverse((t, pi)) = self.heap.pop().expect("one entry per person");
        let p = pi as usize;
        if self.people[p].left == 0 && self.people[p].npending == 0 {
            self.begin_session(p);
        }
        let act = self.choose(p);
        let mut ts = t;
        if self.rng.gen_range(0..100u32) == 0 {
            ts = t.saturating_sub(self.rng.gen_range(200..5000u64)).max(self.start_ms);
            self.stats.late += 1;
        }
        let gap = self.write_event(p, ts, act, bad);
        self.heap.push(Reverse((t.saturating_add(gap.max(1)), pi)));
    }

    fn begin_session(&mut self, p: usize) {
        let rng = &mut self.rng;
        let me = &mut self.people[p];
        me.sessions += 1;
        me.step = 0;
        me.last_page = PAGE_NONE;
        me.email_session = 0;
        me.remaining = 0;
        if me.kind == Kind::Bot {
            me.left = rng.gen_range(20..=50);
            me.referrer = 0;
            return;
        }
        me.left = (1.0 + exponential(rng, 4.0)).min(40.0) as u16;
        me.referrer = rng.gen_range(0..=REFERRERS.len() as u8);
        if me.kind == Kind::Known && me.sessions == 1 {
            me.push(Act::IdentifyFull);
        } else if me.has_user() && rng.gen_bool(0.05) {
            me.push(Act::IdentifyChange);
        }
        if me.has_user() && rng.gen_bool(0.18) {
            me.campaign = rng.gen_range(0..CAMPAIGNS.len() as u8);
            me.push(Act::EmailOpened);
            if rng.gen_bool(0.4) {
                me.push(Act::EmailClicked);
                me.email_session = 1;
            } else {
                me.left = 0;
            }
        }
        if me.kind == Kind::Latent && !me.logged_in && me.sessions >= me.login_session {
            me.login_step = rng.gen_range(0..me.left.max(1));
        }
    }

    fn choose(&mut self, p: usize) -> Act {
        let me = &mut self.people[p];
        if let Some(a) = me.pop() {
            return a;
        }
        if me.kind == Kind::Latent && !me.logged_in && me.sessions >= me.login_session && me.step >= me.login_step {
            return Act::Login;
        }
        me.left = me.left.saturating_sub(1);
        me.step += 1;
        let page = if me.kind == Kind::Bot {
            self.rng.gen_range(0..PAGE_NAMES.len() as u8)
        } else {
            let mut w = NEXT_PAGE[me.persona as usize][me.last_page as usize];
            if me.last_page == PAGE_PRODUCT && me.cart_items > 0 {
                w[PAGE_CHECKOUT as usize] = CHECKOUT_WEIGHT[me.persona as usize];
            }
            pick_weighted(&mut self.rng, &w) as u8
        };
        Act::Page(page)
    }

    /// Writes one event into `self.buf`; returns the gap to the person's next event.
    fn write_event(&mut self, p: usize, ts: u64, act: Act, bad: Option<Bad>) -> u64 {
        self.event_no += 1;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut follow_gap: Option<u64> = None;
        let (kind, name): (&str, &str) = match act {
            Act::Page(pg) => ("page", PAGE_NAMES[pg as usize]),
            Act::Viewed => ("track", "Product Viewed"),
            Act::Added => ("track", "Product Added"),
            Act::CheckoutStarted => ("track", "Checkout Started"),
            Act::Ordered => ("track", "Order Completed"),
            Act::EmailOpened => ("track", "Email Opened"),
            Act::EmailClicked => ("track", "Email Clicked"),
            Act::Demo => ("track", "Demo Requested"),
            Act::Form(_) => ("track", "Form Submitted"),
            Act::SignedUp => ("track", "Signed Up"),
            Act::Login if self.people[p].via_alias => ("alias", ""),
            Act::Login | Act::IdentifyFull | Act::IdentifyChange => ("identify", ""),
            Act::Group => ("group", ""),
        };
        let obj_bad = bad == Some(Bad::ObjectWrongType);
        buf.push_str("{\"type\":\"");
        buf.push_str(kind);
        buf.push('"');
        match kind {
            "page" => {
                buf.push_str(",\"name\":\"");
                buf.push_str(name);
                buf.push('"');
                self.stats.pages += 1;
            }
            "track" => {
                if obj_bad && self.rng.gen_bool(0.5) {
                    buf.push_str(",\"event\":");
                    push_u64(&mut buf, self.event_no);
                } else {
                    buf.push_str(",\"event\":\"");
                    buf.push_str(name);
                    buf.push('"');
                }
                self.stats.tracks += 1;
            }
            "identify" => self.stats.identifies += 1,
            "alias" => self.stats.aliases += 1,
            _ => self.stats.groups += 1,
        }
        buf.push_str(",\"messageId\":\"m-");
        push_u64(&mut buf, self.seed);
        buf.push('-');
        push_u64(&mut buf, self.event_no);
        buf.push('"');
        match bad {
            Some(Bad::NoTimestamp) => {}
            Some(Bad::InvalidTimestamp) => buf.push_str(",\"timestamp\":\"yesterday afternoon\""),
            Some(Bad::TimestampWrongType) => buf.push_str(",\"timestamp\":true"),
            _ => {
                buf.push_str(",\"timestamp\":\"");
                self.push_time(&mut buf, ts);
                buf.push('"');
            }
        }

        // Identifiers.
        let (login, alias) = (act == Act::Login, kind == "alias");
        if login {
            self.people[p].logged_in = true;
        }
        let me = &self.people[p];
        let bad_id = bad == Some(Bad::IdWrongType);
        if me.has_user() {
            buf.push_str(if bad_id { ",\"userId\":{\"id\":\"u" } else { ",\"userId\":\"u" });
            push_u64(&mut buf, p as u64 + 1);
            buf.push_str(if bad_id { "\"}" } else { "\"" });
            if alias {
                buf.push_str(",\"previousId\":\"");
                push_anon(&mut buf, me.anon);
                buf.push('"');
            } else if me.send_anon || login {
                buf.push_str(",\"anonymousId\":\"");
                push_anon(&mut buf, me.anon);
                buf.push('"');
            }
        } else {
            buf.push_str(if bad_id { ",\"anonymousId\":[\"" } else { ",\"anonymousId\":\"" });
            push_anon(&mut buf, me.anon);
            buf.push_str(if bad_id { "\"]" } else { "\"" });
        }
        if login {
            if alias {
                self.people[p].push(Act::IdentifyFull);
            } else {
                self.stats.login_links += 1;
            }
            if self.rng.gen_bool(0.55) {
                self.people[p].push(Act::SignedUp);
            }
            if self.people[p].company > 0 && self.rng.gen_bool(0.3) {
                self.people[p].push(Act::Group);
            }
        }

        // Body. An alias or group has no properties to spoil: its context is.
        let mut ctx_bad = false;
        match act {
            Act::Page(pg) => follow_gap = Some(self.page_body(&mut buf, p, pg, obj_bad)),
            Act::Login if alias => ctx_bad = obj_bad,
            Act::Login | Act::IdentifyFull => self.traits_full(&mut buf, p, obj_bad, ts),
            Act::IdentifyChange => self.traits_change(&mut buf, p, obj_bad),
            Act::Group => {
                ctx_bad = obj_bad;
                let (name, domain, employees) = COMPANIES[(self.people[p].company as usize).max(1) - 1];
                buf.push_str(",\"groupId\":\"g-");
                buf.push_str(domain.split('.').next().unwrap_or(domain));
                buf.push_str("\",\"traits\":{\"name\":\"");
                buf.push_str(name);
                buf.push_str("\",\"employees\":");
                push_u64(&mut buf, employees as u64);
                buf.push('}');
            }
            _ => self.track_body(&mut buf, p, act, obj_bad),
        }
        self.context(&mut buf, p, ctx_bad);
        buf.push('}');
        self.buf = buf;
        self.next_gap(p, act, follow_gap)
    }

    fn page_body(&mut self, buf: &mut String, p: usize, pg: u8, obj_bad: bool) -> u64 {
        let rng = &mut self.rng;
        let me = &mut self.people[p];
        me.last_page = pg;
        if obj_bad {
            buf.push_str(",\"properties\":\"n/a\"");
            me.remaining = 2_000;
            return 2_000;
        }
        buf.push_str(",\"properties\":{\"session_id\":\"s-");
        push_u64(buf, p as u64 + 1);
        buf.push('-');
        push_u64(buf, me.sessions as u64);
        buf.push('"');
        // The path: a fixed part, then a slug or a product id.
        let (dir, slug, num): (&str, &str, Option<u32>) = match pg {
            PAGE_HOME => ("/", "", None),
            PAGE_PRICING => ("/pricing", "", None),
            PAGE_PRODUCT => {
                let k = if me.kind != Kind::Bot && rng.gen_bool(0.6) {
                    // A product of the favourite category.
                    let mut k = rng.gen_range(0..N_PRODUCTS);
                    for _ in 0..16 {
                        if product(k).0 == CATEGORIES[me.favorite as usize] {
                            break;
                        }
                        k = rng.gen_range(0..N_PRODUCTS);
                    }
                    k
                } else {
                    rng.gen_range(0..N_PRODUCTS)
                };
                me.product = k;
                ("/products/", "", Some(k))
            }
            PAGE_DOCS => ("/docs/", DOC_TOPICS[rng.gen_range(0..DOC_TOPICS.len() as u32) as usize], None),
            PAGE_BLOG => ("/blog/", BLOG_SLUGS[rng.gen_range(0..BLOG_SLUGS.len() as u32) as usize], None),
            _ => ("/checkout", "", None),
        };
        for key in [",\"path\":\"", ",\"url\":\"https://www.example.com"] {
            buf.push_str(key);
            buf.push_str(dir);
            buf.push_str(slug);
            if let Some(k) = num {
                push_product_id(buf, k);
            }
            buf.push('"');
        }
        if me.step == 1 && (me.referrer as usize) < REFERRERS.len() && me.email_session == 0 {
            buf.push_str(",\"referrer\":\"");
            buf.push_str(REFERRERS[me.referrer as usize]);
            buf.push('"');
        }
        if me.kind == Kind::Bot {
            // No dwell (0 or absent), no scroll, the next hit within 2 s.
            if rng.gen_bool(0.5) {
                buf.push_str(",\"dwell_ms\":0");
            }
            buf.push_str(",\"scroll_pct\":0}");
            self.stats.bot_pages += 1;
            let gap = rng.gen_range(300..2000u64);
            me.remaining = gap;
            return gap;
        }
        // Dwell: seconds to minutes, slower for engaged readers; ~4% bounce.
        let dwell = if rng.gen_range(0..100u32) < 4 {
            rng.gen_range(0..1500u64)
        } else {
            (lognormal(rng, 14_000.0 * me.pace, 0.8) as u64).clamp(800, 15 * 60_000)
        };
        let depth = 1.0 - det_exp(-(dwell as f64) / (25_000.0 * (0.5 + uniform(rng))));
        let scroll = ((depth * 100.0) as u64 + rng.gen_range(0..10u64)).min(100);
        buf.push_str(",\"dwell_ms\":");
        push_u64(buf, dwell);
        buf.push_str(",\"scroll_pct\":");
        push_u64(buf, scroll);
        buf.push('}');
        // Follow-ups.
        match pg {
            PAGE_PRODUCT => {
                me.push(Act::Viewed);
                let p_add = [0.22, 0.07][me.persona as usize] * me.intent;
                if rng.gen_bool(p_add.min(1.0)) {
                    me.push(Act::Added);
                }
            }
            PAGE_CHECKOUT if me.cart_items > 0 => {
                me.push(Act::CheckoutStarted);
                if rng.gen_bool(0.55) {
                    me.push(Act::Ordered);
                }
            }
            PAGE_PRICING => {
                if me.has_user() && rng.gen_bool(0.05) {
                    me.push(Act::Demo);
                } else if rng.gen_bool(0.03) {
                    me.push(Act::Form(0));
                }
            }
            PAGE_DOCS if rng.gen_bool(0.03) => me.push(Act::Form(1)),
            PAGE_BLOG if rng.gen_bool(0.02) => me.push(Act::Form(2)),
            _ => {}
        }
        me.remaining = dwell + rng.gen_range(200..2500u64);
        me.remaining
    }

    fn track_body(&mut self, buf: &mut String, p: usize, act: Act, obj_bad: bool) {
        if obj_bad {
            buf.push_str(",\"properties\":[1,2,3]");
            return;
        }
        let rng = &mut self.rng;
        let me = &mut self.people[p];
        buf.push_str(",\"properties\":{");
        match act {
            Act::Viewed | Act::Added => {
                let (cat, cents) = product(me.product);
                buf.push_str("\"product_id\":\"");
                push_product_id(buf, me.product);
                buf.push_str("\",\"category\":\"");
                buf.push_str(cat);
                buf.push_str("\",\"price\":");
                push_cents(buf, cents);
                if act == Act::Added {
                    let qty = [1, 1, 1, 1, 1, 1, 2, 2, 2, 3][rng.gen_range(0..10u32) as usize];
                    me.cart_cents += cents * qty;
                    me.cart_items += qty as u32;
                    buf.push_str(",\"quantity\":");
                    push_u64(buf, qty);
                }
            }
            Act::CheckoutStarted | Act::Ordered => {
                if act == Act::CheckoutStarted {
                    self.order_no += 1;
                    me.order = self.order_no;
                }
                buf.push_str("\"order_id\":\"o-");
                push_u64(buf, self.seed);
                buf.push('-');
                push_u64(buf, me.order);
                buf.push_str(if act == Act::Ordered { "\",\"revenue\":" } else { "\",\"value\":" });
                push_cents(buf, me.cart_cents);
                buf.push_str(",\"products\":");
                push_u64(buf, me.cart_items as u64);
                buf.push_str(",\"currency\":\"USD\"");
                if act == Act::Ordered {
                    me.cart_cents = 0;
                    me.cart_items = 0;
                    self.stats.orders += 1;
                }
            }
            Act::EmailOpened | Act::EmailClicked => {
                let campaign = CAMPAIGNS[me.campaign as usize];
                let _ = write!(buf, "\"campaign\":\"{campaign}\"");
                if act == Act::EmailClicked {
                    let _ = write!(buf, ",\"link\":\"https://www.example.com/?utm_campaign={campaign}\"");
                }
            }
            Act::Demo => {
                buf.push_str("\"source\":\"pricing\"");
                if me.company > 0 {
                    let _ = write!(buf, ",\"company\":\"{}\"", COMPANIES[me.company as usize - 1].0);
                }
            }
            Act::Form(f) => {
                let _ = write!(buf, "\"form\":\"{}\"", FORMS[f as usize]);
            }
            Act::SignedUp => {
                let method = ["email", "google", "github"][rng.gen_range(0..3u32) as usize];
                let _ = write!(buf, "\"plan\":\"{}\",\"method\":\"{method}\"", PLANS[me.plan as usize]);
            }
            _ => {}
        }
        buf.push('}');
    }

    /// The full traits of an `identify` at `ts`: with the person's time zone,
    /// and for a SaaS lead its sign-up and trial end times (the first
    /// identify is the sign-up).
    fn traits_full(&mut self, buf: &mut String, p: usize, obj_bad: bool, ts: u64) {
        if obj_bad {
            buf.push_str(",\"traits\":\"premium\"");
            return;
        }
        if self.people[p].signup == 0 {
            self.people[p].signup = ts;
        }
        let me = &self.people[p];
        let domain = if me.company > 0 {
            COMPANIES[me.company as usize - 1].1
        } else {
            FREE_MAIL[(me.anon % FREE_MAIL.len() as u64) as usize]
        };
        let _ = write!(
            buf,
            ",\"traits\":{{\"email\":\"u{}@{domain}\",\"plan\":\"{}\",\"city\":\"{}\"",
            p + 1,
            PLANS[me.plan as usize],
            CITIES[me.city as usize].0
        );
        if me.company > 0 {
            let (name, _, employees) = COMPANIES[me.company as usize - 1];
            let _ = write!(buf, ",\"company\":\"{name}\",\"employees\":{employees}");
        }
        let _ = write!(buf, ",\"timezone\":\"{}\"", CITIES[me.city as usize].3);
        if me.persona == 1 {
            let signup = me.signup;
            buf.push_str(",\"signed_up_at\":\"");
            self.push_time(buf, signup);
            buf.push_str("\",\"trial_ends_at\":\"");
            self.push_time(buf, signup + TRIAL);
            buf.push('"');
        }
        buf.push('}');
    }

    fn traits_change(&mut self, buf: &mut String, p: usize, obj_bad: bool) {
        if obj_bad {
            buf.push_str(",\"traits\":[\"plan\"]");
            return;
        }
        let rng = &mut self.rng;
        let me = &mut self.people[p];
        buf.push_str(",\"traits\":{");
        match rng.gen_range(0..10u32) {
            0..=5 => {
                // Mostly upgrades.
                me.plan = if me.plan < 2 && rng.gen_bool(0.75) {
                    me.plan + 1
                } else {
                    rng.gen_range(0..3u8)
                };
                let _ = write!(buf, "\"plan\":\"{}\"", PLANS[me.plan as usize]);
            }
            6..=8 => {
                me.city = rng.gen_range(0..CITIES.len() as u8);
                let _ = write!(buf, "\"city\":\"{}\"", CITIES[me.city as usize].0);
            }
            _ if me.company > 0 => {
                // Left the company: the traits are unset.
                me.company = 0;
                buf.push_str("\"company\":null,\"employees\":null");
            }
            _ => {
                me.company = rng.gen_range(1..=COMPANIES.len() as u8);
                let (name, _, employees) = COMPANIES[me.company as usize - 1];
                let _ = write!(buf, "\"company\":\"{name}\",\"employees\":{employees}");
            }
        }
        buf.push('}');
    }

    fn context(&mut self, buf: &mut String, p: usize, bad: bool) {
        if bad {
            buf.push_str(",\"context\":\"web\"");
            return;
        }
        let me = &self.people[p];
        let (device, os, ua) = AGENTS[me.agent as usize];
        let ua = if me.kind == Kind::Bot {
            BOT_AGENTS[(me.anon % BOT_AGENTS.len() as u64) as usize]
        } else {
            ua
        };
        let ip = splitmix(me.anon);
        buf.push_str(",\"context\":{\"device\":{\"type\":\"");
        buf.push_str(device);
        buf.push_str("\"},\"os\":{\"name\":\"");
        buf.push_str(os);
        buf.push_str("\"},\"locale\":\"");
        buf.push_str(CITIES[me.city as usize].2);
        buf.push_str("\",\"ip\":\"");
        for (i, octet) in [11 + ip % 212, (ip >> 8) & 0xff, (ip >> 16) & 0xff, 1 + (ip >> 24) % 254]
            .into_iter()
            .enumerate()
        {
            if i > 0 {
                buf.push('.');
            }
            push_u64(buf, octet);
        }
        buf.push_str("\",\"userAgent\":\"");
        buf.push_str(ua);
        buf.push('"');
        if device == "mobile" {
            // Where the phone is: the person's own spot near its city's
            // centre (fixed per person, so no random draw is taken).
            let (lat, lon) = CENTRES[me.city as usize];
            let spot = splitmix(me.anon ^ 0x5eed);
            let (dlat, dlon) = ((spot % 270_001) as i64 - 135_000, ((spot >> 20) % 360_001) as i64 - 180_000);
            let micro = |buf: &mut String, v: i64| {
                let _ = write!(
                    buf,
                    "{}{}.{:06}",
                    if v < 0 { "-" } else { "" },
                    v.abs() / 1_000_000,
                    v.abs() % 1_000_000
                );
            };
            buf.push_str(",\"location\":{\"latitude\":");
            micro(buf, lat + dlat);
            buf.push_str(",\"longitude\":");
            micro(buf, lon + dlon);
            buf.push('}');
        }
        if me.email_session == 1 {
            let campaign = CAMPAIGNS[me.campaign as usize];
            let _ = write!(
                buf,
                ",\"campaign\":{{\"source\":\"email\",\"medium\":\"email\",\"name\":\"{campaign}\"}}"
            );
        }
        buf.push('}');
    }

    /// The gap from this event to the person's next one.
    fn next_gap(&mut self, p: usize, act: Act, page_gap: Option<u64>) -> u64 {
        let rng = &mut self.rng;
        let me = &mut self.people[p];
        let in_session = me.npending > 0 || me.left > 0;
        if let Some(g) = page_gap {
            if me.npending == 0 && me.left > 0 {
                me.remaining = 0;
                return g;
            }
        }
        if me.npending > 0 {
            // A follow-up: right after, taken out of the current dwell.
            let g = match me.pending[0] {
                Act::Ordered => rng.gen_range(20_000..120_000u64),
                Act::EmailClicked => rng.gen_range(3_000..90_000u64),
                Act::Demo | Act::Form(_) => rng.gen_range(15_000..120_000u64),
                _ => rng.gen_range(300..4_000u64),
            };
            me.remaining = me.remaining.saturating_sub(g);
            return g;
        }
        if in_session {
            // Next page: the rest of the dwell, or a fresh one after a non-page event.
            let g = if me.remaining >= 500 {
                me.remaining
            } else if act == Act::EmailClicked {
                rng.gen_range(1_000..6_000u64)
            } else {
                (lognormal(rng, 8_000.0 * me.pace, 0.7) as u64).clamp(500, 600_000)
            };
            me.remaining = 0;
            return g;
        }
        // Session over: the person comes back later. Most return within the
        // mean gap, some only after a long while.
        me.left = 0;
        let mean = if me.kind == Kind::Bot {
            self.session_gap * BOT_GAP
        } else {
            self.session_gap
        };
        let mean = if rng.gen_bool(0.7) { mean * 0.5 } else { mean * 2.1667 };
        let g = me.remaining.saturating_add(exponential(rng, mean / activity(me.anon)) as u64);
        me.remaining = 0;
        g.max(60_000)
    }

    fn push_time(&mut self, buf: &mut String, ms: u64) {
        let day = ms / 86_400_000;
        if self.day_cache.0 != day {
            let (y, m, d) = civil_from_days(day as i64);
            self.day_cache = (day, format!("{y:04}-{m:02}-{d:02}T"));
        }
        buf.push_str(&self.day_cache.1);
        let r = ms % 86_400_000;
        let (h, mi, s, milli) = (r / 3_600_000, r / 60_000 % 60, r / 1000 % 60, r % 1000);
        let two = |buf: &mut String, v: u64| {
            buf.push((b'0' + (v / 10) as u8) as char);
            buf.push((b'0' + (v % 10) as u8) as char);
        };
        two(buf, h);
        buf.push(':');
        two(buf, mi);
        buf.push(':');
        two(buf, s);
        buf.push('.');
        buf.push((b'0' + (milli / 100) as u8) as char);
        two(buf, milli % 100);
        buf.push('Z');
    }
}

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl Iterator for Generator {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        self.next_line().map(str::to_owned)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.total - self.stats.lines) as usize;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Generator {}

/// A uniform synthetic load for benchmarks: `events` track events named
/// round-robin-at-random from `names`, from `users` users (xorshift-picked),
/// at `per_second` events per second of event time from 2024-01-01.
pub fn synthetic(events: u64, users: u64, per_second: u64, names: &[&str]) -> Vec<u8> {
    let start = GenOptions::default().start_ms;
    let mut out = Vec::with_capacity(events as usize * 110);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..events {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let t = start + i * 1000 / per_second.max(1);
        let name = names[(x >> 40) as usize % names.len()];
        let user = x % users.max(1);
        let _ = writeln!(
            out,
            "{{\"type\":\"track\",\"event\":\"{name}\",\"userId\":\"u{user}\",\"timestamp\":{t},\"messageId\":\"m{i}\"}}"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const GOLDEN: u64 = 0xa3b8_a4bc_5167_ad80;

    fn opts(users: u64, events: u64, seed: u64) -> GenOptions {
        GenOptions {
            users,
            events,
            seed,
            ..GenOptions::default()
        }
    }

    #[test]
    fn math_is_close_to_std() {
        for x in [1e-12, 0.001, 0.3, 0.5, 0.999, 1.0, 1.5, 2.0, 10.0, 12345.678] {
            assert!((det_ln(x) - x.ln()).abs() < 1e-12 * x.ln().abs().max(1.0), "ln {x}");
        }
        for x in [-30.0, -2.5, -0.1, 0.0, 0.2, 1.0, 3.3, 20.0] {
            assert!((det_exp(x) - x.exp()).abs() <= 1e-13 * x.exp(), "exp {x}");
        }
        for d in [0i64, 19_723, 19_782, 11_016, -1] {
            let t = time::OffsetDateTime::from_unix_timestamp(d * 86_400).unwrap();
            assert_eq!(civil_from_days(d), (t.year() as i64, t.month() as u32, t.day() as u32));
        }
    }

    #[test]
    fn deterministic_for_a_seed() {
        let a: Vec<String> = Generator::new(&opts(200, 1000, 7)).collect();
        let b: Vec<String> = Generator::new(&opts(200, 1000, 7)).collect();
        assert_eq!(a, b);
        let c: Vec<String> = Generator::new(&opts(200, 1000, 8)).collect();
        assert_ne!(a, c);
        // The same bytes on every machine: pinned by a hash of the default
        // output (update it deliberately when the model changes).
        let mut all = Vec::new();
        write_all(&GenOptions::default(), &mut all, None).unwrap();
        let hash = xxhash_rust::xxh3::xxh3_64(&all);
        assert_eq!(hash, GOLDEN, "default output changed: {hash:#x}");
    }

    #[test]
    fn exactly_n_lines() {
        for n in [0u64, 1, 2, 17, 5000] {
            let g = Generator::new(&opts(50, n, 3));
            assert_eq!(g.len(), n as usize);
            assert_eq!(g.count() as u64, n);
        }
        let mut out = Vec::new();
        assert_eq!(write_all(&opts(10, 123, 1), &mut out, None).unwrap(), 123);
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 123);
        assert!(out.ends_with(b"\n"));
        let mut paced = Vec::new();
        let t = Instant::now();
        assert_eq!(write_all(&opts(10, 200, 1), &mut paced, Some(2000.0)).unwrap(), 200);
        assert!(t.elapsed() >= Duration::from_millis(90), "{:?}", t.elapsed());
        assert_eq!(paced, {
            let mut v = Vec::new();
            write_all(&opts(10, 200, 1), &mut v, None).unwrap();
            v
        });
    }

    #[test]
    fn lines_are_valid_events_except_the_intentional_ones() {
        let n = 100_000u64;
        let mut g = Generator::new(&opts(1000, n, 11));
        let (mut bad, mut not_json, mut seen_ids) = (0u64, 0u64, std::collections::HashSet::new());
        let (mut links, mut aliases, mut bot_pages, mut prev) = (0, 0, 0, 0u64);
        let (mut out_of_order, mut beyond_lateness) = (0, 0);
        let (mut min_t, mut max_t) = (u64::MAX, 0u64);
        let mut types = std::collections::BTreeMap::<String, u64>::new();
        let mut dup_lines = 0;
        while let Some(line) = g.next_line() {
            let line = line.to_owned();
            match serde_json::from_str::<Value>(&line) {
                Ok(Value::Object(_)) => {}
                _ => not_json += 1,
            }
            match crate::ingest::event::decode(line.as_bytes()) {
                Err(_) => bad += 1,
                Ok(e) => {
                    let v: Value = serde_json::from_str(&line).unwrap();
                    let mid = v["messageId"].as_str().unwrap().to_owned();
                    if !seen_ids.insert(mid) {
                        dup_lines += 1;
                        continue;
                    }
                    let key = match e.kind {
                        crate::ingest::event::EventType::Track => e.name.clone().unwrap().to_string(),
                        k => format!("{k:?}"),
                    };
                    *types.entry(key).or_default() += 1;
                    if e.user_id.is_some() && e.anonymous_id.is_some() && e.kind == crate::ingest::event::EventType::Identify {
                        links += 1;
                    }
                    if e.kind == crate::ingest::event::EventType::Alias {
                        aliases += 1;
                        assert!(e.previous_id.as_deref().unwrap().starts_with("anon-"));
                    }
                    let ua = v["context"]["userAgent"].as_str().unwrap_or("");
                    if ua.contains("bot") {
                        bot_pages += 1;
                        assert_eq!(v["properties"]["scroll_pct"], 0);
                    }
                    if let Some(price) = v["properties"].get("price") {
                        let text = price.to_string();
                        assert_eq!(text.len() - text.find('.').unwrap(), 3, "{text}");
                    }
                    if e.time < prev {
                        out_of_order += 1;
                        if prev - e.time >= 5_000 {
                            beyond_lateness += 1;
                        }
                    }
                    prev = prev.max(e.time);
                    min_t = min_t.min(e.time);
                    max_t = max_t.max(e.time);
                }
            }
        }
        let s = g.stats().clone();
        eprintln!("{s:#?}\n{types:#?}\nspan {} h", (max_t - min_t) / 3_600_000);
        assert_eq!(s.lines, n);
        assert_eq!(bad, s.malformed);
        assert_eq!(not_json, s.truncated);
        assert_eq!(dup_lines, s.duplicates);
        // ~0.2% bad, ~0.5% duplicates, ~1% a few seconds early, ~0.2% delayed.
        assert!((120..=300).contains(&s.malformed), "{}", s.malformed);
        assert!((300..=700).contains(&s.duplicates), "{}", s.duplicates);
        assert!((700..=1300).contains(&s.late), "{}", s.late);
        assert!((120..=300).contains(&s.delayed), "{}", s.delayed);
        assert!(out_of_order >= s.late / 2, "{out_of_order}");
        assert!(beyond_lateness > 0 && beyond_lateness <= s.delayed, "{beyond_lateness}");
        assert!(links > 50 && aliases > 5, "{links} {aliases}");
        assert!(bot_pages > 500 && s.bot_users > 5, "{bot_pages}");
        assert!(s.orders > 100);
        for name in [
            "Product Viewed",
            "Product Added",
            "Checkout Started",
            "Order Completed",
            "Email Opened",
            "Email Clicked",
            "Demo Requested",
            "Signed Up",
            "Form Submitted",
            "Page",
            "Identify",
            "Alias",
            "Group",
        ] {
            assert!(types.get(name).copied().unwrap_or(0) > 10, "{name}: {types:?}");
        }
        assert!(max_t - min_t >= 6 * 86_400_000, "span {}", max_t - min_t);
    }

    #[test]
    fn bots_burst() {
        // Every bot session: 20+ page views within about a minute.
        let mut per_bot: std::collections::HashMap<String, Vec<u64>> = Default::default();
        for line in Generator::new(&opts(500, 50_000, 5)) {
            if let Ok(e) = crate::ingest::event::decode(line.as_bytes()) {
                let ua = e.context.get("userAgent").and_then(|u| u.as_str()).unwrap_or("");
                if ua.contains("bot") {
                    per_bot.entry(e.anonymous_id.clone().unwrap().to_string()).or_default().push(e.time);
                }
            }
        }
        assert!(!per_bot.is_empty());
        let mut bursts = 0;
        for times in per_bot.values_mut() {
            times.sort();
            for w in times.windows(15) {
                if w[14] - w[0] <= 60_000 {
                    bursts += 1;
                    break;
                }
            }
        }
        assert_eq!(bursts, per_bot.len());
    }
}
