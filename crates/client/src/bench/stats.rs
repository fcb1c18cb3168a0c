//! Latency samples per call type and their summary (p50/p90/p99/max, calls per second).

use std::io::{self, Write};
use std::time::Duration;

use serde::Serialize;

use crate::output::Table;
use crate::size::format_duration;

/// Samples and failures of one call type.
#[derive(Debug, Default, Clone)]
pub(crate) struct CallStats {
    samples: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
}

/// Per-call-type statistics in order of first appearance, so tables list calls in the order
/// an operation makes them (CreateVolume before DeleteVolume).
#[derive(Debug, Default, Clone)]
pub(crate) struct Recorder {
    calls: Vec<(&'static str, CallStats)>,
}

impl Recorder {
    fn entry(&mut self, call: &'static str) -> &mut CallStats {
        let index = match self.calls.iter().position(|(name, _)| *name == call) {
            Some(i) => i,
            None => {
                self.calls.push((call, CallStats::default()));
                self.calls.len() - 1
            }
        };
        &mut self.calls[index].1
    }

    /// Records a successful call and its latency.
    pub(crate) fn ok(&mut self, call: &'static str, latency: Duration) {
        self.entry(call).samples.push(latency);
    }

    /// Records a failed call; the first message per call type is kept for the report.
    pub(crate) fn error(&mut self, call: &'static str, message: String) {
        let e = self.entry(call);
        e.errors += 1;
        if e.first_error.is_none() {
            e.first_error = Some(message);
        }
    }

    /// Adds another recorder's samples (one per worker) into this one.
    pub(crate) fn merge(&mut self, other: Recorder) {
        for (call, stats) in other.calls {
            let e = self.entry(call);
            e.samples.extend(stats.samples);
            e.errors += stats.errors;
            if e.first_error.is_none() {
                e.first_error = stats.first_error;
            }
        }
    }

    /// Summaries over a run that took `elapsed`.
    pub(crate) fn summarize(&self, elapsed: Duration) -> Vec<CallSummary> {
        self.calls
            .iter()
            .map(|(call, stats)| CallSummary::new(call, stats, elapsed))
            .collect()
    }
}

/// Nearest-rank percentile of sorted samples: the smallest sample such that at least `p`
/// percent of samples are less than or equal to it. Zero for no samples.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summary of one call type, as printed and as serialized in JSON reports.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CallSummary {
    /// RPC or syscall name.
    pub(crate) call: String,
    /// Successful calls (the latency figures cover these only).
    pub(crate) ok: usize,
    /// Failed calls.
    pub(crate) errors: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    /// Successful calls per second of wall-clock run time.
    pub(crate) per_second: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) first_error: Option<String>,
    #[serde(skip)]
    p50: Duration,
    #[serde(skip)]
    p90: Duration,
    #[serde(skip)]
    p99: Duration,
    #[serde(skip)]
    max: Duration,
}

fn ms(d: Duration) -> f64 {
    // Three decimals (microsecond resolution) keep JSON readable.
    (d.as_secs_f64() * 1e6).round() / 1e3
}

pub(crate) fn rate(n: usize, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        (n as f64 / secs * 10.0).round() / 10.0
    } else {
        0.0
    }
}

impl CallSummary {
    fn new(call: &str, stats: &CallStats, elapsed: Duration) -> Self {
        let mut sorted = stats.samples.clone();
        sorted.sort_unstable();
        let p50 = percentile(&sorted, 50.0);
        let p90 = percentile(&sorted, 90.0);
        let p99 = percentile(&sorted, 99.0);
        let max = sorted.last().copied().unwrap_or_default();
        Self {
            call: call.to_owned(),
            ok: sorted.len(),
            errors: stats.errors,
            p50_ms: ms(p50),
            p90_ms: ms(p90),
            p99_ms: ms(p99),
            max_ms: ms(max),
            per_second: rate(sorted.len(), elapsed),
            first_error: stats.first_error.clone(),
            p50,
            p90,
            p99,
            max,
        }
    }
}

/// The latency table shared by the driver bench and the floor.
pub(crate) fn write_table(out: &mut dyn Write, calls: &[CallSummary]) -> io::Result<()> {
    let mut table = Table::new([
        "CALL", "OK", "ERRORS", "P50", "P90", "P99", "MAX", "CALLS/S",
    ]);
    for c in calls {
        let lat = |d: Duration| {
            if c.ok == 0 {
                "-".to_owned()
            } else {
                format_duration(d)
            }
        };
        table.row([
            c.call.clone(),
            c.ok.to_string(),
            c.errors.to_string(),
            lat(c.p50),
            lat(c.p90),
            lat(c.p99),
            lat(c.max),
            format!("{:.1}", c.per_second),
        ]);
    }
    table.write(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&samples, 50.0), ms(50));
        assert_eq!(percentile(&samples, 90.0), ms(90));
        assert_eq!(percentile(&samples, 99.0), ms(99));
        assert_eq!(percentile(&samples, 100.0), ms(100));
        assert_eq!(percentile(&[ms(7)], 99.0), ms(7));
        assert_eq!(percentile(&[ms(1), ms(2)], 50.0), ms(1));
        assert_eq!(percentile(&[ms(1), ms(2)], 90.0), ms(2));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
        assert_eq!(percentile(&[ms(3)], 0.0), ms(3));
    }

    #[test]
    fn merge_keeps_order_and_counts() {
        let mut a = Recorder::default();
        a.ok("CreateVolume", ms(2));
        a.ok("DeleteVolume", ms(1));
        let mut b = Recorder::default();
        b.ok("DeleteVolume", ms(3));
        b.error("CreateVolume", "NOT_FOUND: x".into());
        a.merge(b);
        let s = a.summarize(Duration::from_secs(1));
        assert_eq!(s[0].call, "CreateVolume");
        assert_eq!((s[0].ok, s[0].errors), (1, 1));
        assert_eq!(s[0].first_error.as_deref(), Some("NOT_FOUND: x"));
        assert_eq!((s[1].ok, s[1].max_ms, s[1].per_second), (2, 3.0, 2.0));
    }
}
