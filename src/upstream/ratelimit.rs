//! Docker Hub's rate-limit headers: `ratelimit-limit: 100;w=21600` and
//! `ratelimit-remaining: 76;w=21600` (the count, and the window in seconds:
//! 6 hours), and its two kinds of 429. The pull limit answers a 429 whose
//! body is the registry error `TOOMANYREQUESTS` linking Docker's docs (and
//! the rate-limit headers show nothing left); the abuse limit, thousands of
//! requests a minute from one address, answers a bare 429.
//! <https://docs.docker.com/docker-hub/usage/pulls/>

use http::HeaderMap;

use super::Envelope;

/// Which limit a 429 came from (`hoard_upstream_throttled_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// The pull quota of the window is spent.
    PullLimit,
    /// Too many requests in a short time, whatever the quota.
    Abuse,
}

impl Throttle {
    /// Tells the two apart: the pull limit says so in the registry error
    /// body or its headers; a bare 429 is the abuse limit.
    pub fn of(headers: &HeaderMap, envelope: Option<&Envelope>) -> Throttle {
        // TOOMANYREQUESTS alone is the spec's code for any 429 (GHCR, Quay
        // and ECR send it too): Docker Hub's pull limit names itself.
        let says_limit = envelope.is_some_and(|e| {
            let message = e.message.to_ascii_lowercase();
            message.contains("pull rate limit") || message.contains("increase-rate-limit")
        });
        let quota_spent = parse(headers, "ratelimit-remaining").is_some_and(|left| left <= 0);
        if says_limit || quota_spent {
            Throttle::PullLimit
        } else {
            Throttle::Abuse
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Throttle::PullLimit => "pull_limit",
            Throttle::Abuse => "abuse",
        }
    }
}

/// The window of a rate-limit header in seconds (`;w=21600`), if given.
pub fn window(headers: &HeaderMap, name: &str) -> Option<i64> {
    let value = headers.get(name)?.to_str().ok()?;
    value
        .split(';')
        .skip(1)
        .filter_map(|p| p.trim().strip_prefix("w="))
        .find_map(|w| w.trim().parse().ok())
}

/// The request count before the `;w=` window, if the header is present.
pub fn parse(headers: &HeaderMap, name: &str) -> Option<i64> {
    let value = headers.get(name)?.to_str().ok()?;
    value.split(';').next()?.trim().parse().ok()
}

/// `Retry-After` in seconds (the HTTP-date form is treated as absent).
pub fn retry_after(headers: &HeaderMap) -> Option<std::time::Duration> {
    let secs: u64 = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_count_before_window() {
        let mut h = HeaderMap::new();
        h.insert("ratelimit-remaining", "76;w=21600".parse().unwrap());
        h.insert("ratelimit-limit", "100".parse().unwrap());
        h.insert("retry-after", "17".parse().unwrap());
        assert_eq!(parse(&h, "ratelimit-remaining"), Some(76));
        assert_eq!(parse(&h, "ratelimit-limit"), Some(100));
        assert_eq!(parse(&h, "ratelimit-missing"), None);
        assert_eq!(retry_after(&h), Some(std::time::Duration::from_secs(17)));
        h.insert("ratelimit-remaining", "lots".parse().unwrap());
        assert_eq!(parse(&h, "ratelimit-remaining"), None);
    }

    #[test]
    fn reads_the_window() {
        let mut h = HeaderMap::new();
        h.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        assert_eq!(window(&h, "ratelimit-limit"), Some(21600));
        h.insert("ratelimit-limit", "100".parse().unwrap());
        assert_eq!(window(&h, "ratelimit-limit"), None);
        h.insert("ratelimit-limit", "100; w = 60 ".parse().unwrap());
        assert_eq!(
            window(&h, "ratelimit-limit"),
            None,
            "no spaces around = in the draft"
        );
        h.insert("ratelimit-limit", "100;w=60".parse().unwrap());
        assert_eq!(window(&h, "ratelimit-limit"), Some(60));
    }

    #[test]
    fn the_pull_limit_and_the_abuse_limit_are_told_apart() {
        let docker_hub = Envelope {
            code: "TOOMANYREQUESTS".into(),
            message: "You have reached your unauthenticated pull rate limit. https://www.docker.com/increase-rate-limit".into(),
        };
        let none = HeaderMap::new();
        assert_eq!(Throttle::of(&none, Some(&docker_hub)), Throttle::PullLimit);
        let mut spent = HeaderMap::new();
        spent.insert("ratelimit-remaining", "0;w=21600".parse().unwrap());
        assert_eq!(Throttle::of(&spent, None), Throttle::PullLimit);
        assert_eq!(Throttle::of(&none, None), Throttle::Abuse);
        let other = Envelope {
            code: "UNKNOWN".into(),
            message: "slow down".into(),
        };
        assert_eq!(Throttle::of(&none, Some(&other)), Throttle::Abuse);
        // The spec's code for any 429 (GHCR, Quay, ECR): not the quota.
        let generic = Envelope {
            code: "TOOMANYREQUESTS".into(),
            message: "too many requests".into(),
        };
        assert_eq!(Throttle::of(&none, Some(&generic)), Throttle::Abuse);
    }
}
