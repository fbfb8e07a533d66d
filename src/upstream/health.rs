//! What hoard knows of each upstream's state, so a failing or rate-limited
//! registry is not hammered:
//! - a circuit breaker: after `THRESHOLD` failures in a row (connect errors,
//!   timeouts, 5xx) requests fail at once for a cool-off that doubles up to
//!   `MAX_COOL_OFF`; then one probe goes through and its result decides;
//! - 429 back-off: after a 429, nothing is sent until `Retry-After` passes;
//! - the rate-limit budget: `ratelimit-remaining` under the configured floor
//!   tells the mirror to stop spending requests on tag revalidation.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::warn;

use super::error::Error;

/// Failures in a row that open the circuit.
const THRESHOLD: u32 = 5;
const FIRST_COOL_OFF: Duration = Duration::from_secs(5);
const MAX_COOL_OFF: Duration = Duration::from_secs(300);
/// A probe that has not reported back by then is presumed lost.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);
/// Back-off after a 429 without `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Registries clients named (`allow_any_upstream`) tracked at most: past
/// this many, all of them are forgotten (their back-offs too: a client can
/// only make hoard ask them sooner, never stop asking a configured one).
const MAX_TRACKED: usize = 4096;

#[derive(Default)]
struct State {
    failures: u32,
    open_until: Option<Instant>,
    cool_off: Option<Duration>,
    probe_started: Option<Instant>,
    backoff_until: Option<Instant>,
    remaining: Option<i64>,
    /// `ratelimit-limit` and its window (`;w=`), as last seen.
    limit: Option<i64>,
    window: Option<i64>,
}

/// How a registry is doing, for people (the status page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Answering.
    Ok,
    /// Its rate-limit budget is under the floor: cached tags are served
    /// without asking it again.
    BudgetLow,
    /// The last requests failed (connect errors, timeouts, 5xx); not yet
    /// enough to stop asking.
    Unreachable { failures: u32 },
    /// Not asked until `retry_in` has passed (the circuit breaker).
    CircuitOpen { retry_in: Duration },
    /// The circuit's cool-off is over: the next request (or the one in
    /// flight) tries it again and decides.
    Revalidating,
    /// Backing off after a 429 until `retry_in` has passed.
    RateLimited { retry_in: Duration },
}

/// A registry's condition and the rate limit it last announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub condition: Condition,
    pub remaining: Option<i64>,
    pub limit: Option<i64>,
    /// The window the limit counts over, in seconds.
    pub window_secs: Option<i64>,
}

/// Health of every upstream registry.
pub struct Health {
    floor: i64,
    /// Configured registries: always tracked.
    configured: std::collections::HashSet<String>,
    states: Mutex<HashMap<String, State>>,
}

/// What a request learned of the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Any answer that is not a failure (including 404).
    Answered,
    /// Connect error, timeout or 5xx.
    Failed,
    /// 429, with the registry's `Retry-After`.
    RateLimited(Option<Duration>),
}

impl Health {
    /// `floor`: the `ratelimit-remaining` under which the budget is low;
    /// `configured`: the registries never forgotten.
    pub fn new<'a>(floor: i64, configured: impl IntoIterator<Item = &'a String>) -> Health {
        Health {
            floor,
            configured: configured.into_iter().cloned().collect(),
            states: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a request to `registry` may be sent now.
    pub fn admit(&self, registry: &str) -> Result<(), Error> {
        let now = Instant::now();
        let mut states = self.states.lock();
        let state = self.tracked(&mut states, registry);
        if let Some(until) = state.backoff_until {
            if until > now {
                return Err(Error::TooManyRequests {
                    registry: registry.to_owned(),
                    retry_after: Some(until - now + Duration::from_millis(999)),
                });
            }
            state.backoff_until = None;
        }
        let Some(open_until) = state.open_until else {
            return Ok(());
        };
        let probing = state
            .probe_started
            .is_some_and(|started| now.duration_since(started) < PROBE_TIMEOUT);
        if now < open_until || probing {
            return Err(Error::CircuitOpen {
                registry: registry.to_owned(),
                retry_in: open_until.saturating_duration_since(now),
            });
        }
        // Half open: this request is the probe.
        state.probe_started = Some(now);
        Ok(())
    }

    /// Records the outcome of a request to `registry`.
    pub fn record(&self, registry: &str, verdict: Verdict) {
        let now = Instant::now();
        let mut states = self.states.lock();
        let state = self.tracked(&mut states, registry);
        match verdict {
            Verdict::Answered => {
                state.failures = 0;
                state.open_until = None;
                state.cool_off = None;
                state.probe_started = None;
            }
            Verdict::RateLimited(retry_after) => {
                let wait = retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
                state.backoff_until = Some(now + wait);
                warn!(
                    registry,
                    retry_after_secs = wait.as_secs(),
                    "upstream rate limit hit, backing off"
                );
            }
            Verdict::Failed => {
                state.failures += 1;
                let was_probe = state.probe_started.take().is_some();
                if was_probe || state.failures >= THRESHOLD {
                    let cool_off = match (was_probe, state.cool_off) {
                        (true, Some(previous)) => (previous * 2).min(MAX_COOL_OFF),
                        _ => FIRST_COOL_OFF,
                    };
                    state.cool_off = Some(cool_off);
                    state.open_until = Some(now + cool_off);
                    warn!(
                        registry,
                        cool_off_secs = cool_off.as_secs(),
                        "upstream failing, circuit open"
                    );
                }
            }
        }
    }

    /// Notes a `ratelimit-remaining` value; says so once when the budget
    /// falls under the floor.
    pub fn observe_remaining(&self, registry: &str, remaining: i64) {
        let mut states = self.states.lock();
        let state = self.tracked(&mut states, registry);
        let was_low = state.remaining.is_some_and(|r| r < self.floor);
        state.remaining = Some(remaining);
        if remaining < self.floor && !was_low {
            warn!(
                registry,
                remaining,
                floor = self.floor,
                "upstream rate-limit budget low: serving cached tags without revalidation"
            );
        }
    }

    /// `registry`'s state, made if new; client-named registries are
    /// forgotten past `MAX_TRACKED` (see there).
    fn tracked<'a>(&self, states: &'a mut HashMap<String, State>, registry: &str) -> &'a mut State {
        if !states.contains_key(registry) && states.len() >= self.configured.len() + MAX_TRACKED {
            states.retain(|name, _| self.configured.contains(name));
        }
        states.entry(registry.to_owned()).or_default()
    }

    /// Notes a `ratelimit-limit` and its window.
    pub fn observe_limit(&self, registry: &str, limit: Option<i64>, window: Option<i64>) {
        let mut states = self.states.lock();
        let state = self.tracked(&mut states, registry);
        state.limit = limit.or(state.limit);
        state.window = window.or(state.window);
    }

    /// What is known of `registry` now.
    pub fn snapshot(&self, registry: &str) -> Snapshot {
        let now = Instant::now();
        let states = self.states.lock();
        let Some(state) = states.get(registry) else {
            return Snapshot {
                condition: Condition::Ok,
                remaining: None,
                limit: None,
                window_secs: None,
            };
        };
        let condition = match (state.backoff_until, state.open_until) {
            (Some(until), _) if until > now => Condition::RateLimited {
                retry_in: until - now,
            },
            (_, Some(until)) if until > now => Condition::CircuitOpen {
                retry_in: until - now,
            },
            (_, Some(_)) => Condition::Revalidating,
            _ if state.failures > 0 => Condition::Unreachable {
                failures: state.failures,
            },
            _ if state.remaining.is_some_and(|r| r < self.floor) => Condition::BudgetLow,
            _ => Condition::Ok,
        };
        Snapshot {
            condition,
            remaining: state.remaining,
            limit: state.limit,
            window_secs: state.window,
        }
    }

    /// Whether `registry`'s remaining budget is under the floor.
    pub fn budget_low(&self, registry: &str) -> bool {
        let states = self.states.lock();
        states
            .get(registry)
            .and_then(|s| s.remaining)
            .is_some_and(|r| r < self.floor)
    }

    /// Whether the circuit for `registry` is open now.
    pub fn is_open(&self, registry: &str) -> bool {
        let states = self.states.lock();
        states.get(registry).is_some_and(|s| s.open_until.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_named_registries_are_tracked_within_a_bound() {
        let h = Health::new(10, &["configured.example".to_owned()]);
        h.record("configured.example", Verdict::RateLimited(None));
        // Hosts clients name, failing ones too, fill the map past its bound.
        for n in 0..MAX_TRACKED * 2 {
            let host = format!("host-{n}.example");
            h.admit(&host).unwrap();
            h.record(&host, Verdict::Failed);
        }
        assert!(h.states.lock().len() <= MAX_TRACKED + 1);
        // A configured registry's back-off survives it.
        assert!(matches!(
            h.admit("configured.example"),
            Err(Error::TooManyRequests { .. })
        ));
        // And a newcomer is still tracked.
        for _ in 0..THRESHOLD {
            h.record("new.example", Verdict::Failed);
        }
        assert!(h.is_open("new.example"));
    }

    #[test]
    fn snapshots_say_how_a_registry_is_doing() {
        let h = Health::new(10, &["r".to_owned()]);
        assert_eq!(h.snapshot("r").condition, Condition::Ok);
        h.observe_remaining("r", 5);
        h.observe_limit("r", Some(100), Some(21600));
        let s = h.snapshot("r");
        assert_eq!(s.condition, Condition::BudgetLow);
        assert_eq!(
            (s.remaining, s.limit, s.window_secs),
            (Some(5), Some(100), Some(21600))
        );
        h.record("r", Verdict::Failed);
        assert_eq!(
            h.snapshot("r").condition,
            Condition::Unreachable { failures: 1 }
        );
        for _ in 1..THRESHOLD {
            h.record("r", Verdict::Failed);
        }
        assert!(
            matches!(h.snapshot("r").condition, Condition::CircuitOpen { retry_in } if retry_in <= FIRST_COOL_OFF)
        );
        h.record("r", Verdict::RateLimited(Some(Duration::from_secs(30))));
        assert!(
            matches!(h.snapshot("r").condition, Condition::RateLimited { retry_in } if retry_in > Duration::from_secs(29))
        );
    }

    #[test]
    fn circuit_opens_after_repeated_failures_and_a_probe_closes_it() {
        let h = Health::new(10, &["configured.example".to_owned()]);
        for _ in 0..THRESHOLD - 1 {
            h.record("r", Verdict::Failed);
            assert!(h.admit("r").is_ok());
        }
        h.record("r", Verdict::Failed);
        assert!(matches!(h.admit("r"), Err(Error::CircuitOpen { .. })));
        assert!(h.admit("other").is_ok(), "per registry");
        // After the cool-off, exactly one probe goes through.
        h.states.lock().get_mut("r").unwrap().open_until = Some(Instant::now());
        assert!(h.admit("r").is_ok());
        assert!(matches!(h.admit("r"), Err(Error::CircuitOpen { .. })));
        h.record("r", Verdict::Answered);
        assert!(h.admit("r").is_ok());
        assert!(!h.is_open("r"));
    }

    #[test]
    fn failed_probe_doubles_the_cool_off() {
        let h = Health::new(10, &["configured.example".to_owned()]);
        for _ in 0..THRESHOLD {
            h.record("r", Verdict::Failed);
        }
        h.states.lock().get_mut("r").unwrap().open_until = Some(Instant::now());
        assert!(h.admit("r").is_ok());
        h.record("r", Verdict::Failed);
        let state = h.states.lock();
        assert_eq!(state["r"].cool_off, Some(FIRST_COOL_OFF * 2));
    }

    #[test]
    fn rate_limit_backs_off_and_budget_floor() {
        let h = Health::new(10, &["configured.example".to_owned()]);
        h.record("r", Verdict::RateLimited(Some(Duration::from_secs(30))));
        match h.admit("r") {
            Err(Error::TooManyRequests {
                retry_after: Some(d),
                ..
            }) => assert!(d <= Duration::from_secs(31)),
            other => panic!("{other:?}"),
        }
        assert!(!h.budget_low("r"));
        h.observe_remaining("r", 9);
        assert!(h.budget_low("r"));
        h.observe_remaining("r", 50);
        assert!(!h.budget_low("r"));
    }
}
