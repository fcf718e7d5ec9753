//! The HTTP API and live page (SPEC §7), on its own thread beside the
//! timely workers: axum on a single-threaded tokio runtime. Reads take the
//! served model's read lock once, so every answer is at one tick; runtime
//! definitions are checked here (a bad expression never reaches a worker),
//! then queued for the sink on worker 0, which answers over a oneshot.
//! Nothing a caller sends can stop the dataflow: the worker side of a
//! command is a pure function of the model, and a panic in a handler stays
//! in its task.
//!
//! The server ends with the run: `crate::run::run` shuts the returned
//! [`Server`] down once the workers are done (after SIGINT/SIGTERM when
//! serving) and joins its thread, so `run` returns only when the port is
//! closed. Shutdown is graceful: no new connection is accepted, `/stream`
//! subscriptions end their event streams, answers in flight finish.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value as Json_};

use crate::core::clock::{format_time, parse_duration, parse_time_arg};
use crate::serve::model::{parse_id, value_json, ApiError, Change, Command, Def, Model, Served};

/// The live page: one static file, no build step.
pub const PAGE: &str = include_str!("page.html");

type St = State<Arc<Served>>;

/// How long answers in flight may take to finish once the run is over;
/// connections still open after that are dropped.
const GRACE: Duration = Duration::from_secs(5);

/// The HTTP server's thread. [`Server::shutdown`] (or dropping it) closes
/// the server and waits for its thread: the listener is closed, `/stream`
/// subscriptions end, answers in flight finish (for at most [`GRACE`]),
/// and runtime definitions still queued are answered as refused.
pub struct Server {
    served: Arc<Served>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Closes the server and returns once its thread has ended.
    pub fn shutdown(mut self) {
        self.close();
    }

    fn close(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        self.served.closing.send_replace(true);
        // The sink no longer runs them: dropping a reply answers its caller.
        self.served.commands.lock().unwrap_or_else(|e| e.into_inner()).clear();
        if thread.join().is_err() {
            tracing::error!("the HTTP server's thread panicked");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.close();
    }
}

/// Serves on `listener` from a thread of its own until the returned
/// [`Server`] is shut down.
pub fn spawn(
    listener: std::net::TcpListener,
    served: Arc<Served>,
    events: Option<Arc<crate::serve::events::EventsIn>>,
    access: Access,
    tls: Option<TlsConfig>,
    timeout: Duration,
) -> std::io::Result<Server> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let state = served.clone();
    let thread = std::thread::Builder::new().name("shoal-http".into()).spawn(move || {
        runtime.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("cannot serve HTTP: {e}");
                    return;
                }
            };
            let (graceful, mut deadline) = (state.closing.subscribe(), state.closing.subscribe());
            let mut app = router_with(state, Arc::new(access));
            if let Some(events) = events {
                app = app.merge(crate::serve::events::router(events));
            }
            // A request (its body read and its answer made) has `timeout`;
            // a subscription's answer is made at once, its events follow.
            let app = app.layer(tower_http::timeout::TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                timeout,
            ));
            let server = serve_connections(listener, app, tls, timeout, graceful);
            tokio::select! {
                () = server => {},
                _ = async move {
                    let _ = deadline.wait_for(|c| *c).await;
                    tokio::time::sleep(GRACE).await;
                } => tracing::warn!("HTTP connections still open {GRACE:?} after the end of the run were dropped"),
            }
        })
        // Dropping the runtime here cancels what is left of its tasks.
    })?;
    Ok(Server {
        served,
        thread: Some(thread),
    })
}

/// A TLS server configuration (`--http-tls-cert`, `--http-tls-key`).
pub type TlsConfig = Arc<tokio_rustls::rustls::ServerConfig>;

/// The TLS configuration of a PEM certificate chain and private key; the
/// error names the file and the problem.
pub fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsConfig, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|c| c.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read the certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("cannot read the private key {}: {e}", key.display()))?;
    // ring, which ureq already brings (aws-lc-rs would add a C build);
    // rustls deprecates it only for lacking post-quantum key exchange.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| format!("{} and {} do not make a usable pair: {e}", cert.display(), key.display()))?;
    Ok(Arc::new(config))
}

/// At most this many connections are served at once; more wait in the
/// listener's backlog.
const CONNECTIONS: usize = 1024;

/// Serves `app` until `closing`, over TLS when `tls` is given: a client
/// has `timeout` for its TLS handshake and for each request's headers (an
/// idle keep-alive connection is closed after it too); at the close,
/// connections finish what they are answering.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<TlsConfig>,
    timeout: Duration,
    closing: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    let mut stop = closing.clone();
    loop {
        let stopped = async {
            let _ = stop.wait_for(|c| *c).await;
        };
        let accepted = tokio::select! {
            a = async { (slots.clone().acquire_owned().await, listener.accept().await) } => a,
            () = stopped => break,
        };
        let (Ok(slot), Ok((tcp, _))) = accepted else { continue };
        let (acceptor, app, closing) = (acceptor.clone(), app.clone(), closing.clone());
        connections.spawn(async move {
            let _slot = slot;
            match acceptor {
                None => serve_one(tcp, app, timeout, closing).await,
                Some(acceptor) => {
                    if let Ok(Ok(stream)) = tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                        serve_one(stream, app, timeout, closing).await;
                    }
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
}

/// Serves one HTTP/1.1 connection until it ends or, at `closing`, it has
/// finished its answers. HTTP/1.1 only: guessing the version would read
/// the first bytes with no timeout, and an idle client could hold on.
async fn serve_one<S>(stream: S, app: Router, timeout: Duration, mut closing: tokio::sync::watch::Receiver<bool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(timeout);
    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(connection);
    let closed = async move {
        let _ = closing.wait_for(|c| *c).await;
    };
    tokio::select! {
        _ = connection.as_mut() => {}
        () = closed => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// Who may call the API (`--http-token-file`, `--http-read-token-file`):
/// every call but `GET /` and the `/v1/` calls needs `Authorization:
/// Bearer <token>`; the read token only for GET.
///
/// Only the tokens' SHA-256 digests are held (and, with `--state`, kept in
/// the state directory): comparing digests takes the same time however much
/// of a guess is right, and the state holds no secret.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Access {
    /// The admin token's digest (hex).
    pub admin: Option<String>,
    /// The read-only token's digest (hex).
    pub read: Option<String>,
}

impl Access {
    /// The rules for these tokens.
    pub fn of_tokens(admin: Option<&str>, read: Option<&str>) -> Access {
        Access {
            admin: admin.map(digest),
            read: read.map(digest),
        }
    }

    /// Whether the API is open to anyone who reaches it.
    pub fn open(&self) -> bool {
        self.admin.is_none() && self.read.is_none()
    }
}

/// The largest body an API call reads (a segment definition, a preview).
const API_BODY_MAX: usize = 64 * 1024;
/// API calls served at once at most; more wait their turn.
const API_CONCURRENT: usize = 64;

/// Checks the bearer token: 401 (nothing is done) when it is missing or
/// wrong, 403 when the read token asks to change something.
async fn authorize(State(access): State<Arc<Access>>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if access.open() {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let given = given.map(digest);
    let is = |token: &Option<String>| token.is_some() && *token == given;
    let reading = request.method() == axum::http::Method::GET || request.method() == axum::http::Method::HEAD;
    if is(&access.admin) || (reading && is(&access.read)) {
        return next.run(request).await;
    }
    let (status, message) = if is(&access.read) {
        (StatusCode::FORBIDDEN, "the read-only token cannot change anything")
    } else {
        (StatusCode::UNAUTHORIZED, "a valid token is needed: Authorization: Bearer <token>")
    };
    let mut answer = (status, Json(json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        answer
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    }
    answer
}

/// A token's SHA-256 digest, in hex.
fn digest(token: &str) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()))
}

/// The API and the page; `access` guards every call but the page.
pub fn router(served: Arc<Served>) -> Router {
    router_with(served, Arc::new(Access::default()))
}

/// [`router`] with access rules.
pub fn router_with(served: Arc<Served>, access: Arc<Access>) -> Router {
    let guard = axum::middleware::from_fn_with_state(access, authorize);
    let api = Router::new()
        .route("/segments", get(segments))
        .route("/segments/preview", post(preview))
        .route("/segments/overlap", get(overlap))
        .route("/spec", get(spec))
        .route("/segments/{name}", axum::routing::put(put_segment).delete(delete_segment))
        .route("/segments/{name}/members", get(members))
        .route("/segments/{name}/history", get(history))
        .route("/profiles/{id}", get(profile).delete(forget))
        .route("/profiles/{id}/unlink", post(unlink))
        .route("/models", get(models))
        .route("/models/{name}/examples", get(model_examples))
        .route("/metrics", get(metrics))
        .with_state(served.clone())
        .route_layer(guard.clone())
        .layer(axum::extract::DefaultBodyLimit::max(API_BODY_MAX))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(API_CONCURRENT));
    // A subscription lasts: it does not take one of the API's slots.
    let stream = Router::new().route("/stream", get(stream)).with_state(served).route_layer(guard);
    Router::new().route("/", get(|| async { Html(PAGE) })).merge(api).merge(stream)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Expression { message, line, column } => (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": message, "line": line, "column": column})),
            )
                .into_response(),
            ApiError::NotFound { message, profile } => {
                let mut body = json!({ "error": message });
                if let Some(p) = profile {
                    body["profile"] = p.into();
                }
                (StatusCode::NOT_FOUND, Json(body)).into_response()
            }
            ApiError::Bad(message) => (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response(),
            ApiError::Conflict(message) => (StatusCode::CONFLICT, Json(json!({ "error": message }))).into_response(),
            ApiError::Unavailable(message) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": message }))).into_response(),
            ApiError::Gone { message, oldest } => (StatusCode::GONE, Json(json!({"error": message, "oldest": oldest}))).into_response(),
            ApiError::Unprocessable(message) => (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "error": message }))).into_response(),
        }
    }
}

fn unknown_segment(name: &str) -> ApiError {
    ApiError::NotFound {
        message: format!("no segment named {name:?}"),
        profile: None,
    }
}

fn clock_json(m: &Model) -> Json_ {
    m.clock.map_or(Json_::Null, |t| format_time(t, m.show_ms).into())
}

fn read(served: &Served) -> std::sync::RwLockReadGuard<'_, Model> {
    served.model.read().unwrap_or_else(|e| e.into_inner())
}

async fn segments(State(s): St) -> Json<Json_> {
    let m = read(&s);
    let list: Vec<Json_> = m
        .segments
        .iter()
        .filter(|s| s.live())
        .map(|seg| {
            let mut j = json!({
                "name": seg.name,
                "size": seg.members.len(),
                "description": seg.description,
                "when": seg.source,
                "entered": seg.entered,
                "exited": seg.exited,
            });
            if !seg.groups.is_empty() {
                // SPEC §4 "Groups": each group's size, in the order written.
                let groups: Vec<Json_> = seg
                    .groups
                    .iter()
                    .zip(&seg.group_sizes)
                    .map(|(g, size)| json!({"name": g.name, "weight": g.weight, "size": size}))
                    .collect();
                j["groups"] = groups.into();
            }
            j
        })
        .collect();
    Json(json!({"clock": clock_json(&m), "segments": list}))
}

#[derive(Deserialize)]
struct Page {
    limit: Option<usize>,
    after: Option<String>,
    at: Option<String>,
}

/// A past tick asked for with `?at=T`: `None` for now, 400 for a bad
/// time.
fn past(m: &Model, at: &Option<String>) -> Result<Option<u64>, ApiError> {
    let Some(text) = at else { return Ok(None) };
    let t = parse_time_arg(text).map_err(|e| ApiError::Bad(format!("bad at: {e}")))?;
    // Before the first tick there is no past: the answer is now's.
    Ok(m.clock.map(|c| t.min(c)))
}

/// 410: `at` is older than the changes kept (`--retain`).
fn gone(m: &Model, oldest: u64) -> ApiError {
    ApiError::Gone {
        message: format!(
            "the changes kept (--retain {}) reach back only to {}",
            m.retain.text(),
            format_time(oldest, m.show_ms)
        ),
        oldest: format_time(oldest, m.show_ms),
    }
}

async fn members(State(s): St, Path(name): Path<String>, Query(q): Query<Page>) -> Result<Json<Json_>, ApiError> {
    let m = read(&s);
    let slot = m.slot(&name).ok_or_else(|| unknown_segment(&name))?;
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let at = past(&m, &q.at)?;
    let then = match at {
        Some(t) => Some(m.members_at(slot, t).map_err(|oldest| gone(&m, oldest))?),
        None => None,
    };
    let set = then.as_ref().unwrap_or(&m.segments[slot].members);
    let from = match &q.after {
        Some(a) => Bound::Excluded(a.clone()),
        None => Bound::Unbounded,
    };
    let mut page: Vec<&String> = set.range((from, Bound::Unbounded)).take(limit + 1).collect();
    let next = (page.len() > limit).then(|| {
        page.pop();
        page.last().map(|s| s.to_string())
    });
    let mut answer = json!({
        "clock": clock_json(&m),
        "segment": name,
        "members": page,
        "next": next.flatten(),
    });
    if let Some(t) = at {
        answer["at"] = format_time(t, m.show_ms).into();
    }
    Ok(Json(answer))
}

#[derive(Deserialize)]
struct Names {
    names: Option<String>,
}

/// The most segments `/segments/overlap` compares (2⁵ - 6 = 26 overlaps).
const OVERLAP_MAX: usize = 5;

async fn overlap(State(s): St, Query(q): Query<Names>) -> Result<Json<Json_>, ApiError> {
    let names: Vec<&str> = q.names.as_deref().unwrap_or("").split(',').filter(|n| !n.is_empty()).collect();
    if !(2..=OVERLAP_MAX).contains(&names.len()) {
        return Err(ApiError::Bad(format!(
            "names must list 2 to {OVERLAP_MAX} segments, comma-separated (got {})",
            names.len()
        )));
    }
    if let Some(twice) = names.iter().enumerate().find(|(i, n)| names[..*i].contains(n)) {
        return Err(ApiError::Bad(format!("{} is named twice", twice.1)));
    }
    let m = read(&s);
    let slots = names
        .iter()
        .map(|n| m.slot(n).ok_or_else(|| unknown_segment(n)))
        .collect::<Result<Vec<usize>, ApiError>>()?;
    let sizes: serde_json::Map<String, Json_> = slots
        .iter()
        .map(|&slot| (m.segments[slot].name.clone(), m.segments[slot].members.len().into()))
        .collect();
    let overlaps: Vec<Json_> = m
        .overlaps(&slots)
        .into_iter()
        .map(|(of, size)| {
            let names: Vec<&str> = of.iter().map(|&slot| m.segments[slot].name.as_str()).collect();
            json!({"segments": names, "size": size})
        })
        .collect();
    Ok(Json(json!({"clock": clock_json(&m), "sizes": sizes, "overlaps": overlaps})))
}

#[derive(Deserialize)]
struct Range {
    from: Option<String>,
    to: Option<String>,
    step: Option<String>,
}

async fn history(State(s): St, Path(name): Path<String>, Query(q): Query<Range>) -> Result<Json<Json_>, ApiError> {
    let m = read(&s);
    let slot = m.slot(&name).ok_or_else(|| unknown_segment(&name))?;
    let seg = &m.segments[slot];
    let bad = |what: &str, e: String| ApiError::Bad(format!("bad {what}: {e}"));
    let step = match &q.step {
        Some(d) => parse_duration(d).map_err(|e| bad("step", e))?,
        None => m.tick,
    }
    .max(1);
    let Some(clock) = m.clock else {
        return Ok(Json(json!({"clock": null, "segment": name, "points": []})));
    };
    let to = match &q.to {
        Some(t) => parse_time_arg(t).map_err(|e| bad("to", e))?.min(clock),
        None => clock,
    };
    // Points are at ticks. Without `from`, the segment's first change, or
    // the last 10,000 steps before `to` on a longer run.
    let from = match &q.from {
        Some(t) => crate::core::clock::tick_of(parse_time_arg(t).map_err(|e| bad("from", e))?, m.tick),
        None => seg
            .history
            .first()
            .map_or(clock, |(t, _)| *t)
            .max(crate::core::clock::tick_of(to.saturating_sub(9_999 * step), m.tick)),
    };
    // After a restart from a checkpoint, ticks before it came back
    // consolidated into its last one: their sizes are not known.
    let known = m.resumed.saturating_sub(m.tick);
    if from < known {
        return Err(ApiError::Gone {
            message: format!(
                "sizes are known from {} on: the run resumed from a checkpoint there",
                format_time(known, m.show_ms)
            ),
            oldest: format_time(known, m.show_ms),
        });
    }
    if from <= to && (to - from) / step >= 10_000 {
        return Err(ApiError::Bad("more than 10000 points: use a larger step".into()));
    }
    let mut points = Vec::new();
    let mut t = from;
    while t <= to {
        points.push(json!({"time": format_time(t, m.show_ms), "size": seg.size_at(t)}));
        t = match t.checked_add(step) {
            Some(n) => n,
            None => break,
        };
    }
    Ok(Json(json!({"clock": clock_json(&m), "segment": name, "points": points})))
}

#[derive(Deserialize)]
struct At {
    at: Option<String>,
}

async fn profile(State(s): St, Path(id): Path<String>, Query(q): Query<At>) -> Result<Json<Json_>, ApiError> {
    let m = read(&s);
    let at = past(&m, &q.at)?;
    let not_found = |profile: Option<String>| ApiError::NotFound {
        message: match &profile {
            Some(p) => format!("{id} is not a profile id: it belongs to {p}"),
            None => format!("no profile {id}"),
        },
        profile,
    };
    let Some((key, _)) = parse_id(&id) else {
        return Err(not_found(None));
    };
    if !m.names.contains_key(&key) {
        let now = m.labels.get(&key).and_then(|p| m.names.get(p)).map(|p| p.to_string());
        return Err(not_found(now));
    }
    let ids: BTreeSet<String> = m.ids_of(key).iter().map(ToString::to_string).collect();
    let mut segments = serde_json::Map::new();
    if let Some(t) = at {
        // The memberships its ids had then, whichever profile they made.
        for (slot, seg) in m.segments.iter().enumerate().filter(|(_, seg)| seg.live()) {
            let member = m.member_at(slot, t, &ids).map_err(|oldest| gone(&m, oldest))?;
            segments.insert(seg.name.clone(), json!({ "member": member }));
        }
        return Ok(Json(json!({
            "clock": clock_json(&m),
            "at": format_time(t, m.show_ms),
            "profile": id,
            "ids": ids,
            "segments": segments,
        })));
    }
    for (slot, seg) in m.segments.iter().enumerate() {
        if !seg.live() {
            continue;
        }
        let why: Vec<Json_> = m
            .why(slot, key)
            .into_iter()
            .map(|c| {
                let values: Vec<Json_> = c.values.iter().map(value_json).collect();
                json!({"condition": c.text, "holds": c.holds, "values": values})
            })
            .collect();
        segments.insert(
            seg.name.clone(),
            json!({"member": seg.keys.contains(&key), "runtime": matches!(seg.def, Def::Runtime { .. }), "why": why}),
        );
    }
    let mut predictions = serde_json::Map::new();
    for (i, def) in m.models.iter().enumerate() {
        let (probability, features) = m.prediction(i, key);
        let features: serde_json::Map<String, Json_> = def.sources.iter().cloned().zip(features.iter().map(value_json)).collect();
        predictions.insert(
            def.name.clone(),
            json!({"probability": value_json(&probability), "features": features}),
        );
    }
    Ok(Json(json!({
        "clock": clock_json(&m),
        "profile": id,
        "ids": ids,
        "segments": segments,
        "predictions": predictions,
    })))
}

/// `GET /models`: every `[[model]]` in spec order with its fit in force
/// (SPEC §4 "Predictive models"): per feature its weight on the
/// standardized feature (`null` when left out), mean and scale; the
/// intercept, examples, classes, when it was fitted and the AUC of its
/// predictions on the examples of the refresh before. Before a first fit
/// these are `null`.
async fn models(State(s): St) -> Json<Json_> {
    let m = read(&s);
    let list: Vec<Json_> = m
        .models
        .iter()
        .zip(&m.fits)
        .map(|(def, fit)| {
            let fit = fit.as_ref();
            let features: Vec<Json_> = def
                .sources
                .iter()
                .enumerate()
                .map(|(j, expr)| {
                    let l = fit.map(|f| &f.logit);
                    json!({
                        "expr": expr,
                        "weight": l.and_then(|l| l.weights[j]),
                        "mean": l.map(|l| l.mean[j]),
                        "scale": l.map(|l| l.scale[j]),
                    })
                })
                .collect();
            json!({
                "name": def.name,
                "label": def.label_source,
                "horizon": crate::spec::parse::format_duration(def.horizon),
                "refresh": crate::spec::parse::format_duration(def.refresh),
                "l2": def.l2,
                "sample": def.sample,
                "features": features,
                "intercept": fit.map(|f| f.logit.intercept),
                "examples": fit.map(|f| f.logit.examples),
                "classes": fit.map(|f| json!({"false": f.logit.examples - f.logit.positives, "true": f.logit.positives})),
                "fitted_at": fit.map(|f| format_time(f.time, m.show_ms)),
                "auc": fit.and_then(|f| f.auc),
                "steps": fit.map(|f| f.logit.steps),
                "gradient": fit.map(|f| f.logit.gradient),
            })
        })
        .collect();
    Json(json!({"clock": clock_json(&m), "models": list}))
}

/// `GET /models/{name}/examples`: the examples of the model's latest fit,
/// `x` as the features were at `r - horizon` and
/// `y` the label at `r`, in the order the fit sums them: for checking a
/// fit offline (scikit-learn's `LogisticRegression(C=1/l2)` on the
/// standardized `x` finds the same weights). `time` names the refresh; it
/// may be one the served clock has not reached yet.
async fn model_examples(State(s): St, Path(name): Path<String>) -> Result<Json<Json_>, ApiError> {
    let (index, def) = {
        let m = read(&s);
        let Some(i) = m.models.iter().position(|d| d.name == name) else {
            return Err(ApiError::NotFound {
                message: format!("no model {name}"),
                profile: None,
            });
        };
        (i, m.models[i].clone())
    };
    let kept = s.kept.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let state = kept.and_then(|k| k.models.latest(index));
    let (time, examples) = match state.and_then(|st| Some((st.fitted?.time, st.fitted_on?))) {
        Some((t, ex)) => (Some(t), ex),
        None => (None, Default::default()),
    };
    let show_ms = read(&s).show_ms;
    let rows: Vec<Json_> = examples.iter().map(|e| json!({"x": e.x, "y": e.y})).collect();
    Ok(Json(json!({
        "model": def.name,
        "l2": def.l2,
        "time": time.map(|t| format_time(t, show_ms)),
        "features": def.sources,
        "examples": rows,
    })))
}

/// Queues a forget or unlink for worker 0's reader and waits for the tick
/// it takes effect at.
async fn request(s: &Served, r: crate::core::id::Request) -> Result<u64, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    {
        // Checked under the lock `end_requests` drains it with.
        let mut queue = s.requests.lock().unwrap_or_else(|e| e.into_inner());
        if s.ended.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::serve::model::no_tick_follows());
        }
        queue.push((r, tx));
    }
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(result)) => result,
        _ => Err(ApiError::Unavailable("the reader did not take the request (stopping?)".into())),
    }
}

/// The profile `id` names (it or the profile it belongs to), and its ids,
/// or 404.
fn profile_and_ids(m: &Model, id: &str) -> Result<(crate::core::id::Id, BTreeSet<crate::core::id::Id>), ApiError> {
    let unknown = || ApiError::NotFound {
        message: format!("no profile {id}"),
        profile: None,
    };
    let (key, _) = parse_id(id).ok_or_else(unknown)?;
    let profile = if m.names.contains_key(&key) {
        key
    } else {
        *m.labels.get(&key).ok_or_else(unknown)?
    };
    let name = m.names.get(&profile).ok_or_else(unknown)?.clone();
    Ok((name, m.ids_of(profile)))
}

/// The answer to a request on a profile's ids that takes effect at tick
/// `at`: 202 with the profile, its ids and the tick's time.
fn accepted(s: &Served, profile: &crate::core::id::Id, ids: &BTreeSet<crate::core::id::Id>, at: u64) -> (StatusCode, Json<Json_>) {
    let ids: BTreeSet<String> = ids.iter().map(ToString::to_string).collect();
    let at = format_time(at, read(s).show_ms);
    (
        StatusCode::ACCEPTED,
        Json(json!({"profile": profile.to_string(), "ids": ids, "at": at})),
    )
}

/// `DELETE /profiles/{id}`: forgets the profile (SPEC §7) from the next tick.
async fn forget(State(s): St, Path(id): Path<String>) -> Result<(StatusCode, Json<Json_>), ApiError> {
    let (profile, ids) = profile_and_ids(&read(&s), &id)?;
    let at = request(&s, crate::core::id::Request::Forget(ids.iter().map(|id| id.key()).collect())).await?;
    Ok(accepted(&s, &profile, &ids, at))
}

#[derive(Deserialize)]
struct Unlink {
    ids: Vec<String>,
}

/// `POST /profiles/{id}/unlink`: from the next tick the two ids are never
/// linked again.
async fn unlink(State(s): St, Path(id): Path<String>, body: Bytes) -> Result<(StatusCode, Json<Json_>), ApiError> {
    let body: Unlink =
        serde_json::from_slice(&body).map_err(|e| ApiError::Bad(format!("expected {{\"ids\": [\"anon:a\", \"user:b\"]}}: {e}")))?;
    let [a, b] = body.ids.as_slice() else {
        return Err(ApiError::Bad(format!("ids must name two ids, not {}", body.ids.len())));
    };
    let parsed = |text: &String| parse_id(text).ok_or_else(|| ApiError::Bad(format!("{text:?} is not an id (user:… or anon:…)")));
    let (a, b) = (parsed(a)?.1, parsed(b)?.1);
    // SPEC §7: 400 for the same id twice, whether or not it is the profile's.
    if a == b {
        return Err(ApiError::Bad("the two ids are the same".into()));
    }
    let (profile, ids) = profile_and_ids(&read(&s), &id)?;
    for id in [&a, &b] {
        if !ids.contains(id) {
            return Err(ApiError::NotFound {
                message: format!("{id} is not an id of {profile}"),
                profile: None,
            });
        }
    }
    let at = request(&s, crate::core::id::Request::Unlink(a.key(), b.key())).await?;
    Ok(accepted(&s, &profile, &ids, at))
}

#[derive(Deserialize)]
struct Definition {
    when: String,
    description: Option<String>,
}

fn definition(body: &[u8]) -> Result<Definition, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::Bad(format!("expected {{\"when\": \"…\"}}: {e}")))
}

async fn preview(State(s): St, body: Bytes) -> Result<Json<Json_>, ApiError> {
    let def = definition(&body)?;
    let m = read(&s);
    let (_, plan, formula) = m.compile(&def.when, None)?;
    let members = m.evaluate(&plan, &formula);
    let sample: Vec<&String> = members.iter().take(20).collect();
    Ok(Json(json!({"clock": clock_json(&m), "size": members.len(), "sample": sample})))
}

/// Queues a command for worker 0 and waits for its answer.
async fn command(s: &Served, change: Change) -> Result<usize, ApiError> {
    if s.stop.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ApiError::Bad("shoal is stopping".into()));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    s.commands
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Command { change, reply: tx });
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(result)) => result,
        _ => Err(ApiError::Bad("the engine did not answer (stopping?)".into())),
    }
}

async fn put_segment(State(s): St, Path(name): Path<String>, body: Bytes) -> Result<Json<Json_>, ApiError> {
    let def = definition(&body)?;
    if name.is_empty() || name == "preview" || name == "overlap" {
        return Err(ApiError::Bad(format!("{name:?} cannot name a segment")));
    }
    let change = Change::Put {
        name: name.clone(),
        description: def.description,
        when: def.when,
    };
    // Check at once, so a bad expression never reaches a worker.
    read(&s).check(&change)?;
    let size = command(&s, change).await?;
    Ok(Json(json!({"name": name, "size": size})))
}

async fn delete_segment(State(s): St, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    if read(&s).slot(&name).is_none() {
        return Err(unknown_segment(&name));
    }
    command(&s, Change::Delete { name }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The running spec as TOML (see `crate::serve::running`).
async fn spec(State(s): St) -> Response {
    let text = {
        let m = read(&s);
        crate::serve::running::running_spec(s.spec_text.as_deref().unwrap_or(""), s.spec_segments, &m.segments)
    };
    ([(header::CONTENT_TYPE, "application/toml; charset=utf-8")], text).into_response()
}

async fn metrics(State(s): St) -> Response {
    use std::fmt::Write;
    let c = s.counters();
    let m = read(&s);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP shoal_events_total Events read, by result.\n# TYPE shoal_events_total counter"
    );
    for (result, n) in [
        ("read", c.read),
        ("accepted", c.accepted),
        ("bad", c.bad),
        ("duplicate", c.duplicates),
        ("late", c.late),
        ("ignored", c.ignored),
        ("suppressed", c.suppressed),
    ] {
        let _ = writeln!(out, "shoal_events_total{{result=\"{result}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP shoal_dead_letters_total Lines refused (written to the dead letters).\n# TYPE shoal_dead_letters_total counter\nshoal_dead_letters_total {}", c.bad);
    let _ = writeln!(
        out,
        "# HELP shoal_diffs_total Membership changes written.\n# TYPE shoal_diffs_total counter\nshoal_diffs_total {}",
        m.diffs
    );
    let _ = writeln!(
        out,
        "# HELP shoal_segment_size Members of each segment at the clock.\n# TYPE shoal_segment_size gauge"
    );
    for seg in m.segments.iter().filter(|s| s.live()) {
        let _ = writeln!(
            out,
            "shoal_segment_size{{segment=\"{}\"}} {}",
            escape_label(&seg.name),
            seg.members.len()
        );
    }
    let _ = writeln!(
        out,
        "# HELP shoal_profiles Profiles at the clock.\n# TYPE shoal_profiles gauge\nshoal_profiles {}",
        m.names.len()
    );
    let _ = writeln!(
        out,
        "# HELP shoal_history_events Accepted events the served model keeps (--history).\n# TYPE shoal_history_events gauge\nshoal_history_events {}",
        m.retained.count
    );
    let _ = writeln!(
        out,
        "# HELP shoal_retained_changes Membership changes kept for ?at= (--retain).\n# TYPE shoal_retained_changes gauge\nshoal_retained_changes {}",
        m.changes_kept
    );
    if let Some(t) = m.clock {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let clock = t as f64 / 1000.0;
        let _ = writeln!(out, "# HELP shoal_clock_seconds The clock (last final tick), epoch seconds.\n# TYPE shoal_clock_seconds gauge\nshoal_clock_seconds {clock}");
        let _ = writeln!(
            out,
            "# HELP shoal_clock_lag_seconds Wall time minus the clock.\n# TYPE shoal_clock_lag_seconds gauge\nshoal_clock_lag_seconds {}",
            now - clock
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

async fn stream(State(s): St) -> impl IntoResponse {
    use tokio_stream::StreamExt;
    let rx = s.stream.subscribe();
    // Lines until the server closes (a lagging subscriber skips lines), then the end.
    let lines = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|line| line.ok().map(Some));
    let closed = tokio_stream::wrappers::WatchStream::new(s.closing.subscribe())
        .filter(|c| *c)
        .map(|_| None);
    let events = lines
        .merge(closed)
        .take_while(Option::is_some)
        .map(|l| Ok::<_, std::convert::Infallible>(Event::default().data(l.as_deref().unwrap_or_default())));
    Sse::new(events).keep_alive(KeepAlive::default())
}
