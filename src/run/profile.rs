//! Where a worker's time goes, by operator: `SHOAL_PROFILE=1 shoal run …`.
//!
//! Timely logs every operator's start and stop on the worker thread. This
//! module registers a logger for those events and sums, per operator name,
//! the time spent in the operator itself (a region's time excludes the
//! operators inside it). At the end of the run each worker prints a table on
//! stderr: operator name, how many operators share it, exclusive time and
//! its share of the worker's wall time. What is in no operator — the reader
//! decoding and stamping events, feeding inputs, stepping — is the rest.
//! Off by default: the logger costs a little on every schedule.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use timely::logging::{StartStop, TimelyEvent, TimelyEventBuilder};

/// Exclusive time per operator of one worker.
#[derive(Default)]
pub struct Profile {
    names: HashMap<usize, String>,
    exclusive: HashMap<usize, Duration>,
    /// Running operators: `(id, started, time in operators started inside it)`.
    stack: Vec<(usize, Duration, Duration)>,
}

/// Whether `SHOAL_PROFILE` asks for operator profiles.
pub fn wanted() -> bool {
    std::env::var_os("SHOAL_PROFILE").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Starts profiling `worker`'s operators; call before building dataflows.
pub fn register(worker: &mut timely::worker::Worker) -> Rc<RefCell<Profile>> {
    let profile = Rc::new(RefCell::new(Profile::default()));
    let sink = profile.clone();
    if let Some(mut registry) = worker.log_register() {
        registry.insert::<TimelyEventBuilder, _>("timely", move |_time, data| {
            if let Some(data) = data {
                let mut p = sink.borrow_mut();
                for (at, event) in data.iter() {
                    p.record(*at, event);
                }
            }
        });
    }
    profile
}

impl Profile {
    fn record(&mut self, at: Duration, event: &TimelyEvent) {
        match event {
            TimelyEvent::Operates(op) => {
                self.names.insert(op.id, op.name.clone());
            }
            TimelyEvent::Schedule(s) => match s.start_stop {
                StartStop::Start => self.stack.push((s.id, at, Duration::ZERO)),
                StartStop::Stop => {
                    if let Some((id, started, inner)) = self.stack.pop() {
                        let spent = at.saturating_sub(started);
                        *self.exclusive.entry(id).or_default() += spent.saturating_sub(inner);
                        if let Some(parent) = self.stack.last_mut() {
                            parent.2 += spent;
                        }
                    }
                }
            },
            _ => {}
        }
    }

    /// The table for worker `index` whose run took `wall`.
    pub fn report(&self, index: usize, wall: Duration) -> String {
        let mut by_name: HashMap<&str, (usize, Duration)> = HashMap::new();
        for (id, spent) in &self.exclusive {
            let name = self.names.get(id).map(String::as_str).unwrap_or("?");
            let e = by_name.entry(name).or_default();
            e.0 += 1;
            e.1 += *spent;
        }
        let mut rows: Vec<_> = by_name.into_iter().collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1 .1));
        let total: Duration = rows.iter().map(|r| r.1 .1).sum();
        let share = |d: Duration| 100.0 * d.as_secs_f64() / wall.as_secs_f64().max(1e-9);
        let mut out = format!("shoal: worker {index} operator profile, wall {:.2} s\n", wall.as_secs_f64());
        for (name, (n, spent)) in rows {
            out += &format!("  {:>5.1}%  {:>8.3} s  {:>3}x  {name}\n", share(spent), spent.as_secs_f64(), n);
        }
        out += &format!(
            "  {:>5.1}%  {:>8.3} s        outside operators (reading, feeding, stepping)\n",
            share(wall.saturating_sub(total)),
            wall.saturating_sub(total).as_secs_f64()
        );
        if let Some(cpu) = thread_cpu() {
            out += &format!(
                "  worker {index} thread CPU {:.3} s (on a core {:.0}% of its wall time)\n",
                cpu.as_secs_f64(),
                share(cpu)
            );
        }
        out
    }
}

/// The CPU time of the calling thread so far (Linux: the first field of
/// `/proc/thread-self/schedstat`, nanoseconds on a CPU).
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok().map(Duration::from_nanos)
}

/// A profile with the instant its worker started.
pub struct Profiling {
    pub profile: Rc<RefCell<Profile>>,
    pub started: Instant,
}

impl Profiling {
    /// Profiles `worker` when `SHOAL_PROFILE` is set.
    pub fn start(worker: &mut timely::worker::Worker) -> Option<Profiling> {
        wanted().then(|| Profiling {
            profile: register(worker),
            started: Instant::now(),
        })
    }

    /// Prints the table on stderr.
    pub fn finish(self, index: usize) {
        eprint!("{}", self.profile.borrow().report(index, self.started.elapsed()));
    }
}
