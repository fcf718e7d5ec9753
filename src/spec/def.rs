//! What a spec defines, once loaded and checked: segments, scores, RFM,
//! clusterings, and the errors that point into the file.

use crate::spec::ast::{self, Expr};

/// One `[[segment]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub name: String,
    pub description: Option<String>,
    pub when: Expr,
    /// The `when` text as written, for messages and the API's `why`.
    pub source: String,
    /// `groups`: holdouts and experiments (SPEC §4 "Groups"); empty: none.
    pub groups: Vec<Group>,
}

/// One group of a segment's `groups`, with its positive weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub weight: u64,
}

/// The group a member `profile` (its id as written in lines) of `segment`
/// belongs to (SPEC §4 "Groups"): with `W` the sum of the weights and
/// `b = xxh3_64(segment, 0x00, profile) mod W`, the first group whose
/// running sum of weights exceeds `b`. `None` when there are no groups.
pub fn group_of<'g>(segment: &str, groups: &'g [Group], profile: &str) -> Option<&'g str> {
    let total: u64 = groups.iter().map(|g| g.weight).sum();
    if total == 0 {
        return None;
    }
    let mut bytes = Vec::with_capacity(segment.len() + 1 + profile.len());
    bytes.extend_from_slice(segment.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(profile.as_bytes());
    let b = xxhash_rust::xxh3::xxh3_64(&bytes) % total;
    let mut sum = 0;
    groups
        .iter()
        .find(|g| {
            sum += g.weight;
            sum > b
        })
        .map(|g| g.name.as_str())
}

/// One `[[score]]`: a named number per profile, read as `score.NAME`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreDef {
    pub name: String,
    pub expr: Expr,
    pub source: String,
}

/// The `[rfm]` block (SPEC §4 "RFM").
#[derive(Clone, Debug, PartialEq)]
pub struct RfmDef {
    /// The `track` event that is a purchase.
    pub purchase: String,
    /// Where the revenue of a purchase is read.
    pub revenue: ast::Path,
    pub window: ast::Window,
    /// `rfm.segment` of each (R score, F score): `grid[r - 1][f - 1]`; the
    /// SPEC's table unless the spec gives a `map`.
    pub grid: Vec<Vec<String>>,
}

/// The SPEC §4 RFM table, `[r - 1][f - 1]`.
pub fn default_rfm_grid() -> Vec<Vec<String>> {
    const ROWS: [[&str; 5]; 5] = [
        ["hibernating", "hibernating", "at_risk", "at_risk", "cant_lose"],
        ["hibernating", "hibernating", "at_risk", "at_risk", "cant_lose"],
        [
            "about_to_sleep",
            "about_to_sleep",
            "need_attention",
            "loyal_customers",
            "loyal_customers",
        ],
        [
            "promising",
            "potential_loyalists",
            "potential_loyalists",
            "loyal_customers",
            "loyal_customers",
        ],
        [
            "new_customers",
            "potential_loyalists",
            "potential_loyalists",
            "champions",
            "champions",
        ],
    ];
    ROWS.iter().map(|r| r.iter().map(|s| s.to_string()).collect()).collect()
}

/// One `[[clustering]]` (SPEC §4 "Clustering"), read as `cluster.NAME`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusteringDef {
    pub name: String,
    pub k: usize,
    /// Numeric expressions per profile, checked like a score's `expr`.
    pub features: Vec<Expr>,
    /// The features as written.
    pub sources: Vec<String>,
    /// Milliseconds of event time between refreshes of the centroids.
    pub refresh: u64,
    pub seed: u64,
}

/// One `[[model]]` (SPEC §4 "Predictive models"), read as `predict.NAME`:
/// logistic regression of `label` at `r` on `features` at `r - horizon`,
/// refitted at every multiple `r` of `refresh`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelDef {
    pub name: String,
    /// A condition over event terms, read `horizon` after the features.
    pub label: Expr,
    /// The label as written.
    pub label_source: String,
    /// Milliseconds between the features and the label.
    pub horizon: u64,
    /// Numeric expressions per profile, checked like a clustering's.
    pub features: Vec<Expr>,
    /// The features as written.
    pub sources: Vec<String>,
    /// Milliseconds of event time between refits.
    pub refresh: u64,
    /// The L2 penalty on the weights (`C = 1/l2` in scikit-learn's terms).
    pub l2: f64,
    /// The share of profiles sampled for training, in (0, 1].
    pub sample: f64,
}

/// Whether `profile` (its id as lines write it) is among the profiles
/// `model` trains on: `xxh3_64(model, 0x00, profile) mod 10^6 < sample·10^6`.
pub fn sampled(model: &str, sample: f64, profile: &str) -> bool {
    let mut bytes = Vec::with_capacity(model.len() + 1 + profile.len());
    bytes.extend_from_slice(model.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(profile.as_bytes());
    ((xxhash_rust::xxh3::xxh3_64(&bytes) % 1_000_000) as f64) < sample * 1e6
}

/// One `[[zone]]` (SPEC §4 "Places"): rings of `(lat, lon)` points, each
/// closed implicitly; `inside` is the even-odd rule over all of them, so
/// holes and the parts of a MultiPolygon need no special case.
#[derive(Clone, PartialEq)]
pub struct ZoneDef {
    pub name: String,
    pub rings: Vec<Vec<(f64, f64)>>,
}

/// The name and the size only: plans key atoms by their `Debug` text, and a
/// zone may have thousands of points.
impl std::fmt::Debug for ZoneDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let points: usize = self.rings.iter().map(Vec::len).sum();
        write!(f, "Zone({:?}, {} rings, {points} points)", self.name, self.rings.len())
    }
}

/// SPEC §4's `distance(lat1, lon1, lat2, lon2)`: the haversine great-circle
/// distance in km on a sphere of radius 6371.0088 km, as
/// `2R·asin(√a)`, `a = sin²(Δφ/2) + cos φ1·cos φ2·sin²(Δλ/2)` (`a` capped
/// at 1 against rounding); `None` when |lat| > 90 or |lon| > 180.
pub fn distance_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> Option<f64> {
    let ok = |lat: f64, lon: f64| lat.abs() <= 90.0 && lon.abs() <= 180.0;
    if !ok(lat1, lon1) || !ok(lat2, lon2) {
        return None;
    }
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let (dp, dl) = ((lat2 - lat1).to_radians(), (lon2 - lon1).to_radians());
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    Some(2.0 * 6371.0088 * a.min(1.0).sqrt().asin())
}

impl ZoneDef {
    /// SPEC §4's `inside(lat, lon, zone)`, exactly as written there: an edge
    /// `(a, b)` toggles when `(a.lat > lat) != (b.lat > lat)` and
    /// `lon < (b.lon - a.lon) * (lat - a.lat) / (b.lat - a.lat) + a.lon`.
    pub fn contains(&self, lat: f64, lon: f64) -> bool {
        let mut inside = false;
        for ring in &self.rings {
            for (i, &(a_lat, a_lon)) in ring.iter().enumerate() {
                let (b_lat, b_lon) = ring[(i + 1) % ring.len()];
                if (a_lat > lat) != (b_lat > lat) && lon < (b_lon - a_lon) * (lat - a_lat) / (b_lat - a_lat) + a_lon {
                    inside = !inside;
                }
            }
        }
        inside
    }
}

/// A checked spec.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Spec {
    pub segments: Vec<Segment>,
    pub scores: Vec<ScoreDef>,
    pub rfm: Option<RfmDef>,
    pub clusterings: Vec<ClusteringDef>,
    pub zones: Vec<ZoneDef>,
    pub models: Vec<ModelDef>,
}

/// An error in a spec, at a 1-based line and column of the TOML file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{column}: {message}")]
pub struct SpecError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}
