//! Docker Hub's rate-limit headers: `ratelimit-limit: 100;w=21600` and
//! `ratelimit-remaining: 76;w=21600`.
//! <https://docs.docker.com/docker-hub/usage/pulls/>

use http::HeaderMap;

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
}
