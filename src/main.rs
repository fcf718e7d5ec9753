//! The `shoal` command: `run`, `check`, `generate` (SPEC §6).
//!
//! Exit status: 0 done; 1 a runtime I/O failure (the message names the file);
//! 2 unusable arguments or spec (the message points at the problem).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use shoal::core::clock::{parse_duration, parse_duration_or_zero, parse_time_arg};
use shoal::generate::GenOptions;
use shoal::io::intake::Intake;
use shoal::io::kafka::{kafka_output, KafkaInput};
use shoal::io::source::Source;
use shoal::io::webhook::{webhook_output, Format, WebhookOptions};
use shoal::output::deliver::{file_output, stderr_output, tee_output};
use shoal::run::{EngineError, Job, RunOptions};
use shoal::serve::events::EventsIn;
use shoal::serve::model::History;
use signal_hook::consts::{SIGINT, SIGTERM};

/// The dataflow allocates and frees many small batches per tick: glibc's
/// allocator spent ~30% of a run in malloc/free (perf); mimalloc's
/// thread-local free lists make that a few percent.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Real-time behavioral segmentation: Segment-spec events in, segment enter/exit changes out.",
    long_about = "Real-time behavioral segmentation on differential dataflow.\n\n\
        Reads Segment-spec events (JSON lines), resolves identities into profiles, keeps every\n\
        segment of a dataflow spec (TOML) exactly up to date tick by tick, and writes one JSON line\n\
        per membership change.\n\n\
        Try it:\n  shoal generate --events 100000 | shoal run dataflows/retail.toml --input - --output changes.jsonl"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a spec over events and write membership changes.
    Run(Box<RunArgs>),
    /// Validate a spec: errors name the TOML line and column.
    Check {
        /// The dataflow spec (TOML).
        spec: PathBuf,
        /// The tick every window must be a multiple of.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        tick: u64,
    },
    /// Write realistic, seeded Segment-spec traffic as JSON lines.
    Generate(GenArgs),
}

#[derive(Args)]
struct RunArgs {
    /// The dataflow spec (TOML), e.g. dataflows/retail.toml.
    spec: PathBuf,
    /// An input file of JSON lines, or `-` for stdin; repeat to read several in order.
    /// Without --input, stdin is read when it is not a terminal.
    #[arg(long = "input", value_name = "FILE|-")]
    inputs: Vec<PathBuf>,
    /// Read N events from the built-in generator (seed 1, default population) instead of --input.
    #[arg(long, value_name = "N", conflicts_with = "inputs")]
    generate: Option<u64>,
    /// Where membership changes go (`-` is stdout) [default: -, unless --output-kafka].
    #[arg(long, value_name = "FILE|-")]
    output: Option<PathBuf>,
    /// Where refused lines go, as JSON lines with the reason and position
    /// [default: stderr, so that nothing is silently lost].
    #[arg(long, value_name = "FILE")]
    dead_letter: Option<PathBuf>,
    /// Write nothing after this time (RFC 3339 or epoch ms); at the end of input the clock moves on to it.
    #[arg(long, value_parser = parse_time_arg, value_name = "TIME")]
    until: Option<u64>,
    /// The clock's resolution; every window must be a multiple of it.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "D")]
    tick: u64,
    /// How far behind the largest event time the clock runs; older events are late.
    #[arg(long, default_value = "5s", value_parser = parse_duration_or_zero, value_name = "D")]
    lateness: u64,
    /// Live input: after this long without events the clock follows wall time.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "D")]
    idle: u64,
    /// How long a messageId is remembered for dedupe (memory ≈ events/s × horizon × 40 bytes).
    #[arg(long, default_value = "1h", value_parser = parse_duration_or_zero, value_name = "D")]
    dedupe_horizon: u64,
    /// Worker threads per process.
    #[arg(long, short = 'w', default_value_t = 1)]
    workers: usize,
    /// Threads decoding file input ahead of its reader (the JSON parsing and
    /// stream matching; stamping stays in input order) [default: --workers].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    decoders: Option<u16>,
    /// Number of processes in a cluster run (timely's cluster mode).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// This process's index in the cluster, 0-based; process 0 writes the output.
    #[arg(long, default_value_t = 0)]
    process: usize,
    /// A file with one host:port per process, in process order [default: localhost:2101, 2102, …].
    #[arg(long, value_name = "FILE")]
    hostfile: Option<PathBuf>,
    /// With --processes: give up (exit 1) when the other processes have not all
    /// connected within this time (a peer that died while connecting would
    /// otherwise be waited for forever).
    #[arg(long, default_value = "2m", value_parser = parse_duration, value_name = "D")]
    connect_timeout: u64,
    /// Where the id graph is kept: `one-worker` (merged by union on one worker:
    /// cheapest per event, bounded by that machine's memory) or `partitioned`
    /// (spread over every worker by id, labels propagated between them)
    /// [default: partitioned with --processes > 1, one-worker otherwise].
    /// The output is the same either way.
    #[arg(long, value_enum, value_name = "WHERE")]
    identity: Option<IdentityArg>,
    /// Kafka bootstrap brokers (host:port,…), for --kafka-topic and --output-kafka.
    #[arg(long, value_name = "B", help_heading = "Kafka")]
    kafka_brokers: Option<String>,
    /// Read events from this Kafka topic (repeat for several); its partitions are
    /// spread over all workers of all processes. Runs live until SIGINT/SIGTERM.
    #[arg(long, value_name = "T", help_heading = "Kafka", conflicts_with_all = ["inputs", "generate"])]
    kafka_topic: Vec<String>,
    /// Consumer group whose committed offsets say where reading resumes; offsets are
    /// committed only after the changes those events caused were delivered [default: shoal].
    #[arg(long, value_name = "G", help_heading = "Kafka")]
    kafka_group: Option<String>,
    /// Read each partition up to its end offset as of the start, then finish like file
    /// input (for backfills and rebuilds).
    #[arg(long, help_heading = "Kafka")]
    kafka_until_end: bool,
    /// A partition with no message for this long stops holding the clock back [default: 10s].
    #[arg(long, value_parser = parse_duration, value_name = "D", help_heading = "Kafka")]
    kafka_partition_idle: Option<u64>,
    /// Write membership changes to this Kafka topic (key: profile id, value: the JSON line),
    /// with an idempotent producer that retries until the broker takes them.
    #[arg(long, value_name = "TOPIC", help_heading = "Kafka", conflicts_with_all = ["output", "output_webhook"])]
    output_kafka: Option<String>,
    /// POST membership changes to this URL (repeatable), one request per tick (at most 500
    /// lines each), in order, at least once: retried with backoff on errors, 408, 429
    /// (honouring Retry-After) and 5xx, while input waits. Each request carries an
    /// Idempotency-Key that is the same on a retry and after a restart. Credentials in the URL
    /// (http://KEY:@host/v1/batch) go as HTTP Basic authentication. Without --output, changes
    /// go only to the webhooks.
    #[arg(long, value_name = "URL", help_heading = "Webhooks")]
    output_webhook: Vec<String>,
    /// The body of webhook requests: `ndjson` (the change lines) or `segment` (a Segment
    /// /v1/batch of `Segment Entered` / `Segment Exited` track events, for any receiver of
    /// Segment's API, including another shoal).
    #[arg(long, value_name = "FORMAT", default_value = "ndjson", value_parser = ["ndjson", "segment"], requires = "output_webhook", help_heading = "Webhooks")]
    webhook_format: String,
    /// Sign webhook requests: `X-Shoal-Signature: sha256=<hex HMAC-SHA256 of the body>` keyed
    /// with the file's first line.
    #[arg(long, value_name = "FILE", requires = "output_webhook", help_heading = "Webhooks")]
    webhook_secret_file: Option<PathBuf>,
    /// Where requests a webhook refused for good (a 4xx other than 408 and 429) go, as JSON
    /// lines with the answer [default: stderr].
    #[arg(long, value_name = "FILE", requires = "output_webhook", help_heading = "Webhooks")]
    webhook_dead_letter: Option<PathBuf>,
    /// How long one webhook request may take before it is retried.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "D", requires = "output_webhook", help_heading = "Webhooks")]
    webhook_timeout: u64,
    /// Serve the HTTP API and the live page on this address (e.g. 127.0.0.1:8080; port 0
    /// picks one, printed on stderr as `shoal: listening on http://ADDR`). With it, shoal
    /// keeps serving after the input ends until SIGINT/SIGTERM.
    #[arg(long, value_name = "ADDR", help_heading = "Serving")]
    http: Option<String>,
    /// How long the served model keeps the accepted events, so that a segment defined at
    /// run time (PUT /segments/NAME) over a term the spec does not compute (another event,
    /// filter, window, path or aggregate) starts complete: any window up to D can be
    /// defined; `all` keeps every event (for lifetime terms: `last`, traits, `lifetime`);
    /// `0` keeps none (such segments answer 422). The cost is memory on process 0: about
    /// events/s × D × the size of an event (a few hundred bytes) [default: the longest
    /// window in the spec, so any new term with a window up to it starts complete].
    #[arg(long, value_name = "D|all", value_parser = parse_history, requires = "http", help_heading = "Serving")]
    history: Option<History>,
    /// How far back `GET /segments/NAME/members?at=T` and `GET /profiles/ID?at=T` can look:
    /// every membership change of the last D of the clock is kept (`all`: since the start or
    /// the checkpoint resumed from; `0`: none). Older times answer 410 naming the oldest time
    /// kept. The cost is memory on process 0: about 64 bytes plus the id's length per change
    /// kept (shoal_retained_changes), so about diffs/s × D × 100 bytes.
    #[arg(long, value_name = "D|all", default_value = "1h", value_parser = parse_history, requires = "http", help_heading = "Serving")]
    retain: History,
    /// Take events over HTTP on the --http server: Segment's tracking API (POST /v1/track,
    /// /v1/identify, /v1/page, /v1/screen, /v1/alias, /v1/group, /v1/batch), so Segment's and
    /// RudderStack's libraries send to shoal by pointing their host at it. The file holds the
    /// write keys, one a line; a client sends its key as the HTTP Basic user name. The run
    /// then reads HTTP (beside --kafka-topic when given) instead of files and stdin, live
    /// until SIGINT/SIGTERM. With --state a request is answered only once its events are on
    /// disk (DIR/http-log).
    #[arg(long, value_name = "FILE", requires = "http", conflicts_with_all = ["inputs", "generate"], help_heading = "Events over HTTP")]
    write_key_file: Option<PathBuf>,
    /// Lock the API: every call but `GET /` and the /v1/ calls needs `Authorization: Bearer
    /// TOKEN`, TOKEN being the file's first line; a wrong or missing token answers 401 and
    /// changes nothing. Needed to serve an address other hosts can reach.
    #[arg(long, value_name = "FILE", requires = "http", help_heading = "Serving")]
    http_token_file: Option<PathBuf>,
    /// A second token (the file's first line) that can only read (GET): for dashboards.
    #[arg(long, value_name = "FILE", requires = "http_token_file", help_heading = "Serving")]
    http_read_token_file: Option<PathBuf>,
    /// Serve a non-loopback --http address without a token, open to anyone who reaches it.
    #[arg(long, requires = "http", help_heading = "Serving")]
    http_insecure: bool,
    /// How long a client of --http has to send a request's headers, and then to send its
    /// body and have it answered (408 after that); an idle keep-alive connection is closed
    /// after it too. Slow or stalled clients cannot hold connections open.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "D", requires = "http", help_heading = "Serving")]
    http_timeout: u64,
    /// Serve HTTPS: the certificate chain (PEM), with --http-tls-key.
    #[arg(long, value_name = "FILE", requires_all = ["http", "http_tls_key"], help_heading = "Serving")]
    http_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --http-tls-cert.
    #[arg(long, value_name = "FILE", requires = "http_tls_cert", help_heading = "Serving")]
    http_tls_key: Option<PathBuf>,
    /// Keep checkpoints in this directory and resume from the newest one: run the
    /// same command again after a crash and the output file continues exactly
    /// where the checkpoint left it (cut back, then continued: exactly once).
    #[arg(long, value_name = "DIR", help_heading = "Durability")]
    state: Option<PathBuf>,
    /// How often a checkpoint is written (wall time), with --state.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "D", requires = "state", help_heading = "Durability")]
    checkpoint_every: u64,
    /// An extra librdkafka setting for the consumer and producer, e.g.
    /// security.protocol=SASL_SSL (repeatable).
    #[arg(long, value_name = "KEY=VALUE", value_parser = key_value, help_heading = "Kafka")]
    kafka_option: Vec<(String, String)>,
}

fn webhook_options(args: &RunArgs) -> Result<WebhookOptions, Failure> {
    for url in &args.output_webhook {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(usage(anyhow::anyhow!("--output-webhook {url}: not an http:// or https:// URL")));
        }
    }
    let secret = match &args.webhook_secret_file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the webhook secret {}", f.display()))
                .map_err(|e| Failure(1, e))?;
            let first = text.lines().next().unwrap_or_default().trim().to_string();
            if first.is_empty() {
                return Err(usage(anyhow::anyhow!("{} holds no secret on its first line", f.display())));
            }
            Some(first.into_bytes())
        }
        None => None,
    };
    Ok(WebhookOptions {
        format: if args.webhook_format == "segment" {
            Format::Segment
        } else {
            Format::Ndjson
        },
        secret,
        dead_letter: args.webhook_dead_letter.clone(),
        timeout: std::time::Duration::from_millis(args.webhook_timeout),
    })
}

fn parse_history(s: &str) -> Result<History, String> {
    match s {
        "all" => Ok(History::All),
        "0" => Ok(History::Keep(0)),
        _ => parse_duration_or_zero(s).map(History::Keep),
    }
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

#[derive(Args)]
struct GenArgs {
    /// Distinct people (identified users and anonymous visitors).
    #[arg(long, default_value_t = 1000)]
    users: u64,
    /// Lines to write (including a few duplicates and malformed lines).
    #[arg(long, default_value_t = 10_000)]
    events: u64,
    /// Seed: the same seed gives the same lines on every machine.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Time of the first event (RFC 3339 or epoch ms).
    #[arg(long, default_value = "2024-01-01T00:00:00Z", value_parser = parse_time_arg)]
    start: u64,
    /// Pace output to this many lines per second (for live demos).
    #[arg(long)]
    rate: Option<f64>,
    /// Days of event time to spread the lines over (more when there are
    /// over 12M lines: at most 20 a second on average).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u64).range(1..=36500))]
    days: u64,
    /// Write to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
}

/// A failure with its exit status.
struct Failure(u8, anyhow::Error);

/// `--identity`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum IdentityArg {
    OneWorker,
    Partitioned,
}

fn usage(e: impl Into<anyhow::Error>) -> Failure {
    Failure(2, e.into())
}

/// A cluster process whose peer died (its connection broke) stops at once
/// with one line and exit 1, instead of timely's panics on every thread
/// (and workers that may wait for the lost peer forever). With `--state`,
/// starting every process again resumes from the last checkpoint.
fn stop_when_a_peer_is_lost() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("timely communication error") {
            eprintln!(
                "shoal: lost a connection to another process of the cluster ({message}); stopping. \
                 Start every process again (with --state they resume from the last checkpoint)"
            );
            std::process::exit(1);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    stop_when_a_peer_is_lost();
    shoal::dataflow::exit_when_a_worker_panics();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Check { spec, tick } => check(&spec, tick),
        Command::Generate(args) => generate(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("shoal: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn load_spec(path: &Path, tick: u64) -> Result<shoal::spec::Spec, Failure> {
    shoal::spec::load(path, tick).map_err(|errors| {
        let text: Vec<String> = errors.iter().map(|e| format!("{}:{e}", path.display())).collect();
        usage(anyhow::anyhow!(
            "{} has {} error(s):\n{}",
            path.display(),
            errors.len(),
            text.join("\n")
        ))
    })
}

fn check(path: &Path, tick: u64) -> Result<(), Failure> {
    let spec = load_spec(path, tick)?;
    println!("{}: ok, {} segment(s)", path.display(), spec.segments.len());
    Ok(())
}

fn timely_config(args: &RunArgs) -> Result<timely::Config, Failure> {
    if args.workers == 0 {
        return Err(usage(anyhow::anyhow!("--workers must be at least 1")));
    }
    if args.processes <= 1 {
        return Ok(if args.workers == 1 {
            timely::Config::thread()
        } else {
            timely::Config::process(args.workers)
        });
    }
    if args.process >= args.processes {
        return Err(usage(anyhow::anyhow!(
            "--process {} is out of range for --processes {}",
            args.process,
            args.processes
        )));
    }
    let addresses: Vec<String> = match &args.hostfile {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read hostfile {}", f.display()))
                .map_err(usage)?;
            text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
        }
        None => (0..args.processes).map(|i| format!("localhost:{}", 2101 + i)).collect(),
    };
    if addresses.len() < args.processes {
        return Err(usage(anyhow::anyhow!(
            "the hostfile lists {} address(es) but --processes is {}",
            addresses.len(),
            args.processes
        )));
    }
    // Timely takes a process per address.
    let mut addresses = addresses;
    addresses.truncate(args.processes);
    Ok(timely::Config {
        communication: timely::CommunicationConfig::Cluster {
            threads: args.workers,
            process: args.process,
            addresses,
            report: false,
            zerocopy: false,
        },
        worker: timely::WorkerConfig::default(),
    })
}

fn run(args: RunArgs) -> Result<(), Failure> {
    let kafka_used = !args.kafka_topic.is_empty() || args.output_kafka.is_some();
    if kafka_used && args.kafka_brokers.is_none() {
        return Err(usage(anyhow::anyhow!(
            "--kafka-topic and --output-kafka need --kafka-brokers HOST:PORT"
        )));
    }
    if (args.kafka_group.is_some() || args.kafka_partition_idle.is_some()) && args.kafka_topic.is_empty() {
        return Err(usage(anyhow::anyhow!(
            "--kafka-group and --kafka-partition-idle are for reading --kafka-topic: give it"
        )));
    }
    if !args.kafka_option.is_empty() && args.kafka_topic.is_empty() && args.output_kafka.is_none() {
        return Err(usage(anyhow::anyhow!(
            "--kafka-option sets librdkafka for --kafka-topic or --output-kafka: give one"
        )));
    }
    if args.kafka_until_end && args.kafka_topic.is_empty() {
        return Err(usage(anyhow::anyhow!("--kafka-until-end needs --kafka-topic")));
    }
    if args.kafka_until_end && args.write_key_file.is_some() {
        return Err(usage(anyhow::anyhow!(
            "--kafka-until-end ends the run, but events over HTTP (--write-key-file) are live: use one or the other"
        )));
    }
    let spec = load_spec(&args.spec, args.tick)?;
    let mut sources: Vec<Source> = args
        .inputs
        .iter()
        .map(|p| {
            if p.as_os_str() == "-" {
                Source::Stdin
            } else {
                Source::File(p.clone())
            }
        })
        .collect();
    if let Some(events) = args.generate {
        sources.push(Source::Generate(GenOptions {
            events,
            users: (events / 20).max(100),
            ..GenOptions::default()
        }));
    }
    let token = |file: &Option<PathBuf>| -> Result<Option<String>, Failure> {
        let Some(f) = file else { return Ok(None) };
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the token {}", f.display()))
            .map_err(|e| Failure(1, e))?;
        match text.lines().next().map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) => Ok(Some(t.to_string())),
            None => Err(usage(anyhow::anyhow!("{} holds no token on its first line", f.display()))),
        }
    };
    let access = shoal::serve::http::Access::of_tokens(
        token(&args.http_token_file)?.as_deref(),
        token(&args.http_read_token_file)?.as_deref(),
    );
    let tls = match (&args.http_tls_cert, &args.http_tls_key) {
        (Some(cert), Some(key)) => Some(shoal::serve::http::tls_config(cert, key).map_err(|e| usage(anyhow::anyhow!(e)))?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let events = match &args.write_key_file {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the write keys {}", file.display()))
                .map_err(|e| Failure(1, e))?;
            let keys = EventsIn::keys_of(&text);
            if keys.is_empty() {
                return Err(usage(anyhow::anyhow!("{} holds no write key (one a line)", file.display())));
            }
            let intake = match &args.state {
                Some(dir) => Intake::durable(&dir.join("http-log")).map_err(|e| Failure(1, e.into()))?,
                None => Intake::memory(),
            };
            sources.push(Source::Http(intake.clone()));
            Some(Arc::new(EventsIn::new(keys, intake)))
        }
        None => None,
    };
    if sources.is_empty() && args.kafka_topic.is_empty() {
        if std::io::stdin().is_terminal() {
            return Err(usage(anyhow::anyhow!(
                "no input: give --input FILE (or -), or pipe events into stdin"
            )));
        }
        sources.push(Source::Stdin);
    }
    for s in &sources {
        if let Source::File(p) = s {
            if !p.is_file() {
                return Err(Failure(1, anyhow::anyhow!("cannot read input {}: no such file", p.display())));
            }
        }
    }
    let opts = RunOptions {
        tick: args.tick,
        lateness: args.lateness,
        dedupe_horizon: args.dedupe_horizon,
        until: args.until,
        idle: args.idle,
        workers: args.workers,
        decoders: args.decoders.map_or(args.workers, usize::from),
        identity: args.identity.map(|i| match i {
            IdentityArg::OneWorker => shoal::dataflow::identity::Placement::OneWorker,
            IdentityArg::Partitioned => shoal::dataflow::identity::Placement::Partitioned,
        }),
        requests: Vec::new(),
    };
    let brokers = args.kafka_brokers.clone().unwrap_or_default();
    let kafka = (!args.kafka_topic.is_empty()).then(|| KafkaInput {
        brokers: brokers.clone(),
        topics: args.kafka_topic.clone(),
        group: args.kafka_group.clone().unwrap_or_else(|| "shoal".to_string()),
        until_end: args.kafka_until_end,
        partition_idle: args.kafka_partition_idle.unwrap_or(10_000),
        options: args.kafka_option.clone(),
    });
    let output = match &args.output_kafka {
        Some(topic) => kafka_output(brokers, topic.clone(), args.kafka_option.clone()),
        None => {
            let mut outputs = Vec::new();
            if args.output.is_some() || args.output_webhook.is_empty() {
                outputs.push(file_output(args.output.clone().unwrap_or_else(|| PathBuf::from("-"))));
            }
            let hooks = webhook_options(&args)?;
            outputs.extend(args.output_webhook.iter().map(|url| webhook_output(url.clone(), hooks.clone())));
            tee_output(outputs)
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // A second signal while stopping exits at once.
        let registered = signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())
            .and_then(|_| signal_hook::flag::register(signal, stop.clone()));
        registered.context("cannot handle signals").map_err(|e| Failure(1, e))?;
    }
    let connected = Arc::new(AtomicBool::new(false));
    if args.processes > 1 {
        let (connected, wait) = (connected.clone(), std::time::Duration::from_millis(args.connect_timeout));
        std::thread::spawn(move || {
            std::thread::sleep(wait);
            if !connected.load(Ordering::SeqCst) {
                eprintln!(
                    "shoal: the cluster's {} processes did not all connect within --connect-timeout; stopping. \
                     Start every process again (with --state they resume from the last checkpoint)",
                    args.processes
                );
                std::process::exit(1);
            }
        });
    }
    let job = Job {
        spec,
        opts,
        sources,
        kafka,
        stop,
        connected,
        timings: None,
        output: Some(output),
        dead_letters: Some(args.dead_letter.clone().map_or_else(stderr_output, file_output)),
        timely: timely_config(&args)?,
        state: args.state.clone().map(|dir| shoal::run::StateOptions {
            dir,
            every: std::time::Duration::from_millis(args.checkpoint_every),
        }),
        http: args.http.clone().map(|addr| shoal::run::HttpOptions {
            addr,
            history: args.history,
            retain: args.retain,
            spec_text: std::fs::read_to_string(&args.spec).ok(),
            events: events.clone(),
            access: access.clone(),
            insecure: args.http_insecure,
            tls: tls.clone(),
            timeout: std::time::Duration::from_millis(args.http_timeout),
            on_listen: Some(Arc::new(move |a| eprintln!("shoal: listening on {scheme}://{a}"))),
        }),
        suppression: Default::default(),
    };
    let summary = shoal::run::run(job).map_err(|e| match e {
        EngineError::Unsupported(_) | EngineError::Refused(_) | EngineError::Input(shoal::io::Error::Unsupported(_)) => usage(e),
        _ => Failure(1, e.into()),
    })?;
    if args.process == 0 {
        eprintln!("{}", serde_json::to_string(&summary).expect("summary serializes"));
    }
    Ok(())
}

fn generate(args: GenArgs) -> Result<(), Failure> {
    let opts = GenOptions {
        users: args.users,
        events: args.events,
        seed: args.seed,
        start_ms: args.start,
        days: args.days,
    };
    let result = match &args.output {
        Some(p) => {
            let f = std::fs::File::create(p)
                .with_context(|| format!("cannot write {}", p.display()))
                .map_err(|e| Failure(1, e))?;
            shoal::generate::write_all(&opts, &mut std::io::BufWriter::new(f), args.rate)
        }
        None => shoal::generate::write_all(&opts, &mut std::io::stdout().lock(), args.rate),
    };
    match result {
        Ok(_) => Ok(()),
        // A closed pipe (`shoal generate | head`) is a normal end.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure(1, anyhow::Error::new(e).context("cannot write generated events"))),
    }
}
