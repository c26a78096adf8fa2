//! Measuring helpers of the benchmarks: a bounded closed-loop load driver with per-request
//! latencies, percentiles, and `/proc` readings (RSS, CPU time) of this or another process.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What one phase (one kind of load at one concurrency) observed.
#[derive(Debug, Clone)]
pub struct PhaseStats {
    /// Operations that finished (successfully or not) before the deadline.
    pub completed: usize,
    /// Of those, the ones that failed (non-200, transport error, nack, timeout).
    pub errors: usize,
    /// Wall time from the first start to the last finish.
    pub elapsed: Duration,
    /// Every finished operation's latency in microseconds, sorted.
    pub latencies_us: Vec<u64>,
    /// Whether the phase stopped at its deadline before `total` operations.
    pub truncated: bool,
}

impl PhaseStats {
    /// Successful operations per second.
    pub fn ok_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        (self.completed - self.errors) as f64 / secs
    }

    /// The `p`-quantile (0 < p ≤ 1) latency in milliseconds, nearest rank.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        percentile_us(&self.latencies_us, p) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.latencies_us.last().copied().unwrap_or(0) as f64 / 1000.0
    }

    pub fn mean_ms(&self) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        self.latencies_us.iter().sum::<u64>() as f64 / self.latencies_us.len() as f64 / 1000.0
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile_us(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs `operation(i)` for `i` in `0..total` from `concurrency` tasks, each starting the next
/// operation as soon as its previous one finished (closed loop: at most `concurrency` in
/// flight), until all are done or `deadline` passes. `operation` returns whether it succeeded.
pub async fn drive<F, Fut>(
    concurrency: usize,
    total: usize,
    deadline: Duration,
    operation: F,
) -> PhaseStats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let operation = Arc::new(operation);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let stop_at = started + deadline;
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency.max(1) {
        let operation = Arc::clone(&operation);
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(total / concurrency.max(1) + 1);
            let mut errors = 0usize;
            let mut last_finish = started;
            loop {
                if Instant::now() >= stop_at {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let begun = Instant::now();
                let ok = operation(i).await;
                last_finish = Instant::now();
                latencies.push((last_finish - begun).as_micros() as u64);
                if !ok {
                    errors += 1;
                }
            }
            (latencies, errors, last_finish)
        }));
    }
    let mut latencies_us = Vec::with_capacity(total);
    let mut errors = 0;
    let mut finished = started;
    for task in tasks {
        // A panicking operation is a bug of the benchmark itself; count nothing for it.
        if let Ok((latencies, task_errors, last)) = task.await {
            latencies_us.extend(latencies);
            errors += task_errors;
            finished = finished.max(last);
        }
    }
    latencies_us.sort_unstable();
    let completed = latencies_us.len();
    PhaseStats {
        completed,
        errors,
        elapsed: finished - started,
        latencies_us,
        truncated: completed < total,
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Peak RSS (`VmHWM`) of this process in MiB: the bench itself, with the simulator it runs
/// in process.
pub fn own_peak_rss_mib() -> f64 {
    proc_status_kib(std::process::id(), "VmHWM").map_or(0.0, |kib| kib as f64 / 1024.0)
}

/// Clock ticks per second of `/proc` CPU times (`getconf CLK_TCK`; 100 on Linux for every
/// mainstream architecture, and not readable without libc).
const CLOCK_TICKS: f64 = 100.0;

/// User + system CPU time a process has used so far (`/proc/<pid>/stat`, or `self`).
pub fn process_cpu(pid: Option<u32>) -> Option<Duration> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name may contain spaces; fields resume after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after `state`.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / CLOCK_TICKS,
    ))
}

/// Machine-wide CPU counters (`/proc/stat` first line): (busy, total) ticks.
pub fn system_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    // idle + iowait
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// CPU use over an interval: this process, another one, and the machine.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    own: Option<Duration>,
    other: Option<Duration>,
    system: Option<(u64, u64)>,
}

/// What a [`CpuMark`] measured until now.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    /// CPU seconds of the benchmark process (load generator, plus publishers when in process).
    pub own_secs: f64,
    /// CPU seconds of the observed child (the ingress), when there is one.
    pub other_secs: f64,
    /// Share of all cores busy, machine-wide (0–1): RabbitMQ, the ingress, the benchmark.
    pub system_busy: f64,
}

impl CpuMark {
    pub fn now(other: Option<u32>) -> Self {
        Self {
            own: process_cpu(None),
            other: other.and_then(|pid| process_cpu(Some(pid))),
            system: system_cpu(),
        }
    }

    pub fn since(&self, other: Option<u32>) -> CpuUse {
        let later = Self::now(other);
        let secs = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64(),
            _ => 0.0,
        };
        let system_busy = match (self.system, later.system) {
            (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
                (busy1 - busy0) as f64 / (total1 - total0) as f64
            }
            _ => 0.0,
        };
        CpuUse {
            own_secs: secs(self.own, later.own),
            other_secs: secs(self.other, later.other),
            system_busy,
        }
    }
}

/// Sum of the `_sum` and `_count` series of a Prometheus histogram whose labels contain
/// `label` (e.g. `route="/webhook"`), from a text exposition.
pub fn histogram_totals(exposition: &str, metric: &str, label: &str) -> (f64, f64) {
    (
        series_total(exposition, &format!("{metric}_sum"), &[label]),
        series_total(exposition, &format!("{metric}_count"), &[label]),
    )
}

/// How many observations of a Prometheus histogram whose labels contain `label` were at
/// most `le` (its bucket of that bound, which must be one of its bounds), from a text
/// exposition.
pub fn histogram_at_most(exposition: &str, metric: &str, label: &str, le: f64) -> f64 {
    series_values(exposition, &format!("{metric}_bucket"))
        .filter(|(labels, _)| labels.contains(label))
        .filter(|(labels, _)| {
            labels
                .split("le=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .and_then(|bound| bound.parse::<f64>().ok())
                .is_some_and(|bound| bound == le)
        })
        .map(|(_, value)| value)
        .sum()
}

/// Sum of the values of `series` (a counter, or one series of a histogram) over its label
/// sets that contain every one of `labels`, from a text exposition; a series without labels
/// counts when `labels` is empty.
pub fn series_total(exposition: &str, series: &str, labels: &[&str]) -> f64 {
    series_values(exposition, series)
        .filter(|(text, _)| labels.iter().all(|label| text.contains(label)))
        .map(|(_, value)| value)
        .sum()
}

/// The samples of `series` in a text exposition: each one's label text (between the
/// braces; empty without labels) and value. Longer names that start with `series` are not
/// its samples.
fn series_values<'a>(
    exposition: &'a str,
    series: &'a str,
) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    exposition.lines().filter_map(move |line| {
        let rest = line.strip_prefix(series)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(rest) => rest.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        Some((labels, value.trim().parse::<f64>().ok()?))
    })
}

/// A process's `/metrics` text.
pub async fn scrape(http: &reqwest::Client, url: url::Url) -> anyhow::Result<String> {
    Ok(http
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// Rounds to `places` decimals for the report.
pub fn round(value: f64, places: i32) -> f64 {
    let factor = 10f64.powi(places);
    (value * factor).round() / factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile_us(&values, 0.5), 50);
        assert_eq!(percentile_us(&values, 0.99), 99);
        assert_eq!(percentile_us(&values, 1.0), 100);
        assert_eq!(percentile_us(&[7], 0.5), 7);
        assert_eq!(percentile_us(&[], 0.5), 0);
    }

    #[test]
    fn histogram_totals_filter_by_label() {
        let text = "# TYPE x histogram\n\
            x_bucket{route=\"/webhook\",le=\"0.1\"} 3\n\
            x_sum{route=\"/webhook\",status=\"200\"} 1.5\n\
            x_count{route=\"/webhook\",status=\"200\"} 3\n\
            x_sum{route=\"/readyz\",status=\"200\"} 9\n\
            x_count{route=\"/readyz\",status=\"200\"} 9\n";
        assert_eq!(
            histogram_totals(text, "x", "route=\"/webhook\""),
            (1.5, 3.0)
        );
    }

    #[test]
    fn buckets_and_counters_are_read_by_their_labels() {
        let text = "# TYPE x histogram\n\
            x_bucket{route=\"/webhook\",status=\"200\",le=\"5\"} 7\n\
            x_bucket{route=\"/webhook\",status=\"200\",le=\"10\"} 8\n\
            x_bucket{route=\"/webhook\",status=\"503\",le=\"10\"} 2\n\
            x_bucket{route=\"/webhook\",status=\"200\",le=\"+Inf\"} 9\n\
            x_bucket{route=\"/readyz\",status=\"200\",le=\"10\"} 100\n\
            waited_total 3\n\
            waited_total_other 40\n";
        assert_eq!(
            histogram_at_most(text, "x", "route=\"/webhook\"", 10.0),
            10.0
        );
        assert_eq!(histogram_at_most(text, "x", "route=\"/webhook\"", 5.0), 7.0);
        assert_eq!(series_total(text, "waited_total", &[]), 3.0);
        assert_eq!(
            series_total(text, "x_bucket", &["status=\"503\"", "le=\"10\""]),
            2.0
        );
        assert_eq!(series_total(text, "absent", &[]), 0.0);
    }

    #[test]
    fn own_process_readings_work() {
        assert!(proc_status_kib(std::process::id(), "VmRSS").unwrap() > 0);
        assert!(process_cpu(None).is_some());
        assert!(system_cpu().is_some());
    }

    #[tokio::test]
    async fn the_driver_counts_every_operation_once() {
        let stats = drive(
            4,
            50,
            Duration::from_secs(10),
            |i| async move { i % 10 != 0 },
        )
        .await;
        assert_eq!(stats.completed, 50);
        assert_eq!(stats.errors, 5);
        assert!(!stats.truncated);
    }
}

/// User + system CPU time of every process whose command name is `comm` (`postgres`,
/// `beam.smp`), plus what their exited children used (`cutime` + `cstime`: PostgreSQL's
/// postmaster collects its finished backends'), so a backend that ends between two readings
/// still counts.
pub fn group_cpu(comm: &str) -> Duration {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    let mut ticks = 0u64;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if &stat[open + 1..close] != comm {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        // utime, stime, cutime, cstime: fields 14–17 of the line, 12–15 after `state`.
        ticks += fields[11..15.min(fields.len())]
            .iter()
            .filter_map(|v| v.parse::<u64>().ok())
            .sum::<u64>();
    }
    Duration::from_secs_f64(ticks as f64 / CLOCK_TICKS)
}

/// CPU seconds of the processes a pipeline moves a change through, between two readings.
#[derive(Debug, Clone, Copy)]
pub struct PipelineCpu {
    ingress: Duration,
    engine: Duration,
    own: Duration,
    postgres: Duration,
    rabbitmq: Duration,
}

impl PipelineCpu {
    /// A reading: the ingress and the engine (worker or baseline) by pid, this process (the
    /// simulator and the load driver), PostgreSQL's and RabbitMQ's processes by name.
    pub fn now(ingress: u32, engine: u32) -> Self {
        Self {
            ingress: process_cpu(Some(ingress)).unwrap_or_default(),
            engine: process_cpu(Some(engine)).unwrap_or_default(),
            own: process_cpu(None).unwrap_or_default(),
            postgres: group_cpu("postgres"),
            rabbitmq: group_cpu("beam.smp"),
        }
    }

    /// Milliseconds of CPU per change since `self`, per process, as the JSON object the
    /// report prints (`ours_plus_postgres`: ingress + engine + PostgreSQL).
    pub fn per_change_since(&self, later: &Self, changes: usize) -> serde_json::Value {
        let per = |a: Duration, b: Duration| {
            round(
                b.saturating_sub(a).as_secs_f64() * 1000.0 / changes.max(1) as f64,
                3,
            )
        };
        let ingress = per(self.ingress, later.ingress);
        let engine = per(self.engine, later.engine);
        let postgres = per(self.postgres, later.postgres);
        serde_json::json!({
            "ingress": ingress,
            "engine": engine,
            "postgres": postgres,
            "rabbitmq": per(self.rabbitmq, later.rabbitmq),
            "simulator_and_driver": per(self.own, later.own),
            "ours_plus_postgres": round(ingress + engine + postgres, 3),
        })
    }
}
