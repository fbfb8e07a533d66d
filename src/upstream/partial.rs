//! Partial answers to ranged blob requests: where a `206`'s body sits in
//! the blob (`Content-Range`, RFC 9110 §14.4) and which validator may
//! guard a resume (`If-Range`, RFC 9110 §13.1.5).

use http::{header, HeaderMap};

use crate::ranges::decimal;

/// What a single-part `Content-Range: bytes first-last/complete` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    /// First byte of the body, in the blob.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The whole blob's length, when the server said (`*` otherwise).
    pub complete: Option<u64>,
}

impl ContentRange {
    /// Parses the header value; `None` for anything else (an unsatisfied
    /// range's `bytes */len`, another unit, garbage).
    pub fn parse(value: &str) -> Option<ContentRange> {
        let spec = value.trim().strip_prefix("bytes ")?;
        let (range, complete) = spec.split_once('/')?;
        let (first, last) = range.split_once('-')?;
        let number = |s: &str| decimal(s.trim());
        let (start, last) = (number(first)?, number(last)?);
        let complete = match complete.trim() {
            "*" => None,
            n => Some(number(n)?),
        };
        if last < start || complete.is_some_and(|c| last >= c) {
            return None;
        }
        Some(ContentRange {
            start,
            end: last + 1,
            complete,
        })
    }

    /// The header of a response, if it has one that parses.
    pub fn of(headers: &HeaderMap) -> Option<ContentRange> {
        headers
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(ContentRange::parse)
    }
}

/// The response's `ETag` if it may go in an `If-Range`: only a strong one
/// may (RFC 9110 §13.1.5), so a weak `W/"…"` gives `None`.
pub fn strong_etag(headers: &HeaderMap) -> Option<String> {
    let etag = headers.get(header::ETAG)?.to_str().ok()?.trim();
    (etag.starts_with('"') && etag.ends_with('"') && etag.len() >= 2).then(|| etag.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(
            ContentRange::parse("bytes 0-99/1000"),
            Some(ContentRange {
                start: 0,
                end: 100,
                complete: Some(1000)
            })
        );
        assert_eq!(
            ContentRange::parse("bytes 990-999/*"),
            Some(ContentRange {
                start: 990,
                end: 1000,
                complete: None
            })
        );
        for bad in [
            "bytes */1000",
            "bytes 5-1/10",
            "bytes 0-10/10",
            "items 0-1/2",
            "bytes 0-1",
            "bytes a-1/2",
        ] {
            assert_eq!(ContentRange::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_strong_etags_guard_a_resume() {
        let mut headers = HeaderMap::new();
        assert_eq!(strong_etag(&headers), None);
        headers.insert(header::ETAG, "\"sha256:ab\"".parse().unwrap());
        assert_eq!(strong_etag(&headers).as_deref(), Some("\"sha256:ab\""));
        headers.insert(header::ETAG, "W/\"x\"".parse().unwrap());
        assert_eq!(strong_etag(&headers), None);
    }
}
