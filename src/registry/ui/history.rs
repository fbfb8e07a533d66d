//! The last hour of the mirror's counters, for the status page's "last 5
//! minutes" figures and its chart: a sample of the running totals every
//! `EVERY`, the oldest dropped past `KEEP`. Bounded: 361 small samples.

use std::collections::VecDeque;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::core::Collector as _;
use serde::Serialize;

use crate::metrics::Metrics;

/// How often the totals are sampled.
pub const EVERY: Duration = Duration::from_secs(10);
/// Samples kept: one hour, and the one before it (for its first delta).
const KEEP: usize = 361;

/// Running totals since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Manifest and blob lookups, whatever their outcome.
    pub requests: u64,
    /// Lookups that went upstream for their answer.
    pub misses: u64,
    /// Body bytes served from the store and straight from upstream.
    pub cache_bytes: u64,
    pub upstream_bytes: u64,
    /// Upstream pulls the cache saved (`hoard_upstream_pulls_saved_total`).
    pub pulls_saved: u64,
}

impl Totals {
    /// The totals the metrics hold now.
    pub fn read(metrics: &Metrics) -> Totals {
        let mut totals = Totals::default();
        for (labels, value) in counters(&metrics.cache_requests) {
            totals.requests += value;
            if labels.iter().any(|(k, v)| k == "result" && v == "miss") {
                totals.misses += value;
            }
        }
        for (labels, value) in counters(&metrics.served_bytes) {
            match labels
                .iter()
                .find(|(k, _)| k == "source")
                .map(|(_, v)| v.as_str())
            {
                Some("cache") => totals.cache_bytes += value,
                Some("upstream") => totals.upstream_bytes += value,
                _ => {}
            }
        }
        totals.pulls_saved = counters(&metrics.pulls_saved).map(|(_, v)| v).sum();
        totals
    }

    /// What happened between `earlier` and these totals.
    pub fn since(&self, earlier: &Totals) -> Totals {
        Totals {
            requests: self.requests.saturating_sub(earlier.requests),
            misses: self.misses.saturating_sub(earlier.misses),
            cache_bytes: self.cache_bytes.saturating_sub(earlier.cache_bytes),
            upstream_bytes: self.upstream_bytes.saturating_sub(earlier.upstream_bytes),
            pulls_saved: self.pulls_saved.saturating_sub(earlier.pulls_saved),
        }
    }

    /// The share of lookups answered without going upstream; `None`
    /// before any.
    pub fn hit_ratio(&self) -> Option<f64> {
        (self.requests > 0).then(|| 1.0 - self.misses as f64 / self.requests as f64)
    }
}

/// Every series of a counter vector: its labels and value. Read through
/// `collect`, so no series is made for a label value never used.
fn counters(vec: &prometheus::IntCounterVec) -> impl Iterator<Item = (Vec<(String, String)>, u64)> {
    vec.collect()
        .into_iter()
        .flat_map(|family| family.get_metric().to_vec())
        .map(|metric| {
            let labels = metric
                .get_label()
                .iter()
                .map(|l| (l.name().to_owned(), l.value().to_owned()))
                .collect();
            (labels, metric.get_counter().get_value() as u64)
        })
}

/// One interval of the chart: what happened in the `EVERY` before `t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Point {
    /// Unix milliseconds at its end.
    pub t: u64,
    #[serde(flatten)]
    pub totals: Totals,
}

/// The samples of the last hour.
#[derive(Default)]
pub struct History {
    samples: Mutex<VecDeque<(u64, Totals)>>,
}

impl History {
    /// Adds the totals at unix milliseconds `at`.
    pub fn record(&self, at: u64, totals: Totals) {
        let mut samples = self.samples.lock();
        samples.push_back((at, totals));
        while samples.len() > KEEP {
            samples.pop_front();
        }
    }

    /// The oldest sample taken at or after unix milliseconds `at` (the
    /// start of a window), if any.
    pub fn from(&self, at: u64) -> Option<Totals> {
        let samples = self.samples.lock();
        samples
            .iter()
            .find(|(t, _)| *t >= at)
            .map(|(_, totals)| *totals)
    }

    /// Each interval's activity, oldest first, and the one since the last
    /// sample up to `now` (unix milliseconds), so the chart shows the
    /// latest activity at once.
    pub fn points(&self, now: u64, totals: Totals) -> Vec<Point> {
        let samples = self.samples.lock();
        let mut points: Vec<Point> = samples
            .iter()
            .zip(samples.iter().skip(1))
            .map(|((_, before), (t, after))| Point {
                t: *t,
                totals: after.since(before),
            })
            .collect();
        if let Some((t, last)) = samples.back() {
            if now > *t {
                points.push(Point {
                    t: now,
                    totals: totals.since(last),
                });
            }
        }
        // At most an hour of points: the oldest goes with the live one.
        if points.len() > KEEP - 1 {
            points.remove(0);
        }
        points
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(requests: u64, misses: u64) -> Totals {
        Totals {
            requests,
            misses,
            ..Totals::default()
        }
    }

    #[test]
    fn windows_and_points_are_deltas_of_the_samples() {
        let history = History::default();
        for n in 0..KEEP as u64 + 10 {
            history.record(n * 10_000, totals(n * 4, n));
        }
        assert_eq!(history.samples.lock().len(), KEEP, "an hour, bounded");
        let last = (KEEP as u64 + 9) * 10_000;
        let points = history.points(
            last + 5_000,
            totals((KEEP as u64 + 9) * 4 + 2, KEEP as u64 + 9),
        );
        assert_eq!(points.len(), KEEP - 1);
        let (live, sampled) = points.split_last().unwrap();
        assert!(sampled.iter().all(|p| p.totals == totals(4, 1)));
        assert_eq!((live.t, live.totals), (last + 5_000, totals(2, 0)));
        let window = history.from(last - 300_000).unwrap();
        let now = totals((KEEP as u64 + 9) * 4, KEEP as u64 + 9);
        assert_eq!(now.since(&window), totals(120, 30));
        assert_eq!(now.since(&window).hit_ratio(), Some(0.75));
        assert_eq!(Totals::default().hit_ratio(), None);
    }

    #[test]
    fn totals_read_every_series_of_the_metrics() {
        let metrics = Metrics::new();
        metrics
            .cache_requests
            .with_label_values(&["blob", "hit"])
            .inc_by(3);
        metrics
            .cache_requests
            .with_label_values(&["manifest", "miss"])
            .inc();
        metrics
            .served_bytes
            .with_label_values(&["cache"])
            .inc_by(100);
        metrics
            .served_bytes
            .with_label_values(&["upstream"])
            .inc_by(7);
        metrics
            .pulls_saved
            .with_label_values(&["docker.io"])
            .inc_by(2);
        metrics.pulls_saved.with_label_values(&["ghcr.io"]).inc();
        assert_eq!(
            Totals::read(&metrics),
            Totals {
                requests: 4,
                misses: 1,
                cache_bytes: 100,
                upstream_bytes: 7,
                pulls_saved: 3
            }
        );
    }
}
