//! `/ui/api/status`: the JSON the status page renders, built from the
//! mirror's snapshots, the metrics and their history. Filtered to what the
//! user may pull when logins are on; it carries no credential, token or
//! client address.

use serde::Serialize;

use super::history::{Point, Totals};
use crate::mirror::catalog::CachedImage;
use crate::mirror::{Condition, RegistryHealth};
use crate::mirror::{Download, StoreUsage};

/// The whole answer.
#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub uptime_seconds: u64,
    /// Since start.
    pub total: Window,
    /// The last 5 minutes (since start when younger).
    pub recent: Window,
    /// The last hour, one point per sampling interval.
    pub history: Vec<Point>,
    pub registries: Vec<Registry>,
    pub downloads: Vec<Download>,
    pub images: Vec<Image>,
    pub store: Store,
}

/// What happened in a window.
#[derive(Debug, Serialize)]
pub struct Window {
    pub seconds: u64,
    pub hit_ratio: Option<f64>,
    #[serde(flatten)]
    pub totals: Totals,
}

impl Window {
    pub fn new(seconds: u64, totals: Totals) -> Window {
        Window {
            seconds,
            hit_ratio: totals.hit_ratio(),
            totals,
        }
    }
}

/// A configured registry and how it is doing.
#[derive(Debug, Serialize, PartialEq)]
pub struct Registry {
    pub name: String,
    /// `ok`, `budget_low`, `unreachable`, `circuit_open`, `revalidating` or
    /// `rate_limited`.
    pub state: &'static str,
    /// Until it is asked again (`circuit_open`, `rate_limited`).
    pub retry_in_seconds: Option<u64>,
    /// Failures in a row (`unreachable`).
    pub failures: Option<u32>,
    /// Its rate limit as last announced (Docker Hub: pulls left in the
    /// window, of how many, over how long).
    pub remaining: Option<i64>,
    pub limit: Option<i64>,
    pub window_seconds: Option<i64>,
}

impl Registry {
    pub fn new(name: String, health: RegistryHealth) -> Registry {
        let (state, retry_in, failures) = match health.condition {
            Condition::Ok => ("ok", None, None),
            Condition::BudgetLow => ("budget_low", None, None),
            Condition::Unreachable { failures } => ("unreachable", None, Some(failures)),
            Condition::Revalidating => ("revalidating", None, None),
            Condition::CircuitOpen { retry_in } => ("circuit_open", Some(retry_in), None),
            Condition::RateLimited { retry_in } => ("rate_limited", Some(retry_in), None),
        };
        Registry {
            name,
            state,
            // Rounded up: "0 s left" while still waiting would be wrong.
            retry_in_seconds: retry_in.map(|d| d.as_millis().div_ceil(1000) as u64),
            failures,
            remaining: health.remaining,
            limit: health.limit,
            window_seconds: health.window_secs,
        }
    }
}

/// A cached tag, split for the table.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Image {
    pub registry: String,
    pub repository: String,
    pub tag: String,
    pub digest: String,
    pub platforms: Vec<String>,
    pub size: u64,
    /// Unix seconds; 0: never since it was cached.
    pub last_pulled: u64,
    pub pinned: bool,
}

impl Image {
    /// Splits `registry/name:tag`; `None` for a key of another shape.
    pub fn new(cached: CachedImage) -> Option<Image> {
        let (registry, rest) = cached.image.split_once('/')?;
        let (repository, tag) = rest.rsplit_once(':')?;
        Some(Image {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag: tag.to_owned(),
            digest: cached.digest,
            platforms: cached.platforms,
            size: cached.size,
            last_pulled: cached.last_pulled_secs,
            pinned: cached.pinned,
        })
    }
}

/// The store against its limit, and what eviction removed.
#[derive(Debug, Serialize)]
pub struct Store {
    #[serde(flatten)]
    pub usage: StoreUsage,
    pub evicted_blobs: u64,
    pub evicted_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn registry_states_say_what_and_for_how_long() {
        let health = |condition| RegistryHealth {
            condition,
            remaining: Some(7),
            limit: Some(100),
            window_secs: Some(21600),
        };
        let limited = Registry::new(
            "docker.io".into(),
            health(Condition::RateLimited {
                retry_in: Duration::from_millis(29_100),
            }),
        );
        assert_eq!(limited.state, "rate_limited");
        assert_eq!(limited.retry_in_seconds, Some(30));
        assert_eq!((limited.remaining, limited.limit), (Some(7), Some(100)));
        let failing = Registry::new("r".into(), health(Condition::Unreachable { failures: 2 }));
        assert_eq!((failing.state, failing.failures), ("unreachable", Some(2)));
        let probing = Registry::new("r".into(), health(Condition::Revalidating));
        assert_eq!(probing.state, "revalidating");
        let json = serde_json::to_value(Registry::new("r".into(), health(Condition::Ok))).unwrap();
        assert_eq!(json["state"], "ok");
        assert_eq!(json["window_seconds"], 21600);
    }

    #[test]
    fn images_are_split_into_registry_repository_and_tag() {
        let cached = CachedImage {
            image: "localhost:5000/team/app:1.2".into(),
            digest: "sha256:ab".into(),
            media_type: "x".into(),
            size: 10,
            checked_at_ms: 0,
            last_pulled_secs: 5,
            pinned: true,
            platforms: vec!["linux/amd64".into()],
        };
        let image = Image::new(cached).unwrap();
        assert_eq!(
            (
                image.registry.as_str(),
                image.repository.as_str(),
                image.tag.as_str()
            ),
            ("localhost:5000", "team/app", "1.2")
        );
    }
}
